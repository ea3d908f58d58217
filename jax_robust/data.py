"""Data sources: each returns a `Dataset` of NHWC float32 images in [0, 1] and int32 labels.

Sources (name -> where the data come from):
  digits         scikit-learn's `load_digits` (1,797 real 8x8 digits, 17 grey levels), split
                 1,437 train / 360 test, stratified, `random_state=0`; embedded, no download.
  fashion_mnist  the four gzipped IDX files in `data_dir` (default
                 /usr/share/datasets/fashion-mnist, Debian package `dataset-fashion-mnist`);
                 falls back to TFDS `fashion_mnist` when the directory has no IDX files.
  mnist          IDX files in `data_dir` if it holds them, else TFDS `mnist`.
  cifar10        TFDS `cifar10` through `tfds.data_source` (no TensorFlow needed).
  svhn           TFDS `svhn_cropped` (train and test splits; `extra` is not used, as in the paper).
  restricted_imagenet
                 TFDS `imagenet2012` restricted to the 9 super-classes of the official code,
                 read record by record through grain (it does not fit in memory): the
                 shorter side resized to 72 (bilinear), then the centre 72x72 kept for
                 training (random 64x64 crops with padding 8 are taken on the device) and
                 the centre 64x64 for testing.

A data set's official settings (eps, schedule, augmentation) are in recipes.py.
"""

from __future__ import annotations

import dataclasses
import gzip
import os
from typing import Callable

import numpy as np

from jax_robust.errors import DataError

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
IDX_FILES = {
    "x_train": "train-images-idx3-ubyte",
    "y_train": "train-labels-idx1-ubyte",
    "x_test": "t10k-images-idx3-ubyte",
    "y_test": "t10k-labels-idx1-ubyte",
}
@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    """What a data set is: `levels` is the number of grey steps (pixel = k / levels)."""

    name: str
    num_classes: int
    levels: int
    image_shape: tuple[int, int, int]


@dataclasses.dataclass(frozen=True)
class Dataset:
    """Images [N, H, W, C] float32 in [0, 1] (NumPy arrays, or `RecordImages` that load on
    indexing); labels [N] int32. `info.image_shape` is the model's input shape; stored
    training images may be larger (Restricted ImageNet), cropped on the device."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    info: DatasetInfo

    def as_uint8(self, split: str) -> np.ndarray:
        """Images of `split` ('train' or 'test') as exact integer grey levels k in [0, levels]."""
        x = self.x_train if split == "train" else self.x_test
        return np.rint(x[np.arange(len(x))] * self.info.levels).astype(np.uint8)


def _make(name: str, x_train, y_train, x_test, y_test, levels: int, num_classes: int) -> Dataset:
    info = DatasetInfo(
        name=name,
        num_classes=num_classes,
        levels=levels,
        image_shape=tuple(int(d) for d in x_test.shape[1:]),
    )
    if not isinstance(x_train, RecordImages):
        x_train = np.ascontiguousarray(x_train, np.float32)
        x_test = np.ascontiguousarray(x_test, np.float32)
    return Dataset(x_train=x_train, y_train=np.asarray(y_train, np.int32), x_test=x_test,
                   y_test=np.asarray(y_test, np.int32), info=info)


# The order of train_test_split(range(1797), test_size=360, stratify=target, random_state=0):
# 1,437 train indices, then 360 test indices (tests/test_data.py checks it against sklearn).
DIGITS_SPLIT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "digits_split.npy")
DIGITS_TEST = 360


def _digits_csv() -> str | None:
    """Path of scikit-learn's digits.csv.gz, found without importing scikit-learn (which
    takes over a second of every run's start-up), or None."""
    import importlib.util

    spec = importlib.util.find_spec("sklearn")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = os.path.join(spec.submodule_search_locations[0], "datasets", "data", "digits.csv.gz")
    return path if os.path.isfile(path) else None


def digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """(images [1797, 8, 8] float64 in 0..16, target [1797] int): `sklearn.datasets.
    load_digits()`'s images and target, read from its CSV file directly where it is found."""
    path = _digits_csv()
    if path is None:
        from sklearn.datasets import load_digits as sk_load_digits

        d = sk_load_digits()
        return d.images, d.target
    table = np.loadtxt(path, delimiter=",")
    return table[:, :-1].reshape(-1, 8, 8), table[:, -1].astype(int)


def load_digits(data_dir: str | None = None) -> Dataset:
    """scikit-learn's 8x8 digits; pixel values k/16; stratified split, 360 test images."""
    del data_dir
    images, target = digits_arrays()
    order = np.load(DIGITS_SPLIT)
    if not np.array_equal(np.sort(order), np.arange(len(target))):
        raise DataError(f"{DIGITS_SPLIT} is not a permutation of the {len(target)} digits")
    x = images.astype(np.float32)[..., None] / 16.0
    train, test = order[:-DIGITS_TEST], order[-DIGITS_TEST:]
    return _make("digits", x[train], target[train], x[test], target[test], levels=16,
                 num_classes=10)


# ----------------------------------------------------------------------------- IDX files


def read_idx(path: str) -> np.ndarray:
    """Reads one IDX file (MNIST's format), gzipped or not, into an array of its stored shape."""
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as e:
        raise DataError(f"cannot read IDX file {path}: {e}") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise DataError(f"{path} is not an unsigned-byte IDX file (bad magic number)")
    ndim = raw[3]
    header = 4 + 4 * ndim
    dims = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    if len(raw) != header + int(np.prod(dims)):
        raise DataError(f"{path}: expected {int(np.prod(dims))} bytes of data for shape {dims}")
    return np.frombuffer(raw, np.uint8, offset=header).reshape(dims)


def _find_idx(data_dir: str, stem: str) -> str | None:
    for name in (stem + ".gz", stem):
        path = os.path.join(data_dir, name)
        if os.path.exists(path):
            return path
    return None


def has_idx_files(data_dir: str | None) -> bool:
    """Whether `data_dir` holds all four IDX files; DataError if it holds only some."""
    if not data_dir or not os.path.isdir(data_dir):
        return False
    found = {s: _find_idx(data_dir, s) for s in IDX_FILES.values()}
    missing = [s for s, path in found.items() if path is None]
    if missing and len(missing) < len(found):
        raise DataError(f"{data_dir} holds some IDX files but not {', '.join(missing)}[.gz]")
    return not missing


def load_idx_dir(name: str, data_dir: str) -> Dataset:
    """MNIST-format data set from the four IDX files (gzipped or not) in `data_dir`."""
    if not os.path.isdir(data_dir):
        raise DataError(f"data directory {data_dir} does not exist")
    arrays = {}
    for key, stem in IDX_FILES.items():
        path = _find_idx(data_dir, stem)
        if path is None:
            raise DataError(f"{data_dir} has no {stem}[.gz] (needed for {name})")
        arrays[key] = read_idx(path)
    for split in ("train", "test"):
        x, y = arrays[f"x_{split}"], arrays[f"y_{split}"]
        if x.ndim != 3 or y.ndim != 1:
            raise DataError(f"{data_dir}: {split} images must be an IDX array [N, H, W] and "
                            f"labels [N]; got shapes {x.shape} and {y.shape}")
        if len(x) != len(y):
            raise DataError(f"{data_dir}: {split} images and labels differ in count "
                            f"({len(x)} and {len(y)})")
        if len(x) == 0:
            raise DataError(f"{data_dir}: the {split} split has no images")
    images = {k: arrays[k][..., None].astype(np.float32) / 255.0 for k in ("x_train", "x_test")}
    return _make(
        name, images["x_train"], arrays["y_train"], images["x_test"], arrays["y_test"],
        levels=255, num_classes=int(max(arrays["y_train"].max(), arrays["y_test"].max())) + 1,
    )


# ----------------------------------------------------------------------------- TFDS


