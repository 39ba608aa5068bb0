"""hubmerge against mergekit and the I/O floor: wall time, peak RSS, bytes, numeric agreement.

Both tools merge the same synthetic inputs (a base and N experts, saved as safetensors with a
real ``config.json`` and transformers tensor names) with matched parameters:

==================  =======================================  ============================================
merge               hubmerge recipe                          mergekit config
==================  =======================================  ============================================
linear              base = expert 0, experts 0..N-1,         models 0..N-1, weight 1, normalize
                    equal weights, normalize                 (mergekit's import translation, both ways)
task_arithmetic     scale 0.3                                base_model, weight 1, lambda 0.3
ties                k 0.25, scale 1, scope tensor            base_model, density 0.25, weight 1,
                                                             normalize, lambda 1 (per tensor)
slerp               base = expert 0, experts 0 and 1, t 0.5  base_model expert 0, models 0 and 1, t 0.5
==================  =======================================  ============================================

Both compute in float32 (mergekit ``dtype: float32``, ``out_dtype`` = the inputs' dtype) and
write one shard of at most 5 GB (``--out-shard-size`` matches hubmerge's ``shard_size``).
``density = 0.25`` makes mergekit's ``int(d*n)`` and hubmerge's ``round_half_up(k*n)`` agree on
every tensor here (all sizes are multiples of 4), so TIES outputs differ only where several
entries tie with the threshold magnitude (mergekit's argsort keeps an arbitrary subset, hubmerge
keeps all of them) and where a sign sum is exactly zero.

mergekit is never a dependency of hubmerge: it is installed into a throwaway virtualenv under
the work directory (``torch==2.13.0`` from the local CPU wheel first, then ``mergekit==0.1.5``);
when that fails its columns are skipped with the reason.

Every job runs in a fresh process (the same small wrapper for the floor, hubmerge's CLI and
``mergekit-yaml``); wall time is the whole process, peak RSS is the maximum over the run of
the RSS summed over the process tree (sampled) and the kernel's ``ru_maxrss``, read and written
bytes come from ``/proc/self/io`` (``rchar``/``wchar``: mergekit maps its inputs, so its reads
do not show in ``rchar``; the tables also give the bytes each tool's design reads). The I/O
floor reads the inputs a merge needs with plain safetensors and writes one output.

    python benchmarks/bench_vs_mergekit.py                       # the full run (< 30 min)
    python benchmarks/bench_vs_mergekit.py --quick               # GPT-2 fp16, one try each
    python benchmarks/bench_vs_mergekit.py --models gpt2 --dtypes float32 --methods ties --repeat 3
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import struct
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
TORCH_WHEEL_GLOB = "torch-2.13.0*cp311*.whl"
MERGEKIT_REQ = "mergekit==0.1.5"
SHARD_BYTES = 5 * 10**9
GOAL_FLOOR_RATIO = 1.5
GOAL_RSS_MB = 1500
GOAL_VS_MERGEKIT = 0.5
METHODS = ("linear", "task_arithmetic", "ties", "slerp")
TIES_DENSITY = 0.25
TA_SCALE = 0.3
SLERP_T = 0.5


# ---------------------------------------------------------------------------------------------
# Synthetic models with real configs and transformers tensor names
# ---------------------------------------------------------------------------------------------
@dataclass
class ModelSpec:
    key: str
    title: str
    config: dict
    shapes: dict[str, tuple[int, ...]]
    strip_prefix: str = ""  # mergekit writes canonical names; this maps them back

    @property
    def params(self) -> int:
        return sum(math.prod(s) for s in self.shapes.values())


def gpt2_spec() -> ModelSpec:
    """GPT-2 small (124M), names as in the Hub's ``gpt2`` checkpoint (no ``transformer.`` prefix)."""
    d, layers, vocab, ctx, ff = 768, 12, 50257, 1024, 3072
    shapes: dict[str, tuple[int, ...]] = {"wte.weight": (vocab, d), "wpe.weight": (ctx, d)}
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
    config = {
        "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "activation_function": "gelu_new",
        "attn_pdrop": 0.1, "embd_pdrop": 0.1, "resid_pdrop": 0.1, "bos_token_id": 50256, "eos_token_id": 50256,
        "initializer_range": 0.02, "layer_norm_epsilon": 1e-05, "n_ctx": ctx, "n_embd": d, "n_head": 12,
        "n_inner": None, "n_layer": layers, "n_positions": ctx, "vocab_size": vocab,
        "tie_word_embeddings": True,
    }
    return ModelSpec("gpt2", "GPT-2 small (124M)", config, shapes, strip_prefix="transformer.")


