"""``dare``: Drop And REscale, then task arithmetic or TIES.

Yu, Yu, Yu, Huang, Li, "Language Models are Super Mario: Absorbing Abilities from Homologous
Models as a Free Lunch", ICML 2024, https://arxiv.org/abs/2311.03099.

Each entry of each task vector is kept with probability ``density`` (an independent Bernoulli
draw) and the kept entries are divided by ``density`` so the expectation is unchanged; the
sparsified task vectors are then combined:

* ``combine: task_arithmetic``: ``theta_0 + scale * sum_k tau_k'`` (``scale`` default 0.3);
* ``combine: ties``: TIES on ``tau_k'`` (``scale`` default 1.0). ``k`` (default 1.0 = no magnitude
  trim, only sign election and disjoint mean, i.e. mergekit's ``dare_ties``) and ``scope`` as in
  ``ties``. With ``scope: global`` and ``k < 1`` the two pre-passes regenerate exactly the same
  drop masks as the merge (the masks depend only on ``seed``, the tensor name, its shape and
  the number of experts), so the model-wide threshold is exact for the dropped-and-rescaled
  vectors.

Masks come from ``TensorGroup.generator(seed)``: one bool draw of shape ``(T, *shape)`` per
tensor, independent of the order in which tensors are processed.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field, model_validator

from hubmerge import method
from hubmerge.hookspecs import hookimpl
from hubmerge.method import MergeMethod, TensorGroup

from ._sparsify import GlobalThreshold, GlobalThresholdPasses, trim_and_merge

DEFAULT_SCALE = {"task_arithmetic": 0.3, "ties": 1.0}


class Params(method.Params):
    """Parameters of ``dare``."""

    density: float = Field(
        0.9, gt=0.0, le=1.0,
        description="Probability of keeping each task-vector entry; kept entries are divided by it.",
    )
    seed: int = Field(
        0, ge=0, description="Random seed of the drop masks (combined with each tensor's name)."
    )
    combine: Literal["task_arithmetic", "ties"] = Field(
        "task_arithmetic", description="How the sparsified task vectors are merged."
    )
    scale: float | None = Field(
        None, allow_inf_nan=False,
        description="Scaling coefficient lambda. Default: 0.3 for task_arithmetic, 1.0 for ties.",
    )
    k: float = Field(
        1.0, gt=0.0, le=1.0,
        description="combine: ties only. Fraction of each (dropped) task vector kept by magnitude; "
        "1 = no trim (sign election and disjoint mean only).",
    )
    scope: Literal["global", "tensor"] = Field(
        "global", description="combine: ties only. Where the top-k magnitudes are ranked (model or tensor)."
    )

    @model_validator(mode="after")
    def _resolve(self) -> Params:
        if self.combine != "ties":
            # Non-default values only, so a dumped-and-reloaded params dict stays valid.
            defaults = (("k", 1.0), ("scope", "global"))
            stray = [name for name, default in defaults if getattr(self, name) != default]
            if stray:
                raise ValueError(f"{', '.join(stray)} only apply to combine: ties")
        if self.scale is None:
            self.scale = DEFAULT_SCALE[self.combine]
        return self


def drop_mask(group: TensorGroup, density: float, seed: int) -> torch.Tensor:
    """The keep-mask of every task-vector entry of one tensor.

    Args:
        group: The tensor group (its name seeds the stream).
        density: Keep probability.
        seed: The recipe's seed.

    Returns:
        A bool tensor shaped like ``group.deltas``.
    """
    mask = torch.empty(group.deltas.shape, dtype=torch.bool, device=group.deltas.device)
    return mask.bernoulli_(density, generator=group.generator(seed))


def drop_and_rescale(group: TensorGroup, density: float, seed: int) -> torch.Tensor:
    """``tau * mask / density`` as a new tensor (``group.deltas`` itself when ``density`` is 1).

    Args:
        group: The tensor group.
        density: Keep probability.
        seed: The recipe's seed.

    Returns:
        The sparsified task vectors, shape ``(T, *shape)``; do not modify in place.
    """
    if density >= 1.0:
        return group.deltas
    return (group.deltas * drop_mask(group, density, seed)).div_(density)


class Dare(GlobalThresholdPasses, MergeMethod):
    """DARE: random drop and rescale, then task arithmetic or TIES."""

    name = "dare"
    summary = "DARE: randomly drop task-vector entries, rescale the rest, then task arithmetic or TIES."
    paper = "Yu et al., Language Models are Super Mario: Absorbing Abilities from Homologous Models " \
            "as a Free Lunch, ICML 2024, https://arxiv.org/abs/2311.03099"
    Params = Params
    min_experts = 1
    prepasses = GlobalThreshold.passes
    unchanged_when_zero = True  # zero task vectors merge to the base

    def __init__(self, params=None):
        super().__init__(params)
        self._global = GlobalThreshold(self.params.k, key="dare")
        self.prepasses = GlobalThreshold.passes if self._uses_global() else 0

    def _uses_global(self) -> bool:
        p = self.params
        return p.combine == "ties" and p.scope == "global" and p.k < 1.0

    def _dropped(self, group: TensorGroup) -> torch.Tensor:
        return drop_and_rescale(group, self.params.density, self.params.seed)

    def _trim_input(self, group: TensorGroup) -> torch.Tensor:
        return self._dropped(group)

    def merge_tensor(self, group: TensorGroup) -> torch.Tensor:
        """Drop, rescale and combine.

        Raises:
            MethodStateError: ``combine: ties, scope: global, k < 1`` without the pre-passes.
        """
        p = self.params
        if group.base.numel() == 0:
            return group.base.clone()
        if p.combine == "task_arithmetic":
            merged = torch.zeros_like(group.base)
            if p.density >= 1.0:
                for delta in group.deltas:
                    merged.add_(delta)
            else:
                mask = drop_mask(group, p.density, p.seed)
                for delta, keep in zip(group.deltas, mask):
                    merged.add_(delta * keep)
                merged.div_(p.density)
            return merged.mul_(p.scale).add_(group.base)
        thresholds = self._global.require(group.deltas.shape[0]) if self._uses_global() else None
        merged = trim_and_merge(self._dropped(group), p.k, thresholds)
        return merged.mul_(p.scale).add_(group.base)


@hookimpl
def hubmerge_register_methods(register):
    """Register :class:`Dare`."""
    register(Dare)
