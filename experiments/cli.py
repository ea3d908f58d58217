"""Shared entry for the experiment binaries: speed flags first, user errors as one line + exit 2."""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from jax_robust.speed_flags import append_speed_flags  # noqa: E402  (must precede jax)

append_speed_flags()


def one_line(error: BaseException) -> str:
    return " ".join(str(error).split())


def run_main(main) -> None:
    """absl.app.run(main), turning a `UserError` or a bad flag into one stderr line, exit 2."""
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
