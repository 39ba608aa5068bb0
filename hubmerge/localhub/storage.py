"""On-disk repo store of the local Hub: content-addressed blobs, commits and refs.

Layout of the data directory::

    DATA/.hubmerge-localhub         marks the directory as ours
    DATA/token                      server token (mode 0600), see ``auth.py``
    DATA/.lock                      held while a server uses DATA
    DATA/blobs/ab/cd/<sha256>       file contents, shared by all repos
    DATA/tmp/                       temp files, renamed into place when complete
    DATA/repos/<models|datasets>/<namespace>/<name>/
        repo.json                   visibility, creation date, incarnation id
        refs.json                   {"branches": {name: commit}, "tags": {name: commit}}
        commits/<commit id>.json    one immutable commit: parents, message, full tree

A commit stores the whole tree (path -> blob sha256, size, LFS flag, git oid), so every
revision stays readable by its hash. A commit is applied all-or-nothing: blobs are
content-addressed and written first, then the commit object is written under a temp name
and renamed, and finally ``refs.json`` is replaced with ``os.replace``. A failure before
that last rename leaves the repo as it was. Writes to one repo hold that repo's lock, so
concurrent commits are serialised and none is lost.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import secrets
import shutil
import stat
import tempfile
import threading
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, BinaryIO

from hubmerge.errors import (
    LocalHubConfigError,
    LocalHubConflictError,
    LocalHubNotFoundError,
    LocalHubRequestError,
)

from .gitmatch import DEFAULT_GITATTRIBUTES
from .paths import REPO_TYPE_PLURALS, is_commit_hash, is_sha256, validate_ref_name, validate_repo_part

if TYPE_CHECKING:
    from typing_extensions import Self

logger = logging.getLogger(__name__)

#: Files larger than this must go through LFS, as on the Hub.
MAX_REGULAR_FILE_SIZE = 10 * 1024 * 1024
_LFS_POINTER = "version https://git-lfs.github.com/spec/v1\noid sha256:{oid}\nsize {size}\n"
_COMMIT_CACHE_SIZE = 512
#: Marks a directory as a local Hub data directory (so a wrong --data is refused, not modified).
MARKER_FILE = ".hubmerge-localhub"

try:  # POSIX: keep two servers from sharing one data directory
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]


def utc_now() -> str:
    """The current time in the Hub's format (``2024-05-01T12:00:00.123Z``)."""
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def git_blob_oid(data: bytes) -> str:
    """Git's object id of a blob with this content (``sha1("blob <len>\\0" + data)``)."""
    return hashlib.sha1(b"blob %d\x00" % len(data) + data).hexdigest()


def lfs_pointer(sha256: str, size: int) -> bytes:
    """The LFS pointer file git stores in place of an LFS file's content."""
    return _LFS_POINTER.format(oid=sha256, size=size).encode()


@dataclass(frozen=True)
class RepoRef:
    """Identifies a repo: its type and ``namespace/name``."""

    repo_type: str
    namespace: str
    name: str

    @property
    def repo_id(self) -> str:
        """``namespace/name``."""
        return f"{self.namespace}/{self.name}"


@dataclass(frozen=True)
class TreeEntry:
    """One file of a commit's tree.

    Attributes:
        sha256: SHA-256 of the content (the blob's key; the LFS oid for LFS files).
        size: Size of the content in bytes.
        lfs: Whether the file is stored through LFS.
        oid: Git object id: of the content for regular files, of the pointer for LFS files.
    """

    sha256: str
    size: int
    lfs: bool
    oid: str

    @property
    def pointer_size(self) -> int:
        """Size of the LFS pointer file (meaningful for LFS files)."""
        return len(lfs_pointer(self.sha256, self.size))

    @classmethod
    def for_content(cls, sha256: str, size: int, lfs: bool, content: bytes | None = None) -> TreeEntry:
        """Build an entry; ``content`` is required for regular files to compute their git oid."""
        if lfs:
            return cls(sha256, size, True, git_blob_oid(lfs_pointer(sha256, size)))
        if content is None:
            raise ValueError("content is required for a regular file")
        return cls(sha256, size, False, git_blob_oid(content))


