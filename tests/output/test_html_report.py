"""report.html without a browser: the packed data against the run's arrays, self-containment, size, score tab."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

from jaxattn import pipeline
from jaxattn.alignment import METRIC_NAMES, query_metrics
from jaxattn.output import metrics_document, read_report_data, render_html, write_json, write_report
from jaxattn.output.html_data import (
    decode_slab,
    dequantise_rows,
    encode_slab,
    pack_triangle,
    quantise_rows,
    unpack_triangle,
)
from jaxattn.output.html_report import write_score_report

B, T = 10, 16  # more sequences than the report shows (8)
SHOWN = 8
F16_TOL = 2.0**-11  # float16 relative rounding, on values <= 1


def assert_quantised_close(got: np.ndarray, want: np.ndarray) -> None:
    """Within the row quantisation: half a step (row max / 255) plus float16's rounding of the row max."""
    rowmax = np.max(np.tril(want), -1, keepdims=True)
    assert np.all(np.abs(got - np.tril(want)) <= rowmax * (0.5 / 255 + F16_TOL) + 1e-7)


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory, shakespeare_text: str):
    """A tiny baseline run on a slice of King Lear, its metrics.json and its report.html."""
    d = tmp_path_factory.mktemp("corpus")
    (d / "a.txt").write_text(shakespeare_text[20000:50000], encoding="utf-8")
    (d / "b.txt").write_text(shakespeare_text[100000:106000], encoding="utf-8")
    overrides = (("d_model", 32), ("d_head", 8), ("num_layers", 2), ("num_heads", 4))
    cfg = pipeline.RunConfig(preset="small", seq_len=T, num_seqs=B, batch_size=B, model_overrides=overrides)
    corpus, eval_corpus = pipeline.load_split(str(d), None, cfg, progress=False)
    prep = pipeline.prepare(corpus, eval_corpus, cfg, progress=False)
    res = pipeline.run_baseline(prep, progress=False)
    out = tmp_path_factory.mktemp("run")
    doc = metrics_document(res.records, config={"run": cfg.to_dict()}, corpus=corpus.info(), timings={"load": 0.5})
    write_json(out / "metrics.json", doc)
    path = write_report(out, prep, [res])
    return prep, res, out, path


def test_the_page_shows_metrics_json_formatted_to_4_places(run):
    prep, res, out, path = run
    data = read_report_data(path)
    doc = json.loads((out / "metrics.json").read_text())
    L, H = prep.pair_index.shape
    assert (data["L"], data["H"], data["options"]) == (L, H, ["baseline"])
    heads = data["heads"]["baseline"]
    assert len(heads) == L * H
    for r in doc["results"]:
        shown = heads[r["layer"] * H + r["head"]]
        assert (shown["n"], shown["s"], shown["num_queries"]) == (r["n"], r["s"], r["num_queries"])
        for m in METRIC_NAMES:
            assert shown["v"][m] == ("n/a" if r[m] is None else f"{r[m]:.4f}")


def test_the_arrays_round_trip_within_float16(run):
    prep, res, _, path = run
    data = read_report_data(path)
    assert (data["B"], data["T"], data["B_total"]) == (SHOWN, T, B)
    arr = {k: decode_slab(v) for k, v in data["arrays"].items()}
    expected = dequantise_rows(arr["expected"], arr["expected_scale"])  # [P, b, T, T]
    assert_quantised_close(expected, prep.expected[:, :SHOWN])
    np.testing.assert_array_equal(arr["valid"].astype(bool), prep.mask[:, :SHOWN].any(-1))
    L, H = prep.pair_index.shape
    for l in range(L):
        for h in range(H):
            k = l * H + h
            assert data["pair_index"][k] == prep.pair_index[l, h]
            s = data["actual_slot"]["baseline"][k]
            assert_quantised_close(dequantise_rows(arr["actual"][s], arr["actual_scale"][s]), res.attn[:SHOWN, l, h])
            # Per-query metrics: the library's query_metrics on the float32 arrays, then float16.
            q = arr["query"][data["query_slot"]["baseline"][k]].astype(np.float32)  # [b, T, M]
            p = prep.pair_index[l, h]
            for b in (0, SHOWN - 1):
                ref = query_metrics(prep.expected[p, b], res.attn[b, l, h], prep.mask[p, b])
                for i, m in enumerate(data["query_metrics"]):
                    np.testing.assert_allclose(q[b, :, i], np.asarray(ref[m]), rtol=2e-3, atol=1e-6)
    assert [t for t in data["tokens"][0]] == [prep.corpus.tokenizer.vocab[int(t)] for t in prep.tokens[0]]


