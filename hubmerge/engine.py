"""The streaming merge engine.

For every tensor of the base, in storage order, the engine reads the base tensor and
each expert's contribution (reader threads, a bounded number of tensors ahead), builds
the task vectors on the compute device, lets the method merge them, and streams the
result to the :class:`~hubmerge.writer.ShardedWriter`. Peak memory is a few tensor
groups; I/O overlaps compute. Methods that need global statistics get them from
pre-passes over the same stream, whose per-tensor statistics are summed.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from collections.abc import Callable, Collection, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .checkpoint import Checkpoint
from .errors import HubmergeError, ModelReferenceError, RecipeError
from .method import MergeContext, MergeMethod, TensorGroup
from .recipe import Recipe, check_recipe
from .sources import Expert, FullExpert, ResolvedModel, open_expert, resolve
from .writer import BackgroundWriter, ShardedWriter, TensorSpec, confine_output_path

logger = logging.getLogger(__name__)

#: Weight files never copied from the base (the merge writes its own).
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".pkl", ".h5", ".msgpack", ".onnx")
SKIPPED_FILES = {"README.md", ".gitattributes", "model.safetensors.index.json", "pytorch_model.bin.index.json"}


@dataclass
class Progress:
    """A progress report: ``stage`` is ``"prepass 1/2"``, ``"merge"``..."""

    stage: str
    tensors_done: int
    tensors_total: int
    bytes_done: int
    bytes_total: int


ProgressCallback = Callable[[Progress], None]


def resolve_device(device: str) -> torch.device:
    """``auto`` is CUDA when present, else CPU; other names are checked.

    Args:
        device: ``auto``, ``cpu``, ``cuda``, ``cuda:N`` or ``mps``.

    Returns:
        The ``torch.device``.

    Raises:
        RecipeError: If the device is not available here.
    """
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RecipeError(f"device {device!r} requested but CUDA is not available", field="device")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise RecipeError(f"device {device!r} requested but MPS is not available", field="device")
    return dev


@dataclass
class MergeInputs:
    """A recipe's inputs, resolved and opened, checked against each other."""

    base: ResolvedModel
    base_checkpoint: Checkpoint
    experts: list[Expert]
    #: ``(expert file, base file)`` -> whether they are one file (filled as tensors are read).
    same_files: dict[tuple[Path, Path], bool] = field(default_factory=dict, repr=False)

    @property
    def bytes_per_pass(self) -> int:
        """Bytes read by one pass over all inputs."""
        return self.base_checkpoint.nbytes + sum(e.nbytes for e in self.experts)

    def close(self) -> None:
        """Close every input."""
        self.base_checkpoint.close()
        for expert in self.experts:
            expert.close()


def open_inputs(recipe: Recipe, *, token: str | None = None) -> MergeInputs:
    """Resolve the base and experts (downloading Hub repos) and check they fit.

    Args:
        recipe: A validated recipe.
        token: Hub token (never logged).

    Returns:
        The opened :class:`MergeInputs`.

    Raises:
        ModelReferenceError, HubError, CheckpointError, AdapterError, IncompatibleModelError.
    """
    base = resolve(recipe.base, token=token)
    if base.is_adapter:
        raise ModelReferenceError(f"base {recipe.base}: is an adapter; the base must be a full model")
    base_checkpoint = Checkpoint(base.directory)
    experts: list[Expert] = []
    try:
        for ref in recipe.experts:
            expert = open_expert(resolve(ref, token=token), base_checkpoint)
            experts.append(expert)
            expert.check(base_checkpoint)
    except Exception:
        base_checkpoint.close()
        for expert in experts:
            expert.close()
        raise
    return MergeInputs(base, base_checkpoint, experts)


#: Target size of one tensor group (base + T task vectors) when an element-wise method
#: lets the engine stream a large tensor in blocks of rows.
BLOCK_BYTES = 64 * 1024 * 1024


@dataclass(frozen=True)
class WorkItem:
    """One unit of streaming work: a tensor, or a block of its rows."""

    name: str
    rows: tuple[int, int] | None = None
    last: bool = True  # the last (or only) block of this tensor (of this pass, for a tensor pass)
    tensor_pass: int | None = None  # a per-tensor statistics pass over this block: no output


#: A method with ``tensor_passes`` sees a tensor whole unless its group (base and task vectors in
#: the compute dtype) is larger than this; then the tensor is streamed in row blocks, once per pass.
TENSOR_PASS_BYTES = 8 * BLOCK_BYTES


