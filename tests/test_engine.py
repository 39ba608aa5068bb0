"""The streaming engine on tiny real BERT models, against in-memory merges."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from hubmerge.engine import merge
from hubmerge.errors import IncompatibleModelError, OutputExistsError
from hubmerge.hookspecs import hookimpl
from hubmerge.method import MergeMethod, Params
from hubmerge.plugins import get_plugin_manager
from hubmerge.recipe import load_recipe
from helpers import make_expert, write_recipe


class HalfSumParams(Params):
    factor: float = 0.5


class HalfSum(MergeMethod):
    """theta_0 + factor * sum(tau) -- written here so the engine is tested on its own."""

    name = "test_halfsum"
    summary = "test method"
    Params = HalfSumParams

    def merge_tensor(self, group):
        if group.name == "boom":
            raise RuntimeError("method failed on purpose")
        return group.base + self.params.factor * group.deltas.sum(0)


class CountingSum(HalfSum):
    """Needs one pre-pass: counts all floating elements, then scales by 1/count * count (== 1)."""

    name = "test_counting"
    prepasses = 1

    def observe(self, pass_index, group):
        return {"n": torch.tensor(float(group.base.numel()))}

    def finish_pass(self, pass_index, totals):
        self.total = totals["n"].item()


class _Plugin:
    @hookimpl
    def hubmerge_register_methods(self, register):
        register(HalfSum)
        register(CountingSum)


@pytest.fixture(autouse=True)
def test_methods():
    pm = get_plugin_manager()
    plugin = _Plugin()
    pm.register(plugin, name="engine-test-methods")
    yield
    pm.unregister(plugin)


def _expected(models, names, factor=0.5):
    base = load_file(models["base"] / "model.safetensors")
    experts = [load_file(models[n] / "model.safetensors") for n in names]
    return {k: (v + factor * sum(e[k] - v for e in experts)) if v.dtype.is_floating_point else v
            for k, v in base.items()}


def test_merge_matches_in_memory_and_loads(tiny_models, tmp_path):
    from transformers import AutoModel

    out = tmp_path / "merged"
    recipe = write_recipe(tmp_path / "r.yaml", base=str(tiny_models["base"]),
                          experts=[str(tiny_models["e0"]), str(tiny_models["e1"])],
                          method="test_halfsum", output={"path": str(out)})
    result = merge(load_recipe(recipe))
    merged = load_file(out / "model.safetensors")
    expected = _expected(tiny_models, ["e0", "e1"])
    assert merged.keys() == expected.keys()
    for k in expected:
        torch.testing.assert_close(merged[k], expected[k], rtol=0, atol=1e-6)
    assert result.bytes_written == sum(t.nbytes for t in merged.values())
    # loads as a transformers model and computes like the in-memory merge
    model = AutoModel.from_pretrained(out).eval()
    ref = AutoModel.from_pretrained(tiny_models["base"]).eval()
    ref.load_state_dict(expected, strict=False)
    ids = torch.randint(0, 99, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).last_hidden_state, ref(ids).last_hidden_state)
    # config copied, resolved recipe written with explicit params
    assert (out / "config.json").is_file()
    resolved = yaml.safe_load((out / "hubmerge_recipe.yaml").read_text())
    assert resolved["params"] == {"factor": 0.5} and resolved["provenance"]["hubmerge"]
    assert [e["path"] for e in resolved["experts"]] == [str(tiny_models["e0"]), str(tiny_models["e1"])]


def test_sharded_output_with_index_and_dtype(tiny_models, tmp_path):
    from transformers import AutoModel

    out = tmp_path / "sharded"
    recipe = write_recipe(tmp_path / "r.yaml", base=str(tiny_models["base"]), experts=[str(tiny_models["e2"])],
                          method="test_halfsum", output={"path": str(out), "shard_size": "8KB", "dtype": "float16"})
    merge(load_recipe(recipe))
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and all((out / s).is_file() for s in shards)
    merged = {}
    for s in shards:
        merged.update(load_file(out / s))
    expected = _expected(tiny_models, ["e2"])
    for k, v in expected.items():
        assert merged[k].dtype == (torch.float16 if v.dtype.is_floating_point else v.dtype)
        torch.testing.assert_close(merged[k].float(), v.float().half().float(), rtol=0, atol=0)
    AutoModel.from_pretrained(out)


def test_prepass_statistics_are_summed(tiny_models, tmp_path):
    recipe = write_recipe(tmp_path / "r.yaml", base=str(tiny_models["base"]), experts=[str(tiny_models["e0"])],
                          method="test_counting", output={"path": str(tmp_path / "o")})
    result = merge(load_recipe(recipe))
    base = load_file(tiny_models["base"] / "model.safetensors")
    assert result.method.total == sum(t.numel() for t in base.values() if t.dtype.is_floating_point)


def test_integer_buffers_come_from_base(tiny_models, tmp_path):
    base_dir, expert_dir = tmp_path / "b", tmp_path / "x"
    base_dir.mkdir()
    state = load_file(tiny_models["base"] / "model.safetensors")
    state["counter"] = torch.tensor([1, 2, 3])
    save_file(state, base_dir / "model.safetensors")
    make_expert(base_dir, expert_dir, seed=5)
    state_x = load_file(expert_dir / "model.safetensors")
    state_x["counter"] = torch.tensor([7, 7, 7])
    save_file(state_x, expert_dir / "model.safetensors")
    recipe = write_recipe(tmp_path / "r.yaml", base=str(base_dir), experts=[str(expert_dir)],
                          method="test_halfsum", output={"path": str(tmp_path / "o")})
    merge(load_recipe(recipe))
    assert torch.equal(load_file(tmp_path / "o" / "model.safetensors")["counter"], torch.tensor([1, 2, 3]))


def test_incompatible_expert_named_and_nothing_written(tiny_models, tmp_path):
    bad = tmp_path / "bad"
    make_expert(tiny_models["base"], bad, seed=1)
    state = load_file(bad / "model.safetensors")
    state["encoder.layer.1.output.dense.weight"] = torch.zeros(32, 36)
    save_file(state, bad / "model.safetensors")
    out = tmp_path / "o"
    recipe = write_recipe(tmp_path / "r.yaml", base=str(tiny_models["base"]), experts=[str(bad)],
                          method="test_halfsum", output={"path": str(out)})
    with pytest.raises(IncompatibleModelError, match=r"encoder\.layer\.1\.output\.dense\.weight.*\[32, 36\]"):
        merge(load_recipe(recipe))
    assert not out.exists() and not list(tmp_path.glob(".hubmerge-partial-*"))


def test_failure_mid_merge_leaves_nothing(tiny_models, tmp_path):
    base_dir, expert_dir = tmp_path / "b", tmp_path / "x"
    base_dir.mkdir()
    state = load_file(tiny_models["base"] / "model.safetensors")
    state["boom"] = torch.ones(3)
    save_file(state, base_dir / "model.safetensors")
    make_expert(base_dir, expert_dir, seed=5)
    out = tmp_path / "o"
    recipe = write_recipe(tmp_path / "r.yaml", base=str(base_dir), experts=[str(expert_dir)],
                          method="test_halfsum", output={"path": str(out)})
    with pytest.raises(RuntimeError, match="on purpose"):
        merge(load_recipe(recipe))
    assert not out.exists() and not list(tmp_path.glob(".hubmerge-partial-*"))


def test_existing_foreign_output_refused_unless_overwrite(tiny_models, tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    (out / "precious.txt").write_text("mine")
    recipe = load_recipe(write_recipe(tmp_path / "r.yaml", base=str(tiny_models["base"]),
                                      experts=[str(tiny_models["e0"])], method="test_halfsum",
                                      output={"path": str(out)}))
    with pytest.raises(OutputExistsError, match="not written by hubmerge"):
        merge(recipe)
    assert (out / "precious.txt").read_text() == "mine"
    merge(recipe, overwrite=True)
    assert not (out / "precious.txt").exists() and (out / "model.safetensors").is_file()
    merge(recipe)  # ours now: replaced without --overwrite


@pytest.mark.parametrize("method, params", [("task_arithmetic", {"scale": 0.7}),
                                            ("ties", {"k": 0.3, "scope": "global"}),
                                            ("ties", {"k": 0.3, "scope": "tensor"}),
                                            ("linear", {"weights": [1.0, 3.0]})])
def test_row_blocks_give_the_same_result(tiny_models, tmp_path, monkeypatch, method, params):
    """Element-wise methods stream big tensors in row blocks, and so does TIES' per-tensor top-k
    (after its per-tensor passes over the blocks): identical bytes to whole tensors."""
    import hubmerge.engine as engine

    outs = {}
    calls = []
    build_group = engine.build_group
    for label, block in (("whole", 1 << 40), ("blocks", 2048)):
        monkeypatch.setattr(engine, "BLOCK_BYTES", block)
        monkeypatch.setattr(engine, "TENSOR_PASS_BYTES", block)
        monkeypatch.setattr(engine, "build_group", _counting(build_group, calls, label))
        out = tmp_path / f"{label}"
        recipe = write_recipe(tmp_path / f"{label}.yaml", base=str(tiny_models["base"]),
                              experts=[str(tiny_models["e0"]), str(tiny_models["e1"])], method=method,
                              params=params, output={"path": str(out)})
        merge(load_recipe(recipe))
        outs[label] = (out / "model.safetensors").read_bytes()
    items = engine.plan_items(engine.open_inputs(load_recipe(recipe)), ["embeddings.word_embeddings.weight"],
                              elementwise=True, dtype=torch.float32, block_bytes=2048)
    assert len(items) > 10 and items[-1].last and not items[0].last
    assert calls.count("blocks") > 2 * calls.count("whole")  # the blocks run really merged in blocks
    assert outs["whole"] == outs["blocks"]


def _counting(fn, calls, label):
    def counted(*args, **kwargs):
        calls.append(label)
        return fn(*args, **kwargs)
    return counted


def test_background_writer_starts_writeback_of_contiguous_ranges(tmp_path, monkeypatch):
    """With ``sync_bytes`` the writing thread starts writing each shard to disk as it goes: the
    ranges handed to ``start_writeback`` follow each other from the start of the shard file, and
    the stored tensors are the ones given."""
    from hubmerge import writer
    from hubmerge.writer import BackgroundWriter, ShardedWriter, TensorSpec

    calls = []
    real = writer.start_writeback
    monkeypatch.setattr(writer, "start_writeback", lambda fd, off, n: calls.append((off, n)) or real(fd, off, n))
    tensors = {f"t{i}": torch.randn(64, 100, generator=torch.Generator().manual_seed(i)) for i in range(6)}
    out = ShardedWriter(tmp_path / "out", [TensorSpec(n, tuple(t.shape), t.dtype) for n, t in tensors.items()],
                        shard_size=1 << 30)
    background = BackgroundWriter(out, sync_bytes=50_000)
    for name, tensor in tensors.items():
        background.write(name, tensor.clone())
    background.close()
    out.finish()
    stored = load_file(tmp_path / "out" / "model.safetensors")
    assert all(torch.equal(stored[n], t) for n, t in tensors.items())
    # 25,600 bytes a tensor: every second write crosses 50,000 unsynced bytes
    assert [n for _, n in calls[1:]] == [51_200, 51_200] and len(calls) == 3
    assert calls[0][0] == 0 and all(calls[i][0] == calls[i - 1][0] + calls[i - 1][1] for i in (1, 2))
    header = (tmp_path / "out" / "model.safetensors").stat().st_size - 6 * 25_600
    assert calls[0][1] == header + 51_200


@pytest.mark.parametrize("kernel_copy", [True, False])
def test_file_range_copied_into_shard(tmp_path, monkeypatch, kernel_copy):
    """A tensor handed to the writer as its bytes in an input file (a FlexMerge group of one) is
    stored bit for bit, by ``os.copy_file_range`` or, where the kernel refuses it, through a buffer."""
    import errno
    import os

    from hubmerge.checkpoint import Checkpoint
    from hubmerge.writer import FileRange, ShardedWriter, TensorSpec

    tensors = {"a": torch.randn(300, 7), "b": torch.arange(10, dtype=torch.int64), "c": torch.randn(5)}
    save_file(tensors, tmp_path / "in.safetensors")
    meta = Checkpoint(tmp_path, weights="in.safetensors").meta
    if not kernel_copy:
        def refuse(*args):
            raise OSError(errno.EXDEV, "cross-device")
        monkeypatch.setattr(os, "copy_file_range", refuse, raising=False)
    out = ShardedWriter(tmp_path / "out", [TensorSpec(n, tuple(t.shape), t.dtype) for n, t in tensors.items()],
                        shard_size=1 << 30)
    for name in ("a", "b"):
        m = meta[name]
        out.write(name, FileRange(m.file, m.offset, m.nbytes, tuple(m.shape), m.dtype))
    out.write("c", tensors["c"])
    out.finish()
    stored = load_file(tmp_path / "out" / "model.safetensors")
    assert all(torch.equal(stored[n], t) for n, t in tensors.items())
    with pytest.raises(ValueError, match="does not match the plan"):
        bad = ShardedWriter(tmp_path / "bad", [TensorSpec("a", (300, 7), torch.float16)], shard_size=1 << 30)
        m = meta["a"]
        bad.write("a", FileRange(m.file, m.offset, m.nbytes, tuple(m.shape), m.dtype))
    bad.abort()
