"""Each speed option (config.SpeedConfig) changes the program, never the values.

For every field, the model (or attack) is built twice, the option on and off and everything
else fixed: the traced programs must differ (the option really is used), while the logits,
the gradients of a loss w.r.t. the parameters and the input, BatchNorm's new statistics and
PGD's adversarial points must agree to float rounding.
"""

import collections
import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_robust import attacks, config, models, onednn

RTOL = 1e-5
# The options whose 'on' form is oneDNN's (conv_kernels='onednn', conv_pool='fused') need the
# handler: where it cannot run (no compiler, no oneDNN, JAX_ROBUST_ONEDNN=0) the layers keep
# XLA's convs, both builds trace one program, and these tests skip, saying why.
needs_onednn = pytest.mark.skipif(
    not onednn.supports(jnp.float32),
    reason=f"oneDNN's convolutions are unavailable here: {onednn.unavailable_reason()}")


# {SpeedConfig field: (on, off)} of every option some test below compares (filled by
# `compares`, read by test_every_speed_option_is_tested_with_its_choices): a test removed
# takes its entry with it.
COMPARED: dict[str, tuple] = {}


def compares(field, on, off):
    """Marks a test as comparing `field`'s two forms."""
    COMPARED[field] = (on, off)
    return lambda test: test


def with_option(base, field, value):
    return dataclasses.replace(base, **{field: value})


def assert_close(a, b, what, floor=RTOL):
    """Leaf by leaf: within RTOL, with an absolute floor of `floor` times the leaf's largest
    magnitude (float rounding of sums in another order lands near zero entries too)."""
    leaves_a = jax.tree_util.tree_leaves_with_path(a)
    leaves_b = jax.tree_util.tree_leaves(b)
    assert len(leaves_a) == len(leaves_b)
    for (path, u), v in zip(leaves_a, leaves_b):
        u, v = np.asarray(u), np.asarray(v)
        assert u.shape == v.shape and np.all(np.isfinite(u))
        scale = float(np.abs(v).max())
        np.testing.assert_allclose(u, v, rtol=RTOL, atol=floor * scale,
                                   err_msg=f"{what} {jax.tree_util.keystr(path)}")


def assert_programs_differ(fn, fn_other, *args):
    """Traced jaxprs differ between the two builds; tracing one build twice gives the same
    text, so the difference is the option's."""
    text, again = (str(jax.make_jaxpr(fn)(*args)) for _ in range(2))
    assert text == again
    assert text != str(jax.make_jaxpr(fn_other)(*args))
    return text


def random_variables(module, image_shape, seed=0):
    """(params, model_state) of `module`, drawn here from a seeded NumPy generator: kernels
    N(0, 1/fan_in), BatchNorm scales 1 + N(0, 0.01) and biases N(0, 0.01), running mean 0 and
    var 1. Shapes by `jax.eval_shape` of the init, so nothing is compiled for it (an eager
    `init` of a WRN compiles each op, ~10 s on 2 cores)."""
    shapes = jax.eval_shape(lambda: module.init(jax.random.key(0),
                                                jnp.zeros((1, *image_shape)), train=False))
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        name = path[-1].key
        if leaf.ndim >= 2:
            value = rng.normal(size=leaf.shape) / np.sqrt(np.prod(leaf.shape[:-1]))
        elif name in ("mean", "var"):
            value = np.full(leaf.shape, 0.0 if name == "mean" else 1.0)
        else:
            value = (1.0 if name == "scale" else 0.0) + 0.1 * rng.normal(size=leaf.shape)
        return jnp.asarray(value, leaf.dtype)

    variables = jax.tree_util.tree_map_with_path(fill, shapes)
    params = variables.pop("params")
    return params, dict(variables), shapes


def loss_and_grads_fn(module, state, y, train):
    """(params, x) -> ((loss, (logits, new model state)), (param grads, input grads))."""
    model_fn = models.make_model_fn(module)

    def loss(params, x):
        logits, new_state = model_fn(params, state, x, train, jax.random.key(7))
        return attacks.cross_entropy(logits, y).mean(), (logits, new_state)

    return jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)


