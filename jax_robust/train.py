"""Training and evaluation: the TrainState, the one shared jitted step, evaluate(), and
`train_and_evaluate(config, workdir)`, the library entry the binaries call.

Data parallel: one `jax.sharding.Mesh` over all devices with a "data" axis; batches are
sharded on their first axis, parameters and optimizer state are replicated. The same jitted
step runs on 1 or N devices (and N hosts after `jax.distributed.initialize()`).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jax_robust import checkpoint as ckpt
from jax_robust import config as cfglib
from jax_robust import data as datalib
from jax_robust import models
from jax_robust.attacks import pgd_cross_entropy
from jax_robust.augment import OFFICIAL_AUGMENTATION, augment, center_crop
from jax_robust.errors import UserError
from jax_robust.files import write_json_atomic
from jax_robust.lipschitz import lipschitz_ratios
from jax_robust.objectives import OBJECTIVES, ObjectiveParams


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # int32 scalar: optimizer steps taken
    params: Any
    model_state: Any  # BatchNorm statistics ({} without BatchNorm)
    opt_state: Any


class TrainingDiverged(UserError):
    """The loss became NaN or infinite."""


class Interrupted(Exception):
    """Training was asked to stop (SIGTERM, Ctrl-C) after saving a checkpoint."""


# ----------------------------------------------------------------------------- schedules

# OFFICIAL_CODE.md 3.2. `summed_lr` is for the official SUMMED loss; our loss is the batch
# mean, so SGD's lr is summed_lr x batch size (Adam is scale-invariant: its lr is kept).
# digits is ours: the MNIST recipe (the two differ only in image size and set size).
_MNIST = dict(epochs=160, batch_size=64, optimizer="sgd", summed_lr=1e-4, momentum=0.9,
              milestones=(40, 80, 120, 140))
_WRN = dict(batch_size=64, optimizer="sgd", summed_lr=None, momentum=0.0)
OFFICIAL_SCHEDULES = {
    "digits": _MNIST,
    "mnist": _MNIST,
    "fashion_mnist": _MNIST,
    "cifar10": dict(_WRN, epochs=120, milestones=(40, 80, 100)),
    "svhn": dict(_WRN, epochs=60, milestones=(30, 50)),
    "restricted_imagenet": dict(epochs=70, batch_size=128, optimizer="adam", summed_lr=None,
                                lr=1e-2, momentum=0.0, milestones=(40, 60)),
}


@dataclasses.dataclass(frozen=True)
class Schedule:
    epochs: int
    batch_size: int
    optimizer: str
    lr: float  # for the batch-mean loss
    momentum: float
    milestones: tuple[int, ...]


def resolve_schedule(t: cfglib.TrainConfig, dataset: str) -> Schedule:
    """The run's schedule: flags where given, else the official one of `dataset`."""
    base = OFFICIAL_SCHEDULES.get(dataset, _MNIST)
    batch = t.batch_size or base["batch_size"]
    optimizer = t.optimizer or base["optimizer"]
    if t.lr is not None:
        lr = t.lr
    elif optimizer == "adam":
        lr = base.get("lr", 1e-3)
    else:
        summed = base["summed_lr"]
        if summed is None:  # WRN rule: 1e-3 for AT, RST and LLR, 1e-2 otherwise
            summed = 1e-3 if t.method in ("at", "rst", "llr") else 1e-2
        lr = summed * batch
    return Schedule(
        epochs=t.epochs or base["epochs"],
        batch_size=batch,
        optimizer=optimizer,
        lr=float(lr),
        momentum=base["momentum"] if t.momentum is None else t.momentum,
        milestones=tuple(t.milestones if t.milestones is not None else base["milestones"]),
    )


def make_optimizer(s: Schedule, steps_per_epoch: int) -> optax.GradientTransformation:
    """SGD (PyTorch semantics) or Adam with lr x 0.1 after each milestone epoch."""
    lr = optax.piecewise_constant_schedule(
        s.lr, {m * steps_per_epoch: 0.1 for m in s.milestones})
    if s.optimizer == "adam":
        return optax.adam(lr, b1=0.9, b2=0.999, eps=1e-8)
    return optax.sgd(lr, momentum=s.momentum or None)


