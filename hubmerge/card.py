"""Model cards for merges, from a template plus ``ModelCardData`` (no per-method branches).

Everything method-specific comes from the method's metadata (``name``, ``summary``,
``paper``, the ``Params`` schema's descriptions). The YAML header carries
``base_model`` (every input repo id), ``base_model_relation: merge``,
``library_name``, ``tags`` and, when evaluation results are given, ``model-index``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from huggingface_hub import EvalResult, ModelCard, ModelCardData

TEMPLATE = Path(__file__).parent / "templates" / "modelcard.md"

#: Architecture suffix -> pipeline tag, for the cases the config alone decides.
PIPELINE_BY_SUFFIX = {
    "ForSequenceClassification": "text-classification",
    "ForTokenClassification": "token-classification",
    "ForQuestionAnswering": "question-answering",
    "ForCausalLM": "text-generation",
    "LMHeadModel": "text-generation",
    "ForMaskedLM": "fill-mask",
    "ForConditionalGeneration": "text2text-generation",
    "ForImageClassification": "image-classification",
}
ENCODER_PIPELINES = {"vit": "image-feature-extraction", "bert": "feature-extraction"}


@dataclass
class Evaluation:
    """One evaluation result: ``value`` of ``metric`` on ``task`` (data set name optional)."""

    task: str
    metric: str
    value: float
    dataset: str | None = None
    task_type: str = "text-classification"


@dataclass
class CardSection:
    """An extra card section (e.g. FlexMerge sizes) given by the caller."""

    title: str
    body: str


@dataclass
class CardInputs:
    """What a card is made of."""

    name: str
    method: dict[str, Any]  # MergeMethod.describe()
    params: dict[str, Any]
    plugin: str
    base: dict[str, Any]  # ResolvedModel.describe()
    experts: list[dict[str, Any]]
    recipe_yaml: str
    dtype: str = "float32"
    description: str | None = None
    repo_id: str | None = None
    config: dict[str, Any] = field(default_factory=dict)
    evaluation: list[Evaluation] = field(default_factory=list)
    sections: list[CardSection] = field(default_factory=list)
    extra_tags: list[str] = field(default_factory=list)
    usage: str | None = None


def pipeline_tag(config: dict[str, Any]) -> str | None:
    """Infer the pipeline tag from a transformers config, when the config decides it."""
    for arch in config.get("architectures") or []:
        for suffix, tag in PIPELINE_BY_SUFFIX.items():
            if arch.endswith(suffix):
                return tag
    return ENCODER_PIPELINES.get(config.get("model_type", ""))


def _link(model: dict[str, Any]) -> str:
    if not model.get("repo"):
        return f"`{model.get('name')}` (local)"
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")
    return f"[{model['repo']}]({endpoint}/{model['repo']})"


def _parameter_rows(method: dict[str, Any], params: dict[str, Any]) -> list[dict[str, Any]]:
    props = method.get("params_schema", {}).get("properties", {})
    return [{"name": k, "value": json.dumps(v) if not isinstance(v, str) else v,
             "description": (props.get(k, {}).get("description") or "").replace("|", "\\|")}
            for k, v in params.items()]


def build_card(inputs: CardInputs) -> ModelCard:
    """Render a model card.

    Args:
        inputs: The merge's metadata.

    Returns:
        A ``huggingface_hub.ModelCard`` (``card.data`` holds the YAML metadata).
    """
    models = [inputs.base, *inputs.experts]
    base_models = list(dict.fromkeys(m["repo"] for m in models if m.get("repo")))
    eval_results = [
        EvalResult(task_type=e.task_type, dataset_type=e.dataset or e.task, dataset_name=e.dataset or e.task,
                   metric_type=e.metric, metric_value=float(e.value), task_name=e.task)
        for e in inputs.evaluation
    ] or None
    data = ModelCardData(
        base_model=base_models or None,
        library_name="transformers",
        tags=list(dict.fromkeys(["hubmerge", "merge", inputs.method["name"], *inputs.extra_tags])),
        pipeline_tag=pipeline_tag(inputs.config),
        model_name=inputs.repo_id or inputs.name,
        eval_results=eval_results,
        base_model_relation="merge",
    )
    rows = [{"role": "base", "link": _link(inputs.base), "revision": f"`{inputs.base.get('revision') or '-'}`",
             "kind": inputs.base.get("kind", "full")}]
    rows += [{"role": f"expert `{m['name']}`", "link": _link(m), "revision": f"`{m.get('revision') or '-'}`",
              "kind": m.get("kind", "full")} for m in inputs.experts]
    load_id = inputs.repo_id or "path/to/this/model"
    usage = inputs.usage or (
        "from transformers import AutoModel\n\n"
        f'model = AutoModel.from_pretrained("{load_id}")'
    )
    return ModelCard.from_template(
        data,
        template_path=str(TEMPLATE),
        title=inputs.repo_id or inputs.name,
        description=inputs.description or f"A merge of {len(inputs.experts)} models into one.",
        method=inputs.method,
        inputs=rows,
        parameters=_parameter_rows(inputs.method, inputs.params),
        dtype=inputs.dtype,
        plugin=inputs.plugin,
        evaluation=[e.__dict__ for e in inputs.evaluation],
        extra_sections=inputs.sections,
        usage=usage,
        recipe_yaml=inputs.recipe_yaml.strip(),
    )


def card_inputs_from_result(result, *, repo_id: str | None = None,
                            evaluation: list[Evaluation] | None = None) -> CardInputs:
    """Collect :class:`CardInputs` from an engine ``MergeResult``.

    Args:
        result: What :func:`hubmerge.engine.merge` returned.
        repo_id: The repo the card will live in.
        evaluation: Evaluation results to include.

    Returns:
        The card inputs.
    """
    from .lineage import resolved_recipe_yaml
    from .plugins import registered_methods

    registered = registered_methods().get(result.recipe.method)
    config_file = Path(result.output_dir) / "config.json"
    config = json.loads(config_file.read_text()) if config_file.is_file() else {}
    recipe_file = Path(result.output_dir) / "hubmerge_recipe.yaml"
    recipe_yaml = recipe_file.read_text() if recipe_file.is_file() else resolved_recipe_yaml(result)
    return CardInputs(
        name=result.recipe.name,
        method=type(result.method).describe(),
        params=result.method.params.model_dump(mode="json"),
        plugin=f"`{registered.plugin}` from {registered.distribution}" if registered else "?",
        base=result.base.describe(),
        experts=[e.describe() for e in result.experts],
        recipe_yaml=recipe_yaml,
        dtype=result.recipe.dtype,
        description=result.recipe.description,
        repo_id=repo_id or result.recipe.output.repo,
        config=config,
        evaluation=evaluation or [],
    )


# -- per-task deployments (FlexMerge sizes, EMR, TALL masks) ----------------------------------------------
#
# Everything below is generated from deployment metadata (each deployment's ``deployment.json``: kind,
# tasks, storage; the variants' labels, branches and scores), never from the method's name.

#: The accuracy-vs-size figure's file name, in the repo beside the card.
PLOT_FILE = "accuracy_vs_size.png"


def human_bytes(n: float) -> str:
    """``12.3 MB`` (decimal units, as the Hub shows sizes)."""
    value = float(n)
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(value) < 1000 or unit == "TB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.3g} {unit}"
        value /= 1000
    return f"{value:.3g} TB"  # pragma: no cover


def _mean(values) -> float | None:
    values = list(values)
    return sum(values) / len(values) if values else None


def deployment_tags(variants) -> list[str]:
    """Tags of a deployment card: ``hubmerge-deployment`` and every variant's ``kind``."""
    kinds = [v.manifest.get("kind") for v in variants if v.manifest.get("kind")]
    return list(dict.fromkeys([*kinds, "hubmerge-deployment"]))


