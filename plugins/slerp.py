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

    def merge_tensor(self, group: TensorGroup) -> torch.Tensor:
        """Return the spherical interpolation of ``theta_1`` and ``theta_2`` at ``t``.

        Raises:
            MethodInputError: If the group does not hold exactly two experts.
        """
        if group.deltas.shape[0] != 2:
            raise MethodInputError(f"method 'slerp' needs exactly 2 experts, got {group.deltas.shape[0]}")
        t = self.params.t
        a = group.base + group.deltas[0]
        if t == 0.0:
            return a
        b = group.base + group.deltas[1]
        if t == 1.0:
            return b
        # Half-precision products would lose digits: take them in float32 (a temporary per input).
        wide_a, wide_b = (a.float(), b.float()) if a.element_size() < 4 else (a, b)
        dot = float((wide_a * wide_b).sum(dtype=torch.float64))
        norm_a = float(torch.linalg.vector_norm(wide_a, dtype=torch.float64))
        norm_b = float(torch.linalg.vector_norm(wide_b, dtype=torch.float64))
        del wide_a, wide_b
        s_a, s_b = slerp_coefficients(dot, norm_a, norm_b, t)
        return a.mul_(s_a).add_(b, alpha=s_b)


@hookimpl
def hubmerge_register_methods(register):
    """Register :class:`Slerp`."""
    register(Slerp)
