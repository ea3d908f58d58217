"""A process of a two-process run killed while the survivor may be inside a collective (a
checkpoint save every step: orbax's gloo AllGather fails with "Connection reset by peer"):
the survivor prints one line naming the lost process and exits with code 3, no traceback,
whether the failed collective or the peer watchdog notices first."""

import os
import signal
import subprocess
import sys
import time

import pytest
from test_multiprocess import CNN1, PEER_TIMEOUT, ROOT, env

from jax_robust.distributed import free_port


@pytest.mark.slow
def test_a_peer_killed_during_a_save_ends_the_survivor_with_one_line(tmp_path):
    port = free_port()
    procs = [subprocess.Popen(
        [sys.executable, "-u", "-m", "jax_robust.cli.run", *CNN1, "--checkpoint_every=1",
         "--cpu_devices=2", f"--workdir={tmp_path}", f"--coordinator_address=localhost:{port}",
         "--num_processes=2", f"--process_id={i}", f"--peer_timeout={PEER_TIMEOUT}"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env(), cwd=ROOT)
        for i in range(2)]
    try:
        for line in procs[0].stdout:  # the log line of step 13 comes just before its save
            if "step 13/30" in line:
                break
        else:
            pytest.fail("process 0 ended before step 13: " + procs[0].stderr.read()[-2000:])
        procs[1].send_signal(signal.SIGKILL)
        killed = time.monotonic()
        code = procs[0].wait(timeout=PEER_TIMEOUT + 60)
        waited = time.monotonic() - killed
        err = procs[0].stderr.read()
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 3 and len(lines) == 1 and "Traceback" not in err, (code, err[-3000:])
    assert lines[0].startswith("error: process 1 of 2 stopped responding"), lines
    assert lines[0].endswith("process 0 exits. Rerun every process to resume from the last "
                             "checkpoint"), lines
    assert waited < PEER_TIMEOUT + 30
    assert not os.path.exists(tmp_path / "results.json")
