"""Layers whose computation has a speed option (config.SpeedConfig): same values, other programs.

Each option computes exactly the values of the plain JAX form; the work is rearranged, mostly
in the backward pass, where XLA:CPU is slow when left to autodiff (measured in docs/performance.md):
  max_pool_2x2      2x2/2 max-pool as the max of the four window corners, with a custom VJP
                    (a tie count and one select); ties share the gradient evenly, as JAX's
                    reduce-max gradient does. `pool_2x2(x, "autodiff")` is the plain form.
                    (`max_pool_2x2_first` is not a speed option: it gives a window's whole
                    gradient to its first maximum, as PyTorch does; the official variant.)
  small_input_conv  `lax.conv_general_dilated` for `nn.Conv(conv_general_dilated=...)`: a
                    stride-1 conv with at most 4 input channels (a network's first layer) gets
                    its input gradient as one matmul plus an overlap-add of the kh*kw taps.
  column_taps_conv  the same for the later convs: the input gradient as a kh x 1
                    conv-transpose of the kw column taps stacked on the channels, then a
                    kw-tap overlap-add (zero padding on the rows only).
  onednn_conv       a conv whose forward and both gradients are oneDNN's (jax_robust.onednn,
                    XLA:CPU only), conv_kernels='onednn'; `onednn_small_input_conv` keeps
                    small_input_conv's overlap-add input gradient for a first conv.
  sum_leading,      per-channel sums over [n, h, w] and the matching broadcast, each the
  broadcast_leading   other's gradient, as ones-vector dots ("dot") or XLA reduces ("reduce").
  BatchNorm         `nn.BatchNorm`'s variables and formulas on top of those sums.
  ConvPool          a conv + pool (CNN1's conv2; CNN2's conv2 and conv4 when fused), the bias
                    added before or after the pool; `fused`: one oneDNN call each way
                    (onednn.conv_pool), SpeedConfig.conv_pool.
Layout: NHWC activations, HWIO kernels (Flax's).
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from jax_robust import onednn
from jax_robust.config import SpeedConfig, conv_pool_fused

NHWC = ("NHWC", "HWIO", "NHWC")


def _windows(x: jax.Array) -> jax.Array:
    """[n, h, w, c] -> [n, h//2, 2, w//2, 2, c]: the 2x2 windows (odd edges dropped)."""
    n, h, w, c = x.shape
    return x[:, : h // 2 * 2, : w // 2 * 2].reshape(n, h // 2, 2, w // 2, 2, c)


def _corners(x: jax.Array) -> list[jax.Array]:
    """The four [n, h//2, w//2, c] strided slices: each window's (0,0), (0,1), (1,0), (1,1)."""
    x6 = _windows(x)
    return [x6[:, :, i, :, j] for i in (0, 1) for j in (0, 1)]


@jax.custom_vjp
def max_pool_2x2(x: jax.Array) -> jax.Array:
    """2x2/2 max-pool of x [n, h, w, c] -> [n, h//2, w//2, c] (PyTorch's floor mode)."""
    a, b, c, d = _corners(x)  # elementwise maxima: faster on CPU than a reduce
    return jnp.maximum(jnp.maximum(a, b), jnp.maximum(c, d))


def _max_pool_fwd(x):
    m = max_pool_2x2(x)
    return m, (x, m)


def _max_pool_bwd(res, g):
    x, m = res
    n, h, w, c = x.shape
    ties = sum((corner == m).astype(g.dtype) for corner in _corners(x))
    share = g / ties  # ties split evenly, as JAX's reduce-max gradient
    hit = _windows(x) == m[:, :, None, :, None]
    gx = jnp.where(hit, share[:, :, None, :, None], jnp.zeros((), g.dtype))
    gx = gx.reshape(n, h // 2 * 2, w // 2 * 2, c)
    if h % 2 or w % 2:
        gx = jnp.pad(gx, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)))
    return (gx,)


max_pool_2x2.defvjp(_max_pool_fwd, _max_pool_bwd)


@jax.custom_vjp
def max_pool_2x2_first(x: jax.Array) -> jax.Array:
    """2x2/2 max-pool whose gradient goes wholly to the FIRST maximum of each window in
    row-major order, as PyTorch's max_pool2d (its argmax) sends it."""
    return max_pool_2x2(x)


def _first_max_fwd(x):
    a, b, c, d = _corners(x)
    m = jnp.maximum(jnp.maximum(a, b), jnp.maximum(c, d))
    first = jnp.where(a == m, 0, jnp.where(b == m, 1, jnp.where(c == m, 2, 3))).astype(jnp.int8)
    return m, (first, x.shape)


def _first_max_bwd(res, g):
    first, (n, h, w, c) = res
    pos = (2 * jnp.arange(2)[:, None] + jnp.arange(2)[None, :]).astype(jnp.int8)  # [2, 2]
    hit = first[:, :, None, :, None, :] == pos[None, None, :, None, :, None]
    gx = jnp.where(hit, g[:, :, None, :, None, :], jnp.zeros((), g.dtype))
    gx = gx.reshape(n, h // 2 * 2, w // 2 * 2, c)
    if h % 2 or w % 2:
        gx = jnp.pad(gx, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)))
    return (gx,)


