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
The loop is a `lax.fori_loop`, unrolled when `unroll` (the speed option
`SpeedConfig.attack_unroll`): XLA:CPU runs the convolutions of a rolled loop body on a slow
generic path. The result is `stop_gradient`-ed.
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
    unroll: bool = True,
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
      unroll: unroll the loop into one program (faster on XLA:CPU; longer compiles).

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
    x_adv, a, best_x, best_loss = jax.lax.fori_loop(0, steps, body, carry, unroll=unroll)
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


def pgd_cross_entropy(logits_fn, x, y, key, *, eps, steps=10, step_size=None, unroll=True):
    """The paper's evaluation attack: untargeted PGD on CE with true labels, random start.

    logits_fn: x [B, ...] -> logits [B, K] (eval mode). step_size defaults to eps / 5.
    """
    step_size = eps / 5 if step_size is None else step_size
    return pgd_attack(lambda xa: cross_entropy(logits_fn(xa), y), x, key, eps=eps,
                      steps=steps, step_size=step_size, unroll=unroll)


# ----------------------------------------------------------------------------- stronger attacks
# Evaluation-only attacks (jax_robust.robustness): the official multi-target PGD, PGD with
# restarts and APGD-CE. Each takes logits_fn: x [B, H, W, C] -> logits [B, K] (eval mode), x in
# [0, 1], int labels y [B] and a PRNG key; eps / steps / step sizes are Python numbers (static
# under jax.jit). Each returns x_adv [B, H, W, C] in the eps ball and in [0, 1], gradient-stopped.


def _take_per_example(candidates: jax.Array, index: jax.Array) -> jax.Array:
    """candidates [R, B, ...], index [B] int -> [B, ...]: row index[i] of example i."""
    return candidates[index, jnp.arange(candidates.shape[1])]


def _misclassified(logits_fn: Callable, x_adv: jax.Array, y: jax.Array) -> jax.Array:
    """[B] bool: argmax logits_fn(x_adv) != y."""
    return jnp.argmax(logits_fn(x_adv), axis=-1) != y


def _first_success(x_advs: jax.Array, wrong: jax.Array) -> jax.Array:
    """x_advs [R, B, ...], wrong [R, B] -> [B, ...]: per example the first restart that
    misclassifies, else the last restart's point."""
    last = wrong.shape[0] - 1
    index = jnp.where(jnp.any(wrong, axis=0), jnp.argmax(wrong, axis=0), last)
    return _take_per_example(x_advs, index)


def _with_restarts(single: Callable, logits_fn: Callable, x: jax.Array, y: jax.Array,
                   key: jax.Array, restarts: int) -> jax.Array:
    """Runs single(key) -> x_adv [B, ...] `restarts` times; keeps per example the first
    restart that misclassifies, else the last one.

    Restart 0 uses `key` itself and runs un-vmapped, so restarts=1 is exactly single(key) and
    restart 0 of a longer run is bit-identical to it (more restarts can only lower the
    accuracy). Restarts 1.. use split(fold_in(key, 1), restarts - 1), vmapped.
    """
    if restarts < 1:
        raise ValueError(f"restarts must be >= 1, got {restarts}")
    first = single(key)
    if restarts == 1:
        return first
    more = jax.vmap(single)(jax.random.split(jax.random.fold_in(key, 1), restarts - 1))
    x_advs = jnp.concatenate([first[None], more], axis=0)  # [R, B, ...]
    wrong = jax.vmap(lambda xa: _misclassified(logits_fn, xa, y))(x_advs)  # [R, B]
    return jax.lax.stop_gradient(_first_success(x_advs, wrong))


def other_classes(y: jax.Array, num_classes: int) -> jax.Array:
    """[K-1, B] int: for each example the K-1 classes other than y[i], in increasing order."""
    t = jnp.arange(num_classes - 1, dtype=y.dtype)[:, None]
    return t + (t >= y[None, :]).astype(y.dtype)


def targeted_pgd(logits_fn, x, target, key, *, eps, steps, step_size, unroll=True):
    """PGD descending CE(f(x'), target) (ascending -CE), random start U(-eps, eps) clipped to
    [0, 1], sign steps: the official `projected_gradient_descent(targeted=True)`.

    target: [B] int classes. Returns x_adv [B, ...], gradient-stopped.
    """
    return pgd_attack(loss_fn=lambda xa: -cross_entropy(logits_fn(xa), target), x=x, key=key,
                      eps=eps, steps=steps, step_size=step_size, unroll=unroll)


