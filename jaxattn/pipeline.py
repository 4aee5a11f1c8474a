"""The main job, as library calls: corpus -> counts -> derived model -> attention -> alignment.

The CLI, examples and benchmarks call these functions; nothing here prints tables or plots.

The data path of one run:

1. :func:`jaxattn.corpus.load_corpus_split` reads the count corpus and the held-out one;
2. :func:`prepare` counts the tables (:func:`jaxattn.counts.count_tables`), draws the held-out
   sequences and builds the expected attention (:func:`jaxattn.alignment.expected_for_layout`)
   into a frozen :class:`Prepared`, the one value an entry point hands to an option;
3. an option (:mod:`jaxattn.options`; the seed system is :func:`run_baseline`) derives its
   parameters (:func:`jaxattn.derive.derive_params`), runs the model (:func:`run_model`: the
   attention and the next-token log-probabilities of one forward pass) and measures it
   (:func:`evaluate` for the alignment, :func:`language_model_scores` for the bits per token
   beside the n-gram model of the same tables), giving an :class:`AnalysisResult`;
4. :mod:`jaxattn.output` prints and writes the results.

Below the entry points, functions take the arrays and configs they use by name, not a
:class:`Prepared`. Stage timings go to an optional :class:`jaxattn.progress.Timer` passed as
``timer=``.

Axis vocabulary: B sequences, L layers, H heads, T positions, P distinct (n, s) tables,
Q = T-1 next-token predictions per sequence.
"""

from __future__ import annotations

import dataclasses
import functools
import warnings
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxattn.alignment import METRIC_NAMES, expected_for_layout, layer_head_metrics, pool, sample_sequences
from jaxattn.corpus import Corpus, load_corpus_split
from jaxattn.counts import CountMatrix, check_dense_size, count_tables
from jaxattn.derive import derive_params
from jaxattn.errors import JaxattnError
from jaxattn.lm import NGRAM_SMOOTHING, lm_scores, model_logprobs, ngram_logprobs, ngram_max_n
from jaxattn.model import ModelConfig, Params, forward_batch, preset
from jaxattn.progress import Timer, progress_iter, stage
from jaxattn.typing import ArrayLike, Bool, Float, Int, Integer


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
        batch_size: sequences per forward call (bounds memory; the results do not depend on it,
            bit for bit). 8 is faster than 16 on CPU: the [8 * 64, 3072] MLP activations stay in cache.
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
    batch_size: int = 8

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict."""
        d = dataclasses.asdict(self)
        d["model_overrides"] = dict(self.model_overrides)
        return d


@dataclasses.dataclass(frozen=True)
class Prepared:
    """Data shared by every option of one run (frozen: options never change it).

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

    The n-gram model of the same tables scores the same next tokens once, on first use:
    :attr:`ngram_logprob` (its longest context is :attr:`ngram_max_n`).
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

    def key(self, name: str) -> jax.Array:
        """A PRNG key for a named purpose, derived from the run seed (:func:`run_key`)."""
        return run_key(self.run.seed, name)

    @property
    def ngram_max_n(self) -> int:
        """The n-gram model's longest context: ``config.max_n``, or less where tables ``C^{m,0}`` are missing."""
        return ngram_max_n(self.tables, self.config.max_n)

    @functools.cached_property
    def ngram_logprob(self) -> np.ndarray:
        """float64 [B, T-1]: the smoothed n-gram model's log-probability of each next token of :attr:`tokens`.

        :func:`jaxattn.lm.ngram_logprobs` over :attr:`tables` with ``max_n`` = :attr:`ngram_max_n`
        and add-:data:`~jaxattn.lm.NGRAM_SMOOTHING`; computed once per prepared run.
        """
        return ngram_logprobs(self.tables, self.tokens, self.ngram_max_n, smoothing=NGRAM_SMOOTHING)


