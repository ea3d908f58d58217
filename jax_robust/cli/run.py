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
from jax_robust import config as cfglib
from jax_robust import methods, recipes
from jax_robust.errors import UserError
from jax_robust.files import ensure_writable_dir

FLAGS = flags.FLAGS
flags.DEFINE_string("method", "natural", ", ".join(methods.METHODS))
flags.DEFINE_string("variant", "official", "official (the official code, quirks included) or "
                    "paper (the published formulas)")
HPARAM_FLAGS = {  # flag -> the method hyperparameter it sets (methods.py has the defaults)
    "beta": flags.DEFINE_float("beta", None, "TRADES beta (default 6)"),
    "lam": flags.DEFINE_float("lam", None, "lambda of GR (default 1), LLR (4) and RST (1)"),
    "mu": flags.DEFINE_float("mu", None, "LLR mu (default 3)"),
    "gr_h": flags.DEFINE_float("gr_h", None, "GR's finite-difference step (default 1)"),
    "llr_steps": flags.DEFINE_integer("llr_steps", None, "LLR's ascent steps (default 2)"),
}
flags.DEFINE_string("dataset", "digits", ", ".join(recipes.RECIPES))
flags.DEFINE_string("data_dir", None, "directory of the data set's files (IDX or TFDS)")
flags.DEFINE_integer("max_train", None, "use only the first N training points")
flags.DEFINE_integer("max_test", None, "use only the first N test points")
flags.DEFINE_string("augment", None, "training augmentation on the device: none, crop_flip "
                    "(CIFAR-10's official) or crop (Restricted ImageNet's); default: official")
flags.DEFINE_string("arch", "cnn1", ", ".join(cfglib.ARCHS))
flags.DEFINE_float("dropout", None, "dropout rate (default: the arch's official rate; 0 = off)")
flags.DEFINE_integer("wrn_depth", 40, "WideResNet depth (6n+4)")
flags.DEFINE_integer("wrn_width", 10, "WideResNet widen factor")
flags.DEFINE_string("dtype", "float32", "compute dtype: float32 or bfloat16")
flags.DEFINE_string("pool_ties", None, "gradient of tied max-pool maxima: first (PyTorch; "
                    "default of the official variant) or split (JAX; the paper variant's)")
flags.DEFINE_float("eps", None, "l_inf radius in pixel units (default: the data set's)")
flags.DEFINE_integer("attack_steps", 10, "PGD steps (training and evaluation)")
flags.DEFINE_float("attack_step_size", None, "PGD step size (default eps / 5)")
flags.DEFINE_integer("epochs", None, "epochs (default: the data set's official number)")
flags.DEFINE_integer("batch_size", None, "global batch size (default: official, 64)")
flags.DEFINE_string("optimizer", None, "sgd or adam (default: official)")
flags.DEFINE_float("lr", None, "learning rate of the batch-MEAN loss (default: official summed "
                   "lr x batch size)")
flags.DEFINE_float("momentum", None, "SGD momentum (default: official)")
flags.DEFINE_list("milestones", None, "epochs after which lr is x0.1 (default: official)")
flags.DEFINE_integer("seed", 0, "random seed")
flags.DEFINE_integer("eval_batch_size", 256, "evaluation batch size")
flags.DEFINE_integer("lipschitz_restarts", 1, "random starts of the ascent lipschitz estimate")
flags.DEFINE_integer("lipschitz_steps", 10, "steps of the lipschitz estimates (official: 10)")
flags.DEFINE_float("lipschitz_step_size", 0.003, "step of the lipschitz estimates (official: "
                   "0.003 whatever eps is)")
flags.DEFINE_integer("train_eval_size", None, "training points evaluated at the end (PGD and "
                     "lipschitz; default all, as the paper); a fixed random subset")
flags.DEFINE_list("eval_attacks", ["pgd"], "attacks of the final test evaluation: pgd (the "
                  "paper's PGD-10), multitarget (the official appendix attack), apgd (APGD-CE); "
                  "results.json gets adv_test_acc_<attack> and the per-example worst case")
flags.DEFINE_integer("eval_attack_restarts", 1, "random restarts of pgd and apgd there")
flags.DEFINE_integer("curve_size", 512, "test points of the per-epoch accuracies in "
                     "metrics.jsonl")
