"""`train_and_evaluate(config, workdir)`: the training loop around the pure step.

The loop dispatches chunks of K steps (`lax.scan` inside one jitted call), then fetches
the previous chunk's metrics while the next chunk runs, so the host never waits on the
device except at the end. Evaluation runs on the test split with running statistics
every `train.eval_every` steps and at the end.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from tqdm.auto import tqdm

from bn_research import config_lib, data, models, optim, probes, rundir, step


def chunk_length(config) -> int:
    t = config.train
    if t.steps_per_dispatch:
        return int(t.steps_per_dispatch)
    return math.gcd(int(t.log_every), int(t.eval_every))


def setup(config, dataset=None):
    """Dataset, model, optimizer and the pure step functions for `config`.

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
    fns = step.make_step_fns(
        graphdef, tx, task=ds.task, batch_size=config.train.batch_size,
        eval_batch_size=config.train.eval_batch_size, probe_fn=probe_fn,
    )
    device_data = {
        "train": jax.tree_util.tree_map(jnp.asarray, ds.train),
        "test": jax.tree_util.tree_map(jnp.asarray, ds.test),
    }
    return {"dataset": ds, "model": model, "graphdef": graphdef, "state": state, "tx": tx,
            "fns": fns, "data": device_data}


def _window_means(buffers: list[dict]) -> dict:
    """Mean of each per-step train metric over the logging window."""
    keys = buffers[0].keys()
    return {f"train/{k}": float(np.mean(np.concatenate([b[k] for b in buffers])))
            for k in keys if np.ndim(buffers[0][k]) == 1}


def train_and_evaluate(config: ml_collections.ConfigDict, workdir, *, overwrite=False,
                       dataset=None) -> dict:
    """Train `config`, write the run directory `workdir`, return the summary dict."""
    workdir = Path(workdir)
    config_lib.validate(config)
    config_dict = config.to_dict()
    t0 = time.time()
    s = setup(config, dataset)
    rundir.prepare(workdir, config_dict, overwrite=overwrite)
    writer = rundir.MetricsWriter(workdir)
    recorder = probes.Recorder(config, workdir, s["model"].layer_names())
    chunk_fn, eval_fn = step.jit_fns(s["fns"])
    t = config.train
    num_steps, k = int(t.num_steps), chunk_length(config)
    state, train_data, test_data = s["state"], s["data"]["train"], s["data"]["test"]

    summary = {"status": "failed", "step": 0, "versions": rundir.versions(),
               "device_kind": jax.devices()[0].device_kind,
               "platform": jax.devices()[0].platform, "num_devices": jax.device_count()}
    window, last = [], {}
    pending = None
    done = 0
    t_first = None  # wall time when the first chunk finished (excludes compilation)
    bar = tqdm(total=num_steps, desc=f"train {workdir.name}", unit="step", disable=None)

    def process(item):
        nonlocal done, t_first
        end, metrics, eval_metrics = item
        host = jax.device_get(metrics)
        losses = np.asarray(host["loss"])
        bad = ~np.isfinite(losses) | (losses > t.max_loss)
        if bad.any():
            first = end - len(losses) + int(np.argmax(bad)) + 1
            row = {f"train/{key}": float(np.asarray(v)[int(np.argmax(bad))])
                   for key, v in host.items() if np.ndim(v) == 1}
            writer.write(first, row)
            summary.update(status="diverged", step=first, diverged_at=first,
                           final=dict(last, **row))
            return False
        window.append({key: v for key, v in host.items() if key in step.BASE_METRICS})
        scalars = {}
        if end % t.log_every == 0 or end == num_steps:
            scalars.update(_window_means(window))
            window.clear()
        if eval_metrics is not None:
            scalars.update({f"eval/{key}": float(v)
                            for key, v in jax.device_get(eval_metrics).items()})
        rows = recorder.record(end, host)  # {step: {"ics/dense_0/...": value}}
        rows.setdefault(end, {}).update(scalars)
        for row_step in sorted(rows):
            if rows[row_step]:
                writer.write(row_step, rows[row_step])
                last.update(rows[row_step])
        bar.update(end - done)
        if "train/loss" in scalars:
            bar.set_postfix(loss=f"{scalars['train/loss']:.4f}")
        done = end
        if t_first is None:
            t_first = (time.time(), end)
        return True

    try:
        ok = True
        start = 0
        while start < num_steps and ok:
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
        if ok and pending is not None:
            ok = process(pending)
        if ok:
            summary.update(status="completed", step=num_steps, final=last)
    except KeyboardInterrupt:
        summary.update(status="interrupted", step=done, final=last)
        raise
    finally:
        bar.close()
        writer.close()
        recorder.close()
        wall = time.time() - t0
        summary["wall_time_s"] = wall
        if t_first is not None and done > t_first[1]:
            summary["steps_per_s"] = (done - t_first[1]) / max(time.time() - t_first[0], 1e-9)
        else:
            summary["steps_per_s"] = done / wall if wall > 0 else None
        rundir.write_summary(workdir, summary)
    return summary
