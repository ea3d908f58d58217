"""The training loop: optimizer schedule, batching, evaluation counts, devices, resume, and the
per-epoch metrics file."""

import dataclasses
import json

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jax_robust import config as cfglib
from jax_robust import data, evaluation, methods, models, pipeline, schedules, train
from jax_robust.objectives import ObjectiveParams
from jax_robust.step import TrainState, make_train_step


def test_lr_drops_tenfold_after_each_milestone_epoch():
    t = cfglib.TrainConfig(epochs=4, batch_size=8, optimizer="sgd", lr=1.0, momentum=0.0,
                           milestones=(1, 3))
    opt = schedules.make_optimizer(t, steps_per_epoch=2)
    params = jnp.zeros(())
    state = opt.init(params)
    lrs = []
    for _ in range(8):
        updates, state = opt.update(jnp.ones(()), state, params)
        lrs.append(-float(updates))
    np.testing.assert_allclose(lrs, [1, 1, .1, .1, .1, .1, .01, .01], rtol=1e-6)
    np.testing.assert_allclose([schedules.learning_rate(t, 2)(s) for s in (1, 2, 6)],
                               [1, .1, .01], rtol=1e-6)


def test_padded_batch_repeats_and_masks():
    idx, mask = pipeline.padded_batch(np.array([7, 3, 9]), 8)
    np.testing.assert_array_equal(idx, [7, 3, 9, 7, 3, 9, 7, 3])
    np.testing.assert_array_equal(mask, [1, 1, 1, 0, 0, 0, 0, 0])
    order = pipeline.epoch_order(10, seed=0, epoch=1)
    np.testing.assert_array_equal(order, pipeline.epoch_order(10, seed=0, epoch=1))
    assert sorted(order) == list(range(10))
    assert not np.array_equal(order, pipeline.epoch_order(10, seed=0, epoch=2))


def test_train_batches_follow_the_epoch_order_with_or_without_prefetch():
    x = np.arange(10, dtype=np.float32).reshape(10, 1, 1, 1)
    y = np.arange(10, dtype=np.int32)
    with pipeline.TrainBatches(x, y, 4, 3, seed=5, mesh=pipeline.make_mesh()) as batches:
        got = [batches.get(s)["y"] for s in range(6)]
        again = batches.get(4, prefetch_next=False)["y"]  # out of order: gathered anew
    order = [pipeline.epoch_order(10, 5, e) for e in (0, 1)]
    for s, ys in enumerate(got):
        e, i = divmod(s, 3)
        expect, _ = pipeline.padded_batch(order[e][i * 4:(i + 1) * 4], 4)
        np.testing.assert_array_equal(ys, expect)
    np.testing.assert_array_equal(again, got[4])


def test_evaluate_counts_every_example_exactly_once():
    # 37 points, batches of 8 over 2 devices: the last batch is padded and masked.
    module = models.Linear(num_classes=3)
    params, state = models.init_model(module, jax.random.key(0), (2, 2, 1))
    x = np.random.default_rng(0).uniform(0, 1, (37, 2, 2, 1)).astype(np.float32)
    logits = np.asarray(module.apply({"params": params}, x, train=False))
    y = np.argmax(logits, 1).astype(np.int32)
    y[:10] = (y[:10] + 1) % 3  # exactly 10 wrong
    mesh = pipeline.make_mesh()
    assert mesh.size == 2
    step = evaluation.make_eval_step(
        models.make_model_fn(module), eps=0.0, attack_steps=2, attack_step_size=0.0,
        lip_steps=2, lip_step_size=0.003, lip_restarts=1, unroll=True, mesh=mesh, ascent=True)
    out = evaluation.evaluate(step, params, state, x, y, jax.random.key(1), batch_size=8,
                              mesh=mesh, log=lambda _: None)
    assert out["acc"] == pytest.approx(100 * 27 / 37) and out["count"] == 37
    assert out["adv_acc"] == pytest.approx(100 * 27 / 37)  # eps = 0: PGD changes nothing
    assert set(out) == {"acc", "adv_acc", "count", "lipschitz", "lipschitz_ascent"}
    with pytest.raises(Exception, match="multiple of the 2 devices"):
        evaluation.evaluate(step, params, state, x, y, jax.random.key(1), batch_size=7,
                            mesh=mesh)


