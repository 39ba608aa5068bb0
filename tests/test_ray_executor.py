"""The distributed executor: units, exact reductions, crash-safe shard writes, and Ray runs.

Fast tests run the units in-process (:class:`~hubmerge.distributed.LocalRunner`); the Ray ones
(``slow``: a local Ray instance takes 10-15 s to start here) skip when Ray is not installed.
Every comparison is byte for byte against :func:`hubmerge.engine.merge` (FlexMerge recipes:
:func:`hubmerge.flexmerge.run_flexmerge`).
"""

from __future__ import annotations

import os
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from helpers import write_recipe

from hubmerge.cli import main
from hubmerge.distributed import (
    ATTEMPT_PREFIX,
    INSTALL_HINT,
    DistributedError,
    LocalRunner,
    RayNotInstalledError,
    UnitShardWriter,
    UnitStats,
    file_sha256,
    import_ray,
    make_prepass_runner,
    merge_distributed,
    plan_recipe_units,
    reduce_statistics,
)
from hubmerge.engine import open_inputs, resolve_device, run_prepasses
from hubmerge.errors import RecipeError
from hubmerge.plugins import registered_methods
from hubmerge.recipe import check_recipe, load_recipe

SHARD = 30_000  # bytes: the tiny BERT becomes 3 output shards, so 3 units


def _recipe(tmp_path: Path, models, method: str, params: dict | None = None, name: str = "r.yaml", **extra):
    fields = {"base": str(models["base"]), "experts": [str(models[f"e{i}"]) for i in range(3)], "method": method,
              "params": params or {}, "output": {"path": str(tmp_path / "unused"), "shard_size": SHARD}, **extra}
    return write_recipe(tmp_path / name, **fields)


def _local(recipe_file: Path, out: Path):
    from hubmerge.engine import merge

    return merge(load_recipe(recipe_file), output=out, overwrite=True)


def assert_same_output(a: Path, b: Path) -> None:
    """Same files, same bytes (the resolved recipe's creation time aside)."""
    names_a = sorted(p.relative_to(a).as_posix() for p in a.rglob("*"))
    names_b = sorted(p.relative_to(b).as_posix() for p in b.rglob("*"))
    assert names_a == names_b
    for name in names_a:
        pa, pb = a / name, b / name
        if pa.is_dir():
            continue
        if Path(name).name in ("hubmerge_recipe.yaml", "README.md"):
            strip = lambda p: [ln for ln in p.read_text().splitlines() if "created:" not in ln]
            assert strip(pa) == strip(pb), name
        else:
            assert pa.read_bytes() == pb.read_bytes(), name


# -- in-process units (no Ray) ---------------------------------------------------------------------------------
@pytest.mark.parametrize("method,params", [
    ("task_arithmetic", {"scale": 0.7}),
    ("ties", {"k": 0.3, "scope": "global"}),
    ("ties", {"k": 0.3, "scope": "tensor"}),
    ("dare", {"density": 0.7, "seed": 5, "combine": "ties"}),
    ("consensus", {"inner": "ties"}),
])
def test_units_in_process_match_local_merge(tiny_models, tmp_path, method, params):
    if method not in registered_methods():
        pytest.skip(f"method {method!r} not registered here")
    recipe = _recipe(tmp_path, tiny_models, method, params)
    local = _local(recipe, tmp_path / "local")
    units = merge_distributed(load_recipe(recipe), LocalRunner(), output=tmp_path / "units", overwrite=True)
    assert units.extra["executor"]["units"] == 3
    assert units.bytes_read == local.bytes_read and units.bytes_written == local.bytes_written
    assert_same_output(local.output_dir, units.output_dir)


