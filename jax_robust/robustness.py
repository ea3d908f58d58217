"""Robust accuracy under several attacks, worst case per example, and gradient-masking signals.

    from jax_robust.robustness import evaluate_robustness
    apply_fn = lambda variables, x: model.apply(variables, x, train=False)   # eval mode
    out = evaluate_robustness(apply_fn, variables, x_test, y_test, 0.1,
                              attacks=("pgd", "multitarget", "apgd"), log=print)

Attacks (jax_robust.attacks; steps default per attack, all overridden by `steps`):
  "pgd"          PGD-10 on CE, step eps/5, random start (the paper's evaluation;
                 `pgd_restarts`, equal to `pgd_cross_entropy` with restarts=1)
  "multitarget"  the official multi-target attack: a targeted PGD (20 steps, step eps/10)
                 toward every other class, the most successful target kept
  "apgd"         APGD-CE (AutoAttack's Auto-PGD on CE), 100 steps
Accuracies are percentages of argmax f(x_adv) == y (the official definition, which does not
AND with clean correctness); "acc_worst" counts an example as robust only if it is clean-correct
and every attack fails on it.

Gradient-masking signals (Athalye et al. 2018, Carlini et al. 2019 checklists): the fraction of
examples whose CE input gradient at x is exactly zero, PGD at 2 eps (accuracy must not rise) and
PGD with 5x the steps (must not rise; it shares its random start and first steps with the base
PGD, so a rise by a few examples can still happen on an honest model, whose final iterate
wanders back; a fall of more than 3 points says the base PGD has not converged, as on
gradient-regularised models). Violations are listed in "masking_warnings".

Programs: one jitted program computes, per batch, the clean predictions, the zero-gradient
flags, PGD and both PGD checks (so "pgd" costs no extra pass); "multitarget" and "apgd" get one
jitted program each. Each is compiled once (the last batch is padded to the same shape).
"""

from __future__ import annotations

import math
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jax_robust.attacks import apgd_ce, cross_entropy, multitarget_attack, pgd_restarts
from jax_robust.config import EVAL_ATTACKS
from jax_robust.distributed import to_host
from jax_robust.errors import Interrupted
from jax_robust.pipeline import padded_batch

ATTACKS = EVAL_ATTACKS[:3]  # pgd, multitarget, apgd; AutoAttack is jax_robust.autoattack
DEFAULT_STEPS = {"pgd": 10, "multitarget": 20, "apgd": 100}
# Stream of each pass: key_b = fold_in(fold_in(key, STREAM[name]), batch index). The PGD
# masking checks share the "pgd" stream (same starts as the base PGD).
_STREAM = {"pgd": 1, "multitarget": 2, "apgd": 3}
ZERO_GRAD_WARN = 0.10
UNCONVERGED_WARN = 0.03  # PGD with 5x steps this fraction of n below PGD: not converged


def _attack_x(name: str, logits_fn: Callable, x, y, key, *, eps: float, steps: int,
              restarts: int, num_classes: int, unroll: bool):
    """x_adv [B, ...] of attack `name` (eval-mode logits_fn)."""
    if name == "pgd":
        return pgd_restarts(logits_fn, x, y, key, eps=eps, steps=steps, restarts=restarts,
                            unroll=unroll)
    if name == "multitarget":
        return multitarget_attack(logits_fn, x, y, key, eps=eps, steps=steps,
                                  num_classes=num_classes, unroll=unroll)
    if name == "apgd":
        return apgd_ce(logits_fn, x, y, key, eps=eps, steps=steps, restarts=restarts,
                       unroll=unroll)
    raise ValueError(f"unknown attack {name!r}; choices: {', '.join(ATTACKS)}")


def make_attack_step(apply_fn: Callable, name: str, *, eps: float, steps: int, restarts: int,
                     num_classes: int, unroll: bool = True) -> Callable:
    """Jitted (variables, x [B, ...], y [B], key) -> [B] bool: argmax f(x_adv) == y."""
    def step(variables, x, y, key):
        logits_fn = lambda z: apply_fn(variables, z)  # noqa: E731
        x_adv = _attack_x(name, logits_fn, x, y, key, eps=eps, steps=steps, restarts=restarts,
                          num_classes=num_classes, unroll=unroll)
        return jnp.argmax(logits_fn(x_adv), axis=-1) == y

    return jax.jit(step)


