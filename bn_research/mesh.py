"""Data parallelism over a device mesh (`config.mesh`, `config.norm.stats`).

A `jax.sharding.Mesh` with one `data` axis over `mesh.data` devices (0 = all of them:
every local device, or with several processes (bn_research.distributed) every device of
every process). The training state and the device-resident dataset are replicated (`P()`); each
step's batch, gathered inside jit, is constrained to `P("data")`, so every device works
on its shard of the global batch and XLA inserts the all-reduces of the gradient and of
batch norm's statistics. The step functions are the same with one device or many.

Batch-norm statistics across devices (`norm.stats`):
- `global` (default): over the whole global batch, as on one device with the same batch
  (`jnp.mean` over a sharded batch reduces across devices). The experiments' numbers do
  not depend on the device count.
- `per_device`: each device normalizes its shard by the shard's own statistics, as
  unsynchronized data-parallel training does. It equals ghost batch norm with groups of
  batch_size / mesh.data on one device, and is computed that way: the contiguous groups
  are exactly the devices' shards.
- `virtual`: ghost batch norm over groups of `norm.virtual_batch_size` examples
  (Hoffer et al. 2017), whatever the device count. A `virtual_batch_size` > 0 selects
  these groups under `global` too (the setting predates `norm.stats`).
Running statistics are the mean of the groups' statistics in every mode, computed by the
replicated state update: they are the same on every device at evaluation and checkpoint.

Several processes (`jax.process_count() > 1`): the mesh spans every device of every
process and each process runs the same jitted program on its own devices' shards.
Placement goes through `replicate` (state, device-resident dataset) and `shard_batch`
(host-fed batches): a committed single-device array cannot be `jax.device_put` onto a
mesh spanning other processes (jax 0.10 wants a cross-host transfer the CPU backend
lacks), and device_put of host values compares every leaf across processes. `fetch`
brings outputs to the host: replicated ones are read locally, others are gathered.
"""

from __future__ import annotations

import hashlib

import jax
import ml_collections
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

STATS = ("global", "per_device", "virtual")


def default_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.data = 0  # devices on the `data` axis; 0 = every device (of every process when several run)
    return c


def _available() -> int:
    """Devices a mesh may span: the local ones, or every process's when several run."""
    return jax.device_count() if jax.process_count() > 1 else jax.local_device_count()


def size(config) -> int:
    """Devices on the data axis for `config` (checked against what is available)."""
    return int(config.mesh.data) or _available()


def check(config) -> str | None:
    """One line describing an impossible mesh / statistics setting, or None."""
    n_req, avail = int(config.mesh.data), _available()
    if n_req < 0:
        return f"mesh.data must be >= 0 (0 = every device), got {n_req}"
    if jax.process_count() > 1 and n_req not in (0, avail):
        return (f"mesh.data={n_req} but {jax.process_count()} processes run: the mesh spans all their "
                f"{avail} devices; use 0 (or {avail})")
    if n_req > avail:
        return f"mesh.data={n_req} but only {avail} local devices are available; lower it or use 0"
    n = n_req or avail
    b, stats, v = int(config.train.batch_size), config.norm.stats, int(config.norm.virtual_batch_size)
    if stats not in STATS:
        return f"norm.stats must be one of {', '.join(STATS)}, got {stats!r}"
    if b % n:
        return (f"train.batch_size={b} does not split over mesh.data={n} devices; use a multiple of {n} "
                "or set mesh.data")
    if stats == "virtual" and v < 1:
        return "norm.stats=virtual needs norm.virtual_batch_size > 0 (examples per group)"
    if stats == "per_device" and v:
        return "norm.stats=per_device sets its own groups (one per device); leave norm.virtual_batch_size at 0"
    return None


def norm_groups(config) -> int:
    """The ghost-batch size the normalizers use: 0 (whole batch) for `global`."""
    stats = config.norm.stats
    if stats == "per_device":
        n = size(config)
        return int(config.train.batch_size) // n if n > 1 else 0
    return int(config.norm.virtual_batch_size)


def make(config, devices: int | None = None) -> jax.sharding.Mesh:
    """The `data` mesh of `config` (or of `devices` devices)."""
    n = devices or size(config)
    # Several processes: every device of every process (a smaller mesh, e.g. `devices=1`
    # for one device, stays on this process's devices and computes alone).
    pool = jax.devices() if jax.process_count() > 1 and n == jax.device_count() else jax.local_devices()
    # Auto axes: XLA propagates the batch sharding and inserts the collectives itself.
    return jax.make_mesh((n,), ("data",), axis_types=(jax.sharding.AxisType.Auto,),
                         devices=pool[:n])


def replicated(mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharded(mesh) -> NamedSharding:
    return NamedSharding(mesh, P("data"))


def describe(mesh) -> dict:
    return {name: int(s) for name, s in mesh.shape.items()}


def spans_processes(mesh) -> bool:
    """True when `mesh` holds devices of other processes."""
    return len({d.process_index for d in mesh.devices.flat}) > 1


def _host(leaf):
    return np.asarray(jax.device_get(leaf))


def tree_digest(host_tree) -> np.ndarray:
    """SHA-256 of a host pytree's structure, dtypes, shapes and bytes, as uint32[8]."""
    h = hashlib.sha256(str(jax.tree_util.tree_structure(host_tree)).encode())
    for leaf in jax.tree_util.tree_leaves(host_tree):
        a = np.ascontiguousarray(leaf)
        h.update(f"{a.dtype.str}{a.shape}".encode())
        h.update(a.tobytes())
    return np.frombuffer(h.digest(), np.uint32).copy()


def replicate(tree, mesh, *, check_equal: bool = True):
    """`tree` replicated on every device of `mesh` (P()).

    One process: `jax.device_put`. Several: every process passes the same values (host
    arrays, local or already replicated jax arrays); each leaf is copied to the host and
    placed on this process's devices by `jax.make_array_from_callback`, with no
    transfer between processes. `check_equal` compares one digest of the whole tree
    across processes (one small collective) and raises if the processes disagree.
    """
    sharding = replicated(mesh)
    if not spans_processes(mesh):
        return jax.device_put(tree, sharding)
    host = jax.tree_util.tree_map(_host, tree)
    if check_equal:
        from jax.experimental import multihost_utils

        multihost_utils.assert_equal(tree_digest(host), "mesh.replicate: the processes hold different "
                                     "values (build the state from the same config and seed everywhere)")
    return jax.tree_util.tree_map(
        lambda a: jax.make_array_from_callback(a.shape, sharding, lambda index: a[index]), host)


def shard_batch(local, mesh):
    """A host-fed batch split over the `data` axis (P("data")).

    One process: `local` is the global batch. Several: `local` is this process's part
    (global batch / process count examples, its own ones); the global batch is the
    processes' parts in process order.
    """
    sharding = batch_sharded(mesh)
    if not spans_processes(mesh):
        return jax.device_put(local, sharding)
    return jax.tree_util.tree_map(
        lambda a: jax.make_array_from_process_local_data(sharding, np.asarray(a)), local)


def fetch(tree):
    """Host numpy copy of jitted outputs. Replicated or process-local leaves are read
    locally; a leaf sharded over other processes is all-gathered (then every process must
    call `fetch` with the same tree)."""
    def one(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable and not x.is_fully_replicated:
            from jax.experimental import multihost_utils

            return np.asarray(multihost_utils.process_allgather(x, tiled=True))
        return _host(x)

    return jax.tree_util.tree_map(one, tree)
