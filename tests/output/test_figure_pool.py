"""Figure workers (jaxattn.output.figure_pool): the same files as in-process drawing, failures isolated."""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from jaxattn.errors import JaxattnError
from jaxattn.output import plots
from jaxattn.output.figure_pool import FIGURE_WORKERS_ENV, FigurePool, figure_pool, figure_workers, portable

REPO = Path(__file__).resolve().parents[2]


def _records(L: int = 3, H: int = 4) -> list[dict]:
    rng = np.random.default_rng(0)
    return [
        {
            "option": "baseline",
            "layer": l,
            "head": h,
            "n": min(l + 1, 2),
            "s": min(h, 2),
            "kl": float(rng.uniform(0, 2)),
            "cosine": float(rng.uniform()),
            "argmax_match": float(rng.uniform()),
            "argmax_match_tied": float(rng.uniform()),
            "entropy": None if (l, h) == (2, 3) else float(rng.uniform()),
        }
        for l in range(L)
        for h in range(H)
    ]


def _jobs(out: Path) -> list:
    embed = np.random.default_rng(1).normal(size=(20, 8))
    p = out / "embedding_similarity.png"
    draw_emb = functools.partial(plots.plot_embedding_similarity, p, embed, [f"t{i}" for i in range(20)])
    return [(p.name, plots.returning(p, draw_emb)), *plots.heatmap_jobs(out, _records())]


@pytest.fixture(scope="module")
def pool():
    with figure_pool(2) as p:
        assert p is not None and p.ready()
        yield p


def test_workers_write_the_same_bytes_as_the_main_process(tmp_path, pool):
    here, there = tmp_path / "here", tmp_path / "there"
    here.mkdir()
    there.mkdir()
    files_here, fail_here = plots.render_figures(_jobs(here))
    files_there, fail_there = plots.render_figures(_jobs(there), pool=pool)
    assert fail_here == fail_there == []
    assert [f.name for f in files_here] == [f.name for f in files_there]
    assert [f.name for f in files_there] == ["embedding_similarity.png"] + [
        f"heatmap_{m}.png" for m in plots.METRIC_NAMES
    ]
    for a, b in zip(files_here, files_there, strict=True):
        assert a.read_bytes() == b.read_bytes(), a.name


def test_jobs_run_in_other_processes(pool):
    pids = {pool.submit(functools.partial(os.getpid)).result() for _ in range(4)}  # type: ignore[union-attr]
    assert os.getpid() not in pids and len(pids) >= 1


def test_a_closure_is_drawn_here_and_a_worker_failure_is_one_line(tmp_path, pool):
    mine = tmp_path / "mine.png"

    def local() -> Path:  # a closure: cannot be pickled, so the main process draws it
        mine.write_bytes(b"x")
        return mine

    assert portable(local) is None and pool.submit(local) is None
    bad = functools.partial(plots.plot_training_curves, tmp_path / "tc.png", {"step": []})
    files, failures = plots.render_figures([("mine.png", local), ("tc.png", bad)], pool=pool)
    assert files == [mine]
    assert failures == ["tc.png: JaxattnError: the training curves have no 'loss' values to plot"]


def test_a_worker_that_dies_fails_its_job_only(tmp_path):
    """A crash in a worker (a segfault in a native library; here os._exit) fails that job alone."""
    with figure_pool(1) as p:
        assert p is not None
        heat = plots.heatmap_jobs(tmp_path, _records())
        jobs = [heat[0], ("crash", functools.partial(os._exit, 3)), *heat[1:3]]
        files, failures = plots.render_figures(jobs, pool=p)
    assert len(failures) == 1 and failures[0].startswith("crash: BrokenProcessPool: "), failures
    assert files == [tmp_path / f"heatmap_{m}.png" for m in plots.METRIC_NAMES[:3]]
    assert all(f.stat().st_size > 1000 for f in files)


def test_workers_that_cannot_start_leave_the_figures_to_the_main_process(tmp_path, monkeypatch):
    import multiprocessing

    def no_forkserver(method=None):
        raise OSError("no processes here")

    monkeypatch.setattr(multiprocessing, "get_context", no_forkserver)
    pool = FigurePool.start(2)
    assert pool is not None
    with pytest.warns(RuntimeWarning, match=r"figure workers did not start \(OSError: no processes here\)"):
        files, failures = plots.render_figures(plots.heatmap_jobs(tmp_path, _records())[:2], pool=pool)
    assert failures == [] and [f.name for f in files] == ["heatmap_kl.png", "heatmap_cosine.png"]
    pool.close()


def test_number_of_workers(monkeypatch):
    monkeypatch.delenv(FIGURE_WORKERS_ENV, raising=False)
    assert figure_workers() == 0  # the main module is pytest's, not jaxattn's command
    assert figure_workers(3) == 3
    monkeypatch.setenv(FIGURE_WORKERS_ENV, "1")
    assert figure_workers() == 1 and figure_workers(3) == 1
    monkeypatch.setenv(FIGURE_WORKERS_ENV, "0")
    assert FigurePool.start() is None
    monkeypatch.setenv(FIGURE_WORKERS_ENV, "two")
    with pytest.raises(JaxattnError, match="JAXATTN_FIGURE_WORKERS='two'"):
        figure_workers()


def test_an_error_in_the_run_abandons_the_pool_without_waiting():
    with pytest.raises(RuntimeError, match="the run failed"), figure_pool(2) as p:
        assert p is not None
        raise RuntimeError("the run failed")
    assert not p.ready()  # stopped, not left running for the jobs of a run that failed


def test_cli_figures_with_and_without_workers(tmp_path):
    """``python -m jaxattn.cli analyze`` starts 2 workers by itself; its files equal a run without them."""
    corpus = tmp_path / "c.txt"
    rng = np.random.default_rng(0)
    corpus.write_text(" ".join(rng.choice(["to", "be", "or", "not", "that", "is"], 400)) + "\n")
    tiny = ["--preset", "small", "--layers", "2", "--heads", "2", "--d-model", "16", "--d-head", "4"]
    tiny += ["--seq-len", "8", "--num-seqs", "2", "--no-progress", "--corpus", str(corpus)]
    runs = {}
    for w in ("0", None):
        env = {k: v for k, v in os.environ.items() if k != FIGURE_WORKERS_ENV}
        if w is not None:
            env[FIGURE_WORKERS_ENV] = w
        out = tmp_path / f"out_{w}"
        cmd = [sys.executable, "-m", "jaxattn.cli", "analyze", *tiny, "--out", str(out)]
        r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr
        runs[w] = out
    base, other = runs["0"], runs[None]
    pngs = sorted(p.name for p in base.glob("*.png"))
    assert len(pngs) == 7 and pngs == sorted(p.name for p in other.glob("*.png"))
    for name in pngs:
        assert (base / name).read_bytes() == (other / name).read_bytes(), name
    workers = {w: json.loads((out / "metrics.json").read_text())["figure_workers"] for w, out in runs.items()}
    assert workers == {"0": 0, None: 2}