max_pool_2x2_first.defvjp(_first_max_fwd, _first_max_bwd)


def _autodiff_pool(x: jax.Array) -> jax.Array:
    return _windows(x).max(axis=(2, 4))


# (ties, grad) -> the pool; the choices are config's (SpeedConfig.pool_grad, ModelConfig.
# pool_ties), checked there once.
_POOLS = {("split", "corners"): max_pool_2x2, ("split", "autodiff"): _autodiff_pool,
          ("first", "corners"): max_pool_2x2_first, ("first", "autodiff"): max_pool_2x2_first}


def pool_2x2(x: jax.Array, grad: str, ties: str = "split") -> jax.Array:
    """2x2/2 max-pool of x [n, h, w, c]. ties: where the gradient of a window with several
    maxima goes: 'split' evenly (JAX's rule) or to the 'first' in row-major order (PyTorch's).
    grad, for 'split': 'corners' (max_pool_2x2's custom VJP) or 'autodiff' (reshape-and-max,
    JAX's own gradient), the same values and gradients; 'first' has one form."""
    return _POOLS[ties, grad](x)


def _conv(x, w, pads):
    return jax.lax.conv_general_dilated(x, w, (1, 1), pads, dimension_numbers=NHWC)


def _overlap_add_input_grad(g, w, pads, x_shape):
    """x-gradient of a stride-1 NHWC/HWIO conv: g @ w^T per tap, each tap shifted and summed.

    g [n, ho, wo, o], w [kh, kw, i, o] -> [n, h, w, i] (x_shape). Output pixel (a, b) read input
    pixel (a + di - top_pad, b + dj - left_pad) through tap (di, dj).
    """
    kh, kw, c_in, c_out = w.shape
    _, h, wd, _ = x_shape
    ho, wo = g.shape[1:3]
    # One [n*ho*wo, o] x [o, kh*kw*i] product, then [n, ho, wo, kh*kw, i].
    taps = jax.lax.dot_general(g, w.reshape(kh * kw * c_in, c_out), (((3,), (1,)), ((), ())))
    taps = taps.reshape(*g.shape[:3], kh * kw, c_in)
    zero = jnp.zeros((), g.dtype)
    out = None
    for t in range(kh * kw):
        di, dj = divmod(t, kw)
        top, left = di - pads[0][0], dj - pads[1][0]
        shifted = jax.lax.pad(taps[:, :, :, t], zero, (
            (0, 0, 0), (top, h - top - ho, 0), (left, wd - left - wo, 0), (0, 0, 0)))
        out = shifted if out is None else out + shifted
    return out


def _xla_kernel_grad(x, g, pads, w):
    """XLA's kernel gradient of `_conv(x, w, pads)` for the output cotangent g."""
    return jax.vjp(lambda w_: _conv(x, w_, pads), w)[1](g)[0]


