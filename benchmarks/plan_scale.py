"""plan_scale: size a Ray cluster for one big merge (e.g. 8 x 70B Llama-like, fp16).

Computes the distributed plan of :mod:`hubmerge.distributed` for an architecture given as a
``LlamaConfig`` (shapes from a model built on the ``meta`` device: nothing is allocated) and an
expert count, and prints per unit (= output shard = one Ray task) what it reads and writes, the
peak memory of a worker, and the expected wall time for N workers.

Worker throughput and memory are *measured here*: a scaled-down Llama-like model of the same
structure (8 experts, fp16, written once to a temp dir) is merged unit by unit in a child
process with one torch thread (what a Ray task with ``num_cpus=1`` gets), per method. The
figures then scale: a worker's time is the bytes it reads divided by the measured rate; its
memory is a baseline plus a multiple of its largest work item (row blocks of at most
``engine.BLOCK_BYTES`` for element-wise methods, a whole tensor otherwise).

    python benchmarks/plan_scale.py                       # 8 x 70B, writes benchmarks/results/plan_scale.md
    python benchmarks/plan_scale.py --experts 4 --layers 32 --hidden 4096 --intermediate 14336 --kv-heads 8 \\
        --heads 32 --vocab 128256 --shard-size 2GB       # 4 x 8B
    python benchmarks/plan_scale.py --measure-ray         # also: local Ray (2 workers) vs one process, here
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _measure import write_synthetic

from hubmerge.engine import plan_items
from hubmerge.recipe import parse_size
from hubmerge.writer import TensorSpec, plan_shards, safetensors_header

RESULTS = Path(__file__).parent / "results" / "plan_scale.md"

#: (label, method, params, elementwise, passes)
METHODS = [
    ("task_arithmetic", "task_arithmetic", {}, True, 1),
    ("ties (scope: global)", "ties", {"scope": "global", "k": 0.2}, True, 3),
    ("ties (scope: tensor)", "ties", {"scope": "tensor", "k": 0.2}, False, 1),
]

#: The scaled-down model measured here: the same module structure, ~1/1300 of 70B.
SMALL = {"hidden": 1024, "intermediate": 2816, "layers": 2, "heads": 8, "kv_heads": 2, "vocab": 16384}


def llama_shapes(hidden: int, intermediate: int, layers: int, heads: int, kv_heads: int, vocab: int,
                 tied: bool = False) -> dict[str, tuple[int, ...]]:
    """Tensor names and shapes of a LlamaForCausalLM, in state-dict order, built on the meta device."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=kv_heads, vocab_size=vocab,
                         tie_word_embeddings=tied)
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    return {name: tuple(t.shape) for name, t in model.state_dict().items()}


def fake_inputs(shapes: dict[str, tuple[int, ...]], dtype: torch.dtype, experts: int) -> SimpleNamespace:
    """Just what :func:`hubmerge.engine.plan_items` reads of opened inputs (no files)."""
    size = torch.empty((), dtype=dtype).element_size()
    meta = {n: SimpleNamespace(shape=s, dtype=dtype, nbytes=math.prod(s) * size) for n, s in shapes.items()}
    return SimpleNamespace(base_checkpoint=SimpleNamespace(meta=meta),
                           experts=[SimpleNamespace(supports_rows=True)] * experts)


def plan(shapes, dtype, compute, experts, shard_size, elementwise):
    """Units (output shards) with their reads, writes and largest work item."""
    inputs = fake_inputs(shapes, dtype, experts)
    specs = [TensorSpec(n, s, dtype) for n, s in shapes.items()]
    shards = plan_shards(specs, shard_size)
    csize = torch.empty((), dtype=compute).element_size()
    units = []
    for shard in shards:
        items = plan_items(inputs, [s.name for s in shard], elementwise=elementwise, dtype=compute)
        elems = [math.prod((i.rows[1] - i.rows[0], *shapes[i.name][1:]) if i.rows else shapes[i.name])
                 for i in items]
        data = sum(s.nbytes for s in shard)
        units.append({"tensors": len(shard), "items": len(items), "read": data * (1 + experts),
                      "write": data + len(safetensors_header(shard)),
                      "largest_group": (experts + 2) * max(elems) * csize})
    return units


def fmt_bytes(n: float) -> str:
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n:.0f} B"


def fmt_time(seconds: float) -> str:
    if seconds >= 3600:
        return f"{seconds / 3600:.1f} h"
    if seconds >= 60:
        return f"{seconds / 60:.1f} min"
    return f"{seconds:.0f} s"


