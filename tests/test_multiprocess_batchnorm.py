"""Several JAX processes against one, part 2: a BatchNorm network and the separation scan
(a file of its own so that pytest-xdist runs it beside test_multiprocess.py)."""

import subprocess
import sys

import numpy as np
import pytest
from test_multiprocess import ROOT, assert_same_numbers, env, one_process, two_processes

# WRN-10-1 (BatchNorm: its batch statistics span every device and process) on mock CIFAR-10.
WRN = ["--dataset=cifar10", "--arch=wrn", "--wrn_depth=10", "--wrn_width=1",
       "--method=natural", "--epochs=1", "--attack_steps=1", "--lipschitz_steps=1",
       "--batch_size=8", "--eval_batch_size=16", "--max_train=16", "--max_test=20",
       "--curve_size=8", "--lr=0.1", "--noattack_unroll"]


@pytest.mark.slow
def test_batchnorm_network_over_two_processes_equals_one_process(tmp_path):
    # Against one process of 4 devices, the same shards: its numbers are equal. (One device
    # sums in another order, which BatchNorm's backward amplifies to 1e-4 in the weights and
    # can flip a prediction of this chance-level net; test_train.py checks devices against
    # one device in process, with tolerances.)
    two, _ = two_processes(WRN, tmp_path / "two")
    four = one_process(WRN, {4: tmp_path / "four"})[4]
    assert (two["num_processes"], two["num_devices"], four["num_devices"]) == (2, 4, 4)
    assert two["examples"] == {"train": 16, "test": 20}  # 20 points in batches of 16
    assert_same_numbers(two, four)


@pytest.mark.slow
def test_separation_over_two_processes_gives_the_single_process_arrays(tmp_path):
    args = ["--dataset=digits", "--max_points=700", "--n_closest=3", "--save_arrays",
            "--noprogress"]
    proc = subprocess.run(
        [sys.executable, "-m", "jax_robust.cli.launch_local", "--num_processes=2", "--",
         "separation", *args, "--cpu_devices=2", f"--workdir={tmp_path / 'two'}"],
        capture_output=True, text=True, timeout=600, env=env(), cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    proc = subprocess.run(
        [sys.executable, "-m", "jax_robust.cli.separation", *args, "--cpu_devices=1",
         f"--workdir={tmp_path / 'one'}"],
        capture_output=True, text=True, timeout=600, env=env(), cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    two = np.load(tmp_path / "two" / "separation_arrays.npz")
    one = np.load(tmp_path / "one" / "separation_arrays.npz")
    assert sorted(two.files) == sorted(one.files)
    for name in one.files:
        np.testing.assert_array_equal(two[name], one[name], err_msg=name)
    assert (one["train_train_index"] >= 0).all()
    assert (len(one["train_train_dist"]), len(one["test_train_dist"])) == (700, 360)
    for name in ("separation.json", "separation_hist.png"):
        assert (tmp_path / "two" / name).exists()


def test_process_flags_are_checked_in_one_line(tmp_path):
    for extra, needle in [(["--num_processes=2"], "go together"),
                          (["--coordinator_address=localhost", "--num_processes=2",
                            "--process_id=0"], "host:port"),
                          (["--coordinator_address=localhost:1", "--num_processes=2",
                            "--process_id=2"], "--process_id must be in [0, 2)")]:
        proc = subprocess.run([sys.executable, "-m", "jax_robust.cli.run", "--epochs=1",
                               f"--workdir={tmp_path}", *extra],
                              capture_output=True, text=True, timeout=120, env=env(), cwd=ROOT)
        assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
        assert needle in proc.stderr
