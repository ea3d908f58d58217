"""Atomic writes (jax_robust/files.py): the whole new file or the old one, never a part."""

import os

import numpy as np
import pytest

from jax_robust import files
from jax_robust.errors import UserError


def test_arrays_and_text_round_trip(tmp_path):
    path = str(tmp_path / "a.npz")
    files.save_arrays_atomic(path, d=np.arange(5.0), i=np.array([3, 1]))
    with np.load(path) as z:
        np.testing.assert_array_equal(z["d"], np.arange(5.0))
        np.testing.assert_array_equal(z["i"], [3, 1])
    files.write_text_atomic(str(tmp_path / "t.md"), "| a |\n")
    assert open(tmp_path / "t.md").read() == "| a |\n"
    assert sorted(os.listdir(tmp_path)) == ["a.npz", "t.md"]


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    path = str(tmp_path / "results.json")
    files.write_text_atomic(path, "old")

    def half_then_fail(f):
        f.write(b"new, half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        files.write_atomic(path, half_then_fail)
    assert open(path).read() == "old"
    assert os.listdir(tmp_path) == ["results.json"]


def test_a_figure_is_written_as_png(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots()
    ax.plot([0, 1], [1, 0])
    files.save_figure_atomic(fig, str(tmp_path / "p.png"), dpi=50)
    plt.close(fig)
    assert open(tmp_path / "p.png", "rb").read(8) == b"\x89PNG\r\n\x1a\n"


def test_a_run_directory_is_refused_while_another_process_holds_it(tmp_path):
    import signal
    import subprocess
    import sys
    import time

    from jax_robust.errors import UserError

    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from jax_robust import files\n"
        "with files.exclusive_dir(sys.argv[1]):\n"
        "    print('held', flush=True); time.sleep(60)"), str(tmp_path)],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(UserError, match=rf"in use by another run \(pid {holder.pid}\)"):
            with files.exclusive_dir(str(tmp_path)):
                pass
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    # Killed, it leaves no stale lock; and the same process may take the lock again.
    for _ in range(2):
        with files.exclusive_dir(str(tmp_path)):
            time.sleep(0)
    assert open(tmp_path / files.LOCK_NAME).read().strip() == str(os.getpid())


def test_processes_of_one_run_probe_the_same_workdir_at_once(tmp_path):
    # The processes of a multi-process run check the workdir at the same moment; with one shared
    # probe name one removed the other's probe and refused a writable directory (CI, session 5).
    import threading

    errors = []
    start = threading.Barrier(4)

    def probe_many():
        start.wait()
        for _ in range(300):
            try:
                files.ensure_writable_dir(str(tmp_path / "run"))
            except UserError as e:
                errors.append(str(e))

    threads = [threading.Thread(target=probe_many) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert os.listdir(tmp_path / "run") == []
