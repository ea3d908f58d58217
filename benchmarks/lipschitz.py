"""Images/s of the "test lipschitz" estimate: `lipschitz_estimate(direction="descent")` against
the official PyTorch procedure (`estimate_local_lip_v2`, docs/official_code.md section 11) in several
PyTorch modes.

    python benchmarks/lipschitz.py                       # cnn1, cnn2; batch 128
    python benchmarks/lipschitz.py --models=cnn2 --batch=512 --repeats=9
    python benchmarks/lipschitz.py --torch_recompute_fx  # PyTorch as coded: f(x) every step
    python benchmarks/lipschitz.py --jax_variants=base,xlapool+xlaconv+biasfirst  # jax_levers.py
    python benchmarks/lipschitz.py --torch_modes=torch_nchw,torch_compile_nograd
    python benchmarks/lipschitz.py --notorch             # JAX only (torch not imported)
    python benchmarks/lipschitz.py --models=cnn1 --repeats=1 --calls=1 --warmup=0 --steps=2 \
        --peak_size=1024 --torch_compile_cache     # a quick check that it runs

Per batch: x' = x + 0.001 N(0, 1); 10 (--steps) times x' <- clip(proj_eps(x' + 0.003
sign(grad(-R)))), R the batch mean of ||f(x) - f(x')||_1 / ||(x - x') + 1e-6||_inf on logits
(eval mode); then r at the final x'. Both sides use the same weights (the Flax init, copied
into the PyTorch net; CNN2's zero-initialised last layer is replaced by small random weights so
the ratios are not all 0) and the same MNIST-shaped random data, eps 0.1; the mean estimate of
each side is printed as a check (the noise differs, so they agree roughly, not exactly). f(x)
is computed once on both sides unless --torch_recompute_fx (the official code recomputes it
each step).

PyTorch modes (--torch_modes, default all; torch_models.MODES): torch_nchw (eager, NCHW: the
official code's), torch_cl (eager, channels_last), torch_nograd (eager, NCHW, the weights'
requires_grad off throughout: the estimate needs only the input's gradient), torch_compile
(torch.compile(model), default mode), torch_compile_nograd (compiled, requires_grad off).

Timing as benchmarks/at_step.py: JAX's compile apart; each PyTorch mode's first two batches
timed, its compile time the first's excess over the second (compiled modes from scratch,
after torch.compile's start-up); --warmup, then --repeats repetitions of --calls batches each,
alternating every PyTorch mode and each JAX variant (each --jax_variants entry: the library's
`lipschitz_estimate` on `models.build_model(..., speed=jax_levers.parse(variant))`, with
`unroll=speed.attack_unroll`; "base" = config.CPU_SPEED); median images/s. Levers that do not
reach a model are dropped for it; every variant is checked, before timing, to lower to another
program than the same variant without each of its levers.

FLOPs per image: analytic (benchmarks/flop_count.py: f(x) once, --steps steps of forward +
input gradient, f(x') once: 22 forwards' worth at 10 steps, CNN1 527.7, CNN2 437.9 MFLOP;
--torch_recompute_fx's extra f(x) per step is not counted) and XLA's cost analysis,
both printed with their ratio; achieved GFLOP/s (analytic FLOPs x images/s) and % of the
float32 matmul peak measured in the same run (--peak_size), for JAX and the best PyTorch mode.
Output: the final markdown table has the columns of benchmarks/at_step.py's (every mode's
img/s, ratio JAX / best mode, FLOPs, GFLOP/s); --json adds a 'RESULT {json}' line per model and
variant with the same fields as at_step.py's.
"""

from __future__ import annotations

import json
import sys
import time

from absl import app, flags

import bench_util
import flop_count

FLAGS = flags.FLAGS
flags.DEFINE_list("models", ["cnn1", "cnn2"], "cnn1, cnn2")
flags.DEFINE_integer("batch", 128, "batch size")
flags.DEFINE_integer("repeats", 5, "timed repetitions per side (median reported)")
flags.DEFINE_integer("calls", 4, "batches per timed repetition")
flags.DEFINE_integer("warmup", 1, "untimed repetitions per side after compiling")
flags.DEFINE_float("eps", 0.1, "ball radius (MNIST's)")
flags.DEFINE_integer("steps", 10, "descent steps of the estimate (the official 10)")
bench_util.define_torch_and_peak_flags()
flags.DEFINE_bool("torch_recompute_fx", False, "PyTorch evaluates f(x) in every step, as coded")
flags.DEFINE_bool("speed_flags", True, "append the project's CPU XLA flags (speed_flags.py)")
flags.DEFINE_list("jax_variants", ["base"], "JAX variants (benchmarks/jax_levers.py)")
flags.DEFINE_float("peak_tflops", None, "nominal device peak TFLOP/s (float32): also print the "
                   "utilisation of it")
