"""Next-token bits per character on a held-out play: jaxattn's smoothed n-gram models against Kneser-Ney.

Where does the closed-form model stand as a language model? Every option's derived transformer
is scored in ``metrics.json`` against the add-0.01 back-off n-gram model of its own count tables
(:func:`jaxattn.lm.ngram_logprobs`); this benchmark puts that n-gram model beside uniform and a
well-known Kneser-Ney implementation, counted on the same text and scored on the same characters:

* count text: ``/work/shared/data/shakespeare`` minus one held-out play (``--heldout``, a document
  name as for ``jaxattn analyze --heldout``; default ``lear``), char level, split and tokenised
  by :func:`jaxattn.corpus.load_corpus_split` exactly as the CLI does (the folder's 35 other
  plays; its ``SOURCE.md`` is skipped, as in ``jaxattn analyze --corpus`` on that folder);
* scored text: the whole held-out play, or its first ``--score-chars`` characters, the same
  characters for every row, as one sequence: position i predicts character i+1, so there are
  ``score_chars - 1`` predictions (the first character is never predicted);
* ``uniform``: ``log2 V``;
* ``jaxattn n-gram, order k`` (k = 2..5: longest context k-1): ``count_tables(max_n=k-1, max_s=0)``
  then :func:`jaxattn.lm.ngram_logprobs` (add-0.01, back-off to the longest observed context,
  never reaching before the first character); fit = counting;
* ``nltk KN, order k`` (k = 3..5): ``nltk.lm.KneserNeyInterpolated(k, discount=--kn-discount)``
  fit on the same count documents (each play one "sentence", padded by nltk's
  ``padded_everygram_pipeline``); a prediction's context is the k-1 preceding characters, padded
  with ``<s>`` before the first. Its vocabulary adds ``<s>``, ``</s>`` and ``<UNK>`` to the
  characters, so its distribution spreads a little mass on those too (slightly to its
  disadvantage). nltk's ``KneserNey._continuation_counts`` scans every higher-order context on
  every call (about 40 ms per prediction at order 5 here), so the rows use an indexed subclass
  that returns the very same counts from a dictionary built once; the JSON records its largest
  difference from stock nltk over the first ``--kn-check`` predictions (0 when exact).
  ``--kn-discount`` defaults to 0.75 (Kneser & Ney's / Chen & Goodman's usual value; nltk's
  default is 0.1).

KenLM is used where the ``kenlm`` module and its ``lmplz`` binary are installed; otherwise the
table says so (it is not installed on the project's machines).

Sizes: ``--train-chars-per-doc`` keeps only the first N characters of every count document for
every model alike (0: all, the default); ``--score-chars`` (0: the whole play, the default: with
the indexed continuation counts even order-5 KN scores the ~150k characters in seconds).
``--quick`` = 20,000 characters per count document, 5,000 scored characters, KN orders 3 and 4
(under a minute on 2 cores); the full run fits KN on all 4.1M count characters (minutes: nltk's
counting is pure Python). Fit and score seconds are one wall-clock run each.

Run: ``python benchmarks/bench_lm.py [--quick] [--heldout lear] [--score-chars N] [--out DIR]``;
prints a table and writes ``DIR/lm.json`` (``lm_quick.json`` with ``--quick``). nltk is optional:
``pip install 'jaxattn[bench]'``; without it the KN rows are skipped with a message.
"""

from __future__ import annotations

import argparse
import math
import shutil
import time
from collections import Counter, defaultdict
from typing import Any

import numpy as np
from common import SHAKESPEARE, add_common_args, fmt_s, print_table, setup, write_json

from jaxattn import lm
from jaxattn.corpus import load_corpus_split
from jaxattn.counts import count_tables


def load_text(heldout: str, train_chars_per_doc: int, score_chars: int) -> dict[str, Any]:
    """The count documents (token id arrays) and the scored prefix of the held-out play."""
    train, held = load_corpus_split(SHAKESPEARE, heldout=heldout, tokenizer="char", progress=False)
    docs = [train.tokens[train.doc_ids == d] for d in range(train.num_docs)]
    if train_chars_per_doc > 0:
        docs = [d[:train_chars_per_doc] for d in docs]
    tokens = np.concatenate(docs).astype(np.int32)
    doc_ids = np.concatenate([np.full(len(d), i, np.int32) for i, d in enumerate(docs)])
    scored = held.tokens if score_chars <= 0 else held.tokens[:score_chars]
    return {
        "docs": docs,
        "tokens": tokens,
        "doc_ids": doc_ids,
        "scored": np.asarray(scored, np.int32),
        "vocab_size": int(train.vocab_size),
        "heldout_source": held.source,
        "heldout_chars": int(held.num_tokens),
    }


