"""Recipe schema v1: YAML parsed into pydantic models, with field-path errors.

Every error names the file and the field path (``experts[2].repo``). Method
parameters are validated against the method's own ``Params`` model by
:func:`check_recipe`, which needs the plugin registry; :func:`load_recipe` checks the
schema alone.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import RecipeError, UnknownMethodError

SCHEMA_VERSION = 1
MAX_YAML_ALIASES = 64
MAX_YAML_DEPTH = 32
MAX_RECIPE_BYTES = 1024 * 1024
REPO_ID = re.compile(r"^(?:[A-Za-z0-9][A-Za-z0-9._-]{0,95}/)?[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")
REVISION = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/-]{0,254}$")
SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
              "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
DTYPE_NAMES = ("float32", "float16", "bfloat16", "float64")


def parse_size(value: int | str) -> int:
    """Parse a byte size such as ``2GB``, ``500MiB`` or ``1048576``.

    Args:
        value: An int (bytes) or a string with an optional unit.

    Returns:
        The size in bytes.

    Raises:
        ValueError: If the string is not a size.
    """
    if isinstance(value, int) and not isinstance(value, bool):
        if value <= 0:
            raise ValueError("size must be positive")
        return value
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", str(value))
    if not match or match.group(2).upper() not in SIZE_UNITS:
        raise ValueError(f"not a size: {value!r} (use e.g. 2GB, 500MB, 1GiB)")
    size = int(float(match.group(1)) * SIZE_UNITS[match.group(2).upper()])
    if size <= 0:
        raise ValueError("size must be positive")
    return size


def check_repo_id(repo: str) -> str:
    """Return ``repo`` if it is a well-formed Hub repo id, else raise ``ValueError``."""
    if not REPO_ID.match(repo) or ".." in repo or "--" in repo:
        raise ValueError(f"not a valid Hub repo id: {repo!r}")
    return repo


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class _RepoOrPath(_Strict):
    """Shared parsing of a Hub repo (``org/name@rev``) or a local path given as one string."""

    @staticmethod
    def _is_local(path: Path) -> bool:
        return path.is_dir()

    @model_validator(mode="before")
    @classmethod
    def _from_string(cls, value: Any) -> Any:
        if isinstance(value, str):
            if cls._is_local(Path(value).expanduser()):
                return {"path": value}
            repo, _, revision = value.partition("@")
            return {"repo": repo, "revision": revision or None}
        return value

    @field_validator("repo", check_fields=False)
    @classmethod
    def _repo(cls, value: str | None) -> str | None:
        return None if value is None else check_repo_id(value)

    @field_validator("revision", check_fields=False)
    @classmethod
    def _revision(cls, value: str | None) -> str | None:
        if value is not None and (not REVISION.match(value) or ".." in value):
            raise ValueError(f"not a valid revision: {value!r}")
        return value


class ModelRef(_RepoOrPath):
    """A model reference: a Hub repo (optionally pinned to a revision) or a local directory.

    As a string, ``org/name@rev`` is a Hub repo at ``rev``; a string that names an
    existing local directory is local (the transformers convention).
    """

    repo: str | None = None
    path: str | None = None
    revision: str | None = None
    name: str | None = Field(None, description="Label used in cards and deployments")


    @model_validator(mode="after")
    def _one_source(self) -> ModelRef:
        if (self.repo is None) == (self.path is None):
            raise ValueError("give exactly one of `repo` or `path`")
        if self.path is not None and self.revision is not None:
            raise ValueError("`revision` applies to Hub repos, not local paths")
        return self

    @property
    def label(self) -> str:
        """A short name: ``name`` if set, else the repo's or directory's name."""
        if self.name:
            return self.name
        return self.repo.split("/")[-1] if self.repo else Path(self.path).name

    def __str__(self) -> str:
        if self.repo:
            return self.repo + (f"@{self.revision}" if self.revision else "")
        return str(self.path)


class OutputSpec(_Strict):
    """Where and how the merge is written."""

    path: str | None = Field(None, description="Local output directory (written atomically)")
    repo: str | None = Field(None, description="Hub repo to push the result to")
    private: bool = False
    dtype: Literal["float32", "float16", "bfloat16", "float64"] | None = Field(
        None, description="Output dtype (default: the base model's)"
    )
    shard_size: int = Field(5 * 10**9, description="Maximum bytes per output shard, e.g. 2GB")
    format: Literal["model", "adapter"] = "model"
    rank: int | None = Field(None, ge=1, description="Rank of an adapter output (truncated SVD)")

    @field_validator("shard_size", mode="before")
    @classmethod
    def _size(cls, value: Any) -> int:
        return parse_size(value)

    @field_validator("repo")
    @classmethod
    def _repo(cls, value: str | None) -> str | None:
        return None if value is None else check_repo_id(value)


class BlockRule(_Strict):
    """A named FlexMerge block: tensors whose names match ``pattern`` (a regex)."""

    name: str
    pattern: str


class FlexMergeSpec(_Strict):
    """Multi-size FlexMerge deployments from one recipe."""

    sizes: Literal["all"] | list[int | str] = "all"
    inner: str = "task_arithmetic"
    inner_params: dict[str, Any] = Field(default_factory=dict)
    blocks: Literal["auto"] | list[BlockRule] = "auto"


class DataSource(_RepoOrPath):
    """Where one task's samples come from: a Hub *dataset* repo or a local file or directory.

    As a string, an existing local path is local; otherwise ``org/name@rev`` is a dataset repo.
    ``files`` picks the files inside the repo or directory (a name or glob; ``{task}`` is the
    expert's label): ``.parquet``, ``.jsonl``/``.json`` or ``.safetensors``; see :mod:`hubmerge.data`.
    """

    repo: str | None = Field(None, description="Hub dataset repo id (read with repo_type=dataset)")
    path: str | None = Field(None, description="Local file, or a directory holding the files")
    revision: str | None = Field(None, description="Branch, tag or commit of the dataset repo")
    files: str = Field("{task}.*", min_length=1,
                       description="File name or glob inside the repo/directory; {task} is the expert's label")

    @staticmethod
    def _is_local(path: Path) -> bool:
        return path.exists()  # a single file is a source too


    @field_validator("files")
    @classmethod
    def _files(cls, value: str) -> str:
        if value.startswith("/") or ".." in Path(value).parts:
            raise ValueError(f"{value!r}: `files` is a name or glob inside the repo or directory")
        return value

    @model_validator(mode="after")
    def _one_source(self) -> DataSource:
        if self.repo is not None and self.path is not None:
            raise ValueError("give at most one of `repo` or `path`")
        if self.path is not None and self.revision is not None:
            raise ValueError("`revision` applies to Hub repos, not local paths")
        return self

    @property
    def given(self) -> bool:
        """Whether a repo or path is set."""
        return self.repo is not None or self.path is not None


class DataSpec(DataSource):
    """``data:`` — unlabeled samples per task for methods that learn from data (AdaMerging).

    The top level is the default source of every task; ``tasks`` overrides it per expert label.
    At most ``limit`` samples are taken per task (a seeded shuffle picks them); ``label``/``labels``
    columns are ignored; a ``text`` column is tokenised with the base's tokenizer.
    """

    limit: int = Field(64, ge=1, le=1_000_000, description="At most this many samples per task")
    seed: int | None = Field(0, description="Seed of the shuffle that picks the samples (null: file order)")
    max_length: int = Field(128, ge=1, description="Token budget when a `text` column is tokenised")
    tasks: dict[str, DataSource] = Field(default_factory=dict,
                                         description="Per-task sources, by expert label (override the default)")


class Recipe(_Strict):
    """A merge recipe, schema version 1."""

    hubmerge: int = Field(description="Schema version")
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")
    version: str | None = Field(
        None, pattern=r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,63}$",
        description="Version of a named recipe (the recipe registry); quote it in YAML (\"1.10\")",
    )
    description: str | None = None
    base: ModelRef
    experts: list[ModelRef] = Field(min_length=1)
    method: str
    params: dict[str, Any] = Field(default_factory=dict)
    flexmerge: FlexMergeSpec | None = None
    data: DataSpec | None = Field(None, description="Samples for methods that learn from data (AdaMerging)")
    dtype: Literal["float32", "float16", "bfloat16", "float64"] = "float32"
    device: str = Field("auto", pattern=r"^(auto|cpu|cuda(:\d+)?|mps)$")
    output: OutputSpec = Field(default_factory=OutputSpec)
    provenance: dict[str, Any] | None = Field(
        None, description="Written by hubmerge into hubmerge_recipe.yaml: versions and time; informational"
    )

    @field_validator("version", mode="before")
    @classmethod
    def _version_text(cls, value: Any) -> Any:
        # `version: 1` or `version: 1.2` in YAML are numbers; take them as written.
        return str(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else value

    @field_validator("hubmerge")
    @classmethod
    def _version(cls, value: int) -> int:
        if value != SCHEMA_VERSION:
            raise ValueError(f"unknown schema version {value} (this hubmerge reads version {SCHEMA_VERSION})")
        return value

    @field_validator("experts")
    @classmethod
    def _distinct_labels(cls, experts: list[ModelRef]) -> list[ModelRef]:
        seen: dict[str, int] = {}
        for i, expert in enumerate(experts):
            if expert.label in seen:
                raise ValueError(
                    f"experts[{i}] and experts[{seen[expert.label]}] are both called {expert.label!r}; "
                    "give one a `name`"
                )
            seen[expert.label] = i
        return experts


def field_path(loc: tuple[Any, ...]) -> str:
    """Format a pydantic error location as ``experts[2].repo``."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in ("function-before[_from_string()]", "function-after[_one_source()]"):
            continue
        else:
            out += ("." if out else "") + str(part)
    return out or "(top level)"


def raise_validation_error(exc: ValidationError, *, file: str | None, prefix: tuple = ()) -> None:
    """Turn a pydantic ``ValidationError`` into a :class:`RecipeError` on its first error.

    Args:
        exc: The validation error.
        file: Recipe file name for the message.
        prefix: Location prefix (e.g. ``("params",)``).

    Raises:
        RecipeError: Always.
    """
    errors = exc.errors()
    first = errors[0]
    loc = prefix + tuple(p for p in first["loc"] if not (isinstance(p, str) and p.startswith("function-")))
    message = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        message = "unknown field"
    more = f" (and {len(errors) - 1} more error{'s' if len(errors) > 2 else ''})" if len(errors) > 1 else ""
    raise RecipeError(message + more, field=field_path(loc), file=file) from None


class _LimitedLoader(yaml.SafeLoader):
    """A safe YAML loader that refuses alias blow-ups ("billion laughs") and deep nesting."""

    aliases_seen = 0
    depth = 0

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            self.aliases_seen += 1
            if self.aliases_seen > MAX_YAML_ALIASES:
                raise yaml.YAMLError(f"more than {MAX_YAML_ALIASES} YAML aliases; refusing to expand")
        self.depth += 1
        try:
            if self.depth > MAX_YAML_DEPTH:  # the composer recurses: stop long before Python's stack does
                raise yaml.YAMLError(f"nested more than {MAX_YAML_DEPTH} levels deep; refusing to parse")
            return super().compose_node(parent, index)
        finally:
            self.depth -= 1


def parse_yaml(text: str, *, file: str | None = None) -> Any:
    """Parse YAML text safely (no tags, bounded aliases and size).

    Args:
        text: YAML text.
        file: Name for error messages.

    Returns:
        The parsed document.

    Raises:
        RecipeError: If the text is too large or not valid YAML.
    """
    if len(text.encode()) > MAX_RECIPE_BYTES:
        raise RecipeError(f"recipe larger than {MAX_RECIPE_BYTES} bytes", file=file)
    try:
        return yaml.load(text, Loader=_LimitedLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise RecipeError(f"malformed YAML{where}: {problem}", file=file) from None
    except Exception as exc:  # noqa: BLE001 - PyYAML's constructors raise ValueError, IndexError... on bad scalars
        raise RecipeError(f"malformed YAML: {type(exc).__name__}: {exc}"[:500], file=file) from None


# -- variables: recipe templates --------------------------------------------------------------------------
#
# A recipe may leave values for its user to fill in: ``${name}`` placeholders in any string value,
# optionally declared in a top-level ``variables:`` block (description, type, default). A variable
# without a default is required. Rendering substitutes the values and drops the block, so what is
# validated (and recorded beside the merge) is a plain schema-v1 recipe. A placeholder that is the
# whole value keeps the value's type (``experts: ${experts}`` becomes a list); inside longer text it
# is formatted (``out/${name}``). ``$${`` writes a literal ``${``.

VARIABLE_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_-]*(?:\.[A-Za-z_][A-Za-z0-9_-]*)*$")
_PLACEHOLDER = re.compile(r"\$(\$?)\{([^{}]*)\}")
_TRUE = {"true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0"}


class Variable(_Strict):
    """A variable of a recipe template, declared under ``variables:``.

    ``type`` says which values are accepted and how a value given as text (``--set k=0.3``)
    is read: ``string``, ``number``, ``integer``, ``boolean``, ``model`` (a model reference,
    text or mapping), ``models`` (a list of them; text is split on commas) or ``any`` (taken
    as given). A variable without ``default`` is required; ``default: null`` makes it optional.
    """

    description: str | None = None
    type: Literal["string", "number", "integer", "boolean", "model", "models", "any"] = "any"
    default: Any = None

    @property
    def required(self) -> bool:
        """Whether the user must give a value (no ``default`` declared)."""
        return "default" not in self.model_fields_set

    def coerce(self, value: Any) -> Any:
        """Check ``value`` against :attr:`type`, reading text when the type asks for more.

        Raises:
            ValueError: If the value does not fit the type.
        """
        kind = self.type
        if value is None or kind == "any":
            return value
        if kind == "string":
            if isinstance(value, bool) or not isinstance(value, (str, int, float)):
                raise ValueError(f"expected text, got {type(value).__name__}")
            return str(value)
        if kind in ("number", "integer"):
            if isinstance(value, str):
                text = value.strip()
                try:
                    value = int(text)
                except ValueError:
                    try:
                        value = float(text)
                    except ValueError:
                        raise ValueError(f"expected a {kind}, got {value!r}") from None
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"expected a {kind}, got {type(value).__name__}")
            if kind == "integer":
                if isinstance(value, float) and not value.is_integer():
                    raise ValueError(f"expected an integer, got {value!r}")
                return int(value)
            return value
        if kind == "boolean":
            if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
                return value.strip().lower() in _TRUE
            if not isinstance(value, bool):
                raise ValueError(f"expected true or false, got {value!r}")
            return value
        if kind == "model":
            if not isinstance(value, (str, dict)) or value == "":
                raise ValueError("expected a model reference (Hub repo id[@revision] or a local directory)")
            return value.strip() if isinstance(value, str) else value
        # models
        if isinstance(value, str):
            value = [part.strip() for part in value.split(",") if part.strip()]
        if not isinstance(value, (list, tuple)) or not all(isinstance(v, (str, dict)) for v in value):
            raise ValueError("expected a list of model references (comma-separated as text)")
        return list(value)


