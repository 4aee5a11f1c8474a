"""``jaxattn compare``: the baseline and options 1-4 side by side, the ablation and the diagnostics.

Every option runs on the same :class:`jaxattn.pipeline.Prepared` run (same count tables, same
held-out sequences, same expected attention), so their numbers are directly comparable.

Outputs in ``--out``:
    metrics.json            SPEC §5 records (one per option, layer and head) plus
                            ``options_summary``, ``layer_summary``, ``option_extras``,
                            ``ablation``, ``diagnostics`` and ``verdicts``.
    options_comparison.png  per-layer cosine and tied argmax match of every option.
    ablation.json / .png    the Option 3 ablation table.
    diagnostics.json / .png the root-cause diagnostics and the verdicts on the seed's claims.
    heatmap_<option>_<metric>.png, expected_vs_actual_attention.png (best option),
    embedding_similarity.png (the baseline's E).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from jaxattn.alignment import METRIC_NAMES
from jaxattn.errors import JaxattnError

OPTIONS = ("baseline", "1", "2", "3", "4")
#: Labels the options put into their records.
LABELS = {"baseline": "baseline", "1": "option1", "2": "option2", "3": "option3", "4": "option4"}


def parse_options(spec: str | Sequence[str] | None) -> list[str]:
    """Option names from ``--options`` ("all", or a comma list such as "baseline,2,option4").

    Returns:
        The selected options in canonical order ("baseline", "1", ..., "4").

    Raises:
        JaxattnError: an unknown name (the bad value and the valid ones are named) or an empty list.
    """
    if spec is None:
        return list(OPTIONS)
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    chosen: set[str] = set()
    for raw in items:
        name = str(raw).strip().lower()
        if not name:
            continue
        if name == "all":
            chosen.update(OPTIONS)
            continue
        name = name.removeprefix("option")
        if name not in OPTIONS:
            raise JaxattnError(
                f"unknown option {str(raw).strip()!r} in --options; choose from all, {', '.join(OPTIONS)}"
            )
        chosen.add(name)
    if not chosen:
        raise JaxattnError(f"--options {spec!r} selects no option; choose from all, {', '.join(OPTIONS)}")
    return [o for o in OPTIONS if o in chosen]


def option_summary(records: list[dict[str, Any]], num_layers: int, seconds: float | None = None) -> dict[str, Any]:
    """Overall, layer-0 and deeper-layer means of one option's records (means over heads)."""
    out: dict[str, Any] = {"option": records[0]["option"] if records else "?"}
    groups = {"all": lambda l: True, "layer0": lambda l: l == 0, "deeper": lambda l: l > 0}
    for gname, keep in groups.items():
        sel = [r for r in records if keep(r["layer"])]
        if not sel:
            continue
        for m in METRIC_NAMES:
            out[f"{m}_{gname}" if gname != "all" else m] = float(np.mean([r[m] for r in sel]))
    out["num_layers"] = num_layers
    if seconds is not None:
        out["seconds"] = float(seconds)
    return out


def best_option(summaries: list[dict[str, Any]]) -> str:
    """The option with the highest mean tied argmax match (ties broken by cosine)."""
    return max(summaries, key=lambda s: (s["argmax_match_tied"], s["cosine"]))["option"]


def run_all(
    prep: Any,
    selected: list[str],
    *,
    train_steps: int | None = None,
    progress: bool = True,
    need_baseline: bool = True,
) -> tuple[list[Any], Any, dict[str, float]]:
    """Runs the selected options on one prepared run.

    The baseline is computed first whenever it is selected, needed by the diagnostics
    (``need_baseline``) or by Option 4 (which starts from it and reuses its "before" numbers).

    Returns:
        (results of the selected options in order, the baseline result or None,
        wall seconds per option label).
    """
    from jaxattn import options, pipeline
    from jaxattn.progress import progress_iter

    seconds: dict[str, float] = {}
    base = None
    if "baseline" in selected or need_baseline or "4" in selected:
        t0 = time.perf_counter()
        base = pipeline.run_baseline(prep, progress=progress)
        seconds["baseline"] = time.perf_counter() - t0
    results = []
    for opt in progress_iter(selected, desc="compare: options", enabled=progress):
        if opt == "baseline":
            results.append(base)
            continue
        kw: dict[str, Any] = {}
        if opt == "4":
            kw["baseline"] = base
            if train_steps is not None:
                kw["steps"] = int(train_steps)
        t0 = time.perf_counter()
        res = options.run_option(prep, opt, progress=progress, **kw)
        seconds[res.option] = time.perf_counter() - t0
        results.append(res)
    return results, base, seconds


