"""EMR-Merging: Elect, Mask & Rescale.

Paper: C. Huang, P. Ye, T. Chen, T. He, X. Yue and W. Ouyang, "EMR-Merging: Tuning-Free
High-Performance Model Merging", NeurIPS 2024. https://arxiv.org/abs/2405.17461
(reference code: ``harveyhuang18/EMR_Merging``).

With task vectors ``τ_1 .. τ_T``, per entry:

1. **Elect** the unified task vector: the sign ``γ = sgn(Σ_t τ_t)`` and, among the tasks whose
   entry has that sign, the largest magnitude: ``τ_uni = γ ⊙ max_t |τ_t ⊙ [τ_t ⊙ γ > 0]|``;
2. **Mask** per task: ``M_t = (τ_t ⊙ τ_uni > 0)``, the entries where the task agrees with the
   unified direction (equivalently ``τ_t ⊙ γ > 0``: there ``|τ_uni| >= |τ_t| > 0``);
3. **Rescale** per task: ``λ_t = Σ|τ_t| / Σ|M_t ⊙ τ_uni|``, so that the task's reconstructed
   update ``λ_t · M_t ⊙ τ_uni`` has the task vector's total magnitude.

Task ``t``'s model is ``θ_0 + λ_t · (M_t ⊙ τ_uni)``. The output is a **deployment**
(:mod:`hubmerge.deployment`): ``θ_0`` and ``τ_uni`` stored once, one bit per entry and task for
the masks, one scalar per task; load a task with ``hubmerge.load_task_model(dir_or_repo, task)``.

Choices, following the reference code where the paper leaves room:

* **the sign of a zero sum is negative**: the reference elects ``γ = +1`` where the (mean) task
  vector is positive and ``-1`` everywhere else, so an entry whose task vectors cancel exactly
  takes the largest negative one. Entries every task leaves at zero give ``τ_uni = 0`` and
  empty masks either way;
* **one rescaler per task for the whole model** (``rescale: model``, the default): the paper's
  ``λ_t`` sums over all of the model's entries, so they come from a streaming pre-pass that adds
  up ``Σ|τ_t|`` and ``Σ|M_t ⊙ τ_uni|`` over every floating tensor. The reference code sums
  per-tensor *means* instead (every tensor weighs the same whatever its size): that is
  ``rescale: model_mean``. ``rescale: tensor`` gives one ``λ_t`` per tensor (no pre-pass;
  ``T`` scalars per tensor, still negligible storage);
* a task whose mask is empty (its task vector opposes the elected sign everywhere) keeps
  ``θ_0``; its ``λ_t`` is recorded as 1;
* every floating tensor is merged, biases and norms included, as the reference's task vectors
  cover every floating parameter; integer buffers are stored once, from the base.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import Field

from hubmerge.deployment import DeploymentMethod, MaskedTensor
from hubmerge.errors import MethodStateError
from hubmerge.hookspecs import hookimpl
from hubmerge.method import Params, TensorGroup


class EMRParams(Params):
    """Parameters of EMR-Merging."""

    rescale: Literal["model", "model_mean", "tensor"] = Field(
        "model",
        description="Scope of the rescalers λ_t = Σ|τ_t| / Σ|M_t ⊙ τ_uni|: `model` sums over every entry of the "
        "model (the paper), `model_mean` sums per-tensor means (the reference code), `tensor` gives one λ_t "
        "per tensor.",
    )


def elect(deltas: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The unified task vector and the per-task masks of one tensor.

    Works task by task, so that the temporaries are a few tensors of the weight's size (the masks
    themselves are one byte per entry and task), not ``(T, *shape)`` floats.

    Args:
        deltas: Task vectors, shape ``(T, *shape)``.

    Returns:
        ``(tau_uni, masks)``: shape ``shape`` in the deltas' dtype, and bool ``(T, *shape)``.
    """
    positive = deltas.sum(dim=0) > 0  # γ = +1 here, -1 elsewhere (the reference's sign: zero counts as negative)
    masks = torch.empty(deltas.shape, dtype=torch.bool, device=deltas.device)
    best = torch.zeros(deltas.shape[1:], dtype=deltas.dtype, device=deltas.device)
    for t in range(deltas.shape[0]):
        d = deltas[t]
        torch.where(positive, d > 0, d < 0, out=masks[t])  # τ_t ⊙ γ > 0
        torch.maximum(best, d.abs().mul_(masks[t]), out=best)
    return torch.where(positive, best, -best), masks


