"""The plugin host: a third-party package installed with pip is found through its entry
point, listed, and usable from a recipe; a broken plugin is reported, never fatal."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

PLUGIN_SOURCE = '''
"""A third-party hubmerge plugin: theta_0 + (max over experts of tau), element-wise."""
import hubmerge
from hubmerge.method import MergeMethod, Params


class MaxParams(Params):
    scale: float = 1.0


class MaxDelta(MergeMethod):
    name = "max_delta"
    summary = "Add the element-wise largest task vector"
    Params = MaxParams

    def merge_tensor(self, group):
        return group.base + self.params.scale * group.deltas.max(dim=0).values


@hubmerge.hookimpl
def hubmerge_register_methods(register):
    register(MaxDelta)
'''

PYPROJECT = '''
[build-system]
requires = ["setuptools"]
build-backend = "setuptools.build_meta"
[project]
name = "{name}"
version = "0.0.1"
[project.entry-points.hubmerge]
{entry} = "{module}"
[tool.setuptools]
py-modules = ["{module}"]
'''


def _install(tmp_path, name, module, source, target):
    pkg = tmp_path / name
    pkg.mkdir()
    (pkg / "pyproject.toml").write_text(PYPROJECT.format(name=name, entry=module, module=module))
    (pkg / f"{module}.py").write_text(textwrap.dedent(source))
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                    "--target", str(target), str(pkg)], check=True, capture_output=True)


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("thirdparty")
    target = tmp_path / "site"
    _install(tmp_path, "hubmerge-maxdelta", "hubmerge_maxdelta", PLUGIN_SOURCE, target)
    _install(tmp_path, "hubmerge-broken", "hubmerge_broken", "raise ImportError('broken on purpose')\n", target)
    env = {**os.environ, "PYTHONPATH": str(target)}
    return env


def _cli(env, *args):
    return subprocess.run([sys.executable, "-m", "hubmerge.cli", *args], env=env, capture_output=True, text=True)


def test_listed_with_its_distribution_and_broken_one_reported(installed):
    out = _cli(installed, "plugins", "--json")
    assert out.returncode == 0, out.stderr
    listing = json.loads(out.stdout)
    methods = {m["name"]: m for m in listing["methods"]}
    assert methods["max_delta"]["distribution"] == "hubmerge-maxdelta 0.0.1"
    assert methods["max_delta"]["params_schema"]["properties"]["scale"]["default"] == 1.0
    failed = {f["name"]: f for f in listing["failed"]}
    assert "broken on purpose" in failed["hubmerge_broken"]["error"]


def test_recipe_uses_third_party_method(installed, tiny_models, tmp_path):
    from safetensors.torch import load_file

    from helpers import write_recipe

    out = tmp_path / "out"
    recipe = write_recipe(tmp_path / "r.yaml", base=str(tiny_models["base"]),
                          experts=[str(tiny_models["e0"]), str(tiny_models["e1"])], method="max_delta",
                          params={"scale": 0.5}, output={"path": str(out)})
    res = _cli(installed, "run", str(recipe), "--no-progress")
    assert res.returncode == 0, res.stderr
    merged = load_file(out / "model.safetensors")
    base = load_file(tiny_models["base"] / "model.safetensors")
    e0 = load_file(tiny_models["e0"] / "model.safetensors")
    e1 = load_file(tiny_models["e1"] / "model.safetensors")
    name = "encoder.layer.0.attention.self.query.weight"
    expected = base[name] + 0.5 * (e0[name] - base[name]).maximum(e1[name] - base[name])
    assert (merged[name] - expected).abs().max() < 1e-6


def test_load_plugins_env_restricts(installed):
    env = {**installed, "HUBMERGE_LOAD_PLUGINS": "hubmerge_maxdelta"}
    listing = json.loads(_cli(env, "plugins", "--json").stdout)
    assert [m["name"] for m in listing["methods"]] == ["max_delta"] and listing["failed"] == []


def test_unknown_method_suggests_close_names(installed, tiny_models, tmp_path):
    from helpers import write_recipe

    recipe = write_recipe(tmp_path / "r.yaml", base=str(tiny_models["base"]), experts=[str(tiny_models["e0"])],
                          method="max_delt", output={"path": str(tmp_path / "o")})
    res = _cli(installed, "run", str(recipe))
    assert res.returncode == 2
    assert res.stderr.strip().splitlines()[-1].startswith("error:")
    assert "r.yaml: method: unknown method 'max_delt'; did you mean 'max_delta'?" in res.stderr
    assert not (tmp_path / "o").exists()
