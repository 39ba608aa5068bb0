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


class ModelRef(_Strict):
    """A model reference: a Hub repo (optionally pinned to a revision) or a local directory.

    As a string, ``org/name@rev`` is a Hub repo at ``rev``; a string that names an
    existing local directory is local (the transformers convention).
    """

    repo: str | None = None
    path: str | None = None
    revision: str | None = None
    name: str | None = Field(None, description="Label used in cards and deployments")

    @model_validator(mode="before")
    @classmethod
    def _from_string(cls, value: Any) -> Any:
        if isinstance(value, str):
            if Path(value).expanduser().is_dir():
                return {"path": value}
            repo, _, revision = value.partition("@")
            return {"repo": repo, "revision": revision or None}
        return value

    @field_validator("repo")
    @classmethod
    def _repo(cls, value: str | None) -> str | None:
        return None if value is None else check_repo_id(value)

    @field_validator("revision")
    @classmethod
    def _revision(cls, value: str | None) -> str | None:
        if value is not None and (not REVISION.match(value) or ".." in value):
            raise ValueError(f"not a valid revision: {value!r}")
        return value

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


class Recipe(_Strict):
    """A merge recipe, schema version 1."""

    hubmerge: int = Field(description="Schema version")
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")
    description: str | None = None
    base: ModelRef
    experts: list[ModelRef] = Field(min_length=1)
    method: str
    params: dict[str, Any] = Field(default_factory=dict)
    flexmerge: FlexMergeSpec | None = None
    dtype: Literal["float32", "float16", "bfloat16", "float64"] = "float32"
    device: str = Field("auto", pattern=r"^(auto|cpu|cuda(:\d+)?|mps)$")
    output: OutputSpec = Field(default_factory=OutputSpec)
    provenance: dict[str, Any] | None = Field(
        None, description="Written by hubmerge into hubmerge_recipe.yaml: versions and time; informational"
    )

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
    """A safe YAML loader that refuses alias blow-ups ("billion laughs")."""

    aliases_seen = 0

    def compose_node(self, parent, index):  # noqa: D401
        if self.check_event(yaml.AliasEvent):
            self.aliases_seen += 1
            if self.aliases_seen > MAX_YAML_ALIASES:
                raise yaml.YAMLError(f"more than {MAX_YAML_ALIASES} YAML aliases; refusing to expand")
        return super().compose_node(parent, index)


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
        return yaml.load(text, Loader=_LimitedLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise RecipeError(f"malformed YAML{where}: {problem}", file=file) from None


def recipe_from_dict(data: Any, *, file: str | None = None) -> Recipe:
    """Validate a parsed document against schema v1.

    Args:
        data: The parsed YAML document.
        file: Name for error messages.

    Returns:
        The :class:`Recipe`.

    Raises:
        RecipeError: Naming the first field at fault.
    """
    if not isinstance(data, dict):
        raise RecipeError("a recipe must be a YAML mapping", file=file)
    if "hubmerge" not in data:
        raise RecipeError("missing schema version (add `hubmerge: 1`)", field="hubmerge", file=file)
    try:
        return Recipe.model_validate(data)
    except ValidationError as exc:
        raise_validation_error(exc, file=file)


def load_recipe(path: str | Path) -> Recipe:
    """Read and validate a recipe file (schema only; see :func:`check_recipe`).

    Args:
        path: The YAML file.

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
    return recipe_from_dict(parse_yaml(text, file=str(path)), file=str(path))


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
        raise RecipeError(str(exc), field="experts" if "experts" in str(exc) else "dtype", file=file) from None
    return method
