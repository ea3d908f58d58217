"""Runs (results.json + metrics.jsonl) -> the paper's tables over seeds, and plots.

A cell is one configuration (method and hyperparameters, variant, dropout) on one data set and
arch; its runs differ only in seed. Tables give mean ± std over the seeds (sample std, n - 1)
and the seed count, with the paper's numbers beside them where data set and arch match.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import os
from typing import Callable

import numpy as np

from jax_robust import methods, recipes
from jax_robust.errors import UserError
from jax_robust.files import save_figure_atomic, write_text_atomic

COLUMNS = ("train_acc", "test_acc", "adv_test_acc", "test_lipschitz", "gap", "adv_gap",
           "test_lipschitz_ascent")
HEADERS = ("train", "test", "adv test", "lipschitz", "gap", "adv gap", "lipschitz (ascent)")
PAPER_COLUMNS = COLUMNS[:6]


def load_paper_results() -> dict[tuple[str, str], dict[str, tuple[float, ...]]]:
    """The paper's reference numbers (package data paper_results.csv): {(data set, arch):
    {method tag: the six PAPER_COLUMNS}}."""
    path = os.path.join(os.path.dirname(__file__), "paper_results.csv")
    tables: dict[tuple[str, str], dict[str, tuple[float, ...]]] = {}
    with open(path) as f:
        for row in csv.DictReader(line for line in f if not line.startswith("#")):
            tables.setdefault((row["dataset"], row["arch"]), {})[row["method_tag"]] = tuple(
                float(row[c]) for c in PAPER_COLUMNS)
    return tables


PAPER_RESULTS = load_paper_results()


@dataclasses.dataclass
class Run:
    """One finished run: its results.json and its metrics.jsonl lines (may be empty)."""

    path: str
    results: dict
    curve: list[dict]

    @property
    def config(self) -> dict:
        return self.results["config"]


@dataclasses.dataclass
class Cell:
    """The runs of one configuration over seeds."""

    tag: str  # method tag, e.g. 'rst2'
    label: str  # table label, e.g. 'RST(l=2) +dropout 0.25'
    method: str
    variant: str
    dropout: float
    official_dropout: bool
    runs: list[Run]

    def values(self, key: str) -> np.ndarray:
        return np.array([r.results[key] for r in self.runs], np.float64)

    def mean_std(self, key: str) -> tuple[float, float]:
        v = self.values(key)
        return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0


# What the tables and plots read: a results.json lacking one of these is not reported.
NUMBERS = COLUMNS + ("adv_train_acc", "train_lipschitz", "train_seconds")
CONFIG_KEYS = {"data.dataset": str, "model.arch": str, "model.dropout": float,
               "attack.eps": float, "attack.steps": float, "attack.step_size": float,
               "train.method": str, "train.hparams": dict, "train.variant": str,
               "train.epochs": float}  # float: any number
CURVE_KEYS = ("epoch", "train_loss", "train_acc", "test_subset_acc", "adv_test_subset_acc")


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def results_problem(results) -> str | None:
    """Why a parsed results.json cannot be reported (a missing or non-numeric key, an
    unfinished run), or None."""
    if not isinstance(results, dict):
        return f"it holds a {type(results).__name__}, not a mapping"
    config = results.get("config")
    for name, kind in CONFIG_KEYS.items():
        node = config
        for k in name.split("."):
            node = node.get(k, KeyError) if isinstance(node, dict) else KeyError
        if node is KeyError:
            return f"it has no config.{name}"
        if not (_is_number(node) if kind is float else isinstance(node, kind)):
            return f"its config.{name} is not a {'number' if kind is float else kind.__name__}"
    for k in NUMBERS:
        if not _is_number(results.get(k)):
            return f"it has no number {k}" if k not in results else f"its {k} is not a number"
    if results.get("finished", True) is not True:
        return (f"it is the evaluation of an unfinished run (step {results.get('steps')} of "
                f"{results.get('total_steps')}); rerun the run to finish it")
    return None


def _stderr(line: str) -> None:
    import sys

    print(line, file=sys.stderr, flush=True)


def read_curve(path: str, warn: Callable[[str], None] = _stderr) -> list[dict]:
    """The epoch lines of a metrics.jsonl; a line that is not JSON or lacks a key ends the
    curve there, with one warning naming the file and the line."""
    curve = []
    with open(path) as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
            except ValueError:
                entry = None
            if not (isinstance(entry, dict) and all(_is_number(entry.get(k))
                                                    for k in CURVE_KEYS)):
                warn(f"warning: {path} line {number} is not a whole epoch line (torn or "
                     f"foreign); its learning curve stops at epoch {len(curve)}")
                break
            curve.append(entry)
    return curve


def load_runs(root: str, warn: Callable[[str], None] = _stderr) -> list[Run]:
    """Every results.json under `root` (recursively), with the metrics.jsonl beside it. A file
    that cannot be reported (not JSON, a key missing, an unfinished run: `results_problem`)
    is skipped with one warning line naming it, through `warn` (default: stderr)."""
    runs = []
    for directory, _, files in sorted(os.walk(root)):
        if "results.json" not in files:
            continue
        path = os.path.join(directory, "results.json")
        try:
            with open(path) as f:
                results = json.load(f)
            problem = results_problem(results)
        except OSError as e:
            problem = f"it cannot be read ({e.strerror})"
        except ValueError:
            problem = "it is not JSON"
        if problem:
            warn(f"warning: skipped {path}: {problem}")
            continue
        curve = []
        if "metrics.jsonl" in files:
            try:
                curve = read_curve(os.path.join(directory, "metrics.jsonl"), warn)
            except OSError as e:
                warn(f"warning: {directory}/metrics.jsonl cannot be read ({e.strerror}); no "
                     f"learning curve for it")
        runs.append(Run(path, results, curve))
    return runs


def _cell_key(run: Run) -> tuple:
    c = run.config
    return (c["train"]["method"], json.dumps(c["train"]["hparams"], sort_keys=True),
            c["train"]["variant"], c["model"]["dropout"])


def cells_of(runs: list[Run]) -> list[Cell]:
    """Runs grouped by configuration, in the paper's row order (the registry's, then the
    weights), official before paper; one data set and arch only."""
    where = {(r.config["data"]["dataset"], r.config["model"]["arch"]) for r in runs}
    if len(where) > 1:
        raise UserError(f"the runs mix data sets / archs {sorted(where)}; report them apart")
    groups: dict[tuple, list[Run]] = {}
    for r in runs:
        groups.setdefault(_cell_key(r), []).append(r)
    cells = []
    for (method, hparams, variant, dropout), group in groups.items():
        hp = json.loads(hparams)
        m = methods.METHODS.get(method)
        tag = m.format_tag(hp) if m else method
        label = m.format_label(hp) if m else method
        official = dropout == recipes.ARCH_DROPOUT.get(group[0].config["model"]["arch"])
        if not official:
            label += f" +dropout {dropout:g}"
        cells.append(Cell(tag, label, method, variant, dropout, official, group))
    order = list(methods.METHODS)

    def paper_order(cell: Cell):
        hp = cell.runs[0].config["train"]["hparams"]
        return (order.index(cell.method) if cell.method in order else len(order), cell.method,
                sorted(hp.items()), cell.variant != "official", cell.dropout)

    return sorted(cells, key=paper_order)


def _fmt(mean: float, std: float, n: int) -> str:
    return f"{mean:.2f} ± {std:.2f}" if n > 1 else f"{mean:.2f}"


def describe(cells: list[Cell]) -> str:
    """One line: data set, arch, eps, examples evaluated, seeds, variants."""
    first = cells[0].runs[0].results
    c = first["config"]
    ex = first.get("examples", {})
    seeds = sorted({len(cell.runs) for cell in cells})
    return (f"{c['data']['dataset']}, {c['model']['arch']}, eps {c['attack']['eps']:g}, "
            f"PGD-{c['attack']['steps']} step {c['attack']['step_size']:g}, "
            f"{c['train']['epochs']} epochs, evaluated on {ex.get('test', '?')} test / "
            f"{ex.get('train', '?')} train points, seeds per cell "
            f"{'-'.join(str(s) for s in seeds)}, variants "
            f"{', '.join(sorted({cell.variant for cell in cells}))}")


def paper_rows(cells: list[Cell]) -> dict[str, tuple]:
    c = cells[0].runs[0].config
    return PAPER_RESULTS.get((c["data"]["dataset"], c["model"]["arch"]), {})


def markdown_table(cells: list[Cell]) -> str:
    """The paper's table: mean ± std over seeds per cell, then the paper's row if any."""
    paper = paper_rows(cells)
    lines = [f"{describe(cells)}.", "",
             "| method | variant | seeds | " + " | ".join(HEADERS) + " |",
             "|---|---|---:|" + "---:|" * len(HEADERS)]
    for cell in cells:
        n = len(cell.runs)
        values = " | ".join(_fmt(*cell.mean_std(k), n) for k in COLUMNS)
        lines.append(f"| {cell.label} | {cell.variant} | {n} | {values} |")
    shown = [cell for cell in cells if cell.tag in paper and cell.official_dropout]
    if shown:
        lines += ["", "The paper (docs/paper.md section 9, one seed, official code):", "",
                  "| method | " + " | ".join(HEADERS[:6]) + " |",
                  "|---|" + "---:|" * 6]
        for tag in dict.fromkeys(cell.tag for cell in shown):
            label = next(cell.label for cell in shown if cell.tag == tag)
            lines.append(f"| {label} | " + " | ".join(f"{v:.2f}" for v in paper[tag]) + " |")
    else:
        c = cells[0].runs[0].config
        lines += ["", f"The paper has no table for {c['data']['dataset']} with "
                      f"{c['model']['arch']}."]
    return "\n".join(lines) + "\n"


ATTACK_NAMES = {"pgd": "PGD-10", "multitarget": "multitarget", "apgd": "APGD-CE",
                "worst": "worst case"}
# Columns shown where some run of the table has them (AutoAttack runs on request).
OPTIONAL_ATTACKS = {"autoattack": "AutoAttack", "autoattack_rand": "AutoAttack (rand)"}


def attack_table(cells: list[Cell]) -> str:
    """Adv test acc under each attack of `--eval_attacks` and the per-example worst case, over
    the runs of each cell that have them ('' if no run has); AutoAttack's columns where a run
    has them ('-' in the cells without)."""
    keys = [f"adv_test_acc_{a}" for a in ATTACK_NAMES]
    optional = {a: name for a, name in OPTIONAL_ATTACKS.items()
                if any(f"adv_test_acc_{a}" in r.results for c in cells for r in c.runs)}
    names = [*list(ATTACK_NAMES.values())[:-1], *optional.values(), ATTACK_NAMES["worst"]]
    lines = ["| method | variant | seeds | adv test (paper's PGD) | " + " | ".join(names)
             + " | PGD-10 - worst |",
             "|---|---|---:|" + "---:|" * (len(names) + 2)]
    for c in cells:
        runs = [r for r in c.runs if all(k in r.results for k in keys)]
        if not runs:
            continue
        sub = dataclasses.replace(c, runs=runs)
        n = len(runs)
        values = [_fmt(*sub.mean_std(k), n) for k in ["adv_test_acc", *keys[:-1]]]
        for a in optional:
            with_it = [r for r in runs if f"adv_test_acc_{a}" in r.results]
            values.append(_fmt(*dataclasses.replace(c, runs=with_it).mean_std(
                f"adv_test_acc_{a}"), len(with_it)) if with_it else "-")
        values.append(_fmt(*sub.mean_std(keys[-1]), n))
        drop = sub.values("adv_test_acc_pgd") - sub.values("adv_test_acc_worst")
        spread = float(drop.std(ddof=1)) if n > 1 else 0.0
        lines.append(f"| {c.label} | {c.variant} | {n} | " + " | ".join(values)
                     + f" | {_fmt(float(drop.mean()), spread, n)} |")
    return "\n".join(lines) + "\n" if len(lines) > 2 else ""


def csv_table(cells: list[Cell]) -> str:
    """One row per cell: means and stds of every column, seeds, eps and examples."""
    buf = io.StringIO()
    writer = csv.writer(buf)
    extra = ("adv_train_acc", "train_lipschitz", "train_seconds")
    writer.writerow(("method", "tag", "variant", "dropout", "dataset", "arch", "eps",
                     "test_examples", "train_examples", "seeds",
                     *(f"{k}_{s}" for k in COLUMNS + extra for s in ("mean", "std")),
                     *(f"paper_{k}" for k in PAPER_COLUMNS)))
    paper = paper_rows(cells)
    for cell in cells:
        r = cell.runs[0].results
        ex = r.get("examples", {})
        stats = [f"{v:.4f}" for k in COLUMNS + extra for v in cell.mean_std(k)]
        ref = paper.get(cell.tag) if cell.official_dropout else None
        writer.writerow((cell.label, cell.tag, cell.variant, cell.dropout,
                         r["config"]["data"]["dataset"], r["config"]["model"]["arch"],
                         r["config"]["attack"]["eps"], ex.get("test"), ex.get("train"),
                         len(cell.runs), *stats, *(ref or ("",) * len(PAPER_COLUMNS))))
    return buf.getvalue()


METHOD_COLORS = {"natural": "tab:gray", "gr": "tab:olive", "llr": "tab:brown", "at": "tab:red",
                 "rst": "tab:blue", "trades": "tab:green"}


def _color(method: str) -> str:
    return METHOD_COLORS.get(method, "tab:purple")


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str) -> None:
    save_figure_atomic(fig, path, dpi=120)
    _pyplot().close(fig)


def _legend_outside(fig, ax, side: str, **kwargs) -> None:
    """The final layout of a multi-panel figure: one legend of ax's lines right of the panels
    (side "right") or below them ("below"), and tight_layout leaving it its measured room.
    Inside a panel a legend hides curves or points."""
    legend = fig.legend(*ax.get_legend_handles_labels(),
                        loc={"right": "center right", "below": "lower center"}[side], **kwargs)
    box = legend.get_window_extent(fig.canvas.get_renderer())
    fig.tight_layout(rect=(0, 0, 1 - box.width / fig.bbox.width - 0.005, 1) if side == "right"
                     else (0, box.height / fig.bbox.height + 0.005, 1, 1))


def _segments_cross(a, b) -> bool:
    """Whether segments a and b, each ((x0, y0), (x1, y1)), properly cross."""
    def side(p, q, r):
        return np.sign((q[0] - p[0]) * (r[1] - p[1]) - (q[1] - p[1]) * (r[0] - p[0]))

    return (side(*a, b[0]) * side(*a, b[1]) < 0) and (side(*b, a[0]) * side(*b, a[1]) < 0)


def _segment_in_box(segment, box) -> int:
    """How many of nine points spread along `segment` lie inside `box` (a Bbox)."""
    (x0, y0), (x1, y1) = segment
    return sum(box.contains(x0 + t * (x1 - x0), y0 + t * (y1 - y0))
               for t in np.linspace(0.1, 0.9, 9))


def _area(a, b) -> float:
    """The area of the intersection of Bboxes a and b (display units squared)."""
    return (max(0, min(a.x1, b.x1) - max(a.x0, b.x0))
            * max(0, min(a.y1, b.y1) - max(a.y0, b.y0)))


def _place_labels(fig, ax, labels) -> None:
    """Annotates each point (text, x, y, prefer_left) at the first of 28 offsets with zero
    cost, else the cheapest. Cost, in px^2: the text box's overlap with labels placed before
    it and with every marker, its part outside the axes, 50 for each ninth of a leader
    (the far offsets get a leader line to their point) inside a label, and 200 for each
    leader it crosses. Call it after the last layout change: a later tight_layout rescales
    the axes and moves the points under labels fixed in points."""
    from matplotlib.text import Text
    from matplotlib.transforms import Bbox

    renderer = fig.canvas.get_renderer()
    frame = ax.get_window_extent(renderer)
    points = [ax.transData.transform((x, y)) for _, x, y, _ in labels]
    markers = [Bbox([[px - 7, py - 7], [px + 7, py + 7]]) for px, py in points]
    placed, leaders = [], []
    for (text, x, y, left), point in zip(labels, points):
        near = [(6, 3), (6, -9), (-6, 3), (-6, -9)]
        far = [(sx * dx, dy) for dx in (22, 48) for dy in (16, -22, 28, -34, 40, -46)
               for sx in (1, -1)]
        if left:
            near, far = ([(-dx, dy) for dx, dy in near], [(-dx, dy) for dx, dy in far])
        best = None
        for dx, dy in near + far:
            arrow = (dict(arrowstyle="-", lw=0.5, color="0.4", shrinkA=0, shrinkB=3)
                     if abs(dx) > 6 else None)
            ann = ax.annotate(text, (x, y), fontsize=6.5, xytext=(dx, dy),
                              textcoords="offset points", ha="left" if dx > 0 else "right",
                              arrowprops=arrow)
            ann.update_positions(renderer)  # then the text's own box, without its leader
            box = Text.get_window_extent(ann, renderer)
            cost = (sum(_area(box, b) for b in placed + markers)
                    + box.width * box.height - _area(box, frame)
                    + 50 * sum(_segment_in_box(other, box) for other in leaders))
            leader = None
            if arrow:
                leader = (point, (box.x0 if dx > 0 else box.x1, (box.y0 + box.y1) / 2))
                cost += (50 * sum(_segment_in_box(leader, b) for b in placed)
                         + 200 * sum(_segments_cross(leader, other) for other in leaders))
            if best is None or cost < best[0]:
                if best is not None:
                    best[1].remove()
                best = (cost, ann, box, leader)
            else:
                ann.remove()
            if cost == 0:
                break
        placed.append(best[2])
        if best[3] is not None:
            leaders.append(best[3])


def plot_lipschitz_vs_robustness(cells: list[Cell], path: str, title: str) -> None:
    """Adv test acc against test lipschitz, one labelled point per cell, error bars (std over
    seeds) on both axes; left panel the official (descent) estimator, right the ascent one.
    Circles: official variant, squares: paper; hollow: non-official dropout."""
    from matplotlib.ticker import LogLocator, NullFormatter, ScalarFormatter

    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8), sharey=True)
    panels = []
    for ax, key, name in ((axes[0], "test_lipschitz", "official estimator (descent)"),
                          (axes[1], "test_lipschitz_ascent", "ascent (maximum search)")):
        labels = []
        for cell in cells:
            (x, xs), (y, ys) = cell.mean_std(key), cell.mean_std("adv_test_acc")
            color = _color(cell.method)
            ax.errorbar(x, y, xerr=xs or None, yerr=ys or None, color=color,
                        marker="o" if cell.variant == "official" else "s", ms=6, capsize=2,
                        mfc=color if cell.official_dropout else "white", ls="")
            labels.append((cell.label.replace(" +dropout ", "+d"), x, y,
                           cell.variant != "official"))
        ax.set_xscale("log")
        ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.xaxis.set_minor_formatter(NullFormatter())
        lo, hi = ax.get_xlim()
        if hi / lo < 4:  # less than the 1-2-5 steps: label the minor ticks too
            ax.xaxis.set_minor_formatter(ScalarFormatter())
        ax.set_xlabel(f"test lipschitz, {name} (log scale)")
        ax.grid(alpha=0.3, which="both")
        panels.append((ax, labels))
    axes[0].set_ylabel("adv test acc (%)")
    fig.suptitle(f"Local Lipschitzness vs. robustness: {title}\n"
                 "circle official, square paper variant; bars: std over seeds", fontsize=10)
    fig.tight_layout()  # the final layout: labels are placed in it
    for ax, labels in panels:
        _place_labels(fig, ax, labels)
    _save(fig, path)


def plot_gaps(cells: list[Cell], path: str, title: str) -> None:
    """Generalization gap and adversarial gap per cell, bars with std over seeds."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(6, 0.55 * len(cells) + 2), 4.4))
    pos = np.arange(len(cells))
    for offset, key, hatch, name in ((-0.2, "gap", "", "gap (train - test acc)"),
                                     (0.2, "adv_gap", "//", "adv gap (adv train - adv test)")):
        means, stds = zip(*(cell.mean_std(key) for cell in cells))
        ax.bar(pos + offset, means, 0.4, yerr=stds, capsize=2, hatch=hatch, label=name,
               color=[_color(cell.method) for cell in cells], edgecolor="k", alpha=0.8)
    ax.set_xticks(pos, [f"{cell.label}\n{cell.variant}" for cell in cells], rotation=60,
                  ha="right", fontsize=7)
    ax.axhline(0, color="k", lw=0.6)
    ax.set_ylabel("percentage points")
    ax.legend(fontsize=8)
    ax.set_title(f"Generalization gaps: {title}", fontsize=10)
    fig.tight_layout()
    _save(fig, path)


