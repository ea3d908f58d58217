"""Analytic FLOP counts of the benchmarked computations, from the nets' layer shapes.

A layer's cost is its multiply-accumulates (MACs) per image; FLOPs = 2 x MACs. Only the convs
and dense layers are counted (ReLU, pooling, BatchNorm, the loss and the PGD update are left
out). A layer's forward, its gradient with respect to its input and its gradient with respect
to its weights each cost its forward MACs, so:

  attack step (PGD, lipschitz)  forward + input gradient of every layer     = 2 F
  training step                 forward + input gradient of every layer but
                                the first (the data needs none) + weight
                                gradient of every layer                     = 3 F - first

F the sum of the layers' MACs. `python benchmarks/flop_count.py` prints the counts per image
(CNN1's AT step with PGD-10: 551.3 MFLOP, CNN2's: 457.4).
"""

from __future__ import annotations

# The CNNs of jax_robust/models.py and torch_models.py: 3x3 unpadded convs (c<features>),
# 2x2 max-pools, dense layers (d<features>).
CNN_SPECS = {"cnn1": ("c32", "c64", "pool", "d128", "d10"),
             "cnn2": ("c32", "c32", "pool", "c64", "c64", "pool", "d200", "d200", "d10")}
SHAPES = {"cnn1": (28, 28, 1), "cnn2": (28, 28, 1), "wrn": (32, 32, 3)}


def conv_macs(h: int, w: int, c_in: int, c_out: int, kernel: int, stride: int = 1,
              pad: int = 0) -> tuple[int, int, int]:
    """(MACs per image, output height, output width) of a square conv on an h x w x c_in map."""
    h_out = (h + 2 * pad - kernel) // stride + 1
    w_out = (w + 2 * pad - kernel) // stride + 1
    return h_out * w_out * c_out * kernel * kernel * c_in, h_out, w_out


def cnn_layers(arch: str) -> list[tuple[str, int, int, int, int]]:
    """(kind 'conv' or 'dense', input height, input width, input features, output features) of
    each conv and dense layer of CNN1 or CNN2, in order (3x3 unpadded convs)."""
    h, w, c = SHAPES[arch]
    layers = []
    for layer in CNN_SPECS[arch]:
        if layer == "pool":
            h, w = h // 2, w // 2
            continue
        features = int(layer[1:])
        layers.append(("conv" if layer[0] == "c" else "dense", h, w, c, features))
        if layer[0] == "c":
            h, w = h - 2, w - 2
        else:
            h, w = 1, 1
        c = features
    return layers


def cnn_layer_macs(arch: str) -> list[int]:
    """MACs per image of each conv and dense layer of CNN1 or CNN2, in order."""
    return [conv_macs(h, w, c_in, c_out, 3)[0] if kind == "conv" else h * w * c_in * c_out
            for kind, h, w, c_in, c_out in cnn_layers(arch)]


def wrn_layer_macs(depth: int, width: int, num_classes: int = 10) -> list[int]:
    """MACs per image of each conv and dense layer of WRN-depth-width on 32x32x3 (TRADES')."""
    h, w, c = SHAPES["wrn"]
    m, h, w = conv_macs(h, w, c, 16, 3, 1, 1)
    macs, c = [m], 16
    for group, stride in enumerate((1, 2, 2)):
        features = 16 * width * 2**group
        for i in range((depth - 4) // 6):
            s = stride if i == 0 else 1
            if c != features:  # the 1x1 shortcut conv
                macs.append(conv_macs(h, w, c, features, 1, s)[0])
            m, h_out, w_out = conv_macs(h, w, c, features, 3, s, 1)
            macs += [m, conv_macs(h_out, w_out, features, features, 3, 1, 1)[0]]
            h, w, c = h_out, w_out, features
    return macs + [c * num_classes]


def layer_macs(arch: str, wrn_depth: int = 16, wrn_width: int = 4) -> list[int]:
    return wrn_layer_macs(wrn_depth, wrn_width) if arch == "wrn" else cnn_layer_macs(arch)


def attack_step_flops(macs: list[int]) -> int:
    """FLOPs per image of one attack step: forward + input gradient through every layer."""
    return 2 * 2 * sum(macs)


def at_step_flops(macs: list[int], pgd_steps: int) -> int:
    """FLOPs per image of one AT step: `pgd_steps` attack steps + one training step."""
    train = 3 * sum(macs) - macs[0]
    return pgd_steps * attack_step_flops(macs) + 2 * train


def lipschitz_flops(macs: list[int], steps: int = 10) -> int:
    """FLOPs per image of the descent estimate: f(x) once, `steps` attack steps, f(x') once."""
    return steps * attack_step_flops(macs) + 2 * 2 * sum(macs)


if __name__ == "__main__":
    for arch in ("cnn1", "cnn2", "wrn"):
        macs = layer_macs(arch)
        print(f"{arch}: forward {2 * sum(macs) / 1e6:.2f} MFLOP/img, AT step (PGD-10) "
              f"{at_step_flops(macs, 10) / 1e6:.1f} MFLOP/img, lipschitz (10 steps) "
              f"{lipschitz_flops(macs) / 1e6:.1f} MFLOP/img")
