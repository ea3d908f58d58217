"""Flax (Linen) classifiers of the paper, NHWC inputs in [0, 1], raw logits out.

Every module takes `train: bool` explicitly (dropout on, BatchNorm batch statistics) and has
its dropout rate as a field (0 turns it off). Layers and initialisation follow the official
PyTorch code (OFFICIAL_CODE.md, section 2):
  CNN1        conv32-relu-conv64-pool-dropout2d(p/2)-dense128-relu-dropout(p)-dense; p=.5
  CNN2        TRADES' SmallCNN; conv kaiming-normal, last layer zero; dropout .5
  WideResNet  TRADES' pre-activation WRN (depth, width fields; 40-10 is the paper's)
  ResNet50    torchvision's Bottleneck ResNet-50 (Restricted ImageNet at 64x64)
  Linear      one dense layer (tests and closed-form checks)
Flattening is NHWC order; official CNN weights need their fc1 rows permuted from NCHW order.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from jax_robust.errors import UserError
from jax_robust.layers import (NHWC, broadcast_leading, max_pool_2x2, small_input_conv,
                               sum_leading)

# PyTorch's default Linear/Conv init: weights and biases U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
torch_kernel_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")
kaiming_normal_fan_in = nn.initializers.variance_scaling(2.0, "fan_in", "normal")
kaiming_normal_fan_out = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def torch_bias_init(fan_in: int) -> Callable:
    bound = 1.0 / math.sqrt(fan_in)

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


class TorchDense(nn.Module):
    """Dense layer with PyTorch's default initialisation (or zeros)."""

    features: int
    zero_init: bool = False
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        fan_in = x.shape[-1]
        if self.zero_init:
            k_init, b_init = nn.initializers.zeros, nn.initializers.zeros
        else:
            k_init, b_init = torch_kernel_init, torch_bias_init(fan_in)
        return nn.Dense(self.features, kernel_init=k_init, bias_init=b_init, dtype=self.dtype)(x)


class ConvPoolBias(nn.Module):
    """VALID 3x3 conv, 2x2 max-pool, then the bias: pool(conv + b) computed as pool(conv) + b.

    The two are equal bit for bit (adding a per-channel constant commutes with max, and
    rounding is monotone); this order sums the bias gradient over the 4x smaller pooled map.
    Parameters `kernel` [3, 3, C, features] and `bias` [features], as an `nn.Conv`'s.
    """

    features: int
    bias_fan_in: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        kernel = self.param("kernel", torch_kernel_init, (3, 3, x.shape[-1], self.features))
        bias = self.param("bias", torch_bias_init(self.bias_fan_in), (self.features,))
        x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
        y = jax.lax.conv_general_dilated(x, kernel, (1, 1), "VALID", dimension_numbers=NHWC)
        return max_pool_2x2(y) + bias


class CNN1(nn.Module):
    """Official `CNN001` (PyTorch's MNIST example net). Needs inputs of at least 6x6."""

    num_classes: int = 10
    dropout: float = 0.5  # the dense dropout; the conv dropout (channel-wise) is dropout / 2
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool):
        x = x.astype(self.dtype)
        c_in = x.shape[-1]
        x = nn.Conv(32, (3, 3), padding="VALID", kernel_init=torch_kernel_init,
                    bias_init=torch_bias_init(9 * c_in), dtype=self.dtype,
                    conv_general_dilated=small_input_conv)(x)
        x = nn.relu(x)
        # No ReLU after the second conv, as in the official net.
        x = ConvPoolBias(64, 9 * 32, self.dtype, name="Conv_1")(x)
        x = nn.Dropout(self.dropout / 2, broadcast_dims=(1, 2), deterministic=not train)(x)
        x = x.reshape(x.shape[0], -1)
        x = nn.relu(TorchDense(128, dtype=self.dtype)(x))
        x = nn.Dropout(self.dropout, deterministic=not train)(x)
        return TorchDense(self.num_classes, dtype=self.dtype)(x).astype(jnp.float32)


class CNN2(nn.Module):
    """Official `CNN002` = TRADES' SmallCNN. Needs inputs of at least 16x16."""

    num_classes: int = 10
    dropout: float = 0.5
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool):
        x = x.astype(self.dtype)
        for i, features in enumerate((32, 32, 64, 64)):
            x = nn.Conv(features, (3, 3), padding="VALID", kernel_init=kaiming_normal_fan_in,
                        bias_init=nn.initializers.zeros, dtype=self.dtype,
                        conv_general_dilated=small_input_conv if i == 0 else None)(x)
            x = nn.relu(x)
            if i % 2 == 1:
                x = max_pool_2x2(x)
        x = x.reshape(x.shape[0], -1)
        x = nn.relu(TorchDense(200, dtype=self.dtype)(x))
        x = nn.Dropout(self.dropout, deterministic=not train)(x)
        x = nn.relu(TorchDense(200, dtype=self.dtype)(x))
        return TorchDense(self.num_classes, zero_init=True, dtype=self.dtype)(x).astype(
            jnp.float32)


