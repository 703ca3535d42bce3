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
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from bn_research.probes import common

PERCENTILES = (15.0, 50.0, 85.0)
STATS = ("norm_in_mean", "norm_in_var", "act_in_mean", "act_in_var",
         "act_in_p15", "act_in_p50", "act_in_p85")
SOURCES = ("train", "probe")
PAIRWISE_MAX = 256  # up to this many samples per unit, percentiles by pairwise ranks, else a sort


def default_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.enabled = True  # cheap: statistics of activations the step already computes
    c.every = 0  # cadence in steps; 0 = train.log_every
    c.probe_batch = True  # also measure on the fixed probe batch (one extra forward pass)
    c.probe_batch_size = 0  # examples in the fixed probe batch; 0 = train.batch_size
    c.percentile_samples = 4096  # percentiles over at most this many (strided) positions per unit; 0 = all
    return c


def percentiles(a, max_samples: int = 0):
    """Per-unit PERCENTILES of a [N, U] array (linear interpolation, as numpy's default).

    With `max_samples` > 0 and N larger, they are taken over the evenly strided subsample
    a[::ceil(N / max_samples)] (conv layers: batch x space positions), because an exact
    sort of every position costs more than the training step itself on CPU.
    """
    n = a.shape[0]
    if max_samples and n > max_samples:
        a = a[:: -(-n // max_samples)]
        n = a.shape[0]
    if n <= PAIRWISE_MAX:
        # Order statistics without a sort (XLA's CPU sort is slow for many short rows):
        # the stable rank of a_i is #{j: a_j < a_i} + #{j < i: a_j = a_i}, a permutation.
        less = a[None, :, :] < a[:, None, :]  # [i, j, U]: a_j < a_i
        tie = (a[None, :, :] == a[:, None, :]) & (jnp.arange(n)[None, :] < jnp.arange(n)[:, None])[..., None]
        rank = jnp.sum(less | tie, axis=1)  # [N, U]

        def order_stat(k):
            return jnp.sum(jnp.where(rank == k, a, 0.0), axis=0)
    else:
        s = jnp.sort(a.T, axis=-1)  # sorting along the minor axis is several times faster

        def order_stat(k):
            return s[:, k]
    out = []
    for q in PERCENTILES:
        pos = q / 100.0 * (n - 1)
        lo = int(np.floor(pos))
        hi, w = min(lo + 1, n - 1), pos - lo
        out.append(order_stat(lo) * (1.0 - w) + order_stat(hi) * w)
    return out


def unit_stats(norm_in, act_in, max_samples: int = 0) -> dict:
    """Per-unit statistics of one layer; inputs [B, F] or [B, H, W, C] (feature last)."""
    z = norm_in.reshape(-1, norm_in.shape[-1])
    a = act_in.reshape(-1, act_in.shape[-1])
    p15, p50, p85 = percentiles(a, max_samples)
    return {"norm_in_mean": z.mean(0), "norm_in_var": z.var(0),
            "act_in_mean": a.mean(0), "act_in_var": a.var(0),
            "act_in_p15": p15, "act_in_p50": p50, "act_in_p85": p85}


def group_stats(aux, max_samples: int = 0) -> tuple[dict, dict]:
    """Per-unit statistics of every hidden layer, a group of layers at a time (one vmap
    over a scanned stack): ({group: {stat: [n, U]}}, {group: its n layer names}), a group
    keyed by its first layer's name."""
    stats, names = {}, {}
    for group, tree in common.aux_groups(aux):
        stats[group[0]] = jax.vmap(lambda a: unit_stats(a["norm_in"], a["act_in"], max_samples))(tree)
        names[group[0]] = group
    return stats, names


def all_stats(aux, names, max_samples: int = 0) -> dict:
    """{layer: {stat: [U]}} for the layers `names`."""
    stats, groups = group_stats(aux, max_samples)
    per_layer = {}
    for g, st in stats.items():
        per_layer.update(common.unstack(st, groups[g]))
    return {n: per_layer[n] for n in names}


def group_outputs(src: str, names, cur: dict, prev: dict, init: dict):
    """(scalars, per-unit arrays) of one source and one group of layers `names` from current,
    previous-cadence and initial statistics (stat -> [n, units]): every reduction runs on the
    whole group, and the outputs stay stacked (`common.StackedDict`, one key per layer)."""
    scalars, units = common.StackedDict(), common.StackedDict()
    for stat, v in cur.items():
        keys = [f"dist/{layer}/{src}/{stat}" for layer in names]
        scalars.add(keys, v.mean(-1))
        # rms over units of the change, per layer
        scalars.add([k + "_drift" for k in keys], jnp.sqrt(jnp.mean(jnp.square(v - prev[stat]), -1)))
        scalars.add([k + "_drift_init" for k in keys], jnp.sqrt(jnp.mean(jnp.square(v - init[stat]), -1)))
        units.add(keys, v)
    return scalars, units


def drift_outputs(src: str, cur: dict, prev: dict, init: dict, groups: dict | None = None):
    """(scalars, per-unit arrays) of one source from current, previous-cadence and initial
    per-unit statistics: dicts layer -> stat -> [units], or with `groups` (group -> layer
    names, from `group_stats`) dicts group -> stat -> [n, units]."""
    scalars, units = common.StackedDict(), common.StackedDict()
    for g, stats in cur.items():
        if groups is None:  # one layer: a group of one
            def one(tree):
                return jax.tree_util.tree_map(lambda x: x[None], tree)
            s, u = group_outputs(src, (g,), one(stats), one(prev[g]), one(init[g]))
        else:
            s, u = group_outputs(src, groups[g], stats, prev[g], init[g])
        scalars.update(s)
        units.update(u)
    return scalars, units


def init(config, ctx) -> dict:
    """Probe state: the fixed probe batch, its noise key, and initial/previous statistics
    of both sources (filled at the first step)."""
    pc = config.probes.drift
    train_state, graphdef = ctx["train_state"], ctx["graphdef"]
    n = int(pc.probe_batch_size) or int(config.train.batch_size)
    x_all = ctx["dataset"].train["x"]
    n = min(n, x_all.shape[0])
    idx = np.sort(np.random.default_rng(int(config.seed) + 7919).choice(x_all.shape[0], n, replace=False))
    x = jnp.asarray(x_all[idx])
    from bn_research import step

    def stats_of(x):
        _, aux, _ = step.forward(graphdef, train_state["params"], train_state["batch_stats"], x,
                                 train=True, rng=jax.random.key(0))
        return group_stats(aux, int(pc.percentile_samples))[0]

    shapes = jax.eval_shape(stats_of, x)

    def zeros():  # distinct buffers: the state is donated to the jitted step
        return jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)

    state = {"train": {"init": zeros(), "prev": zeros()}}
    if pc.probe_batch:
        state["probe"] = {"init": zeros(), "prev": zeros()}
        state["x"] = x
        state["key"] = jax.random.key_data(jax.random.key(int(config.seed) + 7919))
    return state


def measure(config, info, ctx, pstate):
    """Outputs and new state at a cadence step."""
    first = ctx["state"]["step"] == 0
    m = int(config.probes.drift.percentile_samples)
    current, groups = group_stats(ctx["aux"], m)
    current = {"train": current}
    if "probe" in pstate:
        from bn_research import step

        _, aux, _ = step.forward(info["graphdef"], ctx["state"]["params"], ctx["state"]["batch_stats"],
                                 pstate["x"], train=True, rng=jax.random.wrap_key_data(pstate["key"]))
        current["probe"] = group_stats(aux, m)[0]
    scalars, units, new = common.StackedDict(), common.StackedDict(), dict(pstate)
    for src, cur in current.items():
        init_v = jax.tree_util.tree_map(lambda i, c: jnp.where(first, c, i), pstate[src]["init"], cur)
        prev_v = jax.tree_util.tree_map(lambda p, c: jnp.where(first, c, p), pstate[src]["prev"], cur)
        s, u = drift_outputs(src, cur, prev_v, init_v, groups)
        scalars.update(s)
        units.update(u)
        new[src] = {"init": init_v, "prev": cur}
    return {"scalars": scalars, "units": units}, new
