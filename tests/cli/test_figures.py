"""The CLI's figures: results are written before any figure, a failing figure is exit 1 and one line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from jaxattn import cli
from jaxattn.output import plots

FAST = [
    "--preset", "small", "--d-model", "32", "--d-head", "8", "--layers", "2", "--heads", "4",
    "--seq-len", "12", "--num-seqs", "2", "--batch-size", "2", "--no-progress",
]  # fmt: skip


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory, shakespeare_text: str) -> Path:
    d = tmp_path_factory.mktemp("figs")
    (d / "train.txt").write_text(shakespeare_text[20000:32000], encoding="utf-8")
    (d / "zeval.txt").write_text(shakespeare_text[100000:103000], encoding="utf-8")
    return d


def test_failing_figure_keeps_results_and_exits_1(corpus, tmp_path, monkeypatch, capsys):
    def boom(*a, **k):
        raise RuntimeError("simulated plotting crash")

    monkeypatch.setattr(plots, "plot_metric_heatmaps", boom)
    out = tmp_path / "o"
    argv = [
        "analyze",
        "--corpus",
        str(corpus),
        "--heldout",
        "zeval",
        *FAST,
        "--plot-heads",
        "1:3,0:0",
        "--out",
        str(out),
    ]
    assert cli.main(argv) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("jaxattn: error:") and "simulated plotting crash" in err
    assert "metrics.json" in err
    doc = json.loads((out / "metrics.json").read_text())
    assert len(doc["results"]) == 2 * 4
    stats = doc["embedding_similarity"]
    assert stats["sampled"] is False and "embedding" in stats and 0 <= stats["offdiag_abs_mean"] <= 1
    assert (out / "expected_vs_actual_attention.png").stat().st_size > 1000  # the other figures still drawn
    assert (out / "embedding_similarity.png").stat().st_size > 1000
    assert not list(out.glob("heatmap_*.png"))


def test_bad_plot_heads_exits_2_before_work(corpus, tmp_path, capsys):
    out = tmp_path / "bad"
    argv = ["analyze", "--corpus", str(corpus), "--heldout", "zeval", *FAST, "--plot-heads", "2:0", "--out", str(out)]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "layer 2" in err
    assert not (out / "metrics.json").exists()
