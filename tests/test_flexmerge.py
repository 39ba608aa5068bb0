"""FlexMerge and the per-task deployment format, on tiny real models and constructed task vectors."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from hubmerge.checkpoint import Checkpoint
from hubmerge.deployment import (
    Deployment,
    DeploymentWriter,
    export_task,
    load_task_model,
    pack_mask,
    unpack_mask,
)
from hubmerge.errors import DeploymentError, RecipeError
from hubmerge.flexmerge import (
    Block,
    MaskedStorage,
    assign_blocks,
    auto_block_of,
    block_linkage,
    compile_block_rules,
    merge_order,
    parse_sizes,
    run_flexmerge,
    storage_curve,
    tensor_key,
)
from hubmerge.plugins import registered_methods
from hubmerge.recipe import BlockRule, load_recipe
from hubmerge.writer import TensorSpec
from helpers import write_recipe


def _need(*methods):
    missing = [m for m in methods if m not in registered_methods()]
    if missing:
        pytest.skip(f"method plugin(s) {missing} not installed")


def _state(path: Path) -> dict[str, torch.Tensor]:
    return load_file(path / "model.safetensors")


def _recipe(tmp_path, models, names, out, **flex):
    return load_recipe(write_recipe(
        tmp_path / "r.yaml", base=str(models["base"]), experts=[str(models[n]) for n in names],
        method=flex.pop("method", "task_arithmetic"), flexmerge=flex, output={"path": str(out)},
    ))


@pytest.fixture(scope="module")
def ta_run(tiny_models, tmp_path_factory):
    """FlexMerge + task arithmetic over the three tiny BERT experts, sizes 1, 1.5, 2 and 3."""
    _need("task_arithmetic")
    tmp = tmp_path_factory.mktemp("ta")
    out = tmp / "out"
    result = run_flexmerge(_recipe(tmp, tiny_models, ["e0", "e1", "e2"], out, sizes=[1, "1.5x", 2, 3]))
    return result, out


# -- sizes at both ends ---------------------------------------------------------------------------------
def test_size_T_reproduces_every_expert_exactly(ta_run, tiny_models):
    result, out = ta_run
    assert result.tasks == ["e0", "e1", "e2"]
    deployment = Deployment(out / "size-3")
    for task in result.tasks:
        expert = _state(tiny_models[task])
        for name, tensor in expert.items():
            assert torch.equal(deployment.tensor(task, name), tensor), (task, name)
    assert deployment.storage["model_equivalents"] == 3.0
    deployment.close()


def test_size_1_is_task_arithmetic_mean_over_all_experts(ta_run, tiny_models):
    result, out = ta_run
    base = _state(tiny_models["base"])
    experts = [_state(tiny_models[t]) for t in result.tasks]
    deployment = Deployment(out / "size-1")
    assert result.inner.params["scale"] == 1.5  # the paper's lambda
    for name, theta0 in base.items():
        expected = theta0 + 1.5 * sum(e[name] - theta0 for e in experts) / 3  # theta_0 + lambda * mean(tau)
        keys = {deployment.views[t][name] for t in result.tasks}
        assert keys == {tensor_key(name, (0, 1, 2))}  # one tensor shared by every task
        torch.testing.assert_close(deployment.tensor("e1", name), expected, rtol=0, atol=1e-6)
    assert deployment.storage["bytes"] == deployment.storage["model_bytes"]
    deployment.close()


def test_lambda_from_inner_params(tiny_models, tmp_path):
    _need("task_arithmetic")
    out = tmp_path / "o"
    result = run_flexmerge(_recipe(tmp_path, tiny_models, ["e0", "e2"], out, sizes=[1], inner_params={"scale": 0.7}))
    assert result.inner.params["scale"] == 0.7
    base, e0, e2 = (_state(tiny_models[n]) for n in ("base", "e0", "e2"))
    deployment = Deployment(out / "size-1")
    for name, theta0 in base.items():
        expected = theta0 + 0.7 * ((e0[name] - theta0) + (e2[name] - theta0)) / 2
        torch.testing.assert_close(deployment.tensor("e2", name), expected, rtol=0, atol=1e-6)
    deployment.close()


def test_ties_global_gets_per_group_statistics(constructed, tmp_path):
    _need("task_arithmetic", "ties")
    from hubmerge_plugins.ties import Ties

    out = tmp_path / "o"
    names = ["t0", "t1", "t2"]
    recipe = _recipe(tmp_path, constructed, names, out, sizes=[1, 2], inner="ties",
                     inner_params={"k": 0.5, "scope": "global"},
                     blocks=[{"name": "xy", "pattern": r"^[xy]\."}])
    result = run_flexmerge(recipe)
    base = _state(constructed["base"])
    experts = [_state(constructed[t]) for t in names]
    for plan in result.deployments:
        deployment = Deployment(plan.path)
        for group in plan.groups["xy"]:
            if len(group) == 1:
                continue
            # TIES' "global" top-k over the group's block (x and y), for the group's members only
            deltas = {n: torch.stack([experts[t][n] - base[n] for t in group]) for n in ("x.weight", "y.weight")}
            method = Ties({"k": 0.5, "scope": "global"})
            for p in range(method.prepasses):
                totals = {}
                for n, d in deltas.items():
                    for key, value in method.observe(p, _group(n, base[n], d)).items():
                        totals[key] = totals[key] + value if key in totals else value
                method.finish_pass(p, totals)
            for n, d in deltas.items():
                expected = method.merge_tensor(_group(n, base[n], d))
                torch.testing.assert_close(deployment.tensor(names[group[0]], n), expected, rtol=0, atol=1e-6)
        deployment.close()


def _group(name, base, deltas):
    from hubmerge.method import TensorGroup

    return TensorGroup(name, base.clone(), deltas.clone(), [f"t{i}" for i in range(deltas.shape[0])])


# -- merge order on constructed task vectors ------------------------------------------------------------
COS_X = np.array([[1.0, 0.9, 0.5], [0.9, 1.0, 0.1], [0.5, 0.1, 1.0]])
COS_Y = np.array([[1.0, 0.3, 0.0], [0.3, 1.0, 0.0], [0.0, 0.0, 1.0]])


@pytest.fixture()
def constructed(tmp_path) -> dict[str, Path]:
    """A 3-tensor model: blocks ``x`` and ``y`` with known cosines between the experts, an int buffer."""
    base = {"x.weight": torch.randn(4, generator=torch.Generator().manual_seed(0)),
            "y.weight": torch.randn(4, generator=torch.Generator().manual_seed(1)),
            "counter": torch.tensor([1, 2, 3])}
    models = {"base": tmp_path / "base"}
    models["base"].mkdir()
    save_file(base, models["base"] / "model.safetensors")
    (models["base"] / "config.json").write_text("{}")
    lx, ly = np.linalg.cholesky(COS_X), np.linalg.cholesky(COS_Y)
    for k, scale in enumerate((2.0, 0.5, 3.0)):  # cosines do not depend on the norms
        d = tmp_path / f"t{k}"
        d.mkdir()
        state = {
            "x.weight": base["x.weight"] + scale * torch.tensor([*lx[k], 0.0], dtype=torch.float32),
            "y.weight": base["y.weight"] + torch.tensor([0.0, *ly[k]], dtype=torch.float32),
            "counter": torch.tensor([1, 2, 3]),
        }
        save_file(state, d / "model.safetensors")
        models[f"t{k}"] = d
    return models


def test_merge_order_is_complete_linkage(constructed, tmp_path):
    _need("task_arithmetic")
    out = tmp_path / "o"
    result = run_flexmerge(_recipe(tmp_path, constructed, ["t0", "t1", "t2"], out, sizes="all"))
    steps = [(s.block, s.left, s.right) for s in result.order]
    # x's closest pair, then y's; single linkage would take x's {t0,t1}+t2 (max cos 0.5) second,
    # complete linkage rates that pair by its *minimum* cosine 0.1 < 0.3
    assert steps == [("x", (0,), (1,)), ("y", (0,), (1,)), ("x", (0, 1), (2,)), ("y", (0, 1), (2,))]
    np.testing.assert_allclose([s.similarity for s in result.order], [0.9, 0.3, 0.1, 0.0], atol=1e-5)
    np.testing.assert_allclose(result.cosines["x"], COS_X, atol=1e-5)
    summary = json.loads((out / "flexmerge.json").read_text())
    assert [s["block"] for s in summary["merge_order"]] == ["x", "y", "x", "y"]


def test_storage_accounting_matches_hand_count(constructed, tmp_path):
    _need("task_arithmetic")
    out = tmp_path / "o"
    result = run_flexmerge(_recipe(tmp_path, constructed, ["t0", "t1", "t2"], out, sizes=[1, "1.5", 2, "3x"]))
    # one model: x (4 x f32) + y (4 x f32) + counter (3 x i64) = 16 + 16 + 24 bytes;
    # the counter is stored once, every merge saves one 16-byte copy of x or y
    assert result.model_bytes == 56
    assert result.storage_curve == [24 + 3 * 16 + 3 * 16, 104, 88, 72, 56]
    by_size = {p.size.label: p for p in result.deployments}
    # budget 56 -> all 4 merges; 84 -> 3 (72 <= 84 < 88); 112 -> 1 (104); 168 -> none (120)
    assert {k: (p.merges, p.storage_bytes) for k, p in by_size.items()} == {
        "1": (4, 56), "1.5": (3, 72), "2": (1, 104), "3": (0, 120)}
    for label, plan in by_size.items():
        directory = out / f"size-{label}"
        manifest = json.loads((directory / "deployment.json").read_text())
        on_disk = sum(m.nbytes for m in Checkpoint(directory, weights="deployment.safetensors").meta.values())
        groups = {b["name"]: len(b["groups"]) for b in manifest["flexmerge"]["blocks"]}
        assert on_disk == manifest["storage"]["bytes"] == plan.storage_bytes == 24 + 16 * sum(groups.values())
        assert manifest["storage"]["model_equivalents"] == pytest.approx(plan.storage_bytes / 56)
    d = Deployment(out / "size-1.5")  # x fully merged, y: {t0, t1} and {t2}
    assert d.views["t0"]["y.weight"] == d.views["t1"]["y.weight"] != d.views["t2"]["y.weight"]
    assert len({d.views[t]["x.weight"] for t in ("t0", "t1", "t2")}) == 1
    assert {d.views[t]["counter"] for t in ("t0", "t1", "t2")} == {"counter"}
    d.close()


def test_masked_storage_hook_counts_like_table_1():
    block = Block("b", ("w",), numel=100, nbytes=400)
    emr = MaskedStorage(scalar_bytes=4)
    # singletons and pairs keep their experts
    assert emr.block_bytes(block, [1, 1, 1, 1, 1]) == 5 * 400
    assert emr.block_bytes(block, [2, 1, 1, 1]) == 5 * 400
    # a group of 3: pre-trained + unified + 3 masks of ceil(100/8)=13 bytes + 3 scalars; two singletons
    assert emr.block_bytes(block, [3, 1, 1]) == 400 + (400 + 3 * (13 + 4)) + 2 * 400
    assert MaskedStorage().block_bytes(block, [5]) == 400 + 400 + 5 * 13
    curve = storage_curve([], [block], 5, fixed_bytes=10, model=emr)
    assert curve == [10 + 5 * 400]


# -- ordering against the paper's greedy loop --------------------------------------------------------------
def _greedy_reference(block_cos: dict[str, np.ndarray], blocks: list[str]):
    """Algorithm 1 as written: each step scans every pair of groups of every block."""
    tasks = next(iter(block_cos.values())).shape[0]
    groups = {b: [(i,) for i in range(tasks)] for b in blocks}
    steps = []
    while True:
        best = None
        for bi, b in enumerate(blocks):
            gs = sorted(groups[b])
            for x, y in itertools.combinations(range(len(gs)), 2):
                sim = min(block_cos[b][i, j] for i in gs[x] for j in gs[y])
                key = (-sim, bi, gs[x][0], gs[y][0])
                if best is None or key < best[0]:
                    best = (key, b, gs[x], gs[y])
        if best is None:
            return steps
        _, b, left, right = best
        groups[b] = [g for g in groups[b] if g not in (left, right)] + [tuple(sorted(left + right))]
        steps.append((b, left, right))


@pytest.mark.parametrize("seed", range(6))
def test_merge_order_equals_greedy_loop(seed):
    rng = np.random.default_rng(seed)
    blocks = [f"b{i}" for i in range(4)]
    block_cos = {}
    for b in blocks:
        v = rng.normal(size=(5, 6)) + rng.normal(size=6)
        v /= np.linalg.norm(v, axis=1, keepdims=True)
        cos = v @ v.T
        block_cos[b] = np.round(cos, 1) if seed % 2 else cos  # odd seeds: many ties
    order = merge_order(block_cos, blocks)
    assert [(s.block, s.left, s.right) for s in order] == _greedy_reference(block_cos, blocks)
    sims = [s.similarity for s in order]
    assert sims == sorted(sims, reverse=True)


def test_block_linkage_uses_the_minimum():
    steps = block_linkage(COS_X)
    assert [(a, b) for a, b, _ in steps] == [((0,), (1,)), ((0, 1), (2,))]
    assert steps[1][2] == pytest.approx(0.1)


# -- blocks ----------------------------------------------------------------------------------------------
def _saved_names(model, tmp_path) -> list[str]:
    model.save_pretrained(tmp_path)
    return Checkpoint(tmp_path).names()


def _blocks_of(names):
    specs = [TensorSpec(n, (1,), torch.float32) for n in names]
    return {b.name: set(b.tensors) for b in assign_blocks(specs)}


ARCHITECTURES = {
    "bert": (
        lambda t: __import__("transformers").BertConfig(
            hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=20, vocab_size=50,
            max_position_embeddings=16),
        "BertModel",
        {"encoder.layer.1.attention", "encoder.layer.1.attention.output.LayerNorm", "encoder.layer.1.mlp",
         "encoder.layer.1.output.LayerNorm"},
        {"embeddings.word_embeddings", "embeddings.position_embeddings", "embeddings.token_type_embeddings",
         "embeddings.LayerNorm", "pooler.dense"},
    ),
    "vit": (
        lambda t: __import__("transformers").ViTConfig(
            hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=20, image_size=8,
            patch_size=4),
        "ViTModel",
        {"encoder.layer.1.attention", "encoder.layer.1.mlp", "encoder.layer.1.layernorm_before",
         "encoder.layer.1.layernorm_after"},
        {"embeddings", "embeddings.patch_embeddings.projection", "layernorm", "pooler.dense"},
    ),
    "gpt2": (
        lambda t: __import__("transformers").GPT2Config(n_embd=16, n_layer=2, n_head=2, vocab_size=50,
                                                        n_positions=16, bos_token_id=0, eos_token_id=0),
        "GPT2LMHeadModel",
        {"transformer.h.1.attn", "transformer.h.1.mlp", "transformer.h.1.ln_1", "transformer.h.1.ln_2"},
        {"transformer.wte", "transformer.wpe", "transformer.ln_f"},
    ),
    "llama": (
        lambda t: __import__("transformers").LlamaConfig(
            hidden_size=16, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
            intermediate_size=20, vocab_size=50),
        "LlamaForCausalLM",
        {"model.layers.1.self_attn", "model.layers.1.mlp", "model.layers.1.input_layernorm",
         "model.layers.1.post_attention_layernorm"},
        {"model.embed_tokens", "model.norm", "lm_head"},
    ),
}


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_auto_blocks_per_architecture(arch, tmp_path):
    import transformers

    make_config, class_name, layer_blocks, other_blocks = ARCHITECTURES[arch]
    torch.manual_seed(0)
    model = getattr(transformers, class_name)(make_config(None))
    blocks = _blocks_of(_saved_names(model, tmp_path))
    layer1 = {b for b in blocks if any((b + ".").startswith(p) for p in ("encoder.layer.1.", "transformer.h.1.",
                                                                         "model.layers.1."))}
    assert layer1 == layer_blocks
    assert {b for b in blocks if not any(c.isdigit() for c in b)} == other_blocks
    # attention and MLP blocks hold several tensors, each norm block its weight (and bias)
    attention = next(b for b in layer_blocks if b.endswith(("attention", "attn")))
    assert len(blocks[attention]) >= 2 and len(blocks[next(b for b in layer_blocks if b.endswith("mlp"))]) >= 2


def test_auto_blocks_clip_and_t5_names():
    assert auto_block_of("vision_model.encoder.layers.3.self_attn.k_proj.weight") == \
        "vision_model.encoder.layers.3.self_attn"
    assert auto_block_of("vision_model.encoder.layers.3.layer_norm2.bias") == "vision_model.encoder.layers.3.layer_norm2"
    assert auto_block_of("vision_model.encoder.layers.3.mlp.fc1.weight") == "vision_model.encoder.layers.3.mlp"
    assert auto_block_of("vision_model.pre_layrnorm.weight") == "vision_model.pre_layrnorm"
    assert auto_block_of("encoder.block.2.layer.1.DenseReluDense.wi.weight") == \
        "encoder.block.2.layer.1.DenseReluDense"
    assert auto_block_of("decoder.block.0.layer.1.EncDecAttention.q.weight") == \
        "decoder.block.0.layer.1.EncDecAttention"


def test_block_rules_with_groups_and_unmatched_tensors():
    rules = compile_block_rules([BlockRule(name="layer", pattern=r"encoder\.layer\.(\d+)\."),
                                 BlockRule(name="emb", pattern=r"^embeddings\.")])
    names = ["embeddings.a.weight", "encoder.layer.0.x.weight", "encoder.layer.0.y.bias",
             "encoder.layer.1.x.weight", "pooler.dense.weight", "pooler.dense.bias"]
    blocks = {b.name: b.tensors for b in assign_blocks([TensorSpec(n, (2,), torch.float32) for n in names], rules)}
    assert blocks == {"emb": ("embeddings.a.weight",),
                      "layer.0": ("encoder.layer.0.x.weight", "encoder.layer.0.y.bias"),
                      "layer.1": ("encoder.layer.1.x.weight",),
                      "pooler.dense.weight": ("pooler.dense.weight",), "pooler.dense.bias": ("pooler.dense.bias",)}


def test_bad_regex_is_a_field_error_and_writes_nothing(tiny_models, tmp_path):
    _need("task_arithmetic")
    out = tmp_path / "o"
    recipe = _recipe(tmp_path, tiny_models, ["e0", "e1"], out,
                     blocks=[{"name": "ok", "pattern": "encoder"}, {"name": "bad", "pattern": "layer.(\\d+"}])
    with pytest.raises(RecipeError) as info:
        run_flexmerge(recipe)
    assert info.value.field == "flexmerge.blocks[1].pattern" and "layer.(" in str(info.value)
    assert not out.exists()


def test_recipe_blocks_are_used(tiny_models, tmp_path):
    _need("task_arithmetic")
    out = tmp_path / "o"
    result = run_flexmerge(_recipe(tmp_path, tiny_models, ["e0", "e1"], out, sizes=[1, 2],
                                   blocks=[{"name": "layer", "pattern": r"encoder\.layer\.(\d+)\."}]))
    names = [b.name for b in result.blocks]
    assert "layer.0" in names and "layer.1" in names and "pooler.dense.weight" in names
    assert len(result.order) == len(names)  # T - 1 = 1 merge per block


# -- sizes and the inner method: checked before any work ------------------------------------------------------
def test_size_parsing():
    assert [s.label for s in parse_sizes("all", 3)] == ["1", "2", "3"]
    assert [(s.label, s.directory) for s in parse_sizes([1, "1.5x", 2], 3)] == [
        ("1", "size-1"), ("1.5", "size-1.5"), ("2", "size-2")]
    assert parse_sizes(["3/2X"], 3)[0].label == "1.5"
    for bad, index in (([1, "abc"], 1), (["0.5"], 0), ([4], 0), ([2, "2x"], 1), ([True], 0)):
        with pytest.raises(RecipeError) as info:
            parse_sizes(bad, 3)
        assert info.value.field == f"flexmerge.sizes[{index}]"


@pytest.mark.parametrize("inner, params, field", [
    ("nope", {}, "flexmerge.inner"),
    ("slerp", {}, "flexmerge.inner"),  # merges exactly two experts; groups grow to three
    ("ties", {"k": 2.0}, "flexmerge.inner_params.k"),
    ("task_arithmetic", {"weights": [1, 1, 1]}, "flexmerge.inner_params.weights"),
    ("adamerging", {}, "flexmerge.inner"),  # learns from samples over the whole model
])
def test_inner_method_refused_up_front(tiny_models, tmp_path, inner, params, field):
    _need("task_arithmetic", "ties", "slerp")
    out = tmp_path / "o"
    recipe = _recipe(tmp_path, tiny_models, ["e0", "e1", "e2"], out, inner=inner, inner_params=params)
    with pytest.raises(RecipeError) as info:
        run_flexmerge(recipe)
    assert info.value.field == field
    assert not out.exists()


# -- loading and exporting tasks -----------------------------------------------------------------------
def _expected_state(tiny_models, tasks, groups_by_block, task):
    """The state dict of ``task`` by hand: its group's theta_0 + 1.5 * mean(tau), or its own weights."""
    base = _state(tiny_models["base"])
    experts = {t: _state(tiny_models[t]) for t in tasks}
    expected = {}
    for block in groups_by_block:
        group = next(g for g in block["groups"] if task in g)
        for name in block["tensors"]:
            if len(group) == 1:
                expected[name] = experts[task][name]
            else:
                expected[name] = base[name] + 1.5 * sum(experts[t][name] - base[name] for t in group) / len(group)
    return expected


