"""The Space in a real browser: headless Chromium driven like a person, against the loopback Hub.

The Space runs as its own process (``python space/app.py``) with ``HF_ENDPOINT`` pointing at the
loopback Hub in its environment (``huggingface_hub`` reads it at import) and no ``HF_TOKEN``: the
token is typed into the form, as a visitor would. Screenshots go to the test's temporary
directory; the main screen is also copied to ``docs/space.png``.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.slow

CHROMIUM = Path("/usr/bin/chromium")
ROOT = Path(__file__).resolve().parents[1]
if not CHROMIUM.exists():
    pytest.skip(
        "Debian's Chromium is not installed (/usr/bin/chromium; apt-get install chromium)",
        allow_module_level=True,
    )
pytest.importorskip("playwright.sync_api", reason="the playwright Python package is not installed")
pytest.importorskip("gradio", reason="gradio is not installed (pip install hubmerge[space])")

pytest_plugins = ["hubmerge.localhub.pytest_plugin"]

from helpers import make_base, make_expert
from playwright.sync_api import Page, expect, sync_playwright

from hubmerge.localhub.testing import configure_client_env, find_free_port

CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
START_TIMEOUT = 120
JOB_TIMEOUT = 120_000  # ms
#: WUDI's Adam steps per linear layer: ~80 µs each on the tiny BERT's 13 linear layers, so a merge takes
#: seconds -- long enough to watch its progress and to overlap a second visitor's merge.
SLOW_STEPS = {"progress": "6000", "busy": "8000"}


@pytest.fixture(scope="module")
def hub_models(local_hub, tmp_path_factory) -> dict[str, str]:
    """A tiny base and two tiny experts pushed to the loopback Hub."""
    root = tmp_path_factory.mktemp("space_models")
    api = local_hub.api()
    prefix = f"{local_hub.username}/space-{uuid.uuid4().hex[:6]}"
    base = make_base(root / "base")
    repos = {}
    for key, folder in [
        ("base", base),
        ("expert-a", make_expert(base, root / "a", seed=1)),
        ("expert-b", make_expert(base, root / "b", seed=2)),
        ("other-shape", make_other_shape(root / "other")),
    ]:
        repo = f"{prefix}-{key}"
        api.create_repo(repo)
        api.upload_folder(repo_id=repo, folder_path=folder)
        repos[key] = repo
    return repos


def make_other_shape(directory: Path) -> Path:
    """A BERT of another width: it exists on the Hub, but it is no fine-tune of the base."""
    from helpers import tiny_bert_config
    from transformers import BertModel

    config = tiny_bert_config()
    config.hidden_size, config.intermediate_size = 16, 20
    BertModel(config).save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def space(local_hub, hub_models, tmp_path_factory) -> dict:
    """The Space as its own process on a free port, talking to the loopback Hub."""
    root = tmp_path_factory.mktemp("space_app")
    recipes = root / "recipes"
    recipes.mkdir()
    (recipes / "ties-example.yaml").write_text(
        yaml.safe_dump(
            {
                "hubmerge": 1,
                "name": "ties-example",
                "base": hub_models["base"],
                "experts": [hub_models["expert-a"], hub_models["expert-b"]],
                "method": "ties",
                "params": {"k": 0.4, "scope": "tensor"},
                "output": {"repo": "ties-example"},
            },
            sort_keys=False,
        )
    )
    env = dict(os.environ)
    configure_client_env(port=local_hub.port, token=local_hub.token, hf_home=root / "hf-home", environ=env)
    env.pop("HF_TOKEN", None)  # the visitor types the token; the Space has none of its own
    env.update(
        GRADIO_ANALYTICS_ENABLED="False",
        GRADIO_TEMP_DIR=str(root / "gradio"),
        HUBMERGE_SPACE_WORKDIR=str(root / "work"),
        HUBMERGE_SPACE_RECIPES=str(recipes),
        PYTHONUNBUFFERED="1",
    )
    port = find_free_port()
    log = (root / "space.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "space" / "app.py"), "--host", "127.0.0.1", "--port", str(port)],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=root,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + START_TIMEOUT
    try:
        while True:
            if proc.poll() is not None:
                pytest.fail(
                    f"the Space exited with {proc.returncode}:\n{(root / 'space.log').read_text()[-3000:]}"
                )
            try:
                with urllib.request.urlopen(url, timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"no Space after {START_TIMEOUT}s:\n{(root / 'space.log').read_text()[-3000:]}")
            time.sleep(0.5)
        yield {"url": url, "log": root / "space.log", "token": local_hub.token, "user": local_hub.username}
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


@pytest.fixture(scope="module")
def browser():
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(
            executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS
        )
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser, space, tmp_path) -> Page:
    context = browser.new_context(viewport={"width": 1400, "height": 1100}, accept_downloads=True)
    page = context.new_page()
    page.set_default_timeout(30_000)
    page.goto(space["url"])
    expect(page.locator("#hm-param-scale")).to_be_visible()  # the default method's widgets are rendered
    yield page
    context.close()


def shoot(page: Page, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(path), full_page=True)
    return path


def pick_method(page: Page, name: str) -> None:
    page.locator("#hm-method input").click()
    page.get_by_role("option", name=re.compile(rf"^{re.escape(name)} ")).click()
    expect(page.locator("#hm-method-info")).to_contain_text(name)


def fill_models(page: Page, models: dict[str, str]) -> None:
    page.get_by_label("Base model").fill(models["base"])
    page.get_by_label("Experts (one per line)").fill(f"{models['expert-a']}\n{models['expert-b']}")


def set_slider(slider, value: str) -> None:
    """Type into a slider's number box, as a person would, and wait until the slider has taken it."""
    box = slider.locator("input[type=number]")
    box.fill(value)
    box.press("Tab")
    expect(slider.locator("input[type=range]")).to_have_value(value)