def make_pgd_step(apply_fn: Callable, *, eps: float, steps: int, restarts: int,
                  unroll: bool = True) -> Callable:
    """Jitted (variables, x [B, ...], y [B], key) -> dict of [B] bool, one program:
      "clean"         argmax f(x) == y
      "zero_grad"     every entry of d CE(f(x_i), y_i) / d x_i is exactly 0 (the gradient of
                      the batch sum, equal to the per-example one: eval mode couples no
                      examples)
      "pgd"           robust to `pgd_restarts` (eps, steps)
      "pgd_eps_x2"    robust to it at 2 eps (same key: the start noise scaled by 2)
      "pgd_steps_x5"  robust to it with 5 x steps (same key: the same first `steps` steps)
    """
    def step(variables, x, y, key):
        logits_fn = lambda z: apply_fn(variables, z)  # noqa: E731

        def total(z):
            logits = logits_fn(z)
            return jnp.sum(cross_entropy(logits, y)), logits

        g, logits = jax.grad(total, has_aux=True)(x)
        robust = lambda eps_, steps_: jnp.argmax(logits_fn(pgd_restarts(  # noqa: E731
            logits_fn, x, y, key, eps=eps_, steps=steps_, restarts=restarts,
            unroll=unroll)), axis=-1) == y
        return {"clean": jnp.argmax(logits, axis=-1) == y,
                "zero_grad": jnp.all(g == 0, axis=tuple(range(1, g.ndim))),
                "pgd": robust(eps, steps), "pgd_eps_x2": robust(2 * eps, steps),
                "pgd_steps_x5": robust(eps, 5 * steps)}

    return jax.jit(step)


def _check_names(attacks: Sequence[str]) -> tuple[str, ...]:
    if isinstance(attacks, str):
        attacks = (attacks,)
    for name in attacks:
        if name not in ATTACKS:
            raise ValueError(f"unknown attack {name!r}; choices: {', '.join(ATTACKS)}")
    return tuple(dict.fromkeys(attacks))


def _batch_size(n: int, batch_size: int, mesh: Mesh | None) -> int:
    """The batch actually used: batch_size, or n rounded up to the devices when smaller."""
    devices = 1 if mesh is None else mesh.size
    if mesh is not None:
        if "data" not in mesh.axis_names:
            raise ValueError(f"mesh needs an axis named 'data', has {mesh.axis_names}")
        if batch_size % devices:
            raise ValueError(f"batch_size {batch_size} is not a multiple of the mesh's "
                             f"{devices} devices")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    return min(batch_size, devices * math.ceil(n / devices))


def _run_batches(fn: Callable, x: np.ndarray, y: np.ndarray, batch_size: int,
                 put: Callable, log: Callable[[str], None] | None, what: str,
                 should_stop: Callable[[], bool] | None = None, name: str = ""):
    """Applies fn(x_b, y_b, b) -> pytree of [B] arrays to every batch; returns the pytree of
    [N] NumPy arrays, each example once (the last batch is padded by repeating its own rows,
    and the padding is cut off). `should_stop` is polled before each batch (Interrupted when
    true); with it one batch is in flight at a time, so a stop waits for at most one."""
    n = len(x)
    n_batches = math.ceil(n / batch_size)
    every = math.ceil(n_batches / 8)
    outs, start, timed_from = [], time.perf_counter(), None
    for b in range(n_batches):
        if should_stop is not None and should_stop():
            raise Interrupted(f"stopped during the {name or what} attack of the robustness "
                              f"evaluation (batch {b + 1} of {n_batches}); nothing of it "
                              f"was written, rerun to evaluate")
        idx, mask = padded_batch(np.arange(b * batch_size, min(n, (b + 1) * batch_size)),
                                 batch_size)
        outs.append((fn(put(x[idx]), put(y[idx]), b), int(mask.sum())))
        if should_stop is not None:  # one batch in flight: a stop waits for it alone
            jax.block_until_ready(outs[-1][0])
        if log is not None and n_batches > 8:
            if b == 0:  # the compile: rates count from the end of the first batch
                jax.block_until_ready(outs[-1][0])
                timed_from = time.perf_counter()
            elif (b + 1) % every == 0 or b + 1 == n_batches:
                jax.block_until_ready(outs[-1][0])
                rate = b * batch_size / (time.perf_counter() - timed_from)
                eta = (n_batches - b - 1) * batch_size / rate
                log(f"  {what}: {b + 1}/{n_batches} batches, {rate:.1f} img/s, "
                    f"ETA {eta:.0f}s")
    result = jax.tree_util.tree_map(
        lambda *parts: np.concatenate(parts), *[jax.tree_util.tree_map(
            lambda a, m=m: to_host(a)[:m], out) for out, m in outs])
    if log is not None:
        log(f"  {what}: {n} examples in {time.perf_counter() - start:.1f}s")
    return result


