"""The report's arithmetic and layout on hand-made results: mean ± sample std over seeds, the
paper's row order, the paper's numbers beside ours, the attack table over the runs that have
it, and refusal of mixed data sets or foreign files."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from jax_robust import config as cfglib
from jax_robust import recipes, report
from jax_robust.errors import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COLUMNS = report.COLUMNS + ("adv_train_acc", "train_lipschitz", "train_seconds")


def write_run(root, name, method, hparams, seed, values, dataset="mnist", extra=None):
    cfg = recipes.resolve(cfglib.RunConfig(
        data=cfglib.DataConfig(dataset),
        train=cfglib.TrainConfig(method=method, hparams=tuple(hparams.items()), seed=seed)),
        "cpu")
    results = {k: values for k in COLUMNS}
    results.update(examples={"train": 100, "test": 50}, config=cfg.to_dict(), **(extra or {}))
    os.makedirs(root / name)
    (root / name / "results.json").write_text(json.dumps(results))
    (root / name / "metrics.jsonl").write_text(json.dumps(
        {"epoch": 1, "step": 1, "lr": 0.1, "train_loss": 1.0, "train_acc": 50.0,
         "test_subset_acc": 50.0, "adv_test_subset_acc": 10.0, "seconds": 1.0}) + "\n")


def test_mean_and_sample_std_over_seeds_in_the_papers_order(tmp_path):
    write_run(tmp_path, "trades3-s0", "trades", {"beta": 3.0}, 0, 10.0)
    write_run(tmp_path, "trades3-s1", "trades", {"beta": 3.0}, 1, 14.0)
    write_run(tmp_path, "at-s0", "at", {}, 0, 20.0)
    write_run(tmp_path, "natural-s0", "natural", {}, 0, 30.0)
    cells = report.cells_of(report.load_runs(str(tmp_path)))
    assert [c.label for c in cells] == ["Natural", "AT", "TRADES(b=3)"]
    assert cells[2].mean_std("test_acc") == pytest.approx((12.0, float(np.std([10, 14],
                                                                               ddof=1))))
    table = report.markdown_table(cells)
    assert "| TRADES(b=3) | official | 2 | 12.00 ± 2.83 |" in table
    assert "| AT | official | 1 | 20.00 | 20.00 |" in table
    # The paper's MNIST CNN1 rows beside ours, for the rows we ran.
    assert "| TRADES(b=3) | 99.21 | 98.96 | 96.66 | 7.83 | 0.25 | 1.33 |" in table
    assert "| RST(l=2) |" not in table
    assert "mnist, cnn1, eps 0.1" in table and "50 test / 100 train points" in table
    assert report.attack_table(cells) == ""
    csv_rows = report.csv_table(cells).splitlines()
    assert len(csv_rows) == 4 and csv_rows[3].startswith("TRADES(b=3),trades3,official")


def test_the_attack_table_uses_the_runs_that_have_the_attacks(tmp_path):
    attacks = {"adv_test_acc_pgd": 9.0, "adv_test_acc_multitarget": 8.0,
               "adv_test_acc_apgd": 7.0, "adv_test_acc_worst": 6.0}
    write_run(tmp_path, "at-s0", "at", {}, 0, 10.0, extra=attacks)
    write_run(tmp_path, "at-s1", "at", {}, 1, 12.0)
    table = report.attack_table(report.cells_of(report.load_runs(str(tmp_path))))
    assert "| AT | official | 1 | 10.00 | 9.00 | 8.00 | 7.00 | 6.00 | 3.00 |" in table


def test_mixed_data_sets_are_refused(tmp_path):
    write_run(tmp_path, "a", "at", {}, 0, 1.0)
    write_run(tmp_path, "b", "at", {}, 0, 1.0, dataset="digits")
    with pytest.raises(UserError, match="mix data sets"):
        report.cells_of(report.load_runs(str(tmp_path)))


@pytest.mark.parametrize("damage,needle", [
    (lambda d: (d / "results.json").write_text('{"accuracy": 1}'), "it has no config.data"),
    (lambda d: (d / "results.json").write_text('{"test_acc": 1, "conf'), "it is not JSON"),
    (lambda d: _edit(d, lambda r: r.pop("test_lipschitz_ascent")),
     "it has no number test_lipschitz_ascent"),
    (lambda d: _edit(d, lambda r: r.update(gap="high")), "its gap is not a number"),
    (lambda d: _edit(d, lambda r: r["config"]["attack"].pop("eps")),
     "it has no config.attack.eps"),
    (lambda d: _edit(d, lambda r: r.update(steps=3, total_steps=10, finished=False)),
     "unfinished run (step 3 of 10)"),
])
def test_a_results_file_it_cannot_report_is_skipped_with_one_warning(tmp_path, damage, needle):
    write_run(tmp_path, "good", "at", {}, 0, 10.0)
    write_run(tmp_path, "bad", "at", {}, 1, 90.0)
    damage(tmp_path / "bad")
    warnings = []
    runs = report.load_runs(str(tmp_path), warn=warnings.append)
    assert [r.path for r in runs] == [str(tmp_path / "good" / "results.json")]
    assert len(warnings) == 1 and needle in warnings[0], warnings
    assert warnings[0].startswith(f"warning: skipped {tmp_path / 'bad' / 'results.json'}: ")
    assert "| AT | official | 1 | 10.00 |" in report.markdown_table(report.cells_of(runs))


def _edit(directory, change):
    path = directory / "results.json"
    results = json.loads(path.read_text())
    change(results)
    path.write_text(json.dumps(results))


def test_a_torn_metrics_line_ends_the_curve_with_one_warning(tmp_path):
    write_run(tmp_path, "a", "at", {}, 0, 10.0)
    path = tmp_path / "a" / "metrics.jsonl"
    first = path.read_text()
    path.write_text(first + first.replace('"epoch": 1', '"epoch": 2') + first[:40])
    warnings = []
    (run,) = report.load_runs(str(tmp_path), warn=warnings.append)
    assert [e["epoch"] for e in run.curve] == [1, 2]
    assert warnings == [f"warning: {path} line 3 is not a whole epoch line (torn or foreign); "
                        f"its learning curve stops at epoch 2"]
    written = report.write_report([run], str(tmp_path / "out"))
    assert any(p.endswith("learning_curves.png") for p in written)


def report_binary(*args, home):
    env = dict(os.environ, HOME=str(home))
    return subprocess.run([sys.executable, os.path.join(ROOT, "experiments", "report.py"),
                           *args], capture_output=True, text=True, timeout=120, env=env)


@pytest.mark.slow
def test_the_binary_skips_a_bad_file_with_one_line_and_expands_the_tilde(tmp_path):
    os.makedirs(tmp_path / "rep")
    write_run(tmp_path / "rep", "good", "at", {}, 0, 10.0)
    write_run(tmp_path / "rep", "bad", "at", {}, 1, 90.0)
    (tmp_path / "rep" / "bad" / "results.json").write_text("{torn")
    proc = report_binary("--workdir=~/rep", home=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "| AT | official | 1 | 10.00 |" in proc.stdout
    lines = proc.stderr.strip().splitlines()
    assert lines[0] == f"warning: skipped {tmp_path}/rep/bad/results.json: it is not JSON"
    assert len(lines) == 2 and lines[1].startswith("wrote ") and "Traceback" not in proc.stderr
    assert (tmp_path / "rep" / "table.md").exists()
    (tmp_path / "rep" / "good" / "results.json").write_text("[]")
    proc = report_binary("--workdir=~/rep", home=tmp_path)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and lines[-1] == f"error: no results.json to report under " \
        f"{tmp_path}/rep" and len(lines) == 3, proc.stderr


@pytest.mark.parametrize("name,in_readme", [("digits", "table"), ("fashion_mnist", ""),
                                             ("fashion_mnist_fit", "table")])
def test_readme_tables_are_the_reports_of_the_committed_runs(name, in_readme):
    # docs/results_<name>/table.md, and the README's tables of it, must be what the report
    # computes now from the committed results.json / metrics.jsonl (no hand edits, no stale
    # table after more runs landed).
    root = os.path.join(ROOT, "docs", f"results_{name}")
    cells = report.cells_of(report.load_runs(root))
    readme = open(os.path.join(ROOT, "README.md")).read()
    table, attacks = report.markdown_table(cells), report.attack_table(cells)
    if "table" in in_readme:
        assert table in readme, f"README's {name} table differs from report.py's"
    if "attacks" in in_readme:
        assert attacks and attacks in readme, f"README's {name} attack table differs"
    written = open(os.path.join(root, "table.md")).read()
    assert table in written and attacks in written, f"regenerate docs/results_{name}/table.md"


def test_gap_curves_are_one_panel_per_cell_with_the_seed_mean_of_the_last_gaps(tmp_path,
                                                                              monkeypatch):
    def curve(train, test, adv_train, adv_test):
        return "".join(json.dumps(
            {"epoch": e, "step": e, "lr": 0.1, "train_loss": 1.0, "train_acc": 50.0,
             "test_subset_acc": test, "adv_test_subset_acc": adv_test, "train_subset_acc":
             train, "adv_train_subset_acc": adv_train, "seconds": 1.0}) + "\n" for e in (1, 2))

    for seed, (train, adv_train) in enumerate([(96.0, 50.0), (100.0, 60.0)]):
        write_run(tmp_path, f"at-s{seed}", "at", {}, seed, 10.0)
        (tmp_path / f"at-s{seed}" / "metrics.jsonl").write_text(curve(train, 70.0, adv_train,
                                                                       35.0))
    write_run(tmp_path, "natural-s0", "natural", {}, 0, 10.0)  # no training-subset curve
    cells = report.cells_of(report.load_runs(str(tmp_path)))
    figures = []
    monkeypatch.setattr(report, "_save", lambda fig, path: figures.append(fig))
    assert not report.plot_gap_curves(cells[:1], str(tmp_path / "g.png"), "t")  # Natural
    assert report.plot_gap_curves(cells, str(tmp_path / "g.png"), "t")
    (fig,) = figures
    titles = [ax.get_title() for ax in fig.axes if ax.get_visible()]
    assert titles == ["AT official, 2 seeds\nlast gaps: clean 28.0, PGD 20.0"]
    assert legend_clear_of_the_panels(fig) == 4


def legend_clear_of_the_panels(fig) -> int:
    """Asserts that fig's one legend lies inside the figure and outside every panel; returns
    its number of entries."""
    renderer = fig.canvas.get_renderer()
    (legend,) = fig.legends
    box = legend.get_window_extent(renderer)
    assert box.x0 >= -0.5 and box.y0 >= -0.5 and box.x1 <= fig.bbox.width + 0.5
    for ax in fig.axes:
        assert report._area(box, ax.get_window_extent(renderer)) == 0
    return len(legend.get_texts())


def test_crowded_point_labels_neither_overlap_nor_leave_the_axes():
    """Eight points in a clump, two of them coincident: every label's text box is clear of
    the others and of the axes' edge, measured in the saved layout."""
    from matplotlib.text import Text

    plt = report._pyplot()
    fig, ax = plt.subplots(figsize=(6, 4.8))  # one panel of the lipschitz plot
    xs = [2.8, 2.8, 3.0, 3.2, 3.6, 3.7, 1.5, 40.0]
    ys = [63.2, 63.4, 67.6, 67.5, 63.8, 66.5, 67.3, 6.0]
    ax.plot(xs, ys, "o")
    ax.set_xscale("log")
    fig.tight_layout()
    names = ["TRADES(b=6)", "TRADES(b=6)", "AT", "AT+d0", "TRADES(b=3)", "AT",
             "TRADES(b=6)+d0", "Natural+d0"]
    report._place_labels(fig, ax, [(n, x, y, i in (1, 2))
                                   for i, (n, x, y) in enumerate(zip(names, xs, ys))])
    renderer = fig.canvas.get_renderer()
    frame = ax.get_window_extent(renderer)
    boxes = [Text.get_window_extent(t, renderer) for t in ax.texts]
    assert sorted(t.get_text() for t in ax.texts) == sorted(names)
    for i, a in enumerate(boxes):
        assert report._area(a, frame) == pytest.approx(a.width * a.height)
        for b in boxes[i + 1:]:
            assert report._area(a, b) == 0
    plt.close(fig)


def test_the_learning_curves_legend_of_many_cells_covers_no_panel(tmp_path, monkeypatch):
    """Sixteen cells: the legend sits beside the four panels, its box clear of each."""
    for beta in range(1, 17):
        write_run(tmp_path, f"trades{beta}-s0", "trades", {"beta": float(beta)}, 0, 10.0 + beta)
    cells = report.cells_of(report.load_runs(str(tmp_path)))
    figures = []
    monkeypatch.setattr(report, "_save", lambda fig, path: figures.append(fig))
    assert report.plot_learning_curves(cells, str(tmp_path / "l.png"), "t")
    (fig,) = figures
    assert legend_clear_of_the_panels(fig) == 16
    report._pyplot().close(fig)
