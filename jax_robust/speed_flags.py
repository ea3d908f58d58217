"""XLA flags that make this project's programs fast on CPU; import before JAX.

`append_speed_flags()` appends each flag to the user's XLA_FLAGS unless the user already set
that flag (their value wins). It must run before `jax` is first imported, which is why this
module imports nothing from JAX. Notebook users: call it in the first cell.

Flags (measured in BUILD_NOTES.md):
  --xla_cpu_experimental_ynn_fusion_type=-individual_convolution,-reduce
      -individual_convolution: jaxlib 0.10's YNNPACK fusion runs unpadded convolutions ~5x
      slower than Eigen on this CPU (speed only).
      -reduce: its YNNPACK reduce fusion MISCOMPILES a uint8 subtraction fused into a max over
      a non-minor axis (94% of entries wrong; tests/test_attacks.py checks the fix).
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
    scan): on the 2-core CPU two single-threaded devices ran it 1.7x faster than one device
    using XLA's intra-op threads (BUILD_NOTES.md). Only the CPU platform is affected.
    """
    flags_now = os.environ.get("XLA_FLAGS", "")
    if "xla_force_host_platform_device_count" not in flags_now:
        cores = (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                 else os.cpu_count() or 1)
        os.environ["XLA_FLAGS"] = (f"{flags_now} --xla_force_host_platform_device_count="
                                   f"{cores}").strip()
