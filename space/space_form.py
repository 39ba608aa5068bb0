"""The Space's form logic, without Gradio: method schema -> widget specs, form -> recipe, errors in words.

Everything here is a small pure function over plain data so that the unit tests call it without a
browser:

- :func:`widget_specs` turns a method's ``Params`` JSON schema (``MergeMethod.describe()``) into
  :class:`WidgetSpec` records (number/slider with bounds, checkbox, dropdown, list and mapping
  text boxes), so a newly installed method plugin gets its form without touching the Space;
- :func:`build_recipe` turns the form's values into a recipe mapping for
  :func:`hubmerge.recipe.recipe_from_dict`, reporting what cannot even be written down
  (an unparsable list, an empty base) as :class:`FieldError`;
- :func:`explain` words a :class:`~hubmerge.errors.RecipeError` (``params.k``,
  ``experts[1].repo``) for someone who never saw the recipe format, and names the form field
  to highlight;
- :func:`form_from_recipe` fills the form from a recipe file (``recipes/*.yaml``).

Models are Hub repos only (``org/name`` or ``org/name@revision``, or a pasted
``https://huggingface.co/org/name`` link): a Space must never read its own disk on a visitor's
behalf, so the form writes ``{repo, revision}`` mappings and never the string form that
:class:`~hubmerge.recipe.ModelRef` would treat as a local directory.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

#: Widget kinds; the Gradio layer maps each to one component.
KINDS = (
    "slider",
    "number",
    "integer",
    "checkbox",
    "dropdown",
    "numbers",
    "strings",
    "mapping",
    "text",
    "yaml",
)
#: An integer range at most this wide becomes a slider.
MAX_INT_SLIDER_RANGE = 100
#: Keys of the non-parameter form fields, used to say which widget an error belongs to.
FORM_FIELDS = (
    "method",
    "base",
    "experts",
    "output_repo",
    "private",
    "description",
    "flexmerge_sizes",
    "dtype",
    "output_dtype",
)
DTYPE_CHOICES = ("float32", "bfloat16", "float16", "float64")
#: The output-precision dropdown: "" keeps the base model's dtype.
OUTPUT_DTYPE_CHOICES = ("", "float32", "bfloat16", "float16")
HUB_URL = re.compile(
    r"^https?://(?:www\.)?(?:huggingface\.co|hf\.co)/(?P<repo>[^/@\s]+/[^/@\s]+)"
    r"(?:/(?:tree|blob|resolve)/(?P<rev>[^/\s]+))?/?$"
)


# -- schema -> widgets ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class WidgetSpec:
    """One method parameter as a form widget.

    Attributes:
        name: The parameter's key in ``params``.
        label: What the form shows: the schema's title, with the start of the description when the
            title is a bare symbol (``K — Fraction of each task vector's entries kept``).
        title: The schema's title alone (``K``), for messages.
        kind: One of :data:`KINDS`.
        default: The value the widget starts with (already in the widget's representation:
            lists are comma-separated text, mappings are ``key: value`` text).
        schema_default: The parameter's default as the method sees it (``None``: no default given).
        has_default: Whether the schema gives a default (a value equal to it is left out of the recipe).
        info: Help text: the description, the bounds, the recipe key.
        minimum, maximum: Bounds (inclusive or exclusive, see ``info``), if any.
        step: Slider step.
        choices: Allowed values of a dropdown.
        optional: An empty widget means "use the method's default".
    """

    name: str
    label: str
    kind: str
    title: str = ""
    default: Any = None
    schema_default: Any = None
    has_default: bool = False
    info: str = ""
    minimum: float | None = None
    maximum: float | None = None
    step: float | None = None
    choices: tuple[Any, ...] | None = None
    optional: bool = True


def _resolve_ref(prop: dict[str, Any], defs: dict[str, Any]) -> dict[str, Any]:
    """Inline ``$ref`` / single-entry ``allOf`` (how pydantic writes enums and nested models)."""
    prop = dict(prop)
    for _ in range(8):  # bounded: refs can nest
        if "$ref" in prop:
            target = defs.get(prop.pop("$ref").rsplit("/", 1)[-1], {})
            prop = {**target, **prop}
        elif isinstance(prop.get("allOf"), list) and len(prop["allOf"]) == 1:
            inner = prop.pop("allOf")[0]
            prop = {**inner, **prop}
        else:
            break
    return prop


def _split_nullable(prop: dict[str, Any], defs: dict[str, Any]) -> tuple[dict[str, Any], bool]:
    """``anyOf: [X, null]`` -> (X, True); anything else -> (prop, False)."""
    variants = prop.get("anyOf") or prop.get("oneOf")
    if not isinstance(variants, list):
        types = prop.get("type")
        if isinstance(types, list) and "null" in types:
            rest = [t for t in types if t != "null"]
            return {**prop, "type": rest[0] if len(rest) == 1 else rest}, True
        return prop, False
    resolved = [_resolve_ref(v, defs) for v in variants]
    nullable = any(v.get("type") == "null" for v in resolved)
    rest = [v for v in resolved if v.get("type") != "null"]
    if len(rest) == 1:
        outer = {k: v for k, v in prop.items() if k not in ("anyOf", "oneOf")}
        return {**rest[0], **outer}, nullable
    return {**prop, "type": "mixed"}, nullable


def _fmt(value: float) -> str:
    if isinstance(value, (int, float)) and float(value).is_integer() and abs(value) >= 10_000:
        return f"{int(value):,}"
    return f"{value:g}"


def _bounds_text(schema: dict[str, Any]) -> str:
    """The bounds of a number in words: ``Between 0 and 1.``, ``Greater than 0 and at most 1.``"""
    low = [(schema[k], k.startswith("exclusive")) for k in ("minimum", "exclusiveMinimum") if k in schema]
    high = [(schema[k], k.startswith("exclusive")) for k in ("maximum", "exclusiveMaximum") if k in schema]
    low_text = (
        (f"greater than {_fmt(low[0][0])}" if low[0][1] else f"at least {_fmt(low[0][0])}") if low else ""
    )
    high_text = (
        (f"less than {_fmt(high[0][0])}" if high[0][1] else f"at most {_fmt(high[0][0])}") if high else ""
    )
    if low and high and not low[0][1] and not high[0][1]:
        return f"Between {_fmt(low[0][0])} and {_fmt(high[0][0])}."
    text = " and ".join(t for t in (low_text, high_text) if t)
    return text[:1].upper() + text[1:] + "." if text else ""


def _widget_text(value: Any, kind: str) -> Any:
    """A parameter value in the widget's representation."""
    if value is None:
        return None if kind in ("slider", "number", "integer") else ""
    if kind in ("numbers", "strings"):
        return (
            ", ".join(_fmt(v) if isinstance(v, float) else str(v) for v in value)
            if isinstance(value, list)
            else str(value)
        )
    if kind == "mapping":
        if isinstance(value, dict):
            return ", ".join(
                f"{k}: {json.dumps(v) if not isinstance(v, str) else v}" for k, v in value.items()
            )
        return str(value)
    if kind == "yaml":
        return yaml.safe_dump(value, default_flow_style=True).strip() if not isinstance(value, str) else value
    return value


def widget_spec(
    name: str, prop: dict[str, Any], *, required: bool = False, defs: dict[str, Any] | None = None
) -> WidgetSpec:
    """Turn one property of a ``Params`` JSON schema into a :class:`WidgetSpec`.

    Args:
        name: The parameter's key.
        prop: Its JSON schema.
        required: Whether the schema lists it as required.
        defs: The schema's ``$defs`` (for enums written as references).

    Returns:
        The widget spec.
    """
    defs = defs or {}
    prop = _resolve_ref(prop, defs)
    has_default = "default" in prop
    schema_default = prop.get("default")
    inner, nullable = _split_nullable(prop, defs)
    inner = _resolve_ref(inner, defs)
    kind_type = inner.get("type")
    minimum = inner.get("minimum", inner.get("exclusiveMinimum"))
    maximum = inner.get("maximum", inner.get("exclusiveMaximum"))
    choices = None
    step = None
    if "enum" in inner or "const" in inner:
        kind = "dropdown"
        choices = tuple(inner["enum"]) if "enum" in inner else (inner["const"],)
    elif kind_type == "boolean":
        kind = "checkbox"
    elif kind_type == "integer":
        bounded = minimum is not None and maximum is not None
        kind = "slider" if bounded and maximum - minimum <= MAX_INT_SLIDER_RANGE else "integer"
        step = 1 if kind == "slider" else None
    elif kind_type == "number":
        if minimum is not None and maximum is not None and math.isfinite(minimum) and math.isfinite(maximum):
            kind = "slider"
            span = maximum - minimum
            step = 0.01 if span <= 1 else span / 100
        else:
            kind = "number"
    elif kind_type == "array":
        items = _resolve_ref(inner.get("items") or {}, defs)
        kind = (
            "numbers"
            if items.get("type") in ("number", "integer")
            else "strings"
            if items.get("type") == "string" or "enum" in items
            else "yaml"
        )
    elif kind_type == "object":
        kind = "mapping"
    elif kind_type == "string":
        kind = "text"
    else:
        kind = "yaml"

    title = prop.get("title") or name.replace("_", " ").capitalize()
    label = title
    description = prop.get("description") or inner.get("description") or ""
    if len(name) <= 3 and description:  # `k`, `t`, `lr`: say what it is in the label itself
        plain = re.sub(r"\s*\([^)]*\)", "", description)  # asides in parentheses left out
        sentences = [x.split(";")[0].strip().rstrip(".") for x in re.split(r"\.\s", plain)]
        gist = next((x for x in sentences if len(x.split()) >= 3 and not x.endswith(" only")), "")
        if gist and len(gist) <= 70:
            label = f"{title} — {gist}"
    help_parts = [description]
    help_parts.append(_bounds_text(inner))
    if kind == "numbers":
        help_parts.append("Numbers separated by commas, e.g. 0.5, 0.5.")
    elif kind == "strings":
        help_parts.append("Values separated by commas.")
    elif kind == "mapping":
        help_parts.append("Write key: value pairs separated by commas, e.g. scale: 0.3, k: 0.2.")
    elif kind == "yaml":
        help_parts.append("Enter a value in YAML notation.")
    if (nullable or not has_default) and not required and kind not in ("checkbox", "dropdown"):
        help_parts.append("Leave empty for the method's default.")
    help_parts.append(f"Recipe key: {name}.")
    default_value = schema_default
    if kind == "dropdown" and default_value is None and choices:
        default_value = choices[0]
    if kind == "checkbox" and default_value is None:
        default_value = False
    return WidgetSpec(
        name=name,
        label=label,
        title=title,
        kind=kind,
        default=_widget_text(default_value, kind),
        schema_default=schema_default,
        has_default=has_default,
        info=" ".join(p for p in help_parts if p).strip(),
        minimum=minimum,
        maximum=maximum,
        step=step,
        choices=choices,
        optional=not required,
    )


def widget_specs(schema: dict[str, Any]) -> list[WidgetSpec]:
    """All of a method's parameters as widget specs, in the schema's order.

    Args:
        schema: ``MergeMethod.describe()["params_schema"]`` (a pydantic JSON schema).

    Returns:
        One :class:`WidgetSpec` per property.
    """
    defs = schema.get("$defs") or schema.get("definitions") or {}
    required = set(schema.get("required") or [])
    return [
        widget_spec(name, prop, required=name in required, defs=defs)
        for name, prop in (schema.get("properties") or {}).items()
    ]


@dataclass(frozen=True)
class MethodInfo:
    """What the form shows about a method (from the plugin registry)."""

    name: str
    summary: str
    paper: str | None
    min_experts: int
    max_experts: int | None
    output: str
    distribution: str
    params: tuple[WidgetSpec, ...]

    @property
    def experts_text(self) -> str:
        """``exactly 2``, ``at least 1``, ``2 to 4``."""
        if self.max_experts is not None and self.max_experts == self.min_experts:
            return f"exactly {self.min_experts}"
        if self.max_experts is not None:
            return f"{self.min_experts} to {self.max_experts}"
        return f"at least {self.min_experts}"

    def markdown(self) -> str:
        """The method's description for the form (summary, paper link, experts needed)."""
        paper = self.paper or ""
        url = re.search(r"https?://\S+", paper)
        if url:
            title = paper[: url.start()].rstrip(" ,;")
            paper = f"[{title or url.group(0)}]({url.group(0).rstrip('.,;)')})"
        lines = [f"**{self.name}** — {self.summary}"]
        if paper:
            lines.append(f"Paper: {paper}")
        plural = "" if self.experts_text in ("at least 1", "exactly 1") else "s"
        lines.append(f"Needs {self.experts_text} expert{plural}. Plugin: {self.distribution}.")
        if self.output != "model":
            lines.append(
                "This method produces per-task deployments; run it with the `hubmerge` command line."
            )
        return "  \n".join(lines)


def method_infos(registered: dict[str, Any]) -> dict[str, MethodInfo]:
    """Describe every registered method for the form (not those that need the recipe's ``data:``).

    Args:
        registered: :func:`hubmerge.plugins.registered_methods` (name -> RegisteredMethod).

    Returns:
        Name to :class:`MethodInfo`, in the registry's order.
    """
    out = {}
    for name, reg in registered.items():
        described = reg.method.describe()
        if described.get("needs_data"):  # learns from samples (AdaMerging): the form has no `data:` field
            continue
        out[name] = MethodInfo(
            name=name,
            summary=described.get("summary") or "",
            paper=described.get("paper"),
            min_experts=described.get("min_experts") or 1,
            max_experts=described.get("max_experts"),
            output=described.get("output") or "model",
            distribution=getattr(reg, "distribution", "?"),
            params=tuple(widget_specs(described.get("params_schema") or {})),
        )
    return out


# -- errors --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class FieldError:
    """A problem with one form field, worded for people.

    Attributes:
        field: The recipe field path (``params.k``, ``experts[1].repo``) or ``None``.
        message: The sentence to show.
        target: The form widget to highlight: a key of :data:`FORM_FIELDS`, ``param:<name>``, or ``None``.
    """

    field: str | None
    message: str
    target: str | None = None


_REASONS = [
    (re.compile(r"^Input should be a valid number.*"), "must be a number"),
    (re.compile(r"^Input should be a valid integer.*"), "must be a whole number"),
    (re.compile(r"^Input should be a valid boolean.*"), "must be yes or no (true/false)"),
    (re.compile(r"^Input should be a valid list.*"), "must be a list of values separated by commas"),
    (re.compile(r"^Input should be a valid dictionary.*"), "must be key: value pairs"),
    (re.compile(r"^Input should be (?:'([^']*)'(?:, | or )?)+$"), None),  # enums: keep, reworded below
    (re.compile(r"^Input should be (.*)$"), r"must be \1"),
    (re.compile(r"^Field required$"), "is required"),
    (re.compile(r"^unknown field$"), "is not a parameter of this method"),
    (re.compile(r"^List should have at least (\d+) items?.*"), r"needs at least \1 entry"),
    (re.compile(r"^String should match pattern .*"), "may only use letters, digits, '.', '_' and '-'"),
]


def plain_reason(reason: str) -> str:
    """Reword a validation message (pydantic's or hubmerge's) for someone who does not code."""
    reason = reason.strip()
    for pattern, replacement in _REASONS:
        match = pattern.match(reason)
        if match:
            if replacement is None:
                return "must be one of " + reason.removeprefix("Input should be ")
            return match.expand(replacement)
    bad_repo = re.match(r"^not a valid Hub repo id: '(.*)'$", reason)
    if bad_repo:
        return (
            f"“{bad_repo.group(1)}” is not a Hub repo id; write it as organisation/name, "
            "e.g. google-bert/bert-base-uncased (add @revision to pin a branch, tag or commit)"
        )
    bad_rev = re.match(r"^not a valid revision: '(.*)'$", reason)
    if bad_rev:
        return f"“{bad_rev.group(1)}” is not a valid revision (a branch, tag or commit hash)"
    return reason


def field_label(
    path: str | None, params: dict[str, WidgetSpec] | None = None, expert_lines: list[int] | None = None
) -> tuple[str, str | None]:
    """Name a recipe field the way the form does, and say which widget holds it.

    Args:
        path: A recipe field path (``params.k``, ``experts[1].repo``, ``output.repo``).
        params: The method's widget specs by name (for parameter titles).
        expert_lines: For each expert, its line in the experts box (1-based).

    Returns:
        ``(label, target)``: e.g. ``("Parameter “K”", "param:k")``.
    """
    params = params or {}
    if not path:
        return "The recipe", None
    match = re.match(r"^params\.([A-Za-z_][A-Za-z0-9_]*)", path)
    if match:
        spec = params.get(match.group(1))
        title = (spec.title or spec.label) if spec else match.group(1)
        return f"Parameter “{title}”", f"param:{match.group(1)}"
    if path == "params":
        return "The parameters", None
    match = re.match(r"^experts\[(\d+)\]", path)
    if match:
        index = int(match.group(1))
        line = expert_lines[index] if expert_lines and index < len(expert_lines) else index + 1
        return f"Expert {index + 1} (line {line} of the experts box)", "experts"
    if path.startswith("experts"):
        return "Experts", "experts"
    if path.startswith("base"):
        return "Base model", "base"
    if path.startswith("flexmerge"):
        return "FlexMerge sizes", "flexmerge_sizes"
    table = {
        "method": ("Merge method", "method"),
        "name": ("Output repo name", "output_repo"),
        "output.repo": ("Output repo", "output_repo"),
        "output.private": ("Private", "private"),
        "output.dtype": ("Output precision", "output_dtype"),
        "dtype": ("Compute precision", "dtype"),
        "description": ("Description", "description"),
        "device": ("Device", None),
        "output.path": ("Output folder", None),
    }
    return table.get(path, (path, None))


def explain(
    error: Any, params: dict[str, WidgetSpec] | None = None, expert_lines: list[int] | None = None
) -> FieldError:
    """Word a :class:`~hubmerge.errors.RecipeError` (or any error with ``field``/``reason``) for the form.

    Args:
        error: The error; ``field`` and ``reason`` are used when present, else ``str(error)``.
        params: The method's widget specs by name.
        expert_lines: Line numbers of the experts in the experts box.

    Returns:
        A :class:`FieldError` whose message names the form field and the recipe field.
    """
    path = getattr(error, "field", None)
    reason = getattr(error, "reason", None) or str(error)
    label, target = field_label(path, params, expert_lines)
    where = f" (recipe field `{path}`)" if path else ""
    return FieldError(path, f"{label}: {plain_reason(reason)}{where}.".replace("..", "."), target)


# -- form <-> recipe ----------------------------------------------------------------------------------------
@dataclass
class FormValues:
    """The values of the Space's form (everything but the token).

    Attributes:
        method: The method name.
        params: Widget values by parameter name (as the widgets hold them).
        base: ``org/name`` or ``org/name@revision``.
        experts: One reference per line (commas also separate).
        output_repo: ``org/name`` or just ``name`` (then the token owner's namespace).
        private: Create the output repo private.
        description: Shown at the top of the model card.
        flexmerge_sizes: ``all`` or sizes separated by commas; empty for one merged model.
        dtype: Compute dtype.
        output_dtype: Output dtype; empty keeps the base's.
    """

    method: str
    params: dict[str, Any] = field(default_factory=dict)
    base: str = ""
    experts: str = ""
    output_repo: str = ""
    private: bool = False
    description: str = ""
    flexmerge_sizes: str = ""
    dtype: str = "float32"
    output_dtype: str = ""


@dataclass
class BuiltRecipe:
    """What :func:`build_recipe` produced: the recipe mapping and the problems found on the way.

    Attributes:
        data: The recipe as a mapping (for ``recipe_from_dict``).
        errors: Problems that stop the recipe from being written down properly.
        expert_lines: The experts box line of each expert (1-based), for error messages.
    """

    data: dict[str, Any]
    errors: list[FieldError] = field(default_factory=list)
    expert_lines: list[int] = field(default_factory=list)


def parse_model_ref(text: str) -> dict[str, Any]:
    """``org/name@rev`` (or a Hub URL) -> ``{"repo": ..., "revision": ...}``; never a local path.

    Args:
        text: What the user typed.

    Returns:
        A mapping for :class:`~hubmerge.recipe.ModelRef` (validated there).
    """
    text = text.strip()
    url = HUB_URL.match(text)
    if url:
        ref: dict[str, Any] = {"repo": url.group("repo")}
        if url.group("rev"):
            ref["revision"] = url.group("rev")
        return ref
    repo, sep, revision = text.partition("@")
    ref = {"repo": repo.strip()}
    if sep:
        ref["revision"] = revision.strip()
    return ref


def format_model_ref(ref: Any) -> tuple[str, str | None]:
    """A recipe's model reference as the form writes it, plus a warning if it cannot be used.

    Args:
        ref: A string or mapping from a recipe.

    Returns:
        ``(text, warning)``; local directories give ``("", "…")``.
    """
    if isinstance(ref, str):
        if ref.startswith((".", "/", "~")) or Path(ref).expanduser().is_dir():
            return "", f"“{ref}” is a local folder; the Space reads models from the Hub only"
        return ref, None
    if isinstance(ref, dict):
        if ref.get("path"):
            return "", f"“{ref['path']}” is a local folder; the Space reads models from the Hub only"
        if ref.get("repo"):
            rev = ref.get("revision")
            return ref["repo"] + (f"@{rev}" if rev else ""), None
    return "", f"cannot read the model reference {ref!r}"


def _split_items(text: str) -> list[str]:
    text = text.strip()
    if text.startswith("[") and text.endswith("]"):
        text = text[1:-1]
    return [item.strip() for item in re.split(r"[,;\s]+", text) if item.strip()]


def _number(item: str) -> Any:
    try:
        value = float(item)
    except ValueError:
        return item  # left as text: validation names it
    return int(value) if value.is_integer() and re.fullmatch(r"[+-]?\d+", item) else value


def parse_mapping(text: str) -> dict[str, Any]:
    """``scale: 0.3, k: 0.2`` (or ``{scale: 0.3}``, or YAML over several lines) -> a mapping.

    Raises:
        ValueError: If the text is not a mapping.
    """
    from hubmerge.recipe import parse_yaml

    text = text.strip()
    if not text:
        return {}
    candidates = [text] if text.startswith("{") or "\n" in text else ["{" + text + "}", text]
    for candidate in candidates:
        try:
            value = parse_yaml(candidate)
        except ValueError:
            continue
        if isinstance(value, dict) and all(
            isinstance(k, str) and re.fullmatch(r"[A-Za-z_][\w.-]*", k) for k in value
        ):
            return value
    raise ValueError("write key: value pairs separated by commas, e.g. scale: 0.3, k: 0.2")


def param_value(spec: WidgetSpec, value: Any) -> tuple[bool, Any]:
    """Turn a widget's value into the parameter's value.

    Args:
        spec: The widget spec.
        value: What the widget holds.

    Returns:
        ``(present, value)``; ``present`` is False when the widget is empty (the method's
        default then applies).

    Raises:
        ValueError: If a mapping or YAML box cannot be parsed.
    """
    if spec.kind in ("slider", "number", "integer"):
        if value is None or (isinstance(value, str) and not value.strip()):
            return False, None
        if isinstance(value, str):
            return True, _number(value.strip())
        whole = spec.kind == "integer" or (spec.kind == "slider" and spec.step == 1)
        if whole and isinstance(value, float) and value.is_integer():
            value = int(value)
        return True, value
    if spec.kind == "checkbox":
        return True, bool(value)
    if spec.kind == "dropdown":
        if value is None or value == "":
            return False, None
        for choice in spec.choices or ():
            if str(choice) == str(value):
                return True, choice
        return True, value
    text = "" if value is None else str(value)
    if not text.strip():
        return False, None
    if spec.kind == "numbers":
        return True, [_number(item) for item in _split_items(text)]
    if spec.kind == "strings":
        return True, _split_items(text) if "," in text or text.strip().startswith("[") else [text.strip()]
    if spec.kind == "mapping":
        return True, parse_mapping(text)
    if spec.kind == "yaml":
        from hubmerge.recipe import parse_yaml

        return True, parse_yaml(text)
    return True, text


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return math.isclose(float(a), float(b), rel_tol=1e-12, abs_tol=0.0)
    return a == b


def build_params(
    specs: list[WidgetSpec] | tuple[WidgetSpec, ...], values: dict[str, Any]
) -> tuple[dict[str, Any], list[FieldError]]:
    """The ``params`` mapping from the widgets' values; values equal to the default are left out.

    Args:
        specs: The method's widget specs.
        values: Widget values by parameter name (missing names keep their default).

    Returns:
        ``(params, errors)``.
    """
    params: dict[str, Any] = {}
    errors: list[FieldError] = []
    by_name = {s.name: s for s in specs}
    for spec in specs:
        if spec.name not in values:
            continue
        try:
            present, value = param_value(spec, values[spec.name])
        except ValueError as exc:
            errors.append(
                explain(_Reason(f"params.{spec.name}", getattr(exc, "reason", None) or str(exc)), by_name)
            )
            continue
        if not present:
            continue
        if spec.has_default and _same(value, spec.schema_default):
            continue
        params[spec.name] = value
    return params, errors


@dataclass
class _Reason:
    field: str
    reason: str

    def __str__(self) -> str:
        return self.reason


def parse_experts(text: str) -> tuple[list[dict[str, Any]], list[int]]:
    """The experts box: one reference per line (commas also separate; ``#`` starts a comment).

    Returns:
        ``(refs, lines)``: the model-reference mappings and each one's line number (1-based).
        Experts whose labels (repo names) collide get ``name: org-name``.
    """
    refs: list[dict[str, Any]] = []
    lines: list[int] = []
    for number, line in enumerate((text or "").splitlines(), 1):
        line = line.split("#", 1)[0]
        for item in line.split(","):
            if item.strip():
                refs.append(parse_model_ref(item))
                lines.append(number)
    labels = [str(r.get("repo", "")).rsplit("/", 1)[-1] for r in refs]
    for ref, label in zip(refs, labels):
        if labels.count(label) > 1 and "/" in str(ref.get("repo", "")):
            ref["name"] = str(ref["repo"]).replace("/", "-")
    return refs, lines


def parse_sizes(text: str) -> str | list[Any] | None:
    """The FlexMerge sizes box: empty -> ``None``, ``all`` -> ``"all"``, else a list of sizes."""
    text = (text or "").strip()
    if not text:
        return None
    if text.lower() == "all":
        return "all"
    return [_number(item) if re.fullmatch(r"[+-]?\d+", item) else item for item in _split_items(text)]


def recipe_name(output_repo: str, method: str) -> str:
    """The recipe's ``name``: the output repo's name, else ``<method>-merge``."""
    name = (output_repo or "").strip().rstrip("/").rsplit("/", 1)[-1]
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-._")
    return name or f"{method.replace('_', '-')}-merge"


def build_recipe(form: FormValues, specs: list[WidgetSpec] | tuple[WidgetSpec, ...]) -> BuiltRecipe:
    """The recipe mapping the form describes (validate it with ``recipe_from_dict`` + ``check_recipe``).

    Args:
        form: The form's values.
        specs: The chosen method's widget specs.

    Returns:
        A :class:`BuiltRecipe`; its ``errors`` list what could not be written down (empty base,
        no experts, an unparsable list or mapping).
    """
    params, param_errors = build_params(specs, form.params)
    experts, lines = parse_experts(form.experts)
    errors: list[FieldError] = []
    data: dict[str, Any] = {"hubmerge": 1, "name": recipe_name(form.output_repo, form.method)}
    if form.description and form.description.strip():
        data["description"] = form.description.strip()
    if not (form.base or "").strip():
        errors.append(
            FieldError(
                "base",
                "Base model: enter the Hub repo of the model the experts were "
                "fine-tuned from, e.g. google-bert/bert-base-uncased.",
                "base",
            )
        )
    data["base"] = parse_model_ref(form.base or "")
    if not experts:
        errors.append(
            FieldError("experts", "Experts: enter at least one model repo, one per line.", "experts")
        )
    data["experts"] = experts
    data["method"] = form.method
    data["params"] = params
    sizes = parse_sizes(form.flexmerge_sizes)
    if sizes is not None:  # FlexMerge: the chosen method merges inside each group
        data["flexmerge"] = {"sizes": sizes, "inner": form.method}
        if params:
            data["flexmerge"]["inner_params"] = dict(params)
    if form.dtype and form.dtype != "float32":
        data["dtype"] = form.dtype
    output: dict[str, Any] = {"path": f"out/{data['name']}"}
    if form.output_repo and form.output_repo.strip():
        output["repo"] = form.output_repo.strip()
    if form.private:
        output["private"] = True
    if form.output_dtype:
        output["dtype"] = form.output_dtype
    data["output"] = output
    return BuiltRecipe(data, errors + param_errors, lines)


def form_from_recipe(data: Any, methods: dict[str, MethodInfo]) -> tuple[FormValues, list[str]]:
    """Fill the form from a recipe mapping (a file in ``recipes/``), leniently.

    Args:
        data: The parsed recipe.
        methods: The installed methods (for the parameters' widget representation).

    Returns:
        ``(form, warnings)``: what could not be carried over is said in ``warnings``.
    """
    warnings: list[str] = []
    if not isinstance(data, dict):
        raise ValueError("a recipe must be a YAML mapping")  # noqa: TRY004 - shown like any malformed recipe
    flex = data.get("flexmerge") or {}
    method = str(data.get("method") or "")
    raw_params = data.get("params") or {}
    if isinstance(flex, dict) and flex.get("inner"):  # the form's method is FlexMerge's inner method
        method, raw_params = str(flex["inner"]), flex.get("inner_params") or raw_params
    if method not in methods:
        warnings.append(
            f"method “{method}” is not installed here; pick another one"
            if method
            else "the recipe names no method"
        )
        method = next(iter(methods), "")
    specs = {s.name: s for s in methods[method].params} if method in methods else {}
    params: dict[str, Any] = {}
    for key, value in (raw_params if isinstance(raw_params, dict) else {}).items():
        spec = specs.get(key)
        if spec is None:
            warnings.append(f"parameter “{key}” is not a parameter of {method}; left out")
            continue
        params[key] = _widget_text(value, spec.kind)
    base, warning = format_model_ref(data.get("base"))
    if warning:
        warnings.append("base: " + warning)
    expert_lines = []
    for i, ref in enumerate(data.get("experts") or []):
        text, warning = format_model_ref(ref)
        if warning:
            warnings.append(f"expert {i + 1}: {warning}")
        elif text:
            expert_lines.append(text)
    output = data.get("output") or {}
    sizes = flex.get("sizes", "") if isinstance(flex, dict) else ""
    if isinstance(flex, dict) and set(flex) - {"sizes", "inner", "inner_params"}:
        warnings.append("FlexMerge settings other than the sizes are not in the form; the defaults apply")
    form = FormValues(
        method=method,
        params=params,
        base=base,
        experts="\n".join(expert_lines),
        output_repo=str(output.get("repo") or ""),
        private=bool(output.get("private", False)),
        description=str(data.get("description") or ""),
        flexmerge_sizes=", ".join(str(s) for s in sizes) if isinstance(sizes, list) else str(sizes or ""),
        dtype=str(data.get("dtype") or "float32"),
        output_dtype=str(output.get("dtype") or ""),
    )
    return form, warnings


def list_recipe_files(directory: Path | None) -> list[Path]:
    """The YAML recipes in ``directory`` (recursively), sorted; none if it does not exist."""
    if directory is None or not directory.is_dir():
        return []
    return sorted(p for p in directory.rglob("*") if p.suffix in (".yaml", ".yml") and p.is_file())
