"""Shared helpers for the benchmark scripts: device choice, timing, machine info, tables, JSON.

Every benchmark follows the same protocol:

* the first call (compile + run) is timed on its own and reported as ``first_s``; ``compile_s``
  is ``first_s - median_s`` (what the first call cost beyond a warm call);
* then ``repeats`` warm calls, each ended with ``jax.block_until_ready``; the median is the
  number reported (``min_s`` too);
* ours and the peers run in the same process on the same data;
* results go to ``benchmarks/results/<name>.json`` with :func:`machine_info`.

Usage::

    from common import add_common_args, setup, time_call, print_table, write_json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
#: The Shakespeare plays the tests and benchmarks read in place (never copied into the repo).
SHAKESPEARE = ROOT.parent / "shared" / "data" / "shakespeare"

if str(ROOT) not in sys.path:  # run as `python benchmarks/x.py` from anywhere
    sys.path.insert(0, str(ROOT))


def add_common_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Adds ``--quick``, ``--device``, ``--repeats`` and ``--out`` to a benchmark's parser."""
    parser.add_argument("--quick", action="store_true", help="small sizes: 2 CPU cores, minutes")
    parser.add_argument(
        "--device", choices=("cpu", "gpu", "tpu"), default=None, help="jax device (default: jax's default backend)"
    )
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats (median reported)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for the JSON results")
    return parser


def setup(device: str | None) -> Any:
    """Makes ``device`` ('cpu', 'gpu', 'tpu' or None) jax's default device and returns it.

    Exits with status 2 and one line when the platform is not available.
    """
    import jax

    if device is None:
        return jax.devices()[0]
    try:
        dev = jax.devices(device)[0]
    except RuntimeError as e:
        sys.exit(f"error: --device {device} is not available here ({str(e).splitlines()[0]})")
    jax.config.update("jax_default_device", dev)
    return dev


@dataclasses.dataclass
class Timing:
    """Wall times of one benchmarked call, in seconds."""

    median_s: float
    min_s: float
    first_s: float
    compile_s: float
    times_s: list[float]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def block(x: Any) -> Any:
    """``jax.block_until_ready`` on any pytree (numpy leaves pass through)."""
    import jax

    return jax.block_until_ready(x)


def time_call(fn: Callable[[], Any], *, repeats: int = 5, warmup: int = 1, first: bool = True) -> Timing:
    """Times ``fn()``: a first (compiling) call, ``warmup`` untimed calls, then ``repeats`` timed calls.

    Every call's result goes through :func:`block`, so asynchronous jax work is included.
    """
    first_s = float("nan")
    if first:
        t0 = time.perf_counter()
        block(fn())
        first_s = time.perf_counter() - t0
        warmup = max(warmup - 1, 0)
    for _ in range(warmup):
        block(fn())
    times = []
    for _ in range(max(repeats, 1)):
        t0 = time.perf_counter()
        block(fn())
        times.append(time.perf_counter() - t0)
    med = statistics.median(times)
    comp = max(first_s - med, 0.0) if first else 0.0
    return Timing(med, min(times), first_s, comp, times)


def time_interleaved(fns: dict[str, Callable[[], Any]], *, repeats: int = 5) -> dict[str, Timing]:
    """Times several functions round-robin (one call of each per round), after one first call each.

    On a shared machine a burst of load then hits every contender alike, so the ratios between
    them are steadier than with back-to-back blocks.
    """
    firsts = {}
    for name, fn in fns.items():
        t0 = time.perf_counter()
        block(fn())
        firsts[name] = time.perf_counter() - t0
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(max(repeats, 1)):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            block(fn())
            times[name].append(time.perf_counter() - t0)
    out = {}
    for name, ts in times.items():
        med = statistics.median(ts)
        out[name] = Timing(med, min(ts), firsts[name], max(firsts[name] - med, 0.0), ts)
    return out


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_info(device: Any = None) -> dict[str, Any]:
    """Machine, device kind and library versions, for every results file."""
    import jax
    import jaxlib
    import numpy as np

    dev = device if device is not None else jax.devices()[0]
    info: dict[str, Any] = {
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "numpy": np.__version__,
        "jax": jax.__version__,
        "jaxlib": jaxlib.__version__,
        "device_platform": dev.platform,
        "device_kind": getattr(dev, "device_kind", "unknown"),
        "num_devices": len(jax.devices(dev.platform)),
        "load_avg_1m": os.getloadavg()[0],
    }
    try:
        import psutil

        info["memory_gib"] = round(psutil.virtual_memory().total / 2**30, 1)
    except ImportError:
        pass
    return info


def write_json(name: str, payload: dict[str, Any], out_dir: Path = RESULTS, device: Any = None) -> Path:
    """Writes ``payload`` plus machine info to ``out_dir/<name>.json``; returns the path."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.json"
    doc = {"benchmark": name, "machine": machine_info(device), "time_unix": time.time(), **payload}
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(doc, indent=2, default=_json_default) + "\n")
    tmp.replace(path)
    print(f"wrote {path}")
    return path


def _json_default(o: Any) -> Any:
    import numpy as np

    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Timing):
        return o.to_dict()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON-serialisable: {type(o)}")


def fmt_s(x: float | None) -> str:
    """Seconds with a readable unit."""
    if x is None or x != x:
        return "-"
    if x >= 100:
        return f"{x:.0f} s"
    if x >= 1:
        return f"{x:.2f} s"
    if x >= 1e-3:
        return f"{x * 1e3:.1f} ms"
    return f"{x * 1e6:.0f} us"


def print_table(rows: Sequence[dict[str, Any]], columns: Sequence[str], title: str | None = None) -> str:
    """Prints (and returns) a plain-text table of ``rows`` over ``columns``."""
    cells = [[str(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) if cells else len(c) for i, c in enumerate(columns)]
    lines = []
    if title:
        lines.append(title)
    lines.append("  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)))
    lines.append("  ".join("-" * w for w in widths))
    for row in cells:
        lines.append("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)))
    text = "\n".join(lines)
    print(text, flush=True)
    return text


def host_copy_bandwidth(nbytes: int = 1 << 28, repeats: int = 5) -> float:
    """Host memory bandwidth in bytes/s from a numpy copy (read + write bytes / median time)."""
    import numpy as np

    src = np.ones(nbytes // 8, np.float64)
    dst = np.empty_like(src)
    t = time_call(lambda: np.copyto(dst, src), repeats=repeats)
    return 2 * src.nbytes / t.median_s


def device_copy_bandwidth(nbytes: int = 1 << 28, repeats: int = 5) -> float:
    """Default jax device's memory bandwidth in bytes/s from a jitted copy (read + write / median)."""
    import jax
    import jax.numpy as jnp

    x = jnp.ones(nbytes // 4, jnp.float32)
    f = jax.jit(lambda a: a + 1.0)
    t = time_call(lambda: f(x), repeats=repeats)
    return 2 * x.nbytes / t.median_s


def device_matmul_flops(size: int = 2048, repeats: int = 5, dtype: str = "float32") -> float:
    """Achieved FLOP/s of a jitted ``size``-cubed matmul on the default device (a practical peak)."""
    import jax
    import jax.numpy as jnp

    a = jnp.ones((size, size), dtype)
    f = jax.jit(lambda x: x @ x)
    t = time_call(lambda: f(a), repeats=repeats)
    return 2 * size**3 / t.median_s


def shakespeare_ok() -> bool:
    return SHAKESPEARE.is_dir()
