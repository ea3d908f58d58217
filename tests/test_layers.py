"""Hand-written gradients (layers.py) against independent computations, and CNN1's bias order."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_robust import layers, models


def numpy_pool_grad(x, g):
    """Brute force: each 2x2 window's gradient split evenly over its maxima (odd edges: 0)."""
    gx = np.zeros_like(x)
    n, h, w, c = x.shape
    for b in range(n):
        for i in range(h // 2):
            for j in range(w // 2):
                for k in range(c):
                    win = x[b, 2 * i: 2 * i + 2, 2 * j: 2 * j + 2, k]
                    hit = win == win.max()
                    gx[b, 2 * i: 2 * i + 2, 2 * j: 2 * j + 2, k] = hit * g[b, i, j, k] / hit.sum()
    return gx


@pytest.mark.parametrize("ties", [False, True])
def test_max_pool_values_and_gradient_against_brute_force(ties):
    rng = np.random.default_rng(0)
    shape = (2, 7, 6, 3)  # an odd height: the last row is dropped, as PyTorch's floor mode
    x = (rng.integers(0, 3, shape) if ties else rng.normal(size=shape)).astype(np.float32)
    g = rng.normal(size=(2, 3, 3, 3)).astype(np.float32)
    y, vjp = jax.vjp(layers.max_pool_2x2, jnp.asarray(x))
    np.testing.assert_array_equal(y, nn.max_pool(x, (2, 2), strides=(2, 2)))
    (gx,) = vjp(jnp.asarray(g))
    expected = numpy_pool_grad(x, g)
    if ties:
        assert (expected != 0).sum() > (g != 0).sum()  # some windows do split their gradient
    np.testing.assert_allclose(gx, expected, rtol=1e-6, atol=1e-7)


def plain_conv(x, w, padding):
    return jax.lax.conv_general_dilated(x, w, (1, 1), padding,
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))


@pytest.mark.parametrize("c_in,kernel,padding", [
    (1, (3, 3), "VALID"), (3, (3, 3), "SAME"), (2, (5, 3), ((2, 0), (1, 2))),
    (4, (3, 3), ((1, 1), (0, 2)))])
def test_small_input_conv_gradients_match_xla(c_in, kernel, padding):
    kx, kw, kg = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(kx, (3, 9, 8, c_in))
    w = jax.random.normal(kw, (*kernel, c_in, 5))
    y, vjp = jax.vjp(lambda a, b: layers.small_input_conv(a, b, (1, 1), padding,
                                                          dimension_numbers=layers.NHWC), x, w)
    y_ref, vjp_ref = jax.vjp(lambda a, b: plain_conv(a, b, padding), x, w)
    np.testing.assert_array_equal(y, y_ref)
    g = jax.random.normal(kg, y.shape)
    (gx, gw), (gx_ref, gw_ref) = vjp(g), vjp_ref(g)
    assert float(jnp.abs(gx_ref).max()) > 1.0
    np.testing.assert_allclose(gx, gx_ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(gw, gw_ref)


def test_small_input_conv_takes_its_own_gradient_only_where_it_fits():
    def has_custom_vjp(c_in, strides):
        x, w = jnp.zeros((1, 8, 8, c_in)), jnp.zeros((3, 3, c_in, 4))
        jaxpr = jax.make_jaxpr(lambda a: layers.small_input_conv(
            a, w, strides, "VALID", dimension_numbers=layers.NHWC))(x)
        return "custom_vjp" in str(jaxpr)

    assert has_custom_vjp(1, (1, 1)) and has_custom_vjp(4, (1, 1))
    assert not has_custom_vjp(5, (1, 1)) and not has_custom_vjp(1, (2, 2))


def official_cnn1(params, x):
    """The official CNN001 in eval mode from plain lax ops: the bias added BEFORE the pool."""
    def conv(x, p):
        return plain_conv(x, p["kernel"], "VALID") + p["bias"]

    def dense(x, p):
        return x @ p["Dense_0"]["kernel"] + p["Dense_0"]["bias"]

    x = conv(jax.nn.relu(conv(x, params["Conv_0"])), params["Conv_1"])
    x = nn.max_pool(x, (2, 2), strides=(2, 2)).reshape(x.shape[0], -1)
    return dense(jax.nn.relu(dense(x, params["TorchDense_0"])), params["TorchDense_1"])


def test_cnn1_bias_after_pool_equals_the_official_order():
    module = models.CNN1()
    params, _ = models.init_model(module, jax.random.key(0), (28, 28, 1))
    assert jax.tree_util.tree_map(jnp.shape, params)["Conv_1"] == {
        "kernel": (3, 3, 32, 64), "bias": (64,)}  # nn.Conv's names: checkpoints still load
    x = jax.random.uniform(jax.random.key(1), (4, 28, 28, 1))
    y = jax.random.randint(jax.random.key(2), (4,), 0, 10)

    def loss(fn, p, x):
        logits = fn(p, x)
        return -jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], 1).sum(), logits

    def ours(p, x):
        return module.apply({"params": p}, x, train=False)

    (l_ours, logits), grads = jax.value_and_grad(
        lambda p, x: loss(ours, p, x), argnums=(0, 1), has_aux=True)(params, x)
    (l_ref, logits_ref), grads_ref = jax.value_and_grad(
        lambda p, x: loss(official_cnn1, p, x), argnums=(0, 1), has_aux=True)(params, x)
    np.testing.assert_allclose(logits, logits_ref, rtol=1e-6, atol=1e-6)
    for a, b in zip(jax.tree_util.tree_leaves(grads), jax.tree_util.tree_leaves(grads_ref)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_channel_sum_and_broadcast_are_each_others_gradient():
    x = jax.random.normal(jax.random.key(0), (3, 5, 4, 6))
    v = jax.random.normal(jax.random.key(1), (6,))
    np.testing.assert_allclose(layers.sum_leading(x), np.asarray(x).sum((0, 1, 2)), rtol=1e-5)
    gx = jax.grad(lambda x: (layers.sum_leading(x) * v).sum())(x)
    np.testing.assert_array_equal(gx, np.broadcast_to(v, x.shape))
    gv = jax.grad(lambda v: (layers.broadcast_leading(v, x.shape) * x).sum())(v)
    np.testing.assert_allclose(gv, np.asarray(x).sum((0, 1, 2)), rtol=1e-5)


@pytest.mark.parametrize("train", [True, False])
def test_batchnorm_matches_flax_batchnorm(train):
    x = 3.0 + 2.0 * jax.random.normal(jax.random.key(0), (8, 5, 5, 4))
    ours = models.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5)
    ref = nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5)
    variables = ref.init(jax.random.key(1), x)
    assert jax.tree_util.tree_structure(ours.init(jax.random.key(1), x)) == (
        jax.tree_util.tree_structure(variables))  # same names: checkpoints load either way
    variables = {"params": {"scale": jnp.linspace(0.5, 2.0, 4), "bias": jnp.arange(4.0)},
                 "batch_stats": {"mean": jnp.full(4, 0.5), "var": jnp.full(4, 2.0)}}
    g = jax.random.normal(jax.random.key(2), x.shape)

    def loss(module, params, x):
        y, state = module.apply({**variables, "params": params}, x, mutable=["batch_stats"])
        return (y * g).sum(), (y, state)

    (_, (y, state)), grads = jax.value_and_grad(
        lambda p, x: loss(ours, p, x), argnums=(0, 1), has_aux=True)(variables["params"], x)
    (_, (y_ref, state_ref)), grads_ref = jax.value_and_grad(
        lambda p, x: loss(ref, p, x), argnums=(0, 1), has_aux=True)(variables["params"], x)
    np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
    for a, b in zip(jax.tree_util.tree_leaves((state, grads)),
                    jax.tree_util.tree_leaves((state_ref, grads_ref))):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
    xs = np.asarray(x, np.float64).reshape(-1, 4)  # the batch statistics, by NumPy
    expected_mean = 0.9 * 0.5 + 0.1 * xs.mean(0) if train else np.full(4, 0.5)
    np.testing.assert_allclose(state["batch_stats"]["mean"], expected_mean, rtol=1e-5)
    expected_var = 0.9 * 2.0 + 0.1 * xs.var(0) if train else np.full(4, 2.0)
    np.testing.assert_allclose(state["batch_stats"]["var"], expected_var, rtol=1e-5)
