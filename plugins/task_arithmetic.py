"""``task_arithmetic``: add the scaled sum of the task vectors to the base.

Ilharco et al., "Editing Models with Task Arithmetic", ICLR 2023,
https://arxiv.org/abs/2212.04089.

``theta = theta_0 + scale * sum_k w_k tau_k`` with ``tau_k = theta_k - theta_0`` and ``w_k = 1``
unless per-expert ``weights`` are given. A negative ``scale`` (or weight) negates a task.
"""

from __future__ import annotations

import torch
from pydantic import Field

from hubmerge import method
from hubmerge.hookspecs import hookimpl
from hubmerge.method import MergeMethod, TensorGroup

from ._weights import expert_weights, weighted_sum


class Params(method.Params):
    """Parameters of ``task_arithmetic``."""

    scale: float = Field(
        0.3, allow_inf_nan=False,
        description="Scaling coefficient lambda applied to the sum of the task vectors "
        "(negative: task negation).",
    )
    weights: list[float] | None = Field(
        None, min_length=1,
        description="Optional per-expert weights w_k (recipe order) applied before summing. Default: all 1.",
    )


class TaskArithmetic(MergeMethod):
    """theta_0 + scale * sum of the task vectors."""

    name = "task_arithmetic"
    summary = "Add the scaled sum of the experts' task vectors to the base."
    paper = "Ilharco et al., Editing Models with Task Arithmetic, ICLR 2023, https://arxiv.org/abs/2212.04089"
    Params = Params
    min_experts = 1
    elementwise = True  # every entry is merged on its own
    unchanged_when_zero = True  # zero task vectors merge to the base

    def check_experts(self, count: int) -> None:
        """Refuse a wrong number of experts or a ``weights`` list of another length."""
        super().check_experts(count)
        expert_weights(self.params.weights, count)

    def merge_tensor(self, group: TensorGroup) -> torch.Tensor:
        """Return ``theta_0 + scale * sum_k w_k tau_k``."""
        weights = expert_weights(self.params.weights, group.deltas.shape[0])
        scale = self.params.scale
        merged = weighted_sum(group.deltas, [scale * w for w in weights])
        return merged.add_(group.base)


@hookimpl
def hubmerge_register_methods(register):
    """Register :class:`TaskArithmetic`."""
    register(TaskArithmetic)
