"""The TrainState and the one shared jitted training step every method plugs into."""

from __future__ import annotations

from typing import Any, Callable

import chex
import flax
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jax_robust import models
from jax_robust.augment import augment
from jax_robust.objectives import ObjectiveParams


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # int32 scalar: optimizer steps taken
    params: Any
    model_state: Any  # BatchNorm statistics ({} without BatchNorm)
    opt_state: Any


def make_train_step(objective: Callable, model_fn: models.ModelFn,
                    optimizer: optax.GradientTransformation, hp: ObjectiveParams,
                    mesh: Mesh, augmentation: str = "none",
                    image_hw: tuple[int, int] | None = None,
                    max_traces: int | None = None) -> Callable:
    """The one shared step: (state, batch, base_key) -> (state, metrics), jitted, pure.

    The step's key is fold_in(base_key, state.step), so no key is carried between steps.
    `augmentation` (augment.AUGMENTATIONS) runs on the device first, giving `image_hw`.
    With `max_traces`, tracing the step more often is an error (chex.assert_max_traces:
    counted per process across steps built from this code; see chex.clear_trace_counter).
    """

    def step(state: TrainState, batch: dict, base_key: jax.Array):
        key = jax.random.fold_in(base_key, state.step)
        stored_hw = tuple(batch["x"].shape[1:3])
        if augmentation != "none" or (image_hw and stored_hw != tuple(image_hw)):
            aug_key, key = jax.random.split(key)
            batch = dict(batch, x=augment(batch["x"], aug_key, augmentation, image_hw))

        def loss_fn(params):
            return objective(model_fn, params, state.model_state, batch, key, hp)

        (_, (model_state, metrics)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state.params)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        finite = jnp.isfinite(metrics["loss"]) & jnp.all(jnp.asarray(
            [jnp.all(jnp.isfinite(p)) for p in jax.tree_util.tree_leaves(params)]))
        metrics = dict(metrics, step=state.step + 1, finite=finite)
        new_state = TrainState(step=state.step + 1, params=params, model_state=model_state,
                               opt_state=opt_state)
        return new_state, metrics

    replicated = NamedSharding(mesh, P())
    if max_traces is not None:
        step = chex.assert_max_traces(step, n=max_traces)
    return jax.jit(step, donate_argnums=(0,), out_shardings=(replicated, replicated))


@jax.jit
def accumulate_metrics(acc: dict, metrics: dict) -> dict:
    """Running sums of loss x count, correct and count, and the first step (counted from 1,
    as checkpoints are) whose loss or updated parameters were not finite."""
    finite = metrics["finite"]
    first_bad = jnp.where((acc["first_bad"] < 0) & ~finite, metrics["step"], acc["first_bad"])
    return {
        "loss_sum": acc["loss_sum"] + jnp.where(finite, metrics["loss"], 0.0) * metrics["count"],
        "correct": acc["correct"] + metrics["correct"],
        "count": acc["count"] + metrics["count"],
        "first_bad": first_bad,
    }


def empty_metrics() -> dict:
    return {"loss_sum": jnp.float32(0), "correct": jnp.float32(0), "count": jnp.float32(0),
            "first_bad": jnp.int32(-1)}
