"""jax_robust.autoattack: the pieces against independent computations (a NumPy formula of the
DLR losses, a NumPy transcription of the reference's APGD loop on a linear model, a linear
program for FAB's projection, the reference's Square schedule table), the whole evaluation's
invariants (never above APGD-CE's or PGD's accuracy, deterministic under a key, one trace per
program whatever the batches, the same under a mesh), and, where PyTorch and pyautoattack are
installed (the [reference] extra), the reference itself: the same start gives the same APGD
and FAB iterates, and the standard version's robust accuracy agrees.

The model of most tests: a small MLP trained for a few hundred steps on the 8x8 digits.
"""

import os
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jax_robust import autoattack as aa
from jax_robust.data import load_digits

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EPS = 0.05
N = 96  # test points of the whole-evaluation tests (two batches of 48)


class MLP(nn.Module):
    """64 -> 32 -> 10, ReLU: the test model."""

    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Dense(32)(x.reshape(x.shape[0], -1)))
        return nn.Dense(10)(x)


MODEL = MLP()


def apply_fn(variables, x):
    return MODEL.apply(variables, x)


@pytest.fixture(scope="module")
def digits():
    return load_digits()


@pytest.fixture(scope="module")
def mlp(digits):
    """Variables of the MLP after 400 Adam steps (test accuracy about 95%)."""
    variables = MODEL.init(jax.random.key(0), digits.x_train[:1])
    opt = optax.adam(3e-3)

    @jax.jit
    def step(v, state, x, y):
        grads = jax.grad(lambda v: optax.softmax_cross_entropy_with_integer_labels(
            apply_fn(v, x), y).mean())(v)
        updates, state = opt.update(grads, state)
        return optax.apply_updates(v, updates), state

    state = opt.init(variables)
    rng = np.random.default_rng(0)
    for _ in range(400):
        idx = rng.integers(0, len(digits.x_train), 64)
        variables, state = step(variables, state, digits.x_train[idx], digits.y_train[idx])
    return variables


@pytest.fixture(scope="module")
def standard(digits, mlp):
    """The standard version on N test points, batches of 48, seed 0."""
    lines = []
    out = aa.autoattack(apply_fn, mlp, digits.x_test[:N], digits.y_test[:N], EPS, key=0,
                        batch_size=48, log=lines.append)
    return out, lines


# ------------------------------------------------------------------------------ the losses


def test_dlr_losses_match_a_numpy_formula():
    rng = np.random.default_rng(0)
    z = rng.normal(size=(200, 10)).astype(np.float32)
    y = rng.integers(0, 10, 200)
    z[:50, 3] += 5.0  # some labels are the top class, some not
    y[:50] = 3
    t = (y + 1 + rng.integers(0, 9, 200)) % 10  # a target other than y
    zs = np.sort(z.astype(np.float64), axis=1)
    rows = np.arange(200)
    other = np.array([np.max(np.delete(z[i], y[i])) for i in rows])
    want = -(z[rows, y] - other) / (zs[:, -1] - zs[:, -3] + 1e-12)
    np.testing.assert_allclose(aa.dlr_loss(jnp.asarray(z), jnp.asarray(y)), want, rtol=1e-5,
                               atol=1e-6)
    want_t = -(z[rows, y] - z[rows, t]) / (zs[:, -1] - (zs[:, -3] + zs[:, -4]) / 2 + 1e-12)
    np.testing.assert_allclose(aa.dlr_loss_targeted(jnp.asarray(z), jnp.asarray(y),
                                                    jnp.asarray(t)), want_t, rtol=1e-5,
                               atol=1e-6)
    np.testing.assert_allclose(aa.margin(jnp.asarray(z), jnp.asarray(y)),
                               z[rows, y] - other, rtol=1e-6)
    # The rank-th highest clean logit: rank 2 is the runner-up.
    order = np.argsort(-z, axis=1)
    for rank in (2, 3, 10):
        np.testing.assert_array_equal(aa.ranked_target(jnp.asarray(z), rank),
                                      order[:, rank - 1])


