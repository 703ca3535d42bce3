"""Vectorized replicas: N copies of one architecture (seeds x learning rates) trained in one
compiled program under `jax.vmap`, each writing its own run directory.

`config.replicas.seeds` and `config.replicas.learning_rates` list the values; their cross
product (seed-major) gives the replicas, and an empty list means the config's own `seed`
or `optimizer.learning_rate`. Replica i is the run `expand(config)[i]`: the same config
with that seed and rate and an empty `replicas` section, so its run directory reads back
with `runs.load` and `runs.compare` aggregates its seeds like separately launched runs.

Everything a seed decides (initial parameters, data order, noise) lives in the replica's
slice of the stacked TrainState, so replica i follows exactly the steps of
`train.train_and_evaluate(expand(config)[i], ...)`; only float summation order can differ
(batched matmuls). The learning rate enters the optimizer as a traced per-replica value;
the optimizer state's structure does not depend on it.

    summaries = replicas.train_replicas(config, replicas.default_workdirs(config, "runs/sweep"))

Vectorized replicas do not checkpoint or resume: a workdir that holds an unfinished run
needs `overwrite=True`; if every workdir holds a finished run of its config, those
summaries are returned without training.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from bn_research import config_lib, data, kernels, optim, probes, progress, rundir, step, train


def default_config() -> ml_collections.ConfigDict:
    """Defaults for `config.replicas` (also set in `config_lib.base_config`)."""
    c = ml_collections.ConfigDict()
    c.seeds = ()  # one replica per seed (crossed with learning_rates); () = (config.seed,)
    c.learning_rates = ()  # one replica per peak rate; () = (optimizer.learning_rate,)
    return c


def enabled(config) -> bool:
    """True when `config.replicas` asks for vectorized replicas."""
    r = config.get("replicas")
    return r is not None and bool(tuple(r.seeds) or tuple(r.learning_rates))


def expand(config) -> list[ml_collections.ConfigDict]:
    """The single-run configs of the replicas, seed-major."""
    r = config.get("replicas") or default_config()
    seeds = tuple(r.seeds) or (config.seed,)
    rates = tuple(r.learning_rates) or (config.optimizer.learning_rate,)
    out = []
    for seed, rate in itertools.product(seeds, rates):
        c = ml_collections.ConfigDict(config.to_dict())
        c.seed = int(seed)
        c.optimizer.learning_rate = float(rate)
        if "replicas" in c:
            c.replicas.seeds, c.replicas.learning_rates = (), ()
        out.append(c)
    return out


def names(config) -> list[str]:
    """Run directory names of the replicas, e.g. `seed1_lr0.05`."""
    return [f"seed{c.seed}_lr{c.optimizer.learning_rate:g}" for c in expand(config)]


def default_workdirs(config, workdir) -> list[Path]:
    """One subdirectory of `workdir` per replica."""
    return [Path(workdir) / n for n in names(config)]


def validate(config) -> None:
    """Replica settings, checked before any work; raises ConfigError (one line)."""
    configs = expand(config)
    for c in configs:
        if c.optimizer.learning_rate <= 0:
            raise config_lib.ConfigError(
                f"replicas.learning_rates must be > 0, got {c.optimizer.learning_rate}")
    seen = [(c.seed, c.optimizer.learning_rate) for c in configs]
    if len(set(seen)) != len(seen):
        raise config_lib.ConfigError("replicas.seeds and replicas.learning_rates must not repeat values")
    for c in configs:
        config_lib.validate(c)


def _with_rate(config, learning_rate):
    """A copy of `config` whose `optimizer.learning_rate` is the traced per-replica rate,
    for the optimizer and the probes (which read the schedule) built inside the vmap."""
    c = ml_collections.ConfigDict(config.to_dict(), type_safe=False)
    c.optimizer.learning_rate = learning_rate
    return c


def _stack(trees):
    return jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *trees)


def build(config, dataset=None):
    """Stacked initial state and the jitted vectorized chunk / eval functions.

    Returns a dict with `configs`, `setups` (one `train.setup` per replica), `state`
    (leading replica axis on every leaf but the shared `step`), `learning_rates` [N],
    `chunk(state, lrs, train_data, K)` and `evaluate(params, batch_stats, test_data)`.
    The step counter stays unbatched, so cadence conditions (`lax.cond` on the step) stay
    real branches under vmap instead of becoming selects that run both sides.
    """
    configs = expand(config)
    ds = dataset if dataset is not None else data.load(config.dataset)
    setups = [train.setup(c, ds, single_device=True) for c in configs]  # replicas: one device
    graphdef = setups[0]["graphdef"]
    for s in setups[1:]:
        if s["graphdef"] != graphdef:
            raise config_lib.ConfigError("replicas must share one architecture")
    t = config.train

    traced_configs = []

    def fns_for(lr):
        c = _with_rate(configs[0], lr)
        traced_configs.append(c)
        tx = optim.make(c.optimizer, t.num_steps)
        return step.make_step_fns(graphdef, tx, task=ds.task, batch_size=t.batch_size,
                                  eval_batch_size=t.eval_batch_size,
                                  probe_fn=probes.make_probe_fn(c, graphdef, ds.task))

    state = _stack([s["state"] for s in setups])
    state["step"] = jnp.copy(setups[0]["state"]["step"])  # a fresh buffer: the chunk donates it
    axes = {key: (None if key == "step" else 0) for key in state}

    def chunk(state, lrs, train_data, num_steps):
        one = lambda s, lr: fns_for(lr).train_chunk(s, train_data, num_steps)
        return jax.vmap(one, in_axes=(axes, 0), out_axes=(axes, 0))(state, lrs)

    evaluate = jax.vmap(setups[0]["fns"].evaluate, in_axes=(0, 0, None))
    lrs = jnp.asarray([c.optimizer.learning_rate for c in configs], jnp.float32)
    return {"configs": configs, "setups": setups, "state": state, "learning_rates": lrs,
            "share_probe_layouts": lambda: _share_probe_layouts(traced_configs, configs),
            "data": setups[0]["data"], "chunk": jax.jit(chunk, static_argnums=3, donate_argnums=0),
            "evaluate": jax.jit(evaluate)}


def _share_probe_layouts(traced_configs, configs) -> None:
    """Stopgap until probes key their output layouts by architecture only: the probes
    register how their packed outputs unpack under a fingerprint of the whole config (seed
    and learning rate included), recorded when the vmapped step is traced with a traced
    rate; register the same layouts under every replica's own config."""
    layouts, fingerprint = getattr(probes, "_LAYOUTS", None), getattr(probes, "_fingerprint", None)
    if layouts is None or fingerprint is None:
        return
    traced = {fingerprint(c) for c in traced_configs}
    for key, layout in list(layouts.items()):
        if key[0] in traced:
            for c in configs:
                layouts[(fingerprint(c),) + key[1:]] = layout


