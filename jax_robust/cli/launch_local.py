"""Starts N local JAX processes of one experiment binary as one multi-process run.

    python experiments/launch_local.py --num_processes=2 -- run --method=at --cpu_devices=2
    python experiments/launch_local.py --num_processes=2 -- experiments/separation.py

The binary is `run`, `sweep` or `separation` (jax_robust.cli.<name>) or a path to a script.
Each process gets --coordinator_address=localhost:<free port>, --num_processes and its
--process_id; their output is streamed as one log, each line prefixed with [<process id>].
If a process fails, the others are given --grace seconds to exit (a peer's watchdog ends
them after its --peer_timeout), then terminated. SIGTERM or Ctrl-C is passed to every process
(they stop together at a checkpoint). Exit status: 0 if every process succeeded, else the
first failure's code.
"""

from __future__ import annotations

import errno
import os
import signal
import socket
import subprocess
import sys
import threading
import time

from absl import flags

from jax_robust.cli import common as cli
from jax_robust.distributed import free_port
from jax_robust.errors import UserError

FLAGS = flags.FLAGS

BINARIES = ("run", "sweep", "separation")
NOISE = ("[Gloo] Rank ",)  # connection chatter of the gloo collectives


def command(binary: str, args: list[str], port: int, n: int, i: int) -> list[str]:
    if binary in BINARIES:
        target = ["-m", f"jax_robust.cli.{binary}"]
    elif binary.endswith(".py") and os.path.isfile(binary):
        target = [binary]
    else:
        raise UserError(f"the binary must be one of {', '.join(BINARIES)} or a .py file, got "
                        f"{binary!r}")
    return [sys.executable, "-u", *target, *args, f"--coordinator_address=localhost:{port}",
            f"--num_processes={n}", f"--process_id={i}"]


def check_port_free(port: int) -> None:
    """UserError unless `port` is a TCP port number that this machine could listen on now
    (process 0's coordinator binds it on every interface)."""
    if not 0 < port < 65536:
        raise UserError(f"--port must be in [1, 65535], got {port}")
    for family, host in ((socket.AF_INET, "0.0.0.0"), (socket.AF_INET6, "::")):
        try:
            s = socket.socket(family, socket.SOCK_STREAM)
        except OSError:  # no IPv6 here
            continue
        with s:
            try:
                s.bind((host, port))
            except OSError as e:
                if family == socket.AF_INET6 and e.errno == errno.EADDRNOTAVAIL:
                    continue
                raise UserError(f"--port={port} cannot be used: {e.strerror or e} (another "
                                f"program listens on it?); pick another port or leave --port "
                                f"out for a free one") from None


def stream(i: int, pipe, lock: threading.Lock) -> None:
    for line in pipe:
        if line.startswith(NOISE):
            continue
        with lock:
            sys.stdout.write(f"[{i}] {line}")
            sys.stdout.flush()


def supervise(procs: list[subprocess.Popen], grace: float) -> int:
    """Waits for every process; after the first failure the rest get `grace` seconds, then
    SIGTERM, then SIGKILL. Returns 0 or the first failure's exit code."""
    failure, deadline = 0, None
    while any([p.poll() is None for p in procs]):  # a list: poll every process each time
        for i, p in enumerate(procs):
            if p.returncode not in (None, 0) and not failure:
                failure, deadline = p.returncode, time.monotonic() + grace
                sys.stderr.write(f"launch_local: process {i} exited with code {p.returncode}; "
                                 f"the others get {grace:g} s to exit\n")
        if deadline is not None and time.monotonic() > deadline:
            for p in procs:
                if p.poll() is None:
                    p.terminate()
            time.sleep(5)
            for p in procs:
                if p.poll() is None:
                    p.kill()
            break
        time.sleep(0.2)
    for p in procs:
        p.wait()
    codes = [p.returncode for p in procs]
    code = failure or next((c for c in codes if c), 0)
    return 128 - code if code < 0 else code  # killed by a signal: the shell's 128 + signal


def main(argv):
    if len(argv) < 2:
        raise UserError("name the binary and its flags after --, e.g. -- run --method=at")
    if FLAGS.num_processes < 1:
        raise UserError(f"--num_processes must be >= 1, got {FLAGS.num_processes}")
    binary, args = argv[1], argv[2:]
    if FLAGS.port:
        check_port_free(FLAGS.port)
    port = FLAGS.port or free_port()
    commands = [command(binary, args, port, FLAGS.num_processes, i)
                for i in range(FLAGS.num_processes)]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    lock = threading.Lock()
    procs, threads = [], []
    for i, cmd in enumerate(commands):
        p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             env=env, bufsize=1)
        procs.append(p)
        t = threading.Thread(target=stream, args=(i, p.stdout, lock), daemon=True)
        t.start()
        threads.append(t)

    def forward(signum, frame):
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    code = supervise(procs, FLAGS.grace)
    for t in threads:
        t.join(timeout=5)
    if code:
        sys.stderr.write(f"launch_local: failed (exit code {code})\n")
    sys.exit(code)


def define_flags() -> None:
    """The launcher's own flags; defined only when it runs, because its --num_processes is
    the binaries' flag of the same name (importing this module must not claim it)."""
    flags.DEFINE_integer("num_processes", 2, "processes to start")
    flags.DEFINE_integer("port", 0, "coordinator port (0: a free one)")
    flags.DEFINE_float("grace", 90.0, "seconds the other processes get to exit after one fails")


def entry() -> None:
    define_flags()
    cli.run_main(main, before_jax=lambda: None)


if __name__ == "__main__":
    entry()
