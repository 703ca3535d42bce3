"""Gradient-based internal covariate shift (Santurkar et al. 2018, Def. 2.1).

For hidden layer i with kernel W_i:
    G_i  = dL/dW_i (W_1^t, ..., W_k^t; x^t, y^t)
    G'_i = dL/dW_i (W_1^{t+1}, ..., W_{i-1}^{t+1}, W_i^t, ..., W_k^t; x^t, y^t)
i.e. G'_i is the same gradient on the same batch (and the same noise key) after the layers
before i took their step-t update (the optimizer's actual update, all of their
parameters). We record ICS_i = ||G_i - G'_i||_2 (Frobenius) and cos(G_i, G'_i).

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
    scalars = {}
    for n, gp in zip(names, g_prime, strict=True):
        g = common.kernel(ctx["grads"], n)
        diff = common.norm(g - gp)
        scalars[f"ics/{n}/grad_diff"] = diff
        scalars[f"ics/{n}/grad_diff_rel"] = diff / common.norm(g)
        scalars[f"ics/{n}/grad_cos"] = common.cosine(g, gp)
    return {"scalars": scalars, "units": {}}, pstate
