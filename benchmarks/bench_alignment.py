"""Alignment benchmark: metrics for 12 layers x 12 heads x B sequences x 256 tokens in one jitted, vmapped call.

The data is the real pipeline's: the seed preset derived from the Shakespeare counts (held-out
last play for the sequences), its frozen forward pass giving attn [B, L, H, T, T], and the
expected attention [P, B, T, T] from the count tables. B = 64 (full) or 16 (--quick).

Contenders for the same metrics (kl, cosine, argmax_match, argmax_match_tied, entropy, num_queries
per layer, head and sequence), same inputs, same process:

* ``alignment.layer_head_metrics`` — ours: one jitted call; a loop over the (n, s) tables, each
  computing its expected-side terms once, with an inner loop over the heads that use it running the
  kernel vmapped over B; causal row blocks, masked by position for a causal-prefix mask (float32).
* ``per-head loop, numpy`` — the plain per-layer, per-head Python loop: for each (l, h), the
  metrics of all B sequences with numpy (float64, vectorised over sequences and queries). The
  target (ours >= 50x) is against this loop.
* ``per-head loop, jitted alignment_metrics`` — a Python loop over (l, h) calling the library's
  jitted per-head function: shows how much is the single fused call itself.
* ``seed per-query loop`` — pure Python/numpy per query (as the seed's analysis did), on a
  subsample of queries, extrapolated (labelled).
* ``ablation: one flat vmap`` — not a peer: the same per-sequence kernel vmapped over all
  L*H*B (head, sequence) pairs in one call, without the shared expected-side terms, the loops over
  tables and heads or the causal row blocks (the layout of jaxattn 0.1). It shows what those are worth.

Also the forward pass that produces attn, with its FLOP floor: analytic matmul FLOPs / the
device's measured matmul rate.

Run: ``python benchmarks/bench_alignment.py [--quick] [--device cpu|gpu|tpu]``.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import numpy as np
from common import (
    SHAKESPEARE,
    add_common_args,
    device_matmul_flops,
    fmt_s,
    print_table,
    setup,
    time_call,
    write_json,
)

KL_EPS = 1e-10
TIE_RTOL = 1e-6
NAMES = ("kl", "cosine", "argmax_match", "argmax_match_tied", "entropy")


def numpy_head_metrics(e: np.ndarray, a: np.ndarray, m: np.ndarray) -> dict[str, np.ndarray]:
    """The metrics of one head for B sequences in float64 numpy: [B, T, S] -> dict of [B]."""
    e = np.where(m, e.astype(np.float64), 0.0)
    a = np.where(m, a.astype(np.float64), 0.0)
    es = e.sum(-1, keepdims=True)
    as_ = a.sum(-1, keepdims=True)
    valid = (es[..., 0] > 0) & m.any(-1)
    e = e / np.where(es > 0, es, 1.0)
    a = a / np.where(as_ > 0, as_, 1.0)
    kl = np.maximum(np.where(m, e * (np.log(e + KL_EPS) - np.log(a + KL_EPS)), 0.0).sum(-1), 0.0)
    den = np.linalg.norm(e, axis=-1) * np.linalg.norm(a, axis=-1)
    cos = np.clip((e * a).sum(-1) / np.where(den > 0, den, 1.0), 0.0, 1.0)
    e_arg = np.argmax(np.where(m, e, -1.0), -1)
    a_arg = np.argmax(np.where(m, a, -1.0), -1)
    match = (e_arg == a_arg).astype(np.float64)
    e_max = np.where(m, e, -1.0).max(-1)
    tied = (np.take_along_axis(e, a_arg[..., None], -1)[..., 0] >= e_max * (1 - TIE_RTOL)).astype(np.float64)
    nk = m.sum(-1)
    with np.errstate(divide="ignore", invalid="ignore"):
        ent = -np.where(m & (a > 0), a * np.log(np.where(a > 0, a, 1.0)), 0.0).sum(-1)
        ent = np.where(nk > 1, ent / np.log(np.maximum(nk, 2)), 1.0)
    nq = valid.sum(-1)
    out = {}
    for k, v in zip(NAMES, (kl, cos, match, tied, ent), strict=True):
        out[k] = np.where(valid, v, 0.0).sum(-1) / np.maximum(nq, 1)
    out["num_queries"] = nq
    return out


def numpy_loop(expected, mask, pair_index, attn, heads=None) -> dict[str, np.ndarray]:
    """The plain per-layer, per-head Python loop (numpy); ``heads`` limits it to some (l, h)."""
    B, L, H = attn.shape[:3]
    out = {k: np.zeros((L, H, B)) for k in (*NAMES, "num_queries")}
    for l, h in heads or [(l, h) for l in range(L) for h in range(H)]:
        p = pair_index[l, h]
        r = numpy_head_metrics(expected[p], attn[:, l, h], mask[p])
        for k, v in r.items():
            out[k][l, h] = v
    return out


def jitted_head_loop(expected, mask, pair_index, attn) -> dict[str, Any]:
    """A Python loop over (l, h) calling the library's jitted alignment_metrics per head."""
    from jaxattn.alignment import alignment_metrics

    L, H = pair_index.shape
    res = {}
    for l in range(L):
        for h in range(H):
            p = int(pair_index[l, h])
            res[(l, h)] = alignment_metrics(expected[p], attn[:, l, h], mask[p])
    return res


