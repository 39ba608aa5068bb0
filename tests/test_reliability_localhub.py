"""The loopback Hub under load and attack.

* many clients committing to one repo (optimistic concurrency: no lost update, linear history)
  and downloading while commits land (each download sees one whole revision);
* hostile requests (malformed NDJSON, JSON and headers, oversized bodies, stored content
  built to blow up, patterns built to backtrack): always a 4xx, never a 5xx, in bounded time;
* requests without or with wrong tokens, tampered upload signatures;
* tokens compared in constant time and never logged;
* a bounded ``schemathesis`` run against the server's OpenAPI description (5xx are bugs).
"""

from __future__ import annotations

import atexit
import base64
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import content_type_conformance, status_code_conformance

from hubmerge.localhub import transfer
from hubmerge.localhub.app import create_app
from hubmerge.localhub.auth import TokenAuth
from hubmerge.localhub.storage import RepoRef, RepoStore

pytest_plugins = ["hubmerge.localhub.pytest_plugin"]


def _ndjson(*items: object) -> bytes:
    return b"".join((item if isinstance(item, bytes) else json.dumps(item).encode()) + b"\n" for item in items)


def _file(path: str, content: bytes) -> dict:
    return {"key": "file", "value": {"path": path, "content": base64.b64encode(content).decode(),
                                     "encoding": "base64"}}


def _header(summary: str = "test", **extra) -> dict:
    return {"key": "header", "value": {"summary": summary, **extra}}


@pytest.fixture
def raw(local_hub) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=local_hub.endpoint, timeout=60) as client:
        yield client


@pytest.fixture
def auth(local_hub) -> dict[str, str]:
    return {"Authorization": f"Bearer {local_hub.token}"}


@pytest.fixture
def repo(raw, auth) -> str:
    name = f"rel-{uuid.uuid4().hex[:8]}"
    response = raw.post("/api/repos/create", json={"name": name}, headers=auth)
    assert response.status_code == 200, response.text
    return response.json()["name"]


def _commit(client: httpx.Client, repo: str, *lines, headers) -> httpx.Response:
    return client.post(f"/api/models/{repo}/commit/main", content=_ndjson(*lines), headers=headers)


# -------------------------------------------------------------------- load


def test_read_modify_write_clients_lose_no_update(local_hub, raw, auth, repo):
    """Eight clients each increment a counter five times, committing with ``parentCommit``."""
    clients, rounds = 8, 5
    assert _commit(raw, repo, _header("counter"), _file("counter.txt", b"0"), headers=auth).status_code == 200
    start = threading.Barrier(clients)

    def client(i: int) -> int:
        conflicts = 0
        with httpx.Client(base_url=local_hub.endpoint, headers=auth, timeout=60) as http:  # its own connection
            start.wait()
            done = 0
            while done < rounds:
                read = http.get(f"/{repo}/resolve/main/counter.txt")
                value, head = int(read.text), read.headers["X-Repo-Commit"]
                answer = _commit(http, repo, _header(f"client {i}: {value + 1}", parentCommit=head),
                                 _file("counter.txt", str(value + 1).encode()), headers=auth)
                if answer.status_code == 412:
                    conflicts += 1
                    continue
                assert answer.status_code == 200, answer.text
                done += 1
        return conflicts

    with ThreadPoolExecutor(max_workers=clients) as pool:
        conflicts = sum(pool.map(client, range(clients)))
    total = clients * rounds
    assert raw.get(f"/{repo}/resolve/main/counter.txt").text == str(total)  # no lost update
    assert conflicts > 0  # the clients did race: the parent check refused stale writes
    history = raw.get(f"/api/models/{repo}/commits/main", headers=auth).json()
    values = [int(c["title"].rsplit(": ", 1)[1]) for c in history if c["title"].startswith("client")]
    assert values == list(range(total, 0, -1))  # linear: every increment once, in order
    commits_dir = local_hub.data_dir / "repos" / "models" / repo / "commits"
    assert len(history) == total + 2 == len(list(commits_dir.iterdir()))  # no stray commit objects


