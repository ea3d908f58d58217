"""Bad inputs a hostile user tries: malformed IDX data, stale sweep cells, bad separation
settings. Each gets one line naming the problem and exit code 2 (or a DataError), never a
wrong number with exit status 0."""

import gzip
import json
import os
import shutil
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
    # The attack table is not a cell's identity: a finished cell gets it from its checkpoint.
    trained = json.load(open(cell))
    table = binary("sweep.py", *SWEEP, "--eval_attacks=pgd,apgd", "--eval_attack_size=16",
                   f"--workdir={tmp_path}")
    assert table.returncode == 0 and "0 done, 1 to run" in table.stdout, table.stderr[-2000:]
    added = json.load(open(cell))
    assert added["attack_examples"] == 16 and "adv_test_acc_apgd" in added
    same = ("steps", "train_acc", "test_acc", "test_lipschitz")  # the same model, evaluated
    assert [added[k] for k in same] == [trained[k] for k in same]
    shutil.rmtree(cell.parent / "checkpoints")
    line = one_error_line(binary("sweep.py", *SWEEP, "--eval_attacks=pgd,multitarget",
                                 "--eval_attack_size=16", f"--workdir={tmp_path}"))
    assert "without --eval_attacks=multitarget" in line and "--overwrite retrains" in line
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


# ----------------------------------------------------------------------------- run identity


def fake_checkpoint(ckdir, step, config):
    """A checkpoint directory that newest_meta trusts: meta/metadata with `config`, its
    integrity data (check_same_run reads nothing else)."""
    from jax_robust import checkpoint as ckpt

    step_dir = ckdir / str(step)
    os.makedirs(step_dir / "meta")
    (step_dir / "meta" / "metadata").write_text(json.dumps({"step": step, "config": config}))
    (step_dir / ckpt.INTEGRITY_FILE).write_text(json.dumps(
        {"files": ckpt._file_digests(str(step_dir))}))


def test_a_checkpoint_of_another_seed_is_another_run(tmp_path):
    # The seed is part of a run's identity (config.RUN): a workdir (or sweep cell) trained
    # with seed 0 is never resumed, evaluated or counted done for seed 1.
    from jax_robust import config as cfglib
    from jax_robust import train

    seed0, seed1 = (cfglib.RunConfig(train=cfglib.TrainConfig(seed=s)) for s in (0, 1))
    assert cfglib.run_identity_changes(seed0.to_dict(), seed1.to_dict()) == ["train.seed"]
    fake_checkpoint(tmp_path / "checkpoints", 4, seed0.to_dict())
    train.check_same_run(str(tmp_path / "checkpoints"), seed0, str(tmp_path))  # the same run
    with pytest.raises(train.OtherRun, match=r"train.seed 0 \(now 1\)"):
        train.check_same_run(str(tmp_path / "checkpoints"), seed1, str(tmp_path))
    with pytest.raises(train.OtherRun, match=r"train.seed 0 \(now 1\)"):  # nor evaluated
        train.check_same_run(str(tmp_path / "checkpoints"), seed1, str(tmp_path),
                             eval_only=True)


def test_images_too_small_for_the_arch_name_the_archs_that_fit():
    from jax_robust import models
    from jax_robust.errors import UserError

    with pytest.raises(UserError) as err:
        models.build_model("cnn1", 4, (4, 4, 1), dropout=0.0)
    assert str(err.value) == ("arch cnn1 needs images of at least 6x6, the data are 4x4; "
                              "archs that take 4x4 images: linear")
    with pytest.raises(UserError, match="the data are 8x8; archs that take 8x8 images: cnn1, "
                                        "linear$"):
        models.build_model("cnn2", 10, (8, 8, 1), dropout=0.0)


def test_load_run_of_an_empty_checkpoints_folder_says_so(tmp_path):
    from jax_robust import train
    from jax_robust.errors import UserError

    os.makedirs(tmp_path / "checkpoints")
    with pytest.raises(UserError, match="holds no checkpoints$"):
        train.load_run(str(tmp_path))


