"""Accuracy of every installed merge method on the demo suite, against storage.

For each domain of the suite (vision: a small ViT and 8 full fine-tunes; text: MiniLM and 3 LoRA
adapters, expanded exactly into task vectors) it evaluates, task by task with each task's head:

* the base with the heads, and each expert on its own task (storage: T models);
* every installed single-output method (one merged model, storage 1): the parameters of the
  published demo recipe ``recipes/demo-<domain>-<method>.yaml`` when there is one, else the
  method's defaults (``slerp`` takes exactly two experts: the domain's first two tasks);
* every deployment method (``emr``, ``tall``): each task with its own task model, storage as
  stored;
* FlexMerge with task arithmetic inside the groups (λ = 1.5 × mean, as the demo recipe), every size.

Merges run from local directories through the same engine as ``hubmerge run`` (no Hub); each row
is computed here, in this run. Results: ``benchmarks/results/accuracy.md`` and
``benchmarks/results/accuracy_vs_size.png`` (normalised accuracy, i.e. accuracy / the expert's,
against storage in model-equivalents).

    python benchmarks/bench_accuracy.py                 # the full suite (reused from .hubmerge-demo/suite)
    python benchmarks/bench_accuracy.py --small         # the unit tests' reduced suite (seconds)
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "results"
FLEX_SCALE = 1.5
EXPLANATION = (
    "Each task is scored with its own head on its test split; *normalised* = accuracy / the expert's on "
    "that task, averaged. Storage is in model-equivalents (bytes stored / one model). Parameters: the "
    "published demo recipe's when there is one, else the method's defaults."
)

logger = logging.getLogger("bench_accuracy")


@dataclass
class Row:
    """One model (or deployment) evaluated on its domain's tasks."""

    label: str
    kind: str  # "reference" | "merge" | "deployment" | "flexmerge"
    storage: float
    accuracies: dict[str, float]
    params: str = ""
    seconds: float = 0.0
    extra: dict[str, str] = field(default_factory=dict)

    @property
    def average(self) -> float:
        return sum(self.accuracies.values()) / len(self.accuracies)


def demo_variants(domain: str, method: str) -> list[tuple[str, dict]]:
    """``(recipe name, recipe data)`` of every published demo recipe of ``domain`` using ``method``
    (FlexMerge recipes excepted), e.g. ``wudi`` and ``wudi`` closed form."""
    found = []
    for path in sorted((ROOT / "recipes").glob(f"demo-{domain}-*.yaml")):
        data = yaml.safe_load(path.read_text())
        if data.get("method") == method and not data.get("flexmerge"):
            found.append((path.stem, data))
    return found


def _shown(params: dict, recipe: str | None) -> str:
    where = f"`{recipe}`" if recipe else "defaults"
    return where + (": " + ", ".join(f"{k}={v}" for k, v in params.items()) if params else "")


def recipe_for(suite, domain: str, method: str, params: dict, output: Path, experts=None, flexmerge=None,
               data: dict | None = None):
    """A recipe over the suite's local directories (experts named by their task)."""
    from hubmerge.recipe import recipe_from_dict

    experts = experts if experts is not None else suite.experts_for(domain)
    recipe = {
        "hubmerge": 1,
        "name": f"bench-{domain}-{method}",
        "base": str(suite.base_dir(domain)),
        "experts": [{"path": str(e.path), "name": e.task} for e in experts],
        "method": method,
        "params": params,
        "output": {"path": str(output)},
    }
    if flexmerge:
        recipe["flexmerge"] = flexmerge
    if data:
        recipe["data"] = data
    return recipe_from_dict(recipe, file=f"<bench {domain}/{method}>")


def local_data(suite, domain: str, demo_data: dict | None) -> dict:
    """The demo recipe's ``data:`` pointed at the suite's own test splits on disk instead of the Hub."""
    data = {k: v for k, v in (demo_data or {}).items() if k not in ("repo", "revision", "path")}
    data["path"] = str(suite.base_dir(domain).parent / "data")
    data.setdefault("files", "{task}.safetensors")
    return data


def reference_rows(suite, domain: str) -> list[Row]:
    """Base + heads (storage 1) and each expert on its own task (storage T)."""
    from hubmerge.suite import evaluate, evaluate_all

    experts = suite.experts_for(domain)
    return [
        Row("base + heads", "reference", 1.0, evaluate_all(suite.base_dir(domain), suite, domain=domain)),
        Row("experts (each on its task)", "reference", float(len(experts)),
            {e.task: evaluate(e.path, e.task, suite) for e in experts}),
    ]


