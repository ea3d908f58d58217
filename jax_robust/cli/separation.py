"""Separation of real data (the paper's Table 1) and the provably astute distance classifier.

    python experiments/separation.py --dataset=digits
    python experiments/separation.py --dataset=fashion_mnist --workdir=runs/sep_fmnist
    python experiments/separation.py --dataset=fashion_mnist --max_points=5000   # quick look

Computes, exactly in integer grey levels, the l_inf distance from every training point to the
closest training point of another label (Train-Train) and from every test point to the closest
training point of another label (Test-Train), and the theorem's distance classifier
g(x) = argmin_c dist(x, X_train^(c)) with its certified radius. Prints a summary and writes
<workdir>/separation.json, separation_hist.png and closest_pairs.png. Over several processes
(--coordinator_address ..., or experiments/launch_local.py) the work is split over every
process's devices and process 0 writes the files.
"""

from __future__ import annotations

import os
import sys
import time

from absl import flags

from jax_robust.cli import common as cli
from jax_robust.files import (ensure_writable_dir, save_arrays_atomic, save_figure_atomic,
                              write_json_atomic)
from jax_robust.speed_flags import append_speed_flags, one_host_device_per_core

FLAGS = flags.FLAGS
flags.DEFINE_string("dataset", "digits", "digits, fashion_mnist, mnist, cifar10 or svhn")
flags.DEFINE_string("data_dir", None, "directory of the data set's files (IDX or TFDS)")
flags.DEFINE_string("workdir", None, "output directory (default runs/separation_<dataset>)")
flags.DEFINE_integer("max_points", None, "use only the first N training and N test points")
flags.DEFINE_float("eps", None, "l_inf radius in pixel units (default: the data set's)")
flags.DEFINE_integer("n_closest", 10, "closest opposite-label pairs to list and draw")
flags.DEFINE_bool("progress", True, "progress lines on stderr")
flags.DEFINE_bool("save_arrays", False, "also write every point's distance and index "
                  "(grey levels; -1: no point) to <workdir>/separation_arrays.npz")
cli.define_process_flags()
flags.DEFINE_bool("train_classifier", False, "also the distance classifier's leave-one-out "
                  "accuracy on the training set (per-class train-train distances: 2x the work)")

