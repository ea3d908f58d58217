"""The method registry: a seventh method defined here, in the test file alone, runs through
the shared step, a whole run and the report; labels, tags and hyperparameter checks."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jax_robust import config as cfglib
from jax_robust import methods, models, pipeline, report, train
from jax_robust.attacks import cross_entropy
from jax_robust.errors import UserError
from jax_robust.objectives import ObjectiveParams, masked_mean, unpack_batch
from jax_robust.step import TrainState, make_train_step


def toy_objective(model_fn, params, state, batch, key, hp):
    """CE + gamma * mean squared logit: a logit-shrinking regulariser."""
    x, y, mask = unpack_batch(batch)
    logits, state = model_fn(params, state, x, True, key)
    per_example = cross_entropy(logits, y) + hp["gamma"] * jnp.mean(logits**2, axis=-1)
    loss = masked_mean(per_example, mask)
    correct = jnp.sum((jnp.argmax(logits, -1) == y) * mask)
    return loss, (state, {"loss": loss, "correct": correct, "count": jnp.sum(mask)})


@pytest.fixture
def toy():
    method = methods.register(methods.Method(
        "toy", toy_objective, label="Toy(g={gamma:g})", tag="toy{gamma:g}",
        hparams=(methods.HParam("gamma", 0.5, help="logit penalty"),
                 methods.HParam("width", 3, minimum=1, integer=True))))
    yield method
    del methods.METHODS["toy"]


def test_the_toy_method_runs_through_the_shared_step(toy):
    module = models.Linear(num_classes=3)
    model_fn = models.make_model_fn(module)
    params, state = models.init_model(module, jax.random.key(0), (2, 2, 1))
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 1, (8, 2, 2, 1)).astype(np.float32)
    y = rng.integers(0, 3, 8).astype(np.int32)
    mask = np.array([1] * 7 + [0], np.float32)
    z = np.asarray(module.apply({"params": params}, x, train=False), np.float64)
    mesh = pipeline.make_mesh()
    hp = ObjectiveParams(eps=0.1, step_size=0.02, steps=1, variant="official", unroll=True,
                         hparams=toy.resolve_hparams({"gamma": 2.0}))
    opt = optax.sgd(0.1)
    step = make_train_step(toy.objective, model_fn, opt, hp, mesh)
    ts = pipeline.replicate(mesh, TrainState(jnp.int32(0), params, state, opt.init(params)))
    batch = pipeline.shard_batch(mesh, {"x": x, "y": y, "mask": mask})
    _, metrics = step(ts, batch, jax.random.key(1))  # donates the state
    logp = z - np.log(np.exp(z).sum(1, keepdims=True))
    per = -logp[np.arange(8), y] + 2.0 * (z**2).mean(1)
    assert float(metrics["loss"]) == pytest.approx((per * mask).sum() / 8, rel=1e-5)
    assert float(metrics["count"]) == 7


@pytest.mark.slow
def test_the_toy_method_runs_through_a_run_and_the_report(toy, tmp_path):
    cfg = cfglib.RunConfig(
        data=cfglib.DataConfig("digits", max_train=96, max_test=32),
        attack=cfglib.AttackConfig(steps=2),
        train=cfglib.TrainConfig(method="toy", hparams=(("gamma", 2.0),), epochs=1,
                                 batch_size=32),
        eval=cfglib.EvalConfig(batch_size=32, lipschitz_steps=1, curve_size=32))
    results = train.train_and_evaluate(cfg, str(tmp_path / "toy2"), log=lambda _: None)
    assert results["config"]["train"]["hparams"] == {"gamma": 2.0, "width": 3}
    assert results["steps"] == 3 and 0 <= results["adv_test_acc"] <= results["test_acc"]
    written = report.write_report(report.load_runs(str(tmp_path)), str(tmp_path))
    table = open(written[0]).read()
    assert "| Toy(g=2) | official | 1 |" in table
    assert f"{results['test_acc']:.2f}" in table
    assert "The paper has no table for digits with cnn1" in table
    assert any(p.endswith("learning_curves.png") for p in written)


def test_labels_and_tags_show_weights_and_non_default_settings(toy):
    assert toy.format_label({"gamma": 2.0, "width": 3}) == "Toy(g=2)"
    assert toy.format_label({"gamma": 2.0, "width": 5}) == "Toy(g=2) [width=5]"
    assert toy.format_tag({"gamma": 0.5, "width": 5}) == "toy0.5-width5"
    gr = methods.get("gr")
    assert gr.format_label(dict(gr.resolve_hparams({}))) == "GR"
    assert gr.format_tag(dict(gr.resolve_hparams({"lam": 2.0}))) == "gr-lam2"
    rst = methods.get("rst")
    assert rst.format_label(dict(rst.resolve_hparams({"lam": 0.5}))) == "RST(l=0.5)"


def test_hyperparameters_are_checked_and_defaulted(toy):
    assert toy.resolve_hparams({}) == (("gamma", 0.5), ("width", 3))
    with pytest.raises(UserError, match="method toy has no hyperparameter beta"):
        toy.resolve_hparams({"beta": 1.0})
    with pytest.raises(UserError, match="width must be an integer >= 1"):
        toy.resolve_hparams({"width": 2.5})
    with pytest.raises(UserError, match="gamma must be a non-negative number"):
        toy.resolve_hparams({"gamma": float("nan")})
    with pytest.raises(UserError, match="unknown method 'toy2'"):
        methods.get("toy2")
