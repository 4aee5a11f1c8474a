"""Option 4 training speed: steps per second of the jitted embedding-training step (KL objective).

For the "small" and "seed" preset sizes (the seed: d_model 768, 12 layers x 12 heads, d_head 64),
on count tables and derived weights of the same corpus (default: the built-in stdlib docstrings),
in one process on the same host-built batches:

* ``jit`` — ours: :func:`jaxattn.options.training.make_train_step`, compiled once (the trace count is
  checked and reported); ``compile_s`` = first call - warm median, reported separately;
* ``eager`` — the peer: the very same step function run op by op under ``jax.disable_jit()``
  (after one warm-up call that fills the per-primitive cache); ``--quick`` runs it for the
  small preset only, since its warm-up at the seed size alone takes minutes on 2 cores;
* ``host batch`` — building one batch's expected attention from the count tables with numpy
  (the training loop overlaps it with the device step).

The FLOP column is analytic: 3x the forward matmul FLOPs (forward + input-gradient backward;
the frozen weights get no gradient, which XLA drops). ``% matmul`` compares the achieved rate
with a plain float32 matmul on the same device.

Run: ``python benchmarks/bench_train.py [--quick] [--device cpu|gpu|tpu] [--out DIR]``; prints a
table and writes ``DIR/train.json`` (``train_quick.json`` with ``--quick``; default DIR ``benchmarks/results``).
"""

from __future__ import annotations

import argparse
import os
from typing import Any

import jax
from common import add_common_args, device_matmul_flops, fmt_s, print_table, setup, time_call, write_json

from jaxattn import pipeline
from jaxattn.derive import derive_params
from jaxattn.model import ModelConfig
from jaxattn.options.trained import forward_flops_per_token
from jaxattn.options.training import (
    TrainConfig,
    layout_pairs,
    make_batch,
    make_optimizer,
    make_train_step,
    sample_training_tokens,
    step_fn,
)


def step_flops(c: ModelConfig, batch_size: int, seq_len: int) -> float:
    """Analytic matmul FLOPs of one training step: 3 x the forward pass (forward + input-gradient backward)."""
    return 3.0 * batch_size * seq_len * forward_flops_per_token(c, seq_len)


