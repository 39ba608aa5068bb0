"""Consensus merging with TALL masks.

Paper: K. Wang, N. Dimitriadis, G. Ortiz-Jiménez, F. Fleuret and P. Frossard,
"Localizing Task Information for Improved Model Merging and Compression", ICML 2024.
https://arxiv.org/abs/2405.07813

Per tensor, with task vectors ``τ_1 .. τ_T``:

1. ``τ_MTL`` is the multi-task vector of the inner method (``task_arithmetic``:
   ``Σ_t τ_t``; ``ties``: its trimmed, sign-elected disjoint mean), *before* the inner
   method's ``scale``;
2. each task's TALL mask keeps the entries where the task vector carries more of the
   task than the multi-task vector misses of it:
   ``m_t = |τ_t| >= λ·|τ_MTL − τ_t|`` (``λ`` is ``tall_lambda``);
3. the consensus mask keeps the entries selected by at least ``k`` tasks' masks
   (``k = 2`` removes both "selfish" weights, useful to one task only, and "catastrophic"
   ones, useful to none; ``k = 1`` only the catastrophic ones; ``k = 0`` none);
4. ``θ = θ_0 + s·(consensus ⊙ τ_MTL)`` with ``s`` the inner method's ``scale``.

Choices:

* the comparison is ``>=`` as in the paper's definition (the reference code uses ``>``);
  the two differ only on exact ties, such as entries every task leaves at zero, where
  ``τ_MTL`` is zero anyway;
* ``τ_MTL`` is unscaled, as in the reference code, which builds the masks from
  ``Σ_t τ_t`` (or the TIES vector) and applies the scaling coefficient afterwards;
* the inner method is looked up through the plugin registry at run time and called on
  the same group with a zero base and ``scale = 1``, so ``merge_tensor`` returns
  ``τ_MTL`` itself. This relies on the inner method depending on the task vectors only,
  which holds for task arithmetic and TIES. Its pre-passes (TIES ``scope: global``) are
  forwarded: this method has as many pre-passes as the inner one, and is element-wise
  (row blocks allowed) exactly when the inner one is;
* the λ of the paper is chosen per task on validation data; this data-free method uses
  one ``tall_lambda`` for all tasks (default 0.4, the middle of the paper's grid
  0.2–0.6).

The mask computations (:func:`tall_masks`, :func:`consensus_mask`,
:func:`multitask_vector`) are plain functions, reused by the per-task TALL-mask deployment.

**TALL-mask deployment** (method ``tall``, the paper's Section 4 "compression" use): instead of
one merged model, one model per task ``θ_t = θ_0 + s·(m_t ⊙ τ_MTL)`` with the same ``τ_MTL``
and masks as above, written as a deployment (:mod:`hubmerge.deployment`): ``θ_0`` and ``τ_MTL``
stored once, one bit per entry and task. ``s`` is ``scale``, default 1 as in the reference
code, which evaluates TALL masks at scaling coefficient 1.0; the inner method's own ``scale``
does not apply (it is refused in ``inner_params``). ``tall_lambda`` may be one value or one per
task (``{task: λ}``, task = expert label), since the paper picks λ per task on validation data.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

import torch
from pydantic import Field, ValidationError, ValidationInfo, field_validator

from hubmerge.deployment import DeploymentMethod, MaskedTensor
from hubmerge.errors import MethodParamError
from hubmerge.hookspecs import hookimpl
from hubmerge.method import MergeMethod, Params, TensorGroup


def _inner_class(name: str) -> type[MergeMethod]:
    from hubmerge.plugins import get_method

    return get_method(name)


class ConsensusParams(Params):
    """Parameters of consensus merging."""

    k: int = Field(
        2,
        ge=0,
        description="Keep an entry when at least k tasks' TALL masks select it (2 removes selfish and "
        "catastrophic weights, 1 only catastrophic ones, 0 keeps everything).",
    )
    tall_lambda: float = Field(
        0.4,
        ge=0,
        allow_inf_nan=False,
        description="λ of the TALL masks m_t = |τ_t| >= λ·|τ_MTL − τ_t|; larger keeps fewer entries.",
    )
    inner: Literal["task_arithmetic", "ties"] = Field(
        "task_arithmetic", description="Method that builds the multi-task vector τ_MTL."
    )
    inner_params: dict[str, Any] = Field(
        default_factory=dict,
        description="Parameters of the inner method (e.g. {scale: 0.3} or {k: 0.2, scale: 1.0}); its scale "
        "multiplies the masked multi-task vector.",
    )

    @field_validator("inner_params")
    @classmethod
    def _check_inner_params(cls, value: dict[str, Any], info: ValidationInfo) -> dict[str, Any]:
        return _validate_inner_params(value, info.data.get("inner"))


def _validate_inner_params(value: dict[str, Any], inner: str | None) -> dict[str, Any]:
    """Check ``inner_params`` against the inner method's ``Params`` (which must have ``scale``)."""
    if inner is None:  # the inner name itself was invalid; that error is reported
        return value
    try:
        inner_cls = _inner_class(inner)
    except KeyError as exc:  # UnknownMethodError: the plugin is not installed
        raise ValueError(f"inner method {inner!r} is not available: {exc}") from None
    if "scale" not in inner_cls.Params.model_fields:
        raise ValueError(f"inner method {inner!r} has no `scale` parameter")
    try:
        inner_cls.Params.model_validate(value)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or inner}: {err['msg']}" for err in exc.errors()
        )
        raise ValueError(f"{inner} parameter {problems}") from None
    return value


