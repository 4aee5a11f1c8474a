"""``jaxattn compare`` end to end, in-process, on a small slice of the real text."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from jaxattn import cli, options, pipeline
from jaxattn.cli import compare
from jaxattn.errors import JaxattnError
from jaxattn.output import jsonable
from tests.helpers import evaluate_prep

SCHEMA = ("option", "layer", "head", "n", "s", "kl", "cosine", "argmax_match", "argmax_match_tied", "entropy")
SCHEMA += ("num_queries",)
LAYERS, HEADS = 2, 4
FAST = [
    "--preset", "small", "--d-model", "32", "--d-head", "8", "--layers", str(LAYERS), "--heads", str(HEADS),
    "--seq-len", "16", "--num-seqs", "3", "--batch-size", "4", "--no-progress",
]  # fmt: skip


@pytest.fixture(scope="module")
def slice_dir(tmp_path_factory: pytest.TempPathFactory, shakespeare_text: str) -> Path:
    """Two documents cut from King Lear (read in place; written only under the test's tmp dir)."""
    d = tmp_path_factory.mktemp("slice")
    (d / "train.txt").write_text(shakespeare_text[20000:50000], encoding="utf-8")
    (d / "zeval.txt").write_text(shakespeare_text[100000:106000], encoding="utf-8")
    return d


def _check_language_model(doc: dict, labels: list[str]) -> None:
    """Every option scored is in the ``language_model`` block: three finite numbers, uniform = log2 V, n-gram < uniform."""
    block = doc["language_model"]
    assert list(block) == labels
    V = doc["config"]["model"]["vocab_size"]
    for lab in labels:
        d = block[lab]
        for k in ("derived_bits_per_token", "ngram_bits_per_token", "uniform_bits_per_token"):
            assert isinstance(d[k], float) and np.isfinite(d[k]) and d[k] > 0, (lab, k, d[k])
        assert d["uniform_bits_per_token"] == pytest.approx(np.log2(V), rel=1e-12)
        assert d["ngram_bits_per_token"] < d["uniform_bits_per_token"]  # real text: the counts predict it
        assert d["num_predictions"] == 3 * 15 and d["ngram_order"] == 3 and d["smoothing"] == 0.01
    # Every option is scored against the same n-gram model on the same predictions.
    assert len({block[lab]["ngram_bits_per_token"] for lab in labels}) == 1


def _check_metrics(out: Path, labels: list[str]) -> dict:
    doc = json.loads((out / "metrics.json").read_text())
    assert {"results", "config", "corpus"} <= set(doc)
    recs = doc["results"]
    assert len(recs) == len(labels) * LAYERS * HEADS
    for r in recs:
        assert set(SCHEMA) <= set(r)
        assert 0.0 <= r["cosine"] <= 1.0 and r["kl"] >= 0.0 and r["num_queries"] > 0
    assert sorted({r["option"] for r in recs}) == sorted(labels)
    for lab in labels:
        keys = {(r["layer"], r["head"]) for r in recs if r["option"] == lab}
        assert keys == {(l, h) for l in range(LAYERS) for h in range(HEADS)}
    # Every option saw the same held-out queries.
    nq = {lab: [r["num_queries"] for r in recs if r["option"] == lab] for lab in labels}
    assert all(v == nq[labels[0]] for v in nq.values())
    assert doc["corpus"]["num_tokens"] > 0 and doc["config"]["model"]["num_layers"] == LAYERS
    return doc


# --------------------------------------------------------------------------- #
# stand-ins for options 1-4 (the interface of the jaxattn.options registry)
# --------------------------------------------------------------------------- #


def _uniform(prep) -> np.ndarray:
    B, T = prep.tokens.shape
    u = np.tril(np.ones((T, T), np.float32))
    u /= u.sum(-1, keepdims=True)
    return np.broadcast_to(u, (B, prep.config.num_layers, prep.config.num_heads, T, T)).copy()


def _expected(prep) -> np.ndarray:
    """The expected attention itself (uniform over keys where a query row has no expectation)."""
    e = prep.expected[prep.pair_index]  # [L, H, B, T, T]
    e = np.moveaxis(e, 2, 0)
    valid = e.sum(-1, keepdims=True) > 0
    return np.where(valid, e, _uniform(prep)).astype(np.float32)


@pytest.fixture
def stand_ins(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, dict]]:
    calls: list[tuple[str, dict]] = []

    def run_option(prep, option, *, progress=True, timer=None, **kw):
        calls.append((option, kw))
        label = {"1": "option1", "2": "option2", "3": "option3", "4": "option4"}[option]
        attn = {
            "1": lambda: _uniform(prep),
            "2": lambda: _expected(prep),
            "3": lambda: 0.5 * _expected(prep) + 0.5 * _uniform(prep),
            "4": lambda: kw["baseline"].attn if "baseline" in kw else _uniform(prep),
        }[option]()
        extra = {"stand_in": True, "note": label}
        if option == "4":
            extra.update(steps=kw.get("steps"), frozen_bit_identical=True, curves={"loss": np.linspace(1, 0.5, 4)})
        return pipeline.AnalysisResult(label, evaluate_prep(prep, attn, label), attn, None, extra)

    def ablation(prep, *, progress=True, timer=None):
        calls.append(("ablation", {}))
        rows = []
        for k, (lab, attn) in enumerate((("seed baseline", _uniform(prep)), ("everything", _expected(prep)))):
            recs = evaluate_prep(prep, attn, f"ablation{k}")
            row = {"step": k, "ingredient": lab, "description": lab, "tau": None}
            for m in ("cosine", "argmax_match_tied", "kl", "entropy"):
                per = [float(np.mean([r[m] for r in recs if r["layer"] == l])) for l in range(prep.config.num_layers)]
                row.update({m: per, f"{m}_mean": float(np.mean(per)), f"{m}_worst_layer": min(per)})
            rows.append(row)
        return rows

    monkeypatch.setattr(options, "run_option", run_option)
    monkeypatch.setattr(options, "ablation", ablation)
    return calls


