"""The paper's measurements of a trained model over a data set: clean and PGD accuracy and the
test lipschitz in both directions, each example counted once, the model in eval mode."""

from __future__ import annotations

import math
import time
from typing import Any, Callable

import chex
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jax_robust import models
from jax_robust.attacks import pgd_cross_entropy
from jax_robust.augment import center_crop
from jax_robust.errors import Interrupted
from jax_robust.lipschitz import lipschitz_ratios
from jax_robust.pipeline import check_batch_size, eval_batches, shard_batch


def make_eval_step(model_fn: models.ModelFn, *, eps: float, attack_steps: int,
                   attack_step_size: float, lip_steps: int, lip_step_size: float,
                   lip_restarts: int, unroll: bool, mesh: Mesh, lipschitz: bool = True,
                   ascent: bool = False, image_hw: tuple[int, int] | None = None,
                   max_traces: int | None = None) -> Callable:
    """(params, model_state, batch, key) -> sums over the batch's real examples (mask 1) of:
    clean correct, PGD correct, and the lipschitz ratios (descent if `lipschitz`, ascent if
    `ascent`). The model runs in eval mode throughout. Images larger than `image_hw` are
    centre-cropped to it. Jitted; with `max_traces`, tracing it more often is an error
    (chex.assert_max_traces, counted per (lipschitz, ascent) pair)."""

    def eval_step(params, model_state, batch, key):
        x, y, mask = batch["x"], batch["y"], batch["mask"]
        if image_hw is not None:
            x = center_crop(x, tuple(image_hw))

        def logits_fn(z):
            return model_fn(params, model_state, z, False, None)[0]

        def apply_fn(_, z):
            return logits_fn(z)

        k_pgd, k_desc, k_asc = jax.random.split(key, 3)
        clean = jnp.argmax(logits_fn(x), -1) == y
        x_adv = pgd_cross_entropy(logits_fn, x, y, k_pgd, eps=eps, steps=attack_steps,
                                  step_size=attack_step_size, unroll=unroll)
        adv = jnp.argmax(logits_fn(x_adv), -1) == y
        lip_kw = dict(steps=lip_steps, step_size=lip_step_size, unroll=unroll)
        out = {"correct": jnp.sum(clean * mask), "adv_correct": jnp.sum(adv * mask),
               "count": jnp.sum(mask)}
        if lipschitz:
            out["lipschitz"] = jnp.sum(lipschitz_ratios(
                apply_fn, None, x, eps, k_desc, direction="descent", **lip_kw) * mask)
        if ascent:
            out["lipschitz_ascent"] = jnp.sum(lipschitz_ratios(
                apply_fn, None, x, eps, k_asc, direction="ascent", restarts=lip_restarts,
                **lip_kw) * mask)
        return out

    replicated = NamedSharding(mesh, P())
    if max_traces is not None:
        eval_step.__name__ = f"eval_step_lipschitz{int(lipschitz)}_ascent{int(ascent)}"
        eval_step = chex.assert_max_traces(eval_step, n=max_traces)
    return jax.jit(eval_step, out_shardings=replicated)


def evaluate(eval_step: Callable, params, model_state, x: np.ndarray, y: np.ndarray,
             key: jax.Array, *, batch_size: int, mesh: Mesh,
             log: Callable[[str], None] = print, name: str = "",
             should_stop: Callable[[], bool] | None = None) -> dict:
    """Accuracy and PGD accuracy (percent), mean lipschitz ratios and `count` over ALL of
    (x [N, H, W, C], y [N]), each point once; batch b uses key fold_in(key, b).
    `should_stop` is polled between batches: when true, `errors.Interrupted` is raised (with
    it, one batch is in flight at a time, so a stop waits for at most one)."""
    n = len(x)
    check_batch_size(batch_size, mesh.size, "eval batch size")
    batch_of = eval_batches(n, batch_size, mesh)
    totals: dict[str, Any] = {}
    n_batches = math.ceil(n / batch_size)
    start = time.time()
    for b in range(n_batches):
        if should_stop is not None and should_stop():
            raise Interrupted(f"stopped during the {name or 'an'} evaluation; the trained "
                              f"checkpoint is saved, rerun to evaluate")
        idx, mask = batch_of(b)
        batch = shard_batch(mesh, {"x": x[idx], "y": y[idx], "mask": mask})
        sums = eval_step(params, model_state, batch, jax.random.fold_in(key, b))
        totals = sums if not totals else jax.tree_util.tree_map(jnp.add, totals, sums)
        if should_stop is not None:
            # One batch in flight: a stop waits for it, not for every batch the host would
            # dispatch ahead (SIGTERM latency, docs/faults.md); host work per batch is small.
            jax.block_until_ready(totals)
        if n_batches > 8 and (b + 1) % math.ceil(n_batches / 4) == 0:
            rate = (b + 1) * batch_size / (time.time() - start)
            log(f"  eval {name} {b + 1}/{n_batches} batches, {rate:.0f} img/s, "
                f"ETA {(n_batches - b - 1) * batch_size / rate:.0f}s")
    totals = jax.device_get(totals)
    count = float(totals["count"])
    if int(count) != n:
        raise RuntimeError(f"evaluation counted {count} examples of {n}")
    out = {"acc": 100.0 * float(totals["correct"]) / count,
           "adv_acc": 100.0 * float(totals["adv_correct"]) / count, "count": int(count)}
    for k in ("lipschitz", "lipschitz_ascent"):
        if k in totals:
            out[k] = float(totals[k]) / count
    return out
