"""``jaxattn score`` end to end, in-process: on a ``jaxattn export --option 3`` checkpoint, on
checkpoints whose vocabulary cannot be mapped, and on checkpoints HF ``transformers`` saved itself."""

from __future__ import annotations

import contextlib
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from jaxattn import cli
from jaxattn.cli.score import checkpoint_ids
from jaxattn.errors import JaxattnError
from jaxattn.model import forward_batch
from jaxattn.output import hf

EVAL = ["--seq-len", "32", "--num-seqs", "4", "--batch-size", "4", "--no-progress"]


def run_main(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = cli.main(argv)
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def slice_dir(tmp_path_factory: pytest.TempPathFactory, shakespeare_text: str) -> Path:
    """Two documents cut from King Lear (read in place; written only under the test's tmp dir)."""
    d = tmp_path_factory.mktemp("slice")
    (d / "train.txt").write_text(shakespeare_text[20000:50000], encoding="utf-8")
    (d / "zeval.txt").write_text(shakespeare_text[100000:106000], encoding="utf-8")
    return d


@pytest.fixture(scope="module")
def export_dir(slice_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("o3")
    argv = ["export", "--option", "3", "--preset", "small", "--corpus", str(slice_dir), *EVAL, "--out", str(out)]
    assert cli.main(argv) == 0
    return out


@pytest.fixture(scope="module")
def scored(export_dir: Path, slice_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """``jaxattn score`` on the export, into a directory that already holds a report.html."""
    out = tmp_path_factory.mktemp("score")
    (out / "report.html").write_text("<p>another issue's report</p>", encoding="utf-8")
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        code = cli.main(["score", "--model", str(export_dir), "--corpus", str(slice_dir), *EVAL, "--out", str(out)])
    return out, code, buf.getvalue()


def test_score_on_an_option3_export_finds_every_layout_head(scored, export_dir):
    out, code, stdout = scored
    assert code == 0
    doc = json.loads((out / "scores.json").read_text())
    cfg = json.loads((export_dir / "config.json").read_text())
    layout = json.loads((export_dir / "jaxattn_layout.json").read_text())["heads"]
    NB, H = cfg["n_layer"], cfg["n_head"]
    assert [(e["block"], e["head"]) for e in doc["heads"]] == [(b, h) for b in range(NB) for h in range(H)]
    assert (
        doc["pairs"] == [[n, s] for n in (1, 2, 3) for s in range(4)]
        and doc["num_prep_blocks"] == cfg["jaxattn"]["num_prep_blocks"]
    )
    assert np.shape(doc["matrix"]["cosine"]) == (NB, H, 12)
    by_head = {(e["block"], e["head"]): e for e in doc["heads"]}
    for e in layout:
        entry = by_head[(e["block"], e["head"])]
        assert (entry["best"]["n"], entry["best"]["s"]) == (e["n"], e["s"]), e
        assert entry["layout"]["rank"] == 1 and entry["best"]["cosine"] >= 0.99
        assert entry["best"]["cosine"] == entry["layout"]["cosine"]
    assert doc["layout_match"] == {"heads": len(layout), "own_best": len(layout)}
    prep_blocks = {b for b in range(NB)} - {e["block"] for e in layout}
    assert prep_blocks and all(by_head[(b, h)]["best"]["cosine"] < 0.9 for b in prep_blocks for h in range(H))
    assert doc["vocab_mapping"]["identity"] is True and doc["model"]["blocks"] == NB
    # The figure, the printed table, and the other issue's report.html left untouched.
    assert (out / "head_scores.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "report.html").read_text(encoding="utf-8") == "<p>another issue's report</p>"
    assert f"layout heads whose own (n, s) scored best: {len(layout)} of {len(layout)}" in stdout
    rows = [ln.split() for ln in stdout.splitlines() if ln[:5].strip().isdigit()]
    assert len(rows) == NB * H and rows[-1][:3] == [str(NB - 1), str(H - 1), "(2,3)"]


def test_an_unmappable_vocabulary_exits_2_with_one_line(export_dir, slice_dir, tmp_path, capsys):
    bad = tmp_path / "bad"
    shutil.copytree(export_dir, bad)
    vocab = json.loads((bad / "vocab.json").read_text(encoding="utf-8"))
    vocab["<e>"], vocab["<q>"] = vocab.pop("e"), vocab.pop("q")
    (bad / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    out = tmp_path / "never"
    argv = ["score", "--model", str(bad), "--corpus", str(slice_dir), *EVAL, "--out", str(out)]
    code, stdout, err = run_main(argv, capsys)
    assert code == 2 and not stdout and not out.exists()
    V = len(vocab)
    assert err.splitlines() == [
        "jaxattn: error: the checkpoint's vocabulary cannot be mapped onto the corpus tokenizer: 2 of the corpus's "
        f"{V} tokens are not in its vocab.json, e.g. 'e', 'q'"
    ]
    (bad / "vocab.json").unlink()
    (bad / "config.json").write_text(
        json.dumps({k: v for k, v in json.loads((bad / "config.json").read_text()).items() if k != "jaxattn"})
    )
    code, _, err = run_main(argv, capsys)
    assert code == 2 and len(err.splitlines()) == 1 and "the checkpoint has no vocab.json" in err


def test_checkpoint_ids_maps_and_refuses():
    corpus_vocab = ["a", "b", "c"]
    assert checkpoint_ids(corpus_vocab, {"x": 0, "c": 1, "a": 2, "b": 3}, 4).tolist() == [2, 3, 1]
    assert checkpoint_ids(corpus_vocab, {}, 3, size_match=True).tolist() == [0, 1, 2]
    with pytest.raises(JaxattnError, match="its vocab_size=4 differs from the corpus's V=3"):
        checkpoint_ids(corpus_vocab, {}, 4, size_match=True)
    with pytest.raises(JaxattnError, match="outside vocab_size=3: 'c'"):
        checkpoint_ids(corpus_vocab, {"a": 0, "b": 1, "c": 3}, 3)
    with pytest.raises(JaxattnError, match="same id"):
        checkpoint_ids(corpus_vocab, {"a": 0, "b": 1, "c": 1}, 3)


def test_an_export_without_its_jaxattn_block_loads_as_a_foreign_checkpoint(export_dir, tmp_path):
    """Unprefixed HF names, untied lm_head, learned positions: the same attention as the jaxattn loader."""
    plain = tmp_path / "plain"
    shutil.copytree(export_dir, plain)
    cfg = json.loads((plain / "config.json").read_text())
    (plain / "config.json").write_text(json.dumps({k: v for k, v in cfg.items() if k != "jaxattn"}))
    ours = hf.load_gpt2_checkpoint(export_dir)
    theirs = hf.load_any_gpt2_checkpoint(plain)
    assert theirs.layout == [] and theirs.meta["format"] == "hf" and theirs.vocab == ours.vocab
    assert theirs.config.num_layers == cfg["n_layer"] and "lm_head" in theirs.params
    tokens = np.arange(20, dtype=np.int32).reshape(1, 20) % cfg["vocab_size"]
    a, b = forward_batch(ours.params, tokens, ours.config), forward_batch(theirs.params, tokens, theirs.config)
    np.testing.assert_allclose(np.concatenate([a.prep_attn, a.attn], 1), b.attn, atol=1e-6)
    np.testing.assert_allclose(a.logits, b.logits, atol=1e-4)


def _hf_checkpoint(path: Path, V: int, **kw) -> Path:
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("torch")
    config = transformers.GPT2Config(vocab_size=V, n_embd=32, n_head=4, n_layer=2, n_positions=64, **kw)
    transformers.GPT2LMHeadModel(config).save_pretrained(str(path))
    return path


@pytest.mark.parametrize("tied", [True, False])
def test_a_checkpoint_transformers_saved_loads_with_its_attention(tmp_path, tied):
    import torch

    path = _hf_checkpoint(tmp_path / "hf", 23, tie_word_embeddings=tied)
    ck = hf.load_any_gpt2_checkpoint(path)
    assert ck.vocab == {} and ("lm_head" in ck.params) is not tied and ck.config.d_head == 8
    tokens = np.random.default_rng(0).integers(0, 23, (2, 17)).astype(np.int32)
    import transformers

    model = transformers.GPT2LMHeadModel.from_pretrained(str(path), attn_implementation="eager").eval()
    with torch.no_grad():
        res = model(torch.as_tensor(tokens, dtype=torch.long), output_attentions=True)
    ours = forward_batch(ck.params, tokens, ck.config)
    np.testing.assert_allclose(np.stack([a.numpy() for a in res.attentions], 1), ours.attn, atol=1e-5)
    np.testing.assert_allclose(res.logits.numpy(), ours.logits, atol=1e-4)


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("activation_function", "relu", "activation_function='relu' is not supported"),
        ("layer_norm_epsilon", 1e-6, "layer_norm_epsilon=1e-06 is not supported"),
        ("n_head", 5, "n_embd=32 is not a multiple of n_head=5"),
    ],
)
def test_foreign_configs_jaxattn_cannot_run_are_refused(tmp_path, key, value, message):
    path = _hf_checkpoint(tmp_path / "hf", 11)
    cfg = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps(dict(cfg, **{key: value})))
    with pytest.raises(JaxattnError, match=message.replace("(", r"\(")):
        hf.load_any_gpt2_checkpoint(path)


def test_score_on_a_random_transformers_checkpoint_is_finite(slice_dir, tmp_path, capsys):
    from jaxattn.corpus import load_corpus_split

    corpus, _ = load_corpus_split(str(slice_dir), progress=False)
    path = _hf_checkpoint(tmp_path / "hf", corpus.vocab_size)
    out = tmp_path / "score"
    argv = ["score", "--model", str(path), "--corpus", str(slice_dir), *EVAL, "--max-n", "2", "--out", str(out)]
    code, _, err = run_main(argv, capsys)
    assert code == 2 and "no vocab.json" in err
    code, stdout, err = run_main([*argv, "--vocab-size-match"], capsys)
    assert code == 0, err
    doc = json.loads((out / "scores.json").read_text())
    assert len(doc["heads"]) == 2 * 4 and doc["layout_match"] is None and len(doc["pairs"]) == 8
    cos = np.array(doc["matrix"]["cosine"])
    assert cos.shape == (2, 4, 8) and np.all(np.isfinite(cos)) and np.all((cos > 0) & (cos <= 1))
    assert all(np.isfinite(e["best"]["kl"]) for e in doc["heads"]) and "layout" not in stdout.split("\n")[2]