# ----------------------------------------------------------------------------------- APGD


def numpy_apgd_ce_linear(w, bias, x, y, x_init, eps, n_iter, rho=0.75):
    """The reference's APGDAttack.attack_single_run (l_inf, CE, x_init given), transcribed in
    NumPy for logits = flatten(x) @ w + bias: its loss table (whose index -1 wraps to the
    unwritten last row at the first checkpoint), check_oscillation, momentum 0.75, the
    halving and the reset to the best point. Returns (x_best, fooled, loss_best,
    x_best_adv)."""
    n = len(x)
    rows = np.arange(n)
    onehot = np.eye(w.shape[1])[y]

    def loss_grad(z):
        logits = z.reshape(n, -1) @ w + bias
        m = logits.max(1)
        e = np.exp(logits - m[:, None])
        loss = -(logits[rows, y] - m - np.log(e.sum(1)))
        grad = ((e / e.sum(1, keepdims=True) - onehot) @ w.T).reshape(z.shape)
        return loss, grad, logits.argmax(1) == y

    k = max(int(0.22 * n_iter), 1)
    k_min, decrease = max(int(0.06 * n_iter), 1), max(int(0.03 * n_iter), 1)
    x_adv = np.clip(x_init, 0.0, 1.0)
    x_best, x_best_adv = x_adv.copy(), x_adv.copy()
    loss, grad, correct = loss_grad(x_adv)
    loss_best, grad_best = loss.copy(), grad.copy()
    loss_steps = np.zeros((n_iter, n))
    step = np.full((n, 1, 1, 1), 2.0 * eps)
    x_old = x_adv.copy()
    loss_best_last, reduced_last = loss_best.copy(), np.ones(n, bool)
    counter = 0
    proj = lambda v: np.clip(np.minimum(np.maximum(v, x - eps), x + eps), 0.0, 1.0)  # noqa
    for i in range(n_iter):
        grad2 = x_adv - x_old
        x_old = x_adv.copy()
        a = 0.75 if i > 0 else 1.0
        x1 = proj(x_adv + step * np.sign(grad))
        x_adv = proj(x_adv + (x1 - x_adv) * a + grad2 * (1 - a))
        loss, grad, pred = loss_grad(x_adv)
        correct &= pred
        x_best_adv[~pred] = x_adv[~pred]
        loss_steps[i] = loss
        better = loss > loss_best
        x_best[better], grad_best[better], loss_best[better] = (
            x_adv[better], grad[better], loss[better])
        counter += 1
        if counter == k:
            ups = sum((loss_steps[i - c] > loss_steps[i - c - 1]).astype(float)
                      for c in range(k))
            reduce = (ups <= k * rho) | (~reduced_last & (loss_best_last >= loss_best))
            reduced_last, loss_best_last = reduce, loss_best.copy()
            step[reduce] /= 2.0
            x_adv[reduce], grad[reduce] = x_best[reduce], grad_best[reduce]
            k, counter = max(k - decrease, k_min), 0
    return x_best, ~correct, loss_best, x_best_adv


@pytest.mark.parametrize("n_iter", [100, 37])
def test_apgd_matches_a_numpy_transcription_of_the_reference(n_iter):
    rng = np.random.default_rng(n_iter)
    n, eps = 40, 0.0625
    x = rng.uniform(size=(n, 4, 4, 1))
    x[:, :2] = np.round(x[:, :2])  # pixels at the box's faces
    w, bias = rng.normal(size=(16, 5)), rng.normal(size=5)
    y = rng.integers(0, 5, n)
    t = rng.uniform(-1, 1, x.shape)
    x_init = x + eps * t / np.abs(t).reshape(n, -1).max(1)[:, None, None, None]
    want = numpy_apgd_ce_linear(w, bias, x, y, x_init, eps, n_iter)
    with jax.enable_x64(True):
        def run(x, y, x_init, w, bias):
            logits_fn = lambda z, k: z.reshape(n, -1) @ w + bias  # noqa: E731
            return aa.apgd_run(logits_fn, x, y, x_init, eps=eps, n_iter=n_iter, loss="ce")

        got = jax.tree_util.tree_map(np.asarray, jax.jit(run)(x, y, x_init, w, bias))
    np.testing.assert_allclose(got["x_best"], want[0], atol=1e-10)
    np.testing.assert_array_equal(got["fooled"], want[1])
    np.testing.assert_allclose(got["loss_best"], want[2], rtol=1e-9)
    np.testing.assert_allclose(got["x_best_adv"], want[3], atol=1e-10)
    assert 0 < want[1].sum() < n  # both outcomes occur