def _strings(node: Any, path: tuple = ()):
    """Yield ``(path, text)`` for every string value of a parsed document (keys excluded)."""
    if isinstance(node, str):
        yield path, node
    elif isinstance(node, dict):
        for key, value in node.items():
            if not path and key == "variables":
                continue
            yield from _strings(value, (*path, key))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _strings(value, (*path, i))


def placeholders(data: Any, *, file: str | None = None) -> dict[str, list[str]]:
    """The ``${name}`` placeholders of a document, each with the field paths that use it.

    Args:
        data: A parsed recipe document.
        file: Name for error messages.

    Returns:
        Variable name to field paths (``params.k``), in order of first use.

    Raises:
        RecipeError: On a malformed placeholder (``${}``, ``${a b}``), naming its field.
    """
    found: dict[str, list[str]] = {}
    for path, text in _strings(data):
        for match in _PLACEHOLDER.finditer(text):
            if match.group(1):
                continue  # $${...} is a literal
            name = match.group(2).strip()
            if not VARIABLE_NAME.match(name):
                raise RecipeError(f"malformed placeholder {match.group(0)!r} (a name of letters, digits, _ - "
                                  "and dots)", field=field_path(path), file=file)
            found.setdefault(name, []).append(field_path(path))
    return found


def is_template(data: Any) -> bool:
    """Whether a parsed document declares ``variables:`` or holds ``${...}`` placeholders."""
    if isinstance(data, dict) and "variables" in data:
        return True
    return any("${" in text for _, text in _strings(data))


