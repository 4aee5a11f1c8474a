"""Figure jobs and the worker processes that draw them while the main process writes the rest.

Outside the pure core. A figure job is a ``(name, draw)`` pair; :func:`render_figures` runs a
run's jobs and reports each failure in one line instead of raising, so that no result is lost. A figure is matplotlib work in one Python thread, so the main job's
figures took seconds one after another on the main process. With a :class:`FigurePool`, each
figure job that can be pickled (a :func:`functools.partial` of a module-level function over numpy
arrays, lists and paths) is drawn by a worker process, so the figures are drawn side by side on the
machine's cores while the main process writes ``report.html``. A job that cannot be pickled (a
closure over the run) is drawn in the main process, as before.

Where the workers come from. They are forked from a ``forkserver``: a fresh interpreter that imports
the plotting modules once and forks each worker from itself. Nothing forks the main process,
whose JAX runtime runs threads (a fork of it can deadlock). The server is started in a background
thread when a run begins (:meth:`FigurePool.start`), so its start-up (importing JAX and matplotlib
and drawing one small figure to load the fonts, about 2 s of one core at a lower priority:
:mod:`jaxattn.output.figure_server`) overlaps the counting and the derivation; the workers forked
from it start warm.

``JAXATTN_FIGURE_WORKERS=N`` sets the number of workers; ``0`` draws every figure in the main
process. The default is 2 for jaxattn's own command on a machine with more than one core, and 0
elsewhere (a library call, a test run: see :func:`figure_workers`). When the server cannot start (no ``forkserver`` on
the platform, or a process limit), every figure is drawn in the main process and nothing is lost.
A worker that crashes (a segfault in a native library) fails only its own figure: the jobs that
the crash broke are run again one at a time, each in a fresh worker of its own
(:meth:`FigurePool.run_alone`); the results are already on disk, and the main process goes on.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import functools
import io
import multiprocessing
import os
import pickle
import sys
import threading
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from jaxattn.errors import JaxattnError
from jaxattn.progress import progress_iter

__all__ = [
    "FIGURE_WORKERS_ENV",
    "START_TIMEOUT_S",
    "FigurePool",
    "figure_pool",
    "figure_workers",
    "portable",
    "render_figures",
    "returning",
    "run_pickled",
    "started_as_jaxattn",
    "warm_matplotlib",
]

#: The environment variable with the number of figure workers (0: draw in the main process).
FIGURE_WORKERS_ENV = "JAXATTN_FIGURE_WORKERS"

#: How long :meth:`FigurePool.ready` waits for the workers' start-up before drawing in this process.
START_TIMEOUT_S = 120.0

#: What the forkserver imports once, before it forks any worker: its start-up (the priority, the
#: figures, a warm matplotlib), then the CLI (which a worker imports again when the program is the
#: ``jaxattn`` script).
_PRELOAD = ["jaxattn.output.figure_server", "jaxattn.cli"]


def figure_workers(default: int | None = None) -> int:
    """The number of figure workers: ``JAXATTN_FIGURE_WORKERS``, else ``default``, else automatic.

    Automatic is 2 workers on a machine with more than one core, when this process was started as
    jaxattn's own command (``jaxattn``, ``python -m jaxattn`` or ``python -m jaxattn.cli``), and 0
    otherwise. A worker imports the program's main script again, as any process that
    multiprocessing spawns does, so a script of one's own is safe only with its work under
    ``if __name__ == "__main__":``; set ``JAXATTN_FIGURE_WORKERS`` (or pass ``default``) to use
    workers there.

    Raises:
        JaxattnError: ``JAXATTN_FIGURE_WORKERS`` is not a non-negative integer (the message names it).
    """
    raw = os.environ.get(FIGURE_WORKERS_ENV, "").strip()
    if raw:
        try:
            n = int(raw)
        except ValueError:
            n = -1
        if n < 0:
            raise JaxattnError(f"{FIGURE_WORKERS_ENV}={raw!r}: expected a number of workers >= 0")
        return n
    if default is not None:
        return max(0, int(default))
    return 2 if (os.cpu_count() or 1) > 1 and started_as_jaxattn() else 0


def started_as_jaxattn() -> bool:
    """True when the main module is jaxattn's command (whose re-import by a worker runs nothing)."""
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    if spec is not None:
        return spec.name in ("jaxattn.__main__", "jaxattn.cli.__main__")
    path = getattr(main, "__file__", None)
    return path is not None and Path(path).stem in ("jaxattn", "jaxattn-script")