SPEED_FLAGS = {
    "pool_grad": flags.DEFINE_string("pool_grad", None, "speed: max-pool gradient, corners or "
                                     "autodiff (default: corners on CPU)"),
    "first_conv_grad": flags.DEFINE_string("first_conv_grad", None, "speed: first conv's input "
                                           "gradient, overlap_add or xla (default: "
                                           "overlap_add on CPU)"),
    "channel_sums": flags.DEFINE_string("channel_sums", None, "speed: BatchNorm sums, dot or "
                                        "reduce (default: dot on CPU)"),
    "conv_bias_after_pool": flags.DEFINE_bool("conv_bias_after_pool", None, "speed: CNN1's "
                                              "conv2 bias after the pool (default: on CPU)"),
    "attack_unroll": flags.DEFINE_bool("attack_unroll", None, "speed: unroll the PGD and "
                                       "lipschitz loops (default: on CPU)"),
    "conv_input_grad": flags.DEFINE_string("conv_input_grad", None, "speed: the CNNs' later "
                                           "convs' input gradient, column_taps or xla "
                                           "(default: column_taps on CPU)"),
    "conv_kernels": flags.DEFINE_string("conv_kernels", None, "speed: every conv through "
                                        "onednn or xla (default: onednn on one CPU device "
                                        "where it builds)"),
    "conv_pool": flags.DEFINE_string("conv_pool", None, "speed: each conv + max-pool as one "
                                     "oneDNN call (fused) or two (separate) (default: fused "
                                     "where the convs are oneDNN's)"),
}
flags.DEFINE_string("workdir", None, "where checkpoints and results.json go (default: "
                    "runs/<dataset>_<arch>_<method tag>_<variant>_seed<seed>)")
flags.DEFINE_integer("checkpoint_every", 500, "steps between checkpoints (and each epoch end)")
flags.DEFINE_integer("keep_checkpoints", 2, "checkpoints kept")
flags.DEFINE_integer("log_every", 50, "steps between progress lines")
flags.DEFINE_bool("eval_only", False, "evaluate the newest checkpoint in --workdir (with "
                  "other attack settings than the training's, into results_eps<..>.json)")
cli.define_process_flags()


def config_from_flags() -> cfglib.RunConfig:
    milestones = cli.parse_milestones(FLAGS.milestones)
    hparams = tuple(sorted((name, flag.value) for name, flag in HPARAM_FLAGS.items()
                           if flag.value is not None))
    return cfglib.RunConfig(
        data=cfglib.DataConfig(FLAGS.dataset, FLAGS.data_dir, FLAGS.max_train, FLAGS.max_test,
                               FLAGS.augment),
        model=cfglib.ModelConfig(FLAGS.arch, FLAGS.dropout, FLAGS.wrn_depth, FLAGS.wrn_width,
                                 FLAGS.dtype, FLAGS.pool_ties),
        attack=cfglib.AttackConfig(FLAGS.eps, FLAGS.attack_steps, FLAGS.attack_step_size),
        train=cfglib.TrainConfig(
            method=FLAGS.method, variant=FLAGS.variant, hparams=hparams, epochs=FLAGS.epochs,
            batch_size=FLAGS.batch_size, optimizer=FLAGS.optimizer, lr=FLAGS.lr,
            momentum=FLAGS.momentum, milestones=milestones, seed=FLAGS.seed),
        eval=cfglib.EvalConfig(batch_size=FLAGS.eval_batch_size,
                               lipschitz_steps=FLAGS.lipschitz_steps,
                               lipschitz_step_size=FLAGS.lipschitz_step_size,
                               lipschitz_restarts=FLAGS.lipschitz_restarts,
                               train_eval_size=FLAGS.train_eval_size,
                               curve_size=FLAGS.curve_size,
                               attacks=tuple(FLAGS.eval_attacks),
                               attack_restarts=FLAGS.eval_attack_restarts),
        speed=cfglib.SpeedConfig(**{name: flag.value for name, flag in SPEED_FLAGS.items()}),
        checkpoint_every=FLAGS.checkpoint_every, keep_checkpoints=FLAGS.keep_checkpoints,
        log_every=FLAGS.log_every,
    )


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
