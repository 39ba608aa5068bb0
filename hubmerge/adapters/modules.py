"""Module names: reading PEFT's tensor keys and finding the base tensors they change.

PEFT saves an adapter's tensors under the module names of the model it was trained on,
prefixed by ``base_model.model.``
(``base_model.model.bert.encoder.layer.0.attention.self.query.lora_A.weight``).
The base checkpoint may name the same tensor differently: saved as the bare model
(``encoder.layer.0...``) while the adapter was trained on a task-head wrapper
(``bert.encoder.layer.0...``), or the other way round. :func:`map_names` finds the one
consistent renaming — drop a leading prefix, add another — that takes every tensor the
adapter touches to a tensor of the base, and refuses when none or several fit.

transformers 5 also renames some architectures' modules in memory while their checkpoints
keep the old names (ViT: ``encoder.layer.0.attention.attention.query`` is
``layers.0.attention.q_proj``), and adapters trained on it name the in-memory modules.
:func:`base_aliases` builds the base on the meta device and applies its conversion mapping
to the checkpoint's names; :func:`map_names` then accepts either naming and always answers
in checkpoint names, and adapters written back use the in-memory names PEFT looks for.
"""

from __future__ import annotations

import functools
import logging
import warnings
from collections import Counter, defaultdict
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
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
    """Rename the trained model's tensor names to the base checkpoint's: drop one leading prefix, add another.

    With :attr:`aliases`, the renamed name is one of transformers' in-memory names
    (``layers.0.attention.q_proj.weight``), translated to the checkpoint's
    (``encoder.layer.0.attention.attention.query.weight``); see :class:`NameAliases`.

    Attributes:
        drop: Prefix removed from the adapter's names (``"bert."``), or ``""``.
        add: Prefix put in front (``"model.language_model."``), or ``""``.
        aliases: In-memory name to checkpoint name, when the adapter names modules as
            transformers does in memory; ``None`` when it uses the checkpoint's names.
    """

    drop: str = ""
    add: str = ""
    aliases: Mapping[str, str] | None = field(default=None, compare=False, repr=False)

    def __call__(self, name: str) -> str | None:
        """The base checkpoint's name for ``name``.

        An in-memory name without a checkpoint alias is returned as it is (and so is not
        found in the base).

        Args:
            name: A tensor name in the trained model.

        Returns:
            The checkpoint name, or ``None`` if ``name`` lacks the dropped prefix.
        """
        if not name.startswith(self.drop):
            return None
        mapped = self.add + name[len(self.drop) :]
        if self.aliases is not None:
            return self.aliases.get(mapped, mapped)
        return mapped

    def prefixed(self, name: str) -> str | None:
        """``name`` with the prefixes changed only.

        Args:
            name: A tensor name in the trained model.

        Returns:
            The name in the base's naming (in-memory when :attr:`aliases` is set), or ``None``
            if ``name`` lacks the dropped prefix.
        """
        if not name.startswith(self.drop):
            return None
        return self.add + name[len(self.drop) :]

    def __str__(self) -> str:
        memory = "transformers' in-memory names, translated to the checkpoint's"
        if not self.drop and not self.add:
            return memory if self.aliases is not None else "names as they are"
        text = f"{self.drop or '(nothing)'!s} -> {self.add or '(nothing)'!s}"
        return f"{text}, then {memory}" if self.aliases is not None else text