def _chunk_length(config) -> int:
    t = config.train
    return int(t.steps_per_dispatch) or math.gcd(int(t.log_every), int(t.eval_every))


def _replica(tree, i):
    return jax.tree_util.tree_map(lambda a: a[i], tree)


class _Run:
    """Host side of one replica: its run directory, logging window and summary."""

    def __init__(self, config, workdir: Path, layer_names, index: int, count: int):
        self.config, self.workdir = config, workdir
        self.writer = rundir.MetricsWriter(workdir, config.to_dict(), layer_names)
        self.recorder = probes.Recorder(config, workdir, layer_names)
        self.window, self.last, self.done, self.live = [], {}, 0, True
        self.summary = {"status": "failed", "step": 0, "versions": rundir.versions(),
                        "device_kind": jax.devices()[0].device_kind,
                        "platform": jax.devices()[0].platform, "num_devices": jax.device_count(),
                        "kernels": kernels.kind(), "mesh": {"data": 1},
                        "replica": {"index": index, "count": count, "vectorized": True}}

    def write(self, rows: dict) -> None:
        """Metrics rows {step: {key: value}}, with the recorder's per-unit arrays of those steps."""
        units = self.recorder.units
        for row_step in sorted(set(rows) | set(units)):
            if rows.get(row_step):
                self.writer.write(row_step, rows[row_step])
                self.last.update(rows[row_step])
            if units.get(row_step):
                self.writer.histograms(row_step, units[row_step])

    def process(self, end: int, host: dict, eval_host: dict | None) -> None:
        """Log one fetched chunk (same rows as `train.train_and_evaluate`)."""
        t = self.config.train
        losses = np.asarray(host["loss"])
        bad = ~np.isfinite(losses) | (losses > t.max_loss)
        if bad.any():
            i = int(np.argmax(bad))
            first = end - len(losses) + i + 1
            if i > 0:
                cut = {k: (np.asarray(v)[:i] if np.ndim(v) >= 1 and np.shape(v)[0] == len(losses) else v)
                       for k, v in host.items()}
                self.write(self.recorder.record(first - 1, cut))
            row = {f"train/{k}": float(np.asarray(v)[i]) for k, v in host.items()
                   if np.ndim(v) == 1 and k in step.BASE_METRICS}
            self.writer.write(first, row)
            self.summary.update(status="diverged", step=first, diverged_at=first, final=dict(self.last, **row))
            self.live = False
            return
        self.window.append({k: v for k, v in host.items() if k in step.BASE_METRICS})
        scalars = {}
        if end % t.log_every == 0 or end == t.num_steps:
            keys = self.window[0].keys()
            scalars.update({f"train/{k}": float(np.mean(np.concatenate([b[k] for b in self.window])))
                            for k in keys if np.ndim(self.window[0][k]) == 1})
            self.window.clear()
        if eval_host is not None:
            scalars.update({f"eval/{k}": float(v) for k, v in eval_host.items()})
        rows = self.recorder.record(end, host)
        rows.setdefault(end, {}).update(scalars)
        self.write(rows)
        self.done = end

    def close(self, wall: float, steps_per_s) -> dict:
        self.writer.close()
        self.recorder.close()
        if self.summary["status"] == "failed" and self.done == self.config.train.num_steps:
            self.summary.update(status="completed", step=self.done, final=self.last)
        self.summary.update(wall_time_s=wall, steps_per_s=steps_per_s)
        rundir.write_summary(self.workdir, self.summary)
        return self.summary