def test_plan_units_cover_the_model_once(tiny_models, tmp_path):
    recipe = load_recipe(_recipe(tmp_path, tiny_models, "ties", {"scope": "global"}))
    method = check_recipe(recipe)
    inputs = open_inputs(recipe)
    try:
        units = plan_recipe_units(recipe, method, inputs)
        names = [n for u in units for n in u.names]
        assert names == inputs.base_checkpoint.names()
        floating = {n for n, m in inputs.base_checkpoint.meta.items() if m.dtype.is_floating_point}
        assert [i.name for u in units for i in u.prepass_items if i.last] == [n for n in names if n in floating]
        assert [u.prepass_start for u in units] == [0, len(units[0].prepass_items),
                                                    len(units[0].prepass_items) + len(units[1].prepass_items)]
        # every unit reads its own tensors' bytes of the base and of each expert, nothing else
        for unit in units:
            base_bytes = sum(inputs.base_checkpoint.meta[n].nbytes for n in unit.names)
            assert sum(r.nbytes for r in unit.reads["base"]) == base_bytes
            assert set(unit.reads) == {"base", "e0", "e1", "e2"}
        assert sum(u.bytes_read for u in units) == inputs.bytes_per_pass
    finally:
        inputs.close()


def test_float_statistics_are_reduced_in_the_local_order():
    # floating additions do not commute bit for bit: the driver must add items in the local order
    values = [torch.tensor([1e16], dtype=torch.float64), torch.tensor([1.0], dtype=torch.float64),
              torch.tensor([-1e16], dtype=torch.float64), torch.tensor([1.0], dtype=torch.float64)]
    local = values[0].clone()
    for v in values[1:]:
        local += v
    parts = [UnitStats(1, {"n": torch.tensor([2])}, [{"g": values[2]}, {"g": values[3]}]),
             UnitStats(0, {"n": torch.tensor([2])}, [{"g": values[0]}, {"g": values[1]}])]
    totals = reduce_statistics(parts)
    assert torch.equal(totals["g"], local) and totals["n"].item() == 4
    pairwise = (values[0] + values[1]) + (values[2] + values[3])
    assert not torch.equal(pairwise, local)  # what per-unit float partial sums would have given
    with pytest.raises(DistributedError, match="integer for some"):
        reduce_statistics([UnitStats(0, {"g": torch.tensor([1])}, [{"g": values[0]}])])


def test_flexmerge_similarity_prepass_as_units_is_bit_identical(tiny_models, tmp_path):
    from hubmerge.flexmerge import BlockGram

    recipe = load_recipe(_recipe(tmp_path, tiny_models, "task_arithmetic"))
    inputs = open_inputs(recipe)
    try:
        names = inputs.base_checkpoint.names()
        floating = [n for n in names if inputs.base_checkpoint.meta[n].dtype.is_floating_point]
        block_of = {n: n.rsplit(".", 1)[0] for n in floating}
        local, units = BlockGram(block_of), BlockGram(block_of)
        cpu = resolve_device("cpu")
        run_prepasses(local, inputs, names, cpu, torch.float32)
        make_prepass_runner(LocalRunner(), unit_bytes=SHARD)(units, inputs, names, cpu, torch.float32)
        assert local.grams.keys() == units.grams.keys()
        assert all(torch.equal(local.grams[k], units.grams[k]) for k in local.grams)
    finally:
        inputs.close()


def test_a_unit_is_never_written_twice(tiny_models, tmp_path):
    recipe = load_recipe(_recipe(tmp_path, tiny_models, "task_arithmetic"))
    inputs = open_inputs(recipe)
    try:
        unit = plan_recipe_units(recipe, check_recipe(recipe), inputs)[0]
    finally:
        inputs.close()
    spec = unit.specs[0]

    def attempt(fill: float):
        writer = UnitShardWriter(tmp_path, unit)
        for s in unit.specs:
            writer.write(s.name, torch.full(s.shape, fill if s is spec else 0.0).to(s.dtype))
        return writer.commit()

    digest, won = attempt(1.0)
    final = tmp_path / unit.file_name
    assert won and final.stat().st_size == unit.file_bytes
    assert attempt(1.0) == (digest, False)  # a retry that also finished: the first shard is kept
    with pytest.raises(DistributedError, match="different bytes"):
        attempt(2.0)
    assert file_sha256(final) == digest
    # an incomplete attempt never reaches the shard's name
    writer = UnitShardWriter(tmp_path, unit)
    with pytest.raises(DistributedError, match="never written"):
        writer.commit()
    writer.abort()
    assert not list(tmp_path.glob(f"{ATTEMPT_PREFIX}*"))


