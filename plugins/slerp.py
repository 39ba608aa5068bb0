"""``slerp``: spherical linear interpolation between two experts' weights.

Shoemake, "Animating rotation with quaternion curves", SIGGRAPH 1985; applied to model weights
as in mergekit (Goddard et al., "Arcee's MergeKit", 2024, https://arxiv.org/abs/2403.13257).

Per tensor, with ``a = theta_1`` and ``b = theta_2`` flattened::

    cos(rho) = <a, b> / (|a| |b|)
    theta    = sin((1 - t) rho) / sin(rho) * a  +  sin(t rho) / sin(rho) * b

Fallbacks to plain linear interpolation ``(1 - t) a + t b``:

* nearly colinear vectors, ``|cos(rho)| > 1 - COLINEAR_EPS`` (``COLINEAR_EPS = 5e-4``, mergekit's
  ``DOT_THRESHOLD = 0.9995``), where ``sin(rho)`` is too small to divide by; this includes
  anti-parallel vectors;
* a zero (or near-zero, ``|v| <= NORM_EPS = 1e-8``) tensor, whose direction is undefined.

The dot product and norms are accumulated in float64 whatever the compute dtype; the result is in
the compute dtype. ``t = 0`` and ``t = 1`` return the first and second expert's weights exactly.
"""

from __future__ import annotations

import math

import torch
from pydantic import Field

from hubmerge import method
from hubmerge.errors import MethodInputError
from hubmerge.hookspecs import hookimpl
from hubmerge.method import MergeMethod, TensorGroup

COLINEAR_EPS = 5e-4
NORM_EPS = 1e-8
_CHUNK = 1 << 20  # entries per chunk of the element-wise passes (a few MB: stays in cache)


class Params(method.Params):
    """Parameters of ``slerp``."""

    t: float = Field(
        0.5, ge=0.0, le=1.0,
        description="Interpolation factor: 0 gives the first expert, 1 the second.",
    )


def slerp_coefficients(dot: float, norm_a: float, norm_b: float, t: float) -> tuple[float, float]:
    """Coefficients ``(s_a, s_b)`` of ``s_a * a + s_b * b``, with the linear fallbacks.

    Args:
        dot: ``<a, b>``.
        norm_a: ``|a|``.
        norm_b: ``|b|``.
        t: Interpolation factor.

    Returns:
        The two coefficients.
    """
    if norm_a <= NORM_EPS or norm_b <= NORM_EPS:
        return 1.0 - t, t
    cos = max(-1.0, min(1.0, dot / (norm_a * norm_b)))
    if abs(cos) > 1.0 - COLINEAR_EPS:
        return 1.0 - t, t
    rho = math.acos(cos)
    sin_rho = math.sin(rho)
    return math.sin((1.0 - t) * rho) / sin_rho, math.sin(t * rho) / sin_rho


class Slerp(MergeMethod):
    """Spherical interpolation of exactly two experts."""

    name = "slerp"
    summary = "Spherical linear interpolation between two experts' weights."
    paper = "Shoemake, Animating rotation with quaternion curves, SIGGRAPH 1985; as in mergekit, " \
            "https://arxiv.org/abs/2403.13257"
    Params = Params
    min_experts = 2
    max_experts = 2

    def __init__(self, params=None):
        super().__init__(params)
        self._scratch: torch.Tensor | None = None  # float64, reused from tensor to tensor

    def merge_tensor(self, group: TensorGroup) -> torch.Tensor:
        """Return the spherical interpolation of ``theta_1`` and ``theta_2`` at ``t``.

        Raises:
            MethodInputError: If the group does not hold exactly two experts.
        """
        if group.deltas.shape[0] != 2:
            raise MethodInputError(f"method 'slerp' needs exactly 2 experts, got {group.deltas.shape[0]}")
        t = self.params.t
        base, deltas = group.base, group.deltas
        if t == 0.0:
            return base + deltas[0]
        if t == 1.0:
            return base + deltas[1]
        # a = theta_0 + tau_1 and b = theta_0 + tau_2 are rebuilt chunk by chunk (element-wise, so the
        # same values) and only ever held in cache: the reductions read a float64 buffer filled chunk
        # by chunk, which holds what casting the whole tensor would give, and is reused from tensor
        # to tensor. The sums run over the same float64 values in the same shape as
        # ``vector_norm(a, dtype=float64)`` and ``(a * b).sum(dtype=float64)``: the same results.
        half = base.element_size() < 4  # half-precision products would lose digits: float32
        flat_base, first, second = base.reshape(-1), deltas[0].reshape(-1), deltas[1].reshape(-1)
        n = flat_base.numel()
        scratch, self._scratch = self._scratch, None  # a concurrent call allocates its own
        if scratch is None or scratch.numel() < n or scratch.device != base.device:
            scratch = torch.empty(n, dtype=torch.float64, device=base.device)
        try:
            wide = scratch[:n]

            def reduce(fill, reduction) -> float:
                for start in range(0, n, _CHUNK):
                    stop = min(n, start + _CHUNK)
                    wide[start:stop].copy_(fill(start, stop))
                return float(reduction(wide.view(base.shape)))

            def a(i: int, j: int) -> torch.Tensor:
                return flat_base[i:j] + first[i:j]

            def b(i: int, j: int) -> torch.Tensor:
                return flat_base[i:j] + second[i:j]

            norm = torch.linalg.vector_norm
            norm_a = reduce(a, norm)
            norm_b = reduce(b, norm)
            if half:
                dot = reduce(lambda i, j: a(i, j).float() * b(i, j).float(), torch.sum)
            else:
                dot = reduce(lambda i, j: a(i, j).mul_(b(i, j)), torch.sum)
        finally:
            self._scratch = scratch
        s_a, s_b = slerp_coefficients(dot, norm_a, norm_b, t)
        if half:  # half-precision scalar ops round differently by position (vector body or tail): whole tensors
            return (base + deltas[0]).mul_(s_a).add_(base + deltas[1], alpha=s_b)
        out = torch.empty(n, dtype=torch.result_type(base, deltas), device=base.device)
        for start in range(0, n, _CHUNK):
            stop = min(n, start + _CHUNK)
            torch.add(flat_base[start:stop], first[start:stop], out=out[start:stop])
            out[start:stop].mul_(s_a).add_(b(start, stop), alpha=s_b)
        return out.view(base.shape)


@hookimpl
def hubmerge_register_methods(register):
    """Register :class:`Slerp`."""
    register(Slerp)
