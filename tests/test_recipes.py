"""recipes.resolve: every None filled once from the data set's recipe, the arch, the method
registry and the backend; the result round-trips through results.json's dict."""

import dataclasses

import pytest

from jax_robust import config as cfglib
from jax_robust import recipes
from jax_robust.errors import UserError


def resolved(backend="cpu", **train):
    dataset = train.pop("dataset", "mnist")
    return recipes.resolve(cfglib.RunConfig(data=cfglib.DataConfig(dataset),
                                            train=cfglib.TrainConfig(**train)), backend)


def test_official_schedules_translated_to_mean_losses():
    t = resolved(method="trades").train
    assert (t.epochs, t.batch_size, t.optimizer, t.momentum) == (160, 64, "sgd", 0.9)
    assert t.lr == pytest.approx(1e-4 * 64) and t.milestones == (40, 80, 120, 140)
    assert t.hparams == (("beta", 6.0),)
    at = resolved(method="at", dataset="cifar10").train
    nat = resolved(method="natural", dataset="cifar10").train
    assert at.lr == pytest.approx(1e-3 * 64) and nat.lr == pytest.approx(1e-2 * 64)
    assert at.momentum == 0.0 and at.milestones == (40, 80, 100) and at.epochs == 120
    svhn = resolved(method="llr", dataset="svhn").train
    assert svhn.lr == pytest.approx(1e-3 * 64) and svhn.epochs == 60
    assert svhn.hparams == (("lam", 4.0), ("llr_steps", 2), ("mu", 3.0))
    rimg = resolved(method="rst", dataset="restricted_imagenet").train
    assert (rimg.optimizer, rimg.lr, rimg.batch_size) == ("adam", 1e-2, 128)
    given = resolved(lr=0.5, epochs=3, milestones=(2,)).train
    assert (given.lr, given.epochs, given.milestones) == (0.5, 3, (2,))
    assert resolved(batch_size=128).train.lr == pytest.approx(1e-4 * 128)


def test_eps_augmentation_dropout_and_pool_ties_come_from_one_place_each():
    c = resolved(dataset="cifar10")
    assert (c.attack.eps, c.attack.step_size, c.data.augment) == (0.031, 0.031 / 5, "crop_flip")
    assert c.model.dropout == 0.5 and c.model.pool_ties == "first"  # cnn1, official
    paper = resolved(variant="paper")
    assert paper.model.pool_ties == "split" and paper.attack.eps == 0.1
    wrn = recipes.resolve(cfglib.RunConfig(model=cfglib.ModelConfig("wrn", dropout=0.2)), "cpu")
    assert wrn.model.dropout == 0.2 and wrn.data.augment == "none"
    assert recipes.resolve(cfglib.RunConfig(model=cfglib.ModelConfig("wrn")),
                           "cpu").model.dropout == 0.0


def test_speed_defaults_depend_on_the_backend_and_a_given_option_wins():
    assert resolved("cpu").speed == cfglib.CPU_SPEED
    assert resolved("gpu").speed == cfglib.PLAIN_SPEED
    cfg = cfglib.RunConfig(speed=cfglib.SpeedConfig(attack_unroll=True, pool_grad="autodiff"))
    gpu = recipes.resolve(cfg, "gpu").speed
    assert gpu.attack_unroll is True and gpu.pool_grad == "autodiff"
    assert gpu.channel_sums == "reduce"


def test_onednn_convs_only_where_they_can_run_and_asked_for_ones_are_refused_elsewhere():
    plain = cfglib.RunConfig()
    assert recipes.resolve(plain, "cpu").speed.conv_kernels == "onednn"
    assert recipes.resolve(plain, "cpu", devices=2).speed.conv_kernels == "xla"
    assert recipes.resolve(plain, "cpu", onednn_missing="no compiler").speed.conv_kernels == "xla"
    assert recipes.resolve(plain, "gpu").speed.conv_kernels == "xla"
    asked = cfglib.RunConfig(speed=cfglib.SpeedConfig(conv_kernels="onednn"))
    for kwargs, needle in (({"devices": 2}, "one CPU device; this run has 2"),
                           ({"onednn_missing": "no compiler"}, "unavailable here: no compiler")):
        with pytest.raises(UserError, match=needle):
            recipes.resolve(asked, "cpu", **kwargs)
    with pytest.raises(UserError, match="XLA:CPU only"):
        recipes.resolve(asked, "gpu")
    # The other CPU levers stay on where oneDNN cannot run; the conv + pool fusion needs it.
    two = recipes.resolve(plain, "cpu", devices=2).speed
    assert two.conv_pool == "separate"
    assert dataclasses.replace(two, conv_kernels="onednn", conv_pool="fused") == cfglib.CPU_SPEED


def test_conv_pool_fusion_only_with_onednn_convs_and_the_corners_pool():
    def speed(**fields):
        return cfglib.RunConfig(speed=cfglib.SpeedConfig(**fields))

    assert recipes.resolve(speed(), "cpu").speed.conv_pool == "fused"
    assert recipes.resolve(speed(conv_kernels="xla"), "cpu").speed.conv_pool == "separate"
    assert recipes.resolve(speed(pool_grad="autodiff"), "cpu").speed.conv_pool == "separate"
    assert recipes.resolve(speed(), "gpu").speed.conv_pool == "separate"
    assert recipes.resolve(speed(conv_pool="separate"), "cpu").speed.conv_pool == "separate"
    for fields, kwargs in (({"conv_kernels": "xla"}, {}), ({"pool_grad": "autodiff"}, {}),
                           ({}, {"devices": 2}), ({}, {"onednn_missing": "no compiler"})):
        with pytest.raises(UserError, match="conv_pool=fused needs conv_kernels=onednn"):
            recipes.resolve(speed(conv_pool="fused", **fields), "cpu", **kwargs)


def test_resolve_is_idempotent_complete_and_round_trips():
    for cfg in (resolved(method="gr"), resolved(method="rst", hparams=(("lam", 2.0),)),
                resolved("gpu", dataset="svhn", method="at")):
        assert recipes.is_resolved(cfg)
        assert recipes.resolve(cfg, "cpu") == cfg  # a resolved config keeps its settings
        assert cfglib.from_dict(cfg.to_dict()) == cfg
    assert not recipes.is_resolved(cfglib.RunConfig())
    with pytest.raises(UserError, match="unknown config settings"):
        cfglib.from_dict({**resolved().to_dict(), "colour": "red"})


@pytest.mark.parametrize("change,needle", [
    (dict(data=cfglib.DataConfig("imagenet21k")), "unknown dataset"),
    (dict(train=cfglib.TrainConfig(method="adversarial")), "unknown method"),
    (dict(train=cfglib.TrainConfig(method="at", hparams=(("lam", 1.0),))),
     "method at has no hyperparameter lam"),
    (dict(train=cfglib.TrainConfig(method="trades", hparams=(("beta", -1.0),))),
     "beta must be a non-negative number"),
    (dict(speed=cfglib.SpeedConfig(channel_sums="magic")), "unknown channel_sums"),
    (dict(model=cfglib.ModelConfig(pool_ties="last")), "unknown pool_ties"),
    (dict(attack=cfglib.AttackConfig(eps=8.0)), "larger than the whole pixel range"),
])
def test_bad_settings_are_refused_naming_them(change, needle):
    with pytest.raises(UserError, match=needle):
        recipes.resolve(dataclasses.replace(cfglib.RunConfig(), **change), "cpu")
