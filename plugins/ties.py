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
one tensor's task vectors.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from hubmerge import method
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

    def __init__(self, params=None):
        super().__init__(params)
        self._global = GlobalThreshold(self.params.k, key="ties")
        # Pre-passes only when a model-wide threshold is needed.
        self.prepasses = GlobalThreshold.passes if self._uses_global() else 0
        # With a model-wide threshold (or no trimming) every entry is merged on its own,
        # so the engine may stream large tensors in blocks of rows.
        self.elementwise = self._uses_global() or self.params.k >= 1.0

    def _uses_global(self) -> bool:
        return self.params.scope == "global" and self.params.k < 1.0

    def _trim_input(self, group: TensorGroup) -> torch.Tensor:
        return group.deltas

    def merge_tensor(self, group: TensorGroup) -> torch.Tensor:
        """Return ``theta_0 + scale * ties_merge(trim(tau))``.

        Raises:
            MethodStateError: ``scope: global`` without the pre-passes.
        """
        if group.base.numel() == 0:
            return group.base.clone()
        thresholds = self._global.require(group.deltas.shape[0]) if self._uses_global() else None
        # theta_0 + scale * merged, finished block by block inside trim_and_merge
        return trim_and_merge(group.deltas, self.params.k, thresholds, scale=self.params.scale, base=group.base)


@hookimpl
def hubmerge_register_methods(register):
    """Register :class:`Ties`."""
    register(Ties)
