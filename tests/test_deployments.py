"""Per-task deployments: EMR-Merging and TALL masks against hand formulas, storage by hand count,
``load_task_model`` on an EMR deployment, and publishing deployments (FlexMerge sizes on branches)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from hubmerge.deployment import Deployment, load_task_model, masked_storage_bytes, unpack_mask
from hubmerge.errors import RecipeError
from hubmerge.plugins import get_plugin_manager, registered_methods
from hubmerge.recipe import load_recipe
from helpers import write_recipe

TASKS = ["t0", "t1", "t2"]


@pytest.fixture(scope="module", autouse=True)
def emr_plugin():
    """Register ``hubmerge_plugins.emr`` when its entry point is not installed yet."""
    if "emr" not in registered_methods():
        import hubmerge_plugins.emr as module

        get_plugin_manager().register(module, name="emr")
    assert "emr" in registered_methods()
    yield


# -- small constructed models: a 2-D weight, a bias with exact ties, an int buffer -------------------
@pytest.fixture(scope="module")
def small(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("small")
    gen = torch.Generator().manual_seed(3)
    # the bias is dyadic too, so that its task vectors are exact in float32
    base = {"w": torch.randn(5, 3, generator=gen), "b": torch.tensor([1.0, 2.0, -1.5, 0.5]), "n": torch.tensor([7, 8])}
    models = {"base": root / "base"}
    models["base"].mkdir()
    save_file(base, models["base"] / "model.safetensors")
    (models["base"] / "config.json").write_text("{}")
    # bias task vectors: entry 0 cancels exactly (sum 0), entry 1 is zero for every task,
    # entries 2-3 ordinary; dyadic values keep every sum exact in float32
    b_deltas = torch.tensor([[0.5, 0.0, 0.25, -0.5], [-0.25, 0.0, -0.125, -0.25], [-0.25, 0.0, 0.5, 0.125]])
    for k in range(3):
        d = root / TASKS[k]
        d.mkdir()
        state = {"w": base["w"] + 0.1 * torch.randn(5, 3, generator=gen), "b": base["b"] + b_deltas[k],
                 "n": base["n"].clone()}
        save_file(state, d / "model.safetensors")
        models[TASKS[k]] = d
    return models


def _recipe(tmp_path, models, method, params=None, out="out", **extra):
    return load_recipe(write_recipe(tmp_path / f"{method}.yaml", base=str(models["base"]),
                                    experts=[str(models[t]) for t in TASKS], method=method, params=params or {},
                                    output={"path": str(tmp_path / out)}, **extra))


def _taus(models) -> dict[str, torch.Tensor]:
    """Task vectors stacked per tensor, (T, *shape), float64."""
    base = load_file(models["base"] / "model.safetensors")
    experts = [load_file(models[t] / "model.safetensors") for t in TASKS]
    return {n: torch.stack([e[n].double() - base[n].double() for e in experts]) for n in ("w", "b")}


def _hand_emr(taus):
    """EMR by hand, entry by entry (the reference's sign: a zero sum counts as negative)."""
    uni, masks = {}, {}
    for name, tau in taus.items():
        flat = tau.reshape(3, -1)
        u = torch.zeros(flat.shape[1], dtype=torch.float64)
        m = torch.zeros_like(flat, dtype=torch.bool)
        for j in range(flat.shape[1]):
            gamma = 1.0 if float(flat[:, j].sum()) > 0 else -1.0
            agreeing = [abs(float(flat[t, j])) for t in range(3) if float(flat[t, j]) * gamma > 0]
            u[j] = gamma * max(agreeing, default=0.0)
            for t in range(3):
                m[t, j] = float(flat[t, j]) * float(u[j]) > 0
        uni[name], masks[name] = u.reshape(tau.shape[1:]), m.reshape(tau.shape)
    lambdas = []
    for t in range(3):
        num = sum(float(taus[n][t].abs().sum()) for n in taus)
        den = sum(float((masks[n][t] * uni[n]).abs().sum()) for n in taus)
        lambdas.append(num / den)
    return uni, masks, lambdas


@pytest.fixture(scope="module")
def emr_run(small, tmp_path_factory):
    from hubmerge.deployment import run_deployment

    tmp = tmp_path_factory.mktemp("emr")
    result = run_deployment(_recipe(tmp, small, "emr"))
    return result, Deployment(result.output_dir)


def test_emr_reconstruction_matches_hand_formulas(emr_run, small):
    result, dep = emr_run
    taus = _taus(small)
    uni, masks, lambdas = _hand_emr(taus)
    base = load_file(small["base"] / "model.safetensors")
    assert dep.kind == "emr" and dep.tasks == TASKS
    stored_lambdas = json.loads((result.output_dir / "deployment.json").read_text())["emr"]["rescalers"]
    for t, task in enumerate(TASKS):
        assert stored_lambdas[t] == pytest.approx(lambdas[t], rel=1e-6)
        for name in ("w", "b"):
            expected = base[name].double() + lambdas[t] * (masks[name][t] * uni[name])
            torch.testing.assert_close(dep.tensor(task, name).double(), expected, rtol=0, atol=1e-5)
            entry = dep.views[task][name]
            packed = dep.store.get(entry["mask"])[entry["mask_row"]]
            assert torch.equal(unpack_mask(packed, base[name].shape), masks[name][t])
        assert torch.equal(dep.tensor(task, "n"), base["n"])  # integer buffer: the base's, stored once
    # the cancelling entry b[0] (0.5 - 0.25 - 0.25 = 0) elects the negative sign; b[1] stays empty
    assert uni["b"][0] == -0.25 and uni["b"][1] == 0
    assert not any(masks["b"][t][1] for t in range(3))


def test_emr_signs_and_rescaler_identity(emr_run, small):
    _, dep = emr_run
    taus = _taus(small)
    base = load_file(small["base"] / "model.safetensors")
    for t, task in enumerate(TASKS):
        total_tau = total_rebuilt = 0.0
        for name in ("w", "b"):
            rebuilt = dep.tensor(task, name).double() - base[name].double()  # λ_t M_t ⊙ τ_uni
            entry = dep.views[task][name]
            mask = unpack_mask(dep.store.get(entry["mask"])[entry["mask_row"]], base[name].shape)
            # where M_t is set the task's sign is reconstructed; elsewhere nothing is added
            assert torch.equal(torch.sign(rebuilt[mask]), torch.sign(taus[name][t][mask]))
            assert torch.all(rebuilt[~mask] == 0)
            total_tau += float(taus[name][t].abs().sum())
            total_rebuilt += float(rebuilt.abs().sum())
        assert total_rebuilt == pytest.approx(total_tau, rel=1e-5)  # Σ|λ_t M_t ⊙ τ_uni| = Σ|τ_t|


def test_emr_storage_is_a_hand_count(emr_run, small):
    _, dep = emr_run
    # w: 15 float32 entries, b: 4, n: 2 int64
    w, b, n = 15 * 4, 4 * 4, 2 * 8
    masks = 3 * math.ceil(15 / 8) + 3 * math.ceil(4 / 8)  # one bit per entry and task, a row per task
    scalars = 3 * 4  # one float32 rescaler per task (rescale: model)
    expected = 2 * w + 2 * b + n + masks + scalars
    assert dep.storage["bytes"] == expected
    assert dep.storage["scalar_bytes"] == scalars
    assert dep.storage["model_bytes"] == w + b + n
    assert dep.storage["model_equivalents"] == pytest.approx(expected / (w + b + n))
    from hubmerge.writer import TensorSpec

    specs = [TensorSpec("w", (5, 3), torch.float32), TensorSpec("b", (4,), torch.float32),
             TensorSpec("n", (2,), torch.int64)]
    assert masked_storage_bytes(specs, {"w", "b"}, 3, scalars=3) == expected


def test_emr_per_tensor_rescalers(small, tmp_path):
    from hubmerge.deployment import run_deployment

    result = run_deployment(_recipe(tmp_path, small, "emr", {"rescale": "tensor"}))
    dep = Deployment(result.output_dir)
    taus = _taus(small)
    uni, masks, _ = _hand_emr(taus)
    base = load_file(small["base"] / "model.safetensors")
    for t, task in enumerate(TASKS):
        for name in ("w", "b"):
            lam = float(taus[name][t].abs().sum()) / float((masks[name][t] * uni[name]).abs().sum())
            assert dep.views[task][name]["scale"] == pytest.approx(lam, rel=1e-6)
            rebuilt = dep.tensor(task, name).double() - base[name].double()
            assert float(rebuilt.abs().sum()) == pytest.approx(float(taus[name][t].abs().sum()), rel=1e-5)
    assert dep.storage["scalar_bytes"] == 3 * 2 * 4  # T scalars per floating tensor


def test_tall_deployment_equals_hand_formula(small, tmp_path):
    from hubmerge.deployment import run_deployment

    lam = {"t0": 0.4, "t1": 0.2, "t2": 0.6}
    result = run_deployment(_recipe(tmp_path, small, "tall", {"tall_lambda": lam}))
    dep = Deployment(result.output_dir)
    assert dep.kind == "tall"
    taus = _taus(small)
    base = load_file(small["base"] / "model.safetensors")
    for name, tau in taus.items():
        mtl = tau.sum(0)  # task arithmetic's τ_MTL, unscaled
        for t, task in enumerate(TASKS):
            m_t = tau[t].abs() >= lam[task] * (mtl - tau[t]).abs()
            expected = base[name].double() + m_t * mtl  # θ_0 + m_t ⊙ τ_MTL
            torch.testing.assert_close(dep.tensor(task, name).double(), expected, rtol=0, atol=1e-5)
    # no per-task scalars: storage is θ_0, τ_MTL, bits and the int buffer
    assert dep.storage["bytes"] == 2 * (60 + 16) + 16 + 3 * 2 + 3 * 1
    manifest = json.loads((result.output_dir / "deployment.json").read_text())
    assert manifest["tall"]["inner"] == "task_arithmetic"


def test_tall_refuses_bad_lambda_and_inner_scale(small, tmp_path):
    from hubmerge.deployment import run_deployment

    with pytest.raises(RecipeError, match="tall_lambda"):
        run_deployment(_recipe(tmp_path, small, "tall", {"tall_lambda": {"t0": 0.4}}))
    with pytest.raises(RecipeError, match="scale"):
        run_deployment(_recipe(tmp_path, small, "tall", {"inner_params": {"scale": 0.3}}))
    assert not (tmp_path / "out").exists()


def test_engine_merge_refuses_a_deployment_method(small, tmp_path):
    from hubmerge.engine import merge

    with pytest.raises(RecipeError, match="deployment"):
        merge(_recipe(tmp_path, small, "emr"))


# -- a real model: load_task_model on an EMR deployment -----------------------------------------------
def test_load_task_model_on_emr_equals_hand_model(tiny_models, tmp_path):
    from hubmerge.deployment import run_deployment

    recipe = load_recipe(write_recipe(tmp_path / "r.yaml", base=str(tiny_models["base"]),
                                      experts=[str(tiny_models[n]) for n in ("e0", "e1", "e2")], method="emr",
                                      output={"path": str(tmp_path / "emr")}))
    result = run_deployment(recipe)
    base = load_file(tiny_models["base"] / "model.safetensors")
    experts = [load_file(tiny_models[n] / "model.safetensors") for n in ("e0", "e1", "e2")]
    floating = [n for n, v in base.items() if v.dtype.is_floating_point]
    uni, masks = {}, {}
    for name in floating:
        tau = torch.stack([e[name].double() - base[name].double() for e in experts])
        gamma = torch.where(tau.sum(0) > 0, 1.0, -1.0).double()
        agree = tau * gamma > 0
        uni[name] = (tau.abs() * agree).amax(0) * gamma
        masks[name] = agree
    model = load_task_model(result.output_dir, "e1")
    assert type(model).__name__ == "BertModel"
    state = model.state_dict()
    num = sum(float((experts[1][n].double() - base[n].double()).abs().sum()) for n in floating)
    den = sum(float((masks[n][1] * uni[n]).abs().sum()) for n in floating)
    lam = num / den
    for name in floating:
        expected = base[name].double() + lam * masks[name][1] * uni[name]
        torch.testing.assert_close(state[name].double(), expected, rtol=0, atol=1e-5)
    card = (result.output_dir / "README.md").read_text()
    assert "base_model_relation: merge" in card and "load_task_model" in card


# -- publishing: FlexMerge sizes on branches of one repo ---------------------------------------------
def test_publish_flexmerge_to_branches_with_cards_and_plot(local_hub, tiny_models, tmp_path):
    from huggingface_hub import HfApi, ModelCard, hf_hub_download

    from hubmerge.flexmerge import run_flexmerge
    from hubmerge.publish import publish_deployment

    api = local_hub.api()
    repos = {"base": "dep/base", "e0": "dep/e0", "e1": "dep/e1"}
    for key, repo in repos.items():
        api.create_repo(repo, exist_ok=True)
        api.upload_folder(repo_id=repo, folder_path=str(tiny_models[key]))
    recipe = load_recipe(write_recipe(tmp_path / "f.yaml", base=repos["base"], experts=[repos["e0"], repos["e1"]],
                                      method="task_arithmetic", flexmerge={"sizes": "all"},
                                      output={"path": str(tmp_path / "flex"), "repo": "dep/flex"}))
    result = run_flexmerge(recipe)
    evaluation = {"1": {"e0": 0.5, "e1": 0.6}, "2": {"e0": 0.9, "e1": 0.8}}
    commits = publish_deployment(result, "dep/flex", evaluation=evaluation, baselines={"experts": {"e0": 0.9}})
    assert list(commits) == ["size-1", "size-2", "main"]

    hub = HfApi()
    branches = {b.name: b.target_commit for b in hub.list_repo_refs("dep/flex").branches}
    assert branches == {"main": commits["main"], "size-1": commits["size-1"], "size-2": commits["size-2"]}
    for revision in ("size-1", "size-2", "main"):
        files = set(hub.list_repo_files("dep/flex", revision=revision))
        assert {"README.md", "accuracy_vs_size.png", "hubmerge_recipe.yaml"} <= files
        if revision == "main":
            assert "flexmerge.json" in files and "deployment.json" not in files
        else:
            assert {"deployment.json", "deployment.safetensors", "config.json"} <= files
        png = Path(hf_hub_download("dep/flex", "accuracy_vs_size.png", revision=revision)).read_bytes()
        assert png.startswith(b"\x89PNG\r\n\x1a\n")
        card = ModelCard.load(hf_hub_download("dep/flex", "README.md", revision=revision))
        assert card.data.base_model == [repos["base"], repos["e0"], repos["e1"]]
        assert card.data.base_model_relation == "merge"
        assert {"hubmerge", "merge", "task_arithmetic", "flexmerge", "hubmerge-deployment"} <= set(card.data.tags)
        assert "| size | revision | model-equivalents | stored |" in card.text
        assert "| 1 | " in card.text and "| 2 | " in card.text  # every size and its storage
        assert "![accuracy vs size](accuracy_vs_size.png)" in card.text
        assert "0.9000" in card.text and "0.6000" in card.text  # accuracy per task per size
    size2 = ModelCard.load(hf_hub_download("dep/flex", "README.md", revision="size-2"))
    results = {r.task_name: r.metric_value for r in size2.data.eval_results}
    assert results == {"e0": 0.9, "e1": 0.8}  # the size's own scores in model-index
    assert 'revision="size-2"' in size2.text

    # a task loads from its size's branch; main (the overview) names the branches
    model = load_task_model("dep/flex", "e1", revision="size-2")
    expert = load_file(tiny_models["e1"] / "model.safetensors")
    for name, tensor in model.state_dict().items():
        if name in expert:
            assert torch.equal(tensor, expert[name])  # size 2 = every expert kept
    from hubmerge.errors import DeploymentError

    with pytest.raises(DeploymentError, match="size-1"):
        load_task_model("dep/flex", "e1")


def test_cli_run_publishes_an_emr_deployment_to_main(local_hub, small, tmp_path, capsys):
    from huggingface_hub import HfApi, ModelCard, hf_hub_download

    from hubmerge.cli import main

    recipe = write_recipe(tmp_path / "emr.yaml", base=str(small["base"]), experts=[str(small[t]) for t in TASKS],
                          method="emr", output={"path": str(tmp_path / "emr-out"), "repo": "dep/emr"})
    assert main(["run", str(recipe), "--no-progress"]) == 0
    assert "pushed to dep/emr@main" in capsys.readouterr().out
    files = set(HfApi().list_repo_files("dep/emr"))
    assert {"deployment.json", "deployment.safetensors", "README.md", "hubmerge_recipe.yaml"} <= files
    assert "accuracy_vs_size.png" not in files  # no evaluation given, no plot
    card = ModelCard.load(hf_hub_download("dep/emr", "README.md"))
    assert card.data.base_model_relation == "merge" and {"hubmerge", "merge", "emr"} <= set(card.data.tags)
    assert "| size | revision | model-equivalents | stored |" in card.text
    # base_model lists Hub repos only: these inputs are local directories
    assert card.data.base_model is None
    from huggingface_hub import snapshot_download

    pushed, local = Deployment(snapshot_download("dep/emr")), Deployment(tmp_path / "emr-out")
    for task in TASKS:
        for name in ("w", "b", "n"):
            assert torch.equal(pushed.tensor(task, name), local.tensor(task, name))
