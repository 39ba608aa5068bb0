"""Hostile inputs: each refused with a clear error, in bounded time and memory.

Safetensors headers that lie, recipes that explode or point the output elsewhere, adapter
configs with pathological regexes, repo ids with traversal characters, pickles in disguise;
plus a fixed-budget fuzz of the recipe loader and of the safetensors header reader.
"""

from __future__ import annotations

import contextlib
import json
import pickle
import signal
import struct
import time
from pathlib import Path

import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from hubmerge.checkpoint import Checkpoint, read_header
from hubmerge.engine import merge
from hubmerge.errors import (
    AdapterError,
    CheckpointError,
    HubError,
    OutputExistsError,
    RecipeError,
    UnsafeCheckpointError,
)
from hubmerge.recipe import MAX_RECIPE_BYTES, load_recipe, parse_yaml, recipe_from_dict
from hubmerge.sources import ResolvedModel, open_expert
from helpers import write_recipe


@contextlib.contextmanager
def time_limit(seconds: float):
    """Fail (instead of hanging the suite) if the block runs longer than ``seconds``.

    ``re`` and the bytecode loop both check for signals, so SIGALRM interrupts a runaway match.
    """

    def expired(signum, frame):
        raise TimeoutError(f"took longer than {seconds}s")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _raw(path: Path, header: dict | bytes, data: bytes = b"") -> Path:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


# -------------------------------------------------------------------- safetensors headers


@pytest.mark.parametrize("shape, why", [
    ([2**62, 2**62], "out of range"),  # the byte count overflows any fixed-width integer
    ([2**64, 0], "dimension"),  # zero bytes, but no tensor library can hold this shape
    ([-1, -4], "bad shape"),
    ([True, 4], "bad shape"),  # JSON true is not a dimension
    ([0] * 100, "dimensions"),  # more dimensions than any tensor library supports
    ("[2, 2]", "bad shape"),
])
def test_lying_shapes_refused(tmp_path, shape, why):
    header = {"w": {"dtype": "F32", "shape": shape, "data_offsets": [0, 0]}}
    with pytest.raises(CheckpointError, match=why):
        read_header(_raw(tmp_path / "model.safetensors", header))


def test_duplicate_keys_in_one_header_refused(tmp_path):
    """JSON parsers disagree on duplicate keys (first or last wins): an ambiguity an attacker can use."""
    raw = (b'{"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},'
           b' "w": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}')
    with pytest.raises(CheckpointError, match="'w' appears twice"):
        read_header(_raw(tmp_path / "model.safetensors", raw, b"\0" * 8))


def test_deeply_nested_header_refused(tmp_path):
    raw = b'{"__metadata__": ' + b"[" * 200_000 + b"]" * 200_000 + b"}"
    with pytest.raises(CheckpointError, match="header"):
        read_header(_raw(tmp_path / "model.safetensors", raw))


def test_duplicate_tensor_across_shards_refused(tmp_path):
    save_file({"w": torch.ones(2)}, tmp_path / "a.safetensors")
    save_file({"w": torch.zeros(2)}, tmp_path / "b.safetensors")
    (tmp_path / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"w": "a.safetensors", "x": "b.safetensors"}}))
    with pytest.raises(CheckpointError, match="'w' also in a.safetensors"):
        Checkpoint(tmp_path)


@pytest.mark.parametrize("index, why", [
    ({"weight_map": ["a.safetensors"]}, "not a valid safetensors index"),
    ({"weight_map": {"w": 7}}, "not a valid safetensors index"),
    ({"weight_map": {"w": "a.safetensors", "ghost": "a.safetensors"}}, "'ghost'.*not in a.safetensors"),
    ({"weight_map": {"w": "../a.safetensors"}}, "outside the model directory"),
])
def test_index_that_lies_refused(tmp_path, index, why):
    model = tmp_path / "model"
    model.mkdir()
    save_file({"w": torch.ones(2)}, model / "a.safetensors")
    save_file({"w": torch.ones(2)}, tmp_path / "a.safetensors")
    (model / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=why):
        Checkpoint(model)


_names = st.text(st.characters(codec="utf-8"), max_size=6)
_ints = st.one_of(st.integers(-3, 40), st.sampled_from([2**31, 2**63, 2**64, -(2**63)]), st.booleans())
_entry = st.fixed_dictionaries(
    {},
    optional={
        "dtype": st.one_of(st.sampled_from(["F32", "F16", "BF16", "I64", "BOOL", "U8", "F8_E4M3", "X"]), _ints),
        "shape": st.one_of(st.lists(_ints, max_size=4), _ints, st.none(), _names),
        "data_offsets": st.one_of(st.lists(_ints, max_size=3), _ints, st.none()),
    },
)
_header = st.dictionaries(_names, st.one_of(_entry, _ints, _names, st.lists(_ints, max_size=2)), max_size=5)


