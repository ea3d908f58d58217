"""Shared entry of the experiment binaries: the CPU speed flags, then absl, with user errors
(a bad flag, a `UserError`) as one line on stderr and exit code 2."""

from __future__ import annotations

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
