"""Per-task deployments: distinct tensors stored once, one view per task.

Methods whose output differs per task (FlexMerge groups, EMR-Merging, TALL masks) write a
**deployment** instead of a model: a directory (later a Hub repo or branch) that any task's
ordinary checkpoint can be rebuilt from.

Layout::

    deployment.json                  the manifest (below)
    deployment.safetensors           the distinct tensors, each stored once under a unique key
                                     (or deployment-0000i-of-0000N.safetensors + its index)
    config.json, tokenizer files...  copied from the base
    hubmerge_recipe.yaml             the resolved recipe (also marks the directory as hubmerge's)

The weights file is deliberately *not* called ``model.safetensors``: its keys are not a model's,
so ``AutoModel.from_pretrained`` on the directory fails instead of loading nonsense. Use
:func:`load_task_model` or :func:`export_task`.

Manifest, ``format_version`` 1::

    {
      "format": "hubmerge-deployment", "format_version": 1,
      "kind": "flexmerge",                      # producer: flexmerge | emr | tall ...
      "tasks": ["sst2", "mnli"],                # task names (the experts' labels), in recipe order
      "weights_file": "deployment.safetensors",
      "model_class": "BertModel",               # the base config's architectures[0], or null
      "weights": [{"name": "...", "shape": [..], "dtype": "F32"}, ...],   # one task's checkpoint, in order
      "views": {"<task>": {"<weight name>": <entry>, ...}, ...},
      "storage": {"bytes": 123, "tensor_bytes": 119, "scalar_bytes": 4,
                  "model_bytes": 100, "model_equivalents": 1.23},
      "flexmerge": {...}                        # producer-specific details, keyed by kind
    }

    <entry> := "<key>"                          the stored tensor ``key``, used as is
             | {"base": "<key>",                 base + scale * (delta * mask)
                "delta": "<key>",
                "mask": "<key>", "mask_row": 3,   optional: bit-packed mask, see pack_mask()
                "scale": 0.93}                    optional per-task scalar (EMR's rescaler), default 1

A FlexMerge deployment uses only the first form. The second one is the shape EMR-Merging
(``theta_pre + gamma_t * (tau_uni * m_t)``) and TALL / Consensus masks (``theta_pre + tau * m_t``)
take: ``theta_pre`` and ``tau_uni`` stored once, one bit per entry and task for the masks (a
``uint8`` tensor of shape ``(tasks, ceil(numel / 8))``, LSB first, one row per task), and one
scalar per task. Storage is the bytes of the stored tensors, so masks count as bits, as in the
FlexMerge paper's Table 1. Per-task scalars (EMR's rescalers) live in the view entries and
count 4 bytes each (float32) when the producer declares them (``storage.scalar_bytes``).

**Deployment methods** (``output = "deployment"``: EMR, TALL masks) subclass
:class:`DeploymentMethod` and implement :meth:`DeploymentMethod.deploy_tensor`, which returns a
:class:`MaskedTensor` per tensor: one shared update ``delta``, one boolean mask per task and
optionally one scalar per task. :func:`run_deployment` streams the recipe's inputs through the
method (its pre-passes first, with the engine's ``run_prepasses``) and writes the deployment:
per floating tensor ``<name>@base`` (``theta_0``), ``<name>@delta`` and ``<name>@masks`` (the
bit-packed masks, one row per task); other tensors once, under their own name.

What is shared when several tasks are loaded in one process (:func:`load_task_model`): every
stored tensor that a task uses *as is* is read once per deployment directory and the task
models' parameters point at the same memory, for as long as one of them is alive. Weights that
must be rebuilt (masked entries), converted (another dtype or device than stored) or re-laid by
transformers' checkpoint conversion are per model. The shared parameters must therefore be
treated as read-only: training one task model in place would change the others (pass
``share=False`` for private copies).
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import uuid
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch

from .checkpoint import DTYPE_NAMES, DTYPES, Checkpoint
from .errors import DeploymentError, MethodInputError, RecipeError
from .method import MergeMethod, TensorGroup
from .writer import (
    OWNER_MARKER,
    TEMP_PREFIX,
    ShardedWriter,
    TensorSpec,
    check_output_path,
    clean_stale_temporaries,
)

logger = logging.getLogger(__name__)

FORMAT = "hubmerge-deployment"
FORMAT_VERSION = 1
MANIFEST = "deployment.json"
WEIGHTS_STEM = "deployment"
WEIGHTS_FILE = f"{WEIGHTS_STEM}.safetensors"
#: Files of a deployment that are not carried into an exported checkpoint.
DEPLOYMENT_FILES = {MANIFEST, WEIGHTS_FILE, f"{WEIGHTS_FILE}.index.json", "README.md", ".gitattributes",
                    "accuracy_vs_size.png"}
#: Storage counted per per-task scalar (a float32), as the FlexMerge paper's Table 1 counts EMR's rescalers.
SCALAR_BYTES = 4


# -- masks -----------------------------------------------------------------------------------------------
def pack_mask(mask: torch.Tensor) -> torch.Tensor:
    """Pack a boolean mask into bits: ``uint8`` of ``ceil(numel / 8)`` bytes, LSB first.

    Element ``i`` of the flattened mask is bit ``i % 8`` of byte ``i // 8`` (numpy's
    ``packbits(..., bitorder="little")``).

    Args:
        mask: Any shape, bool (or 0/1) values.

    Returns:
        A 1-D ``uint8`` tensor.
    """
    flat = mask.reshape(-1).to(torch.uint8)
    pad = -flat.numel() % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    weights = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8, device=flat.device)
    return (flat.view(-1, 8) * weights).sum(dim=1, dtype=torch.uint8)


def unpack_mask(packed: torch.Tensor, shape: tuple[int, ...] | torch.Size) -> torch.Tensor:
    """Inverse of :func:`pack_mask`.

    Args:
        packed: 1-D ``uint8`` with at least ``ceil(prod(shape) / 8)`` bytes.
        shape: The mask's shape.

    Returns:
        A bool tensor of ``shape``.
    """
    numel = math.prod(shape)
    bits = torch.arange(8, dtype=torch.uint8, device=packed.device)
    flat = packed.reshape(-1, 1).bitwise_right_shift(bits).bitwise_and_(1).reshape(-1)
    return flat[:numel].bool().reshape(tuple(shape))


# -- writing ---------------------------------------------------------------------------------------------
def _spec_json(spec: TensorSpec) -> dict[str, Any]:
    return {"name": spec.name, "shape": list(spec.shape), "dtype": DTYPE_NAMES[spec.dtype]}


def _entry_keys(entry: Any) -> list[str]:
    if isinstance(entry, str):
        return [entry]
    return [entry[k] for k in ("base", "delta", "mask") if k in entry]


def check_views(tasks: list[str], weights: list[TensorSpec], stored: dict[str, TensorSpec],
                views: dict[str, dict[str, Any]]) -> None:
    """Check that every task has an entry for every weight and that entries fit the stored tensors.

    Args:
        tasks: Task names.
        weights: The ordinary checkpoint's tensors.
        stored: Stored tensors by key.
        views: Task to weight name to entry (see the module docstring).

    Raises:
        DeploymentError: Naming the task, weight or key at fault.
    """
    if set(views) != set(tasks):
        raise DeploymentError(f"views are for tasks {sorted(views)}, the deployment has {sorted(tasks)}")
    for task in tasks:
        view = views[task]
        for spec in weights:
            entry = view.get(spec.name)
            where = f"task {task!r}, weight {spec.name!r}"
            if entry is None:
                raise DeploymentError(f"{where}: no entry")
            if isinstance(entry, dict):
                unknown = set(entry) - {"base", "delta", "mask", "mask_row", "scale"}
                if unknown or "base" not in entry or "delta" not in entry:
                    raise DeploymentError(f"{where}: an entry object needs `base` and `delta` "
                                          f"(optional `mask`, `mask_row`, `scale`), got {sorted(entry)}")
                if ("mask_row" in entry) and "mask" not in entry:
                    raise DeploymentError(f"{where}: `mask_row` without `mask`")
            elif not isinstance(entry, str):
                raise DeploymentError(f"{where}: entry must be a key or an object, got {type(entry).__name__}")
            for key in _entry_keys(entry):
                if key not in stored:
                    raise DeploymentError(f"{where}: unknown stored tensor {key!r}")
            if isinstance(entry, str):
                if stored[entry].shape != spec.shape:
                    raise DeploymentError(f"{where}: stored tensor {entry!r} has shape {list(stored[entry].shape)}, "
                                          f"the weight has {list(spec.shape)}")
            else:
                for part in ("base", "delta"):
                    if stored[entry[part]].shape != spec.shape:
                        raise DeploymentError(f"{where}: {part} {entry[part]!r} has shape "
                                              f"{list(stored[entry[part]].shape)}, the weight has {list(spec.shape)}")
                if "mask" in entry:
                    mask = stored[entry["mask"]]
                    need = -(-math.prod(spec.shape) // 8)
                    if mask.dtype != torch.uint8 or mask.shape[-1] < need:
                        raise DeploymentError(f"{where}: mask {entry['mask']!r} must be uint8 with at least "
                                              f"{need} bytes per row")


class DeploymentWriter:
    """Writes one deployment directory: stored tensors streamed in order, manifest, atomic rename.

    The stored tensors are planned up front (unique keys, shapes, dtypes) and streamed with
    :class:`~hubmerge.writer.ShardedWriter`; nothing is visible at ``target`` until
    :meth:`finish` renames the finished directory into place.

    Args:
        target: Final directory.
        tasks: Task names, in order.
        weights: The tensors of one task's ordinary checkpoint (names, shapes, dtypes), in order.
        stored: The distinct tensors to store, in the order :meth:`write` receives them.
        views: Task to weight name to entry (see the module docstring).
        kind: Producer (``flexmerge``, ``emr``...).
        shard_size: Maximum bytes per weights shard.
        model_class: transformers class to build a task model with (``None``: ``AutoModel``).
        overwrite: Replace an existing directory that is not hubmerge's.
        scalars: Number of per-task scalars the views carry (EMR's rescalers), counted as
            :data:`SCALAR_BYTES` each in the storage.
        writer_class: The weights writer (a :class:`~hubmerge.writer.ShardedWriter`; the distributed
            executor passes one whose shards are written by workers, see :attr:`sharded`).

    Raises:
        DeploymentError: If the views do not fit the stored tensors.
        OutputExistsError: If ``target`` exists and is not hubmerge's (without ``overwrite``).
    """

    def __init__(self, target: Path, *, tasks: list[str], weights: list[TensorSpec], stored: list[TensorSpec],
                 views: dict[str, dict[str, Any]], kind: str, shard_size: int, model_class: str | None = None,
                 overwrite: bool = False, scalars: int = 0, writer_class: type[ShardedWriter] = ShardedWriter):
        by_key = {s.name: s for s in stored}
        if len(by_key) != len(stored):
            raise DeploymentError("stored tensor keys are not unique")
        check_views(tasks, weights, by_key, views)
        self.tasks = list(tasks)
        self.weights = list(weights)
        self.stored = list(stored)
        self.views = views
        self.kind = kind
        self.model_class = model_class
        self.scalars = int(scalars)
        self._writer = writer_class(Path(target), self.stored, shard_size=shard_size, overwrite=overwrite,
                                    stem=WEIGHTS_STEM)

    @property
    def sharded(self) -> ShardedWriter:
        """The weights writer (its planned ``shards`` and ``file_names``, its ``temp`` directory)."""
        return self._writer

    @property
    def keys(self) -> list[str]:
        """Stored keys in write order."""
        return self._writer.names

    @property
    def temp(self) -> Path:
        """The hidden directory being written (renamed to the target by :meth:`finish`)."""
        return self._writer.temp

    @property
    def tensor_bytes(self) -> int:
        """Bytes of the stored tensors."""
        return sum(s.nbytes for s in self.stored)

    @property
    def storage_bytes(self) -> int:
        """Bytes stored: the tensors plus :data:`SCALAR_BYTES` per declared per-task scalar."""
        return self.tensor_bytes + SCALAR_BYTES * self.scalars

    def set_scale(self, task: str, name: str, scale: float) -> None:
        """Set the ``scale`` of task ``task``'s entry for weight ``name`` (known only while writing)."""
        entry = self.views[task][name]
        if not isinstance(entry, dict):
            raise DeploymentError(f"task {task!r}, weight {name!r}: a plain key has no scale")
        entry["scale"] = float(scale)

    @property
    def model_bytes(self) -> int:
        """Bytes of one task's ordinary checkpoint (the unit of ``model_equivalents``)."""
        return sum(s.nbytes for s in self.weights)

    def write(self, key: str, tensor: torch.Tensor) -> None:
        """Append the next stored tensor (in plan order, with its planned shape and dtype)."""
        self._writer.write(key, tensor)

    def add_file(self, relative: str, content: bytes | str | Path) -> None:
        """Add a file (config, tokenizer, recipe...) to the deployment."""
        self._writer.add_file(relative, content)

    def manifest(self, extra: dict[str, Any] | None = None) -> dict[str, Any]:
        """The manifest as written by :meth:`finish`."""
        model_bytes = self.model_bytes
        manifest: dict[str, Any] = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "kind": self.kind,
            "tasks": self.tasks,
            "weights_file": WEIGHTS_FILE,
            "model_class": self.model_class,
            "storage": {
                "bytes": self.storage_bytes,
                "tensor_bytes": self.tensor_bytes,
                "scalar_bytes": SCALAR_BYTES * self.scalars,
                "model_bytes": model_bytes,
                "model_equivalents": self.storage_bytes / model_bytes if model_bytes else 0.0,
            },
            "weights": [_spec_json(s) for s in self.weights],
            "views": self.views,
        }
        if extra:
            manifest[self.kind] = extra
        return manifest

    def finish(self, extra: dict[str, Any] | None = None) -> Path:
        """Write the manifest and rename the directory into place.

        Args:
            extra: Producer-specific details stored under the manifest's ``kind`` key.

        Returns:
            The final directory.
        """
        self._writer.add_file(MANIFEST, json.dumps(self.manifest(extra), indent=1) + "\n")
        return self._writer.finish()

    def abort(self) -> None:
        """Remove everything written so far."""
        self._writer.abort()