def _check_workdirs(configs, workdirs, overwrite):
    """Finished summaries to return as they are, or None to train; raises WorkdirError."""
    if overwrite:
        return None
    finished = [rundir.finished_summary(w, c.to_dict()) for c, w in zip(configs, workdirs, strict=True)]
    if all(f is not None for f in finished):
        return finished
    for w in workdirs:
        if rundir.existing_run_files(w):
            raise rundir.WorkdirError(
                f"workdir {w} already holds a run and vectorized replicas do not resume; pass "
                "--overwrite to train the replicas again or choose a new --workdir")
    return None


def train_replicas(config, workdirs, *, overwrite: bool = False, dataset=None) -> list[dict]:
    """Train the replicas of `config` together; replica i writes `workdirs[i]`.

    Returns the list of per-replica summaries, in the order of `expand(config)`.
    """
    configs = expand(config)
    workdirs = [Path(w) for w in workdirs]
    if len(workdirs) != len(configs):
        raise ValueError(f"{len(configs)} replicas need {len(configs)} workdirs, got {len(workdirs)}")
    validate(config)
    finished = _check_workdirs(configs, workdirs, overwrite)
    if finished is not None:
        return finished
    with contextlib.ExitStack() as locks:  # one writer per workdir, held until the summaries
        held = [locks.enter_context(rundir.WorkdirLock(w)) for w in workdirs]
        return _train(config, configs, workdirs, dataset, held)


def _train(config, configs, workdirs, dataset, locks) -> list[dict]:
    t0 = time.time()
    bar = progress.Progress(f"train {len(configs)} replicas in {Path(workdirs[0]).parent}", int(config.train.num_steps))
    b = train.setup_phase(bar, config, lambda: build(config, dataset))
    timings = {"setup_s": time.time() - t0, "compile_s": 0.0}  # this session's; not in steps_per_s
    for c, w, lock in zip(configs, workdirs, locks, strict=True):
        rundir.prepare(w, c.to_dict(), overwrite=True)
        lock.mark()
    layer_names = b["setups"][0]["model"].layer_names()
    hosts = [_Run(c, w, layer_names, i, len(configs)) for i, (c, w) in enumerate(zip(configs, workdirs, strict=True))]
    t = config.train
    num_steps, k = int(t.num_steps), _chunk_length(config)
    state, lrs = b["state"], b["learning_rates"]
    train_data, test_data = b["data"]["train"], b["data"]["test"]
    pending, start, t_loop, t_done = None, 0, None, None

    def process(item):
        nonlocal t_done
        end, metrics, eval_metrics = item
        host = jax.device_get(metrics)
        eval_host = None if eval_metrics is None else jax.device_get(eval_metrics)
        for i, h in enumerate(hosts):
            if h.live:
                h.process(end, _replica(host, i), None if eval_host is None else _replica(eval_host, i))
        t_done = time.time()
        losses = [h.last["train/loss"] for h in hosts if "train/loss" in h.last]
        bar.update(end, float(np.mean(losses)) if losses else None)
        return any(h.live for h in hosts)

    try:
        sizes, t_compile = train.chunk_sizes(0, num_steps, k), time.time()
        with bar.phase("compile", f"chunks of {', '.join(map(str, sizes))} steps, evaluation"):
            for n in sizes:  # ahead of time, so steps_per_s excludes compilation
                b["chunk"].lower(state, lrs, train_data, n).compile()
            b["evaluate"].lower(state["params"], state["batch_stats"], test_data).compile()
        b["share_probe_layouts"]()
        bar.start(0)
        t_loop = time.time()
        timings["compile_s"] = t_loop - t_compile
        ok = True
        while start < num_steps and ok:
            n = min(k, num_steps - start)
            state, metrics = b["chunk"](state, lrs, train_data, n)
            if start == 0:
                b["share_probe_layouts"]()
            end = start + n
            eval_metrics = None
            if end % t.eval_every == 0 or end == num_steps:
                eval_metrics = b["evaluate"](state["params"], state["batch_stats"], test_data)
            if pending is not None:
                ok = process(pending)
            pending, start = (end, metrics, eval_metrics), end
        if ok and pending is not None:
            process(pending)
    except KeyboardInterrupt:
        for h in hosts:
            if h.live:
                h.summary.update(status="interrupted", step=h.done, final=h.last)
        raise
    finally:
        bar.close()
        wall = time.time() - t0
        done = max(h.done for h in hosts)
        rate = done / (t_done - t_loop) if done and t_loop is not None and t_done > t_loop else None
        for h in hosts:
            h.summary.update(timings)
        summaries = [h.close(wall, rate) for h in hosts]
    return summaries
