"""experiments/run.py end to end, and user mistakes: one stderr line, exit code 2."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUN = os.path.join(ROOT, "experiments", "run.py")
KEYS = {"method", "dataset", "arch", "config", "train_acc", "test_acc", "adv_train_acc",
        "adv_test_acc", "train_lipschitz", "test_lipschitz", "test_lipschitz_ascent", "gap",
        "adv_gap", "variant", "train_seconds", "eval_seconds", "num_devices", "device_kind"}


def run(*args, timeout=300):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)
    return subprocess.run([sys.executable, RUN, *args], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=ROOT)


def test_run_writes_the_papers_row(tmp_path):
    proc = run("--method=rst", "--lam=2", "--max_train=96", "--max_test=40", "--epochs=2",
               f"--workdir={tmp_path}", "--log_every=1")
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = json.load(open(tmp_path / "results.json"))
    assert KEYS <= set(results)
    assert results["method"] == "rst" and results["variant"] == "official"
    assert results["config"]["train"]["lam"] == 2.0
    for k in ("train_acc", "test_acc", "adv_train_acc", "adv_test_acc"):
        assert 0 <= results[k] <= 100
    assert results["gap"] == pytest.approx(results["train_acc"] - results["test_acc"])
    assert results["adv_gap"] == pytest.approx(results["adv_train_acc"] - results["adv_test_acc"])
    assert results["test_lipschitz_ascent"] >= results["test_lipschitz"] > 0
    assert results["steps"] == 2 * 2  # 96 / 64 -> 2 steps per epoch, the last one short
    assert "img/s" in proc.stdout and "ETA" in proc.stdout
    assert "| rst | official |" in proc.stdout


@pytest.mark.parametrize("args,needle", [
    (["--method=adversarial"], "unknown method"),
    (["--variant=both"], "unknown variant"),
    (["--eps=0"], "eps must be a positive number"),
    (["--eps=-0.1"], "eps must be a positive number"),
    (["--eps=nan"], "eps must be a positive number"),
    (["--beta=-1"], "beta must be a non-negative"),
    (["--lam=-2"], "lam must be a non-negative"),
    (["--dataset=imagenet21k"], "unknown dataset"),
    (["--dataset=fashion_mnist", "--data_dir=/nonexistent/dir"], "does not exist"),
    (["--arch=cnn2"], "at least 16x16"),
    (["--arch=vit"], "unknown arch"),
    (["--batch_size=abc"], "batch_size"),
    (["--epochs=0"], "epochs must be at least 1"),
    (["--milestones=a,b"], "milestones"),
])
def test_user_mistakes_exit_2_with_one_line(tmp_path, args, needle):
    proc = run(*args, f"--workdir={tmp_path}", timeout=120)
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-1000:])
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert needle in lines[0] and "Traceback" not in proc.stderr
