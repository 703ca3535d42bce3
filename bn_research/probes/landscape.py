"""Loss-landscape smoothness along the gradient (Santurkar et al. 2018, sec. 3.1, Fig. 4).

At theta with gradient g = dL/dtheta (the step's training batch and noise key, training
mode, batch-statistic updates discarded), for every step size eta_k of the grid:
    loss_k      = L(theta - eta_k g)
    grad_diff_k = ||g - dL/dtheta(theta - eta_k g)||        (gradient predictiveness)
and over the grid: the range of the loss [min_k loss_k, max_k loss_k] (theta itself
included as eta = 0), the range of grad_diff, and the effective beta-smoothness
    beta = max_k grad_diff_k / ||eta_k g||   (gradient change over distance moved),
with `beta_argmax`, the grid point where that maximum falls (so a maximum at the grid's
edge can be told apart from an interior one).

The grid is either absolute (`step_sizes`, the default) or, with `relative`, multiples of
the current learning rate as the paper takes them (Santurkar et al. 2018, sec. 3.2 and
App. A.2.2: [1/2, 4] x lr for the VGG, [1/100, 30] x lr for the deep linear network):
`num_steps` points over `step_range`, linearly or log spaced; `wide_range` adds a second,
log-spaced grid reported separately under `landscape/wide/*`. All step sizes of both
grids run in one vectorized pass (`vmap` over eta).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from bn_research.probes import common

SPACINGS = ("linear", "log")


def default_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.enabled = False  # one extra forward/backward pass per grid point at each cadence step
    c.every = 0  # cadence in steps; 0 = train.log_every
    c.step_sizes = (0.05, 0.1, 0.2, 0.4)  # absolute grid of eta along -g (used unless relative)
    c.relative = False  # True: eta = multiple x current learning rate (Santurkar et al. 2018, sec. 3.2)
    c.step_range = (0.5, 4.0)  # relative: (lo, hi) multiples of the lr; paper: VGG [1/2, 4], DLN [1/100, 30]
    c.num_steps = 16  # relative: grid points over step_range, both ends included
    c.spacing = "linear"  # relative: linear | log spacing of step_range
    c.wide_range = ()  # relative: (lo, hi) multiples of a second log-spaced grid, landscape/wide/*; () = none
    c.wide_num_steps = 16  # relative: points of the wide grid, both ends included
    return c


def grid_points(lo: float, hi: float, num: int, spacing: str) -> list[float]:
    """`num` points from lo to hi (both included), linear or log spaced."""
    if spacing not in SPACINGS:
        raise ValueError(f"unknown probes.landscape.spacing '{spacing}'; choose one of: {', '.join(SPACINGS)}")
    pts = np.geomspace(lo, hi, num) if spacing == "log" else np.linspace(lo, hi, num)
    return [float(x) for x in pts]


def grids(cfg) -> dict[str, list[float]]:
    """{'grid': main grid, ['wide': wide grid]} in the probe's own unit: absolute step sizes,
    or multiples of the learning rate with `relative`."""
    if not cfg.relative:
        return {"grid": [float(x) for x in cfg.step_sizes]}
    out = {"grid": grid_points(*cfg.step_range, int(cfg.num_steps), cfg.spacing)}
    if len(cfg.wide_range):
        out["wide"] = grid_points(*cfg.wide_range, int(cfg.wide_num_steps), "log")
    return out


def validate(cfg) -> None:
    """Raise ValueError (one line) for an impossible grid."""
    etas = list(cfg.step_sizes)
    if not etas or any(float(e) <= 0 for e in etas):
        raise ValueError(f"probes.landscape.step_sizes must be a non-empty list of positive floats, got {etas}")
    if not cfg.relative:
        return
    for key, rng, num in (("step_range", cfg.step_range, cfg.num_steps),
                          ("wide_range", cfg.wide_range, cfg.wide_num_steps)):
        if key == "wide_range" and not len(rng):
            continue
        if len(rng) != 2 or not 0 < float(rng[0]) <= float(rng[1]):
            raise ValueError(f"probes.landscape.{key} must be (lo, hi) with 0 < lo <= hi, got {tuple(rng)}")
        if int(num) < 1:
            raise ValueError(f"probes.landscape: number of points for {key} must be >= 1, got {num}")
    if cfg.spacing not in SPACINGS:
        raise ValueError(f"unknown probes.landscape.spacing '{cfg.spacing}'; choose one of: {', '.join(SPACINGS)}")


def along_gradient(loss_fn, params, grads, batch_stats, batch, rng, step_sizes):
    """(losses [K], gradient differences [K]) at theta - eta_k g for the grid `step_sizes`."""

    def at(eta):
        theta = jax.tree_util.tree_map(lambda p, g: p - eta * g, params, grads)
        (loss, _), g_eta = jax.value_and_grad(loss_fn, has_aux=True)(theta, batch_stats, batch, rng)
        diff = common.tree_norm(jax.tree_util.tree_map(jnp.subtract, grads, g_eta))
        return loss, diff

    return jax.vmap(at)(jnp.asarray(step_sizes, jnp.float32))


def summarize(loss0, losses, diffs, grad_norm, step_sizes, points=None, prefix="landscape/"):
    """Scalars of one grid (see the module docstring); `points` are the grid's coordinates
    reported by `beta_argmax` (default: the step sizes)."""
    etas = jnp.asarray(step_sizes, jnp.float32)
    points = etas if points is None else jnp.asarray(points, jnp.float32)
    all_losses = jnp.concatenate([loss0[None], losses])
    ratio = diffs / (etas * grad_norm)  # Santurkar et al. 2018, Fig. 4(c)
    return {
        f"{prefix}loss_min": all_losses.min(),
        f"{prefix}loss_max": all_losses.max(),
        f"{prefix}loss_range": all_losses.max() - all_losses.min(),
        f"{prefix}grad_diff_min": diffs.min(),
        f"{prefix}grad_diff_max": diffs.max(),
        f"{prefix}beta": jnp.max(ratio),
        f"{prefix}beta_argmax": points[jnp.argmax(ratio)],
    }


def init(config, ctx):
    del config, ctx
    return {}


def measure(config, info, ctx, pstate):
    cfg = config.probes.landscape
    named = grids(cfg)
    scale = info["schedule"](ctx["state"]["step"]) if cfg.relative else 1.0  # the current lr, or 1
    st = ctx["state"]
    points = [0.0] + [x for g in named.values() for x in g]
    # eta = 0 rides along in the same vmapped pass: the loss at theta itself.
    etas = scale * jnp.asarray(points, jnp.float32)
    all_losses, all_diffs = along_gradient(ctx["loss_fn"], st["params"], ctx["grads"], st["batch_stats"],
                                           ctx["batch"], ctx["noise_key"], etas)
    grad_norm = common.tree_norm(ctx["grads"])
    scalars, units, start = {}, {}, 1
    for name, grid in named.items():
        sl = slice(start, start + len(grid))
        start += len(grid)
        prefix = "landscape/" if name == "grid" else "landscape/wide/"
        scalars.update(summarize(all_losses[0], all_losses[sl], all_diffs[sl], grad_norm, etas[sl], grid, prefix))
        tag = "grid" if name == "grid" else "wide_grid"
        units.update({f"landscape/{tag}/loss": all_losses[sl], f"landscape/{tag}/grad_diff": all_diffs[sl],
                      f"landscape/{tag}/step_size": etas[sl]})
    return {"scalars": scalars, "units": units}, pstate