def test_apgd_start_is_on_the_eps_sphere():
    x = jnp.full((3, 4, 4, 1), 0.5)
    t = jax.random.uniform(jax.random.key(0), x.shape, minval=-1, maxval=1)
    delta = aa.apgd_start(x, t, 0.1) - x
    np.testing.assert_allclose(np.abs(delta).reshape(3, -1).max(1), 0.1, rtol=1e-5)


# ------------------------------------------------------------------------------------ FAB


def lp_min_linf_step(t, w, b):
    """min ||d||_inf s.t. w.(t + d) = b, 0 <= t + d <= 1, by scipy's linprog; None if
    infeasible."""
    from scipy.optimize import linprog

    d = len(t)
    cost = np.r_[np.zeros(d), 1.0]  # variables (d, lam)
    upper = np.block([[np.eye(d), -np.ones((d, 1))], [-np.eye(d), -np.ones((d, 1))]])
    res = linprog(cost, A_ub=upper, b_ub=np.zeros(2 * d), A_eq=np.r_[w, 0.0][None],
                  b_eq=[b - w @ t], bounds=[(-ti, 1 - ti) for ti in t] + [(0, None)],
                  method="highs")
    return res.x[-1] if res.status == 0 else None


def test_fab_projection_is_the_smallest_linf_step_of_a_linear_program():
    rng = np.random.default_rng(0)
    rows, feasible = [], 0
    for dim in (1, 2, 3, 5, 8):
        for _ in range(40):
            t = rng.uniform(size=dim)
            t[rng.uniform(size=dim) < 0.3] = rng.integers(0, 2)  # on the box's faces
            w = rng.normal(size=dim)
            w[rng.uniform(size=dim) < 0.15] = 0.0
            b = w @ t + rng.normal() * np.abs(w).sum() * 0.5
            rows.append((t, w, b))
    for dim in (1, 2, 3, 5, 8):
        group = [r for r in rows if len(r[0]) == dim]
        t, w, b = (np.stack([g[i] for g in group]) for i in range(3))
        d = np.asarray(jax.jit(aa.fab_projection_linf)(
            t.astype(np.float32), w.astype(np.float32), b.astype(np.float32)), np.float64)
        for ti, wi, bi, di in zip(t, w, b, d):
            lam = lp_min_linf_step(ti, wi, bi)
            assert np.all(ti + di >= -1e-6) and np.all(ti + di <= 1 + 1e-6)
            assert np.all(di[wi == 0] == 0)
            if lam is None:  # out of reach: the box corner that moves w.x furthest toward b
                toward = np.sign(bi - wi @ ti)
                corner = np.where(wi * toward > 0, 1.0, 0.0)
                np.testing.assert_allclose(di[wi != 0], (corner - ti)[wi != 0], atol=1e-6)
            else:
                feasible += 1
                assert np.abs(di).max(initial=0.0) == pytest.approx(lam, abs=2e-6)
                assert wi @ (ti + di) == pytest.approx(bi, abs=1e-4 * (1 + np.abs(wi).sum()))
    assert feasible > 100


