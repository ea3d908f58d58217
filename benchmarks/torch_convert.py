"""JAX -> PyTorch weights for the CNNs (jax_robust.models.CNN1 / CNN2 -> torch_models.CNN1 /
CNN2), so the same trained net can be attacked by both frameworks (benchmarks/autoattack.py,
tests/test_autoattack.py).

    from torch_convert import to_torch
    net = to_torch("cnn1", variables["params"], image_shape=(28, 28, 1), num_classes=10)
    logits = net(torch.from_numpy(x_nhwc.transpose(0, 3, 1, 2)))    # NCHW in [0, 1]

Layouts: Flax convs are cross-correlations with HWIO kernels, PyTorch's OIHW (transpose (3, 2,
0, 1)); Flax Dense kernels are [in, out], nn.Linear weights [out, in] (transpose). The first
dense layer after the convs reads the feature map flattened in NHWC order (h, w, c) on the JAX
side and NCHW order (c, h, w) on the PyTorch side: its rows are permuted accordingly. Layer
order: CNN1 conv32-relu-conv64-pool-fc128-relu-fc (no ReLU after conv2, on both sides; the
JAX side may add conv2's bias after the pool, which is the same function); CNN2 (TRADES'
SmallCNN) conv32-conv32-pool-conv64-conv64-pool-fc200-fc200-fc, ReLUs after every conv and
the first two dense layers. Dropout is off in eval mode on both sides; the returned module is
in eval mode, float32.
"""

from __future__ import annotations

import os
import sys

import numpy as np
import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import torch_models  # noqa: E402

CONVS = {"cnn1": ("Conv_0", "Conv_1"), "cnn2": ("Conv_0", "Conv_1", "Conv_2", "Conv_3")}
DENSES = {"cnn1": ("TorchDense_0", "TorchDense_1"),
          "cnn2": ("TorchDense_0", "TorchDense_1", "TorchDense_2")}


def conv_weight(kernel) -> torch.Tensor:
    """Flax conv kernel [kh, kw, in, out] -> PyTorch Conv2d weight [out, in, kh, kw]."""
    return torch.from_numpy(np.ascontiguousarray(np.asarray(kernel, np.float32).transpose(
        3, 2, 0, 1)))


def dense_weight(kernel, feature_map: tuple[int, int, int] | None = None) -> torch.Tensor:
    """Flax Dense kernel [in, out] -> nn.Linear weight [out, in]. With `feature_map` (h, w, c)
    the input is a flattened NHWC feature map: rows are reordered to NCHW's (c, h, w)."""
    k = np.asarray(kernel, np.float32)
    if feature_map is not None:
        h, w, c = feature_map
        k = k.reshape(h, w, c, -1).transpose(2, 0, 1, 3).reshape(h * w * c, -1)
    return torch.from_numpy(np.ascontiguousarray(k.T))


def feature_map_shape(arch: str, image_shape: tuple[int, int, int]) -> tuple[int, int, int]:
    """(h, w, c) of the last conv block's output (after its pool) on images (H, W, C)."""
    h, w = image_shape[:2]
    if arch == "cnn1":
        return (h - 4) // 2, (w - 4) // 2, 64
    return ((h - 4) // 2 - 4) // 2, ((w - 4) // 2 - 4) // 2, 64


def to_torch(arch: str, params, image_shape: tuple[int, int, int], num_classes: int
             ) -> nn.Module:
    """torch_models.CNN1 / CNN2 (eval mode) carrying the Flax `params` of models.CNN1 / CNN2
    trained on images of `image_shape` (H, W, C)."""
    if arch not in CONVS:
        raise ValueError(f"only cnn1 and cnn2 convert, not {arch!r}")
    fmap = feature_map_shape(arch, image_shape)
    flat = int(np.prod(fmap))
    in_channels = image_shape[2]
    if arch == "cnn1":
        net = torch_models.CNN1(num_classes, in_channels)
        net.fc1 = nn.Linear(flat, 128)  # the class assumes 28x28 inputs (9216 features)
        convs, linears = [net.conv1, net.conv2], [net.fc1, net.fc2]
    else:
        net = torch_models.CNN2(num_classes, in_channels)
        net.classifier[0] = nn.Linear(flat, 200)
        convs = [m for m in net.features if isinstance(m, nn.Conv2d)]
        linears = [m for m in net.classifier if isinstance(m, nn.Linear)]
    with torch.no_grad():
        for module, name in zip(convs, CONVS[arch]):
            module.weight.copy_(conv_weight(params[name]["kernel"]))
            module.bias.copy_(torch.from_numpy(np.array(params[name]["bias"], np.float32)))
        for i, (module, name) in enumerate(zip(linears, DENSES[arch])):
            dense = params[name]["Dense_0"]
            module.weight.copy_(dense_weight(dense["kernel"], fmap if i == 0 else None))
            module.bias.copy_(torch.from_numpy(np.array(dense["bias"], np.float32)))
    return net.eval()


def nchw(x_nhwc: np.ndarray) -> torch.Tensor:
    """NHWC NumPy images -> a contiguous NCHW float32 tensor."""
    return torch.from_numpy(np.ascontiguousarray(np.asarray(x_nhwc, np.float32).transpose(
        0, 3, 1, 2)))
