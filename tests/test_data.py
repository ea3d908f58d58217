"""Data sources: digits split, IDX files the test writes, TFDS under mock data."""

import gzip
import os

import numpy as np
import pytest

from jax_robust import data, recipes
from jax_robust.errors import DataError


def write_idx(path, array, gz=True):
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(
        int(d).to_bytes(4, "big") for d in array.shape)
    payload = header + array.astype(np.uint8).tobytes()
    if gz:
        with gzip.open(path + ".gz", "wb") as f:
            f.write(payload)
    else:
        with open(path, "wb") as f:
            f.write(payload)


def make_idx_dir(tmp_path, gz=True, n_train=30, n_test=12, size=28):
    rng = np.random.default_rng(0)
    arrays = {
        "x_train": rng.integers(0, 256, (n_train, size, size)),
        "y_train": rng.integers(0, 10, n_train),
        "x_test": rng.integers(0, 256, (n_test, size, size)),
        "y_test": rng.integers(0, 10, n_test),
    }
    for key, stem in data.IDX_FILES.items():
        write_idx(os.path.join(tmp_path, stem), arrays[key], gz=gz)
    return arrays


def test_digits_split_is_fixed_stratified_and_scaled():
    ds = data.load_dataset("digits")
    assert ds.x_train.shape == (1437, 8, 8, 1) and ds.x_test.shape == (360, 8, 8, 1)
    assert ds.x_train.dtype == np.float32 and ds.y_train.dtype == np.int32
    assert ds.x_train.min() == 0.0 and ds.x_train.max() == 1.0
    # stratified: each class keeps its share (360 / 1797) of the test set, to within one image
    counts = np.bincount(ds.y_train, minlength=10) + np.bincount(ds.y_test, minlength=10)
    assert np.all(np.abs(np.bincount(ds.y_test) - counts * 360 / 1797) < 1)
    # exact grey levels k / 16
    np.testing.assert_array_equal(ds.as_uint8("train") / 16.0, ds.x_train)
    again = data.load_dataset("digits")
    np.testing.assert_array_equal(again.x_test, ds.x_test)
    assert recipes.recipe(ds.info.name).eps == 0.1 and ds.info.num_classes == 10


def test_digits_equal_sklearns_load_digits_and_train_test_split():
    # The loader reads the CSV and a stored split order instead of importing scikit-learn;
    # the reference here is scikit-learn's own load_digits + train_test_split.
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = digits.images.astype(np.float32)[..., None] / 16.0
    x_train, x_test, y_train, y_test = train_test_split(
        x, digits.target, test_size=360, stratify=digits.target, random_state=0)
    assert data._digits_csv() is not None  # the fast path is the one tested
    ds = data.load_dataset("digits")
    np.testing.assert_array_equal(ds.x_train, x_train)
    np.testing.assert_array_equal(ds.x_test, x_test)
    np.testing.assert_array_equal(ds.y_train, y_train)
    np.testing.assert_array_equal(ds.y_test, y_test)


@pytest.mark.parametrize("gz", [True, False])
def test_idx_directory_round_trip(tmp_path, gz):
    arrays = make_idx_dir(str(tmp_path), gz=gz)
    ds = data.load_dataset("mnist", data_dir=str(tmp_path))
    assert ds.x_train.shape == (30, 28, 28, 1)
    np.testing.assert_array_equal(ds.as_uint8("train")[..., 0], arrays["x_train"])
    np.testing.assert_array_equal(ds.y_test, arrays["y_test"])
    np.testing.assert_allclose(ds.x_test[..., 0], arrays["x_test"] / 255.0, atol=1e-7)
    fm = data.load_dataset("fashion_mnist", data_dir=str(tmp_path))
    assert fm.info.name == "fashion_mnist" and recipes.recipe(fm.info.name).eps == 0.1


def test_idx_errors_are_user_errors(tmp_path):
    make_idx_dir(str(tmp_path))
    stem = os.path.join(str(tmp_path), data.IDX_FILES["x_test"])
    with open(stem + ".gz", "r+b") as f:  # truncate the gzip stream
        f.truncate(40)
    with pytest.raises(DataError, match="t10k-images"):
        data.load_idx_dir("mnist", str(tmp_path))
    with pytest.raises(DataError, match="does not exist"):
        data.load_dataset("fashion_mnist", data_dir=str(tmp_path / "nope"))
    with pytest.raises(DataError, match="unknown dataset"):
        data.load_dataset("imagenet21k")
    os.remove(stem + ".gz")
    with pytest.raises(DataError, match="t10k-images-idx3-ubyte"):
        data.load_idx_dir("mnist", str(tmp_path))


@pytest.mark.skipif(not os.path.isdir(data.FASHION_MNIST_DIR),
                    reason="dataset-fashion-mnist (Debian) not installed")
def test_fashion_mnist_from_the_debian_package():
    ds = data.load_dataset("fashion_mnist", max_train=100, max_test=50)
    assert ds.x_train.shape == (100, 28, 28, 1) and ds.x_test.shape == (50, 28, 28, 1)
    assert ds.info.levels == 255 and 0 <= ds.x_train.min() and ds.x_train.max() <= 1


@pytest.mark.parametrize("name,tfds_name,shape,eps", [
    ("mnist", "mnist", (28, 28, 1), 0.1),
    ("cifar10", "cifar10", (32, 32, 3), 0.031),
    ("svhn", "svhn_cropped", (32, 32, 3), 0.031),
])
def test_tfds_sources_under_mock_data(name, tfds_name, shape, eps):
    tfds = pytest.importorskip("tensorflow_datasets")
    # 80 mock examples: enough that every class occurs in the training split
    # (load_dataset refuses a training set that lacks a class).
    with tfds.testing.mock_data(num_examples=80):
        ds = data.load_dataset(name)
    assert ds.x_train.shape == (80,) + shape and ds.x_test.shape == (80,) + shape
    assert set(ds.y_train.tolist()) == set(range(10))
    assert ds.x_train.dtype == np.float32 and 0 <= ds.x_train.min() and ds.x_train.max() <= 1
    assert ds.y_train.dtype == np.int32 and ds.y_train.max() < 10
    np.testing.assert_array_equal(np.rint(ds.x_train * 255), ds.as_uint8("train"))
    assert ds.info.name == name and recipes.recipe(ds.info.name).eps == eps
