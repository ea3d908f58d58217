"""The README's flag table, generated from run.py's flag definitions:

    python -m jax_robust.cli.flag_table          # prints the table's rows
    python -m jax_robust.cli.flag_table --write  # replaces them in README.md

The rows go between the README's `<!-- flags:begin -->` and `<!-- flags:end -->` lines;
tests/test_docs.py checks that they are what this prints.
"""

from __future__ import annotations

import os
import sys

BEGIN, END = "<!-- flags:begin -->", "<!-- flags:end -->"


def _default(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, list):
        return "`" + ",".join(str(v) for v in value) + "`"
    if isinstance(value, bool):
        return "`true`" if value else "`false`"
    return f"`{value}`"


def table() -> str:
    """One markdown table of every flag of run.py: flag, default ('-': the official or the
    backend's choice, set by recipes.resolve), meaning."""
    from absl import flags

    from jax_robust.cli import run

    rows = ["| flag | default | meaning |", "|---|---|---|"]
    for name in run.RUN_FLAGS:
        flag = flags.FLAGS[name]
        meaning = " ".join(flag.help.split()).replace("|", "\\|")
        rows.append(f"| `--{name}` | {_default(flag.default)} | {meaning} |")
    return "\n".join(rows) + "\n"


def readme_table(text: str) -> str:
    """What README text holds between the markers ('' if they are missing)."""
    if BEGIN not in text or END not in text:
        return ""
    return text.split(BEGIN, 1)[1].split(END, 1)[0].strip("\n") + "\n"


def main() -> None:
    rows = table()
    if "--write" not in sys.argv[1:]:
        sys.stdout.write(rows)
        return
    path = os.path.join(os.path.dirname(__file__), "..", "..", "README.md")
    text = open(path).read()
    if BEGIN not in text or END not in text:
        sys.exit(f"error: README.md has no {BEGIN} ... {END} block")
    head, rest = text.split(BEGIN, 1)
    tail = rest.split(END, 1)[1]
    with open(path, "w") as f:
        f.write(f"{head}{BEGIN}\n{rows}{END}{tail}")


if __name__ == "__main__":
    main()
