"""``linear``: weighted mean of the experts' weights ("model soup").

Wortsman et al., "Model soups: averaging weights of multiple fine-tuned models improves
accuracy without increasing inference time", ICML 2022, https://arxiv.org/abs/2203.05482.

``theta = sum_k w_k theta_k / sum_k w_k`` (``normalize: true``) or ``sum_k w_k theta_k``
(``normalize: false``). Computed as ``c*theta_0 + sum_k w_k' tau_k`` so that the experts' full
weights are never materialised.
"""

from __future__ import annotations

import math

import torch
from pydantic import Field, field_validator, model_validator

from hubmerge import method
from hubmerge.hookspecs import hookimpl
from hubmerge.method import MergeMethod, TensorGroup

from ._weights import expert_weights, weighted_sum


class Params(method.Params):
    """Parameters of ``linear``."""

    weights: list[float] | None = Field(
        None,
        min_length=1,
        description="One weight per expert, in recipe order. Default: equal weights 1/T (the plain mean).",
    )
    normalize: bool = Field(True, description="Divide by the sum of the weights (a weighted mean).")

    @field_validator("weights")
    @classmethod
    def _finite(cls, value: list[float] | None) -> list[float] | None:
        if value is not None and not all(math.isfinite(w) for w in value):
            raise ValueError("weights must be finite numbers")
        return value

    @model_validator(mode="after")
    def _normalizable(self) -> Params:
        if self.normalize and self.weights is not None and abs(math.fsum(self.weights)) < 1e-12:
            raise ValueError("weights sum to 0 and cannot be normalized (set normalize: false)")
        return self


class Linear(MergeMethod):
    """Weighted average of the experts' weights."""

    name = "linear"
    summary = "Weighted mean of the experts' weights (model soup)."
    paper = "Wortsman et al., Model soups, ICML 2022, https://arxiv.org/abs/2203.05482"
    Params = Params
    min_experts = 1
    elementwise = True  # every entry is merged on its own

    def __init__(self, params=None):
        super().__init__(params)
        # Experts equal to the base average to the base when the weights are normalized.
        weights = self.params.weights
        self.unchanged_when_zero = self.params.normalize or (weights is not None and math.fsum(weights) == 1.0)

    def check_experts(self, count: int) -> None:
        """Refuse a wrong number of experts or a ``weights`` list of another length.

        Raises:
            MethodInputError: Too few experts; ``MethodParamError`` naming ``weights``.
        """
        super().check_experts(count)
        expert_weights(self.params.weights, count)

    def merge_tensor(self, group: TensorGroup) -> torch.Tensor:
        """Return ``sum_k w_k theta_k`` (divided by ``sum_k w_k`` when normalizing)."""
        count = group.deltas.shape[0]
        weights = expert_weights(self.params.weights, count, default=1.0 / count)
        total = math.fsum(weights)
        if self.params.normalize:
            weights = [w / total for w in weights]
            base_factor = 1.0
        else:
            base_factor = total
        merged = weighted_sum(group.deltas, weights)
        return merged.add_(group.base, alpha=base_factor)


@hookimpl
def hubmerge_register_methods(register):
    """Register :class:`Linear`."""
    register(Linear)
