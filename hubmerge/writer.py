"""Sharded safetensors output, streamed tensor by tensor, finished atomically.

The shapes and dtypes of every output tensor are known before the merge starts, so
each shard's safetensors header is written first and tensors are appended as they
are produced: memory holds one tensor, never a whole shard. Everything is written to a
hidden temporary directory beside the target and renamed into place only when
complete; a crash leaves no directory that looks finished, and stale temporaries are
removed by the next run.
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import errno
import json
import logging
import math
import os
import shutil
import sys
import threading
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from .checkpoint import DTYPE_NAMES, dtype_size
from .errors import OutputExistsError, OutputWriteError

logger = logging.getLogger(__name__)

#: A directory holding this file was written by hubmerge (and may be replaced by it).
OWNER_MARKER = "hubmerge_recipe.yaml"
TEMP_PREFIX = ".hubmerge-partial-"


@dataclass(frozen=True)
class TensorSpec:
    """Name, shape and dtype of one output tensor."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        """Bytes of data."""
        return math.prod(self.shape) * dtype_size(self.dtype)


def plan_shards(specs: list[TensorSpec], max_bytes: int) -> list[list[TensorSpec]]:
    """Split tensors (in order) into shards of at most ``max_bytes`` (a larger tensor gets its own).

    Args:
        specs: Output tensors in write order.
        max_bytes: Shard size limit.

    Returns:
        Shards, each a list of specs.
    """
    shards: list[list[TensorSpec]] = [[]]
    size = 0
    for spec in specs:
        if shards[-1] and size + spec.nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += spec.nbytes
    return shards if shards[0] else []


def shard_file_names(count: int, stem: str = "model") -> list[str]:
    """``model.safetensors`` for one shard, else ``model-00001-of-0000N.safetensors``."""
    if count <= 1:
        return [f"{stem}.safetensors"]
    return [f"{stem}-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]


def safetensors_header(specs: list[TensorSpec], metadata: dict[str, str] | None = None) -> bytes:
    """The header bytes (length prefix, JSON, space padding to 8) for tensors laid out in order."""
    header: dict[str, object] = {"__metadata__": {"format": "pt", **(metadata or {})}}
    offset = 0
    for spec in specs:
        header[spec.name] = {
            "dtype": DTYPE_NAMES[spec.dtype],
            "shape": list(spec.shape),
            "data_offsets": [offset, offset + spec.nbytes],
        }
        offset += spec.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return len(raw).to_bytes(8, "little") + raw


_SYNC_FILE_RANGE_WRITE = 2  # <linux/fs.h>: start writeback of the range's dirty pages, do not wait


def _load_sync_file_range():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)  # the process's own symbols: libc's included
        function = libc.sync_file_range
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    function.restype = ctypes.c_int
    return function


_sync_file_range = _load_sync_file_range()


def start_writeback(fileno: int, offset: int, nbytes: int) -> None:
    """Start writing a file's byte range to disk without waiting for it (Linux ``sync_file_range``).

    The final ``fsync`` then has only the tail left to wait for, while the disk works in parallel
    with the merge. Where the call is missing (macOS, Windows) this is ``fdatasync``, which waits.

    Args:
        fileno: An open file descriptor.
        offset: First byte of the range.
        nbytes: Length of the range.

    Raises:
        OSError: If the system call fails.
    """
    if _sync_file_range is None:
        if hasattr(os, "fdatasync"):
            os.fdatasync(fileno)
        else:
            os.fsync(fileno)
        return
    if _sync_file_range(fileno, offset, nbytes, _SYNC_FILE_RANGE_WRITE) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


@dataclass(frozen=True)
class FileRange:
    """A tensor's stored bytes in an input file, to be copied as they are (a FlexMerge group of
    one keeps its expert's tensor bit for bit: the kernel copies it, nothing passes through memory).

    Attributes:
        file: The safetensors file.
        offset: Absolute offset of the data.
        nbytes: Length of the data.
        shape: The tensor's shape.
        dtype: The tensor's dtype.
    """

    file: Path
    offset: int
    nbytes: int
    shape: tuple[int, ...]
    dtype: torch.dtype


#: Chunk of the copy used where ``os.copy_file_range`` is missing or refused.
_COPY_CHUNK = 8 * 1024 * 1024


def copy_file_range_into(source: FileRange, fileno: int) -> None:
    """Append ``source``'s bytes to the file open as ``fileno`` (at its position), in the kernel
    when it can (``os.copy_file_range``), else through a small buffer.

    Raises:
        OSError: If the source cannot be read or is shorter than ``source.nbytes``.
    """
    offset, left = source.offset, source.nbytes
    with open(source.file, "rb", buffering=0) as src:
        fast = hasattr(os, "copy_file_range")
        buffer = None
        while left:
            copied = 0
            if fast:
                try:
                    copied = os.copy_file_range(src.fileno(), fileno, left, offset)
                except OSError as exc:
                    if exc.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.EPERM):
                        raise
                    fast = False
                    continue
            else:
                buffer = buffer or bytearray(min(_COPY_CHUNK, left))
                view = memoryview(buffer)[:min(len(buffer), left)]
                got = os.preadv(src.fileno(), [view], offset)
                copied = got and os.write(fileno, view[:got])
            if not copied:
                raise OSError(errno.EIO, f"{source.file}: {left} bytes short at offset {offset}")
            offset += copied
            left -= copied


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """A zero-copy byte view of a contiguous CPU tensor (any dtype, including bfloat16)."""
    flat = tensor.contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy()) if flat.numel() else memoryview(b"")


def is_ours(directory: Path) -> bool:
    """Whether ``directory`` was written by hubmerge (holds :data:`OWNER_MARKER`)."""
    return (directory / OWNER_MARKER).is_file()


def check_output_path(target: Path, *, overwrite: bool) -> None:
    """Refuse a target that exists and is not hubmerge's, unless ``overwrite``.

    Args:
        target: The final output directory.
        overwrite: Replace whatever is there.

    Raises:
        OutputExistsError: If the target exists, is not ours, and ``overwrite`` is false.
    """
    if target.is_symlink():
        raise OutputExistsError(f"{target}: output path is a symbolic link; give the real directory")
    if target.exists() and not overwrite:
        if not target.is_dir():
            raise OutputExistsError(f"{target}: exists and is not a directory (use --overwrite to replace it)")
        if any(target.iterdir()) and not is_ours(target):
            raise OutputExistsError(
                f"{target}: exists and was not written by hubmerge (use --overwrite to replace it)"
            )


def confine_output_path(path: Path, *, root: Path | None = None, file: str | None = None) -> Path:
    """Check that a recipe's relative ``output.path`` stays inside ``root`` once symlinks are resolved.

    A recipe (perhaps downloaded) must not send the output outside the directory hubmerge runs
    in: a relative path that climbs out with ``..`` or passes through a symbolic link leading
    elsewhere is refused. Absolute paths, and paths the user gives (``--output``), are taken as
    written.

    Args:
        path: The output path from the recipe.
        root: The directory relative paths are inside (default: the working directory).
        file: Recipe file name for the message.

    Returns:
        ``path`` unchanged.

    Raises:
        RecipeError: (field ``output.path``) if the path resolves outside ``root``.
    """
    from .errors import RecipeError

    if "\x00" in str(path):
        raise RecipeError("the output path contains a NUL character", field="output.path", file=file)
    if path.is_absolute():
        return path
    root = (root or Path.cwd()).resolve()
    real = (root / path).resolve()
    if real != root and root not in real.parents:
        how = "with '..'" if ".." in path.parts else "through a symbolic link"
        raise RecipeError(
            f"{path} resolves to {real}, outside {root} ({how}); pass --output to write there on purpose",
            field="output.path", file=file,
        )
    return path


def clean_stale_temporaries(parent: Path) -> list[Path]:
    """Remove temporaries left by runs that died (their process no longer exists).

    Args:
        parent: The directory that holds output directories.

    Returns:
        The removed paths.
    """
    removed = []
    if not parent.is_dir():
        return removed
    for path in parent.glob(f"{TEMP_PREFIX}*"):
        try:
            pid = int(path.name[len(TEMP_PREFIX):].split("-")[0])
        except ValueError:
            continue
        if pid != os.getpid() and not _alive(pid):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
            logger.info("removed stale temporary %s", path)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class ShardedWriter:
    """Writes a model directory: streamed shards, index, extra files, atomic rename.

    Args:
        target: Final output directory.
        specs: Every output tensor, in the order :meth:`write` will receive them.
        shard_size: Maximum bytes per shard.
        overwrite: Replace an existing directory that is not hubmerge's.
        stem: File stem (``model`` or ``adapter_model``).

    Raises:
        OutputExistsError: See :func:`check_output_path`.
    """

    def __init__(self, target: Path, specs: list[TensorSpec], *, shard_size: int,
                 overwrite: bool = False, stem: str = "model"):
        self.target = Path(target).absolute()
        check_output_path(self.target, overwrite=overwrite)
        self.overwrite = overwrite
        self.target.parent.mkdir(parents=True, exist_ok=True)
        clean_stale_temporaries(self.target.parent)
        self.temp = self.target.parent / f"{TEMP_PREFIX}{os.getpid()}-{uuid.uuid4().hex[:8]}-{self.target.name}"
        self.temp.mkdir()
        self.shards = plan_shards(specs, shard_size)
        self.file_names = shard_file_names(len(self.shards), stem)
        self.stem = stem
        self._order = [(i, s) for i, shard in enumerate(self.shards) for s in shard]
        self._next = 0
        self._partial = 0
        self._handle = None
        self._handle_index = -1
        self.bytes_written = 0
        #: When set, writing the shard to disk is started (:func:`start_writeback`) every this many
        #: bytes, so :meth:`finish` has little left to sync (see :class:`BackgroundWriter`).
        self.sync_bytes: int | None = None
        self._unsynced = 0
        self._synced_to = 0

    @property
    def names(self) -> list[str]:
        """Tensor names in write order."""
        return [s.name for _, s in self._order]

    @property
    def specs(self) -> dict[str, TensorSpec]:
        """Tensor name to its planned spec."""
        return {s.name: s for _, s in self._order}

    def write(self, name: str, tensor: torch.Tensor | FileRange, *, last: bool = True) -> None:
        """Append the next tensor, or the next block of its rows (in plan order).

        Args:
            name: Tensor name.
            tensor: CPU tensor with the planned dtype: the whole tensor, or a block of
                rows when ``last`` is false or earlier blocks were written; or a whole
                tensor's bytes in a file (:class:`FileRange`), copied as they are.
            last: Whether this completes the tensor.

        Raises:
            ValueError: If the tensor is out of order or does not match its spec.
        """
        if self._next >= len(self._order):
            raise ValueError(f"unexpected tensor {name!r}: all planned tensors are written")
        shard_index, spec = self._order[self._next]
        if isinstance(tensor, FileRange) and (self._partial or not last or tuple(tensor.shape) != spec.shape):
            raise ValueError(f"tensor {name!r}: a file range must be the whole tensor {spec.shape}")
        rows_ok = tuple(tensor.shape) == spec.shape or (
            tensor.dim() == len(spec.shape) and tuple(tensor.shape[1:]) == spec.shape[1:]
        )
        if name != spec.name or not rows_ok or tensor.dtype != spec.dtype:
            raise ValueError(
                f"tensor {name!r} {tuple(tensor.shape)} {tensor.dtype} does not match the plan "
                f"({spec.name!r} {spec.shape} {spec.dtype})"
            )
        data = tensor if isinstance(tensor, FileRange) else tensor_bytes(tensor.cpu())
        with self._io(self.file_names[shard_index]):
            if shard_index != self._handle_index:
                self._close_handle()
                self._handle = open(self.temp / self.file_names[shard_index], "wb")  # noqa: SIM115 - kept open across writes
                self._handle.write(safetensors_header(self.shards[shard_index]))
                self._handle_index = shard_index
                self._unsynced = self._synced_to = 0
            if isinstance(data, FileRange):
                self._handle.flush()
                copy_file_range_into(data, self._handle.fileno())
                self._handle.seek(0, os.SEEK_END)  # the copy moved the descriptor's position
            else:
                self._handle.write(data)
            self._unsynced += data.nbytes
            if self.sync_bytes and self._unsynced >= self.sync_bytes:
                self._handle.flush()
                end = self._handle.tell()
                start_writeback(self._handle.fileno(), self._synced_to, end - self._synced_to)
                self._unsynced, self._synced_to = 0, end
        self.bytes_written += data.nbytes
        self._partial += data.nbytes
        if self._partial > spec.nbytes or (last and self._partial != spec.nbytes):
            raise ValueError(f"tensor {name!r}: {self._partial} bytes written, the plan has {spec.nbytes}")
        if last:
            self._next += 1
            self._partial = 0

    def _close_handle(self) -> None:
        if self._handle is not None:
            self._handle.flush()
            os.fsync(self._handle.fileno())
            self._handle.close()
            self._handle = None

    @contextlib.contextmanager
    def _io(self, what: str):
        """Turn an ``OSError`` (disk full, file too large...) into :class:`OutputWriteError`."""
        try:
            yield
        except OSError as exc:
            reason = exc.strerror or str(exc)
            raise OutputWriteError(f"{self.target}: cannot write the output ({reason}, writing {what}); "
                                   "the partial output is removed", errno=exc.errno) from exc

    def add_file(self, relative: str, content: bytes | str | Path) -> None:
        """Add a file to the output (text, bytes, or a copy of an existing file).

        Args:
            relative: Path inside the output directory (no ``..``).
            content: The content or a source file to copy.

        Raises:
            ValueError: If ``relative`` escapes the output directory.
        """
        dest = (self.temp / relative).resolve()
        if self.temp.resolve() not in dest.parents:
            raise ValueError(f"refusing to write {relative!r} outside the output directory")
        with self._io(relative):
            dest.parent.mkdir(parents=True, exist_ok=True)
            if isinstance(content, Path):
                shutil.copyfile(content, dest)
            elif isinstance(content, str):
                dest.write_text(content, encoding="utf-8")
            else:
                dest.write_bytes(content)

    def finish(self) -> Path:
        """Close shards, write the index, and rename the directory into place.

        Returns:
            The final output directory.

        Raises:
            ValueError: If not every planned tensor was written.
        """
        if self._next != len(self._order):
            missing = self._order[self._next][1].name
            raise ValueError(f"merge incomplete: tensor {missing!r} was never written")
        with self._io(self.file_names[self._handle_index] if self._handle else self.file_names[0]):
            self._close_handle()
            if not self.shards:  # a model with no tensors still gets a valid, empty file
                (self.temp / self.file_names[0]).write_bytes(safetensors_header([]))
        if len(self.shards) > 1:
            weight_map = {s.name: self.file_names[i] for i, s in self._order}
            total = sum(s.nbytes for _, s in self._order)
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            self.add_file(f"{self.stem}.safetensors.index.json", json.dumps(index, indent=2) + "\n")
        if self.target.exists() or self.target.is_symlink():
            check_output_path(self.target, overwrite=self.overwrite)
            trash = self.target.parent / f"{TEMP_PREFIX}{os.getpid()}-old-{uuid.uuid4().hex[:8]}"
            os.replace(self.target, trash)
            os.replace(self.temp, self.target)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(self.temp, self.target)
        logger.info("wrote %s (%d bytes of tensors)", self.target, self.bytes_written)
        return self.target

    def abort(self) -> None:
        """Remove the temporary directory; the target is left as it was.

        Never raises for the file being written (a full disk fails its flush too).
        """
        handle, self._handle = self._handle, None
        if handle is not None:
            try:
                handle.close()
            except OSError:
                pass
        shutil.rmtree(self.temp, ignore_errors=True)


class BackgroundWriter:
    """Runs :class:`ShardedWriter` writes on a thread of its own, so writing overlaps merging.

    :meth:`write` queues the tensor and returns at once unless more than ``max_pending`` bytes are
    already waiting (one tensor is always accepted, whatever its size): memory holds at most that
    much merged output besides the tensor being merged. The caller hands the tensor over and must
    not change it afterwards. The thread also starts writing each shard to disk every ``sync_bytes``
    (:func:`start_writeback`), so the ``fsync`` of :meth:`ShardedWriter.finish` no longer waits
    for the whole output. An error on
    the thread (a full disk...) is raised by the next :meth:`write` or by :meth:`close`.

    Args:
        writer: The writer, or several (a FlexMerge pass writes every size at once); use them
            directly again only after :meth:`close` or :meth:`cancel`.
        max_pending: Bytes of queued tensors above which :meth:`write` waits.
        sync_bytes: Writeback interval on the writing thread (``None``: only at the end).
    """

    def __init__(self, writer: ShardedWriter | Sequence[ShardedWriter], *, max_pending: int = 64 * 1024 * 1024,
                 sync_bytes: int | None = 256 * 1024 * 1024):
        self.writers = [writer] if isinstance(writer, ShardedWriter) else list(writer)
        self.max_pending = max_pending
        self._sync_before = [w.sync_bytes for w in self.writers]
        for w in self.writers:
            w.sync_bytes = sync_bytes
        self._queue: collections.deque[tuple[int, str, torch.Tensor, bool, int]] = collections.deque()
        self._pending = 0
        self._cond = threading.Condition()
        self._error: BaseException | None = None
        self._closing = False
        self._thread = threading.Thread(target=self._run, name="hubmerge-write", daemon=True)
        self._thread.start()

    def write(self, name: str, tensor: torch.Tensor | FileRange, last: bool = True, *, to: int = 0) -> None:
        """Queue the next tensor (or block of rows, or :class:`FileRange`) for :meth:`ShardedWriter.write`.

        Args:
            name: Tensor name.
            tensor: The tensor, handed over.
            last: Whether this completes the tensor.
            to: Index of the target writer (in the order given).

        Raises:
            Whatever an earlier write raised on the thread.
        """
        # a file range holds no memory: it never counts towards max_pending
        nbytes = 0 if isinstance(tensor, FileRange) else tensor.numel() * tensor.element_size()
        with self._cond:
            while self._error is None and self._pending and self._pending + nbytes > self.max_pending:
                self._cond.wait()
            if self._error is not None:
                raise self._error
            if self._closing:
                raise ValueError("the background writer is closed")
            self._queue.append((to, name, tensor, last, nbytes))
            self._pending += nbytes  # queued plus being written
            self._cond.notify_all()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._closing:
                    self._cond.wait()
                if not self._queue:
                    return
                to, name, tensor, last, nbytes = self._queue.popleft()
            try:
                self.writers[to].write(name, tensor, last=last)
            except BaseException as exc:  # noqa: BLE001 - handed to the producer, raised there
                with self._cond:
                    self._error = exc
                    self._queue.clear()
                    self._pending = 0
                    self._cond.notify_all()
                return
            del tensor
            with self._cond:
                self._pending -= nbytes
                self._cond.notify_all()

    def _stop(self, *, drop: bool) -> None:
        with self._cond:
            if drop:
                self._pending -= sum(entry[4] for entry in self._queue)
                self._queue.clear()
            self._closing = True
            self._cond.notify_all()
        self._thread.join()
        for w, before in zip(self.writers, self._sync_before):
            w.sync_bytes = before

    def close(self) -> None:
        """Wait until every queued tensor is written.

        Raises:
            Whatever a write raised on the thread.
        """
        self._stop(drop=False)
        if self._error is not None:
            raise self._error

    def cancel(self) -> None:
        """Drop what is queued and stop (after the write in progress); never raises."""
        self._stop(drop=True)

