"""GPU and TPU programs lower on a CPU machine, and none calls CPU-only code.

No session had a GPU or TPU, so this is what shows the jitted training and evaluation steps
can be built for them: `jax.export.export(step, platforms=[p])` lowers each step to StableHLO
for p in ('cuda', 'tpu') with the configuration `recipes.resolve(cfg, 'gpu')` /
`recipes.resolve(cfg, 'tpu')` gives, from abstract inputs (`jax.ShapeDtypeStruct`): nothing is
compiled or run (jax 0.10.2 lowers for cuda and tpu without their plugins or hardware). Every
`stablehlo.custom_call` target of the exported module must be in ALLOWED_TARGETS[p]: a call
into oneDNN's CPU handler (jax_robust.onednn, `conv_kernels='onednn'`) or any other CPU-only
kernel (LAPACK, a host callback) would fail on those machines. jax.export's own check refuses
only targets without a compatibility guarantee, and it allows CPU-only LAPACK targets on a cuda
export: the per-platform allowlist is the stricter check. docs/export.md says more.

Coverage. All of methods x variants x archs x dtypes x platforms is 144 exports, about a minute
on 2 cores; these are about 70 (about 20 s), and they reach every code path the full product does:
  - every (method, variant) on CNN1 in float32: every objective's code (train- and eval-mode
    attacks, double back-propagation, the KL's third pass, finite differences) and both pool
    tie rules (the variants; official's is a custom VJP);
  - every method once on the WRN-10-1 (float32): the objectives with BatchNorm state threaded
    through them (AT official: the attack in train mode; RST paper: in eval mode; TRADES's
    third pass; LLR paper's double back-propagation through BatchNorm) and CIFAR-10's official
    augmentation inside the step. The objectives reach a model only through model_fn, so what
    the WRN adds over CNN1 is its layers and the BatchNorm state, not per-method code;
  - CNN2 (its later convs and two pools) with both variants in each dtype;
  - bfloat16 on every arch, both variants on the CNNs. The dtype changes casts and the dtype of
    convolutions and dots, never which function computes a layer: the routing to oneDNN
    (layers.first_conv_fn, later_conv_fn, ConvPool, models._conv) reads only the speed options
    and, once those chose oneDNN, the dtype;
  - the evaluation step (clean, PGD, the lipschitz ratios both ways) on every arch and dtype;
  - CNN1's AT step sharded over a 2-device mesh (batch on "data");
  - controls: the CPU speed options (oneDNN) exported for cuda are caught by the check, and
    jax's own threefry kernel (a flag) is the one allowlisted cuda target jax emits here.
The decisive check is that the plain speed options never route into oneDNN: they are the same
for every method, variant and dtype (test_gpu_and_tpu_speed_options_never_pick_onednn).
"""

import collections
import functools
import re

import jax
import jax.numpy as jnp
import pytest
from jax import export
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jax_robust import config as cfglib
from jax_robust import data as datalib
from jax_robust import methods, models, onednn, recipes
from jax_robust.evaluation import make_eval_step
from jax_robust.pipeline import make_mesh
from jax_robust.schedules import make_optimizer
from jax_robust.step import TrainState, make_train_step
from jax_robust.train import build_model, objective_params

# export platform -> recipes backend
PLATFORMS = {"cuda": "gpu", "tpu": "tpu"}
# XLA's SPMD partitioner markers: jax emits them for sharding constraints and shard_map when the
# Shardy partitioner is off (with it, the default, shardings are sdy attributes and no call);
# every backend's partitioner consumes them before code generation.
_SPMD = frozenset({"Sharding", "SPMDFullToShardShape", "SPMDShardToFullShape"})
ALLOWED_TARGETS = {
    # cu_threefry2x32_ffi: jax's threefry kernel under jax_threefry_gpu_kernel_lowering
    # (test_allowlisted_cuda_target_is_jax_threefry_kernel), registered by jaxlib's CUDA plugin.
    "cuda": _SPMD | {"cu_threefry2x32_ffi"},
    "tpu": _SPMD,
}
ONEDNN_TARGETS = frozenset({onednn.TARGET, *(name for name, _ in onednn.POOL_TARGETS.values())})
# arch -> (data set whose recipe it is resolved with, image shape): the official pairings.
ARCH_DATA = {"cnn1": ("digits", (8, 8, 1)), "cnn2": ("mnist", (28, 28, 1)),
             "wrn": ("cifar10", (32, 32, 3))}
METHOD_VARIANTS = [(m, v) for m in ("natural", "gr", "llr", "at", "trades", "rst")
                   for v in cfglib.VARIANTS]
BATCH = 4  # divisible by the 2 devices of the sharded case


