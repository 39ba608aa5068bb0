"""Translate mergekit configurations (``mergekit_config.yml``) into hubmerge recipes.

The methods both tools share are translated into a recipe with equivalent parameters; anything
hubmerge's methods cannot express is refused with the mergekit field at fault, and other
methods are refused by name ("mergekit method 'della' has no hubmerge equivalent yet").

mergekit resolves a parameter per model, then per slice, then from the top-level
``parameters`` (per-model ``weight``/``density`` fall back to top-level ones). Only plain
numbers map: per-layer gradients (``t: [0, 0.5, 1]``) and tensor ``filter`` conditions have no
hubmerge equivalent. ``τᵢ = θᵢ − θ_base``; ``wᵢ``/``dᵢ`` are the per-model weight/density.

Per method (mergekit computes per tensor; hubmerge recipe on the right of the arrow):

* ``linear``: Σ wᵢθᵢ / Σ wᵢ over ``models`` (plus ``base_model`` when it is given and not
  listed) → ``linear`` with ``weights: [wᵢ]`` and ``normalize``; base = ``base_model`` or the
  first model, every model an expert.
* ``task_arithmetic``: θ₀ + λ·Σ wᵢτᵢ / D, D = Σ wᵢ when ``normalize`` (default false) else 1
  → ``task_arithmetic`` with ``weights: [wᵢ]`` and ``scale: λ/D``.
* ``ties``: θ₀ + λ·Σ wᵢmᵢτᵢ' / Σ wᵢmᵢ, τᵢ' the top-dᵢ magnitudes of τᵢ in the tensor, mᵢ where
  the sign agrees with Σ wᵢτᵢ' → ``ties`` with ``k: d``, ``scale: λ``, ``scope: tensor``. Needs one
  density and one positive weight for every model, ``normalize: true`` (the default) and
  ``rescale: false`` (the default).
* ``dare_ties``: as ties with τᵢ' a Bernoulli(dᵢ) drop, rescaled (``rescale``, default true) →
  ``dare`` with ``combine: ties``, ``k: 1``, ``density: d``, ``scale: λ`` (λ·d when
  ``rescale: false``). Needs ``normalize: true`` (mergekit's default false sums the agreeing
  entries), one density, one positive weight.
* ``dare_linear``: θ₀ + λ·Σ wᵢτᵢ' / D → ``dare`` with ``combine: task_arithmetic``,
  ``density: d``, ``scale: λ·w/D`` (times d when ``rescale: false``). One density, one weight.
* ``slerp``: slerp(t, θ_base, θ_other) → ``slerp`` with ``t``, experts ``[base_model, other]``
  and base = ``base_model``.

``dtype`` becomes the recipe's compute ``dtype`` and, unless ``out_dtype`` is given, ``output.dtype``
(mergekit writes in ``dtype``). ``tokenizer_source`` may be absent or ``base`` (hubmerge copies the
base's tokenizer). ``slices`` are accepted only as one slice whose sources each cover every layer
(what mergekit makes of ``models:``); ``modules``, ``tokenizer``, ``chat_template``, LoRA
references (``model+lora``) and ``residual_weight`` are refused.

Semantic differences that remain (also listed in each import's ``notes``):

* **ties trim**: mergekit keeps ``int(d·n)`` entries per tensor by ``argsort`` (ties between equal
  magnitudes broken arbitrarily, and it fails on a tensor where that is 0); hubmerge keeps
  ``round_half_up(k·n)`` (at least one) and every entry tying with the threshold. They differ by one
  entry in tensors where ``d·n`` has a fractional part of one half or more.
* **sign election** on an exact zero sum: mergekit elects ``+``, hubmerge elects nothing (zero).
* **DARE rescaling**: hubmerge divides the kept entries by ``d`` (the paper); mergekit's current
  ``rescale: true`` rescales each tensor to its original L1 norm (older versions divided by ``d``).
  The random masks differ in any case (hubmerge seeds per tensor name), so DARE imports agree in
  distribution, never bit for bit.
* **int8_mask** only changes the dtype of mergekit's sign mask, not the result: ignored.
* **lambda** is folded into ``scale`` as shown; ``normalize`` of ties/dare_ties must be true
  because hubmerge's TIES always takes the disjoint *mean* (mergekit's ``normalize: false`` sums).
* **slerp** numerics: mergekit normalises in float32 (numpy); hubmerge accumulates the dot
  product and norms in float64: results agree to float32 rounding.
* **linear/task_arithmetic** compute ``θ₀ + Σ cᵢτᵢ`` rather than ``Σ wᵢθᵢ``: equal up to rounding.
* Without ``dtype`` mergekit computes in each tensor's stored dtype; hubmerge computes in float32
  and writes the base's dtype.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from .errors import HubmergeError, RecipeError
from .recipe import ModelRef, Recipe, parse_yaml, recipe_from_dict

#: mergekit methods with a hubmerge equivalent.
SHARED_METHODS = ("linear", "task_arithmetic", "ties", "dare_ties", "dare_linear", "slerp")
#: File names mergekit writes beside a merge.
CONFIG_FILES = ("mergekit_config.yml", "mergekit_config.yaml")
#: mergekit dtype names -> hubmerge dtype names.
DTYPES = {"float32": "float32", "float16": "float16", "bfloat16": "bfloat16", "fp32": "float32",
          "fp16": "float16", "bf16": "bfloat16", "torch.float32": "float32", "torch.float16": "float16",
          "torch.bfloat16": "bfloat16"}
_GTA = ("task_arithmetic", "ties", "dare_ties", "dare_linear")
_GTA_TOP = {"int8_mask", "normalize", "rescale", "lambda", "weight", "density"}
#: Parameters each method reads: (top-level/slice ones, per-model ones).
PARAMETERS: dict[str, tuple[set[str], set[str]]] = {
    "linear": ({"normalize", "weight"}, {"weight"}),
    "slerp": ({"t"}, set()),
    **{m: (_GTA_TOP, {"weight", "density"}) for m in _GTA},
}
#: mergekit's defaults of ``normalize`` and ``rescale`` per method.
DEFAULTS = {"linear": (True, False), "task_arithmetic": (False, False), "ties": (True, False),
            "dare_ties": (False, True), "dare_linear": (False, True)}
TOP_LEVEL = {"merge_method", "base_model", "models", "slices", "parameters", "dtype", "out_dtype",
             "tokenizer_source", "modules", "tokenizer", "chat_template"}
_MISSING = object()
LayerCount = Callable[[str, "str | None"], "int | None"]


class MergekitImportError(RecipeError):
    """A mergekit configuration cannot be expressed as a hubmerge recipe (``field``: the mergekit field)."""


@dataclass
class MergekitImport:
    """A translated configuration.

    Attributes:
        document: The hubmerge recipe as a mapping (schema v1).
        notes: The semantic differences that apply to this configuration.
        method: The mergekit method it came from.
    """

    document: dict[str, Any]
    notes: list[str] = field(default_factory=list)
    method: str = ""

    def recipe(self) -> Recipe:
        """The document validated as a :class:`~hubmerge.recipe.Recipe`."""
        return recipe_from_dict(self.document)

    def to_yaml(self, source: str | None = None) -> str:
        """The recipe as YAML, headed by comments with the source and the notes."""
        head = [f"# Translated from mergekit ({self.method})" + (f": {source}" if source else "")
                + " by `hubmerge import-mergekit`."]
        head += [f"# note: {line}" for note in self.notes for line in _wrap(note)]
        return "\n".join(head) + "\n" + yaml.safe_dump(self.document, sort_keys=False, allow_unicode=True)


def _wrap(text: str, width: int = 100) -> list[str]:
    lines, line = [], ""
    for word in text.split():
        if line and len(line) + 1 + len(word) > width:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}" if line else word
    return [*lines, line] if line else lines


@dataclass
class _Input:
    path: str
    revision: str | None
    params: dict[str, Any]
    field: str  # mergekit field of this model, e.g. "models[1]"

    @property
    def key(self) -> tuple[str, str | None]:
        return self.path, self.revision

    @property
    def label(self) -> str:
        return self.path + (f"@{self.revision}" if self.revision else "")


def default_layer_count(path: str, revision: str | None) -> int | None:
    """Number of layers of a model from its ``config.json`` (local directory or Hub repo).

    Args:
        path: Local directory or Hub repo id.
        revision: Hub revision, if any.

    Returns:
        ``num_hidden_layers`` (or ``n_layer``/``num_layers``/``n_layers``), or ``None`` if unknown.
    """
    local = Path(path).expanduser()
    try:
        if local.is_dir():
            config = json.loads((local / "config.json").read_text())
        else:
            from .hub import download_file

            config = json.loads(download_file(path, "config.json", revision=revision).read_text())
    except (OSError, ValueError, HubmergeError):
        return None
    for key in ("num_hidden_layers", "n_layer", "num_layers", "n_layers"):
        if isinstance(config.get(key), int):
            return config[key]
    return None


_NO_LORA = "has no hubmerge equivalent; list the adapter as an expert of its own instead"


class _Translator:
    def __init__(self, config: dict[str, Any], file: str | None, layer_count: LayerCount):
        self.config = config
        self.file = file
        self.layer_count = layer_count
        self.method = ""
        self.slice_params: dict[str, Any] = {}
        self.notes: list[str] = []
        self.target = ""  # the hubmerge method being targeted, for messages

    def fail(self, message: str, field_name: str | None) -> MergekitImportError:
        return MergekitImportError(message, field=field_name, file=self.file)

    # -- references ----------------------------------------------------------------------------------------
    def model(self, value: Any, where: str, params: Any = None) -> _Input:
        if isinstance(value, dict):
            if value.get("lora"):
                raise self.fail(f"a LoRA applied to the model (model+lora) {_NO_LORA}", f"{where}.lora")
            if value.get("override_architecture"):
                raise self.fail("override_architecture has no hubmerge equivalent",
                                f"{where}.override_architecture")
            value = value.get("model")
            if isinstance(value, dict):
                path, revision = value.get("path"), value.get("revision")
                if not isinstance(path, str):
                    raise self.fail("expected a model path", f"{where}.path")
                return self._checked(_Input(path, revision, {}, where), params)
        if not isinstance(value, str) or not value.strip():
            raise self.fail("expected a model reference (repo id[@revision] or local path)", where)
        if "+" in value:
            raise self.fail(f"{value!r} applies a LoRA to the model (model+lora), which {_NO_LORA}", where)
        if value.count("@") > 1:
            raise self.fail(f"{value!r}: more than one '@'", where)
        path, _, revision = value.strip().partition("@")
        return self._checked(_Input(path, revision or None, {}, where), params)

    def _checked(self, inp: _Input, params: Any) -> _Input:
        if params is not None and not isinstance(params, dict):
            raise self.fail("expected a mapping of parameters", f"{inp.field}.parameters")
        inp.params = dict(params or {})
        try:
            ModelRef.model_validate(self.ref(inp))
        except ValidationError as exc:  # a path that is neither a directory nor a repo id
            detail = exc.errors()[0]["msg"].removeprefix("Value error, ")
            raise self.fail(f"{inp.label}: {detail} (and no such local directory)", inp.field) from None
        return inp

    @staticmethod
    def ref(inp: _Input) -> dict[str, Any]:
        if Path(inp.path).expanduser().is_dir() and not inp.revision:
            return {"path": inp.path}
        return {"repo": inp.path, **({"revision": inp.revision} if inp.revision else {})}

    def inputs(self) -> tuple[list[_Input], _Input | None]:
        cfg = self.config
        base = self.model(cfg["base_model"], "base_model") if cfg.get("base_model") is not None else None
        if cfg.get("models") and cfg.get("slices"):
            raise self.fail("give either models or slices, not both", "slices")
        inputs: list[_Input] = []
        if cfg.get("models"):
            if not isinstance(cfg["models"], list):
                raise self.fail("expected a list", "models")
            for i, entry in enumerate(cfg["models"]):
                if not isinstance(entry, dict) or "model" not in entry:
                    raise self.fail("expected a mapping with `model`", f"models[{i}]")
                extra = set(entry) - {"model", "parameters"}
                if extra:
                    raise self.fail(f"unknown field {min(extra)!r}", f"models[{i}]")
                inputs.append(self.model(entry["model"], f"models[{i}].model", entry.get("parameters")))
                inputs[-1].field = f"models[{i}]"
        elif cfg.get("slices"):
            base = self._slices(cfg["slices"], inputs, base)
        else:
            raise self.fail("no models to merge (give models or slices)", "models")
        seen: dict[tuple, str] = {}
        for inp in inputs:
            if inp.key in seen:
                raise self.fail(f"{inp.label} is listed twice (also at {seen[inp.key]})", inp.field)
            seen[inp.key] = inp.field
        return inputs, base

    def _slices(self, slices: Any, inputs: list[_Input], base: _Input | None) -> _Input | None:
        if not isinstance(slices, list) or len(slices) != 1:
            raise self.fail("hubmerge merges whole models: only one slice, covering every layer of each "
                            "model, has an equivalent (layer stacking and frankenmerges have none)", "slices")
        piece = slices[0]
        if not isinstance(piece, dict) or not isinstance(piece.get("sources"), list) or not piece["sources"]:
            raise self.fail("expected a mapping with a list of sources", "slices[0]")
        extra = set(piece) - {"sources", "base_model", "parameters", "residual_weight"}
        if extra:
            raise self.fail(f"unknown field {min(extra)!r}", "slices[0]")
        if piece.get("residual_weight") is not None:
            raise self.fail("residual_weight has no hubmerge equivalent", "slices[0].residual_weight")
        if piece.get("base_model") is not None:
            base = self.model(piece["base_model"], "slices[0].base_model")
        self.slice_params = dict(piece.get("parameters") or {})
        for j, src in enumerate(piece["sources"]):
            where = f"slices[0].sources[{j}]"
            if not isinstance(src, dict) or "model" not in src:
                raise self.fail("expected a mapping with `model` and `layer_range`", where)
            extra = set(src) - {"model", "layer_range", "parameters"}
            if extra:
                raise self.fail(f"unknown field {min(extra)!r}", where)
            inp = self.model(src["model"], f"{where}.model", src.get("parameters"))
            inp.field = where
            layers = src.get("layer_range")
            if not (isinstance(layers, (list, tuple)) and len(layers) == 2
                    and all(isinstance(x, int) for x in layers)):
                raise self.fail("expected [start, end]", f"{where}.layer_range")
            count = self.layer_count(inp.path, inp.revision)
            if count is None:
                raise self.fail(f"cannot tell how many layers {inp.label} has (no readable config.json), "
                                "so cannot check that the slice covers the whole model; rewrite it with "
                                "`models:`", f"{where}.layer_range")
            if list(layers) != [0, count]:
                raise self.fail(f"{list(layers)} does not cover every layer of {inp.label} ([0, {count}]); "
                                "hubmerge merges whole models", f"{where}.layer_range")
            inputs.append(inp)
        return base

    # -- parameters ----------------------------------------------------------------------------------------
    def scalar(self, value: Any, where: str) -> Any:
        if isinstance(value, dict) and set(value) <= {"value", "filter"} \
                and value.get("filter") in (None, "*"):
            return self.scalar(value.get("value"), where)
        if isinstance(value, list):
            if len(value) == 1 and isinstance(value[0], dict):
                return self.scalar(value[0], where)
            if value and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value) \
                    and len(set(value)) == 1:
                return value[0]  # a constant "gradient"
            raise self.fail("per-layer gradients and tensor filters have no hubmerge equivalent; "
                            "give one value", where)
        if isinstance(value, bool) or (isinstance(value, (int, float)) and math.isfinite(value)):
            return value
        raise self.fail(f"expected a number, got {value!r}", where)

    def param(self, name: str, inp: _Input | None = None, default: Any = _MISSING) -> tuple[Any, str]:
        """A parameter's value and the field it came from: per model, then the slice, then the top level."""
        places = []
        if inp is not None:
            places.append((inp.params, f"{inp.field}.parameters.{name}"))
        places += [(self.slice_params, f"slices[0].parameters.{name}"),
                   (self.config.get("parameters") or {}, f"parameters.{name}")]
        for params, where in places:
            if name in params:
                return self.scalar(params[name], where), where
        if default is _MISSING:
            where = f"{inp.field}.parameters.{name}" if inp is not None else f"parameters.{name}"
            whose = f" for {inp.label}" if inp is not None else ""
            raise self.fail(f"mergekit's {self.method} needs `{name}`{whose}", where)
        return default, f"parameters.{name}"

    def check_parameter_names(self, inputs: list[_Input]) -> None:
        allowed_top, allowed_model = PARAMETERS[self.method]
        top = self.config.get("parameters")
        if top is not None and not isinstance(top, dict):
            raise self.fail("expected a mapping", "parameters")
        groups = [("parameters", top or {}, allowed_top),
                  ("slices[0].parameters", self.slice_params, allowed_top)]
        groups += [(f"{i.field}.parameters", i.params, allowed_model) for i in inputs]
        for where, params, allowed in groups:
            for name in params:
                if name not in allowed:
                    known = ", ".join(sorted(allowed)) or "none"
                    raise self.fail(f"not a parameter of mergekit's {self.method} that hubmerge can map "
                                    f"(known: {known})", f"{where}.{name}")

    def uniform(self, name: str, inputs: list[_Input], default: Any = _MISSING) -> float:
        """One value of a per-model parameter shared by every model (hubmerge's methods take one)."""
        values = [self.param(name, inp, default) for inp in inputs]
        first, first_where = values[0]
        for (value, where), inp in zip(values[1:], inputs[1:]):
            if value != first:
                raise self.fail(f"per-model {name}s differ ({first} at {first_where}, {value} for "
                                f"{inp.label}); hubmerge's {self.target} takes one {name} for every expert",
                                where)
        return first

    # -- the translation -----------------------------------------------------------------------------------
    def translate(self, name: str, output_path: str | None) -> MergekitImport:
        cfg = self.config
        method = cfg.get("merge_method")
        if not isinstance(method, str) or not method:
            raise self.fail("missing (which mergekit method?)", "merge_method")
        if method not in SHARED_METHODS:
            raise self.fail(f"mergekit method {method!r} has no hubmerge equivalent yet "
                            f"(translatable: {', '.join(SHARED_METHODS)})", "merge_method")
        self.method = method
        for key in cfg:
            if key not in TOP_LEVEL:
                raise self.fail("unknown mergekit field", str(key))
        for key in ("modules", "tokenizer", "chat_template"):
            if cfg.get(key) is not None:
                raise self.fail(f"mergekit's `{key}` has no hubmerge equivalent", key)
        inputs, base = self.inputs()
        tokenizer = cfg.get("tokenizer_source")
        same_as_base = (base is not None and isinstance(tokenizer, str)
                        and tokenizer.partition("@")[0] == base.path)
        if tokenizer not in (None, "base") and not same_as_base:
            raise self.fail(f"{tokenizer!r}: hubmerge copies the base model's tokenizer "
                            "(tokenizer_source: base)", "tokenizer_source")
        self.check_parameter_names(inputs)
        if method == "linear":
            recipe_base, experts, hub_method, params = self.linear(inputs, base)
        elif method == "slerp":
            recipe_base, experts, hub_method, params = self.slerp(inputs, base)
        else:
            recipe_base, experts, hub_method, params = self.task_vectors(inputs, base)
        doc: dict[str, Any] = {
            "hubmerge": 1,
            "name": name,
            "description": f"Translated from a mergekit {method} configuration by hubmerge import-mergekit.",
            "base": self.ref(recipe_base),
            "experts": self.expert_refs(experts),
            "method": hub_method,
            "params": params,
        }
        output: dict[str, Any] = {"path": output_path or f"out/{name}"}
        dtype, out_dtype = cfg.get("dtype"), cfg.get("out_dtype")
        if dtype is not None:
            doc["dtype"] = self.dtype(dtype, "dtype")
        if out_dtype is not None:
            output["dtype"] = self.dtype(out_dtype, "out_dtype")
        elif dtype is not None:
            output["dtype"] = doc["dtype"]  # mergekit writes in `dtype`
        else:
            self.notes.append("No dtype: mergekit computes in each tensor's stored dtype, hubmerge in "
                              "float32 (written in the base's dtype).")
        doc["output"] = output
        try:
            recipe_from_dict(doc)
        except RecipeError as exc:  # e.g. a name hubmerge cannot accept
            raise self.fail(f"the translated recipe is invalid at {exc.field}: {exc.reason}", None) from None
        return MergekitImport(doc, self.notes, method)

    def dtype(self, value: Any, where: str) -> str:
        if value not in DTYPES:
            known = ", ".join(sorted(set(DTYPES.values())))
            raise self.fail(f"{value!r} is not a floating dtype hubmerge computes in ({known})", where)
        return DTYPES[value]

    def expert_refs(self, experts: list[_Input]) -> list[dict[str, Any]]:
        """References with a ``name`` where two experts would otherwise share a label."""
        refs = [self.ref(e) for e in experts]
        labels = [ModelRef.model_validate(r).label for r in refs]
        for ref, label, inp in zip(refs, labels, experts):
            if labels.count(label) > 1:
                ref["name"] = re.sub(r"[^A-Za-z0-9._-]+", "-", inp.label).strip("-")
        return refs

    def where_models(self) -> str:
        return "models" if self.config.get("models") else "slices"

    def linear(self, inputs: list[_Input], base: _Input | None):
        self.target = "linear"
        models = list(inputs)
        if base is not None and base.key not in {i.key for i in inputs}:
            # mergekit adds the base to the average; its weight can only come from the top level.
            weight, _ = self.param("weight", None, None)
            if weight is None:
                raise self.fail("mergekit's linear averages the base_model in too when it is not under "
                                "models, and it has no weight; list it under models with a weight, or drop "
                                "base_model", "base_model")
            models.append(base)
        weights = [float(self.param("weight", inp)[0]) for inp in models]
        normalize = bool(self.param("normalize", None, True)[0])
        self.notes.append("linear: hubmerge computes θ₀ + Σ cᵢτᵢ, mergekit Σ wᵢθᵢ: equal up to rounding.")
        return base or models[0], models, "linear", {"weights": weights, "normalize": normalize}

    def slerp(self, inputs: list[_Input], base: _Input | None):
        self.target = "slerp"
        if base is None:
            raise self.fail("mergekit's slerp needs a base_model (the t = 0 end)", "base_model")
        others = [i for i in inputs if i.key != base.key]
        if len(others) != 1:
            raise self.fail("mergekit's slerp takes exactly two models, the base_model and one other; got "
                            f"{len(others)} besides the base", self.where_models())
        t, where = self.param("t")
        if isinstance(t, bool) or not 0.0 <= float(t) <= 1.0:
            raise self.fail("t must be between 0 and 1", where)
        self.notes.append("slerp: mergekit normalises in float32, hubmerge accumulates in float64; results "
                          "agree to float32 rounding.")
        return base, [base, others[0]], "slerp", {"t": float(t)}

    def task_vectors(self, inputs: list[_Input], base: _Input | None):
        method = self.method
        if base is None:
            raise self.fail(f"mergekit's {method} needs a base_model", "base_model")
        tvs = [i for i in inputs if i.key != base.key]
        if not tvs:
            raise self.fail("no model besides the base_model", self.where_models())
        default_normalize, default_rescale = DEFAULTS[method]
        lam = float(self.param("lambda", None, 1.0)[0])
        normalize, normalize_where = self.param("normalize", None, default_normalize)
        rescale, rescale_where = self.param("rescale", None, default_rescale)
        normalize, rescale = bool(normalize), bool(rescale)
        if self.param("int8_mask", None, False)[0]:
            self.notes.append("int8_mask only changes the dtype of mergekit's sign mask, not the result: "
                              "ignored.")
        if method == "task_arithmetic":
            return self._task_arithmetic(base, tvs, lam, normalize)
        self.target = "ties" if method == "ties" else "dare"
        density = float(self.uniform("density", tvs, 1.0))
        if density <= 0.0:
            raise self.fail("density must be greater than 0", self.param("density", tvs[0], 1.0)[1])
        density = min(density, 1.0)
        weight = float(self.uniform("weight", tvs))
        if method == "dare_linear":
            divisor = len(tvs) * weight if normalize else 1.0
            if abs(divisor) < 1e-8:
                divisor = 1.0  # mergekit's guard
            scale = lam * weight / divisor * (1.0 if rescale else density)
            self._dare_notes(rescale)
            return base, tvs, "dare", {"density": density, "seed": 0, "combine": "task_arithmetic",
                                       "scale": scale}
        if weight <= 0.0:
            raise self.fail(f"hubmerge's {self.target} weighs every expert equally; mergekit's weight must "
                            "then be positive (it cancels out of the disjoint mean)",
                            self.param("weight", tvs[0])[1])
        if not normalize:
            why = " (mergekit's default for dare_ties)" if method == "dare_ties" else ""
            raise self.fail(f"normalize: false{why} sums the agreeing entries; hubmerge's TIES takes their "
                            "mean. Set normalize: true to translate it", normalize_where)
        self.notes.append("TIES sign election: on an exact zero sum mergekit elects +, hubmerge elects "
                          "nothing.")
        if method == "ties":
            if rescale:
                raise self.fail("rescale: true (L1-norm rescaling of the trimmed task vectors) has no "
                                "hubmerge equivalent in ties", rescale_where)
            self.notes.append("ties trim: mergekit keeps int(d·n) entries per tensor (argsort), hubmerge "
                              "round_half_up(d·n) and all entries tying with the threshold; they differ by "
                              "one entry where d·n has a fractional part ≥ 0.5.")
            return base, tvs, "ties", {"k": density, "scale": lam, "scope": "tensor"}
        self._dare_notes(rescale)
        return base, tvs, "dare", {"density": density, "seed": 0, "combine": "ties", "k": 1.0,
                                   "scale": lam * (1.0 if rescale else density)}

    def _task_arithmetic(self, base: _Input, tvs: list[_Input], lam: float, normalize: bool):
        self.target = "task_arithmetic"
        weights = [float(self.param("weight", inp)[0]) for inp in tvs]
        if any(self.param("density", inp, 1.0)[0] != 1.0 for inp in tvs):
            self.notes.append("density is ignored by mergekit's task_arithmetic (it sparsifies nothing): "
                              "dropped.")
        divisor = math.fsum(weights) if normalize else 1.0
        if abs(divisor) < 1e-8:
            divisor = 1.0  # mergekit's guard
        params: dict[str, Any] = {"scale": lam / divisor}
        if any(w != 1.0 for w in weights):
            params["weights"] = weights
        self.notes.append("task_arithmetic: mergekit divides the weighted sum by D, then scales by λ; "
                          "hubmerge folds λ/D into scale: equal up to rounding.")
        return base, tvs, "task_arithmetic", params

    def _dare_notes(self, rescale: bool) -> None:
        self.notes.append("DARE: the random drop masks differ from mergekit's (hubmerge seeds them per "
                          "tensor name with `seed`), so the results agree in distribution, not bit for bit.")
        if rescale:
            self.notes.append("DARE rescale: hubmerge divides kept entries by the density (the paper); "
                              "current mergekit with rescale: true matches each tensor's L1 norm (older "
                              "versions divided by the density).")
        else:
            self.notes.append("rescale: false is expressed as scale × density (hubmerge always divides "
                              "by it).")


