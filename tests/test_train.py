"""The training loop: official schedules, batching, evaluation counts, devices, resume."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jax_robust import config as cfglib
from jax_robust import data, models, train
from jax_robust.objectives import OBJECTIVES, ObjectiveParams


def test_official_schedules_translated_to_mean_losses():
    s = train.resolve_schedule(cfglib.TrainConfig(method="trades"), "mnist")
    assert (s.epochs, s.batch_size, s.optimizer, s.momentum) == (160, 64, "sgd", 0.9)
    assert s.lr == pytest.approx(1e-4 * 64) and s.milestones == (40, 80, 120, 140)
    at = train.resolve_schedule(cfglib.TrainConfig(method="at"), "cifar10")
    nat = train.resolve_schedule(cfglib.TrainConfig(method="natural"), "cifar10")
    assert at.lr == pytest.approx(1e-3 * 64) and nat.lr == pytest.approx(1e-2 * 64)
    assert at.momentum == 0.0 and at.milestones == (40, 80, 100) and at.epochs == 120
    svhn = train.resolve_schedule(cfglib.TrainConfig(method="llr"), "svhn")
    assert svhn.lr == pytest.approx(1e-3 * 64) and svhn.epochs == 60
    rimg = train.resolve_schedule(cfglib.TrainConfig(method="rst"), "restricted_imagenet")
    assert (rimg.optimizer, rimg.lr, rimg.batch_size) == ("adam", 1e-2, 128)
    flags = train.resolve_schedule(cfglib.TrainConfig(lr=0.5, epochs=3, milestones=(2,)),
                                   "mnist")
    assert (flags.lr, flags.epochs, flags.milestones) == (0.5, 3, (2,))


def test_lr_drops_tenfold_after_each_milestone_epoch():
    sched = train.Schedule(epochs=4, batch_size=8, optimizer="sgd", lr=1.0, momentum=0.0,
                           milestones=(1, 3))
    opt = train.make_optimizer(sched, steps_per_epoch=2)
    params = jnp.zeros(())
    state = opt.init(params)
    lrs = []
    for _ in range(8):
        updates, state = opt.update(jnp.ones(()), state, params)
        lrs.append(-float(updates))
    np.testing.assert_allclose(lrs, [1, 1, .1, .1, .1, .1, .01, .01], rtol=1e-6)


def test_summed_loss_sgd_equals_mean_loss_sgd_times_batch():
    # The official code sums the loss; ours divides the sum by B. SGD with momentum on the
    # mean loss with lr x B must take exactly the official steps, the short batch included.
    rng = np.random.default_rng(0)
    w0 = jnp.asarray(rng.normal(size=(5,)))
    xs = jnp.asarray(rng.normal(size=(3, 8, 5)))
    mask = jnp.asarray(np.r_[np.ones(5), np.zeros(3)])
    masks = [jnp.ones(8), jnp.ones(8), mask]

    def run(loss_of, lr):
        opt, w = optax.sgd(lr, momentum=0.9), w0
        state = opt.init(w)
        for x, m in zip(xs, masks):
            updates, state = opt.update(jax.grad(loss_of)(w, x, m), state, w)
            w = optax.apply_updates(w, updates)
        return w

    summed = run(lambda w, x, m: jnp.sum(m * jnp.tanh(x @ w) ** 2), 1e-3)
    mean = run(lambda w, x, m: jnp.sum(m * jnp.tanh(x @ w) ** 2) / 8, 1e-3 * 8)
    np.testing.assert_allclose(mean, summed, rtol=1e-6)


def test_padded_batch_repeats_and_masks():
    idx, mask = train.padded_batch(np.array([7, 3, 9]), 8)
    np.testing.assert_array_equal(idx, [7, 3, 9, 7, 3, 9, 7, 3])
    np.testing.assert_array_equal(mask, [1, 1, 1, 0, 0, 0, 0, 0])
    order = train.epoch_order(10, seed=0, epoch=1)
    np.testing.assert_array_equal(order, train.epoch_order(10, seed=0, epoch=1))
    assert sorted(order) == list(range(10))
    assert not np.array_equal(order, train.epoch_order(10, seed=0, epoch=2))


def test_evaluate_counts_every_example_exactly_once():
    # 37 points, batches of 8 over 2 devices: the last batch is padded and masked.
    module = models.Linear(num_classes=3)
    params, state = models.init_model(module, jax.random.key(0), (2, 2, 1))
    x = np.random.default_rng(0).uniform(0, 1, (37, 2, 2, 1)).astype(np.float32)
    logits = np.asarray(module.apply({"params": params}, x, train=False))
    y = np.argmax(logits, 1).astype(np.int32)
    y[:10] = (y[:10] + 1) % 3  # exactly 10 wrong
    mesh = train.make_mesh()
    assert mesh.size == 2
    step = train.make_eval_step(models.make_model_fn(module), eps=0.0, attack_steps=2,
                                attack_step_size=0.0, lip_steps=2, lip_step_size=0.003,
                                lip_restarts=1, mesh=mesh)
    out = train.evaluate(step, params, state, x, y, jax.random.key(1), batch_size=8,
                         mesh=mesh, ascent=True, log=lambda _: None)
    assert out["acc"] == pytest.approx(100 * 27 / 37)
    assert out["adv_acc"] == pytest.approx(100 * 27 / 37)  # eps = 0: PGD changes nothing
    with pytest.raises(Exception, match="multiple of the 2 devices"):
        train.evaluate(step, params, state, x, y, jax.random.key(1), batch_size=7, mesh=mesh,
                       ascent=False)


def test_train_step_compiles_once_for_the_short_last_batch():
    module = models.CNN1(dropout=0.5)
    model_fn = models.make_model_fn(module)
    params, state = models.init_model(module, jax.random.key(0), (8, 8, 1))
    opt = optax.sgd(0.1)
    mesh = train.make_mesh()
    hp = ObjectiveParams(eps=0.1, step_size=0.02, steps=2)
    step = train.make_train_step(OBJECTIVES["at"], model_fn, opt, hp, mesh)
    ts = train.replicate(mesh, train.TrainState(jnp.int32(0), params, state, opt.init(params)))
    ds = data.load_dataset("digits", max_train=20)
    for idx in (np.arange(8), np.arange(8, 16), np.arange(16, 20)):
        i, m = train.padded_batch(idx, 8)
        batch = train.shard_batch(mesh, {"x": ds.x_train[i], "y": ds.y_train[i], "mask": m})
        ts, metrics = step(ts, batch, jax.random.key(0))
    assert int(ts.step) == 3 and float(metrics["count"]) == 4
    assert step._cache_size() == 1


SMALL = cfglib.RunConfig(
    data=cfglib.DataConfig("digits", max_train=160, max_test=60),
    train=cfglib.TrainConfig(method="trades", epochs=2, batch_size=32, milestones=(1,)),
    eval=cfglib.EvalConfig(batch_size=32),
    checkpoint_every=3, log_every=100,
)
RESULT_KEYS = ("train_acc", "test_acc", "adv_train_acc", "adv_test_acc", "train_lipschitz",
               "test_lipschitz", "test_lipschitz_ascent", "steps")


def test_two_devices_give_the_one_device_results(tmp_path):
    one = train.train_and_evaluate(SMALL, str(tmp_path / "one"), log=lambda _: None,
                                   mesh=train.make_mesh(jax.devices()[:1]))
    two = train.train_and_evaluate(SMALL, str(tmp_path / "two"), log=lambda _: None)
    assert one["num_devices"] == 1 and two["num_devices"] == 2
    # The gradient all-reduce sums in another order, so the parameters differ in the last
    # bits; accuracies agree, and the sign-step lipschitz searches to within a few percent.
    for k in RESULT_KEYS:
        rel = 5e-2 if "lipschitz" in k else 1e-6
        assert two[k] == pytest.approx(one[k], rel=rel), k


def test_interrupted_run_resumes_to_the_same_results(tmp_path):
    full = train.train_and_evaluate(SMALL, str(tmp_path / "full"), log=lambda _: None)
    calls = {"n": 0}

    def stop_after_four():
        calls["n"] += 1
        return calls["n"] >= 4

    with pytest.raises(train.Interrupted):
        train.train_and_evaluate(SMALL, str(tmp_path / "cut"), log=lambda _: None,
                                 should_stop=stop_after_four)
    messages = []
    resumed = train.train_and_evaluate(SMALL, str(tmp_path / "cut"), log=messages.append)
    assert any("resumed from checkpoint 4" in m for m in messages), messages
    for k in RESULT_KEYS:
        assert resumed[k] == full[k], k  # bit for bit on the CPU


def test_nan_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint(tmp_path):
    cfg = dataclasses.replace(SMALL, train=dataclasses.replace(SMALL.train, method="natural",
                                                               lr=1e30, momentum=0.0))
    with pytest.raises(train.TrainingDiverged, match="non-finite at step") as err:
        train.train_and_evaluate(cfg, str(tmp_path), log=lambda _: None)
    assert "last good checkpoint" in str(err.value)


def test_a_workdir_of_another_run_is_refused(tmp_path):
    from jax_robust.errors import UserError

    natural = dataclasses.replace(
        SMALL, train=dataclasses.replace(SMALL.train, method="natural", epochs=1),
        eval=cfglib.EvalConfig(batch_size=32, lipschitz_steps=1))
    train.train_and_evaluate(natural, str(tmp_path), log=lambda _: None)
    at = dataclasses.replace(natural, train=dataclasses.replace(natural.train, method="at"))
    with pytest.raises(UserError, match="other train.method"):
        train.train_and_evaluate(at, str(tmp_path), log=lambda _: None)
    longer = dataclasses.replace(natural, train=dataclasses.replace(natural.train, epochs=2))
    messages = []
    result = train.train_and_evaluate(longer, str(tmp_path), log=messages.append)
    assert result["steps"] == 10 and any("other settings of train.epochs" in m for m in messages)
