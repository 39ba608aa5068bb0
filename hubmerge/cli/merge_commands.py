"""``hubmerge plugins``, ``validate`` and ``run``."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from tqdm import tqdm

from ..engine import Progress


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Register the merge commands on the CLI's sub-parsers."""
    p = sub.add_parser("plugins", help="list merge methods and the plugins that provide them")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(handler=cmd_plugins)

    p = sub.add_parser("validate", help="check a recipe without running it")
    p.add_argument("recipe", help="recipe YAML file, registered recipe (NAME[@VERSION]) or published merge (org/name[@rev], hub://...)")
    p.add_argument("--schema-only", action="store_true", help="do not resolve the models")
    _add_set_option(p)
    p.set_defaults(handler=cmd_validate)

    p = sub.add_parser("run", help="run a merge recipe, a registered recipe, or re-run a published merge")
    p.add_argument("recipe", help="recipe YAML file, registered recipe (NAME[@VERSION]) or published merge (org/name[@rev], hub://...)")
    _add_set_option(p)
    p.add_argument("--output", "-o", help="output directory (overrides output.path)")
    p.add_argument("--device", help="cpu, cuda, cuda:N or auto (overrides the recipe)")
    p.add_argument("--overwrite", action="store_true", help="replace an output directory hubmerge did not write")
    p.add_argument("--dry-run", action="store_true", help="print the plan and stop")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--push", action="store_true", help="push the result to output.repo (or --repo)")
    p.add_argument("--repo", help="Hub repo to push to (overrides output.repo; implies --push)")
    _add_executor_options(p)
    p.set_defaults(handler=cmd_run)


def cmd_plugins(args: argparse.Namespace) -> int:
    """List methods with their source plugin and distribution, and plugins that failed."""
    from ..plugins import load_failures, registered_methods

    methods = registered_methods()
    failures = load_failures()
    if args.json:
        print(json.dumps({
            "methods": [{**m.method.describe(), "plugin": m.plugin, "distribution": m.distribution}
                        for m in methods.values()],
            "failed": [f.__dict__ for f in failures],
        }, indent=2))
        return 0
    width = max((len(n) for n in methods), default=4)
    print("Methods:")
    for name, reg in methods.items():
        print(f"  {name:<{width}}  {reg.method.summary}  [{reg.distribution}]")
    print("Adapter kinds: lora, dora, ia3 (PEFT)")
    for failure in failures:
        print(f"  FAILED plugin {failure.name!r} ({failure.distribution}): {failure.error}")
    return 0


# -- recipe registry (hubmerge.registry): `run`/`validate` take a file, a registered recipe or a Hub repo ------
def _add_set_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--set", dest="set", action="append", metavar="NAME=VALUE",
                   help="value of a recipe variable (repeat); `hubmerge recipes show NAME` lists them")


def _load_checked(path: str, assignments: list[str] | None = None):
    from ..recipe import check_recipe
    from ..registry import load_recipe_arg, parse_assignments

    loaded = load_recipe_arg(path, variables=parse_assignments(assignments))
    method = check_recipe(loaded.recipe, file=loaded.file)
    return loaded.recipe, method
# -- end recipe registry ---------------------------------------------------------------------------------------


# -- distributed executor (hubmerge.distributed): `run --executor ray [--address A] [--workers N]` ----------------
def _add_executor_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--executor", choices=["local", "ray"], default="local",
                   help="local: this process (default); ray: one task per output shard (FlexMerge: per shard of "
                        "each size's deployment) on a Ray cluster (inputs and output on a path every worker sees)")
    p.add_argument("--address", help="Ray address to connect to (default: RAY_ADDRESS, else a local Ray instance)")
    p.add_argument("--workers", type=int, metavar="N", help="most Ray tasks at once (default: what Ray schedules)")
    p.add_argument("--max-retries", type=int, default=3, metavar="N",
                   help="times Ray re-runs a shard whose worker died (default 3)")
    p.add_argument("--cpus-per-worker", type=float, default=1, metavar="C",
                   help="CPUs (= torch threads) per Ray task (default 1)")