def test_heads_with_identical_attention_share_one_slab(run):
    prep, res, _, path = run
    data = read_report_data(path)
    slots = data["actual_slot"]["baseline"]
    L, H = prep.pair_index.shape
    heads = [res.attn[:SHOWN, l, h].tobytes() for l in range(L) for h in range(H)]  # the float32 arrays
    assert len(set(slots)) == len(set(heads)) == decode_slab(data["arrays"]["actual"]).shape[0]
    for a in range(L * H):
        for b in range(L * H):
            assert (slots[a] == slots[b]) == (heads[a] == heads[b])


def test_the_file_is_self_contained(run):
    _, _, _, path = run
    html = path.read_text(encoding="utf-8")
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", html, re.I)
    assert not re.search(r"<link\b|@import|url\(|<iframe|<img\b", html, re.I)
    assert "Content-Security-Policy" in html and "default-src 'none'" in html
    assert html.count("<script") == 2  # the data block and the inline script
    assert 'id="jaxattn-data"' in html and "function renderHead" in html and ".grid .cell" in html
    assert path.stat().st_size < 400_000


def test_slabs_and_triangles_round_trip():
    rng = np.random.default_rng(0)
    x = np.tril(rng.random((3, 5, 5), dtype=np.float32))
    assert pack_triangle(x).shape == (3, 15)
    np.testing.assert_array_equal(unpack_triangle(pack_triangle(x), 5), x)
    # row i of the packing starts at i(i+1)/2, as the page reads it
    assert pack_triangle(x)[1, 3 * 4 // 2 + 2] == x[1, 3, 2]
    slab = encode_slab(x)
    assert slab["dtype"] == "float16" and slab["shape"] == [3, 5, 5]
    np.testing.assert_array_equal(decode_slab(slab), x.astype(np.float16))
    # Row quantisation: the row maximum is kept (to float16), every entry within half a step.
    attn = rng.dirichlet(np.ones(6), size=(2, 6)).astype(np.float32)  # [2, T=6, 6]
    q, scale = quantise_rows(attn)
    assert q.dtype == np.uint8 and q.shape == (2, 21) and scale.shape == (2, 6)
    assert np.all(unpack_triangle(q, 6).max(-1) == 255)
    assert_quantised_close(dequantise_rows(q, scale), attn)
    assert np.array_equal(np.argmax(unpack_triangle(q, 6), -1), np.argmax(np.tril(attn), -1))
    flags = rng.random((4, 7)) > 0.5
    np.testing.assert_array_equal(decode_slab(encode_slab(flags.astype(np.uint8))).astype(bool), flags)


def test_no_string_in_the_data_can_close_the_script():
    data = {"format": 1, "title": "a </script><script>alert(1)</script> & <b>", "options": [], "provenance": []}
    html = render_html(data)
    assert "</script><script>alert" not in html
    assert "<title>a &lt;/script&gt;" in html


def test_score_adds_a_tab_to_our_report_and_leaves_other_files(run, tmp_path: Path):
    _, _, out, path = run
    doc = {
        "heads": [{"block": b, "head": h, "best": {"n": 2, "s": h, "cosine": 0.5 + 0.1 * h, "argmax_match_tied": 0.25,
                                                   "kl": 1.0}} for b in range(2) for h in range(3)],
        "model": {"path": "ckpt", "blocks": 2, "heads": 3},
    }  # fmt: skip
    assert write_score_report(out, doc) == path
    data = read_report_data(path)
    assert data["options"] == ["baseline"] and data["heads"]  # the analyze tabs are kept
    s = data["scores"]
    assert (s["blocks"], s["heads"]) == (2, 3) and s["cells"][5] == {
        "n": 2, "s": 2, "cosine": "0.7000", "tied": "0.2500", "kl": "1.0000"
    }  # fmt: skip
    new = write_score_report(tmp_path, doc)
    assert new is not None and read_report_data(new)["kind"] == "score"
    other = tmp_path / "other"
    other.mkdir()
    (other / "report.html").write_text("<p>not ours</p>", encoding="utf-8")
    assert write_score_report(other, doc) is None
    assert (other / "report.html").read_text(encoding="utf-8") == "<p>not ours</p>"
