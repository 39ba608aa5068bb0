"""PCB-Merging: Parameter Competition Balancing.

Paper: G. Du, J. Lee, J. Li, R. Jiang, Y. Guo, S. Yu, H. Liu, S. K. Goh, H.-K. Tang,
D. He and M. Zhang, "Parameter Competition Balancing for Model Merging", NeurIPS 2024.
https://arxiv.org/abs/2410.02396

Per tensor, with task vectors ``τ_1 .. τ_T`` flattened to ``d`` entries, ``Norm`` the
min-max normalisation over a task's entries and ``Softmax`` over a task's entries:

* intra-balancing (self-awareness): ``β_intra,i = Softmax(T · Norm(τ_i ⊙ τ_i))``;
* inter-balancing (cross-awareness): ``β_inter,i = Σ_{j=1..T} Softmax(Norm(τ_i ⊙ τ_j))``;
* ``β_i = β_intra,i ⊙ β_inter,i``;
* drop: keep the entries whose ``β_i`` is among the task's top ``ratio`` (the
  ``⌈ratio·d⌉``-th largest score is the threshold; ties at it are kept),
  ``β̂_i = m_i ⊙ β_i``;
* rescale: ``τ_m = Σ_i β̂_i ⊙ τ_i / Σ_i β̂_i`` (zero where nothing is kept);
* ``θ = θ_0 + λ·τ_m`` (``λ`` is ``scale``).

Where the public implementation (``duguodong7/pcb-merging``, ``PCB_merge``) differs from
the paper, this module follows the paper:

* inter-balancing: the code uses ``tanh(τ_i ⊙ Σ_j τ_j)`` (no normalisation, tanh instead
  of a softmax, and a signed score) — here the paper's sum of softmaxes;
* intra-balancing: the code min-max normalises ``|τ_i|`` and then squares it, and drops
  the softmax's denominator — here ``Norm(τ_i ⊙ τ_i)`` with the full softmax. The
  denominator matters because the rescaling compares different tasks' scores;
* drop and rescale: the code raises the scores below the threshold to it and min-max
  normalises them, so kept weights are ``(β − threshold)/(max − threshold)`` — here the
  paper's ``m_i ⊙ β_i``;
* the code clips every task vector's magnitudes at its 0.01 % and 99.99 % quantiles and
  merges the clipped vectors; the paper does not, and neither does this module;
* the code normalises, takes softmaxes and thresholds over the whole flattened model; the
  engine streams one tensor at a time and sums pre-pass statistics, which cannot carry a
  global min/max or quantile, so this module balances **per tensor**;
* the paper tunes ``λ`` (and per-task coefficients) by evolutionary search on validation
  data; here ``λ`` is a plain parameter (default 1.0, since ``τ_m`` is a weighted mean).

Also: entries where a task vector is exactly zero never count as kept for that task (an
expert that leaves a tensor untouched does not dilute the others), and the scores are
computed in float32 (float64 when the compute dtype is float64) because the softmax
values are of order ``1/d``.
"""

from __future__ import annotations

import math

import torch
from pydantic import Field

from hubmerge.hookspecs import hookimpl
from hubmerge.method import MergeMethod, Params, TensorGroup


class PCBParams(Params):
    """Parameters of PCB-Merging."""

    ratio: float = Field(
        0.1,
        gt=0,
        le=1,
        description="Fraction of each task's entries kept after balancing (the paper's r; top-scoring ones).",
    )
    scale: float = Field(
        1.0,
        allow_inf_nan=False,
        description="λ: the balanced task vector is added to the base as θ_0 + λ·τ_m.",
    )


def _work_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def minmax(x: torch.Tensor) -> torch.Tensor:
    """Min-max normalise a 1-D tensor to [0, 1] (all zeros if it is constant)."""
    lo, hi = x.min(), x.max()
    span = hi - lo
    if span <= 0:
        return torch.zeros_like(x)
    return (x - lo) / span


def pcb_scores(flat: torch.Tensor) -> torch.Tensor:
    """The PCB matrix ``β = β_intra ⊙ β_inter`` of flattened task vectors.

    Args:
        flat: Task vectors, shape ``(T, d)``, in a float32/float64 dtype.

    Returns:
        Scores, shape ``(T, d)``, non-negative.
    """
    tasks = flat.shape[0]
    inter = torch.zeros_like(flat)
    intra = torch.empty_like(flat)
    for i in range(tasks):
        for j in range(i, tasks):  # Softmax(Norm(τ_i ⊙ τ_j)) is symmetric in i and j
            similarity = minmax(flat[i] * flat[j])
            if j == i:
                intra[i] = torch.softmax(tasks * similarity, dim=0)
            similarity = torch.softmax(similarity, dim=0)
            inter[i] += similarity
            if j != i:
                inter[j] += similarity
    return intra.mul_(inter)


def kept_count(ratio: float, size: int) -> int:
    """How many entries per task PCB keeps: ``max(1, ceil(ratio·d))`` (rounding noise ignored)."""
    return min(size, max(1, math.ceil(ratio * size - 1e-9)))


def pcb_merge_flat(flat: torch.Tensor, ratio: float) -> torch.Tensor:
    """Balance, drop and rescale flattened task vectors (without the scale ``λ``).

    Args:
        flat: Task vectors, shape ``(T, d)``, in a float32/float64 dtype.
        ratio: Fraction of entries kept per task.

    Returns:
        ``τ_m``, shape ``(d,)``.
    """
    size = flat.shape[1]
    scores = pcb_scores(flat)
    keep = kept_count(ratio, size)
    threshold = scores.kthvalue(size - keep + 1, dim=1, keepdim=True).values
    weights = torch.where((scores >= threshold) & (flat != 0), scores, torch.zeros_like(scores))
    total = weights.sum(dim=0)
    merged = (weights * flat).sum(dim=0) / torch.where(total > 0, total, torch.ones_like(total))
    return torch.where(total > 0, merged, torch.zeros_like(merged))


class PCB(MergeMethod):
    """PCB-Merging: intra- and inter-balanced scores, top-ratio drop, score-weighted mean."""

    name = "pcb"
    summary = "PCB-Merging: balance parameter competition within and across tasks, drop, rescale"
    paper = (
        "Du et al., Parameter Competition Balancing for Model Merging, NeurIPS 2024, "
        "https://arxiv.org/abs/2410.02396"
    )
    Params = PCBParams

    def merge_tensor(self, group: TensorGroup) -> torch.Tensor:
        """Merge one tensor: ``θ_0 + λ·τ_m``.

        Args:
            group: The base weight and the experts' task vectors.

        Returns:
            The merged weight in the compute dtype.
        """
        if group.base.numel() == 0:
            return group.base.clone()
        flat = group.deltas.reshape(group.deltas.shape[0], -1).to(_work_dtype(group.deltas.dtype))
        merged = pcb_merge_flat(flat, self.params.ratio).reshape(group.base.shape)
        return group.base + (self.params.scale * merged).to(group.base.dtype)


@hookimpl
def hubmerge_register_methods(register):
    """Register PCB-Merging."""
    register(PCB)
