"""Images/s of the evaluation attacks on CNN1 (eval mode), one jitted call per batch.

    python benchmarks/attacks.py                                   # pgd, multitarget, apgd
    python benchmarks/attacks.py --attacks=apgd --apgd_steps=100 --batch=256 --repeats=5

Attacks (jax_robust.attacks, each returning x_adv; the timed program also evaluates the
logits of x_adv, as evaluate_robustness does): pgd = PGD-10 on CE, step eps/5
(`pgd_restarts`, 1 restart); multitarget = 9 targeted PGDs of 20 steps, step eps/10, vmapped
(`multitarget_attack`); apgd = APGD-CE, --apgd_steps steps (`apgd_ce`, 1 restart).
Model: models.CNN1 with its Flax initialisation, MNIST-shaped random inputs (28x28x1, seed 0),
random labels, eps 0.1, --batch images per call. Step loops unrolled (the default) unless
--rolled.

Timing: lower + compile apart (printed), then --repeats timed calls (blocked until ready);
the median is reported. One line per attack, then 'RESULT {json}'.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time

from absl import app, flags

import bench_util

FLAGS = flags.FLAGS
flags.DEFINE_list("attacks", ["pgd", "multitarget", "apgd"], "pgd, multitarget, apgd")
flags.DEFINE_float("eps", 0.1, "ball radius (MNIST's)")
flags.DEFINE_integer("apgd_steps", 100, "APGD-CE iterations")
flags.DEFINE_bool("rolled", False, "keep the attacks' step loops rolled (fast compiles)")
flags.DEFINE_integer("batch", 128, "images per call")
flags.DEFINE_integer("repeats", 3, "timed calls per attack (median reported)")
flags.DEFINE_bool("speed_flags", True, "append the project's CPU XLA flags (speed_flags.py)")


def attack_program(name: str, apply_fn, eps: float, unroll: bool):
    """(variables, x, y, key) -> [B] bool correct under the attack, jitted."""
    import jax
    import jax.numpy as jnp

    from jax_robust.attacks import apgd_ce, multitarget_attack, pgd_restarts

    def run(variables, x, y, key):
        f = lambda z: apply_fn(variables, z)  # noqa: E731
        if name == "pgd":
            x_adv = pgd_restarts(f, x, y, key, eps=eps, steps=10, unroll=unroll)
        elif name == "multitarget":
            x_adv = multitarget_attack(f, x, y, key, eps=eps, steps=20, num_classes=10,
                                       unroll=unroll)
        elif name == "apgd":
            x_adv = apgd_ce(f, x, y, key, eps=eps, steps=FLAGS.apgd_steps, unroll=unroll)
        else:
            raise ValueError(f"unknown attack {name!r}")
        return jnp.argmax(f(x_adv), axis=-1) == y

    return jax.jit(run)


def main(argv):
    del argv
    if FLAGS.speed_flags:
        from jax_robust.speed_flags import append_speed_flags

        append_speed_flags()
    import datetime

    import jax
    import numpy as np

    from jax_robust import models

    print(f"date {datetime.datetime.now().isoformat(timespec='seconds')}; CPU "
          f"{bench_util.cpu_model()}, {os.cpu_count()} cores; jax {jax.__version__} on "
          f"{jax.devices()[0].device_kind} x{jax.device_count()}; load average "
          f"{bench_util.load_average()}\nXLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}")
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 1, size=(FLAGS.batch, 28, 28, 1)).astype(np.float32)
    y = rng.integers(0, 10, size=FLAGS.batch).astype(np.int32)
    module = models.CNN1(num_classes=10)
    variables = module.init({"params": jax.random.key(0)}, x[:1], train=False)
    apply_fn = lambda v, z: module.apply(v, z, train=False)  # noqa: E731
    x, y, key = jax.device_put(x), jax.device_put(y), jax.random.key(1)

    results = {}
    for name in FLAGS.attacks:
        start = time.perf_counter()
        compiled = attack_program(name, apply_fn, FLAGS.eps, not FLAGS.rolled).lower(
            variables, x, y, key).compile()
        compile_s = time.perf_counter() - start
        seconds = []
        for rep in range(FLAGS.repeats):
            before = bench_util.cpu_ticks()
            start = time.perf_counter()
            correct = jax.block_until_ready(compiled(variables, x, y, jax.random.fold_in(key, rep)))
            seconds.append(time.perf_counter() - start)
            others = bench_util.others_share(before, bench_util.cpu_ticks(), seconds[-1])
        rate = FLAGS.batch / statistics.median(seconds)
        steps = {"pgd": "10", "multitarget": "9x20", "apgd": str(FLAGS.apgd_steps)}[name]
        print(f"{name:<12} steps {steps:<5} batch {FLAGS.batch}  {rate:9.1f} img/s  "
              f"(median of {FLAGS.repeats}: {', '.join(f'{s:.2f}' for s in seconds)} s; "
              f"compile {compile_s:.1f} s; acc {100 * float(np.mean(correct)):.1f}%; "
              f"others {others})")
        sys.stdout.flush()
        results[name] = {"img_per_s": round(rate, 2), "seconds": [round(s, 4) for s in seconds],
                         "compile_s": round(compile_s, 2), "steps": steps}
    print("RESULT " + json.dumps({
        "model": "cnn1", "batch": FLAGS.batch, "eps": FLAGS.eps, "unrolled": not FLAGS.rolled,
        "cpu": bench_util.cpu_model(), "cores": os.cpu_count(), "jax": jax.__version__,
        "device": jax.devices()[0].device_kind, "attacks": results}))


if __name__ == "__main__":
    app.run(main)
