"""Images/s of one adversarial-training step, the project's JAX step against PyTorch modes.

    python benchmarks/at_step.py                  # cnn1, cnn2, wrn-16-4; batch 128 (CPU: long)
    python benchmarks/at_step.py --models=cnn1,cnn2 --jax_variants=base,xlapool+xlaconv+biasfirst
    python benchmarks/at_step.py --models=cnn1,cnn2 --jax_variants=base,xlakernels   # oneDNN
    python benchmarks/at_step.py --models=cnn1 --torch_modes=torch_nchw,torch_compile_nograd
    python benchmarks/at_step.py --models=wrn --wrn_depth=40 --wrn_width=10 --peak_tflops=495
    python benchmarks/at_step.py --models=wrn --wrn_depth=40 --wrn_width=10 --dtype=bfloat16 \
        --peak_tflops=989    # GPU (H100/H200 SXM), bf16; benchmarks/gpu.sh runs both dtypes
    python benchmarks/at_step.py --ablation --models=cnn1,cnn2     # the CPU levers, one table
    python benchmarks/at_step.py --ablation --models=wrn --steps=1 --repeats=3   # flaxbn
    python benchmarks/at_step.py --models=cnn1 --repeats=1 --steps=1 --warmup=0 --pgd_steps=2 \
        --peak_size=1024 --torch_compile_cache     # a quick check that it runs

One step = PGD-10 on cross-entropy (random start U(-eps, eps) clipped to [0, 1], step eps/5,
sign ascent, projection and clip) + one SGD-momentum(0.9) update on CE(f(x_adv)), batch 128.
JAX: `step.make_train_step(methods.get("at").objective, ...)` on `models.build_model(...,
speed=...)`, jitted with the state donated. PyTorch: benchmarks/torch_models.py, the same
nets, `torch.set_num_threads(os.cpu_count())` (--notorch: JAX only, torch not imported), in
the modes of --torch_modes (default: all; torch_models.MODES):
  torch_nchw            eager, NCHW: the official code's
  torch_cl              eager, channels_last
  torch_nograd          eager, NCHW, the weights' requires_grad off during the attack (on again
                        for the update), as a careful PyTorch user writes it
  torch_compile         torch.compile(model), default mode
  torch_compile_nograd  torch.compile(model), requires_grad off during the attack (a compiled
                        backward computes the weight gradients unless they are off)
Modes match on both sides: --variant=paper (default) attacks in eval mode on both, --variant=
official in train mode on both (dropout masks, BatchNorm batch statistics); the update is in
train mode on both. Random data (MNIST-shaped 28x28x1 for the CNNs, eps 0.1; CIFAR-shaped
32x32x3 for the WRN, eps 8/255). --dtype=bfloat16: JAX builds the model with dtype=bfloat16
(inputs, weights and activations cast to bf16, float32 logits, float32 parameters); PyTorch
runs every forward pass (attack and update, every mode) under torch.autocast(bfloat16), the
weights float32, through a wrapper module that is compiled with the net in the compiled modes.

Timing: JAX's compile is timed apart (lower + compile); each PyTorch mode's first two steps
are timed and the compile time is the first's excess over the second (the compiled modes after
torch.compile's one-time start-up, printed apart, each from scratch: dynamo's graphs dropped,
a fresh empty inductor cache unless --torch_compile_cache; torch_models.compile_times); then
--warmup untimed repetitions, then --repeats repetitions of --steps steps each, alternating
every PyTorch mode and each JAX variant (A B C A B C) in one process; reported: the median
images/s. Each line also gives the CPU that OTHER processes used meanwhile ("others 0.02
cores"): re-run when it is not near 0. --jax_variants takes benchmarks/jax_levers.py lever
names, '+'-joined ("base" = config.CPU_SPEED); levers that do not reach a model are dropped for
it, and before timing, every variant is checked to lower to another program than the same
variant without each of its levers (an error otherwise).

FLOPs: counted analytically (benchmarks/flop_count.py: 2 x MACs of the convs and dense layers;
a PGD step = forward + input gradient of every layer, the update = forward + input gradients
of every layer but the first + weight gradients; CNN1 551.3, CNN2 457.4 MFLOP per image at
PGD-10) and by XLA's cost analysis of the compiled step; both are printed, and their ratio.
The peak is measured in the same run: the best GFLOP/s of a float32 --peak_size^3 matmul
(NumPy, JAX, PyTorch; bench_util.matmul_peak). Printed for JAX and the best PyTorch mode:
achieved GFLOP/s = analytic FLOPs x images/s, and its % of the measured peak (with
--peak_tflops, also of that nominal peak: e.g. 495 for an H100 SXM's dense TF32, which JAX's
default float32 precision uses for convolutions and matmuls there; with --dtype=bfloat16 pass
the dense bf16 peak, 989 on an H100/H200 SXM; the measured peak stays float32's).

Device-agnostic: JAX runs on its default backend, PyTorch on CUDA when available (synchronised
before the clock stops). --ablation runs this script in subprocesses, one per XLA flag setting
(XLA_FLAGS is read when JAX is imported), the in-process levers in the first, and prints the
per-lever table against the best PyTorch mode of each subprocess (CPU only: the flags are
XLA:CPU's).

Output: one line per measurement, then a markdown table: model, JAX variant (dtype), JAX img/s, the
img/s of every PyTorch mode, the best mode, ratio JAX / best mode, MFLOP/img analytic (XLA),
and the achieved GFLOP/s (% of the measured peak) of JAX and of the best mode. With --json, a
'RESULT {json}' line per model and variant: dtype, jax, torch (the best mode's img/s), best_torch,
ratio, torch_modes (img/s by mode), torch_compile_s, jax_compile_s, flops_analytic, flops_xla
(per image), peak_gflops, jax_gflops, best_torch_gflops, xla_flags, speed_flags.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import time

from absl import app, flags

import bench_util
import flop_count

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
flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "compute dtype: JAX's "
                  "models.build_model(dtype=...); PyTorch's forward passes under torch.autocast "
                  "(parameters float32 on both sides)")
flags.DEFINE_enum("pool_ties", "split", ["split", "first"], "the CNNs' max-pool tie rule "
                  "(models.build_model); with 'first' the pool has one form, so the xlapool "
                  "lever changes nothing and the self-check refuses it")
flags.DEFINE_list("jax_variants", ["base"], "JAX variants to time (benchmarks/jax_levers.py)")
flags.DEFINE_bool("torch", True, "time the PyTorch baselines")
bench_util.define_torch_and_peak_flags()
flags.DEFINE_bool("speed_flags", True, "append the project's CPU XLA flags (speed_flags.py)")
flags.DEFINE_string("xla_flags", "", "extra XLA flags, appended to XLA_FLAGS")
flags.DEFINE_float("peak_tflops", None, "nominal device peak TFLOP/s (of --dtype: dense TF32 "
                   "or bf16): also print the utilisation of it")
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
IN_PROCESS_LEVERS = ("base,sepconvpool,xlakernels,xlakernels+xlarows,xlapool,xlaconv,biasfirst,"
                     "flaxbn,xlapool+xlaconv+biasfirst+flaxbn+xlakernels,rolled,unsafe_rbg,rbg")
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
                                    dtype=FLAGS.dtype, speed=speed, pool_ties=FLAGS.pool_ties)
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

    # The step is partitioned over every device (pipeline.make_mesh()).
    return run, compile_s, bench_util.flops_of(compiled, jax.device_count())


def autocast_wrapper(net, device):
    """`net` whose forward runs under torch.autocast(bfloat16) and returns float32 logits, as
    the JAX model does: every forward pass of the attack and the update, the backward passes
    outside autocast (PyTorch's recipe); the weights stay float32. `prepare` compiles the
    wrapper in the compiled modes, so autocast is inside the compiled graph."""
    import torch

    class Autocast(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            with torch.autocast(device_type=device, dtype=torch.bfloat16):
                out = self.inner(x)
            return out.float()

    return Autocast(net)


def torch_runner(arch, x, y, steps, mode_name):
    """(run, one_step): `run` times `steps` PyTorch AT steps in mode `mode_name` (bench_util.
    TORCH_MODES; on CUDA when available) and returns the seconds; `one_step` makes one step."""
    import torch

    import torch_models

    device = torch_models.default_device()
    mode = torch_models.MODES[mode_name]
    torch.manual_seed(0)
    net = torch_models.build(arch, FLAGS.wrn_depth, FLAGS.wrn_width)
    if FLAGS.dtype == "bfloat16":
        net = autocast_wrapper(net, device)
    model, xt = torch_models.prepare(net, torch.from_numpy(x.transpose(0, 3, 1, 2).copy()), mode,
                                     device)
    optimizer = torch.optim.SGD(model.parameters(), lr=FLAGS.lr, momentum=0.9)
    yt = torch.from_numpy(y.astype("int64")).to(device)
    eps = EPS[arch]
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def go(n):
        for _ in range(n):
            loss = torch_models.at_step(model, optimizer, xt, yt, eps, eps / 5, FLAGS.pgd_steps,
                                        FLAGS.variant == "official", mode.no_weight_grad)
        loss.item()
        sync()

    return (lambda: bench_util.timed(lambda: go(steps))), (lambda: go(1))


def measure(arch, peak):
    """Times the modes and variants on `arch`; prints the lines; returns the bench_util.Rows."""
    import numpy as np

    rng = np.random.default_rng(0)
    x = rng.random((FLAGS.batch, *SHAPES[arch]), dtype=np.float32)
    y = rng.integers(0, 10, FLAGS.batch).astype(np.int32)
    images = FLAGS.batch * FLAGS.steps
    modes = bench_util.selected_modes(FLAGS.torch, FLAGS.torch_modes, FLAGS.torch_layouts)
    runners, compile_s = {}, {}
    if modes:
        import torch_models

        one_steps = {}
        for mode in modes:
            runners[mode], one_steps[mode] = torch_runner(arch, x, y, FLAGS.steps, mode)
        compile_s = torch_models.compile_times(arch, one_steps, FLAGS.torch_compile_cache)
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
    flops, jax_compile_s = {}, {}
    for variant in variants:
        jax_levers.check_changes(variant, lower_text)  # raises if a lever changed nothing
        result = built.pop(frozenset(jax_levers.levers(variant)), None)
        run, jax_compile_s[variant], flops[variant] = jax_runner(
            result or build_step(arch, variant, x, y), FLAGS.steps)
        runners["jax " + variant] = run
        print(f"{arch:<6} jax {variant:<18} compile {jax_compile_s[variant]:6.1f} s, "
              + bench_util.cost_analysis_text(flops[variant], "step", 1))
    for _ in range(FLAGS.warmup):
        for run in runners.values():
            run()
    rates = bench_util.alternate(arch, runners, FLAGS.repeats, images)
    torch_rates = {mode: rates.pop(mode) for mode in modes}
    analytic = flop_count.at_step_flops(
        flop_count.layer_macs(arch, FLAGS.wrn_depth, FLAGS.wrn_width), FLAGS.pgd_steps)
    rows = []
    for variant in variants:
        row = bench_util.Row(arch, variant, rates["jax " + variant], torch_rates, analytic,
                             flops[variant] / FLAGS.batch, peak)
        print(row.describe(FLAGS.peak_tflops))
        rows.append(row)
        if FLAGS.json:
            print("RESULT " + json.dumps({
                **row.result(), "dtype": FLAGS.dtype, "torch_compile_s": compile_s,
                "jax_compile_s": jax_compile_s[variant], "xla_flags": FLAGS.xla_flags,
                "speed_flags": FLAGS.speed_flags}))
    sys.stdout.flush()
    return rows


def ablation():
    """Subprocesses: the in-process levers with the project's flags, then each flag setting."""
    base = [sys.executable, os.path.abspath(__file__), "--json",
            f"--models={','.join(FLAGS.models)}", f"--batch={FLAGS.batch}",
            f"--repeats={FLAGS.repeats}", f"--steps={FLAGS.steps}", f"--warmup={FLAGS.warmup}",
            f"--pgd_steps={FLAGS.pgd_steps}", f"--variant={FLAGS.variant}",
            f"--dtype={FLAGS.dtype}",
            f"--wrn_depth={FLAGS.wrn_depth}", f"--wrn_width={FLAGS.wrn_width}",
            "--torch" if FLAGS.torch else "--notorch",
            "--torch_modes=" + ",".join(bench_util.selected_modes(True, FLAGS.torch_modes,
                                                                  FLAGS.torch_layouts)),
            f"--torch_compile_cache={FLAGS.torch_compile_cache}",
            f"--peak_size={FLAGS.peak_size}", f"--peak_repeats={FLAGS.peak_repeats}"]
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
    print("\n| XLA flags | JAX variant | model | JAX img/s | best PyTorch img/s (mode) | ratio | "
          "JAX vs base (same process) | ratio vs project flags |\n"
          "|---|---|---|---:|---:|---:|---:|---:|")
    for name, r in results:
        def find(setting, variant):
            return [s for n, s in results
                    if n == setting and s["model"] == r["model"] and s["variant"] == variant]

        same, project = find(name, "base"), find(settings[0][0], r["variant"])
        rel = f"{r['jax'] / same[0]['jax']:.2f}" if same else "n/a"
        best = f"{r['torch']:.1f} ({r['best_torch']})" if r["ratio"] else "n/a"
        ratio = f"{r['ratio']:.2f}" if r["ratio"] else "n/a"
        vs = (f"{r['ratio'] / project[0]['ratio']:.2f}" if r["ratio"] and project
              and project[0]["ratio"] and name != settings[0][0] else "")
        print(f"| {name} | {r['variant']} | {r['model']} | {r['jax']:.1f} | {best} | {ratio} | "
              f"{rel} | {vs} |")


def main(argv):
    del argv
    if FLAGS.ablation:
        return ablation()
    set_xla_flags()
    bench_util.start_frameworks(torch=FLAGS.torch, malloc=FLAGS.malloc)
    print(f"AT step: PGD-{FLAGS.pgd_steps} ({FLAGS.variant} modes) + SGD-momentum, batch "
          f"{FLAGS.batch}, {FLAGS.steps} steps per repetition, {FLAGS.repeats} repetitions; "
          f"wrn = WRN-{FLAGS.wrn_depth}-{FLAGS.wrn_width}; dtype {FLAGS.dtype} (JAX compute "
          f"dtype; PyTorch " + ("autocast bf16" if FLAGS.dtype == "bfloat16" else "float32")
          + ")")
    sys.stdout.flush()
    peak = bench_util.print_peak(FLAGS.peak_size, FLAGS.peak_repeats)
    rows = []
    for arch in FLAGS.models:
        rows += measure(arch, peak)
    print(f"load average after: {bench_util.load_average()}")
    # The dtype in the table's JAX column ("base (bfloat16)"); the RESULT lines keep the variant.
    print(bench_util.summary([dataclasses.replace(row, what=f"{row.what} ({FLAGS.dtype})")
                              for row in rows]))


if __name__ == "__main__":
    app.run(main)