def declared_variables(data: Any, *, file: str | None = None) -> dict[str, Variable]:
    """The variables of a template: its ``variables:`` block plus undeclared placeholders.

    A placeholder that the block does not declare is a required variable of type ``any``.

    Args:
        data: A parsed recipe document.
        file: Name for error messages.

    Returns:
        Variable name to :class:`Variable`, declared ones first, in order.

    Raises:
        RecipeError: A malformed block (``variables.k.type``), a bad name, or a declared
            variable that no placeholder uses (a typo, most likely).
    """
    block = data.get("variables") if isinstance(data, dict) else None
    if block is None:
        block = {}
    if not isinstance(block, dict):
        raise RecipeError("must be a mapping of variable names to their declarations", field="variables",
                          file=file)
    declared: dict[str, Variable] = {}
    for name, spec in block.items():
        if not isinstance(name, str) or not VARIABLE_NAME.match(name):
            raise RecipeError(f"not a variable name: {name!r} (letters, digits, _ - and dots)",
                              field="variables", file=file)
        if spec is not None and not isinstance(spec, dict):
            raise RecipeError("declare a variable as a mapping (description, type, default) or null",
                              field=f"variables.{name}", file=file)
        try:
            declared[name] = Variable.model_validate(spec or {})
        except ValidationError as exc:
            raise_validation_error(exc, file=file, prefix=("variables", name))
        try:
            if not declared[name].required:
                declared[name].coerce(declared[name].default)
        except ValueError as exc:
            raise RecipeError(f"default: {exc}", field=f"variables.{name}", file=file) from None
    used = placeholders(data, file=file)
    for name in declared:
        if name not in used:
            raise RecipeError(f"declared but no ${{{name}}} placeholder uses it", field=f"variables.{name}",
                              file=file)
    for name in used:
        declared.setdefault(name, Variable())
    return declared


