"""Seconds from SIGTERM to exit in each long phase of the binaries, against the phase's unit of
work (one training step, one evaluation batch, one attack batch, one separation call).

    python benchmarks/sigterm_latency.py                       # every phase, CNN1, Fashion-MNIST
    python benchmarks/sigterm_latency.py --phases=train --archs=cnn1,wrn --wrn_depth=10 --wrn_width=2
    python benchmarks/sigterm_latency.py --phases=eval,apgd --max_test=2560

Phases (each a fresh process; the signal comes --delay seconds after the named progress line):
  train       experiments/run.py (AT, a line every 50 steps), --after seconds past its first
              progress line; unit: one step (from the run's img/s). The loop keeps at most two
              steps in flight and saves a checkpoint before it exits.
  eval        the final evaluation of run.py (clean, PGD, both lipschitz estimates on the test
              set), after its second progress line; unit: one evaluation batch (the time
              between the two lines per batch). One batch is in flight at a time.
  apgd        run.py --eval_attacks=pgd,apgd, after the second APGD progress line; unit: one
              APGD-100 batch (likewise). One batch in flight.
  separation  experiments/separation.py on --sep_points training and test points, after the
              first Train-Train progress line; unit: one jitted call (of 20).
Prints one line and a RESULT json line per measurement: exit code, seconds to exit, the unit's
seconds and the line the process printed on stderr.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_list("phases", ["train", "eval", "apgd", "separation"], "phases to measure")
flags.DEFINE_list("archs", ["cnn1"], "architectures of the train phase (wrn: WRN-depth-width)")
flags.DEFINE_integer("wrn_depth", 16, "WideResNet depth")
flags.DEFINE_integer("wrn_width", 4, "WideResNet widen factor")
flags.DEFINE_string("dataset", "fashion_mnist", "data set")
flags.DEFINE_float("after", 20.0, "train phase: seconds of training after the first progress "
                   "line")
flags.DEFINE_integer("batch_size", 64, "training batch size")
flags.DEFINE_integer("eval_batch_size", 256, "evaluation batch size (eval and apgd phases)")
flags.DEFINE_integer("max_test", 2560, "test points of the eval and apgd phases")
flags.DEFINE_bool("attack_unroll", True, "eval and apgd phases: unroll the attack loops (the "
                  "CPU default; off compiles much faster)")
flags.DEFINE_integer("sep_points", 30000, "separation phase: training and test points")
flags.DEFINE_float("delay", 0.5, "seconds between the progress line and the signal: the "
                   "process has then started the next unit, so a stop waits for a whole one "
                   "(the worst case)")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def signal_after(cmd: list[str], needle, stream: str = "stdout") -> dict:
    """Starts `cmd`, sends SIGTERM once `needle(line)` is true for a line of `stream`, and
    times the exit. Returns the exit code, the seconds, the needle's line and stderr."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=ROOT)
    trigger = None
    for line in getattr(proc, stream):
        if needle(line):
            trigger = line
            break
    time.sleep(FLAGS.delay)
    sent = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate()
    return {"exit_code": proc.returncode, "seconds_to_exit": round(time.monotonic() - sent, 2),
            "trigger": (trigger or "").strip(), "stderr": err.strip()[-400:], "stdout": out}


def run_cmd(workdir: str, *extra: str) -> list[str]:
    return [sys.executable, os.path.join(ROOT, "experiments", "run.py"), "--method=at",
            f"--dataset={FLAGS.dataset}", f"--workdir={workdir}", *extra]