def run_config(arch: str, method: str, variant: str, dtype: str) -> cfglib.RunConfig:
    dataset = ARCH_DATA[arch][0]
    return cfglib.RunConfig(
        data=cfglib.DataConfig(dataset),
        model=cfglib.ModelConfig(arch=arch, dtype=dtype, wrn_depth=10, wrn_width=1),
        train=cfglib.TrainConfig(method=method, variant=variant, batch_size=BATCH))


@functools.lru_cache(maxsize=None)
def steps(cfg: cfglib.RunConfig, devices: int = 1):
    """(train_step, its abstract arguments, eval_step, its abstract arguments) of a resolved
    config, as train.train_and_evaluate builds them. Cached: the gpu and tpu configs are equal
    today, so both exports of a step share one trace (jit's cache)."""
    dataset, shape = ARCH_DATA[cfg.model.arch]
    info = datalib.DatasetInfo(dataset, 10, 255, shape)
    module = build_model(cfg, info)
    model_fn = models.make_model_fn(module)
    mesh = make_mesh(jax.devices()[:devices])
    optimizer = make_optimizer(cfg.train, 10)
    hp = objective_params(cfg)
    train_step = make_train_step(methods.get(cfg.train.method).objective, model_fn, optimizer,
                                 hp, mesh, cfg.data.augment, shape[:2])
    e = cfg.eval
    eval_step = make_eval_step(model_fn, eps=hp.eps, attack_steps=cfg.attack.steps,
                               attack_step_size=hp.step_size, lip_steps=e.lipschitz_steps,
                               lip_step_size=e.lipschitz_step_size,
                               lip_restarts=e.lipschitz_restarts, unroll=hp.unroll, mesh=mesh,
                               lipschitz=True, ascent=True, image_hw=shape[:2])

    def init():
        variables = module.init({"params": jax.random.key(0)}, jnp.zeros((1, *shape)),
                                train=False)
        params = variables.pop("params")
        return TrainState(step=jnp.int32(0), params=params, model_state=dict(variables),
                          opt_state=optimizer.init(params))

    replicated, sharded = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
    state = jax.tree_util.tree_map(
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=replicated),
        jax.eval_shape(init))
    batch = {"x": jax.ShapeDtypeStruct((BATCH, *shape), jnp.float32, sharding=sharded),
             "y": jax.ShapeDtypeStruct((BATCH,), jnp.int32, sharding=sharded),
             "mask": jax.ShapeDtypeStruct((BATCH,), jnp.float32, sharding=sharded)}
    key = jax.ShapeDtypeStruct((), jax.random.key(0).dtype, sharding=replicated)
    return (train_step, (state, batch, key), eval_step,
            (state.params, state.model_state, batch, key))


def custom_call_targets(text: str) -> collections.Counter:
    """The custom_call targets of a StableHLO module's text, pretty or generic form; every
    mention of the op is accounted for."""
    found = (re.findall(r"stablehlo\.custom_call @([^\s(]+)\(", text)
             + re.findall(r'"stablehlo\.custom_call"\(.*?call_target_name = "([^"]+)"', text))
    assert len(found) == text.count("stablehlo.custom_call"), "an unparsed custom_call form"
    return collections.Counter(found)


def export_targets(fn, args, platform: str, **kw) -> tuple[export.Exported, collections.Counter]:
    exported = export.export(fn, platforms=[platform], **kw)(*args)
    assert exported.platforms == (platform,)
    return exported, custom_call_targets(exported.mlir_module())


def assert_valid_on(targets: collections.Counter, platform: str, what: str) -> None:
    bad = sorted(set(targets) - ALLOWED_TARGETS[platform])
    assert not bad, f"{what}: custom_call targets not valid on {platform}: {bad}"


def check_exports(arch, method, variant, dtype, *, train=True, evaluation=False,
                  devices=1) -> list[export.Exported]:
    """Exports the step(s) of a config for cuda and tpu, each with the config recipes.resolve
    gives that backend, and checks their custom_call targets; returns the exports."""
    out = []
    for platform, backend in PLATFORMS.items():
        cfg = recipes.resolve(run_config(arch, method, variant, dtype), backend,
                              devices=devices)
        train_step, train_args, eval_step, eval_args = steps(cfg, devices)
        what = f"{arch} {dtype} {method} ({variant})"
        programs = ([("train step", train_step, train_args)] if train else []) + (
            [("eval step", eval_step, eval_args)] if evaluation else [])
        for name, fn, args in programs:
            exported, targets = export_targets(fn, args, platform)
            assert exported.nr_devices == devices
            assert_valid_on(targets, platform, f"{what} {name}")
            out.append(exported)
    return out


def test_allowlists_exclude_onednn():
    assert not ONEDNN_TARGETS & (ALLOWED_TARGETS["cuda"] | ALLOWED_TARGETS["tpu"])


