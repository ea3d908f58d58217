"""The one-channel first conv's forward (28x28x1 -> 32, 3x3 VALID, batch 128) three ways, each
jitted alone, with and without the bias + ReLU that follow it in the CNNs:
  xla     lax.conv_general_dilated (what the models run)
  taps    nine broadcast multiply-adds of shifted input windows
  im2col  the nine windows stacked, one [n*26*26, 9] x [9, 32] matmul
Prints the median ms per call and the largest difference from XLA's conv. The lone-op gain of
`taps` did not carry into the AT step (docs/history.md, "Session 6: per-layer conv profile").

  python benchmarks/first_conv_forward.py
"""

import statistics

import numpy as np

from jax_robust.speed_flags import append_speed_flags

append_speed_flags()

import jax  # noqa: E402  (after the XLA flags)
import jax.numpy as jnp  # noqa: E402

import bench_util  # noqa: E402

BATCH, SIZE, FEATURES, OUT = 128, 28, 32, 26


def xla(x, w):
    return jax.lax.conv_general_dilated(x, w, (1, 1), "VALID",
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))


def taps(x, w):
    return sum(x[:, i:i + OUT, j:j + OUT, :] * w[i, j, 0] for i in range(3) for j in range(3))


def im2col(x, w):
    windows = jnp.concatenate([x[:, i:i + OUT, j:j + OUT, :]
                               for i in range(3) for j in range(3)], -1)
    return (windows.reshape(-1, 9) @ w.reshape(9, FEATURES)).reshape(BATCH, OUT, OUT, FEATURES)


def main():
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((BATCH, SIZE, SIZE, 1), np.float32))
    w = jnp.asarray(rng.standard_normal((3, 3, 1, FEATURES), np.float32))
    reference = jax.jit(xla)(x, w)
    for name, conv in (("xla", xla), ("taps", taps), ("im2col", im2col)):
        error = float(jnp.abs(jax.jit(conv)(x, w) - reference).max())
        for label, fn in (("conv", conv), ("conv+bias+relu",
                                            lambda x, w, c=conv: jax.nn.relu(c(x, w) + 1.0))):
            call = jax.jit(fn)
            call(x, w).block_until_ready()
            seconds = [bench_util.timed(lambda: [call(x, w).block_until_ready()
                                                 for _ in range(10)]) / 10 for _ in range(7)]
            print(f"{name:7s} {label:15s} {statistics.median(seconds) * 1e3:6.2f} ms  "
                  f"max |difference from xla| {error:.1e}")


if __name__ == "__main__":
    main()
