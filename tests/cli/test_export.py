"""``jaxattn export`` end to end, in-process, on a small slice of the real text."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import safetensors

from jaxattn import cli, options
from jaxattn.cli import export
from jaxattn.model import forward_batch
from jaxattn.output import hf
from jaxattn.pipeline import AnalysisResult

LAYERS, HEADS, D_MODEL, D_HEAD = 2, 4, 32, 8
FAST = [
    "--preset", "small", "--d-model", str(D_MODEL), "--d-head", str(D_HEAD), "--layers", str(LAYERS),
    "--heads", str(HEADS), "--seq-len", "16", "--num-seqs", "3", "--batch-size", "4", "--no-progress",
]  # fmt: skip


@pytest.fixture(scope="module")
def slice_dir(tmp_path_factory: pytest.TempPathFactory, shakespeare_text: str) -> Path:
    """Two documents cut from King Lear (read in place; written only under the test's tmp dir)."""
    d = tmp_path_factory.mktemp("slice")
    (d / "train.txt").write_text(shakespeare_text[20000:50000], encoding="utf-8")
    (d / "zeval.txt").write_text(shakespeare_text[100000:106000], encoding="utf-8")
    return d


def run_main(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = cli.main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def test_export_writes_a_checkpoint_jaxattn_reads_back(slice_dir, tmp_path, capsys):
    out = tmp_path / "gpt2"
    code, stdout, err = run_main(["export", "--corpus", str(slice_dir), *FAST, "--out", str(out)], capsys)
    assert code == 0, err
    assert sorted(p.name for p in out.iterdir()) == sorted(hf.GPT2_FILES)
    assert "baseline: per-layer means over heads" in stdout and "wrote: " in stdout
    assert all(str(out / name) in stdout for name in hf.GPT2_FILES)

    cfg = json.loads((out / "config.json").read_text())
    vocab = json.loads((out / "vocab.json").read_text(encoding="utf-8"))
    V = cfg["vocab_size"]
    assert cfg["model_type"] == "gpt2" and (cfg["n_layer"], cfg["n_head"], cfg["n_embd"]) == (LAYERS, HEADS, D_MODEL)
    assert cfg["tie_word_embeddings"] is True and cfg["n_positions"] == hf.DEFAULT_N_POSITIONS
    block = cfg["jaxattn"]
    assert block["option"] == "baseline" and block["preset"] == "small" and block["tokenizer"]["kind"] == "char"
    assert [r["layer"] for r in block["layer_summary"]] == list(range(LAYERS))
    assert all(0.0 < r["cosine"] <= 1.0 for r in block["layer_summary"])
    # vocab.json: every character of the text, token -> id.
    assert sorted(vocab.values()) == list(range(V)) and vocab["\n"] == 0 and vocab[" "] == 1 and "e" in vocab
    layout = json.loads((out / "jaxattn_layout.json").read_text())["heads"]
    assert len(layout) == LAYERS * HEADS and all(set(e) == {"block", "head", "layer", "n", "s"} for e in layout)
    assert [(e["block"], e["n"], e["s"]) for e in layout[:HEADS]] == [(0, 1, h) for h in range(HEADS)]
    with safetensors.safe_open(str(out / "model.safetensors"), "np") as f:
        assert f.get_tensor("h.1.attn.c_attn.weight").shape == (D_MODEL, 3 * D_MODEL)
        assert "lm_head.weight" not in f.keys()

    back = hf.load_gpt2_checkpoint(out)
    assert back.vocab == vocab and back.meta["option"] == "baseline"
    tokens = np.arange(12, dtype=np.int32).reshape(1, 12) % V
    attn = np.asarray(forward_batch(back.params, tokens, back.config).attn)
    assert attn.shape == (1, LAYERS, HEADS, 12, 12) and np.allclose(attn.sum(-1), 1.0, atol=1e-5)


def test_export_option3_small_is_a_gpt2_that_transformers_runs(slice_dir, tmp_path, capsys):
    """``export --option 3 --preset small``: the standard GPT-2 Option 3, loaded by HF, gives jaxattn's logits."""
    out = tmp_path / "o3"
    argv = ["export", "--option", "3", "--preset", "small", "--corpus", str(slice_dir), "--seq-len", "32"]
    code, stdout, err = run_main(
        [*argv, "--num-seqs", "4", "--batch-size", "4", "--no-progress", "--out", str(out)], capsys
    )
    assert code == 0, err
    assert "option3: per-layer means over heads" in stdout and "wrote: " in stdout
    back = hf.load_gpt2_checkpoint(out)
    L, H = back.config.num_layers, back.config.num_heads
    P = back.meta["num_prep_blocks"]
    assert (L, H, back.config.d_model) == (4, 12, 384) and P >= 1
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["n_layer"] == P + L and cfg["tie_word_embeddings"] is False and cfg["n_positions"] == 1024
    assert {"wpe", "bq", "bk", "bv", "bo", "lm_head"} <= set(back.params)
    layout = json.loads((out / "jaxattn_layout.json").read_text())["heads"]
    assert len(layout) == L * H
    assert [(e["block"], e["layer"], e["head"]) for e in layout] == [(P + l, l, h) for l in range(L) for h in range(H)]
    assert all((e["n"], e["s"]) == back.config.layout(e["layer"], e["head"]) for e in layout)
    assert [r["layer"] for r in back.meta["layer_summary"]] == list(range(L))
    assert all(r["cosine"] >= 0.99 for r in back.meta["layer_summary"])
    lm = back.meta["language_model"]
    assert abs(lm["derived_bits_per_token"] - lm["ngram_bits_per_token"]) <= 0.005 * lm["ngram_bits_per_token"]
    assert "next-token bits per token" in stdout
    assert back.meta["prep_blocks"] == P and back.meta["architecture"] == "gpt2"
    assert back.meta["residual_dims"]["d_model"] == 384 and back.meta["construction"]["norm_pad"] is True

    transformers = pytest.importorskip("transformers")
    torch = pytest.importorskip("torch")
    text = (slice_dir / "zeval.txt").read_text(encoding="utf-8")
    vocab = back.vocab
    tokens = np.array([[vocab[c] for c in text[i : i + 40]] for i in (100, 2000, 4000)], np.int32)
    model = transformers.GPT2LMHeadModel.from_pretrained(str(out), attn_implementation="eager").eval()
    with torch.no_grad():
        theirs = model(torch.as_tensor(tokens, dtype=torch.long)).logits.numpy()
    ours = np.asarray(forward_batch(back.params, tokens, back.config).logits)
    assert theirs.shape == ours.shape == (3, 40, back.config.vocab_size)
    assert np.abs(theirs - ours).max() <= 1e-5 and np.abs(ours).max() > 1.0


def test_option2_is_refused_with_one_line_before_any_work(tmp_path, capsys):
    out = tmp_path / "never"
    code, stdout, err = run_main(
        ["export", "--option", "2", "--corpus", str(tmp_path / "nowhere"), "--out", str(out)], capsys
    )
    assert code == 2 and not stdout and not out.exists()
    assert err.splitlines() == [
        "jaxattn: error: option 2 cannot be exported as GPT-2: it needs a hook (attention logits gathered from the "
        "count tables), which a GPT-2 does not compute; exportable options: baseline, 1, 3, 4"
    ]
    assert export.exportable_options() == ["baseline", "1", "3", "4"]
    assert [n for n, s in options.REGISTRY.items() if not s.exportable] == ["2"]


def test_a_shape_gpt2_cannot_hold_is_refused_before_loading(tmp_path, capsys):
    where = ["--corpus", str(tmp_path / "nowhere"), "--out", str(tmp_path)]
    argv = ["export", "--preset", "small", "--d-model", "120", *where]
    code, _, err = run_main(argv, capsys)
    assert code == 2
    assert err.splitlines() == [
        "jaxattn: error: cannot export as GPT-2: it needs n_embd = n_head * head_dim, but d_model=120 and "
        "num_heads * d_head = 12 * 32 = 384"
    ]


@pytest.mark.parametrize("kind", ["hooked", "no_params"])
def test_a_result_the_plain_forward_does_not_reproduce_is_refused(slice_dir, tmp_path, capsys, monkeypatch, kind):
    """An option that ran its model through a hook (or has no params) exits 2 and writes nothing."""
    real = options.run_option

    def fake(prep, option, **kw):
        res = real(prep, "baseline", **kw)
        if kind == "no_params":
            return AnalysisResult("option3", res.records, res.attn, None)
        return AnalysisResult("option3", res.records, np.full_like(res.attn, 1.0 / res.attn.shape[-1]), res.params)

    monkeypatch.setattr(options, "run_option", fake)
    out = tmp_path / "gpt2"
    code, _, err = run_main(["export", "--option", "3", "--corpus", str(slice_dir), *FAST, "--out", str(out)], capsys)
    assert code == 2 and len(err.splitlines()) == 1
    if kind == "hooked":
        assert "option 3 cannot be exported as GPT-2: its attention needs a hook (the plain forward pass" in err
    else:
        assert "option 3 cannot be exported: it has no parameter pytree" in err
    assert not any(out.iterdir())
