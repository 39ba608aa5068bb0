"""Scale-out: one merge as independent units, run on Ray workers, bit-identical to a local run.

The engine's plan is a list of **units**, one per output shard (:class:`Unit`): the shard's tensors
(and their work items, row blocks included), the byte ranges of every input it reads, and the
shard's size. A unit is self-contained: a worker opens the inputs from a path it can see, reads
only its tensors' bytes, merges them with the method instance shipped to it, and writes the
shard into the output's temporary directory. The driver plans, reduces, verifies and finishes::

    driver: open_inputs (Hub inputs resolved into the HF cache) -> plan units, ShardedWriter temp dir
      for each pre-pass:   map   observe_unit(unit)   -> partial statistics
                           reduce  (exactly as a local run would) -> method.finish_pass
      merge:               map   merge_unit(unit)     -> shard file + sha256  (retried on a crash)
                           verify  every shard's size and sha256 on the driver
      index, config/tokenizer, hubmerge_recipe.yaml, README.md -> atomic rename into place

**FlexMerge recipes** (:func:`flexmerge_distributed`, :func:`flexmerge_with_ray`; ``hubmerge run
flex.yaml --executor ray``) run :func:`hubmerge.flexmerge.run_flexmerge` with a runner::

    driver: open_inputs -> blocks
      similarity:        map observe(unit) -> per-item Gram matrices -> reduce in the local order
      order, sizes:      on the driver (cosines, complete-linkage order, each size's groups)
      inner pre-passes:  map-reduce of every group's statistics (:class:`~hubmerge.flexmerge.GroupStatistics`)
      write:             one DeploymentUnit per shard of each size's deployment:
                         map write_deployment_unit(unit) -> deployment shard + sha256 (retried on a crash)
                         verify every shard on the driver
      per size: index, deployment.json, config, recipe; flexmerge.json -> the whole output renamed at once

A deployment's shards are planned exactly as the local writer plans them (same stored tensors,
same order, same ``output.shard_size``), so every file -- shards, ``deployment.safetensors.index.json``,
``deployment.json``, ``flexmerge.json`` -- is byte-identical to a local run's (the recipes'
``created`` time aside). Every size and ``sizes: all`` work; a unit merges only its shard's
groups, so a group stored by several sizes is merged once per size (``sizes: all`` reads the
inputs up to once per size in the write pass, spread over the workers). Pre-pass units are
``output.shard_size`` of the base; to spread a small model over many workers, lower it.
Per-task deployment *methods* (EMR, TALL: ``method``) and adapter outputs (``output.format``)
are refused (:func:`check_distributable`): they run locally.

**Identical to the local run.** Work items, shard headers and file names come from the same
code (:func:`hubmerge.engine.plan_items`, :func:`~hubmerge.engine.merge_items`,
:func:`~hubmerge.writer.plan_shards`, :func:`~hubmerge.writer.safetensors_header`). Pre-pass
statistics are sums; integer (and boolean) statistics are exact in any order, so each unit returns
its partial sum. Floating statistics (e.g. FlexMerge's Gram matrices) depend on the order of the
additions, so a unit returns them per work item and the driver adds them up in the local run's
order. Seeded methods draw per tensor (:meth:`~hubmerge.method.TensorGroup.generator`).
Element-wise maths gives the same bits with any torch thread count; BLAS/LAPACK results (the
Gram matrices, ``tsv``'s SVDs) are only guaranteed equal with the same thread count as the
local run (``--cpus-per-worker``; a local CPU pre-pass uses one thread less than the cores).

**Crash safety.** A unit writes to a per-attempt temporary file (``.unit-NNNNN-<pid>-<uuid>``) in
the output's (FlexMerge: its deployment's) temporary directory, fsyncs it and *links* it to the
shard's name: the first complete attempt wins, a later one (a retry after a worker that died
after finishing) finds the shard there, checks it holds the same bytes and discards its own. A partial shard is never at
the final name. Ray retries a unit whose worker died (``max_retries``); the driver removes
leftovers of dead attempts, re-hashes every shard (``verify="hash"``) and only then renames the
whole directory into place. Errors raised by the merge itself are not retried (they would fail
again) and abort the run, leaving nothing behind.

**Where things live.** Workers need the inputs and the output directory on a path they can all
see (one machine, or a shared filesystem). Hub inputs are downloaded on the driver into the
Hugging Face cache (``HF_HOME`` / ``HF_HUB_CACHE``), which for a multi-node cluster must be on
the shared filesystem; a worker that cannot see an input says so, naming its host. Workers need
hubmerge and the method's plugin installed (same versions as the driver; Ray's ``runtime_env``
can ship them).

Ray is optional (``pip install 'hubmerge[ray]'``) and imported only when a Ray run starts.
:class:`LocalRunner` runs the same units one after another in this process (tests, benchmarks).
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import socket
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

from .checkpoint import Checkpoint
from .engine import (
    MergeInputs,
    MergeResult,
    Progress,
    ProgressCallback,
    WorkItem,
    add_statistics,
    copy_model_files,
    merge_items,
    observe_items,
    open_inputs,
    output_specs,
    plan_items,
    prepass_items,
    resolve_device,
)
from .errors import HubmergeError, RecipeError
from .method import MergeMethod
from .recipe import Recipe, check_recipe
from .sources import ResolvedModel, open_expert
from .writer import (
    ShardedWriter,
    TensorSpec,
    confine_output_path,
    plan_shards,
    safetensors_header,
    shard_file_names,
    tensor_bytes,
)

logger = logging.getLogger(__name__)

#: Prefix of a unit's per-attempt temporary file inside the output's temporary directory.
ATTEMPT_PREFIX = ".unit-"
#: How a missing Ray is reported.
INSTALL_HINT = "the Ray executor needs Ray: pip install 'hubmerge[ray]'"


class DistributedError(HubmergeError, RuntimeError):
    """A distributed run failed: a unit's worker died too often, a shard does not verify, a worker
    cannot see an input or the output."""


class RayNotInstalledError(HubmergeError, ImportError):
    """``--executor ray`` without Ray installed."""


def import_ray():
    """Import Ray, or raise :class:`RayNotInstalledError` saying how to install it."""
    try:
        import ray
    except ImportError as exc:
        raise RayNotInstalledError(INSTALL_HINT) from exc
    return ray


# -- the plan ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ByteRange:
    """``nbytes`` bytes at ``offset`` of ``file`` (an input's safetensors file)."""

    file: str
    offset: int
    nbytes: int


class _ShardBytes:
    """What a unit (:class:`Unit`, :class:`DeploymentUnit`) reads and writes, from its
    ``reads`` byte ranges and ``specs``."""

    reads: dict[str, tuple[ByteRange, ...]]
    specs: tuple[TensorSpec, ...]

    @property
    def bytes_read(self) -> int:
        """Bytes one pass over the unit reads (all inputs)."""
        return sum(r.nbytes for ranges in self.reads.values() for r in ranges)

    @property
    def bytes_written(self) -> int:
        """Bytes of tensor data the unit writes."""
        return sum(s.nbytes for s in self.specs)


@dataclass(frozen=True)
class Unit(_ShardBytes):
    """One independent piece of a merge: an output shard.

    Attributes:
        index: The shard's index (0-based).
        file_name: The shard's file name in the output (``model-00001-of-00004.safetensors``).
        specs: The shard's output tensors, in write order.
        items: Work items of the merge pass (tensors, or row blocks of them), in write order.
        prepass_items: Work items of each pre-pass (floating tensors only).
        prepass_start: Position of this unit's first pre-pass item in the local run's item order.
        reads: Input label (``base`` or an expert's label) to the byte ranges one pass reads.
        file_bytes: Size of the shard file (header + data).
    """

    index: int
    file_name: str
    specs: tuple[TensorSpec, ...]
    items: tuple[WorkItem, ...]
    prepass_items: tuple[WorkItem, ...]
    prepass_start: int
    reads: dict[str, tuple[ByteRange, ...]]
    file_bytes: int

    @property
    def label(self) -> str:
        """How errors name the unit: its shard file."""
        return self.file_name

    @property
    def names(self) -> list[str]:
        """Tensor names in write order."""
        return [s.name for s in self.specs]

    def input_files(self) -> dict[str, list[str]]:
        """Input label to the files this unit reads (for fetching only those, or for a report)."""
        return {label: sorted({r.file for r in ranges}) for label, ranges in self.reads.items()}


def _coalesce(ranges: list[ByteRange]) -> tuple[ByteRange, ...]:
    out: list[ByteRange] = []
    for r in sorted(ranges, key=lambda r: (r.file, r.offset)):
        if out and out[-1].file == r.file and out[-1].offset + out[-1].nbytes == r.offset:
            out[-1] = ByteRange(r.file, out[-1].offset, out[-1].nbytes + r.nbytes)
        elif r.nbytes:
            out.append(r)
    return tuple(out)


def _input_ranges(inputs: MergeInputs, names: list[str]) -> dict[str, tuple[ByteRange, ...]]:
    """Byte ranges of ``names`` in every input (whole files for adapters, which are small)."""
    def of(checkpoint: Checkpoint, wanted: list[str]) -> tuple[ByteRange, ...]:
        return _coalesce([ByteRange(str(checkpoint.meta[n].file), checkpoint.meta[n].offset,
                                    checkpoint.meta[n].nbytes) for n in wanted if n in checkpoint.meta])

    base_meta = inputs.base_checkpoint.meta
    floating = [n for n in names if base_meta[n].dtype.is_floating_point]
    reads = {"base": of(inputs.base_checkpoint, names)}
    for expert in inputs.experts:
        checkpoint = getattr(expert, "checkpoint", None)
        if isinstance(checkpoint, Checkpoint):  # a full fine-tune: the same tensors
            reads[expert.label] = of(checkpoint, floating)
        else:  # an adapter: its (small) weight files
            weights = getattr(expert, "weights", None)
            files = weights.files if isinstance(weights, Checkpoint) else []
            reads[expert.label] = tuple(ByteRange(str(f), 0, Path(f).stat().st_size) for f in files)
    return reads


def plan_units(inputs: MergeInputs, method: MergeMethod, shards: list[list[TensorSpec]], file_names: list[str],
               dtype: torch.dtype) -> list[Unit]:
    """Split a merge into one unit per output shard, with the same work items as a local run.

    Args:
        inputs: The opened inputs.
        method: The merge method (its ``elementwise`` decides row blocks).
        shards: The output shards (:func:`~hubmerge.writer.plan_shards`, as the writer plans them).
        file_names: The shards' file names.
        dtype: Compute dtype.

    Returns:
        The units, in shard order.
    """
    names = [s.name for shard in shards for s in shard]
    items = plan_items(inputs, names, elementwise=method.elementwise, dtype=dtype,
                       tensor_passes=getattr(method, "tensor_passes", 0))
    pre_items = prepass_items(method, inputs, names, dtype)
    shard_of = {s.name: i for i, shard in enumerate(shards) for s in shard}
    by_shard: list[list[WorkItem]] = [[] for _ in shards]
    pre_by_shard: list[list[WorkItem]] = [[] for _ in shards]
    for item in items:
        by_shard[shard_of[item.name]].append(item)
    for item in pre_items:
        pre_by_shard[shard_of[item.name]].append(item)
    units = []
    start = 0
    for i, shard in enumerate(shards):
        header = len(safetensors_header(shard))
        units.append(Unit(index=i, file_name=file_names[i], specs=tuple(shard), items=tuple(by_shard[i]),
                          prepass_items=tuple(pre_by_shard[i]), prepass_start=start,
                          reads=_input_ranges(inputs, [s.name for s in shard]),
                          file_bytes=header + sum(s.nbytes for s in shard)))
        start += len(pre_by_shard[i])
    return units


def plan_recipe_units(recipe: Recipe, method: MergeMethod, inputs: MergeInputs) -> list[Unit]:
    """The units a distributed run of ``recipe`` would run (for ``--dry-run`` and planning)."""
    out_dtype = getattr(torch, recipe.output.dtype) if recipe.output.dtype else None
    shards = plan_shards(output_specs(inputs.base_checkpoint, out_dtype), recipe.output.shard_size)
    return plan_units(inputs, method, shards, shard_file_names(len(shards)), getattr(torch, recipe.dtype))


# -- what a worker runs ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class UnitContext:
    """What every unit of one run shares (shipped once to the workers).

    Attributes:
        run_id: Identifies the run (workers cache opened inputs per run).
        base: The resolved base (a local directory every worker can see).
        experts: The resolved experts.
        temp_dir: The output's temporary directory (written by the driver's :class:`ShardedWriter`).
        device: Compute device (``auto``, ``cpu``, ``cuda``...; ``cuda:N`` means "a GPU" on a worker).
        dtype: Compute dtype name (``float32``).
        method_name: The recipe's method name (for errors).
        threads: torch threads per worker (``None``: leave as the worker has it). Element-wise
            maths gives the same bits with any thread count; LAPACK (``tsv``'s SVDs, ``wudi``) only
            with the same count as the run it is compared with.
    """

    run_id: str
    base: ResolvedModel
    experts: tuple[ResolvedModel, ...]
    temp_dir: str
    device: str
    dtype: str
    method_name: str
    threads: int | None = None


@dataclass
class UnitStats:
    """A unit's contribution to one pre-pass.

    Attributes:
        index: The unit's index.
        exact: Integer/boolean statistics summed over the unit's items (order does not matter).
        ordered: Per work item (in order), its floating statistics.
        seconds / bytes_read: How long it took and how much it read.
    """

    index: int
    exact: dict[str, torch.Tensor]
    ordered: list[dict[str, torch.Tensor]]
    seconds: float = 0.0
    bytes_read: int = 0
    host: str = ""


@dataclass
class UnitResult:
    """A written unit: its shard file, the file's sha256 and size, and where it ran."""

    index: int
    file_name: str
    sha256: str
    file_bytes: int
    seconds: float
    bytes_read: int
    host: str
    pid: int
    attempt: str
    won: bool  # this attempt's file became the shard (else an earlier attempt's did)


_OPEN: dict[str, MergeInputs] = {}


def open_resolved(ctx: UnitContext) -> MergeInputs:
    """Open the run's inputs from their resolved directories (cached per worker process and run).

    Raises:
        DistributedError: If this worker cannot see an input or the output directory.
    """
    cached = _OPEN.get(ctx.run_id)
    if cached is not None:
        return cached
    for old in list(_OPEN):  # one run at a time per worker: release the previous run's files
        _OPEN.pop(old).close()
    host = socket.gethostname()
    for model in (ctx.base, *ctx.experts):
        if not Path(model.directory).is_dir():
            raise DistributedError(f"worker on {host}: input {model.label!r} not found at {model.directory}; "
                                   "inputs must be on a path every worker sees (a shared filesystem, and "
                                   "HF_HOME there for Hub inputs)")
    if ctx.temp_dir and not Path(ctx.temp_dir).is_dir():
        raise DistributedError(f"worker on {host}: output directory {ctx.temp_dir} not found; the output must "
                               "be on a path every worker sees")
    base_checkpoint = Checkpoint(ctx.base.directory)
    experts = []
    try:
        for resolved in ctx.experts:
            experts.append(open_expert(resolved, base_checkpoint))
    except BaseException:
        base_checkpoint.close()
        for expert in experts:
            expert.close()
        raise
    inputs = MergeInputs(ctx.base, base_checkpoint, experts)
    _OPEN[ctx.run_id] = inputs
    return inputs


def _worker_device(ctx: UnitContext) -> torch.device:
    if ctx.threads and torch.get_num_threads() != ctx.threads:
        torch.set_num_threads(ctx.threads)
    device = ctx.device
    if device.startswith("cuda:"):  # Ray gives each task its own GPU, visible as cuda:0
        device = "cuda"
    return resolve_device(device)


def observe_unit(ctx: UnitContext, unit: Unit, method: MergeMethod, pass_index: int) -> UnitStats:
    """Run pre-pass ``pass_index`` over one unit's tensors (on a worker, or in-process).

    Returns:
        The unit's :class:`UnitStats` (CPU tensors).
    """
    started = time.perf_counter()
    inputs = open_resolved(ctx)
    device = _worker_device(ctx)
    dtype = getattr(torch, ctx.dtype)
    exact: dict[str, torch.Tensor] = {}
    ordered: list[dict[str, torch.Tensor]] = []
    read = 0
    for fetched, stats in observe_items(method, pass_index, inputs, list(unit.prepass_items), device, dtype):
        floats = {}
        for key, value in stats.items():
            if value.is_floating_point() or value.is_complex():
                floats[key] = value.detach().to("cpu", copy=True)
            else:
                add_statistics(exact, {key: value.detach()})
        ordered.append(floats)
        read += fetched.nbytes
    return UnitStats(unit.index, {k: v.cpu() for k, v in exact.items()}, ordered,
                     seconds=time.perf_counter() - started, bytes_read=read, host=socket.gethostname())


class UnitShardWriter:
    """Writes one output shard: header, then tensors in plan order, to a per-attempt file.

    :meth:`commit` fsyncs and links the file to the shard's name (first complete attempt wins).
    """

    def __init__(self, temp_dir: Path, unit: Unit | DeploymentUnit):
        self.unit = unit
        self.temp_dir = Path(temp_dir)
        self.attempt = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.path = self.temp_dir / f"{ATTEMPT_PREFIX}{unit.index:05d}-{self.attempt}"
        self.final = self.temp_dir / unit.file_name
        self._hash = hashlib.sha256()
        self._handle = open(self.path, "wb")  # noqa: SIM115 - closed by commit() or abort()
        self._next = 0
        self._partial = 0
        self._put(safetensors_header(list(unit.specs)))

    def _put(self, data: bytes | memoryview) -> None:
        self._handle.write(data)
        self._hash.update(data)

    def write(self, name: str, tensor: torch.Tensor, last: bool = True) -> None:
        """Append the next tensor or block of rows (checked against the plan, as ShardedWriter does)."""
        specs = self.unit.specs
        if self._next >= len(specs):
            raise ValueError(f"unit {self.unit.index}: unexpected tensor {name!r}")
        spec = specs[self._next]
        rows_ok = tuple(tensor.shape) == spec.shape or (
            tensor.dim() == len(spec.shape) and tuple(tensor.shape[1:]) == spec.shape[1:])
        if name != spec.name or not rows_ok or tensor.dtype != spec.dtype:
            raise ValueError(f"tensor {name!r} {tuple(tensor.shape)} {tensor.dtype} does not match the plan "
                             f"({spec.name!r} {spec.shape} {spec.dtype})")
        data = tensor_bytes(tensor.cpu())
        self._put(data)
        self._partial += data.nbytes
        if self._partial > spec.nbytes or (last and self._partial != spec.nbytes):
            raise ValueError(f"tensor {name!r}: {self._partial} bytes written, the plan has {spec.nbytes}")
        if last:
            self._next += 1
            self._partial = 0

    def commit(self) -> tuple[str, bool]:
        """Finish the file and make it the shard.

        Returns:
            ``(sha256, won)``: ``won`` is false when an earlier attempt's identical shard was kept.

        Raises:
            DistributedError: If the shard is incomplete or an earlier attempt wrote other bytes.
        """
        if self._next != len(self.unit.specs):
            raise DistributedError(f"unit {self.unit.index}: tensor {self.unit.specs[self._next].name!r} "
                                   "was never written")
        self._handle.flush()
        os.fsync(self._handle.fileno())
        self._handle.close()
        digest = self._hash.hexdigest()
        size = self.path.stat().st_size
        if size != self.unit.file_bytes:
            raise DistributedError(f"{self.unit.file_name}: wrote {size} bytes, the plan has {self.unit.file_bytes}")
        try:
            os.link(self.path, self.final)  # atomic, and never replaces a shard already there
            won = True
        except FileExistsError:
            won = False
        except OSError as exc:  # a filesystem without hard links: rename, still atomic
            if exc.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EXDEV, errno.EMLINK):
                raise
            won = not self.final.exists()
            if won:
                os.replace(self.path, self.final)
        if not won:
            theirs = file_sha256(self.final)
            if theirs != digest:
                self.path.unlink(missing_ok=True)
                raise DistributedError(f"{self.unit.file_name}: two attempts wrote different bytes "
                                       f"({theirs[:12]} vs {digest[:12]}): the method is not deterministic")
        self.path.unlink(missing_ok=True)
        return digest, won

    def abort(self) -> None:
        """Close and remove this attempt's file."""
        try:
            self._handle.close()
        except OSError:
            pass
        self.path.unlink(missing_ok=True)


