"""Word-level sparse path: V = 32k, n = 2 over 1e7 tokens, peak memory against the nnz storage, then the SVD.

Data (stated in the output and the JSON): a synthetic word stream with realistic statistics —
Zipf-Mandelbrot unigram frequencies over V = 32000 word ids, mixed with a lexicon of multi-word
phrases whose frequencies are Zipfian too, so that frequent n-grams repeat as in text and the
number of distinct trigrams grows sub-linearly with N; cut into 2000-token documents. Also,
for reference, the real Shakespeare word tokens (about 1e6, top-32k vocabulary).

Counting C^{2,0} needs keys up to V**3 = 3.3e13 (> int32): ``jaxattn.count_matrix`` uses the
in-place int64 sort path, so memory is O(N + nnz) and never O(V**n * V). The peak RSS of the
counting is measured in a fresh subprocess (psutil RSS before, ``ru_maxrss`` after) and reported
against the bytes of the resulting sparse table (contexts + COO rows/cols/values).

Then ``manifold_matrix(cm, sparse=True)`` and ``jaxattn.truncated_svd(M, 64)`` are timed (the
SVD's peers and accuracy are in ``bench_svd.py``).

Run: ``python benchmarks/bench_wordlevel.py [--quick] [--device cpu|gpu|tpu]``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from common import (
    ROOT,
    SHAKESPEARE,
    add_common_args,
    fmt_s,
    print_table,
    setup,
    time_call,
    time_interleaved,
    write_json,
)

V = 32_000
DOC_LEN = 2000


def synthetic_words(num_tokens: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Zipfian words and phrases: tokens int32 [N] in [0, 32000) and doc ids int32 [N]."""
    rng = np.random.default_rng(seed)
    ranks = np.arange(1, V + 1, dtype=np.float64)
    p_word = 1.0 / (ranks + 2.7) ** 1.07  # Zipf-Mandelbrot, as fitted to English word counts
    p_word /= p_word.sum()
    cdf_word = np.cumsum(p_word)
    num_phrases = 200_000
    lengths = rng.integers(2, 7, num_phrases)
    lex_off = np.concatenate([[0], np.cumsum(lengths)])
    lex = np.searchsorted(cdf_word, rng.random(lex_off[-1])).astype(np.int32)
    p_phrase = 1.0 / np.arange(1, num_phrases + 1) ** 1.0
    cdf_phrase = np.cumsum(p_phrase / p_phrase.sum())
    # Segments: half single words, half phrases; enough of them to cover num_tokens.
    num_seg = int(num_tokens / 2.5) + 1000
    is_phrase = rng.random(num_seg) < 0.5
    pid = np.searchsorted(cdf_phrase, rng.random(num_seg))
    seg_len = np.where(is_phrase, lengths[pid], 1)
    seg_off = np.concatenate([[0], np.cumsum(seg_len)])
    total = int(seg_off[-1])
    seg_of = np.repeat(np.arange(num_seg), seg_len)
    within = np.arange(total) - seg_off[seg_of]
    words = np.searchsorted(cdf_word, rng.random(num_seg)).astype(np.int32)
    tokens = np.where(is_phrase[seg_of], lex[lex_off[pid[seg_of]] + within], words[seg_of])
    tokens = np.minimum(tokens[:num_tokens], V - 1).astype(np.int32)
    docs = (np.arange(num_tokens) // DOC_LEN).astype(np.int32)
    return tokens, docs


def shakespeare_words() -> tuple[np.ndarray, np.ndarray, int] | None:
    if not SHAKESPEARE.is_dir():
        return None
    from jaxattn.corpus import load_corpus

    c = load_corpus(str(SHAKESPEARE), tokenizer="word", max_vocab=V, progress=False)
    return c.tokens.astype(np.int32), c.doc_ids.astype(np.int32), c.vocab_size


_RSS_CHILD = r"""
import json, resource, sys, time, tracemalloc
import numpy as np, psutil
sys.path.insert(0, sys.argv[1])
import jaxattn
tok = np.load(sys.argv[2]); docs = np.load(sys.argv[3]); vocab = int(sys.argv[4]); how = sys.argv[5]
def hwm():  # peak RSS (bytes) since the last reset
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
# ru_maxrss is inherited from the (large) parent across fork+exec: reset the high-water mark
# (Linux: write 5 to clear_refs) and read VmHWM instead.
try:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    reset = True
except OSError:
    reset = False
base = psutil.Process().memory_info().rss
peak_before = hwm()
tracemalloc.start()  # numpy reports its array allocations to tracemalloc: the live-array peak
t0 = time.perf_counter()
if how == "jaxattn":
    cm = jaxattn.count_matrix(tok, 2, 0, vocab, doc_ids=docs)
    nnz = cm.nnz
    store = cm.contexts.nbytes + cm.rows.nbytes + cm.cols.nbytes + cm.values.nbytes
else:  # the obvious numpy: int64 keys, a boolean document mask, np.unique
    k = (tok[:-2].astype(np.int64) * vocab + tok[1:-1]) * vocab + tok[2:]
    keys, counts = np.unique(k[docs[:-2] == docs[2:]], return_counts=True)
    nnz, store = keys.size, keys.nbytes + counts.nbytes
sec = time.perf_counter() - t0
arrays_peak = tracemalloc.get_traced_memory()[1]
peak = hwm()
print("RSS " + json.dumps({"baseline_rss": base, "peak_before": peak_before, "peak_rss": peak,
                             "nnz": int(nnz), "nnz_bytes": int(store), "seconds": sec,
                             "arrays_peak": arrays_peak, "hwm_reset": reset}))
"""


def peak_rss(tokens: np.ndarray, docs: np.ndarray, vocab: int, how: str) -> dict[str, Any]:
    """Counts in a fresh process and returns its peak RSS, baseline RSS and the table's bytes."""
    with tempfile.TemporaryDirectory() as d:
        tp, dp = Path(d) / "tok.npy", Path(d) / "doc.npy"
        np.save(tp, tokens)
        np.save(dp, docs)
        env = dict(os.environ, JAX_PLATFORMS=os.environ.get("JAX_PLATFORMS", "cpu"))
        proc = subprocess.run(
            [sys.executable, "-c", _RSS_CHILD, str(ROOT), str(tp), str(dp), str(vocab), how],
            capture_output=True,
            text=True,
            env=env,
            timeout=1200,
        )
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RSS ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"RSS subprocess failed: {proc.stderr[-2000:]}")
    r = json.loads(lines[-1][4:])
    r["increment"] = r["peak_rss"] - r["baseline_rss"]
    r["increment_over_nnz_bytes"] = r["increment"] / max(r["nnz_bytes"], 1)
    return r