def makespan(durations: list[float], workers: int) -> float:
    """Wall time of tasks handed out in order to ``workers`` (how RayRunner submits them)."""
    free = [0.0] * workers
    for d in durations:
        i = free.index(min(free))
        free[i] += d
    return max(free)


# -- measurements (child processes, one torch thread like a Ray task with num_cpus=1) ---------------------
CHILD = r'''
import json, resource, sys, time
import torch
torch.set_num_threads(int(sys.argv[3]))
from hubmerge.distributed import LocalRunner, merge_distributed
from hubmerge.recipe import load_recipe
def rss():
    return int(open("/proc/self/statm").read().split()[1]) * 4096 / 2**20
recipe = load_recipe(sys.argv[1])
baseline = rss()
t0 = time.perf_counter()
result = merge_distributed(recipe, LocalRunner(), output=sys.argv[2], overwrite=True, verify="size")
wall = time.perf_counter() - t0
print(json.dumps({"wall": wall, "timings": result.extra["executor"]["timings"], "baseline_mb": baseline,
                  "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "bytes_per_pass": result.bytes_read / (result.method.prepasses + 1)}))
'''

RAY_CHILD = r'''
import json, sys, time
import ray
from hubmerge.distributed import merge_with_ray
from hubmerge.recipe import load_recipe
recipe = load_recipe(sys.argv[1])
t0 = time.perf_counter(); ray.init(num_cpus=int(sys.argv[3]), include_dashboard=False, log_to_driver=False)
start = time.perf_counter() - t0
runs = []
for _ in range(2):  # the first run also starts the worker processes
    t0 = time.perf_counter()
    merge_with_ray(recipe, workers=int(sys.argv[3]), output=sys.argv[2], overwrite=True)
    runs.append(time.perf_counter() - t0)
print(json.dumps({"ray_start": start, "first": runs[0], "warm": runs[1]}))
'''

LOCAL_CHILD = r'''
import json, sys, time
import torch
if len(sys.argv) > 3:
    torch.set_num_threads(int(sys.argv[3]))
from hubmerge.engine import merge
from hubmerge.recipe import load_recipe
t0 = time.perf_counter()
merge(load_recipe(sys.argv[1]), output=sys.argv[2], overwrite=True)
print(json.dumps({"wall": time.perf_counter() - t0}))
'''


def child(code: str, *args: str) -> dict:
    out = subprocess.run([sys.executable, "-c", code, *args], check=False, capture_output=True, text=True,
                         env={**os.environ, "TQDM_DISABLE": "1"})
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-3000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def small_recipe(root: Path, experts: int, method: str, params: dict, shard_size: int) -> Path:
    import yaml

    base, expert_dirs = write_synthetic(root / "models", llama_shapes(**SMALL), experts, torch.float16)
    recipe = {"hubmerge": 1, "name": "plan-scale", "base": str(base), "experts": [str(e) for e in expert_dirs],
              "method": method, "params": params, "output": {"path": str(root / "out"), "shard_size": shard_size}}
    path = root / f"{method}-{params.get('scope', '')}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def measure(root: Path, experts: int) -> dict[str, dict]:
    """Per method: bytes read per second per pass kind, and memory (baseline, peak, largest group)."""
    shapes = llama_shapes(**SMALL)
    out = {}
    for label, method, params, elementwise, passes in METHODS:
        recipe = small_recipe(root, experts, method, params, 50_000_000)
        run = child(CHILD, str(recipe), str(root / "out"), "1")
        per_pass = run["bytes_per_pass"]
        pre = run["timings"]["prepasses"] / max(passes - 1, 1) if passes > 1 else None
        units = plan(shapes, torch.float16, torch.float32, experts, 50_000_000, elementwise)
        largest = max(u["largest_group"] for u in units)
        out[label] = {"merge_rate": per_pass / run["timings"]["merge"],
                      "prepass_rate": per_pass / pre if pre else None,
                      "baseline_mb": run["baseline_mb"], "peak_mb": run["peak_mb"],
                      "alpha": (run["peak_mb"] - run["baseline_mb"]) * 2**20 / largest, "largest": largest,
                      "wall": run["wall"], "read_per_pass": per_pass}
        print(f"measured {label}: merge {out[label]['merge_rate'] / 1e6:.0f} MB/s"
              + (f", pre-pass {out[label]['prepass_rate'] / 1e6:.0f} MB/s" if pre else "")
              + f", peak {run['peak_mb']:.0f} MB (baseline {run['baseline_mb']:.0f} MB)", file=sys.stderr)
    return out


