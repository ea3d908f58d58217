"""Separation distances and the distance classifier against independent NumPy computations."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_robust import data, separation

FASHION_DIR = data.FASHION_MNIST_DIR


# ----------------------------------------------------------------------------- references


def brute_force(xq, yq, xr, yr, exclude_self=False, chunk=32):
    """NumPy: (distance, first argmin) of the nearest reference point with another label.

    uint8 inputs: exact grey levels, max(a, b) - min(a, b) in uint8; float inputs: float32
    |a - b|, then max.
    """
    xq = xq.reshape(len(xq), -1)
    xr = xr.reshape(len(xr), -1)
    big = np.iinfo(np.int32).max if xq.dtype == np.uint8 else np.inf
    dist, index = [], []
    for lo in range(0, len(xq), chunk):
        q = xq[lo:lo + chunk, None, :]
        if xq.dtype == np.uint8:
            d = (np.maximum(q, xr[None]) - np.minimum(q, xr[None])).max(-1).astype(np.int64)
        else:
            d = np.abs(q.astype(np.float32) - xr[None].astype(np.float32)).max(-1)
        mask = yq[lo:lo + chunk, None] == yr[None, :]
        if exclude_self:
            rows = np.arange(lo, lo + len(q))
            mask[rows - lo, rows] = True
        d = np.where(mask, big, d)
        dist.append(d.min(1))
        index.append(d.argmin(1))
    return np.concatenate(dist), np.concatenate(index)


def brute_class_distances(xq, xr, yr, num_classes):
    """NumPy float64: [Nq, C] nearest l_inf distance to each class."""
    d = np.abs(xq.reshape(len(xq), 1, -1).astype(np.float64)
               - xr.reshape(1, len(xr), -1).astype(np.float64)).max(-1)
    return np.stack([d[:, yr == c].min(1, initial=np.inf) for c in range(num_classes)], axis=1)


@pytest.fixture(scope="module")
def digits():
    ds = data.load_digits()
    return (ds.as_uint8("train").reshape(len(ds.y_train), -1), ds.y_train,
            ds.as_uint8("test").reshape(len(ds.y_test), -1), ds.y_test)


@pytest.fixture(scope="module")
def fashion_subset():
    if not data.has_idx_files(FASHION_DIR):
        pytest.skip(f"Fashion-MNIST IDX files not in {FASHION_DIR} "
                    "(apt-get install dataset-fashion-mnist)")
    ds = data.load_fashion_mnist()
    rng = np.random.default_rng(0)
    train = rng.choice(len(ds.y_train), 2000, replace=False)
    test = rng.choice(len(ds.y_test), 300, replace=False)
    x_train = ds.as_uint8("train").reshape(len(ds.y_train), -1)[train]
    x_test = ds.as_uint8("test").reshape(len(ds.y_test), -1)[test]
    return x_train, ds.y_train[train], x_test, ds.y_test[test]


def check_exact(xq, yq, xr, yr, exclude_self, train_train=False, want=None, **kwargs):
    """Our distances and indices equal NumPy's (`want`, or computed); train_train: the
    symmetric function instead. Returns NumPy's answer."""
    if train_train:
        d, i = separation.train_train_distance(xq, yq, **kwargs)
    else:
        d, i = separation.nearest_other_label_distance(xq, yq, xr, yr,
                                                       exclude_self=exclude_self, **kwargs)
    want_d, want_i = want if want is not None else brute_force(xq, yq, xr, yr, exclude_self)
    np.testing.assert_array_equal(d, want_d)
    # The returned index attains the minimum, has another label, is not the query itself,
    # and is the first such index (the documented tie rule).
    wide = np.int16 if xq.dtype == np.uint8 else np.float32
    attained = np.abs(xq.astype(wide) - xr[i].astype(wide)).max(1)
    np.testing.assert_array_equal(attained, d)
    assert (yr[i] != yq).all()
    if exclude_self:
        assert (i != np.arange(len(xq))).all()
    np.testing.assert_array_equal(i, want_i)
    return want_d, want_i


# ----------------------------------------------------------------------------- exactness


def test_digits_train_train_exact(digits):
    x_train, y_train, _, _ = digits
    want = check_exact(x_train, y_train, x_train, y_train, exclude_self=True)
    check_exact(x_train, y_train, x_train, y_train, exclude_self=True, train_train=True,
                want=want)
    assert want[0].min() == 7  # 7/16 = 0.4375, the value data.py quotes