def multitask_vector(inner: MergeMethod, group: TensorGroup) -> torch.Tensor:
    """``τ_MTL`` of one tensor: what ``inner`` adds to a zero base.

    Args:
        inner: The inner method, built with ``scale = 1``.
        group: The tensor group.

    Returns:
        The multi-task vector, shape ``group.base.shape``.
    """
    return inner.merge_tensor(_zero_base(group))


def tall_masks(deltas: torch.Tensor, mtl: torch.Tensor, tall_lambda: float | torch.Tensor) -> torch.Tensor:
    """TALL masks ``m_t = |τ_t| >= λ·|τ_MTL − τ_t|`` of every task.

    Args:
        deltas: Task vectors, shape ``(T, *shape)``.
        mtl: The multi-task vector, shape ``shape``.
        tall_lambda: ``λ``, or one per task as a tensor of shape ``(T, 1, ..., 1)``.

    Returns:
        Boolean masks, shape ``(T, *shape)``.
    """
    return deltas.abs() >= tall_lambda * (mtl.unsqueeze(0) - deltas).abs()


def consensus_mask(masks: torch.Tensor, k: int) -> torch.Tensor:
    """Entries selected by at least ``k`` of the masks.

    Args:
        masks: Boolean masks, shape ``(T, *shape)``.
        k: Minimum number of agreeing tasks.

    Returns:
        A boolean mask, shape ``shape``.
    """
    return masks.sum(dim=0) >= k


def _zero_base(group: TensorGroup) -> TensorGroup:
    return dataclasses.replace(group, base=torch.zeros_like(group.base))


