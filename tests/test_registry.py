"""The recipe registry: package and plugin recipes with variables, re-running and verifying
published merges on the loopback Hub, Hub search, and mergekit import."""

from __future__ import annotations

import argparse
import json
import math
import sys
from types import SimpleNamespace

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from hubmerge import registry
from hubmerge.engine import merge
from hubmerge.errors import HubmergeError, RecipeError
from hubmerge.hookspecs import hookimpl
from hubmerge.mergekit_compat import MergekitImportError, import_mergekit
from hubmerge.plugins import get_plugin_manager
from hubmerge.recipe import check_recipe, load_recipe, recipe_from_dict
from hubmerge.reproduce import compare_checkpoints


def cli(*argv) -> int:
    """Run the registry and merge commands as ``hubmerge`` does (exit 2 and one line on bad input)."""
    from hubmerge.cli import merge_commands, registry_commands

    parser = argparse.ArgumentParser(prog="hubmerge")
    sub = parser.add_subparsers(dest="command", required=True)
    merge_commands.add_commands(sub)
    registry_commands.add_commands(sub)
    args = parser.parse_args([str(a) for a in argv])
    try:
        return int(args.handler(args) or 0)
    except HubmergeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def _states(models, *keys):
    return [load_file(models[k] / "model.safetensors") for k in keys]


# -- recipes from plugins and the package, with variables -------------------------------------------------
PLUGIN_RECIPE = """
hubmerge: 1
name: plugin-half-sum
description: Task arithmetic at half strength. Registered by the test plugin.
variables:
  base: {type: model, description: the pre-trained model}
  experts: {type: models, description: the fine-tunes}
  scale: {type: number, default: 0.5}
base: ${base}
experts: ${experts}
method: task_arithmetic
params: {scale: "${scale}"}
"""


class _RecipePlugin:
    @hookimpl
    def hubmerge_register_recipes(self, register):
        register(PLUGIN_RECIPE, version="2.1")
        register("hubmerge: 1\nname: plugin-broken\nexperts: [a, b\n")  # reported, not fatal


class _CrashingPlugin:
    @hookimpl
    def hubmerge_register_recipes(self, register):
        raise RuntimeError("plugin bug")


@pytest.fixture
def recipe_plugin():
    pm = get_plugin_manager()
    plugins = [(_RecipePlugin(), "registry-test-recipes"), (_CrashingPlugin(), "registry-test-crash")]
    for plugin, name in plugins:
        pm.register(plugin, name=name)
    yield
    for plugin, _ in plugins:
        pm.unregister(plugin)


def test_plugin_recipe_is_listed_and_runs_with_variables(recipe_plugin, tiny_models, tmp_path, capsys):
    loaded = registry.load_registry()
    entry = loaded.latest()["plugin-half-sum"]
    assert (entry.version, entry.source) == ("2.1", "plugin registry-test-recipes")
    assert entry.methods == ("task_arithmetic",)
    assert entry.summary == "Task arithmetic at half strength." and entry.required == ["base", "experts"]
    failures = {f.source: f for f in loaded.failures}
    assert "malformed YAML" in failures["plugin registry-test-recipes"].error
    assert "plugin bug" in failures["plugin registry-test-crash"].error

    assert cli("recipes", "list") == 0
    listing = capsys.readouterr().out
    assert "plugin-half-sum@2.1" in listing and "needs: base, experts" in listing and "FAILED" in listing

    out = tmp_path / "merged"
    e0, e1 = tiny_models["e0"], tiny_models["e1"]
    assert cli("run", "plugin-half-sum", "--set", f"base={tiny_models['base']}",
               "--set", f"experts={e0},{e1}", "--set", "scale=0.25", "-o", out, "--no-progress") == 0
    merged = load_file(out / "model.safetensors")
    base, a, b = _states(tiny_models, "base", "e0", "e1")
    for name, theta in base.items():
        if theta.is_floating_point():
            torch.testing.assert_close(merged[name], theta + 0.25 * ((a[name] - theta) + (b[name] - theta)))
    lineage = yaml.safe_load((out / "hubmerge_recipe.yaml").read_text())
    assert lineage["provenance"]["source"] == "recipe plugin-half-sum 2.1 (plugin registry-test-recipes)"
    assert lineage["params"] == {"scale": 0.25, "weights": None} and "variables" not in lineage
    assert lineage["version"] == "2.1"


