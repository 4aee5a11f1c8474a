"""``jaxattn export``: one option's derived model as a HuggingFace GPT-2 checkpoint.

The option runs exactly as under ``jaxattn analyze`` (same corpus, preset and flags), so its
alignment is measured on the way and printed as the per-layer summary. Then its parameters
are written with :func:`jaxattn.output.save_gpt2_checkpoint`.

Outputs in ``--out``: ``config.json``, ``model.safetensors``, ``vocab.json`` and
``jaxattn_layout.json`` (format: :mod:`jaxattn.output.hf`), which
``transformers.GPT2LMHeadModel.from_pretrained(DIR)`` loads as it is. The model's preparation
blocks (Option 3 has at least one) are exported ahead of the layout layers; the
``"jaxattn"`` block of ``config.json`` records the run, the per-layer alignment, the
next-token bits per token (also printed) and, for Option 3, the construction and its
capacity figures (:data:`CONSTRUCTION_KEYS`).

Only a model whose forward is a plain GPT-2 exports: an option registered as not exportable
(Option 2 gathers its attention logits from the count tables), one with no parameter pytree,
or one whose attention the plain forward pass does not reproduce (it used a hook) is refused
with exit status 2 and one line on stderr, as is a config GPT-2 cannot hold.
"""

from __future__ import annotations

import argparse
from typing import Any

import numpy as np

from jaxattn import options
from jaxattn.cli.common import add_common_arguments, cli_timer, load_and_prepare, positive_int, run_config_from_args
from jaxattn.errors import JaxattnError
from jaxattn.model import preset
from jaxattn.output import (
    check_gpt2_config,
    ensure_out_dir,
    layout_heads,
    save_gpt2_checkpoint,
    tables,
    vocab_from_tokenizer,
)
from jaxattn.pipeline import AnalysisResult, Prepared, batched_attention, layer_summary

__all__ = [
    "CONSTRUCTION_KEYS",
    "HOOK_TOLERANCE",
    "add_parser",
    "check_plain_forward",
    "cmd_export",
    "exportable_options",
]

#: Largest difference between the option's attention and the plain forward's that still counts as "no hook".
HOOK_TOLERANCE = 1e-5

#: Keys of an option's ``extra`` copied into the checkpoint's provenance (Option 3's construction).
CONSTRUCTION_KEYS = ("architecture", "construction", "prep_blocks", "residual_dims", "mlp_units", "layernorm_gain")


def exportable_options() -> list[str]:
    """The names of the registered options whose model is a plain GPT-2, in canonical order."""
    return [spec.name for spec in options.REGISTRY.values() if spec.exportable]


def add_parser(sub: Any) -> argparse.ArgumentParser:
    """Adds the ``export`` subcommand to ``sub`` (an argparse subparsers action)."""
    e = sub.add_parser(
        "export",
        help="write one option's derived model as a HuggingFace GPT-2 checkpoint "
        "(config.json, model.safetensors, vocab.json, jaxattn_layout.json)",
        description="Runs one option as `jaxattn analyze` does (its per-layer alignment is printed), then writes its "
        "model to --out as a HuggingFace GPT-2 checkpoint that transformers.GPT2LMHeadModel.from_pretrained(DIR) "
        "loads as it is. Only options whose model is a plain GPT-2 export. "
        "Example: jaxattn export --option 1 --corpus plays/ --preset small --out gpt2_option1",
    )
    add_common_arguments(e)
    e.add_argument(
        "--option",
        choices=options.OPTIONS,
        default="baseline",
        help=f"which option's model to export: one of {', '.join(exportable_options())} (those that are a plain "
        "GPT-2, with no hook; default baseline)",
    )
    e.add_argument(
        "--n-positions",
        type=positive_int("--n-positions"),
        default=None,
        help="GPT-2 n_positions of a model without learned positions (its wpe is then zeros; default 1024); "
        "a model with learned positions keeps its own n_ctx",
    )
    return e


