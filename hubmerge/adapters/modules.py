"""Module names: reading PEFT's tensor keys and finding the base tensors they change.

PEFT saves an adapter's tensors under the module names of the model it was trained on,
prefixed by ``base_model.model.``
(``base_model.model.bert.encoder.layer.0.attention.self.query.lora_A.weight``).
The base checkpoint may name the same tensor differently: saved as the bare model
(``encoder.layer.0...``) while the adapter was trained on a task-head wrapper
(``bert.encoder.layer.0...``), or the other way round. :func:`map_names` finds the one
consistent renaming — drop a leading prefix, add another — that takes every tensor the
adapter touches to a tensor of the base, and refuses when none or several fit.
"""

from __future__ import annotations

import functools
import logging
from collections import Counter, defaultdict
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import AdapterError, AdapterMismatchError

logger = logging.getLogger(__name__)

PEFT_PREFIX = "base_model.model."

#: Key suffixes of LoRA/DoRA tensors (after the module name, adapter name removed) and their roles.
LORA_SUFFIXES = {
    ".lora_A.weight": "lora_A",
    ".lora_B.weight": "lora_B",
    ".lora_B.bias": "lora_B_bias",
    ".lora_embedding_A": "lora_embedding_A",
    ".lora_embedding_B": "lora_embedding_B",
    ".lora_magnitude_vector": "lora_magnitude_vector",
}
#: Key suffixes of IA3 tensors.
IA3_SUFFIXES = {".ia3_l": "ia3_l"}
#: Roles of saved copies of model tensors (``modules_to_save``, ``bias``, saved embeddings).
FULL = "full"
#: Path components of PEFT's wrappers around a module.
BASE_LAYER, MODULES_TO_SAVE, ORIGINAL_MODULE = "base_layer", "modules_to_save", "original_module"
#: Name prefixes of adapter parameters; an unknown one means an unsupported method.
ADAPTER_PARAM_PREFIXES = ("lora_", "ia3_", "vera_", "hada_", "lokr_", "boft_", "oft_", "token_adapter")


@dataclass(frozen=True)
class AdapterTensor:
    """One tensor of ``adapter_model.safetensors``, read from its key.

    Attributes:
        key: The key in the adapter file.
        module: Module name in the trained model (``bert.encoder.layer.0.attention.self.query``).
        role: ``lora_A``, ``lora_B``, ``lora_B_bias``, ``lora_embedding_A``, ``lora_embedding_B``,
            ``lora_magnitude_vector``, ``ia3_l``, or ``full`` for a saved copy of a model tensor.
        target: The trained model's tensor it changes (``....query.weight``; ``....query.bias``
            for ``lora_B_bias``; the tensor itself for ``full``).
    """

    key: str
    module: str
    role: str
    target: str


def parse_adapter_keys(keys: Collection[str], suffixes: Mapping[str, str], where: str) -> list[AdapterTensor]:
    """Classify an adapter file's keys.

    Saved copies of model tensors are ``full``: ``X.base_layer.bias`` (``bias="all"``/``"lora_only"``)
    and ``X.base_layer.weight`` (saved embeddings) stand for ``X.bias``/``X.weight``;
    ``X.modules_to_save.p`` (written by ``bias="all"`` next to ``X.p``) too, unless ``X.p`` is
    present; ``X.original_module.p`` (the frozen original) is skipped, as PEFT's unload drops it.

    Args:
        keys: Keys of the adapter file.
        suffixes: Role suffixes of the adapter kind (:data:`LORA_SUFFIXES`, :data:`IA3_SUFFIXES`).
        where: The adapter file, for messages.

    Returns:
        One :class:`AdapterTensor` per key that affects the model.

    Raises:
        AdapterError: For a key of an adapter parameter this kind does not know.
    """
    parsed: list[AdapterTensor] = []
    seen_full: set[str] = set()
    deferred: list[AdapterTensor] = []
    for key in keys:
        name = key.removeprefix(PEFT_PREFIX)
        for suffix, role in suffixes.items():
            if name.endswith(suffix):
                module = name[: -len(suffix)]
                param = "bias" if role == "lora_B_bias" else "weight"
                parsed.append(AdapterTensor(key, module, role, f"{module}.{param}"))
                break
        else:
            parts = name.split(".")
            if ORIGINAL_MODULE in parts[:-1]:
                continue
            if any(p.startswith(ADAPTER_PARAM_PREFIXES) for p in parts):
                raise AdapterError(f"not supported yet: adapter tensor {key!r} in {where}")
            target, module = name, ".".join(parts[:-1])
            if BASE_LAYER in parts[:-1] or MODULES_TO_SAVE in parts[:-1]:
                wrapper = BASE_LAYER if BASE_LAYER in parts[:-1] else MODULES_TO_SAVE
                i = len(parts) - 1 - parts[::-1].index(wrapper)
                module = ".".join(parts[:i])
                target = ".".join(parts[:i] + parts[i + 1 :])
                if wrapper == MODULES_TO_SAVE:
                    deferred.append(AdapterTensor(key, module, FULL, target))
                    continue
            if target in seen_full:
                raise AdapterError(f"{where}: two tensors stand for {target!r}")
            seen_full.add(target)
            parsed.append(AdapterTensor(key, module, FULL, target))
    for tensor in deferred:  # duplicates of X.p written by bias="all"
        if tensor.target not in seen_full:
            seen_full.add(tensor.target)
            parsed.append(tensor)
    return parsed


