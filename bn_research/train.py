"""`train_and_evaluate(config, workdir)`: one run, on one device or sharded over a mesh.

`setup` builds the dataset, model, optimizer and pure step functions; the host side of
training (chunk dispatch, metric fetch one chunk behind, log rows, evaluation, divergence,
checkpoints and exact resume, signals, summary) is `bn_research.loop`, shared with the
vectorized replicas of `bn_research.replicas`.

Progress (`progress.py`): lines when setup and compilation start and end; the chunk
programs and the evaluation are compiled ahead of time, so `steps_per_s` in the summary
counts the training loop only (`setup_s`, `compile_s` are recorded beside it); then a bar
on a terminal or periodic step/loss/steps-per-s/ETA lines elsewhere.

Reliability (see `loop.py`, `checkpoint.py`): running again on the same workdir with the
same config resumes from the newest readable checkpoint, bitwise identically to a run
never stopped (the batch order is a pure function of state["rng"] and state["step"]);
SIGTERM / SIGINT stop at the next chunk boundary with a checkpoint; a non-finite loss or
one above `train.max_loss` ends the run as `diverged`.
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from bn_research import (
    config_lib,
    data,
    distributed,
    kernels,
    loop,
    mesh,
    models,
    optim,
    probes,
    progress,
    rundir,
    step,
)

# Re-exported: the host loop's names that scripts and the CLI use through `train`.
EXIT_CODES, chunk_length, setup_phase = loop.EXIT_CODES, loop.chunk_length, loop.setup_phase


def _streamed(config, builder):
    """(Dataset, Stream) of the streaming pipeline: the Dataset holds the whole test split
    and, as its `train`, a sample of the first training batches in stream order (for the
    drift probe's fixed batch and weight norm's data-dependent init; read by every process
    alike), while the Stream feeds this process's part of every training batch."""
    from bn_research.data import stream

    b, seed = int(config.train.batch_size), int(config.seed)
    info = data.info(config.dataset, builder)
    if b > info.num_train:
        return None, info
    want = max(8 * b, int(config.probes.drift.probe_batch_size))
    with stream.Stream(config.dataset, batch_size=b, seed=seed, process_index=0, process_count=1,
                       host_prefetch=0, builder=builder) as first:
        k = min(-(-want // b), first.steps_per_epoch)
        sample = {key: v.reshape((-1,) + v.shape[2:]) for key, v in first.batches(0, k).items()}
    ds = data.Dataset(name=info.name, task=info.task, train=sample, test=data.load_test(config.dataset, builder),
                      num_classes=info.num_classes, input_shape=info.input_shape, output_dim=info.output_dim)
    return ds, stream.Stream(config.dataset, batch_size=b, seed=seed, builder=builder)


def _fits(config, ds) -> bool:
    """True when the cached arrays `ds` (or None) are what the device pipeline would load."""
    if ds is None:
        return False
    x, y = ds.train["x"], ds.train["y"]
    info = data.DatasetInfo(name=ds.name, task=ds.task, num_classes=ds.num_classes, input_shape=ds.input_shape,
                            output_dim=ds.output_dim, num_train=x.shape[0], num_test=ds.test["x"].shape[0],
                            target_shape=tuple(y.shape[1:]))
    return data.choose_pipeline(config.dataset, info) == "device"


def setup(config, dataset=None, *, single_device: bool = False, layout: bool = True):
    """Dataset, model, optimizer and the pure step functions for `config`, placed on the
    mesh of `config.mesh` (bn_research.mesh), or on one device with `single_device`.

    The input pipeline is `data.choose_pipeline` (`dataset.pipeline`): `device` keeps the
    splits on device and draws batches inside jit; `stream` reads training batches from
    disk on the host (bn_research.data.stream) and hands the chunk program K steps of them.

    Returns a dict with `dataset`, `model`, `graphdef`, `state`, `tx`, `fns`, `data`
    (device-resident train/test arrays; `train` is None when streaming), `pipeline`,
    `stream` (the Stream, or None), `num_train`, `mesh` and `probe_layout` (how the probes'
    packed outputs unpack, for `probes.Recorder`; traced once more, so None without
    `layout`: vectorized replicas share their first replica's). Usable from notebooks and
    benchmarks.
    """
    src, pipeline = None, "device"
    cached = None if dataset is not None or config.dataset.get("pipeline", "auto") == "stream" else \
        data.load_cached(config.dataset)
    if dataset is not None:
        ds, num_train = dataset, dataset.train["x"].shape[0]
    elif _fits(config, cached):  # read through tfds by an earlier run: no TensorFlow import
        ds, num_train = cached, cached.train["x"].shape[0]
    else:
        builder = data.prepared_builder(config.dataset)
        try:
            pipeline = data.choose_pipeline(config.dataset, data.info(config.dataset, builder))
        except data.DatasetError as e:
            raise config_lib.ConfigError(str(e)) from None
        if pipeline == "stream":
            ds, src = _streamed(config, builder)
            num_train = src.info.num_train
        else:
            ds = data.load(config.dataset, builder)
            num_train = ds.train["x"].shape[0]
    if config.train.batch_size > num_train:
        raise config_lib.ConfigError(
            f"train.batch_size={config.train.batch_size} is larger than the training split of "
            f"{config.dataset.name} ({num_train} examples); lower it"
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
        batch_sharding=mesh.batch_sharded(m) if sharded else None, streaming=src is not None,
    )
    device_data = {
        "train": None if src is not None else jax.tree_util.tree_map(jnp.asarray, ds.train),
        "test": jax.tree_util.tree_map(jnp.asarray, ds.test),
    }
    if sharded:  # state and dataset replicated; each step's batch is split over the mesh
        state, device_data = mesh.replicate(state, m), mesh.replicate(device_data, m)
    batch = jax.tree_util.tree_map(
        lambda a: jax.ShapeDtypeStruct((int(config.train.batch_size),) + a.shape[1:], a.dtype), ds.train)
    return {"dataset": ds, "model": model, "graphdef": graphdef, "state": state, "tx": tx,
            "fns": fns, "data": device_data, "mesh": m, "pipeline": pipeline, "stream": src,
            "num_train": num_train, "batch_shapes": batch,
            "probe_layout": fns.probe_layout(state, batch) if layout else None}


def chunk_input(s, start: int, n: int):
    """What the chunk program of `setup(...)` = `s` takes for steps start .. start + n - 1:
    the device-resident training split, or the next n streamed batches placed on the mesh
    (batch axis split over `data`); abstract shapes when `start` is None (compilation)."""
    if s["stream"] is None:
        return s["data"]["train"]
    m = s["mesh"]
    sharding = NamedSharding(m, P(None, "data")) if m.size > 1 else None
    if start is None:
        return jax.tree_util.tree_map(
            lambda a: jax.ShapeDtypeStruct((n,) + a.shape, a.dtype, sharding=sharding),
            s["batch_shapes"])
    from bn_research.data import stream

    return stream.to_device(s["stream"].batches(start, n), sharding)


def compile_programs(chunk_fn, eval_fn, s, state, sizes, start: int = 0) -> None:
    """Compile the chunk of each size in `sizes` (for a session from step `start`) and the
    evaluation of `setup(...)` = `s` ahead of time (`.lower().compile()`; jit reuses the
    executables), so the timed loop runs no compiler."""
    for n in sizes:
        chunk_fn.lower(state, chunk_input(s, None, n), n, s["fns"].phase(start)).compile()
    eval_fn.lower(state["params"], state["batch_stats"], s["data"]["test"]).compile()


def base_summary(s) -> dict:
    """The summary fields a run knows before it trains: versions, devices, kernels, mesh."""
    return {"versions": rundir.versions(), "device_kind": jax.devices()[0].device_kind,
            "platform": jax.devices()[0].platform, "num_devices": jax.device_count(),
            "kernels": kernels.kind(), "mesh": mesh.describe(s["mesh"]),
            "distributed": distributed.describe(), "pipeline": s["pipeline"]}


def train_and_evaluate(config: ml_collections.ConfigDict, workdir, *, overwrite=False,
                       dataset=None) -> dict:
    """Train `config` in the run directory `workdir`, return the summary dict.

    A workdir holding a run of the same config resumes it from its newest checkpoint (a
    run already `completed` or `diverged` is returned as it is); one of another config
    raises `rundir.WorkdirError` unless `overwrite`.
    """
    workdir = Path(workdir)
    config_lib.validate(config)
    if config_lib.replicas_enabled(config):
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
    # the dataset and the model are built. Several processes: process 0 holds the lock and
    # writes; an error there stops them all (distributed.on_writer).
    with contextlib.ExitStack() as stack:
        def claim():
            held = stack.enter_context(rundir.WorkdirLock(workdir))
            rundir.check(workdir, config_dict, overwrite=overwrite)
            return held

        lock = distributed.on_writer(claim)
        return _train(config, workdir, config_dict, overwrite=overwrite, dataset=dataset, lock=lock)


def _train(config, workdir: Path, config_dict: dict, *, overwrite: bool, dataset, lock) -> dict:
    """One run through `loop.run`, while holding the workdir's lock."""
    t0 = time.time()
    writer = distributed.is_writer()
    bar = progress.Progress(f"train {workdir.name}", int(config.train.num_steps), quiet=not writer)
    s = loop.setup_phase(bar, config, lambda: setup(config, dataset))
    setup_s = time.time() - t0
    resume = distributed.on_writer(lambda: rundir.prepare(workdir, config_dict, overwrite=overwrite), share=True)
    host = loop.RunHost(config, workdir, s["model"].layer_names(), s["probe_layout"], base_summary(s),
                        writer=writer)
    state, start, meta = s["state"], 0, None
    found = host.restore(state) if resume else None  # every process: orbax restores collectively
    if found is not None:
        start, state, meta = found
    if lock is not None:
        lock.mark()  # from here on the run writes: name it as the workdir's holder
    host.open(start, resumed=bool(resume), meta=meta)
    chunk_fn, eval_fn = step.jit_fns(s["fns"], mesh.replicated(s["mesh"]) if s["mesh"].size > 1 else None)
    test_data = s["data"]["test"]
    programs = loop.Programs(
        chunk=lambda st, at, n: chunk_fn(st, chunk_input(s, at, n), n, s["fns"].phase(at)),
        evaluate=lambda st: eval_fn(st["params"], st["batch_stats"], test_data),
        compile=lambda st, sizes, at: compile_programs(chunk_fn, eval_fn, s, st, sizes, at),
    )
    try:
        return loop.run(config, [host], programs, state, start, bar, t0=t0, setup_s=setup_s)[0]
    finally:
        if s["stream"] is not None:
            s["stream"].close()
