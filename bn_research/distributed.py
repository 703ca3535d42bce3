"""Multi-process runs on JAX's own runtime (`jax.distributed`).

One Python process per host (or per accelerator); every process runs the same program.
`initialize()` joins them before JAX touches a device; afterwards `jax.devices()` lists
the devices of every process, `bn_research.mesh` builds its `data` axis over all of them,
and every jitted step is one SPMD program across the processes.

Where the process layout comes from, first match wins:
1. explicit arguments `coordinator_address`, `num_processes`, `process_id`;
2. environment variables `BN_RESEARCH_COORDINATOR_ADDRESS`, `BN_RESEARCH_NUM_PROCESSES`,
   `BN_RESEARCH_PROCESS_ID` (each one fills the argument left at None);
3. nothing given: JAX's cluster auto-detection (SLURM, Open MPI, Cloud TPU pods, GKE,
   Kubernetes with the `kubernetes` package, `JAX_COORDINATOR_ADDRESS`). Outside any
   cluster JAX finds no coordinator: the run stays single-process and nothing changes.

Nothing happens at import. On the CPU backend the cross-process collectives are gloo's
(`jax_cpu_collectives_implementation`), set before the runtime starts.

After initialization, the training loop differs from a single-process one in few places
(see `bn_research.mesh` for placement): every process builds the same state, runs every
jitted chunk and every checkpoint save/restore (orbax's are collective); only
`is_writer()` (process 0) writes run files (metrics, summary, lock, TensorBoard).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import jax

ENV = {
    "coordinator_address": "BN_RESEARCH_COORDINATOR_ADDRESS",
    "num_processes": "BN_RESEARCH_NUM_PROCESSES",
    "process_id": "BN_RESEARCH_PROCESS_ID",
}


class DistributedError(ValueError):
    """A multi-process setting that cannot work; one line naming the problem and the fix."""


def _from_env(name: str, value):
    if value is not None:
        return value
    raw = os.environ.get(ENV[name], "").strip()
    return raw or None


def _as_int(name: str, value) -> int:
    try:
        out = int(value)
    except (TypeError, ValueError):
        raise DistributedError(
            f"{name} must be an integer, got {value!r} (argument or {ENV[name]})") from None
    if isinstance(value, float) and value != out:
        raise DistributedError(f"{name} must be an integer, got {value!r}")
    return out


def resolve(coordinator_address=None, num_processes=None, process_id=None):
    """(coordinator_address, num_processes, process_id) from the arguments, then the
    environment; all three None when neither gives any. Raises DistributedError."""
    values = {"coordinator_address": coordinator_address, "num_processes": num_processes,
              "process_id": process_id}
    values = {k: _from_env(k, v) for k, v in values.items()}
    given = [k for k, v in values.items() if v is not None]
    if not given:
        return None, None, None
    if len(given) < 3:
        missing = [k for k in values if values[k] is None]
        raise DistributedError(
            f"multi-process setup got {', '.join(given)} but not {', '.join(missing)}; give all three "
            f"(arguments or {', '.join(ENV[k] for k in missing)}) or none to let JAX detect the cluster")
    address = str(values["coordinator_address"]).strip()
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise DistributedError(
            f"coordinator_address must be host:port (e.g. 10.0.0.1:1234, the address of process 0), "
            f"got {address!r}")
    n, pid = _as_int("num_processes", values["num_processes"]), _as_int("process_id", values["process_id"])
    if n < 1:
        raise DistributedError(f"num_processes must be >= 1, got {n}")
    if not 0 <= pid < n:
        raise DistributedError(
            f"process_id={pid} is not in 0..{n - 1} (num_processes={n}); number the processes 0..{n - 1}")
    return address, n, pid


def _backends_started() -> bool:
    from jax._src import xla_bridge  # no public equivalent in jax 0.10

    return xla_bridge.backends_are_initialized()


def _use_gloo() -> None:
    """Cross-process collectives of the CPU backend: gloo (a no-op for GPU/TPU computations)."""
    jax.config.update("jax_cpu_collectives_implementation", "gloo")


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, local_device_ids: int | Sequence[int] | None = None,
               *, initialization_timeout: int = 300) -> dict:
    """Join the processes of this run; returns `describe()`.

    Must run before anything initializes JAX's backends (jax.devices(), any array).
    Explicit settings (arguments or BN_RESEARCH_* variables) that cannot be honoured raise
    DistributedError; with none, a cluster JAX detects is joined and otherwise the run
    stays single-process. Calling it again in the same process returns `describe()`.
    """
    address, n, pid = resolve(coordinator_address, num_processes, process_id)
    explicit = address is not None
    if jax.distributed.is_initialized():
        if explicit and (jax.process_count() != n or jax.process_index() != pid):
            raise DistributedError(
                f"jax.distributed is already initialized as process {jax.process_index()} of "
                f"{jax.process_count()}, not {pid} of {n}; initialize once per process")
        return describe()
    if _backends_started():
        if explicit:
            raise DistributedError(
                "distributed.initialize must run before JAX starts its backends (before jax.devices(), "
                "any array or jit); call it first thing in the program")
        return describe()  # too late to detect a cluster: this process already runs alone
    if explicit and n == 1:
        return describe()  # one process: nothing to coordinate
    previous = jax.config.jax_cpu_collectives_implementation
    _use_gloo()
    if explicit:
        try:
            jax.distributed.initialize(address, n, pid, local_device_ids,
                                       cluster_detection_method="deactivate",
                                       initialization_timeout=initialization_timeout)
        except (RuntimeError, ValueError) as e:  # XlaRuntimeError is a RuntimeError
            text = " ".join(str(e).split())[:160]
            raise DistributedError(
                f"process {pid} of {n} could not join the coordinator at {address} ({text}); check that "
                "process 0 runs with the same address and that the port is free and reachable") from None
        return describe()
    try:
        jax.distributed.initialize(local_device_ids=local_device_ids,
                                   initialization_timeout=initialization_timeout)
    except ValueError as e:
        # JAX found no cluster (jax 0.10: "coordinator_address should be defined."):
        # single-process run, global state as it was.
        if jax.distributed.is_initialized():
            raise
        jax.config.update("jax_cpu_collectives_implementation", previous)
        del e
    return describe()


def shutdown() -> None:
    """Leave the distributed runtime (a no-op when single-process)."""
    jax.distributed.shutdown()


def process_index() -> int:
    return jax.process_index()


def process_count() -> int:
    return jax.process_count()


def is_writer() -> bool:
    """True in the one process (0) that writes the run directory's files."""
    return jax.process_index() == 0