def test_missing_variable_is_a_field_error(recipe_plugin, capsys):
    entry = registry.registered_recipes()["plugin-half-sum"]
    with pytest.raises(RecipeError) as info:
        entry.render({"base": "org/base"})
    assert info.value.field == "variables.experts"
    assert "required variable 'experts' is not set" in str(info.value)
    assert "used at experts" in str(info.value)
    for values, field in [({"base": "org/b", "experts": "org/x", "sclae": "1"}, "variables.sclae"),
                          ({"base": "org/b", "experts": "org/x", "scale": "half"}, "variables.scale")]:
        with pytest.raises(RecipeError) as info:
            entry.render(values)
        assert info.value.field == field
    assert cli("run", "plugin-half-sum", "--set", "base=org/base") == 2
    assert "variables.experts: required variable 'experts'" in capsys.readouterr().err
    assert cli("run", "plugin-hlaf-sum") == 2
    assert "did you mean 'plugin-half-sum'" in capsys.readouterr().err


def test_template_rules_keep_plain_recipes_valid():
    plain = {"hubmerge": 1, "name": "t", "version": 1.5, "base": "org/base", "experts": ["org/a"],
             "method": "task_arithmetic"}
    assert recipe_from_dict(plain).version == "1.5"  # a plain recipe is still schema v1
    doc = {**plain, "description": "costs $${price} for ${who}", "output": {"path": "out/${who}"}}
    recipe = recipe_from_dict(doc, variables={"who": "me"})
    assert recipe.description == "costs ${price} for me" and recipe.output.path == "out/me"
    with pytest.raises(RecipeError) as info:  # an undeclared placeholder is a required variable
        recipe_from_dict(doc)
    assert info.value.field == "variables.who"
    with pytest.raises(RecipeError) as info:
        recipe_from_dict({**plain, "variables": {"unused": {"default": 1}}})
    assert info.value.field == "variables.unused" and "no ${unused}" in str(info.value)
    with pytest.raises(RecipeError) as info:
        recipe_from_dict({**plain, "variables": {"k": {"type": "number", "default": "x"}},
                          "params": {"scale": "${k}"}})
    assert info.value.field == "variables.k"


def test_package_recipes_render_into_checked_recipes(tiny_models):
    recipes = registry.registered_recipes()
    base, e0, e1 = (str(tiny_models[k]) for k in ("base", "e0", "e1"))
    for name in ("ties-default", "task-arithmetic-sweep-free", "slerp-pair"):
        assert recipes[name].source == "package" and recipes[name].version == "1.0"
    ties = recipes["ties-default"].render({"base": base, "experts": f"{e0},{e1}", "k": "0.3"})
    assert ties.params == {"k": 0.3, "scale": 1.0, "scope": "global"} and ties.output.repo is None
    assert [e.path for e in ties.experts] == [e0, e1]
    check_recipe(ties)
    ta = recipes["task-arithmetic-sweep-free"].render({"base": base, "experts": [e0, e1]})
    assert check_recipe(ta).params.scale == 0.3
    slerp = recipes["slerp-pair"].render({"first": e0, "second": e1})
    assert slerp.base == slerp.experts[0] and check_recipe(slerp).params.t == 0.5


# -- published merges: re-run and verify from the repo id -------------------------------------------------
@pytest.fixture(scope="module")
def hub_merge(local_hub, tiny_models, tmp_path_factory):
    """Tiny inputs pushed to the loopback Hub, merged from their repo ids, published with a card."""
    from hubmerge.publish import publish_merge

    api, user = local_hub.api(), local_hub.username
    inputs = {}
    for key in ("base", "e0", "e1"):
        repo = f"{user}/registry-tiny-{key}"
        api.create_repo(repo, exist_ok=True)
        api.upload_folder(repo_id=repo, folder_path=str(tiny_models[key]))
        inputs[key] = repo
    recipe = recipe_from_dict({"hubmerge": 1, "name": "registry-ties", "base": inputs["base"],
                               "experts": [inputs["e0"], inputs["e1"]], "method": "ties",
                               "params": {"k": 0.5, "scope": "global"}})
    output = tmp_path_factory.mktemp("hub_merge") / "merged"
    result = merge(recipe, output=output)
    repo = f"{user}/registry-ties-merge"
    commit = publish_merge(result, repo)
    return SimpleNamespace(repo=repo, commit=commit, inputs=inputs, output=output, api=api)


