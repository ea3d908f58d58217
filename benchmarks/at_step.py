"""Images/s of one adversarial-training step, the project's JAX step against eager PyTorch.

    python benchmarks/at_step.py                  # cnn1, cnn2, wrn-16-4; batch 128 (~15 min, CPU)
    python benchmarks/at_step.py --models=cnn1,cnn2 --jax_variants=base,xlapool+xlaconv+biasfirst
    python benchmarks/at_step.py --models=wrn --wrn_depth=40 --wrn_width=10 --peak_tflops=495
    python benchmarks/at_step.py --ablation --models=cnn1,cnn2     # the CPU levers, one table
    python benchmarks/at_step.py --ablation --models=wrn --steps=1 --repeats=3   # flaxbn

One step = PGD-10 on cross-entropy (random start U(-eps, eps) clipped to [0, 1], step eps/5,
sign ascent, projection and clip) + one SGD-momentum(0.9) update on CE(f(x_adv)), batch 128.
JAX: `step.make_train_step(methods.get("at").objective, ...)` on `models.build_model(...,
speed=...)`, jitted with the state donated. PyTorch: benchmarks/torch_models.py, eager, the
same nets, `torch.set_num_threads(os.cpu_count())` (--notorch: JAX only, torch not imported).
Modes match on both sides: --variant=paper (default) attacks in eval mode on both, --variant=
official in train mode on both (dropout masks, BatchNorm batch statistics); the update is in
train mode on both. Random data (MNIST-shaped 28x28x1 for the CNNs, eps 0.1; CIFAR-shaped
32x32x3 for the WRN, eps 8/255).

Timing: compile is timed apart (lower + compile), then --warmup untimed repetitions, then
--repeats repetitions of --steps steps each, alternating PyTorch and each JAX variant (A B A B)
in one process; reported: the median images/s. Each line also gives the CPU that OTHER
processes used meanwhile ("others 0.02 cores"): re-run when it is not near 0. --jax_variants
takes benchmarks/jax_levers.py lever names, '+'-joined ("base" = config.CPU_SPEED); levers that
do not reach a model are dropped for it, and before timing, every variant is checked to lower
to another program than the same variant without each of its levers (an error otherwise).
FLOPs per step come from XLA's cost analysis of the compiled step; with --peak_tflops the
model FLOPs utilisation is printed too (GPU: e.g. 495 for an H100 SXM's dense TF32, which
JAX's default float32 precision uses for convolutions and matmuls there).

Device-agnostic: JAX runs on its default backend, PyTorch on CUDA when available (synchronised
before the clock stops). --ablation runs this script in subprocesses, one per XLA flag setting
(XLA_FLAGS is read when JAX is imported), the in-process levers in the first, and prints the
per-lever table (CPU only: the flags are XLA:CPU's).

Output: one line per measurement, then a markdown table: model, JAX variant, JAX img/s,
PyTorch img/s, ratio JAX/PyTorch.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

from absl import app, flags

import bench_util

FLAGS = flags.FLAGS
flags.DEFINE_list("models", ["cnn1", "cnn2", "wrn"], "cnn1, cnn2, wrn")
flags.DEFINE_integer("batch", 128, "batch size")
flags.DEFINE_integer("repeats", 5, "timed repetitions per side (median reported)")
flags.DEFINE_integer("steps", 2, "training steps per timed repetition")
flags.DEFINE_integer("warmup", 1, "untimed repetitions per side after compiling")
flags.DEFINE_integer("pgd_steps", 10, "PGD iterations of the attack")
flags.DEFINE_integer("wrn_depth", 16, "WideResNet depth (the paper's: 40)")
flags.DEFINE_integer("wrn_width", 4, "WideResNet widen factor (the paper's: 10)")
flags.DEFINE_enum("variant", "paper", ["paper", "official"],
                  "attack in eval mode (paper) or train mode (official), on both sides")
flags.DEFINE_float("lr", 0.01, "SGD learning rate")
flags.DEFINE_enum("pool_ties", "split", ["split", "first"], "the CNNs' max-pool tie rule "
                  "(models.build_model); with 'first' the pool has one form, so the xlapool "
                  "lever changes nothing and the self-check refuses it")
flags.DEFINE_list("jax_variants", ["base"], "JAX variants to time (benchmarks/jax_levers.py)")
flags.DEFINE_bool("torch", True, "time the PyTorch baseline")
flags.DEFINE_list("torch_layouts", ["nchw"], "PyTorch memory formats to time: nchw (the official "
                  "code's, the baseline of the ratio) and/or channels_last")
flags.DEFINE_bool("speed_flags", True, "append the project's CPU XLA flags (speed_flags.py)")
flags.DEFINE_string("xla_flags", "", "extra XLA flags, appended to XLA_FLAGS")
flags.DEFINE_float("peak_tflops", None, "device peak TFLOP/s (float32) for the MFU column")
flags.DEFINE_bool("ablation", False, "run the per-lever ablation (subprocesses)")
flags.DEFINE_list("ablation_flags", [
    "none",  # XLA's defaults: no XLA flags at all (YNNPACK takes the convolutions)
    "--xla_cpu_experimental_ynn_fusion_type=-individual_convolution",
    "--xla_cpu_experimental_ynn_fusion_type=-individual_convolution,-reduce,-individual_dot",
    "--xla_cpu_use_onednn=true",
    "--xla_cpu_enable_fast_math=true",
    "--xla_force_host_platform_device_count=2",  # one CPU device per core, the batch split
], "XLA flag settings the ablation tries, one subprocess each ('none': no XLA flags; "
   "';'-joined for several flags; the project's flags fill in the rest)")
flags.DEFINE_bool("json", False, "also print one 'RESULT {json}' line per measurement")

SHAPES = {"cnn1": (28, 28, 1), "cnn2": (28, 28, 1), "wrn": (32, 32, 3)}
EPS = {"cnn1": 0.1, "cnn2": 0.1, "wrn": 8 / 255}
IN_PROCESS_LEVERS = ("base,xlapool,xlaconv,biasfirst,flaxbn,xlapool+xlaconv+biasfirst+flaxbn,"
                     "rolled,unsafe_rbg,rbg")
BEST = "base"


def set_xla_flags():
    """--xla_flags first, then the project's speed flags for any flag not set there."""
    if FLAGS.xla_flags:
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " "
                                   + FLAGS.xla_flags.replace(";", " ")).strip()
    if FLAGS.speed_flags:
        from jax_robust.speed_flags import append_speed_flags

        append_speed_flags()


