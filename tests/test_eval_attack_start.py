"""The evaluation's PGD starts at a random point of the eps ball, not at x: on a model whose
input gradient is exactly zero in a small cube around each clean point (a dead ReLU) PGD
started at x never moves, while random starts land outside the cube on most points and the
gradient there carries them to a misclassification. The evaluation step of the final
evaluation (evaluation.make_eval_step) must find those."""

import jax
import jax.numpy as jnp
import numpy as np

from jax_robust.attacks import pgd_attack, cross_entropy, pgd_cross_entropy
from jax_robust.evaluation import make_eval_step
from jax_robust.pipeline import make_mesh

EPS, DEAD = 0.1, 0.02  # the ball's radius; the half-width of the cube with zero gradient
N = 64


def dead_zone_logits(x):
    """x [B, 1, 1, 1] at 0.5 -> logits [B, 2]: class 0 wins (margin 0.01) unless the pixel is
    more than DEAD + 0.001 from 0.5; inside the cube of half-width DEAD the gradient is 0."""
    z = x.reshape(x.shape[0])
    bump = 10.0 * jax.nn.relu(jnp.abs(z - 0.5) - DEAD)
    return jnp.stack([jnp.zeros_like(z), bump - 0.01], axis=-1)


def points():
    return jnp.full((N, 1, 1, 1), 0.5, jnp.float32), jnp.zeros(N, jnp.int32)


def test_pgd_from_x_cannot_move_on_the_dead_zone():
    # The yardstick: started at x the gradient is zero, every point stays correct.
    x, y = points()
    x_adv = pgd_attack(lambda z: cross_entropy(dead_zone_logits(z), y), x, jax.random.key(0),
                       eps=EPS, steps=10, step_size=EPS / 5, init="none", unroll=False)
    np.testing.assert_array_equal(np.asarray(x_adv), np.asarray(x))


def test_the_evaluation_pgd_starts_in_the_ball_and_finds_the_dead_zones_edge():
    x, y = points()
    x_adv = pgd_cross_entropy(dead_zone_logits, x, y, jax.random.key(0), eps=EPS, steps=10,
                              unroll=False)
    fooled = np.asarray(jnp.argmax(dead_zone_logits(x_adv), -1) != y)
    # A uniform start leaves the cube with probability 1 - DEAD / EPS = 0.8 per point.
    assert 0.6 * N <= fooled.sum() <= N, fooled.sum()
    assert np.all(np.abs(np.asarray(x_adv) - 0.5) <= EPS + 1e-6)


def test_the_final_evaluation_step_finds_them_too():
    def model_fn(params, model_state, z, train, rngs):
        del params, rngs
        assert train is False
        return dead_zone_logits(z), model_state

    step = make_eval_step(model_fn, eps=EPS, attack_steps=10, attack_step_size=EPS / 5,
                          lip_steps=1, lip_step_size=0.003, lip_restarts=1, unroll=False,
                          mesh=make_mesh(jax.devices()[:1]), lipschitz=False)
    x, y = points()
    sums = step({}, {}, {"x": x, "y": y, "mask": jnp.ones(N, jnp.float32)},
                jax.random.key(3))
    assert float(sums["correct"]) == N  # clean: all correct
    assert float(sums["adv_correct"]) <= 0.4 * N, float(sums["adv_correct"])