def test_published_merge_reruns_and_verifies(hub_merge, tmp_path, capsys):
    entry = registry.hub_recipe(hub_merge.repo)
    assert entry.version == hub_merge.commit and len(entry.document["base"]["revision"]) == 40

    out = tmp_path / "rerun"
    assert cli("run", f"hub://{hub_merge.repo}@{hub_merge.commit}", "-o", out, "--no-progress") == 0
    assert all(c.status == "exact" for c in compare_checkpoints(hub_merge.output, out))
    lineage = yaml.safe_load((out / "hubmerge_recipe.yaml").read_text())
    assert lineage["provenance"]["source"] == f"hub://{hub_merge.repo}@{hub_merge.commit}"
    assert "repo" not in lineage["output"]  # a re-run never pushes over the published repo

    capsys.readouterr()
    assert cli("recipes", "show", f"hub://{hub_merge.repo}") == 0
    assert f"{hub_merge.repo} {hub_merge.commit}" in capsys.readouterr().out
    assert cli("verify", hub_merge.repo, "--no-progress", "--all") == 0
    printed = capsys.readouterr().out
    assert "reproduced exactly" in printed and "exact      encoder.layer.0.attention.self.query.weight" in printed

    # Alter one tensor of the published repo in a new commit: verify reports it, and exits 1.
    name = "encoder.layer.0.attention.self.query.weight"
    state = load_file(hub_merge.output / "model.safetensors")
    state[name][0, 0] += 0.5
    tampered = tmp_path / "model.safetensors"
    save_file(state, tampered, metadata={"format": "pt"})
    hub_merge.api.upload_file(path_or_fileobj=str(tampered), path_in_repo="model.safetensors",
                              repo_id=hub_merge.repo, commit_message="alter one tensor")
    assert cli("verify", hub_merge.repo, "--no-progress") == 1
    captured = capsys.readouterr()
    assert f"differs    {name}  max|diff| 0.5" in captured.out and "MISMATCH — 1 of" in captured.err
    assert captured.out.count("differs") == 1  # only the altered tensor

    assert cli("verify", f"{hub_merge.repo}@{hub_merge.commit}", "--json") == 0  # the original still verifies
    assert json.loads(capsys.readouterr().out)["exact"]


def test_compare_checkpoints_reports_each_kind_of_difference(tmp_path):
    ref = {"same": torch.ones(3, 4), "close": torch.zeros(5), "nan": torch.tensor([float("nan"), 1.0]),
           "shape": torch.zeros(2, 2), "gone": torch.zeros(1), "rows": torch.arange(12.0).reshape(6, 2),
           "ids": torch.arange(3)}
    new = {**ref, "close": torch.full((5,), 1e-7), "nan": torch.tensor([0.0, 1.0]), "shape": torch.zeros(4),
           "rows": ref["rows"].clone(), "extra": torch.zeros(1)}
    del new["gone"]
    new["rows"][5, 1] += 2.0  # in the last block of rows
    for name, state in (("ref", ref), ("new", new)):
        (tmp_path / name).mkdir()
        save_file(state, tmp_path / name / "model.safetensors")
    checks = {c.name: c for c in compare_checkpoints(tmp_path / "ref", tmp_path / "new", atol=1e-6,
                                                     block_elements=4)}
    assert {n: c.status for n, c in checks.items()} == {
        "same": "exact", "close": "close", "nan": "differs", "shape": "shape", "gone": "missing",
        "rows": "differs", "ids": "exact", "extra": "unexpected"}
    assert checks["rows"].max_abs_diff == 2.0 and checks["nan"].max_abs_diff == math.inf


def test_recipes_search_finds_tagged_merges(hub_merge, capsys):
    found = {m.repo_id: m for m in registry.search_hub(method="ties")}
    assert hub_merge.repo in found and found[hub_merge.repo].method == "ties"
    assert set(found[hub_merge.repo].inputs) == set(hub_merge.inputs.values())
    untagged = set(hub_merge.inputs.values())
    assert not untagged & {m.repo_id for m in registry.search_hub()}  # plain models are not merges
    assert hub_merge.repo not in {m.repo_id for m in registry.search_hub(method="slerp")}
    assert cli("recipes", "search", "registry-ties", "--method", "ties") == 0
    assert f"{hub_merge.repo}  [ties]" in capsys.readouterr().out


def test_run_resolves_a_mergekit_only_repo(hub_merge, local_hub):
    inputs = hub_merge.inputs
    config = {"merge_method": "task_arithmetic", "base_model": inputs["base"], "parameters": {"lambda": 0.8},
              "models": [{"model": inputs["e0"], "parameters": {"weight": 1.0}},
                         {"model": inputs["e1"], "parameters": {"weight": 0.5}}]}
    repo = f"{local_hub.username}/registry-mergekit-only"
    hub_merge.api.create_repo(repo, exist_ok=True)
    info = hub_merge.api.upload_file(path_or_fileobj=yaml.safe_dump(config).encode(),
                                     path_in_repo="mergekit_config.yml", repo_id=repo)
    loaded = registry.load_recipe_arg(repo)
    assert loaded.recipe.method == "task_arithmetic"
    assert loaded.recipe.params == {"scale": 0.8, "weights": [1.0, 0.5]}
    assert loaded.recipe.output.path == str(registry.rerun_dir(repo, info.oid))
    assert loaded.recipe.output.repo is None
    with pytest.raises(RecipeError, match="holds no hubmerge_recipe.yaml"):
        registry.load_recipe_arg(inputs["base"])


