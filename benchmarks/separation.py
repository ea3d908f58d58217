"""Speed of the Train-Train separation computation: ours (JAX) against scikit-learn and NumPy.

    python benchmarks/separation.py                  # first 8,000 Fashion-MNIST train points
    python benchmarks/separation.py --n=20000
    python benchmarks/separation.py --full           # all 60,000 x 60,000 x 784

Every method answers the same question on the same data, train-train: for each of the first
`--n` training points, the l_inf distance to the closest of the same `--n` points with another
label. Methods:
  jax_uint8      separation.train_train_distance on uint8 grey levels (exact integers): each
                 pair of points with different labels computed once (what experiments/ uses)
  jax_uint8_qxr  separation.nearest_other_label_distance(x, y, x, y, exclude_self=True): all
                 queries x all references, the general function
  jax_float      separation.train_train_distance on float32 pixel values in [0, 1]
  sklearn        NearestNeighbors(n_neighbors=1, metric="chebyshev"), one index per class
                 fitted on X[y != c] and queried with X[y == c], as the official notebook
                 (float64 pixels)
  numpy          chunked brute force in uint8, max(a, b) - min(a, b), then max and a masked min
Throughput is pair-dims/s = n_query * n_ref * D / seconds, the same nominal work for every
method (train_train_distance does less than half of it), so ratios of pair-dims/s are ratios of
time. JAX times include jit compilation (about 1 s) and host-device copies; sklearn's include
fitting its indices. Baselines too slow for the full size (sklearn and numpy, with --full) run
on the first --baseline_queries query points against all reference points and are
extrapolated linearly in the number of queries; their line says so. Each line also gives the
process CPU time (all threads) and the 1-minute load average: on a shared machine wall-time
ratios drift with the load, CPU-time ratios much less.
"""

from __future__ import annotations

import datetime
import os
import sys
import time

from jax_robust.speed_flags import one_host_device_per_core  # imports no JAX

one_host_device_per_core()

import bench_util  # noqa: E402
from absl import flags  # noqa: E402
from jax_robust.cli import common as cli  # noqa: E402  (run_main sets the speed flags before JAX starts)

FLAGS = flags.FLAGS
flags.DEFINE_string("dataset", "fashion_mnist", "data set (see jax_robust.data)")
flags.DEFINE_string("data_dir", None, "directory of the data set's files")
flags.DEFINE_integer("n", 8000, "train-train on the first n training points")
flags.DEFINE_bool("full", False, "the whole training set (overrides --n)")
METHODS = ("jax_uint8", "jax_uint8_qxr", "jax_float", "sklearn", "numpy")
flags.DEFINE_list("methods", list(METHODS), "methods to time, in this order")
flags.DEFINE_integer("baseline_queries", None, "time sklearn and numpy on only this many "
                     "queries and extrapolate (default: all; 2048 with --full)")
flags.DEFINE_integer("query_block", None, "Tiling.query_block (default: the library's, per "
                     "dtype)")
flags.DEFINE_integer("ref_block", None, "Tiling.ref_block")
flags.DEFINE_integer("dim_chunk", None, "Tiling.dim_chunk")
flags.DEFINE_integer("blocks_per_call", None, "Tiling.blocks_per_call")


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

    unknown = set(FLAGS.methods) - set(METHODS)
    if unknown:
        raise UserError(f"unknown methods {sorted(unknown)}")
    ds = data.load_dataset(FLAGS.dataset, FLAGS.data_dir)
    n = len(ds.y_train) if FLAGS.full else min(FLAGS.n, len(ds.y_train))
    x_u8 = ds.as_uint8("train").reshape(len(ds.y_train), -1)[:n]
    y = ds.y_train[:n]
    levels, dims = ds.info.levels, x_u8.shape[1]
    nominal = n * n * dims
    base_q = FLAGS.baseline_queries or (2048 if FLAGS.full else n)
    base_q = min(base_q, n)
    tiling = separation.Tiling(FLAGS.query_block, FLAGS.ref_block, FLAGS.dim_chunk,
                               FLAGS.blocks_per_call)  # None: the library's default per dtype

    print(f"date {datetime.datetime.now().isoformat(timespec='seconds')}; "
          f"CPU {bench_util.cpu_model()}, "
          f"{os.cpu_count()} cores; jax {jax.__version__}, devices {jax.devices()}")
    print(f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}")
    print(f"{FLAGS.dataset} train-train: n = {n} queries x {n} references x D = {dims}: "
          f"{nominal:.3g} pair-dims; load average {bench_util.load_average()}")
    print(f"tiling {tiling}; defaults {separation.DEFAULT_TILING}")
    sys.stdout.flush()

    results = {}  # method -> (wall s, CPU s for the full problem, extrapolated?)
    reference = None  # grey-level distances of the first method timed

    def record(name, seconds, cpu_seconds, n_timed, dist_levels):
        nonlocal reference
        full_seconds = seconds * n / n_timed
        full_cpu = cpu_seconds * n / n_timed
        results[name] = (full_seconds, full_cpu, n_timed < n)
        dist_levels = np.asarray(dist_levels).astype(np.int64)
        agree = None
        if reference is None:
            reference = dist_levels
        else:
            common = min(len(reference), len(dist_levels))
            agree = np.array_equal(dist_levels[:common], reference[:common])
        note = (f" (timed on {n_timed} queries, extrapolated x{n / n_timed:.1f})"
                if n_timed < n else "")
        print(f"{name:<13} {full_seconds:9.2f} s  {nominal / full_seconds:9.3g} pair-dims/s  "
              f"(CPU {full_cpu:8.1f} s, load {bench_util.load_average().split()[0]})"
              f"{note}{'' if agree is None else '  same distances: ' + str(agree)}")
        sys.stdout.flush()

    for method in FLAGS.methods:
        if method.startswith("jax"):
            x = (x_u8.astype(np.float32) / levels) if method == "jax_float" else x_u8
            report = separation.stderr_progress(method, 30.0)
            t, c = time.perf_counter(), time.process_time()
            if method == "jax_uint8_qxr":
                d, _ = separation.nearest_other_label_distance(
                    x, y, x, y, exclude_self=True, tiling=tiling, progress=report)
            else:
                d, _ = separation.train_train_distance(x, y, tiling=tiling, progress=report)
            record(method, time.perf_counter() - t, time.process_time() - c, n,
                   d if x.dtype == np.uint8 else np.rint(d * levels))
        elif method == "sklearn":
            xf = x_u8.astype(np.float64) / levels
            t, c = time.perf_counter(), time.process_time()
            d = sklearn_other_label(xf[:base_q], y[:base_q], xf, y)
            record(method, time.perf_counter() - t, time.process_time() - c, base_q,
                   np.rint(d * levels))
        elif method == "numpy":
            t, c = time.perf_counter(), time.process_time()
            d = numpy_other_label(x_u8[:base_q], y[:base_q], x_u8, y)
            record(method, time.perf_counter() - t, time.process_time() - c, base_q, d)

    print(f"load average after: {bench_util.load_average()}")
    for base in ("sklearn", "numpy"):
        if base not in results:
            continue
        for name in ("jax_uint8", "jax_uint8_qxr", "jax_float"):
            if name in results:
                wall = results[base][0] / results[name][0]
                cpu = results[base][1] / results[name][1]
                extra = " (baseline extrapolated)" if results[base][2] else ""
                print(f"ratio {name} vs {base}: {wall:.1f}x faster in wall time, {cpu:.1f}x in "
                      f"CPU time{extra}")


if __name__ == "__main__":
    cli.run_main(main)
