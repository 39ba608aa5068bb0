"""JSON endpoints of the local Hub: repos, info, listings, tree, refs, commits, settings.

Each function takes the parsed request pieces, does blocking store work (the app runs it
in a thread pool) and returns ``(status, json_body)`` or ``(status, body, headers)``. The
JSON shapes are those ``huggingface_hub`` parses (``ModelInfo``, ``RepoFile``,
``GitRefs``, ...).
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Iterable, Mapping
from typing import Any
from urllib.parse import urlencode

from hubmerge.errors import LocalHubConflictError, LocalHubNotFoundError, LocalHubRequestError

from .cards import validate_card
from .context import HubContext, repo_web_url
from .gitmatch import GitAttributes, GitIgnore
from .paths import validate_path_in_repo, validate_repo_part, validate_repo_type
from .storage import MAX_REGULAR_FILE_SIZE, Commit, RepoMeta, RepoRef

TREE_PAGE_SIZE = 1000
TREE_EXPAND_PAGE_SIZE = 100
LIST_PAGE_SIZE = 1000
COMMITS_PAGE_SIZE = 100
#: Namespaces that would make URLs ambiguous (``/datasets/...``, ``/api/...``).
RESERVED_NAMESPACES = {"api", "datasets", "models", "spaces", "kernels", "buckets", "docs", "settings"}

JsonResult = tuple[int, Any] | tuple[int, Any, dict[str, str]]


def _truthy(value: str | None) -> bool:
    return value is not None and value.lower() in ("1", "true", "yes", "on")


def _page(items: list, offset: int, size: int, next_url: str) -> tuple[list, dict[str, str]]:
    """Slice a page and build the ``Link: <...>; rel="next"`` header if more remain."""
    page = items[offset : offset + size]
    headers = {}
    if offset + size < len(items):
        headers["Link"] = f'<{next_url}{offset + size}>; rel="next"'
    return page, headers


def _offset(query: Mapping[str, list[str]]) -> int:
    try:
        return max(0, int(query.get("cursor", ["0"])[0]))
    except ValueError:
        raise LocalHubRequestError("Invalid cursor.") from None


def _next_url(base_url: str, path: str, query: Mapping[str, list[str]]) -> str:
    """URL of the next page: same query, with ``cursor=`` left open at the end."""
    kept = [(k, v) for k, values in query.items() if k != "cursor" for v in values]
    prefix = urlencode(kept)
    return f"{base_url}{path}?{prefix + '&' if prefix else ''}cursor="


# ---------------------------------------------------------------------- account & repos


def whoami(ctx: HubContext, authed: bool) -> JsonResult:
    """``GET /api/whoami-v2``: the token's user."""
    ctx.require_token(authed)
    return 200, {
        "type": "user",
        "id": ctx.username,
        "name": ctx.username,
        "fullname": ctx.username,
        "isPro": False,
        "canPay": False,
        "orgs": [],
        "auth": {
            "type": "access_token",
            "accessToken": {"displayName": "hubmerge-localhub", "role": "write"},
        },
    }


def validate_yaml(body: Mapping[str, Any]) -> JsonResult:
    """``POST /api/validate-yaml``: check a README's metadata header."""
    content = body.get("content")
    if not isinstance(content, str):
        raise LocalHubRequestError("'content' must be a string.")
    errors, warnings = validate_card(content)
    return (400 if errors else 200), {"errors": errors, "warnings": warnings}


def _ref_from_body(ctx: HubContext, body: Mapping[str, Any]) -> RepoRef:
    repo_type = validate_repo_type(body.get("type"))
    name = validate_repo_part(body.get("name"), "repo name")
    namespace = body.get("organization") or ctx.username
    validate_repo_part(namespace, "namespace")
    return RepoRef(repo_type, namespace, name)