@dataclass(frozen=True, eq=False)
class NameAliases:
    """A base's tensors under two names: in its checkpoint, and in transformers' model in memory.

    transformers 5 renames some architectures' modules when it loads a checkpoint
    (ViT: ``encoder.layer.0.attention.attention.query.weight`` is
    ``layers.0.attention.q_proj.weight`` in memory), and PEFT names an adapter's modules
    as they are in memory. Built by :func:`base_aliases`. In-memory names keep the
    checkpoint's prefix convention: a checkpoint of the bare model gets bare-model names,
    one of a task-head model (``vit.``) gets prefixed ones.

    Attributes:
        to_memory: Checkpoint name to in-memory name, for every checkpoint tensor that
            transformers loads by renaming alone (unchanged names included).
        to_checkpoint: The reverse of :attr:`to_memory`.
        converted: Checkpoint name to the in-memory tensor that a conversion other than
            renaming builds from it (experts fused into ``gate_up_proj``...); such tensors
            have no alias.
        renamed: Whether any in-memory name differs from its checkpoint name.
    """

    to_memory: Mapping[str, str] = field(repr=False)
    to_checkpoint: Mapping[str, str] = field(repr=False)
    converted: Mapping[str, str] = field(default_factory=dict, repr=False)
    renamed: bool = False

    @classmethod
    def from_pairs(cls, pairs: Mapping[str, str], converted: Mapping[str, str] | None = None) -> NameAliases:
        """Build from checkpoint name to in-memory name pairs; in-memory names claimed twice are left out.

        Args:
            pairs: Checkpoint name to in-memory name.
            converted: Checkpoint name to the in-memory tensor a converter builds from it.

        Returns:
            The :class:`NameAliases`.
        """
        claims = Counter(pairs.values())
        to_memory = {c: m for c, m in pairs.items() if claims[m] == 1}
        return cls(
            to_memory=to_memory,
            to_checkpoint={m: c for c, m in to_memory.items()},
            converted=dict(converted or {}),
            renamed=any(c != m for c, m in to_memory.items()),
        )

    def memory_name(self, name: str) -> str:
        """The in-memory name of the checkpoint tensor ``name`` (``name`` itself if unknown).

        Args:
            name: A tensor name of the base checkpoint.

        Returns:
            The name PEFT on the installed transformers knows the tensor by.

        Raises:
            AdapterError: If transformers does not load ``name`` as a tensor of its own
                (it converts it into another, e.g. fuses experts), naming both.
        """
        if name in self.converted:
            raise AdapterError(
                f"base tensor {name!r} is not a tensor of its own in transformers' model: it is converted "
                f"into {self.converted[name]!r} when loaded, so an adapter cannot name its module"
            )
        return self.to_memory.get(name, name)

    def memory_module(self, name: str) -> tuple[str, str]:
        """The in-memory module and parameter of the checkpoint tensor ``name``.

        Args:
            name: A tensor name of the base checkpoint (``encoder.layer.0.attention.attention.query.weight``).

        Returns:
            ``(module, parameter)`` in memory (``("layers.0.attention.q_proj", "weight")``).

        Raises:
            AdapterError: As :meth:`memory_name`.
        """
        module, _, param = self.memory_name(name).rpartition(".")
        return module, param

    def converted_near(self, name: str) -> list[str]:
        """In-memory tensors built by a converter in the same module as ``name`` (for messages).

        Args:
            name: A tensor name in the trained model; it may lack or carry extra leading
                components (a task-head prefix).

        Returns:
            Descriptions (``"'x.gate_up_proj' (from 'x.0.w1.weight', ...)"``), one per converted tensor.
        """
        module = name.rpartition(".")[0]
        out: dict[str, list[str]] = defaultdict(list)
        for source, target in self.converted.items():
            other = target.rpartition(".")[0]
            if name == target or _same_tail(module, other):
                out[target].append(source)
        return [
            f"{target!r} (from {', '.join(repr(s) for s in sorted(sources)[:2])}"
            f"{', ...' if len(sources) > 2 else ''})"
            for target, sources in sorted(out.items())
        ]


def _same_tail(a: str, b: str) -> bool:
    """Whether module names ``a`` and ``b`` are equal up to leading components of one of them."""
    if not a or not b:
        return False
    return a == b or a.endswith("." + b) or b.endswith("." + a)


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


def _support(targets: Collection[str], names: Collection[str]) -> Counter[NameMap]:
    """How many targets each candidate renaming takes to one of ``names``."""
    by_tail: dict[tuple[str, ...], list[str]] = defaultdict(list)
    for name in names:
        by_tail[tuple(name.split(".")[-2:])].append(name)
    support: Counter[NameMap] = Counter()
    for target in targets:
        for candidate in _candidates(target, by_tail):
            support[candidate] += 1
    return support


def _no_counterpart(
    targets: Mapping[str, str],
    universes: list[tuple[Collection[str], Mapping[str, str] | None, Counter[NameMap]]],
    label: str,
    aliases: NameAliases | None,
) -> AdapterMismatchError:
    """The error for an adapter whose names no renaming takes wholly onto the base."""

    def hint(target: str) -> str:
        near = aliases.converted_near(target) if aliases is not None else []
        if not near:
            return ""
        return (
            f"; transformers builds {', '.join(near[:2])} by converting checkpoint tensors (not a plain "
            "renaming), which an adapter's modules cannot be mapped onto"
        )

    scored = [(max(support.values()), i) for i, (_, _, support) in enumerate(universes) if support]
    if not scored:
        first = next(iter(targets))
        return AdapterMismatchError(
            f"adapter {label!r}: {targets[first]} has no counterpart in the base "
            f"(no tensor named like {first!r}){hint(first)}"
        )
    _, index = max(scored, key=lambda s: (s[0], -s[1]))
    names, table, support = universes[index]
    best = min(support, key=lambda m: (-support[m], m.drop.count("."), m.add.count("."), m.drop, m.add))
    best = NameMap(best.drop, best.add, table)
    for target, what in targets.items():
        renamed = best.prefixed(target)
        if renamed is None or renamed not in names:
            where = " among transformers' in-memory names" if table is not None else ""
            return AdapterMismatchError(
                f"adapter {label!r}: {what} is not in the base (no tensor {renamed or target!r}{where}; "
                f"the adapter's other names map onto the base as {best}){hint(target)}"
            )
    return AdapterMismatchError(f"adapter {label!r}: its module names do not map onto the base")


