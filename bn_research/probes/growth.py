"""Gradient growth with depth (Yang et al. 2019, "A mean field theory of batch
normalization"): per-layer gradient norms and the fitted per-layer growth rate.

Yang et al. show that in a batch-normalized network at initialization the squared
gradient norm of layer l grows geometrically towards the input, ||g_l||^2 ~ C lambda^(L-l).
We fit log ||g_l||^2 = a + b l by least squares over the interior hidden layers
l = 1..L-2 and report the slope b and the growth factor per layer towards the input,
exp(-b). The first layer (which sees the raw input, not the normalized activations of a
layer before it) and the last (next to the head) sit off the geometric law, so they are
left out; with fewer than 4 hidden layers the fit uses all of them.
"""

from __future__ import annotations

import jax.numpy as jnp
import ml_collections

from bn_research.probes import common


def default_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.enabled = True  # cheap: norms of gradients the step already has
    c.every = 0  # cadence in steps; 0 = train.log_every
    return c


def layer_grad_norms(grads, names=None):
    """[L]: ||dL/dW_l||_F of every hidden layer's kernel (v for weight-normalized layers), in
    network order (`names`, if given, must be that order); one vmap per group of layers."""
    del names
    groups = common.map_groups(lambda lay: common.norm(common.layer_kernel(lay)), grads)
    return jnp.concatenate([res for _, res in groups])


def interior(values):
    """Layers 1..L-2 of a per-layer vector (all layers when L < 4)."""
    return values[1:-1] if values.shape[0] >= 4 else values


def fit_slope(sq_norms):
    """Least-squares slope of log(sq_norms[l]) against l (closed form, in jit); the
    caller picks the layers (consecutive ones: the slope is per layer)."""
    y = jnp.log(sq_norms)
    x = jnp.arange(y.shape[0], dtype=y.dtype)
    xc = x - x.mean()
    return jnp.sum(xc * (y - y.mean())) / jnp.maximum(jnp.sum(xc * xc), 1.0)


def init(config, ctx):
    del config
    return {"init": jnp.zeros((len(ctx["layer_names"]),), jnp.float32)}


def measure(config, info, ctx, pstate):
    del config
    names = info["layer_names"]
    norms = layer_grad_norms(ctx["grads"], names)
    init_norms = jnp.where(ctx["state"]["step"] == 0, norms, pstate["init"])
    slope = fit_slope(jnp.square(interior(norms)))  # interior layers only
    scalars = common.StackedDict([(["grad/log_sq_norm_slope"], slope[None]),
                                  (["grad/growth_factor"], jnp.exp(-slope)[None])])
    scalars.add([f"grad/{n}/norm" for n in names], norms)  # [L], one key per layer
    scalars.add([f"grad/{n}/norm_init" for n in names], init_norms)
    scalars.add([f"grad/{n}/norm_ratio_init" for n in names], norms / init_norms)
    return {"scalars": scalars, "units": {}}, {"init": init_norms}
