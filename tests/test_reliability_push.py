"""Faults during a push: 5xx answers, dropped connections, lost answers, commit conflicts.

A loopback Hub (the real ``localhub`` app) runs behind a fault-injecting ASGI middleware, and,
for connections cut mid-upload, behind a TCP proxy that forwards part of a request and then
closes both sides. After every fault the target repo is either unchanged or holds the whole
upload — never part of it — and retries wait with exponential backoff, then stop with a clear
message.
"""

from __future__ import annotations

import hashlib
import json
import re
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
import uvicorn
from safetensors.torch import save_file
from starlette.responses import JSONResponse

from hubmerge import hub
from hubmerge.errors import HubError
from hubmerge.hub import push_folder
from hubmerge.localhub.app import create_app
from hubmerge.localhub.auth import TokenAuth
from hubmerge.localhub.storage import RepoStore

pytest_plugins = ["hubmerge.localhub.pytest_plugin"]


# -------------------------------------------------------------------- fault injection


@dataclass
class Rule:
    """Answer the next ``times`` requests matching ``method`` and ``path`` (a regex) with a fault.

    ``status``: answer that status without reaching the Hub. ``lose_answer``: let the Hub handle
    the request (it commits), then cut the connection before the client gets the answer.
    """

    method: str
    path: str
    times: int
    status: int | None = None
    lose_answer: bool = False


@dataclass
class FaultInjector:
    """ASGI middleware in front of the local Hub app."""

    app: object
    rules: list[Rule] = field(default_factory=list)
    seen: list[tuple[str, str, float]] = field(default_factory=list)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        self.seen.append((scope["method"], scope["path"], time.monotonic()))
        rule = next((r for r in self.rules if r.times > 0 and r.method == scope["method"]
                     and re.search(r.path, scope["path"])), None)
        if rule is None:
            return await self.app(scope, receive, send)
        rule.times -= 1
        if rule.status is not None:
            response = JSONResponse({"error": "injected fault"}, status_code=rule.status,
                                    headers={"X-Error-Message": "injected fault"})
            return await response(scope, receive, send)

        async def swallow(message):
            if message["type"] == "http.response.start":  # promise a body that never comes
                await send({"type": "http.response.start", "status": 200,
                            "headers": [(b"content-length", b"4096"), (b"content-type", b"application/json")]})

        await self.app(scope, receive, swallow)
        raise ConnectionAbortedError("injected: the connection drops before the answer is sent")

    def count(self, method: str, path: str) -> int:
        return sum(1 for m, p, _ in self.seen if m == method and re.search(path, p))


@contextmanager
def serve(app) -> Iterator[str]:
    """Serve an ASGI app on a free loopback port in a thread."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    server = uvicorn.Server(uvicorn.Config(app, log_config=None, log_level="critical", access_log=False,
                                           lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 15
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


class CuttingProxy:
    """A loopback TCP proxy that, ``times`` times, forwards ``keep`` bytes of a request whose
    bytes contain ``trigger`` and then closes both connections (the upload is cut mid-body)."""

    def __init__(self, upstream: str, trigger: bytes, keep: int, times: int = 1):
        self.upstream = ("127.0.0.1", int(upstream.rsplit(":", 1)[1]))
        self.trigger, self.keep, self.times = trigger, keep, times
        self.cuts = 0
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.endpoint = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            server = socket.create_connection(self.upstream)
            threading.Thread(target=self._pump, args=(client, server, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client, False), daemon=True).start()

    def _pump(self, source: socket.socket, dest: socket.socket, upstream: bool) -> None:
        window = b""
        remaining = None  # bytes still to forward before the cut
        try:
            while data := source.recv(65536):
                if upstream and remaining is None:
                    window = (window + data)[-(len(self.trigger) + len(data)):]
                    at = window.find(self.trigger)
                    with self._lock:
                        if at >= 0 and self.times > 0:
                            self.times -= 1
                            remaining = max(0, at + self.keep - (len(window) - len(data)))
                if remaining is not None:
                    dest.sendall(data[:remaining])
                    remaining -= len(data)
                    if remaining <= 0:
                        self.cuts += 1
                        break
                else:
                    dest.sendall(data)
        except OSError:
            pass
        for sock in (source, dest):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()

    def close(self) -> None:
        self.listener.close()


@pytest.fixture(scope="module")
def faulty_hub(tmp_path_factory, local_hub_env):
    """A local Hub behind a :class:`FaultInjector`, accepting this session's ``HF_TOKEN``."""
    store = RepoStore(tmp_path_factory.mktemp("faulty-hub"))
    injector = FaultInjector(create_app(store, TokenAuth(local_hub_env.token)))
    with serve(injector) as endpoint:
        injector.endpoint = endpoint
        yield injector
    store.close()


