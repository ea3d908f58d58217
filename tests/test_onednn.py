"""oneDNN's convolutions (jax_robust.onednn, SpeedConfig.conv_kernels='onednn') against a
float64 NumPy brute force: the forward, the input gradient and the kernel gradient, over
strides, asymmetric pads and kernel shapes, in float32 and bfloat16; and where
layers.onednn_conv must leave a conv to XLA."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_robust import layers, onednn


def test_the_handler_builds_and_loads_here():
    # CI installs oneDNN and a compiler: a missing handler is a failure, not a skip.
    assert onednn.available(), onednn.unavailable_reason()


def padded(x, pads):
    (top, bottom), (left, right) = pads
    return np.pad(x, ((0, 0), (top, bottom), (left, right), (0, 0)))


def taps(shape, k_shape, strides, pads):
    """(di, dj, rows, cols): each kernel tap and the padded-input slices it reads."""
    _, h, w, _ = shape
    kh, kw = k_shape[:2]
    ho = (h + sum(pads[0]) - kh) // strides[0] + 1
    wo = (w + sum(pads[1]) - kw) // strides[1] + 1
    for di in range(kh):
        for dj in range(kw):
            yield (di, dj, slice(di, di + (ho - 1) * strides[0] + 1, strides[0]),
                   slice(dj, dj + (wo - 1) * strides[1] + 1, strides[1]))


def numpy_conv(x, k, strides, pads):
    xp = padded(x, pads)
    out = 0.0
    for di, dj, rows, cols in taps(x.shape, k.shape, strides, pads):
        out = out + np.einsum("nhwi,io->nhwo", xp[:, rows, cols], k[di, dj])
    return out


def numpy_input_grad(g, k, strides, pads, x_shape):
    (top, _), (left, _) = pads
    dxp = np.zeros(padded(np.zeros(x_shape), pads).shape)
    for di, dj, rows, cols in taps(x_shape, k.shape, strides, pads):
        dxp[:, rows, cols] += np.einsum("nhwo,io->nhwi", g, k[di, dj])
    return dxp[:, top:top + x_shape[1], left:left + x_shape[2]]


def numpy_kernel_grad(x, g, strides, pads, k_shape):
    xp = padded(x, pads)
    dk = np.zeros(k_shape)
    for di, dj, rows, cols in taps(x.shape, k_shape, strides, pads):
        dk[di, dj] = np.einsum("nhwi,nhwo->io", xp[:, rows, cols], g)
    return dk


GEOMETRIES = [  # x shape, kernel shape, strides, pads
    ((3, 9, 9, 4), (3, 3, 4, 5), (1, 1), ((0, 0), (0, 0))),
    ((3, 9, 9, 4), (3, 3, 4, 5), (1, 1), ((1, 1), (1, 1))),
    ((2, 10, 8, 3), (3, 3, 3, 6), (2, 2), ((1, 1), (1, 1))),  # the WRN's downsampling
    ((2, 9, 7, 3), (3, 2, 3, 4), (2, 1), ((0, 2), (1, 0))),   # asymmetric everything
    ((2, 8, 8, 6), (1, 1, 6, 8), (2, 2), ((0, 0), (0, 0))),   # a 1x1 shortcut
    ((2, 13, 13, 3), (7, 7, 3, 4), (2, 2), ((3, 3), (3, 3))),  # ResNet-50's stem
]


@pytest.mark.parametrize("x_shape,k_shape,strides,pads", GEOMETRIES)
def test_conv_and_both_gradients_against_brute_force(x_shape, k_shape, strides, pads):
    rng = np.random.default_rng(0)
    x = rng.standard_normal(x_shape).astype(np.float32)
    k = rng.standard_normal(k_shape).astype(np.float32)
    y_shape = onednn.output_shape(x_shape, k_shape, strides, pads)
    g = rng.standard_normal(y_shape).astype(np.float32)

    @jax.jit
    def run(x, k, g):
        y, vjp = jax.vjp(lambda x, k: onednn.conv(x, k, strides, pads), x, k)
        return (y, *vjp(g))

    y, dx, dk = (np.asarray(a) for a in run(x, k, g))
    x64, k64, g64 = (a.astype(np.float64) for a in (x, k, g))
    for got, want in ((y, numpy_conv(x64, k64, strides, pads)),
                      (dx, numpy_input_grad(g64, k64, strides, pads, x_shape)),
                      (dk, numpy_kernel_grad(x64, g64, strides, pads, k_shape))):
        assert got.shape == want.shape and np.abs(want).max() > 1.0
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


def random_bf16(seed, *shapes):
    """Standard-normal bf16 arrays of `shapes`, from one seeded generator."""
    rng = np.random.default_rng(seed)
    return [jnp.asarray(rng.standard_normal(shape), jnp.bfloat16) for shape in shapes]


needs_bf16 = pytest.mark.skipif(not onednn.supports(jnp.bfloat16),
                                reason="this CPU's oneDNN has no bfloat16 convolutions")


def test_bfloat16_support_is_what_the_cpu_has():
    """oneDNN 3.2 has bf16 convolutions with AVX-512 only; where it has none, a bf16 call fails
    at run time, so `onednn.supports` must say so and the layers must keep XLA's conv."""
    with open("/proc/cpuinfo") as f:
        avx512 = " avx512f" in f.read()
    assert onednn.supports(jnp.float32)
    assert onednn.supports(jnp.bfloat16) == avx512
    assert not onednn.supports(jnp.float16)
    x, k = jnp.ones((2, 6, 6, 3), jnp.bfloat16), jnp.ones((3, 3, 3, 4), jnp.bfloat16)
    text = jax.jit(lambda x, k: layers.onednn_conv(
        x, k, (1, 1), "VALID", dimension_numbers=layers.NHWC)).lower(x, k).as_text()
    assert (onednn.TARGET in text) == avx512


