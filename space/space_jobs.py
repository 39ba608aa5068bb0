"""The Space's jobs: validate, merge and push, as calls into the hubmerge library (no Gradio here).

- :func:`validate` checks a form the way ``hubmerge validate --schema-only`` does (schema, method,
  parameters, FlexMerge sizes) and then asks the Hub whether every input repo and revision exists,
  so that a typo is reported on its field before anything is downloaded.
- :func:`run_merge` runs the merge on this machine's device with the engine's progress callback,
  keeps the result for :func:`push` and reports the output's size and model card.
- :func:`push` publishes a kept result in one commit (``hubmerge.publish.publish_merge``); if the push
  fails and the repo did not exist before, the repo is deleted again: nothing half-pushed stays.
- :class:`JobGate` lets the UI say "busy" while another visitor's merge runs (Gradio's queue runs one
  at a time).

Tokens are passed as ``token=`` to the library, never read from or written to the environment,
never logged, and scrubbed from every message shown. Unless the app is started with
``use_stored_token=True`` (``hubmerge space --use-stored-token``, on your own machine), an empty
token field means *anonymous*: a public Space never lends its owner's ``HF_TOKEN`` to visitors.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from importlib.util import find_spec
from pathlib import Path
from typing import Any

import yaml
from space_form import BuiltRecipe, FieldError, FormValues, MethodInfo, build_recipe, explain

logger = logging.getLogger("hubmerge.space")

#: How many finished merges are kept on disk for pushing (oldest removed first).
KEEP_RESULTS = 4
TOKEN_URL = "https://huggingface.co/settings/tokens"


class SpaceError(Exception):
    """A job failed; the message is one line meant for the person at the form."""


def flexmerge_available() -> bool:
    """Whether this hubmerge has FlexMerge (``hubmerge.flexmerge``)."""
    try:
        return find_spec("hubmerge.flexmerge") is not None
    except (ImportError, ValueError):
        return False


def hub_endpoint() -> str:
    """The Hub this process talks to (``HF_ENDPOINT``, read by ``huggingface_hub`` at import)."""
    from huggingface_hub import constants

    return constants.ENDPOINT.rstrip("/")


def scrub(message: str, token: str | None) -> str:
    """``message`` with the token (and anything that looks like an HF token) masked."""
    import re

    if token:
        message = message.replace(token, "***")
    return re.sub(r"\bhf_[A-Za-z0-9]{8,}\b", "hf_***", message)


def one_line(exc: BaseException, token: str | None = None) -> str:
    """An exception as one line for the form: hubmerge's own message, else ``Type: message``."""
    from hubmerge.errors import HubmergeError

    text = str(exc) if isinstance(exc, (HubmergeError, SpaceError)) else f"{type(exc).__name__}: {exc}"
    text = " ".join(text.split()) or type(exc).__name__
    return scrub(text, token)


@dataclass
class Settings:
    """How the app treats tokens and where it writes.

    Attributes:
        workdir: Where merges are written (a temporary directory by default).
        use_stored_token: Let an empty token field fall back to ``HF_TOKEN`` / the stored login
            (only for a Space run on your own machine).
    """

    workdir: Path = field(
        default_factory=lambda: Path(
            os.environ.get("HUBMERGE_SPACE_WORKDIR") or tempfile.mkdtemp(prefix="hubmerge-space-")
        )
    )
    use_stored_token: bool = False

    def token(self, typed: str | None) -> str | bool | None:
        """The ``token=`` to pass to the library for what the visitor typed."""
        typed = (typed or "").strip()
        if typed:
            return typed
        return None if self.use_stored_token else False


