"""Unit tests of the local Hub's building blocks: validation, wildmatch, store, server config."""

from __future__ import annotations

import hashlib
import threading

import pytest

from hubmerge.errors import (
    LocalHubAuthError,
    LocalHubConfigError,
    LocalHubConflictError,
    LocalHubNotFoundError,
    LocalHubRequestError,
)
from hubmerge.localhub.auth import TokenAuth, load_or_create_token
from hubmerge.localhub.gitmatch import DEFAULT_GITATTRIBUTES, GitAttributes, GitIgnore
from hubmerge.localhub.paths import validate_path_in_repo, validate_ref_name, validate_repo_id
from hubmerge.localhub.server import LocalHubServer, check_host, is_loopback_host
from hubmerge.localhub.storage import AddFile, DeleteFile, RepoRef, RepoStore


@pytest.mark.parametrize(
    "path", ["a.txt", "dir/sub/file.bin", "weird name (1).txt", "ünïcode/ok.md", ".gitattributes"]
)
def test_valid_paths(path):
    assert validate_path_in_repo(path) == path


@pytest.mark.parametrize(
    "path",
    ["", "/abs", "../x", "a/../b", "a/./b", "a//b", "a\\b", "a\x00b", "a\nb", ".git/config", "x/" * 600],
)
def test_invalid_paths(path):
    with pytest.raises(LocalHubRequestError):
        validate_path_in_repo(path)


@pytest.mark.parametrize("repo_id", ["a/b", "user/model-v1.0", "Org_1/x_y"])
def test_valid_repo_ids(repo_id):
    assert "/".join(validate_repo_id(repo_id)) == repo_id


@pytest.mark.parametrize(
    "repo_id", ["x", "a/b/c", "../x", "a/..", "a/-x", "a/x.", "a/x--y", "a/x.git", "a/" + "x" * 97]
)
def test_invalid_repo_ids(repo_id):
    with pytest.raises(LocalHubRequestError):
        validate_repo_id(repo_id)


@pytest.mark.parametrize("name", ["", "a..b", "-x", "x.lock", "a" * 40, "refs/heads/x", "a//b", "a b"])
def test_invalid_ref_names(name):
    with pytest.raises(LocalHubRequestError):
        validate_ref_name(name)


def test_gitattributes_lfs_rules():
    attrs = GitAttributes(DEFAULT_GITATTRIBUTES + "docs/*.bin -filter\n")
    assert attrs.is_lfs("model.safetensors") and attrs.is_lfs("deep/dir/w.bin")
    assert attrs.is_lfs("saved_model/variables/x") and attrs.is_lfs("run/events.out.tfevents.1")
    assert not attrs.is_lfs("config.json") and not attrs.is_lfs("docs/a.bin")


def test_gitignore_rules():
    ignore = GitIgnore("# comment\n*.log\n!keep.log\nbuild/\n/root-only.txt\ndata/**/tmp\n")
    assert ignore.is_ignored("x.log") and ignore.is_ignored("a/b/c.log")
    assert not ignore.is_ignored("keep.log")
    assert ignore.is_ignored("build/out.bin") and ignore.is_ignored("src/build/x")
    assert not ignore.is_ignored("build")  # a file named build: the rule is for directories
    assert ignore.is_ignored("root-only.txt") and not ignore.is_ignored("sub/root-only.txt")
    assert ignore.is_ignored("data/tmp") and ignore.is_ignored("data/a/b/tmp")


