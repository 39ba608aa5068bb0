"""A Hub-compatible server on loopback, for offline tests, demos and private work.

``huggingface_hub``, ``transformers`` and ``peft`` talk to it unchanged through
``HF_ENDPOINT`` (set before they are imported) or ``endpoint=``: repo creation, commits
with regular and LFS files, downloads, listings, model cards. Run it with :func:`serve`
(``hubmerge hub serve``) or, in tests, with :func:`hubmerge.localhub.testing.run_local_hub`.
"""

from .app import create_app
from .server import LocalHubServer, is_loopback_host, serve
from .storage import RepoStore

__all__ = ["LocalHubServer", "RepoStore", "create_app", "is_loopback_host", "serve"]
