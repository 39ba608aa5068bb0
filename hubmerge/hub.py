"""Pull from and push to the Hub through ``huggingface_hub``.

Honours ``HF_ENDPOINT`` (the loopback Hub in the demo and tests), ``HF_TOKEN`` or the
stored login, and offline mode. Tokens are passed through, never logged or put in
messages.
"""

from __future__ import annotations

import logging
import random
import re
import sys
import time
from pathlib import Path

from .errors import HubError, ModelReferenceError, UnsafeCheckpointError

logger = logging.getLogger(__name__)

#: Files a merge needs from a model or adapter repo: weights, configs, tokenizer, heads.
ALLOW_PATTERNS = [
    "*.safetensors", "*.safetensors.index.json", "*.json", "*.txt", "*.model",
    "tokenizer*", "*.tiktoken", "*.md", "*.yaml", "*.py",
]
PICKLE_PATTERNS = re.compile(r"\.(bin|pt|pth|ckpt|pkl)$")
COMMIT_HASH = re.compile(r"^[0-9a-f]{40}$")
#: A push is tried this many times in all when the Hub answers 429/5xx or the connection
#: drops; the waits between tries grow exponentially (with jitter) up to the cap.
PUSH_ATTEMPTS = 4
PUSH_BACKOFF_SECONDS = 1.0
PUSH_BACKOFF_MAX_SECONDS = 8.0
RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})
_sleep = time.sleep  # replaced in tests


def _transport_errors() -> tuple[type[BaseException], ...]:
    """Connection-level failures of the HTTP clients huggingface_hub may use (only those loaded)."""
    errors: list[type[BaseException]] = [ConnectionError, TimeoutError]
    for module, names in (("httpx2", ("TransportError",)), ("httpx", ("TransportError",)),
                          ("requests", ("ConnectionError", "Timeout"))):
        loaded = sys.modules.get(module)
        errors += [getattr(loaded, name) for name in names if loaded is not None and hasattr(loaded, name)]
    return tuple(errors)


def _hub_error(exc: Exception, repo_id: str, revision: str | None) -> HubError:
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    where = repo_id + (f"@{revision}" if revision else "")
    if isinstance(exc, RevisionNotFoundError):
        return HubError(f"{where}: revision {revision!r} not found")
    if isinstance(exc, GatedRepoError):
        return HubError(f"{where}: gated repo; accept its terms and log in")
    if isinstance(exc, RepositoryNotFoundError):
        return HubError(f"{where}: repo not found (or private and no valid token was given)")
    if isinstance(exc, LocalEntryNotFoundError):
        return HubError(f"{where}: not in the local cache and the Hub cannot be reached (offline?)")
    if isinstance(exc, HfHubHTTPError):
        status = exc.response.status_code if exc.response is not None else "?"
        return HubError(f"{where}: Hub answered HTTP {status}")
    return HubError(f"{where}: {type(exc).__name__}: {exc}")


def download_model(repo_id: str, *, revision: str | None = None, token: str | None = None) -> tuple[Path, str]:
    """Download (or reuse from the HF cache) the files of a model or adapter repo.

    Args:
        repo_id: Hub repo id.
        revision: Branch, tag or commit (default ``main``).
        token: Token for private repos; ``None`` uses ``HF_TOKEN`` or the stored login.

    Returns:
        ``(directory, commit_hash)``: the snapshot directory and the commit it is pinned to.

    Raises:
        HubError: Unknown repo or revision, no access, network failure after retries.
        UnsafeCheckpointError: If the repo only has pickle weights.
    """
    from huggingface_hub import HfApi, snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        directory = Path(
            snapshot_download(repo_id, revision=revision, token=token, allow_patterns=ALLOW_PATTERNS)
        )
    except (HfHubHTTPError, LocalEntryNotFoundError, OSError, ValueError) as exc:
        raise _hub_error(exc, repo_id, revision) from None
    commit = directory.name
    if not COMMIT_HASH.match(commit):  # pragma: no cover - layouts other than the HF cache
        commit = HfApi().model_info(repo_id, revision=revision, token=token).sha
    has_weights = any(directory.glob("*.safetensors")) or any(directory.glob("*.safetensors.index.json"))
    if not has_weights:
        try:
            files = HfApi().list_repo_files(repo_id, revision=commit, token=token)
        except (HfHubHTTPError, OSError):
            files = []
        pickles = [f for f in files if PICKLE_PATTERNS.search(f)]
        if pickles:
            raise UnsafeCheckpointError(
                f"{repo_id}@{commit[:12]}: only pickle weights ({', '.join(pickles[:3])}); hubmerge never "
                "unpickles. Ask the author for safetensors (e.g. the Hub's convert-to-safetensors Space)"
            )
        raise ModelReferenceError(f"{repo_id}@{commit[:12]}: the repo has no safetensors weights")
    logger.info("resolved %s@%s -> %s", repo_id, revision or "main", commit[:12])
    return directory, commit


