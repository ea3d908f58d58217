"""oneDNN's convolutions (jax_robust.onednn, SpeedConfig.conv_kernels='onednn') against a
float64 NumPy brute force: the forward, the input gradient and the kernel gradient, over
strides, asymmetric pads and kernel shapes, in float32 and bfloat16; where
layers.onednn_conv must leave a conv to XLA; every misshapen call refused by name, by the
Python functions and by the handler itself; and the build: once, under a lock, without
warnings, for the installed oneDNN only, never at import, off with JAX_ROBUST_ONEDNN=0.

Whatever needs the handler skips, saying why, where `onednn.available()` or
`onednn.supports()` says it cannot run (no compiler, no oneDNN, JAX_ROBUST_ONEDNN=0, no
bfloat16 on this CPU); the tests of the refusals in Python and of the reasons run everywhere.
"""

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_robust import layers, onednn

needs_onednn = pytest.mark.skipif(
    not onednn.supports(jnp.float32),
    reason=f"oneDNN's convolutions are unavailable here: {onednn.unavailable_reason()}")
needs_bf16 = pytest.mark.skipif(
    not onednn.supports(jnp.bfloat16),
    reason=(f"oneDNN's convolutions are unavailable here: {onednn.unavailable_reason()}"
            if onednn.unavailable_reason() else
            "this CPU's oneDNN has no bfloat16 convolutions (oneDNN 3.2: with AVX-512 only)"))
needs_compiler = pytest.mark.skipif(onednn._compiler() is None,
                                    reason="no C++ compiler (g++, c++ or $CXX) here")


@needs_onednn
def test_the_handler_builds_and_loads_here():
    """Where it is available, the loaded library is the cached one for this source, flags,
    jaxlib and installed oneDNN, intact, and describes itself."""
    assert onednn.unavailable_reason() == ""
    library = Path(onednn._load()[0]._name)
    include, lib = onednn._find_onednn()
    version = onednn._library_version(lib)
    assert version == onednn._header_version(include)
    assert library == onednn._library_path(include, lib, version) and onednn._intact(library,
                                                                                    version)
    facts = onednn.describe()
    assert facts["onednn"] == version and facts["library"] == str(library)
    assert facts["isa"] and "float32" in facts["dtypes"]


@needs_onednn
def test_the_handler_compiles_without_warnings():
    """Built with -Wall -Wextra (oneDNN's and XLA's headers as system headers), and the
    compiler said nothing: its output is kept in the library's manifest."""
    manifest = onednn._manifest(Path(onednn._load()[0]._name))
    assert " -Wall -Wextra " in manifest["command"] and " -w " not in manifest["command"]
    assert manifest["warnings"] == ""


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


@needs_onednn
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


@needs_onednn
def test_bfloat16_support_decides_what_the_layers_send_to_onednn():
    """oneDNN 3.2 has bf16 convolutions with AVX-512 only; where it has none, a bf16 call fails
    at run time, so `onednn.supports` must say so and the layers must keep XLA's conv."""
    bf16 = onednn.supports(jnp.bfloat16)
    assert onednn.supports(jnp.float32) and not onednn.supports(jnp.float16)
    if "avx512" in onednn.describe()["isa"]:  # the ISA oneDNN itself dispatches to
        assert bf16
    x, k = jnp.ones((2, 6, 6, 3), jnp.bfloat16), jnp.ones((3, 3, 3, 4), jnp.bfloat16)
    text = jax.jit(lambda x, k: layers.onednn_conv(
        x, k, (1, 1), "VALID", dimension_numbers=layers.NHWC)).lower(x, k).as_text()
    assert (onednn.TARGET in text) == bf16


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


@needs_onednn
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
                                  pytest.param("plain", marks=needs_onednn)])
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


@needs_onednn
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


@needs_onednn
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


@needs_onednn
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


@needs_onednn
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


@needs_onednn
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


@needs_onednn
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


@needs_onednn
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


# ------------------------------------------------------------------ misshapen calls, refused
# Every function with each kind of mismatch (batch, channels, image size, kernel shape, and
# mask where there is one): the Python check raises ValueError naming it; the handler itself,
# called through jax.ffi.ffi_call past those checks, refuses the same call with the same
# words (jax.errors.JaxRuntimeError) before reading or writing anything.