def build_step(arch, variant, x, y):
    """(lowered, (state, batch, key), lower_seconds): the project's AT step for `variant`,
    built, keyed and lowered under the variant's PRNG implementation."""
    import jax
    import jax.numpy as jnp
    import optax

    import jax_levers
    from jax_robust import methods, models, objectives, pipeline, recipes, step as steplib

    speed = jax_levers.parse(variant)
    eps = EPS[arch]
    hp = objectives.ObjectiveParams(eps=eps, step_size=eps / 5, steps=FLAGS.pgd_steps,
                                    variant=FLAGS.variant, hparams=(),
                                    unroll=speed.attack_unroll)
    optimizer = optax.sgd(FLAGS.lr, momentum=0.9)
    mesh = pipeline.make_mesh()
    with jax_levers.prng(variant):
        module = models.build_model(arch, 10, SHAPES[arch], dropout=recipes.ARCH_DROPOUT[arch],
                                    wrn_depth=FLAGS.wrn_depth, wrn_width=FLAGS.wrn_width,
                                    speed=speed, pool_ties=FLAGS.pool_ties)
        # The same initial parameters for every variant, whatever its PRNG implementation.
        params, model_state = models.init_model(
            module, jax.random.key(0, impl="threefry2x32"), SHAPES[arch])
        state = pipeline.replicate(mesh, steplib.TrainState(
            step=jnp.int32(0), params=params, model_state=model_state,
            opt_state=optimizer.init(params)))
        batch = pipeline.shard_batch(mesh, {"x": x, "y": y,
                                            "mask": jnp.ones(len(y), jnp.float32)})
        key = jax.random.key(1)  # the variant's PRNG implementation
        step = steplib.make_train_step(methods.get("at").objective,
                                       models.make_model_fn(module), optimizer, hp, mesh)
        start = time.perf_counter()
        lowered = step.lower(state, batch, key)
        lower_s = time.perf_counter() - start
    return lowered, (state, batch, key), lower_s


