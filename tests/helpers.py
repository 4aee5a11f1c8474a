"""Shared test helpers (imported by tests as ``from tests.helpers import ...``; fixtures live in conftest)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def markov_corpus(seed: int, vocab: int, length: int, num_docs: int = 3) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A planted first-order Markov chain: returns tokens [N], doc_ids [N] and its transition matrix [V, V]."""
    rng = np.random.default_rng(seed)
    trans = rng.dirichlet(np.full(vocab, 0.3), size=vocab)
    toks, docs = [], []
    per = length // num_docs
    for d in range(num_docs):
        t = rng.integers(vocab)
        for _ in range(per):
            toks.append(t)
            docs.append(d)
            t = rng.choice(vocab, p=trans[t])
    return np.array(toks, np.int32), np.array(docs, np.int32), trans


def evaluate_prep(prep, attn, option: str = "baseline") -> list[dict]:
    """``pipeline.evaluate`` on a prepared run's own expected attention, mask and layout."""
    from jaxattn import pipeline

    return pipeline.evaluate(prep.expected, prep.mask, prep.pair_index, attn, prep.config, option=option)


def baseline_attention(prep) -> np.ndarray:
    """The seed derivation's actual attention on a prepared run's sequences, [B, L, H, T, T]."""
    from jaxattn import pipeline
    from jaxattn.derive import derive_params

    params = derive_params(prep.tables, prep.config, key=prep.key("derive"))
    return pipeline.batched_attention(params, prep.tokens, prep.config, batch_size=prep.run.batch_size, progress=False)


def start_on_eight_devices(scripts: dict[str, str]) -> subprocess.Popen:
    """Starts named scripts, one after another, in ONE subprocess with 8 simulated CPU devices.

    jax fixes its device count when it starts, so ``XLA_FLAGS`` must be set before it is imported:
    hence a subprocess, shared by every 8-device check to pay for one jax start. Each script
    prints ``RESULT <json dict>``. A script that raises prints ``"<name>: error"`` (its
    traceback) instead, and the scripts after it still run. Collect with :func:`eight_device_output`.
    """
    env = dict(os.environ, JAX_PLATFORMS="cpu", JAXATTN_NO_PROGRESS="1")
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    runner = (
        "import json, traceback\n"
        f"for name, src in {scripts!r}.items():\n"
        "    try:\n"
        "        exec(compile(src, name, 'exec'), {'__name__': '__main__'})\n"
        "    except BaseException:\n"
        "        print('RESULT ' + json.dumps({name + ': error': traceback.format_exc()[-3000:]}))\n"
    )
    return subprocess.Popen(
        [sys.executable, "-c", runner], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def eight_device_output(proc: subprocess.Popen) -> dict:
    """Waits for :func:`start_on_eight_devices`'s subprocess and merges its ``RESULT`` dicts."""
    try:
        stdout, stderr = proc.communicate(timeout=900)
    finally:
        if proc.poll() is None:
            proc.kill()
    lines = [ln for ln in stdout.splitlines() if ln.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, f"subprocess failed:\n{stdout[-3000:]}\n{stderr[-3000:]}"
    out: dict = {}
    for ln in lines:
        out.update(json.loads(ln[len("RESULT ") :]))
    return out


def run_on_eight_devices(scripts: dict[str, str]) -> dict:
    """:func:`start_on_eight_devices`, then :func:`eight_device_output`."""
    return eight_device_output(start_on_eight_devices(scripts))