@settings(max_examples=200, deadline=2000, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(header=_header, data_len=st.integers(0, 96), raw_prefix=st.sampled_from([b"", b"\x80", b"PK", b"[", b"{"]))
def test_fuzz_header_reader_only_raises_checkpoint_error(tmp_path, header, data_len, raw_prefix):
    path = tmp_path / "model.safetensors"
    raw = raw_prefix + json.dumps(header).encode()
    path.write_bytes(raw_prefix[:2] * 4 if raw_prefix in (b"\x80", b"PK") else
                     struct.pack("<Q", len(raw)) + raw + b"\1" * data_len)
    try:
        metas = read_header(path)
    except CheckpointError:
        return
    checkpoint = Checkpoint(tmp_path)
    try:
        for name, meta in metas.items():  # accepted: every tensor really is in the file, and readable
            assert meta.offset + meta.nbytes <= path.stat().st_size
            assert tuple(checkpoint.get(name).shape) == meta.shape
    finally:
        checkpoint.close()


def test_pickle_disguised_as_adapter_weights_never_unpickled(tiny_models, tmp_path, monkeypatch):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["query"]}))

    def never(*args, **kwargs):
        raise AssertionError("something tried to unpickle")

    for module, name in ((pickle, "load"), (pickle, "loads"), (pickle, "Unpickler"), (torch, "load")):
        monkeypatch.setattr(module, name, never)
    base = Checkpoint(tiny_models["base"])
    for payload in (pickle.dumps({"base_model.model.encoder.layer.0.attention.self.query.lora_A.weight": [1.0]}),
                    b"PK\x03\x04" + b"\0" * 60):  # a zip archive (torch.save) with the safetensors name
        (adapter / "adapter_model.safetensors").write_bytes(payload)
        with pytest.raises(UnsafeCheckpointError, match="adapter_model.safetensors: this is a pickle/zip"):
            open_expert(ResolvedModel(_local_ref(adapter), adapter), base)


def _local_ref(directory: Path):
    from hubmerge.recipe import ModelRef

    return ModelRef(path=str(directory))


# -------------------------------------------------------------------- adapters: regex patterns

QUERY = "base_model.model.encoder.layer.0.attention.self.query"
#: Exponential backtracking on any module name: ``(.|.)*`` has 2^n ways to consume n characters,
#: and no module name ends with anything but... its last character. Hours with ``re`` (as PEFT
#: matches) and with the ``regex`` module alike.
CATASTROPHIC = "(.|.)*[^y]"
#: Hours with ``re``; the ``regex`` module sees at once that no name contains ``Z``.
SLOW_FOR_RE_ONLY = "(.|.)*Z"


def _lora(directory: Path, **config) -> Path:
    directory.mkdir()
    (directory / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["query"], **config}))
    save_file({f"{QUERY}.lora_A.weight": torch.randn(2, 32), f"{QUERY}.lora_B.weight": torch.randn(32, 2)},
              directory / "adapter_model.safetensors")
    return directory


def _check_adapter(directory: Path, base_dir: Path):
    base = Checkpoint(base_dir)
    expert = open_expert(ResolvedModel(_local_ref(directory), directory), base)
    expert.check(base)
    return expert


def test_benign_patterns_still_match_like_peft(tiny_models, tmp_path):
    expert = _check_adapter(_lora(tmp_path / "a", rank_pattern={"(a+)+$": 8, "query": 2},
                                  alpha_pattern={r"layer\.0\..*query": 6}), tiny_models["base"])
    update = expert.plan["encoder.layer.0.attention.self.query.weight"].update
    assert update.scaling == 6 / 2


@pytest.mark.parametrize("field, budget", [("rank_pattern", None), ("alpha_pattern", 0.2)])
def test_catastrophic_lora_pattern_refused_in_bounded_time(tiny_models, tmp_path, monkeypatch, field, budget):
    if budget:  # the default (one second for the whole config) is exercised by the first case
        monkeypatch.setattr("hubmerge.adapters.config.PATTERN_BUDGET_SECONDS", budget)
    adapter = _lora(tmp_path / "a", **{field: {CATASTROPHIC: 2}})
    started = time.monotonic()
    with time_limit(20), pytest.raises(AdapterError, match=r"takes too long to match"):
        _check_adapter(adapter, tiny_models["base"])
    assert time.monotonic() - started < 10