def create_repo(ctx: HubContext, authed: bool, body: Mapping[str, Any], base_url: str) -> JsonResult:
    """``POST /api/repos/create``: ``{name, organization, type, visibility|private}``."""
    ctx.require_token(authed)
    ref = _ref_from_body(ctx, body)
    if ref.namespace.lower() in RESERVED_NAMESPACES:
        raise LocalHubRequestError(f"The namespace '{ref.namespace}' is reserved.")
    visibility = body.get("visibility")
    if visibility not in (None, "public", "private"):
        raise LocalHubRequestError(f"Unsupported visibility {visibility!r}.")
    private = visibility == "private" if visibility is not None else bool(body.get("private", False))
    url = repo_web_url(base_url, ref)
    try:
        meta = ctx.store.create_repo(ref, private=private, author=ctx.username)
    except LocalHubConflictError as exc:
        return 409, {"error": str(exc), "url": url}
    return 200, {"url": url, "name": ref.repo_id, "id": meta.uid}


def delete_repo(ctx: HubContext, authed: bool, body: Mapping[str, Any]) -> JsonResult:
    """``DELETE /api/repos/delete``: ``{name, organization, type}``."""
    ref = _ref_from_body(ctx, body)
    ctx.writable_repo(ref, authed)
    ctx.store.delete_repo(ref)
    return 200, {}


def update_settings(ctx: HubContext, authed: bool, ref: RepoRef, body: Mapping[str, Any]) -> JsonResult:
    """``PUT /api/{type}s/{repo}/settings``: visibility (gating is not supported)."""
    ctx.writable_repo(ref, authed)
    if body.get("gated") not in (None, False):
        raise LocalHubRequestError("Gated repos are not supported by this server.")
    visibility = body.get("visibility")
    private = body.get("private")
    if visibility is not None:
        if visibility not in ("public", "private"):
            raise LocalHubRequestError(f"Unsupported visibility {visibility!r}.")
        private = visibility == "private"
    if private is not None:
        ctx.store.set_private(ref, bool(private))
    return 200, {}


# ---------------------------------------------------------------------- info & listings


def _siblings(commit: Commit, blobs: bool) -> list[dict]:
    siblings = []
    for path in sorted(commit.tree):
        item: dict[str, Any] = {"rfilename": path}
        if blobs:
            entry = commit.tree[path]
            item.update(size=entry.size, blobId=entry.oid)
            if entry.lfs:
                item["lfs"] = {"size": entry.size, "sha256": entry.sha256, "pointerSize": entry.pointer_size}
        siblings.append(item)
    return siblings


def repo_info_dict(ctx: HubContext, meta: RepoMeta, commit: Commit, *, blobs: bool = False) -> dict[str, Any]:
    """Everything ``model_info``/``dataset_info`` reports about a repo at a commit."""
    summary = ctx.summary(meta, commit)
    ref = meta.ref
    data: dict[str, Any] = {
        "_id": meta.uid,
        "id": ref.repo_id,
        "author": ref.namespace,
        "sha": commit.id,
        "lastModified": commit.date,
        "createdAt": meta.created_at,
        "private": meta.private,
        "gated": False,
        "disabled": False,
        "tags": summary.tags,
        "siblings": _siblings(commit, blobs),
    }
    if summary.card_data is not None:
        data["cardData"] = summary.card_data
    if ref.repo_type == "model":
        data["modelId"] = ref.repo_id
        for key, value in (
            ("library_name", summary.library_name),
            ("pipeline_tag", summary.pipeline_tag),
            ("config", summary.config),
            ("safetensors", summary.safetensors),
        ):
            if value is not None:
                data[key] = value
    return data


def _expand_fields(query: Mapping[str, list[str]]) -> list[str] | None:
    fields = query.get("expand", []) + query.get("expand[]", [])
    return fields or None


def _only(data: dict[str, Any], fields: Iterable[str]) -> dict[str, Any]:
    keep = {"_id", "id", *fields}
    return {k: v for k, v in data.items() if k in keep}