class BatchNorm(nn.Module):
    """`nn.BatchNorm` over every axis but the last, with the same variables and formulas.

    Parameters `scale`, `bias`; `batch_stats` `mean`, `var`. Train mode normalises with the
    batch mean and biased variance (E[x^2] - E[x]^2, as Flax) and updates the running ones
    (running = momentum * running + (1 - momentum) * batch). The per-channel sums and their
    gradients go through `layers.sum_leading` / `broadcast_leading`: dots on CPU, where XLA's
    reductions over [n, h, w] are ~10x slower. Statistics in float32 whatever `dtype` is.
    """

    use_running_average: bool
    momentum: float = 0.9
    epsilon: float = 1e-5
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        c = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (c,))
        bias = self.param("bias", nn.initializers.zeros, (c,))
        ra_mean = self.variable("batch_stats", "mean", lambda: jnp.zeros((c,), jnp.float32))
        ra_var = self.variable("batch_stats", "var", lambda: jnp.ones((c,), jnp.float32))
        xf = x.astype(jnp.promote_types(x.dtype, jnp.float32))
        if self.use_running_average:
            mean, var = ra_mean.value, ra_var.value
        else:
            count = x.size // c
            mean = sum_leading(xf) / count
            var = jnp.maximum(sum_leading(xf * xf) / count - mean * mean, 0.0)
            if not self.is_initializing():
                ra_mean.value = self.momentum * ra_mean.value + (1 - self.momentum) * mean
                ra_var.value = self.momentum * ra_var.value + (1 - self.momentum) * var
        mul = jax.lax.rsqrt(var + self.epsilon) * scale
        y = (xf - broadcast_leading(mean, x.shape)) * broadcast_leading(mul, x.shape)
        return (y + broadcast_leading(bias, x.shape)).astype(self.dtype)


def _batch_norm(train: bool, dtype) -> BatchNorm:
    # PyTorch defaults: momentum 0.1 (Flax 0.9), eps 1e-5.
    return BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5, dtype=dtype)


def _conv(features, kernel, stride=1, pad=None, dtype=jnp.float32, name=None):
    pad = kernel // 2 if pad is None else pad
    return nn.Conv(features, (kernel, kernel), strides=(stride, stride),
                   padding=((pad, pad), (pad, pad)), use_bias=False,
                   kernel_init=kaiming_normal_fan_out, dtype=dtype, name=name)


class WRNBlock(nn.Module):
    """TRADES' pre-activation BasicBlock."""

    features: int
    stride: int
    dropout: float
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool):
        equal = x.shape[-1] == self.features
        act = nn.relu(_batch_norm(train, self.dtype)(x))
        shortcut = x if equal else _conv(self.features, 1, self.stride, 0, self.dtype)(act)
        y = _conv(self.features, 3, self.stride, 1, self.dtype)(act)
        y = nn.relu(_batch_norm(train, self.dtype)(y))
        if self.dropout > 0:
            y = nn.Dropout(self.dropout, deterministic=not train)(y)
        y = _conv(self.features, 3, 1, 1, self.dtype)(y)
        return shortcut + y


class WideResNet(nn.Module):
    """WRN-depth-width (TRADES' code); depth = 6n + 4. Built for 32x32 inputs."""

    num_classes: int = 10
    depth: int = 40
    width: int = 10
    dropout: float = 0.0
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool):
        n = (self.depth - 4) // 6
        x = _conv(16, 3, 1, 1, self.dtype)(x.astype(self.dtype))
        for group, stride in enumerate((1, 2, 2)):
            for i in range(n):
                x = WRNBlock(16 * self.width * 2**group, stride if i == 0 else 1,
                             self.dropout, self.dtype)(x, train)
        x = nn.relu(_batch_norm(train, self.dtype)(x))
        x = x.mean(axis=(1, 2))
        return nn.Dense(self.num_classes, kernel_init=torch_kernel_init,
                        bias_init=nn.initializers.zeros, dtype=self.dtype)(x).astype(jnp.float32)


class Bottleneck(nn.Module):
    """torchvision Bottleneck (stride on the 3x3 conv); dropout before conv3 if p > 0."""

    features: int
    stride: int
    dropout: float
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool):
        out_features = 4 * self.features
        y = nn.relu(_batch_norm(train, self.dtype)(_conv(self.features, 1, 1, 0, self.dtype)(x)))
        y = _conv(self.features, 3, self.stride, 1, self.dtype)(y)
        y = nn.relu(_batch_norm(train, self.dtype)(y))
        if self.dropout > 0:
            y = nn.Dropout(self.dropout, deterministic=not train)(y)
        y = _batch_norm(train, self.dtype)(_conv(out_features, 1, 1, 0, self.dtype)(y))
        if self.stride != 1 or x.shape[-1] != out_features:
            x = _batch_norm(train, self.dtype)(
                _conv(out_features, 1, self.stride, 0, self.dtype)(x))
        return nn.relu(x + y)