def test_compare_writes_every_option_ablation_and_diagnostics(slice_dir, tmp_path, stand_ins, capsys):
    out = tmp_path / "cmp"
    argv = ["compare", "--corpus", str(slice_dir), "--heldout", "zeval", *FAST, "--train-steps", "2", "--out", str(out)]
    assert cli.main(argv) == 0
    labels = ["baseline", "option1", "option2", "option3", "option4"]
    doc = _check_metrics(out, labels)
    # Stand-ins were called through the documented interfaces.
    opts = [c[0] for c in stand_ins]
    assert opts == ["1", "2", "3", "4", "ablation"]
    kw4 = dict(stand_ins)["4"]
    assert kw4["steps"] == 2 and kw4["baseline"].option == "baseline"
    # Option 2 stand-in is the expected attention itself: cosine 1, best option.
    o2 = [r for r in doc["results"] if r["option"] == "option2"]
    assert all(r["cosine"] > 0.9999 and r["argmax_match_tied"] == 1.0 for r in o2)
    # The ceiling is not ranked: Option 3's stand-in (argmax of the expectation) wins; option2 is printed as the ceiling.
    assert doc["best_option"] == "option3" and doc["ceilings"] == ["option2"]
    summ = {s["option"]: s for s in doc["options_summary"]}
    base = [r for r in doc["results"] if r["option"] == "baseline"]
    assert summ["baseline"]["cosine"] == pytest.approx(np.mean([r["cosine"] for r in base]))
    assert doc["option_extras"]["option4"]["curves"]["loss"] == pytest.approx(list(np.linspace(1, 0.5, 4)))
    assert doc["config"]["train_steps"] == 2
    # Ablation, diagnostics, verdicts.
    assert [r["step"] for r in doc["ablation"]] == [0, 1]
    assert json.loads((out / "ablation.json").read_text())["rows"][1]["ingredient"] == "everything"
    diag = json.loads((out / "diagnostics.json").read_text())
    assert diag["verdicts"] == doc["verdicts"] and len(doc["verdicts"]) >= 8
    assert {v["verdict"] for v in doc["verdicts"]} <= {"supported", "refuted", "partly"}
    assert len(diag["layers"]) == LAYERS
    # The real baseline is scored as a language model; the stand-ins carry no scores.
    assert list(doc["language_model"]) == labels
    assert all(doc["language_model"][lab] is None for lab in labels[1:])
    _check_language_model({**doc, "language_model": {"baseline": doc["language_model"]["baseline"]}}, ["baseline"])
    for name in ("options_comparison.png", "ablation.png", "diagnostics.png", "expected_vs_actual_attention.png"):
        assert (out / name).stat().st_size > 1000
    for lab in labels:
        assert (out / f"heatmap_{lab}_cosine.png").exists()
    text = capsys.readouterr().out
    assert "option2" in text and "verdicts" in text and "ablation" in text.lower()
    assert "best option (tied argmax match, then cosine; the ceiling not ranked): option3" in text
    assert any(ln.startswith("ceiling") and "option2" in ln for ln in text.splitlines())
    assert not list(out.glob(".*.tmp"))  # atomic writes leave no temporaries


def test_analyze_option_writes_its_extras(slice_dir, tmp_path, stand_ins):
    """``analyze --option 4`` keeps the option's own numbers (training curves) in metrics.json."""
    out = tmp_path / "an4"
    argv = ["analyze", "--corpus", str(slice_dir), "--heldout", "zeval", *FAST, "--option", "4", "--out", str(out)]
    assert cli.main(argv) == 0
    doc = json.loads((out / "metrics.json").read_text())
    assert [c[0] for c in stand_ins] == ["4"]
    assert doc["option_extras"]["option4"]["curves"]["loss"] == pytest.approx(list(np.linspace(1, 0.5, 4)))
    assert {r["option"] for r in doc["results"]} == {"option4"}
    assert (out / "training_curves.png").stat().st_size > 1000


