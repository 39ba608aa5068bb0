"""Safe, lazy reading of safetensors checkpoints (single file or sharded).

Headers are parsed and checked (offsets inside the file, no overlap, sizes that match
shapes, a sane header size) before any tensor is read, so a corrupt, truncated or
hostile file is refused with an error naming the file and tensor. Pickle checkpoints
(``.bin``, ``.pt``) are refused with a hint and never unpickled.
"""

from __future__ import annotations

import json
import math
import os
import struct
import threading
from dataclasses import dataclass
from pathlib import Path

import torch
from .errors import CheckpointError, ModelReferenceError, UnsafeCheckpointError

MAX_HEADER_BYTES = 100 * 1024 * 1024
MAX_INDEX_BYTES = 64 * 1024 * 1024
#: More dimensions than any model uses; larger sizes than a signed 64-bit count cannot be real.
MAX_DIMS = 64
MAX_ELEMENTS = 2**63 - 1
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
    "U16": torch.uint16, "U32": torch.uint32, "U64": torch.uint64,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


@dataclass(frozen=True)
class TensorMeta:
    """Where a tensor lives and what it is, read from a safetensors header."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    file: Path
    offset: int  # absolute byte offset of the data in ``file``
    nbytes: int


def dtype_size(dtype: torch.dtype) -> int:
    """Bytes per element of ``dtype``."""
    return torch.empty((), dtype=dtype).element_size()


def read_header(path: Path) -> dict[str, TensorMeta]:
    """Parse and check one safetensors file's header without reading tensor data.

    Args:
        path: The ``.safetensors`` file.

    Returns:
        Tensor name to :class:`TensorMeta`, in file order.

    Raises:
        UnsafeCheckpointError: If the file is a pickle or zip archive named ``.safetensors``.
        CheckpointError: If the header is truncated, oversized, malformed, or lies about
            offsets (past the end, overlapping, not matching the shape).
    """
    size = path.stat().st_size
    with open(path, "rb") as fh:
        head = fh.read(8)
        # A header length may start with 0x80 or spell "PK" (its low bytes); a safetensors header
        # itself always starts with "{", a pickle or zip archive never has it at byte 8.
        looks_foreign = head[:2] == b"PK" or head[:1] == b"\x80"
        if looks_foreign and fh.read(1) != b"{":
            raise UnsafeCheckpointError(
                f"{path}: this is a pickle/zip file with a .safetensors name; refusing to read it"
            )
        if len(head) < 8:
            raise CheckpointError(f"{path}: truncated safetensors file ({size} bytes)")
        (header_len,) = struct.unpack("<Q", head)
        if header_len > MAX_HEADER_BYTES:
            raise CheckpointError(f"{path}: header of {header_len} bytes exceeds the {MAX_HEADER_BYTES}-byte limit")
        if 8 + header_len > size:
            raise CheckpointError(f"{path}: truncated (header says {header_len} bytes, file has {size})")
        fh.seek(8)
        raw = fh.read(header_len)
    try:
        header = json.loads(raw, object_pairs_hook=_unique_keys)
    except _DuplicateKey as exc:
        raise CheckpointError(f"{path}: {exc.args[0]!r} appears twice in the header (ambiguous)") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: header is not valid JSON ({exc})") from None
    except RecursionError:
        raise CheckpointError(f"{path}: header is nested too deeply to be a safetensors header") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: header is not a JSON object")
    data_start = 8 + header_len
    data_len = size - data_start
    metas: dict[str, TensorMeta] = {}
    spans: list[tuple[int, int, str]] = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        where = f"{path}: tensor {name!r}"
        if not isinstance(info, dict):
            raise CheckpointError(f"{where}: entry is not an object")
        dtype = DTYPES.get(info.get("dtype"))
        if dtype is None:
            raise CheckpointError(f"{where}: unknown dtype {info.get('dtype')!r}")
        shape, offsets = info.get("shape"), info.get("data_offsets")
        if not (isinstance(shape, list) and all(_is_int(d) and d >= 0 for d in shape)):
            raise CheckpointError(f"{where}: bad shape {shape!r}")
        if len(shape) > MAX_DIMS:
            raise CheckpointError(f"{where}: {len(shape)} dimensions (at most {MAX_DIMS})")
        if any(d > MAX_ELEMENTS for d in shape) or math.prod(d for d in shape if d) > MAX_ELEMENTS:
            raise CheckpointError(f"{where}: shape {shape} has a dimension or size out of range")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(o) for o in offsets)):
            raise CheckpointError(f"{where}: bad data_offsets {offsets!r}")
        begin, end = offsets
        if not 0 <= begin <= end <= data_len:
            raise CheckpointError(f"{where}: data_offsets {offsets} point past the end of the file ({data_len} data bytes)")
        if end - begin != math.prod(shape) * dtype_size(dtype):
            raise CheckpointError(f"{where}: {end - begin} bytes do not hold shape {shape} of {info['dtype']}")
        spans.append((begin, end, name))
        metas[name] = TensorMeta(name, tuple(shape), dtype, path, data_start + begin, end - begin)
    spans.sort()
    for (b0, e0, n0), (b1, e1, n1) in zip(spans, spans[1:]):
        if b1 < e0 and e1 > b1:
            raise CheckpointError(f"{path}: tensors {n0!r} and {n1!r} overlap")
    return dict(sorted(metas.items(), key=lambda kv: kv[1].offset))


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


class _DuplicateKey(ValueError):
    pass


def _unique_keys(pairs: list[tuple[str, object]]) -> dict[str, object]:
    """``object_pairs_hook`` refusing duplicate keys (parsers differ on which one wins)."""
    out: dict[str, object] = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKey(key)
        out[key] = value
    return out


def refuse_pickle_only(directory: Path) -> None:
    """Raise a hint when ``directory`` holds only pickle weights.

    Args:
        directory: A model directory without safetensors weights.

    Raises:
        UnsafeCheckpointError: Always, naming the pickle files found, or
        ModelReferenceError: if there are no weights at all.
    """
    pickles = sorted(p.name for p in directory.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise UnsafeCheckpointError(
            f"{directory}: only pickle weights ({', '.join(pickles)}); hubmerge never unpickles. "
            "Convert them to safetensors first, e.g. `AutoModel.from_pretrained(d).save_pretrained(d, "
            "safe_serialization=True)` on a machine you trust"
        )
    raise ModelReferenceError(f"{directory}: no model.safetensors or {INDEX_FILE} found")


class Checkpoint:
    """A lazily read safetensors checkpoint: one file or an index of shards.

    Args:
        directory: The model directory.
        weights: File name of a single-file checkpoint (``model.safetensors`` by default;
            adapters use ``adapter_model.safetensors``).

    Raises:
        ModelReferenceError: If the directory or its weights are missing.
        UnsafeCheckpointError: If only pickle weights are present.
        CheckpointError: If a file is corrupt or the index names missing files.
    """

    def __init__(self, directory: Path, weights: str = SINGLE_FILE):
        self.directory = Path(directory)
        if not self.directory.is_dir():
            raise ModelReferenceError(f"{self.directory}: not a directory")
        index = self.directory / weights.replace(".safetensors", ".safetensors.index.json")
        single = self.directory / weights
        weight_map: dict[str, str] | None = None
        if single.is_file():
            files = [single]
        elif index.is_file():
            weight_map = self._weight_map(index)
            files = self._index_files(index, weight_map)
        else:
            refuse_pickle_only(self.directory)
        self.files = files
        self.meta: dict[str, TensorMeta] = {}
        for file in files:
            for name, meta in read_header(file).items():
                if name in self.meta:
                    raise CheckpointError(f"{file}: tensor {name!r} also in {self.meta[name].file.name}")
                self.meta[name] = meta
        for name, shard in (weight_map or {}).items():
            meta = self.meta.get(name)
            if meta is None or meta.file != (index.parent / shard).resolve():
                raise CheckpointError(f"{index}: tensor {name!r} is not in {shard} (the index and shards disagree)")
        self._handles: dict[Path, int] = {}
        self._lock = threading.Lock()

    @staticmethod
    def _weight_map(index: Path) -> dict[str, str]:
        try:
            if index.stat().st_size > MAX_INDEX_BYTES:
                raise ValueError(f"larger than {MAX_INDEX_BYTES} bytes")
            weight_map = json.loads(index.read_text())["weight_map"]
            if not (isinstance(weight_map, dict) and all(isinstance(v, str) for v in weight_map.values())):
                raise TypeError("weight_map must map tensor names to file names")
        except (OSError, ValueError, KeyError, TypeError, RecursionError) as exc:
            raise CheckpointError(f"{index}: not a valid safetensors index ({type(exc).__name__}: {exc})") from None
        return weight_map

    @staticmethod
    def _index_files(index: Path, weight_map: dict[str, str]) -> list[Path]:
        names = list(dict.fromkeys(weight_map.values()))
        files = []
        for name in names:
            file = (index.parent / name).resolve()
            if index.parent.resolve() not in file.parents:
                raise CheckpointError(f"{index}: shard {name!r} lies outside the model directory")
            if not file.is_file():
                raise CheckpointError(f"{index}: shard {name!r} is missing")
            files.append(file)
        return files

    def names(self) -> list[str]:
        """Tensor names in storage order (file, then offset)."""
        return list(self.meta)

    @property
    def nbytes(self) -> int:
        """Total bytes of tensor data."""
        return sum(m.nbytes for m in self.meta.values())

    def get(self, name: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
        """Read one tensor, or a block of its rows, into fresh memory (CPU, stored dtype).

        Reads with ``preadv`` straight into the tensor's buffer: no intermediate copy,
        no memory map (whose touched pages would count towards the process's RSS),
        and the GIL is released while reading, so reader threads overlap with compute.

        Args:
            name: Tensor name.
            rows: ``(start, stop)`` along dim 0 to read only those rows (contiguous bytes).

        Returns:
            The tensor (or the block of rows).

        Raises:
            KeyError: If the checkpoint has no such tensor.
            CheckpointError: If the file cannot be read or is shorter than its header says.
        """
        meta = self.meta[name]
        shape = meta.shape if rows is None else (rows[1] - rows[0], *meta.shape[1:])
        out = torch.empty(shape, dtype=meta.dtype)
        self.read_into(name, out, rows)
        return out

    def read_into(self, name: str, out: torch.Tensor, rows: tuple[int, int] | None = None) -> None:
        """Read a tensor (or a block of its rows) straight into ``out``'s memory.

        Args:
            name: Tensor name.
            out: A contiguous CPU tensor with the stored dtype and the right number of elements.
            rows: ``(start, stop)`` along dim 0, or ``None`` for the whole tensor.

        Raises:
            ValueError: If ``out`` does not fit.
            CheckpointError: If the file cannot be read or is shorter than its header says.
        """
        meta = self.meta[name]
        offset, nbytes = meta.offset, meta.nbytes
        if rows is not None:
            row_bytes = nbytes // meta.shape[0] if meta.shape and meta.shape[0] else 0
            offset, nbytes = offset + rows[0] * row_bytes, (rows[1] - rows[0]) * row_bytes
        if out.dtype != meta.dtype or out.nbytes != nbytes or not out.is_contiguous() or out.device.type != "cpu":
            raise ValueError(f"buffer {tuple(out.shape)} {out.dtype} does not fit tensor {name!r}")
        if not nbytes:
            return
        self._pread(meta, memoryview(out.reshape(-1).view(torch.uint8).numpy()), offset)

    def read_converted_into(self, name: str, out: torch.Tensor, rows: tuple[int, int] | None = None,
                            chunk_bytes: int = 8 << 20) -> None:
        """Read a floating tensor (or a block of its rows) into ``out`` of another floating dtype.

        The stored bytes go through a scratch buffer of at most ``chunk_bytes``, converted chunk
        by chunk: no temporary of the tensor's size, and ``out`` may be a reused buffer.

        Args:
            name: Tensor name.
            out: A contiguous CPU floating tensor with the right number of elements.
            rows: ``(start, stop)`` along dim 0, or ``None`` for the whole tensor.
            chunk_bytes: Size of the scratch buffer.

        Raises:
            ValueError: If ``out`` does not fit or a dtype is not floating.
            CheckpointError: If the file cannot be read or is shorter than its header says.
        """
        meta = self.meta[name]
        size = dtype_size(meta.dtype)
        offset, count = meta.offset, meta.nbytes // size
        if rows is not None:
            row = count // meta.shape[0] if meta.shape and meta.shape[0] else 0
            offset, count = offset + rows[0] * row * size, (rows[1] - rows[0]) * row
        if (out.numel() != count or not out.is_contiguous() or out.device.type != "cpu"
                or not (out.dtype.is_floating_point and meta.dtype.is_floating_point)):
            raise ValueError(f"buffer {tuple(out.shape)} {out.dtype} does not fit tensor {name!r}")
        flat = out.reshape(-1)
        step = max(1, min(count, chunk_bytes // size))
        scratch = torch.empty(step if count else 0, dtype=meta.dtype)
        raw = memoryview(scratch.view(torch.uint8).numpy()) if count else None
        for start in range(0, count, step):
            width = min(step, count - start)
            self._pread(meta, raw[:width * size], offset + start * size)
            flat[start:start + width].copy_(scratch[:width])

    def _pread(self, meta: TensorMeta, view: memoryview, offset: int) -> None:
        """Fill ``view`` from ``meta.file`` at ``offset`` (``preadv``, GIL released)."""
        nbytes = view.nbytes
        try:
            fd = self._fd(meta.file)
            done = 0
            while done < nbytes:
                n = os.preadv(fd, [view[done:]], offset + done)
                if n <= 0:
                    raise CheckpointError(f"{meta.file}: unexpected end of file reading tensor {meta.name!r}")
                done += n
        except OSError as exc:
            raise CheckpointError(f"{meta.file}: cannot read tensor {meta.name!r} ({exc})") from None

    def _fd(self, file: Path) -> int:
        with self._lock:
            fd = self._handles.get(file)
            if fd is None:
                fd = os.open(file, os.O_RDONLY)
                self._handles[file] = fd
            return fd

    def close(self) -> None:
        """Release open file handles."""
        with self._lock:
            for fd in self._handles.values():
                os.close(fd)
            self._handles.clear()

    def __del__(self):  # pragma: no cover - best effort
        try:
            self.close()
        except Exception:
            pass
