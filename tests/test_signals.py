"""Stopping and failing runs say what happened: SIGTERM during XLA compilation stops the
process without waiting for the compiler; a divergence names the step, the loss and the
limit."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from bn_research import cli

ROOT = Path(__file__).resolve().parents[1]


def test_divergence_names_step_loss_and_limit(tmp_path, capsys):
    code = cli.main(["bn-research", "train", f"--workdir={tmp_path / 'run'}", "--config=configs/mlp.py:width=8",
                     "--config.train.max_loss=0.5", "--config.train.num_steps=20", "--config.train.log_every=10",
                     "--config.train.eval_every=10"])
    out = capsys.readouterr().out
    assert code == 1
    assert "diverged at step 1" in out and "the training loss was 2." in out and "above train.max_loss=0.5" in out, out
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["diverged_at"] == 1 and summary["max_loss"] == 0.5 and summary["diverged_loss"] > 0.5


def test_sigterm_during_compilation_stops_at_once(tmp_path):
    """A depth-60 unrolled MLP compiles for a long time; SIGTERM sent as compilation starts
    ends the process with 143 and an `interrupted` summary marked `during compile`."""
    workdir = tmp_path / "run"
    cache = ("JAX_COMPILATION_CACHE_DIR", "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS")
    env = {k: v for k, v in os.environ.items() if k not in cache}  # the compiler must really run
    env["TF_CPP_MIN_LOG_LEVEL"] = "3"
    p = subprocess.Popen([sys.executable, "-m", "bn_research", "train", f"--workdir={workdir}",
                          "--config=configs/mlp.py:depth=60,width=16", "--config.train.num_steps=100"],
                         cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        for line in p.stderr:  # progress lines go to stderr when it is not a terminal
            if ": compile (" in line:
                break
        else:
            raise AssertionError(f"no compile line; rc {p.wait()}")
        time.sleep(0.5)
        p.send_signal(signal.SIGTERM)
        out, err = p.communicate(timeout=120)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 143, err
    summary = json.loads((workdir / "summary.json").read_text())
    assert summary["status"] == "interrupted" and summary["interrupted_during"] == "compile"
    assert summary["signal"] == "SIGTERM" and summary["step"] == 0
    assert "during compile, by SIGTERM" in out