def test_fab_t_reaches_the_target_side_and_keeps_the_closest_point(digits, mlp):
    x, y = jnp.asarray(digits.x_test[:32]), jnp.asarray(digits.y_test[:32])
    logits_fn = lambda z, k: apply_fn(mlp, z)  # noqa: E731
    target = aa.ranked_target(logits_fn(x, None), 2)
    out = aa.fab_run(logits_fn, x, y, x, n_iter=20, target=target)
    found, x_adv = np.asarray(out["found"]), np.asarray(out["x_adv"])
    assert found.sum() > 20
    pred = np.asarray(jnp.argmax(apply_fn(mlp, out["x_adv"]), axis=1))
    assert np.all(pred[found] != np.asarray(y)[found])
    norms = np.abs(x_adv - np.asarray(x)).reshape(32, -1).max(1)
    np.testing.assert_allclose(norms[found], np.asarray(out["norm"])[found], rtol=1e-6)
    np.testing.assert_array_equal(x_adv[~found], np.asarray(x)[~found])
    assert np.all((x_adv >= 0) & (x_adv <= 1))


# --------------------------------------------------------------------------------- Square


def reference_p(it, p_init):
    """The reference's SquareAttack.p_selection (resc_schedule=False), as written there."""
    if 10 < it <= 50:
        return p_init / 2
    elif 50 < it <= 200:
        return p_init / 4
    elif 200 < it <= 500:
        return p_init / 8
    elif 500 < it <= 1000:
        return p_init / 16
    elif 1000 < it <= 2000:
        return p_init / 32
    elif 2000 < it <= 4000:
        return p_init / 64
    elif 4000 < it <= 6000:
        return p_init / 128
    elif 6000 < it <= 8000:
        return p_init / 256
    elif 8000 < it:
        return p_init / 512
    return p_init


def test_square_p_schedule_and_square_sizes_match_the_reference_table():
    for it in range(10001):
        assert aa.square_p_schedule(it, 0.8) == reference_p(it, 0.8)
    sizes = aa.square_sizes(5000, 0.8, 28, 28)
    # round(sqrt(p * 784)) at p = 0.8, 0.4, ..., 0.8 / 128, never below 1
    for it, s in [(0, 25), (10, 25), (11, 18), (50, 18), (51, 13), (201, 9), (501, 6),
                  (1001, 4), (2001, 3), (4001, 2), (4999, 2)]:
        assert sizes[it] == s, it
    assert aa.square_sizes(1, 0.8, 8, 8)[0] == 7
    assert aa.square_sizes(9000, 0.8, 4, 4)[-1] == 1


def test_square_stripes_are_vertical_and_squares_shared_by_the_batch():
    stripes = aa.square_stripes(jax.random.split(jax.random.key(0), 6), (8, 8, 1))
    assert stripes.shape == (6, 1, 8, 1) and set(np.unique(stripes)) <= {-1.0, 1.0}
    # A model whose margin drops with the pixel sum: a query is taken wherever its sign is
    # negative, by every point of the batch, and then it is the same square for all.
    logits_fn = lambda z, k: jnp.stack([z.sum((1, 2, 3)), jnp.zeros(len(z))], 1)  # noqa
    x = jnp.asarray(np.random.default_rng(0).uniform(0.3, 0.7, (6, 8, 8, 1)), jnp.float32)
    y = jnp.zeros(6, jnp.int32)
    start = jnp.clip(x + 0.1 * stripes, 0, 1)
    size = int(aa.square_sizes(1, 0.3, 8, 8)[0])
    moved = 0
    for seed in range(6):
        out = aa.square_run(logits_fn, x, y, stripes, jax.random.key(seed), eps=0.1,
                            n_queries=1, p_init=0.3)
        changed = np.abs(np.asarray(out - start)).max(axis=(0, 3)) > 0  # [H, W], any point
        if changed.any():
            moved += 1
            r, c = np.nonzero(changed)
            assert r.max() - r.min() < size and c.max() - c.min() < size
            assert (r.max() < 8 - 1 or size == 8)  # the reference's positions < h - s
    assert moved > 0


# ----------------------------------------------------------------------- the whole evaluation


