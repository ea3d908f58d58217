"""Models: exact parameter counts (official figures), init, pooling, dropout, size checks."""

import dataclasses

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_robust import config, models, recipes
from jax_robust.errors import UserError


def n_params(module, shape):
    variables = jax.eval_shape(lambda: module.init(jax.random.key(0), jnp.zeros((1, *shape)),
                                                   train=False))
    return sum(int(np.prod(p.shape)) for p in jax.tree_util.tree_leaves(variables["params"]))


def wrn_param_count(depth, width, classes=10):
    """Hand count of TRADES' WRN: convs without bias, BN (2 per channel), dense."""
    n = (depth - 4) // 6
    widths = [16, 16 * width, 32 * width, 64 * width]
    total = 3 * 3 * 3 * 16
    c_in = 16
    for g in range(3):
        c = widths[g + 1]
        for i in range(n):
            total += 2 * c_in + 9 * c_in * c + 2 * c + 9 * c * c
            if c_in != c:
                total += c_in * c  # 1x1 shortcut
            c_in = c
    return total + 2 * c_in + c_in * classes + classes


def test_parameter_counts_match_the_official_nets():
    assert n_params(models.CNN1(), (28, 28, 1)) == 1_199_882
    assert n_params(models.CNN2(), (28, 28, 1)) == 312_202
    assert n_params(models.WideResNet(), (32, 32, 3)) == wrn_param_count(40, 10)
    assert n_params(models.WideResNet(depth=16, width=2), (32, 32, 3)) == wrn_param_count(16, 2)
    # torchvision resnet50 has 25,557,032 parameters with 1000 classes; 9 classes here.
    assert n_params(models.ResNet50(num_classes=9), (64, 64, 3)) == (
        25_557_032 - 2048 * 1000 - 1000 + 2048 * 9 + 9)


def test_cnn2_init_kaiming_convs_zero_last_layer():
    params, _ = models.init_model(models.CNN2(), jax.random.key(0), (28, 28, 1))
    last = params["TorchDense_2"]["Dense_0"]
    assert not np.any(np.asarray(last["kernel"])) and not np.any(np.asarray(last["bias"]))
    k = np.asarray(params["Conv_3"]["kernel"])  # 3x3x64x64, fan_in 576
    assert abs(k.std() - np.sqrt(2 / 576)) < 0.05 * np.sqrt(2 / 576)
    assert not np.any(np.asarray(params["Conv_3"]["bias"]))


@pytest.mark.parametrize("module,shape", [(models.CNN2(), (28, 28, 1)),
                                          (models.WideResNet(depth=10, width=1), (32, 32, 3))])
def test_init_compiled_for_speed_gives_the_default_programs_values(module, shape):
    params, state = models.init_model(module, jax.random.key(3), shape)
    variables = jax.jit(lambda k: module.init(  # XLA's default options
        {"params": k}, jnp.zeros((1, *shape)), train=False))(jax.random.key(3))
    assert models.INIT_COMPILER_OPTIONS  # the fast options are on
    chex.assert_trees_all_equal({"params": params, **state}, variables)  # bit for bit


def test_cnn1_torch_default_init_bounds():
    params, _ = models.init_model(models.CNN1(), jax.random.key(0), (28, 28, 1))
    fc1 = params["TorchDense_0"]["Dense_0"]
    bound = 1 / np.sqrt(9216)
    for a in (fc1["kernel"], fc1["bias"]):
        a = np.asarray(a)
        assert a.max() <= bound and a.min() >= -bound and a.max() > 0.9 * bound


def test_cnn1_conv_dropout_drops_whole_channels():
    module = models.CNN1(dropout=0.5)
    params, state = models.init_model(module, jax.random.key(0), (28, 28, 1))
    x = jax.random.uniform(jax.random.key(1), (4, 28, 28, 1))
    _, inter = module.apply({"params": params}, x, train=True,
                            rngs={"dropout": jax.random.key(2)},
                            capture_intermediates=lambda mdl, _: isinstance(mdl, nn.Dropout),
                            mutable=["intermediates"])
    maps = np.asarray(inter["intermediates"]["Dropout_0"]["__call__"][0])  # [4, 12, 12, 64]
    zero = np.all(maps == 0, axis=(1, 2))
    some = np.any(maps == 0, axis=(1, 2))
    np.testing.assert_array_equal(zero, some)  # a map is dropped whole or not at all
    assert 0.1 < zero.mean() < 0.45  # rate 0.25
    fn = models.make_model_fn(module)
    eval_a, _ = fn(params, state, x, False, None)
    eval_b, _ = fn(params, state, x, False, None)
    np.testing.assert_array_equal(eval_a, eval_b)