def tree_snapshot(directory):
    """{relative path: (size, mtime_ns)} of every file under `directory` (but the lock file
    that each run takes, files.exclusive_dir)."""
    out = {}
    for d, _, files in os.walk(directory):
        for f in files:
            if f == ".run.lock":
                continue
            st = os.stat(os.path.join(d, f))
            out[os.path.relpath(os.path.join(d, f), directory)] = (st.st_size, st.st_mtime_ns)
    return out


# A cell of 20 steps (640 points, batches of 32), a checkpoint every 2 steps, a line a step.
CELL = ["--noattack_unroll", "--max_train=640", "--max_test=32", "--epochs=1",
        "--batch_size=32", "--eval_batch_size=32", "--log_every=1", "--checkpoint_every=2",
        "--curve_size=32", "--lipschitz_steps=2"]


@pytest.mark.slow
def test_a_sweep_cell_stopped_mid_training_is_resumed_not_counted_done(tmp_path):
    import signal

    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)
    sweep = [sys.executable, os.path.join(ROOT, "experiments", "sweep.py"), "--rows=natural",
             *CELL, f"--workdir={tmp_path}"]
    proc = subprocess.Popen(sweep, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env, cwd=ROOT)
    for line in proc.stdout:
        if "step 3/20" in line:
            break
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    import re

    lines = err.strip().splitlines()
    assert proc.returncode == 130 and len(lines) == 1, (proc.returncode, err[-2000:])
    stopped = re.fullmatch(r"natural-official-seed0: stopped at step (\d+); checkpoint saved, "
                           r"rerun to resume; rerun the sweep to continue", lines[0])
    assert stopped, lines
    step = int(stopped.group(1))
    assert 3 <= step < 20, step
    cell = tmp_path / "natural-official-seed0"

    # The unfinished cell evaluated by hand: results.json says so.
    run = ["run.py", "--method=natural", *CELL, f"--workdir={cell}"]
    evaluated = binary(*run, "--eval_only")
    assert evaluated.returncode == 0, evaluated.stderr[-2000:]
    assert f"evaluating an unfinished run (step {step} of 20)" in evaluated.stdout
    r = json.load(open(cell / "results.json"))
    assert (r["steps"], r["total_steps"], r["finished"]) == (step, 20, False)

    # Other --epochs: refused by the sweep and by run.py, nothing moved or rewritten.
    before = tree_snapshot(tmp_path)
    line = one_error_line(binary("sweep.py", "--rows=natural", *CELL, "--epochs=2",
                                 f"--workdir={tmp_path}"))
    assert "made with other settings (train.epochs)" in line, line
    line = one_error_line(binary(*run, "--epochs=2"))
    assert "train.epochs 1 (now 2)" in line and "nothing in it was changed" in line, line
    assert tree_snapshot(tmp_path) == before
    assert not (cell / "checkpoints_corrupt").exists()

    # The sweep again: the cell is not done; it resumes and finishes, the table shows it.
    again = subprocess.run(sweep, capture_output=True, text=True, timeout=300, env=env,
                           cwd=ROOT)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "sweep: 1 cells, 0 done, 1 to run" in again.stdout, again.stdout
    assert f"resumed from checkpoint {step} " in again.stdout, again.stdout
    r = json.load(open(cell / "results.json"))
    assert (r["steps"], r["total_steps"], r["finished"]) == (20, 20, True)
    assert f"| Natural | official | 1 | {r['train_acc']:.2f} | {r['test_acc']:.2f} |" in (
        again.stdout), again.stdout


@pytest.mark.slow
def test_launch_local_refuses_a_busy_port_at_once(tmp_path):
    import socket
    import time

    with socket.socket() as s:
        s.bind(("localhost", 0))
        s.listen()
        port = s.getsockname()[1]
        start = time.monotonic()
        proc = subprocess.run([sys.executable, "-m", "jax_robust.cli.launch_local",
                               f"--port={port}", "--", "run", f"--workdir={tmp_path}"],
                              capture_output=True, text=True, timeout=60, cwd=ROOT)
        assert time.monotonic() - start < 20
    line = one_error_line(proc)
    assert line.startswith(f"error: --port={port} cannot be used: ") and "free one" in line
    assert not os.listdir(tmp_path)