def test_versions_and_their_settings():
    assert [s.name for s in aa.version_specs("standard")] == ["apgd-ce", "apgd-t", "fab-t",
                                                              "square"]
    std = {s.name: s for s in aa.version_specs("standard")}
    assert (std["apgd-ce"].n_iter, std["apgd-ce"].restarts, std["apgd-t"].n_targets,
            std["fab-t"].n_targets, std["square"].n_iter, std["square"].p_init) == (
        100, 1, 9, 9, 5000, 0.8)
    assert std["apgd-t"].sub_runs == 9 and std["apgd-ce"].sub_runs == 1
    assert [(s.name, s.eot_iter) for s in aa.version_specs("rand")] == [("apgd-ce", 20),
                                                                        ("apgd-dlr", 20)]
    custom = aa.version_specs("custom", ["apgd-ce", "fab", aa.AttackSpec("fab-t",
                                                                         restarts=3)])
    assert [(s.name, s.restarts) for s in custom] == [("apgd-ce", 5), ("fab", 5),
                                                      ("fab-t", 1)]
    with pytest.raises(ValueError, match="only taken with version='custom'"):
        aa.version_specs("standard", ["apgd-ce"])
    with pytest.raises(ValueError, match="unknown attack"):
        aa.version_specs("custom", ["pgd"])
    with pytest.raises(ValueError, match="unknown version"):
        aa.version_specs("fast")


def test_standard_version_result_and_log(standard, digits, mlp):
    out, lines = standard
    x, y = digits.x_test[:N], digits.y_test[:N]
    assert out["version"] == "standard" and out["seed"] == 0 and out["n"] == N
    assert out["attacks"] == ["apgd-ce", "apgd-t", "fab-t", "square"]
    assert out["key"] == np.asarray(jax.random.key_data(jax.random.key(0))).tolist()
    assert list(out["robust_acc_after"]) == ["clean"] + out["attacks"]
    accs = list(out["robust_acc_after"].values())
    assert accs == sorted(accs, reverse=True) and accs[-1] == out["robust_acc"]
    assert 0 < out["robust_acc"] < out["clean_acc"] <= 100
    assert len(lines) == 5 and "apgd-t: robust accuracy" in lines[2]
    robust, x_adv = out["robust_flags"], out["x_adv"]
    assert robust.dtype == bool and robust.shape == (N,)
    assert out["robust_acc"] == pytest.approx(100 * robust.mean())
    logits = np.asarray(apply_fn(mlp, x_adv))
    top2 = np.sort(logits, axis=1)[:, -2:]
    clear = top2[:, 1] - top2[:, 0] > 1e-4  # not a near-tie (FAB stops near the boundary)
    pred = logits.argmax(1)
    np.testing.assert_array_equal(pred[clear], out["y_adv"][clear])
    np.testing.assert_array_equal(robust[clear], (pred == y)[clear])
    assert np.abs(x_adv - x).max() <= EPS + 1e-6 and x_adv.min() >= 0 and x_adv.max() <= 1
    np.testing.assert_array_equal(x_adv[robust], x[robust])
    clean_wrong = np.asarray(jnp.argmax(apply_fn(mlp, x), axis=1)) != y
    np.testing.assert_array_equal(out["fooled_by"] == "clean", clean_wrong)
    np.testing.assert_array_equal(x_adv[clean_wrong], x[clean_wrong])
    assert set(out["fooled_by"][~robust & ~clean_wrong]) <= set(out["attacks"])
    assert set(out["seconds"]) == set(out["compile_seconds"]) == set(out["attacks"])


def test_never_above_apgd_ce_or_pgd(standard, digits, mlp):
    from jax_robust.robustness import evaluate_robustness

    out, _ = standard
    other = evaluate_robustness(apply_fn, mlp, digits.x_test[:N], digits.y_test[:N], EPS,
                                attacks=("pgd", "apgd"), batch_size=48, unroll=False)
    assert out["robust_acc"] <= other["acc_pgd"]
    assert out["robust_acc"] <= other["acc_apgd"]
    assert out["robust_acc_after"]["apgd-ce"] <= other["acc_pgd"]


