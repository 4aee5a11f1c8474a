"""Multi-process counting: 2 processes x 2 CPU devices on localhost equal single-process counting exactly.

The module fixture launches tests/counts/distributed_worker.py twice (``jax.distributed`` over
gloo, ``XLA_FLAGS=--xla_force_host_platform_device_count=2``); each process reads only its share
of the documents, counts it and reduces across processes, and every process writes the global
tables. The tests compare them with ``count_tables`` over the whole corpus in this process, with
exact equality, and check the helpers (:func:`process_share`, the single-process identity, the
flag errors) in process.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import jaxattn
from jaxattn.counts.distributed import (
    allreduce_counts,
    allreduce_int,
    allreduce_keyed,
    allreduce_sorted,
    exclusive_prefix_sum,
    init_distributed,
    process_share,
)
from jaxattn.errors import JaxattnError
from tests.counts import distributed_worker as worker

ROOT = Path(__file__).resolve().parents[2]
NPROC = 2
TIMEOUT_S = 150


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def launch(args_for: list[list[str]], tmp: Path, timeout: float = TIMEOUT_S) -> list[subprocess.CompletedProcess]:
    """Runs one command per process (same env: CPU, 2 devices each); fails with every process's output tail."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=2")
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    logs = [open(tmp / f"log{i}.txt", "w+") for i in range(len(args_for))]  # noqa: SIM115
    procs = [
        subprocess.Popen(a, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT)
        for a, f in zip(args_for, logs, strict=True)
    ]
    timed_out = False
    try:
        for p in procs:
            p.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        timed_out = True
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    outs = []
    for f in logs:
        f.seek(0)
        outs.append(f.read())
        f.close()
    if timed_out or any(p.returncode != 0 for p in procs):
        tails = "\n".join(
            f"--- process {i} (rc={p.returncode}) ---\n" + "\n".join(o.splitlines()[-25:])
            for i, (p, o) in enumerate(zip(procs, outs, strict=True))
        )
        what = f"timed out after {timeout} s" if timed_out else "failed"
        pytest.fail(f"multi-process run {what}:\n{tails}")
    return [subprocess.CompletedProcess(a, p.returncode, o) for a, p, o in zip(args_for, procs, outs, strict=True)]


@pytest.fixture(scope="module")
def worker_results(tmp_path_factory, shakespeare_dir):
    tmp = tmp_path_factory.mktemp("dist")
    addr = f"127.0.0.1:{free_port()}"
    base = [sys.executable, str(ROOT / "tests" / "counts" / "distributed_worker.py"), "--coordinator", addr]
    rest = ["--num-processes", str(NPROC), "--out", str(tmp), "--shakespeare", str(shakespeare_dir)]
    launch([[*base, *rest, "--process-id", str(i)] for i in range(NPROC)], tmp)
    out = []
    for i in range(NPROC):
        with np.load(tmp / f"proc{i}.npz") as z:
            arrays = {k: z[k] for k in z.files}
        out.append((arrays, json.loads((tmp / f"proc{i}.json").read_text())))
    return out


def table_keys(cm: jaxattn.CountMatrix) -> np.ndarray:
    """Packed ``context * V + target`` keys of a table's non-zeros."""
    return cm.context_keys().astype(np.int64)[cm.rows] * cm.vocab_size + cm.cols


def assert_tables_equal(arrays: dict, label: str, ref: dict) -> None:
    assert {f"{label}/{n},{s}/keys" for n, s in ref} == {k for k in arrays if k.startswith(label) and "keys" in k}
    for (n, s), cm in ref.items():
        keys, counts = arrays[f"{label}/{n},{s}/keys"], arrays[f"{label}/{n},{s}/counts"]
        assert keys.dtype == cm.context_keys().dtype, (n, s, keys.dtype)
        assert np.array_equal(keys, table_keys(cm)), f"{label} keys differ for n={n} s={s}"
        assert counts.dtype == cm.values.dtype and np.array_equal(counts, cm.values), f"{label} counts, n={n} s={s}"


def test_processes_and_devices(worker_results):
    for i, (_, info) in enumerate(worker_results):
        assert (info["process_index"], info["process_count"]) == (i, NPROC)
        assert (info["devices"], info["local_devices"]) == (4, 2)


def test_char_dense_equals_single_process(worker_results, shakespeare_dir):
    files = worker.char_files(shakespeare_dir, 5)
    texts = [f.read_text(encoding="utf-8")[:60_000] for f in files]
    chars = sorted(set("".join(texts)))
    index = {c: i for i, c in enumerate(chars)}
    tok = np.array([index[c] for t in texts for c in t], np.int32)
    docs = np.repeat(np.arange(len(texts)), [len(t) for t in texts])
    ref = jaxattn.count_tables(tok, len(chars), 2, 3, doc_ids=docs)
    shares = [r[1]["char"]["share"] for r in worker_results]
    assert shares[0][0] == 0 and shares[0][1] == shares[1][0] and shares[1][1] == len(files)
    assert 0 < shares[0][1] < len(files), "both processes must read documents"
    for arrays, info in worker_results:
        c = info["char"]
        assert c["vocab"] == chars and c["doc_offset"] == c["share"][0]
        assert c["type_counts"] == {ch: int(n) for ch, n in zip(*np.unique(list("".join(texts)), return_counts=True))}
        assert c["tokens_sum"] == tok.size and c["max_id"] == len(chars) - 1
        assert c["tokens_min"] < c["tokens_max"] and c["tokens_min"] + c["tokens_max"] == tok.size
        assert_tables_equal(arrays, "char", ref)