def llama1b_spec() -> ModelSpec:
    """A 1.1B Llama (TinyLlama-1.1B's shapes: 22 layers, d=2048, GQA 32/4 heads, untied head)."""
    d, layers, vocab, ff, heads, kv = 2048, 22, 32000, 5632, 32, 4
    kv_dim = d // heads * kv
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (vocab, d)}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes.update({
            p + "input_layernorm.weight": (d,), p + "post_attention_layernorm.weight": (d,),
            p + "self_attn.q_proj.weight": (d, d), p + "self_attn.k_proj.weight": (kv_dim, d),
            p + "self_attn.v_proj.weight": (kv_dim, d), p + "self_attn.o_proj.weight": (d, d),
            p + "mlp.gate_proj.weight": (ff, d), p + "mlp.up_proj.weight": (ff, d),
            p + "mlp.down_proj.weight": (d, ff),
        })
    shapes.update({"model.norm.weight": (d,), "lm_head.weight": (vocab, d)})
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": d,
        "intermediate_size": ff, "num_hidden_layers": layers, "num_attention_heads": heads,
        "num_key_value_heads": kv, "vocab_size": vocab, "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-05, "rope_theta": 10000.0, "hidden_act": "silu", "tie_word_embeddings": False,
        "bos_token_id": 1, "eos_token_id": 2, "attention_bias": False, "mlp_bias": False,
    }
    return ModelSpec("llama1b", "Llama-like 1.1B", config, shapes)


SPECS = {"gpt2": gpt2_spec, "llama1b": llama1b_spec}
ST_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}


def _header(names: list[str], shapes: dict[str, tuple[int, ...]], dtype: torch.dtype) -> bytes:
    size = torch.empty((), dtype=dtype).element_size()
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name in names:
        nbytes = math.prod(shapes[name]) * size
        header[name] = {"dtype": ST_DTYPES[dtype], "shape": list(shapes[name]), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw


def make_models(root: Path, spec: ModelSpec, experts: int, dtype: torch.dtype, seed: int = 0) -> list[Path]:
    """Write a base and ``experts`` fine-tunes (base + small noise), reused when already there.

    Tensors are generated one at a time and appended to all files at once, so memory holds one
    tensor whatever the model size. Tensor names are sorted, as ``safetensors.save_file`` does.

    Returns:
        ``[base, expert0, ...]`` directories.
    """
    dirs = [root / "base"] + [root / f"expert{i}" for i in range(experts)]
    stamp = root / "stamp.json"
    want = {"params": spec.params, "experts": experts, "dtype": str(dtype), "seed": seed, "v": 1}
    if stamp.is_file() and json.loads(stamp.read_text()) == want:
        return dirs
    shutil.rmtree(root, ignore_errors=True)
    need = spec.params * torch.empty((), dtype=dtype).element_size() * len(dirs)
    free = shutil.disk_usage(root.parent if root.parent.exists() else HERE).free
    if need * 1.3 > free:
        raise SystemExit(f"not enough disk for {spec.key} {dtype}: inputs need {need / 1e9:.1f} GB "
                         f"(+ outputs), {free / 1e9:.1f} GB free")
    print(f"  writing {len(dirs)} synthetic {spec.key} {dtype} models ({need / 1e9:.1f} GB) ...", flush=True)
    started = time.perf_counter()
    names = sorted(spec.shapes)
    header = _header(names, spec.shapes, dtype)
    handles = []
    for d in dirs:
        d.mkdir(parents=True, exist_ok=True)
        (d / "config.json").write_text(json.dumps({**spec.config, "torch_dtype": str(dtype).split(".")[-1]}, indent=2))
        fh = open(d / "model.safetensors", "wb")
        fh.write(header)
        handles.append(fh)
    gen = torch.Generator().manual_seed(seed)
    try:
        for name in names:
            shape = spec.shapes[name]
            base = torch.randn(shape, generator=gen).mul_(0.02)
            if name.endswith(("norm.weight", "ln_1.weight", "ln_2.weight", "ln_f.weight")):
                base.add_(1.0)
            handles[0].write(base.to(dtype).numpy().tobytes() if dtype != torch.bfloat16 else
                             base.to(dtype).view(torch.int16).numpy().tobytes())
            noisy = torch.empty_like(base)
            for fh in handles[1:]:
                torch.randn(shape, generator=gen, out=noisy).mul_(0.002).add_(base)
                fh.write(noisy.to(dtype).numpy().tobytes() if dtype != torch.bfloat16 else
                         noisy.to(dtype).view(torch.int16).numpy().tobytes())
    finally:
        for fh in handles:
            fh.close()
    stamp.write_text(json.dumps(want))
    print(f"  ... in {time.perf_counter() - started:.0f} s", flush=True)
    return dirs


def model_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).glob("*.safetensors"))


