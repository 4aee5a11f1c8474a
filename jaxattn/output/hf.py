"""HuggingFace GPT-2 export: a jaxattn model as a checkpoint ``transformers`` loads unchanged.

A model whose forward is a plain pre-LN GPT-2 (no ``qk_inputs`` or ``attn_logits`` hook) is
written as four files in one directory (:func:`save_gpt2_checkpoint`):

* ``config.json``: a GPT-2 ``config.json`` (:func:`gpt2_config`): ``model_type "gpt2"``,
  ``n_layer`` (every block, preparation blocks included), ``n_head``, ``n_embd``,
  ``n_positions``, ``n_inner``, ``activation_function "gelu_new"`` (jax's default tanh GELU),
  ``layer_norm_epsilon`` 1e-5, ``tie_word_embeddings``, dropout 0, plus a ``"jaxattn"`` block
  (version, option, preset, tokenizer, the :class:`~jaxattn.model.ModelConfig` and which
  parameter arrays the model had) that :func:`load_gpt2_checkpoint` reads back;
* ``model.safetensors``: float32 tensors under HF's own GPT-2 names (:func:`gpt2_state_dict`),
  unprefixed as in HF's ``gpt2`` checkpoint, in Conv1D ``[in, out]`` layout:
  ``wte.weight`` [V, D], ``wpe.weight`` [n_positions, D], per block ``h.{i}.ln_1``/``ln_2``
  ``.weight``/``.bias`` [D], ``h.{i}.attn.c_attn.weight`` [D, 3D] (q | k | v, each the heads'
  [D, K] blocks side by side in head order) and ``.bias`` [3D], ``h.{i}.attn.c_proj.weight``
  [D, D] (the heads' ``wo`` [K, D] stacked in head order) and ``.bias`` [D],
  ``h.{i}.mlp.c_fc.weight`` [D, F] / ``.bias`` [F], ``h.{i}.mlp.c_proj.weight`` [F, D] /
  ``.bias`` [D], ``ln_f.weight``/``.bias`` [D], and ``lm_head.weight`` [V, D] only when the
  unembedding is untied;
* ``vocab.json``: token string -> id, every id (:func:`vocab_from_tokenizer`);
* ``jaxattn_layout.json``: ``{"heads": [{"block", "head", "layer", "n", "s"}, ...]}``, one entry
  per scored head (:func:`layout_heads`); ``block`` = P + ``layer`` with P preparation blocks.

What jaxattn has and GPT-2 lacks becomes zeros: no ``wpe`` (the seed model) is a zero
``wpe``; a missing attention bias is a zero bias; ``config.mlp`` False is a zero MLP.
GPT-2 always has LayerNorm and ``n_embd = n_head * head_dim``; a model without them is refused.
"""

# ruff: noqa: F722  (jaxtyping shape strings such as "R V" are not Python expressions)
from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import jax.numpy as jnp
import numpy as np
from safetensors.numpy import load as st_load
from safetensors.numpy import save as st_save

from jaxattn.corpus import Tokenizer
from jaxattn.errors import JaxattnError
from jaxattn.model import ModelConfig, Params, num_prep_blocks
from jaxattn.output.files import atomic_open, ensure_out_dir, jsonable, write_json
from jaxattn.version import VERSION

__all__ = [
    "DEFAULT_N_POSITIONS",
    "GPT2_FILES",
    "GPT2Checkpoint",
    "check_gpt2_config",
    "gpt2_config",
    "gpt2_state_dict",
    "hf_model_config",
    "layout_heads",
    "load_any_gpt2_checkpoint",
    "load_gpt2_checkpoint",
    "params_from_gpt2",
    "save_gpt2_checkpoint",
    "vocab_from_tokenizer",
]

#: ``n_positions`` of a model without learned positions (GPT-2's own context length).
DEFAULT_N_POSITIONS = 1024

#: The files of an exported checkpoint, in the order :func:`save_gpt2_checkpoint` returns them.
GPT2_FILES = ("config.json", "model.safetensors", "vocab.json", "jaxattn_layout.json")

