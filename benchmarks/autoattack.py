"""AutoAttack (standard l_inf) on the same net and test points: jax_robust.autoattack against
the reference (pyautoattack 0.2.0, PyTorch eager on CPU). Needs the [reference] extra.

    python benchmarks/autoattack.py                          # CNN1 and CNN2, 100 test points
    python benchmarks/autoattack.py --archs=cnn1 --n=200 --workdir_cnn1=runs/at-cnn1

Per arch: the net of --workdir_<arch> (a run of experiments/run.py / train_and_evaluate), or
one adversarially trained here for --epochs on the first --train_size Fashion-MNIST training
images (kept under --train_dir, reused by later calls); converted to PyTorch
(torch_convert.to_torch; the logits' largest difference is printed). The first --n test
images are attacked at --eps by both sides with the same --batch_size and seed. Reported per
attack (cumulative, as AutoAttack runs them): robust accuracy each side, per-example
agreement of the robust flags after that attack, seconds each side (ours without the
programs' compile, which is printed apart) and the speed ratio reference / ours (with and
without the compile). The reference's per-attack flags and times come from its evaluation
state, recorded at each `add_run_attack` (a subclass; nothing else is changed). Prints a
markdown table, then 'RESULT {json}'. Figures: docs/autoattack.md.
"""

from __future__ import annotations

import datetime
import json
import os
import sys
import time

from absl import app, flags, logging

import bench_util

FLAGS = flags.FLAGS
flags.DEFINE_list("archs", ["cnn1", "cnn2"], "cnn1, cnn2")
flags.DEFINE_integer("n", 100, "test points attacked (the first n)")
flags.DEFINE_float("eps", 0.1, "l_inf radius (Fashion-MNIST's, as MNIST's)")
flags.DEFINE_integer("batch_size", 250, "batch size of both sides (the reference's default)")
flags.DEFINE_integer("seed", 0, "seed of both sides")
flags.DEFINE_string("data_dir", "/usr/share/datasets/fashion-mnist", "Fashion-MNIST IDX files")
flags.DEFINE_string("workdir_cnn1", None, "a trained CNN1 run (default: train one)")
flags.DEFINE_string("workdir_cnn2", None, "a trained CNN2 run (default: train one)")
flags.DEFINE_string("train_dir", "/tmp/jax_robust_autoattack_bench", "where nets are trained")
flags.DEFINE_string("method", "at", "training method of the nets trained here")
flags.DEFINE_integer("epochs", 1, "epochs of the nets trained here")
flags.DEFINE_integer("train_size", 10000, "training images of the nets trained here")
flags.DEFINE_bool("reference", True, "run the reference (False: ours only)")
flags.DEFINE_bool("speed_flags", True, "append the project's CPU XLA flags (speed_flags.py)")


def trained(arch: str):
    """LoadedRun of --workdir_<arch>, or of a net trained here (once) under --train_dir."""
    from jax_robust import config as cfglib
    from jax_robust.train import load_run, train_and_evaluate

    workdir = getattr(FLAGS, f"workdir_{arch}")
    if workdir is None:
        workdir = os.path.join(FLAGS.train_dir, f"{FLAGS.method}-{arch}-e{FLAGS.epochs}-"
                               f"n{FLAGS.train_size}")
        if not os.path.exists(os.path.join(workdir, "results.json")):
            cfg = cfglib.RunConfig(
                data=cfglib.DataConfig(dataset="fashion_mnist", data_dir=FLAGS.data_dir,
                                       max_train=FLAGS.train_size, max_test=1000),
                model=cfglib.ModelConfig(arch=arch),
                train=cfglib.TrainConfig(method=FLAGS.method, epochs=FLAGS.epochs),
                eval=cfglib.EvalConfig(train_eval_size=1000))
            start = time.perf_counter()
            res = train_and_evaluate(cfg, workdir, log=lambda _: None)
            print(f"{arch}: trained {FLAGS.method} for {FLAGS.epochs} epoch(s) on "
                  f"{FLAGS.train_size} images in {time.perf_counter() - start:.0f} s: test acc "
                  f"{res.get('test_acc')}, PGD-10 acc {res.get('adv_test_acc')}")
    return load_run(workdir, log=print)


