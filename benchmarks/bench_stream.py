"""Streaming-count benchmark: ``jaxattn count`` from a token file on disk against in-memory ``count_tables``.

Data (written under ``--data-dir``, default ``/tmp/jaxattn_bench_stream``, never into the repo,
and reused when already there):

* char level: the Shakespeare plays' char tokens (V = 84, uint8), tiled to N tokens, each copy's
  plays separate documents (``FILE.offsets.npy``);
* word level: :func:`bench_wordlevel.synthetic_words` (Zipf-Mandelbrot words mixed with Zipfian
  phrases, V = 32000, uint16), in blocks of 1e7 tokens with one seed each, documents of 2000 tokens.

Contenders, each in a fresh subprocess, one at a time, with its peak RSS (``VmHWM`` after a reset):

* ``jaxattn count`` (the CLI, in-process): the memory-mapped file counted chunk by chunk
  (``--chunk-tokens``, pages released behind the chunk), 8 tables (n <= 2, s <= 3), written with
  ``save_tables``; word level with ``--memory-budget`` of sparse runs before spilling;
* ``count_stream`` (``--modes api``): the library call on the file's chunks, nothing written;
* ``count_tables`` in memory: the tokens read into RAM in their file dtype (1 or 2 bytes), int32
  document ids, the same 8 tables. Run for N up to ``--in-memory-max`` (what fits).

Bytes per token is the peak RSS over N, beside infini-gram's published 7 bytes/token index
(Liu et al. 2024: a suffix array over 5T tokens), for scale.

Run: ``python benchmarks/bench_stream.py [--char 1e8,1e9,1e10] [--word 1e8,1e9] [--chunk-tokens K]``.
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
from common import ROOT, SHAKESPEARE, print_table, write_json

INFINIGRAM_BYTES_PER_TOKEN = 7.0
WORD_V = 32_000
WORD_BLOCK = 10_000_000

_WORKER = r"""
import json, sys, time
sys.path.insert(0, sys.argv[1])
mode, path, V, chunk, budget, out = sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5], sys.argv[6], sys.argv[7]
max_n, max_s = int(sys.argv[8]), int(sys.argv[9])
def hwm():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
with open("/proc/self/clear_refs", "w") as f:  # reset the high-water mark inherited across exec
    f.write("5")
import numpy as np
import jaxattn
from jaxattn import cli
base = hwm()
t0 = time.perf_counter()
if mode == "stream":
    args = ["count", "--corpus", path, "--out", out, "--no-progress", "--vocab-size", str(V), "--chunk-tokens", chunk]
    args += ["--max-n", str(max_n), "--max-s", str(max_s)]
    code = cli.main(args + (["--memory-budget", budget] if budget != "-" else []))
    assert code == 0
    nnz = sum(e["nnz"] for e in json.load(open(out + "/tables.json"))["tables"])
elif mode == "api":  # the library call alone: no tables written
    from jaxattn.corpus import open_token_file
    tf = open_token_file(path)
    mb = None if budget == "-" else int(float(budget))
    tables = jaxattn.count_stream(tf.chunks(int(chunk)), V, max_n, max_s, memory_budget=mb)
    nnz = sum(cm.nnz for cm in tables.values())
else:
    dt = np.uint8 if path.endswith(".u8") else np.uint16
    tok = np.fromfile(path, dtype=dt)
    starts = np.load(path + ".offsets.npy")
    docs = np.zeros(tok.size, np.int32)
    docs[starts[1:]] = 1
    np.cumsum(docs, out=docs)
    tables = jaxattn.count_tables(tok, V, max_n, max_s, doc_ids=docs)
    nnz = sum(cm.nnz for cm in tables.values())