def describe() -> dict:
    """The process layout for summary.json."""
    return {"processes": jax.process_count(), "process_index": jax.process_index(),
            "local_devices": jax.local_device_count(), "devices": jax.device_count()}


def on_writer(fn, *, share: bool = False):
    """`fn()` in the writing process only (all of it in a single-process run).

    Several processes: the others learn with one collective whether it failed, so an error
    in process 0 (a refused workdir, say) stops every process at once instead of leaving
    them waiting in the next collective; with `share`, its result (an int or bool) is
    broadcast and returned everywhere, else the others get None.
    """
    if jax.process_count() == 1:
        return fn()
    import numpy as np
    from jax.experimental import multihost_utils

    result, error = None, None
    if is_writer():
        try:
            result = fn()
        except Exception as e:  # noqa: BLE001  (re-raised below, after telling the others)
            error = e
    code = -1 if error is not None else (int(result) if share and result is not None else 0)
    code = int(multihost_utils.broadcast_one_to_all(np.int32(code)))
    if error is not None:
        raise error
    if code == -1:
        raise DistributedError("process 0 stopped the run (its output says why)")
    return result if is_writer() else (code if share else None)


def any_process(flag: bool) -> bool:
    """True when `flag` holds in any process (one small collective when several run)."""
    if jax.process_count() == 1:
        return bool(flag)
    import numpy as np
    from jax.experimental import multihost_utils

    return bool(np.asarray(multihost_utils.process_allgather(np.int32(bool(flag)))).any())