def test_downloads_during_commits_see_whole_revisions(local_hub, raw, auth, repo, tmp_path):
    from huggingface_hub import snapshot_download

    files = ("a.txt", "b.txt", "sub/c.bin")
    versions: dict[str, int] = {}  # commit id -> version
    done = threading.Event()
    problems: list[str] = []

    def writer() -> None:
        try:
            for version in range(1, 16):
                answer = _commit(raw, repo, _header(f"v{version}"),
                                 *[_file(f, f"{f}={version}".encode()) for f in files], headers=auth)
                versions[answer.json()["commitOid"]] = version
        finally:
            done.set()

    def reader(index: int) -> int:
        checks = 0
        with httpx.Client(base_url=local_hub.endpoint, timeout=60) as http:
            while not done.is_set() or checks < 3:
                info = http.get(f"/api/models/{repo}").json()
                contents = {s["rfilename"]: http.get(f"/{repo}/resolve/{info['sha']}/{s['rfilename']}").text
                            for s in info["siblings"] if s["rfilename"] in files}
                seen = {text.split("=")[1] for text in contents.values()}
                if len(seen) > 1:
                    problems.append(f"{info['sha']}: mixed versions {contents}")
                one = http.get(f"/{repo}/resolve/main/a.txt")
                if one.status_code == 200:  # checked below, once every commit is known
                    pairs.append((one.headers["X-Repo-Commit"], one.text))
                if checks % 5 == 0:
                    snap = snapshot_download(repo, cache_dir=tmp_path / f"cache-{index}-{checks}")
                    texts = {(Path(snap) / f).read_text() for f in files if (Path(snap) / f).exists()}
                    if len({t.split("=")[1] for t in texts}) > 1:
                        problems.append(f"snapshot {snap}: mixed {texts}")
                checks += 1
        return checks

    pairs: list[tuple[str, str]] = []
    thread = threading.Thread(target=writer)
    with ThreadPoolExecutor(max_workers=4) as pool:
        thread.start()
        checks = sum(pool.map(reader, range(4)))
    thread.join()
    assert problems == [] and checks >= 12
    for commit, text in pairs:  # each (content, X-Repo-Commit) pair is one revision's
        if commit in versions:
            assert text == f"a.txt={versions[commit]}"


# -------------------------------------------------------------------- hostile requests


def _laughs(width: int = 17, levels: int = 5) -> list[str]:
    """A "billion laughs" card: ``width ** levels`` (1.4 million) strings from 68 aliases in ~1 KB.

    Small enough that a server without the alias limit survives it (and fails the test by
    accepting it) rather than the test run; a deeper one (9 ** 9) is refused the same way.
    """
    return [f"a0: &a0 [{', '.join(['x'] * width)}]"] + [
        f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * width) + "]" for i in range(1, levels)]


