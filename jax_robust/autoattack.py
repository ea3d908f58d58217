"""AutoAttack (Croce & Hein, ICML 2020), l_inf, as the reference code fra31/auto-attack runs it.

    from jax_robust.autoattack import autoattack
    apply_fn = lambda variables, x: model.apply(variables, x, train=False)   # eval mode
    out = autoattack(apply_fn, variables, x_test, y_test, 0.1, key=0, log=print)
    out["robust_acc"], out["robust_acc_after"], out["robust_flags"], out["x_adv"]

Versions (the reference's `AutoAttack(version=...)`, l_inf):
  "standard"  APGD-CE (100 iterations, 1 restart), APGD-T (targeted DLR, the 9 highest
              non-true classes of the clean logits, 100 iterations each), FAB-T (9 targets, 100
              iterations), Square (5000 queries, p_init 0.8), in this order
  "plus"      APGD-CE and APGD-DLR (5 restarts each), FAB (untargeted, 5 restarts), Square,
              APGD-T, FAB-T
  "rand"      APGD-CE and APGD-DLR with EOT over 20 forward passes (randomised models)
  "custom"    the `attacks` given: names from ATTACKS with the reference's constructor
              settings (APGD-CE / APGD-DLR 5 restarts, FAB 5 restarts, the rest as standard),
              or `AttackSpec`s with settings of your own
Each attack runs only on the points still robust (clean-correct and not yet fooled), starts
from the clean image, and the first successful adversarial example is kept; the result is the
per-example worst case. docs/autoattack.md lists every rule kept from the reference and every
departure.

Pieces (pure functions of `logits_fn: x [B, H, W, C] -> logits [B, K]`, x in [0, 1]):
  dlr_loss, dlr_loss_targeted, margin           the losses
  apgd_run                                      one APGD run from a given start (any loss)
  fab_projection_linf                           FAB's box-constrained l_inf hyperplane step
  fab_run                                       one FAB run (targeted or untargeted)
  square_p_schedule, square_sizes, square_run   Square's p schedule and one run
  autoattack                                    the whole evaluation, batched and jitted

Programs: one jitted program per attack (and one for the clean predictions), compiled ahead of
time on the first batch and reused for every batch, target and restart: every batch is padded
to one shape (repeating its own points), so nothing recompiles between batches or stages. An
attack's iterations are a `lax.fori_loop` (APGD, FAB; rolled by default, see `unroll`) or a
`lax.while_loop` (Square, which stops when no point of the batch is left to fool). Between
sub-runs (a target of APGD-T / FAB-T, a restart) the host gathers the points still robust, as
the reference does per batch.

Randomness: every draw comes from `key`. Attack a (stream STREAM[a]) sub-run s (target or
restart) uses k = fold_in(fold_in(key, STREAM[a]), s) and (k_examples, k_batches) = split(k):
an example's own draws (APGD's and FAB's random starts, Square's stripes) use
fold_in(k_examples, example index), so they do not depend on the batching; draws shared by a
batch (Square's squares and signs, a randomised model's forward passes) use
fold_in(k_batches, batch number).
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jax_robust.attacks import apgd_checkpoints, project_linf
from jax_robust.distributed import to_host
from jax_robust.errors import Interrupted
from jax_robust.pipeline import padded_batch

ATTACKS = ("apgd-ce", "apgd-dlr", "apgd-t", "fab", "fab-t", "square")
VERSIONS = ("standard", "plus", "rand", "custom")
STREAM = {name: i + 1 for i, name in enumerate(ATTACKS)}  # key streams, one per attack
_FAB_NO_ADV = 1e10  # the reference's "no adversarial point found yet" norm


@dataclasses.dataclass(frozen=True)
class AttackSpec:
    """One attack and its settings; the defaults are the reference's standard l_inf ones.

    name: one of ATTACKS. n_iter: iterations (APGD, FAB) or queries (Square). restarts: runs
    per point (per target for apgd-t / fab-t); FAB's restarts after the first start at a
    random point at l_inf distance eps / 2. n_targets: apgd-t / fab-t target classes (the
    2nd, 3rd, ... highest clean logit). eot_iter: APGD's forward/backward passes averaged per
    gradient (EOT). rho: APGD's oscillation threshold; momentum: APGD's 0.75. p_init: Square's
    initial fraction of pixels in the square. alpha_max, eta, beta: FAB's step bound,
    overshoot and backward step.
    """

    name: str
    n_iter: int = 100
    restarts: int = 1
    n_targets: int = 9
    eot_iter: int = 1
    rho: float = 0.75
    momentum: float = 0.75
    p_init: float = 0.8
    alpha_max: float = 0.1
    eta: float = 1.05
    beta: float = 0.9

    @property
    def sub_runs(self) -> int:
        """Runs per point: targets x restarts (targeted attacks), else restarts."""
        targeted = self.name in ("apgd-t", "fab-t")
        return (self.n_targets if targeted else 1) * self.restarts


def version_specs(version: str, attacks: Sequence[str | AttackSpec] | None = None
                  ) -> tuple[AttackSpec, ...]:
    """The attacks, in order, with their settings, of a version of the reference.

    version: one of VERSIONS; attacks: only with "custom" (names from ATTACKS, which get the
    reference's AutoAttack-constructor settings, or AttackSpec). Raises ValueError otherwise.
    """
    if version not in VERSIONS:
        raise ValueError(f"unknown version {version!r}; choose one of {', '.join(VERSIONS)}")
    if version != "custom":
        if attacks is not None:
            raise ValueError(f"attacks= is only taken with version='custom' (version "
                             f"{version!r} fixes its attacks), as in the reference")
        return {
            "standard": (AttackSpec("apgd-ce"), AttackSpec("apgd-t"), AttackSpec("fab-t"),
                         AttackSpec("square", n_iter=5000)),
            "plus": (AttackSpec("apgd-ce", restarts=5), AttackSpec("apgd-dlr", restarts=5),
                     AttackSpec("fab", restarts=5), AttackSpec("square", n_iter=5000),
                     AttackSpec("apgd-t"), AttackSpec("fab-t")),
            "rand": (AttackSpec("apgd-ce", eot_iter=20), AttackSpec("apgd-dlr", eot_iter=20)),
        }[version]
    if not attacks:
        raise ValueError("version='custom' needs a non-empty list of attacks")
    custom_defaults = {"apgd-ce": AttackSpec("apgd-ce", restarts=5),
                       "apgd-dlr": AttackSpec("apgd-dlr", restarts=5),
                       "apgd-t": AttackSpec("apgd-t"), "fab": AttackSpec("fab", restarts=5),
                       "fab-t": AttackSpec("fab-t"), "square": AttackSpec("square", n_iter=5000)}
    specs = []
    for a in ([attacks] if isinstance(attacks, (str, AttackSpec)) else attacks):
        spec = custom_defaults.get(a) if isinstance(a, str) else a
        if spec is None or spec.name not in ATTACKS:
            raise ValueError(f"unknown attack {a!r}; choices: {', '.join(ATTACKS)}")
        if spec.name == "fab-t" and spec.restarts != 1:
            spec = dataclasses.replace(spec, restarts=1)  # the reference forces 1 for fab-t
        if min(spec.n_iter, spec.restarts, spec.n_targets, spec.eot_iter) < 1:
            raise ValueError(f"{spec}: n_iter, restarts, n_targets and eot_iter must be >= 1")
        specs.append(spec)
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise ValueError(f"each attack at most once, got {names}")
    return tuple(specs)


# ------------------------------------------------------------------------------------ losses


def _linf(v: jax.Array) -> jax.Array:
    """[B]: ||v_i||_inf of v [B, ...]."""
    return jnp.max(jnp.abs(v.reshape(v.shape[0], -1)), axis=1)


def _bcast(v: jax.Array, ndim: int) -> jax.Array:
    return v.reshape((-1,) + (1,) * (ndim - 1))


def _float(logits: jax.Array) -> jax.Array:
    """logits in float32, or float64 when they are (the float64 cross-checks)."""
    return logits.astype(jnp.promote_types(logits.dtype, jnp.float32))


def ce_loss(logits: jax.Array, y: jax.Array) -> jax.Array:
    """[B] cross-entropy of logits [B, K] against int labels [B] (attacks.cross_entropy,
    which computes in float32, but in float64 for float64 logits)."""
    logp = jax.nn.log_softmax(_float(logits))
    return -jnp.take_along_axis(logp, y[:, None], axis=1)[:, 0]


def dlr_loss(logits: jax.Array, y: jax.Array) -> jax.Array:
    """[B] DLR loss (Croce & Hein 2020, eq. 3) of logits [B, K >= 3], int labels [B]:
    -(z_y - max_{j != y} z_j) / (z_(1) - z_(3) + 1e-12), z_(i) the i-th largest logit."""
    z = _float(logits)
    zs = jnp.sort(z, axis=1)
    z_y = jnp.take_along_axis(z, y[:, None], axis=1)[:, 0]
    top_is_y = jnp.argmax(z, axis=1) == y
    other = jnp.where(top_is_y, zs[:, -2], zs[:, -1])
    return -(z_y - other) / (zs[:, -1] - zs[:, -3] + 1e-12)


def dlr_loss_targeted(logits: jax.Array, y: jax.Array, target: jax.Array) -> jax.Array:
    """[B] targeted DLR loss of logits [B, K >= 4] toward int targets [B]:
    -(z_y - z_t) / (z_(1) - (z_(3) + z_(4)) / 2 + 1e-12)."""
    z = _float(logits)
    zs = jnp.sort(z, axis=1)
    pick = lambda c: jnp.take_along_axis(z, c[:, None], axis=1)[:, 0]  # noqa: E731
    return -(pick(y) - pick(target)) / (zs[:, -1] - 0.5 * (zs[:, -3] + zs[:, -4]) + 1e-12)


def margin(logits: jax.Array, y: jax.Array) -> jax.Array:
    """[B] z_y - max_{j != y} z_j (Square's loss; <= 0 means misclassified)."""
    z = _float(logits)
    z_y = jnp.take_along_axis(z, y[:, None], axis=1)[:, 0]
    others = jnp.where(jax.nn.one_hot(y, z.shape[1], dtype=bool), -jnp.inf, z)
    return z_y - jnp.max(others, axis=1)


def ranked_target(clean_logits: jax.Array, rank: jax.Array | int) -> jax.Array:
    """[B] int: the class with the rank-th largest clean logit (rank 2 = the runner-up), the
    reference's `logits.sort(dim=1)[1][:, -rank]`."""
    order = jnp.argsort(clean_logits, axis=1)
    return jnp.take(order, clean_logits.shape[1] - rank, axis=1)


# -------------------------------------------------------------------------------------- APGD


def apgd_run(logits_fn: Callable, x: jax.Array, y: jax.Array, x_init: jax.Array, *, eps,
             n_iter: int, loss: str = "ce", target: jax.Array | None = None, rho: float = 0.75,
             momentum: float = 0.75, eot_iter: int = 1, key: jax.Array | None = None,
             unroll: bool | int = False) -> dict[str, jax.Array]:
    """One l_inf APGD run from x_init, in the reference's order of operations
    (`APGDAttack.attack_single_run(x, y, x_init)`).

    Step size 2 eps per example; z = P(x_k + eta sign(g)), x_{k+1} = P(x_k + a (z - x_k) +
    (1 - a)(x_k - x_{k-1})) with a = 1 at the first step, else `momentum`; P = clip to the eps
    ball and [0, 1]. At the checkpoints `attacks.apgd_checkpoints(n_iter)`, for examples
    where the loss rose in at most rho x (interval length) of the interval's steps, or where
    the step was not halved at the last checkpoint and the best loss did not grow, the step
    halves and the iterate and gradient reset to the best point. The reference counts the
    first interval's first step as a rise when its loss is > 0 (it compares with an unwritten,
    zero, row of its loss table): kept. Gradients are the mean over `eot_iter` passes.

    Args:
      logits_fn: (x [B, H, W, C], key) -> logits [B, K]; the key drives a randomised model
        (one fresh key per forward pass), a deterministic one ignores it.
      x: clean points [B, H, W, C] in [0, 1]; y: int labels [B]; x_init: start [B, ...]
        (clipped to [0, 1]); eps: radius in pixel units (may be traced).
      loss: "ce", "dlr" or "dlr-targeted" (then `target` [B] int).
      key: the randomised model's keys (None: jax.random.key(0)); unroll: the loop's unroll.

    Returns dict: "x_best" (highest-loss iterate), "loss_best" [B], "fooled" [B] bool (some
    iterate, the start included, was misclassified), "x_best_adv" (the last misclassified
    iterate, else the start), all gradient-stopped.
    """
    nd = x.ndim
    x = jax.lax.stop_gradient(x)
    key = jax.random.key(0) if key is None else key
    proj = lambda z: project_linf(z, x, eps)  # noqa: E731
    if loss == "ce":
        loss_of = lambda logits: ce_loss(logits, y)  # noqa: E731
    elif loss == "dlr":
        loss_of = lambda logits: dlr_loss(logits, y)  # noqa: E731
    elif loss == "dlr-targeted":
        loss_of = lambda logits: dlr_loss_targeted(logits, y, target)  # noqa: E731
    else:
        raise ValueError(f"unknown loss {loss!r}")

    def loss_grad(z, k):
        """(loss [B], grad [B, ...] averaged over eot_iter passes, correct [B]); the loss
        and prediction are those of the last pass, as in the reference."""
        def one(e):
            def total(zz):
                logits = logits_fn(zz, jax.random.fold_in(k, e))
                losses = loss_of(logits)
                return jnp.sum(losses), (losses, logits)
            g, (losses, logits) = jax.grad(total, has_aux=True)(z)
            return g, losses, jnp.argmax(logits, axis=-1) == y
        if eot_iter == 1:
            g, losses, correct = one(0)
            return losses, g / 1.0, correct

        def eot(carry, e):
            g, _, _ = carry
            g_e, losses, correct = one(e)
            return (g + g_e, losses, correct), None
        init = (jnp.zeros_like(z), jnp.zeros(z.shape[:1], _float(z).dtype),
                jnp.ones(z.shape[:1], bool))
        (g, losses, correct), _ = jax.lax.scan(eot, init, jnp.arange(eot_iter))
        return losses, g / float(eot_iter), correct

    x0 = jnp.clip(x_init, 0.0, 1.0)
    loss0, g0, correct0 = loss_grad(x0, jax.random.fold_in(key, n_iter))

    checks = apgd_checkpoints(n_iter)
    is_check, interval, previous = np.zeros(n_iter, bool), np.zeros(n_iter, np.float32), 0
    for c in checks:
        is_check[c - 1], interval[c - 1], previous = True, c - previous, c
    is_check, threshold = jnp.asarray(is_check), jnp.asarray(interval * np.float32(rho))

    def body(i, s):
        a = jnp.where(i == 0, 1.0, momentum).astype(x.dtype)
        step = _bcast(s["step"], nd)
        z = proj(s["x"] + step * jnp.sign(s["grad"]))
        x_new = proj(s["x"] + (z - s["x"]) * a + (s["x"] - s["x_old"]) * (1 - a))
        losses, grad, correct = loss_grad(x_new, jax.random.fold_in(key, i))
        x_best_adv = jnp.where(_bcast(~correct, nd), x_new, s["x_best_adv"])
        better = losses > s["loss_best"]
        x_best = jnp.where(_bcast(better, nd), x_new, s["x_best"])
        grad_best = jnp.where(_bcast(better, nd), grad, s["grad_best"])
        loss_best = jnp.where(better, losses, s["loss_best"])
        n_up = s["n_up"] + (losses > s["loss_prev"]).astype(jnp.float32)

        check = is_check[i]
        reduce = check & ((n_up <= threshold[i])
                          | (~s["reduced_last"] & (s["loss_best_last"] >= loss_best)))
        return {
            "x": jnp.where(_bcast(reduce, nd), x_best, x_new), "x_old": s["x"],
            "grad": jnp.where(_bcast(reduce, nd), grad_best, grad),
            "step": jnp.where(reduce, s["step"] / 2.0, s["step"]),
            "loss_prev": losses, "n_up": jnp.where(check, 0.0, n_up),
            "reduced_last": jnp.where(check, reduce, s["reduced_last"]),
            "loss_best_last": jnp.where(check, loss_best, s["loss_best_last"]),
            "x_best": x_best, "grad_best": grad_best, "loss_best": loss_best,
            "x_best_adv": x_best_adv, "correct": s["correct"] & correct,
        }

    b = x.shape[0]
    state = {
        "x": x0, "x_old": x0, "grad": g0, "step": jnp.full((b,), 2.0, x.dtype) * eps,
        # The reference's first comparison is with 0 (its loss table's unwritten last row);
        # with a single iteration that row is the first loss itself (never a rise).
        "loss_prev": jnp.full((b,), 0.0 if n_iter > 1 else jnp.inf, loss0.dtype),
        "n_up": jnp.zeros((b,), jnp.float32), "reduced_last": jnp.ones((b,), bool),
        "loss_best_last": loss0, "x_best": x0, "grad_best": g0, "loss_best": loss0,
        "x_best_adv": x0, "correct": correct0,
    }
    s = jax.lax.fori_loop(0, n_iter, body, state, unroll=unroll)
    out = {"x_best": s["x_best"], "loss_best": s["loss_best"], "fooled": ~s["correct"],
           "x_best_adv": s["x_best_adv"]}
    return jax.tree_util.tree_map(jax.lax.stop_gradient, out)


def apgd_start(x: jax.Array, noise: jax.Array, eps) -> jax.Array:
    """APGD's random start x + eps * t / ||t||_inf for noise t ~ U(-1, 1) [B, ...] (not
    clipped; apgd_run clips)."""
    return x + eps * (noise / (_bcast(_linf(noise), x.ndim) + 1e-12))


# --------------------------------------------------------------------------------------- FAB


def _sortable(v: jax.Array) -> jax.Array:
    """int32 keys ordered as the float32 values v (not NaN): XLA:CPU sorts int32 about 5x
    faster than float32."""
    bits = jax.lax.bitcast_convert_type(v.astype(jnp.float32), jnp.int32)
    return bits ^ ((bits >> 31) & 0x7FFFFFFF)


def _sorted_desc(v: jax.Array) -> jax.Array:
    """v [R, D] float32 sorted in decreasing order along axis 1."""
    keys = jnp.sort(_sortable(v), axis=1)[:, ::-1]
    return jax.lax.bitcast_convert_type(keys ^ ((keys >> 31) & 0x7FFFFFFF), jnp.float32)


def fab_projection_linf(points: jax.Array, w: jax.Array, b: jax.Array) -> jax.Array:
    """FAB's l_inf projection: per row, the smallest-||d||_inf step d with w.(t + d) = b and
    t + d in [0, 1]^D (when the box cannot reach the hyperplane: the step to the box corner
    that moves w.(t + d) furthest toward b).

    Args: points t [R, D], w [R, D], b [R]. Returns d [R, D] (0 where w = 0).

    The reference's algorithm (fab_projections.projection_linf), its branches and its binary
    search: each coordinate can move p_i toward the hyperplane before it hits the box; with
    the coordinates in decreasing order of p, ceil(log2 D) halvings find the position j where
    moving every coordinate by min(p_i, p_(j)) stops reaching the hyperplane, and the bound
    lambda follows in closed form; d_i = +-min(p_i, lambda). The reference evaluates the
    change at position j from cumulative sums over its sorted order; here it is the same
    quantity, -sum_i |w_i| min(p_i, p_(j)), as a reduction (it does not depend on how ties
    are ordered), so only the values p are sorted (no argsort, no gathers: XLA:CPU's
    multi-operand and float sorts are slow). Equal to the reference up to float rounding.
    """
    t = points
    d_dim = t.shape[1]
    rows = jnp.arange(t.shape[0])
    flip = jnp.where(jnp.sum(w * t, axis=1) - b >= 0, 1.0, -1.0).astype(t.dtype)
    w, b = w * flip[:, None], b * flip
    a = (w < 0).astype(t.dtype)  # 1: move up to 1 lowers w.t; 0: move down to 0
    nonzero = (w != 0).astype(t.dtype)
    d = (a - t) * nonzero  # the whole way to the box, toward the hyperplane
    p = a - t * (2 * a - 1)  # how far each coordinate can move
    b = b - jnp.sum(w * t, axis=1)  # the change of w.t needed (<= 0)
    b0 = jnp.sum(w * d, axis=1)  # the largest change the box allows
    abs_w = jnp.abs(w)
    p_desc = _sorted_desc(p).astype(t.dtype)

    def reach(v):
        """[R]: how far w.t moves when each coordinate moves min(p_i, v_r) (>= 0)."""
        return jnp.sum(abs_w * jnp.minimum(p, v[:, None]), axis=1)

    all_free = b + reach(p_desc[:, -1]) > 0  # lambda below every p_i: nothing hits the box
    search = (b - b0 > 0) & ~all_free

    def halve(_, bounds):
        lb, ub = bounds
        mid = jnp.floor((lb + ub) / 2)
        go_up = b + reach(p_desc[rows, mid.astype(jnp.int32)]) > 0
        return jnp.where(go_up, mid, lb), jnp.where(go_up, ub, mid)

    bounds = (jnp.zeros(t.shape[0], t.dtype), jnp.full(t.shape[0], d_dim - 1, t.dtype))
    lb, _ = jax.lax.fori_loop(0, math.ceil(math.log2(d_dim)), halve, bounds)
    v = p_desc[rows, lb.astype(jnp.int32)][:, None]
    # The reference's cumulative sums at position lb (the end of a run of equal p): the
    # coordinates clipped at lambda (p_i >= v) and those moved all the way (p_i < v).
    s_lb = jnp.sum(abs_w * (p >= v), axis=1)
    sb_lb = -jnp.sum(abs_w * p * (p < v), axis=1)
    lam = jnp.maximum((b - sb_lb) / (-s_lb), 0.0)[:, None]
    d_search = jnp.minimum(lam, d) * a + jnp.maximum(-lam, d) * (1 - a)
    lam_free = jnp.maximum(b / (-jnp.sum(abs_w, axis=1)), 0.0)[:, None]
    d_free = (2 * a - 1) * lam_free
    d = jnp.where(all_free[:, None], d_free, jnp.where(search[:, None], d_search, d))
    return d * nonzero


def _diff_logits_grads(logits_fn: Callable, x1: jax.Array, y: jax.Array,
                       target: jax.Array | None, key: jax.Array):
    """FAB's linearisation at x1: (df [B, K'], dg [B, K', ...]). Targeted: K' = 1,
    f = z_t - z_y. Untargeted: K' = K, f_j = z_j - z_y, f_y = 1e10 (never chosen)."""
    if target is not None:
        def diff(z):
            logits = logits_fn(z, key)
            pick = lambda c: jnp.take_along_axis(logits, c[:, None], axis=1)[:, 0]  # noqa
            d = -(pick(y) - pick(target))
            return jnp.sum(d), d
        g, d = jax.grad(diff, has_aux=True)(x1)
        return d[:, None], g[:, None]
    logits, vjp = jax.vjp(lambda z: logits_fn(z, key), x1)
    k = logits.shape[1]
    eye = jnp.eye(k, dtype=logits.dtype)
    jac = jax.vmap(lambda e: vjp(jnp.broadcast_to(e, logits.shape))[0])(eye)  # [K, B, ...]
    jac = jnp.moveaxis(jac, 0, 1)  # [B, K, ...]
    rows = jnp.arange(x1.shape[0])
    df = logits - logits[rows, y][:, None]
    dg = jac - jac[rows, y][:, None]
    df = df.at[rows, y].set(_FAB_NO_ADV)
    return df, dg


def fab_run(logits_fn: Callable, x: jax.Array, y: jax.Array, x_start: jax.Array, *,
            n_iter: int, target: jax.Array | None = None, alpha_max: float = 0.1,
            eta: float = 1.05, beta: float = 0.9, key: jax.Array | None = None,
            unroll: bool | int = False) -> dict[str, jax.Array]:
    """One l_inf FAB run (Croce & Hein 2020, "Minimally distorted adversarial examples with a
    fast adaptive boundary attack"), the reference's `FABAttack.attack_single_run`.

    Each iteration linearises the decision boundary at x1 (targeted: z_t - z_y; untargeted:
    the class whose linearised boundary is nearest in l_inf), projects both x1 and the clean x
    onto it (`fab_projection_linf`), steps to the convex combination (x1 + eta d1)(1 - alpha)
    + (x + eta d2) alpha with alpha = min(|d1| / (|d1| + |d2|), alpha_max), clipped to
    [0, 1]; an iterate misclassified (argmax != y) is kept if it is closer to x than the best
    so far, and then moved back toward x by the factor beta.

    Args:
      logits_fn: (x [B, H, W, C], key) -> logits [B, K] (key: for a randomised model).
      x: clean points [B, H, W, C] in [0, 1]; y: int labels [B]; x_start: the first iterate
        (x itself in the reference's first run); target: [B] int for FAB-T, None for FAB.

    Returns dict: "x_adv" [B, ...] (the closest misclassified iterate, else x; x for points
    misclassified at x, which the reference does not attack), "found" [B] bool, "norm" [B]
    (the closest misclassified iterate's ||. - x||_inf; 1e10 where none), gradient-stopped.
    """
    nd, bsz = x.ndim, x.shape[0]
    x = jax.lax.stop_gradient(x)
    key = jax.random.key(0) if key is None else key
    x0 = x.reshape(bsz, -1)

    def body(i, s):
        x1, adv, res2 = s
        k = jax.random.fold_in(key, i)
        df, dg = _diff_logits_grads(logits_fn, x1, y, target, jax.random.fold_in(k, 0))
        dist = jnp.abs(df) / (1e-12 + jnp.sum(jnp.abs(dg.reshape(bsz, df.shape[1], -1)), -1))
        ind = jnp.argmin(dist, axis=1)
        rows = jnp.arange(bsz)
        w = dg[rows, ind].reshape(bsz, -1)
        b = -df[rows, ind] + jnp.sum(w * x1.reshape(bsz, -1), axis=1)
        d3 = fab_projection_linf(jnp.concatenate([x1.reshape(bsz, -1), x0]),
                                 jnp.concatenate([w, w]), jnp.concatenate([b, b]))
        d1, d2 = d3[:bsz].reshape(x.shape), d3[bsz:].reshape(x.shape)
        a0 = jnp.maximum(jnp.max(jnp.abs(d3), axis=1), 1e-8)
        a1, a2 = a0[:bsz], a0[bsz:]
        alpha = _bcast(jnp.minimum(jnp.maximum(a1 / (a1 + a2), 0.0), alpha_max), nd)
        x1 = jnp.clip((x1 + eta * d1) * (1 - alpha) + (x + d2 * eta) * alpha, 0.0, 1.0)
        is_adv = jnp.argmax(logits_fn(x1, jax.random.fold_in(k, 1)), axis=-1) != y
        norm = _linf(x1 - x)
        closer = is_adv & (norm < res2)
        adv = jnp.where(_bcast(closer, nd), x1, adv)
        res2 = jnp.where(closer, norm, res2)
        x1 = jnp.where(_bcast(is_adv, nd), x + (x1 - x) * beta, x1)
        return x1, adv, res2

    init = (jnp.clip(x_start, 0.0, 1.0), x, jnp.full((bsz,), _FAB_NO_ADV, x.dtype))
    _, adv, res2 = jax.lax.fori_loop(0, n_iter, body, init, unroll=unroll)
    # The reference attacks only the clean-correct points and returns x for the others.
    clean_correct = jnp.argmax(logits_fn(x, jax.random.fold_in(key, n_iter)), axis=-1) == y
    found = (res2 < _FAB_NO_ADV) & clean_correct
    out = {"x_adv": jnp.where(_bcast(found, nd), adv, x), "found": found, "norm": res2}
    return jax.tree_util.tree_map(jax.lax.stop_gradient, out)


def fab_random_start(x: jax.Array, noise: jax.Array, eps) -> jax.Array:
    """FAB's random start for restarts after the first: x + eps t / ||t||_inf / 2 for
    t ~ U(-1, 1) [B, ...], clipped to [0, 1]."""
    return jnp.clip(x + eps * noise / _bcast(_linf(noise), x.ndim) * 0.5, 0.0, 1.0)


# ------------------------------------------------------------------------------------ Square


def square_p_schedule(it: int, p_init: float) -> float:
    """Square's fraction of pixels p at query `it` (0-based), without the rescaling AutoAttack
    turns off (resc_schedule=False): p_init halved after queries 10, 50, 200, 500, 1000, 2000,
    4000, 6000 and 8000."""
    halvings = sum(it > edge for edge in (10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000))
    return p_init / 2 ** halvings


def square_sizes(n_queries: int, p_init: float, height: int, width: int) -> np.ndarray:
    """[n_queries] int32: the side s of the square at each query,
    min(max(round(sqrt(p h w)), 1), min(h, w)) (Python's round, as the reference)."""
    return np.asarray([min(max(int(round(math.sqrt(square_p_schedule(i, p_init) * height
                                                   * width))), 1), min(height, width))
                       for i in range(n_queries)], np.int32)


def square_run(logits_fn: Callable, x: jax.Array, y: jax.Array, stripes: jax.Array,
               key: jax.Array, *, eps, n_queries: int, p_init: float = 0.8) -> jax.Array:
    """One l_inf Square Attack run (Andriushchenko et al. 2020), the reference's
    `SquareAttack.attack_single_run` with the margin loss.

    Start: x + eps * stripes, clipped to [0, 1] (stripes [B, 1, W, C] of +-1: vertical
    stripes, one sign per column and channel). Query i: one square of side
    `square_sizes(...)[i]` at a random position and one random sign per channel, THE SAME for
    every point of the batch (the reference draws them once per query for its batch); the
    position is floor((h - s) U) as the reference's `random_int`, which never reaches h - s.
    x_new = P(x_best + 2 eps sign * square); it replaces x_best where the margin
    z_y - max_{j != y} z_j drops or turns <= 0. Points whose margin is <= 0 stop; the loop
    stops when no point of the batch is left.

    Args:
      logits_fn: (x [B, H, W, C], key) -> logits [B, K]; x in [0, 1]; y [B] int.
      key: the batch's shared draws. eps in pixel units; n_queries: the queries after the
        start.

    Returns x_best [B, H, W, C] (misclassified where the attack succeeded), gradient-stopped.
    """
    nd = x.ndim
    _, h, w, c = x.shape
    x = jax.lax.stop_gradient(x)
    sizes = jnp.asarray(square_sizes(n_queries, p_init, h, w))
    x_best = jnp.clip(x + eps * stripes, 0.0, 1.0)
    margin_min = margin(logits_fn(x_best, jax.random.fold_in(key, n_queries)), y)
    rows = jnp.arange(h)[:, None, None]
    cols = jnp.arange(w)[None, :, None]

    def cond(s):
        i, _, margin_min = s
        return (i < n_queries) & jnp.any(margin_min > 0.0)

    def body(s):
        i, x_best, margin_min = s
        k_h, k_w, k_sign, k_model = jax.random.split(jax.random.fold_in(key, i), 4)
        size = sizes[i]
        room = (h - size).astype(jnp.float32)
        vh = (room * jax.random.uniform(k_h)).astype(jnp.int32)
        vw = ((w - size).astype(jnp.float32) * jax.random.uniform(k_w)).astype(jnp.int32)
        sign = jnp.sign(2.0 * jax.random.uniform(k_sign, (1, 1, c)) - 1.0)
        inside = (rows >= vh) & (rows < vh + size) & (cols >= vw) & (cols < vw + size)
        delta = jnp.where(inside, 2.0 * eps * sign, 0.0).astype(x.dtype)  # [H, W, C]
        x_new = project_linf(x_best + delta, x, eps)
        m = margin(logits_fn(x_new, k_model), y)
        active = margin_min > 0.0
        improved = active & ((m < margin_min) | (m <= 0.0))
        x_best = jnp.where(_bcast(improved, nd), x_new, x_best)
        return i + 1, x_best, jnp.where(improved, m, margin_min)

    _, x_best, _ = jax.lax.while_loop(cond, body, (jnp.int32(0), x_best, margin_min))
    return jax.lax.stop_gradient(x_best)


def square_stripes(keys: jax.Array, image_shape: tuple[int, int, int]) -> jax.Array:
    """[B, 1, W, C] of +-1 from per-example keys [B]: sign(2 U - 1) per column and channel."""
    _, w, c = image_shape
    u = jax.vmap(lambda k: jax.random.uniform(k, (1, w, c)))(keys)
    return jnp.sign(2.0 * u - 1.0)


# ------------------------------------------------------------------------------ the programs


def _uniform_pm1(keys: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """[B, *shape] U(-1, 1) from per-example keys [B]: 2 U - 1 as the reference."""
    return jax.vmap(lambda k: 2.0 * jax.random.uniform(k, shape) - 1.0)(keys)


def _attack_program(apply_fn: Callable, spec: AttackSpec, *, stochastic: bool,
                    unroll: bool | int) -> Callable:
    """(variables, x [B, ...], y [B], ids [B] int, key, batch, eps, sub) -> (x_adv [B, ...],
    fooled [B] bool, pred [B] int): sub-run `sub` (target sub // restarts, restart
    sub % restarts) of `spec` on a batch, x_adv checked by one more forward pass (fooled:
    misclassified and, for FAB, within eps), as the reference's AutoAttack loop does.
    `key` is fold_in(fold_in(key, STREAM[name]), sub); ids are the examples' indices, batch
    the batch's number (see the module docstring for the keys)."""
    name = spec.name

    def program(variables, x, y, ids, key, batch, eps, sub):
        k_examples, k_batches = jax.random.split(key)
        batch_key = jax.random.fold_in(k_batches, batch)
        k_model, k_attack, k_check, k_clean = jax.random.split(batch_key, 4)

        def logits_fn(z, k):
            return apply_fn(variables, z, k) if stochastic else apply_fn(variables, z)

        example_keys = jax.vmap(lambda i: jax.random.fold_in(k_examples, i))(ids)
        target = None
        if name in ("apgd-t", "fab-t"):
            rank = 2 + sub // spec.restarts
            target = ranked_target(logits_fn(x, k_clean), rank)
        restart = sub % spec.restarts
        if name.startswith("apgd"):
            loss = {"apgd-ce": "ce", "apgd-dlr": "dlr", "apgd-t": "dlr-targeted"}[name]
            x_init = apgd_start(x, _uniform_pm1(example_keys, x.shape[1:]), eps)
            res = apgd_run(logits_fn, x, y, x_init, eps=eps, n_iter=spec.n_iter, loss=loss,
                           target=target, rho=spec.rho, momentum=spec.momentum,
                           eot_iter=spec.eot_iter, key=k_model, unroll=unroll)
            x_adv = jnp.where(_bcast(res["fooled"], x.ndim), res["x_best_adv"], x)
        elif name.startswith("fab"):
            start = x
            if name == "fab":  # restarts after the first start at random
                rand = fab_random_start(x, _uniform_pm1(example_keys, x.shape[1:]), eps)
                start = jnp.where(restart > 0, rand, x)
            x_adv = fab_run(logits_fn, x, y, start, n_iter=spec.n_iter, target=target,
                            alpha_max=spec.alpha_max, eta=spec.eta, beta=spec.beta,
                            key=k_model, unroll=unroll)["x_adv"]
        else:
            stripes = square_stripes(example_keys, x.shape[1:])
            x_adv = square_run(logits_fn, x, y, stripes, k_attack, eps=eps,
                               n_queries=spec.n_iter, p_init=spec.p_init)
        pred = jnp.argmax(logits_fn(x_adv, k_check), axis=-1)
        fooled = pred != y
        if name.startswith("fab"):
            fooled = fooled & (_linf(x_adv - x) <= eps)
        return x_adv, fooled, pred

    return program


def _clean_program(apply_fn: Callable, stochastic: bool) -> Callable:
    """(variables, x [B, ...], key) -> predicted labels [B]."""
    def program(variables, x, key):
        logits = apply_fn(variables, x, key) if stochastic else apply_fn(variables, x)
        return jnp.argmax(logits, axis=-1)

    return program


# ------------------------------------------------------------------------------ the driver


def _as_key(key) -> tuple[jax.Array, int | None]:
    """(PRNG key, seed or None) from None (seed 0), an int seed or a key."""
    if key is None:
        key = 0
    if isinstance(key, (int, np.integer)):
        return jax.random.key(int(key)), int(key)
    if not jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        key = jax.random.wrap_key_data(key)  # a raw uint32 key (jax.random.PRNGKey)
    return key, None


def _batch_size(n: int, batch_size: int, devices: int) -> int:
    """One batch shape for n points: about batch_size, balanced over ceil(n / batch_size)
    batches, a multiple of `devices`."""
    if batch_size < 1 or batch_size % devices:
        raise ValueError(f"batch_size must be a positive multiple of the mesh's {devices} "
                         f"devices, got {batch_size}")
    per = math.ceil(n / math.ceil(n / batch_size))
    return devices * math.ceil(per / devices)


def autoattack(apply_fn: Callable, variables: Any, x, y, eps: float,
               version: str = "standard", *, key: jax.Array | int | None = None,
               batch_size: int = 256, mesh: Mesh | None = None,
               log: Callable[[str], None] | None = None,
               attacks: Sequence[str | AttackSpec] | None = None, stochastic: bool = False,
               unroll: bool | int = False,
               should_stop: Callable[[], bool] | None = None) -> dict[str, Any]:
    """AutoAttack's l_inf robust accuracy of a classifier on (x, y), as the reference's
    `AutoAttack(model, eps=eps, version=version).run_standard_evaluation(x, y)`.

    Args:
      apply_fn: (variables, x [B, H, W, C]) -> logits [B, K], the model in INFERENCE mode
        (e.g. `lambda v, x: model.apply(v, x, train=False)`); with `stochastic`, a
        randomised model (variables, x, key) -> logits, given a fresh key per forward pass.
      variables: its parameters / state (any pytree).
      x: [N, H, W, C] inputs in [0, 1]; y: [N] int labels (NumPy or JAX, N >= 1).
      eps: the l_inf radius in pixel units.
      version: "standard", "plus", "rand" or "custom" (see the module docstring).
      key: PRNG key, or an int seed (None: seed 0). The result records both.
      batch_size: points per jitted call (about; batches are balanced and padded to one shape;
        a multiple of mesh.size with a mesh).
      mesh: a jax.sharding.Mesh with an axis "data": batches are sharded over it, variables
        replicated (as robustness.evaluate_robustness).
      log: callable taking a line (e.g. print): one per attack (robust accuracy so far,
        seconds, compile seconds).
      attacks: with version="custom": names from ATTACKS or AttackSpec.
      stochastic: apply_fn takes a key (randomised defenses; the "rand" version).
      should_stop: a poll (e.g. true after SIGTERM), called before every batch of every
        attack; when true, `errors.Interrupted` is raised and nothing is returned.
      unroll: unroll of APGD's and FAB's iteration loops (`lax.fori_loop`'s): False (rolled)
        compiles in seconds and is as fast as unrolled with the project's oneDNN convolutions
        (SpeedConfig.conv_kernels='onednn', the CPU default); with XLA's own convolutions on
        CPU, True runs 2-4x faster but compiles for minutes (FAB-T on CNN1: ~100 s).

    Returns dict:
      "robust_acc", "clean_acc": percent; "robust_acc_after": {"clean": ..., attack: ...}
        percent robust after each attack (cumulative, in order); "n".
      "robust_flags": [N] np bool (clean-correct and no attack succeeded); "x_adv": [N, H, W,
        C] np float32 (the first successful adversarial example, else x); "y_adv": [N] np int
        (the prediction at x_adv); "fooled_by": [N] np str ("clean" if misclassified clean,
        the attack's name, or "" if robust).
      "seconds", "compile_seconds": {attack: s} (run time without / the programs' compile
        time), "clean_seconds"; "version", "attacks" (names), "settings" ({attack: AttackSpec
        as a dict}), "eps", "seed" (int or None), "key" (the key's data, list of int),
        "warnings" (list of str: the reference's Square check).
    """
    specs = version_specs(version, attacks)
    x = np.asarray(x, np.float32)
    y = np.asarray(y).astype(np.int32)
    n = len(x)
    if x.ndim != 4 or n == 0 or y.shape != (n,):
        raise ValueError(f"need x [N, H, W, C] with N >= 1 and y [N], got {x.shape}, {y.shape}")
    if not eps > 0:
        raise ValueError(f"eps must be > 0, got {eps}")
    key, seed = _as_key(key)
    devices = 1 if mesh is None else mesh.size
    if mesh is not None and "data" not in mesh.axis_names:
        raise ValueError(f"mesh needs an axis named 'data', has {mesh.axis_names}")
    shape_args = (variables, x[:1], jax.random.key(0)) if stochastic else (variables, x[:1])
    num_classes = int(jax.eval_shape(apply_fn, *shape_args).shape[-1])
    _check_classes(specs, num_classes)

    if mesh is None:
        put, put_rep = jnp.asarray, jnp.asarray
    else:
        data, replicated = NamedSharding(mesh, P("data")), NamedSharding(mesh, P())
        put = lambda a: jax.device_put(a, data)  # noqa: E731
        put_rep = lambda a: jax.device_put(a, replicated)  # noqa: E731
        variables = jax.device_put(variables, replicated)

    def batches(indices: np.ndarray, size: int):
        for start in range(0, len(indices), size):
            idx, mask = padded_batch(indices[start:start + size], size)
            yield idx, int(mask.sum())

    # Clean predictions.
    t0 = time.perf_counter()
    bs = _batch_size(n, batch_size, devices)
    clean_key = put_rep(jax.random.fold_in(key, 0))
    clean = jax.jit(_clean_program(apply_fn, stochastic)).lower(
        variables, put(x[:bs]), clean_key).compile()
    y_adv = np.empty(n, np.int32)
    outs = [(idx, m, clean(variables, put(x[idx]), put_rep(jax.random.fold_in(clean_key, b))))
            for b, (idx, m) in enumerate(batches(np.arange(n), bs))]
    for idx, m, pred in outs:
        y_adv[idx[:m]] = to_host(pred)[:m]
    robust = y_adv == y
    clean_seconds = time.perf_counter() - t0
    fooled_by = np.where(robust, "", "clean").astype("<U8")
    pct = lambda mask: 100.0 * float(np.sum(mask)) / n  # noqa: E731
    after = {"clean": pct(robust)}
    if log is not None:
        log(f"autoattack {version} eps={eps:g}: clean accuracy {after['clean']:.2f}% "
            f"({int(robust.sum())}/{n}), {clean_seconds:.1f} s")

    x_adv = x.copy()
    bs = _batch_size(max(int(robust.sum()), 1), batch_size, devices)
    eps_dev = put_rep(jnp.float32(eps))
    seconds, compile_seconds = {}, {}
    for spec in specs:
        start = time.perf_counter()
        program, compile_s = None, 0.0
        stream = jax.random.fold_in(key, STREAM[spec.name])
        for sub in range(spec.sub_runs):
            todo = np.flatnonzero(robust)
            if len(todo) == 0:
                break
            sub_key = put_rep(jax.random.fold_in(stream, sub))
            sub_dev = put_rep(jnp.int32(sub))
            parts = list(batches(todo, bs))
            if program is None:
                t_c = time.perf_counter()
                idx0 = parts[0][0]
                program = jax.jit(_attack_program(apply_fn, spec, stochastic=stochastic,
                                                  unroll=unroll)).lower(
                    variables, put(x[idx0]), put(y[idx0]), put(idx0.astype(np.int32)),
                    sub_key, put_rep(jnp.int32(0)), eps_dev, sub_dev).compile()
                compile_s = time.perf_counter() - t_c
            for b, (idx, m) in enumerate(parts):  # one batch in flight: a stop waits for one
                if should_stop is not None and should_stop():
                    raise Interrupted(f"stopped during AutoAttack's {spec.name}; nothing "
                                      f"was written, rerun to evaluate")
                xa, fooled, pred = program(variables, put(x[idx]), put(y[idx]),
                                           put(idx.astype(np.int32)), sub_key,
                                           put_rep(jnp.int32(b)), eps_dev, sub_dev)
                idx, fooled = idx[:m], to_host(fooled)[:m]
                hit = idx[fooled]
                x_adv[hit] = to_host(xa)[:m][fooled]
                y_adv[hit] = to_host(pred)[:m][fooled]
                robust[hit] = False
                fooled_by[hit] = spec.name
        compile_seconds[spec.name] = compile_s
        seconds[spec.name] = time.perf_counter() - start - compile_s
        after[spec.name] = pct(robust)
        if log is not None:
            log(f"  {spec.name}: robust accuracy {after[spec.name]:.2f}% "
                f"({int(robust.sum())}/{n}), {seconds[spec.name]:.1f} s "
                f"(compile {compile_s:.1f} s)")

    warnings = []
    if "square" in after and len(after) > 2:
        best_other = min(v for k, v in after.items() if k != "square")
        if after["square"] < best_other - 0.2:
            warnings.append(f"Square lowered the robust accuracy by "
                            f"{best_other - after['square']:.2f} points: the gradient-based "
                            "attacks may be failing on this model (gradient masking?)")
    return {
        "n": n, "clean_acc": after["clean"], "robust_acc": pct(robust),
        "robust_acc_after": after, "robust_flags": robust, "x_adv": x_adv, "y_adv": y_adv,
        "fooled_by": fooled_by, "seconds": seconds, "compile_seconds": compile_seconds,
        "clean_seconds": clean_seconds, "version": version,
        "attacks": [s.name for s in specs],
        "settings": {s.name: dataclasses.asdict(s) for s in specs}, "eps": float(eps),
        "seed": seed, "key": np.asarray(jax.random.key_data(key)).tolist(),
        "warnings": warnings,
    }


def _check_classes(specs: Sequence[AttackSpec], num_classes: int) -> None:
    """ValueError where the attacks need more classes than the model has."""
    for spec in specs:
        need = {"apgd-dlr": 3, "apgd-t": max(4, spec.n_targets + 1),
                "fab-t": spec.n_targets + 1}.get(spec.name, 2)
        if num_classes < need:
            raise ValueError(f"{spec.name} (n_targets={spec.n_targets}) needs at least {need} "
                             f"classes; the model has {num_classes}")