def test_train_step_compiles_once_for_the_short_last_batch():
    chex.clear_trace_counter()
    module = models.CNN1(dropout=0.5)
    model_fn = models.make_model_fn(module)
    params, state = models.init_model(module, jax.random.key(0), (8, 8, 1))
    opt = optax.sgd(0.1)
    mesh = pipeline.make_mesh()
    hp = ObjectiveParams(eps=0.1, step_size=0.02, steps=2, variant="official", hparams=(),
                         unroll=True)
    step = make_train_step(methods.get("at").objective, model_fn, opt, hp, mesh, max_traces=1)
    ts = pipeline.replicate(mesh, TrainState(jnp.int32(0), params, state, opt.init(params)))
    ds = data.load_dataset("digits", max_train=20)
    for idx in (np.arange(8), np.arange(8, 16), np.arange(16, 20)):
        i, m = pipeline.padded_batch(idx, 8)
        batch = pipeline.shard_batch(mesh, {"x": ds.x_train[i], "y": ds.y_train[i], "mask": m})
        ts, metrics = step(ts, batch, jax.random.key(0))
    assert int(ts.step) == 3 and float(metrics["count"]) == 4
    # A batch of another shape would compile again: chex refuses the second trace.
    i, m = pipeline.padded_batch(np.arange(4), 4)
    with pytest.raises(AssertionError, match="traced > 1 times"):
        step(ts, pipeline.shard_batch(mesh, {"x": ds.x_train[i], "y": ds.y_train[i],
                                             "mask": m}), jax.random.key(0))


def test_batchnorm_statistics_span_every_device():
    # One train step of a BatchNorm net with its batch split over 2 devices, and on one device:
    # per-device statistics (2 x 4 examples instead of 8) would give other updates.
    # (Over processes: test_multiprocess.py.)
    module = models.WideResNet(num_classes=4, depth=10, width=1)
    model_fn = models.make_model_fn(module)
    # Host copies: the step donates its input state.
    params, state = jax.device_get(models.init_model(module, jax.random.key(0), (16, 16, 3)))
    opt = optax.sgd(0.1)
    hp = ObjectiveParams(eps=0.1, step_size=0.03, steps=1, variant="official", hparams=(),
                         unroll=False)  # natural training: no sign steps to amplify rounding
    rng = np.random.default_rng(0)
    host = {"x": rng.uniform(0, 1, (8, 16, 16, 3)).astype(np.float32),
            "y": rng.integers(0, 4, 8).astype(np.int32), "mask": np.ones(8, np.float32)}
    out = {}
    for n in (2, 1):
        mesh = pipeline.make_mesh(jax.devices()[:n])
        step = make_train_step(methods.get("natural").objective, model_fn, opt, hp, mesh)
        ts = pipeline.replicate(mesh, TrainState(jnp.int32(0), params, state, opt.init(params)))
        out[n] = jax.device_get(step(ts, pipeline.shard_batch(mesh, host), jax.random.key(1)))
    (two, two_metrics), (one, one_metrics) = out[2], out[1]
    # The running statistics moved by 0.04-0.16 and agree to 1e-5; per-device statistics
    # would differ by as much as they moved.
    chex.assert_trees_all_close(two.model_state, one.model_state, atol=1e-5, rtol=0)
    moved = min(float(np.abs(a - b).max()) for a, b in zip(
        jax.tree_util.tree_leaves(one.model_state), jax.tree_util.tree_leaves(state)))
    assert moved > 1e-2
    chex.assert_trees_all_close(two_metrics, one_metrics, rtol=1e-6)
    # BatchNorm's backward cancels (its gradients sum to zero over the batch): the early
    # layers' updates (up to 2e-2) agree only to about 1e-4 in another summation order.
    chex.assert_trees_all_close(two.params, one.params, atol=5e-4, rtol=0)


SMALL = cfglib.RunConfig(
    data=cfglib.DataConfig("digits", max_train=160, max_test=60),
    attack=cfglib.AttackConfig(steps=3),  # short attacks: quick compiles
    train=cfglib.TrainConfig(method="trades", epochs=2, batch_size=32, milestones=(1,)),
    eval=cfglib.EvalConfig(batch_size=32, curve_size=40, lipschitz_steps=3),
    checkpoint_every=3, log_every=100,
)
RESULT_KEYS = ("train_acc", "test_acc", "adv_train_acc", "adv_test_acc", "train_lipschitz",
               "test_lipschitz", "test_lipschitz_ascent", "steps")


