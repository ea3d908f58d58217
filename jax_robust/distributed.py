"""Several JAX processes as one run (one process per host; or several on one machine).

`initialize(...)` starts this process's part of a multi-process run: it selects the gloo
collectives of the CPU backend (so CPU processes run real all-reduces with each other),
connects to the coordinator (process 0) and starts a peer watchdog. Call it before anything
else touches JAX's backend. The rest of the library then needs no change of call: the mesh
spans every process's devices, each process feeds its own rows of a global batch
(`pipeline.local_rows`), replicated results are read on every process, and only process 0
writes files (`is_primary`).

A dead peer. JAX's coordination service notices a process that stopped sending heartbeats
only after `heartbeat_timeout_seconds` (100 s by default), and a collective waiting for it
can block until then. The watchdog makes that `peer_timeout` seconds: every process
publishes a counter in the coordinator's key-value store each second, and a process whose
peer's counter has not moved for `peer_timeout` seconds prints one line naming the peer
and exits with PEER_LOST_EXIT_CODE. A collective that fails first (gloo: "Connection closed
by peer", e.g. inside a checkpoint save) is reported the same way by the binaries
(cli.common.run_main: `lost_peer`, `exit_peer_lost`): one line, that exit code, no traceback. If process 0 (which hosts the coordinator) dies, JAX
itself terminates the others at once ("Terminating process because the JAX distributed
service detected fatal errors", SIGABRT). Checkpoints are written atomically, so a rerun of
every process resumes from the last complete one.
"""

from __future__ import annotations

import os
import socket
import sys
import threading
import time

import numpy as np

from jax_robust.errors import UserError

PEER_LOST_EXIT_CODE = 3
_KEY = "jax_robust/alive/"


def check_settings(coordinator_address: str | None, num_processes: int | None,
                   process_id: int | None, peer_timeout: float = 60.0) -> None:
    """UserError unless the three settings are all None or all valid."""
    given = [v is not None for v in (coordinator_address, num_processes, process_id)]
    if not any(given):
        return
    if not all(given):
        raise UserError("--coordinator_address, --num_processes and --process_id go together "
                        "(or use --distributed on a TPU pod / SLURM, which detects them)")
    host, _, port = coordinator_address.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise UserError(f"--coordinator_address must be host:port, got {coordinator_address!r}")
    if num_processes < 1:
        raise UserError(f"--num_processes must be >= 1, got {num_processes}")
    if not 0 <= process_id < num_processes:
        raise UserError(f"--process_id must be in [0, {num_processes}), got {process_id}")
    if not peer_timeout > 0:
        raise UserError(f"--peer_timeout must be > 0 seconds, got {peer_timeout}")


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, *, auto_detect: bool = False,
               peer_timeout: float = 60.0, init_timeout: int = 300) -> bool:
    """Joins a multi-process run; returns whether one was joined.

    With the three settings given, connects to `coordinator_address` ("host:port", served by
    process 0) as process `process_id` of `num_processes`; with `auto_detect`, JAX reads them
    from the cluster (Cloud TPU, SLURM, ...). Neither: a single-process run, nothing done.
    `peer_timeout`: seconds after which a silent peer ends this process (module docstring).
    """
    import jax

    check_settings(coordinator_address, num_processes, process_id, peer_timeout)
    if coordinator_address is None and not auto_detect:
        return False
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    # JAX's own heartbeat check is the backstop behind the watchdog.
    jax.distributed.initialize(coordinator_address, num_processes, process_id,
                               initialization_timeout=init_timeout,
                               heartbeat_timeout_seconds=int(peer_timeout) * 2 + 10)
    global _joined
    _joined = jax.process_count() > 1
    if jax.process_count() > 1:
        threading.Thread(target=_watch_peers, args=(peer_timeout,), daemon=True,
                         name="jax_robust-peer-watchdog").start()
    return True


