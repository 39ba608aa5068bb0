"""Merges written back as a PEFT LoRA adapter (``output.format: adapter``).

* **Exact** — every expert a plain LoRA of the same base and the method a fixed linear
  combination of task vectors (``linear``, ``task_arithmetic``), no ``output.rank``: one
  adapter of rank Σ rᵢ with stacked factors (:func:`~hubmerge.adapters.export.stack_loras`);
  no tensor pass at all.
* **Low rank** — any other method, ``output.rank: r``: the merge is streamed as usual and
  each changed weight of a ``Linear``/``Conv1D``/``Embedding`` module is written as its best
  rank-r approximation (truncated SVD); other changed modules (norms) are saved whole.
  The relative error per module is reported (and put in the card).

Either way modules are named as PEFT on the installed transformers finds them — transformers'
in-memory names, which for some architectures differ from the checkpoint's
(:func:`~hubmerge.adapters.modules.base_aliases`) — while full-model outputs keep the
checkpoint's names.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from ..errors import AdapterError, RecipeError
from .export import LoraAdapterWriter, linear_coefficients, stack_loras
from .lora import LoraExpert
from .modules import NameAliases, base_aliases, base_layer_types

logger = logging.getLogger(__name__)
ADAPTER_LAYERS = ("Linear", "Conv1D", "Embedding")


def check_adapter_output(recipe, method, experts) -> str:
    """Decide how an adapter output is written, refusing incompatible inputs before any work.

    Args:
        recipe: The recipe (``output.format == "adapter"``).
        method: The instantiated method.
        experts: The opened experts.

    Returns:
        ``"stack"`` (exact) or ``"svd"`` (rank ``output.rank``).

    Raises:
        RecipeError: Naming ``output.rank`` or ``output.format`` when the inputs cannot give an adapter.
    """
    exact_ok = (
        recipe.output.rank is None
        and all(isinstance(e, LoraExpert) and not e.use_dora for e in experts)
        and method.name in ("linear", "task_arithmetic")
    )
    if exact_ok:
        try:
            linear_coefficients(method, len(experts))
            return "stack"
        except AdapterError as exc:
            raise RecipeError(str(exc), field="output.format") from None
    if recipe.output.rank is None:
        kinds = sorted({getattr(e, "kind", "full") for e in experts})
        raise RecipeError(
            f"an exact adapter output needs plain LoRA experts and `linear` or `task_arithmetic` "
            f"(got {recipe.method} over {', '.join(kinds)}); set output.rank for a low-rank approximation",
            field="output.rank",
        )
    if method.output != "model":
        raise RecipeError(f"method {recipe.method!r} has per-task outputs, not one adapter", field="output.format")
    return "svd"


def write_adapter(recipe, method, inputs, target: Path, *, overwrite: bool, device, dtype, progress=None,
                  extra_files: dict[str, str] | None = None):
    """Write the merge as a LoRA adapter directory.

    Args:
        recipe: The recipe.
        method: The instantiated method (pre-passes not yet run).
        inputs: The engine's opened inputs.
        target: Output directory.
        overwrite: Replace a directory hubmerge did not write.
        device: Compute device.
        dtype: Compute dtype.
        progress: Engine progress callback.
        extra_files: More files to put in the directory (recipe, card).

    Returns:
        ``(directory, errors)``: errors maps module (in-memory name) to relative Frobenius error
        (empty when exact).

    Raises:
        AdapterError: If a changed base tensor is one transformers does not load as a tensor
            of its own (fused experts...), so no adapter module can carry it.
    """
    from ..engine import Progress, build_group, prefetched, run_prepasses

    mode = check_adapter_output(recipe, method, inputs.experts)
    base_name = inputs.base.repo_id or str(inputs.base.directory)
    if mode == "stack":
        stacked = stack_loras(inputs.experts, linear_coefficients(method, len(inputs.experts)), target,
                              overwrite=overwrite, base_model_name_or_path=base_name, revision=inputs.base.revision)
        for name, text in (extra_files or {}).items():
            (stacked / name).write_text(text)
        return stacked, {}
    layer_types = base_layer_types(str(inputs.base.directory)) or {}
    names = inputs.base_checkpoint.names()
    aliases = base_aliases(inputs.base.directory, names)
    run_prepasses(method, inputs, names, device, dtype, progress)
    writer = LoraAdapterWriter(Path(target), overwrite=overwrite)
    changed_other: dict[str, dict[str, torch.Tensor]] = {}
    floating = [n for n in names if inputs.base_checkpoint.meta[n].dtype.is_floating_point]
    for count, fetched in enumerate(prefetched(inputs, floating), 1):
        group = build_group(inputs, fetched, device, dtype)
        delta = method.merge_tensor(group) - group.base
        if delta.abs().max() > 0:
            module, param = _memory_module(fetched.name, aliases)
            layer = layer_types.get(module, "Linear" if delta.ndim == 2 else None)
            if param == "weight" and delta.ndim == 2 and layer in ADAPTER_LAYERS:
                writer.add_delta(module, delta, recipe.output.rank, layer)
            else:
                changed_other.setdefault(module, {})[param] = group.base + delta
        if progress:
            progress(Progress("merge", count, len(floating), 0, 0))
    owned = _params_by_module(names, aliases) if changed_other else {}
    for module, params in changed_other.items():
        if module in writer.factors:
            logger.warning("adapter output: %s of %s changed but a LoRA module cannot carry it; dropped",
                           ", ".join(params), module)
            continue
        full = {p: inputs.base_checkpoint.get(name) for p, name in owned.get(module, {}).items()}
        full.update(params)
        writer.add_module_to_save(module, full)
    for name, text in (extra_files or {}).items():
        writer.add_file(name, text)
    return writer.finish(base_model_name_or_path=base_name, revision=inputs.base.revision), dict(writer.errors)


def _memory_module(name: str, aliases: NameAliases | None) -> tuple[str, str]:
    """In-memory module and parameter of the base tensor ``name``; a fused tensor is refused."""
    if aliases is None:
        module, _, param = name.rpartition(".")
        return module, param
    try:
        return aliases.memory_module(name)
    except AdapterError as exc:
        raise AdapterError(f"adapter output: {exc}") from None


def _params_by_module(names, aliases: NameAliases | None) -> dict[str, dict[str, str]]:
    """In-memory module to its parameters: in-memory parameter name to checkpoint tensor name."""
    out: dict[str, dict[str, str]] = {}
    for name in names:
        if aliases is not None and name in aliases.converted:
            continue
        module, param = _memory_module(name, aliases)
        out.setdefault(module, {})[param] = name
    return out
