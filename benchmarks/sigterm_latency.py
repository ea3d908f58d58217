"""Seconds from SIGTERM to a saved checkpoint and exit, for a real training run.

    python benchmarks/sigterm_latency.py                      # CNN1 and WRN-16-4, Fashion-MNIST
    python benchmarks/sigterm_latency.py --archs=wrn --wrn_depth=10 --wrn_width=2
    python benchmarks/sigterm_latency.py --archs=cnn1 --after=30

Starts `experiments/run.py` (AT, normal logging: a line every 50 steps), waits --after
seconds past its first progress line, sends SIGTERM, and measures the time until the process
exits with its checkpoint saved. Also prints one step's time from the run's own log (img/s),
the yardstick of the bound: the loop keeps at most two steps in flight, so the save waits
for at most about two steps plus the save itself. Prints a RESULT json line per arch.
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
flags.DEFINE_list("archs", ["cnn1", "wrn"], "architectures (wrn: WRN-depth-width)")
flags.DEFINE_integer("wrn_depth", 16, "WideResNet depth")
flags.DEFINE_integer("wrn_width", 4, "WideResNet widen factor")
flags.DEFINE_string("dataset", "fashion_mnist", "data set")
flags.DEFINE_float("after", 20.0, "seconds of training after the first progress line")
flags.DEFINE_integer("batch_size", 64, "batch size")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def measure(arch: str) -> dict:
    workdir = tempfile.mkdtemp(prefix=f"sigterm_{arch}_")
    cmd = [sys.executable, os.path.join(ROOT, "experiments", "run.py"), "--method=at",
           f"--dataset={FLAGS.dataset}", f"--batch_size={FLAGS.batch_size}", "--log_every=50",
           f"--workdir={workdir}", f"--arch={arch}"]
    if arch == "wrn":
        cmd += [f"--wrn_depth={FLAGS.wrn_depth}", f"--wrn_width={FLAGS.wrn_width}"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    rate = None
    start = None
    for line in proc.stdout:
        found = re.search(r"(\d+) img/s", line)
        if found:
            rate = float(found.group(1))
            start = start or time.time()
        if start and time.time() - start > FLAGS.after:
            break
    sent = time.time()
    proc.send_signal(signal.SIGTERM)
    out = proc.stdout.read()
    code = proc.wait()
    seconds = time.time() - sent
    saved = re.search(r"stopped at step (\d+); checkpoint saved", out)
    step_seconds = FLAGS.batch_size / rate if rate else None
    return {"arch": arch, "exit_code": code, "seconds_to_exit": round(seconds, 2),
            "checkpoint_step": int(saved.group(1)) if saved else None,
            "step_seconds": round(step_seconds, 3) if step_seconds else None}


def main(argv):
    del argv
    for arch in FLAGS.archs:
        r = measure(arch)
        print(f"{arch}: SIGTERM -> exit {r['seconds_to_exit']} s (exit code {r['exit_code']}, "
              f"checkpoint at step {r['checkpoint_step']}); one step ~{r['step_seconds']} s")
        print("RESULT " + json.dumps(r), flush=True)


if __name__ == "__main__":
    app.run(main)