def _recipe_name(name: str | None, file: str | None) -> str:
    raw = name or (Path(file).stem if file else "") or "mergekit-import"
    if raw in ("mergekit_config", "config"):
        raw = "mergekit-import"
    clean = re.sub(r"[^A-Za-z0-9._-]+", "-", raw).strip("-._")[:96]
    return clean or "mergekit-import"


def import_mergekit(config: dict[str, Any], *, name: str | None = None, file: str | None = None,
                    output_path: str | None = None, layer_count: LayerCount | None = None) -> MergekitImport:
    """Translate a parsed mergekit configuration into a hubmerge recipe.

    Args:
        config: The parsed ``mergekit_config.yml``.
        name: The recipe's name (default: from ``file``, else ``mergekit-import``).
        file: Name of the configuration for messages.
        output_path: ``output.path`` of the recipe (default ``out/<name>``).
        layer_count: ``(path, revision) -> layers`` used to check that a ``slices`` entry covers
            whole models (default: read the model's ``config.json``, locally or from the Hub).

    Returns:
        A :class:`MergekitImport` (the recipe mapping and the notes that apply).

    Raises:
        MergekitImportError: Naming the mergekit field that has no equivalent, or the method.
    """
    if not isinstance(config, dict):
        raise MergekitImportError("a mergekit configuration must be a YAML mapping", file=file)
    translator = _Translator(config, file, layer_count or default_layer_count)
    return translator.translate(_recipe_name(name, file), output_path)


def load_mergekit(path: str | Path, **kwargs: Any) -> MergekitImport:
    """Read a ``mergekit_config.yml`` and translate it (see :func:`import_mergekit`).

    Raises:
        RecipeError: If the file cannot be read or is not valid YAML.
        MergekitImportError: If it cannot be translated.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise RecipeError(f"cannot read mergekit config ({type(exc).__name__}: {exc})",
                          file=str(path)) from None
    return import_mergekit(parse_yaml(text, file=str(path)), file=str(path), **kwargs)