def deployment_usage(repo_id: str | None, variant) -> str:
    """How to load one task from the deployment (``load_task_model``), and to export it."""
    tasks = variant.tasks
    target = repo_id or "path/to/this/deployment"
    revision = f', revision="{variant.revision}"' if variant.revision else ""
    task = tasks[0] if tasks else "TASK"
    export_revision = f" --revision {variant.revision}" if variant.revision else ""
    return (
        "from hubmerge import load_task_model\n\n"
        f"# tasks: {', '.join(tasks)}\n"
        f'model = load_task_model("{target}", "{task}"{revision})  # a plain transformers model\n\n'
        "# or, as a standalone checkpoint directory:\n"
        f"#   hubmerge export-task {target} {task} ./{task}{export_revision}"
    )


def _producer_details(manifest: dict[str, Any], limit: int = 16) -> str:
    """The scalar (and short list) entries of the manifest's producer section, as ``key `value` `` text."""
    section = manifest.get(manifest.get("kind", ""), {})
    if not isinstance(section, dict):
        return ""
    parts = []
    for key, value in section.items():
        if isinstance(value, float):
            parts.append(f"{key} `{value:.6g}`")
        elif isinstance(value, (int, str, bool)) or value is None:
            parts.append(f"{key} `{value}`")
        elif isinstance(value, list) and len(value) <= limit and all(isinstance(v, (int, float)) for v in value):
            parts.append(f"{key} `[{', '.join(f'{v:.6g}' if isinstance(v, float) else str(v) for v in value)}]`")
    return ", ".join(parts)


