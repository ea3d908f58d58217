"""pgd_attack against closed forms and NumPy transcriptions."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_robust.attacks import cross_entropy, pgd_attack, pgd_cross_entropy


def _binary_linear(seed=0, d=12, n=16):
    rng = np.random.default_rng(seed)
    w = rng.normal(size=(d, 2)).astype(np.float32)
    b = rng.normal(size=2).astype(np.float32)
    x = rng.uniform(0.05, 0.95, size=(n, d)).astype(np.float32)
    y = rng.integers(0, 2, size=n).astype(np.int32)
    return w, b, x, y


@pytest.mark.parametrize("eps", [0.03, 0.1, 0.3])
def test_pgd_on_linear_model_reaches_the_closed_form_worst_case(eps):
    # For two classes, CE is increasing in the margin (w_other - w_y) . x, so the worst case
    # in the box B(x, eps) n [0, 1]^d is the corner x + eps sign(w_other - w_y), clipped.
    w, b, x, y = _binary_linear()
    x_adv = pgd_cross_entropy(lambda z: z @ w + b, jnp.asarray(x), jnp.asarray(y),
                              jax.random.key(0), eps=eps, steps=10)
    direction = np.sign(w[:, 1 - y] - w[:, y]).T  # [n, d]
    expected = np.clip(x + eps * direction, 0, 1)
    np.testing.assert_allclose(np.asarray(x_adv), expected, atol=1e-6)
    worst = -np.log(1 / (1 + np.exp(-((expected @ w + b)[np.arange(16), y]
                                        - (expected @ w + b)[np.arange(16), 1 - y]))))
    np.testing.assert_allclose(cross_entropy(x_adv @ w + b, y), worst, rtol=1e-5)


def test_pgd_at_eps_zero_returns_the_clean_input():
    w, b, x, y = _binary_linear(1)
    x_adv = pgd_cross_entropy(lambda z: z @ w + b, jnp.asarray(x), jnp.asarray(y),
                              jax.random.key(3), eps=0.0, steps=5)
    np.testing.assert_array_equal(np.asarray(x_adv), x)


def test_iterates_stay_in_the_ball_and_the_box():
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.uniform(0, 1, size=(8, 5, 5, 1)).astype(np.float32))
    x = x.at[0].set(0.0).at[1].set(1.0)  # points on the box's faces

    def loss(z):  # a non-linear loss that pushes outwards
        return jnp.sum(jnp.sin(7 * z) + z**2, axis=(1, 2, 3))

    for init in ("uniform", "normal"):
        x_adv = pgd_attack(loss, x, jax.random.key(0), eps=0.05, steps=7, step_size=0.03,
                           init=init)
        assert float(jnp.max(jnp.abs(x_adv - x))) <= 0.05 + 1e-6
        assert float(x_adv.min()) >= 0.0 and float(x_adv.max()) <= 1.0


def test_vmap_over_examples_matches_the_batched_attack():
    w, b, x, y = _binary_linear(3)

    def attack(xi, yi):
        # one example at a time, deterministic start so both runs see the same iterates
        return pgd_attack(lambda z: cross_entropy(z @ w + b, yi), xi, jax.random.key(0),
                          eps=0.1, steps=4, step_size=0.02, init="none")

    batched = attack(jnp.asarray(x), jnp.asarray(y))
    per_example = jax.jit(jax.vmap(lambda xi, yi: attack(xi[None], yi[None])[0]))(x, y)
    np.testing.assert_allclose(np.asarray(per_example), np.asarray(batched), atol=1e-7)


def test_attack_output_carries_no_gradient():
    w, b, x, y = _binary_linear(4)

    def f(scale):
        x_adv = pgd_cross_entropy(lambda z: scale * (z @ w + b), jnp.asarray(x),
                                  jnp.asarray(y), jax.random.key(0), eps=0.1)
        return jnp.sum(x_adv)

    assert float(jax.grad(f)(1.0)) == 0.0


def test_llr_update_and_rescale_match_a_numpy_transcription():
    # The official LLR inner loop: delta += a * g / ||g||_inf per example, then
    # delta = clip(x + delta, 0, 1) - x and torch.renorm(p=inf, maxnorm=eps), each step.
    rng = np.random.default_rng(5)
    d, n, eps, a = 6, 8, 0.1, 0.05
    w = rng.normal(size=(d, 3)).astype(np.float32)
    x = rng.uniform(0, 1, size=(n, d)).astype(np.float32)
    x[0] = 0.0  # clip active
    y = rng.integers(0, 3, size=n)
    key = jax.random.key(7)
    init_key, _ = jax.random.split(key)
    delta = 0.001 * np.asarray(jax.random.normal(init_key, x.shape, jnp.float32))
    for _ in range(2):
        z = (x + delta) @ w
        p = np.exp(z - z.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        g = (p - np.eye(3)[y]) @ w.T  # grad of CE wrt the input of a linear map
        delta = delta + a * g / np.abs(g).max(1, keepdims=True)
        delta = np.clip(x + delta, 0, 1) - x
        norm = np.abs(delta).max(1, keepdims=True)
        delta = np.where(norm > eps, delta * eps / (norm + 1e-7), delta)
    x_adv = pgd_attack(lambda z: cross_entropy(z @ w, jnp.asarray(y)), jnp.asarray(x), key,
                       eps=eps, steps=2, step_size=a, init="normal", init_scale=0.001,
                       update="linf_normalized", project="rescale")
    np.testing.assert_allclose(np.asarray(x_adv) - x, delta, atol=1e-6)
    assert np.abs(delta).max() <= eps + 1e-6


def test_project_xla_flags_avoid_the_uint8_reduce_miscompilation():
    # jaxlib 0.10.2's YNNPACK reduce fusion got 94% of these entries wrong; the project's
    # speed flags (set in conftest, as the binaries set them) turn that fusion off.
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (16, 300, 1), dtype=np.uint8)
    b = rng.integers(0, 256, (1, 300, 32), dtype=np.uint8)
    got = jax.jit(lambda a, b: jnp.max(jnp.maximum(a, b) - jnp.minimum(a, b), axis=1))(a, b)
    np.testing.assert_array_equal(got, np.abs(a.astype(int) - b.astype(int)).max(1))
