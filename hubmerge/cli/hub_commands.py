"""``hubmerge hub serve``: the loopback Hub-compatible server."""

from __future__ import annotations

import argparse
import os


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Register ``hub serve`` on the CLI's sub-parsers."""
    hub = sub.add_parser("hub", help="the loopback Hub-compatible server")
    hub_sub = hub.add_subparsers(dest="hub_command", metavar="COMMAND", required=True)
    p = hub_sub.add_parser("serve", help="serve a Hub on loopback (data persists in --data)")
    p.add_argument("--host", default="127.0.0.1", help="interface (loopback unless --allow-public)")
    p.add_argument("--port", type=int, default=8765)
    p.add_argument("--data", default=".hubmerge-hub", help="data directory (repos persist here)")
    p.add_argument("--allow-public", action="store_true", help="allow listening on a non-loopback address")
    p.add_argument("--username", default="hubmerge", help="the token owner's user name")
    p.set_defaults(handler=cmd_serve)


def cmd_serve(args: argparse.Namespace) -> int:
    """Serve until Ctrl-C. The write token comes from ``HUBMERGE_HUB_TOKEN`` or the data dir's token file."""
    from ..localhub import serve

    serve(args.host, args.port, data_dir=args.data, token=os.environ.get("HUBMERGE_HUB_TOKEN") or None,
          allow_public=args.allow_public, username=args.username)
    return 0
