"""The frozen derived transformer: config, presets, a pure forward function and an NNX module.

Axis vocabulary (einsum letters in brackets):
    B batch [b], L layers [l], H heads [h], T query positions [t], S key positions [s],
    D d_model [d], K d_head [k], F MLP width 4*D [f], V vocabulary [v].

The forward pass is written for one sequence; :func:`forward_batch` vmaps it over a batch.
Attention inside a layer is one single-head kernel vmapped over heads.
"""

# ruff: noqa: F722  (jaxtyping shape strings such as "R V" are not Python expressions)
from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxattn.errors import JaxattnError
from jaxattn.typing import Array, ArrayLike, Float, Integer, PRNGKey

Params = dict[str, jax.Array]

_LAYER_KEYS = ("wq", "wk", "wv", "wo", "ln1_scale", "ln1_bias", "ln2_scale", "ln2_bias", "w1", "b1", "w2", "b2")
# Optional per-head biases of a GPT-2-shaped model (``bo`` [blocks, D] is per block).
_HEAD_BIASES = ("bq", "bk", "bv")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Static configuration of a derived model.

    Attributes:
        vocab_size: V.
        d_model: D.
        d_head: K, also the SVD rank.
        num_layers: L.
        num_heads: H.
        max_n: layer l uses n = min(l + 1, max_n).
        max_s: head h uses s = min(h, max_s).
        weight_std: per-layer std of the stacked W_Q, W_K, W_V, W_O (None: no rescaling).
        layernorm: apply pre-LayerNorms.
        mlp: include the random, untrained GELU MLP.
        mlp_std: std of the MLP weights.
        tokenizer: "char" or "word" (recorded; the model only sees ids).
    """

    vocab_size: int
    d_model: int = 768
    d_head: int = 64
    num_layers: int = 12
    num_heads: int = 12
    max_n: int = 2
    max_s: int = 3
    weight_std: float | None = 0.01
    layernorm: bool = True
    mlp: bool = True
    mlp_std: float = 0.02
    tokenizer: str = "char"

    def __post_init__(self) -> None:
        for name in ("vocab_size", "d_model", "d_head", "num_layers", "num_heads", "max_n"):
            if int(getattr(self, name)) < 1:
                raise JaxattnError(f"{name}={getattr(self, name)} must be >= 1")
        if self.max_s < 0:
            raise JaxattnError(f"max_s={self.max_s} must be >= 0")
        if self.d_head > self.d_model:
            raise JaxattnError(f"d_head={self.d_head} > d_model={self.d_model}")

    def layout(self, layer: int, head: int) -> tuple[int, int]:
        """(n, s) used by a layer and head."""
        return min(layer + 1, self.max_n), min(head, self.max_s)

    @property
    def pairs(self) -> list[tuple[int, int]]:
        """Every (n, s) table the model needs (plus the (n-1, 0) tables the n-gram embeddings need)."""
        need = {self.layout(l, h) for l in range(self.num_layers) for h in range(self.num_heads)}
        for n, _ in list(need):
            for m in range(1, n):
                need.add((m, 0))
        return sorted(need)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict."""
        return dataclasses.asdict(self)


PRESETS: dict[str, dict[str, Any]] = {
    # The seed's configuration (SPEC §2).
    "seed": dict(d_model=768, d_head=64, num_layers=12, num_heads=12, max_n=2, max_s=3, weight_std=0.01),
    # Fast runs and tests: same layout rules, every (n, s) still present. d_model = heads x d_head
    # (a GPT-2 export needs it), wide enough for the standard-GPT-2 Option 3 at char level.
    "small": dict(d_model=384, d_head=32, num_layers=4, num_heads=12, max_n=2, max_s=3, weight_std=0.01),
}


def preset(name: str, vocab_size: int, **overrides: Any) -> ModelConfig:
    """A named preset ("seed" or "small") for a vocabulary.

    Args:
        name: a key of :data:`PRESETS`.
        vocab_size: V.
        **overrides: ModelConfig fields to change; None values are ignored.

    Returns:
        The :class:`ModelConfig`.

    Raises:
        JaxattnError: unknown preset name.
    """
    if name not in PRESETS:
        raise JaxattnError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    kw = {**PRESETS[name], **{k: v for k, v in overrides.items() if v is not None}}
    return ModelConfig(vocab_size=int(vocab_size), **kw)