@dataclass(frozen=True)
class Commit:
    """An immutable commit: metadata plus the full tree (path -> entry)."""

    id: str
    parents: tuple[str, ...]
    title: str
    message: str
    author: str
    date: str
    tree: Mapping[str, TreeEntry]

    def directories(self) -> set[str]:
        """All directory paths implied by the tree's files."""
        dirs: set[str] = set()
        for path in self.tree:
            parts = path.split("/")[:-1]
            for depth in range(1, len(parts) + 1):
                dirs.add("/".join(parts[:depth]))
        return dirs


@dataclass(frozen=True)
class RepoMeta:
    """A repo's settings as stored in ``repo.json``."""

    ref: RepoRef
    uid: str
    private: bool
    created_at: str
    path: Path = field(compare=False)


@dataclass(frozen=True)
class AddFile:
    """Commit operation: add or replace ``path`` with an already-stored blob."""

    path: str
    sha256: str
    size: int
    lfs: bool
    oid: str | None = None  # git oid, computed when the blob is stored (regular files)


@dataclass(frozen=True)
class DeleteFile:
    """Commit operation: delete the file ``path`` (it must exist)."""

    path: str


@dataclass(frozen=True)
class DeleteFolder:
    """Commit operation: delete every file under ``path/`` (at least one must exist)."""

    path: str


CommitOp = AddFile | DeleteFile | DeleteFolder


class BlobUpload:
    """A blob being written in chunks; it appears in the store only after :meth:`finish`.

    Args:
        store: The store to write into.
        expected_sha256: The oid the content must hash to.
        expected_size: The size the content must have.
    """

    def __init__(self, store: RepoStore, expected_sha256: str, expected_size: int):
        self._store = store
        self.expected_sha256 = expected_sha256
        self.expected_size = expected_size
        self._hash = hashlib.sha256()
        self.received = 0
        fd, tmp = tempfile.mkstemp(dir=store.tmp_dir, prefix="upload-")
        self._tmp = Path(tmp)
        self._file: BinaryIO = os.fdopen(fd, "wb")

    def write(self, chunk: bytes) -> None:
        """Append a chunk; refuses more bytes than announced.

        Raises:
            LocalHubRequestError: If the upload exceeds the announced size.
        """
        self.received += len(chunk)
        if self.received > self.expected_size:
            raise LocalHubRequestError(
                f"LFS upload exceeds the announced size of {self.expected_size} bytes."
            )
        self._hash.update(chunk)
        self._file.write(chunk)

    def finish(self) -> None:
        """Verify size and hash, then move the blob into the store.

        Raises:
            LocalHubRequestError: If the content does not match the announced oid or size.
        """
        try:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            if self.received != self.expected_size:
                raise LocalHubRequestError(
                    f"LFS upload is {self.received} bytes, {self.expected_size} were announced."
                )
            if self._hash.hexdigest() != self.expected_sha256:
                raise LocalHubRequestError("LFS upload does not match its announced sha256.")
            self._store._install_blob(self._tmp, self.expected_sha256)
        finally:
            self.abort()

    def abort(self) -> None:
        """Drop the partial upload (no-op once finished)."""
        if not self._file.closed:
            self._file.close()
        self._tmp.unlink(missing_ok=True)


