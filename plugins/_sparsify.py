"""Shared maths of the sparsifying methods: magnitude trimming and TIES' sign election.

Used by :mod:`hubmerge_plugins.ties` and :mod:`hubmerge_plugins.dare`; not a plugin itself.

Rules, the same everywhere:

* **How many entries are kept.** A fraction ``k`` of ``n`` entries keeps
  ``m = clamp(floor(k*n + 0.5), 1, n)`` of them (``k*n`` rounded half up, at least one).
* **Threshold and ties.** The threshold of a task vector is its ``m``-th largest magnitude
  ``|tau|`` (1-based, counting repeats). Every entry with ``|tau| >= threshold`` is kept, so when
  several entries share the threshold magnitude all of them stay and more than ``m`` entries may
  survive; the rule does not depend on the order of entries or tensors.
* **Thresholds** are found exactly by two histogram passes over 16-bit halves of the float32 bit
  pattern of ``|tau|`` (see :class:`GlobalThreshold`): streamed over the whole model for
  ``scope: global``, over one tensor for ``scope: tensor`` (``kthvalue`` on the same values for
  tensors of at most ``_SMALL`` entries). Magnitudes are taken in float32:
  exact for float32, float16 and bfloat16 inputs; float64 magnitudes are rounded to float32 first
  (values equal after rounding tie). NaN entries are not supported (they propagate).
* **Sign election** (TIES): ``gamma = sign(sum_k trimmed tau_k)``; an entry whose sum is exactly
  zero elects no sign and merges to zero.
* **Disjoint mean**: the mean over the tasks whose trimmed entry is non-zero and has sign
  ``gamma``; zero where no task agrees.
"""

from __future__ import annotations

import math
import sys
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import numpy as np
import torch

from hubmerge.engine import usable_cores
from hubmerge.errors import MethodInputError, MethodStateError

from . import _kernels

HIGH_BINS = 1 << 15  # high 16 bits of a non-negative float32 pattern: the sign bit is 0
LOW_BINS = 1 << 16
_CHUNK = 1 << 20  # elements per bincount call: bounds the temporaries, and a chunk's bins stay in cache
_SMALL = 1 << 16  # per-tensor thresholds of smaller tensors by kthvalue (cheaper than 2 histograms)
_MERGE_BYTES = 4 << 20  # trimmed task vectors of one block of entries (all tasks), kept in cache
_HIGH_HALF = 1 if sys.byteorder == "little" else 0  # int16 index of a float32's high half
_PARALLEL_MIN = 1 << 20  # entries per task from which a tensor's work is split over the worker threads

_T = TypeVar("_T")
_R = TypeVar("_R")
_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def _worker_count() -> int:
    """Threads the per-tensor work is split over: the usable cores (at most 8)."""
    return max(1, min(8, usable_cores()))


def _parallel_map(fn: Callable[[_T], _R], items: Sequence[_T]) -> list[_R]:
    """``[fn(x) for x in items]``, run on a shared pool of worker threads when there are several.

    The work is independent torch ops on disjoint data (the GIL is released inside them), each
    op single-threaded (the engine sets one intra-op thread on the CPU): several Python threads
    use several cores without OpenMP's spin-waiting barriers. Results are in ``items`` order and
    equal to the sequential ones.
    """
    global _pool
    if len(items) <= 1:
        return [fn(x) for x in items]
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(max_workers=_worker_count(), thread_name_prefix="hubmerge-sparsify")
        pool = _pool
    futures = [pool.submit(fn, x) for x in items[1:]]
    first = fn(items[0])  # the calling thread works too
    return [first, *(f.result() for f in futures)]