def _bombs() -> list[tuple[str, str, str, dict, object, set[int]]]:
    deep = b"[" * 100_000 + b"]" * 100_000
    laughs = _laughs()
    return [
        # (what, method, path, extra headers, body, accepted statuses); "REPO" is replaced
        ("json nested 100k deep", "POST", "/api/repos/create", {}, deep, {400}),
        ("repo type is a list", "POST", "/api/repos/create", {}, {"name": "x", "type": ["model"]}, {400}),
        ("repo type is a mapping", "DELETE", "/api/repos/delete", {}, {"name": "x", "type": {"a": 1}}, {400}),
        ("preupload sample not text", "POST", "/api/models/REPO/preupload/main", {},
         {"files": [{"path": "a.txt", "size": 1, "sample": 5}]}, {400}),
        ("gitignore with a bad class", "POST", "/api/models/REPO/preupload/main", {},
         {"files": [{"path": "a.txt", "size": 1}], "gitIgnore": "[z-a]\n"}, {200}),
        ("branch from a number", "POST", "/api/models/REPO/branch/dev", {}, {"startingPoint": 5}, {400}),
        ("lfs transfers not a list", "POST", "/REPO.git/info/lfs/objects/batch", {},
         {"operation": "upload", "transfers": 5, "objects": []}, {400}),
        ("card with a date key", "POST", "/api/validate-yaml", {}, {"content": "---\n2020-01-01: x\n---\n"}, {200}),
        ("card nested 3000 deep", "POST", "/api/validate-yaml", {},
         {"content": "---\na: " + "[" * 3000 + "]" * 3000 + "\n---\n"}, {400}),
        ("card billion laughs", "POST", "/api/validate-yaml", {}, {"content": "---\n" + "\n".join(laughs) + "\n---\n"},
         {400}),
        ("range with 5000 digits", "GET", "/REPO/resolve/main/.gitattributes", {"Range": "bytes=0-" + "9" * 5000},
         None, {200}),
        ("range reversed", "GET", "/REPO/resolve/main/.gitattributes", {"Range": "bytes=5-1"}, None, {416}),
        ("range garbage", "GET", "/REPO/resolve/main/.gitattributes", {"Range": "bytes=abc"}, None, {200}),
        ("path not utf-8", "GET", "/%FF%FE/x/resolve/main/a.txt", {}, None, {400}),
        ("path bad escape", "GET", "/api/models/%ZZ/x", {}, None, {400, 404}),
        ("ndjson nested 100k deep", "POST", "/api/models/REPO/commit/main", {},
         _ndjson(_header(), deep), {400}),
        ("ndjson not utf-8", "POST", "/api/models/REPO/commit/main", {}, _ndjson(_header(), b"\xff\xfe{}"), {400}),
        ("ndjson line is a list", "POST", "/api/models/REPO/commit/main", {}, _ndjson(_header(), [1, 2]), {400}),
        ("ndjson header value is a list", "POST", "/api/models/REPO/commit/main", {},
         _ndjson({"key": "header", "value": []}), {400}),
        ("ndjson no header", "POST", "/api/models/REPO/commit/main", {}, _ndjson(_file("a.txt", b"a")), {400}),
        ("ndjson empty", "POST", "/api/models/REPO/commit/main", {}, b"\n\n\n", {400}),
        ("ndjson bad base64", "POST", "/api/models/REPO/commit/main", {},
         _ndjson(_header(), {"key": "file", "value": {"path": "a.txt", "content": "%%%", "encoding": "base64"}}),
         {400}),
        ("ndjson lfs size not a number", "POST", "/api/models/REPO/commit/main", {},
         _ndjson(_header(), {"key": "lfsFile", "value": {"path": "w.bin", "oid": "0" * 64, "size": "9"}}), {400}),
        ("ndjson unknown key", "POST", "/api/models/REPO/commit/main", {},
         _ndjson(_header(), {"key": "symlink", "value": {"path": "a"}}), {400}),
        ("ndjson empty summary", "POST", "/api/models/REPO/commit/main", {}, _ndjson(_header("  ")), {400}),
        ("ndjson parent not text", "POST", "/api/models/REPO/commit/main", {}, _ndjson(_header(parentCommit=7)),
         {400}),
        ("authorization basic", "GET", "/api/whoami-v2", {"Authorization": "Basic dXNlcjpwYXNz"}, None, {401}),
        ("authorization bearer nothing", "GET", "/api/whoami-v2", {"Authorization": "Bearer"}, None, {401}),
        ("authorization two tokens", "GET", "/api/whoami-v2", {"Authorization": "Bearer a b"}, None, {401}),
        ("authorization latin-1", "GET", "/api/whoami-v2", {"Authorization": b"Bearer \xe9\xe8"}, None, {401}),
    ]


BOMBS = _bombs()


@pytest.mark.parametrize("what, method, path, headers, body, expected", BOMBS, ids=[b[0] for b in BOMBS])
def test_hostile_request_answered_4xx_quickly(raw, auth, repo, what, method, path, headers, body, expected):
    path = path.replace("REPO", repo)
    kwargs = {"json": body} if isinstance(body, (dict, list)) else {"content": body}
    started = time.monotonic()
    response = raw.request(method, path, headers={**auth, **headers}, **kwargs)
    assert response.status_code in expected, (what, response.status_code, response.text[:300])
    assert time.monotonic() - started < 5, what
    assert raw.get("/api/whoami-v2", headers=auth).status_code == 200  # the server is fine