# -- busy gate ----------------------------------------------------------------------------------------------
class JobGate:
    """Counts running jobs so that the UI can tell a visitor that someone else's merge is running."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._running: dict[str, tuple[str, float]] = {}

    @contextmanager
    def hold(self, kind: str) -> Iterator[None]:
        """Mark a job as running for the duration of the block."""
        key = uuid.uuid4().hex
        with self._lock:
            self._running[key] = (kind, time.monotonic())
        try:
            yield
        finally:
            with self._lock:
                self._running.pop(key, None)

    def busy_message(self) -> str | None:
        """``None`` when idle, else a sentence saying what runs and since when."""
        with self._lock:
            if not self._running:
                return None
            kind, since = min(self._running.values(), key=lambda item: item[1])
        seconds = int(time.monotonic() - since)
        return (
            f"**Busy:** another {kind} is running (for {seconds} s so far). This Space runs one job at a "
            "time; yours is queued and starts by itself when that one finishes — keep this page open."
        )


GATE = JobGate()


# -- validate ------------------------------------------------------------------------------------------------
@dataclass
class Validation:
    """The outcome of :func:`validate`.

    Attributes:
        yaml: The recipe as YAML (also when there are errors: what the form describes).
        recipe: The validated :class:`~hubmerge.recipe.Recipe`, or ``None``.
        errors: Problems, each naming its form field.
        notes: Things worth knowing that are not errors.
    """

    yaml: str
    recipe: Any = None
    errors: list[FieldError] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.errors and self.recipe is not None


def validate(
    form: FormValues, method: MethodInfo | None, *, token: str | bool | None = False, check_hub: bool = True
) -> Validation:
    """Check the form: schema, method, parameters, FlexMerge sizes, then the inputs on the Hub.

    Args:
        form: The form's values.
        method: The chosen method's info (``None``: not installed).
        token: ``token=`` for the Hub checks.
        check_hub: Ask the Hub whether each input exists (skipped when the form is invalid).

    Returns:
        A :class:`Validation`.
    """
    from hubmerge.errors import RecipeError
    from hubmerge.recipe import check_recipe, recipe_from_dict, recipe_to_yaml

    if method is None:
        built = build_recipe(form, ())
        return Validation(
            _yaml(built.data),
            errors=[
                FieldError(
                    "method",
                    f"Merge method: “{form.method}” is not installed here; pick one from the list.",
                    "method",
                )
            ],
        )
    built = build_recipe(form, method.params)
    specs = {s.name: s for s in method.params}
    if built.errors:
        return Validation(_yaml(built.data), errors=built.errors)
    try:
        recipe = recipe_from_dict(built.data)
        check_recipe(recipe)
        if recipe.flexmerge is not None:
            _check_flexmerge(recipe)
    except RecipeError as exc:
        return Validation(_yaml(built.data), errors=[explain(exc, specs, built.expert_lines)])
    result = Validation(recipe_to_yaml(recipe), recipe=recipe)
    if method.output != "model" and recipe.flexmerge is None:
        result.errors.append(
            FieldError(
                "method",
                f"Merge method: {method.name} writes per-task deployments, "
                "which this Space cannot run yet; use the hubmerge command line.",
                "method",
            )
        )
    if check_hub and result.ok:
        result.errors.extend(check_hub_inputs(recipe, token=token, built=built, specs=specs))
    return result


def _yaml(data: dict[str, Any]) -> str:
    return yaml.safe_dump(data, sort_keys=False, allow_unicode=True)


def _check_flexmerge(recipe) -> None:
    import torch

    from hubmerge.errors import RecipeError

    if not flexmerge_available():
        raise RecipeError("FlexMerge is not installed in this Space", field="flexmerge.sizes")
    from hubmerge import flexmerge

    flexmerge.parse_sizes(recipe.flexmerge.sizes, len(recipe.experts))
    flexmerge.resolve_inner(recipe.flexmerge, len(recipe.experts), getattr(torch, recipe.dtype))


def check_hub_inputs(
    recipe, *, token: str | bool | None, built: BuiltRecipe | None = None, specs: dict | None = None
) -> list[FieldError]:
    """Ask the Hub whether the base and every expert (at its revision) exist and can be read.

    Args:
        recipe: A validated recipe.
        token: ``token=`` for private repos.
        built: The form's recipe (for line numbers in messages).
        specs: Widget specs by name.

    Returns:
        One :class:`FieldError` per input that cannot be read (none: all fine).
    """
    from huggingface_hub import HfApi
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    api = HfApi()
    errors: list[FieldError] = []
    refs = [("base", recipe.base)] + [(f"experts[{i}]", ref) for i, ref in enumerate(recipe.experts)]
    lines = built.expert_lines if built else None
    for path, ref in refs:
        if ref.repo is None:
            errors.append(explain(_Problem(path, "the Space reads models from the Hub only"), specs, lines))
            continue
        try:
            api.model_info(ref.repo, revision=ref.revision, token=token)
        except GatedRepoError:
            reason = f"{ref.repo} is gated: accept its terms on the Hub, then enter a token of that account"
            errors.append(explain(_Problem(f"{path}.repo", reason), specs, lines))
        except RepositoryNotFoundError:
            reason = (
                f"{ref.repo} was not found on the Hub (check the spelling; a private repo needs a token "
                "that can read it)"
            )
            errors.append(explain(_Problem(f"{path}.repo", reason), specs, lines))
        except RevisionNotFoundError:
            reason = f"{ref.repo} has no revision “{ref.revision}” (a branch, tag or commit)"
            errors.append(explain(_Problem(f"{path}.revision", reason), specs, lines))
        except (HfHubHTTPError, OSError) as exc:
            status = getattr(getattr(exc, "response", None), "status_code", None)
            why = f"HTTP {status}" if status else type(exc).__name__
            reason = f"could not check {ref.repo} on the Hub ({why})"
            errors.append(explain(_Problem(f"{path}.repo", reason), specs, lines))
    return errors


@dataclass
class _Problem:
    field: str
    reason: str

    def __str__(self) -> str:
        return self.reason


# -- merge --------------------------------------------------------------------------------------------------
STAGES = {
    "merge": "Merging tensors",
    "similarity": "FlexMerge: measuring block similarities",
    "write": "FlexMerge: writing the deployments",
}


def stage_label(stage: str) -> str:
    """The engine's stage name in words (``prepass 1/2`` -> ``Pre-pass 1/2 (global statistics)``)."""
    if stage in STAGES:
        return STAGES[stage]
    if "prepass" in stage:
        return (
            stage.replace("inner prepass", "Inner pre-pass").replace("prepass", "Pre-pass")
            + " (global statistics)"
        )
    return stage