def test_same_key_same_result(standard, digits, mlp):
    x, y = digits.x_test[:N], digits.y_test[:N]
    again = aa.autoattack(apply_fn, mlp, x, y, EPS, key=0, batch_size=48)
    np.testing.assert_array_equal(again["robust_flags"], standard[0]["robust_flags"])
    np.testing.assert_array_equal(again["x_adv"], standard[0]["x_adv"])
    other = aa.autoattack(apply_fn, mlp, x, y, EPS, key=jax.random.key(7), batch_size=48)
    assert other["seed"] is None
    fooled = ~standard[0]["robust_flags"] & (standard[0]["fooled_by"] != "clean")
    assert np.any(other["x_adv"][fooled] != standard[0]["x_adv"][fooled])


def test_one_trace_per_program_and_apgd_independent_of_the_batching(digits, mlp):
    x, y = digits.x_test[:N], digits.y_test[:N]
    specs = [aa.AttackSpec("apgd-ce", n_iter=20, restarts=2),
             aa.AttackSpec("apgd-t", n_iter=10, n_targets=3)]

    def run(batch_size):
        traces = []

        def counted(variables, z):  # a new function each run: nothing cached from before
            traces.append(z.shape)
            return apply_fn(variables, z)

        out = aa.autoattack(counted, mlp, x, y, EPS, "custom", key=3, batch_size=batch_size,
                            attacks=specs)
        return out, len(traces)

    (two, traced_two), (one, traced_one) = run(48), run(96)
    # Two batches or one, 2 restarts and 3 targets: each program traced (compiled) once.
    assert traced_two == traced_one
    # Every example's random start is its own: the batching changes nothing.
    np.testing.assert_array_equal(two["robust_flags"], one["robust_flags"])
    np.testing.assert_allclose(two["x_adv"], one["x_adv"], atol=1e-6)
    assert two["robust_acc_after"]["apgd-t"] < two["robust_acc_after"]["clean"]


def test_errors_a_user_can_cause(digits, mlp):
    x, y = digits.x_test[:8], digits.y_test[:8]
    with pytest.raises(ValueError, match="eps"):
        aa.autoattack(apply_fn, mlp, x, y, 0.0)
    with pytest.raises(ValueError, match=r"x \[N, H, W, C\]"):
        aa.autoattack(apply_fn, mlp, x[:, :, :, 0], y, EPS)
    with pytest.raises(ValueError, match="needs at least 11 classes"):
        aa.autoattack(apply_fn, mlp, x, y, EPS, "custom",
                      attacks=[aa.AttackSpec("fab-t", n_targets=10)])


@pytest.mark.slow
def test_a_mesh_shards_the_batch_and_changes_nothing(standard, digits, mlp):
    from jax.sharding import Mesh

    if jax.device_count() < 2:
        pytest.skip("needs 2 devices (tests/conftest.py sets 2 CPU devices)")
    mesh = Mesh(np.array(jax.devices()[:2]), ("data",))
    out = aa.autoattack(apply_fn, mlp, digits.x_test[:N], digits.y_test[:N], EPS, key=0,
                        batch_size=48, mesh=mesh)
    np.testing.assert_array_equal(out["robust_flags"], standard[0]["robust_flags"])
    np.testing.assert_allclose(out["x_adv"], standard[0]["x_adv"], atol=1e-5)
    with pytest.raises(ValueError, match="multiple"):
        aa.autoattack(apply_fn, mlp, digits.x_test[:8], digits.y_test[:8], EPS, mesh=mesh,
                      batch_size=5)


@pytest.mark.slow
def test_rand_version_on_a_randomised_model(digits, mlp):
    def noisy(variables, x, key):  # a randomised defense: Gaussian input noise
        return apply_fn(variables, x + 0.05 * jax.random.normal(key, x.shape))

    out = aa.autoattack(noisy, mlp, digits.x_test[:48], digits.y_test[:48], EPS, "rand",
                        key=1, batch_size=48, stochastic=True)
    assert out["attacks"] == ["apgd-ce", "apgd-dlr"]
    assert out["settings"]["apgd-dlr"]["eot_iter"] == 20
    assert out["robust_acc"] <= out["robust_acc_after"]["apgd-ce"] <= out["clean_acc"]
    assert out["robust_acc"] < out["clean_acc"]