def _epochs(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


@pytest.mark.slow
def test_interrupted_run_resumes_to_the_same_results_and_metrics(tmp_path):
    full = train.train_and_evaluate(SMALL, str(tmp_path / "full"), log=lambda _: None)
    calls = {"n": 0}

    def stop_after_seven():  # epoch 1 ends at step 5: the stop comes in epoch 2
        calls["n"] += 1
        return calls["n"] >= 7

    with pytest.raises(train.Interrupted):
        train.train_and_evaluate(SMALL, str(tmp_path / "cut"), log=lambda _: None,
                                 should_stop=stop_after_seven)
    assert [e["epoch"] for e in _epochs(tmp_path / "cut" / "metrics.jsonl")] == [1]
    messages = []
    resumed = train.train_and_evaluate(SMALL, str(tmp_path / "cut"), log=messages.append)
    assert any("resumed from checkpoint 7" in m for m in messages), messages
    for k in RESULT_KEYS:
        assert resumed[k] == full[k], k  # bit for bit on the CPU
    cut, whole = _epochs(tmp_path / "cut" / "metrics.jsonl"), _epochs(
        tmp_path / "full" / "metrics.jsonl")
    assert [e["epoch"] for e in cut] == [1, 2]
    for a, b in zip(cut, whole):
        for k in ("step", "lr", "train_loss", "train_acc", "test_subset_acc",
                  "adv_test_subset_acc", "test_subset_size"):
            assert a[k] == b[k], (k, a, b)
    assert cut[1]["lr"] == pytest.approx(0.1 * cut[0]["lr"])  # the milestone after epoch 1


@pytest.mark.slow
def test_a_workdir_of_another_run_is_refused(tmp_path):
    natural = dataclasses.replace(
        SMALL, train=dataclasses.replace(SMALL.train, method="natural", epochs=1),
        eval=cfglib.EvalConfig(batch_size=32, lipschitz_steps=1, curve_size=32))
    train.train_and_evaluate(natural, str(tmp_path), log=lambda _: None)
    at = dataclasses.replace(natural, train=dataclasses.replace(natural.train, method="at"))
    before = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    with pytest.raises(train.OtherRun, match="train.method 'natural' \\(now 'at'\\)"):
        train.train_and_evaluate(at, str(tmp_path), log=lambda _: None)
    # Another schedule is another run too (its lr and step count differ), refused before
    # any restore; nothing in the workdir is moved.
    longer = dataclasses.replace(natural, train=dataclasses.replace(natural.train, epochs=2))
    with pytest.raises(train.OtherRun, match="train.epochs 1 \\(now 2\\)"):
        train.train_and_evaluate(longer, str(tmp_path), log=lambda _: None)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == before
    assert not (tmp_path / "checkpoints_corrupt").exists()
    # Other evaluation settings are the same run: resumed (nothing left to train).
    other_eval = dataclasses.replace(natural, eval=dataclasses.replace(natural.eval,
                                                                       curve_size=16))
    messages = []
    result = train.train_and_evaluate(other_eval, str(tmp_path), log=messages.append)
    assert result["steps"] == 5 and result["finished"]
    assert any("other evaluation settings (eval.curve_size)" in m for m in messages)


def test_train_eval_subset_is_fixed_sorted_and_capped():
    a, b = train.eval_subset(100, 30), train.eval_subset(100, 30)
    np.testing.assert_array_equal(a, b)
    assert len(a) == 30 and len(set(a)) == 30 and list(a) == sorted(a) and a.max() < 100
    np.testing.assert_array_equal(train.eval_subset(10, None), np.arange(10))
    np.testing.assert_array_equal(train.eval_subset(10, 50), np.arange(10))


@pytest.mark.slow
def test_without_onednn_a_cpu_run_says_so_and_runs_xlas_convolutions(tmp_path, monkeypatch):
    """No compiler or no oneDNN on a user's machine: the default falls back with one note,
    and the run records what it computed with; asked for explicitly, it is refused."""
    monkeypatch.setattr(train, "onednn_missing", lambda *args: "no g++ here")
    natural = dataclasses.replace(
        SMALL, train=dataclasses.replace(SMALL.train, method="natural", epochs=1),
        eval=cfglib.EvalConfig(batch_size=32, lipschitz_steps=1, curve_size=32))
    messages = []
    one = pipeline.make_mesh(jax.devices()[:1])  # oneDNN's default needs a single device
    result = train.train_and_evaluate(natural, str(tmp_path / "a"), log=messages.append,
                                      mesh=one)
    assert any("oneDNN's convolutions are unavailable (no g++ here)" in m for m in messages)
    assert result["config"]["speed"]["conv_kernels"] == "xla"
    asked = dataclasses.replace(natural, speed=cfglib.SpeedConfig(conv_kernels="onednn"))
    with pytest.raises(train.UserError, match=r"unavailable here: no g\+\+ here"):
        train.train_and_evaluate(asked, str(tmp_path / "b"), log=messages.append, mesh=one)


@pytest.mark.slow
def test_holdout_keeps_the_best_epoch_beside_the_latest_and_reports_both(tmp_path):
    cfg = dataclasses.replace(
        SMALL, data=dataclasses.replace(SMALL.data, holdout=48),
        train=dataclasses.replace(SMALL.train, method="at", epochs=4, milestones=(3,),
                                  lr=0.05))
    r = train.train_and_evaluate(cfg, str(tmp_path), log=lambda _: None)
    lines = _epochs(tmp_path / "metrics.jsonl")
    held = [e["adv_holdout_acc"] for e in lines]
    best_epoch = held.index(max(held)) + 1  # the first epoch with the highest PGD accuracy
    assert r["best"]["epoch"] == best_epoch and r["best"]["adv_holdout_acc"] == max(held)
    assert r["holdout_examples"] == 48
    # 160 - 48 = 112 training points: 4 steps of 32 per epoch; the latest is the last step.
    assert r["steps"] == r["total_steps"] == 16 and r["examples"]["train"] == 112
    assert r["best"]["step"] == 4 * best_epoch
    ckpt_steps = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir())
    assert ckpt_steps[-1] == 16  # the latest is not evicted by the best
    assert [int(p.name) for p in (tmp_path / "checkpoints_best").iterdir()] == [4 * best_epoch]
    # The best row is that checkpoint's own evaluation: its clean test accuracy recomputed
    # from the checkpoint alone (loaded as a run of its own).
    import shutil

    from jax_robust import data as datalib

    shutil.copytree(tmp_path / "checkpoints_best", tmp_path / "best_run" / "checkpoints")
    loaded = train.load_run(str(tmp_path / "best_run"), log=lambda _: None)
    assert loaded.step == 4 * best_epoch
    ds = datalib.load_dataset("digits", max_test=60)
    logits = loaded.apply_fn(loaded.variables, ds.x_test)
    acc = 100 * float(np.mean(np.argmax(np.asarray(logits), -1) == ds.y_test))
    assert acc == pytest.approx(r["best"]["test_acc"], abs=1e-4)


