"""Generic l_inf projected gradient ascent over any per-example loss of the input.

One routine serves every inner maximisation of the project: PGD on cross-entropy (AT, RST,
evaluation), on the KL to the clean prediction (TRADES), on the local non-linearity (LLR) and
on the Lipschitz ratio (the test-lipschitz estimate). Pieces:
  init     'uniform'  x + U(-eps, eps), clipped to [lo, hi]       (PGD, AT, RST, evaluation)
           'normal'   x + init_scale * N(0, 1), not clipped        (TRADES, LLR, lipschitz)
           'none'     x
  update   'sign'        x' + step_size * sign(g)                  (PGD)
           'linf_normalized'  x' + step_size * g / ||g||_inf, per example; rows with g = 0
                         get N(0, 1) noise instead (the official LLR)
  project  'clip'     onto the eps ball around x, then [lo, hi]     (equals clip [lo,hi], ball,
                                                                     clip [lo,hi] as coded)
           'rescale'  clip x' to [lo, hi]; then a delta with ||delta||_inf > eps is scaled by
                      eps / (||delta||_inf + 1e-7) (PyTorch `renorm_`, the official LLR)
The loop is a `lax.fori_loop(..., unroll=True)`: XLA:CPU runs convolutions inside a rolled
loop body on a slow generic path (see BUILD_NOTES.md). The result is `stop_gradient`-ed.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

_NO_AUX = object()


def _per_example_max_abs(g: jax.Array) -> jax.Array:
    """||g_i||_inf broadcastable against g [B, ...]."""
    return jnp.max(jnp.abs(g), axis=tuple(range(1, g.ndim)), keepdims=True)


def project_linf(x_adv, x, eps, lo=0.0, hi=1.0):
    """Closest point to x_adv in {x' : ||x' - x||_inf <= eps, lo <= x' <= hi} (coordinate-wise)."""
    return jnp.clip(x_adv, jnp.maximum(x - eps, lo), jnp.minimum(x + eps, hi))


def rescale_linf(x_adv, x, eps, lo=0.0, hi=1.0):
    """The official LLR projection: clip to [lo, hi], then scale deltas longer than eps."""
    delta = jnp.clip(x_adv, lo, hi) - x
    norm = _per_example_max_abs(delta)
    scale = jnp.where(norm > eps, eps / (norm + 1e-7), 1.0)
    return x + delta * scale


def random_start(x, key, eps, init="uniform", init_scale=0.001, lo=0.0, hi=1.0):
    if init == "uniform":
        return jnp.clip(x + jax.random.uniform(key, x.shape, x.dtype, -eps, eps), lo, hi)
    if init == "normal":
        return x + init_scale * jax.random.normal(key, x.shape, x.dtype)
    if init == "none":
        return x
    raise ValueError(f"unknown init {init!r}")


def pgd_attack(
    loss_fn: Callable,
    x: jax.Array,
    key: jax.Array,
    *,
    eps: float,
    steps: int,
    step_size: float,
    init: str = "uniform",
    init_scale: float = 0.001,
    update: str = "sign",
    project: str = "clip",
    clip_min: float = 0.0,
    clip_max: float = 1.0,
    track_best: bool = False,
    aux: Any = _NO_AUX,
):
    """Ascends sum_i loss_fn(x')_i over the l_inf ball of radius `eps` around x.

    Args:
      loss_fn: x' [B, ...] -> per-example losses [B]; with `aux` given, (x', aux) -> (losses,
        aux), and the aux pytree (e.g. BatchNorm statistics, a dropout key) is carried through
        the steps.
      x: clean inputs [B, ...] in [clip_min, clip_max].
      key: PRNG key of the random start (and of the LLR zero-gradient noise).
      eps, step_size: in input units (pixels in [0, 1]); steps: a Python int.
      track_best: return, per example, the iterate with the largest loss seen (including the
        final one) instead of the final iterate.

    Returns:
      x_adv [B, ...] (gradient-stopped), or (x_adv, aux) when `aux` is given.
    """
    has_aux = aux is not _NO_AUX
    fn = loss_fn if has_aux else (lambda xa, a: (loss_fn(xa), a))

    def total(xa, a):
        losses, a = fn(xa, a)
        return jnp.sum(losses), (losses, a)

    grad_fn = jax.grad(total, has_aux=True)
    proj = {"clip": project_linf, "rescale": rescale_linf}[project]
    init_key, noise_key = jax.random.split(key)
    x_adv = random_start(x, init_key, eps, init, init_scale, clip_min, clip_max)
    x = jax.lax.stop_gradient(x)

    def body(i, carry):
        xa, a, best_x, best_loss = carry
        g, (losses, a) = grad_fn(xa, a)
        if track_best:
            better = (losses > best_loss).reshape((-1,) + (1,) * (x.ndim - 1))
            best_x = jnp.where(better, xa, best_x)
            best_loss = jnp.maximum(losses, best_loss)
        if update == "sign":
            xa = xa + step_size * jnp.sign(g)
        elif update == "linf_normalized":
            norm = _per_example_max_abs(g)
            noise = jax.random.normal(jax.random.fold_in(noise_key, i), g.shape, g.dtype)
            g = jnp.where(norm > 0, g / jnp.where(norm > 0, norm, 1.0), noise)
            xa = xa + step_size * g
        else:
            raise ValueError(f"unknown update {update!r}")
        return proj(xa, x, eps, clip_min, clip_max), a, best_x, best_loss

    best_loss = jnp.full((x.shape[0],), -jnp.inf, x.dtype)
    carry = (x_adv, aux if has_aux else None, x_adv, best_loss)
    x_adv, a, best_x, best_loss = jax.lax.fori_loop(0, steps, body, carry, unroll=True)
    if track_best:
        final_losses, a = fn(x_adv, a)
        better = (final_losses > best_loss).reshape((-1,) + (1,) * (x.ndim - 1))
        x_adv = jnp.where(better, x_adv, best_x)
    x_adv = jax.lax.stop_gradient(x_adv)
    return (x_adv, a) if has_aux else x_adv


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Per-example cross-entropy [B] of logits [B, K] against int labels [B]."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32))
    return -jnp.take_along_axis(logp, labels[:, None], axis=1)[:, 0]


def pgd_cross_entropy(logits_fn, x, y, key, *, eps, steps=10, step_size=None):
    """The paper's evaluation attack: untargeted PGD on CE with true labels, random start.

    logits_fn: x [B, ...] -> logits [B, K] (eval mode). step_size defaults to eps / 5.
    """
    step_size = eps / 5 if step_size is None else step_size
    return pgd_attack(lambda xa: cross_entropy(logits_fn(xa), y), x, key, eps=eps,
                      steps=steps, step_size=step_size)