def _distributed(args: argparse.Namespace) -> bool:
    return getattr(args, "executor", "local") == "ray"


def _check_executor(args: argparse.Namespace, recipe, method) -> None:
    """Refuse what the Ray executor cannot run, before any work."""
    from ..errors import RecipeError

    if not _distributed(args):
        return
    from ..distributed import check_distributable

    check_distributable(recipe, method, file=args.recipe)  # EMR/TALL deployments, adapter outputs: local only
    if args.workers is not None and args.workers < 1:
        raise RecipeError("--workers must be at least 1", file=args.recipe)
    if args.max_retries < 0:
        raise RecipeError("--max-retries must be 0 or more", file=args.recipe)
    if args.cpus_per_worker <= 0:
        raise RecipeError("--cpus-per-worker must be positive", file=args.recipe)


def _print_units(recipe, method, inputs) -> None:
    """The dry run's unit plan (one Ray task per output shard)."""
    from ..distributed import describe_units, plan_recipe_units

    units = plan_recipe_units(recipe, method, inputs)
    print(f"executor: ray, {len(units)} units (one task per output shard)")
    for line in describe_units(units, method.prepasses + 1):
        print(f"  {line}")


def _merge_with_executor(args: argparse.Namespace, recipe, progress):
    """``engine.merge`` or, with ``--executor ray``, ``distributed.merge_with_ray`` (same output)."""
    from ..engine import merge

    if not _distributed(args):
        return merge(recipe, output=args.output, device=args.device, overwrite=args.overwrite,
                     progress=progress, file=args.recipe)
    from ..distributed import merge_with_ray

    return merge_with_ray(recipe, address=args.address, workers=args.workers, max_retries=args.max_retries,
                          output=args.output, device=args.device, overwrite=args.overwrite, progress=progress,
                          file=args.recipe, num_cpus=args.cpus_per_worker)


def _flexmerge_with_executor(args: argparse.Namespace, recipe) -> int:
    """``hubmerge run --executor ray`` on a FlexMerge recipe: the deployments written by Ray tasks.

    Prints and publishes as the local run does (:func:`hubmerge.cli.flexmerge_commands.run_recipe`).
    """
    from ..distributed import flexmerge_with_ray
    from ..flexmerge import check_flexmerge
    from .flexmerge_commands import _publish, _push_target, print_flexmerge_result

    check_flexmerge(recipe, file=args.recipe)
    repo = _push_target(args, recipe)
    bar = _Bar(enabled=not args.no_progress)
    try:
        result = flexmerge_with_ray(recipe, address=args.address, workers=args.workers, max_retries=args.max_retries,
                                    num_cpus=args.cpus_per_worker, output=args.output, device=args.device,
                                    overwrite=args.overwrite, progress=bar, file=args.recipe)
    finally:
        bar.close()
    info = result.executor
    print_flexmerge_result(result, f", {info.get('units', 0)} write units on {info.get('runner', 'ray')}")
    if repo:
        _publish(result, repo, recipe)
    return 0
# -- end distributed executor ---------------------------------------------------------------------------------


def cmd_validate(args: argparse.Namespace) -> int:
    """Validate schema, method and parameters, then (unless --schema-only) resolve and check inputs."""
    from ..engine import open_inputs

    recipe, method = _load_checked(args.recipe, args.set)
    if recipe.flexmerge is not None:
        from ..flexmerge import check_flexmerge

        check_flexmerge(recipe, file=args.recipe)
    # -- per-task deployments (hubmerge.deployment) --------------------------------------------------------
    elif method.output == "deployment":
        from ..deployment import check_deployment

        check_deployment(recipe, file=args.recipe)
    # -- end per-task deployments ------------------------------------------------------------------------
    if not args.schema_only:
        inputs = open_inputs(recipe)
        tensors = len(inputs.base_checkpoint.meta)
        inputs.close()
        print(f"{args.recipe}: ok — {method.name} over {len(recipe.experts)} experts, {tensors} tensors")
    else:
        print(f"{args.recipe}: schema ok — {method.name} over {len(recipe.experts)} experts")
    return 0


