"""``jaxattn score``: which skip-n-gram table each head of any GPT-2 checkpoint follows.

Loads a checkpoint in HF's GPT-2 layout (:func:`jaxattn.output.load_any_gpt2_checkpoint`: a
``jaxattn export`` or one ``transformers`` saved), counts every table ``C^{n,s}`` with
``n <= --max-n`` and ``s <= --max-s`` (default 3 and 3) on ``--corpus``, draws the evaluation
sequences as ``jaxattn analyze`` does (same ``--seed``, ``--seq-len``, ``--num-seqs``: the same
windows of the held-out text) and scores every head of every block against every table
(:func:`jaxattn.alignment.score_heads`).

Vocabulary: the counts live in the corpus tokenizer's ids; the model reads its own. The
checkpoint's ``vocab.json`` (token -> id) must hold every token of the corpus vocabulary, and
the sequences are fed through that map (:func:`checkpoint_ids`); the tables and the expected
attention stay in corpus ids. A checkpoint without ``vocab.json`` is refused unless
``--vocab-size-match`` is given and its ``vocab_size`` equals the corpus's: then ids are fed as
they are. Either refusal is exit status 2 and one line on stderr, before any counting.

Outputs in ``--out``: ``scores.json`` (:func:`scores_document`: ``{"heads": [{"block", "head",
"best": {"n", "s", "cosine", "argmax_match_tied", "kl"}}, ...], "pairs", "matrix", ...}``; for a
jaxattn export each head of ``jaxattn_layout.json`` also gets its ``"layout"`` (n, s) and how its
own table scored) and ``head_scores.png`` (heads x (n, s) heatmap of the cosine, each head's best
cell ringed, its layout cell crossed); ``report.html`` gains a "Head scores" tab (a report jaxattn
wrote in ``--out`` keeps its other tabs; a new one has that tab alone; any other file is left as it is).
"""

# ruff: noqa: F722  (jaxtyping shape strings such as "R V" are not Python expressions)
from __future__ import annotations

import argparse
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from jaxattn.alignment import HeadScores, sample_sequences, score_heads
from jaxattn.cli.common import byte_count, cli_timer, non_negative_int, positive_int
from jaxattn.corpus import Corpus
from jaxattn.counts import count_tables
from jaxattn.errors import JaxattnError
from jaxattn.output import GPT2Checkpoint, ensure_out_dir, load_any_gpt2_checkpoint, write_json
from jaxattn.output.files import atomic_open
from jaxattn.output.html_report import write_score_report
from jaxattn.pipeline import RunConfig, load_split, run_key
from jaxattn.typing import Int
from jaxattn.version import VERSION

__all__ = [
    "SCHEMA_VERSION",
    "add_parser",
    "checkpoint_ids",
    "cmd_score",
    "format_scores",
    "plot_head_scores",
    "scores_document",
]

#: ``schema_version`` of ``scores.json``.
SCHEMA_VERSION = 1


