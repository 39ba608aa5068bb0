"""Shared fixtures: tiny real models built once per test session (cached inside the run)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

# Point the Hub clients at a loopback Hub before anything imports huggingface_hub.
from hubmerge.localhub.pytest_plugin import LOCAL_HUB_ENV  # noqa: E402,F401

pytest_plugins = ["hubmerge.localhub.pytest_plugin"]

os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
sys.path.insert(0, str(Path(__file__).parent))

from helpers import make_base, make_expert  # noqa: E402


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    """A tiny BERT base and three full fine-tunes of it."""
    root = tmp_path_factory.mktemp("tiny_models")
    base = make_base(root / "base")
    models = {"base": base}
    for i in range(3):
        models[f"e{i}"] = make_expert(base, root / f"e{i}", seed=100 + i)
    return models
