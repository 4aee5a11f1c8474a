"""Determinism and reproducible reports, from full ``jaxattn analyze`` runs on a small corpus.

Three runs with the same seed must give byte-identical ``metrics.json`` "results": a first run
(in-process, ``--save``), a second one reusing the saved tables (``--load``), and a third in a
fresh process with 8 simulated CPU devices, which also counts and scores sharded over all 8
(:mod:`jaxattn.counts.sharded`, :mod:`jaxattn.alignment.sharded`) and must match the single-device numbers bit for bit.

The corpus directory mixes in hostile files that must be handled, not fatal: bytes that are not
UTF-8 (replaced, one warning line), an empty file and a binary file (both skipped).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import json
import math
import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import jax
import jaxlib
import numpy as np
import pytest

import jaxattn
from jaxattn import alignment, cli, pipeline
from jaxattn.corpus import read_documents
from jaxattn.model import ModelConfig
from tests.helpers import baseline_attention

REPO = Path(__file__).resolve().parents[1]
SEED = "7"


def _text(seed: int, n_words: int) -> str:
    rng = np.random.default_rng(seed)
    words = "the king and his daughter spoke of love; what said she? nothing, my lord. then go".split()
    lines = [" ".join(rng.choice(words, 9)).capitalize() + "." for _ in range(n_words // 9)]
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("corpus")
    (d / "a_text.txt").write_text(_text(0, 400))
    (d / "b_latin1.txt").write_bytes(("Le seigneur \xe9t\xe9.\n" + _text(1, 200)).encode("latin-1"))
    (d / "c_empty.txt").write_bytes(b"")
    (d / "d_image.png").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256)))
    (d / "e_text.txt").write_text(_text(2, 300))  # the held-out (last) document
    return d


def argv(corpus: Path, out: Path, *extra: str) -> list[str]:
    tiny = ["--preset", "small", "--layers", "2", "--heads", "2", "--d-model", "16", "--d-head", "4"]
    return ["analyze", *tiny, "--seq-len", "12", "--num-seqs", "5", "--batch-size", "2", "--seed", SEED,
            "--corpus", str(corpus), "--out", str(out), "--no-progress", *extra]  # fmt: skip


def run_in_process(args: list[str]) -> tuple[dict, str]:
    """Runs ``cli.main`` (usable from module-scoped fixtures, where capsys is not)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main(args)
    err = err.getvalue()
    assert code == 0, err
    return json.loads((Path(args[args.index("--out") + 1]) / "metrics.json").read_text()), err


# Runs in a fresh process with 8 CPU devices: the CLI, then counts + metrics sharded over all 8.
SHARDED_SCRIPT = textwrap.dedent(
    """
    import hashlib, json, sys, traceback
    import jax, numpy as np
    from jaxattn import cli, pipeline
    from jaxattn.counts import count_tables
    args = json.loads(sys.argv[1])
    assert cli.main(args) == 0
    assert jax.device_count() == 8
    try:  # a failure here fails only the sharding test
        from jaxattn.alignment import sharded_layer_head_metrics
        from jaxattn.counts import make_mesh
        run = cli.run_config_from_args(cli.build_parser().parse_args(args))
        corpus, ev = pipeline.load_split(args[args.index("--corpus") + 1], None, run, progress=False)
        cfg = pipeline.preset(run.preset, corpus.vocab_size, **dict(run.model_overrides))
        mesh = make_mesh(8)
        tables = count_tables(corpus.tokens, cfg.vocab_size, cfg.max_n, cfg.max_s, doc_ids=corpus.doc_ids, mesh=mesh)
        prep = pipeline.prepare(corpus, ev, run, tables=tables, progress=False)
        from jaxattn.derive import derive_params
        params = derive_params(prep.tables, prep.config, key=prep.key("derive"))
        attn = pipeline.batched_attention(params, prep.tokens, prep.config, batch_size=prep.run.batch_size, progress=False)
        m = sharded_layer_head_metrics(prep.expected, prep.mask, prep.pair_index, attn, mesh)
        h = {f"{k}": hashlib.sha256(b"".join(np.ascontiguousarray(getattr(t, f)).tobytes()
             for f in ("contexts", "rows", "cols", "values"))).hexdigest() for k, t in sorted(tables.items())}
        print(json.dumps({"tables": h, "metrics": {k: np.asarray(v).tolist() for k, v in m.items()},
                          "attn": hashlib.sha256(np.ascontiguousarray(attn).tobytes()).hexdigest()}))
    except Exception:
        print(json.dumps({"error": traceback.format_exc()[-3000:]}))
    """
)