def seed_query_loop(expected, mask, pair_index, attn, queries) -> float:
    """The seed's per-query loop: one small numpy computation per (l, h, b, i); returns a checksum."""
    tot = 0.0
    for l, h, b, i in queries:
        p = pair_index[l, h]
        m = mask[p, b, i]
        if not m.any():
            continue
        e = expected[p, b, i][m].astype(np.float64)
        a = attn[b, l, h, i][m].astype(np.float64)
        if e.sum() <= 0:
            continue
        e, a = e / e.sum(), a / max(a.sum(), 1e-30)
        kl = float(np.sum(e * (np.log(e + KL_EPS) - np.log(a + KL_EPS))))
        cos = float(e @ a / max(np.linalg.norm(e) * np.linalg.norm(a), 1e-30))
        hit = float(np.argmax(e) == np.argmax(a))
        tied = float(e[np.argmax(a)] >= e.max() * (1 - TIE_RTOL))
        ent = float(-np.sum(a[a > 0] * np.log(a[a > 0])) / np.log(len(a))) if len(a) > 1 else 1.0
        tot += kl + cos + hit + tied + ent
    return tot


def _flat(expected: Any, mask: Any, pair_index: Any, attn: Any) -> dict[str, Any]:
    import jax.numpy as jnp

    from jaxattn.alignment import alignment_metrics

    # [L, H, B, T, T] copies of the expected side and of attn: the layout of jaxattn 0.1.
    return alignment_metrics.__wrapped__(expected[pair_index], jnp.moveaxis(attn, 0, 2), mask[pair_index])


def flat_vmap_metrics(*args: Any) -> dict[str, Any]:
    """Ablation: the same kernel vmapped over all L*H*B (head, sequence) pairs in one call."""
    import jax

    global _FLAT
    if _FLAT is None:
        _FLAT = jax.jit(_flat)
    return _FLAT(*args)


_FLAT: Any = None


