"""The official settings, one place each, and `resolve`: a config with every None filled.

Data-set recipes (docs/official_code.md): eps, schedule and augmentation of
each data set. Learning rates: the official code SUMS the loss over the batch; ours is the
batch mean, so SGD's learning rate is the official one times the batch size (exactly the
same updates); Adam is scale-invariant and keeps its rate. digits and fashion_mnist are
ours: the MNIST recipe. Arch recipes: the official dropout of each architecture. Speed
defaults: every CPU lever on XLA:CPU, the plain JAX forms elsewhere (config.SpeedConfig).
"""

from __future__ import annotations

import dataclasses

from jax_robust import config as cfglib
from jax_robust import methods
from jax_robust.errors import UserError


@dataclasses.dataclass(frozen=True)
class Recipe:
    """A data set's official training and attack settings."""

    eps: float  # l_inf radius, pixel units
    epochs: int
    batch_size: int
    optimizer: str
    momentum: float
    milestones: tuple[int, ...]
    summed_lr: float | None = None  # SGD lr of the summed loss; None: the method's CIFAR rule
    adam_lr: float = 1e-3
    augment: str = "none"


_MNIST = Recipe(eps=0.1, epochs=160, batch_size=64, optimizer="sgd", momentum=0.9,
                milestones=(40, 80, 120, 140), summed_lr=1e-4)
RECIPES: dict[str, Recipe] = {
    # digits: the smallest train-train l_inf distance to another label is 7/16, so any eps
    # below 0.219 keeps the data eps-separated; 0.1 (MNIST's) leaves a factor 2.2 of margin.
    "digits": _MNIST,
    "mnist": _MNIST,
    "fashion_mnist": _MNIST,
    "cifar10": Recipe(eps=0.031, epochs=120, batch_size=64, optimizer="sgd", momentum=0.0,
                      milestones=(40, 80, 100), augment="crop_flip"),
    "svhn": Recipe(eps=0.031, epochs=60, batch_size=64, optimizer="sgd", momentum=0.0,
                   milestones=(30, 50)),
    "restricted_imagenet": Recipe(eps=0.005, epochs=70, batch_size=128, optimizer="adam",
                                  momentum=0.0, milestones=(40, 60), adam_lr=1e-2,
                                  augment="crop"),
}
# The official dropout rate of each architecture (CNN1: the dense one; its conv dropout is
# half of it, channel-wise).
ARCH_DROPOUT = {"cnn1": 0.5, "cnn2": 0.5, "wrn": 0.0, "resnet50": 0.0, "linear": 0.0}


# The variant's max-pool tie rule: the official code is PyTorch's (first maximum).
VARIANT_POOL_TIES = {"official": "first", "paper": "split"}


def recipe(dataset: str) -> Recipe:
    if dataset not in RECIPES:
        raise UserError(f"unknown dataset {dataset!r}; choose one of {', '.join(RECIPES)}")
    return RECIPES[dataset]


def default_speed(backend: str, devices: int = 1, onednn: bool = True) -> cfglib.SpeedConfig:
    """Every measured CPU lever on XLA:CPU; the plain JAX forms on other backends (the levers
    were measured on CPU only). oneDNN's convolutions only on a single CPU device where they
    are `onednn` (available): their calls carry no sharding rule."""
    if backend != "cpu":
        return cfglib.PLAIN_SPEED
    if devices == 1 and onednn:
        return cfglib.CPU_SPEED
    return dataclasses.replace(cfglib.CPU_SPEED, conv_kernels="xla", conv_pool="separate")