def repo_info(
    ctx: HubContext, authed: bool, ref: RepoRef, revision: str | None, query: Mapping[str, list[str]]
) -> JsonResult:
    """``GET /api/{type}s/{repo}[/revision/{rev}]``; ``blobs=1`` adds sizes and LFS info."""
    meta = ctx.visible_repo(ref, authed)
    commit = ctx.store.resolve(meta, revision)
    data = repo_info_dict(ctx, meta, commit, blobs=_truthy(query.get("blobs", [None])[0]))
    expand = _expand_fields(query)
    return 200, (_only(data, expand) if expand else data)


def list_repos(
    ctx: HubContext, authed: bool, repo_type: str, query: Mapping[str, list[str]], base_url: str, path: str
) -> JsonResult:
    """``GET /api/models`` (or datasets): ``search``, ``author``, ``filter`` (tags, all must
    match), ``sort`` (``lastModified``, ``createdAt``, ``id``; others are all zero here),
    ``direction``, ``limit``, ``full``, ``cardData``, ``config``, ``expand``; paginated."""
    searches = [s.lower() for s in query.get("search", []) if s]
    author = query.get("author", [None])[0]
    filters = [f for f in query.get("filter", []) if f]
    rows = []
    for meta in ctx.store.list_repos(repo_type):
        ref = meta.ref
        if meta.private and not authed:
            continue
        if author and ref.namespace != author:
            continue
        if any(s not in ref.repo_id.lower() for s in searches):
            continue
        try:
            commit = ctx.store.resolve(meta, "main")
        except LocalHubNotFoundError:
            continue
        info = repo_info_dict(ctx, meta, commit)
        if any(f not in info["tags"] for f in filters):
            continue
        rows.append(info)
    sort = query.get("sort", [None])[0]
    if sort in ("lastModified", "createdAt", "id"):
        descending = query.get("direction", ["-1"])[0] == "-1"
        rows.sort(key=lambda row: row[sort], reverse=descending)
    try:
        limit = int(query["limit"][0]) if "limit" in query else None
    except ValueError:
        raise LocalHubRequestError("Invalid limit.") from None
    if limit is not None:
        rows = rows[: max(limit, 0)]
    expand = _expand_fields(query)
    if expand:
        rows = [_only(row, expand) for row in rows]
    else:
        fields = ["private", "tags", "createdAt", "modelId", "library_name", "pipeline_tag", "author"]
        if _truthy(query.get("full", [None])[0]):
            fields += ["sha", "lastModified", "siblings", "gated", "disabled"]
        if _truthy(query.get("cardData", [None])[0]):
            fields.append("cardData")
        if _truthy(query.get("config", [None])[0]):
            fields.append("config")
        rows = [_only(row, fields) for row in rows]
    page, headers = _page(rows, _offset(query), LIST_PAGE_SIZE, _next_url(base_url, path, query))
    return 200, page, headers


# ---------------------------------------------------------------------- tree, paths, refs, commits


def _last_commits(ctx: HubContext, meta: RepoMeta, commit: Commit, paths: dict[str, bool]) -> dict[str, dict]:
    """For each path (``True`` = folder), the newest commit that changed it."""
    found: dict[str, dict] = {}
    pending = dict(paths)
    for current in ctx.store.history(meta, commit):
        parent = ctx.store.load_commit(meta, current.parents[0]) if current.parents else None
        if parent is None:
            changed = set(current.tree)
        else:
            changed = {
                p
                for p in current.tree.keys() | parent.tree.keys()
                if current.tree.get(p) != parent.tree.get(p)
            }
        info = {"id": current.id, "title": current.title, "date": current.date}
        for path, is_dir in list(pending.items()):
            hit = any(c.startswith(path + "/") for c in changed) if is_dir else path in changed
            if hit:
                found[path] = info
                del pending[path]
        if not pending:
            break
    return found


def _entry_json(meta: RepoMeta, commit: Commit, tree_oids: dict[str, str], path: str) -> dict[str, Any]:
    entry = commit.tree.get(path)
    if entry is None:
        return {"type": "directory", "oid": tree_oids[path], "size": 0, "path": path}
    item: dict[str, Any] = {"type": "file", "oid": entry.oid, "size": entry.size, "path": path}
    if entry.lfs:
        item["lfs"] = {"oid": entry.sha256, "size": entry.size, "pointerSize": entry.pointer_size}
    return item


