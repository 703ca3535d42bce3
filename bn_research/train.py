"""`train_and_evaluate(config, workdir)`: the training loop around the pure step.

The loop dispatches chunks of K steps (`lax.scan` inside one jitted call), then fetches
the previous chunk's metrics while the next chunk runs, so the host never waits on the
device except at the end. Evaluation runs on the test split with running statistics
every `train.eval_every` steps and at the end.

Progress (`progress.py`): lines when setup and compilation start and end; the chunk
programs and the evaluation are compiled ahead of time, so `steps_per_s` in the summary
counts the training loop only (`setup_s`, `compile_s` are recorded beside it); then a bar
on a terminal or periodic step/loss/steps-per-s/ETA lines elsewhere.

Reliability (see `checkpoint.py`):
- every `train.checkpoint_every` steps and at the end the whole TrainState is saved
  (asynchronously) with the host-side loop state; running again on the same workdir with
  the same config resumes from the newest readable checkpoint, bitwise identically to a
  run never stopped (the batch order is a pure function of state["rng"] and
  state["step"]); rows logged after that checkpoint are dropped first;
- SIGTERM / SIGINT stop at the next chunk boundary with a checkpoint there and
  `status: interrupted` (a second signal stops at once, keeping the last checkpoint);
- a non-finite training loss or one above `train.max_loss` ends the run as `diverged`.
"""

from __future__ import annotations

import math
import signal
import threading
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from bn_research import checkpoint, config_lib, data, kernels, mesh, models, optim, probes, progress, rundir, step


def chunk_length(config) -> int:
    """Steps per dispatch: `train.steps_per_dispatch`, or `eval_every` (log rows inside a
    chunk are cut from its per-step metrics on the host); then reduced to divide
    `train.checkpoint_every`, so every checkpoint and evaluation falls on a chunk end."""
    t = config.train
    k = math.gcd(int(t.steps_per_dispatch) or int(t.eval_every), int(t.eval_every))
    return math.gcd(k, int(t.checkpoint_every)) if t.checkpoint_every else k


def setup(config, dataset=None, *, single_device: bool = False):
    """Dataset, model, optimizer and the pure step functions for `config`, placed on the
    mesh of `config.mesh` (bn_research.mesh), or on one device with `single_device`.

    Returns a dict with `dataset`, `model`, `graphdef`, `state`, `tx`, `fns`, `data`
    (device-resident train/test arrays). Usable from notebooks and benchmarks.
    """
    ds = dataset if dataset is not None else data.load(config.dataset)
    if config.train.batch_size > ds.train["x"].shape[0]:
        raise config_lib.ConfigError(
            f"train.batch_size={config.train.batch_size} is larger than the training split of "
            f"{config.dataset.name} ({ds.train['x'].shape[0]} examples); lower it"
        )
    try:
        model = models.build(config, ds.input_shape, ds.output_dim, config.seed)
    except ValueError as e:
        raise config_lib.ConfigError(str(e)) from None
    if config.model.norm == "weight" and config.norm.wn_data_init:
        n = min(int(config.train.batch_size) * 8, ds.train["x"].shape[0])
        models.data_init(model, jnp.asarray(ds.train["x"][:n]))
    tx = optim.make(config.optimizer, config.train.num_steps)
    graphdef, state = step.init_state(model, tx, config.seed)
    probe_fn = probes.make_probe_fn(config, graphdef, ds.task)
    if probe_fn is not None:
        state["probes"] = probes.init_state(config, graphdef, state, ds)
    m = mesh.make(config, 1 if single_device else None)
    sharded = m.size > 1
    fns = step.make_step_fns(
        graphdef, tx, task=ds.task, batch_size=config.train.batch_size,
        eval_batch_size=config.train.eval_batch_size, probe_fn=probe_fn,
        batch_sharding=mesh.batch_sharded(m) if sharded else None,
    )
    device_data = {
        "train": jax.tree_util.tree_map(jnp.asarray, ds.train),
        "test": jax.tree_util.tree_map(jnp.asarray, ds.test),
    }
    if sharded:  # state and dataset replicated; each step's batch is split over the mesh
        state = jax.device_put(state, mesh.replicated(m))
        device_data = jax.device_put(device_data, mesh.replicated(m))
    return {"dataset": ds, "model": model, "graphdef": graphdef, "state": state, "tx": tx,
            "fns": fns, "data": device_data, "mesh": m}


