"""FlexMerge benchmarks (CPU): the merge order for every size, and writing one deployment.

Part A -- ordering. The paper's Table 2 reports ~2.3 s (8 tasks) and ~20 s (30 tasks) on a GPU
to produce every size of a ViT-B/32 merge. Here: a CLIP ViT-B/32 vision tower's tensors
(87.8M parameters, HF names, auto blocks: attention / MLP / two norms per layer + the modules
outside the layers), synthetic task vectors, and the library's own pieces timed separately:

* ``gram``: the similarity pre-pass -- :class:`hubmerge.flexmerge.BlockGram` observing each tensor
  (per-tensor T x T Gram matrices summed by block), compute only;
* ``order``: cosines, the complete-linkage greedy order (:func:`merge_order`), the storage curve
  and the plan of every size 1..T (:func:`plan_sizes`).

Task vectors are generated on the fly, one tensor at a time, never all at once (30 x 88M floats
would be ~10 GB): a fixed 128 MB pool of Gaussian noise is drawn once, and task ``k``'s vector for
a tensor is a window of the pool at a pseudo-random offset plus ``c[block, k]`` times a window
shared by all tasks (``c`` random per block and task), written into one reused ``(T, n)`` buffer.
So the cosines differ from block to block and from pair to pair, like real task vectors, and
peak memory is the pool plus one tensor's ``(T, n)`` buffer. Generation is timed apart.

Part B -- writing one deployment against the I/O floor. A ViT-B/32-sized base and 8 experts are
written as safetensors (reused between runs), then:

* floor: :func:`_measure.io_floor`, as in ``bench_merge``: every input byte read once, as many bytes
  as the deployment stores written and flushed (``fsync``);
* ``run_flexmerge`` with one size (``--size``, default 4): similarity pass, order, and the
  write pass, all from disk (page cache warm for both, after one untimed floor run).

Usage: ``python benchmarks/bench_flexmerge.py [--experts 8 30] [--write-experts 8] [--size 4]
[--workdir DIR] [--skip-write]``. Writes ``benchmarks/results/flexmerge.md``.
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import json
import math
import os
import platform
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _measure import io_floor

ROOT = Path(__file__).resolve().parent
RESULTS = ROOT / "results" / "flexmerge.md"
GOALS = {8: 2.3, 30: 20.0}  # the paper's GPU figures for all sizes (Table 2)
POOL = 1 << 25  # 32M float32 = 128 MB of noise
REPEATS = 5  # part B: best of this many runs of the floor and of run_flexmerge


def clip_vit_b32_shapes() -> dict[str, tuple[int, ...]]:
    """Tensor names and shapes of CLIP ViT-B/32's vision tower (HF ``CLIPVisionModelWithProjection``)."""
    d, layers, ff, patch, grid = 768, 12, 3072, 32, 7
    p = "vision_model."
    shapes: dict[str, tuple[int, ...]] = {
        p + "embeddings.class_embedding": (d,),
        p + "embeddings.patch_embedding.weight": (d, 3, patch, patch),
        p + "embeddings.position_embedding.weight": (grid * grid + 1, d),
        p + "pre_layrnorm.weight": (d,), p + "pre_layrnorm.bias": (d,),
    }
    for i in range(layers):
        q = f"{p}encoder.layers.{i}."
        for proj in ("k_proj", "v_proj", "q_proj", "out_proj"):
            shapes[q + f"self_attn.{proj}.weight"] = (d, d)
            shapes[q + f"self_attn.{proj}.bias"] = (d,)
        shapes.update({
            q + "layer_norm1.weight": (d,), q + "layer_norm1.bias": (d,),
            q + "mlp.fc1.weight": (ff, d), q + "mlp.fc1.bias": (ff,),
            q + "mlp.fc2.weight": (d, ff), q + "mlp.fc2.bias": (d,),
            q + "layer_norm2.weight": (d,), q + "layer_norm2.bias": (d,),
        })
    shapes.update({p + "post_layernorm.weight": (d,), p + "post_layernorm.bias": (d,),
                   "visual_projection.weight": (512, d)})
    return shapes


