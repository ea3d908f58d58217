"""The optimizer and its learning-rate schedule, from a resolved TrainConfig."""

from __future__ import annotations

import optax

from jax_robust.config import TrainConfig


def learning_rate(t: TrainConfig, steps_per_epoch: int) -> optax.Schedule:
    """t.lr, multiplied by 0.1 after each milestone epoch; a function of the step."""
    return optax.piecewise_constant_schedule(
        t.lr, {m * steps_per_epoch: 0.1 for m in t.milestones})


def make_optimizer(t: TrainConfig, steps_per_epoch: int) -> optax.GradientTransformation:
    """SGD (PyTorch semantics, momentum if t.momentum > 0) or Adam, on `learning_rate`."""
    lr = learning_rate(t, steps_per_epoch)
    if t.optimizer == "adam":
        return optax.adam(lr, b1=0.9, b2=0.999, eps=1e-8)
    return optax.sgd(lr, momentum=t.momentum or None)
