"""Layer primitives with hand-written gradients that XLA:CPU runs slowly when left to autodiff.

Each one computes exactly the values of its plain JAX form; the work is rearranged, mostly in
the backward pass (measured in BUILD_NOTES.md, "Speed against PyTorch eager"):
  max_pool_2x2     2x2/2 max-pool as the max of the four window corners; its backward is a
                   tie count and one select (+6% on CNN2's AT step over autodiff of a
                   reshape-and-max). Ties share the gradient evenly, as JAX's own
                   reduce-max gradient does.
  small_input_conv `lax.conv_general_dilated` for `nn.Conv(conv_general_dilated=...)`: a
                   stride-1 conv with at most 4 input channels (a network's first layer) gets
                   its input gradient as one matmul plus an overlap-add of the kh*kw taps;
                   XLA:CPU's backward-input convolution is ~3x slower with 1-3 output channels.
                   On other backends, and for any other conv, it is `conv_general_dilated`.
  sum_leading,     per-channel sums over [n, h, w] and the matching broadcast, each the
  broadcast_leading  other's gradient, as ones-vector dots on CPU (XLA:CPU's reduce-window
                   runs them ~10x slower); models.BatchNorm is built on them.
Layout: NHWC activations, HWIO kernels (Flax's).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

NHWC = ("NHWC", "HWIO", "NHWC")


def _on_cpu() -> bool:
    """Whether traced programs run on XLA:CPU, where these rewrites were measured."""
    return jax.default_backend() == "cpu"


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
    a, b, c, d = _corners(x)  # elementwise maxima: ~2x faster on CPU than a reduce
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


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _overlap_add_conv(x, w, pads):
    return _conv(x, w, pads)


def _overlap_add_conv_fwd(x, w, pads):
    return _conv(x, w, pads), (x, w)


def _overlap_add_conv_bwd(pads, res, g):
    x, w = res
    gw = jax.vjp(lambda w_: _conv(x, w_, pads), w)[1](g)[0]  # XLA's kernel gradient
    return _overlap_add_input_grad(g, w, pads, x.shape), gw


_overlap_add_conv.defvjp(_overlap_add_conv_fwd, _overlap_add_conv_bwd)


def small_input_conv(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                     dimension_numbers=None, feature_group_count=1, batch_group_count=1,
                     precision=None, preferred_element_type=None):
    """`lax.conv_general_dilated`, with the overlap-add input gradient where it is faster.

    Taken when: the CPU backend, NHWC/HWIO, stride 1, no dilation or groups, at most 4 input
    channels, every pad within [0, kernel size). Same values; the input gradient differs from
    XLA's by float rounding only.
    """
    dn = jax.lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
    fits = (_on_cpu() and lhs.ndim == 4 and rhs.shape[2] <= 4
            and dn == jax.lax.conv_dimension_numbers(lhs.shape, rhs.shape, NHWC)
            and tuple(window_strides) == (1, 1) and feature_group_count == 1
            and batch_group_count == 1 and precision is None
            and preferred_element_type is None
            and all(d in (None, 1) for d in tuple(lhs_dilation or ()) + tuple(rhs_dilation or ())))
    if fits:
        pads = (jax.lax.padtype_to_pads(lhs.shape[1:3], rhs.shape[:2], (1, 1), padding)
                if isinstance(padding, str) else padding)
        pads = tuple(tuple(p) for p in pads)
        if all(0 <= p < k for pair, k in zip(pads, rhs.shape[:2]) for p in pair):
            return _overlap_add_conv(lhs, rhs, pads)
    return jax.lax.conv_general_dilated(
        lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation, dimension_numbers,
        feature_group_count, batch_group_count, precision=precision,
        preferred_element_type=preferred_element_type)


# ----------------------------------------------------------------------------- channel sums
# XLA:CPU reduces [n, h, w, c] over n, h, w (BatchNorm statistics, bias and scale gradients)
# at ~1 GB/s as a reduce-window: 38 ms for [128, 32, 32, 64], a tenth of a WRN step's time.
# The same sum as a ones-vector dot runs at memory speed. Both functions below are exact
# sums/broadcasts whose gradients are each other, so the backward passes get dots too.


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


def sum_leading(x: jax.Array) -> jax.Array:
    """x [..., c] -> [c]: the sum over all leading axes (a dot on CPU, `jnp.sum` elsewhere)."""
    if not _on_cpu():
        return x.reshape(-1, x.shape[-1]).sum(axis=0)
    return _sum_leading(x, x.shape)


def broadcast_leading(v: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """v [c] -> `shape` [..., c]; its gradient is `sum_leading` (a dot on CPU)."""
    if not _on_cpu():
        return jnp.broadcast_to(v, shape)
    return _broadcast_leading(v, tuple(shape))