def jaxattn_rows(data: dict[str, Any], orders: list[int]) -> list[dict[str, Any]]:
    """The add-0.01 back-off n-gram models of jaxattn, one per order (context order-1)."""
    rows = []
    V, seq = data["vocab_size"], data["scored"][None, :]
    for order in orders:
        t0 = time.perf_counter()
        tables = count_tables(data["tokens"], V, order - 1, 0, doc_ids=data["doc_ids"])
        fit = time.perf_counter() - t0
        t0 = time.perf_counter()
        lp = lm.ngram_logprobs(tables, seq, order - 1)
        score = time.perf_counter() - t0
        rows.append(_row(f"jaxattn n-gram (add-{lm.NGRAM_SMOOTHING:g})", order, lp / math.log(2), fit, score))
    return rows


def _row(model: str, order: int | None, log2p: np.ndarray, fit_s: float, score_s: float) -> dict[str, Any]:
    finite = np.isfinite(log2p)
    return {
        "model": model,
        "order": order,
        "bits_per_char": float(-log2p.mean()),
        "num_predictions": int(log2p.size),
        "num_zero_probability": int((~finite).sum()),
        "fit_s": fit_s,
        "score_s": score_s,
    }


def indexed_kneser_ney_model(order: int, discount: float) -> Any:
    """``nltk.lm.KneserNeyInterpolated`` whose continuation counts come from an index built once.

    Same numbers as stock nltk (see the module docstring), without a scan of every
    higher-order context per call.
    """
    from nltk.lm import KneserNeyInterpolated
    from nltk.lm.smoothing import KneserNey

    class IndexedKneserNey(KneserNey):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self._index: dict[int, tuple[dict[tuple, Counter], Counter]] = {}

        def _continuation_counts(self, word: Any, context: tuple = ()) -> tuple[int, int]:
            m = len(context)
            if m not in self._index:  # what stock nltk sums over self.counts[m + 2], grouped by context
                per_word: dict[tuple, Counter] = defaultdict(Counter)
                totals: Counter = Counter()
                for prefix, counts in self.counts[m + 2].items():
                    for w, n in counts.items():
                        if n > 0:
                            per_word[prefix[1:]][w] += 1
                            totals[prefix[1:]] += 1
                self._index[m] = (dict(per_word), totals)
            per_word, totals = self._index[m]
            c = tuple(context)
            return per_word.get(c, Counter())[word], totals[c]

    model = KneserNeyInterpolated(order, discount=discount)
    model.estimator = IndexedKneserNey(model.vocab, model.counts, order=order, discount=discount)
    return model


def kneser_ney_rows(data: dict[str, Any], orders: list[int], discount: float, check: int) -> list[dict[str, Any]]:
    """nltk's interpolated Kneser-Ney, one per order, fit on the count documents, scored on the same characters."""
    from nltk.lm import KneserNeyInterpolated
    from nltk.lm.preprocessing import padded_everygram_pipeline

    docs = [[str(t) for t in d] for d in data["docs"]]
    scored = [str(t) for t in data["scored"]]
    rows = []
    for order in orders:
        t0 = time.perf_counter()
        train, vocab = padded_everygram_pipeline(order, docs)
        model = indexed_kneser_ney_model(order, discount)
        model.fit(train, vocab)
        fit = time.perf_counter() - t0
        padded = ["<s>"] * (order - 1) + scored
        t0 = time.perf_counter()
        log2p = np.array([model.logscore(scored[j], padded[j : j + order - 1]) for j in range(1, len(scored))])
        score = time.perf_counter() - t0
        row = _row(f"nltk KneserNeyInterpolated (discount {discount:g})", order, log2p, fit, score)
        # The indexed continuation counts against stock nltk on the same fitted counts.
        stock = KneserNeyInterpolated(order, discount=discount)
        stock.vocab, stock.counts = model.vocab, model.counts
        stock.estimator.vocab, stock.estimator.counts = model.vocab, model.counts
        n = min(check, len(scored) - 1)
        ref = np.array([stock.logscore(scored[j], padded[j : j + order - 1]) for j in range(1, n + 1)])
        row["max_abs_diff_vs_stock_nltk"] = float(np.max(np.abs(ref - log2p[:n]))) if n else None
        row["checked_predictions"] = n
        rows.append(row)
        print(f"  KN order {order}: fit {fmt_s(fit)}, score {fmt_s(score)}, {row['bits_per_char']:.4f} bits/char")
    return rows


