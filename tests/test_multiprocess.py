"""Several JAX processes on this machine (gloo collectives over localhost) against one.

Every run here is a subprocess: 2 processes x 2 CPU devices through experiments/launch_local.py,
1 process x 1 device through experiments/run.py. (A BatchNorm net and the separation scan:
test_multiprocess_batchnorm.py.)
"""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from test_reliability import _flip_bytes_of_largest_file

from jax_robust.distributed import free_port

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MOCK = os.path.join(ROOT, "tests", "mock_tfds.py")
# CNN1 on digits, AT, 3 epochs x 10 steps: it learns (test acc ~60%), so equal accuracies
# mean something. 100 test points in eval batches of 64: the second batch is padded, and over
# 2 processes the padding falls in process 1's rows. The multitarget attack runs through
# robustness.evaluate_robustness, the notebook path.
CNN1 = ["--method=at", "--max_train=320", "--max_test=100", "--epochs=3", "--batch_size=32",
        "--eval_batch_size=64", "--attack_steps=2", "--lipschitz_steps=2", "--curve_size=40",
        "--lr=0.3", "--checkpoint_every=4", "--log_every=1", "--noattack_unroll",
        "--eval_attacks=pgd,multitarget", "--conv_kernels=xla"]
ACCURACIES = ("train_acc", "test_acc", "adv_train_acc", "adv_test_acc")
LIPSCHITZ = ("train_lipschitz", "test_lipschitz", "test_lipschitz_ascent")
PEER_TIMEOUT = 5


def env():
    e = dict(os.environ, JAX_PLATFORMS="cpu")
    # 4 virtual devices share 2 cores: lift XLA's 40 s stuck-collective abort.
    e["XLA_FLAGS"] = "--xla_cpu_collective_call_terminate_timeout_seconds=1200"
    return e


def binary(script_args):
    return [sys.executable, MOCK, "run"] if "--dataset=cifar10" in script_args else \
        [sys.executable, "-m", "jax_robust.cli.run"]


def one_process(args, workdirs):
    """{devices: results} of single-process runs, one per (devices, workdir), run side by
    side (their compiles are single-threaded: two of them fill the two cores)."""
    procs = {devices: subprocess.Popen(
        [*binary(args), *args, f"--cpu_devices={devices}", f"--workdir={workdir}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env(), cwd=ROOT)
        for devices, workdir in workdirs.items()}
    for proc in procs.values():
        err = proc.communicate(timeout=600)[1]
        assert proc.returncode == 0, err[-2000:]
    return {devices: results(workdir) for devices, workdir in workdirs.items()}


def two_processes(args, workdir):
    target = MOCK if "--dataset=cifar10" in args else "run"
    extra = ["run"] if target == MOCK else []  # the mock script's own first argument
    proc = subprocess.run(
        [sys.executable, "-m", "jax_robust.cli.launch_local", "--num_processes=2", "--",
         target, *extra, *args, "--cpu_devices=2", f"--workdir={workdir}",
         f"--peer_timeout={PEER_TIMEOUT}"],
        capture_output=True, text=True, timeout=600, env=env(), cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    return results(workdir), proc.stdout


def results(workdir):
    with open(os.path.join(workdir, "results.json")) as f:
        return json.load(f)


def assert_same_numbers(a, b):
    for k in ACCURACIES + tuple(k for k in a if k.startswith("adv_test_acc_")):
        assert a[k] == b[k], k
    # The all-reduce sums gradients in another order, so parameters differ in the last bits;
    # the sign-step lipschitz searches amplify that (test_train uses the same tolerance).
    for k in LIPSCHITZ:
        assert a[k] == pytest.approx(b[k], rel=5e-2), k
    assert a["examples"] == b["examples"] and a["steps"] == b["steps"]


@pytest.fixture(scope="module")
def cnn1_two_processes(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("cnn1_2x2")
    r, log = two_processes(CNN1, workdir)
    return workdir, r, log


@pytest.mark.slow
def test_cnn1_over_two_processes_equals_one_process_of_one_device(cnn1_two_processes,
                                                                  tmp_path):
    # 2 processes x 2 devices against 1 device: equal numbers hold for the processes and the
    # devices at once. (Devices alone, in one process: test_train.py, test_evaluation.)
    workdir, two, log = cnn1_two_processes
    one = one_process(CNN1, {1: tmp_path / "one"})[1]
    assert (two["num_processes"], two["num_devices"]) == (2, 4)
    assert (one["num_processes"], one["num_devices"]) == (1, 1)
    assert two["test_acc"] > 30  # the model learned: equal accuracies are not chance
    assert_same_numbers(two, one)
    # Every test point counted once: 100 points in batches of 64, split over the processes.
    assert two["examples"] == {"train": 320, "test": 100}
    # Process 0 alone logs progress and writes the files; each epoch appears once.
    lines = log.splitlines()
    assert any(line.startswith("[0] epoch 3/3") for line in lines)
    assert not any(line.startswith("[1] ") and ("epoch" in line or "|" in line)
                   for line in lines), [ln for ln in lines if ln.startswith("[1]")][:5]
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        assert [json.loads(line)["epoch"] for line in f] == [1, 2, 3]


@pytest.mark.slow
@pytest.mark.parametrize("victim", [1, 0])
def test_sigkill_of_one_process_ends_the_other_and_a_relaunch_resumes(
        cnn1_two_processes, tmp_path, victim):
    port = free_port()
    procs = [subprocess.Popen(
        [sys.executable, "-u", "-m", "jax_robust.cli.run", *CNN1, "--cpu_devices=2",
         f"--workdir={tmp_path}", f"--coordinator_address=localhost:{port}",
         "--num_processes=2", f"--process_id={i}", f"--peer_timeout={PEER_TIMEOUT}"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env(), cwd=ROOT)
        for i in range(2)]
    survivor = procs[1 - victim]
    try:
        for line in procs[0].stdout:  # kill in epoch 2, after the step-12 checkpoint
            if "step 13/30" in line:
                break
        else:
            pytest.fail("process 0 ended before step 13: " + procs[0].stderr.read()[-2000:])
        procs[victim].send_signal(signal.SIGKILL)
        killed = time.monotonic()
        code = survivor.wait(timeout=PEER_TIMEOUT + 60)
        waited = time.monotonic() - killed
        err = survivor.stderr.read()
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert waited < PEER_TIMEOUT + 30
    assert not os.path.exists(tmp_path / "results.json")
    if victim == 0:  # the coordinator's host: JAX ends the others at once (SIGABRT)
        assert code == -signal.SIGABRT and "Terminating process" in err, err[-2000:]
        return
    assert code == 3, err[-2000:]  # the watchdog, after PEER_TIMEOUT seconds
    assert "process 1 of 2 stopped responding" in err
    # Damage the newest checkpoint too: process 0's check must send every process to the
    # previous one together.
    ckdir = tmp_path / "checkpoints"
    newest = max(int(d) for d in os.listdir(ckdir) if d.isdigit())
    _flip_bytes_of_largest_file(ckdir / str(newest) / "state")
    resumed, log = two_processes(CNN1, tmp_path)
    assert f"[0] warning: checkpoint {ckdir / str(newest)} cannot be restored" in log, log
    assert "[0] resumed from checkpoint" in log
    _, uninterrupted, _ = cnn1_two_processes
    timing = {"train_seconds", "eval_seconds"}
    assert {k: v for k, v in resumed.items() if k not in timing} == {
        k: v for k, v in uninterrupted.items() if k not in timing}
