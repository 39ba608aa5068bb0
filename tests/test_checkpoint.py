"""Safe reading of safetensors: honest files load, lying or hostile ones are refused."""

from __future__ import annotations

import json
import pickle
import struct

import pytest
import torch
from safetensors.torch import save_file

from hubmerge.checkpoint import Checkpoint, read_header
from hubmerge.errors import CheckpointError, ModelReferenceError, UnsafeCheckpointError


def _raw(path, header: dict, data: bytes):
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


def test_reads_single_and_sharded(tmp_path):
    a = {"x": torch.arange(6, dtype=torch.float32).reshape(2, 3), "y": torch.tensor([1, 2], dtype=torch.int64)}
    save_file(a, tmp_path / "model.safetensors")
    ckpt = Checkpoint(tmp_path)
    assert ckpt.meta["x"].shape == (2, 3) and ckpt.meta["y"].dtype == torch.int64
    assert torch.equal(ckpt.get("x"), a["x"])

    sharded = tmp_path / "sharded"
    sharded.mkdir()
    save_file({"x": a["x"]}, sharded / "m-1.safetensors")
    save_file({"y": a["y"]}, sharded / "m-2.safetensors")
    (sharded / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"x": "m-1.safetensors", "y": "m-2.safetensors"}}))
    ckpt = Checkpoint(sharded)
    assert set(ckpt.names()) == {"x", "y"} and torch.equal(ckpt.get("y"), a["y"])


def test_offsets_past_end_refused(tmp_path):
    f = _raw(tmp_path / "model.safetensors", {"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, b"\0" * 8)
    with pytest.raises(CheckpointError, match=r"'w'.*past the end"):
        read_header(f)


def test_overlapping_tensors_refused(tmp_path):
    header = {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
              "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}
    with pytest.raises(CheckpointError, match="overlap"):
        read_header(_raw(tmp_path / "x.safetensors", header, b"\0" * 12))


def test_size_not_matching_shape_refused(tmp_path):
    header = {"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}
    with pytest.raises(CheckpointError, match="do not hold shape"):
        read_header(_raw(tmp_path / "x.safetensors", header, b"\0" * 8))


def test_huge_header_refused_without_reading_it(tmp_path):
    f = tmp_path / "x.safetensors"
    f.write_bytes(struct.pack("<Q", 2**40) + b"{}")
    with pytest.raises(CheckpointError, match="exceeds"):
        read_header(f)


def test_truncated_file_refused(tmp_path):
    f = tmp_path / "model.safetensors"
    save_file({"w": torch.ones(100)}, f)
    f.write_bytes(f.read_bytes()[:-10])
    with pytest.raises(CheckpointError, match="past the end"):
        Checkpoint(tmp_path)


def test_pickle_disguised_as_safetensors_refused(tmp_path):
    f = tmp_path / "model.safetensors"
    f.write_bytes(pickle.dumps({"w": [1.0, 2.0]}))
    with pytest.raises(UnsafeCheckpointError, match="pickle"):
        Checkpoint(tmp_path)
    torch.save({"w": torch.ones(2)}, f)  # a zip archive
    with pytest.raises(UnsafeCheckpointError):
        Checkpoint(tmp_path)


def test_pickle_only_directory_refused_with_hint(tmp_path):
    torch.save({"w": torch.ones(2)}, tmp_path / "pytorch_model.bin")
    with pytest.raises(UnsafeCheckpointError, match="never unpickles.*safetensors"):
        Checkpoint(tmp_path)
    with pytest.raises(ModelReferenceError):
        Checkpoint(tmp_path / "missing")


@pytest.mark.parametrize("header_len", [0x80, 0x180, 0x4B50])  # low byte 0x80, or the bytes "PK"
def test_header_length_that_looks_like_a_pickle_or_zip_is_still_read(tmp_path, header_len):
    """A valid file whose header length starts with 0x80 or spells "PK" is not mistaken for a pickle."""
    data = struct.pack("<2f", 1.5, -2.0)
    header = json.dumps({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}).encode()
    header += b" " * (header_len - len(header))
    path = tmp_path / "model.safetensors"
    path.write_bytes(struct.pack("<Q", header_len) + header + data)
    assert path.read_bytes()[:1] == b"\x80" or path.read_bytes()[:2] == b"PK"
    metas = read_header(path)
    assert list(metas) == ["w"] and metas["w"].shape == (2,)
    from safetensors.torch import load_file

    assert load_file(path)["w"].tolist() == [1.5, -2.0]  # the reference reader agrees it is valid
