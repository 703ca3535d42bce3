"""Length and direction of the weights (Kohler et al. 2019, "Exponential convergence
rates for batch normalization: the power of length-direction decoupling"; Salimans &
Kingma 2016, weight normalization).

Per hidden layer: the norm of the effective weight w (and of the direction parameter v
for weight-normalized layers), the angle between the weight directions before and after
the step, the effective step size eta / ||w||^2 of scale-invariant parameters (a kernel
followed by batch/layer/group norm, or the WN direction v), and <dL/dw, w>, which is zero
for a scale-invariant parameter: L(c w) = L(w) for all c > 0 implies d/dc L(c w) = 0 at c = 1.
Hence under plain SGD the squared norm of the kernel (v for weight norm) can only grow,
||p'||^2 = ||p||^2 + eta^2 ||dL/dp||^2 (Salimans & Kingma 2016, sec. 2.2): the probe logs the
measured growth of the step next to eta^2 ||dL/dp||^2.
"""

from __future__ import annotations

import jax.numpy as jnp
import ml_collections

from bn_research import optim
from bn_research.probes import common

# Normalizers after which the kernel is scale invariant: per unit (its column) or as a whole.
PER_UNIT_INVARIANT = ("batch", "noisy_batch")
WHOLE_INVARIANT = ("layer", "group")


def default_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.enabled = True  # cheap: a few norms and dot products per layer
    c.every = 0  # cadence in steps; 0 = train.log_every
    return c


def invariance(config) -> str:
    """'unit', 'layer' or '' : how the kernel (v for weight norm) is scale invariant."""
    norm = config.model.norm
    if norm == "weight":
        return "unit"
    if config.norm.placement != "before":
        return ""
    if norm in PER_UNIT_INVARIANT:
        return "unit"
    if norm in WHOLE_INVARIANT:
        return "layer"
    return ""


def column_norms(w):
    """Per output unit: the norm of its incoming weights (all axes but the last)."""
    return jnp.sqrt(jnp.sum(jnp.square(w), tuple(range(w.ndim - 1))))


def layer_stats(before, after, grad, lr, kind: str):
    """({stat: scalar}, {stat: [units]}) of one layer from its variables before and after the
    step and its gradient (run under vmap over a group of layers: see `measure`)."""
    w = common.layer_effective_weight(before)
    v = common.layer_kernel(before)  # the kernel, or the WN direction
    g = common.layer_kernel(grad)
    dv = common.layer_kernel(after) - v  # the step's update of the kernel (v)
    w_next = common.layer_effective_weight(after)
    scalars = {
        "w_norm": common.norm(w),
        "angle": common.angle(w, w_next),
        "grad_dot_w": jnp.vdot(g.ravel(), v.ravel()),
        "grad_w_cos": common.cosine(g, v),
        # ||v + dv||^2 - ||v||^2 without cancellation, and its SGD prediction for a gradient
        # orthogonal to v (Salimans & Kingma 2016, sec. 2.2)
        "sq_norm_growth": 2.0 * jnp.vdot(v.ravel(), dv.ravel()) + jnp.vdot(dv.ravel(), dv.ravel()),
        "sq_norm_growth_sgd": jnp.square(lr) * jnp.vdot(g.ravel(), g.ravel()),
    }
    units = {"w_norm": column_norms(w)}
    if common.layer_is_weight_norm(before):
        scalars["v_norm"] = common.norm(v)
        units["v_norm"] = column_norms(v)
    if kind == "unit":
        eff = lr / jnp.square(column_norms(v))  # one scale-invariant vector per unit
        scalars["eff_lr"] = eff.mean()
        units["eff_lr"] = eff
    elif kind == "layer":
        scalars["eff_lr"] = lr / jnp.sum(jnp.square(v))
    return scalars, units


def init(config, ctx):
    del config, ctx
    return {}


def measure(config, info, ctx, pstate):
    lr = info["schedule"](ctx["state"]["step"])
    kind = invariance(config)
    scalars, units = common.StackedDict(), common.StackedDict()

    def one(before, after, grad):
        return layer_stats(before, after, grad, lr, kind)

    groups = common.map_groups(one, ctx["state"]["params"], ctx["params"], ctx["grads"])
    scalars.add_groups("weights/{layer}/{stat}", [(names, s) for names, (s, _) in groups])
    units.add_groups("weights/{layer}/{stat}", [(names, u) for names, (_, u) in groups])
    return {"scalars": scalars, "units": units}, pstate


def make_schedule(config):
    return optim.schedule(config.optimizer, int(config.train.num_steps))
