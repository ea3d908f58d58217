"""Shared entry of the experiment binaries: the CPU speed flags, then absl, with user errors
(a bad flag, a `UserError`) as one line on stderr and exit code 2; the flags that join a
multi-process run (`define_process_flags`, `join_processes`) and `say`, which prints on
process 0 only."""

from __future__ import annotations

import itertools
import os
import signal
import sys
from typing import Callable

from jax_robust.speed_flags import append_speed_flags


def one_line(error: BaseException) -> str:
    return " ".join(str(error).split())


def run_main(main: Callable, *, before_jax: Callable[[], None] = append_speed_flags) -> None:
    """Calls `before_jax()` (XLA flags: they must be set before JAX starts its backend), then
    absl.app.run(main), turning a `UserError` or a bad flag into one stderr line, exit 2."""
    before_jax()
    from absl import app, flags

    from jax_robust.errors import UserError

    def wrapped(argv):
        from absl import logging

        logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
        try:
            return main(argv)
        except UserError as e:
            sys.stderr.write(f"error: {one_line(e)}\n")
            sys.exit(2)
        except KeyboardInterrupt:
            sys.stderr.write("interrupted\n")
            sys.exit(130)
        except Exception as e:
            from jax_robust import distributed

            gist = distributed.lost_peer(e)
            if gist is None:
                raise
            distributed.report_lost_peer(gist)  # one line, exit code 3 (no traceback)

    try:
        flags.FLAGS(sys.argv)
    except flags.Error as e:
        sys.stderr.write(f"error: {one_line(e)}\n")
        sys.exit(2)
    app.run(wrapped, argv=sys.argv)


def parse_milestones(values: list[str] | None) -> tuple[int, ...] | None:
    """--milestones as a tuple of ints (None: the recipe's); UserError on a non-integer."""
    from jax_robust.errors import UserError

    try:
        return None if values is None else tuple(int(m) for m in values if m != "")
    except ValueError:
        raise UserError(f"milestones must be integers, got {values}") from None


def define_process_flags() -> list[str]:
    """The flags of a multi-process run (jax_robust.distributed), for run, sweep, separation;
    returns their names."""
    from absl import flags

    flags.DEFINE_string("coordinator_address", None, "host:port of process 0's coordinator "
                        "(a multi-process run; with --num_processes and --process_id)")
    flags.DEFINE_integer("num_processes", None, "processes in the run (one per host)")
    flags.DEFINE_integer("process_id", None, "this process's index in [0, num_processes)")
    flags.DEFINE_bool("distributed", False, "join a multi-process run whose settings JAX "
                      "detects itself (Cloud TPU pod slices, SLURM)")
    flags.DEFINE_float("peer_timeout", 60.0, "seconds after which a process whose peer "
                       "stopped responding exits (code 3) instead of waiting")
    flags.DEFINE_integer("cpu_devices", None, "XLA:CPU devices of this process (default: "
                         "the binary's; e.g. 4 to try a sharded run on one machine)")
    return ["coordinator_address", "num_processes", "process_id", "distributed",
            "peer_timeout", "cpu_devices"]


def join_processes() -> None:
    """Applies the flags of `define_process_flags` before JAX starts its backend: the CPU
    device count, then jax_robust.distributed.initialize (a no-op for a single process)."""
    from absl import flags

    import jax

    from jax_robust import distributed
    from jax_robust.errors import UserError

    f = flags.FLAGS
    if f.cpu_devices is not None:
        if f.cpu_devices < 1:
            raise UserError(f"--cpu_devices must be >= 1, got {f.cpu_devices}")
        jax.config.update("jax_num_cpu_devices", f.cpu_devices)
    distributed.initialize(f.coordinator_address, f.num_processes, f.process_id,
                           auto_detect=f.distributed, peer_timeout=f.peer_timeout)


def say(message: str) -> None:
    """Prints a line (flushed) on process 0; the other processes stay quiet."""
    import jax

    if jax.process_index() == 0:
        print(message, flush=True)


def stop_requests() -> Callable[[], bool]:
    """A poll that turns true after SIGTERM or Ctrl-C. Over several processes it is true on
    all of them at the same poll (JAX's preemption sync point, which a SIGTERM to any one
    process triggers), so they save the same checkpoint together. Every long phase polls it
    (training steps, evaluation batches, each attack's batches, the separation scan's calls)
    and ends with one line (errors.Interrupted) and exit code 130; docs/faults.md has the
    measured delays."""
    import jax

    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        # JAX's own SIGTERM handler serves the sync point; Ctrl-C is turned into a SIGTERM.
        signal.signal(signal.SIGINT, lambda *_: os.kill(os.getpid(), signal.SIGTERM))
        polls = itertools.count()
        return lambda: multihost_utils.reached_preemption_sync_point(next(polls))
    stop = {"requested": False}

    def request_stop(signum, frame):
        # Silent: the work stops at its next poll and says so in one line (errors.Interrupted).
        stop["requested"] = True

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    return lambda: stop["requested"]