def _run_one(recipe, name: str, label: str, shown: str, chosen, experts, suite, domain: str, output: Path,
             task_of: dict[str, str]) -> list[Row]:
    """Run one recipe and evaluate it the way its kind of output is used."""
    from hubmerge.demo import evaluate_deployment
    from hubmerge.deployment import is_deployment_method, run_deployment
    from hubmerge.engine import merge
    from hubmerge.suite import evaluate_all

    started = time.perf_counter()
    if _is_dynamic(name):
        from hubmerge.dynamic import evaluate_dynamic, run_dynamic

        result = run_dynamic(recipe, output=output, overwrite=True)
        ev = evaluate_dynamic(result.output_dir, suite, task_of=task_of)
        storage = float(result.extra["deployment"]["storage"]["model_equivalents"])
        return [Row(label, "dynamic", storage, dict(ev.accuracy), shown, time.perf_counter() - started,
                    {"routing accuracy": f"{ev.routing_accuracy:.3f}",
                     "inference time vs static merge": f"{ev.overhead:.1f}×"})]
    if is_deployment_method(name):
        result = run_deployment(recipe, output=output, overwrite=True)
        variants, evaluation = evaluate_deployment(result, task_of, suite)
        return [Row(label, "deployment", v.model_equivalents, evaluation[v.label], shown,
                    time.perf_counter() - started) for v in variants]
    result = merge(recipe, output=output, overwrite=True)
    tasks = [e.task for e in chosen]
    accuracies = evaluate_all(result.output_dir, suite, domain=domain, tasks=tasks)
    if chosen is not experts:
        label = f"{label} ({' + '.join(tasks)} only)"
    return [Row(label, "merge", 1.0, accuracies, shown, time.perf_counter() - started)]


def method_rows(suite, domain: str, work: Path, only: set[str] | None) -> list[Row]:
    """Every installed method on ``domain``: single-output merges, deployments, FlexMerge sizes."""
    from hubmerge.demo import evaluate_deployment
    from hubmerge.flexmerge import run_flexmerge
    from hubmerge.plugins import registered_methods

    rows = []
    experts = suite.experts_for(domain)
    task_of = {e.task: e.task for e in experts}
    for name, registered in sorted(registered_methods().items()):
        if only and name not in only:
            continue
        method = registered.method
        chosen = experts
        if method.max_experts is not None and len(experts) > method.max_experts:
            chosen = experts[: method.max_experts]
        if len(chosen) < method.min_experts:
            continue
        variants = demo_variants(domain, name) or [(None, {})]
        for recipe_name, demo in variants:
            params = dict(demo.get("params") or {})
            needs_data = getattr(method, "needs_data", False)
            if needs_data and not demo.get("data"):
                logger.info("%s/%s: needs data and has no demo recipe giving it; not run", domain, name)
                continue
            data = local_data(suite, domain, demo.get("data")) if needs_data else None
            output = work / "out" / domain / (recipe_name or name)
            recipe = recipe_for(suite, domain, name, params, output, experts=chosen, data=data)
            label = name if recipe_name is None or len(variants) == 1 else f"{name} ({recipe_name})"
            rows += _run_one(recipe, name, label, _shown(params, recipe_name), chosen, experts, suite, domain,
                             output, task_of)
            shutil.rmtree(output, ignore_errors=True)
            logger.info("%s/%s: %.3f", domain, label, rows[-1].average)
    if not only or "flexmerge" in only:
        output = work / "out" / domain / "flexmerge"
        recipe = recipe_for(suite, domain, "task_arithmetic", {}, output,
                            flexmerge={"sizes": "all", "inner": "task_arithmetic",
                                       "inner_params": {"scale": FLEX_SCALE}})
        started = time.perf_counter()
        result = run_flexmerge(recipe, output=output, overwrite=True)
        variants, evaluation = evaluate_deployment(result, task_of, suite)
        seconds = time.perf_counter() - started
        for variant in variants:
            rows.append(Row(f"flexmerge size {variant.label}", "flexmerge", variant.model_equivalents,
                            evaluation[variant.label], f"inner task_arithmetic, scale={FLEX_SCALE}", seconds))
        shutil.rmtree(output, ignore_errors=True)
    return rows


def _is_dynamic(name: str) -> bool:
    try:
        from hubmerge.dynamic import is_dynamic_method
    except ImportError:
        return False
    return is_dynamic_method(name)


