"""The Space's form logic without a browser: schema -> widgets, form -> recipe, errors in words."""

from __future__ import annotations

import enum
import sys
from pathlib import Path
from typing import Literal

import pytest
from pydantic import Field

SPACE = Path(__file__).resolve().parents[1] / "space"
sys.path.insert(0, str(SPACE))

import space_form as sf

from hubmerge.errors import RecipeError
from hubmerge.method import MergeMethod, Params
from hubmerge.plugins import RegisteredMethod, registered_methods
from hubmerge.recipe import check_recipe, recipe_from_dict

METHODS = sf.method_infos(registered_methods())


def _experts_for(info: sf.MethodInfo) -> str:
    return "\n".join(
        f"org/expert-{i}" for i in range(max(info.min_experts, 2 if info.max_experts != 1 else 1))
    )


def _validate(form: sf.FormValues, info: sf.MethodInfo):
    built = sf.build_recipe(form, info.params)
    assert not built.errors, built.errors
    recipe = recipe_from_dict(built.data)
    check_recipe(recipe)
    return recipe, built


def _error(form: sf.FormValues, info: sf.MethodInfo) -> sf.FieldError:
    built = sf.build_recipe(form, info.params)
    if built.errors:
        return built.errors[0]
    with pytest.raises(RecipeError) as caught:
        check_recipe(recipe_from_dict(built.data))
    return sf.explain(caught.value, {s.name: s for s in info.params}, built.expert_lines)


# -- schema -> widgets --------------------------------------------------------------------------------------
def test_some_methods_are_installed():
    assert {"linear", "task_arithmetic", "ties", "dare", "slerp"} <= set(METHODS)


@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_installed_method_gets_a_widget_per_parameter(name):
    info = METHODS[name]
    schema = registered_methods()[name].method.describe()["params_schema"]
    assert [s.name for s in info.params] == list(schema.get("properties", {}))
    for spec in info.params:
        assert spec.kind in sf.KINDS
        assert spec.label and spec.info.endswith(f"Recipe key: {spec.name}.")
        if spec.kind == "slider":
            assert spec.minimum is not None and spec.maximum is not None and spec.step
            assert spec.minimum <= spec.default <= spec.maximum
        if spec.kind == "dropdown":
            assert spec.default in spec.choices
        if spec.kind == "checkbox":
            assert isinstance(spec.default, bool)
    assert info.summary and info.markdown().startswith(f"**{name}**")


@pytest.mark.parametrize("name", sorted(METHODS))
def test_defaults_of_every_method_make_a_valid_recipe(name):
    info = METHODS[name]
    form = sf.FormValues(
        method=name,
        params={s.name: s.default for s in info.params},
        base="org/base",
        experts=_experts_for(info),
        output_repo="me/merged",
    )
    recipe, built = _validate(form, info)
    assert built.data["params"] == {}  # the defaults are left to the method
    assert recipe.method == name and recipe.output.repo == "me/merged" and recipe.name == "merged"


class Colour(enum.Enum):
    red = "red"
    blue = "blue"


class EveryKind(Params):
    ratio: float = Field(0.25, gt=0, le=1, description="A bounded fraction.")
    scale: float = Field(1.0, description="Unbounded.")
    steps: int = Field(10, ge=0, description="A count.")
    small: int = Field(3, ge=1, le=5)
    flag: bool = True
    mode: Literal["a", "b"] = "b"
    colour: Colour = Colour.blue
    weights: list[float] | None = None
    names: list[str] = Field(default_factory=list)
    inner: dict[str, float] = Field(default_factory=dict)
    maybe: float | None = None
    required_thing: str


def test_schema_types_become_typed_widgets():
    specs = {s.name: s for s in sf.widget_specs(EveryKind.model_json_schema())}
    assert specs["ratio"].kind == "slider" and (specs["ratio"].minimum, specs["ratio"].maximum) == (0, 1)
    assert (
        "Greater than 0 and at most 1." in specs["ratio"].info
        and "A bounded fraction." in specs["ratio"].info
    )
    assert specs["scale"].kind == "number" and specs["scale"].default == 1.0
    assert specs["steps"].kind == "integer" and "At least 0." in specs["steps"].info
    assert specs["small"].kind == "slider" and specs["small"].step == 1
    assert specs["flag"].kind == "checkbox" and specs["flag"].default is True
    assert specs["mode"].kind == "dropdown" and specs["mode"].choices == ("a", "b")
    assert specs["colour"].kind == "dropdown" and specs["colour"].choices == ("red", "blue")
    assert specs["colour"].default == "blue"
    assert specs["weights"].kind == "numbers" and specs["weights"].default == ""
    assert specs["names"].kind == "strings"
    assert specs["inner"].kind == "mapping"
    assert specs["maybe"].kind == "number" and specs["maybe"].default is None
    assert "Leave empty" in specs["maybe"].info
    assert specs["required_thing"].kind == "text" and not specs["required_thing"].optional


