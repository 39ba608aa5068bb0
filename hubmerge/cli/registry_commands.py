"""``hubmerge recipes list|show|render|search``, ``hubmerge verify`` and ``hubmerge import-mergekit``.

``hubmerge run NAME|REPO_ID`` itself lives in :mod:`hubmerge.cli.merge_commands` (it resolves its
argument through :func:`hubmerge.registry.load_recipe_arg`).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Register the registry commands on the CLI's sub-parsers."""
    recipes = sub.add_parser("recipes", help="the recipe registry: package, plugins and the Hub")
    rsub = recipes.add_subparsers(dest="recipes_command", metavar="COMMAND", required=True)

    p = rsub.add_parser("list", help="list the registered recipes (package and plugins)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(handler=cmd_list)

    p = rsub.add_parser("show", help="show a recipe: metadata, variables and its YAML")
    p.add_argument("name", help="NAME, NAME@VERSION or hub://org/name[@rev]")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(handler=cmd_show)

    p = rsub.add_parser("render", help="fill a recipe's variables and print (or write) the plain recipe")
    p.add_argument("name", help="NAME or NAME@VERSION")
    p.add_argument("--set", dest="set", action="append", metavar="NAME=VALUE",
                   help="a variable's value (repeat)")
    p.add_argument("-o", "--output", help="write the recipe to this file instead of printing it")
    p.set_defaults(handler=cmd_render)

    p = rsub.add_parser("search", help="find merges on the Hub (repos tagged hubmerge)")
    p.add_argument("text", nargs="?", help="text the repo id must contain")
    p.add_argument("--method", help="only merges made with this method")
    p.add_argument("--limit", type=int, default=50, help="most results (default 50)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(handler=cmd_search)

    p = sub.add_parser("verify", help="re-run a published merge and compare it with the published weights")
    p.add_argument("repo", help="org/name[@rev] or hub://org/name[@rev]")
    p.add_argument("--atol", type=float, default=0.0,
                   help="accept tensors whose largest absolute difference is at most this "
                   "(default 0: bit-exact)")
    p.add_argument("--output", "-o", help="keep the re-run in this directory (default: a temporary one)")
    p.add_argument("--device", help="cpu, cuda, cuda:N or auto (overrides the recipe)")
    p.add_argument("--all", action="store_true", help="list every tensor, not only those that differ")
    p.add_argument("--json", action="store_true", help="machine-readable report")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(handler=cmd_verify)

    p = sub.add_parser("import-mergekit", help="translate a mergekit config into a hubmerge recipe")
    p.add_argument("config", help="mergekit_config.yml")
    p.add_argument("-o", "--output", help="write the recipe here (default: print it)")
    p.add_argument("--name", help="the recipe's name (default: from the file name)")
    p.add_argument("--output-path", help="the recipe's output.path (default out/<name>)")
    p.set_defaults(handler=cmd_import_mergekit)


def _entry(name: str):
    from ..registry import HUB_PREFIX, hub_recipe, load_registry, parse_hub_ref

    if name.startswith(HUB_PREFIX):
        repo, revision = parse_hub_ref(name)
        return hub_recipe(repo, revision)
    return load_registry().get(name)


def cmd_list(args: argparse.Namespace) -> int:
    """List the newest version of every registered recipe, and the recipes that failed."""
    from ..registry import load_registry

    registry = load_registry()
    latest = registry.latest()
    if args.json:
        print(json.dumps({"recipes": [e.describe() for e in latest.values()],
                          "failed": [f.__dict__ for f in registry.failures]}, indent=2))
        return 0
    if not latest:
        print("No registered recipes.")
    width = max((len(e.ref) for e in latest.values()), default=4)
    for entry in latest.values():
        methods = ",".join(entry.methods) or "?"
        needs = f"  needs: {', '.join(entry.required)}" if entry.required else ""
        print(f"  {entry.ref:<{width}}  [{methods}] {entry.summary}  ({entry.source}){needs}")
    for failure in registry.failures:
        print(f"  FAILED {failure.source} {failure.name or ''}: {failure.error}".rstrip())
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    """Show a registered (or Hub) recipe."""
    entry = _entry(args.name)
    if args.json:
        print(json.dumps({**entry.describe(), "text": entry.text}, indent=2, default=str))
        return 0
    print(f"{entry.name} {entry.version} — {entry.summary or '(no summary)'}")
    print(f"methods: {', '.join(entry.methods) or '?'}   source: {entry.source} ({entry.file})")
    if entry.variables:
        print("variables:")
        for name, var in entry.variables.items():
            state = "required" if var.required else f"default {json.dumps(var.default, default=str)}"
            about = f" — {var.description}" if var.description else ""
            print(f"  {name} ({var.type}, {state}){about}")
    print()
    print(entry.text.rstrip())
    return 0


def cmd_render(args: argparse.Namespace) -> int:
    """Render a template with ``--set`` values into a plain recipe."""
    from ..recipe import recipe_to_yaml
    from ..registry import load_registry, parse_assignments

    entry = load_registry().get(args.name)
    recipe = entry.render(parse_assignments(args.set))
    text = recipe_to_yaml(recipe)
    if args.output:
        Path(args.output).write_text(text, encoding="utf-8")
        print(f"wrote {args.output}")
    else:
        print(text.rstrip())
    return 0


def cmd_search(args: argparse.Namespace) -> int:
    """List Hub repos tagged hubmerge, with method and inputs."""
    from ..registry import search_hub

    found = search_hub(args.text, method=args.method, limit=args.limit)
    if args.json:
        print(json.dumps([m.__dict__ for m in found], indent=2))
        return 0
    if not found:
        print("No merges found.")
    for merge in found:
        inputs = ", ".join(merge.inputs) or "?"
        print(f"  {merge.repo_id}  [{merge.method or '?'}]  inputs: {inputs}")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    """Re-run a published merge; exit 0 when its tensors match, 1 when they do not."""
    from ..reproduce import verify
    from .merge_commands import _Bar

    bar = _Bar(enabled=not (args.no_progress or args.json))
    try:
        report = verify(args.repo, atol=args.atol, output=args.output, device=args.device, progress=bar)
    finally:
        bar.close()
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
        return 0 if report.ok else 1
    where = f"{report.repo_id}@{report.commit[:12]}"
    close = [t for t in report.tensors if t.status == "close"]
    shown = report.tensors if args.all else report.mismatches + close
    for check in shown:
        diff = "" if check.max_abs_diff is None else f"  max|diff| {check.max_abs_diff:.3g}"
        detail = f"  ({check.detail})" if check.detail else ""
        print(f"  {check.status:<10} {check.name}{diff}{detail}")
    count = len(report.tensors)
    if report.exact:
        print(f"{where}: reproduced exactly — {count} tensors bit-identical")
    elif report.ok:
        print(f"{where}: reproduced within atol {report.atol:g} — max |diff| {report.max_abs_diff:.3g} "
              f"over {count} tensors")
    else:
        print(f"{where}: MISMATCH — {len(report.mismatches)} of {count} tensors differ "
              f"(max |diff| {report.max_abs_diff:.3g}, atol {report.atol:g})", file=sys.stderr)
    if report.output_dir:
        print(f"re-run kept in {report.output_dir}")
    return 0 if report.ok else 1


def cmd_import_mergekit(args: argparse.Namespace) -> int:
    """Translate a mergekit config; print the recipe or write it with ``-o``."""
    from ..mergekit_compat import load_mergekit

    name = args.name or (Path(args.output).stem if args.output else None)
    translated = load_mergekit(args.config, name=name, output_path=args.output_path)
    text = translated.to_yaml(args.config)
    if args.output:
        Path(args.output).write_text(text, encoding="utf-8")
        print(f"wrote {args.output} ({translated.method} -> {translated.document['method']})")
        for note in translated.notes:
            print(f"  note: {note}")
    else:
        print(text.rstrip())
    return 0
