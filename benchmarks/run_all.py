"""Runs every benchmark script, each in its own process, and summarises them.

    python benchmarks/run_all.py --quick              # 2 CPU cores, a few minutes
    python benchmarks/run_all.py                      # full sizes (1e8-token counting, B=64 alignment)
    python benchmarks/run_all.py --device gpu         # the same scripts on an accelerator

Scripts (those present are run, in this order): bench_count.py, bench_wordlevel.py,
bench_alignment.py, bench_svd.py, bench_train.py. Each receives ``--quick`` and ``--device`` (and
``--out`` when given), prints its own table and writes ``benchmarks/results/<name>.json``. This
script writes ``run_all[_quick].json`` with each script's exit status and wall time, and exits
non-zero if any script failed.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ORDER = ("bench_count.py", "bench_wordlevel.py", "bench_alignment.py", "bench_svd.py", "bench_train.py")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Run every jaxattn benchmark.")
    ap.add_argument("--quick", action="store_true", help="small sizes for 2 CPU cores (under ~5 minutes)")
    ap.add_argument("--device", choices=("cpu", "gpu", "tpu"), default=None, help="jax device for every script")
    ap.add_argument("--out", type=Path, default=None, help="results folder (default benchmarks/results)")
    ap.add_argument("--only", nargs="*", default=None, help="run only these scripts (e.g. bench_count)")
    ap.add_argument("--skip", nargs="*", default=(), help="skip these scripts")
    args = ap.parse_args(argv)

    names = [n for n in ORDER if (HERE / n).exists()]
    names += sorted(p.name for p in HERE.glob("bench_*.py") if p.name not in names)
    want = {Path(n).stem for n in args.only} if args.only is not None else None
    skip = {Path(n).stem for n in args.skip}
    names = [n for n in names if (want is None or Path(n).stem in want) and Path(n).stem not in skip]

    summary = []
    t_all = time.perf_counter()
    for name in names:
        cmd = [sys.executable, str(HERE / name)]
        if args.quick:
            cmd.append("--quick")
        if args.device:
            cmd += ["--device", args.device]
        if args.out:
            cmd += ["--out", str(args.out)]
        print(f"\n===== {' '.join(cmd[1:])} =====", flush=True)
        t0 = time.perf_counter()
        rc = subprocess.call(cmd, cwd=HERE.parent)
        dt = time.perf_counter() - t0
        summary.append({"script": name, "exit_status": rc, "seconds": round(dt, 1)})
        print(f"===== {name}: exit {rc}, {dt:.0f} s =====", flush=True)
    total = time.perf_counter() - t_all

    print("\nsummary")
    for s in summary:
        print(f"  {s['script']:22s} exit {s['exit_status']:3d}  {s['seconds']:7.1f} s")
    print(f"  total {total:.0f} s")
    out = args.out or HERE / "results"
    out.mkdir(parents=True, exist_ok=True)
    path = out / ("run_all_quick.json" if args.quick else "run_all.json")
    path.write_text(
        json.dumps({"quick": args.quick, "device": args.device, "scripts": summary, "total_s": total}, indent=2) + "\n"
    )
    print(f"wrote {path}")
    return 0 if all(s["exit_status"] == 0 for s in summary) else 1


if __name__ == "__main__":
    raise SystemExit(main())
