"""PyTorch baselines for the speed benchmarks: the official nets and the official procedures.

  CNN1        lolip `CNN001` (docs/official_code.md section 3): conv32-relu-conv64-pool-dropout2d(.25)
              -dense128-relu-dropout(.5)-dense10
  CNN2        lolip `CNN002` = TRADES `SmallCNN`
  WideResNet  TRADES `wideresnet.py` (pre-activation BasicBlocks; depth 6n+4, widen factor)
  at_step     one adversarial-training step (docs/official_code.md sections 6-7): PGD on mean CE from
              x + U(-eps, eps) clipped to [0, 1]; sign steps; clip, project, clip; then CE of
              the adversarial batch, backward, optimizer step
  lipschitz   `estimate_local_lip_v2` (docs/official_code.md section 11) on one batch
  MODES       the ways of running them that the benchmarks time (eager or `torch.compile`,
              NCHW or channels_last, weights' requires_grad on or off in the attack); `prepare`
Inputs are NCHW in [0, 1] (PyTorch's layout); the JAX side takes the same data as NHWC.
"""

from __future__ import annotations

import contextlib
import dataclasses
import sys

import torch
import torch.nn.functional as F
from torch import nn

import bench_util


class CNN1(nn.Module):
    def __init__(self, num_classes=10, in_channels=1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 32, 3)
        self.conv2 = nn.Conv2d(32, 64, 3)
        self.dropout1 = nn.Dropout2d(0.25)
        self.dropout2 = nn.Dropout(0.5)  # the official Dropout2d on a 2-D tensor (torch 1.x)
        self.fc1 = nn.Linear(9216, 128)
        self.fc2 = nn.Linear(128, num_classes)

    def forward(self, x):
        x = self.conv2(F.relu(self.conv1(x)))  # no ReLU after conv2, as the official net
        x = self.dropout1(F.max_pool2d(x, 2))
        x = self.dropout2(F.relu(self.fc1(torch.flatten(x, 1))))
        return self.fc2(x)


class CNN2(nn.Module):
    def __init__(self, num_classes=10, in_channels=1):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 32, 3), nn.ReLU(), nn.Conv2d(32, 32, 3), nn.ReLU(),
            nn.MaxPool2d(2, 2),
            nn.Conv2d(32, 64, 3), nn.ReLU(), nn.Conv2d(64, 64, 3), nn.ReLU(),
            nn.MaxPool2d(2, 2))
        self.classifier = nn.Sequential(
            nn.Linear(64 * 4 * 4, 200), nn.ReLU(), nn.Dropout(0.5),
            nn.Linear(200, 200), nn.ReLU(), nn.Linear(200, num_classes))

    def forward(self, x):
        return self.classifier(torch.flatten(self.features(x), 1))


class BasicBlock(nn.Module):
    def __init__(self, in_planes, out_planes, stride, drop_rate=0.0):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, out_planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.conv2 = nn.Conv2d(out_planes, out_planes, 3, 1, 1, bias=False)
        self.drop_rate = drop_rate
        self.equal = in_planes == out_planes
        self.shortcut = None if self.equal else nn.Conv2d(in_planes, out_planes, 1, stride, 0,
                                                          bias=False)

    def forward(self, x):
        act = F.relu(self.bn1(x))
        y = F.relu(self.bn2(self.conv1(act)))
        if self.drop_rate > 0:
            y = F.dropout(y, self.drop_rate, self.training)
        y = self.conv2(y)
        return (x if self.equal else self.shortcut(act)) + y


class WideResNet(nn.Module):
    def __init__(self, depth=40, widen_factor=10, num_classes=10, drop_rate=0.0):
        super().__init__()
        n = (depth - 4) // 6
        widths = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        self.conv1 = nn.Conv2d(3, widths[0], 3, 1, 1, bias=False)
        blocks = []
        for g, stride in enumerate((1, 2, 2)):
            for i in range(n):
                blocks.append(BasicBlock(widths[g] if i == 0 else widths[g + 1], widths[g + 1],
                                         stride if i == 0 else 1, drop_rate))
        self.blocks = nn.Sequential(*blocks)
        self.bn = nn.BatchNorm2d(widths[3])
        self.fc = nn.Linear(widths[3], num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.Linear):
                m.bias.data.zero_()

    def forward(self, x):
        x = F.relu(self.bn(self.blocks(self.conv1(x))))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


def build(arch: str, wrn_depth: int = 16, wrn_width: int = 4) -> nn.Module:
    if arch == "cnn1":
        return CNN1()
    if arch == "cnn2":
        return CNN2()
    if arch == "wrn":
        return WideResNet(wrn_depth, wrn_width)
    raise ValueError(f"unknown arch {arch!r}")


def pgd(model, x, y, eps, step_size, steps):
    """x_adv of PGD on mean CE (random start U(-eps, eps), clipped to [0, 1]); no param grads."""
    x_adv = torch.clamp(x + torch.empty_like(x).uniform_(-eps, eps), 0.0, 1.0)
    for _ in range(steps):
        x_adv.requires_grad_(True)
        loss = F.cross_entropy(model(x_adv), y)
        (grad,) = torch.autograd.grad(loss, [x_adv])
        x_adv = torch.clamp(x_adv.detach() + step_size * grad.sign(), 0.0, 1.0)
        x_adv = torch.clamp(torch.min(torch.max(x_adv, x - eps), x + eps), 0.0, 1.0)
    return x_adv.detach()