def render_variables(data: dict[str, Any], values: dict[str, Any] | None = None, *,
                     file: str | None = None) -> dict[str, Any]:
    """Fill a template's variables and return the plain recipe document.

    Args:
        data: A parsed recipe document (a template or a plain recipe).
        values: Variable name to value; text is read according to the variable's ``type``.
        file: Name for error messages.

    Returns:
        A new document without ``variables:`` and with every placeholder substituted.

    Raises:
        RecipeError: ``variables.<name>`` for a required variable left unset, an unknown
            variable, or a value of the wrong type; the field of a placeholder that cannot be
            formatted into text.
    """
    import copy

    declared = declared_variables(data, file=file)
    values = dict(values or {})
    for name in values:
        if name not in declared:
            known = ", ".join(declared) or "none"
            raise RecipeError(f"unknown variable (this recipe declares: {known})", field=f"variables.{name}",
                              file=file)
    resolved: dict[str, Any] = {}
    missing: list[str] = []
    for name, var in declared.items():
        if name in values:
            try:
                resolved[name] = var.coerce(values[name])
            except ValueError as exc:
                raise RecipeError(str(exc), field=f"variables.{name}", file=file) from None
        elif var.required:
            missing.append(name)
        else:
            resolved[name] = var.coerce(var.default)
    if missing:
        name = missing[0]
        var = declared[name]
        uses = placeholders(data).get(name, [])
        about = f" — {var.description}" if var.description else ""
        more = f" (and {len(missing) - 1} more: {', '.join(missing[1:])})" if len(missing) > 1 else ""
        raise RecipeError(f"required variable {name!r} is not set{about}; used at {', '.join(uses)}{more}",
                          field=f"variables.{name}", file=file)

    def substitute(node: Any, path: tuple) -> Any:
        if isinstance(node, dict):
            return {k: substitute(v, (*path, k)) for k, v in node.items() if path or k != "variables"}
        if isinstance(node, list):
            return [substitute(v, (*path, i)) for i, v in enumerate(node)]
        if not isinstance(node, str) or "${" not in node:
            return node
        whole = _PLACEHOLDER.fullmatch(node)
        if whole and not whole.group(1):
            return copy.deepcopy(resolved[whole.group(2).strip()])

        def text(match: re.Match) -> str:
            if match.group(1):
                return "${" + match.group(2) + "}"
            name = match.group(2).strip()
            value = resolved[name]
            if isinstance(value, bool):
                return "true" if value else "false"
            if isinstance(value, (str, int, float)):
                return str(value)
            raise RecipeError(f"variable {name!r} is {'null' if value is None else type(value).__name__} "
                              "and cannot be written inside text", field=field_path(path), file=file)

        return _PLACEHOLDER.sub(text, node)

    return substitute(data, ())