def multitarget_attack(logits_fn, x, y, key, *, eps, steps=20, step_size=None, num_classes,
                       unroll=True):
    """The official `multitarget` attack (lolip/attacks/torch/multi_target.py).

    For every class j != y a targeted PGD toward j (`targeted_pgd`: `steps` sign steps of
    `step_size`, official 20 and 2 * eps / 20 = eps / 10, random start), all K - 1 targets in
    one vmapped program. Per example the candidate x'_j kept is, as in the official code, the
    one with the largest softmax_j(f(x'_j)) (its top-2 logic skips j = y; we never attack
    toward y), except that a candidate that is misclassified (argmax f(x'_j) != y) always wins
    over one that is not, so the attack is never weaker than the official one.

    Random starts: target t (0-based, the t-th entry of `other_classes(y, K)`, a per-example
    class) uses key split(key, K - 1)[t], passed to `pgd_attack` unchanged.

    Args:
      logits_fn: x [B, H, W, C] -> logits [B, K] (eval mode).
      x: [B, H, W, C] clean inputs in [0, 1]; y: [B] int true labels.
      eps, step_size: pixel units; steps: int; num_classes: K >= 2.
      unroll: unroll the step loop (faster on XLA:CPU, longer compiles; as `pgd_attack`).

    Returns:
      x_adv [B, H, W, C], gradient-stopped.
    """
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2, got {num_classes}")
    step_size = eps / 10 if step_size is None else step_size
    targets = other_classes(y, num_classes)  # [K-1, B]
    keys = jax.random.split(key, num_classes - 1)

    def attack(target, k):
        return targeted_pgd(logits_fn, x, target, k, eps=eps, steps=steps, step_size=step_size,
                            unroll=unroll)

    x_advs = jax.vmap(attack)(targets, keys)  # [K-1, B, H, W, C]
    logits = jax.vmap(logits_fn)(x_advs)  # [K-1, B, K]
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    score = jnp.take_along_axis(probs, targets[..., None], axis=-1)[..., 0]  # [K-1, B]
    wrong = jnp.argmax(logits, axis=-1) != y[None, :]
    priority = jnp.where(wrong, score + 2.0, score)  # softmax <= 1: misclassified first
    return jax.lax.stop_gradient(_take_per_example(x_advs, jnp.argmax(priority, axis=0)))


def pgd_restarts(logits_fn, x, y, key, *, eps, steps=10, step_size=None, restarts=1,
                 unroll=True):
    """`pgd_cross_entropy` (untargeted PGD on CE, random start, step eps/5 by default) with
    `restarts` random starts; per example the first restart that misclassifies is kept, else
    the last restart's iterate. restarts=1 is exactly pgd_cross_entropy(..., key); see
    `_with_restarts` for the keys of the other restarts.

    x: [B, H, W, C] in [0, 1]; y: [B] int; unroll as `pgd_attack`.
    Returns x_adv [B, H, W, C], gradient-stopped.
    """
    def single(k):
        return pgd_cross_entropy(logits_fn, x, y, k, eps=eps, steps=steps, step_size=step_size,
                                 unroll=unroll)

    return _with_restarts(single, logits_fn, x, y, key, restarts)


def apgd_checkpoints(steps: int) -> tuple[int, ...]:
    """APGD's checkpoints w_1 < w_2 < ... <= steps (iteration counts after which the step
    size is checked), as the reference code computes them (autoattack/autopgd_base.py):
    first after max(int(0.22 N), 1) iterations, then intervals shrinking by
    max(int(0.03 N), 1) down to max(int(0.06 N), 1). For N = 100 these are ceil(p_j N) of the
    paper's p_0 = 0, p_1 = 0.22, p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06):
    22, 41, 57, 70, 80, 87, 93, 99.
    """
    k = max(int(0.22 * steps), 1)
    k_min, decrease = max(int(0.06 * steps), 1), max(int(0.03 * steps), 1)
    points, at = [], k
    while at <= steps:
        points.append(at)
        k = max(k - decrease, k_min)
        at += k
    return tuple(points)


