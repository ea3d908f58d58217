"""The documents users and contributors read: the README's size and flag table (generated from
the flag definitions), the LICENSE, every document the code cites present in the repository,
and no top-level `experiments` package installed."""

import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_readme_is_a_user_document_of_at_most_400_lines():
    with open(os.path.join(ROOT, "README.md")) as f:
        assert len(f.read().splitlines()) <= 400


def test_readme_flag_table_is_every_run_flag_in_one_table():
    from jax_robust.cli import flag_table

    with open(os.path.join(ROOT, "README.md")) as f:
        block = flag_table.readme_table(f.read())
    assert block == flag_table.table(), "regenerate: python -m jax_robust.cli.flag_table --write"
    # One contiguous table: every line of the block is a row.
    assert all(line.startswith("|") for line in block.splitlines())
    from jax_robust.cli import run

    assert {f"`--{name}`" for name in run.RUN_FLAGS} == {
        line.split("|")[1].strip() for line in block.splitlines()[2:]}


def test_license_is_the_apache_license():
    with open(os.path.join(ROOT, "LICENSE")) as f:
        text = f.read()
    assert "Apache License" in text and "Version 2.0" in text and len(text) > 10000


def test_every_document_the_code_cites_is_in_the_repository():
    cited = set()
    for folder in ("jax_robust", "tests", "benchmarks", "experiments"):
        for base, _, files in os.walk(os.path.join(ROOT, folder)):
            for name in files:
                if name.endswith((".py", ".cc", ".sh")):
                    with open(os.path.join(base, name)) as f:
                        cited |= set(re.findall(r"\b(?:docs/)?[A-Z_a-z]+\.md\b", f.read()))
    cited -= {"table.md", "t.md"}  # file names the report writes
    missing = sorted(c for c in cited if not os.path.exists(os.path.join(ROOT, c))
                     and not os.path.exists(os.path.join(ROOT, "docs", c)))
    assert not missing, f"cited but not in the repository: {missing}"


def test_no_top_level_experiments_package_is_installed(tmp_path):
    # From outside the checkout, only jax_robust (and its cli) is importable.
    code = ("import importlib.util as u; print(u.find_spec('experiments') is None, "
            "u.find_spec('jax_robust.cli.run') is not None)")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True,
                         text=True, env={**os.environ, "PYTHONPATH": ""}).stdout.split()
    assert out == ["True", "True"]


def test_the_library_defines_no_flags():
    # Flags live in the binaries (jax_robust/cli); the library takes a config. (chex imports
    # absl's logging, so absl itself is there; its flag registry must stay empty of ours.)
    code = ("import jax_robust.train, jax_robust.autoattack, jax_robust.robustness, "
            "jax_robust.separation, jax_robust.report, jax_robust.recipes\n"
            "from absl import flags\n"
            "print(sorted(n for n in ('method', 'dataset', 'eps', 'workdir', 'seed') "
            "if n in flags.FLAGS), 'jax_robust.cli' in ' '.join(__import__('sys').modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert out.stdout.strip() == "[] False", out.stderr[-2000:]
