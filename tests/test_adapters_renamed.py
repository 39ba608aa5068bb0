"""Adapters of architectures that transformers 5 renames in memory (ViT).

A ViT checkpoint stores ``encoder.layer.0.attention.attention.query.weight``; transformers 5
loads it as ``layers.0.attention.q_proj.weight``, and PEFT names adapter modules that way.
hubmerge must expand such adapters (and old, checkpoint-named ones) onto the checkpoint's
tensors exactly as PEFT's ``merge_and_unload`` does, and write adapters PEFT can load.
References are PEFT's merged model saved with ``save_pretrained`` (checkpoint names again).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_adapters import TOL, expand, make_adapter

from hubmerge.adapters.modules import NameMap, base_aliases, base_layer_types, map_names
from hubmerge.checkpoint import Checkpoint
from hubmerge.errors import AdapterError, AdapterMismatchError

pytestmark = pytest.mark.filterwarnings("ignore")

Q0 = "encoder.layer.0.attention.attention.query.weight"


def vit_config():
    from transformers import ViTConfig

    return ViTConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=37,
        image_size=16,
        patch_size=4,
    )


@pytest.fixture(scope="module")
def vit_base(tmp_path_factory) -> Path:
    """A tiny random ViTModel saved with ``save_pretrained`` (checkpoint names on disk)."""
    from transformers import ViTModel

    root = tmp_path_factory.mktemp("vit")
    torch.manual_seed(0)
    model = ViTModel(vit_config()).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.05 * torch.randn(param.shape))
    model.save_pretrained(root / "base")
    return root / "base"


def lora(directory: Path, base: Path, seed: int = 0, **options) -> Path:
    from peft import LoraConfig

    options.setdefault("target_modules", ["q_proj", "v_proj"])
    config = LoraConfig(r=4, lora_alpha=8, **options)
    return make_adapter(directory, base, "ViTModel", config, seed=seed)


def saved_state(model, directory: Path) -> dict[str, torch.Tensor]:
    """``model``'s tensors as ``save_pretrained`` writes them (the checkpoint's names)."""
    model.save_pretrained(directory)
    return load_file(directory / "model.safetensors")


def peft_reference(base: Path, adapter: Path, tmp: Path) -> dict[str, torch.Tensor]:
    """PEFT loads the adapter on the base and merges it; saved under checkpoint names."""
    from peft import PeftModel
    from transformers import ViTModel

    merged = PeftModel.from_pretrained(ViTModel.from_pretrained(base), adapter).merge_and_unload()
    return saved_state(merged, tmp)


def assert_task_vector_matches(
    base: Path, adapter: Path, reference: dict[str, torch.Tensor], min_changed: int
):
    ours, changed, expert = expand(base, adapter)
    stored = load_file(base / "model.safetensors")
    assert ours.keys() == stored.keys() == reference.keys()
    moved = {n for n in stored if not torch.equal(reference[n], stored[n])}
    assert len(moved) >= min_changed and moved <= changed
    for name, tensor in ours.items():
        torch.testing.assert_close(tensor - stored[name], reference[name] - stored[name], rtol=0, atol=TOL)
    return expert


def adapter_keys(adapter: Path) -> list[str]:
    return list(load_file(adapter / "adapter_model.safetensors"))


def to_checkpoint_named(adapter: Path, base: Path, target: Path, target_modules: list[str]) -> Path:
    """The same adapter as transformers 4 / PEFT would have saved it: modules under checkpoint names."""
    aliases = base_aliases(base, Checkpoint(base).meta)
    modules = {m.rpartition(".")[0]: c.rpartition(".")[0] for m, c in aliases.to_checkpoint.items()}
    out = {}
    for key, tensor in load_file(adapter / "adapter_model.safetensors").items():
        name = key.removeprefix("base_model.model.")
        module = max((m for m in modules if name.startswith(m + ".")), key=len)
        out["base_model.model." + modules[module] + name[len(module) :]] = tensor
    target.mkdir()
    save_file(out, target / "adapter_model.safetensors", metadata={"format": "pt"})
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["target_modules"] = target_modules
    (target / "adapter_config.json").write_text(json.dumps(config))
    return target


# -- the alias table ---------------------------------------------------------------------------
def test_alias_table_of_vit(vit_base):
    aliases = base_aliases(vit_base, Checkpoint(vit_base).meta)
    assert aliases is not None and aliases.renamed and not aliases.converted
    assert aliases.to_memory[Q0] == "layers.0.attention.q_proj.weight"
    assert aliases.to_checkpoint["layers.1.mlp.fc2.bias"] == "encoder.layer.1.output.dense.bias"
    assert aliases.to_memory["embeddings.cls_token"] == "embeddings.cls_token"
    assert aliases.memory_module(Q0) == ("layers.0.attention.q_proj", "weight")
    # every checkpoint tensor has exactly one in-memory name, and they are the model's
    assert len(aliases.to_memory) == len(aliases.to_checkpoint) == len(Checkpoint(vit_base).meta)
    types = base_layer_types(str(vit_base))
    assert types["layers.0.attention.q_proj"] == "Linear"


def test_alias_table_leaves_out_converted_tensors(tmp_path):
    """Mixtral's experts are fused by a converter: no alias, and the errors say so."""
    from transformers import MixtralConfig

    MixtralConfig(
        hidden_size=32,
        intermediate_size=16,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=2,
        vocab_size=50,
        architectures=["MixtralForCausalLM"],
    ).save_pretrained(tmp_path)
    experts = [f"model.layers.0.block_sparse_moe.experts.{e}.w{w}.weight" for e in (0, 1) for w in (1, 2, 3)]
    names = experts + [
        "model.layers.0.block_sparse_moe.gate.weight",
        "model.layers.0.self_attn.q_proj.weight",
        "model.embed_tokens.weight",
    ]
    aliases = base_aliases(tmp_path, names)
    assert aliases is not None
    assert (
        aliases.to_memory["model.layers.0.block_sparse_moe.gate.weight"] == "model.layers.0.mlp.gate.weight"
    )
    assert (
        aliases.to_memory["model.layers.0.self_attn.q_proj.weight"]
        == "model.layers.0.self_attn.q_proj.weight"
    )
    assert set(aliases.converted) == set(experts) and not set(experts) & set(aliases.to_memory)
    assert aliases.converted[experts[0]] == "model.layers.0.mlp.experts.gate_up_proj"
    with pytest.raises(AdapterError, match="gate_up_proj"):
        aliases.memory_name(experts[0])
    # an in-memory-named adapter on the renamed router maps; one on the fused experts is refused by name
    gate = {"model.layers.0.mlp.gate.weight": "LoRA target module 'model.layers.0.mlp.gate'"}
    assert map_names(gate, names, label="moe", aliases=aliases)("model.layers.0.mlp.gate.weight") == (
        "model.layers.0.block_sparse_moe.gate.weight"
    )
    fused = {"model.layers.0.mlp.experts.weight": "LoRA target module 'model.layers.0.mlp.experts'"}
    with pytest.raises(
        AdapterMismatchError,
        match=r"adapter 'moe': LoRA target module 'model\.layers\.0\.mlp\.experts'.*"
        r"gate_up_proj.*converting",
    ):
        map_names(fused, names, label="moe", aliases=aliases)