def test_digits_test_train_exact(digits):
    x_train, y_train, x_test, y_test = digits
    check_exact(x_test, y_test, x_train, y_train, exclude_self=False)


@pytest.mark.slow
def test_fashion_mnist_subset_exact(fashion_subset):
    x_train, y_train, x_test, y_test = fashion_subset
    want = check_exact(x_train, y_train, x_train, y_train, exclude_self=True)
    check_exact(x_train, y_train, x_train, y_train, exclude_self=True, train_train=True,
                want=want)
    check_exact(x_test, y_test, x_train, y_train, exclude_self=False)


def test_float_path_equals_numpy_and_uint8_path(digits):
    x_train, y_train, x_test, y_test = digits
    xf_train, xf_test = x_train.astype(np.float32) / 16, x_test.astype(np.float32) / 16
    d_float, _ = check_exact(xf_test, y_test, xf_train, y_train, exclude_self=False)
    assert d_float.dtype == np.float32
    d_float_tt, _ = check_exact(xf_train, y_train, xf_train, y_train, exclude_self=True,
                                train_train=True)
    d_int_tt, _ = separation.train_train_distance(x_train, y_train)
    assert d_int_tt.dtype == np.int32
    np.testing.assert_allclose(d_float_tt, d_int_tt / 16, rtol=0, atol=1e-6)
    d_int, _ = separation.nearest_other_label_distance(x_test, y_test, x_train, y_train)
    assert d_int.dtype == np.int32
    np.testing.assert_allclose(d_float, d_int / 16, rtol=0, atol=1e-6)
    cd_float, _ = separation.class_nearest(xf_test, xf_train, y_train, 10)
    cd_int, _ = separation.class_nearest(x_test, x_train, y_train, 10)
    np.testing.assert_allclose(cd_float, cd_int / 16, rtol=0, atol=1e-6)


@pytest.mark.parametrize("tiling", [
    separation.Tiling(query_block=24, ref_block=64, dim_chunk=20, blocks_per_call=3),
    separation.Tiling(query_block=8, ref_block=128, dim_chunk=64, blocks_per_call=1),
])
def test_tiling_that_does_not_divide_gives_same_answer(digits, tiling):
    x_train, y_train, _, _ = digits
    xq, yq = x_train[:301], y_train[:301]  # 301 queries: no block size divides it
    want = separation.nearest_other_label_distance(xq, yq, x_train, y_train, exclude_self=True)
    got = separation.nearest_other_label_distance(xq, yq, x_train, y_train, exclude_self=True,
                                                  tiling=tiling)
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_array_equal(got[1], want[1])
    # The symmetric train-train function on the same 301 points, few and many calls.
    want = brute_force(xq, yq, xq, yq, exclude_self=True)
    for calls in (1, 7):
        got = separation.train_train_distance(xq, yq, tiling=tiling, calls=calls)
        np.testing.assert_array_equal(got[0], want[0])
        np.testing.assert_array_equal(got[1], want[1])


def test_class_nearest_matches_numpy_and_handles_empty_class(digits):
    x_train, y_train, x_test, _ = digits
    keep = y_train != 4  # class 4 has no reference point
    cd, ci = separation.class_nearest(x_test[:50], x_train[keep], y_train[keep], 10)
    want = brute_class_distances(x_test[:50], x_train[keep], y_train[keep], 10)
    assert (cd[:, 4] == separation.NO_POINT_INT).all() and (ci[:, 4] == -1).all()
    others = [c for c in range(10) if c != 4]
    np.testing.assert_array_equal(cd[:, others], want[:, others])
    picked = x_train[keep][ci[:, others]]  # [50, 9, D]
    attained = np.abs(x_test[:50, None].astype(np.int16) - picked.astype(np.int16)).max(-1)
    np.testing.assert_array_equal(attained, cd[:, others])


def test_exclude_self_skips_a_differently_labelled_duplicate():
    x = np.array([[0, 0], [0, 0], [200, 200], [0, 0]], np.uint8)  # 0, 1, 3 are identical
    y = np.array([0, 1, 1, 0])
    for d, i in (separation.nearest_other_label_distance(x, y, x, y, exclude_self=True),
                 separation.train_train_distance(x, y)):
        np.testing.assert_array_equal(d, [0, 0, 200, 0])
        np.testing.assert_array_equal(i, [1, 0, 0, 1])  # ties: the smallest index


