"""The Space's jobs against the loopback Hub, in-process: validate, merge, push, failures, tokens."""

from __future__ import annotations

import sys
import uuid
from pathlib import Path

import pytest

SPACE = Path(__file__).resolve().parents[1] / "space"
sys.path.insert(0, str(SPACE))

pytest_plugins = ["hubmerge.localhub.pytest_plugin"]

import space_form as sf
import space_jobs as sj
from helpers import make_base, make_expert

from hubmerge.plugins import registered_methods

METHODS = sf.method_infos(registered_methods())


@pytest.fixture(scope="module")
def hub_models(local_hub, tmp_path_factory):
    """A tiny base and two experts published on the loopback Hub (public repos)."""
    root = tmp_path_factory.mktemp("space_jobs_models")
    api = local_hub.api()
    prefix = f"{local_hub.username}/jobs-{uuid.uuid4().hex[:6]}"
    base = make_base(root / "base")
    repos = {}
    for key, folder in [
        ("base", base),
        ("a", make_expert(base, root / "a", seed=1)),
        ("b", make_expert(base, root / "b", seed=2)),
    ]:
        repo = f"{prefix}-{key}"
        api.create_repo(repo)
        api.upload_folder(repo_id=repo, folder_path=folder)
        repos[key] = repo
    return repos


@pytest.fixture
def settings(tmp_path):
    return sj.Settings(workdir=tmp_path / "work")


def _form(models, **changes) -> sf.FormValues:
    values = {
        "method": "ties",
        "params": {"k": 0.5},
        "base": models["base"],
        "experts": f"{models['a']}\n{models['b']}",
    }
    values.update(changes)
    return sf.FormValues(**values)


def test_validate_checks_the_inputs_on_the_hub(hub_models):
    result = sj.validate(_form(hub_models), METHODS["ties"], token=False)
    assert result.ok and "method: ties" in result.yaml and result.recipe.params == {"k": 0.5}

    missing = sj.validate(
        _form(hub_models, experts=f"{hub_models['a']}\n{hub_models['a']}-nope"), METHODS["ties"], token=False
    )
    assert [(e.field, e.target) for e in missing.errors] == [("experts[1].repo", "experts")]
    assert missing.errors[0].message.startswith("Expert 2 (line 2 of the experts box):")
    assert "not found on the Hub" in missing.errors[0].message

    bad_rev = sj.validate(
        _form(hub_models, base=hub_models["base"] + "@no-such-branch"), METHODS["ties"], token=False
    )
    assert [(e.field, e.target) for e in bad_rev.errors] == [("base.revision", "base")]
    assert "no revision “no-such-branch”" in bad_rev.errors[0].message


def test_validate_names_a_bad_parameter_before_asking_the_hub(hub_models):
    result = sj.validate(_form(hub_models, params={"k": 2}), METHODS["ties"], token=False)
    assert not result.ok and result.errors[0].target == "param:k"
    assert "params.k" in result.errors[0].message and "k: 2" in result.yaml


def test_merge_then_push_publishes_a_card(hub_models, local_hub, settings):
    from huggingface_hub import HfApi, ModelCard

    checked = sj.validate(_form(hub_models, output_repo="pushed"), METHODS["ties"], token=False)
    events = []
    outcome = sj.run_merge(checked.recipe, settings=settings, token="", progress=events.append)
    assert outcome.kind == "model" and outcome.size_bytes > 0
    assert {"model.safetensors", "README.md", "config.json", "hubmerge_recipe.yaml"} <= {
        f for f, _ in outcome.files
    }
    assert events and events[-1].stage == "merge" and events[-1].tensors_done == events[-1].tensors_total
    assert "base_model_relation: merge" in outcome.card
    assert "Card metadata" in sj.card_preview(outcome.card)

    name = f"pushed-{uuid.uuid4().hex[:6]}"
    pushed = sj.push(outcome.job_id, name, private=False, token=local_hub.token, settings=settings)
    assert pushed.repo_id == f"{local_hub.username}/{name}"  # a bare name goes to the token owner
    assert pushed.url.endswith("/" + pushed.repo_id)
    card = ModelCard.load(pushed.repo_id)
    assert card.data.base_model == [hub_models["base"], hub_models["a"], hub_models["b"]]
    assert card.data.base_model_relation == "merge"
    assert local_hub.token not in card.content
    files = HfApi().list_repo_files(pushed.repo_id)
    assert "model.safetensors" in files and "hubmerge_recipe.yaml" in files


def test_push_needs_a_token_and_a_merge(hub_models, settings):
    with pytest.raises(sj.SpaceError, match="Press Merge first|press Merge first"):
        sj.push("nope", "x", private=False, token="t", settings=settings)
    checked = sj.validate(_form(hub_models), METHODS["ties"], token=False)
    outcome = sj.run_merge(checked.recipe, settings=settings, token="")
    with pytest.raises(sj.SpaceError, match="access token with write access"):
        sj.push(outcome.job_id, "x", private=False, token="  ", settings=settings)


