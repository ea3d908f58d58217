"""lipschitz_estimate: ascent against the exact maximum of a linear map, descent against a
step-by-step NumPy transcription of the official estimator (docs/official_code.md, section 11)."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_robust import models
from jax_robust.lipschitz import lipschitz_estimate


def linear_apply(w, x):
    return x.reshape(x.shape[0], -1) @ w


def exact_linear_lipschitz(w):
    """max_{d != 0} ||d @ w||_1 / ||d||_inf = max over sign vectors s of ||s @ w||_1."""
    d = w.shape[0]
    return max(np.abs(np.array(s) @ w).sum() for s in itertools.product((-1, 1), repeat=d))


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_ascent_finds_the_exact_maximum_of_a_linear_map(seed):
    rng = np.random.default_rng(seed)
    w = rng.normal(size=(5, 3)).astype(np.float32)
    x = rng.uniform(0.3, 0.7, size=(6, 5)).astype(np.float32)
    exact = exact_linear_lipschitz(w)
    est = lipschitz_estimate(linear_apply, jnp.asarray(w), jnp.asarray(x), 0.1,
                             jax.random.key(seed), direction="ascent", restarts=8)
    est = np.asarray(est)
    # ||d + 1e-6||_inf >= ||d||_inf - 1e-6 with ||d|| >= ~3e-3: the estimate may exceed the
    # exact value by at most ~1e-6 / 3e-3 relative.
    assert np.all(est <= exact * (1 + 1e-3)), (est, exact)
    assert np.all(est >= exact * 0.999), (est, exact)


def numpy_official_descent(w, x, noise, eps, steps=10, step_size=0.003):
    """The official estimate_local_lip_v2 for logits x @ w, top l1, bottom l_inf, written out."""
    xa = x + noise
    for _ in range(steps):
        d = x - xa
        u = d @ w
        top = np.abs(u).sum(1)
        shifted = d + np.float32(1e-6)
        bot = np.abs(shifted).max(1)
        dtop = -(np.sign(u) @ w.T)  # d top / d xa
        # d bot / d xa: the max's gradient is shared evenly among tied coordinates (as JAX and
        # recent PyTorch do; ties occur where several coordinates sit on the same face).
        tied = np.abs(shifted) == bot[:, None]
        dbot = -np.sign(shifted) * tied / tied.sum(1, keepdims=True)
        grad_r = (dtop * bot[:, None] - top[:, None] * dbot) / bot[:, None] ** 2
        xa = xa + step_size * np.sign(-grad_r)  # the official code ascends (-R)
        xa = x + np.clip(xa - x, -eps, eps)
        xa = np.clip(xa, 0, 1)
    d = x - xa
    return np.abs(d @ w).sum(1) / np.abs(d + 1e-6).max(1)


@pytest.mark.parametrize("eps", [0.005, 0.1])
def test_descent_matches_the_official_procedure_from_the_same_noise(eps):
    rng = np.random.default_rng(3)
    w = rng.normal(size=(20, 4)).astype(np.float32)
    x = rng.uniform(0, 1, size=(16, 20)).astype(np.float32)
    x[0, :5] = 0.0  # clipping at the box
    key = jax.random.key(11)
    noise = 0.001 * np.asarray(jax.random.normal(jax.random.split(key)[0], x.shape))
    expected = numpy_official_descent(w, x, noise.astype(np.float32), eps)  # float32, as JAX
    got = np.asarray(lipschitz_estimate(linear_apply, jnp.asarray(w), jnp.asarray(x), eps, key,
                                        direction="descent"))
    np.testing.assert_allclose(got, expected, rtol=2e-3)


@pytest.mark.slow
def test_descent_lowers_and_ascent_raises_the_ratio_on_a_cnn():
    module = models.CNN1(num_classes=10, dropout=0.0)
    params, _ = models.init_model(module, jax.random.key(0), (8, 8, 1))
    x = jax.random.uniform(jax.random.key(1), (32, 8, 8, 1))

    def apply_fn(p, z):
        return module.apply({"params": p}, z, train=False)

    start = lipschitz_estimate(apply_fn, params, x, 0.1, jax.random.key(2), steps=0)
    desc = lipschitz_estimate(apply_fn, params, x, 0.1, jax.random.key(2))
    asc = lipschitz_estimate(apply_fn, params, x, 0.1, jax.random.key(2), direction="ascent")
    assert float(desc.mean()) < float(start.mean()) < float(asc.mean())
    assert np.all(np.asarray(asc) >= np.asarray(start) - 1e-6)  # best iterate kept
    with pytest.raises(ValueError):
        lipschitz_estimate(apply_fn, params, x, 0.1, jax.random.key(2), direction="up")