class ResNet50(nn.Module):
    """ResNet-50 as the official `resnet.py`: dropout only in the non-first block of a stage."""

    num_classes: int = 9
    dropout: float = 0.0
    stage_sizes: tuple[int, ...] = (3, 4, 6, 3)
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool):
        x = _conv(64, 7, 2, 3, self.dtype)(x.astype(self.dtype))
        x = nn.relu(_batch_norm(train, self.dtype)(x))
        x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
        for stage, blocks in enumerate(self.stage_sizes):
            for i in range(blocks):
                x = Bottleneck(64 * 2**stage, 2 if (i == 0 and stage > 0) else 1,
                               self.dropout if i > 0 else 0.0, self.dtype)(x, train)
        x = x.mean(axis=(1, 2))
        return TorchDense(self.num_classes, dtype=self.dtype)(x).astype(jnp.float32)


class Linear(nn.Module):
    """Logits = W flatten(x) + b; for tests with closed-form answers."""

    num_classes: int = 10
    dropout: float = 0.0
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool):
        del train
        return nn.Dense(self.num_classes)(x.reshape(x.shape[0], -1))


OFFICIAL_DROPOUT = {"cnn1": 0.5, "cnn2": 0.5, "wrn": 0.0, "resnet50": 0.0, "linear": 0.0}
MIN_SIZE = {"cnn1": 6, "cnn2": 16, "wrn": 8, "resnet50": 32, "linear": 1}


def check_input_size(arch: str, image_shape: tuple[int, int, int]) -> None:
    """Raises UserError when `arch` cannot take images of `image_shape` (H, W, C)."""
    h, w = image_shape[:2]
    need = MIN_SIZE[arch]
    if min(h, w) < need:
        raise UserError(
            f"arch {arch} needs images of at least {need}x{need}, the data are {h}x{w}; "
            f"use --arch=cnn1 for 8x8 digits"
        )


def build_model(arch: str, num_classes: int, image_shape: tuple[int, int, int],
                dropout: float | None = None, wrn_depth: int = 40, wrn_width: int = 10,
                dtype: str = "float32") -> nn.Module:
    """The Flax module for `arch`; `dropout` None means the official rate."""
    if arch not in OFFICIAL_DROPOUT:
        raise UserError(f"unknown arch {arch!r}; choose one of {', '.join(OFFICIAL_DROPOUT)}")
    check_input_size(arch, image_shape)
    p = OFFICIAL_DROPOUT[arch] if dropout is None else dropout
    dt = jnp.bfloat16 if dtype == "bfloat16" else jnp.float32
    if arch == "cnn1":
        return CNN1(num_classes, p, dt)
    if arch == "cnn2":
        return CNN2(num_classes, p, dt)
    if arch == "wrn":
        if (wrn_depth - 4) % 6 or wrn_depth < 10 or wrn_width < 1:
            raise UserError(f"WideResNet depth must be 6n+4 (n >= 1), got {wrn_depth}")
        return WideResNet(num_classes, wrn_depth, wrn_width, p, dt)
    if arch == "resnet50":
        return ResNet50(num_classes, p, dtype=dt)
    return Linear(num_classes)


# A model function: (params, model_state, x [B,H,W,C], train, key) -> (logits [B,K], model_state)
ModelFn = Callable[[Any, Any, jax.Array, bool, jax.Array], tuple[jax.Array, Any]]


def make_model_fn(module: nn.Module) -> ModelFn:
    """Wraps a Linen module into the pure function every objective and attack calls.

    `model_state` holds the BatchNorm statistics ({} for nets without BatchNorm); in train
    mode it comes back updated, in eval mode unchanged. `key` drives dropout (train mode).
    """

    def model_fn(params, model_state, x, train, key):
        variables = {"params": params, **model_state}
        if train and model_state:
            logits, updates = module.apply(variables, x, train=True, rngs={"dropout": key},
                                           mutable=list(model_state))
            return logits, {**model_state, **updates}
        rngs = {"dropout": key} if train else {}
        return module.apply(variables, x, train=train, rngs=rngs), model_state

    return model_fn


def init_model(module: nn.Module, key: jax.Array, image_shape) -> tuple[Any, Any]:
    """(params, model_state) for `module` on inputs of `image_shape` (H, W, C)."""
    variables = module.init({"params": key}, jnp.zeros((1, *image_shape), jnp.float32),
                            train=False)
    params = variables.pop("params")
    return params, dict(variables)


def count_params(params) -> int:
    return sum(int(p.size) for p in jax.tree_util.tree_leaves(params))
