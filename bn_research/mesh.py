"""Data parallelism over a device mesh (`config.mesh`, `config.norm.stats`).

A `jax.sharding.Mesh` with one `data` axis over `mesh.data` local devices (0 = all of
them). The training state and the device-resident dataset are replicated (`P()`); each
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
"""

from __future__ import annotations

import jax
import ml_collections
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

STATS = ("global", "per_device", "virtual")


def default_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.data = 0  # devices on the `data` axis; 0 = every local device
    return c


def size(config) -> int:
    """Devices on the data axis for `config` (checked against what is available)."""
    return int(config.mesh.data) or jax.local_device_count()


def check(config) -> str | None:
    """One line describing an impossible mesh / statistics setting, or None."""
    n_req, avail = int(config.mesh.data), jax.local_device_count()
    if n_req < 0:
        return f"mesh.data must be >= 0 (0 = every local device), got {n_req}"
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
    # Auto axes: XLA propagates the batch sharding and inserts the collectives itself.
    return jax.make_mesh((n,), ("data",), axis_types=(jax.sharding.AxisType.Auto,),
                         devices=jax.local_devices()[:n])


def replicated(mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharded(mesh) -> NamedSharding:
    return NamedSharding(mesh, P("data"))


def describe(mesh) -> dict:
    return {name: int(s) for name, s in mesh.shape.items()}
