"""hubmerge against mergekit and the I/O floor: wall time, CPU time, peak RSS, bytes, numeric agreement.

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
write one shard of at most 5 GB (``--out-shard-size``). ``density = 0.25`` makes mergekit's
``int(d*n)`` and hubmerge's ``round_half_up(k*n)`` agree on every tensor here (all sizes are
multiples of 4), so TIES outputs differ only where several entries tie with the threshold
magnitude (mergekit's argsort keeps an arbitrary subset, hubmerge keeps all of them) and where a
sign sum is exactly zero (mergekit elects +, hubmerge nothing).

mergekit is never a dependency of hubmerge: it is installed into a throwaway virtualenv under
the work directory (``torch==2.13.0`` from the local CPU wheel first, then ``mergekit==0.1.5``);
when that fails its columns are skipped with the reason.

Every job runs in a fresh process (the same small wrapper for the floor, hubmerge's CLI and
``mergekit-yaml``): wall time is the whole process, imports included; CPU time is the process
tree's user + system time; peak RSS is the maximum over the run of the RSS summed over the
process tree (sampled every 20 ms) and the kernel's high-water mark; "anon" is the part not
backed by files (mergekit maps its inputs: their pages count in its RSS but the kernel can drop
them). Read and written bytes come from ``/proc/self/io``: ``rchar``/``wchar`` count read/write
system calls (mapped inputs do not show there), ``read_bytes`` what came from the disk rather
than the page cache.

The I/O floor of a merge reads every input model it needs once (64 MiB ``readinto`` calls) and
writes one output of the output's size, flushed to disk with ``fsync`` as hubmerge does (mergekit
does not flush); it imports torch first, as every merge tool must. It runs right before the two
tools on the same inputs (the page cache is then in the same state for all three: that matters
when the inputs outgrow the memory), and the best of its runs is kept.

A job whose anonymous memory would exhaust the machine is stopped (``--max-anon-gb``); a
mergekit job whose time, projected from the GPT-2 run of the same merge, exceeds
``--max-mergekit-seconds`` or the run's time budget is not started, and the tables say so.

    python benchmarks/bench_vs_mergekit.py              # the full run (about 30 min on 2 cores)
    python benchmarks/bench_vs_mergekit.py --quick      # GPT-2 fp16, one try each (about 5 min)
    python benchmarks/bench_vs_mergekit.py --models gpt2 --dtypes float32 --methods ties --repeat 3
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import shutil
import signal
import struct
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _measure import gpt2_small_shapes

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
TORCH_REQ = "torch==2.13.0"
TORCH_WHEEL_GLOB = "torch-2.13.0*.whl"
MERGEKIT_REQ = "mergekit==0.1.5"
SHARD_BYTES = 5 * 10**9
GOAL_FLOOR_RATIO = 1.5
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
    d, layers, vocab, ctx = 768, 12, 50257, 1024
    shapes = gpt2_small_shapes()
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
        fh = open(d / "model.safetensors", "wb")  # noqa: SIM115 - closed below, all at once
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
"""The I/O floor: read every input once, write one output of the same size and flush it."""
import json, os, sys
import torch  # noqa: F401  (every merge tool pays for importing it)
spec = json.load(open(sys.argv[1]))
buf = memoryview(bytearray(64 << 20))
with open(spec["output"], "wb", buffering=0) as out:
    for i, path in enumerate(spec["inputs"]):
        with open(path, "rb", buffering=0) as fh:
            while n := fh.readinto(buf):
                done = 0
                while i == 0 and done < n:  # the first input's bytes stand in for the output
                    done += out.write(buf[done:n])
    os.fsync(out.fileno())
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


PAGE = os.sysconf("SC_PAGE_SIZE")


def _rss_bytes(pid: int) -> tuple[int, int]:
    """(resident, resident and not file-backed) bytes of one process."""
    try:
        with open(f"/proc/{pid}/statm") as fh:
            fields = fh.read().split()
        resident, shared = int(fields[1]), int(fields[2])
        return resident * PAGE, max(0, resident - shared) * PAGE
    except (OSError, IndexError, ValueError):
        return 0, 0


def mem_available() -> int:
    with open("/proc/meminfo") as fh:
        for line in fh:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


@dataclass
class Run:
    wall: float
    peak_rss_mb: float
    peak_anon_mb: float = 0.0
    cpu: float = 0.0
    rchar: int = 0
    wchar: int = 0
    read_bytes: int = 0
    write_bytes: int = 0
    load: float = 0.0
    ok: bool = True
    error: str = ""
    note: str = ""  # why it did not run or was stopped


def run_measured(python: str, script: str, args: list[str], log: Path, *, max_anon: int,
                 timeout: float = 3600, env: dict | None = None) -> Run:
    """Run ``python WRAPPER script args`` in a session of its own; measure wall, CPU, RSS and I/O.

    The process group is killed when its anonymous memory passes ``max_anon`` bytes or the run
    passes ``timeout`` seconds.
    """
    stats = log.with_suffix(".stats.json")
    stats.unlink(missing_ok=True)
    load = os.getloadavg()[0]
    full_env = {**os.environ, "TQDM_DISABLE": "1", "PYTHONUNBUFFERED": "1", **(env or {})}
    stopped = ""
    with open(log, "w") as out:
        t0 = time.perf_counter()
        proc = subprocess.Popen([python, "-c", WRAPPER, str(stats), script, *args], stdout=out,
                                stderr=subprocess.STDOUT, env=full_env, cwd=str(log.parent),
                                start_new_session=True)
        peak = peak_anon = 0
        done = threading.Event()

        def sample() -> None:
            nonlocal peak, peak_anon, stopped
            while not done.is_set():
                rss = anon = 0
                for pid in _tree(proc.pid):
                    r, a = _rss_bytes(pid)
                    rss, anon = rss + r, anon + a
                peak, peak_anon = max(peak, rss), max(peak_anon, anon)
                why = ""
                if anon > max_anon:
                    why = f"stopped: its anonymous memory passed {max_anon / 2**30:.1f} GiB (--max-anon-gb)"
                elif time.perf_counter() - t0 > timeout:
                    why = f"stopped after {timeout:.0f} s"
                if why and not stopped:
                    stopped = why
                    try:
                        os.killpg(proc.pid, signal.SIGKILL)  # our child's own session
                    except ProcessLookupError:
                        pass
                done.wait(0.02)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        try:
            _, status, usage = os.wait4(proc.pid, 0)
        finally:
            done.set()
            sampler.join()
        wall = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
    # Not usage.ru_maxrss: it includes this (large) process's RSS at the time of the fork.
    cpu = usage.ru_utime + usage.ru_stime
    load = max(load, os.getloadavg()[0])
    peak_mb, anon_mb = peak / 2**20, peak_anon / 2**20
    if stopped or proc.returncode != 0 or not stats.is_file():
        tail = log.read_text(errors="replace")[-2500:]
        return Run(wall, peak_mb, anon_mb, cpu, load=load, ok=False, error=tail, note=stopped)
    info = json.loads(stats.read_text())
    peak_mb = max(peak_mb, info.get("hwm_mb", 0.0))
    io = info.get("io", {})
    return Run(wall, peak_mb, anon_mb, cpu, io.get("rchar", 0), io.get("wchar", 0), io.get("read_bytes", 0),
               io.get("write_bytes", 0), load)


def skipped(note: str) -> Run:
    return Run(0.0, 0.0, ok=False, note=note)


def best(runs: list[Run]) -> Run:
    good = [r for r in runs if r.ok]
    return min(good, key=lambda r: r.wall) if good else runs[-1]


# ---------------------------------------------------------------------------------------------
# mergekit in its own throwaway virtualenv
# ---------------------------------------------------------------------------------------------
def find_torch_wheel(scratch: Path, log) -> Path | None:
    """The local CPU wheel of torch 2.13.0: find-links directories, pip's cache, else ``pip download``."""
    places = [Path(p) for p in os.environ.get("PIP_FIND_LINKS", "").split() if p]
    places += [Path("/opt/wheels"), Path.home() / ".cache" / "pip"]
    for place in places:
        if place.is_dir():
            found = sorted(place.rglob(TORCH_WHEEL_GLOB))
            tagged = [w for w in found if f"cp{sys.version_info.major}{sys.version_info.minor}" in w.name]
            if tagged:
                return tagged[-1]
    scratch.mkdir(parents=True, exist_ok=True)
    got = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-d", str(scratch), TORCH_REQ],
                         check=False, stdout=log, stderr=subprocess.STDOUT)
    found = sorted(scratch.glob(TORCH_WHEEL_GLOB))
    return found[-1] if got.returncode == 0 and found else None