def test_catastrophic_ia3_feedforward_pattern_refused_in_bounded_time(tiny_models, tmp_path, monkeypatch):
    monkeypatch.setattr("hubmerge.adapters.config.PATTERN_BUDGET_SECONDS", 0.2)
    adapter = tmp_path / "ia3"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "IA3", "target_modules": ["query"], "feedforward_modules": CATASTROPHIC}))
    save_file({f"{QUERY}.ia3_l": torch.rand(32, 1)}, adapter / "adapter_model.safetensors")
    with time_limit(20), pytest.raises(AdapterError, match=r"takes too long to match"):
        _check_adapter(adapter, tiny_models["base"])


def test_pattern_slow_only_for_re_matches_fast(tiny_models, tmp_path):
    adapter = _lora(tmp_path / "a", rank_pattern={SLOW_FOR_RE_ONLY: 8})
    with time_limit(20):
        expert = _check_adapter(adapter, tiny_models["base"])
    assert expert.plan["encoder.layer.0.attention.self.query.weight"].update.scaling == 4 / 2  # no match: r=2


def test_invalid_pattern_is_an_adapter_error(tiny_models, tmp_path):
    with pytest.raises(AdapterError, match="not a valid regular expression"):
        _check_adapter(_lora(tmp_path / "a", rank_pattern={"(unclosed": 2}), tiny_models["base"])


# -------------------------------------------------------------------- recipes

def _minimal(**over) -> dict:
    return {"hubmerge": 1, "name": "m", "base": "org/base", "experts": ["org/a"], "method": "task_arithmetic",
            **over}


@pytest.mark.parametrize("text, why", [
    ("a: " + "[" * 20_000 + "]" * 20_000, "nested"),
    ("{" * 5_000 + "}" * 5_000, "nested"),
    ("hubmerge: " + "9" * 5_000, "malformed YAML"),  # an integer too long to convert
    ("hubmerge: 1\nname: 2001-02-30\n", "malformed YAML"),  # a timestamp that does not exist
    ("hubmerge: !!python/object/apply:os.system ['true']", "malformed YAML"),
])
def test_recipe_bombs_refused(text, why):
    with time_limit(10), pytest.raises(RecipeError, match=why):
        recipe_from_dict(parse_yaml(text, file="r.yaml"), file="r.yaml")


def test_huge_recipe_is_refused_or_fast(tmp_path):
    too_big = tmp_path / "big.yaml"
    too_big.write_text("hubmerge: 1\ndescription: " + "x" * MAX_RECIPE_BYTES)
    with pytest.raises(RecipeError, match="larger than"):
        load_recipe(too_big)
    many = tmp_path / "many.yaml"  # 20 000 experts: time grows linearly up to the size limit
    many.write_text(yaml.safe_dump(_minimal(experts=[f"org/e{i}" for i in range(20_000)])))
    started = time.monotonic()
    assert len(load_recipe(many).experts) == 20_000
    assert time.monotonic() - started < 20


@pytest.mark.parametrize("repo", ["../etc", "org/../x", "org/..", "a/b/c", "/abs", "org/x%2F..", "~root/x",
                                  "org\\x", "org/x\x00", "org/" + "x" * 200, "-org/x", "org/x y"])
def test_traversal_repo_ids_refused(repo):
    with pytest.raises(RecipeError, match="not a valid Hub repo id"):
        recipe_from_dict(_minimal(experts=[{"repo": repo}]))
    with pytest.raises(RecipeError, match="not a valid Hub repo id"):
        recipe_from_dict(_minimal(output={"repo": repo}))


@pytest.mark.parametrize("revision", ["../../etc", "main/../../x", "refs/../../..", "-rf", "a\x00b"])
def test_traversal_revisions_refused(revision):
    with pytest.raises(RecipeError, match="not a valid revision"):
        recipe_from_dict(_minimal(base={"repo": "org/base", "revision": revision}))


def test_traversal_repo_ids_refused_by_the_hub_layer(local_hub):
    from hubmerge.hub import download_model, push_folder

    for repo in ("../../etc", "org/../../x", "a/b/c"):
        with pytest.raises(HubError):
            download_model(repo)
        with pytest.raises(HubError):
            push_folder(".", repo)


# -------------------------------------------------------------------- output paths

def _out_recipe(tmp_path: Path, tiny_models, output: str) -> Path:
    return write_recipe(tmp_path / "r.yaml", base=str(tiny_models["base"]), experts=[str(tiny_models["e0"])],
                        method="task_arithmetic", output={"path": output})


