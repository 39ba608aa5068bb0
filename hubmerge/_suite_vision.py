"""Vision part of :mod:`hubmerge.suite`: a tiny ViT on scikit-learn's 8×8 digits.

Pre-training (the "generic task"): classify digits 0 .. ``pretrain_classes``-1, shown upright
and upside down. The tasks then ask for things the base was not trained on: all ten digits,
derived labels, and new input domains (inverted, noisy, thick-stroked, occluded digits), so that
every expert gains over ``base + its head`` while the base stays a useful starting point for
merging (see ``shared/SUITE.md`` for the pilot this follows).

Each expert: a linear probe (logistic regression) fitted on the base's pooled features becomes
the task head; then the whole encoder is fine-tuned with that head frozen.
"""

from __future__ import annotations

import copy
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .errors import SuiteError
from .suite import HEAD_FILE, PRETEXT_HEAD_FILE, TASK_FILE, VisionConfig, pooled_features, seeded

logger = logging.getLogger(__name__)

POOLING = "pooler"
_DIGITS = tuple(str(d) for d in range(10))
_PRIMES = (2, 3, 5, 7)


@dataclass(frozen=True)
class VisionTask:
    """A task derived from the digits: a view of the image and a label of the digit.

    Attributes:
        name: Task name.
        description: One line for people.
        view: Name of the image transform (:data:`VIEWS`).
        labels: Class names.
        label_of: Digit array -> class ids.
    """

    name: str
    description: str
    view: str
    labels: tuple[str, ...]
    label_of: Callable[[np.ndarray], np.ndarray]


def _digit(y: np.ndarray) -> np.ndarray:
    return y


VISION_TASKS: dict[str, VisionTask] = {t.name: t for t in (
    VisionTask("digit", "Which digit (0-9) is shown.", "identity", _DIGITS, _digit),
    VisionTask("parity", "Is the digit even or odd.", "identity", ("even", "odd"), lambda y: y % 2),
    VisionTask("ge5", "Is the digit at least 5.", "identity", ("below 5", "5 or more"), lambda y: (y >= 5).astype(np.int64)),
    VisionTask("prime", "Is the digit a prime (2, 3, 5, 7).", "identity", ("not prime", "prime"),
               lambda y: np.isin(y, _PRIMES).astype(np.int64)),
    VisionTask("invert", "Which digit, drawn light on dark inverted (1 - x).", "invert", _DIGITS, _digit),
    VisionTask("noisy", "Which digit, under additive Gaussian pixel noise.", "noisy", _DIGITS, _digit),
    VisionTask("thick", "Which digit, with strokes thickened (2x2 grey dilation).", "thick", _DIGITS, _digit),
    VisionTask("occluded", "Which digit, with a 3x3 block blanked out.", "occluded", _DIGITS, _digit),
    VisionTask("rot90", "Which digit, rotated by 90 degrees.", "rot90", _DIGITS, _digit),
    VisionTask("mirror", "Which digit, mirrored left-right.", "mirror", _DIGITS, _digit),
)}


def _view(name: str, x: np.ndarray, idx: np.ndarray, config: VisionConfig) -> np.ndarray:
    """Apply image view ``name`` to images ``x`` (their dataset indices ``idx`` seed per-image noise)."""
    if name == "identity":
        return x
    if name == "rot180":
        return np.rot90(x, 2, axes=(1, 2)).copy()
    if name == "rot90":
        return np.rot90(x, 1, axes=(1, 2)).copy()
    if name == "mirror":
        return x[:, :, ::-1].copy()
    if name == "invert":
        return 1.0 - x
    if name == "noisy":
        noise = np.random.RandomState(config.seed + 1).normal(0.0, config.noise_std, size=(1797, 8, 8))
        return np.clip(x + noise[idx].astype(np.float32), 0.0, 1.0)
    if name == "thick":
        from scipy.ndimage import grey_dilation

        return np.stack([grey_dilation(img, size=(2, 2)) for img in x])
    if name == "occluded":
        corners = np.random.RandomState(config.seed + 2).randint(0, 6, size=(1797, 2))[idx]
        out = x.copy()
        for k, (i, j) in enumerate(corners):
            out[k, i:i + 3, j:j + 3] = 0.0
        return out
    raise SuiteError(f"unknown image view {name!r}")