STRIDES, PADS = (1, 1), ((0, 0), (0, 0))
# x, kernel, conv output and pooled output of one call; the mask is the pooled output's
# shape unless a case says otherwise.
BASE = {"x": (2, 6, 6, 3), "kernel": (3, 3, 3, 4), "y": (2, 4, 4, 4), "pooled": (2, 2, 2, 4)}


def shapes_with(overrides):
    shapes = {**BASE, **overrides}
    shapes.setdefault("mask", shapes["pooled"])
    return shapes


def zeros(shape, dtype=jnp.float32):
    return jnp.zeros(shape, dtype)


PUBLIC_CALLS = {
    "conv": lambda s: onednn.conv(zeros(s["x"]), zeros(s["kernel"]), STRIDES, PADS),
    "input_grad": lambda s: onednn.input_grad(zeros(s["y"]), zeros(s["kernel"]), STRIDES,
                                              PADS, s["x"]),
    "kernel_grad": lambda s: onednn.kernel_grad(zeros(s["x"]), zeros(s["y"]), STRIDES, PADS,
                                                s["kernel"]),
    "conv_pool": lambda s: onednn.conv_pool(zeros(s["x"]), zeros(s["kernel"]), STRIDES, PADS,
                                            "split"),
    "pool_input_grad": lambda s: onednn.pool_input_grad(
        zeros(s["pooled"]), zeros(s["mask"], jnp.uint8), zeros(s["kernel"]), zeros(s["x"]),
        STRIDES, PADS, True),
    "pool_kernel_grad": lambda s: onednn.pool_kernel_grad(
        zeros(s["x"]), zeros(s["pooled"]), zeros(s["mask"], jnp.uint8), STRIDES, PADS,
        s["kernel"], True),
    "unpool": lambda s: onednn.unpool(zeros(s["pooled"]), zeros(s["mask"], jnp.uint8),
                                      s["y"]),
}


def ffi(target, out, *operands, **attrs):
    """The handler called as XLA calls it, with no check of ours in between."""
    return jax.block_until_ready(jax.ffi.ffi_call(target, out)(*operands, **attrs))


def out(shape, dtype=jnp.float32):
    return jax.ShapeDtypeStruct(shape, dtype)


GEOMETRY = {k: v for k, v in onednn._geometry(STRIDES, PADS).items()}
POOL_ATTRS = {"chunk_bytes": np.int64(1 << 16), "relu_input": np.int64(1), **GEOMETRY}
POOL = {name: target for name, (target, _) in onednn.POOL_TARGETS.items()}
HANDLER_CALLS = {
    "conv": lambda s: ffi(onednn.TARGET, out(s["y"]), zeros(s["x"]), zeros(s["kernel"]),
                          kind=np.int64(0), **GEOMETRY),
    "input_grad": lambda s: ffi(onednn.TARGET, out(s["x"]), zeros(s["y"]), zeros(s["kernel"]),
                                kind=np.int64(1), **GEOMETRY),
    "kernel_grad": lambda s: ffi(onednn.TARGET, out(s["kernel"]), zeros(s["x"]),
                                 zeros(s["y"]), kind=np.int64(2), **GEOMETRY),
    "conv_pool": lambda s: ffi(POOL["forward"], (out(s["pooled"]), out(s["mask"], jnp.uint8)),
                               zeros(s["x"]), zeros(s["kernel"]), ties_first=np.int64(0),
                               **POOL_ATTRS),
    "pool_input_grad": lambda s: ffi(POOL["input_grad"], out(s["x"]), zeros(s["pooled"]),
                                     zeros(s["mask"], jnp.uint8), zeros(s["kernel"]),
                                     zeros(s["x"]), **POOL_ATTRS),
    "pool_kernel_grad": lambda s: ffi(POOL["kernel_grad"], out(s["kernel"]), zeros(s["x"]),
                                      zeros(s["pooled"]), zeros(s["mask"], jnp.uint8),
                                      **POOL_ATTRS),
}