def recipe_from_dict(data: Any, *, file: str | None = None,
                     variables: dict[str, Any] | None = None) -> Recipe:
    """Validate a parsed document against schema v1.

    A document with a ``variables:`` block or ``${name}`` placeholders is a template: it
    is rendered first (see :func:`render_variables`); a plain recipe is unchanged.

    Args:
        data: The parsed YAML document.
        file: Name for error messages.
        variables: Values of the template's variables (name to value).

    Returns:
        The :class:`Recipe`.

    Raises:
        RecipeError: Naming the first field at fault (``variables.base`` for a required
            variable left unset).
    """
    if not isinstance(data, dict):
        raise RecipeError("a recipe must be a YAML mapping", file=file)
    if variables or is_template(data):
        data = render_variables(data, variables, file=file)
    if "hubmerge" not in data:
        raise RecipeError("missing schema version (add `hubmerge: 1`)", field="hubmerge", file=file)
    try:
        return Recipe.model_validate(data)
    except ValidationError as exc:
        raise_validation_error(exc, file=file)


def load_recipe(path: str | Path, *, variables: dict[str, Any] | None = None) -> Recipe:
    """Read and validate a recipe file (schema only; see :func:`check_recipe`).

    Args:
        path: The YAML file.
        variables: Values of the recipe's variables, when it is a template.

    Returns:
        The :class:`Recipe`.

    Raises:
        RecipeError: If the file is missing, malformed, or fails the schema.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise RecipeError(f"cannot read recipe ({exc.__class__.__name__}: {exc})", file=str(path)) from None
    return recipe_from_dict(parse_yaml(text, file=str(path)), file=str(path), variables=variables)


def recipe_to_yaml(recipe: Recipe) -> str:
    """Serialise a recipe back to YAML (defaults left out, field order kept)."""
    data = recipe.model_dump(mode="json", exclude_defaults=True)
    data = {"hubmerge": recipe.hubmerge, **data}
    return yaml.safe_dump(data, sort_keys=False, allow_unicode=True)


def check_recipe(recipe: Recipe, *, file: str | None = None):
    """Check what the schema cannot: the method exists and its parameters fit.

    Args:
        recipe: A schema-valid recipe.
        file: Name for error messages.

    Returns:
        The instantiated method (``MergeMethod``) with validated parameters.

    Raises:
        RecipeError: Unknown method (close names suggested), bad parameters
            (``params.k``), a wrong number of experts, or a dtype the method cannot use.
    """
    import torch

    from .errors import MethodInputError
    from .plugins import get_method

    try:
        method_cls = get_method(recipe.method)
    except UnknownMethodError as exc:
        raise RecipeError(str(exc), field="method", file=file) from None
    try:
        method = method_cls(recipe.params)
    except ValidationError as exc:
        raise_validation_error(exc, file=file, prefix=("params",))
    try:
        if recipe.flexmerge is None:
            method.check_experts(len(recipe.experts))
        method.check_dtype(getattr(torch, recipe.dtype))
    except MethodInputError as exc:
        field = getattr(exc, "field", None)
        field = f"params.{field}" if field else ("experts" if "experts" in str(exc) else "dtype")
        raise RecipeError(str(exc), field=field, file=file) from None
    check_data(recipe, method, file=file)
    return method


def check_data(recipe: Recipe, method, *, file: str | None = None) -> None:
    """Check the recipe's ``data:`` against the method and the experts (no file is read).

    Args:
        recipe: A schema-valid recipe.
        method: Its method instance.
        file: Name for error messages.

    Raises:
        RecipeError: ``data`` missing for a method that learns from samples; ``data.tasks.<label>``
            naming no expert; an expert with no source.
    """
    import logging

    spec = recipe.data
    if spec is None:
        if getattr(method, "needs_data", False):
            raise RecipeError(
                f"method {recipe.method!r} learns from samples: add a `data:` section with unlabeled inputs per "
                "task (a Hub dataset repo or a local file/directory; see docs/RECIPES.md)", field="data", file=file)
        return
    if not getattr(method, "needs_data", False):
        logging.getLogger(__name__).warning("%s: method %r does not use `data:`; it is ignored",
                                            file or recipe.name, recipe.method)
        return
    labels = [e.label for e in recipe.experts]
    for key in spec.tasks:
        if key not in labels:
            raise RecipeError(f"no expert is labelled {key!r} (experts: {', '.join(labels)})",
                              field=f"data.tasks.{key}", file=file)
    for label in labels:
        source = spec.tasks.get(label)
        if not (source is not None and source.given) and not spec.given:
            raise RecipeError(f"no source for expert {label!r}: set `data.repo` or `data.path` for every task, "
                              f"or `data.tasks.{label}`", field="data", file=file)
