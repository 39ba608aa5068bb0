"""The FastAPI application of the local Hub: routing, auth, errors, access log.

Routes with a repo in them are dispatched from the *raw* request path, segment by
segment, because the client percent-encodes revisions and folder paths with ``/`` in them
(``refs%2Fpr%2F1``, ``sub%2Fdir``) and a decoded path would be ambiguous. Errors use the
Hub's shape: a JSON ``{"error": ...}`` body plus ``X-Error-Code``/``X-Error-Message``
headers, which ``huggingface_hub`` turns into ``RepositoryNotFoundError``,
``RevisionNotFoundError``, ``EntryNotFoundError``, ``BadRequestError`` or
``HfHubHTTPError``.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import parse_qs, unquote_to_bytes

from fastapi import FastAPI
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from hubmerge.errors import LocalHubError, LocalHubRequestError

from . import api, transfer
from .auth import TokenAuth
from .context import HubContext
from .paths import repo_type_from_plural, validate_repo_part
from .storage import RepoRef, RepoStore

logger = logging.getLogger(__name__)
access_logger = logging.getLogger("hubmerge.localhub.access")

MAX_JSON_BODY = 16 * 1024 * 1024


def _error_response(status: int, message: str, code: str | None = None) -> JSONResponse:
    header_message = (
        message.encode("ascii", "backslashreplace").decode().replace("\r", " ").replace("\n", " ")
    )
    headers = {"X-Error-Message": header_message[:1000]}
    if code:
        headers["X-Error-Code"] = code
    return JSONResponse({"error": message}, status_code=status, headers=headers)


class AccessLogMiddleware:
    """Logs ``METHOD /path -> status (ms)``; never headers or query strings (tokens, signatures).

    Also turns an unexpected exception into a Hub-style 500 answer (traceback logged), so
    the client's keep-alive connection survives instead of being reset.
    """

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 0

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        path = scope.get("path", "").encode("unicode_escape").decode("ascii")
        try:
            await self.app(scope, receive, send_wrapper)
        except Exception:
            logger.exception("Unexpected error on %s %s", scope.get("method"), path)
            if status:
                raise  # the response started: nothing sensible left to send
            await _error_response(500, "Internal server error (see the server log).")(
                scope, receive, send_wrapper
            )
        finally:
            access_logger.info(
                "%s %s -> %s (%.1f ms)",
                scope.get("method"),
                path,
                status,
                (time.perf_counter() - started) * 1000,
            )


async def _read_capped(request: Request) -> bytes:
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_JSON_BODY:
            raise LocalHubRequestError("Request body too large.", status=413)
    return bytes(body)


async def _json_body(request: Request) -> dict[str, Any]:
    body = await _read_capped(request)
    if not body.strip():
        return {}
    try:
        data = json.loads(body)
    except ValueError:
        raise LocalHubRequestError("Request body is not valid JSON.") from None
    except RecursionError:
        raise LocalHubRequestError("Request body is nested too deeply.") from None
    if not isinstance(data, dict):
        raise LocalHubRequestError("Request body must be a JSON object.")
    return data


async def _form_body(request: Request) -> dict[str, list[str]]:
    body = await _read_capped(request)
    return parse_qs(body.decode("utf-8", errors="replace"), keep_blank_values=True)


def _to_response(result: tuple) -> Response:
    status, body, *rest = result
    headers = rest[0] if rest else None
    return JSONResponse(body, status_code=status, headers=headers)


def _segments(request: Request) -> list[str]:
    """The raw path split on ``/``, each segment percent-decoded on its own."""
    raw = request.scope.get("raw_path") or request.scope["path"].encode()
    try:
        return [unquote_to_bytes(seg).decode("utf-8") for seg in raw.decode("latin-1").split("/")[1:]]
    except UnicodeDecodeError:
        raise LocalHubRequestError("Request path is not valid UTF-8.") from None


def _ref(repo_type: str, namespace: str, name: str) -> RepoRef:
    return RepoRef(
        repo_type, validate_repo_part(namespace, "namespace"), validate_repo_part(name, "repo name")
    )


def _resolve_offset(segs: list[str]) -> int | None:
    """Index of the namespace in a ``[datasets/]ns/name/resolve/rev/path`` URL, else ``None``."""
    if len(segs) >= 6 and segs[0] == "datasets" and segs[3] == "resolve":
        return 1
    if len(segs) >= 5 and segs[2] == "resolve":
        return 0
    return None


Handler = Callable[[], Awaitable[Response]]


class _Dispatcher:
    """Maps a request to the handler for its repo-scoped route."""

    def __init__(self, ctx: HubContext):
        self.ctx = ctx

    async def __call__(self, request: Request) -> Response:
        ctx = self.ctx
        authed = ctx.authenticate(request.headers.get("authorization"))
        segs = _segments(request)
        method = request.method
        query = parse_qs(request.url.query, keep_blank_values=True)
        base_url = str(request.base_url).rstrip("/")
        url_path = request.scope.get("raw_path", b"").decode("latin-1") or request.url.path

        def threaded(fn: Callable[..., Any], *args: Any) -> Handler:
            async def run() -> Response:
                result = await run_in_threadpool(fn, *args)
                return result if isinstance(result, Response) else _to_response(result)

            return run

        handler: Handler | None = None
        # /api/{models|datasets}/{ns}/{name}/...
        if len(segs) >= 4 and segs[0] == "api" and segs[1] in ("models", "datasets", "spaces", "kernels"):
            ref = _ref(repo_type_from_plural(segs[1]), segs[2], segs[3])
            rest = segs[4:]
            handler = await self._api_route(
                request, method, rest, ref, authed, query, base_url, url_path, threaded
            )
        # /[datasets/]{ns}/{name}/resolve/{rev}/{path...}
        elif method in ("GET", "HEAD") and (resolve_at := _resolve_offset(segs)) is not None:
            repo_type = "dataset" if resolve_at == 1 else "model"
            ref = _ref(repo_type, segs[resolve_at], segs[resolve_at + 1])
            revision, path = segs[resolve_at + 3], "/".join(segs[resolve_at + 4 :])
            handler = threaded(
                transfer.resolve_file, ctx, authed, ref, revision, path, method, request.headers.get("range")
            )
        # /[datasets/]{ns}/{name}.git/info/lfs/objects/{batch|verify|oid}
        elif len(segs) >= 6 and segs[-4:-1] == ["info", "lfs", "objects"]:
            handler = await self._lfs_route(request, method, segs, authed, query, base_url, threaded)
        if handler is None:
            return _error_response(404, f"Not Found: {method} {request.url.path}")
        return await handler()

    async def _api_route(
        self,
        request: Request,
        method: str,
        rest: list[str],
        ref: RepoRef,
        authed: bool,
        query: dict[str, list[str]],
        base_url: str,
        url_path: str,
        threaded: Callable[..., Handler],
    ) -> Handler | None:
        ctx = self.ctx
        head = rest[0] if rest else None
        if not rest and method == "GET":
            return threaded(api.repo_info, ctx, authed, ref, None, query)
        if head == "revision" and len(rest) == 2 and method == "GET":
            return threaded(api.repo_info, ctx, authed, ref, rest[1], query)
        if head == "tree" and len(rest) >= 2 and method == "GET":
            path = "/".join(rest[2:])
            return threaded(api.list_tree, ctx, authed, ref, rest[1], path, query, base_url, url_path)
        if rest == ["refs"] and method == "GET":
            return threaded(api.list_refs, ctx, authed, ref, query)
        if head == "commits" and len(rest) == 2 and method == "GET":
            return threaded(api.list_commits, ctx, authed, ref, rest[1], query, base_url, url_path)
        if head == "preupload" and len(rest) == 2 and method == "POST":
            return threaded(api.preupload, ctx, authed, ref, rest[1], await _json_body(request))
        if head == "commit" and len(rest) == 2 and method == "POST":
            return lambda: transfer.commit(ctx, request, authed, ref, rest[1], query, base_url)
        if head == "paths-info" and len(rest) == 2 and method == "POST":
            return threaded(api.paths_info, ctx, authed, ref, rest[1], await _form_body(request))
        if head == "branch" and len(rest) == 2 and method == "POST":
            body = await _json_body(request)
            return threaded(api.create_ref, ctx, authed, ref, "branches", rest[1], body.get("startingPoint"))
        if head == "branch" and len(rest) == 2 and method == "DELETE":
            return threaded(api.delete_ref, ctx, authed, ref, "branches", rest[1])
        if head == "tag" and len(rest) == 2 and method == "POST":
            body = await _json_body(request)
            return threaded(api.create_ref, ctx, authed, ref, "tags", body.get("tag"), rest[1])
        if head == "tag" and len(rest) == 2 and method == "DELETE":
            return threaded(api.delete_ref, ctx, authed, ref, "tags", rest[1])
        if rest == ["settings"] and method == "PUT":
            return threaded(api.update_settings, ctx, authed, ref, await _json_body(request))
        return None

    async def _lfs_route(
        self,
        request: Request,
        method: str,
        segs: list[str],
        authed: bool,
        query: dict[str, list[str]],
        base_url: str,
        threaded: Callable[..., Handler],
    ) -> Handler | None:
        ctx = self.ctx
        repo_segs = segs[:-4]
        if len(repo_segs) == 3 and repo_segs[0] == "datasets":
            repo_type, repo_segs = "dataset", repo_segs[1:]
        elif len(repo_segs) == 2:
            repo_type = "model"
        else:
            return None
        if not repo_segs[1].endswith(".git"):
            return None
        ref = _ref(repo_type, repo_segs[0], repo_segs[1][: -len(".git")])
        action = segs[-1]
        if action == "batch" and method == "POST":
            return threaded(transfer.lfs_batch, ctx, authed, ref, await _json_body(request), base_url)
        if action == "verify" and method == "POST":
            return threaded(transfer.lfs_verify, ctx, authed, ref, await _json_body(request))
        if method == "PUT":
            return lambda: transfer.lfs_upload(ctx, request, ref, action, query)
        return None


def create_app(store: RepoStore, auth: TokenAuth, *, username: str = "hubmerge") -> FastAPI:
    """Build the Hub-compatible ASGI app.

    Args:
        store: The repo store (its lifetime is the caller's business).
        auth: Checks the server token.
        username: The token owner's user name: default namespace and commit author.

    Returns:
        A FastAPI application.
    """
    validate_repo_part(username, "username")
    ctx = HubContext(store, auth, username)
    app = FastAPI(title="hubmerge local Hub", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.hub = ctx
    app.add_middleware(AccessLogMiddleware)

    @app.exception_handler(LocalHubError)
    async def _hub_error(request: Request, exc: LocalHubError) -> Response:
        return _error_response(exc.status, str(exc), exc.code)

    def _authed(request: Request) -> bool:
        return ctx.authenticate(request.headers.get("authorization"))

    @app.get("/openapi.json")
    async def openapi() -> Response:
        from .openapi import openapi_schema

        return JSONResponse(openapi_schema())

    @app.get("/api/whoami-v2")
    async def whoami(request: Request) -> Response:
        return _to_response(api.whoami(ctx, _authed(request)))

    @app.post("/api/validate-yaml")
    async def validate_yaml(request: Request) -> Response:
        _authed(request)
        return _to_response(api.validate_yaml(await _json_body(request)))

    @app.post("/api/repos/create")
    async def create_repo(request: Request) -> Response:
        authed = _authed(request)
        body = await _json_body(request)
        base_url = str(request.base_url).rstrip("/")
        return _to_response(await run_in_threadpool(api.create_repo, ctx, authed, body, base_url))

    @app.delete("/api/repos/delete")
    async def delete_repo(request: Request) -> Response:
        authed = _authed(request)
        body = await _json_body(request)
        return _to_response(await run_in_threadpool(api.delete_repo, ctx, authed, body))

    async def _list(request: Request, repo_type: str) -> Response:
        authed = _authed(request)
        query = parse_qs(request.url.query, keep_blank_values=True)
        base_url = str(request.base_url).rstrip("/")
        return _to_response(
            await run_in_threadpool(api.list_repos, ctx, authed, repo_type, query, base_url, request.url.path)
        )

    @app.get("/api/models")
    async def list_models(request: Request) -> Response:
        return await _list(request, "model")

    @app.get("/api/datasets")
    async def list_datasets(request: Request) -> Response:
        return await _list(request, "dataset")

    dispatcher = _Dispatcher(ctx)

    @app.api_route("/{rest:path}", methods=["GET", "HEAD", "POST", "PUT", "DELETE"])
    async def repo_routes(request: Request) -> Response:
        return await dispatcher(request)

    return app