def _digits(config: VisionConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Images in [0, 1], digits, and the seeded train / test index split."""
    from sklearn.datasets import load_digits

    data = load_digits()
    images = (data.images / 16.0).astype(np.float32)
    order = np.random.RandomState(config.seed).permutation(len(images))
    if not 0 < config.n_train < len(images):
        raise SuiteError(f"vision n_train must be between 1 and {len(images) - 1}, got {config.n_train}")
    return images, data.target.astype(np.int64), order[:config.n_train], order[config.n_train:]


def task_split(task: VisionTask, split_idx: np.ndarray, images: np.ndarray, digits: np.ndarray,
               config: VisionConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """``pixel_values`` [N, 1, 8, 8] and labels [N] of one task on the given indices."""
    x = _view(task.view, images[split_idx], split_idx, config)
    y = task.label_of(digits[split_idx])
    return torch.from_numpy(np.ascontiguousarray(x)).unsqueeze(1), torch.from_numpy(np.asarray(y, dtype=np.int64))


def _vit_config(config: VisionConfig):
    from transformers import ViTConfig

    return ViTConfig(image_size=8, patch_size=config.patch_size, num_channels=1, hidden_size=config.hidden_size,
                     num_hidden_layers=config.num_layers, num_attention_heads=config.num_heads,
                     intermediate_size=config.intermediate_size, hidden_dropout_prob=0.0,
                     attention_probs_dropout_prob=0.0)


def _train(encoder: torch.nn.Module, head: torch.nn.Linear, x: torch.Tensor, y: torch.Tensor, *, epochs: int,
           lr: float, config: VisionConfig, seed: int, train_head: bool) -> None:
    """Minibatch AdamW on cross-entropy of ``head(pooled(encoder(x)))``; the order is seeded."""
    params = list(encoder.parameters()) + (list(head.parameters()) if train_head else [])
    head.requires_grad_(train_head)
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=config.weight_decay)
    order = torch.Generator().manual_seed(seed)
    encoder.train()
    for _ in range(epochs):
        perm = torch.randperm(len(y), generator=order)
        for start in range(0, len(y), config.batch_size):
            batch = perm[start:start + config.batch_size]
            logits = head(pooled_features(encoder, {"pixel_values": x[batch]}, POOLING))
            loss = F.cross_entropy(logits, y[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    encoder.eval()
    head.requires_grad_(True)


@torch.no_grad()
def _features(encoder: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    encoder.eval()
    return torch.cat([pooled_features(encoder, {"pixel_values": x[i:i + 512]}, POOLING)
                      for i in range(0, len(x), 512)])


def fit_probe(features: torch.Tensor, labels: torch.Tensor, num_labels: int) -> torch.nn.Linear:
    """A linear head fitted by (deterministic, L-BFGS) multinomial logistic regression.

    Args:
        features: [N, hidden] features.
        labels: [N] class ids in ``range(num_labels)``.
        num_labels: Number of classes (a binary probe is written as two symmetric logits).

    Returns:
        The head as ``torch.nn.Linear(hidden, num_labels)``.
    """
    from sklearn.linear_model import LogisticRegression

    clf = LogisticRegression(max_iter=3000, C=1.0).fit(features.numpy(), labels.numpy())
    if num_labels == 2:
        weight = np.concatenate([-clf.coef_ / 2, clf.coef_ / 2])
        bias = np.concatenate([-clf.intercept_ / 2, clf.intercept_ / 2])
    else:
        if len(clf.classes_) != num_labels:
            raise SuiteError(f"probe saw {len(clf.classes_)} of {num_labels} classes; use more training data")
        weight, bias = clf.coef_, clf.intercept_
    head = torch.nn.Linear(features.shape[1], num_labels)
    with torch.no_grad():
        head.weight.copy_(torch.as_tensor(weight, dtype=torch.float32))
        head.bias.copy_(torch.as_tensor(bias, dtype=torch.float32))
    return head


@torch.no_grad()
def _accuracy(encoder: torch.nn.Module, head: torch.nn.Linear, x: torch.Tensor, y: torch.Tensor) -> float:
    return float((head(_features(encoder, x)).argmax(-1) == y).float().mean())


def _save_head(head: torch.nn.Linear, path: Path) -> None:
    from safetensors.torch import save_file

    save_file({"weight": head.weight.detach().contiguous(), "bias": head.bias.detach().contiguous()}, str(path),
              metadata={"format": "pt"})


def _readme(title: str, body: str) -> str:
    return f"---\nlibrary_name: transformers\ntags:\n- hubmerge-suite\n- vit\n---\n# {title}\n\n{body}\n"


def build(out: Path, config: VisionConfig, *, final: Path | None = None) -> dict[str, Any]:
    """Build the vision part into ``out`` (the caller moves it into place).

    Args:
        out: Empty directory.
        config: The settings.
        final: Where the part will live (unused: nothing in it refers to its own path).

    Returns:
        The manifest (base path, experts with their task and measured accuracies).

    Raises:
        SuiteError: An unknown task name or an unusable setting.
    """
    from safetensors.torch import save_file
    from transformers import ViTModel

    unknown = [t for t in config.tasks if t not in VISION_TASKS]
    if unknown:
        raise SuiteError(f"unknown vision task(s) {unknown}; known: {', '.join(VISION_TASKS)}")
    images, digits, train_idx, test_idx = _digits(config)

    # 1. Pre-training: digits 0..pretrain_classes-1, in the pretext views.
    keep = train_idx[digits[train_idx] < config.pretrain_classes]
    xs, ys = [], []
    for view in config.pretrain_views:
        xs.append(torch.from_numpy(np.ascontiguousarray(_view(view, images[keep], keep, config))).unsqueeze(1))
        ys.append(torch.from_numpy(digits[keep]))
    x_pre, y_pre = torch.cat(xs), torch.cat(ys)
    with seeded(config.seed):
        base = ViTModel(_vit_config(config))
        pretext_head = torch.nn.Linear(config.hidden_size, config.pretrain_classes)
        _train(base, pretext_head, x_pre, y_pre, epochs=config.pretrain_epochs, lr=config.pretrain_lr, config=config,
               seed=config.seed, train_head=True)
    base.eval()
    base_dir = out / "base"
    base.save_pretrained(base_dir)
    _save_head(pretext_head, base_dir / PRETEXT_HEAD_FILE)
    pretext = {
        "name": "pretext", "domain": "vision", "pooling": POOLING,
        "description": f"Pre-training task: digits 0-{config.pretrain_classes - 1} in views "
                       f"{', '.join(config.pretrain_views)}.",
        "labels": list(_DIGITS[:config.pretrain_classes]),
        "head": {"file": PRETEXT_HEAD_FILE, "in_features": config.hidden_size,
                 "out_features": config.pretrain_classes},
    }
    (base_dir / TASK_FILE).write_text(json.dumps(pretext, indent=2) + "\n")
    (base_dir / "README.md").write_text(_readme(
        "hubmerge suite: vision base", f"A tiny `ViTModel` (8x8 digits, patch {config.patch_size}, hidden "
        f"{config.hidden_size}, {config.num_layers} layers) pre-trained on {pretext['description'][len('Pre-training task: '):]}"
        f"\nInputs: `pixel_values` [N, 1, 8, 8], scikit-learn digits divided by 16.\n"
        f"Its pretext head is `{PRETEXT_HEAD_FILE}` (on the pooler output)."))

    # 2. Experts: probe head on the base, then full fine-tune with the head frozen.
    experts = []
    data_dir = out / "data"
    data_dir.mkdir()
    for i, name in enumerate(config.tasks):
        task = VISION_TASKS[name]
        x_tr, y_tr = task_split(task, train_idx, images, digits, config)
        x_te, y_te = task_split(task, test_idx, images, digits, config)
        head = fit_probe(_features(base, x_tr), y_tr, len(task.labels))
        base_acc = _accuracy(base, head, x_te, y_te)
        expert = copy.deepcopy(base)
        _train(expert, head, x_tr, y_tr, epochs=config.finetune_epochs, lr=config.finetune_lr, config=config,
               seed=config.seed + 100 + i, train_head=False)
        expert_acc = _accuracy(expert, head, x_te, y_te)
        logger.info("suite vision: %-9s base+head %.3f  expert %.3f", name, base_acc, expert_acc)
        directory = out / "experts" / name
        expert.save_pretrained(directory)
        _save_head(head, directory / HEAD_FILE)
        spec = {
            "name": name, "domain": "vision", "description": task.description, "labels": list(task.labels),
            "pooling": POOLING, "metric": "accuracy",
            "input": {"type": "image", "view": task.view, "pixel_values": "[N, 1, 8, 8] digits / 16"},
            "head": {"file": HEAD_FILE, "in_features": config.hidden_size, "out_features": len(task.labels),
                     "fitted": "logistic-regression probe on the base encoder, frozen during fine-tuning"},
            "expert": {"kind": "full", "train_examples": len(y_tr), "epochs": config.finetune_epochs,
                       "lr": config.finetune_lr, "optimizer": "AdamW", "weight_decay": config.weight_decay},
            "test_examples": len(y_te),
            "metrics": {"expert": round(expert_acc, 6), "base": round(base_acc, 6)},
        }
        (directory / TASK_FILE).write_text(json.dumps(spec, indent=2) + "\n")
        (directory / "README.md").write_text(_readme(
            f"hubmerge suite: vision expert `{name}`",
            f"{task.description} Full fine-tune of the suite's vision base; the task head "
            f"(`{HEAD_FILE}`, on the pooler output) is described in `{TASK_FILE}`.\n\n"
            f"Test accuracy: expert {expert_acc:.3f}, base + head {base_acc:.3f} ({len(y_te)} images)."))
        save_file({"pixel_values": x_te.contiguous(), "labels": y_te.contiguous()}, str(data_dir / f"{name}.safetensors"))
        experts.append({"name": name, "task": name, "kind": "full", "path": f"experts/{name}",
                        "test_data": f"data/{name}.safetensors",
                        "metrics": {"expert": round(expert_acc, 6), "base": round(base_acc, 6)}})
    return {"base": "base", "experts": experts}
