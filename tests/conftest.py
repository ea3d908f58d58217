import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from jax_robust.speed_flags import append_speed_flags  # noqa: E402

# Two host devices: sharded code paths run in every test session (one CPU device is split).
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=2").strip()
append_speed_flags()

import jax  # noqa: E402

jax.config.update("jax_enable_x64", False)