class StagedDirectory:
    """A directory built in a hidden temporary beside ``target`` and renamed into place at once.

    Used for a run that writes several deployments (``size-*``) under one output directory:
    either all of them appear, or none. An existing ``target`` written by hubmerge (holding
    ``hubmerge_recipe.yaml``) is replaced; another one only with ``overwrite``.

    Args:
        target: The final directory.
        overwrite: Replace an existing directory that is not hubmerge's.

    Raises:
        OutputExistsError: See :func:`hubmerge.writer.check_output_path`.
    """

    def __init__(self, target: Path, *, overwrite: bool = False):
        self.target = Path(target).absolute()
        self.overwrite = overwrite
        check_output_path(self.target, overwrite=overwrite)
        self.target.parent.mkdir(parents=True, exist_ok=True)
        clean_stale_temporaries(self.target.parent)
        self.path = self.target.parent / f"{TEMP_PREFIX}{os.getpid()}-{uuid.uuid4().hex[:8]}-{self.target.name}"
        self.path.mkdir()

    def commit(self) -> Path:
        """Rename the staged directory into place (replacing an old one) and return it."""
        if not (self.path / OWNER_MARKER).is_file():
            raise DeploymentError(f"{self.path}: staged output lacks {OWNER_MARKER}")
        if self.target.exists() or self.target.is_symlink():
            check_output_path(self.target, overwrite=self.overwrite)
            trash = self.target.parent / f"{TEMP_PREFIX}{os.getpid()}-old-{uuid.uuid4().hex[:8]}"
            os.replace(self.target, trash)
            os.replace(self.path, self.target)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(self.path, self.target)
        return self.target

    def abort(self) -> None:
        """Remove the staged directory; ``target`` is left as it was."""
        shutil.rmtree(self.path, ignore_errors=True)