# (function, mismatch, shapes changed, the message after "onednn <function>: ").
MISMATCHES = [
    # conv and conv_pool take one batched operand: no batch mismatch (the handler's own
    # check of their outputs is in HANDLER_MISMATCHES).
    ("conv", "channels", {"x": (2, 6, 6, 5)}, "x channels 5 != kernel input channels 3"),
    ("conv", "spatial", {"x": (2, 2, 6, 3)}, "kernel height 3 > x height 2 + pads 0+0"),
    ("conv", "kernel", {"kernel": (3, 3, 3)}, "kernel shape (3, 3, 3) is not 4-D"),
    ("input_grad", "batch", {"x": (64, 6, 6, 3)}, "x_shape batch 64 != gradient batch 2"),
    ("input_grad", "channels", {"y": (2, 4, 4, 5)},
     "gradient channels 5 != kernel output channels 4"),
    ("input_grad", "spatial", {"x": (2, 9, 6, 3)}, "gradient height 4 != 7 (the conv's height "
     "for x_shape height 9, kernel height 3, stride 1, pads 0+0)"),
    ("input_grad", "kernel", {"kernel": (5, 5, 3, 4)}, "gradient height 4 != 2 (the conv's "
     "height for x_shape height 6, kernel height 5, stride 1, pads 0+0)"),
    ("kernel_grad", "batch", {"y": (64, 4, 4, 4)}, "x batch 2 != gradient batch 64"),
    ("kernel_grad", "channels", {"kernel": (3, 3, 5, 4)},
     "x channels 3 != k_shape input channels 5"),
    ("kernel_grad", "spatial", {"y": (2, 4, 5, 4)}, "gradient width 5 != 4 (the conv's width "
     "for x width 6, k_shape width 3, stride 1, pads 0+0)"),
    ("kernel_grad", "kernel", {"kernel": (2, 3, 3, 4)}, "gradient height 4 != 5 (the conv's "
     "height for x height 6, k_shape height 2, stride 1, pads 0+0)"),
    ("conv_pool", "channels", {"x": (2, 6, 6, 5)}, "x channels 5 != kernel input channels 3"),
    ("conv_pool", "spatial", {"x": (2, 3, 6, 3)}, "the conv output's height 1 has no 2x2 "
     "window (x height 3, kernel height 3, stride 1, pads 0+0)"),
    ("conv_pool", "kernel", {"kernel": (7, 3, 3, 4)}, "kernel height 7 > x height 6 + pads 0+0"),
    ("pool_input_grad", "batch", {"x": (64, 6, 6, 3)}, "x batch 64 != gradient batch 2"),
    ("pool_input_grad", "channels", {"pooled": (2, 2, 2, 5)},
     "gradient channels 5 != kernel output channels 4"),
    ("pool_input_grad", "spatial", {"pooled": (2, 3, 2, 4)}, "gradient height 3 != 2 (the "
     "pooled conv's height for x height 6, kernel height 3, stride 1, pads 0+0)"),
    ("pool_input_grad", "kernel", {"kernel": (5, 5, 3, 4)}, "gradient height 2 != 1 (the "
     "pooled conv's height for x height 6, kernel height 5, stride 1, pads 0+0)"),
    ("pool_input_grad", "mask", {"mask": (2, 2, 2, 5)},
     "mask shape (2, 2, 2, 5) != gradient shape (2, 2, 2, 4)"),
    ("pool_kernel_grad", "batch", {"pooled": (64, 2, 2, 4)}, "x batch 2 != gradient batch 64"),
    ("pool_kernel_grad", "channels", {"kernel": (3, 3, 5, 4)},
     "x channels 3 != k_shape input channels 5"),
    ("pool_kernel_grad", "spatial", {"pooled": (2, 2, 1, 4)}, "gradient width 1 != 2 (the "
     "pooled conv's width for x width 6, k_shape width 3, stride 1, pads 0+0)"),
    ("pool_kernel_grad", "kernel", {"kernel": (5, 5, 3, 4)}, "gradient height 2 != 1 (the "
     "pooled conv's height for x height 6, k_shape height 5, stride 1, pads 0+0)"),
    ("pool_kernel_grad", "mask", {"mask": (1, 2, 2, 4)},
     "mask shape (1, 2, 2, 4) != gradient shape (2, 2, 2, 4)"),
    ("unpool", "batch", {"y": (64, 4, 4, 4)}, "y_shape batch 64 != gradient batch 2"),
    ("unpool", "channels", {"y": (2, 4, 4, 5)}, "y_shape channels 5 != gradient channels 4"),
    ("unpool", "spatial", {"y": (2, 7, 4, 4)},
     "gradient height 2 != 3 (the pooled height for y_shape height 7)"),
    ("unpool", "mask", {"mask": (2, 2, 2, 5)},
     "mask shape (2, 2, 2, 5) != gradient shape (2, 2, 2, 4)"),
]
# What only a call past the Python functions can get wrong: the results' shapes.
HANDLER_MISMATCHES = [
    ("conv", "batch", {"y": (3, 4, 4, 4)}, "x batch 2 != output batch 3"),
    ("conv", "output channels", {"y": (2, 4, 4, 5)},
     "output channels 5 != kernel output channels 4"),
    ("conv", "output spatial", {"y": (2, 4, 3, 4)}, "output width 3 != 4 (the conv's width for "
     "x width 6, kernel width 3, stride 1, pads 0+0)"),
    ("conv_pool", "batch", {"pooled": (3, 2, 2, 4)}, "x batch 2 != output batch 3"),
    ("conv_pool", "output spatial", {"pooled": (2, 3, 2, 4)}, "output height 3 != 2 (the "
     "pooled conv's height for x height 6, kernel height 3, stride 1, pads 0+0)"),
    ("conv_pool", "mask", {"mask": (2, 2, 2, 5)},
     "mask shape (2, 2, 2, 5) != output shape (2, 2, 2, 4)"),
]


