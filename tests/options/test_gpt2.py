"""Option 3 as a standard GPT-2 (jaxattn.options.gpt2), checked against slow float64 references.

The construction's claims, one test each: the params are a plain GPT-2 that the ordinary
``forward`` runs with no hook; every LayerNorm is an exact rescaling (constant ``||x||``, zero
mean); the scores are exactly the count tables' rank-K factors ``A B^T`` (with the back-off rows
for unseen bigrams); every layout layer is aligned and the model is its own n-gram LM; the
capacity rule refuses or approximates with numbers; each ablation switch moves alignment the
way the docs say; and the derivation is deterministic.

Runs are built once per module: counts on one play, 4 held-out sequences of 32 characters from
another, at the small preset (plus a random-token probe sequence, whose bigrams were mostly never
counted, for the back-off paths). References are plain numpy loops in float64.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from pathlib import Path
from typing import NamedTuple

import jax
import numpy as np
import pytest

from jaxattn import forward, pipeline
from jaxattn.counts import count_tables
from jaxattn.errors import JaxattnError
from jaxattn.model import ModelConfig, num_prep_blocks, preset
from jaxattn.options import GPT2_OPTION3, CapacityError, GPT2Config, check_fits, derive_gpt2, run_gpt2, run_option3
from jaxattn.options.factors import DerivationConfig, table_factors
from tests.helpers import markov_corpus

COUNT_PLAY = "comedy_of_errors_gut.txt"
EVAL_PLAY = "twelfth_night_gut.txt"
RUN = pipeline.RunConfig(preset="small", seq_len=32, num_seqs=4, batch_size=4)

#: The forward pass, compiled once per params shape (the tests call it per sequence).
fwd = jax.jit(forward, static_argnames=("config", "return_inputs"))


# ----------------------------------------------------------------------------- slow references


def ln64(x: np.ndarray, scale: np.ndarray, bias: np.ndarray, eps: float = 1e-5) -> np.ndarray:
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * scale + bias


def gelu_tanh(x: np.ndarray) -> np.ndarray:
    """GPT-2's ``gelu_new`` (jax.nn.gelu's default tanh approximation)."""
    return 0.5 * x * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (x + 0.044715 * x**3)))


class Reference(NamedTuple):
    """float64 outputs of :func:`reference_forward` on one sequence.

    logits [T, V]; attn [NB, H, T, T] every block's attention; sites [2 NB + 1, T, D] the
    residual at each LayerNorm site (ln_1 and ln_2 of every block, then ln_f); pre [NB, T, F]
    every MLP's pre-activations.
    """

    logits: np.ndarray
    attn: np.ndarray
    sites: np.ndarray
    pre: np.ndarray


def reference_forward(params: dict, tokens: np.ndarray) -> Reference:
    """A plain float64 pre-LN GPT-2 forward pass, head by head, from the params pytree."""
    p = {k: np.asarray(v, np.float64) for k, v in params.items()}
    T = len(tokens)
    NB, H, _, K = p["wq"].shape
    x = p["embed"][tokens] + (p["wpe"][:T] if "wpe" in p else 0.0)
    causal = np.tril(np.ones((T, T), bool))
    sites, pre = [], []
    attn = np.zeros((NB, H, T, T))
    for b in range(NB):
        sites.append(x)
        h = ln64(x, p["ln1_scale"][b], p["ln1_bias"][b])
        out = np.zeros_like(x)
        for hd in range(H):
            q = h @ p["wq"][b, hd] + p["bq"][b, hd]
            k = h @ p["wk"][b, hd] + p["bk"][b, hd]
            v = h @ p["wv"][b, hd] + p["bv"][b, hd]
            s = np.where(causal, q @ k.T / math.sqrt(K), -np.inf)
            a = np.exp(s - s.max(axis=1, keepdims=True))
            a /= a.sum(axis=1, keepdims=True)
            attn[b, hd] = a
            out += a @ v @ p["wo"][b, hd]
        x = x + out + p["bo"][b]
        sites.append(x)
        z = ln64(x, p["ln2_scale"][b], p["ln2_bias"][b]) @ p["w1"][b] + p["b1"][b]
        pre.append(z)
        x = x + gelu_tanh(z) @ p["w2"][b] + p["b2"][b]
    sites.append(x)
    logits = ln64(x, p["lnf_scale"], p["lnf_bias"]) @ p["lm_head"].T
    return Reference(logits, attn, np.stack(sites), np.stack(pre))


def alignment_reference(prep: pipeline.Prepared, attn: np.ndarray, config: ModelConfig | None = None) -> dict:
    """Per-layer mean over heads of the cosine and the tied argmax match, pooled over every valid query.

    A slow restatement of the alignment metrics: the expected row renormalised over the valid
    keys, the actual row restricted to them; a query counts when it has a valid key and mass.
    """
    config = config or prep.config
    L, H = config.num_layers, config.num_heads
    cos, tied = np.zeros((L, H)), np.zeros((L, H))
    for l in range(L):
        for h in range(H):
            p = int(prep.pair_index[l, h])
            m = prep.mask[p]
            e = np.where(m, prep.expected[p], 0.0).astype(np.float64)
            valid = m.any(-1) & (e.sum(-1) > 0)
            e = e / np.where(valid, e.sum(-1), 1.0)[..., None]
            a = np.where(m, attn[:, l, h], 0.0).astype(np.float64)
            c = (e * a).sum(-1) / np.maximum(np.linalg.norm(e, axis=-1) * np.linalg.norm(a, axis=-1), 1e-300)
            arg = np.where(m, a, -1.0).argmax(-1)
            hit = np.take_along_axis(e, arg[..., None], -1)[..., 0] >= e.max(-1) * (1 - 1e-6)
            cos[l, h] = c[valid].mean()
            tied[l, h] = hit[valid].mean()
    return {"cosine": cos.mean(1), "tied": tied.mean(1), "cosine_heads": cos}


def layer_records(records: list[dict], metric: str) -> np.ndarray:
    L = max(r["layer"] for r in records) + 1
    return np.array([np.mean([r[metric] for r in records if r["layer"] == l]) for l in range(L)])


def probe_tokens(prep: pipeline.Prepared) -> np.ndarray:
    """int [3, T]: two held-out sequences, and one of uniformly random tokens (mostly unseen bigrams: the back-off)."""
    rng = np.random.default_rng(0)
    rand = rng.integers(prep.config.vocab_size, size=(1, prep.tokens.shape[1]), dtype=np.int32)
    return np.concatenate([prep.tokens[:2], rand])


def next_logprobs(params: dict, tokens: np.ndarray, config: ModelConfig) -> np.ndarray:
    """float64 [B, T-1] the model's log-probability of each next token (log-softmax in float64)."""
    out = []
    for tok in tokens:
        z = np.asarray(fwd(params, tok, config).logits, np.float64)
        z = z - z.max(-1, keepdims=True)
        lp = z - np.log(np.exp(z).sum(-1, keepdims=True))
        out.append(lp[np.arange(len(tok) - 1), tok[1:]])
    return np.stack(out)