def plot_dropout(cells: list[Cell], path: str, title: str) -> bool:
    """Test acc, adv test acc, test lipschitz and the gaps with and without the cell's other
    dropout rates, for each method that was run at several; False if none was."""
    by: dict[tuple, list[Cell]] = {}
    for cell in cells:
        by.setdefault((cell.tag, cell.variant), []).append(cell)
    multi = {k: sorted(v, key=lambda c: c.dropout) for k, v in by.items() if len(v) > 1}
    if not multi:
        return False
    plt = _pyplot()
    keys = ("test_acc", "adv_test_acc", "test_lipschitz", "gap", "adv_gap")
    names = dict(zip(COLUMNS, HEADERS))
    fig, axes = plt.subplots(1, len(keys), figsize=(3.2 * len(keys), 3.8))
    for ax, key in zip(axes, keys):
        for (tag, variant), group in multi.items():
            xs = [c.dropout for c in group]
            ms, ss = zip(*(c.mean_std(key) for c in group))
            ax.errorbar(xs, ms, yerr=ss, marker="o", capsize=2, color=_color(group[0].method),
                        ls="-" if variant == "official" else "--", label=f"{tag} {variant}")
        ax.set_xlabel("dropout rate")
        ax.set_title(names[key] + (" (%)" if "lipschitz" not in key else ""), fontsize=9)
        ax.grid(alpha=0.3)
    fig.suptitle(f"Dropout: {title}", fontsize=10)
    _legend_outside(fig, axes[0], "below", ncol=len(multi), fontsize=7)
    _save(fig, path)
    return True


