"""Attention figures (matplotlib, Agg): expected | actual panels of one head or a chosen set of heads.

Re-exported by :mod:`jaxattn.output.plots`. Axes: T positions (key j on x, query i on y),
L layers, H heads, P count tables, B sequences.

Scaling. ``scaling="absolute"`` (the default) draws attention probabilities on one linear colour
range shared by every panel of the figure, from 0 to the largest probability drawn, with a colour
bar. ``scaling="row"`` divides each query row by its own maximum (the seed's figure): it shows
where each row peaks, but near-uniform rows then look as bright as peaked ones. Masked cells
(no expectation, or above the causal diagonal) are drawn blank.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from jaxattn.errors import JaxattnError
from jaxattn.output.files import atomic_open
from jaxattn.typing import ArrayLike, Bool, Float, Int

__all__ = [
    "SCALINGS",
    "distinct_skip_heads",
    "format_value",
    "panel_layout",
    "parse_heads",
    "pick_layers",
    "plot_expected_vs_actual",
    "plot_head",
    "plot_heads",
    "pyplot",
    "save_figure",
    "tick_text",
]

#: The colour scalings of the attention panels (see the module docstring).
SCALINGS = ("absolute", "row")


def pyplot() -> Any:
    """``matplotlib.pyplot`` on the Agg backend (imported lazily)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Any, path: Path, *, tight: bool = True) -> None:
    """Writes ``fig`` as a PNG atomically and closes it.

    ``tight`` crops to the drawn extent, at the cost of a second full draw; figures laid out on a
    fixed grid pass False.
    """
    # zlib level 3 instead of 6: the large grids encode faster, for files about 20% larger.
    options = {
        "format": "png",
        "dpi": 110,
        "bbox_inches": "tight" if tight else None,
        "pil_kwargs": {"compress_level": 3},
    }
    try:
        with atomic_open(path, "wb") as f:
            fig.savefig(f, **options)
    finally:
        pyplot().close(fig)


def format_value(v: Any, spec: str) -> str:
    """``format(v, spec)``, or ``"n/a"`` for None or a non-finite number (a head with no queries)."""
    if v is None:
        return "n/a"
    f = float(v)
    return format(f, spec) if np.isfinite(f) else "n/a"