_REQUIRED = ("embed", "wq", "wk", "wv", "wo", "ln1_scale", "ln1_bias", "ln2_scale", "ln2_bias", "lnf_scale", "lnf_bias")
_MLP = ("w1", "b1", "w2", "b2")
_OPTIONAL = ("wpe", "bq", "bk", "bv", "bo", "lm_head")
#: Every parameter key the plain forward reads (jaxattn.model.forward); anything else is refused.
_KNOWN = frozenset(_REQUIRED + _MLP + _OPTIONAL)
_LAYOUT_KEYS = ("block", "head", "layer", "n", "s")


class GPT2Checkpoint(NamedTuple):
    """A checkpoint read back by :func:`load_gpt2_checkpoint`.

    Attributes:
        params: the jaxattn parameter pytree (jax float32 arrays, the keys the exported model had).
        config: the model's :class:`~jaxattn.model.ModelConfig`.
        vocab: token string -> id.
        layout: the ``jaxattn_layout.json`` head entries.
        meta: the ``"jaxattn"`` block of ``config.json`` (version, option, preset, tokenizer, ...).
    """

    params: Params
    config: ModelConfig
    vocab: dict[str, int]
    layout: list[dict[str, int]]
    meta: dict[str, Any]


def check_gpt2_config(config: ModelConfig) -> None:
    """Refuses a model config that no GPT-2 checkpoint can hold (call it before any slow step).

    Args:
        config: the model config.

    Raises:
        JaxattnError: ``config.layernorm`` is False, or ``d_model != num_heads * d_head``.
    """
    if not config.layernorm:
        raise JaxattnError("cannot export a model without LayerNorm (layernorm=False) as GPT-2, which always has it")
    H, K, D = config.num_heads, config.d_head, config.d_model
    if H * K != D:
        raise JaxattnError(
            f"cannot export as GPT-2: it needs n_embd = n_head * head_dim, but d_model={D} and "
            f"num_heads * d_head = {H} * {K} = {H * K}"
        )


