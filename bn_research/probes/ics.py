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
not recomputed. Batch-statistic updates of these passes are discarded.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections

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


def shifted_grads(loss_fn, params, updates, batch_stats, batch, rng, names):
    """[G'_1, ..., G'_{L-1}] kernels, one vmapped pass over layers 1..L-1."""
    index_tree = common.layer_index_tree(params)

    def grad_at(i):
        theta = partially_updated(params, updates, index_tree, i)
        grads, _ = jax.grad(loss_fn, has_aux=True)(theta, batch_stats, batch, rng)
        return grads

    stacked = jax.vmap(grad_at)(jnp.arange(1, len(names)))
    return [common.kernel(stacked, n)[i - 1] for i, n in enumerate(names) if i > 0]


def earlier_update_norms(params, updates, index_tree, num_layers):
    """(||u_{<i}||, ||theta_{<i}||) for i = 0..num_layers-1, each a [num_layers] array: norms
    over all parameters of the layers j < i (zero for i = 0)."""
    sq_u, sq_p = [0.0] * num_layers, [0.0] * num_layers
    leaves = zip(jax.tree_util.tree_leaves(updates), jax.tree_util.tree_leaves(params),
                 jax.tree_util.tree_leaves(index_tree), strict=True)
    for u, p, j in leaves:
        for i in range(j + 1, num_layers):  # layer j sits before layers j+1 .. L-1
            sq_u[i] = sq_u[i] + jnp.sum(jnp.square(u))
            sq_p[i] = sq_p[i] + jnp.sum(jnp.square(p))
    return jnp.sqrt(jnp.stack([jnp.asarray(x) for x in sq_u])), jnp.sqrt(jnp.stack([jnp.asarray(x) for x in sq_p]))


def init(config, ctx):
    del config, ctx
    return {}


def measure(config, info, ctx, pstate):
    del config
    names = info["layer_names"]
    st = ctx["state"]
    g_prime = shifted_grads(ctx["loss_fn"], st["params"], ctx["updates"], st["batch_stats"],
                            ctx["batch"], ctx["noise_key"], names)
    g_prime = [common.kernel(ctx["grads"], names[0])] + g_prime
    u_norm, p_norm = earlier_update_norms(st["params"], ctx["updates"], common.layer_index_tree(st["params"]),
                                          len(names))
    scalars = {}
    for i, (n, gp) in enumerate(zip(names, g_prime, strict=True)):
        g = common.kernel(ctx["grads"], n)
        diff = common.norm(g - gp)
        scalars[f"ics/{n}/grad_diff"] = diff
        scalars[f"ics/{n}/grad_diff_rel"] = diff / common.norm(g)
        scalars[f"ics/{n}/grad_cos"] = common.cosine(g, gp)
        scalars[f"ics/{n}/update_norm"] = u_norm[i]
        scalars[f"ics/{n}/update_rel"] = u_norm[i] / jnp.maximum(p_norm[i], 1e-30)
    return {"scalars": scalars, "units": {}}, pstate