def check_option_on_model(make_module, field, on, off, image_shape, batch, train,
                          grad_floor=RTOL):
    """Builds make_module(speed) with `field` on and off (CPU_SPEED otherwise), checks the
    programs differ and the values do not. Returns the jaxpr texts {"grad": (on, off),
    "forward": (on, off)}: of the loss-and-gradients function, and of the forward pass alone
    (eval mode), where a custom VJP still shows as `custom_vjp_call`."""
    kx, ky = jax.random.split(jax.random.key(0))
    x = jax.random.uniform(kx, (batch, *image_shape))
    y = jax.random.randint(ky, (batch,), 0, 10)
    module_on = make_module(with_option(config.CPU_SPEED, field, on))
    module_off = make_module(with_option(config.CPU_SPEED, field, off))
    params, state, shapes = random_variables(module_off, image_shape)
    assert jax.eval_shape(lambda: module_on.init(
        jax.random.key(0), jnp.zeros((1, *image_shape)), train=False)) == shapes  # same names
    fn_on = loss_and_grads_fn(module_on, state, y, train)
    fn_off = loss_and_grads_fn(module_off, state, y, train)
    grad_texts = (assert_programs_differ(fn_on, fn_off, params, x),
                  str(jax.make_jaxpr(fn_off)(params, x)))
    def forward_text(module):
        fn = lambda p, x: module.apply({"params": p, **state}, x, train=False)  # noqa: E731
        return str(jax.make_jaxpr(fn)(params, x))

    forward_texts = (forward_text(module_on), forward_text(module_off))
    (loss_on, (logits_on, new_on)), grads_on = jax.jit(fn_on)(params, x)
    (loss_off, (logits_off, new_off)), grads_off = jax.jit(fn_off)(params, x)
    assert_close(logits_on, logits_off, "logits")
    assert_close(loss_on, loss_off, "loss")
    assert_close(new_on, new_off, "model state")  # BatchNorm's running statistics, if any
    if state:
        assert not all(np.array_equal(a, b) for a, b in zip(
            jax.tree_util.tree_leaves(state), jax.tree_util.tree_leaves(new_off)))
    gp, gx = grads_off
    assert float(jnp.abs(gx).max()) > 0 and all(
        float(jnp.abs(g).max()) > 0 for g in jax.tree_util.tree_leaves(gp))  # a real test
    assert_close(grads_on, grads_off, "grads", floor=grad_floor)
    return {"grad": grad_texts, "forward": forward_texts}


def cnn1(speed):
    return models.CNN1(dropout=0.5, speed=speed)


# The options whose 'on' form is a custom VJP, and their plain form.
CUSTOM_VJP_OPTIONS = {"pool_grad": "autodiff", "first_conv_grad": "xla", "conv_input_grad": "xla",
                      "conv_kernels": "xla", "conv_pool": "separate"}
POOL_TARGETS = [target for target, _ in onednn.POOL_TARGETS.values()]


def target_counts(text):
    """{FFI target: calls in the program text} of oneDNN's handlers."""
    names = collections.Counter(re.findall(r"target_name=(\w+)", text))
    return {t: names[t] for t in [onednn.TARGET] + POOL_TARGETS if names[t]}


@pytest.mark.slow
@compares("conv_input_grad", "column_taps", "xla")
def test_cnn2_conv_input_grad_changes_the_program_not_the_values():
    """CNN2's three later convs take the column-taps input gradient (the first takes the
    overlap-add one); with the other custom VJPs off, one custom VJP per later conv."""
    def make(speed):
        speed = with_option(with_option(speed, "pool_grad", "autodiff"), "first_conv_grad", "xla")
        return models.CNN2(dropout=0.5, speed=with_option(speed, "conv_kernels", "xla"))

    texts = check_option_on_model(make, "conv_input_grad", "column_taps", "xla", (28, 28, 1),
                                  batch=4, train=True)
    text_on, text_off = texts["forward"]
    assert text_on.count("custom_vjp_call") == 3 and "custom_vjp" not in text_off


@needs_onednn
@pytest.mark.slow
@compares("conv_kernels", "onednn", "xla")
def test_cnn2_conv_kernels_change_the_program_not_the_values():
    """CNN2's four convs through oneDNN: four custom VJPs calling the handler, and none in
    the plain form; logits and every gradient agree with XLA's. Then with the CPU defaults
    around it, where the first conv keeps the overlap-add input gradient."""
    def make(speed):
        for other, plain in CUSTOM_VJP_OPTIONS.items():
            if other != "conv_kernels":
                speed = with_option(speed, other, plain)
        return models.CNN2(dropout=0.5, speed=speed)

    texts = check_option_on_model(make, "conv_kernels", "onednn", "xla", (28, 28, 1),
                                  batch=4, train=True)
    text_on, text_off = texts["forward"]
    assert text_on.count("custom_vjp_call") == 4 and "custom_vjp" not in text_off
    assert onednn.TARGET in texts["grad"][0] and onednn.TARGET not in texts["grad"][1]
    texts = check_option_on_model(lambda speed: models.CNN2(dropout=0.5, speed=speed),
                                  "conv_kernels", "onednn", "xla", (28, 28, 1), batch=4,
                                  train=True)
    # conv1 and conv3: 2 forwards, 2 kernel grads, conv3's input gradient (the first conv's
    # is the overlap-add one); conv2 and conv4 fused with their pools, 3 calls each.
    assert target_counts(texts["grad"][0]) == {onednn.TARGET: 5, **{t: 2 for t in POOL_TARGETS}}
    assert not target_counts(texts["grad"][1])