# -- mergekit import --------------------------------------------------------------------------------------
def _mergekit_reference(case, base, experts, lam=1.0, weights=None, density=1.0, t=0.5):
    """mergekit's per-tensor maths, written from its documented formulas (independent of hubmerge)."""
    out = {}
    for name, theta in base.items():
        if not theta.is_floating_point():
            continue
        if case == "slerp":
            a, b = theta.double(), experts[0][name].double()
            v0, v1 = a / a.norm(), b / b.norm()
            dot = float((v0 * v1).sum())
            if abs(dot) > 0.9995:
                out[name] = (1 - t) * a + t * b
            else:
                omega = math.acos(dot)
                out[name] = (math.sin((1 - t) * omega) * a + math.sin(t * omega) * b) / math.sin(omega)
            continue
        taus = torch.stack([e[name].double() - theta.double() for e in experts])
        w = torch.tensor(weights or [1.0] * len(experts), dtype=torch.float64).view(-1, *[1] * theta.dim())
        if case == "task_arithmetic":
            out[name] = theta + lam * (w * taus).sum(0)
            continue
        keep = torch.zeros_like(taus)
        count = int(density * theta.numel())
        for i in range(len(experts)):
            keep[i].view(-1)[taus[i].abs().view(-1).argsort(descending=True)[:count]] = 1
        weighted = w * taus * keep
        majority = (weighted.sum(0) >= 0).double() * 2 - 1
        agree = (weighted.sign() == majority).double()
        divisor = (w * agree).sum(0)
        divisor[divisor == 0] = 1
        out[name] = theta + lam * (weighted * agree).sum(0) / divisor
    return out