@pytest.mark.slow
def test_eval_only_adds_autoattack_to_a_finished_run(tmp_path):
    cfg = dataclasses.replace(
        SMALL, train=dataclasses.replace(SMALL.train, method="at", epochs=2),
        speed=cfglib.SpeedConfig(attack_unroll=False))
    trained = train.train_and_evaluate(cfg, str(tmp_path), log=lambda _: None)
    evaluated = dataclasses.replace(cfg, eval=dataclasses.replace(
        cfg.eval, attacks=("pgd", "apgd", "autoattack"), attack_size=32))
    r = train.train_and_evaluate(evaluated, str(tmp_path), log=lambda _: None, eval_only=True)
    assert r["steps"] == trained["steps"] and r["finished"]
    assert r["attack_examples"] == 32 and r["autoattack"]["n"] == 32
    # AutoAttack's worst case starts with APGD-CE, so it is never above APGD-CE's accuracy on
    # the same points by more than APGD's own randomness; the overall worst case takes both.
    assert r["adv_test_acc_autoattack"] <= r["autoattack"]["clean_acc"]
    assert r["adv_test_acc_worst"] <= min(r["adv_test_acc_autoattack"], r["adv_test_acc_pgd"],
                                          r["adv_test_acc_apgd"])
    assert list(r["autoattack"]["robust_acc_after"]) == ["clean", "apgd-ce", "apgd-t",
                                                         "fab-t", "square"]
    with open(tmp_path / "results_autoattack.json") as f:
        rb = json.load(f)
    assert (rb["autoattack_acc"], rb["n_examples"], rb["version"], rb["eps"], rb["seed"]) == (
        r["adv_test_acc_autoattack"], 32, "standard", 0.1, 0)
