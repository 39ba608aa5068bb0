"""WUDI-Merging per-step cost: the Gram-form gradient against autograd through the T-term loss.

For T synthetic task vectors of a linear layer, both paths run Adam (lr 1e-5) from
``τ_m = Σ_t τ_t`` for the same number of steps:

* **autograd**: the reference implementations' loop — ``loss = Σ_t ‖(τ_m − τ_t) τ_tᵀ‖² / ‖τ_t‖²``
  through ``torch.matmul`` on the stacked task vectors, ``loss.backward()``,
  ``torch.optim.Adam.step()``;
* **Gram** (``hubmerge_plugins.wudi``): ``S = Σ w_t τ_tᵀτ_t`` and ``C = Σ w_t τ_t τ_tᵀ τ_t``
  once per layer (reported apart as "precompute"), then ``∇ = 2(τ_m S − C)`` per step.

It prints, per layer shape, the median time of one step, the speed-up, the projected
time of the paper's 300 steps, and the final loss of both paths (recomputed in float64
from the T-term definition), which must agree to 1e-5 relative. The table is also
written to ``benchmarks/results/wudi.md``.

    python benchmarks/bench_wudi.py [--tasks 8] [--steps 3] [--shapes 768x768,3072x768,768x3072] [--threads 1]

Both paths run single-threaded by default: the comparison is of the work each step does, and
on a machine shared with other jobs a multi-threaded mid-size matmul loses most of its time
in thread contention (``--threads 0`` keeps torch's default).
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import os
import platform
import statistics
import time
from pathlib import Path

import torch
from hubmerge_plugins.wudi import GramObjective, adam, task_weights

GOAL_SPEEDUP = 5.0
LOSS_RTOL = 1e-5
PAPER_STEPS = 300


def synthetic_task_vectors(tasks: int, out_features: int, in_features: int, seed: int) -> torch.Tensor:
    """Task vectors with a shared low-rank part and task-specific parts (so that tasks interfere)."""
    gen = torch.Generator().manual_seed(seed)
    rank = max(1, min(out_features, in_features) // 16)
    shared = torch.randn(out_features, rank, generator=gen) @ torch.randn(rank, in_features, generator=gen)
    own = torch.randn(tasks, out_features, in_features, generator=gen)
    return 1e-3 * (0.5 * shared / rank**0.5 + own)


def t_term_loss(tau_m: torch.Tensor, deltas: torch.Tensor, sq_norms: torch.Tensor) -> torch.Tensor:
    """The reference loss: Σ_t ‖(τ_m − τ_t) τ_tᵀ‖²_F / ‖τ_t‖²_F, through the stacked product."""
    product = torch.matmul(tau_m.unsqueeze(0) - deltas, deltas.transpose(1, 2))
    return torch.sum(product.square() / sq_norms.reshape(-1, 1, 1))


def exact_loss(tau_m: torch.Tensor, deltas: torch.Tensor) -> float:
    """The T-term loss in float64, one task at a time."""
    tau_m, total = tau_m.double(), 0.0
    for delta in deltas:
        delta = delta.double()
        total += float(((tau_m - delta) @ delta.T).square().sum() / delta.square().sum())
    return total


def run_autograd(deltas: torch.Tensor, steps: int, lr: float) -> tuple[torch.Tensor, list[float]]:
    """Adam through autograd on the T-term loss; returns the final τ_m and per-step seconds."""
    sq_norms = deltas.reshape(deltas.shape[0], -1).square().sum(dim=1)
    param = torch.nn.Parameter(deltas.sum(dim=0))
    optimizer = torch.optim.Adam([param], lr=lr)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        loss = t_term_loss(param, deltas, sq_norms)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        times.append(time.perf_counter() - start)
    return param.detach(), times


def run_gram(deltas: torch.Tensor, steps: int, lr: float) -> tuple[torch.Tensor, float, list[float], bool]:
    """Adam on the Gram-form gradient.

    Returns:
        The final τ_m, the precompute seconds, the per-step seconds and whether the
        factored product ``(τ_m Xᵀ) X`` was used instead of ``τ_m S``.
    """
    start = time.perf_counter()
    objective = GramObjective(deltas, task_weights(deltas))
    precompute = time.perf_counter() - start
    times = []

    def timed_gradient(tau_m: torch.Tensor) -> torch.Tensor:
        times.append(time.perf_counter())
        return objective.gradient(tau_m)

    result = adam(deltas.sum(dim=0), timed_gradient, steps, lr)
    marks = times + [time.perf_counter()]
    return result, precompute, [b - a for a, b in itertools.pairwise(marks)], objective.X is not None


def bench_shape(tasks: int, out_features: int, in_features: int, steps: int, lr: float, seed: int,
                extra_gram_steps: int = 0) -> dict:
    """Measure both paths on one layer shape.

    ``flop_ratio`` is the matmul work of one autograd step (forward ``(τ_m − τ_t) τ_tᵀ`` and
    backward, ``2·T·out²·in`` multiply-adds) over one Gram step (``min(out·in², 2·T·out²·in)``):
    the speed-up to expect when both run at the same FLOP rate.
    """
    deltas = synthetic_task_vectors(tasks, out_features, in_features, seed)
    warm = deltas[:, : min(out_features, 64), : min(in_features, 64)].contiguous()
    run_autograd(warm, 1, lr)  # first-call overheads outside the measurement
    run_gram(warm, 1, lr)  # (each path's timed steps are then medians)
    gram_tau, precompute, gram_times, factored = run_gram(deltas, steps, lr)
    if extra_gram_steps:  # the Gram step is cheap: time more of them for a steadier median
        gram_times += run_gram(deltas, extra_gram_steps, lr)[2]
    auto_tau, auto_times = run_autograd(deltas, steps, lr)
    auto_step, gram_step = statistics.median(auto_times), statistics.median(gram_times)
    out_, in_, t_ = out_features, in_features, tasks
    flop_ratio = (2 * t_ * out_ * out_ * in_) / min(out_ * in_ * in_, 2 * t_ * out_ * out_ * in_)
    loss_auto, loss_gram = exact_loss(auto_tau, deltas), exact_loss(gram_tau, deltas)
    return {
        "shape": f"{out_features}x{in_features}",
        "tasks": tasks,
        "steps": steps,
        "auto_ms": 1e3 * auto_step,
        "gram_ms": 1e3 * gram_step,
        "speedup": auto_step / gram_step,
        "flop_ratio": flop_ratio,
        "precompute_ms": 1e3 * precompute,
        "auto_300_s": PAPER_STEPS * auto_step,
        "gram_300_s": precompute + PAPER_STEPS * gram_step,
        "loss_start": exact_loss(deltas.sum(dim=0), deltas),
        "loss_auto": loss_auto,
        "loss_gram": loss_gram,
        "rel_diff": abs(loss_auto - loss_gram) / abs(loss_auto),
        "form": "(τ_m Xᵀ) X" if factored else "τ_m S",
    }


COLUMNS = [  # (header, format of one row)
    ("layer (out×in)", "{shape}"),
    ("T", "{tasks}"),
    ("steps", "{steps}"),
    ("Gram product", "{form}"),
    ("autograd ms/step", "{auto_ms:.1f}"),
    ("Gram ms/step", "{gram_ms:.1f}"),
    ("speed-up", "{speedup:.1f}×"),
    ("FLOP ratio", "{flop_ratio:.0f}×"),
    ("Gram precompute ms", "{precompute_ms:.0f}"),
    ("300 steps autograd s", "{auto_300_s:.1f}"),
    ("300 steps Gram s", "{gram_300_s:.1f}"),
    ("loss at start", "{loss_start:.6e}"),
    ("final loss autograd", "{loss_auto:.9e}"),
    ("final loss Gram", "{loss_gram:.9e}"),
    ("rel. diff", "{rel_diff:.1e}"),
]


def table(rows: list[dict]) -> str:
    """The results as a Markdown table."""
    lines = ["| " + " | ".join(h for h, _ in COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(f.format(**r) for _, f in COLUMNS) + " |" for r in rows]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tasks", type=int, default=8)
    parser.add_argument("--steps", type=int, default=3,
                        help="Adam steps timed per path and shape (the same for both)")
    parser.add_argument("--lr", type=float, default=1e-5)
    parser.add_argument("--shapes", default="768x768,3072x768,768x3072", help="comma list of OUTxIN")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--extra-gram-steps", type=int, default=7,
                        help="further Gram steps timed (not compared) for a steadier median")
    parser.add_argument("--goal-shapes", default="768x768,3072x768", help="shapes the ≥5× goal applies to")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1: compares the work of both paths; on a shared "
                        "machine multi-threaded mid-size matmuls are distorted by contention); 0 keeps "
                        "torch's choice")
    parser.add_argument("--output", default=str(Path(__file__).parent / "results" / "wudi.md"))
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    load_start = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    rows = []
    for spec in args.shapes.split(","):
        out_features, in_features = (int(x) for x in spec.lower().split("x"))
        print(f"benchmarking {out_features}x{in_features}, T={args.tasks}, {args.steps} steps ...",
              flush=True)
        rows.append(bench_shape(args.tasks, out_features, in_features, args.steps, args.lr, args.seed,
                                args.extra_gram_steps))

    load_end = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    goal_shapes = {s.strip().lower() for s in args.goal_shapes.split(",")}
    goal_rows = [r for r in rows if r["shape"] in goal_shapes]
    ok_speed = all(r["speedup"] >= GOAL_SPEEDUP for r in goal_rows)
    ok_loss = all(r["rel_diff"] <= LOSS_RTOL for r in rows)
    verdict = (f"Goal: Gram form ≥ {GOAL_SPEEDUP:.0f}× faster per step on {', '.join(sorted(goal_shapes))} — "
               f"{'met' if ok_speed else 'NOT met'}; final losses agree to {LOSS_RTOL:g} relative on every "
               f"shape — {'yes' if ok_loss else 'NO'}. An autograd step costs 2·T·out²·in multiply-adds, "
               "a Gram step min(out·in², 2·T·out²·in): the speed-up is bounded by about "
               "max(1, 2·T·out/in) (FLOP ratio), so wide layers (in ≫ out) gain less.")
    context = (f"{datetime.date.today().isoformat()}, torch {torch.__version__}, "
               f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
               f"{torch.get_num_threads()} torch threads, float32, Adam lr {args.lr:g}; "
               f"load average {load_start:.1f} at the start, "
               f"{load_end:.1f} at the end (other jobs share the machine: times are indicative)")
    text = table(rows)
    print()
    print(text)
    print()
    print(verdict)
    print(context)

    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(
        "# WUDI-Merging: Gram-form gradient vs autograd on the T-term loss\n\n"
        "Produced by `python benchmarks/bench_wudi.py`. Per-step times are medians over the timed steps; "
        "\"300 steps\" projects the paper's step count (Gram: precompute + 300 steps). Final losses are "
        "recomputed in float64 from the T-term definition after the same number of Adam steps.\n\n"
        f"{text}\n\n{verdict}\n\n{context}\n"
    )
    print(f"written to {output}")
    return 0 if ok_speed and ok_loss else 1


if __name__ == "__main__":
    raise SystemExit(main())
