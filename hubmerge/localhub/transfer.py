"""Content transfer endpoints: NDJSON commits, the LFS batch protocol, and file downloads.

* ``POST /api/{type}s/{repo}/commit/{branch}`` reads the NDJSON payload of
  ``huggingface_hub`` line by line (header, ``file`` with base64 content, ``lfsFile``
  pointers, ``deletedFile``/``deletedFolder``); regular contents are stored as they
  arrive, and the commit itself is applied only once the whole payload parsed. A payload
  cut off mid-line, an unknown LFS object or a client that disconnects leaves the repo
  unchanged.
* ``POST /{repo}.git/info/lfs/objects/batch`` answers ``basic`` transfers with signed
  upload URLs (``PUT`` without ``Authorization``, like the Hub's pre-signed storage URLs)
  and a ``verify`` action.
* ``GET|HEAD /[datasets/]{repo}/resolve/{rev}/{path}`` serves files with ``ETag``,
  ``X-Repo-Commit``, ``Content-Length``, ``Range`` and, for LFS files,
  ``X-Linked-Etag``/``X-Linked-Size``.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import mimetypes
import re
from collections.abc import Iterator, Mapping
from typing import Any
from urllib.parse import quote, urlencode

from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from hubmerge.errors import LocalHubAuthError, LocalHubError, LocalHubNotFoundError, LocalHubRequestError

from .context import HubContext, repo_web_url
from .paths import REPO_TYPE_URL_PREFIXES, is_sha256, validate_path_in_repo
from .storage import MAX_REGULAR_FILE_SIZE, AddFile, CommitOp, DeleteFile, DeleteFolder, RepoRef, git_blob_oid

logger = logging.getLogger(__name__)

#: Largest NDJSON commit payload accepted (regular files are base64 in it).
MAX_COMMIT_PAYLOAD = 1024 * 1024 * 1024
#: Largest single NDJSON line: a 10 MiB file in base64 plus its JSON envelope.
MAX_COMMIT_LINE = 16 * 1024 * 1024
MAX_LFS_BATCH_OBJECTS = 1000
LFS_CONTENT_TYPE = "application/vnd.git-lfs+json"
_DOWNLOAD_CHUNK = 1024 * 1024
_UPLOAD_FLUSH = 4 * 1024 * 1024
_INLINE_PARSE = 256 * 1024
_RANGE_RE = re.compile(r"\s*bytes\s*=\s*(\d*)\s*-\s*(\d*)\s*", re.IGNORECASE)


def _lfs_base(base_url: str, ref: RepoRef) -> str:
    return f"{base_url}/{REPO_TYPE_URL_PREFIXES[ref.repo_type]}{ref.repo_id}.git/info/lfs/objects"


def _upload_scope(ref: RepoRef) -> str:
    return f"{ref.repo_type}/{ref.repo_id}"


# ---------------------------------------------------------------------- commit


class _CommitParser:
    """Turns NDJSON lines into commit operations, storing regular contents as it goes."""

    def __init__(self, ctx: HubContext):
        self.ctx = ctx
        self.header: dict[str, Any] | None = None
        self.operations: list[CommitOp] = []
        self.line_no = 0

    async def feed(self, line: bytes) -> None:
        self.line_no += 1
        try:
            # big lines (base64 file contents) are parsed off the event loop
            item = (
                json.loads(line) if len(line) < _INLINE_PARSE else await run_in_threadpool(json.loads, line)
            )
        except (ValueError, RecursionError):
            raise LocalHubRequestError(
                f"Malformed commit payload: line {self.line_no} is not valid JSON (truncated upload?)."
            ) from None
        if not isinstance(item, dict) or not isinstance(item.get("value"), dict):
            raise LocalHubRequestError(
                f"Malformed commit payload: line {self.line_no} is not a {{key, value}} object."
            )
        key, value = item.get("key"), item["value"]
        if self.header is None:
            if key != "header":
                raise LocalHubRequestError("Malformed commit payload: the first line must be the header.")
            self.header = value
        elif key == "file":
            await self._add_regular(value)
        elif key == "lfsFile":
            self._add_lfs(value)
        elif key == "deletedFile":
            self.operations.append(DeleteFile(validate_path_in_repo(value.get("path"))))
        elif key == "deletedFolder":
            self.operations.append(DeleteFolder(validate_path_in_repo(value.get("path"), folder=True)))
        else:
            raise LocalHubRequestError(
                f"Malformed commit payload: unknown key {key!r} on line {self.line_no}."
            )

    async def _add_regular(self, value: Mapping[str, Any]) -> None:
        path = validate_path_in_repo(value.get("path"))
        content = value.get("content")
        encoding = value.get("encoding", "base64")
        if not isinstance(content, str):
            raise LocalHubRequestError(f"Missing content for {path}.")
        if encoding not in ("base64", "utf-8", "utf8"):
            raise LocalHubRequestError(f"Unsupported encoding {encoding!r} for {path}.")

        def decode_and_store() -> AddFile:
            if encoding == "base64":
                try:
                    data = base64.b64decode(content, validate=True)
                except (binascii.Error, ValueError):
                    raise LocalHubRequestError(f"Invalid base64 content for {path}.") from None
            else:
                data = content.encode("utf-8")
            if len(data) > MAX_REGULAR_FILE_SIZE:
                raise LocalHubRequestError(
                    f"Your push was rejected because {path} is larger than 10 MiB; upload it through LFS."
                )
            sha256, size = self.ctx.store.put_blob(data)
            return AddFile(path, sha256, size, lfs=False, oid=git_blob_oid(data))

        self.operations.append(await run_in_threadpool(decode_and_store))

    def _add_lfs(self, value: Mapping[str, Any]) -> None:
        path = validate_path_in_repo(value.get("path"))
        oid = value.get("oid")
        if value.get("algo", "sha256") != "sha256" or not is_sha256(oid):
            raise LocalHubRequestError(f"Invalid LFS pointer for {path}: expected a sha256 oid.")
        size = value.get("size")
        if size is None:  # server-side copies omit the size
            try:
                size = self.ctx.store.blob_path(oid).stat().st_size
            except FileNotFoundError:
                size = -1
        if not isinstance(size, int):
            raise LocalHubRequestError(f"Invalid LFS size for {path}.")
        self.operations.append(AddFile(path, oid, size, lfs=True))


async def commit(
    ctx: HubContext,
    request: Request,
    authed: bool,
    ref: RepoRef,
    revision: str,
    query: Mapping[str, list[str]],
    base_url: str,
) -> Response:
    """``POST /api/{type}s/{repo}/commit/{branch}`` (NDJSON). See the module docstring."""
    await run_in_threadpool(ctx.writable_repo, ref, authed)
    if query.get("create_pr", ["0"])[0].lower() in ("1", "true"):
        raise LocalHubRequestError("Pull requests are not supported by this server; commit to a branch.")
    parser = _CommitParser(ctx)
    buffer = bytearray()
    received = 0
    try:
        async for chunk in request.stream():
            received += len(chunk)
            if received > MAX_COMMIT_PAYLOAD:
                raise LocalHubRequestError("Commit payload too large.", status=413)
            scan_from = len(buffer)  # only the new bytes can hold a newline
            buffer += chunk
            while (newline := buffer.find(b"\n", scan_from)) >= 0:
                if newline > MAX_COMMIT_LINE:
                    raise LocalHubRequestError(
                        "Commit payload line too long (regular files are limited to 10 MiB)."
                    )
                line = bytes(buffer[:newline])
                del buffer[: newline + 1]
                scan_from = 0
                if line.strip():
                    await parser.feed(line)
            if len(buffer) > MAX_COMMIT_LINE:
                raise LocalHubRequestError(
                    "Commit payload line too long (regular files are limited to 10 MiB)."
                )
    except ClientDisconnect:
        logger.warning("Client disconnected during a commit to %s; nothing was committed.", ref.repo_id)
        return Response(status_code=400)
    if bytes(buffer).strip():
        await parser.feed(bytes(buffer))
    if parser.header is None:
        raise LocalHubRequestError("Malformed commit payload: missing header.")
    summary = parser.header.get("summary")
    if not isinstance(summary, str) or not summary.strip():
        raise LocalHubRequestError("The commit summary cannot be empty.")
    description = parser.header.get("description") or ""
    parent = parser.header.get("parentCommit")
    if parent is not None and not isinstance(parent, str):
        raise LocalHubRequestError("parentCommit must be a string.")
    new = await run_in_threadpool(
        lambda: ctx.store.commit(
            ref,
            branch=revision,
            operations=parser.operations,
            title=summary,
            message=str(description),
            author=ctx.username,
            parent_commit=parent,
        )
    )
    return JSONResponse(
        {
            "success": True,
            "commitOid": new.id,
            "commitUrl": f"{repo_web_url(base_url, ref)}/commit/{new.id}",
            "hookOutput": "",
            "pullRequestUrl": None,
        }
    )


# ---------------------------------------------------------------------- LFS


def lfs_batch(
    ctx: HubContext, authed: bool, ref: RepoRef, body: Mapping[str, Any], base_url: str
) -> Response:
    """``POST /{repo}.git/info/lfs/objects/batch`` (upload only, ``basic`` transfer)."""
    ctx.writable_repo(ref, authed)
    if body.get("operation") != "upload":
        raise LocalHubRequestError("Only the 'upload' LFS operation is supported; download through /resolve.")
    if body.get("hash_algo", "sha256") != "sha256":
        raise LocalHubRequestError("Only sha256 LFS objects are supported.")
    transfers = body.get("transfers") or ["basic"]
    if not isinstance(transfers, list) or "basic" not in transfers:
        raise LocalHubRequestError("Only the 'basic' LFS transfer is supported.")
    objects = body.get("objects")
    if not isinstance(objects, list) or len(objects) > MAX_LFS_BATCH_OBJECTS:
        raise LocalHubRequestError(f"'objects' must be a list of at most {MAX_LFS_BATCH_OBJECTS} items.")
    lfs_base = _lfs_base(base_url, ref)
    answers = []
    for obj in objects:
        oid = obj.get("oid") if isinstance(obj, dict) else None
        size = obj.get("size") if isinstance(obj, dict) else None
        if not is_sha256(oid) or not isinstance(size, int) or size < 0:
            raise LocalHubRequestError("Each LFS object needs a sha256 'oid' and a non-negative 'size'.")
        if ctx.store.has_blob(oid, size):
            answers.append({"oid": oid, "size": size})
        elif ctx.store.has_blob(oid):
            answers.append(
                {"oid": oid, "size": size, "error": {"code": 422, "message": "Size does not match."}}
            )
        else:
            signed = urlencode(ctx.auth.sign_upload(_upload_scope(ref), oid, size))
            answers.append(
                {
                    "oid": oid,
                    "size": size,
                    "authenticated": True,
                    "actions": {
                        "upload": {"href": f"{lfs_base}/{oid}?{signed}", "expires_in": 3600},
                        "verify": {"href": f"{lfs_base}/verify"},
                    },
                }
            )
    return JSONResponse({"transfer": "basic", "objects": answers}, media_type=LFS_CONTENT_TYPE)


async def lfs_upload(
    ctx: HubContext, request: Request, ref: RepoRef, oid: str, query: Mapping[str, list[str]]
) -> Response:
    """``PUT /{repo}.git/info/lfs/objects/{oid}?size&expires&sig``: a signed basic upload."""
    if not is_sha256(oid):
        raise LocalHubRequestError("Invalid LFS oid.")
    try:
        size = ctx.auth.verify_upload(
            _upload_scope(ref), oid, query["size"][0], query["expires"][0], query["sig"][0]
        )
    except KeyError:
        raise LocalHubAuthError("Missing LFS upload signature.", status=403) from None
    await run_in_threadpool(ctx.store.get_repo, ref)
    upload = await run_in_threadpool(ctx.store.begin_upload, oid, size)
    pending = bytearray()
    try:
        async for chunk in request.stream():
            pending += chunk
            if len(pending) >= _UPLOAD_FLUSH:
                await run_in_threadpool(upload.write, bytes(pending))
                pending.clear()
        await run_in_threadpool(upload.write, bytes(pending))
        await run_in_threadpool(upload.finish)
    except ClientDisconnect:
        upload.abort()
        logger.warning("Client disconnected during an LFS upload to %s; upload dropped.", ref.repo_id)
        return Response(status_code=400)
    except BaseException:
        upload.abort()
        raise
    return Response(status_code=200)


def lfs_verify(ctx: HubContext, authed: bool, ref: RepoRef, body: Mapping[str, Any]) -> Response:
    """``POST /{repo}.git/info/lfs/objects/verify``: 200 once the object is stored."""
    ctx.writable_repo(ref, authed)
    oid, size = body.get("oid"), body.get("size")
    if not is_sha256(oid) or not isinstance(size, int):
        raise LocalHubRequestError("'oid' and 'size' are required.")
    if not ctx.store.has_blob(oid, size):
        raise LocalHubNotFoundError(f"LFS object {oid} was not uploaded.")
    return JSONResponse({"message": "Object verified"}, media_type=LFS_CONTENT_TYPE)


# ---------------------------------------------------------------------- downloads


def _parse_range(header: str | None, size: int) -> tuple[int, int] | None:
    """``(start, end_inclusive)`` for a single satisfiable range, ``None`` to send it all.

    Raises:
        LocalHubError: 416 if the range cannot be satisfied.
    """
    if not header or "," in header:
        return None  # no range, or several: serving the whole file is allowed
    match = _RANGE_RE.fullmatch(header)
    if match is None:
        return None
    first, last = match.groups()
    if not first and not last or len(first) > 19 or len(last) > 19:
        return None  # beyond any file size (and too long for int()): ignored, as a malformed range
    if not first:
        length = int(last)
        if length == 0 or size == 0:
            raise LocalHubError("Requested range not satisfiable.", status=416)
        return max(0, size - length), size - 1
    start = int(first)
    end = min(int(last), size - 1) if last else size - 1
    if start >= size or (last and int(last) < start):
        raise LocalHubError("Requested range not satisfiable.", status=416)
    return start, end


def _iter_blob(path: str, start: int, length: int) -> Iterator[bytes]:
    with open(path, "rb") as handle:
        handle.seek(start)
        remaining = length
        while remaining > 0:
            data = handle.read(min(_DOWNLOAD_CHUNK, remaining))
            if not data:
                break
            remaining -= len(data)
            yield data


def resolve_file(
    ctx: HubContext,
    authed: bool,
    ref: RepoRef,
    revision: str,
    path: str,
    method: str,
    range_header: str | None,
) -> Response:
    """``GET|HEAD /[datasets/]{repo}/resolve/{rev}/{path}``.

    Raises:
        LocalHubNotFoundError: ``RepoNotFound``, ``RevisionNotFound`` or ``EntryNotFound``
            (the latter with ``X-Repo-Commit`` so the client can cache the absence).
    """
    meta = ctx.visible_repo(ref, authed)
    commit = ctx.store.resolve(meta, revision)
    path = validate_path_in_repo(path)
    entry = commit.tree.get(path)
    if entry is None:
        return JSONResponse(
            {"error": "Entry not found"},
            status_code=404,
            headers={
                "X-Error-Code": "EntryNotFound",
                "X-Error-Message": "Entry not found",
                "X-Repo-Commit": commit.id,
            },
        )
    blob = ctx.store.blob_path(entry.sha256)
    name = path.rsplit("/", 1)[-1]
    ascii_name = name.encode("ascii", "replace").decode().replace('"', "_")
    headers = {
        "ETag": f'"{entry.oid}"',
        "X-Repo-Commit": commit.id,
        "Accept-Ranges": "bytes",
        "Content-Disposition": f"inline; filename*=UTF-8''{quote(name)}; filename=\"{ascii_name}\";",
    }
    if entry.lfs:
        headers["X-Linked-Etag"] = f'"{entry.sha256}"'
        headers["X-Linked-Size"] = str(entry.size)
    media_type = (
        "application/octet-stream"
        if entry.lfs
        else (mimetypes.guess_type(name)[0] or "application/octet-stream")
    )
    try:
        byte_range = _parse_range(range_header, entry.size)
    except LocalHubError:
        return Response(status_code=416, headers={**headers, "Content-Range": f"bytes */{entry.size}"})
    status, start, length = 200, 0, entry.size
    if byte_range is not None:
        start, end = byte_range
        status, length = 206, end - start + 1
        headers["Content-Range"] = f"bytes {start}-{end}/{entry.size}"
    headers["Content-Length"] = str(length)
    if method == "HEAD":
        return Response(status_code=status, headers=headers, media_type=media_type)
    return StreamingResponse(
        _iter_blob(str(blob), start, length), status_code=status, headers=headers, media_type=media_type
    )