def merge_unit(ctx: UnitContext, unit: Unit, method: MergeMethod) -> UnitResult:
    """Merge one unit and write its shard into the output's temporary directory.

    Returns:
        The :class:`UnitResult` with the shard's sha256.
    """
    started = time.perf_counter()
    inputs = open_resolved(ctx)
    device = _worker_device(ctx)
    dtype = getattr(torch, ctx.dtype)
    writer = UnitShardWriter(Path(ctx.temp_dir), unit)
    read = [0]

    def counted(fetched) -> None:
        read[0] += fetched.nbytes

    try:
        merge_items(method, inputs, list(unit.items), {s.name: s for s in unit.specs}, device, dtype, writer.write,
                    method_name=ctx.method_name, on_item=counted)
        digest, won = writer.commit()
    except BaseException:
        writer.abort()
        raise
    return UnitResult(unit.index, unit.file_name, digest, unit.file_bytes, time.perf_counter() - started, read[0],
                      socket.gethostname(), os.getpid(), writer.attempt, won)


def run_unit_task(kind: str, ctx: UnitContext, unit: Any, method: Any, pass_index: int = -1) -> Any:
    """The one task function the runners call: ``kind`` is ``observe``, ``merge`` or ``deploy``."""
    if kind == "observe":
        return observe_unit(ctx, unit, method, pass_index)
    if kind == "merge":
        return merge_unit(ctx, unit, method)
    if kind == "deploy":
        return write_deployment_unit(ctx, unit, method)
    raise ValueError(f"unknown unit task {kind!r}")