def test_load_task_model_matches_export_and_expected_state(ta_run, tiny_models, tmp_path):
    from transformers import AutoModel, BertModel

    result, out = ta_run
    size2 = out / "size-2"
    blocks = json.loads((size2 / "deployment.json").read_text())["flexmerge"]["blocks"]
    ids = torch.randint(0, 99, (2, 7), generator=torch.Generator().manual_seed(0))
    models = {}
    for task in result.tasks:
        model = load_task_model(size2, task)
        assert isinstance(model, BertModel) and not model.training
        exported = AutoModel.from_pretrained(export_task(size2, task, tmp_path / task)).eval()
        reference = AutoModel.from_pretrained(tiny_models["base"]).eval()
        reference.load_state_dict(_expected_state(tiny_models, result.tasks, blocks, task))
        with torch.no_grad():
            got = model(ids).last_hidden_state
            torch.testing.assert_close(got, exported(ids).last_hidden_state, rtol=0, atol=0)
            torch.testing.assert_close(got, reference(ids).last_hidden_state, rtol=1e-5, atol=1e-5)
        models[task] = model
    # tasks sharing a group share the parameter's memory; others do not
    for block in blocks:
        name = block["tensors"][0]
        ptr = {t: dict(models[t].named_parameters())[name].data_ptr() for t in result.tasks}
        for g in block["groups"]:
            assert len({ptr[t] for t in g}) == 1
        assert len(set(ptr.values())) == len(block["groups"])
    assert models["e0"].hubmerge_task.task == "e0"
    # the export is an ordinary checkpoint with the base's names
    assert set(_state(tmp_path / "e0")) == set(_state(tiny_models["base"]))


