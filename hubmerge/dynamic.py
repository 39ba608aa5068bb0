"""Dynamic deployments: a merge whose coefficients change with every input (SE-Merging).

A **dynamic method** (:class:`DynamicMethod`, e.g. the ``se_merging`` plugin) does not write one
model or one model per task: at inference it looks at each sample and merges for it. Its output is a
**dynamic deployment**, a directory (or Hub repo) holding::

    dynamic.json                 the manifest (below)
    dynamic.safetensors          per floating tensor ``<name>@base`` (theta_0) and ``<name>@tau``
                                 (the experts' task vectors stacked, ``(T, *shape)``); other tensors
                                 once under their own name (or dynamic-0000i-of-0000N.safetensors + index)
    config.json, tokenizer...    copied from the base
    hubmerge_recipe.yaml         the resolved recipe
    README.md                    the card

Manifest, ``format_version`` 1::

    {"format": "hubmerge-dynamic", "format_version": 1, "kind": "se_merging",
     "method": "se_merging", "params": {...},      # the method's parameters (probe layer, lambda...)
     "tasks": ["digit", ...],                       # the experts' labels, the order of the task vectors
     "model_class": "ViTModel", "weights_file": "dynamic.safetensors",
     "weights": [{"name", "shape", "dtype"}, ...],  # the base checkpoint's tensors
     "storage": {"bytes", "model_bytes", "model_equivalents"}}

:func:`load_dynamic_model` (``hubmerge.load_dynamic_model``, the sibling of ``load_task_model``)
returns a :class:`DynamicModel`: a ``torch.nn.Module`` called like the transformers model it wraps
(same arguments, same output class). For a batch it

1. runs the static merge ``theta_0 + sum_k c_k tau_k`` (the method's :meth:`DynamicMethod.probe_coefficients`)
   and every expert ``theta_0 + tau_k`` up to the probe block, through :func:`torch.func.functional_call`
   on views of the stored tensors (only the parameters used before the probe are built);
2. measures, per sample, the l2 distance between the merge's hidden states and each expert's
   (padding positions masked out);
3. asks the method for per-sample coefficients (:meth:`DynamicMethod.coefficients`), and
4. runs every sample through ``theta_0 + sum_k lambda_k(x) tau_k``: one ``addmv`` over the flat
   task vectors per sample, no model copied.

``model.last_routing`` holds the distances, coefficients and the chosen (nearest) expert of the last
call. :func:`evaluate_dynamic` reports, on the demo suite, the accuracy per task, the routing accuracy
(how often the task's own expert was picked) and the inference time against the static merge.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch

from .deployment import DeploymentMethod
from .errors import DeploymentError, MethodInputError, RecipeError
from .functional import TaskVectorModel
from .method import TensorGroup

logger = logging.getLogger(__name__)

__all__ = ["DynamicEvaluation", "DynamicMethod", "DynamicModel", "Routing", "evaluate_dynamic",
           "load_dynamic_model", "run_dynamic"]

FORMAT = "hubmerge-dynamic"
FORMAT_VERSION = 1
MANIFEST = "dynamic.json"
WEIGHTS_STEM = "dynamic"
WEIGHTS_FILE = f"{WEIGHTS_STEM}.safetensors"
#: Most bytes of per-sample merged parameters held at once by :meth:`DynamicModel.forward` (a chunk of samples).
VMAP_BYTES = 256 * 1024 * 1024


# -- the method contract -------------------------------------------------------------------------------------

class DynamicMethod(DeploymentMethod):
    """Base class of methods that merge per input at inference (a dynamic deployment).

    It is a :class:`~hubmerge.deployment.DeploymentMethod` for the command line and the demo
    (``hubmerge run`` dispatches it to :func:`run_dynamic`); instead of ``deploy_tensor`` a subclass
    implements the routing maths on tensors:

    * :attr:`probe_layer` — the block whose output is compared;
    * :meth:`probe_coefficients` — the static merge run to the probe (task arithmetic's ``lambda``);
    * :meth:`coefficients` — per-sample coefficients from the per-sample distances to the experts.
    """

    dynamic: ClassVar[bool] = True

    @property
    def probe_layer(self) -> int:
        """Index of the probe block (negative: from the last)."""
        return int(getattr(self.params, "probe_layer", -1))

    def probe_coefficients(self, count: int) -> torch.Tensor:
        """Coefficients of the static merge whose representation is compared, ``(T,)``."""
        raise NotImplementedError(f"{type(self).__name__} must implement probe_coefficients")

    def coefficients(self, distances: torch.Tensor) -> torch.Tensor:
        """Per-sample merging coefficients from distances ``(B, T)`` to the experts' representations.

        Returns:
            ``(B, T)``.
        """
        raise NotImplementedError(f"{type(self).__name__} must implement coefficients")

    def deploy_tensor(self, group: TensorGroup):
        """Refused: a dynamic deployment stores the task vectors themselves (see :func:`run_dynamic`)."""
        raise MethodInputError(f"method {self.name!r} writes a dynamic deployment (hubmerge.dynamic.run_dynamic)")


def is_dynamic_method(method_or_name: Any) -> bool:
    """Whether a method (instance, class or registered name) writes a dynamic deployment."""
    cls = method_or_name
    if isinstance(method_or_name, str):
        from .plugins import get_method

        try:
            cls = get_method(method_or_name)
        except Exception:  # noqa: BLE001 - unknown: not dynamic (check_recipe reports it)
            return False
    return bool(getattr(cls, "dynamic", False))


# -- writing ---------------------------------------------------------------------------------------------------

def run_dynamic(recipe, *, output: str | Path | None = None, device: str | None = None, overwrite: bool = False,
                token: str | None = None, progress=None, file: str | None = None):
    """Write the dynamic deployment of a recipe whose method is a :class:`DynamicMethod`.

    One streaming pass over the inputs: per floating tensor the base and the experts' task vectors
    (stacked) are written once; memory stays a few tensors. The directory appears at ``output`` only
    when complete.

    Args:
        recipe: A schema-valid recipe with a dynamic method.
        output: Output directory (overrides ``output.path``).
        device: Compute device for building the task vectors (overrides ``recipe.device``).
        overwrite: Replace an existing directory that hubmerge did not write.
        token: Hub token for private inputs.
        progress: Called with :class:`~hubmerge.engine.Progress` (stage ``write``).
        file: Recipe file name for errors.

    Returns:
        A :class:`~hubmerge.engine.MergeResult`; ``extra["deployment"]`` holds the kind, tasks and storage.

    Raises:
        RecipeError: Not a dynamic method, or no output path (before any input is read).
        HubmergeError: Input or output problems; nothing is left at the output path on failure.
    """
    from .checkpoint import DTYPE_NAMES
    from .deployment import _base_model_class, check_deployment, output_setup
    from .engine import (
        MergeResult,
        Progress,
        build_group,
        copy_model_files,
        open_inputs,
        output_specs,
        prefetched,
    )
    from .lineage import resolved_recipe_yaml
    from .writer import OWNER_MARKER, ShardedWriter, TensorSpec

    started = time.perf_counter()
    method = check_deployment(recipe, file=file)
    if not is_dynamic_method(method):
        raise RecipeError(f"method {recipe.method!r} does not write a dynamic deployment", field="method", file=file)
    target, compute_device, compute_dtype, out_dtype = output_setup(recipe, output, device, file=file)
    inputs = open_inputs(recipe, token=token)
    writer = None
    try:
        tasks = [e.label for e in inputs.experts]
        specs = output_specs(inputs.base_checkpoint, out_dtype)
        stored: list[TensorSpec] = []
        for spec in specs:
            if spec.dtype.is_floating_point:
                stored += [TensorSpec(f"{spec.name}@base", spec.shape, spec.dtype),
                           TensorSpec(f"{spec.name}@tau", (len(tasks), *spec.shape), spec.dtype)]
            else:
                stored.append(spec)
        writer = ShardedWriter(target, stored, shard_size=recipe.output.shard_size, overwrite=overwrite,
                               stem=WEIGHTS_STEM)
        spec_of = {s.name: s for s in specs}
        names = inputs.base_checkpoint.names()
        done = 0
        for count, fetched in enumerate(prefetched(inputs, names), 1):
            spec = spec_of[fetched.name]
            if not spec.dtype.is_floating_point:
                writer.write(fetched.name, fetched.base)
            else:
                group = build_group(inputs, fetched, compute_device, compute_dtype)
                writer.write(f"{fetched.name}@base", fetched.base.to(spec.dtype))
                writer.write(f"{fetched.name}@tau", group.deltas.to(device="cpu", dtype=spec.dtype))
                del group
            done += fetched.nbytes
            if progress:
                progress(Progress("write", count, len(names), done, inputs.bytes_per_pass))
        copy_model_files(inputs.base.directory, writer)
        model_bytes = sum(s.nbytes for s in specs)
        tensor_bytes = sum(s.nbytes for s in stored)
        manifest = {
            "format": FORMAT, "format_version": FORMAT_VERSION, "kind": method.name, "method": method.name,
            "params": method.params.model_dump(mode="json"), "tasks": tasks,
            "model_class": _base_model_class(inputs.base.directory), "weights_file": WEIGHTS_FILE,
            "weights": [{"name": s.name, "shape": list(s.shape), "dtype": DTYPE_NAMES[s.dtype]} for s in specs],
            "storage": {"bytes": tensor_bytes, "model_bytes": model_bytes,
                        "model_equivalents": tensor_bytes / model_bytes if model_bytes else 0.0},
        }
        result = MergeResult(
            output_dir=target, recipe=recipe, method=method, base=inputs.base,
            experts=[e.resolved for e in inputs.experts], device=str(compute_device), seconds=0.0,
            bytes_read=inputs.bytes_per_pass, bytes_written=tensor_bytes, tensors=len(names),
            extra={"provenance": {"deployment": f"dynamic/{method.name}"}},
        )
        writer.add_file(OWNER_MARKER, resolved_recipe_yaml(result))
        writer.add_file(MANIFEST, json.dumps(manifest, indent=1) + "\n")
        result.output_dir = writer.temp
        writer.add_file("README.md", str(dynamic_card(result, manifest)))
        result.output_dir = writer.finish()
        result.extra["deployment"] = {"kind": manifest["kind"], "tasks": tasks, "storage": manifest["storage"]}
        result.seconds = time.perf_counter() - started
        logger.info("dynamic deployment %s: %d tasks, %.3f model-equivalents in %.2fs", method.name, len(tasks),
                    manifest["storage"]["model_equivalents"], result.seconds)
        return result
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    finally:
        inputs.close()


def read_dynamic_manifest(directory: str | Path) -> dict[str, Any]:
    """The checked ``dynamic.json`` of a dynamic deployment directory.

    Raises:
        DeploymentError: Missing, unreadable, or of a newer format.
    """
    path = Path(directory) / MANIFEST
    if not path.is_file():
        raise DeploymentError(f"{directory}: no {MANIFEST} (not a hubmerge dynamic deployment)")
    from .deployment import checked_manifest

    manifest = checked_manifest(path, FORMAT, FORMAT_VERSION)
    for key in ("method", "tasks", "params"):
        if key not in manifest:
            raise DeploymentError(f"{path}: malformed manifest (no {key!r})")
    return manifest


# -- the card ---------------------------------------------------------------------------------------------------

def dynamic_card(result, manifest: Mapping[str, Any], *, repo_id: str | None = None,
                 evaluation: DynamicEvaluation | None = None, task_type: str | None = None):
    """The model card of a dynamic deployment (generated from the method's metadata and the manifest).

    Args:
        result: The run (:func:`run_dynamic`'s result, its ``output_dir`` holding the files).
        manifest: Its ``dynamic.json``.
        repo_id: The repo the card will live in.
        evaluation: Scores to include (accuracy per task, routing accuracy, time overhead).
        task_type: ``model-index`` task type.

    Returns:
        A ``huggingface_hub.ModelCard``.
    """
    from .card import CardInputs, CardSection, Evaluation, build_card, human_bytes
    from .plugins import registered_methods

    registered = registered_methods().get(manifest["method"])
    describe = registered.method.describe() if registered else {"name": manifest["method"], "summary": "",
                                                                 "paper": None, "params_schema": {}}
    here = Path(result.output_dir)
    config = json.loads((here / "config.json").read_text()) if (here / "config.json").is_file() else {}
    recipe_file = here / "hubmerge_recipe.yaml"
    storage = manifest.get("storage", {})
    tasks = list(manifest["tasks"])
    target = repo_id or "path/to/this/deployment"
    lines = [
        (f"A **dynamic deployment** of {len(tasks)} experts ({', '.join(f'`{t}`' for t in tasks)}): the base and "
         "every expert's task vector are stored once, and the merge is made per input at inference. For each "
         "sample the static merge and every expert run to the probe block; the distances between their hidden "
         "states decide the sample's merging coefficients, and the sample runs through that merge."),
        "",
        f"Router: {', '.join(f'{k} `{v}`' for k, v in manifest['params'].items())}.",
        "",
        (f"Storage: {storage.get('model_equivalents', 0):.3f} model-equivalents "
         f"({human_bytes(storage.get('bytes', 0))}; one model is {human_bytes(storage.get('model_bytes', 0))})."),
    ]
    sections = [CardSection("Dynamic deployment", "\n".join(lines))]
    scores: list[Evaluation] = []
    if evaluation is not None:
        rows = ["| task | accuracy | static merge | routed to its expert |", "|---|---|---|---|"]
        for task, value in evaluation.accuracy.items():
            rows.append(f"| {task} | {value:.4f} | {evaluation.static_accuracy.get(task, float('nan')):.4f} | "
                        f"{evaluation.routing.get(task, float('nan')):.4f} |")
        rows += ["", (f"Routing accuracy {evaluation.routing_accuracy:.4f}; inference takes "
                      f"{evaluation.overhead:.2f}x the static merge's time ({evaluation.dynamic_seconds:.2f}s vs "
                      f"{evaluation.static_seconds:.2f}s of forward passes).")]
        sections.append(CardSection("Evaluation per task", "\n".join(rows)))
        kind = task_type or "other"
        scores = [Evaluation(task=t, metric="accuracy", value=v, dataset=t, task_type=kind)
                  for t, v in evaluation.accuracy.items()]
    inputs = CardInputs(
        name=result.recipe.name, method=describe, params=dict(manifest["params"]),
        plugin=f"`{registered.plugin}` from {registered.distribution}" if registered else "?",
        base=result.base.describe(), experts=[e.describe() for e in result.experts],
        recipe_yaml=recipe_file.read_text() if recipe_file.is_file() else "", dtype=result.recipe.dtype,
        description=(result.recipe.description + "\n\n" if result.recipe.description else "")
        + f"One model that merges its {len(tasks)} experts per input.",
        repo_id=repo_id, config=config, evaluation=scores, sections=sections,
        extra_tags=["hubmerge-dynamic", str(manifest.get("kind", ""))],
        usage=("from hubmerge import load_dynamic_model\n\n"
               f'model = load_dynamic_model("{target}")  # called like the transformers model\n'
               "outputs = model(**inputs)\n"
               "model.last_routing.chosen  # the expert each sample was routed to"),
    )
    return build_card(inputs)


def publish_dynamic(result, repo_id: str, *, private: bool = False, token: str | None = None,
                    evaluation: DynamicEvaluation | None = None, task_type: str | None = None) -> str:
    """Write the card for ``repo_id`` (with ``evaluation`` when given) and push the deployment in one commit.

    Returns:
        The commit hash.

    Raises:
        HubError: The push failed; the repo is unchanged.
    """
    from .hub import push_folder

    manifest = read_dynamic_manifest(result.output_dir)
    card = dynamic_card(result, manifest, repo_id=repo_id, evaluation=evaluation, task_type=task_type)
    (Path(result.output_dir) / "README.md").write_text(str(card), encoding="utf-8")
    return push_folder(result.output_dir, repo_id, private=private, token=token,
                       commit_message=f"hubmerge: {manifest['kind']} dynamic deployment of {len(manifest['tasks'])} "
                                      "experts")


# -- reading and running -------------------------------------------------------------------------------------------

@dataclass
class Routing:
    """What the router decided for one batch.

    Attributes:
        distances: l2 distances between the static merge's and each expert's probe representation, ``(B, T)``.
        coefficients: The per-sample merging coefficients, ``(B, T)``.
        chosen: The nearest expert of each sample, ``(B,)``.
    """

    distances: torch.Tensor
    coefficients: torch.Tensor
    chosen: torch.Tensor


class DynamicModel(torch.nn.Module):
    """A dynamic deployment as a module: called like the transformers model it wraps.

    Args:
        model: The :class:`~hubmerge.functional.TaskVectorModel` (base and task vectors).
        method: The :class:`DynamicMethod` instance (its router).
        directory: Where it was loaded from, if anywhere.
        vectorize: Run the per-sample merges in chunks under ``torch.func.vmap`` (the wrapped model then
            uses eager attention); ``False``: one sample at a time.
    """

    def __init__(self, model: TaskVectorModel, method: DynamicMethod, directory: Path | None = None, *,
                 vectorize: bool = True):
        super().__init__()
        self.functional = model
        self.method = method
        self.directory = directory
        self.tasks = list(model.tasks)
        self.config = getattr(model.module, "config", None)
        self.last_routing: Routing | None = None
        self._log: list[Routing] | None = None
        self._static: torch.Tensor | None = None
        self._attention = getattr(self.config, "_attn_implementation", None)
        self.vectorize = vectorize
        if vectorize and self._attention not in (None, "eager") and hasattr(self.inner, "set_attn_implementation"):
            try:  # vmap batches eager attention's matmuls; fused kernels it runs one sample at a time
                self.inner.set_attn_implementation("eager")
            except (ValueError, ImportError, AttributeError):
                pass

    @property
    def inner(self) -> torch.nn.Module:
        """The wrapped transformers model (holds ``theta_0``; run functionally, never modified)."""
        return self.functional.module

    def static_flat(self) -> torch.Tensor:
        """The static merge compared at the probe (``theta_0 + sum_k c_k tau_k``), flat, cached."""
        if self._static is None:
            coefficients = self.method.probe_coefficients(len(self.tasks)).to(self.functional.device)
            self._static = self.functional.merge_flat(coefficients)
        return self._static

    def static_model(self) -> torch.nn.Module:
        """A plain transformers model holding the static merge (one copy; the baseline of the time overhead)."""
        module = copy.deepcopy(self.functional.module)
        params = dict(module.named_parameters())
        for name, value in self.functional.views(self.static_flat().clone()).items():
            params[name].data = value
        if self._attention and getattr(module.config, "_attn_implementation", None) != self._attention:
            module.set_attn_implementation(self._attention)
        return module.eval()

    def route(self, *args: Any, **kwargs: Any) -> Routing:
        """Distances to the experts at the probe and the per-sample coefficients, for a batch.

        Args:
            *args, **kwargs: The model's inputs.

        Returns:
            The :class:`Routing`.
        """
        tv = self.functional
        layer = self.method.probe_layer
        names = tv.prefix_names(layer, *args, **kwargs)
        static = tv.views(self.static_flat())
        merged = tv.run_to(layer, {n: static[n] for n in names}, *args, **kwargs)
        base = tv.base_params()
        mask = kwargs.get("attention_mask")
        distances = []
        for k in range(len(self.tasks)):
            params = {n: base[n] + tv.tau(n)[k] for n in names}
            expert = tv.run_to(layer, params, *args, **kwargs)
            diff = (merged - expert).float()
            if mask is not None and mask.dim() == 2 and diff.dim() == 3 and mask.shape[1] == diff.shape[1]:
                diff = diff * mask.unsqueeze(-1).to(diff.dtype)
            distances.append(diff.reshape(diff.shape[0], -1).norm(dim=1))
        distances = torch.stack(distances, dim=1)
        coefficients = self.method.coefficients(distances)
        return Routing(distances, coefficients, distances.argmin(dim=1))

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """Route the batch, then run each sample through its own merge; returns the wrapped model's output.

        Samples are run in chunks under :func:`torch.func.vmap` (each chunk's merged parameters are
        ``chunk x P`` numbers, at most :data:`VMAP_BYTES`); a model that ``vmap`` cannot batch runs one
        sample at a time. Either way the parameters are views of one merged vector per sample.
        """
        size = _batch_size(args, kwargs)
        routing = self.route(*args, **kwargs)
        self.last_routing = routing
        if self._log is not None:
            self._log.append(routing)
        if self.vectorize:
            try:
                return self._forward_vmap(routing.coefficients, args, kwargs, size)
            except Exception as exc:  # noqa: BLE001 - an architecture vmap cannot batch: run sample by sample
                logger.info("dynamic: vmap cannot batch %s (%s: %s); running one sample at a time",
                            type(self.inner).__name__, type(exc).__name__, exc)
                self.vectorize = False
        tv = self.functional
        outputs = []
        for b in range(size):
            params = tv.merged(routing.coefficients[b])
            outputs.append(tv(params, *_take(args, b, size), **_take(kwargs, b, size)))
        return _concat(outputs)

    def _forward_vmap(self, coefficients: torch.Tensor, args: tuple, kwargs: dict, size: int) -> Any:
        tv = self.functional
        chunk = max(1, VMAP_BYTES // max(1, tv.flat_base.numel() * tv.flat_base.element_size()))
        names = list(kwargs)
        batched_args = tuple(0 if _batched(a, size) else None for a in args)
        batched_kwargs = tuple(0 if _batched(kwargs[k], size) else None for k in names)
        kind: list[type] = []

        def one(flat, sample_args, sample_kwargs):
            call_args = tuple(a.unsqueeze(0) if d == 0 else a for a, d in zip(sample_args, batched_args))
            call_kwargs = {k: (v.unsqueeze(0) if d == 0 else v) for k, v, d in zip(names, sample_kwargs, batched_kwargs)}
            out = tv(tv.views(flat), *call_args, **call_kwargs)
            kind[:] = [type(out)]
            return _unbatch(dict(out) if isinstance(out, Mapping) else out)

        run = torch.func.vmap(one, in_dims=(0, batched_args, batched_kwargs))
        parts = []
        for start in range(0, size, chunk):
            stop = min(size, start + chunk)
            flats = torch.addmm(tv.flat_base.unsqueeze(0), coefficients[start:stop].to(tv.dtype), tv.flat_taus)
            part_args = tuple(a[start:stop] if d == 0 else a for a, d in zip(args, batched_args))
            part_kwargs = tuple(kwargs[k][start:stop] if d == 0 else kwargs[k] for k, d in zip(names, batched_kwargs))
            parts.append(run(flats, part_args, part_kwargs))
        merged = _concat(parts)
        cls = kind[0] if kind else dict
        return cls(**merged) if isinstance(merged, dict) and cls is not dict else merged

    @contextlib.contextmanager
    def tracking(self) -> Iterator[list[Routing]]:
        """Collect the :class:`Routing` of every call made inside the block."""
        self._log = []
        try:
            yield self._log
        finally:
            self._log = None


def _batched(value: Any, size: int) -> bool:
    return isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == size


def _unbatch(value: Any) -> Any:
    """Drop the leading batch dimension of one sample's outputs (tensors, tuples and dicts of them)."""
    if isinstance(value, torch.Tensor):
        return value.squeeze(0) if value.dim() > 0 and value.shape[0] == 1 else value
    if isinstance(value, dict):
        return {k: _unbatch(v) for k, v in value.items() if v is not None}
    if isinstance(value, (tuple, list)):
        return tuple(_unbatch(v) for v in value)
    return value


def _batch_size(args: tuple, kwargs: Mapping[str, Any]) -> int:
    for value in (*args, *kwargs.values()):
        if isinstance(value, torch.Tensor) and value.dim() > 0:
            return value.shape[0]
    raise MethodInputError("no input tensor with a batch dimension")


def _take(values: Any, index: int, size: int) -> Any:
    if isinstance(values, torch.Tensor):
        return values[index:index + 1] if values.dim() > 0 and values.shape[0] == size else values
    if isinstance(values, dict):
        return {k: _take(v, index, size) for k, v in values.items()}
    if isinstance(values, (tuple, list)):
        return type(values)(_take(v, index, size) for v in values)
    return values


def _concat(parts: list[Any]) -> Any:
    first = parts[0]
    if isinstance(first, torch.Tensor):
        return torch.cat(parts)
    if first is None:
        return None
    try:
        from transformers.utils import ModelOutput
    except ImportError:  # pragma: no cover
        ModelOutput = ()
    if isinstance(first, ModelOutput):
        return type(first)(**{k: _concat([p[k] for p in parts]) for k in first})
    if isinstance(first, (tuple, list)):
        return type(first)(_concat(list(items)) for items in zip(*parts))
    if isinstance(first, dict):
        return {k: _concat([p[k] for p in parts]) for k in first}
    return first


def load_dynamic_model(repo_or_dir: str | Path, *, revision: str | None = None, token: str | None = None,
                       device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> DynamicModel:
    """Load a dynamic deployment (SE-Merging) as a module called like the transformers model.

    The sibling of :func:`hubmerge.load_task_model` for dynamic deployments.

    Args:
        repo_or_dir: A dynamic deployment directory or a Hub repo id (``org/name[@revision]``).
        revision: Hub revision.
        token: Hub token for private repos (never logged).
        device: Where the tensors and the model live.
        dtype: Compute dtype.

    Returns:
        The :class:`DynamicModel` in eval mode (``model.last_routing`` after each call).

    Raises:
        DeploymentError: No dynamic deployment there, or its method's plugin is not installed.
        HubError: The Hub cannot provide the repo.
    """
    from .checkpoint import Checkpoint
    from .deployment import _local_directory
    from .errors import UnknownMethodError
    from .plugins import get_method

    directory = _local_directory(repo_or_dir, revision, token)
    manifest = read_dynamic_manifest(directory)
    try:
        method = get_method(manifest["method"])(manifest["params"])
    except UnknownMethodError as exc:
        raise DeploymentError(f"{directory}: the deployment needs the {manifest['method']!r} method plugin ({exc})") \
            from None
    if not is_dynamic_method(method):
        raise DeploymentError(f"{directory}: method {manifest['method']!r} is not a dynamic method")
    store = Checkpoint(directory, weights=manifest.get("weights_file", WEIGHTS_FILE))
    try:
        base: dict[str, torch.Tensor] = {}
        taus: dict[str, torch.Tensor] = {}
        for entry in manifest.get("weights", []):
            name = entry["name"]
            if f"{name}@base" in store.meta:
                base[name] = store.get(f"{name}@base")
                taus[name] = store.get(f"{name}@tau")
            elif name in store.meta:
                base[name] = store.get(name)
            else:
                raise DeploymentError(f"{directory}: tensor {name!r} is missing from {store.files[0].name}")
    finally:
        store.close()
    model = TaskVectorModel.from_tensors(directory, base, taus, list(manifest["tasks"]),
                                         model_class_name=None, device=device, dtype=dtype)
    return DynamicModel(model, method, directory).eval()


# -- evaluation on the demo suite --------------------------------------------------------------------------------

@dataclass
class DynamicEvaluation:
    """A dynamic deployment measured on the demo suite.

    Attributes:
        accuracy: Task label to accuracy of the dynamic model.
        static_accuracy: Task label to accuracy of the static merge it probes with (task arithmetic).
        routing: Task label to the fraction of its samples routed to its own expert.
        routing_accuracy: The same over all samples.
        dynamic_seconds, static_seconds: Time spent in the models' forward passes (heads and data excluded).
        samples: Task label to its number of test samples.
    """

    accuracy: dict[str, float] = field(default_factory=dict)
    static_accuracy: dict[str, float] = field(default_factory=dict)
    routing: dict[str, float] = field(default_factory=dict)
    routing_accuracy: float = 0.0
    dynamic_seconds: float = 0.0
    static_seconds: float = 0.0
    samples: dict[str, int] = field(default_factory=dict)

    @property
    def overhead(self) -> float:
        """Inference time of the dynamic model over the static merge's (``x``)."""
        return self.dynamic_seconds / self.static_seconds if self.static_seconds else float("nan")

    @property
    def average(self) -> float:
        """Mean accuracy over the tasks."""
        return sum(self.accuracy.values()) / max(1, len(self.accuracy))


class _Timed(torch.nn.Module):
    """Forwards to ``inner`` and adds the time of each call to ``seconds``."""

    def __init__(self, inner: torch.nn.Module):
        super().__init__()
        self.inner = inner
        self.config = getattr(inner, "config", None)
        self.seconds = 0.0

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        started = time.perf_counter()
        try:
            return self.inner(*args, **kwargs)
        finally:
            self.seconds += time.perf_counter() - started


def evaluate_dynamic(model: DynamicModel | str | Path, suite, *, task_of: Mapping[str, str] | None = None,
                     tasks: list[str] | None = None, batch_size: int = 128) -> DynamicEvaluation:
    """Accuracy per task, routing accuracy and time overhead of a dynamic deployment on the demo suite.

    Each task's test split goes through the dynamic model and, for comparison, through the static merge
    it probes with (a plain transformers model); both are read through the task's own head
    (:func:`hubmerge.suite.evaluate`).

    Args:
        model: A :class:`DynamicModel` or a deployment directory / repo id.
        suite: The :class:`hubmerge.suite.Suite`.
        task_of: Expert label to suite task (default: the label is the task's name).
        tasks: Labels to evaluate (default: all of the deployment's).
        batch_size: Test samples per forward pass.

    Returns:
        The :class:`DynamicEvaluation`.

    Raises:
        UnknownTaskError: A label maps to no suite task.
    """
    from .suite import evaluate

    if not isinstance(model, DynamicModel):
        model = load_dynamic_model(model)
    task_of = dict(task_of or {})
    labels = list(tasks) if tasks is not None else list(model.tasks)
    timed_dynamic = _Timed(model)
    timed_static = _Timed(model.static_model())
    result = DynamicEvaluation()
    right = total = 0
    from .engine import compute_threads

    with torch.no_grad(), compute_threads(model.functional.device):
        for label in labels:
            task = task_of.get(label, label)
            expected = model.tasks.index(label)
            result.static_accuracy[label] = evaluate(timed_static, task, suite, batch_size=batch_size)
            with model.tracking() as log:
                result.accuracy[label] = evaluate(timed_dynamic, task, suite, batch_size=batch_size)
            chosen = torch.cat([r.chosen for r in log]) if log else torch.zeros(0, dtype=torch.long)
            hits = int((chosen == expected).sum())
            result.routing[label] = hits / max(1, chosen.numel())
            result.samples[label] = int(chosen.numel())
            right += hits
            total += int(chosen.numel())
            logger.info("dynamic: %s accuracy %.4f (static %.4f), routed to its expert %.3f", label,
                        result.accuracy[label], result.static_accuracy[label], result.routing[label])
    result.routing_accuracy = right / max(1, total)
    result.dynamic_seconds = timed_dynamic.seconds
    result.static_seconds = timed_static.seconds
    return result
