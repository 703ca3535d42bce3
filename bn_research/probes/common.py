"""Shared helpers of the probes: parameter-tree access by layer, cadence, small reductions.

Parameter trees are the `nnx.State` of `nnx.split(model, nnx.Param, ...)`: hidden layers
under `params["layers"][<name>]` with the linear map at `["linear"]` (`kernel`, and for
weight-normalized layers the length `g`, so `kernel` holds the direction v), the output
layer at `params["head"]`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def value(x):
    """The array inside an nnx Variable leaf (or `x` itself)."""
    return x.value if hasattr(x, "value") else x


def layer_names(params) -> list[str]:
    """Hidden layer names in network order (`dense_2` before `dense_10`)."""
    return sorted(params["layers"].keys(), key=lambda n: int(n.rsplit("_", 1)[1]))


def kernel(tree, name):
    """The kernel leaf of hidden layer `name` (v for weight-normalized layers)."""
    return value(tree["layers"][name]["linear"]["kernel"])


def is_weight_norm(tree, name) -> bool:
    return "g" in tree["layers"][name]["linear"]


def effective_weight(tree, name):
    """w of layer `name`: the kernel, or g * v / ||v|| (Salimans & Kingma 2016, eq. 2)."""
    v = kernel(tree, name)
    if not is_weight_norm(tree, name):
        return v
    g = value(tree["layers"][name]["linear"]["g"])
    axes = tuple(range(v.ndim - 1))
    return v * (g * jax.lax.rsqrt(jnp.sum(jnp.square(v), axes)))


def layer_index_tree(params):
    """Same structure as `params`; every leaf holds the index of the hidden layer it belongs
    to, L (the number of hidden layers) for the head."""
    names = layer_names(params)
    index = {n: i for i, n in enumerate(names)}

    def leaf_index(path, _):
        keys = [getattr(k, "key", None) for k in path]
        if keys and keys[0] == "layers":
            return index[keys[1]]
        return len(names)

    return jax.tree_util.tree_map_with_path(leaf_index, params)


def norm(x):
    return jnp.sqrt(jnp.sum(jnp.square(x)))


def tree_norm(tree):
    return jnp.sqrt(sum(jnp.sum(jnp.square(x)) for x in jax.tree_util.tree_leaves(tree)))


def rms(x):
    """Root mean square over all elements (a drift of a per-unit vector, per unit)."""
    return jnp.sqrt(jnp.mean(jnp.square(x)))


def cosine(a, b, eps=1e-30):
    a, b = a.ravel(), b.ravel()
    return jnp.vdot(a, b) / jnp.maximum(norm(a) * norm(b), eps)


def angle(a, b):
    """Angle between two arrays seen as vectors, 2 atan2(|a^ - b^|, |a^ + b^|): accurate
    for tiny angles where arccos of the cosine loses all digits in float32."""
    ua, ub = a.ravel() / norm(a), b.ravel() / norm(b)
    return 2.0 * jnp.arctan2(norm(ua - ub), norm(ua + ub))


def on_cadence(step, every: int):
    """True at steps whose row number (step + 1) is a multiple of `every`, and at the
    first step, so every probe also records the network at initialization."""
    return ((step + 1) % every == 0) | (step == 0)


def maybe(pred, fn, state):
    """`fn() -> (outputs, new_state)` when `pred`, else (zeros shaped like the outputs,
    `state`): off-cadence steps skip the work (`lax.cond`; under `vmap` it becomes a
    select and both sides run)."""

    def off():
        shapes = jax.eval_shape(fn)[0]
        return jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), shapes), state

    return jax.lax.cond(pred, fn, off)