def _offset(*parts: object, span: int) -> int:
    digest = hashlib.blake2b(":".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") % span


class SyntheticTaskVectors:
    """Per-tensor synthetic task vectors from windows of a fixed noise pool (see the module docstring)."""

    def __init__(self, tasks: int, blocks: list[str], seed: int = 0):
        gen = torch.Generator().manual_seed(seed)
        self.pool = torch.randn(POOL, generator=gen)
        self.mix = {b: torch.rand(tasks, generator=gen) * 2.0 for b in blocks}
        self.tasks = tasks
        self.buffer = torch.empty(0)

    def deltas(self, name: str, shape: tuple[int, ...], block: str) -> torch.Tensor:
        n = math.prod(shape)
        if self.buffer.numel() < self.tasks * n:
            self.buffer = torch.empty(self.tasks * n)
        out = self.buffer[: self.tasks * n].view(self.tasks, n)
        span = POOL - n
        shared = _offset(name, "shared", span=span)
        for k in range(self.tasks):
            own = _offset(name, k, span=span)
            torch.add(self.pool[own:own + n], self.pool[shared:shared + n], alpha=float(self.mix[block][k]),
                      out=out[k])
        return out.view(self.tasks, *shape)


def bench_ordering(tasks: int) -> dict[str, float]:
    """Time the Gram pre-pass and the ordering of every size for ``tasks`` synthetic experts."""
    from fractions import Fraction

    from hubmerge.flexmerge import BlockGram, RequestedSize, assign_blocks, cosines, merge_order, plan_sizes
    from hubmerge.method import TensorGroup
    from hubmerge.writer import TensorSpec

    shapes = clip_vit_b32_shapes()
    specs = [TensorSpec(n, s, torch.float32) for n, s in shapes.items()]
    blocks = assign_blocks(specs)
    block_of = {t: b.name for b in blocks for t in b.tensors}
    synth = SyntheticTaskVectors(tasks, [b.name for b in blocks])
    gram = BlockGram(block_of)
    totals: dict[str, torch.Tensor] = {}
    t_gen = t_gram = cpu_gram = 0.0
    for name, shape in shapes.items():
        t0 = time.perf_counter()
        deltas = synth.deltas(name, shape, block_of[name])
        group = TensorGroup(name, torch.zeros(()).expand(shape), deltas)
        t1, c1 = time.perf_counter(), time.process_time()
        for key, value in gram.observe(0, group).items():  # what the engine's pre-pass does
            totals[key] = totals[key] + value if key in totals else value
        t2, c2 = time.perf_counter(), time.process_time()
        t_gen += t1 - t0
        t_gram += t2 - t1
        cpu_gram += c2 - c1
    t0, c0 = time.perf_counter(), time.process_time()
    gram.finish_pass(0, totals)
    block_cos = {b.name: cosines(gram.grams[b.name]) for b in blocks}
    order = merge_order(block_cos, [b.name for b in blocks])
    model_bytes = sum(s.nbytes for s in specs)
    sizes = [RequestedSize(Fraction(n), str(n), n) for n in range(1, tasks + 1)]
    _, plans = plan_sizes(sizes, order, blocks, tasks, 0, model_bytes)
    t_order, cpu_order = time.perf_counter() - t0, time.process_time() - c0
    assert len(order) == len(blocks) * (tasks - 1) and plans[0].merges == len(order) and plans[-1].merges == 0
    params = sum(math.prod(s) for s in shapes.values())
    del synth, totals
    gc.collect()
    return {"tasks": tasks, "params": params, "blocks": len(blocks), "merges": len(order), "generate": t_gen,
            "gram": t_gram, "order": t_order, "total": t_gram + t_order, "cpu": cpu_gram + cpu_order}


# -- part B ---------------------------------------------------------------------------------------------
def write_inputs(root: Path, experts: int) -> tuple[Path, list[Path]]:
    """A ViT-B/32-sized base and ``experts`` fine-tunes as safetensors (reused when present)."""
    from safetensors.torch import save_file

    shapes = clip_vit_b32_shapes()
    stamp = root / "stamp.json"
    want = {"experts": experts, "params": sum(math.prod(s) for s in shapes.values()), "v": 1}
    dirs = [root / "base"] + [root / f"expert{i}" for i in range(experts)]
    if stamp.is_file() and json.loads(stamp.read_text()) == want:
        return dirs[0], dirs[1:]
    root.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(0)
    base = {n: torch.randn(s, generator=gen) * 0.02 for n, s in shapes.items()}
    for i, d in enumerate(dirs):
        d.mkdir(exist_ok=True)
        (d / "config.json").write_text(json.dumps({"model_type": "clip_vision_model", "synthetic": True}))
        if i == 0:
            save_file(base, d / "model.safetensors")
            continue
        scale = torch.rand(64, generator=gen)  # per-expert, per-layer size of the update
        state = {n: t + (0.001 + 0.002 * float(scale[_offset(n.split(".")[3] if ".layers." in n else n, span=64)]))
                 * torch.randn(t.shape, generator=gen) for n, t in base.items()}
        save_file(state, d / "model.safetensors")
        del state
    stamp.write_text(json.dumps(want))
    return dirs[0], dirs[1:]


def floor_seconds(inputs: list[Path], out: Path, nbytes: int) -> float:
    """:func:`_measure.io_floor` of the inputs' safetensors files, writing ``nbytes`` (then removed)."""
    elapsed = io_floor([d / "model.safetensors" for d in inputs], out, nbytes)
    out.unlink()
    return elapsed


def bench_write(workdir: Path, experts: int, size: int) -> dict[str, float]:
    """Time ``run_flexmerge`` for one size against :func:`io_floor`."""
    import yaml

    from hubmerge.flexmerge import run_flexmerge
    from hubmerge.recipe import load_recipe

    t0 = time.perf_counter()
    base, expert_dirs = write_inputs(workdir / "inputs", experts)
    prepare = time.perf_counter() - t0
    out = workdir / "out"
    recipe_path = workdir / "recipe.yaml"
    recipe_path.write_text(yaml.safe_dump({
        "hubmerge": 1, "name": "bench-flexmerge", "base": str(base), "experts": [str(e) for e in expert_dirs],
        "method": "task_arithmetic", "flexmerge": {"sizes": [size]}, "output": {"path": str(out)}, "device": "cpu",
    }))
    recipe = load_recipe(recipe_path)
    result = run_flexmerge(recipe, overwrite=True)  # warm-up: page cache, imports
    stored = result.deployments[0].storage_bytes
    inputs = [base, *expert_dirs]
    input_bytes = sum((d / "model.safetensors").stat().st_size for d in inputs)
    floor_seconds(inputs, workdir / "floor.safetensors", stored)  # warm-up
    floors, runs, writes, similarity, cpu_floor, cpu_run = [], [], [], [], [], []
    for _ in range(REPEATS):
        os.sync()  # each measurement starts with no dirty pages of the one before being flushed
        c0 = time.process_time()
        floors.append(floor_seconds(inputs, workdir / "floor.safetensors", stored))
        cpu_floor.append(time.process_time() - c0)
        os.sync()
        t0, c0 = time.perf_counter(), time.process_time()
        result = run_flexmerge(recipe, overwrite=True)
        runs.append(time.perf_counter() - t0)
        cpu_run.append(time.process_time() - c0)
        writes.append((result.timings["write"], result.timings["write_merge"], result.timings["write_io"]))
        similarity.append(result.timings["similarity"])
    shutil.rmtree(out, ignore_errors=True)
    return {"experts": experts, "size": size, "prepare": prepare, "input_bytes": input_bytes, "stored_bytes": stored,
            "model_equivalents": result.deployments[0].model_equivalents, "floor": min(floors),
            "run": min(runs), "write_pass": min(writes)[0], "write_merge": min(writes)[1],
            "write_io": min(writes)[2], "similarity": min(similarity), "load": os.getloadavg()[0],
            "cpu_floor": min(cpu_floor), "cpu_run": min(cpu_run)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experts", type=int, nargs="*", default=[8, 30], help="expert counts for part A")
    parser.add_argument("--write-experts", type=int, default=8, help="experts for part B")
    parser.add_argument("--size", type=int, default=4, help="deployment size (model-equivalents) for part B")
    parser.add_argument("--workdir", type=Path, default=None, help="where part B's inputs live (kept)")
    parser.add_argument("--skip-write", action="store_true", help="part A only")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    threads = torch.get_num_threads()
    load = os.getloadavg()[0]
    print(f"torch {torch.__version__}, {threads} threads, load average {load:.1f}", flush=True)

    rows = []
    for tasks in args.experts:
        row = bench_ordering(tasks)
        rows.append(row)
        print(f"ordering, {tasks} experts: gram {row['gram']:.2f}s + order {row['order']:.3f}s = "
              f"{row['total']:.2f}s (goal <= {GOALS.get(tasks, float('nan'))}s; CPU time {row['cpu']:.2f}s); "
              f"generating task vectors {row['generate']:.2f}s", flush=True)

    write = None
    if not args.skip_write:
        workdir = args.workdir or Path(tempfile.gettempdir()) / "hubmerge-bench-flexmerge"
        write = bench_write(workdir, args.write_experts, args.size)
        print(f"write size {write['size']} of {write['experts']} experts: run_flexmerge {write['run']:.2f}s, "
              f"its write pass {write['write_pass']:.2f}s (merge {write['write_merge']:.2f}s, io "
              f"{write['write_io']:.2f}s); I/O floor {write['floor']:.2f}s -> write pass "
              f"{write['write_pass'] / write['floor']:.2f}x, whole run {write['run'] / write['floor']:.2f}x "
              "(goal <= 1.5x)", flush=True)

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    elapsed = time.perf_counter() - started
    lines = [
        "# FlexMerge benchmark",
        "",
        f"`python benchmarks/bench_flexmerge.py` on CPU: torch {torch.__version__}, {threads} threads, "
        f"{os.cpu_count()} CPUs, Python {platform.python_version()}, load average {load:.1f} at start; "
        f"{elapsed:.0f} s in all, peak RSS {peak:.0f} MB.",
        "",
        "## Ordering for every size (ViT-B/32-sized, synthetic task vectors)",
        "",
        "CLIP ViT-B/32 vision tower shapes (HF names), auto blocks. `gram` is the similarity pre-pass's",
        "compute (per-tensor Gram matrices summed by block), `order` the cosines, the complete-linkage",
        "greedy order and the plan of every size 1..T. Task vectors are generated per tensor from windows",
        "of a 128 MB noise pool (never all at once); their generation is not part of the ordering.",
        "",
        "| experts | parameters | blocks | merges | gram (s) | order (s) | total (s) | CPU time (s) | "
        "goal (s, paper GPU) | generation (s) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(f"| {row['tasks']} | {row['params'] / 1e6:.1f}M | {row['blocks']} | {row['merges']} | "
                     f"{row['gram']:.2f} | {row['order']:.3f} | **{row['total']:.2f}** | {row['cpu']:.2f} | "
                     f"{GOALS.get(row['tasks'], '—')} | {row['generate']:.2f} |")
    if write:
        lines += [
            "",
            "## Writing one deployment vs the I/O floor",
            "",
            f"A ViT-B/32-sized base and {write['experts']} experts on disk ({write['input_bytes'] / 1e9:.2f} GB "
            f"of safetensors, page cache warm); one deployment of size {write['size']} "
            f"({write['model_equivalents']:.3f} model-equivalents, {write['stored_bytes'] / 1e9:.2f} GB stored),",
            "inner `task_arithmetic`. The floor (`_measure.io_floor`, the same as `bench_merge`'s) reads every",
            "byte of every input once and writes the deployment's number of bytes, flushed with `fsync` as",
            "hubmerge's outputs are. `run_flexmerge` reads the inputs twice (the similarity pass, then the",
            f"write pass); both timed in this process, best of {REPEATS} runs each.",
            "",
            "| | seconds | vs floor |",
            "|---|---|---|",
            f"| I/O floor (read inputs + write same bytes) | {write['floor']:.2f} | 1.00x |",
            f"| `run_flexmerge` (similarity + order + write) | {write['run']:.2f} | "
            f"**{write['run'] / write['floor']:.2f}x** (goal <= 1.5x) |",
            f"| of which the similarity pass | {write['similarity']:.2f} | |",
            f"| of which the write pass (one pass: read, merge, write) | {write['write_pass']:.2f} | "
            f"**{write['write_pass'] / write['floor']:.2f}x** |",
            f"| - merging the groups (task vectors + inner method) | {write['write_merge']:.2f} | |",
            f"| - writing the stored tensors (`ShardedWriter`, fsync) | {write['write_io']:.2f} | |",
            f"| CPU time (all threads): floor / `run_flexmerge` | {write['cpu_floor']:.2f} / {write['cpu_run']:.2f} | "
            f"{write['cpu_run'] / max(write['cpu_floor'], 1e-9):.2f}x |",
            "",
            f"Load average during part B: {write['load']:.1f} on {os.cpu_count()} CPUs.",
        ]
    lines.append("")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text("\n".join(lines))
    print(f"wrote {RESULTS} ({elapsed:.0f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
