"""The main job, as library calls: corpus -> counts -> derived model -> attention -> alignment.

The CLI, examples and benchmarks call these functions; nothing here prints tables or plots.

Axis vocabulary: B sequences, L layers, H heads, T positions, P distinct (n, s) tables.
"""

from __future__ import annotations

import dataclasses
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxattn.alignment import METRIC_NAMES, expected_for_layout, layer_head_metrics, pool, sample_sequences
from jaxattn.corpus import Corpus, corpus_from_documents, read_documents, split_heldout
from jaxattn.counts import CountMatrix, check_dense_size, count_tables
from jaxattn.derive import derive_params
from jaxattn.errors import JaxattnError
from jaxattn.model import ModelConfig, Params, forward_batch, preset
from jaxattn.progress import progress_iter

BUILTIN_HELDOUT = 0.1


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """Everything that defines a run besides the corpus files.

    Attributes:
        preset: model preset name ("seed" or "small").
        tokenizer: "char" or "word".
        max_vocab: word-level vocabulary size (top-k plus <unk>).
        seq_len: T, tokens per evaluation sequence.
        num_seqs: B, number of evaluation sequences.
        seed: integer seed of every PRNG key.
        heldout: held-out split spec when no eval corpus is given (a document name or a
            fraction; None: the last document, or the last 10% of a single document).
        model_overrides: ModelConfig fields to override, as (name, value) pairs.
        max_dense_bytes: memory budget for dense arrays (None: the default).
        batch_size: sequences per forward call (bounds memory).
    """

    preset: str = "seed"
    tokenizer: str = "char"
    max_vocab: int | None = None
    seq_len: int = 64
    num_seqs: int = 32
    seed: int = 0
    heldout: str | float | None = None
    model_overrides: tuple[tuple[str, Any], ...] = ()
    max_dense_bytes: int | None = None
    batch_size: int = 16

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict."""
        d = dataclasses.asdict(self)
        d["model_overrides"] = dict(self.model_overrides)
        return d


class Timer:
    """Wall time of named stages."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        """Times the enclosed block under ``name`` (accumulating)."""
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t0


@dataclasses.dataclass
class Prepared:
    """Data shared by every option of one run.

    Attributes:
        run: the run config.
        config: the model config.
        corpus: the count corpus (the model's knowledge).
        eval_corpus: the held-out corpus the sequences come from.
        tables: ``{(n, s): CountMatrix}`` counted on ``corpus``.
        tokens: int32 [B, T] evaluation sequences.
        pairs: the distinct (n, s) used by the layout, in order.
        pair_index: int32 [L, H] index into ``pairs`` per head.
        expected: float32 [P, B, T, T] expected attention.
        mask: bool [P, B, T, T] valid query-key pairs.
        timer: stage timings.
    """

    run: RunConfig
    config: ModelConfig
    corpus: Corpus
    eval_corpus: Corpus
    tables: dict[tuple[int, int], CountMatrix]
    tokens: np.ndarray
    pairs: list[tuple[int, int]]
    pair_index: np.ndarray
    expected: np.ndarray
    mask: np.ndarray
    timer: Timer

    def key(self, name: str) -> jax.Array:
        """A PRNG key for a named purpose, derived from the run seed."""
        return jax.random.fold_in(jax.random.PRNGKey(self.run.seed), _stable_hash(name))


def _stable_hash(name: str) -> int:
    h = 0
    for ch in name.encode():
        h = (h * 131 + ch) % (2**31 - 1)
    return h


def load_split(
    corpus_path: str | None, eval_path: str | None, run: RunConfig, *, progress: bool = True
) -> tuple[Corpus, Corpus]:
    """Loads the count corpus and the evaluation corpus with one tokenizer.

    The tokenizer is built on the count corpus only; tokens unseen there map to <unk>.
    """
    from jaxattn.corpus import build_tokenizer

    docs = read_documents(corpus_path, progress=progress)
    source = corpus_path if corpus_path is not None else "builtin:stdlib-docstrings"
    if eval_path is not None:
        train_docs, eval_docs = docs, read_documents(eval_path, progress=progress)
        eval_source = eval_path
    else:
        heldout = run.heldout if (run.heldout is not None or corpus_path is not None) else BUILTIN_HELDOUT
        train_docs, eval_docs = split_heldout(docs, heldout)
        eval_source = (
            f"{source} (held out: {', '.join(d.name for d in eval_docs[:3])}{' ...' if len(eval_docs) > 3 else ''})"
        )
    tok = build_tokenizer(train_docs, run.tokenizer, max_vocab=run.max_vocab)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # May extend the tokenizer with <unk> for unseen held-out tokens; both share it.
        eval_corpus = corpus_from_documents(eval_docs, tok, source=eval_source)
    corpus = corpus_from_documents(train_docs, eval_corpus.tokenizer, source=source)
    return corpus, eval_corpus


def check_run_memory(config: ModelConfig, run: RunConfig) -> None:
    """Refuses a run whose largest dense arrays would exceed the memory budget, before allocating.

    The estimate covers the arrays whose size the command line controls: the actual attention
    float32 [B, L, H, T, T], the expected attention float32 [P, B, T, T], the MLP weights
    float32 [L, D, 4D] and the embeddings float32 [V, D]. The budget is ``run.max_dense_bytes``
    (``--max-dense-bytes``), else ``JAXATTN_MAX_DENSE_BYTES``, else 4 GiB.

    Args:
        config: the model config.
        run: the run config (B = ``num_seqs``, T = ``seq_len``).

    Raises:
        MemoryBudgetError: naming the array, its shape, the estimated size and the budget.
    """
    B, T = int(run.num_seqs), int(run.seq_len)
    L, H, D, V = config.num_layers, config.num_heads, config.d_model, config.vocab_size
    P = len({config.layout(l, h) for l in range(L) for h in range(H)})
    check_dense_size((B, L, H, T, T), 4, "attention", run.max_dense_bytes)
    check_dense_size((P, B, T, T), 4, "expected attention", run.max_dense_bytes)
    check_dense_size((L, D, 4 * D), 4, "MLP weights", run.max_dense_bytes)
    check_dense_size((V, D), 4, "embeddings", run.max_dense_bytes)


def prepare(
    corpus: Corpus,
    eval_corpus: Corpus,
    run: RunConfig,
    *,
    tables: dict[tuple[int, int], CountMatrix] | None = None,
    progress: bool = True,
    timer: Timer | None = None,
) -> Prepared:
    """Counts the tables, draws the evaluation sequences and builds the expected attention.

    Args:
        corpus: count corpus.
        eval_corpus: evaluation corpus (same tokenizer).
        run: run config.
        tables: reuse these count tables instead of counting.
        progress: show progress bars.
        timer: stage timer to add to.

    Returns:
        :class:`Prepared`.
    """
    timer = timer or Timer()
    config = preset(run.preset, corpus.vocab_size, tokenizer=run.tokenizer, **dict(run.model_overrides))
    # Refuse before counting, not after minutes of work: sequences that cannot be drawn, arrays too big.
    longest = int(np.bincount(eval_corpus.doc_ids).max()) if eval_corpus.num_tokens else 0
    if int(run.seq_len) > longest:
        raise JaxattnError(f"seq_len={run.seq_len} is longer than every document (the longest has {longest} tokens)")
    check_run_memory(config, run)
    with timer.stage("count"):
        if tables is None:
            tables = count_tables(
                corpus.tokens,
                config.vocab_size,
                config.max_n,
                config.max_s,
                doc_ids=corpus.doc_ids,
                max_dense_bytes=run.max_dense_bytes,
                progress=progress,
            )
        wrong_v = sorted({int(cm.vocab_size) for cm in tables.values()} - {config.vocab_size})
        if wrong_v:
            raise JaxattnError(
                f"count tables have vocab_size {wrong_v[0]}, but the corpus has vocab_size={config.vocab_size} "
                "(counted on another corpus or with another tokenizer?)"
            )
        missing = [p for p in config.pairs if p not in tables]
        if missing:
            raise JaxattnError(f"loaded tables lack (n, s) = {missing} needed by preset {run.preset!r}")
    with timer.stage("expected"):
        key = jax.random.fold_in(jax.random.PRNGKey(run.seed), _stable_hash("sequences"))
        tokens = sample_sequences(eval_corpus.tokens, eval_corpus.doc_ids, run.seq_len, run.num_seqs, key)
        pairs = sorted({config.layout(l, h) for l in range(config.num_layers) for h in range(config.num_heads)})
        pair_index = np.array(
            [[pairs.index(config.layout(l, h)) for h in range(config.num_heads)] for l in range(config.num_layers)],
            dtype=np.int32,
        )
        expected, mask = expected_for_layout(tables, tokens, pairs)
    return Prepared(run, config, corpus, eval_corpus, tables, tokens, pairs, pair_index, expected, mask, timer)


def baseline_params(prep: Prepared) -> Params:
    """The seed derivation's parameters for this run."""
    with prep.timer.stage("derive"):
        params = derive_params(prep.tables, prep.config, key=prep.key("derive"))
        jax.block_until_ready(params)
    return params


def batched_attention(
    prep: Prepared,
    params: Params,
    *,
    qk_inputs_fn: Any = None,
    attn_logits_fn: Any = None,
    progress: bool = True,
    desc: str = "forward",
) -> np.ndarray:
    """Actual attention of the model on the evaluation sequences, in batches.

    Args:
        prep: the prepared run.
        params: model parameters.
        qk_inputs_fn: optional ``tokens [b, T] -> (q_in, k_in)`` each [b, L, T, D].
        attn_logits_fn: optional ``tokens [b, T] -> logits`` [b, L, H, T, T].
        progress: show a progress bar.
        desc: progress bar label.

    Returns:
        float32 [B, L, H, T, T].
    """
    B = prep.tokens.shape[0]
    bs = max(1, int(prep.run.batch_size))
    chunks = []
    with prep.timer.stage("forward"):
        for start in progress_iter(range(0, B, bs), desc=desc, enabled=progress, total=-(-B // bs)):
            tok = prep.tokens[start : start + bs]
            kw: dict[str, Any] = {}
            if qk_inputs_fn is not None:
                kw["qk_inputs"] = qk_inputs_fn(tok)
            if attn_logits_fn is not None:
                kw["attn_logits"] = attn_logits_fn(tok)
            out = forward_batch(params, jnp.asarray(tok), prep.config, **kw)
            chunks.append(np.asarray(out.attn))
    return np.concatenate(chunks, axis=0)


def evaluate(prep: Prepared, attn: np.ndarray, option: str = "baseline") -> list[dict[str, Any]]:
    """Per-layer, per-head alignment records (SPEC §5 schema plus spread fields).

    Args:
        prep: the prepared run.
        attn: float32 [B, L, H, T, T] actual attention.
        option: the option label written into each record.

    Returns:
        One dict per (layer, head) with ``option, layer, head, n, s, kl, cosine,
        argmax_match, argmax_match_tied, entropy, num_queries, num_dropped`` and, for each
        metric, ``_std``, ``_min`` and ``_max`` over sequences.
    """
    with prep.timer.stage("metrics"):
        m = layer_head_metrics(
            jnp.asarray(prep.expected), jnp.asarray(prep.mask), jnp.asarray(prep.pair_index), jnp.asarray(attn)
        )
        pooled = pool(jax.device_get(m), axis=2)
    B, T = prep.tokens.shape
    records = []
    for l in range(prep.config.num_layers):
        for h in range(prep.config.num_heads):
            n, s = prep.config.layout(l, h)
            rec: dict[str, Any] = {"option": option, "layer": l, "head": h, "n": n, "s": s}
            for k in METRIC_NAMES:
                rec[k] = float(pooled[k][l, h])
            rec["num_queries"] = int(pooled["num_queries"][l, h])
            rec["num_dropped"] = int(B * max(T - n + 1, 0) - rec["num_queries"])
            for k in METRIC_NAMES:
                for suffix in ("std", "min", "max"):
                    rec[f"{k}_{suffix}"] = float(pooled[f"{k}_{suffix}"][l, h])
            records.append(rec)
    return records


@dataclasses.dataclass
class AnalysisResult:
    """One option's outcome on a prepared run.

    Attributes:
        option: label.
        records: per-(layer, head) metric records.
        attn: float32 [B, L, H, T, T] actual attention.
        params: the parameters used (None for options without a parameter pytree).
        extra: option-specific details (training curves, costs, ...).
    """

    option: str
    records: list[dict[str, Any]]
    attn: np.ndarray
    params: Params | None = None
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)


def run_baseline(prep: Prepared, *, progress: bool = True) -> AnalysisResult:
    """The seed system, faithfully: derive, run, measure."""
    params = baseline_params(prep)
    attn = batched_attention(prep, params, progress=progress)
    return AnalysisResult("baseline", evaluate(prep, attn, "baseline"), attn, params)


def analyze(
    corpus_path: str | None = None,
    *,
    eval_path: str | None = None,
    run: RunConfig | None = None,
    progress: bool = True,
) -> tuple[Prepared, AnalysisResult]:
    """Loads, counts, derives and measures the seed system end to end.

    Returns:
        (the prepared run, the baseline result).
    """
    run = run or RunConfig()
    timer = Timer()
    with timer.stage("load"):
        corpus, eval_corpus = load_split(corpus_path, eval_path, run, progress=progress)
    prep = prepare(corpus, eval_corpus, run, progress=progress, timer=timer)
    return prep, run_baseline(prep, progress=progress)


def layer_summary(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Means over heads per (option, layer)."""
    groups: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for r in records:
        groups.setdefault((r["option"], r["layer"]), []).append(r)
    out = []
    for (opt, layer), rs in groups.items():
        row: dict[str, Any] = {"option": opt, "layer": layer, "n": rs[0]["n"]}
        for k in METRIC_NAMES:
            vals = np.array([r[k] for r in rs])
            row[k] = float(vals.mean())
            row[f"{k}_min"] = float(vals.min())
            row[f"{k}_max"] = float(vals.max())
        out.append(row)
    return out
