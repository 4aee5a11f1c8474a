"""Saved artefacts (jaxattn.output.artefacts): exact round trips, a documented on-disk format, refusal of bad files, atomic writes."""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import json

import jax.numpy as jnp
import numpy as np
import pytest
import safetensors

import jaxattn
from jaxattn.corpus import Tokenizer, corpus_from_ids
from jaxattn.counts import CountMatrix
from jaxattn.errors import JaxattnError
from jaxattn.output import artefacts as io
from jaxattn.output import files as output_files
from tests.helpers import markov_corpus

V = 9


@pytest.fixture(scope="module")
def tables():
    tokens, docs, _ = markov_corpus(11, V, 1500, num_docs=3)
    return jaxattn.count_tables(tokens, V, 2, 2, doc_ids=docs), tokens, docs


def assert_same_table(a: CountMatrix, b: CountMatrix) -> None:
    assert (a.n, a.s, a.vocab_size, a.num_windows) == (b.n, b.s, b.vocab_size, b.num_windows)
    for f in ("contexts", "rows", "cols", "values"):
        x, y = getattr(a, f), getattr(b, f)
        assert x.dtype == y.dtype and x.shape == y.shape, f
        assert x.tobytes() == y.tobytes(), f  # bit-identical, not just close


def test_tables_round_trip_is_exact_and_format_is_documented(tables, tmp_path):
    tabs, tokens, docs = tables
    tok = Tokenizer(kind="ids", vocab=tuple(str(i) for i in range(V)))
    corpus = corpus_from_ids(tokens, docs, V)
    io.save_tables(tmp_path, tabs, tokenizer=tok, corpus=corpus)
    back = io.load_tables(tmp_path, vocab_size=V, tokenizer=tok)
    assert sorted(back) == sorted(tabs) == [(n, s) for n in (1, 2) for s in (0, 1, 2)]
    for k in tabs:
        assert_same_table(tabs[k], back[k])
    # The loaded tables behave like counted ones (dense view, P rows).
    np.testing.assert_array_equal(back[(2, 1)].counts, tabs[(2, 1)].counts)

    # The format the module docstring documents: safetensors + JSON sidecar.
    side = json.loads((tmp_path / "tables.json").read_text())
    assert side["format"] == "jaxattn.tables" and side["version"] == io.FORMAT_VERSION
    assert side["vocab_size"] == V and side["corpus"]["sha256"] == corpus.sha256
    assert side["tokenizer"] == tok.to_dict()
    assert {(e["n"], e["s"]): e["num_windows"] for e in side["tables"]} == {k: c.num_windows for k, c in tabs.items()}
    with safetensors.safe_open(str(tmp_path / "tables.safetensors"), "np") as f:
        assert f.metadata() == {"format": "jaxattn.tables", "version": "1"}
        assert set(f.keys()) == {f"n{n}_s{s}/{a}" for n, s in tabs for a in ("contexts", "rows", "cols", "values")}
        np.testing.assert_array_equal(f.get_tensor("n2_s1/contexts"), tabs[(2, 1)].contexts)


def test_int64_counts_keep_their_dtype(tmp_path):
    cm = jaxattn.count_matrix(np.array([0, 1, 0, 1, 1], np.int32), 1, 0, 2)
    big = dataclasses.replace(cm, values=cm.values.astype(np.int64))
    io.save_tables(tmp_path, {(1, 0): big})
    assert_same_table(io.load_tables(tmp_path)[(1, 0)], big)


def test_params_and_embeddings_round_trip_exactly(tables, tmp_path):
    tabs, _, _ = tables
    cfg = jaxattn.ModelConfig(vocab_size=V, d_model=16, d_head=4, num_layers=2, num_heads=3, max_n=2, max_s=2)
    # Random float32 weights in the model's layout (deriving or jax ops would only cost compile time).
    rng = np.random.default_rng(3)
    shapes = {"embed": (V, 16), "wq": (2, 3, 16, 4), "wk": (2, 3, 16, 4), "wv": (2, 3, 16, 4), "wo": (2, 3, 4, 16)}
    shapes |= {"w1": (2, 16, 64), "b1": (2, 64), "w2": (2, 64, 16), "b2": (2, 16), "lnf_scale": (16,)}
    params = {k: jnp.asarray(rng.standard_normal(s, dtype=np.float32)) for k, s in shapes.items()}
    io.save_params(tmp_path, params, cfg, info={"option": "baseline"})
    back, cfg2 = io.load_params(tmp_path)
    assert cfg2 == cfg
    assert sorted(back) == sorted(params)
    for k in params:
        a, b = np.asarray(params[k]), np.asarray(back[k])
        assert a.dtype == b.dtype and a.tobytes() == b.tobytes(), k

    trained = {
        "embed": np.asarray(params["embed"]) * 1.5,
        "ngram": {"n2": np.arange(6, dtype=np.float32).reshape(2, 3)},
    }
    io.save_embeddings(tmp_path, trained, config=cfg, info={"steps": 3})
    emb = io.load_embeddings(tmp_path)
    assert np.asarray(emb["embed"]).tobytes() == trained["embed"].tobytes()
    assert np.asarray(emb["ngram"]["n2"]).tobytes() == trained["ngram"]["n2"].tobytes()
    assert io.artefact_info(tmp_path, "embeddings")["info"] == {"steps": 3}
    # Three artefacts side by side in one directory.
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "embeddings.json",
        "embeddings.safetensors",
        "params.json",
        "params.safetensors",
    ]


