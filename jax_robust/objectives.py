"""The six training objectives of the paper, one function each, one signature (methods.py
registers them by name):

    objective(model_fn, params, model_state, batch, key, hp) -> (loss, (model_state, metrics))

model_fn(params, model_state, x, train, key) -> (logits, model_state) (models.make_model_fn);
batch = {"x": [B, H, W, C] in [0, 1], "y": [B] int, "mask": [B] float, 1 for real examples};
hp: `ObjectiveParams`. The loss is the official SUMMED loss divided by the batch size B
(padded rows weigh 0), so the official summed-loss SGD learning rate times B gives the same
updates, the smaller last batch of an epoch included.

`hp.variant` selects what is computed where the official code and the paper differ
(docs/paper.md, section 10):
  natural  identical.
  at, rst  official: the PGD attack runs in train mode (dropout on, BatchNorm batch statistics,
           running statistics updated by every attack iterate); paper: eval mode.
  trades   official: attack in eval mode from x + 0.001 N(0,1); loss CE(f(x)) + beta KL(f(x) ||
           f(x')) with a third, separate forward pass f(x) for the KL (new dropout mask); paper:
           the KL reuses the CE's f(x).
  gr       official: parameter gradient 2 grad(sum L) + lam/2 grad(sum D^2) (the code
           accumulates the CE gradient twice); paper: grad(sum L + lam/2 sum D^2).
           D_i = (L_i(x + h v_i) - L_i(x)) / h, v_i = grad_x L_i / ||grad_x L_i||_2 (constant).
  llr      official: the input gradient is zeroed before use, so the loss is
           CE(f(x)) + lam CE(f(x + delta)); paper: L(x) + lam g(delta) + mu |delta . grad_x L|,
           g(delta) = |L(x+delta) - L(x) - delta . grad_x L(x)| per example, with the input
           gradient differentiated (double back-propagation). Both find delta by 2 steps of
           size eps/2 of l_inf-normalised ascent (eval mode), rescaled into the ball.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import chex
import jax
import jax.numpy as jnp

from jax_robust.attacks import cross_entropy, pgd_attack


@dataclasses.dataclass(frozen=True)
class ObjectiveParams:
    """What an objective needs of the run (static under jit). Sizes in pixel units.

    hparams: the method's resolved hyperparameters as sorted (name, value) pairs (methods.py
    declares them); read one with hp["lam"]. unroll: unroll the attack loops (a speed option).
    """

    eps: float
    step_size: float  # PGD step of AT, RST, TRADES
    steps: int
    variant: str
    hparams: tuple[tuple[str, float], ...]
    unroll: bool

    def __getitem__(self, name: str) -> float:
        return dict(self.hparams)[name]


def unpack_batch(batch: dict) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(x [B, H, W, C], y [B] int, mask [B]) of a batch, shapes asserted."""
    x, y, mask = batch["x"], batch["y"], batch["mask"]
    chex.assert_rank(x, 4)
    chex.assert_shape([y, mask], (x.shape[0],))
    chex.assert_type(y, int)
    return x, y, mask


def masked_mean(values: jax.Array, mask: jax.Array) -> jax.Array:
    """sum_i mask_i values_i / B: the official summed loss over real examples, divided by B."""
    return jnp.sum(values * mask) / values.shape[0]


def kl_divergence(logits_p: jax.Array, logits_q: jax.Array) -> jax.Array:
    """KL(softmax p || softmax q) per example [B]."""
    logp = jax.nn.log_softmax(logits_p.astype(jnp.float32))
    logq = jax.nn.log_softmax(logits_q.astype(jnp.float32))
    return jnp.sum(jnp.exp(logp) * (logp - logq), axis=-1)


def _metrics(loss, logits, y, mask):
    correct = jnp.sum((jnp.argmax(logits, -1) == y) * mask)
    return {"loss": loss, "correct": correct, "count": jnp.sum(mask)}


