"""WUDI-Merging: data-free merging that lets the task vectors remove their own interference.

Paper: R. Cheng, F. Xiong, Y. Wei, W. Zhu and C. Yuan, "Whoever Started the Interference
Should End It: Guiding Data-Free Model Merging via Task Vectors", ICML 2025.
https://arxiv.org/abs/2503.08099 (code: github.com/nathanielyvo/WUDI-Merging)

A linear layer's task vector approximately spans the inputs the layer saw during
fine-tuning, so the interference ``E‖(τ_m − τ_t) x‖²`` on task ``t``'s inputs is bounded by
``‖(τ_m − τ_t) τ_tᵀ‖²_F`` (plus a ridge term). Per linear weight, WUDI solves

    min_{τ_m}  Σ_t w_t ‖(τ_m − τ_t) τ_tᵀ‖²_F,      w_t = 1 / ‖τ_t‖²_F   (eq. 21)

with Adam (``lr`` 1e-5, ``steps`` 300) from ``τ_m = Σ_t τ_t``, and ``θ = θ_0 + τ_m``.

**Gram form.** With ``G_t = τ_tᵀ τ_t``, ``S = Σ_t w_t G_t`` and ``C = Σ_t w_t τ_t G_t``
(computed once per layer), the gradient is ``∇ = 2 (τ_m S − C)``: ``m·n²`` multiply-adds
per step, where autograd through the T-term loss spends ``2·T·m²·n`` (T forward and T
backward products) plus ``(T, m, m)`` temporaries — 16x fewer for a 768x768 layer and 8
tasks, 64x for 3072x768. When the layer is very wide (``2·T·m < n``), ``τ_m S`` is computed
as ``(τ_m Xᵀ) X`` with ``X = [√w_t τ_t]_t`` instead, which then costs less. Adam is the
``torch.optim.Adam`` update (betas 0.9/0.999, eps 1e-8, no weight decay) written out on
tensors, so it runs in any autograd mode. With a single task the start ``τ_t`` is the exact
optimum (zero loss) and is returned as is: Adam would only amplify rounding noise there.

**Closed form (CFS)**, ``closed_form: true`` (eq. 20/71-82): with the ridge term
``ω ‖τ_m − τ_t‖²_F`` added to each task's term the optimum solves
``τ_m A = B`` with ``A = Σ_t w_t (G_t + ωI)`` and ``B = Σ_t w_t τ_t (G_t + ωI)``; it is
solved with ``torch.linalg.solve`` (never an explicit inverse). The paper's ω is
absolute, which makes a default depend on the weights' scale; here
``ω = omega × mean_t ‖τ_t‖²_F / min(m, n)`` (the tasks' mean squared singular value), so
one ``omega`` fits any layer. The paper finds CFS sensitive to ω and weaker than Adam.

**Orientation.** The objective is written for a PyTorch ``nn.Linear`` weight
(``out x in``, ``y = W x``): the rows of ``τ_t`` span input space, and ``G_t`` is
``in x in``. The reference code (``torch.matmul(τ_m − τ_t, τ_t.transpose(1, 2))`` on
state-dict tensors) uses the same convention. Weights stored ``in x out`` (transformers'
``Conv1D`` in GPT-2) need ``fan_in_fan_out: true`` (PEFT's name for it), which transposes
them around the solve.

**Non-linear tensors.** The paper applies WUDI to linear layers only and leaves every
other tensor at the base (its Algorithm 1 assembles ``τ_m`` from linear layers; the
official vision script merges only attention and MLP weights). FusionBench's
implementation instead averages every non-2-D tensor. ``nonlinear`` chooses: ``base``
(the paper; default), ``mean`` or ``sum`` of the task vectors. Tensors that are not 2-D,
and 2-D tensors matching a pattern of ``exclude`` (token and position embeddings by
default: their "input" is a one-hot, and their Gram would be vocabulary-sized), follow
``nonlinear``.

Other choices: a task whose task vector is zero on a layer (an adapter that does not
target it) has no interference to end there and is left out of that layer's objective
(``w_t = 0``, also avoiding ``1/0``); explicit ``weights`` multiply ``w_t`` and a task
weighted 0 is left out of the start point as well; ``balance: false`` drops the
``1/‖τ_t‖²`` factor (the paper's "w/o balance" ablation); ``scale`` multiplies ``τ_m``
(the paper's rescaling coefficient, 1.0). The solve runs in float32 (float64 when the
compute dtype is float64): updates of 1e-5 vanish in bfloat16.
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Callable, Sequence
from typing import Literal

import torch
from pydantic import Field, field_validator

from hubmerge.errors import MethodInputError
from hubmerge.hookspecs import hookimpl
from hubmerge.method import MergeMethod, Params, TensorGroup

DEFAULT_EXCLUDE = ("*embed*", "*wte.weight", "*wpe.weight", "shared.weight", "*.shared.weight")
ADAM_BETAS = (0.9, 0.999)
ADAM_EPS = 1e-8


class WUDIParams(Params):
    """Parameters of WUDI-Merging."""

    steps: int = Field(
        300, ge=0, le=1_000_000, description="Adam steps per linear layer (the paper uses 300)."
    )
    lr: float = Field(
        1e-5, gt=0, allow_inf_nan=False, description="Adam learning rate (the paper uses 1e-5)."
    )
    closed_form: bool = Field(
        False, description="Solve the ridge-regularised objective in closed form (WUDI-CFS) instead of Adam."
    )
    omega: float = Field(
        1e-2,
        ge=0,
        allow_inf_nan=False,
        description="Closed form only: ridge ω relative to the tasks' mean squared singular value "
        "(ω = omega · mean‖τ_t‖²_F / min(m, n)); 0 needs a full-rank system.",
    )
    balance: bool = Field(True, description="Weight each task's term by 1/‖τ_t‖²_F, as the paper does.")
    weights: list[float] | None = Field(
        None,
        description="Optional per-expert multipliers of the tasks' terms, in expert order (default all 1).",
    )
    scale: float = Field(
        1.0,
        allow_inf_nan=False,
        description="Rescaling coefficient: θ = θ_0 + scale·τ_m (the paper uses 1.0).",
    )
    nonlinear: Literal["base", "mean", "sum"] = Field(
        "base",
        description="Tensors that are not linear weights (1-D, >2-D, excluded 2-D): keep the base "
        "(the paper), or add the mean or the sum of the task vectors.",
    )
    exclude: list[str] = Field(
        default_factory=lambda: list(DEFAULT_EXCLUDE),
        description="Glob patterns of 2-D tensor names that are not linear layers (embeddings); they follow "
        "`nonlinear`.",
    )
    fan_in_fan_out: bool = Field(
        False,
        description="2-D weights are stored (in, out), as transformers' Conv1D in GPT-2; transpose them.",
    )

    @field_validator("weights")
    @classmethod
    def _check_weights(cls, value: list[float] | None) -> list[float] | None:
        if value is not None:
            if not value:
                raise ValueError("must list one weight per expert")
            if any(not math.isfinite(w) or w < 0 for w in value):
                raise ValueError("weights must be finite and >= 0")
            if not any(w > 0 for w in value):
                raise ValueError("at least one weight must be > 0")
        return value


def _work_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def task_weights(
    deltas: torch.Tensor, weights: Sequence[float] | None = None, balance: bool = True
) -> torch.Tensor:
    """The loss weights ``w_t`` of one layer: ``weights_t / ‖τ_t‖²_F`` (0 for a zero task vector).

    Args:
        deltas: Task vectors, shape ``(T, ...)``.
        weights: Per-task multipliers (default all 1).
        balance: Divide by ``‖τ_t‖²_F``.

    Returns:
        A tensor of shape ``(T,)`` in the dtype of ``deltas``.
    """
    sq_norms = deltas.reshape(deltas.shape[0], -1).square().sum(dim=1)
    if weights is None:
        w = torch.ones_like(sq_norms)
    else:
        w = torch.tensor(weights, dtype=deltas.dtype, device=deltas.device)
    nonzero = sq_norms > 0
    if balance:
        w = w / torch.where(nonzero, sq_norms, torch.ones_like(sq_norms))
    return torch.where(nonzero, w, torch.zeros_like(w))


class GramObjective:
    """``Σ_t w_t ‖(τ_m − τ_t) τ_tᵀ‖²_F`` of one ``m x n`` layer, through precomputed Grams.

    Attributes:
        S: ``Σ_t w_t τ_tᵀ τ_t`` (``n x n``), or ``None`` when the factored form is used.
        C: ``Σ_t w_t τ_t τ_tᵀ τ_t`` (``m x n``).
        X: ``[√w_t τ_t]_t`` stacked (``Tm x n``) when the layer is so wide that
            ``(τ_m Xᵀ) X`` is cheaper than ``τ_m S``; else ``None``.
    """

    def __init__(self, deltas: torch.Tensor, weights: torch.Tensor, factored: bool | None = None):
        """Precompute the Gram terms.

        Args:
            deltas: Task vectors ``(T, m, n)`` in a float32/float64 dtype.
            weights: ``w_t``, shape ``(T,)``.
            factored: Force (``True``) or forbid (``False``) the factored product; by
                default it is used when ``2·T·m < n``.
        """
        tasks, m, n = deltas.shape
        active = [t for t in range(tasks) if weights[t] > 0]
        if factored is None:
            factored = 2 * len(active) * m < n
        self.C = torch.zeros((m, n), dtype=deltas.dtype, device=deltas.device)
        self.S = None if factored else torch.zeros((n, n), dtype=deltas.dtype, device=deltas.device)
        self.X = None
        for t in active:
            delta, weight = deltas[t], float(weights[t])
            wide = 2 * m < n  # then C_t = (τ_t τ_tᵀ) τ_t is cheaper than τ_t (τ_tᵀ τ_t)
            gram = delta.T @ delta if (self.S is not None or not wide) else None
            if self.S is not None:
                self.S.add_(gram, alpha=weight)
            if wide:
                self.C.addmm_(delta @ delta.T, delta, alpha=weight)
            else:
                self.C.addmm_(delta, gram, alpha=weight)
        if factored:
            index = torch.tensor(active, dtype=torch.long, device=deltas.device)
            roots = weights[index].sqrt().reshape(-1, 1, 1)
            self.X = (deltas[index] * roots).reshape(-1, n)

    def product(self, tau_m: torch.Tensor) -> torch.Tensor:
        """``τ_m S`` (``m x n``)."""
        if self.X is not None:
            return (tau_m @ self.X.T) @ self.X
        return tau_m @ self.S

    def gradient(self, tau_m: torch.Tensor) -> torch.Tensor:
        """``∇ = 2 (τ_m S − C)`` of the objective at ``tau_m``."""
        return (self.product(tau_m) - self.C).mul_(2.0)


def adam(
    start: torch.Tensor, gradient: Callable[[torch.Tensor], torch.Tensor], steps: int, lr: float
) -> torch.Tensor:
    """Run Adam (``torch.optim.Adam`` defaults: betas 0.9/0.999, eps 1e-8) on one tensor.

    Args:
        start: The starting point (not modified).
        gradient: Returns the gradient at a point.
        steps: Number of updates.
        lr: Learning rate.

    Returns:
        The point after ``steps`` updates.
    """
    beta1, beta2 = ADAM_BETAS
    param = start.clone()
    exp_avg = torch.zeros_like(param)
    exp_avg_sq = torch.zeros_like(param)
    for step in range(1, steps + 1):
        grad = gradient(param)
        exp_avg.lerp_(grad, 1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        bias_correction1 = 1 - beta1**step
        bias_correction2_sqrt = math.sqrt(1 - beta2**step)
        denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(ADAM_EPS)
        param.addcdiv_(exp_avg, denom, value=-lr / bias_correction1)
    return param


def wudi_adam(deltas: torch.Tensor, *, steps: int = 300, lr: float = 1e-5,
              weights: Sequence[float] | None = None, balance: bool = True) -> torch.Tensor:
    """WUDI's merged task vector of one linear layer, by Adam on the Gram-form gradient.

    Args:
        deltas: Task vectors ``(T, m, n)`` (``out x in``), float32 or float64.
        steps: Adam steps.
        lr: Adam learning rate.
        weights: Per-task multipliers of the loss terms.
        balance: Weight the terms by ``1/‖τ_t‖²_F``.

    Returns:
        ``τ_m``, shape ``(m, n)``.
    """
    w = task_weights(deltas, weights, balance)
    start = deltas[w > 0].sum(dim=0)
    if steps == 0 or int((w > 0).sum()) <= 1:
        # One task: the start is the exact optimum (zero loss); Adam would only amplify rounding noise.
        return start
    objective = GramObjective(deltas, w)
    return adam(start, objective.gradient, steps, lr)


def wudi_closed_form(deltas: torch.Tensor, *, omega: float = 1e-2,
                     weights: Sequence[float] | None = None, balance: bool = True,
                     name: str = "tensor") -> torch.Tensor:
    """WUDI-CFS of one linear layer: solve ``τ_m A = B`` (see the module docstring).

    Args:
        deltas: Task vectors ``(T, m, n)`` (``out x in``), float32 or float64.
        omega: Ridge coefficient relative to the tasks' mean squared singular value.
        weights: Per-task multipliers of the loss terms.
        balance: Weight the terms by ``1/‖τ_t‖²_F``.
        name: Tensor name for error messages.

    Returns:
        ``τ_m``, shape ``(m, n)``.

    Raises:
        MethodInputError: If ``A`` is singular (``omega`` 0 and rank-deficient task vectors).
    """
    _, m, n = deltas.shape
    w = task_weights(deltas, weights, balance)
    active = w > 0
    if not bool(active.any()):
        return torch.zeros((m, n), dtype=deltas.dtype, device=deltas.device)
    sq_norms = deltas[active].reshape(int(active.sum()), -1).square().sum(dim=1)
    ridge = omega * float(sq_norms.mean()) / min(m, n)
    objective = GramObjective(deltas, w, factored=False)
    a = objective.S
    a.diagonal().add_(ridge * float(w.sum()))
    b = objective.C.add_(torch.einsum("t,tmn->mn", w, deltas), alpha=ridge)
    try:
        return torch.linalg.solve(a, b, left=False)
    except torch.linalg.LinAlgError:
        raise MethodInputError(
            f"wudi closed form: the system of {name!r} is singular; set params.omega > 0"
        ) from None


class WUDI(MergeMethod):
    """WUDI-Merging: per linear layer, minimise the task vectors' own interference bound."""

    name = "wudi"
    summary = "WUDI-Merging: data-free least squares on linear layers, guided by the task vectors"
    paper = (
        "Cheng et al., Whoever Started the Interference Should End It: Guiding Data-Free Model Merging "
        "via Task Vectors, ICML 2025, https://arxiv.org/abs/2503.08099"
    )
    Params = WUDIParams

    def check_experts(self, count: int) -> None:
        """Refuse a ``weights`` list whose length is not the number of experts.

        Args:
            count: Number of experts in the recipe.

        Raises:
            MethodInputError: If the count is out of bounds or ``weights`` does not match it.
        """
        super().check_experts(count)
        if self.params.weights is not None and len(self.params.weights) != count:
            raise MethodInputError(
                f"params.weights lists {len(self.params.weights)} weights but there are {count} experts"
            )

    def is_linear(self, name: str, shape: Sequence[int]) -> bool:
        """Whether a tensor is treated as a linear weight (2-D and not excluded)."""
        return len(shape) == 2 and not any(fnmatch.fnmatchcase(name, p) for p in self.params.exclude)

    def merge_tensor(self, group: TensorGroup) -> torch.Tensor:
        """Merge one tensor: WUDI on linear weights, ``nonlinear`` on the others.

        Args:
            group: The base weight and the experts' task vectors.

        Returns:
            ``θ_0 + scale·τ_m`` in the compute dtype.

        Raises:
            MethodInputError: If ``weights`` does not match the number of experts, or the
                closed form's system is singular.
        """
        p = self.params
        deltas = group.deltas
        if p.weights is not None and len(p.weights) != deltas.shape[0]:
            raise MethodInputError(
                f"params.weights lists {len(p.weights)} weights but there are {deltas.shape[0]} experts"
            )
        if not self.is_linear(group.name, group.base.shape) or group.base.numel() == 0:
            if p.nonlinear == "base":
                return group.base.clone()
            merged = deltas.mean(dim=0) if p.nonlinear == "mean" else deltas.sum(dim=0)
            return group.base + p.scale * merged
        work = deltas.to(_work_dtype(deltas.dtype))
        if p.fan_in_fan_out:
            work = work.transpose(1, 2).contiguous()
        if p.closed_form:
            merged = wudi_closed_form(
                work, omega=p.omega, weights=p.weights, balance=p.balance, name=group.name
            )
        else:
            merged = wudi_adam(work, steps=p.steps, lr=p.lr, weights=p.weights, balance=p.balance)
        if p.fan_in_fan_out:
            merged = merged.T
        return group.base + (p.scale * merged).to(group.base.dtype)


@hookimpl
def hubmerge_register_methods(register):
    """Register WUDI-Merging."""
    register(WUDI)