@pytest.mark.slow
def test_multi_device_subprocess_matches_numpy(tmp_path):
    """Three forced host devices: the query axis is sharded three ways."""
    script = (
        "import numpy as np\n"
        "import jax; assert jax.device_count() == 3\n"
        "from jax_robust import data, separation\n"
        "ds = data.load_digits(); x = ds.as_uint8('train').reshape(len(ds.y_train), -1)[:500]\n"
        "y = ds.y_train[:500]\n"
        "d, i = separation.nearest_other_label_distance(x, y, x, y, exclude_self=True)\n"
        "d2, i2 = separation.train_train_distance(x, y, calls=5)\n"
        "np.save(%r, np.stack([d, i, d2, i2]))\n" % str(tmp_path / "out.npy"))
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=3")
    subprocess.run([sys.executable, "-c", script], check=True, env=env, timeout=120)
    d, i, d2, i2 = np.load(tmp_path / "out.npy")
    ds = data.load_digits()
    x = ds.as_uint8("train").reshape(len(ds.y_train), -1)[:500]
    want_d, want_i = brute_force(x, ds.y_train[:500], x, ds.y_train[:500], exclude_self=True)
    for got_d, got_i in ((d, i), (d2, i2)):
        np.testing.assert_array_equal(got_d, want_d)
        np.testing.assert_array_equal(got_i, want_i)


# ----------------------------------------------------------------------------- the certificate


def test_certified_radius_on_hand_built_2d_example():
    # Grey levels out of 16 (all values exact): class 0 at (2, 2) and (4, 10), class 1 at
    # (14, 14), class 2 at (10, 3).
    x_ref = np.array([[2, 2], [4, 10], [14, 14], [10, 3]], np.uint8)
    y_ref = np.array([0, 0, 1, 2])
    # q1 = (5, 4): class distances max(3, 2) = 3 (min with max(1, 6) = 6), max(9, 10) = 10,
    #   max(5, 1) = 5 -> predicts 0, radius (5 - 3) / 2 = 1 level = 1/16.
    # q2 = (12, 12): class 0 max(8, 8) = 8 (and max(8, 2) = 8), class 1 max(2, 2) = 2,
    #   class 2 max(2, 9) = 9 -> predicts 1, radius (8 - 2) / 2 = 3 levels.
    # q3 = (7, 2): class 0 max(5, 0) = 5, class 1 max(7, 12) = 12, class 2 max(3, 1) = 3
    #   -> predicts 2, radius (5 - 3) / 2 = 1 level.
    x_query = np.array([[5, 4], [12, 12], [7, 2]], np.uint8)
    cd, _ = separation.class_nearest(x_query, x_ref, y_ref, 3)
    np.testing.assert_array_equal(cd, [[3, 10, 5], [8, 2, 9], [5, 12, 3]])
    pred, radius = separation.distance_classifier(cd)
    np.testing.assert_array_equal(pred, [0, 1, 2])
    np.testing.assert_array_equal(radius, [1.0, 3.0, 1.0])
    # Same in float pixel units, and the radius is attained with a tie: moving q1 by exactly
    # 1/16 to (6, 4) puts it at distance 4/16 from both class 0 and class 2.
    cd_float, _ = separation.class_nearest(x_query / 16.0, x_ref / 16.0, y_ref, 3)
    np.testing.assert_array_equal(separation.distance_classifier(cd_float)[1], radius / 16)
    tie, _ = separation.class_nearest(np.array([[6, 4]], np.uint8), x_ref, y_ref, 3)
    assert tie[0, 0] == tie[0, 2] == 4
    # Strict certificate: radius 1/16 certifies eps < 1/16 only; at eps = 1/16 the point
    # counts as at the boundary.
    y_true = np.array([0, 1, 0])  # q3 is misclassified
    m = separation.certified_accuracy(cd, y_true, eps=0.05, levels=16)
    assert m == {"accuracy": 2 / 3, "certified_astuteness": 2 / 3, "n": 3, "at_boundary": 0}
    m = separation.certified_accuracy(cd, y_true, eps=1 / 16, levels=16)
    assert m["certified_astuteness"] == 1 / 3 and m["at_boundary"] == 1
    m = separation.certified_accuracy(cd_float, y_true, eps=1 / 16)
    assert m["certified_astuteness"] == 1 / 3 and m["at_boundary"] == 1


