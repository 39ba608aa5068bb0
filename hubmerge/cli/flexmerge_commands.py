"""``hubmerge export-task`` and the deployment branch of ``hubmerge run``.

``hubmerge run RECIPE`` on a recipe with a ``flexmerge:`` section or a deployment method
(``emr``, ``tall``) calls :func:`run_recipe` (from ``merge_commands.cmd_run``), which writes the
deployment(s) and, with ``output.repo`` / ``--push`` / ``--repo``, publishes them
(:func:`hubmerge.publish.publish_deployment`: FlexMerge sizes on branches ``size-<s>`` of one
repo, the overview on ``main``; an EMR/TALL deployment on ``main``).
``hubmerge export-task DIR TASK OUT`` writes one task of a deployment as an ordinary checkpoint.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Register ``export-task`` on the CLI's sub-parsers."""
    p = sub.add_parser("export-task", help="write one task of a deployment (FlexMerge size, EMR...) as a "
                                           "standalone checkpoint")
    p.add_argument("deployment", help="deployment directory (e.g. out/merge/size-2) or Hub repo id")
    p.add_argument("task", help="task name (an expert's label in the recipe)")
    p.add_argument("out", help="output directory")
    p.add_argument("--revision", help="Hub revision (branch, tag or commit) of a deployment repo")
    p.add_argument("--overwrite", action="store_true", help="replace an output directory hubmerge did not write")
    p.set_defaults(handler=cmd_export_task)


def cmd_export_task(args: argparse.Namespace) -> int:
    """Export one task and print where it went."""
    from ..deployment import export_task

    out = export_task(args.deployment, args.task, args.out, revision=args.revision, overwrite=args.overwrite)
    print(f"exported task {args.task!r} -> {out}")
    return 0


def _push_target(args: argparse.Namespace, recipe) -> str | None:
    """The repo to publish to: ``--repo``, else ``output.repo`` (as ``hubmerge run`` does for merges)."""
    repo = getattr(args, "repo", None) or recipe.output.repo
    if getattr(args, "push", False) and not repo:
        from ..errors import RecipeError

        raise RecipeError("--push needs output.repo in the recipe or --repo", field="output.repo", file=args.recipe)
    return repo


def run_recipe(args: argparse.Namespace, recipe) -> int:
    """``hubmerge run`` for a recipe with ``flexmerge:`` (every size) or a deployment method (EMR, TALL).

    Prints the storage of each deployment and publishes them when a repo is given. Uses
    ``args.output``, ``args.device``, ``args.overwrite``, ``args.dry_run``, ``args.no_progress``,
    ``args.push``, ``args.repo`` and ``args.recipe`` (the file name, for errors).
    """
    from .merge_commands import _Bar

    if recipe.flexmerge is None:
        return _run_deployment(args, recipe)
    from ..flexmerge import check_flexmerge, run_flexmerge

    if getattr(args, "dry_run", False):
        return _dry_run(args, recipe)
    check_flexmerge(recipe, file=args.recipe)
    repo = _push_target(args, recipe)
    bar = _Bar(enabled=not getattr(args, "no_progress", False))
    try:
        result = run_flexmerge(recipe, output=args.output, device=args.device, overwrite=args.overwrite,
                               progress=bar, file=args.recipe)
    finally:
        bar.close()
    print_flexmerge_result(result)
    if repo:
        _publish(result, repo, recipe)
    return 0


def print_flexmerge_result(result, where: str = "") -> None:
    """The run's summary line and one row per size (merges, model-equivalents, MB, directory)."""
    print(f"flexmerge: {len(result.order)} merges over {len(result.blocks)} blocks of {len(result.tasks)} experts, "
          f"inner {result.inner.name} in {result.seconds:.1f}s on {result.device}{where}")
    print(f"{'size':>8}  {'merges':>6}  {'models':>8}  {'MB':>10}  directory")
    for row in result.storage_table():
        print(f"{row['size']:>8}  {row['merges']:>6}  {row['model_equivalents']:>8.3f}  "
              f"{row['bytes'] / 1e6:>10.1f}  {row['path']}")


def _publish(result, repo: str, recipe) -> None:
    from ..publish import publish_deployment

    commits = publish_deployment(result, repo, private=recipe.output.private)
    for revision, commit in commits.items():
        print(f"pushed to {repo}@{revision} at {commit[:12]}")