def jax_runner(built, steps):
    """(run, compile_seconds, flops_per_step) of a `build_step` result."""
    import jax

    lowered, (state, batch, key), lower_s = built
    start = time.perf_counter()
    compiled = lowered.compile()
    compile_s = lower_s + time.perf_counter() - start

    box = [state]

    def run():
        def go():
            s = box[0]
            for _ in range(steps):
                s, metrics = compiled(s, batch, key)
            jax.block_until_ready((s, metrics))
            box[0] = s
        return bench_util.timed(go)

    return run, compile_s, bench_util.flops_of(compiled)


def torch_runner(arch, x, y, steps, device, layout):
    import torch

    import torch_models

    torch.manual_seed(0)
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    model = torch_models.build(arch, FLAGS.wrn_depth, FLAGS.wrn_width).to(device,
                                                                          memory_format=fmt)
    optimizer = torch.optim.SGD(model.parameters(), lr=FLAGS.lr, momentum=0.9)
    xt = torch.from_numpy(x.transpose(0, 3, 1, 2).copy()).to(device).contiguous(
        memory_format=fmt)
    yt = torch.from_numpy(y.astype("int64")).to(device)
    eps = EPS[arch]
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def run():
        def go():
            for _ in range(steps):
                loss = torch_models.at_step(model, optimizer, xt, yt, eps, eps / 5,
                                            FLAGS.pgd_steps, FLAGS.variant == "official")
            loss.item()
            sync()
        return bench_util.timed(go)

    return run


def measure(arch):
    import numpy as np

    rng = np.random.default_rng(0)
    x = rng.random((FLAGS.batch, *SHAPES[arch]), dtype=np.float32)
    y = rng.integers(0, 10, FLAGS.batch).astype(np.int32)
    images = FLAGS.batch * FLAGS.steps
    runners, flops = {}, {}
    if FLAGS.torch:
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
        for layout in FLAGS.torch_layouts:
            runners[f"pytorch {layout}"] = torch_runner(arch, x, y, FLAGS.steps, device, layout)
    import jax_levers

    # A lever that does not reach this model is dropped from the variant.
    variants, timed = jax_levers.variants_for(FLAGS.jax_variants, arch)
    built = {}  # levers -> build_step result, kept for the variants to time

    def lower_text(v):
        result = build_step(arch, v, x, y)
        if frozenset(jax_levers.levers(v)) in timed:
            built[frozenset(jax_levers.levers(v))] = result
        return result[0].as_text()

    lower_text = jax_levers.memoised(lower_text)
    for variant in variants:
        jax_levers.check_changes(variant, lower_text)  # raises if a lever changed nothing
        result = built.pop(frozenset(jax_levers.levers(variant)), None)
        run, compile_s, flops[variant] = jax_runner(
            result or build_step(arch, variant, x, y), FLAGS.steps)
        runners["jax " + variant] = run
        print(f"{arch:<6} jax {variant:<18} compile {compile_s:6.1f} s, "
              f"{flops[variant] / 1e9:.1f} GFLOP/step (XLA cost analysis)")
    for _ in range(FLAGS.warmup):
        for run in runners.values():
            run()
    rates = bench_util.alternate(arch, runners, FLAGS.repeats, images)
    torch_rates = [rates.pop(f"pytorch {layout}") for layout in FLAGS.torch_layouts
                   if FLAGS.torch]
    torch_rate = torch_rates[0] if torch_rates else 0.0
    for layout, rate in zip(FLAGS.torch_layouts[1:], torch_rates[1:]):
        print(f"{arch:<6} pytorch {layout}: {rate:.1f} img/s, {rate / torch_rate:.2f}x the "
              f"{FLAGS.torch_layouts[0]} baseline")
    rows = []
    for variant in variants:
        rate = rates["jax " + variant]
        tflops = flops[variant] * rate / FLAGS.batch / 1e12
        mfu = f", MFU {100 * tflops / FLAGS.peak_tflops:.1f}%" if FLAGS.peak_tflops else ""
        print(f"{arch:<6} jax {variant:<18} {tflops * 1e3:.1f} GFLOP/s{mfu}")
        rows.append((arch, variant, rate, torch_rate))
        if FLAGS.json:
            print("RESULT " + json.dumps({"model": arch, "variant": variant, "jax": rate,
                                          "torch": torch_rate, "xla_flags": FLAGS.xla_flags,
                                          "speed_flags": FLAGS.speed_flags}))
    sys.stdout.flush()
    return rows