def measure_train(arch: str) -> dict:
    workdir = tempfile.mkdtemp(prefix=f"sigterm_train_{arch}_")
    extra = [f"--batch_size={FLAGS.batch_size}", "--log_every=50", f"--arch={arch}"]
    if arch == "wrn":
        extra += [f"--wrn_depth={FLAGS.wrn_depth}", f"--wrn_width={FLAGS.wrn_width}"]
    state = {"start": None, "rate": None}

    def needle(line):
        found = re.search(r"(\d+) img/s", line)
        if found:
            state["rate"] = float(found.group(1))
            state["start"] = state["start"] or time.time()
        return bool(state["start"]) and time.time() - state["start"] > FLAGS.after

    r = signal_after(run_cmd(workdir, *extra), needle)
    saved = re.search(r"stopped at step (\d+); checkpoint saved", r["stderr"])
    r.update(phase=f"train ({arch})", checkpoint_step=int(saved.group(1)) if saved else None,
             unit="step", unit_seconds=round(FLAGS.batch_size / state["rate"], 3)
             if state["rate"] else None)
    return r


def eval_args() -> list[str]:
    return ["--max_train=256", "--epochs=1", f"--max_test={FLAGS.max_test}",
            f"--eval_batch_size={FLAGS.eval_batch_size}", "--train_eval_size=256",
            "--attack_unroll" if FLAGS.attack_unroll else "--noattack_unroll"]


def second_progress_line(pattern: str):
    """A needle true at the second line matching `pattern` (a regex with the batch number as
    its group 1); `.unit()` is then the seconds per batch between the two lines (no compile)."""
    seen = []

    def needle(line):
        found = re.search(pattern, line)
        if found:
            seen.append((time.monotonic(), int(found.group(1))))
        return len(seen) == 2

    needle.unit = lambda: (round((seen[1][0] - seen[0][0]) / (seen[1][1] - seen[0][1]), 2)
                           if len(seen) == 2 else None)
    return needle


def measure_eval() -> dict:
    workdir = tempfile.mkdtemp(prefix="sigterm_eval_")
    needle = second_progress_line(r"eval test (\d+)/")
    r = signal_after(run_cmd(workdir, *eval_args()), needle)
    r.update(phase="final evaluation", unit="eval batch", unit_seconds=needle.unit())
    return r


def measure_apgd() -> dict:
    workdir = tempfile.mkdtemp(prefix="sigterm_apgd_")
    needle = second_progress_line(r"apgd \(100 steps\): (\d+)/")
    r = signal_after(run_cmd(workdir, *eval_args(), "--eval_attacks=pgd,apgd"), needle)
    r.update(phase="APGD-100 attack", unit="attack batch", unit_seconds=needle.unit())
    return r


def measure_separation() -> dict:
    workdir = tempfile.mkdtemp(prefix="sigterm_sep_")
    cmd = [sys.executable, "-m", "jax_robust.cli.separation", f"--dataset={FLAGS.dataset}",
           f"--max_points={FLAGS.sep_points}", f"--workdir={workdir}"]
    start = time.monotonic()
    r = signal_after(cmd, lambda line: "train-train: tiles" in line, stream="stderr")
    done = re.search(r"tiles (\d+)/(\d+).*elapsed (\d+) s", r["trigger"])
    # Progress after the first of 20 calls: its elapsed time is one call (compile included).
    r.update(phase="separation scan", unit="jitted call (first, with its compile)",
             unit_seconds=float(done.group(3)) if done else None,
             seconds_in=round(time.monotonic() - start, 1))
    return r


def main(argv):
    del argv
    jobs = []
    for phase in FLAGS.phases:
        if phase == "train":
            jobs += [lambda a=a: measure_train(a) for a in FLAGS.archs]
        elif phase in ("eval", "apgd", "separation"):
            jobs.append(globals()[f"measure_{phase}"])
        else:
            raise app.UsageError(f"unknown phase {phase!r}")
    for job in jobs:
        r = job()
        r.pop("stdout")
        print(f"{r['phase']}: SIGTERM -> exit {r['seconds_to_exit']} s (exit code "
              f"{r['exit_code']}); one {r['unit']} ~{r['unit_seconds']} s; it said: "
              f"{r['stderr'].splitlines()[-1] if r['stderr'] else ''}", flush=True)
        print("RESULT " + json.dumps(r), flush=True)


if __name__ == "__main__":
    app.run(main)
