"""Flax (Linen) classifiers of the paper, NHWC inputs in [0, 1], raw logits out.

Every module takes `train: bool` explicitly (dropout on, BatchNorm batch statistics) and has
its dropout rate as a field (0 turns it off), and its speed options (config.SpeedConfig,
layers.py) as the field `speed`: they change how it is computed, never the values. Layers and
initialisation follow the official PyTorch code (docs/official_code.md, section 3):
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

from jax_robust.config import PLAIN_SPEED, SpeedConfig
from jax_robust.errors import UserError
from jax_robust.layers import (BatchNorm, ConvPool, first_conv_fn, later_conv_fn, onednn_conv,
                               pool_2x2)

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


class _CNN(nn.Module):
    """The fields of the MNIST nets. How each layer is computed is `speed`'s choice, made
    inside the layers (layers.ConvPool, first_conv_fn, later_conv_fn), never here."""

    num_classes: int = 10
    dropout: float = 0.5  # CNN1: the dense dropout; its conv dropout (channel-wise) is half
    dtype: Any = jnp.float32
    speed: SpeedConfig = PLAIN_SPEED
    pool_ties: str = "split"  # gradient of tied maxima: 'split' (JAX) or 'first' (PyTorch)

    def conv(self, features: int, first: bool, init, bias_init, name: str) -> nn.Conv:
        """A VALID 3x3 conv (the first conv of a net: `first`)."""
        conv_fn = (first_conv_fn(self.speed.first_conv_grad, self.speed.conv_kernels) if first
                   else later_conv_fn(self.speed.conv_input_grad, self.speed.conv_kernels))
        return nn.Conv(features, (3, 3), padding="VALID", kernel_init=init,
                       bias_init=bias_init, dtype=self.dtype, conv_general_dilated=conv_fn,
                       name=name)

    def relu_conv_pool(self, features: int, init, bias_init, name: str,
                       bias_after_pool: bool | None = None) -> ConvPool:
        """ReLU, VALID 3x3 conv, 2x2 max-pool (named as the nn.Conv it stands for: the same
        parameter path, so the same initial values)."""
        return ConvPool(features, init, bias_init, self.speed, self.pool_ties, self.dtype,
                        relu_input=True, bias_after_pool=bias_after_pool, name=name)


class CNN1(_CNN):
    """Official `CNN001` (PyTorch's MNIST example net): conv 32, ReLU, conv 64, max-pool,
    dropout, dense 128, ReLU, dropout, dense. Needs inputs of at least 6x6."""

    @nn.compact
    def __call__(self, x, train: bool):
        x = x.astype(self.dtype)
        x = self.conv(32, True, torch_kernel_init, torch_bias_init(9 * x.shape[-1]),
                      "Conv_0")(x)
        # No ReLU after the second conv, as in the official net.
        x = self.relu_conv_pool(64, torch_kernel_init, torch_bias_init(9 * 32), "Conv_1")(x)
        x = nn.Dropout(self.dropout / 2, broadcast_dims=(1, 2), deterministic=not train)(x)
        x = x.reshape(x.shape[0], -1)
        x = nn.relu(TorchDense(128, dtype=self.dtype)(x))
        x = nn.Dropout(self.dropout, deterministic=not train)(x)
        return TorchDense(self.num_classes, dtype=self.dtype)(x).astype(jnp.float32)


class CNN2(_CNN):
    """Official `CNN002` = TRADES' SmallCNN: (conv 32, ReLU) x 2, max-pool, (conv 64, ReLU)
    x 2, max-pool, dense 200, ReLU, dropout, dense 200, ReLU, dense. Written as conv, [ReLU,
    conv, pool], ReLU: relu(pool(z)) = pool(relu(z)) (both monotone), so the bracket is one
    layers.ConvPool. Needs inputs of at least 16x16."""

    @nn.compact
    def __call__(self, x, train: bool):
        x = x.astype(self.dtype)
        init, zeros = kaiming_normal_fan_in, nn.initializers.zeros
        x = self.conv(32, True, init, zeros, "Conv_0")(x)
        x = nn.relu(self.relu_conv_pool(32, init, zeros, "Conv_1", bias_after_pool=True)(x))
        x = self.conv(64, False, init, zeros, "Conv_2")(x)
        x = nn.relu(self.relu_conv_pool(64, init, zeros, "Conv_3", bias_after_pool=True)(x))
        x = x.reshape(x.shape[0], -1)
        x = nn.relu(TorchDense(200, dtype=self.dtype)(x))
        x = nn.Dropout(self.dropout, deterministic=not train)(x)
        x = nn.relu(TorchDense(200, dtype=self.dtype)(x))
        return TorchDense(self.num_classes, zero_init=True, dtype=self.dtype)(x).astype(
            jnp.float32)


def _batch_norm(train: bool, dtype, speed: SpeedConfig) -> BatchNorm:
    # PyTorch defaults: momentum 0.1 (Flax 0.9), eps 1e-5.
    return BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5, dtype=dtype,
                     channel_sums=speed.channel_sums)


def _conv(features, kernel, stride, pad, dtype, speed: SpeedConfig):
    """A bias-free square conv of the residual nets; speed.conv_kernels picks its kernels."""
    return nn.Conv(features, (kernel, kernel), strides=(stride, stride),
                   padding=((pad, pad), (pad, pad)), use_bias=False,
                   kernel_init=kaiming_normal_fan_out, dtype=dtype,
                   conv_general_dilated=onednn_conv if speed.conv_kernels == "onednn" else None)


class _Block(nn.Module):
    """The fields of a residual block, and its BatchNorm (call inside `__call__`)."""

    features: int
    stride: int
    dropout: float
    dtype: Any = jnp.float32
    speed: SpeedConfig = PLAIN_SPEED

    def norm(self, x, train: bool):
        return _batch_norm(train, self.dtype, self.speed)(x)


class WRNBlock(_Block):
    """TRADES' pre-activation BasicBlock."""

    @nn.compact
    def __call__(self, x, train: bool):
        equal = x.shape[-1] == self.features
        act = nn.relu(self.norm(x, train))
        shortcut = (x if equal else
                    _conv(self.features, 1, self.stride, 0, self.dtype, self.speed)(act))
        y = _conv(self.features, 3, self.stride, 1, self.dtype, self.speed)(act)
        y = nn.relu(self.norm(y, train))
        if self.dropout > 0:
            y = nn.Dropout(self.dropout, deterministic=not train)(y)
        y = _conv(self.features, 3, 1, 1, self.dtype, self.speed)(y)
        return shortcut + y


class WideResNet(nn.Module):
    """WRN-depth-width (TRADES' code); depth = 6n + 4. Built for 32x32 inputs."""

    num_classes: int = 10
    depth: int = 40
    width: int = 10
    dropout: float = 0.0
    dtype: Any = jnp.float32
    speed: SpeedConfig = PLAIN_SPEED

    @nn.compact
    def __call__(self, x, train: bool):
        n = (self.depth - 4) // 6
        x = _conv(16, 3, 1, 1, self.dtype, self.speed)(x.astype(self.dtype))
        for group, stride in enumerate((1, 2, 2)):
            for i in range(n):
                x = WRNBlock(16 * self.width * 2**group, stride if i == 0 else 1,
                             self.dropout, self.dtype, self.speed)(x, train)
        x = nn.relu(_batch_norm(train, self.dtype, self.speed)(x))
        x = x.mean(axis=(1, 2))
        return nn.Dense(self.num_classes, kernel_init=torch_kernel_init,
                        bias_init=nn.initializers.zeros, dtype=self.dtype)(x).astype(jnp.float32)


class Bottleneck(_Block):
    """torchvision Bottleneck (stride on the 3x3 conv); dropout before conv3 if p > 0."""

    @nn.compact
    def __call__(self, x, train: bool):
        out_features = 4 * self.features
        y = nn.relu(self.norm(_conv(self.features, 1, 1, 0, self.dtype, self.speed)(x), train))
        y = _conv(self.features, 3, self.stride, 1, self.dtype, self.speed)(y)
        y = nn.relu(self.norm(y, train))
        if self.dropout > 0:
            y = nn.Dropout(self.dropout, deterministic=not train)(y)
        y = self.norm(_conv(out_features, 1, 1, 0, self.dtype, self.speed)(y), train)
        if self.stride != 1 or x.shape[-1] != out_features:
            x = self.norm(_conv(out_features, 1, self.stride, 0, self.dtype, self.speed)(x),
                          train)
        return nn.relu(x + y)


class ResNet50(nn.Module):
    """ResNet-50 as the official `resnet.py`: dropout only in the non-first block of a stage."""

    num_classes: int = 9
    dropout: float = 0.0
    stage_sizes: tuple[int, ...] = (3, 4, 6, 3)
    dtype: Any = jnp.float32
    speed: SpeedConfig = PLAIN_SPEED

    @nn.compact
    def __call__(self, x, train: bool):
        x = _conv(64, 7, 2, 3, self.dtype, self.speed)(x.astype(self.dtype))
        x = nn.relu(_batch_norm(train, self.dtype, self.speed)(x))
        x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
        for stage, blocks in enumerate(self.stage_sizes):
            for i in range(blocks):
                x = Bottleneck(64 * 2**stage, 2 if (i == 0 and stage > 0) else 1,
                               self.dropout if i > 0 else 0.0, self.dtype, self.speed)(x, train)
        x = x.mean(axis=(1, 2))
        return TorchDense(self.num_classes, dtype=self.dtype)(x).astype(jnp.float32)


class Linear(nn.Module):
    """Logits = W flatten(x) + b; for tests with closed-form answers."""

    num_classes: int = 10

    @nn.compact
    def __call__(self, x, train: bool):
        del train
        return nn.Dense(self.num_classes)(x.reshape(x.shape[0], -1))


MIN_SIZE = {"cnn1": 6, "cnn2": 16, "wrn": 16, "resnet50": 32, "linear": 1}


def check_input_size(arch: str, image_shape: tuple[int, int, int]) -> None:
    """Raises UserError when `arch` cannot take images of `image_shape` (H, W, C)."""
    h, w = image_shape[:2]
    need = MIN_SIZE[arch]
    if min(h, w) < need:
        fits = [a for a, n in MIN_SIZE.items() if n <= min(h, w)]
        raise UserError(
            f"arch {arch} needs images of at least {need}x{need}, the data are {h}x{w}; "
            f"archs that take {h}x{w} images: {', '.join(fits)}"
        )


def build_model(arch: str, num_classes: int, image_shape: tuple[int, int, int], *,
                dropout: float, wrn_depth: int = 40, wrn_width: int = 10,
                dtype: str = "float32", speed: SpeedConfig = PLAIN_SPEED,
                pool_ties: str = "split") -> nn.Module:
    """The Flax module for `arch` (config.ARCHS) on images of `image_shape` (H, W, C);
    `pool_ties` applies to the CNNs' 2x2 max-pools."""
    if arch not in MIN_SIZE:
        raise UserError(f"unknown arch {arch!r}; choose one of {', '.join(MIN_SIZE)}")
    check_input_size(arch, image_shape)
    dt = jnp.bfloat16 if dtype == "bfloat16" else jnp.float32
    if arch == "cnn1":
        return CNN1(num_classes, dropout, dt, speed, pool_ties)
    if arch == "cnn2":
        return CNN2(num_classes, dropout, dt, speed, pool_ties)
    if arch == "wrn":
        if (wrn_depth - 4) % 6 or wrn_depth < 10 or wrn_width < 1:
            raise UserError(f"WideResNet depth must be 6n+4 (n >= 1), got {wrn_depth}")
        return WideResNet(num_classes, wrn_depth, wrn_width, dropout, dt, speed)
    if arch == "resnet50":
        return ResNet50(num_classes, dropout, dtype=dt, speed=speed)
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


# XLA:CPU options of the one-off init program: fast to compile, the default's values.
INIT_COMPILER_OPTIONS = {"xla_backend_optimization_level": 1}


def init_model(module: nn.Module, key: jax.Array, image_shape) -> tuple[Any, Any]:
    """(params, model_state) for `module` on inputs of `image_shape` (H, W, C)."""
    # One compiled program: run eagerly, init compiles every initializer op on its own
    # (about 80 small programs and 7 s for a WRN-16-2). It runs once, so it is compiled at
    # LLVM level 1: the same bits, 2-4x less compile time (docs/history.md, "Session 8";
    # tests/test_models.py checks the bits).
    init = jax.jit(lambda k: module.init(
        {"params": k}, jnp.zeros((1, *image_shape), jnp.float32), train=False))
    options = INIT_COMPILER_OPTIONS if jax.default_backend() == "cpu" else None
    variables = init.lower(key).compile(compiler_options=options)(key)
    params = variables.pop("params")
    return params, dict(variables)


def count_params(params) -> int:
    return sum(int(p.size) for p in jax.tree_util.tree_leaves(params))
