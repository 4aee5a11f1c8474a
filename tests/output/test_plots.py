"""Figures: O(V k) embedding statistics, head panels, heatmap ranges and repeats, failure isolation."""

from __future__ import annotations

import tracemalloc
from pathlib import Path

import numpy as np
import pytest

from jaxattn.errors import JaxattnError
from jaxattn.output import attention_plots, plots


def _full_stats(e: np.ndarray) -> dict[str, float]:
    """The obvious O(V^2) reference."""
    e = e / np.linalg.norm(e, axis=1, keepdims=True)
    sim = e @ e.T
    off = sim[~np.eye(len(e), dtype=bool)]
    return {"offdiag_mean": off.mean(), "offdiag_abs_mean": np.abs(off).mean(), "offdiag_abs_max": np.abs(off).max()}


@pytest.mark.parametrize("budget", [None, "tiny"])
def test_embedding_stats_blockwise_equal_full(budget):
    e = np.random.default_rng(0).normal(size=(57, 8))
    # "tiny": a budget that leaves room for 3 rows per block, so the blocks really split.
    max_bytes = None if budget is None else 57 * 8 * 8 + 16 * 57 * 3
    got = plots.embedding_similarity_stats(e, max_dense_bytes=max_bytes)
    want = _full_stats(e)
    for k, v in want.items():
        assert got[k] == pytest.approx(v, rel=1e-12, abs=1e-14), k
    assert got["rows"] == 57 and got["sampled"] is False and got["vocab_size"] == 57
    with pytest.raises(JaxattnError, match="budget"):
        plots.embedding_similarity_stats(e, max_dense_bytes=100)


def test_embedding_stats_large_v_is_sampled_and_small():
    """V = 20,000: no V x V allocation (tracemalloc sees numpy's buffers); the exact mean still exact."""
    V = 20_000
    e = np.random.default_rng(1).normal(size=(V, 8)).astype(np.float32)
    tracemalloc.start()
    got = plots.embedding_similarity_stats(e, max_rows=256)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < 40e6 < V * V * 4  # a float32 V x V alone would be 1.6 GB
    assert got["sampled"] is True and got["rows"] == 256
    en = e.astype(np.float64) / np.linalg.norm(e, axis=1, keepdims=True)
    s = en.sum(0)
    assert got["offdiag_mean"] == pytest.approx((s @ s - V) / (V * (V - 1)), rel=1e-6, abs=1e-9)
    # Random 8-d directions: E|cos| = 0.27 or so; the sample estimates it closely.
    ref = _full_stats(en[:400])["offdiag_abs_mean"]
    assert got["offdiag_abs_mean"] == pytest.approx(ref, rel=0.05)


def test_plot_embedding_similarity_no_v_squared(tmp_path):
    V = 6000
    e = np.random.default_rng(2).normal(size=(V, 16))
    vocab = [f"w{i}" for i in range(V)]
    tracemalloc.start()
    stats = plots.plot_embedding_similarity(tmp_path / "emb.png", e, vocab, label="test embeddings")
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < 100e6 < V * V * 8 / 2  # the old e @ e.T was 288 MB
    assert (tmp_path / "emb.png").stat().st_size > 1000 and stats["sampled"] is True


def _capture(monkeypatch) -> list:
    figs: list = []

    def keep(fig, path, **kwargs):
        figs.append(fig)
        Path(path).write_bytes(b"png")

    monkeypatch.setattr(attention_plots, "save_figure", keep)
    monkeypatch.setattr(plots, "_save", keep)
    return figs


def test_embedding_similarity_shows_every_small_token(monkeypatch, tmp_path):
    figs = _capture(monkeypatch)
    e = np.random.default_rng(3).normal(size=(105, 8))
    plots.plot_embedding_similarity(tmp_path / "e.png", e, [chr(33 + i) for i in range(105)], label="baseline E")
    ax = figs[0].axes[0]
    assert ax.get_images()[0].get_array().shape == (105, 105)
    assert len(ax.get_xticklabels()) == 105 and "baseline E" in ax.get_title() and "all 105 tokens" in ax.get_title()
    figs.clear()
    plots.plot_embedding_similarity(tmp_path / "e.png", np.ones((300, 4)) + np.eye(300, 4), None)
    assert figs[0].axes[0].get_images()[0].get_array().shape == (64, 64)
    assert "64 of 300 tokens" in figs[0].axes[0].get_title()


