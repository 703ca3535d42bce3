"""One writer per run directory: a second process on a live workdir exits 2 naming the
holder and writes nothing; a crashed holder leaves no stale lock."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from bn_research import cli, rundir

ROOT = Path(__file__).resolve().parents[1]
ARGS = ["--config=configs/mlp.py:norm=batch,width=16", "--config.train.num_steps=400000",
        "--config.train.log_every=100", "--config.train.eval_every=1000", "--config.train.checkpoint_every=500"]


def _steps(workdir):
    """Steps of the complete rows so far (the holder may be mid-write of the last one)."""
    path = workdir / "metrics.jsonl"
    text = path.read_text() if path.exists() else ""
    return [json.loads(line)["step"] for line in text[: text.rfind("\n") + 1].splitlines()]


def test_second_writer_is_refused_and_crash_leaves_no_stale_lock(tmp_path, capsys):
    workdir = tmp_path / "run"
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    holder = subprocess.Popen([sys.executable, "-m", "bn_research", "train", f"--workdir={workdir}", *ARGS],
                              cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 240
        while not _steps(workdir):  # the holder is training
            assert holder.poll() is None, holder.stderr.read()
            assert time.time() < deadline, "the first run wrote no metrics in time"
            time.sleep(0.05)
        before = (workdir / "config.json").read_bytes()
        code = cli.main(["bn-research", "train", f"--workdir={workdir}", *ARGS])
        err = capsys.readouterr().err
        assert code == 2, err
        assert err.count("\n") == 1 and f"is in use by pid {holder.pid}" in err, err
        assert (workdir / "config.json").read_bytes() == before
        holder.send_signal(signal.SIGKILL)  # a crash: the kernel drops the lock with the process
        holder.wait(timeout=60)
    finally:
        if holder.poll() is None:
            holder.kill()
    steps = _steps(workdir)
    assert steps == sorted(set(steps)) and steps[-1] < 400000  # every logged step once
    with rundir.WorkdirLock(workdir):  # no stale lock after the crash
        pass


def test_lock_is_released_for_the_next_run_in_the_same_process(tmp_path):
    with rundir.WorkdirLock(tmp_path / "w"):
        pass
    with rundir.WorkdirLock(tmp_path / "w"):  # would raise if the first were still held
        pass
