"""``hubmerge demo``: the end-to-end job on a loopback Hub.

1. Start the loopback Hub (or use ``HF_ENDPOINT``/``HF_TOKEN`` when set).
2. Build the multi-task suite offline (:mod:`hubmerge.suite`), reused from disk when present.
3. Push the base models and every expert as ordinary Hub repos with their own cards, and each
   domain's test splits as a dataset repo ``demo/<domain>-data`` (the ``data:`` of AdaMerging)
   (skipped when the repo already holds this build of the suite).
4. Run every ``recipes/demo-*.yaml`` by repo id, evaluate the merge on every task of its
   domain, and push it with a card carrying the evaluation. Recipes that write per-task
   deployments (``flexmerge:``, ``emr``, ``tall``) are evaluated task by task, each with its own
   task model, and pushed with deployment cards (FlexMerge: one branch per size); they add one
   row per deployment (per size) with its storage in model-equivalents. A dynamic deployment
   (``se_merging``) adds its routing accuracy and inference time against the static merge.
5. Print an accuracy table and where to look.
"""

from __future__ import annotations

import json
import logging
import os
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

logger = logging.getLogger(__name__)

NAMESPACE = "demo"
SUITE_MARKER = "hubmerge_suite.json"


@dataclass
class DemoRow:
    """One line of the accuracy table."""

    label: str
    domain: str
    accuracies: dict[str, float]
    repo: str | None = None
    storage: float | None = None  # model-equivalents, for deployments
    routing: float | None = None  # dynamic deployments (SE-Merging): how often the task's own expert was picked
    overhead: float | None = None  # dynamic deployments: inference time over the static merge's

    @property
    def average(self) -> float:
        """Mean accuracy over the row's tasks."""
        return sum(self.accuracies.values()) / max(1, len(self.accuracies))


@dataclass
class DemoReport:
    """What the demo did."""

    endpoint: str
    rows: list[DemoRow] = field(default_factory=list)
    repos: list[str] = field(default_factory=list)
    outputs: list[Path] = field(default_factory=list)
    seconds: float = 0.0

    def table(self) -> str:
        """The accuracy table as Markdown, one table per domain."""
        out = []
        for domain in dict.fromkeys(r.domain for r in self.rows):
            rows = [r for r in self.rows if r.domain == domain]
            tasks = list(dict.fromkeys(t for r in rows for t in r.accuracies))
            experts = next((r for r in rows if r.label == "experts (each on its task)"), None)
            out.append(f"### {domain}\n")
            out.append("| model | " + " | ".join(tasks) + " | avg | normalised |")
            out.append("|---|" + "---|" * (len(tasks) + 2))
            for r in rows:
                cells = [f"{r.accuracies[t]:.3f}" if t in r.accuracies else "" for t in tasks]
                norm = ""
                if experts and r is not experts and all(t in experts.accuracies for t in r.accuracies):
                    norm = f"{sum(r.accuracies[t] / experts.accuracies[t] for t in r.accuracies) / len(r.accuracies):.3f}"
                label = r.label if r.storage is None else f"{r.label} [{r.storage:.2f}x storage]"  # deployments
                if r.routing is not None:  # dynamic deployments
                    label += f" [routing {r.routing:.3f}, {r.overhead:.1f}x inference time]"
                out.append(f"| {label} | " + " | ".join(cells) + f" | {r.average:.3f} | {norm} |")
            out.append("")
        return "\n".join(out)


def repo_for(domain: str, name: str) -> str:
    """The demo's repo id for a base (``name="base"``) or expert of ``domain``."""
    return f"{NAMESPACE}/{domain}-{name}"


def _expert_card(suite, expert, base_repo: str) -> str:
    from huggingface_hub import ModelCard, ModelCardData

    spec = suite.task(expert.task)
    data = ModelCardData(
        base_model=base_repo,
        base_model_relation="adapter" if expert.kind == "lora" else "finetune",
        library_name="peft" if expert.kind == "lora" else "transformers",
        tags=["hubmerge-demo", expert.domain, expert.task],
    )
    body = (f"# {expert.name}\n\nA {'LoRA adapter' if expert.kind == 'lora' else 'full fine-tune'} of "
            f"[{base_repo}]({base_repo}) for **{spec.description}**, built offline by `hubmerge.suite`.\n\n"
            f"Its task head is `task_head.safetensors` ({len(spec.labels)} classes); accuracy at build "
            f"time: {spec.metrics.get('expert', float('nan')):.3f}.\n")
    return str(ModelCard(f"---\n{data.to_yaml()}\n---\n\n{body}"))


