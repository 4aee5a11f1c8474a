"""``report.html``: one self-contained page per run to explore expected vs actual attention head by head.

Written by ``jaxattn analyze`` and ``jaxattn compare`` right after ``metrics.json`` (and from it:
the page shows the same numbers, formatted in Python), and by ``jaxattn score`` (a section of
its own). The page is ``templates/report.html`` with ``report.css``, ``report.js`` and the data
(:mod:`jaxattn.output.html_data`) inlined: no request leaves it (its Content-Security-Policy
forbids any), so it opens offline from ``file://``.

Tabs: an overview (the layer x head grid of each metric, one colour scale per metric, an
option switch in ``compare``), a head view (expected and actual attention of one head on one
sequence with tokens on both axes, and its per-query metrics), a token view (click a query
token; keys shaded by expected and by actual weight) and the provenance (config, corpus hash,
versions, timings; in ``compare`` the ablation table and the diagnostics verdicts).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from jaxattn.errors import JaxattnError
from jaxattn.output.attention_plots import format_value
from jaxattn.output.files import atomic_open
from jaxattn.output.html_data import REPORT_SEQS, attention_data, overview_data
from jaxattn.version import VERSION

__all__ = [
    "REPORT_NAME",
    "read_report_data",
    "render_html",
    "report_data",
    "report_job",
    "score_section",
    "write_report",
    "write_score_report",
]

#: The report's file name in a run directory.
REPORT_NAME = "report.html"
#: ``format`` of the page's data block.
DATA_FORMAT = 1
_DATA_RE = re.compile(r'<script type="application/json" id="jaxattn-data">(.*?)</script>', re.S)
_SLOT_RE = re.compile(r"\{\{(\w+)\}\}")


def _template(name: str) -> str:
    return (resources.files("jaxattn.output") / "templates" / name).read_text(encoding="utf-8")


def render_html(data: dict[str, Any]) -> str:
    """The page for a data block: the template with its style sheet, script and data inlined.

    Args:
        data: the JSON-able data block (:func:`report_data`); ``data["title"]`` is the page title.

    Returns:
        The HTML text. In the embedded JSON every ``<`` is written ``\\u003c``, so no string in
        it can close the script element.
    """
    blob = json.dumps(data, separators=(",", ":"), ensure_ascii=False, allow_nan=False).replace("<", "\\u003c")
    title = str(data.get("title", "jaxattn report"))
    esc = title.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    parts = {"TITLE": esc, "VERSION": VERSION, "CSS": _template("report.css"), "JS": _template("report.js")}
    parts["DATA"] = blob
    for name in ("CSS", "JS"):
        if re.search(r"</?(script|style)", parts[name], re.I):
            raise JaxattnError(f"report {name.lower()} template holds a script or style tag: it would break the page")
    return _SLOT_RE.sub(lambda m: parts[m.group(1)], _template("report.html"))


def read_report_data(path: str | Path) -> dict[str, Any] | None:
    """The data block of a ``report.html`` jaxattn wrote, or None (no file, or not one of ours)."""
    p = Path(path)
    if not p.is_file():
        return None
    m = _DATA_RE.search(p.read_text(encoding="utf-8", errors="replace"))
    if m is None:
        return None
    try:
        data = json.loads(m.group(1))
    except json.JSONDecodeError:
        return None
    return data if isinstance(data, dict) and data.get("format") == DATA_FORMAT else None


def _kv(title: str, items: Any, note: str | None = None) -> dict[str, Any] | None:
    if not isinstance(items, dict) or not items:
        return None
    return {"title": title, "kind": "kv", "items": items, **({"note": note} if note else {})}


def _table(title: str, rows: Any, note: str | None = None) -> dict[str, Any] | None:
    if not isinstance(rows, list) or not rows or not all(isinstance(r, dict) for r in rows):
        return None
    return {"title": title, "kind": "table", "rows": rows, **({"note": note} if note else {})}


def _lm_rows(block: Any) -> list[dict[str, Any]]:
    if not isinstance(block, dict):
        return []
    return [{"option": k, **v} for k, v in block.items() if isinstance(v, dict)]


def provenance_sections(doc: dict[str, Any], out_dir: Path | None = None) -> list[dict[str, Any]]:
    """The provenance tab: ``metrics.json``'s config, corpora, versions and timings (and compare's tables).

    Args:
        doc: the ``metrics.json`` document.
        out_dir: the run directory (its ``diagnostics.json`` per-layer rows, when present).

    Returns:
        Sections ``{"title", "kind": "kv" | "table", "items" | "rows", "note"?}``, empty ones left out.
    """
    cfg = doc.get("config", {})
    run_items = {"created_utc": doc.get("created_utc"), "schema_version": doc.get("schema_version")}
    for key in ("best_option", "best_option_rule", "ceilings"):
        if key in doc:
            run_items[key] = doc[key]
    diag_layers = None
    if out_dir is not None and (out_dir / "diagnostics.json").is_file():
        diag_layers = json.loads((out_dir / "diagnostics.json").read_text(encoding="utf-8")).get("layers")
    sections = [
        _kv(
            "Run",
            run_items,
            "numbers in these tables are rounded to 4 significant digits; metrics.json has them in full",
        ),
        _table("Options summary (means over heads)", doc.get("options_summary")),
        _table("Language model (next-token bits per token)", _lm_rows(doc.get("language_model"))),
        _table(
            "Option 3 ablation",
            doc.get("ablation"),
            "kind step: each adds one ingredient to the row above; variant: Option 3 with one part removed; ceiling: the oracle-inputs derivation",
        ),
        _table("Diagnostics: verdicts on the seed's explanations", doc.get("verdicts")),
        _table("Diagnostics per layer", diag_layers),
        _kv("Run config", cfg.get("run")),
        _kv("Model config", cfg.get("model")),
        _kv("Other config", {k: v for k, v in cfg.items() if k not in ("run", "model")}),
        _kv("Count corpus", doc.get("corpus"), "sha256: of the corpus text, as metrics.json"),
        _kv("Evaluation corpus", doc.get("eval_corpus")),
        _kv("Versions and device", doc.get("environment")),
        _kv("Timings (seconds, as of metrics.json)", doc.get("timings_s")),
        _kv("Definitions", doc.get("definitions")),
    ]
    return [s for s in sections if s is not None]


def report_data(
    prep: Any,
    results: Sequence[Any],
    doc: dict[str, Any],
    *,
    kind: str,
    num_seqs: int = REPORT_SEQS,
    out_dir: Path | None = None,
) -> dict[str, Any]:
    """The page's data block for a run.

    Args:
        prep: the :class:`~jaxattn.pipeline.Prepared` run (tokens, expected attention, mask, tables' layout).
        results: the options' :class:`~jaxattn.pipeline.AnalysisResult` s (their ``attn`` arrays).
        doc: the ``metrics.json`` document (records and provenance: the page shows these numbers).
        kind: "analyze" or "compare".
        num_seqs: sequences shown.
        out_dir: the run directory (for ``diagnostics.json``).

    Returns:
        The JSON-able data block.
    """
    L, H = prep.pair_index.shape
    options = [str(r.option) for r in results]
    data: dict[str, Any] = {"format": DATA_FORMAT, "kind": kind}
    data.update(overview_data(doc["results"], options, int(L), int(H)))
    data.update(
        attention_data(
            prep.expected, prep.mask, prep.pair_index, {str(r.option): r.attn for r in results}, num_seqs=num_seqs
        )
    )
    vocab = prep.corpus.tokenizer.vocab
    data["tokens"] = [[vocab[int(t)] for t in row[: data["T"]]] for row in np.asarray(prep.tokens)[: data["B"]]]
    data["joiner"] = " " if prep.corpus.tokenizer.kind == "word" else ""
    data["B_total"] = int(prep.tokens.shape[0])
    data["T_total"] = int(prep.tokens.shape[1])
    data["pairs"] = [list(p) for p in prep.pairs]
    data["pair_index"] = [int(x) for x in np.asarray(prep.pair_index).reshape(-1)]
    best = doc.get("best_option")
    data["default_option"] = best if best in options else (options[0] if options else None)
    data["default_head"] = [0, 0]
    run = prep.run
    data["title"] = f"jaxattn {kind}: {', '.join(options)} on {prep.corpus.source}"
    data["subtitle"] = (
        f"preset {run.preset}, {prep.corpus.tokenizer.kind} tokenizer, V = {prep.config.vocab_size}, "
        f"{L} layers x {H} heads; evaluated on {data['B_total']} sequences x {data['T_total']} tokens of "
        f"{prep.eval_corpus.source}; the views show the first {data['B']} sequences x {data['T']} tokens"
    )
    data["provenance"] = provenance_sections(doc, out_dir)
    data["scores"] = None
    return data


def write_report(out_dir: str | Path, prep: Any, results: Sequence[Any], *, kind: str | None = None) -> Path:
    """Writes ``out_dir/report.html`` from the run's ``metrics.json`` (already written) and its arrays.

    Args:
        out_dir: the run directory; ``metrics.json`` must be in it.
        prep: the prepared run.
        results: the options' results, in the order of ``metrics.json``.
        kind: "analyze" or "compare" (default: "compare" for several results).

    Returns:
        The report's path.

    Raises:
        JaxattnError: no ``metrics.json`` in ``out_dir``.
    """
    out = Path(out_dir)
    metrics = out / "metrics.json"
    if not metrics.is_file():
        raise JaxattnError(f"{metrics} does not exist: write metrics.json before report.html")
    doc = json.loads(metrics.read_text(encoding="utf-8"))
    kind = kind or ("compare" if len(results) > 1 else "analyze")
    data = report_data(prep, results, doc, kind=kind, out_dir=out)
    path = out / REPORT_NAME
    with atomic_open(path, "wb") as f:
        f.write(render_html(data).encode("utf-8"))
    return path


def report_job(out_dir: str | Path, prep: Any, results: Sequence[Any]) -> tuple[str, Callable[[], Path]]:
    """``write_report`` as a ``(name, draw)`` job of :func:`jaxattn.output.plots.render_figures` (a failure is
    one stderr line and exit status 1, like a figure's, and loses no result)."""
    return REPORT_NAME, lambda: write_report(out_dir, prep, results)


def score_section(doc: dict[str, Any]) -> dict[str, Any]:
    """The "Head scores" tab of a ``jaxattn score`` run: each head's best (n, s) with its scores.

    Args:
        doc: the ``scores.json`` document.

    Returns:
        ``{"blocks", "heads", "cells": [{"n", "s", "cosine", "tied", "kl"}], "note", "sections"}``
        (cells in ``block * heads + head`` order, the numbers formatted as ``scores.json``'s, to 4 decimals).
    """
    entries = {(int(e["block"]), int(e["head"])): e for e in doc["heads"]}
    NB = 1 + max(b for b, _ in entries) if entries else 0
    H = 1 + max(h for _, h in entries) if entries else 0
    cells = []
    for b in range(NB):
        for h in range(H):
            best = entries.get((b, h), {}).get("best", {})
            cells.append(
                {
                    "n": best.get("n"),
                    "s": best.get("s"),
                    "cosine": format_value(best.get("cosine"), ".4f"),
                    "tied": format_value(best.get("argmax_match_tied"), ".4f"),
                    "kl": format_value(best.get("kl"), ".4f"),
                }
            )
    sections = [
        _kv("Model", doc.get("model")),
        _kv("Layout match", doc.get("layout_match")),
        _kv("Vocabulary mapping", doc.get("vocab_mapping")),
        _kv("Scoring run", doc.get("run")),
        _kv("Count corpus", doc.get("corpus")),
        _kv("Evaluation corpus", doc.get("eval_corpus")),
        _kv("Timings (seconds)", doc.get("timings_seconds")),
    ]
    note = (
        "jaxattn score: each cell is one head of the checkpoint, labelled with the (n, s) table its attention "
        "follows best and coloured by that table's mean cosine (0 to 1). Hover for the tied argmax and the KL."
    )
    return {"blocks": NB, "heads": H, "cells": cells, "note": note, "sections": [s for s in sections if s]}


def write_score_report(out_dir: str | Path, doc: dict[str, Any]) -> Path | None:
    """Adds the head scores to ``out_dir/report.html``, or writes a report of its own when there is none.

    A report jaxattn wrote (``analyze`` or ``compare`` into the same directory) keeps everything
    and gains a "Head scores" tab (replacing an earlier one); any other file of that name is left as it is.

    Args:
        out_dir: the score run's directory.
        doc: the ``scores.json`` document.

    Returns:
        The report's path, or None when ``report.html`` is a file jaxattn did not write (left untouched).
    """
    path = Path(out_dir) / REPORT_NAME
    data = read_report_data(path)
    if data is None and path.exists():
        return None
    if data is None:
        model = doc.get("model", {})
        data = {
            "format": DATA_FORMAT,
            "kind": "score",
            "title": f"jaxattn score: {model.get('path', 'checkpoint')}",
            "subtitle": f"{model.get('blocks', '?')} blocks x {model.get('heads', '?')} heads",
            "options": [],
            "provenance": [],
        }
    data["scores"] = score_section(doc)
    with atomic_open(path, "wb") as f:
        f.write(render_html(data).encode("utf-8"))
    return path
