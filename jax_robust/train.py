"""`train_and_evaluate(config, workdir)`: the library entry the binaries call.

It resolves the config once (recipes.resolve), builds the model, objective and step, trains
(resuming from the newest good checkpoint in `workdir`), appends one line per epoch to
`<workdir>/metrics.jsonl`, evaluates the trained state and writes `<workdir>/results.json`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import time
from typing import Any, Callable

import chex
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from jax_robust import checkpoint as ckpt
from jax_robust import config as cfglib
from jax_robust import data as datalib
from jax_robust import methods, models, recipes
from jax_robust.errors import CheckpointError, Interrupted, UserError  # noqa: F401  (Interrupted re-exported)
from jax_robust.evaluation import evaluate, make_eval_step
from jax_robust.files import exclusive_dir, write_json_atomic, write_text_atomic
from jax_robust.objectives import ObjectiveParams
from jax_robust.autoattack import autoattack
from jax_robust.robustness import evaluate_robustness
from jax_robust.pipeline import TrainBatches, check_batch_size, make_mesh, replicate, shard_batch
from jax_robust.schedules import learning_rate, make_optimizer
from jax_robust.step import TrainState, accumulate_metrics, empty_metrics, make_train_step


# What results.json keeps of an AutoAttack evaluation (jax_robust.autoattack.autoattack).
AUTOATTACK_RECORD = ("robust_acc", "clean_acc", "robust_acc_after", "n", "version", "attacks",
                     "eps", "seed", "key", "seconds", "warnings")


def robustbench_json(results: dict, name: str) -> dict:
    """A RobustBench-style summary of results.json's AutoAttack evaluation `name`."""
    aa = results[name]
    return {"clean_acc": aa["clean_acc"], "autoattack_acc": aa["robust_acc"],
            "eps": aa["eps"], "n_examples": aa["n"], "version": aa["version"],
            "seed": results["config"]["train"]["seed"], "key": aa["key"],
            "key_from": "fold_in(split(key(seed), 3)[2], 6), the run's evaluation stream",
            "attacks": aa["attacks"],
            "robust_acc_after": aa["robust_acc_after"], "config": results["config"],
            "step": results["steps"], "finished": results["finished"]}


class TrainingDiverged(UserError):
    """The loss became NaN or infinite."""


class OtherRun(UserError):
    """The workdir holds checkpoints of a run with other settings."""


def check_same_run(manager, cfg: cfglib.RunConfig, workdir: str, *,
                   eval_only: bool = False) -> None:
    """Raises OtherRun, before anything in `workdir` is restored, moved or written, when its
    newest checkpoint with readable metadata was made by a run with other identity settings
    (config.RUN; with `eval_only`, other attack settings are allowed: the evaluation then
    writes results_eps<..>.json). Damaged checkpoints are left to restore_latest."""
    try:
        meta = ckpt.newest_meta(manager)
    except CheckpointError:
        return
    saved = meta.get("config")
    changed = (cfglib.run_identity_changes(saved, cfg.to_dict())
               if isinstance(saved, dict) else ["config (missing)"])
    if eval_only:
        changed = [c for c in changed if not c.startswith("attack.")]
    if changed:
        def show(config, name):
            node = config
            for k in name.split("."):
                node = node.get(k) if isinstance(node, dict) else None
            return node

        detail = ", ".join(f"{c} {show(saved, c)!r} (now {show(cfg.to_dict(), c)!r})"
                           if isinstance(saved, dict) else c for c in changed)
        raise OtherRun(f"{workdir} holds a run with other settings: {detail}; use another "
                       f"--workdir (nothing in it was changed)")


def objective_params(cfg: cfglib.RunConfig) -> ObjectiveParams:
    """The objective's view of a resolved config."""
    return ObjectiveParams(eps=cfg.attack.eps, step_size=cfg.attack.step_size,
                           steps=cfg.attack.steps, variant=cfg.train.variant,
                           hparams=cfg.train.hparams, unroll=cfg.speed.attack_unroll)


