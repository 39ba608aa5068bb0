"""Reading ``adapter_config.json`` with PEFT's own config classes, and refusing what we cannot expand.

Only adapter kinds whose merged weights we reproduce exactly are accepted: LoRA (with
rsLoRA, rank/alpha patterns, ``fan_in_fan_out``, embedding LoRA, ``lora_bias``, the
``bias`` option, ``modules_to_save`` and DoRA) and IA3. Everything else is refused with
``AdapterError("not supported yet: ...")`` before any tensor is read.
"""

from __future__ import annotations

import dataclasses
import json
import time
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from ..errors import AdapterError

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
MAX_CONFIG_BYTES = 1024 * 1024
#: Time all of one adapter's regex patterns (``rank_pattern``/``alpha_pattern`` keys, IA3's
#: ``feedforward_modules``) may spend matching its module names.
PATTERN_BUDGET_SECONDS = 1.0

#: PEFT types this package expands into task vectors.
SUPPORTED_TYPES = ("LORA", "IA3")

#: ``init_lora_weights`` values that rewrite the base weights at initialisation. Such an adapter
#: only fits the rewritten (residual) base unless it was converted when saved (PEFT then
#: records ``init_lora_weights: true``).
BASE_MUTATING_INITS = ("pissa", "olora", "corda", "lora_ga", "loftq")

#: LoRA options that change the maths or the model's structure, with why they are refused.
UNSUPPORTED_LORA_OPTIONS = {
    "target_parameters": "LoRA on raw parameters (target_parameters)",
    "trainable_token_indices": "trainable tokens (trainable_token_indices)",
    "layer_replication": "layer replication (layer_replication)",
    "use_qalora": "QA-LoRA (use_qalora)",
    "megatron_config": "Megatron parallel layers (megatron_config)",
}


def read_config_json(directory: Path) -> dict[str, Any]:
    """Read ``adapter_config.json`` as a JSON object (bounded size).

    Args:
        directory: The adapter directory.

    Returns:
        The parsed object.

    Raises:
        AdapterError: If the file is missing, too large, or not a JSON object.
    """
    path = Path(directory) / CONFIG_FILE
    try:
        size = path.stat().st_size
    except OSError:
        raise AdapterError(f"{path}: adapter config not found") from None
    if size > MAX_CONFIG_BYTES:
        raise AdapterError(f"{path}: {size} bytes is too large for an adapter config")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise AdapterError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise AdapterError(f"{path}: not a JSON object")
    return data


def load_adapter_config(directory: Path):
    """Load an adapter's config with PEFT's config classes and refuse what is unsupported.

    Args:
        directory: The adapter directory (holding ``adapter_config.json``).

    Returns:
        A ``peft.LoraConfig`` or ``peft.IA3Config``.

    Raises:
        AdapterError: ``"not supported yet: <type>"`` for other PEFT types, LoRA variants or
            options whose merge is not a plain function of the saved tensors; or if the config
            is unreadable.
    """
    directory = Path(directory)
    raw = read_config_json(directory)
    peft_type = raw.get("peft_type")
    if not isinstance(peft_type, str):
        raise AdapterError(f"{directory / CONFIG_FILE}: no `peft_type`")
    if peft_type.upper() not in SUPPORTED_TYPES:
        raise AdapterError(f"not supported yet: {peft_type} (hubmerge expands LoRA, DoRA and IA3 adapters)")
    from peft import PeftConfig

    _refuse_unknown_options(directory, raw)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # forward-compatibility warnings: checked above
            config = PeftConfig.from_pretrained(str(directory))
    except Exception as exc:  # PEFT raises ValueError/TypeError/KeyError for bad configs
        raise AdapterError(f"{directory / CONFIG_FILE}: PEFT cannot read it ({exc})") from None
    if getattr(config, "is_prompt_learning", False):
        raise AdapterError(f"not supported yet: {peft_type} (prompt learning)")
    if peft_type_name(config) == "LORA":
        _refuse_unsupported_lora(config)
    return config


def _refuse_unknown_options(directory: Path, raw: dict[str, Any]) -> None:
    """Refuse options set by a newer PEFT that the installed one would silently drop."""
    from peft import __version__ as peft_version
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

    config_cls = PEFT_TYPE_TO_CONFIG_MAPPING.get(raw["peft_type"].upper())
    if config_cls is None:
        raise AdapterError(f"not supported yet: {raw['peft_type']}")
    known = {f.name for f in dataclasses.fields(config_cls)} | {"runtime_config", "peft_version"}
    unknown = sorted(k for k, v in raw.items() if k not in known and v not in (None, False, {}, [], ""))
    if unknown:
        raise AdapterError(
            f"{directory / CONFIG_FILE}: sets {', '.join(unknown)}, unknown to the installed peft "
            f"{peft_version}; upgrade peft to merge this adapter"
        )


