"""The HuggingFace GPT-2 export (jaxattn.output.hf), without torch.

The mapping is checked three ways: tensor names and shapes, where each jaxattn weight lands in
HF's fused Conv1D tensors, and a slow obvious numpy GPT-2 forward written from the exported
state dict alone, which must give jaxattn's attention and logits.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np
import pytest
import safetensors

from jaxattn.corpus import Document, build_tokenizer
from jaxattn.errors import JaxattnError
from jaxattn.model import ModelConfig, forward
from jaxattn.output import hf

V, D, H, K, F, L, P, NCTX = 11, 16, 4, 4, 24, 2, 1, 20


def gpt2_params(rng: np.random.Generator, config: ModelConfig, *, prep: int = P, full: bool = True) -> dict[str, Any]:
    """A random GPT-2-shaped jaxattn params pytree with ``prep`` preparation blocks.

    ``full``: also learned positions, every attention bias and an untied ``lm_head`` (else the
    seed model's keys only). Scales keep float32 forward errors well below 1e-5.
    """
    NB, H, D, K, V = prep + config.num_layers, config.num_heads, config.d_model, config.d_head, config.vocab_size
    F = 3 * D // 2

    def r(*shape: int, scale: float = 0.3) -> jnp.ndarray:
        return jnp.asarray(rng.normal(size=shape) * scale, jnp.float32)

    p = {
        "embed": r(V, D, scale=1.0),
        **{w: r(NB, H, D, K) for w in ("wq", "wk", "wv")},
        "wo": r(NB, H, K, D),
        "ln1_scale": 1 + r(NB, D, scale=0.1),
        "ln1_bias": r(NB, D, scale=0.1),
        "ln2_scale": 1 + r(NB, D, scale=0.1),
        "ln2_bias": r(NB, D, scale=0.1),
        "w1": r(NB, D, F),
        "b1": r(NB, F, scale=0.1),
        "w2": r(NB, F, D),
        "b2": r(NB, D, scale=0.1),
        "lnf_scale": 1 + r(D, scale=0.1),
        "lnf_bias": r(D, scale=0.1),
    }
    if full:
        p |= {"wpe": r(NCTX, D), **{b: r(NB, H, K) for b in ("bq", "bk", "bv")}, "bo": r(NB, D), "lm_head": r(V, D)}
    return p


@pytest.fixture(scope="module")
def config() -> ModelConfig:
    return ModelConfig(vocab_size=V, d_model=D, d_head=K, num_layers=L, num_heads=H, max_n=2, max_s=3)


@pytest.fixture(scope="module")
def params(config: ModelConfig) -> dict[str, Any]:
    return gpt2_params(np.random.default_rng(0), config)


def block_names(i: int) -> set[str]:
    parts = ["ln_1", "attn.c_attn", "attn.c_proj", "ln_2", "mlp.c_fc", "mlp.c_proj"]
    return {f"h.{i}.{p}.{w}" for p in parts for w in ("weight", "bias")}


# --------------------------------------------------------------------------- #
# names, shapes and placement
# --------------------------------------------------------------------------- #


def test_names_and_shapes(params, config):
    sd = hf.gpt2_state_dict(params, config)
    NB = P + L
    want = {"wte.weight", "wpe.weight", "ln_f.weight", "ln_f.bias", "lm_head.weight"}
    for i in range(NB):
        want |= block_names(i)
    assert set(sd) == want
    shapes = {
        "wte.weight": (V, D), "wpe.weight": (NCTX, D), "lm_head.weight": (V, D), "ln_f.weight": (D,),
        "h.0.attn.c_attn.weight": (D, 3 * D), "h.0.attn.c_attn.bias": (3 * D,),
        "h.2.attn.c_proj.weight": (D, D), "h.2.attn.c_proj.bias": (D,),
        "h.1.mlp.c_fc.weight": (D, F), "h.1.mlp.c_fc.bias": (F,), "h.1.mlp.c_proj.weight": (F, D),
        "h.1.ln_2.bias": (D,),
    }  # fmt: skip
    for name, shape in shapes.items():
        assert sd[name].shape == shape, name
    assert all(a.dtype == np.float32 and a.flags.c_contiguous for a in sd.values())


def test_each_weight_lands_where_hf_reads_it(params, config):
    sd = hf.gpt2_state_dict(params, config)
    p = {k: np.asarray(v) for k, v in params.items()}
    for b in range(P + L):
        c_attn, c_bias = sd[f"h.{b}.attn.c_attn.weight"], sd[f"h.{b}.attn.c_attn.bias"]
        for part, (w, bias) in enumerate((("wq", "bq"), ("wk", "bk"), ("wv", "bv"))):
            for h in range(H):
                cols = slice(part * D + h * K, part * D + (h + 1) * K)
                np.testing.assert_array_equal(c_attn[:, cols], p[w][b, h])
                np.testing.assert_array_equal(c_bias[cols], p[bias][b, h])
        for h in range(H):
            np.testing.assert_array_equal(sd[f"h.{b}.attn.c_proj.weight"][h * K : (h + 1) * K], p["wo"][b, h])
        np.testing.assert_array_equal(sd[f"h.{b}.attn.c_proj.bias"], p["bo"][b])
        np.testing.assert_array_equal(sd[f"h.{b}.mlp.c_fc.weight"], p["w1"][b])
        np.testing.assert_array_equal(sd[f"h.{b}.mlp.c_proj.weight"], p["w2"][b])
        np.testing.assert_array_equal(sd[f"h.{b}.ln_1.weight"], p["ln1_scale"][b])
        np.testing.assert_array_equal(sd[f"h.{b}.ln_2.bias"], p["ln2_bias"][b])
    np.testing.assert_array_equal(sd["wte.weight"], p["embed"])
    np.testing.assert_array_equal(sd["wpe.weight"], p["wpe"])
    np.testing.assert_array_equal(sd["lm_head.weight"], p["lm_head"])


def test_seed_shaped_model_gets_zeros_for_what_gpt2_has_and_it_lacks(config):
    p = gpt2_params(np.random.default_rng(1), config, prep=0, full=False)
    sd = hf.gpt2_state_dict(p, config)
    assert "lm_head.weight" not in sd  # tied: HF reuses wte
    assert sd["wpe.weight"].shape == (hf.DEFAULT_N_POSITIONS, D) and not sd["wpe.weight"].any()
    assert hf.gpt2_state_dict(p, config, n_positions=64)["wpe.weight"].shape == (64, D)
    assert set(sd) == {"wte.weight", "wpe.weight", "ln_f.weight", "ln_f.bias"} | block_names(0) | block_names(1)
    for b in range(L):
        assert not sd[f"h.{b}.attn.c_attn.bias"].any() and not sd[f"h.{b}.attn.c_proj.bias"].any()
    cfg = hf.gpt2_config(p, config)
    assert cfg["tie_word_embeddings"] is True and cfg["n_layer"] == L and cfg["n_positions"] == hf.DEFAULT_N_POSITIONS
    assert cfg["jaxattn"]["num_prep_blocks"] == 0


def test_no_mlp_is_a_zero_mlp(params, config):
    cfg = dataclasses.replace(config, mlp=False)
    sd = hf.gpt2_state_dict(params, cfg)
    for b in range(P + L):
        for w in ("c_fc.weight", "c_fc.bias", "c_proj.weight", "c_proj.bias"):
            assert not sd[f"h.{b}.mlp.{w}"].any()
    assert sd["h.0.mlp.c_fc.weight"].shape == (D, F)


def test_config_json(params, config):
    cfg = hf.gpt2_config(params, config, meta={"option": "3", "preset": "small"})
    want = {
        "model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "vocab_size": V, "n_layer": P + L,
        "n_head": H, "n_embd": D, "n_positions": NCTX, "n_ctx": NCTX, "n_inner": F,
        "activation_function": "gelu_new", "layer_norm_epsilon": 1e-5, "tie_word_embeddings": False,
        "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0, "scale_attn_weights": True,
        "scale_attn_by_inverse_layer_idx": False, "reorder_and_upcast_attn": False,
    }  # fmt: skip
    assert {k: cfg[k] for k in want} == want
    block = cfg["jaxattn"]
    assert block["option"] == "3" and block["preset"] == "small" and block["num_prep_blocks"] == P
    assert block["model_config"] == config.to_dict() and block["params_keys"] == sorted(params)
    json.dumps(cfg, allow_nan=False)


@pytest.mark.parametrize("prep", [0, P, 3])
def test_layout_heads(config, prep):
    params = gpt2_params(np.random.default_rng(4), config, prep=prep)
    heads = hf.layout_heads(params, config)
    assert len(heads) == L * H
    for e in heads:
        assert e["block"] == prep + e["layer"]
        assert (e["n"], e["s"]) == config.layout(e["layer"], e["head"])
    assert [(e["layer"], e["head"]) for e in heads] == [(l, h) for l in range(L) for h in range(H)]


def test_vocab_from_char_and_word_tokenizers():
    docs = [Document("a.txt", "To be, or not to be: that is the question.\nWhether 'tis nobler")]
    char = build_tokenizer(docs, "char")
    v = hf.vocab_from_tokenizer(char)
    assert len(v) == char.vocab_size and v["\n"] == char.vocab.index("\n") and sorted(v.values()) == list(range(len(v)))
    word = build_tokenizer(docs, "word")
    w = hf.vocab_from_tokenizer(word)
    assert w["<unk>"] == word.unk_id == word.vocab_size - 1 and w["be"] == word.vocab.index("be")
    assert [t for t, _ in sorted(w.items(), key=lambda kv: kv[1])] == list(word.vocab)


# --------------------------------------------------------------------------- #
# a slow obvious GPT-2 forward, from the exported tensors alone
# --------------------------------------------------------------------------- #


def numpy_gpt2(sd: dict[str, np.ndarray], cfg: dict[str, Any], tokens: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """HF GPT-2 (eager attention, eval mode), written out in float64 from a state dict and config.json.

    Returns:
        attn [n_layer, H, T, T] and logits [T, V].
    """
    sd = {k: v.astype(np.float64) for k, v in sd.items()}
    H, T = cfg["n_head"], len(tokens)
    eps = cfg["layer_norm_epsilon"]

    def ln(x: np.ndarray, name: str) -> np.ndarray:
        mu = x.mean(-1, keepdims=True)
        var = ((x - mu) ** 2).mean(-1, keepdims=True)
        return (x - mu) / np.sqrt(var + eps) * sd[name + ".weight"] + sd[name + ".bias"]

    def gelu_new(x: np.ndarray) -> np.ndarray:
        return 0.5 * x * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (x + 0.044715 * x**3)))

    x = sd["wte.weight"][tokens] + sd["wpe.weight"][:T]
    attns = []
    for i in range(cfg["n_layer"]):
        pre = f"h.{i}."
        h = ln(x, pre + "ln_1")
        qkv = h @ sd[pre + "attn.c_attn.weight"] + sd[pre + "attn.c_attn.bias"]
        q, k, v = (m.reshape(T, H, -1).transpose(1, 0, 2) for m in np.split(qkv, 3, axis=-1))  # [H, T, K] each
        probs = np.zeros((H, T, T))
        for hd in range(H):
            for t in range(T):  # query t attends to keys 0..t
                s = np.array([q[hd, t] @ k[hd, j] for j in range(t + 1)]) / np.sqrt(q.shape[-1])
                e = np.exp(s - s.max())
                probs[hd, t, : t + 1] = e / e.sum()
        merged = np.einsum("hts,hsk->thk", probs, v).reshape(T, -1)
        x = x + merged @ sd[pre + "attn.c_proj.weight"] + sd[pre + "attn.c_proj.bias"]
        f = gelu_new(ln(x, pre + "ln_2") @ sd[pre + "mlp.c_fc.weight"] + sd[pre + "mlp.c_fc.bias"])
        x = x + f @ sd[pre + "mlp.c_proj.weight"] + sd[pre + "mlp.c_proj.bias"]
        attns.append(probs)
    head = sd["lm_head.weight"] if "lm_head.weight" in sd else sd["wte.weight"]
    return np.stack(attns), ln(x, "ln_f") @ head.T


@pytest.mark.parametrize("variant", ["gpt2_features", "seed_shaped", "no_mlp", "three_prep"])
def test_numpy_gpt2_from_the_export_equals_jaxattn_forward(variant, config):
    rng = np.random.default_rng(2)
    cfg = dataclasses.replace(config, mlp=False) if variant == "no_mlp" else config
    prep = {"seed_shaped": 0, "three_prep": 3}.get(variant, P)
    p = gpt2_params(rng, cfg, prep=prep, full=variant != "seed_shaped")
    tokens = rng.integers(0, V, size=13)
    sd, cj = hf.gpt2_state_dict(p, cfg), hf.gpt2_config(p, cfg)
    assert cj["n_layer"] == prep + L and cj["jaxattn"]["num_prep_blocks"] == prep
    ref_attn, ref_logits = numpy_gpt2(sd, cj, tokens)
    out = forward(p, jnp.asarray(tokens, jnp.int32), cfg)
    got_attn = np.concatenate([np.asarray(out.prep_attn), np.asarray(out.attn)])
    assert got_attn.shape == ref_attn.shape == (prep + L, H, 13, 13)
    assert np.abs(got_attn - ref_attn).max() <= 1e-5
    assert np.abs(np.asarray(out.logits) - ref_logits).max() <= 1e-5
    assert np.abs(ref_logits).max() > 0.5  # a real check, not two near-zero arrays
    assert np.abs(ref_attn - np.tril(np.ones((13, 13))) / np.arange(1, 14)[:, None]).max() > 0.05  # not uniform


# --------------------------------------------------------------------------- #
# files and round trip
# --------------------------------------------------------------------------- #


def save(tmp_path: Path, params: dict[str, Any], config: ModelConfig, **kw: Any) -> list[Path]:
    kwargs: dict[str, Any] = {
        "vocab": {chr(ord("a") + i): i for i in range(V)},
        "layout": hf.layout_heads(params, config),
        "meta": {"option": "test"},
    }
    return hf.save_gpt2_checkpoint(tmp_path, params, config, **(kwargs | kw))


@pytest.mark.parametrize(("full", "prep"), [(True, P), (False, 0), (True, 3)])
def test_round_trip_is_bit_identical(tmp_path, config, full, prep):
    p = gpt2_params(np.random.default_rng(3), config, prep=prep, full=full)
    files = save(tmp_path, p, config)
    assert [f.name for f in files] == list(hf.GPT2_FILES) and all(f.is_file() for f in files)
    back = hf.load_gpt2_checkpoint(tmp_path)
    assert back.config == config and set(back.params) == set(p)
    for k in p:
        a, b = np.asarray(p[k]), np.asarray(back.params[k])
        assert a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes(), k
    assert back.vocab == {chr(ord("a") + i): i for i in range(V)}
    assert back.layout == hf.layout_heads(p, config) and back.meta["option"] == "test"
    assert back.meta["num_prep_blocks"] == prep and back.params["wq"].shape[0] == prep + L
    with safetensors.safe_open(str(tmp_path / "model.safetensors"), "np") as f:
        assert f.metadata()["format"] == "pt"  # transformers checks this field
        assert set(f.keys()) == set(hf.gpt2_state_dict(p, config))
    doc = json.loads((tmp_path / "jaxattn_layout.json").read_text())
    assert doc == {"heads": hf.layout_heads(p, config)}
    assert not list(tmp_path.glob(".*.tmp"))  # atomic writes leave no temporary files


# --------------------------------------------------------------------------- #
# refusals
# --------------------------------------------------------------------------- #


def test_refuses_what_gpt2_cannot_hold(params, config):
    with pytest.raises(JaxattnError, match="without LayerNorm"):
        hf.gpt2_state_dict(params, dataclasses.replace(config, layernorm=False))
    odd = ModelConfig(vocab_size=V, d_model=18, d_head=4, num_layers=L, num_heads=4)
    with pytest.raises(JaxattnError, match=r"d_model=18 and num_heads \* d_head = 4 \* 4 = 16"):
        hf.check_gpt2_config(odd)
    with pytest.raises(JaxattnError, match="'extra' has no GPT-2 tensor"):
        hf.gpt2_state_dict({**params, "extra": params["b2"]}, config)
    with pytest.raises(JaxattnError, match="lack 'lnf_bias'"):
        hf.gpt2_state_dict({k: v for k, v in params.items() if k != "lnf_bias"}, config)
    with pytest.raises(JaxattnError, match="do not match the config"):
        hf.gpt2_state_dict(params, dataclasses.replace(config, vocab_size=V + 1))
    with pytest.raises(JaxattnError, match=f"n_positions=7 differs from the model's learned wpe rows \\({NCTX}\\)"):
        hf.gpt2_state_dict(params, config, n_positions=7)


def test_refuses_bad_vocab_layout_and_directories(tmp_path, params, config):
    with pytest.raises(JaxattnError, match=f"not exactly 0..{V - 1}"):
        save(tmp_path, params, config, vocab={"a": 0, "b": 2})
    with pytest.raises(JaxattnError, match="outside the model's 3 blocks x 4 heads"):
        save(tmp_path, params, config, layout=[{"block": 3, "head": 0, "layer": 2, "n": 2, "s": 0}])
    with pytest.raises(JaxattnError, match="exactly the keys"):
        save(tmp_path, params, config, layout=[{"block": 1, "head": 0}])
    assert not list(tmp_path.iterdir())  # nothing written before the checks pass
    with pytest.raises(JaxattnError, match="missing config.json"):
        hf.load_gpt2_checkpoint(tmp_path)
    save(tmp_path, params, config)
    cfg = json.loads((tmp_path / "config.json").read_text())
    del cfg["jaxattn"]
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(JaxattnError, match="no jaxattn block"):
        hf.load_gpt2_checkpoint(tmp_path)