def case_id(case):
    return f"{case[0]}-{case[1].replace(' ', '_')}"


@pytest.mark.parametrize("case", MISMATCHES, ids=case_id)
def test_each_function_refuses_each_mismatch_by_name(case):
    """Checked where the call is traced (no oneDNN needed): one ValueError naming the
    function and the mismatch."""
    function, _, overrides, message = case
    with pytest.raises(ValueError, match=re.escape(f"onednn {function}: {message}")):
        PUBLIC_CALLS[function](shapes_with(overrides))


@needs_onednn
@pytest.mark.parametrize("case", [c for c in MISMATCHES if c[0] != "unpool"]
                         + HANDLER_MISMATCHES, ids=case_id)
def test_the_handler_refuses_each_mismatch_on_its_own(case):
    """The same calls straight to the FFI targets: the C++ refuses each with the same words,
    one JaxRuntimeError (XLA's INVALID_ARGUMENT), before anything is read or written."""
    function, _, overrides, message = case
    with pytest.raises(jax.errors.JaxRuntimeError,
                       match=re.escape(f"INVALID_ARGUMENT: onednn {function}: {message}")):
        HANDLER_CALLS[function](shapes_with(overrides))


def test_dtypes_and_geometry_that_do_not_fit_are_refused_by_name():
    x, k = zeros(BASE["x"]), zeros(BASE["kernel"])
    for call, message in (
            (lambda: onednn.conv(x, k.astype(jnp.bfloat16), STRIDES, PADS),
             "onednn conv: kernel dtype bfloat16 != x dtype float32"),
            (lambda: onednn.kernel_grad(x.astype(jnp.float16), zeros(BASE["y"], jnp.float16),
                                        STRIDES, PADS, BASE["kernel"]),
             "onednn kernel_grad: float32 or bfloat16 only: x is float16"),
            (lambda: onednn.conv(x, k, (0, 1), PADS),
             "onednn conv: strides (0, 1) are not >= 1"),
            (lambda: onednn.conv_pool(x, k, STRIDES, ((0, -1), (0, 0)), "split"),
             "onednn conv_pool: pads ((0, -1), (0, 0)) are not >= 0"),
            (lambda: onednn.pool_kernel_grad(x, zeros(BASE["pooled"]),
                                             zeros(BASE["pooled"]), STRIDES, PADS,
                                             BASE["kernel"], False),
             "onednn pool_kernel_grad: mask dtype float32 != uint8")):
        with pytest.raises(ValueError, match=re.escape(message)):
            call()