def file_sha256(path: Path, chunk: int = 8 * 1024 * 1024) -> str:
    """sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


# -- the reduction -------------------------------------------------------------------------------------------
def reduce_statistics(parts: list[UnitStats]) -> dict[str, torch.Tensor]:
    """Sum the units' statistics into what a local run's :func:`~hubmerge.engine.run_prepasses` sums.

    Integer statistics: the units' partial sums added up (exact in any order). Floating
    statistics: every item's value added in the local run's order (units in shard order, items in
    order), so the totals are bit-identical.

    Raises:
        DistributedError: If a statistic is integer for some items and floating for others.
    """
    parts = sorted(parts, key=lambda p: p.index)
    exact: dict[str, torch.Tensor] = {}
    for part in parts:
        add_statistics(exact, part.exact)
    ordered: dict[str, torch.Tensor] = {}
    for part in parts:
        for stats in part.ordered:
            add_statistics(ordered, stats)
    mixed = set(exact) & set(ordered)
    if mixed:
        raise DistributedError(f"pre-pass statistic {min(mixed)!r} is integer for some tensors and "
                               "floating for others")
    return {**exact, **ordered}


# -- runners ---------------------------------------------------------------------------------------------------
class UnitRunner(Protocol):
    """Runs unit tasks somewhere: :class:`LocalRunner` (here, in order) or :class:`RayRunner`."""

    description: str
    device: str

    def share(self, obj: Any) -> Any:
        """A handle to ``obj`` the tasks receive (shipped once)."""

    def map(self, kind: str, ctx: Any, units: list[Any], method: Any, pass_index: int = -1) -> Iterator[Any]:
        """Run ``run_unit_task(kind, ctx, unit, method, pass_index)`` for every unit; yield results as they end."""

    def cancel(self) -> None:
        """Stop whatever is still running (after a failure)."""


class LocalRunner:
    """Runs the units one after another in this process (for tests, benchmarks, debugging)."""

    description = "local"
    threads = None

    def __init__(self, device: str | None = None):
        self.device = device or ""

    def share(self, obj: Any) -> Any:
        return obj

    def map(self, kind: str, ctx: Any, units: list[Any], method: Any, pass_index: int = -1) -> Iterator[Any]:
        for unit in units:
            yield run_unit_task(kind, ctx, unit, method, pass_index)

    def cancel(self) -> None:
        pass


_REMOTE_TASK = None


class RayRunner:
    """Runs unit tasks on a Ray cluster (or a local Ray instance), ``workers`` at a time.

    Args:
        address: Ray address (``auto``, ``ray://host:10001``...); ``None`` connects to the running
            Ray of this process or ``RAY_ADDRESS``, else starts a local instance.
        workers: Most tasks in flight (default: as many as Ray schedules).
        max_retries: Times Ray re-runs a unit whose worker died.
        num_cpus: CPUs per task (a worker's torch threads).
        num_gpus: GPUs per task; ``None``: 1 when the cluster has GPUs and the device is not ``cpu``.
        device: The run's device (``auto``, ``cpu``, ``cuda``).
        init_kwargs: More arguments for ``ray.init`` (``runtime_env``...).

    Raises:
        RayNotInstalledError: If Ray is not installed.
    """

    def __init__(self, address: str | None = None, *, workers: int | None = None, max_retries: int = 3,
                 num_cpus: float = 1, num_gpus: float | None = None, device: str = "auto",
                 init_kwargs: dict[str, Any] | None = None):
        self.ray = import_ray()
        ray = self.ray
        self.started = False
        if not ray.is_initialized():
            kwargs = {"include_dashboard": False, "log_to_driver": True, **(init_kwargs or {})}
            if address is None and not os.environ.get("RAY_ADDRESS"):
                if workers:
                    kwargs.setdefault("num_cpus", max(int(workers * num_cpus), 1))
            else:
                kwargs["address"] = address
            ray.init(**kwargs)
            self.started = True
        try:
            self._configure(workers, max_retries, num_cpus, num_gpus, device)
        except BaseException:
            self.close()
            raise

    def _configure(self, workers: int | None, max_retries: int, num_cpus: float, num_gpus: float | None,
                   device: str) -> None:
        ray = self.ray
        self.workers = workers
        self.max_retries = max_retries
        resources = ray.cluster_resources()
        gpus = resources.get("GPU", 0)
        if device.startswith("cuda") and gpus < 1 and not num_gpus:
            raise RecipeError(f"device {device!r} requested but the Ray cluster has no GPU", field="device")
        if num_gpus is None:
            num_gpus = 1 if (gpus >= 1 and not device.startswith("cpu")) else 0
        if num_gpus and device == "auto":
            device = "cuda"
        if not num_gpus and device == "auto":
            device = "cpu"  # workers without a GPU: do not let "auto" find one Ray did not give them
        self.device = device
        self.num_cpus = num_cpus
        self.num_gpus = num_gpus
        self.threads = max(1, int(num_cpus))  # torch threads of a worker: the CPUs Ray gave its task
        self.description = (f"ray ({int(resources.get('CPU', 0))} CPUs, {int(resources.get('GPU', 0))} GPUs"
                            f"{', ' + str(workers) + ' workers' if workers else ''})")
        self._pending: list[Any] = []

    def share(self, obj: Any) -> Any:
        return self.ray.put(obj)

    def _task(self):
        global _REMOTE_TASK
        if _REMOTE_TASK is None:
            _REMOTE_TASK = self.ray.remote(run_unit_task)
        return _REMOTE_TASK.options(num_cpus=self.num_cpus, num_gpus=self.num_gpus, max_retries=self.max_retries,
                                    retry_exceptions=False)

    def map(self, kind: str, ctx: Any, units: list[Any], method: Any, pass_index: int = -1) -> Iterator[Any]:
        ray = self.ray
        task = self._task()
        todo = list(units)
        unit_of: dict[Any, Unit] = {}
        limit = self.workers or len(units)
        try:
            while todo or unit_of:
                while todo and len(unit_of) < limit:
                    unit = todo.pop(0)
                    unit_of[task.remote(kind, ctx, unit, method, pass_index)] = unit
                self._pending = list(unit_of)
                done, _ = ray.wait(list(unit_of), num_returns=1)
                for ref in done:
                    unit = unit_of.pop(ref)
                    yield self._get(ref, unit)
        finally:
            self._pending = list(unit_of)

    def _get(self, ref: Any, unit: Unit) -> Any:
        ray = self.ray
        try:
            return ray.get(ref)
        except ray.exceptions.RayTaskError as exc:
            cause = getattr(exc, "cause", None)
            if isinstance(cause, HubmergeError):
                raise cause from None
            raise DistributedError(f"unit {unit.index} ({unit.label}) failed on a worker: "
                                   f"{type(cause).__name__ if cause else 'error'}: {cause or exc}") from None
        except ray.exceptions.RayError as exc:  # the worker died more than max_retries times, node lost...
            raise DistributedError(f"unit {unit.index} ({unit.label}): {type(exc).__name__} after "
                                   f"{self.max_retries} retries: {str(exc).splitlines()[0] if str(exc) else ''}") \
                from None

    def cancel(self) -> None:
        for ref in self._pending:
            try:
                self.ray.cancel(ref, force=True)
            except Exception as exc:  # noqa: BLE001 - best effort; the temp dir is removed anyway
                logger.debug("could not cancel a unit task: %s", exc)
        self._pending = []

    def close(self) -> None:
        """Shut Ray down if this runner started it."""
        if self.started:
            self.ray.shutdown()
            self.started = False


# -- the driver --------------------------------------------------------------------------------------------------
class UnitsWriter(ShardedWriter):
    """A :class:`ShardedWriter` whose shards are written by units (into its temporary directory).

    The driver adopts the verified shards, then :meth:`finish` writes the index and renames the
    directory into place exactly as for a local run. A FlexMerge deployment's weights writer is
    one too (:class:`~hubmerge.deployment.DeploymentWriter` ``writer_class``).
    """

    def adopt_shards(self, bytes_written: int) -> None:
        """Mark every planned tensor written (the shards are in :attr:`temp`, verified)."""
        for index, name in enumerate(self.file_names[:len(self.shards)]):
            if not (self.temp / name).is_file():
                raise DistributedError(f"shard {index + 1} ({name}) is missing")
        self._next = len(self._order)
        self._partial = 0
        self.bytes_written = bytes_written

    def remove_attempt_leftovers(self) -> list[Path]:
        """Delete temporary files of unit attempts that died."""
        leftovers = sorted(self.temp.glob(f"{ATTEMPT_PREFIX}*"))
        for path in leftovers:
            path.unlink(missing_ok=True)
        return leftovers


def distributed_prepasses(method: Any, units: list[Unit], ctx_handle: Any, runner: UnitRunner,
                          progress: ProgressCallback | None = None, bytes_per_pass: int = 0,
                          stage: str = "prepass") -> int:
    """Run ``method``'s pre-passes as a map-reduce over ``units``; ``finish_pass`` gets the local run's totals.

    Any object with ``prepasses``, ``observe`` and ``finish_pass`` works (a merge method, or
    FlexMerge's :class:`~hubmerge.flexmerge.BlockGram`).

    Returns:
        Bytes read.
    """
    tensors_total = sum(item.last for u in units for item in u.prepass_items)
    read = 0
    for pass_index in range(method.prepasses):
        handle = runner.share(method)  # with the previous passes' finished statistics
        parts: list[UnitStats] = []
        done_tensors = done_bytes = 0
        label = f"{stage} {pass_index + 1}/{method.prepasses}"
        for part in runner.map("observe", ctx_handle, units, handle, pass_index):
            parts.append(part)
            done_tensors += sum(item.last for item in units[part.index].prepass_items)
            done_bytes += part.bytes_read
            if progress:
                progress(Progress(label, done_tensors, tensors_total, done_bytes, bytes_per_pass))
        read += done_bytes
        method.finish_pass(pass_index, reduce_statistics(parts))
    return read


def make_prepass_runner(runner: UnitRunner, *, unit_bytes: int = 5 * 10**9,
                        stage: str = "prepass") -> Callable[..., None]:
    """A drop-in for :func:`hubmerge.engine.run_prepasses` that runs the pre-passes on ``runner``.

    For code that streams a pre-pass over the inputs itself (FlexMerge's similarity pass:
    ``run_prepasses(BlockGram(...), inputs, names, device, dtype, progress)``): the tensors are
    cut into units of about ``unit_bytes`` (output-shard-like), each unit observed on a worker,
    and the statistics reduced exactly as the local run does, so ``finish_pass`` gets the same
    totals bit for bit. ``stage`` names the passes in progress events (``prepass 1/2``).
    """
    def run(method: Any, inputs: MergeInputs, names: list[str], device: torch.device, dtype: torch.dtype,
            progress: ProgressCallback | None = None) -> None:
        meta = inputs.base_checkpoint.meta
        specs = [TensorSpec(n, meta[n].shape, meta[n].dtype) for n in names]
        shards = plan_shards(specs, unit_bytes)
        units = plan_units(inputs, method, shards, shard_file_names(len(shards)), dtype)
        ctx = UnitContext(run_id=uuid.uuid4().hex, base=inputs.base,
                          experts=tuple(e.resolved for e in inputs.experts), temp_dir="",
                          device=getattr(runner, "device", "") or str(device), dtype=str(dtype).split(".")[-1],
                          method_name=getattr(method, "name", type(method).__name__),
                          threads=getattr(runner, "threads", None))
        try:
            distributed_prepasses(method, units, runner.share(ctx), runner, progress, inputs.bytes_per_pass,
                                  stage=stage)
        except BaseException:
            runner.cancel()
            raise
        finally:
            if ctx.run_id in _OPEN:
                _OPEN.pop(ctx.run_id).close()

    return run


def merge_distributed(recipe: Recipe, runner: UnitRunner, *, output: str | Path | None = None,
                      device: str | None = None, overwrite: bool = False, token: str | None = None,
                      progress: ProgressCallback | None = None, file: str | None = None,
                      verify: str = "hash") -> MergeResult:
    """Run a single-output merge recipe as units on ``runner``; the output equals :func:`hubmerge.engine.merge`'s.

    Args:
        recipe: A schema-valid recipe.
        runner: Where units run (:class:`RayRunner`, :class:`LocalRunner`).
        output: Output directory (overrides ``recipe.output.path``); every worker must see it.
        device: Compute device (overrides ``recipe.device``; the runner's choice when it has one).
        overwrite: Replace an existing output directory that hubmerge did not write.
        token: Hub token for private inputs (used on the driver only).
        progress: Called with :class:`~hubmerge.engine.Progress` as units finish.
        file: Recipe file name for errors.
        verify: ``hash`` (re-read every shard on the driver and compare its sha256) or ``size``.

    Returns:
        A :class:`~hubmerge.engine.MergeResult`; ``extra["executor"]`` has per-unit hashes and timings.

    Raises:
        RecipeError: Bad recipe, or one this executor cannot run (adapter output, EMR/TALL
            deployments; a FlexMerge recipe goes to :func:`flexmerge_distributed`).
        DistributedError: A unit failed beyond its retries or did not verify.
        HubmergeError: Any input or output problem; nothing is left at the output path.
    """
    from .card import build_card, card_inputs_from_result
    from .lineage import resolved_recipe_yaml

    if verify not in ("hash", "size"):
        raise ValueError("verify must be 'hash' or 'size'")
    method = check_recipe(recipe, file=file)
    check_distributable(recipe, method, file=file)
    if recipe.flexmerge is not None:
        raise RecipeError("a FlexMerge recipe writes deployments: run it with flexmerge_distributed / "
                          "flexmerge_with_ray (hubmerge run --executor ray does)", field="flexmerge", file=file)
    target = Path(output or recipe.output.path or "")
    if not str(target) or str(target) == ".":
        raise RecipeError("no output directory (set output.path or pass --output)", field="output.path", file=file)
    if output is None:
        confine_output_path(target, file=file)
    run_device = getattr(runner, "device", "") or device or recipe.device
    compute_dtype = getattr(torch, recipe.dtype)
    out_dtype = getattr(torch, recipe.output.dtype) if recipe.output.dtype else None

    started = time.perf_counter()
    inputs = open_inputs(recipe, token=token)
    writer: UnitsWriter | None = None
    run_id: str | None = None
    try:
        names = inputs.base_checkpoint.names()
        writer = UnitsWriter(target, output_specs(inputs.base_checkpoint, out_dtype),
                             shard_size=recipe.output.shard_size, overwrite=overwrite)
        units = plan_units(inputs, method, writer.shards, writer.file_names, compute_dtype)
        ctx = UnitContext(run_id=uuid.uuid4().hex, base=inputs.base,
                          experts=tuple(e.resolved for e in inputs.experts), temp_dir=str(writer.temp),
                          device=run_device, dtype=recipe.dtype, method_name=recipe.method,
                          threads=getattr(runner, "threads", None))
        run_id = ctx.run_id
        ctx_handle = runner.share(ctx)
        timings: dict[str, float] = {}
        t0 = time.perf_counter()
        distributed_prepasses(method, units, ctx_handle, runner, progress, inputs.bytes_per_pass)
        timings["prepasses"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        done = [0, 0]

        def report(unit: Unit, result: UnitResult) -> None:
            done[0] += len(unit.specs)
            done[1] += result.bytes_read
            if progress:
                progress(Progress("merge", done[0], len(names), done[1], inputs.bytes_per_pass))

        results = run_write_units(runner, "merge", ctx_handle, units, runner.share(method),
                                  lambda unit: writer.temp, verify=verify, on_result=report)
        timings["merge"] = time.perf_counter() - t0
        bytes_read = inputs.bytes_per_pass * (method.prepasses + 1)
        leftovers = writer.remove_attempt_leftovers()
        writer.adopt_shards(sum(u.bytes_written for u in units))

        copy_model_files(inputs.base.directory, writer)
        result = MergeResult(
            output_dir=target, recipe=recipe, method=method, base=inputs.base,
            experts=[e.resolved for e in inputs.experts], device=run_device, seconds=0.0,
            bytes_read=bytes_read, bytes_written=writer.bytes_written, tensors=len(names),
            extra={"executor": {
                "runner": runner.description,
                "units": len(units),
                "shard_sha256": {units[i].file_name: results[i].sha256 for i in sorted(results)},
                "unit_seconds": {units[i].file_name: round(results[i].seconds, 3) for i in sorted(results)},
                "hosts": sorted({r.host for r in results.values()}),
                "dead_attempts_removed": len(leftovers),
                "timings": timings,
            }},
        )
        writer.add_file("hubmerge_recipe.yaml", resolved_recipe_yaml(result))
        result.output_dir = writer.temp
        writer.add_file("README.md", str(build_card(card_inputs_from_result(result))))
        result.output_dir = writer.finish()
        result.seconds = time.perf_counter() - started
        logger.info("merged %d tensors in %d units in %.2fs on %s", len(names), len(units), result.seconds,
                    runner.description)
        return result
    except BaseException:
        runner.cancel()
        if writer is not None:
            writer.abort()
        raise
    finally:
        inputs.close()
        if run_id is not None and run_id in _OPEN:  # units that ran in this process
            _OPEN.pop(run_id).close()


def run_write_units(runner: UnitRunner, kind: str, ctx_handle: Any, units: list[Any], work_handle: Any,
                    directory: Callable[[Any], Path], *, verify: str = "hash",
                    on_result: Callable[[Any, UnitResult], None] | None = None) -> dict[int, UnitResult]:
    """Run units that each write one shard file; check every shard's size (and sha256) on the driver.

    Args:
        runner: Where the units run.
        kind: ``merge`` or ``deploy`` (see :func:`run_unit_task`).
        ctx_handle / work_handle: The shared context and method (or group work).
        units: The units; ``units[i].index == i``.
        directory: A unit's temporary directory (where its shard is linked into place).
        verify: ``hash`` (re-read each shard while the others run) or ``size``.
        on_result: Called with each unit and its result as they come (progress).

    Returns:
        Unit index to its :class:`UnitResult`.

    Raises:
        DistributedError: A shard is missing, of the wrong size or hash, or a unit did not report.
    """
    results: dict[int, UnitResult] = {}
    with ThreadPoolExecutor(max_workers=2, thread_name_prefix="hubmerge-verify") as hashing:
        checks = []
        for result in runner.map(kind, ctx_handle, units, work_handle):
            unit = units[result.index]
            path = Path(directory(unit)) / unit.file_name
            size = path.stat().st_size if path.is_file() else -1
            if result.file_name != unit.file_name or size != unit.file_bytes:
                raise DistributedError(f"{unit.label}: {size} bytes on disk, the plan has {unit.file_bytes}")
            if verify == "hash":  # re-read on the driver while the other units run
                checks.append(hashing.submit(_verify_shard, path, result.sha256))
            results[result.index] = result
            if on_result:
                on_result(unit, result)
        for check in checks:
            check.result()
    if len(results) != len(units):
        raise DistributedError(f"{len(units) - len(results)} units did not report")
    return results


def _verify_shard(path: Path, expected: str) -> None:
    found = file_sha256(path)
    if found != expected:
        raise DistributedError(f"{path.name}: sha256 {found[:12]} on disk, the worker wrote {expected[:12]}")


def merge_with_ray(recipe: Recipe, *, address: str | None = None, workers: int | None = None,
                   max_retries: int = 3, output: str | Path | None = None, device: str | None = None,
                   overwrite: bool = False, token: str | None = None, progress: ProgressCallback | None = None,
                   file: str | None = None, verify: str = "hash", num_cpus: float = 1,
                   init_kwargs: dict[str, Any] | None = None) -> MergeResult:
    """:func:`merge_distributed` on a :class:`RayRunner` (started here, shut down after if it started Ray).

    Raises:
        RayNotInstalledError: If Ray is not installed ("install hubmerge[ray]").
    """
    method = check_recipe(recipe, file=file)  # bad recipes fail before Ray starts
    check_distributable(recipe, method, file=file)
    if recipe.flexmerge is not None:
        raise RecipeError("a FlexMerge recipe writes deployments: run it with flexmerge_with_ray",
                          field="flexmerge", file=file)
    runner = RayRunner(address, workers=workers, max_retries=max_retries, num_cpus=num_cpus,
                       device=device or recipe.device, init_kwargs=init_kwargs)
    try:
        return merge_distributed(recipe, runner, output=output, device=device, overwrite=overwrite, token=token,
                                 progress=progress, file=file, verify=verify)
    finally:
        runner.close()


def check_distributable(recipe: Recipe, method: Any, *, file: str | None = None) -> None:
    """Refuse, naming the recipe field, what the distributed executor cannot run (before any work).

    It runs single-output merges and FlexMerge recipes; per-task deployment methods (EMR, TALL
    masks: ``method``), methods that learn from samples (AdaMerging: ``method``) and adapter outputs
    (``output.format: adapter``) run locally.

    Raises:
        RecipeError: With ``field`` ``method`` or ``output.format``.
    """
    if getattr(method, "output", "model") != "model":
        raise RecipeError(f"method {recipe.method!r} writes a per-task deployment (EMR, TALL...): the distributed "
                          "executor runs single-output merges and FlexMerge recipes; run this one locally "
                          "(without --executor ray)", field="method", file=file)
    if getattr(method, "needs_data", False):
        raise RecipeError(f"method {recipe.method!r} learns from samples (`data:`) over the whole model, which the "
                          "distributed executor does not split into units; run it locally (without --executor ray)",
                          field="method", file=file)
    if recipe.output.format != "model":
        raise RecipeError("output.format: adapter is not supported by the distributed executor; run it locally "
                          "(without --executor ray)", field="output.format", file=file)


# -- FlexMerge deployments -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DeploymentUnit(_ShardBytes):
    """One shard of one FlexMerge deployment (a size): the write pass's unit.

    Attributes:
        index: Position in the run's list of units (all sizes).
        deployment: The deployment's directory name (``size-2``).
        temp_dir: The deployment's temporary weights directory (its :class:`UnitsWriter`'s).
        file_name: The shard's file name (``deployment-00001-of-00003.safetensors``).
        specs: The shard's stored tensors, in write order.
        sources: Per stored tensor ``(weight, block, members)``
            (:func:`hubmerge.flexmerge.deployment_sources`): the group merged from the weight.
        reads: Input label to the byte ranges the unit reads.
        file_bytes: Size of the shard file.
    """

    index: int
    deployment: str
    temp_dir: str
    file_name: str
    specs: tuple[TensorSpec, ...]
    sources: tuple[tuple[str, str, tuple[int, ...]], ...]
    reads: dict[str, tuple[ByteRange, ...]]
    file_bytes: int

    @property
    def label(self) -> str:
        """How errors name the unit: ``size-2/deployment-00001-of-00003.safetensors``."""
        return f"{self.deployment}/{self.file_name}"

    @property
    def names(self) -> list[str]:
        """The weights it reads, in order."""
        return list(dict.fromkeys(source[0] for source in self.sources))



@dataclass(frozen=True)
class GroupWork:
    """What every write unit of a FlexMerge run shares: the groups' method instances (pre-passes finished)."""

    instances: dict[tuple[str, tuple[int, ...]], MergeMethod]
    method_name: str


def plan_deployment_units(inputs: MergeInputs,
                          deployments: list[tuple[str, ShardedWriter, list[tuple[str, str, tuple[int, ...]]]]]
                          ) -> list[DeploymentUnit]:
    """One unit per shard of each deployment, as the deployment's writer planned its shards.

    Args:
        inputs: The opened inputs.
        deployments: Per deployment: its directory name, its weights writer (planned shards, file
            names, temporary directory) and each stored tensor's source, in write order.

    Returns:
        The units, deployment by deployment, shard by shard.
    """
    units: list[DeploymentUnit] = []
    for directory, writer, sources in deployments:
        keys = [spec.name for shard in writer.shards for spec in shard]
        if len(keys) != len(sources):
            raise DistributedError(f"{directory}: {len(keys)} stored tensors planned, {len(sources)} sources")
        source_of = dict(zip(keys, sources))
        for i, shard in enumerate(writer.shards):
            own = tuple(source_of[spec.name] for spec in shard)
            weights = list(dict.fromkeys(source[0] for source in own))
            units.append(DeploymentUnit(
                index=len(units), deployment=directory, temp_dir=str(writer.temp), file_name=writer.file_names[i],
                specs=tuple(shard), sources=own, reads=_input_ranges(inputs, weights),
                file_bytes=len(safetensors_header(shard)) + sum(spec.nbytes for spec in shard)))
    return units


def write_deployment_unit(ctx: UnitContext, unit: DeploymentUnit, work: GroupWork) -> UnitResult:
    """Merge one deployment shard's groups and write the shard (on a worker, or in-process).

    The maths is the local write pass's (:class:`hubmerge.flexmerge._GroupMerger`, whole tensors,
    one group at a time), the file the local writer's (same header, same order).

    Returns:
        The :class:`UnitResult` with the shard's sha256.
    """
    from .engine import prefetched
    from .flexmerge import _GroupMerger

    started = time.perf_counter()
    inputs = open_resolved(ctx)
    if not Path(unit.temp_dir).is_dir():
        raise DistributedError(f"worker on {socket.gethostname()}: deployment directory {unit.temp_dir} not found; "
                               "the output must be on a path every worker sees")
    device = _worker_device(ctx)
    dtype = getattr(torch, ctx.dtype)
    entries: dict[str, list[tuple[TensorSpec, str, tuple[int, ...]]]] = {}
    for spec, (weight, block, members) in zip(unit.specs, unit.sources):
        entries.setdefault(weight, []).append((spec, block, members))
    writer = UnitShardWriter(Path(unit.temp_dir), unit)
    merger = _GroupMerger(inputs, work.instances, work.method_name, device, dtype)
    read = 0
    try:
        pooled = dtype if device.type == "cpu" else None  # as the local write pass reads
        needed = {name: sorted({members for _, block, members in wanted if block})
                  for name, wanted in entries.items()}

        def experts_for(name: str) -> set[int]:  # only the members of the groups this unit stores
            return merger.reads(name, needed[name], entries[name][0][0])

        for fetched in prefetched(inputs, list(entries), pooled_dtype=pooled, experts_for=experts_for):
            wanted = entries[fetched.name]
            spec, block, _ = wanted[0]
            if not block:  # not merged: the base's tensor as is
                outputs = {(): fetched.base.to(spec.dtype)}
            else:
                outputs = merger.outputs(fetched, block, needed[fetched.name], spec)
            for stored, _, members in wanted:
                writer.write(stored.name, outputs[members])
            del outputs
            read += fetched.nbytes
        digest, won = writer.commit()
    except BaseException:
        writer.abort()
        raise
    return UnitResult(unit.index, unit.file_name, digest, unit.file_bytes, time.perf_counter() - started, read,
                      socket.gethostname(), os.getpid(), writer.attempt, won)


def write_deployment_units(runner: UnitRunner, inputs: MergeInputs,
                           deployments: list[tuple[str, ShardedWriter, list[tuple[str, str, tuple[int, ...]]]]],
                           instances: dict[tuple[str, tuple[int, ...]], MergeMethod], *, root: Path, device: str,
                           dtype: str, method_name: str, progress: ProgressCallback | None = None,
                           verify: str = "hash") -> dict[str, Any]:
    """FlexMerge's write pass as units: every deployment's shards written by ``runner``, verified, adopted.

    Each deployment's weights writer must be a :class:`UnitsWriter` (its temporary directory is
    where the units link their shards); afterwards it holds every shard, verified, and its
    :meth:`~UnitsWriter.finish` (through the deployment writer) writes the index and renames.

    Args:
        runner: Where the units run.
        inputs: The opened inputs.
        deployments: Per deployment: directory name, weights writer, stored tensors' sources.
        instances: ``(block, members)`` to the group's method instance (pre-passes finished).
        root: The staged output directory (every worker must see it).
        device / dtype: Compute device and dtype name.
        method_name: The inner method's name (for errors).
        progress: Called with ``write`` progress as units finish.
        verify: ``hash`` or ``size`` (see :func:`merge_distributed`).

    Returns:
        What ``FlexMergeResult.executor`` reports (units, shard hashes, timings, bytes read).
    """
    started = time.perf_counter()
    units = plan_deployment_units(inputs, deployments)
    ctx = UnitContext(run_id=uuid.uuid4().hex, base=inputs.base, experts=tuple(e.resolved for e in inputs.experts),
                      temp_dir=str(root), device=device, dtype=dtype, method_name=method_name,
                      threads=getattr(runner, "threads", None))
    total_tensors = sum(len(u.specs) for u in units)
    total_bytes = sum(u.bytes_read for u in units)
    done = [0, 0]

    def report(unit: DeploymentUnit, result: UnitResult) -> None:
        done[0] += len(unit.specs)
        done[1] += result.bytes_read
        if progress:
            progress(Progress("write", done[0], total_tensors, done[1], total_bytes))

    try:
        results = run_write_units(runner, "deploy", runner.share(ctx), units,
                                  runner.share(GroupWork(instances, method_name)),
                                  lambda unit: Path(unit.temp_dir), verify=verify, on_result=report)
    except BaseException:
        runner.cancel()
        raise
    finally:
        if ctx.run_id in _OPEN:  # units that ran in this process
            _OPEN.pop(ctx.run_id).close()
    leftovers = 0
    for directory, writer, _ in deployments:
        if not isinstance(writer, UnitsWriter):
            raise DistributedError(f"{directory}: the deployment's weights writer is not a UnitsWriter")
        leftovers += len(writer.remove_attempt_leftovers())
        writer.adopt_shards(sum(u.bytes_written for u in units if u.deployment == directory))
    return {
        "runner": runner.description,
        "units": len(units),
        "shard_sha256": {units[i].label: results[i].sha256 for i in sorted(results)},
        "unit_seconds": {units[i].label: round(results[i].seconds, 3) for i in sorted(results)},
        "hosts": sorted({r.host for r in results.values()}),
        "dead_attempts_removed": leftovers,
        "bytes_read": sum(r.bytes_read for r in results.values()),
        "timings": {"write_units": time.perf_counter() - started},
    }


def flexmerge_distributed(recipe: Recipe, runner: UnitRunner, **kwargs: Any):
    """Run a FlexMerge recipe as units on ``runner``: :func:`hubmerge.flexmerge.run_flexmerge` with ``runner``.

    The output is byte-identical to a local :func:`~hubmerge.flexmerge.run_flexmerge` (every
    deployment's shards, index, manifest, ``flexmerge.json``; the recipes' ``created`` time aside).

    Args:
        recipe: A schema-valid recipe with ``flexmerge``.
        runner: Where the units run.
        **kwargs: ``output``, ``device``, ``overwrite``, ``token``, ``progress``, ``file``, ``storage``.

    Returns:
        The :class:`~hubmerge.flexmerge.FlexMergeResult` (``executor`` filled in).

    Raises:
        RecipeError: Bad recipe, or one this executor cannot run (see :func:`check_distributable`).
    """
    from .flexmerge import run_flexmerge

    check_distributable(recipe, check_recipe(recipe, file=kwargs.get("file")), file=kwargs.get("file"))
    if recipe.flexmerge is None:
        raise RecipeError("the recipe has no `flexmerge` section: run it with merge_distributed", field="flexmerge",
                          file=kwargs.get("file"))
    return run_flexmerge(recipe, runner=runner, **kwargs)


def flexmerge_with_ray(recipe: Recipe, *, address: str | None = None, workers: int | None = None,
                       max_retries: int = 3, num_cpus: float = 1, init_kwargs: dict[str, Any] | None = None,
                       device: str | None = None, file: str | None = None, **kwargs: Any):
    """:func:`flexmerge_distributed` on a :class:`RayRunner` (started here, shut down after if it started Ray).

    Raises:
        RecipeError: Bad recipe (before Ray starts).
        RayNotInstalledError: If Ray is not installed.
    """
    from .flexmerge import check_flexmerge

    check_distributable(recipe, check_recipe(recipe, file=file), file=file)
    check_flexmerge(recipe, file=file)  # bad recipes fail before Ray starts
    runner = RayRunner(address, workers=workers, max_retries=max_retries, num_cpus=num_cpus,
                       device=device or recipe.device, init_kwargs=init_kwargs)
    try:
        return flexmerge_distributed(recipe, runner, device=device, file=file, **kwargs)
    finally:
        runner.close()


def describe_units(units: list[Unit], passes: int) -> list[str]:
    """Lines describing a plan (for ``--dry-run``): each unit's tensors, reads and writes."""
    lines = []
    for unit in units:
        files = sum(len(v) for v in unit.input_files().values())
        lines.append(f"unit {unit.index + 1}/{len(units)} {unit.file_name}: {len(unit.specs)} tensors, "
                     f"{len(unit.items)} items, reads {unit.bytes_read / 1e6:.1f} MB x {passes} passes "
                     f"from {files} input files, writes {unit.file_bytes / 1e6:.1f} MB")
    return lines
