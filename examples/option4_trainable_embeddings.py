"""Option 4: train the token embeddings E with optax; every derived attention weight stays frozen.

Starts from the seed derivation, trains only E (Adam) on sequences of the COUNT corpus against
KL(expected || actual) attention (``--objective kl``, default) or next-token cross-entropy
(``--objective ce``), checks that W_Q, W_K, W_V, W_O, the MLP and the LayerNorms are bit-identical
afterwards, and scores the held-out text before and after. Writes ``training_curves.png``,
``before_after.png``, ``expected_vs_actual_attention.png`` and ``metrics.json`` into ``--out``.

    python examples/option4_trainable_embeddings.py                       # built-in corpus, small preset
    python examples/option4_trainable_embeddings.py --corpus ../shared/data/shakespeare --heldout lear
    python examples/option4_trainable_embeddings.py --preset seed --corpus ../shared/data/shakespeare --heldout lear
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from _common import guarded, parser, report_before_after, setup

from jaxattn.options import default_train_config, run_option
from jaxattn.output import atomic_open


def plot_curves(path: Path, curves: dict[str, Any], title: str) -> None:
    """Training loss per step, and held-out per-layer cosine / tie-aware argmax match per evaluation."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 3.8))
    loss = np.asarray(curves["loss"])
    steps = np.asarray(curves["step"])
    axes[0].plot(steps, loss, lw=0.8, alpha=0.5, label="per step")
    if loss.size >= 10:
        k = max(loss.size // 20, 2)
        smooth = np.convolve(loss, np.ones(k) / k, mode="valid")
        axes[0].plot(steps[k - 1 :], smooth, lw=1.8, label=f"moving mean ({k})")
    axes[0].set_xlabel("step")
    axes[0].set_ylabel("training loss (count-corpus batches)")
    axes[0].legend(fontsize=8)
    ev = np.asarray(curves["eval_step"])
    for ax, key, name in (
        (axes[1], "eval_cosine", "held-out cosine"),
        (axes[2], "eval_argmax_match_tied", "held-out tie-aware argmax match"),
    ):
        vals = np.asarray(curves[key])  # [evals, L]
        cmap = plt.get_cmap("viridis")
        for l in range(vals.shape[1]):
            ax.plot(ev, vals[:, l], marker="o", ms=3, color=cmap(l / max(vals.shape[1] - 1, 1)), label=f"L{l}")
        ax.set_xlabel("step")
        ax.set_ylabel(f"{name} (mean over heads)")
        ax.grid(alpha=0.3)
    axes[2].legend(fontsize=6, ncol=2)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    with atomic_open(path, "wb") as f:
        fig.savefig(f, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=None, help="training steps (default: by model size)")
    p.add_argument("--objective", choices=("kl", "ce"), default="kl", help="kl (default) or ce")
    p.add_argument("--lr", type=float, default=None, help="Adam peak learning rate")
    p.add_argument("--batch-size", type=int, default=None, help="training sequences per step")
    p.add_argument("--train-seq-len", type=int, default=None, help="tokens per training sequence (default --seq-len)")
    p.add_argument("--balance", choices=("tables", "queries"), default=None, help="KL weighting over heads")
    p.add_argument("--eval-every", type=int, default=None, help="held-out evaluation every this many steps")
    ex = setup(__doc__, arg_parser=p)
    a = ex.args
    overrides = {
        "steps": a.steps,
        "objective": a.objective,
        "learning_rate": a.lr,
        "batch_size": a.batch_size,
        "seq_len": a.train_seq_len,
        "balance": a.balance,
        "eval_every": a.eval_every,
    }
    cfg = guarded(lambda: default_train_config(ex.prep.config, ex.prep.run, **overrides))
    c = cfg
    print(
        f"training E: {c.steps} steps x {c.batch_size} count-corpus sequences of {c.seq_len} tokens, "
        f"objective {c.objective}{f' (balance {c.balance})' if c.objective == 'kl' else ''}, Adam lr {c.learning_rate:g}"
    )
    after = guarded(
        lambda: run_option(
            ex.prep, "4", progress=not a.no_progress, timer=ex.timer, baseline=ex.baseline, train_cfg=cfg
        )
    )
    x = after.extra
    cur = x["curves"]
    print(
        f"trained {', '.join(x['trained_leaves'])}: {cur['steps_per_sec']:.2f} steps/s "
        f"(compile {cur['compile_s']:.1f} s, traced {x['num_traces']}x); frozen weights bit-identical: "
        f"{x['frozen_bit_identical']}"
    )
    emb = x["embedding"]
    print(
        f"E moved by {emb['relative_change']:.1%} (row norms {emb['row_norm_mean_before']:.2f} -> "
        f"{emb['row_norm_mean_after']:.2f}; mean direction cosine {emb['direction_cos_mean']:.3f}; "
        f"off-diagonal |cos| {emb['offdiag_abs_cos_before']:.3f} -> {emb['offdiag_abs_cos_after']:.3f})"
    )
    sc = x["score_scale"]
    print("how far frozen weights let scores move (per layer): bound on |score| = D * sigma_max(Wq Wk^T) / sqrt(K)")
    for l, bound in enumerate(sc["score_bound"]):
        print(
            f"  L{l}: bound {bound:7.2f}; realised mean row logit range "
            f"{sc['logit_range_mean_before'][l]:6.2f} -> {sc['logit_range_mean_after'][l]:6.2f}"
        )
    imp = x["improved_every_layer"]
    print("improved on every layer: " + ", ".join(f"{k} {'yes' if v else 'no'}" for k, v in imp.items()))
    out = ex.out
    plot_curves(
        out / "training_curves.png",
        cur,
        f"Option 4 ({c.objective}): training loss and held-out alignment per layer, preset {ex.prep.run.preset}",
    )
    report_before_after(
        ex, after, title=f"Option 4: trained embeddings, frozen attention ({c.steps} steps, {c.objective})"
    )
    print(f"wrote: {out / 'training_curves.png'}")


if __name__ == "__main__":
    main()
