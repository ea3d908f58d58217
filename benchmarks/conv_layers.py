"""Per-layer profile of the CNNs' convolutions: JAX (XLA:CPU, the project's speed flags; XLA's
convs and, where the handler builds, oneDNN's through the FFI, `SpeedConfig.conv_kernels`)
against PyTorch (oneDNN) eager NCHW and channels_last, op by op, in one process.

Each conv of CNN1 / CNN2 at the AT step's batch is timed as three separately compiled ops:
the forward, the gradient with respect to its input, and the gradient with respect to its
weights (JAX: `jax.vjp` of `lax.conv_general_dilated`, with the library's overlap-add input
gradient for the first conv, as the models use it on CPU; PyTorch: `conv2d`,
`torch.nn.grad.conv2d_input`, `conv2d_weight`). Modes alternate, medians of `--repeats`.

The AT step with PGD-`--steps` runs each conv's forward steps + 1 times, its input gradient
steps times (+ 1 in the update, except the first conv) and its weight gradient once; the
"per step" columns weight the op times by those counts, which says where a step's conv time
goes and which side is faster at each op. Ops outside the convs (dense layers, pools, ReLUs,
the loss, the update) are not here: the step time of `at_step.py` minus the sum shown is
their share.

  python benchmarks/conv_layers.py --models=cnn2 --repeats=7
"""

from __future__ import annotations

import statistics
import sys

from absl import app, flags

import bench_util
import flop_count

FLAGS = flags.FLAGS
flags.DEFINE_list("models", ["cnn1", "cnn2"], "cnn1 and/or cnn2")
flags.DEFINE_integer("batch", 128, "images per op call (the AT step's batch)")
flags.DEFINE_integer("steps", 10, "PGD steps of the AT step the per-step columns assume")
flags.DEFINE_integer("repeats", 7, "timed repetitions per op and mode (median)")
flags.DEFINE_integer("calls", 5, "op calls per timed repetition")
flags.DEFINE_bool("speed_flags", True, "the project's XLA:CPU flags (jax_robust.speed_flags)")

OPS = ("forward", "input_grad", "weight_grad")


def op_counts(layer: int, steps: int) -> dict[str, int]:
    """Calls of each op of conv `layer` in one AT step with PGD-`steps`."""
    return {"forward": steps + 1, "input_grad": steps + (layer > 0), "weight_grad": 1}