# ----------------------------------------------------------------------------- sharding


def make_mesh(devices=None) -> Mesh:
    devices = jax.devices() if devices is None else devices
    return Mesh(np.asarray(devices), ("data",))


def shard_batch(mesh: Mesh, arrays: dict[str, np.ndarray]) -> dict[str, jax.Array]:
    """Host arrays (this process's rows of the global batch) -> arrays sharded on axis 0."""
    sharding = NamedSharding(mesh, P("data"))
    if jax.process_count() == 1:
        return jax.device_put(arrays, sharding)
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in arrays.items()}


def replicate(mesh: Mesh, tree):
    return jax.device_put(tree, NamedSharding(mesh, P()))


def epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
    """The shuffled order of the n training points in `epoch` (deterministic in seed, epoch)."""
    return np.random.default_rng((seed, epoch)).permutation(n)


def padded_batch(indices: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """(indices [size], mask [size]): a short batch is padded by repeating its own points."""
    mask = np.zeros(size, np.float32)
    mask[: len(indices)] = 1.0
    return np.resize(indices, size), mask


def local_rows(size: int) -> slice:
    """This process's rows of a global batch of `size`."""
    per = size // jax.process_count()
    return slice(jax.process_index() * per, (jax.process_index() + 1) * per)


def check_batch_size(batch_size: int, mesh: Mesh, what: str) -> None:
    if batch_size % mesh.size:
        raise UserError(f"{what} {batch_size} is not a multiple of the {mesh.size} devices")


# ----------------------------------------------------------------------------- the step


def make_train_step(objective: Callable, model_fn: models.ModelFn,
                    optimizer: optax.GradientTransformation, hp: ObjectiveParams,
                    mesh: Mesh, augmentation: str = "none",
                    image_hw: tuple[int, int] | None = None) -> Callable:
    """The one shared step: (state, batch, base_key) -> (state, metrics), jitted, pure.

    The step's key is fold_in(base_key, state.step), so no key is carried between steps.
    `augmentation` (augment.AUGMENTATIONS) runs on the device first, giving `image_hw`.
    """

    def step(state: TrainState, batch: dict, base_key: jax.Array):
        key = jax.random.fold_in(base_key, state.step)
        stored_hw = tuple(batch["x"].shape[1:3])
        if augmentation != "none" or (image_hw and stored_hw != tuple(image_hw)):
            aug_key, key = jax.random.split(key)
            batch = dict(batch, x=augment(batch["x"], aug_key, augmentation, image_hw))

        def loss_fn(params):
            return objective(model_fn, params, state.model_state, batch, key, hp)

        (_, (model_state, metrics)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state.params)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        finite = jnp.isfinite(metrics["loss"]) & jnp.all(jnp.asarray(
            [jnp.all(jnp.isfinite(p)) for p in jax.tree_util.tree_leaves(params)]))
        metrics = dict(metrics, step=state.step + 1, finite=finite)
        new_state = TrainState(step=state.step + 1, params=params, model_state=model_state,
                               opt_state=opt_state)
        return new_state, metrics

    replicated = NamedSharding(mesh, P())
    return jax.jit(step, donate_argnums=(0,), out_shardings=(replicated, replicated))


@jax.jit
def accumulate_metrics(acc: dict, metrics: dict) -> dict:
    """Running sums of loss x count, correct and count, and the first step (counted from 1,
    as checkpoints are) whose loss or updated parameters were not finite."""
    finite = metrics["finite"]
    first_bad = jnp.where((acc["first_bad"] < 0) & ~finite, metrics["step"], acc["first_bad"])
    return {
        "loss_sum": acc["loss_sum"] + jnp.where(finite, metrics["loss"], 0.0) * metrics["count"],
        "correct": acc["correct"] + metrics["correct"],
        "count": acc["count"] + metrics["count"],
        "first_bad": first_bad,
    }


def empty_metrics() -> dict:
    return {"loss_sum": jnp.float32(0), "correct": jnp.float32(0), "count": jnp.float32(0),
            "first_bad": jnp.int32(-1)}


# ----------------------------------------------------------------------------- evaluation


def make_eval_step(model_fn: models.ModelFn, *, eps: float, attack_steps: int,
                   attack_step_size: float, lip_steps: int, lip_step_size: float,
                   lip_restarts: int, mesh: Mesh,
                   image_hw: tuple[int, int] | None = None) -> Callable:
    """(params, model_state, batch, key, ascent) -> sums over the batch's real examples of:
    clean correct, PGD correct, lipschitz (descent) and, if `ascent`, lipschitz (ascent).
    Images larger than `image_hw` are centre-cropped to it."""

    def eval_step(params, model_state, batch, key, ascent: bool):
        x, y, mask = batch["x"], batch["y"], batch["mask"]
        if image_hw is not None:
            x = center_crop(x, tuple(image_hw))

        def logits_fn(z):
            return model_fn(params, model_state, z, False, None)[0]

        def apply_fn(_, z):
            return logits_fn(z)

        k_pgd, k_desc, k_asc = jax.random.split(key, 3)
        clean = jnp.argmax(logits_fn(x), -1) == y
        x_adv = pgd_cross_entropy(logits_fn, x, y, k_pgd, eps=eps, steps=attack_steps,
                                  step_size=attack_step_size)
        adv = jnp.argmax(logits_fn(x_adv), -1) == y
        lip_kw = dict(steps=lip_steps, step_size=lip_step_size)
        out = {
            "correct": jnp.sum(clean * mask),
            "adv_correct": jnp.sum(adv * mask),
            "lipschitz": jnp.sum(lipschitz_ratios(apply_fn, None, x, eps, k_desc,
                                                  direction="descent", **lip_kw) * mask),
            "count": jnp.sum(mask),
        }
        if ascent:
            out["lipschitz_ascent"] = jnp.sum(
                lipschitz_ratios(apply_fn, None, x, eps, k_asc, direction="ascent",
                                 restarts=lip_restarts, **lip_kw) * mask)
        return out

    replicated = NamedSharding(mesh, P())
    return jax.jit(eval_step, static_argnames=("ascent",), out_shardings=replicated)


def evaluate(eval_step: Callable, params, model_state, x: np.ndarray, y: np.ndarray,
             key: jax.Array, *, batch_size: int, mesh: Mesh, ascent: bool,
             log: Callable[[str], None] = print, name: str = "") -> dict:
    """Accuracy, PGD accuracy (percent) and mean lipschitz over ALL of (x, y), each point once."""
    n = len(x)
    check_batch_size(batch_size, mesh, "eval batch size")
    totals: dict[str, Any] = {}
    n_batches = math.ceil(n / batch_size)
    start = time.time()
    for b in range(n_batches):
        idx, mask = padded_batch(np.arange(b * batch_size, min(n, (b + 1) * batch_size)),
                                 batch_size)
        rows = local_rows(batch_size)
        batch = shard_batch(mesh, {"x": x[idx[rows]], "y": y[idx[rows]], "mask": mask[rows]})
        sums = eval_step(params, model_state, batch, jax.random.fold_in(key, b), ascent)
        totals = sums if not totals else jax.tree_util.tree_map(jnp.add, totals, sums)
        if n_batches > 8 and (b + 1) % math.ceil(n_batches / 4) == 0:
            rate = (b + 1) * batch_size / (time.time() - start)
            log(f"  eval {name} {b + 1}/{n_batches} batches, {rate:.0f} img/s, "
                f"ETA {(n_batches - b - 1) * batch_size / rate:.0f}s")
    totals = jax.device_get(totals)
    count = float(totals["count"])
    assert int(count) == n, (count, n)
    out = {
        "acc": 100.0 * float(totals["correct"]) / count,
        "adv_acc": 100.0 * float(totals["adv_correct"]) / count,
        "lipschitz": float(totals["lipschitz"]) / count,
    }
    if ascent:
        out["lipschitz_ascent"] = float(totals["lipschitz_ascent"]) / count
    return out


# ----------------------------------------------------------------------------- the run


def _fmt_time(seconds: float) -> str:
    seconds = int(max(0, seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


# Settings that make a different run: a checkpoint written with others is not resumed.
RUN_IDENTITY = ("data.dataset", "data.max_train", "data.max_test", "data.augment", "model.",
                "attack.", "train.method", "train.variant", "train.beta", "train.lam",
                "train.mu", "train.gr_h", "train.llr_steps", "train.seed")


def config_changes(saved: dict, current: dict, prefix: str = "") -> list[str]:
    """Dotted names of the settings that differ between two config dicts (JSON-compared)."""
    out = []
    for key in sorted(set(saved) | set(current)):
        a, b = saved.get(key), current.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += config_changes(a, b, f"{prefix}{key}.")
        elif json.loads(json.dumps(a)) != json.loads(json.dumps(b)):
            out.append(prefix + key)
    return out


def build_run(cfg: cfglib.RunConfig, dataset: datalib.Dataset):
    """(module, model_fn, hp, schedule) of the run; validates arch against the data."""
    m, t = cfg.model, cfg.train
    module = models.build_model(m.arch, dataset.info.num_classes, dataset.info.image_shape,
                                m.dropout, m.wrn_depth, m.wrn_width, m.dtype)
    eps, step_size = cfglib.resolve_eps(cfg, dataset.info.eps)
    hp = ObjectiveParams(
        eps=eps, step_size=step_size, steps=cfg.attack.steps,
        beta=cfglib.DEFAULT_BETA if t.beta is None else t.beta,
        lam=cfglib.DEFAULT_LAM.get(t.method, 1.0) if t.lam is None else t.lam,
        mu=cfglib.DEFAULT_MU if t.mu is None else t.mu,
        gr_h=t.gr_h, llr_steps=t.llr_steps, variant=t.variant,
    )
    return module, models.make_model_fn(module), hp, resolve_schedule(t, dataset.info.name)


def train_and_evaluate(cfg: cfglib.RunConfig, workdir: str, *,
                       log: Callable[[str], None] = print,
                       should_stop: Callable[[], bool] = lambda: False,
                       eval_only: bool = False, dataset: datalib.Dataset | None = None,
                       mesh: Mesh | None = None) -> dict:
    """Trains one configuration (resuming from `workdir` if it has checkpoints), evaluates it
    and writes `<workdir>/results.json`. Returns the results dict.

    `should_stop` is polled after every step: when true, a checkpoint is saved and
    `Interrupted` raised. `dataset` and `mesh` (default: all devices) override the config's.
    """
    cfglib.validate(cfg)
    if dataset is None:
        dataset = datalib.load_dataset(cfg.data.dataset, cfg.data.data_dir,
                                       cfg.data.max_train, cfg.data.max_test)
    module, model_fn, hp, sched = build_run(cfg, dataset)
    mesh = make_mesh() if mesh is None else mesh
    check_batch_size(sched.batch_size, mesh, "batch size")
    n_train = len(dataset.x_train)
    steps_per_epoch = math.ceil(n_train / sched.batch_size)
    total_steps = sched.epochs * steps_per_epoch
    optimizer = make_optimizer(sched, steps_per_epoch)
    root_key = jax.random.key(cfg.train.seed)
    init_key, train_key, eval_key = jax.random.split(root_key, 3)

    augmentation = cfg.data.augment or OFFICIAL_AUGMENTATION.get(dataset.info.name, "none")
    image_hw = tuple(dataset.info.image_shape[:2])
    params, model_state = models.init_model(module, init_key, dataset.info.image_shape)
    state = replicate(mesh, TrainState(step=jnp.int32(0), params=params,
                                       model_state=model_state,
                                       opt_state=optimizer.init(params)))
    manager = ckpt.open_manager(os.path.join(workdir, "checkpoints"), cfg.keep_checkpoints)
    abstract = jax.tree_util.tree_map(
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), state)
    restored = ckpt.restore_latest(manager, abstract, warn=log)
    if restored is not None:
        state, meta, ck_step = restored
        log(f"resumed from checkpoint {ck_step} (epoch {meta.get('epoch')}, "
            f"step {int(state.step)}/{total_steps})")
        changed = config_changes(meta.get("config", {}), cfg.to_dict())
        different_run = [c for c in changed if c.startswith(RUN_IDENTITY)]
        if different_run:
            raise UserError(f"{workdir} holds a run with other {', '.join(different_run)}; "
                            f"use another --workdir")
        if changed:
            log(f"warning: the checkpoint was written with other settings of "
                f"{', '.join(changed)}; continuing with the new ones")
    elif eval_only:
        raise UserError(f"--eval_only: no checkpoint in {workdir}/checkpoints")
    log(f"{cfg.train.method} ({cfg.train.variant}) on {dataset.info.name}: "
        f"{n_train} train / {len(dataset.x_test)} test, arch {cfg.model.arch} "
        f"({models.count_params(params):,} params), eps {hp.eps}, {sched.epochs} epochs x "
        f"{steps_per_epoch} steps, batch {sched.batch_size}, {sched.optimizer} lr {sched.lr:g}, "
        f"{mesh.size} x {jax.devices()[0].device_kind}")

    train_seconds = float(restored[1].get("train_seconds", 0.0)) if restored else 0.0
    if not eval_only:
        step_fn = make_train_step(OBJECTIVES[cfg.train.method], model_fn, optimizer, hp, mesh,
                                  augmentation, image_hw)
        train_seconds = _train_loop(
            cfg, dataset, state, step_fn, manager, train_key, mesh, sched,
            steps_per_epoch, total_steps, log, should_stop, train_seconds)
        state = ckpt.restore_latest(manager, abstract, warn=log)[0]

    start = time.time()
    eval_step = make_eval_step(
        model_fn, eps=hp.eps, attack_steps=cfg.attack.steps, attack_step_size=hp.step_size,
        lip_steps=cfg.eval.lipschitz_steps, lip_step_size=cfg.eval.lipschitz_step_size,
        lip_restarts=cfg.eval.lipschitz_restarts, mesh=mesh, image_hw=image_hw)
    ev = dict(batch_size=cfg.eval.batch_size, mesh=mesh, log=log)
    test = evaluate(eval_step, state.params, state.model_state, dataset.x_test,
                    dataset.y_test, jax.random.fold_in(eval_key, 0), ascent=True,
                    name="test", **ev)
    train = evaluate(eval_step, state.params, state.model_state, dataset.x_train,
                     dataset.y_train, jax.random.fold_in(eval_key, 1), ascent=False,
                     name="train", **ev)
    eval_seconds = time.time() - start
    results = {
        "method": cfg.train.method,
        "dataset": dataset.info.name,
        "arch": cfg.model.arch,
        "variant": cfg.train.variant,
        "train_acc": train["acc"],
        "test_acc": test["acc"],
        "adv_train_acc": train["adv_acc"],
        "adv_test_acc": test["adv_acc"],
        "train_lipschitz": train["lipschitz"],
        "test_lipschitz": test["lipschitz"],
        "test_lipschitz_ascent": test["lipschitz_ascent"],
        "gap": train["acc"] - test["acc"],
        "adv_gap": train["adv_acc"] - test["adv_acc"],
        "eps": hp.eps,
        "augmentation": augmentation,
        "objective": dataclasses.asdict(hp),
        "schedule": dataclasses.asdict(sched),
        "steps": int(state.step),
        "train_seconds": train_seconds,
        "eval_seconds": eval_seconds,
        "num_devices": mesh.size,
        "num_processes": jax.process_count(),
        "device_kind": jax.devices()[0].device_kind,
        "jax_version": jax.__version__,
        "num_params": models.count_params(state.params),
        "config": cfg.to_dict(),
    }
    if jax.process_index() == 0:
        write_json_atomic(os.path.join(workdir, "results.json"), results)
    return results


def _train_loop(cfg, dataset, state, step_fn, manager, train_key, mesh, sched,
                steps_per_epoch, total_steps, log, should_stop, prior_seconds) -> float:
    """Runs the steps from state.step to total_steps, checkpointing; returns the seconds
    spent training, including `prior_seconds` of earlier (interrupted) processes."""
    x_train, y_train = dataset.x_train, dataset.y_train
    rows = local_rows(sched.batch_size)
    step = int(state.step)
    acc = empty_metrics()
    start = last_log = time.time()
    first_step, last_log_step = step, step

    @functools.lru_cache(maxsize=2)
    def order_of(epoch):
        return epoch_order(len(x_train), cfg.train.seed, epoch)

    def host_batch(step):
        """This process's rows of batch `step`, gathered on the host (a background thread)."""
        epoch, i = divmod(step, steps_per_epoch)
        idx, mask = padded_batch(
            order_of(epoch)[i * sched.batch_size:(i + 1) * sched.batch_size], sched.batch_size)
        idx, mask = idx[rows], mask[rows]
        return {"x": x_train[idx], "y": y_train[idx], "mask": mask}

    def checkpoint_if_finite(state, step, epoch):
        bad = int(acc["first_bad"])
        if bad >= 0:
            raise TrainingDiverged(
                f"the loss or the parameters became non-finite at step {bad} "
                f"(epoch {(bad - 1) // steps_per_epoch + 1}); the last good checkpoint "
                f"(step {manager.latest_step()}) is kept; lower --lr")
        ckpt.save(manager, step, state, {
            "epoch": epoch, "step": step, "config": cfg.to_dict(),
            "train_seconds": prior_seconds + time.time() - start})

    prefetch = ThreadPoolExecutor(1)
    pending = prefetch.submit(host_batch, step)
    try:
        while step < total_steps:
            epoch, i = divmod(step, steps_per_epoch)
            batch = shard_batch(mesh, pending.result())
            if step + 1 < total_steps:  # gather the next batch while the device works
                pending = prefetch.submit(host_batch, step + 1)
            state, metrics = step_fn(state, batch, train_key)
            acc = accumulate_metrics(acc, metrics)
            step += 1
            end_of_epoch = i == steps_per_epoch - 1
            if end_of_epoch or step % cfg.log_every == 0 or step == total_steps:
                acc = jax.device_get(acc)
                now = time.time()
                rate = (step - last_log_step) * sched.batch_size / max(now - last_log, 1e-9)
                eta = (total_steps - step) * (now - start) / max(step - first_step, 1)
                if int(acc["first_bad"]) < 0:
                    log(f"epoch {epoch + 1}/{sched.epochs} step {step}/{total_steps} "
                        f"loss {acc['loss_sum'] / max(acc['count'], 1):.4f} "
                        f"acc {100 * acc['correct'] / max(acc['count'], 1):.2f}% "
                        f"{rate:.0f} img/s ETA {_fmt_time(eta)}")
                    if end_of_epoch:
                        acc = {**empty_metrics(), "first_bad": acc["first_bad"]}
                last_log, last_log_step = now, step
            stop = should_stop()
            if stop or end_of_epoch or step % cfg.checkpoint_every == 0 or step == total_steps:
                checkpoint_if_finite(state, step, epoch + int(end_of_epoch))
            if stop:
                raise Interrupted(f"stopped at step {step}; checkpoint saved, rerun to resume")
    finally:
        prefetch.shutdown(wait=True, cancel_futures=True)
    return prior_seconds + time.time() - start
