"""``hubmerge demo``: experts made, pushed to the loopback Hub, merged, pushed back with cards."""

from __future__ import annotations

import argparse
import logging


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Register ``demo`` on the CLI's sub-parsers."""
    p = sub.add_parser("demo", help="the end-to-end demo on the loopback Hub")
    p.add_argument("--work", default=".hubmerge-demo", help="working directory (reused across runs)")
    p.add_argument("--recipes", default="recipes", help="directory of demo-*.yaml recipes")
    p.set_defaults(handler=cmd_demo)


def cmd_demo(args: argparse.Namespace) -> int:
    """Run the demo and print the accuracy table and where to look."""
    from ..demo import run_demo

    logging.getLogger("hubmerge").setLevel(min(logging.getLogger().level, logging.INFO))
    # the demo's own steps are the story; the embedded Hub's request log and transformers' bars are not
    logging.getLogger("hubmerge.localhub").setLevel(logging.WARNING)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    report = run_demo(args.work, recipes=args.recipes)
    print()
    print(report.table())
    print(f"Hub: {report.endpoint}  ({len(report.repos)} repos, e.g. {report.endpoint}/{report.repos[-1]})")
    print(f"Merged models: {', '.join(str(p) for p in report.outputs)}")
    print(f"Table saved to {args.work}/accuracy.md; finished in {report.seconds:.0f}s")
    return 0
