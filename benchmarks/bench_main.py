"""End-to-end wall time of the main job, ``jaxattn analyze`` with no arguments, against an older commit.

The default job (seed preset, baseline, built-in corpus) runs as a user runs it: ``python -m
jaxattn.cli analyze --out DIR`` in a fresh subprocess, with stderr redirected. Two trees run
interleaved, ``--repeats`` times each, so both see the same machine load:

* ``old``: ``--baseline-rev`` (default: the commit before the issue-12 speed work), extracted with
  ``git archive`` into a temporary directory (the repository is not touched) and run from there;
* ``new cold``: the working tree with an empty persistent compilation cache (a first run on a
  machine, or ``JAXATTN_COMPILATION_CACHE=0``);
* ``new warm``: the working tree with the cache the cold run left (every later run).

Each run's wall time is measured around the subprocess (interpreter start and imports included);
its stage times come from the run's ``metrics.json`` (``timings_s``). Its CPU time is the
machine-wide busy time over the run (``/proc/stat``), so that it includes the figure workers
(:mod:`jaxattn.output.figure_pool`), which are not children the job waits for. Python writes its
bytecode cache as it does on a user's machine (``PYTHONDONTWRITEBYTECODE`` is removed), so the
bytecode of both trees is compiled once before the first measured run. The medians are printed as a
stage table with the ratios ``old / new``, and written to ``benchmarks/results/main.json``.

Usage::

    python benchmarks/bench_main.py [--repeats 3] [--baseline-rev REV] [--args "--preset small"]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from common import ROOT, print_table, write_json

#: ``git rev-parse HEAD`` when the issue-12 speed work started.
BASELINE_REV = "5636fde11b693b3d0ed28719f8e31d7e72ccb04e"


def extract(rev: str, dest: Path) -> Path:
    """``git archive REV`` unpacked into ``dest`` (no worktree, no change to the repository)."""
    dest.mkdir(parents=True, exist_ok=True)
    archive = subprocess.run(["git", "archive", rev], cwd=ROOT, check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    return dest


def job_env(tree: Path, cache: str) -> dict[str, str]:
    """The environment of a run from ``tree`` with the compilation cache ``cache`` ("0": none)."""
    # As on a user's machine, Python keeps its bytecode cache (some sandboxes set
    # PYTHONDONTWRITEBYTECODE, which makes every run compile every module of both trees again).
    skip = ("JAX_COMPILATION_CACHE", "JAXATTN_", "PYTHONDONTWRITEBYTECODE")
    env = {k: v for k, v in os.environ.items() if not k.startswith(skip)}
    env.update(PYTHONPATH=str(tree), JAXATTN_COMPILATION_CACHE=cache, JAXATTN_NO_PROGRESS="1")
    return env


def compile_bytecode(tree: Path) -> None:
    """Imports the CLI of ``tree`` once, unmeasured, so that both trees start with their bytecode cached."""
    subprocess.run([sys.executable, "-c", "import jaxattn.cli"], cwd=tree, env=job_env(tree, "0"), check=True)


def run_job(tree: Path, out: Path, extra: list[str], cache: str) -> dict[str, Any]:
    """One ``jaxattn analyze`` in a fresh interpreter from ``tree``; wall time and stage times."""
    env = job_env(tree, cache)
    cmd = [sys.executable, "-m", "jaxattn.cli", "analyze", *extra, "--out", str(out)]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    machine_before = machine_cpu_seconds()
    t0 = time.perf_counter()
    r = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    machine_after = machine_cpu_seconds()
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    # CPU seconds of the run (user + system): less sensitive than wall time to other load on the
    # machine. The figure workers are not children that the job waits for, so rusage misses them;
    # the machine-wide count (/proc/stat) includes them, and everything else the machine ran.
    if machine_before is not None and machine_after is not None:
        cpu = machine_after - machine_before
    else:
        cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    if r.returncode != 0:
        raise SystemExit(f"{tree}: exit {r.returncode}\n{r.stderr[-2000:]}")
    doc = json.loads((out / "metrics.json").read_text())
    return {"wall_s": wall, "cpu_s": cpu, "stages_s": doc.get("timings_s", {})}


def machine_cpu_seconds() -> float | None:
    """CPU seconds the whole machine has spent busy (user, nice, system, irq, softirq, steal), or None."""
    try:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()
    except OSError:
        return None
    ticks = sum(int(fields[i]) for i in (1, 2, 3, 6, 7, 8))
    return ticks / os.sysconf("SC_CLK_TCK")


def medians(runs: list[dict[str, Any]]) -> dict[str, float]:
    stages = sorted({k for r in runs for k in r["stages_s"]})
    out = {k: statistics.median(r["stages_s"].get(k, 0.0) for r in runs) for k in stages}
    out["stages total"] = statistics.median(sum(r["stages_s"].values()) for r in runs)
    out["wall (end to end)"] = statistics.median(r["wall_s"] for r in runs)
    out["cpu (all processes)"] = statistics.median(r.get("cpu_s", 0.0) for r in runs)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3, help="runs of each tree (default 3)")
    ap.add_argument("--baseline-rev", default=BASELINE_REV, help="the old commit (default: before issue 12)")
    ap.add_argument("--args", default="", help="extra analyze flags for both trees, e.g. '--preset small'")
    ap.add_argument("--name", default="main", help="results file name (default main)")
    a = ap.parse_args()
    extra = shlex.split(a.args)
    with tempfile.TemporaryDirectory(prefix="bench_main_") as tmp_s:
        tmp = Path(tmp_s)
        old_tree = extract(a.baseline_rev, tmp / "old")
        for tree in (old_tree, ROOT):
            compile_bytecode(tree)
        runs: dict[str, list[dict[str, Any]]] = {"old": [], "new cold": [], "new warm": []}
        for i in range(a.repeats):
            cold_cache = tmp / f"cache{i}"  # empty: this run compiles everything
            runs["old"].append(run_job(old_tree, tmp / f"o{i}", extra, "0"))
            runs["new cold"].append(run_job(ROOT, tmp / f"c{i}", extra, str(cold_cache)))
            runs["new warm"].append(run_job(ROOT, tmp / f"w{i}", extra, str(cold_cache)))
            print(f"repeat {i + 1}/{a.repeats}: " + ", ".join(f"{k} {v[-1]['wall_s']:.1f} s" for k, v in runs.items()))
    med = {k: medians(v) for k, v in runs.items()}
    rows = []
    for stage in med["old"].keys() | med["new cold"].keys():
        row: dict[str, Any] = {"stage": stage}
        for k in runs:
            row[k] = f"{med[k].get(stage, 0.0):.2f}"
        for k in ("new cold", "new warm"):
            new = med[k].get(stage, 0.0)
            row[f"old/{k}"] = f"{med['old'].get(stage, 0.0) / new:.1f}x" if new > 0 else "-"
        rows.append(row)
    order = ["load", "count", "expected", "derive", "forward", "metrics", "report"]
    rows.sort(
        key=lambda r: (
            r["stage"] in ("stages total", "wall (end to end)", "cpu (all processes)"),
            order.index(r["stage"]) if r["stage"] in order else 99,
            r["stage"],
        )
    )
    cols = ["stage", *runs, "old/new cold", "old/new warm"]
    print_table(rows, cols, title=f"jaxattn analyze {a.args}".strip() + f": median of {a.repeats} (seconds)")
    wall = {k: v["wall (end to end)"] for k, v in med.items()}
    payload = {
        "command": ["jaxattn", "analyze", *extra],
        "baseline_rev": a.baseline_rev,
        "head_rev": subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True
        ).stdout.strip(),
        "repeats": a.repeats,
        "median_s": med,
        "runs": runs,
        "ratio_cold": wall["old"] / wall["new cold"],
        "ratio_warm": wall["old"] / wall["new warm"],
        "cpu_ratio_cold": med["old"]["cpu (all processes)"] / med["new cold"]["cpu (all processes)"],
        "cpu_ratio_warm": med["old"]["cpu (all processes)"] / med["new warm"]["cpu (all processes)"],
    }
    print(f"end to end: old/new = {payload['ratio_cold']:.2f}x cold cache, {payload['ratio_warm']:.2f}x warm cache")
    print(
        f"CPU time: old/new = {payload['cpu_ratio_cold']:.2f}x cold cache, {payload['cpu_ratio_warm']:.2f}x warm cache"
    )
    write_json(a.name, payload)


if __name__ == "__main__":
    main()