def _apgd_single(logits_fn, x, y, key, *, eps, steps, rho, alpha, unroll):
    """One APGD-CE run (Croce & Hein 2020, Algorithm 1, l_inf; the reference code's order of
    operations). Returns x_adv [B, ...]: per example the last misclassified iterate if one was
    found, else the iterate with the largest CE."""
    ndim = x.ndim
    bcast = lambda v: v.reshape((-1,) + (1,) * (ndim - 1))  # noqa: E731
    x = jax.lax.stop_gradient(x)
    proj = lambda z: project_linf(z, x, eps)  # noqa: E731

    def loss_grad(xa):
        def total(z):
            logits = logits_fn(z)
            losses = cross_entropy(logits, y)
            return jnp.sum(losses), (losses, logits)
        g, (losses, logits) = jax.grad(total, has_aux=True)(xa)
        return losses, g, jnp.argmax(logits, axis=-1) != y

    # Start: x + eps * t / ||t||_inf, t ~ U(-1, 1)^d per example, clipped to [0, 1].
    t = jax.random.uniform(key, x.shape, x.dtype, -1.0, 1.0)
    x0 = jnp.clip(x + eps * t / (_per_example_max_abs(t) + 1e-12), 0.0, 1.0)
    loss0, g0, wrong0 = loss_grad(x0)

    checks = apgd_checkpoints(steps)
    is_check, interval = [False] * steps, [0] * steps
    previous = 0
    for c in checks:
        is_check[c - 1], interval[c - 1], previous = True, c - previous, c
    is_check, interval = jnp.asarray(is_check), jnp.asarray(interval, jnp.float32)

    def body(i, s):
        step = s["step"]
        a = jnp.where(i == 0, 1.0, alpha).astype(x.dtype)
        z = proj(s["x"] + bcast(step) * jnp.sign(s["grad"]))
        x_new = proj(s["x"] + a * (z - s["x"]) + (1 - a) * (s["x"] - s["x_old"]))
        loss, grad, wrong = loss_grad(x_new)

        x_best_adv = jnp.where(bcast(wrong), x_new, s["x_best_adv"])
        better = loss > s["loss_best"]
        x_best = jnp.where(bcast(better), x_new, s["x_best"])
        grad_best = jnp.where(bcast(better), grad, s["grad_best"])
        loss_best = jnp.maximum(loss, s["loss_best"])
        n_up = s["n_up"] + (loss > s["loss_prev"]).astype(jnp.float32)

        # Checkpoint: halve where the loss rose in at most a fraction rho of the interval's
        # steps, or where the step was not halved last time and the best loss did not grow.
        check = is_check[i]
        oscillates = n_up <= interval[i] * rho
        stuck = ~s["reduced_last"] & (s["loss_best_last"] >= loss_best)
        reduce = check & (oscillates | stuck)
        return {
            "x": jnp.where(bcast(reduce), x_best, x_new),
            "x_old": s["x"],
            "grad": jnp.where(bcast(reduce), grad_best, grad),
            "step": jnp.where(reduce, step / 2, step),
            "loss_prev": loss,
            "n_up": jnp.where(check, 0.0, n_up),
            "reduced_last": jnp.where(check, oscillates | stuck, s["reduced_last"]),
            "loss_best_last": jnp.where(check, loss_best, s["loss_best_last"]),
            "x_best": x_best, "grad_best": grad_best, "loss_best": loss_best,
            "x_best_adv": x_best_adv, "fooled": s["fooled"] | wrong,
        }

    state = {
        "x": x0, "x_old": x0, "grad": g0,
        "step": jnp.full((x.shape[0],), 2.0 * eps, x.dtype),
        "loss_prev": loss0, "n_up": jnp.zeros((x.shape[0],), jnp.float32),
        "reduced_last": jnp.ones((x.shape[0],), bool), "loss_best_last": loss0,
        "x_best": x0, "grad_best": g0, "loss_best": loss0,
        "x_best_adv": x0, "fooled": wrong0,
    }
    s = jax.lax.fori_loop(0, steps, body, state, unroll=unroll)
    return jnp.where(bcast(s["fooled"]), s["x_best_adv"], s["x_best"])


def apgd_ce(logits_fn, x, y, key, *, eps, steps=100, restarts=1, rho=0.75, alpha=0.75,
            unroll=True):
    """APGD-CE, the l_inf Auto-PGD on cross-entropy of AutoAttack (Croce & Hein, ICML 2020).

    Per example: start x + eps * t / ||t||_inf (t ~ U(-1, 1)), clipped to [0, 1]; step size
    2 * eps; each iteration z = P(x_k + eta * sign(grad)), x_{k+1} = P(x_k + alpha (z - x_k)
    + (1 - alpha)(x_k - x_{k-1})) (alpha = 1 at the first step), P = projection on the eps
    ball and [0, 1]. At the checkpoints of `apgd_checkpoints(steps)` the step size is halved,
    and the iterate and gradient reset to the best point, where the CE increased in at most a
    fraction rho of the interval's steps, or where the step size was not halved at the last
    checkpoint and the best CE did not grow since. Per-example step sizes; one
    `lax.fori_loop`, unrolled by default (`unroll`: XLA:CPU runs a rolled loop's
    convolutions slowly, but an unrolled 100-step loop compiles for long: ~9 s for a linear
    model and ~20 s for CNN1 on 2 CPU cores, ~2 s rolled). (The reference code compares the
    first interval's first loss with 0 instead of the start's loss; we use the start's loss,
    as in the paper.)

    Per run the result is the last misclassified iterate if any, else the highest-CE
    iterate. Restarts as `pgd_restarts` (restart 0 uses `key`; the first restart that
    misclassifies is kept).

    Args:
      logits_fn: x [B, H, W, C] -> logits [B, K] (eval mode).
      x: [B, H, W, C] in [0, 1]; y: [B] int; eps in pixel units; steps, restarts: ints.
      rho: the oscillation threshold; alpha: the momentum; unroll: unroll the loop.

    Returns:
      x_adv [B, H, W, C], gradient-stopped.
    """
    def single(k):
        return _apgd_single(logits_fn, x, y, k, eps=eps, steps=steps, rho=rho, alpha=alpha,
                            unroll=unroll)

    return jax.lax.stop_gradient(_with_restarts(single, logits_fn, x, y, key, restarts))