def _two_heads() -> tuple[np.ndarray, np.ndarray]:
    T = 6
    rng = np.random.default_rng(4)
    a = np.tril(rng.random((2, 3, T, T)) + 0.1)
    a /= a.sum(-1, keepdims=True)
    e = np.tril(rng.random((2, 3, T, T)))
    e /= e.sum(-1, keepdims=True)
    return a, e


def _panels_of(fig, num_heads: int, T: int, per_row: int = 4) -> list[np.ndarray]:
    """The drawn panels, cut out of the figure's one composite image with :func:`panel_layout`."""
    (image,) = [im for ax in fig.axes for im in ax.get_images()]
    canvas = np.ma.filled(image.get_array(), np.nan)
    shape, offsets = attention_plots.panel_layout(num_heads, T, per_row)
    assert canvas.shape == shape
    return [canvas[r : r + T, c : c + T] for r, c in offsets]


def test_plot_heads_absolute_scale_with_colour_bar(monkeypatch, tmp_path):
    figs = _capture(monkeypatch)
    a, e = _two_heads()
    tokens = list("abcdef")
    plots.plot_heads(tmp_path / "h.png", a, e, tokens, heads=[(0, 1), (1, 2)])
    fig = figs[0]
    assert len(fig.axes) == 2  # one composite image and one colour bar
    panels = _panels_of(fig, 2, 6)
    drawn = panels[1]  # actual of L0H1, unscaled probabilities
    np.testing.assert_allclose(drawn[np.tril_indices(6)], a[0, 1][np.tril_indices(6)])
    np.testing.assert_allclose(panels[2][np.tril_indices(6)], e[1, 2][np.tril_indices(6)])
    assert np.isnan(drawn[0, 5])  # above the diagonal: blank
    lo, hi = fig.axes[0].get_images()[0].get_clim()
    assert lo == 0.0 and hi == pytest.approx(max(a[0, 1].max(), a[1, 2].max(), e[0, 1].max(), e[1, 2].max()))
    figs.clear()
    plots.plot_heads(tmp_path / "h.png", a, e, tokens, heads=[(0, 0)], scaling="row")
    row = _panels_of(figs[0], 1, 6, 1)[1]
    np.testing.assert_allclose(np.nanmax(row, 1), 1.0)
    with pytest.raises(JaxattnError, match="layer 2"):
        plots.plot_heads(tmp_path / "h.png", a, e, tokens, heads=[(2, 0)])
    with pytest.raises(JaxattnError, match="scaling"):
        plots.plot_heads(tmp_path / "h.png", a, e, tokens, scaling="log")


def test_plot_head_path_and_axes(tmp_path):
    a, e = _two_heads()
    rec = {"layer": 0, "head": 1, "n": 1, "s": 1, "kl": None, "cosine": None, "argmax_match_tied": None}
    p = plots.plot_head(tmp_path / "one.png", a[0, 1], e[0, 1], list("abcdef"), 0, 1, record=rec)
    assert p == tmp_path / "one.png" and p.stat().st_size > 1000
    plt = attention_plots.pyplot()
    fig, axes = plt.subplots(1, 2)
    assert plots.plot_head(axes, a[0, 1], e[0, 1], None, 0, 1, mask=np.tril(np.ones((6, 6), bool)), record=rec) is None
    assert "n/a" in axes[1].get_title()  # a head with no queries: None metrics print n/a
    plt.close(fig)
    with pytest.raises(Exception, match=r"T T|\[T, T\]"):  # the type-check hook, or the function's own check
        plots.plot_head(tmp_path / "x.png", a[0], e[0, 1], None, 0, 1)