def human_bytes(count: float) -> str:
    """``1536`` -> ``1.5 KB`` (decimal units, as the Hub shows sizes)."""
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(count) < 1000 or unit == "TB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1000
    return f"{count:.1f} TB"  # pragma: no cover


@dataclass
class Kept:
    """A finished merge kept for pushing."""

    job_id: str
    kind: str  # "model" | "flexmerge"
    result: Any  # MergeResult | FlexMergeResult
    directory: Path
    created: float = field(default_factory=time.time)


class ResultStore:
    """The last few finished merges, by job id; older ones are deleted from disk."""

    def __init__(self, keep: int = KEEP_RESULTS):
        self.keep = keep
        self._items: OrderedDict[str, Kept] = OrderedDict()
        self._lock = threading.Lock()

    def add(self, item: Kept) -> None:
        with self._lock:
            self._items[item.job_id] = item
            while len(self._items) > self.keep:
                _, old = self._items.popitem(last=False)
                shutil.rmtree(old.directory.parent, ignore_errors=True)

    def get(self, job_id: str | None) -> Kept | None:
        with self._lock:
            return self._items.get(job_id or "")


RESULTS = ResultStore()


@dataclass
class MergeOutcome:
    """What :func:`run_merge` shows."""

    job_id: str
    kind: str
    directory: Path
    card: str
    size_bytes: int
    files: list[tuple[str, int]]
    summary: str


def output_files(directory: Path) -> list[tuple[str, int]]:
    """Relative path and size of every file in an output directory."""
    return sorted(
        (p.relative_to(directory).as_posix(), p.stat().st_size) for p in directory.rglob("*") if p.is_file()
    )