def test_backtracking_gitignore_answered_quickly(raw, auth, repo):
    """A glob per ``*`` becomes a regex loop per ``*``: as a regex, this took minutes per path."""
    started = time.monotonic()
    response = raw.post(f"/api/models/{repo}/preupload/main", headers=auth, json={
        "files": [{"path": "a" * 1000, "size": 1}, {"path": "a/" * 100 + "a" * 800, "size": 1}],
        "gitIgnore": "*a" * 12 + "*b\n" + "**/" * 50 + "*a*a*a*a*a*c\n"})
    assert response.status_code == 200 and time.monotonic() - started < 3
    assert [f["shouldIgnore"] for f in response.json()["files"]] == [False, False]


def test_stored_hostile_content_does_not_break_info_endpoints(raw, auth, repo):
    readme = ("---\n" + "\n".join(_laughs()) + "\n---\n# card\n").encode()
    config = b'{"model_type": ' + b"[" * 50_000 + b"]" * 50_000 + b"}"
    header = json.dumps({"w": {"dtype": "F32", "shape": [10**30, 10**30, 10**30], "data_offsets": [0, 0]}}).encode()
    weights = len(header).to_bytes(8, "little") + header
    answer = _commit(raw, repo, _header("hostile content"), _file("README.md", readme), _file("config.json", config),
                     _file("model.safetensors", weights), headers=auth)
    assert answer.status_code == 200, answer.text
    started = time.monotonic()
    info = raw.get(f"/api/models/{repo}", headers=auth)
    assert info.status_code == 200 and "cardData" not in info.json() and "safetensors" not in info.json()
    listing = raw.get("/api/models", params={"search": repo.split("/")[1], "full": "1"}, headers=auth)
    assert listing.status_code == 200 and len(listing.json()) == 1
    assert time.monotonic() - started < 5


