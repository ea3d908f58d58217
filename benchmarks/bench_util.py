"""Shared helpers of the speed benchmarks: machine description, A/B alternation, the tables.

Imports neither JAX nor PyTorch, so a benchmark can set XLA_FLAGS after parsing its flags.
"""

from __future__ import annotations

import datetime
import os
import platform
import statistics
import sys
import time
from typing import Callable


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def load_average() -> str:
    try:
        with open("/proc/loadavg") as f:
            return " ".join(f.read().split()[:3])
    except OSError:
        return "n/a"


def cpu_ticks() -> tuple[int, int]:
    """(busy ticks of the whole machine, ticks of this process), from /proc (0, 0 elsewhere)."""
    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
        with open("/proc/self/stat") as f:
            mine = f.read().rsplit(")", 1)[1].split()
        return sum(fields) - fields[3] - fields[4], int(mine[11]) + int(mine[12])
    except (OSError, IndexError, ValueError):
        return 0, 0


def others_share(before, after, seconds: float) -> str:
    """CPU used by other processes between two `cpu_ticks()`, in cores (e.g. '0.03 cores')."""
    ticks = os.sysconf("SC_CLK_TCK")
    busy = (after[0] - before[0]) - (after[1] - before[1])
    return f"{max(busy, 0) / ticks / seconds:.2f} cores"


def start_frameworks(torch: bool = True) -> None:
    """Imports JAX and, with `torch`, PyTorch (after XLA_FLAGS are final), gives PyTorch every
    core and cuDNN autotuning (GPU: fixed shapes), and prints the machine header."""
    import jax

    if torch:
        import torch as torch_lib

        torch_lib.set_num_threads(os.cpu_count())
        torch_lib.backends.cudnn.benchmark = True
        torch_info = f"torch {torch_lib.__version__}, {torch_lib.get_num_threads()} threads"
    else:
        torch_info = "torch not used"
    print(f"date {datetime.datetime.now().isoformat(timespec='seconds')}; CPU {cpu_model()}, "
          f"{os.cpu_count()} cores; jax {jax.__version__} on {jax.devices()[0].device_kind} "
          f"x{jax.device_count()}; {torch_info}\nXLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}; "
          f"load average {load_average()}")


def alternate(model: str, runners: dict[str, Callable[[], float]], repeats: int,
              images: int) -> dict[str, float]:
    """Runs every runner once per repetition, in turn (A B A B ...); each returns the seconds
    of one timed repetition of `images` images. Prints a line per measurement (with the CPU
    that other processes used meanwhile) and returns the median images/s per runner."""
    rates: dict[str, list[float]] = {name: [] for name in runners}
    for rep in range(repeats):
        for name, run in runners.items():
            before = cpu_ticks()
            seconds = run()
            others = others_share(before, cpu_ticks(), seconds)
            rates[name].append(images / seconds)
            print(f"{model:<6} {name:<22} rep {rep + 1}/{repeats}  {images} img in "
                  f"{seconds:7.3f} s  {images / seconds:9.1f} img/s  others {others}")
            sys.stdout.flush()
    return {name: statistics.median(r) for name, r in rates.items()}


def timed(fn: Callable[[], None]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def flops_of(compiled) -> float:
    """FLOPs of one call of a compiled JAX function (XLA's cost analysis; 0 if unknown)."""
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float((cost or {}).get("flops", 0.0))


def summary(rows: list[tuple[str, str, float, float]]) -> str:
    """Markdown table of (model, what, JAX img/s, PyTorch img/s) with the ratio JAX/PyTorch."""
    lines = ["| model | JAX | JAX img/s | PyTorch img/s | ratio JAX/PyTorch |",
             "|---|---|---:|---:|---:|"]
    for model, what, jax_rate, torch_rate in rows:
        ratio = f"{jax_rate / torch_rate:.2f}" if torch_rate else "n/a"
        torch_col = f"{torch_rate:.1f}" if torch_rate else "n/a"
        lines.append(f"| {model} | {what} | {jax_rate:.1f} | {torch_col} | {ratio} |")
    return "\n".join(lines)
