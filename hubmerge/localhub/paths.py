"""Validation of repo ids, file paths and ref names received by the local Hub.

Everything a client sends is checked here before it reaches the store, so a repo id or
a path can never name a location outside the data directory. Repo ids become directory
names (strict pattern); file paths and ref names only ever become JSON keys, but are
still refused when they could escape a checkout (``..``, absolute, backslash, NUL).
"""

from __future__ import annotations

import re

from hubmerge.errors import LocalHubRequestError

#: Repo types this server hosts, mapped to their URL/API plural.
REPO_TYPE_PLURALS = {"model": "models", "dataset": "datasets"}
#: URL prefix of each repo type in download URLs (``/datasets/ns/name/resolve/...``).
REPO_TYPE_URL_PREFIXES = {"model": "", "dataset": "datasets/"}

_NAME_RE = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9_.\-]{0,94}[A-Za-z0-9_])?")
_HEX40_RE = re.compile(r"[0-9a-f]{40}")
_SHA256_RE = re.compile(r"[0-9a-f]{64}")
_REF_SEGMENT_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-]*")
MAX_PATH_BYTES = 1024


def repo_type_from_plural(plural: str) -> str:
    """Map an API plural (``models``) to its repo type (``model``).

    Args:
        plural: ``models``, ``datasets``, ...

    Returns:
        The singular repo type.

    Raises:
        LocalHubRequestError: For a type this server does not host (spaces, kernels).
    """
    for repo_type, known in REPO_TYPE_PLURALS.items():
        if plural == known:
            return repo_type
    raise LocalHubRequestError(
        f"Repo type '{plural}' is not supported by this server (models, datasets only)."
    )


def validate_repo_type(repo_type: str | None) -> str:
    """Return the repo type (``None`` means ``model``), refusing unsupported ones.

    Raises:
        LocalHubRequestError: For spaces, kernels or unknown types.
    """
    repo_type = repo_type or "model"
    if not isinstance(repo_type, str) or repo_type not in REPO_TYPE_PLURALS:
        raise LocalHubRequestError(
            f"Repo type '{repo_type}' is not supported by this server (model, dataset only)."
        )
    return repo_type


def validate_repo_part(part: object, what: str = "repo name") -> str:
    """Check one half of a repo id (namespace or name); it becomes a directory name.

    Args:
        part: The namespace or name sent by the client.
        what: Used in the error message.

    Returns:
        The validated string.

    Raises:
        LocalHubRequestError: If it is not ASCII letters/digits/``-_.``, starts or ends with
            ``-``/``.``, contains ``--`` or ``..``, ends in ``.git`` or exceeds 96 characters.
    """
    if (
        not isinstance(part, str)
        or not _NAME_RE.fullmatch(part)
        or "--" in part
        or ".." in part
        or part.endswith(".git")
    ):
        raise LocalHubRequestError(
            f"Invalid {what} {part!r}: use letters, digits, '-', '_' or '.', without '--' or '..';"
            " it cannot start or end with '-' or '.' and is at most 96 characters."
        )
    return part


def validate_repo_id(repo_id: str) -> tuple[str, str]:
    """Split and validate ``namespace/name``.

    Returns:
        ``(namespace, name)``.

    Raises:
        LocalHubRequestError: If the id is not exactly two valid parts.
    """
    parts = repo_id.split("/") if isinstance(repo_id, str) else []
    if len(parts) != 2:
        raise LocalHubRequestError(f"Invalid repo id {repo_id!r}: expected 'namespace/name'.")
    return validate_repo_part(parts[0], "namespace"), validate_repo_part(parts[1], "repo name")


def validate_path_in_repo(path: object, *, folder: bool = False) -> str:
    """Check a file (or folder) path inside a repo.

    Args:
        path: The path sent by the client.
        folder: Accept (and strip) one trailing ``/``, as for folder deletions.

    Returns:
        The normalised path (no leading/trailing slash).

    Raises:
        LocalHubRequestError: For empty, absolute, ``..``/``.`` segments, backslashes,
            NUL or control characters, a ``.git`` segment, or more than 1024 bytes.
    """
    if not isinstance(path, str) or not path:
        raise LocalHubRequestError("Invalid path in repo: empty or not a string.")
    if folder and path.endswith("/"):
        path = path[:-1]
    shown = path.encode("unicode_escape").decode("ascii")[:200]
    if any(ord(ch) < 0x20 or ord(ch) == 0x7F for ch in path) or "\\" in path:
        raise LocalHubRequestError(
            f"Invalid path in repo '{shown}': control characters and backslashes are refused."
        )
    if path.startswith("/"):
        raise LocalHubRequestError(f"Invalid path in repo '{shown}': absolute paths are refused.")
    if len(path.encode("utf-8")) > MAX_PATH_BYTES:
        raise LocalHubRequestError(f"Invalid path in repo '{shown}': longer than {MAX_PATH_BYTES} bytes.")
    for segment in path.split("/"):
        if segment in ("", ".", ".."):
            raise LocalHubRequestError(f"Invalid path in repo '{shown}': empty, '.' or '..' segment.")
        if segment == ".git":
            raise LocalHubRequestError(f"Invalid path in repo '{shown}': '.git' is reserved.")
    return path


def validate_ref_name(name: object, what: str = "branch") -> str:
    """Check a branch or tag name the client wants to create.

    Raises:
        LocalHubRequestError: If a segment is empty or starts with ``.``/``-``, the name
            ends in ``.lock``, looks like a commit hash, or exceeds 255 characters.
    """
    if (
        not isinstance(name, str)
        or not 0 < len(name) <= 255
        or _HEX40_RE.fullmatch(name)
        or name.endswith(".lock")
        or name.startswith("refs/")
        or not all(_REF_SEGMENT_RE.fullmatch(seg) for seg in name.split("/"))
        or ".." in name
    ):
        raise LocalHubRequestError(f"Invalid {what} name {name!r}.")
    return name


def is_commit_hash(value: str) -> bool:
    """Whether ``value`` is a full 40-hex commit id (lower case)."""
    return bool(_HEX40_RE.fullmatch(value))


def is_sha256(value: object) -> bool:
    """Whether ``value`` is a 64-hex SHA-256 (lower case), as LFS object ids are."""
    return isinstance(value, str) and bool(_SHA256_RE.fullmatch(value))