@needs_onednn
def test_the_handler_refuses_dtypes_and_kinds_it_has_no_convolution_for():
    x, k = zeros(BASE["x"]), zeros(BASE["kernel"])
    for call, message in (
            (lambda: ffi(onednn.TARGET, out(BASE["y"]), x, k.astype(jnp.bfloat16),
                         kind=np.int64(0), **GEOMETRY),
             "onednn conv: kernel dtype bfloat16 != x dtype float32"),
            (lambda: ffi(onednn.TARGET, out(BASE["kernel"], jnp.float16),
                         x.astype(jnp.float16), zeros(BASE["y"], jnp.float16),
                         kind=np.int64(2), **GEOMETRY),
             "onednn kernel_grad: float32 or bfloat16 only: x is float16"),
            (lambda: ffi(onednn.TARGET, out(BASE["y"]), x, k, kind=np.int64(3), **GEOMETRY),
             "onednn_conv: kind 3 is not 0, 1 or 2"),
            (lambda: ffi(onednn.TARGET, out(BASE["y"]), x, k, kind=np.int64(0),
                         **{**GEOMETRY, "stride_w": np.int64(0)}),
             "onednn conv: strides (1, 0) are not >= 1"),
            (lambda: ffi(POOL["kernel_grad"], out(BASE["kernel"]), x, zeros(BASE["pooled"]),
                         zeros(BASE["pooled"], jnp.uint8),
                         **{**POOL_ATTRS, "chunk_bytes": np.int64(0)}),
             "onednn pool_kernel_grad: chunk_bytes 0 is not >= 1")):
        with pytest.raises(jax.errors.JaxRuntimeError, match=re.escape(message)):
            call()


@needs_onednn
def test_an_empty_batch_has_a_zero_kernel_gradient():
    """A batch of 0 is a call with nothing to read: the kernel gradients are zeros (not a
    previous call's partial sums left in the handler's buffers)."""
    x, g = jnp.ones((3, 6, 6, 3)), jnp.ones((3, 4, 4, 4))
    mask = jnp.full((3, 2, 2, 4), 1, jnp.uint8)
    assert float(onednn.kernel_grad(x, g, STRIDES, PADS, (3, 3, 3, 4)).sum()) != 0
    assert float(onednn.pool_kernel_grad(x, g[:, :2, :2], mask, STRIDES, PADS, (3, 3, 3, 4),
                                         False).sum()) != 0
    empty = jnp.zeros((0, 6, 6, 3))
    np.testing.assert_array_equal(onednn.kernel_grad(empty, jnp.zeros((0, 4, 4, 4)), STRIDES,
                                                     PADS, (3, 3, 3, 4)), 0)
    np.testing.assert_array_equal(onednn.pool_kernel_grad(
        empty, jnp.zeros((0, 2, 2, 4)), jnp.zeros((0, 2, 2, 4), jnp.uint8), STRIDES, PADS,
        (3, 3, 3, 4), False), 0)
    assert onednn.conv_pool(empty, jnp.ones((3, 3, 3, 4)), STRIDES, PADS, "split").shape == (
        0, 2, 2, 4)


# ----------------------------------------------------------------------------- the build


def run_python(code_or_args, env, timeout=300):
    """`python -c code` (a str) or `python *args` (a list) in a subprocess with env."""
    args = ["-c", code_or_args] if isinstance(code_or_args, str) else code_or_args
    return subprocess.run([sys.executable, *args], env=env, capture_output=True, text=True,
                          timeout=timeout, check=False)


def env_with(**changes):
    """os.environ with `changes` (None removes a variable)."""
    env = {k: v for k, v in os.environ.items() if k not in changes}
    env.update({k: v for k, v in changes.items() if v is not None})
    return env


CONV_AND_PRINT = ("from jax_robust import onednn; import jax.numpy as jnp; "
                  "assert onednn.available(), onednn.unavailable_reason(); "
                  "print(float(onednn.conv(jnp.ones((1, 3, 3, 1)), jnp.ones((3, 3, 1, 1)), "
                  "(1, 1), ((0, 0), (0, 0)))[0, 0, 0, 0]))")