# Exit codes of a run stopped by a signal (128 + signal number, the shell's convention).
EXIT_CODES = {"SIGINT": 130, "SIGTERM": 143}


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


class _StopSignals:
    """While active (main thread only), SIGTERM / SIGINT set `name` so the loop stops at the
    next chunk boundary with a checkpoint; a second signal raises KeyboardInterrupt."""

    def __init__(self):
        self.name = None
        self._old = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

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


def chunk_sizes(start: int, num_steps: int, k: int) -> list[int]:
    """The distinct chunk lengths of a session from `start`: k, and the shorter last chunk."""
    left = num_steps - start
    sizes = {k} if left >= k else set()
    if left % k:
        sizes.add(left % k)
    return sorted(sizes)


def compile_programs(chunk_fn, eval_fn, state, device_data, sizes) -> None:
    """Compile the chunk of each size in `sizes` and the evaluation ahead of time
    (`.lower().compile()`; jit reuses the executables), so the timed loop runs no compiler."""
    for n in sizes:
        chunk_fn.lower(state, device_data["train"], n).compile()
    eval_fn.lower(state["params"], state["batch_stats"], device_data["test"]).compile()


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
    found during setup stays the only line); a failure closes the bar. Shared by single runs
    and vectorized replicas."""
    try:
        with bar.phase("setup", f"dataset {config.dataset.name}, model {config.model.name}, "
                                f"norm {config.model.norm}", start_line=False):
            return build()
    except BaseException:
        bar.close()
        raise


def _truncate_chunk(host: dict, n_steps: int, keep: int) -> dict:
    """Per-step outputs of a chunk of `n_steps` steps cut to the first `keep` steps."""
    return {k: (np.asarray(v)[:keep] if np.ndim(v) >= 1 and np.shape(v)[0] == n_steps else v)
            for k, v in host.items()}


def train_and_evaluate(config: ml_collections.ConfigDict, workdir, *, overwrite=False,
                       dataset=None) -> dict:
    """Train `config` in the run directory `workdir`, return the summary dict.

    A workdir holding a run of the same config resumes it from its newest checkpoint (a
    run already `completed` or `diverged` is returned as it is); one of another config
    raises `rundir.WorkdirError` unless `overwrite`.
    """
    workdir = Path(workdir)
    config_lib.validate(config)
    from bn_research import replicas

    if replicas.enabled(config):
        raise config_lib.ConfigError(
            "config.replicas is set: train it with replicas.train_replicas(config, workdirs) "
            "or `bn-research train`, or clear replicas.seeds and replicas.learning_rates"
        )
    config_dict = config.to_dict()
    finished = None if overwrite else rundir.finished_summary(workdir, config_dict)
    if finished is not None:
        rundir.log(f"{workdir} already holds a {finished['status']} run of this config (step "
                   f"{finished.get('step')}); pass --overwrite to run it again")
        return finished
    # One writer per workdir; its problems (a file, another config's run) surface before
    # the dataset and the model are built.
    with rundir.WorkdirLock(workdir) as lock:
        rundir.check(workdir, config_dict, overwrite=overwrite)
        return _train(config, workdir, config_dict, overwrite=overwrite, dataset=dataset, lock=lock)


def _train(config, workdir: Path, config_dict: dict, *, overwrite: bool, dataset, lock) -> dict:
    """The loop of `train_and_evaluate`, run while holding the workdir's lock."""
    t0 = time.time()
    t = config.train
    num_steps, k = int(t.num_steps), chunk_length(config)
    bar = progress.Progress(f"train {workdir.name}", num_steps)
    s = setup_phase(bar, config, lambda: setup(config, dataset))
    setup_s = time.time() - t0
    resume = rundir.prepare(workdir, config_dict, overwrite=overwrite)
    ckpt = checkpoint.Checkpointer(workdir, int(t.keep_checkpoints))
    state, train_data, test_data = s["state"], s["data"]["train"], s["data"]["test"]
    start, meta = 0, {}
    if resume:
        try:
            restored = ckpt.restore_latest(state, warn=rundir.log)
        except checkpoint.CheckpointError:
            ckpt.close()
            raise
        if restored is not None:
            start, state, meta = restored
        rundir.truncate_metrics(workdir, start)
    lock.mark()  # from here on the run writes: name it as the workdir's holder
    writer = rundir.MetricsWriter(workdir, config_dict, s["model"].layer_names())
    recorder = probes.Recorder(config, workdir, s["model"].layer_names())
    resumes = list(meta.get("resumes", []))
    if resume:
        if hasattr(recorder, "truncate"):
            recorder.truncate(start)
        writer.resume(start)
        resumes.append(start)
        rundir.log(f"resuming {workdir} from step {start}"
                   + (" (checkpoint)" if start else " (no checkpoint yet: from the start)"))
    chunk_fn, eval_fn = step.jit_fns(s["fns"], mesh.replicated(s["mesh"]) if s["mesh"].size > 1 else None)

    summary = {"status": "failed", "step": start, "versions": rundir.versions(),
               "device_kind": jax.devices()[0].device_kind,
               "platform": jax.devices()[0].platform, "num_devices": jax.device_count(),
               "kernels": kernels.kind(), "mesh": mesh.describe(s["mesh"])}
    if resumes:
        summary["resumed_at"] = resumes
    window, last = _window_from_json(meta.get("window", {})), dict(meta.get("last", {}))
    wall_before = float(meta.get("wall_time_s", 0.0))
    timed_before = (int(meta.get("timed_steps", 0)), float(meta.get("timed_s", 0.0)))
    pending = None
    done = session_start = start
    t_loop = t_done = None  # wall times when this session's loop started (after compilation) / last chunk done

    def timing():
        """(steps, seconds) of training without setup and compilation, over all sessions."""
        steps, secs = timed_before
        if t_loop is not None and t_done is not None and done > session_start:
            steps, secs = steps + done - session_start, secs + t_done - t_loop
        return steps, secs

    def write_rows(rows):
        for row_step in sorted(set(rows) | set(recorder.units)):
            if rows.get(row_step):
                writer.write(row_step, rows[row_step])
                last.update(rows[row_step])
            if recorder.units.get(row_step):
                writer.histograms(row_step, recorder.units[row_step])

    def process(item):
        nonlocal done, t_done
        end, metrics, eval_metrics = item
        host = jax.device_get(metrics)
        losses = np.asarray(host["loss"])
        bad = ~np.isfinite(losses) | (losses > t.max_loss)
        if bad.any():
            i = int(np.argmax(bad))
            first = end - len(losses) + i + 1
            if i > 0:  # probes of the steps before the divergence are kept
                write_rows(recorder.record(first - 1, _truncate_chunk(host, len(losses), i)))
            row = {f"train/{key}": float(np.asarray(v)[i]) for key, v in host.items()
                   if np.ndim(v) == 1 and key in step.BASE_METRICS}
            writer.write(first, row)
            summary.update(status="diverged", step=first, diverged_at=first, final=dict(last, **row),
                           diverged_loss=float(losses[i]), max_loss=float(t.max_loss))
            return False
        rows = recorder.record(end, host)  # {step: {"dist/dense_0/...": value}}
        # A chunk may hold several logging windows: slice the per-step train metrics at
        # every log point inside it; the unfinished tail stays in `window`.
        base = {key: np.asarray(v) for key, v in host.items() if key in step.BASE_METRICS}
        n, first_step, pos = len(losses), end - len(losses) + 1, 0
        log_steps = list(range(-(-first_step // t.log_every) * t.log_every, end + 1, t.log_every))
        if end == num_steps and num_steps not in log_steps:
            log_steps.append(num_steps)
        for log_step in log_steps:
            cut = log_step - first_step + 1
            window.append({key: v[pos:cut] for key, v in base.items()})
            rows.setdefault(log_step, {}).update(_window_means(window))
            window.clear()
            pos = cut
        if pos < n:
            window.append({key: v[pos:] for key, v in base.items()})
        if eval_metrics is not None:
            rows.setdefault(end, {}).update({f"eval/{key}": float(v)
                                             for key, v in jax.device_get(eval_metrics).items()})
        write_rows(rows)
        done, t_done = end, time.time()
        bar.update(end, last.get("train/loss"))
        return True

    def save(at):
        writer.sync()  # rows up to `at` are on disk before the checkpoint can commit
        steps, secs = timing()
        ckpt.save(at, state, {"window": _window_to_json(window), "last": last,
                              "wall_time_s": wall_before + time.time() - t0, "timed_steps": steps,
                              "timed_s": secs, "resumes": resumes})

    stop = _StopSignals()
    compile_s = 0.0
    try:
        with stop:
            if start < num_steps:
                t_compile = time.time()
                sizes = chunk_sizes(start, num_steps, k)
                try:
                    with bar.phase("compile", f"chunks of {', '.join(map(str, sizes))} steps, evaluation"):
                        _interruptible(lambda: compile_programs(chunk_fn, eval_fn, state, s["data"], sizes), stop)
                except _CompileInterrupted:
                    summary["interrupted_during"] = "compile"  # the loop below does not start
                compile_s = time.time() - t_compile
            bar.start(start)
            t_loop = time.time()
            ok = True
            while start < num_steps and ok and stop.name is None:
                n = min(k, num_steps - start)
                state, metrics = chunk_fn(state, train_data, n)
                end = start + n
                eval_metrics = None
                if end % t.eval_every == 0 or end == num_steps:
                    eval_metrics = eval_fn(state["params"], state["batch_stats"], test_data)
                if pending is not None:
                    ok = process(pending)
                pending = (end, metrics, eval_metrics)
                start = end
                at_checkpoint = t.checkpoint_every and end % t.checkpoint_every == 0
                if ok and end < num_steps and (at_checkpoint or stop.name is not None):
                    ok = process(pending)  # the state is donated to the next chunk: save it now
                    pending = None
                    if ok:
                        save(end)
            if ok and pending is not None:
                ok = process(pending)
            if ok and done == num_steps:
                if num_steps not in ckpt.steps():
                    save(num_steps)
                ckpt.wait()
                summary.update(status="completed", step=num_steps, final=last)
            elif ok:
                summary.update(status="interrupted", step=done, final=last, signal=stop.name)
    except KeyboardInterrupt:  # a second signal: stop now; the last checkpoint stays valid
        summary.update(status="interrupted", step=max(ckpt.steps(), default=0), final=last,
                       signal=stop.name or "SIGINT")
    except BaseException as e:
        summary.update(error=f"{type(e).__name__}: {e}"[:500])
        raise
    finally:
        bar.close()
        writer.close()
        recorder.close()
        ckpt.close()
        summary["wall_time_s"] = wall_before + time.time() - t0
        steps, secs = timing()
        summary["steps_per_s"] = steps / secs if secs > 0 and steps > 0 else None
        summary.update(setup_s=setup_s, compile_s=compile_s)  # this session's; not in steps_per_s
        rundir.write_summary(workdir, summary)
    return summary