def _tfds_split_arrays(source) -> tuple[np.ndarray, np.ndarray]:
    n = len(source)
    first = source[0]
    x = np.empty((n,) + np.asarray(first["image"]).shape, np.uint8)
    y = np.empty((n,), np.int32)
    for i in range(n):
        record = source[i]
        x[i] = record["image"]
        y[i] = record["label"]
    return x, y


def load_tfds(name: str, tfds_name: str, data_dir: str | None, num_classes: int) -> Dataset:
    """A TFDS image classification data set read through `tfds.data_source` into host memory."""
    import tensorflow_datasets as tfds

    try:
        sources = tfds.data_source(tfds_name, split=["train", "test"], data_dir=data_dir,
                                   download=False)
    except Exception as e:  # TFDS raises assorted errors for a data set that is not prepared.
        where = data_dir or "the default TFDS data dir"
        raise DataError(
            f"TFDS data set {tfds_name} is not prepared in {where} "
            f"(prepare it with `tfds build {tfds_name}` where there is network): "
            f"{type(e).__name__}"
        ) from None
    (x_train, y_train), (x_test, y_test) = (_tfds_split_arrays(s) for s in sources)
    return _make(
        name, x_train.astype(np.float32) / 255.0, y_train,
        x_test.astype(np.float32) / 255.0, y_test, levels=255, num_classes=num_classes,
    )


def load_mnist(data_dir: str | None = None) -> Dataset:
    if has_idx_files(data_dir):
        return load_idx_dir("mnist", data_dir)
    return load_tfds("mnist", "mnist", data_dir, 10)


def load_fashion_mnist(data_dir: str | None = None) -> Dataset:
    data_dir = data_dir or FASHION_MNIST_DIR
    if has_idx_files(data_dir):
        return load_idx_dir("fashion_mnist", data_dir)
    if data_dir == FASHION_MNIST_DIR and not os.path.isdir(data_dir):
        raise DataError(
            f"Fashion-MNIST not found in {data_dir}: "
            "`apt-get install dataset-fashion-mnist`, or pass --data_dir"
        )
    return load_tfds("fashion_mnist", "fashion_mnist", data_dir, 10)


def load_cifar10(data_dir: str | None = None) -> Dataset:
    return load_tfds("cifar10", "cifar10", data_dir, 10)


def load_svhn(data_dir: str | None = None) -> Dataset:
    return load_tfds("svhn", "svhn_cropped", data_dir, 10)


# ----------------------------------------------------------------------------- Restricted ImageNet

# (name, first, last ImageNet-1k class, inclusive), in the label order of the official
# ImageFolder (sorted names): bird 0, cat 1, crab 2, dog 3, fish 4, frog 5, insect 6,
# primate 7, turtle 8. 203 fine classes.
RESTRICTED_IMAGENET_CLASSES = (
    ("bird", 80, 100), ("cat", 281, 285), ("crab", 118, 121), ("dog", 151, 268),
    ("fish", 389, 397), ("frog", 30, 32), ("insect", 300, 319), ("primate", 365, 382),
    ("turtle", 33, 37),
)


def restricted_imagenet_label(imagenet_label: int) -> int:
    """The super-class of an ImageNet-1k label, or -1 if it is outside the 9 groups."""
    for i, (_, first, last) in enumerate(RESTRICTED_IMAGENET_CLASSES):
        if first <= imagenet_label <= last:
            return i
    return -1


def resize_and_center_crop(image: np.ndarray, shorter: int, crop: int) -> np.ndarray:
    """uint8 [H, W, C] -> shorter side resized to `shorter` (PIL bilinear, as torchvision's
    Resize), then the centre crop x crop window."""
    from PIL import Image

    h, w = image.shape[:2]
    if h <= w:
        size = (max(shorter, round(w * shorter / h)), shorter)
    else:
        size = (shorter, max(shorter, round(h * shorter / w)))
    resized = np.asarray(Image.fromarray(image).resize(size, Image.BILINEAR))
    top, left = (resized.shape[0] - crop) // 2, (resized.shape[1] - crop) // 2
    return resized[top:top + crop, left:left + crop]


