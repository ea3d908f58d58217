"""One frozen configuration per run, built from flags (experiments/) or by hand (notebooks).

Every field is a plain value (str, int, float, tuple), so a config is hashable, can be set
from the command line, and is written whole into results.json.
"""

from __future__ import annotations

import dataclasses
import math

from jax_robust.errors import UserError

METHODS = ("natural", "gr", "llr", "at", "trades", "rst")
VARIANTS = ("official", "paper")
ARCHS = ("cnn1", "cnn2", "wrn", "resnet50", "linear")
# The official code's weights of each method (OFFICIAL_CODE.md 3.1): lam is GR's lambda,
# LLR's lambda and RST's lambda; beta is TRADES' beta; mu is LLR's mu.
DEFAULT_LAM = {"gr": 1.0, "llr": 4.0, "rst": 1.0}
DEFAULT_BETA = 6.0
DEFAULT_MU = 3.0


@dataclasses.dataclass(frozen=True)
class DataConfig:
    dataset: str = "digits"
    data_dir: str | None = None
    max_train: int | None = None  # keep the first N training points (quick looks, tests)
    max_test: int | None = None
    augment: str | None = None  # none | crop_flip | crop; None: the data set's official one


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    arch: str = "cnn1"
    dropout: float | None = None  # None: the architecture's official rate (CNN1 .5, CNN2 .5, WRN 0)
    wrn_depth: int = 40
    wrn_width: int = 10
    dtype: str = "float32"  # compute dtype; parameters stay float32


@dataclasses.dataclass(frozen=True)
class AttackConfig:
    """l_inf PGD for training (AT, RST, TRADES) and evaluation; sizes in pixel units."""

    eps: float | None = None  # None: the data set's default
    steps: int = 10
    step_size: float | None = None  # None: eps / 5, as the official code


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    method: str = "natural"
    variant: str = "official"
    beta: float | None = None  # TRADES
    lam: float | None = None  # GR, LLR, RST
    mu: float | None = None  # LLR
    gr_h: float = 1.0  # GR's finite-difference step
    llr_steps: int = 2
    # None below: the official setting of the data set (train.official_schedule).
    epochs: int | None = None
    batch_size: int | None = None
    optimizer: str | None = None  # sgd | adam
    lr: float | None = None  # for the batch-MEAN loss (official summed-loss lr x batch size)
    momentum: float | None = None
    milestones: tuple[int, ...] | None = None  # epochs after which lr is multiplied by 0.1
    seed: int = 0


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    batch_size: int = 256
    lipschitz_steps: int = 10
    lipschitz_step_size: float = 0.003
    lipschitz_restarts: int = 1  # of the ascent estimate
    train_metrics: bool = True  # also evaluate adv acc and lipschitz on the training set


@dataclasses.dataclass(frozen=True)
class RunConfig:
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    attack: AttackConfig = AttackConfig()
    train: TrainConfig = TrainConfig()
    eval: EvalConfig = EvalConfig()
    checkpoint_every: int = 500  # steps; also at each epoch's end
    keep_checkpoints: int = 2
    log_every: int = 50  # steps

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def validate(cfg: RunConfig) -> None:
    """Raises UserError naming the first bad value."""
    t, a, m = cfg.train, cfg.attack, cfg.model
    if t.method not in METHODS:
        raise UserError(f"unknown method {t.method!r}; choose one of {', '.join(METHODS)}")
    if t.variant not in VARIANTS:
        raise UserError(f"unknown variant {t.variant!r}; choose official or paper")
    if m.arch not in ARCHS:
        raise UserError(f"unknown arch {m.arch!r}; choose one of {', '.join(ARCHS)}")
    if cfg.data.augment not in (None, "none", "crop_flip", "crop"):
        raise UserError(f"unknown augment {cfg.data.augment!r}; choose none, crop_flip or crop")
    if m.dtype not in ("float32", "bfloat16"):
        raise UserError(f"unknown dtype {m.dtype!r}; choose float32 or bfloat16")
    if t.optimizer not in (None, "sgd", "adam"):
        raise UserError(f"unknown optimizer {t.optimizer!r}; choose sgd or adam")
    for name, value in (("eps", a.eps), ("attack_step_size", a.step_size), ("lr", t.lr)):
        if value is not None and not (math.isfinite(value) and value > 0):
            raise UserError(f"{name} must be a positive number, got {value}")
    for name, value in (("beta", t.beta), ("lam", t.lam), ("mu", t.mu)):
        if value is not None and not (math.isfinite(value) and value >= 0):
            raise UserError(f"{name} must be a non-negative number, got {value}")
    if m.dropout is not None and not 0 <= m.dropout < 1:
        raise UserError(f"dropout must be in [0, 1), got {m.dropout}")
    for name, value in (("epochs", 1 if t.epochs is None else t.epochs),
                        ("batch_size", 1 if t.batch_size is None else t.batch_size),
                        ("attack_steps", a.steps), ("eval batch size", cfg.eval.batch_size),
                        ("checkpoint_every", cfg.checkpoint_every),
                        ("keep_checkpoints", cfg.keep_checkpoints),
                        ("log_every", cfg.log_every),
                        ("lipschitz_restarts", cfg.eval.lipschitz_restarts),
                        ("lipschitz_steps", cfg.eval.lipschitz_steps),
                        ("max_train", 1 if cfg.data.max_train is None else cfg.data.max_train),
                        ("max_test", 1 if cfg.data.max_test is None else cfg.data.max_test),
                        ("wrn_width", m.wrn_width), ("llr_steps", t.llr_steps)):
        if value < 1:
            raise UserError(f"{name} must be at least 1, got {value}")
    if t.momentum is not None and not (math.isfinite(t.momentum) and 0 <= t.momentum < 1):
        raise UserError(f"momentum must be in [0, 1), got {t.momentum}")
    if t.seed < 0:
        raise UserError(f"seed must be non-negative, got {t.seed}")
    if not (math.isfinite(cfg.eval.lipschitz_step_size) and cfg.eval.lipschitz_step_size > 0):
        raise UserError(f"lipschitz step size must be positive, got "
                        f"{cfg.eval.lipschitz_step_size}")
    if not (math.isfinite(t.gr_h) and t.gr_h > 0):
        raise UserError(f"gr_h must be positive, got {t.gr_h}")
    ms = t.milestones or ()
    if any(m < 1 for m in ms) or list(ms) != sorted(ms):
        raise UserError(f"milestones must be increasing positive epochs, got {t.milestones}")


def resolve_eps(cfg: RunConfig, default_eps: float) -> tuple[float, float]:
    """(eps, step size) of the run: flags if given, else the data set's eps and eps / 5."""
    eps = cfg.attack.eps if cfg.attack.eps is not None else default_eps
    step = cfg.attack.step_size if cfg.attack.step_size is not None else eps / 5
    return float(eps), float(step)
