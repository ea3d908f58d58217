"""Every test session: the CPU speed flags and two host devices, so sharded code paths run."""

import chex

from jax_robust.speed_flags import append_speed_flags

append_speed_flags()
chex.set_n_cpu_devices(2)
