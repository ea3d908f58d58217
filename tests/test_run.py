"""experiments/run.py end to end, and user mistakes: one stderr line, exit code 2."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUN = os.path.join(ROOT, "experiments", "run.py")
KEYS = {"config", "train_acc", "test_acc", "adv_train_acc", "adv_test_acc", "train_lipschitz",
        "test_lipschitz", "test_lipschitz_ascent", "gap", "adv_gap", "examples", "steps",
        "train_seconds", "eval_seconds", "num_devices", "num_processes", "device_kind",
        "jax_version", "num_params", "total_steps", "finished"}


def leaves(tree, prefix=""):
    """{dotted name: value} of every leaf of a nested dict."""
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict) and k != "hparams":
            out.update(leaves(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


def run(*args, timeout=300, xla_flags=None):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)
    if xla_flags:
        env["XLA_FLAGS"] = xla_flags
    return subprocess.run([sys.executable, RUN, *args], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=ROOT)


@pytest.mark.slow
def test_run_writes_the_papers_row(tmp_path):
    proc = run("--method=rst", "--lam=2", "--max_train=96", "--max_test=40", "--epochs=2",
               f"--workdir={tmp_path}", "--log_every=1")
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = json.load(open(tmp_path / "results.json"))
    assert set(results) == KEYS
    cfg = results["config"]
    assert cfg["train"]["method"] == "rst" and cfg["train"]["variant"] == "official"
    assert cfg["train"]["hparams"] == {"lam": 2.0}
    # The config is the resolved one, each setting once: nothing left None but the
    # optional limits and data_dir, and eps nowhere else.
    flat = leaves(cfg)
    assert {k for k, v in flat.items() if v is None} == {
        "data.data_dir", "eval.train_eval_size", "eval.attack_size"}
    assert flat["attack.eps"] == 0.1 and flat["attack.step_size"] == pytest.approx(0.02)
    assert flat["model.dropout"] == 0.5 and flat["model.pool_ties"] == "first"
    assert flat["train.lr"] == pytest.approx(1e-4 * 64) and flat["train.epochs"] == 2
    assert json.dumps(results).count('"eps"') == 1
    assert results["examples"] == {"train": 96, "test": 40}
    lines = [json.loads(x) for x in open(tmp_path / "metrics.jsonl")]
    assert [e["epoch"] for e in lines] == [1, 2] and lines[-1]["step"] == 4
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
    (["--eps=2"], "larger than the whole pixel range"),
    (["--method=trades", "--beta=-1"], "beta must be a non-negative"),
    (["--method=rst", "--lam=-2"], "lam must be a non-negative"),
    (["--method=rst", "--beta=3"], "method rst has no hyperparameter beta"),
    (["--method=llr", "--llr_steps=0"], "llr_steps must be an integer >= 1"),
    (["--method=gr", "--gr_h=0"], "gr_h must be a positive number"),
    (["--pool_grad=fast"], "unknown pool_grad"),
    (["--eval_only", "--workdir=/nonexistent/run"], "holds no checkpoints"),
    (["--dataset=imagenet21k"], "unknown dataset"),
    (["--dataset=fashion_mnist", "--data_dir=/nonexistent/dir"], "does not exist"),
    (["--arch=cnn2"], "at least 16x16"),
    (["--arch=wrn", "--wrn_depth=10", "--wrn_width=1"], "at least 16x16"),
    (["--arch=vit"], "unknown arch"),
    (["--batch_size=abc"], "batch_size"),
    (["--epochs=0"], "epochs must be at least 1"),
    (["--milestones=a,b"], "milestones"),
])
@pytest.mark.slow
def test_user_mistakes_exit_2_with_one_line(tmp_path, args, needle):
    workdir = [] if any(a.startswith("--workdir") for a in args) else [f"--workdir={tmp_path}"]
    proc = run(*args, *workdir, timeout=120)
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-1000:])
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert needle in lines[0] and "Traceback" not in proc.stderr
    assert not os.path.exists("/nonexistent/run")


@pytest.mark.slow
def test_installed_entry_point_refuses_a_mistake_in_one_line():
    import shutil

    binary = shutil.which("jax-robust-run", path=os.path.dirname(sys.executable))
    if binary is None:
        pytest.skip("the package is not installed with its scripts")
    proc = subprocess.run([binary, "--method=nope"], capture_output=True, text=True,
                          timeout=120, env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert proc.returncode == 2 and proc.stderr.strip() == (
        "error: unknown method 'nope'; choose one of natural, gr, llr, at, rst, trades")


@pytest.mark.slow
def test_an_eval_batch_the_devices_do_not_divide_is_refused_before_training(tmp_path):
    proc = run("--epochs=1", f"--workdir={tmp_path}", "--eval_batch_size=3",
               xla_flags="--xla_force_host_platform_device_count=2", timeout=120)
    assert proc.returncode == 2 and proc.stderr.strip() == (
        "error: eval batch size 3 is not a multiple of the 2 devices"), proc.stderr[-1000:]
    assert not os.path.exists(tmp_path / "checkpoints") and "epoch" not in proc.stdout


def test_the_launcher_and_a_binary_import_into_one_process():
    # Importing experiments/launch_local.py must not claim run.py's --num_processes (CI of
    # session 4: every later in-process import of run.py failed on a duplicate flag).
    proc = subprocess.run([sys.executable, "-c", "import jax_robust.cli.launch_local, "
                           "jax_robust.cli.run; import jax_robust.distributed as d; "
                           "assert d.free_port() > 0"], capture_output=True, text=True,
                          timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