def download_dataset(repo_id: str, *, revision: str | None = None, token: str | None = None,
                     allow_patterns: list[str] | None = None) -> tuple[Path, str]:
    """Download (or reuse from the HF cache) files of a *dataset* repo (a recipe's ``data:``).

    Args:
        repo_id: Hub dataset repo id.
        revision: Branch, tag or commit (default ``main``).
        token: Token for private repos; ``None`` uses ``HF_TOKEN`` or the stored login.
        allow_patterns: Globs of the files wanted (default: every file).

    Returns:
        ``(directory, commit_hash)``: the snapshot directory and the commit it is pinned to.

    Raises:
        HubError: Unknown repo or revision, no access, network failure.
    """
    from huggingface_hub import HfApi, snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        directory = Path(snapshot_download(repo_id, repo_type="dataset", revision=revision, token=token,
                                           allow_patterns=allow_patterns))
        commit = directory.name
        if not COMMIT_HASH.match(commit):  # pragma: no cover - layouts other than the HF cache
            commit = HfApi().dataset_info(repo_id, revision=revision, token=token).sha
    except (HfHubHTTPError, LocalEntryNotFoundError, OSError, ValueError, *_transport_errors()) as exc:
        raise _hub_error(exc, f"datasets/{repo_id}", revision) from None
    logger.info("resolved dataset %s@%s -> %s", repo_id, revision or "main", commit[:12])
    return directory, commit


def push_folder(folder: str | Path, repo_id: str, *, private: bool = False, token: str | None = None,
                commit_message: str = "Upload merge made with hubmerge", revision: str | None = None,
                create_pr: bool = False, parent_commit: str | None = None, endpoint: str | None = None) -> str:
    """Create ``repo_id`` if needed and upload ``folder`` (weights, configs, card) in ONE commit.

    The Hub applies a commit all-or-nothing, so a failure leaves the repo unchanged. Transient
    failures (HTTP 429/5xx, a dropped connection) are retried up to :data:`PUSH_ATTEMPTS` times
    in all, waiting :data:`PUSH_BACKOFF_SECONDS` doubled each time (capped, with jitter). A retry
    is safe even when a lost answer hid a commit that did land: the files are then unchanged,
    and huggingface_hub skips the empty commit.

    Args:
        folder: A finished output directory.
        repo_id: Target repo.
        private: Create the repo private (an existing repo keeps its visibility).
        token: Write token; ``None`` uses ``HF_TOKEN`` or the stored login. Never logged.
        commit_message: The commit's title.
        revision: Branch to commit to (created when missing); default ``main``.
        create_pr: Open a pull request instead of committing directly.
        parent_commit: Commit only if the branch head is still this commit (optimistic
            concurrency: a concurrent push makes this one fail instead of landing on top).
        endpoint: Hub URL (default: ``HF_ENDPOINT`` or huggingface.co).

    Returns:
        The new commit's hash.

    Raises:
        HubError: No rights, bad token or repo id, the branch moved (``parent_commit``), or the
            Hub still failing after the retries.
    """
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    _lfs_only_for_loopback(endpoint)
    api = HfApi(token=token, endpoint=endpoint)
    transient = _transport_errors()
    attempt = 0
    while True:
        attempt += 1
        try:
            api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
            if revision and revision != "main":
                api.create_branch(repo_id, branch=revision, exist_ok=True)
            info = api.upload_folder(repo_id=repo_id, folder_path=str(folder), commit_message=commit_message,
                                     revision=revision, create_pr=create_pr, parent_commit=parent_commit,
                                     ignore_patterns=[".git*", ".hubmerge-partial-*"])
            break
        except HfHubHTTPError as exc:
            status = exc.response.status_code if exc.response is not None else None
            if status in (401, 403):
                raise HubError(f"{repo_id}: no write access (HTTP {status}); check your token's rights") from None
            if status in (409, 412) and parent_commit:
                raise HubError(
                    f"{repo_id}: the branch moved since {parent_commit[:12]} (another commit landed first); "
                    "nothing was pushed. Look at the new head and push again"
                ) from None
            if status not in RETRY_STATUSES:
                raise _hub_error(exc, repo_id, revision) from None
            reason = f"HTTP {status}"
        except transient as exc:
            reason = f"{type(exc).__name__}, the connection failed"
        except ValueError as exc:  # HFValidationError: a malformed repo id or revision
            raise HubError(f"{repo_id}: {exc}") from None
        except OSError as exc:
            raise HubError(f"{repo_id}: push failed ({type(exc).__name__}); the repo is unchanged") from None
        if attempt >= PUSH_ATTEMPTS:
            raise HubError(
                f"{repo_id}: push failed {attempt} times (last: {reason}); giving up. The Hub applies a commit "
                "all-or-nothing: the repo holds its previous state (or this whole upload, if only an answer was "
                "lost). Try again later"
            )
        delay = min(PUSH_BACKOFF_MAX_SECONDS, PUSH_BACKOFF_SECONDS * 2 ** (attempt - 1)) * random.uniform(0.5, 1)
        logger.warning("push to %s failed (%s); retrying in %.1fs (attempt %d of %d)", repo_id, reason, delay,
                       attempt + 1, PUSH_ATTEMPTS)
        _sleep(delay)
    logger.info("pushed %s to %s@%s", folder, repo_id, info.oid[:12])
    return info.oid