def test_load_task_model_errors(ta_run):
    _, out = ta_run
    with pytest.raises(DeploymentError, match="no task 'nope'.*e0, e1, e2"):
        load_task_model(out / "size-2", "nope")
    with pytest.raises(DeploymentError, match="size-1, size-1.5, size-2, size-3"):
        load_task_model(out, "e0")  # the output root, not a deployment
    import hubmerge

    assert hubmerge.load_task_model is load_task_model


def test_export_task_cli(ta_run, tmp_path, capsys):
    import argparse

    from hubmerge.cli import flexmerge_commands

    parser = argparse.ArgumentParser()
    flexmerge_commands.add_commands(parser.add_subparsers(dest="command"))
    _, out = ta_run
    args = parser.parse_args(["export-task", str(out / "size-1"), "e2", str(tmp_path / "x")])
    assert args.handler(args) == 0
    assert "exported task 'e2'" in capsys.readouterr().out
    assert (tmp_path / "x" / "model.safetensors").is_file() and (tmp_path / "x" / "config.json").is_file()


# -- the format itself: masks, rescalers, atomicity -----------------------------------------------------
def test_pack_mask_roundtrip():
    mask = torch.rand(3, 7, generator=torch.Generator().manual_seed(0)) > 0.5
    packed = pack_mask(mask)
    assert packed.dtype == torch.uint8 and packed.numel() == math.ceil(21 / 8)
    assert torch.equal(unpack_mask(packed, mask.shape), mask)
    assert np.array_equal(packed.numpy(), np.packbits(mask.numpy().reshape(-1), bitorder="little"))


