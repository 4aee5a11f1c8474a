"""Multi-process counting: 2 processes against 1 on the same corpus, with JAX's multi-controller SPMD.

Data (stated in the output and the JSON): two token files written once to a temporary directory
and memory-mapped by every process,

* ``char``: the Shakespeare plays as character ids (V ~ 70), repeated to ``--char-tokens`` tokens,
  one document per play copy; all 8 tables (n <= 2, s <= 3), the dense psum path;
* ``word``: synthetic Zipfian word ids over V = 32000 in 2000-token documents, ``--word-tokens``
  tokens; n <= 2, s <= 1 (4 tables), the sorted all-gather + merge path.

Each run is one or more worker processes on localhost (``jax.distributed.initialize`` over gloo
with ``--coordinator 127.0.0.1:PORT``; one CPU device each unless ``--devices-per-process``). A
worker reads only its share of the documents (:func:`jaxattn.counts.distributed.process_share`),
streams it through :class:`jaxattn.counts.StreamCounter` in chunks of ``--chunk-tokens``, and the
processes reduce with :func:`jaxattn.counts.distributed.allreduce_keyed`. Times, per phase:
``init`` (``jax.distributed.initialize``), ``count`` (the local streaming count) and ``reduce``
(the exact cross-process reduction); the count + reduce pass runs ``1 + --repeats`` times:
``first`` (with jit compilation), then ``warm`` (the median pass), and the ratio is 1 process / 2 processes on the warm total. A checksum
of the reduced tables must be identical for 1 and 2 processes (it is checked).

On a machine with few cores the processes share them: the ratio then measures overhead more
than speed-up (the JSON records ``cpu_count``).

Run: ``python benchmarks/bench_distributed.py [--quick] [--char-tokens N] [--word-tokens N]``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from common import ROOT, SHAKESPEARE, fmt_s, print_table, write_json

WORD_V = 32_000
WORD_DOC = 2000


# --------------------------------------------------------------------------- #
# Corpora (written once by the parent)
# --------------------------------------------------------------------------- #


def write_char_corpus(folder: Path, num_tokens: int) -> dict[str, Any]:
    """Shakespeare's plays as char ids, tiled to ``num_tokens``; one document per play copy."""
    texts = [p.read_text(encoding="utf-8") for p in sorted(SHAKESPEARE.glob("*.txt"))]
    chars = sorted(set("".join(texts)))
    table = np.zeros(max(map(ord, chars)) + 1, np.uint8)
    table[[ord(c) for c in chars]] = np.arange(len(chars))
    plays = [table[np.frombuffer(t.encode("utf-32-le"), np.uint32)] for t in texts]
    parts, offsets, total, k = [], [0], 0, 0
    while total < num_tokens:
        p = plays[k % len(plays)][: num_tokens - total]
        parts.append(p)
        total += p.size
        offsets.append(total)
        k += 1
    np.save(folder / "char.npy", np.concatenate(parts))
    np.save(folder / "char.offsets.npy", np.array(offsets, np.int64))
    return {"vocab_size": len(chars), "max_n": 2, "max_s": 3, "num_tokens": total, "num_docs": k}


def write_word_corpus(folder: Path, num_tokens: int) -> dict[str, Any]:
    """Zipf-Mandelbrot word ids over V = 32000 (seed 0), in 2000-token documents."""
    rng = np.random.default_rng(0)
    p = 1.0 / (np.arange(1, WORD_V + 1) + 2.7) ** 1.07
    cdf = np.cumsum(p / p.sum())
    tok = np.minimum(np.searchsorted(cdf, rng.random(num_tokens)), WORD_V - 1).astype(np.uint16)
    np.save(folder / "word.npy", tok)
    offsets = np.append(np.arange(0, num_tokens, WORD_DOC), num_tokens).astype(np.int64)
    np.save(folder / "word.offsets.npy", offsets)
    return {"vocab_size": WORD_V, "max_n": 2, "max_s": 1, "num_tokens": num_tokens, "num_docs": len(offsets) - 1}


# --------------------------------------------------------------------------- #
# One worker process
# --------------------------------------------------------------------------- #