def deployment_sections(variants, *, current=None, repo_id: str | None = None, metric: str = "accuracy",
                        plot: str | None = None) -> list[CardSection]:
    """Card sections describing a set of deployments: sizes and storage, scores per task per size, the plot.

    Args:
        variants: :class:`hubmerge.deployment.DeploymentVariant` entries (one per size).
        current: The variant this card sits beside (marked in the tables), if any.
        repo_id: The repo holding them (for branch links).
        metric: Name of the scores' metric.
        plot: File name of the accuracy-vs-size figure beside the card, if any.

    Returns:
        The sections, in order.
    """
    variants = sorted(variants, key=lambda v: v.model_equivalents)
    if not variants:
        return []
    first = variants[0].manifest
    tasks = list(dict.fromkeys(t for v in variants for t in v.tasks))
    storage = first.get("storage", {})
    kinds = ", ".join(f"`{k}`" for k in dict.fromkeys(v.manifest.get("kind", "?") for v in variants))
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")

    def where(v) -> str:
        if not v.revision:
            return "`main`"
        if repo_id:
            return f"[`{v.revision}`]({endpoint}/{repo_id}/tree/{v.revision})"
        return f"`{v.revision}`"

    lines = [
        (f"A per-task **deployment** ({kinds}) of {len(tasks)} tasks: {', '.join(f'`{t}`' for t in tasks)}. "
         "Each task's model is rebuilt from tensors stored once (`deployment.json` maps every weight of every "
         "task to them); the weights file is not a plain checkpoint, load a task as shown below."),
        "",
        ("Size is measured in **model-equivalents**: the bytes stored divided by the bytes of one model "
         f"({human_bytes(storage.get('model_bytes', 0))} here). Bit masks count one bit per entry and task, "
         "per-task scalars 4 bytes each."),
        "",
        "| size | revision | model-equivalents | stored | |",
        "|---|---|---|---|---|",
    ]
    for v in variants:
        mark = "this revision" if current is not None and (v.label, v.revision) == (current.label,
                                                                                   current.revision) else ""
        lines.append(f"| {v.label} | {where(v)} | {v.model_equivalents:.3f} | {human_bytes(v.bytes)} "
                     f"({v.bytes:,} B) | {mark} |")
    if current is not None:
        details = _producer_details(current.manifest)
        if details:
            lines += ["", f"Producer details (`deployment.json` → `{current.manifest.get('kind')}`): {details}."]
        s = current.manifest.get("storage", {})
        tensor_bytes = s.get("tensor_bytes", s.get("bytes", 0))
        lines += ["", (f"This revision stores {s.get('bytes', 0):,} bytes: {tensor_bytes:,} in tensors and "
                       f"{s.get('scalar_bytes', 0):,} in per-task scalars, for {len(current.tasks)} task models of "
                       f"{s.get('model_bytes', 0):,} bytes each.")]
    sections = [CardSection("Deployment: sizes and storage", "\n".join(lines))]

    scored = [v for v in variants if v.scores]
    if scored:
        rows = ["Each task is evaluated with its own task model (`load_task_model(repo, task)`).", "",
                "| size | model-equivalents | " + " | ".join(tasks) + " | average |",
                "|---|---|" + "---|" * (len(tasks) + 1)]
        for v in scored:
            cells = [f"{v.scores[t]:.4f}" if t in v.scores else "" for t in tasks]
            avg = _mean(v.scores[t] for t in tasks if t in v.scores)
            rows.append(f"| {v.label} | {v.model_equivalents:.3f} | " + " | ".join(cells)
                        + f" | {'' if avg is None else f'{avg:.4f}'} |")
        if plot:
            rows += ["", f"![{metric} vs size]({plot})"]
        sections.append(CardSection(f"{metric.capitalize()} per task and size", "\n".join(rows)))
    return sections


