"""Reliability: SIGKILL / SIGTERM / SIGINT and resume, divergence, corrupted run files.

The kill tests run `python -m bn_research train` in subprocesses and compare the
interrupted-and-resumed run with one never interrupted: metrics.jsonl byte for byte,
the summary's final metrics and the per-unit probe arrays exactly (CPU is deterministic).
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import types
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from bn_research import checkpoint, cli, loop, rundir, runs, train
from tests.conftest import load_config, tiny

ROOT = Path(__file__).resolve().parents[1]
# 1200 steps in chunks of 20 (gcd of log 40, eval 200, checkpoint 100); noisy batch norm
# (per-step noise keys), momentum (optimizer state) and the default probes (probe state).
# Checkpoints at multiples of 100 fall inside logging windows (log every 40).
LONG = ["--config=configs/mlp.py:norm=noisy_batch,width=32", "--config.optimizer.name=momentum",
        "--config.optimizer.learning_rate=0.1", "--config.train.num_steps=1200",
        "--config.train.log_every=40", "--config.train.eval_every=200",
        "--config.train.checkpoint_every=100", "--config.train.keep_checkpoints=2"]


def start(workdir, *extra):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    return subprocess.Popen([sys.executable, "-m", "bn_research", "train", f"--workdir={workdir}", *LONG, *extra],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(p, timeout=240):
    out, err = p.communicate(timeout=timeout)
    return p.returncode, out, err


def wait_for(p, condition, timeout=120):
    """Poll until `condition()` holds; fail if the process ends first."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if condition():
            return
        if p.poll() is not None:
            raise AssertionError(f"run ended (rc {p.returncode}) before the kill point: {p.stderr.read()}")
        time.sleep(0.002)
    raise AssertionError("kill point not reached")


def checkpoint_steps(workdir):
    d = Path(workdir) / "checkpoints"
    return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit()) if d.is_dir() else []


def metric_steps(workdir):
    path = Path(workdir) / "metrics.jsonl"
    if not path.exists():
        return []
    steps = []
    for line in path.read_text().splitlines():
        try:
            steps.append(json.loads(line)["step"])
        except ValueError:
            pass
    return steps


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("reference")
    rc, out, err = finish(start(workdir))
    assert rc == 0, err
    return workdir


def assert_same_run(resumed, ref):
    assert (resumed / "metrics.jsonl").read_bytes() == (ref / "metrics.jsonl").read_bytes()
    a, b = rundir.read_summary(resumed), rundir.read_summary(ref)
    assert a["status"] == b["status"] == "completed" and a["step"] == b["step"] == 1200
    assert a["final"] == b["final"]
    la, lb = runs.load(resumed).layer_stats, runs.load(ref).layer_stats
    assert len(la) > 0
    pd.testing.assert_frame_equal(la, lb, check_exact=True)
    events = EventAccumulator(str(resumed))  # the resume's SessionLog.START drops the killed session's tail
    events.Reload()
    steps = [e.step for e in events.Scalars("train/loss")]
    assert steps == list(range(40, 1201, 40))
    ref_loss = {r["step"]: r["train/loss"] for r in map(json.loads, (ref / "metrics.jsonl").read_text().splitlines())
                if "train/loss" in r}
    assert [e.value for e in events.Scalars("train/loss")] == [np.float32(ref_loss[s]) for s in steps]


def test_sigkill_at_several_points_then_resume_is_bitwise(tmp_path, reference):
    workdir = tmp_path / "run"
    kills = [
        lambda: checkpoint_steps(workdir),  # as soon as the first checkpoint appears (later ones may be in flight)
        lambda: any(s > 700 for s in metric_steps(workdir)),  # mid-window, after later checkpoints
    ]
    for condition in kills:
        p = start(workdir)
        wait_for(p, condition)
        p.send_signal(signal.SIGKILL)
        p.wait()
        assert not (workdir / "summary.json").exists()
    assert max(checkpoint_steps(workdir)) >= 600
    rc, out, err = finish(start(workdir))
    assert rc == 0, err
    assert "resuming" in err and "completed at step 1200" in out
    assert_same_run(workdir, reference)
    summary = rundir.read_summary(workdir)
    assert len(summary["resumed_at"]) == 2 and summary["resumed_at"][-1] >= 600
    assert summary["wall_time_s"] > 0 and summary["steps_per_s"] > 0
    assert len(checkpoint_steps(workdir)) <= 2  # keep_checkpoints
    # Running the finished command again changes nothing.
    before = (workdir / "metrics.jsonl").read_bytes()
    rc, out, err = finish(start(workdir))
    assert rc == 0 and "already holds a completed run" in err
    assert (workdir / "metrics.jsonl").read_bytes() == before