def _run_deployment(args: argparse.Namespace, recipe) -> int:
    """EMR / TALL: one deployment directory, its storage, and the push."""
    from ..deployment import check_deployment, run_deployment
    from .merge_commands import _Bar

    check_deployment(recipe, file=args.recipe)
    if getattr(args, "dry_run", False):
        return _dry_run_deployment(args, recipe)
    repo = _push_target(args, recipe)
    bar = _Bar(enabled=not getattr(args, "no_progress", False))
    try:
        result = run_deployment(recipe, output=args.output, device=args.device, overwrite=args.overwrite,
                                progress=bar, file=args.recipe)
    finally:
        bar.close()
    info = result.extra["deployment"]
    storage = info["storage"]
    print(f"{info['kind']} deployment of {len(info['tasks'])} tasks in {result.seconds:.1f}s on {result.device}: "
          f"{storage['model_equivalents']:.3f} model-equivalents ({storage['bytes'] / 1e6:.1f} MB) -> "
          f"{result.output_dir}")
    if repo:
        _publish(result, repo, recipe)
    return 0


def _dry_run_deployment(args: argparse.Namespace, recipe) -> int:
    import torch

    from ..deployment import check_deployment, masked_storage_bytes
    from ..engine import open_inputs, output_specs

    method = check_deployment(recipe, file=args.recipe)
    inputs = open_inputs(recipe)
    try:
        out_dtype = getattr(torch, recipe.output.dtype) if recipe.output.dtype else None
        meta = inputs.base_checkpoint.meta
        specs = output_specs(inputs.base_checkpoint, out_dtype)
        floating = {s.name for s in specs if meta[s.name].dtype.is_floating_point}
        tasks = len(inputs.experts)
        scalars = {"model": tasks, "tensor": tasks * len(floating)}.get(method.scalar_scope or "", 0)
        stored = masked_storage_bytes(specs, floating, tasks, scalars)
        if getattr(method, "dynamic", False):  # SE-Merging: the base and every task vector (hubmerge.dynamic)
            stored = sum(s.nbytes * (1 + tasks if s.name in floating else 1) for s in specs)
        model = sum(s.nbytes for s in specs)
        print(f"method: {method.name} {method.params.model_dump(mode='json')} (a per-task deployment)")
        for expert in inputs.experts:
            print(f"task: {expert.label} ({type(expert).__name__}) -> {expert.resolved.directory}")
        print(f"passes over the inputs: {method.prepasses + 1} ({inputs.bytes_per_pass / 1e6:.1f} MB each)")
        print(f"storage: {stored / model:.3f} model-equivalents ({stored / 1e6:.1f} MB)")
        print(f"output: {Path(args.output or recipe.output.path or '?')}")
    finally:
        inputs.close()
    return 0


def _dry_run(args: argparse.Namespace, recipe) -> int:
    import torch

    from ..engine import open_inputs, output_specs
    from ..flexmerge import assign_blocks, check_flexmerge

    inner, sizes, rules = check_flexmerge(recipe, file=args.recipe)
    inputs = open_inputs(recipe)
    try:
        out_dtype = getattr(torch, recipe.output.dtype) if recipe.output.dtype else None
        meta = inputs.base_checkpoint.meta
        specs = [s for s in output_specs(inputs.base_checkpoint, out_dtype) if meta[s.name].dtype.is_floating_point]
        blocks = assign_blocks(specs, rules)
        print(f"inner method: {inner.name} {inner.params}")
        for expert in inputs.experts:
            print(f"expert: {expert.label} ({type(expert).__name__}) -> {expert.resolved.directory}")
        print(f"blocks: {len(blocks)} ({', '.join(b.name for b in blocks[:6])}{', ...' if len(blocks) > 6 else ''})")
        passes = 2 + (inner.make(2).prepasses if len(recipe.experts) > 1 else 0)
        print(f"passes over the inputs: {passes} ({inputs.bytes_per_pass / 1e6:.1f} MB each)")
        root = Path(args.output or recipe.output.path or "?")
        for size in sizes:
            print(f"size {size.label}: -> {root / size.directory}")
    finally:
        inputs.close()
    return 0
