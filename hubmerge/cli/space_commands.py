"""``hubmerge space``: run the Gradio Space (``space/app.py``) on this machine."""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
from pathlib import Path

from ..errors import HubmergeError

LOOPBACK = ("127.0.0.1", "localhost", "::1")


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Register ``hubmerge space`` on the CLI's sub-parsers."""
    p = sub.add_parser("space", help="run the web app (the Gradio Space) to build, run and publish merges")
    p.add_argument("--host", default="127.0.0.1", help="interface to listen on (default: 127.0.0.1)")
    p.add_argument("--port", type=int, default=7860, help="port (default: 7860)")
    p.add_argument(
        "--space-dir", help="the Space's directory (default: $HUBMERGE_SPACE_DIR or the checkout's space/)"
    )
    p.add_argument(
        "--use-stored-token",
        action="store_true",
        help="let an empty token field use HF_TOKEN or your stored login (loopback host only)",
    )
    p.set_defaults(handler=cmd_space)


def space_dir(explicit: str | None = None) -> Path:
    """Find the Space's ``app.py``: ``--space-dir``, ``$HUBMERGE_SPACE_DIR``, or the checkout's ``space/``.

    Raises:
        HubmergeError: If no ``app.py`` is found there.
    """
    candidates = [
        explicit,
        os.environ.get("HUBMERGE_SPACE_DIR"),
        Path(__file__).resolve().parents[2] / "space",
    ]
    for candidate in candidates:
        if candidate and (Path(candidate) / "app.py").is_file():
            return Path(candidate).resolve()
    raise HubmergeError(
        "the Space's files (space/app.py) are not here; run from a source checkout of hubmerge "
        "or pass --space-dir"
    )


def load_app_module(directory: Path):
    """Import ``app.py`` of the Space (with its sibling modules importable)."""
    if importlib.util.find_spec("gradio") is None:
        raise HubmergeError("the Space needs gradio: pip install 'hubmerge[space]'")
    sys.path.insert(0, str(directory))
    spec = importlib.util.spec_from_file_location("hubmerge_space_app", directory / "app.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def cmd_space(args: argparse.Namespace) -> int:
    """Build the app and serve it until interrupted."""
    if args.use_stored_token and args.host not in LOOPBACK:
        raise HubmergeError(
            "--use-stored-token lends your login to every visitor; use it with a loopback --host only"
        )
    module = load_app_module(space_dir(args.space_dir))
    app = module.build_app(settings=module.sj.Settings(use_stored_token=args.use_stored_token))
    module.launch(app, host=args.host, port=args.port)
    return 0