class _Bar:
    """A tqdm bar over bytes, one per stage."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.bar: tqdm | None = None
        self.stage = None

    def __call__(self, event: Progress) -> None:
        if not self.enabled:
            return
        if event.stage != self.stage:
            self.close()
            self.stage = event.stage
            self.bar = tqdm(total=event.bytes_total, desc=event.stage, unit="B", unit_scale=True,
                            unit_divisor=1024, file=sys.stderr)
        self.bar.n = event.bytes_done
        self.bar.set_postfix_str(f"{event.tensors_done}/{event.tensors_total} tensors", refresh=False)
        self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def cmd_run(args: argparse.Namespace) -> int:
    """Run a recipe with a progress bar and print where the result went."""
    from ..engine import open_inputs
    from ..writer import plan_shards

    recipe, method = _load_checked(args.recipe, args.set)
    _check_executor(args, recipe, method)  # distributed executor
    # -- per-task deployments: FlexMerge sizes, EMR / TALL (hubmerge.deployment) ----------------------------
    if recipe.flexmerge is not None or method.output == "deployment":
        from .flexmerge_commands import run_recipe

        if _distributed(args) and recipe.flexmerge is not None:  # distributed executor
            if not args.dry_run:
                return _flexmerge_with_executor(args, recipe)
            code = run_recipe(args, recipe)
            print("executor: ray, after the similarity pass (units of output.shard_size): one task per shard of "
                  "each size's deployment")
            return code
        return run_recipe(args, recipe)
    # -- end per-task deployments ------------------------------------------------------------------------
    if args.dry_run:
        from ..engine import output_specs

        inputs = open_inputs(recipe)
        try:
            out_dtype = None
            if recipe.output.dtype:
                import torch

                out_dtype = getattr(torch, recipe.output.dtype)
            shards = plan_shards(output_specs(inputs.base_checkpoint, out_dtype), recipe.output.shard_size)
            print(f"method: {method.name} {method.params.model_dump(mode='json')}")
            print(f"base: {recipe.base} -> {inputs.base.directory}")
            for expert in inputs.experts:
                print(f"expert: {expert.label} ({type(expert).__name__}) -> {expert.resolved.directory}")
            passes = method.prepasses + 1
            print(f"passes over the inputs: {passes} ({inputs.bytes_per_pass / 1e6:.1f} MB each)")
            for i, shard in enumerate(shards, 1):
                print(f"shard {i}/{len(shards)}: {len(shard)} tensors, {sum(s.nbytes for s in shard) / 1e6:.1f} MB")
            if _distributed(args):  # distributed executor
                _print_units(recipe, method, inputs)
            print(f"output: {Path(args.output or recipe.output.path or '?')}")
        finally:
            inputs.close()
        return 0
    bar = _Bar(enabled=not args.no_progress)
    try:
        result = _merge_with_executor(args, recipe, bar)  # engine.merge unless --executor ray
    finally:
        bar.close()
    print(f"merged {result.tensors} tensors with {result.method.name} in {result.seconds:.1f}s "
          f"on {result.device} -> {result.output_dir}")
    repo = args.repo or (recipe.output.repo if (args.push or recipe.output.repo) else None)
    if args.push and not repo:
        from ..errors import RecipeError

        raise RecipeError("--push needs output.repo in the recipe or --repo", field="output.repo", file=args.recipe)
    if repo:
        from ..publish import publish_merge

        commit = publish_merge(result, repo, private=recipe.output.private)
        print(f"pushed to {repo} at {commit[:12]}")
    return 0