def ablation():
    """Subprocesses: the in-process levers with the project's flags, then each flag setting."""
    base = [sys.executable, os.path.abspath(__file__), "--json",
            f"--models={','.join(FLAGS.models)}", f"--batch={FLAGS.batch}",
            f"--repeats={FLAGS.repeats}", f"--steps={FLAGS.steps}", f"--warmup={FLAGS.warmup}",
            f"--pgd_steps={FLAGS.pgd_steps}", f"--variant={FLAGS.variant}",
            f"--wrn_depth={FLAGS.wrn_depth}", f"--wrn_width={FLAGS.wrn_width}"]
    settings = [("project flags", [f"--jax_variants={IN_PROCESS_LEVERS}"])]
    for flag in FLAGS.ablation_flags:
        settings.append((flag, [f"--jax_variants={BEST}", "--nospeed_flags"] if flag == "none"
                         else [f"--jax_variants={BEST}", f"--xla_flags={flag}"]))
    results = []
    for name, extra in settings:
        print(f"=== {name}", flush=True)
        env = dict(os.environ)
        env.pop("XLA_FLAGS", None)
        out = subprocess.run(base + extra, env=env, capture_output=True, text=True)
        for line in out.stdout.splitlines():
            if line.startswith("RESULT "):
                results.append((name, json.loads(line[7:])))
            else:
                print(line)
        if out.returncode:
            print(out.stderr[-3000:])
    print("\n| XLA flags | JAX variant | model | JAX img/s | PyTorch img/s | ratio | JAX vs base "
          "(same process) | ratio vs project flags |\n|---|---|---|---:|---:|---:|---:|---:|")
    for name, r in results:
        def find(setting, variant):
            return [s for n, s in results
                    if n == setting and s["model"] == r["model"] and s["variant"] == variant]

        same, project = find(name, "base"), find(settings[0][0], r["variant"])
        rel = f"{r['jax'] / same[0]['jax']:.2f}" if same else "n/a"
        ratio = r["jax"] / r["torch"]
        vs = (f"{ratio / (project[0]['jax'] / project[0]['torch']):.2f}"
              if project and name != settings[0][0] else "")
        print(f"| {name} | {r['variant']} | {r['model']} | {r['jax']:.1f} | {r['torch']:.1f} | "
              f"{ratio:.2f} | {rel} | {vs} |")


def main(argv):
    del argv
    if FLAGS.ablation:
        return ablation()
    set_xla_flags()
    bench_util.start_frameworks(torch=FLAGS.torch)
    print(f"AT step: PGD-{FLAGS.pgd_steps} ({FLAGS.variant} modes) + SGD-momentum, batch "
          f"{FLAGS.batch}, {FLAGS.steps} steps per repetition, {FLAGS.repeats} repetitions; "
          f"wrn = WRN-{FLAGS.wrn_depth}-{FLAGS.wrn_width}")
    sys.stdout.flush()
    rows = []
    for arch in FLAGS.models:
        rows += measure(arch)
    print(f"load average after: {bench_util.load_average()}")
    print(bench_util.summary(rows))


if __name__ == "__main__":
    app.run(main)
