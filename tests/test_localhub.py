"""The local Hub against the real clients: huggingface_hub, transformers, peft.

The plugin points the clients at a session-wide local Hub (``HF_ENDPOINT``, ``HF_TOKEN``,
temporary ``HF_HOME``) before they are used; each test works in its own repos.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import socket
import stat
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from hubmerge.errors import LocalHubConfigError
from hubmerge.localhub.storage import RepoStore
from hubmerge.localhub.testing import run_local_hub

pytest_plugins = ["hubmerge.localhub.pytest_plugin"]

hf = pytest.importorskip("huggingface_hub")
from huggingface_hub import (
    CommitOperationAdd,
    CommitOperationDelete,
    HfApi,
    ModelCard,
    hf_hub_download,
    snapshot_download,
)
from huggingface_hub.errors import (
    BadRequestError,
    EntryNotFoundError,
    HfHubHTTPError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

BIG = 11 * 1024 * 1024  # above the 10 MiB regular-file limit: takes the LFS path


def _name(prefix: str = "repo") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def _ndjson(*items: dict) -> bytes:
    return b"".join(json.dumps(item).encode() + b"\n" for item in items)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


@pytest.fixture
def api(local_hub) -> HfApi:
    return HfApi()  # default endpoint and token: what HF_ENDPOINT/HF_TOKEN point at


@pytest.fixture
def raw(local_hub):
    with httpx.Client(base_url=local_hub.endpoint, timeout=30) as client:
        yield client


@pytest.fixture
def auth(local_hub) -> dict[str, str]:
    return {"Authorization": f"Bearer {local_hub.token}"}


@pytest.fixture
def repo(api) -> str:
    return api.create_repo(_name()).repo_id


def test_clients_point_at_the_local_hub(local_hub, local_hub_env):
    from huggingface_hub import constants

    assert constants.ENDPOINT == local_hub.endpoint == local_hub_env.endpoint
    assert os.environ["HF_HOME"] == str(local_hub_env.hf_home)
    assert "HF_HUB_OFFLINE" not in os.environ


def test_whoami_and_create_repos(api, local_hub):
    assert api.whoami()["name"] == local_hub.username
    public = api.create_repo(_name("pub"))
    private = api.create_repo(_name("priv"), private=True)
    assert public.repo_id.startswith(f"{local_hub.username}/")
    assert str(public) == f"{local_hub.endpoint}/{public.repo_id}"
    assert api.model_info(public.repo_id).private is False
    assert api.model_info(private.repo_id).private is True
    with pytest.raises(HfHubHTTPError) as err:
        api.create_repo(public.repo_id)
    assert err.value.response.status_code == 409
    assert api.create_repo(public.repo_id, exist_ok=True).repo_id == public.repo_id
    org_repo = api.create_repo(f"some-org/{_name()}")
    assert org_repo.namespace == "some-org"
    # a new repo has an initial commit with the Hub's default .gitattributes
    assert api.list_repo_files(public.repo_id) == [".gitattributes"]


def test_upload_folder_one_commit_with_lfs_and_downloads(api, tmp_path, local_hub):
    repo_id = api.create_repo(_name("folder")).repo_id
    folder = tmp_path / "folder"
    (folder / "sub").mkdir(parents=True)
    (folder / "README.md").write_text("---\nlicense: mit\ntags:\n- hubmerge-recipe\n- demo\n---\n# Demo\n")
    (folder / "config.json").write_text(json.dumps({"model_type": "bert", "architectures": ["BertModel"]}))
    (folder / "sub" / "notes.txt").write_text("hello\n")
    big = os.urandom(BIG)
    (folder / "weights.bin").write_bytes(big)
    before = len(api.list_repo_commits(repo_id))
    commit = api.upload_folder(repo_id=repo_id, folder_path=folder, commit_message="add files")
    assert len(api.list_repo_commits(repo_id)) == before + 1  # one commit for all files

    info = api.model_info(repo_id, files_metadata=True)
    assert info.sha == commit.oid
    siblings = {s.rfilename: s for s in info.siblings}
    assert set(siblings) == {".gitattributes", "README.md", "config.json", "sub/notes.txt", "weights.bin"}
    assert siblings["weights.bin"].lfs is not None
    assert siblings["weights.bin"].lfs.sha256 == hashlib.sha256(big).hexdigest()
    assert siblings["weights.bin"].size == BIG
    assert siblings["sub/notes.txt"].lfs is None
    git_oid = hashlib.sha1(b"blob 6\x00hello\n").hexdigest()  # `git hash-object`
    assert siblings["sub/notes.txt"].blob_id == git_oid
    assert info.card_data.license == "mit"
    assert {"hubmerge-recipe", "demo", "license:mit", "bert", "transformers"} <= set(info.tags)
    assert info.config == {"model_type": "bert", "architectures": ["BertModel"]}
    assert sorted(api.list_repo_files(repo_id)) == sorted(siblings)

    refs = api.list_repo_refs(repo_id)
    assert [(b.name, b.target_commit) for b in refs.branches] == [("main", commit.oid)]

    path = hf_hub_download(repo_id, "weights.bin")
    assert Path(path).read_bytes() == big
    assert Path(hf_hub_download(repo_id, "sub/notes.txt")).read_text() == "hello\n"

    snap = Path(snapshot_download(repo_id, allow_patterns=["*.json", "sub/*"], cache_dir=tmp_path / "cache"))
    assert sorted(str(p.relative_to(snap)) for p in snap.rglob("*") if p.is_file()) == [
        "config.json",
        "sub/notes.txt",
    ]

    card = ModelCard.load(repo_id)
    assert card.data.tags == ["hubmerge-recipe", "demo"]
    assert "# Demo" in card.text

    tree = {f.path: f for f in api.list_repo_tree(repo_id, "sub", expand=True)}
    assert tree["sub/notes.txt"].last_commit.oid == commit.oid
    paths = api.get_paths_info(repo_id, ["weights.bin", "sub", "missing"])
    assert sorted(p.path for p in paths) == ["sub", "weights.bin"]


def test_list_models_by_tag_author_search(api, tmp_path):
    tag = f"tag-{uuid.uuid4().hex[:6]}"
    tagged = api.create_repo(_name("tagged")).repo_id
    api.upload_file(
        path_or_fileobj=f"---\ntags:\n- {tag}\n---\n".encode(), path_in_repo="README.md", repo_id=tagged
    )
    other = api.create_repo(f"another-org/{_name('tagged')}").repo_id
    api.upload_file(
        path_or_fileobj=f"---\ntags:\n- {tag}\n---\n".encode(), path_in_repo="README.md", repo_id=other
    )
    hidden = api.create_repo(_name("tagged"), private=True).repo_id
    api.upload_file(
        path_or_fileobj=f"---\ntags:\n- {tag}\n---\n".encode(), path_in_repo="README.md", repo_id=hidden
    )

    assert {m.id for m in api.list_models(filter=tag)} == {tagged, other, hidden}
    assert {m.id for m in api.list_models(filter=tag, token=False)} == {tagged, other}
    assert {m.id for m in api.list_models(filter=tag, author="another-org")} == {other}
    assert {m.id for m in api.list_models(search=tagged.split("/")[1])} == {tagged}
    full = next(iter(api.list_models(filter=tag, author="another-org", full=True, cardData=True)))
    assert full.sha and full.card_data.tags == [tag] and full.siblings
    assert len(list(api.list_models(filter=tag, limit=1))) == 1
    assert list(api.list_models(filter=[tag, "no-such-tag"])) == []


def test_resolve_headers_and_ranges(api, raw, repo):
    data = os.urandom(BIG)
    api.upload_file(path_or_fileobj=data, path_in_repo="big.bin", repo_id=repo)
    api.upload_file(path_or_fileobj=b"0123456789", path_in_repo="small.txt", repo_id=repo)
    sha = api.model_info(repo).sha

    head = raw.head(f"/{repo}/resolve/main/big.bin")
    assert head.status_code == 200
    assert head.headers["X-Repo-Commit"] == sha
    assert head.headers["X-Linked-Etag"] == f'"{hashlib.sha256(data).hexdigest()}"'
    assert head.headers["X-Linked-Size"] == head.headers["Content-Length"] == str(BIG)

    small = raw.get(f"/{repo}/resolve/{sha}/small.txt")
    assert small.content == b"0123456789"
    assert small.headers["ETag"] == f'"{hashlib.sha1(b"blob 10" + bytes(1) + b"0123456789").hexdigest()}"'
    part = raw.get(f"/{repo}/resolve/main/small.txt", headers={"Range": "bytes=2-5"})
    assert (part.status_code, part.content, part.headers["Content-Range"]) == (206, b"2345", "bytes 2-5/10")
    assert raw.get(f"/{repo}/resolve/main/small.txt", headers={"Range": "bytes=-3"}).content == b"789"
    assert (
        raw.get(f"/{repo}/resolve/main/big.bin", headers={"Range": f"bytes={BIG - 4}-"}).content == data[-4:]
    )
    assert raw.get(f"/{repo}/resolve/main/small.txt", headers={"Range": "bytes=50-"}).status_code == 416

    missing = raw.head(f"/{repo}/resolve/main/nope.txt")
    assert (missing.status_code, missing.headers["X-Error-Code"]) == (404, "EntryNotFound")
    assert missing.headers["X-Repo-Commit"] == sha


def test_errors_map_to_client_exceptions(api, repo):
    with pytest.raises(RepositoryNotFoundError):
        api.model_info(f"nobody/{_name()}")
    with pytest.raises(RevisionNotFoundError):
        api.model_info(repo, revision="no-such-branch")
    with pytest.raises(RevisionNotFoundError):
        hf_hub_download(repo, ".gitattributes", revision="no-such-branch")
    with pytest.raises(EntryNotFoundError):
        hf_hub_download(repo, "no-such-file.txt")
    with pytest.raises(EntryNotFoundError):
        api.delete_file("no-such-file.txt", repo_id=repo)
    assert api.file_exists(repo, ".gitattributes") and not api.file_exists(repo, "nope")
    assert api.repo_exists(repo) and not api.repo_exists(f"nobody/{_name()}")


def test_private_repo_invisible_without_token(api, raw, local_hub, tmp_path):
    repo_id = api.create_repo(_name("secret"), private=True).repo_id
    api.upload_file(path_or_fileobj=b"classified", path_in_repo="secret.txt", repo_id=repo_id)
    anonymous = HfApi(token=False)
    with pytest.raises(RepositoryNotFoundError):
        anonymous.model_info(repo_id)
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download(repo_id, "secret.txt", token=False, cache_dir=tmp_path)
    for path in (
        f"/{repo_id}/resolve/main/secret.txt",
        f"/api/models/{repo_id}/tree/main",
        f"/api/models/{repo_id}",
    ):
        response = raw.get(path)
        assert response.status_code == 404, path
        assert response.headers["X-Error-Code"] == "RepoNotFound"
        assert b"classified" not in response.content
    assert repo_id not in {m.id for m in anonymous.list_models(author=local_hub.username)}
    assert Path(hf_hub_download(repo_id, "secret.txt")).read_bytes() == b"classified"  # with the token


def test_wrong_or_missing_token_refused(api, repo):
    wrong = HfApi(token="hf_" + "x" * 40)
    for call in (
        lambda: wrong.create_repo(_name()),
        lambda: wrong.upload_file(path_or_fileobj=b"x", path_in_repo="x.txt", repo_id=repo),
        lambda: wrong.model_info(repo),
        lambda: wrong.whoami(),
    ):
        with pytest.raises(HfHubHTTPError) as err:
            call()
        assert err.value.response.status_code == 401
    anonymous = HfApi(token=False)
    for call in (
        lambda: anonymous.create_repo(_name()),
        lambda: anonymous.upload_file(path_or_fileobj=b"x", path_in_repo="x.txt", repo_id=repo),
        lambda: anonymous.delete_repo(repo),
    ):
        with pytest.raises(HfHubHTTPError) as err:
            call()
        assert err.value.response.status_code == 401
    assert api.list_repo_files(repo) == [".gitattributes"]


def test_path_escapes_refused(api, raw, auth, repo, local_hub):
    head = api.model_info(repo).sha
    for body in ({"name": ".."}, {"name": "x", "organization": "../etc"}, {"name": "a/b"}, {"name": "x\\y"}):
        assert raw.post("/api/repos/create", json=body, headers=auth).status_code == 400, body
    header = {"key": "header", "value": {"summary": "evil"}}
    for bad in ("../escape.txt", "a/../../b", "/abs.txt", "a\\b.txt", "a\x00b", "./a", "a//b", ".git/config"):
        payload = _ndjson(
            header, {"key": "file", "value": {"path": bad, "content": _b64(b"x"), "encoding": "base64"}}
        )
        response = raw.post(f"/api/models/{repo}/commit/main", content=payload, headers=auth)
        assert response.status_code == 400, bad
    for url in (
        f"/{repo}/resolve/main/%2e%2e/%2e%2e/token",
        f"/{repo}/resolve/main/a%5Cb",
        "/api/models/%2e%2e/%2e%2e",
        "/api/models/..%2F..%2Fx/repo/tree/main",
        "/%2e%2e/x/resolve/main/token",
    ):
        assert raw.get(url, headers=auth).status_code == 400, url
    assert api.model_info(repo).sha == head
    outside = [p for p in local_hub.data_dir.parent.iterdir() if p.name in ("etc", "escape.txt")]
    assert outside == []


def test_truncated_commit_leaves_repo_unchanged(api, raw, auth, repo):
    head = api.model_info(repo).sha
    payload = _ndjson(
        {"key": "header", "value": {"summary": "partial"}},
        {"key": "file", "value": {"path": "a.txt", "content": _b64(b"a"), "encoding": "base64"}},
        {"key": "file", "value": {"path": "b.txt", "content": _b64(b"b" * 1000), "encoding": "base64"}},
    )
    response = raw.post(f"/api/models/{repo}/commit/main", content=payload[:-200], headers=auth)
    assert response.status_code == 400 and "truncated" in response.json()["error"]
    assert api.model_info(repo).sha == head
    assert api.list_repo_files(repo) == [".gitattributes"]


def test_client_disconnect_mid_commit_leaves_repo_unchanged(api, repo, local_hub, caplog):
    head = api.model_info(repo).sha
    body = _ndjson(
        {"key": "header", "value": {"summary": "interrupted"}},
        {"key": "file", "value": {"path": "a.txt", "content": _b64(b"a"), "encoding": "base64"}},
    )
    request = (
        f"POST /api/models/{repo}/commit/main HTTP/1.1\r\nHost: 127.0.0.1:{local_hub.port}\r\n"
        f"Authorization: Bearer {local_hub.token}\r\nContent-Type: application/x-ndjson\r\n"
        f"Content-Length: {len(body) + 10_000}\r\n\r\n"
    ).encode()
    with caplog.at_level(logging.WARNING, logger="hubmerge.localhub"):
        with socket.create_connection(("127.0.0.1", local_hub.port)) as sock:
            sock.sendall(request + body)
            time.sleep(0.2)
        deadline = time.monotonic() + 10
        while "Client disconnected during a commit" not in caplog.text and time.monotonic() < deadline:
            time.sleep(0.05)
    assert "Client disconnected during a commit" in caplog.text
    assert api.model_info(repo).sha == head
    assert api.list_repo_files(repo) == [".gitattributes"]


def test_lfs_file_never_uploaded_is_refused(api, raw, auth, repo):
    head = api.model_info(repo).sha
    ghost = hashlib.sha256(b"never uploaded").hexdigest()
    payload = _ndjson(
        {"key": "header", "value": {"summary": "ghost"}},
        {"key": "file", "value": {"path": "real.txt", "content": _b64(b"real"), "encoding": "base64"}},
        {"key": "lfsFile", "value": {"path": "ghost.bin", "algo": "sha256", "oid": ghost, "size": 14}},
    )
    response = raw.post(f"/api/models/{repo}/commit/main", content=payload, headers=auth)
    assert response.status_code == 400 and "does not exist" in response.json()["error"]
    assert api.model_info(repo).sha == head
    assert api.list_repo_files(repo) == [".gitattributes"]


def test_failure_while_switching_ref_leaves_repo_unchanged(api, repo, local_hub, monkeypatch):
    head = api.model_info(repo).sha
    commits_dir = local_hub.data_dir / "repos" / "models" / repo / "commits"
    before = sorted(commits_dir.iterdir())

    def broken_switch(self, meta, refs):
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(RepoStore, "_switch_refs", broken_switch)
    with pytest.raises(HfHubHTTPError) as err:
        api.upload_file(path_or_fileobj=b"x", path_in_repo="x.txt", repo_id=repo)
    assert err.value.response.status_code == 500
    monkeypatch.undo()
    assert api.model_info(repo).sha == head
    assert sorted(commits_dir.iterdir()) == before  # the half-written commit was removed


def test_parent_commit_conflict_refused(api, repo):
    base = api.model_info(repo).sha
    moved = api.upload_file(path_or_fileobj=b"1", path_in_repo="one.txt", repo_id=repo, parent_commit=base)
    with pytest.raises(HfHubHTTPError) as err:
        api.upload_file(path_or_fileobj=b"2", path_in_repo="two.txt", repo_id=repo, parent_commit=base)
    assert err.value.response.status_code == 412
    assert api.model_info(repo).sha == moved.oid
    assert sorted(api.list_repo_files(repo)) == [".gitattributes", "one.txt"]


def test_old_revision_stays_readable(api, repo):
    first = api.upload_file(path_or_fileobj=b"version 1", path_in_repo="file.txt", repo_id=repo)
    second = api.create_commit(
        repo,
        [CommitOperationAdd("file.txt", b"version 2"), CommitOperationAdd("new.txt", b"new")],
        commit_message="v2",
    )
    assert first.oid != second.oid
    assert Path(hf_hub_download(repo, "file.txt", revision=first.oid)).read_bytes() == b"version 1"
    assert Path(hf_hub_download(repo, "file.txt")).read_bytes() == b"version 2"
    assert sorted(api.list_repo_files(repo, revision=first.oid)) == [".gitattributes", "file.txt"]
    assert api.model_info(repo, revision=first.oid).sha == first.oid
    api.create_commit(repo, [CommitOperationDelete("new.txt")], commit_message="delete")
    assert "new.txt" not in api.list_repo_files(repo)
    assert "new.txt" in api.list_repo_files(repo, revision=second.oid)


def test_unchanged_files_are_not_recommitted(api, repo):
    first = api.upload_file(path_or_fileobj=b"same", path_in_repo="same.txt", repo_id=repo)
    again = api.upload_file(path_or_fileobj=b"same", path_in_repo="same.txt", repo_id=repo)
    assert again.oid == first.oid  # the preupload oid let the client skip an empty commit


def test_concurrent_commits_are_serialised(api, repo):
    def push(i: int) -> str:
        return (
            HfApi().upload_file(path_or_fileobj=f"{i}".encode(), path_in_repo=f"f{i}.txt", repo_id=repo).oid
        )

    with ThreadPoolExecutor(max_workers=8) as pool:
        oids = list(pool.map(push, range(8)))  # re-raises any client error
    assert len(set(oids)) == 8
    assert sorted(api.list_repo_files(repo)) == sorted([".gitattributes"] + [f"f{i}.txt" for i in range(8)])
    assert len(api.list_repo_commits(repo)) == 9


def test_branches_tags_and_delete_repo(api, repo):
    api.create_branch(repo, branch="dev")
    api.create_branch(repo, branch="dev", exist_ok=True)
    on_dev = api.upload_file(path_or_fileobj=b"dev", path_in_repo="dev.txt", repo_id=repo, revision="dev")
    api.create_tag(repo, tag="v1", revision="dev")
    refs = api.list_repo_refs(repo)
    assert {b.name: b.target_commit for b in refs.branches}["dev"] == on_dev.oid
    assert [(t.name, t.target_commit) for t in refs.tags] == [("v1", on_dev.oid)]
    assert "dev.txt" not in api.list_repo_files(repo)
    assert Path(hf_hub_download(repo, "dev.txt", revision="v1")).read_bytes() == b"dev"
    api.create_branch(repo, branch="feature/x", revision="v1")  # '/' travels percent-encoded
    on_feature = api.upload_file(
        path_or_fileobj=b"f", path_in_repo="f.txt", repo_id=repo, revision="feature/x"
    )
    assert api.model_info(repo, revision="feature/x").sha == on_feature.oid
    assert Path(hf_hub_download(repo, "f.txt", revision="feature/x")).read_bytes() == b"f"
    api.delete_branch(repo, branch="dev")
    api.delete_branch(repo, branch="feature/x")
    assert [b.name for b in api.list_repo_refs(repo).branches] == ["main"]

    api.update_repo_settings(repo, private=True)
    assert api.model_info(repo).private is True
    api.delete_repo(repo)
    with pytest.raises(RepositoryNotFoundError):
        api.model_info(repo)
    api.delete_repo(repo, missing_ok=True)
    with pytest.raises(RepositoryNotFoundError):
        api.delete_repo(repo)


def test_invalid_card_metadata_is_refused(api, repo):
    with pytest.raises(ValueError, match="Invalid metadata"):
        api.upload_file(
            path_or_fileobj=b"---\ntags: [unclosed\n---\n", path_in_repo="README.md", repo_id=repo
        )
    with pytest.raises(BadRequestError):
        api.create_commit(repo, [CommitOperationAdd("x.txt", b"x")], commit_message="pr", create_pr=True)


def test_dataset_repos(api):
    repo_id = api.create_repo(_name("data"), repo_type="dataset").repo_id
    api.upload_file(
        path_or_fileobj=b"a,b\n1,2\n", path_in_repo="train.csv", repo_id=repo_id, repo_type="dataset"
    )
    info = api.dataset_info(repo_id)
    assert "train.csv" in {s.rfilename for s in info.siblings}
    path = hf_hub_download(repo_id, "train.csv", repo_type="dataset")
    assert Path(path).read_bytes() == b"a,b\n1,2\n"
    assert repo_id in {d.id for d in api.list_datasets(search=repo_id.split("/")[1])}
    with pytest.raises(RepositoryNotFoundError):
        api.model_info(repo_id)  # a dataset is not a model


def test_transformers_and_peft_push_and_reload(local_hub):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    config = transformers.BertConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37, vocab_size=99
    )
    model = transformers.BertModel(config).eval()
    repo_id = f"{local_hub.username}/{_name('tiny-bert')}"
    model.push_to_hub(repo_id)
    reloaded = transformers.BertModel.from_pretrained(repo_id).eval()
    inputs = torch.randint(0, 99, (2, 7))
    with torch.no_grad():
        assert torch.equal(model(inputs).last_hidden_state, reloaded(inputs).last_hidden_state)
    info = HfApi().model_info(repo_id)
    assert info.safetensors.total == sum(p.numel() for p in model.state_dict().values())

    lora = peft.get_peft_model(
        transformers.BertModel(config),
        peft.LoraConfig(r=4, target_modules=["query", "value"], init_lora_weights=False),
    ).eval()
    adapter_id = f"{local_hub.username}/{_name('tiny-lora')}"
    lora.push_to_hub(adapter_id)
    base = transformers.BertModel.from_pretrained(repo_id)
    loaded = peft.PeftModel.from_pretrained(base, adapter_id).eval()
    adapter_state = peft.get_peft_model_state_dict(lora)
    loaded_state = peft.get_peft_model_state_dict(loaded)
    assert adapter_state.keys() == loaded_state.keys()
    assert all(torch.equal(adapter_state[k], loaded_state[k]) for k in adapter_state)
    assert "adapter_config.json" in HfApi().list_repo_files(adapter_id)


def test_restart_keeps_data_and_token(tmp_path):
    data_dir = tmp_path / "hub-data"
    with run_local_hub(data_dir) as hub:
        api = HfApi(endpoint=hub.endpoint, token=hub.token)
        repo_id = api.create_repo("persistent", private=True).repo_id
        commit = api.upload_file(path_or_fileobj=os.urandom(BIG), path_in_repo="w.bin", repo_id=repo_id)
        token = hub.token
        with pytest.raises(LocalHubConfigError, match="in use"), run_local_hub(data_dir):
            pass
    assert stat.S_IMODE((data_dir / "token").stat().st_mode) == 0o600
    assert (data_dir / "token").read_text().strip() == token
    with run_local_hub(data_dir) as hub:
        assert hub.token == token
        api = HfApi(endpoint=hub.endpoint, token=hub.token)
        info = api.model_info(repo_id, files_metadata=True)
        assert info.sha == commit.oid and info.private
        path = hf_hub_download(
            repo_id, "w.bin", endpoint=hub.endpoint, token=hub.token, cache_dir=tmp_path / "c"
        )
        assert os.path.getsize(path) == BIG


def test_token_never_logged(api, local_hub, caplog, tmp_path):
    with caplog.at_level(logging.DEBUG):
        repo_id = api.create_repo(_name("logs")).repo_id
        api.upload_file(path_or_fileobj=os.urandom(BIG), path_in_repo="w.bin", repo_id=repo_id)
        with pytest.raises(HfHubHTTPError):
            HfApi(token=local_hub.token + "x").whoami()
    server_records = [r for r in caplog.records if r.name.startswith("hubmerge.localhub")]
    assert server_records  # requests were logged...
    assert all(local_hub.token not in r.getMessage() for r in caplog.records)  # ...without the token
    assert all("sig=" not in r.getMessage() for r in server_records)