def run_merge(
    recipe, *, settings: Settings, token: str | None, progress: Callable[[Any], None] | None = None
) -> MergeOutcome:
    """Run a validated recipe here and keep the result for :func:`push`.

    Args:
        recipe: A recipe that passed :func:`validate`.
        settings: Work directory and token policy.
        token: What the visitor typed in the token field.
        progress: Receives the engine's :class:`~hubmerge.engine.Progress` events.

    Returns:
        A :class:`MergeOutcome` with the card and the output's size.

    Raises:
        SpaceError: With a one-line message (no traceback) when the merge fails; nothing is kept.
    """
    recipe = _with_namespace(recipe, settings.token(token))
    job_id = uuid.uuid4().hex[:12]
    job_dir = settings.workdir / job_id
    target = job_dir / recipe.name
    started = time.perf_counter()
    try:
        from hubmerge.engine import merge

        job_dir.mkdir(parents=True, exist_ok=False)
        if recipe.flexmerge is not None:
            from hubmerge.flexmerge import run_flexmerge

            result = run_flexmerge(recipe, output=target, token=settings.token(token), progress=progress)
            kind = "flexmerge"
            card = flexmerge_card(result, repo_id=recipe.output.repo)
            (result.output_dir / "README.md").write_text(card, encoding="utf-8")
        else:
            result = merge(recipe, output=target, token=settings.token(token), progress=progress)
            kind = "model"
    except Exception as exc:
        shutil.rmtree(job_dir, ignore_errors=True)
        if not _is_expected(exc):
            logger.exception("merge failed")  # server log: the traceback of an unexpected failure
        raise SpaceError(one_line(exc, token) + _hint(exc)) from None
    directory = Path(result.output_dir)
    RESULTS.add(Kept(job_id, kind, result, directory))
    files = output_files(directory)
    size = sum(s for _, s in files)
    seconds = time.perf_counter() - started
    if kind == "model":
        summary = (
            f"Merged {result.tensors} tensors with **{recipe.method}** on `{result.device}` in "
            f"{seconds:.1f} s: read {human_bytes(result.bytes_read)}, wrote {human_bytes(size)} "
            f"in {len(files)} files."
        )
    else:
        sizes = ", ".join(f"size {d.size.label}: {human_bytes(d.storage_bytes)}" for d in result.deployments)
        summary = (
            f"FlexMerge wrote {len(result.deployments)} deployments ({sizes}) with **{recipe.method}** "
            f"inside each group, on `{result.device}` in {seconds:.1f} s; {human_bytes(size)} in all."
        )
    card = (directory / "README.md").read_text(encoding="utf-8")
    return MergeOutcome(job_id, kind, directory, card, size, files, summary)


def _with_namespace(recipe, token):
    """The recipe with a bare output repo name completed by the token owner's namespace (best effort).

    The card written by the merge then already shows the repo id it will be pushed to.
    """
    repo = recipe.output.repo
    if not repo or "/" in repo or not token:
        return recipe
    try:
        from huggingface_hub import HfApi

        owner = HfApi().whoami(token=token)["name"]
    except Exception:  # noqa: BLE001 - the push resolves (and reports) it again
        return recipe
    return recipe.model_copy(update={"output": recipe.output.model_copy(update={"repo": f"{owner}/{repo}"})})


def _hint(exc: BaseException) -> str:
    """A sentence on what to do about a failed merge, when the error's kind says it."""
    from hubmerge.errors import AdapterMismatchError, IncompatibleModelError

    if isinstance(exc, AdapterMismatchError):
        return " — was this adapter trained on the base model given above?"
    if isinstance(exc, IncompatibleModelError):
        return " — is this expert really a fine-tune of the base model given above?"
    return ""


def _is_expected(exc: BaseException) -> bool:
    from hubmerge.errors import HubmergeError

    return isinstance(exc, (HubmergeError, SpaceError))


# -- FlexMerge cards -----------------------------------------------------------------------------------------
def _pinned_inputs(root: Path) -> tuple[dict[str, Any], list[dict[str, Any]], str]:
    """Base and experts (pinned) from an output's ``hubmerge_recipe.yaml``, described as the card wants."""
    from huggingface_hub import try_to_load_from_cache

    text = (root / "hubmerge_recipe.yaml").read_text(encoding="utf-8")
    data = yaml.safe_load(text) or {}

    def describe(ref: dict[str, Any]) -> dict[str, Any]:
        repo, revision = ref.get("repo"), ref.get("revision")
        kind = "full"
        if repo:
            cached = try_to_load_from_cache(repo, "adapter_config.json", revision=revision)
            kind = "adapter" if isinstance(cached, str) else "full"
        label = ref.get("name") or (repo or ref.get("path", "?")).rstrip("/").rsplit("/", 1)[-1]
        return {"name": label, "repo": repo, "path": ref.get("path"), "revision": revision, "kind": kind}

    return describe(data.get("base") or {}), [describe(e) for e in data.get("experts") or []], text


