"""Merge 8 experts of a GPT-2-small-sized model (synthetic weights) and compare with the I/O floor.

The I/O floor is the time plain safetensors needs to read every input once and write
one output of the same size, measured in the same run. Each job runs in a fresh
process; wall time and peak RSS are that process's.

    python benchmarks/bench_merge.py [--experts 8] [--dtype float32] [--repeat 2]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import yaml
from hubmerge_plugins._kernels import available as kernels_available

sys.path.insert(0, str(Path(__file__).parent))
from _measure import dir_bytes, gpt2_small_shapes, run_child, write_synthetic  # noqa: E402

GOAL_FLOOR_RATIO = 1.5
GOAL_RSS_MB = 1500


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--repeat", type=int, default=2, help="best of N runs")
    parser.add_argument("--work", default=str(Path(__file__).parent / ".work"))
    parser.add_argument("--methods", default="task_arithmetic,ties:tensor,ties:global")
    args = parser.parse_args()

    work = Path(args.work) / f"gpt2-{args.experts}x-{args.dtype}"
    base, experts = write_synthetic(work / "models", gpt2_small_shapes(), args.experts, getattr(torch, args.dtype))
    inputs = [base, *experts]
    read_bytes = sum(dir_bytes(d) for d in inputs)
    floor_spec = json.dumps({"inputs": [str(d / "model.safetensors") for d in inputs],
                             "output": str(work / "floor.safetensors")})
    floor = min((run_child("floor", floor_spec) for _ in range(args.repeat)), key=lambda r: r["wall"])

    rows = []
    for spec in args.methods.split(","):
        method, _, scope = spec.partition(":")
        params = {"scale": 0.3} if method == "task_arithmetic" else {"k": 0.2, "scope": scope or "global"}
        recipe = {"hubmerge": 1, "name": "bench", "base": str(base), "experts": [str(e) for e in experts],
                  "method": method, "params": params, "device": "cpu",
                  "output": {"path": str(work / f"out-{method}-{scope or 'x'}")}}
        recipe_file = work / f"{method}-{scope or 'x'}.yaml"
        recipe_file.write_text(yaml.safe_dump(recipe))
        best = min((run_child("merge", str(recipe_file)) for _ in range(args.repeat)), key=lambda r: r["wall"])
        rows.append((spec, best))

    lines = [
        f"# bench_merge: {args.experts} experts of a GPT-2-small-sized model ({args.dtype}), CPU, "
        f"{torch.get_num_threads()} threads",
        "",
        f"inputs read once: {read_bytes / 1e9:.2f} GB; output: {dir_bytes(base) / 1e9:.2f} GB",
        f"I/O floor (plain safetensors: read all inputs + write one output): {floor['wall']:.2f} s, "
        f"peak RSS {floor['peak_rss_mb']:.0f} MB",
        f"TIES loops: {'compiled C kernels' if kernels_available() else 'torch (no compiled kernels)'}"
        " (`HUBMERGE_KERNELS=torch` compares)",
        "",
        "| method | wall (s) | x floor | peak RSS (MB) | goal wall <= 1.5x floor | goal RSS <= 1.5 GB |",
        "|---|---|---|---|---|---|",
    ]
    for spec, r in rows:
        ratio = r["wall"] / floor["wall"]
        lines.append(f"| {spec} | {r['wall']:.2f} | {ratio:.2f} | {r['peak_rss_mb']:.0f} | "
                     f"{'met' if ratio <= GOAL_FLOOR_RATIO else 'NOT met'} | "
                     f"{'met' if r['peak_rss_mb'] <= GOAL_RSS_MB else 'NOT met'} |")
    text = "\n".join(lines) + "\n"
    print(text)
    out = Path(__file__).parent / "results" / "merge.md"
    out.write_text(text)


if __name__ == "__main__":
    main()