def _seed_mean_curve(cell: Cell, key: str) -> tuple[list, np.ndarray]:
    """(epochs, per-epoch mean of `key` over the cell's seeds), up to the shortest curve."""
    n = min(len(r.curve) for r in cell.runs)
    return ([e["epoch"] for e in cell.runs[0].curve[:n]],
            np.mean([[e[key] for e in r.curve[:n]] for r in cell.runs], axis=0))


def plot_learning_curves(cells: list[Cell], path: str, title: str) -> bool:
    """Per epoch: training loss, train acc (of the epoch's batches) and clean / PGD accuracy
    on the test subset, mean over seeds, one line per cell; False without metrics.jsonl."""
    with_curves = [c for c in cells if all(r.curve for r in c.runs)]
    if not with_curves:
        return False
    plt = _pyplot()
    keys = (("train_loss", "training loss", True),
            ("train_acc", "train acc of the epoch's batches (%)", False),
            ("test_subset_acc", "test acc, subset (%)", False),
            ("adv_test_subset_acc", "PGD test acc, subset (%)", False))
    from matplotlib.colors import to_rgb
    from matplotlib.ticker import MaxNLocator

    shade, seen = {}, {}
    for cell in with_curves:  # the k-th cell of a method: its colour mixed with white
        k = seen[cell.method] = seen.get(cell.method, -1) + 1
        shade[id(cell)] = tuple(c + (1 - c) * min(0.6, 0.3 * k)
                                for c in to_rgb(_color(cell.method)))
    fig, axes = plt.subplots(1, 4, figsize=(19, 4.2))
    for ax, (key, name, log) in zip(axes, keys):
        for cell in with_curves:
            epochs, mean = _seed_mean_curve(cell, key)
            ax.plot(epochs, mean, color=shade[id(cell)], lw=1, ms=3,
                    marker="o" if len(epochs) <= 10 else None,
                    ls=("-" if cell.variant == "official" else "--") if cell.official_dropout
                    else ":",
                    label=f"{cell.label} {cell.variant}")
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(name, fontsize=9)
        if log:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
    fig.suptitle(f"Learning curves (mean over seeds; dashed: paper variant, dotted: another "
                 f"dropout than the arch's): {title}", fontsize=10)
    _legend_outside(fig, axes[-1], "right", fontsize=7)
    _save(fig, path)
    return True