def _watch_peers(timeout: float) -> None:
    """Publishes this process's counter each second; exits the process when a peer's has
    not changed for `timeout` seconds."""
    import jax
    from jax._src import distributed as jax_distributed

    client = jax_distributed.global_state.client
    me, n = jax.process_index(), jax.process_count()
    last: dict[int, object] = {}
    changed = _changed
    beat = 0
    while True:
        beat += 1
        now = time.monotonic()
        try:
            client.key_value_set(f"{_KEY}{me}", str(beat), allow_overwrite=True)
            values = {p: client.key_value_try_get(f"{_KEY}{p}") for p in range(n) if p != me}
        except Exception:  # the coordinator is gone: JAX terminates this process itself
            values = {p: last.get(p) for p in range(n) if p != me}
        for p, value in values.items():
            if p not in changed or value != last.get(p):
                last[p], changed[p] = value, now
            elif now - changed[p] > timeout:
                exit_peer_lost(f"process {p} of {n} stopped responding (no heartbeat for "
                               f"{timeout:g} s); process {me} exits. Rerun every process to "
                               f"resume from the last checkpoint")
        time.sleep(1.0)


_joined = False
_exit_lock = threading.Lock()
_changed: dict[int, float] = {}  # peer -> time.monotonic() its counter last changed (watchdog)
# What a collective (gloo over TCP) or the coordination service says when another process is
# gone: the connection to it closed or reset, or the service lost it.
LOST_PEER_SIGNS = ("connection closed by peer", "connection reset by peer", "broken pipe",
                   "socket closed", "connection refused", "gloo", "unavailable:",
                   "heartbeat", "coordination service")


def exit_peer_lost(message: str) -> None:
    """Prints `error: <message>` as one stderr line and ends this process at once with
    PEER_LOST_EXIT_CODE. os._exit: JAX's exit handlers would wait for the lost peer. Only
    the first caller (the watchdog or a failed collective) prints; a second one waits."""
    with _exit_lock:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass
        sys.stderr.write(f"error: {message}\n")
        sys.stderr.flush()
        os._exit(PEER_LOST_EXIT_CODE)


def silent_peers(wait: float = 4.5, quiet: float = 2.5) -> list[int]:
    """After waiting `wait` seconds, the peers whose watchdog counter has not changed for
    `quiet` seconds: after a failed collective, the ones that are gone. (A live peer's counter
    is seen to change every 1-2 s; a dead one's may be seen to change once more, up to a
    second after its death, as the watchdog reads its last beat.)"""
    time.sleep(wait)
    now = time.monotonic()
    return sorted(p for p, t in dict(_changed).items() if now - t >= quiet)


def report_lost_peer(gist: str) -> None:
    """Ends this process like the watchdog after a collective failed because of a lost peer
    (`gist`: `lost_peer`'s), naming the peer when its heartbeat stopped too (4.5 s)."""
    import jax

    me, n = jax.process_index(), jax.process_count()
    gone = silent_peers()
    who = (f"process {', '.join(map(str, gone))} of {n} stopped responding: a collective with "
           f"it failed" if gone else "a collective with the other processes failed")
    exit_peer_lost(f"{who} ({gist}); process {me} exits. Rerun every process to resume from "
                   f"the last checkpoint")


def lost_peer(error: BaseException) -> str | None:
    """In a multi-process run, the one-line gist of `error` (or of an error it was raised
    from) when it is a collective or the coordination service failing because another process
    is gone (see LOST_PEER_SIGNS); None otherwise, and always in a single-process run."""
    if not _joined:
        return None
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        text = " ".join(str(error).split())
        if any(sign in text.lower() for sign in LOST_PEER_SIGNS):
            return f"{type(error).__name__}: {text[:160]}"
        error = error.__cause__ or error.__context__
    return None


def free_port() -> int:
    """A TCP port on localhost that was free a moment ago (for a local coordinator)."""
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def is_primary() -> bool:
    """Whether this process writes the run's files (process 0)."""
    import jax

    return jax.process_index() == 0


def to_host(array) -> np.ndarray:
    """The whole value of a jax.Array on every process (gathered from the other processes
    when this one does not hold all of it)."""
    if getattr(array, "is_fully_addressable", True) or array.is_fully_replicated:
        return np.asarray(array)
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(array, tiled=True))


def barrier(name: str) -> None:
    """Waits until every process reaches the barrier `name` (nothing in one process)."""
    import jax

    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def broadcast_from_primary(value: int) -> int:
    """Process 0's `value` (an int) on every process."""
    import jax

    if jax.process_count() == 1:
        return int(value)
    from jax.experimental import multihost_utils

    return int(multihost_utils.broadcast_one_to_all(np.int32(value)))