def test_in_memory_and_checkpoint_names_leading_to_different_tensors_are_refused():
    from hubmerge.adapters.modules import NameAliases

    # a swap: checkpoint "a" is "b" in memory and checkpoint "b" is "a"
    aliases = NameAliases.from_pairs({"m.a.weight": "m.b.weight", "m.b.weight": "m.a.weight"})
    targets = {"m.a.weight": "LoRA target module 'm.a'"}
    with pytest.raises(
        AdapterMismatchError, match="as checkpoint names and as transformers' in-memory names"
    ):
        map_names(targets, ["m.a.weight", "m.b.weight"], label="x", aliases=aliases)
    chosen = map_names(
        targets,
        ["m.a.weight", "m.b.weight"],
        label="x",
        aliases=aliases,
        fits=lambda m: m.aliases is not None,
    )
    assert chosen("m.a.weight") == "m.b.weight" and chosen == NameMap()


# -- expansion into task vectors ----------------------------------------------------------------
def test_lora_named_in_memory_matches_merge_and_unload(vit_base, tmp_path):
    adapter = lora(tmp_path / "a", vit_base)
    keys = adapter_keys(adapter)
    assert "base_model.model.layers.0.attention.q_proj.lora_A.weight" in keys  # transformers 5 names
    reference = peft_reference(vit_base, adapter, tmp_path / "ref")
    expert = assert_task_vector_matches(vit_base, adapter, reference, min_changed=4)
    assert expert.name_map.aliases is not None and "in-memory" in expert.describe()["name_map"]
    assert set(expert.plan) == {
        f"encoder.layer.{i}.attention.attention.{p}.weight" for i in (0, 1) for p in ("query", "value")
    }