@dataclass(frozen=True)
class NameMap:
    """Rename the trained model's tensor names to the base's: drop one leading prefix, add another.

    Attributes:
        drop: Prefix removed from the adapter's names (``"bert."``), or ``""``.
        add: Prefix put in front (``"model.language_model."``), or ``""``.
    """

    drop: str = ""
    add: str = ""

    def __call__(self, name: str) -> str | None:
        """The base name for ``name``, or ``None`` if ``name`` lacks the dropped prefix."""
        if not name.startswith(self.drop):
            return None
        return self.add + name[len(self.drop) :]

    def __str__(self) -> str:
        if not self.drop and not self.add:
            return "names as they are"
        return f"{self.drop or '(nothing)'!s} -> {self.add or '(nothing)'!s}"


def _candidates(target: str, base_by_tail: Mapping[tuple[str, ...], list[str]]) -> set[NameMap]:
    """Renamings that take ``target`` to a base name sharing its last two components."""
    parts = target.split(".")
    found = set()
    for name in base_by_tail.get(tuple(parts[-2:]), ()):
        other = name.split(".")
        common = 0
        while common < min(len(parts), len(other)) and parts[-1 - common] == other[-1 - common]:
            common += 1
        drop, add = parts[: len(parts) - common], other[: len(other) - common]
        found.add(NameMap("".join(p + "." for p in drop), "".join(p + "." for p in add)))
    return found


def map_names(
    targets: Mapping[str, str],
    base_names: Collection[str],
    *,
    label: str,
    fits: Callable[[NameMap], bool] | None = None,
) -> NameMap:
    """Find the renaming that takes every tensor an adapter changes to a tensor of the base.

    Among the renamings that map every target, those dropping the fewest components win
    (exact names first); if several remain, ``fits`` (e.g. a shape check) decides; if
    several still fit, the mapping is ambiguous and refused.

    Args:
        targets: Tensor names in the trained model, each with a description for messages
            (``"LoRA target module 'bert.pooler.dense'"``).
        base_names: The base checkpoint's tensor names.
        label: The expert's label, for messages.
        fits: Optional test of a candidate renaming, used only to break ties.

    Returns:
        The :class:`NameMap`.

    Raises:
        AdapterMismatchError: Naming the first target without a counterpart in the base, or
            the competing renamings.
    """
    if not targets:
        return NameMap()
    base_set = set(base_names)
    by_tail: dict[tuple[str, ...], list[str]] = defaultdict(list)
    for name in base_set:
        by_tail[tuple(name.split(".")[-2:])].append(name)
    support: Counter[NameMap] = Counter()
    for target in targets:
        for candidate in _candidates(target, by_tail):
            support[candidate] += 1
    total = len(targets)
    complete = [m for m, n in support.items() if n == total]
    if not complete:
        first = next(iter(targets))
        if not support:
            raise AdapterMismatchError(
                f"adapter {label!r}: {targets[first]} has no counterpart in the base "
                f"(no tensor named like {first!r})"
            )
        best = min(support, key=lambda m: (-support[m], m.drop.count("."), m.add.count("."), m.drop, m.add))
        for target, what in targets.items():
            mapped = best(target)
            if mapped is None or mapped not in base_set:
                raise AdapterMismatchError(
                    f"adapter {label!r}: {what} is not in the base (no tensor {mapped or target!r}; "
                    f"the adapter's other names map onto the base as {best})"
                )
        raise AdapterMismatchError(f"adapter {label!r}: its module names do not map onto the base")
    fewest = min(m.drop.count(".") for m in complete)
    complete = sorted(
        (m for m in complete if m.drop.count(".") == fewest), key=lambda m: (m.add.count("."), m.add)
    )
    if NameMap() in complete:
        return NameMap()
    if len(complete) > 1 and fits is not None:
        fitting = [m for m in complete if fits(m)]
        complete = fitting or complete
    if len(complete) > 1:
        example = next(iter(targets))
        options = ", ".join(repr(m(example)) for m in complete[:3])
        raise AdapterMismatchError(
            f"adapter {label!r}: its module names fit the base in {len(complete)} ways "
            f"({example!r} could be {options}); refusing to guess"
        )
    if complete[0] != NameMap():
        logger.info("adapter %r: mapping module names onto the base as %s", label, complete[0])
    return complete[0]


@functools.lru_cache(maxsize=8)
def base_layer_types(directory: str) -> Mapping[str, str] | None:
    """Class names of the base model's modules, from its ``config.json``, built on the meta device.

    PEFT decides ``fan_in_fan_out`` per layer from the layer's class (``Conv1D`` stores
    ``(in, out)``), whatever the config says; when an adapter's shapes alone cannot tell
    (square weights), this is how we ask the same question. Best effort: ``None`` when the
    directory has no ``config.json`` or transformers cannot build it (no remote code is run).

    Args:
        directory: The base model directory.

    Returns:
        Module name to class name (``"transformer.h.0.attn.c_proj": "Conv1D"``), or ``None``.
    """
    if not (Path(directory) / "config.json").is_file():
        return None
    try:
        import transformers
        from transformers.utils import logging as hf_logging

        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()
        try:
            config = transformers.AutoConfig.from_pretrained(
                directory, local_files_only=True, trust_remote_code=False
            )
            architecture = (getattr(config, "architectures", None) or [None])[0]
            model_cls = getattr(transformers, architecture, None) if architecture else None
            with torch.device("meta"):
                model = (
                    model_cls(config) if model_cls is not None else transformers.AutoModel.from_config(config)
                )
        finally:
            hf_logging.set_verbosity(verbosity)
    except Exception as exc:  # any failure only means we fall back to the adapter's config
        logger.debug("cannot build %s on the meta device: %s", directory, exc)
        return None
    return {name: type(module).__name__ for name, module in model.named_modules()}
