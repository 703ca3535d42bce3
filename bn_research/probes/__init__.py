"""Probes: measurements computed inside the jitted training step.

Each probe is a module with `default_config()`, `init(config, ctx) -> state` and
`measure(config, info, ctx, state) -> ({"scalars": {key: []}, "units": {key: [U]}}, state)`,
switched on and given a cadence under `config.probes.<name>` (`enabled`, `every`; every=0
means `train.log_every`). A probe runs as one or more parts (drift as two: `parts`), each
with its cadence: the first step and every step whose row number is a multiple of it. The
chunk program (`step.make_step_fns`) calls the probe function built by `make_probe_fn` in
every step for the parts of cadence 1, and only in its probe steps, under one `lax.cond`
per cadence, for the others, so the steps between them are the plain training step. Per-step
outputs land in the metrics dict as (zeros and an invalid flag where a part did not run)

    probes/<name>/valid     bool, True at the part's cadence steps
    probes/<name>/scalars   [S]  packed scalars -> metrics.jsonl keys (e.g. ics/dense_0/grad_diff)
    probes/<name>/units     [U]  packed per-unit arrays -> layer_stats/

(packed in sorted key order by `common.pack`; `ProbeFn.layout`, computed once per run from
the step's abstract shapes, says how they unpack)

and the host side `Recorder` turns the valid rows of each fetched chunk into metrics rows
and per-layer store chunks. Probe state (initial and previous statistics, the fixed probe
batch) lives in `TrainState["probes"][<name>]`, on device, checkpointed with the rest.
See docs/probes.md for every statistic, its formula and its paper.
"""

from __future__ import annotations

import math
from collections import defaultdict

import ml_collections
import numpy as np

from bn_research.probes import common, drift, growth, ics, landscape, store, weights

# name -> module; order is the order of evaluation inside the step.
PROBES = {"drift": drift, "growth": growth, "weights": weights, "ics": ics, "landscape": landscape}


def get(name: str):
    if name not in PROBES:
        raise ValueError(f"unknown probe '{name}'; choose one of: {', '.join(PROBES)}")
    return PROBES[name]


def default_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    for name, mod in PROBES.items():
        c[name] = mod.default_config()
    return c


def validate(cfg) -> None:
    """Raise ValueError (one line) for impossible probe settings."""
    for name in cfg.keys():
        get(name)
        p = cfg[name]
        if not isinstance(p.enabled, bool):
            raise ValueError(f"probes.{name}.enabled must be true or false, got {p.enabled!r}")
        if int(p.every) < 0:
            raise ValueError(f"probes.{name}.every must be >= 0 (0 = train.log_every), got {p.every}")
    if int(cfg.drift.detail_every) < 0:
        raise ValueError(f"probes.drift.detail_every must be >= 0 (0 = train.log_every), got {cfg.drift.detail_every}")
    if int(cfg.drift.percentile_samples) < 0:
        raise ValueError(f"probes.drift.percentile_samples must be >= 0, got {cfg.drift.percentile_samples}")
    if int(cfg.drift.probe_batch_size) < 0:
        raise ValueError(f"probes.drift.probe_batch_size must be >= 0, got {cfg.drift.probe_batch_size}")
    landscape.validate(cfg.landscape)


def parts(config) -> dict:
    """{part: (cadence in steps, init, measure)} of the enabled probes, in evaluation order.
    A probe is one part named after it, plus any its module's `extra_parts(probe config,
    log_every)` adds (drift: `drift_detail`, its percentiles and probe-batch statistics at
    `probes.drift.detail_every`)."""
    out = {}
    log_every = int(config.train.log_every)
    for name, mod in PROBES.items():
        p = config.probes[name]
        if not p.enabled:
            continue
        out[name] = (int(p.every) or log_every, mod.init, mod.measure)
        if hasattr(mod, "extra_parts"):
            out.update(mod.extra_parts(p, log_every))
    return out


def enabled(config) -> dict[str, int]:
    """{part: cadence in steps} of the enabled probes (see `parts`)."""
    return {name: every for name, (every, _, _) in parts(config).items()}