def test_lora_named_as_the_checkpoint_matches_too(vit_base, tmp_path):
    """The same adapter with checkpoint module names (as saved before transformers 5)."""
    adapter = lora(tmp_path / "a", vit_base, seed=3)
    reference = peft_reference(vit_base, adapter, tmp_path / "ref")
    old = to_checkpoint_named(adapter, vit_base, tmp_path / "old", ["query", "value"])
    assert "base_model.model.encoder.layer.0.attention.attention.query.lora_A.weight" in adapter_keys(old)
    expert = assert_task_vector_matches(vit_base, old, reference, min_changed=4)
    assert expert.name_map.aliases is None


def test_lora_on_a_task_head_with_renamed_modules_and_modules_to_save(vit_base, tmp_path):
    """Trained on ViTForImageClassification (``vit.layers...``), merged into the bare ViTModel base."""
    from peft import LoraConfig, PeftModel
    from transformers import ViTForImageClassification, ViTModel

    config = LoraConfig(r=2, target_modules=["q_proj", "fc1", "o_proj"], modules_to_save=["layernorm_before"])
    adapter = make_adapter(tmp_path / "a", vit_base, "ViTForImageClassification", config, seed=5)
    keys = adapter_keys(adapter)
    assert "base_model.model.vit.layers.0.layernorm_before.weight" in keys  # modules_to_save
    model = ViTForImageClassification.from_pretrained(vit_base)
    merged = PeftModel.from_pretrained(model, adapter).merge_and_unload().vit
    # the reference: the bare base (its pooler untouched) holding the merged encoder
    bare = ViTModel.from_pretrained(vit_base)
    assert not bare.load_state_dict(merged.state_dict(), strict=False).unexpected_keys
    reference = saved_state(bare, tmp_path / "ref")
    expert = assert_task_vector_matches(vit_base, adapter, reference, min_changed=10)
    assert str(expert.name_map).startswith("vit. -> (nothing)")


def test_ia3_named_in_memory_matches_merge_and_unload(vit_base, tmp_path):
    from peft import IA3Config

    config = IA3Config(target_modules=["k_proj", "fc2"], feedforward_modules=["fc2"])
    adapter = make_adapter(tmp_path / "a", vit_base, "ViTModel", config, seed=7)
    assert "base_model.model.layers.1.mlp.fc2.ia3_l" in adapter_keys(adapter)
    reference = peft_reference(vit_base, adapter, tmp_path / "ref")
    # k_proj scales weight and bias, fc2 (feed-forward) its weight's inputs
    assert_task_vector_matches(vit_base, adapter, reference, min_changed=6)


def test_without_config_names_are_used_as_they_are(vit_base, tmp_path):
    """Fallback: no config.json, no alias table; in-memory names are then named in the error."""
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(vit_base / "model.safetensors", bare / "model.safetensors")
    assert base_aliases(bare, Checkpoint(bare).meta) is None
    adapter = lora(tmp_path / "a", vit_base)
    with pytest.raises(
        AdapterMismatchError,
        match=r"adapter 'a': LoRA target module 'layers\.0\.attention\.q_proj' "
        "has no counterpart in the base",
    ):
        expand(bare, adapter)
    old = to_checkpoint_named(adapter, vit_base, tmp_path / "old", ["query", "value"])
    reference = peft_reference(vit_base, adapter, tmp_path / "ref")
    assert_task_vector_matches(bare, old, reference, min_changed=4)