DCFG = DerivationConfig(log_target=True, frequency_weighting=True, smoothing=GPT2_OPTION3.smoothing)


def oracle_scores(tables: dict, factors: dict, tokens: np.ndarray, n: int, s: int) -> np.ndarray:
    """[T, T] the scores the construction promises: ``A_{n,s}[row of g_i] . B_{n,s}[t_j]``.

    The row of the query's context g_i: its own factor row when ``C^{n,s}`` counted it; for
    n = 2 otherwise the least-squares fit of its last token's centred ``log P~^{1,s}`` row onto
    the key factors ``B`` (weighted by the token weights), and zero for a token never seen as
    a context. ``factors``: ``table_factors`` of each table (the SVD is exact at these sizes, so
    ``A B^T`` does not depend on its key).
    """
    fac = factors[(n, s)]
    A, B, w = np.asarray(fac.A, np.float64), np.asarray(fac.B, np.float64), fac.col_w
    V = B.shape[0]
    own = {tuple(int(t) for t in c): r for r, c in enumerate(tables[(n, s)].contexts)}
    c1 = tables[(1, s)]
    uni = {int(c[0]): r for r, c in enumerate(c1.contexts)}
    rows = np.zeros((len(tokens), B.shape[1]))
    for i in range(len(tokens)):
        g = tuple(int(t) for t in tokens[max(0, i - n + 1) : i + 1])
        if len(g) == n and g in own:
            rows[i] = A[own[g]]
        elif n == 2 and g[-1] in uni:
            r = uni[g[-1]]
            c = np.zeros(V)
            sel = c1.rows == r
            c[c1.cols[sel]] = c1.values[sel]
            lp = np.log(c + DCFG.smoothing) - np.log(c.sum() + DCFG.smoothing * V)
            t = lp - (lp @ w) / w.sum()
            rows[i] = np.linalg.pinv(B.T @ (w[:, None] * B)) @ (B.T @ (w * t))
    return (rows @ B.T)[:, tokens]


