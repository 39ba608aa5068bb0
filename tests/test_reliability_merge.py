"""Faults during a merge: SIGKILL at several points, a full disk, an input that breaks mid-read.

After every fault: no output directory that looks complete (a previous output stays
byte-identical), the temporaries are removed by the next run, and a re-run succeeds and
gives the same bytes as an undisturbed merge.

The ``hubmerge run`` children are real processes killed from outside with SIGKILL. To hit
given byte offsets of the output reliably on a loaded machine, the child's writer pauses a
little after each tensor (and flushes, so the poller sees the bytes); nothing else changes.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from hubmerge.engine import merge
from hubmerge.errors import CheckpointError, HubmergeError
from hubmerge.recipe import load_recipe
from hubmerge.writer import TEMP_PREFIX
from helpers import write_recipe

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals and rlimits")

#: A process that imports hubmerge (and torch) once, then forks one ``hubmerge run`` per request:
#: each fork is a real ``hubmerge run`` process that the test kills with SIGKILL, without
#: paying torch's import time again. Fault settings apply in the fork only.
ZYGOTE = r"""
import json, os, resource, signal, sys, time, traceback

import hubmerge.cli
import hubmerge.writer as writer

print(json.dumps({"ready": True}), flush=True)
for line in sys.stdin:
    request = json.loads(line)
    if "wait" in request:
        _, status = os.waitpid(request["wait"], 0)
        print(json.dumps({"code": os.waitstatus_to_exitcode(status)}), flush=True)
        continue
    pid = os.fork()
    if pid:
        print(json.dumps({"pid": pid}), flush=True)
        continue
    code = 1
    try:
        os.chdir(request["cwd"])
        log = os.open(request["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.dup2(log, 1)
        os.dup2(log, 2)
        if request.get("fsize"):  # the disk "fills up": write() past this size fails with EFBIG
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
            resource.setrlimit(resource.RLIMIT_FSIZE, (request["fsize"], request["fsize"]))
        delay = request.get("delay", 0)
        if delay:  # pause after each tensor (flushed, so the test sees the bytes) and each extra file
            write, add_file = writer.ShardedWriter.write, writer.ShardedWriter.add_file

            def slow_write(self, *args, **kwargs):
                write(self, *args, **kwargs)
                self._handle.flush()
                time.sleep(delay)

            def slow_add_file(self, *args, **kwargs):
                add_file(self, *args, **kwargs)
                time.sleep(delay * 5)

            writer.ShardedWriter.write, writer.ShardedWriter.add_file = slow_write, slow_add_file
        code = hubmerge.cli.main(request["argv"])
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    except BaseException:
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
"""


class Zygote:
    """Talks to the :data:`ZYGOTE` process."""

    def __init__(self):
        self.proc = subprocess.Popen([sys.executable, "-c", ZYGOTE], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        assert self._read() == {"ready": True}

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        assert line, "the zygote process died"
        return json.loads(line)

    def _send(self, request: dict) -> dict:
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        return self._read()

    def run(self, recipe: Path, cwd: Path, **faults) -> Run:
        """Start ``hubmerge run RECIPE`` in ``cwd`` (faults: ``delay`` seconds, ``fsize`` bytes)."""
        log = cwd / f"run-{time.monotonic_ns()}.log"
        pid = self._send({"argv": ["run", str(recipe), "--no-progress"], "cwd": str(cwd), "log": str(log),
                          **faults})["pid"]
        return Run(self, pid, log)

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(10)


class Run:
    """One forked ``hubmerge run``."""

    def __init__(self, zygote: Zygote, pid: int, log: Path):
        self.zygote, self.pid, self.log = zygote, pid, log
        self.returncode: int | None = None

    def kill(self) -> None:
        os.kill(self.pid, signal.SIGKILL)

    def wait(self) -> int:
        """Reap the process (so its pid is dead) and return its exit code (-9 when killed)."""
        if self.returncode is None:
            self.returncode = self.zygote._send({"wait": self.pid})["code"]
        return self.returncode

    def running(self) -> bool:
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        with open(f"/proc/{self.pid}/stat") as handle:  # a finished, unreaped child is a zombie
            return handle.read().rsplit(")", 1)[1].split()[0] != "Z"

    @property
    def output(self) -> str:
        return self.log.read_text()


@pytest.fixture(scope="module")
def zygote():
    process = Zygote()
    yield process
    process.close()


SHARD_SIZE = "32KB"  # three shards for the tiny BERT


def _recipe(tmp_path: Path, tiny_models, out: Path, *, scale: float = 0.5, name: str = "r.yaml",
            shard_size: str = SHARD_SIZE) -> Path:
    return write_recipe(tmp_path / name, base=str(tiny_models["base"]),
                        experts=[str(tiny_models["e0"]), str(tiny_models["e1"])], method="task_arithmetic",
                        params={"scale": scale}, output={"path": str(out), "shard_size": shard_size})


def _temporaries(parent: Path) -> list[Path]:
    return sorted(parent.glob(f"{TEMP_PREFIX}*"))


def _bytes_in(directory: Path) -> tuple[int, set[str]]:
    total, names = 0, set()
    try:
        for entry in os.scandir(directory):
            names.add(entry.name)
            total += entry.stat().st_size
    except FileNotFoundError:
        pass
    return total, names


def _snapshot(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def _weights(directory: Path) -> dict[str, bytes]:
    return {n: b for n, b in _snapshot(directory).items() if n.endswith(".safetensors")}


@pytest.fixture(scope="module")
def reference(tiny_models, tmp_path_factory) -> dict[str, bytes]:
    """The shard bytes of an undisturbed merge."""
    root = tmp_path_factory.mktemp("reference")
    merge(load_recipe(_recipe(root, tiny_models, root / "out")))
    return _weights(root / "out")


# (name, when to kill: given the temp dir's bytes and file names, the shard bytes planned)
KILL_POINTS = {
    "temp-dir-created": lambda size, names, total: True,
    "30%-of-shards": lambda size, names, total: size >= 0.3 * total,
    "70%-of-shards": lambda size, names, total: size >= 0.7 * total,
    "shards-done-before-rename": lambda size, names, total: "hubmerge_recipe.yaml" in names,
}


def test_sigkill_at_several_points_leaves_nothing_half_written(tiny_models, tmp_path, reference, zygote):
    total = sum(len(b) for b in reference.values())
    runs = {}
    for i, point in enumerate(KILL_POINTS):
        work = tmp_path / f"k{i}"
        work.mkdir()
        out = work / "out"
        previous = None
        if i % 2:  # half the runs replace an earlier output, which must survive the kill intact
            merge(load_recipe(_recipe(work, tiny_models, out, scale=0.1, name="old.yaml")))
            previous = _snapshot(out)
        recipe = _recipe(work, tiny_models, out)
        runs[point] = (work, out, recipe, previous, zygote.run(recipe, work, delay=0.03))

    killed_at = {}
    deadline = time.monotonic() + 90
    while len(killed_at) < len(runs) and time.monotonic() < deadline:
        for point, (work, out, recipe, previous, proc) in runs.items():
            if point in killed_at:
                continue
            assert proc.running(), f"{point}: the merge finished before the kill point\n{proc.output}"
            temps = _temporaries(work)
            if temps:
                size, names = _bytes_in(temps[0])
                if KILL_POINTS[point](size, names, total):
                    proc.kill()
                    proc.wait()  # reaped: its pid is dead for the stale-temporary check
                    killed_at[point] = size
        time.sleep(0.002)
    assert set(killed_at) == set(runs), "some kill points were never reached"

    for point, (work, out, recipe, previous, proc) in runs.items():
        assert proc.wait() == -signal.SIGKILL
        stale = _temporaries(work)
        assert len(stale) == 1 and stale[0].name.startswith(f"{TEMP_PREFIX}{proc.pid}-"), point
        if previous is None:
            assert not out.exists(), f"{point}: an output directory appeared after the kill"
        else:
            assert _snapshot(out) == previous, f"{point}: the previous output was changed"
        # the next run removes the dead run's temporary and writes the same bytes as an undisturbed merge
        result = merge(load_recipe(recipe))
        assert result.output_dir == out and _temporaries(work) == []
        assert _weights(out) == reference, point
        assert json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    assert killed_at["temp-dir-created"] < killed_at["30%-of-shards"] < killed_at["70%-of-shards"]


def test_disk_full_fails_cleanly_and_rerun_succeeds(tiny_models, tmp_path, reference, zygote):
    out = tmp_path / "out"
    recipe = _recipe(tmp_path, tiny_models, out, shard_size="1MB")  # one 84 KB shard
    proc = zygote.run(recipe, tmp_path, fsize=40_000)  # every file stops at 40 KB
    code = proc.wait()
    stderr = proc.output
    assert code == 2, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in stderr, stderr
    assert "File too large" in lines[0] and str(out) in lines[0]
    assert not out.exists() and _temporaries(tmp_path) == []
    merge(load_recipe(recipe))
    assert load_file(out / "model.safetensors").keys() == load_file(tiny_models["base"] / "model.safetensors").keys()


def test_no_space_while_closing_a_shard_is_reported_and_cleaned(tiny_models, tmp_path, monkeypatch, reference):
    """ENOSPC from fsync (delayed allocation): the error is ours, the temporary goes, the target is untouched."""
    out = tmp_path / "out"
    recipe = load_recipe(_recipe(tmp_path, tiny_models, out))
    real_fsync = os.fsync

    def full_disk(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full_disk)
    with pytest.raises(HubmergeError, match="No space left on device") as info:
        merge(recipe)
    assert isinstance(info.value, OSError) and info.value.errno == errno.ENOSPC
    assert not out.exists() and _temporaries(tmp_path) == []
    monkeypatch.setattr(os, "fsync", real_fsync)
    merge(recipe)
    assert _weights(out) == reference


def _copy_expert(tiny_models, tmp_path: Path) -> Path:
    expert = tmp_path / "e1copy"
    shutil.copytree(tiny_models["e1"], expert)
    return expert


def test_input_truncated_mid_merge_is_named_and_rerun_succeeds(tiny_models, tmp_path, reference):
    expert = _copy_expert(tiny_models, tmp_path)
    weights = expert / "model.safetensors"
    original = weights.read_bytes()
    out = tmp_path / "out"
    recipe = load_recipe(write_recipe(
        tmp_path / "r.yaml", base=str(tiny_models["base"]), experts=[str(tiny_models["e0"]), str(expert)],
        method="task_arithmetic", params={"scale": 0.5}, output={"path": str(out), "shard_size": SHARD_SIZE}))

    def truncate_after_validation(event):
        if event.stage == "merge" and event.tensors_done == 2:
            with open(weights, "r+b") as handle:  # the headers were checked long ago
                handle.truncate(len(original) // 2)

    with pytest.raises(CheckpointError, match=r"model\.safetensors: unexpected end of file reading tensor '"):
        merge(recipe, progress=truncate_after_validation)
    assert not out.exists() and _temporaries(tmp_path) == []
    weights.write_bytes(original)
    merge(recipe)
    assert _weights(out) == reference


def test_input_io_error_mid_merge_is_named(tiny_models, tmp_path, monkeypatch):
    expert = _copy_expert(tiny_models, tmp_path)
    out = tmp_path / "out"
    recipe = load_recipe(write_recipe(
        tmp_path / "r.yaml", base=str(tiny_models["base"]), experts=[str(expert)], method="task_arithmetic",
        output={"path": str(out)}))
    real_preadv = os.preadv
    reads = []

    def failing_disk(fd, buffers, offset, *args):
        if os.readlink(f"/proc/self/fd/{fd}").startswith(str(expert)):
            reads.append(offset)
            if len(reads) > 5:
                raise OSError(errno.EIO, os.strerror(errno.EIO))
        return real_preadv(fd, buffers, offset, *args)

    monkeypatch.setattr(os, "preadv", failing_disk)
    with pytest.raises(CheckpointError, match=r"e1copy/model\.safetensors: cannot read tensor .*Input/output error"):
        merge(recipe)
    assert not out.exists() and _temporaries(tmp_path) == []
