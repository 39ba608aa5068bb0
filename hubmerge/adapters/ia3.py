"""IA3 adapters expanded into task vectors, exactly as PEFT's ``merge_and_unload``.

IA3 learns one vector ``l`` per layer. PEFT merges it by multiplying the weight:
for feed-forward layers ``l`` (shape ``1 x in``) scales the input columns, for the others
``l`` (``out x 1``) scales the output rows and, when the layer has one, the bias. Layers
storing ``(in, out)`` (``Conv1D``) see ``l`` transposed. The task vector is
``τ = W ⊙ l − W``.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from ..checkpoint import Checkpoint
from ..errors import AdapterError, AdapterMismatchError
from .config import PatternMatcher
from .expert import AdapterExpert, Update, transpose
from .modules import IA3_SUFFIXES, NameMap


def is_feedforward(config, module: str, matcher: PatternMatcher | None = None) -> bool | None:
    """Whether PEFT treats ``module`` as a feed-forward layer (``IA3Model._check_target_module_feedforward``).

    A string ``feedforward_modules`` is a regex that must match the whole module name; a
    list matches names *ending with* one of its entries (plain string suffix, as PEFT does).

    Args:
        config: The ``peft.IA3Config``.
        module: Module name in the trained model.
        matcher: Matches a regex within a time budget (shared by one adapter's modules).

    Returns:
        The answer, or ``None`` if the config does not say (``feedforward_modules`` unset).

    Raises:
        AdapterError: If the regex is invalid or pathologically slow.
    """
    patterns = config.feedforward_modules
    if patterns is None:
        return None
    if isinstance(patterns, str):
        return (matcher or PatternMatcher("IA3 config: feedforward_modules")).fullmatch(patterns, module)
    return any(module.endswith(p) for p in patterns)


class IA3Update(Update):
    """Multiply a weight (or bias) by an IA3 vector.

    Args:
        key: Key of ``ia3_l`` in the adapter file.
        fan_in_fan_out: Whether the weight is stored ``(in, out)``.
        bias: Whether the target is the layer's bias (non-feed-forward layers only).
    """

    def __init__(self, key: str, *, fan_in_fan_out: bool = False, bias: bool = False):
        self.keys = {"ia3_l": key}
        self.fan_in_fan_out = fan_in_fan_out
        self.bias = bias

    def delta(self, start: torch.Tensor, tensors: Mapping[str, torch.Tensor]) -> torch.Tensor:
        vector = tensors["ia3_l"]
        scale = vector.reshape(start.shape) if self.bias else transpose(vector, self.fan_in_fan_out)
        return torch.mul(start, scale) - start


class IA3Expert(AdapterExpert):
    """A PEFT IA3 adapter as an expert (see the module docstring for the maths)."""

    suffixes = IA3_SUFFIXES
    kind_name = "IA3"
    kind = "ia3"

    def plan_updates(self, base: Checkpoint, name_map: NameMap) -> dict[str, Update]:
        updates: dict[str, Update] = {}
        matcher = PatternMatcher(f"adapter {self.label!r}: feedforward_modules")
        for module, roles in self.modules().items():
            where = f"adapter {self.label!r}: IA3 target module {module!r}"
            weight = name_map(f"{module}.weight")
            if weight not in base.meta:
                raise AdapterMismatchError(f"{where} has no weight {weight!r} in the base")
            shape = base.meta[weight].shape
            if len(shape) != 2:
                raise AdapterError(
                    f"not supported yet: IA3 on the {len(shape)}-D weight {weight!r} (convolutions)"
                )
            vector = roles["ia3_l"]
            vshape = self.shape(vector)
            if len(vshape) != 2 or 1 not in vshape:
                raise AdapterMismatchError(
                    f"{where}: ia3_l has shape {list(vshape)}, expected [1, in] or [out, 1]"
                )
            feedforward = is_feedforward(self.config, module, matcher)
            by_shape = vshape[0] == 1 if vshape != (1, 1) else feedforward
            if feedforward is None:
                feedforward = by_shape
            if by_shape is not None and by_shape != feedforward:
                raise AdapterError(
                    f"{where}: ia3_l has shape {list(vshape)} but feedforward_modules says it is "
                    f"{'' if feedforward else 'not '}a feed-forward layer"
                )
            n = vshape[1] if feedforward else vshape[0]
            # feed-forward: l scales inputs (dim 1 of (out, in)); otherwise outputs (dim 0)
            plain = shape[1 if feedforward else 0] == n
            transposed = shape[0 if feedforward else 1] == n
            fifo = self.fan_in_fan_out(
                base,
                weight,
                plain,
                transposed,
                what=f"{where}: ia3_l {list(vshape)} does not fit the base weight {weight!r} {list(shape)}",
            )
            updates[weight] = IA3Update(vector.key, fan_in_fan_out=fifo)
            bias = name_map(f"{module}.bias")
            if not feedforward and bias in base.meta:
                if base.meta[bias].shape != (n,):
                    raise AdapterMismatchError(
                        f"{where}: ia3_l {list(vshape)} does not fit the base bias "
                        f"{bias!r} {list(base.meta[bias].shape)}"
                    )
                updates[bias] = IA3Update(vector.key, bias=True)
        return updates
