"""The OpenAPI description of the local Hub, served at ``/openapi.json``.

Written by hand: the app dispatches repo-scoped routes from the raw path (see ``app.py``),
so FastAPI cannot derive them. It documents the subset of the Hub API this server
implements (model repos; dataset repos use the same routes under ``datasets``) and is what
the test-suite fuzzes the server against (``schemathesis``): any 5xx answer is a bug.
"""

from __future__ import annotations

from typing import Any

_ERROR = {"description": "Error", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}
_ERRORS = {str(code): _ERROR for code in (400, 401, 403, 404, 409, 412, 413, 416)}
_REPO = [{"$ref": "#/components/parameters/namespace"}, {"$ref": "#/components/parameters/name"}]
_REV = {"$ref": "#/components/parameters/revision"}
_AUTH: list[dict[str, list[str]]] = [{"bearer": []}, {}]


def _json(schema: dict[str, Any]) -> dict[str, Any]:
    return {"required": True, "content": {"application/json": {"schema": schema}}}


def _ok(schema: dict[str, Any] | None = None, media: str = "application/json") -> dict[str, Any]:
    response: dict[str, Any] = {"description": "OK"}
    if schema is not None:
        response["content"] = {media: {"schema": schema}}
    return {"200": response, **_ERRORS}


def _op(summary: str, responses: dict[str, Any], *, params: list | None = None, body: dict | None = None,
        security: list | None = None) -> dict[str, Any]:
    op: dict[str, Any] = {"summary": summary, "responses": responses, "security": security or _AUTH}
    if params:
        op["parameters"] = params
    if body:
        op["requestBody"] = body
    return op


def _query(name: str, schema: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"name": name, "in": "query", "required": False, "schema": schema or {"type": "string"}}


_OBJ = {"type": "object"}
_ARRAY = {"type": "array", "items": _OBJ}
_SHA256 = {"type": "string", "pattern": "^[0-9a-f]{64}$"}

