"""``hubmerge export-task`` and the FlexMerge branch of ``hubmerge run``.

``hubmerge run RECIPE`` on a recipe with a ``flexmerge:`` section calls :func:`run_recipe`
(from ``merge_commands.cmd_run``); ``hubmerge export-task DIR TASK OUT`` writes one task of a
deployment as an ordinary checkpoint.
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


def run_recipe(args: argparse.Namespace, recipe) -> int:
    """``hubmerge run`` for a recipe with ``flexmerge:``: every size, a table of their storage.

    Uses ``args.output``, ``args.device``, ``args.overwrite``, ``args.dry_run``,
    ``args.no_progress`` and ``args.recipe`` (the file name, for errors).
    """
    from ..flexmerge import run_flexmerge
    from .merge_commands import _Bar

    if getattr(args, "dry_run", False):
        return _dry_run(args, recipe)
    if getattr(args, "push", False) or getattr(args, "repo", None):
        from ..errors import RecipeError

        raise RecipeError("pushing FlexMerge deployments is not supported yet; push each size-* directory",
                          field="output.repo", file=args.recipe)
    bar = _Bar(enabled=not getattr(args, "no_progress", False))
    try:
        result = run_flexmerge(recipe, output=args.output, device=args.device, overwrite=args.overwrite,
                               progress=bar, file=args.recipe)
    finally:
        bar.close()
    print(f"flexmerge: {len(result.order)} merges over {len(result.blocks)} blocks of {len(result.tasks)} experts, "
          f"inner {result.inner.name} in {result.seconds:.1f}s on {result.device}")
    print(f"{'size':>8}  {'merges':>6}  {'models':>8}  {'MB':>10}  directory")
    for row in result.storage_table():
        print(f"{row['size']:>8}  {row['merges']:>6}  {row['model_equivalents']:>8.3f}  "
              f"{row['bytes'] / 1e6:>10.1f}  {row['path']}")
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