def accuracy_size_plot(variants, path: str | Path, *, metric: str = "accuracy",
                       baselines: dict[str, dict[str, float]] | None = None, title: str | None = None) -> Path:
    """Draw the metric of every task (thin) and their average (thick) against the size, as a PNG.

    Args:
        variants: Deployments with ``scores`` (those without are skipped).
        path: Output file.
        metric: Y axis label.
        baselines: Named reference scores (task -> value, e.g. the experts on their own tasks),
            drawn as dashed horizontal lines at their average.
        title: Figure title.

    Returns:
        ``path``.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    scored = sorted((v for v in variants if v.scores), key=lambda v: v.model_equivalents)
    tasks = list(dict.fromkeys(t for v in scored for t in v.tasks if t in v.scores))
    fig = Figure(figsize=(6.4, 4.2), dpi=100)
    ax = fig.add_subplot(1, 1, 1)
    xs = [v.model_equivalents for v in scored]
    for task in tasks:
        points = [(v.model_equivalents, v.scores[task]) for v in scored if task in v.scores]
        ax.plot([p[0] for p in points], [p[1] for p in points], marker=".", linewidth=0.8, alpha=0.6, label=task)
    averages = [_mean(v.scores[t] for t in tasks if t in v.scores) for v in scored]
    ax.plot(xs, averages, marker="o", linewidth=2.4, color="black", label="average")
    for i, (name, scores) in enumerate((baselines or {}).items()):
        avg = _mean(scores.values())
        if avg is not None:
            ax.axhline(avg, linestyle="--", linewidth=1.0, color=f"C{(i + 7) % 10}", label=f"{name} (avg)")
    if tasks:  # the natural range of sizes: 1 (one merged model) to T (every expert kept)
        low, high = min([1.0, *xs]), max([float(len(tasks)), *xs])
        pad = 0.04 * (high - low or 1.0)
        ax.set_xlim(low - pad, high + pad)
    ax.set_xlabel("size (model-equivalents of storage)")
    ax.set_ylabel(metric)
    ax.set_title(title or f"{metric} vs deployment size")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="x-small", ncol=2, loc="best")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, format="png", metadata={"Software": None})
    return path


def deployment_card_inputs(result, variants, *, repo_id: str | None = None, current=None, plot: str | None = None,
                           metric: str = "accuracy", task_type: str | None = None, method_name: str | None = None,
                           params: dict[str, Any] | None = None) -> CardInputs:
    """:class:`CardInputs` for a deployment card (one variant's revision, or the overview of all).

    Args:
        result: The run (``recipe``, ``base`` and ``experts`` as resolved, ``output_dir``; ``method``
            unless ``method_name`` and ``params`` are given).
        variants: Every deployment of the set (:class:`hubmerge.deployment.DeploymentVariant`).
        repo_id: The repo the card will live in.
        current: The variant beside this card (its scores go to ``model-index``); ``None`` for an
            overview card.
        plot: File name of the accuracy-vs-size figure beside the card.
        metric: The scores' metric.
        task_type: ``model-index`` task type (default: from the pipeline tag).
        method_name: The method that merged (default: the recipe's).
        params: Its parameters (default: ``result.method``'s).

    Returns:
        The card inputs (render with :func:`build_card`).
    """
    from .plugins import registered_methods

    name = method_name or result.recipe.method
    registered = registered_methods().get(name)
    describe = (registered.method.describe() if registered else
                {"name": name, "summary": "", "paper": None, "params_schema": {}})
    if params is None:
        params = result.method.params.model_dump(mode="json")
    here = Path(current.directory) if current is not None and current.directory else Path(result.output_dir)
    config_file = here / "config.json"
    if not config_file.is_file() and variants and variants[0].directory:
        config_file = Path(variants[0].directory) / "config.json"
    config = json.loads(config_file.read_text()) if config_file.is_file() else {}
    recipe_file = here / "hubmerge_recipe.yaml"
    recipe_yaml = recipe_file.read_text() if recipe_file.is_file() else ""
    kind_type = task_type or {"image-feature-extraction": "image-classification",
                              "feature-extraction": "text-classification"}.get(pipeline_tag(config) or "",
                                                                                 pipeline_tag(config) or "other")
    evaluation = [Evaluation(task=t, metric=metric, value=v, dataset=t, task_type=kind_type)
                  for t, v in (current.scores.items() if current is not None else [])]
    shown = current or (min(variants, key=lambda v: v.model_equivalents) if variants else None)
    tasks = shown.tasks if shown is not None else []
    sizes = ", ".join(f"{v.model_equivalents:.2f}" for v in sorted(variants, key=lambda v: v.model_equivalents))
    description = (result.recipe.description + "\n\n" if result.recipe.description else "") + (
        f"One model per task for {len(tasks)} tasks, stored as a deployment of "
        + (f"{current.model_equivalents:.2f} model-equivalents" if current is not None else
           f"{len(variants)} sizes ({sizes} model-equivalents)")
        + " instead of one checkpoint per task."
    )
    if current is not None and current.revision:
        description += f" This is revision `{current.revision}` (size {current.label}); the other sizes are listed below."
    return CardInputs(
        name=result.recipe.name,
        method=describe,
        params=params,
        plugin=f"`{registered.plugin}` from {registered.distribution}" if registered else "?",
        base=result.base.describe(),
        experts=[e.describe() for e in result.experts],
        recipe_yaml=recipe_yaml,
        dtype=result.recipe.dtype,
        description=description,
        repo_id=repo_id,
        config=config,
        evaluation=evaluation,
        sections=deployment_sections(variants, current=current, repo_id=repo_id, metric=metric, plot=plot),
        extra_tags=deployment_tags(variants),
        usage=deployment_usage(repo_id, shown) if shown is not None else None,
    )