def kenlm_status() -> str:
    try:
        import kenlm  # noqa: F401
    except ImportError:
        return "KenLM: not installed (no `kenlm` Python module), skipped"
    if shutil.which("lmplz") is None:
        return "KenLM: the `kenlm` module is installed but the `lmplz` binary is not, skipped"
    return "KenLM: installed, but this benchmark does not build KenLM models yet, skipped"


def main(argv: list[str] | None = None) -> int:
    ap = add_common_args(argparse.ArgumentParser(description=__doc__.splitlines()[0]))
    ap.add_argument("--heldout", default="lear", help="the held-out play (a document name; default lear)")
    ap.add_argument(
        "--score-chars",
        type=int,
        default=None,
        help="score the first N chars (0: the whole play, the default; --quick 5000)",
    )
    ap.add_argument("--train-chars-per-doc", type=int, default=None, help="first N chars of each count doc (0: all)")
    ap.add_argument("--ngram-orders", default="2,3,4,5", help="jaxattn n-gram orders (context + 1)")
    ap.add_argument("--kn-orders", default=None, help="Kneser-Ney orders (default 3,4,5; --quick 3,4)")
    ap.add_argument("--kn-discount", type=float, default=0.75, help="Kneser-Ney discount (nltk's default is 0.1)")
    ap.add_argument("--kn-check", type=int, default=200, help="predictions checked against stock nltk")
    args = ap.parse_args(argv)
    device = setup(args.device)
    score_chars = args.score_chars if args.score_chars is not None else (5000 if args.quick else 0)
    per_doc = args.train_chars_per_doc if args.train_chars_per_doc is not None else (20000 if args.quick else 0)
    kn_orders = [int(o) for o in (args.kn_orders or ("3,4" if args.quick else "3,4,5")).split(",") if o.strip()]
    ngram_orders = [int(o) for o in args.ngram_orders.split(",") if o.strip()]
    if not SHAKESPEARE.is_dir():
        raise SystemExit(f"error: {SHAKESPEARE} not present")
    data = load_text(args.heldout, per_doc, score_chars)
    V = data["vocab_size"]
    kept = f"first {per_doc:,} chars of each" if per_doc else "all of each"
    scored_txt = "all" if data["scored"].size == data["heldout_chars"] else f"the first {data['scored'].size:,} of"
    print(
        f"count text: {data['heldout_source']}: {len(data['docs'])} docs, {data['tokens'].size:,} chars ({kept}), "
        f"V={V}; scored: {scored_txt} {data['heldout_chars']:,} held-out chars"
    )
    rows = [_row("uniform", None, np.full(data["scored"].size - 1, -math.log2(V)), 0.0, 0.0)]
    rows += jaxattn_rows(data, ngram_orders)
    notes = []
    try:
        import nltk  # noqa: F401
    except ImportError:
        notes.append("nltk is not installed (pip install 'jaxattn[bench]'): Kneser-Ney rows skipped")
    else:
        rows += kneser_ney_rows(data, kn_orders, args.kn_discount, args.kn_check)
    notes.append(kenlm_status())
    table = [
        {
            "model": r["model"],
            "order": r["order"] or "-",
            "bits/char": f"{r['bits_per_char']:.4f}",
            "fit": fmt_s(r["fit_s"]) if r["order"] else "-",
            "score": fmt_s(r["score_s"]) if r["order"] else "-",
            "vs stock nltk": f"{r['max_abs_diff_vs_stock_nltk']:.1e}"
            if r.get("max_abs_diff_vs_stock_nltk") is not None
            else "",
        }
        for r in rows
    ]
    print_table(table, ["model", "order", "bits/char", "fit", "score", "vs stock nltk"], title="bits per character")
    for note in notes:
        print(note)
    payload = {
        "heldout": data["heldout_source"],
        "heldout_chars": data["heldout_chars"],
        "score_chars": int(data["scored"].size),
        "num_predictions": int(data["scored"].size - 1),
        "train_chars": int(data["tokens"].size),
        "train_chars_per_doc": per_doc,
        "vocab_size": V,
        "kn_discount": args.kn_discount,
        "rows": rows,
        "notes": notes,
    }
    write_json("lm_quick" if args.quick else "lm", payload, args.out, device)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