def test_parse_heads():
    assert plots.parse_heads("0:1, 3:2,0:1", 4, 4) == [(0, 1), (3, 2)]
    for bad, needle in (("0-1", "LAYER:HEAD"), ("4:0", "layer 4"), ("0:9", "head 9"), (",", "no head")):
        with pytest.raises(JaxattnError, match=needle):
            plots.parse_heads(bad, 4, 4)


def _records(L: int, H: int, max_s: int) -> list[dict]:
    recs = []
    for l in range(L):
        for h in range(H):
            v = 0.1 * (l + 1) if h <= max_s else 0.1 * (l + 1)
            recs.append(
                {"option": "x", "layer": l, "head": h, "n": min(l + 1, 2), "s": min(h, max_s)}
                | {m: v for m in ("kl", "cosine", "argmax_match", "argmax_match_tied", "entropy")}
            )
    return recs


def test_heatmaps_shared_range_repeats_and_none(monkeypatch, tmp_path):
    figs = _capture(monkeypatch)
    recs = _records(2, 6, 3)
    recs[0] |= {"kl": None, "cosine": None}  # a head with no queries
    assert plots.repeated_cells(recs) == {(0, 4), (0, 5), (1, 4), (1, 5)}
    ranges = plots.metric_ranges(recs + [{**recs[1], "kl": 7.0}])
    assert ranges["kl"] == (0.0, 7.0) and ranges["cosine"] == (0.0, 1.0)
    paths = plots.plot_metric_heatmaps(tmp_path, recs, prefix="hm", ranges=ranges)
    assert [p.name for p in paths][0] == "hm_kl.png"
    ax = figs[0].axes[0]
    assert ax.get_images()[0].get_clim() == (0.0, 7.0)  # the shared range, not this option's own max
    hatched = [p for p in ax.patches if p.get_hatch()]
    assert len(hatched) == 2  # one patch per run of repeated cells in a row
    assert sorted((p.get_x(), p.get_y(), p.get_width()) for p in hatched) == [(3.5, -0.5, 2), (3.5, 0.5, 2)]
    assert ax.texts[0].get_text() == "n/a"
    # Repeated cells whose value prints like their source head's carry no number: 2 rows x 4 heads are left.
    assert len(ax.texts) == 8


def test_heatmap_keeps_numbers_of_repeats_that_differ(monkeypatch, tmp_path):
    figs = _capture(monkeypatch)
    recs = _records(1, 6, 3)
    recs[5] |= {"cosine": 0.9}  # head 5 repeats head 3's table but scores differently (e.g. trained)
    plots.plot_metric_heatmaps(tmp_path, recs)
    cos = figs[1].axes[0]
    shown = {(round(t.get_position()[0]), t.get_text()) for t in cos.texts}
    assert (5, "0.90") in shown and all(h != 4 for h, _ in shown)


def test_tick_text_escapes_and_replaces_glyphs_the_fonts_lack():
    assert plots.tick_text("\n") == "\\n"  # a newline token shows as backslash-n
    assert plots.tick_text("a") == "a"
    assert plots.tick_text("\U0001f600") == "U+1F600"