def _host(params: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """The parameter arrays as float32 numpy, after checking the keys and shapes."""
    unknown = sorted(set(params) - _KNOWN)
    if unknown:
        raise JaxattnError(f"params key {unknown[0]!r} has no GPT-2 tensor (known keys: {', '.join(sorted(_KNOWN))})")
    missing = [k for k in _REQUIRED if k not in params]
    if missing:
        raise JaxattnError(f"params lack {missing[0]!r}, which a GPT-2 checkpoint needs")
    return {k: np.asarray(v, dtype=np.float32) for k, v in params.items()}


def _sizes(p: Mapping[str, np.ndarray], config: ModelConfig) -> tuple[int, int, int, int, int]:
    """(blocks, H, D, K, V) of host params, checked against the config."""
    NB, H, D, K = p["wq"].shape
    V = p["embed"].shape[0]
    want = (config.num_heads, config.d_model, config.d_head, config.vocab_size)
    if (H, D, K, V) != want or p["embed"].shape != (V, D):
        raise JaxattnError(
            f"params (wq {list(p['wq'].shape)}, embed {list(p['embed'].shape)}) do not match the config "
            f"(num_heads={want[0]}, d_model={want[1]}, d_head={want[2]}, vocab_size={want[3]})"
        )
    return NB, H, D, K, V


def _positions(p: Mapping[str, np.ndarray], n_positions: int | None) -> int:
    """The checkpoint's ``n_positions``: the ``wpe`` rows, else ``n_positions`` or the default."""
    if "wpe" in p:
        rows = int(p["wpe"].shape[0])
        if n_positions is not None and int(n_positions) != rows:
            raise JaxattnError(f"n_positions={n_positions} differs from the model's learned wpe rows ({rows})")
        return rows
    n = DEFAULT_N_POSITIONS if n_positions is None else int(n_positions)
    if n < 1:
        raise JaxattnError(f"n_positions={n} must be >= 1")
    return n


def _mlp_width(p: Mapping[str, np.ndarray], D: int) -> int:
    return int(p["w1"].shape[-1]) if "w1" in p else 4 * D


def gpt2_state_dict(
    params: Mapping[str, Any], config: ModelConfig, *, n_positions: int | None = None
) -> dict[str, np.ndarray]:
    """The model's weights under HF GPT-2 tensor names, float32, Conv1D ``[in, out]`` layout.

    Args:
        params: the parameter pytree (jax or numpy arrays; see :func:`jaxattn.model.forward`).
        config: the model config.
        n_positions: rows of ``wpe.weight`` when the params have no ``wpe`` (default
            :data:`DEFAULT_N_POSITIONS`); must equal the ``wpe`` rows when they have one.

    Returns:
        name -> C-contiguous float32 array (names and shapes in the module docstring).

    Raises:
        JaxattnError: a config GPT-2 cannot hold (:func:`check_gpt2_config`), params that do not
            match the config, a missing required key or a key GPT-2 has no tensor for.
    """
    check_gpt2_config(config)
    p = _host(params)
    NB, H, D, K, V = _sizes(p, config)
    F = _mlp_width(p, D)
    zeros = np.zeros
    n_pos = _positions(p, n_positions)
    sd: dict[str, np.ndarray] = {"wte.weight": p["embed"], "wpe.weight": p.get("wpe", zeros((n_pos, D), np.float32))}
    for b in range(NB):
        pre = f"h.{b}."

        def heads_in(w: str, b: int = b) -> np.ndarray:  # [H, D, K] -> [D, H*K], head h in columns h*K:(h+1)*K
            return p[w][b].transpose(1, 0, 2).reshape(D, H * K)

        def bias(w: str, b: int = b) -> np.ndarray:
            return p[w][b].reshape(-1) if w in p else zeros(H * K, np.float32)

        sd[pre + "ln_1.weight"], sd[pre + "ln_1.bias"] = p["ln1_scale"][b], p["ln1_bias"][b]
        sd[pre + "attn.c_attn.weight"] = np.concatenate([heads_in("wq"), heads_in("wk"), heads_in("wv")], axis=1)
        sd[pre + "attn.c_attn.bias"] = np.concatenate([bias("bq"), bias("bk"), bias("bv")])
        sd[pre + "attn.c_proj.weight"] = p["wo"][b].reshape(H * K, D)
        sd[pre + "attn.c_proj.bias"] = p["bo"][b] if "bo" in p else zeros(D, np.float32)
        sd[pre + "ln_2.weight"], sd[pre + "ln_2.bias"] = p["ln2_scale"][b], p["ln2_bias"][b]
        mlp = config.mlp and "w1" in p
        sd[pre + "mlp.c_fc.weight"] = p["w1"][b] if mlp else zeros((D, F), np.float32)
        sd[pre + "mlp.c_fc.bias"] = p["b1"][b] if mlp else zeros(F, np.float32)
        sd[pre + "mlp.c_proj.weight"] = p["w2"][b] if mlp else zeros((F, D), np.float32)
        sd[pre + "mlp.c_proj.bias"] = p["b2"][b] if mlp else zeros(D, np.float32)
    sd["ln_f.weight"], sd["ln_f.bias"] = p["lnf_scale"], p["lnf_bias"]
    if "lm_head" in p:
        sd["lm_head.weight"] = p["lm_head"]
    return {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in sd.items()}


def params_from_gpt2(
    state: Mapping[str, np.ndarray], config: ModelConfig, keys: Sequence[str]
) -> dict[str, np.ndarray]:
    """Inverse of :func:`gpt2_state_dict`: the jaxattn pytree (numpy float32) from HF tensors.

    Args:
        state: name -> array, as :func:`gpt2_state_dict` writes it.
        config: the model config.
        keys: the parameter keys the exported model had (the others, zeros in the checkpoint,
            are left out). With ``config.mlp`` False the MLP arrays come back as zeros.

    Returns:
        key -> float32 numpy array, e.g. ``wq`` [blocks, H, D, K].

    Raises:
        JaxattnError: a tensor is missing or an unknown key is asked for.
    """
    unknown = sorted(set(keys) - _KNOWN)
    if unknown:
        raise JaxattnError(f"unknown parameter key {unknown[0]!r} (known keys: {', '.join(sorted(_KNOWN))})")
    H, D, K = config.num_heads, config.d_model, config.d_head

    def get(name: str) -> np.ndarray:
        if name not in state:
            raise JaxattnError(f"the checkpoint has no tensor {name!r}")
        return np.asarray(state[name], dtype=np.float32)

    NB = sum(1 for name in state if name.startswith("h.") and name.endswith(".attn.c_attn.weight"))
    blocks: dict[str, list[np.ndarray]] = {k: [] for k in keys if k not in ("embed", "wpe", "lnf_scale", "lnf_bias")}
    blocks.pop("lm_head", None)
    for b in range(NB):
        pre = f"h.{b}."
        qkv = get(pre + "attn.c_attn.weight").reshape(D, 3, H, K).transpose(1, 2, 0, 3)  # [3, H, D, K]
        qkv_b = get(pre + "attn.c_attn.bias").reshape(3, H, K)
        one = {
            "wq": qkv[0], "wk": qkv[1], "wv": qkv[2], "bq": qkv_b[0], "bk": qkv_b[1], "bv": qkv_b[2],
            "wo": get(pre + "attn.c_proj.weight").reshape(H, K, D), "bo": get(pre + "attn.c_proj.bias"),
            "ln1_scale": get(pre + "ln_1.weight"), "ln1_bias": get(pre + "ln_1.bias"),
            "ln2_scale": get(pre + "ln_2.weight"), "ln2_bias": get(pre + "ln_2.bias"),
            "w1": get(pre + "mlp.c_fc.weight"), "b1": get(pre + "mlp.c_fc.bias"),
            "w2": get(pre + "mlp.c_proj.weight"), "b2": get(pre + "mlp.c_proj.bias"),
        }  # fmt: skip
        for k, rows in blocks.items():
            rows.append(one[k])
    out = {k: np.stack(rows) for k, rows in blocks.items()}
    out["embed"] = get("wte.weight")
    out["lnf_scale"], out["lnf_bias"] = get("ln_f.weight"), get("ln_f.bias")
    for key, name in (("wpe", "wpe.weight"), ("lm_head", "lm_head.weight")):
        if key in keys:
            out[key] = get(name)
    return {k: np.ascontiguousarray(v) for k, v in out.items()}


def layout_heads(params: Mapping[str, Any], config: ModelConfig) -> list[dict[str, int]]:
    """The scored heads, for ``jaxattn_layout.json``: one entry per layout layer and head.

    Args:
        params: the parameter pytree (its block count fixes P, the preparation blocks).
        config: the model config (``layout`` gives each head's n and s).

    Returns:
        ``[{"block": P + l, "head": h, "layer": l, "n": n, "s": s}, ...]`` in layer, then head order.
    """
    P = num_prep_blocks(params, config)
    out = []
    for l in range(config.num_layers):
        for h in range(config.num_heads):
            n, s = config.layout(l, h)
            out.append({"block": P + l, "head": h, "layer": l, "n": n, "s": s})
    return out


def vocab_from_tokenizer(tokenizer: Tokenizer) -> dict[str, int]:
    """``vocab.json``: token string -> id for every id of a corpus tokenizer (``<unk>`` included).

    Args:
        tokenizer: the run's tokenizer (``tokenizer.vocab`` is id -> token string).

    Returns:
        token -> id, in id order.
    """
    return {tok: i for i, tok in enumerate(tokenizer.vocab)}


def gpt2_config(
    params: Mapping[str, Any],
    config: ModelConfig,
    *,
    n_positions: int | None = None,
    meta: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The ``config.json`` of the GPT-2 checkpoint.

    Args:
        params: the parameter pytree.
        config: the model config.
        n_positions: as for :func:`gpt2_state_dict`.
        meta: free-form provenance (option, preset, tokenizer, corpus, ...) for the ``"jaxattn"`` block.

    Returns:
        A JSON-able dict: GPT-2's fields, and ``"jaxattn"``: ``{"version", "format",
        "num_prep_blocks", "model_config", "params_keys", **meta}``.

    Raises:
        JaxattnError: as :func:`gpt2_state_dict`.
    """
    check_gpt2_config(config)
    p = {k: np.asarray(v) for k, v in params.items()}
    NB, H, D, _, V = _sizes(_host(p), config)
    n_pos = _positions(p, n_positions)
    block = {
        **dict(meta or {}),
        "version": VERSION,
        "format": "jaxattn.gpt2",
        "num_prep_blocks": num_prep_blocks(p, config),
        "model_config": config.to_dict(),
        "params_keys": sorted(p),
    }
    return {
        "model_type": "gpt2",
        "architectures": ["GPT2LMHeadModel"],
        "vocab_size": V,
        "n_layer": NB,
        "n_head": H,
        "n_embd": D,
        "n_positions": n_pos,
        "n_ctx": n_pos,
        "n_inner": _mlp_width(p, D),
        "activation_function": "gelu_new",
        "layer_norm_epsilon": 1e-5,
        "tie_word_embeddings": "lm_head" not in p,
        "resid_pdrop": 0.0,
        "embd_pdrop": 0.0,
        "attn_pdrop": 0.0,
        "scale_attn_weights": True,
        "scale_attn_by_inverse_layer_idx": False,
        "reorder_and_upcast_attn": False,
        "bos_token_id": None,
        "eos_token_id": None,
        "use_cache": True,
        "jaxattn": jsonable(block),
    }


def _check_vocab(vocab: Mapping[str, int], V: int) -> dict[str, int]:
    ids = sorted(int(i) for i in vocab.values())
    if ids != list(range(V)):
        raise JaxattnError(f"vocab has {len(vocab)} tokens with ids that are not exactly 0..{V - 1} (vocab_size={V})")
    return {str(t): int(i) for t, i in sorted(vocab.items(), key=lambda kv: int(kv[1]))}


def _check_layout(layout: Sequence[Mapping[str, Any]], blocks: int, heads: int) -> list[dict[str, int]]:
    out = []
    for e in layout:
        if set(e) != set(_LAYOUT_KEYS):
            raise JaxattnError(f"layout entry {dict(e)} must have exactly the keys {', '.join(_LAYOUT_KEYS)}")
        if not (0 <= int(e["block"]) < blocks and 0 <= int(e["head"]) < heads):
            raise JaxattnError(f"layout entry {dict(e)} is outside the model's {blocks} blocks x {heads} heads")
        out.append({k: int(e[k]) for k in _LAYOUT_KEYS})
    return out


def save_gpt2_checkpoint(
    out_dir: str | os.PathLike[str],
    params: Mapping[str, Any],
    config: ModelConfig,
    *,
    vocab: Mapping[str, int],
    layout: Sequence[Mapping[str, Any]],
    meta: Mapping[str, Any],
    n_positions: int | None = None,
) -> list[Path]:
    """Writes the four files of a HuggingFace GPT-2 checkpoint, each atomically.

    ``transformers.GPT2LMHeadModel.from_pretrained(out_dir)`` then loads the model with no
    missing or unexpected keys; ``config.json`` is written last.

    Args:
        out_dir: the directory (created if missing).
        params: the parameter pytree.
        config: the model config.
        vocab: token string -> id, ids exactly ``0..V-1`` (:func:`vocab_from_tokenizer`).
        layout: the scored heads (:func:`layout_heads`).
        meta: provenance for the ``"jaxattn"`` block of ``config.json``.
        n_positions: as for :func:`gpt2_state_dict`.

    Returns:
        The paths written, in :data:`GPT2_FILES` order.

    Raises:
        JaxattnError: as :func:`gpt2_state_dict`; a vocabulary or layout that does not fit the model.
    """
    state = gpt2_state_dict(params, config, n_positions=n_positions)
    cfg = gpt2_config(params, config, n_positions=n_positions, meta=meta)
    vocab_doc = _check_vocab(vocab, cfg["vocab_size"])
    heads = _check_layout(layout, cfg["n_layer"], cfg["n_head"])
    out = ensure_out_dir(out_dir)
    paths = [out / name for name in GPT2_FILES]
    blob = st_save(state, metadata={"format": "pt", "jaxattn_version": VERSION})
    with atomic_open(paths[1], "wb") as f:
        f.write(blob)
    with atomic_open(paths[2], "w") as f:  # ensure_ascii=False keeps each token readable
        json.dump(vocab_doc, f, indent=1, ensure_ascii=False)
        f.write("\n")
    write_json(paths[3], {"heads": heads})
    write_json(paths[0], cfg)
    return paths


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise JaxattnError(f"cannot read {path}: {e}") from None


def load_gpt2_checkpoint(directory: str | os.PathLike[str]) -> GPT2Checkpoint:
    """Reads a checkpoint written by :func:`save_gpt2_checkpoint` back into a jaxattn model.

    The round trip is exact for float32 params: every array comes back bit-identical (with
    ``config.mlp`` False the unused MLP arrays come back as zeros).

    Args:
        directory: the checkpoint directory.

    Returns:
        :class:`GPT2Checkpoint` (params as jax float32 arrays).

    Raises:
        JaxattnError: a missing or unreadable file, or a ``config.json`` without the ``"jaxattn"``
            block (a checkpoint jaxattn did not write).
    """
    d = Path(directory)
    for name in GPT2_FILES:
        if not (d / name).is_file():
            raise JaxattnError(f"{str(d)!r} is not a jaxattn GPT-2 export (missing {name})")
    cfg = _read_json(d / "config.json")
    block = cfg.get("jaxattn") if isinstance(cfg, dict) else None
    if not isinstance(block, dict) or block.get("format") != "jaxattn.gpt2":
        raise JaxattnError(f"{d / 'config.json'} has no jaxattn block: not a checkpoint jaxattn exported")
    try:
        state = st_load((d / "model.safetensors").read_bytes())
    except OSError as e:
        raise JaxattnError(f"cannot read {d / 'model.safetensors'}: {e.strerror or e}") from None
    except Exception as e:  # safetensors raises its own error types on a bad header
        raise JaxattnError(f"cannot parse {d / 'model.safetensors'}: {e}") from None
    config = ModelConfig(**block["model_config"])
    params = params_from_gpt2(state, config, list(block["params_keys"]))
    vocab = {str(t): int(i) for t, i in _read_json(d / "vocab.json").items()}
    layout = list(_read_json(d / "jaxattn_layout.json")["heads"])
    return GPT2Checkpoint({k: jnp.asarray(v) for k, v in params.items()}, config, vocab, layout, block)


def hf_model_config(cfg: Mapping[str, Any]) -> ModelConfig:
    """The :class:`~jaxattn.model.ModelConfig` of any HF GPT-2 ``config.json`` that jaxattn's forward runs exactly.

    Every block is a layout layer (``num_layers = n_layer``, no preparation blocks), with
    ``d_head = n_embd // n_head`` and the layout of ``max_n = max_s = 3`` (only recorded: scoring
    compares every head with every table).

    Args:
        cfg: the parsed ``config.json``.

    Returns:
        The model config (LayerNorm and MLP on).

    Raises:
        JaxattnError: another ``model_type``, a missing size, ``activation_function`` other than
            ``gelu_new``, ``layer_norm_epsilon`` other than 1e-5, ``n_embd`` not a multiple of
            ``n_head``, or an attention scaling jaxattn does not compute.
    """
    if cfg.get("model_type", "gpt2") != "gpt2":
        raise JaxattnError(f"model_type={cfg.get('model_type')!r} is not a GPT-2 checkpoint (model_type 'gpt2')")
    sizes = {}
    for key in ("vocab_size", "n_embd", "n_head", "n_layer"):
        if not isinstance(cfg.get(key), int) or cfg[key] < 1:
            raise JaxattnError(f"config.json has no valid {key} (got {cfg.get(key)!r})")
        sizes[key] = int(cfg[key])
    act = cfg.get("activation_function", "gelu_new")
    if act != "gelu_new":
        raise JaxattnError(f"activation_function={act!r} is not supported: jaxattn's forward computes 'gelu_new' only")
    eps = cfg.get("layer_norm_epsilon", 1e-5)
    if not isinstance(eps, (int, float)) or abs(float(eps) - 1e-5) > 1e-12:
        raise JaxattnError(f"layer_norm_epsilon={eps!r} is not supported: jaxattn's LayerNorm uses 1e-5")
    for key, want in (("scale_attn_weights", True), ("scale_attn_by_inverse_layer_idx", False)):
        if bool(cfg.get(key, want)) != want:
            raise JaxattnError(f"{key}={cfg.get(key)!r} is not supported (jaxattn scales attention by 1/sqrt(d_head))")
    D, H = sizes["n_embd"], sizes["n_head"]
    if D % H:
        raise JaxattnError(f"n_embd={D} is not a multiple of n_head={H}")
    return ModelConfig(
        vocab_size=sizes["vocab_size"], d_model=D, d_head=D // H, num_layers=sizes["n_layer"], num_heads=H,
        max_n=3, max_s=3,
    )  # fmt: skip


def _load_state(path: Path) -> dict[str, np.ndarray]:
    try:
        return dict(st_load(path.read_bytes()))
    except OSError as e:
        raise JaxattnError(f"cannot read {path}: {e.strerror or e}") from None
    except Exception as e:  # safetensors raises its own error types on a bad header or an unknown dtype
        raise JaxattnError(f"cannot parse {path}: {e}") from None


def _foreign_params(state: Mapping[str, np.ndarray], config: ModelConfig, tied: bool, where: Path) -> Params:
    """The jaxattn pytree of an HF GPT-2 state dict (``transformer.``-prefixed or not), shapes checked."""
    state = {k.removeprefix("transformer."): v for k, v in state.items()}
    D, V = config.d_model, config.vocab_size
    NB = sum(1 for name in state if name.startswith("h.") and name.endswith(".attn.c_attn.weight"))
    if NB != config.num_layers:
        raise JaxattnError(f"{where} has {NB} blocks but config.json says n_layer={config.num_layers}")
    want = {"wte.weight": (V, D), "ln_f.weight": (D,)}
    want.update({f"h.{b}.attn.c_attn.weight": (D, 3 * D) for b in range(NB)})
    want.update({f"h.{b}.attn.c_proj.weight": (D, D) for b in range(NB)})
    if not tied:
        want["lm_head.weight"] = (V, D)
    for name, shape in want.items():
        if name not in state:
            raise JaxattnError(f"{where} has no tensor {name!r}")
        if tuple(state[name].shape) != shape:
            raise JaxattnError(
                f"{where}: {name} has shape {list(state[name].shape)}, config.json implies {list(shape)}"
            )
    keys = [*_REQUIRED, *_MLP, "bq", "bk", "bv", "bo"] + (["wpe"] if "wpe.weight" in state else [])
    out = params_from_gpt2(state, config, keys + ([] if tied else ["lm_head"]))
    return {k: jnp.asarray(v) for k, v in out.items()}


def load_any_gpt2_checkpoint(directory: str | os.PathLike[str]) -> GPT2Checkpoint:
    """Reads any HF GPT-2 checkpoint: a jaxattn export, or one ``transformers`` (or anyone) saved.

    A ``config.json`` with the ``"jaxattn"`` block goes to :func:`load_gpt2_checkpoint`. Any other
    needs ``config.json`` (:func:`hf_model_config`) and ``model.safetensors`` (float32, float16 or
    float64 tensors under HF's names, with or without the ``transformer.`` prefix; ``lm_head.weight``
    when ``tie_word_embeddings`` is false); ``vocab.json`` is read when present.

    Args:
        directory: the checkpoint directory.

    Returns:
        :class:`GPT2Checkpoint`; for a foreign checkpoint ``vocab`` is ``{}`` without ``vocab.json``,
        ``layout`` is ``[]`` and ``meta`` is ``{"format": "hf", "num_prep_blocks": 0}``.

    Raises:
        JaxattnError: a missing or unreadable file, a config :func:`hf_model_config` refuses, or
            tensors that do not match the config.
    """
    d = Path(directory)
    for name in ("config.json", "model.safetensors"):
        if not (d / name).is_file():
            raise JaxattnError(f"{str(d)!r} is not a GPT-2 checkpoint (missing {name})")
    cfg = _read_json(d / "config.json")
    if not isinstance(cfg, dict):
        raise JaxattnError(f"{d / 'config.json'} is not a JSON object")
    if isinstance(cfg.get("jaxattn"), dict):
        return load_gpt2_checkpoint(d)
    config = hf_model_config(cfg)
    tied = bool(cfg.get("tie_word_embeddings", True))
    params = _foreign_params(_load_state(d / "model.safetensors"), config, tied, d / "model.safetensors")
    vocab: dict[str, int] = {}
    if (d / "vocab.json").is_file():
        raw = _read_json(d / "vocab.json")
        if not isinstance(raw, dict) or not all(isinstance(i, int) for i in raw.values()):
            raise JaxattnError(f"{d / 'vocab.json'} is not a token -> id object")
        vocab = {str(t): int(i) for t, i in raw.items()}
    return GPT2Checkpoint(params, config, vocab, [], {"format": "hf", "num_prep_blocks": 0})