def onednn_missing(backend: str, devices: int = 1, conv_kernels: str | None = None
                   ) -> str | None:
    """Why oneDNN's convolutions cannot run on `backend` here, or None when they can. The
    handler is built (jax_robust.onednn, on first use) only where a run could choose it:
    XLA:CPU, one device, conv_kernels not 'xla'."""
    if backend != "cpu":
        return f"they run on XLA:CPU only, not on {backend}"
    if devices > 1:
        return f"they run on one CPU device; this run has {devices}"
    if conv_kernels == "xla":
        return "conv_kernels=xla was chosen"
    from jax_robust import onednn

    return None if onednn.available() else onednn.unavailable_reason()


def build_model(cfg: cfglib.RunConfig, info: datalib.DatasetInfo):
    """The Flax module of a resolved config for data of `info`."""
    m = cfg.model
    return models.build_model(m.arch, info.num_classes, info.image_shape, dropout=m.dropout,
                              wrn_depth=m.wrn_depth, wrn_width=m.wrn_width, dtype=m.dtype,
                              speed=cfg.speed, pool_ties=m.pool_ties)


def initial_state(module, key: jax.Array, image_shape, optimizer, mesh: Mesh):
    """(state, abstract): the freshly initialised TrainState replicated over `mesh`, and its
    shapes/dtypes/shardings as `jax.ShapeDtypeStruct`s (what a checkpoint restores into)."""
    params, model_state = models.init_model(module, key, image_shape)
    state = replicate(mesh, TrainState(step=jnp.int32(0), params=params,
                                       model_state=model_state,
                                       opt_state=optimizer.init(params)))
    abstract = jax.tree_util.tree_map(
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), state)
    return state, abstract


def inference_apply(model_fn: models.ModelFn) -> Callable:
    """(variables {"params", "model_state"}, x [B, H, W, C]) -> logits [B, K], eval mode."""

    def apply_fn(variables, x):
        return model_fn(variables["params"], variables["model_state"], x, False, None)[0]

    return apply_fn


def eval_subset(n: int, size: int | None) -> np.ndarray:
    """Indices of the `size` training points evaluated (all if size is None or >= n): a
    fixed, seed-independent random subset, in increasing order."""
    if size is None or size >= n:
        return np.arange(n)
    return np.sort(np.random.default_rng(0).permutation(n)[:size])