def test_loaded_tables_must_match_the_corpus(tables, tmp_path):
    tabs, tokens, docs = tables
    tok = Tokenizer(kind="ids", vocab=tuple(str(i) for i in range(V)))
    io.save_tables(tmp_path, tabs, tokenizer=tok, corpus=corpus_from_ids(tokens, docs, V))
    with pytest.raises(JaxattnError, match=r"counted with vocab_size=9, but the corpus has vocab_size=10"):
        io.load_tables(tmp_path, vocab_size=10)
    other = Tokenizer(kind="ids", vocab=tuple(str(i) for i in reversed(range(V))))
    with pytest.raises(JaxattnError, match="different 'ids' vocabulary"):
        io.load_tables(tmp_path, tokenizer=other)
    # Same vocabulary, another corpus: allowed (reusing bigger tables), but said.
    with pytest.warns(UserWarning, match="counted on another corpus"):
        io.load_tables(tmp_path, corpus=corpus_from_ids(tokens[:500], None, V))


def test_missing_corrupt_and_inconsistent_artefacts_are_refused(tables, tmp_path):
    tabs, _, _ = tables
    with pytest.raises(JaxattnError, match="artefact directory does not exist"):
        io.load_tables(tmp_path / "nope")
    with pytest.raises(JaxattnError, match=r"no saved tables in .* \(missing tables.json\)"):
        io.load_tables(tmp_path)
    io.save_tables(tmp_path, tabs)
    arr = tmp_path / "tables.safetensors"
    blob = bytearray(arr.read_bytes())
    blob[-1] ^= 0xFF
    arr.write_bytes(bytes(blob))
    with pytest.raises(JaxattnError, match="does not match the sha256"):
        io.load_tables(tmp_path)
    arr.write_bytes(bytes(blob[:100]))
    with pytest.raises(JaxattnError, match="does not match the sha256"):
        io.load_tables(tmp_path)
    (tmp_path / "tables.json").write_text("{not json")
    with pytest.raises(JaxattnError, match="cannot read"):
        io.load_tables(tmp_path)
    (tmp_path / "tables.json").write_text(json.dumps({"format": "jaxattn.tables", "version": 99}))
    with pytest.raises(JaxattnError, match="format version 99"):
        io.load_tables(tmp_path)
    # A params directory is not a tables directory.
    with pytest.raises(JaxattnError, match="no saved params"):
        io.load_params(tmp_path)


def test_tables_that_break_countmatrix_invariants_are_refused(tmp_path):
    cm = jaxattn.count_matrix(np.array([0, 1, 2, 0, 1, 2, 2], np.int32), 1, 0, 3)
    unsorted = dataclasses.replace(cm, contexts=cm.contexts[::-1].copy())
    io.save_tables(tmp_path, {(1, 0): unsorted})  # saving does not check; loading does
    with pytest.raises(JaxattnError, match="contexts are not sorted"):
        io.load_tables(tmp_path)
    wrong_sum = dataclasses.replace(cm, num_windows=cm.num_windows + 1)
    io.save_tables(tmp_path, {(1, 0): wrong_sum})
    with pytest.raises(JaxattnError, match="counts sum to 6, not num_windows=7"):
        io.load_tables(tmp_path)
    out_of_range = dataclasses.replace(cm, cols=np.full_like(cm.cols, 3))
    io.save_tables(tmp_path, {(1, 0): out_of_range})
    with pytest.raises(JaxattnError, match=r"outside \[0, vocab_size=3\)"):
        io.load_tables(tmp_path)
    with pytest.raises(JaxattnError, match="different vocabulary sizes"):
        io.save_tables(tmp_path, {(1, 0): cm, (1, 1): dataclasses.replace(cm, s=1, vocab_size=4)})
    with pytest.raises(JaxattnError, match="no count tables"):
        io.save_tables(tmp_path, {})


def test_atomic_open_leaves_no_partial_file(tmp_path):
    target = tmp_path / "metrics.json"
    with pytest.raises(KeyboardInterrupt):
        with output_files.atomic_open(target) as f:
            f.write('{"results": [')
            raise KeyboardInterrupt  # Ctrl-C half way through
    assert list(tmp_path.iterdir()) == []  # neither the file nor its temporary
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with output_files.atomic_open(target) as f:
            f.write("new, half")
            raise RuntimeError("disk full")
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["metrics.json"]
    with output_files.atomic_open(target) as f:
        f.write("new")
    assert target.read_text() == "new"