@needs_onednn
@pytest.mark.parametrize("arch,ties", [("cnn1", "split"), ("cnn1", "first"),
                                       pytest.param("cnn2", "split", marks=pytest.mark.slow)])
@compares("conv_pool", "fused", "separate")
def test_conv_pool_fusion_changes_the_program_not_the_values(arch, ties):
    """The conv + max-pool pairs as one oneDNN call each way, with either tie rule (the test
    input is continuous, so ties are not exercised here: test_onednn.py does that)."""
    def make(speed):
        return models.build_model(arch, 10, (28, 28, 1), dropout=0.5, speed=speed,
                                  pool_ties=ties)

    texts = check_option_on_model(make, "conv_pool", "fused", "separate", (28, 28, 1),
                                  batch=4, train=True)
    pairs = {"cnn1": 1, "cnn2": 2}[arch]
    on, off = (target_counts(t) for t in texts["grad"])
    assert {t: on.pop(t) for t in POOL_TARGETS} == {t: pairs for t in POOL_TARGETS}
    assert not any(t in off for t in POOL_TARGETS)
    assert on[onednn.TARGET] == off[onednn.TARGET] - 3 * pairs


@needs_onednn
@pytest.mark.slow
def test_wrn_conv_kernels_change_the_program_not_the_values():
    """WRN-10-1 in train mode (BatchNorm batch statistics): its 3x3 convs, the stride-2 ones
    and the 1x1 shortcuts through oneDNN against XLA's. Gradient floor as for channel_sums:
    the batch-statistics backward amplifies float rounding."""
    def make(speed):
        return models.WideResNet(depth=10, width=1, dropout=0.0, speed=speed)

    texts = check_option_on_model(make, "conv_kernels", "onednn", "xla", (16, 16, 3), batch=4,
                                  train=True, grad_floor=1e-4)
    grad_on, grad_off = texts["grad"]
    # 9 convs (the stem, 3 blocks of 2, 2 shortcuts), each a forward, a kernel gradient and
    # an input gradient (the loss's gradient w.r.t. x is taken too).
    assert grad_on.count("target_name=" + onednn.TARGET) == 27
    assert onednn.TARGET not in grad_off


CNN1_OPTIONS = [
    ("pool_grad", "corners", "autodiff", "custom_vjp"),
    ("first_conv_grad", "overlap_add", "xla", "custom_vjp"),
    ("conv_input_grad", "column_taps", "xla", "custom_vjp"),
    pytest.param("conv_kernels", "onednn", "xla", "custom_vjp", marks=needs_onednn),
    ("conv_bias_after_pool", True, False, None),
]
for _option in CNN1_OPTIONS:
    compares(*(_option.values if hasattr(_option, "values") else _option)[:3])


@pytest.mark.parametrize("field,on,off,marker", CNN1_OPTIONS)
def test_cnn1_options_change_the_program_not_the_values(field, on, off, marker):
    # CPU_SPEED around the option; the custom-VJP options of CNN1 other than `field` are
    # off, so the marker shows which form was traced. The bias option reaches only the
    # separate conv + pool (the fused call adds the bias after the pool either way).
    def make(speed):
        for other, plain in CUSTOM_VJP_OPTIONS.items():
            if (marker and other != field) or (field, other) == ("conv_bias_after_pool",
                                                                   "conv_pool"):
                speed = with_option(speed, other, plain)
        return cnn1(speed)

    texts = check_option_on_model(make, field, on, off, (28, 28, 1), batch=4, train=True)
    text_on, text_off = texts["forward"]
    if marker:
        assert marker in text_on and marker not in text_off