def _refuse_spec(name: str) -> None:
    """Refuses an option registered as not exportable, before any slow step."""
    spec = options.REGISTRY[name]
    if not spec.exportable:
        raise JaxattnError(
            f"option {name} cannot be exported as GPT-2: it needs a hook ({spec.description}), which a GPT-2 "
            f"does not compute; exportable options: {', '.join(exportable_options())}"
        )


def check_plain_forward(prep: Prepared, result: AnalysisResult, name: str) -> float:
    """Checks that the plain forward pass of ``result.params`` reproduces the option's attention.

    An option that ran its model with a ``qk_inputs`` or ``attn_logits`` hook has attention that
    the params alone, run as a GPT-2, do not give: that model cannot be exported.

    Args:
        prep: the prepared run (its evaluation sequences).
        result: the option's result (``params`` and ``attn`` [B, L, H, T, T]).
        name: the option's name, for the message.

    Returns:
        The max abs difference (<= :data:`HOOK_TOLERANCE`).

    Raises:
        JaxattnError: no parameter pytree, or a difference above :data:`HOOK_TOLERANCE`.
    """
    if result.params is None:
        raise JaxattnError(f"option {name} cannot be exported: it has no parameter pytree, only attention")
    attn = batched_attention(result.params, prep.tokens, prep.config, batch_size=prep.run.batch_size, progress=False)
    diff = float(np.max(np.abs(attn - np.asarray(result.attn)))) if attn.shape == result.attn.shape else np.inf
    if not diff <= HOOK_TOLERANCE:
        raise JaxattnError(
            f"option {name} cannot be exported as GPT-2: its attention needs a hook (the plain forward pass of its "
            f"params differs from it by {diff:.3g} > {HOOK_TOLERANCE:g})"
        )
    return diff


def _meta(prep: Prepared, result: AnalysisResult, name: str, rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The provenance written in the ``"jaxattn"`` block of ``config.json``."""
    tok = prep.corpus.tokenizer
    return {
        "option": name,
        "label": result.option,
        "preset": prep.run.preset,
        "tokenizer": {"kind": tok.kind, "unk_id": tok.unk_id, "lowercase": tok.lowercase},
        "run": prep.run.to_dict(),
        "corpus": prep.corpus.info(),
        "eval_corpus": prep.eval_corpus.info(),
        "layer_summary": [{k: r[k] for k in ("layer", "n", "cosine", "cosine_min", "argmax_match_tied")} for r in rows],
        "language_model": result.language_model,
        **{k: result.extra[k] for k in CONSTRUCTION_KEYS if k in result.extra},
    }


def cmd_export(args: argparse.Namespace) -> int:
    """``jaxattn export``."""
    name = str(args.option)
    _refuse_spec(name)
    run = run_config_from_args(args)
    check_gpt2_config(preset(run.preset, 2, **dict(run.model_overrides)))  # also validates the preset
    out = ensure_out_dir(args.out)
    progress = not args.no_progress
    timer = cli_timer(args)
    prep, _ = load_and_prepare(args, run, timer=timer, progress=progress)
    result = options.run_option(prep, name, progress=progress, timer=timer)
    check_plain_forward(prep, result, name)
    assert result.params is not None  # checked above
    rows = layer_summary(result.records)
    print(tables.run_header(prep))
    print()
    print(f"{result.option}: per-layer means over heads (min-max over heads):")
    print(tables.format_layer_summary(rows))
    lm_text = tables.format_language_model({result.option: result.language_model})
    if lm_text:
        print()
        print(lm_text)
    with timer.stage("export"):
        files = save_gpt2_checkpoint(
            out,
            result.params,
            prep.config,
            vocab=vocab_from_tokenizer(prep.corpus.tokenizer),
            layout=layout_heads(result.params, prep.config),
            meta=_meta(prep, result, name, rows),
            n_positions=args.n_positions,
        )
    print()
    print("wrote: " + ", ".join(str(f) for f in files))
    return 0
