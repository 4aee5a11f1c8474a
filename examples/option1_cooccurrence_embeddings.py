"""Option 1: token embeddings from the corpus (PPMI + SVD) under the unchanged seed derivation.

Embeddings: PPMI of symmetric co-occurrence counts within ``--window`` tokens (read from
the C^{1,s} skip-bigram tables), context-distribution smoothing alpha = 0.75, truncated
SVD, eigenvalue weighting U Σ^{1/2}, unit rows, placed into d_model by a fixed random
orthogonal map (Levy, Goldberg & Dagan 2015). Everything else is the seed system.

    python examples/option1_cooccurrence_embeddings.py [--corpus PATH] [--preset small|seed] [--out DIR]
"""

from __future__ import annotations

from _common import guarded, parser, report_before_after, setup

from jaxattn.options import PPMIConfig, run_option


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--window", type=int, default=4, help="co-occurrence window in tokens (default 4)")
    p.add_argument("--alpha", type=float, default=0.75, help="context-distribution smoothing (default 0.75)")
    p.add_argument("--shift", type=float, default=0.0, help="PMI shift log k (default 0)")
    ex = setup(__doc__, arg_parser=p)
    cfg = guarded(lambda: PPMIConfig(window=ex.args.window, alpha=ex.args.alpha, shift=ex.args.shift))
    after = guarded(lambda: run_option(ex.prep, "1", progress=not ex.args.no_progress, timer=ex.timer, ppmi=cfg))
    info = after.extra["ppmi"]
    print(
        f"PPMI: density {info['ppmi_density']:.2f}, "
        f"mean |cos| between token embeddings {info['embedding_offdiag_abs_cos_mean']:.3f}"
    )
    report_before_after(ex, after, title="Option 1: PPMI+SVD embeddings, seed derivation (before: random embeddings)")


if __name__ == "__main__":
    main()