@pytest.fixture(scope="module")
def runs(corpus_dir, tmp_path_factory):
    """metrics.json of the three runs, the stderr of the first, and the sharded subprocess's numbers."""
    tmp = tmp_path_factory.mktemp("runs")
    # The 8-device process runs while this one does its two runs (most of the time is compiling).
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAXATTN_NO_PROGRESS="1")
    proc = subprocess.Popen(
        [sys.executable, "-c", SHARDED_SCRIPT, json.dumps(argv(corpus_dir, tmp / "c"))],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        first, err = run_in_process(argv(corpus_dir, tmp / "a", "--save", str(tmp / "art")))
        loaded, _ = run_in_process(argv(corpus_dir, tmp / "b", "--load", str(tmp / "art")))
        stdout, stderr = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, stderr[-3000:]
    sharded = json.loads(stdout.strip().splitlines()[-1])
    eight = json.loads((tmp / "c" / "metrics.json").read_text())
    return {"first": first, "loaded": loaded, "eight": eight, "sharded": sharded, "stderr": err, "tmp": tmp}


def quiet_load_split(corpus_dir: Path, run: pipeline.RunConfig):
    """load_split without the (expected, already tested) not-UTF-8 warning."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return pipeline.load_split(str(corpus_dir), None, run, progress=False)


def results_bytes(doc: dict) -> bytes:
    return json.dumps(doc["results"], allow_nan=False).encode()


def test_same_seed_gives_byte_identical_results_across_runs_processes_and_devices(runs):
    a = results_bytes(runs["first"])
    assert a == results_bytes(runs["loaded"]), "--load reuses the saved tables: same numbers"
    assert a == results_bytes(runs["eight"]), "a fresh process with 8 devices: same numbers"
    assert runs["eight"]["environment"]["device"]["count"] == 8
    assert runs["first"]["environment"]["device"]["count"] == jax.device_count()


def test_sharded_counts_and_metrics_equal_single_device(runs, corpus_dir):
    """The 8-device sharded counts and metrics equal this (single-device) process's, bit for bit."""
    if "error" in runs["sharded"]:
        pytest.fail("sharded counting/metrics failed in the 8-device process:\n" + runs["sharded"]["error"])
    args = argv(corpus_dir, runs["tmp"] / "unused")
    run = cli.run_config_from_args(cli.build_parser().parse_args(args))
    corpus, ev = quiet_load_split(corpus_dir, run)
    prep = pipeline.prepare(corpus, ev, run, progress=False)
    tables = {
        f"{k}": hashlib.sha256(
            b"".join(np.ascontiguousarray(getattr(t, f)).tobytes() for f in ("contexts", "rows", "cols", "values"))
        ).hexdigest()
        for k, t in sorted(prep.tables.items())
    }
    assert tables == runs["sharded"]["tables"]
    attn = baseline_attention(prep)
    assert hashlib.sha256(np.ascontiguousarray(attn).tobytes()).hexdigest() == runs["sharded"]["attn"]
    m = alignment.layer_head_metrics(
        jax.numpy.asarray(prep.expected), jax.numpy.asarray(prep.mask), jax.numpy.asarray(prep.pair_index), attn
    )
    assert {k: np.asarray(v).tolist() for k, v in m.items()} == runs["sharded"]["metrics"]


def test_the_seed_matters(runs, corpus_dir):
    """Identical results are not vacuous: another --seed draws other sequences and embeddings."""
    run = cli.run_config_from_args(cli.build_parser().parse_args(argv(corpus_dir, runs["tmp"] / "unused")))
    corpus, ev = quiet_load_split(corpus_dir, run)
    a = pipeline.prepare(corpus, ev, run, progress=False)
    b = pipeline.prepare(corpus, ev, dataclasses.replace(run, seed=run.seed + 1), progress=False)
    assert not np.array_equal(a.tokens, b.tokens)
    assert not np.array_equal(a.key("derive"), b.key("derive"))


def test_metrics_json_records_versions_device_config_corpus_hash_and_stage_times(runs, corpus_dir):
    doc = runs["first"]
    env = doc["environment"]
    assert (env["jaxattn"], env["jax"], env["jaxlib"]) == (jaxattn.__version__, jax.__version__, jaxlib.__version__)
    assert env["device"]["platform"] == jax.devices()[0].platform and env["device"]["kind"]
    # The full config: every RunConfig and ModelConfig field, and the command line.
    run = pipeline.RunConfig(
        preset="small",
        seq_len=12,
        num_seqs=5,
        seed=int(SEED),
        batch_size=2,
        model_overrides=(("d_model", 16), ("d_head", 4), ("num_layers", 2), ("num_heads", 2)),
    )
    assert doc["config"]["run"] == json.loads(json.dumps(run.to_dict()))
    V = doc["corpus"]["vocab_size"]
    model = ModelConfig(vocab_size=V, d_model=16, d_head=4, num_layers=2, num_heads=2, max_n=2, max_s=3)
    assert doc["config"]["model"] == model.to_dict()
    assert doc["config"]["cli_args"]["seed"] == int(SEED) and doc["config"]["cli_args"]["save"]
    # The corpus hash, recomputed here from the files: each kept document's name and decoded text,
    # length-prefixed, in order (the held-out document is the evaluation corpus).
    h = hashlib.sha256()
    for name in ("a_text.txt", "b_latin1.txt"):
        text = (corpus_dir / name).read_bytes().decode("utf-8", errors="replace")
        for part in (name.encode(), text.encode()):
            h.update(len(part).to_bytes(8, "little"))
            h.update(part)
    assert doc["corpus"]["sha256"] == h.hexdigest()
    assert doc["corpus"]["files"] == ["a_text.txt", "b_latin1.txt"]
    assert doc["eval_corpus"]["files"] == ["e_text.txt"]
    # Wall time of every stage.
    t = doc["timings_s"]
    assert {"load", "count", "expected", "save", "derive", "forward", "metrics", "report"} <= set(t)
    assert all(math.isfinite(v) and v >= 0 for v in t.values())
    assert doc["artefacts"]["saved"]["kinds"] == ["tables", "params"]
    assert runs["loaded"]["artefacts"]["loaded_tables_from"] == str(runs["tmp"] / "art")
    assert "load_tables" in runs["loaded"]["timings_s"]


def test_hostile_files_in_a_directory_are_handled_and_said_in_one_line(runs, corpus_dir):
    # A file not named *.txt: skipped and said; not UTF-8: replaced and one warning line;
    # empty and binary files: skipped silently.
    assert runs["stderr"].splitlines() == [
        f"jaxattn: warning: {corpus_dir}: 1 file(s) not named *.txt or *.text skipped: d_image.png",
        f"jaxattn: warning: 1 file(s) in {corpus_dir} are not valid UTF-8 (first: b_latin1.txt); "
        "undecodable bytes were replaced by U+FFFD",
    ]
    with pytest.warns(UserWarning, match="not valid UTF-8"):
        texts = {d.name: d.text for d in read_documents(corpus_dir, progress=False)}
    assert sorted(texts) == ["a_text.txt", "b_latin1.txt", "e_text.txt"]
    assert texts["b_latin1.txt"].startswith("Le seigneur \ufffdt\ufffd.")
    # Never a NaN: every metric is finite and in its range.
    for rec in runs["first"]["results"]:
        assert rec["num_queries"] > 0
        assert rec["kl"] >= 0 and math.isfinite(rec["kl"])
        for k in ("cosine", "argmax_match", "argmax_match_tied", "entropy"):
            assert 0.0 <= rec[k] <= 1.0, (k, rec)