def add_parser(sub: Any) -> argparse.ArgumentParser:
    """Adds the ``score`` subcommand to ``sub`` (an argparse subparsers action)."""
    p = sub.add_parser(
        "score",
        help="score every head of a GPT-2 checkpoint against every (n, s) count table",
        description="Loads a GPT-2 checkpoint in HF's layout (config.json + model.safetensors, and vocab.json to map "
        "its ids onto the corpus tokenizer), counts the (n, s) tables on --corpus and reports, per head, the "
        "best-matching (n, s) with its cosine, tied argmax and KL. Writes OUT/scores.json and OUT/head_scores.png. "
        "Example: jaxattn score --model gpt2_option3 --corpus plays/ --heldout lear --out scores",
    )
    p.add_argument("--model", required=True, help="checkpoint directory (config.json, model.safetensors, vocab.json)")
    p.add_argument("--corpus", default=None, help="text file, directory or glob (default: Python stdlib docstrings)")
    p.add_argument("--eval-corpus", default=None, help="text the heads are scored on (default: held out of --corpus)")
    p.add_argument("--heldout", default=None, help="held-out split when no --eval-corpus: a document name or fraction")
    p.add_argument(
        "--tokenizer", choices=("char", "word"), default="char", help="corpus tokenizer the counts use (default char)"
    )
    p.add_argument("--max-vocab", type=positive_int("--max-vocab"), default=None, help="word level: top-k plus <unk>")
    p.add_argument("--max-n", type=positive_int("--max-n"), default=3, help="longest context scored (default 3)")
    p.add_argument("--max-s", type=non_negative_int("--max-s"), default=3, help="largest skip scored (default 3)")
    p.add_argument("--seq-len", type=positive_int("--seq-len"), default=64, help="tokens per sequence T (default 64)")
    p.add_argument("--num-seqs", type=positive_int("--num-seqs"), default=32, help="evaluation sequences (default 32)")
    p.add_argument(
        "--batch-size", type=positive_int("--batch-size"), default=16, help="sequences per forward call (default 16)"
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the sequence draw (default 0, as analyze)")
    p.add_argument("--max-dense-bytes", type=byte_count, default=None, help="dense-array budget (default 4 GiB)")
    p.add_argument(
        "--vocab-size-match",
        action="store_true",
        help="a checkpoint without vocab.json: feed corpus ids as they are (its vocab_size must equal the corpus's)",
    )
    p.add_argument("--out", default="jaxattn_score", help="output directory (default: ./jaxattn_score)")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    return p


def _few(items: Sequence[str], k: int = 5) -> str:
    shown = ", ".join(repr(t) for t in items[:k])
    return shown + (", ..." if len(items) > k else "")


def checkpoint_ids(
    corpus_vocab: Sequence[str], ckpt_vocab: Mapping[str, int], ckpt_vocab_size: int, *, size_match: bool = False
) -> Int[np.ndarray, " V"]:
    """The checkpoint's id of each corpus token: ``model_tokens = ids[corpus_tokens]``.

    Args:
        corpus_vocab: the corpus tokenizer's vocabulary, id -> token string (V entries).
        ckpt_vocab: the checkpoint's ``vocab.json``, token -> id (empty: it has none).
        ckpt_vocab_size: the checkpoint's ``vocab_size``.
        size_match: without a ``vocab.json``, map id i to i when the sizes are equal.

    Returns:
        int32 [V] checkpoint ids (distinct, in ``[0, ckpt_vocab_size)``).

    Raises:
        JaxattnError: no ``vocab.json`` (and no size match), ids out of range, or corpus tokens the
            checkpoint lacks (how many, and a few of them).
    """
    V = len(corpus_vocab)
    if not ckpt_vocab:
        if size_match and int(ckpt_vocab_size) == V:
            return np.arange(V, dtype=np.int32)
        why = "" if not size_match else f" and its vocab_size={ckpt_vocab_size} differs from the corpus's V={V}"
        raise JaxattnError(
            f"the checkpoint has no vocab.json{why}: cannot map its ids onto the corpus tokenizer "
            f"(--vocab-size-match feeds corpus ids as they are when vocab_size equals the corpus's V={V})"
        )
    bad = sorted(t for t, i in ckpt_vocab.items() if not 0 <= int(i) < int(ckpt_vocab_size))
    if bad:
        raise JaxattnError(f"vocab.json maps {len(bad)} tokens outside vocab_size={ckpt_vocab_size}: {_few(bad)}")
    missing = [t for t in corpus_vocab if t not in ckpt_vocab]
    if missing:
        raise JaxattnError(
            f"the checkpoint's vocabulary cannot be mapped onto the corpus tokenizer: {len(missing)} of the "
            f"corpus's {V} tokens are not in its vocab.json, e.g. {_few(missing)}"
        )
    ids = np.array([int(ckpt_vocab[t]) for t in corpus_vocab], np.int32)
    if np.unique(ids).size != V:
        raise JaxattnError("vocab.json gives two corpus tokens the same id: cannot map it onto the corpus tokenizer")
    return ids


def _layout_by_head(ckpt: GPT2Checkpoint) -> dict[tuple[int, int], tuple[int, int]]:
    return {(int(e["block"]), int(e["head"])): (int(e["n"]), int(e["s"])) for e in ckpt.layout}


def scores_document(scores: HeadScores, ckpt: GPT2Checkpoint, extra: Mapping[str, Any]) -> dict[str, Any]:
    """The ``scores.json`` document.

    Args:
        scores: :func:`jaxattn.alignment.score_heads`'s result.
        ckpt: the checkpoint (its ``layout``, when it has one, annotates the heads).
        extra: provenance merged in (model, corpus, run, vocabulary mapping).

    Returns:
        :meth:`HeadScores.to_json` plus ``schema_version``, ``version`` and ``layout_match``
        (``{"heads", "own_best"}``, or None without a layout); each head of the layout also gets
        ``"layout": {"layer", "n", "s", "cosine", "rank"}`` (rank 1: its own table scored best).
    """
    doc = scores.to_json()
    layout = _layout_by_head(ckpt)
    layers = {(int(e["block"]), int(e["head"])): int(e["layer"]) for e in ckpt.layout}
    own = 0
    for entry in doc["heads"]:
        b, h = entry["block"], entry["head"]
        if (b, h) not in layout or layout[(b, h)] not in scores.pairs:
            continue
        p = scores.pairs.index(layout[(b, h)])
        rank = 1 + int(np.sum(scores.cosine[b, h] > scores.cosine[b, h, p]))
        n, s = layout[(b, h)]
        entry["layout"] = {
            "layer": layers[(b, h)],
            "n": n,
            "s": s,
            "cosine": float(scores.cosine[b, h, p]),
            "rank": rank,
        }
        own += int(scores.best[b, h]) == p
    match = {"heads": len(layout), "own_best": own} if layout else None
    return {"schema_version": SCHEMA_VERSION, "version": VERSION, **doc, "layout_match": match, **dict(extra)}


def format_scores(doc: Mapping[str, Any]) -> str:
    """The per-head table printed by ``jaxattn score``: block, head, best (n, s), cosine, tied, KL (and layout)."""
    has_layout = any("layout" in e for e in doc["heads"])
    head = f"{'block':>5} {'head':>4} {'best':>6} {'cosine':>7} {'tied':>6} {'KL':>7}" + (
        f" {'layout':>6} {'own cos':>7}" if has_layout else ""
    )
    lines = [head, "-" * len(head)]
    for e in doc["heads"]:
        b = e["best"]
        line = (
            f"{e['block']:>5} {e['head']:>4} {'(' + str(b['n']) + ',' + str(b['s']) + ')':>6} {b['cosine']:7.4f} "
            f"{b['argmax_match_tied']:6.1%} {b['kl']:7.3f}"
        )
        if "layout" in e:
            lay = e["layout"]
            line += f" {'(' + str(lay['n']) + ',' + str(lay['s']) + ')':>6} {lay['cosine']:7.4f}"
        lines.append(line)
    return "\n".join(lines)


def plot_head_scores(path: Path, scores: HeadScores, layout: Mapping[tuple[int, int], tuple[int, int]]) -> None:
    """Heads x (n, s) heatmap of the mean cosine; each head's best cell ringed, its layout (n, s) crossed.

    Args:
        path: the PNG to write.
        scores: the head scores.
        layout: (block, head) -> its layout (n, s), for the heads that have one.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    NB, H, P = scores.cosine.shape
    img = scores.cosine.reshape(NB * H, P)
    fig, ax = plt.subplots(figsize=(2.5 + 0.55 * P, 1.5 + 0.16 * NB * H))
    im = ax.imshow(img, aspect="auto", cmap="viridis", vmin=0.0, vmax=1.0, interpolation="nearest")
    rows = np.arange(NB * H)
    ax.scatter(scores.best.reshape(-1), rows, s=28, facecolors="none", edgecolors="red", linewidths=1.2, label="best")
    marks = [
        (r, scores.pairs.index(layout[(r // H, r % H)])) for r in rows if layout.get((r // H, r % H)) in scores.pairs
    ]
    if marks:
        ax.scatter([c for _, c in marks], [r for r, _ in marks], s=18, marker="x", c="white", label="layout (n, s)")
    ax.set_xticks(range(P), [f"({n},{s})" for n, s in scores.pairs], rotation=90, fontsize=7)
    step = max(1, (NB * H) // 60)
    ax.set_yticks(rows[::step], [f"b{r // H}.h{r % H}" for r in rows[::step]], fontsize=6)
    for b in range(1, NB):
        ax.axhline(b * H - 0.5, color="white", linewidth=0.6)
    ax.set_xlabel("(n, s) table")
    ax.set_ylabel("block.head")
    ax.set_title("mean cosine of each head with each table's expected attention", fontsize=9)
    ax.legend(loc="upper right", fontsize=6, framealpha=0.6)
    fig.colorbar(im, ax=ax, fraction=0.04)
    fig.tight_layout()
    with atomic_open(path, "wb") as f:
        fig.savefig(f, format="png", dpi=110)
    plt.close(fig)


def _run_config(args: argparse.Namespace) -> RunConfig:
    heldout: str | float | None = args.heldout
    if isinstance(heldout, str):
        try:
            heldout = float(heldout)
        except ValueError:
            pass
    return RunConfig(
        tokenizer=args.tokenizer,
        max_vocab=args.max_vocab,
        seq_len=args.seq_len,
        num_seqs=args.num_seqs,
        seed=args.seed,
        heldout=heldout,
        max_dense_bytes=args.max_dense_bytes,
        batch_size=args.batch_size,
    )


def _check_context(ckpt: GPT2Checkpoint, seq_len: int) -> None:
    if "wpe" in ckpt.params and int(seq_len) > int(ckpt.params["wpe"].shape[0]):
        raise JaxattnError(
            f"--seq-len {seq_len} is longer than the checkpoint's n_positions={ckpt.params['wpe'].shape[0]}"
        )


def _provenance(
    args: argparse.Namespace, ckpt: GPT2Checkpoint, corpora: tuple[Corpus, Corpus], ids: np.ndarray
) -> dict:
    corpus, eval_corpus = corpora
    c = ckpt.config
    return {
        "model": {
            "path": str(args.model), "format": ckpt.meta.get("format"), "blocks": int(ckpt.params["wq"].shape[0]),
            "heads": c.num_heads, "d_model": c.d_model, "vocab_size": c.vocab_size,
        },
        "vocab_mapping": {
            "source": "vocab.json" if ckpt.vocab else "identity (--vocab-size-match)",
            "corpus_vocab_size": int(ids.size), "identity": bool(np.array_equal(ids, np.arange(ids.size))),
        },
        "run": {k: getattr(args, k) for k in ("seq_len", "num_seqs", "seed", "max_n", "max_s", "tokenizer")},
        "corpus": corpus.info(),
        "eval_corpus": eval_corpus.info(),
    }  # fmt: skip


def cmd_score(args: argparse.Namespace) -> int:
    """``jaxattn score``."""
    run = _run_config(args)
    progress = not args.no_progress
    timer = cli_timer(args)
    ckpt = load_any_gpt2_checkpoint(args.model)
    _check_context(ckpt, run.seq_len)
    with timer.stage("load"):
        corpus, eval_corpus = load_split(args.corpus, args.eval_corpus, run, progress=progress)
    ids = checkpoint_ids(
        list(corpus.tokenizer.vocab), ckpt.vocab, ckpt.config.vocab_size, size_match=args.vocab_size_match
    )
    out = ensure_out_dir(args.out)
    with timer.stage("count"):
        tables = count_tables(
            corpus.tokens,
            corpus.vocab_size,
            args.max_n,
            args.max_s,
            doc_ids=corpus.doc_ids,
            max_dense_bytes=run.max_dense_bytes,
            progress=progress,
        )
    tokens = sample_sequences(
        eval_corpus.tokens, eval_corpus.doc_ids, run.seq_len, run.num_seqs, run_key(run.seed, "sequences")
    )
    with timer.stage("score"):
        fed = ids[tokens]
        scores = score_heads(
            ckpt.params, ckpt.config, tables, tokens, max_n=args.max_n, max_s=args.max_s, batch_size=run.batch_size,
            model_tokens=fed,
        )  # fmt: skip
    doc = scores_document(scores, ckpt, _provenance(args, ckpt, (corpus, eval_corpus), ids))
    doc["timings_seconds"] = dict(timer.seconds)
    write_json(out / "scores.json", doc)
    report = write_score_report(out, doc)
    plot_head_scores(out / "head_scores.png", scores, _layout_by_head(ckpt))
    print(f"model: {args.model} ({doc['model']['blocks']} blocks x {doc['model']['heads']} heads); "
          f"scored on {eval_corpus.source}: {run.num_seqs} sequences of {run.seq_len} tokens")  # fmt: skip
    print()
    print(format_scores(doc))
    match = doc["layout_match"]
    if match:
        print()
        print(f"layout heads whose own (n, s) scored best: {match['own_best']} of {match['heads']}")
    print()
    print(f"wrote: {out / 'scores.json'}, {out / 'head_scores.png'}" + (f", {report}" if report else ""))
    return 0