def status(page: Page):
    return page.locator("#hm-status")


def test_build_merge_and_push_like_a_person(page, space, hub_models, tmp_path):
    from huggingface_hub import HfApi, ModelCard, hf_hub_download

    shots = tmp_path / "screenshots"
    fill_models(page, hub_models)
    pick_method(page, "wudi")
    expect(page.locator("#hm-param-steps")).to_be_visible()
    expect(page.locator("#hm-param-scale")).to_be_visible()
    page.locator("#hm-param-steps input").fill(SLOW_STEPS["progress"])
    page.locator("#hm-param-nonlinear input").click()
    page.get_by_role("option", name="mean", exact=True).click()
    page.get_by_label("Balance").uncheck()
    name = f"browser-merge-{uuid.uuid4().hex[:6]}"
    page.get_by_label("Output repo").fill(name)  # a bare name: the token owner's namespace
    page.get_by_label("Description for the model card (optional)").fill("Merged in a browser test.")
    page.get_by_label("Hugging Face token").fill(space["token"])

    # Check: the recipe YAML is shown and can be downloaded
    page.locator("#hm-validate").click()
    expect(status(page)).to_contain_text("The recipe is valid", timeout=JOB_TIMEOUT)
    yaml_box = page.locator("#hm-yaml")
    for text in (
        "method: wudi",
        f"steps: {SLOW_STEPS['progress']}",
        "nonlinear: mean",
        "balance: false",
        hub_models["expert-b"],
    ):
        expect(yaml_box).to_contain_text(text)
    shoot(page, shots / "1-checked.png")
    with page.expect_download() as download:
        page.locator("#hm-download").click()
    recipe = yaml.safe_load(Path(download.value.path()).read_text())
    assert recipe["method"] == "wudi"
    assert recipe["params"] == {"steps": int(SLOW_STEPS["progress"]), "balance": False, "nonlinear": "mean"}
    assert recipe["base"] == {"repo": hub_models["base"]}

    # Merge: the progress of the engine is seen, then the card preview and the size
    page.evaluate("""() => {
        window.__progress = [];
        new MutationObserver(() => {
            const text = document.querySelector('#hm-progress')?.innerText || '';
            if (/tensor \\d+ of \\d+/.test(text)) window.__progress.push(text);
        }).observe(document.body, {subtree: true, childList: true, characterData: true});
    }""")
    page.locator("#hm-merge").click()
    expect(page.locator("#hm-progress")).to_contain_text(re.compile(r"tensor \d+ of 39"), timeout=JOB_TIMEOUT)
    expect(status(page)).to_contain_text("Merging on this Space")
    shoot(page, shots / "2-merging.png")
    expect(status(page)).to_contain_text("Merged 39 tensors with wudi", timeout=JOB_TIMEOUT)
    expect(page.locator("#hm-progress")).to_be_hidden()
    progress = page.evaluate("window.__progress")
    assert progress, "no progress was shown during the merge"
    assert any("Merging tensors: tensor" in p for p in progress)
    card = page.locator("#hm-card")
    expect(card).to_be_visible()
    expect(card).to_contain_text("base_model_relation: merge")
    expect(card).to_contain_text("Merged in a browser test.")
    expect(card).to_contain_text(hub_models["expert-a"])
    expect(page.locator("#hm-push")).to_be_enabled()
    main_screen = shoot(page, shots / "3-merged.png")
    page.get_by_role("tab", name="Output files").click()
    expect(page.locator("#hm-files")).to_contain_text("Output size:")
    expect(page.locator("#hm-files")).to_contain_text("model.safetensors")
    shoot(page, shots / "4-files.png")

    # Push: the repo link is shown
    page.locator("#hm-push").click()
    expect(status(page)).to_contain_text("Published", timeout=JOB_TIMEOUT)
    repo_id = f"{space['user']}/{name}"
    link = status(page).get_by_role("link", name=repo_id, exact=True)
    expect(link).to_have_attribute("href", re.compile(re.escape(repo_id) + "$"))
    shoot(page, shots / "5-pushed.png")
    (ROOT / "docs").mkdir(exist_ok=True)
    if os.environ.get("HUBMERGE_UPDATE_DOCS"):  # refresh the README's screenshot on request
        shutil.copy(main_screen, ROOT / "docs" / "space.png")

    # The Hub has the repo, with the card's metadata and the resolved recipe
    api = HfApi()
    assert api.repo_exists(repo_id)
    card_data = ModelCard.load(repo_id).data
    assert card_data.base_model == [hub_models["base"], hub_models["expert-a"], hub_models["expert-b"]]
    assert card_data.base_model_relation == "merge"
    assert "wudi" in card_data.tags
    resolved = yaml.safe_load(Path(hf_hub_download(repo_id, "hubmerge_recipe.yaml")).read_text())
    assert (
        resolved["params"]["steps"] == int(SLOW_STEPS["progress"])
        and resolved["params"]["nonlinear"] == "mean"
    )
    readme = Path(hf_hub_download(repo_id, "README.md")).read_text()
    assert space["token"] not in readme
    assert space["token"] not in page.content()
    assert space["token"] not in space["log"].read_text(errors="replace")


