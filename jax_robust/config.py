"""One frozen configuration per run, built from flags (experiments/) or by hand (notebooks).

Every field is a plain value (str, int, float, bool, tuple), so a config is hashable, can be
set from the command line, and is written whole into results.json. A field left None means
"the official setting" (the data set's recipe, the arch's dropout, the method's default
weight, the backend's speed options); `recipes.resolve` fills every one of them, once,
before anything is built, and every later stage reads only the resolved config.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from jax_robust.errors import UserError

VARIANTS = ("official", "paper")
ARCHS = ("cnn1", "cnn2", "wrn", "resnet50", "linear")
AUGMENTATIONS = ("none", "crop_flip", "crop")
DTYPES = ("float32", "bfloat16")
POOL_TIES = ("split", "first")
EVAL_ATTACKS = ("pgd", "multitarget", "apgd")  # robustness.ATTACKS
OPTIMIZERS = ("sgd", "adam")


@dataclasses.dataclass(frozen=True)
class DataConfig:
    dataset: str = "digits"
    data_dir: str | None = None
    max_train: int | None = None  # keep the first N training points (quick looks, tests)
    max_test: int | None = None
    augment: str | None = None  # none | crop_flip | crop


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    arch: str = "cnn1"
    dropout: float | None = None  # 0 turns it off
    wrn_depth: int = 40
    wrn_width: int = 10
    dtype: str = "float32"  # compute dtype; parameters stay float32
    # Where a 2x2 max-pool window with several maxima sends its gradient: 'first' (PyTorch,
    # the official variant's default) or 'split' evenly (JAX, the paper variant's).
    pool_ties: str | None = None


@dataclasses.dataclass(frozen=True)
class AttackConfig:
    """l_inf PGD for training (AT, RST, TRADES) and evaluation; sizes in pixel units."""

    eps: float | None = None
    steps: int = 10
    step_size: float | None = None  # official: eps / 5


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    method: str = "natural"
    variant: str = "official"
    # The method's hyperparameters as sorted (name, value) pairs, e.g. (("beta", 6.0),);
    # the method registry (methods.py) names them and gives their defaults.
    hparams: tuple[tuple[str, float], ...] = ()
    epochs: int | None = None
    batch_size: int | None = None
    optimizer: str | None = None  # sgd | adam
    lr: float | None = None  # for the batch-MEAN loss (official summed-loss lr x batch size)
    momentum: float | None = None
    milestones: tuple[int, ...] | None = None  # epochs after which lr is multiplied by 0.1
    seed: int = 0

    def hparam(self, name: str) -> float:
        return dict(self.hparams)[name]


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    batch_size: int = 256
    lipschitz_steps: int = 10
    lipschitz_step_size: float = 0.003  # the official step, whatever eps is
    lipschitz_restarts: int = 1  # of the ascent estimate
    train_eval_size: int | None = None  # training points evaluated at the end; None: all
    curve_size: int = 512  # test points of the per-epoch clean / PGD accuracy (metrics.jsonl)
    # Attacks of the final test evaluation beyond the paper's PGD (robustness.ATTACKS), each
    # reported with the per-example worst case; restarts of pgd and apgd there.
    attacks: tuple[str, ...] = ("pgd",)
    attack_restarts: int = 1


@dataclasses.dataclass(frozen=True)
class SpeedConfig:
    """How the program is computed, never what: every option gives the same values up to float
    rounding. None: the backend's default (recipes.default_speed). Measured in BUILD_NOTES.md.

      pool_grad            'corners': layers.max_pool_2x2's custom VJP; 'autodiff': the
                           reshape-and-max left to autodiff
      first_conv_grad      'overlap_add': layers.small_input_conv (the first conv's input
                           gradient as one matmul and an overlap-add); 'xla'
      channel_sums         'dot': BatchNorm's per-channel sums as ones-vector dots; 'reduce'
      conv_bias_after_pool CNN1's conv2 bias added after the pool (pool(z) + b = pool(z + b))
      attack_unroll        every PGD / lipschitz loop unrolled inside the jitted program
      conv_input_grad      'column_taps': layers.column_taps_conv (the CNNs' later convs take
                           their input gradient with the column taps stacked on the
                           channels); 'xla'
      conv_kernels         'onednn': every conv of the models is oneDNN's (layers.onednn_conv:
                           the forward and both gradients; the CNNs' first conv keeps the
                           overlap-add input gradient of first_conv_grad, and conv_input_grad
                           does not reach the others; XLA:CPU, one device); 'xla': XLA's own
      conv_pool            'fused': each conv followed by a 2x2 max-pool (CNN1's conv2, CNN2's
                           conv2 and conv4), with the ReLU before it, is one oneDNN call each
                           way (onednn.conv_pool: the ReLU'd input, the conv output and their
                           gradients made, pooled and un-pooled a few images at a time in
                           cache); only with conv_kernels='onednn' and pool_grad='corners'
                           (and, for CNN1, conv_bias_after_pool); 'separate': ReLU, conv, pool
    """

    pool_grad: str | None = None
    first_conv_grad: str | None = None
    channel_sums: str | None = None
    conv_bias_after_pool: bool | None = None
    attack_unroll: bool | None = None
    conv_input_grad: str | None = None
    conv_kernels: str | None = None
    conv_pool: str | None = None


SPEED_CHOICES = {"pool_grad": ("corners", "autodiff"), "first_conv_grad": ("overlap_add", "xla"),
                 "channel_sums": ("dot", "reduce"), "conv_bias_after_pool": (True, False),
                 "attack_unroll": (True, False), "conv_input_grad": ("column_taps", "xla"),
                 "conv_kernels": ("onednn", "xla"), "conv_pool": ("fused", "separate")}
# The plain JAX forms: what a model computes when nobody chose otherwise (notebooks, GPU/TPU).
PLAIN_SPEED = SpeedConfig("autodiff", "xla", "reduce", False, False, "xla", "xla", "separate")
# Every CPU lever on: measured faster on XLA:CPU (BUILD_NOTES.md, "Speed").
CPU_SPEED = SpeedConfig("corners", "overlap_add", "dot", True, True, "column_taps", "onednn",
                        "fused")


@dataclasses.dataclass(frozen=True)
class RunConfig:
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    attack: AttackConfig = AttackConfig()
    train: TrainConfig = TrainConfig()
    eval: EvalConfig = EvalConfig()
    speed: SpeedConfig = SpeedConfig()
    checkpoint_every: int = 500  # steps; also at each epoch's end
    keep_checkpoints: int = 2
    log_every: int = 50  # steps

    def to_dict(self) -> dict:
        """JSON-able dict; `train.hparams` becomes a {name: value} dict."""
        d = dataclasses.asdict(self)
        d["train"]["hparams"] = dict(self.train.hparams)
        return d


def from_dict(d: dict) -> RunConfig:
    """The inverse of `RunConfig.to_dict` (lists back to tuples); unknown keys are refused."""

    def build(cls, values: dict):
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

    sections = {"data": DataConfig, "model": ModelConfig, "attack": AttackConfig,
                "train": TrainConfig, "eval": EvalConfig, "speed": SpeedConfig}
    top = {k: build(sections[k], v) if k in sections else v for k, v in d.items()}
    unknown = set(top) - {f.name for f in dataclasses.fields(RunConfig)}
    if unknown:
        raise UserError(f"unknown config settings {sorted(unknown)}")
    return RunConfig(**top)


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
    _choice("variant", t.variant, VARIANTS)
    _choice("arch", m.arch, ARCHS)
    _choice("augment", cfg.data.augment, AUGMENTATIONS)
    _choice("dtype", m.dtype, DTYPES)
    _choice("pool_ties", m.pool_ties, POOL_TIES)
    _choice("optimizer", t.optimizer, OPTIMIZERS)
    for attack in e.attacks:
        _choice("eval attack", attack, EVAL_ATTACKS)
    if not e.attacks:
        raise UserError("eval attacks must name at least one attack")
    for field, choices in SPEED_CHOICES.items():
        _choice(field, getattr(cfg.speed, field), choices)
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
                        ("eval attack_restarts", e.attack_restarts),
                        ("max_train", cfg.data.max_train), ("max_test", cfg.data.max_test),
                        ("wrn_width", m.wrn_width)):
        _at_least_one(name, value)
    if t.momentum is not None and not (math.isfinite(t.momentum) and 0 <= t.momentum < 1):
        raise UserError(f"momentum must be in [0, 1), got {t.momentum}")
    if t.seed < 0:
        raise UserError(f"seed must be non-negative, got {t.seed}")
    ms = t.milestones or ()
    if any(v < 1 for v in ms) or list(ms) != sorted(ms):
        raise UserError(f"milestones must be increasing positive epochs, got {t.milestones}")
