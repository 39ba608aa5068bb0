"""Build the demo/benchmark suite and measure it: base + heads, each expert, task arithmetic.

Task arithmetic here is the suite's in-memory reference (``hubmerge.suite.task_arithmetic``),
not the engine, so the table is an independent yardstick for the merge methods.

    python benchmarks/bench_suite.py [--root DIR] [--scales 0.1 0.2 0.3 0.5] [--small] [--out FILE]
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from pathlib import Path

from hubmerge.suite import (
    SuiteConfig,
    base_state_dict,
    build_suite,
    evaluate,
    evaluate_all,
    expert_state_dict,
    task_arithmetic,
)


def _avg(values) -> float:
    values = list(values)
    return sum(values) / len(values)


def measure(suite, scales: list[float]) -> list[str]:
    """Markdown lines: one table per domain (rows: base + heads, experts, task arithmetic per scale)."""
    lines = []
    for domain in suite.domains:
        tasks = suite.tasks_for(domain)
        base = evaluate_all(suite.base_dir(domain), suite, domain=domain)
        experts = {e.task: evaluate(e.path, e.task, suite) for e in suite.experts_for(domain)}
        rows = [("base + heads", base), ("experts (each on its task)", experts)]
        base_sd = base_state_dict(suite, domain)
        expert_sds = [expert_state_dict(suite, e.name) for e in suite.experts_for(domain)]
        for scale in scales:
            rows.append((f"task arithmetic λ={scale:g}", evaluate_all(task_arithmetic(base_sd, expert_sds, scale),
                                                                      suite, domain=domain)))
        gap = _avg(experts.values()) - _avg(base.values())
        lines += [f"### {domain} ({len(tasks)} tasks, kind {suite.experts_for(domain)[0].kind})", "",
                  "| model | " + " | ".join(tasks) + " | avg | normalised | share of gap |",
                  "|---|" + "---|" * (len(tasks) + 3)]
        for label, scores in rows:
            avg = _avg(scores[t] for t in tasks)
            norm = _avg(scores[t] / experts[t] for t in tasks)
            share = (avg - _avg(base.values())) / gap if gap else float("nan")
            lines.append(f"| {label} | " + " | ".join(f"{scores[t]:.3f}" for t in tasks)
                         + f" | **{avg:.3f}** | {norm:.3f} | {share:+.2f} |")
        lines.append("")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--root", type=Path, default=None, help="suite directory (reused if built; default: temp)")
    parser.add_argument("--scales", type=float, nargs="+", default=[0.1, 0.2, 0.3, 0.5])
    parser.add_argument("--small", action="store_true", help="the reduced test suite")
    parser.add_argument("--which", nargs="+", default=["vision", "text"])
    parser.add_argument("--out", type=Path, default=None, help="also write the markdown here")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    with tempfile.TemporaryDirectory() as tmp:
        root = args.root or Path(tmp)
        started = time.perf_counter()
        suite = build_suite(root, which=args.which, config=SuiteConfig.small() if args.small else None)
        wall = time.perf_counter() - started
        lines = ["## hubmerge suite", "",
                 f"build: {wall:.1f} s wall ("
                 + ", ".join(f"{d} {s:.1f} s" for d, s in suite.build_seconds.items()) + "; 0 = reused)", ""]
        lines += measure(suite, args.scales)
    text = "\n".join(lines)
    sys.stdout.write(text + "\n")
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
