"""Helpers to run the local Hub inside tests and demos.

``huggingface_hub`` reads ``HF_ENDPOINT`` (and ``HF_HOME``) when it is *imported*, and
``transformers``/``peft`` use its defaults. So the endpoint must be chosen before any of
them is imported: call :func:`configure_client_env` first (e.g. at the top of
``tests/conftest.py``), then start the server on that port with :func:`run_local_hub`::

    # tests/conftest.py -- before anything imports huggingface_hub/transformers/peft
    from hubmerge.localhub.testing import configure_client_env
    LOCAL_HUB_ENV = configure_client_env()

    # a fixture
    with run_local_hub(port=LOCAL_HUB_ENV.port, token=LOCAL_HUB_ENV.token) as hub:
        ...  # HfApi(), hf_hub_download, from_pretrained, push_to_hub all talk to `hub`

If the clients were imported already, :func:`configure_client_env` also re-points the
loaded ``huggingface_hub.constants`` (and logs that it did), so tests stay hermetic in
either order. ``hubmerge.localhub.pytest_plugin`` wraps all this as fixtures.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
import tempfile
from collections.abc import Iterator, MutableMapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from .auth import generate_token
from .server import DEFAULT_HOST, DEFAULT_USERNAME, LocalHubServer

if TYPE_CHECKING:
    from huggingface_hub import HfApi

logger = logging.getLogger(__name__)


@dataclass
class LocalHub:
    """A running local Hub (yielded by :func:`run_local_hub`).

    Attributes:
        endpoint: ``http://127.0.0.1:<port>``, for ``HF_ENDPOINT`` or ``endpoint=``.
        token: The write token.
        data_dir: The data directory.
        port: The TCP port.
        username: The token owner's name (default namespace).
    """

    endpoint: str
    token: str
    data_dir: Path
    port: int
    username: str
    _server: LocalHubServer = field(repr=False)

    def api(self) -> HfApi:
        """An ``HfApi`` bound to this server and token."""
        from huggingface_hub import HfApi

        return HfApi(endpoint=self.endpoint, token=self.token)

    def stop(self) -> None:
        """Stop the server (also done when the context manager exits)."""
        self._server.stop()


def find_free_port(host: str = DEFAULT_HOST) -> int:
    """A TCP port that is free on ``host`` right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


@contextmanager
def run_local_hub(
    data_dir: str | os.PathLike[str] | None = None,
    *,
    port: int = 0,
    token: str | None = None,
    username: str = DEFAULT_USERNAME,
    host: str = DEFAULT_HOST,
) -> Iterator[LocalHub]:
    """Run a local Hub in a background thread for the duration of a ``with`` block.

    Args:
        data_dir: Data directory; a temporary one (removed afterwards) if ``None``.
        port: Port to listen on; 0 picks a free one.
        token: Token to accept; a fresh one if ``None`` (or the one stored in ``data_dir``).
        username: The token owner's name.
        host: A loopback address.

    Yields:
        A :class:`LocalHub` with ``endpoint``, ``token`` and ``data_dir``.

    Raises:
        LocalHubConfigError: If the server cannot start.
    """
    with tempfile.TemporaryDirectory(prefix="hubmerge-localhub-") as scratch:
        server = LocalHubServer(
            data_dir if data_dir is not None else scratch,
            host=host,
            port=port,
            token=token,
            username=username,
        )
        server.start()
        hub = LocalHub(server.endpoint, server.token, server.data_dir, server.port, username, server)
        try:
            yield hub
        finally:
            server.stop()


@dataclass
class ClientEnv:
    """What :func:`configure_client_env` set up.

    Attributes:
        endpoint: The endpoint clients now use.
        port: Its port (start the server there).
        token: The token clients send (start the server with it).
        hf_home: The temporary ``HF_HOME`` (cache) the clients use.
        patched_loaded_clients: Whether ``huggingface_hub`` was already imported and had
            to be re-pointed in place.
        owns_hf_home: Whether ``hf_home`` is a temporary directory created for this env.
    """

    endpoint: str
    port: int
    token: str
    hf_home: Path
    patched_loaded_clients: bool
    owns_hf_home: bool = False
    _previous: dict[str, str | None] = field(default_factory=dict, repr=False)

    def restore(self, environ: MutableMapping[str, str] | None = None) -> None:
        """Put the environment variables back as they were (loaded modules stay re-pointed)."""
        environ = os.environ if environ is None else environ
        for key, value in self._previous.items():
            if value is None:
                environ.pop(key, None)
            else:
                environ[key] = value