def test_sigterm_checkpoints_marks_interrupted_and_resumes(tmp_path, reference):
    workdir = tmp_path / "run"
    p = start(workdir)
    wait_for(p, lambda: any(s >= 300 for s in metric_steps(workdir)))
    p.send_signal(signal.SIGTERM)
    rc, out, err = finish(p)
    assert rc == 143, err
    assert "run the same command again to resume" in out and "Traceback" not in err
    summary = rundir.read_summary(workdir)
    assert summary["status"] == "interrupted" and summary["signal"] == "SIGTERM"
    stopped = summary["step"]
    assert stopped % 20 == 0 and stopped in checkpoint_steps(workdir)  # saved at the chunk boundary
    assert max(metric_steps(workdir)) <= stopped
    rc, out, err = finish(start(workdir))
    assert rc == 0, err
    assert f"resuming {workdir} from step {stopped}" in err
    assert_same_run(workdir, reference)


SMALL = ["--config.train.num_steps=200", "--config.train.log_every=20", "--config.train.eval_every=100",
         "--config.train.checkpoint_every=100"]


def test_sigint_in_process_and_resume_from_nothing(tmp_path, monkeypatch, capsys, request):
    """SIGINT (sent to this process while step 60 is logged) stops at the chunk boundary
    after it with a checkpoint, exit code 130; the resume matches an uninterrupted run.
    Then: a run killed before its first checkpoint (only config, partial metrics and
    events on disk) restarts from step 0 and also matches."""
    args = ["bn-research", "train", f"--config={ROOT / 'configs/mlp.py'}:width=16,norm=noisy_batch", *SMALL,
            "--config.train.steps_per_dispatch=20"]
    assert cli.main([*args, f"--workdir={tmp_path / 'ref'}"]) == 0
    write = rundir.MetricsWriter.write
    # as in a process started from a terminal (pytest run as a background job of a
    # non-interactive shell starts with SIGINT ignored, which a run leaves ignored)
    started_with = signal.signal(signal.SIGINT, signal.default_int_handler)
    request.addfinalizer(lambda: signal.signal(signal.SIGINT, started_with))

    def write_and_signal(self, step, scalars):
        write(self, step, scalars)
        if step == 60:
            os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(rundir.MetricsWriter, "write", write_and_signal)
    workdir = tmp_path / "run"
    assert cli.main([*args, f"--workdir={workdir}"]) == 130
    out, err = capsys.readouterr()
    assert "interrupted at step 80" in out and "run the same command again" in out and "Traceback" not in err
    summary = rundir.read_summary(workdir)
    assert summary["status"] == "interrupted" and summary["signal"] == "SIGINT" and summary["step"] == 80
    assert checkpoint_steps(workdir) == [80] and max(metric_steps(workdir)) == 80
    monkeypatch.undo()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handlers restored
    assert cli.main([*args, f"--workdir={workdir}"]) == 0
    assert "resuming" in capsys.readouterr().err
    ref = tmp_path / "ref"
    assert (workdir / "metrics.jsonl").read_bytes() == (ref / "metrics.jsonl").read_bytes()
    assert rundir.read_summary(workdir)["final"] == rundir.read_summary(ref)["final"]

    early = tmp_path / "early"
    early.mkdir()
    shutil.copy(ref / "config.json", early)
    shutil.copytree(ref / "layer_stats", early / "layer_stats")
    for old in ref.glob("events.out.tfevents.*"):
        shutil.copy(old, early)
    rows = (ref / "metrics.jsonl").read_text().splitlines(keepends=True)
    (early / "metrics.jsonl").write_text("".join(rows[:2]) + rows[2][:15])  # cut mid-line by the kill
    assert cli.main([*args, f"--workdir={early}"]) == 0
    assert "from step 0" in capsys.readouterr().err
    assert (early / "metrics.jsonl").read_bytes() == (ref / "metrics.jsonl").read_bytes()
    pd.testing.assert_frame_equal(runs.load(early).layer_stats, runs.load(ref).layer_stats, check_exact=True)


def test_an_ignored_sigint_stays_ignored():
    """A process started with SIGINT ignored (a background command of a script) keeps
    ignoring it while the loop runs and after; SIGTERM still stops the run."""
    started_with = signal.signal(signal.SIGINT, signal.SIG_IGN)
    term_before = signal.getsignal(signal.SIGTERM)
    try:
        with loop._StopSignals() as stop:
            assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
            os.kill(os.getpid(), signal.SIGINT)
            assert stop.name is None
            os.kill(os.getpid(), signal.SIGTERM)
            assert stop.name == "SIGTERM"
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
        assert signal.getsignal(signal.SIGTERM) is term_before
    finally:
        signal.signal(signal.SIGINT, started_with)


def _diverging_config():
    config = tiny(load_config("mlp", "norm=none,activation=relu,lr=50"), steps=40)
    config.train.log_every = config.train.eval_every = 20
    config.probes.drift.every = 1  # per-step probe rows, to see they stop at the divergence
    return config