def reference_run(net, x, y, eps: float, batch_size: int, seed: int):
    """(x_adv, y_adv, {attack: robust flags [N] after it}, {attack: seconds}) of the
    reference's standard version."""
    import numpy as np
    import pyautoattack.autoattack as ref_module
    import torch

    flags_after, seconds = {}, {}
    clock = {"t": None}

    class Recording(ref_module.EvaluationState):
        """The reference's evaluation state, recording the flags and time at each attack."""

        def add_run_attack(self, attack: str) -> None:
            now = time.perf_counter()
            flags_after[attack] = self.robust_flags.cpu().numpy().copy()
            seconds[attack] = now - clock["t"]
            clock["t"] = now
            super().add_run_attack(attack)

    adversary = ref_module.AutoAttack(net, eps=eps, seed=seed, version="standard")
    adversary.logger.setLevel("WARNING")
    original, ref_module.EvaluationState = ref_module.EvaluationState, Recording
    try:
        xt = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))
        clock["t"] = time.perf_counter()
        x_adv, y_adv = adversary.run_standard_evaluation(
            xt, torch.from_numpy(y.astype(np.int64)), batch_size=batch_size)
    finally:
        ref_module.EvaluationState = original
    return x_adv.numpy().transpose(0, 2, 3, 1), y_adv.numpy(), flags_after, seconds


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)  # orbax's checkpoint lines
    if FLAGS.speed_flags:
        from jax_robust.speed_flags import append_speed_flags

        append_speed_flags()
    bench_util.start_frameworks(torch=FLAGS.reference)
    import jax
    import numpy as np

    from jax_robust import data
    from jax_robust.autoattack import autoattack, version_specs

    names = [s.name for s in version_specs("standard")]
    test = data.load_dataset("fashion_mnist", FLAGS.data_dir)
    x, y = test.x_test[:FLAGS.n], test.y_test[:FLAGS.n].astype(np.int32)
    results = {}
    for arch in FLAGS.archs:
        run = trained(arch)
        print(f"{arch}: eps {FLAGS.eps}, {FLAGS.n} test points, batch {FLAGS.batch_size}, "
              f"seed {FLAGS.seed}; load average {bench_util.load_average()}")
        sys.stdout.flush()
        before = bench_util.cpu_ticks()
        start = time.perf_counter()
        ours = autoattack(run.apply_fn, run.variables, x, y, FLAGS.eps,
                          key=jax.random.key(FLAGS.seed), batch_size=FLAGS.batch_size,
                          log=print)
        ours_wall = time.perf_counter() - start
        print(f"  ours: {ours_wall:.1f} s in all; others used "
              f"{bench_util.others_share(before, bench_util.cpu_ticks(), ours_wall)}")
        row = {"ours": {k: ours[k] for k in ("clean_acc", "robust_acc", "robust_acc_after",
                                              "seconds", "compile_seconds", "clean_seconds")},
               "ours_wall_s": ours_wall}
        if FLAGS.reference:
            import torch
            from torch_convert import nchw, to_torch

            net = to_torch(arch, run.variables["params"], run.info.image_shape,
                           run.info.num_classes)
            with torch.no_grad():
                diff = float(np.abs(net(nchw(x)).numpy() - np.asarray(
                    run.apply_fn(run.variables, x))).max())
            print(f"  logits: largest |JAX - PyTorch| {diff:.2e}")
            before = bench_util.cpu_ticks()
            start = time.perf_counter()
            _, y_ref, ref_flags, ref_seconds = reference_run(net, x, y, FLAGS.eps,
                                                             FLAGS.batch_size, FLAGS.seed)
            ref_wall = time.perf_counter() - start
            print(f"  reference: {ref_wall:.1f} s in all; others used "
                  f"{bench_util.others_share(before, bench_util.cpu_ticks(), ref_wall)}")
            row.update(reference_wall_s=ref_wall, logits_max_diff=diff,
                       reference={"robust_acc": 100.0 * float(np.mean(y_ref == y)),
                                  "seconds": ref_seconds})
            print(table(arch, names, ours, ref_flags, ref_seconds, ref_wall, ours_wall, y,
                        y_ref, row))
        results[arch] = row
        sys.stdout.flush()
    print("RESULT " + json.dumps({
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "cpu": bench_util.cpu_model(), "cores": os.cpu_count(), "n": FLAGS.n,
        "eps": FLAGS.eps, "batch_size": FLAGS.batch_size, "seed": FLAGS.seed,
        "archs": results}, default=float))


def table(arch, names, ours, ref_flags, ref_seconds, ref_wall, ours_wall, y, y_ref,
          row) -> str:
    """The markdown table of one arch (and the summary figures into `row`)."""
    import numpy as np

    n = len(y)
    lines = [f"\n{arch}, {n} test points", "",
             "| attack | robust acc, reference (%) | robust acc, ours (%) | per-example "
             "agreement | reference s | ours s (compile s) | speed ratio |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    # Our flags after each attack: robust at the end, or fooled by a later attack.
    ours_flags = {name: ours["robust_flags"] | np.isin(ours["fooled_by"], names[i + 1:])
                  for i, name in enumerate(names)}
    agreements = {}
    for name in names:
        if name not in ref_flags:  # the reference stops when no point is left
            ref_flags[name] = ref_flags[names[names.index(name) - 1]] if names.index(name) \
                else ours_flags[name]
            ref_seconds.setdefault(name, 0.0)
        agree = float(np.mean(ref_flags[name] == ours_flags[name]))
        agreements[name] = agree
        s, c = ours["seconds"][name], ours["compile_seconds"][name]
        lines.append(f"| {name} | {100 * np.mean(ref_flags[name]):.1f} | "
                     f"{ours['robust_acc_after'][name]:.1f} | {100 * agree:.1f}% "
                     f"({int(np.sum(ref_flags[name] != ours_flags[name]))} differ) | "
                     f"{ref_seconds[name]:.1f} | {s:.1f} ({c:.1f}) | "
                     f"{ref_seconds[name] / max(s, 1e-9):.1f}x "
                     f"({ref_seconds[name] / max(s + c, 1e-9):.1f}x with compile) |")
    final_agree = float(np.mean((y_ref == y) == ours["robust_flags"]))
    run_s = sum(ours["seconds"].values()) + ours["clean_seconds"]
    compile_s = sum(ours["compile_seconds"].values())
    lines.append(f"| **all** | {100 * np.mean(y_ref == y):.1f} | {ours['robust_acc']:.1f} | "
                 f"{100 * final_agree:.1f}% ({int(np.sum((y_ref == y) != ours['robust_flags']))}"
                 f" differ) | {ref_wall:.1f} | {run_s:.1f} ({compile_s:.1f}) | "
                 f"{ref_wall / run_s:.1f}x ({ref_wall / ours_wall:.1f}x with compile) |")
    row.update(agreement=agreements, final_agreement=final_agree,
               ratio=ref_wall / run_s, ratio_with_compile=ref_wall / ours_wall)
    return "\n".join(lines)


if __name__ == "__main__":
    app.run(main)
