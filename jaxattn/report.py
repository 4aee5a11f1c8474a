"""Tables, ``metrics.json`` and figures. Outside the pure core: only reads results.

Every file is written atomically (temporary file, then rename), so an interrupted run
never leaves a partial file that looks complete.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import numpy as np

from jaxattn.alignment import METRIC_NAMES
from jaxattn.errors import JaxattnError

METRIC_LABELS = {
    "kl": "KL(expected || actual)",
    "cosine": "cosine similarity",
    "argmax_match": "argmax match (strict)",
    "argmax_match_tied": "argmax match (tie-aware)",
    "entropy": "entropy / log(#keys)",
}


def ensure_out_dir(out: str | os.PathLike[str]) -> Path:
    """Creates ``out`` (and parents) and checks it is writable.

    Raises:
        JaxattnError: the directory cannot be created or written.
    """
    path = Path(out)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise JaxattnError(f"cannot create output directory {str(path)!r}: {e.strerror or e}") from e
    if not path.is_dir():
        raise JaxattnError(f"output path {str(path)!r} is not a directory")
    if not os.access(path, os.W_OK | os.X_OK):
        raise JaxattnError(f"output directory {str(path)!r} is not writable")
    return path


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike[str], mode: str = "w") -> Iterator[IO[Any]]:
    """Opens a temporary file beside ``path`` and renames it over ``path`` on success."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode) as f:
            yield f
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def write_json(path: str | os.PathLike[str], obj: Any) -> None:
    """Writes JSON atomically (sorted keys inside records are not forced; stable order)."""
    with atomic_open(path, "w") as f:
        json.dump(_jsonable(obj), f, indent=1, allow_nan=False)
        f.write("\n")


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating, float)):
        f = float(obj)
        return f if np.isfinite(f) else None
    if isinstance(obj, np.ndarray):
        return _jsonable(obj.tolist())
    return obj


def environment_info() -> dict[str, Any]:
    """Versions and device, for reproducible reports."""
    import jax
    import jaxlib

    from jaxattn import __version__

    dev = jax.devices()[0]
    return {
        "jaxattn": __version__,
        "jax": jax.__version__,
        "jaxlib": jaxlib.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "device": {"platform": dev.platform, "kind": dev.device_kind, "count": jax.device_count()},
    }


def format_table(records: list[dict[str, Any]], *, per_head: bool = True) -> str:
    """A fixed-width per-layer, per-head table (with the spread over sequences)."""
    head = f"{'option':>9} {'L':>2} {'H':>2} {'n':>1} {'s':>1} {'KL':>7} {'cos':>6} {'±':>5} {'match':>6} {'tied':>6} {'entropy':>7} {'queries':>7}"
    lines = [head, "-" * len(head)]
    for r in records:
        if not per_head:
            break
        lines.append(
            f"{r['option']:>9} {r['layer']:>2} {r['head']:>2} {r['n']:>1} {r['s']:>1} {r['kl']:7.3f} "
            f"{r['cosine']:6.3f} {r.get('cosine_std', 0.0):5.3f} {r['argmax_match']:6.1%} "
            f"{r['argmax_match_tied']:6.1%} {r['entropy']:7.3f} {r['num_queries']:7d}"
        )
    return "\n".join(lines)


def format_layer_summary(rows: list[dict[str, Any]]) -> str:
    """Per-layer means over heads (with the head range)."""
    head = f"{'option':>9} {'layer':>5} {'n':>1} {'KL':>7} {'cosine (min-max)':>20} {'match':>6} {'tied (min-max)':>20} {'entropy':>7}"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r['option']:>9} {r['layer']:>5} {r['n']:>1} {r['kl']:7.3f} "
            f"{r['cosine']:6.3f} ({r['cosine_min']:.2f}-{r['cosine_max']:.2f}) {r['argmax_match']:6.1%} "
            f"{r['argmax_match_tied']:6.1%} ({r['argmax_match_tied_min']:.0%}-{r['argmax_match_tied_max']:.0%}) "
            f"{r['entropy']:7.3f}"
        )
    return "\n".join(lines)


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
    expected: np.ndarray,
    mask: np.ndarray,
    pair_index: np.ndarray,
    attn: np.ndarray,
    records: list[dict[str, Any]],
    *,
    seq: int = 0,
    tokens: list[str] | None = None,
    title: str = "",
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
        tokens: optional token strings of that sequence (tick labels when short).
        title: figure title.
    """
    plt = _plt()
    L, H = pair_index.shape
    layers = pick_layers(L)
    heads: list[int] = []
    seen: set[int] = set()
    for h in range(H):
        p = int(pair_index[0, h])
        if p not in seen:
            seen.add(p)
            heads.append(h)
    heads = heads[:4]
    rec = {(r["layer"], r["head"]): r for r in records}
    fig, axes = plt.subplots(len(layers), 2 * len(heads), figsize=(3.0 * 2 * len(heads), 3.1 * len(layers)), squeeze=False)
    T = attn.shape[-1]
    for i, l in enumerate(layers):
        for j, h in enumerate(heads):
            p = int(pair_index[l, h])
            e = np.where(mask[p, seq], expected[p, seq], np.nan)
            a = np.where(np.tril(np.ones((T, T), bool)), attn[seq, l, h], np.nan)
            r = rec.get((l, h), {})
            n, s = r.get("n", "?"), r.get("s", "?")
            for k, (img, lab) in enumerate(((e, "expected"), (a, "actual"))):
                ax = axes[i, 2 * j + k]
                vmax = np.nanmax(img) if np.isfinite(img).any() else 1.0
                ax.imshow(img, cmap="viridis", vmin=0, vmax=vmax, interpolation="nearest")
                sub = f"L{l}H{h} (n={n}, s={s}) {lab}"
                if lab == "actual" and r:
                    sub += f"\ncos {r['cosine']:.2f}  tied {r['argmax_match_tied']:.0%}  KL {r['kl']:.2f}"
                ax.set_title(sub, fontsize=8)
                if tokens is not None and T <= 40:
                    ax.set_xticks(range(T))
                    ax.set_xticklabels([repr(t)[1:-1] for t in tokens], fontsize=5, rotation=90)
                    ax.set_yticks(range(T))
                    ax.set_yticklabels([repr(t)[1:-1] for t in tokens], fontsize=5)
                else:
                    ax.set_xticks([])
                    ax.set_yticks([])
                if k == 0 and j == 0:
                    ax.set_ylabel("query position i")
    fig.suptitle(title or "Expected (from counts) vs actual attention; key position j on x, query i on y; blank = masked", fontsize=11)
    fig.tight_layout()
    _save(fig, path)


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
                ax.text(h, l, f"{v:.2f}", ha="center", va="center", fontsize=6, color="w" if (v - lo) < 0.5 * (hi - lo) else "k")
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


def plot_embedding_similarity(path: Path, embed: np.ndarray, vocab: list[str] | None = None, max_tokens: int = 96) -> dict[str, float]:
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


def metrics_document(
    records: list[dict[str, Any]],
    *,
    config: dict[str, Any],
    corpus: dict[str, Any],
    eval_corpus: dict[str, Any] | None = None,
    timings: dict[str, float] | None = None,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The ``metrics.json`` document (SPEC §5 schema plus provenance)."""
    doc: dict[str, Any] = {"results": records, "config": config, "corpus": corpus}
    if eval_corpus is not None:
        doc["eval_corpus"] = eval_corpus
    doc["environment"] = environment_info()
    if timings is not None:
        doc["timings_s"] = {k: round(v, 4) for k, v in timings.items()}
    if extra:
        doc.update(extra)
    return doc
