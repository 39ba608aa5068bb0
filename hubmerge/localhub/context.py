"""Shared state of the local Hub app: store, token check, visibility rules, caches."""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import TypeVar

from hubmerge.errors import LocalHubAuthError, LocalHubNotFoundError

from .auth import TokenAuth
from .cards import RepoSummary, summarize
from .paths import REPO_TYPE_URL_PREFIXES
from .storage import Commit, RepoMeta, RepoRef, RepoStore

T = TypeVar("T")


class _LRU:
    """A small thread-safe LRU map for values derived from immutable commits."""

    def __init__(self, size: int):
        self._size = size
        self._data: OrderedDict[tuple, object] = OrderedDict()
        self._lock = threading.Lock()

    def get_or_compute(self, key: tuple, compute: Callable[[], T]) -> T:
        with self._lock:
            if key in self._data:
                self._data.move_to_end(key)
                return self._data[key]  # type: ignore[return-value]
        value = compute()
        with self._lock:
            self._data[key] = value
            while len(self._data) > self._size:
                self._data.popitem(last=False)
        return value


def repo_web_url(base_url: str, ref: RepoRef) -> str:
    """The repo's URL as the Hub returns it (``{endpoint}/[datasets/]ns/name``)."""
    return f"{base_url}/{REPO_TYPE_URL_PREFIXES[ref.repo_type]}{ref.repo_id}"


def git_tree_oids(commit: Commit) -> dict[str, str]:
    """Git tree object ids of every directory of ``commit`` (``""`` is the root).

    Computed exactly as git does (entries ``<mode> <name>\\0<20-byte id>``, sorted with
    directories compared as ``name/``), so ``oid`` values of folders are real git ids.
    """
    children: dict[str, dict[str, tuple[str, str]]] = {"": {}}
    for path in commit.tree:
        parts = path.split("/")
        for depth in range(1, len(parts)):
            children.setdefault("/".join(parts[:depth]), {})
    for path, entry in commit.tree.items():
        parent, _, name = path.rpartition("/")
        children[parent][name] = ("100644", entry.oid)
    for directory in children:
        if directory:
            parent, _, name = directory.rpartition("/")
            children[parent][name] = ("40000", "")
    oids: dict[str, str] = {}
    for directory in sorted(children, key=lambda d: d.count("/") if d else -1, reverse=True):
        body = b""
        items = children[directory]
        for name in sorted(items, key=lambda n: n + "/" if items[n][0] == "40000" else n):
            mode, oid = items[name]
            if mode == "40000":
                oid = oids[f"{directory}/{name}" if directory else name]
            body += f"{mode} {name}".encode() + b"\x00" + bytes.fromhex(oid)
        oids[directory] = hashlib.sha1(b"tree %d\x00" % len(body) + body).hexdigest()
    return oids


class HubContext:
    """Everything request handlers need.

    Args:
        store: The repo store.
        auth: The token checker.
        username: The user the token belongs to (default namespace, commit author).
    """

    def __init__(self, store: RepoStore, auth: TokenAuth, username: str):
        self.store = store
        self.auth = auth
        self.username = username
        self._summaries = _LRU(256)
        self._tree_oids = _LRU(256)

    def authenticate(self, authorization: str | None) -> bool:
        """``True`` with the right token, ``False`` without one; raises 401 for a wrong one."""
        return self.auth.check_header(authorization)

    @staticmethod
    def require_token(authed: bool) -> None:
        """Refuse anonymous writes with 401."""
        if not authed:
            raise LocalHubAuthError(
                "You must be authenticated (with the server's token) to do this.", status=401
            )

    def visible_repo(self, ref: RepoRef, authed: bool) -> RepoMeta:
        """The repo, if it exists and the caller may see it (private ones need the token).

        Raises:
            LocalHubNotFoundError: ``RepoNotFound`` otherwise, as the Hub answers.
        """
        meta = self.store.get_repo(ref)
        if meta.private and not authed:
            raise LocalHubNotFoundError(f"Repository {ref.repo_id} not found.", code="RepoNotFound")
        return meta

    def writable_repo(self, ref: RepoRef, authed: bool) -> RepoMeta:
        """The repo, for a write: 404 if invisible, 401 for an anonymous write to a public repo."""
        meta = self.visible_repo(ref, authed)
        self.require_token(authed)
        return meta

    def summary(self, meta: RepoMeta, commit: Commit) -> RepoSummary:
        """Card data, tags, config and safetensors info of a commit (cached)."""
        return self._summaries.get_or_compute(
            (meta.uid, commit.id), lambda: summarize(self.store, meta.ref.repo_type, commit)
        )

    def tree_oids(self, meta: RepoMeta, commit: Commit) -> dict[str, str]:
        """Git tree ids of the commit's directories (cached)."""
        return self._tree_oids.get_or_compute((meta.uid, commit.id), lambda: git_tree_oids(commit))
