"""Loss-landscape smoothness along the gradient (Santurkar et al. 2018, sec. 3.1, Fig. 4).

At theta with gradient g = dL/dtheta (the step's training batch and noise key, training
mode, batch-statistic updates discarded), for every step size eta_k of the grid:
    loss_k      = L(theta - eta_k g)
    grad_diff_k = ||g - dL/dtheta(theta - eta_k g)||        (gradient predictiveness)
and over the grid: the range of the loss [min_k loss_k, max_k loss_k] (theta itself
included as eta = 0), the range of grad_diff, and the effective beta-smoothness
    beta = max_k grad_diff_k / ||eta_k g||   (gradient change over distance moved).
All step sizes run in one vectorized pass (`vmap` over eta).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections

from bn_research.probes import common


def default_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.enabled = False  # len(step_sizes) extra forward/backward passes at each cadence step
    c.every = 0  # cadence in steps; 0 = train.log_every
    c.step_sizes = (0.05, 0.1, 0.2, 0.4)  # grid of eta along -g (absolute, not times the lr)
    return c


def along_gradient(loss_fn, params, grads, batch_stats, batch, rng, step_sizes):
    """(losses [K], gradient differences [K]) at theta - eta_k g for the grid `step_sizes`."""

    def at(eta):
        theta = jax.tree_util.tree_map(lambda p, g: p - eta * g, params, grads)
        (loss, _), g_eta = jax.value_and_grad(loss_fn, has_aux=True)(theta, batch_stats, batch, rng)
        diff = common.tree_norm(jax.tree_util.tree_map(jnp.subtract, grads, g_eta))
        return loss, diff

    return jax.vmap(at)(jnp.asarray(step_sizes, jnp.float32))


def summarize(loss0, losses, diffs, grad_norm, step_sizes):
    """Scalars of the grid (see the module docstring)."""
    etas = jnp.asarray(step_sizes, jnp.float32)
    all_losses = jnp.concatenate([loss0[None], losses])
    return {
        "landscape/loss_min": all_losses.min(),
        "landscape/loss_max": all_losses.max(),
        "landscape/loss_range": all_losses.max() - all_losses.min(),
        "landscape/grad_diff_min": diffs.min(),
        "landscape/grad_diff_max": diffs.max(),
        "landscape/beta": jnp.max(diffs / (etas * grad_norm)),
    }


def init(config, ctx):
    del config, ctx
    return {}


def measure(config, info, ctx, pstate):
    del info
    etas = list(config.probes.landscape.step_sizes)
    st = ctx["state"]
    # eta = 0 rides along in the same vmapped pass: the loss at theta itself.
    all_losses, all_diffs = along_gradient(ctx["loss_fn"], st["params"], ctx["grads"], st["batch_stats"],
                                           ctx["batch"], ctx["noise_key"], [0.0] + etas)
    loss0, losses, diffs = all_losses[0], all_losses[1:], all_diffs[1:]
    scalars = summarize(loss0, losses, diffs, common.tree_norm(ctx["grads"]), etas)
    units = {"landscape/grid/loss": losses, "landscape/grid/grad_diff": diffs,
             "landscape/grid/step_size": jnp.asarray(etas, jnp.float32)}
    return {"scalars": scalars, "units": units}, pstate
