"""Does the JAX step slow the PyTorch step timed after it in the same process?

    python benchmarks/torch_beside_jax.py                       # cnn2, torch_cl, fixed malloc
    python benchmarks/torch_beside_jax.py --malloc=glibc        # glibc's moving thresholds

The check behind at_step.py's same-process comparison. Two JAX variants of the AT step
(`--jax_variants`, default base = oneDNN's convolutions, and xlakernels = XLA's) are each
built in a process of their own (a subprocess per variant, so one variant's threads and
allocations cannot reach the other's PyTorch); in each, for `--rounds` rounds: one timed
repetition of JAX steps, then `--torch_reps` timed repetitions of the PyTorch mode
(`--torch_mode`). Printed: per variant, the median images/s of JAX and of PyTorch after it.
PyTorch's figure should not depend on the variant beside it; session 9 found it did under
glibc's malloc defaults (docs/performance.md). Flags of at_step.py (--steps, --batch, ...) pass on.
"""

from __future__ import annotations

import statistics
import subprocess
import sys

from absl import app, flags

import at_step  # noqa: F401  (its flags: --steps, --batch, --malloc, ...)
import bench_util

FLAGS = flags.FLAGS
flags.DEFINE_string("arch", "cnn2", "cnn1 or cnn2")
flags.DEFINE_string("torch_mode", "torch_cl", "the PyTorch mode timed after each JAX repetition")
flags.DEFINE_integer("rounds", 4, "JAX repetition + PyTorch repetitions, this many times")
flags.DEFINE_integer("torch_reps", 3, "PyTorch repetitions after each JAX one")
flags.DEFINE_string("one_variant", None, "internal: time this variant in this process")
FLAGS.set_default("jax_variants", ["base", "xlakernels"])


def one_variant(variant: str) -> None:
    import numpy as np

    bench_util.start_frameworks(torch=True, malloc=FLAGS.malloc)
    rng = np.random.default_rng(0)
    shape = at_step.SHAPES[FLAGS.arch]
    x = rng.random((FLAGS.batch, *shape), dtype=np.float32)
    y = rng.integers(0, 10, FLAGS.batch).astype(np.int32)
    jax_run = at_step.jax_runner(at_step.build_step(FLAGS.arch, variant, x, y), FLAGS.steps)[0]
    torch_run, torch_one = at_step.torch_runner(FLAGS.arch, x, y, FLAGS.steps, FLAGS.torch_mode)
    torch_one()
    torch_one()
    jax_run()
    images = FLAGS.batch * FLAGS.steps
    jax_rates, torch_rates = [], []
    for _ in range(FLAGS.rounds):
        jax_rates.append(images / jax_run())
        torch_rates += [images / torch_run() for _ in range(FLAGS.torch_reps)]
    print(f"RESULT {variant} jax {statistics.median(jax_rates):.1f} img/s; "
          f"{FLAGS.torch_mode} after it {statistics.median(torch_rates):.1f} img/s "
          f"(all: {', '.join(f'{r:.0f}' for r in torch_rates)})", flush=True)


def main(argv):
    del argv
    at_step.set_xla_flags()
    if FLAGS.one_variant:
        return one_variant(FLAGS.one_variant)
    passed = [a for a in sys.argv[1:] if not a.startswith("--jax_variants")]
    for variant in FLAGS.jax_variants:
        out = subprocess.run([sys.executable, __file__, *passed, f"--one_variant={variant}"],
                             capture_output=True, text=True, check=False)
        lines = [ln for ln in out.stdout.splitlines() if ln.startswith(("RESULT", "date",
                                                                         "XLA_FLAGS"))]
        print("\n".join(lines) if out.returncode == 0 else out.stderr[-2000:], flush=True)


if __name__ == "__main__":
    app.run(main)
