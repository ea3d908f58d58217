"""XLA flags that make this project's programs fast (and correct) on CPU.

`append_speed_flags()` appends each flag to the user's XLA_FLAGS unless the user already set
that flag (their value wins). XLA reads XLA_FLAGS when JAX starts its first backend (the
first computation or `jax.devices()`), so call it before that: each binary in experiments/
calls it first thing; notebook users call it in the first cell. This module imports no JAX.

Flags (measured in BUILD_NOTES.md):
  --xla_cpu_experimental_ynn_fusion_type=-individual_convolution,-reduce
      -individual_convolution: jaxlib 0.10's YNNPACK fusion runs unpadded convolutions much
      slower than the Eigen path (speed only).
      -reduce: its YNNPACK reduce fusion MISCOMPILES a uint8 subtraction fused into a max over
      a non-minor axis (most entries wrong; tests/test_attacks.py checks the fix).
"""

from __future__ import annotations

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
    threads (BUILD_NOTES.md). Only the CPU platform is affected.
    """
    flags_now = os.environ.get("XLA_FLAGS", "")
    if "xla_force_host_platform_device_count" not in flags_now:
        cores = (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                 else os.cpu_count() or 1)
        os.environ["XLA_FLAGS"] = (f"{flags_now} --xla_force_host_platform_device_count="
                                   f"{cores}").strip()