def test_arch_that_does_not_fit_is_refused_clearly():
    with pytest.raises(UserError, match="at least 16x16"):
        models.build_model("cnn2", 10, (8, 8, 1), dropout=0.5)
    with pytest.raises(UserError, match="6n\\+4"):
        models.build_model("wrn", 10, (32, 32, 3), dropout=0.0, wrn_depth=30)
    with pytest.raises(UserError, match="unknown arch"):
        models.build_model("vit", 10, (32, 32, 3), dropout=0.0)


def test_build_model_passes_dropout_speed_and_pool_ties_through():
    cnn1 = models.build_model("cnn1", 10, (28, 28, 1), dropout=0.3, speed=config.CPU_SPEED,
                              pool_ties="first")
    assert isinstance(cnn1, models.CNN1)
    assert (cnn1.dropout, cnn1.speed, cnn1.pool_ties) == (0.3, config.CPU_SPEED, "first")
    cnn2 = models.build_model("cnn2", 10, (28, 28, 1), dropout=0.5)
    assert (cnn2.speed, cnn2.pool_ties) == (config.PLAIN_SPEED, "split")  # the defaults
    wrn = models.build_model("wrn", 10, (32, 32, 3), dropout=0.0, wrn_depth=10, wrn_width=1,
                             speed=config.CPU_SPEED)
    assert (wrn.depth, wrn.width, wrn.speed) == (10, 1, config.CPU_SPEED)
    assert models.build_model("resnet50", 9, (64, 64, 3), dropout=0.0,
                              speed=config.CPU_SPEED).speed == config.CPU_SPEED
    with pytest.raises(TypeError):
        models.build_model("cnn1", 10, (28, 28, 1))  # dropout has no silent default
    # The modules' default rates are the official ones the recipes name.
    for arch, module in (("cnn1", models.CNN1()), ("cnn2", models.CNN2()),
                         ("wrn", models.WideResNet()), ("resnet50", models.ResNet50())):
        assert module.dropout == recipes.ARCH_DROPOUT[arch], arch


@pytest.mark.slow
@pytest.mark.parametrize("channel_sums", ["dot", "reduce"])
def test_batchnorm_state_updates_only_in_train_mode(channel_sums):
    speed = dataclasses.replace(config.PLAIN_SPEED, channel_sums=channel_sums)
    module = models.WideResNet(depth=10, width=1, speed=speed)
    params, state = models.init_model(module, jax.random.key(0), (32, 32, 3))
    fn = models.make_model_fn(module)
    x = jax.random.uniform(jax.random.key(1), (4, 32, 32, 3))
    _, same = fn(params, state, x, False, None)
    _, new = fn(params, state, x, True, jax.random.key(2))
    leaves = lambda t: jax.tree_util.tree_leaves(t)  # noqa: E731
    assert all(np.array_equal(a, b) for a, b in zip(leaves(state), leaves(same)))
    assert not all(np.array_equal(a, b) for a, b in zip(leaves(state), leaves(new)))
    # momentum 0.9 as PyTorch's 0.1: running mean = 0.9 * 0 + 0.1 * batch mean
    bn = new["batch_stats"]["WRNBlock_0"]["BatchNorm_0"]["mean"]  # reads the stem
    stem = module.apply({"params": params, **state}, x, train=False,
                        capture_intermediates=lambda mdl, _: isinstance(mdl, nn.Conv),
                        mutable=["intermediates"])[1]["intermediates"]["Conv_0"]["__call__"][0]
    np.testing.assert_allclose(bn, 0.1 * np.asarray(stem).mean(axis=(0, 1, 2)), rtol=1e-4,
                               atol=1e-6)