def test_bad_parameter_is_shown_on_its_field(page, space, hub_models, tmp_path):
    fill_models(page, hub_models)
    pick_method(page, "ties")
    k = page.locator("#hm-param-k")
    expect(k).to_be_visible()
    set_slider(k, "0")
    page.locator("#hm-validate").click()
    message = status(page)
    expect(message).to_contain_text("Please fix the highlighted field")
    expect(message).to_contain_text("Parameter “K”: must be greater than 0 (recipe field params.k)")
    expect(k).to_have_class(re.compile(r"\bhm-invalid\b"))
    expect(page.locator("#hm-base")).not_to_have_class(re.compile(r"\bhm-invalid\b"))
    shoot(page, tmp_path / "screenshots" / "bad-parameter.png")

    # Merge refuses the same way, without running anything
    page.locator("#hm-merge").click()
    expect(message).to_contain_text("params.k", timeout=JOB_TIMEOUT)
    expect(page.locator("#hm-push")).to_be_disabled()

    # fixed parameter, but a typo in the second expert: that line is named and the box highlighted
    set_slider(k, "0.3")
    page.get_by_label("Experts (one per line)").fill(
        f"{hub_models['expert-a']}\n{hub_models['expert-b']}-typo"
    )
    page.locator("#hm-validate").click()
    expect(message).to_contain_text("Expert 2 (line 2 of the experts box)", timeout=JOB_TIMEOUT)
    expect(message).to_contain_text("was not found on the Hub")
    expect(page.locator("#hm-experts")).to_have_class(re.compile(r"\bhm-invalid\b"))
    expect(k).not_to_have_class(re.compile(r"\bhm-invalid\b"))
    shoot(page, tmp_path / "screenshots" / "bad-expert.png")