def evaluate_robustness(apply_fn: Callable, variables: Any, x, y, eps: float, *,
                        attacks: Sequence[str] = ("pgd",), key: jax.Array | None = None,
                        batch_size: int = 256, steps: int | None = None, restarts: int = 1,
                        num_classes: int | None = None,
                        log: Callable[[str], None] | None = None,
                        mesh: Mesh | None = None, unroll: bool = True,
                        should_stop: Callable[[], bool] | None = None) -> dict[str, Any]:
    """Clean and robust accuracy of a classifier on (x, y) under l_inf attacks of radius eps.

    Args:
      apply_fn: (variables, x [B, H, W, C]) -> logits [B, K], the model in INFERENCE mode
        (dropout off, BatchNorm on running statistics; e.g. `lambda v, x: model.apply(v, x,
        train=False)`). The caller is responsible for this: a train-mode apply_fn would couple
        the examples of a batch and randomise the attacks.
      variables: its parameters / state (any pytree).
      x: [N, H, W, C] inputs in [0, 1], y: [N] int labels; NumPy or JAX arrays, any N >= 1.
      eps: radius in pixel units.
      attacks: names from ATTACKS ("pgd", "multitarget", "apgd").
      key: PRNG key of the random starts (default jax.random.key(0)).
      batch_size: examples per jitted call (the last batch is padded and masked); a multiple
        of mesh.size when `mesh` is given.
      steps: iterations of every attack (None: 10 for pgd, 20 for multitarget, 100 for apgd).
      restarts: random restarts of pgd and apgd (multitarget: one start per target).
      num_classes: K (None: read off the logits' shape).
      log: callable taking a line (e.g. print); progress with img/s and ETA when there are
        more than 8 batches, and a line per pass.
      mesh: a jax.sharding.Mesh with an axis "data": batches are sharded over it with
        NamedSharding(mesh, P("data")), variables replicated. Over several processes
        (jax_robust.distributed) every process passes the same x and y and gets the results.
      unroll: unroll the attacks' step loops (faster programs on XLA:CPU, much longer
        compiles; False for small models and tests).
      should_stop: a poll (e.g. true after SIGTERM), called before every batch of every
        attack; when true, `errors.Interrupted` is raised and nothing is returned. One batch
        is then in flight at a time, so the stop comes within about one batch's time.
        Over several processes it must turn true on all of them at the same poll
        (cli.common.stop_requests does).

    Returns:
      dict with "n"; "clean_acc", "acc_<attack>" per attack and "acc_worst" (percent);
      "robust_mask" [N] bool (clean-correct and no attack succeeded); the masking signals
      "zero_grad_fraction" (in [0, 1]), "acc_pgd_eps_x2", "acc_pgd_steps_x5" (percent; PGD
      with the pgd settings at 2 eps, resp. with 5x the steps) and "masking_warnings" (list of
      str: a masking signal above ZERO_GRAD_WARN or a violated monotonicity against PGD).
    """
    names = _check_names(attacks)
    if restarts < 1:
        raise ValueError(f"restarts must be >= 1, got {restarts}")
    x, y = np.asarray(x), np.asarray(y).astype(np.int32)
    n = len(x)
    if n == 0 or len(y) != n:
        raise ValueError(f"need N >= 1 inputs and as many labels, got {len(x)} and {len(y)}")
    bs = _batch_size(n, batch_size, mesh)
    key = jax.random.key(0) if key is None else key
    if mesh is None:
        put = jnp.asarray
    else:
        data, replicated = NamedSharding(mesh, P("data")), NamedSharding(mesh, P())
        put = lambda a: jax.device_put(a, data)  # noqa: E731
        variables = jax.device_put(variables, replicated)
        if jax.process_count() == 1:  # over processes jit places the (uncommitted) key
            key = jax.device_put(key, replicated)
    if num_classes is None:
        num_classes = int(jax.eval_shape(apply_fn, variables, x[:1]).shape[-1])

    steps_of = {name: DEFAULT_STEPS[name] if steps is None else steps for name in ATTACKS}

    def run(step: Callable, name: str, what: str):
        stream = jax.random.fold_in(key, _STREAM[name])
        return _run_batches(
            lambda xb, yb, b: step(variables, xb, yb, jax.random.fold_in(stream, b)),
            x, y, bs, put, log, what, should_stop, name)

    k = steps_of["pgd"]
    base = run(make_pgd_step(apply_fn, eps=eps, steps=k, restarts=restarts, unroll=unroll),
               "pgd", f"clean, pgd-{k}, pgd-{k} at 2 eps, pgd-{5 * k}")
    clean, zero_grad = base["clean"], base["zero_grad"]
    pgd_base, pgd_eps_x2, pgd_steps_x5 = base["pgd"], base["pgd_eps_x2"], base["pgd_steps_x5"]
    correct = {}
    for name in names:
        if name == "pgd":
            correct[name] = pgd_base
            continue
        step = make_attack_step(apply_fn, name, eps=eps, steps=steps_of[name],
                                restarts=restarts, num_classes=num_classes, unroll=unroll)
        correct[name] = run(step, name, f"{name} ({steps_of[name]} steps)")

    robust = clean.astype(bool)
    for name in names:
        robust = robust & correct[name]
    pct = lambda mask: 100.0 * float(np.sum(mask)) / n  # noqa: E731
    out: dict[str, Any] = {"n": n, "clean_acc": pct(clean)}
    for name in names:
        out[f"acc_{name}"] = pct(correct[name])
    out["acc_worst"] = pct(robust)
    out["robust_mask"] = robust
    out["zero_grad_fraction"] = float(np.mean(zero_grad))
    out["acc_pgd_eps_x2"] = pct(pgd_eps_x2)
    out["acc_pgd_steps_x5"] = pct(pgd_steps_x5)
    out["masking_warnings"] = masking_warnings(
        pgd=int(pgd_base.sum()), pgd_eps_x2=int(pgd_eps_x2.sum()),
        pgd_steps_x5=int(pgd_steps_x5.sum()), zero_grad_fraction=out["zero_grad_fraction"],
        n=n, pgd_steps=steps_of["pgd"])
    return out