@pytest.mark.slow
@compares("channel_sums", "dot", "reduce")
def test_channel_sums_change_the_program_not_the_values():
    """WRN-10-1 in train mode: BatchNorm's batch statistics, their running updates and every
    gradient through them, as ones-vector dots against XLA reduces."""
    def make(speed):
        return models.WideResNet(depth=10, width=1, dropout=0.0, speed=speed)

    # The gradients get an absolute floor of 1e-4 of each leaf's largest entry: the dot sums
    # accumulate in float32 less accurately than XLA's reduce (against float64, ~3e-6 relative
    # error over 4096 rows against ~7e-8), and the batch-statistics backward amplifies it.
    # Measured dot against reduce: up to 5e-6 of a leaf's largest entry here (16x16), 2.7e-5
    # at 32x32 (where, with the official init, reduce is within 1.8e-6 of float64 and dot
    # within 2.7e-5). A wrong sum or count would be off by far more.
    texts = check_option_on_model(make, "channel_sums", "dot", "reduce", (16, 16, 3), batch=4,
                                  train=True, grad_floor=1e-4)
    text_dot, text_reduce = texts["grad"]
    assert text_dot.count("dot_general") > text_reduce.count("dot_general") + 20
    assert text_reduce.count("reduce_sum") > text_dot.count("reduce_sum") + 20


@pytest.mark.slow
@compares("attack_unroll", True, False)
def test_attack_unroll_changes_the_program_not_the_values():
    kx, ky, ka = jax.random.split(jax.random.key(0), 3)
    x = jax.random.uniform(kx, (4, 28, 28, 1))
    y = jax.random.randint(ky, (4,), 0, 10)
    module = cnn1(config.CPU_SPEED)
    params, _, _ = random_variables(module, (28, 28, 1))

    def losses(params, x):
        return attacks.cross_entropy(module.apply({"params": params}, x, train=False), y)

    def adversarial(unroll):
        """(params, x) -> ((adversarial loss, (x_adv, logits at x_adv, input gradient of the
        loss at x_adv)), gradients w.r.t. params and x): an AT step's quantities."""
        def fn(params, x):
            x_adv = attacks.pgd_attack(lambda xa: losses(params, xa), x, ka, eps=0.1, steps=3,
                                       step_size=0.02, unroll=unroll)
            logits = module.apply({"params": params}, x_adv, train=False)
            grad_at_adv = jax.grad(lambda xa: losses(params, xa).mean())(x_adv)
            return attacks.cross_entropy(logits, y).mean(), (x_adv, logits, grad_at_adv)

        return jax.value_and_grad(fn, argnums=(0, 1), has_aux=True)

    assert_programs_differ(adversarial(True), adversarial(False), params, x)
    hlo = [jax.jit(adversarial(u)).lower(params, x).as_text() for u in (True, False)]
    # The rolled attack is one more while loop (the PRNG has its own in both).
    assert hlo[1].count("stablehlo.while") == hlo[0].count("stablehlo.while") + 1
    (loss_u, (x_adv_u, logits_u, gx_adv_u)), grads_u = jax.jit(adversarial(True))(params, x)
    (loss_r, (x_adv_r, logits_r, gx_adv_r)), grads_r = jax.jit(adversarial(False))(params, x)
    assert float(jnp.abs(x_adv_r - x).max()) > 0.05  # the attack moved the points
    np.testing.assert_allclose(x_adv_u, x_adv_r, rtol=0, atol=1e-6)
    assert_close(logits_u, logits_r, "logits")
    assert_close(loss_u, loss_r, "loss")
    assert_close(grads_u[0], grads_r[0], "param grads")
    assert float(jnp.abs(gx_adv_r).max()) > 0
    assert_close(gx_adv_u, gx_adv_r, "input grad at x_adv")
    # x_adv is gradient-stopped: the input gradient of the adversarial loss is zero in both.
    assert not np.any(np.asarray(grads_u[1])) and not np.any(np.asarray(grads_r[1]))


def test_every_speed_option_is_tested_with_its_choices():
    # Every SpeedConfig field is compared by some test above, lever against plain form.
    assert COMPARED == config.SPEED_CHOICES
    assert set(COMPARED) == {f.name for f in dataclasses.fields(config.SpeedConfig)}
    # CPU_SPEED is every lever on, PLAIN_SPEED every one off.
    assert all(getattr(config.CPU_SPEED, k) == v[0] for k, v in COMPARED.items())
    assert all(getattr(config.PLAIN_SPEED, k) == v[1] for k, v in COMPARED.items())
