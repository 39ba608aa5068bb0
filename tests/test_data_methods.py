"""Methods that need samples or forward passes: the recipe's `data:`, SE-Merging, AdaMerging.

Every number is checked against an independent computation: plain transformers models built from
hand-merged checkpoints, finite differences, permutations drawn here.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from helpers import make_base
from safetensors.torch import load_file, save_file

from hubmerge.errors import DataError, MethodInputError, RecipeError
from hubmerge.recipe import check_recipe, recipe_from_dict

# -- tiny hand-made models -------------------------------------------------------------------------------------

#: Token ids each task's inputs use; each expert changes only the embeddings of its own tokens.
TOKENS = {"alpha": range(10, 30), "beta": range(30, 50), "gamma": range(50, 70)}


def _tiny_bert(state: dict[str, torch.Tensor], config_dir: Path):
    from transformers import AutoConfig, BertModel

    config = AutoConfig.from_pretrained(config_dir)
    return BertModel.from_pretrained(None, config=config, state_dict=dict(state), dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def separated(tmp_path_factory) -> dict[str, Path]:
    """A tiny BERT base and three experts whose task vectors touch disjoint token embeddings."""
    root = tmp_path_factory.mktemp("separated")
    base = make_base(root / "base", seed=3)
    state = load_file(base / "model.safetensors")
    models = {"base": base}
    for i, (task, tokens) in enumerate(TOKENS.items()):
        out = {k: v.clone() for k, v in state.items()}
        gen = torch.Generator().manual_seed(10 + i)
        rows = torch.tensor(list(tokens))
        weight = out["embeddings.word_embeddings.weight"]
        weight[rows] += 0.5 * torch.randn(len(rows), weight.shape[1], generator=gen)
        directory = root / task
        directory.mkdir()
        shutil.copy(base / "config.json", directory / "config.json")
        save_file(out, directory / "model.safetensors", metadata={"format": "pt"})
        models[task] = directory
    return models


def _inputs(task: str, count: int, seed: int, width: int = 12) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.tensor(list(TOKENS[task]))
    ids = tokens[torch.randint(len(tokens), (count, width), generator=gen)]
    mask = torch.ones(count, width, dtype=torch.long)
    mask[0, width - 3:] = 0  # some padding: masked out of the distances
    ids[0, width - 3:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def _recipe(models: dict[str, Path], tasks: list[str], method: str, params: dict | None = None, **extra):
    return recipe_from_dict({
        "hubmerge": 1, "name": f"test-{method}", "base": str(models["base"]),
        "experts": [{"path": str(models[t]), "name": t} for t in tasks],
        "method": method, "params": params or {}, **extra})


def _hand_merge(models: dict[str, Path], coefficients: dict[str, float]) -> dict[str, torch.Tensor]:
    """theta_0 + sum_k c_k (theta_k - theta_0), from the checkpoint files."""
    base = load_file(models["base"] / "model.safetensors")
    out = {}
    for name, theta in base.items():
        if not theta.dtype.is_floating_point:
            out[name] = theta
            continue
        merged = theta.double()
        for task, c in coefficients.items():
            merged = merged + c * (load_file(models[task] / "model.safetensors")[name].double() - theta.double())
        out[name] = merged.float()
    return out


# -- data: ------------------------------------------------------------------------------------------------

def test_data_files_limit_and_seed(tmp_path):
    from hubmerge.data import load_task_data
    from hubmerge.recipe import DataSpec

    rows = [{"input_ids": list(range(1, 2 + i % 4)), "label": i % 2} for i in range(10)]
    (tmp_path / "alpha.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    (tmp_path / "beta.json").write_text(json.dumps({"pixel_values": [[float(i), -float(i)] for i in range(7)],
                                                    "labels": [0] * 7}))
    save_file({"pixel_values": torch.arange(12.0).reshape(6, 2)}, tmp_path / "gamma.safetensors")
    spec = DataSpec.model_validate({"path": str(tmp_path), "limit": 4, "seed": 5})
    data = load_task_data(spec, ["alpha", "beta", "gamma"])

    pick = torch.randperm(10, generator=torch.Generator().manual_seed(5))[:4]  # drawn here, independently
    alpha = data["alpha"]
    assert len(alpha) == 4 and set(alpha.inputs) == {"input_ids", "attention_mask"}
    for row, i in enumerate(pick.tolist()):
        length = 1 + i % 4
        assert alpha.inputs["input_ids"][row, :length].tolist() == list(range(1, 1 + length))
        assert alpha.inputs["attention_mask"][row].tolist() == [1] * length + [0] * (4 - length)
    assert alpha.labels.tolist() == [i % 2 for i in pick.tolist()]  # set aside, not an input

    beta_pick = torch.randperm(7, generator=torch.Generator().manual_seed(5))[:4]
    assert data["beta"].inputs["pixel_values"][:, 0].tolist() == [float(i) for i in beta_pick.tolist()]
    assert "labels" not in data["beta"].inputs
    assert data["gamma"].inputs["pixel_values"].shape == (4, 2)

    in_order = load_task_data(DataSpec.model_validate({"path": str(tmp_path), "limit": 3, "seed": None}), ["gamma"])
    assert torch.equal(in_order["gamma"].inputs["pixel_values"], torch.arange(6.0).reshape(3, 2))
    # a task entry with only `files` reads them from the default source
    (tmp_path / "more").mkdir()
    save_file({"pixel_values": torch.full((2, 2), 7.0)}, tmp_path / "more" / "extra.safetensors")
    spec = DataSpec.model_validate({"path": str(tmp_path), "seed": None, "tasks": {"gamma": {"files": "more/*"}}})
    assert load_task_data(spec, ["gamma"])["gamma"].inputs["pixel_values"].tolist() == [[7.0, 7.0]] * 2
    # a batch drops columns that are padding in every sample
    batch = next(alpha.batches(4))
    assert batch["input_ids"].shape[1] == int(alpha.inputs["attention_mask"].sum(1).max())


def test_data_errors_name_the_file(tmp_path):
    from hubmerge.data import load_task_data
    from hubmerge.recipe import DataSpec

    spec = DataSpec.model_validate({"path": str(tmp_path)})
    with pytest.raises(DataError, match="no file matches"):
        load_task_data(spec, ["alpha"])
    (tmp_path / "alpha.jsonl").write_text('{"input_ids": [1, 2]}\n{"other": 3}\n')
    with pytest.raises(DataError, match="missing in some samples"):
        load_task_data(spec, ["alpha"])
    (tmp_path / "alpha.jsonl").write_text('{"text": "hello"}\n')
    with pytest.raises(DataError, match="tokenizer"):
        load_task_data(spec, ["alpha"])
    (tmp_path / "alpha.jsonl").unlink()
    (tmp_path / "alpha.parquet").write_bytes(b"PAR1 not really")
    try:
        import pyarrow  # noqa: F401
    except ImportError:
        with pytest.raises(DataError, match="needs pyarrow"):
            load_task_data(spec, ["alpha"])
    else:
        with pytest.raises(DataError, match="alpha.parquet: unreadable"):
            load_task_data(spec, ["alpha"])


def test_data_from_a_hub_dataset_repo(local_hub, tmp_path):
    from huggingface_hub import HfApi

    from hubmerge.data import load_task_data
    from hubmerge.recipe import DataSpec

    folder = tmp_path / "repo"
    (folder / "splits").mkdir(parents=True)
    for task, offset in (("alpha", 0), ("beta", 100)):
        (folder / "splits" / f"{task}.jsonl").write_text(
            "\n".join(json.dumps({"pixel_values": [offset + i, offset + i + 0.5]}) for i in range(5)) + "\n")
    api = HfApi()
    api.create_repo("tester/unlabeled", repo_type="dataset", exist_ok=True)
    commit = api.upload_folder(repo_id="tester/unlabeled", folder_path=str(folder), repo_type="dataset").oid

    spec = DataSpec.model_validate({"repo": "tester/unlabeled", "files": "splits/{task}.jsonl", "limit": 5,
                                    "seed": None})
    data = load_task_data(spec, ["alpha", "beta"])
    assert data["beta"].inputs["pixel_values"][:, 0].tolist() == [100.0, 101.0, 102.0, 103.0, 104.0]
    assert commit[:12] in data["alpha"].source  # pinned to the commit read
    with pytest.raises(DataError, match="no file matches"):
        load_task_data(DataSpec.model_validate({"repo": "tester/unlabeled"}), ["alpha"])


def test_validate_refuses_a_data_method_without_data(separated, tmp_path, capsys):
    from hubmerge.cli import main

    recipe = _recipe(separated, ["alpha", "beta"], "adamerging")
    with pytest.raises(RecipeError) as info:
        check_recipe(recipe)
    assert info.value.field == "data" and "data:" in str(info.value)
    path = tmp_path / "ada.yaml"
    path.write_text(yaml.safe_dump(recipe.model_dump(mode="json", exclude_none=True)))
    assert main(["validate", "--schema-only", str(path)]) == 2
    assert "data: method 'adamerging' learns from samples" in capsys.readouterr().err

    with_data = _recipe(separated, ["alpha", "beta"], "adamerging", data={"path": str(tmp_path)})
    assert check_recipe(with_data).needs_data
    with pytest.raises(RecipeError) as info:
        check_recipe(_recipe(separated, ["alpha"], "adamerging", data={"path": str(tmp_path), "tasks": {"x": "a/b"}}))
    assert info.value.field == "data.tasks.x"
    with pytest.raises(RecipeError) as info:  # one value per expert
        check_recipe(_recipe(separated, ["alpha", "beta"], "adamerging", {"coefficients": {"all": [0.1]}}))
    assert info.value.field == "params.coefficients"
    given = check_recipe(_recipe(separated, ["alpha"], "adamerging",
                                 {"granularity": "task", "coefficients": {"all": [0.5]}}))
    assert not given.needs_data  # coefficients given: nothing to learn


# -- SE-Merging ----------------------------------------------------------------------------------------------

def test_rescaling_rule_against_its_definition():
    from hubmerge_plugins.se_merging import rescaled_coefficients

    distances = torch.tensor([[2.0, 4.0, 8.0], [3.0, 3.0, 3.0], [0.0, 1.0, 2.0]])
    got = rescaled_coefficients(distances, scale=0.3, temperature=0.5, max_coefficient=None)
    for row, d in enumerate(distances.tolist()):
        nearest = min(d)
        s = [1.0 if x == 0 else nearest / x for x in d]
        z = [math.exp(v / 0.5) for v in s]
        expected = [0.3 * 3 * v / sum(z) for v in z]
        assert got[row].tolist() == pytest.approx(expected, rel=1e-6)
    assert got[1].tolist() == pytest.approx([0.3] * 3)  # equal distances: task arithmetic
    capped = rescaled_coefficients(distances, scale=0.3, temperature=0.01, max_coefficient=0.5)
    assert capped[2].tolist() == pytest.approx([0.5, 0.0, 0.0], abs=1e-12)


@pytest.mark.parametrize(("params", "coefficient"), [({}, 0.3), ({"scale": 2.0, "max_coefficient": 1.5}, 1.5)])
def test_se_merging_one_expert_is_the_scaled_fine_tune(separated, tmp_path, params, coefficient):
    from hubmerge.deployment import run_deployment
    from hubmerge.dynamic import load_dynamic_model

    params = {"probe_layer": 0, **params}
    result = run_deployment(_recipe(separated, ["alpha"], "se_merging", params), output=tmp_path / "dyn")
    manifest = json.loads((result.output_dir / "dynamic.json").read_text())
    assert manifest["tasks"] == ["alpha"] and manifest["params"]["probe_layer"] == 0
    assert manifest["storage"]["model_equivalents"] == pytest.approx(2.0, rel=0.01)  # base + one task vector

    model = load_dynamic_model(result.output_dir)
    reference = _tiny_bert(_hand_merge(separated, {"alpha": coefficient}), separated["base"])
    batch = _inputs("alpha", 5, seed=1)
    with torch.no_grad():
        got, want = model(**batch), reference(**batch)
    assert type(got) is type(want)
    # rule with T = 1: lambda * 1 * softmax(.) = lambda, capped
    assert model.last_routing.coefficients.flatten().tolist() == pytest.approx([coefficient] * 5)
    torch.testing.assert_close(got.last_hidden_state, want.last_hidden_state, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(got.pooler_output, want.pooler_output, atol=2e-5, rtol=1e-4)


def test_router_picks_the_task_whose_representations_separate(separated, tmp_path, monkeypatch):
    from hubmerge_plugins.se_merging import rescaled_coefficients

    from hubmerge.deployment import run_deployment
    from hubmerge.dynamic import load_dynamic_model

    tasks = list(TOKENS)
    # scale 1: on its own tokens the merge *is* the expert, the other experts are the base there
    params = {"scale": 1.0, "probe_layer": 0, "temperature": 0.1, "max_coefficient": 1.0}
    result = run_deployment(_recipe(separated, tasks, "se_merging", params), output=tmp_path / "dyn")
    model = load_dynamic_model(result.output_dir)
    static = _tiny_bert(_hand_merge(separated, dict.fromkeys(tasks, 1.0)), separated["base"])
    experts = [_tiny_bert(load_file(separated[t] / "model.safetensors"), separated["base"]) for t in tasks]
    for k, task in enumerate(tasks):
        batch = _inputs(task, 4, seed=20 + k)
        with torch.no_grad():
            out = model(**batch)
            routing = model.last_routing
            assert routing.chosen.tolist() == [k] * 4
            # distances recomputed from plain models: block 0's output is hidden_states[1]
            mask = batch["attention_mask"].unsqueeze(-1).float()
            merged = static(**batch, output_hidden_states=True).hidden_states[1] * mask
            distances = torch.stack([(merged - e(**batch, output_hidden_states=True).hidden_states[1] * mask)
                                     .flatten(1).norm(dim=1) for e in experts], dim=1)
            torch.testing.assert_close(routing.distances, distances, atol=1e-4, rtol=1e-4)
            coefficients = rescaled_coefficients(distances, **params_without_probe(params))
            torch.testing.assert_close(routing.coefficients, coefficients, atol=1e-4, rtol=1e-4)
            # each sample ran through its own merge
            for b in range(4):
                own = _tiny_bert(_hand_merge(separated, dict(zip(tasks, coefficients[b].tolist()))),
                                 separated["base"])
                sample = {key: v[b:b + 1] for key, v in batch.items()}
                torch.testing.assert_close(out.last_hidden_state[b:b + 1], own(**sample).last_hidden_state,
                                           atol=5e-5, rtol=1e-4)
    # no model is copied per sample
    import copy

    monkeypatch.setattr(copy, "deepcopy", lambda *a, **k: pytest.fail("a model was copied"))
    monkeypatch.setattr(torch.nn.Module, "load_state_dict", lambda *a, **k: pytest.fail("weights were reloaded"))
    with torch.no_grad():
        model(**_inputs("beta", 3, seed=9))
    # the sequential path (models vmap cannot batch) gives the same outputs
    model.vectorize = False
    batch = _inputs("gamma", 3, seed=4)
    with torch.no_grad():
        one_by_one = model(**batch).last_hidden_state
        model.vectorize = True
        torch.testing.assert_close(model(**batch).last_hidden_state, one_by_one, atol=1e-5, rtol=1e-5)


def params_without_probe(params: dict) -> dict:
    return {k: v for k, v in params.items() if k in ("scale", "temperature", "max_coefficient")}


def test_dynamic_deployment_through_the_hub(separated, tmp_path, local_hub):
    from hubmerge.deployment import load_task_model, run_deployment
    from hubmerge.dynamic import load_dynamic_model, publish_dynamic
    from hubmerge.errors import DeploymentError

    result = run_deployment(_recipe(separated, ["alpha", "beta"], "se_merging", {"probe_layer": -1}),
                            output=tmp_path / "dyn")
    publish_dynamic(result, "tester/se-merge")
    remote, local = load_dynamic_model("tester/se-merge"), load_dynamic_model(result.output_dir)
    batch = _inputs("beta", 3, seed=2)
    with torch.no_grad():
        torch.testing.assert_close(remote(**batch).pooler_output, local(**batch).pooler_output)
    card = (result.output_dir / "README.md").read_text()
    assert "base_model_relation: merge" in card and "load_dynamic_model" in card and "se_merging" in card
    with pytest.raises(DeploymentError, match="load_dynamic_model"):
        load_task_model(result.output_dir, "alpha")


# -- AdaMerging ----------------------------------------------------------------------------------------------

def test_adamerging_gradient_reaches_only_the_coefficients(tiny_models):
    from hubmerge_plugins.adamerging import entropy, group_of

    from hubmerge.data import TaskData
    from hubmerge.functional import TaskHead, TaskVectorModel

    tasks = ["alpha", "beta"]  # two of the session's tiny experts (every tensor moved)
    base = load_file(tiny_models["base"] / "model.safetensors")
    experts = [load_file(tiny_models[e] / "model.safetensors") for e in ("e0", "e1")]
    taus = {n: torch.stack([e[n] - v for e in experts]) for n, v in base.items() if v.dtype.is_floating_point}
    model = TaskVectorModel.from_tensors(tiny_models["base"], base, taus, tasks, dtype=torch.float64)
    floating = [n for n, v in base.items() if v.dtype.is_floating_point]
    blocks = list(dict.fromkeys(group_of(n, "block") for n in floating))
    assert blocks == ["embeddings", "encoder.layer.0", "encoder.layer.1", "pooler"]
    groups = model.groups_of({n: blocks.index(group_of(n, "block")) for n in floating})
    gen = torch.Generator().manual_seed(0)
    heads = [TaskHead(t, "linear", torch.randn(3, 32, generator=gen, dtype=torch.float64),
                      torch.zeros(3, dtype=torch.float64), "pooler") for t in tasks]
    data = {t: TaskData(t, _inputs(t, 6, seed=i)) for i, t in enumerate(tasks)}

    def loss(lambdas):
        params = model.merged_by_group(lambdas, groups)
        return sum(entropy(h(model, params, data[h.task].inputs)) for h in heads)

    lambdas = torch.full((len(blocks), 2), 0.3, dtype=torch.float64, requires_grad=True)
    loss(lambdas).backward()
    assert all(p.grad is None and not p.requires_grad for p in model.module.parameters())
    assert not model.flat_base.requires_grad and not model.flat_taus.requires_grad
    assert model.flat_base.grad is None and model.flat_taus.grad is None
    # the merged parameters are the hand merge in checkpoint names (block coefficients per tensor)
    merged = model.merged_by_group(lambdas.detach(), groups)
    name = "encoder.layer.1.attention.self.query.weight"
    module_name = next(m for m, c in model.checkpoint_names.items() if c == name)
    torch.testing.assert_close(merged[module_name], base[name].double() + 0.3 * taus[name].double().sum(0))
    # the gradient against central finite differences
    eps = 1e-5
    for g in range(len(blocks)):
        for k in range(2):
            step = torch.zeros_like(lambdas)
            step[g, k] = eps
            with torch.no_grad():
                numeric = (loss(lambdas.detach() + step) - loss(lambdas.detach() - step)) / (2 * eps)
            assert float(lambdas.grad[g, k]) == pytest.approx(float(numeric), rel=1e-4, abs=1e-9)
    assert (lambdas.grad.abs() > 1e-6).all()  # every block of every task matters here


def test_adamerging_needs_a_head_per_expert(separated, tmp_path):
    from hubmerge.engine import merge

    (tmp_path / "data").mkdir()
    for task in ("alpha", "beta"):
        save_file(_inputs(task, 4, seed=1), tmp_path / "data" / f"{task}.safetensors")
    recipe = _recipe(separated, ["alpha", "beta"], "adamerging", {"steps": 1},
                     data={"path": str(tmp_path / "data")})
    with pytest.raises(MethodInputError, match="no classifier head.*task_head.safetensors"):
        merge(recipe, output=tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def suite(tmp_path_factory):
    """The demo suite's reduced vision part (SuiteConfig.small()), built once for this module."""
    from hubmerge.suite import SuiteConfig, build_suite

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return build_suite(tmp_path_factory.mktemp("suite"), which=("vision",), config=SuiteConfig.small())
    finally:
        torch.set_num_threads(threads)