sec = time.perf_counter() - t0
print("RESULT " + json.dumps({"seconds": sec, "peak_rss": hwm(), "base_rss": base, "nnz": int(nnz)}))
"""


def char_file(data_dir: Path, n: int) -> tuple[Path, int]:
    """The char-level token file of n tokens (written once): (path, V)."""
    from jaxattn.corpus import load_corpus

    corpus = load_corpus(str(SHAKESPEARE), tokenizer="char", progress=False)
    path = data_dir / f"char_{n:.0e}.u8".replace("+", "")
    if not (path.exists() and path.stat().st_size == n):
        tile = corpus.tokens.astype(np.uint8)
        starts, off = [], corpus.doc_offsets[:-1]
        with open(path, "wb") as f:
            for a in range(0, n, tile.size):
                f.write(tile[: min(tile.size, n - a)].tobytes())
                starts.append(a + off[off < n - a])
        np.save(str(path) + ".offsets.npy", np.concatenate(starts).astype(np.int64))
    return path, corpus.vocab_size


def word_file(data_dir: Path, n: int) -> tuple[Path, int]:
    """The word-level token file of n tokens (written once, 1e7 at a time): (path, V)."""
    from bench_wordlevel import DOC_LEN, synthetic_words

    path = data_dir / f"word_{n:.0e}.u16".replace("+", "")
    if not (path.exists() and path.stat().st_size == 2 * n):
        with open(path, "wb") as f:
            for i, a in enumerate(range(0, n, WORD_BLOCK)):
                need = min(WORD_BLOCK, n - a)
                tok, _ = synthetic_words(need + need // 10, seed=i)  # it may give a few fewer than asked
                assert tok.size >= need
                f.write(tok[:need].astype(np.uint16).tobytes())
        np.save(str(path) + ".offsets.npy", np.arange(0, n, DOC_LEN, dtype=np.int64))
    return path, WORD_V


def measure(mode: str, path: Path, V: int, chunk: int, budget: str, max_n: int = 2, max_s: int = 3) -> dict[str, Any]:
    """One contender in a fresh process: seconds, peak RSS, nnz."""
    with tempfile.TemporaryDirectory(dir=path.parent) as out:
        env = dict(os.environ, JAX_PLATFORMS=os.environ.get("JAX_PLATFORMS", "cpu"))
        argv = [sys.executable, "-c", _WORKER, str(ROOT), mode, str(path), str(V), str(chunk), budget, out]
        argv += [str(max_n), str(max_s)]
        proc = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=6 * 3600)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{mode} on {path} failed: {proc.stderr[-3000:]}")
    r = json.loads(lines[-1][7:])
    r["summary"] = [ln for ln in proc.stderr.splitlines() if ln.startswith("jaxattn count:")]
    return r


def row(level: str, n: int, mode: str, r: dict[str, Any]) -> dict[str, Any]:
    gib = r["peak_rss"] / 2**30
    return {
        "level": level,
        "N": f"{n:.0e}",
        "path": {"stream": "jaxattn count", "api": "count_stream", "memory": "count_tables (in memory)"}[mode],
        "seconds": f"{r['seconds']:.1f}",
        "Mtok/s": f"{n / r['seconds'] / 1e6:.1f}",
        "peak RSS GiB": f"{gib:.2f}",
        "bytes/token": f"{r['peak_rss'] / n:.3f}",
        "over base B/token": f"{(r['peak_rss'] - r['base_rss']) / n:.3f}",
        "infini-gram B/token": f"{INFINIGRAM_BYTES_PER_TOKEN:.0f}",
        "nnz": f"{r['nnz']:,}",
    }


def sizes(text: str) -> list[int]:
    return [int(float(x)) for x in text.split(",") if x.strip()]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--char", default="1e8", help="char-level sizes, comma-separated (e.g. 1e8,1e9,1e10; '' none)")
    p.add_argument("--word", default="1e8", help="word-level sizes (e.g. 1e8,1e9; '' none)")
    p.add_argument("--in-memory-max", type=float, default=1e9, help="run count_tables in memory up to this N")
    p.add_argument("--modes", default="stream,memory", help="stream (jaxattn count), api (count_stream), memory")
    p.add_argument("--chunk-tokens", type=int, default=1 << 23, help="jaxattn count --chunk-tokens")
    p.add_argument("--memory-budget", default="-", help="jaxattn count --memory-budget (word level; '-': default)")
    p.add_argument("--data-dir", type=Path, default=Path("/tmp/jaxattn_bench_stream"), help="token files go here")
    p.add_argument("--name", default="stream", help="results file benchmarks/results/NAME.json")
    p.add_argument("--max-n", type=int, default=2, help="largest n counted (default 2)")
    p.add_argument("--max-s", type=int, default=3, help="largest skip counted (default 3: 8 tables with --max-n 2)")
    args = p.parse_args(argv)
    args.data_dir.mkdir(parents=True, exist_ok=True)
    rows, raw = [], []
    cases = [("char", n, char_file) for n in sizes(args.char)] + [("word", n, word_file) for n in sizes(args.word)]
    for level, n, make in cases:
        t0 = time.perf_counter()
        path, V = make(args.data_dir, n)
        print(f"{level} {n:.0e}: data ready in {time.perf_counter() - t0:.0f} s ({path})", flush=True)
        modes = [m for m in args.modes.split(",") if m != "memory" or n <= args.in_memory_max]
        for mode in modes:
            budget = args.memory_budget if level == "word" else "-"
            r = measure(mode, path, V, args.chunk_tokens, budget, args.max_n, args.max_s)
            tables = {"max_n": args.max_n, "max_s": args.max_s, "tables": args.max_n * (args.max_s + 1)}
            raw.append({"level": level, "N": n, "mode": mode, "V": V, "chunk_tokens": args.chunk_tokens, **tables, **r})
            rows.append(row(level, n, mode, r))
            print(json.dumps(raw[-1]), flush=True)
    cols = [
        "level",
        "N",
        "path",
        "seconds",
        "Mtok/s",
        "peak RSS GiB",
        "bytes/token",
        "over base B/token",
        "infini-gram B/token",
        "nnz",
    ]
    ntab = args.max_n * (args.max_s + 1)
    title = f"Streaming counts: {ntab} tables (n <= {args.max_n}, s <= {args.max_s}), token files on disk"
    print_table(rows, cols, title=title)
    write_json(args.name, {"rows": rows, "raw": raw, "infinigram_bytes_per_token": INFINIGRAM_BYTES_PER_TOKEN})
    return 0


if __name__ == "__main__":
    sys.exit(main())