def cmd_compare(args: argparse.Namespace) -> int:
    """``jaxattn compare``: every option on the same held-out sequences, plus ablation and diagnostics."""
    from jaxattn import cli, pipeline, report
    from jaxattn.model import preset

    selected = parse_options(getattr(args, "options", None))
    train_steps = getattr(args, "train_steps", None)
    if train_steps is not None and int(train_steps) < 1:
        raise JaxattnError(f"--train-steps must be >= 1, got {train_steps}")
    skip_ablation = bool(getattr(args, "skip_ablation", False))
    skip_diagnostics = bool(getattr(args, "skip_diagnostics", False))
    run = cli.run_config_from_args(args)
    progress = not args.no_progress
    # Validate the model config and the output directory before any slow step.
    preset(run.preset, 2, **dict(run.model_overrides))
    out = report.ensure_out_dir(args.out)

    timer = pipeline.Timer()
    with timer.stage("load"):
        corpus, eval_corpus = pipeline.load_split(args.corpus, args.eval_corpus, run, progress=progress)
    tables = None
    if getattr(args, "load", None):
        from jaxattn import io

        with timer.stage("load_tables"):
            tables = io.load_tables(args.load)
    prep = pipeline.prepare(corpus, eval_corpus, run, tables=tables, progress=progress, timer=timer)

    results, base, seconds = run_all(
        prep, selected, train_steps=train_steps, progress=progress, need_baseline=not skip_diagnostics
    )
    ablation_rows = None
    if not skip_ablation:
        from jaxattn import options

        t0 = time.perf_counter()
        ablation_rows = options.ablation(prep, progress=progress)
        seconds["ablation"] = time.perf_counter() - t0
    diag, verdict_rows = None, None
    if not skip_diagnostics:
        from jaxattn import diagnostics

        diag = diagnostics.diagnose(prep, base.params, base.attn, progress=progress)
        verdict_rows = diagnostics.verdicts(diag)
    write_compare_outputs(
        out,
        prep,
        results,
        base=base,
        ablation_rows=ablation_rows,
        diag=diag,
        verdict_rows=verdict_rows,
        seconds=seconds,
        selected=selected,
        train_steps=train_steps,
    )
    return 0