def _split(total: int, parts: int, align: int = 1) -> list[tuple[int, int]]:
    """``parts`` contiguous spans covering ``range(total)``, boundaries multiples of ``align``."""
    if total <= 0:
        return []
    per_part = -(-total // max(1, parts))  # ceil
    size = -(-per_part // align) * align  # rounded up to a multiple of align
    return [(start, min(total, start + size)) for start in range(0, total, size)]


def keep_count(fraction: float, n: int) -> int:
    """Number of entries a fraction keeps out of ``n``: ``k*n`` rounded half up, in ``[1, n]``.

    Args:
        fraction: Fraction kept, in ``(0, 1]``.
        n: Number of entries.

    Returns:
        The count ``m`` (0 only when ``n`` is 0).
    """
    if n <= 0:
        return 0
    return min(n, max(1, math.floor(fraction * n + 0.5)))


def tensor_thresholds(deltas: torch.Tensor, fraction: float) -> torch.Tensor:
    """Per-task magnitude thresholds inside one tensor (``scope: tensor``).

    Small tensors use ``kthvalue``; large ones the same exact two-pass histogram search as the
    global scope, run on this tensor alone (O(n), temporaries bounded by one chunk). Both rank
    the float32 magnitudes, so they agree.

    Args:
        deltas: Task vectors, shape ``(T, *shape)``, at least one entry per task.
        fraction: Fraction of entries kept per task.

    Returns:
        Shape ``(T,)`` float32: the ``m``-th largest ``|tau_k|`` of each task.
    """
    count = deltas.shape[0]
    n = deltas[0].numel()
    if n <= _SMALL:
        m = keep_count(fraction, n)
        flat = deltas.reshape(count, -1).abs().float()
        # kthvalue counts from the smallest: the m-th largest is the (n - m + 1)-th smallest.
        return flat.kthvalue(n - m + 1, dim=1).values

    if deltas.device.type != "cpu" or _use_kernels(deltas):  # the two passes, on this tensor alone
        finder = GlobalThreshold(fraction, key="tensor")
        for pass_index in range(GlobalThreshold.passes):
            finder.finish_pass(pass_index, finder.observe(pass_index, deltas))
        return finder.require(count)
    m = keep_count(fraction, n)

    def search(tasks: tuple[int, int]) -> list[torch.Tensor]:  # each task's search is independent
        bins = torch.empty(n, dtype=torch.int16)
        return [_row_threshold(deltas[t], m, bins) for t in range(*tasks)]

    workers = _worker_count() if n >= _PARALLEL_MIN else 1
    return torch.stack([v for part in _parallel_map(search, _split(count, workers)) for v in part])


def _row_threshold(row: torch.Tensor, m: int, bins: torch.Tensor) -> torch.Tensor:
    """The ``m``-th largest float32 magnitude of one task's tensor (CPU), exactly.

    :class:`GlobalThreshold`'s two passes run on one tensor, the second one cheaper: pass 0
    histograms the high halves of the float32 patterns of ``|x|`` and keeps each entry's bin in
    ``bins`` (int16, one per entry); pass 1 picks the entries of the bin holding the threshold from
    the kept bins (few: one bin is 1/128 of a binade) and ranks their patterns with ``kthvalue``.
    The patterns of non-negative floats are ordered like their values, so this is the same value
    as the low-half histogram of :meth:`GlobalThreshold.observe` would give.
    """
    flat = row.reshape(-1)
    n = flat.numel()
    hist = torch.zeros(HIGH_BINS, dtype=torch.int64)
    for start in range(0, n, _CHUNK):
        high = flat[start:start + _CHUNK].float().view(torch.int16)[_HIGH_HALF::2]
        chunk_bins = torch.bitwise_and(high, HIGH_BINS - 1, out=bins[start:start + high.numel()])
        hist += torch.bincount(chunk_bins, minlength=HIGH_BINS)
    from_top = hist.flip(0).cumsum(0)
    position = int((from_top < m).sum())  # first position from the top reaching m
    high_bin = HIGH_BINS - 1 - position
    above = int(from_top[position]) - int(hist[high_bin])
    inside = torch.empty(min(n, _CHUNK), dtype=torch.bool)
    found = []
    for start in range(0, n, _CHUNK):
        stop = min(n, start + _CHUNK)
        selected = torch.eq(bins[start:stop], high_bin, out=inside[:stop - start])
        found.append(flat[start:stop][_true_positions(selected)].float().view(torch.int32)
                     .bitwise_and(0x7FFFFFFF))  # |x|'s pattern
    patterns = torch.cat(found)
    rank = m - above  # the threshold is the rank-th largest pattern of its bin
    return patterns.kthvalue(patterns.numel() - rank + 1).values.view(torch.float32)


def _use_kernels(deltas: torch.Tensor) -> bool:
    """Whether the compiled float32 kernels (:mod:`hubmerge_plugins._kernels`) handle ``deltas``."""
    return (deltas.device.type == "cpu" and deltas.dtype == torch.float32 and deltas.is_contiguous()
            and not deltas.requires_grad and _kernels.available())


def _true_positions(mask: torch.Tensor) -> torch.Tensor:
    """Indices of the true entries of a 1-D bool tensor, in order (fast when they are few).

    The mask is scanned as 64-bit words (eight entries each), which skips the all-false words at
    an eighth of the cost of :func:`torch.nonzero` on the entries themselves.
    """
    body = mask.numel() - mask.numel() % 8
    words = torch.nonzero(mask[:body].view(torch.int64)).squeeze(1)
    candidates = (words.mul_(8).unsqueeze(1) + torch.arange(8)).reshape(-1)
    found = candidates[mask[candidates]]
    if body == mask.numel():
        return found
    return torch.cat([found, torch.nonzero(mask[body:]).squeeze(1).add_(body)])


def trim_masks(deltas: torch.Tensor, thresholds: torch.Tensor) -> torch.Tensor:
    """Keep-masks of the entries whose magnitude is at or above their task's threshold.

    Magnitudes are compared in the compute dtype, except float64 which is rounded to float32 like
    the thresholds' search; a threshold found by the search is exactly representable in the
    compute dtype, so the comparison is exact.

    Args:
        deltas: Task vectors, shape ``(T, *shape)``.
        thresholds: Shape ``(T,)``.

    Returns:
        A bool tensor shaped like ``deltas``.
    """
    keep = torch.empty(deltas.shape, dtype=torch.bool, device=deltas.device)
    for t in range(deltas.shape[0]):
        mags = deltas[t].abs()
        if mags.dtype == torch.float64:
            mags = mags.float()
        torch.ge(mags, thresholds[t].to(device=mags.device, dtype=mags.dtype), out=keep[t])
    return keep


def ties_merge(deltas: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
    """TIES' elect-sign and disjoint mean of trimmed task vectors.

    ``deltas`` is left untouched; temporaries are one task's size.

    Args:
        deltas: Task vectors, shape ``(T, *shape)``.
        keep: Bool mask of the trimmed entries, same shape (``None``: keep all).

    Returns:
        The merged task vector, shape ``deltas.shape[1:]``, in ``deltas.dtype``.
    """
    count = deltas.shape[0]
    gamma = torch.zeros_like(deltas[0])
    for t in range(count):
        gamma.add_(deltas[t] if keep is None else deltas[t] * keep[t])
    gamma.sign_()
    merged = torch.zeros_like(deltas[0])
    agreeing = torch.zeros_like(deltas[0])
    for t in range(count):
        agree = (deltas[t] * gamma) > 0  # non-zero and of the elected sign
        if keep is not None:
            agree &= keep[t]
        merged.add_(deltas[t] * agree)
        agreeing.add_(agree)
    return merged.div_(agreeing.clamp_(min=1))


def trim_and_merge(deltas: torch.Tensor, k: float, thresholds: torch.Tensor | None, *,
                   scale: float = 1.0, base: torch.Tensor | None = None) -> torch.Tensor:
    """Trim ``deltas`` to ``k`` (global ``thresholds`` if given, else per tensor) and TIES-merge.

    The result is :func:`ties_merge` of :func:`trim_masks`, computed block by block of entries
    (see :func:`_trimmed_ties`): no mask or temporary of the task vectors' size.

    Args:
        deltas: Task vectors ``(T, *shape)``, left untouched.
        k: Fraction kept.
        thresholds: Global per-task thresholds (float32), or ``None`` for per-tensor ranking.
        scale: Multiplies the merged task vector (``merged.mul_(scale)``, skipped when 1).
        base: Added last when given (``.add_(base)``, shape ``deltas.shape[1:]``), block by block
            while the block is in cache: the same values as doing both afterwards.

    Returns:
        The merged task vector (times ``scale``, plus ``base``), shape ``deltas.shape[1:]``.
    """
    if k >= 1.0:
        return _trimmed_ties(deltas, None, scale, base)
    limits = thresholds if thresholds is not None else tensor_thresholds(deltas, k)
    return _trimmed_ties(deltas, limits, scale, base)


def _below(threshold: float, dtype: torch.dtype) -> float | None:
    """The largest ``dtype`` value below ``threshold`` rounded to ``dtype`` (``None``: keep everything).

    For ``x`` of ``dtype``, ``|x| >= threshold`` (compared in ``dtype``, as :func:`trim_masks` does)
    is ``|x| > bound``: what ``hardshrink(x, bound)`` keeps, in one pass.
    """
    value = torch.tensor(threshold, dtype=torch.float32).to(dtype)
    if not float(value) > 0:
        return None
    ints = {2: torch.int16, 4: torch.int32, 8: torch.int64}[value.element_size()]
    return float((value.view(ints) - 1).view(dtype))  # positive floats: the previous pattern


def _trimmed_ties(deltas: torch.Tensor, thresholds: torch.Tensor | None, scale: float = 1.0,
                  base: torch.Tensor | None = None) -> torch.Tensor:
    """``ties_merge(deltas, trim_masks(deltas, thresholds))`` (``None``: no trim), in blocks.

    Each block of entries is trimmed for all tasks into a small scratch (``hardshrink``: one pass),
    its signs elected and its agreeing entries averaged while the block is in cache. The sums run
    over the tasks in the same order with the same values as :func:`ties_merge`, so the results are
    equal; the only full-size allocation is the result. Large tensors are split into spans of
    blocks run on the worker threads (each with its own scratch; blocks are independent).
    ``scale`` and ``base`` finish each block as ``out.mul_(scale).add_(base)`` would.
    """
    count = deltas.shape[0]
    dtype, device = deltas.dtype, deltas.device
    flat = deltas.reshape(count, -1)
    n = flat.shape[1]
    merged = torch.empty(n, dtype=dtype, device=device)
    base_flat = base.reshape(-1) if base is not None else None
    if n == 0 or count == 0:
        merged.zero_()
        if scale != 1.0:
            merged.mul_(scale)
        if base_flat is not None:
            merged.add_(base_flat)
        return merged.reshape(deltas.shape[1:])
    workers = _worker_count() if device.type == "cpu" and count * n >= 2 * _PARALLEL_MIN else 1
    if _use_kernels(deltas) and (base_flat is None or _use_kernels(base_flat)):  # one compiled loop
        rows = flat.numpy()
        limits_np = (thresholds.to(device="cpu", dtype=torch.float32).numpy() if thresholds is not None
                     else np.zeros(count, dtype=np.float32))  # |tau| >= 0 keeps every entry
        base_np = base_flat.numpy() if base_flat is not None else None
        out_np = merged.numpy()
        _parallel_map(lambda part: _kernels.ties_span(rows, limits_np, scale, base_np, out_np, *part),
                      _split(n, workers, _kernels.SPAN))
        return merged.reshape(deltas.shape[1:])
    bounds: list[float | None] = [None] * count
    limits: list[float] = []
    if thresholds is not None:
        limits = thresholds.to(device="cpu", dtype=torch.float32).tolist()
        if dtype == torch.float64:  # magnitudes are compared in float32 (see trim_masks)
            bounds = [float("nan")] * count
        else:
            bounds = [_below(v, dtype) for v in limits]
    step = min(n, max(1 << 12, _MERGE_BYTES // (count * deltas.element_size())))
    # Agreeing tasks are counted by summing 0/1 values in the compute dtype: exact below 256 tasks
    # for every floating dtype (bfloat16 holds the integers up to 256). More tasks count in int32.
    small_count = count < 256

    def span(bounds_of_span: tuple[int, int]) -> None:
        trimmed = torch.empty((count, step), dtype=dtype, device=device)
        gamma = torch.empty(step, dtype=dtype, device=device)
        work = torch.empty(step, dtype=dtype, device=device)
        mask = torch.empty(step, dtype=torch.bool, device=device)
        agreeing = torch.empty(step, dtype=dtype if small_count else torch.int32, device=device)
        for start in range(bounds_of_span[0], bounds_of_span[1], step):
            stop = min(bounds_of_span[1], start + step)
            width = stop - start
            g, s, m, c = gamma[:width], work[:width], mask[:width], agreeing[:width]
            tr_all = trimmed[:, :width]
            g.zero_()
            for t in range(count):
                d, tr = flat[t, start:stop], trimmed[t, :width]
                bound = bounds[t]
                if bound is None:
                    tr.copy_(d)
                elif math.isnan(bound):  # float64: |d| rounded to float32 against the float32 threshold
                    torch.ge(torch.abs(d, out=s).float(), limits[t], out=m)
                    torch.mul(d, m, out=tr)
                else:
                    torch.ops.aten.hardshrink.out(d, bound, out=tr)
                g.add_(tr)
            g.sign_()
            # |trimmed| where its sign is the elected one, else 0 (all tasks in one op each)
            tr_all.mul_(g).clamp_(min=0)
            out = merged[start:stop]
            out.zero_()
            for t in range(count):
                out.add_(tr_all[t])
            if small_count:
                torch.sum(tr_all.sign_(), dim=0, out=c)  # 1 per agreeing task: exact
            else:
                c.zero_()
                for t in range(count):
                    c.add_(torch.gt(tr_all[t], 0, out=m))
            out.mul_(g).div_(c.clamp_(min=1))
            if scale != 1.0:
                out.mul_(scale)
            if base_flat is not None:
                out.add_(base_flat[start:stop])

    _parallel_map(span, _split(n, workers, step))
    return merged.reshape(deltas.shape[1:])


class GlobalThreshold:
    """Exact per-task top-``k`` magnitude thresholds over many tensors, by streaming.

    For non-negative floats the int32 view of the float32 bit pattern is monotonic in the value.
    Pass 0 histograms, per task, the high 16 bits of ``|tau|``'s pattern (``HIGH_BINS`` bins); the
    bin holding the ``m``-th largest magnitude is then known. Pass 1 histograms the low 16 bits of
    the entries inside that bin; the bin reached there is the exact bit pattern of the threshold.
    :meth:`observe` returns int64 count tensors that are simply summed over all tensors (map-reduce).

    Args:
        fraction: Fraction of entries kept per task over all observed tensors.
        key: Prefix of the statistic names.
    """

    passes = 2

    def __init__(self, fraction: float, key: str):
        self.fraction = fraction
        self.key = key
        self.tasks: int | None = None
        self.total = 0
        self._high_bin: torch.Tensor | None = None
        self._above: torch.Tensor | None = None
        self.thresholds: torch.Tensor | None = None

    def _check_tasks(self, count: int) -> None:
        if self.tasks is None:
            self.tasks = count
        elif self.tasks != count:
            raise MethodInputError(f"tensors have {count} task vectors, earlier ones had {self.tasks}")

    @staticmethod
    def _halves(row: torch.Tensor):
        """Per chunk: the high and low 16-bit halves of the float32 patterns (strided int16 views)."""
        flat = row.reshape(-1)
        for start in range(0, flat.numel(), _CHUNK):
            halves = flat[start:start + _CHUNK].float().view(torch.int16)
            yield halves[_HIGH_HALF::2], halves[1 - _HIGH_HALF::2]

    def observe(self, pass_index: int, deltas: torch.Tensor) -> dict[str, torch.Tensor]:
        """This tensor's histograms for pass ``pass_index``.

        Tasks are histogrammed on the worker threads when the tensor is large (each task's
        histogram is its own, so the counts are those of a sequential loop).

        Args:
            pass_index: 0 (high halves) or 1 (low halves inside the selected bins).
            deltas: Task vectors, shape ``(T, *shape)``.

        Returns:
            ``{f"{key}.high": (T, HIGH_BINS)}`` or ``{f"{key}.low": (T, LOW_BINS)}``, int64 counts.
        """
        if pass_index not in (0, 1):
            raise MethodStateError(f"global threshold has 2 passes, got pass index {pass_index}")
        if pass_index == 1 and self._high_bin is None:
            raise MethodStateError("global threshold: pass 1 observed before pass 0 finished")
        count = deltas.shape[0]
        self._check_tasks(count)
        n = deltas[0].numel() if count else 0
        bins = HIGH_BINS if pass_index == 0 else LOW_BINS
        hist = torch.zeros((count, bins), dtype=torch.int64, device=deltas.device)
        size = min(n, _CHUNK)
        if _use_kernels(deltas):
            rows = deltas.reshape(count, -1).numpy()
            hist_np = hist.numpy()

            def histogram(tasks: tuple[int, int]) -> None:  # the compiled loops
                for t in range(*tasks):
                    if pass_index == 0:
                        _kernels.high_histogram(rows[t], hist_np[t])
                    else:
                        _kernels.low_histogram(rows[t], int(self._high_bin[t]), hist_np[t])
        else:
            def histogram(tasks: tuple[int, int]) -> None:
                # |x|'s pattern is x's with the sign bit cleared: the high half's top bit.
                high = torch.empty(size, dtype=torch.int16, device=deltas.device)
                inside = torch.empty(size, dtype=torch.bool, device=deltas.device) if pass_index else None
                for t in range(*tasks):
                    wanted = int(self._high_bin[t]) if pass_index else 0
                    for hi, lo in self._halves(deltas[t]):
                        chunk_bins = torch.bitwise_and(hi, HIGH_BINS - 1, out=high[:hi.numel()])
                        if pass_index == 0:
                            hist[t] += torch.bincount(chunk_bins, minlength=HIGH_BINS)
                            continue
                        selected = torch.eq(chunk_bins, wanted, out=inside[:hi.numel()])
                        low = lo[_true_positions(selected)].to(torch.int32).bitwise_and_(LOW_BINS - 1)
                        hist[t] += torch.bincount(low, minlength=LOW_BINS)

        parallel = deltas.device.type == "cpu" and n >= _PARALLEL_MIN
        _parallel_map(histogram, _split(count, _worker_count() if parallel else 1))
        return {f"{self.key}.high" if pass_index == 0 else f"{self.key}.low": hist}

    @staticmethod
    def _find_from_top(
        hist: torch.Tensor, already: torch.Tensor, wanted: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per row: the highest bin where ``already + count(bins >= it)`` reaches ``wanted``.

        Returns:
            The bins, and per row ``already`` plus the count strictly above the bin.
        """
        from_top = hist.flip(-1).cumsum(-1) + already.unsqueeze(-1)
        idx = (from_top < wanted).sum(-1, keepdim=True)  # first position from the top reaching it
        bins = hist.shape[-1] - 1 - idx
        above = from_top.gather(-1, idx) - hist.gather(-1, bins)
        return bins.squeeze(-1), above.squeeze(-1)

    def finish_pass(self, pass_index: int, totals: dict[str, torch.Tensor]) -> None:
        """Locate the threshold's bin from the summed histograms.

        Args:
            pass_index: 0 or 1.
            totals: Sums of :meth:`observe` over every tensor.

        Raises:
            MethodStateError: If the passes come out of order or nothing was observed.
        """
        if pass_index == 0:
            hist = totals.get(f"{self.key}.high")
            if hist is None:
                raise MethodStateError("global threshold: pass 0 saw no tensor")
            hist = hist.to(device="cpu", dtype=torch.int64)
            totals_per_task = hist.sum(-1)
            self.total = int(totals_per_task[0])
            if not bool((totals_per_task == self.total).all()) or self.total == 0:
                raise MethodStateError(
                    f"global threshold: tasks saw different or no entries {totals_per_task.tolist()}"
                )
            self.tasks = hist.shape[0]
            self.thresholds = None
            wanted = keep_count(self.fraction, self.total)
            none_yet = torch.zeros(hist.shape[0], dtype=torch.int64)
            self._high_bin, self._above = self._find_from_top(hist, none_yet, wanted)
        elif pass_index == 1:
            hist = totals.get(f"{self.key}.low")
            if hist is None or self._high_bin is None:
                raise MethodStateError("global threshold: pass 1 finished before pass 0, or saw no tensor")
            hist = hist.to(device="cpu", dtype=torch.int64)
            wanted = keep_count(self.fraction, self.total)
            low_bin, _ = self._find_from_top(hist, self._above, wanted)
            bits = (self._high_bin << 16) | low_bin
            self.thresholds = bits.to(torch.int32).view(torch.float32)
            self.tasks = None  # a later run on this instance starts afresh
        else:
            raise MethodStateError(f"global threshold has 2 passes, got pass index {pass_index}")

    def require(self, tasks: int) -> torch.Tensor:
        """The thresholds, shape ``(T,)`` float32.

        Args:
            tasks: Number of task vectors of the tensor being merged.

        Raises:
            MethodStateError: If the two pre-passes have not run.
            MethodInputError: If the pre-passes saw another number of task vectors.
        """
        if self.thresholds is None:
            raise MethodStateError(
                "global top-k needs the engine's two pre-passes (observe/finish_pass) before merge_tensor"
            )
        if self.thresholds.shape[0] != tasks:
            raise MethodInputError(
                f"tensor has {tasks} task vectors, the pre-passes saw {self.thresholds.shape[0]}"
            )
        return self.thresholds


class GlobalThresholdPasses:
    """The pre-pass plumbing of a method with an optional model-wide top-k (TIES, DARE + TIES).

    The method sets ``self._global`` (a :class:`GlobalThreshold`) and defines ``_uses_global()``
    and ``_trim_input(group)`` (the task vectors whose magnitudes are ranked).
    """

    def observe(self, pass_index: int, group) -> dict[str, torch.Tensor]:
        """Histograms of the ranked ``|tau|`` (nothing without a model-wide threshold)."""
        if not self._uses_global():
            return {}
        return self._global.observe(pass_index, self._trim_input(group))

    def finish_pass(self, pass_index: int, totals: dict[str, torch.Tensor]) -> None:
        """Locate the global thresholds from the summed histograms."""
        if self._uses_global():
            self._global.finish_pass(pass_index, totals)

    @property
    def thresholds(self) -> torch.Tensor | None:
        """The global per-task thresholds once the pre-passes ran (float32, shape ``(T,)``)."""
        return self._global.thresholds