# ------------------------------------------------------------ against the reference (torch)


def reference():
    """(torch, pyautoattack) or a skip."""
    torch = pytest.importorskip("torch", reason="the [reference] extra (torch) is not "
                                "installed")
    pytest.importorskip("pyautoattack", reason="the [reference] extra (pyautoattack) is not "
                        "installed")
    return torch


def torch_mlp(torch, variables, dtype):
    """The MLP in PyTorch with the same weights (Flax Dense [in, out] -> Linear [out, in]);
    inputs NCHW, one channel, so the flattening orders agree."""
    p = variables["params"]
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 32), torch.nn.ReLU(),
                              torch.nn.Linear(32, 10))
    with torch.no_grad():
        for layer, name in ((net[1], "Dense_0"), (net[3], "Dense_1")):
            layer.weight.copy_(torch.tensor(np.array(p[name]["kernel"]).T))
            layer.bias.copy_(torch.tensor(np.array(p[name]["bias"])))
    return net.to(dtype).eval()


def nchw(torch, x, dtype=None):
    t = torch.from_numpy(np.ascontiguousarray(np.asarray(x).transpose(0, 3, 1, 2)))
    return t if dtype is None else t.to(dtype)


@pytest.mark.filterwarnings("ignore:there are .* points with zero gradient")
@pytest.mark.parametrize("loss", ["ce", "dlr", "dlr-targeted"])
def test_apgd_iterates_equal_the_reference_from_the_same_start(loss, digits, mlp):
    torch = reference()
    from pyautoattack.autopgd_base import APGDAttack, APGDAttack_targeted

    # float64 on both sides; eps = 1/16 makes the reference's float32 step size 2 eps exact.
    n, eps = 32, 0.0625
    x, y = digits.x_test[:n].astype(np.float64), digits.y_test[:n]
    t = np.random.default_rng(1).uniform(-1, 1, x.shape)
    x_init = x + eps * t / np.abs(t).reshape(n, -1).max(1)[:, None, None, None]
    net = torch_mlp(torch, mlp, torch.float64)
    xt, yt = nchw(torch, x), torch.from_numpy(y.astype(np.int64))
    if loss == "dlr-targeted":
        ref = APGDAttack_targeted(net, n_iter=100, eps=eps, seed=0, device="cpu")
        ref.y_target = net(xt).sort(dim=1)[1][:, -2]
    else:
        ref = APGDAttack(net, n_iter=100, eps=eps, seed=0, loss=loss, device="cpu")
    ref.init_hyperparam(xt)
    x_best, acc, loss_best, x_best_adv = ref.attack_single_run(xt, yt, x_init=nchw(torch,
                                                                                   x_init))
    with jax.enable_x64(True):
        v64 = jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float64), mlp)
        logits_fn = lambda z, k: apply_fn(v64, z)  # noqa: E731
        target = None
        if loss == "dlr-targeted":
            target = aa.ranked_target(logits_fn(jnp.asarray(x), None), 2)
            np.testing.assert_array_equal(target, ref.y_target.numpy())
        got = jax.tree_util.tree_map(np.asarray, aa.apgd_run(
            logits_fn, jnp.asarray(x), jnp.asarray(y), jnp.asarray(x_init), eps=eps,
            n_iter=100, loss=loss, target=target))
    nhwc = lambda v: v.detach().numpy().transpose(0, 2, 3, 1)  # noqa: E731
    np.testing.assert_allclose(got["x_best"], nhwc(x_best), atol=1e-9)
    np.testing.assert_allclose(got["x_best_adv"], nhwc(x_best_adv), atol=1e-9)
    np.testing.assert_allclose(got["loss_best"], loss_best.numpy(), rtol=1e-8, atol=1e-9)
    np.testing.assert_array_equal(got["fooled"], acc.numpy() == 0)
    assert got["fooled"].sum() > 0