@needs_bf16
def test_bfloat16_operands_round_like_bfloat16():
    """bf16 x and kernel (AMX or AVX-512 bf16 kernels where the CPU has them): within bf16's
    rounding of the float64 result, and far from a wrong tap or scale."""
    x_shape, k_shape, strides, pads = GEOMETRIES[1]
    x, k, g = random_bf16(1, x_shape, k_shape,
                          onednn.output_shape(x_shape, k_shape, strides, pads))

    @jax.jit
    def run(x, k, g):
        y, vjp = jax.vjp(lambda x, k: onednn.conv(x, k, strides, pads), x, k)
        return (y, *vjp(g))

    outs = run(x, k, g)
    assert all(a.dtype == jnp.bfloat16 for a in outs)
    x64, k64, g64 = (np.asarray(a, np.float64) for a in (x, k, g))
    wants = (numpy_conv(x64, k64, strides, pads),
             numpy_input_grad(g64, k64, strides, pads, x_shape),
             numpy_kernel_grad(x64, g64, strides, pads, k_shape))
    for got, want in zip(outs, wants):
        got = np.asarray(got, np.float64)
        scale = np.abs(want).max()
        assert np.abs(got - want).max() <= 2 ** -7 * scale  # bf16 keeps 8 significant bits
        assert np.abs(got - want).max() > 0  # really rounded: the bf16 path ran


def test_vmap_over_a_leading_axis_equals_the_loop():
    """The attacks vmap the model over restarts and targets: the batched calls must equal
    one call per slice, gradients included."""
    x_shape, k_shape, strides, pads = GEOMETRIES[2]
    rng = np.random.default_rng(2)
    xs = jnp.asarray(rng.standard_normal((3, *x_shape)), jnp.float32)
    k = jnp.asarray(rng.standard_normal(k_shape), jnp.float32)

    def loss(x, k):
        return (onednn.conv(x, k, strides, pads) ** 2).sum()

    batched = jax.jit(jax.vmap(jax.value_and_grad(loss, (0, 1)), (0, None)))(xs, k)
    single = jax.jit(jax.value_and_grad(loss, (0, 1)))
    (values, (gxs, gk)) = batched
    for r in range(3):
        value, (gx, gk_r) = single(xs[r], k)
        np.testing.assert_allclose(values[r], value, rtol=1e-6)
        np.testing.assert_allclose(gxs[r], gx, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(gk[r], gk_r, rtol=1e-6)


@pytest.mark.parametrize("case", ["dilation", "groups", "negative pad", "float16",
                                  "plain"])
def test_onednn_conv_leaves_what_it_does_not_fit_to_xla(case):
    x = jnp.ones((2, 8, 8, 4))
    k = jnp.ones((3, 3, 4, 4))
    kwargs = {"window_strides": (1, 1), "padding": ((1, 1), (1, 1)),
              "dimension_numbers": layers.NHWC}
    if case == "dilation":
        kwargs["rhs_dilation"] = (2, 2)
    elif case == "groups":
        k, kwargs["feature_group_count"] = jnp.ones((3, 3, 2, 4)), 2
    elif case == "negative pad":
        kwargs["padding"] = ((-1, 0), (0, 0))
    elif case == "float16":
        x, k = x.astype(jnp.float16), k.astype(jnp.float16)
    text = str(jax.make_jaxpr(lambda x, k: layers.onednn_conv(x, k, **kwargs))(x, k))
    assert (onednn.TARGET in text) == (case == "plain")
    want = jax.lax.conv_general_dilated(x, k, **kwargs)
    np.testing.assert_allclose(layers.onednn_conv(x, k, **kwargs), want, rtol=1e-6)


def test_a_damaged_cached_handler_is_rebuilt(tmp_path):
    """A truncated .so in the cache (a crash mid-write elsewhere, a full disk) is not
    trusted: the loader builds it again and the conv runs. (This process's library and its
    checksum, copied into an empty cache and then truncated: one build, not two.)"""
    library = Path(onednn._load()[0]._name)
    for path in (library, onednn._checksum_path(library)):
        shutil.copy(path, tmp_path / path.name)
    cached = tmp_path / library.name
    cached.write_bytes(cached.read_bytes()[:1000])
    env = {**os.environ, "JAX_ROBUST_CACHE": str(tmp_path)}
    script = ("from jax_robust import onednn; import jax.numpy as jnp; "
              "assert onednn.available(), onednn.unavailable_reason(); "
              "print(float(onednn.conv(jnp.ones((1, 3, 3, 1)), jnp.ones((3, 3, 1, 1)), "
              "(1, 1), ((0, 0), (0, 0)))[0, 0, 0, 0]))")
    again = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                           text=True, timeout=300, check=False)
    assert again.returncode == 0 and again.stdout.strip() == "9.0", again.stderr[-2000:]
    assert cached.stat().st_size > 1000 and onednn._intact(cached)  # rebuilt, checksum new