def observed_contexts(corpus, m: int, *, counts: bool = False) -> set | dict:
    """The m-grams some ``C^{m,s}`` counts as a context: windows ``i .. i+m-1`` whose next token ``i+m`` is in the document.

    With ``counts``: each one's number of such windows (its row sum in ``C^{m,0}``, the largest over s).
    """
    out: dict = {}
    tok, docs = np.asarray(corpus.tokens), np.asarray(corpus.doc_ids)
    for d in np.unique(docs):
        t = [int(x) for x in tok[docs == d]]
        for i in range(len(t) - m):
            g = tuple(t[i : i + m])
            out[g] = out.get(g, 0) + 1
    return out if counts else set(out)


def backoff_logprobs(tables: dict, tokens: np.ndarray, max_n: int, *, kept: dict | None = None) -> np.ndarray:
    """float64 [B, T-1] the add-alpha back-off n-gram model, one prediction at a time.

    The context of position i is its longest suffix (within the sequence, at most ``max_n``
    tokens) observed in ``C^{m,0}`` and, for the levels in ``kept``, in that set.
    """
    alpha, V = GPT2_OPTION3.smoothing, tables[(1, 0)].vocab_size
    index = {
        m: {tuple(int(t) for t in c): r for r, c in enumerate(tables[(m, 0)].contexts)} for m in range(1, max_n + 1)
    }
    dense = {m: tables[(m, 0)].counts for m in range(1, max_n + 1)}
    out = np.zeros((tokens.shape[0], tokens.shape[1] - 1))
    for b, seq in enumerate(tokens):
        for i in range(len(seq) - 1):
            out[b, i] = -math.log(V)
            for m in range(min(max_n, i + 1), 0, -1):
                g = tuple(int(t) for t in seq[i - m + 1 : i + 1])
                if g in index[m] and (kept is None or m not in kept or g in kept[m]):
                    row = dense[m][index[m][g]].astype(np.float64)
                    out[b, i] = math.log((row[seq[i + 1]] + alpha) / (row.sum() + alpha * V))
                    break
    return out


# ----------------------------------------------------------------------------- module fixtures


@functools.cache
def prepared_real(shakespeare_dir: Path) -> pipeline.Prepared:
    """The small-preset run on real text, prepared once per process (test_detectors.py uses it too)."""
    corpora = pipeline.load_split(
        str(shakespeare_dir / COUNT_PLAY), str(shakespeare_dir / EVAL_PLAY), RUN, progress=False
    )
    return pipeline.prepare(*corpora, RUN, progress=False)


@pytest.fixture(scope="module")
def real(shakespeare_dir):
    return prepared_real(shakespeare_dir)


@pytest.fixture(scope="module")
def corpora(real):
    return real.corpus, real.eval_corpus


@pytest.fixture(scope="module")
def option3(real):
    return run_option3(real, progress=False)


@pytest.fixture(scope="module")
def refs(option3, real):
    return [reference_forward(option3.params, tok) for tok in probe_tokens(real)]


@pytest.fixture(scope="module")
def ablations(real):
    """The ablation switches, each on the same prepared run."""
    switches = {
        "norm_pad=False": GPT2Config(norm_pad=False),
        "detectors=False": GPT2Config(detectors=False),
        "detectors=False,positions=False": GPT2Config(detectors=False, positions=False),
        "prep_blocks=0": GPT2Config(prep_blocks=0),
        "head_writes=1": GPT2Config(head_writes=1.0),
    }
    return {k: run_gpt2(real, g, label=k, progress=False) for k, g in switches.items()}


# ----------------------------------------------------------------------------- the model is a plain GPT-2


def test_params_are_a_plain_gpt2_run_by_forward_with_no_hook(real, option3):
    params, cfg, info = option3.params, real.config, option3.extra
    P = num_prep_blocks(params, cfg)
    assert P == info["prep_blocks"] >= 1
    NB, H, D, K, V = P + cfg.num_layers, cfg.num_heads, cfg.d_model, cfg.d_head, cfg.vocab_size
    shapes = {
        "embed": (V, D),
        "wpe": (GPT2_OPTION3.n_ctx, D),
        "lm_head": (V, D),
        "wq": (NB, H, D, K),
        "wo": (NB, H, K, D),
        "bq": (NB, H, K),
        "bk": (NB, H, K),
        "bv": (NB, H, K),
        "bo": (NB, D),
        "w1": (NB, D, 4 * D),
        "w2": (NB, 4 * D, D),
        "ln1_scale": (NB, D),
        "lnf_bias": (D,),
    }
    for k, shape in shapes.items():
        assert tuple(params[k].shape) == shape, (k, params[k].shape)
    assert all(params[k].dtype == np.float32 for k in params)
    T = real.tokens.shape[1]
    out = fwd(params, real.tokens[0], cfg)
    assert out.prep_attn.shape == (P, H, T, T) and out.attn.shape == (cfg.num_layers, H, T, T)
    # The pipeline's run is this forward pass, batched: the scored attention is forward's own (to float32
    # rounding; the vmapped batch sums in another order).
    np.testing.assert_allclose(np.asarray(out.attn), option3.attn[0], rtol=0, atol=1e-4)


