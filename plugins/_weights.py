"""Per-expert weights shared by ``linear`` and ``task_arithmetic``; not a plugin itself."""

from __future__ import annotations

import torch

from hubmerge.errors import MethodParamError


def expert_weights(weights: list[float] | None, count: int, default: float = 1.0) -> list[float]:
    """The per-expert weights, checked against the number of experts.

    Args:
        weights: The ``weights`` parameter (``None``: ``default`` for every expert).
        count: Number of experts.
        default: Weight of each expert when ``weights`` is ``None``.

    Returns:
        ``count`` floats.

    Raises:
        MethodParamError: Naming the ``weights`` field, if the length does not match.
    """
    if weights is None:
        return [default] * count
    if len(weights) != count:
        raise MethodParamError(
            f"{len(weights)} values given, one per input model needed ({count})", field="weights"
        )
    return list(weights)


def weighted_sum(deltas: torch.Tensor, weights: list[float]) -> torch.Tensor:
    """``sum_k weights[k] * deltas[k]`` as a new tensor, without a ``(T, *shape)`` temporary.

    Args:
        deltas: Shape ``(T, *shape)``.
        weights: ``T`` floats.

    Returns:
        Shape ``deltas.shape[1:]``, in ``deltas.dtype``.
    """
    out = torch.zeros_like(deltas[0])
    for k, weight in enumerate(weights):
        out.add_(deltas[k], alpha=weight)
    return out