def _flat_dot(a, b):
    return jnp.sum((a * b).reshape(a.shape[0], -1), axis=1)


def _ce_pgd(model_fn, params, state, x, y, key, hp, train_mode: bool):
    """PGD on CE (random start, `hp.steps` sign steps of `hp.step_size`); returns (x_adv, state).

    In train mode every iterate uses a fresh dropout mask and BatchNorm batch statistics and
    updates the running statistics, as the official AT/RST attack does.
    """
    init_key, drop_key = jax.random.split(key)
    params = jax.lax.stop_gradient(params)

    def loss(xa, aux):
        st, k = aux
        k, sub = jax.random.split(k)
        logits, st = model_fn(params, st, xa, train_mode, sub)
        return cross_entropy(logits, y), (st, k)

    x_adv, (state, _) = pgd_attack(loss, x, init_key, eps=hp.eps, steps=hp.steps,
                                   step_size=hp.step_size, aux=(state, drop_key),
                                   unroll=hp.unroll)
    return x_adv, jax.lax.stop_gradient(state)


def natural_objective(model_fn, params, state, batch, key, hp):
    x, y, mask = unpack_batch(batch)
    logits, state = model_fn(params, state, x, True, key)
    loss = masked_mean(cross_entropy(logits, y), mask)
    return loss, (state, _metrics(loss, logits, y, mask))


def at_objective(model_fn, params, state, batch, key, hp):
    x, y, mask = unpack_batch(batch)
    attack_key, key = jax.random.split(key)
    x_adv, state = _ce_pgd(model_fn, params, state, x, y, attack_key, hp,
                           train_mode=hp.variant == "official")
    logits, state = model_fn(params, state, x_adv, True, key)
    loss = masked_mean(cross_entropy(logits, y), mask)
    return loss, (state, _metrics(loss, logits, y, mask))


def rst_objective(model_fn, params, state, batch, key, hp):
    x, y, mask = unpack_batch(batch)
    attack_key, k_adv, k_nat = jax.random.split(key, 3)
    x_adv, state = _ce_pgd(model_fn, params, state, x, y, attack_key, hp,
                           train_mode=hp.variant == "official")
    logits_adv, state = model_fn(params, state, x_adv, True, k_adv)  # official order: adv first
    logits, state = model_fn(params, state, x, True, k_nat)
    per_example = cross_entropy(logits, y) + hp["lam"] * cross_entropy(logits_adv, y)
    loss = masked_mean(per_example, mask)
    return loss, (state, _metrics(loss, logits, y, mask))


def trades_objective(model_fn, params, state, batch, key, hp):
    x, y, mask = unpack_batch(batch)
    attack_key, k1, k2, k3 = jax.random.split(key, 4)
    frozen = jax.lax.stop_gradient(params)
    clean_eval, _ = model_fn(frozen, state, x, False, None)

    def kl_to_clean(xa):
        return kl_divergence(clean_eval, model_fn(frozen, state, xa, False, None)[0])

    x_adv = pgd_attack(kl_to_clean, x, attack_key, eps=hp.eps, steps=hp.steps,
                       step_size=hp.step_size, init="normal", init_scale=0.001,
                       unroll=hp.unroll)
    logits, state = model_fn(params, state, x, True, k1)
    logits_adv, state = model_fn(params, state, x_adv, True, k2)
    if hp.variant == "official":
        logits_kl, state = model_fn(params, state, x, True, k3)
    else:
        logits_kl = logits
    per_example = cross_entropy(logits, y) + hp["beta"] * kl_divergence(logits_kl, logits_adv)
    loss = masked_mean(per_example, mask)
    return loss, (state, _metrics(loss, logits, y, mask))


def _ce_and_input_grad(model_fn, params, state, x, y, mask, key, train_mode):
    """(per-example CE [B], grad_x sum_i mask_i CE_i [B, ...], logits, state) from ONE forward."""

    def ce(xi):
        logits, st = model_fn(params, state, xi, train_mode, key)
        return cross_entropy(logits, y), (logits, st)

    losses, vjp_fn, (logits, state) = jax.vjp(ce, x, has_aux=True)
    (grad_x,) = vjp_fn(mask.astype(losses.dtype))
    return losses, grad_x, logits, state


