"""Shared helpers for the benchmarks: synthetic checkpoints and measured child processes."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

CHILD = r'''
import json, resource, sys, time
t0 = time.perf_counter()
kind, arg = sys.argv[1], sys.argv[2]
if kind == "floor":
    import torch  # noqa: F401  (every merge pays for importing it)
    from _measure import io_floor
    spec = json.loads(arg)
    io_floor(spec["inputs"], spec["output"], spec.get("output_bytes"))
elif kind in ("merge", "merge-warm"):
    import logging
    if kind == "merge-warm":  # a long-lived process (Space, worker, API user): libraries already imported
        import peft, transformers  # noqa: F401
        from hubmerge.engine import merge
        t0 = time.perf_counter()
    from hubmerge.engine import merge
    from hubmerge.recipe import load_recipe
    merge(load_recipe(arg), overwrite=True)
wall = time.perf_counter() - t0
print(json.dumps({"wall": wall, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
'''


def io_floor(inputs: list, output, output_bytes: int | None = None) -> float:
    """The I/O floor: read every byte of every input once, write ``output_bytes`` and flush them.

    Inputs are read with 64 MiB ``readinto`` calls (``safetensors``' ``load_file`` maps the file,
    so tensors never touched are never read). The bytes written are the inputs' own, in order,
    ``output_bytes`` of them (default: the first input's size), then ``fsync``-ed, as a merge's
    output is. Returns the seconds taken; ``output`` is left in place.
    """
    t0 = time.perf_counter()
    want = Path(inputs[0]).stat().st_size if output_bytes is None else output_bytes
    buf = memoryview(bytearray(64 << 20))
    with open(output, "wb", buffering=0) as out:
        for path in inputs:
            with open(path, "rb", buffering=0) as fh:
                while n := fh.readinto(buf):
                    done = 0
                    while want > 0 and done < min(n, want):
                        done += out.write(buf[done:min(n, want)])
                    want -= done
        os.fsync(out.fileno())
    return time.perf_counter() - t0


def gpt2_small_shapes() -> dict[str, tuple[int, ...]]:
    """Tensor names and shapes of GPT-2 small (124M parameters), without building the model."""
    d, layers, vocab, ctx, ff = 768, 12, 50257, 1024, 3072
    shapes = {"wte.weight": (vocab, d), "wpe.weight": (ctx, d)}
    for i in range(layers):
        p = f"h.{i}."
        shapes.update({
            p + "ln_1.weight": (d,), p + "ln_1.bias": (d,),
            p + "attn.c_attn.weight": (d, 3 * d), p + "attn.c_attn.bias": (3 * d,),
            p + "attn.c_proj.weight": (d, d), p + "attn.c_proj.bias": (d,),
            p + "ln_2.weight": (d,), p + "ln_2.bias": (d,),
            p + "mlp.c_fc.weight": (d, ff), p + "mlp.c_fc.bias": (ff,),
            p + "mlp.c_proj.weight": (ff, d), p + "mlp.c_proj.bias": (d,),
        })
    shapes.update({"ln_f.weight": (d,), "ln_f.bias": (d,)})
    return shapes


def write_synthetic(root: Path, shapes: dict[str, tuple[int, ...]], experts: int, dtype: torch.dtype,
                    seed: int = 0) -> tuple[Path, list[Path]]:
    """Write a base and ``experts`` perturbed copies as safetensors (reused if present)."""
    root.mkdir(parents=True, exist_ok=True)
    params = sum(math.prod(s) for s in shapes.values())
    stamp = root / "stamp.json"
    want = {"params": params, "experts": experts, "dtype": str(dtype), "seed": seed}
    dirs = [root / "base"] + [root / f"expert{i}" for i in range(experts)]
    if stamp.is_file() and json.loads(stamp.read_text()) == want:
        return dirs[0], dirs[1:]
    gen = torch.Generator().manual_seed(seed)
    base = {n: (torch.randn(s, generator=gen) * 0.02).to(dtype) for n, s in shapes.items()}
    for i, d in enumerate(dirs):
        d.mkdir(exist_ok=True)
        (d / "config.json").write_text(json.dumps({"model_type": "gpt2", "synthetic": True}))
        state = base if i == 0 else {
            n: (t.float() + torch.randn(t.shape, generator=gen) * 0.002).to(dtype) for n, t in base.items()}
        save_file(state, d / "model.safetensors")
        del state
    stamp.write_text(json.dumps(want))
    return dirs[0], dirs[1:]


def run_child(kind: str, arg: str) -> dict:
    """Run one measured job in a fresh Python process; returns wall seconds and peak RSS.

    Dirty pages left by an earlier job are flushed first (``sync``), so no job pays for another's
    writes.
    """
    os.sync()
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", CHILD, kind, arg], check=False, capture_output=True, text=True,
                         env={**os.environ, "TQDM_DISABLE": "1",
                              "PYTHONPATH": os.pathsep.join(filter(None, [str(Path(__file__).parent),
                                                                          os.environ.get("PYTHONPATH")]))})
    if out.returncode != 0:
        raise RuntimeError(f"{kind} failed:\n{out.stderr[-3000:]}")
    result = json.loads(out.stdout.strip().splitlines()[-1])
    result["process_wall"] = time.perf_counter() - t0
    return result


def dir_bytes(path: Path) -> int:
    """Bytes of all safetensors files under ``path``."""
    return sum(f.stat().st_size for f in Path(path).rglob("*.safetensors"))