def _const(value: float, shape: tuple[int, ...]) -> jax.Array:
    """A float32 array filled with ``value``, made on the host (an eager ``jnp.zeros`` compiles per shape)."""
    return jax.device_put(np.full(shape, value, np.float32))


def init_mlp(key: PRNGKey, config: ModelConfig) -> Params:
    """Untrained MLP and LayerNorm parameters, stacked over layers.

    Args:
        key: PRNG key of the MLP weights (normal, std ``config.mlp_std``).
        config: the model config.

    Returns:
        w1 [L, D, F], b1 [L, F], w2 [L, F, D], b2 [L, D], ln{1,2}_{scale,bias} [L, D],
        lnf_scale, lnf_bias [D].
    """
    L, D = config.num_layers, config.d_model
    F = 4 * D
    k1, k2 = jax.random.split(key)
    return {
        "w1": config.mlp_std * jax.random.normal(k1, (L, D, F), jnp.float32),
        "b1": _const(0.0, (L, F)),
        "w2": config.mlp_std * jax.random.normal(k2, (L, F, D), jnp.float32),
        "b2": _const(0.0, (L, D)),
        "ln1_scale": _const(1.0, (L, D)),
        "ln1_bias": _const(0.0, (L, D)),
        "ln2_scale": _const(1.0, (L, D)),
        "ln2_bias": _const(0.0, (L, D)),
        "lnf_scale": _const(1.0, (D,)),
        "lnf_bias": _const(0.0, (D,)),
    }


def layer_norm(
    x: Float[Array, "*batch D"], scale: Float[Array, " D"], bias: Float[Array, " D"], eps: float = 1e-5
) -> Float[Array, "*batch D"]:
    """LayerNorm over the last axis, computed in float32.

    Args:
        x: [..., D].
        scale: [D].
        bias: [D].
        eps: added to the variance.

    Returns:
        [..., D], in the dtype of ``x``.
    """
    x32 = x.astype(jnp.float32)
    mu = jnp.mean(x32, axis=-1, keepdims=True)
    var = jnp.var(x32, axis=-1, keepdims=True)
    return ((x32 - mu) * jax.lax.rsqrt(var + eps) * scale + bias).astype(x.dtype)


def causal_softmax(scores: Float[ArrayLike, "T S"]) -> Float[Array, "T S"]:
    """Row softmax in float32 over keys ``s <= t``.

    Args:
        scores: [T, S] logits.

    Returns:
        float32 [T, S] probabilities, exactly zero above the diagonal.
    """
    T, S = scores.shape
    causal = jnp.tril(jnp.ones((T, S), dtype=bool))
    s32 = scores.astype(jnp.float32)
    s32 = jnp.where(causal, s32, jnp.finfo(jnp.float32).min)
    return jnp.where(causal, jax.nn.softmax(s32, axis=-1), 0.0)


def head_mix(
    q_in: Float[ArrayLike, "T D"],
    k_in: Float[ArrayLike, "T D"],
    v_in: Float[ArrayLike, "T D"],
    wq: Float[ArrayLike, "D K"],
    wk: Float[ArrayLike, "D K"],
    wv: Float[ArrayLike, "D K"],
    logits: Float[ArrayLike, "T T"] | None = None,
    *,
    bq: Float[ArrayLike, " K"] | None = None,
    bk: Float[ArrayLike, " K"] | None = None,
    bv: Float[ArrayLike, " K"] | None = None,
) -> tuple[Float[Array, "T K"], Float[Array, "T T"]]:
    """One causal attention head on one sequence, up to its output projection: the single-head kernel.

    Args:
        q_in: [T, D] query-side input.
        k_in: [T, D] key-side input.
        v_in: [T, D] value-side input.
        wq, wk, wv: [D, K].
        logits: optional [T, T] scores that replace ``q k^T / sqrt(K)`` (Option 2).
        bq, bk, bv: optional [K] biases of the query, key and value projections (GPT-2's ``c_attn.bias``).

    Returns:
        the attention-weighted values [T, K], probs float32 [T, T].
    """
    if logits is None:
        q = jnp.einsum("td,dk->tk", q_in, wq)
        k = jnp.einsum("sd,dk->sk", k_in, wk)
        if bq is not None:
            q = q + bq
        if bk is not None:
            k = k + bk
        logits = jnp.einsum("tk,sk->ts", q, k) / jnp.sqrt(jnp.asarray(wq.shape[-1], jnp.float32))
    probs = causal_softmax(logits)
    v = jnp.einsum("sd,dk->sk", v_in, wv)
    if bv is not None:
        v = v + bv
    return jnp.einsum("ts,sk->tk", probs.astype(v.dtype), v), probs


