"""Models: MLP (optionally residual), VGG-style CNN, deep linear network.

Every model is an NNX module whose hidden layers sit in an `nnx.Dict` under stable
names (`dense_0`, `conv_3`, ...; the output layer is `head`). A call
`model(x, train=..., rng=...)` returns `(output, aux)`, where `aux[layer]` holds the
layer's normalization input (`norm_in`) and nonlinearity input (`act_in`) for the
probes, and, where the normalizer computed them anyway (batch norm in training), their
per-unit [mean, variance] as `norm_in_moments` / `act_in_moments` ([2, units]); under
`jax.jit` whatever the caller does not use is compiled away.

With `model.scan_layers` the MLP's hidden layers 1..depth-1 run under `lax.scan` with
their variables stacked along a leading layer axis under `stack` (not `layers`); their
names follow the unrolled layers, numbered on (`dense_1`, `dense_2`, ...), and their aux
stays stacked inside a `LayerAux` (see there), so the probes can treat them as one batch.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from bn_research import kernels, mesh, norms

ACTIVATIONS = {
    "sigmoid": jax.nn.sigmoid,
    "tanh": jnp.tanh,
    "relu": jax.nn.relu,
    "linear": lambda x: x,
}


def get_activation(name: str):
    if name not in ACTIVATIONS:
        raise ValueError(f"unknown activation '{name}'; choose one of: {', '.join(ACTIVATIONS)}")
    return ACTIVATIONS[name]


class Layer(nnx.Module):
    """linear -> norm -> activation ('before') or linear -> activation -> norm ('after')."""

    def __init__(self, kind, fan_in, fan_out, activation, norm_name, norm_cfg, *, rngs, **kw):
        spec = norms.get(norm_name)
        self.linear = norms.make_linear(kind, fan_in, fan_out, spec, norm_cfg, rngs=rngs, **kw)
        self.norm = spec.make(fan_out, norm_cfg, rngs=rngs)
        self.activation = activation
        self.placement = norm_cfg.placement
        if self.placement not in ("before", "after"):
            raise ValueError(
                f"norm.placement must be 'before' or 'after', not '{self.placement}'"
            )

    def __call__(self, x, *, train, rng):
        act = ACTIVATIONS[self.activation]
        z = self.linear(x)
        if self.placement == "before":
            out, a, moments = self._norm(z, train, rng, act)
            aux = {"norm_in": z, "act_in": a}
            aux.update({k: moments[m] for k, m in (("norm_in_moments", "in"), ("act_in_moments", "out"))
                        if m in moments})
            return out, aux
        u = act(z)
        _, y, moments = self._norm(u, train, rng)
        aux = {"norm_in": u, "act_in": z}
        if "in" in moments:
            aux["norm_in_moments"] = moments["in"]
        return y, aux

    def _norm(self, x, train, rng, activation=None):
        """(activation(y), y, moments) of the normalizer's output y: the [2, F] means and
        variances it knows of its input ("in") and of y ("out"), if any. Normalizers with
        `with_moments` (batch norm) apply the activation themselves
        (`norms.BatchNorm.with_moments`)."""
        with_moments = getattr(self.norm, "with_moments", None)
        if with_moments is not None:
            return with_moments(x, train=train, rng=rng, activation=activation)
        y = self.norm(x, train=train, rng=rng)
        return kernels.activate(y, activation), y, {}


@jax.tree_util.register_pytree_node_class
class LayerAux(Mapping):
    """The aux of a model with a scanned stack: a read-only mapping {layer name: {"norm_in",
    "act_in"}} in network order, like the dict of an unrolled model. `groups` holds
    (names, stacked, {key: array}) per group of layers; a stacked group's arrays carry a
    leading layer axis, as `lax.scan` returned them. Looking a stacked layer up by name
    slices it out; the probes read `groups` directly, so the traced program does not
    unroll the stack."""

    def __init__(self, groups):
        self.groups = tuple((tuple(names), bool(stacked), tree) for names, stacked, tree in groups)
        self._where = {n: (g, j) for g, (names, _, _) in enumerate(self.groups) for j, n in enumerate(names)}

    def __getitem__(self, name):
        g, j = self._where[name]
        _, stacked, tree = self.groups[g]
        return {k: v[j] for k, v in tree.items()} if stacked else tree

    def __iter__(self):
        return iter(self._where)

    def __len__(self):
        return len(self._where)

    def tree_flatten(self):
        return [tree for _, _, tree in self.groups], tuple((names, st) for names, st, _ in self.groups)

    @classmethod
    def tree_unflatten(cls, meta, children):
        return cls((names, st, tree) for (names, st), tree in zip(meta, children, strict=True))


def _layer_rng(rng, i):
    return None if rng is None else jax.random.fold_in(rng, i)


class MLP(nnx.Module):
    """`depth` hidden layers of `width` units, then a plain dense `head`.

    With `residual`, every hidden layer after the first adds its input: h <- h + f(h).
    """

    def __init__(self, cfg, norm_cfg, input_shape, output_dim, *, rngs: nnx.Rngs):
        get_activation(cfg.activation)
        fan_in = int(jnp.prod(jnp.array(input_shape)))
        self.residual = bool(cfg.residual)
        layers = {}
        for i in range(cfg.depth):
            layers[f"dense_{i}"] = Layer(
                "dense", fan_in, cfg.width, cfg.activation, cfg.norm, norm_cfg,
                init_scale=cfg.init_scale, rngs=rngs,
            )
            fan_in = cfg.width
        # Depth order, kept explicitly: nnx.merge rebuilds the Dict in sorted key order
        # (dense_0, dense_1, dense_10, ...), which is not the order of the layers.
        self.names = tuple(layers)
        # Shallow stacks compile faster unrolled (depth 3, default probes: 2.45 s unrolled,
        # 2.9 s scanned); deep ones much faster scanned (depth 10: 6.5 s against 4.4 s).
        min_depth = max(3, int(cfg.get("scan_min_depth", 3)))
        self.scan_layers = bool(cfg.get("scan_layers", False)) and cfg.depth >= min_depth
        if self.scan_layers:
            # Hidden layers 1..depth-1 share one shape: their variables are stacked along a
            # leading layer axis in `stack` and applied by lax.scan, so compile time does not
            # grow with depth. Same initialization as the unrolled model (built the same way).
            rest = [layers.pop(name) for name in self.names[1:]]
            stacked = jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *[nnx.state(m) for m in rest])
            self.stack = rest[0]
            nnx.update(self.stack, stacked)
        self.layers = nnx.Dict(layers)
        self.head = norms.Dense(fan_in, output_dim, use_bias=True, rngs=rngs)

    def layer_names(self):
        return list(self.names)

    def __call__(self, x, *, train: bool, rng=None):
        h = x.reshape((x.shape[0], -1))
        aux = {}
        unrolled = self.names[:1] if self.scan_layers else self.names
        for i, name in enumerate(unrolled):
            out, aux[name] = self.layers[name](h, train=train, rng=_layer_rng(rng, i))
            h = h + out if (self.residual and i > 0) else out
        if self.scan_layers:
            h, stacked_aux = self._scan_stack(h, train, rng)
            aux = LayerAux([*(((n,), False, a) for n, a in aux.items()), (self.names[1:], True, stacked_aux)])
        return self.head(h), aux

    def _scan_stack(self, h, train, rng):
        """Layers 1..depth-1 by lax.scan over the stacked variables; returns the output and
        the per-layer aux stacked along axis 0. Batch statistics are written back."""
        graphdef, state = nnx.split(self.stack)

        def body(h, xs):
            layer_state, i = xs
            layer = nnx.merge(graphdef, layer_state)
            out, a = layer(h, train=train, rng=_layer_rng(rng, i))
            return (h + out if self.residual else out), (nnx.state(layer), a)

        index = jnp.arange(1, len(self.names), dtype=jnp.int32)
        h, (new_state, stacked_aux) = jax.lax.scan(body, h, (state, index))
        nnx.update(self.stack, new_state)
        return h, stacked_aux


class CNN(nnx.Module):
    """VGG-style: `depth` 3x3 conv layers, widths w, w, 2w, 2w, 4w, ...; 2x2 max-pooling
    after every second conv while the image is at least 2x2; global average pool; `head`."""

    def __init__(self, cfg, norm_cfg, input_shape, output_dim, *, rngs: nnx.Rngs):
        get_activation(cfg.activation)
        if len(input_shape) != 3:
            raise ValueError(
                f"model.name='cnn' needs images [H, W, C]; this dataset gives {tuple(input_shape)}"
            )
        channels, size = input_shape[-1], min(input_shape[:2])
        layers, self.pool_after = {}, []
        for i in range(cfg.depth):
            width = cfg.width * 2 ** (i // 2)
            layers[f"conv_{i}"] = Layer(
                "conv", channels, width, cfg.activation, cfg.norm, norm_cfg,
                init_scale=cfg.init_scale, rngs=rngs,
            )
            channels = width
            if i % 2 == 1 and size >= 2:
                self.pool_after.append(f"conv_{i}")
                size //= 2
        self.layers = nnx.Dict(layers)
        # Depth order, kept explicitly: nnx.merge rebuilds the Dict in sorted key order
        # (dense_0, dense_1, dense_10, ...), which is not the order of the layers.
        self.names = tuple(layers)
        self.head = norms.Dense(channels, output_dim, use_bias=True, rngs=rngs)

    def layer_names(self):
        return list(self.names)

    def __call__(self, x, *, train: bool, rng=None):
        h, aux = x, {}
        for i, name in enumerate(self.layer_names()):
            h, aux[name] = self.layers[name](h, train=train, rng=_layer_rng(rng, i))
            if name in self.pool_after:
                h = kernels.max_pool_2x2(h)
        return self.head(h.mean((1, 2))), aux


def _deep_linear(cfg, norm_cfg, input_shape, output_dim, *, rngs):
    """Deep linear network (Santurkar et al. 2018, sec. 3.2; Saxe et al. 2014): an MLP
    whose activation is the identity."""
    if cfg.activation != "linear":
        raise ValueError(
            f"model.name='deep_linear' needs model.activation='linear', not '{cfg.activation}'"
        )
    return MLP(cfg, norm_cfg, input_shape, output_dim, rngs=rngs)


MODELS = {"mlp": MLP, "cnn": CNN, "deep_linear": _deep_linear}


def get(name: str):
    if name not in MODELS:
        raise ValueError(f"unknown model '{name}'; choose one of: {', '.join(MODELS)}")
    return MODELS[name]


def build(config, input_shape, output_dim, seed: int):
    """The model named by `config.model.name`, initialized from `seed`. Its batch-norm
    groups follow `norm.stats` (`mesh.norm_groups`: per-device shards or virtual groups)."""
    norm_cfg = config.norm
    groups = mesh.norm_groups(config)
    if groups != int(norm_cfg.virtual_batch_size):
        norm_cfg = ml_collections.ConfigDict(norm_cfg.to_dict())
        norm_cfg.virtual_batch_size = groups
    return get(config.model.name)(
        config.model, norm_cfg, tuple(input_shape), output_dim, rngs=nnx.Rngs(params=seed)
    )


def data_init(model, x):
    """Data-dependent initialization of weight-normalized layers (Salimans & Kingma 2016,
    sec. 3), layer by layer on the batch `x`; a no-op for other variants."""
    mlp = isinstance(model, MLP)
    scanned = mlp and model.scan_layers
    h = x.reshape((x.shape[0], -1)) if mlp else x
    for i, name in enumerate(model.layer_names()[:1] if scanned else model.layer_names()):
        h = _data_init_layer(model.layers[name], h, residual=mlp and model.residual and i > 0)
        if isinstance(model, CNN) and name in model.pool_after:
            h = kernels.max_pool_2x2(h)
    if scanned:
        _data_init_stack(model, h)


def _data_init_layer(layer, h, *, residual):
    """Data-dependent init of one layer on its input `h`; returns the layer's output."""
    if isinstance(layer.linear, (norms.WNDense, norms.WNConv)):
        norms.wn_data_init(layer.linear, h)
    out, _ = layer(h, train=False, rng=None)
    return h + out if residual else out


def _data_init_stack(model, h):
    """`data_init` of a scanned stack, layer by layer (once, eagerly, outside jit): each
    layer is cut out of the stacked variables, initialized, and written back."""
    graphdef, state = nnx.split(model.stack)
    for j in range(len(model.names) - 1):
        layer = nnx.merge(graphdef, jax.tree_util.tree_map(lambda a, j=j: a[j], state))
        h = _data_init_layer(layer, h, residual=model.residual)
        state = jax.tree_util.tree_map(lambda a, b, j=j: a.at[j].set(b), state, nnx.state(layer))
    nnx.update(model.stack, state)
