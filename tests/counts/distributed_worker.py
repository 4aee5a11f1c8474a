"""One process of the multi-process counting test (tests/counts/test_distributed.py launches P of them).

Usage: ``python tests/counts/distributed_worker.py --coordinator 127.0.0.1:PORT --num-processes P
--process-id I --out DIR --shakespeare DIR``. Each process reads only its own share of the
documents, counts it locally and reduces across processes; it writes ``DIR/proc{I}.npz`` (every
table, per case) and ``DIR/proc{I}.json`` (scalars), which the test compares with single-process
counting. Run with ``XLA_FLAGS=--xla_force_host_platform_device_count=2 JAX_PLATFORMS=cpu``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np

T0 = time.perf_counter()
ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

#: The synthetic word-level case: Zipfian ids over V = 30000, in documents of known lengths.
WORD_V = 30_000
WORD_DOCS = 24


def word_doc_sizes() -> list[int]:
    """Lengths of the synthetic word documents (known to every process, like file sizes)."""
    return [int(np.random.default_rng([7, d]).integers(500, 9000)) for d in range(WORD_DOCS)]


def word_doc(d: int) -> np.ndarray:
    """Token ids of synthetic word document ``d`` (generated alone, so a process makes only its own)."""
    size = word_doc_sizes()[d]
    return ((np.random.default_rng([8, d]).zipf(1.25, size) - 1) % WORD_V).astype(np.int32)


def char_files(shakespeare: Path, k: int) -> list[Path]:
    return sorted(shakespeare.glob("*.txt"))[:k]


def tiny_dense_corpus() -> tuple[np.ndarray, np.ndarray]:
    """A 5-symbol corpus of 1003 tokens in 9 documents (for the sharded dense path)."""
    rng = np.random.default_rng(3)
    return rng.integers(0, 5, 1003).astype(np.int32), np.sort(rng.integers(0, 9, 1003))


def _keyed_or_empty(tok: np.ndarray, docs: np.ndarray, vocab: int, max_n: int, max_s: int) -> dict:
    from jaxattn.counts.kernels import count_tables_keys
    from jaxattn.counts.keys import key_dtype

    if tok.size == 0:  # an empty share still joins every collective, with empty tables
        return {
            (n, s): (np.zeros(0, key_dtype(vocab, n)), np.zeros(0, np.int64))
            for n in range(1, max_n + 1)
            for s in range(max_s + 1)
        }
    return count_tables_keys(tok, vocab, max_n, max_s, docs)


def _save(arrays: dict, label: str, keyed: dict) -> None:
    for (n, s), (k, v) in keyed.items():
        arrays[f"{label}/{n},{s}/keys"] = np.asarray(k)
        arrays[f"{label}/{n},{s}/counts"] = np.asarray(v)


def char_case(args: argparse.Namespace, pid: int, nproc: int, arrays: dict, info: dict) -> None:
    from jaxattn.counts.distributed import (
        allreduce_counts,
        allreduce_int,
        allreduce_keyed,
        exclusive_prefix_sum,
        process_share,
    )

    files = char_files(Path(args.shakespeare), args.files)
    share = process_share([f.stat().st_size for f in files], pid, nproc)
    texts = [files[i].read_text(encoding="utf-8")[: args.chars] for i in share]  # only this share is read
    local: Counter[str] = Counter()
    for t in texts:
        local.update(t)
    global_counts = allreduce_counts(local)
    chars = sorted(global_counts)
    index = {c: i for i, c in enumerate(chars)}
    tok = np.array([index[c] for t in texts for c in t], np.int32)
    offset = exclusive_prefix_sum(len(texts))
    docs = np.repeat(np.arange(len(texts)) + offset, [len(t) for t in texts])
    keyed = _keyed_or_empty(tok, docs, len(chars), 2, 3)
    _save(arrays, "char", allreduce_keyed(keyed, len(chars)))
    info["char"] = {
        "share": [share.start, share.stop],
        "doc_offset": offset,
        "vocab": chars,
        "type_counts": global_counts,
        "tokens_sum": allreduce_int(tok.size, "sum"),
        "tokens_max": allreduce_int(tok.size, "max"),
        "tokens_min": allreduce_int(tok.size, "min"),
        "max_id": allreduce_int(int(tok.max()) if tok.size else -1, "max"),
    }


def word_case(pid: int, nproc: int, arrays: dict, info: dict) -> None:
    from jaxattn.counts.distributed import allreduce_keyed, exclusive_prefix_sum, process_share

    share = process_share(word_doc_sizes(), pid, nproc)
    parts = [word_doc(d) for d in share]
    tok = np.concatenate(parts) if parts else np.zeros(0, np.int32)
    offset = exclusive_prefix_sum(len(parts))
    docs = np.repeat(np.arange(len(parts)) + offset, [p.size for p in parts])
    _save(arrays, "word", allreduce_keyed(_keyed_or_empty(tok, docs, WORD_V, 2, 1), WORD_V))
    info["word"] = {"share": [share.start, share.stop], "doc_offset": offset}


def sharded_case(arrays: dict) -> None:
    """jaxattn.counts.sharded over a mesh spanning both processes (every process holds the whole corpus)."""
    from jaxattn.counts import make_mesh, sharded_count_keys, validate_tokens

    mesh = make_mesh()
    tok = np.concatenate([word_doc(d) for d in range(6)])
    docs = np.repeat(np.arange(6), [word_doc_sizes()[d] for d in range(6)])
    t, seg = validate_tokens(tok, 2, 1, WORD_V, docs)
    k, v = sharded_count_keys(t, seg, 2, 1, WORD_V, mesh)
    arrays["sharded_sorted/keys"], arrays["sharded_sorted/counts"] = k, v
    t, seg = validate_tokens(*tiny_dense_corpus()[:1], 2, 3, 5, tiny_dense_corpus()[1])
    k, v = sharded_count_keys(t, seg, 2, 3, 5, mesh)
    arrays["sharded_dense/keys"], arrays["sharded_dense/counts"] = k, v


def overflow_case(pid: int, arrays: dict, info: dict) -> None:
    """Counts and totals past int32: the dense psum splits into digits, int64 travels as int32 pairs."""
    from jaxattn.counts.distributed import allreduce_counts, allreduce_int, allreduce_keyed

    big = 2**31 - 5 + pid
    keyed = {
        (1, 0): (np.array([0, 3], np.int32), np.array([big, 7 + pid], np.int64)),  # dense: V**2 = 9 bins
        (2, 0): (np.array([1, 2**40 + pid], np.int64), np.array([2**33, 1], np.int64)),  # sorted: V = 2**20
    }
    out = allreduce_keyed({(1, 0): keyed[(1, 0)]}, 3)
    out.update(allreduce_keyed({(2, 0): keyed[(2, 0)]}, 2**20))
    _save(arrays, "overflow", out)
    info["overflow"] = {
        "sum": allreduce_int(2**40 + pid, "sum"),
        "min": allreduce_int(-(2**40) - pid, "min"),
        "words": allreduce_counts({"ünï": 2**35, f"p{pid}": 1, "\ud800": pid}),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--coordinator", required=True)
    ap.add_argument("--num-processes", type=int, required=True)
    ap.add_argument("--process-id", type=int, required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--shakespeare", required=True)
    ap.add_argument("--files", type=int, default=5)
    ap.add_argument("--chars", type=int, default=60_000, help="characters read from the start of each file")
    args = ap.parse_args()
    if os.environ.get("JAXATTN_TYPECHECK", "1") != "0":  # run-time annotation checks, as under pytest,
        import jaxtyping  # on the package under test only (the whole package's cost ~5 s per process)

        jaxtyping.install_import_hook(["jaxattn.counts"], "jaxattn.typing.typechecker")
    from jaxattn.counts.distributed import init_distributed

    pid, nproc = init_distributed(args.coordinator, args.num_processes, args.process_id, initialization_timeout=60)
    import jax

    arrays: dict = {}
    info: dict = {"process_index": pid, "process_count": nproc, "devices": len(jax.devices())}
    info["local_devices"] = len(jax.local_devices())
    timings = info["seconds"] = {"start": round(time.perf_counter() - T0, 2)}
    for name, case in (
        ("char", lambda: char_case(args, pid, nproc, arrays, info)),
        ("word", lambda: word_case(pid, nproc, arrays, info)),
        ("sharded", lambda: sharded_case(arrays)),
        ("overflow", lambda: overflow_case(pid, arrays, info)),
    ):
        t = time.perf_counter()
        case()
        timings[name] = round(time.perf_counter() - t, 2)
    out = Path(args.out)
    np.savez(out / f"proc{pid}.npz", **arrays)
    (out / f"proc{pid}.json").write_text(json.dumps(info))
    print(f"worker {pid}/{nproc} done: {json.dumps(timings)}", flush=True)


if __name__ == "__main__":
    main()