def test_float64_reference_forward_equals_jax_forward(real, option3, refs):
    """Logits to 1e-5 relative; attention to 1e-4 absolute (measured 1.6e-5: float32 rounding of the scores,
    which read a few dims of a residual whose norm is ~80)."""
    P = option3.extra["prep_blocks"]
    for tok, ref in zip(probe_tokens(real), refs, strict=True):
        out = fwd(option3.params, tok, real.config)
        scale = max(1.0, float(np.abs(ref.logits).max()))
        err = float(np.abs(np.asarray(out.logits, np.float64) - ref.logits).max())
        assert err <= 1e-5 * scale, f"logits differ by {err:.2e} (scale {scale:.1f})"
        np.testing.assert_allclose(np.asarray(out.prep_attn), ref.attn[:P], rtol=0, atol=1e-5)
        np.testing.assert_allclose(np.asarray(out.attn), ref.attn[P:], rtol=0, atol=1e-4)


def test_every_layernorm_is_an_exact_rescaling(option3, refs):
    """At every LN site ``||x||`` is the same at every position and the mean of x is 0: ``LN(x) = kappa x``."""
    D = option3.params["embed"].shape[1]
    gains = option3.extra["layernorm_gain"]
    for ref in refs:
        norms = np.linalg.norm(ref.sites, axis=-1)  # [sites, T]
        spread = (norms.max(1) - norms.min(1)) / norms.mean(1)
        assert spread.max() < 1e-6, f"relative spread of ||x|| per site: {np.array2string(spread, precision=2)}"
        rel_mean = np.abs(ref.sites.mean(-1)) / (norms / math.sqrt(D))
        assert rel_mean.max() < 1e-6, f"mean of x relative to its rms: {rel_mean.max():.2e}"
        kappa = 1.0 / np.sqrt(norms.mean(1) ** 2 / D + 1e-5)
        # Block 0's ln_1 sees tokens + positions, its ln_2 adds the previous-token codes, every later one the content.
        np.testing.assert_allclose(kappa[0], gains["embed"], rtol=1e-6)
        np.testing.assert_allclose(kappa[1], gains["prep_mlp"], rtol=1e-6)
        np.testing.assert_allclose(kappa[2:], gains["stream"], rtol=1e-6)


def test_scores_are_the_factors_of_the_count_tables(real, option3):
    """``q_i . k_j / sqrt(K)`` at every layout head equals ``A[row of g_i] . B[t_j]`` (back-off rows for unseen bigrams)."""
    cfg, params = real.config, option3.params
    P, K = option3.extra["prep_blocks"], cfg.d_head
    p64 = {k: np.asarray(params[k], np.float64) for k in ("wq", "wk", "bq", "bk")}
    worst: dict[tuple[int, int], float] = {}
    causal = np.tril(np.ones((real.tokens.shape[1],) * 2, bool))
    factors = {p: table_factors(real.tables[p], K, DCFG, key=jax.random.PRNGKey(0)) for p in real.pairs}
    bigrams = {tuple(g) for g in real.tables[(2, 0)].contexts.tolist()}
    unseen = 0
    for tok in probe_tokens(real):
        unseen += sum((int(a), int(b)) not in bigrams for a, b in zip(tok[:-1], tok[1:], strict=True))
        h_in = np.asarray(fwd(params, tok, cfg, return_inputs=True).query_inputs, np.float64)  # [L, T, D]
        oracle = {p: oracle_scores(real.tables, factors, tok, *p) for p in real.pairs}
        for l in range(cfg.num_layers):
            for h in range(cfg.num_heads):
                q = h_in[l] @ p64["wq"][P + l, h] + p64["bq"][P + l, h]
                k = h_in[l] @ p64["wk"][P + l, h] + p64["bk"][P + l, h]
                o = oracle[cfg.layout(l, h)]
                err = np.abs(q @ k.T / math.sqrt(K) - o)[causal].max() / np.abs(o[causal]).max()
                worst[cfg.layout(l, h)] = max(worst.get(cfg.layout(l, h), 0.0), float(err))
    assert max(worst.values()) < 1e-4, f"max relative score error per (n, s): {worst}"
    assert {n for n, _ in worst} == {1, 2}
    assert unseen > 10  # the back-off rows were exercised


