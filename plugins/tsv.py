"""TSV-M: Task Singular Vectors merging.

Paper: A. A. Gargiulo, D. Crisostomi, M. S. Bucarelli, S. Scardapane, F. Silvestri and
E. Rodolà, "Task Singular Vectors: Reducing Task Interference in Model Merging",
CVPR 2025, pp. 18695-18705. https://arxiv.org/abs/2412.00081

For every 2-D tensor (``m x n``) with task matrices ``Δ_1 .. Δ_T``:

1. ``Δ_t = U_t Σ_t V_tᵀ``; keep each task's top ``k`` singular triplets with
   ``k = max(1, floor(min(m, n) / T))``. The rounding is down, as in the reference code
   (``int(rank / T)``), so the ``T·k`` kept directions never exceed the rank; ``k`` is at
   least 1 so that more experts than ``min(m, n)`` still merge.
2. Concatenate ``U = [U_1 | ... | U_T]`` (``m x Tk``), ``V = [V_1 | ... | V_T]``
   (``n x Tk``) and the singular values ``σ = [σ_1, ..., σ_T]``.
3. Orthogonalise each concatenation with its nearest orthogonal matrix (the polar
   factor, orthogonal Procrustes): ``U = P D Qᵀ  ->  U⊥ = P Qᵀ``, and ``V⊥`` likewise.
4. ``τ_merged = U⊥ diag(σ) V⊥ᵀ`` and ``θ = θ_0 + α·τ_merged`` (``α`` is ``scale``).

Every other tensor (1-D biases and norms, >2-D kernels) gets the mean of the task
vectors, also scaled by ``α``: the reference applies ``α`` to the whole merged task vector.

Choices beyond the paper:

* singular triplets whose singular value is numerically zero
  (``σ <= max(m, n)·eps·σ_max``) are dropped before the concatenation: their singular
  vectors are arbitrary, and would otherwise rotate the other tasks' directions during
  the orthogonalisation. A task that leaves the tensor untouched (an adapter that does
  not target it) or a low-rank task therefore contributes nothing, instead of noise;
* the SVDs run in float32 (float64 when the compute dtype is float64) and the result is
  returned in the compute dtype.

Invariant: when the tasks' singular spaces are mutually orthogonal and each task has rank
at most ``k``, the concatenations are already orthonormal and TSV-M returns ``Σ_t τ_t``.
"""

from __future__ import annotations

import torch
from pydantic import Field

from hubmerge.hookspecs import hookimpl
from hubmerge.method import MergeMethod, Params, TensorGroup


class TSVParams(Params):
    """Parameters of TSV-M."""

    scale: float = Field(
        1.0,
        allow_inf_nan=False,
        description="α: the merged task vector is added to the base as θ_0 + α·τ_merged (the paper: 1.0).",
    )


def _work_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def nearest_orthogonal(matrix: torch.Tensor) -> torch.Tensor:
    """The polar factor ``P Qᵀ`` of ``matrix = P D Qᵀ`` (thin SVD).

    It is the matrix with orthonormal columns (or rows, if ``matrix`` is wide) closest to
    ``matrix`` in Frobenius norm.

    Args:
        matrix: A 2-D tensor.

    Returns:
        A tensor of the same shape.
    """
    p, _, qh = torch.linalg.svd(matrix, full_matrices=False)
    return p @ qh


def task_rank(shape: tuple[int, int], tasks: int) -> int:
    """The number of singular triplets TSV-M keeps per task: ``max(1, min(m, n) // T)``."""
    return max(1, min(shape) // tasks)


def tsv_merge_matrix(deltas: torch.Tensor) -> torch.Tensor:
    """Merge the task matrices of one 2-D tensor with TSV-M (without the scale ``α``).

    Args:
        deltas: Task matrices stacked on dim 0, shape ``(T, m, n)``, floating point.

    Returns:
        ``U⊥ diag(σ) V⊥ᵀ``, shape ``(m, n)``, in the dtype of ``deltas``.
    """
    tasks, m, n = deltas.shape
    k = task_rank((m, n), tasks)
    u, s, vh = torch.linalg.svd(deltas, full_matrices=False)  # (T,m,r) (T,r) (T,r,n)
    u, s, vh = u[:, :, :k], s[:, :k], vh[:, :k, :]
    s_max = s.max()
    if s_max <= 0:
        return torch.zeros((m, n), dtype=deltas.dtype, device=deltas.device)
    keep = (s > s_max * max(m, n) * torch.finfo(s.dtype).eps).reshape(-1)
    # Task-major concatenation: columns [U_1 | U_2 | ...], rows [V_1ᵀ; V_2ᵀ; ...].
    u_cat = u.permute(1, 0, 2).reshape(m, tasks * k)[:, keep]
    s_cat = s.reshape(-1)[keep]
    vh_cat = vh.reshape(tasks * k, n)[keep]
    return (nearest_orthogonal(u_cat) * s_cat) @ nearest_orthogonal(vh_cat)


class TSV(MergeMethod):
    """TSV-M: per-matrix top singular vectors of each task, concatenated and orthogonalised."""

    name = "tsv"
    summary = "TSV-M: each task's top singular vectors per matrix, concatenated and orthogonalised"
    paper = (
        "Gargiulo et al., Task Singular Vectors: Reducing Task Interference in Model Merging, "
        "CVPR 2025, https://arxiv.org/abs/2412.00081"
    )
    Params = TSVParams

    def merge_tensor(self, group: TensorGroup) -> torch.Tensor:
        """Merge one tensor: TSV-M for 2-D tensors, the mean task vector otherwise.

        Args:
            group: The base weight and the experts' task vectors.

        Returns:
            ``θ_0 + scale·τ_merged`` in the compute dtype.
        """
        deltas = group.deltas
        if deltas.dim() == 3 and deltas.numel() > 0:
            merged = tsv_merge_matrix(deltas.to(_work_dtype(deltas.dtype)))
        else:
            merged = deltas.mean(dim=0)
        return group.base + (self.params.scale * merged).to(group.base.dtype)


@hookimpl
def hubmerge_register_methods(register):
    """Register TSV-M."""
    register(TSV)
