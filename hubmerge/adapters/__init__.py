"""PEFT adapters as experts: LoRA (rsLoRA, rank/alpha patterns, ``fan_in_fan_out``, embedding
LoRA, ``lora_bias``, ``bias``, ``modules_to_save``), DoRA and IA3, expanded exactly into the task
vectors that PEFT's ``merge_and_unload`` adds to the base, one tensor at a time.

Modules:
    config: reading ``adapter_config.json`` with PEFT's classes; what is refused.
    modules: PEFT's tensor keys and the mapping of module names onto the base (checkpoint names,
        or transformers' in-memory names where it renames the architecture's modules).
    expert: the :class:`~hubmerge.sources.Expert` common to all kinds.
    lora, ia3: the maths of each kind.
    export: writing merges back as adapters (stacked LoRA, truncated SVD).
"""

from __future__ import annotations

from ..checkpoint import Checkpoint
from ..sources import ResolvedModel
from .config import load_adapter_config, peft_type_name
from .expert import AdapterExpert
from .ia3 import IA3Expert
from .lora import LoraExpert

#: Expert classes by PEFT type.
ADAPTER_KINDS: dict[str, type[AdapterExpert]] = {"LORA": LoraExpert, "IA3": IA3Expert}


def open_adapter(resolved: ResolvedModel, base: Checkpoint) -> AdapterExpert:
    """Open a PEFT adapter directory as an expert of ``base``.

    Reads ``adapter_config.json`` and the weights file's header; the expert's
    :meth:`~AdapterExpert.check` then maps it onto the base and checks every shape.

    Args:
        resolved: The adapter directory, made local.
        base: The base checkpoint.

    Returns:
        A :class:`LoraExpert` or :class:`IA3Expert`.

    Raises:
        AdapterError: ``"not supported yet: <type>"``, an unreadable config, or a missing
            weights file (named).
        UnsafeCheckpointError: If the weights exist only as a pickle.
    """
    config = load_adapter_config(resolved.directory)
    return ADAPTER_KINDS[peft_type_name(config)](resolved, config, base)


__all__ = ["ADAPTER_KINDS", "AdapterExpert", "IA3Expert", "LoraExpert", "load_adapter_config", "open_adapter"]