def test_adamerging_lowers_entropy_on_the_demo_suite(suite, tmp_path):
    from hubmerge.engine import merge
    from hubmerge.recipe import load_recipe
    from hubmerge.suite import base_state_dict, expert_state_dict

    tasks = suite.tasks_for("vision")
    data = {"path": str(suite.root / "vision" / "data"), "files": "{task}.safetensors", "limit": 48}
    params = {"steps": 12, "lr": 0.02, "batch_size": 16}
    recipe = recipe_from_dict({
        "hubmerge": 1, "name": "ada-suite", "base": str(suite.base_dir("vision")),
        "experts": [{"path": str(suite.expert(t).path), "name": t} for t in tasks],
        "method": "adamerging", "params": params, "data": data})
    result = merge(recipe, output=tmp_path / "ada")
    report = result.method.report
    assert report.entropy_after < report.entropy_before - 1e-3
    table = result.method.params.coefficients
    assert list(table) == ["embeddings", "encoder.layer.0", "encoder.layer.1", "layernorm", "pooler"]
    assert all(len(v) == len(tasks) and all(0.0 <= x <= 1.0 for x in v) for v in table.values())
    assert any(abs(x - 0.3) > 1e-3 for v in table.values() for x in v)  # learned, not the start

    # the written model is theta_0 + sum_k lambda_k^block tau_k, recomputed from the suite's checkpoints
    written = load_file(result.output_dir / "model.safetensors")
    base = base_state_dict(suite, "vision")
    experts = [expert_state_dict(suite, t) for t in tasks]
    for name, block in (("encoder.layer.1.output.dense.weight", "encoder.layer.1"),
                        ("embeddings.cls_token", "embeddings"), ("pooler.dense.bias", "pooler")):
        want = base[name].double() + sum(c * (e[name].double() - base[name].double())
                                         for c, e in zip(table[block], experts))
        torch.testing.assert_close(written[name].double(), want, atol=1e-6, rtol=1e-5)
    # the coefficients are in the card and in the resolved recipe, which re-merges without data
    assert "coefficients" in (result.output_dir / "README.md").read_text()
    again = load_recipe(result.output_dir / "hubmerge_recipe.yaml")
    assert again.params["coefficients"] == table
    rerun = merge(again.model_copy(update={"data": None}), output=tmp_path / "again")
    assert rerun.method.report is None  # nothing learned
    for name, tensor in load_file(rerun.output_dir / "model.safetensors").items():
        assert torch.equal(tensor, written[name]), name
    # fixed seeds: learning again gives the same coefficients
    assert merge(recipe, output=tmp_path / "ada2").method.params.coefficients == table


