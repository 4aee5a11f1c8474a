"""Fixed-width text tables for the terminal: per head, per layer, per option, diagnostics, verdicts."""

from __future__ import annotations

import textwrap
from typing import Any

import numpy as np

__all__ = [
    "NA",
    "fmt_metric",
    "format_construction",
    "format_diagnostics",
    "format_extra_scalars",
    "format_language_model",
    "format_layer_summary",
    "format_options_summary",
    "format_table",
    "format_verdicts",
    "run_header",
]


def run_header(prep: Any, *, same_for_every_option: bool = False) -> str:
    """The three lines that open every run's output: corpus, evaluation text and model.

    Args:
        prep: the :class:`~jaxattn.pipeline.Prepared` run.
        same_for_every_option: say that every option is scored on the same sequences (``compare``).

    Returns:
        Three lines, joined by newlines.
    """
    c, corpus, ev = prep.config, prep.corpus, prep.eval_corpus
    B, T = prep.tokens.shape
    same = ", the same for every option" if same_for_every_option else ""
    return "\n".join(
        (
            f"corpus: {corpus.source}  ({corpus.num_docs} docs, {corpus.num_tokens:,} tokens, V={corpus.vocab_size})",
            f"eval:   {ev.source}  ({ev.num_tokens:,} tokens); {B} sequences x {T} tokens{same}",
            f"model:  preset {prep.run.preset}: {c.num_layers} layers x {c.num_heads} heads, d_model {c.d_model}, "
            f"d_head {c.d_head}, max_n {c.max_n}, max_s {c.max_s}, weight_std {c.weight_std}",
        )
    )


#: What a table prints for a metric that is not defined (a head with no valid query: None / null).
NA = "n/a"


def fmt_metric(v: Any, spec: str) -> str:
    """``format(v, spec)``, or :data:`NA` right-aligned to the spec's width for None or NaN.

    Args:
        v: a number, None (a head with no valid query) or NaN.
        spec: a format spec such as ``"7.3f"`` or ``"6.1%"``.

    Returns:
        The formatted text.
    """
    if v is None or (isinstance(v, (float, np.floating)) and not np.isfinite(v)):
        width = "".join(ch for ch in spec.split(".")[0] if ch.isdigit())
        return f"{NA:>{width}}" if width else NA
    return format(v, spec)


def format_table(records: list[dict[str, Any]], *, per_head: bool = True) -> str:
    """A fixed-width per-layer, per-head table (with the spread over sequences); ``n/a`` for heads without queries."""
    head = f"{'option':>9} {'L':>2} {'H':>2} {'n':>1} {'s':>1} {'KL':>7} {'cos':>6} {'±':>5} {'match':>6} {'tied':>6} {'entropy':>7} {'queries':>7}"
    lines = [head, "-" * len(head)]
    for r in records:
        if not per_head:
            break
        lines.append(
            f"{r['option']:>9} {r['layer']:>2} {r['head']:>2} {r['n']:>1} {r['s']:>1} {fmt_metric(r['kl'], '7.3f')} "
            f"{fmt_metric(r['cosine'], '6.3f')} {fmt_metric(r.get('cosine_std', 0.0), '5.3f')} "
            f"{fmt_metric(r['argmax_match'], '6.1%')} {fmt_metric(r['argmax_match_tied'], '6.1%')} "
            f"{fmt_metric(r['entropy'], '7.3f')} {r['num_queries']:7d}"
        )
    return "\n".join(lines)


def format_layer_summary(rows: list[dict[str, Any]]) -> str:
    """Per-layer means over heads (with the head range); ``n/a`` for a layer without queries."""
    head = f"{'option':>9} {'layer':>5} {'n':>1} {'KL':>7} {'cosine (min-max)':>20} {'match':>6} {'tied (min-max)':>20} {'entropy':>7}"
    lines = [head, "-" * len(head)]
    for r in rows:
        if r["cosine"] is None:
            cos = f"{NA:>6} {'':13}"
            tied = f"{NA:>6} {'':13}"
        else:
            cos = f"{r['cosine']:6.3f} ({r['cosine_min']:.2f}-{r['cosine_max']:.2f})"
            tied = f"{r['argmax_match_tied']:6.1%} ({r['argmax_match_tied_min']:.0%}-{r['argmax_match_tied_max']:.0%})"
        lines.append(
            f"{r['option']:>9} {r['layer']:>5} {r['n']:>1} {fmt_metric(r['kl'], '7.3f')} "
            f"{cos} {fmt_metric(r['argmax_match'], '6.1%')} {tied} {fmt_metric(r['entropy'], '7.3f')}"
        )
    return "\n".join(lines)


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
        cos_split = f"{fmt_metric(s.get('cosine_layer0'), '.3f')} | {fmt_metric(s.get('cosine_deeper'), '.3f')}"
        t0, t1 = s.get("argmax_match_tied_layer0"), s.get("argmax_match_tied_deeper")
        tied_split = f"{fmt_metric(t0, '6.1%')} | {fmt_metric(t1, '6.1%')}"
        secs = s.get("seconds")
        secs_txt = f"{secs:7.1f}" if secs is not None else "      -"
        lines.append(
            f"{s['option']:>9} {fmt_metric(s.get('cosine'), '7.3f')} {cos_split:>15} "
            f"{fmt_metric(s.get('argmax_match_tied'), '7.1%')} {tied_split:>15} "
            f"{fmt_metric(s.get('argmax_match'), '7.1%')} {fmt_metric(s.get('kl'), '7.3f')} "
            f"{fmt_metric(s.get('entropy'), '7.3f')} {secs_txt}"
        )
    return "\n".join(lines)