def test_word_sorted_equals_single_process(worker_results):
    parts = [worker.word_doc(d) for d in range(worker.WORD_DOCS)]
    tok = np.concatenate(parts)
    docs = np.repeat(np.arange(len(parts)), [p.size for p in parts])
    assert len(np.unique(tok)) > 2000 and worker.WORD_V >= 20_000
    ref = jaxattn.count_tables(tok, worker.WORD_V, 2, 1, doc_ids=docs)
    for arrays, info in worker_results:
        assert info["word"]["share"][0] == info["word"]["doc_offset"]
        assert_tables_equal(arrays, "word", ref)


def test_sharded_mesh_spanning_processes(worker_results):
    """jaxattn.counts.sharded over a 4-device mesh of 2 processes (sorted and dense paths) equals count_keys."""
    from jaxattn.counts import count_keys, validate_tokens

    tok = np.concatenate([worker.word_doc(d) for d in range(6)])
    docs = np.repeat(np.arange(6), worker.word_doc_sizes()[:6])
    ref_sorted = count_keys(*validate_tokens(tok, 2, 1, worker.WORD_V, docs), 2, 1, worker.WORD_V)
    small, small_docs = worker.tiny_dense_corpus()
    ref_dense = count_keys(*validate_tokens(small, 2, 3, 5, small_docs), 2, 3, 5)
    for arrays, _ in worker_results:
        for label, ref in (("sharded_sorted", ref_sorted), ("sharded_dense", ref_dense)):
            k, v = arrays[f"{label}/keys"], arrays[f"{label}/counts"]
            assert k.dtype == ref[0].dtype and v.dtype == ref[1].dtype, label
            assert np.array_equal(k, ref[0]) and np.array_equal(v, ref[1]), label


def test_counts_past_int32(worker_results):
    for arrays, info in worker_results:
        assert np.array_equal(arrays["overflow/1,0/keys"], [0, 3])
        assert arrays["overflow/1,0/counts"].tolist() == [2 * (2**31 - 5) + 1, 15]
        assert arrays["overflow/2,0/keys"].tolist() == [1, 2**40, 2**40 + 1]
        assert arrays["overflow/2,0/counts"].tolist() == [2**34, 1, 1]
        o = info["overflow"]
        assert o["sum"] == 2**41 + 1 and o["min"] == -(2**40) - 1
        assert list(o["words"].items()) == [("ünï", 2**36), ("p0", 1), ("\ud800", 1), ("p1", 1)]  # process order


# In-process checks: the share rule and the single-process identity.


@pytest.mark.parametrize(
    ("sizes", "nproc"),
    [([5, 1, 1, 1, 9, 2, 2, 3], 3), ([1] * 7, 2), ([100, 1, 1], 4), ([0, 0, 0], 2), ([], 3), ([3, 0, 4, 0], 5)],
)
def test_process_share_partitions_contiguously(sizes, nproc):
    shares = [process_share(sizes, i, nproc) for i in range(nproc)]
    assert [k for r in shares for k in r] == list(range(len(sizes)))  # contiguous, in order, each once
    assert all(r.step == 1 for r in shares)
    assert shares == [process_share(sizes, i, nproc) for i in range(nproc)]  # deterministic


def test_process_share_balances_sizes():
    rng = np.random.default_rng(0)
    sizes = rng.integers(1, 1000, 500).tolist()
    loads = [sum(sizes[k] for k in process_share(sizes, i, 4)) for i in range(4)]
    assert max(loads) - min(loads) <= 2 * max(sizes)
    assert sum(process_share([5, 5, 5, 5], i, 2).stop - process_share([5, 5, 5, 5], i, 2).start for i in (0, 1)) == 4
    assert process_share([5, 5, 5, 5], 0, 2) == range(0, 2)


def test_process_share_errors():
    with pytest.raises(JaxattnError, match="process_id=2"):
        process_share([1, 2], 2, 2)
    with pytest.raises(JaxattnError, match="num_processes=0"):
        process_share([1, 2], 0, 0)
    with pytest.raises(JaxattnError, match="sizes must be >= 0"):
        process_share([1, -2], 0, 1)


def test_single_process_identity():
    keyed = {(1, 0): (np.array([1, 5], np.int32), np.array([2, 3], np.int64))}
    assert allreduce_keyed(keyed, 7) is keyed
    assert allreduce_int(41, "sum") == 41 and allreduce_int(-3, "min") == -3
    assert exclusive_prefix_sum(12) == 0
    assert allreduce_counts({"a": 2, "b": 1}) == {"a": 2, "b": 1}
    k, v = allreduce_sorted(np.array([3, 9], np.int64), np.array([1, 4], np.int32))
    assert np.array_equal(k, [3, 9]) and v.dtype == np.int64
    assert init_distributed(None, None, None) in ((0, 1),)  # no cluster here: nothing initialised
    assert init_distributed("127.0.0.1:1", 1, 0) == (0, 1)
    with pytest.raises(JaxattnError, match="op='mean'"):
        allreduce_int(1, "mean")