# ---------------------------------------------------------------------------------------------
# Measured child processes
# ---------------------------------------------------------------------------------------------
#: Runs a console script (or plain script) in-process, then records what the kernel says.
WRAPPER = r'''
import json, os, runpy, sys, time
stats_path, script, *args = sys.argv[1:]
t0 = time.perf_counter()
sys.argv = [script, *args]
code = 0
try:
    runpy.run_path(script, run_name="__main__")
except SystemExit as exc:
    code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
wall = time.perf_counter() - t0
io = {}
try:
    for line in open("/proc/self/io"):
        key, value = line.split(":")
        io[key] = int(value)
except OSError:
    pass
hwm = 0
try:
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            hwm = int(line.split()[1]) / 1024
except OSError:
    pass
# VmHWM, not ru_maxrss: ru_maxrss carries over the parent's RSS at fork+exec time.
json.dump({"inner_wall": wall, "code": code, "hwm_mb": hwm, "io": io}, open(stats_path, "w"))
sys.stdout.flush(); sys.stderr.flush()
os._exit(code)
'''

FLOOR = r'''
"""The I/O floor: plain safetensors reads every input once and writes one output."""
import json, sys
from safetensors.torch import load_file, save_file
spec = json.load(open(sys.argv[1]))
keep = None
for path in spec["inputs"]:
    state = load_file(path)
    if keep is None:
        keep = state
    else:
        del state
save_file(keep, spec["output"])
'''