def test_certified_mask_is_exact_in_grey_levels():
    # eps = 0.1 at 255 levels is 25.5 levels: a gap of 51 levels is a tie, 52 certifies.
    radius = np.array([25.5, 26.0, 76.5, 77.0])
    np.testing.assert_array_equal(separation.certified_mask(radius[:2], 0.1, 255),
                                  [False, True])
    # eps = 0.3: 2 * 0.3 * 255 is 152.99999999999997 in floating point, 153 exactly.
    np.testing.assert_array_equal(separation.certified_mask(radius[2:], 0.3, 255),
                                  [False, True])


def test_separation_summary_statistics_and_closest_pairs():
    # Four points, levels 255: 0 <-> 1 at 40 levels (listed once), 2 -> 1 at 51, 3 -> 0 at 60.
    dist = np.array([40, 40, 51, 60])
    index = np.array([1, 0, 1, 0])
    y = np.array([0, 1, 0, 1])
    s = separation.separation_summary(dist, index, y, y, levels=255, eps=0.1, n_closest=10,
                                      symmetric=True)
    assert s["min"] == 40 / 255 and s["min_levels"] == 40
    assert s["q0.5"] == np.quantile(dist / 255, 0.5) and s["mean"] == np.mean(dist / 255)
    assert s["n_below_2eps"] == 2  # 2 eps = 51 levels exactly: 51 is not below it
    pairs = [(p["query_index"], p["ref_index"]) for p in s["closest"]]
    assert pairs == [(0, 1), (2, 1), (3, 0)]
    assert separation.count_below(np.array([50, 51, 52]), 0.2, 255) == 1


def smooth_class_distances(x, x_ref, y_ref, num_classes, temperature):
    """Smooth surrogate of the per-class l_inf distance: log-sum-exp max over pixels, then a
    log-sum-exp min over the class's points. x [B, D] -> [B, C]."""
    diff = jnp.sqrt((x[:, None, :] - x_ref[None, :, :]) ** 2 + 1e-8)  # [B, Nr, D]
    dist = temperature * jax.nn.logsumexp(diff / temperature, axis=-1)  # >= l_inf distance
    out = []
    for c in range(num_classes):
        dc = jnp.where((y_ref == c)[None, :], dist, jnp.inf)
        out.append(-temperature * jax.nn.logsumexp(-dc / temperature, axis=-1))
    return jnp.stack(out, axis=1)


def pgd_on_surrogate(x, y, x_ref, y_ref, eps, key, steps=30, temperature=0.005):
    """Sign-gradient l_inf PGD (random start) maximising d_y - min_{j != y} d_j."""
    num_classes = int(y_ref.max()) + 1

    def loss(x_adv):
        d = smooth_class_distances(x_adv, x_ref, y_ref, num_classes, temperature)
        own = jax.nn.one_hot(y, num_classes) > 0
        other = jnp.min(jnp.where(own, jnp.inf, d), axis=1)
        return jnp.sum(jnp.take_along_axis(d, y[:, None], 1)[:, 0] - other)

    grad = jax.jit(jax.grad(loss))
    x_adv = jnp.clip(x + jax.random.uniform(key, x.shape, minval=-eps, maxval=eps), 0, 1)
    for _ in range(steps):
        x_adv = x_adv + (eps / 8) * jnp.sign(grad(x_adv))
        x_adv = jnp.clip(jnp.clip(x_adv, x - eps, x + eps), 0.0, 1.0)
    return np.asarray(x_adv)


def exact_class_distances(x, x_ref, y_ref):
    """Exact class distances at (attacked) float points [B, D] -> [B, 10], NumPy float64."""
    return brute_class_distances(x, x_ref, y_ref, 10)


def margin(class_dist, pred):
    """Distance to the nearest other class minus distance to the predicted class, [B]."""
    rows = np.arange(len(pred))
    others = class_dist.copy()
    others[rows, pred] = np.inf
    return others.min(1) - class_dist[rows, pred]