@contextlib.contextmanager
def weights_frozen(model, frozen=True):
    """Inside the block (if `frozen`), the weights' requires_grad is off: only the input's
    gradient is built, as an attack needs (eager autograd prunes the weight gradients anyway;
    a compiled forward/backward computes them unless they are off)."""
    params = [p for p in model.parameters() if p.requires_grad] if frozen else []
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


def at_step(model, optimizer, x, y, eps, step_size, steps, attack_train_mode=False,
            freeze_weights=False):
    """One AT step: PGD (eval mode unless `attack_train_mode`; the weights' requires_grad off
    if `freeze_weights`), then SGD on CE(f(x_adv)) in train mode. Returns the loss tensor (not
    synchronised)."""
    model.train(attack_train_mode)
    with weights_frozen(model, freeze_weights):
        x_adv = pgd(model, x, y, eps, step_size, steps)
    model.train()
    loss = F.cross_entropy(model(x_adv), y)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss


def local_lip(model, x, x_adv, fx=None):
    """Per-example ||f(x) - f(x')||_1 / ||(x - x') + 1e-6||_inf (the official `local_lip`)."""
    fx = model(x) if fx is None else fx
    top = torch.flatten(fx, 1) - torch.flatten(model(x_adv), 1)
    down = torch.flatten(x - x_adv, 1) + 1e-6
    return torch.norm(top, p=1, dim=1) / torch.norm(down, p=float("inf"), dim=1)


def lipschitz(model, x, eps, step_size=0.003, steps=10, recompute_fx=False):
    """Sum over the batch of the official descent estimate (`estimate_local_lip_v2`).

    The official code evaluates f(x) again in every step (`recompute_fx=True`); f(x) is a
    constant, so the default computes it once, as the JAX side does.
    """
    model.eval()
    with torch.no_grad():
        fx = None if recompute_fx else model(x)
    x_adv = x + 0.001 * torch.randn_like(x)
    for _ in range(steps):
        x_adv.requires_grad_(True)
        loss = -local_lip(model, x, x_adv, fx).mean()
        (grad,) = torch.autograd.grad(loss, [x_adv])
        x_adv = x_adv.detach() + step_size * grad.sign()
        x_adv = torch.clamp(torch.min(torch.max(x_adv, x - eps), x + eps), 0.0, 1.0)
    with torch.no_grad():
        return local_lip(model, x, x_adv, fx).sum()


@dataclasses.dataclass(frozen=True)
class Mode:
    """How a benchmark runs the PyTorch baseline."""

    channels_last: bool = False  # memory format of the net and the input
    compile: bool = False  # torch.compile(model), default mode
    no_weight_grad: bool = False  # weights' requires_grad off in the attack (AT) / always (lip.)


MODES = {
    "torch_nchw": Mode(),  # the official code's: eager, NCHW
    "torch_cl": Mode(channels_last=True),
    "torch_nograd": Mode(no_weight_grad=True),
    "torch_compile": Mode(compile=True),
    "torch_compile_nograd": Mode(compile=True, no_weight_grad=True),
}
assert tuple(MODES) == bench_util.TORCH_MODES


def prepare(model, x, mode: Mode, device):
    """(model, x) on `device` in the mode's memory format, the model compiled if the mode says
    (its parameters are the net's: build the optimizer on them after this)."""
    fmt = torch.channels_last if mode.channels_last else torch.contiguous_format
    model = model.to(device, memory_format=fmt)
    x = x.to(device).contiguous(memory_format=fmt)
    return (torch.compile(model) if mode.compile else model), x


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def compile_start_up() -> float:
    """Seconds to compile and run a trivial function and its gradient: torch.compile's one-time
    start-up in a process (imports, compiler checks), paid before the modes are timed."""
    def call():
        x = torch.ones(8, device=default_device(), requires_grad=True)
        torch.compile(lambda t: torch.relu(t) + 1)(x).sum().backward()

    with torch._inductor.utils.fresh_cache():
        return bench_util.timed(call)


def compile_times(model_name, first_calls, cache=False):
    """{mode: compile seconds} from `first_calls` {mode: one call of the benchmark in that mode}:
    each mode's first two calls are timed (bench_util.first_calls); a compiled mode's after
    torch.compile's start-up (`compile_start_up`), dynamo's graphs dropped (dynamo shares them
    between instances of a class) and, unless `cache`, in a fresh, empty inductor cache. Then
    every compiled mode but the last is called once more, to compile again what the later
    resets dropped. Prints a line per mode."""
    seconds, compiled = {}, []
    if any(MODES[mode].compile for mode in first_calls):
        print(f"{model_name:<6} torch.compile start-up {compile_start_up():.1f} s")
    for mode, call in first_calls.items():
        fresh = contextlib.nullcontext()
        if MODES[mode].compile:
            torch._dynamo.reset()
            compiled.append(call)
            fresh = contextlib.nullcontext() if cache else torch._inductor.utils.fresh_cache()
        with fresh:
            seconds[mode], calls = bench_util.first_calls(call)
        print(f"{model_name:<6} {mode:<22} first calls " + ", ".join(f"{t:.2f}" for t in calls)
              + f" s: compile {seconds[mode]:.1f} s")
        sys.stdout.flush()
    for call in compiled[:-1]:
        call()
    return seconds
