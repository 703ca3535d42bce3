"""Hand-written JAX training steps with no framework and no logging: the practical limit.

Plain dicts of arrays, the same architectures, initializations, batch norm and optimizers
as `configs/mlp.py` and `configs/cnn.py` (batch norm before the activation, running
statistics with momentum 0.99, no bias before batch norm), built from `jax.lax` directly:
`lax.conv_general_dilated` and `lax.reduce_window` with their autodiff gradients.
Batches are gathered inside jit from the device-resident training set by indices that
the host draws from a numpy permutation per epoch.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax

EPS, MOMENTUM = 1e-5, 0.99


def _bn(x, p, s):
    axes = tuple(range(x.ndim - 1))
    mean = x.mean(axes)
    var = jnp.mean(jnp.square(x - mean), axes)
    y = (x - mean) * jax.lax.rsqrt(var + EPS) * p["scale"] + p["bias"]
    new = {"mean": MOMENTUM * s["mean"] + (1 - MOMENTUM) * mean, "var": MOMENTUM * s["var"] + (1 - MOMENTUM) * var}
    return y, new


def _bn_params(n):
    return {"scale": jnp.ones(n), "bias": jnp.zeros(n)}, {"mean": jnp.zeros(n), "var": jnp.ones(n)}


def mlp_init(key, fan_in, width, depth, out):
    params, stats = {"layers": []}, []
    for _ in range(depth):
        key, k = jax.random.split(key)
        p, s = _bn_params(width)
        p["w"] = jax.random.normal(k, (fan_in, width)) / math.sqrt(fan_in)
        params["layers"].append(p)
        stats.append(s)
        fan_in = width
    key, k = jax.random.split(key)
    params["head"] = {"w": jax.random.normal(k, (fan_in, out)) / math.sqrt(fan_in), "b": jnp.zeros(out)}
    return params, stats


def mlp_apply(params, stats, x):
    h = x.reshape(x.shape[0], -1)
    new_stats = []
    for p, s in zip(params["layers"], stats, strict=True):
        h, ns = _bn(h @ p["w"], p, s)
        h = jax.nn.sigmoid(h)
        new_stats.append(ns)
    return h @ params["head"]["w"] + params["head"]["b"], new_stats


def _conv(x, w):
    return jax.lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))


def _pool(h):
    return jax.lax.reduce_window(h, -jnp.inf, jax.lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "VALID")


def cnn_init(key, channels, width, depth, out):
    params, stats = {"layers": []}, []
    for i in range(depth):
        c_out = width * 2 ** (i // 2)
        key, k = jax.random.split(key)
        p, s = _bn_params(c_out)
        p["w"] = jax.random.normal(k, (3, 3, channels, c_out)) / math.sqrt(9 * channels)
        params["layers"].append(p)
        stats.append(s)
        channels = c_out
    key, k = jax.random.split(key)
    params["head"] = {"w": jax.random.normal(k, (channels, out)) / math.sqrt(channels), "b": jnp.zeros(out)}
    return params, stats


def cnn_apply(params, stats, x):
    h, new_stats, size = x, [], x.shape[1]
    for i, (p, s) in enumerate(zip(params["layers"], stats, strict=True)):
        h, ns = _bn(_conv(h, p["w"]), p, s)
        h = jax.nn.relu(h)
        new_stats.append(ns)
        if i % 2 == 1 and size >= 2:
            h, size = _pool(h), size // 2
    return h.mean((1, 2)) @ params["head"]["w"] + params["head"]["b"], new_stats


def make(kind: str, config, input_shape, num_classes, seed=0):
    """(init_state, step, chunk): `step(state, x, y, idx)` one SGD step on rows `idx`;
    `chunk(state, x, y, idx[K, B])` K steps in one `lax.scan`."""
    m = config.model
    if kind == "mlp":
        params, stats = mlp_init(jax.random.key(seed), int(np.prod(input_shape)), m.width, m.depth, num_classes)
        apply = mlp_apply
    else:
        params, stats = cnn_init(jax.random.key(seed), input_shape[-1], m.width, m.depth, num_classes)
        apply = cnn_apply
    o = config.optimizer
    if o.schedule == "cosine":
        lr = optax.cosine_decay_schedule(o.learning_rate, config.train.num_steps)
    else:
        lr = o.learning_rate
    tx = optax.sgd(lr, momentum=o.momentum if o.name == "momentum" else None)
    state = (params, stats, tx.init(params))

    def loss_fn(params, stats, x, y):
        logits, new_stats = apply(params, stats, x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), new_stats

    def one(state, x, y, idx):
        params, stats, opt = state
        (loss, new_stats), g = jax.value_and_grad(loss_fn, has_aux=True)(params, stats, x[idx], y[idx])
        updates, opt = tx.update(g, opt, params)
        return (optax.apply_updates(params, updates), new_stats, opt), loss

    def chunk(state, x, y, idx):
        return jax.lax.scan(lambda s, i: one(s, x, y, i), state, idx)

    return state, jax.jit(one, donate_argnums=0), jax.jit(chunk, donate_argnums=0)


class Indices:
    """Host-side epoch-wise shuffling (numpy), batch index arrays on demand."""

    def __init__(self, n, batch_size, seed=0):
        self.n, self.b = n, batch_size
        self.rng = np.random.default_rng(seed)
        self.per_epoch = n // batch_size
        self._perm, self._pos = None, self.per_epoch

    def next(self):
        if self._pos == self.per_epoch:
            self._perm, self._pos = self.rng.permutation(self.n).astype(np.int32), 0
        out = self._perm[self._pos * self.b:(self._pos + 1) * self.b]
        self._pos += 1
        return out

    def chunk(self, k):
        return np.stack([self.next() for _ in range(k)])