def test_bare_symbols_are_explained_in_their_label():
    k = next(s for s in METHODS["ties"].params if s.name == "k")
    assert k.title == "K" and k.label == "K — Fraction of each task vector's entries kept"
    scale = next(s for s in METHODS["ties"].params if s.name == "scale")
    assert scale.label == scale.title == "Scale"


def test_widget_values_become_parameter_values():
    specs = sf.widget_specs(EveryKind.model_json_schema())
    params, errors = sf.build_params(
        specs,
        {
            "ratio": 0.5,
            "scale": 1.0,
            "steps": 12.0,
            "small": 3,
            "flag": False,
            "mode": "a",
            "colour": "red",
            "weights": "0.5, 1, 2.5",
            "names": "x, y",
            "inner": "scale: 0.3, k: 0.2",
            "maybe": None,
            "required_thing": "hello",
        },
    )
    assert not errors
    assert params == {
        "ratio": 0.5,
        "steps": 12,
        "flag": False,
        "mode": "a",
        "colour": "red",
        "weights": [0.5, 1, 2.5],
        "names": ["x", "y"],
        "inner": {"scale": 0.3, "k": 0.2},
        "required_thing": "hello",
    }
    assert isinstance(params["steps"], int)
    EveryKind.model_validate(params)


def test_an_unparsable_mapping_names_its_parameter():
    specs = sf.widget_specs(EveryKind.model_json_schema())
    _, errors = sf.build_params(specs, {"inner": "scale 0.3 k"})
    assert errors[0].field == "params.inner" and errors[0].target == "param:inner"
    assert "key: value" in errors[0].message


def test_a_newly_registered_method_gets_its_form_without_touching_the_space():
    class Knob(Params):
        strength: float = Field(0.7, ge=0, le=2, description="How strong.")
        style: Literal["soft", "hard"] = "soft"

    class KnobMerge(MergeMethod):
        name = "knob"
        summary = "A third-party method"
        paper = "Someone, Knobs, 2031, https://example.org/knobs"
        Params = Knob

    infos = sf.method_infos({"knob": RegisteredMethod(KnobMerge, "knob_plugin", "hubmerge-knob 1.0")})
    knob = infos["knob"]
    assert [(s.name, s.kind) for s in knob.params] == [("strength", "slider"), ("style", "dropdown")]
    assert "[Someone, Knobs, 2031](https://example.org/knobs)" in knob.markdown()
    assert "hubmerge-knob 1.0" in knob.markdown()
    params, _ = sf.build_params(knob.params, {"strength": 1.5, "style": "hard"})
    assert KnobMerge(params).params.strength == 1.5


# -- form -> recipe ------------------------------------------------------------------------------------------
def test_form_values_make_a_recipe():
    info = METHODS["ties"]
    form = sf.FormValues(
        method="ties",
        params={"k": 0.5, "scale": 1.0, "scope": "tensor"},
        base="org/base@v1",
        experts="org/a\n\nhttps://huggingface.co/other/b/tree/main  # note\n",
        output_repo="me/my-merge",
        private=True,
        description="For tests.",
        dtype="bfloat16",
        output_dtype="float16",
    )
    recipe, built = _validate(form, info)
    assert built.data["params"] == {"k": 0.5, "scope": "tensor"}
    assert (recipe.base.repo, recipe.base.revision) == ("org/base", "v1")
    assert [(e.repo, e.revision) for e in recipe.experts] == [("org/a", None), ("other/b", "main")]
    assert built.expert_lines == [1, 3]
    assert recipe.output.private and recipe.output.repo == "me/my-merge" and recipe.output.dtype == "float16"
    assert recipe.dtype == "bfloat16" and recipe.description == "For tests."
    assert recipe.output.path == "out/my-merge"


def test_models_are_hub_repos_never_local_paths(tmp_path):
    local = tmp_path / "model"
    local.mkdir()
    form = sf.FormValues(method="task_arithmetic", base=str(local), experts="org/a")
    error = _error(form, METHODS["task_arithmetic"])
    assert error.field == "base.repo" and error.target == "base"
    assert "Base model" in error.message and "not a Hub repo id" in error.message


def test_experts_with_the_same_name_get_distinct_labels():
    form = sf.FormValues(method="task_arithmetic", base="org/base", experts="alice/sentiment\nbob/sentiment")
    recipe, _ = _validate(form, METHODS["task_arithmetic"])
    assert [e.label for e in recipe.experts] == ["alice-sentiment", "bob-sentiment"]


def test_missing_base_and_experts_are_said_plainly():
    built = sf.build_recipe(sf.FormValues(method="ties"), METHODS["ties"].params)
    assert [e.target for e in built.errors] == ["base", "experts"]
    assert built.errors[0].message.startswith("Base model:")


