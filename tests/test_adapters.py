"""PEFT adapters as experts: base + task vector must equal PEFT's own ``merge_and_unload``.

Every adapter is made by PEFT on a tiny random model, with its factors randomised (PEFT
starts B, IA3's l and DoRA's magnitude at values that make the adapter a no-op), saved
with ``save_pretrained`` and loaded back by PEFT for the reference merge.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch

from hubmerge.adapters import IA3Expert, LoraExpert, open_adapter
from hubmerge.checkpoint import Checkpoint
from hubmerge.errors import AdapterError, AdapterMismatchError, IncompatibleModelError, UnsafeCheckpointError
from hubmerge.recipe import ModelRef
from hubmerge.sources import ResolvedModel, open_expert

pytestmark = pytest.mark.filterwarnings("ignore")

TOL = 1e-6


# -- tiny models ------------------------------------------------------------------------
def bert_config(**overrides):
    from transformers import BertConfig

    return BertConfig(
        **{
            "hidden_size": 32,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "intermediate_size": 37,
            "vocab_size": 99,
            "max_position_embeddings": 64,
            **overrides,
        }
    )


def gpt2_config():
    from transformers import GPT2Config

    return GPT2Config(
        n_embd=32, n_layer=2, n_head=2, vocab_size=99, n_positions=64, bos_token_id=0, eos_token_id=0
    )


def llama_config():
    from transformers import LlamaConfig

    return LlamaConfig(
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=99,
        max_position_embeddings=64,
    )


def model_cls(name: str):
    import transformers

    return getattr(transformers, name)


@pytest.fixture(scope="module")
def bases(tmp_path_factory) -> dict[str, Path]:
    """Tiny random base models saved with ``save_pretrained`` (safetensors)."""
    root = tmp_path_factory.mktemp("adapter_bases")
    specs = {
        "BertModel": bert_config(),
        "BertForSequenceClassification": bert_config(),
        "GPT2LMHeadModel": gpt2_config(),
        "LlamaForCausalLM": llama_config(),
    }
    out = {}
    for i, (name, config) in enumerate(specs.items()):
        torch.manual_seed(i)
        model = model_cls(name)(config).eval()
        with torch.no_grad():  # no zero biases or unit norms: every tensor means something
            for param in model.parameters():
                param.add_(0.05 * torch.randn(param.shape))
        model.save_pretrained(root / name)
        out[name] = root / name
    return out


def make_adapter(
    directory: Path, base_dir: Path, trained_on: str, peft_config, seed: int = 0, model_config=None
) -> Path:
    """Make an adapter with PEFT on ``trained_on`` loaded from ``base_dir``, every trainable tensor random."""
    from peft import get_peft_model

    cls = model_cls(trained_on)
    torch.manual_seed(seed)
    model = cls(model_config) if model_config is not None else cls.from_pretrained(base_dir)
    peft_model = get_peft_model(model, peft_config)
    gen = torch.Generator().manual_seed(seed + 1000)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if param.requires_grad:
                noise = 0.2 * torch.randn(param.shape, generator=gen)
                # IA3 vectors and DoRA magnitudes live around their initial value, not zero
                param.copy_(param + noise if ("ia3_l" in name or "magnitude" in name) else noise)
    peft_model.save_pretrained(directory)
    return directory


def peft_merged(base_dir: Path, adapter_dir: Path, load_as: str) -> dict[str, torch.Tensor]:
    """The reference: PEFT loads the adapter on the base and merges it."""
    from peft import PeftModel

    model = model_cls(load_as).from_pretrained(base_dir)
    merged = PeftModel.from_pretrained(model, adapter_dir).merge_and_unload()
    return {k: v.detach() for k, v in merged.state_dict().items()}


def resolved(directory: Path) -> ResolvedModel:
    return ResolvedModel(ModelRef(path=str(directory)), Path(directory))


def expand(base_dir: Path, adapter_dir: Path):
    """base + task vector for every base tensor, through the Expert contract as the engine uses it."""
    base = Checkpoint(base_dir)
    expert = open_expert(resolved(adapter_dir), base)
    expert.check(base)
    out, changed = {}, set()
    for name in base.names():
        tensor = base.get(name)
        payload = expert.fetch(name)
        assert expert.changes(name) == (payload is not None)
        tau = torch.full_like(tensor, float("nan"))  # the engine's path: written in place, every entry
        if payload is not None and expert.task_vector_into(name, payload, tensor, tau):
            assert torch.equal(tau, expert.task_vector(name, payload, tensor))  # both paths agree
            changed.add(name)
            out[name] = tensor + tau
        else:
            out[name] = tensor
    expert.close()
    return out, changed, expert


def assert_matches_peft(base_dir, adapter_dir, load_as, *, ref_prefix="", drop_prefix="", min_changed=1):
    """Compare with PEFT's merge; the reference model's names are ours with ``ref_prefix`` added or
    ``drop_prefix`` removed (tensors outside the reference model must stay unchanged)."""
    ours, changed, expert = expand(base_dir, adapter_dir)
    ref = peft_merged(base_dir, adapter_dir, load_as)
    base = Checkpoint(base_dir)
    worst, moved = 0.0, 0
    for name, tensor in ours.items():
        if not name.startswith(drop_prefix):
            assert name not in changed
            continue
        expected = ref[ref_prefix + name.removeprefix(drop_prefix)]
        worst = max(worst, (tensor - expected).abs().max().item())
        moved += int(not torch.equal(expected, base.get(name)))
    assert worst <= TOL, f"max abs difference {worst} against PEFT's merge_and_unload"
    # the adapter really did something, and we changed exactly what PEFT changed
    assert moved >= min_changed and len(changed) >= moved
    return expert, changed


# -- LoRA -----------------------------------------------------------------------------------
def test_lora_rslora_rank_and_alpha_patterns(bases, tmp_path):
    from peft import LoraConfig

    config = LoraConfig(
        r=4,
        lora_alpha=8,
        use_rslora=True,
        target_modules=["query", "key", "value", "dense"],
        rank_pattern={"encoder.layer.0.attention.self.query": 2, "intermediate.dense": 6},
        alpha_pattern={"value": 3, r"layer\.1\.output\.dense": 16},
    )
    adapter = make_adapter(tmp_path / "a", bases["BertModel"], "BertModel", config)
    expert, changed = assert_matches_peft(bases["BertModel"], adapter, "BertModel", min_changed=13)
    assert isinstance(expert, LoraExpert) and expert.kind == "lora"
    # pattern semantics: rank 2 for layer 0's query only, alpha 3 for every value
    from hubmerge.adapters.lora import lora_scaling

    assert lora_scaling(expert.config, "encoder.layer.0.attention.self.query")[:2] == (2, 8)
    assert lora_scaling(expert.config, "encoder.layer.1.attention.self.query")[:2] == (4, 8)
    assert lora_scaling(expert.config, "encoder.layer.1.attention.self.value") == (4, 3, 3 / 2)
    assert lora_scaling(expert.config, "encoder.layer.1.output.dense")[:2] == (4, 16)


def test_lora_trained_on_task_head_merges_into_bare_base(bases, tmp_path):
    """Adapter keys ``bert.encoder...`` (BertForSequenceClassification), base saved as BertModel."""
    from peft import LoraConfig

    adapter = make_adapter(
        tmp_path / "a",
        bases["BertModel"],
        "BertForSequenceClassification",
        LoraConfig(r=4, lora_alpha=4, target_modules=["query", "value"]),
    )
    expert, _ = assert_matches_peft(
        bases["BertModel"], adapter, "BertForSequenceClassification", ref_prefix="bert.", min_changed=4
    )
    assert (expert.name_map.drop, expert.name_map.add) == ("bert.", "")


def test_lora_trained_on_bare_model_merges_into_task_head_base(bases, tmp_path):
    from peft import LoraConfig

    base = bases["BertForSequenceClassification"]
    adapter = make_adapter(tmp_path / "a", base, "BertModel", LoraConfig(r=2, target_modules=["key"]))
    # PEFT applies this adapter to a BertModel only: the reference loads the base's encoder as one
    expert, _ = assert_matches_peft(base, adapter, "BertModel", drop_prefix="bert.", min_changed=2)
    assert (expert.name_map.drop, expert.name_map.add) == ("", "bert.")


def test_lora_bias_all_lora_bias_and_modules_to_save(bases, tmp_path):
    from peft import LoraConfig

    base = bases["BertForSequenceClassification"]
    config = LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=["query", "value"],
        bias="all",
        lora_bias=True,
        modules_to_save=["classifier"],
    )
    adapter = make_adapter(tmp_path / "a", base, "BertForSequenceClassification", config)
    _, changed = assert_matches_peft(base, adapter, "BertForSequenceClassification", min_changed=20)
    assert {"classifier.weight", "classifier.bias", "bert.pooler.dense.bias"} <= changed


def test_lora_bias_lora_only(bases, tmp_path):
    from peft import LoraConfig

    adapter = make_adapter(
        tmp_path / "a",
        bases["BertModel"],
        "BertModel",
        LoraConfig(r=4, target_modules=["key", "intermediate.dense"], bias="lora_only"),
    )
    _, changed = assert_matches_peft(bases["BertModel"], adapter, "BertModel", min_changed=8)
    assert "encoder.layer.0.attention.self.key.bias" in changed
    assert "encoder.layer.0.attention.self.query.bias" not in changed


def test_lora_embedding_targets(bases, tmp_path):
    from peft import LoraConfig

    adapter = make_adapter(
        tmp_path / "a",
        bases["BertModel"],
        "BertModel",
        LoraConfig(r=3, lora_alpha=6, target_modules=["word_embeddings", "position_embeddings", "query"]),
    )
    _, changed = assert_matches_peft(bases["BertModel"], adapter, "BertModel", min_changed=4)
    assert "embeddings.word_embeddings.weight" in changed


def test_lora_llama_with_saved_embedding_layer(bases, tmp_path):
    """Targeting ``embed_tokens`` makes PEFT save the whole embedding (``base_layer.weight``) too."""
    from peft import LoraConfig
    from safetensors import safe_open

    base = bases["LlamaForCausalLM"]
    config = LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=[
            "embed_tokens",
            "q_proj",
            "k_proj",
            "v_proj",
            "o_proj",
            "gate_proj",
            "up_proj",
            "down_proj",
            "lm_head",
        ],
    )
    adapter = make_adapter(tmp_path / "a", base, "LlamaForCausalLM", config)
    with safe_open(adapter / "adapter_model.safetensors", "pt") as f:
        assert "base_model.model.model.embed_tokens.base_layer.weight" in f.keys()
    assert_matches_peft(base, adapter, "LlamaForCausalLM", min_changed=16)


def test_lora_gpt2_conv1d_fan_in_fan_out(bases, tmp_path):
    from peft import LoraConfig

    base = bases["GPT2LMHeadModel"]
    adapter = make_adapter(
        tmp_path / "a",
        base,
        "GPT2LMHeadModel",
        LoraConfig(
            r=4, lora_alpha=8, fan_in_fan_out=True, target_modules=["c_attn", "c_proj", "c_fc", "wte"]
        ),
    )
    _, changed = assert_matches_peft(base, adapter, "GPT2LMHeadModel", min_changed=9)
    assert "transformer.h.0.attn.c_proj.weight" in changed  # square: orientation from the layer class


def test_lora_gpt2_config_says_no_fan_in_fan_out(bases, tmp_path):
    """PEFT decides fan_in_fan_out per layer class (Conv1D -> True) whatever the config says."""
    from peft import LoraConfig

    base = bases["GPT2LMHeadModel"]
    adapter = make_adapter(
        tmp_path / "a",
        base,
        "GPT2LMHeadModel",
        LoraConfig(r=4, target_modules=["c_proj", "c_attn"], fan_in_fan_out=True),
    )
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["fan_in_fan_out"] = False
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    assert_matches_peft(base, adapter, "GPT2LMHeadModel", min_changed=6)


# -- DoRA -----------------------------------------------------------------------------------
def test_dora_llama(bases, tmp_path):
    from peft import LoraConfig

    base = bases["LlamaForCausalLM"]
    adapter = make_adapter(
        tmp_path / "a",
        base,
        "LlamaForCausalLM",
        LoraConfig(
            r=4,
            lora_alpha=8,
            use_dora=True,
            use_rslora=True,
            target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj"],
            rank_pattern={"down_proj": 2},
        ),
    )
    expert, _ = assert_matches_peft(base, adapter, "LlamaForCausalLM", min_changed=12)
    assert expert.kind == "dora"


def test_dora_gpt2_fan_in_fan_out(bases, tmp_path):
    from peft import LoraConfig

    base = bases["GPT2LMHeadModel"]
    adapter = make_adapter(
        tmp_path / "a",
        base,
        "GPT2LMHeadModel",
        LoraConfig(
            r=4, lora_alpha=8, use_dora=True, fan_in_fan_out=True, target_modules=["c_attn", "c_proj", "c_fc"]
        ),
    )
    assert_matches_peft(base, adapter, "GPT2LMHeadModel", min_changed=8)


def test_dora_bert_with_embedding_and_saved_biases(bases, tmp_path):
    from peft import LoraConfig

    base = bases["BertModel"]
    adapter = make_adapter(
        tmp_path / "a",
        base,
        "BertModel",
        LoraConfig(r=4, lora_alpha=8, use_dora=True, target_modules=["word_embeddings", "value"]),
    )
    assert_matches_peft(base, adapter, "BertModel", min_changed=3)
    adapter = make_adapter(
        tmp_path / "b",
        base,
        "BertModel",
        LoraConfig(r=4, use_dora=True, bias="lora_only", target_modules=["query"]),
    )
    assert_matches_peft(base, adapter, "BertModel", min_changed=4)


# -- IA3 ------------------------------------------------------------------------------------
def test_ia3_llama_feedforward(bases, tmp_path):
    from peft import IA3Config

    base = bases["LlamaForCausalLM"]
    adapter = make_adapter(
        tmp_path / "a",
        base,
        "LlamaForCausalLM",
        IA3Config(
            target_modules=["k_proj", "v_proj", "down_proj", "up_proj"],
            feedforward_modules=["down_proj", "up_proj"],
        ),
    )
    expert, _ = assert_matches_peft(base, adapter, "LlamaForCausalLM", min_changed=8)
    assert isinstance(expert, IA3Expert)


def test_ia3_bert_scales_biases(bases, tmp_path):
    from peft import IA3Config

    base = bases["BertModel"]
    adapter = make_adapter(
        tmp_path / "a",
        base,
        "BertModel",
        IA3Config(target_modules=["key", "value", "output.dense"], feedforward_modules=["output.dense"]),
    )
    _, changed = assert_matches_peft(base, adapter, "BertModel", min_changed=12)
    assert "encoder.layer.0.attention.self.key.bias" in changed  # output scaling also scales the bias
    assert "encoder.layer.0.output.dense.bias" not in changed  # input scaling leaves it


def test_ia3_gpt2_conv1d(bases, tmp_path):
    from peft import IA3Config

    base = bases["GPT2LMHeadModel"]
    adapter = make_adapter(
        tmp_path / "a",
        base,
        "GPT2LMHeadModel",
        IA3Config(
            target_modules=["c_attn", "c_proj", "c_fc"], feedforward_modules=["c_proj"], fan_in_fan_out=True
        ),
    )
    assert_matches_peft(base, adapter, "GPT2LMHeadModel", min_changed=10)


# -- the Expert contract ----------------------------------------------------------------------
def test_task_vector_follows_base_device_and_dtype(bases, tmp_path):
    from peft import LoraConfig

    base_dir = bases["BertModel"]
    adapter = make_adapter(tmp_path / "a", base_dir, "BertModel", LoraConfig(r=2, target_modules=["query"]))
    base = Checkpoint(base_dir)
    expert = open_adapter(resolved(adapter), base)  # no explicit check(): done on first fetch
    name = "encoder.layer.0.attention.self.query.weight"
    payload = expert.fetch(name)
    assert all(t.device.type == "cpu" for t in payload.values())
    tau = expert.task_vector(name, payload, base.get(name).to(torch.bfloat16))
    assert tau.dtype == torch.bfloat16
    assert expert.fetch("encoder.layer.0.attention.self.key.weight") is None
    assert expert.base_model_name_or_path == str(base_dir)
    assert expert.nbytes == sum(m.nbytes for m in expert.weights.meta.values())


# -- bad inputs -------------------------------------------------------------------------------
def test_shapes_that_do_not_fit_the_base(bases, tmp_path):
    from peft import LoraConfig

    adapter = make_adapter(
        tmp_path / "a",
        bases["BertModel"],
        "BertModel",
        LoraConfig(r=2, target_modules=["query"]),
        model_config=bert_config(hidden_size=48, num_attention_heads=2),
    )
    base = Checkpoint(bases["BertModel"])
    expert = open_adapter(resolved(adapter), base)
    with pytest.raises(
        AdapterMismatchError, match=r"encoder\.layer\.\d\.attention\.self\.query.*\[48.*\[32, 32\]"
    ):
        expert.check(base)
    assert issubclass(AdapterMismatchError, IncompatibleModelError)


def test_target_module_absent_from_base(bases, tmp_path):
    from peft import LoraConfig

    adapter = make_adapter(
        tmp_path / "a",
        bases["BertModel"],
        "BertModel",
        LoraConfig(r=2, target_modules=["value"]),
        model_config=bert_config(num_hidden_layers=3),
    )
    base = Checkpoint(bases["BertModel"])
    with pytest.raises(AdapterMismatchError, match=r"'encoder\.layer\.2\.attention\.self\.value'"):
        open_adapter(resolved(adapter), base).check(base)


def test_modules_to_save_absent_from_base(bases, tmp_path):
    from peft import LoraConfig

    adapter = make_adapter(
        tmp_path / "a",
        bases["BertModel"],
        "BertForSequenceClassification",
        LoraConfig(r=2, target_modules=["value"], modules_to_save=["classifier"]),
    )
    base = Checkpoint(bases["BertModel"])
    with pytest.raises(AdapterMismatchError, match=r"modules_to_save module 'classifier'"):
        open_adapter(resolved(adapter), base).check(base)


def test_unknown_or_unsupported_peft_type(bases, tmp_path):
    base = Checkpoint(bases["BertModel"])
    for peft_type in ("LOHA", "MADE_UP"):
        adapter = tmp_path / peft_type
        adapter.mkdir()
        (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": peft_type, "r": 4}))
        with pytest.raises(AdapterError, match=f"not supported yet: {peft_type}"):
            open_adapter(resolved(adapter), base)


def test_unsupported_lora_options(bases, tmp_path):
    from peft import LoraConfig

    adapter = make_adapter(
        tmp_path / "a", bases["BertModel"], "BertModel", LoraConfig(r=2, target_modules=["query"])
    )
    config = json.loads((adapter / "adapter_config.json").read_text())
    base = Checkpoint(bases["BertModel"])
    for change, message in [
        ({"init_lora_weights": "pissa"}, "pissa"),
        ({"trainable_token_indices": [1, 2]}, "trainable_token_indices"),
        ({"some_future_option": {"x": 1}}, "some_future_option"),
    ]:
        (adapter / "adapter_config.json").write_text(json.dumps({**config, **change}))
        with pytest.raises(AdapterError, match=message):
            open_adapter(resolved(adapter), base)


def test_adapter_without_weights_file(bases, tmp_path):
    from peft import LoraConfig

    adapter = make_adapter(
        tmp_path / "a", bases["BertModel"], "BertModel", LoraConfig(r=2, target_modules=["query"])
    )
    (adapter / "adapter_model.safetensors").unlink()
    base = Checkpoint(bases["BertModel"])
    with pytest.raises(AdapterError, match="adapter_model.safetensors is missing"):
        open_adapter(resolved(adapter), base)
    (adapter / "adapter_model.bin").write_bytes(b"\x80\x04not really a pickle")
    with pytest.raises(UnsafeCheckpointError, match="adapter_model.bin"):
        open_adapter(resolved(adapter), base)


def test_ambiguous_names_are_refused():
    from hubmerge.adapters.modules import NameMap, map_names

    targets = {"layer.0.q.weight": "LoRA target module 'layer.0.q'"}
    base = ["encoder.layer.0.q.weight", "decoder.layer.0.q.weight"]
    with pytest.raises(AdapterMismatchError, match="2 ways"):
        map_names(targets, base, label="x")
    assert map_names(targets, base, label="x", fits=lambda m: m.add == "decoder.") == NameMap("", "decoder.")
    # exact names win over any renaming
    assert map_names(targets, base + ["layer.0.q.weight"], label="x") == NameMap()


def test_no_warnings_leak_from_opening(bases, tmp_path):
    from peft import LoraConfig

    adapter = make_adapter(
        tmp_path / "a", bases["BertModel"], "BertModel", LoraConfig(r=2, target_modules=["query"])
    )
    base = Checkpoint(bases["BertModel"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        open_adapter(resolved(adapter), base).check(base)


# -- end to end through the engine ------------------------------------------------------------
def test_engine_task_arithmetic_over_adapters_reproduces_merge_and_unload(bases, tmp_path):
    from helpers import write_recipe
    from peft import IA3Config, LoraConfig
    from safetensors.torch import load_file

    from hubmerge.engine import merge
    from hubmerge.recipe import load_recipe

    base = bases["BertModel"]
    lora = make_adapter(
        tmp_path / "lora",
        base,
        "BertForSequenceClassification",
        LoraConfig(r=4, lora_alpha=8, use_dora=True, target_modules=["query", "value", "dense"]),
    )
    ia3 = make_adapter(
        tmp_path / "ia3",
        base,
        "BertModel",
        IA3Config(target_modules=["key", "output.dense"], feedforward_modules=["output.dense"]),
    )
    base_sd = load_file(base / "model.safetensors")
    refs = {
        "lora": peft_merged(base, lora, "BertForSequenceClassification"),
        "ia3": peft_merged(base, ia3, "BertModel"),
    }
    ref_name = {"lora": lambda n: "bert." + n, "ia3": lambda n: n}

    # one adapter, scale 1: exactly PEFT's merge_and_unload
    recipe = write_recipe(
        tmp_path / "one.yaml",
        base=str(base),
        experts=[str(lora)],
        method="task_arithmetic",
        params={"scale": 1},
        output={"path": str(tmp_path / "one")},
    )
    merge(load_recipe(recipe))
    merged = load_file(tmp_path / "one" / "model.safetensors")
    assert merged.keys() == base_sd.keys()
    for name, tensor in merged.items():
        torch.testing.assert_close(tensor, refs["lora"][ref_name["lora"](name)], rtol=0, atol=TOL)

    # two adapters: base + the sum of both PEFT merges' changes
    recipe = write_recipe(
        tmp_path / "two.yaml",
        base=str(base),
        experts=[str(lora), str(ia3)],
        method="task_arithmetic",
        params={"scale": 1},
        output={"path": str(tmp_path / "two")},
    )
    merge(load_recipe(recipe))
    merged = load_file(tmp_path / "two" / "model.safetensors")
    for name, tensor in merged.items():
        expected = base_sd[name] + sum(refs[k][ref_name[k](name)] - base_sd[name] for k in refs)
        torch.testing.assert_close(tensor, expected, rtol=0, atol=4 * TOL)


def test_engine_writes_base_for_tensors_no_adapter_changes(bases, tmp_path, monkeypatch):
    """Tensors no expert changes are copied from the base without reading experts or building zero
    task vectors, for methods whose zero task vectors merge to the base; the result is the same."""
    from helpers import write_recipe
    from peft import LoraConfig
    from safetensors.torch import load_file

    import hubmerge.engine as engine
    from hubmerge.engine import merge
    from hubmerge.recipe import load_recipe
    from hubmerge.plugins import get_method

    base = bases["GPT2LMHeadModel"]
    adapters = [make_adapter(tmp_path / f"a{i}", base, "GPT2LMHeadModel",
                             LoraConfig(r=4, lora_alpha=8, fan_in_fan_out=True, target_modules=targets), seed=i)
                for i, targets in enumerate((["c_attn"], ["c_attn", "c_proj"]))]
    base_sd = load_file(base / "model.safetensors")
    refs = [peft_merged(base, a, "GPT2LMHeadModel") for a in adapters]
    built = []
    real_build = engine.build_group
    monkeypatch.setattr(engine, "build_group", lambda inputs, fetched, *a: built.append(fetched.name)
                        or real_build(inputs, fetched, *a))

    def run(label, method, params):
        recipe = write_recipe(tmp_path / f"{label}.yaml", base=str(base), experts=[str(a) for a in adapters],
                              method=method, params=params, output={"path": str(tmp_path / label)})
        built.clear()
        merge(load_recipe(recipe))
        return load_file(tmp_path / label / "model.safetensors"), set(built)

    changed = {n for n in base_sd if any(not torch.equal(r[n], base_sd[n]) for r in refs)}
    assert "transformer.h.0.attn.c_proj.weight" in changed and "transformer.wte.weight" not in changed
    skipped, groups = run("skip", "task_arithmetic", {"scale": 0.5})
    assert groups == changed  # only changed tensors were built into task-vector groups
    for name, tensor in skipped.items():
        expected = base_sd[name] + 0.5 * sum(r[name] - base_sd[name] for r in refs)
        torch.testing.assert_close(tensor, expected, rtol=0, atol=4 * TOL)
        if name not in changed:
            assert torch.equal(tensor, base_sd[name])
    monkeypatch.setattr(get_method("task_arithmetic"), "unchanged_when_zero", False)
    full, groups = run("noskip", "task_arithmetic", {"scale": 0.5})
    assert groups == {n for n, t in base_sd.items() if t.dtype.is_floating_point}
    assert all(torch.equal(full[n], skipped[n]) for n in full)
    # linear without normalisation scales the base too: every tensor is merged, none skipped
    scaled, groups = run("linear", "linear", {"weights": [0.25, 0.25], "normalize": False})
    assert groups == {n for n, t in base_sd.items() if t.dtype.is_floating_point}
    torch.testing.assert_close(scaled["transformer.wte.weight"], 0.5 * base_sd["transformer.wte.weight"])


# -- writing merges back as adapters ----------------------------------------------------------
def _task_vectors(base_dir, adapter_dir) -> dict[str, torch.Tensor]:
    ours, changed, _ = expand(base_dir, adapter_dir)
    base = Checkpoint(base_dir)
    return {name: ours[name] - base.get(name) for name in changed}


def _outputs(model, ids):
    with torch.no_grad():
        out = model(ids)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def _forward_pair(load_as, base_dir, weights, adapter_dir, ids):
    """(base with ``weights`` loaded, base + the written adapter through PEFT) on ``ids``."""
    from peft import PeftModel

    full = model_cls(load_as).from_pretrained(base_dir).eval()
    missing = full.load_state_dict(weights, strict=False)
    assert not missing.unexpected_keys
    adapted = PeftModel.from_pretrained(model_cls(load_as).from_pretrained(base_dir), adapter_dir).eval()
    return _outputs(full, ids), _outputs(adapted, ids)


@pytest.mark.parametrize("arch", ["BertModel", "GPT2LMHeadModel"])
def test_stack_loras_is_exact(bases, tmp_path, arch):
    from peft import LoraConfig

    from hubmerge.adapters.export import linear_coefficients, stack_loras
    from hubmerge.plugins import get_method

    base_dir = bases[arch]
    if arch == "BertModel":
        configs = [
            LoraConfig(
                r=4,
                lora_alpha=8,
                use_rslora=True,
                target_modules=["query", "value", "dense"],
                rank_pattern={"intermediate.dense": 2},
                alpha_pattern={"value": 5},
            ),
            LoraConfig(r=2, lora_alpha=3, target_modules=["query", "key", "word_embeddings"]),
        ]
    else:
        configs = [
            LoraConfig(r=4, lora_alpha=8, fan_in_fan_out=True, target_modules=["c_attn", "c_proj"]),
            LoraConfig(r=2, fan_in_fan_out=True, target_modules=["c_attn", "c_fc"]),
        ]
        # (no wte: GPT-2 ties it to lm_head, and PEFT's unmerged forward does not see a LoRA on the tie)
    adapters = [make_adapter(tmp_path / f"a{i}", base_dir, arch, c, seed=i) for i, c in enumerate(configs)]
    base = Checkpoint(base_dir)
    experts = [open_adapter(resolved(a), base) for a in adapters]
    for expert in experts:
        expert.check(base)
    method = get_method("linear")({"weights": [3.0, 1.0]})
    coefficients = linear_coefficients(method, 2)
    assert coefficients == [0.75, 0.25]
    out = stack_loras(experts, [0.75, -1.5], tmp_path / "stacked", base_model_name_or_path=str(base_dir))

    taus = [_task_vectors(base_dir, a) for a in adapters]
    weights = {
        n: base.get(n) + sum(c * t[n] for c, t in zip([0.75, -1.5], taus, strict=True) if n in t)
        for n in set(taus[0]) | set(taus[1])
    }
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["base_model_name_or_path"] == str(base_dir)
    ids = torch.randint(0, 99, (2, 9), generator=torch.Generator().manual_seed(0))
    full, adapted = _forward_pair(arch, base_dir, weights, out, ids)
    torch.testing.assert_close(adapted, full, rtol=0, atol=1e-5)
    # and hubmerge reads its own output back to the same task vector
    back = _task_vectors(base_dir, out)
    for name, expected in weights.items():
        torch.testing.assert_close(base.get(name) + back[name], expected, rtol=0, atol=1e-5)


def test_stack_loras_refuses_what_it_cannot_carry(bases, tmp_path):
    from peft import LoraConfig

    from hubmerge.adapters.export import linear_coefficients, stack_loras
    from hubmerge.plugins import get_method

    base_dir = bases["BertModel"]
    base = Checkpoint(base_dir)
    dora = open_adapter(
        resolved(
            make_adapter(
                tmp_path / "d",
                base_dir,
                "BertModel",
                LoraConfig(r=2, use_dora=True, target_modules=["query"]),
            )
        ),
        base,
    )
    biased = open_adapter(
        resolved(
            make_adapter(
                tmp_path / "b", base_dir, "BertModel", LoraConfig(r=2, bias="all", target_modules=["query"])
            )
        ),
        base,
    )
    with pytest.raises(AdapterError, match="not a plain LoRA"):
        stack_loras([dora], [1.0], tmp_path / "x")
    with pytest.raises(AdapterError, match="outside its LoRA factors"):
        stack_loras([biased], [1.0], tmp_path / "x")
    with pytest.raises(AdapterError, match="not a linear combination"):
        linear_coefficients(get_method("ties")({}), 2)
    assert not (tmp_path / "x").exists()


def test_low_rank_adapter_full_rank_and_truncated(bases, tmp_path):
    from peft import LoraConfig

    from hubmerge.adapters.export import low_rank_adapter
    from hubmerge.adapters.modules import base_layer_types

    base_dir = bases["BertModel"]
    base = Checkpoint(base_dir)
    # DoRA's task vector (m/||W+ΔW|| - 1) W + ... is full rank
    adapter = make_adapter(
        tmp_path / "dora",
        base_dir,
        "BertModel",
        LoraConfig(r=2, use_dora=True, target_modules=["value", "intermediate.dense", "word_embeddings"]),
    )
    deltas = _task_vectors(base_dir, adapter)
    assert all(n.endswith(".weight") for n in deltas)
    types = base_layer_types(str(base_dir))
    weights = {n: base.get(n) + d for n, d in deltas.items()}
    ids = torch.randint(0, 99, (2, 9), generator=torch.Generator().manual_seed(0))

    exact = low_rank_adapter(deltas, 64, tmp_path / "full", layer_types=types)
    assert exact.max_error < 1e-5
    full, adapted = _forward_pair("BertModel", base_dir, weights, exact.path, ids)
    torch.testing.assert_close(adapted, full, rtol=0, atol=1e-4)

    low = low_rank_adapter(deltas, 3, tmp_path / "low", layer_types=types)
    read_back = _task_vectors(base_dir, low.path)
    for name, delta in deltas.items():
        module = name.removesuffix(".weight")
        matrix = delta.T if types[module] == "Embedding" else delta
        s = torch.linalg.svdvals(matrix.double())
        optimum = (s[3:].square().sum() / s.square().sum()).sqrt().item()
        assert low.errors[module] == pytest.approx(optimum, rel=1e-4)
        # what PEFT would add (read back through our exact expansion) has exactly the reported error
        measured = (
            torch.linalg.matrix_norm(delta - read_back[name]) / torch.linalg.matrix_norm(delta)
        ).item()
        assert measured == pytest.approx(low.errors[module], rel=1e-4, abs=1e-6)
    from peft import PeftModel

    merged = PeftModel.from_pretrained(
        model_cls("BertModel").from_pretrained(base_dir), low.path
    ).merge_and_unload()
    for name, tensor in merged.state_dict().items():
        expected = base.get(name) + read_back.get(name, 0)
        torch.testing.assert_close(tensor, expected, rtol=0, atol=1e-6)


def test_adapter_writer_modules_to_save_and_refusals(bases, tmp_path):
    from peft import PeftModel

    from hubmerge.adapters.export import LoraAdapterWriter
    from hubmerge.errors import OutputExistsError

    base_dir = bases["BertModel"]
    base = Checkpoint(base_dir)
    gen = torch.Generator().manual_seed(5)
    query = "encoder.layer.0.attention.self.query"
    norm = "encoder.layer.1.output.LayerNorm"
    delta = 0.1 * torch.randn(base.meta[f"{query}.weight"].shape, generator=gen)
    new_norm = {p: base.get(f"{norm}.{p}") + 0.3 for p in ("weight", "bias")}
    writer = LoraAdapterWriter(tmp_path / "w")
    assert writer.add_delta(query, delta, 64) < 1e-6
    writer.add_module_to_save(norm, new_norm)
    with pytest.raises(AdapterError, match="added twice"):
        writer.add_module_to_save(query, new_norm)
    with pytest.raises(AdapterError, match="Conv2d"):
        writer.add_delta("encoder.layer.0.attention.self.key", delta, 4, "Conv2d")
    path = writer.finish(base_model_name_or_path="tiny-bert")
    merged = PeftModel.from_pretrained(
        model_cls("BertModel").from_pretrained(base_dir), path
    ).merge_and_unload()
    state = merged.state_dict()
    torch.testing.assert_close(
        state[f"{query}.weight"], base.get(f"{query}.weight") + delta, rtol=0, atol=1e-6
    )
    for p, value in new_norm.items():
        torch.testing.assert_close(state[f"{norm}.{p}"], value, rtol=0, atol=0)
    # a foreign directory is never overwritten; an empty adapter is refused
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "keep.txt").write_text("mine")
    again = LoraAdapterWriter(tmp_path / "foreign")
    again.add_delta(query, delta, 2)
    with pytest.raises(OutputExistsError):
        again.finish()
    assert (tmp_path / "foreign" / "keep.txt").read_text() == "mine"
    with pytest.raises(AdapterError, match="empty"):
        LoraAdapterWriter(tmp_path / "empty").finish()