# ----------------------------------------------------------------------------- alignment and the language model


def test_every_layout_layer_is_aligned(real, option3):
    cos, tied = layer_records(option3.records, "cosine"), layer_records(option3.records, "argmax_match_tied")
    worst = min(r["cosine"] for r in option3.records)
    msg = f"cosine per layer {np.round(cos, 5)}, tied argmax {np.round(tied, 4)}, min over heads {worst:.4f}"
    assert (cos >= 0.99).all() and (tied >= 0.95).all(), msg
    # The records agree with a slow restatement of the metrics.
    ref = alignment_reference(real, option3.attn)
    np.testing.assert_allclose(ref["cosine"], cos, rtol=0, atol=1e-5)
    np.testing.assert_allclose(ref["tied"], tied, rtol=0, atol=1e-6)


def test_the_model_is_its_own_ngram_language_model(real, option3):
    lm = option3.language_model
    d, g, u = lm["derived_bits_per_token"], lm["ngram_bits_per_token"], lm["uniform_bits_per_token"]
    assert abs(d - g) <= 0.005 * g, f"derived {d:.4f} vs n-gram {g:.4f} bits/token"
    assert d < u - 2.0, f"derived {d:.4f} vs uniform {u:.4f} bits/token"
    assert lm["ngram_order"] == real.config.max_n + 1
    # Stronger: every next-token log-probability is the n-gram model's (float32 logits), also on random text.
    diff = np.abs(next_logprobs(option3.params, real.tokens, real.config) - real.ngram_logprob)
    assert diff.max() < 1e-3, f"max |log p - log p_ngram| = {diff.max():.2e}"
    probe = probe_tokens(real)
    want = backoff_logprobs(real.tables, probe, real.config.max_n)
    diff = np.abs(next_logprobs(option3.params, probe, real.config) - want)
    assert diff.max() < 1e-3, f"on the probe sequences, max |log p - log p_ngram| = {diff.max():.2e}"


# ----------------------------------------------------------------------------- capacity


def residual_need(V: int, K: int, max_n: int, qf_tables: int, n_ctx: int, d_prev: int) -> int:
    """The documented residual rule: tok + pos + (max_n - 1) d_prev + qf + read + pad + the ones direction."""
    pos = (max_n - 1) + 1 + 2 * math.ceil(math.log2(n_ctx))
    return V + pos + (max_n - 1) * d_prev + qf_tables * K + V + 1 + 1


def needed_dims(err: pytest.ExceptionInfo) -> int:
    m = re.search(r"needs a residual of (\d+) dims", str(err.value))
    assert m, str(err.value)
    return int(m.group(1))


def test_word_level_is_refused_with_the_requirement(shakespeare_dir):
    run = dataclasses.replace(RUN, tokenizer="word", max_vocab=1500)
    corpus, _ = pipeline.load_split(str(shakespeare_dir / COUNT_PLAY), None, run, progress=False)
    V = corpus.vocab_size
    tables = count_tables(corpus.tokens, V, 2, 3, doc_ids=corpus.doc_ids, progress=False)
    cfg = preset("small", V, tokenizer="word")
    with pytest.raises(CapacityError) as err:
        check_fits(tables, cfg, GPT2_OPTION3)
    need = needed_dims(err)
    assert "d_model=384" in str(err.value)
    # At least the blocks that do not shrink (tokens, positions, query factors, readout, pad, ones).
    assert need >= residual_need(V, cfg.d_head, 2, 4, GPT2_OPTION3.n_ctx, 0) > 384, str(err.value)


def test_check_fits_knows_the_previous_token_head_capacity(real):
    """V = 69 at d_head 32 needs 3 previous-token heads; a 2-head model cannot hold them (checked before any SVD)."""
    cfg = ModelConfig(vocab_size=real.config.vocab_size, d_model=384, d_head=32, num_layers=2, num_heads=2, max_s=1)
    with pytest.raises(CapacityError, match="3 previous-token heads"):
        check_fits(real.tables, cfg, GPT2_OPTION3)
    with pytest.raises(CapacityError, match="3 previous-token heads"):
        derive_gpt2(real.tables, cfg, GPT2_OPTION3, key=jax.random.key(0))


