"""Pytest fixtures for a local Hub shared by a test session.

Load it from the root ``tests/conftest.py`` (``pytest_plugins = ["hubmerge.localhub.pytest_plugin"]``,
placed before anything imports ``huggingface_hub``) or from a test module. Importing it
calls :func:`~hubmerge.localhub.testing.configure_client_env`: clients in this process
use the local Hub's endpoint and token and a temporary ``HF_HOME``, never the real Hub
or cache.

Fixtures:
    local_hub_env: the :class:`~hubmerge.localhub.testing.ClientEnv` (endpoint, port, token, hf_home).
    local_hub: a :class:`~hubmerge.localhub.testing.LocalHub` running at that endpoint for the session.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator

import pytest

from .testing import ClientEnv, LocalHub, configure_client_env, run_local_hub

LOCAL_HUB_ENV: ClientEnv = configure_client_env()


@pytest.fixture(scope="session")
def local_hub_env() -> ClientEnv:
    """Endpoint, port, token and ``HF_HOME`` the clients of this session use."""
    return LOCAL_HUB_ENV


@pytest.fixture(scope="session")
def local_hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalHub]:
    """A local Hub serving at ``HF_ENDPOINT`` for the whole session."""
    data_dir = tmp_path_factory.mktemp("localhub-data")
    with run_local_hub(data_dir, port=LOCAL_HUB_ENV.port, token=LOCAL_HUB_ENV.token) as hub:
        yield hub


def pytest_unconfigure(config: pytest.Config) -> None:
    """Remove the temporary ``HF_HOME`` once the session is over."""
    if LOCAL_HUB_ENV.owns_hf_home:
        shutil.rmtree(LOCAL_HUB_ENV.hf_home, ignore_errors=True)
