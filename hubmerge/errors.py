"""One exception hierarchy for hubmerge.

Every exception subclasses :class:`HubmergeError` and, where it refines one, the
built-in it refines (``ValueError``, ``FileNotFoundError``, ...), in the manner of
``huggingface_hub.errors``. Messages name the file, field or tensor at fault and
never contain a token.
"""

from __future__ import annotations


class HubmergeError(Exception):
    """Base class of every error hubmerge raises on purpose."""


class RecipeError(HubmergeError, ValueError):
    """A recipe is malformed or invalid.

    Args:
        message: What is wrong.
        field: Dotted field path at fault (``experts[2].repo``), if known.
        file: The recipe file, if the recipe came from one.
    """

    def __init__(self, message: str, *, field: str | None = None, file: str | None = None):
        self.field = field
        self.file = file
        self.reason = message
        where = ": ".join(part for part in (file, field) if part)
        super().__init__(f"{where}: {message}" if where else message)


class PluginError(HubmergeError, RuntimeError):
    """A plugin could not be loaded or registered something invalid."""


class UnknownMethodError(HubmergeError, KeyError):
    """A recipe names a merge method that no loaded plugin provides."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class MethodInputError(HubmergeError, ValueError):
    """The inputs do not suit the method (wrong number of experts, dtype...)."""


class ModelReferenceError(HubmergeError, FileNotFoundError):
    """A model reference (local directory or Hub repo) cannot be resolved."""


class CheckpointError(HubmergeError, ValueError):
    """A checkpoint file is corrupt, truncated, or not in a safe format."""


class UnsafeCheckpointError(CheckpointError):
    """A checkpoint is only available as pickle (``.bin``/``.pt``); never unpickled."""


class IncompatibleModelError(HubmergeError, ValueError):
    """An expert's tensors do not match the base (names, shapes or dtypes)."""


class AdapterError(HubmergeError, ValueError):
    """A PEFT adapter is unsupported, incomplete or does not fit its base."""


class OutputExistsError(HubmergeError, FileExistsError):
    """The output path exists and was not written by hubmerge (use ``--overwrite``)."""


class HubError(HubmergeError, OSError):
    """Talking to the Hub failed (unknown repo/revision, auth, network)."""


class LocalHubError(HubmergeError):
    """The loopback Hub server (``hubmerge.localhub``) refused a request or cannot run.

    Args:
        message: What went wrong (never contains a token).
        status: HTTP status the server answers with.
        code: Hub error code sent as ``X-Error-Code`` (``RepoNotFound``...), if any.
    """

    status: int = 500
    code: str | None = None

    def __init__(self, message: str, *, status: int | None = None, code: str | None = None):
        super().__init__(message)
        if status is not None:
            self.status = status
        if code is not None:
            self.code = code


class LocalHubConfigError(LocalHubError, ValueError):
    """The server cannot start as configured (public host, data dir in use, bad token file)."""


class LocalHubRequestError(LocalHubError, ValueError):
    """A request is malformed: bad repo id or path, truncated commit, unknown LFS object (HTTP 400)."""

    status = 400


class LocalHubAuthError(LocalHubError, PermissionError):
    """A request lacks the server token or carries a wrong one (HTTP 401/403)."""

    status = 401


class LocalHubNotFoundError(LocalHubError, LookupError):
    """A repo, revision or file does not exist or is not visible (HTTP 404)."""

    status = 404


class LocalHubConflictError(LocalHubError, RuntimeError):
    """A write conflicts with the repo's state: repo/branch exists (409) or parent moved (412)."""

    status = 409


class MethodParamError(MethodInputError):
    """A method parameter does not suit the inputs (``weights`` of the wrong length...).

    Args:
        message: What is wrong.
        field: The parameter at fault (``weights``), for ``params.<field>`` error paths.
    """

    def __init__(self, message: str, *, field: str):
        self.field = field
        super().__init__(f"{field}: {message}")


class MethodStateError(HubmergeError, RuntimeError):
    """A method was used out of order (merging before its pre-passes finished...)."""


class AdapterMismatchError(AdapterError, IncompatibleModelError):
    """A PEFT adapter does not fit the base: a module it targets is absent, or shapes differ."""


class DeploymentError(HubmergeError, ValueError):
    """A per-task deployment is malformed, lacks the task asked for, or does not fit the model class."""


class OutputWriteError(HubmergeError, OSError):
    """Writing the output failed (disk full, file too large, I/O error); nothing half-written is left.

    Args:
        message: What failed, naming the output directory.
        errno: The ``errno`` of the underlying ``OSError``, if any.
    """

    def __init__(self, message: str, *, errno: int | None = None):
        super().__init__(message)
        self.errno = errno


class SuiteError(HubmergeError, RuntimeError):
    """The demo/benchmark suite cannot be built or opened (missing data package, corrupt manifest...)."""


class UnknownTaskError(HubmergeError, KeyError):
    """A suite task or expert name is unknown."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class DataError(HubmergeError, ValueError):
    """A recipe's ``data:`` cannot be read: no matching file, an unreadable or inconsistent file, no tokenizer."""
