"""Scale-out: augmentation, Restricted ImageNet, the paper's data sets end to end under TFDS
mock data, and bfloat16. (Devices and processes against one device: test_multiprocess.py.)"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_robust import augment, data, models
from jax_robust.attacks import cross_entropy
from mock_tfds import labelled_mock_source


def test_random_crop_takes_windows_of_the_zero_padded_image():
    x = jax.random.uniform(jax.random.key(0), (16, 6, 6, 2))
    out = np.asarray(augment.random_crop(x, jax.random.key(1), (6, 6), padding=2))
    padded = np.pad(np.asarray(x), ((0, 0), (2, 2), (2, 2), (0, 0)))
    offsets = set()
    for i in range(16):
        hits = [(a, b) for a in range(5) for b in range(5)
                if np.array_equal(padded[i, a:a + 6, b:b + 6], out[i])]
        assert hits, i
        offsets.add(hits[0])
    assert len(offsets) > 4  # offsets vary per example


def test_flip_and_center_crop():
    x = jax.random.uniform(jax.random.key(0), (64, 4, 5, 1))
    out = np.asarray(augment.random_flip(x, jax.random.key(3)))
    flipped = np.array([np.array_equal(o, np.asarray(xi)[:, ::-1]) for o, xi in zip(out, x)])
    same = np.array([np.array_equal(o, np.asarray(xi)) for o, xi in zip(out, x)])
    assert np.all(flipped | same) and 16 < flipped.sum() < 48
    big = jnp.arange(72 * 72, dtype=jnp.float32).reshape(1, 72, 72, 1)
    np.testing.assert_array_equal(augment.center_crop(big, (64, 64)), big[:, 4:68, 4:68])


def test_restricted_imagenet_classes_as_the_official_code():
    labels = [data.restricted_imagenet_label(i) for i in range(1000)]
    assert sum(v >= 0 for v in labels) == 203
    assert [labels[i] for i in (80, 100, 281, 118, 151, 268, 389, 30, 300, 365, 33, 37)] == [
        0, 0, 1, 2, 3, 3, 4, 5, 6, 7, 8, 8]
    assert labels[29] == labels[101] == labels[269] == -1


def test_resize_shorter_side_then_center_crop_matches_pil():
    from PIL import Image

    img = np.random.default_rng(0).integers(0, 256, (90, 150, 3)).astype(np.uint8)
    out = data.resize_and_center_crop(img, 72, 64)
    ref = np.asarray(Image.fromarray(img).resize((120, 72), Image.BILINEAR))[4:68, 28:92]
    np.testing.assert_array_equal(out, ref)


@pytest.mark.slow
@pytest.mark.parametrize("argv", [
    # CNN1 on the paper's data: the data path is what is tested, in about half a WRN-10-1's
    # time (26-27 s against 45-60 s alone). A WRN through the binary on mock CIFAR-10:
    # test_multiprocess_batchnorm.py; ResNet-50: test_models.py; SVHN's loader: test_data.py.
    ["--dataset=cifar10", "--arch=cnn1", "--method=at"],
    ["--dataset=restricted_imagenet", "--arch=cnn1", "--method=rst"],
])
def test_paper_datasets_end_to_end_under_mock_data(tmp_path, argv, capsys):
    tfds = pytest.importorskip("tensorflow_datasets")
    from absl import flags

    from jax_robust.cli import run as run_binary

    flags.FLAGS.unparse_flags()
    # 12 training points (every class present) in batches of 6: 2 steps.
    args = ["run.py", *argv, f"--workdir={tmp_path}", "--epochs=1", "--attack_steps=1",
            "--batch_size=6", "--eval_batch_size=4", "--max_train=12", "--max_test=4",
            "--log_every=1", "--lipschitz_steps=1"]
    try:
        with tfds.testing.mock_data(as_data_source_fn=labelled_mock_source):
            run_binary.main(args)
    finally:
        flags.FLAGS.unparse_flags()
    results = json.load(open(tmp_path / "results.json"))
    dataset = argv[0].split("=")[1]
    cfg = results["config"]
    assert cfg["data"]["dataset"] == dataset and results["steps"] == 2
    assert cfg["data"]["augment"] == {"cifar10": "crop_flip", "svhn": "none",
                                      "restricted_imagenet": "crop"}[dataset]
    assert cfg["attack"]["eps"] == {"cifar10": 0.031, "svhn": 0.031,
                                    "restricted_imagenet": 0.005}[dataset]
    assert "| " in capsys.readouterr().out


@pytest.mark.slow
def test_bfloat16_loss_is_close_to_float32():
    x = jax.random.uniform(jax.random.key(0), (8, 28, 28, 1))
    y = jax.random.randint(jax.random.key(1), (8,), 0, 10)
    f32 = models.build_model("cnn2", 10, (28, 28, 1), dropout=0.5, dtype="float32")
    bf16 = models.build_model("cnn2", 10, (28, 28, 1), dropout=0.5, dtype="bfloat16")
    params, _ = models.init_model(f32, jax.random.key(2), (28, 28, 1))
    # A trained-looking last layer (the official init sets it to zero).
    params["TorchDense_2"]["Dense_0"]["kernel"] = 0.3 * jax.random.normal(
        jax.random.key(3), (200, 10))
    params_bf16, _ = models.init_model(bf16, jax.random.key(2), (28, 28, 1))
    assert jax.tree_util.tree_map(lambda a: a.dtype, params_bf16)["Conv_0"]["kernel"] == (
        jnp.float32)  # parameters stay float32
    loss = [float(cross_entropy(m.apply({"params": params}, x, train=False), y).mean())
            for m in (f32, bf16)]
    assert abs(loss[1] - loss[0]) < 0.02 * abs(loss[0]), loss
    assert loss[1] != loss[0]  # the bf16 path really computes in bf16
