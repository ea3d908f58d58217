"""Speed of the Train-Train separation computation: ours (JAX) against scikit-learn and NumPy.

    python benchmarks/separation.py                  # first 8,000 Fashion-MNIST train points
    python benchmarks/separation.py --n=20000
    python benchmarks/separation.py --full           # all 60,000 x 60,000 x 784

Every method answers the same question on the same data, train-train: for each of the first
`--n` training points, the l_inf distance to the closest of the same `--n` points with another
label. Methods:
  jax_uint8  separation.nearest_other_label_distance on uint8 grey levels (exact integers)
  jax_float  the same on float32 pixel values in [0, 1]
  sklearn    NearestNeighbors(n_neighbors=1, metric="chebyshev"), one index per class fitted on
             X[y != c] and queried with X[y == c], as the official notebook (float64 pixels)
  numpy      chunked brute force in uint8, max(a, b) - min(a, b), then max and a masked min
Throughput is reported as pair-dims/s = n_query * n_ref * D / seconds, the same nominal work for
every method, so ratios of pair-dims/s are ratios of time. Baselines too slow for the full size
run on the first --baseline_queries query points (all reference points) and are extrapolated
linearly in the number of queries; their line says so. JAX compile time is measured apart (one
warm-up call of the same shapes) and reported, not included. The machine's load average is
printed before and after: the machine may be shared, compare ratios from one run.
"""

from __future__ import annotations

import datetime
import os
import platform
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "experiments"))

import cli  # noqa: E402,F401  (sets XLA flags before jax is imported)
from absl import flags  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("dataset", "fashion_mnist", "data set (see jax_robust.data)")
flags.DEFINE_string("data_dir", None, "directory of the data set's files")
flags.DEFINE_integer("n", 8000, "train-train on the first n training points")
flags.DEFINE_bool("full", False, "the whole training set (overrides --n)")
flags.DEFINE_list("methods", ["jax_uint8", "jax_float", "sklearn", "numpy"], "methods to time")
flags.DEFINE_integer("baseline_queries", None, "time sklearn/numpy on only this many queries "
                     "and extrapolate (default: all for --n, 1000 with --full)")
flags.DEFINE_integer("query_block", None, "Tiling.query_block (default: the library's)")
flags.DEFINE_integer("ref_block", None, "Tiling.ref_block")
flags.DEFINE_integer("dim_chunk", None, "Tiling.dim_chunk")
flags.DEFINE_integer("blocks_per_call", None, "Tiling.blocks_per_call")


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
        return " ".join(open("/proc/loadavg").read().split()[:3])
    except OSError:
        return "n/a"


def sklearn_other_label(x_query, y_query, x_ref, y_ref):
    """The official notebook's method: one Chebyshev 1-NN index per class on X[y != c]."""
    from sklearn.neighbors import NearestNeighbors
    import numpy as np

    dist = np.full(len(x_query), np.inf)
    for c in np.unique(y_query):
        others = y_ref != c
        mine = y_query == c
        nn = NearestNeighbors(n_neighbors=1, metric="chebyshev").fit(x_ref[others])
        dist[mine] = nn.kneighbors(x_query[mine], return_distance=True)[0][:, 0]
    return dist


def numpy_other_label(x_query, y_query, x_ref, y_ref, query_chunk=16, ref_chunk=4096):
    """Chunked uint8 brute force; exact grey levels; excludes the point with the same index."""
    import numpy as np

    nq, d = x_query.shape
    out = np.full(nq, np.iinfo(np.int32).max, np.int64)
    buf_max = np.empty((query_chunk, ref_chunk, d), np.uint8)
    buf_min = np.empty_like(buf_max)
    for qlo in range(0, nq, query_chunk):
        q = x_query[qlo:qlo + query_chunk, None, :]
        nqc = len(q)
        for rlo in range(0, len(x_ref), ref_chunk):
            r = x_ref[None, rlo:rlo + ref_chunk, :]
            nrc = r.shape[1]
            hi, lo = buf_max[:nqc, :nrc], buf_min[:nqc, :nrc]
            np.maximum(q, r, out=hi)
            np.minimum(q, r, out=lo)
            np.subtract(hi, lo, out=hi)
            dist = hi.max(axis=2).astype(np.int64)
            same = y_query[qlo:qlo + nqc, None] == y_ref[None, rlo:rlo + nrc]
            rows = np.arange(qlo, qlo + nqc)
            same |= rows[:, None] == np.arange(rlo, rlo + nrc)[None, :]
            dist[same] = np.iinfo(np.int32).max
            out[qlo:qlo + nqc] = np.minimum(out[qlo:qlo + nqc], dist.min(axis=1))
    return out