@pytest.mark.slow
def test_certificate_is_never_beaten_by_pgd(digits):
    x_train, y_train, x_test, y_test = digits
    xf_train = x_train.astype(np.float32) / 16
    xf_test = x_test[:80].astype(np.float32) / 16
    cd, _ = separation.class_nearest(x_test[:80], x_train, y_train, 10)
    pred, radius = separation.distance_classifier(cd / 16)
    eps = 0.1
    certified = radius > eps
    assert certified.sum() >= 30
    x_adv = pgd_on_surrogate(jnp.asarray(xf_test), jnp.asarray(pred), jnp.asarray(xf_train),
                             jnp.asarray(y_train), eps, jax.random.key(0))
    assert np.abs(x_adv - xf_test).max() <= eps + 1e-6
    pred_adv = np.argmin(exact_class_distances(x_adv, xf_train, y_train), axis=1)
    # Exact distance classifier at the attacked points: no certified prediction changes...
    np.testing.assert_array_equal(pred_adv[certified], pred[certified])
    # ...while the same attack does flip some uncertified ones and, on certified points, eats
    # most of the 2 eps by which a 1-Lipschitz margin can shrink (it is a real attack).
    assert (pred_adv[~certified] != pred[~certified]).sum() >= 5
    adv_dist = exact_class_distances(x_adv, xf_train, y_train)
    margin_drop = margin(cd / 16, pred) - margin(adv_dist, pred)
    assert margin_drop[certified].mean() > 0.6 * 2 * eps
    assert margin_drop.max() <= 2 * eps + 1e-6


# ----------------------------------------------------------------------------- the binary


def run_binary(*args):
    return subprocess.run([sys.executable, "-m", "jax_robust.cli.separation", *args],
                          capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_binary_writes_json_and_figures(tmp_path):
    out = run_binary("--dataset=digits", f"--workdir={tmp_path}", "--noprogress")
    assert out.returncode == 0, out.stderr
    with open(tmp_path / "separation.json") as f:
        result = json.load(f)
    for split in ("train_train", "test_train"):
        s = result[split]
        assert s["min"] == s["min_levels"] / 16
        for key in ("q0.001", "q0.01", "q0.1", "q0.5", "mean", "n_below_2eps", "closest"):
            assert key in s, key
        assert len(s["closest"]) == 10
        assert {"query_index", "ref_index", "query_label", "ref_label",
                "distance"} <= set(s["closest"][0])
    assert result["train_train"]["min"] == 7 / 16
    clf = result["classifier"]["test"]
    assert 0.9 < clf["accuracy"] <= 1 and 0 < clf["certified_astuteness"] <= clf["accuracy"]
    assert os.path.exists(tmp_path / "separation_hist.png")
    assert os.path.exists(tmp_path / "closest_pairs.png")


@pytest.mark.slow
@pytest.mark.parametrize("flag", ["--dataset=nope", "--eps=0", "--data_dir=/no/such/dir"])
def test_binary_bad_input_exits_2_with_one_line(tmp_path, flag):
    out = run_binary(flag, f"--workdir={tmp_path}")
    assert out.returncode == 2
    assert len(out.stderr.strip().splitlines()) == 1, out.stderr


@pytest.mark.slow
def test_sigterm_during_the_scan_stops_it_in_one_line_and_a_rerun_completes(tmp_path):
    import signal
    import time

    if not data.has_idx_files(FASHION_DIR):
        pytest.skip(f"Fashion-MNIST IDX files not in {FASHION_DIR}")
    args = [sys.executable, "-m", "jax_robust.cli.separation", "--dataset=fashion_mnist",
            "--max_points=12000", f"--workdir={tmp_path}"]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in proc.stderr:  # the first progress line comes after the first of 20 calls
        if "train-train: tiles" in line:
            break
    sent = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    waited = time.monotonic() - sent
    assert proc.returncode == 130, (proc.returncode, err[-2000:])
    assert err.strip().splitlines() == [err.strip()] and err.startswith(
        "stopped during the distance scan (call "), err
    assert waited < 20 and not os.listdir(tmp_path), (waited, os.listdir(tmp_path))
    again = subprocess.run(args + ["--noprogress"], capture_output=True, text=True,
                           timeout=600)
    assert again.returncode == 0, again.stderr[-2000:]
    result = json.load(open(tmp_path / "separation.json"))
    assert result["n_train"] == 12000 and result["train_train"]["min"] > 0
