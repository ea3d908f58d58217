"""Shared helpers of the speed benchmarks: machine description, A/B alternation, compile and
peak timing, the tables.

Imports neither JAX nor PyTorch, so a benchmark can set XLA_FLAGS after parsing its flags.
"""

from __future__ import annotations

import dataclasses
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


def start_frameworks(torch: bool = True, malloc: str = "fixed") -> None:
    """Fixes malloc's thresholds (`malloc`: 'fixed', or 'glibc' for its moving defaults),
    imports JAX and, with `torch`, PyTorch (after XLA_FLAGS are final), gives PyTorch every
    core and cuDNN autotuning (GPU: fixed shapes), and prints the machine header. Fixed, the
    same for both frameworks, neither one's speed depends on what the other freed before it:
    with glibc's moving defaults PyTorch ran about 17% slower after the JAX step with oneDNN's
    convolutions than after XLA's (torch_beside_jax.py; docs/performance.md)."""
    from jax_robust.speed_flags import fix_malloc

    malloc_info = fix_malloc() if malloc == "fixed" else "malloc: glibc's defaults"
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
          f"load average {load_average()}; {malloc_info}")


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


def first_calls(call: Callable[[], None], calls: int = 2) -> tuple[float, list[float]]:
    """Times `calls` first calls of `call`; returns (the seconds the calls before the last took
    beyond the last one's: the compile time, when the last is steady; the seconds of each)."""
    seconds = [timed(call) for _ in range(calls)]
    return sum(max(s - seconds[-1], 0.0) for s in seconds[:-1]), seconds


def matmul_peak(size: int = 4096, repeats: int = 3) -> tuple[float, dict[str, float]]:
    """(best GFLOP/s, GFLOP/s per library) of a float32 `size` x `size` matmul, the best of
    `repeats` timed runs after an untimed one, with NumPy and with JAX and PyTorch on their
    devices when they are already imported (JAX's default precision: TF32 on recent GPUs)."""
    import numpy as np

    a = np.random.default_rng(0).random((size, size), dtype=np.float32)
    products = {"numpy": lambda: a @ a}
    if "jax" in sys.modules:
        import jax

        a_jax, matmul = jax.device_put(a), jax.jit(lambda m: m @ m)
        products["jax"] = lambda: matmul(a_jax).block_until_ready()
    if "torch" in sys.modules:
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
        a_torch = torch.from_numpy(a).to(device)
        sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
        products["torch"] = lambda: (a_torch @ a_torch, sync())
    rates = {}
    for name, product in products.items():
        product()
        rates[name] = 2 * size**3 / min(timed(product) for _ in range(repeats)) / 1e9
    return max(rates.values()), rates


def print_peak(size: int, repeats: int) -> float:
    """Measures `matmul_peak`, prints it, returns the best GFLOP/s."""
    peak, rates = matmul_peak(size, repeats)
    print(f"float32 matmul peak ({size}^3, best of {repeats}): " + ", ".join(
        f"{name} {rate:.1f}" for name, rate in rates.items()) + f" GFLOP/s; peak {peak:.1f}")
    sys.stdout.flush()
    return peak


def cost_analysis_text(flops: float, per: str, digits: int) -> str:
    """'<flops> GFLOP/<per>' of a flops_of figure, or why there is none (0: FFI calls)."""
    if flops:
        return f"{flops / 1e9:.{digits}f} GFLOP/{per} (XLA cost analysis)"
    return "FLOPs n/a (XLA's cost analysis does not see FFI calls)"


def flops_of(compiled, devices: int = 1) -> float:
    """FLOPs of one call of a compiled JAX function (XLA's cost analysis; 0 if unknown).
    The analysis of a program partitioned over `devices` counts one device's share. 0 for a
    program with FFI calls (oneDNN's convolutions): the analysis counts none of their work."""
    from jax_robust.onednn import TARGET

    if f'custom_call_target="{TARGET}"' in compiled.as_text():
        return 0.0
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float((cost or {}).get("flops", 0.0)) * devices


# The PyTorch modes the benchmarks can time: the keys of torch_models.MODES (which imports torch).
TORCH_MODES = ("torch_nchw", "torch_cl", "torch_nograd", "torch_compile", "torch_compile_nograd")
LAYOUT_MODES = {"nchw": "torch_nchw", "channels_last": "torch_cl"}  # the old --torch_layouts


def selected_modes(use_torch: bool, modes: list[str], layouts: list[str] | None) -> list[str]:
    """The PyTorch modes to time: none without torch; the old --torch_layouts when given."""
    if not use_torch:
        return []
    return [LAYOUT_MODES[layout] for layout in layouts] if layouts else list(modes)