def _conv_with_input_grad(input_grad: Callable, forward: Callable = _conv,
                          kernel_grad: Callable = _xla_kernel_grad) -> Callable:
    """(x, w, pads) -> `forward(x, w, pads)` (XLA's stride-1 conv unless given), whose VJP
    takes `kernel_grad(x, g, pads, w)` for the kernel and `input_grad(g, w, pads, x_shape)`
    for the input."""
    @functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
    def conv(x, w, pads):
        return forward(x, w, pads)

    def fwd(x, w, pads):
        return forward(x, w, pads), (x, w)

    def bwd(pads, res, g):
        x, w = res
        return input_grad(g, w, pads, x.shape), kernel_grad(x, g, pads, w)

    conv.defvjp(fwd, bwd)
    return conv


_overlap_add_conv = _conv_with_input_grad(_overlap_add_input_grad)


def _plain_geometry(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
                    dimension_numbers, feature_group_count, batch_group_count, precision,
                    preferred_element_type):
    """(strides, ((top, bottom), (left, right))) of a plain NHWC/HWIO conv (no dilation,
    groups, precision or output type; every pad >= 0), else None."""
    dn = jax.lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
    fits = (lhs.ndim == 4
            and dn == jax.lax.conv_dimension_numbers(lhs.shape, rhs.shape, NHWC)
            and feature_group_count == 1 and batch_group_count == 1 and precision is None
            and preferred_element_type is None
            and all(d in (None, 1) for d in tuple(lhs_dilation or ()) + tuple(rhs_dilation or ())))
    if not fits:
        return None
    strides = tuple(window_strides)
    pads = (jax.lax.padtype_to_pads(lhs.shape[1:3], rhs.shape[:2], strides, padding)
            if isinstance(padding, str) else padding)
    pads = tuple(tuple(int(p) for p in pair) for pair in pads)
    if all(p >= 0 for pair in pads for p in pair):
        return strides, pads
    return None


def _stride1_pads(*args):
    """The pads of a plain stride-1 NHWC/HWIO conv (_plain_geometry) whose every pad is within
    [0, kernel size), else None."""
    geometry = _plain_geometry(*args)
    if geometry is None or geometry[0] != (1, 1):
        return None
    pads, rhs = geometry[1], args[1]
    if all(p < k for pair, k in zip(pads, rhs.shape[:2]) for p in pair):
        return pads
    return None


def _custom_or_xla_conv(custom: Callable | None, *args):
    """`custom(lhs, rhs, pads)` when `args` (conv_general_dilated's, all 11 positional) are a
    plain stride-1 conv (_stride1_pads), else `lax.conv_general_dilated(*args)`."""
    pads = _stride1_pads(*args) if custom is not None else None
    if pads is not None:
        return custom(args[0], args[1], pads)
    *head, precision, preferred_element_type = args
    return jax.lax.conv_general_dilated(*head, precision=precision,
                                        preferred_element_type=preferred_element_type)


def small_input_conv(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                     dimension_numbers=None, feature_group_count=1, batch_group_count=1,
                     precision=None, preferred_element_type=None):
    """`lax.conv_general_dilated`, with the overlap-add input gradient where it is faster.

    Taken when: NHWC/HWIO, stride 1, no dilation or groups, at most 4 input channels, every
    pad within [0, kernel size). Same values; the input gradient differs from XLA's by float
    rounding only.
    """
    return _custom_or_xla_conv(
        _overlap_add_conv if rhs.shape[2] <= 4 else None, lhs, rhs, window_strides, padding,
        lhs_dilation, rhs_dilation, dimension_numbers, feature_group_count, batch_group_count,
        precision, preferred_element_type)


