"""Publishing a finished merge: re-render its card for the target repo, push in one commit."""

from __future__ import annotations

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
