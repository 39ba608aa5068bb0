"""SE-Merging: self-enhanced dynamic merging — per-sample coefficients from representation distances.

Paper: Z. Chen, Z. Zhou, B. Zhang, W. Zhang, X. Sun and J. Yan, "SE-Merging: A Self-Enhanced
Approach for Dynamic Model Merging", 2025. https://arxiv.org/abs/2506.18135

The merged model distinguishes the tasks its samples come from, and for a sample of task ``i`` its
representation at a deep layer lies closest to expert ``i``'s (the paper's *representation
auto-adaptation*). SE-Merging uses that as a training-free router. For each sample ``x``:

1. run the task-arithmetic merge ``theta_0 + lambda * sum_k tau_k`` (``scale``, 0.3) and every expert
   ``theta_0 + tau_k`` up to the probe block ``probe_layer``;
2. ``d_k(x)`` = l2 distance between the merge's hidden states and expert ``k``'s (padding masked);
3. normalised similarity ``s_k = min_j d_j / d_k`` (1 for the nearest expert, in ``(0, 1]``);
4. ``w = softmax(s / temperature)``;
5. rescale task arithmetic's coefficients: ``lambda_k(x) = lambda * T * w_k`` (capped at
   ``max_coefficient``): equal distances give task arithmetic back, a clear winner gets most of the
   total ``lambda * T``;
6. run ``x`` through ``theta_0 + sum_k lambda_k(x) tau_k``.

The paper fixes the steps (l2 distance, normalised similarity, softmax, rescaled coefficients,
``lambda = 0.3``) but not the normalisation or a temperature; the choices above are ours:
``min_j d_j / d_k`` makes the similarity free of the representation's scale, ``temperature``
(0.1) sets how sharp the routing is, and ``max_coefficient`` (1.0: an expert's own fine-tune) keeps a
confident route from extrapolating past the expert. With one expert, ``lambda_1 = lambda``: the
expert's fine-tune scaled by ``lambda``.

The output is a **dynamic deployment** (:mod:`hubmerge.dynamic`): the base and the ``T`` task vectors
stored once, plus these parameters; load it with ``hubmerge.load_dynamic_model``. At inference it costs
``T + 1`` partial forward passes to the probe, then one forward pass per sample through its own merge.
"""

from __future__ import annotations

import torch
from pydantic import Field

from hubmerge.dynamic import DynamicMethod
from hubmerge.hookspecs import hookimpl
from hubmerge.method import Params


class SEParams(Params):
    """Parameters of SE-Merging."""

    scale: float = Field(0.3, allow_inf_nan=False,
                         description="Task arithmetic's lambda: the static merge probed, and the mean rescaled coefficient")
    probe_layer: int = Field(-1, description="Block whose output hidden states are compared (0-based; negative counts "
                                             "from the last block)")
    temperature: float = Field(0.1, gt=0, allow_inf_nan=False,
                               description="Softmax temperature over the normalised similarities (smaller: sharper)")
    max_coefficient: float | None = Field(1.0, gt=0, allow_inf_nan=False,
                                          description="Cap on a rescaled coefficient (1: an expert's own fine-tune); "
                                                      "null for none")


def normalised_similarity(distances: torch.Tensor) -> torch.Tensor:
    """``s_k = min_j d_j / d_k`` per sample (1 for the nearest expert; all 1 when every distance is 0).

    Args:
        distances: ``(B, T)``, non-negative.

    Returns:
        ``(B, T)`` in ``(0, 1]``.
    """
    distances = distances.double()
    nearest = distances.min(dim=1, keepdim=True).values
    tiny = torch.finfo(torch.float64).tiny
    return torch.where(distances > 0, nearest / distances.clamp_min(tiny), torch.ones_like(distances))


def rescaled_coefficients(distances: torch.Tensor, *, scale: float, temperature: float,
                          max_coefficient: float | None) -> torch.Tensor:
    """SE-Merging's per-sample coefficients ``lambda_k(x) = min(scale * T * softmax(s / temperature)_k, cap)``.

    Args:
        distances: ``(B, T)`` l2 distances to the experts' representations.
        scale: Task arithmetic's lambda.
        temperature: Softmax temperature.
        max_coefficient: Cap on a coefficient, or ``None``.

    Returns:
        ``(B, T)`` float32 coefficients.
    """
    count = distances.shape[1]
    weights = torch.softmax(normalised_similarity(distances) / temperature, dim=1)
    coefficients = scale * count * weights
    if max_coefficient is not None:
        coefficients = coefficients.clamp(max=max_coefficient)
    return coefficients.float()


class SEMerging(DynamicMethod):
    """SE-Merging: route each sample by representation distance, rescale task arithmetic's coefficients."""

    name = "se_merging"
    summary = ("SE-Merging: per-sample merging coefficients from the distances between the merged model's and "
               "each expert's representations at a probe layer (a dynamic deployment)")
    paper = ("Chen et al., SE-Merging: A Self-Enhanced Approach for Dynamic Model Merging, 2025, "
             "https://arxiv.org/abs/2506.18135")
    Params = SEParams
    min_experts = 1

    def probe_coefficients(self, count: int) -> torch.Tensor:
        """Task arithmetic: ``scale`` for every expert."""
        return torch.full((count,), float(self.params.scale))

    def coefficients(self, distances: torch.Tensor) -> torch.Tensor:
        """See :func:`rescaled_coefficients`."""
        return rescaled_coefficients(distances, scale=self.params.scale, temperature=self.params.temperature,
                                     max_coefficient=self.params.max_coefficient)


@hookimpl
def hubmerge_register_methods(register):
    """Register SE-Merging."""
    register(SEMerging)