def write_compare_outputs(
    out: Path,
    prep: Any,
    results: list[Any],
    *,
    base: Any = None,
    ablation_rows: list[dict[str, Any]] | None = None,
    diag: dict[str, Any] | None = None,
    verdict_rows: list[dict[str, str]] | None = None,
    seconds: dict[str, float] | None = None,
    selected: list[str] | None = None,
    train_steps: int | None = None,
) -> list[Path]:
    """Prints the comparison and writes every file (atomically). Returns the paths written."""
    from jaxattn import pipeline, report

    seconds = seconds or {}
    L = prep.config.num_layers
    records = [r for res in results for r in res.records]
    summaries = [option_summary(res.records, L, seconds.get(res.option)) for res in results]
    layer_rows = pipeline.layer_summary(records)
    c = prep.config
    print(
        f"corpus: {prep.corpus.source}  ({prep.corpus.num_docs} docs, {prep.corpus.num_tokens:,} tokens, "
        f"V={prep.corpus.vocab_size})"
    )
    print(
        f"eval:   {prep.eval_corpus.source}  ({prep.eval_corpus.num_tokens:,} tokens); "
        f"{prep.tokens.shape[0]} sequences x {prep.tokens.shape[1]} tokens, the same for every option"
    )
    print(
        f"model:  preset {prep.run.preset}: {c.num_layers} layers x {c.num_heads} heads, d_model {c.d_model}, "
        f"d_head {c.d_head}, max_n {c.max_n}, max_s {c.max_s}, weight_std {c.weight_std}"
    )
    print()
    print("options, means over all heads (layer 0 | layers 1+):")
    print(report.format_options_summary(summaries))
    print()
    print("per-option, per-layer means over heads (min-max over heads):")
    print(report.format_layer_summary(layer_rows))
    extras = {res.option: report.jsonable(res.extra) for res in results}
    for label, ex in extras.items():
        line = report.format_extra_scalars(ex)
        if line:
            print(f"{label}: {line}")

    files: list[Path] = []
    best = best_option(summaries) if summaries else None
    vocab = list(prep.corpus.tokenizer.vocab)
    with prep.timer.stage("report"):
        if results:
            p = out / "options_comparison.png"
            report.plot_options_comparison(p, layer_rows, [res.option for res in results])
            files.append(p)
            for res in results:
                files += report.plot_metric_heatmaps(out, res.records, prefix=f"heatmap_{res.option}")
            best_res = next(r for r in results if r.option == best)
            p = out / "expected_vs_actual_attention.png"
            report.plot_expected_vs_actual(
                p,
                prep.expected,
                prep.mask,
                prep.pair_index,
                best_res.attn,
                best_res.records,
                tokens=[vocab[t] for t in prep.tokens[0]],
                title=f"best option ({best}): expected (from counts) vs actual attention, sequence 0; key j on x, "
                "query i on y; blank = masked",
            )
            files.append(p)
        emb_stats: dict[str, Any] = {}
        if base is not None and base.params is not None:
            p = out / "embedding_similarity.png"
            emb_stats = report.plot_embedding_similarity(p, base.params["embed"], vocab)
            files.append(p)
        if ablation_rows is not None:
            print()
            print("Option 3 ablation (each row adds one ingredient to the row above):")
            print(_format_ablation(ablation_rows))
            report.write_json(out / "ablation.json", {"rows": report.jsonable(ablation_rows), "num_layers": L})
            p = out / "ablation.png"
            report.plot_ablation(p, ablation_rows)
            files += [out / "ablation.json", p]
        if diag is not None:
            from jaxattn import diagnostics

            rows = diagnostics.summary_rows(diag)
            print()
            print("root-cause diagnostics of the seed derivation (per layer):")
            print(report.format_diagnostics(rows))
            print()
            print("verdicts on the seed's explanations:")
            print(report.format_verdicts(verdict_rows or []))
            report.write_json(out / "diagnostics.json", {"diagnostics": diag, "verdicts": verdict_rows, "layers": rows})
            p = out / "diagnostics.png"
            report.plot_diagnostics(p, rows, diag)
            files += [out / "diagnostics.json", p]
    doc = report.metrics_document(
        records,
        config={
            "run": prep.run.to_dict(),
            "model": prep.config.to_dict(),
            "options": selected or [res.option for res in results],
            "train_steps": train_steps,
        },
        corpus=prep.corpus.info(),
        eval_corpus=prep.eval_corpus.info(),
        timings={**prep.timer.seconds, **{f"option_{k}": v for k, v in seconds.items()}},
        extra={
            "best_option": best,
            "options_summary": summaries,
            "layer_summary": layer_rows,
            "option_extras": extras,
            "embedding_similarity": emb_stats,
            "ablation": report.jsonable(ablation_rows),
            "diagnostics": diag,
            "verdicts": verdict_rows,
        },
    )
    report.write_json(out / "metrics.json", doc)
    files.append(out / "metrics.json")
    print()
    print(f"best option (tied argmax match, then cosine): {best}")
    print("wrote: " + ", ".join(str(f) for f in files))
    return files


def _format_ablation(rows: list[dict[str, Any]]) -> str:
    """The Option 3 module's own table when it has one, else a plain one."""
    try:
        from jaxattn.options import format_ablation

        return format_ablation(rows)
    except (ImportError, KeyError):
        from jaxattn import report

        return report.format_ablation_rows(rows)