def test_oversized_bodies_refused_without_buffering_them(raw, auth, repo, monkeypatch):
    def chunks(total: int, size: int = 1 << 20) -> Iterator[bytes]:
        for _ in range(total // size):
            yield b" " * size

    big_json = raw.post("/api/repos/create", content=chunks(17 << 20), headers=auth)
    assert big_json.status_code == 413
    monkeypatch.setattr(transfer, "MAX_COMMIT_LINE", 64 << 10)
    monkeypatch.setattr(transfer, "MAX_COMMIT_PAYLOAD", 1 << 20)
    long_line = _commit(raw, repo, _header(), _file("a.txt", b"x" * (100 << 10)), headers=auth)
    assert long_line.status_code == 400 and "line too long" in long_line.json()["error"]
    many = _commit(raw, repo, _header(), *[_file(f"f{i}.txt", b"y" * 30_000) for i in range(40)], headers=auth)
    assert many.status_code == 413
    assert raw.get(f"/api/models/{repo}/tree/main", headers=auth).json()[0]["path"] == ".gitattributes"
    # an LFS upload longer than it announced
    data = os.urandom(1000)
    oid = hashlib.sha256(data).hexdigest()
    batch = raw.post(f"/{repo}.git/info/lfs/objects/batch", headers=auth,
                     json={"operation": "upload", "transfers": ["basic"], "objects": [{"oid": oid, "size": 500}]})
    href = batch.json()["objects"][0]["actions"]["upload"]["href"]
    assert httpx.put(href, content=data).status_code == 400
    verify = raw.post(f"/{repo}.git/info/lfs/objects/verify", headers=auth, json={"oid": oid, "size": 500})
    assert verify.status_code == 404  # nothing was stored


# -------------------------------------------------------------------- tokens


WRITES = [
    ("POST", "/api/repos/create", {"name": "intruder"}),
    ("DELETE", "/api/repos/delete", {"name": "REPONAME"}),
    ("PUT", "/api/models/REPO/settings", {"private": True}),
    ("POST", "/api/models/REPO/branch/evil", {}),
    ("DELETE", "/api/models/REPO/branch/main", None),
    ("POST", "/api/models/REPO/tag/main", {"tag": "evil"}),
    ("POST", "/api/models/REPO/preupload/main", {"files": []}),
    ("POST", "/api/models/REPO/commit/main", _ndjson(_header("evil"), _file("evil.txt", b"x"))),
    ("POST", "/REPO.git/info/lfs/objects/batch", {"operation": "upload", "objects": []}),
    ("POST", "/REPO.git/info/lfs/objects/verify", {"oid": "0" * 64, "size": 1}),
    ("GET", "/api/whoami-v2", None),
]


@pytest.mark.parametrize("token", [None, "hf_" + "x" * 40, "TOKEN-prefix", "TOKEN+suffix"])
def test_writes_need_the_exact_token(raw, auth, repo, local_hub, token):
    head = raw.get(f"/api/models/{repo}", headers=auth).json()["sha"]
    if token:
        token = token.replace("TOKEN-prefix", local_hub.token[:-1]).replace("TOKEN+suffix", local_hub.token + "x")
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    for method, path, body in WRITES:
        path = path.replace("REPO", repo)
        if isinstance(body, dict) and body.get("name") == "REPONAME":
            body = {"name": repo.split("/")[1]}
        kwargs = {"json": body} if isinstance(body, dict) else {"content": body}
        response = raw.request(method, path, headers=headers, **kwargs)
        assert response.status_code == 401, (method, path, response.status_code)
    assert raw.get(f"/api/models/{repo}", headers=auth).json()["sha"] == head


def test_private_repo_hidden_and_upload_signatures_checked(raw, auth, local_hub):
    name = f"rel-private-{uuid.uuid4().hex[:6]}"
    repo = raw.post("/api/repos/create", json={"name": name, "private": True}, headers=auth).json()["name"]
    for path in (f"/api/models/{repo}", f"/api/models/{repo}/tree/main", f"/api/models/{repo}/refs",
                 f"/api/models/{repo}/commits/main", f"/{repo}/resolve/main/.gitattributes"):
        assert raw.get(path).status_code == 404, path  # as if it did not exist
    data = os.urandom(256)
    oid = hashlib.sha256(data).hexdigest()
    batch = raw.post(f"/{repo}.git/info/lfs/objects/batch", headers=auth,
                     json={"operation": "upload", "objects": [{"oid": oid, "size": len(data)}]})
    href = batch.json()["objects"][0]["actions"]["upload"]["href"]
    url, _, query = href.partition("?")
    params = dict(p.split("=", 1) for p in query.split("&"))
    signer = TokenAuth(local_hub.token)
    expired = signer.sign_upload(f"model/{repo}", oid, len(data), now=time.time() - 7200)
    other_repo = signer.sign_upload("model/hubmerge/other", oid, len(data))
    for bad in ({**params, "sig": params["sig"][:-1] + ("0" if params["sig"][-1] != "0" else "1")},
                {**params, "size": str(len(data) + 1)}, expired, other_repo, {"size": params["size"]}):
        assert httpx.put(url, params=bad, content=data).status_code == 403, bad
    assert raw.post(f"/{repo}.git/info/lfs/objects/verify", headers=auth,
                    json={"oid": oid, "size": len(data)}).status_code == 404
    assert httpx.put(href, content=data).status_code == 200  # the genuine URL works


def test_tokens_compared_in_constant_time(monkeypatch):
    import hmac

    calls = []
    real = hmac.compare_digest

    def spy(a, b):
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", spy)
    auth = TokenAuth("hf_secret-token")
    assert auth.check_header("Bearer hf_secret-token") is True
    with pytest.raises(PermissionError):
        auth.check_header("Bearer hf_secret-tokeX")
    signed = auth.sign_upload("model/a/b", "0" * 64, 3)
    auth.verify_upload("model/a/b", "0" * 64, signed["size"], signed["expires"], signed["sig"])
    assert calls[0] == (b"hf_secret-token", b"hf_secret-token") and calls[1] == (b"hf_secret-tokeX", b"hf_secret-token")
    assert len(calls) == 3  # the token and the upload signature: each checked with compare_digest


def test_public_bind_refused_without_allow_public(capsys):
    from hubmerge.cli import main

    assert main(["hub", "serve", "--host", "0.0.0.0", "--port", "0", "--data", tempfile.mkdtemp()]) == 2
    assert "Refusing to listen on '0.0.0.0'" in capsys.readouterr().err


def test_served_hub_never_logs_tokens(tmp_path):
    """``hubmerge -v hub serve`` (every request logged): right and wrong tokens, signed URLs, errors."""
    token, guess = "hf_" + uuid.uuid4().hex + "SERVERSECRET", "hf_" + uuid.uuid4().hex + "WRONGGUESS"
    log = tmp_path / "serve.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "hubmerge.cli", "-v", "hub", "serve", "--port", "0", "--data",
                                 str(tmp_path / "data")], stdout=out, stderr=subprocess.STDOUT,
                                env={**os.environ, "HUBMERGE_HUB_TOKEN": token, "PYTHONUNBUFFERED": "1"})
    try:
        deadline = time.monotonic() + 60
        while "HF_ENDPOINT=" not in log.read_text() and time.monotonic() < deadline:
            assert proc.poll() is None, log.read_text()
            time.sleep(0.1)
        endpoint = log.read_text().split("HF_ENDPOINT=")[1].split()[0]
        good, bad = {"Authorization": f"Bearer {token}"}, {"Authorization": f"Bearer {guess}"}
        with httpx.Client(base_url=endpoint, timeout=30) as http:
            assert http.get("/api/whoami-v2", headers=good).status_code == 200
            assert http.get("/api/whoami-v2", headers=bad).status_code == 401
            repo = http.post("/api/repos/create", json={"name": "logs"}, headers=good).json()["name"]
            data = b"secret weights"
            oid = hashlib.sha256(data).hexdigest()
            href = http.post(f"/{repo}.git/info/lfs/objects/batch", headers=good, json={
                "operation": "upload", "objects": [{"oid": oid, "size": len(data)}]}).json()["objects"][0]
            assert httpx.put(href["actions"]["upload"]["href"], content=data).status_code == 200
            assert http.get(f"/api/models/{repo}?token={token}", headers=bad).status_code == 401
            http.post("/api/repos/create", content=b"{" * 10_000, headers=good)
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    text = log.read_text()
    assert "/api/whoami-v2 -> 401" in text and "/api/whoami-v2 -> 200" in text  # requests were logged...
    assert token not in text and guess not in text and "sig=" not in text  # ...but no secret
    assert token[:5] + "…" in text  # only the fingerprint