def map_names(
    targets: Mapping[str, str],
    base_names: Collection[str],
    *,
    label: str,
    fits: Callable[[NameMap], bool] | None = None,
    aliases: NameAliases | None = None,
) -> NameMap:
    """Find the renaming that takes every tensor an adapter changes to a tensor of the base.

    The adapter's names are tried against the base checkpoint's names and, with
    ``aliases``, against transformers' in-memory names of the same tensors (adapters
    trained on transformers 5 name renamed modules that way). Among the renamings that
    map every target, exact names win, then those dropping the fewest components;
    renamings that land on the same checkpoint tensors count once; if several remain,
    ``fits`` (e.g. a shape check) decides; if several still fit, the mapping is ambiguous
    and refused.

    Args:
        targets: Tensor names in the trained model, each with a description for messages
            (``"LoRA target module 'bert.pooler.dense'"``).
        base_names: The base checkpoint's tensor names.
        label: The expert's label, for messages.
        fits: Optional test of a candidate renaming, used only to break ties.
        aliases: The base's in-memory names (:func:`base_aliases`), or ``None`` to match
            checkpoint names only.

    Returns:
        The :class:`NameMap`; calling it gives checkpoint names either way.

    Raises:
        AdapterMismatchError: Naming the first target without a counterpart in the base
            (and the transformers conversion that builds it, if one does), or the
            competing renamings.
    """
    if not targets:
        return NameMap()
    base_set = set(base_names)
    universes: list[tuple[Collection[str], Mapping[str, str] | None, Counter[NameMap]]] = [
        (base_set, None, _support(targets, base_set))
    ]
    if aliases is not None and aliases.renamed:
        memory = {m: c for m, c in aliases.to_checkpoint.items() if c in base_set}
        universes.append((memory.keys(), memory, _support(targets, memory.keys())))
    total = len(targets)
    complete = [
        NameMap(m.drop, m.add, table)
        for _, table, support in universes
        for m, n in support.items()
        if n == total
    ]
    if not complete:
        raise _no_counterpart(targets, universes, label, aliases)
    exact = [m for m in complete if not m.drop and not m.add]
    if exact:
        complete = exact
    else:
        fewest = min(m.drop.count(".") for m in complete)
        complete = [m for m in complete if m.drop.count(".") == fewest]
    complete.sort(key=lambda m: (m.add.count("."), m.add, m.aliases is not None))
    by_effect: dict[tuple[str | None, ...], NameMap] = {}
    for m in complete:  # checkpoint names and in-memory names may lead to the same tensors
        by_effect.setdefault(tuple(m(t) for t in targets), m)
    complete = list(by_effect.values())
    if len(complete) > 1 and fits is not None:
        fitting = [m for m in complete if fits(m)]
        complete = fitting or complete
    if len(complete) > 1:
        example = next((t for t in targets if len({m(t) for m in complete}) > 1), next(iter(targets)))
        options = ", ".join(repr(m(example)) for m in complete[:3])
        both = len({m.aliases is None for m in complete}) > 1
        why = " (as checkpoint names and as transformers' in-memory names)" if both else ""
        raise AdapterMismatchError(
            f"adapter {label!r}: its module names fit the base in {len(complete)} ways{why} "
            f"({example!r} could be {options}); refusing to guess"
        )
    chosen = complete[0]
    if chosen != NameMap() or chosen.aliases is not None:
        logger.info("adapter %r: mapping module names onto the base as %s", label, chosen)
    return chosen