@pytest.mark.parametrize(
    ("kw", "named"),
    [
        (dict(positions=False), "detectors=True needs positions=True"),
        (dict(prep_blocks=9), "prep_blocks=9"),
        (dict(prep_blocks=-1), "prep_blocks=-1"),
        (dict(n_ctx=1), "n_ctx=1"),
        (dict(smoothing=0.0), "smoothing=0.0"),
        (dict(fire=5.0), "fire=5.0"),
        (dict(position_gap=2.0), "position_gap=2.0"),
    ],
)
def test_gpt2_config_refuses_bad_values(kw, named):
    with pytest.raises(JaxattnError, match=re.escape(named)):
        GPT2Config(**kw)


def test_sequences_longer_than_n_ctx_are_refused(real):
    with pytest.raises(JaxattnError, match="seq_len=32 is longer than the model's n_ctx=16"):
        run_gpt2(real, GPT2Config(n_ctx=16), progress=False)


def test_tiny_d_model_is_refused_with_the_requirement(real):
    cfg = dataclasses.replace(real.config, d_model=160)
    with pytest.raises(CapacityError) as err:
        derive_gpt2(real.tables, cfg, key=real.key("derive"))
    with pytest.raises(CapacityError) as early:
        check_fits(real.tables, cfg, GPT2_OPTION3)
    assert str(early.value) == str(err.value)
    V = cfg.vocab_size
    assert "d_model=160" in str(err.value)
    # The previous-token codes shrink to what is left, down to 8 dims; below that, refused.
    assert needed_dims(err) == residual_need(V, cfg.d_head, 2, 4, GPT2_OPTION3.n_ctx, 8), str(err.value)
    # One dim short of one-hot codes still fits, with near-orthogonal codes.
    fits = residual_need(V, cfg.d_head, 2, 4, GPT2_OPTION3.n_ctx, V)
    check_fits(real.tables, dataclasses.replace(cfg, d_model=fits), GPT2_OPTION3)
    check_fits(real.tables, dataclasses.replace(cfg, d_model=fits - 1), GPT2_OPTION3)


TRIGRAM = (("max_n", 3), ("num_heads", 6), ("max_s", 1), ("num_layers", 3), ("d_model", 424))
TRIGRAM_GPT2 = GPT2Config(n_ctx=64)


@pytest.fixture(scope="module")
def trigram(corpora):
    """Char trigrams of one play: 5.8k contexts, more than 3 MLPs of 1696 units hold."""
    run = dataclasses.replace(RUN, model_overrides=TRIGRAM)
    return pipeline.prepare(*corpora, run, progress=False)


@pytest.fixture(scope="module")
def contexts(corpora):
    """{m: {m-gram: windows}} of the count corpus, m = 2, 3 (the slow reference of the detector levels)."""
    return {m: observed_contexts(corpora[0], m, counts=True) for m in (2, 3)}


@pytest.fixture(scope="module")
def trigram_runs(trigram):
    out = {}
    for name, g in {
        "auto": TRIGRAM_GPT2,
        "approximate": dataclasses.replace(TRIGRAM_GPT2, prep_blocks=1, approximate=True),
    }.items():
        params, info = derive_gpt2(trigram.tables, trigram.config, g, key=trigram.key("derive"))
        run = pipeline.run_model(params, trigram.tokens, trigram.config, batch_size=4, progress=False)
        out[name] = (params, info, run, alignment_reference(trigram, run.attn))
    return out


def test_too_narrow_an_mlp_is_refused_naming_the_units(contexts, trigram):
    cfg, V, F = trigram.config, trigram.config.vocab_size, 4 * trigram.config.d_model
    n2, n3 = len(contexts[2]), len(contexts[3])
    assert V + n2 <= 2 * F < 3 * F < V + n2 + n3
    narrow = dataclasses.replace(TRIGRAM_GPT2, prep_blocks=1)
    with pytest.raises(CapacityError) as err:
        derive_gpt2(trigram.tables, cfg, narrow, key=trigram.key("derive"))
    with pytest.raises(CapacityError) as early:
        check_fits(trigram.tables, cfg, narrow)
    msg = str(err.value)
    assert str(early.value) == msg
    assert f"needs {V + n2 + n3} MLP units ({V} token + {n2} 2-gram + {n3} 3-gram)" in msg, msg
    assert f"3 MLP(s) x {F} = {3 * F}" in msg and "n=3" in msg, msg


