"""What a bfloat16 attack does to the numbers, and its speed here, on a trained run.

    python experiments/run.py --method=at --workdir=runs/digits_at      # CNN1 on digits
    python benchmarks/bf16_attack.py --workdir=runs/digits_at

The run's model (float32 weights) is attacked twice: once computed in float32, once with the
model's compute dtype bfloat16 (`models.build_model(..., dtype="bfloat16")`: inputs, weights
and activations cast, logits back to float32). The PGD-10 examples of each are then scored by
the float32 model, so the two adv accuracies differ only by where the attack was computed, as
they would in a training step whose inner maximisation ran in bf16. The lipschitz estimates
(descent, the official estimator; ascent, the maximum search) are computed wholly in each
dtype, since the estimate is the model's own ratio. Speed: images/s of the PGD-10 pass and of
the descent estimate, each dtype alternating in this process, median of --repeats; on a CPU
without bf16 dot instructions (AVX2 only) XLA converts to float32 around each dot.

Output: one line per figure and a RESULT json line.
"""

from __future__ import annotations

import dataclasses
import json
import time

import numpy as np
from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "a run directory with checkpoints (experiments/run.py)")
flags.DEFINE_integer("batch", 360, "examples per jitted call")
flags.DEFINE_integer("repeats", 5, "timed repetitions per dtype (median reported)")
flags.mark_flag_as_required("workdir")


def main(argv):
    del argv
    from jax_robust.speed_flags import append_speed_flags

    append_speed_flags()
    import jax
    import jax.numpy as jnp

    from jax_robust import attacks, data as datalib, lipschitz, models, train

    run = train.load_run(FLAGS.workdir)
    cfg = run.config
    data = datalib.load_dataset(cfg.data.dataset, cfg.data.data_dir, cfg.data.max_train,
                                cfg.data.max_test)
    n = min(FLAGS.batch, len(data.x_test))
    x, y = jnp.asarray(data.x_test[:n]), jnp.asarray(data.y_test[:n])
    eps, a = cfg.attack.eps, cfg.attack
    applies = {}
    for dtype in ("float32", "bfloat16"):
        module = train.build_model(
            dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, dtype=dtype)), run.info)
        applies[dtype] = train.inference_apply(models.make_model_fn(module))
    f32 = applies["float32"]

    def make_pgd(apply):  # the evaluation's PGD (attacks.pgd_restarts, one start)
        return jax.jit(lambda v, x, y, key: attacks.pgd_restarts(
            lambda z: apply(v, z), x, y, key, eps=eps, steps=a.steps, step_size=a.step_size))

    pgds = {d: make_pgd(f) for d, f in applies.items()}
    acc = jax.jit(lambda v, z, y: jnp.mean(jnp.argmax(f32(v, z), -1) == y) * 100)
    key = jax.random.key(0)
    out = {"workdir": FLAGS.workdir, "n": n, "eps": eps, "device": jax.devices()[0].device_kind}
    lip = {}
    for d, apply in applies.items():
        x_adv = pgds[d](run.variables, x, y, key)
        out[f"adv_acc_{d}_attack"] = float(acc(run.variables, x_adv, y))
        for direction in ("descent", "ascent"):
            r = lipschitz.lipschitz_estimate(apply, run.variables, x, eps, key,
                                             direction=direction)
            out[f"lipschitz_{direction}_{d}"] = float(jnp.mean(r))
        lip[d] = lambda apply=apply: lipschitz.lipschitz_estimate(apply, run.variables, x, eps,
                                                                  key)
    out["clean_acc"] = float(acc(run.variables, x, y))
    times = {f"{kind}_{d}": [] for kind in ("pgd", "lipschitz") for d in applies}
    for _ in range(FLAGS.repeats):
        for d in applies:
            for kind, fn in (("pgd", lambda d=d: pgds[d](run.variables, x, y, key)),
                             ("lipschitz", lip[d])):
                start = time.perf_counter()
                jax.block_until_ready(fn())
                times[f"{kind}_{d}"].append(n / (time.perf_counter() - start))
    for k, v in times.items():
        out[f"img_per_s_{k}"] = float(np.median(v))
    for k, v in out.items():
        print(f"{k:32s} {v:.4f}" if isinstance(v, float) else f"{k:32s} {v}")
    print("RESULT " + json.dumps(out))


if __name__ == "__main__":
    app.run(main)
