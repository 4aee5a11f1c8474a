"""Option 3: a closed-form derivation whose attention matches the counts, and its ablation table.

Ingredients, added one at a time from the seed derivation (the table accounts for the gap):
embedding-stream queries/keys, pseudo-inverses, calibrated temperature, n-gram-aware
queries, log-P target, frequency-weighted factorisation (jaxattn.options.DerivationConfig).

    python examples/option3_derivation.py [--corpus PATH] [--preset small|seed] [--out DIR]
        [--no-ablation] [--leave-one-out]
"""

from __future__ import annotations

from _common import guarded, parser, report_before_after, setup

from jaxattn.options import ablation, format_ablation, leave_one_out, run_option
from jaxattn.output import write_json


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--no-ablation", action="store_true", help="skip the ablation table (one derivation per row)")
    p.add_argument("--leave-one-out", action="store_true", help="also run Option 3 minus each ingredient")
    ex = setup(__doc__, arg_parser=p)
    progress = not ex.args.no_progress
    after = guarded(lambda: run_option(ex.prep, "3", progress=progress, timer=ex.timer))
    tau = after.extra["tau"]
    print("calibrated tau per layer (mean over heads): " + " ".join(f"{sum(t) / len(t):.3f}" for t in tau))
    extra = {}
    if not ex.args.no_ablation:
        rows = guarded(lambda: ablation(ex.prep, progress=progress, timer=ex.timer))
        print("ablation (each row adds one ingredient to the row above; row 0 is the seed):")
        print(format_ablation(rows))
        print()
        extra["ablation"] = rows
        write_json(ex.out / "ablation.json", rows)
    if ex.args.leave_one_out:
        loo = guarded(lambda: leave_one_out(ex.prep, progress=progress, timer=ex.timer))
        print("leave-one-out (Option 3 without one ingredient; row 0 is Option 3):")
        print(format_ablation(loo))
        print()
        extra["leave_one_out"] = loo
    report_before_after(
        ex, after, title="Option 3: closed-form log-P derivation (before: seed derivation)", extra=extra
    )


if __name__ == "__main__":
    main()