def test_attention_grid_labels_edges_and_titles_clear_the_panel_above(monkeypatch, tmp_path):
    figs = _capture(monkeypatch)
    L, H, T, B = 12, 12, 32, 2
    rng = np.random.default_rng(0)
    attn = rng.random((B, L, H, T, T)).astype(np.float32)
    expected = rng.random((8, B, T, T)).astype(np.float32)
    mask = np.ones((8, B, T, T), bool)
    pair_index = np.array([[min(l, 1) * 4 + min(h, 3) for h in range(H)] for l in range(L)])
    recs = [
        {"layer": l, "head": h, "n": min(l + 1, 2), "s": min(h, 3), "kl": 0.5, "cosine": 0.7, "argmax_match_tied": 0.1}
        for l in range(L)
        for h in range(H)
    ]
    tokens = [chr(97 + i % 26) for i in range(T)]
    plots.plot_expected_vs_actual(tmp_path / "x.png", expected, mask, pair_index, attn, recs, tokens=tokens)
    fig = figs[0]
    panels = _panels_of(fig, 16, T)  # 4 layers x 4 distinct heads x (expected, actual)
    np.testing.assert_allclose(panels[1][np.tril_indices(T)], attn[0, 0, 0][np.tril_indices(T)], rtol=1e-6)
    ax = fig.axes[0]
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    _, offsets = attention_plots.panel_layout(16, T, 4)
    rows = sorted({r for r, _ in offsets})
    texts = [t for t in ax.texts if t.get_text() in tokens]
    # Token labels sit only below the bottom row (keys) and left of the first column (queries).
    below = [t for t in texts if t.get_rotation() == 90]
    left = [t for t in texts if t.get_rotation() == 0]
    assert len(below) == 8 * T and len(left) == 4 * T
    assert all(t.get_position()[1] >= rows[-1] + T - 0.5 for t in below)
    assert all(t.get_position()[0] < 0 for t in left)
    # No panel title overlaps the panels of the row above.
    titles = [
        t for t in ax.texts if t.get_text().startswith("L") and ("expected" in t.get_text() or "actual" in t.get_text())
    ]
    assert len(titles) == 32
    to_display = ax.transData.transform
    for t in titles:
        box = t.get_window_extent(renderer)
        row0 = min(rows, key=lambda r: abs(r - (t.get_position()[1] + 1.0)))
        if row0 == rows[0]:
            continue
        above = rows[rows.index(row0) - 1]
        bottom_of_above = to_display((0, above + T - 0.5))[1]  # display y grows upwards
        assert box.y1 < bottom_of_above, f"title {t.get_text()!r} overlaps the panel above"


def test_training_curves(tmp_path):
    curves = {
        "step": [1, 2, 3, 4],
        "loss": [1.0, 0.8, 0.7, 0.65],
        "eval_step": [0, 4],
        "eval_cosine": [[0.5, 0.4], [0.7, None]],
        "eval_argmax_match_tied": [[0.2, 0.1], [0.4, 0.3]],
    }
    p = plots.plot_training_curves(tmp_path / "tc.png", curves)
    assert p.stat().st_size > 1000
    with pytest.raises(JaxattnError, match="loss"):
        plots.plot_training_curves(tmp_path / "x.png", {"step": []})


def test_render_figures_isolates_failures(tmp_path):
    def boom():
        raise ValueError("bad\nthing")

    files, failures = plots.render_figures(
        [("a.png", lambda: tmp_path / "a.png"), ("b.png", boom), ("c", lambda: None)]
    )
    assert files == [tmp_path / "a.png"] and failures == ["b.png: ValueError: bad thing"]


def test_ablation_labels_say_added_removed_and_ceiling(monkeypatch, tmp_path):
    figs = _capture(monkeypatch)
    per = [0.5, 0.6]
    rows = [
        {"step": 0, "kind": "step", "ingredient": "seed baseline"},
        {"step": 1, "kind": "step", "ingredient": "token block"},
        {"step": 2, "kind": "variant", "ingredient": "- prep block"},
        {"step": 3, "kind": "ceiling", "ingredient": "oracle inputs"},
    ]
    rows = [r | {"cosine_mean": 0.5, "argmax_match_tied_mean": 0.4, "argmax_match_tied": per} for r in rows]
    plots.plot_ablation(tmp_path / "a.png", rows)
    bars, lines = figs[0].axes
    labels = [t.get_text() for t in bars.get_xticklabels()]
    assert labels == ["seed baseline", "+ token block", "\u2212 prep block", "ceiling: oracle inputs"]
    assert len(bars.lines) == 2  # separators before the variants and before the ceiling
    styles = {(ln.get_color(), ln.get_marker()) for ln in lines.get_lines()}
    assert len(styles) == 4  # every row has its own colour and marker
