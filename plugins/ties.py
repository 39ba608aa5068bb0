"""``ties``: TIES-Merging — trim, elect sign, disjoint merge.

Yadav, Tam, Choshen, Raffel, Bansal, "TIES-Merging: Resolving Interference When Merging
Models", NeurIPS 2023, https://arxiv.org/abs/2306.01708.

1. **Trim**: keep the fraction ``k`` of each task vector's entries with the largest magnitude,
   either per tensor (``scope: tensor``) or over the whole model (``scope: global``, the paper's
   setting). Every entry with ``|tau| >= threshold`` is kept, the threshold being the
   ``m``-th largest magnitude, ``m = round_half_up(k * n)`` (at least 1): entries tying with the
   threshold are all kept.
2. **Elect**: ``gamma = sign(sum_k trimmed tau_k)``; an exact zero elects nothing.
3. **Disjoint merge**: mean over the tasks whose trimmed entry is non-zero with sign ``gamma``.
4. ``theta = theta_0 + scale * merged``.

``scope: global`` runs two streaming pre-passes (see :class:`hubmerge_plugins._sparsify.GlobalThreshold`)
that find each task's exact model-wide threshold from summed histograms, never holding more than
one tensor's task vectors. With ``scope: tensor``, a tensor too large to hold whole (a vocabulary
embedding) gets the same two passes over its own row blocks (``tensor_passes``), then its blocks
are merged one by one.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from hubmerge import method
from hubmerge.errors import MethodStateError
from hubmerge.hookspecs import hookimpl
from hubmerge.method import MergeMethod, TensorGroup

from ._sparsify import GlobalThreshold, GlobalThresholdPasses, trim_and_merge


class Params(method.Params):
    """Parameters of ``ties``."""

    k: float = Field(
        0.2, gt=0.0, le=1.0,
        description="Fraction of each task vector's entries kept (largest magnitudes); 1 keeps all.",
    )
    scale: float = Field(
        1.0, allow_inf_nan=False,
        description="Scaling coefficient lambda applied to the merged task vector.",
    )
    scope: Literal["global", "tensor"] = Field(
        "global",
        description="Where the top-k magnitudes are ranked: over the whole model (global, two pre-passes) "
        "or inside each tensor.",
    )


class Ties(GlobalThresholdPasses, MergeMethod):
    """TIES-Merging with a per-tensor or exact model-wide top-k."""

    name = "ties"
    summary = "TIES-Merging: trim to top-k magnitudes, elect signs, average the agreeing entries."
    paper = "Yadav et al., TIES-Merging: Resolving Interference When Merging Models, NeurIPS 2023, " \
            "https://arxiv.org/abs/2306.01708"
    Params = Params
    min_experts = 1
    prepasses = GlobalThreshold.passes
    unchanged_when_zero = True  # zero task vectors merge to the base

    def __init__(self, params=None):
        super().__init__(params)
        self._global = GlobalThreshold(self.params.k, key="ties")
        # Pre-passes only when a model-wide threshold is needed.
        self.prepasses = GlobalThreshold.passes if self._uses_global() else 0
        # With a model-wide threshold (or no trimming) every entry is merged on its own,
        # so the engine may stream large tensors in blocks of rows.
        self.elementwise = self._uses_global() or self.params.k >= 1.0
        # Per-tensor thresholds of a tensor too large to hold whole: the same two histogram
        # passes, over that tensor's row blocks, then its blocks merge on their own.
        self.tensor_passes = 0 if self.elementwise else GlobalThreshold.passes
        self._tensor: tuple[str, GlobalThreshold] | None = None

    def _uses_global(self) -> bool:
        return self.params.scope == "global" and self.params.k < 1.0

    def _trim_input(self, group: TensorGroup) -> torch.Tensor:
        return group.deltas

    def observe_tensor(self, pass_index: int, group: TensorGroup) -> dict[str, torch.Tensor]:
        """Histograms of one row block's ``|tau|`` for its tensor's own thresholds (``scope: tensor``)."""
        if pass_index == 0:
            self._tensor = (group.name, GlobalThreshold(self.params.k, key="tensor"))
        return self._tensor_finder(group.name).observe(pass_index, self._trim_input(group))

    def finish_tensor(self, pass_index: int, name: str, totals: dict[str, torch.Tensor]) -> None:
        """Locate the tensor's thresholds from its blocks' summed histograms."""
        self._tensor_finder(name).finish_pass(pass_index, totals)

    def _tensor_finder(self, name: str) -> GlobalThreshold:
        if self._tensor is None or self._tensor[0] != name:
            raise MethodStateError(f"ties: rows of {name!r} before its per-tensor passes")
        return self._tensor[1]

    def merge_tensor(self, group: TensorGroup) -> torch.Tensor:
        """Return ``theta_0 + scale * ties_merge(trim(tau))``.

        Raises:
            MethodStateError: ``scope: global`` without the pre-passes, or a block of rows of a
                tensor whose per-tensor passes did not run.
        """
        if group.base.numel() == 0:
            return group.base.clone()
        if self._uses_global():
            thresholds = self._global.require(group.deltas.shape[0])
        elif group.rows is not None and self.params.k < 1.0:  # a block: the tensor's thresholds are known
            thresholds = self._tensor_finder(group.name).require(group.deltas.shape[0])
        else:
            thresholds = None
        # theta_0 + scale * merged, finished block by block inside trim_and_merge
        return trim_and_merge(group.deltas, self.params.k, thresholds, scale=self.params.scale, base=group.base)


@hookimpl
def hubmerge_register_methods(register):
    """Register :class:`Ties`."""
    register(Ties)