def test_second_order_gradients_match_xla():
    """GR and LLR differentiate the input gradient w.r.t. the weights (double backprop): the
    VJPs of the input and kernel gradients must be right too."""
    x_shape, k_shape, strides, pads = GEOMETRIES[3]
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.standard_normal(x_shape), jnp.float32)
    k = jnp.asarray(rng.standard_normal(k_shape), jnp.float32)

    def xla(x, k):
        return jax.lax.conv_general_dilated(x, k, strides, pads, dimension_numbers=layers.NHWC)

    def penalty(conv):
        def fn(x, k):  # the norm of an input gradient, and of a kernel gradient
            gx, gk = jax.grad(lambda x, k: jnp.tanh(conv(x, k, strides, pads)).sum(),
                              (0, 1))(x, k)
            return (gx ** 2).sum() + (gk ** 2).sum()
        return jax.jit(jax.grad(fn, (0, 1)))

    ours = penalty(onednn.conv)(x, k)
    want = penalty(lambda x, k, s, p: xla(x, k))(x, k)
    for a, b in zip(ours, want):
        assert float(jnp.abs(b).max()) > 1.0
        np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-5 * float(jnp.abs(b).max()))


def test_a_nan_stays_a_nan_in_bfloat16_kernel_gradients():
    """The handler sums the parts' kernel gradients in float32 and rounds them to bf16 itself:
    a NaN must not round to an infinity (nor vanish), so a run's NaN check still sees it."""
    x = np.ones((4, 5, 5, 2), np.float32)
    x[1, 2, 2, 0] = np.nan
    g = np.ones((4, 3, 3, 3), np.float32)
    dtypes = [jnp.float32] + ([jnp.bfloat16] if onednn.supports(jnp.bfloat16) else [])
    for dtype in dtypes:
        dk = onednn.kernel_grad(jnp.asarray(x, dtype), jnp.asarray(g, dtype), (1, 1),
                                ((0, 0), (0, 0)), (3, 3, 2, 3))
        dk = np.asarray(dk, np.float32)
        assert np.isnan(dk[:, :, 0]).all() and not np.isinf(dk).any()
        np.testing.assert_array_equal(dk[:, :, 1], 36.0)  # 4 images x 3 x 3 outputs


def test_shapes_that_do_not_make_a_convolution_are_refused_not_written():
    """A forward whose declared output is not the conv's shape fails in oneDNN's checks with
    the handler's message; nothing is computed into a wrongly sized buffer."""
    x, k = jnp.ones((2, 6, 6, 3)), jnp.ones((3, 3, 3, 4))
    bad = jax.ShapeDtypeStruct((2, 5, 5, 4), jnp.float32)  # VALID gives 4x4
    with pytest.raises(Exception, match="onednn_conv"):
        jax.block_until_ready(onednn._call(0, x, k, bad, (1, 1), ((0, 0), (0, 0))))


