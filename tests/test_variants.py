"""The distinctions the tables rest on, on models WITH dropout and BatchNorm (where official
and paper variants really differ): the evaluation runs the model in eval mode only; the
official AT/RST attack runs in train mode and moves the BatchNorm running statistics; the
official TRADES loss takes a third forward pass with its own dropout mask."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_robust import evaluation, methods, models, pipeline
from jax_robust.objectives import ObjectiveParams


class Recorder:
    """Wraps a model_fn; records (train flag, whether x was traced, logits) of each call."""

    def __init__(self, model_fn):
        self.model_fn, self.calls = model_fn, []

    def __call__(self, params, state, x, train, key):
        logits, state = self.model_fn(params, state, x, train, key)
        traced = isinstance(logits, jax.core.Tracer)
        self.calls.append((train, traced, None if traced else np.asarray(logits)))
        return logits, state


def wrn():
    module = models.WideResNet(num_classes=4, depth=10, width=1, dropout=0.3)
    params, state = models.init_model(module, jax.random.key(0), (16, 16, 3))
    return module, params, state


def batch(n=8, seed=0):
    rng = np.random.default_rng(seed)
    return {"x": jnp.asarray(rng.uniform(0, 1, (n, 16, 16, 3)), jnp.float32),
            "y": jnp.asarray(rng.integers(0, 4, n), jnp.int32), "mask": jnp.ones(n)}


def hp(method, variant, steps=3):
    return ObjectiveParams(eps=0.1, step_size=0.03, steps=steps, variant=variant, unroll=False,
                           hparams=methods.get(method).resolve_hparams({}))


@pytest.mark.slow
def test_the_evaluation_runs_the_model_in_eval_mode_only():
    module, params, state = wrn()
    rec = Recorder(models.make_model_fn(module))
    mesh = pipeline.make_mesh()
    step = evaluation.make_eval_step(rec, eps=0.1, attack_steps=3, attack_step_size=0.03,
                                     lip_steps=2, lip_step_size=0.003, lip_restarts=1,
                                     unroll=False, mesh=mesh, ascent=True)
    b = {k: np.asarray(v) for k, v in batch(16).items()}
    runs = [evaluation.evaluate(step, params, state, b["x"], b["y"], jax.random.key(3),
                                batch_size=8, mesh=mesh, log=lambda _: None) for _ in range(2)]
    assert rec.calls and all(train is False for train, _, _ in rec.calls), rec.calls
    assert runs[0] == runs[1]


@pytest.mark.slow
@pytest.mark.parametrize("method", ["at", "rst"])
def test_official_at_and_rst_attack_in_train_mode_moving_batchnorm_statistics(method):
    module, params, state = wrn()
    states = {}
    for variant in ("official", "paper"):
        rec = Recorder(models.make_model_fn(module))
        _, (new_state, _) = methods.get(method).objective(
            rec, params, state, batch(), jax.random.key(1), hp(method, variant))
        attack_modes = {train for train, traced, _ in rec.calls if traced}
        assert attack_modes == {variant == "official"}, (variant, rec.calls)
        states[variant] = new_state
    # The official attack's iterates each update the running statistics; the paper
    # variant's only the loss's forward passes do.
    official = jax.tree_util.tree_leaves(states["official"])
    paper = jax.tree_util.tree_leaves(states["paper"])
    gap = max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(official, paper))
    assert gap > 1e-3, gap


@pytest.mark.slow
def test_official_trades_takes_a_third_forward_pass_with_its_own_dropout_mask():
    module = models.CNN1(num_classes=4, dropout=0.5)
    params, state = models.init_model(module, jax.random.key(0), (8, 8, 1))
    rng = np.random.default_rng(0)
    b = {"x": jnp.asarray(rng.uniform(0, 1, (8, 8, 8, 1)), jnp.float32),
         "y": jnp.asarray(rng.integers(0, 4, 8), jnp.int32), "mask": jnp.ones(8)}
    clean_passes = {}
    for variant in ("official", "paper"):
        rec = Recorder(models.make_model_fn(module))
        methods.get("trades").objective(rec, params, state, b, jax.random.key(1),
                                        hp("trades", variant))
        train_calls = [logits for train, traced, logits in rec.calls if train]
        assert all(logits is not None for logits in train_calls)
        clean_passes[variant] = train_calls
        assert not any(train for train, traced, _ in rec.calls if traced)  # eval-mode attack
    official, paper = clean_passes["official"], clean_passes["paper"]
    assert (len(official), len(paper)) == (3, 2)
    # Passes 1 and 3 both see the clean x; their dropout masks differ, so do their logits.
    assert np.abs(official[0] - official[2]).max() > 1e-3
