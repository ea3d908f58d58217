"""In-process speed levers of the JAX step, applied by patching while a step is built and traced.

A variant is '+'-joined lever names ("base" = the library as it is). The library already has
three levers of its own (jax_robust/layers.py, models.py); these variants take them back out:
  xlapool     `max_pool_2x2` as a plain reshape-and-max left to autodiff (the library's takes
              the max of the four window corners and has a custom VJP)
  xlaconv     the first conv's input gradient left to XLA (the library's `small_input_conv`
              computes it as one matmul plus an overlap-add of the kh*kw taps)
  biasfirst   CNN1 adds its conv2 bias before the pool, as the official net is written (the
              library adds it after: pool(z) + b = pool(z + b) exactly, and the bias gradient
              then sums the 4x smaller pooled map)
  flaxbn      `nn.BatchNorm` (XLA reductions) in place of the library's `models.BatchNorm`
              (per-channel sums and their gradients as ones-vector dots)
and these try others:
  rolled      PGD loop as a rolled `lax.fori_loop` (the library unrolls it)
  nnpool      `nn.max_pool` instead of the library's `max_pool_2x2`
  flipconv    stride-1 NHWC/HWIO convolutions with a custom VJP: the input gradient is a plain
              forward convolution of the padded cotangent with the flipped, in/out-swapped kernel
              (physically transposed, canonical dimension numbers); the kernel gradient is JAX's
  poolidx     `max_pool_2x2` with PyTorch's gradient: all of g to the FIRST maximum of each window
              (row-major), from a saved int8 window index: the backward reads g and the index
              only, not the input again
  biasdot     the transpose of an implicit broadcast over leading axes (a bias add's bias
              gradient: a column sum over N*H*W) as ones[1, N*H*W] @ g[N*H*W, C], a dot,
              instead of XLA's reduce (~10x slower on CPU for [128, 24, 24, 64]); big ones only
  relupool    CNN2 pools before its ReLU: relu(pool(conv)) = pool(relu(conv)) exactly, values
              and gradients (max and ReLU commute); the ReLU then runs on the pooled map
  nodonate    the step jitted without donating the state
  rbg, unsafe_rbg, threefry   the PRNG implementation of the step's key
Patches are undone when the `patched` context exits; tracing (`.lower`) must happen inside it.
"""

from __future__ import annotations

import contextlib
import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from jax_robust import layers, models

LEVERS = ("xlapool", "xlaconv", "biasfirst", "flaxbn", "rolled", "nnpool", "flipconv", "poolidx", "biasdot",
          "relupool", "nodonate", "rbg", "unsafe_rbg", "threefry")
_ORIG_CONV = jax.lax.conv_general_dilated
_ORIG_FORI = jax.lax.fori_loop
_ORIG_JIT = jax.jit
_NHWC = ("NHWC", "HWIO", "NHWC")


def parse(variant: str) -> set[str]:
    parts = set() if variant == "base" else set(variant.split("+"))
    unknown = parts - set(LEVERS)
    if unknown:
        raise ValueError(f"unknown levers {sorted(unknown)}; choose from {LEVERS}")
    return parts


def prng_impl(variant: str) -> str | None:
    impls = parse(variant) & {"rbg", "unsafe_rbg", "threefry"}
    return impls.pop() if impls else None


def _flip_conv_fn(padding):
    """Stride-1 NHWC/HWIO conv with explicit `padding`; input VJP: the flipped-kernel conv."""

    def conv(x, w):
        return _ORIG_CONV(x, w, (1, 1), padding, dimension_numbers=_NHWC)

    @jax.custom_vjp
    def f(x, w):
        return conv(x, w)

    def fwd(x, w):
        return conv(x, w), (x, w)

    def bwd(res, g):
        x, w = res
        kh, kw = w.shape[:2]
        w_t = jnp.flip(w, (0, 1)).swapaxes(2, 3)  # [kh, kw, out, in]: an HWIO kernel
        pads = ((kh - 1 - padding[0][0], kh - 1 - padding[0][1]),
                (kw - 1 - padding[1][0], kw - 1 - padding[1][1]))
        gx = _ORIG_CONV(g, w_t, (1, 1), pads, dimension_numbers=_NHWC)
        gw = jax.vjp(lambda w_: conv(x, w_), w)[1](g)[0]
        return gx, gw

    f.defvjp(fwd, bwd)
    return f


