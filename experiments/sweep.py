"""A grid of runs -> the paper's table (markdown, CSV) and a lipschitz vs. robustness plot.

    python experiments/sweep.py --workdir=runs/digits            # the paper's 10 rows
    python experiments/sweep.py --variants=official,paper --dataset=fashion_mnist --arch=cnn2

Each configuration runs in <workdir>/<name>; finished ones (results.json present) are
skipped and interrupted ones resume from their checkpoints, so re-running continues a sweep.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time

import cli  # noqa: F401  (sets XLA flags before jax is imported)
from absl import flags

from jax_robust import config as cfglib

FLAGS = flags.FLAGS
# The paper's rows: name -> (method, beta, lam)
PAPER_ROWS = {
    "natural": ("natural", None, None),
    "gr": ("gr", None, None),
    "llr": ("llr", None, None),
    "at": ("at", None, None),
    "rst0.5": ("rst", None, 0.5),
    "rst1": ("rst", None, 1.0),
    "rst2": ("rst", None, 2.0),
    "trades1": ("trades", 1.0, None),
    "trades3": ("trades", 3.0, None),
    "trades6": ("trades", 6.0, None),
}
flags.DEFINE_list("rows", list(PAPER_ROWS), f"rows to run, of {', '.join(PAPER_ROWS)}")
flags.DEFINE_list("variants", ["official"], "official and/or paper")
flags.DEFINE_list("dropouts", [""], "dropout rates to cross with the rows ('' = the arch's)")
flags.DEFINE_string("dataset", "digits", "data set")
flags.DEFINE_string("data_dir", None, "data directory")
flags.DEFINE_string("arch", "cnn1", "architecture")
flags.DEFINE_integer("epochs", None, "epochs (default: the data set's official number)")
flags.DEFINE_integer("seed", 0, "random seed")
flags.DEFINE_string("workdir", "runs/sweep", "root of the runs and the report")


def main(argv):
    del argv
    from jax_robust import report, train
    from jax_robust.errors import UserError

    unknown = [r for r in FLAGS.rows if r not in PAPER_ROWS]
    if unknown:
        raise UserError(f"unknown rows {unknown}; choose from {', '.join(PAPER_ROWS)}")
    grid = [(row, variant, dropout) for dropout in FLAGS.dropouts for row in FLAGS.rows
            for variant in FLAGS.variants]
    base = cfglib.RunConfig(
        data=cfglib.DataConfig(FLAGS.dataset, FLAGS.data_dir),
        model=cfglib.ModelConfig(FLAGS.arch),
        train=cfglib.TrainConfig(epochs=FLAGS.epochs, seed=FLAGS.seed),
    )
    from jax_robust import data as datalib

    dataset = datalib.load_dataset(FLAGS.dataset, FLAGS.data_dir)
    paths = []
    start = time.time()
    for i, (row, variant, dropout) in enumerate(grid):
        method, beta, lam = PAPER_ROWS[row]
        name = f"{row}-{variant}" + (f"-drop{dropout}" if dropout else "")
        workdir = os.path.join(FLAGS.workdir, name)
        result = os.path.join(workdir, "results.json")
        elapsed = time.time() - start
        print(f"[{i + 1}/{len(grid)}] {name} (sweep {elapsed:.0f}s"
              + (f", ETA {elapsed / i * (len(grid) - i):.0f}s)" if i else ")"), flush=True)
        if not os.path.exists(result):
            cfg = dataclasses.replace(
                base,
                model=dataclasses.replace(base.model,
                                          dropout=float(dropout) if dropout else None),
                train=dataclasses.replace(base.train, method=method, variant=variant,
                                          beta=beta, lam=lam))
            train.train_and_evaluate(cfg, workdir, dataset=dataset,
                                     log=lambda m: print("  " + m, flush=True))
        paths.append(result)
    results = report.load_results(paths)
    title = f"{FLAGS.dataset}, {FLAGS.arch}, eps {results[0]['eps']:g}"
    written = report.write_report(results, FLAGS.workdir, title)
    print(report.markdown_table(results))
    print("wrote " + ", ".join(written), file=sys.stderr)


if __name__ == "__main__":
    cli.run_main(main)