SCHEMA: dict[str, Any] = {
    "openapi": "3.0.3",
    "info": {"title": "hubmerge local Hub", "version": "1",
             "description": "The subset of the Hugging Face Hub API served by `hubmerge hub serve`."},
    "components": {
        "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        "schemas": {"Error": {"type": "object", "properties": {"error": {"type": "string"}}}},
        "parameters": {
            "namespace": {"name": "namespace", "in": "path", "required": True, "schema": {"type": "string"}},
            "name": {"name": "name", "in": "path", "required": True, "schema": {"type": "string"}},
            "revision": {"name": "revision", "in": "path", "required": True, "schema": {"type": "string"}},
        },
    },
    "paths": {
        "/api/whoami-v2": {"get": _op("The token's user", _ok(_OBJ))},
        "/api/validate-yaml": {"post": _op(
            "Check a README's metadata", {**_ok(_OBJ)},
            body=_json({"type": "object", "properties": {"content": {"type": "string"}}}))},
        "/api/repos/create": {"post": _op(
            "Create a repo", _ok(_OBJ),
            body=_json({"type": "object", "properties": {
                "name": {"type": "string"}, "organization": {"type": "string"},
                "type": {"type": "string", "enum": ["model", "dataset"]}, "private": {"type": "boolean"},
                "visibility": {"type": "string", "enum": ["public", "private"]}}, "required": ["name"]}))},
        "/api/repos/delete": {"delete": _op(
            "Delete a repo", _ok(_OBJ),
            body=_json({"type": "object", "properties": {
                "name": {"type": "string"}, "organization": {"type": "string"},
                "type": {"type": "string"}}, "required": ["name"]}))},
        "/api/models": {"get": _op("List model repos", _ok(_ARRAY), params=[
            _query("search"), _query("author"), _query("filter"),
            _query("sort", {"type": "string", "enum": ["lastModified", "createdAt", "id"]}),
            _query("direction"), _query("limit", {"type": "integer"}), _query("full"), _query("cardData"),
            _query("config"), _query("expand"), _query("cursor")])},
        "/api/models/{namespace}/{name}": {"get": _op("Repo info at main", _ok(_OBJ), params=[
            *_REPO, _query("blobs"), _query("expand")])},
        "/api/models/{namespace}/{name}/revision/{revision}": {"get": _op(
            "Repo info at a revision", _ok(_OBJ), params=[*_REPO, _REV, _query("blobs"), _query("expand")])},
        "/api/models/{namespace}/{name}/tree/{revision}": {"get": _op(
            "List files", _ok(_ARRAY), params=[*_REPO, _REV, _query("recursive"), _query("expand"),
                                               _query("cursor")])},
        "/api/models/{namespace}/{name}/refs": {"get": _op(
            "Branches and tags", _ok(_OBJ), params=[*_REPO, _query("include_prs")])},
        "/api/models/{namespace}/{name}/commits/{revision}": {"get": _op(
            "History", _ok(_ARRAY), params=[*_REPO, _REV, _query("cursor")])},
        "/api/models/{namespace}/{name}/preupload/{revision}": {"post": _op(
            "Upload modes of files", _ok(_OBJ), params=[*_REPO, _REV],
            body=_json({"type": "object", "properties": {
                "files": {"type": "array", "items": {"type": "object", "properties": {
                    "path": {"type": "string"}, "size": {"type": "integer"}, "sample": {"type": "string"}}}},
                "gitIgnore": {"type": "string"}}}))},
        "/api/models/{namespace}/{name}/commit/{revision}": {"post": _op(
            "Commit (NDJSON: a header line, then file/lfsFile/deletedFile/deletedFolder lines)", _ok(_OBJ),
            params=[*_REPO, _REV, _query("create_pr")],
            body={"required": True, "content": {"application/x-ndjson": {"schema": {
                "type": "array", "items": {"type": "object", "properties": {
                    "key": {"type": "string", "enum": ["header", "file", "lfsFile", "deletedFile", "deletedFolder"]},
                    "value": {"type": "object", "properties": {
                        "summary": {"type": "string"}, "description": {"type": "string"},
                        "parentCommit": {"type": "string"}, "path": {"type": "string"},
                        "content": {"type": "string"}, "encoding": {"type": "string"},
                        "oid": {"type": "string"}, "size": {"type": "integer"}, "algo": {"type": "string"}}}},
                    "required": ["key", "value"]}}}}})},
        "/api/models/{namespace}/{name}/paths-info/{revision}": {"post": _op(
            "Info on paths", _ok(_ARRAY), params=[*_REPO, _REV],
            body={"required": True, "content": {"application/x-www-form-urlencoded": {"schema": {
                "type": "object", "properties": {"paths": {"type": "array", "items": {"type": "string"}},
                                                 "expand": {"type": "string"}}}}}})},
        "/api/models/{namespace}/{name}/branch/{revision}": {
            "post": _op("Create a branch", _ok(_OBJ), params=[*_REPO, _REV], body=_json(
                {"type": "object", "properties": {"startingPoint": {"type": "string"}}})),
            "delete": _op("Delete a branch", _ok(_OBJ), params=[*_REPO, _REV])},
        "/api/models/{namespace}/{name}/tag/{revision}": {
            "post": _op("Tag a revision", _ok(_OBJ), params=[*_REPO, _REV], body=_json(
                {"type": "object", "properties": {"tag": {"type": "string"}, "message": {"type": "string"}}})),
            "delete": _op("Delete a tag", _ok(_OBJ), params=[*_REPO, _REV])},
        "/api/models/{namespace}/{name}/settings": {"put": _op(
            "Visibility", _ok(_OBJ), params=_REPO, body=_json({"type": "object", "properties": {
                "private": {"type": "boolean"}, "visibility": {"type": "string"}, "gated": {}}}))},
        "/{namespace}/{name}/resolve/{revision}/{path}": {
            "get": _op("Download a file", _ok({"type": "string", "format": "binary"}, "*/*"),
                       params=[*_REPO, _REV, {"name": "path", "in": "path", "required": True,
                                              "schema": {"type": "string"}},
                               {"name": "Range", "in": "header", "required": False, "schema": {"type": "string"}}]),
            "head": _op("File headers", _ok(), params=[*_REPO, _REV, {
                "name": "path", "in": "path", "required": True, "schema": {"type": "string"}}])},
        "/{namespace}/{name}.git/info/lfs/objects/batch": {"post": _op(
            "LFS batch (upload)", _ok(_OBJ, "application/vnd.git-lfs+json"), params=_REPO,
            body={"required": True, "content": {"application/json": {"schema": {"type": "object", "properties": {
                "operation": {"type": "string", "enum": ["upload", "download"]},
                "transfers": {"type": "array", "items": {"type": "string"}},
                "hash_algo": {"type": "string"},
                "objects": {"type": "array", "items": {"type": "object", "properties": {
                    "oid": _SHA256, "size": {"type": "integer"}}}}}}}}})},
        "/{namespace}/{name}.git/info/lfs/objects/verify": {"post": _op(
            "LFS verify", _ok(_OBJ, "application/vnd.git-lfs+json"), params=_REPO,
            body=_json({"type": "object", "properties": {"oid": _SHA256, "size": {"type": "integer"}}}))},
        "/{namespace}/{name}.git/info/lfs/objects/{oid}": {"put": _op(
            "LFS upload to a signed URL", _ok(), security=[{}], params=[
                *_REPO, {"name": "oid", "in": "path", "required": True, "schema": _SHA256},
                _query("size"), _query("expires"), _query("sig")],
            body={"required": True, "content": {"application/octet-stream": {
                "schema": {"type": "string", "format": "binary"}}}})},
    },
}


def openapi_schema() -> dict[str, Any]:
    """The OpenAPI 3.0 document of the local Hub."""
    return SCHEMA