# -- errors in words ---------------------------------------------------------------------------------------
def test_bad_parameter_error_names_params_field():
    form = sf.FormValues(method="ties", params={"k": 0}, base="org/base", experts="org/a\norg/b")
    error = _error(form, METHODS["ties"])
    assert error.field == "params.k" and error.target == "param:k"
    assert error.message == "Parameter “K”: must be greater than 0 (recipe field `params.k`)."


def test_bad_list_item_names_the_parameter():
    form = sf.FormValues(
        method="task_arithmetic", params={"weights": "0.5, lots"}, base="org/base", experts="org/a\norg/b"
    )
    error = _error(form, METHODS["task_arithmetic"])
    assert error.field.startswith("params.weights") and error.target == "param:weights"
    assert "must be a number" in error.message


def test_bad_expert_names_its_line():
    form = sf.FormValues(method="ties", base="org/base", experts="org/a\n\nnot a repo!")
    error = _error(form, METHODS["ties"])
    assert error.field == "experts[1].repo" and error.target == "experts"
    assert error.message.startswith(
        "Expert 2 (line 3 of the experts box): “not a repo!” is not a Hub repo id"
    )


def test_wrong_number_of_experts_points_at_the_experts():
    form = sf.FormValues(method="slerp", base="org/base", experts="org/a\norg/b\norg/c")
    error = _error(form, METHODS["slerp"])
    assert error.target == "experts" and "exactly 2" in error.message


@pytest.mark.parametrize(
    "reason, words",
    [
        ("Input should be less than or equal to 1", "must be less than or equal to 1"),
        ("Input should be a valid integer, got a number with a fractional part", "must be a whole number"),
        ("Input should be 'global' or 'tensor'", "must be one of 'global' or 'tensor'"),
        ("unknown field", "is not a parameter of this method"),
        ("Field required", "is required"),
    ],
)
def test_plain_reasons(reason, words):
    assert sf.plain_reason(reason) == words


# -- recipes -> form -----------------------------------------------------------------------------------------
def test_recipe_round_trips_through_the_form():
    info = METHODS["dare"]
    form = sf.FormValues(
        method="dare",
        params={"density": 0.5, "seed": 3, "combine": "ties", "scale": 0.8},
        base="org/base@main",
        experts="org/a\norg/b",
        output_repo="me/m",
        private=True,
    )
    _, built = _validate(form, info)
    again, warnings = sf.form_from_recipe(built.data, METHODS)
    assert not warnings
    assert sf.build_recipe(again, info.params).data == built.data


def test_recipe_with_local_paths_loads_with_warnings():
    data = {
        "hubmerge": 1,
        "name": "x",
        "base": "org/base",
        "experts": ["org/a", {"path": "./ckpt/b"}],
        "method": "ties",
        "params": {"k": 0.3, "nonsense": 1},
    }
    form, warnings = sf.form_from_recipe(data, METHODS)
    assert form.experts == "org/a" and form.params == {"k": 0.3}
    assert any("local folder" in w for w in warnings) and any("nonsense" in w for w in warnings)


RECIPES = sorted((Path(__file__).resolve().parents[1] / "recipes").rglob("*.y*ml"))


@pytest.mark.skipif(not RECIPES, reason="no recipes/ files yet")
@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_recipes_dir_files_fill_the_form(path):
    from hubmerge.recipe import parse_yaml

    form, _ = sf.form_from_recipe(parse_yaml(path.read_text()), METHODS)
    assert form.method in METHODS


def test_flexmerge_sizes_map_to_the_recipe():
    assert sf.parse_sizes("") is None and sf.parse_sizes(" all ") == "all"
    assert sf.parse_sizes("1, 2, 1.5x") == [1, 2, "1.5x"]
    form = sf.FormValues(
        method="ties",
        params={"k": 0.5},
        base="org/base",
        experts="org/a\norg/b\norg/c",
        flexmerge_sizes="1, 2",
    )
    built = sf.build_recipe(form, METHODS["ties"].params)
    assert built.data["flexmerge"] == {"sizes": [1, 2], "inner": "ties", "inner_params": {"k": 0.5}}
    assert recipe_from_dict(built.data).flexmerge.sizes == [1, 2]
    back, _ = sf.form_from_recipe(built.data, METHODS)
    assert back.flexmerge_sizes == "1, 2" and back.params == {"k": 0.5}


# -- the CLI command -----------------------------------------------------------------------------------------
def test_cli_space_command_finds_the_space_and_guards_the_stored_token():
    import argparse

    from hubmerge.cli import space_commands
    from hubmerge.errors import HubmergeError

    assert space_commands.space_dir() == SPACE
    parser = argparse.ArgumentParser()
    space_commands.add_commands(parser.add_subparsers())
    args = parser.parse_args(["space", "--host", "0.0.0.0", "--use-stored-token"])
    with pytest.raises(HubmergeError, match="loopback"):
        args.handler(args)
    assert parser.parse_args(["space"]).host == "127.0.0.1"