class RepoStore:
    """The repo store in a data directory; see the module docstring for the layout.

    Args:
        data_dir: Where everything lives; created (mode 0700) if missing.
        lock: Take an exclusive lock on the directory so a second server cannot use it.

    Raises:
        LocalHubConfigError: If the directory is unusable or locked by another server.
    """

    def __init__(self, data_dir: str | os.PathLike[str], *, lock: bool = True):
        self.data_dir = Path(data_dir).expanduser().resolve()
        try:
            self.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
            marker = self.data_dir / MARKER_FILE
            if not marker.exists():
                if any(self.data_dir.iterdir()):
                    raise LocalHubConfigError(
                        f"{self.data_dir} is not empty and is not a local Hub data directory; use an empty or"
                        " new directory."
                    )
                marker.write_text('{"format": 1}\n')
            mode = stat.S_IMODE(self.data_dir.stat().st_mode)
            if mode & 0o077:
                logger.warning(
                    "Data directory %s is accessible to other users (mode %o); private repos live here.",
                    self.data_dir,
                    mode,
                )
            self.blobs_dir = self.data_dir / "blobs"
            self.tmp_dir = self.data_dir / "tmp"
            self.repos_dir = self.data_dir / "repos"
            for directory in (self.blobs_dir, self.tmp_dir, self.repos_dir):
                directory.mkdir(exist_ok=True, mode=0o700)
        except OSError as exc:
            raise LocalHubConfigError(f"Cannot use data directory {self.data_dir}: {exc}") from exc
        self._lock_file = self._acquire_dir_lock() if lock else None
        self._clean_tmp()
        self._guard = threading.Lock()
        self._repo_locks: dict[RepoRef, threading.RLock] = {}
        self._commit_cache: OrderedDict[tuple[str, str], Commit] = OrderedDict()

    # ------------------------------------------------------------------ lifecycle

    def _acquire_dir_lock(self) -> BinaryIO | None:
        if fcntl is None:  # pragma: no cover - Windows
            return None
        handle = open(self.data_dir / ".lock", "a+b")  # noqa: SIM115 - held for the store's lifetime
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            handle.close()
            raise LocalHubConfigError(
                f"Data directory {self.data_dir} is in use by another local Hub server."
            ) from exc
        return handle

    def _clean_tmp(self) -> None:
        """Remove leftovers of writes interrupted by a crash (never part of any repo)."""
        for leftover in self.tmp_dir.iterdir():
            if leftover.is_dir() and not leftover.is_symlink():
                shutil.rmtree(leftover, ignore_errors=True)
            else:
                leftover.unlink(missing_ok=True)

    def close(self) -> None:
        """Release the data-directory lock."""
        if self._lock_file is not None:
            if fcntl is not None:
                fcntl.flock(self._lock_file.fileno(), fcntl.LOCK_UN)
            self._lock_file.close()
            self._lock_file = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # ------------------------------------------------------------------ low-level io

    def _write_atomic(self, target: Path, data: bytes) -> None:
        """Write ``data`` to a temp file, fsync it, and rename it over ``target``."""
        fd, tmp = tempfile.mkstemp(dir=self.tmp_dir, prefix="write-")
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    @staticmethod
    def _read_json(path: Path) -> dict:
        with open(path, "rb") as handle:
            return json.load(handle)

    def _lock_for(self, ref: RepoRef) -> threading.RLock:
        with self._guard:
            return self._repo_locks.setdefault(ref, threading.RLock())

    # ------------------------------------------------------------------ blobs

    def blob_path(self, sha256: str) -> Path:
        """Where the blob with this sha256 lives (whether or not it exists)."""
        if not is_sha256(sha256):
            raise LocalHubRequestError(f"Invalid sha256 {sha256!r}.")
        return self.blobs_dir / sha256[:2] / sha256[2:4] / sha256

    def has_blob(self, sha256: str, size: int | None = None) -> bool:
        """Whether the blob is stored (and, if ``size`` is given, has that size)."""
        try:
            actual = self.blob_path(sha256).stat().st_size
        except (FileNotFoundError, LocalHubRequestError):
            return False
        return size is None or actual == size

    def _install_blob(self, tmp: Path, sha256: str) -> None:
        target = self.blob_path(sha256)
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.exists():
            tmp.unlink(missing_ok=True)
        else:
            os.replace(tmp, target)

    def put_blob(self, data: bytes) -> tuple[str, int]:
        """Store ``data`` (idempotent).

        Returns:
            ``(sha256, size)`` of the stored blob.
        """
        sha256 = hashlib.sha256(data).hexdigest()
        if not self.has_blob(sha256, len(data)):
            fd, tmp = tempfile.mkstemp(dir=self.tmp_dir, prefix="blob-")
            try:
                with os.fdopen(fd, "wb") as handle:
                    handle.write(data)
                    handle.flush()
                    os.fsync(handle.fileno())
                self._install_blob(Path(tmp), sha256)
            finally:
                Path(tmp).unlink(missing_ok=True)
        return sha256, len(data)

    def begin_upload(self, sha256: str, size: int) -> BlobUpload:
        """Start a chunked upload of a blob with a known oid and size."""
        return BlobUpload(self, sha256, size)

    def read_blob(self, sha256: str, limit: int | None = None) -> bytes:
        """Read a blob (or its first ``limit`` bytes)."""
        with open(self.blob_path(sha256), "rb") as handle:
            return handle.read() if limit is None else handle.read(limit)

    # ------------------------------------------------------------------ repos

    def _repo_dir(self, ref: RepoRef) -> Path:
        validate_repo_part(ref.namespace, "namespace")
        validate_repo_part(ref.name, "repo name")
        path = (self.repos_dir / REPO_TYPE_PLURALS[ref.repo_type] / ref.namespace / ref.name).resolve()
        if self.repos_dir not in path.parents:  # defence in depth; validation already forbids this
            raise LocalHubRequestError(f"Invalid repo id {ref.repo_id!r}.")
        return path

    def get_repo(self, ref: RepoRef) -> RepoMeta:
        """Load a repo's settings.

        Raises:
            LocalHubNotFoundError: ``RepoNotFound`` if it does not exist.
        """
        path = self._repo_dir(ref)
        try:
            data = self._read_json(path / "repo.json")
        except FileNotFoundError:
            raise LocalHubNotFoundError(f"Repository {ref.repo_id} not found.", code="RepoNotFound") from None
        return RepoMeta(ref, data["uid"], bool(data["private"]), data["createdAt"], path)

    def list_repos(self, repo_type: str) -> list[RepoMeta]:
        """All repos of a type, sorted by id."""
        metas = []
        root = self.repos_dir / REPO_TYPE_PLURALS[repo_type]
        if root.is_dir():
            for ns_dir in sorted(root.iterdir()):
                if not ns_dir.is_dir():
                    continue
                for repo_dir in sorted(ns_dir.iterdir()):
                    try:
                        metas.append(self.get_repo(RepoRef(repo_type, ns_dir.name, repo_dir.name)))
                    except (LocalHubNotFoundError, LocalHubRequestError):
                        continue
        return metas

    def create_repo(self, ref: RepoRef, *, private: bool, author: str) -> RepoMeta:
        """Create a repo with an initial commit holding the default ``.gitattributes``.

        Raises:
            LocalHubConflictError: If the repo exists (409).
        """
        path = self._repo_dir(ref)
        with self._lock_for(ref):
            if (path / "repo.json").exists():
                raise LocalHubConflictError(f"You already created this {ref.repo_type} repo: {ref.repo_id}.")
            staging = Path(tempfile.mkdtemp(dir=self.tmp_dir, prefix="repo-"))
            try:
                meta = {"uid": secrets.token_hex(12), "private": private, "createdAt": utc_now()}
                content = DEFAULT_GITATTRIBUTES.encode()
                sha256, size = self.put_blob(content)
                tree = {".gitattributes": TreeEntry.for_content(sha256, size, False, content)}
                commit = self._make_commit((), "initial commit", "", author, tree)
                (staging / "commits").mkdir()
                (staging / "commits" / f"{commit.id}.json").write_bytes(_commit_to_json(commit))
                (staging / "refs.json").write_bytes(_dump({"branches": {"main": commit.id}, "tags": {}}))
                (staging / "repo.json").write_bytes(_dump(meta))
                path.parent.mkdir(parents=True, exist_ok=True)
                if path.exists():  # left over by a delete interrupted by a crash
                    shutil.rmtree(path)
                os.replace(staging, path)
            except BaseException:
                shutil.rmtree(staging, ignore_errors=True)
                raise
        logger.info("Created %s repo %s (private=%s)", ref.repo_type, ref.repo_id, private)
        return self.get_repo(ref)

    def delete_repo(self, ref: RepoRef) -> None:
        """Delete a repo: it disappears at once (renamed away), then its files are removed.

        Blobs stay in the shared blob store.

        Raises:
            LocalHubNotFoundError: If it does not exist.
        """
        with self._lock_for(ref):
            meta = self.get_repo(ref)
            graveyard = Path(tempfile.mkdtemp(dir=self.tmp_dir, prefix="deleted-"))
            os.replace(meta.path, graveyard / "repo")
        shutil.rmtree(graveyard, ignore_errors=True)
        logger.info("Deleted %s repo %s", ref.repo_type, ref.repo_id)

    def set_private(self, ref: RepoRef, private: bool) -> RepoMeta:
        """Change a repo's visibility."""
        with self._lock_for(ref):
            meta = self.get_repo(ref)
            data = self._read_json(meta.path / "repo.json")
            data["private"] = private
            self._write_atomic(meta.path / "repo.json", _dump(data))
        return self.get_repo(ref)

    # ------------------------------------------------------------------ refs and commits

    def refs(self, meta: RepoMeta) -> dict[str, dict[str, str]]:
        """``{"branches": {name: commit}, "tags": {name: commit}}``."""
        data = self._read_json(meta.path / "refs.json")
        return {"branches": dict(data.get("branches", {})), "tags": dict(data.get("tags", {}))}

    def _switch_refs(self, meta: RepoMeta, refs: Mapping[str, Mapping[str, str]]) -> None:
        """Atomically replace the repo's refs (the commit point of every write)."""
        self._write_atomic(meta.path / "refs.json", _dump(refs))

    def load_commit(self, meta: RepoMeta, commit_id: str) -> Commit:
        """Load a commit of this repo.

        Raises:
            LocalHubNotFoundError: ``RevisionNotFound`` if the repo has no such commit.
        """
        key = (meta.uid, commit_id)
        with self._guard:
            cached = self._commit_cache.get(key)
            if cached is not None:
                self._commit_cache.move_to_end(key)
                return cached
        if not is_commit_hash(commit_id):
            raise LocalHubNotFoundError(f"Invalid rev id: {commit_id}", code="RevisionNotFound")
        try:
            commit = _commit_from_json(self._read_json(meta.path / "commits" / f"{commit_id}.json"))
        except FileNotFoundError:
            raise LocalHubNotFoundError(f"Invalid rev id: {commit_id}", code="RevisionNotFound") from None
        with self._guard:
            self._commit_cache[key] = commit
            while len(self._commit_cache) > _COMMIT_CACHE_SIZE:
                self._commit_cache.popitem(last=False)
        return commit

    def resolve(self, meta: RepoMeta, revision: str | None) -> Commit:
        """Resolve a branch, tag, ``refs/heads|tags/...`` or commit id to a commit.

        Raises:
            LocalHubNotFoundError: ``RevisionNotFound`` if nothing matches.
        """
        revision = revision or "main"
        refs = self.refs(meta)
        for prefix, kind in (("refs/heads/", "branches"), ("refs/tags/", "tags")):
            if revision.startswith(prefix) and revision[len(prefix) :] in refs[kind]:
                return self.load_commit(meta, refs[kind][revision[len(prefix) :]])
        if revision in refs["branches"]:
            return self.load_commit(meta, refs["branches"][revision])
        if revision in refs["tags"]:
            return self.load_commit(meta, refs["tags"][revision])
        if is_commit_hash(revision):
            return self.load_commit(meta, revision)
        raise LocalHubNotFoundError(f"Invalid rev id: {revision}", code="RevisionNotFound")

    def history(self, meta: RepoMeta, commit: Commit) -> Iterator[Commit]:
        """Walk first parents from ``commit`` (newest first)."""
        current: Commit | None = commit
        while current is not None:
            yield current
            current = self.load_commit(meta, current.parents[0]) if current.parents else None

    def _make_commit(
        self, parents: tuple[str, ...], title: str, message: str, author: str, tree: Mapping[str, TreeEntry]
    ) -> Commit:
        body = {
            "parents": list(parents),
            "title": title,
            "message": message,
            "author": author,
            "date": utc_now(),
            "tree": {path: _entry_to_json(entry) for path, entry in sorted(tree.items())},
        }
        commit_id = hashlib.sha1(b"commit\x00" + _dump(body)).hexdigest()
        return _commit_from_json({"id": commit_id, **body})

    def commit(
        self,
        ref: RepoRef,
        *,
        branch: str,
        operations: Iterable[CommitOp],
        title: str,
        message: str,
        author: str,
        parent_commit: str | None = None,
    ) -> Commit:
        """Apply ``operations`` on top of ``branch`` as one new commit, all or nothing.

        Blobs of added files must already be stored (``put_blob`` / LFS upload).

        Args:
            ref: The repo.
            branch: Branch to commit to (must exist).
            operations: Additions and deletions, applied in order.
            title: Commit summary.
            message: Commit description.
            author: User name recorded as author.
            parent_commit: If given, the commit fails unless the branch head is this commit
                (a full id or a prefix of at least 5 characters).

        Returns:
            The new commit.

        Raises:
            LocalHubNotFoundError: Unknown repo/branch (404), deleting a missing file (``EntryNotFound``).
            LocalHubConflictError: ``parent_commit`` is not the head any more (412).
            LocalHubRequestError: An LFS blob was never uploaded, a file/folder clash, a
                regular file above 10 MiB (400).
        """
        with self._lock_for(ref):
            meta = self.get_repo(ref)
            refs = self.refs(meta)
            if branch not in refs["branches"]:
                raise LocalHubNotFoundError(
                    f"Invalid rev id: {branch} is not a branch", code="RevisionNotFound"
                )
            head = self.load_commit(meta, refs["branches"][branch])
            if parent_commit is not None and not (
                len(parent_commit) >= 5 and head.id.startswith(parent_commit.lower())
            ):
                raise LocalHubConflictError(
                    "A commit has happened since. Please refresh and try again."
                    f" (parentCommit {parent_commit}, head of {branch} is {head.id})",
                    status=412,
                )
            tree = _apply_operations(self, dict(head.tree), operations)
            commit = self._make_commit((head.id,), title, message, author, tree)
            commit_file = meta.path / "commits" / f"{commit.id}.json"
            self._write_atomic(commit_file, _commit_to_json(commit))
            try:
                refs["branches"][branch] = commit.id
                self._switch_refs(meta, refs)
            except BaseException:
                commit_file.unlink(missing_ok=True)
                raise
        logger.info("Committed %s to %s@%s", commit.id[:12], ref.repo_id, branch)
        return commit

    def create_ref(self, ref: RepoRef, kind: str, name: str, revision: str | None) -> Commit:
        """Create a branch or tag pointing at ``revision`` (default ``main``).

        Args:
            ref: The repo.
            kind: ``"branches"`` or ``"tags"``.
            name: The new ref's name.
            revision: Starting point.

        Raises:
            LocalHubConflictError: If a branch or tag of that name exists (409).
        """
        validate_ref_name(name, "branch" if kind == "branches" else "tag")
        with self._lock_for(ref):
            meta = self.get_repo(ref)
            target = self.resolve(meta, revision)
            refs = self.refs(meta)
            if name in refs["branches"] or name in refs["tags"]:
                raise LocalHubConflictError(f"Reference already exists: {name}")
            refs[kind][name] = target.id
            self._switch_refs(meta, refs)
        return target

    def delete_ref(self, ref: RepoRef, kind: str, name: str) -> None:
        """Delete a branch (not ``main``) or a tag.

        Raises:
            LocalHubNotFoundError: If it does not exist.
            LocalHubRequestError: For ``main``.
        """
        with self._lock_for(ref):
            meta = self.get_repo(ref)
            refs = self.refs(meta)
            if kind == "branches" and name == "main":
                raise LocalHubRequestError("Cannot delete the main branch.")
            if name not in refs[kind]:
                raise LocalHubNotFoundError(f"Invalid rev id: {name}", code="RevisionNotFound")
            del refs[kind][name]
            self._switch_refs(meta, refs)