# -- small files and listings, for the recipe registry (hubmerge_recipe.yaml, mergekit_config.yml) --------

def repo_files(repo_id: str, *, revision: str | None = None,
               token: str | None = None) -> tuple[str, list[str]]:
    """The commit a revision of a model repo points to, and the repo's files at that commit.

    Args:
        repo_id: Hub repo id.
        revision: Branch, tag or commit (default ``main``).
        token: Token for private repos (``None``: ``HF_TOKEN`` or the stored login).

    Returns:
        ``(commit_hash, file_names)``.

    Raises:
        HubError: Unknown repo or revision, no access, network failure.
    """
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    try:
        info = HfApi().model_info(repo_id, revision=revision, token=token)
    except (HfHubHTTPError, OSError, ValueError, *_transport_errors()) as exc:
        raise _hub_error(exc, repo_id, revision) from None
    return info.sha, [s.rfilename for s in info.siblings or []]


def download_file(repo_id: str, filename: str, *, revision: str | None = None,
                  token: str | None = None) -> Path:
    """Download (or reuse from the HF cache) one file of a model repo.

    Args:
        repo_id: Hub repo id.
        filename: Path of the file in the repo.
        revision: Branch, tag or commit; pass a commit hash to pin it.
        token: Token for private repos.

    Returns:
        The local path of the file.

    Raises:
        HubError: Unknown repo, revision or file, no access, network failure.
    """
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError, LocalEntryNotFoundError

    try:
        return Path(hf_hub_download(repo_id, filename, revision=revision, token=token))
    except EntryNotFoundError:
        where = repo_id + (f"@{revision}" if revision else "")
        raise HubError(f"{where}: no file {filename!r} in the repo") from None
    except (HfHubHTTPError, LocalEntryNotFoundError, OSError, ValueError, *_transport_errors()) as exc:
        raise _hub_error(exc, repo_id, revision) from None


def search_models(*, tags: list[str], search: str | None = None, limit: int | None = 50,
                  token: str | None = None) -> list:
    """Model repos carrying every tag in ``tags`` (and ``search`` in their id), with card data.

    Args:
        tags: Tags that must all be present (the Hub's ``filter``).
        search: Text the repo id must contain (the Hub's ``search``), or ``None``.
        limit: Most results to return.
        token: Token (private repos of its owner are listed too).

    Returns:
        ``huggingface_hub.ModelInfo`` objects (``card_data``, ``tags``...).

    Raises:
        HubError: If the Hub cannot be reached or refuses the listing.
    """
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    try:
        return list(HfApi().list_models(filter=tags, search=search or None, cardData=True, limit=limit,
                                        token=token))
    except (HfHubHTTPError, OSError, ValueError, *_transport_errors()) as exc:
        raise HubError(f"listing models tagged {', '.join(tags)}: {type(exc).__name__}") from None


def _lfs_only_for_loopback(endpoint: str | None = None) -> None:
    """The loopback Hub speaks LFS, not Xet: make the client use LFS when it is the endpoint."""
    from urllib.parse import urlparse

    from huggingface_hub import constants

    host = urlparse(endpoint or constants.ENDPOINT).hostname or ""
    if host in ("localhost", "::1") or host.startswith("127."):
        constants.HF_HUB_DISABLE_XET = True