def flipconv(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
             dimension_numbers=None, feature_group_count=1, batch_group_count=1, **kw):
    """lax.conv_general_dilated; plain stride-1 NHWC/HWIO convs get the flipped-kernel VJP."""
    dn = jax.lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
    plain = (lhs.ndim == 4 and dn == jax.lax.conv_dimension_numbers(lhs.shape, rhs.shape, _NHWC)
             and tuple(window_strides) == (1, 1) and feature_group_count == 1
             and batch_group_count == 1 and not kw.get("preferred_element_type")
             and all(d in (None, 1) for d in (lhs_dilation or ()) + (rhs_dilation or ())))
    if plain:
        pads = (jax.lax.padtype_to_pads(lhs.shape[1:3], rhs.shape[:2], (1, 1), padding)
                if isinstance(padding, str) else padding)
        pads = tuple(tuple(p) for p in pads)
        if all(0 <= p <= k - 1 for (lo, hi), k in zip(pads, rhs.shape[:2]) for p in (lo, hi)):
            return _flip_conv_fn(pads)(lhs, rhs)
    return _ORIG_CONV(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
                      dimension_numbers, feature_group_count, batch_group_count, **kw)


def autodiff_max_pool_2x2(x):
    """Reshape-and-max, its gradient left to autodiff (the library before its custom VJP)."""
    n, h, w, c = x.shape
    return x[:, : h // 2 * 2, : w // 2 * 2].reshape(n, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))


@jax.custom_vjp
def idx_max_pool_2x2(x):
    return autodiff_max_pool_2x2(x)


def _idx_fwd(x):
    a, b, c, d = layers._corners(x)  # the library's window corners
    m = jnp.maximum(jnp.maximum(a, b), jnp.maximum(c, d))
    first = jnp.where(a == m, 0, jnp.where(b == m, 1, jnp.where(c == m, 2, 3))).astype(jnp.int8)
    return m, (first, x.shape)


def _idx_bwd(res, g):
    first, (n, h, w, c) = res
    pos = (2 * jnp.arange(2)[:, None] + jnp.arange(2)[None, :]).astype(jnp.int8)  # [2, 2]
    hit = first[:, :, None, :, None, :] == pos[None, None, :, None, :, None]
    gx = jnp.where(hit, g[:, :, None, :, None, :], 0.0).reshape(n, h // 2 * 2, w // 2 * 2, c)
    if (h % 2) or (w % 2):
        gx = jnp.pad(gx, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)))
    return (gx,)


idx_max_pool_2x2.defvjp(_idx_fwd, _idx_bwd)


class BiasFirstCNN1(models.CNN1):
    """CNN1 as the official net is written: conv2's bias added before the pool."""

    @nn.compact
    def __call__(self, x, train: bool):
        x = x.astype(self.dtype)
        c_in = x.shape[-1]
        x = nn.Conv(32, (3, 3), padding="VALID", kernel_init=models.torch_kernel_init,
                    bias_init=models.torch_bias_init(9 * c_in), dtype=self.dtype,
                    conv_general_dilated=models.small_input_conv)(x)
        x = nn.Conv(64, (3, 3), padding="VALID", kernel_init=models.torch_kernel_init,
                    bias_init=models.torch_bias_init(9 * 32), dtype=self.dtype)(nn.relu(x))
        x = models.max_pool_2x2(x)
        x = nn.Dropout(self.dropout / 2, broadcast_dims=(1, 2), deterministic=not train)(x)
        x = x.reshape(x.shape[0], -1)
        x = nn.relu(models.TorchDense(128, dtype=self.dtype)(x))
        x = nn.Dropout(self.dropout, deterministic=not train)(x)
        return models.TorchDense(self.num_classes, dtype=self.dtype)(x).astype(jnp.float32)