def test_missing_ray_says_how_to_install(tiny_models, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
    with pytest.raises(RayNotInstalledError, match=r"install 'hubmerge\[ray\]'"):
        import_ray()
    recipe = _recipe(tmp_path, tiny_models, "task_arithmetic")
    code = main(["run", str(recipe), "--executor", "ray", "--output", str(tmp_path / "out"), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and INSTALL_HINT in err and "hubmerge[ray]" in err
    assert not (tmp_path / "out").exists()


def test_import_of_hubmerge_does_not_import_ray():
    import subprocess

    code = "import sys, hubmerge, hubmerge.distributed, hubmerge.cli; print('ray' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_dry_run_prints_the_units(tiny_models, tmp_path, capsys):
    recipe = _recipe(tmp_path, tiny_models, "ties")
    assert main(["run", str(recipe), "--executor", "ray", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "executor: ray, 3 units" in out and "unit 3/3 model-00003-of-00003.safetensors" in out
    assert "x 3 passes" in out


# -- FlexMerge deployments as units ------------------------------------------------------------------------------
FLEX_CASES = [
    ("task_arithmetic", {}, [1, "1.5x"]),
    ("ties", {"k": 0.3, "scope": "global"}, "all"),  # per-group pre-passes as units, every size
]


def _flex_recipe(tmp_path: Path, models, inner: str, inner_params: dict, sizes, name: str = "flex.yaml"):
    return _recipe(tmp_path, models, "task_arithmetic", name=name,
                   flexmerge={"sizes": sizes, "inner": inner, "inner_params": inner_params})


def _local_flex(recipe_file: Path, out: Path):
    from hubmerge.flexmerge import run_flexmerge

    return run_flexmerge(load_recipe(recipe_file), output=out, overwrite=True)


def assert_same_deployments(local, other) -> None:
    """Every file byte for byte (recipes' creation time aside): shards, indexes, manifests, flexmerge.json."""
    import json

    assert_same_output(Path(local.output_dir), Path(other.output_dir))
    assert [p.size.label for p in local.deployments] == [p.size.label for p in other.deployments]
    for plan in other.deployments:
        manifest = json.loads((plan.path / "deployment.json").read_text())
        assert manifest["tasks"] == local.tasks and manifest["storage"]["bytes"] == plan.storage_bytes


@pytest.mark.parametrize("inner,params,sizes", FLEX_CASES)
def test_flexmerge_units_in_process_match_local_run(tiny_models, tmp_path, inner, params, sizes):
    from hubmerge.distributed import flexmerge_distributed

    if inner not in registered_methods():
        pytest.skip(f"method {inner!r} not registered here")
    recipe = _flex_recipe(tmp_path, tiny_models, inner, params, sizes)
    local = _local_flex(recipe, tmp_path / "local")
    units = flexmerge_distributed(load_recipe(recipe), LocalRunner(), output=tmp_path / "units", overwrite=True)
    info = units.executor
    shards = sum(len(list(p.path.glob("deployment*.safetensors"))) for p in units.deployments)
    assert info["units"] == shards > len(units.deployments)  # more than one shard per size
    assert all(label.split("/")[0].startswith("size-") for label in info["shard_sha256"])
    assert_same_deployments(local, units)
    assert not list(Path(units.output_dir).rglob(f"{ATTEMPT_PREFIX}*"))


def test_flexmerge_dry_run_with_ray_prints_the_plan(tiny_models, tmp_path, capsys):
    recipe = _flex_recipe(tmp_path, tiny_models, "task_arithmetic", {}, [1, 2])
    out = tmp_path / "out"
    assert main(["run", str(recipe), "--executor", "ray", "--dry-run", "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "size 2: ->" in printed and "executor: ray" in printed and not out.exists()


def test_distributed_refusals_name_the_recipe_field(tiny_models, tmp_path, capsys):
    # adapter output: refused before anything runs, naming output.format
    recipe = _recipe(tmp_path, tiny_models, "task_arithmetic", output={"path": str(tmp_path / "o"),
                                                                       "format": "adapter"})
    assert main(["run", str(recipe), "--executor", "ray", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "output.format" in err and "distributed executor" in err
    # a per-task deployment method (EMR, TALL): refused naming `method`
    deployment_methods = [n for n, r in registered_methods().items() if getattr(r.method, "output", "") == "deployment"]
    if deployment_methods:
        recipe = _recipe(tmp_path, tiny_models, deployment_methods[0], name="d.yaml")
        assert main(["run", str(recipe), "--executor", "ray", "--no-progress"]) == 2
        err = capsys.readouterr().err
        assert "method" in err and "per-task deployment" in err and "locally" in err
    # a method that learns from samples (AdaMerging): refused naming `method`
    if "adamerging" in registered_methods():
        recipe = _recipe(tmp_path, tiny_models, "adamerging", name="a.yaml", data={"path": str(tmp_path)})
        assert main(["run", str(recipe), "--executor", "ray", "--no-progress"]) == 2
        err = capsys.readouterr().err
        assert "method" in err and "learns from samples" in err and "locally" in err
    # a FlexMerge recipe handed to the single-output entry point is sent to the FlexMerge one
    flex = load_recipe(_flex_recipe(tmp_path, tiny_models, "task_arithmetic", {}, [1]))
    with pytest.raises(RecipeError, match="flexmerge_distributed") as exc:
        merge_distributed(flex, LocalRunner(), output=tmp_path / "x")
    assert exc.value.field == "flexmerge"
    assert not (tmp_path / "o").exists() and not (tmp_path / "x").exists()


# -- Ray --------------------------------------------------------------------------------------------------------
FAULTS = '''
import os
from hubmerge.hookspecs import hookimpl
from hubmerge_plugins.task_arithmetic import Params, TaskArithmetic


class CrashParams(Params):
    crash_marker: str = ""
    crash_tensor: str = ""
    always: bool = False


class CrashOnce(TaskArithmetic):
    """task_arithmetic whose worker process dies the first time it meets ``crash_tensor``."""

    name = "test_crash_once"
    Params = CrashParams

    def merge_tensor(self, group):
        p = self.params
        if group.name == p.crash_tensor and (p.always or not os.path.exists(p.crash_marker)):
            if not p.always:
                with open(p.crash_marker, "w") as fh:
                    fh.write(str(os.getpid()))
            os._exit(1)  # no clean-up, no exception: the worker is gone
        return super().merge_tensor(group)


class Plugin:
    @hookimpl
    def hubmerge_register_methods(self, register):
        register(CrashOnce)
'''


@pytest.fixture(scope="module")
def ray_local(tmp_path_factory):
    """A local Ray instance (2 CPUs) whose workers can import the fault-injection plugin."""
    try:
        import ray
    except ImportError:  # not installed (or broken): the Ray tests skip, the in-process ones still run
        pytest.skip("Ray is not installed (pip install 'hubmerge[ray]')")
    from hubmerge.plugins import get_plugin_manager

    faults = tmp_path_factory.mktemp("ray_faults")
    (faults / "hubmerge_test_faults.py").write_text(textwrap.dedent(FAULTS))
    sys.path.insert(0, str(faults))
    old = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(faults), old) if p)  # workers inherit it
    import hubmerge_test_faults

    pm = get_plugin_manager()
    plugin = hubmerge_test_faults.Plugin()
    pm.register(plugin, name="ray-test-faults")
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        yield ray
    finally:
        if started:
            ray.shutdown()
        pm.unregister(plugin)
        sys.path.remove(str(faults))
        if old is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = old


@pytest.mark.slow
@pytest.mark.parametrize("method,params", [
    ("task_arithmetic", {"scale": 0.7}),
    ("ties", {"k": 0.3, "scope": "global"}),
    ("ties", {"k": 0.3, "scope": "tensor"}),
])
def test_ray_run_is_bit_identical(ray_local, tiny_models, tmp_path, method, params):
    from hubmerge.distributed import merge_with_ray

    recipe = _recipe(tmp_path, tiny_models, method, params)
    local = _local(recipe, tmp_path / "local")
    result = merge_with_ray(load_recipe(recipe), workers=2, output=tmp_path / "ray", overwrite=True)
    info = result.extra["executor"]
    assert info["units"] == 3 and info["runner"].startswith("ray")
    assert len(info["shard_sha256"]) == 3
    assert_same_output(local.output_dir, result.output_dir)
    assert not list(Path(result.output_dir).glob(f"{ATTEMPT_PREFIX}*"))


@pytest.mark.slow
def test_ray_lapack_method_identical_with_the_same_thread_count(ray_local, tiny_models, tmp_path):
    from hubmerge.distributed import merge_with_ray

    recipe = _recipe(tmp_path, tiny_models, "tsv")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a Ray worker with num_cpus=1 computes with one thread
    try:
        local = _local(recipe, tmp_path / "local")
    finally:
        torch.set_num_threads(threads)
    result = merge_with_ray(load_recipe(recipe), workers=2, output=tmp_path / "ray", overwrite=True)
    assert_same_output(local.output_dir, result.output_dir)


@pytest.mark.slow
def test_ray_similarity_prepass_is_bit_identical(ray_local, tiny_models, tmp_path):
    from hubmerge.distributed import RayRunner
    from hubmerge.flexmerge import BlockGram

    recipe = load_recipe(_recipe(tmp_path, tiny_models, "task_arithmetic"))
    inputs = open_inputs(recipe)
    try:
        names = inputs.base_checkpoint.names()
        block_of = {n: n.rsplit(".", 1)[0] for n in names if inputs.base_checkpoint.meta[n].dtype.is_floating_point}
        local, remote = BlockGram(block_of), BlockGram(block_of)
        run_prepasses(local, inputs, names, resolve_device("cpu"), torch.float32)
        make_prepass_runner(RayRunner(workers=2), unit_bytes=SHARD)(remote, inputs, names, resolve_device("cpu"),
                                                                    torch.float32)
        assert all(torch.equal(local.grams[k], remote.grams[k]) for k in local.grams)
    finally:
        inputs.close()


@pytest.mark.slow
def test_ray_worker_killed_mid_run_still_gives_the_same_output(ray_local, tiny_models, tmp_path):
    from hubmerge.distributed import merge_with_ray

    marker = tmp_path / "crashed.pid"
    target = "encoder.layer.1.attention.self.query.weight"  # in the second or third shard
    recipe = load_recipe(_recipe(tmp_path, tiny_models, "test_crash_once",
                                 {"scale": 0.7, "crash_marker": str(marker), "crash_tensor": target}))
    reference = _local(_recipe(tmp_path, tiny_models, "task_arithmetic", {"scale": 0.7}, name="ref.yaml"),
                       tmp_path / "local")
    result = merge_with_ray(recipe, workers=2, max_retries=2, output=tmp_path / "ray", overwrite=True)
    assert marker.is_file() and int(marker.read_text()) != os.getpid()  # a worker really died
    assert result.extra["executor"]["dead_attempts_removed"] >= 1  # its partial shard was cleaned up
    out = Path(result.output_dir)
    for shard in sorted(out.glob("model-*.safetensors")):
        assert shard.read_bytes() == (reference.output_dir / shard.name).read_bytes()
    assert (out / "model.safetensors.index.json").read_bytes() == \
        (reference.output_dir / "model.safetensors.index.json").read_bytes()
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in reference.output_dir.iterdir())


@pytest.mark.slow
def test_ray_worker_dying_every_time_fails_cleanly(ray_local, tiny_models, tmp_path):
    from hubmerge.distributed import merge_with_ray

    recipe = load_recipe(_recipe(tmp_path, tiny_models, "test_crash_once", {
        "always": True, "crash_tensor": "embeddings.word_embeddings.weight"}))
    with pytest.raises(DistributedError, match="model-00001-of-00003.safetensors"):
        merge_with_ray(recipe, workers=2, max_retries=1, output=tmp_path / "ray", overwrite=True)
    assert not (tmp_path / "ray").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".hubmerge-partial-")]


@pytest.mark.slow
def test_cli_run_with_ray(ray_local, tiny_models, tmp_path, capsys):
    recipe = _recipe(tmp_path, tiny_models, "ties", {"scope": "global"})
    local = _local(recipe, tmp_path / "local")
    out = tmp_path / "cli"
    assert main(["run", str(recipe), "--executor", "ray", "--workers", "2", "--output", str(out),
                 "--no-progress"]) == 0
    assert "merged" in capsys.readouterr().out
    assert_same_output(local.output_dir, out)


@pytest.mark.slow
@pytest.mark.parametrize("inner,params,sizes", FLEX_CASES)
def test_ray_flexmerge_is_bit_identical(ray_local, tiny_models, tmp_path, inner, params, sizes):
    from hubmerge.distributed import flexmerge_with_ray

    if inner not in registered_methods():
        pytest.skip(f"method {inner!r} not registered here")
    recipe = _flex_recipe(tmp_path, tiny_models, inner, params, sizes)
    local = _local_flex(recipe, tmp_path / "local")
    result = flexmerge_with_ray(load_recipe(recipe), workers=2, output=tmp_path / "ray", overwrite=True)
    info = result.executor
    assert info["runner"].startswith("ray") and info["units"] > len(result.deployments)
    assert_same_deployments(local, result)
    assert not list(Path(result.output_dir).rglob(f"{ATTEMPT_PREFIX}*"))


@pytest.mark.slow
def test_ray_flexmerge_worker_killed_mid_run_still_gives_the_same_output(ray_local, tiny_models, tmp_path):
    from hubmerge.distributed import flexmerge_with_ray

    marker = tmp_path / "crashed.pid"
    target = "encoder.layer.1.attention.self.query.weight"  # merged (size 1: one group), not in the first shard
    recipe = _flex_recipe(tmp_path, tiny_models, "test_crash_once",
                          {"scale": 0.7, "crash_marker": str(marker), "crash_tensor": target}, [1])
    result = flexmerge_with_ray(load_recipe(recipe), workers=2, max_retries=2, output=tmp_path / "ray", overwrite=True)
    assert marker.is_file() and int(marker.read_text()) != os.getpid()  # a worker really died
    assert result.executor["dead_attempts_removed"] >= 1  # its partial shard was cleaned up
    local = _local_flex(recipe, tmp_path / "local")  # the marker exists now: no crash in this process
    assert_same_deployments(local, result)


@pytest.mark.slow
def test_ray_flexmerge_worker_dying_every_time_fails_cleanly(ray_local, tiny_models, tmp_path):
    from hubmerge.distributed import flexmerge_with_ray

    recipe = _flex_recipe(tmp_path, tiny_models, "test_crash_once",
                          {"always": True, "crash_tensor": "encoder.layer.0.attention.self.query.weight"}, [1])
    with pytest.raises(DistributedError, match=r"size-1/deployment-\d{5}-of-\d{5}\.safetensors"):
        flexmerge_with_ray(load_recipe(recipe), workers=2, max_retries=1, output=tmp_path / "ray", overwrite=True)
    assert not (tmp_path / "ray").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".hubmerge-partial-")]


@pytest.mark.slow
def test_cli_run_flexmerge_with_ray(ray_local, tiny_models, tmp_path, capsys):
    recipe = _flex_recipe(tmp_path, tiny_models, "task_arithmetic", {}, [2])
    local = _local_flex(recipe, tmp_path / "local")
    out = tmp_path / "cli"
    assert main(["run", str(recipe), "--executor", "ray", "--workers", "2", "--output", str(out),
                 "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "write units on ray" in printed and "size-2" in printed
    assert_same_output(local.output_dir, out)