def test_refused_token_is_one_line_and_leaves_nothing(hub_models, local_hub, settings):
    from huggingface_hub import HfApi

    checked = sj.validate(_form(hub_models), METHODS["ties"], token=False)
    outcome = sj.run_merge(checked.recipe, settings=settings, token="")
    repo = f"{local_hub.username}/refused-{uuid.uuid4().hex[:6]}"
    wrong = "hf_" + "x" * 30
    with pytest.raises(sj.SpaceError) as caught:
        sj.push(outcome.job_id, repo, private=False, token=wrong, settings=settings)
    message = str(caught.value)
    assert "\n" not in message and wrong not in message
    assert not HfApi().repo_exists(repo)


def test_failed_push_deletes_the_new_repo(hub_models, local_hub, settings, monkeypatch):
    from huggingface_hub import HfApi

    from hubmerge import publish
    from hubmerge.errors import HubError

    checked = sj.validate(_form(hub_models), METHODS["ties"], token=False)
    outcome = sj.run_merge(checked.recipe, settings=settings, token="")
    repo = f"{local_hub.username}/half-{uuid.uuid4().hex[:6]}"

    def create_then_fail(result, repo_id, *, private=False, token=None, **_):
        HfApi(token=token).create_repo(repo_id)
        raise HubError(f"{repo_id}: push failed (ConnectionError); the repo is unchanged")

    monkeypatch.setattr(publish, "publish_merge", create_then_fail)
    with pytest.raises(sj.SpaceError, match="push failed.*Nothing was left on the Hub"):
        sj.push(outcome.job_id, repo, private=False, token=local_hub.token, settings=settings)
    assert not HfApi().repo_exists(repo)


def test_failed_merge_is_one_line_and_leaves_no_output(hub_models, local_hub, tmp_path, settings):
    from helpers import tiny_bert_config
    from transformers import BertModel

    from hubmerge.recipe import recipe_from_dict

    config = tiny_bert_config()
    config.hidden_size, config.intermediate_size = 16, 20  # not a fine-tune of the base: shapes differ
    other = tmp_path / "other"
    BertModel(config).save_pretrained(other)
    repo = f"{local_hub.username}/other-{uuid.uuid4().hex[:6]}"
    local_hub.api().create_repo(repo)
    local_hub.api().upload_folder(repo_id=repo, folder_path=other)
    recipe = recipe_from_dict(
        {
            "hubmerge": 1,
            "name": "broken",
            "base": {"repo": hub_models["base"]},
            "experts": [{"repo": hub_models["a"]}, {"repo": repo}],
            "method": "ties",
        }
    )
    with pytest.raises(sj.SpaceError) as caught:
        sj.run_merge(recipe, settings=settings, token="")
    assert "\n" not in str(caught.value) and "Traceback" not in str(caught.value)
    assert not any(settings.workdir.iterdir())


def test_tokens_are_typed_not_borrowed(monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_ownersecret123456")
    assert sj.Settings(workdir=Path("/tmp")).token("") is False  # anonymous, never the Space owner's token
    assert sj.Settings(workdir=Path("/tmp")).token(" hf_mine ") == "hf_mine"
    assert sj.Settings(workdir=Path("/tmp"), use_stored_token=True).token("") is None
    assert sj.scrub("bad token hf_abcdefghijkl in hf_mine", "hf_mine") == "bad token hf_*** in ***"


def test_busy_gate_says_what_runs():
    gate = sj.JobGate()
    assert gate.busy_message() is None
    with gate.hold("merge"):
        assert "another merge" in gate.busy_message() and "queued" in gate.busy_message()
    assert gate.busy_message() is None


@pytest.mark.skipif(not sj.flexmerge_available(), reason="FlexMerge (hubmerge.flexmerge) is not installed")
def test_flexmerge_sizes_run_and_push(hub_models, local_hub, settings):
    from huggingface_hub import HfApi, ModelCard

    form = _form(hub_models, method="task_arithmetic", params={}, flexmerge_sizes="1, 2")
    checked = sj.validate(form, METHODS["task_arithmetic"], token=False)
    assert checked.ok, checked.errors
    outcome = sj.run_merge(checked.recipe, settings=settings, token="")
    assert outcome.kind == "flexmerge" and "FlexMerge" in outcome.summary
    names = {f for f, _ in outcome.files}
    assert {"size-1/deployment.json", "size-2/deployment.json", "README.md"} <= names
    repo = f"{local_hub.username}/flex-{uuid.uuid4().hex[:6]}"
    sj.push(outcome.job_id, repo, private=False, token=local_hub.token, settings=settings)
    api = HfApi()
    assert {b.name for b in api.list_repo_refs(repo).branches} >= {"main", "size-1", "size-2"}
    card = ModelCard.load(repo)
    assert card.data.base_model_relation == "merge" and "flexmerge" in card.data.tags

    bad = sj.validate(
        _form(hub_models, method="task_arithmetic", params={}, flexmerge_sizes="1, 5"),
        METHODS["task_arithmetic"],
        token=False,
        check_hub=False,
    )
    assert bad.errors[0].target == "flexmerge_sizes" and "FlexMerge sizes" in bad.errors[0].message