def magnitude_sums(deltas: torch.Tensor, unified: torch.Tensor, masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per task: ``Σ|τ_t|`` and ``Σ|M_t ⊙ τ_uni|`` over the tensor's entries, in float64.

    Args:
        deltas: ``(T, *shape)``.
        unified: ``shape``.
        masks: bool ``(T, *shape)``.

    Returns:
        Two ``(T,)`` float64 tensors.
    """
    count = deltas.shape[0]
    magnitude = unified.abs()
    tau = torch.empty(count, dtype=torch.float64, device=deltas.device)
    kept = torch.empty(count, dtype=torch.float64, device=deltas.device)
    for t in range(count):
        tau[t] = deltas[t].abs().sum(dtype=torch.float64)
        kept[t] = (magnitude * masks[t]).sum(dtype=torch.float64)
    return tau, kept


def rescalers(tau: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """``λ_t = tau_t / kept_t`` (1 where the mask keeps nothing), float64."""
    return torch.where(kept > 0, tau / torch.where(kept > 0, kept, torch.ones_like(kept)), torch.ones_like(kept))


class EMR(DeploymentMethod):
    """EMR-Merging: a unified task vector with per-task bit masks and rescalers (a deployment)."""

    name = "emr"
    summary = ("EMR-Merging: elect a unified task vector, then per task a bit mask of agreeing entries and a "
               "rescaler; one model per task from a shared store")
    paper = ("Huang et al., EMR-Merging: Tuning-Free High-Performance Model Merging, NeurIPS 2024, "
             "https://arxiv.org/abs/2405.17461")
    Params = EMRParams
    min_experts = 1

    def __init__(self, params: Params | dict[str, Any] | None = None):
        """Create the method; ``rescale: model``/``model_mean`` need one pre-pass.

        Args:
            params: An ``EMRParams`` or a mapping validated against it.
        """
        super().__init__(params)
        scope = self.params.rescale
        self.prepasses = 0 if scope == "tensor" else 1
        # Elect and mask compare entries one by one; a per-tensor mean needs the whole tensor.
        self.elementwise = scope != "model_mean"
        self.scalar_scope = "tensor" if scope == "tensor" else "model"
        self.lambdas: torch.Tensor | None = None
        self.sums: dict[str, list[float]] = {}

    def observe(self, pass_index: int, group: TensorGroup) -> dict[str, torch.Tensor]:
        """``Σ|τ_t|`` and ``Σ|M_t ⊙ τ_uni|`` of this tensor (or block of rows), per task."""
        unified, masks = elect(group.deltas)
        tau, kept = magnitude_sums(group.deltas, unified, masks)
        if self.params.rescale == "model_mean":
            numel = max(1, group.base.numel())
            tau, kept = tau / numel, kept / numel
        return {"tau": tau, "kept": kept}

    def finish_pass(self, pass_index: int, totals: dict[str, torch.Tensor]) -> None:
        """The model-wide rescalers."""
        tau, kept = totals.get("tau"), totals.get("kept")
        if tau is None or kept is None:  # a model without floating tensors
            self.lambdas = None
            return
        self.lambdas = rescalers(tau.cpu(), kept.cpu())
        self.sums = {"abs_tau": tau.cpu().tolist(), "abs_masked_unified": kept.cpu().tolist()}

    def deploy_tensor(self, group: TensorGroup) -> MaskedTensor:
        """``τ_uni``, the masks and the rescalers of one tensor."""
        unified, masks = elect(group.deltas)
        if self.params.rescale == "tensor":
            scales = rescalers(*magnitude_sums(group.deltas, unified, masks))
        else:
            if self.lambdas is None:
                raise MethodStateError("emr: the rescalers come from the pre-pass, which did not run")
            scales = self.lambdas
        return MaskedTensor(unified, masks, scales)

    def deployment_info(self) -> dict[str, Any]:
        """Parameters, and the model-wide rescalers with the sums they come from."""
        info: dict[str, Any] = {"method": self.name, "params": self.params.model_dump(mode="json")}
        if self.lambdas is not None and self.params.rescale != "tensor":
            info["rescalers"] = [float(torch.tensor(v, dtype=torch.float32)) for v in self.lambdas.tolist()]
            info.update(self.sums)
        return info


@hookimpl
def hubmerge_register_methods(register):
    """Register EMR-Merging."""
    register(EMR)
