"""Compiled CPU kernels for the sparsifying methods' hot loops (float32).

The loops live in the C extension ``hubmerge_plugins._ckernels`` (``plugins/_ckernels.c``), which
``setup.py`` builds when a C compiler is present. Each kernel computes exactly what its torch
counterpart in :mod:`hubmerge_plugins._sparsify` computes, with the same float32 operations in
the same order (no fast-math, no contraction into fused multiply-adds), so the results are
bit-identical; the tests check this against the torch path. What the kernels save is memory
traffic and interpreter overhead: TIES' trim, sign election and disjoint mean of a block of
entries are one loop instead of a dozen torch ops, and a threshold's two histogram passes are
two plain loops instead of masks, bit operations and ``bincount`` over copies.

The kernels release the GIL, so :func:`hubmerge_plugins._sparsify._parallel_map` runs them on
several cores from Python threads. :func:`available` is false when the extension was not built
or ``HUBMERGE_KERNELS=torch`` is set; callers then use the torch path.
"""

from __future__ import annotations

import logging
import os

import numpy as np

log = logging.getLogger(__name__)

try:
    from . import _ckernels
except ImportError as exc:  # built without a C compiler: the torch path is used
    _ckernels = None
    log.debug("compiled kernels unavailable (%s); the torch path is used", exc)

SPAN = 2048  # the C loop's block of entries: callers align the spans they split a tensor into to it


def available() -> bool:
    """Whether the compiled kernels can be used (built, and not disabled by ``HUBMERGE_KERNELS=torch``)."""
    if _ckernels is None:
        return False
    return os.environ.get("HUBMERGE_KERNELS", "").strip().lower() != "torch"


def ties_span(deltas: np.ndarray, thresholds: np.ndarray, scale: float, base: np.ndarray | None,
              out: np.ndarray, start: int, stop: int) -> None:
    """TIES-merge entries ``[start, stop)`` of ``deltas`` into ``out`` (all float32, C-contiguous).

    ``out[j] = (sum of the agreeing kept entries / their count) * scale (+ base[j])``, where the
    entry of task ``t`` is kept when ``|tau| >= thresholds[t]`` (a threshold of 0 keeps all).

    Args:
        deltas: Task vectors, shape ``(T, n)``.
        thresholds: Shape ``(T,)``.
        scale: Multiplies the merged task vector.
        base: Added last when given, shape ``(n,)``.
        out: Receives the result, shape ``(n,)``.
        start: First entry of the span.
        stop: End of the span (exclusive).
    """
    _ckernels.ties_span(deltas, deltas.shape[0], thresholds, float(scale), base, out, start, stop)


def high_histogram(values: np.ndarray, hist: np.ndarray) -> None:
    """Add the high-half bins of ``|values|``' float32 patterns into ``hist`` (int64, ``2**15`` bins)."""
    _ckernels.histogram(values, hist, -1)


def low_histogram(values: np.ndarray, wanted_high: int, hist: np.ndarray) -> None:
    """Add the low-half bins of the ``|values|`` whose high half is ``wanted_high`` into ``hist`` (``2**16``)."""
    _ckernels.histogram(values, hist, int(wanted_high))
