"""The local Hub's single write token and the signed LFS upload URLs derived from it.

The token is generated on first start and kept in ``DATA/token`` (mode 0600). It is
compared with :func:`hmac.compare_digest`, never logged, and only shown as a short
fingerprint. LFS uploads go to URLs carrying an HMAC signature (the real Hub hands out
pre-signed storage URLs the same way, and the client sends no ``Authorization`` header
with the upload itself).
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import secrets
import stat
import time
from pathlib import Path

from hubmerge.errors import LocalHubAuthError, LocalHubConfigError

logger = logging.getLogger(__name__)

TOKEN_FILE_NAME = "token"
LFS_URL_TTL_SECONDS = 3600


def generate_token() -> str:
    """A fresh random token in the Hub's style (``hf_`` + 40 url-safe characters)."""
    return "hf_" + secrets.token_urlsafe(30)


def token_fingerprint(token: str) -> str:
    """A short, non-secret way to refer to a token in logs (``hf_Ab…``)."""
    return token[:5] + "…"


def load_or_create_token(data_dir: str | os.PathLike[str]) -> str:
    """Read ``DATA/token``, creating it (mode 0600) with a new token if missing.

    Args:
        data_dir: The server's data directory (must exist).

    Returns:
        The token.

    Raises:
        LocalHubConfigError: If the file is empty, unreadable, or not a regular file.
    """
    path = Path(data_dir) / TOKEN_FILE_NAME
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        pass
    else:
        token = generate_token()
        with os.fdopen(fd, "w") as handle:
            handle.write(token + "\n")
        logger.info("Generated a new server token in %s", path)
        return token
    try:
        info = path.lstat()
        if not stat.S_ISREG(info.st_mode):
            raise LocalHubConfigError(f"{path} is not a regular file.")
        if stat.S_IMODE(info.st_mode) & 0o077:
            logger.warning("Token file %s was readable by others; restricting it to mode 0600.", path)
            os.chmod(path, 0o600)
        token = path.read_text().strip()
    except OSError as exc:
        raise LocalHubConfigError(f"Cannot read the token file {path}: {exc}") from exc
    if not token:
        raise LocalHubConfigError(f"The token file {path} is empty.")
    return token


class TokenAuth:
    """Checks ``Authorization`` headers against the server token and signs LFS URLs.

    Args:
        token: The server's token.
    """

    def __init__(self, token: str):
        if not token:
            raise LocalHubConfigError("The server token cannot be empty.")
        self._token = token.encode()
        self._signing_key = hmac.new(self._token, b"hubmerge-localhub-lfs-v1", hashlib.sha256).digest()

    def check_header(self, authorization: str | None) -> bool:
        """Whether a request is authenticated.

        Args:
            authorization: The request's ``Authorization`` header, if any.

        Returns:
            ``True`` for the right token, ``False`` without a header.

        Raises:
            LocalHubAuthError: For a header carrying a wrong token (401).
        """
        if not authorization:
            return False
        scheme, _, value = authorization.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(value.strip().encode(), self._token):
            raise LocalHubAuthError("Invalid credentials in Authorization header", status=401)
        return True

    def _signature(self, message: str) -> str:
        return hmac.new(self._signing_key, message.encode(), hashlib.sha256).hexdigest()

    def sign_upload(self, scope: str, oid: str, size: int, now: float | None = None) -> dict[str, str]:
        """Query parameters authorising one LFS upload.

        Args:
            scope: The repo the upload is for (``model/ns/name``).
            oid: The object's sha256.
            size: Its size in bytes.
            now: Current time (for tests).

        Returns:
            ``{"size", "expires", "sig"}`` to append to the upload URL.
        """
        expires = str(int((now if now is not None else time.time()) + LFS_URL_TTL_SECONDS))
        sig = self._signature(f"{scope}\n{oid}\n{size}\n{expires}")
        return {"size": str(size), "expires": expires, "sig": sig}

    def verify_upload(self, scope: str, oid: str, size: str, expires: str, sig: str) -> int:
        """Check a signed upload URL.

        Returns:
            The authorised size.

        Raises:
            LocalHubAuthError: If the signature is wrong or expired (403).
        """
        expected = self._signature(f"{scope}\n{oid}\n{size}\n{expires}")
        if not hmac.compare_digest(expected.encode(), sig.encode()):
            raise LocalHubAuthError("Invalid LFS upload signature.", status=403)
        try:
            if int(expires) < time.time():
                raise LocalHubAuthError("This LFS upload URL has expired.", status=403)
            return int(size)
        except ValueError:
            raise LocalHubAuthError("Invalid LFS upload URL.", status=403) from None