class RecordImages:
    """Images of a TFDS split read on demand through a grain MapDataset; indexing with an
    int array gives float32 [len(idx), crop, crop, 3] in [0, 1], like a NumPy array."""

    def __init__(self, source, record_ids: np.ndarray, shorter: int, crop: int,
                 threads: int = 8):
        import grain

        self.record_ids = np.asarray(record_ids, np.int64)
        self.crop = crop
        self.shape = (len(self.record_ids), crop, crop, 3)
        self.dtype = np.dtype(np.float32)
        self._images = grain.MapDataset.source(source).map(
            lambda r: resize_and_center_crop(np.asarray(r["image"]), shorter, crop))
        self._threads = threads

    def __len__(self) -> int:
        return len(self.record_ids)

    def head(self, n: int | None) -> "RecordImages":
        """The first n images (all if n is None), still read on demand."""
        return self.take(np.arange(len(self))[:n])

    def take(self, indices: np.ndarray) -> "RecordImages":
        """The images at `indices`, still read on demand."""
        out = object.__new__(RecordImages)
        out.__dict__.update(self.__dict__)
        out.record_ids = self.record_ids[np.asarray(indices)]
        out.shape = (len(out.record_ids),) + self.shape[1:]
        return out

    def __getitem__(self, idx) -> np.ndarray:
        from concurrent.futures import ThreadPoolExecutor

        ids = self.record_ids[np.asarray(idx)].reshape(-1)
        with ThreadPoolExecutor(self._threads) as pool:
            images = list(pool.map(lambda i: self._images[int(i)], ids))
        return np.stack(images).astype(np.float32) / 255.0


def _restricted_index(source, cache: str | None) -> tuple[np.ndarray, np.ndarray]:
    """(record ids, super-class labels) of the records in the 9 groups; cached in `cache`."""
    if cache and os.path.exists(cache):
        with np.load(cache) as f:
            if int(f["num_records"]) == len(source):
                return f["ids"], f["labels"]
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(16) as pool:
        labels = np.fromiter(pool.map(lambda i: int(source[i]["label"]), range(len(source))),
                             np.int64, len(source))
    restricted = np.array([restricted_imagenet_label(int(v)) for v in labels], np.int64)
    ids = np.flatnonzero(restricted >= 0)
    if cache:
        try:
            np.savez(cache, ids=ids, labels=restricted[ids], num_records=len(source))
        except OSError:
            pass
    return ids, restricted[ids]


def load_restricted_imagenet(data_dir: str | None = None) -> Dataset:
    """Restricted ImageNet (9 classes) from TFDS `imagenet2012` (train / validation)."""
    import tensorflow_datasets as tfds

    try:
        train, test = tfds.data_source("imagenet2012", split=["train", "validation"],
                                       data_dir=data_dir, download=False)
    except Exception as e:
        raise DataError(
            f"TFDS data set imagenet2012 is not prepared in {data_dir or 'the default dir'} "
            f"(it needs the manually downloaded ImageNet files): {type(e).__name__}") from None
    cache = (lambda split: os.path.join(data_dir, f"restricted_imagenet_{split}_index.npz")
             if data_dir else None)
    train_ids, y_train = _restricted_index(train, cache("train"))
    test_ids, y_test = _restricted_index(test, cache("validation"))
    if len(train_ids) == 0 or len(test_ids) == 0:
        raise DataError("imagenet2012 has no images of the Restricted ImageNet classes")
    return _make("restricted_imagenet", RecordImages(train, train_ids, 72, 72), y_train,
                 RecordImages(test, test_ids, 72, 64), y_test, levels=255,
                 num_classes=len(RESTRICTED_IMAGENET_CLASSES))


def take(x, indices: np.ndarray):
    """x[indices] for an image array, without loading anything for `RecordImages`."""
    return x.take(indices) if isinstance(x, RecordImages) else x[indices]


