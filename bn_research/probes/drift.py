"""Distribution drift: internal covariate shift as Ioffe & Szegedy (2015) defined it.

For every hidden layer, per unit (for conv layers pooled over batch and space): the mean
and variance of the normalization's input and of the nonlinearity's input, and the
15th/50th/85th percentiles of the nonlinearity's input (their Fig. 1). Each is measured
on the training batch of the step and on a fixed probe batch (drawn once at init,
forward pass in training mode, running statistics left alone), so that drift caused by
the parameters can be told apart from batch-to-batch sampling noise. Drift is the root
mean square over units of the change since the previous cadence point (`_drift`) and
since initialization (`_drift_init`). Statistics are computed a group of layers at a time
(`common.aux_groups`: one vmap over a scanned stack) and kept so in the probe state.

The probe runs in two parts with their own cadence, so that the cheap part can run every
step: the moments (means and variances) on the training batch, from activations the step
already computed, every `probes.drift.every` steps (probe `drift`); the percentiles on the
training batch and every statistic on the probe batch, which needs a forward pass of its
own, every `probes.drift.detail_every` steps (probe `drift_detail`; both default to
`train.log_every`). Each part's `_drift` is the change since its own previous cadence point.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from bn_research import kernels, onednn
from bn_research.probes import common

PERCENTILES = (15.0, 50.0, 85.0)
MOMENTS = ("norm_in_mean", "norm_in_var", "act_in_mean", "act_in_var")
PERCENTILE_STATS = ("act_in_p15", "act_in_p50", "act_in_p85")
STATS = MOMENTS + PERCENTILE_STATS
SOURCES = ("train", "probe")
# Percentiles of N samples x U units by pairwise ranks while N * N * U is at most this,
# else by bisection (`order_statistics`). Measured on XLA:CPU (one call in a 50-step loop):
# N x U = 32 x 300: pairwise 0.13 ms, bisection 0.16; 60 x 32: 0.03 / 0.08;
# 60 x 300: 0.31 / 0.26; 256 x 48: 0.65 / 0.15; 256 x 300: 5.3 / 0.96; the MLP's 3 layers of
# 60 x 100 (one vmap): 0.29 / 0.25. With the native library (kind 'onednn') the larger ones
# go to `onednn.order_statistics`, which itself ranks pairwise up to 256 values per column,
# on the calling thread: the MLP's 3 x 60 x 100 0.24 -> 0.17 ms per call alone, and a probe
# step of the default MLP probes 1.21 -> 0.83 ms (its OpenMP threads had shared the cores
# with XLA's).
PAIRWISE_MAX_ELEMENTS = 200_000


def default_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.enabled = True  # cheap: statistics of activations the step already computes
    c.every = 0  # cadence of the moments on the training batch, in steps; 0 = train.log_every
    c.detail_every = 0  # cadence of the percentiles and the probe batch; 0 = train.log_every
    c.probe_batch = True  # also measure on the fixed probe batch (one extra forward pass)
    c.probe_batch_size = 0  # examples in the fixed probe batch; 0 = train.batch_size
    c.percentile_samples = 4096  # percentiles over at most this many (strided) positions per unit; 0 = all
    return c


def _sort_keys(a):
    """uint32 keys whose unsigned order is the order of the float32 values `a`."""
    i = jax.lax.bitcast_convert_type(a.astype(jnp.float32), jnp.uint32)
    return jnp.where(i >> 31 == 1, ~i, i | jnp.uint32(0x80000000))


def _from_keys(k):
    i = jnp.where(k >> 31 == 1, k & jnp.uint32(0x7FFFFFFF), ~k)
    return jax.lax.bitcast_convert_type(i, jnp.float32)


def order_statistics(a, ranks, successors: bool = False):
    """[len(ranks), U]: the ranks[r]-th smallest value (0-based) of each column of a [N, U],
    exactly, without a sort: a bisection on the float32 bit patterns (32 rounds of counting
    how many values lie at or below a threshold, for every rank and unit at once). On
    XLA:CPU this is ~5x faster than sorting 4096 x 64 values, and it is exact. With
    `successors`, also the (ranks[r] + 1)-th smallest values, from one more pass."""
    u = _sort_keys(a)
    k = jnp.asarray(ranks, jnp.int32)[:, None]
    shape = (len(ranks), u.shape[1])
    lo, hi = jnp.broadcast_to(u.min(0), shape), jnp.broadcast_to(u.max(0), shape)

    def halve(_, bounds):  # invariant: the answer lies in [lo, hi]
        lo, hi = bounds
        mid = lo + (hi - lo) // 2
        enough = jnp.sum(u[None] <= mid[:, None], axis=1, dtype=jnp.int32) >= k + 1
        return jnp.where(enough, lo, mid + 1), jnp.where(enough, mid, hi)

    lo, _ = jax.lax.fori_loop(0, 32, halve, (lo, hi))
    if not successors:
        return _from_keys(lo)
    # the next order statistic: the same value if it repeats, else the smallest one above
    at_or_below = jnp.sum(u[None] <= lo[:, None], axis=1, dtype=jnp.int32)
    above = jnp.min(jnp.where(u[None] > lo[:, None], u[None], jnp.uint32(0xFFFFFFFF)), axis=1)
    return _from_keys(lo), _from_keys(jnp.where(at_or_below >= k + 2, lo, above))


def percentiles(a, max_samples: int = 0):
    """Per-unit PERCENTILES of a [N, U] array (linear interpolation, as numpy's default).

    With `max_samples` > 0 and N larger, they are taken over the evenly strided subsample
    a[::ceil(N / max_samples)] (conv layers: batch x space positions), to bound the cost of
    the order statistics.
    """
    n = a.shape[0]
    if max_samples and n > max_samples:
        a = a[:: -(-n // max_samples)]
        n = a.shape[0]
    positions = [q / 100.0 * (n - 1) for q in PERCENTILES]
    ranks = sorted({r for pos in positions for r in (int(np.floor(pos)), min(int(np.floor(pos)) + 1, n - 1))})
    lows = sorted({int(np.floor(pos)) for pos in positions})
    if n * n * a.shape[1] <= PAIRWISE_MAX_ELEMENTS:
        # Order statistics by pairwise ranks (one fused op for a few hundred samples):
        # the stable rank of a_i is #{j: a_j < a_i} + #{j < i: a_j = a_i}, a permutation.
        less = a[None, :, :] < a[:, None, :]  # [i, j, U]: a_j < a_i
        tie = (a[None, :, :] == a[:, None, :]) & (jnp.arange(n)[None, :] < jnp.arange(n)[:, None])[..., None]
        rank = jnp.sum(less | tie, axis=1)  # [N, U]
        stats = {r: jnp.sum(jnp.where(rank == r, a, 0.0), axis=0) for r in ranks}
    else:
        if kernels.kind() == "onednn" and a.dtype == jnp.float32:
            low, nxt = onednn.order_statistics(a, lows)  # the same values by selection (native code)
        else:
            low, nxt = order_statistics(a, lows, successors=True)  # ranks r and r + 1: one bisection
        stats = {r: low[i] for i, r in enumerate(lows)}
        stats.update({r + 1: nxt[i] for i, r in enumerate(lows) if r + 1 < n and r + 1 not in stats})
    out = []
    for pos in positions:
        lo = int(np.floor(pos))
        hi, w = min(lo + 1, n - 1), pos - lo
        out.append(stats[lo] * (1.0 - w) + stats[hi] * w)
    return out


def unit_stats(norm_in, act_in, max_samples: int = 0) -> dict:
    """Per-unit statistics of one layer; inputs [B, F] or [B, H, W, C] (feature last)."""
    out = dict(zip(MOMENTS, moments(norm_in, act_in), strict=True))
    out.update(zip(PERCENTILE_STATS, percentiles(act_in.reshape(-1, act_in.shape[-1]), max_samples), strict=True))
    return out


def moments(norm_in, act_in):
    """[4, U]: the MOMENTS of one layer (means and variances over batch and space)."""
    return jnp.concatenate([_moments(norm_in), _moments(act_in)])


def _moments(x):
    """[2, U]: mean and biased variance of x over every axis but the last."""
    x = x.reshape(-1, x.shape[-1])
    return jnp.stack([x.mean(0), x.var(0)])


def aux_moments(a):
    """[4, U]: the MOMENTS of one layer's aux. Where the layer's normalizer computed them
    anyway (`norm_in_moments`, `act_in_moments`: batch norm's statistics) they are taken
    from there, which spares a pass over the activations; else reduced from the arrays."""
    return jnp.concatenate([a["norm_in_moments"] if "norm_in_moments" in a else _moments(a["norm_in"]),
                            a["act_in_moments"] if "act_in_moments" in a else _moments(a["act_in"])])


def layer_stats(kind: str, max_samples: int = 0):
    """The per-layer statistic function of a part: [len(PART_STATS[kind]), U] from one layer's aux."""
    if kind == "moments":
        return aux_moments
    if kind == "percentiles":
        return lambda a: jnp.stack(percentiles(a["act_in"].reshape(-1, a["act_in"].shape[-1]), max_samples))
    return lambda a: jnp.concatenate([aux_moments(a), layer_stats("percentiles", max_samples)(a)])


PART_STATS = {"moments": MOMENTS, "percentiles": PERCENTILE_STATS, "all": STATS}


def group_stats(aux, kind: str, max_samples: int = 0) -> tuple[dict, dict]:
    """Per-unit statistics of every hidden layer, a group of layers at a time: ({group:
    [n, stats, U]}, {group: its n layer names}), a group keyed by its first layer's name.

    Groups are the model's (one vmap over a scanned stack); consecutive small layers of
    equal shapes are stacked into one group first (`common.merge_groups`), so that a net of
    a few narrow layers costs a handful of operations per step instead of a few per layer
    and statistic."""
    stats, names = {}, {}
    for group, tree in common.merge_groups(common.aux_groups(aux)):
        stats[group[0]] = jax.vmap(layer_stats(kind, max_samples))(tree)
        names[group[0]] = group
    return stats, names


def all_stats(aux, names, max_samples: int = 0) -> dict:
    """{layer: {stat: [U]}} for the layers `names`."""
    stats, groups = group_stats(aux, "all", max_samples)
    per_layer = {}
    for g, st in stats.items():
        for j, layer in enumerate(groups[g]):
            per_layer[layer] = dict(zip(STATS, st[j], strict=True))
    return {n: per_layer[n] for n in names}


def group_outputs(src: str, names, stat_names, cur, prev, init):
    """(scalars, per-unit arrays) of one source and one group of layers `names` from current,
    previous-cadence and initial statistics [n, stats, units]: three reductions for the
    whole group, outputs stacked (`common.StackedDict`, one key per layer and statistic)."""
    n, k = cur.shape[:2]
    keys = [f"dist/{layer}/{src}/{stat}" for layer in names for stat in stat_names]
    scalars, units = common.StackedDict(), common.StackedDict()
    scalars.add(keys, cur.mean(-1).reshape(n * k))
    # rms over units of the change, per layer and statistic
    scalars.add([k_ + "_drift" for k_ in keys], jnp.sqrt(jnp.mean(jnp.square(cur - prev), -1)).reshape(n * k))
    scalars.add([k_ + "_drift_init" for k_ in keys], jnp.sqrt(jnp.mean(jnp.square(cur - init), -1)).reshape(n * k))
    units.add(keys, cur.reshape((n * k,) + cur.shape[2:]))
    return scalars, units


def drift_outputs(src: str, cur: dict, prev: dict, init: dict):
    """(scalars, per-unit arrays) of one source from per-layer dicts layer -> stat -> [units]
    of current, previous-cadence and initial statistics (a reference form of
    `group_outputs`, one layer at a time)."""
    scalars, units = common.StackedDict(), common.StackedDict()
    for layer, stats in cur.items():
        names = sorted(stats)

        def arr(d, names=names, layer=layer):
            return jnp.stack([d[layer][s] for s in names])[None]

        s, u = group_outputs(src, (layer,), names, arr(cur), arr(prev), arr(init))
        scalars.update(s)
        units.update(u)
    return scalars, units


def _eval_stats(config, ctx, kind: str, x):
    """Abstract shapes of `group_stats` on a batch like `x`, and zeros of them."""
    from bn_research import step

    train_state, graphdef = ctx["train_state"], ctx["graphdef"]

    def stats_of(x):
        _, aux, _ = step.forward(graphdef, train_state["params"], train_state["batch_stats"], x,
                                 train=True, rng=jax.random.key(0))
        return group_stats(aux, kind, int(config.probes.drift.percentile_samples))[0]

    shapes = jax.eval_shape(stats_of, x)

    def zeros():  # distinct buffers: the state is donated to the jitted step
        return jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)

    return {"init": zeros(), "prev": zeros()}


def _probe_batch(config, ctx):
    pc = config.probes.drift
    n = int(pc.probe_batch_size) or int(config.train.batch_size)
    x_all = ctx["dataset"].train["x"]
    n = min(n, x_all.shape[0])
    idx = np.sort(np.random.default_rng(int(config.seed) + 7919).choice(x_all.shape[0], n, replace=False))
    return jnp.asarray(x_all[idx])


def _update(src, stat_names, cur, groups, pstate, first):
    """(scalars, units, new {init, prev}) of one source at a cadence step."""
    init_v = jax.tree_util.tree_map(lambda i, c: jnp.where(first, c, i), pstate["init"], cur)
    prev_v = jax.tree_util.tree_map(lambda p, c: jnp.where(first, c, p), pstate["prev"], cur)
    scalars, units = common.StackedDict(), common.StackedDict()
    for g, c in cur.items():
        s, u = group_outputs(src, groups[g], stat_names, c, prev_v[g], init_v[g])
        scalars.update(s)
        units.update(u)
    return scalars, units, {"init": init_v, "prev": cur}


def init(config, ctx) -> dict:
    """State of the moments part: initial and previous statistics of the training batch
    (filled at the first step)."""
    x = jnp.asarray(ctx["dataset"].train["x"][: int(config.train.batch_size)])
    return {"train": _eval_stats(config, ctx, "moments", x)}


def measure(config, info, ctx, pstate):
    """The moments part at a cadence step: means and variances on the training batch,
    taken from the step's own forward pass."""
    del config, info
    cur, groups = group_stats(ctx["aux"], "moments")
    scalars, units, new = _update("train", MOMENTS, cur, groups, pstate["train"], ctx["state"]["step"] == 0)
    return {"scalars": scalars, "units": units}, {"train": new}


def extra_parts(pc, log_every: int) -> dict:
    """The detail part (see `probes.parts`): name -> (cadence, init, measure)."""
    return {"drift_detail": (int(pc.detail_every) or log_every, detail_init, detail_measure)}


def detail_init(config, ctx) -> dict:
    """State of the detail part: the fixed probe batch, its noise key, and initial/previous
    percentiles of the training batch and statistics of the probe batch."""
    pc = config.probes.drift
    x = _probe_batch(config, ctx)
    state = {"train": _eval_stats(config, ctx, "percentiles", x)}
    if pc.probe_batch:
        state["probe"] = _eval_stats(config, ctx, "all", x)
        state["x"] = x
        state["key"] = jax.random.key_data(jax.random.key(int(config.seed) + 7919))
    return state


def detail_measure(config, info, ctx, pstate):
    """The detail part at its cadence step: percentiles on the training batch, and every
    statistic on the fixed probe batch (one extra forward pass)."""
    first = ctx["state"]["step"] == 0
    m = int(config.probes.drift.percentile_samples)
    cur, groups = group_stats(ctx["aux"], "percentiles", m)
    scalars, units, new = common.StackedDict(), common.StackedDict(), dict(pstate)
    s, u, new["train"] = _update("train", PERCENTILE_STATS, cur, groups, pstate["train"], first)
    scalars.update(s)
    units.update(u)
    if "probe" in pstate:
        from bn_research import step

        _, aux, _ = step.forward(info["graphdef"], ctx["state"]["params"], ctx["state"]["batch_stats"],
                                 pstate["x"], train=True, rng=jax.random.wrap_key_data(pstate["key"]))
        cur, groups = group_stats(aux, "all", m)
        s, u, new["probe"] = _update("probe", STATS, cur, groups, pstate["probe"], first)
        scalars.update(s)
        units.update(u)
    return {"scalars": scalars, "units": units}, new