def measure_ray(root: Path, experts: int, workers: int) -> list[dict]:
    rows = []
    for label, method, params, _, _ in METHODS[:2]:
        recipe = small_recipe(root, experts, method, params, 50_000_000)
        local = child(LOCAL_CHILD, str(recipe), str(root / "out-local"))
        local1 = child(LOCAL_CHILD, str(recipe), str(root / "out-local"), "1")
        ray_run = child(RAY_CHILD, str(recipe), str(root / "out-ray"), str(workers))
        rows.append({"method": label, "local": local["wall"], "local1": local1["wall"], **ray_run})
        print(f"ray vs local {label}: local {local['wall']:.1f}s (1 thread {local1['wall']:.1f}s), "
              f"ray warm {ray_run['warm']:.1f}s "
              f"(first {ray_run['first']:.1f}s, start {ray_run['ray_start']:.1f}s)", file=sys.stderr)
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--hidden", type=int, default=8192)
    p.add_argument("--intermediate", type=int, default=28672)
    p.add_argument("--layers", type=int, default=80)
    p.add_argument("--heads", type=int, default=64)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--vocab", type=int, default=128256)
    p.add_argument("--dtype", default="float16", help="stored dtype of the inputs and output")
    p.add_argument("--compute-dtype", default="float32", help="the recipe's dtype")
    p.add_argument("--shard-size", default="5GB", help="output.shard_size: one unit per shard")
    p.add_argument("--workers", default="1,2,4,8,16,32,64", help="worker counts to estimate")
    p.add_argument("--read-gbps", type=float, default=None,
                   help="cap on one worker's input bandwidth (GB/s), e.g. its share of a network filesystem")
    p.add_argument("--storage-gbps", type=float, default=None, help="cap on the whole cluster's read bandwidth")
    p.add_argument("--measure-ray", action="store_true", help="also time local Ray (2 workers) vs one process")
    p.add_argument("--out", default=str(RESULTS), help="markdown report (- for none)")
    args = p.parse_args(argv)

    dtype, compute = getattr(torch, args.dtype), getattr(torch, args.compute_dtype)
    shard_size = parse_size(args.shard_size)
    shapes = llama_shapes(args.hidden, args.intermediate, args.layers, args.heads, args.kv_heads, args.vocab)
    params = sum(math.prod(s) for s in shapes.values())
    model_bytes = params * torch.empty((), dtype=dtype).element_size()
    workers = [int(w) for w in args.workers.split(",")]

    with tempfile.TemporaryDirectory(prefix="plan-scale-") as tmp:
        measured = measure(Path(tmp), args.experts)
        ray_rows = measure_ray(Path(tmp), args.experts, 2) if args.measure_ray else []

    lines = [(f"# plan_scale: {args.experts} experts x {params / 1e9:.1f}B Llama-like ({args.dtype}), "
             f"compute {args.compute_dtype}, shard size {fmt_bytes(shard_size)}"), ""]
    lines += [(f"Architecture: hidden {args.hidden}, intermediate {args.intermediate}, {args.layers} layers, "
              f"{args.heads} heads ({args.kv_heads} KV), vocab {args.vocab}; {len(shapes)} tensors, "
              f"{fmt_bytes(model_bytes)} per model; one pass reads base + {args.experts} experts = "
              f"{fmt_bytes(model_bytes * (1 + args.experts))}."), ""]
    small_params = sum(math.prod(s) for s in llama_shapes(**SMALL).values())
    lines += [(f"Measured here (2 shared CPU cores, inputs in the page cache, one torch thread per worker as a Ray "
              f"task with num_cpus=1 has): a {small_params / 1e6:.0f}M-parameter model of the same structure "
              f"({SMALL}), {args.experts} experts, merged unit by unit in one process."), ""]
    lines += [("| method | merge pass MB/s/worker | pre-pass MB/s/worker | worker baseline RSS | "
              "peak RSS here | working set / largest item group |"), "|---|---|---|---|---|---|"]
    for label, m in measured.items():
        pre = f"{m['prepass_rate'] / 1e6:.0f}" if m["prepass_rate"] else "-"
        lines.append(f"| {label} | {m['merge_rate'] / 1e6:.0f} | {pre} | {m['baseline_mb']:.0f} MB | "
                     f"{m['peak_mb']:.0f} MB | {m['alpha']:.2f} x {fmt_bytes(m['largest'])} |")
    lines.append("")

    for label, method, mparams, elementwise, passes in METHODS:
        m = measured[label]
        units = plan(shapes, dtype, compute, args.experts, shard_size, elementwise)
        reads = [u["read"] for u in units]
        largest = max(u["largest_group"] for u in units)
        peak = m["baseline_mb"] * 2**20 + m["alpha"] * largest
        lines += [f"## {label}: {passes} pass{'es' if passes > 1 else ''}", ""]
        lines += [(f"- units (Ray tasks per pass): **{len(units)}**, {min(u['tensors'] for u in units)}-"
                  f"{max(u['tensors'] for u in units)} tensors and {min(u['items'] for u in units)}-"
                  f"{max(u['items'] for u in units)} work items each"),
                  (f"- per unit and pass: reads {fmt_bytes(min(reads))}-{fmt_bytes(max(reads))}; "
                  f"the merge pass writes {fmt_bytes(min(u['write'] for u in units))}-"
                  f"{fmt_bytes(max(u['write'] for u in units))}"),
                  (f"- whole run: reads {fmt_bytes(sum(reads) * passes)}, writes {fmt_bytes(model_bytes)}; "
                  f"the driver re-reads the output to check the sha256s"),
                  f"- largest work item: {fmt_bytes(largest)} as a (T+2) x rows group in {args.compute_dtype}"
                  + ("" if elementwise else " (a whole tensor: the method is not element-wise)"),
                  f"- **peak memory per worker ~ {fmt_bytes(peak)}** (baseline + {m['alpha']:.2f} x largest group)",
                  ""]
        lines += ["| workers | wall (estimate) | speed-up | busiest worker reads |", "|---|---|---|---|"]
        rate = m["merge_rate"]
        pre_rate = m["prepass_rate"] or rate
        if args.read_gbps:
            rate, pre_rate = min(rate, args.read_gbps * 1e9), min(pre_rate, args.read_gbps * 1e9)
        one = None
        for n in workers:
            n_eff = min(n, len(units))
            total = 0.0
            for p_index in range(passes):
                r = rate if p_index == passes - 1 else pre_rate
                t = makespan([b / r for b in reads], n_eff)
                if args.storage_gbps:
                    t = max(t, sum(reads) / (args.storage_gbps * 1e9))
                total += t
            one = one or total
            busiest = max(sum(reads[i::n_eff]) for i in range(n_eff)) * passes
            note = "" if n <= len(units) else f" (only {len(units)} units: use a smaller --shard-size)"
            lines.append(f"| {n}{note} | {fmt_time(total)} | {one / total:.1f}x | {fmt_bytes(busiest)} |")
        lines.append("")

    lines += [("Estimates: each pass is a barrier; a unit's time is its bytes read divided by the rate measured "
              "here (CPU-bound: inputs came from the page cache). On a cluster a worker is limited by its share "
              "of the storage bandwidth too (`--read-gbps`, `--storage-gbps`); Ray start-up and worker start "
              "(10-30 s here) and the driver's final sha256 check (overlapped with the merge) are not included. "
              "GPU workers (`num_gpus=1` per task) merge faster than these CPU rates; time them with a small "
              "run the same way."), ""]
    if ray_rows:
        threads = torch.get_num_threads()
        lines += ["## Local Ray (2 workers) vs one process, on this machine", "",
                  (f"| method | one process ({threads} torch threads, the default) | one process (1 thread) | "
                   "Ray 2 workers, warm | speed-up vs default | vs 1 thread | Ray, first run | ray.init |"),
                  "|---|---|---|---|---|---|---|---|"]
        for r in ray_rows:
            lines.append(f"| {r['method']} | {r['local']:.1f} s | {r['local1']:.1f} s | {r['warm']:.1f} s | "
                         f"{r['local'] / r['warm']:.2f}x | {r['local1'] / r['warm']:.2f}x | {r['first']:.1f} s | "
                         f"{r['ray_start']:.1f} s |")
        lines += ["", os.getloadavg() and (
            f"Load average during the run: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores (other sessions share "
            "the machine). Under that load a process with 2 torch threads is several times slower than with 1 "
            "(OpenMP threads wait on each other), so most of the 'speed-up vs default' is that effect; against a "
            "1-thread process, 2 Ray workers on 2 shared cores gain little. The scale-out pays off across machines."),
            ""]
    text = "\n".join(lines)
    print(text)
    if args.out != "-":
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    t0 = time.perf_counter()
    code = main()
    print(f"({time.perf_counter() - t0:.0f} s)", file=sys.stderr)
    sys.exit(code)