@pytest.fixture
def hub_faults(faulty_hub, monkeypatch):
    """The faulty Hub with no rules; the push backoff's sleeps recorded instead of slept."""
    faulty_hub.rules.clear()
    faulty_hub.seen.clear()
    faulty_hub.sleeps = []
    monkeypatch.setattr(hub, "_sleep", faulty_hub.sleeps.append)
    yield faulty_hub
    faulty_hub.rules.clear()


# -------------------------------------------------------------------- helpers

COMMIT = r"/api/models/[^/]+/[^/]+/commit/"


def _folder(tmp_path: Path, seed: int) -> Path:
    """A small merge-like output: an LFS weights file (by .gitattributes) plus regular files."""
    folder = tmp_path / f"out-{seed}"
    folder.mkdir()
    generator = torch.Generator().manual_seed(seed)
    save_file({"w": torch.randn(64, 64, generator=generator)}, folder / "model.safetensors")
    (folder / "config.json").write_text(json.dumps({"model_type": "bert", "seed": seed}))
    vocab = {f"token{i}-{seed}": i for i in range(8000)}  # ~150 KB: a regular file, inline in the commit
    (folder / "tokenizer.json").write_text(json.dumps({"model": {"vocab": vocab}}))
    (folder / "README.md").write_text(f"---\ntags: [hubmerge]\n---\n# merge {seed}\n")
    return folder


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _state(api, repo: str) -> tuple[str, dict[str, str]]:
    """Head commit and ``{path: sha256}`` of the repo's main branch."""
    from huggingface_hub import hf_hub_download

    head = api.model_info(repo).sha
    files = {}
    for path in api.list_repo_files(repo, revision=head):
        local = hf_hub_download(repo, path, revision=head, endpoint=api.endpoint)
        files[path] = _sha(Path(local).read_bytes())
    return head, files


def _whole(folder: Path) -> dict[str, str]:
    return {p.name: _sha(p.read_bytes()) for p in folder.iterdir()}


def _new_repo(faults) -> tuple[object, str]:
    from huggingface_hub import HfApi

    api = HfApi(endpoint=faults.endpoint)
    repo = api.create_repo(f"push-{uuid.uuid4().hex[:8]}").repo_id
    return api, repo


def _assert_backoff(sleeps: list[float]) -> None:
    for attempt, delay in enumerate(sleeps):
        ceiling = min(hub.PUSH_BACKOFF_MAX_SECONDS, hub.PUSH_BACKOFF_SECONDS * 2**attempt)
        assert 0.5 * ceiling <= delay <= ceiling, sleeps
    assert sleeps == sorted(sleeps)  # each wait at least as long as the one before


# -------------------------------------------------------------------- tests


def test_5xx_on_commit_retried_with_backoff_then_one_whole_commit(hub_faults, tmp_path):
    api, repo = _new_repo(hub_faults)
    before, _ = _state(api, repo)
    folder = _folder(tmp_path, 1)
    hub_faults.rules.append(Rule("POST", COMMIT, times=2, status=503))
    oid = push_folder(folder, repo, endpoint=hub_faults.endpoint)
    assert hub_faults.count("POST", COMMIT) == 3 and len(hub_faults.sleeps) == 2
    _assert_backoff(hub_faults.sleeps)
    head, files = _state(api, repo)
    assert head == oid and files == {".gitattributes": files[".gitattributes"], **_whole(folder)}
    assert [c.commit_id for c in api.list_repo_commits(repo)][1] == before  # exactly one new commit


def test_persistent_5xx_gives_up_with_a_clear_message_and_repo_unchanged(hub_faults, tmp_path):
    api, repo = _new_repo(hub_faults)
    before = _state(api, repo)
    hub_faults.rules.append(Rule("POST", COMMIT, times=100, status=502))
    with pytest.raises(HubError, match=rf"{repo}: push failed {hub.PUSH_ATTEMPTS} times \(last: HTTP 502\); "
                                       "giving up.*all-or-nothing"):
        push_folder(_folder(tmp_path, 2), repo, endpoint=hub_faults.endpoint)
    assert hub_faults.count("POST", COMMIT) == hub.PUSH_ATTEMPTS
    assert len(hub_faults.sleeps) == hub.PUSH_ATTEMPTS - 1
    _assert_backoff(hub_faults.sleeps)
    assert _state(api, repo) == before