@dataclasses.dataclass
class Row:
    """One JAX variant on one model, with the PyTorch modes of the same run."""

    model: str
    what: str  # the JAX variant
    jax: float  # JAX images/s
    torch: dict[str, float]  # images/s per PyTorch mode
    flops: float  # analytic FLOPs per image
    xla_flops: float  # XLA's cost analysis, FLOPs per image
    peak: float  # measured float32 matmul peak, GFLOP/s

    def best(self) -> tuple[str | None, float]:
        """(name, images/s) of the fastest PyTorch mode; (None, 0) without PyTorch."""
        return max(self.torch.items(), key=lambda kv: kv[1], default=(None, 0.0))

    def ratio(self) -> float | None:
        """JAX images/s / the best PyTorch mode's; None without PyTorch."""
        return self.jax / self.best()[1] if self.torch else None

    def gflops(self, rate: float) -> float:
        """Achieved GFLOP/s at `rate` images/s (the analytic count)."""
        return self.flops * rate / 1e9

    def achieved(self, rate: float) -> str:
        """'G GFLOP/s (P% of peak)' at `rate` images/s."""
        return f"{self.gflops(rate):.1f} ({100 * self.gflops(rate) / self.peak:.1f}%)"

    def describe(self, peak_tflops: float | None = None) -> str:
        """Lines on the FLOP counts and the achieved GFLOP/s of JAX and the best PyTorch mode
        (with `peak_tflops`, also the utilisation of that nominal peak)."""
        head = f"{self.model:<6} jax {self.what:<18}"
        xla = (f"{self.xla_flops / 1e6:.1f} M (XLA/analytic {self.xla_flops / self.flops:.3f})"
               if self.xla_flops else "n/a (FFI calls are not analysed)")
        lines = [f"{head} FLOPs/img: analytic {self.flops / 1e6:.1f} M, XLA {xla}"]
        sides = [("jax " + self.what, self.jax)]
        if self.torch:
            best, best_rate = self.best()
            sides.append(("best " + best, best_rate))
        for name, rate in sides:
            nominal = (f", {100 * self.gflops(rate) / 1e3 / peak_tflops:.1f}% of "
                       f"{peak_tflops} TFLOP/s" if peak_tflops else "")
            lines.append(f"{self.model:<6} {name:<22} {rate:.1f} img/s = {self.gflops(rate):.1f} "
                         f"GFLOP/s, {100 * self.gflops(rate) / self.peak:.1f}% of the measured "
                         f"peak {self.peak:.1f}{nominal}")
        return "\n".join(lines)

    def result(self) -> dict:
        """The RESULT json fields."""
        best, best_rate = self.best()
        return {"model": self.model, "variant": self.what, "jax": self.jax, "torch": best_rate,
                "best_torch": best, "ratio": self.ratio(), "torch_modes": self.torch,
                "flops_analytic": self.flops, "flops_xla": self.xla_flops or None,
                "peak_gflops": self.peak, "jax_gflops": self.gflops(self.jax),
                "best_torch_gflops": self.gflops(best_rate)}


def summary(rows: list[Row]) -> str:
    """Markdown table: each row's JAX img/s, every PyTorch mode's, the ratio JAX / the best
    mode, the FLOPs per image (analytic, XLA's) and the achieved GFLOP/s (% of the peak)."""
    modes = list(dict.fromkeys(m for row in rows for m in row.torch))
    lines = ["| model | JAX | JAX img/s | " + "".join(f"{m} | " for m in modes)
             + "best PyTorch | ratio JAX/best | MFLOP/img analytic (XLA) | JAX GFLOP/s (% peak) "
             "| best PyTorch GFLOP/s (% peak) |",
             "|---|---|---:|" + "---:|" * len(modes) + "---|---:|---:|---:|---:|"]
    for row in rows:
        best, best_rate = row.best()
        cells = [row.model, row.what, f"{row.jax:.1f}"]
        cells += [f"{row.torch[m]:.1f}" if m in row.torch else "n/a" for m in modes]
        cells += [best or "n/a", f"{row.ratio():.2f}" if row.torch else "n/a",
                  f"{row.flops / 1e6:.1f} ("
                  + (f"{row.xla_flops / 1e6:.1f})" if row.xla_flops else "n/a)"),
                  row.achieved(row.jax),
                  row.achieved(best_rate) if row.torch else "n/a"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def define_torch_and_peak_flags() -> None:
    """The flags at_step.py and lipschitz.py share: PyTorch modes, compile cache, matmul peak."""
    from absl import flags

    flags.DEFINE_list("torch_modes", list(TORCH_MODES), "PyTorch modes to time (the ratio is "
                      "against the fastest): " + ", ".join(TORCH_MODES))
    flags.register_validator("torch_modes", lambda v: set(v) <= set(TORCH_MODES),
                             "--torch_modes: unknown mode")
    flags.DEFINE_list("torch_layouts", None, "old form of --torch_modes (overrides it): nchw = "
                      "torch_nchw, channels_last = torch_cl")
    flags.DEFINE_bool("torch_compile_cache", False, "time torch.compile with inductor's usual "
                      "caches (off: each compiled mode compiles in a fresh, empty cache)")
    flags.DEFINE_integer("peak_size", 4096, "matrix size of the float32 matmul peak "
                         "measurement")
    flags.DEFINE_integer("peak_repeats", 3, "timed matmuls of the peak measurement (best "
                         "reported)")
    flags.DEFINE_enum("malloc", "fixed", ["fixed", "glibc"], "glibc malloc's thresholds for "
                      "the process: fixed (speed_flags.FIXED_MALLOC, the same for both "
                      "frameworks) or glibc's moving defaults")