def test_interrupted_save_is_detected_not_half_loaded(tables, tmp_path, monkeypatch):
    tabs, _, _ = tables
    io.save_tables(tmp_path, {(1, 0): tabs[(1, 0)]})
    real_open = output_files.atomic_open

    @contextlib.contextmanager
    def interrupted(path, mode="w"):  # Ctrl-C half way through the sidecar, which is written last
        with real_open(path, mode) as f:
            if str(path).endswith(".json"):
                f.write('{"format": "jaxattn.tables", ')
                raise KeyboardInterrupt
            yield f

    monkeypatch.setattr(io, "atomic_open", interrupted)
    with pytest.raises(KeyboardInterrupt):
        io.save_tables(tmp_path, tabs)
    monkeypatch.setattr(io, "atomic_open", real_open)
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    # The new arrays landed but the old sidecar stayed: the hash check refuses the mix.
    with pytest.raises(JaxattnError, match="does not match the sha256"):
        io.load_tables(tmp_path)
    # A first save interrupted the same way leaves no sidecar: "nothing saved", not garbage.
    fresh = tmp_path / "fresh"
    monkeypatch.setattr(io, "atomic_open", interrupted)
    with pytest.raises(KeyboardInterrupt):
        io.save_tables(fresh, tabs)
    monkeypatch.setattr(io, "atomic_open", real_open)
    assert sorted(p.name for p in fresh.iterdir()) == ["tables.safetensors"]
    with pytest.raises(JaxattnError, match="missing tables.json"):
        io.load_tables(fresh)


def test_cli_save_writes_option4_trained_embeddings(tables, tmp_path):
    """``jaxattn analyze --option 4 --save DIR``: tables, the trained weights and the trained E."""
    from types import SimpleNamespace

    from jaxattn.cli.analyze import save_artefacts
    from jaxattn.pipeline import RunConfig

    tabs, tokens, docs = tables
    corpus = corpus_from_ids(tokens, docs, V)
    cfg = jaxattn.ModelConfig(vocab_size=V, d_model=4, d_head=2, num_layers=1, num_heads=1)
    embed = jnp.asarray(np.random.default_rng(0).standard_normal((V, 4), dtype=np.float32))
    prep = SimpleNamespace(tables=tabs, corpus=corpus, run=RunConfig(preset="small"), config=cfg)
    result = SimpleNamespace(option="option4", params={"embed": embed}, extra={"train_config": {"steps": 5}})
    # Stand-ins for Prepared and AnalysisResult: skip the test-time type check of the arguments.
    saved = inspect.unwrap(save_artefacts)(str(tmp_path), prep, result)
    assert saved == {"dir": str(tmp_path), "kinds": ["tables", "params", "embeddings"]}
    assert np.asarray(io.load_embeddings(tmp_path)["embed"]).tobytes() == np.asarray(embed).tobytes()
    info = io.artefact_info(tmp_path, "embeddings")
    assert info["config"] == cfg.to_dict() and info["info"]["train_config"] == {"steps": 5}
    assert info["info"]["corpus_sha256"] == corpus.sha256
    assert sorted(io.load_tables(tmp_path, corpus=corpus)) == sorted(tabs)


def test_metadata_is_checked_before_anything_is_written(tmp_path):
    cfg = jaxattn.ModelConfig(vocab_size=3, d_model=4, d_head=2)
    io.save_embeddings(
        tmp_path, np.eye(3, 4, dtype=np.float32), config=cfg, info={"loss": np.float32(0.5), "x": float("nan")}
    )
    assert io.artefact_info(tmp_path, "embeddings")["info"] == {"loss": 0.5, "x": None}
    bad = tmp_path / "bad"
    with pytest.raises(JaxattnError, match="metadata is not JSON-able"):
        io.save_embeddings(bad, np.eye(3, dtype=np.float32), info={"f": object()})
    assert not bad.exists() or list(bad.iterdir()) == []


def test_every_file_jaxattn_writes_goes_through_atomic_open():
    """A static check: no direct writes (open for writing, write_text/bytes, np.save, savefig to a path)."""
    import re
    from pathlib import Path

    pkg = Path(jaxattn.__file__).parent
    direct = re.compile(
        "|".join(
            (
                r"""\bopen\([^)]*["'][wax]b?\+?["']""",  # open(path, "w")
                r"\.write_(text|bytes)\(",
                r"\bnp\.save(z|txt)?\((?!f\b)",  # np.save(path) rather than into an atomic file f
                r"savefig\((?!f\b)",  # savefig(path) rather than into an atomic file f
                r"\bjson\.dump\((?![^,]*, f\b)",
            )
        )
    )
    offenders = [
        f"{p.relative_to(pkg)}:{i}: {line.strip()}"
        for p in sorted(pkg.rglob("*.py"))
        for i, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1)
        if direct.search(line) and not line.lstrip().startswith("#")
    ]
    assert not offenders, "write these with jaxattn.output.files.atomic_open:\n" + "\n".join(offenders)
