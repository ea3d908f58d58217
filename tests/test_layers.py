"""Hand-written gradients (layers.py) against independent computations, and CNN1's bias order."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_robust import config, layers, models


def numpy_pool_grad(x, g, first=False):
    """Brute force: each 2x2 window's gradient split evenly over its maxima, or (`first`,
    PyTorch's rule) all of it to the FIRST maximum in row-major order (0,0), (0,1), (1,0),
    (1,1); every other pixel, odd edges too, gets 0."""
    gx = np.zeros_like(x)
    n, h, w, c = x.shape
    for b, i, j, k in np.ndindex(n, h // 2, w // 2, c):
        win = x[b, 2 * i: 2 * i + 2, 2 * j: 2 * j + 2, k]
        hit = (win == win.max()).astype(x.dtype)
        if first:
            hit.flat[np.argmax(hit.ravel()) + 1:] = 0  # keep the first hit only
        gx[b, 2 * i: 2 * i + 2, 2 * j: 2 * j + 2, k] = hit * g[b, i, j, k] / hit.sum()
    return gx


@pytest.mark.parametrize("grad", ["corners", "autodiff"])
@pytest.mark.parametrize("ties", [False, True])
def test_max_pool_values_and_gradient_against_brute_force(ties, grad):
    rng = np.random.default_rng(0)
    shape = (2, 7, 6, 3)  # an odd height: the last row is dropped, as PyTorch's floor mode
    x = (rng.integers(0, 3, shape) if ties else rng.normal(size=shape)).astype(np.float32)
    g = rng.normal(size=(2, 3, 3, 3)).astype(np.float32)
    pool = layers.max_pool_2x2 if grad == "corners" else (
        lambda a: layers.pool_2x2(a, "autodiff"))
    y, vjp = jax.vjp(pool, jnp.asarray(x))
    np.testing.assert_array_equal(y, nn.max_pool(x, (2, 2), strides=(2, 2)))
    (gx,) = vjp(jnp.asarray(g))
    expected = numpy_pool_grad(x, g)
    if ties:
        assert (expected != 0).sum() > (g != 0).sum()  # some windows do split their gradient
    np.testing.assert_allclose(gx, expected, rtol=1e-6, atol=1e-7)


def tied_input(shape, seed=0):
    """Integer levels 0..2, so many windows hold equal maxima, and one flat all-zero window."""
    x = np.random.default_rng(seed).integers(0, 3, shape).astype(np.float32)
    x[0, 2:4, 2:4, 0] = 0.0
    return x


def test_max_pool_first_sends_the_gradient_to_the_first_maximum():
    rng = np.random.default_rng(1)
    shape = (2, 7, 5, 3)  # odd height and width: the last row and column get no gradient
    x = tied_input(shape)
    g = rng.normal(size=(2, 3, 2, 3)).astype(np.float32)
    y, vjp = jax.vjp(layers.max_pool_2x2_first, jnp.asarray(x))
    np.testing.assert_array_equal(y, layers.max_pool_2x2(jnp.asarray(x)))
    np.testing.assert_array_equal(y, nn.max_pool(x, (2, 2), strides=(2, 2)))
    (gx,) = vjp(jnp.asarray(g))
    expected = numpy_pool_grad(x, g, first=True)
    np.testing.assert_array_equal(gx, expected)  # one cotangent copied per window: exact
    assert not np.any(np.asarray(gx)[:, 6]) and not np.any(np.asarray(gx)[:, :, 4])
    # The flat window sends everything to its top-left pixel.
    np.testing.assert_array_equal(np.asarray(gx)[0, 2:4, 2:4, 0], [[g[0, 1, 1, 0], 0], [0, 0]])
    # Through pool_2x2 (either grad form) and under jit: the same rule.
    for grad in ("corners", "autodiff"):
        gx_pool = jax.jit(jax.grad(lambda a: (layers.pool_2x2(a, grad, "first") * g).sum()))(x)
        np.testing.assert_array_equal(gx_pool, expected)
    # The split rule differs on this input (ties do occur), though each window's total
    # gradient is the same under both rules.
    (gx_split,) = jax.vjp(layers.max_pool_2x2, jnp.asarray(x))[1](jnp.asarray(g))
    split_hits = (numpy_pool_grad(x, g) != 0).sum()
    assert split_hits > (expected != 0).sum() == (g != 0).sum()
    assert not np.allclose(gx_split, gx)

    def window_sum(a):
        return np.asarray(a)[:, :6, :4].reshape(2, 3, 2, 2, 2, 3).sum((2, 4))

    np.testing.assert_allclose(window_sum(gx_split), window_sum(gx), rtol=1e-6, atol=1e-6)
    with pytest.raises(KeyError):  # config.validate names it; the layer just has no such pool
        layers.pool_2x2(jnp.asarray(x), "corners", "last")


@pytest.mark.parametrize("speed", [config.PLAIN_SPEED, config.CPU_SPEED],
                         ids=["plain", "cpu"])
@pytest.mark.slow
def test_cnn1_pool_ties_change_input_gradients_not_logits(speed):
    # A digit-like image: a random 8x8 patch on a zero background, so the flat background
    # gives 2x2 pool windows whose four values are equal.
    x = np.zeros((2, 28, 28, 1), np.float32)
    x[:, 10:18, 9:17] = np.random.default_rng(0).uniform(size=(2, 8, 8, 1))
    y = jnp.array([3, 7])
    first = models.CNN1(dropout=0.5, speed=speed, pool_ties="first")
    split = models.CNN1(dropout=0.5, speed=speed, pool_ties="split")
    params, _ = models.init_model(split, jax.random.key(0), (28, 28, 1))

    def logits_and_input_grad(module):
        def loss(x):
            logits = module.apply({"params": params}, x, train=False)
            return -jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], 1).sum(), logits

        (_, logits), gx = jax.jit(jax.value_and_grad(loss, has_aux=True))(jnp.asarray(x))
        return np.asarray(logits), np.asarray(gx)

    logits_first, gx_first = logits_and_input_grad(first)
    logits_split, gx_split = logits_and_input_grad(split)
    np.testing.assert_array_equal(logits_first, logits_split)
    assert np.abs(gx_first - gx_split).max() > 1e-3 * np.abs(gx_split).max()
    # The difference lies where the pool sees the flat background, not only at the patch.
    background = np.ones((28, 28), bool)
    background[6:22, 5:21] = False  # the patch and every pixel whose conv windows reach it
    assert np.abs(gx_first - gx_split)[:, background].max() > 0


def plain_conv(x, w, padding):
    return jax.lax.conv_general_dilated(x, w, (1, 1), padding,
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))


@pytest.mark.parametrize("c_in,kernel,padding", [
    (1, (3, 3), "VALID"), (3, (3, 3), "SAME"), (2, (5, 3), ((2, 0), (1, 2))),
    (4, (3, 3), ((1, 1), (0, 2)))])
@pytest.mark.slow
def test_small_input_conv_gradients_match_xla(c_in, kernel, padding):
    kx, kw, kg = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(kx, (3, 9, 8, c_in))
    w = jax.random.normal(kw, (*kernel, c_in, 5))
    def value_and_grads(conv):  # jitted: one compile, not one per eager op
        @jax.jit
        def run(x, w):
            y, vjp = jax.vjp(conv, x, w)
            return y, vjp(jax.random.normal(kg, y.shape))
        return run(x, w)

    y, (gx, gw) = value_and_grads(lambda a, b: layers.small_input_conv(
        a, b, (1, 1), padding, dimension_numbers=layers.NHWC))
    y_ref, (gx_ref, gw_ref) = value_and_grads(lambda a, b: plain_conv(a, b, padding))
    np.testing.assert_array_equal(y, y_ref)
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


def numpy_conv_input_grad(g, w, pads, x_shape):
    """Brute force in float64: each output pixel's gradient sent back through each tap to the
    input pixel it read (taps that read the zero padding send nothing)."""
    (top, _), (left, _) = pads
    gx = np.zeros(x_shape)
    kh, kw = w.shape[:2]
    n, ho, wo, _ = g.shape
    for a, b, i, j in np.ndindex(ho, wo, kh, kw):
        r, c = a + i - top, b + j - left
        if 0 <= r < x_shape[1] and 0 <= c < x_shape[2]:
            gx[:, r, c] += g[:, a, b] @ w[i, j].T
    return gx


@pytest.mark.parametrize("c_in,kernel,pads", [
    (64, (3, 3), ((0, 0), (0, 0))), (5, (3, 3), ((1, 1), (1, 1))),
    (3, (5, 3), ((2, 0), (1, 2))), (4, (3, 2), ((0, 2), (1, 0)))])
def test_column_taps_conv_input_gradient_against_brute_force(c_in, kernel, pads):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 10, 9, c_in)).astype(np.float32)
    w = rng.normal(size=(*kernel, c_in, 6)).astype(np.float32)

    @jax.jit
    def run(x, w, g):
        y, vjp = jax.vjp(lambda a, b: layers.column_taps_conv(
            a, b, (1, 1), pads, dimension_numbers=layers.NHWC), x, w)
        return y, vjp(g)

    y_ref, vjp_ref = jax.vjp(lambda a, b: plain_conv(a, b, pads), x, w)
    g = rng.normal(size=y_ref.shape).astype(np.float32)
    y, (gx, gw) = run(x, w, g)
    assert "custom_vjp" in str(jax.make_jaxpr(lambda a: layers.column_taps_conv(
        a, w, (1, 1), pads, dimension_numbers=layers.NHWC))(x))
    np.testing.assert_array_equal(y, y_ref)  # the forward is XLA's conv
    gx_ref, gw_ref = vjp_ref(g)
    np.testing.assert_array_equal(gw, gw_ref)  # and so is the kernel gradient
    brute = numpy_conv_input_grad(g.astype(np.float64), w.astype(np.float64), pads, x.shape)
    assert np.abs(brute).max() > 1.0
    np.testing.assert_allclose(gx, brute, rtol=1e-5, atol=1e-5 * np.abs(brute).max())
    # Every input pixel's gradient, borders included: a dropped or misplaced tap would show.
    np.testing.assert_allclose(gx_ref, brute, rtol=1e-5, atol=1e-5 * np.abs(brute).max())


def test_column_taps_conv_falls_back_to_xla_for_strides():
    x, w = jnp.zeros((1, 8, 8, 3)), jnp.zeros((3, 3, 3, 4))
    text = str(jax.make_jaxpr(lambda a: layers.column_taps_conv(
        a, w, (2, 2), "VALID", dimension_numbers=layers.NHWC))(x))
    assert "custom_vjp" not in text and "conv_general_dilated" in text


def official_cnn1(params, x):
    """The official CNN001 in eval mode from plain lax ops: the bias added BEFORE the pool."""
    def conv(x, p):
        return plain_conv(x, p["kernel"], "VALID") + p["bias"]

    def dense(x, p):
        return x @ p["Dense_0"]["kernel"] + p["Dense_0"]["bias"]

    x = conv(jax.nn.relu(conv(x, params["Conv_0"])), params["Conv_1"])
    x = nn.max_pool(x, (2, 2), strides=(2, 2)).reshape(x.shape[0], -1)
    return dense(jax.nn.relu(dense(x, params["TorchDense_0"])), params["TorchDense_1"])


@pytest.mark.slow
@pytest.mark.parametrize("bias_after_pool", [True, False])
def test_cnn1_bias_after_pool_equals_the_official_order(bias_after_pool):
    speed = dataclasses.replace(config.CPU_SPEED, conv_bias_after_pool=bias_after_pool)
    module = models.CNN1(speed=speed)
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


@pytest.mark.parametrize("impl", ["dot", "reduce"])
def test_channel_sum_and_broadcast_are_each_others_gradient(impl):
    x = jax.random.normal(jax.random.key(0), (3, 5, 4, 6))
    v = jax.random.normal(jax.random.key(1), (6,))
    np.testing.assert_allclose(layers.sum_leading(x, impl), np.asarray(x).sum((0, 1, 2)),
                               rtol=1e-5)
    np.testing.assert_array_equal(layers.broadcast_leading(v, x.shape, impl),
                                  np.broadcast_to(v, x.shape))
    gx = jax.grad(lambda x: (layers.sum_leading(x, impl) * v).sum())(x)
    np.testing.assert_array_equal(gx, np.broadcast_to(v, x.shape))
    gv = jax.grad(lambda v: (layers.broadcast_leading(v, x.shape, impl) * x).sum())(v)
    np.testing.assert_allclose(gv, np.asarray(x).sum((0, 1, 2)), rtol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("channel_sums", ["dot", "reduce"])
@pytest.mark.parametrize("train", [True, False])
def test_batchnorm_matches_flax_batchnorm(train, channel_sums):
    x = 3.0 + 2.0 * jax.random.normal(jax.random.key(0), (8, 5, 5, 4))
    ours = layers.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5,
                            channel_sums=channel_sums)
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