def gr_objective(model_fn, params, state, batch, key, hp):
    x, y, mask = unpack_batch(batch)
    k1, k2 = jax.random.split(key)
    losses, grad_x, logits, state = _ce_and_input_grad(model_fn, params, state, x, y, mask, k1,
                                                       train_mode=True)
    norm = jnp.sqrt(_flat_dot(grad_x, grad_x)).reshape((-1,) + (1,) * (x.ndim - 1))
    v = jax.lax.stop_gradient(jnp.where(norm > 0, grad_x / jnp.where(norm > 0, norm, 1.0),
                                        grad_x))
    logits_f, state = model_fn(params, state, x + hp["gr_h"] * v, True, k2)
    diff = (cross_entropy(logits_f, y) - losses) / hp["gr_h"]
    loss = masked_mean(losses + 0.5 * hp["lam"] * diff**2, mask)
    if hp.variant == "official":  # the CE's parameter gradient is accumulated twice
        ce_term = masked_mean(losses, mask)
        loss_for_grad = loss + ce_term - jax.lax.stop_gradient(ce_term)
    else:
        loss_for_grad = loss
    return loss_for_grad, (state, _metrics(loss, logits, y, mask))


def _llr_delta(x, key, hp, loss_of_adv: Callable):
    """delta from `hp["llr_steps"]` l_inf-normalised ascent steps of eps/2 on `loss_of_adv`."""
    x_adv = pgd_attack(loss_of_adv, x, key, eps=hp.eps, steps=hp["llr_steps"],
                       step_size=hp.eps / 2, init="normal", init_scale=0.001,
                       update="linf_normalized", project="rescale", unroll=hp.unroll)
    return x_adv - x


def llr_objective(model_fn, params, state, batch, key, hp):
    x, y, mask = unpack_batch(batch)
    attack_key, k1, k2 = jax.random.split(key, 3)
    frozen = jax.lax.stop_gradient(params)

    def eval_ce(xa):
        return cross_entropy(model_fn(frozen, state, xa, False, None)[0], y)

    if hp.variant == "official":
        # The official input gradient is zeroed in place, so g(delta) = CE_sum(f(x + delta)).
        delta = _llr_delta(x, attack_key, hp, eval_ce)
        logits, state = model_fn(params, state, x, True, k1)
        logits_d, state = model_fn(params, state, x + delta, True, k2)
        per_example = cross_entropy(logits, y) + hp["lam"] * cross_entropy(logits_d, y)
        loss = masked_mean(per_example, mask)
        return loss, (state, _metrics(loss, logits, y, mask))

    # Paper (Qin et al. 2019): per-example local linearity with the true input gradient.
    clean_ce, clean_grad, _, _ = _ce_and_input_grad(model_fn, frozen, state, x, y, mask, None,
                                                    train_mode=False)

    def nonlinearity(xa):
        return jnp.abs(eval_ce(xa) - clean_ce - _flat_dot(xa - x, clean_grad))

    delta = _llr_delta(x, attack_key, hp, nonlinearity)
    losses, grad_x, logits, state = _ce_and_input_grad(model_fn, params, state, x, y, mask, k1,
                                                       train_mode=True)
    # Same dropout mask (key k1) for L(x + delta) as for L(x), so g measures one function.
    logits_d, state = model_fn(params, state, x + delta, True, k1)
    dot = _flat_dot(delta, grad_x)
    g = jnp.abs(cross_entropy(logits_d, y) - losses - dot)
    per_example = losses + hp["lam"] * g + hp["mu"] * jnp.abs(dot)
    loss = masked_mean(per_example, mask)
    return loss, (state, _metrics(loss, logits, y, mask))
