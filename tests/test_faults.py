"""Bad inputs a hostile user tries: malformed IDX data, stale sweep cells, bad separation
settings. Each gets one line naming the problem and exit code 2 (or a DataError), never a
wrong number with exit status 0."""

import gzip
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from jax_robust import data
from jax_robust.errors import DataError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write_idx(path, array):
    array = np.asarray(array, np.uint8)
    header = bytes([0, 0, 8, array.ndim]) + b"".join(
        int(d).to_bytes(4, "big") for d in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.tobytes())


def make_idx_dir(path, x_train=None, y_train=None, x_test=None, y_test=None, skip=()):
    rng = np.random.default_rng(0)
    arrays = {
        "x_train": rng.integers(0, 256, (40, 12, 12)) if x_train is None else x_train,
        "y_train": np.arange(40) % 4 if y_train is None else y_train,
        "x_test": rng.integers(0, 256, (12, 12, 12)) if x_test is None else x_test,
        "y_test": np.arange(12) % 4 if y_test is None else y_test,
    }
    os.makedirs(path, exist_ok=True)
    for key, stem in data.IDX_FILES.items():
        if key not in skip:
            write_idx(os.path.join(path, stem + ".gz"), arrays[key])
    return str(path)


def test_a_well_formed_idx_directory_loads(tmp_path):
    ds = data.load_dataset("mnist", make_idx_dir(tmp_path))
    assert ds.x_train.shape == (40, 12, 12, 1) and ds.info.num_classes == 4


@pytest.mark.parametrize("change,needle", [
    (dict(x_test=np.zeros((12, 10, 10))), "training images are (12, 12, 1), test images"),
    (dict(y_train=np.r_[np.arange(39) % 4, 200]), "no image of class 4, 5, 6, 7, 8, ..."),
    (dict(y_train=np.zeros(40), y_test=np.zeros(12)), "holds 1 class"),
    (dict(y_train=np.zeros((40, 2))), "labels [N]"),
    (dict(x_train=np.zeros(40)), "images must be an IDX array [N, H, W]"),
    (dict(x_train=np.zeros((0, 12, 12)), y_train=np.zeros(0)), "the train split has no images"),
    (dict(y_test=np.arange(11) % 4), "differ in count (12 and 11)"),
    (dict(skip=("y_test",)), "holds some IDX files but not t10k-labels-idx1-ubyte"),
])
def test_malformed_idx_data_are_refused_naming_the_problem(tmp_path, change, needle):
    with pytest.raises(DataError) as err:
        data.load_dataset("mnist", make_idx_dir(tmp_path, **change))
    assert needle in str(err.value), str(err.value)


def test_data_dir_with_a_tilde_is_expanded(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    make_idx_dir(tmp_path / "fm")
    assert len(data.load_dataset("fashion_mnist", "~/fm").x_train) == 40


def binary(name, *args, timeout=300):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)
    return subprocess.run([sys.executable, os.path.join(ROOT, "experiments", name), *args],
                          capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)


def one_error_line(proc):
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and "Traceback" not in proc.stderr, (
        proc.returncode, proc.stderr[-2000:])
    return lines[0]


@pytest.mark.slow
@pytest.mark.parametrize("args,needle", [
    (["--eps=inf"], "--eps must be in (0, 1]"),
    (["--dataset=mnist", "--data_dir={bad}"], "no image of class"),
    (["--workdir={readonly}"], "is not writable"),
])
def test_separation_mistakes_exit_2_with_one_line(tmp_path, args, needle):
    bad = make_idx_dir(tmp_path / "bad", y_train=np.r_[np.arange(39) % 4, 200])
    blocker = tmp_path / "a_file"  # a directory inside a file cannot be made, even by root
    blocker.write_text("")
    args = [a.format(bad=bad, readonly=blocker / "out") for a in args]
    line = one_error_line(binary("separation.py", "--max_points=200", *args))
    assert needle in line, line
    assert not os.path.exists(os.path.join(bad, "separation.json"))


SWEEP = ["--noattack_unroll", "--rows=natural", "--max_train=64", "--max_test=32", "--epochs=1",
         "--eval_batch_size=32"]


@pytest.mark.slow
def test_sweep_reuses_only_cells_of_the_requested_configuration(tmp_path):
    first = binary("sweep.py", *SWEEP, f"--workdir={tmp_path}")
    assert first.returncode == 0, first.stderr[-2000:]
    cell = tmp_path / "natural-official-seed0" / "results.json"
    made = os.path.getmtime(cell)
    again = binary("sweep.py", *SWEEP, f"--workdir={tmp_path}")
    assert again.returncode == 0 and "1 done, 0 to run" in again.stdout
    assert os.path.getmtime(cell) == made  # not re-run
    line = one_error_line(binary("sweep.py", *SWEEP[:-2], "--epochs=2", "--eval_batch_size=32",
                                 f"--workdir={tmp_path}"))
    assert "made with other settings (train.epochs)" in line and "--overwrite" in line
    line = one_error_line(binary("sweep.py", *SWEEP, "--dataset=mnist",
                                 f"--data_dir={make_idx_dir(tmp_path / 'idx')}",
                                 f"--workdir={tmp_path}"))
    assert "other settings (data.dataset" in line
    rerun = binary("sweep.py", *SWEEP[:-2], "--epochs=2", "--eval_batch_size=32", "--overwrite",
                   f"--workdir={tmp_path}")
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert json.load(open(cell))["config"]["train"]["epochs"] == 2


@pytest.mark.slow
@pytest.mark.parametrize("args,needle", [
    (["--rows="], "--rows is empty"),
    (["--dropouts=abc"], "--dropouts must be rates"),
    (["--seeds=0,0"], "distinct"),
    (["--rows=adversarial"], "unknown row 'adversarial'"),
])
def test_sweep_mistakes_exit_2_with_one_line(tmp_path, args, needle):
    line = one_error_line(binary("sweep.py", *args, f"--workdir={tmp_path}", timeout=120))
    assert needle in line, line