def bench_preset(
    name: str,
    corpus: Any,
    eval_corpus: Any,
    tables: Any,
    *,
    batch_size: int,
    seq_len: int,
    repeats: int,
    eager: bool,
) -> tuple[list[dict[str, Any]], Any]:
    run = pipeline.RunConfig(preset=name, seq_len=seq_len, num_seqs=2)
    prep = pipeline.prepare(corpus, eval_corpus, run, tables=tables, progress=False)
    params = derive_params(prep.tables, prep.config, key=prep.key("derive"))
    cfg = TrainConfig(steps=repeats + 2, batch_size=batch_size, seq_len=seq_len)
    pairs, _ = layout_pairs(prep.config)
    tokens = sample_training_tokens(prep.corpus.tokens, prep.corpus.doc_ids, cfg, jax.random.PRNGKey(0))
    host = time_call(lambda: make_batch(tokens[0], prep.tables, pairs, "kl"), repeats=repeats, first=False)
    batches = [make_batch(t, prep.tables, pairs, "kl") for t in tokens]
    c = prep.config
    shape = {
        "preset": name,
        "V": c.vocab_size,
        "D": c.d_model,
        "K": c.d_head,
        "LxH": f"{c.num_layers}x{c.num_heads}",
        "BxT": f"{batch_size}x{seq_len}",
    }
    flops = step_flops(c, batch_size, seq_len)

    # Ours: the jitted step, with donated params/opt_state threaded through the calls.
    optimizer = make_optimizer(cfg, params)
    step = make_train_step(c, cfg, optimizer)
    state = {"p": jax.tree.map(jax.numpy.copy, params), "s": None, "i": 0}
    state["s"] = optimizer.init(state["p"])

    def jit_call() -> Any:
        state["p"], state["s"], loss = step(state["p"], state["s"], batches[state["i"] % len(batches)])
        state["i"] += 1
        return loss

    t_jit = time_call(jit_call, repeats=repeats, warmup=0)
    rows = [dict(shape, impl="jit (ours)", timing=t_jit, traces=step.traces)]

    if eager:
        fn = step_fn(c, cfg, optimizer, None)
        s0 = optimizer.init(params)

        def eager_call() -> Any:
            with jax.disable_jit():
                return fn(params, s0, batches[1])[2]

        t_eager = time_call(eager_call, repeats=max(1, min(repeats, 3)), warmup=0)
        rows.append(dict(shape, impl="eager (op by op)", timing=t_eager, traces=None))
    rows.append(dict(shape, impl="host batch (numpy)", timing=host, traces=None))
    for r in rows:
        t = r["timing"]
        r["median_s"] = t.median_s
        r["steps_per_sec"] = 1.0 / t.median_s if t.median_s > 0 else None
        r["tokens_per_sec"] = batch_size * seq_len / t.median_s if t.median_s > 0 else None
        r["time_vs_jit"] = t.median_s / t_jit.median_s if t_jit.median_s > 0 else None
        r["step_flops"] = flops if "host" not in r["impl"] else None
        r["gflops_per_sec"] = flops / t.median_s / 1e9 if "host" not in r["impl"] and t.median_s > 0 else None
    return rows, prep.tables


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(ap)
    ap.add_argument("--corpus", default=None, help="count corpus (default: the built-in stdlib docstrings)")
    ap.add_argument("--presets", default="small,seed", help="comma-separated presets (default small,seed)")
    ap.add_argument("--batch-size", type=int, default=None, help="sequences per step (default 8; --quick 4)")
    ap.add_argument("--seq-len", type=int, default=None, help="tokens per sequence (default 64; --quick 32)")
    ap.add_argument("--no-eager", action="store_true", help="skip the op-by-op peer")
    args = ap.parse_args(argv)
    os.environ.setdefault("JAXATTN_NO_PROGRESS", "1")
    device = setup(args.device)
    bs = args.batch_size or (4 if args.quick else 8)
    T = args.seq_len or (32 if args.quick else 64)
    repeats = args.repeats or (3 if args.quick else 10)
    presets = [p.strip() for p in args.presets.split(",") if p.strip()]
    matmul = device_matmul_flops(size=1024 if args.quick else 2048)
    corpus, eval_corpus = pipeline.load_split(args.corpus, None, pipeline.RunConfig(), progress=False)
    rows: list[dict[str, Any]] = []
    tables = None
    for name in presets:
        print(f"[{name}] timing ...", flush=True)
        eager = not args.no_eager and (not args.quick or name == "small")
        r, tables = bench_preset(
            name, corpus, eval_corpus, tables, batch_size=bs, seq_len=T, repeats=repeats, eager=eager
        )
        rows += r
    table = [
        {
            **{k: r[k] for k in ("preset", "D", "LxH", "BxT", "impl")},
            "compile": fmt_s(r["timing"].compile_s) if r["impl"].startswith("jit") else "-",
            "median": fmt_s(r["median_s"]),
            "steps/s": f"{r['steps_per_sec']:.3g}",
            "tokens/s": f"{r['tokens_per_sec']:.0f}",
            "x jit time": f"{r['time_vs_jit']:.1f}",
            "GFLOP/s": f"{r['gflops_per_sec']:.1f}" if r["gflops_per_sec"] is not None else "-",
            "% matmul": f"{100 * r['gflops_per_sec'] * 1e9 / matmul:.0f}%" if r["gflops_per_sec"] else "-",
            "traces": r["traces"] if r["traces"] is not None else "-",
        }
        for r in rows
    ]
    print()
    print_table(
        table, list(table[0]), title=f"Option 4 train step (KL objective), {device.platform} ({device.device_kind})"
    )
    bad = [r for r in rows if r["impl"].startswith("jit") and r["traces"] != 1]
    if bad:
        print(f"WARNING: the jitted step traced {[r['traces'] for r in bad]} times (expected 1)")
    payload = {
        "args": {
            k: (str(v) if not isinstance(v, (int, float, bool, type(None))) else v) for k, v in vars(args).items()
        },
        "corpus": corpus.info(),
        "matmul_flops_per_sec": matmul,
        "traced_once": not bad,
        "rows": [
            {
                **{k: v for k, v in r.items() if k != "timing"},
                **r["timing"].to_dict(),
            }
            for r in rows
        ],
    }
    write_json("train_quick" if args.quick else "train", payload, args.out, device)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
