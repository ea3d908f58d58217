"""Every test session: the CPU speed flags, two host devices (so sharded code paths run), and
one persistent XLA compilation cache shared by the session's processes: the subprocess tests
compile the same programs many times (saves about a quarter of their time; results are
those of the same executables)."""

import atexit
import os
import shutil
import tempfile

if "JAX_COMPILATION_CACHE_DIR" not in os.environ:  # before JAX is imported (below)
    _cache = tempfile.mkdtemp(prefix="jax_robust_tests_xla_cache_")
    atexit.register(shutil.rmtree, _cache, ignore_errors=True)
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")

import chex  # noqa: E402

from jax_robust.speed_flags import append_speed_flags  # noqa: E402

append_speed_flags()
chex.set_n_cpu_devices(2)

# The longest files first: with pytest-xdist's --dist=loadfile a worker takes a whole file, and a
# long file taken last leaves the other worker idle at the end.
FIRST = ("test_multiprocess.py", "test_multiprocess_batchnorm.py", "test_notebook.py",
         "test_variants.py", "test_scale.py", "test_reliability.py")


def pytest_collection_modifyitems(items):
    def rank(item):
        name = os.path.basename(str(item.fspath))
        return FIRST.index(name) if name in FIRST else len(FIRST)

    items.sort(key=rank)  # stable: the order within a file is kept