@functools.lru_cache(maxsize=4)
def _meta_model(directory: str) -> torch.nn.Module | None:
    """The base model built from its ``config.json`` on the meta device, or ``None`` (best effort).

    The class is the config's first ``architectures`` entry if transformers has it,
    else ``AutoModel``; no remote code is run, nothing is downloaded.
    """
    if not (Path(directory) / "config.json").is_file():
        return None
    try:
        import transformers
        from transformers.utils import logging as hf_logging

        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                config = transformers.AutoConfig.from_pretrained(
                    directory, local_files_only=True, trust_remote_code=False
                )
                architecture = (getattr(config, "architectures", None) or [None])[0]
                model_cls = getattr(transformers, architecture, None) if architecture else None
                with torch.device("meta"):
                    return (
                        model_cls(config)
                        if model_cls is not None
                        else transformers.AutoModel.from_config(config)
                    )
        finally:
            hf_logging.set_verbosity(verbosity)
    except Exception as exc:  # noqa: BLE001 - best effort: any failure means names are used as they are
        logger.debug("cannot build %s on the meta device: %s", directory, exc)
        return None


@functools.lru_cache(maxsize=8)
def base_layer_types(directory: str) -> Mapping[str, str] | None:
    """Class names of the base model's modules, from its ``config.json``, built on the meta device.

    PEFT decides ``fan_in_fan_out`` per layer from the layer's class (``Conv1D`` stores
    ``(in, out)``), whatever the config says; when an adapter's shapes alone cannot tell
    (square weights), this is how we ask the same question. Best effort: ``None`` when the
    directory has no ``config.json`` or transformers cannot build it (no remote code is run).
    Module names are transformers' in-memory names: translate checkpoint names with
    :meth:`NameAliases.memory_module` (:func:`base_aliases`) first.

    Args:
        directory: The base model directory.

    Returns:
        Module name to class name (``"transformer.h.0.attn.c_proj": "Conv1D"``), or ``None``.
    """
    model = _meta_model(str(directory))
    if model is None:
        return None
    return {name: type(module).__name__ for name, module in model.named_modules()}


def base_aliases(directory: str | Path, names: Collection[str]) -> NameAliases | None:
    """The in-memory names transformers gives the base checkpoint's tensors (best effort, cached).

    Builds the base on the meta device from its ``config.json`` (the same build as
    :func:`base_layer_types`) and applies the model's conversion mapping
    (``transformers.conversion_mapping.get_model_conversion_mapping``) to every checkpoint
    name, as ``from_pretrained`` does: renamings in order, then at most one converter.
    Only tensors loaded by renaming alone get an alias; those a converter builds (fused
    experts...) are recorded in :attr:`NameAliases.converted`. Names that are not tensors
    of the built model are left out.

    Args:
        directory: The base model directory (with ``config.json``).
        names: The base checkpoint's tensor names.

    Returns:
        The :class:`NameAliases`, or ``None`` when the model cannot be built or the
        installed transformers has no conversion mapping (names are then used as they are).
    """
    return _base_aliases(str(directory), frozenset(names))


@functools.lru_cache(maxsize=8)
def _base_aliases(directory: str, names: frozenset[str]) -> NameAliases | None:
    model = _meta_model(directory)
    if model is None:
        return None
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import (
            WeightConverter,
            WeightRenaming,
            dot_natural_key,
            rename_source_key,
        )
    except ImportError:  # transformers before 5: it renames nothing
        return None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            transforms = get_model_conversion_mapping(model)
            renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
            converters = [t for t in transforms if isinstance(t, WeightConverter)]
            memory = set(model.state_dict())
            prefix = getattr(model, "base_model_prefix", "") or ""

            def known(name: str) -> bool:
                if name in memory:
                    return True
                if not prefix:
                    return False
                return f"{prefix}.{name}" in memory or (
                    name.startswith(prefix + ".") and name[len(prefix) + 1 :] in memory
                )

            pairs: dict[str, str] = {}
            converted: dict[str, str] = {}
            # sorted as from_pretrained does: grouped renamings activate on their first key
            for name in sorted(names, key=dot_natural_key):
                renamed, pattern = rename_source_key(name, renamings, converters)
                if pattern is not None:
                    converted[name] = renamed
                    continue
                if not known(renamed) and known(name):  # as from_pretrained: the renaming did not apply
                    renamed = name
                if known(renamed):
                    pairs[name] = renamed
    except Exception as exc:  # noqa: BLE001 - best effort: names are then used as they are
        logger.debug("cannot apply transformers' conversion mapping to %s: %s", directory, exc)
        return None
    aliases = NameAliases.from_pairs(pairs, converted)
    if aliases.renamed or aliases.converted:
        logger.debug(
            "%s: transformers renames %d of %d checkpoint tensors in memory, converts %d",
            directory,
            sum(c != m for c, m in aliases.to_memory.items()),
            len(names),
            len(aliases.converted),
        )
    return aliases