# -- reading ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TaskView:
    """What a task model loaded by :func:`load_task_model` was built from (``model.hubmerge_task``).

    Attributes:
        directory: The deployment directory.
        task: The task name.
        keys: Weight name to the stored key(s) behind it.
        shared: The stored tensors the model's weights point at; kept here so that models loaded
            later from the same deployment find them in the shared cache.
    """

    directory: Path
    task: str
    keys: dict[str, Any]
    shared: list[torch.Tensor] = field(default_factory=list, repr=False)


# (directory identity, key) -> stored tensor, alive while a model built from it is alive
_SHARED: weakref.WeakValueDictionary = weakref.WeakValueDictionary()


def checked_manifest(path: Path, fmt: str, version: int) -> dict[str, Any]:
    """Read a JSON manifest and check its ``format`` and that its ``format_version`` is not newer.

    Args:
        path: The manifest file (it exists).
        fmt: The expected ``format`` value.
        version: The newest ``format_version`` this hubmerge reads.

    Returns:
        The manifest.

    Raises:
        DeploymentError: Unreadable, of another format, or of a newer version (naming the file).
    """
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise DeploymentError(f"{path}: unreadable manifest ({exc})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != fmt:
        raise DeploymentError(f"{path}: not a {fmt} manifest")
    found = manifest.get("format_version")
    if not isinstance(found, int) or found > version:
        raise DeploymentError(f"{path}: format_version {found!r} is newer than this hubmerge reads "
                              f"({version}); upgrade hubmerge")
    return manifest


class Deployment:
    """A deployment directory opened for reading (manifest checked, tensors read lazily).

    Args:
        directory: The deployment directory.

    Raises:
        DeploymentError: If the directory holds no valid deployment (a FlexMerge output root is
            recognised and its ``size-*`` deployments are named).
    """

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        path = self.directory / MANIFEST
        if not path.is_file():
            sizes = sorted(p.name for p in self.directory.glob("size-*") if (p / MANIFEST).is_file())
            hint = f"; it holds the deployments {', '.join(sizes)}: pass one of them" if sizes else ""
            if (self.directory / "dynamic.json").is_file():
                hint = "; it is a dynamic deployment (SE-Merging): load it with hubmerge.load_dynamic_model"
            raise DeploymentError(f"{self.directory}: no {MANIFEST} (not a hubmerge deployment){hint}")
        manifest = checked_manifest(path, FORMAT, FORMAT_VERSION)
        self.manifest = manifest
        stat = path.stat()
        self._identity = (str(self.directory.resolve()), stat.st_ino, stat.st_mtime_ns, stat.st_size)
        try:
            self.tasks: list[str] = list(manifest["tasks"])
            self.weights = [TensorSpec(w["name"], tuple(w["shape"]), DTYPES[w["dtype"]]) for w in manifest["weights"]]
            self.views: dict[str, dict[str, Any]] = manifest["views"]
        except (KeyError, TypeError) as exc:
            raise DeploymentError(f"{path}: malformed manifest ({type(exc).__name__}: {exc})") from None
        self.store = Checkpoint(self.directory, weights=manifest.get("weights_file", WEIGHTS_FILE))
        stored = {n: TensorSpec(n, m.shape, m.dtype) for n, m in self.store.meta.items()}
        check_views(self.tasks, self.weights, stored, self.views)

    @property
    def kind(self) -> str:
        """The producer (``flexmerge``...)."""
        return self.manifest.get("kind", "?")

    @property
    def storage(self) -> dict[str, Any]:
        """``bytes``, ``model_bytes`` and ``model_equivalents`` as recorded."""
        return dict(self.manifest.get("storage", {}))

    def check_task(self, task: str) -> None:
        """Raise :class:`DeploymentError` naming the known tasks if ``task`` is not one."""
        if task not in self.views:
            raise DeploymentError(f"{self.directory}: no task {task!r} (tasks: {', '.join(self.tasks)})")

    def stored(self, key: str, *, share: bool = False) -> torch.Tensor:
        """One stored tensor (read once per process and deployment when ``share``)."""
        if not share:
            return self.store.get(key)
        cache_key = (self._identity, key)
        tensor = _SHARED.get(cache_key)
        if tensor is None:
            tensor = self.store.get(key)
            _SHARED[cache_key] = tensor
        return tensor

    def tensor(self, task: str, name: str, *, share: bool = False) -> torch.Tensor:
        """Task ``task``'s weight ``name``, rebuilt from the stored tensors.

        Args:
            task: A task of the deployment.
            name: A weight name of the ordinary checkpoint.
            share: Return the shared stored tensor itself where the entry is a plain key.

        Returns:
            The weight (a CPU tensor in the stored dtype).
        """
        self.check_task(task)
        entry = self.views[task][name]
        if isinstance(entry, str):
            return self.stored(entry, share=share)
        base = self.store.get(entry["base"])
        delta = self.store.get(entry["delta"])
        compute = torch.float32 if base.dtype in (torch.float16, torch.bfloat16) else base.dtype
        update = delta.to(compute)
        if "mask" in entry:
            packed = self.store.get(entry["mask"])
            if packed.dim() == 2:
                packed = packed[int(entry.get("mask_row", 0))]
            update = update * unpack_mask(packed, update.shape)
        scale = float(entry.get("scale", 1.0))
        return (base.to(compute) + scale * update).to(base.dtype)

    def close(self) -> None:
        """Release file handles."""
        self.store.close()


def _local_directory(repo_or_dir: str | Path, revision: str | None, token: str | None) -> Path:
    path = Path(repo_or_dir).expanduser()
    if path.is_dir():
        return path
    from .recipe import ModelRef
    from .sources import resolve

    try:
        ref = ModelRef.model_validate(str(repo_or_dir))
    except ValueError:  # pydantic.ValidationError is a ValueError
        raise DeploymentError(f"{repo_or_dir}: neither a directory nor a Hub repo id") from None
    if ref.path is not None:
        raise DeploymentError(f"{repo_or_dir}: not a directory")
    if revision is not None:
        ref = ref.model_copy(update={"revision": revision})
    from .errors import ModelReferenceError

    try:
        return resolve(ref, token=token).directory
    except ModelReferenceError:
        hint = _overview_hint(ref.repo, ref.revision, token)
        if hint:
            raise DeploymentError(f"{repo_or_dir}: {hint}") from None
        raise


def _overview_hint(repo: str, revision: str | None, token: str | None) -> str | None:
    """When ``repo@revision`` is the overview of a published FlexMerge run: which branches hold its sizes."""
    try:
        from huggingface_hub import HfApi

        from .flexmerge import ROOT_SUMMARY
        from .hub import repo_files

        _, files = repo_files(repo, revision=revision, token=token)
        if ROOT_SUMMARY not in files:
            return None
        refs = HfApi().list_repo_refs(repo, token=token)
        sizes = sorted(b.name for b in refs.branches if b.name.startswith("size-"))
    except Exception:  # noqa: BLE001 - only a hint; the original error stands otherwise
        return None
    example = sizes[0] if sizes else "size-1"
    return (f"this revision is the overview of a FlexMerge run; its deployments are on the branches "
            f"{', '.join(sizes) or '(none)'}: pass revision={example!r} (or {repo}@{example})")


def _model_class(name_or_class: Any, manifest_class: str | None):
    import transformers

    if name_or_class is None:
        if manifest_class and isinstance(getattr(transformers, manifest_class, None), type):
            return getattr(transformers, manifest_class)
        return transformers.AutoModel
    if isinstance(name_or_class, str):
        cls = getattr(transformers, name_or_class, None)
        if not isinstance(cls, type):
            raise DeploymentError(f"model_class {name_or_class!r} is not a transformers class")
        return cls
    return name_or_class


def concrete_model_class(cls, config):
    """The model class an ``Auto*`` class would pick for ``config`` (concrete classes unchanged)."""
    mapping = getattr(cls, "_model_mapping", None)
    if mapping is None:
        return cls
    try:
        return mapping[type(config)]
    except KeyError:
        raise DeploymentError(f"{cls.__name__} has no model for config {type(config).__name__}") from None


def load_task_model(repo_or_dir: str | Path, task: str, *, model_class: Any = None, revision: str | None = None,
                    token: str | None = None, share: bool = True):
    """Build one task's model from a deployment, as a plain transformers model.

    Args:
        repo_or_dir: A deployment directory (e.g. ``out/merge/size-2``) or a Hub repo id
            (``org/name`` or ``org/name@revision``).
        task: The task (an expert's label in the recipe).
        model_class: A transformers class or its name; default: the class in the manifest (the
            base config's ``architectures[0]``) when transformers has it, else ``AutoModel``.
        revision: Hub revision (branch such as ``size-2``, tag or commit).
        token: Hub token for private repos (never logged).
        share: Let tasks loaded from the same deployment share the memory of the tensors they
            have in common (see the module docstring); ``False`` gives private copies.

    Returns:
        The model in eval mode. ``model.hubmerge_task`` is a :class:`TaskView`.

    Raises:
        DeploymentError: No deployment there, unknown task, or the class needs weights that the
            deployment does not hold.
        HubError: The Hub cannot provide the repo.
    """
    from transformers import AutoConfig

    directory = _local_directory(repo_or_dir, revision, token)
    deployment = Deployment(directory)
    try:
        deployment.check_task(task)
        state = {spec.name: deployment.tensor(task, spec.name, share=share) for spec in deployment.weights}
    finally:
        deployment.close()
    config = AutoConfig.from_pretrained(directory)
    cls = concrete_model_class(_model_class(model_class, deployment.manifest.get("model_class")), config)
    model, info = cls.from_pretrained(None, config=config, state_dict=state, output_loading_info=True)
    missing = sorted(info.get("missing_keys", []))
    if missing:
        raise DeploymentError(
            f"{directory}: {cls.__name__} needs weights the deployment does not hold ({', '.join(missing[:3])}"
            + (f" and {len(missing) - 3} more" if len(missing) > 3 else "") + "); pass the base's model_class"
        )
    shared = list({id(t): t for t in state.values()}.values()) if share else []
    model.hubmerge_task = TaskView(directory, task, dict(deployment.views[task]), shared)
    return model.eval()


def export_task(repo_or_dir: str | Path, task: str, out: str | Path, *, revision: str | None = None,
                token: str | None = None, overwrite: bool = False, shard_size: int = 5 * 10**9) -> Path:
    """Write one task of a deployment as a standalone, ordinary checkpoint directory.

    The result (``model.safetensors`` or shards, config and tokenizer files, and
    ``hubmerge_recipe.yaml``) loads with ``AutoModel.from_pretrained`` like any model. It is
    streamed one tensor at a time and renamed into place when complete.

    Args:
        repo_or_dir: A deployment directory or Hub repo id.
        task: The task to export.
        out: Output directory.
        revision: Hub revision.
        token: Hub token.
        overwrite: Replace an existing directory that hubmerge did not write.
        shard_size: Maximum bytes per shard.

    Returns:
        The output directory.

    Raises:
        DeploymentError: No deployment there or unknown task.
        OutputExistsError: ``out`` exists and is not hubmerge's (without ``overwrite``).
    """
    directory = _local_directory(repo_or_dir, revision, token)
    deployment = Deployment(directory)
    writer = None
    try:
        deployment.check_task(task)
        writer = ShardedWriter(Path(out), deployment.weights, shard_size=shard_size, overwrite=overwrite)
        for spec in deployment.weights:
            writer.write(spec.name, deployment.tensor(task, spec.name).to(spec.dtype))
        for path in sorted(directory.rglob("*")):
            rel = path.relative_to(directory)
            if (not path.is_file() or rel.parts[0].startswith(".") or path.name in DEPLOYMENT_FILES
                    or path.name.startswith(WEIGHTS_STEM) or path.name == OWNER_MARKER):
                continue
            writer.add_file(rel.as_posix(), path)
        recipe = directory / OWNER_MARKER
        note = (f"# Task {task!r} exported by hubmerge from the deployment {directory.name!r}; "
                "the recipe below builds the whole deployment.\n")
        writer.add_file(OWNER_MARKER, note + (recipe.read_text(encoding="utf-8") if recipe.is_file() else ""))
        return writer.finish()
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    finally:
        deployment.close()


# -- deployment methods ----------------------------------------------------------------------------------
@dataclass
class MaskedTensor:
    """What a :class:`DeploymentMethod` returns for one tensor.

    Task ``t``'s weight is ``theta_0 + scales[t] * (delta * masks[t])`` (``theta_0`` is the base's
    tensor, stored by the writer).

    Attributes:
        delta: The shared update (EMR's ``tau_uni``, TALL's ``tau_MTL``), shape of the weight.
        masks: Boolean, shape ``(T, *weight.shape)``: one mask per task, in the experts' order.
        scales: One scalar per task (a ``(T,)`` tensor or sequence), or ``None`` for 1.
    """

    delta: torch.Tensor
    masks: torch.Tensor
    scales: torch.Tensor | list[float] | tuple[float, ...] | None = None


class DeploymentMethod(MergeMethod):
    """Base class of methods whose output is a per-task deployment (``output = "deployment"``).

    Instead of :meth:`~hubmerge.method.MergeMethod.merge_tensor` a subclass implements
    :meth:`deploy_tensor`; pre-passes (``prepasses``, ``observe``, ``finish_pass``) and
    ``elementwise`` work as for any method (``elementwise`` only concerns the pre-passes: the
    write pass hands whole tensors, since masks are packed per tensor). Run with
    :func:`run_deployment` (``hubmerge run``), not :func:`hubmerge.engine.merge`.

    Attributes:
        kind: The manifest's ``kind`` (default: the method's name).
        scalar_scope: How many per-task scalars the deployment stores, for the storage count:
            ``"model"`` (one per task), ``"tensor"`` (one per task and floating tensor) or
            ``None`` (none; a constant scale is not a per-task scalar).
    """

    output: ClassVar[str] = "deployment"
    kind: ClassVar[str] = ""
    scalar_scope: Literal["model", "tensor"] | None = None

    def check_tasks(self, tasks: list[str]) -> None:
        """Refuse parameters that do not fit the task names (experts' labels), before any work.

        Raises:
            MethodParamError: Naming the parameter at fault.
        """

    def deploy_tensor(self, group: TensorGroup) -> MaskedTensor:
        """The shared update, per-task masks and scalars of one tensor.

        Args:
            group: The base weight and the experts' task vectors (a whole tensor).

        Returns:
            A :class:`MaskedTensor`.
        """
        raise NotImplementedError(f"{type(self).__name__} must implement deploy_tensor")

    def merge_tensor(self, group: TensorGroup) -> torch.Tensor:
        """Refused: a deployment method has one output per task."""
        raise MethodInputError(f"method {self.name!r} produces a per-task deployment, not one merged tensor; "
                               "run it with `hubmerge run` (hubmerge.deployment.run_deployment)")

    def deployment_info(self) -> dict[str, Any]:
        """Producer details stored in the manifest under ``kind`` (JSON-able); default: the parameters."""
        return {"method": self.name, "params": self.params.model_dump(mode="json")}

    @classmethod
    def manifest_kind(cls) -> str:
        """The manifest's ``kind``."""
        return cls.kind or cls.name


def is_deployment_method(method_or_name: Any) -> bool:
    """Whether a method (instance, class or registered name) writes a per-task deployment."""
    cls = method_or_name
    if isinstance(method_or_name, str):
        from .plugins import get_method

        try:
            cls = get_method(method_or_name)
        except Exception:  # noqa: BLE001 - unknown method: not a deployment (check_recipe reports it)
            return False
    return getattr(cls, "output", "model") == "deployment"


def masked_layout(specs: list[TensorSpec], floating: set[str], tasks: list[str]
                  ) -> tuple[list[TensorSpec], dict[str, dict[str, Any]]]:
    """Stored tensors and views of a masked deployment (EMR, TALL).

    Per floating tensor ``<name>@base``, ``<name>@delta`` (its spec) and ``<name>@masks`` (``uint8``,
    ``(T, ceil(numel / 8))``); other tensors once under their own name.

    Args:
        specs: The checkpoint's tensors in storage order (output dtype).
        floating: Names of the tensors that get per-task entries.
        tasks: Task names.

    Returns:
        ``(stored specs in write order, task -> weight -> entry)``.
    """
    stored: list[TensorSpec] = []
    views: dict[str, dict[str, Any]] = {t: {} for t in tasks}
    for spec in specs:
        if spec.name not in floating:
            stored.append(spec)
            for t in tasks:
                views[t][spec.name] = spec.name
            continue
        base, delta, masks = f"{spec.name}@base", f"{spec.name}@delta", f"{spec.name}@masks"
        stored += [TensorSpec(base, spec.shape, spec.dtype), TensorSpec(delta, spec.shape, spec.dtype),
                   TensorSpec(masks, (len(tasks), -(-math.prod(spec.shape) // 8)), torch.uint8)]
        for row, t in enumerate(tasks):
            views[t][spec.name] = {"base": base, "delta": delta, "mask": masks, "mask_row": row}
    return stored, views


def masked_storage_bytes(specs: list[TensorSpec], floating: set[str], tasks: int, scalars: int = 0) -> int:
    """The bytes :func:`masked_layout` stores: ``theta_0`` and the update per floating tensor, one bit per
    entry and task, other tensors once, :data:`SCALAR_BYTES` per scalar (the FlexMerge paper's Table 1)."""
    total = SCALAR_BYTES * scalars
    for spec in specs:
        if spec.name in floating:
            total += 2 * spec.nbytes + tasks * -(-math.prod(spec.shape) // 8)
        else:
            total += spec.nbytes
    return total


def check_deployment(recipe, *, file: str | None = None) -> DeploymentMethod:
    """Check a recipe of a deployment method without reading any model (``hubmerge validate``).

    Returns:
        The method instance.

    Raises:
        RecipeError: Not a deployment method, a ``flexmerge`` section, adapter output, or parameters
            that do not fit the experts' labels.
    """
    from .errors import MethodParamError
    from .recipe import check_recipe

    method = check_recipe(recipe, file=file)
    if not isinstance(method, DeploymentMethod):
        raise RecipeError(f"method {recipe.method!r} produces one merged model, not a deployment", field="method",
                          file=file)
    if recipe.flexmerge is not None:
        raise RecipeError(f"method {recipe.method!r} writes its own per-task deployment; FlexMerge groups are merged "
                          "by a single-output method (flexmerge.inner)", field="flexmerge", file=file)
    if recipe.output.format != "model":
        raise RecipeError("a deployment stores full tensors; `output.format: adapter` is not supported",
                          field="output.format", file=file)
    try:
        method.check_tasks([e.label for e in recipe.experts])
    except MethodParamError as exc:
        message = str(exc).removeprefix(f"{exc.field}: ")
        raise RecipeError(message, field=f"params.{exc.field}", file=file) from None
    return method


def _scales_list(scales: Any, tasks: int, name: str, method: str) -> list[float] | None:
    if scales is None:
        return None
    values = scales.detach().to("cpu", torch.float64).reshape(-1).tolist() if isinstance(scales, torch.Tensor) \
        else [float(v) for v in scales]
    if len(values) != tasks or not all(math.isfinite(v) for v in values):
        raise DeploymentError(f"method {method!r} returned {len(values)} scales for {name!r} (need {tasks} finite)")
    # stored as float32 (what the storage counts); the manifest keeps that value exactly
    return [float(torch.tensor(v, dtype=torch.float32)) for v in values]


def output_setup(recipe, output: str | Path | None, device: str | None, *, file: str | None = None):
    """Where a deployment goes and how it is computed, checked before any input is read.

    Args:
        recipe: The validated recipe.
        output: Output directory overriding ``output.path`` (not confined to the working directory).
        device: Device overriding the recipe's.
        file: Recipe file name for errors.

    Returns:
        ``(target directory, compute device, compute dtype, output dtype or None)``.

    Raises:
        RecipeError: No output directory, or ``output.path`` escapes the working directory.
    """
    from .engine import resolve_device
    from .writer import confine_output_path

    target = Path(output or recipe.output.path or "")
    if not str(target) or str(target) == ".":
        raise RecipeError("no output directory (set output.path or pass --output)", field="output.path", file=file)
    if output is None:
        confine_output_path(target, file=file)
    out_dtype = getattr(torch, recipe.output.dtype) if recipe.output.dtype else None
    return target, resolve_device(device or recipe.device), getattr(torch, recipe.dtype), out_dtype


def run_deployment(recipe, *, output: str | Path | None = None, device: str | None = None, overwrite: bool = False,
                   token: str | None = None, progress=None, file: str | None = None):
    """Run a recipe whose method writes a per-task deployment (EMR, TALL masks).

    Passes over the inputs: the method's pre-passes (EMR's model-wide rescalers, TIES' global
    top-k...), then one that writes the deployment, a tensor at a time: ``theta_0``, the method's
    shared update and the bit-packed masks of every task; the per-task scalars go into the views.
    The directory appears at ``output`` only when complete (``hubmerge_recipe.yaml``, the base's
    config and tokenizer files, a card and ``deployment.json`` included).

    Args:
        recipe: A schema-valid recipe with a deployment method.
        output: Output directory (overrides ``output.path``).
        device: Compute device (overrides ``recipe.device``).
        overwrite: Replace an existing directory that hubmerge did not write.
        token: Hub token for private inputs.
        progress: Called with :class:`~hubmerge.engine.Progress` (stages ``prepass i/n``, ``write``).
        file: Recipe file name for errors.

    Returns:
        A :class:`~hubmerge.engine.MergeResult` (``output_dir`` is the deployment;
        ``extra["deployment"]`` holds its kind, tasks and storage).

    Raises:
        RecipeError: Bad recipe (before any input is read).
        HubmergeError: Input or output problems; nothing is left at the output path on failure.
    """
    import time

    from .card import build_card, deployment_card_inputs
    from .engine import (
        MergeResult,
        Progress,
        build_group,
        copy_model_files,
        open_inputs,
        output_specs,
        prefetched,
        run_prepasses,
    )
    from .lineage import resolved_recipe_yaml

    started = time.perf_counter()
    method = check_deployment(recipe, file=file)
    if getattr(method, "dynamic", False):  # SE-Merging: a dynamic deployment (hubmerge.dynamic)
        from .dynamic import run_dynamic

        return run_dynamic(recipe, output=output, device=device, overwrite=overwrite, token=token, progress=progress,
                           file=file)
    target, compute_device, compute_dtype, out_dtype = output_setup(recipe, output, device, file=file)

    inputs = open_inputs(recipe, token=token)
    writer = None
    try:
        tasks = [e.label for e in inputs.experts]
        names = inputs.base_checkpoint.names()
        meta = inputs.base_checkpoint.meta
        specs = output_specs(inputs.base_checkpoint, out_dtype)
        spec_of = {s.name: s for s in specs}
        floating = {n for n in names if meta[n].dtype.is_floating_point}
        stored, views = masked_layout(specs, floating, tasks)
        scalars = {"model": len(tasks), "tensor": len(tasks) * len(floating)}.get(method.scalar_scope or "", 0)
        writer = DeploymentWriter(target, tasks=tasks, weights=specs, stored=stored, views=views,
                                  kind=method.manifest_kind(), shard_size=recipe.output.shard_size,
                                  model_class=_base_model_class(inputs.base.directory), overwrite=overwrite,
                                  scalars=scalars)
        run_prepasses(method, inputs, names, compute_device, compute_dtype, progress)
        done_bytes = 0
        pooled = compute_dtype if compute_device.type == "cpu" else None
        for count, fetched in enumerate(prefetched(inputs, names, pooled_dtype=pooled), 1):
            name = fetched.name
            spec = spec_of[name]
            if name not in floating:
                writer.write(name, fetched.base.to(spec.dtype))
            else:
                group = build_group(inputs, fetched, compute_device, compute_dtype)
                result = method.deploy_tensor(group)
                shape = tuple(group.base.shape)
                if tuple(result.delta.shape) != shape or tuple(result.masks.shape) != (len(tasks), *shape):
                    raise DeploymentError(
                        f"method {recipe.method!r} returned delta {list(result.delta.shape)} and masks "
                        f"{list(result.masks.shape)} for {name!r}, expected {list(shape)} and {[len(tasks), *shape]}")
                scales = _scales_list(result.scales, len(tasks), name, recipe.method)
                writer.write(f"{name}@base", fetched.base.to(spec.dtype))
                writer.write(f"{name}@delta", result.delta.to(device="cpu", dtype=spec.dtype))
                masks = result.masks.to(torch.bool)
                packed = torch.stack([pack_mask(m) for m in masks]) if len(tasks) else masks.new_zeros(0)
                writer.write(f"{name}@masks", packed.to("cpu").reshape(len(tasks), -1))
                if scales is not None:
                    for task, value in zip(tasks, scales):
                        writer.set_scale(task, name, value)
                del group, result, masks, packed
            done_bytes += fetched.nbytes
            if progress:
                progress(Progress("write", count, len(names), done_bytes, inputs.bytes_per_pass))
        copy_model_files(inputs.base.directory, writer)
        experts = [e.resolved for e in inputs.experts]
        info = method.deployment_info()
        result = MergeResult(
            output_dir=target, recipe=recipe, method=method, base=inputs.base, experts=experts,
            device=str(compute_device), seconds=0.0, bytes_read=inputs.bytes_per_pass * (1 + method.prepasses),
            bytes_written=writer.tensor_bytes, tensors=len(names),
            extra={"provenance": {"deployment": method.manifest_kind()}},
        )
        writer.add_file(OWNER_MARKER, resolved_recipe_yaml(result))
        manifest = writer.manifest(info)
        result.output_dir = writer.temp
        card = build_card(deployment_card_inputs(result, [DeploymentVariant(_default_label(manifest), None, manifest)]))
        writer.add_file("README.md", str(card))
        result.output_dir = writer.finish(info)
        result.extra["deployment"] = {"kind": manifest["kind"], "tasks": tasks, "storage": manifest["storage"]}
        if manifest["storage"]["model_equivalents"] > len(tasks):
            logger.warning("the %s deployment stores %.3f model-equivalents, more than keeping the %d experts",
                           manifest["kind"], manifest["storage"]["model_equivalents"], len(tasks))
        result.seconds = time.perf_counter() - started
        logger.info("deployment %s: %d tasks, %.3f model-equivalents in %.2fs", manifest["kind"], len(tasks),
                    manifest["storage"]["model_equivalents"], result.seconds)
        return result
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    finally:
        inputs.close()


def _base_model_class(base_dir: Path) -> str | None:
    try:
        config = json.loads((Path(base_dir) / "config.json").read_text(encoding="utf-8"))
        architectures = config.get("architectures") or []
        return architectures[0] if architectures else None
    except (OSError, ValueError, AttributeError):
        return None


def _default_label(manifest: dict[str, Any]) -> str:
    """A single deployment's size label: its model-equivalents (``2.06``)."""
    return format(float(manifest.get("storage", {}).get("model_equivalents", 0.0)), ".3g")


@dataclass
class DeploymentVariant:
    """One deployment of a published set (a FlexMerge size, or the one EMR/TALL deployment).

    Attributes:
        label: Its size label (``"2"``, ``"1.5"``; a single deployment: its model-equivalents).
        revision: The Hub branch holding it (``None``: the repo's ``main``).
        manifest: Its ``deployment.json``.
        directory: Where it was written locally.
        scores: Task to metric value (each task evaluated with its own task model), if evaluated.
    """

    label: str
    revision: str | None
    manifest: dict[str, Any]
    directory: Path | None = None
    scores: dict[str, float] = field(default_factory=dict)

    @property
    def model_equivalents(self) -> float:
        """Stored bytes / one model's bytes."""
        return float(self.manifest.get("storage", {}).get("model_equivalents", 0.0))

    @property
    def bytes(self) -> int:
        """Stored bytes."""
        return int(self.manifest.get("storage", {}).get("bytes", 0))

    @property
    def tasks(self) -> list[str]:
        """Task names."""
        return list(self.manifest.get("tasks", []))


def read_manifest(directory: str | Path) -> dict[str, Any]:
    """The ``deployment.json`` of a deployment directory (unchecked)."""
    path = Path(directory) / MANIFEST
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise DeploymentError(f"{path}: unreadable manifest ({exc})") from None
