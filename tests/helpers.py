"""Small real models and recipes for tests (built offline, in temp dirs)."""

from __future__ import annotations

from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file, save_file


def tiny_bert_config():
    from transformers import BertConfig

    return BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37,
                      vocab_size=99, max_position_embeddings=64)


def make_base(directory: Path, seed: int = 0) -> Path:
    """Save a tiny random BertModel with safetensors."""
    from transformers import BertModel

    torch.manual_seed(seed)
    model = BertModel(tiny_bert_config()).eval()
    model.save_pretrained(directory)
    return directory


def make_expert(base: Path, directory: Path, seed: int, scale: float = 0.02) -> Path:
    """A 'fine-tune' of ``base``: every floating tensor moved by seeded noise."""
    import shutil

    state = load_file(base / "model.safetensors")
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name, tensor in state.items():
        if tensor.dtype.is_floating_point:
            out[name] = tensor + scale * torch.randn(tensor.shape, generator=gen, dtype=tensor.dtype)
        else:
            out[name] = tensor.clone()
    directory.mkdir(parents=True, exist_ok=True)
    for f in base.iterdir():
        if f.name != "model.safetensors" and f.is_file():
            shutil.copy(f, directory / f.name)
    save_file(out, directory / "model.safetensors", metadata={"format": "pt"})
    return directory


def write_recipe(path: Path, **fields) -> Path:
    data = {"hubmerge": 1, "name": "test-merge", **fields}
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path