def ensure_mergekit(venv: Path, install: bool) -> tuple[str | None, str]:
    """Return (python, version) of a virtualenv with mergekit, or (None, why not)."""
    python = venv / "bin" / "python"
    probe = [str(python), "-c",
             "import importlib.metadata as m, torch; print(f\"{m.version('mergekit')} (torch {torch.__version__})\")"]
    if python.is_file():
        out = subprocess.run(probe, check=False, capture_output=True, text=True)
        if out.returncode == 0:
            return str(python), out.stdout.strip()
    if not install:
        return None, f"no mergekit virtualenv at {venv} (run without --no-install to create it)"
    print(f"  creating {venv}: {TORCH_REQ} (CPU wheel) then {MERGEKIT_REQ} ...", flush=True)
    shutil.rmtree(venv, ignore_errors=True)
    log_path = venv.parent / "mergekit-install.log"
    venv.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "w") as log:
        if subprocess.run([sys.executable, "-m", "venv", str(venv)], check=False, stdout=log, stderr=subprocess.STDOUT).returncode:
            return None, f"could not create a virtualenv at {venv} (see {log_path})"
        wheel = find_torch_wheel(venv.parent / "wheels", log)
        # torch first and pinned: an unpinned resolve could pull a multi-GB CUDA build.
        steps = [[str(python), "-m", "pip", "install", str(wheel) if wheel else TORCH_REQ],
                 [str(python), "-m", "pip", "install", MERGEKIT_REQ, TORCH_REQ]]
        for step in steps:
            if subprocess.run(step, check=False, stdout=log, stderr=subprocess.STDOUT).returncode != 0:
                return None, f"could not install mergekit (`{' '.join(step[3:])}` failed; see {log_path})"
    out = subprocess.run(probe, check=False, capture_output=True, text=True)
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
            inputs = list(experts)  # hubmerge reads expert 0 once: it is the base's file
        elif method == "task_arithmetic":
            hub.update(base={"path": str(base)}, experts=[{"path": str(e)} for e in experts], params={"scale": TA_SCALE})
            mk = {"merge_method": "task_arithmetic", "base_model": str(base),
                  "models": [{"model": str(e), "parameters": {"weight": 1.0}} for e in experts],
                  "parameters": {"lambda": TA_SCALE, "normalize": False}}
            inputs = [base, *experts]
        elif method == "ties":
            hub.update(base={"path": str(base)}, experts=[{"path": str(e)} for e in experts],
                       params={"k": TIES_DENSITY, "scale": 1.0, "scope": "tensor"})
            mk = {"merge_method": "ties", "base_model": str(base),
                  "models": [{"model": str(e), "parameters": {"weight": 1.0, "density": TIES_DENSITY}} for e in experts],
                  "parameters": {"normalize": True, "lambda": 1.0}}
            inputs = [base, *experts]
        elif method == "slerp":
            pair = experts[:2]
            hub.update(base={"path": str(pair[0])}, experts=[{"path": str(e)} for e in pair], params={"t": SLERP_T})
            mk = {"merge_method": "slerp", "base_model": str(pair[0]), "models": [{"model": str(e)} for e in pair],
                  "parameters": {"t": SLERP_T}}
            inputs = list(pair)
        else:
            raise SystemExit(f"unknown method {method!r} (choose from {', '.join(METHODS)})")
        mk.update(mk_common)
        jobs.append(MergeJob(method, hub, mk, inputs))
    return jobs


