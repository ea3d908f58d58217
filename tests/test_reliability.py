"""Kill -9 and resume, damaged checkpoints, divergence, and fuzzed flags."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUN = os.path.join(ROOT, "experiments", "run.py")
TINY = ["--method=at", "--max_train=160", "--max_test=40", "--epochs=3", "--batch_size=32",
        "--checkpoint_every=2", "--log_every=1", "--eval_batch_size=40", "--attack_steps=3",
        "--lipschitz_steps=2", "--curve_size=40"]  # short attacks: quick compiles
TIME_KEYS = {"train_seconds", "eval_seconds"}


def env():
    e = dict(os.environ, JAX_PLATFORMS="cpu")
    e.pop("XLA_FLAGS", None)
    return e


def run(workdir, *extra, timeout=300):
    return subprocess.run([sys.executable, RUN, *TINY, f"--workdir={workdir}", *extra],
                          capture_output=True, text=True, timeout=timeout, env=env(), cwd=ROOT)


def results_without_times(workdir):
    with open(os.path.join(workdir, "results.json")) as f:
        r = json.load(f)
    return {k: v for k, v in r.items() if k not in TIME_KEYS}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("full")
    proc = run(workdir)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return workdir


@pytest.mark.slow
@pytest.mark.parametrize("kill_at", [7])  # of 15 steps; checkpoints every 2 and per epoch
def test_sigkill_mid_run_then_resume_gives_the_same_results(tmp_path, uninterrupted, kill_at):
    proc = subprocess.Popen([sys.executable, RUN, *TINY, f"--workdir={tmp_path}"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=env(), cwd=ROOT)
    deadline = time.time() + 240
    for line in proc.stdout:
        if f"step {kill_at}/" in line or time.time() > deadline:
            break
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not os.path.exists(tmp_path / "results.json")
    ckdir = tmp_path / "checkpoints"
    complete = ckdir.exists() and any(d.isdigit() for d in os.listdir(ckdir))
    resumed = run(tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert ("resumed from checkpoint" in resumed.stdout) == complete, (kill_at, resumed.stdout)
    assert results_without_times(tmp_path) == results_without_times(uninterrupted), kill_at


def sigterm_when(args, needle, timeout):
    """Runs the binary with `args`, sends SIGTERM after a line holding `needle`; returns the
    output after it, having checked the exit code 130 within `timeout` seconds."""
    proc = subprocess.Popen([sys.executable, RUN, *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env(), cwd=ROOT)
    for line in proc.stdout:
        if needle in line:
            break
    proc.send_signal(signal.SIGTERM)
    out = proc.stdout.read()
    assert proc.wait(timeout=timeout) == 130, out
    return out


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_before_exit(tmp_path):
    out = sigterm_when([*TINY, f"--workdir={tmp_path}"], "step 3/", 120)
    import re

    stopped = re.search(r"stopped at step (\d+); checkpoint saved", out)
    assert stopped, out
    steps = sorted(int(d) for d in os.listdir(tmp_path / "checkpoints") if d.isdigit())
    # At most two steps are in flight when the signal comes: the save follows within them.
    assert steps[-1] == int(stopped.group(1)), (steps, out)
    assert 3 <= steps[-1] <= 3 + 3, (steps, out)
    assert not os.path.exists(tmp_path / "results.json")


@pytest.mark.slow
def test_sigterm_during_the_final_evaluation_stops_it(tmp_path):
    args = [*TINY, "--epochs=1", "--max_test=160", "--eval_batch_size=8",
            f"--workdir={tmp_path}"]
    out = sigterm_when(args, "eval test 5/20", 60)
    assert "stopped during the test evaluation" in out and "eval test 20/20" not in out, out
    assert not os.path.exists(tmp_path / "results.json")
    again = run(tmp_path, "--epochs=1", "--max_test=160", "--eval_batch_size=8")
    assert again.returncode == 0 and "resumed from checkpoint 5" in again.stdout


def _flip_bytes_of_largest_file(directory):
    files = [os.path.join(d, f) for d, _, fs in os.walk(directory) for f in fs]
    largest = max(files, key=os.path.getsize)
    with open(largest, "r+b") as f:
        f.seek(os.path.getsize(largest) // 2)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0x5A]))
    return largest


def _newest_step(ckdir):
    return max(int(d) for d in os.listdir(ckdir) if d.isdigit())


@pytest.mark.slow
def test_a_corrupt_newest_checkpoint_is_moved_aside_and_the_rerun_is_uninterrupted(
        tmp_path, uninterrupted):
    import shutil

    shutil.copytree(uninterrupted, tmp_path, dirs_exist_ok=True)
    os.remove(tmp_path / "results.json")
    ckdir = tmp_path / "checkpoints"
    newest = _newest_step(ckdir)
    _flip_bytes_of_largest_file(ckdir / str(newest) / "state")
    proc = run(tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"moved to {tmp_path}/checkpoints_corrupt/{newest}" in proc.stdout, proc.stdout
    assert (tmp_path / "checkpoints_corrupt" / str(newest)).is_dir()
    assert _newest_step(ckdir) == newest  # saved anew
    assert results_without_times(tmp_path) == results_without_times(uninterrupted)
    again = run(tmp_path, "--eval_only")  # the new checkpoint verifies
    assert again.returncode == 0 and "warning" not in again.stdout, again.stdout


@pytest.mark.slow
@pytest.mark.parametrize("damage", ["flip", "no_integrity", "garbage_integrity",
                                    "empty_integrity", "integrity_lacks_a_file"])
def test_a_copied_checkpoint_folder_carries_its_checks(tmp_path, uninterrupted, damage):
    import shutil

    shutil.copytree(uninterrupted / "checkpoints", tmp_path / "checkpoints")
    newest = _newest_step(tmp_path / "checkpoints")
    step_dir = tmp_path / "checkpoints" / str(newest)
    integrity = step_dir / "integrity.json"
    if damage == "flip":
        _flip_bytes_of_largest_file(step_dir / "state")
        needle = "does not match its checksum"
    elif damage == "no_integrity":
        os.remove(integrity)
        needle = "has no integrity data"
    elif damage == "garbage_integrity":
        integrity.write_text("{not json")
        needle = "integrity data are unreadable"
    elif damage == "empty_integrity":  # integrity data listing nothing vouch for nothing
        integrity.write_text('{"files": {}}')
        _flip_bytes_of_largest_file(step_dir / "state")
        needle = "integrity data list no files"
    else:  # the damaged file dropped from the list
        flipped = os.path.relpath(_flip_bytes_of_largest_file(step_dir / "state"), step_dir)
        files = json.loads(integrity.read_text())["files"]
        del files[flipped]
        integrity.write_text(json.dumps({"files": files}))
        needle = f"file {flipped} is not in its integrity data"
    proc = run(tmp_path, "--eval_only")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert needle in proc.stdout and "trying an older one" in proc.stdout, proc.stdout
    if damage in ("empty_integrity", "integrity_lacks_a_file"):
        assert f"moved to {tmp_path}/checkpoints_corrupt/{newest}" in proc.stdout, proc.stdout
        assert f"resumed from checkpoint {newest - 1} " in proc.stdout, proc.stdout


def _tree(directory):
    return {os.path.relpath(os.path.join(d, f), directory):
            (os.stat(os.path.join(d, f)).st_size, os.stat(os.path.join(d, f)).st_mtime_ns)
            for d, _, fs in os.walk(directory) for f in fs}


@pytest.mark.slow
def test_another_arch_in_a_runs_workdir_is_refused_and_the_right_rerun_resumes(
        tmp_path, uninterrupted):
    import shutil

    shutil.copytree(uninterrupted, tmp_path, dirs_exist_ok=True)
    os.remove(tmp_path / "results.json")
    ckdir = tmp_path / "checkpoints"
    newest = _newest_step(ckdir)
    shutil.rmtree(ckdir / str(newest))  # the rerun has a step left to train
    before = _tree(ckdir)
    proc = run(tmp_path, "--arch=linear")
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and "Traceback" not in proc.stderr, (
        proc.stderr[-2000:])
    assert "holds a run with other settings: model.arch 'cnn1' (now 'linear')" in lines[0]
    assert _tree(ckdir) == before and not (tmp_path / "checkpoints_corrupt").exists()
    assert not (tmp_path / "results.json").exists()
    again = run(tmp_path)
    assert again.returncode == 0, again.stderr[-2000:]
    assert f"resumed from checkpoint {newest - 1} " in again.stdout, again.stdout
    assert "epoch 1/3" not in again.stdout  # not trained from the start
    assert results_without_times(tmp_path) == results_without_times(uninterrupted)


def _truncate_largest_file(directory):
    files = [os.path.join(d, f) for d, _, fs in os.walk(directory) for f in fs]
    largest = max(files, key=os.path.getsize)
    with open(largest, "r+b") as f:
        f.truncate(os.path.getsize(largest) // 3)
    return largest


@pytest.mark.slow
def test_truncated_newest_checkpoint_falls_back_to_the_previous_one(tmp_path, uninterrupted):
    import shutil

    shutil.copytree(uninterrupted, tmp_path, dirs_exist_ok=True)
    ckdir = tmp_path / "checkpoints"
    newest = max(int(d) for d in os.listdir(ckdir) if d.isdigit())
    _truncate_largest_file(ckdir / str(newest) / "state")
    proc = run(tmp_path, "--eval_only")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"checkpoint {ckdir / str(newest)} cannot be restored" in proc.stdout
    assert "trying an older one" in proc.stdout
    assert "resumed from checkpoint" in proc.stdout


@pytest.mark.slow
def test_all_checkpoints_corrupt_is_one_clear_error(tmp_path, uninterrupted):
    import shutil

    shutil.copytree(uninterrupted, tmp_path, dirs_exist_ok=True)
    for d in os.listdir(tmp_path / "checkpoints"):
        if d.isdigit():
            _truncate_largest_file(tmp_path / "checkpoints" / d / "state")
    proc = run(tmp_path, "--eval_only")
    assert proc.returncode == 2
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: no checkpoint in") and "Traceback" not in proc.stderr


@pytest.mark.slow
def test_nan_loss_stops_naming_the_step_and_keeps_the_good_checkpoint(tmp_path):
    # One run (another lr in the same workdir would be another run, refused): with lr 1e30
    # step 1 still ends finite and is saved (a checkpoint every step); step 2 blows up.
    blown = run(tmp_path, "--lr=1e30", "--checkpoint_every=1")
    assert blown.returncode == 2
    lines = blown.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in blown.stderr, blown.stderr[-2000:]
    import re

    found = re.search(r"non-finite at step (\d+) .* last good checkpoint \(step (\d+)\) is "
                      r"kept; lower --lr$", lines[0])
    assert found, lines
    bad, kept = int(found.group(1)), int(found.group(2))
    after = sorted(int(d) for d in os.listdir(tmp_path / "checkpoints") if d.isdigit())
    assert 1 <= kept < bad and after == [kept], (lines, after)  # nothing bad saved


@pytest.mark.slow
def test_nan_loss_before_any_checkpoint_says_there_is_none(tmp_path):
    blown = run(tmp_path, "--epochs=1", "--lr=1e30")
    lines = blown.stderr.strip().splitlines()
    assert blown.returncode == 2 and len(lines) == 1 and "Traceback" not in blown.stderr
    assert "non-finite at step" in lines[0] and "no checkpoint was saved before it" in lines[0]
    assert "None" not in lines[0], lines[0]
    assert not [d for d in os.listdir(tmp_path / "checkpoints") if d.isdigit()]


@pytest.mark.slow
def test_sigterm_during_an_extra_attack_stops_it_and_a_rerun_evaluates(tmp_path):
    # 360 test points in batches of 40: 9 batches per attack pass, progress every 2.
    args = [*TINY, "--epochs=1", "--max_test=360", "--noattack_unroll",
            "--eval_attacks=pgd,apgd"]
    proc = subprocess.Popen([sys.executable, RUN, *args, f"--workdir={tmp_path}"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env(), cwd=ROOT)
    for line in proc.stdout:
        if "apgd (100 steps): 2/9" in line:
            break
    sent = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    waited = time.monotonic() - sent
    lines = err.strip().splitlines()
    assert proc.returncode == 130 and len(lines) == 1, (proc.returncode, err[-2000:])
    assert lines[0].startswith("stopped during the apgd attack of the robustness evaluation "
                               "(batch "), lines
    assert "360 examples" not in out and waited < 30, (waited, out)
    assert not os.path.exists(tmp_path / "results.json")
    again = run(tmp_path, *args[len(TINY):])
    assert again.returncode == 0, again.stderr[-2000:]
    assert "resumed from checkpoint 5 " in again.stdout
    r = results_without_times(tmp_path)
    assert r["finished"] and r["examples"]["test"] == 360
    assert 0 <= r["adv_test_acc_worst"] <= min(r["adv_test_acc_apgd"], r["adv_test_acc_pgd"],
                                               r["test_acc"]) + 1e-9


# ----------------------------------------------------------------------------- fuzzing

FLAG_VALUES = {
    "method": st.sampled_from(["natural", "gr", "llr", "at", "trades", "rst", "", "AT", "x"]),
    "variant": st.sampled_from(["official", "paper", "both", ""]),
    "dataset": st.sampled_from(["digits", "mnist", "nope", ""]),
    "arch": st.sampled_from(["cnn1", "cnn2", "wrn", "resnet50", "linear", "mlp"]),
    "eps": st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=4)),
    "beta": st.floats(allow_nan=True, allow_infinity=True),
    "lam": st.floats(allow_nan=True, allow_infinity=True),
    "mu": st.floats(allow_nan=True, allow_infinity=True),
    "dropout": st.floats(-2, 2),
    "lr": st.one_of(st.floats(allow_nan=True), st.just("1e-3")),
    "momentum": st.floats(-1, 2),
    "epochs": st.one_of(st.integers(-3, 3), st.text(max_size=3)),
    "batch_size": st.integers(-2, 300),
    "attack_steps": st.integers(-2, 20),
    "attack_step_size": st.floats(-1, 1),
    "seed": st.integers(-5, 5),
    "milestones": st.sampled_from(["", "1,2", "3,1", "a", "-1", "5"]),
    "max_train": st.integers(-2, 5),
    "wrn_depth": st.integers(0, 50),
    "dtype": st.sampled_from(["float32", "bfloat16", "float16"]),
}


@pytest.mark.slow
@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck),
          derandomize=True)
@given(st.dictionaries(st.sampled_from(sorted(FLAG_VALUES)), st.none(), max_size=6).flatmap(
    lambda keys: st.fixed_dictionaries({k: FLAG_VALUES[k] for k in keys})))
def test_fuzzed_flags_are_accepted_or_refused_with_a_user_error(tmp_path_factory, values):
    from absl import flags

    from jax_robust.cli import run as run_binary
    from jax_robust import models, recipes
    from jax_robust.errors import UserError

    workdir = tmp_path_factory.mktemp("fuzz")
    argv = ["run.py", f"--workdir={workdir}"] + [f"--{k}={v}" for k, v in values.items()]
    flags.FLAGS.unparse_flags()
    try:
        cfg, _ = run_binary.prepare(argv)
        # What prepare accepts must also build: the architecture against the data's shape.
        cfg = recipes.resolve(cfg, "cpu")
        if cfg.data.dataset == "digits":
            m = cfg.model
            models.build_model(m.arch, 10, (8, 8, 1), dropout=m.dropout,
                               wrn_depth=m.wrn_depth, wrn_width=m.wrn_width, dtype=m.dtype)
    except UserError as e:
        # One line that names a flag the user gave (or its setting).
        message = str(e)
        assert message.strip() and "\n" not in message.strip(), message
        assert any(name.split("_")[-1] in message for name in values), (values, message)
    finally:
        flags.FLAGS.unparse_flags()
