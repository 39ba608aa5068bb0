"""The ``hubmerge`` command line: a thin layer over the library.

Each command group lives in its own module and adds its sub-parsers in ``add_commands``.
Bad input ends with exit code 2 and one line ``error: ...`` on stderr.
"""

from __future__ import annotations

import argparse
import logging
import sys

from ..errors import HubmergeError
from . import merge_commands

COMMAND_MODULES = [merge_commands]


def _optional_modules():
    """Command groups whose modules may be absent in a trimmed install."""
    import importlib

    for name in ("hub_commands", "flexmerge_commands", "space_commands", "demo_commands", "registry_commands"):
        try:
            yield importlib.import_module(f"{__name__}.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"{__name__}.{name}":
                raise


def build_parser() -> argparse.ArgumentParser:
    """Build the argument parser with every command group."""
    parser = argparse.ArgumentParser(prog="hubmerge", description="Merge fine-tuned models and adapters.")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv for debug)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module in [*COMMAND_MODULES, *_optional_modules()]:
        module.add_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the CLI.

    Args:
        argv: Arguments (default ``sys.argv[1:]``).

    Returns:
        The exit code: 0 on success, 2 on bad input or a failed merge, 130 on Ctrl-C.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    level = [logging.WARNING, logging.INFO, logging.DEBUG][min(args.verbose, 2)]
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(args.handler(args) or 0)
    except HubmergeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; nothing was left half-written", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