def publish_suite(suite, api) -> list[str]:
    """Push every base and expert of ``suite`` as a Hub repo (skipping those already there).

    Args:
        suite: A built :class:`hubmerge.suite.Suite`.
        api: An ``HfApi`` for the target Hub.

    Returns:
        The repo ids.
    """
    from huggingface_hub import CommitOperationAdd
    from huggingface_hub.errors import EntryNotFoundError, RepositoryNotFoundError

    repos = []
    for domain in suite.domains:
        stamp = json.dumps({"fingerprint": suite.config.fingerprint(domain)}, sort_keys=True)
        entries = [("base", suite.base_dir(domain), None)]
        entries += [(e.name, e.path, e) for e in suite.experts_for(domain)]
        for name, directory, expert in entries:
            repo = repo_for(domain, name)
            repos.append(repo)
            try:
                current = api.hf_hub_download(repo, SUITE_MARKER)
                if Path(current).read_text() == stamp:
                    logger.info("demo: %s is up to date", repo)
                    continue
            except (EntryNotFoundError, RepositoryNotFoundError):
                pass
            api.create_repo(repo, exist_ok=True)
            ops = [CommitOperationAdd(str(p.relative_to(directory)), str(p))
                   for p in sorted(directory.rglob("*")) if p.is_file() and p.name != "README.md"]
            card = (_expert_card(suite, expert, repo_for(domain, "base")) if expert else
                    f"# {repo}\n\nThe pre-trained {domain} encoder of the hubmerge demo suite.\n")
            ops.append(CommitOperationAdd("README.md", card.encode()))
            ops.append(CommitOperationAdd(SUITE_MARKER, stamp.encode()))
            api.create_commit(repo, operations=ops, commit_message=f"hubmerge demo suite: {name}")
            logger.info("demo: pushed %s", repo)
    return repos


def _domain_of_recipe(recipe, suite) -> str:
    for domain in suite.domains:
        if recipe.base.repo == repo_for(domain, "base"):
            return domain
    raise ValueError(f"recipe {recipe.name!r}: base {recipe.base} is not a demo base")


def run_recipe(path: Path, suite, report: DemoReport, *, work: Path, progress=None) -> None:
    """Run one demo recipe, evaluate it on its domain's tasks, push it with its card.

    Args:
        path: The recipe file (Hub repo ids of the demo suite).
        suite: The suite (for evaluation).
        report: Where rows, repos and outputs are added.
        work: The demo's working directory.
        progress: Optional engine progress callback.
    """
    from .card import Evaluation
    from .engine import merge
    from .publish import publish_merge
    from .recipe import load_recipe
    from .suite import evaluate_all

    recipe = load_recipe(path)
    domain = _domain_of_recipe(recipe, suite)
    output = work / "out" / recipe.name
    # -- per-task deployments (FlexMerge sizes, EMR, TALL): each task evaluated with its own task model --
    from .deployment import is_deployment_method
    from .plugins import registered_methods

    if recipe.method not in registered_methods():
        logger.warning("demo: skipping %s: method %r is not installed (its plugin's entry point is missing; "
                       "reinstall hubmerge)", path.name, recipe.method)
        return
    from .dynamic import is_dynamic_method

    if is_dynamic_method(recipe.method):  # SE-Merging: one model that merges per input
        run_dynamic_recipe(path, recipe, domain, suite, report, output=output, progress=progress)
        return
    if recipe.flexmerge is not None or is_deployment_method(recipe.method):
        run_deployment_recipe(path, recipe, domain, suite, report, output=output, progress=progress)
        return
    # -- end per-task deployments ------------------------------------------------------------------------
    result = merge(recipe, output=output, overwrite=True, progress=progress, file=str(path))
    accuracies = evaluate_all(result.output_dir, suite, domain=domain)
    evaluation = [Evaluation(task=t, metric="accuracy", value=v, dataset=f"hubmerge-suite/{t}",
                             task_type="image-classification" if domain == "vision" else "text-classification")
                  for t, v in accuracies.items()]
    repo = recipe.output.repo
    if repo:
        publish_merge(result, repo, private=recipe.output.private, evaluation=evaluation)
        report.repos.append(repo)
    report.outputs.append(result.output_dir)
    report.rows.append(DemoRow(f"{recipe.method} ({recipe.name})", domain, accuracies, repo))


def _task_of_expert(recipe, suite, domain: str) -> dict[str, str]:
    """Expert label (a deployment's task name) -> the suite task it was fine-tuned for."""
    by_repo = {repo_for(domain, e.name): e.task for e in suite.experts_for(domain)}
    tasks = {}
    for ref in recipe.experts:
        task = ref.label if ref.label in suite.tasks else by_repo.get(ref.repo or "")
        if task is None:
            raise ValueError(f"recipe {recipe.name!r}: expert {ref} is not an expert of the demo suite")
        tasks[ref.label] = task
    return tasks