class Consensus(MergeMethod):
    """Consensus merging: the inner multi-task vector restricted to entries ≥ k TALL masks agree on."""

    name = "consensus"
    summary = "Consensus merging: keep the multi-task vector where at least k tasks' TALL masks agree"
    paper = (
        "Wang et al., Localizing Task Information for Improved Model Merging and Compression, "
        "ICML 2024, https://arxiv.org/abs/2405.07813"
    )
    Params = ConsensusParams

    def __init__(self, params: Params | dict[str, Any] | None = None):
        """Create the method and its inner method (looked up in the plugin registry).

        Args:
            params: A ``ConsensusParams`` or a mapping validated against it.

        Raises:
            pydantic.ValidationError: If the parameters (including ``inner_params``) do not fit.
        """
        super().__init__(params)
        inner_cls = _inner_class(self.params.inner)
        inner_params = inner_cls.Params.model_validate(self.params.inner_params)
        self.inner_scale = float(inner_params.scale)
        self.inner = inner_cls(inner_params.model_copy(update={"scale": 1.0}))
        self.prepasses = self.inner.prepasses
        # The masks compare entries one by one: blocks of rows are fine when τ_MTL's are.
        self.elementwise = self.inner.elementwise

    def check_experts(self, count: int) -> None:
        """Refuse what this method or the inner method cannot merge (e.g. ``weights`` of another length).

        Args:
            count: Number of experts in the recipe.

        Raises:
            MethodInputError: If either method refuses ``count`` experts.
        """
        super().check_experts(count)
        self.inner.check_experts(count)

    def check_dtype(self, dtype: torch.dtype) -> None:
        """Refuse a compute dtype this method or the inner method cannot use.

        Args:
            dtype: The recipe's compute dtype.

        Raises:
            MethodInputError: If either method refuses ``dtype``.
        """
        super().check_dtype(dtype)
        self.inner.check_dtype(dtype)

    def observe(self, pass_index: int, group: TensorGroup) -> dict[str, torch.Tensor]:
        """Forward the inner method's pre-pass (same group, zero base)."""
        return self.inner.observe(pass_index, _zero_base(group))

    def finish_pass(self, pass_index: int, totals: dict[str, torch.Tensor]) -> None:
        """Forward the inner method's pre-pass totals."""
        self.inner.finish_pass(pass_index, totals)

    def merge_tensor(self, group: TensorGroup) -> torch.Tensor:
        """Merge one tensor: ``θ_0 + scale·(consensus ⊙ τ_MTL)``.

        Args:
            group: The base weight and the experts' task vectors.

        Returns:
            The merged weight in the compute dtype.
        """
        mtl = multitask_vector(self.inner, group)
        keep = consensus_mask(tall_masks(group.deltas, mtl, self.params.tall_lambda), self.params.k)
        return group.base + self.inner_scale * torch.where(keep, mtl, torch.zeros_like(mtl))


class TallParams(Params):
    """Parameters of the TALL-mask deployment."""

    tall_lambda: float | dict[str, float] = Field(
        0.4,
        description="λ of the TALL masks m_t = |τ_t| >= λ·|τ_MTL − τ_t| (larger keeps fewer entries): one value, "
        "or one per task as {task: λ} (task = the expert's label).",
    )
    inner: Literal["task_arithmetic", "ties"] = Field(
        "task_arithmetic", description="Method that builds the multi-task vector τ_MTL (applied unscaled)."
    )
    inner_params: dict[str, Any] = Field(
        default_factory=dict,
        description="Parameters of the inner method except `scale` (e.g. {k: 0.2} for ties); τ_MTL is built "
        "with scale 1.",
    )
    scale: float = Field(
        1.0, allow_inf_nan=False,
        description="s in θ_t = θ_0 + s·(m_t ⊙ τ_MTL); 1 as the reference code evaluates TALL masks.",
    )

    @field_validator("tall_lambda")
    @classmethod
    def _check_lambda(cls, value: float | dict[str, float]) -> float | dict[str, float]:
        values = value.values() if isinstance(value, dict) else [value]
        if isinstance(value, dict) and not value:
            raise ValueError("give one λ, or one per task")
        for v in values:
            if not (v >= 0 and v != float("inf")):
                raise ValueError(f"λ must be finite and >= 0, got {v}")
        return value

    @field_validator("inner_params")
    @classmethod
    def _check_inner_params(cls, value: dict[str, Any], info: ValidationInfo) -> dict[str, Any]:
        if "scale" in value:
            raise ValueError("the TALL deployment builds τ_MTL unscaled and applies its own `scale` "
                             "(params.scale); remove `scale` from inner_params")
        return _validate_inner_params(value, info.data.get("inner"))