@pytest.mark.parametrize(
    ("args", "match"),
    [
        (("127.0.0.1:1234", None, 0), "missing num_processes"),
        ((None, 2, None), "missing coordinator, process_id"),
        (("localhost", 2, 0), "'localhost' is not HOST:PORT"),
        (("host:99999", 2, 0), "is not HOST:PORT"),
        (("::1:80", 2, 0), "is not HOST:PORT"),
        (("127.0.0.1:1234", 2, 2), r"process_id=2 is not in \[0, num_processes=2\)"),
        (("127.0.0.1:1234", 0, 0), "num_processes=0"),
    ],
)
def test_init_distributed_flag_errors(args, match):
    with pytest.raises(JaxattnError, match=match):
        init_distributed(*args)


# End to end: `jaxattn count` in 2 processes writes the tables 1 process writes.


def _cli_tables(tmp: Path, shakespeare_dir: Path, tokenizer: str) -> tuple[dict, dict, dict, dict]:
    """(tables, tables.json) from single-process ``jaxattn count`` and from 2 processes, on the same files."""
    from jaxattn.cli import main
    from jaxattn.output.artefacts import load_tables

    common = ["count", "--corpus", str(shakespeare_dir), "--glob", "c*.txt", "--tokenizer", tokenizer, "--no-progress"]
    assert main([*common, "--out", str(tmp / "one")]) == 0
    addr = ["--coordinator", f"127.0.0.1:{free_port()}", "--num-processes", str(NPROC)]
    cmd = [sys.executable, "-m", "jaxattn.cli", *common, "--out", str(tmp / "two"), *addr]
    runs = launch([[*cmd, "--process-id", str(i)] for i in range(NPROC)], tmp)
    assert "process 1 of 2" in runs[1].stdout and not (tmp / "two" / "tables.json").is_symlink()
    docs = [json.loads((tmp / d / "tables.json").read_text()) for d in ("one", "two")]
    return load_tables(tmp / "one"), load_tables(tmp / "two"), docs[0], docs[1]


def _assert_same_tables(one: dict, two: dict) -> None:
    assert sorted(one) == sorted(two) and len(one) == 8
    for p, a in one.items():
        b = two[p]
        assert (a.n, a.s, a.vocab_size, a.num_windows) == (b.n, b.s, b.vocab_size, b.num_windows), p
        for f in ("contexts", "rows", "cols", "values"):
            x, y = getattr(a, f), getattr(b, f)
            assert x.dtype == y.dtype and np.array_equal(x, y), f"{p} {f} differs"


@pytest.mark.parametrize("tokenizer", ["char", pytest.param("word", marks=pytest.mark.slow)])
def test_cli_count_two_processes_equals_one(tmp_path, shakespeare_dir, tokenizer):
    one, two, doc1, doc2 = _cli_tables(tmp_path, shakespeare_dir, tokenizer)
    _assert_same_tables(one, two)
    assert doc1["tokenizer"] == doc2["tokenizer"]  # the same vocabulary, the same ids
    assert doc1["corpus"]["num_tokens"] == doc2["corpus"]["num_tokens"]
    assert doc1["corpus"]["num_docs"] == doc2["corpus"]["num_docs"] == 3
    if tokenizer == "word":
        assert one[(1, 0)].vocab_size ** 2 > 1 << 24  # the sorted (merge) path


@pytest.mark.parametrize("nruns", [1, 2, 3, 5])
def test_merge_of_sorted_runs_against_counter(nruns):
    """The host merge behind allreduce_sorted against a Counter sum (runs may be empty)."""
    from collections import Counter

    from jaxattn.counts.keys import merge_keyed_runs

    rng = np.random.default_rng(nruns)
    runs, ref = [], Counter()
    for r in range(nruns):
        k = np.unique(rng.integers(0, 2**40 if r % 2 else 50, rng.integers(0, 60))).astype(np.int64)
        v = rng.integers(1, 2**31 - 1, k.size).astype(np.int32)
        runs.append((k, v))
        ref.update(dict(zip(k.tolist(), v.tolist(), strict=True)))
    keys, counts = merge_keyed_runs(runs)
    assert keys.tolist() == sorted(ref) and counts.tolist() == [ref[x] for x in sorted(ref)]
    assert counts.dtype == np.int64 and keys.dtype == np.int64


def test_init_after_jax_started_is_a_clear_error():
    import jax

    jax.devices()  # starts the backend: joining a multi-process run is now too late
    with pytest.raises(JaxattnError, match="initialize failed .*127.0.0.1.*before any JAX"):
        init_distributed(f"127.0.0.1:{free_port()}", 2, 0, initialization_timeout=5)