def test_no_call_fell_back_to_onednns_reference_kernels():
    """oneDNN's `ref` implementations are correct but orders of magnitude slower: a layout or
    dtype the optimised kernels refuse would pass every value test. After a forward and both
    gradients in float32 and bf16 (where the CPU has it), every primitive built names an
    optimised kernel."""
    for dtype in [jnp.float32] + ([jnp.bfloat16] if onednn.supports(jnp.bfloat16) else []):
        x = jnp.ones((4, 10, 10, 16), dtype)
        k = jnp.ones((3, 3, 16, 16), dtype)
        jax.block_until_ready(jax.grad(
            lambda x, k: onednn.conv(x, k, (1, 1), ((1, 1), (1, 1))).astype(jnp.float32).sum(),
            (0, 1))(x, k))
    built = onednn.implementations()
    assert {kind for kind, _ in built} == {0, 1, 2}, built
    assert not [impl for _, impl in built if impl.startswith("ref")], built


# ----------------------------------------------------------------------------- conv + max-pool


def separate_conv_pool(ties, relu=False):
    pool = layers.max_pool_2x2 if ties == "split" else layers.max_pool_2x2_first
    act = jax.nn.relu if relu else (lambda x: x)
    return lambda x, k, s, p: pool(onednn.conv(act(x), k, s, p))


def fused_conv_pool(ties, relu=False):
    return lambda x, k, s, p: onednn.conv_pool(x, k, s, p, ties, relu)


# (x shape, kernel shape, strides, pads): an odd conv output (its last row and column are
# not pooled), asymmetric pads and stride 2, and CNN1's conv2 at a small batch.
POOL_GEOMETRIES = [((5, 9, 9, 3), (3, 3, 3, 4), (1, 1), ((0, 0), (0, 0))),
                   ((3, 11, 10, 2), (3, 3, 2, 5), (2, 1), ((1, 0), (0, 2))),
                   ((6, 26, 26, 32), (3, 3, 32, 64), (1, 1), ((0, 0), (0, 0)))]


@pytest.mark.parametrize("ties,relu", [("split", False), ("first", False), ("split", True)])
@pytest.mark.parametrize("geometry", POOL_GEOMETRIES)
def test_conv_pool_equals_the_conv_then_the_pool(geometry, ties, relu, monkeypatch):
    """Values and both gradients against the separate ops (a ReLU first with relu_input),
    with small chunks (one or two images, and a shorter last one in each part) and with
    integer-valued data, whose conv outputs are exact and full of tied maxima, so each tie
    rule is checked (and x = 0 exactly, where the ReLU's gradient is 0)."""
    x_shape, k_shape, strides, pads = geometry
    rng = np.random.default_rng(3)
    y_shape = onednn.output_shape(x_shape, k_shape, strides, pads)
    image_bytes = 4 * int(np.prod(y_shape[1:]))
    for chunk_bytes, integer in ((image_bytes, False), (2 * image_bytes, True)):
        monkeypatch.setattr(onednn, "POOL_CHUNK_BYTES", chunk_bytes)
        if integer:
            x = rng.integers(-1, 2, x_shape).astype(np.float32)
            k = rng.integers(-1, 2, k_shape).astype(np.float32)
        else:
            x = rng.standard_normal(x_shape).astype(np.float32)
            k = rng.standard_normal(k_shape).astype(np.float32)
        g = rng.standard_normal(onednn.pooled_shape(x_shape, k_shape, strides, pads))

        def run(f):
            y, vjp = jax.vjp(lambda x, k: f(x, k, strides, pads), x, k)
            return (y, *vjp(jnp.asarray(g, jnp.float32)))

        ours = jax.jit(lambda: run(fused_conv_pool(ties, relu)))()
        want = jax.jit(lambda: run(separate_conv_pool(ties, relu)))()
        _, mask = onednn.conv_pool_with_mask(x, k, strides, pads, ties, relu)
        counts = np.unpackbits(np.asarray(mask)[..., None], axis=-1)[..., 4:].sum(-1)
        assert counts.min() == 1  # every window marks a corner
        if integer:  # ties abound; 'first' keeps one corner of each
            assert (counts > 1).any() == (ties == "split")
        for a, b in zip(ours, want):
            scale = float(np.abs(b).max())
            assert scale > 0.5
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * scale)


