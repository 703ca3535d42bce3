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

The host side is `bn_research.loop`, the same as a single run's: replica i writes its own
rows, probes, summary and checkpoints (its slice of the stacked state, a single run's
TrainState). Running again on the same workdirs resumes every unfinished replica from the
newest checkpoint they all have; replicas already finished (`completed`, `diverged`) keep
their run directories untouched and only fill their slot of the vectorized program. If
every workdir holds a finished run of its config, those summaries are returned at once.
"""

from __future__ import annotations

import contextlib
import itertools
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from bn_research import config_lib, data, kernels, loop, optim, probes, progress, rundir, step, train


def default_config() -> ml_collections.ConfigDict:
    """Defaults for `config.replicas` (also set in `config_lib.base_config`)."""
    c = ml_collections.ConfigDict()
    c.seeds = ()  # one replica per seed (crossed with learning_rates); () = (config.seed,)
    c.learning_rates = ()  # one replica per peak rate; () = (optimizer.learning_rate,)
    c.program = "auto"  # vmap | map | auto: how the replicas share the program (see `build`)
    return c


PROGRAMS = ("auto", "vmap", "map")
# 'map': replicas per `lax.map` iteration, their chunks written side by side so that
# XLA:CPU runs them on its threads at once (8 replicas of configs/cnn.py, 10-step chunks:
# 37.9 replica-steps/s in groups of 2, 38.0 in groups of 4, 32.9 one at a time; 33.4 for
# the 8 as separate runs). Each group's chunk is compiled once, so compile time grows
# little (4.9 s against 4.8 s for one replica's chunk).
MAP_GROUP = 2


enabled = config_lib.replicas_enabled  # True when `config.replicas` asks for vectorized replicas


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
    program = _program_setting(config)
    if program not in PROGRAMS:
        raise config_lib.ConfigError(f"replicas.program={program!r}; choose one of: {', '.join(PROGRAMS)}")
    if config.dataset.get("pipeline", "auto") == "stream":
        raise config_lib.ConfigError("vectorized replicas draw each seed's batches on device; set "
                                     "dataset.pipeline=device (or auto) or train the seeds as separate runs")


def _with_rate(config, learning_rate):
    """A copy of `config` whose `optimizer.learning_rate` is the traced per-replica rate,
    for the optimizer and the probes (which read the schedule) built inside the vmap."""
    c = ml_collections.ConfigDict(config.to_dict(), type_safe=False)
    c.optimizer.learning_rate = learning_rate
    return c


def _stack(trees):
    return jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *trees)


def _program_setting(config) -> str:
    return (config.get("replicas") or default_config()).get("program", "auto")


def program_for(config, state) -> str:
    """'vmap' or 'map': `replicas.program`, or for 'auto' `kernels.replica_program` of a
    model with convolutions (a 4-d parameter) or without."""
    chosen = _program_setting(config)
    if chosen != "auto":
        return chosen
    has_conv = any(np.ndim(leaf) == 4 for leaf in jax.tree_util.tree_leaves(state["params"]))
    return kernels.replica_program(has_conv)


def build(config, dataset=None):
    """Stacked initial state and the jitted replica chunk / eval functions.

    Returns a dict with `configs`, `setups` (one `train.setup` per replica), `state`
    (leading replica axis on every leaf but the shared `step`), `learning_rates` [N],
    `program` ('vmap' or 'map', see `program_for`), `chunk(state, lrs, train_data, K,
    phase)` (phase: `setups[0]["fns"].phase(start)`) and `evaluate(params, batch_stats,
    test_data)`.

    'vmap' vectorizes the replicas' chunks; 'map' runs them MAP_GROUP at a time inside the
    one compiled chunk (`lax.map` over groups), which XLA:CPU runs faster for convolutional
    models (see `kernels.replica_program`). Both give every replica exactly its own steps.
    The step counter stays unbatched, so cadence conditions (`lax.cond` on the step) stay
    real branches under vmap instead of becoming selects that run both sides.
    """
    configs = expand(config)
    ds = dataset if dataset is not None else data.load(config.dataset)
    # replicas: one device; one architecture, so the first replica's probe layout serves all
    setups = [train.setup(c, ds, single_device=True, layout=i == 0) for i, c in enumerate(configs)]
    graphdef = setups[0]["graphdef"]
    for s in setups[1:]:
        if s["graphdef"] != graphdef:
            raise config_lib.ConfigError("replicas must share one architecture")
    t = config.train

    def fns_for(lr):
        c = _with_rate(configs[0], lr)
        tx = optim.make(c.optimizer, t.num_steps)
        return step.make_step_fns(graphdef, tx, task=ds.task, batch_size=t.batch_size,
                                  eval_batch_size=t.eval_batch_size,
                                  probe_fn=probes.make_probe_fn(c, graphdef, ds.task))

    state = _stack([s["state"] for s in setups])
    state["step"] = jnp.copy(setups[0]["state"]["step"])  # a fresh buffer: the chunk donates it
    axes = {key: (None if key == "step" else 0) for key in state}

    program = program_for(config, setups[0]["state"])

    def chunk(state, lrs, train_data, num_steps, phase=0):
        one = lambda s, lr: fns_for(lr).train_chunk(s, train_data, num_steps, phase)
        if program == "vmap":
            return jax.vmap(one, in_axes=(axes, 0), out_axes=(axes, 0))(state, lrs)

        def group(own, lrs):  # replicas side by side: independent chunks in one program
            outs = [one(dict(_index(own, j), step=state["step"]), lrs[j]) for j in range(lrs.shape[0])]
            st = _stack([{k: v for k, v in o[0].items() if k != "step"} for o in outs])
            return st, (outs[0][0]["step"], _stack([o[1] for o in outs]))

        own = {k: v for k, v in state.items() if k != "step"}
        n = lrs.shape[0]
        g = min(MAP_GROUP, n)
        full = n // g * g
        head = jax.tree_util.tree_map(lambda a: a[:full].reshape((full // g, g) + a.shape[1:]), (own, lrs))
        st, (steps, metrics) = jax.lax.map(lambda xs: group(*xs), head)
        st, metrics = jax.tree_util.tree_map(lambda a: a.reshape((full,) + a.shape[2:]), (st, metrics))
        if full < n:  # the last n % g replicas
            rest = jax.tree_util.tree_map(lambda a: a[full:], (own, lrs))
            st_r, (_, metrics_r) = group(*rest)
            st, metrics = jax.tree_util.tree_map(lambda a, b: jnp.concatenate([a, b]), (st, metrics), (st_r, metrics_r))
        return dict(st, step=steps[0]), metrics

    evaluate = jax.vmap(setups[0]["fns"].evaluate, in_axes=(0, 0, None))
    lrs = jnp.asarray([c.optimizer.learning_rate for c in configs], jnp.float32)
    return {"configs": configs, "setups": setups, "state": state, "learning_rates": lrs, "program": program,
            "data": setups[0]["data"], "chunk": jax.jit(chunk, static_argnums=(3, 4), donate_argnums=0),
            "evaluate": jax.jit(evaluate)}


def _index(tree, i):
    """Replica i of a stacked (traced) tree."""
    return jax.tree_util.tree_map(lambda a: a[i], tree)


def _part(tree, i):
    """Replica i's part of a stacked tree; unbatched leaves (the shared `step`) as they are."""
    return jax.tree_util.tree_map(lambda a: np.asarray(a[i]) if np.ndim(a) else a, tree)


