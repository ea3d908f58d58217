"""speed_flags: the XLA flags appended without overriding the user's, and the benchmarks'
malloc thresholds (set in a subprocess: mallopt changes the whole process)."""

import os
import subprocess
import sys

from jax_robust import speed_flags


def test_the_users_xla_flag_value_wins(monkeypatch):
    monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_experimental_ynn_fusion_type=mine --other=1")
    value = speed_flags.append_speed_flags(("--xla_extra=2",))
    assert value.split() == ["--xla_cpu_experimental_ynn_fusion_type=mine", "--other=1",
                             "--xla_extra=2"]
    assert os.environ["XLA_FLAGS"] == value


def test_fix_malloc_sets_both_thresholds_unless_the_environment_chose():
    def run(env):
        code = "from jax_robust import speed_flags; print(speed_flags.fix_malloc())"
        out = subprocess.run([sys.executable, "-c", code], env={**os.environ, **env},
                             capture_output=True, text=True, timeout=60, check=True)
        return out.stdout.strip()

    assert run({}) == "malloc: M_TRIM_THRESHOLD=256 MB, M_MMAP_THRESHOLD=32 MB"
    assert "glibc's defaults" in run({"JAX_ROBUST_MALLOC": "glibc"})
    assert "environment" in run({"MALLOC_ARENA_MAX_": "2"})
