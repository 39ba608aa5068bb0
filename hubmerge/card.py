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
