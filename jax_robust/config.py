"""One frozen configuration per run, built from flags (jax_robust/cli) or by hand (notebooks).

Every field is a plain value (str, int, float, bool, tuple), so a config is hashable, can be
set from the command line, and is written whole into results.json. A field left None means
"the official setting" (the data set's recipe, the arch's dropout, the method's default
weight, the backend's speed options); `recipes.resolve` fills every one of them, once,
before anything is built, and every later stage reads only the resolved config.

Each field carries its own facts as metadata (`setting`): the help text and flag name of the
binaries (jax_robust/cli/config_flags.py defines the flags from them), its choices, and its
`identity`: whether a different value makes a different run (RUN: another trained model; its
checkpoints and results are refused), another evaluation of the same model (EVAL: results
differ, checkpoints are still this run's), or neither (None: how the program is computed or
where files are, never what). `run_identity_changes` reads it for train and sweep alike.
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any

from jax_robust.errors import UserError

RUN, EVAL = "run", "eval"  # the `identity` kinds of a setting

VARIANTS = ("official", "paper")
ARCHS = ("cnn1", "cnn2", "wrn", "resnet50", "linear")
AUGMENTATIONS = ("none", "crop_flip", "crop")
DTYPES = ("float32", "bfloat16")
POOL_TIES = ("split", "first")
# robustness.ATTACKS, then AutoAttack's versions (jax_robust.autoattack).
AUTOATTACK_VERSIONS = {"autoattack": "standard", "autoattack_rand": "rand"}
EVAL_ATTACKS = ("pgd", "multitarget", "apgd", *AUTOATTACK_VERSIONS)
OPTIMIZERS = ("sgd", "adam")


def setting(default, help: str, *, flag: str | None = None, identity: str | None = RUN,
            choices: tuple | None = None, **extra) -> Any:
    """A config field with its metadata: `help` and `flag` (default: the field's name) for
    the binaries, `choices` checked by `validate`, `identity` (RUN, EVAL or None)."""
    return dataclasses.field(default=default, metadata=dict(
        help=help, flag=flag, identity=identity, choices=choices, **extra))


@dataclasses.dataclass(frozen=True)
class DataConfig:
    dataset: str = setting("digits", "data set: digits (embedded 8x8), mnist, "
                           "fashion_mnist, cifar10, svhn, restricted_imagenet")
    data_dir: str | None = setting(None, "directory of the data set's files (IDX or TFDS)",
                                   identity=None)
    max_train: int | None = setting(None, "use only the first N training points")
    max_test: int | None = setting(None, "use only the first N test points")
    holdout: int = setting(0, "training points held out (the last N of the training set) "
                           "to pick the best checkpoint by PGD accuracy each epoch, kept "
                           "beside the latest; results.json reports both (0: off, the "
                           "paper's recipe)")
    augment: str | None = setting(None, "training augmentation on the device: none, crop_flip "
                                  "(CIFAR-10's official) or crop (Restricted ImageNet's); "
                                  "default: the data set's", choices=AUGMENTATIONS)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    arch: str = setting("cnn1", "architecture: " + ", ".join(ARCHS), choices=ARCHS)
    dropout: float | None = setting(None, "dropout rate (default: the arch's official rate; "
                                    "0 = off)")
    wrn_depth: int = setting(40, "WideResNet depth (6n+4)")
    wrn_width: int = setting(10, "WideResNet widen factor")
    dtype: str = setting("float32", "compute dtype (parameters stay float32): "
                         + " or ".join(DTYPES), choices=DTYPES)
    # Where a 2x2 max-pool window with several maxima sends its gradient: 'first' (PyTorch,
    # the official variant's default) or 'split' evenly (JAX, the paper variant's).
    pool_ties: str | None = setting(None, "gradient of tied max-pool maxima: first (PyTorch; "
                                    "the official variant's default) or split (the paper "
                                    "variant's)", choices=POOL_TIES)


@dataclasses.dataclass(frozen=True)
class AttackConfig:
    """l_inf PGD for training (AT, RST, TRADES) and evaluation; sizes in pixel units."""

    eps: float | None = setting(None, "l_inf radius in pixel units [0, 1] (default: the data "
                                "set's)")
    steps: int = setting(10, "PGD steps (training and evaluation)", flag="attack_steps")
    step_size: float | None = setting(None, "PGD step size (default eps / 5)",
                                      flag="attack_step_size")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    method: str = setting("natural", "training method: natural, gr, llr, at, rst, "
                          "trades (methods.METHODS)")
    variant: str = setting("official", "official (the official code, quirks included) or "
                           "paper (the published formulas)", choices=VARIANTS)
    # The method's hyperparameters as sorted (name, value) pairs, e.g. (("beta", 6.0),);
    # the method registry (methods.py) names them, gives their defaults and their flags.
    hparams: tuple[tuple[str, float], ...] = setting((), "the method's hyperparameters",
                                                     flag="")
    epochs: int | None = setting(None, "epochs (default: the data set's official number)")
    batch_size: int | None = setting(None, "global batch size (default: official, 64)")
    optimizer: str | None = setting(None, "sgd or adam (default: official)",
                                    choices=OPTIMIZERS)
    lr: float | None = setting(None, "learning rate of the batch-MEAN loss (default: the "
                               "official summed-loss lr x batch size)")
    momentum: float | None = setting(None, "SGD momentum (default: official)")
    milestones: tuple[int, ...] | None = setting(None, "epochs after which lr is x0.1 "
                                                 "(default: official)")
    seed: int = setting(0, "random seed (initialisation, batches, attacks)")

    def hparam(self, name: str) -> float:
        return dict(self.hparams)[name]


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    batch_size: int = setting(256, "evaluation batch size", flag="eval_batch_size",
                              identity=EVAL)
    lipschitz_steps: int = setting(10, "steps of the lipschitz estimates (official: 10)",
                                   identity=EVAL)
    lipschitz_step_size: float = setting(0.003, "step of the lipschitz estimates (official: "
                                         "0.003 whatever eps is)", identity=EVAL)
    lipschitz_restarts: int = setting(1, "random starts of the ascent lipschitz estimate",
                                      identity=EVAL)
    train_eval_size: int | None = setting(None, "training points evaluated at the end (PGD "
                                          "and lipschitz; default all, as the paper); a "
                                          "fixed random subset", identity=EVAL)
    curve_size: int = setting(512, "test points of the per-epoch accuracies in "
                              "metrics.jsonl", identity=EVAL)
    train_curve_size: int = setting(0, "training points (a fixed random subset) of per-epoch "
                                    "clean and PGD accuracies in eval mode in metrics.jsonl "
                                    "(0: none)", identity=EVAL)
    # Attacks of the final test evaluation beyond the paper's PGD (robustness.ATTACKS), each
    # reported with the per-example worst case; restarts of pgd and apgd there. They only
    # add keys to results.json (`run.py --eval_only --eval_attacks=...`): not the identity.
    attacks: tuple[str, ...] = setting(("pgd",), "attacks of the final test evaluation: pgd "
                                       "(the paper's PGD-10), multitarget (the official "
                                       "appendix attack), apgd (APGD-CE), autoattack "
                                       "(AutoAttack's standard version), autoattack_rand "
                                       "(its rand version); results.json gets "
                                       "adv_test_acc_<attack> and the per-example worst case",
                                       flag="eval_attacks", identity=None,
                                       choices=EVAL_ATTACKS)
    attack_restarts: int = setting(1, "random restarts of pgd and apgd there",
                                   flag="eval_attack_restarts", identity=None)
    attack_size: int | None = setting(None, "test points (the first N) of the attacks beyond "
                                      "pgd (default: all)", flag="eval_attack_size",
                                      identity=None)


def speed_option(lever, plain, help: str) -> Any:
    """A SpeedConfig field: `lever` is its CPU form (measured faster on XLA:CPU, docs/
    performance.md), `plain` the plain JAX form (GPU, TPU, notebooks); None: the backend's
    default (recipes.default_speed)."""
    return setting(None, "speed: " + help, identity=None, choices=(lever, plain), lever=lever,
                   plain=plain)


@dataclasses.dataclass(frozen=True)
class SpeedConfig:
    """How the program is computed, never what: every option gives the same values up to float
    rounding. None: the backend's default (recipes.default_speed)."""

    pool_grad: str | None = speed_option(
        "corners", "autodiff", "max-pool gradient: corners (layers.max_pool_2x2's custom VJP) "
        "or autodiff (the reshape-and-max left to autodiff)")
    first_conv_grad: str | None = speed_option(
        "overlap_add", "xla", "first conv's input gradient: overlap_add (layers."
        "small_input_conv: one matmul and an overlap-add) or xla")
    channel_sums: str | None = speed_option(
        "dot", "reduce", "BatchNorm's per-channel sums: dot (ones-vector dots) or reduce")
    conv_bias_after_pool: bool | None = speed_option(
        True, False, "CNN1's conv2 bias added after the pool (pool(z) + b = pool(z + b))")
    attack_unroll: bool | None = speed_option(
        True, False, "unroll every PGD and lipschitz loop inside the jitted program (off "
        "compiles faster, for small grids)")
    conv_input_grad: str | None = speed_option(
        "column_taps", "xla", "the CNNs' later convs' input gradient: column_taps (the column "
        "taps stacked on the channels) or xla")
    conv_kernels: str | None = speed_option(
        "onednn", "xla", "every conv through onednn (layers.onednn_conv; XLA:CPU, one device, "
        "where the handler builds) or xla")
    conv_pool: str | None = speed_option(
        "fused", "separate", "each ReLU + conv + 2x2 max-pool as one oneDNN call each way "
        "(fused; needs conv_kernels=onednn and pool_grad=corners) or separate calls")


def _speed_forms(form: str) -> SpeedConfig:
    return SpeedConfig(**{f.name: f.metadata[form] for f in dataclasses.fields(SpeedConfig)})


SPEED_CHOICES = {f.name: f.metadata["choices"] for f in dataclasses.fields(SpeedConfig)}
# The plain JAX forms: what a model computes when nobody chose otherwise (notebooks, GPU/TPU).
PLAIN_SPEED = _speed_forms("plain")
# Every CPU lever on: measured faster on XLA:CPU (docs/performance.md).
CPU_SPEED = _speed_forms("lever")


def conv_pool_fused(speed: SpeedConfig) -> bool:
    """The one fusion rule: whether a ReLU + conv + 2x2 max-pool is one oneDNN call
    (layers.ConvPool) — conv_pool='fused' with oneDNN's convs and the corners pool."""
    return (speed.conv_pool == "fused" and speed.conv_kernels == "onednn"
            and speed.pool_grad == "corners")


@dataclasses.dataclass(frozen=True)
class RunConfig:
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    attack: AttackConfig = AttackConfig()
    train: TrainConfig = TrainConfig()
    eval: EvalConfig = EvalConfig()
    speed: SpeedConfig = SpeedConfig()
    checkpoint_every: int = setting(500, "steps between checkpoints (and each epoch end)",
                                    identity=None)
    keep_checkpoints: int = setting(2, "checkpoints kept", identity=None)
    log_every: int = setting(50, "steps between progress lines", identity=None)

    def to_dict(self) -> dict:
        """JSON-able dict; `train.hparams` becomes a {name: value} dict."""
        d = dataclasses.asdict(self)
        d["train"]["hparams"] = dict(self.train.hparams)
        return d


SECTIONS = {"data": DataConfig, "model": ModelConfig, "attack": AttackConfig,
            "train": TrainConfig, "eval": EvalConfig, "speed": SpeedConfig}


def settings() -> list[tuple[str, dataclasses.Field]]:
    """(dotted name, field) of every leaf setting of a RunConfig, e.g. ('train.lr', ...)."""
    out = []
    for f in dataclasses.fields(RunConfig):
        if f.name in SECTIONS:
            out += [(f"{f.name}.{g.name}", g) for g in dataclasses.fields(SECTIONS[f.name])]
        else:
            out.append((f.name, f))
    return out


def from_dict(d: dict) -> RunConfig:
    """The inverse of `RunConfig.to_dict` (lists back to tuples); unknown keys are refused,
    missing ones take their defaults (configs written before a setting existed)."""

    def build(cls, values: dict):
        if not isinstance(values, dict):
            raise UserError(f"config section {cls.__name__} is not a mapping: {values!r}")
        names = {f.name: f for f in dataclasses.fields(cls)}
        unknown = set(values) - set(names)
        if unknown:
            raise UserError(f"unknown config settings {sorted(unknown)} for {cls.__name__}")
        kwargs: dict[str, Any] = {}
        for name, value in values.items():
            if name == "hparams":
                value = tuple(sorted((k, v) for k, v in value.items()))
            elif isinstance(value, list):
                value = tuple(value)
            kwargs[name] = value
        return cls(**kwargs)

    if not isinstance(d, dict):
        raise UserError(f"a config must be a mapping, got {type(d).__name__}")
    top = {k: build(SECTIONS[k], v) if k in SECTIONS else v for k, v in d.items()}
    unknown = set(top) - {f.name for f in dataclasses.fields(RunConfig)}
    if unknown:
        raise UserError(f"unknown config settings {sorted(unknown)}")
    return RunConfig(**top)


def _json(value):
    return json.loads(json.dumps(value))


def config_changes(saved: dict, current: dict, kinds=(RUN, EVAL, None)) -> list[str]:
    """Dotted names of the settings whose `identity` is in `kinds` and that differ between two
    config dicts (`RunConfig.to_dict` form; a setting missing from one takes its default).
    A saved dict that is not a config gives ['config (unreadable)']."""
    try:
        a, b = from_dict(saved).to_dict(), from_dict(current).to_dict()
    except (UserError, TypeError, ValueError):
        return ["config (unreadable)"]
    out = []
    for name, f in settings():
        if f.metadata["identity"] not in kinds:
            continue
        keys = name.split(".")
        va, vb = a, b
        for k in keys:
            va, vb = va[k], vb[k]
        if _json(va) != _json(vb):
            out.append(name)
    return out


def run_identity_changes(saved: dict, current: dict) -> list[str]:
    """The settings that make `saved` (a checkpoint's or results.json's config) another run
    than `current`: another trained model."""
    return config_changes(saved, current, kinds=(RUN,))


def _positive(name: str, value) -> None:
    if value is not None and not (isinstance(value, (int, float)) and math.isfinite(value)
                                  and value > 0):
        raise UserError(f"{name} must be a positive number, got {value}")


def _at_least_one(name: str, value) -> None:
    if value is not None and value < 1:
        raise UserError(f"{name} must be at least 1, got {value}")


def _choice(name: str, value, choices) -> None:
    if value is not None and value not in choices:
        raise UserError(f"unknown {name} {value!r}; choose one of "
                        f"{', '.join(str(c) for c in choices)}")


def validate(cfg: RunConfig) -> None:
    """Checks every value that does not depend on the data set or the method registry;
    raises UserError naming the first bad one."""
    t, a, m, e = cfg.train, cfg.attack, cfg.model, cfg.eval
    d = cfg.to_dict()
    for name, f in settings():
        choices = f.metadata["choices"]
        if choices is not None:
            section, _, key = name.rpartition(".")
            value = d[section][key] if section else d[key]
            for v in (value if isinstance(value, (list, tuple)) else [value]):
                _choice(f.metadata["flag"] or key, v, choices)
    if not e.attacks:
        raise UserError("eval attacks must name at least one attack")
    for name, value in (("eps", a.eps), ("attack_step_size", a.step_size), ("lr", t.lr),
                        ("lipschitz_step_size", e.lipschitz_step_size)):
        _positive(name, value)
    if a.eps is not None and a.eps > 1:
        raise UserError(f"eps {a.eps} is larger than the whole pixel range [0, 1]: every "
                        f"image could become any other; pixels are in [0, 1], not [0, 255]")
    if m.dropout is not None and not (math.isfinite(m.dropout) and 0 <= m.dropout < 1):
        raise UserError(f"dropout must be in [0, 1), got {m.dropout}")
    for name, value in (("epochs", t.epochs), ("batch_size", t.batch_size),
                        ("attack_steps", a.steps), ("eval_batch_size", e.batch_size),
                        ("checkpoint_every", cfg.checkpoint_every),
                        ("keep_checkpoints", cfg.keep_checkpoints), ("log_every", cfg.log_every),
                        ("lipschitz_restarts", e.lipschitz_restarts),
                        ("lipschitz_steps", e.lipschitz_steps),
                        ("train_eval_size", e.train_eval_size), ("curve_size", e.curve_size),
                        ("eval_attack_size", e.attack_size),
                        ("eval attack_restarts", e.attack_restarts),
                        ("max_train", cfg.data.max_train), ("max_test", cfg.data.max_test),
                        ("wrn_width", m.wrn_width)):
        _at_least_one(name, value)
    if t.momentum is not None and not (math.isfinite(t.momentum) and 0 <= t.momentum < 1):
        raise UserError(f"momentum must be in [0, 1), got {t.momentum}")
    if cfg.data.holdout < 0:
        raise UserError(f"holdout must be non-negative, got {cfg.data.holdout}")
    if e.train_curve_size < 0:
        raise UserError(f"train_curve_size must be non-negative, got {e.train_curve_size}")
    if t.seed < 0:
        raise UserError(f"seed must be non-negative, got {t.seed}")
    ms = t.milestones or ()
    if any(v < 1 for v in ms) or list(ms) != sorted(ms):
        raise UserError(f"milestones must be increasing positive epochs, got {t.milestones}")
