"""A grid of runs over methods, variants, dropout rates and seeds -> the paper's tables, plots.

    python experiments/sweep.py --workdir=runs/digits --seeds=3       # the paper's 10 rows
    python experiments/sweep.py --variants=official,paper --dataset=fashion_mnist --epochs=4 \\
        --milestones=2,3 --workdir=runs/fmnist

Each cell runs in <workdir>/<row>-<variant>[-drop<rate>]-seed<k>. A finished cell (its
results.json made with the requested configuration) is not re-run, an interrupted one resumes
from its checkpoints; a cell whose results or checkpoints were made with other settings is
refused (naming them) unless --overwrite. A finished cell without the requested attack
table (--eval_attacks) has its checkpoint evaluated again (or, with none left, is refused unless
--overwrite retrains it). SIGTERM or Ctrl-C: the running cell saves a
checkpoint and the sweep exits with code 130; run it again to continue. At the end
experiments/report.py's tables and plots are written to the workdir.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import sys
import time

from absl import flags

from jax_robust.cli import common as cli
from jax_robust.cli import config_flags
from jax_robust import config as cfglib
from jax_robust import methods, recipes
from jax_robust.errors import UserError
from jax_robust.files import ensure_writable_dir

FLAGS = flags.FLAGS
# The paper's ten rows: (method, hyperparameters); a row's name is its method tag.
PAPER_ROWS = (("natural", {}), ("gr", {}), ("llr", {}), ("at", {}), ("rst", {"lam": 0.5}),
              ("rst", {"lam": 1.0}), ("rst", {"lam": 2.0}), ("trades", {"beta": 1.0}),
              ("trades", {"beta": 3.0}), ("trades", {"beta": 6.0}))
flags.DEFINE_list("rows", None, "rows to run: the paper's row names (natural, gr, llr, at, "
                  "rst0.5, rst1, rst2, trades1, trades3, trades6) or any method's name "
                  "(its default weights); default: the paper's ten")
flags.DEFINE_list("variants", ["official"], "official and/or paper")
flags.DEFINE_list("dropouts", [""], "dropout rates to cross with the rows ('' = the arch's)")
flags.DEFINE_string("seeds", "1", "N (seeds 0..N-1) or a list, e.g. 0,3,7")
# Every other setting is run.py's flag, with its default: a sweep takes every run flag.
GRID_SETTINGS = ("train.method", "train.variant", "train.hparams", "train.seed",
                 "model.dropout")
config_flags.define_config_flags(exclude=GRID_SETTINGS)
flags.DEFINE_string("workdir", "runs/sweep", "root of the runs and the report")
flags.DEFINE_bool("overwrite", False, "re-run cells made with other settings (deletes them)")
cli.define_process_flags()


def parse_seeds(text: str) -> tuple[int, ...]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UserError(f"--seeds must be a count or a list of integers, got {text!r}") from None
    if len(values) == 1 and "," not in text:
        values = list(range(values[0]))
    if not values or min(values) < 0 or len(set(values)) != len(values):
        raise UserError(f"--seeds must give distinct non-negative seeds, got {text!r}")
    return tuple(values)


def row_specs(names: list[str] | None) -> list[tuple[str, dict]]:
    """(method, hyperparameters) of each requested row."""
    paper = {methods.get(m).format_tag(dict(methods.get(m).resolve_hparams(hp))): (m, hp)
             for m, hp in PAPER_ROWS}
    if names is None:
        return list(paper.values())
    out = []
    for name in names:
        if name in paper:
            out.append(paper[name])
        elif name in methods.METHODS:
            out.append((name, {}))
        else:
            raise UserError(f"unknown row {name!r}; choose from {', '.join(paper)} or a "
                            f"method ({', '.join(methods.METHODS)})")
    if not out:
        raise UserError("--rows is empty")
    return out


def parse_dropouts(values: list[str]) -> list[float | None]:
    out = []
    for v in values or [""]:
        try:
            out.append(None if v == "" else float(v))
        except ValueError:
            raise UserError(f"--dropouts must be rates in [0, 1) or '', got {v!r}") from None
    return out


def base_config() -> cfglib.RunConfig:
    return config_flags.config_from_flags(exclude=GRID_SETTINGS)


def grid(base: cfglib.RunConfig) -> list[tuple[str, cfglib.RunConfig]]:
    """(cell name, resolved config) of every cell, validated before anything runs."""
    cells = []
    for dropout in parse_dropouts(FLAGS.dropouts):
        for method, hp in row_specs(FLAGS.rows):
            for variant in FLAGS.variants:
                for seed in parse_seeds(FLAGS.seeds):
                    cfg = dataclasses.replace(
                        base, model=dataclasses.replace(base.model, dropout=dropout),
                        train=dataclasses.replace(base.train, method=method, variant=variant,
                                                  hparams=tuple(sorted(hp.items())),
                                                  seed=seed))
                    # Resolved for the cell's name and identity; the speed options are
                    # left for each run to resolve on its own devices.
                    cfg = dataclasses.replace(recipes.resolve(cfg, "cpu"), speed=cfg.speed)
                    tag = methods.get(method).format_tag(dict(cfg.train.hparams))
                    name = (f"{tag}-{variant}" + (f"-drop{dropout:g}" if dropout is not None
                                                  else "") + f"-seed{seed}")
                    cells.append((name, cfg))
    return cells


def saved_config(workdir: str) -> tuple[dict | None, str]:
    """(config, source) of what `workdir` holds: its results.json's config, else its newest
    readable checkpoint's; (None, '') for an empty cell. A results.json that cannot be read
    gives ({}, 'results.json (unreadable)')."""
    results = os.path.join(workdir, "results.json")
    if os.path.exists(results):
        try:
            with open(results) as f:
                saved = json.load(f)["config"]
            if not isinstance(saved, dict):
                raise TypeError
            return saved, "results.json"
        except (OSError, ValueError, KeyError, TypeError):
            return {}, "results.json (unreadable)"
    if os.path.isdir(os.path.join(workdir, "checkpoints")):
        from jax_robust import checkpoint as ckpt
        from jax_robust.errors import CheckpointError

        try:
            meta = ckpt.newest_meta(os.path.join(workdir, "checkpoints"))
        except CheckpointError:
            return None, ""  # damaged or empty: the run itself quarantines and restarts
        return meta.get("config", {}), "checkpoints"
    return None, ""


def stale_settings(workdir: str, cfg: cfglib.RunConfig) -> list[str]:
    """The settings of `workdir`'s results.json (or, before it exists, its newest checkpoint)
    that make it another cell than `cfg`: those of the run's identity and, for results, of
    its evaluation (config.RUN, config.EVAL; the speed options and the like aside)."""
    saved, source = saved_config(workdir)
    if saved is None:
        return []
    if source == "results.json (unreadable)":
        return [source]
    kinds = (cfglib.RUN, cfglib.EVAL) if source == "results.json" else (cfglib.RUN,)
    return cfglib.config_changes(saved, cfg.to_dict(), kinds=kinds)


def attack_table_missing(workdir: str, cfg: cfglib.RunConfig) -> list[str]:
    """The requested attack table (--eval_attacks beyond the paper's PGD, with their test points
    and restarts) as far as `workdir`'s results.json lacks it: those settings are not a cell's
    identity, so a finished cell gets them by an evaluation of its checkpoint."""
    e = cfg.eval
    if tuple(e.attacks) == ("pgd",):
        return []  # no table asked for
    saved, source = saved_config(workdir)
    if source != "results.json":
        return []
    done = saved.get("eval") if isinstance(saved.get("eval"), dict) else {}
    return ([f"--eval_attacks={a}" for a in e.attacks if a not in (done.get("attacks") or ())]
            + [f"--eval_{n}={getattr(e, n)}" for n in ("attack_size", "attack_restarts")
               if done.get(n, getattr(e, n)) != getattr(e, n)])


def cell_finished(workdir: str, total_steps: int) -> bool:
    """Whether `workdir`'s results.json holds the evaluation of the run's final step."""
    try:
        with open(os.path.join(workdir, "results.json")) as f:
            results = json.load(f)
        return results.get("finished", True) is True and results["steps"] == total_steps
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False


def main(argv):
    if len(argv) > 1:
        raise UserError(f"unexpected arguments {argv[1:]}")
    cells = grid(base_config())
    names = [n for n, _ in cells]
    if len(set(names)) != len(names):
        raise UserError("the grid names a cell twice; remove repeated --rows/--variants")
    root = os.path.expanduser(FLAGS.workdir)
    stale = {name: stale_settings(os.path.join(root, name), cfg) for name, cfg in cells}
    for name, settings in stale.items():
        if settings and not FLAGS.overwrite:
            raise UserError(f"{os.path.join(root, name)} holds a run made with other "
                            f"settings ({', '.join(settings)}); use another --workdir or "
                            f"--overwrite (nothing was changed)")
    ensure_writable_dir(root)
    cli.join_processes()

    from jax_robust import data as datalib
    from jax_robust import distributed, report, train

    primary = distributed.is_primary()
    base = cells[0][1].data
    dataset = datalib.load_dataset(base.dataset, base.data_dir, base.max_train, base.max_test)
    todo, evaluate = [], set()  # cells to train (or resume), and finished ones to evaluate
    for n, c in cells:
        workdir = os.path.join(root, n)
        if stale[n] or not cell_finished(workdir, train.training_steps(
                c, len(dataset.y_train))[1]):
            todo.append((n, c))
        elif missing := attack_table_missing(workdir, c):
            if os.path.isdir(os.path.join(workdir, "checkpoints")):
                evaluate.add(n)
            elif not FLAGS.overwrite:
                raise UserError(f"{workdir} is finished without {', '.join(missing)} and "
                                f"keeps no checkpoint to evaluate; --overwrite retrains it "
                                f"(nothing was changed)")
            else:
                stale[n] = missing  # retrained from scratch below
            todo.append((n, c))
    distributed.barrier("jax_robust-sweep-start")  # every process has read the same state
    cli.say(f"sweep: {len(cells)} cells, {len(cells) - len(todo)} done, {len(todo)} to run")
    start, finished = time.time(), 0
    should_stop = cli.stop_requests()  # SIGTERM / Ctrl-C: the running cell saves a checkpoint
    for i, (name, cfg) in enumerate(todo):
        workdir = os.path.join(root, name)
        if stale[name] and primary:  # refused above unless --overwrite
            shutil.rmtree(workdir)
        distributed.barrier(f"jax_robust-sweep-cell-{i}")
        elapsed = time.time() - start
        eta = (f", ETA {elapsed / finished * (len(todo) - i) / 60:.0f} min" if finished else "")
        cli.say(f"[{len(cells) - len(todo) + i + 1}/{len(cells)}] {name}: "
                f"{len(cells) - len(todo) + i} done, 1 running, {len(todo) - i - 1} left{eta}")

        def run_cell():
            train.train_and_evaluate(cfg, workdir, dataset=dataset, should_stop=should_stop,
                                     log=lambda m: cli.say("  " + m),
                                     eval_only=name in evaluate)

        try:
            if should_stop():  # a stop between two cells: the next one does not start
                raise train.Interrupted("stopped before this cell started")
            run_cell()
        except train.Interrupted as e:
            if primary:
                print(f"{name}: {e}; rerun the sweep to continue", file=sys.stderr)
            sys.exit(130)
        except train.OtherRun:
            if not FLAGS.overwrite:
                raise
            if primary:
                shutil.rmtree(workdir)  # checkpoints of other settings, no results yet
            distributed.barrier(f"jax_robust-sweep-cleared-{i}")
            run_cell()
        finished += 1
    if not primary:
        return
    runs = report.load_runs(root)
    wanted = {os.path.join(root, n, "results.json") for n in names}
    runs = [r for r in runs if r.path in wanted]
    written = report.write_report(runs, root)
    with open(written[0]) as f:
        print(f.read())
    print("wrote " + ", ".join(written), file=sys.stderr)


def entry() -> None:
    cli.run_main(main)


if __name__ == "__main__":
    entry()
