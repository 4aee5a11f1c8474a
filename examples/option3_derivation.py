"""Option 3: a standard GPT-2 whose every weight comes from the counts, its ablation, and an HF export.

The model is an unmodified pre-LN GPT-2 run by the ordinary forward pass (no hook): residual
subspaces orthogonal to the all-ones vector, a preparation block with a previous-token head,
closed-form MLP n-gram detectors, a norm-keeping pad (jaxattn.options.gpt2). Its attention
follows the counts on every layer, and as a language model it is its own smoothed n-gram model.

    python examples/option3_derivation.py [--corpus PATH] [--preset small|seed] [--out DIR]
        [--no-ablation] [--oracle-ablation] [--prep-blocks N] [--approximate] [--export DIR]
"""

from __future__ import annotations

from _common import guarded, parser, report_before_after, setup

from jaxattn.options import GPT2Config, ablation, format_ablation, oracle_ablation, run_option
from jaxattn.output import layout_heads, save_gpt2_checkpoint, vocab_from_tokenizer, write_json


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--no-ablation", action="store_true", help="skip the ablation table (one model per row)")
    p.add_argument("--oracle-ablation", action="store_true", help="also the oracle-inputs derivation's own ablation")
    p.add_argument("--prep-blocks", type=int, default=None, help="preparation blocks (default: as the detectors need)")
    p.add_argument("--approximate", action="store_true", help="keep the most frequent contexts when MLPs are narrow")
    p.add_argument("--export", default=None, metavar="DIR", help="also write the model as a HuggingFace GPT-2")
    ex = setup(__doc__, arg_parser=p)
    progress = not ex.args.no_progress
    gcfg = GPT2Config(prep_blocks=ex.args.prep_blocks, approximate=ex.args.approximate)
    after = guarded(lambda: run_option(ex.prep, "3", progress=progress, timer=ex.timer, derivation=gcfg))
    dims, units = after.extra["residual_dims"], after.extra["mlp_units"]
    print(f"residual: {dims['used']} of d_model {dims['d_model']} dims; blocks {dims}")
    print(f"MLP units: needed {units['needed']}, kept {units['kept']}, {units['per_mlp']} per MLP")
    lm = after.language_model or {}
    print(
        f"next-token bits/token: model {lm.get('derived_bits_per_token', float('nan')):.4f}, "
        f"its n-gram model {lm.get('ngram_bits_per_token', float('nan')):.4f}, "
        f"uniform {lm.get('uniform_bits_per_token', float('nan')):.4f}"
    )
    extra = {}
    if not ex.args.no_ablation:
        rows = guarded(lambda: ablation(ex.prep, progress=progress, timer=ex.timer))
        print("ablation (steps add one ingredient to the row above; '-' rows change Option 3; the ceiling")
        print("is the oracle-inputs derivation, whose queries are told their n-gram through a hook):")
        print(format_ablation(rows))
        print()
        extra["ablation"] = rows
        write_json(ex.out / "ablation.json", rows)
    if ex.args.oracle_ablation:
        rows = guarded(lambda: oracle_ablation(ex.prep, progress=progress, timer=ex.timer))
        print("the oracle-inputs derivation's own ablation (row 0 is the seed):")
        print(format_ablation(rows))
        print()
        extra["oracle_ablation"] = rows
    if ex.args.export:
        assert after.params is not None
        files = save_gpt2_checkpoint(
            ex.args.export,
            after.params,
            ex.prep.config,
            vocab=vocab_from_tokenizer(ex.prep.corpus.tokenizer),
            layout=layout_heads(after.params, ex.prep.config),
            meta={"option": "3", "preset": ex.args.preset},
        )
        print("HuggingFace GPT-2 checkpoint: " + ", ".join(str(f) for f in files))
    report_before_after(
        ex, after, title="Option 3: a standard GPT-2 derived from the counts (before: seed)", extra=extra
    )


if __name__ == "__main__":
    main()