def counting_compiler(tmp_path):
    """A $CXX that notes each build in tmp_path/builds, then runs the real compiler."""
    log, script = tmp_path / "builds", tmp_path / "cxx"
    script.write_text(f"#!/bin/sh\necho build >> {log}\nexec {onednn._compiler()[0]} \"$@\"\n")
    script.chmod(0o755)
    return str(script), log


@needs_onednn
def test_a_damaged_cached_handler_is_rebuilt(tmp_path):
    """A truncated .so in the cache (a crash mid-write elsewhere, a full disk) is not
    trusted: the loader builds it again and the conv runs. (This process's library and its
    manifest, copied into an empty cache and then truncated: one build, not two.)"""
    library = Path(onednn._load()[0]._name)
    for path in (library, onednn._manifest_path(library)):
        shutil.copy(path, tmp_path / path.name)
    cached = tmp_path / library.name
    cached.write_bytes(cached.read_bytes()[:1000])
    again = run_python(CONV_AND_PRINT, env_with(JAX_ROBUST_CACHE=str(tmp_path)))
    assert again.returncode == 0 and again.stdout.strip() == "9.0", again.stderr[-2000:]
    version = onednn.describe()["onednn"]
    assert cached.stat().st_size > 1000 and onednn._intact(cached, version)  # rebuilt


@needs_onednn
def test_a_library_built_against_another_onednn_is_rebuilt_never_loaded(tmp_path):
    """The cache key holds oneDNN's version (another version: another name), and the manifest
    says which version a library was built against: one that says another version is built
    again, however intact. Here the cached 'library' is junk with a matching sha256, so
    loading it would fail: the conv runs, so it was rebuilt and not loaded."""
    include, lib = onednn._find_onednn()
    version = onednn._library_version(lib)
    assert onednn._library_path(include, lib, version) != onednn._library_path(
        include, lib, "3.1.0 (another)")
    library = Path(onednn._load()[0]._name)
    cached = tmp_path / library.name
    cached.write_bytes(b"not a library")
    manifest = {**onednn._manifest(library), "onednn": "3.1.0 (another)",
                "sha256": onednn._sha256(cached)}
    onednn._manifest_path(cached).write_text(json.dumps(manifest))
    assert not onednn._intact(cached, version)
    again = run_python(CONV_AND_PRINT, env_with(JAX_ROBUST_CACHE=str(tmp_path)))
    assert again.returncode == 0 and again.stdout.strip() == "9.0", again.stderr[-2000:]
    assert onednn._manifest(cached)["onednn"] == version and onednn._intact(cached, version)


@needs_onednn
@needs_compiler
def test_concurrent_first_runs_build_once(tmp_path):
    """Two processes with an empty cache: both wait on the build lock (held here until both
    have started), then one builds and the other finds its library."""
    cxx, log = counting_compiler(tmp_path)
    cache = tmp_path / "cache"
    cache.mkdir()
    env = env_with(JAX_ROBUST_CACHE=str(cache), CXX=cxx)
    code = ("import sys; from jax_robust import onednn; print('started', flush=True); "
            "sys.stdin.readline(); " + CONV_AND_PRINT.split("; ", 1)[1])
    with onednn._build_lock(cache):
        runs = [subprocess.Popen([sys.executable, "-c", code], env=env, text=True,
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE) for _ in range(2)]
        for run in runs:
            assert run.stdout.readline().strip() == "started"
        for run in runs:  # both go on to the lock at once
            run.stdin.write("\n")
            run.stdin.flush()
        time.sleep(2)
        assert not log.exists()  # nobody built while the lock was held
    results = [run.communicate(timeout=300) for run in runs]
    for run, (stdout, stderr) in zip(runs, results):
        assert run.returncode == 0 and stdout.split() == ["9.0"], stderr[-2000:]
    assert log.read_text().split() == ["build"]
    assert len(list(cache.glob("onednn_conv-*.so"))) == 1