def format_language_model(block: dict[str, dict[str, Any] | None]) -> str:
    """Per option, the derived model's next-token bits per token beside its n-gram model's and uniform's.

    Args:
        block: ``{option label: scores or None}`` (``metrics.json``'s ``"language_model"``, from
            :func:`jaxattn.output.documents.language_model_block`).

    Returns:
        A title line and one row per option ("-" where an option has no scores); "" when no
        option has scores.
    """
    scored = [d for d in block.values() if d]
    if not scored:
        return ""
    first = scored[0]
    title = (
        f"next-token bits per token on the eval sequences ({first['num_predictions']:,} predictions; "
        f"n-gram: order {first['ngram_order']}, add-{first['smoothing']:g}, from the same count tables):"
    )
    head = f"{'option':>9} {'model':>8} {'n-gram':>8} {'uniform':>8} {'model/n-gram':>13}"
    lines = [title, head, "-" * len(head)]

    def num(v: Any, width: int, fmt: str = ".3f") -> str:
        return f"{v:{width}{fmt}}" if isinstance(v, (int, float)) and np.isfinite(v) else f"{'-':>{width}}"

    for label, d in block.items():
        if not d:
            lines.append(f"{label:>9} {'-':>8} {'-':>8} {'-':>8} {'-':>13}")
            continue
        model, ngram = d.get("derived_bits_per_token"), d.get("ngram_bits_per_token")
        ratio = model / ngram if isinstance(model, float) and isinstance(ngram, float) and ngram > 0 else None
        lines.append(
            f"{label:>9} {num(model, 8)} {num(ngram, 8)} {num(d.get('uniform_bits_per_token'), 8)} {num(ratio, 13)}"
        )
    return "\n".join(lines)


def format_construction(option: str, extra: dict[str, Any]) -> str:
    """How the standard-GPT-2 Option 3 used its capacity (empty for results without those fields).

    Args:
        option: the result's label.
        extra: its ``extra`` (``residual_dims``, ``mlp_units``, ``prep_blocks`` of
            :func:`jaxattn.options.derive_gpt2`).

    Returns:
        Two or three lines: residual dims used of d_model (per block), MLP units and detectors
        kept per context length, and the approximation, if any.
    """
    dims, units = extra.get("residual_dims"), extra.get("mlp_units")
    if not dims or not units:
        return ""
    blocks = " + ".join(f"{k} {v}" for k, v in dims.items() if k not in ("used", "d_model"))
    kept, needed = units["kept"], units["needed"]
    ctx = ", ".join(f"{m}-gram {kept.get(m, 0):,}/{needed[m]:,}" for m in sorted(needed) if m != "1")
    lines = [
        f"{option}: a standard GPT-2 with {extra.get('prep_blocks', 0)} preparation block(s) ahead of the layout",
        f"  residual: {dims['used']} of d_model {dims['d_model']} dims ({blocks})",
        f"  MLP n-gram detectors kept/observed: {ctx or 'none'} (+{kept.get('1', 0)} token units; "
        f"{units['per_mlp']:,} units per MLP, {units['slots_used']} MLP(s) used)",
    ]
    if any(kept.get(m, 0) < needed[m] for m in needed):
        lines.append("  approximate: the contexts without a detector back off to their longest detected suffix")
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
    lines = []
    for v in verdicts:
        lines.append(f"[{v['verdict'].upper():>9}] {v['claim']}  ({v.get('source', '')})")
        lines += textwrap.wrap(v["evidence"], width=width, initial_indent=" " * 12, subsequent_indent=" " * 12)
    return "\n".join(lines)