def test_example_recipe_fills_the_form(page, space, hub_models, tmp_path):
    page.get_by_text("Start from an example recipe").click()
    page.locator("#hm-recipe-file input").click()
    page.get_by_role("option", name="ties-example.yaml").click()
    page.locator("#hm-load").click()
    expect(page.get_by_label("Base model")).to_have_value(hub_models["base"])
    expect(page.get_by_label("Experts (one per line)")).to_have_value(
        f"{hub_models['expert-a']}\n{hub_models['expert-b']}"
    )
    expect(page.locator("#hm-method-info")).to_contain_text("ties")
    expect(page.locator("#hm-param-k input[type=number]")).to_have_value("0.4")
    expect(page.locator("#hm-param-scope input")).to_have_value("tensor")
    expect(page.get_by_label("Output repo")).to_have_value("ties-example")
    page.locator("#hm-validate").click()
    expect(status(page)).to_contain_text("The recipe is valid", timeout=JOB_TIMEOUT)
    expect(page.locator("#hm-yaml")).to_contain_text("k: 0.4")
    shoot(page, tmp_path / "screenshots" / "recipe-loaded.png")


def test_second_merge_waits_and_says_busy(browser, space, hub_models, tmp_path):
    pages = []
    for _ in range(2):
        context = browser.new_context(viewport={"width": 1400, "height": 1100})
        page = context.new_page()
        page.set_default_timeout(30_000)
        page.goto(space["url"])
        expect(page.locator("#hm-param-scale")).to_be_visible()
        fill_models(page, hub_models)
        pages.append(page)
    first, second = pages
    try:
        pick_method(first, "wudi")
        first.locator("#hm-param-steps input").fill(SLOW_STEPS["busy"])
        pick_method(second, "ties")
        first.locator("#hm-merge").click()
        expect(first.locator("#hm-progress")).to_contain_text(
            re.compile(r"tensor \d+ of \d+"), timeout=JOB_TIMEOUT
        )
        second.locator("#hm-merge").click()
        expect(status(second)).to_contain_text("Busy: another merge")
        expect(status(second)).to_contain_text("one job at a time")
        shoot(second, tmp_path / "screenshots" / "busy.png")
        expect(status(first)).to_contain_text("Merged 39 tensors with wudi", timeout=JOB_TIMEOUT)
        expect(status(second)).to_contain_text("Merged 39 tensors with ties", timeout=JOB_TIMEOUT)
    finally:
        for page in pages:
            page.context.close()


def test_failed_merge_shows_one_line(page, space, hub_models, tmp_path):
    page.get_by_label("Base model").fill(hub_models["base"])
    page.get_by_label("Experts (one per line)").fill(f"{hub_models['expert-a']}\n{hub_models['other-shape']}")
    page.get_by_label("Output repo").fill(f"never-{uuid.uuid4().hex[:6]}")
    page.locator("#hm-merge").click()
    message = status(page)
    expect(message).to_contain_text("The merge failed:", timeout=JOB_TIMEOUT)
    text = message.inner_text()
    assert "Traceback" not in text and len([line for line in text.splitlines() if line.strip()]) == 1
    assert "other-shape" in text and "really a fine-tune of the base model" in text
    expect(page.locator("#hm-push")).to_be_disabled()
    expect(page.locator("#hm-progress")).to_be_hidden()
    shoot(page, tmp_path / "screenshots" / "failed-merge.png")
