"""Shared helpers of the probes: parameter-tree access by layer, cadence, small reductions.

Parameter trees are the `nnx.State` of `nnx.split(model, nnx.Param, ...)`: hidden layers
under `params["layers"][<name>]` with the linear map at `["linear"]` (`kernel`, and for
weight-normalized layers the length `g`, so `kernel` holds the direction v), the output
layer at `params["head"]`. A model with a scanned stack (`model.scan_layers`) keeps those
layers' variables under `params["stack"]` instead, stacked along a leading layer axis; their
names continue the unrolled ones (`dense_1`, `dense_2`, ... after `dense_0`).

The probes see every layer under its own name either way: `layer_groups` cuts the hidden
layers into groups as the model stores them, and `map_layers` runs a per-layer function
over each group with one `vmap` (an unrolled layer is a group of one), splitting the
stacked result into per-layer values only at the end, so the traced program does not grow
with the depth of a scanned stack.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from bn_research import kernels


def value(x):
    """The array inside an nnx Variable leaf (or `x` itself)."""
    return x.value if hasattr(x, "value") else x


STACK = "stack"  # where a model keeps the variables of its scanned stack


def _unrolled_names(tree) -> list[str]:
    return sorted(tree["layers"].keys(), key=lambda n: int(n.rsplit("_", 1)[1]))


def _stack_names(tree) -> tuple[str, ...]:
    """Names of the layers of a scanned stack: they follow the unrolled layers, numbered on."""
    if STACK not in tree:
        return ()
    depth = value(jax.tree_util.tree_leaves(tree[STACK])[0]).shape[0]
    prefix, last = _unrolled_names(tree)[-1].rsplit("_", 1)
    return tuple(f"{prefix}_{int(last) + 1 + k}" for k in range(depth))


def layer_groups(tree) -> list[tuple[tuple[str, ...], bool]]:
    """[(names, stacked)] in network order: each unrolled layer alone, then the scanned stack."""
    groups = [((n,), False) for n in _unrolled_names(tree)]
    stack = _stack_names(tree)
    return groups + [(stack, True)] if stack else groups


def layer_names(params) -> list[str]:
    """Hidden layer names in network order (`dense_2` before `dense_10`), stacked ones included."""
    return [n for names, _ in layer_groups(params) for n in names]


def group_tree(tree, names, stacked):
    """The variables of one group of `layer_groups`, every leaf with a leading layer axis."""
    if stacked:
        return tree[STACK]
    return jax.tree_util.tree_map(lambda x: x[None], tree["layers"][names[0]])


def layer(tree, name):
    """The variables of hidden layer `name` (sliced out of the stack for a stacked layer)."""
    if name in tree["layers"]:
        return tree["layers"][name]
    j = _stack_names(tree).index(name)
    return jax.tree_util.tree_map(lambda x: x[j], tree[STACK])


def unstack(stacked, names) -> dict:
    """{names[j]: the j-th slice along the leading layer axis of every leaf of `stacked`}."""
    return {n: jax.tree_util.tree_map(lambda x, j=j: x[j], stacked) for j, n in enumerate(names)}


MERGE_MAX = 1 << 16  # layers whose arrays hold at most this many elements may share one vmap


def _signature(tree):
    leaves = jax.tree_util.tree_leaves(tree)
    return (jax.tree_util.tree_structure(tree), tuple((x.shape[1:], x.dtype) for x in leaves),
            max(int(np.prod(x.shape[1:])) for x in leaves) <= MERGE_MAX)


def merge_groups(groups) -> list[tuple[tuple[str, ...], object]]:
    """`groups` ([(names, tree with a leading layer axis on every leaf)], in network order)
    with consecutive single layers of equal shapes and dtypes, each array at most MERGE_MAX
    elements per layer, concatenated into one group: the unrolled hidden layers of an MLP
    then cost one vmapped set of operations instead of one per layer. Larger layers and
    scanned stacks (already one group) stay as they are: concatenating them would copy
    more memory than a few operations cost."""
    out = []  # [(names, tree, signature)]; a signature of None marks a group that takes no more
    for names, tree in groups:
        sig = _signature(tree) if len(names) == 1 else None
        if out and sig is not None and sig[2] and out[-1][2] == sig:
            prev_names, prev, _ = out[-1]
            out[-1] = (prev_names + tuple(names),
                       jax.tree_util.tree_map(lambda a, b: jnp.concatenate([a, b]), prev, tree), sig)
        else:
            out.append((tuple(names), tree, sig))
    return [(names, tree) for names, tree, _ in out]


def map_groups(fn, *trees) -> list[tuple[tuple[str, ...], object]]:
    """[(names, fn vmapped over the group's layer axis)] for the groups of `layer_groups`
    (small equal ones merged: `merge_groups`), in network order; `fn` takes one layer's
    variables of each tree (same structure)."""
    groups = [(names, [group_tree(t, names, stacked) for t in trees]) for names, stacked in layer_groups(trees[0])]
    return [(names, jax.vmap(fn)(*parts)) for names, parts in merge_groups(groups)]


def map_layers(fn, *trees) -> dict:
    """{layer name: fn(that layer's variables of each tree)}, one vmap per group."""
    out = {}
    for names, res in map_groups(fn, *trees):
        out.update(unstack(res, names))
    return out


def aux_groups(aux) -> list[tuple[tuple[str, ...], dict]]:
    """[(names, {key: array with a leading layer axis})] of a model's aux: the groups of a
    `models.LayerAux`, or one group per layer of a plain dict."""
    if hasattr(aux, "groups"):
        return [(names, tree if stacked else jax.tree_util.tree_map(lambda x: x[None], tree))
                for names, stacked, tree in aux.groups]
    return [((n,), jax.tree_util.tree_map(lambda x: x[None], a)) for n, a in aux.items()]


@jax.tree_util.register_pytree_node_class
class StackedDict(Mapping):
    """A probe's {key: value} whose values come in stacks: `rows` holds (keys, array [n, ...])
    pairs, keys[j] naming row j (one key per layer of a group). It reads as the flat
    mapping key -> row (a lookup slices), while `pack` ravels whole stacks: the traced
    program handles a stack of layers in a constant number of ops, and the per-layer keys
    appear only on the host (`pack_layout`)."""

    def __init__(self, rows=()):
        self.rows = []
        self._where = {}
        for keys, array in rows:
            self.add(keys, array)

    def add(self, keys, array):
        """Add a stack: `keys[j]` names `array[j]`."""
        for j, k in enumerate(keys):
            self._where[k] = (len(self.rows), j)
        self.rows.append((tuple(keys), array))

    def add_groups(self, template: str, groups) -> None:
        """For each (names, {stat: [n, ...]}) of `groups`: one stack per stat, keyed by
        `template.format(layer=name, stat=stat)`."""
        for names, stats in groups:
            for stat, array in stats.items():
                self.add([template.format(layer=n, stat=stat) for n in names], array)

    def update(self, other):
        for keys, array in other.rows:
            self.add(keys, array)

    def __getitem__(self, key):
        r, j = self._where[key]
        return self.rows[r][1][j]

    def __iter__(self):
        return iter(self._where)

    def __len__(self):
        return len(self._where)

    def tree_flatten(self):
        return [a for _, a in self.rows], tuple(k for k, _ in self.rows)

    @classmethod
    def tree_unflatten(cls, keys, arrays):
        return cls(zip(keys, arrays, strict=True))


def _stack_order(results) -> np.ndarray | None:
    """Element indices that put the stack-by-stack concatenation of a `StackedDict` into
    sorted key order (None when it already is): a static permutation, applied as one gather."""
    start, offset = {}, 0
    for keys, a in results.rows:
        size = int(np.prod(a.shape[1:]))
        for j, k in enumerate(keys):
            start[k] = (offset + j * size, size)
        offset += len(keys) * size
    idx = np.concatenate([np.arange(b, b + n) for b, n in (start[k] for k in sorted(start))])
    return None if np.array_equal(idx, np.arange(offset)) else idx


def pack(results):
    """One float32 vector of a probe's {key: value} in sorted key order (the order of
    `pack_layout`); None when empty. A `StackedDict` is raveled stack by stack and put in
    order by one gather, so the traced program does not grow with the stacks' depth."""
    if not len(results):
        return None
    if not isinstance(results, StackedDict):
        return jnp.concatenate([jnp.ravel(results[k]).astype(jnp.float32) for k in sorted(results)])
    flat = jnp.concatenate([jnp.ravel(a).astype(jnp.float32) for _, a in results.rows])
    idx = _stack_order(results)
    return flat if idx is None else flat[idx]


def pack_layout(shapes) -> list[tuple[str, int]]:
    """[(key, size)] in the order of `pack`, from the shapes of its input (`jax.eval_shape`)."""
    if isinstance(shapes, StackedDict):
        sizes = {k: int(np.prod(a.shape[1:])) for keys, a in shapes.rows for k in keys}
        return [(k, sizes[k]) for k in sorted(sizes)]
    return [(k, int(np.prod(shapes[k].shape))) for k in sorted(shapes)]


def layer_kernel(lay):
    """The kernel of one layer's variables (v for weight-normalized layers)."""
    return value(lay["linear"]["kernel"])


def layer_is_weight_norm(lay) -> bool:
    return "g" in lay["linear"]


def layer_effective_weight(lay):
    """w of one layer: the kernel, or g * v / ||v|| (Salimans & Kingma 2016, eq. 2)."""
    v = layer_kernel(lay)
    if not layer_is_weight_norm(lay):
        return v
    g = value(lay["linear"]["g"])
    axes = tuple(range(v.ndim - 1))
    return v * (g * jax.lax.rsqrt(jnp.sum(jnp.square(v), axes)))


def kernel(tree, name):
    """The kernel leaf of hidden layer `name` (v for weight-normalized layers)."""
    return layer_kernel(layer(tree, name))


def is_weight_norm(tree, name) -> bool:
    return layer_is_weight_norm(layer(tree, name))


def effective_weight(tree, name):
    """w of layer `name`: the kernel, or g * v / ||v|| (Salimans & Kingma 2016, eq. 2)."""
    return layer_effective_weight(layer(tree, name))


def layer_index_tree(params):
    """Same structure as `params`; every leaf holds the index of the hidden layer it belongs
    to, L (the number of hidden layers) for the head. A stacked leaf [n, ...] holds its
    layers' indices shaped [n, 1, ...] (broadcasts against the leaf)."""
    names = layer_names(params)
    index = {n: i for i, n in enumerate(names)}
    stack = [index[n] for n in _stack_names(params)]

    def leaf_index(path, x):
        keys = [getattr(k, "key", None) for k in path]
        if keys and keys[0] == "layers":
            return index[keys[1]]
        if keys and keys[0] == STACK:
            return np.asarray(stack).reshape((len(stack),) + (1,) * (np.ndim(x) - 1))
        return len(names)

    return jax.tree_util.tree_map_with_path(leaf_index, params)


def norm(x):
    return jnp.sqrt(jnp.sum(jnp.square(x)))


def tree_norm(tree):
    """The Euclidean norm of all leaves together (`kernels.global_norm_xla`)."""
    return kernels.global_norm_xla(tree)


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