def test_masked_entries_rebuild_emr_style_weights(tmp_path):
    gen = torch.Generator().manual_seed(0)
    theta0, tau = torch.randn(5, 3, generator=gen), torch.randn(5, 3, generator=gen)
    masks = torch.rand(2, 5, 3, generator=gen) > 0.5
    packed = torch.stack([pack_mask(m) for m in masks])
    weights = [TensorSpec("w", (5, 3), torch.float32)]
    stored = [TensorSpec("w@pre", (5, 3), torch.float32), TensorSpec("w@uni", (5, 3), torch.float32),
              TensorSpec("w@masks", tuple(packed.shape), torch.uint8)]
    views = {t: {"w": {"base": "w@pre", "delta": "w@uni", "mask": "w@masks", "mask_row": i, "scale": g}}
             for i, (t, g) in enumerate((("a", 0.5), ("b", 2.0)))}
    writer = DeploymentWriter(tmp_path / "d", tasks=["a", "b"], weights=weights, stored=stored, views=views,
                              kind="emr", shard_size=10**9)
    for spec, tensor in zip(stored, (theta0, tau, packed)):
        writer.write(spec.name, tensor)
    writer.add_file("hubmerge_recipe.yaml", "# test\n")
    writer.finish()
    d = Deployment(tmp_path / "d")
    for i, (t, g) in enumerate((("a", 0.5), ("b", 2.0))):
        torch.testing.assert_close(d.tensor(t, "w"), theta0 + g * tau * masks[i])
    # storage counts the masks as bits: 2 x 60 bytes of floats + 2 x 2 bytes of masks
    assert d.storage["bytes"] == 2 * 60 + 2 * 2 and d.storage["model_bytes"] == 60
    d.close()
    with pytest.raises(DeploymentError, match="unknown stored tensor 'w@nope'"):
        DeploymentWriter(tmp_path / "e", tasks=["a"], weights=weights, stored=stored[:1],
                         views={"a": {"w": "w@nope"}}, kind="x", shard_size=10**9)


