"""Merges written back as PEFT LoRA adapters (output.format: adapter), checked by forward passes."""

from __future__ import annotations

import pytest
import torch

from hubmerge.engine import merge
from hubmerge.errors import RecipeError
from hubmerge.recipe import load_recipe
from helpers import write_recipe
from test_adapters import make_adapter


@pytest.fixture(scope="module")
def loras(tiny_models, tmp_path_factory):
    from peft import LoraConfig

    root = tmp_path_factory.mktemp("loras")
    out = {}
    for i, (r, targets) in enumerate([(4, ["query", "value"]), (2, ["query", "dense"])]):
        cfg = LoraConfig(r=r, lora_alpha=2 * r, target_modules=targets, use_rslora=i == 1)
        out[f"l{i}"] = make_adapter(root / f"l{i}", tiny_models["base"], "BertModel", cfg, seed=10 + i)
    return out


def _forward(model):
    ids = torch.randint(0, 99, (2, 9), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        return model(ids).last_hidden_state


def _compare(tiny_models, adapter_dir, full_dir, atol):
    from peft import PeftModel
    from transformers import AutoModel

    base = AutoModel.from_pretrained(tiny_models["base"]).eval()
    peft_model = PeftModel.from_pretrained(base, adapter_dir).eval()
    full = AutoModel.from_pretrained(full_dir).eval()
    diff = (_forward(peft_model) - _forward(full)).abs().max().item()
    assert diff <= atol, diff


def test_stacked_lora_is_exactly_the_task_arithmetic_merge(tiny_models, loras, tmp_path):
    common = dict(base=str(tiny_models["base"]), experts=[str(loras["l0"]), str(loras["l1"])],
                  method="task_arithmetic", params={"scale": 0.7})
    adapter = tmp_path / "adapter"
    full = tmp_path / "full"
    merge(load_recipe(write_recipe(tmp_path / "a.yaml", **common, output={"path": str(adapter), "format": "adapter"})))
    merge(load_recipe(write_recipe(tmp_path / "f.yaml", **common, output={"path": str(full)})))
    import json

    config = json.loads((adapter / "adapter_config.json").read_text())
    assert (adapter / "hubmerge_recipe.yaml").is_file() and config["peft_type"] == "LORA"
    _compare(tiny_models, adapter, full, 1e-5)


def test_low_rank_adapter_of_a_ties_merge(tiny_models, loras, tmp_path):
    common = dict(base=str(tiny_models["base"]), experts=[str(loras["l0"]), str(loras["l1"])],
                  method="ties", params={"k": 0.5, "scope": "tensor"})
    adapter, full = tmp_path / "adapter", tmp_path / "full"
    result = merge(load_recipe(write_recipe(tmp_path / "a.yaml", **common,
                                            output={"path": str(adapter), "format": "adapter", "rank": 32})))
    merge(load_recipe(write_recipe(tmp_path / "f.yaml", **common, output={"path": str(full)})))
    # rank 32 >= every dimension here: the SVD is exact, so the forward passes agree
    assert max(result.extra["adapter_errors"].values()) < 1e-5
    _compare(tiny_models, adapter, full, 1e-4)
    low = tmp_path / "low"
    result = merge(load_recipe(write_recipe(tmp_path / "l.yaml", **common,
                                            output={"path": str(low), "format": "adapter", "rank": 1})))
    assert max(result.extra["adapter_errors"].values()) > 1e-3  # rank 1 is an approximation, reported


def test_adapter_output_refused_for_full_experts_without_rank(tiny_models, tmp_path):
    recipe = write_recipe(tmp_path / "a.yaml", base=str(tiny_models["base"]), experts=[str(tiny_models["e0"])],
                          method="task_arithmetic", output={"path": str(tmp_path / "o"), "format": "adapter"})
    with pytest.raises(RecipeError, match="output.rank"):
        merge(load_recipe(recipe))
    assert not (tmp_path / "o").exists()