def test_divergence_keeps_probes_up_to_the_step(tmp_path):
    summary = train.train_and_evaluate(_diverging_config(), tmp_path)
    assert summary["status"] == "diverged"
    at = summary["diverged_at"]
    assert 1 < at <= 40 and summary["step"] == at
    run = runs.load(tmp_path)
    assert run.summary["status"] == "diverged" and run.metrics["step"].max() == at
    diverged_row = run.metrics[run.metrics["step"] == at].iloc[0]
    loss = diverged_row["train/loss"]
    assert not np.isfinite(loss) or loss > 1e6 or np.isnan(loss)
    probe_steps = sorted(set(run.layer_stats["step"]))
    assert probe_steps == list(range(1, at)), "probes of every step before the divergence, none after"
    # Running it again returns the result instead of diverging again.
    again = train.train_and_evaluate(_diverging_config(), tmp_path)
    assert again["status"] == "diverged" and again["diverged_at"] == at


def test_sweep_carries_on_after_a_diverged_point(tmp_path):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    r = subprocess.run([sys.executable, "-m", "bn_research", "sweep",
                        "--config=configs/mlp.py:norm=none,activation=relu", f"--workdir={tmp_path}",
                        "--sweep=optimizer.learning_rate=50,0.1", "--config.train.num_steps=20",
                        "--config.train.log_every=10", "--config.train.eval_every=10"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "sweep: 1 completed, 1 diverged (learning_rate=50)" in r.stdout
    assert rundir.read_summary(tmp_path / "learning_rate=50")["status"] == "diverged"
    assert rundir.read_summary(tmp_path / "learning_rate=0.1")["status"] == "completed"


def _small(steps=10):
    config = tiny(load_config("mlp", "width=16"), steps=steps)
    config.train.log_every, config.train.eval_every, config.train.checkpoint_every = 5, 5, 5
    return config


def _truncate_arrays(checkpoint_dir):
    """Cut every array file of the checkpoint(s) under `checkpoint_dir` in half."""
    for f in checkpoint_dir.rglob("*"):
        if f.is_file() and f.parent.name == "d":
            f.write_bytes(f.read_bytes()[: len(f.read_bytes()) // 2])


# orbax's reads still in flight after a failed restore used to print a dozen "Event loop is
# closed" tracebacks (unraisable exceptions) before the one-line warning
@pytest.mark.filterwarnings("error::pytest.PytestUnraisableExceptionWarning")
def test_corrupt_latest_checkpoint_falls_back_with_a_warning(tmp_path, capsys):
    ref = train.train_and_evaluate(_small(), tmp_path / "ref")
    workdir = tmp_path / "run"
    shutil.copytree(tmp_path / "ref", workdir)
    (workdir / "summary.json").unlink()  # as if killed just after the last checkpoint
    _truncate_arrays(workdir / "checkpoints" / "10" / "state")
    capsys.readouterr()
    hook = sys.unraisablehook
    summary = train.train_and_evaluate(_small(), workdir)
    assert sys.unraisablehook is hook
    err = capsys.readouterr().err
    assert "Traceback" not in err and "Event loop is closed" not in err
    warnings = [ln for ln in err.splitlines() if ln.startswith("warning: checkpoint at step 10")]
    assert len(warnings) == 1 and "resuming from step 5" in warnings[0]
    assert (workdir / "corrupt_checkpoints" / "10").is_dir()  # kept, not deleted
    assert summary["final"] == ref["final"]
    assert (workdir / "metrics.jsonl").read_bytes() == (tmp_path / "ref" / "metrics.jsonl").read_bytes()


def test_every_checkpoint_unreadable_is_one_line_exit_2(tmp_path, capsys):
    workdir = tmp_path / "run"
    train.train_and_evaluate(_small(), workdir)
    (workdir / "summary.json").unlink()
    for meta in (workdir / "checkpoints").glob("*/meta/metadata"):
        meta.write_text("{garbage")
    before = {p: p.read_bytes() for p in workdir.rglob("*") if p.is_file()}
    with pytest.raises(checkpoint.CheckpointError, match="no readable checkpoint"):
        train.train_and_evaluate(_small(), workdir)
    assert {p: p.read_bytes() for p in workdir.rglob("*") if p.is_file()} == before


@pytest.mark.filterwarnings("error::pytest.PytestUnraisableExceptionWarning")
def test_every_checkpoints_arrays_unreadable_is_one_line_without_tracebacks(tmp_path, capsys):
    workdir = tmp_path / "run"
    train.train_and_evaluate(_small(), workdir)
    (workdir / "summary.json").unlink()
    _truncate_arrays(workdir / "checkpoints")
    capsys.readouterr()
    hook = sys.unraisablehook
    with pytest.raises(checkpoint.CheckpointError, match="no readable checkpoint"):
        train.train_and_evaluate(_small(), workdir)
    assert sys.unraisablehook is hook
    err = capsys.readouterr().err
    assert "Traceback" not in err and "Event loop is closed" not in err


def test_the_failed_restore_filter_passes_other_unraisables_on():
    """Only the closed event loop's RuntimeError from asyncio is dropped; anything else
    reaches the hook that was installed before."""
    import asyncio

    def closed_loop_error():
        event_loop = asyncio.new_event_loop()  # not `loop`: that is bn_research.loop here
        event_loop.close()
        try:
            event_loop.call_soon_threadsafe(print)
        except RuntimeError as e:
            return e

    def args(e, obj=None):
        return types.SimpleNamespace(exc_type=type(e), exc_value=e, exc_traceback=e.__traceback__,
                                     err_msg=None, object=obj)

    seen = []
    before = sys.unraisablehook
    sys.unraisablehook = seen.append
    quiet, one, two = checkpoint._QuietFailedRestore(), object(), object()
    try:
        quiet.install(one)
        quiet.install(two)
        assert sys.unraisablehook is quiet
        noise, other = closed_loop_error(), RuntimeError("Event loop is closed")  # the latter raised elsewhere
        for a in (args(noise), args(other), args(ValueError("x")), args(noise, obj="some object")):
            sys.unraisablehook(a)
        assert [type(a.exc_value) for a in seen] == [RuntimeError, ValueError, RuntimeError]
        assert seen[0].exc_value is other and seen[2].exc_value is noise and quiet.dropped == 1
        quiet.remove(one)
        assert sys.unraisablehook is quiet  # still held by the other
        quiet.remove(two)
        assert sys.unraisablehook == seen.append
    finally:
        sys.unraisablehook = before


def test_truncate_metrics_drops_later_rows_and_a_cut_line(tmp_path):
    lines = [json.dumps({"step": s, "train/loss": 1.0 / s}) for s in (10, 20, 30)]
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines) + "\nnot json\n" + '{"step": 40, "tr')
    assert rundir.truncate_metrics(tmp_path, 20) == 2
    assert (tmp_path / "metrics.jsonl").read_text() == "\n".join(lines[:2]) + "\nnot json\n"
    assert rundir.truncate_metrics(tmp_path, 20) == 0


def test_unwritable_workdir_is_one_line(tmp_path, capsys):
    """A workdir that cannot be created (its parent is a file) or written (read-only, when not root)."""
    (tmp_path / "a_file").write_text("keep me")
    bad = [tmp_path / "a_file" / "run"]
    if os.geteuid() != 0:
        locked = tmp_path / "locked"
        locked.mkdir()
        locked.chmod(0o500)
        bad.append(locked / "run")
    for workdir in bad:
        rc = cli.main(["bn-research", "train", f"--config={ROOT / 'configs/mlp.py'}", f"--workdir={workdir}",
                       "--config.train.num_steps=5"])
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 2 and len(err) == 1 and "choose a writable --workdir" in err[0], err
    assert (tmp_path / "a_file").read_text() == "keep me"


def test_chunk_length_divides_checkpoint_every():
    config = tiny(load_config("mlp"))
    config.train.log_every, config.train.eval_every, config.train.checkpoint_every = 50, 100, 30
    assert train.chunk_length(config) == 10
    config.train.checkpoint_every = 0
    assert train.chunk_length(config) == 100  # eval_every; log rows are cut on the host
    config.train.steps_per_dispatch = 40
    assert train.chunk_length(config) == 20  # made to divide eval_every


def test_checkpoint_metadata_is_what_it_was_at_save_time(tmp_path):
    """The loop hands `save` live objects (its last logged row, its list of resumes) and
    keeps updating them while the asynchronous save is still writing; the checkpoint must
    hold the values of the moment of the save, matching their digest."""
    import jax.numpy as jnp

    ckpt = checkpoint.Checkpointer(tmp_path, keep=2)
    last, resumes = {"train/loss": 1.5}, [3]
    for i in range(10):  # the async write is usually still queued when the caller moves on
        state = {"step": jnp.int32(i + 1), "w": jnp.arange(4.0)}
        ckpt.save(i + 1, state, {"last": last, "resumes": resumes, "i": i})
        last["train/loss"] = 99.0 + i
        last[f"new_{i}"] = 1.0
        resumes.append(7)
        ckpt.wait()
        step, _, meta = ckpt.restore_latest(state)
        assert step == i + 1 and meta["i"] == i
        assert meta["last"]["train/loss"] == (1.5 if i == 0 else 98.0 + i)
        assert f"new_{i}" not in meta["last"] and len(meta["resumes"]) == i + 1
    ckpt.close()