# -------------------------------------------------------------------- schemathesis

FUZZ_TOKEN = "hf_fuzz-" + uuid.uuid4().hex
_fuzz_data = tempfile.mkdtemp(prefix="hubmerge-fuzz-hub-")
atexit.register(shutil.rmtree, _fuzz_data, ignore_errors=True)
_fuzz_store = RepoStore(_fuzz_data, lock=False)
FUZZ_REPOS = [("fuzz", "public"), ("fuzz", "private")]
#: Examples per API operation: 23 operations, so about 350 requests in all.
FUZZ_EXAMPLES = 15
fuzz_schema = schemathesis.openapi.from_asgi("/openapi.json", create_app(_fuzz_store, TokenAuth(FUZZ_TOKEN),
                                                                           username="fuzz"))


@schemathesis.serializer("application/x-ndjson")
def _ndjson_serializer(ctx, value):
    return _ndjson(*value) if isinstance(value, list) else json.dumps(value).encode()


def _fuzz_repos() -> None:
    for namespace, name in FUZZ_REPOS:  # fuzzed deletes may remove them: bring them back
        ref = RepoRef("model", namespace, name)
        try:
            _fuzz_store.get_repo(ref)
        except LookupError:
            _fuzz_store.create_repo(ref, private=name == "private", author="fuzz")


@fuzz_schema.parametrize()
@fuzz_schema.given(repo=st.sampled_from([None, *FUZZ_REPOS]), token=st.sampled_from([None, FUZZ_TOKEN, "hf_bad"]))
@settings(max_examples=FUZZ_EXAMPLES, deadline=None, phases=[Phase.explicit, Phase.generate],
          suppress_health_check=list(HealthCheck))
def test_openapi_fuzz_never_a_server_error(case, repo, token):
    _fuzz_repos()
    if repo and "namespace" in (case.path_parameters or {}):  # often aim at repos that exist
        case.path_parameters.update(namespace=repo[0], name=repo[1])
    response = case.call(headers={"Authorization": f"Bearer {token}"} if token else {})
    case.validate_response(response, checks=[not_a_server_error, status_code_conformance,
                                             content_type_conformance])