def main(argv: list[str] | None = None) -> int:
    ap = add_common_args(argparse.ArgumentParser(description=__doc__.split("\n")[0]))
    ap.add_argument("--num-seqs", type=int, default=None, help="B (default 64, 16 with --quick)")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--loop-heads", type=int, default=None, help="heads timed in the numpy loop (extrapolated)")
    ap.add_argument("--seed-queries", type=int, default=2000, help="queries timed in the seed loop (extrapolated)")
    args = ap.parse_args(argv)
    dev = setup(args.device)

    import jax
    import jax.numpy as jnp

    from jaxattn.alignment import layer_head_metrics
    from jaxattn.derive import derive_params
    from jaxattn.model import forward_batch
    from jaxattn.options import forward_flops_per_token
    from jaxattn.pipeline import RunConfig, load_split, prepare

    B = args.num_seqs or (16 if args.quick else 64)
    T = args.seq_len
    repeats = args.repeats or (2 if args.quick else 3)
    t0 = time.perf_counter()
    run = RunConfig(preset="seed", seq_len=T, num_seqs=B, batch_size=16)
    path = str(SHAKESPEARE) if SHAKESPEARE.is_dir() else None
    corpus, eval_corpus = load_split(path, None, run, progress=False)
    prep = prepare(corpus, eval_corpus, run, progress=False)
    params = derive_params(prep.tables, prep.config, key=prep.key("derive"))
    cfg = prep.config
    L, H = cfg.num_layers, cfg.num_heads
    print(
        f"data: seed preset ({L}x{H}, d_model {cfg.d_model}), counts on {corpus.num_tokens:.3g} tokens, "
        f"B={B} x T={T} held-out sequences; setup {time.perf_counter() - t0:.1f}s"
    )

    # Forward pass, chunks of 16 sequences: time one chunk, then produce all of attn.
    fb = min(16, B)
    tok_chunk = jnp.asarray(prep.tokens[:fb])
    t_fwd = time_call(lambda: forward_batch(params, tok_chunk, cfg).attn, repeats=1 if args.quick else repeats)
    at_d = jnp.concatenate(
        [forward_batch(params, jnp.asarray(prep.tokens[i : i + fb]), cfg).attn for i in range(0, B, fb)]
    )
    attn = np.asarray(at_d)  # a view on CPU: one copy of the 2.4 GB (B=64) array, not two
    flops = fb * T * forward_flops_per_token(cfg, T)
    peak = device_matmul_flops()
    print(f"attn {attn.shape} float32 = {attn.nbytes / 2**30:.2f} GiB")

    expected, mask, pair_index = prep.expected, prep.mask, prep.pair_index
    ex_d, mk_d, pi_d = (jax.device_put(x) for x in (expected, mask, pair_index))

    t_ours = time_call(lambda: layer_head_metrics(ex_d, mk_d, pi_d, at_d), repeats=repeats)
    ours = {k: np.asarray(v) for k, v in layer_head_metrics(ex_d, mk_d, pi_d, at_d).items()}

    # numpy per-head loop: all heads with --quick, else a subset, extrapolated.
    all_heads = [(l, h) for l in range(L) for h in range(H)]
    n_loop = args.loop_heads or (len(all_heads) if args.quick else 24)
    heads = all_heads[:n_loop]
    t_np = time_call(lambda: numpy_loop(expected, mask, pair_index, attn, heads), repeats=1, first=False)
    np_ref = numpy_loop(expected, mask, pair_index, attn, heads)
    np_s = t_np.median_s * len(all_heads) / len(heads)
    sel = tuple(np.array(heads).T)
    maxdiff = {k: float(np.abs(ours[k][sel] - np_ref[k][sel]).max()) for k in ("kl", "cosine", "entropy")}
    nq_equal = bool(np.array_equal(ours["num_queries"][sel], np_ref["num_queries"][sel]))
    am_diff = {k: float(np.abs(ours[k][sel] - np_ref[k][sel]).max()) for k in ("argmax_match", "argmax_match_tied")}

    t_jloop = time_call(lambda: jitted_head_loop(ex_d, mk_d, pi_d, at_d), repeats=repeats)
    t_flat = time_call(lambda: flat_vmap_metrics(ex_d, mk_d, pi_d, at_d), repeats=repeats)
    flat = {k: np.asarray(v) for k, v in flat_vmap_metrics(ex_d, mk_d, pi_d, at_d).items()}
    flat_diff = max(float(np.abs(flat[k].astype(np.float64) - ours[k]).max()) for k in ours)

    rng = np.random.default_rng(0)
    nq = args.seed_queries
    queries = list(
        zip(
            rng.integers(0, L, nq).tolist(),
            rng.integers(0, H, nq).tolist(),
            rng.integers(0, B, nq).tolist(),
            rng.integers(0, T, nq).tolist(),
            strict=True,
        )
    )
    t1 = time.perf_counter()
    seed_query_loop(expected, mask, pair_index, attn, queries)
    seed_sub = time.perf_counter() - t1
    seed_s = seed_sub * (L * H * B * T) / nq

    o = t_ours.median_s
    extrap = ", EXTRAPOLATED)" if len(heads) < len(all_heads) else ")"

    def row(name: str, sec: float, note: str, compile_s: float | None = None) -> dict[str, str]:
        ratio_txt = f"{sec / o:.1f}x" if sec / o < 100 else f"{sec / o:.0f}x"
        return {"contender": name, "time": fmt_s(sec), "x slower than ours": ratio_txt,
                "compile": fmt_s(compile_s) if compile_s is not None else "", "note": note}  # fmt: skip

    rows = [
        row("layer_head_metrics, one jitted call (ours)", o, f"float32, {dev.platform}", t_ours.compile_s),
        row(
            f"per-head loop, numpy float64 ({len(heads)} of {len(all_heads)} heads{extrap}",
            np_s,
            "the plain per-layer, per-head loop (target: ours >= 50x)",
        ),
        row(
            "per-head loop, jitted alignment_metrics",
            t_jloop.median_s,
            "144 calls of the library's jitted per-head function",
            t_jloop.compile_s,
        ),
        row(f"seed per-query loop (EXTRAPOLATED from {nq} queries)", seed_s, "pure Python/numpy per query"),
        row(
            "ablation: one flat vmap over L*H*B (the 0.1 layout)",
            t_flat.median_s,
            f"same kernel, [L,H,B,T,T] temporaries; max |diff| vs ours {flat_diff:.1e}",
            t_flat.compile_s,
        ),
    ]
    title = f"Alignment metrics, L={L} x H={H} x B={B} x T={T} ({dev.platform}, {dev.device_kind}), median of {repeats}"
    table = print_table(rows, ["contender", "time", "x slower than ours", "compile", "note"], title)
    print(
        f"agreement with the float64 loop: max |diff| {maxdiff}; argmax rates max |diff| {am_diff} "
        f"(float32 vs float64 ties); num_queries equal: {nq_equal}"
    )
    frac = flops / peak / t_fwd.median_s
    # The compile estimate is first call - median: below the calls' spread it says nothing.
    spread = max(t_fwd.times_s) - min(t_fwd.times_s)
    fwd_compile = (
        f"compile {fmt_s(t_fwd.compile_s)}" if t_fwd.compile_s > spread else "compile within the calls' spread"
    )
    print(
        f"forward pass ({fb} x {T} tokens, seed preset): {fmt_s(t_fwd.median_s)} ({fwd_compile}); "
        f"{flops / 1e9:.0f} GFLOP; FLOP floor at the measured matmul rate {peak / 1e9:.0f} GFLOP/s = "
        f"{fmt_s(flops / peak)}; achieved {100 * frac:.0f}% of it"
    )
    ratio = np_s / o
    if B == 64 and T == 256:
        print(f"target: ours >= 50x the per-head numpy loop: {ratio:.1f}x ({'met' if ratio >= 50 else 'MISSED'})")
    else:  # the issue states the target at 12 x 12 x 64 x 256
        print(
            f"ours is {ratio:.1f}x the per-head numpy loop (the >= 50x target is stated at B=64, T=256: the full run)"
        )
    write_json(
        "alignment_quick" if args.quick else "alignment",
        {
            "shape": {"L": L, "H": H, "B": B, "T": T, "P": int(expected.shape[0])},
            "repeats": repeats,
            "timings": {
                "ours_layer_head_metrics": t_ours.to_dict(),
                "numpy_head_loop": {**t_np.to_dict(), "heads_timed": len(heads), "extrapolated_s": np_s},
                "jitted_head_loop": t_jloop.to_dict(),
                "ablation_flat_vmap": {**t_flat.to_dict(), "max_abs_diff_vs_ours": flat_diff},
                "seed_query_loop": {"queries_timed": nq, "seconds": seed_sub, "extrapolated_s": seed_s},
                "forward_chunk": {**t_fwd.to_dict(), "sequences": fb},
            },
            "ratios": {
                "numpy_loop_over_ours": ratio,
                "jitted_loop_over_ours": t_jloop.median_s / o,
                "seed_loop_over_ours": seed_s / o,
            },
            "agreement": {"max_abs_diff": maxdiff, "argmax_rate_diff": am_diff, "num_queries_equal": nq_equal},
            "forward_floor": {
                "flops": flops,
                "matmul_flops_per_s": peak,
                "floor_s": flops / peak,
                "fraction_of_floor": frac,
            },
            "table": table,
        },
        args.out,
        dev,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