def test_client_errors_are_not_retried(hub_faults, tmp_path):
    _, repo = _new_repo(hub_faults)
    hub_faults.rules.append(Rule("POST", COMMIT, times=100, status=400))
    with pytest.raises(HubError, match="HTTP 400"):
        push_folder(_folder(tmp_path, 3), repo, endpoint=hub_faults.endpoint)
    assert hub_faults.count("POST", COMMIT) == 1 and hub_faults.sleeps == []


def test_answer_lost_after_the_commit_landed_is_not_committed_twice(hub_faults, tmp_path):
    api, repo = _new_repo(hub_faults)
    before, _ = _state(api, repo)
    folder = _folder(tmp_path, 4)
    hub_faults.rules.append(Rule("POST", COMMIT, times=1, lose_answer=True))
    oid = push_folder(folder, repo, endpoint=hub_faults.endpoint)
    head, files = _state(api, repo)
    assert head == oid and len(hub_faults.sleeps) == 1
    assert [c.commit_id for c in api.list_repo_commits(repo)][1:] == [before]  # one commit, not two
    assert {k: v for k, v in files.items() if k != ".gitattributes"} == _whole(folder)


@pytest.mark.parametrize("trigger, where", [(b"/commit/main", "commit"), (b"PUT /", "lfs-upload")])
def test_connection_cut_mid_upload_then_retried_to_one_whole_commit(hub_faults, tmp_path, trigger, where):
    api, repo = _new_repo(hub_faults)
    before, _ = _state(api, repo)
    folder = _folder(tmp_path, 5 if where == "commit" else 8)  # new LFS content: really uploaded
    proxy = CuttingProxy(hub_faults.endpoint, trigger, keep=3000)
    try:
        oid = push_folder(folder, repo, endpoint=proxy.endpoint)
    finally:
        proxy.close()
    assert proxy.cuts == 1
    head, files = _state(api, repo)
    assert head == oid and [c.commit_id for c in api.list_repo_commits(repo)][1:] == [before]
    assert {k: v for k, v in files.items() if k != ".gitattributes"} == _whole(folder)
    if where == "commit":  # our retry; an LFS upload is retried by huggingface_hub itself
        assert len(hub_faults.sleeps) == 1


def test_commit_conflict_refused_without_retry(hub_faults, tmp_path):
    api, repo = _new_repo(hub_faults)
    base, _ = _state(api, repo)
    api.upload_file(path_or_fileobj=b"theirs", path_in_repo="theirs.txt", repo_id=repo)  # the branch moves
    moved = _state(api, repo)
    with pytest.raises(HubError, match=rf"{repo}: the branch moved since {base[:12]}.*nothing was pushed"):
        push_folder(_folder(tmp_path, 6), repo, parent_commit=base, endpoint=hub_faults.endpoint)
    assert _state(api, repo) == moved and hub_faults.sleeps == []


def test_racing_pushes_with_parent_commit_one_wins_whole(hub_faults, tmp_path):
    api, repo = _new_repo(hub_faults)
    base, _ = _state(api, repo)
    folders = [_folder(tmp_path, 10 + i) for i in range(4)]
    results: dict[int, object] = {}
    start = threading.Barrier(len(folders))

    def push(i: int) -> None:
        start.wait()
        try:
            results[i] = push_folder(folders[i], repo, parent_commit=base, endpoint=hub_faults.endpoint)
        except HubError as exc:
            results[i] = exc

    threads = [threading.Thread(target=push, args=(i,)) for i in range(len(folders))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    winners = [i for i, r in results.items() if isinstance(r, str)]
    assert len(winners) == 1, results
    assert all("the branch moved" in str(r) for i, r in results.items() if i not in winners)
    head, files = _state(api, repo)
    assert head == results[winners[0]]
    assert {k: v for k, v in files.items() if k != ".gitattributes"} == _whole(folders[winners[0]])
    assert [c.commit_id for c in api.list_repo_commits(repo)][1:] == [base]


def test_huggingface_hub_itself_retries_preupload_5xx(hub_faults, tmp_path):
    """What the client library already covers: preupload/LFS calls go through its own backoff."""
    _, repo = _new_repo(hub_faults)
    hub_faults.rules.append(Rule("POST", r"/preupload/", times=1, status=503))
    folder = _folder(tmp_path, 7)
    push_folder(folder, repo, endpoint=hub_faults.endpoint)
    assert hub_faults.count("POST", r"/preupload/") == 2 and hub_faults.sleeps == []  # not our retry
