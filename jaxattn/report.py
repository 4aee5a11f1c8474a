"""Tables, ``metrics.json`` and figures. Outside the pure core: only reads results.

Every file is written atomically (temporary file, then rename), so an interrupted run
never leaves a partial file that looks complete.
"""

from __future__ import annotations

import contextlib
import dataclasses
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
    """Opens a temporary file beside ``path`` and renames it over ``path`` on success.

    On any exception (KeyboardInterrupt included) the temporary file is removed and ``path``
    is left as it was: an interrupted run never leaves a partial file under the final name.

    Args:
        path: the final file name.
        mode: ``"w"`` (text) or ``"wb"`` (binary).

    Yields:
        The open temporary file.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)  # mkstemp makes 0600; give the file the usual permissions
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
    """Versions, device and numerics switches, for reproducible reports.

    Returns:
        ``{"jaxattn", "jaxattn_git", "jax", "jaxlib", "numpy", "python", "platform", "device",
        "jax_enable_x64", "xla_flags"}``; ``device`` holds the default backend's platform, the
        device kind and the device count; ``jaxattn_git`` is the source checkout's commit (None
        outside a git checkout).
    """
    import jax
    import jaxlib

    from jaxattn import __version__

    dev = jax.devices()[0]
    return {
        "jaxattn": __version__,
        "jaxattn_git": _git_commit(),
        "jax": jax.__version__,
        "jaxlib": jaxlib.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "device": {"platform": dev.platform, "kind": dev.device_kind, "count": jax.device_count()},
        "jax_enable_x64": bool(jax.config.read("jax_enable_x64")),
        "xla_flags": os.environ.get("XLA_FLAGS"),
    }


def _git_commit() -> str | None:
    """The commit of the checkout jaxattn runs from (with ``-dirty`` when modified), or None."""
    import subprocess

    try:
        out = subprocess.run(
            ["git", "describe", "--always", "--dirty", "--abbrev=40"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=5,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


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
    heads: list[int] = []
    seen: set[int] = set()
    for h in range(H):
        p = int(pair_index[0, h])
        if p not in seen:
            seen.add(p)
            heads.append(h)
    heads = heads[:4]
    rec = {(r["layer"], r["head"]): r for r in records}
    # Show at most 32 positions (the seed's sequence length) so tokens stay legible, and
    # scale each row to its own maximum: early queries have few keys and would swamp the colours.
    T = min(attn.shape[-1], max_positions)
    fig, axes = plt.subplots(
        len(layers), 2 * len(heads), figsize=(3.3 * 2 * len(heads), 3.4 * len(layers)), squeeze=False
    )
    causal = np.tril(np.ones((T, T), bool))
    for i, l in enumerate(layers):
        for j, h in enumerate(heads):
            p = int(pair_index[l, h])
            m = mask[p, seq, :T, :T]
            e = np.where(m, expected[p, seq, :T, :T], np.nan)
            a = np.where(causal, attn[seq, l, h, :T, :T], np.nan)
            r = rec.get((l, h), {})
            n, s = r.get("n", "?"), r.get("s", "?")
            for k, (img, lab) in enumerate(((e, "expected"), (a, "actual"))):
                ax = axes[i, 2 * j + k]
                with np.errstate(invalid="ignore", divide="ignore"):
                    rmax = np.nanmax(np.where(np.isfinite(img), img, -np.inf), axis=1, keepdims=True)
                    shown = img / np.where(rmax > 0, rmax, 1.0)
                ax.imshow(shown, cmap="viridis", vmin=0, vmax=1, interpolation="nearest")
                sub = f"L{l}H{h} (n={n}, s={s}) {lab}"
                if lab == "actual" and r:
                    sub += f"\ncos {r['cosine']:.2f}  tied {r['argmax_match_tied']:.0%}  KL {r['kl']:.2f}"
                ax.set_title(sub, fontsize=8)
                if tokens is not None:
                    labels = [repr(t)[1:-1] for t in tokens[:T]]
                    ax.set_xticks(range(T))
                    ax.set_xticklabels(labels, fontsize=5, rotation=90)
                    ax.set_yticks(range(T))
                    ax.set_yticklabels(labels, fontsize=5)
                else:
                    ax.set_xticks([])
                    ax.set_yticks([])
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
    path: Path, embed: np.ndarray, vocab: list[str] | None = None, max_tokens: int = 96
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


def jsonable(obj: Any, depth: int = 0) -> Any:
    """A JSON-able copy of ``obj`` (an option's ``extra``): arrays to lists, dataclasses to dicts, others to repr."""
    if depth > 12:
        return repr(obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return jsonable(dataclasses.asdict(obj), depth + 1)
    if isinstance(obj, dict):
        return {str(k): jsonable(v, depth + 1) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v, depth + 1) for v in obj]
    if isinstance(obj, (str, bool, int, float)) or obj is None:
        return obj
    if isinstance(obj, (np.generic,)):
        return obj.item()
    if hasattr(obj, "__array__"):
        return np.asarray(obj).tolist()
    return repr(obj)


def metrics_document(
    records: list[dict[str, Any]],
    *,
    config: dict[str, Any],
    corpus: dict[str, Any],
    eval_corpus: dict[str, Any] | None = None,
    timings: dict[str, float] | None = None,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The ``metrics.json`` document (SPEC §5 schema plus provenance).

    ``results`` depends only on the inputs and the seed, so two runs give byte-identical
    ``results``; the provenance fields (``created_utc``, ``timings_s``, ``environment``) vary.

    Args:
        records: per-(option, layer, head) metric records.
        config: the full configuration (run, model, command-line arguments).
        corpus: ``Corpus.info()`` of the count corpus (source, files, sha256 of their text).
        eval_corpus: ``Corpus.info()`` of the evaluation corpus.
        timings: wall time of each stage, seconds.
        extra: more top-level fields.

    Returns:
        ``{"results", "config", "corpus", "eval_corpus", "environment", "created_utc",
        "timings_s", ...extra}``.
    """
    import datetime

    doc: dict[str, Any] = {"results": records, "config": config, "corpus": corpus}
    if eval_corpus is not None:
        doc["eval_corpus"] = eval_corpus
    doc["environment"] = environment_info()
    doc["created_utc"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    if timings is not None:
        doc["timings_s"] = {k: round(v, 4) for k, v in timings.items()}
    if extra:
        doc.update(extra)
    return doc


# --------------------------------------------------------------------------- #
# `jaxattn compare`: options side by side, ablation, diagnostics
# --------------------------------------------------------------------------- #

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


def format_options_summary(summaries: list[dict[str, Any]]) -> str:
    """One line per option: overall means over heads, and layer 0 | layers 1+ for cosine and tied match.

    Args:
        summaries: dicts with ``option``, the metric means (``cosine``, ``argmax_match_tied``,
            ``kl``, ``entropy``, ``argmax_match``) and optionally ``{metric}_layer0``,
            ``{metric}_deeper`` and ``seconds``.
    """
    head = (
        f"{'option':>9} {'cosine':>7} {'(L0 | 1+)':>15} {'tied':>7} {'(L0 | 1+)':>15} {'strict':>7} {'KL':>7} "
        f"{'entropy':>7} {'time s':>7}"
    )
    lines = [head, "-" * len(head)]
    for s in summaries:
        cos_split = f"{s.get('cosine_layer0', float('nan')):.3f} | {s.get('cosine_deeper', float('nan')):.3f}"
        t0, t1 = s.get("argmax_match_tied_layer0", float("nan")), s.get("argmax_match_tied_deeper", float("nan"))
        tied_split = f"{t0:6.1%} | {t1:6.1%}"
        secs = s.get("seconds")
        secs_txt = f"{secs:7.1f}" if secs is not None else "      -"
        lines.append(
            f"{s['option']:>9} {s['cosine']:7.3f} {cos_split:>15} {s['argmax_match_tied']:7.1%} {tied_split:>15} "
            f"{s['argmax_match']:7.1%} {s['kl']:7.3f} {s['entropy']:7.3f} {secs_txt}"
        )
    return "\n".join(lines)


def format_extra_scalars(extra: dict[str, Any], *, max_items: int = 8) -> str:
    """Up to ``max_items`` scalar entries of an option's ``extra`` as ``key=value`` (top level, then one down)."""

    def scalar(v: Any) -> str | None:
        if isinstance(v, bool):
            return str(v)
        if isinstance(v, (int, float, np.integer, np.floating)):
            return f"{float(v):.4g}"
        if isinstance(v, str) and len(v) <= 40:
            return v
        return None

    top = [(k, scalar(v)) for k, v in extra.items()]
    nested = [(f"{k}.{k2}", scalar(v2)) for k, v in extra.items() if isinstance(v, dict) for k2, v2 in v.items()]
    items = [f"{k}={t}" for k, t in top + nested if t is not None]
    more = len(items) - max_items
    return ", ".join(items[:max_items]) + (f", ... ({more} more in metrics.json)" if more > 0 else "")


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


def format_ablation_rows(rows: list[dict[str, Any]]) -> str:
    """A plain ablation table: step, ingredient and the overall means of each metric present."""
    metrics = [m for m in ("cosine", "argmax_match_tied", "kl", "entropy") if rows and f"{m}_mean" in rows[0]]
    head = f"{'step':>4} {'ingredient':<24} " + " ".join(f"{m[:12]:>12}" for m in metrics)
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r['step']:>4} {str(r['ingredient'])[:24]:<24} " + " ".join(f"{r[f'{m}_mean']:12.3f}" for m in metrics)
        )
    return "\n".join(lines)


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