def train_replicas(config, workdirs, *, overwrite: bool = False, dataset=None) -> list[dict]:
    """Train the replicas of `config` together; replica i writes `workdirs[i]`.

    Returns the list of per-replica summaries, in the order of `expand(config)`.
    """
    configs = expand(config)
    workdirs = [Path(w) for w in workdirs]
    if len(workdirs) != len(configs):
        raise ValueError(f"{len(configs)} replicas need {len(configs)} workdirs, got {len(workdirs)}")
    validate(config)
    finished = [None if overwrite else rundir.finished_summary(w, c.to_dict())
                for c, w in zip(configs, workdirs, strict=True)]
    if all(f is not None for f in finished):
        return finished
    with contextlib.ExitStack() as locks:  # one writer per workdir, held until the summaries
        held = [locks.enter_context(rundir.WorkdirLock(w)) for w in workdirs]
        for c, w in zip(configs, workdirs, strict=True):  # before any work: another config's run
            rundir.check(w, c.to_dict(), overwrite=overwrite)
        return _train(config, configs, workdirs, finished, overwrite, dataset, held)


def _restore(hosts, resumed, state, live):
    """(start, state, {replica: meta}): the newest step every live replica has a readable
    checkpoint of, with their slices put into the stacked `state`; (0, state, {}) if none."""
    if not live or not all(resumed[i] for i in live):
        return 0, state, {}
    common = set.intersection(*(set(hosts[i].ckpt.steps()) for i in live))
    host_state = jax.device_get(state)
    while common:
        found = {i: hosts[i].restore(_part(host_state, i), steps=common) for i in live}
        if any(f is None for f in found.values()):
            break
        steps = {at for at, _, _ in found.values()}
        if len(steps) == 1:  # every replica read the same step
            start = steps.pop()
            parts = [found[i][1] if i in found else _part(host_state, i) for i in range(len(hosts))]
            stacked = {k: _stack([p[k] for p in parts]) for k in state if k != "step"}
            stacked["step"] = jnp.asarray(start, jnp.int32)
            return start, stacked, {i: found[i][2] for i in live}
        common = {at for at in common if at <= min(steps)}
    return 0, state, {}