def test_conv_pool_second_order_gradients_match_the_separate_ops():
    """GR and LLR differentiate input gradients: the fused op's gradients are differentiable
    (their VJPs un-pool in plain JAX); against the separate ops' double backprop."""
    x_shape, k_shape, strides, pads = POOL_GEOMETRIES[1]
    rng = np.random.default_rng(4)
    x = jnp.asarray(rng.standard_normal(x_shape), jnp.float32)
    k = jnp.asarray(rng.standard_normal(k_shape), jnp.float32)

    def penalty(f):
        def fn(x, k):
            gx, gk = jax.grad(lambda x, k: (f(x, k, strides, pads) ** 3).sum(), (0, 1))(x, k)
            return (gx ** 2).sum() + (gk ** 2).sum()
        return jax.jit(jax.grad(fn, (0, 1)))

    for ties, relu in (("split", False), ("first", False), ("split", True)):
        for a, b in zip(penalty(fused_conv_pool(ties, relu))(x, k),
                        penalty(separate_conv_pool(ties, relu))(x, k)):
            assert float(jnp.abs(b).max()) > 1.0
            np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-5 * float(jnp.abs(b).max()))


def test_conv_pool_marks_nan_windows_as_the_separate_pools_do():
    """A NaN pools to NaN. 'split' sends a NaN window no gradient (no corner equals NaN);
    'first' sends it to corner 3, as max_pool_2x2_first's index does."""
    x = np.ones((2, 7, 7, 1), np.float32)
    x[1, 3, 3, 0] = np.nan
    k = np.ones((3, 3, 1, 2), np.float32)
    for ties, nan_bits in (("split", 0), ("first", 8)):
        pooled, mask = onednn.conv_pool_with_mask(x, k, (1, 1), ((0, 0), (0, 0)), ties, False)
        want = separate_conv_pool(ties)(x, k, (1, 1), ((0, 0), (0, 0)))
        np.testing.assert_array_equal(np.isnan(pooled), np.isnan(want))
        nan = np.isnan(np.asarray(pooled))
        assert nan.sum() == 2 * 4 and not nan[0].any()  # 4 windows x 2 channels, image 1
        assert (np.asarray(mask)[nan] == nan_bits).all()
        assert (np.asarray(mask)[~nan] == (15 if ties == "split" else 1)).all()  # all equal


@needs_bf16
def test_conv_pool_in_bfloat16_against_the_separate_ops():
    x_shape, k_shape, strides, pads = POOL_GEOMETRIES[0]
    x, k, g = random_bf16(5, x_shape, k_shape,
                          onednn.pooled_shape(x_shape, k_shape, strides, pads))
    outs = []
    for f in (fused_conv_pool("split"), separate_conv_pool("split")):
        y, vjp = jax.vjp(lambda x, k: f(x, k, strides, pads), x, k)
        outs.append([np.asarray(a, np.float32) for a in (y, *vjp(g))])
    for a, b in zip(*outs):
        assert a.dtype == b.dtype
        np.testing.assert_allclose(a, b, rtol=0, atol=2 ** -6 * np.abs(b).max())


def test_conv_pool_under_vmap_equals_the_loop():
    x_shape, k_shape, strides, pads = POOL_GEOMETRIES[0]
    rng = np.random.default_rng(6)
    xs = jnp.asarray(rng.standard_normal((3, *x_shape)), jnp.float32)
    k = jnp.asarray(rng.standard_normal(k_shape), jnp.float32)

    def loss(x):
        return (onednn.conv_pool(x, k, strides, pads, "split") ** 2).sum()

    batched = jax.jit(jax.vmap(jax.value_and_grad(loss)))(xs)
    for i in range(3):
        one = jax.value_and_grad(loss)(xs[i])
        for a, b in zip(batched, one):
            np.testing.assert_allclose(a[i], b, rtol=1e-5, atol=1e-5)


def test_conv_pool_refuses_a_pooled_shape_that_is_not_the_convs():
    x, k = jnp.ones((2, 8, 8, 3)), jnp.ones((3, 3, 3, 4))  # conv 6x6 -> pooled 3x3
    bad = (jax.ShapeDtypeStruct((2, 2, 2, 4), jnp.float32),
           jax.ShapeDtypeStruct((2, 2, 2, 4), jnp.uint8))
    with pytest.raises(Exception, match="onednn_conv_pool: the pooled shape"):
        jax.block_until_ready(onednn._pool_call(
            "forward", bad, x, k, ties_first=np.int64(0), chunk_bytes=np.int64(1 << 16),
            relu_input=np.int64(0), **onednn._geometry((1, 1), ((0, 0), (0, 0)))))