def _apply_operations(store: RepoStore, tree: dict[str, TreeEntry], operations: Iterable[CommitOp]) -> dict:
    """Apply operations to a tree copy; validates blobs and file/folder clashes."""
    for op in operations:
        if isinstance(op, AddFile):
            if not store.has_blob(op.sha256, op.size):
                raise LocalHubRequestError(
                    f"Your push was rejected because an LFS pointer pointed to a file that does not exist:"
                    f" {op.path} (oid {op.sha256}). Upload it through the LFS batch API first."
                )
            if not op.lfs and op.size > MAX_REGULAR_FILE_SIZE:
                raise LocalHubRequestError(
                    f"Your push was rejected because {op.path} is larger than 10 MiB; upload it through LFS."
                )
            if op.lfs:
                entry = TreeEntry.for_content(op.sha256, op.size, True)
            elif op.oid is not None:
                entry = TreeEntry(op.sha256, op.size, False, op.oid)
            else:
                entry = TreeEntry.for_content(op.sha256, op.size, False, store.read_blob(op.sha256))
            tree[op.path] = entry
        elif isinstance(op, DeleteFile):
            if op.path not in tree:
                raise LocalHubNotFoundError(
                    f"A file with this name doesn't exist: {op.path}", code="EntryNotFound"
                )
            del tree[op.path]
        else:
            prefix = op.path + "/"
            doomed = [path for path in tree if path.startswith(prefix)]
            if not doomed:
                raise LocalHubNotFoundError(
                    f"A folder with this name doesn't exist: {op.path}", code="EntryNotFound"
                )
            for path in doomed:
                del tree[path]
    for path in tree:
        parts = path.split("/")
        for depth in range(1, len(parts)):
            if "/".join(parts[:depth]) in tree:
                raise LocalHubRequestError(
                    f"Path conflict: '{'/'.join(parts[:depth])}' is a file and a folder."
                )
    return tree


def _dump(data: object) -> bytes:
    return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def _entry_to_json(entry: TreeEntry) -> dict:
    return {"sha256": entry.sha256, "size": entry.size, "lfs": entry.lfs, "oid": entry.oid}


def _commit_to_json(commit: Commit) -> bytes:
    return _dump(
        {
            "id": commit.id,
            "parents": list(commit.parents),
            "title": commit.title,
            "message": commit.message,
            "author": commit.author,
            "date": commit.date,
            "tree": {path: _entry_to_json(entry) for path, entry in commit.tree.items()},
        }
    )


def _commit_from_json(data: dict) -> Commit:
    tree = {
        path: TreeEntry(raw["sha256"], int(raw["size"]), bool(raw["lfs"]), raw["oid"])
        for path, raw in data["tree"].items()
    }
    return Commit(
        id=data["id"],
        parents=tuple(data["parents"]),
        title=data["title"],
        message=data["message"],
        author=data["author"],
        date=data["date"],
        tree=MappingProxyType(tree),
    )