def split_holdout(ds: Dataset, n: int) -> tuple[Dataset, tuple]:
    """(ds without the last `n` training points, (x_holdout, y_holdout) of those points); a
    DataError when that leaves no training point."""
    if n <= 0:
        return ds, (None, None)
    keep = len(ds.y_train) - n
    if keep < 1:
        raise DataError(f"--holdout={n} leaves no training point (the training set has "
                        f"{len(ds.y_train)})")
    held = np.arange(keep, len(ds.y_train))
    rest = dataclasses.replace(ds, x_train=take(ds.x_train, np.arange(keep)),
                               y_train=ds.y_train[:keep])
    return rest, (take(ds.x_train, held), ds.y_train[held])


SOURCES: dict[str, Callable[[str | None], Dataset]] = {
    "digits": load_digits,
    "mnist": load_mnist,
    "fashion_mnist": load_fashion_mnist,
    "cifar10": load_cifar10,
    "svhn": load_svhn,
    "restricted_imagenet": load_restricted_imagenet,
}


def check_dataset(ds: Dataset, where: str, full: bool = True) -> None:
    """DataError unless both splits hold images of one shape [N > 0, H, W, C] (the training
    images may be stored larger and cropped: Restricted ImageNet) with labels [N] in
    0..K-1, at least 2 classes in the training set, and (`full`: the whole data set) every
    class present in it."""
    info = ds.info
    for split, x, y in (("train", ds.x_train, ds.y_train), ("test", ds.x_test, ds.y_test)):
        shape = tuple(x.shape)
        if len(shape) != 4 or shape[0] == 0:
            raise DataError(f"{where}: the {split} split has no images of shape [N, H, W, C] "
                            f"(got {shape})")
        if y.shape != (shape[0],):
            raise DataError(f"{where}: the {split} labels have shape {y.shape}, the images "
                            f"{shape}")
        if min(y) < 0 or max(y) >= info.num_classes:
            raise DataError(f"{where}: {split} labels must be in 0..{info.num_classes - 1}, "
                            f"found {int(min(y))}..{int(max(y))}")
    train_shape = tuple(ds.x_train.shape[1:])
    if not isinstance(ds.x_train, RecordImages) and train_shape != info.image_shape:
        raise DataError(f"{where}: training images are {train_shape}, test images "
                        f"{info.image_shape}; both splits must have one image shape")
    present = np.unique(ds.y_train)
    if len(present) < 2:
        raise DataError(f"{where}: the training set holds {len(present)} class; at least 2 "
                        f"are needed (raise --max_train?)")
    if len(present) != info.num_classes and full:
        absent = sorted(set(range(info.num_classes)) - set(present.tolist()))
        shown = ", ".join(str(v) for v in absent[:5]) + (", ..." if len(absent) > 5 else "")
        raise DataError(f"{where}: labels run to {info.num_classes - 1} but the training set "
                        f"has no image of class {shown} (labels must be 0..K-1, every class "
                        f"present)")


def load_dataset(name: str, data_dir: str | None = None, max_train: int | None = None,
                 max_test: int | None = None) -> Dataset:
    """Loads data set `name` (see module doc); `max_train`/`max_test` keep the first points.
    The result is checked (`check_dataset`)."""
    if name not in SOURCES:
        raise DataError(f"unknown dataset {name!r}; choose one of {', '.join(SOURCES)}")
    data_dir = os.path.expanduser(data_dir) if data_dir else data_dir
    if data_dir and not os.path.isdir(data_dir):
        raise DataError(f"data directory {data_dir} does not exist")
    ds = SOURCES[name](data_dir)
    check_dataset(ds, data_dir or name)
    if max_train is not None or max_test is not None:
        def head(x, n):
            return x.head(n) if isinstance(x, RecordImages) else x[:n]

        ds = dataclasses.replace(
            ds,
            x_train=head(ds.x_train, max_train), y_train=ds.y_train[:max_train],
            x_test=head(ds.x_test, max_test), y_test=ds.y_test[:max_test],
        )
        check_dataset(ds, f"{data_dir or name} (--max_train/--max_test)", full=False)
    return ds