def run_deployment_recipe(path: Path, recipe, domain: str, suite, report: DemoReport, *, output: Path,
                          progress=None) -> None:
    """A recipe with ``flexmerge:`` or a deployment method: write the deployment(s), evaluate every task
    with its own task model (``load_task_model`` + ``suite.evaluate``), publish with cards and the
    accuracy-vs-size plot, and add one report row per deployment (per FlexMerge size) with its storage.
    """
    from .deployment import run_deployment
    from .flexmerge import run_flexmerge
    from .publish import publish_deployment

    if recipe.flexmerge is not None:
        result = run_flexmerge(recipe, output=output, overwrite=True, progress=progress, file=str(path))
        name = f"flexmerge/{result.inner.name}"
    else:
        result = run_deployment(recipe, output=output, overwrite=True, progress=progress, file=str(path))
        name = recipe.method
    task_of = _task_of_expert(recipe, suite, domain)
    variants, evaluation = evaluate_deployment(result, task_of, suite)
    repo = recipe.output.repo
    if repo:
        experts = {label: suite.task(task).metrics.get("expert") for label, task in task_of.items()}
        baselines = {"experts": experts} if all(v is not None for v in experts.values()) else None
        publish_deployment(result, repo, private=recipe.output.private, evaluation=evaluation, baselines=baselines,
                           task_type="image-classification" if domain == "vision" else "text-classification")
        report.repos.append(repo)
    report.outputs.append(result.output_dir)
    for variant in variants:
        label = f"{name} size {variant.label} ({recipe.name})" if variant.revision else f"{name} ({recipe.name})"
        where = f"{repo}@{variant.revision}" if repo and variant.revision else repo
        accuracies = {task_of[t]: v for t, v in evaluation[variant.label].items()}
        report.rows.append(DemoRow(label, domain, accuracies, where, storage=variant.model_equivalents))


def evaluate_deployment(result, task_of: dict[str, str], suite) -> tuple[list, dict[str, dict[str, float]]]:
    """Evaluate every task of every variant (FlexMerge size) of a deployment with its own task model.

    Within one run a stored key names the same tensor in every size (FlexMerge: ``<weight>@<group>``),
    so a task whose view did not change between sizes has the same model: it is evaluated once.

    Args:
        result: What :func:`~hubmerge.flexmerge.run_flexmerge` or :func:`~hubmerge.deployment.run_deployment`
            returned.
        task_of: Deployment task label -> the suite task it is scored on.
        suite: The suite.

    Returns:
        The variants (:func:`~hubmerge.publish.deployment_variants`) and, per variant label, task label -> accuracy.
    """
    from .deployment import load_task_model
    from .publish import deployment_variants
    from .suite import evaluate

    variants = deployment_variants(result)
    evaluation: dict[str, dict[str, float]] = {}
    seen: dict[tuple[str, str], float] = {}
    for variant in variants:
        scores = {}
        for label in variant.tasks:
            key = (label, json.dumps(variant.manifest["views"][label], sort_keys=True))
            if key not in seen:
                model = load_task_model(variant.directory, label)
                seen[key] = evaluate(model, task_of[label], suite)
                del model
            scores[label] = seen[key]
        evaluation[variant.label] = scores
    return variants, evaluation


def run_dynamic_recipe(path: Path, recipe, domain: str, suite, report: DemoReport, *, output: Path,
                       progress=None) -> None:
    """A dynamic method (SE-Merging): write the dynamic deployment, evaluate it on every task with
    :func:`hubmerge.dynamic.evaluate_dynamic` (accuracy, routing accuracy, inference time against the static
    merge), publish it with its card, and add one report row.
    """
    from .deployment import run_deployment
    from .dynamic import evaluate_dynamic, publish_dynamic

    result = run_deployment(recipe, output=output, overwrite=True, progress=progress, file=str(path))
    task_of = _task_of_expert(recipe, suite, domain)
    evaluation = evaluate_dynamic(result.output_dir, suite, task_of=task_of)
    repo = recipe.output.repo
    if repo:
        publish_dynamic(result, repo, private=recipe.output.private, evaluation=evaluation,
                        task_type="image-classification" if domain == "vision" else "text-classification")
        report.repos.append(repo)
    report.outputs.append(result.output_dir)
    accuracies = {task_of[t]: v for t, v in evaluation.accuracy.items()}
    storage = result.extra["deployment"]["storage"]["model_equivalents"]
    report.rows.append(DemoRow(f"{recipe.method} ({recipe.name})", domain, accuracies, repo, storage=storage,
                               routing=evaluation.routing_accuracy, overhead=evaluation.overhead))


