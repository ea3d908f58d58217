"""Each objective's loss and parameter gradient, both variants, against NumPy.

The model is a 2-class linear map (no dropout, no BatchNorm: train and eval mode agree), so
every input gradient has a closed form, the CE-PGD worst case is a known corner, and the
parameter gradients are checked by central finite differences in float64. The attacks' random
starts are recorded as the objective draws them (whatever key it uses) and the reference
attack starts from the same points, as the official procedure's noise would be passed in.
One batch row is padding (mask 0) and must not count.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_robust import attacks, methods, models
from jax_robust.objectives import ObjectiveParams

D, K, B = 6, 2, 6
EPS = 0.1


def softmax(z):
    e = np.exp(z - z.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def ce(z, y):
    m = z.max(1)
    return m + np.log(np.exp(z - m[:, None]).sum(1)) - z[np.arange(len(y)), y]


def ce_input_grad(w, b, x, y):
    return (softmax(x @ w + b) - np.eye(K)[y]) @ w.T


def kl(zp, zq):
    p, q = softmax(zp), softmax(zq)
    return (p * (np.log(p) - np.log(q))).sum(1)


def project(xa, x):
    return np.clip(xa, np.maximum(x - EPS, 0), np.minimum(x + EPS, 1))


@pytest.fixture
def recorded_starts(monkeypatch):
    """The random starts of every attack the objective runs, [B, D] float64 each, in order."""
    starts = []

    def recording(*args, **kwargs):
        out = original(*args, **kwargs)
        starts.append(np.asarray(out, np.float64).reshape(B, D))
        return out

    original = attacks.random_start
    monkeypatch.setattr(attacks, "random_start", recording)
    return starts


def llr_delta(x, start, grad_fn):
    """Official LLR search from `start`: 2 l_inf-normalised steps of eps/2, clip, renorm."""
    delta = start - x
    for _ in range(2):
        g = grad_fn(x + delta)
        delta = delta + EPS / 2 * g / np.abs(g).max(1, keepdims=True)
        delta = np.clip(x + delta, 0, 1) - x
        norm = np.abs(delta).max(1, keepdims=True)
        delta = np.where(norm > EPS, delta * EPS / (norm + 1e-7), delta)
    return delta


def reference(method, variant, w, b, x, y, mask, starts, hp):
    """(loss_fn(w, b) with the attack held fixed, extra_grad_fn or None) in float64."""
    mean = lambda v: (v * mask).sum() / B  # noqa: E731
    if method == "natural":
        return lambda w_, b_: mean(ce(x @ w_ + b_, y)), None
    if method in ("at", "rst"):
        corner = project(x + EPS * np.sign(w[:, 1 - y] - w[:, y]).T, x)
        if method == "at":
            return lambda w_, b_: mean(ce(corner @ w_ + b_, y)), None
        return lambda w_, b_: mean(ce(x @ w_ + b_, y) + hp["lam"] * ce(corner @ w_ + b_, y)), None
    if method == "trades":
        (xa,) = starts
        p = softmax(x @ w + b)
        for _ in range(hp.steps):
            g = (softmax(xa @ w + b) - p) @ w.T
            xa = project(xa + hp.step_size * np.sign(g), x)
        return lambda w_, b_: mean(ce(x @ w_ + b_, y) + hp["beta"] * kl(x @ w_ + b_, xa @ w_ + b_)), None
    if method == "gr":
        d = ce_input_grad(w, b, x, y)
        v = d / np.linalg.norm(d, axis=1, keepdims=True)

        def loss(w_, b_):
            base = ce(x @ w_ + b_, y)
            diff = (ce((x + hp["gr_h"] * v) @ w_ + b_, y) - base) / hp["gr_h"]
            return mean(base + 0.5 * hp["lam"] * diff**2)

        extra = (lambda w_, b_: mean(ce(x @ w_ + b_, y))) if variant == "official" else None
        return loss, extra
    if method == "llr" and variant == "official":
        delta = llr_delta(x, starts[0], lambda z: ce_input_grad(w, b, z, y))
        return lambda w_, b_: mean(ce(x @ w_ + b_, y) + hp["lam"] * ce((x + delta) @ w_ + b_, y)), None
    # llr, paper
    l0, g0 = ce(x @ w + b, y), ce_input_grad(w, b, x, y)

    def nonlinearity_grad(z):
        inner = ce(z @ w + b, y) - l0 - ((z - x) * g0).sum(1)
        return np.sign(inner)[:, None] * (ce_input_grad(w, b, z, y) - g0)

    delta = llr_delta(x, starts[0], nonlinearity_grad)

    def loss(w_, b_):
        base, grad = ce(x @ w_ + b_, y), ce_input_grad(w_, b_, x, y)
        dot = (delta * grad).sum(1)
        g = np.abs(ce((x + delta) @ w_ + b_, y) - base - dot)
        return mean(base + hp["lam"] * g + hp["mu"] * np.abs(dot))

    return loss, None


def finite_difference_grad(fn, w, b, h=1e-6):
    grads = []
    for which, arr in ((0, w), (1, b)):
        g = np.zeros_like(arr)
        for idx in np.ndindex(arr.shape):
            plus, minus = [w.copy(), b.copy()], [w.copy(), b.copy()]
            plus[which][idx] += h
            minus[which][idx] -= h
            g[idx] = (fn(*plus) - fn(*minus)) / (2 * h)
        grads.append(g)
    return grads


CASES = [(m, v) for m in ("natural", "gr", "llr", "at", "trades", "rst")
         for v in ("official", "paper")]


@pytest.mark.parametrize("method,variant", CASES)
def test_objective_loss_and_gradient_match_numpy(method, variant, recorded_starts):
    rng = np.random.default_rng(0)
    # Large weights for paper LLR: its search starts from the sign of a second-order
    # quantity at |delta| = 0.001, which must stand clear of float32 rounding.
    w = rng.normal(size=(D, K)) * (4.0 if (method, variant) == ("llr", "paper") else 1.0)
    b = rng.normal(size=K) * 0.1
    x = rng.uniform(0.05, 0.95, size=(B, D))
    y = rng.integers(0, K, size=B)
    mask = np.array([1, 1, 1, 1, 1, 0], np.float64)
    key = jax.random.key(42)
    given = {"trades": {"beta": 3.0}, "gr": {"lam": 1.0, "gr_h": 0.5}, "rst": {"lam": 2.0},
             "llr": {"lam": 4.0, "mu": 3.0}}.get(method, {})
    hp = ObjectiveParams(eps=EPS, step_size=EPS / 5, steps=10, variant=variant, unroll=True,
                         hparams=methods.get(method).resolve_hparams(given))
    model_fn = models.make_model_fn(models.Linear(num_classes=K))
    params = {"Dense_0": {"kernel": jnp.asarray(w, jnp.float32),
                          "bias": jnp.asarray(b, jnp.float32)}}
    batch = {"x": jnp.asarray(x.reshape(B, 1, D, 1), jnp.float32), "y": jnp.asarray(y),
             "mask": jnp.asarray(mask, jnp.float32)}

    def objective(p):
        return methods.get(method).objective(model_fn, p, {}, batch, key, hp)

    (loss, (_, metrics)), grads = jax.value_and_grad(objective, has_aux=True)(params)
    # The reference is evaluated on the float32-rounded inputs the model sees.
    w32, b32, x32 = (np.asarray(a, np.float32).astype(np.float64) for a in (w, b, x))
    # One attack, one random start, for each method but natural and GR.
    assert len(recorded_starts) == int(method not in ("natural", "gr")), len(recorded_starts)
    ref_loss, extra = reference(method, variant, w32, b32, x32, y, mask, recorded_starts, hp)
    np.testing.assert_allclose(float(metrics["loss"]), ref_loss(w32, b32), rtol=2e-4)
    gw, gb = finite_difference_grad(ref_loss, w32, b32)
    if extra is not None:  # official GR: the CE gradient counted twice
        ew, eb = finite_difference_grad(extra, w32, b32)
        gw, gb = gw + ew, gb + eb
    np.testing.assert_allclose(np.asarray(grads["Dense_0"]["kernel"]), gw, rtol=2e-3, atol=2e-5)
    np.testing.assert_allclose(np.asarray(grads["Dense_0"]["bias"]), gb, rtol=2e-3, atol=2e-5)
    assert float(metrics["count"]) == 5


@pytest.mark.slow
def test_official_llr_equals_ce_plus_lambda_ce_at_the_perturbed_point():
    # The official LLR zeroes the input gradient: its loss is CE(x) + lambda CE(x + delta),
    # whatever mu is.
    rng = np.random.default_rng(1)
    model_fn = models.make_model_fn(models.Linear(num_classes=3))
    module = models.Linear(num_classes=3)
    params, _ = models.init_model(module, jax.random.key(0), (4, 4, 1))
    x = jnp.asarray(rng.uniform(0, 1, size=(8, 4, 4, 1)), jnp.float32)
    batch = {"x": x, "y": jnp.asarray(rng.integers(0, 3, 8)), "mask": jnp.ones(8)}
    key = jax.random.key(5)
    llr = methods.get("llr")
    losses = [llr.objective(model_fn, params, {}, batch, key, ObjectiveParams(
        eps=0.1, step_size=0.02, steps=10, variant="official", unroll=True,
        hparams=llr.resolve_hparams({"lam": 4.0, "mu": mu})))[0] for mu in (0.0, 3.0, 100.0)]
    np.testing.assert_allclose(losses, losses[0], rtol=1e-6)