def _train(config, configs, workdirs, finished, overwrite, dataset, locks) -> list[dict]:
    t0 = time.time()
    bar = progress.Progress(f"train {len(configs)} replicas in {Path(workdirs[0]).parent}",
                            int(config.train.num_steps))
    b = loop.setup_phase(bar, config, lambda: build(config, dataset))
    setup_s = time.time() - t0
    first = b["setups"][0]
    live = [i for i, f in enumerate(finished) if f is None]
    resumed = [rundir.prepare(w, c.to_dict(), overwrite=overwrite) if finished[i] is None else True
               for i, (c, w) in enumerate(zip(configs, workdirs, strict=True))]
    base = train.base_summary(first)
    hosts = [loop.RunHost(c, w, first["model"].layer_names(), first["probe_layout"],
                          dict(base, replica={"index": i, "count": len(configs), "vectorized": True,
                                                "program": b["program"]}),
                          writer=finished[i] is None)
             for i, (c, w) in enumerate(zip(configs, workdirs, strict=True))]
    start, state, metas = _restore(hosts, resumed, b["state"], live)
    for i, h in enumerate(hosts):
        if finished[i] is None:
            locks[i].mark()
            h.open(start, resumed=resumed[i], meta=metas.get(i))
        else:  # a finished replica only fills its slot; its run directory stays as it is
            h.live = False
            h.open(start, resumed=False)
    lrs, train_data, test_data = b["learning_rates"], b["data"]["train"], b["data"]["test"]

    phase = first["fns"].phase

    def compile_all(st, sizes, at):
        for n in sizes:
            b["chunk"].lower(st, lrs, train_data, n, phase(at)).compile()
        b["evaluate"].lower(st["params"], st["batch_stats"], test_data).compile()

    programs = loop.Programs(
        chunk=lambda st, start, n: b["chunk"](st, lrs, train_data, n, phase(start)),
        evaluate=lambda st: b["evaluate"](st["params"], st["batch_stats"], test_data),
        compile=compile_all, part=_part)
    summaries = loop.run(config, hosts, programs, state, start, bar, t0=t0, setup_s=setup_s)
    return [f if f is not None else out for f, out in zip(finished, summaries, strict=True)]
