"""Figures (matplotlib, Agg): the seed's expected-vs-actual panels, heatmaps, comparisons, diagnostics.

Outside the pure core: these functions only read results. Every PNG is written atomically.
Metric values of None (a head with no queries) are drawn as blank cells and printed as n/a.
The attention panels (:func:`plot_head`, :func:`plot_heads`, :func:`plot_expected_vs_actual`)
live in :mod:`jaxattn.output.attention_plots` and are re-exported here.

Nothing here is O(V^2) in the vocabulary size V: :func:`embedding_similarity_stats` works on
blocks of rows (all V rows when V <= ``max_rows``, else a fixed-seed sample of rows against
every column), sized by the memory budget.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from jaxattn.alignment import METRIC_NAMES
from jaxattn.counts import dense_budget
from jaxattn.errors import JaxattnError
from jaxattn.output.attention_plots import (
    SCALINGS,
    distinct_skip_heads,
    format_value,
    parse_heads,
    pick_layers,
    plot_expected_vs_actual,
    plot_head,
    plot_heads,
    pyplot,
    save_figure,
    tick_text,
)
from jaxattn.output.figure_pool import render_figures, returning
from jaxattn.typing import ArrayLike, Float

__all__ = [
    "METRIC_LABELS",
    "SCALINGS",
    "distinct_skip_heads",
    "embedding_similarity_stats",
    "heatmap_jobs",
    "metric_ranges",
    "parse_heads",
    "pick_layers",
    "plot_ablation",
    "plot_diagnostics",
    "plot_embedding_similarity",
    "plot_expected_vs_actual",
    "plot_head",
    "plot_heads",
    "plot_metric_heatmaps",
    "plot_options_comparison",
    "plot_training_curves",
    "render_figures",
    "repeated_cells",
    "returning",
    "tick_text",
]

METRIC_LABELS = {
    "kl": "KL(expected || actual)",
    "cosine": "cosine similarity",
    "argmax_match": "argmax match (strict)",
    "argmax_match_tied": "argmax match (tie-aware)",
    "entropy": "entropy / log(#keys)",
}

_plt = pyplot
_save = save_figure


def _num(v: Any) -> float:
    """A metric value as a float; None (no queries) becomes NaN."""
    return float("nan") if v is None else float(v)


def heatmap_jobs(
    out: Path,
    records: list[dict[str, Any]],
    *,
    prefix: str = "heatmap",
    ranges: dict[str, tuple[float, float]] | None = None,
) -> list[tuple[str, Callable[[], Any]]]:
    """:func:`plot_metric_heatmaps` as one ``(name, draw)`` job per metric (:func:`render_figures`).

    One job per figure, so that figure workers share them out.
    """
    ranges = ranges or metric_ranges(records)
    return [
        (
            f"{prefix}_{m}.png",
            functools.partial(plot_metric_heatmaps, out, records, prefix=prefix, ranges=ranges, metrics=(m,)),
        )
        for m in METRIC_NAMES
    ]


def metric_ranges(records: list[dict[str, Any]]) -> dict[str, tuple[float, float]]:
    """One colour range per metric over all ``records`` (every option): [0, 1], KL [0, its max].

    Args:
        records: metric records of one or more options (None values are skipped).

    Returns:
        ``{metric: (lo, hi)}``.
    """
    out = {}
    for m in METRIC_NAMES:
        vals = np.array([_num(r.get(m)) for r in records], np.float64)
        finite = vals[np.isfinite(vals)]
        out[m] = (0.0, max(float(finite.max()) if finite.size else 0.0, 1e-6)) if m == "kl" else (0.0, 1.0)
    return out


def repeated_cells(records: list[dict[str, Any]]) -> set[tuple[int, int]]:
    """The (layer, head) cells whose (n, s) table equals an earlier head's in the same layer.

    The layout gives head h the skip s = min(h, max_s), so the heads past max_s repeat one table.

    Args:
        records: one option's records (``layer``, ``head``, ``n``, ``s``).

    Returns:
        The repeated cells (empty when the records carry no ``n``/``s``).
    """
    return set(_repeat_sources(records))


def _repeat_sources(records: list[dict[str, Any]]) -> dict[tuple[int, int], int]:
    """``{(layer, head): first head of that layer with the same (n, s)}`` for every repeated cell."""
    first: dict[tuple[Any, Any, Any], int] = {}
    out: dict[tuple[int, int], int] = {}
    for r in sorted(records, key=lambda r: (r["layer"], r["head"])):
        if "n" not in r or "s" not in r:
            continue
        key = (r["layer"], r["n"], r["s"])
        if key in first:
            out[(r["layer"], r["head"])] = first[key]
        else:
            first[key] = r["head"]
    return out


def _annotate_heatmap(ax: Any, grid: np.ndarray, sources: dict[tuple[int, int], int], lo: float, hi: float) -> None:
    """Writes each cell's value and hatches the repeated cells (one patch per run of them in a row).

    A repeated cell whose value prints the same as its source head's is left without a number: the
    hatch says it repeats, and 108 identical labels at the seed preset cost most of the drawing time.
    """
    from matplotlib.patches import Rectangle

    L, H = grid.shape
    for l in range(L):
        run_start = None
        for h in range(H + 1):
            repeated = (l, h) in sources
            if run_start is not None and not repeated:
                ax.add_patch(
                    Rectangle(
                        (run_start - 0.5, l - 0.5), h - run_start, 1, fill=False, hatch="///", edgecolor="0.55", lw=0
                    )
                )
                run_start = None
            if h == H:
                break
            if repeated and run_start is None:
                run_start = h
            v = grid[l, h]
            text = format_value(v, ".2f")
            if repeated and text == format_value(grid[l, sources[(l, h)]], ".2f"):
                continue
            dark = not np.isfinite(v) or (v - lo) < 0.5 * (hi - lo)
            colour = "k" if not np.isfinite(v) else ("w" if dark else "k")
            ax.text(h, l, text, ha="center", va="center", fontsize=6, color=colour)


def plot_metric_heatmaps(
    out: Path,
    records: list[dict[str, Any]],
    *,
    prefix: str = "heatmap",
    ranges: dict[str, tuple[float, float]] | None = None,
    metrics: Sequence[str] = METRIC_NAMES,
) -> list[Path]:
    """One layer x head heatmap per metric (annotated), for one option's records.

    Cells that repeat an earlier head's (n, s) table are hatched; None values are blank (n/a).

    Args:
        out: output directory.
        records: one option's records.
        prefix: file names ``{prefix}_{metric}.png``.
        ranges: ``{metric: (lo, hi)}`` colour ranges (:func:`metric_ranges` of every option, so that
            colours compare across options); default: this option's own.
        metrics: which metrics to draw (default: all of ``METRIC_NAMES``; one each makes one figure job
            per metric, for figure workers).

    Returns:
        The paths written.
    """
    plt = _plt()
    L = max(r["layer"] for r in records) + 1
    H = max(r["head"] for r in records) + 1
    ranges = ranges or metric_ranges(records)
    sources = _repeat_sources(records)
    repeats = set(sources)
    unknown = [m for m in metrics if m not in METRIC_LABELS]
    if unknown:
        raise JaxattnError(f"unknown heatmap metric(s) {unknown}; expected some of {list(METRIC_NAMES)}")
    paths = []
    for m in metrics:
        grid = np.full((L, H), np.nan)
        for r in records:
            grid[r["layer"], r["head"]] = _num(r.get(m))
        w, h_in = 0.55 * H + 2.5, 0.45 * L + 1.7
        fig = plt.figure(figsize=(w, h_in))
        # Fixed margins in inches (no tight bbox: it costs a second draw of 144 annotations).
        ax = fig.add_axes((0.8 / w, 0.75 / h_in, 1 - 2.3 / w, 1 - 1.2 / h_in))
        cax = fig.add_axes((1 - 1.3 / w, 0.75 / h_in, 0.18 / w, 1 - 1.2 / h_in))
        lo, hi = ranges[m]
        cmap = plt.get_cmap("magma" if m == "kl" else "viridis").with_extremes(bad="0.85")
        im = ax.imshow(grid, cmap=cmap, vmin=lo, vmax=hi, aspect="auto")
        _annotate_heatmap(ax, grid, sources, lo, hi)
        note = (
            f"; hatched: repeats an earlier head's (n, s), blank when equal ({len(repeats)} of {L * H})"
            if repeats
            else ""
        )
        ax.set_xlabel(f"head (s = min(head, max_s)){note}", fontsize=8)
        ax.set_ylabel("layer (n = min(layer+1, max_n))")
        ax.set_xticks(range(H))
        ax.set_yticks(range(L))
        ax.set_title(f"{METRIC_LABELS[m]} — {records[0]['option']}", fontsize=10)
        fig.colorbar(im, cax=cax)
        p = out / f"{prefix}_{m}.png"
        _save(fig, p, tight=False)
        paths.append(p)
    return paths


def _similarity_rows(V: int, max_rows: int, seed: int) -> np.ndarray:
    """All row indices when V <= max_rows, else a sorted fixed-seed sample of max_rows of them."""
    if V <= max_rows:
        return np.arange(V)
    return np.sort(np.random.default_rng(seed).choice(V, size=max_rows, replace=False))


def embedding_similarity_stats(
    embed: Float[ArrayLike, "V D"],
    *,
    max_rows: int = 1024,
    seed: int = 0,
    max_dense_bytes: int | None = None,
) -> dict[str, Any]:
    """Off-diagonal statistics of the embeddings' cosine similarity, without the V x V matrix.

    The mean is exact for any V (from ``|sum_i e_i|^2``). The |cos| statistics cover every pair
    when V <= ``max_rows``; otherwise they cover ``max_rows`` rows drawn with ``seed`` against all V
    columns (``sampled`` is then true, and the max is the max over those rows). The rows are
    processed in blocks of at most 16 MiB (and within the memory budget).

    Args:
        embed: float [V, D] embeddings (rows are normalised here).
        max_rows: rows to use at most.
        seed: the sampling seed.
        max_dense_bytes: memory budget (default: :func:`jaxattn.counts.dense_budget`).

    Returns:
        ``offdiag_mean``, ``offdiag_abs_mean``, ``offdiag_abs_max``, ``rows``, ``sampled``, ``vocab_size``.

    Raises:
        JaxattnError: the budget cannot hold the normalised embeddings and one row block.
    """
    e = np.asarray(embed, np.float64)
    V = e.shape[0]
    e = np.ascontiguousarray(e / np.maximum(np.linalg.norm(e, axis=1, keepdims=True), 1e-12))
    budget = dense_budget(max_dense_bytes)
    if e.nbytes + 8 * 2 * V > budget:
        raise JaxattnError(f"embedding statistics need {e.nbytes + 16 * V} bytes, over the budget of {budget}")
    rows = _similarity_rows(V, max_rows, seed)
    block = int(max(1, min(len(rows), min(16 * 1024**2, budget - e.nbytes) // (8 * 2 * max(V, 1)))))
    total, abs_total, abs_max, count = 0.0, 0.0, 0.0, 0
    for start in range(0, len(rows), block):
        idx = rows[start : start + block]
        sim = np.ascontiguousarray(e[idx]) @ e.T  # [b, V]
        sim[np.arange(len(idx)), idx] = np.nan  # the diagonal
        a = np.abs(sim)
        abs_total += float(np.nansum(a))
        abs_max = max(abs_max, float(np.nanmax(a, initial=0.0)))
        count += sim.size - len(idx)
        total += float(np.nansum(sim))
    s = e.sum(0)
    exact_sum = float(s @ s - np.sum(e * e))
    pairs = V * (V - 1)
    return {
        "offdiag_mean": exact_sum / pairs if pairs else 0.0,
        "offdiag_abs_mean": abs_total / count if count else 0.0,
        "offdiag_abs_max": abs_max,
        "rows": int(len(rows)),
        "sampled": bool(len(rows) < V),
        "vocab_size": int(V),
    }


def plot_embedding_similarity(
    path: Path,
    embed: Float[ArrayLike, "V D"],
    vocab: list[str] | None = None,
    max_tokens: int = 128,
    *,
    label: str = "token embeddings E",
    seed: int = 0,
    stats: dict[str, Any] | None = None,
    max_dense_bytes: int | None = None,
) -> dict[str, Any]:
    """Cosine-similarity matrix of the token embeddings, with off-diagonal statistics.

    Draws every token when V <= ``max_tokens``; otherwise ``min(max_tokens, 64)`` tokens drawn with ``seed``
    (sorted by id), and the title says so. Nothing V x V is formed (:func:`embedding_similarity_stats`).

    Args:
        path: output PNG.
        embed: float [V, D].
        vocab: token strings for tick labels.
        max_tokens: draw at most this many tokens.
        label: which embedding this is (the title), e.g. "baseline token embeddings E (random unit Gaussian)".
        seed: the sampling seed (tokens drawn and statistic rows).
        stats: precomputed :func:`embedding_similarity_stats` (default: computed here).
        max_dense_bytes: memory budget of the statistics.

    Returns:
        The statistics (:func:`embedding_similarity_stats`).
    """
    plt = _plt()
    e = np.asarray(embed, np.float64)
    V = e.shape[0]
    if stats is None:
        stats = embedding_similarity_stats(e, seed=seed, max_dense_bytes=max_dense_bytes)
    ids = _similarity_rows(V, max_tokens if V <= max_tokens else min(max_tokens, 64), seed)  # legible labels
    sub = e[ids] / np.maximum(np.linalg.norm(e[ids], axis=1, keepdims=True), 1e-12)
    k = len(ids)
    square = max(6.0, 0.1 * k)  # about 0.1 inch per token, so that every tick label is legible
    labels = [tick_text(vocab[i]) for i in ids] if vocab is not None else []
    size = max(5.0, min(8.0, 0.7 * 72.0 * square / k))
    # Fixed margins in inches, wide enough for the longest label (no tight bbox: a second draw).
    margin = 0.35 + 0.62 * size / 72.0 * max((len(t) for t in labels), default=0)
    width, height = margin + square + 1.5, margin + square + 0.8
    fig = plt.figure(figsize=(width, height))
    ax = fig.add_axes((margin / width, margin / height, square / width, square / height))
    cax = fig.add_axes(((margin + square + 0.3) / width, margin / height, 0.2 / width, square / height))
    im = ax.imshow(sub @ sub.T, cmap="RdBu_r", vmin=-1, vmax=1, interpolation="nearest")
    if labels:
        ax.set_xticks(range(k), labels, fontsize=size, rotation=90, fontfamily="monospace")
        ax.set_yticks(range(k), labels, fontsize=size, fontfamily="monospace")
    which = f"all {V} tokens" if k == V else f"{k} of {V} tokens (random sample, seed {seed}, in id order)"
    over = f"{stats['rows']} sampled rows x all tokens" if stats.get("sampled") else "all pairs"
    ax.set_title(
        f"cosine similarity of the {label}: {which}\noff-diagonal mean |cos| {stats['offdiag_abs_mean']:.3f}, "
        f"max |cos| {stats['offdiag_abs_max']:.3f} ({over})",
        fontsize=10,
    )
    fig.colorbar(im, cax=cax, label="cosine")
    _save(fig, path, tight=False)
    return stats


def plot_training_curves(path: Path, curves: dict[str, Any], *, title: str = "Option 4 training") -> Path:
    """Option 4's training curves: the loss per step, and the held-out alignment at each evaluation.

    Args:
        path: output PNG.
        curves: ``step``, ``loss`` and, when evaluated, ``eval_step`` with ``eval_cosine`` /
            ``eval_argmax_match_tied`` (per evaluation: one value per layer), as in Option 4's
            ``extra["curves"]``.
        title: figure title.

    Returns:
        ``path``.

    Raises:
        JaxattnError: no ``loss`` curve.
    """
    loss = np.asarray(curves.get("loss", []), np.float64).ravel()
    if loss.size == 0:
        raise JaxattnError("the training curves have no 'loss' values to plot")
    plt = _plt()
    steps = np.asarray(curves.get("step", []))
    steps = steps if steps.size == loss.size else np.arange(1, loss.size + 1)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.4))
    ax1.plot(steps, loss, color="#1f77b4", linewidth=1.4)
    ax1.set_xlabel("training step")
    ax1.set_ylabel("training loss")
    ax1.grid(True, alpha=0.3)
    ax1.set_title("loss per step", fontsize=10)
    at = list(np.asarray(curves.get("eval_step", [])).ravel())
    for i, (key, lab) in enumerate((("eval_cosine", "cosine"), ("eval_argmax_match_tied", "tied argmax match"))):
        vals = list(curves.get(key, []))
        if not at or len(vals) != len(at):
            continue
        per = np.array([[_num(v) for v in np.atleast_1d(row)] for row in vals], np.float64)  # [evals, layers]
        colour, marker, ls = _OPTION_STYLES[i + 1]
        ax2.plot(at, np.nanmean(per, 1), color=colour, marker=marker, linestyle=ls, label=f"{lab} (mean over layers)")
        ax2.fill_between(at, np.nanmin(per, 1), np.nanmax(per, 1), color=colour, alpha=0.12)
    ax2.set_xlabel("training step")
    ax2.set_ylabel("held-out alignment")
    ax2.set_ylim(0, 1.02)
    ax2.grid(True, alpha=0.3)
    if ax2.lines:
        ax2.legend(fontsize=8)
    ax2.set_title("held-out alignment at each evaluation (band: min-max over layers)", fontsize=10)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    _save(fig, path)
    return path


#: Line styles that stay distinguishable in grey print: (colour, marker, linestyle).
_OPTION_STYLES = (
    ("#444444", "o", "-"),
    ("#1f77b4", "s", "-"),
    ("#d62728", "^", "--"),
    ("#2ca02c", "D", "-."),
    ("#9467bd", "v", ":"),
    ("#ff7f0e", "P", "-"),
    ("#8c564b", "X", "--"),
)


def plot_options_comparison(path: Path, layer_rows: list[dict[str, Any]], options: list[str]) -> None:
    """Per-layer cosine and tied argmax match of every option (mean over heads, band = head range).

    Args:
        path: output PNG.
        layer_rows: :func:`jaxattn.pipeline.layer_summary` rows of all options.
        options: option labels, in legend order.
    """
    plt = _plt()
    panels = (
        ("cosine", "cosine similarity"),
        ("argmax_match_tied", "argmax match (tie-aware)"),
        ("entropy", "entropy / log(#keys)"),
    )
    fig, axes = plt.subplots(1, len(panels), figsize=(6.0 * len(panels), 4.6), squeeze=False)
    for ax, (m, label) in zip(axes[0], panels, strict=True):
        for i, opt in enumerate(options):
            rows = sorted((r for r in layer_rows if r["option"] == opt), key=lambda r: r["layer"])
            if not rows:
                continue
            colour, marker, ls = _OPTION_STYLES[i % len(_OPTION_STYLES)]
            x = np.array([r["layer"] for r in rows])
            y = np.array([_num(r.get(m)) for r in rows])
            ax.plot(x, y, color=colour, marker=marker, linestyle=ls, label=opt, markersize=5, linewidth=1.6)
            lo, hi = ([_num(r.get(f"{m}_{b}")) for r in rows] for b in ("min", "max"))
            ax.fill_between(x, lo, hi, color=colour, alpha=0.12)
        L = max((r["layer"] for r in layer_rows), default=0) + 1
        ax.set_xticks(range(L))
        ax.set_xlabel("layer (n = min(layer+1, max_n))")
        ax.set_ylabel(label)
        ax.set_ylim(0.0, 1.02)
        ax.grid(True, alpha=0.3)
        ax.set_title(f"{label}: mean over heads (band: min-max over heads)", fontsize=9)
    axes[0][0].legend(fontsize=8, loc="lower left")
    fig.suptitle("Options compared on the same held-out sequences", fontsize=11)
    fig.tight_layout()
    _save(fig, path)


def _ablation_label(row: dict[str, Any]) -> str:
    """``seed baseline``, ``+ token block`` for a cumulative step, ``\u2212 prep block`` for a variant, the ceiling as is."""
    name = str(row["ingredient"])
    kind = str(row.get("kind", "step"))
    if kind == "variant":
        return "\u2212 " + name.lstrip("-+ ")
    if kind == "ceiling":
        return f"ceiling: {name}"
    return name if row.get("step") == 0 else "+ " + name


def plot_ablation(path: Path, rows: list[dict[str, Any]]) -> None:
    """The ablation: overall cosine / tied match per cumulative step, and per-layer tied match per step.

    Args:
        path: output PNG.
        rows: ablation rows with ``step``, ``ingredient``, ``{metric}_mean`` and per-layer lists
            ``cosine`` / ``argmax_match_tied``.
    """
    plt = _plt()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 4.8))
    labels = [_ablation_label(r) for r in rows]
    x = np.arange(len(rows))
    w = 0.38
    bar_specs = ((-w / 2, "cosine", "cosine", "#1f77b4"), (w / 2, "argmax_match_tied", "tied argmax", "#d62728"))
    for off, m, lab, colour in bar_specs:
        vals = [_num(r.get(f"{m}_mean")) for r in rows]
        bars = ax1.bar(x + off, vals, w, label=lab, color=colour)
        for b, v in zip(bars, vals, strict=True):
            y = v + 0.01 if np.isfinite(v) else 0.01
            ax1.text(b.get_x() + b.get_width() / 2, y, format_value(v, ".2f"), ha="center", va="bottom", fontsize=7)
    ax1.set_xticks(x)
    ax1.set_xticklabels(labels, rotation=30, ha="right", fontsize=8)
    ax1.set_ylim(0, 1.25)
    ax1.set_ylabel("mean over all heads")
    ax1.legend(fontsize=8, loc="upper left", ncol=2)
    kinds = [str(r.get("kind", "step")) for r in rows]
    for i in range(1, len(rows)):
        if kinds[i] != kinds[i - 1]:  # a separator before the Option 3 variants and before the ceiling
            ax1.axvline(i - 0.5, color="0.5", linestyle="--", linewidth=0.8)
    ax1.set_title(
        "ablation: cumulative steps, then Option 3 with one part removed (\u2212), then the ceiling", fontsize=10
    )
    styles = list(_OPTION_STYLES) + [("#e377c2", "*", ":"), ("#17becf", "h", "-."), ("#bcbd22", "d", "--")]
    for i, r in enumerate(rows):
        per = r.get("argmax_match_tied")
        if isinstance(per, list) and per:
            colour, marker, ls = styles[i % len(styles)]
            ax2.plot(
                range(len(per)),
                [_num(v) for v in per],
                color=colour,
                marker=marker,
                linestyle=ls,
                label=labels[i],
                markersize=4,
            )
    ax2.set_xlabel("layer")
    ax2.set_xticks(range(max((len(r.get("argmax_match_tied") or []) for r in rows), default=0)))
    ax2.set_ylabel("tied argmax match (mean over heads)")
    ax2.set_ylim(0, 1.02)
    ax2.grid(True, alpha=0.3)
    ax2.legend(fontsize=7)
    ax2.set_title("per layer", fontsize=10)
    fig.tight_layout()
    _save(fig, path)


def plot_diagnostics(path: Path, rows: list[dict[str, Any]], diag: dict[str, Any]) -> None:
    """Four per-layer panels: score spread, token identity, residual norms, and the counterfactuals.

    Args:
        path: output PNG.
        rows: :func:`jaxattn.diagnostics.summary_rows`.
        diag: the full diagnosis (for the needed logit range and the variant names).
    """
    plt = _plt()
    x = np.array([r["layer"] for r in rows])
    fig, axes = plt.subplots(2, 2, figsize=(13, 9))
    ax = axes[0, 0]
    ax.plot(x, [max(r["row_range"], 1e-3) for r in rows], "o-", label="as run (std-0.01 weights)")
    ax.plot(x, [max(r["raw_row_range"], 1e-3) for r in rows], "s--", label="un-normalised weights, same inputs")
    need = [n["median_range"] for n in diag.get("needed_logit_range", [])]
    if need:
        ax.axhline(float(np.median(need)), color="k", linestyle=":", label="needed by the expected attention (median)")
    ax.set_yscale("log")
    ax.margins(y=0.15)
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    ax.yaxis.set_major_locator(LogLocator(base=10.0, subs=(1.0, 2.0, 5.0)))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.yaxis.set_minor_formatter(NullFormatter())
    ax.set_ylabel("within-row max-min of q.k/sqrt(K) (nats)")
    ax.set_title("score spread per layer", fontsize=10)
    ax.legend(fontsize=8)
    ax = axes[0, 1]
    ax.plot(x, [r["token_cosine"] for r in rows], "o-", label="cos(LN(x_i), LN(E[t_i]))")
    ax.plot(x, [r["common_direction_energy"] for r in rows], "s--", label="position-invariant energy share")
    ax.plot(x, [r["target_r2"] for r in rows], "^:", label="scores' within-row R² on M_r")
    ax.set_ylim(0, 1.05)
    ax.set_title("what the query input of each layer carries", fontsize=10)
    ax.legend(fontsize=8)
    ax = axes[1, 0]
    for key, lab, st in (
        ("residual_norm", "|x| entering the layer", "o-"),
        ("attn_out_norm", "|attention output|", "s--"),
        ("mlp_out_norm", "|MLP output|", "^:"),
    ):
        ax.plot(x, [max(r[key], 1e-6) for r in rows], st, label=lab)
    ax.set_yscale("log")
    ax.set_title("residual stream norms (token embeddings have norm 1)", fontsize=10)
    ax.legend(fontsize=8)
    ax = axes[1, 1]
    variants = list(diag.get("counterfactuals", {}))
    for i, name in enumerate(variants):
        colour, marker, ls = _OPTION_STYLES[i % len(_OPTION_STYLES)]
        ax.plot(x, [r.get(f"tied_{name}", np.nan) for r in rows], color=colour, marker=marker, linestyle=ls, label=name)
    ax.set_ylim(0, 1.02)
    ax.set_ylabel("tied argmax match (mean over heads)")
    ax.set_title("counterfactuals: one suspected cause switched off", fontsize=10)
    ax.legend(fontsize=8)
    for a in axes.flat:
        a.set_xlabel("layer")
        a.set_xticks(x)
        a.grid(True, alpha=0.3)
    fig.suptitle("Root-cause diagnostics of the seed derivation", fontsize=11)
    fig.tight_layout()
    _save(fig, path)