class ReluPoolCNN2(models.CNN2):
    """CNN2 with relu(pool(conv)) in place of pool(relu(conv)); same parameters and outputs."""

    @nn.compact
    def __call__(self, x, train: bool):
        x = x.astype(self.dtype)
        for i, features in enumerate((32, 32, 64, 64)):
            x = nn.Conv(features, (3, 3), padding="VALID",
                        kernel_init=models.kaiming_normal_fan_in,
                        bias_init=nn.initializers.zeros, dtype=self.dtype,
                        conv_general_dilated=models.small_input_conv if i == 0 else None)(x)
            x = nn.relu(models.max_pool_2x2(x) if i % 2 == 1 else x)
        x = x.reshape(x.shape[0], -1)
        x = nn.relu(models.TorchDense(200, dtype=self.dtype)(x))
        x = nn.Dropout(self.dropout, deterministic=not train)(x)
        x = nn.relu(models.TorchDense(200, dtype=self.dtype)(x))
        return models.TorchDense(self.num_classes, zero_init=True, dtype=self.dtype)(x).astype(
            jnp.float32)


def _unbroadcast_dot(aval, x, _orig=None):
    """lax's `_unbroadcast` (the transpose of an implicit broadcast, e.g. a bias add): a
    ones-vector dot instead of reduce_sum when it sums the leading axes of a large x."""
    shape = getattr(aval, "shape", None)
    if shape and x.size >= 65536 and len(shape) == x.ndim and tuple(shape) != x.shape:
        lead = next((i for i in range(x.ndim) if shape[i] != 1), x.ndim)
        if lead > 0 and tuple(shape[lead:]) == x.shape[lead:]:
            rows = int(math.prod(x.shape[:lead]))
            out = jnp.ones((1, rows), x.dtype) @ x.reshape(rows, -1)
            return out.reshape(shape)
    return _orig(aval, x)


def _rolled_fori(lower, upper, body, init, *, unroll=None):
    del unroll
    return _ORIG_FORI(lower, upper, body, init)


def _jit_no_donate(fun, **kw):
    kw.pop("donate_argnums", None)
    return _ORIG_JIT(fun, **kw)


@contextlib.contextmanager
def patched(variant: str):
    parts = parse(variant)
    saved = []

    def patch(obj, name, value):
        saved.append((obj, name, getattr(obj, name)))
        setattr(obj, name, value)

    if "rolled" in parts:
        patch(jax.lax, "fori_loop", _rolled_fori)
    if "xlapool" in parts:
        patch(models, "max_pool_2x2", autodiff_max_pool_2x2)
    if "nnpool" in parts:
        patch(models, "max_pool_2x2", functools.partial(nn.max_pool, window_shape=(2, 2),
                                                        strides=(2, 2)))
    if "poolidx" in parts:
        patch(models, "max_pool_2x2", idx_max_pool_2x2)
    if "xlaconv" in parts:
        patch(models, "small_input_conv", None)  # nn.Conv's default: lax.conv_general_dilated
    if "biasfirst" in parts:
        patch(models, "CNN1", BiasFirstCNN1)
    if "flaxbn" in parts:
        patch(models, "BatchNorm", nn.BatchNorm)
    if "biasdot" in parts:
        from jax._src.lax import lax as lax_internal

        patch(lax_internal, "_unbroadcast", functools.partial(
            _unbroadcast_dot, _orig=lax_internal._unbroadcast))
    if "relupool" in parts:
        patch(models, "CNN2", ReluPoolCNN2)
    if "flipconv" in parts:
        patch(jax.lax, "conv_general_dilated", flipconv)
    if "nodonate" in parts:
        patch(jax, "jit", _jit_no_donate)
    try:
        yield
    finally:
        for obj, name, value in reversed(saved):
            setattr(obj, name, value)