def main(argv):
    del argv
    import numpy as np

    import jax
    from jax_robust import data, separation
    from jax_robust.errors import UserError

    unknown = set(FLAGS.methods) - {"jax_uint8", "jax_float", "sklearn", "numpy"}
    if unknown:
        raise UserError(f"unknown methods {sorted(unknown)}")
    ds = data.load_dataset(FLAGS.dataset, FLAGS.data_dir)
    n = len(ds.y_train) if FLAGS.full else min(FLAGS.n, len(ds.y_train))
    x_u8 = ds.as_uint8("train").reshape(len(ds.y_train), -1)[:n]
    y = ds.y_train[:n]
    levels, dims = ds.info.levels, x_u8.shape[1]
    nominal = n * n * dims
    base_q = FLAGS.baseline_queries or (1000 if FLAGS.full else n)
    base_q = min(base_q, n)
    defaults = separation.Tiling()
    tiling = separation.Tiling(
        FLAGS.query_block or defaults.query_block, FLAGS.ref_block or defaults.ref_block,
        FLAGS.dim_chunk or defaults.dim_chunk, FLAGS.blocks_per_call or defaults.blocks_per_call)

    print(f"date {datetime.datetime.now().isoformat(timespec='seconds')}; CPU {cpu_model()}, "
          f"{os.cpu_count()} cores; jax {jax.__version__}, devices {jax.devices()}")
    print(f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}")
    print(f"{FLAGS.dataset} train-train: n = {n} queries x {n} references x D = {dims}: "
          f"{nominal:.3g} pair-dims; {tiling}; load average {load_average()}")
    sys.stdout.flush()

    results = {}  # method -> (seconds for the full problem, extrapolated?)
    reference = None  # grey-level distances of the first method that covers all queries

    def record(name, seconds, n_timed, dist_levels):
        nonlocal reference
        full_seconds = seconds * n / n_timed
        results[name] = (full_seconds, n_timed < n)
        if reference is not None:
            agree = np.array_equal(np.asarray(dist_levels), reference[:n_timed])
        else:
            agree = None
            if n_timed == n:
                reference = np.asarray(dist_levels)
        note = (f" (timed on {n_timed} queries, extrapolated x{n / n_timed:.1f})"
                if n_timed < n else "")
        print(f"{name:<10} {full_seconds:9.2f} s  {nominal / full_seconds:9.3g} pair-dims/s"
              f"{note}{'' if agree is None else '  same distances: ' + str(agree)}")
        sys.stdout.flush()

    for method in FLAGS.methods:
        if method in ("jax_uint8", "jax_float"):
            x = x_u8 if method == "jax_uint8" else (x_u8.astype(np.float32) / levels)
            chunk = jax.device_count() * tiling.blocks_per_call * tiling.query_block
            t = time.perf_counter()  # warm-up: one call of the same shapes compiles it
            separation.nearest_other_label_distance(x[:chunk], y[:chunk], x, y,
                                                    exclude_self=True, tiling=tiling)
            warm = time.perf_counter() - t
            t = time.perf_counter()
            d, _ = separation.nearest_other_label_distance(
                x, y, x, y, exclude_self=True, tiling=tiling,
                progress=separation.stderr_progress(method, 30.0))
            seconds = time.perf_counter() - t
            print(f"{method:<10} (compile + first call of {min(chunk, n)} queries: {warm:.1f} s)")
            record(method, seconds, n, d if method == "jax_uint8" else np.rint(d * levels))
        elif method == "sklearn":
            xf = x_u8.astype(np.float64) / levels
            t = time.perf_counter()
            d = sklearn_other_label(xf[:base_q], y[:base_q], xf, y)
            record(method, time.perf_counter() - t, base_q, np.rint(d * levels))
        elif method == "numpy":
            t = time.perf_counter()
            d = numpy_other_label(x_u8[:base_q], y[:base_q], x_u8, y)
            record(method, time.perf_counter() - t, base_q, d)

    print(f"load average after: {load_average()}")
    for base in ("sklearn", "numpy"):
        if base not in results:
            continue
        for name in ("jax_uint8", "jax_float"):
            if name in results:
                ratio = results[base][0] / results[name][0]
                extra = " (baseline extrapolated)" if results[base][1] else ""
                print(f"ratio {name} vs {base}: {ratio:.1f}x faster{extra}")


if __name__ == "__main__":
    cli.run_main(main)