def warm_matplotlib() -> None:
    """The server's warm-up: matplotlib on Agg, one small figure drawn to memory (loads the fonts).

    Run once in the forkserver (:mod:`jaxattn.output.figure_server`), so every worker forked from it
    starts warm. A failure here is ignored: a worker then loads what it needs with its first figure.
    """
    try:
        from jaxattn.output.attention_plots import pyplot

        plt = pyplot()
        fig = plt.figure(figsize=(1, 1))
        fig.text(0.5, 0.5, "warm", fontsize=6)
        fig.text(0.5, 0.2, "warm", fontsize=6, fontfamily="monospace")
        with io.BytesIO() as f:  # memory, not a file
            fig.savefig(f, format="png", dpi=20)
        plt.close(fig)
    except Exception:  # noqa: BLE001, S110  (a warm-up only; the first figure loads the same)
        pass


def portable(draw: Callable[[], Any]) -> bytes | None:
    """``draw`` pickled, or None when it cannot be (a lambda or a closure: drawn in the main process)."""
    try:
        return pickle.dumps(draw, protocol=pickle.HIGHEST_PROTOCOL)
    except (pickle.PicklingError, AttributeError, TypeError):
        return None


def run_pickled(blob: bytes) -> Any:
    """A worker's job: unpickles a figure job (``draw()``) and runs it; returns what it returns."""
    draw = pickle.loads(blob)  # noqa: S301  (bytes pickled by this run's own main process)
    return draw()


class FigurePool:
    """Worker processes for figure jobs, started in the background (see the module docstring).

    Use :meth:`start` at the beginning of a run, :meth:`submit` for each portable job and
    :meth:`close` at the end (or ``with FigurePool.start() as pool:``).
    """

    def __init__(self, workers: int) -> None:
        self.workers = int(workers)
        self._executor: cf.ProcessPoolExecutor | None = None
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None
        self._abandoned = False

    @classmethod
    def start(cls, workers: int | None = None) -> FigurePool | None:
        """A pool of ``workers`` (default :func:`figure_workers`) whose server starts in the background.

        Returns:
            The pool, or None for 0 workers or a platform without ``forkserver``.
        """
        n = figure_workers(workers)
        if n == 0 or "forkserver" not in multiprocessing.get_all_start_methods():
            return None
        pool = cls(n)
        pool._thread = threading.Thread(target=pool._launch, name="jaxattn-figure-pool", daemon=True)
        pool._thread.start()
        return pool

    def _launch(self) -> None:
        """Starts the server and the workers (blocks until they are forked: hence the thread)."""
        try:
            ctx = multiprocessing.get_context("forkserver")
            ctx.set_forkserver_preload(_PRELOAD)
            executor = cf.ProcessPoolExecutor(self.workers, mp_context=ctx)
            # One submission per worker: the executor forks a worker for each while none is idle.
            for _ in range(self.workers):
                executor.submit(int)
            if self._abandoned:  # the run ended while the workers started
                executor.shutdown(wait=False, cancel_futures=True)
                return
            self._executor = executor
        except Exception as e:  # noqa: BLE001  (no pool: every figure is drawn in the main process)
            self._error = e

    def ready(self) -> bool:
        """Waits for the start-up (at most :data:`START_TIMEOUT_S`); True when the workers can take jobs.

        A start-up that failed or timed out warns once, and the figures are drawn in this process.
        """
        if self._thread is not None:
            self._thread.join(START_TIMEOUT_S)
            if self._thread.is_alive():
                self._abandoned = True
                self._error = TimeoutError(f"no workers after {START_TIMEOUT_S:.0f} s")
            self._thread = None
            if self._error is not None:
                warnings.warn(
                    f"figure workers did not start ({type(self._error).__name__}: {self._error}); "
                    "drawing the figures in this process",
                    RuntimeWarning,
                    stacklevel=2,
                )
        return self._executor is not None and not self._abandoned

    def submit(self, draw: Callable[[], Any]) -> cf.Future[Any] | None:
        """Sends one figure job to a worker.

        Returns:
            The job's future (its result is ``draw()``'s), or None when the job cannot be pickled
            or the pool did not start (the caller then draws it in the main process).
        """
        blob = portable(draw)
        if blob is None or not self.ready():
            return None
        assert self._executor is not None
        try:
            return self._executor.submit(run_pickled, blob)
        except (RuntimeError, cf.BrokenExecutor):  # shut down, or a worker died before this job
            return None

    def run_alone(self, draw: Callable[[], Any]) -> Any:
        """Runs one job in a fresh worker of its own, and returns ``draw()``'s result.

        For the jobs of a pool that a crashed worker broke: run one at a time, a crash is then
        the job's own, and the others are drawn.

        Raises:
            concurrent.futures.process.BrokenProcessPool: the job's worker died.
            Exception: whatever ``draw()`` raised.
        """
        blob = portable(draw)
        if blob is None:
            return draw()
        with cf.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("forkserver")) as executor:
            return executor.submit(run_pickled, blob).result()

    def close(self) -> None:
        """Stops the workers once their jobs are done."""
        if self.ready() and self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)
            self._executor = None

    def abandon(self) -> None:
        """Stops the workers without waiting for the start-up or any job (a run that failed)."""
        self._abandoned = True
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None