def test_compare_subset_skips_and_real_option2(slice_dir, tmp_path):
    """The real Option 2 and baseline, without ablation/diagnostics (fast path of --options)."""
    out = tmp_path / "sub"
    argv = ["compare", "--corpus", str(slice_dir), "--heldout", "zeval", *FAST, "--out", str(out)]
    assert cli.main([*argv, "--options", "baseline,option2", "--skip-ablation", "--skip-diagnostics"]) == 0
    doc = _check_metrics(out, ["baseline", "option2"])
    assert doc["ablation"] is None and doc["diagnostics"] is None
    assert not (out / "diagnostics.json").exists() and not (out / "ablation.json").exists()
    o2 = [r for r in doc["results"] if r["option"] == "option2"]
    b = [r for r in doc["results"] if r["option"] == "baseline"]
    # The gather from the tables reproduces the expected attention far better than the seed derivation.
    assert np.mean([r["cosine"] for r in o2]) > 0.99 > np.mean([r["cosine"] for r in b])
    assert "cost" in doc["option_extras"]["option2"]
    _check_language_model(doc, ["baseline", "option2"])


def test_analyze_reports_the_language_model(slice_dir, tmp_path, capsys):
    """``analyze`` (the real baseline) prints and writes the model's, the n-gram model's and uniform's bits/token."""
    out = tmp_path / "lm"
    argv = ["analyze", "--corpus", str(slice_dir), "--heldout", "zeval", *FAST, "--out", str(out)]
    assert cli.main(argv) == 0
    doc = json.loads((out / "metrics.json").read_text())
    _check_language_model(doc, ["baseline"])
    text = capsys.readouterr().out
    assert "next-token bits per token" in text
    d = doc["language_model"]["baseline"]
    row = next(ln for ln in text.splitlines() if ln.split()[:1] == ["baseline"] and len(ln.split()) == 5)
    assert row.split()[1:4] == [
        f"{d[k]:.3f}" for k in ("derived_bits_per_token", "ngram_bits_per_token", "uniform_bits_per_token")
    ]


@pytest.mark.slow
def test_compare_all_real_options(slice_dir, tmp_path):
    out = tmp_path / "all"
    argv = ["compare", "--corpus", str(slice_dir), "--heldout", "zeval", *FAST, "--train-steps", "3", "--out", str(out)]
    assert cli.main(argv) == 0
    doc = _check_metrics(out, ["baseline", "option1", "option2", "option3", "option4"])
    assert doc["option_extras"]["option4"]["frozen_bit_identical"] is True
    assert len(doc["ablation"]) >= 2 and doc["verdicts"]


def test_parse_options():
    assert options.parse_options(None) == ["baseline", "1", "2", "3", "4"]
    assert options.parse_options("all") == ["baseline", "1", "2", "3", "4"]
    assert options.parse_options("4, baseline,option2") == ["baseline", "2", "4"]
    for bad in ("7", "baseline,optionX", " , "):
        with pytest.raises(JaxattnError):
            options.parse_options(bad)


def test_best_option_and_plain():
    s = [
        {"option": "a", "argmax_match_tied": 0.5, "cosine": 0.9},
        {"option": "b", "argmax_match_tied": 0.5, "cosine": 0.95},
        {"option": "c", "argmax_match_tied": 0.4, "cosine": 0.99},
    ]
    assert compare.best_option(s) == "b"
    ceil = [{"option": "option2", "argmax_match_tied": 1.0, "cosine": 1.0}, *s]
    assert compare.best_option(ceil) == "b" and compare.best_option(ceil, exclude=set()) == "option2"
    assert compare.best_option(ceil[:1]) is None
    res = {lab: pipeline.AnalysisResult(lab, [], np.zeros(1)) for lab in ("option1", "option2", "option3")}
    assert compare.attention_result([res["option2"], res["option1"]], "option1").option == "option1"
    assert compare.attention_result(list(res.values()), "option1").option == "option3"
    assert compare.attention_result([res["option2"]], None) is None
    import jax.numpy as jnp

    plain = jsonable({"x": jnp.ones(2), "y": np.float32(1.5), "z": (1, np.int64(2)), "w": object})
    assert plain["x"] == [1.0, 1.0] and plain["y"] == 1.5 and plain["z"] == [1, 2] and isinstance(plain["w"], str)
    json.dumps(plain)


@pytest.mark.parametrize(
    "extra, needle",
    [
        (["--options", "7"], "'7'"),
        (["--train-steps", "0"], "--train-steps"),
        (["--preset", "huge"], "huge"),
        (["--corpus", "/nonexistent/dir/x.txt"], "nonexistent"),
    ],
)
def test_compare_bad_input_exits_2(slice_dir, tmp_path, capsys, extra, needle):
    argv = ["compare", "--corpus", str(slice_dir), "--heldout", "zeval", *FAST, "--out", str(tmp_path / "o")]
    assert cli.main([*argv, *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and needle in err and "Traceback" not in err
    assert not (tmp_path / "o" / "metrics.json").exists()
