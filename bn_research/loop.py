"""The host side of training, once: a single run, vectorized replicas and sharded runs all
go through `run`.

The loop dispatches chunks of K steps (`lax.scan` inside one jitted call), then fetches the
previous chunk's metrics while the next chunk runs, so the host never waits on the device
except at the end. Each run directory has a `RunHost`: its metrics writer, probe recorder,
logging window, checkpoints and summary. A single run (on one device or sharded over a
mesh) is one host whose metrics are the chunk's; N vectorized replicas are N hosts, host i
reading slice i of every fetched array.

- Rows: a chunk may hold several logging windows; the per-step train metrics are cut at
  every log point on the host (`chunk_length` keeps every evaluation and checkpoint on a
  chunk end). Evaluation runs on the test split every `train.eval_every` steps and at the end.
- Checkpoints every `train.checkpoint_every` steps and at the end, one per run directory
  (replica i saves its own slice, which is a single run's TrainState), with the host-side
  loop state (`RunHost.meta`), so a resumed run writes exactly the rows of a run never
  stopped.
- SIGTERM / SIGINT stop at the next chunk boundary with a checkpoint there and `status:
  interrupted` (a second signal stops at once, keeping the last checkpoint); during
  compilation they stop at once (`interrupted_during: compile`).
- A non-finite training loss or one above `train.max_loss` ends that run as `diverged`
  (naming the step, the loss and the limit); the loop ends when no run is left.
- Only one process writes run directories (`writer=False` on the others of a multi-process
  run); every process takes part in the checkpoints' collective save.
"""

from __future__ import annotations

import dataclasses
import math
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import jax
import numpy as np

from bn_research import checkpoint, distributed, probes, rundir, step

# Exit codes of a run stopped by a signal (128 + signal number, the shell's convention).
EXIT_CODES = {"SIGINT": 130, "SIGTERM": 143}


def chunk_length(config) -> int:
    """Steps per dispatch: `train.steps_per_dispatch`, or `eval_every` (log rows inside a
    chunk are cut from its per-step metrics on the host); then reduced to divide
    `train.checkpoint_every`, so every checkpoint and evaluation falls on a chunk end."""
    t = config.train
    k = math.gcd(int(t.steps_per_dispatch) or int(t.eval_every), int(t.eval_every))
    return math.gcd(k, int(t.checkpoint_every)) if t.checkpoint_every else k


def chunk_sizes(start: int, num_steps: int, k: int) -> list[int]:
    """The distinct chunk lengths of a session from `start`: k, and the shorter last chunk."""
    left = num_steps - start
    sizes = {k} if left >= k else set()
    if left % k:
        sizes.add(left % k)
    return sorted(sizes)


def _window_means(buffers: list[dict]) -> dict:
    """Mean of each per-step train metric over the logging window."""
    keys = buffers[0].keys()
    return {f"train/{k}": float(np.mean(np.concatenate([b[k] for b in buffers])))
            for k in keys if np.ndim(buffers[0][k]) == 1}


def _window_to_json(buffers: list[dict]) -> dict:
    """The unfinished logging window as exact JSON (float32 -> float -> float32 round-trips)."""
    if not buffers:
        return {}
    out = {}
    for k in buffers[0]:
        a = np.concatenate([np.asarray(b[k]) for b in buffers])
        out[k] = {"dtype": a.dtype.str, "shape": list(a.shape), "values": a.ravel().tolist()}
    return out


def _window_from_json(obj: dict) -> list[dict]:
    if not obj:
        return []
    return [{k: np.asarray(v["values"], dtype=np.dtype(v["dtype"])).reshape(v["shape"])
             for k, v in obj.items()}]


def _truncate_chunk(host: dict, n_steps: int, keep: int) -> dict:
    """Per-step outputs of a chunk of `n_steps` steps cut to the first `keep` steps."""
    return {k: (np.asarray(v)[:keep] if np.ndim(v) >= 1 and np.shape(v)[0] == n_steps else v)
            for k, v in host.items()}