def resolve_speed(speed: cfglib.SpeedConfig, backend: str, devices: int = 1,
                  onednn_missing: str | None = None) -> cfglib.SpeedConfig:
    """`speed` with every None filled from default_speed. onednn_missing: why oneDNN's
    convolutions cannot run here (jax_robust.onednn.unavailable_reason()), None when they can
    or were not checked. conv_pool defaults to 'fused' only where conv_kernels='onednn' and
    pool_grad='corners'. Raises UserError where conv_kernels='onednn' was asked for and cannot
    run (another backend, several devices, the handler missing), or conv_pool='fused' without
    those two."""
    default = default_speed(backend, devices, onednn_missing is None)
    if speed.conv_kernels == "onednn":
        if backend != "cpu":
            raise UserError(f"conv_kernels=onednn runs on XLA:CPU only, not on {backend}")
        if devices > 1:
            raise UserError(f"conv_kernels=onednn runs on one CPU device; this run has "
                            f"{devices} (use conv_kernels=xla)")
        if onednn_missing is not None:
            raise UserError(f"conv_kernels=onednn is unavailable here: {onednn_missing}")
    resolved = cfglib.SpeedConfig(**{f.name: _fill(getattr(speed, f.name),
                                                   getattr(default, f.name))
                                     for f in dataclasses.fields(speed)})
    fusable = cfglib.conv_pool_fused(dataclasses.replace(resolved, conv_pool="fused"))
    if speed.conv_pool == "fused" and not fusable:
        raise UserError("conv_pool=fused needs conv_kernels=onednn and pool_grad=corners "
                        f"(here {resolved.conv_kernels} and {resolved.pool_grad})")
    if speed.conv_pool is None and not fusable:
        resolved = dataclasses.replace(resolved, conv_pool="separate")
    return resolved


def _fill(value, default):
    return default if value is None else value


def resolve(cfg: cfglib.RunConfig, backend: str, *, devices: int = 1,
            onednn_missing: str | None = None) -> cfglib.RunConfig:
    """`cfg` with every None setting replaced by the official one, checked; pure.

    `backend` ('cpu', 'gpu', 'tpu'), `devices` (how many the run uses) and `onednn_missing`
    (resolve_speed) pick the speed defaults. Raises UserError on an unknown data set, method
    or hyperparameter, or a speed option that cannot run there.
    """
    cfglib.validate(cfg)
    r = recipe(cfg.data.dataset)
    method = methods.get(cfg.train.method)
    t, a = cfg.train, cfg.attack
    hparams = method.resolve_hparams(dict(t.hparams))
    batch = _fill(t.batch_size, r.batch_size)
    optimizer = _fill(t.optimizer, r.optimizer)
    if t.lr is not None:
        lr = t.lr
    elif optimizer == "adam":
        lr = r.adam_lr
    else:
        lr = _fill(r.summed_lr, method.cifar_summed_lr) * batch
    eps = float(_fill(a.eps, r.eps))
    speed = resolve_speed(cfg.speed, backend, devices, onednn_missing)
    return dataclasses.replace(
        cfg,
        data=dataclasses.replace(cfg.data, augment=_fill(cfg.data.augment, r.augment)),
        model=dataclasses.replace(
            cfg.model, dropout=float(_fill(cfg.model.dropout, ARCH_DROPOUT[cfg.model.arch])),
            pool_ties=_fill(cfg.model.pool_ties, VARIANT_POOL_TIES[t.variant])),
        attack=dataclasses.replace(a, eps=eps, step_size=float(_fill(a.step_size, eps / 5))),
        train=dataclasses.replace(
            t, hparams=hparams, epochs=_fill(t.epochs, r.epochs), batch_size=batch,
            optimizer=optimizer, lr=float(lr),
            momentum=float(_fill(t.momentum, r.momentum if optimizer == r.optimizer else 0.0)),
            milestones=tuple(_fill(t.milestones, r.milestones))),
        speed=speed,
    )


def is_resolved(cfg: cfglib.RunConfig) -> bool:
    """Whether no setting that `resolve` fills is None."""
    return None not in (
        cfg.data.augment, cfg.model.dropout, cfg.model.pool_ties, cfg.attack.eps,
        cfg.attack.step_size,
        cfg.train.epochs, cfg.train.batch_size, cfg.train.optimizer, cfg.train.lr,
        cfg.train.momentum, cfg.train.milestones,
        *(getattr(cfg.speed, f.name) for f in dataclasses.fields(cfg.speed)))
