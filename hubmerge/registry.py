"""The recipe registry: named, versioned recipes from the package, from plugins and from the Hub.

Three sources, one kind of entry (:class:`RegisteredRecipe`: name, version, one-line summary,
methods, variables):

* **package**: every ``*.yaml``/``*.yml`` under the top-level ``recipes/`` directory, shipped as the
  package data of ``hubmerge_recipes`` (found in a source checkout too);
* **plugins**: the ``hubmerge_register_recipes(register)`` hook (see :mod:`hubmerge.hookspecs`);
* **the Hub**: a repo's ``hubmerge_recipe.yaml`` (every published hubmerge merge holds one), or a
  ``mergekit_config.yml`` translated by :mod:`hubmerge.mergekit_compat`. Named ``hub://org/name[@rev]``.

A recipe may be a template with variables (``${base}``; see :func:`hubmerge.recipe.render_variables`).
A broken recipe is reported by :func:`recipe_failures` (and ``hubmerge recipes list``) and skipped,
never fatal. :func:`load_recipe_arg` turns what a user types after ``hubmerge run`` (a file, a
registered name, a Hub repo) into a :class:`~hubmerge.recipe.Recipe`.
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .errors import HubmergeError, RecipeError
from .recipe import (
    REPO_ID,
    REVISION,
    Recipe,
    Variable,
    check_repo_id,
    declared_variables,
    parse_yaml,
    recipe_from_dict,
)

logger = logging.getLogger(__name__)

#: The package whose data files are the top-level ``recipes/`` directory.
PACKAGE_RECIPES = "hubmerge_recipes"
#: The resolved recipe every hubmerge output holds.
HUB_RECIPE_FILE = "hubmerge_recipe.yaml"
HUB_PREFIX = "hub://"
#: A registry name: like a recipe's ``name``, optionally namespaced (``org/name``, as Hub entries are).
RECIPE_NAME = re.compile(r"^(?:[A-Za-z0-9][A-Za-z0-9._-]{0,95}/)?[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")
#: Placeholder values used to check a template against the schema when it is registered.
_SAMPLES = {"string": "x", "number": 0.5, "integer": 1, "boolean": False}


@dataclass(frozen=True, eq=False)
class RegisteredRecipe:
    """A named recipe (possibly a template) and where it came from.

    Attributes:
        name: Registry name (``ties-default``; for the Hub, the repo id).
        version: Its version (the recipe's ``version``, ``"0"`` when absent; for the Hub, the commit).
        summary: One line (the first line of ``description`` unless registered with one).
        methods: The methods it uses (``method`` and FlexMerge's ``inner``).
        variables: The variables a user fills in, declared ones first.
        source: ``package``, ``plugin <name>`` or ``hub``.
        text: The recipe's YAML text.
        file: Where it was read (for messages).
        origin: Recorded as ``provenance.source`` in the outputs it makes.
        document: The parsed YAML.
    """

    name: str
    version: str
    summary: str
    methods: tuple[str, ...]
    variables: dict[str, Variable]
    source: str
    text: str
    file: str
    origin: str
    document: dict[str, Any] = field(repr=False)

    @property
    def ref(self) -> str:
        """``name@version``."""
        return f"{self.name}@{self.version}"

    @property
    def required(self) -> list[str]:
        """Names of the variables without a default."""
        return [name for name, var in self.variables.items() if var.required]

    def render(self, values: dict[str, Any] | None = None) -> Recipe:
        """Fill the variables and validate the recipe (schema v1).

        Args:
            values: Variable name to value (text is read according to the variable's ``type``).

        Returns:
            The :class:`~hubmerge.recipe.Recipe`; its provenance records this registry entry.

        Raises:
            RecipeError: ``variables.<name>`` for a missing, unknown or ill-typed variable; any
                schema error of the rendered recipe.
        """
        recipe = recipe_from_dict(self.document, file=self.file, variables=values)
        recipe.provenance = {"source": self.origin}
        return recipe

    def describe(self) -> dict[str, Any]:
        """A JSON-able summary (``recipes list --json``)."""
        return {
            "name": self.name, "version": self.version, "summary": self.summary,
            "methods": list(self.methods), "source": self.source, "file": self.file,
            "variables": {name: {"description": v.description, "type": v.type, "required": v.required,
                                 **({} if v.required else {"default": v.default})}
                          for name, v in self.variables.items()},
        }


@dataclass(frozen=True)
class RecipeFailure:
    """A recipe that could not be registered: its source, name (if known) and the error."""

    source: str
    name: str | None
    error: str


def _summary(document: dict[str, Any], limit: int = 100) -> str:
    """The first sentence of the description's first line, at most ``limit`` characters."""
    description = document.get("description")
    if not isinstance(description, str):
        return ""
    line = next((line.strip() for line in description.strip().splitlines() if line.strip()), "")
    line = re.split(r"(?<=[.!?])\s", line, maxsplit=1)[0]
    return line if len(line) <= limit else line[: limit - 1].rstrip() + "…"


def _methods(document: dict[str, Any]) -> tuple[str, ...]:
    found = []
    if isinstance(document.get("method"), str):
        found.append(document["method"])
    flex = document.get("flexmerge")
    if isinstance(flex, dict) and isinstance(flex.get("inner"), str):
        found.append(flex["inner"])
    return tuple(dict.fromkeys(found))


def _check_schema(document: dict[str, Any], variables: dict[str, Variable], file: str) -> None:
    """Render with sample values and validate, unless a required variable has no sample (type ``any``)."""
    values: dict[str, Any] = {}
    for name, var in variables.items():
        if not var.required:
            continue
        sample = "hubmerge-sample/" + re.sub(r"[^A-Za-z0-9-]", "-", name)  # distinct labels per variable
        if var.type == "model":
            values[name] = sample
        elif var.type == "models":
            values[name] = [f"{sample}-a", f"{sample}-b"]
        elif var.type in _SAMPLES:
            values[name] = _SAMPLES[var.type]
        else:
            return
    recipe_from_dict(document, file=file, variables=values)


def make_entry(recipe: Any, *, source: str, name: str | None = None, version: str | None = None,
               summary: str | None = None, origin: str | None = None,
               file: str | None = None) -> RegisteredRecipe:
    """Build a registry entry from a file, YAML text or a parsed mapping, checking it.

    Args:
        recipe: A ``pathlib.Path`` (or anything with ``read_text``, e.g. an ``importlib.resources``
            file), YAML text (``str``) or a parsed mapping.
        source: ``package``, ``plugin <name>``, ``hub``.
        name: Registry name (default: the recipe's ``name``).
        version: Version (default: the recipe's ``version``, else ``"0"``).
        summary: One line (default: the first line of the recipe's ``description``).
        origin: What outputs record as their source (default ``recipe <name> <version> (<source>)``).
        file: Name for messages (default: the path, or ``<source>:<name>``).

    Returns:
        The :class:`RegisteredRecipe`.

    Raises:
        RecipeError: If the recipe is malformed: not YAML, no name, bad variables, or a rendered
            recipe (with sample values) that fails the schema.
    """
    if isinstance(recipe, dict):
        document = dict(recipe)
        text = yaml.safe_dump(document, sort_keys=False, allow_unicode=True)
        file = file or f"<{source}:{name or document.get('name')}>"
    elif isinstance(recipe, str):
        text = recipe
        file = file or f"<{source}:{name or 'recipe'}>"
        document = parse_yaml(text, file=file)
    elif hasattr(recipe, "read_text"):
        file = file or str(recipe)
        try:
            text = recipe.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise RecipeError(f"cannot read recipe ({type(exc).__name__}: {exc})", file=file) from None
        document = parse_yaml(text, file=file)
    else:
        raise RecipeError(f"register() takes a path, YAML text or a mapping, not {type(recipe).__name__}",
                          file=f"<{source}>")
    if not isinstance(document, dict):
        raise RecipeError("a recipe must be a YAML mapping", file=file)
    document = dict(document)
    if name is not None and "name" not in document:
        document["name"] = name
    if version is not None and "version" not in document:
        document["version"] = version
    name = name or document.get("name")
    if not isinstance(name, str) or not RECIPE_NAME.match(name):
        raise RecipeError(f"not a recipe name: {name!r}", field="name", file=file)
    version = str(version if version is not None else document.get("version", "0"))
    variables = declared_variables(document, file=file)
    _check_schema(document, variables, file)
    return RegisteredRecipe(
        name=name, version=version, summary=summary if summary is not None else _summary(document),
        methods=_methods(document), variables=variables, source=source, text=text, file=file,
        origin=origin or f"recipe {name} {version} ({source})", document=document,
    )


def _version_key(version: str):
    from packaging.version import InvalidVersion, Version

    try:
        return (1, Version(version), "")
    except InvalidVersion:
        return (0, None, version)


class Registry:
    """Recipes by name and version, with the failures met while collecting them."""

    def __init__(self) -> None:
        self.entries: dict[str, dict[str, RegisteredRecipe]] = {}
        self.failures: list[RecipeFailure] = []

    def add(self, entry: RegisteredRecipe) -> None:
        """Add an entry; the same name and version from a second source is a failure, the first is kept."""
        versions = self.entries.setdefault(entry.name, {})
        if entry.version in versions:
            first = versions[entry.version]
            self.failures.append(RecipeFailure(entry.source, entry.name,
                                               f"{entry.name} {entry.version} is already registered by "
                                               f"{first.source} ({first.file}); kept that one"))
            return
        versions[entry.version] = entry

    def latest(self) -> dict[str, RegisteredRecipe]:
        """The newest version of every name, sorted by name."""
        return {name: self.versions(name)[-1] for name in sorted(self.entries)}

    def versions(self, name: str) -> list[RegisteredRecipe]:
        """Every version of ``name``, oldest first."""
        return sorted(self.entries.get(name, {}).values(), key=lambda e: _version_key(e.version))

    def get(self, ref: str) -> RegisteredRecipe:
        """``name`` (newest version) or ``name@version``.

        Raises:
            RecipeError: If there is no such recipe (close names suggested).
        """
        name, _, version = ref.partition("@")
        if name in self.entries:
            if not version:
                return self.versions(name)[-1]
            if version in self.entries[name]:
                return self.entries[name][version]
            known = ", ".join(e.version for e in self.versions(name))
            raise RecipeError(f"recipe {name!r} has no version {version!r} (registered: {known})")
        close = difflib.get_close_matches(name, list(self.entries), n=3, cutoff=0.5)
        hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        raise RecipeError(f"no registered recipe {name!r}{hint} (`hubmerge recipes list` shows them)")


def package_recipe_files() -> list[Any]:
    """The recipe files shipped with hubmerge (``hubmerge_recipes`` data, else a checkout's ``recipes/``)."""
    from importlib import resources

    root: Any = None
    try:
        root = resources.files(PACKAGE_RECIPES)
    except (ModuleNotFoundError, TypeError):
        root = None
    if root is None or not root.is_dir():
        checkout = Path(__file__).resolve().parent.parent / "recipes"
        root = checkout if checkout.is_dir() else None
    if root is None:
        return []
    return sorted((f for f in root.iterdir() if f.is_file() and f.name.endswith((".yaml", ".yml"))),
                  key=lambda f: f.name)


def load_registry() -> Registry:
    """Collect the package's recipes and every plugin's (``hubmerge_register_recipes``).

    Returns:
        A :class:`Registry`; broken recipes and plugins are in its ``failures``.
    """
    from .plugins import get_plugin_manager

    registry = Registry()
    for file in package_recipe_files():
        try:
            registry.add(make_entry(file, source="package"))
        except RecipeError as exc:
            registry.failures.append(RecipeFailure("package", Path(str(file)).stem, str(exc)))
    pm = get_plugin_manager()
    for impl in pm.hook.hubmerge_register_recipes.get_hookimpls():
        source = f"plugin {impl.plugin_name}"

        def register(recipe: Any, *, name: str | None = None, version: str | None = None,
                     summary: str | None = None, _source: str = source) -> None:
            try:
                registry.add(make_entry(recipe, source=_source, name=name, version=version, summary=summary))
            except RecipeError as exc:
                registry.failures.append(RecipeFailure(_source, name, str(exc)))

        try:
            impl.function(register=register)
        except Exception as exc:  # noqa: BLE001 - a broken plugin is reported, never fatal
            logger.warning("%s failed registering recipes: %s", source, exc)
            registry.failures.append(RecipeFailure(source, None, f"{type(exc).__name__}: {exc}"))
    return registry


def registered_recipes() -> dict[str, RegisteredRecipe]:
    """The newest version of every registered recipe (package and plugins), sorted by name."""
    return load_registry().latest()


def recipe_failures() -> list[RecipeFailure]:
    """Recipes (or plugins) that could not be registered."""
    return load_registry().failures


# -- the Hub -------------------------------------------------------------------------------------------------

def parse_hub_ref(text: str) -> tuple[str, str | None]:
    """Split ``hub://org/name@rev`` (or ``org/name@rev``) into the repo id and the revision.

    Raises:
        RecipeError: If it is not a repo id with an optional revision.
    """
    body = text.removeprefix(HUB_PREFIX)
    repo, _, revision = body.partition("@")
    try:
        check_repo_id(repo)
    except ValueError as exc:
        raise RecipeError(str(exc), file=text) from None
    if revision and (not REVISION.match(revision) or ".." in revision):
        raise RecipeError(f"not a valid revision: {revision!r}", file=text)
    return repo, revision or None


def hub_recipe(repo_id: str, revision: str | None = None, *, token: str | None = None) -> RegisteredRecipe:
    """A published merge's recipe: its ``hubmerge_recipe.yaml``, else its ``mergekit_config.yml`` translated.

    The revision is resolved to a commit first and every file is read at that commit.

    Args:
        repo_id: Hub repo id.
        revision: Branch, tag or commit (default ``main``).
        token: Token for private repos.

    Returns:
        A :class:`RegisteredRecipe` named after the repo, versioned by the commit hash.

    Raises:
        HubError: The repo or revision cannot be read.
        RecipeError: The repo holds neither file, or the file is invalid.
        MergekitImportError: The mergekit configuration cannot be translated.
    """
    from .hub import download_file, repo_files
    from .mergekit_compat import CONFIG_FILES, import_mergekit

    commit, files = repo_files(repo_id, revision=revision, token=token)
    origin = f"{HUB_PREFIX}{repo_id}@{commit}"
    if HUB_RECIPE_FILE in files:
        path = download_file(repo_id, HUB_RECIPE_FILE, revision=commit, token=token)
        return make_entry(path, source="hub", name=repo_id, version=commit, origin=origin,
                          file=f"{origin}/{HUB_RECIPE_FILE}")
    mergekit = next((f for f in CONFIG_FILES if f in files), None)
    if mergekit is None:
        raise RecipeError(f"{repo_id}@{commit[:12]} holds no {HUB_RECIPE_FILE} (nor a mergekit_config.yml): "
                          "it was not made by hubmerge or mergekit, so there is no recipe to re-run")
    label = f"{origin}/{mergekit}"
    path = download_file(repo_id, mergekit, revision=commit, token=token)
    translated = import_mergekit(parse_yaml(path.read_text(encoding="utf-8"), file=label), file=label,
                                 name=repo_id.split("/")[-1])
    entry = make_entry(translated.document, source="hub", name=repo_id, version=commit, origin=origin,
                       file=label, summary=f"mergekit {translated.method} (translated)")
    return dataclasses.replace(entry, text=translated.to_yaml(label))


def rerun_dir(repo_id: str, commit: str) -> Path:
    """The default output directory of a re-run: a temp-dir path derived from the repo and commit."""
    return Path(tempfile.gettempdir()) / f"hubmerge-rerun-{repo_id.replace('/', '--')}-{commit[:12]}"


def reproducible_recipe(entry: RegisteredRecipe, *, output: str | Path | None = None) -> Recipe:
    """A published merge's recipe made ready to re-run here.

    The output goes to ``output`` (default :func:`rerun_dir`) and is never pushed
    (``output.repo`` is cleared, so a re-run cannot overwrite the published repo).

    Args:
        entry: From :func:`hub_recipe`.
        output: Local output directory.

    Returns:
        The :class:`~hubmerge.recipe.Recipe`.

    Raises:
        RecipeError: If an input is a local directory that does not exist here (naming its field).
    """
    # Absolute and normalised: a recipe's output.path may not contain '..'.
    target = os.path.abspath(output) if output is not None else str(rerun_dir(entry.name, entry.version))
    document = dict(entry.document)  # the author's output settings are replaced before validation
    kept = {k: v for k, v in (document.get("output") or {}).items() if k not in ("repo", "private")}
    document["output"] = {**kept, "path": target}
    recipe = recipe_from_dict(document, file=entry.file)
    recipe.provenance = {"source": entry.origin}
    refs = [("base", recipe.base)] + [(f"experts[{i}]", e) for i, e in enumerate(recipe.experts)]
    for where, ref in refs:
        if ref.path is not None and not Path(ref.path).expanduser().is_dir():
            raise RecipeError(f"{ref.path} was a local directory on the machine that made this merge; it is "
                              "not here, so the merge cannot be re-run", field=f"{where}.path",
                              file=entry.file)
    return recipe


# -- what `hubmerge run` is given ----------------------------------------------------------------------------

@dataclass
class LoadedRecipe:
    """A recipe resolved from a command-line argument.

    Attributes:
        recipe: The validated recipe (schema v1).
        file: The name used in messages.
        entry: The registry entry, for a registered or Hub recipe.
    """

    recipe: Recipe
    file: str
    entry: RegisteredRecipe | None = None


def parse_assignments(pairs: list[str] | None) -> dict[str, str]:
    """``["k=0.3", "experts=a,b"]`` -> ``{"k": "0.3", "experts": "a,b"}`` (``--set`` options).

    Raises:
        RecipeError: If an item has no ``=``.
    """
    values: dict[str, str] = {}
    for pair in pairs or []:
        name, sep, value = pair.partition("=")
        if not sep or not name.strip():
            raise RecipeError(f"--set {pair!r}: expected NAME=VALUE")
        values[name.strip()] = value
    return values


def load_recipe_arg(arg: str, *, variables: dict[str, Any] | None = None, token: str | None = None,
                    registry: Registry | None = None) -> LoadedRecipe:
    """Resolve what follows ``hubmerge run``: a recipe file, a registered recipe, or a published merge.

    In order: ``hub://org/name[@rev]`` is a Hub repo; an existing file (or a name ending in
    ``.yaml``/``.yml``) is a recipe file; a registered name (``name`` or ``name@version``) is
    rendered with ``variables``; anything else shaped like ``org/name[@rev]`` is a Hub repo.
    A Hub recipe is re-run locally (see :func:`reproducible_recipe`).

    Args:
        arg: The argument.
        variables: Values of a template's variables.
        token: Hub token.
        registry: A registry to look names up in (default: :func:`load_registry`).

    Returns:
        A :class:`LoadedRecipe`.

    Raises:
        RecipeError: Unknown name or file, a missing variable, an invalid recipe.
        HubError: The Hub repo cannot be read.
    """
    from .recipe import load_recipe

    if arg.startswith(HUB_PREFIX):
        return _from_hub(arg, variables, token)
    path = Path(arg)
    if path.is_file() or arg.endswith((".yaml", ".yml")):
        return LoadedRecipe(load_recipe(path, variables=variables), arg)
    if path.is_dir():
        inner = path / HUB_RECIPE_FILE
        hint = f" (a merge output: its recipe is {inner})" if inner.is_file() else ""
        raise RecipeError(f"is a directory, not a recipe file{hint}", file=arg)
    registry = registry or load_registry()
    name = arg.partition("@")[0]
    if name in registry.entries:
        entry = registry.get(arg)
        return LoadedRecipe(entry.render(variables), entry.file, entry)
    if "/" in name and REPO_ID.match(name):
        return _from_hub(arg, variables, token)
    close = difflib.get_close_matches(name, list(registry.entries), n=3, cutoff=0.5)
    hint = (f"; did you mean {', '.join(repr(c) for c in close)}?" if close
            else " (`hubmerge recipes list` shows them)")
    raise RecipeError(f"not a recipe file, a registered recipe or a Hub repo id{hint}", file=arg)


def _from_hub(arg: str, variables: dict[str, Any] | None, token: str | None) -> LoadedRecipe:
    repo, revision = parse_hub_ref(arg)
    entry = hub_recipe(repo, revision, token=token)
    if variables:
        raise RecipeError("a published merge's recipe has no variables to set", field="variables",
                          file=entry.file)
    return LoadedRecipe(reproducible_recipe(entry), entry.file, entry)


# -- discovery on the Hub ------------------------------------------------------------------------------------

@dataclass
class HubMerge:
    """A merge published on the Hub, as ``recipes search`` lists it.

    Attributes:
        repo_id: The repo.
        method: The merge method (from the card's tags), or ``None`` if no tag names one.
        inputs: The card's ``base_model`` list: every input repo.
        tags: The card's tags.
    """

    repo_id: str
    method: str | None
    inputs: list[str]
    tags: list[str]


def search_hub(text: str | None = None, *, method: str | None = None, limit: int | None = 50,
               token: str | None = None) -> list[HubMerge]:
    """Hub repos tagged ``hubmerge`` (and ``method``), with their method and inputs from the card.

    Args:
        text: Text the repo id must contain (the Hub's ``search``).
        method: Only merges made with this method (its tag).
        limit: Most results.
        token: Token (its owner's private repos are listed too).

    Returns:
        :class:`HubMerge` entries, in the Hub's order.

    Raises:
        HubError: If the Hub cannot be reached.
    """
    from .hub import search_models
    from .plugins import registered_methods

    try:
        known = set(registered_methods())
    except HubmergeError:
        known = set()
    tags = ["hubmerge"] + ([method] if method else [])
    found = []
    for info in search_models(tags=tags, search=text, limit=limit, token=token):
        card = info.card_data.to_dict() if info.card_data is not None else {}
        card_tags = [str(t) for t in card.get("tags") or []]
        all_tags = card_tags or [str(t) for t in info.tags or []]
        named = [t for t in all_tags if t in known]
        others = [t for t in card_tags if t not in ("hubmerge", "merge") and ":" not in t]
        chosen = method or (named[0] if named else (others[0] if others else None))
        inputs = card.get("base_model") or []
        inputs = [inputs] if isinstance(inputs, str) else list(inputs)
        found.append(HubMerge(info.id, chosen, inputs, all_tags))
    return found