def flexmerge_card(result, *, repo_id: str | None, size: Any = None) -> str:
    """A model card for a FlexMerge output (the root) or one of its deployments (``size``).

    Args:
        result: A :class:`hubmerge.flexmerge.FlexMergeResult`.
        repo_id: The repo the card will live in.
        size: A :class:`~hubmerge.flexmerge.DeploymentPlan` for a deployment's own card.

    Returns:
        The card's text (``README.md``).
    """
    from hubmerge.card import CardInputs, CardSection, build_card
    from hubmerge.plugins import registered_methods

    recipe = result.recipe
    root = Path(result.output_dir)
    base, experts, recipe_yaml = _pinned_inputs(root if size is None else root / size.size.directory)
    registered = registered_methods().get(result.inner.name)
    rows = ["| size | branch | merges | stored | model-equivalents |", "|---|---|---|---|---|"]
    for plan in result.deployments:
        rows.append(
            f"| {plan.size.label} | `{plan.size.directory}` | {plan.merges} | "
            f"{human_bytes(plan.storage_bytes)} | {plan.model_equivalents:.3f} |"
        )
    load_id = repo_id or "path/to/this/repo"
    first = size or result.deployments[0]
    usage = (
        "from hubmerge import load_task_model\n\n"
        f'model = load_task_model("{load_id}", "{result.tasks[0]}", revision="{first.size.directory}")'
        "\n# tasks: " + ", ".join(result.tasks)
    )
    body = (
        "FlexMerge keeps a different number of merged groups per block for each size; size 1 is one "
        f"merged model, size {len(result.tasks)} keeps every expert. Each deployment is on its own branch "
        "and rebuilds any task's model with `hubmerge.load_task_model`.\n\n" + "\n".join(rows)
    )
    description = recipe.description or (
        f"FlexMerge deployment of size {size.size.label} of {len(result.tasks)} models."
        if size
        else f"FlexMerge deployments of {len(result.tasks)} models, from one merged model to every expert."
    )
    inputs = CardInputs(
        name=recipe.name,
        method=type(result.inner.make(2)).describe()
        if hasattr(result.inner, "make")
        else {"name": recipe.method},
        params=dict(result.inner.params),
        plugin=f"`{registered.plugin}` from {registered.distribution}" if registered else "?",
        base=base,
        experts=experts,
        recipe_yaml=recipe_yaml,
        dtype=recipe.dtype,
        description=description,
        repo_id=repo_id,
        sections=[CardSection("FlexMerge deployments", body)],
        extra_tags=["flexmerge"],
        usage=usage,
    )
    return str(build_card(inputs))


# -- push ----------------------------------------------------------------------------------------------------
@dataclass
class PushOutcome:
    """What :func:`push` shows."""

    repo_id: str
    url: str
    commit: str
    card: str