def _column_taps_input_grad(g, w, pads, x_shape):
    """x-gradient of a stride-1 NHWC/HWIO conv, with the kw column taps stacked on channels.

    The conv equals a kh x 1 conv of the stacked input [n, h_p, wo, kw*i] (the padded input's
    kw column shifts side by side) with w as [kh, 1, kw*i, o]. Its transpose is XLA's
    conv-transpose, which zero-pads only the rows (a kh x kw transpose pads both axes and
    multiplies the zeros: 44-56% more work on 10x10 and 12x12 maps); then the kw column taps
    are shifted and summed, and the pads cropped. g [n, ho, wo, o] -> [n, h, w, i].
    """
    kh, kw, c_in, c_out = w.shape
    n, h, wd, _ = x_shape
    (top, bottom), (left, right) = pads
    h_p, w_p = h + top + bottom, wd + left + right
    wo = g.shape[2]
    stacked = jax.ShapeDtypeStruct((n, h_p, wo, kw * c_in), g.dtype)
    rows_conv = functools.partial(_conv, w=w.reshape(kh, 1, kw * c_in, c_out),
                                  pads=((0, 0), (0, 0)))
    (d_stacked,) = jax.linear_transpose(rows_conv, stacked)(g)
    zero = jnp.zeros((), g.dtype)
    dx = None
    for j in range(kw):
        tap = jax.lax.pad(d_stacked[..., j * c_in:(j + 1) * c_in], zero,
                          ((0, 0, 0), (0, 0, 0), (j, w_p - wo - j, 0), (0, 0, 0)))
        dx = tap if dx is None else dx + tap
    return dx[:, top:top + h, left:left + wd]


_column_taps_conv = _conv_with_input_grad(_column_taps_input_grad)


def column_taps_conv(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                     dimension_numbers=None, feature_group_count=1, batch_group_count=1,
                     precision=None, preferred_element_type=None):
    """`lax.conv_general_dilated`, with the input gradient of `_column_taps_input_grad` for a
    plain stride-1 NHWC/HWIO conv (else XLA's). The forward is XLA's conv, bit for bit; the
    input gradient differs from XLA's by float rounding only."""
    return _custom_or_xla_conv(
        _column_taps_conv, lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
        dimension_numbers, feature_group_count, batch_group_count, precision,
        preferred_element_type)


def first_conv_fn(grad: str, kernels: str = "xla") -> Callable | None:
    """`nn.Conv`'s conv_general_dilated for a first conv: grad 'overlap_add' or 'xla' (the
    kernels' own input gradient); kernels 'xla' or 'onednn' (`onednn_conv`; with
    'overlap_add', `onednn_small_input_conv`)."""
    return {("onednn", "overlap_add"): onednn_small_input_conv, ("onednn", "xla"): onednn_conv,
            ("xla", "overlap_add"): small_input_conv, ("xla", "xla"): None}[kernels, grad]


# The first conv with oneDNN's forward and kernel gradient and the overlap-add input gradient.
_onednn_overlap_add_conv = _conv_with_input_grad(
    _overlap_add_input_grad, forward=lambda x, w, pads: onednn.conv(x, w, (1, 1), pads),
    kernel_grad=lambda x, g, pads, w: onednn.kernel_grad(x, g, (1, 1), pads, w.shape))


def _onednn_dtypes(lhs, rhs) -> bool:
    """Whether oneDNN's handler takes these operands: one dtype that this CPU's oneDNN has
    convolutions for (float32; bfloat16 with AVX-512), `onednn.supports`."""
    return lhs.dtype == rhs.dtype and onednn.supports(lhs.dtype)


def onednn_small_input_conv(lhs, rhs, window_strides, padding, lhs_dilation=None,
                            rhs_dilation=None, dimension_numbers=None, feature_group_count=1,
                            batch_group_count=1, precision=None, preferred_element_type=None):
    """`small_input_conv`'s case (stride 1, at most 4 input channels) with oneDNN's forward
    and kernel gradient and the overlap-add input gradient (measured faster than oneDNN's for
    a one-channel input); any other conv is `onednn_conv`'s."""
    args = (lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation, dimension_numbers,
            feature_group_count, batch_group_count, precision, preferred_element_type)
    pads = _stride1_pads(*args)
    if pads is not None and rhs.shape[2] <= 4 and _onednn_dtypes(lhs, rhs):
        return _onednn_overlap_add_conv(lhs, rhs, pads)
    return onednn_conv(*args)


