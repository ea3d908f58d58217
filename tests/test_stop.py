"""Every long phase polls its stop signal (cli.common.stop_requests after SIGTERM / Ctrl-C):
the final evaluation between batches, each attack of evaluate_robustness between batches, the
separation scans between jitted calls. A poll that turns true raises errors.Interrupted
there; one that never does changes no number. (The binaries with a real SIGTERM:
test_reliability.py, test_faults.py.)"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_robust import separation
from jax_robust.errors import Interrupted
from jax_robust.robustness import evaluate_robustness


def poll_true_at(k):
    """A poll that answers True from its k-th call on (1-based); `calls` counts them."""
    calls = []

    def should_stop():
        calls.append(1)
        return len(calls) >= k

    should_stop.calls = calls
    return should_stop


def linear_problem(n=37, seed=0):
    rng = np.random.default_rng(seed)
    params = {"w": jnp.asarray(0.4 * rng.normal(size=(16, 3)), jnp.float32),
              "b": jnp.zeros(3, jnp.float32)}
    x = rng.uniform(0, 1, size=(n, 4, 4, 1)).astype(np.float32)
    y = (np.arange(n) % 3).astype(np.int32)
    return params, x, y


def linear_apply(params, x):
    return x.reshape(x.shape[0], -1) @ params["w"] + params["b"]


ATTACKS = ("pgd", "multitarget", "apgd")
KW = dict(attacks=ATTACKS, batch_size=8, steps=3, key=jax.random.key(1), unroll=False)


def test_evaluate_robustness_polls_before_every_batch_of_every_attack():
    params, x, y = linear_problem()  # 37 points in batches of 8: 5 batches per pass
    plain = evaluate_robustness(linear_apply, params, x, y, 0.1, **KW)
    never = poll_true_at(10 ** 9)
    polled = evaluate_robustness(linear_apply, params, x, y, 0.1, should_stop=never, **KW)
    assert len(never.calls) == 3 * 5  # the pgd pass, multitarget, apgd
    for k in plain:
        np.testing.assert_array_equal(np.asarray(polled[k]), np.asarray(plain[k]), err_msg=k)
    # A stop in the apgd pass (its 2nd batch): Interrupted naming it, nothing returned.
    stop = poll_true_at(2 * 5 + 2)
    with pytest.raises(Interrupted, match=r"apgd attack .*\(batch 2 of 5\)"):
        evaluate_robustness(linear_apply, params, x, y, 0.1, should_stop=stop, **KW)
    assert len(stop.calls) == 12


@pytest.fixture(scope="module")
def digits_uint8():
    from jax_robust import data

    ds = data.load_digits()
    return (ds.as_uint8("train").reshape(len(ds.y_train), -1), ds.y_train,
            ds.as_uint8("test").reshape(len(ds.y_test), -1), ds.y_test)


TILING = separation.Tiling(query_block=64, ref_block=64, dim_chunk=16, blocks_per_call=1)


def test_separation_scans_poll_between_calls(digits_uint8):
    x, y, xq, yq = digits_uint8
    plain = separation.train_train_distance(x, y, tiling=TILING, calls=6)
    never = poll_true_at(10 ** 9)
    polled = separation.train_train_distance(x, y, tiling=TILING, calls=6, should_stop=never)
    n_calls = len(never.calls)
    assert n_calls > 3
    for a, b in zip(plain, polled):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(Interrupted, match=f"call 3 of {n_calls}"):
        separation.train_train_distance(x, y, tiling=TILING, calls=6,
                                        should_stop=poll_true_at(3))

    plain = separation.class_nearest(xq, x, y, tiling=TILING)
    never = poll_true_at(10 ** 9)
    polled = separation.class_nearest(xq, x, y, tiling=TILING, should_stop=never)
    for a, b in zip(plain, polled):
        np.testing.assert_array_equal(a, b)
    assert len(never.calls) >= 2
    with pytest.raises(Interrupted, match="call 2 of"):
        separation.nearest_other_label_distance(xq, yq, x, y, tiling=TILING,
                                                should_stop=poll_true_at(2))


def test_autoattack_polls_before_every_batch_and_stops_with_nothing_returned():
    from jax_robust.autoattack import autoattack

    params, x, y = linear_problem()
    kw = dict(version="custom", attacks=("apgd-ce",), key=0, batch_size=8)
    plain = autoattack(linear_apply, params, x, y, 0.1, **kw)
    robust = int(plain["robust_flags"].sum() + (plain["fooled_by"] == "apgd-ce").sum())
    never = poll_true_at(10 ** 9)
    polled = autoattack(linear_apply, params, x, y, 0.1, should_stop=never, **kw)
    # One poll per batch of each restart (5 for a custom APGD-CE) over the points still robust.
    assert -(-robust // 8) <= len(never.calls) <= 5 * -(-robust // 8)
    np.testing.assert_array_equal(polled["robust_flags"], plain["robust_flags"])
    stop = poll_true_at(1)
    with pytest.raises(Interrupted, match="AutoAttack's apgd-ce"):
        autoattack(linear_apply, params, x, y, 0.1, should_stop=stop, **kw)
    assert len(stop.calls) == 1