def _with_last_commits(ctx: HubContext, meta: RepoMeta, commit: Commit, items: list[dict]) -> list[dict]:
    last = _last_commits(ctx, meta, commit, {i["path"]: i["type"] == "directory" for i in items})
    for item in items:
        if item["path"] in last:
            item["lastCommit"] = last[item["path"]]
    return items


def list_tree(
    ctx: HubContext,
    authed: bool,
    ref: RepoRef,
    revision: str,
    path: str,
    query: Mapping[str, list[str]],
    base_url: str,
    url_path: str,
) -> JsonResult:
    """``GET /api/{type}s/{repo}/tree/{rev}[/{path}]``: files and folders, ``recursive``,
    ``expand`` (adds ``lastCommit``); paginated with ``Link`` headers."""
    meta = ctx.visible_repo(ref, authed)
    commit = ctx.store.resolve(meta, revision)
    tree_oids = ctx.tree_oids(meta, commit)
    if path:
        path = validate_path_in_repo(path, folder=True)
        if path not in tree_oids:
            raise LocalHubNotFoundError(
                f"{path} is not a folder of {ref.repo_id}@{revision}.", code="EntryNotFound"
            )
    recursive = _truthy(query.get("recursive", [None])[0])
    expand = _truthy(query.get("expand", [None])[0])
    prefix = f"{path}/" if path else ""
    names = [p for p in (*commit.tree, *tree_oids) if p and p.startswith(prefix)]
    if not recursive:
        names = [p for p in names if "/" not in p[len(prefix) :]]
    names.sort(key=lambda p: (p not in tree_oids, p))  # folders first, as on the Hub
    page_size = TREE_EXPAND_PAGE_SIZE if expand else TREE_PAGE_SIZE
    page, headers = _page(names, _offset(query), page_size, _next_url(base_url, url_path, query))
    items = [_entry_json(meta, commit, tree_oids, p) for p in page]
    if expand:
        items = _with_last_commits(ctx, meta, commit, items)
    return 200, items, headers


def paths_info(
    ctx: HubContext, authed: bool, ref: RepoRef, revision: str, form: Mapping[str, list[str]]
) -> JsonResult:
    """``POST /api/{type}s/{repo}/paths-info/{rev}``: info on the given paths that exist."""
    meta = ctx.visible_repo(ref, authed)
    commit = ctx.store.resolve(meta, revision)
    tree_oids = ctx.tree_oids(meta, commit)
    items = []
    for raw in dict.fromkeys(form.get("paths", []) + form.get("paths[]", [])):
        path = validate_path_in_repo(raw, folder=True)
        if path in commit.tree or path in tree_oids:
            items.append(_entry_json(meta, commit, tree_oids, path))
    if _truthy(form.get("expand", [None])[0]):
        items = _with_last_commits(ctx, meta, commit, items)
    return 200, items


def list_refs(ctx: HubContext, authed: bool, ref: RepoRef, query: Mapping[str, list[str]]) -> JsonResult:
    """``GET /api/{type}s/{repo}/refs``: branches and tags (no converts or PRs here)."""
    meta = ctx.visible_repo(ref, authed)
    refs = ctx.store.refs(meta)
    data: dict[str, Any] = {
        "branches": [
            {"name": name, "ref": f"refs/heads/{name}", "targetCommit": target}
            for name, target in sorted(refs["branches"].items())
        ],
        "converts": [],
        "tags": [
            {"name": name, "ref": f"refs/tags/{name}", "targetCommit": target}
            for name, target in sorted(refs["tags"].items())
        ],
    }
    if _truthy(query.get("include_prs", [None])[0]):
        data["pullRequests"] = []
    return 200, data