def test_evaluate_dynamic_on_the_demo_suite(suite, tmp_path):
    from hubmerge.deployment import run_deployment
    from hubmerge.dynamic import evaluate_dynamic
    from hubmerge.suite import base_state_dict, evaluate, expert_state_dict, task_arithmetic

    tasks = suite.tasks_for("vision")
    recipe = recipe_from_dict({
        "hubmerge": 1, "name": "se-suite", "base": str(suite.base_dir("vision")),
        "experts": [{"path": str(suite.expert(t).path), "name": t} for t in tasks], "method": "se_merging"})
    result = run_deployment(recipe, output=tmp_path / "se")
    evaluation = evaluate_dynamic(result.output_dir, suite)
    assert set(evaluation.accuracy) == set(tasks) and 0 <= evaluation.routing_accuracy <= 1
    assert sum(evaluation.samples.values()) == sum(
        load_file(suite.task(t).test_path)["labels"].numel() for t in tasks)
    assert evaluation.overhead > 1  # T + 1 probes and per-sample merges cost more than one static pass
    # the static merge it probes with is task arithmetic at lambda = 0.3
    static = task_arithmetic(base_state_dict(suite, "vision"), [expert_state_dict(suite, t) for t in tasks], 0.3)
    for task in tasks:
        assert evaluation.static_accuracy[task] == pytest.approx(evaluate(static, task, suite), abs=2e-3)