# ---------------------------------------------------------------------------------------------
# Numeric agreement
# ---------------------------------------------------------------------------------------------
def _open_outputs(directory: Path) -> dict[str, tuple[Path, str]]:
    from safetensors import safe_open

    where: dict[str, tuple[Path, str]] = {}
    for file in sorted(Path(directory).glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as fh:
            for key in fh.keys():  # noqa: SIM118 - safe_open is not iterable
                where[key] = (file, key)
    return where


@dataclass
class Agreement:
    compared: int = 0
    entries: int = 0
    max_abs: float = 0.0
    max_rel: float = 0.0  # max |diff| over the tensor's largest |value|, worst tensor
    differing: int = 0  # entries beyond 2 ulps of the output dtype
    missing: list[str] = field(default_factory=list)
    worst: str = ""
    eps: float = 0.0  # of the output dtype


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
        if diff.numel():
            scale = max(float(a32.abs().max()), float(b32.abs().max()), torch.finfo(torch.float32).tiny)
            result.max_rel = max(result.max_rel, worst / scale)
        result.eps = eps
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


def machine() -> dict[str, str]:
    cpu = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as fh:
            cpu = next((line.split(":", 1)[1].strip() for line in fh if line.startswith("model name")), cpu)
    except OSError:
        pass
    ram = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return {"nproc": str(len(os.sched_getaffinity(0))), "cpu": cpu, "ram": f"{ram / 2**30:.1f} GiB"}


@dataclass
class Case:
    spec: ModelSpec
    dname: str
    experts: int
    repeat: int
    jobs: list[MergeJob]
    runs: dict[tuple[str, str], list[Run]] = field(default_factory=dict)
    agreements: dict[str, Agreement | str] = field(default_factory=dict)
    out_bytes: int = 0
    input_bytes: dict[str, int] = field(default_factory=dict)  # by number of input models

    @property
    def title(self) -> str:
        return f"{self.spec.title}, {self.dname}"


def run_case(args: argparse.Namespace, spec: ModelSpec, dname: str, repeat: int, work: Path, scripts: dict[str, str],
             mk_python: str | None, rates: dict[tuple[str, str], float], deadline: float, max_anon: int) -> Case:
    dtype = getattr(torch, dname)
    print(f"== {spec.title}, {dname}, base + {args.experts} experts", flush=True)
    case_dir = work / f"{spec.key}-{args.experts}x-{dname}"
    dirs = make_models(case_dir / "models", spec, args.experts, dtype)
    case = Case(spec, dname, args.experts, repeat, merge_jobs(dirs, dtype, args.method_list), out_bytes=model_bytes(dirs[0]))
    runs = case.runs
    case.input_bytes = {str(len(j.inputs)): sum(model_bytes(d) for d in j.inputs) for j in case.jobs}

    def again(key: tuple[str, str], attempt: int) -> bool:
        """Repeat only quick jobs: a long one is measured once."""
        done = runs.get(key)
        return attempt == 0 or bool(done and done[-1].ok and best(done).wall < args.repeat_under)

    def floor(inputs: list[Path], attempt: int) -> None:
        key = ("floor", str(len(inputs)))
        if attempt and not again(key, attempt):
            return
        spec_file = case_dir / f"floor-{len(inputs)}.json"
        spec_file.write_text(json.dumps({"inputs": [str(d / "model.safetensors") for d in inputs],
                                         "output": str(case_dir / "floor-out.safetensors")}))
        r = run_measured(sys.executable, scripts["floor"], [str(spec_file)], case_dir / f"floor-{len(inputs)}.log",
                         max_anon=max_anon)
        runs.setdefault(key, []).append(r)
        print(f"  floor ({len(inputs)} inputs): {r.wall:.1f} s, CPU {r.cpu:.1f} s, {r.peak_rss_mb:.0f} MB, "
              f"load {r.load:.1f}" + ("" if r.ok else f" FAILED\n{r.error}"), flush=True)
        (case_dir / "floor-out.safetensors").unlink(missing_ok=True)

    for attempt in range(repeat):
        for job in case.jobs:
            # The floor of the same inputs right before the tools: the page cache is in the same state
            # for all three (it matters once the inputs outgrow the memory).
            floor(job.inputs, attempt)
            if "hubmerge" in args.tool_list and again(("hubmerge", job.method), attempt):
                recipe = dict(job.hub_recipe, output={**job.hub_recipe["output"], "path": str(case_dir / f"hub-{job.method}")})
                recipe_file = case_dir / f"hub-{job.method}.yaml"
                recipe_file.write_text(yaml.safe_dump(recipe, sort_keys=False))
                r = run_measured(sys.executable, scripts["hubmerge"], ["run", str(recipe_file), "--overwrite", "--no-progress"],
                                 case_dir / f"hub-{job.method}.log", max_anon=max_anon, timeout=1800)
                runs.setdefault(("hubmerge", job.method), []).append(r)
                print(f"  hubmerge {job.method}: {r.wall:.1f} s, CPU {r.cpu:.1f} s, {r.peak_rss_mb:.0f} MB, "
                      f"load {r.load:.1f}" + ("" if r.ok else f" FAILED {r.note}\n{r.error}"), flush=True)
            key = ("mergekit", job.method)
            if mk_python and again(key, attempt):
                input_bytes = sum(model_bytes(d) for d in job.inputs)
                rate = rates.get((job.method, dname)) or rates.get((job.method, "any"))
                projected = rate * input_bytes if rate else None
                left = deadline - time.monotonic()
                note = ""
                if attempt and runs.get(key) and best(runs[key]).wall > left:
                    continue
                if projected and projected > args.max_mergekit_seconds:
                    note = (f"not run: projected {projected:.0f} s from the smaller model's run of the same merge, "
                            f"over --max-mergekit-seconds {args.max_mergekit_seconds:.0f}")
                elif projected and projected > left:
                    note = f"not run: projected {projected:.0f} s, more than the {max(0, left):.0f} s left of --budget-minutes"
                elif left < 30:
                    note = "not run: the run's time budget (--budget-minutes) is used up"
                if note:
                    runs.setdefault(key, []).append(skipped(note))
                    print(f"  mergekit {job.method}: {note}", flush=True)
                    continue
                config_file = case_dir / f"mk-{job.method}.yml"
                config_file.write_text(yaml.safe_dump(job.mk_config, sort_keys=False))
                out_dir = case_dir / f"mk-{job.method}"
                shutil.rmtree(out_dir, ignore_errors=True)
                r = run_measured(mk_python, scripts["mergekit"],
                                 [str(config_file), str(out_dir), "--no-copy-tokenizer", "--quiet",
                                  "--out-shard-size", str(SHARD_BYTES)],
                                 case_dir / f"mk-{job.method}.log", max_anon=max_anon,
                                 timeout=max(300.0, 2 * args.max_mergekit_seconds))
                runs.setdefault(key, []).append(r)
                if r.ok:
                    rates.setdefault((job.method, dname), r.wall / input_bytes)
                    rates.setdefault((job.method, "any"), r.wall / input_bytes)
                print(f"  mergekit {job.method}: {r.wall:.1f} s, CPU {r.cpu:.1f} s, {r.peak_rss_mb:.0f} MB, "
                      f"load {r.load:.1f}" + ("" if r.ok else f" FAILED {r.note}\n{r.error}"), flush=True)
    for job in case.jobs:  # agreement, then clean the outputs
        hub_dir, mk_dir = case_dir / f"hub-{job.method}", case_dir / f"mk-{job.method}"
        if (hub_dir / "model.safetensors").is_file() and mk_dir.is_dir() and any(mk_dir.glob("*.safetensors")):
            case.agreements[job.method] = compare_outputs(hub_dir, mk_dir, spec)
        else:
            case.agreements[job.method] = "n/a"
        shutil.rmtree(hub_dir, ignore_errors=True)
        shutil.rmtree(mk_dir, ignore_errors=True)
    return case


#: What hubmerge computes on top of the I/O, per merge (for the reasons given with the goals).
WORK = {
    "linear": "the task vectors and their weighted mean, in float32",
    "task_arithmetic": "the task vectors and their scaled sum, in float32",
    "ties": "TIES' exact per-tensor top-k of every task vector (two histogram passes) and its sign election",
    "slerp": "float64 norms and dot products of whole tensors",
}


@dataclass
class Goal:
    case: str
    merge: str
    name: str
    value: float | None
    met: bool | None
    why: str = ""


def goals_of(case: Case) -> list[Goal]:
    out: list[Goal] = []
    floors = {k[1]: best(v) for k, v in case.runs.items() if k[0] == "floor"}
    cores = machine()["nproc"]
    largest = max(case.spec.shapes, key=lambda n: math.prod(case.spec.shapes[n]))
    for job in case.jobs:
        hub_runs, mk_runs = case.runs.get(("hubmerge", job.method)), case.runs.get(("mergekit", job.method))
        if not hub_runs:
            continue
        hub = best(hub_runs)
        mk = best(mk_runs) if mk_runs else None
        floor = floors.get(str(len(job.inputs)))
        if not hub.ok:
            out.append(Goal(case.title, job.method, "all", None, False, f"hubmerge failed: {hub.note or hub.error[-200:]}"))
            continue
        convert = " and the float16 -> float32 conversion of every input" if case.dname != "float32" else ""
        # vs mergekit, wall
        if mk is None or not mk.ok:
            why = f"no mergekit measurement ({mk.note or 'failed'})" if mk else "mergekit not run"
            out.append(Goal(case.title, job.method, "wall <= 0.5x mergekit", None, None, why))
            out.append(Goal(case.title, job.method, "RSS <= mergekit", None, None, why))
        else:
            ratio = hub.wall / mk.wall
            why = ""
            if ratio > GOAL_VS_MERGEKIT:
                fixed = floor.wall if floor and floor.ok else 0.0
                why = (f"mergekit took {mk.wall:.1f} s ({mk.cpu:.1f} CPU-s), hubmerge {hub.wall:.1f} s "
                       f"({hub.cpu:.1f} CPU-s)")
                if fixed and mk.wall < 2 * fixed / GOAL_VS_MERGEKIT:
                    why += (f"; both pay the fixed part of the job (interpreter, importing torch, reading the "
                            f"inputs: the floor alone takes {fixed:.1f} s), so halving mergekit's wall means "
                            f"finishing within {0.5 * mk.wall:.1f} s, {0.5 * mk.wall / fixed:.2f}x the floor")
                else:
                    why += f"; hubmerge's own work is {WORK[job.method]}{convert}"
            out.append(Goal(case.title, job.method, "wall <= 0.5x mergekit", ratio, ratio <= GOAL_VS_MERGEKIT, why))
            ratio = hub.peak_rss_mb / mk.peak_rss_mb
            why = ""
            if ratio > 1.0:
                why = f"hubmerge {hub.peak_rss_mb:.0f} MB against mergekit's {mk.peak_rss_mb:.0f} MB " \
                      f"(of which {mk.peak_anon_mb:.0f} MB anonymous, the rest mapped input pages)"
                if job.method in ("ties", "slerp"):
                    experts = len(job.hub_recipe["experts"])
                    group = (experts + 1) * math.prod(case.spec.shapes[largest]) * 4
                    why += (f": {job.method} merges whole tensors, so hubmerge holds the base and the {experts} "
                            f"experts of the largest one ({largest}) in float32, {group / 2**20:.0f} MB, "
                            "plus the merge's temporaries")
            out.append(Goal(case.title, job.method, "RSS <= mergekit", ratio, ratio <= 1.0, why))
        # vs the floor
        if floor is None or not floor.ok:
            out.append(Goal(case.title, job.method, "wall <= 1.5x floor", None, None, "no floor measurement"))
            continue
        ratio = hub.wall / floor.wall
        why = ""
        if ratio > GOAL_FLOOR_RATIO:
            if hub.cpu > 1.5 * floor.cpu:
                why = (f"CPU-bound: hubmerge used {hub.cpu:.1f} CPU-s to the floor's {floor.cpu:.1f} for "
                       f"{WORK[job.method]}{convert}; on {cores} cores shared with other processes (load "
                       f"{hub.load:.1f} during the run) that work does not fit in the floor's {floor.wall:.1f} s of I/O")
            else:
                why = (f"not CPU-bound ({hub.cpu:.1f} CPU-s against the floor's {floor.cpu:.1f}): waiting on reads "
                       f"({fmt_gb(hub.read_bytes)} GB from disk against the floor's {fmt_gb(floor.read_bytes)}) "
                       f"or on other processes (load {hub.load:.1f})")
        out.append(Goal(case.title, job.method, "wall <= 1.5x floor", ratio, ratio <= GOAL_FLOOR_RATIO, why))
    return out


def verdict(goal: Goal) -> str:
    if goal.met is None:
        return f"not measured ({goal.why})"
    value = f"{goal.value:.2f}x"
    return f"{value}, met" if goal.met else f"{value}, **NOT met**: {goal.why}"


def render(case: Case) -> str:
    lines = [(f"## {case.title}, base + {case.experts} experts (best of {case.repeat}; jobs over "
             f"{ARGS.repeat_under:.0f} s run once)"), ""]
    floors = {k[1]: best(v) for k, v in case.runs.items() if k[0] == "floor"}
    sizes = case.input_bytes
    for n, r in sorted(floors.items(), key=lambda kv: int(kv[0])):
        lines.append(f"- I/O floor, {n} inputs ({fmt_gb(sizes.get(n, 0))} GB read, {fmt_gb(case.out_bytes)} GB written): "
                     f"{r.wall:.2f} s, {r.cpu:.1f} CPU-s, peak RSS {r.peak_rss_mb:.0f} MB, "
                     f"{fmt_gb(r.read_bytes)} GB from disk (load {r.load:.1f})")
    lines += ["", ("| merge | tool | wall (s) | CPU (s) | x floor | peak RSS (MB) | anon (MB) | rchar / wchar (GB) | "
              "from disk (GB) | load | hub/mk wall | hub/mk RSS |"),
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    notes: list[str] = []
    for job in case.jobs:
        floor = floors.get(str(len(job.inputs)))
        hub, mk = case.runs.get(("hubmerge", job.method)), case.runs.get(("mergekit", job.method))
        hb, mb = (best(hub) if hub else None), (best(mk) if mk else None)
        for tool, r in (("hubmerge", hb), ("mergekit", mb)):
            if r is None:
                continue
            if not r.ok:
                lines.append(f"| {job.method} | {tool} | {'not run' if not r.wall else 'FAILED'} | | | | | | | "
                             f"{r.load:.1f} | | |")
                notes.append(f"- {tool} {job.method}: {r.note or 'failed: ' + r.error[-300:].strip()}")
                continue
            ratio = f"{r.wall / floor.wall:.2f}" if floor and floor.ok else "n/a"
            cmp_wall = cmp_rss = ""
            if tool == "hubmerge" and mb is not None and mb.ok:
                cmp_wall, cmp_rss = f"**{r.wall / mb.wall:.2f}**", f"**{r.peak_rss_mb / mb.peak_rss_mb:.2f}**"
            lines.append(
                f"| {job.method} | {tool} | {r.wall:.2f} | {r.cpu:.1f} | {ratio} | {r.peak_rss_mb:.0f} | "
                f"{r.peak_anon_mb:.0f} | {fmt_gb(r.rchar)} / {fmt_gb(r.wchar)} | {fmt_gb(r.read_bytes)} | "
                f"{r.load:.1f} | {cmp_wall} | {cmp_rss} |")
    if notes:
        lines += ["", *notes]
    lines += ["", "Goals of hubmerge here:", ""]
    for goal in goals_of(case):
        lines.append(f"- {goal.merge}, {goal.name}: {verdict(goal)}")
    lines += ["", ("Numeric agreement (hubmerge output vs mergekit output, every tensor): the largest difference, "
                   "the largest relative to its tensor's scale (max |value|), and how many entries are more than 2 "
                   "ulps of the output dtype apart. Where the definitions coincide the tools agree when the relative "
                   "difference stays within 4 ulps of the output dtype, or 1e-5 for float32 (mergekit sums in "
                   "float32 and in another order; hubmerge computes theta_0 + sum w_i tau_i):"), "",
              "| merge | tensors | max abs diff | max rel diff | entries > 2 ulps | agreement |", "|---|---|---|---|---|---|"]
    for job in case.jobs:
        a = case.agreements.get(job.method)
        if not isinstance(a, Agreement):
            lines.append(f"| {job.method} | n/a | | | | |")
            continue
        frac = a.differing / a.entries if a.entries else 0.0
        missing = f" (missing: {', '.join(a.missing[:3])})" if a.missing else ""
        if job.method == "ties":
            verdict_text = ("differs where the definitions differ: threshold ties (mergekit's argsort keeps an "
                            "arbitrary subset of equal magnitudes, hubmerge all of them) and exact-zero sign sums "
                            "(mergekit elects +)")
        elif a.max_rel <= max(4 * a.eps, 1e-5):
            verdict_text = "agree (rounding only)"
        else:
            verdict_text = "**DIFFER** beyond rounding"
        lines.append(f"| {job.method} | {a.compared}{missing} | {a.max_abs:.3g} ({a.worst or '-'}) | {a.max_rel:.2g} | "
                     f"{a.differing} ({frac:.2e}) | {verdict_text} |")
    return "\n".join(lines) + "\n\n"


ARGS = argparse.Namespace(repeat_under=60.0)


def main() -> None:
    global ARGS
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="gpt2,llama1b", help="gpt2, llama1b (comma-separated)")
    parser.add_argument("--dtypes", default="float32,float16", help="dtypes of the GPT-2 runs")
    parser.add_argument("--llama-dtypes", default="float16",
                        help="dtypes of the llama1b runs (float32 means 40 GB of inputs: not in the default run)")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--repeat", type=int, default=2, help="best of N (GPT-2)")
    parser.add_argument("--llama-repeat", type=int, default=1, help="best of N for llama1b")
    parser.add_argument("--repeat-under", type=float, default=60.0, help="repeat only jobs faster than this (s)")
    parser.add_argument("--tools", default="hubmerge,mergekit")
    parser.add_argument("--quick", action="store_true", help="GPT-2 fp16 only, one try each")
    parser.add_argument("--budget-minutes", type=float, default=33.0,
                        help="mergekit jobs that would end the run later are not started")
    parser.add_argument("--max-mergekit-seconds", type=float, default=420.0,
                        help="do not start a mergekit job projected to take longer (from the smaller model's run)")
    parser.add_argument("--max-anon-gb", type=float, default=0.0,
                        help="stop a job whose anonymous memory passes this (default: 85%% of what is available)")
    parser.add_argument("--work", default=str(HERE / ".work" / "vs-mergekit"))
    parser.add_argument("--mergekit-venv", default=str(HERE / ".work" / "mergekit-venv"))
    parser.add_argument("--no-install", action="store_true", help="do not create the mergekit virtualenv")
    parser.add_argument("--keep-inputs", action="store_true",
                        help="keep the synthetic models (by default the 1B ones, 20 GB, are deleted after their "
                             "runs, and any others when the disk is short)")
    parser.add_argument("--output", default=str(HERE / "results" / "vs_mergekit.md"))
    args = parser.parse_args()
    if args.quick:
        args.models, args.dtypes, args.repeat = "gpt2", "float16", 1
    args.tool_list = [t.strip() for t in args.tools.split(",") if t.strip()]
    args.method_list = [m.strip() for m in args.methods.split(",") if m.strip()]
    ARGS = args
    command = "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(__file__, ROOT), *sys.argv[1:]])
    started_wall, started = time.strftime("%Y-%m-%d %H:%M"), time.monotonic()
    deadline = started + args.budget_minutes * 60
    load_start = os.getloadavg()
    max_anon = int(args.max_anon_gb * 2**30) if args.max_anon_gb else int(0.85 * mem_available())
    print(f"{command}\nload average {load_start[0]:.2f} {load_start[1]:.2f} {load_start[2]:.2f}, "
          f"{machine()['nproc']} cores, stopping jobs above {max_anon / 2**30:.1f} GiB of anonymous memory", flush=True)

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    mk_python, mk_version = (None, "not requested")
    if "mergekit" in args.tool_list:
        mk_python, mk_version = ensure_mergekit(Path(args.mergekit_venv), install=not args.no_install)
        if mk_python is None:
            print(f"SKIPPING mergekit: {mk_version}", flush=True)
    scripts = {"hubmerge": str(Path(sys.executable).parent / "hubmerge"), "floor": str(work / "floor.py"),
               "mergekit": str(Path(mk_python).parent / "mergekit-yaml") if mk_python else ""}
    Path(scripts["floor"]).write_text(FLOOR)

    cases_todo = []
    for model_key in [m.strip() for m in args.models.split(",") if m.strip()]:
        spec = SPECS[model_key]()
        dtypes = args.dtypes if model_key != "llama1b" else args.llama_dtypes
        repeat = args.repeat if model_key != "llama1b" else args.llama_repeat
        cases_todo += [(spec, d.strip(), repeat) for d in dtypes.split(",") if d.strip()]
    rates: dict[tuple[str, str], float] = {}
    cases = []
    for index, (spec, dname, repeat) in enumerate(cases_todo):
        case = run_case(args, spec, dname, repeat, work, scripts, mk_python, rates, deadline, max_anon)
        cases.append(case)
        print(render(case), flush=True)
        later = cases_todo[index + 1:]
        need = max((s.params * getattr(torch, d).itemsize * (args.experts + 1) for s, d, _ in later), default=0)
        short = shutil.disk_usage(work).free < 1.3 * need + 4 * 2**30
        if not args.keep_inputs and (spec.key == "llama1b" or short):
            shutil.rmtree(work / f"{spec.key}-{args.experts}x-{dname}" / "models", ignore_errors=True)

    load_end = os.getloadavg()
    info = machine()
    summary = ["| model, dtype | merge | wall <= 0.5x mergekit | RSS <= mergekit | wall <= 1.5x floor |",
               "|---|---|---|---|---|"]
    not_met = []
    for case in cases:
        by_merge: dict[str, dict[str, Goal]] = {}
        for goal in goals_of(case):
            by_merge.setdefault(goal.merge, {})[goal.name] = goal
            if goal.met is False:
                not_met.append(goal)
        for merge_name, goals in by_merge.items():
            cells = []
            for name in ("wall <= 0.5x mergekit", "RSS <= mergekit", "wall <= 1.5x floor"):
                g = goals.get(name) or goals.get("all")
                cells.append("n/a" if g is None or g.met is None else
                             f"{g.value:.2f}x {'met' if g.met else '**NOT met**'}" if g.value is not None else "failed")
            summary.append(f"| {case.title} | {merge_name} | " + " | ".join(cells) + " |")
    head = [
        "# hubmerge vs mergekit vs the I/O floor",
        "",
        f"Generated by `{command}` on {started_wall}, in {time.monotonic() - started:.0f} s.",
        "",
        (f"- Machine: {info['nproc']} cores (`nproc`), {info['cpu']}, {info['ram']} RAM, no GPU; "
        f"torch {torch.__version__} (CPU); mergekit {mk_version} in its own virtualenv."),
        (f"- Load average (1, 5, 15 min, `os.getloadavg()`): {load_start[0]:.2f}, {load_start[1]:.2f}, "
        f"{load_start[2]:.2f} at the start, {load_end[0]:.2f}, {load_end[1]:.2f}, {load_end[2]:.2f} at the end. "
        "The machine is shared: other processes use the same cores, so every time here is an upper bound; "
        "the `load` column gives the 1-minute load during each run and the CPU column the job's own CPU time."),
        "",
        ("Wall is the whole process (interpreter start and imports included); peak RSS is the process tree's; "
        "`x floor` divides by the I/O floor of the same inputs (read every input model the merge needs once, "
        "write one output of the same size and fsync it, after importing torch). mergekit maps its inputs: "
        "their pages count in its RSS but not in `rchar`; `anon` is RSS not backed by files."),
        "",
        "## Goals",
        "",
        "hubmerge wall <= 0.5x mergekit's, peak RSS <= mergekit's, wall <= 1.5x the I/O floor. "
        + (f"{len(not_met)} goal(s) not met (the reasons are under each model below)." if not_met
           else "Every measured goal is met."),
        "",
        *summary,
        "",
    ]
    text = "\n".join(head) + "\n" + "".join(render(c) for c in cases)
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(text)
    print("\n".join(head))
    for goal in not_met:
        print(f"NOT MET: {goal.case}, {goal.merge}, {goal.name}: {goal.value:.2f}x: {goal.why}")
    print(f"wrote {args.output} ({time.monotonic() - started:.0f} s)")


if __name__ == "__main__":
    main()