def test_failure_leaves_nothing_and_old_output_survives(tiny_models, tmp_path, monkeypatch):
    _need("task_arithmetic")
    from hubmerge_plugins.task_arithmetic import TaskArithmetic

    out = tmp_path / "o"
    recipe = _recipe(tmp_path, tiny_models, ["e0", "e1", "e2"], out, sizes=[1, 2])
    run_flexmerge(recipe)
    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    original = TaskArithmetic.merge_tensor

    def boom(self, group):
        if group.name.startswith("encoder.layer.1"):
            raise RuntimeError("inner method failed on purpose")
        return original(self, group)

    monkeypatch.setattr(TaskArithmetic, "merge_tensor", boom)
    with pytest.raises(RuntimeError, match="on purpose"):
        run_flexmerge(recipe)
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before  # untouched
    assert not list(tmp_path.glob(".hubmerge-partial-*"))
    fresh = tmp_path / "fresh"
    with pytest.raises(RuntimeError, match="on purpose"):
        run_flexmerge(recipe.model_copy(update={"output": recipe.output.model_copy(update={"path": str(fresh)})}))
    assert not fresh.exists() and not list(tmp_path.glob(".hubmerge-partial-*"))


def test_each_size_directory_is_self_contained(ta_run):
    import yaml

    _, out = ta_run
    for size in ("1", "1.5", "2", "3"):
        d = out / f"size-{size}"
        recipe = yaml.safe_load((d / "hubmerge_recipe.yaml").read_text())
        assert [str(s) for s in recipe["flexmerge"]["sizes"]] in (["1.5x"], [size])
        assert recipe["flexmerge"]["inner_params"]["scale"] == 1.5
        assert (d / "config.json").is_file()
    summary = json.loads((out / "flexmerge.json").read_text())
    assert [d["directory"] for d in summary["deployments"]] == ["size-1", "size-1.5", "size-2", "size-3"]
    curve = [s["storage_bytes"] for s in summary["merge_order"]]
    assert curve == sorted(curve, reverse=True)