def run_key(seed: int, name: str) -> jax.Array:
    """The PRNG key of one named purpose ("derive", "sequences", ...) of a run.

    Args:
        seed: the run seed.
        name: the purpose; the same name always gives the same key.

    Returns:
        A legacy uint32 [2] key, ``fold_in(PRNGKey(seed), stable_hash(name))``.
    """
    h = 0
    for ch in name.encode():  # a hash that is stable across processes (unlike hash())
        h = (h * 131 + ch) % (2**31 - 1)
    return jax.random.fold_in(jax.random.PRNGKey(seed), h)


def load_split(
    corpus_path: str | None, eval_path: str | None, run: RunConfig, *, progress: bool = True
) -> tuple[Corpus, Corpus]:
    """The count corpus and the evaluation corpus of a run, sharing one tokenizer.

    :func:`jaxattn.corpus.load_corpus_split` with the run's ``heldout``, ``tokenizer`` and
    ``max_vocab``: the tokenizer is built on the count corpus only; tokens unseen there map
    to <unk>.

    Args:
        corpus_path: file, directory or glob (None: the built-in corpus).
        eval_path: the evaluation corpus (None: a held-out split of the count corpus).
        run: the run config.
        progress: progress bars.

    Returns:
        (count corpus, evaluation corpus).
    """
    return load_corpus_split(
        corpus_path,
        eval_path=eval_path,
        heldout=run.heldout,
        tokenizer=run.tokenizer,
        max_vocab=run.max_vocab,
        progress=progress,
    )


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
        timer: stage timer to add to (None: untimed).

    Returns:
        :class:`Prepared`.
    """
    config = preset(run.preset, corpus.vocab_size, tokenizer=run.tokenizer, **dict(run.model_overrides))
    # Refuse before counting, not after minutes of work: sequences that cannot be drawn, arrays too big.
    longest = int(np.bincount(eval_corpus.doc_ids).max()) if eval_corpus.num_tokens else 0
    if int(run.seq_len) > longest:
        raise JaxattnError(f"seq_len={run.seq_len} is longer than every document (the longest has {longest} tokens)")
    check_run_memory(config, run)
    with stage(timer, "count"):
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
    with stage(timer, "expected"):
        key = run_key(run.seed, "sequences")
        tokens = sample_sequences(eval_corpus.tokens, eval_corpus.doc_ids, run.seq_len, run.num_seqs, key)
        pairs = sorted({config.layout(l, h) for l in range(config.num_layers) for h in range(config.num_heads)})
        pair_index = np.array(
            [[pairs.index(config.layout(l, h)) for h in range(config.num_heads)] for l in range(config.num_layers)],
            dtype=np.int32,
        )
        expected, mask = expected_for_layout(tables, tokens, pairs)
    return Prepared(run, config, corpus, eval_corpus, tables, tokens, pairs, pair_index, expected, mask)


class ModelRun(NamedTuple):
    """What one forward pass over the evaluation sequences gives (:func:`run_model`).

    Attributes:
        attn: float32 [B, L, H, T, T] actual attention of the layout layers.
        next_logprob: float64 [B, T-1] the model's log-probability of each next token
            (:func:`jaxattn.lm.model_logprobs` of its logits).
    """

    attn: np.ndarray
    next_logprob: np.ndarray


def run_model(
    params: Params,
    tokens: Integer[ArrayLike, "B T"],
    config: ModelConfig,
    *,
    batch_size: int = 8,
    qk_inputs_fn: Any = None,
    attn_logits_fn: Any = None,
    progress: bool = True,
    desc: str = "forward",
) -> ModelRun:
    """The model on the evaluation sequences, ``batch_size`` at a time: attention and next-token log-probs.

    Both come from the same forward call per batch (no second pass); the log-softmax of the
    logits is taken on the device, so only [b, T-1] numbers per batch cross to the host.

    Args:
        params: model parameters.
        tokens: int [B, T] evaluation sequences.
        config: the model config.
        batch_size: sequences per forward call (bounds memory).
        qk_inputs_fn: optional ``tokens [b, T] -> (q_in, k_in)`` each [b, L, T, D].
        attn_logits_fn: optional ``tokens [b, T] -> logits`` [b, L, H, T, T].
        progress: show a progress bar.
        desc: progress bar label.

    Returns:
        :class:`ModelRun` (attention float32 [B, L, H, T, T], next-token log-probs float64 [B, T-1]).
    """
    tokens = np.asarray(tokens)
    B = tokens.shape[0]
    bs = max(1, int(batch_size))
    chunks, logprobs = [], []
    for start in progress_iter(range(0, B, bs), desc=desc, enabled=progress, total=-(-B // bs)):
        tok = tokens[start : start + bs]
        kw: dict[str, Any] = {}
        if qk_inputs_fn is not None:
            kw["qk_inputs"] = qk_inputs_fn(tok)
        if attn_logits_fn is not None:
            kw["attn_logits"] = attn_logits_fn(tok)
        out = forward_batch(params, jnp.asarray(tok), config, **kw)
        chunks.append(np.asarray(out.attn))
        logprobs.append(model_logprobs(out.logits, tok))
    return ModelRun(np.concatenate(chunks, axis=0), np.concatenate(logprobs, axis=0))


def batched_attention(
    params: Params,
    tokens: Integer[ArrayLike, "B T"],
    config: ModelConfig,
    *,
    batch_size: int = 8,
    qk_inputs_fn: Any = None,
    attn_logits_fn: Any = None,
    progress: bool = True,
    desc: str = "forward",
) -> Float[np.ndarray, "B L H T T"]:
    """Actual attention of the model on the evaluation sequences, ``batch_size`` at a time.

    ``run_model(...).attn``: see :func:`run_model` (which also keeps the next-token log-probs).

    Args:
        params: model parameters.
        tokens: int [B, T] evaluation sequences.
        config: the model config.
        batch_size: sequences per forward call (bounds memory).
        qk_inputs_fn: optional ``tokens [b, T] -> (q_in, k_in)`` each [b, L, T, D].
        attn_logits_fn: optional ``tokens [b, T] -> logits`` [b, L, H, T, T].
        progress: show a progress bar.
        desc: progress bar label.

    Returns:
        float32 [B, L, H, T, T].
    """
    return run_model(
        params,
        tokens,
        config,
        batch_size=batch_size,
        qk_inputs_fn=qk_inputs_fn,
        attn_logits_fn=attn_logits_fn,
        progress=progress,
        desc=desc,
    ).attn


def language_model_scores(prep: Prepared, next_logprob: Float[ArrayLike, "B Q"]) -> dict[str, Any]:
    """An option's next-token scores on the run's evaluation sequences, beside its n-gram model and uniform.

    The value of :attr:`AnalysisResult.language_model` (and of ``metrics.json``'s
    ``"language_model"`` block, per option). Every option calls it the same way, with its
    :attr:`ModelRun.next_logprob`.

    Args:
        prep: the prepared run (its n-gram scores: :attr:`Prepared.ngram_logprob`).
        next_logprob: float [B, T-1] the option's model's log-probability of each next token
            of ``prep.tokens`` (:func:`run_model`).

    Returns:
        ``{"derived_bits_per_token", "ngram_bits_per_token", "uniform_bits_per_token",
        "num_predictions", "ngram_order", "smoothing"}``: the model's, the n-gram model's and
        uniform's (``log2 V``) mean next-token cross-entropy in bits over the same
        ``num_predictions`` = B x (T-1) predictions; ``ngram_order`` is the n-gram model's
        order (longest context + 1) and ``smoothing`` its add-alpha constant.

    Raises:
        JaxattnError: ``next_logprob`` is not [B, T-1] of ``prep.tokens``, or holds NaN.
    """
    B, T = prep.tokens.shape
    if np.shape(next_logprob) != (B, T - 1):
        raise JaxattnError(f"next_logprob has shape {np.shape(next_logprob)}; expected [B, T-1] = {(B, T - 1)}")
    scores = lm_scores(
        next_logprob,
        prep.ngram_logprob,
        prep.config.vocab_size,
        ngram_order=prep.ngram_max_n + 1,
        smoothing=NGRAM_SMOOTHING,
    )
    return scores.to_dict()


def evaluate(
    expected: Float[ArrayLike, "P B T T"],
    mask: Bool[ArrayLike, "P B T T"],
    pair_index: Int[ArrayLike, "L H"],
    attn: Float[ArrayLike, "B L H T T"],
    config: ModelConfig,
    *,
    option: str = "baseline",
) -> list[dict[str, Any]]:
    """Per-layer, per-head alignment records (SPEC §5 schema plus spread fields).

    Args:
        expected: float32 [P, B, T, T] expected attention of each distinct (n, s) table.
        mask: bool [P, B, T, T] valid query-key pairs.
        pair_index: int32 [L, H] index into the P tables per head.
        attn: float32 [B, L, H, T, T] actual attention.
        config: the model config (its layout gives each head's (n, s)).
        option: the option label written into each record.

    Returns:
        One dict per (layer, head) with ``option, layer, head, n, s, kl, cosine,
        argmax_match, argmax_match_tied, entropy, num_queries, num_dropped`` and, for each
        metric, ``_std``, ``_min`` and ``_max`` over sequences. A head with no valid query
        (``num_queries`` 0: every sequence is shorter than its n, or no query n-gram was
        observed) has None (JSON null) for every metric, never a 0 that reads as a perfect KL;
        one warning then says how many heads and why.
    """
    m = layer_head_metrics(jnp.asarray(expected), jnp.asarray(mask), jnp.asarray(pair_index), jnp.asarray(attn))
    pooled = pool(jax.device_get(m), axis=2)
    B, T = np.shape(expected)[1], np.shape(expected)[2]
    records = []
    for l in range(config.num_layers):
        for h in range(config.num_heads):
            n, s = config.layout(l, h)
            rec: dict[str, Any] = {"option": option, "layer": l, "head": h, "n": n, "s": s}
            nq = int(pooled["num_queries"][l, h])
            for k in METRIC_NAMES:
                rec[k] = float(pooled[k][l, h]) if nq else None
            rec["num_queries"] = nq
            rec["num_dropped"] = int(B * max(T - n + 1, 0) - nq)
            for k in METRIC_NAMES:
                for suffix in ("std", "min", "max"):
                    rec[f"{k}_{suffix}"] = float(pooled[f"{k}_{suffix}"][l, h]) if nq else None
            records.append(rec)
    _warn_empty_heads(records, T, option)
    return records


def _warn_empty_heads(records: list[dict[str, Any]], T: int, option: str) -> None:
    """One warning naming how many heads had no valid query, and why (T < n, or unobserved n-grams)."""
    empty = [r for r in records if r["num_queries"] == 0]
    if not empty:
        return
    short = sorted({r["n"] for r in empty if T < r["n"]})
    why = [f"seq_len {T} < n = {', '.join(map(str, short))}"] if short else []
    if any(T >= r["n"] for r in empty):
        why.append("no query n-gram observed in the count tables")
    layers = sorted({r["layer"] for r in empty})
    warnings.warn(
        f"{option}: {len(empty)} of {len(records)} heads (layers {', '.join(map(str, layers))}) have no valid "
        f"query ({'; '.join(why)}); their metrics are null (n/a), not 0",
        stacklevel=3,
    )


@dataclasses.dataclass(frozen=True)
class AnalysisResult:
    """One option's outcome on a prepared run.

    Attributes:
        option: label.
        records: per-(layer, head) metric records.
        attn: float32 [B, L, H, T, T] actual attention.
        params: the parameters used (None for options without a parameter pytree).
        extra: option-specific details (training curves, costs, ...).
        language_model: the model's next-token bits per token beside its n-gram model's and
            uniform's (:func:`language_model_scores`); None where not measured.
    """

    option: str
    records: list[dict[str, Any]]
    attn: np.ndarray
    params: Params | None = None
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)
    language_model: dict[str, Any] | None = None


def measure(
    prep: Prepared,
    params: Params,
    label: str,
    *,
    extra: dict[str, Any] | None = None,
    qk_inputs_fn: Any = None,
    attn_logits_fn: Any = None,
    progress: bool = True,
    timer: Timer | None = None,
) -> AnalysisResult:
    """Runs a derived model on the run's evaluation sequences and measures it, like every option.

    One forward pass per batch (:func:`run_model`, stage "forward") gives the attention and the
    next-token log-probs; :func:`evaluate` and :func:`language_model_scores` (stage "metrics")
    turn them into the records and the language-model scores.

    Args:
        prep: the prepared run.
        params: the model's parameters.
        label: the option label of the records (and the progress bar).
        extra: option-specific details for :attr:`AnalysisResult.extra`.
        qk_inputs_fn: optional ``tokens [b, T] -> (q_in, k_in)`` hook.
        attn_logits_fn: optional ``tokens [b, T] -> logits`` hook.
        progress: progress bars.
        timer: stage timer.

    Returns:
        :class:`AnalysisResult`.
    """
    with stage(timer, "forward"):
        out = run_model(
            params,
            prep.tokens,
            prep.config,
            batch_size=prep.run.batch_size,
            qk_inputs_fn=qk_inputs_fn,
            attn_logits_fn=attn_logits_fn,
            progress=progress,
            desc=label,
        )
    with stage(timer, "metrics"):
        records = evaluate(prep.expected, prep.mask, prep.pair_index, out.attn, prep.config, option=label)
        lm = language_model_scores(prep, out.next_logprob)
    return AnalysisResult(label, records, out.attn, params, dict(extra or {}), language_model=lm)


def run_baseline(prep: Prepared, *, progress: bool = True, timer: Timer | None = None) -> AnalysisResult:
    """The seed system, faithfully: derive, run, measure.

    Args:
        prep: the prepared run.
        progress: progress bars.
        timer: stage timer (stages "derive", "forward", "metrics").

    Returns:
        :class:`AnalysisResult` labelled "baseline".
    """
    with stage(timer, "derive"):
        params = derive_params(prep.tables, prep.config, key=prep.key("derive"))
        jax.block_until_ready(params)
    return measure(prep, params, "baseline", progress=progress, timer=timer)


def analyze(
    corpus_path: str | None = None,
    *,
    eval_path: str | None = None,
    run: RunConfig | None = None,
    progress: bool = True,
    timer: Timer | None = None,
) -> tuple[Prepared, AnalysisResult]:
    """Loads, counts, derives and measures the seed system end to end.

    Args:
        corpus_path: count corpus (file, directory, glob; None: the built-in corpus).
        eval_path: evaluation corpus (None: a held-out split of the count corpus).
        run: the run config (default :class:`RunConfig`).
        progress: progress bars.
        timer: stage timer.

    Returns:
        (the prepared run, the baseline result).
    """
    run = run or RunConfig()
    with stage(timer, "load"):
        corpus, eval_corpus = load_split(corpus_path, eval_path, run, progress=progress)
    prep = prepare(corpus, eval_corpus, run, progress=progress, timer=timer)
    return prep, run_baseline(prep, progress=progress, timer=timer)


def layer_summary(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Means over heads per (option, layer); heads without queries (None metrics) are left out.

    Args:
        records: :func:`evaluate` records.

    Returns:
        One row per (option, layer) with ``option, layer, n`` and, per metric, the mean, ``_min``
        and ``_max`` over the layer's heads that had queries (None where none had).
    """
    groups: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for r in records:
        groups.setdefault((r["option"], r["layer"]), []).append(r)
    out = []
    for (opt, layer), rs in groups.items():
        row: dict[str, Any] = {"option": opt, "layer": layer, "n": rs[0]["n"]}
        for k in METRIC_NAMES:
            vals = np.array([r[k] for r in rs if r[k] is not None], np.float64)
            has = vals.size > 0
            row[k] = float(vals.mean()) if has else None
            row[f"{k}_min"] = float(vals.min()) if has else None
            row[f"{k}_max"] = float(vals.max()) if has else None
        out.append(row)
    return out
