"""Figures (matplotlib, Agg): the seed's expected-vs-actual panels, heatmaps, comparisons, diagnostics.

Outside the pure core: these functions only read results. Every PNG is written atomically.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from jaxattn.alignment import METRIC_NAMES
from jaxattn.output.files import atomic_open
from jaxattn.typing import ArrayLike, Bool, Float, Int

__all__ = [
    "METRIC_LABELS",
    "distinct_skip_heads",
    "pick_layers",
    "plot_ablation",
    "plot_diagnostics",
    "plot_embedding_similarity",
    "plot_expected_vs_actual",
    "plot_metric_heatmaps",
    "plot_options_comparison",
]

METRIC_LABELS = {
    "kl": "KL(expected || actual)",
    "cosine": "cosine similarity",
    "argmax_match": "argmax match (strict)",
    "argmax_match_tied": "argmax match (tie-aware)",
    "entropy": "entropy / log(#keys)",
}


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: Path) -> None:
    with atomic_open(path, "wb") as f:
        fig.savefig(f, format="png", dpi=110, bbox_inches="tight")
    _plt().close(fig)


def pick_layers(num_layers: int, k: int = 4) -> list[int]:
    """Up to ``k`` representative layers: first, second, middle, last."""
    cand = [0, 1, num_layers // 2, num_layers - 1]
    out: list[int] = []
    for c in cand:
        if 0 <= c < num_layers and c not in out:
            out.append(c)
    return out[:k]


def plot_expected_vs_actual(
    path: Path,
    expected: Float[ArrayLike, "P B T T"],
    mask: Bool[ArrayLike, "P B T T"],
    pair_index: Int[ArrayLike, "L H"],
    attn: Float[ArrayLike, "B L H T T"],
    records: list[dict[str, Any]],
    *,
    seq: int = 0,
    tokens: list[str] | None = None,
    title: str = "",
    max_positions: int = 32,
) -> None:
    """The seed's side-by-side figure: expected | actual for representative layers and heads.

    Rows are layers (first, second, middle, last); column pairs are the heads with
    distinct skips s (the seed layout repeats s = max_s for the other heads).

    Args:
        path: output PNG.
        expected: float32 [P, B, T, T].
        mask: bool [P, B, T, T].
        pair_index: int [L, H].
        attn: float32 [B, L, H, T, T].
        records: metric records (to annotate each panel).
        seq: which sequence to draw.
        tokens: optional token strings of that sequence (tick labels).
        title: figure title.
        max_positions: draw the first this many positions (panel metrics cover all).
    """
    plt = _plt()
    L, H = pair_index.shape
    layers = pick_layers(L)
    heads = distinct_skip_heads(pair_index)[:4]
    rec = {(r["layer"], r["head"]): r for r in records}
    # Show at most 32 positions (the seed's sequence length) so tokens stay legible, and
    # scale each row to its own maximum: early queries have few keys and would swamp the colours.
    T = min(attn.shape[-1], max_positions)
    fig, axes = plt.subplots(
        len(layers), 2 * len(heads), figsize=(3.3 * 2 * len(heads), 3.4 * len(layers)), squeeze=False
    )
    causal = np.tril(np.ones((T, T), bool))
    labels = [repr(t)[1:-1] for t in tokens[:T]] if tokens is not None else None
    for i, l in enumerate(layers):
        for j, h in enumerate(heads):
            p = int(pair_index[l, h])
            e = np.where(mask[p, seq, :T, :T], expected[p, seq, :T, :T], np.nan)
            a = np.where(causal, attn[seq, l, h, :T, :T], np.nan)
            r = rec.get((l, h), {})
            for k, (img, lab) in enumerate(((e, "expected"), (a, "actual"))):
                ax = axes[i, 2 * j + k]
                _draw_row_scaled(ax, img, labels)
                sub = f"L{l}H{h} (n={r.get('n', '?')}, s={r.get('s', '?')}) {lab}"
                if lab == "actual" and r:
                    sub += f"\ncos {r['cosine']:.2f}  tied {r['argmax_match_tied']:.0%}  KL {r['kl']:.2f}"
                ax.set_title(sub, fontsize=8)
                if k == 0 and j == 0:
                    ax.set_ylabel("query position i")
    fig.suptitle(
        title
        or "Expected (from counts) vs actual attention; key j on x, query i on y; each row scaled to its max; "
        "blank = masked",
        fontsize=11,
    )
    fig.tight_layout()
    _save(fig, path)


def distinct_skip_heads(pair_index: Int[ArrayLike, "L H"]) -> list[int]:
    """The first head of each distinct table in layer 0 (the seed layout repeats s = max_s for the rest).

    Args:
        pair_index: int [L, H] table index of each head.

    Returns:
        Head indices, in order.
    """
    heads: list[int] = []
    seen: set[int] = set()
    for h in range(pair_index.shape[1]):
        p = int(pair_index[0, h])
        if p not in seen:
            seen.add(p)
            heads.append(h)
    return heads


def _draw_row_scaled(ax: Any, img: np.ndarray, labels: list[str] | None) -> None:
    """One [T, T] panel, each row scaled to its own maximum (NaN cells blank), with token ticks."""
    with np.errstate(invalid="ignore", divide="ignore"):
        rmax = np.nanmax(np.where(np.isfinite(img), img, -np.inf), axis=1, keepdims=True)
        shown = img / np.where(rmax > 0, rmax, 1.0)
    ax.imshow(shown, cmap="viridis", vmin=0, vmax=1, interpolation="nearest")
    if labels is not None:
        ax.set_xticks(range(len(labels)))
        ax.set_xticklabels(labels, fontsize=5, rotation=90)
        ax.set_yticks(range(len(labels)))
        ax.set_yticklabels(labels, fontsize=5)
    else:
        ax.set_xticks([])
        ax.set_yticks([])


def plot_metric_heatmaps(out: Path, records: list[dict[str, Any]], *, prefix: str = "heatmap") -> list[Path]:
    """One layer x head heatmap per metric (annotated), for one option's records."""
    plt = _plt()
    L = max(r["layer"] for r in records) + 1
    H = max(r["head"] for r in records) + 1
    paths = []
    for m in METRIC_NAMES:
        grid = np.full((L, H), np.nan)
        for r in records:
            grid[r["layer"], r["head"]] = r[m]
        fig, ax = plt.subplots(figsize=(0.55 * H + 2.5, 0.45 * L + 1.5))
        lo, hi = (0.0, 1.0) if m != "kl" else (0.0, max(float(np.nanmax(grid)), 1e-6))
        im = ax.imshow(grid, cmap="magma" if m == "kl" else "viridis", vmin=lo, vmax=hi, aspect="auto")
        for l in range(L):
            for h in range(H):
                v = grid[l, h]
                ax.text(
                    h,
                    l,
                    f"{v:.2f}",
                    ha="center",
                    va="center",
                    fontsize=6,
                    color="w" if (v - lo) < 0.5 * (hi - lo) else "k",
                )
        ax.set_xlabel("head (s = min(head, max_s))")
        ax.set_ylabel("layer (n = min(layer+1, max_n))")
        ax.set_xticks(range(H))
        ax.set_yticks(range(L))
        ax.set_title(f"{METRIC_LABELS[m]} — {records[0]['option']}", fontsize=10)
        fig.colorbar(im, ax=ax)
        p = out / f"{prefix}_{m}.png"
        _save(fig, p)
        paths.append(p)
    return paths


