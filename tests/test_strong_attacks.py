"""multitarget_attack, pgd_restarts, apgd_ce and evaluate_robustness against closed forms and
independent transcriptions (linear models, a small MLP trained on scikit-learn's digits)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jax_robust.attacks import (apgd_ce, apgd_checkpoints, multitarget_attack,
                                pgd_cross_entropy, pgd_restarts)
from jax_robust.robustness import evaluate_robustness, masking_warnings

ALL = ("pgd", "multitarget", "apgd")


# ----------------------------------------------------------------------------- models


def _binary_linear(seed=0, n=37, eps=0.1):
    """A binary linear model on [n, 4, 4, 1] inputs, labels = its prediction with ~20% flipped,
    and the closed-form robust mask at eps: the margin (w_y - w_o).x' + b_y - b_o is smallest
    over the box at x' = clip(x - eps sign(w_y - w_o), 0, 1)."""
    rng = np.random.default_rng(seed)
    w = (0.4 * rng.normal(size=(16, 2))).astype(np.float32)
    x = rng.uniform(0, 1, size=(n, 4, 4, 1)).astype(np.float32)
    x[:3] = np.round(x[:3])  # points on the box's corners: the clip matters
    b = np.array([0.0, -np.mean(x.reshape(n, 16) @ (w[:, 1] - w[:, 0]))], np.float32)
    flat = x.reshape(n, 16)
    y = np.argmax(flat @ w + b, axis=1).astype(np.int32)
    flip = rng.uniform(size=n) < 0.2
    y[flip] = 1 - y[flip]
    d = (w[:, y] - w[:, 1 - y]).T  # [n, 16]
    corner = np.clip(flat - eps * np.sign(d), 0, 1)
    margin = np.sum(corner * d, axis=1) + b[y] - b[1 - y]
    params = {"w": jnp.asarray(w), "b": jnp.asarray(b)}
    return params, x, y, margin > 0, corner.reshape(x.shape)


def _linear_apply(params, x):
    return x.reshape(x.shape[0], -1) @ params["w"] + params["b"]


def _mlp_apply(params, x):
    h = jax.nn.relu(x.reshape(x.shape[0], -1) @ params["w1"] + params["b1"])
    return h @ params["w2"] + params["b2"]