# See the module docstring for why these cover every code path.
CASES = ([("cnn1", m, v, "float32") for m, v in METHOD_VARIANTS]
         + [("wrn", "natural", "official", "float32"), ("wrn", "gr", "paper", "float32"),
            ("wrn", "llr", "paper", "float32"), ("wrn", "at", "official", "float32"),
            ("wrn", "rst", "paper", "float32"), ("wrn", "trades", "official", "float32"),
            ("cnn2", "gr", "official", "float32"), ("cnn2", "llr", "paper", "float32"),
            ("cnn1", "gr", "official", "bfloat16"), ("cnn1", "llr", "paper", "bfloat16"),
            ("cnn1", "rst", "official", "bfloat16"), ("cnn2", "at", "official", "bfloat16"),
            ("cnn2", "trades", "paper", "bfloat16"), ("wrn", "at", "official", "bfloat16")])


@pytest.mark.parametrize("arch,method,variant,dtype", CASES)
def test_train_step_lowers(arch, method, variant, dtype):
    check_exports(arch, method, variant, dtype)


@pytest.mark.parametrize("dtype", cfglib.DTYPES)
@pytest.mark.parametrize("arch", list(ARCH_DATA))
def test_eval_step_lowers(arch, dtype):
    """make_eval_step with PGD and the lipschitz ratios (descent and ascent)."""
    check_exports(arch, "natural", "official", dtype, train=False, evaluation=True)


def test_sharded_train_step_lowers():
    """CNN1's AT step over a 2-device mesh, the state replicated and the batch split on
    "data" (the shardings travel as Shardy attributes, no custom_call)."""
    if jax.device_count() < 2:
        pytest.skip("needs 2 devices (tests/conftest.py sets 2 CPU devices)")
    for exported in check_exports("cnn1", "at", "official", "float32", devices=2):
        text = exported.mlir_module()
        assert 'sdy.mesh @mesh = <["data"=2]>' in text
        assert 'sdy.sharding<@mesh, [{"data"}, {}, {}, {}]>' in text  # the images


def test_check_catches_onednn_in_a_cuda_program(monkeypatch):
    """Control: the CPU speed options route CNN1's convolutions into oneDNN; exported for cuda
    (jax's own refusal disabled) the check names the oneDNN targets. oneDNN's handler is
    neither built nor needed: lowering emits the call by name."""
    monkeypatch.setattr(onednn, "available", lambda: True)
    monkeypatch.setattr(onednn, "supports", lambda dtype: True)
    cfg = recipes.resolve(run_config("cnn1", "natural", "official", "float32"), "cpu")
    assert cfg.speed.conv_kernels == "onednn"
    step, args, _, _ = steps.__wrapped__(cfg)
    with pytest.raises(ValueError, match="custom calls"):
        export.export(step, platforms=["cuda"])(*args)
    disabled = [export.DisabledSafetyCheck.custom_call(t) for t in ONEDNN_TARGETS]
    _, targets = export_targets(step, args, "cuda", disabled_checks=disabled)
    assert set(targets) and set(targets) <= ONEDNN_TARGETS
    with pytest.raises(AssertionError, match="jax_robust_onednn_conv"):
        assert_valid_on(targets, "cuda", "cpu speed")


def test_allowlisted_cuda_target_is_jax_threefry_kernel():
    """Where the cuda allowlist's entry comes from: with jax_threefry_gpu_kernel_lowering,
    jax lowers the dropout's random bits to its own CUDA kernel; tpu keeps plain HLO."""
    cfg = recipes.resolve(run_config("cnn1", "natural", "official", "float32"), "gpu")
    previous = jax.config.jax_threefry_gpu_kernel_lowering
    jax.config.update("jax_threefry_gpu_kernel_lowering", True)
    try:
        step, args, _, _ = steps.__wrapped__(cfg)
        _, cuda = export_targets(step, args, "cuda")
        _, tpu = export_targets(step, args, "tpu")
    finally:
        jax.config.update("jax_threefry_gpu_kernel_lowering", previous)
    assert set(cuda) == {"cu_threefry2x32_ffi"} and not tpu
    assert_valid_on(cuda, "cuda", "threefry kernel")


def test_gpu_and_tpu_speed_options_never_pick_onednn():
    """What the exports above rest on: on both backends, on one device or several, the
    resolved speed options leave oneDNN's convolutions (and its fused conv + pool) out."""
    for backend in PLATFORMS.values():
        for devices in (1, 2):
            speed = recipes.resolve(run_config("cnn1", "at", "official", "float32"), backend,
                                    devices=devices).speed
            assert speed.conv_kernels != "onednn" and speed.conv_pool != "fused"
