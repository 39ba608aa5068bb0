"""Recipe schema v1: good recipes parse, every error names its file and field."""

from __future__ import annotations

import pytest

from hubmerge.errors import RecipeError
from hubmerge.recipe import load_recipe, parse_size, recipe_from_dict, recipe_to_yaml


def _recipe(**over):
    data = {"hubmerge": 1, "name": "m", "base": "org/base@abc123", "experts": ["org/a", {"repo": "org/b"}],
            "method": "task_arithmetic", "output": {"path": "out/m"}}
    data.update(over)
    return data


def test_strings_and_mappings(tmp_path):
    local = tmp_path / "ckpt"
    local.mkdir()
    r = recipe_from_dict(_recipe(experts=["org/a@v1", {"path": str(local), "name": "c"}]))
    assert r.base.repo == "org/base" and r.base.revision == "abc123"
    assert r.experts[0].revision == "v1" and r.experts[1].path == str(local) and r.experts[1].label == "c"
    assert recipe_from_dict(__import__("yaml").safe_load(recipe_to_yaml(r))) == r


@pytest.mark.parametrize("over, field, message", [
    ({"hubmerge": 2}, "hubmerge", "unknown schema version 2"),
    ({"experts": ["org/a", {"repo": "org/../x"}]}, "experts[1].repo", "not a valid Hub repo id"),
    ({"experts": ["org/a", {"repo": "org/b", "path": "/x"}]}, "experts[1]", "exactly one of"),
    ({"experts": []}, "experts", "at least 1"),
    ({"dtype": "int8"}, "dtype", "Input should be"),
    ({"output": {"path": "x", "shard_size": "2 parsecs"}}, "output.shard_size", "not a size"),
    ({"bogus": 1}, "bogus", "unknown field"),
    ({"experts": ["org/a", "org/a"]}, "experts", "both called 'a'"),
])
def test_field_errors(over, field, message):
    with pytest.raises(RecipeError) as info:
        recipe_from_dict(_recipe(**over), file="r.yaml")
    assert info.value.field == field and message in str(info.value) and "r.yaml" in str(info.value)


def test_missing_base():
    data = _recipe()
    del data["base"]
    with pytest.raises(RecipeError, match="base: Field required"):
        recipe_from_dict(data)


def test_malformed_yaml_names_file_and_line(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("hubmerge: 1\nexperts: [a, b\n")
    with pytest.raises(RecipeError, match=r"bad.yaml: malformed YAML at line \d+"):
        load_recipe(f)


def test_billion_laughs_refused(tmp_path):
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x]"]
    for i in range(1, 12):
        lines.append(f"a{i}: &a{i} [" + ", ".join([f"*a{i-1}"] * 9) + "]")
    f = tmp_path / "lol.yaml"
    f.write_text("\n".join(lines))
    with pytest.raises(RecipeError, match="aliases"):
        load_recipe(f)


def test_sizes():
    assert parse_size("2GB") == 2 * 10**9 and parse_size("1GiB") == 2**30 and parse_size(10) == 10
    with pytest.raises(ValueError):
        parse_size("0MB")