def table(domain: str, suite, rows: list[Row]) -> list[str]:
    """Markdown table of one domain."""
    tasks = suite.tasks_for(domain)
    expert = next(r for r in rows if r.label.startswith("experts"))
    kind = suite.experts_for(domain)[0].kind
    out = [f"### {domain} ({len(tasks)} tasks, experts: {kind})", "",
           "| model | storage | " + " | ".join(tasks) + " | avg | normalised | parameters, notes |",
           "|---|---|" + "---|" * (len(tasks) + 3)]
    for r in rows:
        cells = [f"{r.accuracies[t]:.3f}" if t in r.accuracies else "–" for t in tasks]
        norm = sum(r.accuracies[t] / expert.accuracies[t] for t in r.accuracies) / len(r.accuracies)
        notes = "; ".join([r.params] + [f"{k} {v}" for k, v in r.extra.items()])
        out.append(f"| {r.label} | {r.storage:.2f}× | " + " | ".join(cells)
                   + f" | {r.average:.3f} | {norm:.3f} | {notes} |")
    return out + [""]


def normalised(row: Row, expert: Row) -> float:
    return sum(row.accuracies[t] / expert.accuracies[t] for t in row.accuracies) / len(row.accuracies)


def plot(path: Path, by_domain: dict[str, list[Row]]) -> None:
    """Normalised accuracy against storage, one panel per domain."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(by_domain), figsize=(6.5 * len(by_domain), 4.8), squeeze=False)
    for ax, (domain, rows) in zip(axes[0], by_domain.items()):
        expert = next(r for r in rows if r.label.startswith("experts"))
        flex = sorted((r for r in rows if r.kind == "flexmerge"), key=lambda r: r.storage)
        if flex:
            ax.plot([r.storage for r in flex], [normalised(r, expert) for r in flex], "-o", color="tab:blue",
                    label="FlexMerge (task arithmetic), every size", zorder=2)
        markers = iter("s^vD<>pPX*h8dH")
        colors = iter(plt.get_cmap("tab20").colors)
        for r in rows:
            if r.kind == "flexmerge" or "only)" in r.label:
                continue
            color = "black" if r.kind == "reference" else next(colors)
            ax.scatter([r.storage], [normalised(r, expert)], marker=next(markers, "o"), s=50, color=color,
                       label=r.label, zorder=3)
        ax.set_xlabel("storage (model-equivalents)")
        ax.set_ylabel("normalised accuracy (accuracy / expert's)")
        ax.set_title(f"{domain}: {len(expert.accuracies)} tasks")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    os.replace(tmp, path)


def machine() -> str:
    import torch

    try:
        with open("/proc/cpuinfo") as info:
            cpu = next(line.split(":", 1)[1].strip() for line in info if line.startswith("model name"))
    except (OSError, StopIteration):
        cpu = platform.processor() or "unknown CPU"
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return (f"{os.cpu_count()} cores ({cpu}), {mem:.0f} GiB RAM, torch {torch.__version__}, "
            f"load average at start {os.getloadavg()[0]:.1f}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--suite", type=Path, default=None,
                        help="suite directory (default: .hubmerge-demo/suite, or a fresh one with --small)")
    parser.add_argument("--work", type=Path, default=HERE / ".work" / "accuracy")
    parser.add_argument("--small", action="store_true", help="the reduced suite of the unit tests")
    parser.add_argument("--domains", nargs="+", default=None)
    parser.add_argument("--methods", nargs="+", default=None, help="only these methods (and 'flexmerge')")
    parser.add_argument("--out", type=Path, default=None, help="Markdown output (default: results/accuracy.md)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for noisy in ("hubmerge", "httpx", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    from hubmerge.suite import SuiteConfig, build_suite

    started = time.perf_counter()
    header = machine()
    config = SuiteConfig.small() if args.small else SuiteConfig()
    root = args.suite or (args.work / "suite-small" if args.small else ROOT / ".hubmerge-demo" / "suite")
    suite = build_suite(root, config=config)
    by_domain: dict[str, list[Row]] = {}
    for domain in args.domains or suite.domains:
        rows = reference_rows(suite, domain)
        rows += method_rows(suite, domain, args.work, set(args.methods) if args.methods else None)
        by_domain[domain] = rows
    out = args.out or RESULTS / ("accuracy-small.md" if args.small else "accuracy.md")
    command = "python benchmarks/bench_accuracy.py" + (" --small" if args.small else "")
    measured = f"Measured by `{command}` in {time.perf_counter() - started:.0f} s on {header}."
    lines = ["# Accuracy of every method on the demo suite", "", measured, "", EXPLANATION, ""]
    for domain, rows in by_domain.items():
        lines += table(domain, suite, rows)
    RESULTS.mkdir(exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text("\n".join(lines) + "\n")
    os.replace(tmp, out)
    png = out.with_name(out.stem.replace("accuracy", "accuracy_vs_size") + ".png")
    plot(png, by_domain)
    print("\n".join(lines))
    print(f"wrote {out} and {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