def jax_ops(batch: int, size: int, c_in: int, c_out: int, first: bool, kernels: str):
    """{op: zero-argument callable that runs it once and waits} for JAX, with XLA's or
    oneDNN's convolutions (`kernels`, as `SpeedConfig.conv_kernels`)."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from jax_robust import layers

    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((batch, size, size, c_in), np.float32))
    w = jnp.asarray(rng.standard_normal((3, 3, c_in, c_out), np.float32) * 0.1)
    conv_fn = (layers.first_conv_fn("overlap_add", kernels) if first
               else layers.later_conv_fn("xla", kernels))
    conv_fn = conv_fn or jax.lax.conv_general_dilated

    def conv(x, w):
        return conv_fn(x, w, (1, 1), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC"))

    g = jnp.asarray(rng.standard_normal(conv(x, w).shape, np.float32))
    forward = jax.jit(conv)
    input_grad = jax.jit(lambda x, w, g: jax.vjp(lambda z: conv(z, w), x)[1](g)[0])
    weight_grad = jax.jit(lambda x, w, g: jax.vjp(lambda v: conv(x, v), w)[1](g)[0])
    return {"forward": lambda: forward(x, w).block_until_ready(),
            "input_grad": lambda: input_grad(x, w, g).block_until_ready(),
            "weight_grad": lambda: weight_grad(x, w, g).block_until_ready()}


def torch_ops(batch: int, size: int, c_in: int, c_out: int, channels_last: bool):
    import torch
    import torch.nn.functional as F

    gen = torch.Generator().manual_seed(0)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(batch, c_in, size, size, generator=gen).to(memory_format=fmt)
    w = (torch.randn(c_out, c_in, 3, 3, generator=gen) * 0.1).to(memory_format=fmt)
    g = torch.randn(batch, c_out, size - 2, size - 2, generator=gen).to(memory_format=fmt)

    def run(fn):
        def call():
            with torch.no_grad():
                fn()
        return call

    return {"forward": run(lambda: F.conv2d(x, w)),
            "input_grad": run(lambda: torch.nn.grad.conv2d_input(x.shape, w, g)),
            "weight_grad": run(lambda: torch.nn.grad.conv2d_weight(x, w.shape, g))}


def main(argv):
    del argv
    if FLAGS.speed_flags:
        from jax_robust.speed_flags import append_speed_flags

        append_speed_flags()
    bench_util.start_frameworks(torch=True)
    peak = bench_util.print_peak(4096, 3)
    from jax_robust import onednn

    jax_modes = ("jax_xla", "jax_onednn") if onednn.available() else ("jax_xla",)
    jax_best = jax_modes[-1]  # the project's CPU default
    modes = jax_modes + ("torch_nchw", "torch_cl")
    for model in FLAGS.models:
        print(f"\n{model}: batch {FLAGS.batch}, PGD-{FLAGS.steps} AT step; ms per call "
              f"(GFLOP/s, % of the {peak:.0f} GFLOP/s peak); per step = ms x calls per step")
        print("| conv | op | calls/step | " + " | ".join(modes) +
              f" | {jax_best} / best torch | per step: {jax_best} ms | best torch ms |")
        print("|---|---|---:|" + "---:|" * len(modes) + "---:|---:|---:|")
        totals = {m: 0.0 for m in modes}
        convs = [(h, c_in, c_out) for kind, h, _, c_in, c_out in flop_count.cnn_layers(model)
                 if kind == "conv"]
        for layer, (size, c_in, c_out) in enumerate(convs):
            flop = 2 * FLAGS.batch * flop_count.conv_macs(size, size, c_in, c_out, 3)[0]
            runners = {m: jax_ops(FLAGS.batch, size, c_in, c_out, layer == 0, m[4:])
                       for m in jax_modes}
            runners.update({
                       "torch_nchw": torch_ops(FLAGS.batch, size, c_in, c_out, False),
                       "torch_cl": torch_ops(FLAGS.batch, size, c_in, c_out, True)})
            counts = op_counts(layer, FLAGS.steps)
            for op in OPS:
                calls = {m: runners[m][op] for m in modes}
                for call in calls.values():  # compile and warm
                    call(), call()
                times = {m: [] for m in modes}
                for _ in range(FLAGS.repeats):  # modes alternate within each repetition
                    for m, call in calls.items():
                        times[m].append(bench_util.timed(
                            lambda: [call() for _ in range(FLAGS.calls)]) / FLAGS.calls)
                med = {m: statistics.median(t) for m, t in times.items()}
                best_torch = min(("torch_nchw", "torch_cl"), key=med.get)
                for m in modes:
                    totals[m] += med[m] * counts[op]
                cells = " | ".join(f"{med[m] * 1e3:.2f} ({flop / med[m] / 1e9:.0f}, "
                                   f"{flop / med[m] / 1e9 / peak * 100:.0f}%)" for m in modes)
                print(f"| c{layer + 1} {size}x{size}x{c_in}->{c_out} | {op} | {counts[op]} | "
                      f"{cells} | {med[best_torch] / med[jax_best]:.2f} | "
                      f"{med[jax_best] * counts[op] * 1e3:.1f} | "
                      f"{med[best_torch] * counts[op] * 1e3:.1f} ({best_torch}) |")
                sys.stdout.flush()
        print(f"{model} conv time per AT step: " + ", ".join(
            f"{m} {totals[m] * 1e3:.0f} ms" for m in modes))
        print(f"RESULT {{\"model\": \"{model}\", " + ", ".join(
            f"\"{m}_conv_ms_per_step\": {totals[m] * 1e3:.1f}" for m in modes) + "}")


if __name__ == "__main__":
    app.run(main)