def plan_items(inputs: MergeInputs, names: list[str], *, elementwise: bool, dtype: torch.dtype,
               block_bytes: int | None = None, tensor_passes: int = 0) -> list[WorkItem]:
    """Split tensors into work items; large floating tensors become row blocks when allowed.

    Rows are split only when every expert can read rows, and the method is element-wise or
    has ``tensor_passes`` (then only tensors above :data:`TENSOR_PASS_BYTES`, preceded by the
    blocks of each pass).

    Args:
        inputs: The opened inputs.
        names: Tensor names in write order.
        elementwise: The method accepts blocks of rows.
        dtype: Compute dtype (sizes the blocks).
        block_bytes: Target bytes of one group (base + task vectors) per block (default
            :data:`BLOCK_BYTES`).
        tensor_passes: The method's per-tensor passes (:attr:`MergeMethod.tensor_passes`).

    Returns:
        The work items in order.
    """
    block_bytes = block_bytes or BLOCK_BYTES
    meta = inputs.base_checkpoint.meta
    rows_readable = all(e.supports_rows for e in inputs.experts)
    per_element = torch.empty((), dtype=dtype).element_size() * (len(inputs.experts) + 2)
    items: list[WorkItem] = []
    for name in names:
        m = meta[name]
        rows = m.shape[0] if m.shape else 0
        size = per_element * (m.nbytes // max(1, torch.empty((), dtype=m.dtype).element_size()))
        splits = (elementwise and size > block_bytes) or (tensor_passes > 0 and size > TENSOR_PASS_BYTES)
        if not (rows_readable and splits and m.dtype.is_floating_point and rows > 1):
            items.append(WorkItem(name))
            continue
        step = max(1, rows * block_bytes // size)
        spans = [(start, min(rows, start + step)) for start in range(0, rows, step)]
        for pass_index in range(0 if elementwise else tensor_passes):
            items.extend(WorkItem(name, span, last=span[1] == rows, tensor_pass=pass_index) for span in spans)
        items.extend(WorkItem(name, span, last=span[1] == rows) for span in spans)
    return items


#: Bytes of work items read ahead of the one being merged (see :func:`prefetched`).
PREFETCH_BYTES = 1024 * 1024 * 1024

#: Marks an expert whose full weight was read straight into the stacked buffer.
IN_BUFFER = object()


class BufferPool:
    """Reusable CPU buffers, one per work item in flight.

    Large tensors are not re-allocated (and page-faulted in again) for every tensor:
    the stacked expert weights of item ``j`` live in slot ``j % slots``. A slot is reused
    only after its item was merged and written, which holds when ``slots`` exceeds the
    prefetch look-ahead by two and the consumer finishes an item before asking for the next.
    """

    #: Larger requests get memory of their own, freed with their item: a slot keeping the
    #: stacked embeddings of a large model would hold gigabytes for the rest of the merge.
    max_bytes = 256 * 1024 * 1024

    def __init__(self, slots: int):
        self._buffers: list[torch.Tensor | None] = [None] * slots

    def take(self, slot: int, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """A contiguous tensor of ``shape``/``dtype`` backed by slot ``slot``'s memory."""
        nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        if nbytes > self.max_bytes:
            # The slots' memory is let go too (items in flight keep theirs until done): it would
            # sit unused beside this large item.
            self._buffers = [None] * len(self._buffers)
            return torch.empty(shape, dtype=dtype)
        index = slot % len(self._buffers)
        buffer = self._buffers[index]
        if buffer is None or buffer.numel() < nbytes:
            buffer = torch.empty(max(nbytes, 1), dtype=torch.uint8)
            self._buffers[index] = buffer
        return buffer[:nbytes].view(dtype).view(shape)

    def owns(self, tensor: torch.Tensor) -> bool:
        """Whether ``tensor``'s memory lies in one of the slots (it will be overwritten later)."""
        if tensor.device.type != "cpu" or tensor.numel() == 0:
            return False
        start = tensor.data_ptr()
        for buffer in self._buffers:
            if buffer is not None and buffer.data_ptr() <= start < buffer.data_ptr() + buffer.numel():
                return True
        return False


@dataclass
class Fetched:
    """One work item's inputs as read from disk (CPU)."""

    item: WorkItem
    base: torch.Tensor
    expert_payloads: list[Any]
    nbytes: int
    stacked: torch.Tensor | None = None  # experts' weights read in place (IN_BUFFER payloads)
    pool: BufferPool | None = None  # owner of reused memory that ``base``/``stacked`` may live in
    unchanged: bool = False  # no expert changes the tensor: only the base was read (skip_unchanged)

    @property
    def name(self) -> str:
        """The tensor's name."""
        return self.item.name

    def payload(self, index: int) -> Any:
        """Expert ``index``'s payload: its row of :attr:`stacked` when it was read straight into it."""
        payload = self.expert_payloads[index]
        return self.stacked[index] if payload is IN_BUFFER else payload


def _fetch(inputs: MergeInputs, item: WorkItem, with_experts: bool, pool: BufferPool | None = None,
           slot: int = 0, dtype: torch.dtype | None = None, pool_base: bool = False,
           helpers: ThreadPoolExecutor | None = None, skip_unchanged: bool = False,
           wanted: Collection[int] | None = None) -> Fetched:
    """Read one work item: the base (block) and every expert's payload.

    With a ``pool`` and compute ``dtype``, experts stored in that dtype (or exactly widened to it)
    land in a reused stacked buffer; with ``pool_base`` the base does too (row 0 of the same
    buffer, in the compute dtype: no fresh pages, the conversion done here). An expert whose
    tensor is the base's own bytes (the same file) is copied from the base instead of read again.
    Reads of a large item are spread over ``helpers`` threads. With ``skip_unchanged``, a tensor
    no expert changes is read from the base alone, in its stored dtype. Only the experts in
    ``wanted`` (default all) are read; the others' payloads are ``None``.
    """
    base_meta = inputs.base_checkpoint.meta[item.name]
    floating = base_meta.dtype.is_floating_point
    if skip_unchanged and with_experts and not any(e.changes(item.name) for e in inputs.experts):
        base = inputs.base_checkpoint.get(item.name, item.rows)
        return Fetched(item, base, [None] * len(inputs.experts), base.numel() * base_meta.dtype.itemsize,
                       unchanged=True)
    pooled = with_experts and pool is not None and dtype is not None
    base_in_pool = pooled and pool_base and floating and (
        base_meta.dtype == dtype or dtype in _WIDER.get(base_meta.dtype, ()))
    shape = base_meta.shape if item.rows is None else (item.rows[1] - item.rows[0], *base_meta.shape[1:])
    stacked = None
    if base_in_pool:
        rows = pool.take(slot, (len(inputs.experts) + 1, *shape), dtype)
        base, stacked = rows[0], rows[1:]
    else:
        base = None
        if pooled:
            stacked = pool.take(slot, (len(inputs.experts), *shape), dtype)
    payloads: list[Any] = [None] * len(inputs.experts) if with_experts else []
    sizes = [0] * len(payloads)
    read = [wanted is None or i in wanted for i in range(len(payloads))]
    same = [r and stacked is not None and base_in_pool and _same_bytes(inputs, e, item.name)
            for r, e in zip(read, inputs.experts)]

    def read_base() -> int:
        nonlocal base
        if base is None:
            base = inputs.base_checkpoint.get(item.name, item.rows)
        elif base_meta.dtype == base.dtype:
            inputs.base_checkpoint.read_into(item.name, base, item.rows)
        else:
            inputs.base_checkpoint.read_converted_into(item.name, base, item.rows)
        return base.numel() * base_meta.dtype.itemsize

    def read_expert(i: int) -> None:
        expert = inputs.experts[i]
        if stacked is not None and expert.read_weight_into(item.name, stacked[i], item.rows):
            payloads[i], sizes[i] = IN_BUFFER, stacked[i].nbytes
        elif stacked is not None and _read_widened(expert, item, stacked[i]):
            payloads[i] = IN_BUFFER
            sizes[i] = stacked[i].numel() * expert.checkpoint.meta[item.name].dtype.itemsize
        else:
            payload = expert.fetch(item.name, item.rows) if item.rows else expert.fetch(item.name)
            payloads[i], sizes[i] = payload, _payload_bytes(payload)

    to_read = [i for i in range(len(payloads)) if read[i] and not same[i]]
    parallel = helpers is not None and len(to_read) > 1 and \
        math.prod(shape) * (len(to_read) + 1) * (dtype or base_meta.dtype).itemsize >= SPLIT_READ_BYTES
    if parallel:
        futures = [helpers.submit(read_expert, i) for i in to_read[1:]]
        nbytes = read_base()
        read_expert(to_read[0])
        for future in futures:
            future.result()
    else:
        nbytes = read_base()
        for i in to_read:
            read_expert(i)
    for i in range(len(payloads)):
        if same[i]:  # the base's bytes: the same values as reading them again
            stacked[i].copy_(base)
            payloads[i], sizes[i] = IN_BUFFER, base.numel() * base_meta.dtype.itemsize
    nbytes += sum(sizes)
    return Fetched(item, base, payloads, nbytes, stacked, pool if pooled else None)


def _same_bytes(inputs: MergeInputs, expert: Expert, name: str) -> bool:
    """Whether a full expert's tensor ``name`` is the base's (same file and offset, same dtype and shape)."""
    if not isinstance(expert, FullExpert):
        return False
    mine, theirs = expert.checkpoint.meta.get(name), inputs.base_checkpoint.meta[name]
    if mine is None or (mine.offset, mine.nbytes, mine.dtype, mine.shape) != \
            (theirs.offset, theirs.nbytes, theirs.dtype, theirs.shape):
        return False
    key = (mine.file, theirs.file)
    known = inputs.same_files.get(key)
    if known is None:
        known = inputs.same_files[key] = _same_file(mine.file, theirs.file)
    return known


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


#: A work item at least this large (bytes in the compute dtype) is read by several threads.
SPLIT_READ_BYTES = 64 * 1024 * 1024


#: Exact conversions (every value representable): float16/bfloat16 to float32 or float64, float32 to float64.
_WIDER = {torch.float16: (torch.float32, torch.float64), torch.bfloat16: (torch.float32, torch.float64),
          torch.float32: (torch.float64,)}


def _read_widened(expert: Expert, item: WorkItem, out: torch.Tensor) -> bool:
    """Read a full fine-tune's half-precision weight into the compute-dtype buffer, converting in chunks.

    The reader thread converts (off the merge thread) and no stored-dtype copy of the tensor is
    kept. Only exact conversions, so the buffer holds the expert's weights bit for bit.
    """
    if not isinstance(expert, FullExpert):
        return False
    meta = expert.checkpoint.meta.get(item.name)
    if meta is None or out.dtype not in _WIDER.get(meta.dtype, ()):
        return False
    expert.checkpoint.read_converted_into(item.name, out, item.rows)
    return True


def _payload_bytes(payload: Any) -> int:
    if payload is None or payload is IN_BUFFER:
        return 0
    if isinstance(payload, torch.Tensor):
        return payload.nbytes
    if isinstance(payload, dict):
        return sum(_payload_bytes(v) for v in payload.values())
    if isinstance(payload, (list, tuple)):
        return sum(_payload_bytes(v) for v in payload)
    return 0


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity where the OS tells it)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


@contextlib.contextmanager
def compute_threads(device: torch.device) -> Iterator[int]:
    """Leave one core to the reader threads while merging on the CPU (torch intra-op threads).

    Merging is memory-bound and the readers copy from the page cache on a core of their own.
    With as many intra-op threads as cores, each op's threads spin-wait for a core the readers
    (or other processes) hold: on 2 cores, task arithmetic of 8 GPT-2-small experts took 23 s
    with 2 intra-op threads and 6.7 s with 1. The previous setting is restored on exit; a lower
    one set by the caller is kept.

    Yields:
        The intra-op thread count in force.
    """
    before = torch.get_num_threads()
    if device.type != "cpu":
        yield before
        return
    want = max(1, min(before, usable_cores() - 1))
    if want == before:
        yield before
        return
    torch.set_num_threads(want)
    try:
        yield want
    finally:
        torch.set_num_threads(before)


def prefetched(inputs: MergeInputs, items: list[WorkItem] | list[str], *, lookahead: int = 2,
               threads: int = 2, pooled_dtype: torch.dtype | None = None,
               pool_base: bool = False, skip_unchanged: bool = False,
               experts_for: Callable[[str], Collection[int]] | None = None) -> Iterator[Fetched]:
    """Yield each work item's inputs, reading up to ``lookahead`` items ahead in threads.

    Non-floating tensors of the base are yielded without expert payloads.

    Args:
        inputs: The opened inputs.
        items: Work items (or plain tensor names) in the order wanted.
        lookahead: How many items may be in flight besides the one being merged.
        threads: Reader threads.
        pooled_dtype: When given (the compute dtype), experts whose stored dtype matches are
            read straight into reusable stacked buffers. The consumer must be done with an
            item (including its :class:`TensorGroup`) before asking for the next one.
        pool_base: With ``pooled_dtype``, the base's floating tensors are read into the same
            reused buffers, converted to ``pooled_dtype`` (``Fetched.base`` is then in the
            compute dtype; :meth:`BufferPool.owns` tells what a result must not keep).
        skip_unchanged: Read only the base of a tensor that no expert changes
            (:meth:`Expert.changes`); its :attr:`Fetched.unchanged` is then true.
        experts_for: Given a tensor name, the indices of the experts to read (the others'
            payloads are ``None``); default all.

    Yields:
        :class:`Fetched` in order.
    """
    meta = inputs.base_checkpoint.meta
    work = [WorkItem(i) if isinstance(i, str) else i for i in items]
    pool = BufferPool(lookahead + 2) if pooled_dtype is not None else None
    width = (len(inputs.experts) + 1) * (pooled_dtype or torch.float32).itemsize

    def item_bytes(item: WorkItem) -> int:  # what the item will hold in memory, roughly
        m = meta[item.name]
        elements = m.nbytes // max(1, m.dtype.itemsize)
        if item.rows is not None and m.shape and m.shape[0]:
            elements = elements // m.shape[0] * (item.rows[1] - item.rows[0])
        return elements * width

    with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="hubmerge-read") as pool_threads, \
            ThreadPoolExecutor(max_workers=threads, thread_name_prefix="hubmerge-read-part") as helpers:
        pending: list[tuple[Future, int]] = []
        upcoming = list(enumerate(work))[::-1]

        def top_up(consumer_idle: bool) -> None:
            # Read ahead while the items in flight stay within PREFETCH_BYTES; a larger item is
            # read only once nothing else is held, so two huge tensors are never in memory at once.
            while upcoming and len(pending) < lookahead:
                index, item = upcoming[-1]
                size = item_bytes(item)
                held = sum(b for _, b in pending)
                if (pending or not consumer_idle) and held + size > PREFETCH_BYTES:
                    return
                upcoming.pop()
                pending.append((pool_threads.submit(_fetch, inputs, item, meta[item.name].dtype.is_floating_point,
                                                    pool, index, pooled_dtype, pool_base, helpers,
                                                    skip_unchanged,
                                                    None if experts_for is None else experts_for(item.name)),
                                 size))

        top_up(True)
        try:
            while pending:
                fetched = pending.pop(0)[0].result()
                top_up(False)
                yield fetched
                del fetched  # the consumer is done with it
                top_up(True)
        finally:
            for future, _ in pending:
                future.cancel()


def build_group(inputs: MergeInputs, fetched: Fetched, device: torch.device, dtype: torch.dtype) -> TensorGroup:
    """Move a fetched tensor (or block) to the device and build its task vectors in place.

    Args:
        inputs: The opened inputs.
        fetched: What the readers read.
        device: Compute device.
        dtype: Compute dtype.

    Returns:
        The :class:`TensorGroup` (deltas stacked on dim 0; zeros where an expert leaves the tensor).
    """
    base = fetched.base.to(device=device, dtype=dtype, non_blocking=True)
    if fetched.stacked is not None and fetched.stacked.dtype == dtype:
        deltas = fetched.stacked.to(device=device, non_blocking=True)
    else:
        deltas = torch.empty((len(inputs.experts), *base.shape), device=device, dtype=dtype)
    in_buffer = [p is IN_BUFFER for p in fetched.expert_payloads]
    if all(in_buffer):
        deltas.sub_(base)  # one broadcast pass: weights -> task vectors
    else:
        for i, (expert, payload) in enumerate(zip(inputs.experts, fetched.expert_payloads)):
            if in_buffer[i]:
                deltas[i].sub_(base)
            elif payload is None or not expert.task_vector_into(fetched.name, payload, base, deltas[i]):
                deltas[i].zero_()
    return TensorGroup(fetched.name, base, deltas, [e.label for e in inputs.experts], rows=fetched.item.rows)


def prepass_items(method: MergeMethod, inputs: MergeInputs, names: list[str], dtype: torch.dtype) -> list[WorkItem]:
    """The work items a pre-pass streams: the floating tensors of ``names``, split as :func:`plan_items` does.

    Items depend on each tensor alone, so the items of a subset of ``names`` (one unit of a
    distributed run) are exactly the corresponding slice of the items of all names.
    """
    floating = [n for n in names if inputs.base_checkpoint.meta[n].dtype.is_floating_point]
    return plan_items(inputs, floating, elementwise=getattr(method, "elementwise", False), dtype=dtype)


def observe_items(method: MergeMethod, pass_index: int, inputs: MergeInputs, items: list[WorkItem],
                  device: torch.device, dtype: torch.dtype) -> Iterator[tuple[Fetched, dict[str, torch.Tensor]]]:
    """Yield each item with what ``method.observe`` returned for it in pre-pass ``pass_index``.

    The caller must be done with one item's statistics before asking for the next
    (they may share reused buffers). Used by :func:`run_prepasses` and by distributed executors.
    """
    for fetched in prefetched(inputs, items, pooled_dtype=dtype if device.type == "cpu" else None, pool_base=True):
        group = build_group(inputs, fetched, device, dtype)
        stats = method.observe(pass_index, group)
        del group
        yield fetched, stats


def add_statistics(totals: dict[str, torch.Tensor], stats: dict[str, torch.Tensor]) -> None:
    """Add one group's pre-pass statistics into ``totals`` (in place; the first value is copied)."""
    for key, value in stats.items():
        if key in totals:
            totals[key] += value
        else:
            totals[key] = value.clone()


def run_prepasses(method: MergeMethod, inputs: MergeInputs, names: list[str], device: torch.device,
                  dtype: torch.dtype, progress: ProgressCallback | None = None) -> None:
    """Stream every floating tensor through the method's pre-passes, summing its statistics.

    Args:
        method: The merge method (``method.prepasses`` passes).
        inputs: The opened inputs.
        names: Tensor names in storage order.
        device: Compute device.
        dtype: Compute dtype.
        progress: Optional progress callback.
    """
    items = prepass_items(method, inputs, names, dtype)
    floating_count = sum(item.last for item in items)
    with compute_threads(device):
        _run_passes(method, inputs, items, floating_count, device, dtype, progress)


def _run_passes(method: MergeMethod, inputs: MergeInputs, items: list[WorkItem], floating_count: int,
                device: torch.device, dtype: torch.dtype, progress: ProgressCallback | None) -> None:
    for pass_index in range(method.prepasses):
        totals: dict[str, torch.Tensor] = {}
        done_bytes = 0
        stage = f"prepass {pass_index + 1}/{method.prepasses}"
        done_tensors = 0
        for fetched, stats in observe_items(method, pass_index, inputs, items, device, dtype):
            add_statistics(totals, stats)
            done_bytes += fetched.nbytes
            done_tensors += fetched.item.last
            if progress:
                progress(Progress(stage, done_tensors, floating_count, done_bytes, inputs.bytes_per_pass))
        method.finish_pass(pass_index, totals)


def merge_items(method: MergeMethod, inputs: MergeInputs, items: list[WorkItem], specs: dict[str, TensorSpec],
                device: torch.device, dtype: torch.dtype, write: Callable[[str, torch.Tensor, bool], None],
                *, method_name: str | None = None, on_item: Callable[[Fetched], None] | None = None) -> None:
    """Merge work items in order and hand each result to ``write(name, tensor, last)``.

    The merge loop shared by :func:`merge` (all tensors, one :class:`ShardedWriter`) and
    distributed executors (the tensors of one output shard). Non-floating tensors are the
    base's; results are moved to the CPU in their output spec's dtype.

    Args:
        method: The merge method (pre-passes already finished).
        inputs: The opened inputs.
        items: Work items (from :func:`plan_items`) in write order.
        specs: Output spec of every tensor named by ``items``.
        device: Compute device.
        dtype: Compute dtype.
        write: Receives ``(name, cpu_tensor, last)`` for each item, in order.
        method_name: Name for error messages (default ``method.name``).
        on_item: Called after each item was written (progress).

    Raises:
        HubmergeError: If the method returns a tensor of the wrong shape.
    """
    with compute_threads(device):
        _merge_loop(method, inputs, items, specs, device, dtype, write, method_name, on_item)


def _merge_loop(method: MergeMethod, inputs: MergeInputs, items: list[WorkItem], specs: dict[str, TensorSpec],
                device: torch.device, dtype: torch.dtype, write: Callable[[str, torch.Tensor, bool], None],
                method_name: str | None, on_item: Callable[[Fetched], None] | None) -> None:
    pooled = dtype if device.type == "cpu" else None
    totals: dict[str, torch.Tensor] = {}
    skip = bool(getattr(method, "unchanged_when_zero", False))
    for fetched in prefetched(inputs, items, pooled_dtype=pooled, pool_base=True, skip_unchanged=skip):
        item = fetched.item
        if skip and fetched.unchanged:  # no expert changes it: the merge is the base
            if item.tensor_pass is not None:
                continue
            write(fetched.name, fetched.base.to(dtype=dtype).to(dtype=specs[fetched.name].dtype), item.last)
            if on_item is not None:
                on_item(fetched)
            continue
        if item.tensor_pass is not None:  # per-tensor statistics: no output yet
            group = build_group(inputs, fetched, device, dtype)
            add_statistics(totals, method.observe_tensor(item.tensor_pass, group))
            del group, fetched
            if item.last:
                method.finish_tensor(item.tensor_pass, item.name, totals)
                totals = {}
            continue
        spec = specs[fetched.name]
        if not fetched.base.dtype.is_floating_point:
            merged = fetched.base
        else:
            group = build_group(inputs, fetched, device, dtype)
            merged = method.merge_tensor(group)
            if tuple(merged.shape) != tuple(group.base.shape):
                raise HubmergeError(
                    f"method {method_name or method.name!r} returned shape {list(merged.shape)} for "
                    f"{fetched.name!r}, expected {list(group.base.shape)}"
                )
            del group
        out = merged.to(device="cpu", dtype=spec.dtype)
        if fetched.pool is not None and fetched.pool.owns(out):
            out = out.clone()  # a view of a reused buffer (the base, a weight): the writer may keep it
        del merged
        write(fetched.name, out, fetched.item.last)
        del out
        if on_item is not None:
            on_item(fetched)
        del fetched  # its buffers are free before the next item is read


@dataclass
class MergeResult:
    """What a merge produced and how it went."""

    output_dir: Path
    recipe: Recipe
    method: MergeMethod
    base: ResolvedModel
    experts: list[ResolvedModel]
    device: str
    seconds: float
    bytes_read: int
    bytes_written: int
    tensors: int
    extra: dict[str, Any] = field(default_factory=dict)


def output_specs(checkpoint: Checkpoint, out_dtype: torch.dtype | None) -> list[TensorSpec]:
    """Output tensor specs: the base's names and shapes; floating tensors in ``out_dtype`` if given."""
    specs = []
    for name, meta in checkpoint.meta.items():
        dtype = out_dtype if (out_dtype is not None and meta.dtype.is_floating_point) else meta.dtype
        specs.append(TensorSpec(name, meta.shape, dtype))
    return specs


def copy_model_files(source: Path, writer: ShardedWriter) -> list[str]:
    """Copy config, tokenizer and other non-weight files of the base into the output.

    Args:
        source: The base model directory.
        writer: The output writer.

    Returns:
        Relative paths copied.
    """
    copied = []
    for path in sorted(source.rglob("*")):
        rel = path.relative_to(source)
        if not path.is_file() or rel.parts[0].startswith(".") or path.name in SKIPPED_FILES:
            continue
        if path.suffix in WEIGHT_SUFFIXES or path.name.endswith(".index.json"):
            continue
        writer.add_file(rel.as_posix(), path)
        copied.append(rel.as_posix())
    return copied


def merge(recipe: Recipe, *, output: str | Path | None = None, device: str | None = None,
          overwrite: bool = False, token: str | None = None, progress: ProgressCallback | None = None,
          file: str | None = None) -> MergeResult:
    """Run a single-output merge recipe and write the merged model directory.

    Args:
        recipe: A schema-valid recipe (method and params are checked here before any work).
        output: Output directory (overrides ``recipe.output.path``).
        device: Compute device (overrides ``recipe.device``).
        overwrite: Replace an existing output directory that hubmerge did not write.
        token: Hub token for private inputs.
        progress: Called with :class:`Progress` as tensors are merged.
        file: Recipe file name for error messages.

    Returns:
        A :class:`MergeResult`.

    Raises:
        RecipeError: Bad recipe (method, params, no output path, device).
        HubmergeError: Any input or output problem, before work starts where possible;
            on failure no output directory is left behind.
    """
    from .card import build_card, card_inputs_from_result
    from .lineage import resolved_recipe_yaml

    method = check_recipe(recipe, file=file)
    if recipe.flexmerge is not None:
        raise RecipeError("a FlexMerge recipe writes deployments: use hubmerge.flexmerge.run_flexmerge "
                          "(or `hubmerge run`)", field="flexmerge", file=file)
    if method.output != "model":
        raise RecipeError(
            f"method {recipe.method!r} produces a per-task deployment; run it with `hubmerge run`", field="method"
        )
    target = Path(output or recipe.output.path or "")
    if not str(target) or str(target) == ".":
        raise RecipeError("no output directory (set output.path or pass --output)", field="output.path", file=file)
    if output is None:  # the recipe chose it: it must stay where hubmerge runs
        confine_output_path(target, file=file)
    compute_device = resolve_device(device or recipe.device)
    compute_dtype = getattr(torch, recipe.dtype)
    out_dtype = getattr(torch, recipe.output.dtype) if recipe.output.dtype else None

    started = time.perf_counter()
    inputs = open_inputs(recipe, token=token)
    try:  # methods that learn from samples (AdaMerging) do it here, before any output exists
        method.prepare(MergeContext(recipe, inputs, compute_device, compute_dtype, token))
    except BaseException:
        inputs.close()
        raise
    if recipe.output.format == "adapter":
        try:
            return _merge_to_adapter(recipe, method, inputs, target, overwrite=overwrite, device=compute_device,
                                     dtype=compute_dtype, progress=progress, started=started)
        finally:
            inputs.close()
    writer = None
    try:
        names = inputs.base_checkpoint.names()
        writer = ShardedWriter(target, output_specs(inputs.base_checkpoint, out_dtype),
                               shard_size=recipe.output.shard_size, overwrite=overwrite)
        run_prepasses(method, inputs, names, compute_device, compute_dtype, progress)
        bytes_read = inputs.bytes_per_pass * method.prepasses
        done = [0, 0]  # bytes, tensors
        items = plan_items(inputs, writer.names, elementwise=method.elementwise, dtype=compute_dtype,
                           tensor_passes=method.tensor_passes)

        def merged_one(fetched: Fetched) -> None:
            done[0] += fetched.nbytes
            done[1] += fetched.item.last
            if progress:
                progress(Progress("merge", done[1], len(names), done[0], inputs.bytes_per_pass))

        # Writing (and flushing to disk) runs on a thread of its own, overlapping the merge.
        background = BackgroundWriter(writer)
        try:
            merge_items(method, inputs, items, writer.specs, compute_device, compute_dtype, background.write,
                        method_name=recipe.method, on_item=merged_one)
        except BaseException:
            background.cancel()
            raise
        background.close()
        bytes_read += inputs.bytes_per_pass
        copy_model_files(inputs.base.directory, writer)
        experts = [e.resolved for e in inputs.experts]
        result = MergeResult(
            output_dir=target, recipe=recipe, method=method, base=inputs.base, experts=experts,
            device=str(compute_device), seconds=0.0, bytes_read=bytes_read, bytes_written=writer.bytes_written,
            tensors=len(names),
        )
        recipe_yaml = resolved_recipe_yaml(result)
        writer.add_file("hubmerge_recipe.yaml", recipe_yaml)
        result.output_dir = writer.temp
        writer.add_file("README.md", str(build_card(card_inputs_from_result(result))))
        result.output_dir = writer.finish()
        result.seconds = time.perf_counter() - started
        logger.info("merged %d tensors in %.2fs on %s", len(names), result.seconds, compute_device)
        return result
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    finally:
        inputs.close()


def _merge_to_adapter(recipe: Recipe, method: MergeMethod, inputs: MergeInputs, target: Path, *, overwrite: bool,
                      device: torch.device, dtype: torch.dtype, progress: ProgressCallback | None,
                      started: float) -> MergeResult:
    """``output.format: adapter``: see :mod:`hubmerge.adapters.output`."""
    from .adapters.output import check_adapter_output, write_adapter
    from .lineage import resolved_recipe_yaml
    from .writer import check_output_path

    check_adapter_output(recipe, method, inputs.experts)
    check_output_path(Path(target).absolute(), overwrite=overwrite)
    result = MergeResult(output_dir=target, recipe=recipe, method=method, base=inputs.base,
                         experts=[e.resolved for e in inputs.experts], device=str(device), seconds=0.0,
                         bytes_read=0, bytes_written=0, tensors=0)
    directory, errors = write_adapter(recipe, method, inputs, target, overwrite=overwrite, device=device,
                                      dtype=dtype, progress=progress,
                                      extra_files={"hubmerge_recipe.yaml": resolved_recipe_yaml(result)})
    result.output_dir = directory
    result.extra["adapter_errors"] = errors
    result.seconds = time.perf_counter() - started
    return result