@pytest.mark.parametrize("target_rank", [2, None])
def test_fab_iterates_equal_the_reference(target_rank, digits, mlp):
    torch = reference()
    from pyautoattack.fab_pt import FABAttack_PT

    # The reference's FAB runs in float32 (it casts x); one start at x: deterministic.
    n = 32
    x, y = digits.x_test[:n], digits.y_test[:n]
    net = torch_mlp(torch, mlp, torch.float32)
    ref = FABAttack_PT(net, n_iter=100, eps=EPS, seed=0, targeted=target_rank is not None,
                       device="cpu")
    ref.target_class = target_rank
    want = ref.attack_single_run(nchw(torch, x), torch.from_numpy(y.astype(np.int64)),
                                 use_rand_start=False, is_targeted=target_rank is not None)
    logits_fn = lambda z, k: apply_fn(mlp, z)  # noqa: E731
    target = None if target_rank is None else aa.ranked_target(logits_fn(x, None),
                                                               target_rank)
    got = aa.fab_run(logits_fn, jnp.asarray(x), jnp.asarray(y), jnp.asarray(x), n_iter=100,
                     target=target)
    want = want.numpy().transpose(0, 2, 3, 1)
    np.testing.assert_allclose(got["x_adv"], want, atol=1e-4)
    np.testing.assert_allclose(np.abs(np.asarray(got["x_adv"]) - x).reshape(n, -1).max(1),
                               np.abs(want - x).reshape(n, -1).max(1), atol=1e-6)
    assert np.asarray(got["found"]).sum() > n // 2


def test_fab_projection_equals_the_reference():
    torch = reference()
    from pyautoattack.fab_projections import projection_linf

    rng = np.random.default_rng(1)
    for dim in (2, 5, 784):
        t = rng.uniform(size=(200, dim)).astype(np.float32)
        t[:, : dim // 3], t[:, -1] = 0.0, 1.0
        w = rng.normal(size=(200, dim)).astype(np.float32)
        w[:, 0] = 0.0
        b = (rng.normal(size=200) * np.abs(w).sum(1) * 0.3).astype(np.float32)
        want = projection_linf(torch.from_numpy(t), torch.from_numpy(w), torch.from_numpy(b))
        got = jax.jit(aa.fab_projection_linf)(t, w, b)
        np.testing.assert_allclose(got, want.numpy(), atol=2e-6)


def test_torch_conversion_gives_the_same_logits():
    torch = reference()
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    from torch_convert import nchw as to_nchw
    from torch_convert import to_torch

    from jax_robust import models

    rng = np.random.default_rng(0)
    for arch, shape in (("cnn1", (8, 8, 1)), ("cnn2", (28, 28, 1))):
        module = models.build_model(arch, 10, shape, dropout=0.5)
        params, _ = models.init_model(module, jax.random.key(1), shape)
        # CNN2's last layer starts at zero: move every weight so the test sees each of them.
        params = jax.tree_util.tree_map(
            lambda a: a + 0.05 * rng.standard_normal(a.shape).astype(np.float32), params)
        x = rng.uniform(size=(8, *shape)).astype(np.float32)
        want = np.asarray(module.apply({"params": params}, x, train=False))
        with torch.no_grad():
            got = to_torch(arch, params, shape, 10)(to_nchw(x)).numpy()
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_standard_version_agrees_with_the_reference(digits, mlp):
    torch = reference()
    from pyautoattack import AutoAttack

    n = 300
    x, y = digits.x_test[:n], digits.y_test[:n]
    adversary = AutoAttack(torch_mlp(torch, mlp, torch.float32), eps=EPS, seed=0,
                           version="standard")
    adversary.logger.setLevel("WARNING")
    _, y_ref = adversary.run_standard_evaluation(
        nchw(torch, x), torch.from_numpy(y.astype(np.int64)), batch_size=n)
    ours = aa.autoattack(apply_fn, mlp, x, y, EPS, key=0, batch_size=n)
    ref_robust = y_ref.numpy() == y
    assert abs(int(ref_robust.sum()) - int(ours["robust_flags"].sum())) <= 2
    assert np.sum(ref_robust != ours["robust_flags"]) <= 4