flags.DEFINE_bool("torch", True, "time the PyTorch baselines")
flags.DEFINE_bool("json", False, "also print one 'RESULT {json}' line per model and variant")

SHAPE = (28, 28, 1)


def torch_state_dict(arch, params):
    """The Flax CNN params as the PyTorch net's state_dict (OIHW convs, NCHW-ordered fc1)."""
    import numpy as np
    import torch

    convs = [k for k in params if k.startswith("Conv_")]
    denses = [k for k in params if k.startswith("TorchDense_")]
    conv_names = {"cnn1": ["conv1", "conv2"],
                  "cnn2": ["features.0", "features.2", "features.5", "features.7"]}[arch]
    dense_names = {"cnn1": ["fc1", "fc2"],
                   "cnn2": ["classifier.0", "classifier.3", "classifier.5"]}[arch]
    out = {}
    for flax_name, name in zip(sorted(convs), conv_names):
        out[name + ".weight"] = np.asarray(params[flax_name]["kernel"]).transpose(3, 2, 0, 1)
        out[name + ".bias"] = np.asarray(params[flax_name]["bias"])
    for i, (flax_name, name) in enumerate(zip(sorted(denses), dense_names)):
        kernel = np.asarray(params[flax_name]["Dense_0"]["kernel"])
        if i == 0:  # rows in NHWC flatten order -> NCHW
            c = 64
            hw = int(round((kernel.shape[0] / c) ** 0.5))
            kernel = kernel.reshape(hw, hw, c, -1).transpose(2, 0, 1, 3).reshape(
                kernel.shape[0], -1)
        out[name + ".weight"] = kernel.T
        out[name + ".bias"] = np.asarray(params[flax_name]["Dense_0"]["bias"])
    return {k: torch.from_numpy(np.array(v)) for k, v in out.items()}