def configure_client_env(
    *,
    port: int | None = None,
    token: str | None = None,
    hf_home: str | os.PathLike[str] | None = None,
    host: str = DEFAULT_HOST,
    environ: MutableMapping[str, str] | None = None,
) -> ClientEnv:
    """Point ``huggingface_hub``/``transformers``/``peft`` at a local Hub, hermetically.

    Sets ``HF_ENDPOINT``, ``HF_TOKEN``, a temporary ``HF_HOME`` (and ``HF_HUB_CACHE``,
    ``HF_TOKEN_PATH``, ``HF_ASSETS_CACHE``, ``HF_XET_CACHE`` inside it, so the real cache
    and stored token are never touched), ``HF_HUB_DISABLE_TELEMETRY=1``,
    ``HF_HUB_DISABLE_XET=1`` (this server speaks LFS, not Xet),
    ``HF_HUB_DISABLE_UPDATE_CHECK=1``, and unsets ``HF_HUB_OFFLINE``/``TRANSFORMERS_OFFLINE``.
    Call it before importing the clients; if they are already imported, their loaded
    constants are re-pointed as well.

    Args:
        port: Port the server will use; a free one if ``None``.
        token: Token to send; a fresh one if ``None``.
        hf_home: Client cache root; a new temporary directory if ``None``.
        host: Loopback host of the server.
        environ: Environment to modify (``os.environ`` by default).

    Returns:
        A :class:`ClientEnv`; start the server with its ``port`` and ``token``.
    """
    environ = os.environ if environ is None else environ
    port = port if port is not None else find_free_port(host)
    token = token or generate_token()
    home = Path(hf_home) if hf_home is not None else Path(tempfile.mkdtemp(prefix="hubmerge-hf-home-"))
    home.mkdir(parents=True, exist_ok=True)
    endpoint = f"http://{host}:{port}"
    values: dict[str, str | None] = {
        "HF_ENDPOINT": endpoint,
        "HF_TOKEN": token,
        "HUGGING_FACE_HUB_TOKEN": None,
        "HF_HOME": str(home),
        "HF_HUB_CACHE": str(home / "hub"),
        "HUGGINGFACE_HUB_CACHE": None,
        "HF_ASSETS_CACHE": str(home / "assets"),
        "HF_XET_CACHE": str(home / "xet"),
        "HF_TOKEN_PATH": str(home / "token"),
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "HF_HUB_DISABLE_XET": "1",
        "HF_HUB_DISABLE_UPDATE_CHECK": "1",
        "HF_HUB_OFFLINE": None,
        "TRANSFORMERS_OFFLINE": None,
        "HF_DATASETS_OFFLINE": None,
        "HUGGINGFACE_CO_STAGING": None,
    }
    previous = {key: environ.get(key) for key in values}
    for key, value in values.items():
        if value is None:
            environ.pop(key, None)
        else:
            environ[key] = value
    patched = environ is os.environ and "huggingface_hub" in sys.modules
    if patched:
        _repoint_loaded_constants(endpoint, home)
    return ClientEnv(endpoint, port, token, home, patched, hf_home is None, previous)


def _repoint_loaded_constants(endpoint: str, home: Path) -> None:
    """Re-point an already imported ``huggingface_hub`` (its constants are read at import)."""
    from huggingface_hub import constants

    if constants.ENDPOINT != endpoint:
        logger.warning(
            "huggingface_hub was imported before configure_client_env(); re-pointing its loaded"
            " constants to %s."
            " Call configure_client_env() before importing huggingface_hub/transformers/peft.",
            endpoint,
        )
    constants.ENDPOINT = endpoint
    constants.HUGGINGFACE_CO_URL_TEMPLATE = endpoint + "/{repo_id}/resolve/{revision}/{filename}"
    constants.HF_HOME = str(home)
    constants.HF_HUB_CACHE = constants.HUGGINGFACE_HUB_CACHE = str(home / "hub")
    constants.HF_ASSETS_CACHE = constants.HUGGINGFACE_ASSETS_CACHE = str(home / "assets")
    constants.HF_XET_CACHE = str(home / "xet")
    constants.HF_TOKEN_PATH = str(home / "token")
    constants.HF_STORED_TOKENS_PATH = str(home / "stored_tokens")
    constants.HF_HUB_OFFLINE = False
    constants.HF_HUB_DISABLE_TELEMETRY = True
    constants.HF_HUB_DISABLE_XET = True
    constants.HF_HUB_DISABLE_UPDATE_CHECK = True
    hf_api = sys.modules.get("huggingface_hub.hf_api")
    if hf_api is not None:  # module-level functions (file_exists, ...) use this instance
        hf_api.api.endpoint = endpoint