class RunHost:
    """Host side of one run directory: rows, probes, window, checkpoints and summary.

    `summary` is the run's base summary (versions, devices, mesh ...); `writer=False` (the
    non-zero processes of a multi-process run) computes everything and writes nothing but
    its part of the checkpoints.
    """

    def __init__(self, config, workdir: Path, layer_names, layout: dict, summary: dict, *,
                 writer: bool = True):
        self.config, self.workdir, self.is_writer = config, Path(workdir), writer
        t = config.train
        self.num_steps, self.log_every, self.max_loss = int(t.num_steps), int(t.log_every), float(t.max_loss)
        self.eval_every, self.checkpoint_every = int(t.eval_every), int(t.checkpoint_every)
        self.ckpt = checkpoint.Checkpointer(workdir, int(t.keep_checkpoints))
        self.layer_names, self.layout = list(layer_names), layout
        self.writer = self.recorder = None
        self.summary = dict(summary, status="failed", step=0)
        self.window, self.last, self.resumes = [], {}, []
        self.wall_before, self.timed_before = 0.0, (0, 0.0)
        self.done = self.start = 0
        self.live = True

    def restore(self, target, steps=None, warn=rundir.log):
        """(step, state, meta) of the newest readable checkpoint among `steps` (all when
        None), or None; pass the meta to `open` to take over the loop state saved with it."""
        try:
            return self.ckpt.restore_latest(target, warn=warn, steps=steps)
        except checkpoint.CheckpointError:
            self.ckpt.close()
            raise

    def open(self, start: int, *, resumed: bool, meta: dict | None = None) -> None:
        """Start at `start` with the loop state `meta` of its checkpoint (rows logged after
        it by an earlier session are dropped)."""
        meta = meta or {}
        self.window, self.last = _window_from_json(meta.get("window", {})), dict(meta.get("last", {}))
        self.resumes = list(meta.get("resumes", []))
        self.wall_before = float(meta.get("wall_time_s", 0.0))
        self.timed_before = (int(meta.get("timed_steps", 0)), float(meta.get("timed_s", 0.0)))
        self.done = self.start = start
        self.summary["step"] = start
        if not self.is_writer:
            return
        if resumed:  # before the writer opens metrics.jsonl: truncation replaces the file
            rundir.truncate_metrics(self.workdir, start)
        self.writer = rundir.MetricsWriter(self.workdir, self.config.to_dict(), self.layer_names)
        self.recorder = probes.Recorder(self.config, self.workdir, self.layer_names, self.layout)
        if resumed:
            self.recorder.truncate(start)
            self.writer.resume(start)
            self.resumes.append(start)
            rundir.log(f"resuming {self.workdir} from step {start}"
                       + (" (checkpoint)" if start else " (no checkpoint yet: from the start)"))
        if self.resumes:
            self.summary["resumed_at"] = list(self.resumes)

    def _write(self, rows: dict, units: dict) -> None:
        for row_step in sorted(set(rows) | set(units)):
            if rows.get(row_step):
                self.last.update(rows[row_step])
                if self.writer is not None:
                    self.writer.write(row_step, rows[row_step])
            if units.get(row_step) and self.writer is not None:
                self.writer.histograms(row_step, units[row_step])

    def _record(self, end: int, host: dict) -> tuple[dict, dict]:
        if self.recorder is None:
            return {}, {}
        rows = self.recorder.record(end, host)  # {step: {"dist/dense_0/...": value}}
        return rows, self.recorder.units

    def process(self, end: int, host: dict, eval_host: dict | None) -> bool:
        """Log one fetched chunk ending at step `end`; False once the run diverged."""
        losses = np.asarray(host["loss"])
        bad = ~np.isfinite(losses) | (losses > self.max_loss)
        if bad.any():
            self._diverged(end, host, losses, int(np.argmax(bad)))
            return False
        rows, units = self._record(end, host)
        base = {k: np.asarray(v) for k, v in host.items() if k in step.BASE_METRICS}
        n, first_step, pos = len(losses), end - len(losses) + 1, 0
        log_steps = list(range(-(-first_step // self.log_every) * self.log_every, end + 1, self.log_every))
        if end == self.num_steps and self.num_steps not in log_steps:
            log_steps.append(self.num_steps)
        for log_step in log_steps:  # cut the chunk's per-step metrics at every log point
            cut = log_step - first_step + 1
            self.window.append({k: v[pos:cut] for k, v in base.items()})
            rows.setdefault(log_step, {}).update(_window_means(self.window))
            self.window.clear()
            pos = cut
        if pos < n:  # the unfinished tail stays in the window
            self.window.append({k: v[pos:] for k, v in base.items()})
        if eval_host is not None:
            rows.setdefault(end, {}).update({f"eval/{k}": float(v) for k, v in eval_host.items()})
        self._write(rows, units)
        self.done = end
        return True

    def _diverged(self, end: int, host: dict, losses, i: int) -> None:
        first = end - len(losses) + i + 1
        if i > 0:  # probes of the steps before the divergence are kept
            self._write(*self._record(first - 1, _truncate_chunk(host, len(losses), i)))
        row = {f"train/{k}": float(np.asarray(v)[i]) for k, v in host.items()
               if np.ndim(v) == 1 and k in step.BASE_METRICS}
        if self.writer is not None:
            self.writer.write(first, row)
        self.summary.update(status="diverged", step=first, diverged_at=first, final=dict(self.last, **row),
                            diverged_loss=float(losses[i]), max_loss=self.max_loss)
        self.live = False

    def meta(self, timing) -> dict:
        return {"window": _window_to_json(self.window), "last": self.last,
                "wall_time_s": self.wall_before + timing.wall, "timed_steps": timing.steps,
                "timed_s": timing.secs,
                "resumes": self.resumes}

    def save(self, at: int, state, timing) -> None:
        if self.writer is not None:
            self.writer.sync()  # rows up to `at` are on disk before the checkpoint can commit
        self.summary["state_digest"] = self.ckpt.save(at, state, self.meta(timing))

    def close(self, timing, extra: dict) -> dict:
        """Write summary.json (the writer only) and return it."""
        for part in (self.writer, self.recorder):
            if part is not None:
                part.close()
        self.ckpt.close()
        steps, secs = timing.steps, timing.secs
        self.summary["wall_time_s"] = self.wall_before + timing.wall
        self.summary["steps_per_s"] = steps / secs if secs > 0 and steps > 0 else None
        self.summary.update(extra)  # this session's setup_s / compile_s; not in steps_per_s
        if self.is_writer:
            rundir.write_summary(self.workdir, self.summary)
        return self.summary


class Timing(NamedTuple):
    """Training steps and seconds without setup and compilation, over all sessions; and
    the wall time of this session so far."""

    steps: int
    secs: float
    wall: float


class _StopSignals:
    """While active (main thread only), SIGTERM / SIGINT set `name` so the loop stops at the
    next chunk boundary with a checkpoint; a second signal raises KeyboardInterrupt. A
    signal the process is ignoring stays ignored: a shell without job control starts its
    background commands (`cmd &` in a script) with SIGINT ignored, so that a Ctrl-C meant
    for the script does not reach them (Python itself keeps it ignored then)."""

    def __init__(self):
        self.name = None
        self._old = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            # several processes: SIGTERM is JAX's preemption notice (see `agreed`)
            sigs = (signal.SIGINT, signal.SIGTERM) if jax.process_count() == 1 else (signal.SIGINT,)
            for sig in sigs:
                if signal.getsignal(sig) is not signal.SIG_IGN:
                    self._old[sig] = signal.signal(sig, self._handle)
        return self

    def agreed(self, step: int) -> str | None:
        """The stop signal, agreed by every process at the chunk boundary ending at `step`.

        Several processes: JAX's preemption service takes SIGTERM (a preemption notice
        reaches every process at the same sync point) and a SIGINT seen by any process
        stops them all, so no process waits alone in the next collective."""
        if jax.process_count() == 1:
            return self.name
        from jax.experimental import multihost_utils

        if multihost_utils.reached_preemption_sync_point(step):
            self.name = self.name or "SIGTERM"
        elif distributed.any_process(self.name is not None):
            self.name = self.name or "SIGINT"
        return self.name

    def _handle(self, signum, frame):
        del frame
        if self.name is not None:
            raise KeyboardInterrupt
        self.name = signal.Signals(signum).name
        rundir.log(f"{self.name}: stopping at the next chunk boundary with a checkpoint "
                   "(send it again to stop at once)")

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old if old is not None else signal.SIG_DFL)
        return False


class _CompileInterrupted(Exception):
    """A stop signal arrived while XLA was compiling."""


def _interruptible(fn, stop: _StopSignals) -> None:
    """Run `fn()` (XLA compilation, which can take minutes and runs no Python code for the
    signal handlers to interrupt) in a worker thread while the main thread polls, so a
    SIGTERM / SIGINT stops the run at once; raises _CompileInterrupted. The abandoned
    compilation finishes or dies with the process."""
    box = {}

    def target():
        try:
            fn()
        except BaseException as e:  # re-raised in the main thread
            box["error"] = e

    worker = threading.Thread(target=target, name="bn-research-compile", daemon=True)
    worker.start()
    while worker.is_alive():
        worker.join(0.1)
        if stop.name is not None:
            raise _CompileInterrupted(stop.name)
    if "error" in box:
        raise box["error"]


def setup_phase(bar, config, build):
    """`build()` as the progress bar's setup phase: one line when it ends (so a usage error
    found during setup stays the only line); a failure closes the bar."""
    try:
        with bar.phase("setup", f"dataset {config.dataset.name}, model {config.model.name}, "
                                f"norm {config.model.norm}", start_line=False):
            return build()
    except BaseException:
        bar.close()
        raise


@dataclasses.dataclass
class Programs:
    """What the loop runs, for one run or N replicas.

    chunk(state, start, n) -> (state, metrics of steps start+1 .. start+n, per-step axis [n]
        (after the replica axis))
    evaluate(state) -> metrics
    compile(state, sizes, start) -> None: compile every chunk size (of a session from step
        `start`) and the evaluation ahead of time
    part(host_tree, i) -> run i's part of a fetched tree (identity for one run)
    """

    chunk: Callable
    evaluate: Callable
    compile: Callable
    part: Callable = lambda tree, i: tree


def run(config, hosts: list[RunHost], programs: Programs, state, start: int, bar, *,
        t0: float, setup_s: float) -> list[dict]:
    """Train from `start` to `train.num_steps`; every host's summary, written."""
    t = config.train
    num_steps, k = int(t.num_steps), chunk_length(config)
    eval_every, checkpoint_every = int(t.eval_every), int(t.checkpoint_every)
    pending, session_start, clock = None, start, {"loop": None, "done": None}
    compile_s = 0.0

    def timing(h: RunHost) -> Timing:
        steps, secs = h.timed_before
        if clock["loop"] is not None and clock["done"] is not None and h.done > session_start:
            steps, secs = steps + h.done - session_start, secs + clock["done"] - clock["loop"]
        return Timing(steps, secs, time.time() - t0)

    def process(item) -> bool:
        end, metrics, eval_metrics = item
        fetched = jax.device_get(metrics)
        fetched_eval = None if eval_metrics is None else jax.device_get(eval_metrics)
        for i, h in enumerate(hosts):
            if h.live:
                h.process(end, programs.part(fetched, i),
                          None if fetched_eval is None else programs.part(fetched_eval, i))
        clock["done"] = time.time()
        losses = [h.last["train/loss"] for h in hosts if h.live and "train/loss" in h.last]
        bar.update(end, float(np.mean(losses)) if losses else None)
        return any(h.live for h in hosts)

    def fetch(at, state) -> tuple:
        """The state on the host (once, for every run's slice) and each run's timing: after
        this the next chunk may take the device buffers while `commit` writes them."""
        return at, jax.device_get(state), [timing(h) for h in hosts]

    def commit(saving) -> None:
        at, fetched, timings = saving
        for i, h in enumerate(hosts):
            if h.live:
                h.save(at, programs.part(fetched, i), timings[i])

    stop = _StopSignals()
    try:
        with stop:
            if start < num_steps:
                t_compile = time.time()
                sizes = chunk_sizes(start, num_steps, k)
                try:
                    with bar.phase("compile", f"chunks of {', '.join(map(str, sizes))} steps, evaluation"):
                        _interruptible(lambda: programs.compile(state, sizes, start), stop)
                except _CompileInterrupted:
                    for h in hosts:
                        h.summary["interrupted_during"] = "compile"  # the loop below does not start
                compile_s = time.time() - t_compile
            bar.start(start)
            clock["loop"] = time.time()
            ok, stopping = True, stop.name is not None
            saving = None  # a checkpoint fetched at a chunk end, written while the next chunk runs
            while start < num_steps and ok and not stopping:
                n = min(k, num_steps - start)
                state, metrics = programs.chunk(state, start, n)
                end = start + n
                eval_metrics = programs.evaluate(state) if end % eval_every == 0 or end == num_steps else None
                if saving is not None:
                    commit(saving)
                    saving = None
                if pending is not None:
                    ok = process(pending)
                pending, start = (end, metrics, eval_metrics), end
                at_checkpoint = checkpoint_every and end % checkpoint_every == 0
                stopping = stop.agreed(end) is not None
                if ok and end < num_steps and (at_checkpoint or stopping):
                    ok = process(pending)  # its rows are on disk before the checkpoint commits
                    pending = None
                    if ok:
                        saving = fetch(end, state)  # the state is donated to the next chunk
            if saving is not None:
                commit(saving)
            if ok and pending is not None:
                ok = process(pending)
            live = [h for h in hosts if h.live]
            if live and all(h.done == num_steps for h in live):
                if any(num_steps not in h.ckpt.steps() for h in live):
                    commit(fetch(num_steps, state))
                for h in live:
                    h.ckpt.wait()
                    h.summary.update(status="completed", step=num_steps, final=h.last)
            else:
                for h in live:
                    h.summary.update(status="interrupted", step=h.done, final=h.last, signal=stop.name)
    except KeyboardInterrupt:  # a second signal: stop now; the last checkpoint stays valid
        for h in hosts:
            if h.live:
                h.summary.update(status="interrupted", step=max(h.ckpt.steps(), default=0), final=h.last,
                                 signal=stop.name or "SIGINT")
    except BaseException as e:
        for h in hosts:
            h.summary.update(error=f"{type(e).__name__}: {e}"[:500])
        raise
    finally:
        bar.close()
        extra = {"setup_s": setup_s, "compile_s": compile_s}
        summaries = [h.close(timing(h), extra) for h in hosts]
    return summaries