def plot_gap_curves(cells: list[Cell], path: str, title: str) -> bool:
    """Where each method's gap opens: one panel per cell, per epoch, in eval mode on the fixed
    subsets of --train_curve_size and --curve_size, clean (blue) and PGD (red) accuracy on
    train (solid) and test (dashed), mean over seeds, the gap between them shaded and the
    learning-rate drops as vertical lines. False without those curves."""
    with_curves = [c for c in cells if all(r.curve and "train_subset_acc" in r.curve[0]
                                           for r in c.runs)]
    if not with_curves:
        return False
    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator

    ncols = min(4, len(with_curves))
    nrows = -(-len(with_curves) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.7 * ncols, 2.8 * nrows + 0.6),
                             sharex=True, sharey=True, squeeze=False)
    for ax, cell in zip(axes.flat, with_curves):
        gaps = []
        for train_key, test_key, color, name in (
                ("train_subset_acc", "test_subset_acc", "tab:blue", "clean"),
                ("adv_train_subset_acc", "adv_test_subset_acc", "tab:red", "PGD")):
            epochs, train = _seed_mean_curve(cell, train_key)
            test = _seed_mean_curve(cell, test_key)[1]
            ax.plot(epochs, train, color=color, lw=1, label=f"{name}, train")
            ax.plot(epochs, test, color=color, lw=1, ls="--", label=f"{name}, test")
            ax.fill_between(epochs, train, test, color=color, alpha=0.15, lw=0)
            gaps.append(train[-1] - test[-1])
        for epoch in cell.runs[0].config["train"].get("milestones") or ():
            ax.axvline(epoch, color="black", lw=0.6, alpha=0.3)
        seeds = len(cell.runs)
        ax.set_title(f"{cell.label} {cell.variant}, {seeds} seed{'s' * (seeds > 1)}\n"
                     f"last gaps: clean {gaps[0]:.1f}, PGD {gaps[1]:.1f}", fontsize=8)
        ax.grid(alpha=0.3)
    for i, ax in enumerate(axes.flat):
        if i >= len(with_curves):
            ax.set_visible(False)
        elif i + ncols >= len(with_curves):  # the lowest panel of its column
            ax.set_xlabel("epoch")
            ax.xaxis.set_tick_params(labelbottom=True)
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    for ax in axes[:, 0]:
        ax.set_ylabel("accuracy on the subset (%)", fontsize=8)
    fig.suptitle(f"Where the gaps open: train (solid) against test (dashed), clean and PGD, "
                 f"eval mode, mean over seeds: {title}", fontsize=10)
    _legend_outside(fig, axes[0, 0], "below", ncol=2 * min(ncols, 2), fontsize=7)
    _save(fig, path)
    return True


def write_report(runs: list[Run], outdir: str, title: str = "") -> list[str]:
    """Writes table.md, table.csv and the plots to `outdir`; returns the paths written."""
    if not runs:
        raise UserError(f"no results.json to report under {outdir}")
    cells = cells_of(runs)
    c = runs[0].config
    title = title or f"{c['data']['dataset']}, {c['model']['arch']}, eps {c['attack']['eps']:g}"
    paths = [os.path.join(outdir, n) for n in ("table.md", "table.csv",
                                                "lipschitz_vs_robustness.png", "gaps.png")]
    attacks = attack_table(cells)
    write_text_atomic(paths[0], f"## {title}\n\n" + markdown_table(cells) + (
        f"\nAdv test acc by attack (`--eval_attacks`):\n\n{attacks}" if attacks else ""))
    write_text_atomic(paths[1], csv_table(cells))
    plot_lipschitz_vs_robustness(cells, paths[2], title)
    plot_gaps(cells, paths[3], title)
    for name, plot in (("dropout.png", plot_dropout),
                       ("learning_curves.png", plot_learning_curves),
                       ("gap_curves.png", plot_gap_curves)):
        if plot(cells, os.path.join(outdir, name), title):
            paths.append(os.path.join(outdir, name))
    return paths

