"""Publishing a finished merge (re-render its card for the target repo, push in one commit) and per-task
deployments (FlexMerge sizes on branches, EMR/TALL deployments), with cards generated from their metadata."""

from __future__ import annotations

from pathlib import Path

from .card import Evaluation, build_card, card_inputs_from_result
from .hub import push_folder


def publish_merge(result, repo_id: str, *, private: bool = False, token: str | None = None,
                  evaluation: list[Evaluation] | None = None, sections=None) -> str:
    """Write the card for ``repo_id`` into the output directory and push it.

    Args:
        result: A finished :class:`hubmerge.engine.MergeResult`.
        repo_id: Target Hub repo.
        private: Create the repo private.
        token: Write token (``None``: ``HF_TOKEN`` or the stored login).
        evaluation: Results to put in the card's ``model-index``.
        sections: Extra :class:`hubmerge.card.CardSection` entries.

    Returns:
        The commit hash.

    Raises:
        HubError: If the push fails; the repo is then unchanged.
    """
    inputs = card_inputs_from_result(result, repo_id=repo_id, evaluation=evaluation)
    inputs.sections = list(sections or [])
    card = build_card(inputs)
    (result.output_dir / "README.md").write_text(str(card), encoding="utf-8")
    return push_folder(result.output_dir, repo_id, private=private, token=token,
                       commit_message=f"hubmerge: {result.recipe.method} merge of {len(result.experts)} models")


# -- per-task deployments ---------------------------------------------------------------------------------
#
# Layout on the Hub (one repo per run):
#   * a FlexMerge run: each requested size on its own branch ``size-<s>`` (the directory name of the size,
#     e.g. ``size-2``, ``size-1.5``), holding that deployment, its card and the accuracy-vs-size figure;
#     ``main`` holds the overview: a card listing every size (storage, scores, figure), ``flexmerge.json``
#     and the resolved recipe of the whole run. Sizes are variants of one artifact, as quantisations
#     are published as branches of one repo; ``load_task_model(repo, task, revision="size-2")`` and
#     ``hubmerge export-task repo task out --revision size-2`` read a size.
#   * an EMR or TALL deployment: ``main`` holds the deployment and its card.
# Branches are pushed first and ``main`` last, so the overview never names a size that is not there.
# Each push is one commit; a re-publish to an existing repo adds and replaces files (a branch keeps
# files the new deployment no longer has).


def deployment_variants(result, evaluation=None) -> list:
    """The deployments a run wrote, as :class:`hubmerge.deployment.DeploymentVariant` entries.

    Args:
        result: A :class:`hubmerge.flexmerge.FlexMergeResult` (one variant per size, on branch
            ``size-<s>``) or the :class:`hubmerge.engine.MergeResult` of
            :func:`hubmerge.deployment.run_deployment` (one variant, on ``main``).
        evaluation: Scores per variant: ``{size label or branch: {task: value}}``; for a single
            deployment also a flat ``{task: value}``.

    Returns:
        The variants, in the run's order.
    """
    from .deployment import DeploymentVariant, _default_label, read_manifest

    evaluation = dict(evaluation or {})
    if hasattr(result, "deployments"):
        variants = [DeploymentVariant(p.size.label, p.size.directory, read_manifest(p.path), Path(p.path))
                    for p in result.deployments]
    else:
        manifest = read_manifest(result.output_dir)
        variants = [DeploymentVariant(_default_label(manifest), None, manifest, Path(result.output_dir))]
    for v in variants:
        scores = evaluation.get(v.label, evaluation.get(v.revision or "main"))
        if scores is None and len(variants) == 1 and evaluation and all(
                isinstance(x, (int, float)) for x in evaluation.values()):
            scores = evaluation
        v.scores = {t: float(x) for t, x in (scores or {}).items()}
    return variants