class ProbeFn:
    """The in-step probe function of one config: `probe_fn(ctx, periodic) -> (metrics,
    probe_state)` packs each part's outputs into one vector per kind (a scan output per key
    costs more per step on CPU than the measurement itself); `layout(shapes)` says how they
    unpack.

    Parts with cadence 1 run in every step. The others are `periodic`: they run, under one
    `lax.cond` per cadence, only in the steps the chunk program marks as probe steps
    (`step.make_step_fns`: the first step of a chunk and every step whose row number is a
    multiple of `period`), so that the other steps are the plain training step."""

    def __init__(self, config, graphdef):
        self.config, self.graphdef = config, graphdef
        self.parts = parts(config)
        self.cadence = {name: every for name, (every, _, _) in self.parts.items()}
        self.every_step = tuple(n for n, e in self.cadence.items() if e == 1)
        self.periodic = tuple(n for n, e in self.cadence.items() if e > 1)
        self.schedule = weights.make_schedule(config)
        from bn_research import loop  # loop imports this module

        # every cadence point of a periodic part is a multiple of `period`, and so is every
        # chunk start: the probe steps sit at fixed places in a chunk program
        k = loop.chunk_length(config)
        self.period = math.gcd(k, *(self.cadence[n] for n in self.periodic)) if self.periodic else 0

    def measure(self, ctx, names=None):
        """({part: {"scalars": {key: array}, "units": {key: array}}}, {part: valid flag},
        {part: new state}) of the parts `names` (all when None): each at its cadence, zeros
        elsewhere."""
        st = ctx["state"]
        info = {"layer_names": common.layer_names(st["params"]), "graphdef": self.graphdef,
                "schedule": self.schedule}
        results, valid, new_state = {}, {}, {}
        # parts of one cadence share one `lax.cond` (the default probes all run at
        # log_every): XLA:CPU pays for every conditional, and one branch fuses across parts
        by_cadence: dict[int, list[str]] = {}
        for name in (self.cadence if names is None else names):
            by_cadence.setdefault(self.cadence[name], []).append(name)
        for every, group in by_cadence.items():
            pstates = {name: st["probes"][name] for name in group}

            def run(group=group, pstates=pstates):
                outs = {name: self.parts[name][2](self.config, info, ctx, pstates[name]) for name in group}
                return {n: o[0] for n, o in outs.items()}, {n: o[1] for n, o in outs.items()}

            if every == 1:
                flag = np.bool_(True)
                res, new = run()
            else:
                flag = common.on_cadence(st["step"], every)
                res, new = common.maybe(flag, run, pstates)
            for name in group:
                valid[name], results[name], new_state[name] = flag, res[name], new[name]
        return results, valid, new_state

    def __call__(self, ctx, periodic: bool = True):
        """(packed outputs, new probe state) of the every-step parts, and of the periodic
        parts too when `periodic` (a probe step); the others keep their state."""
        results, valid, new = self.measure(ctx, None if periodic else self.every_step)
        out = {}
        for name, res in results.items():
            out[f"probes/{name}/valid"] = valid[name]
            for kind in ("scalars", "units"):
                packed = common.pack(res[kind])  # a StackedDict: whole stacks at once, then one gather
                if packed is not None:
                    out[f"probes/{name}/{kind}"] = packed
        return out, dict(ctx["state"]["probes"], **new)

    @staticmethod
    def layout(shapes) -> dict:
        """{(probe, kind): [(key, size)]}, the order of the packed vectors, from the shapes
        of `measure`'s results (`jax.eval_shape`; see `step.StepFns.probe_layout`)."""
        return {(name, kind): common.pack_layout(res[kind])
                for name, res in shapes.items() for kind in ("scalars", "units")}


def make_probe_fn(config, graphdef, task):
    """The in-step `ProbeFn` for `make_step_fns`, or None when no probe is enabled."""
    del task
    return ProbeFn(config, graphdef) if enabled(config) else None


def init_state(config, graphdef, train_state, dataset):
    """Initial probe state (a pytree carried in `TrainState["probes"]`)."""
    ctx = {"train_state": train_state, "graphdef": graphdef, "dataset": dataset,
           "layer_names": common.layer_names(train_state["params"])}
    return {name: init(config, ctx) for name, (_, init, _) in parts(config).items()}


def _split_unit_key(key: str) -> tuple[str, str]:
    """'dist/dense_0/train/act_in_mean' -> ('dense_0', 'dist/train/act_in_mean')."""
    ns, layer, rest = key.split("/", 2)
    return layer, f"{ns}/{rest}"


class Recorder:
    """Host side: turns the per-step probe outputs of a chunk into metrics rows and
    per-unit arrays in the run directory (`layer_stats/`)."""

    def __init__(self, config, workdir, layer_names, layout: dict | None = None):
        self.workdir = workdir
        self.layer_names = list(layer_names)
        self.cadence = enabled(config)
        self.layout = layout or {}  # ProbeFn.layout of the run's step
        self.units: dict[int, dict] = {}  # the last chunk's per-unit arrays {step: {(layer, stat): [U]}}

    def record(self, end_step: int, host_metrics: dict) -> dict:
        """Rows {step: {key: value}} for metrics.jsonl from one fetched chunk; writes the
        chunk's per-unit arrays, one store file per probe with any valid row, and keeps them
        in `self.units` (for TensorBoard histograms)."""
        rows: dict[int, dict] = defaultdict(dict)
        self.units = defaultdict(dict)
        for name in self.cadence:
            flag = host_metrics.get(f"probes/{name}/valid")
            if flag is None:
                continue
            valid = np.atleast_1d(np.asarray(flag)).astype(bool)
            k = valid.shape[0]
            idx = np.nonzero(valid)[0]
            if not len(idx):
                continue
            steps = [int(end_step - k + i + 1) for i in idx]
            arrays = {}
            for kind in ("scalars", "units"):
                packed = host_metrics.get(f"probes/{name}/{kind}")
                if packed is None:
                    continue
                packed = np.asarray(packed)[idx]
                offset = 0
                for key, size in self.layout[(name, kind)]:
                    v = packed[:, offset:offset + size]
                    offset += size
                    if kind == "scalars":
                        for s, value in zip(steps, v[:, 0], strict=True):
                            rows[s][key] = float(value)
                    else:
                        arrays[_split_unit_key(key)] = v
            if arrays:
                store.write_chunk(self.workdir, end_step, steps, arrays, tag=name)
                for j, s in enumerate(steps):
                    self.units[s].update({pair: v[j] for pair, v in arrays.items()})
        return dict(rows)

    def truncate(self, step: int) -> None:
        """On resume from `step`: drop per-unit chunks written after it."""
        store.truncate(self.workdir, step)

    def close(self) -> None:
        pass


def read_layer_stats(workdir):
    """The per-unit arrays of a run as a long DataFrame (step, layer, stat, unit, value)."""
    return store.read(workdir)
