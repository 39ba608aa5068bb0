"""Running the local Hub: loopback checks, socket binding, uvicorn in the foreground or a thread."""

from __future__ import annotations

import ipaddress
import logging
import os
import socket
import threading
import time
from pathlib import Path

import uvicorn

from hubmerge.errors import LocalHubConfigError

from .app import create_app
from .auth import TOKEN_FILE_NAME, TokenAuth, load_or_create_token, token_fingerprint
from .storage import RepoStore

logger = logging.getLogger(__name__)

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8765
DEFAULT_USERNAME = "hubmerge"


def is_loopback_host(host: str) -> bool:
    """Whether ``host`` only listens on the loopback interface (``127.0.0.0/8``, ``::1``, ``localhost``)."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_host(host: str, allow_public: bool) -> None:
    """Refuse a non-loopback host unless ``allow_public``.

    Raises:
        LocalHubConfigError: For a public host without ``allow_public``.
    """
    if is_loopback_host(host):
        return
    if not allow_public:
        raise LocalHubConfigError(
            f"Refusing to listen on {host!r}: the local Hub serves plain HTTP and accepts its token"
            " from anyone who"
            " can reach it. Use a loopback address (127.0.0.1) or pass allow_public=True (--allow-public)."
        )
    logger.warning("Listening on non-loopback host %s: anyone who can reach it can read public repos.", host)


def _bind(host: str, port: int) -> socket.socket:
    if host.lower() == "localhost":
        host = DEFAULT_HOST
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # proto=IPPROTO_TCP lets asyncio set TCP_NODELAY on accepted connections; without it,
    # Nagle + delayed ACKs add ~40 ms to every request.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.bind((host.strip("[]"), port))
        sock.listen(128)
        sock.set_inheritable(True)
    except OSError as exc:
        sock.close()
        raise LocalHubConfigError(f"Cannot listen on {host}:{port}: {exc}") from exc
    return sock


class LocalHubServer:
    """A local Hub bound to its socket and data directory, ready to run.

    Binding happens in the constructor, so ``port=0`` picks a free port and
    :attr:`endpoint` is known before the server runs.

    Args:
        data_dir: Where repos, blobs and the token live (created if missing).
        host: Interface to listen on; loopback unless ``allow_public``.
        port: TCP port (0 for any free one).
        token: Token to accept; defaults to the one in ``DATA/token`` (generated if missing).
        allow_public: Allow a non-loopback ``host``.
        username: The token owner's user name (default namespace, commit author).
        log_level: Level for uvicorn's own loggers.

    Raises:
        LocalHubConfigError: Public host refused, data directory in use, port unavailable.
    """

    def __init__(
        self,
        data_dir: str | os.PathLike[str],
        *,
        host: str = DEFAULT_HOST,
        port: int = DEFAULT_PORT,
        token: str | None = None,
        allow_public: bool = False,
        username: str = DEFAULT_USERNAME,
        log_level: str = "warning",
    ):
        check_host(host, allow_public)
        self.store = RepoStore(data_dir)
        try:
            self.token = token or load_or_create_token(self.store.data_dir)
            app = create_app(self.store, TokenAuth(self.token), username=username)
            self._socket = _bind(host, port)
        except BaseException:
            self.store.close()
            raise
        self.host = host
        self.port = self._socket.getsockname()[1]
        config = uvicorn.Config(
            app,
            log_config=None,
            log_level=log_level,
            access_log=False,  # our own access log omits query strings (signed LFS URLs)
            lifespan="off",
            timeout_graceful_shutdown=5,
        )
        self._server = uvicorn.Server(config)
        self._thread: threading.Thread | None = None
        self._closed = False

    @property
    def data_dir(self) -> Path:
        """The resolved data directory."""
        return self.store.data_dir

    @property
    def endpoint(self) -> str:
        """Base URL for ``HF_ENDPOINT`` / ``endpoint=`` (``http://127.0.0.1:8765``)."""
        host = DEFAULT_HOST if self.host.lower() == "localhost" else self.host
        host = f"[{host.strip('[]')}]" if ":" in host else host
        return f"http://{host}:{self.port}"

    def run(self) -> None:
        """Serve in the current thread until interrupted (Ctrl+C / SIGTERM), then clean up."""
        try:
            self._server.run(sockets=[self._socket])
        finally:
            self.close()

    def start(self, timeout: float = 15.0) -> None:
        """Serve in a daemon thread; returns once the server accepts requests.

        Raises:
            LocalHubConfigError: If the server did not start within ``timeout`` seconds.
        """
        self._thread = threading.Thread(
            target=self._server.run, kwargs={"sockets": [self._socket]}, name="hubmerge-localhub", daemon=True
        )
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise LocalHubConfigError("The local Hub server failed to start (see the log).")
            time.sleep(0.01)

    def stop(self, timeout: float = 10.0) -> None:
        """Stop a server started with :meth:`start` and release the data directory."""
        if self._thread is not None:
            self._server.should_exit = True
            self._thread.join(timeout)
            if self._thread.is_alive():
                self._server.force_exit = True
                self._thread.join(timeout)
            self._thread = None
        self.close()

    def close(self) -> None:
        """Close the socket and release the data-directory lock (idempotent)."""
        if not self._closed:
            self._closed = True
            self._socket.close()
            self.store.close()


def serve(
    host: str = DEFAULT_HOST,
    port: int = DEFAULT_PORT,
    *,
    data_dir: str | os.PathLike[str],
    token: str | None = None,
    allow_public: bool = False,
    username: str = DEFAULT_USERNAME,
) -> None:
    """Run the local Hub in the foreground until interrupted (``hubmerge hub serve``).

    Args:
        host: Interface to listen on (loopback unless ``allow_public``).
        port: TCP port (0 for any free one).
        data_dir: Data directory; repos persist there across restarts.
        token: Write token to accept; by default the one stored in ``DATA/token``,
            generated (mode 0600) on first start. Never printed in full.
        allow_public: Allow a non-loopback host.
        username: The token owner's user name (default namespace).

    Raises:
        LocalHubConfigError: Public host refused, data directory in use, port unavailable.
    """
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not logger.isEnabledFor(logging.INFO):  # where to point clients is always worth saying
        logger.setLevel(logging.INFO)
    server = LocalHubServer(
        data_dir,
        host=host,
        port=port,
        token=token,
        allow_public=allow_public,
        username=username,
        log_level="info",
    )
    token_hint = (
        "the token it was started with"
        if token
        else f"the token stored in {server.data_dir / TOKEN_FILE_NAME}"
    )
    logger.info(
        "Local Hub serving %s from %s; writes and private repos need %s (%s). Point clients at it with"
        " HF_ENDPOINT=%s HF_TOKEN=<token>",
        server.endpoint,
        server.data_dir,
        token_hint,
        token_fingerprint(server.token),
        server.endpoint,
    )
    server.run()