def measure(arch, peak):
    import jax
    import jax.numpy as jnp
    import numpy as np

    import jax_levers
    from jax_robust import models, recipes
    from jax_robust.lipschitz import lipschitz_estimate

    def build_model(variant):
        return models.build_model(arch, 10, SHAPE, dropout=recipes.ARCH_DROPOUT[arch],
                                  speed=jax_levers.parse(variant))

    params, _ = models.init_model(build_model("base"), jax.random.key(0, impl="threefry2x32"),
                                  SHAPE)
    params = jax.tree_util.tree_map(  # CNN2's zero last layer (and zero biases) -> random
        lambda p: p if jnp.any(p) else 0.05 * jax.random.normal(
            jax.random.key(2, impl="threefry2x32"), p.shape), params)
    variables = {"params": params}

    rng = np.random.default_rng(0)
    x = rng.random((FLAGS.batch, *SHAPE), dtype=np.float32)
    x_jax = jnp.asarray(x)

    def lower(variant):
        """(lowered estimate, key, lower seconds) for `variant`, under its PRNG setting."""
        with jax_levers.prng(variant):
            mod = build_model(variant)  # a fresh module and closure: a fresh trace

            def apply_fn(v, z, mod=mod):
                return mod.apply(v, z, train=False)

            key = jax.random.key(1)
            start = time.perf_counter()
            lowered = lipschitz_estimate.lower(
                apply_fn=apply_fn, params=variables, x=x_jax, eps=FLAGS.eps, key=key,
                direction="descent", steps=FLAGS.steps,
                unroll=jax_levers.parse(variant).attack_unroll)
            return lowered, key, time.perf_counter() - start

    # A lever that does not reach this model is dropped from the variant.
    variants, timed = jax_levers.variants_for(FLAGS.jax_variants, arch)
    lowerings = {}

    def lower_text(v):
        result = lower(v)
        if frozenset(jax_levers.levers(v)) in timed:
            lowerings[frozenset(jax_levers.levers(v))] = result
        return result[0].as_text()

    lower_text = jax_levers.memoised(lower_text)
    compiled, flops, keys, jax_compile_s = {}, {}, {}, {}
    for variant in variants:
        jax_levers.check_changes(variant, lower_text)  # raises if a lever changed nothing
        lowered, keys[variant], lower_s = (lowerings.pop(frozenset(jax_levers.levers(variant)),
                                                         None) or lower(variant))
        start = time.perf_counter()
        compiled[variant] = lowered.compile()
        jax_compile_s[variant] = lower_s + time.perf_counter() - start
        flops[variant] = bench_util.flops_of(compiled[variant])
        print(f"{arch:<6} jax {variant:<18} compile {jax_compile_s[variant]:6.1f} s, "
              + bench_util.cost_analysis_text(flops[variant], "batch", 2))

    modes = bench_util.selected_modes(FLAGS.torch, FLAGS.torch_modes, FLAGS.torch_layouts)
    means = {name: [] for name in modes + [f"jax {v}" for v in variants]}

    def torch_runner(mode_name):
        """(run, one_call): `run` times --calls batches in the mode and returns the seconds."""
        import torch

        import torch_models

        device = torch_models.default_device()
        sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
        mode = torch_models.MODES[mode_name]
        net = torch_models.build(arch)
        net.load_state_dict(torch_state_dict(arch, params))
        net.requires_grad_(not mode.no_weight_grad)  # the estimate needs no weight gradients
        net, xt = torch_models.prepare(net, torch.from_numpy(x.transpose(0, 3, 1, 2).copy()),
                                       mode, device)

        def go(calls):
            for _ in range(calls):
                total = torch_models.lipschitz(net, xt, FLAGS.eps, steps=FLAGS.steps,
                                               recompute_fx=FLAGS.torch_recompute_fx)
            means[mode_name].append(total.item() / FLAGS.batch)
            sync()
        return (lambda: bench_util.timed(lambda: go(FLAGS.calls))), (lambda: go(1))

    def jax_runner(fn, key, name):
        def run():
            def go():
                outs = [fn(params=variables, x=x_jax, eps=FLAGS.eps,
                           key=jax.random.fold_in(key, i)) for i in range(FLAGS.calls)]
                jax.block_until_ready(outs)
                means[name].append(float(jnp.mean(outs[-1])))
            return bench_util.timed(go)
        return run

    runners, compile_s = {}, {}
    if modes:
        import torch_models

        one_calls = {}
        for mode in modes:
            runners[mode], one_calls[mode] = torch_runner(mode)
        compile_s = torch_models.compile_times(arch, one_calls, FLAGS.torch_compile_cache)
    runners.update({f"jax {v}": jax_runner(compiled[v], keys[v], f"jax {v}") for v in variants})
    for _ in range(FLAGS.warmup):
        for run in runners.values():
            run()
    rates = bench_util.alternate(arch, runners, FLAGS.repeats, FLAGS.batch * FLAGS.calls)
    print(f"{arch:<6} mean estimate: " + ", ".join(
        f"{name} {np.mean(m):.4f}" for name, m in means.items()))
    torch_rates = {mode: rates[mode] for mode in modes}
    analytic = flop_count.lipschitz_flops(flop_count.layer_macs(arch), FLAGS.steps)
    rows = []
    for v in variants:
        row = bench_util.Row(arch, f"lipschitz_estimate {v}", rates[f"jax {v}"], torch_rates,
                             analytic, flops[v] / FLAGS.batch, peak)
        print(row.describe(FLAGS.peak_tflops))
        rows.append(row)
        if FLAGS.json:
            print("RESULT " + json.dumps({**row.result(), "torch_compile_s": compile_s,
                                          "jax_compile_s": jax_compile_s[v]}))
    sys.stdout.flush()
    return rows


def main(argv):
    del argv
    if FLAGS.speed_flags:
        from jax_robust.speed_flags import append_speed_flags

        append_speed_flags()
    bench_util.start_frameworks(torch=FLAGS.torch, malloc=FLAGS.malloc)
    print(f"lipschitz (descent, {FLAGS.steps} steps of 0.003, eps {FLAGS.eps}), batch "
          f"{FLAGS.batch}, {FLAGS.calls} batches per repetition, {FLAGS.repeats} repetitions; " + (
              f"PyTorch {'recomputes' if FLAGS.torch_recompute_fx else 'computes once'} f(x)"
              if FLAGS.torch else "PyTorch not used"))
    sys.stdout.flush()
    peak = bench_util.print_peak(FLAGS.peak_size, FLAGS.peak_repeats)
    rows = [row for arch in FLAGS.models for row in measure(arch, peak)]
    print(f"load average after: {bench_util.load_average()}")
    print(bench_util.summary(rows))


if __name__ == "__main__":
    app.run(main)
