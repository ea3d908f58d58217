"""Train and evaluate one configuration; prints the paper's row and writes results.json.

    python experiments/run.py --method=rst --lam=2
    python experiments/run.py --method=trades --beta=6 --dataset=fashion_mnist --arch=cnn2

Re-running with the same --workdir resumes from its newest checkpoint. Several processes (one
per host) form one run with --coordinator_address/--num_processes/--process_id or
--distributed (README, "Many hosts"); experiments/launch_local.py starts them on one machine.
"""

from __future__ import annotations

import os
import sys

from absl import flags

from jax_robust.cli import common as cli
from jax_robust.cli import config_flags
from jax_robust import config as cfglib
from jax_robust import methods, recipes
from jax_robust.errors import UserError
from jax_robust.files import check_local_path, ensure_writable_dir

FLAGS = flags.FLAGS
CONFIG_FLAGS = config_flags.define_config_flags()
flags.DEFINE_string("workdir", None, "where checkpoints and results.json go (default: "
                    "runs/<dataset>_<arch>_<method tag>_<variant>_seed<seed>)")
flags.DEFINE_bool("eval_only", False, "evaluate the newest checkpoint in --workdir (with "
                  "other attack settings than the training's, into results_eps<..>.json)")
# Every flag of this binary, in the order of the README's table (jax_robust.cli.flag_table).
RUN_FLAGS = CONFIG_FLAGS + ["workdir", "eval_only"] + cli.define_process_flags()


def config_from_flags() -> cfglib.RunConfig:
    return config_flags.config_from_flags()


def default_workdir(cfg: cfglib.RunConfig) -> str:
    """runs/<dataset>_<arch>_<method tag>_<variant>_seed<seed> of a resolved config, e.g.
    runs/digits_cnn1_rst2_official_seed0."""
    t = cfg.train
    tag = methods.get(t.method).format_tag(dict(t.hparams))
    return os.path.join("runs", f"{cfg.data.dataset}_{cfg.model.arch}_{tag}_{t.variant}"
                                f"_seed{t.seed}")


ROW = ("train_acc", "test_acc", "adv_test_acc", "test_lipschitz", "gap", "adv_gap")


def prepare(argv: list[str]) -> tuple[cfglib.RunConfig, str]:
    """Parses argv into the run's config and workdir; raises UserError on a bad value.

    Every setting is checked (the config resolved once, on the CPU's speed defaults) and the
    workdir made and probed for writing before any data are loaded or JAX starts.
    """
    try:
        rest = FLAGS(argv)
    except flags.Error as e:
        raise UserError(str(e)) from None
    if len(rest) > 1:
        raise UserError(f"unexpected arguments {rest[1:]}; flags are --name=value")
    cfg = config_from_flags()
    resolved = recipes.resolve(cfg, "cpu")
    workdir = os.path.expanduser(FLAGS.workdir or default_workdir(resolved))
    check_local_path(workdir)
    if FLAGS.eval_only and not os.path.isdir(os.path.join(workdir, "checkpoints")):
        raise UserError(f"--eval_only: {workdir} holds no checkpoints")
    ensure_writable_dir(workdir)
    return cfg, workdir


def print_row(r: dict, workdir: str) -> None:
    t = r["config"]["train"]
    print()
    print("| method | variant | " + " | ".join(ROW) + " | test_lipschitz_ascent |")
    print("|---" * (len(ROW) + 3) + "|")
    print(f"| {t['method']} | {t['variant']} | " + " | ".join(f"{r[k]:.2f}" for k in ROW)
          + f" | {r['test_lipschitz_ascent']:.2f} |")
    if "best" in r:  # --holdout: the best epoch's model beside the last one
        b = r["best"]
        print(f"| {t['method']} (best: epoch {b['epoch']}, held-out PGD "
              f"{b['adv_holdout_acc']:.2f}) | {t['variant']} | "
              + " | ".join(f"{b[k]:.2f}" for k in ROW) + f" | {b['test_lipschitz_ascent']:.2f} |")
    attacks = [k for k in r if k.startswith("adv_test_acc_") and "_x" not in k]
    if attacks:
        print("adv test acc by attack: " + ", ".join(
            f"{k[len('adv_test_acc_'):]} {r[k]:.2f}" for k in attacks))
    print(f"results: {workdir}/results.json (train {r['train_seconds']:.0f}s, "
          f"eval {r['eval_seconds']:.0f}s)")


def main(argv):
    cfg, workdir = prepare(argv)
    cli.join_processes()
    from jax_robust import distributed, train

    try:
        r = train.train_and_evaluate(cfg, workdir, log=cli.say, should_stop=cli.stop_requests(),
                                     eval_only=FLAGS.eval_only)
    except train.Interrupted as e:
        if distributed.is_primary():
            print(str(e), file=sys.stderr)
        sys.exit(130)
    if distributed.is_primary():
        print_row(r, workdir)


def entry() -> None:
    cli.run_main(main)


if __name__ == "__main__":
    entry()