def list_commits(
    ctx: HubContext,
    authed: bool,
    ref: RepoRef,
    revision: str,
    query: Mapping[str, list[str]],
    base_url: str,
    url_path: str,
) -> JsonResult:
    """``GET /api/{type}s/{repo}/commits/{rev}``: first-parent history, newest first."""
    meta = ctx.visible_repo(ref, authed)
    commit = ctx.store.resolve(meta, revision)
    commits = [
        {"id": c.id, "title": c.title, "message": c.message, "date": c.date, "authors": [{"user": c.author}]}
        for c in ctx.store.history(meta, commit)
    ]
    page, headers = _page(commits, _offset(query), COMMITS_PAGE_SIZE, _next_url(base_url, url_path, query))
    return 200, page, headers


def create_ref(
    ctx: HubContext, authed: bool, ref: RepoRef, kind: str, name: str, revision: str | None
) -> JsonResult:
    """``POST .../branch/{name}`` (``startingPoint``) or ``POST .../tag/{rev}`` (``tag``)."""
    ctx.writable_repo(ref, authed)
    if revision is not None and not isinstance(revision, str):
        raise LocalHubRequestError("The starting point must be a revision (a string).")
    ctx.store.create_ref(ref, kind, name, revision)
    return 200, {}


def delete_ref(ctx: HubContext, authed: bool, ref: RepoRef, kind: str, name: str) -> JsonResult:
    """``DELETE .../branch/{name}`` or ``DELETE .../tag/{name}``."""
    ctx.writable_repo(ref, authed)
    ctx.store.delete_ref(ref, kind, name)
    return 200, {}


# ---------------------------------------------------------------------- preupload


def preupload(
    ctx: HubContext, authed: bool, ref: RepoRef, revision: str, body: Mapping[str, Any]
) -> JsonResult:
    """``POST /api/{type}s/{repo}/preupload/{rev}``: per file, ``lfs`` or ``regular``.

    LFS when ``.gitattributes`` at the revision says ``filter=lfs``, when the file is
    10 MiB or more, or when its first 512 bytes contain a NUL (binary), as on the Hub.
    ``shouldIgnore`` follows the ``gitIgnore`` sent, else the repo's ``.gitignore``;
    ``oid`` is the current file's id (sha256 for LFS, git oid otherwise) so the client
    can skip unchanged files.
    """
    meta = ctx.writable_repo(ref, authed)
    commit = ctx.store.resolve(meta, revision)
    files = body.get("files")
    if not isinstance(files, list):
        raise LocalHubRequestError("'files' must be a list.")
    attributes = GitAttributes(_small_text(ctx, commit, ".gitattributes"))
    ignore_text = body.get("gitIgnore")
    ignore = GitIgnore(
        ignore_text if isinstance(ignore_text, str) else _small_text(ctx, commit, ".gitignore")
    )
    answers = []
    for item in files:
        if not isinstance(item, dict):
            raise LocalHubRequestError("Each file must be an object.")
        path = validate_path_in_repo(item.get("path"))
        size = item.get("size")
        if not isinstance(size, int) or size < 0:
            raise LocalHubRequestError(f"Invalid size for {path}.")
        try:
            sample = base64.b64decode(item.get("sample") or "", validate=True)
        except (binascii.Error, ValueError, TypeError):
            raise LocalHubRequestError(f"Invalid base64 sample for {path}.") from None
        if size == 0:
            mode = "regular"
        elif attributes.is_lfs(path) or size >= MAX_REGULAR_FILE_SIZE or b"\x00" in sample:
            mode = "lfs"
        else:
            mode = "regular"
        answer: dict[str, Any] = {"path": path, "uploadMode": mode, "shouldIgnore": ignore.is_ignored(path)}
        existing = commit.tree.get(path)
        if existing is not None:
            answer["oid"] = existing.sha256 if existing.lfs else existing.oid
        answers.append(answer)
    return 200, {"files": answers, "commitOid": commit.id}


def _small_text(ctx: HubContext, commit: Commit, path: str) -> str:
    entry = commit.tree.get(path)
    if entry is None or entry.size > 1024 * 1024:
        return ""
    return ctx.store.read_blob(entry.sha256).decode("utf-8", errors="replace")