def publish_suite_data(suite, api) -> list[str]:
    """Push each domain's test splits as a Hub *dataset* repo ``demo/<domain>-data`` (``<task>.safetensors``).

    Recipes that learn from samples (AdaMerging) read them through ``data:``; the labels in the files are
    not used. Skipped when the repo already holds this build of the suite.

    Returns:
        The dataset repo ids.
    """
    from huggingface_hub import CommitOperationAdd
    from huggingface_hub.errors import EntryNotFoundError, RepositoryNotFoundError

    repos = []
    for domain in suite.domains:
        repo = repo_for(domain, "data")
        repos.append(repo)
        stamp = json.dumps({"fingerprint": suite.config.fingerprint(domain)}, sort_keys=True)
        try:
            current = api.hf_hub_download(repo, SUITE_MARKER, repo_type="dataset")
            if Path(current).read_text() == stamp:
                logger.info("demo: dataset %s is up to date", repo)
                continue
        except (EntryNotFoundError, RepositoryNotFoundError):
            pass
        api.create_repo(repo, repo_type="dataset", exist_ok=True)
        ops = [CommitOperationAdd(f"{suite.task(t).name}.safetensors", str(suite.task(t).test_path))
               for t in suite.tasks_for(domain)]
        card = (f"# {repo}\n\nThe test splits of the hubmerge demo suite's {domain} tasks, one "
                "`<task>.safetensors` each (model inputs and `labels`). AdaMerging recipes read them unlabeled.\n")
        ops += [CommitOperationAdd("README.md", card.encode()), CommitOperationAdd(SUITE_MARKER, stamp.encode())]
        api.create_commit(repo, operations=ops, repo_type="dataset", commit_message=f"hubmerge demo suite: {domain} data")
        logger.info("demo: pushed dataset %s", repo)
    return repos


def baseline_rows(suite) -> list[DemoRow]:
    """Base + heads, and each expert on its own task."""
    from .suite import evaluate_all

    rows = []
    for domain in suite.domains:
        rows.append(DemoRow("base + heads", domain, evaluate_all(suite.base_dir(domain), suite, domain=domain)))
        experts = {e.task: suite.task(e.task).metrics.get("expert") for e in suite.experts_for(domain)}
        if any(v is None for v in experts.values()):
            from .suite import evaluate

            experts = {e.task: evaluate(e.path, e.task, suite) for e in suite.experts_for(domain)}
        rows.append(DemoRow("experts (each on its task)", domain, experts))
    return rows


def run_demo(work: str | os.PathLike[str] = ".hubmerge-demo", *, recipes: str | os.PathLike[str] = "recipes",
             progress=None) -> DemoReport:
    """Run the whole demo.

    Args:
        work: Working directory (the loopback Hub's data, the suite, outputs); reused across runs.
        recipes: Directory holding the ``demo-*.yaml`` recipes.
        progress: Optional engine progress callback.

    Returns:
        The :class:`DemoReport`.

    Raises:
        HubmergeError: A recipe or the Hub failed.
    """
    started = time.perf_counter()
    work = Path(work).absolute()
    work.mkdir(parents=True, exist_ok=True)
    with ExitStack() as stack:
        if os.environ.get("HF_ENDPOINT") and "huggingface.co" not in os.environ["HF_ENDPOINT"]:
            endpoint = os.environ["HF_ENDPOINT"]
        else:
            from .localhub.server import LocalHubServer
            from .localhub.testing import configure_client_env, find_free_port

            port = find_free_port()
            server = LocalHubServer(work / "hub", port=port)
            env = configure_client_env(port=port, token=server.token, hf_home=work / "hf-home")
            server.start()
            stack.callback(server.stop)
            endpoint = env.endpoint
        from huggingface_hub import HfApi

        from .suite import build_suite

        report = DemoReport(endpoint)
        suite = build_suite(work / "suite")
        report.repos += publish_suite(suite, HfApi())
        report.repos += publish_suite_data(suite, HfApi())  # `data:` of the AdaMerging recipe
        report.rows += baseline_rows(suite)
        files = sorted(Path(recipes).glob("demo-*.yaml"))
        for path in files:
            logger.info("demo: running %s", path)
            run_recipe(path, suite, report, work=work, progress=progress)
        report.seconds = time.perf_counter() - started
        (work / "accuracy.md").write_text(report.table())
        return report