def test_gram_statistics_add_up_over_row_blocks():
    from hubmerge.flexmerge import BlockGram, tensor_gram
    from hubmerge.method import TensorGroup

    deltas = torch.randn(3, 70000, 5, generator=torch.Generator().manual_seed(0))
    gram = BlockGram({"w": "b"})
    assert gram.elementwise  # the engine may stream large tensors in row blocks
    whole = gram.observe(0, TensorGroup("w", torch.zeros(70000, 5), deltas))["gram:b"]
    parts = sum(gram.observe(0, TensorGroup("w", torch.zeros(r1 - r0, 5), deltas[:, r0:r1], rows=(r0, r1)))["gram:b"]
                for r0, r1 in ((0, 30000), (30000, 70000)))
    torch.testing.assert_close(whole, parts, rtol=1e-5, atol=1e-3)  # float32 products, float64 sums
    exact = deltas.reshape(3, -1).double() @ deltas.reshape(3, -1).double().T
    torch.testing.assert_close(tensor_gram(deltas), exact, rtol=1e-5, atol=1e-3)


def test_cli_run_dispatch(tiny_models, tmp_path, capsys):
    import argparse

    from hubmerge.cli.flexmerge_commands import run_recipe

    _need("task_arithmetic")
    out = tmp_path / "o"
    recipe = _recipe(tmp_path, tiny_models, ["e0", "e1"], out, sizes=[1, 2])
    args = argparse.Namespace(recipe=str(tmp_path / "r.yaml"), output=None, device=None, overwrite=False,
                              dry_run=True, no_progress=True, push=False, repo=None)
    assert run_recipe(args, recipe) == 0
    assert "size 2: ->" in capsys.readouterr().out and not out.exists()
    args.dry_run = False
    assert run_recipe(args, recipe) == 0
    printed = capsys.readouterr().out
    assert "size-1" in printed and "size-2" in printed and (out / "size-2" / "deployment.json").is_file()


