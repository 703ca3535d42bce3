"""Gradient-based internal covariate shift (Santurkar et al. 2018, Def. 2.1).

For hidden layer i with kernel W_i:
    G_i  = dL/dW_i (W_1^t, ..., W_k^t; x^t, y^t)
    G'_i = dL/dW_i (W_1^{t+1}, ..., W_{i-1}^{t+1}, W_i^t, ..., W_k^t; x^t, y^t)
i.e. G'_i is the same gradient on the same batch (and the same noise key) after the layers
before i took their step-t update (the optimizer's actual update, all of their
parameters). We record ICS_i = ||G_i - G'_i||_2 (Frobenius) and cos(G_i, G'_i), and the
size of the shift that caused it: ||u_{<i}||, the norm of the update of layers j < i, and
||u_{<i}|| / ||theta_{<i}||, relative to those layers' parameters (batch norm changes the
effective step, so equal nominal learning rates are not equal shifts).

The definition costs one extra backward pass per layer; all of them run in one batched
pass: `vmap` over i of the gradient at theta + m_i * update, where the mask m_i is 1 on the
parameters of layers j < i. Layer 0 has no earlier layer, so G'_0 = G_0 exactly and it is
not recomputed. Batch-statistic updates of these passes are discarded. The layers of a
scanned stack are masked, read off and reduced as one stacked group (`common.layer_groups`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from bn_research.probes import common


def default_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.enabled = False  # (depth - 1) extra forward/backward passes at each cadence step
    c.every = 0  # cadence in steps; 0 = train.log_every
    return c


def partially_updated(params, updates, index_tree, i):
    """theta with the update applied to the parameters of layers j < i only."""
    return jax.tree_util.tree_map(lambda p, u, j: p + jnp.where(j < i, u, jnp.zeros_like(u)),
                                  params, updates, index_tree)


def shifted_kernels(loss_fn, params, updates, grads, batch_stats, batch, rng, names):
    """[(group names, G' kernels [n, ...])] per group of `common.layer_groups`, from one
    vmapped pass over layers i = 1..L-1 (layer 0's entry is G_0 itself: nothing precedes
    it). The pass returns, for every i, the whole gradient; layer i's kernel is read off
    row i - 1 by one gather per group, so a scanned stack is never unrolled."""
    index_tree = common.layer_index_tree(params)
    position = {n: i for i, n in enumerate(names)}

    def grad_at(i):
        theta = partially_updated(params, updates, index_tree, i)
        shifted, _ = jax.grad(loss_fn, has_aux=True)(theta, batch_stats, batch, rng)
        return shifted

    stacked = jax.vmap(grad_at)(jnp.arange(1, len(names))) if len(names) > 1 else None
    out = []
    for group, is_stacked in common.layer_groups(params):
        g = common.layer_kernel(common.group_tree(grads, group, is_stacked))  # [n, ...]
        rows = np.array([position[n] - 1 for n in group])
        if rows.max() < 0:
            out.append((group, g))
            continue
        # [L-1, n, ...]: G' of every pass i (rows) for every layer of the group
        k = (common.layer_kernel(stacked[common.STACK]) if is_stacked
             else common.layer_kernel(stacked["layers"][group[0]])[:, None])
        gp = k[np.maximum(rows, 0), np.arange(len(group))]
        if rows.min() < 0:
            gp = jnp.where((rows < 0).reshape((-1,) + (1,) * (gp.ndim - 1)), g, gp)
        out.append((group, gp))
    return out


def per_layer_sq_norms(tree, index_tree, num_layers):
    """[num_layers + 1]: the squared norm of all parameters of each hidden layer (the head
    last), one scatter-add per leaf (a stacked leaf adds one row per layer)."""
    total = jnp.zeros((num_layers + 1,), jnp.float32)
    for x, j in zip(jax.tree_util.tree_leaves(tree), jax.tree_util.tree_leaves(index_tree), strict=True):
        if np.ndim(j):
            total = total.at[np.ravel(j)].add(jnp.sum(jnp.square(x), tuple(range(1, x.ndim))))
        else:
            total = total.at[j].add(jnp.sum(jnp.square(x)))
    return total


def earlier_update_norms(params, updates, index_tree, num_layers):
    """(||u_{<i}||, ||theta_{<i}||) for i = 0..num_layers-1, each a [num_layers] array: norms
    over all parameters of the layers j < i (zero for i = 0), by an exclusive cumulative sum
    of the per-layer squared norms."""

    def earlier(sq):
        return jnp.sqrt(jnp.concatenate([jnp.zeros((1,), sq.dtype), jnp.cumsum(sq[:num_layers - 1])]))

    return (earlier(per_layer_sq_norms(updates, index_tree, num_layers)),
            earlier(per_layer_sq_norms(params, index_tree, num_layers)))


def init(config, ctx):
    del config, ctx
    return {}


def measure(config, info, ctx, pstate):
    del config
    names = info["layer_names"]
    st = ctx["state"]
    g_prime = shifted_kernels(ctx["loss_fn"], st["params"], ctx["updates"], ctx["grads"], st["batch_stats"],
                              ctx["batch"], ctx["noise_key"], names)
    u_norm, p_norm = earlier_update_norms(st["params"], ctx["updates"], common.layer_index_tree(st["params"]),
                                          len(names))
    update_rel = u_norm / jnp.maximum(p_norm, 1e-30)
    scalars, start = common.StackedDict(), 0
    for (group, gp), (_, is_stacked) in zip(g_prime, common.layer_groups(st["params"]), strict=True):
        g = common.layer_kernel(common.group_tree(ctx["grads"], group, is_stacked))
        diff = jax.vmap(common.norm)(g - gp)
        at = slice(start, start + len(group))  # the group's layers are consecutive
        start += len(group)
        stats = {"grad_diff": diff, "grad_diff_rel": diff / jax.vmap(common.norm)(g),
                 "grad_cos": jax.vmap(common.cosine)(g, gp), "update_norm": u_norm[at],
                 "update_rel": update_rel[at]}
        scalars.add_groups("ics/{layer}/{stat}", [(group, stats)])
    return {"scalars": scalars, "units": {}}, pstate