def attention_head(
    q_in: Float[ArrayLike, "T D"],
    k_in: Float[ArrayLike, "T D"],
    v_in: Float[ArrayLike, "T D"],
    wq: Float[ArrayLike, "D K"],
    wk: Float[ArrayLike, "D K"],
    wv: Float[ArrayLike, "D K"],
    wo: Float[ArrayLike, "K D"],
    logits: Float[ArrayLike, "T T"] | None = None,
    *,
    bq: Float[ArrayLike, " K"] | None = None,
    bk: Float[ArrayLike, " K"] | None = None,
    bv: Float[ArrayLike, " K"] | None = None,
) -> tuple[Float[Array, "T D"], Float[Array, "T T"]]:
    """One causal attention head on one sequence, with its output projection (:func:`head_mix` then ``@ wo``).

    Args:
        q_in, k_in, v_in, wq, wk, wv, logits, bq, bk, bv: as for :func:`head_mix`.
        wo: [K, D] the head's output projection.

    Returns:
        out [T, D], probs float32 [T, T].
    """
    mix, probs = head_mix(q_in, k_in, v_in, wq, wk, wv, logits, bq=bq, bk=bk, bv=bv)
    return jnp.einsum("tk,kd->td", mix, wo), probs


def _layer_heads(
    q_in: jax.Array, k_in: jax.Array, v_in: jax.Array, hw: dict[str, jax.Array], logits: jax.Array | None
) -> tuple[jax.Array, jax.Array]:
    """Every head of one layer: :func:`head_mix` vmapped over the head axis, then one output projection.

    The output projection contracts heads and K together (``[T, H K] @ [H K, D]``, GPT-2's
    ``c_proj``), which on CPU is 2.4x faster than projecting each head and summing.

    Returns:
        the layer's attention output [T, D] and probs [H, T, T].
    """

    def one(w: dict[str, jax.Array], lg: jax.Array | None) -> tuple[jax.Array, jax.Array]:
        biases = {b: w[b] for b in _HEAD_BIASES if b in w}
        return head_mix(q_in, k_in, v_in, w["wq"], w["wk"], w["wv"], lg, **biases)

    mix, probs = jax.vmap(one)({k: v for k, v in hw.items() if k != "wo"}, logits)
    return jnp.einsum("htk,hkd->td", mix, hw["wo"]), probs


class ForwardOutput(NamedTuple):
    """Outputs of :func:`forward`.

    Attributes:
        logits: [T, V] next-token logits (``lm_head`` when the params have one, else the tied
            embedding).
        attn: float32 [L, H, T, T] attention probabilities of the layout layers.
        query_inputs: [L, T, D] the query-side input of every layout layer (None unless asked).
        prep_attn: float32 [P, H, T, T] attention of the P preparation blocks that precede the
            layout (P = 0 for the seed model).
    """

    logits: Float[Array, "*B T V"]
    attn: Float[Array, "*B L H T T"]
    query_inputs: Float[Array, "*B L T D"] | None
    prep_attn: Float[Array, "*B P H T T"] | None = None