CLASS_NAMES = {  # short names for the pair figure
    "fashion_mnist": ("tshirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt",
                      "sneaker", "bag", "boot"),
    "cifar10": ("plane", "car", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"),
}
PAPER = {  # docs/paper.md section 4 (Table 1): min Train-Train, min Test-Train
    "mnist": (0.737, 0.812), "cifar10": (0.212, 0.220), "svhn": (0.094, 0.110),
}


def plot_histograms(tt_px, te_px, eps, dataset, path) -> None:
    """20 bins on [0, 1], weights 1/n (the official notebook), dashed lines at min and 2 eps."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6), sharey=True)
    for ax, d, title in ((axes[0], tt_px, "Train-Train"), (axes[1], te_px, "Test-Train")):
        ax.hist(d, bins=20, range=(0, 1), weights=np.full(len(d), 1 / len(d)),
                color="tab:blue", edgecolor="white")
        ax.axvline(2 * eps, color="tab:red", ls="--", label=f"2 eps = {2 * eps:g}")
        ax.axvline(d.min(), color="black", ls="--", label=f"min = {d.min():.3f}")
        ax.set_title(f"{dataset}: {title} (n = {len(d)})")
        ax.set_xlabel("l_inf distance to the closest point of another label")
        ax.set_xlim(0, 1)
        ax.legend(loc="upper left", fontsize=8)
    axes[0].set_ylabel("fraction of points")
    save_figure_atomic(fig, path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def plot_closest_pairs(rows, image_shape, class_names, path) -> None:
    """rows: [(title, closest-pairs list, query images, reference images)]; one column a pair.

    Images are float [N, H, W, C] in [0, 1]; class_names: label -> name, or None.
    """
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    n_cols = max(len(r[1]) for r in rows)
    fig, axes = plt.subplots(2 * len(rows), n_cols, figsize=(1.25 * n_cols, 3.3 * len(rows)),
                             squeeze=False)
    h, w, c = image_shape
    for r, (title, pairs, xq, xr) in enumerate(rows):
        for k in range(n_cols):
            top, bottom = axes[2 * r, k], axes[2 * r + 1, k]
            for ax in (top, bottom):
                ax.set_xticks([])
                ax.set_yticks([])
            if k >= len(pairs):
                top.axis("off")
                bottom.axis("off")
                continue
            p = pairs[k]
            for ax, img, idx, label in ((top, xq[p["query_index"]], p["query_index"],
                                         p["query_label"]),
                                        (bottom, xr[p["ref_index"]], p["ref_index"],
                                         p["ref_label"])):
                img = np.asarray(img, np.float32).reshape(h, w, c)
                ax.imshow(img[..., 0] if c == 1 else img, cmap="gray", vmin=0, vmax=1,
                          interpolation="nearest")
                name = f" {class_names[label]}" if class_names else ""
                ax.set_xlabel(f"#{idx} y={label}{name}", fontsize=7)
            top.set_title(f"d={p['distance']:.3f}", fontsize=8)
        axes[2 * r, 0].set_ylabel(f"{title}\nquery", fontsize=8)
        axes[2 * r + 1, 0].set_ylabel("nearest other\nlabel (train)", fontsize=8)
    fig.suptitle("Closest opposite-label pairs (l_inf distance in pixel units)", fontsize=10)
    fig.tight_layout()
    save_figure_atomic(fig, path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def measure(ds, eps: float, n_closest: int, train_classifier: bool, progress,
            should_stop=None) -> tuple:
    """Distances, statistics and the distance classifier for one data set. `should_stop`:
    polled between the scans' jitted calls (errors.Interrupted when true).

    Returns (result dict for separation.json, (train-train dist, index), (test-train dist,
    index)), distances in grey levels.
    """
    import jax

    from jax_robust import separation

    info = ds.info
    x_train = ds.as_uint8("train").reshape(len(ds.y_train), -1)
    x_test = ds.as_uint8("test").reshape(len(ds.y_test), -1)
    y_train, y_test, levels, n_cls = ds.y_train, ds.y_test, info.levels, info.num_classes

    t0 = time.monotonic()
    tt_d, tt_i = separation.train_train_distance(x_train, y_train, num_classes=n_cls,
                                                 progress=progress("train-train"),
                                                 should_stop=should_stop)
    t1 = time.monotonic()
    te_cd, te_ci = separation.class_nearest(x_test, x_train, y_train, n_cls,
                                            progress=progress("test-train"),
                                            should_stop=should_stop)
    t2 = time.monotonic()
    te_d, te_i = separation.other_label_from_class_nearest(te_cd, te_ci, y_test)
    classifier = {
        "rule": "g(x) = argmin_c dist(x, X_train^(c)); certified at eps iff correct and "
                "(second-smallest - smallest class distance) / 2 > eps (strict)",
        "test": separation.certified_accuracy(te_cd, y_test, eps, levels),
    }
    if train_classifier:
        tt_cd, _ = separation.class_nearest(x_train, x_train, y_train, n_cls, exclude_self=True,
                                            progress=progress("train leave-one-out"),
                                            should_stop=should_stop)
        classifier["train_leave_one_out"] = separation.certified_accuracy(tt_cd, y_train, eps,
                                                                          levels)
    dims = x_train.shape[1]
    result = {
        "dataset": info.name,
        "levels": levels,
        "eps": eps,
        "n_train": len(y_train),
        "n_test": len(y_test),
        "distance": "l_inf, pixel units (grey levels / levels); exact integer arithmetic",
        "train_train": separation.separation_summary(tt_d, tt_i, y_train, y_train, levels, eps,
                                                     n_closest, symmetric=True),
        "test_train": separation.separation_summary(te_d, te_i, y_test, y_train, levels, eps,
                                                    n_closest),
        "classifier": classifier,
        "paper": dict(zip(("min_train_train", "min_test_train"), PAPER[info.name]))
        if info.name in PAPER else None,
        "seconds": {"train_train": t1 - t0, "test_train": t2 - t1},
        "devices": [str(d) for d in jax.devices()],
        "pair_dims_per_s": {  # nominal: all N_query x N_train pairs, as brute force
            "train_train": len(y_train) ** 2 * dims / max(t1 - t0, 1e-9),
            "test_train": len(y_test) * len(y_train) * dims / max(t2 - t1, 1e-9),
        },
    }
    return result, (tt_d, tt_i), (te_d, te_i)


def print_summary(result: dict, path: str) -> None:
    tt, te, clf = result["train_train"], result["test_train"], result["classifier"]["test"]
    eps = result["eps"]
    print(f"{result['dataset']}: {result['n_train']} train, {result['n_test']} test, "
          f"eps = {eps:g} (2 eps = {2 * eps:g}), levels = {result['levels']}")
    print("split        min    q0.001  q0.01   q0.1    q0.5    mean    n<2eps")
    for name, s in (("Train-Train", tt), ("Test-Train", te)):
        print(f"{name:<12} {s['min']:.4f} {s['q0.001']:.4f}  {s['q0.01']:.4f}  {s['q0.1']:.4f}"
              f"  {s['q0.5']:.4f}  {s['mean']:.4f}  {s['n_below_2eps']}")
    if result["paper"]:
        print(f"paper: min Train-Train {result['paper']['min_train_train']}, "
              f"min Test-Train {result['paper']['min_test_train']}")
    print(f"distance classifier: test accuracy {clf['accuracy']:.4f}, certified astuteness at "
          f"eps = {eps:g}: {clf['certified_astuteness']:.4f} ({clf['at_boundary']} at the "
          "boundary)")
    seconds = result["seconds"]
    print(f"time: train-train {seconds['train_train']:.1f} s, test-train "
          f"{seconds['test_train']:.1f} s; wrote {path}")
    sys.stdout.flush()


def main(argv):
    from jax_robust import data, recipes, separation
    from jax_robust.errors import Interrupted, UserError

    if len(argv) > 1:
        raise UserError(f"unexpected arguments: {' '.join(argv[1:])}")
    if FLAGS.eps is not None and not 0 < FLAGS.eps <= 1:
        raise UserError(f"--eps must be in (0, 1] (pixel units), got {FLAGS.eps}")
    if FLAGS.max_points is not None and FLAGS.max_points < 1:
        raise UserError(f"--max_points must be >= 1, got {FLAGS.max_points}")
    if FLAGS.n_closest < 1:
        raise UserError(f"--n_closest must be >= 1, got {FLAGS.n_closest}")
    cli.join_processes()
    from jax_robust import distributed

    ds = data.load_dataset(FLAGS.dataset, FLAGS.data_dir, FLAGS.max_points, FLAGS.max_points)
    if len(set(ds.y_train.tolist())) < 2:
        raise UserError("the training points hold fewer than two classes; raise --max_points")
    info = ds.info
    workdir = os.path.expanduser(FLAGS.workdir
                                 or os.path.join("runs", f"separation_{info.name}"))
    ensure_writable_dir(workdir)

    def progress(label):
        if FLAGS.progress and distributed.is_primary():
            return separation.stderr_progress(f"{info.name} {label}")
        return None

    eps = FLAGS.eps if FLAGS.eps is not None else recipes.recipe(info.name).eps
    try:
        result, (tt_d, tt_i), (te_d, te_i) = measure(ds, eps, FLAGS.n_closest,
                                                     FLAGS.train_classifier, progress,
                                                     cli.stop_requests())
    except Interrupted as e:
        if distributed.is_primary():
            sys.stderr.write(f"{e}\n")
        sys.exit(130)
    json_path = os.path.join(workdir, "separation.json")
    if not distributed.is_primary():
        return
    if FLAGS.save_arrays:
        save_arrays_atomic(os.path.join(workdir, "separation_arrays.npz"),
                           train_train_dist=tt_d, train_train_index=tt_i, test_train_dist=te_d,
                           test_train_index=te_i)
    write_json_atomic(json_path, result)
    plot_histograms(tt_d[tt_i >= 0] / info.levels, te_d[te_i >= 0] / info.levels, eps, info.name,
                    os.path.join(workdir, "separation_hist.png"))
    plot_closest_pairs(
        [("Train-Train", result["train_train"]["closest"], ds.x_train, ds.x_train),
         ("Test-Train", result["test_train"]["closest"], ds.x_test, ds.x_train)],
        info.image_shape, CLASS_NAMES.get(info.name), os.path.join(workdir, "closest_pairs.png"))
    print_summary(result, json_path)


def set_xla_flags() -> None:
    """One single-threaded CPU device per core (the scan shards over devices), speed flags."""
    one_host_device_per_core()
    append_speed_flags()


def entry() -> None:
    cli.run_main(main, before_jax=set_xla_flags)


if __name__ == "__main__":
    entry()