def onednn_conv(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                dimension_numbers=None, feature_group_count=1, batch_group_count=1,
                precision=None, preferred_element_type=None):
    """`lax.conv_general_dilated` through oneDNN (jax_robust.onednn.conv: forward, input and
    kernel gradients) for a plain NHWC/HWIO conv (any strides, pads >= 0) of operands of one
    dtype this CPU's oneDNN has convolutions for (float32; bfloat16 with AVX-512:
    `onednn.supports`), else XLA's. Needs `onednn.available()`. The values differ from
    XLA's by float rounding only (oneDNN sums in another order)."""
    args = (lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation, dimension_numbers,
            feature_group_count, batch_group_count, precision, preferred_element_type)
    geometry = _plain_geometry(*args)
    if geometry is not None and _onednn_dtypes(lhs, rhs):
        return onednn.conv(lhs, rhs, *geometry)
    return jax.lax.conv_general_dilated(*args[:9], precision=precision,
                                        preferred_element_type=preferred_element_type)


def later_conv_fn(grad: str, kernels: str = "xla") -> Callable | None:
    """`nn.Conv`'s conv_general_dilated for a conv after the first: kernels 'onednn'
    (`onednn_conv`, whatever grad says) or 'xla', and then grad 'column_taps' or 'xla'."""
    return {("onednn", "column_taps"): onednn_conv, ("onednn", "xla"): onednn_conv,
            ("xla", "column_taps"): column_taps_conv, ("xla", "xla"): None}[kernels, grad]


# ----------------------------------------------------------------------------- channel sums
# XLA:CPU reduces [n, h, w, c] over n, h, w (BatchNorm statistics, bias and scale gradients)
# as a slow reduce-window; the same sum as a ones-vector dot runs at memory speed. Both
# functions below are exact sums/broadcasts whose gradients are each other, so the backward
# passes get dots too.


def _dot_sum(x: jax.Array) -> jax.Array:
    """[..., c] -> [c], the sum over every leading axis as ones[1, m] @ x[m, c]."""
    x2 = x.reshape(-1, x.shape[-1])
    return jax.lax.dot_general(jnp.ones((x2.shape[0],), x.dtype), x2, (((0,), (0,)), ((), ())),
                               precision=jax.lax.Precision.HIGHEST)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _sum_leading(x, shape):
    del shape
    return _dot_sum(x)


def _sum_leading_fwd(x, shape):
    return _dot_sum(x), None


def _sum_leading_bwd(shape, _, g):
    return (jnp.broadcast_to(g, shape),)


