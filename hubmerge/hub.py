"""Pull from and push to the Hub through ``huggingface_hub``.

Honours ``HF_ENDPOINT`` (the loopback Hub in the demo and tests), ``HF_TOKEN`` or the
stored login, and offline mode. Tokens are passed through, never logged or put in
messages.
"""

from __future__ import annotations

import logging
import re
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


def push_folder(folder: str | Path, repo_id: str, *, private: bool = False, token: str | None = None,
                commit_message: str = "Upload merge made with hubmerge", revision: str | None = None,
                create_pr: bool = False) -> str:
    """Create ``repo_id`` if needed and upload ``folder`` (weights, configs, card) in ONE commit.

    The Hub applies a commit all-or-nothing, so a failure leaves the repo unchanged.

    Args:
        folder: A finished output directory.
        repo_id: Target repo.
        private: Create the repo private (an existing repo keeps its visibility).
        token: Write token; ``None`` uses ``HF_TOKEN`` or the stored login. Never logged.
        commit_message: The commit's title.
        revision: Branch to commit to (created when missing); default ``main``.
        create_pr: Open a pull request instead of committing directly.

    Returns:
        The new commit's hash.

    Raises:
        HubError: No rights, bad token, network failure after retries.
    """
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    api = HfApi(token=token)
    try:
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        if revision and revision != "main":
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        info = api.upload_folder(repo_id=repo_id, folder_path=str(folder), commit_message=commit_message,
                                 revision=revision, create_pr=create_pr,
                                 ignore_patterns=[".git*", ".hubmerge-partial-*"])
    except HfHubHTTPError as exc:
        status = exc.response.status_code if exc.response is not None else None
        if status in (401, 403):
            raise HubError(f"{repo_id}: no write access (HTTP {status}); check your token's rights") from None
        raise _hub_error(exc, repo_id, revision) from None
    except OSError as exc:
        raise HubError(f"{repo_id}: push failed ({type(exc).__name__}); the repo is unchanged") from None
    logger.info("pushed %s to %s@%s", folder, repo_id, info.oid[:12])
    return info.oid
