"""TFDS mock data for tests, and a script that runs an experiment binary under it.

    python tests/mock_tfds.py run --dataset=cifar10 --arch=wrn ...   (a subprocess of a test)
"""

import sys

import numpy as np


def labelled_mock_source(self, split, **kwargs):
    """A `tfds.testing.mock_data(as_data_source_fn=...)` source: 24 records of random uint8
    images whose labels cycle through every class (for imagenet2012, through the first fine
    class of each Restricted ImageNet group), so any 12 consecutive training records hold
    every class, as `data.load_dataset` requires."""
    from jax_robust import data

    if isinstance(split, (list, tuple)):
        return [labelled_mock_source(self, s, **kwargs) for s in split]
    if self.name == "imagenet2012":
        labels, shape = [first for _, first, _ in data.RESTRICTED_IMAGENET_CLASSES], (80, 96, 3)
    else:
        labels = list(range(self.info.features["label"].num_classes))
        shape = self.info.features["image"].shape
    rng = np.random.default_rng(0 if split == "train" else 1)
    return [{"image": rng.integers(0, 256, shape, dtype=np.uint8),
             "label": labels[i % len(labels)]} for i in range(24)]


if __name__ == "__main__":
    import importlib

    import tensorflow_datasets as tfds

    binary = importlib.import_module(f"jax_robust.cli.{sys.argv.pop(1)}")
    with tfds.testing.mock_data(as_data_source_fn=labelled_mock_source):
        binary.entry()
