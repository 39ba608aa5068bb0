"""The Hub round trip on the loopback Hub: experts pulled by repo id at pinned revisions
(full fine-tunes and a LoRA adapter), merged, pushed with a card, read back with the plain client."""

from __future__ import annotations

import pytest
import torch
import yaml
from helpers import write_recipe

from hubmerge.engine import merge
from hubmerge.errors import HubError
from hubmerge.publish import publish_merge
from hubmerge.recipe import load_recipe


@pytest.fixture(scope="module")
def hub_inputs(local_hub, tiny_models, tmp_path_factory):
    from peft import LoraConfig
    from test_adapters import make_adapter

    api = local_hub.api()
    lora = make_adapter(tmp_path_factory.mktemp("lora") / "lora", tiny_models["base"], "BertModel",
                        LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"]), seed=7)
    repos = {"base": "rt/base", "e0": "rt/expert-a", "e1": "rt/expert-b", "lora": "rt/lora-c"}
    commits = {}
    for key, repo in repos.items():
        api.create_repo(repo, exist_ok=True)
        folder = lora if key == "lora" else tiny_models[key]
        commits[key] = api.upload_folder(repo_id=repo, folder_path=str(folder)).oid
    # a later commit on expert-a: the recipe pins the first one
    api.upload_file(repo_id="rt/expert-a", path_or_fileobj=b"later", path_in_repo="notes.txt")
    return repos, commits, lora


def test_recipe_by_repo_id_merges_pushes_and_cards(local_hub, tiny_models, hub_inputs, tmp_path):
    from huggingface_hub import HfApi, ModelCard
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModel

    repos, commits, lora = hub_inputs
    recipe = write_recipe(tmp_path / "r.yaml", base=repos["base"],
                          experts=[f"{repos['e0']}@{commits['e0']}", repos["e1"], {"repo": repos["lora"]}],
                          method="task_arithmetic", params={"scale": 0.5},
                          output={"path": str(tmp_path / "out"), "repo": "rt/merged"})
    result = merge(load_recipe(recipe))
    publish_merge(result, "rt/merged", evaluation=None)

    api = HfApi()
    info = api.model_info("rt/merged")
    card = ModelCard.load("rt/merged")
    assert card.data.base_model == [repos["base"], repos["e0"], repos["e1"], repos["lora"]]
    assert card.data.base_model_relation == "merge"
    assert {"hubmerge", "merge", "task_arithmetic"} <= set(card.data.tags)
    for key in ("base", "e0", "e1", "lora"):
        assert commits[key] in card.text  # pinned revisions in the card
    resolved = yaml.safe_load(open(api.hf_hub_download("rt/merged", "hubmerge_recipe.yaml")).read())
    assert resolved["experts"][0] == {"repo": repos["e0"], "revision": commits["e0"]}
    assert resolved["base"]["revision"] == commits["base"]
    assert info.sha and "model.safetensors" in {s.rfilename for s in info.siblings}

    # the published model loads by repo id and equals the merge computed by hand
    model = AutoModel.from_pretrained("rt/merged").eval()
    base = load_file(tiny_models["base"] / "model.safetensors")
    e0 = load_file(tiny_models["e0"] / "model.safetensors")
    e1 = load_file(tiny_models["e1"] / "model.safetensors")
    peft_base = AutoModel.from_pretrained(tiny_models["base"])
    lora_merged = PeftModel.from_pretrained(peft_base, lora).merge_and_unload().state_dict()
    state = model.state_dict()
    for name, value in base.items():
        if not value.dtype.is_floating_point or name not in state:
            continue
        expected = value + 0.5 * ((e0[name] - value) + (e1[name] - value) + (lora_merged[name] - value))
        torch.testing.assert_close(state[name], expected, rtol=0, atol=1e-6)


def test_unknown_repo_and_revision_are_clear_errors(local_hub, hub_inputs, tmp_path):
    repos, _, _ = hub_inputs
    for ref, message in (("rt/missing", "repo not found"), (f"{repos['e1']}@nope", "revision 'nope' not found")):
        recipe = write_recipe(tmp_path / "r.yaml", base=repos["base"], experts=[ref], method="task_arithmetic",
                              output={"path": str(tmp_path / "o")})
        with pytest.raises(HubError, match=message):
            merge(load_recipe(recipe))
        assert not (tmp_path / "o").exists()


def test_private_repo_needs_the_token(local_hub, tiny_models, tmp_path):
    from huggingface_hub import HfApi

    api = local_hub.api()
    api.create_repo("rt/private-base", private=True, exist_ok=True)
    api.upload_folder(repo_id="rt/private-base", folder_path=str(tiny_models["base"]))
    recipe = write_recipe(tmp_path / "r.yaml", base="rt/private-base", experts=[str(tiny_models["e0"])],
                          method="task_arithmetic", output={"path": str(tmp_path / "o")})
    from hubmerge.hub import download_model

    with pytest.raises(HubError, match="not found .or private"):
        download_model("rt/private-base", token=False)
    assert download_model("rt/private-base", token=local_hub.token)[1]
    assert merge(load_recipe(recipe)).base.revision == HfApi().model_info("rt/private-base").sha
