"""XLA flags that make this project's programs fast (and correct) on CPU.

`append_speed_flags()` appends each flag to the user's XLA_FLAGS unless the user already set
that flag (their value wins). XLA reads XLA_FLAGS when JAX starts its first backend (the
first computation or `jax.devices()`), so call it before that: each binary in experiments/
calls it first thing; notebook users call it in the first cell. This module imports no JAX.

Flags (measured in docs/performance.md):
  --xla_cpu_experimental_ynn_fusion_type=-individual_convolution,-reduce
      -individual_convolution: jaxlib 0.10's YNNPACK fusion runs unpadded convolutions much
      slower than the Eigen path (speed only).
      -reduce: its YNNPACK reduce fusion MISCOMPILES a uint8 subtraction fused into a max over
      a non-minor axis (most entries wrong; tests/test_attacks.py checks the fix).
"""

from __future__ import annotations

import ctypes
import os

CPU_SPEED_FLAGS = ("--xla_cpu_experimental_ynn_fusion_type=-individual_convolution,-reduce",)


def append_speed_flags(extra: tuple[str, ...] = ()) -> str:
    """Appends CPU_SPEED_FLAGS (and `extra`) to $XLA_FLAGS; returns the new value."""
    current = os.environ.get("XLA_FLAGS", "")
    names = {f.split("=", 1)[0] for f in current.split()}
    added = [f for f in CPU_SPEED_FLAGS + tuple(extra) if f.split("=", 1)[0] not in names]
    value = " ".join([current] + added).strip()
    os.environ["XLA_FLAGS"] = value
    return value


def one_host_device_per_core() -> None:
    """One XLA:CPU device per core, unless XLA_FLAGS already says how many (before jax).

    For work sharded over devices without collectives in its inner loop (the separation
    scan), where single-threaded devices, one per core, beat one device using XLA's intra-op
    threads (docs/design.md, section 7). Only the CPU platform is affected.
    """
    flags_now = os.environ.get("XLA_FLAGS", "")
    if "xla_force_host_platform_device_count" not in flags_now:
        cores = (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                 else os.cpu_count() or 1)
        os.environ["XLA_FLAGS"] = (f"{flags_now} --xla_force_host_platform_device_count="
                                   f"{cores}").strip()


# glibc's malloc thresholds for a process of this project: blocks up to 32 MB from the heap
# (not a fresh mmap each, whose pages fault in anew at every step) and a 256 MB trim
# threshold. glibc's defaults move the mmap threshold up as mmapped blocks are freed, so the
# page faults a step takes depend on what was freed before it. Measured (docs/history.md,
# session 9): the benchmarks' JAX AT step +3-9%; PyTorch timed in the same process 10-15%
# faster and no longer dependent on the JAX program beside it. The benchmarks set it; the
# binaries do not (a digits and a Fashion-MNIST run trained in the same seconds either way).
FIXED_MALLOC = {"M_TRIM_THRESHOLD": (-1, 256 << 20), "M_MMAP_THRESHOLD": (-3, 32 << 20)}


def fix_malloc() -> str:
    """Sets FIXED_MALLOC with glibc's mallopt for this process, unless JAX_ROBUST_MALLOC=glibc
    or the user set a MALLOC_*_ variable; returns what malloc runs with, for a log line."""
    if os.environ.get("JAX_ROBUST_MALLOC") == "glibc" or any(
            k.startswith("MALLOC_") and k.endswith("_") for k in os.environ):
        return "malloc: glibc's defaults or the environment's"
    try:
        libc = ctypes.CDLL("libc.so.6")
        ok = all(libc.mallopt(code, value) == 1 for code, value in FIXED_MALLOC.values())
    except (OSError, AttributeError):
        ok = False
    if not ok:
        return "malloc: glibc's defaults (mallopt unavailable)"
    return "malloc: " + ", ".join(f"{k}={v >> 20} MB" for k, (_, v) in FIXED_MALLOC.items())