def test_recipe_output_climbing_out_with_dotdot_refused(tiny_models, tmp_path, monkeypatch):
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    recipe = load_recipe(_out_recipe(work, tiny_models, "../../escape"))  # loads: --output can override it
    with pytest.raises(RecipeError, match=r"output\.path: \.\./\.\./escape resolves to .* outside .*'\.\.'"):
        merge(recipe)
    assert not (tmp_path.parent / "escape").exists()
    assert merge(recipe, output=tmp_path / "chosen").output_dir == tmp_path / "chosen"


def test_output_that_is_a_symlink_refused(tiny_models, tmp_path):
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "keep.txt").write_text("mine")
    link = tmp_path / "out"
    link.symlink_to(precious, target_is_directory=True)
    recipe = load_recipe(_out_recipe(tmp_path, tiny_models, str(link)))
    for overwrite in (False, True):
        with pytest.raises(OutputExistsError, match="symbolic link"):
            merge(recipe, overwrite=overwrite)
    assert [p.name for p in precious.iterdir()] == ["keep.txt"] and link.is_symlink()


def test_relative_recipe_output_through_a_symlink_leaving_the_directory_refused(tiny_models, tmp_path,
                                                                                 monkeypatch):
    work, elsewhere = tmp_path / "work", tmp_path / "elsewhere"
    work.mkdir()
    elsewhere.mkdir()
    (work / "models").symlink_to(elsewhere, target_is_directory=True)
    monkeypatch.chdir(work)
    recipe = load_recipe(_out_recipe(work, tiny_models, "models/merged"))
    with pytest.raises(RecipeError, match=r"output\.path.*outside"):
        merge(recipe)
    assert list(elsewhere.iterdir()) == []
    # the user can still send the output there on purpose
    result = merge(recipe, output=work / "models" / "merged")
    assert (elsewhere / "merged" / "model.safetensors").is_file() and result.output_dir.name == "merged"
    # and a relative path inside the working directory is fine
    assert merge(load_recipe(_out_recipe(work, tiny_models, "out/merged"))).output_dir.is_dir()


# -------------------------------------------------------------------- recipe loader fuzz

_scalars = st.one_of(st.none(), st.booleans(), st.integers(-10, 10**6), st.floats(allow_nan=True),
                     st.text(max_size=12), st.sampled_from(["org/a", "org/a@main", ".", "..", "/", "~", "${x}",
                                                            "task_arithmetic", "ties", "1GB", "-1", "float32"]))
_values = st.recursive(_scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                         st.dictionaries(st.text(max_size=8), inner, max_size=4)),
                       max_leaves=12)
_fields = ["hubmerge", "name", "version", "description", "base", "experts", "method", "params", "flexmerge",
           "dtype", "device", "output", "provenance", "variables", "bogus"]


@st.composite
def _recipe_texts(draw) -> str:
    kind = draw(st.sampled_from(["mutated", "mutated", "yaml-soup", "text"]))
    if kind == "mutated":  # a valid recipe with a few fields replaced, removed or nested values changed
        data = _minimal(output={"path": "out/m", "shard_size": "1GB"}, params={"scale": 0.5},
                        experts=["org/a", {"repo": "org/b", "revision": "v1", "name": "b"}])
        for _ in range(draw(st.integers(1, 3))):
            field = draw(st.sampled_from(_fields))
            if draw(st.booleans()):
                data[field] = draw(_values)
            else:
                data.pop(field, None)
        return yaml.safe_dump(data, sort_keys=False, allow_unicode=True)
    if kind == "yaml-soup":
        tokens = ["hubmerge: 1\n", "name: x\n", "experts:\n", "- ", "org/a", "&a ", "*a", "!!str ", "!!binary ",
                  "!!timestamp ", "!!int ", "!!float ", "? ", ": ", "[", "]", "{", "}", ",", "'", '"', "|\n",
                  ">\n", "  ", "\n", "---\n", "...\n", "%YAML 1.1\n", "<<: ", "2001-12-14", "0x1F", "1e999", "~",
                  "\t", "#", "@", "`", "\\x00", "\ufeff", "base: ", "output: ", "path: ", "method: "]
        return "".join(draw(st.lists(st.sampled_from(tokens), max_size=30)))
    return draw(st.text(max_size=200))


@settings(max_examples=300, deadline=2000, suppress_health_check=[HealthCheck.too_slow])
@given(text=_recipe_texts())
def test_fuzz_recipe_loader_only_raises_recipe_error(text):
    try:
        recipe_from_dict(parse_yaml(text, file="fuzz.yaml"), file="fuzz.yaml")
    except RecipeError as exc:
        assert str(exc).startswith("fuzz.yaml")  # every error names the file