def format_diagnostics(rows: list[dict[str, Any]]) -> str:
    """Per-layer diagnostics table (rows from :func:`jaxattn.diagnostics.summary_rows`)."""
    head = (
        f"{'L':>2} {'n':>1} {'range':>6} {'raw':>6} {'R2(M_r)':>7} {'entropy':>7} {'tokcos':>6} {'common':>6} "
        f"{'|x|':>6} {'|attn|':>6} {'|mlp|':>6} {'tied':>6} {'no-norm':>7} {'no-mlp':>6} {'isolated':>8}"
    )
    lines = [
        "range/raw: mean within-row max-min of q.k/sqrt(K) in nats (as run / un-normalised weights, same inputs); "
        "R2(M_r): within-row fit of the scores to M_r[g_i,t_j];",
        "tokcos: cos(LN(x_i), LN(E[t_i])); common: share of query-input energy in one position-invariant direction; "
        "|x| |attn| |mlp|: residual norm entering the layer and what attention / MLP add;",
        "tied: tied argmax match as run, without the std rescaling, without the MLP, and isolated (W_O=0, no MLP: "
        "every layer reads the bare embeddings).",
        head,
        "-" * len(head),
    ]
    for r in rows:
        lines.append(
            f"{r['layer']:>2} {r['n']:>1} {r['row_range']:6.2f} {r['raw_row_range']:6.2f} {r['target_r2']:7.2f} "
            f"{r['entropy']:7.3f} {r['token_cosine']:6.3f} {r['common_direction_energy']:6.1%} "
            f"{r['residual_norm']:6.2f} "
            f"{r['attn_out_norm']:6.2f} {r['mlp_out_norm']:6.2f} {r.get('tied_seed', np.nan):6.1%} "
            f"{r.get('tied_no_normalisation', np.nan):7.1%} {r.get('tied_no_mlp', np.nan):6.1%} "
            f"{r.get('tied_no_value_output_no_mlp', np.nan):8.1%}"
        )
    return "\n".join(lines)


def format_verdicts(verdicts: list[dict[str, str]], width: int = 118) -> str:
    """The verdicts on the seed's claims, each with its evidence wrapped to ``width``."""
    import textwrap

    lines = []
    for v in verdicts:
        lines.append(f"[{v['verdict'].upper():>9}] {v['claim']}  ({v.get('source', '')})")
        lines += textwrap.wrap(v["evidence"], width=width, initial_indent=" " * 12, subsequent_indent=" " * 12)
    return "\n".join(lines)


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
