"""The paper's tables and plots from the runs under a directory (results.json, metrics.jsonl).

    python experiments/report.py --workdir=runs/digits
    python experiments/report.py --workdir=docs/results_digits --out=/tmp/report

Writes table.md, table.csv, lipschitz_vs_robustness.png, gaps.png and, where the runs allow,
dropout.png and learning_curves.png to --out (default: --workdir); prints the table.
"""

from __future__ import annotations

import os
import sys

from absl import flags

from jax_robust.cli import common as cli

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "directory searched (recursively) for results.json")
flags.DEFINE_string("out", None, "where the tables and plots go (default: --workdir)")
flags.DEFINE_string("title", "", "title of the tables and plots (default: data set, arch, eps)")


def main(argv):
    from jax_robust import report
    from jax_robust.errors import UserError

    if len(argv) > 1:
        raise UserError(f"unexpected arguments {argv[1:]}")
    workdir = os.path.expanduser(FLAGS.workdir or "")
    if not FLAGS.workdir or not os.path.isdir(workdir):
        raise UserError(f"--workdir {FLAGS.workdir} is not a directory")
    out = os.path.expanduser(FLAGS.out or FLAGS.workdir)
    runs = report.load_runs(workdir)  # a file it cannot report: one warning line, skipped
    if not runs:
        raise UserError(f"no results.json to report under {workdir}")
    try:
        written = report.write_report(runs, out, FLAGS.title)
    except OSError as e:
        raise UserError(f"cannot write the report to {out}: {e.strerror}") from None
    with open(written[0]) as f:
        print(f.read())
    print("wrote " + ", ".join(written), file=sys.stderr)


def entry() -> None:
    cli.run_main(main, before_jax=lambda: None)


if __name__ == "__main__":
    entry()