_sum_leading.defvjp(_sum_leading_fwd, _sum_leading_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _broadcast_leading(v, shape):
    return jnp.broadcast_to(v, shape)


def _broadcast_leading_fwd(v, shape):
    return jnp.broadcast_to(v, shape), None


def _broadcast_leading_bwd(shape, _, g):
    return (_dot_sum(g),)


_broadcast_leading.defvjp(_broadcast_leading_fwd, _broadcast_leading_bwd)


def sum_leading(x: jax.Array, impl: str) -> jax.Array:
    """x [..., c] -> [c]: the sum over all leading axes, impl 'dot' or 'reduce'."""
    if impl == "reduce":
        return x.reshape(-1, x.shape[-1]).sum(axis=0)
    return _sum_leading(x, x.shape)


def broadcast_leading(v: jax.Array, shape: tuple[int, ...], impl: str) -> jax.Array:
    """v [c] -> `shape` [..., c]; its gradient is `sum_leading(., impl)`."""
    if impl == "reduce":
        return jnp.broadcast_to(v, shape)
    return _broadcast_leading(v, tuple(shape))


# ----------------------------------------------------------------------------- modules


class BatchNorm(nn.Module):
    """`nn.BatchNorm` over every axis but the last, with the same variables and formulas.

    Parameters `scale`, `bias`; `batch_stats` `mean`, `var`. Train mode normalises with the
    batch mean and biased variance (E[x^2] - E[x]^2, as Flax) and updates the running ones
    (running = momentum * running + (1 - momentum) * batch). Per-channel sums by
    `sum_leading(., channel_sums)`. Statistics in float32 whatever `dtype` is.
    """

    use_running_average: bool
    momentum: float = 0.9
    epsilon: float = 1e-5
    dtype: Any = jnp.float32
    channel_sums: str = "reduce"

    @nn.compact
    def __call__(self, x):
        c, impl = x.shape[-1], self.channel_sums
        scale = self.param("scale", nn.initializers.ones, (c,))
        bias = self.param("bias", nn.initializers.zeros, (c,))
        ra_mean = self.variable("batch_stats", "mean", lambda: jnp.zeros((c,), jnp.float32))
        ra_var = self.variable("batch_stats", "var", lambda: jnp.ones((c,), jnp.float32))
        xf = x.astype(jnp.promote_types(x.dtype, jnp.float32))
        if self.use_running_average:
            mean, var = ra_mean.value, ra_var.value
        else:
            count = x.size // c
            mean = sum_leading(xf, impl) / count
            var = jnp.maximum(sum_leading(xf * xf, impl) / count - mean * mean, 0.0)
            if not self.is_initializing():
                ra_mean.value = self.momentum * ra_mean.value + (1 - self.momentum) * mean
                ra_var.value = self.momentum * ra_var.value + (1 - self.momentum) * var
        mul = jax.lax.rsqrt(var + self.epsilon) * scale
        y = (xf - broadcast_leading(mean, x.shape, impl)) * broadcast_leading(mul, x.shape, impl)
        return (y + broadcast_leading(bias, x.shape, impl)).astype(self.dtype)


class ConvPool(nn.Module):
    """An optional ReLU (`relu_input`), a VALID 3x3 conv, then a 2x2 max-pool; parameters
    `kernel` [3, 3, C, features] and `bias` [features] as an `nn.Conv`'s. How it is computed
    is `speed`'s choice, made here and nowhere else: where config.conv_pool_fused(speed) and
    oneDNN has the dtype, the ReLU, conv and pool are one oneDNN call each way
    (onednn.conv_pool) and the bias is added after the pool; otherwise separate ops, the bias
    after the pool where `bias_after_pool` (default: speed.conv_bias_after_pool). pool(z) + b
    equals pool(z + b) bit for bit (a per-channel constant commutes with max and rounding is
    monotone); the bias gradient then sums the 4x smaller pooled map. The pool's tie rule is
    `pool_ties` either way.
    """

    features: int
    kernel_init: Callable
    bias_init: Callable
    speed: SpeedConfig
    pool_ties: str = "split"
    dtype: Any = jnp.float32
    relu_input: bool = False
    bias_after_pool: bool | None = None

    @nn.compact
    def __call__(self, x):
        kernel = self.param("kernel", self.kernel_init, (3, 3, x.shape[-1], self.features))
        bias = self.param("bias", self.bias_init, (self.features,))
        x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
        speed = self.speed
        if conv_pool_fused(speed) and _onednn_dtypes(x, kernel):
            return onednn.conv_pool(x, kernel, (1, 1), ((0, 0), (0, 0)), self.pool_ties,
                                    self.relu_input) + bias
        if self.relu_input:
            x = nn.relu(x)
        conv = (later_conv_fn(speed.conv_input_grad, speed.conv_kernels)
                or jax.lax.conv_general_dilated)
        y = conv(x, kernel, (1, 1), "VALID", dimension_numbers=NHWC)
        after = speed.conv_bias_after_pool if self.bias_after_pool is None else \
            self.bias_after_pool
        if after:
            return pool_2x2(y, speed.pool_grad, self.pool_ties) + bias
        return pool_2x2(y + bias, speed.pool_grad, self.pool_ties)