def num_prep_blocks(params: Mapping[str, Any], config: ModelConfig) -> int:
    """Blocks before the layout: the params' block count minus ``config.num_layers``.

    Args:
        params: the parameter pytree, jax or numpy arrays (``wq`` [blocks, H, D, K]).
        config: the model config.

    Returns:
        P >= 0.

    Raises:
        JaxattnError: the params have fewer blocks than the layout.
    """
    blocks = int(np.shape(params["wq"])[0])
    if blocks < config.num_layers:
        raise JaxattnError(f"params have {blocks} blocks but the layout has num_layers={config.num_layers}")
    return blocks - config.num_layers


def check_token_ids(tokens: Integer[ArrayLike, "*shape"], vocab_size: int) -> None:
    """Refuses a concrete token id outside ``[0, vocab_size)``; does nothing for traced ids.

    Under ``jax.jit`` (or ``vmap``/``grad``) the ids are tracers and cannot be read, and a
    ``checkify`` check would force every caller to functionalise its errors. So inside a trace
    :func:`forward` *clips* each id into ``[0, V)`` instead (``jnp.take(..., mode="clip")``:
    ``-1`` reads row 0 and ``V + 50`` row ``V - 1``). Check the ids before the jitted call, or
    call :func:`forward` / :func:`forward_batch` outside ``jit``, where they are checked.

    Args:
        tokens: int [...] token ids (numpy, jax or a tracer).
        vocab_size: V.

    Raises:
        JaxattnError: naming the first out-of-range id found (the minimum if negative, else the
            maximum) and V, or a non-integer dtype.
    """
    if isinstance(tokens, jax.core.Tracer):
        return
    arr = np.asarray(tokens)
    if not np.issubdtype(arr.dtype, np.integer):
        raise JaxattnError(f"tokens must be integers, got dtype {arr.dtype}")
    if arr.size:
        lo, hi = int(arr.min()), int(arr.max())
        if lo < 0 or hi >= vocab_size:
            raise JaxattnError(f"token id {lo if lo < 0 else hi} is outside [0, vocab_size={vocab_size})")