def publish_deployment(result, repo_id: str, *, private: bool = False, token: str | None = None,
                       evaluation=None, baselines: dict[str, dict[str, float]] | None = None,
                       metric: str = "accuracy", task_type: str | None = None) -> dict[str, str]:
    """Push a run's per-task deployments with cards generated from their metadata.

    A FlexMerge run goes to one repo: every size on branch ``size-<s>``, the overview on ``main``;
    an EMR or TALL deployment to ``main`` (see the comment above). Every card lists the sizes with
    their storage (model-equivalents and bytes) and, when ``evaluation`` is given, the metric per
    task per size with an accuracy-vs-size plot (``accuracy_vs_size.png`` beside the card). Cards
    carry ``base_model`` (every input repo), ``base_model_relation: merge`` and the tags
    ``hubmerge``, ``merge``, the method, the deployment kind (``flexmerge``, ``emr``, ``tall``) and
    ``hubmerge-deployment``; a size's card puts that size's scores in ``model-index``.

    Args:
        result: What :func:`hubmerge.flexmerge.run_flexmerge` or :func:`hubmerge.deployment.run_deployment`
            returned (their output directories must still exist; cards and the plot are written there).
        repo_id: Target repo.
        private: Create the repo private.
        token: Write token (``None``: ``HF_TOKEN`` or the stored login).
        evaluation: Scores per size (see :func:`deployment_variants`), each task evaluated with its
            own task model.
        baselines: Named reference scores for the plot (e.g. ``{"experts": {task: value}}``).
        metric: The scores' metric.
        task_type: ``model-index`` task type (default from the pipeline tag).

    Returns:
        Revision (``size-2``..., ``main``) to commit hash, in push order.

    Raises:
        HubError: A push failed (earlier branches stay pushed; ``main`` is pushed last).
    """
    import shutil
    import tempfile

    from .card import PLOT_FILE, accuracy_size_plot, build_card, deployment_card_inputs
    from .dynamic import MANIFEST as DYNAMIC_MANIFEST

    if (Path(result.output_dir) / DYNAMIC_MANIFEST).is_file():  # SE-Merging (hubmerge.dynamic): its own card
        from .dynamic import publish_dynamic

        return {"main": publish_dynamic(result, repo_id, private=private, token=token, task_type=task_type)}
    from .flexmerge import ROOT_SUMMARY
    from .writer import OWNER_MARKER

    variants = deployment_variants(result, evaluation)
    flex = hasattr(result, "deployments")
    method_name = result.inner.name if flex else None
    params = dict(result.inner.params) if flex else None
    plot = PLOT_FILE if any(v.scores for v in variants) else None
    tasks = variants[0].tasks if variants else []
    title = f"{result.recipe.name}: {metric} per task vs size ({len(tasks)} tasks)"

    def card_for(current, here: Path) -> str:
        if plot:
            accuracy_size_plot(variants, here / plot, metric=metric, baselines=baselines, title=title)
        inputs = deployment_card_inputs(result, variants, repo_id=repo_id, current=current, plot=plot, metric=metric,
                                        task_type=task_type, method_name=method_name, params=params)
        return str(build_card(inputs))

    commits: dict[str, str] = {}
    for v in variants:
        if v.revision is None:
            continue
        (v.directory / "README.md").write_text(card_for(v, v.directory), encoding="utf-8")
        commits[v.revision] = push_folder(
            v.directory, repo_id, private=private, token=token, revision=v.revision,
            commit_message=f"hubmerge: {v.manifest.get('kind')} deployment, size {v.label} "
                           f"({v.model_equivalents:.3f} model-equivalents) of {len(v.tasks)} tasks")
    main = next((v for v in variants if v.revision is None), None)
    if main is not None:
        (main.directory / "README.md").write_text(card_for(main, main.directory), encoding="utf-8")
        commits["main"] = push_folder(
            main.directory, repo_id, private=private, token=token,
            commit_message=f"hubmerge: {main.manifest.get('kind')} deployment ({main.model_equivalents:.3f} "
                           f"model-equivalents) of {len(main.tasks)} tasks")
    else:  # the overview of a FlexMerge run
        with tempfile.TemporaryDirectory(prefix="hubmerge-overview-") as tmp:
            stage = Path(tmp)
            root = Path(result.output_dir)
            for name in (ROOT_SUMMARY, OWNER_MARKER):
                if (root / name).is_file():
                    shutil.copyfile(root / name, stage / name)
            (stage / "README.md").write_text(card_for(None, stage), encoding="utf-8")
            commits["main"] = push_folder(
                stage, repo_id, private=private, token=token,
                commit_message=f"hubmerge: FlexMerge overview, {len(variants)} sizes on branches "
                               + ", ".join(v.revision for v in variants if v.revision))
    return commits