def _chunks(tok: np.ndarray, offsets: np.ndarray, start: int, stop: int, size: int) -> Any:
    """(tokens, doc ids) chunks of ``tok[start:stop]``, doc ids from the document offsets."""
    for a in range(start, stop, size):
        b = min(a + size, stop)
        pos = np.arange(a, b)
        yield np.asarray(tok[a:b]), (np.searchsorted(offsets, pos, side="right") - 1).astype(np.int32)


def _checksum(keyed: dict) -> str:
    h = hashlib.sha256()
    for p in sorted(keyed):
        k, v = keyed[p]
        h.update(repr(p).encode())
        h.update(np.ascontiguousarray(k, np.int64).tobytes())
        h.update(np.ascontiguousarray(v, np.int64).tobytes())
    return h.hexdigest()[:16]


def worker(args: argparse.Namespace) -> None:
    t0 = time.perf_counter()
    from jaxattn.counts import StreamCounter
    from jaxattn.counts.distributed import allreduce_keyed, init_distributed, process_share

    t_import = time.perf_counter() - t0
    t = time.perf_counter()
    pid, nproc = init_distributed(args.coordinator, args.num_processes, args.process_id)
    t_init = time.perf_counter() - t
    info = json.loads(Path(args.meta).read_text())
    tok = np.load(args.tokens, mmap_mode="r")
    offsets = np.load(args.tokens.replace(".npy", ".offsets.npy"))
    share = process_share(np.diff(offsets).tolist(), pid, nproc)
    start, stop = int(offsets[share.start]), int(offsets[share.stop])
    passes = []
    for _ in range(1 + args.repeats):
        t = time.perf_counter()
        counter = StreamCounter(info["vocab_size"], info["max_n"], info["max_s"])
        for c in _chunks(tok, offsets, start, stop, args.chunk_tokens):
            counter.add(*c)
        keyed = counter.keyed()
        t_count = time.perf_counter() - t
        t = time.perf_counter()
        keyed = allreduce_keyed(keyed, info["vocab_size"])
        t_reduce = time.perf_counter() - t
        passes.append({"count_s": t_count, "reduce_s": t_reduce})
    out = {
        "process": pid,
        "processes": nproc,
        "tokens_read": stop - start,
        "import_s": t_import,
        "init_s": t_init,
        "first": passes[0],
        "warm": sorted(passes[1:], key=lambda p: p["count_s"] + p["reduce_s"])[len(passes[1:]) // 2],  # median pass
        "checksum": _checksum(keyed),
        "nnz": int(sum(v.size for _, v in keyed.values())),
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }
    print("RESULT " + json.dumps(out), flush=True)


# --------------------------------------------------------------------------- #
# The parent: launches 1 and 2 processes per case
# --------------------------------------------------------------------------- #


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_processes(nproc: int, tokens: Path, meta: Path, args: argparse.Namespace) -> list[dict[str, Any]]:
    """Launches ``nproc`` workers on localhost; returns their RESULT dicts (exits on failure)."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", JAXATTN_NO_PROGRESS="1")
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={args.devices_per_process}"
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    base = [sys.executable, __file__, "--worker", "--tokens", str(tokens), "--meta", str(meta)]
    base += ["--chunk-tokens", str(args.chunk_tokens), "--repeats", str(args.repeats)]
    if nproc > 1:
        base += ["--coordinator", f"127.0.0.1:{_free_port()}", "--num-processes", str(nproc)]
    procs = [
        subprocess.Popen(
            base + (["--process-id", str(i)] if nproc > 1 else []),
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(nproc)
    ]
    outs = [p.communicate(timeout=args.timeout)[0] for p in procs]
    results = []
    for p, o in zip(procs, outs, strict=True):
        line = [x for x in o.splitlines() if x.startswith("RESULT ")]
        if p.returncode != 0 or not line:
            sys.exit(f"error: a worker failed (rc={p.returncode}):\n" + "\n".join(o.splitlines()[-20:]))
        results.append(json.loads(line[-1][len("RESULT ") :]))
    return results


def summarise(case: str, info: dict[str, Any], runs: dict[int, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    rows = []
    base = None
    for nproc, res in runs.items():
        slowest = {k: max(r[k] for r in res) for k in ("import_s", "init_s")} | {
            f"{ph}_{k}": max(r[ph][k] for r in res) for ph in ("first", "warm") for k in ("count_s", "reduce_s")
        }
        total = slowest["warm_count_s"] + slowest["warm_reduce_s"]
        base = total if base is None else base
        rows.append(
            {
                "case": case,
                "processes": nproc,
                "tokens": info["num_tokens"],
                "V": info["vocab_size"],
                "tables": info["max_n"] * (info["max_s"] + 1),
                **slowest,
                "warm_total_s": total,
                "ratio_vs_1": base / total,
                "mtokens_per_sec": info["num_tokens"] / total / 1e6,
                "peak_rss_mib_max": max(r["peak_rss_mib"] for r in res),
                "checksum": res[0]["checksum"],
                "nnz": res[0]["nnz"],
                "identical_across_processes": len({r["checksum"] for r in res}) == 1,
            }
        )
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--tokens", help=argparse.SUPPRESS)
    ap.add_argument("--meta", help=argparse.SUPPRESS)
    ap.add_argument("--coordinator", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--num-processes", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--process-id", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--quick", action="store_true", help="small sizes (2e6 char, 1e6 word tokens)")
    ap.add_argument("--char-tokens", type=float, default=2e7, help="char-level corpus size (default 2e7)")
    ap.add_argument("--word-tokens", type=float, default=5e6, help="word-level corpus size (default 5e6)")
    ap.add_argument("--chunk-tokens", type=int, default=1 << 22, help="tokens per streamed chunk")
    ap.add_argument("--processes", type=int, default=2, help="the multi-process run's process count (default 2)")
    ap.add_argument("--devices-per-process", type=int, default=1, help="CPU devices per process (default 1)")
    ap.add_argument("--repeats", type=int, default=3, help="warm passes after the first (median reported)")
    ap.add_argument("--timeout", type=float, default=1800, help="seconds per run")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results", help="folder for the JSON")
    args = ap.parse_args()
    if args.worker:
        worker(args)
        return
    if args.quick:
        args.char_tokens, args.word_tokens = 2e6, 1e6
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="jaxattn_bench_dist_") as tmp:
        folder = Path(tmp)
        for case, write, n in (
            ("char", write_char_corpus, args.char_tokens),
            ("word", write_word_corpus, args.word_tokens),
        ):
            info = write(folder, int(n))
            meta = folder / f"{case}.json"
            meta.write_text(json.dumps(info))
            runs = {p: run_processes(p, folder / f"{case}.npy", meta, args) for p in (1, args.processes)}
            case_rows = summarise(case, info, runs)
            if len({r["checksum"] for r in case_rows}) != 1 or not all(
                r["identical_across_processes"] for r in case_rows
            ):
                sys.exit(f"error: {case}: the tables differ between 1 and {args.processes} processes")
            rows += case_rows
    cols = ["case", "processes", "tokens", "V", "tables", "init_s", "first_count_s", "first_reduce_s"]
    cols += ["warm_count_s", "warm_reduce_s", "warm_total_s", "ratio_vs_1", "mtokens_per_sec", "peak_rss_mib_max"]
    shown = [
        {
            k: (
                fmt_s(v)
                if k.endswith("_s")
                else f"{v:.2f}"
                if k == "ratio_vs_1"
                else f"{v:.3g}"
                if isinstance(v, float)
                else v
            )
            for k, v in r.items()
        }
        for r in rows
    ]
    print_table(shown, cols, title=f"multi-process counting: {args.processes} processes against 1 (localhost, CPU)")
    print(
        "tables identical between 1 and",
        args.processes,
        "processes (checksums):",
        {r["case"]: r["checksum"] for r in rows},
    )
    payload = {
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k not in ("worker",)},
        "rows": rows,
        "note": "times are the slowest process's; ratio_vs_1 = 1-process warm total / this run's warm total",
    }
    write_json("distributed_quick" if args.quick else "distributed", payload, args.out)


if __name__ == "__main__":
    main()