@contextlib.contextmanager
def figure_pool(workers: int | None = None) -> Iterator[FigurePool | None]:
    """A :class:`FigurePool` for the length of a run: closed at the end, abandoned on an error.

    Yields:
        The pool, or None when figures are drawn in this process (0 workers, no ``forkserver``).
    """
    pool = FigurePool.start(workers)
    try:
        yield pool
    except BaseException:
        if pool is not None:
            pool.abandon()
        raise
    if pool is not None:
        pool.close()


def render_figures(
    jobs: Sequence[tuple[str, Callable[[], Any]]], *, progress: bool = False, pool: FigurePool | None = None
) -> tuple[list[Path], list[str]]:
    """Runs figure jobs; a failing job is reported, not raised, so no result is lost.

    With a ``pool``, every job it can take (:meth:`FigurePool.submit`) is drawn by a worker
    process while the main process draws the others; the paths come back in the order of ``jobs``.

    Args:
        jobs: ``(name, draw)`` pairs; ``draw()`` writes the figure and returns its path, a list of
            paths, or None.
        progress: a progress bar over the jobs.
        pool: figure workers (:class:`FigurePool`); None: all in this process.

    Returns:
        (the paths written, ``"name: ExceptionType: message"`` for each job that failed).
    """
    futures: dict[int, cf.Future[Any]] = {}
    if pool is not None:
        for i, (_, draw) in enumerate(jobs):
            fut = pool.submit(draw)
            if fut is not None:
                futures[i] = fut
    # The main process's own jobs first, then the workers' results, in the order of the jobs.
    order = [i for i in range(len(jobs)) if i not in futures] + sorted(futures)
    got: dict[int, Any] = {}
    failures: list[str] = []
    broken: list[int] = []
    for i in progress_iter(order, desc="report: figures", enabled=progress):
        name, draw = jobs[i]
        try:
            got[i] = futures[i].result() if i in futures else draw()
        except cf.BrokenExecutor:
            broken.append(i)  # a worker died: this job, or another one that the crash took down
        except Exception as e:  # noqa: BLE001  (any plotting failure; the results are already on disk)
            failures.append(_failure(name, e))
    # Each job of a broken pool again, alone in a fresh worker: only the job that crashes fails.
    for i in broken:
        name, draw = jobs[i]
        try:
            got[i] = pool.run_alone(draw) if pool is not None else draw()
        except Exception as e:  # noqa: BLE001
            failures.append(_failure(name, e))
    files: list[Path] = []
    for i in sorted(got):
        if isinstance(got[i], (list, tuple)):
            files += [Path(p) for p in got[i]]
        elif got[i] is not None:
            files.append(Path(got[i]))
    return files, failures


def _failure(name: str, e: BaseException) -> str:
    """A failed job's one line: ``"name: ExceptionType: message"``."""
    return f"{name}: {type(e).__name__}: {' '.join(str(e).splitlines())}"


def returning(path: Path, draw: Callable[[], Any]) -> Callable[[], Path]:
    """``draw`` returning ``path`` (for a drawing function that returns something else).

    A :func:`functools.partial`, so that it pickles whenever ``draw`` does (a worker can draw it).
    """
    return functools.partial(_draw_returning, Path(path), draw)


def _draw_returning(path: Path, draw: Callable[[], Any]) -> Path:
    draw()
    return path