class TallMasks(DeploymentMethod):
    """Per-task TALL masks over the inner method's multi-task vector: one model per task (a deployment)."""

    name = "tall"
    summary = ("TALL masks: per task, the multi-task vector restricted to the entries carrying that task; one "
               "model per task from a shared store")
    paper = Consensus.paper
    Params = TallParams

    def __init__(self, params: Params | dict[str, Any] | None = None):
        """Create the method and its inner method (with ``scale = 1``).

        Args:
            params: A ``TallParams`` or a mapping validated against it.
        """
        super().__init__(params)
        inner_cls = _inner_class(self.params.inner)
        inner_params = inner_cls.Params.model_validate({**self.params.inner_params, "scale": 1.0})
        self.inner = inner_cls(inner_params)
        self.prepasses = self.inner.prepasses
        self.elementwise = self.inner.elementwise

    def check_experts(self, count: int) -> None:
        """Refuse what this method or the inner method cannot merge."""
        super().check_experts(count)
        self.inner.check_experts(count)

    def check_dtype(self, dtype: torch.dtype) -> None:
        """Refuse a compute dtype this method or the inner method cannot use."""
        super().check_dtype(dtype)
        self.inner.check_dtype(dtype)

    def check_tasks(self, tasks: list[str]) -> None:
        """A per-task ``tall_lambda`` must name exactly the experts' labels.

        Raises:
            MethodParamError: Naming ``tall_lambda``.
        """
        lam = self.params.tall_lambda
        if isinstance(lam, dict):
            missing = [t for t in tasks if t not in lam]
            unknown = [t for t in lam if t not in tasks]
            if missing or unknown:
                raise MethodParamError(
                    "one λ per task must name every task exactly"
                    + (f"; missing {missing}" if missing else "") + (f"; unknown {unknown}" if unknown else "")
                    + f" (tasks: {tasks})", field="tall_lambda")

    def observe(self, pass_index: int, group: TensorGroup) -> dict[str, torch.Tensor]:
        """Forward the inner method's pre-pass (same group, zero base)."""
        return self.inner.observe(pass_index, _zero_base(group))

    def finish_pass(self, pass_index: int, totals: dict[str, torch.Tensor]) -> None:
        """Forward the inner method's pre-pass totals."""
        self.inner.finish_pass(pass_index, totals)

    def lambdas(self, group: TensorGroup) -> float | torch.Tensor:
        """``tall_lambda`` for this group's tasks: a float, or ``(T, 1, ..., 1)``."""
        lam = self.params.tall_lambda
        if not isinstance(lam, dict):
            return float(lam)
        values = torch.tensor([lam[t] for t in group.experts], dtype=group.deltas.dtype, device=group.deltas.device)
        return values.reshape(-1, *([1] * group.base.dim()))

    def deploy_tensor(self, group: TensorGroup) -> MaskedTensor:
        """``τ_MTL`` and every task's TALL mask of one tensor."""
        mtl = multitask_vector(self.inner, group)
        masks = tall_masks(group.deltas, mtl, self.lambdas(group))
        scale = float(self.params.scale)
        return MaskedTensor(mtl, masks, None if scale == 1.0 else [scale] * group.deltas.shape[0])

    def deployment_info(self) -> dict[str, Any]:
        """Parameters (the inner method and λ)."""
        params = self.params.model_dump(mode="json")
        return {"method": self.name, "params": params, "inner": self.params.inner,
                "inner_params": self.inner.params.model_dump(mode="json")}


@hookimpl
def hubmerge_register_methods(register):
    """Register consensus merging and the TALL-mask deployment."""
    register(Consensus)
    register(TallMasks)