def test_automatic_preparation_blocks_fit_every_detector(contexts, trigram, trigram_runs):
    cfg, V, F = trigram.config, trigram.config.vocab_size, 4 * trigram.config.d_model
    n2, n3 = len(contexts[2]), len(contexts[3])
    params, info, run, align = trigram_runs["auto"]
    # Trigram units may use the preparation blocks' MLPs and layout layers 0 and 1's.
    assert info["prep_blocks"] == math.ceil((V + n2 + n3) / F) - 2 > 1, info["mlp_units"]
    assert num_prep_blocks(params, cfg) == info["prep_blocks"]
    assert info["mlp_units"]["kept"] == {"1": V, "2": n2, "3": n3}
    assert (align["cosine"] >= 0.99).all() and (align["tied"] >= 0.95).all(), align
    diff = np.abs(run.next_logprob - trigram.ngram_logprob)
    assert trigram.ngram_max_n == 3 and diff.max() < 1e-3, f"vs the order-4 n-gram model: {diff.max():.2e}"


def test_approximate_mode_keeps_the_most_frequent_contexts(contexts, trigram, trigram_runs):
    V, F = trigram.config.vocab_size, 4 * trigram.config.d_model
    _, info, run, align = trigram_runs["approximate"]
    _, _, exact_run, exact = trigram_runs["auto"]
    units = info["mlp_units"]
    assert info["prep_blocks"] == 1
    assert units["kept"]["3"] == 3 * F - V - units["kept"]["2"] < units["needed"]["3"], units
    assert units["kept"]["2"] == units["needed"]["2"]
    msg = f"cosine per layer: approximate {np.round(align['cosine'], 4)}, exact {np.round(exact['cosine'], 4)}"
    # Layers 0 (n=1) and 1 (n=2) lose nothing; the n=3 layer backs off for the dropped trigrams.
    np.testing.assert_allclose(align["cosine"][:2], exact["cosine"][:2], rtol=0, atol=1e-4, err_msg=msg)
    assert 0.5 < align["cosine"][2] < exact["cosine"][2] - 1e-3, msg
    # The LM is the back-off n-gram model whose trigram contexts are the kept ones: the most frequent
    # (ties in lexicographic order), the others backing off to their bigram.
    counts = contexts[3]
    kept = set(sorted(counts, key=lambda g: (-counts[g], g))[: units["kept"]["3"]])
    want = backoff_logprobs(trigram.tables, trigram.tokens, 3, kept={3: kept})
    diff = np.abs(run.next_logprob - want)
    assert diff.max() < 1e-3, f"vs the pruned back-off model: {diff.max():.2e}"
    np.testing.assert_allclose(backoff_logprobs(trigram.tables, trigram.tokens, 3), trigram.ngram_logprob, atol=1e-12)
    lost = (exact_run.next_logprob.mean() - run.next_logprob.mean()) / math.log(2)
    assert 0 < lost < 0.5, f"pruning costs the held-out LM {lost:.3f} bits/token"


def test_trigrams_on_a_planted_chain_are_exact():
    """max_n = 3 at the small preset on a V = 12 Markov chain: aligned on every layer, equal to the order-4 n-gram LM."""
    from jaxattn.corpus import corpus_from_ids

    tokens, docs, _ = markov_corpus(3, 12, 30_000, num_docs=4)
    train = docs < 3
    corpus = corpus_from_ids(tokens[train], docs[train], 12)
    ev = corpus_from_ids(tokens[~train], None, 12)
    prep = pipeline.prepare(corpus, ev, dataclasses.replace(RUN, model_overrides=(("max_n", 3),)), progress=False)
    params, info = derive_gpt2(prep.tables, prep.config, key=prep.key("derive"))
    run = pipeline.run_model(params, prep.tokens, prep.config, batch_size=4, progress=False)
    align = alignment_reference(prep, run.attn)
    assert info["mlp_units"]["kept"] == {str(k): int(v) for k, v in info["mlp_units"]["needed"].items()}
    assert (align["cosine"] >= 0.999).all() and (align["tied"] >= 0.99).all(), align
    diff = np.abs(run.next_logprob - prep.ngram_logprob)
    assert prep.ngram_max_n == 3 and diff.max() < 1e-3, f"vs the order-4 n-gram model: {diff.max():.2e}"


# ----------------------------------------------------------------------------- ablation switches