def pick_layers(num_layers: int, k: int = 4) -> list[int]:
    """Up to ``k`` representative layers: first, second, middle, last."""
    cand = [0, 1, num_layers // 2, num_layers - 1]
    out: list[int] = []
    for c in cand:
        if 0 <= c < num_layers and c not in out:
            out.append(c)
    return out[:k]


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


def parse_heads(text: str, num_layers: int | None = None, num_heads: int | None = None) -> list[tuple[int, int]]:
    """Heads from ``"L:H,L:H,..."`` (``--plot-heads``), checked against the model when its size is given.

    Args:
        text: comma list of ``layer:head`` pairs, e.g. ``"0:1,3:0"``.
        num_layers: number of layers L (None: unchecked).
        num_heads: heads per layer H (None: unchecked).

    Returns:
        ``[(layer, head), ...]`` in the given order, without duplicates.

    Raises:
        JaxattnError: a malformed pair, or a layer or head out of range (the bad value is named).
    """
    out: list[tuple[int, int]] = []
    for item in str(text).split(","):
        item = item.strip()
        if not item:
            continue
        parts = item.split(":")
        try:
            l, h = (int(p) for p in parts) if len(parts) == 2 else (None, None)
        except ValueError:
            l, h = None, None
        if l is None or h is None:
            raise JaxattnError(f"head {item!r} is not LAYER:HEAD (e.g. 0:1,3:2)")
        if l < 0 or (num_layers is not None and l >= num_layers):
            raise JaxattnError(f"head {item!r}: layer {l} is not in [0, {num_layers})")
        if h < 0 or (num_heads is not None and h >= num_heads):
            raise JaxattnError(f"head {item!r}: head {h} is not in [0, {num_heads})")
        if (l, h) not in out:
            out.append((l, h))
    if not out:
        raise JaxattnError(f"heads {text!r} selects no head; give LAYER:HEAD pairs such as 0:1,3:2")
    return out


def tick_text(token: str) -> str:
    """A token as a tick label: escapes shown (``\\n``), and characters past U+24FF (emoji, which the
    bundled fonts lack) as ``U+XXXX``."""
    return "".join(c if ord(c) <= 0x24FF else f"U+{ord(c):04X}" for c in repr(str(token))[1:-1])


def _scaled(img: np.ndarray, scaling: str) -> np.ndarray:
    """``img`` as drawn: unchanged (absolute) or each row divided by its maximum (row); NaN stays NaN."""
    if scaling not in SCALINGS:
        raise JaxattnError(f"scaling {scaling!r} is not one of {SCALINGS}")
    if scaling == "absolute":
        return img
    with np.errstate(invalid="ignore", divide="ignore"):
        rmax = np.nanmax(np.where(np.isfinite(img), img, -np.inf), axis=1, keepdims=True)
        return img / np.where(rmax > 0, rmax, 1.0)


def _tick_labels(ax: Any, labels: list[str] | None, n: int, *, x: bool = True, y: bool = True) -> None:
    """Token tick labels on the x (keys) and/or y (queries) axis; none past 64 positions or without tokens."""
    if labels is None or n > 64:
        ax.set_xticks([])
        ax.set_yticks([])
        return
    size = max(3.0, min(7.0, 240.0 / max(n, 1)))
    # Panels of one figure show the same sequence, so only the bottom row and first column are
    # labelled; the others get no ticks at all (thousands of unlabelled ticks cost seconds to draw).
    if x:
        ax.set_xticks(range(n), labels[:n], fontsize=size, rotation=90)
    else:
        ax.set_xticks([])
    if y:
        ax.set_yticks(range(n), labels[:n], fontsize=size)
    else:
        ax.set_yticks([])


def _panels(actual: Any, expected: Any, mask: Any, T: int) -> tuple[np.ndarray, np.ndarray]:
    """(expected, actual) [T, T] with blank (NaN) cells: unmasked expectations; above the diagonal."""
    causal = np.tril(np.ones((T, T), bool))
    e = np.asarray(expected, np.float64)[:T, :T]
    if mask is None:
        keep = causal & (e.sum(-1, keepdims=True) > 0)
    else:
        keep = np.asarray(mask, bool)[:T, :T] & causal
    a = np.asarray(actual, np.float64)[:T, :T]
    return np.where(keep, e, np.nan), np.where(causal, a, np.nan)


def _head_title(layer: int, head: int, record: dict[str, Any] | None, side: str) -> str:
    r = record or {}
    text = f"L{layer}H{head}"
    if "n" in r and "s" in r:
        text += f" (n={r['n']}, s={r['s']})"
    text += f" {side}"
    if side == "actual" and r:
        text += (
            f"\ncos {format_value(r.get('cosine'), '.2f')}  tied {format_value(r.get('argmax_match_tied'), '.0%')}"
            f"  KL {format_value(r.get('kl'), '.2f')}"
        )
    return text


def _vmax(imgs: list[np.ndarray], scaling: str) -> float:
    if scaling == "row":
        return 1.0
    finite = [float(np.nanmax(i)) for i in imgs if np.isfinite(i).any()]
    return max(max(finite, default=0.0), 1e-6)


#: Gaps of the composite grid, in cells: within a head's pair, between pairs, between rows (titles).
_GAP_PAIR, _GAP_COL, _GAP_ROW = 2, 6, 10


def panel_layout(num_heads: int, size: int, per_row: int) -> tuple[tuple[int, int], list[tuple[int, int]]]:
    """Where each panel sits in the composite image of :func:`plot_heads` / :func:`plot_expected_vs_actual`.

    Every panel is one ``size x size`` block of a single image, so the figure has one Axes, not
    two per head (one Axes per panel made the figure take seconds to draw).

    Args:
        num_heads: heads drawn (two panels each: expected, then actual).
        size: T, positions per panel.
        per_row: heads per row.

    Returns:
        ``((height, width), [(row0, col0), ...])``: the image shape and the top-left cell of each
        panel, in the order head 0 expected, head 0 actual, head 1 expected, ...
    """
    per_row = max(1, min(per_row, num_heads))
    rows = -(-num_heads // per_row)
    pitch = 2 * size + _GAP_PAIR + _GAP_COL
    shape = (rows * size + (rows - 1) * _GAP_ROW, per_row * pitch - _GAP_COL)
    offsets = []
    for idx in range(num_heads):
        i, j = divmod(idx, per_row)
        for k in range(2):
            offsets.append((i * (size + _GAP_ROW), j * pitch + k * (size + _GAP_PAIR)))
    return shape, offsets


def _draw_grid(
    path: Path,
    panels: list[tuple[int, int, np.ndarray, np.ndarray, dict[str, Any] | None]],
    labels: list[str] | None,
    scaling: str,
    per_row: int,
    title: str,
) -> None:
    """Draws head panels (expected | actual pairs) as one image with one colour bar, and saves it."""
    from matplotlib.patches import Rectangle

    plt = pyplot()
    T = panels[0][2].shape[0]
    shown = [(_scaled(e, scaling), _scaled(a, scaling)) for _, _, e, a, _ in panels]
    vmax = _vmax([x for pair in shown for x in pair], scaling)
    (height, width), offsets = panel_layout(len(panels), T, per_row)
    canvas = np.full((height, width), np.nan)
    for (r0, c0), img in zip(offsets, [x for pair in shown for x in pair], strict=True):
        canvas[r0 : r0 + T, c0 : c0 + T] = img
    # About 0.09 inch per cell (token labels at 6-7 pt), but at most about 24 inches wide.
    cell = min(0.09, 24.0 / width)
    fig = plt.figure(figsize=(width * cell + 2.6, height * cell + 2.4))
    ax = fig.add_axes((1.2 / fig.get_figwidth(), 1.1 / fig.get_figheight(), width * cell / fig.get_figwidth(),
                       height * cell / fig.get_figheight()))  # fmt: skip
    cmap = pyplot().get_cmap("viridis").with_extremes(bad="white")
    im = ax.imshow(canvas, cmap=cmap, vmin=0.0, vmax=vmax, interpolation="nearest", aspect="equal")
    ax.set_axis_off()
    size = max(3.0, min(7.0, 0.95 * cell * 72.0))
    bottom = {c0: r0 for r0, c0 in offsets}  # the lowest panel of each column carries the key labels
    for idx, (r0, c0) in enumerate(offsets):
        layer, head, _, _, rec = panels[idx // 2]
        ax.add_patch(Rectangle((c0 - 0.5, r0 - 0.5), T, T, fill=False, linewidth=0.6, edgecolor="0.35", clip_on=False))
        side = "expected" if idx % 2 == 0 else "actual"
        ax.text(c0 - 0.5, r0 - 1.0, _head_title(layer, head, rec, side), fontsize=7, va="bottom")
        if labels is not None and T <= 64 and bottom[c0] == r0:
            for j in range(T):
                ax.text(c0 + j, r0 + T, labels[j], fontsize=size, rotation=90, ha="center", va="top")
            ax.text(c0 + T / 2, r0 + T + 3.5, "key position j", fontsize=8, ha="center", va="top")
        if c0 == 0:
            if labels is not None and T <= 64:
                for i in range(T):
                    ax.text(-1.0, r0 + i, labels[i], fontsize=size, ha="right", va="center")
            ax.text(-4.5, r0 + T / 2, "query position i", fontsize=8, rotation=90, ha="right", va="center")
    cax = fig.add_axes((1 - 0.9 / fig.get_figwidth(), 0.25, 0.15 / fig.get_figwidth(), 0.5))
    bar = fig.colorbar(im, cax=cax)
    bar.set_label("attention probability" if scaling == "absolute" else "probability / row maximum")
    fig.suptitle(title, fontsize=10)
    save_figure(fig, path, tight=False)


def _default_title(scaling: str) -> str:
    how = "probability, one colour range" if scaling == "absolute" else "each row scaled to its maximum"
    return f"Expected (from counts) vs actual attention; key j on x, query i on y; {how}; blank = masked"


def plot_head(
    path_or_ax: Any,
    actual: Float[ArrayLike, "T T"],
    expected: Float[ArrayLike, "T T"],
    tokens: Sequence[str] | None,
    layer: int,
    head: int,
    *,
    mask: Bool[ArrayLike, "T T"] | None = None,
    scaling: str = "absolute",
    record: dict[str, Any] | None = None,
    title: str = "",
) -> Path | None:
    """One head: its expected attention beside its actual attention.

    Args:
        path_or_ax: a PNG path (a new figure is written there), or a pair of matplotlib Axes
            ``(ax_expected, ax_actual)`` to draw into.
        actual: float [T, T] actual attention (query i, key j).
        expected: float [T, T] expected attention.
        tokens: the T token strings (tick labels), or None.
        layer: the head's layer (titles).
        head: the head's index in its layer (titles).
        mask: bool [T, T] cells where the expectation is defined (default: rows of ``expected``
            with a positive sum, on and below the diagonal).
        scaling: "absolute" (default) or "row" (module docstring).
        record: the head's metric record (cosine, tied match and KL in the title); None values print n/a.
        title: figure title (path form only).

    Returns:
        The path written, or None when drawing into given Axes.

    Raises:
        JaxattnError: mismatched shapes or an unknown scaling.
    """
    a, e = np.asarray(actual), np.asarray(expected)
    T = a.shape[-1]
    if a.shape != (T, T) or e.shape != (T, T):
        raise JaxattnError(f"plot_head wants actual and expected of shape [T, T], got {a.shape} and {e.shape}")
    labels = [tick_text(t) for t in tokens][:T] if tokens is not None else None
    ep, ap = _panels(a, e, mask, T)
    if isinstance(path_or_ax, (str, Path)):
        _draw_grid(
            Path(path_or_ax), [(layer, head, ep, ap, record)], labels, scaling, 1, title or _default_title(scaling)
        )
        return Path(path_or_ax)
    ax_e, ax_a = path_or_ax
    vmax = _vmax([_scaled(ep, scaling), _scaled(ap, scaling)], scaling)
    for ax, img, side in ((ax_e, ep, "expected"), (ax_a, ap, "actual")):
        ax.imshow(_scaled(img, scaling), cmap="viridis", vmin=0.0, vmax=vmax, interpolation="nearest")
        _tick_labels(ax, labels, T)
        ax.set_title(_head_title(layer, head, record, side), fontsize=8)
    return None


def plot_heads(
    path: str | Path,
    actual: Float[ArrayLike, "L H T T"],
    expected: Float[ArrayLike, "L H T T"],
    tokens: Sequence[str] | None,
    heads: Sequence[tuple[int, int]] | None = None,
    *,
    mask: Bool[ArrayLike, "L H T T"] | None = None,
    scaling: str = "absolute",
    records: list[dict[str, Any]] | None = None,
    title: str = "",
    max_positions: int | None = None,
    per_row: int = 4,
) -> Path:
    """A chosen set of heads, expected | actual side by side, on one colour range with a colour bar.

    Args:
        path: output PNG.
        actual: float [L, H, T, T] actual attention of one sequence.
        expected: float [L, H, T, T] expected attention of the same sequence.
        tokens: the T token strings (tick labels), or None.
        heads: ``[(layer, head), ...]`` (default: every head of the first, second, middle and last layers,
            at most 4 per layer).
        mask: bool [L, H, T, T] cells where the expectation is defined (default: rows with a positive sum).
        scaling: "absolute" (default) or "row".
        records: metric records (``layer``, ``head``, metrics) for the panel titles.
        title: figure title.
        max_positions: draw the first this many positions (None: all).
        per_row: heads per figure row.

    Returns:
        ``path``.

    Raises:
        JaxattnError: mismatched shapes, a head out of range, or an unknown scaling.
    """
    a, e = np.asarray(actual), np.asarray(expected)
    if a.ndim != 4 or a.shape != e.shape or a.shape[-1] != a.shape[-2]:
        raise JaxattnError(f"plot_heads wants actual and expected of shape [L, H, T, T], got {a.shape}, {e.shape}")
    L, H, T = a.shape[0], a.shape[1], min(a.shape[-1], max_positions or a.shape[-1])
    chosen = list(heads) if heads is not None else [(l, h) for l in pick_layers(L) for h in range(min(H, 4))]
    parse_heads(",".join(f"{l}:{h}" for l, h in chosen), L, H)  # range check, naming the bad head
    m = None if mask is None else np.asarray(mask, bool)
    rec = {(r["layer"], r["head"]): r for r in records or []}
    panels = []
    for l, h in chosen:
        ep, ap = _panels(a[l, h], e[l, h], None if m is None else m[l, h], T)
        panels.append((l, h, ep, ap, rec.get((l, h))))
    labels = [tick_text(t) for t in tokens][:T] if tokens is not None else None
    _draw_grid(Path(path), panels, labels, scaling, per_row, title or _default_title(scaling))
    return Path(path)


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
    heads: Sequence[tuple[int, int]] | None = None,
    scaling: str = "absolute",
) -> None:
    """The seed's side-by-side figure: expected | actual for representative (or chosen) heads.

    By default rows are layers (first, second, middle, last) and column pairs are the heads with
    distinct skips s (the seed layout repeats s = max_s for the other heads).

    Args:
        path: output PNG.
        expected: float32 [P, B, T, T].
        mask: bool [P, B, T, T].
        pair_index: int [L, H].
        attn: float32 [B, L, H, T, T].
        records: metric records (to annotate each panel; None metrics print n/a).
        seq: which sequence to draw.
        tokens: optional token strings of that sequence (tick labels).
        title: figure title.
        max_positions: draw the first this many positions (panel metrics cover all).
        heads: ``[(layer, head), ...]`` to draw instead of the default selection.
        scaling: "absolute" (default: probability with a colour bar) or "row" (each row scaled to its max).
    """
    pi = np.asarray(pair_index)
    L, H = pi.shape
    distinct = distinct_skip_heads(pi)[:4]
    per_row = len(distinct) if heads is None else min(4, len(heads))
    if heads is None:
        heads = [(l, h) for l in pick_layers(L) for h in distinct]
    parse_heads(",".join(f"{l}:{h}" for l, h in heads), L, H)
    T = min(attn.shape[-1], max_positions)
    rec = {(r["layer"], r["head"]): r for r in records}
    panels = []
    for l, h in heads:
        p = int(pi[l, h])
        ep, ap = _panels(attn[seq, l, h], expected[p, seq], mask[p, seq], T)
        panels.append((l, h, ep, ap, rec.get((l, h))))
    labels = [tick_text(t) for t in tokens[:T]] if tokens is not None else None
    _draw_grid(path, panels, labels, scaling, per_row, title or _default_title(scaling))