def _fmt_time(seconds: float) -> str:
    seconds = int(max(0, seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


@dataclasses.dataclass
class _Loop:
    """What the training loop needs besides the state."""

    cfg: cfglib.RunConfig
    dataset: datalib.Dataset
    mesh: Mesh
    step_fn: Callable
    curve: Callable[[TrainState], dict]  # clean / PGD accuracy on the test subset
    manager: Any
    key: jax.Array
    steps_per_epoch: int
    total_steps: int
    metrics_path: str
    log: Callable[[str], None]
    should_stop: Callable[[], bool]
    best_manager: Any = None  # checkpoints_best/ (--holdout): the best epoch's state


def training_steps(cfg: cfglib.RunConfig, n_loaded: int) -> tuple[int, int]:
    """(steps per epoch, total steps) of a resolved config on a training set of `n_loaded`
    points as loaded (before --holdout takes its points)."""
    steps_per_epoch = math.ceil((n_loaded - cfg.data.holdout) / cfg.train.batch_size)
    return steps_per_epoch, cfg.train.epochs * steps_per_epoch


def best_holdout(manager) -> float:
    """The held-out PGD accuracy of the best checkpoint in `manager` (-inf: none yet)."""
    if manager is None:
        return -math.inf
    try:
        return float(ckpt.newest_meta(manager)["adv_holdout_acc"])
    except (CheckpointError, KeyError, TypeError, ValueError):
        return -math.inf


def _epoch_lines(path: str, keep_through_epoch: int) -> list[str]:
    """The lines of metrics.jsonl of epochs <= keep_through_epoch (a resumed run redoes the
    rest); a line that is not JSON ends the file (a torn last write)."""
    lines = []
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                try:
                    entry = json.loads(line)
                except ValueError:
                    break
                if isinstance(entry, dict) and entry.get("epoch", 0) <= keep_through_epoch:
                    lines.append(json.dumps(entry))
    return lines


def _train_loop(loop: _Loop, state: TrainState, prior_seconds: float, done_epochs: int,
                epoch_sums: dict | None = None) -> tuple[TrainState, float]:
    """Runs the steps from state.step to the end, checkpointing and logging; returns the
    trained state and the seconds spent training (with `prior_seconds` of earlier processes,
    without the per-epoch curve evaluation). `epoch_sums`: the running loss / accuracy sums
    of the epoch a mid-epoch checkpoint was taken in (so its metrics.jsonl line counts every
    step of the epoch, before and after the resume)."""
    cfg, spe, total = loop.cfg, loop.steps_per_epoch, loop.total_steps
    batch_size = cfg.train.batch_size
    lr_at = learning_rate(cfg.train, spe)
    primary = jax.process_index() == 0
    lines = _epoch_lines(loop.metrics_path, done_epochs)
    if primary:
        write_text_atomic(loop.metrics_path, "".join(line + "\n" for line in lines))
    step = int(state.step)
    acc = empty_metrics()
    if epoch_sums:
        acc = {**acc, **{k: jnp.float32(epoch_sums[k]) for k in ("loss_sum", "correct", "count")}}
    start = last_log = time.time()
    first_step, last_log_step = step, step
    curve_seconds = 0.0

    def seconds_so_far():
        return prior_seconds + time.time() - start - curve_seconds

    def checkpoint_if_finite(state, step, epoch):
        bad = int(acc["first_bad"])
        if bad >= 0:
            kept = loop.manager.latest_step()
            raise TrainingDiverged(
                f"the loss or the parameters became non-finite at step {bad} "
                f"(epoch {(bad - 1) // spe + 1}); " + (
                    "no checkpoint was saved before it" if kept is None else
                    f"the last good checkpoint (step {kept}) is kept") + "; lower --lr")
        ckpt.save(loop.manager, step, state, {
            "epoch": epoch, "step": step, "config": cfg.to_dict(),
            "data_info": dataclasses.asdict(loop.dataset.info),
            "epoch_sums": {k: float(v) for k, v in jax.device_get(acc).items()
                           if k != "first_bad"},
            "train_seconds": seconds_so_far()})

    best = {"adv_holdout_acc": best_holdout(loop.best_manager)}

    def save_if_best(state, epoch, holdout):
        """Saves `state` as the best checkpoint when its PGD accuracy on the held-out points
        beats every earlier epoch's (ties keep the earlier)."""
        if holdout["adv_holdout_acc"] > best["adv_holdout_acc"]:
            best["adv_holdout_acc"] = holdout["adv_holdout_acc"]
            ckpt.save(loop.best_manager, int(state.step), state, {
                "epoch": epoch, "step": int(state.step), "config": cfg.to_dict(),
                "data_info": dataclasses.asdict(loop.dataset.info), **holdout})

    def append_epoch_line(state, epoch, sums):
        nonlocal curve_seconds
        t0 = time.time()
        curve = loop.curve(state)
        curve_seconds += time.time() - t0
        entry = {"epoch": epoch, "step": int(state.step), "lr": float(lr_at(int(state.step) - 1)),
                 "train_loss": float(sums["loss_sum"] / max(sums["count"], 1)),
                 "train_acc": 100 * float(sums["correct"] / max(sums["count"], 1)),
                 "test_subset_acc": curve["acc"], "adv_test_subset_acc": curve["adv_acc"],
                 "test_subset_size": curve["count"], **curve.get("train", {}),
                 **curve.get("holdout", {}), "seconds": seconds_so_far()}
        if "holdout" in curve:
            save_if_best(state, epoch, curve["holdout"])
        lines.append(json.dumps(entry))
        if primary:
            write_text_atomic(loop.metrics_path, "".join(line + "\n" for line in lines))

    previous = None
    with TrainBatches(loop.dataset.x_train, loop.dataset.y_train, batch_size, spe,
                      cfg.train.seed, loop.mesh) as batches:
        while step < total:
            epoch, i = divmod(step, spe)
            batch = shard_batch(loop.mesh, batches.get(step, prefetch_next=step + 1 < total))
            state, metrics = loop.step_fn(state, batch, loop.key)
            # At most two steps in flight: a stop request then waits for one step, not for
            # every step the host has dispatched ahead (SIGTERM latency, docs/design.md).
            if previous is not None:
                previous.block_until_ready()
            previous = metrics["step"]
            acc = accumulate_metrics(acc, metrics)
            step += 1
            end_of_epoch = i == spe - 1
            if end_of_epoch or step % cfg.log_every == 0 or step == total:
                acc = jax.device_get(acc)
                now = time.time()
                rate = (step - last_log_step) * batch_size / max(now - last_log, 1e-9)
                eta = (total - step) * (now - start) / max(step - first_step, 1)
                if int(acc["first_bad"]) < 0:
                    loop.log(f"epoch {epoch + 1}/{cfg.train.epochs} step {step}/{total} "
                             f"loss {acc['loss_sum'] / max(acc['count'], 1):.4f} "
                             f"acc {100 * acc['correct'] / max(acc['count'], 1):.2f}% "
                             f"{rate:.0f} img/s ETA {_fmt_time(eta)}")
                    if end_of_epoch:
                        append_epoch_line(state, epoch + 1, acc)
                        acc = {**empty_metrics(), "first_bad": acc["first_bad"]}
                last_log, last_log_step = time.time(), step
            stop = loop.should_stop()
            if stop or end_of_epoch or step % cfg.checkpoint_every == 0 or step == total:
                checkpoint_if_finite(state, step, epoch + int(end_of_epoch))
            if stop:
                raise Interrupted(f"stopped at step {step}; checkpoint saved, rerun to resume")
    return state, seconds_so_far()


def train_and_evaluate(cfg: cfglib.RunConfig, workdir: str, *,
                       log: Callable[[str], None] = print,
                       should_stop: Callable[[], bool] = lambda: False,
                       eval_only: bool = False, dataset: datalib.Dataset | None = None,
                       mesh: Mesh | None = None) -> dict:
    """Trains one configuration (resuming from `workdir` if it has checkpoints), evaluates it
    and writes `<workdir>/results.json`. Returns the results dict.

    `cfg` may leave settings None (the official ones are filled in by recipes.resolve).
    `should_stop` is polled after every step: when true, a checkpoint is saved and
    `Interrupted` raised. `dataset` and `mesh` (default: all devices) override the config's.
    A second run in the same `workdir` while this one runs is refused (UserError): two
    writers would interleave one directory's checkpoints. (Over several processes the lock
    is process 0's; the others write checkpoint shards only with it.)
    """
    lock = (exclusive_dir(workdir) if jax.process_index() == 0
            else contextlib.nullcontext())
    with lock:
        return _train_and_evaluate(cfg, workdir, log=log, should_stop=should_stop,
                                   eval_only=eval_only, dataset=dataset, mesh=mesh)


def _train_and_evaluate(cfg: cfglib.RunConfig, workdir: str, *, log, should_stop, eval_only,
                        dataset, mesh) -> dict:
    mesh = make_mesh() if mesh is None else mesh
    backend = jax.default_backend()
    missing = onednn_missing(backend, mesh.size, cfg.speed.conv_kernels)
    if backend == "cpu" and missing and cfg.speed.conv_kernels is None and mesh.size == 1:
        log(f"note: oneDNN's convolutions are unavailable ({missing}); XLA's run instead")
    cfg = recipes.resolve(cfg, backend, devices=mesh.size, onednn_missing=missing)
    chex.clear_trace_counter()  # each step below may be traced once in this run
    t = cfg.train
    check_batch_size(t.batch_size, mesh.size, "batch size")
    check_batch_size(cfg.eval.batch_size, mesh.size, "eval batch size")
    if dataset is None:
        dataset = datalib.load_dataset(cfg.data.dataset, cfg.data.data_dir,
                                       cfg.data.max_train, cfg.data.max_test)
    dataset, (x_holdout, y_holdout) = datalib.split_holdout(dataset, cfg.data.holdout)
    info = dataset.info
    module = build_model(cfg, info)
    model_fn = models.make_model_fn(module)
    hp = objective_params(cfg)
    n_train = len(dataset.x_train)
    steps_per_epoch, total_steps = training_steps(cfg, n_train + cfg.data.holdout)
    optimizer = make_optimizer(t, steps_per_epoch)
    init_key, train_key, eval_key = jax.random.split(jax.random.key(t.seed), 3)
    image_hw = tuple(info.image_shape[:2])

    state, abstract = initial_state(module, init_key, info.image_shape, optimizer, mesh)
    manager = ckpt.open_manager(os.path.join(workdir, "checkpoints"), cfg.keep_checkpoints)
    check_same_run(manager, cfg, workdir, eval_only=eval_only)
    best_manager = (ckpt.open_manager(os.path.join(workdir, "checkpoints_best"), 1)
                    if cfg.data.holdout else None)
    restored = ckpt.restore_latest(manager, abstract, warn=log)
    meta = {}
    if restored is not None:
        state, meta, ck_step = restored
        log(f"resumed from checkpoint {ck_step} (epoch {meta.get('epoch')}, "
            f"step {int(state.step)}/{total_steps})")
        changed = cfglib.config_changes(meta.get("config", {}), cfg.to_dict(),
                                        kinds=(cfglib.EVAL,))
        if changed and not eval_only:
            log(f"note: the checkpoint was written with other evaluation settings "
                f"({', '.join(changed)}); the new ones are used")
        if eval_only and int(state.step) < total_steps:
            log(f"note: evaluating an unfinished run (step {int(state.step)} of "
                f"{total_steps}); results.json says finished: false")
    elif eval_only:
        raise UserError(f"--eval_only: no checkpoint in {workdir}/checkpoints")
    log(f"{t.method} ({t.variant}) on {info.name}: {n_train} train / {len(dataset.x_test)} "
        f"test, arch {cfg.model.arch} ({models.count_params(state.params):,} params), eps "
        f"{hp.eps}, {t.epochs} epochs x {steps_per_epoch} steps, batch {t.batch_size}, "
        f"{t.optimizer} lr {t.lr:g}, {mesh.size} x {jax.devices()[0].device_kind}")

    e = cfg.eval

    def eval_step(**kw):
        return make_eval_step(model_fn, eps=hp.eps, attack_steps=cfg.attack.steps,
                              attack_step_size=hp.step_size, lip_steps=e.lipschitz_steps,
                              lip_step_size=e.lipschitz_step_size,
                              lip_restarts=e.lipschitz_restarts, unroll=hp.unroll, mesh=mesh,
                              image_hw=image_hw, max_traces=1, **kw)

    ev = dict(batch_size=e.batch_size, mesh=mesh, log=log, should_stop=should_stop)
    train_seconds = float(meta.get("train_seconds", 0.0))
    if not eval_only:
        step_fn = make_train_step(methods.get(t.method).objective, model_fn, optimizer, hp,
                                  mesh, cfg.data.augment, image_hw, max_traces=1)
        curve_step = eval_step(lipschitz=False)
        n_curve = min(e.curve_size, len(dataset.x_test))
        train_curve = eval_subset(n_train, e.train_curve_size)

        def curve(s):
            out = evaluate(curve_step, s.params, s.model_state,
                           datalib.take(dataset.x_test, np.arange(n_curve)),
                           dataset.y_test[:n_curve], jax.random.fold_in(eval_key, 2),
                           log=lambda _: None, batch_size=e.batch_size, mesh=mesh)
            if x_holdout is not None:  # the best checkpoint's criterion (--holdout)
                r = evaluate(curve_step, s.params, s.model_state, x_holdout, y_holdout,
                             jax.random.fold_in(eval_key, 5), log=lambda _: None,
                             batch_size=e.batch_size, mesh=mesh)
                out["holdout"] = {"holdout_acc": r["acc"], "adv_holdout_acc": r["adv_acc"]}
            if len(train_curve):  # eval mode on a fixed training subset: where gaps open
                r = evaluate(curve_step, s.params, s.model_state,
                             datalib.take(dataset.x_train, train_curve),
                             dataset.y_train[train_curve], jax.random.fold_in(eval_key, 4),
                             log=lambda _: None, batch_size=e.batch_size, mesh=mesh)
                out["train"] = {"train_subset_acc": r["acc"], "adv_train_subset_acc":
                                r["adv_acc"], "train_subset_size": r["count"]}
            return out

        loop = _Loop(cfg, dataset, mesh, step_fn, curve, manager, train_key, steps_per_epoch,
                     total_steps, os.path.join(workdir, "metrics.jsonl"), log, should_stop,
                     best_manager)
        mid_epoch = int(state.step) % steps_per_epoch != 0
        state, train_seconds = _train_loop(loop, state, train_seconds,
                                           int(meta.get("epoch", 0)),
                                           meta.get("epoch_sums") if mid_epoch else None)

    test_step, train_step = eval_step(ascent=True), eval_step()  # compiled once each

    def evaluate_state(state) -> tuple[dict, dict]:
        """(the paper's row and the extra attacks' keys, example counts) of `state`."""
        test = evaluate(test_step, state.params, state.model_state,
                        dataset.x_test, dataset.y_test, jax.random.fold_in(eval_key, 0),
                        name="test", **ev)
        subset = eval_subset(n_train, e.train_eval_size)
        train = evaluate(train_step, state.params, state.model_state,
                         datalib.take(dataset.x_train, subset), dataset.y_train[subset],
                         jax.random.fold_in(eval_key, 1), name="train", **ev)
        row = {"train_acc": train["acc"], "test_acc": test["acc"],
               "adv_train_acc": train["adv_acc"], "adv_test_acc": test["adv_acc"],
               "train_lipschitz": train["lipschitz"], "test_lipschitz": test["lipschitz"],
               "test_lipschitz_ascent": test["lipschitz_ascent"],
               "gap": train["acc"] - test["acc"], "adv_gap": train["adv_acc"] - test["adv_acc"]}
        if cfg.eval.attacks != ("pgd",):
            variables = {"params": state.params, "model_state": state.model_state}
            n_attack = min(e.attack_size or len(dataset.x_test), len(dataset.x_test))
            x_attack = datalib.take(dataset.x_test, np.arange(n_attack))
            classic = tuple(a for a in e.attacks if a not in cfglib.AUTOATTACK_VERSIONS)
            robust = evaluate_robustness(
                inference_apply(model_fn), variables, x_attack,
                dataset.y_test[:n_attack], hp.eps, attacks=classic or ("pgd",),
                key=jax.random.fold_in(eval_key, 3), batch_size=e.batch_size,
                restarts=e.attack_restarts, log=log, mesh=mesh, unroll=hp.unroll,
                should_stop=should_stop)
            row.update({f"adv_test_acc_{a}": robust[f"acc_{a}"] for a in classic})
            row.update(attack_examples=n_attack, adv_test_acc_worst=robust["acc_worst"],
                       zero_grad_fraction=robust["zero_grad_fraction"],
                       adv_test_acc_pgd_eps_x2=robust["acc_pgd_eps_x2"],
                       adv_test_acc_pgd_steps_x5=robust["acc_pgd_steps_x5"],
                       masking_warnings=robust["masking_warnings"])
            for warning in robust["masking_warnings"]:
                log(f"warning: {warning}")
            worst = robust["robust_mask"]
            for name, version in cfglib.AUTOATTACK_VERSIONS.items():
                if name not in e.attacks:
                    continue
                out = autoattack(inference_apply(model_fn), variables, x_attack,
                                 dataset.y_test[:n_attack], hp.eps, version,
                                 key=jax.random.fold_in(eval_key, 6), batch_size=e.batch_size,
                                 mesh=mesh, log=log, should_stop=should_stop)
                row[f"adv_test_acc_{name}"] = out["robust_acc"]
                row[name] = {k: out[k] for k in AUTOATTACK_RECORD}
                worst = worst & out["robust_flags"]
            row["adv_test_acc_worst"] = 100.0 * float(np.mean(worst))
        return row, {"train": train["count"], "test": test["count"]}

    start = time.time()
    row, examples = evaluate_state(state)
    extra = {}
    if best_manager is not None:  # --holdout: the best epoch's checkpoint, evaluated alike
        restored = ckpt.restore_latest(best_manager, abstract, warn=log)
        if restored is not None:
            best_state, best_meta, _ = restored
            log(f"the best checkpoint (epoch {best_meta.get('epoch')}, held-out PGD accuracy "
                f"{best_meta.get('adv_holdout_acc'):.2f}%):")
            best_row, _ = evaluate_state(best_state)
            extra["best"] = {"selected_by": "adv_holdout_acc", "step": int(best_state.step),
                             **{k: best_meta.get(k) for k in ("epoch", "holdout_acc",
                                                              "adv_holdout_acc")}, **best_row}
        extra["holdout_examples"] = len(y_holdout)
    results = {
        **row,  # the last step's model (with --holdout, "best" holds the best epoch's)
        **extra,
        "examples": examples,
        "steps": int(state.step),
        "total_steps": total_steps,
        "finished": int(state.step) == total_steps,
        "train_seconds": train_seconds,
        "eval_seconds": time.time() - start,
        "num_params": models.count_params(state.params),
        "num_devices": mesh.size,
        "num_processes": jax.process_count(),
        "device_kind": jax.devices()[0].device_kind,
        "jax_version": jax.__version__,
        "config": cfg.to_dict(),
    }
    name = "results.json"
    trained = meta.get("config", {}).get("attack")
    if eval_only and trained and trained != results["config"]["attack"]:
        # Another attack than the training's: the run's own results.json stays as it is.
        a = cfg.attack
        name = f"results_eps{a.eps:g}_steps{a.steps}_step{a.step_size:g}.json"
        results["trained_with_attack"] = trained
    if jax.process_index() == 0:
        write_json_atomic(os.path.join(workdir, name), results)
        for aa in cfglib.AUTOATTACK_VERSIONS:  # RobustBench-style, beside results.json
            if aa in results:
                write_json_atomic(os.path.join(workdir, f"{name[:-5]}_{aa}.json"),
                                  robustbench_json(results, aa))
    return results


@dataclasses.dataclass(frozen=True)
class LoadedRun:
    """A trained model of a run directory, ready for evaluation in a notebook."""

    apply_fn: Callable  # (variables, x [B, H, W, C] in [0, 1]) -> logits [B, K], eval mode
    variables: dict  # {"params": ..., "model_state": ...} (BatchNorm statistics, {} if none)
    config: cfglib.RunConfig  # the run's resolved configuration
    info: datalib.DatasetInfo  # what the model was trained on (classes, image shape)
    step: int  # optimizer steps of the checkpoint


def load_run(workdir: str, *, log: Callable[[str], None] = print) -> LoadedRun:
    """The model of the newest good checkpoint in `workdir` (a run of train_and_evaluate):
    its inference `apply_fn`, `variables` and the run's config. A damaged checkpoint is
    moved aside and the next older one used (checkpoint.restore_latest)."""
    directory = os.path.join(os.path.expanduser(workdir), "checkpoints")
    if not os.path.isdir(directory):
        raise UserError(f"{workdir} holds no checkpoints")
    manager = ckpt.open_manager(directory, keep=1 << 30)
    meta = ckpt.newest_meta(manager)
    cfg = cfglib.from_dict(meta["config"])
    # How to compute is this machine's choice (one device): the run's own speed options where
    # they can run here, the defaults for the rest (older checkpoints lack some).
    backend = jax.default_backend()
    missing = onednn_missing(backend, 1, cfg.speed.conv_kernels)
    speed = cfg.speed
    if speed.conv_kernels == "onednn" and missing is not None:
        speed = dataclasses.replace(speed, conv_kernels=None, conv_pool=None)
    cfg = dataclasses.replace(cfg, speed=recipes.resolve_speed(speed, backend, 1, missing))
    if "data_info" in meta:
        info = datalib.DatasetInfo(**{**meta["data_info"],
                                      "image_shape": tuple(meta["data_info"]["image_shape"])})
    else:  # checkpoints of earlier versions: read the data set's description off the data
        info = datalib.load_dataset(cfg.data.dataset, cfg.data.data_dir, cfg.data.max_train,
                                    cfg.data.max_test).info
    module = build_model(cfg, info)
    _, abstract = initial_state(module, jax.random.key(0), info.image_shape,
                                make_optimizer(cfg.train, 1), make_mesh(jax.devices()[:1]))
    restored = ckpt.restore_latest(manager, abstract, warn=log)
    if restored is None:
        raise UserError(f"{workdir} holds no checkpoints")
    state, _, step = restored
    return LoadedRun(inference_apply(models.make_model_fn(module)),
                     {"params": state.params, "model_state": state.model_state}, cfg, info,
                     step)