@pytest.fixture(scope="module")
def digits():
    """An MLP 64-32-10 trained 300 full-batch SGD steps on 1500 digits (8x8, /16); returns
    (params, x_test [297, 8, 8, 1], y_test)."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = (data.images / 16.0).astype(np.float32)[..., None]
    y = data.target.astype(np.int32)
    order = np.random.default_rng(0).permutation(len(x))
    x, y = x[order], y[order]
    k1, k2 = jax.random.split(jax.random.key(0))
    params = {"w1": jax.random.normal(k1, (64, 32)) / 8.0, "b1": jnp.zeros(32),
              "w2": jax.random.normal(k2, (32, 10)) / math.sqrt(32), "b2": jnp.zeros(10)}
    opt = optax.sgd(0.5)
    opt_state = opt.init(params)
    xt, yt = jnp.asarray(x[:1500]), jnp.asarray(y[:1500])

    @jax.jit
    def step(params, opt_state):
        loss = lambda p: optax.softmax_cross_entropy_with_integer_labels(  # noqa: E731
            _mlp_apply(p, xt), yt).mean()
        updates, opt_state = opt.update(jax.grad(loss)(params), opt_state)
        return optax.apply_updates(params, updates), opt_state

    for _ in range(300):
        params, opt_state = step(params, opt_state)
    return params, x[1500:], y[1500:]


# ----------------------------------------------------------------------------- the attacks


def test_apgd_checkpoints_follow_the_paper_for_100_steps():
    p = [0.0, 0.22]
    while p[-1] + max(p[-1] - p[-2] - 0.03, 0.06) <= 1.0:
        p.append(p[-1] + max(p[-1] - p[-2] - 0.03, 0.06))
    expected = tuple(math.ceil(round(pj * 100, 6)) for pj in p[1:])
    assert apgd_checkpoints(100) == expected == (22, 41, 57, 70, 80, 87, 93, 99)


@pytest.mark.slow
def test_every_attack_reaches_the_linear_closed_form():
    eps = 0.05
    params, x, y, robust, corner = _binary_linear(eps=eps)
    assert 0 < robust.sum() < len(robust) - 3  # a non-trivial case
    f = jax.tree_util.Partial(_linear_apply, params)

    @jax.jit
    def attack_all(f, x, y, key):
        return {"pgd": pgd_restarts(f, x, y, key, eps=eps, restarts=2, unroll=False),
                "multitarget": multitarget_attack(f, x, y, key, eps=eps, num_classes=2,
                                                  unroll=False),
                "apgd": apgd_ce(f, x, y, key, eps=eps, steps=30, unroll=False),
                # APGD's own loop unrolled, as by default (pgd/multitarget use pgd_attack's)
                "apgd_unrolled": apgd_ce(f, x, y, key, eps=eps, steps=8)}

    x_advs = attack_all(f, jnp.asarray(x), jnp.asarray(y), jax.random.key(1))
    for name, x_adv in x_advs.items():
        np.testing.assert_allclose(np.asarray(x_adv), corner, atol=1e-6, err_msg=name)
        acc = np.mean(np.argmax(np.asarray(f(x_adv)), axis=1) == y)
        assert acc == robust.mean(), name


def test_evaluate_robustness_linear_closed_form_uneven_batches():
    eps = 0.1
    params, x, y, robust, _ = _binary_linear(eps=eps)  # N = 37, batches of 16: 16, 16, 5
    out = evaluate_robustness(_linear_apply, params, x, y, eps, attacks=ALL, batch_size=16,
                              steps=30, key=jax.random.key(2), unroll=False)
    expected = 100.0 * robust.sum() / 37
    assert out["n"] == 37 and out["robust_mask"].shape == (37,)
    clean = np.argmax(x.reshape(37, -1) @ np.asarray(params["w"]) + np.asarray(params["b"]),
                      axis=1) == y
    assert out["clean_acc"] == 100.0 * clean.sum() / 37
    for name in ALL:
        assert out[f"acc_{name}"] == expected, name
    assert out["acc_worst"] == expected
    np.testing.assert_array_equal(out["robust_mask"], robust)
    assert out["acc_pgd_steps_x5"] == expected and out["acc_pgd_eps_x2"] <= expected
    assert out["zero_grad_fraction"] == 0.0 and out["masking_warnings"] == []


def test_evaluate_robustness_on_a_two_device_mesh_with_progress_lines():
    assert jax.device_count() == 2
    mesh = jax.sharding.Mesh(np.array(jax.devices()), ("data",))
    eps = 0.1
    params, x, y, robust, _ = _binary_linear(seed=1, n=37, eps=eps)
    lines = []
    out = evaluate_robustness(_linear_apply, params, jnp.asarray(x), jnp.asarray(y), eps,
                              attacks=("pgd",), batch_size=4, mesh=mesh, restarts=2,
                              log=lines.append, unroll=False)  # 10 batches; vmapped restarts
    np.testing.assert_array_equal(out["robust_mask"], robust)
    assert out["acc_pgd"] == out["acc_worst"] == 100.0 * robust.sum() / 37
    assert any("img/s" in line and "ETA" in line for line in lines), lines
    with pytest.raises(ValueError, match="multiple"):
        evaluate_robustness(_linear_apply, params, x, y, eps, batch_size=5, mesh=mesh)


def test_unknown_attack_names_the_choices():
    params, x, y, _, _ = _binary_linear(n=4)
    with pytest.raises(ValueError, match="multitarget"):
        evaluate_robustness(_linear_apply, params, x, y, 0.1, attacks=("pgd", "cw"))


def test_constant_model_has_zero_gradients_everywhere():
    params, x, y, _, _ = _binary_linear(n=20)
    const = lambda v, z: jnp.broadcast_to(v["b"], (z.shape[0], 2))  # noqa: E731
    out = evaluate_robustness(const, params, x, y, 0.1, attacks=("pgd",), batch_size=8,
                              unroll=False)
    assert out["zero_grad_fraction"] == 1.0
    predicted = int(np.argmax(np.asarray(params["b"])))
    assert out["acc_pgd"] == out["clean_acc"] == 100.0 * np.mean(y == predicted)
    assert any("zero" in w for w in out["masking_warnings"]), out["masking_warnings"]


@pytest.mark.slow
def test_eps_zero_every_attack_equals_clean_accuracy(digits):
    params, x, y = digits
    out = evaluate_robustness(_mlp_apply, params, x[:100], y[:100], 0.0, attacks=ALL,
                              steps=5, batch_size=64, unroll=False)
    clean = 100.0 * np.mean(np.argmax(np.asarray(_mlp_apply(params, x[:100])), 1) == y[:100])
    assert 80.0 < out["clean_acc"] == clean
    for name in ALL:
        assert out[f"acc_{name}"] == clean, name
    assert out["acc_worst"] == out["acc_pgd_eps_x2"] == out["acc_pgd_steps_x5"] == clean


@pytest.mark.slow
def test_digits_worst_case_and_apgd_vs_pgd(digits):
    params, x, y = digits
    out = evaluate_robustness(_mlp_apply, params, x, y, 0.1, attacks=ALL, batch_size=160,
                              key=jax.random.key(3), unroll=False)
    assert out["n"] == len(x) == 297
    assert out["acc_pgd"] < out["clean_acc"] and out["acc_worst"] > 0
    for name in ALL:
        assert out["acc_worst"] <= out[f"acc_{name}"], name
    assert out["acc_apgd"] <= out["acc_pgd"]
    assert out["acc_worst"] == 100.0 * out["robust_mask"].sum() / 297
    assert out["acc_pgd_eps_x2"] <= out["acc_pgd"] and out["zero_grad_fraction"] == 0.0


def test_apgd_jits_with_static_settings_and_stays_in_the_ball(digits):
    # (multitarget's and pgd_restarts' points are checked in the tests below)
    params, x, y = digits
    xj, yj, key, eps = jnp.asarray(x[:16]), jnp.asarray(y[:16]), jax.random.key(4), 0.15
    f = jax.tree_util.Partial(_mlp_apply, params)
    jitted = jax.jit(apgd_ce, static_argnames=("eps", "steps", "restarts", "unroll"))
    x_adv = np.asarray(jitted(f, xj, yj, key, eps=eps, steps=10, restarts=2, unroll=False))
    assert np.max(np.abs(x_adv - x[:16])) <= eps + 1e-6
    assert x_adv.min() >= 0.0 and x_adv.max() <= 1.0
    assert np.mean(np.argmax(np.asarray(f(x_adv)), 1) == y[:16]) < np.mean(
        np.argmax(np.asarray(f(xj)), 1) == y[:16])


@jax.jit
def _grad_log_softmax(f, x, target):
    """d/dx sum_i log softmax(f(x))_{i, target_i}; f a jax.tree_util.Partial."""
    return jax.grad(lambda z: jnp.sum(jnp.take_along_axis(
        jax.nn.log_softmax(f(z)), target[:, None], axis=1)))(x)


def _targeted_pgd_loop(f, x, target, key, eps, steps, step_size):
    """Targeted PGD written out: the start of pgd_attack (uniform noise from split(key)[0],
    clipped), then sign steps up log softmax_target, projection on the ball and [0, 1]."""
    init_key = jax.random.split(key)[0]
    noise = np.asarray(jax.random.uniform(init_key, x.shape, jnp.float32, -eps, eps))
    xa = np.clip(x + noise, 0, 1)
    for _ in range(steps):
        xa = xa + step_size * np.sign(np.asarray(_grad_log_softmax(f, xa, target)))
        xa = np.clip(xa, np.maximum(x - eps, 0), np.minimum(x + eps, 1))
    return xa


def test_multitarget_equals_a_loop_over_target_classes(digits):
    params, x, y = digits
    x, y, eps, steps, k = x[:24], y[:24], 0.12, 20, 10
    f = jax.tree_util.Partial(_mlp_apply, params)
    key = jax.random.key(5)
    got = np.asarray(jax.jit(lambda a, b, c: multitarget_attack(
        f, a, b, c, eps=eps, steps=steps, num_classes=k, unroll=False))(x, y, key))

    keys = jax.random.split(key, k - 1)
    candidates = {}  # class -> [B, ...] iterate of the attack toward it
    for t in range(k - 1):
        target = np.where(t >= y, t + 1, t)  # the t-th class other than y, per example
        xa = _targeted_pgd_loop(f, x, target, keys[t], eps, steps, eps / 10)
        for i in range(len(x)):
            candidates[(i, int(target[i]))] = xa[i]
    expected, fooled = np.empty_like(x), 0
    for i in range(len(x)):
        best, best_key = None, None
        for j in range(k):
            if j == y[i]:
                continue
            logits = np.asarray(_mlp_apply(params, candidates[(i, j)][None]))[0]
            prob = np.exp(logits[j] - logits.max()) / np.sum(np.exp(logits - logits.max()))
            rank = (np.argmax(logits) != y[i], prob)  # misclassified first, then softmax_j
            if best_key is None or rank > best_key:
                best, best_key = candidates[(i, j)], rank
        expected[i] = best
        fooled += bool(best_key[0])
    assert 0 < fooled < len(x)
    np.testing.assert_allclose(got, expected, atol=1e-6)
    assert np.max(np.abs(got - x)) <= eps + 1e-6 and got.min() >= 0 and got.max() <= 1


def test_pgd_restarts_one_is_pgd_cross_entropy_and_more_restarts_help(digits):
    params, x, y = digits
    f = lambda z: _mlp_apply(params, z)  # noqa: E731
    xj, yj, key, eps = jnp.asarray(x), jnp.asarray(y), jax.random.key(6), 0.1
    one = jax.jit(lambda a, b, c: pgd_restarts(f, a, b, c, eps=eps, restarts=1,
                                               unroll=False))(xj, yj, key)
    ref = jax.jit(lambda a, b, c: pgd_cross_entropy(f, a, b, c, eps=eps,
                                                    unroll=False))(xj, yj, key)
    np.testing.assert_array_equal(np.asarray(one), np.asarray(ref))
    four = jax.jit(lambda a, b, c: pgd_restarts(f, a, b, c, eps=eps, restarts=4,
                                                unroll=False))(xj, yj, key)
    correct1 = np.argmax(np.asarray(f(one)), 1) == y
    correct4 = np.argmax(np.asarray(f(four)), 1) == y
    assert correct4.sum() <= correct1.sum()
    assert not np.any(correct4 & ~correct1)  # restart 0 is the restarts=1 attack
    four = np.asarray(four)
    assert np.max(np.abs(four - x)) <= eps + 1e-6 and four.min() >= 0 and four.max() <= 1


def test_a_pgd_that_more_steps_beat_by_over_3_points_is_flagged_unconverged():
    """The counts of two Fashion-MNIST cells (docs/results_fashion_mnist_fit, seed 0): GR's
    PGD-50 is 5.2 points below its PGD-10 (AutoAttack 9.5), AT's 1.1."""
    gr = masking_warnings(pgd=329, pgd_eps_x2=14, pgd_steps_x5=277, zero_grad_fraction=0.0,
                          n=1000, pgd_steps=10)
    assert len(gr) == 1 and "PGD-10 has not converged" in gr[0] and "(277/1000)" in gr[0]
    at = masking_warnings(pgd=673, pgd_eps_x2=221, pgd_steps_x5=662, zero_grad_fraction=0.0,
                          n=1000, pgd_steps=10)
    assert at == []
    edge = dict(pgd_eps_x2=0, zero_grad_fraction=0.0, n=1000, pgd_steps=10)
    assert masking_warnings(pgd=330, pgd_steps_x5=300, **edge) == []  # 3.0 points: not over
    assert len(masking_warnings(pgd=331, pgd_steps_x5=300, **edge)) == 1