def test_without_the_norm_pad_layernorm_rescales_per_position(real, option3, ablations):
    res = ablations["norm_pad=False"]
    base, off = layer_records(option3.records, "cosine"), layer_records(res.records, "cosine")
    msg = f"cosine per layer: default {np.round(base, 5)}, norm_pad=False {np.round(off, 5)}"
    assert off[1:].mean() < base[1:].mean() - 1e-3, msg
    ref = reference_forward(res.params, real.tokens[0])
    norms = np.linalg.norm(ref.sites, axis=-1)
    spread = (norms.max(1) - norms.min(1)) / norms.mean(1)
    assert spread[2:].max() > 1e-3, f"relative spread of ||x|| per site: {np.array2string(spread, precision=2)}"


@pytest.mark.parametrize("name", ["detectors=False", "detectors=False,positions=False"])
def test_without_detectors_bigram_layers_misalign(option3, ablations, name):
    res = ablations[name]
    base, off = layer_records(option3.records, "cosine"), layer_records(res.records, "cosine")
    msg = f"cosine per layer: default {np.round(base, 5)}, {name} {np.round(off, 5)}"
    assert abs(off[0] - base[0]) < 1e-4, msg  # the n = 1 layer reads only the token block
    assert (off[1:] < base[1:] - 0.05).all(), msg
    lm = res.language_model  # the readout falls back to the bigram model
    assert lm["derived_bits_per_token"] > option3.language_model["derived_bits_per_token"] + 0.1, lm


def test_without_a_preparation_block_the_previous_token_heads_take_layout_heads(real, option3, ablations):
    res = ablations["prep_blocks=0"]
    cfg, H = real.config, real.config.num_heads
    assert res.extra["prep_blocks"] == 0 and num_prep_blocks(res.params, cfg) == 0
    wv = np.abs(np.asarray(res.params["wv"][0])).sum(axis=(1, 2))
    prev = np.flatnonzero(wv > 0)
    n_prev = -(-cfg.vocab_size // cfg.d_head)
    assert prev.tolist() == list(range(H - n_prev, H)), prev
    T = real.tokens.shape[1]
    on_prev = res.attn[:, 0, prev][..., np.arange(1, T), np.arange(T - 1)]
    assert on_prev.min() >= 1 - 1e-6
    base = {(r["layer"], r["head"]): r["cosine"] for r in option3.records}
    now = {(r["layer"], r["head"]): r["cosine"] for r in res.records}
    taken = [now[(0, h)] for h in prev]
    msg = f"layer-0 cosine of the taken heads {np.round(taken, 4)} vs default {[round(base[(0, h)], 4) for h in prev]}"
    assert max(taken) < min(base[(0, h)] for h in prev) - 0.3, msg
    others = max(abs(now[k] - base[k]) for k in base if not (k[0] == 0 and k[1] in prev))
    assert others < 1e-3, f"other heads moved by {others:.2e}"


def test_head_writes_pile_up_with_depth(option3, ablations):
    base = layer_records(option3.records, "cosine")
    drop = base - layer_records(ablations["head_writes=1"].records, "cosine")
    msg = f"cosine drop per layer with O(1) head writes: {np.round(drop, 4)}"
    assert abs(drop[0]) < 1e-4, msg  # nothing has been written before layer 0 reads
    assert drop[1] > 0.05 and drop[-1] > drop[1], msg


# ----------------------------------------------------------------------------- determinism


def test_same_key_gives_bit_identical_params(real, option3):
    params, _ = derive_gpt2(real.tables, real.config, key=real.key("derive"))
    assert set(params) == set(option3.params)
    for k in params:
        np.testing.assert_array_equal(np.asarray(params[k]), np.asarray(option3.params[k]), err_msg=k)


def test_another_key_changes_the_weights_but_not_the_attention(real):
    """At a d_model where the previous-token codes are random (not one-hot) the key matters for the weights only."""
    cfg = dataclasses.replace(real.config, d_model=340)
    pa, ia = derive_gpt2(real.tables, cfg, key=real.key("derive"))
    pb, ib = derive_gpt2(real.tables, cfg, key=jax.random.PRNGKey(12345))
    assert ia["residual_dims"]["prev1"] < cfg.vocab_size and 0 < ia["prev_code_coherence"] < 0.95, ia
    assert not np.array_equal(np.asarray(pa["w1"]), np.asarray(pb["w1"]))
    for tok in real.tokens[:2]:
        a, b = fwd(pa, tok, cfg), fwd(pb, tok, cfg)
        np.testing.assert_allclose(np.asarray(a.attn), np.asarray(b.attn), rtol=0, atol=1e-4)
        np.testing.assert_allclose(np.asarray(a.prep_attn), np.asarray(b.prep_attn), rtol=0, atol=1e-4)
        np.testing.assert_allclose(np.asarray(a.logits), np.asarray(b.logits), rtol=0, atol=1e-3)