def test_deployment_pushed_as_a_branch_loads_from_the_hub(ta_run, local_hub, tmp_path):
    from huggingface_hub import HfApi

    from hubmerge.hub import push_folder

    result, out = ta_run
    repo = HfApi().create_repo(f"flexmerge-{tmp_path.name[-12:]}").repo_id
    push_folder(out / "size-2", repo)
    push_folder(out / "size-1", repo, revision="size-1")
    ids = torch.randint(0, 99, (1, 5), generator=torch.Generator().manual_seed(1))
    for revision, local in ((None, out / "size-2"), ("size-1", out / "size-1")):
        remote = load_task_model(repo, "e1", revision=revision)
        with torch.no_grad():
            torch.testing.assert_close(remote(ids).last_hidden_state,
                                       load_task_model(local, "e1")(ids).last_hidden_state, rtol=0, atol=0)
    exported = export_task(f"{repo}@size-1", "e0", tmp_path / "x")
    assert torch.equal(_state(exported)["pooler.dense.weight"], Deployment(out / "size-1").tensor("e0", "pooler.dense.weight"))


@pytest.mark.parametrize("inner, params", [("task_arithmetic", {}), ("ties", {"k": 0.5, "scope": "global"})])
def test_groups_merged_in_row_blocks_equal_whole_tensors(tiny_models, tmp_path, monkeypatch, inner, params):
    """The write pass merges element-wise groups block by block of rows: the stored bytes are the same."""
    import hubmerge.flexmerge as flexmerge

    _need(inner)
    stored = {}
    for block_bytes in (flexmerge.GROUP_BLOCK_BYTES, 64):  # 64: every tensor of the tiny model in many blocks
        monkeypatch.setattr(flexmerge, "GROUP_BLOCK_BYTES", block_bytes)
        out = tmp_path / f"out-{block_bytes}"
        result = run_flexmerge(_recipe(tmp_path, tiny_models, ["e0", "e1", "e2"], out, sizes=[1, 2], inner=inner,
                                       inner_params=params))
        stored[block_bytes] = {plan.size.directory: {k: v for f in sorted(plan.path.glob("*.safetensors"))
                                                     for k, v in load_file(f).items()}
                               for plan in result.deployments}
    whole, blocked = stored.values()
    assert whole.keys() == blocked.keys() and all(whole.values())
    for size, tensors in whole.items():
        assert tensors.keys() == blocked[size].keys()
        for key, tensor in tensors.items():
            assert torch.equal(tensor, blocked[size][key]), (size, key)