def push(
    job_id: str | None, repo: str, *, private: bool, token: str | None, settings: Settings
) -> PushOutcome:
    """Publish a kept merge to ``repo`` (``name`` alone: the token owner's namespace).

    Args:
        job_id: The merge to publish.
        repo: ``org/name`` or ``name``.
        private: Create the repo private.
        token: The visitor's token (write access).
        settings: Token policy.

    Returns:
        A :class:`PushOutcome` with the repo's URL.

    Raises:
        SpaceError: Nothing to push, no token, bad repo name, or the push failed (a repo that did not
            exist before is deleted again).
    """
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    from hubmerge.recipe import check_repo_id

    kept = RESULTS.get(job_id)
    if kept is None:
        raise SpaceError(
            "Nothing to push yet: press Merge first (results are kept for a while, then removed)."
        )
    hub_token = settings.token(token)
    if hub_token is False:
        raise SpaceError(f"Enter a Hugging Face access token with write access to push ({TOKEN_URL}).")
    repo = (repo or "").strip().strip("/")
    if not repo:
        raise SpaceError(
            "Output repo: enter the name of the repo to create, e.g. my-merge or my-org/my-merge."
        )
    api = HfApi()
    try:
        if "/" not in repo:
            repo = f"{api.whoami(token=hub_token)['name']}/{repo}"
        check_repo_id(repo)
        existed = api.repo_exists(repo, token=hub_token)
    except ValueError as exc:
        raise SpaceError(f"Output repo: {one_line(exc, token)}.") from None
    except (HfHubHTTPError, OSError) as exc:
        status = getattr(getattr(exc, "response", None), "status_code", None)
        if status in (401, 403):
            raise SpaceError(f"The Hub refused the token (HTTP {status}); check it at {TOKEN_URL}.") from None
        raise SpaceError(f"Could not reach the Hub: {one_line(exc, token)}") from None
    try:
        if kept.kind == "model":
            from hubmerge.publish import publish_merge

            commit = publish_merge(kept.result, repo, private=private, token=hub_token)
        else:
            commit = _push_flexmerge(kept.result, repo, private=private, token=hub_token)
    except Exception as exc:
        if not existed:
            _delete_quietly(api, repo, hub_token)
        if not _is_expected(exc):
            logger.exception("push failed")
        raise SpaceError(
            one_line(exc, token) + ("" if existed else " Nothing was left on the Hub.")
        ) from None
    card = (kept.directory / "README.md").read_text(encoding="utf-8")
    return PushOutcome(repo, f"{hub_endpoint()}/{repo}", commit, card)


def _delete_quietly(api, repo: str, token) -> None:
    try:
        api.delete_repo(repo, token=token, missing_ok=True)
    except Exception:  # noqa: BLE001 - best effort; the push error is what the visitor needs to see
        logger.warning("could not delete the half-created repo %s", repo)


def _push_flexmerge(result, repo: str, *, private: bool, token) -> str:
    """Push each deployment to branch ``size-<s>`` and the summary and card to ``main``."""
    from hubmerge.hub import push_folder

    root = Path(result.output_dir)
    (root / "README.md").write_text(flexmerge_card(result, repo_id=repo), encoding="utf-8")
    with tempfile.TemporaryDirectory(prefix="hubmerge-space-main-") as staging:
        for path in root.iterdir():
            if path.is_file():
                shutil.copy2(path, Path(staging) / path.name)
        commit = push_folder(
            staging,
            repo,
            private=private,
            token=token,
            commit_message=f"hubmerge: FlexMerge of {len(result.tasks)} models",
        )
    for plan in result.deployments:
        directory = root / plan.size.directory
        (directory / "README.md").write_text(
            flexmerge_card(result, repo_id=repo, size=plan), encoding="utf-8"
        )
        push_folder(
            directory,
            repo,
            private=private,
            token=token,
            revision=plan.size.directory,
            commit_message=f"hubmerge: FlexMerge deployment {plan.size.directory}",
        )
    return commit


# -- presentation helpers ------------------------------------------------------------------------------------
def card_preview(card: str) -> str:
    """A model card as Markdown for the preview: the YAML header shown as a code block, then the body."""
    text = card.lstrip("\ufeff")
    if text.startswith("---"):
        end = text.find("\n---", 3)
        if end != -1:
            header = text[3:end].strip("\n")
            body = text[end + 4 :].lstrip("\n")
            return f"**Card metadata** (the YAML header of README.md)\n\n```yaml\n{header}\n```\n\n{body}"
    return text


def size_table(files: list[tuple[str, int]], limit: int = 12) -> str:
    """The output's files and sizes as a Markdown table (largest first)."""
    rows = sorted(files, key=lambda item: -item[1])
    lines = ["| file | size |", "|---|---|"]
    lines += [f"| `{name}` | {human_bytes(size)} |" for name, size in rows[:limit]]
    if len(rows) > limit:
        rest = rows[limit:]
        lines.append(f"| … {len(rest)} more | {human_bytes(sum(s for _, s in rest))} |")
    return "\n".join(lines)
