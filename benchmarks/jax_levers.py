"""Speed levers of the JAX programs the benchmarks time, as explicit options (no patching).

A variant is '+'-joined lever names; "base" is `config.CPU_SPEED`, every CPU speed option of
the library on (jax_robust/layers.py, models.py). Each speed lever takes one
`config.SpeedConfig` field back to its plain form (`config.PLAIN_SPEED`'s value):
  xlapool     pool_grad='autodiff': the 2x2 max-pool as a reshape-and-max left to autodiff
              (the library's takes the max of the four window corners, with a custom VJP)
  xlaconv     first_conv_grad='xla': the first conv's input gradient left to XLA (the
              library's `layers.small_input_conv`: one matmul plus an overlap-add of the taps)
  biasfirst   conv_bias_after_pool=False: CNN1 adds its conv2 bias before the pool, as the
              official net is written (the library adds it after: pool(z) + b = pool(z + b)
              exactly, and the bias gradient then sums the 4x smaller pooled map)
  flaxbn      channel_sums='reduce': BatchNorm's per-channel sums (and their gradients) as
              XLA reductions, as `nn.BatchNorm` computes them (the library's: ones-vector dots)
  rolled      attack_unroll=False: the PGD / lipschitz loops as rolled `lax.fori_loop`s
  xlarows     conv_input_grad='xla': the CNNs' later convs' input gradients left to XLA (the
              library's `layers.column_taps_conv`: a kh x 1 conv-transpose of the stacked
              column taps, then an overlap-add)
  xlakernels  conv_kernels='xla': every conv is XLA's (the library's: oneDNN's forward, input
              and kernel gradients through an FFI call, layers.onednn_conv); with it, xlarows
              is the column-taps lever again
  sepconvpool conv_pool='separate': the CNNs' ReLU + conv + max-pool runs as three ops (the
              library's: one oneDNN call each way, onednn.conv_pool; it needs oneDNN's
              convs and the corners pool, so xlakernels and xlapool also separate them)
and the PRNG implementation of every key made while the variant is built (the step's key, so
its dropout masks and random starts), set with `jax.config.update('jax_default_prng_impl',
...)` by `prng(variant)` and put back when it exits:
  rbg, unsafe_rbg, threefry   ('threefry' is 'threefry2x32', JAX's default: a no-op unless
                              the process's default is another, so the self-check refuses it)
and one variant that is not a lever:
  control     `base` built and compiled again: the no-op control of a same-process A/B (its
              ratio to base is the noise an A/B has to beat)
A lever only reaches some models: xlapool and xlaconv the CNNs (the WRN has no pool, and its
first conv takes no speed option), biasfirst CNN1, flaxbn the nets with BatchNorm (WRN,
ResNet-50); `applies(lever, arch)` says which, and the benchmarks drop the others.

Self-check: `check_changes(variant, lower_text)` lowers the variant and, for each of its
levers, the variant without that lever ("base" for a single lever), and raises `LeverError`
("lever X did not change the program") where the two StableHLO texts are equal. The benchmarks
run it for every variant before timing it, so a lever that silently stopped reaching the
program is an error, not a "1.00x" row.

No longer built: nnpool (`nn.max_pool`), flipconv (a flipped-kernel input-gradient VJP),
poolidx (PyTorch's first-max pool gradient from a saved index; now `pool_ties='first'`, a
semantic option rather than a speed lever), biasdot (bias gradients as ones-vector dots, by
patching a private JAX function), relupool (CNN2's ReLU after the pool) and nodonate (the step
jitted without donation). They needed module attributes or private JAX internals patched, and
were measured before without gain (docs/history.md, "Speed against PyTorch eager", has their
numbers).
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Callable, Iterator

from jax_robust import config

# lever -> (SpeedConfig field, the value it sets: the plain form)
SPEED_LEVERS = {
    "xlapool": ("pool_grad", "autodiff"),
    "xlaconv": ("first_conv_grad", "xla"),
    "biasfirst": ("conv_bias_after_pool", False),
    "flaxbn": ("channel_sums", "reduce"),
    "rolled": ("attack_unroll", False),
    "xlarows": ("conv_input_grad", "xla"),
    "xlakernels": ("conv_kernels", "xla"),
    "sepconvpool": ("conv_pool", "separate"),
}
PRNG_LEVERS = {"rbg": "rbg", "unsafe_rbg": "unsafe_rbg", "threefry": "threefry2x32"}
LEVERS = tuple(SPEED_LEVERS) + tuple(PRNG_LEVERS)
CONTROL = "control"
BASE = config.CPU_SPEED
# The archs a lever reaches (absent: every arch).
ONLY = {"xlapool": ("cnn1", "cnn2"), "xlaconv": ("cnn1", "cnn2"), "xlarows": ("cnn1", "cnn2"),
        "sepconvpool": ("cnn1", "cnn2"),
        "biasfirst": ("cnn1",),
        "flaxbn": ("wrn", "resnet50")}

for _lever, (_field, _value) in SPEED_LEVERS.items():  # each lever is a plain form
    assert getattr(config.PLAIN_SPEED, _field) == _value != getattr(BASE, _field), _lever


class LeverError(ValueError):
    """A lever that does not change the program it is timed in."""


def levers(variant: str) -> list[str]:
    """The lever names of `variant`, in order ([] for "base" and "control"); ValueError for
    unknown ones."""
    names = [] if variant in ("base", CONTROL) else variant.split("+")
    unknown = [n for n in names if n not in LEVERS]
    if unknown:
        raise ValueError(f"unknown levers {unknown} in {variant!r}; choose from "
                         f"{', '.join(LEVERS)} ('+'-joined), or base, or {CONTROL}")
    impls = [n for n in names if n in PRNG_LEVERS]
    if len(impls) > 1:
        raise ValueError(f"variant {variant!r} names several PRNG implementations {impls}")
    return names


def join(names: list[str]) -> str:
    return "+".join(names) or "base"


def parse(variant: str) -> config.SpeedConfig:
    """The SpeedConfig of `variant`: config.CPU_SPEED with its speed levers' fields plain."""
    return dataclasses.replace(BASE, **dict(SPEED_LEVERS[n] for n in levers(variant)
                                            if n in SPEED_LEVERS))


