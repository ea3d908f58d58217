"""`python experiments/report.py ...` from a checkout: the binary is jax_robust/cli/report.py."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from jax_robust.cli.report import entry  # noqa: E402

if __name__ == "__main__":
    entry()