# -- writing adapters back ------------------------------------------------------------------------
def merged_by_peft(base: Path, adapter: Path, tmp: Path) -> dict[str, torch.Tensor]:
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert all("query" not in m and "encoder.layer" not in m for m in config["target_modules"])
    return peft_reference(base, adapter, tmp)


@pytest.mark.parametrize("mode", ["stack", "svd"])
def test_adapter_output_for_vit_loads_in_peft_and_reproduces_the_merge(vit_base, tmp_path, mode):
    from helpers import write_recipe

    from hubmerge.engine import merge
    from hubmerge.recipe import load_recipe

    new = lora(tmp_path / "new", vit_base, seed=1)
    old = to_checkpoint_named(
        lora(tmp_path / "tmp", vit_base, seed=2, target_modules=["q_proj", "fc1"]),
        vit_base,
        tmp_path / "old",
        ["query", "intermediate.dense"],
    )
    experts = [str(new), str(old)]
    if mode == "stack":
        common = {"method": "task_arithmetic", "params": {"scale": 0.7}}
        output = {"format": "adapter"}
    else:
        norm = lora(tmp_path / "norm", vit_base, seed=4, modules_to_save=["layernorm_after"])
        experts.append(str(norm))
        common = {"method": "ties", "params": {"k": 0.5, "scope": "tensor"}}
        output = {"format": "adapter", "rank": 32}
    common.update(base=str(vit_base), experts=experts)
    adapter, full = tmp_path / "adapter", tmp_path / "full"
    result = merge(
        load_recipe(write_recipe(tmp_path / "a.yaml", **common, output={"path": str(adapter), **output}))
    )
    merge(load_recipe(write_recipe(tmp_path / "f.yaml", **common, output={"path": str(full)})))
    expected = load_file(full / "model.safetensors")
    assert Q0 in expected  # full outputs keep the checkpoint's names
    written = adapter_keys(adapter)
    assert "base_model.model.layers.0.attention.q_proj.lora_A.weight" in written
    assert not any("encoder.layer" in k for k in written)
    if mode == "svd":
        assert max(result.extra["adapter_errors"].values()) < 1e-5  # rank 32 >= every dimension: exact
        assert any(".layernorm_after." in k for k in written)
    merged = merged_by_peft(vit_base, adapter, tmp_path / "ref")
    assert merged.keys() == expected.keys()
    for name, tensor in expected.items():
        torch.testing.assert_close(merged[name], tensor, rtol=0, atol=1e-5)
    # and hubmerge reads its own output back
    ours, _, _ = expand(vit_base, adapter)
    for name, tensor in expected.items():
        torch.testing.assert_close(ours[name], tensor, rtol=0, atol=1e-5)


def test_low_rank_adapter_writes_in_memory_names(vit_base, tmp_path):
    from hubmerge.adapters.export import low_rank_adapter

    adapter = lora(tmp_path / "a", vit_base, target_modules=["q_proj", "fc1", "fc2"])
    ours, changed, _ = expand(vit_base, adapter)
    stored = load_file(vit_base / "model.safetensors")
    deltas = {n: ours[n] - stored[n] for n in changed}
    aliases = base_aliases(vit_base, stored)
    out = low_rank_adapter(
        deltas, 64, tmp_path / "out", layer_types=base_layer_types(str(vit_base)), aliases=aliases
    )
    assert out.max_error < 1e-5 and "layers.0.mlp.fc1" in out.errors
    merged = merged_by_peft(vit_base, out.path, tmp_path / "ref")
    for name, tensor in stored.items():
        torch.testing.assert_close(merged[name], tensor + deltas.get(name, 0), rtol=0, atol=1e-5)