def lora_variants(config) -> list[str]:
    """The LoRA variants a config turns on, using PEFT's own field metadata.

    PEFT tags variant fields with ``metadata["is_lora_variant"]`` and lists the
    ``init_lora_weights`` values that select a variant in ``metadata["lora_variants"]``.

    Args:
        config: A ``peft.LoraConfig``.

    Returns:
        Names such as ``["use_dora"]``; empty for plain LoRA.
    """
    active = []
    for field in dataclasses.fields(config):
        if field.name == "init_lora_weights":
            for option in field.metadata.get("lora_variants", ()):
                if isinstance(config.init_lora_weights, str) and config.init_lora_weights.lower().startswith(
                    option
                ):
                    active.append(f"init_lora_weights={config.init_lora_weights}")
        elif field.metadata.get("is_lora_variant") and getattr(config, field.name):
            active.append(field.name)
    return active


def _refuse_unsupported_lora(config) -> None:
    for variant in lora_variants(config):
        if variant != "use_dora":
            raise AdapterError(f"not supported yet: LoRA variant {variant}")
    for option, what in UNSUPPORTED_LORA_OPTIONS.items():
        if getattr(config, option, None):
            raise AdapterError(f"not supported yet: {what}")
    init = config.init_lora_weights
    if isinstance(init, str) and init.lower().startswith(BASE_MUTATING_INITS):
        raise AdapterError(
            f"not supported yet: a LoRA adapter saved with init_lora_weights={init!r} fits only the base it "
            "rewrote at initialisation; save it with PEFT's "
            "`save_pretrained(..., path_initial_model_for_weight_conversion=...)` to get a plain LoRA adapter"
        )


def peft_type_name(config) -> str:
    """``"LORA"``, ``"IA3"``... for a PEFT config."""
    peft_type = config.peft_type
    return str(getattr(peft_type, "value", peft_type)).upper()


class PatternMatcher:
    """PEFT's regex rules for module names, matched within a time budget.

    PEFT matches ``rank_pattern``/``alpha_pattern`` keys with ``re.match(rf"(.*\\.)?({key})$", module)``
    and a string ``feedforward_modules`` with ``re.fullmatch``. The patterns come from the adapter's
    config, so a hostile one (``(.|.)*Z``: exponential backtracking) could run for hours. The
    same syntax is matched here with the ``regex`` module (``re``-compatible, a dependency of
    transformers), whose matches can be timed out: a pattern that exhausts the budget is
    refused with :class:`AdapterError` instead.

    Args:
        where: Names the adapter in error messages.
        budget: Seconds all matches together may take (default :data:`PATTERN_BUDGET_SECONDS`).
    """

    def __init__(self, where: str, budget: float | None = None):
        self.where = where
        self.budget = PATTERN_BUDGET_SECONDS if budget is None else budget
        self._deadline: float | None = None
        self._compiled: dict[str, Any] = {}

    def _search(self, pattern: str, text: str, *, anchored_suffix: bool) -> bool:
        import regex

        key = ("k:" if anchored_suffix else "f:") + pattern
        compiled = self._compiled.get(key)
        if compiled is None:
            try:
                compiled = regex.compile(rf"(.*\.)?({pattern})$" if anchored_suffix else pattern)
            except (regex.error, TypeError, ValueError, RecursionError) as exc:
                raise AdapterError(f"{self.where}: pattern {pattern!r} is not a valid regular expression ({exc})") from None
            self._compiled[key] = compiled
        if self._deadline is None:
            self._deadline = time.monotonic() + self.budget
        remaining = self._deadline - time.monotonic()
        try:
            if remaining <= 0:
                raise TimeoutError
            found = compiled.match(text, timeout=remaining) if anchored_suffix else compiled.fullmatch(
                text, timeout=remaining)
        except TimeoutError:
            raise AdapterError(
                f"{self.where}: pattern {pattern!r} takes too long to match module {text!r} (more than "
                f"{self.budget:g}s for the whole config: a pathological regular expression); refusing the adapter"
            ) from None
        return found is not None

    def pattern_key(self, keys: Iterable[str], module: str) -> str:
        """The first key matching ``module`` (PEFT's ``get_pattern_key``), else ``module`` itself."""
        for key in keys:
            if self._search(key, module, anchored_suffix=True):
                return key
        return module

    def fullmatch(self, pattern: str, module: str) -> bool:
        """``re.fullmatch(pattern, module)``, within the budget."""
        return self._search(pattern, module, anchored_suffix=False)