def _tree(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as fh:
                    todo.extend(int(c) for c in fh.read().split())
        except OSError:
            pass
    return out


def _rss_bytes(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, IndexError, ValueError):
        return 0


@dataclass
class Run:
    wall: float
    peak_rss_mb: float
    rchar: int = 0
    wchar: int = 0
    read_bytes: int = 0
    write_bytes: int = 0
    load: float = 0.0
    ok: bool = True
    error: str = ""


def run_measured(python: str, script: str, args: list[str], log: Path, env: dict | None = None,
                 timeout: float = 3600) -> Run:
    """Run ``python WRAPPER script args`` and measure wall, peak tree RSS and I/O."""
    stats = log.with_suffix(".stats.json")
    stats.unlink(missing_ok=True)
    load = os.getloadavg()[0]
    full_env = {**os.environ, "TQDM_DISABLE": "1", "PYTHONUNBUFFERED": "1", **(env or {})}
    with open(log, "w") as out:
        t0 = time.perf_counter()
        proc = subprocess.Popen([python, "-c", WRAPPER, str(stats), script, *args], stdout=out,
                                stderr=subprocess.STDOUT, env=full_env, cwd=str(log.parent))
        peak = 0
        done = threading.Event()

        def sample() -> None:
            nonlocal peak
            while not done.is_set():
                peak = max(peak, sum(_rss_bytes(p) for p in _tree(proc.pid)))
                done.wait(0.02)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        try:
            _, status, _usage = os.wait4(proc.pid, 0)
        finally:
            done.set()
            sampler.join()
        wall = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
    # Not usage.ru_maxrss: it includes this (large) process's RSS at the time of the fork.
    peak_mb = peak / 2**20
    load = max(load, os.getloadavg()[0])
    if proc.returncode != 0 or not stats.is_file():
        tail = log.read_text(errors="replace")[-2500:]
        return Run(wall, peak_mb, load=load, ok=False, error=tail)
    info = json.loads(stats.read_text())
    peak_mb = max(peak_mb, info.get("hwm_mb", 0.0))
    io = info.get("io", {})
    return Run(wall, peak_mb, io.get("rchar", 0), io.get("wchar", 0), io.get("read_bytes", 0),
               io.get("write_bytes", 0), load)


def best(runs: list[Run]) -> Run:
    good = [r for r in runs if r.ok]
    return min(good, key=lambda r: r.wall) if good else runs[-1]


# ---------------------------------------------------------------------------------------------
# mergekit in its own throwaway virtualenv
# ---------------------------------------------------------------------------------------------
def ensure_mergekit(venv: Path, install: bool) -> tuple[str | None, str]:
    """Return (python, version) of a virtualenv with mergekit, or (None, why not)."""
    python = venv / "bin" / "python"
    probe = [str(python), "-c", "import importlib.metadata as m, torch; print(m.version('mergekit'), torch.__version__)"]
    if python.is_file():
        out = subprocess.run(probe, capture_output=True, text=True)
        if out.returncode == 0:
            return str(python), out.stdout.strip()
    if not install:
        return None, f"no mergekit virtualenv at {venv} (run without --no-install to create it)"
    print(f"  creating {venv} with torch==2.13.0 (CPU) then {MERGEKIT_REQ} ...", flush=True)
    shutil.rmtree(venv, ignore_errors=True)
    log = venv.parent / "mergekit-install.log"
    venv.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as fh:
        steps = [[sys.executable, "-m", "venv", str(venv)]]
        wheels = sorted(Path("/opt/wheels").glob(TORCH_WHEEL_GLOB)) if Path("/opt/wheels").is_dir() else []
        # torch first and pinned: an unpinned resolve would pull a multi-GB CUDA build.
        steps.append([str(python), "-m", "pip", "install", str(wheels[-1]) if wheels else "torch==2.13.0",
                      *([] if wheels else ["--index-url", "https://download.pytorch.org/whl/cpu"])])
        steps.append([str(python), "-m", "pip", "install", MERGEKIT_REQ, "torch==2.13.0"])
        for step in steps:
            if subprocess.run(step, stdout=fh, stderr=subprocess.STDOUT).returncode != 0:
                return None, f"could not install mergekit (step `{' '.join(step[-2:])}` failed; see {log})"
    out = subprocess.run(probe, capture_output=True, text=True)
    if out.returncode != 0:
        return None, f"mergekit installed but does not import: {out.stderr.strip()[-300:]}"
    return str(python), out.stdout.strip()


# ---------------------------------------------------------------------------------------------
# The merges, written for both tools
# ---------------------------------------------------------------------------------------------
@dataclass
class MergeJob:
    method: str
    hub_recipe: dict
    mk_config: dict
    inputs: list[Path]  # the distinct models the merge needs (the floor reads these)
    hub_reads: list[Path]  # what hubmerge reads (base + experts)


def merge_jobs(dirs: list[Path], dtype: torch.dtype, methods: list[str]) -> list[MergeJob]:
    base, experts = dirs[0], dirs[1:]
    dname = str(dtype).split(".")[-1]
    mk_common = {"dtype": "float32", **({"out_dtype": dname} if dname != "float32" else {})}
    jobs = []
    for method in methods:
        hub: dict = {"hubmerge": 1, "name": f"bench-{method}", "method": method, "device": "cpu",
                     "dtype": "float32", "output": {"shard_size": SHARD_BYTES}}
        if method == "linear":
            hub.update(base={"path": str(experts[0])}, experts=[{"path": str(e)} for e in experts],
                       params={"normalize": True})
            mk = {"merge_method": "linear", "models": [{"model": str(e), "parameters": {"weight": 1.0}} for e in experts],
                  "parameters": {"normalize": True}}
            inputs, reads = list(experts), [experts[0], *experts]
        elif method == "task_arithmetic":
            hub.update(base={"path": str(base)}, experts=[{"path": str(e)} for e in experts], params={"scale": TA_SCALE})
            mk = {"merge_method": "task_arithmetic", "base_model": str(base),
                  "models": [{"model": str(e), "parameters": {"weight": 1.0}} for e in experts],
                  "parameters": {"lambda": TA_SCALE, "normalize": False}}
            inputs, reads = [base, *experts], [base, *experts]
        elif method == "ties":
            hub.update(base={"path": str(base)}, experts=[{"path": str(e)} for e in experts],
                       params={"k": TIES_DENSITY, "scale": 1.0, "scope": "tensor"})
            mk = {"merge_method": "ties", "base_model": str(base),
                  "models": [{"model": str(e), "parameters": {"weight": 1.0, "density": TIES_DENSITY}} for e in experts],
                  "parameters": {"normalize": True, "lambda": 1.0}}
            inputs, reads = [base, *experts], [base, *experts]
        elif method == "slerp":
            pair = experts[:2]
            hub.update(base={"path": str(pair[0])}, experts=[{"path": str(e)} for e in pair], params={"t": SLERP_T})
            mk = {"merge_method": "slerp", "base_model": str(pair[0]), "models": [{"model": str(e)} for e in pair],
                  "parameters": {"t": SLERP_T}}
            inputs, reads = list(pair), [pair[0], *pair]
        else:
            raise SystemExit(f"unknown method {method!r} (choose from {', '.join(METHODS)})")
        mk.update(mk_common)
        jobs.append(MergeJob(method, hub, mk, inputs, reads))
    return jobs


# ---------------------------------------------------------------------------------------------
# Numeric agreement
# ---------------------------------------------------------------------------------------------
def _open_outputs(directory: Path) -> dict[str, tuple[Path, str]]:
    from safetensors import safe_open

    where: dict[str, tuple[Path, str]] = {}
    for file in sorted(Path(directory).glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as fh:
            for key in fh.keys():
                where[key] = (file, key)
    return where


@dataclass
class Agreement:
    compared: int = 0
    entries: int = 0
    max_abs: float = 0.0
    differing: int = 0  # entries beyond 2 ulps of the output dtype
    missing: list[str] = field(default_factory=list)
    worst: str = ""


def compare_outputs(hub_dir: Path, mk_dir: Path, spec: ModelSpec) -> Agreement:
    """Max |hubmerge - mergekit| over every tensor, and how many entries differ by > 2 ulps."""
    from safetensors import safe_open

    hub = _open_outputs(hub_dir)
    mk = {(k[len(spec.strip_prefix):] if spec.strip_prefix and k.startswith(spec.strip_prefix) else k): v
          for k, v in _open_outputs(mk_dir).items()}
    result = Agreement()
    handles: dict[Path, object] = {}

    def get(entry: tuple[Path, str]) -> torch.Tensor:
        file, key = entry
        if file not in handles:
            handles[file] = safe_open(str(file), framework="pt")
        return handles[file].get_tensor(key)

    for name in spec.shapes:
        if name not in hub or name not in mk:
            result.missing.append(name)
            continue
        a, b = get(hub[name]), get(mk[name])
        eps = torch.finfo(a.dtype).eps
        a32, b32 = a.float(), b.float()
        diff = (a32 - b32).abs_()
        bound = torch.maximum(a32.abs(), b32.abs()).mul_(2 * eps).add_(torch.finfo(a.dtype).tiny)
        worst = float(diff.max()) if diff.numel() else 0.0
        if worst > result.max_abs:
            result.max_abs, result.worst = worst, name
        result.differing += int((diff > bound).sum())
        result.entries += diff.numel()
        result.compared += 1
        del a, b, a32, b32, diff, bound
    return result


# ---------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------
def fmt_gb(n: float) -> str:
    return f"{n / 1e9:.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="gpt2,llama1b", help="gpt2, llama1b (comma-separated)")
    parser.add_argument("--dtypes", default="float32,float16", help="dtypes of the GPT-2 runs")
    parser.add_argument("--llama-dtypes", default="float16",
                        help="dtypes of the llama1b runs (float32 means 40 GB of inputs: not in the default run)")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--repeat", type=int, default=2, help="best of N (GPT-2)")
    parser.add_argument("--llama-repeat", type=int, default=1, help="best of N for llama1b")
    parser.add_argument("--tools", default="hubmerge,mergekit")
    parser.add_argument("--quick", action="store_true", help="GPT-2 fp16 only, one try each")
    parser.add_argument("--work", default=str(HERE / ".work" / "vs-mergekit"))
    parser.add_argument("--mergekit-venv", default=str(HERE / ".work" / "mergekit-venv"))
    parser.add_argument("--no-install", action="store_true", help="do not create the mergekit virtualenv")
    parser.add_argument("--keep-inputs", action="store_true", help="keep the synthetic models after the run")
    parser.add_argument("--output", default=str(HERE / "results" / "vs_mergekit.md"))
    args = parser.parse_args()
    if args.quick:
        args.models, args.dtypes, args.repeat = "gpt2", "float16", 1

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    tools = [t.strip() for t in args.tools.split(",") if t.strip()]
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    mk_python, mk_version = (None, "not requested")
    if "mergekit" in tools:
        mk_python, mk_version = ensure_mergekit(Path(args.mergekit_venv), install=not args.no_install)
        if mk_python is None:
            print(f"SKIPPING mergekit: {mk_version}", flush=True)
    hub_script = str(Path(sys.executable).parent / "hubmerge")
    mk_script = str(Path(mk_python).parent / "mergekit-yaml") if mk_python else ""
    floor_script = work / "floor.py"
    floor_script.write_text(FLOOR)
    started = time.perf_counter()

    sections = []
    for model_key in [m.strip() for m in args.models.split(",") if m.strip()]:
        spec = SPECS[model_key]()
        dtypes = args.dtypes if model_key != "llama1b" else args.llama_dtypes
        repeat = args.repeat if model_key != "llama1b" else args.llama_repeat
        for dname in [d.strip() for d in dtypes.split(",") if d.strip()]:
            dtype = getattr(torch, dname)
            print(f"== {spec.title}, {dname}, {args.experts} experts", flush=True)
            case = work / f"{model_key}-{args.experts}x-{dname}"
            dirs = make_models(case / "models", spec, args.experts, dtype)
            jobs = merge_jobs(dirs, dtype, methods)
            out_bytes = model_bytes(dirs[0])
            runs: dict[tuple[str, str], list[Run]] = {}
            floor_sets = {tuple(j.inputs) for j in jobs}
            for attempt in range(repeat):
                for inputs in sorted(floor_sets, key=len):
                    key = ("floor", str(len(inputs)))
                    spec_file = case / f"floor-{len(inputs)}.json"
                    spec_file.write_text(json.dumps({"inputs": [str(d / "model.safetensors") for d in inputs],
                                                     "output": str(case / "floor-out.safetensors")}))
                    r = run_measured(sys.executable, str(floor_script), [str(spec_file)], case / f"floor-{len(inputs)}.log")
                    runs.setdefault(key, []).append(r)
                    print(f"  floor ({len(inputs)} inputs): {r.wall:.1f} s, {r.peak_rss_mb:.0f} MB, load {r.load:.1f}",
                          flush=True)
                    (case / "floor-out.safetensors").unlink(missing_ok=True)
                for job in jobs:
                    if "hubmerge" in tools:
                        recipe = dict(job.hub_recipe, output={**job.hub_recipe["output"], "path": str(case / f"hub-{job.method}")})
                        recipe_file = case / f"hub-{job.method}.yaml"
                        recipe_file.write_text(yaml.safe_dump(recipe, sort_keys=False))
                        r = run_measured(sys.executable, hub_script,
                                         ["run", str(recipe_file), "--overwrite", "--no-progress"],
                                         case / f"hub-{job.method}.log")
                        runs.setdefault(("hubmerge", job.method), []).append(r)
                        print(f"  hubmerge {job.method}: {r.wall:.1f} s, {r.peak_rss_mb:.0f} MB, load {r.load:.1f}"
                              + ("" if r.ok else f" FAILED\n{r.error}"), flush=True)
                    if mk_python:
                        config_file = case / f"mk-{job.method}.yml"
                        config_file.write_text(yaml.safe_dump(job.mk_config, sort_keys=False))
                        out_dir = case / f"mk-{job.method}"
                        shutil.rmtree(out_dir, ignore_errors=True)
                        r = run_measured(mk_python, mk_script,
                                         [str(config_file), str(out_dir), "--no-copy-tokenizer", "--quiet",
                                          "--out-shard-size", str(SHARD_BYTES)],
                                         case / f"mk-{job.method}.log")
                        runs.setdefault(("mergekit", job.method), []).append(r)
                        print(f"  mergekit {job.method}: {r.wall:.1f} s, {r.peak_rss_mb:.0f} MB, load {r.load:.1f}"
                              + ("" if r.ok else f" FAILED\n{r.error}"), flush=True)
            # agreement, then clean the outputs
            agreements: dict[str, Agreement | str] = {}
            for job in jobs:
                hub_dir, mk_dir = case / f"hub-{job.method}", case / f"mk-{job.method}"
                if hub_dir.is_dir() and mk_dir.is_dir():
                    agreements[job.method] = compare_outputs(hub_dir, mk_dir, spec)
                else:
                    agreements[job.method] = "n/a"
                shutil.rmtree(hub_dir, ignore_errors=True)
                shutil.rmtree(mk_dir, ignore_errors=True)
            sections.append(render(spec, dname, args.experts, repeat, jobs, runs, agreements, out_bytes))
            print(sections[-1], flush=True)
            if not args.keep_inputs and model_key == "llama1b":
                shutil.rmtree(case / "models", ignore_errors=True)

    head = [
        "# hubmerge vs mergekit vs the I/O floor",
        "",
        f"Generated by `benchmarks/bench_vs_mergekit.py` on {time.strftime('%Y-%m-%d %H:%M')}: "
        f"{os.cpu_count()} cores, {os.sysconf('SC_PHYS_PAGES') * os.sysconf('SC_PAGE_SIZE') / 2**30:.0f} GiB, "
        f"torch {torch.__version__} (CPU, {torch.get_num_threads()} threads), mergekit {mk_version}. "
        f"Total run {time.perf_counter() - started:.0f} s.",
        "",
        "Each figure is the best of N fresh processes (wall = the whole process, imports included; peak RSS = "
        "the process tree's). `load` is the 1-minute load average during the best run (the machine is shared: "
        "2 cores). `x floor` divides by the I/O floor of the same inputs: plain safetensors reading every "
        "model the merge needs once and writing one output. `read` is what each tool's design reads "
        "(hubmerge also reads the base for linear/slerp, where it is expert 0); `rchar`/`wchar` are the "
        "process's read/write syscalls (mergekit maps its inputs, so its reads are not in `rchar`).",
        "",
        "Goals: hubmerge wall <= 1.5x floor, RSS <= 1.5 GB; vs mergekit: wall <= 0.5x, RSS <= mergekit's.",
        "",
    ]
    text = "\n".join(head) + "\n".join(sections)
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(text)
    print(f"wrote {args.output} ({time.perf_counter() - started:.0f} s)")


def render(spec: ModelSpec, dname: str, experts: int, repeat: int, jobs: list[MergeJob],
           runs: dict[tuple[str, str], list[Run]], agreements: dict, out_bytes: int) -> str:
    lines = [f"## {spec.title}, {dname}, base + {experts} experts (best of {repeat})", ""]
    floors = {k[1]: best(v) for k, v in runs.items() if k[0] == "floor"}
    for n, r in sorted(floors.items(), key=lambda kv: int(kv[0])):
        lines.append(f"- I/O floor, {n} inputs: {r.wall:.2f} s, peak RSS {r.peak_rss_mb:.0f} MB (load {r.load:.1f})")
    lines += ["", "| merge | tool | wall (s) | x floor | peak RSS (MB) | read (GB) | rchar / wchar (GB) | "
              "written (GB) | load | hub/mk wall | hub/mk RSS |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    for job in jobs:
        floor = floors.get(str(len(job.inputs)))
        hub, mk = runs.get(("hubmerge", job.method)), runs.get(("mergekit", job.method))
        hb, mb = (best(hub) if hub else None), (best(mk) if mk else None)
        for tool, r, reads in (("hubmerge", hb, job.hub_reads), ("mergekit", mb, job.inputs)):
            if r is None:
                continue
            if not r.ok:
                lines.append(f"| {job.method} | {tool} | FAILED | | | | | | {r.load:.1f} | | |")
                continue
            ratio = f"{r.wall / floor.wall:.2f}" if floor and floor.ok else "n/a"
            cmp_wall = cmp_rss = ""
            if tool == "hubmerge" and mb is not None and mb.ok:
                cmp_wall, cmp_rss = f"**{r.wall / mb.wall:.2f}**", f"**{r.peak_rss_mb / mb.peak_rss_mb:.2f}**"
            lines.append(
                f"| {job.method} | {tool} | {r.wall:.2f} | {ratio} | {r.peak_rss_mb:.0f} | "
                f"{fmt_gb(sum(model_bytes(d) for d in reads))} | {fmt_gb(r.rchar)} / {fmt_gb(r.wchar)} | "
                f"{fmt_gb(out_bytes)} | {r.load:.1f} | {cmp_wall} | {cmp_rss} |")
    lines += ["", "Numeric agreement (hubmerge output vs mergekit output, every tensor; `differing` = entries "
              "more than 2 ulps of the output dtype apart):", "",
              "| merge | tensors | max abs diff | differing entries | expected |", "|---|---|---|---|---|"]
    expected = {
        "linear": "rounding only (hubmerge: theta_0 + sum w_i tau_i; mergekit: sum w_i theta_i)",
        "task_arithmetic": "rounding only",
        "ties": "threshold ties (mergekit's argsort keeps an arbitrary subset of equal magnitudes, hubmerge all) "
                "and exact-zero sign sums",
        "slerp": "rounding only (hubmerge accumulates in float64, mergekit in float32)",
    }
    for job in jobs:
        a = agreements.get(job.method)
        if not isinstance(a, Agreement):
            lines.append(f"| {job.method} | n/a | | | |")
            continue
        frac = a.differing / a.entries if a.entries else 0.0
        missing = f" (missing: {', '.join(a.missing[:3])})" if a.missing else ""
        lines.append(f"| {job.method} | {a.compared}{missing} | {a.max_abs:.3g} ({a.worst}) | "
                     f"{a.differing} ({frac:.2e}) | {expected[job.method]} |")
    return "\n".join(lines) + "\n\n"


if __name__ == "__main__":
    main()