def prng_impl(variant: str) -> str | None:
    """The PRNG implementation `variant` asks for (None: the process's default)."""
    impls = [PRNG_LEVERS[n] for n in levers(variant) if n in PRNG_LEVERS]
    return impls[0] if impls else None


def applies(lever: str, arch: str) -> bool:
    return arch in ONLY.get(lever, (arch,))


def for_arch(variant: str, arch: str) -> str | None:
    """`variant` without the levers that do not reach `arch`; None if none of its levers do."""
    if variant == CONTROL:
        return CONTROL
    names = levers(variant)
    kept = [n for n in names if applies(n, arch)]
    return join(kept) if kept or not names else None


def variants_for(jax_variants: list[str], arch: str) -> tuple[list[str], set[frozenset]]:
    """The distinct variants of `jax_variants` that reach `arch` (levers that do not are
    dropped from each), and their lever sets."""
    variants: list[str] = []
    for v in jax_variants:
        kept = for_arch(v, arch)
        if kept and kept not in variants:
            variants.append(kept)
    return variants, {frozenset(levers(v)) for v in variants}


@contextlib.contextmanager
def prng(variant: str) -> Iterator[None]:
    """Sets JAX's default PRNG implementation for `variant` (build and lower inside)."""
    import jax

    impl = prng_impl(variant)
    before = jax.config.jax_default_prng_impl
    if impl is not None:
        jax.config.update("jax_default_prng_impl", impl)
    try:
        yield
    finally:
        if impl is not None:
            jax.config.update("jax_default_prng_impl", before)


def check_changes(variant: str, lower_text: Callable[[str], str]) -> None:
    """Raises LeverError unless every lever of `variant` changes the lowered program.

    lower_text(v) -> the StableHLO text of the program built for variant v
    (`jitted.lower(*args).as_text()`); called for `variant` and, per lever, for `variant`
    without it. Memoise it: several variants share their sub-variants ("base" above all).
    """
    names = levers(variant)
    text = lower_text(join(names))
    for i, name in enumerate(names):
        other = join(names[:i] + names[i + 1:])
        if lower_text(other) == text:
            raise LeverError(f"lever {name} did not change the program: {join(names)} and "
                             f"{other} lower to the same StableHLO")


def memoised(lower_text: Callable[[str], str]) -> Callable[[str], str]:
    """lower_text cached per set of levers (order-free: 'a+b' and 'b+a' lower once)."""
    cache: dict[frozenset, str] = {}

    def cached(variant: str) -> str:
        key = frozenset(levers(variant))
        if key not in cache:
            cache[key] = lower_text(variant)
        return cache[key]

    return cached