def test_importing_the_handler_or_the_models_builds_nothing(tmp_path):
    """Importing jax_robust.onednn (and the layers and models that use it) builds and loads
    nothing: the build happens on the first available(), supports() or call."""
    cxx, log = tmp_path / "cxx", tmp_path / "builds"
    cxx.write_text(f"#!/bin/sh\necho build >> {log}\nexit 1\n")
    cxx.chmod(0o755)
    cache = tmp_path / "cache"
    code = ("import sys; import jax_robust.onednn, jax_robust.layers, jax_robust.models; "
            "assert jax_robust.onednn._load_once.cache_info().currsize == 0; "
            "import os; maps = '/proc/self/maps'; assert not os.path.exists(maps) or "
            "not any('libdnnl' in line for line in open(maps))")
    done = run_python(code, env_with(JAX_ROBUST_CACHE=str(cache), CXX=str(cxx)))
    assert done.returncode == 0, done.stderr[-2000:]
    assert not log.exists() and not cache.exists()


def test_the_switch_turns_the_handler_off_with_its_reason(tmp_path):
    """JAX_ROBUST_ONEDNN=0: unavailable, saying so, before anything is built or loaded; a
    call raises that reason; `python -m jax_robust.onednn` exits 1 with it in one line."""
    env = env_with(JAX_ROBUST_ONEDNN="0", JAX_ROBUST_CACHE=str(tmp_path / "cache"))
    code = ("from jax_robust import onednn; import jax.numpy as jnp\n"
            "assert not onednn.available() and not onednn.supports(jnp.float32)\n"
            "print(onednn.unavailable_reason())\n"
            "try:\n"
            "    onednn.conv(jnp.ones((1, 3, 3, 1)), jnp.ones((3, 3, 1, 1)), (1, 1), "
            "((0, 0), (0, 0)))\n"
            "except RuntimeError as err:\n"
            "    print(err)\n")
    done = run_python(code, env)
    assert done.returncode == 0, done.stderr[-2000:]
    reason, raised = done.stdout.splitlines()
    assert reason == "turned off by JAX_ROBUST_ONEDNN=0" and reason in raised
    cli = run_python(["-m", "jax_robust.onednn"], env)
    assert cli.returncode == 1 and cli.stdout == ""
    assert cli.stderr.strip().splitlines() == [
        "oneDNN handler unusable: oneDNN's convolutions are unavailable: turned off by "
        "JAX_ROBUST_ONEDNN=0"]
    assert not (tmp_path / "cache").exists()


def test_without_a_compiler_the_reason_says_so(tmp_path):
    """No g++ on PATH, $CXX unset, an empty cache: unavailable, the reason says why in one
    line, and `python -m jax_robust.onednn` exits 1 with it."""
    bare = tmp_path / "bin"  # a PATH with no compiler on it
    bare.mkdir()
    env = env_with(PATH=str(bare), CXX=None, JAX_ROBUST_ONEDNN=None,
                   JAX_ROBUST_CACHE=str(tmp_path / "cache"))
    done = run_python("from jax_robust import onednn; assert not onednn.available(); "
                      "print(onednn.unavailable_reason())", env)
    assert done.returncode == 0, done.stderr[-2000:]
    reason = done.stdout.strip()
    want = ("built for Linux only" if sys.platform != "linux"
            else "oneDNN 3 is not installed" if onednn._find_onednn() is None
            else "no C++ compiler")
    assert want in reason and "\n" not in reason
    cli = run_python(["-m", "jax_robust.onednn"], env)
    assert cli.returncode == 1 and want in cli.stderr
    assert len(cli.stderr.strip().splitlines()) == 1


@needs_onednn
def test_python_m_reports_the_version_the_isa_and_the_library():
    done = run_python(["-m", "jax_robust.onednn"], env_with())
    assert done.returncode == 0, done.stderr[-2000:]
    facts = onednn.describe()
    lines = done.stdout.splitlines()
    assert lines[0] == f"oneDNN {facts['onednn']}"
    assert lines[1].startswith(f"ISA: {facts['isa']} ") and "forward " in lines[1]
    assert f"library: {facts['library']}" in lines
    assert "build warnings: none" in lines