def plot_embedding_similarity(
    path: Path, embed: Float[ArrayLike, "V D"], vocab: list[str] | None = None, max_tokens: int = 96
) -> dict[str, float]:
    """Cosine-similarity matrix of the token embeddings, with off-diagonal statistics.

    Args:
        path: output PNG.
        embed: float [V, D].
        vocab: token strings for tick labels.
        max_tokens: draw at most this many tokens (the first ones).

    Returns:
        Off-diagonal statistics: mean, mean |.|, max |.| of the cosine similarity.
    """
    plt = _plt()
    e = np.asarray(embed, np.float64)
    e = e / np.maximum(np.linalg.norm(e, axis=1, keepdims=True), 1e-12)
    sim = e @ e.T
    off = sim[~np.eye(sim.shape[0], dtype=bool)]
    stats = {
        "offdiag_mean": float(off.mean()) if off.size else 0.0,
        "offdiag_abs_mean": float(np.abs(off).mean()) if off.size else 0.0,
        "offdiag_abs_max": float(np.abs(off).max()) if off.size else 0.0,
    }
    k = min(max_tokens, sim.shape[0])
    fig, ax = plt.subplots(figsize=(8, 7))
    im = ax.imshow(sim[:k, :k], cmap="RdBu_r", vmin=-1, vmax=1)
    if vocab is not None and k <= 100:
        labels = [repr(t)[1:-1] for t in vocab[:k]]
        ax.set_xticks(range(k))
        ax.set_xticklabels(labels, fontsize=5, rotation=90)
        ax.set_yticks(range(k))
        ax.set_yticklabels(labels, fontsize=5)
    ax.set_title(
        f"embedding cosine similarity (first {k} tokens)\noff-diagonal mean |cos| {stats['offdiag_abs_mean']:.3f}, max {stats['offdiag_abs_max']:.3f}",
        fontsize=10,
    )
    fig.colorbar(im, ax=ax)
    _save(fig, path)
    return stats


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
            y = np.array([r[m] for r in rows])
            ax.plot(x, y, color=colour, marker=marker, linestyle=ls, label=opt, markersize=5, linewidth=1.6)
            ax.fill_between(x, [r[f"{m}_min"] for r in rows], [r[f"{m}_max"] for r in rows], color=colour, alpha=0.12)
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