def test_store_commit_is_atomic_and_serialised(tmp_path):
    ref = RepoRef("model", "ns", "repo")
    with RepoStore(tmp_path / "data") as store:
        store.create_repo(ref, private=False, author="me")
        with pytest.raises(LocalHubConflictError):
            store.create_repo(ref, private=False, author="me")
        meta = store.get_repo(ref)
        head = store.resolve(meta, "main")
        sha, size = store.put_blob(b"hello")
        add = AddFile("a.txt", sha, size, lfs=False)
        with pytest.raises(LocalHubNotFoundError) as err:  # the delete fails after the add: nothing applied
            store.commit(
                ref,
                branch="main",
                operations=[add, DeleteFile("missing")],
                title="t",
                message="",
                author="me",
            )
        assert err.value.code == "EntryNotFound"
        assert store.resolve(meta, "main").id == head.id

        def worker(i: int) -> None:
            sha_i, size_i = store.put_blob(str(i).encode())
            op = AddFile(f"f{i}", sha_i, size_i, lfs=False)
            store.commit(ref, branch="main", operations=[op], title=f"c{i}", message="", author="me")

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(16)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        final = store.resolve(meta, "main")
        assert {f"f{i}" for i in range(16)} <= set(final.tree)
        assert len(list(store.history(meta, final))) == 17
        assert store.resolve(meta, head.id).tree.keys() == {".gitattributes"}
        with pytest.raises(LocalHubConflictError) as conflict:
            store.commit(
                ref, branch="main", operations=[], title="t", message="", author="me", parent_commit=head.id
            )
        assert conflict.value.status == 412
        with pytest.raises(LocalHubRequestError):  # a file cannot also be a folder
            store.commit(
                ref,
                branch="main",
                operations=[AddFile("f1/x", sha, size, lfs=False)],
                title="t",
                message="",
                author="me",
            )


def test_blob_upload_verifies_hash_and_size(tmp_path):
    with RepoStore(tmp_path / "data") as store:
        data = b"x" * 1000
        oid = hashlib.sha256(data).hexdigest()
        upload = store.begin_upload(oid, 1000)
        upload.write(data[:500])
        with pytest.raises(LocalHubRequestError):
            upload.finish()  # too short
        assert not store.has_blob(oid)
        upload = store.begin_upload(oid, 1000)
        upload.write(b"y" * 1000)
        with pytest.raises(LocalHubRequestError):
            upload.finish()  # wrong content
        upload = store.begin_upload(oid, 1000)
        with pytest.raises(LocalHubRequestError):
            upload.write(data + b"!")  # more than announced
        upload.abort()
        upload = store.begin_upload(oid, 1000)
        upload.write(data)
        upload.finish()
        assert store.has_blob(oid, 1000)
        assert list((tmp_path / "data" / "tmp").iterdir()) == []


def test_token_auth(tmp_path):
    token = load_or_create_token(tmp_path)
    assert token.startswith("hf_") and load_or_create_token(tmp_path) == token
    auth = TokenAuth(token)
    assert auth.check_header(f"Bearer {token}") is True
    assert auth.check_header(None) is False
    with pytest.raises(LocalHubAuthError):
        auth.check_header("Bearer hf_wrong")
    signed = auth.sign_upload("model/a/b", "0" * 64, 10)
    assert auth.verify_upload("model/a/b", "0" * 64, signed["size"], signed["expires"], signed["sig"]) == 10
    with pytest.raises(LocalHubAuthError):
        auth.verify_upload("model/a/c", "0" * 64, signed["size"], signed["expires"], signed["sig"])
    with pytest.raises(LocalHubAuthError):
        auth.verify_upload("model/a/b", "0" * 64, "11", signed["expires"], signed["sig"])
    expired = auth.sign_upload("model/a/b", "0" * 64, 10, now=0)
    with pytest.raises(LocalHubAuthError, match="expired"):
        auth.verify_upload("model/a/b", "0" * 64, expired["size"], expired["expires"], expired["sig"])


def test_public_hosts_refused(tmp_path):
    assert is_loopback_host("127.0.0.1") and is_loopback_host("::1") and is_loopback_host("localhost")
    assert not is_loopback_host("0.0.0.0") and not is_loopback_host("192.168.1.2")
    with pytest.raises(LocalHubConfigError, match="allow_public"):
        check_host("0.0.0.0", allow_public=False)
    with pytest.raises(LocalHubConfigError):
        LocalHubServer(tmp_path / "data", host="0.0.0.0", port=0)
    assert not (tmp_path / "data").exists()  # refused before touching anything
    check_host("0.0.0.0", allow_public=True)


def test_foreign_directory_refused(tmp_path):
    (tmp_path / "tmp").mkdir()
    (tmp_path / "tmp" / "precious.txt").write_text("not ours")
    with pytest.raises(LocalHubConfigError, match="not a local Hub data directory"):
        RepoStore(tmp_path)
    assert (tmp_path / "tmp" / "precious.txt").read_text() == "not ours"
