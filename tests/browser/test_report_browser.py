"""report.html in a real headless Chromium (playwright's sync API; never ``playwright install``).

The report of a seed-preset ``analyze`` run on two Shakespeare plays (one held out) opens from
``file://`` with no console or page error and no request off ``file://``; the overview has one cell
per head; the head view shows ``metrics.json``'s numbers and the arrays' probabilities; the token
view responds. Screenshots go to a printed directory (and to ``$JAXATTN_SCREENSHOT_DIR`` when set).

Skipped when playwright or ``chromium`` is missing, unless ``JAXATTN_REQUIRE_BROWSER=1`` (then it fails).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from jaxattn import pipeline
from jaxattn.cli.analyze import write_outputs
from jaxattn.progress import Timer
from tests.conftest import SHAKESPEARE

CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]  # fmt: skip
PLAYS = ("comedy_of_errors_gut.txt", "twelfth_night_gut.txt")


def close_to_row(got: float | np.ndarray, row: np.ndarray, j: Any) -> bool:
    """Within the page's quantisation: half a step of the row's maximum (/ 255), plus float16's rounding of it."""
    return bool(np.all(np.abs(np.asarray(got) - row[j]) <= row.max() * (0.5 / 255 + 2.0**-11) + 1e-7))


def _need(reason: str) -> None:
    if os.environ.get("JAXATTN_REQUIRE_BROWSER") == "1":
        pytest.fail(f"JAXATTN_REQUIRE_BROWSER=1 but {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def sync_playwright() -> Any:
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _need("playwright is not installed (pip install playwright; the browser is Debian's chromium)")
    if shutil.which("chromium") is None:
        _need("no `chromium` on PATH (apt-get install chromium)")
    return sync_playwright


@pytest.fixture(scope="module")
def seed_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """``jaxattn analyze``'s outputs (write_outputs) for a seed-preset run on two plays, the last held out."""
    plays = [p for p in PLAYS if (SHAKESPEARE / p).is_file()][:2]
    if len(plays) < 2:
        pytest.skip(f"two of {PLAYS} are needed under {SHAKESPEARE}")
    corpus = tmp_path_factory.mktemp("plays")
    for p in plays:
        (corpus / p).symlink_to(SHAKESPEARE / p)  # read in place
    run = pipeline.RunConfig(preset="seed", num_seqs=8)
    timer = Timer()
    prep, res = pipeline.analyze(str(corpus), run=run, progress=False, timer=timer)
    out = tmp_path_factory.mktemp("analyze")
    args = argparse.Namespace(no_progress=True, attention_scaling="absolute", corpus=str(corpus))
    with contextlib.redirect_stdout(io.StringIO()):
        status = write_outputs(out, prep, [res], args=args, timer=timer)
    assert status == 0
    doc = json.loads((out / "metrics.json").read_text(encoding="utf-8"))
    return {"prep": prep, "res": res, "out": out, "doc": doc}


@pytest.fixture(scope="module")
def page(sync_playwright: Any, seed_run: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> Any:
    """The report open in Chromium; ``page.events`` collects console errors, page errors and requests."""
    events: dict[str, list[str]] = {"errors": [], "requests": []}
    with sync_playwright() as p:
        ctx = p.chromium.launch_persistent_context(
            str(tmp_path_factory.mktemp("chromium-profile")),
            executable_path=shutil.which("chromium"),
            args=CHROMIUM_ARGS,
            viewport={"width": 1500, "height": 1000},
        )
        pg = ctx.new_page()
        pg.on(
            "console", lambda m: events["errors"].append(f"console {m.type}: {m.text}") if m.type == "error" else None
        )
        pg.on("pageerror", lambda e: events["errors"].append(f"page error: {e}"))
        pg.on("request", lambda r: events["requests"].append(r.url))
        pg.goto((seed_run["out"] / "report.html").as_uri())
        pg.wait_for_selector("body[data-ready]", timeout=30_000)
        pg.events = events
        yield pg
        ctx.close()


@pytest.fixture(scope="module")
def shots(tmp_path_factory: pytest.TempPathFactory) -> Any:
    d = tmp_path_factory.mktemp("report_screenshots")
    print(f"\nreport screenshots: {d}")
    extra = os.environ.get("JAXATTN_SCREENSHOT_DIR")

    def save(page: Any, name: str) -> Path:
        path = d / f"{name}.png"
        page.screenshot(path=str(path), full_page=True)
        if extra:
            Path(extra).mkdir(parents=True, exist_ok=True)
            shutil.copy(path, Path(extra) / path.name)
        return path

    return save


def _head(doc: dict[str, Any]) -> tuple[int, int]:
    """L5H2 when the run has it, else its last head."""
    L, H = doc["config"]["model"]["num_layers"], doc["config"]["model"]["num_heads"]
    return (5, 2) if L > 5 and H > 2 else (L - 1, H - 1)


def test_the_report_loads_offline_with_no_errors(page, seed_run, shots):
    assert page.evaluate("document.body.dataset.ready") == "1"
    shots(page, "overview")
    assert page.events["errors"] == []
    off = [u for u in page.events["requests"] if not u.startswith("file://")]
    assert off == [] and page.events["requests"]  # at least the page itself, from file://


def test_the_overview_has_one_cell_per_head_per_metric(page, seed_run):
    doc = seed_run["doc"]
    L, H = doc["config"]["model"]["num_layers"], doc["config"]["model"]["num_heads"]
    for m in ("kl", "cosine", "argmax_match", "argmax_match_tied", "entropy"):
        assert page.locator(f'figure.metric[data-metric="{m}"] .cell').count() == L * H
    l, h = _head(doc)
    rec = next(r for r in doc["results"] if (r["layer"], r["head"]) == (l, h))
    cell = page.locator(f'.cell[data-metric="cosine"][data-layer="{l}"][data-head="{h}"]')
    assert cell.get_attribute("data-value") == f"{rec['cosine']:.4f}"
    # Heads that repeat an earlier head's (n, s) in their layer are marked.
    shared = {(int(c.get_attribute("data-layer")), int(c.get_attribute("data-head")))
              for c in page.locator('figure.metric[data-metric="kl"] .cell.shared').all()}  # fmt: skip
    seen, want = set(), set()
    for r in sorted(doc["results"], key=lambda r: (r["layer"], r["head"])):
        key = (r["layer"], r["n"], r["s"])
        if key in seen:
            want.add((r["layer"], r["head"]))
        seen.add(key)
    assert shared == want and want


def test_a_head_shows_metrics_json_and_the_arrays(page, seed_run, shots):
    doc, prep, res = seed_run["doc"], seed_run["prep"], seed_run["res"]
    l, h = _head(doc)
    page.click('#tabs button[data-tab="overview"]')
    page.click(f'.cell[data-metric="cosine"][data-layer="{l}"][data-head="{h}"]')
    assert page.evaluate("document.body.dataset.tab") == "head"
    rec = next(r for r in doc["results"] if (r["layer"], r["head"]) == (l, h))
    for m in ("kl", "cosine", "argmax_match", "argmax_match_tied", "entropy"):
        assert page.locator(f'#head-summary .metric[data-metric="{m}"]').inner_text() == f"{rec[m]:.4f}"
    # Hover cells of the actual map: the tooltip's probabilities are the arrays' (float16).
    canvas = page.locator("#map-actual")
    box = canvas.bounding_box()
    c, left, top = (float(canvas.get_attribute(f"data-{k}")) for k in ("cell", "left", "top"))
    p = prep.pair_index[l, h]
    checked = 0
    for i, j in ((40, 3), (63, 62), (10, 10)):
        page.mouse.move(box["x"] + left + (j + 0.5) * c, box["y"] + top + (i + 0.5) * c)
        tip = page.evaluate("({...document.getElementById('tooltip').dataset})")
        assert (int(tip["query"]), int(tip["key"])) == (i, j)
        if tip["status"] == "valid":
            assert close_to_row(float(tip["actual"]), res.attn[0, l, h, i, : i + 1], j)
            assert close_to_row(float(tip["expected"]), prep.expected[p, 0, i, : i + 1], j)
            checked += 1
        else:
            assert not prep.mask[p, 0, i].any()
    assert checked
    shots(page, "head_view")
    # Per-query rows: the metric's dropped queries are shown as such.
    rows = page.locator("#query-table tr[data-query]")
    assert rows.count() == prep.tokens.shape[1]
    valid = prep.mask[p, 0].any(-1)
    status = [rows.nth(i).get_attribute("class") for i in range(rows.count())]
    assert [s == "valid" for s in status] == list(valid)


def test_the_token_view_responds(page, seed_run, shots):
    prep, doc = seed_run["prep"], seed_run["doc"]
    l, h = _head(doc)
    p = prep.pair_index[l, h]
    page.click('#tabs button[data-tab="tokens"]')
    valid = np.flatnonzero(prep.mask[p, 0].any(-1))
    q1, q2 = int(valid[len(valid) // 2]), int(valid[-1])

    def shading() -> list[str]:
        return page.eval_on_selector_all("#tokens-expected .tok", "els => els.map(e => e.style.background)")

    page.click(f'#tokens-expected .tok[data-pos="{q1}"]')
    first = shading()
    assert page.locator("#tokens-expected .tok.query").get_attribute("data-pos") == str(q1)
    page.click(f'#tokens-actual .tok[data-pos="{q2}"]')
    assert page.locator("#tokens-expected .tok.query").get_attribute("data-pos") == str(q2)
    assert shading() != first
    weights = page.eval_on_selector_all("#tokens-expected .tok", "els => els.map(e => e.dataset.weight)")
    got = np.array([float(w) for w in weights[: q2 + 1]])
    assert close_to_row(got, prep.expected[p, 0, q2, : q2 + 1], slice(None))
    assert all(w == "" for w in weights[q2 + 1 :])
    shots(page, "token_view")
    assert page.events["errors"] == []