@pytest.mark.parametrize("case", ["ties", "task_arithmetic", "slerp"])
def test_mergekit_import_agrees_with_the_hubmerge_recipe(case, tiny_models, tmp_path):
    base, e0, e1 = (str(tiny_models[k]) for k in ("base", "e0", "e1"))
    if case == "ties":
        config = {"merge_method": "ties", "base_model": base, "dtype": "float32",
                  "models": [{"model": base}] + [{"model": m, "parameters": {"density": 0.25, "weight": 1.0}}
                                                 for m in (e0, e1)],
                  "parameters": {"normalize": True, "int8_mask": True, "lambda": 0.9}}
        native = {"base": base, "experts": [e0, e1], "method": "ties",
                  "params": {"k": 0.25, "scale": 0.9, "scope": "tensor"}}
        reference = {"lam": 0.9, "density": 0.25}
    elif case == "task_arithmetic":
        config = {"merge_method": "task_arithmetic", "base_model": base, "parameters": {"lambda": 0.5},
                  "models": [{"model": e0, "parameters": {"weight": 0.7}},
                             {"model": e1, "parameters": {"weight": 0.3}}]}
        native = {"base": base, "experts": [e0, e1], "method": "task_arithmetic",
                  "params": {"scale": 0.5, "weights": [0.7, 0.3]}}
        reference = {"lam": 0.5, "weights": [0.7, 0.3]}
    else:  # slerp, written with a whole-model slice as mergekit configs often are
        config = {"merge_method": "slerp", "base_model": e0, "parameters": {"t": [{"value": 0.3}]},
                  "slices": [{"sources": [{"model": m, "layer_range": [0, 2]} for m in (e0, e1)]}]}
        native = {"base": e0, "experts": [e0, e1], "method": "slerp", "params": {"t": 0.3}}
        reference = {"t": 0.3}
    imported = import_mergekit(config, name=f"mk-{case}")
    assert imported.document["method"] == native["method"] and imported.document["params"] == native["params"]
    ours = merge(imported.recipe(), output=tmp_path / "imported")
    theirs = merge(recipe_from_dict({"hubmerge": 1, "name": "native", **native}), output=tmp_path / "native")
    assert all(c.status == "exact" for c in compare_checkpoints(theirs.output_dir, ours.output_dir))

    merged = load_file(ours.output_dir / "model.safetensors")
    if case == "slerp":
        expected = _mergekit_reference(case, *_states(tiny_models, "e0"), _states(tiny_models, "e1"),
                                       **reference)
    else:
        expected = _mergekit_reference(case, *_states(tiny_models, "base"), _states(tiny_models, "e0", "e1"),
                                       **reference)
    for name, value in expected.items():
        torch.testing.assert_close(merged[name].double(), value, atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("change, field, message", [
    ({"merge_method": "della"}, "merge_method", "mergekit method 'della' has no hubmerge equivalent yet"),
    ({"merge_method": "model_stock"}, "merge_method", "'model_stock' has no hubmerge equivalent yet"),
    ({"models": [{"model": "org/a", "parameters": {"weight": 1, "density": 0.5}},
                 {"model": "org/b", "parameters": {"weight": 1, "density": 0.7}}]},
     "models[1].parameters.density", "per-model densitys differ"),
    ({"models": [{"model": "org/a", "parameters": {"weight": 1}},
                 {"model": "org/b", "parameters": {"weight": 2}}]},
     "models[1].parameters.weight", "takes one weight for every expert"),
    ({"parameters": {"normalize": False}}, "parameters.normalize", "takes their mean"),
    ({"merge_method": "dare_ties"}, "parameters.normalize", "mergekit's default for dare_ties"),
    ({"parameters": {"lambda": [0.5, 1.0]}}, "parameters.lambda", "gradients"),
    ({"models": [{"model": "org/a+org/lora", "parameters": {"weight": 1}}]}, "models[0].model", "LoRA"),
    ({"models": [{"model": "org/a", "parameters": {"weight": 1, "gamma": 0.1}}]},
     "models[0].parameters.gamma", "not a parameter"),
    ({"tokenizer_source": "union"}, "tokenizer_source", "base model's tokenizer"),
])
def test_mergekit_import_refuses_what_has_no_equivalent(change, field, message):
    config = {"merge_method": "ties", "base_model": "org/base",
              "models": [{"model": m, "parameters": {"weight": 1}} for m in ("org/a", "org/b")],
              **change}
    with pytest.raises(MergekitImportError) as info:
        import_mergekit(config)
    assert info.value.field == field and message in str(info.value)


def test_mergekit_dare_and_linear_mapping_and_cli(tiny_models, tmp_path, capsys):
    models = [{"model": m, "parameters": {"weight": 0.5}} for m in ("org/a", "org/b")]
    dare = import_mergekit({"merge_method": "dare_linear", "base_model": "org/base", "models": models,
                            "parameters": {"density": 0.6, "lambda": 2.0, "rescale": False}})
    assert dare.document["params"] == {"density": 0.6, "seed": 0, "combine": "task_arithmetic",
                                       "scale": pytest.approx(2.0 * 0.5 * 0.6)}
    ties = import_mergekit({"merge_method": "dare_ties", "base_model": "org/base", "models": models,
                            "parameters": {"density": 0.6, "normalize": True}})
    assert ties.document["params"] == {"density": 0.6, "seed": 0, "combine": "ties", "k": 1.0, "scale": 1.0}
    linear = import_mergekit({"merge_method": "linear",
                              "models": [{"model": "org/a", "parameters": {"weight": 3}},
                                         {"model": "org/b", "parameters": {"weight": 1}}]})
    assert linear.document["base"] == {"repo": "org/a"}
    assert linear.document["params"] == {"weights": [3.0, 1.0], "normalize": True}
    with pytest.raises(MergekitImportError) as info:  # a slice that is not the whole model
        import_mergekit({"merge_method": "slerp", "base_model": str(tiny_models["e0"]),
                         "parameters": {"t": 0.5},
                         "slices": [{"sources": [{"model": str(tiny_models[k]), "layer_range": [0, 1]}
                                                 for k in ("e0", "e1")]}]})
    assert info.value.field == "slices[0].sources[0].layer_range" and "every layer" in str(info.value)

    config = tmp_path / "mergekit_config.yml"
    config.write_text(yaml.safe_dump({"merge_method": "ties", "base_model": str(tiny_models["base"]),
                                      "models": [{"model": str(tiny_models[k]),
                                                  "parameters": {"weight": 1.0, "density": 0.5}}
                                                 for k in ("e0", "e1")]}))
    target = tmp_path / "imported.yaml"
    assert cli("import-mergekit", config, "-o", target) == 0
    assert "note: " in capsys.readouterr().out
    assert target.read_text().startswith("# Translated from mergekit (ties)")
    recipe = load_recipe(target)
    assert recipe.name == "imported" and recipe.params == {"k": 0.5, "scale": 1.0, "scope": "tensor"}
    assert cli("import-mergekit", tmp_path / "missing.yml") == 2
