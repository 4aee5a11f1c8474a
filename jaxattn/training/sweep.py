"""The fair comparison: every init on the same data order and optimiser, over a small learning-rate grid.

:func:`sweep` trains each (init, lr), :func:`best_per_init` keeps each init's best final bits,
:func:`steps_to_reach` reads how many steps a curve needs to reach a target (the derived init's
step-0 bits), :func:`format_sweep` prints the table and :func:`plot_curves` draws the figure
(bits/token against steps, and the per-layer cosine against steps).
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping, Sequence
from typing import Any

from jaxattn.model import ModelConfig, Params
from jaxattn.output.files import atomic_open
from jaxattn.training.loop import EvalSet, LMTrainConfig, TrainData, init_state, train

__all__ = ["best_per_init", "format_sweep", "plot_curves", "steps_to_reach", "sweep"]


def sweep(
    inits: Mapping[str, Params],
    config: ModelConfig,
    cfg: LMTrainConfig,
    data: TrainData,
    evalset: EvalSet,
    lrs: Sequence[float],
    *,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Trains every init at every learning rate (same data, same schedule shape).

    Args:
        inits: name -> initial params (e.g. ``{"derived": ..., "random0": ...}``).
        config: the model config.
        cfg: the settings (``learning_rate`` is replaced by each of ``lrs``).
        data: the training batches (the same for every run).
        evalset: the held-out sequences.
        lrs: the learning-rate grid.
        progress: progress bars.

    Returns:
        One row per run: ``{"init", "lr", "bits_start", "bits_end", "curves", "seconds"}``.
    """
    rows = []
    for name, params in inits.items():
        for lr in lrs:
            run_cfg = LMTrainConfig(**{**cfg.to_dict(), "learning_rate": float(lr)})
            t0 = time.perf_counter()
            state, _ = train(init_state(params, run_cfg), config, run_cfg, data, evalset=evalset, progress=progress)
            c = state.curves
            rows.append(
                {
                    "init": name,
                    "lr": float(lr),
                    "bits_start": c["eval_bits_per_token"][0],
                    "bits_end": c["eval_bits_per_token"][-1],
                    "curves": c,
                    "seconds": time.perf_counter() - t0,
                }
            )
    return rows


def best_per_init(rows: Sequence[Mapping[str, Any]]) -> dict[str, Mapping[str, Any]]:
    """Each init's row with the lowest final bits."""
    best: dict[str, Mapping[str, Any]] = {}
    for r in rows:
        if r["init"] not in best or r["bits_end"] < best[r["init"]]["bits_end"]:
            best[r["init"]] = r
    return best


def steps_to_reach(curves: Mapping[str, Any], target: float) -> int | None:
    """The first evaluated step whose bits/token is <= ``target`` (None: never)."""
    for s, b in zip(curves["steps"], curves["eval_bits_per_token"], strict=True):
        if b <= target:
            return int(s)
    return None


def format_sweep(rows: Sequence[Mapping[str, Any]], target: float | None = None) -> str:
    """The sweep table: init, lr, bits at step 0, at the end, steps to ``target``; best lr per init starred."""
    best = {k: id(v) for k, v in best_per_init(rows).items()}
    lines = [f"{'init':<10} {'lr':>8} {'bits@0':>8} {'bits@end':>9} {'steps->target':>14}  best"]
    for r in rows:
        reach = steps_to_reach(r["curves"], target) if target is not None else None
        star = "*" if best[r["init"]] == id(r) else ""
        reach_s = "-" if reach is None else str(reach)
        lines.append(
            f"{r['init']:<10} {r['lr']:>8.0e} {r['bits_start']:>8.4f} {r['bits_end']:>9.4f} {reach_s:>14}  {star}"
        )
    return "\n".join(lines)


def plot_curves(path: str | os.PathLike[str], runs: Mapping[str, Mapping[str, Any]]) -> None:
    """Two panels: held-out bits/token against steps, and per-layer cosine against steps.

    Args:
        path: the PNG.
        runs: label -> curves (``steps``, ``eval_bits_per_token``, ``layer_alignment``).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for label, c in runs.items():
        line = ax1.plot(c["steps"], c["eval_bits_per_token"], marker=".", label=label)[0]
        if c["layer_alignment"] and c["layer_alignment"][0]:
            L = len(c["layer_alignment"][0])
            for l in range(L):
                cos = [ev[l]["cosine"] for ev in c["layer_alignment"]]
                ax2.plot(c["steps"], cos, color=line.get_color(), alpha=0.4 + 0.6 * (l + 1) / L, label=f"{label} L{l}")
    ax1.set(xlabel="step", ylabel="held-out bits/token", title="held-out bits/token")
    ax2.set(xlabel="step", ylabel="mean cosine with expected attention", title="per-layer alignment")
    ax1.legend(fontsize=7)
    ax2.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    with atomic_open(path, "wb") as f:
        fig.savefig(f, format="png", dpi=100)
    plt.close(fig)