def masking_warnings(*, pgd: int, pgd_eps_x2: int, pgd_steps_x5: int,
                     zero_grad_fraction: float, n: int, pgd_steps: int) -> list[str]:
    """Warnings (list of str) from the gradient-masking signals; counts are of robust
    examples out of n."""
    warnings = []
    if pgd_eps_x2 > pgd:
        warnings.append(f"PGD accuracy at 2*eps ({pgd_eps_x2}/{n}) is above PGD at eps "
                        f"({pgd}/{n}): a larger ball cannot be harder to attack "
                        "(gradient masking?)")
    if pgd_steps_x5 > pgd:
        warnings.append(f"PGD accuracy with {5 * pgd_steps} steps ({pgd_steps_x5}/{n}) is "
                        f"above PGD-{pgd_steps} ({pgd}/{n}): more steps should not help the "
                        "model (gradient masking?)")
    if pgd - pgd_steps_x5 > UNCONVERGED_WARN * n:
        warnings.append(f"PGD accuracy with {5 * pgd_steps} steps ({pgd_steps_x5}/{n}) is more "
                        f"than {100 * UNCONVERGED_WARN:.0f} points below PGD-{pgd_steps} "
                        f"({pgd}/{n}): PGD-{pgd_steps} has not converged and overstates "
                        "robustness (read the stronger attacks)")
    if zero_grad_fraction > ZERO_GRAD_WARN:
        warnings.append(f"{100 * zero_grad_fraction:.1f}% of the examples have an exactly "
                        f"zero cross-entropy input gradient (> {100 * ZERO_GRAD_WARN:.0f}%): "
                        "gradient attacks cannot move them (gradient masking)")
    return warnings