def _mib(x: float) -> str:
    return f"{x / 2**20:.0f} MiB"


def main(argv: list[str] | None = None) -> int:
    ap = add_common_args(argparse.ArgumentParser(description=__doc__.split("\n")[0]))
    ap.add_argument("--tokens", type=float, default=1e7, help="synthetic corpus size (default 1e7, also with --quick)")
    ap.add_argument("--rank", type=int, default=64)
    ap.add_argument("--skip-svd", action="store_true")
    ap.add_argument(
        "--svd-tokens", type=float, default=None, help="prefix whose manifold is decomposed (default: 1e6 quick, all)"
    )
    args = ap.parse_args(argv)
    dev = setup(args.device)

    import jaxattn
    from jaxattn.counts import manifold_matrix

    N = int(args.tokens)
    repeats = args.repeats or (2 if args.quick else 3)
    t0 = time.perf_counter()
    tokens, docs = synthetic_words(N)
    gen_s = time.perf_counter() - t0
    data_note = (
        f"synthetic Zipf-Mandelbrot words (V={V}, exponent 1.07) mixed 50/50 with a 200k-phrase Zipfian "
        f"lexicon (2-6 words), {DOC_LEN}-token documents"
    )
    print(f"data: {N:.3g} tokens; {data_note}; generated in {gen_s:.1f}s")

    import jaxattn.counts as jc

    tok_v, seg_v = jc.validate_tokens(tokens, 2, 0, V, docs)

    def ours() -> Any:
        return jaxattn.count_matrix(tokens, 2, 0, V, doc_ids=docs)

    def ours_keys() -> Any:  # the same output as the peer: sorted unique keys and their counts
        return jc.count_keys(tok_v, seg_v, 2, 0, V)

    def peer() -> Any:
        k = (tokens[:-2].astype(np.int64) * V + tokens[1:-1]) * V + tokens[2:]
        return np.unique(k[docs[:-2] == docs[2:]], return_counts=True)

    tt = time_interleaved({"keys": ours_keys, "peer": peer, "matrix": ours}, repeats=repeats)
    t_keys, t_peer, t_ours = tt["keys"], tt["peer"], tt["matrix"]
    cm = ours()
    pk, pv = peer()
    ctx = cm.contexts.astype(np.int64)
    keys = ((ctx[:, 0] * V + ctx[:, 1])[cm.rows]) * V + cm.cols
    exact = bool(np.array_equal(keys, pk) and np.array_equal(cm.values, pv))
    print(f"table: R={cm.num_contexts} contexts, nnz={cm.nnz}, windows={cm.num_windows}; exact vs np.unique: {exact}")

    mem_ours = peak_rss(tokens, docs, V, "jaxattn")
    mem_peer = peak_rss(tokens, docs, V, "numpy")

    rows = [
        {
            "contender": "jaxattn count_keys (in-place int64 sort; keys + counts)",
            "time": fmt_s(t_keys.median_s),
            "peer/ours": "1.0x",
            "peak RSS increment": "",
            "x nnz storage": "",
        },
        {
            "contender": "jaxattn.count_matrix (+ validation, CountMatrix rows/cols/contexts)",
            "time": fmt_s(t_ours.median_s),
            "peer/ours": f"{t_ours.median_s / t_keys.median_s:.2f}x",
            "peak RSS increment": _mib(mem_ours["increment"]),
            "x nnz storage": f"{mem_ours['increment_over_nnz_bytes']:.1f}",
            "live-array peak": _mib(mem_ours["arrays_peak"]),
        },
        {
            "contender": "numpy keys + mask + np.unique (same output as count_keys)",
            "time": fmt_s(t_peer.median_s),
            "peer/ours": f"{t_peer.median_s / t_keys.median_s:.2f}x",
            "peak RSS increment": _mib(mem_peer["increment"]),
            "x nnz storage": f"{mem_peer['increment'] / max(mem_ours['nnz_bytes'], 1):.1f}",
            "live-array peak": _mib(mem_peer["arrays_peak"]),
        },
        {
            "contender": "dense C (V^2 x V int32), for scale",
            "time": "-",
            "peer/ours": "-",
            "peak RSS increment": f"{4 * V**3 / 2**40:.0f} TiB (never allocated)",
            "x nnz storage": f"{4 * V**3 / mem_ours['nnz_bytes']:.1e}",
        },
    ]
    title = f"Word-level counting C^(2,0), V={V}, N={N:.3g} tokens ({dev.platform}), median of {repeats}"
    table = print_table(
        rows, ["contender", "time", "peer/ours", "peak RSS increment", "x nnz storage", "live-array peak"], title
    )
    print(
        f"nnz storage (contexts + rows + cols + values): {_mib(mem_ours['nnz_bytes'])} for nnz={mem_ours['nnz']}; "
        f"the int64 key array alone is 8 bytes x {N:.3g} windows = {_mib(8 * N)} (the O(N) part)"
    )

    extra_rows = []
    shk = shakespeare_words()
    shk_info = None
    if shk is not None:
        st, sd, sv = shk
        t_shk = time_call(lambda: jaxattn.count_matrix(st, 2, 0, sv, doc_ids=sd), repeats=repeats)
        cms = jaxattn.count_matrix(st, 2, 0, sv, doc_ids=sd)
        shk_info = {
            "tokens": int(st.size),
            "vocab": sv,
            "nnz": cms.nnz,
            "contexts": cms.num_contexts,
            **t_shk.to_dict(),
        }
        extra_rows.append(
            {
                "data": f"Shakespeare words ({st.size:.3g} tokens, V={sv})",
                "count": fmt_s(t_shk.median_s),
                "R": cms.num_contexts,
                "nnz": cms.nnz,
            }
        )

    svd_info: dict[str, Any] = {}
    if not args.skip_svd:
        import jaxattn.svd as jsvd

        if "placeholder" in (jsvd.__doc__ or "").lower():
            svd_info = {"skipped": "jaxattn.svd is still the dense placeholder; it would densify R x V"}
            print(f"SVD skipped: {svd_info['skipped']}")
        else:
            t_man = time_call(lambda: manifold_matrix(cm, sparse=True), repeats=repeats)
            n_svd = int(args.svd_tokens or (1e6 if args.quick else N))
            cm_svd = cm if n_svd >= N else jaxattn.count_matrix(tokens[:n_svd], 2, 0, V, doc_ids=docs[:n_svd])
            M = manifold_matrix(cm_svd, sparse=True)
            t_svd = time_call(lambda: jaxattn.truncated_svd(M, args.rank), repeats=1 if not args.quick else 1)
            U, S, Vt = jaxattn.truncated_svd(M, args.rank)
            svd_info = {
                "manifold": t_man.to_dict(),
                "svd": t_svd.to_dict(),
                "shape": M.shape,
                "svd_tokens": n_svd,
                "nnz": int(M.values.size),
                "rank": args.rank,
                "top_singular_values": np.asarray(S)[:5].tolist(),
                "smallest_kept": float(np.asarray(S)[-1]),
            }
            extra_rows.append(
                {
                    "data": f"manifold_matrix(sparse=True) of the full table, {cm.shape[0]}x{cm.shape[1]}",
                    "count": fmt_s(t_man.median_s),
                    "R": cm.shape[0],
                    "nnz": cm.nnz,
                }
            )
            extra_rows.append(
                {
                    "data": f"jaxattn.truncated_svd rank {args.rank} of the manifold of the first {n_svd:.2g} tokens "
                    f"(first call incl. compile {fmt_s(t_svd.first_s)})",
                    "count": fmt_s(t_svd.median_s),
                    "R": M.shape[0],
                    "nnz": M.values.size,
                }
            )
    extra = print_table(extra_rows, ["data", "count", "R", "nnz"], "Also") if extra_rows else ""

    write_json(
        "wordlevel_quick" if args.quick else "wordlevel",
        {
            "num_tokens": N,
            "vocab_size": V,
            "data": data_note,
            "repeats": repeats,
            "table_shape": {"contexts": cm.num_contexts, "nnz": cm.nnz, "windows": cm.num_windows},
            "exact_vs_numpy_unique": exact,
            "timings": {
                "jaxattn_count_keys": t_keys.to_dict(),
                "jaxattn_count_matrix": t_ours.to_dict(),
                "numpy_unique": t_peer.to_dict(),
            },
            "memory": {"jaxattn": mem_ours, "numpy_unique": mem_peer},
            "shakespeare_words": shk_info,
            "svd": svd_info,
            "table": table + "\n\n" + extra,
        },
        args.out,
        dev,
    )
    return 0 if exact else 1


if __name__ == "__main__":
    raise SystemExit(main())