def plot_ablation(path: Path, rows: list[dict[str, Any]]) -> None:
    """The ablation: overall cosine / tied match per cumulative step, and per-layer tied match per step.

    Args:
        path: output PNG.
        rows: ablation rows with ``step``, ``ingredient``, ``{metric}_mean`` and per-layer lists
            ``cosine`` / ``argmax_match_tied``.
    """
    plt = _plt()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 4.8))
    labels = [("" if r["step"] == 0 else "+ ") + str(r["ingredient"]) for r in rows]
    x = np.arange(len(rows))
    w = 0.38
    bar_specs = ((-w / 2, "cosine", "cosine", "#1f77b4"), (w / 2, "argmax_match_tied", "tied argmax", "#d62728"))
    for off, m, lab, colour in bar_specs:
        vals = [r.get(f"{m}_mean", np.nan) for r in rows]
        bars = ax1.bar(x + off, vals, w, label=lab, color=colour)
        for b, v in zip(bars, vals, strict=True):
            ax1.text(b.get_x() + b.get_width() / 2, v + 0.01, f"{v:.2f}", ha="center", va="bottom", fontsize=7)
    ax1.set_xticks(x)
    ax1.set_xticklabels(labels, rotation=30, ha="right", fontsize=8)
    ax1.set_ylim(0, 1.1)
    ax1.set_ylabel("mean over all heads")
    ax1.legend(fontsize=8)
    ax1.set_title("cumulative ablation (each bar adds one ingredient)", fontsize=10)
    for i, r in enumerate(rows):
        per = r.get("argmax_match_tied")
        if isinstance(per, list) and per:
            colour, marker, ls = _OPTION_STYLES[i % len(_OPTION_STYLES)]
            ax2.plot(range(len(per)), per, color=colour, marker=marker, linestyle=ls, label=labels[i], markersize=4)
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
