"""The README's notebook snippet, extracted from README.md and run verbatim on a model loaded
from a finished run, so the two cannot drift."""

import os
import re

import pytest

from jax_robust import config as cfglib
from jax_robust import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def readme_snippet() -> str:
    with open(os.path.join(ROOT, "README.md")) as f:
        text = f.read()
    section = text.split("## In a notebook", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_the_snippet_loads_the_readme_commands_run():
    assert 'load_run("runs/digits_cnn1_rst2_official_seed0")' in readme_snippet()
    assert "python experiments/run.py --method=rst --lam=2" in open(
        os.path.join(ROOT, "README.md")).read()


@pytest.mark.slow
def test_the_readme_notebook_snippet_runs_verbatim(tmp_path, monkeypatch, capsys):
    cfg = cfglib.RunConfig(
        data=cfglib.DataConfig("digits", max_train=128, max_test=64),
        attack=cfglib.AttackConfig(steps=2),  # short training attacks: quick compiles
        train=cfglib.TrainConfig(method="rst", hparams=(("lam", 2.0),), epochs=2,
                                 batch_size=32),
        eval=cfglib.EvalConfig(batch_size=64, lipschitz_steps=2, curve_size=64))
    result = train.train_and_evaluate(cfg, str(tmp_path / "runs" / "digits_cnn1_rst2_official"
                                                                   "_seed0"), log=lambda _: None)
    monkeypatch.chdir(tmp_path)
    namespace = {}
    exec(compile(readme_snippet(), "README.md", "exec"), namespace)
    out = namespace["out"]
    printed = capsys.readouterr().out
    assert "lipschitz" in printed and "(official)" in printed
    assert out["n"] == 360  # the whole digits test set
    assert namespace["run"].config.train.hparams == (("lam", 2.0),)
    assert namespace["run"].step == result["steps"]
    assert out["acc_worst"] <= min(out["acc_pgd"], out["acc_multitarget"], out["acc_apgd"])
    assert out["acc_apgd"] <= out["acc_pgd"]
    assert namespace["x_adv"].shape == (128, 8, 8, 1)
    assert float(abs(namespace["x_adv"] - namespace["x"]).max()) <= 0.1 + 1e-6
