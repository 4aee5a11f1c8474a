"""Option 4 training speed: steps per second of the jitted embedding-training step.

For the "small" and "seed" preset sizes it times, in one process on the same batches:

* ``jit``: the step from :func:`jaxattn.train.make_train_step` (compiled once; compile time is the
  first call minus the steady-state median, reported separately; the trace count is checked);
* ``eager``: the same step function run op by op under ``jax.disable_jit()`` (the peer), after
  one warm-up call that fills the per-primitive cache;
* ``host batch``: building one batch's expected attention from the count tables on the host.

Run ``python benchmarks/bench_train.py [--quick] [--out DIR] [--device cpu|gpu|tpu]``; it prints a
table and writes ``DIR/train.json``.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from jaxattn import pipeline, report  # noqa: E402
from jaxattn.train import (  # noqa: E402
    TrainConfig,
    _step_fn,
    layout_pairs,
    make_batch,
    make_optimizer,
    make_train_step,
    sample_training_tokens,
)


def _block(x: Any) -> Any:
    return jax.block_until_ready(x)


def time_jit(prep: pipeline.Prepared, params: Any, cfg: TrainConfig, batches: list[Any], repeats: int) -> dict[str, Any]:
    """First call (trace + compile + run), then ``repeats`` timed steady-state steps."""
    optimizer = make_optimizer(cfg, params)
    step = make_train_step(prep.config, cfg, optimizer)
    p = jax.tree.map(jax.numpy.copy, params)
    state = optimizer.init(p)
    t0 = time.perf_counter()
    p, state, loss = step(p, state, batches[0])
    _block(loss)
    first = time.perf_counter() - t0
    times = []
    for r in range(repeats):
        t0 = time.perf_counter()
        p, state, loss = step(p, state, batches[(r + 1) % len(batches)])
        _block(loss)
        times.append(time.perf_counter() - t0)
    med = statistics.median(times)
    return {
        "impl": "jit",
        "first_call_s": first,
        "compile_s": max(first - med, 0.0),
        "median_s": med,
        "min_s": min(times),
        "repeats": repeats,
        "traces": step.traces,
        "final_loss": float(loss),
    }


def time_eager(prep: pipeline.Prepared, params: Any, cfg: TrainConfig, batches: list[Any], repeats: int) -> dict[str, Any]:
    """The same step, op by op (``jax.disable_jit``), after one warm-up call."""
    optimizer = make_optimizer(cfg, params)
    fn = _step_fn(prep.config, cfg, optimizer, None)
    state = optimizer.init(params)
    times = []
    with jax.disable_jit():
        t0 = time.perf_counter()
        _, _, loss = fn(params, state, batches[0])
        _block(loss)
        warm = time.perf_counter() - t0
        for r in range(repeats):
            t0 = time.perf_counter()
            _, _, loss = fn(params, state, batches[(r + 1) % len(batches)])
            _block(loss)
            times.append(time.perf_counter() - t0)
    med = statistics.median(times)
    return {"impl": "eager", "first_call_s": warm, "compile_s": None, "median_s": med, "min_s": min(times), "repeats": repeats}


def bench_preset(
    name: str,
    corpus: Any,
    eval_corpus: Any,
    tables: Any,
    *,
    batch_size: int,
    seq_len: int,
    repeats: int,
    eager_repeats: int,
) -> tuple[list[dict[str, Any]], Any]:
    run = pipeline.RunConfig(preset=name, seq_len=seq_len, num_seqs=2)
    prep = pipeline.prepare(corpus, eval_corpus, run, tables=tables, progress=False)
    params = pipeline.baseline_params(prep)
    cfg = TrainConfig(steps=repeats + 1, batch_size=batch_size, seq_len=seq_len)
    tokens = sample_training_tokens(prep, cfg, jax.random.PRNGKey(0))
    pairs, _ = layout_pairs(prep.config)
    host = []
    batches = []
    for t in tokens:
        t0 = time.perf_counter()
        batches.append(make_batch(prep, t, "kl", pairs))
        host.append(time.perf_counter() - t0)
    c = prep.config
    shape = {
        "preset": name,
        "vocab_size": c.vocab_size,
        "d_model": c.d_model,
        "d_head": c.d_head,
        "num_layers": c.num_layers,
        "num_heads": c.num_heads,
        "batch_size": batch_size,
        "seq_len": seq_len,
    }
    rows = [dict(shape, **time_jit(prep, params, cfg, batches, repeats))]
    if eager_repeats > 0:
        rows.append(dict(shape, **time_eager(prep, params, cfg, batches, eager_repeats)))
    rows.append(
        dict(shape, impl="host batch", first_call_s=host[0], compile_s=None, median_s=statistics.median(host), min_s=min(host), repeats=len(host))
    )
    jit_med = rows[0]["median_s"]
    for r in rows:
        r["steps_per_sec"] = 1.0 / r["median_s"] if r["median_s"] > 0 else None
        r["tokens_per_sec"] = batch_size * seq_len / r["median_s"] if r["median_s"] > 0 else None
        r["time_vs_jit"] = r["median_s"] / jit_med if jit_med > 0 else None
    return rows, tables or prep.tables


def format_rows(rows: list[dict[str, Any]]) -> str:
    head = (
        f"{'preset':>6} {'D':>4} {'LxH':>6} {'BxT':>6} {'impl':>10} {'compile s':>9} {'median s':>9} "
        f"{'steps/s':>8} {'tok/s':>8} {'x jit':>7} {'traces':>6}"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        comp = f"{r['compile_s']:9.2f}" if r.get("compile_s") is not None else f"{'-':>9}"
        lines.append(
            f"{r['preset']:>6} {r['d_model']:>4} {r['num_layers']:>2}x{r['num_heads']:<3} "
            f"{r['batch_size']:>2}x{r['seq_len']:<3} {r['impl']:>10} {comp} {r['median_s']:9.4f} "
            f"{r['steps_per_sec']:8.2f} {r['tokens_per_sec']:8.0f} {r['time_vs_jit']:7.1f} {r.get('traces', ''):>6}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer repeats, shorter sequences")
    ap.add_argument("--out", default="benchmarks/results", help="output directory (default benchmarks/results)")
    ap.add_argument("--device", default=None, help="jax platform to run on: cpu, gpu or tpu (default: jax's default)")
    ap.add_argument("--corpus", default=None, help="count corpus (default: the built-in stdlib docstrings)")
    ap.add_argument("--presets", default="small,seed", help="comma-separated presets (default small,seed)")
    ap.add_argument("--batch-size", type=int, default=None, help="sequences per step (default 8; quick 4)")
    ap.add_argument("--seq-len", type=int, default=None, help="tokens per sequence (default 64; quick 32)")
    ap.add_argument("--no-eager", action="store_true", help="skip the op-by-op peer")
    args = ap.parse_args(argv)
    os.environ.setdefault("JAXATTN_NO_PROGRESS", "1")
    out = report.ensure_out_dir(args.out)
    device = jax.devices(args.device)[0] if args.device else jax.devices()[0]
    bs = args.batch_size or (4 if args.quick else 8)
    T = args.seq_len or (32 if args.quick else 64)
    repeats = 3 if args.quick else 10
    eager_repeats = 0 if args.no_eager else (1 if args.quick else 3)
    rows: list[dict[str, Any]] = []
    with jax.default_device(device):
        corpus, eval_corpus = pipeline.load_split(args.corpus, None, pipeline.RunConfig(), progress=False)
        tables = None
        for name in [p.strip() for p in args.presets.split(",") if p.strip()]:
            print(f"[{name}] timing ...", file=sys.stderr, flush=True)
            r, tables = bench_preset(
                name, corpus, eval_corpus, tables, batch_size=bs, seq_len=T, repeats=repeats, eager_repeats=eager_repeats
            )
            rows += r
    print(format_rows(rows))
    bad = [r for r in rows if r["impl"] == "jit" and r["traces"] != 1]
    if bad:
        print(f"WARNING: the jitted step traced {[r['traces'] for r in bad]} times", file=sys.stderr)
    env = report.environment_info()
    doc = {
        "benchmark": "option4_train_step",
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor(),
            "cpu_count": os.cpu_count(),
            "jax": jax.__version__,
            "device_platform": device.platform,
            "device_kind": device.device_kind,
            "device_count": jax.device_count(),
        },
        "environment": env,
        "args": vars(args),
        "corpus": corpus.info(),
        "rows": rows,
        "traced_once": not bad,
    }
    report.write_json(out / "train.json", doc)
    print(f"wrote {out / 'train.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