def forward(
    params: Params,
    tokens: Integer[ArrayLike, " T"],
    config: ModelConfig,
    *,
    qk_inputs: tuple[Float[Array, "L T D"], Float[Array, "L T D"]] | None = None,
    attn_logits: Float[Array, "L H T T"] | None = None,
    return_inputs: bool = False,
) -> ForwardOutput:
    """Runs the frozen pre-LN decoder on one sequence.

    The params fix the architecture. The seed model has ``embed`` [V, D]; ``wq``, ``wk``,
    ``wv`` [L, H, D, K]; ``wo`` [L, H, K, D] and the MLP and LayerNorm arrays of
    :func:`init_mlp`. A GPT-2-shaped model may add learned positions ``wpe`` [n_ctx, D],
    attention biases ``bq``, ``bk``, ``bv`` [blocks, H, K] and ``bo`` [blocks, D], an untied
    ``lm_head`` [V, D], and P = blocks - L preparation blocks ahead of the layout (every
    stacked array then has ``blocks`` = P + L rows); their attention is returned apart and
    never scored.

    Args:
        params: the parameter pytree.
        tokens: int [T] (T <= n_ctx with ``wpe``).
        config: static configuration.
        qk_inputs: optional (q_in, k_in), each [L, T, D]: attention reads these instead of
            ``LN(x)`` for queries and keys (used by derivations with n-gram-aware queries).
        attn_logits: optional [L, H, T, T] logits replacing the Q/K scores (Option 2).
        return_inputs: also return the query input of every layer.

    Returns:
        :class:`ForwardOutput`.

    Raises:
        JaxattnError: T > n_ctx, a hook together with preparation blocks, or (concrete ``tokens``
            only) a token id outside ``[0, V)``; see :func:`check_token_ids` for ids under ``jit``.
    """
    check_token_ids(tokens, int(params["embed"].shape[0]))
    tokens = jnp.asarray(tokens)
    T = int(tokens.shape[0])
    prep = num_prep_blocks(params, config)
    if prep and (qk_inputs is not None or attn_logits is not None):
        raise JaxattnError("qk_inputs/attn_logits hooks are not supported with preparation blocks")
    # Traced ids cannot be checked: they are clipped into [0, V) (documented in check_token_ids).
    x = jnp.take(params["embed"], jnp.asarray(tokens), axis=0, mode="clip")
    if "wpe" in params:
        if T > params["wpe"].shape[0]:
            raise JaxattnError(f"sequence of {T} tokens is longer than n_ctx={params['wpe'].shape[0]}")
        x = x + params["wpe"][:T]
    layer_params = {k: params[k] for k in _LAYER_KEYS + _HEAD_BIASES + ("bo",) if k in params}
    extras: dict[str, jax.Array] = {}
    if qk_inputs is not None:
        extras["q_in"], extras["k_in"] = qk_inputs
    if attn_logits is not None:
        extras["logits"] = attn_logits

    def block(x: jax.Array, xs: tuple[Params, dict[str, jax.Array]]) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
        p, ex = xs
        h = layer_norm(x, p["ln1_scale"], p["ln1_bias"]) if config.layernorm else x
        q_in = ex.get("q_in", h)
        k_in = ex.get("k_in", h)
        head_w = {k: p[k] for k in ("wq", "wk", "wv", "wo") + _HEAD_BIASES if k in p}
        out, probs = _layer_heads(q_in, k_in, h, head_w, ex.get("logits"))
        x = x + out
        if "bo" in p:
            x = x + p["bo"]
        if config.mlp:
            h2 = layer_norm(x, p["ln2_scale"], p["ln2_bias"]) if config.layernorm else x
            f = jax.nn.gelu(jnp.einsum("td,df->tf", h2, p["w1"]) + p["b1"])
            x = x + jnp.einsum("tf,fd->td", f, p["w2"]) + p["b2"]
        return x, (probs, q_in if return_inputs else jnp.zeros((), x.dtype))

    x, (attn, q_inputs) = jax.lax.scan(block, x, (layer_params, extras))
    hf = layer_norm(x, params["lnf_scale"], params["lnf_bias"]) if config.layernorm else x
    logits = jnp.einsum("td,vd->tv", hf, params.get("lm_head", params["embed"]))
    return ForwardOutput(logits, attn[prep:], q_inputs[prep:] if return_inputs else None, attn[:prep])


@functools.partial(jax.jit, static_argnames=("config", "return_inputs"))
def _forward_batch_jit(
    params: Params,
    tokens: jax.Array,
    config: ModelConfig,
    qk_inputs: Any,
    attn_logits: Any,
    return_inputs: bool,
) -> ForwardOutput:
    fn = functools.partial(forward, config=config, return_inputs=return_inputs)
    return jax.vmap(lambda t, qk, lg: fn(params, t, qk_inputs=qk, attn_logits=lg))(tokens, qk_inputs, attn_logits)


def forward_batch(
    params: Params,
    tokens: Integer[ArrayLike, "B T"],
    config: ModelConfig,
    *,
    qk_inputs: Any = None,
    attn_logits: Any = None,
    return_inputs: Any = False,
) -> Any:
    """:func:`forward` vmapped over a batch, jitted (compiled once per shape and config).

    Concrete ``tokens`` are checked first (:func:`check_token_ids`); traced ones are clipped.
    The keyword arguments and the result are typed ``Any`` as they were when this function was
    the bare ``jax.jit`` wrapper (callers pass the hooks as ``**kwargs``); the shapes are below.

    Args:
        params: shared parameters.
        tokens: int [B, T].
        config: static configuration.
        qk_inputs: optional (q_in, k_in), each [B, L, T, D].
        attn_logits: optional [B, L, H, T, T].
        return_inputs: also return query inputs [B, L, T, D].

    Returns:
        :class:`ForwardOutput` with a leading batch axis: logits [B, T, V], attn [B, L, H, T, T].

    Raises:
        JaxattnError: a concrete token id outside ``[0, V)``.
    """
    check_token_ids(tokens, int(params["embed"].shape[0]))
    return _forward_batch_jit(params, tokens, config, qk_inputs, attn_logits, return_inputs)
