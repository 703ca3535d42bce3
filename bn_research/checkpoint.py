"""Orbax checkpoints of the whole TrainState, for exact resume.

A checkpoint at step S holds two items:

- `state`: the TrainState pytree (params, batch_stats, opt_state, step, rng, probes),
  copied to host first so the next chunk may donate the device buffers while orbax
  writes in the background;
- `meta`: JSON the host loop needs to continue as if never stopped (the unfinished
  logging window, the last value of every metric, time spent so far) plus a SHA-256 of
  the state's bytes and one of the metadata itself, checked on restore so that silently
  garbled files are caught.

Restore goes into the structure of a freshly built state (`target`): the graphdef is
never pickled and a checkpoint of another architecture fails loudly. An unreadable
checkpoint is moved to `<workdir>/corrupt_checkpoints/<step>` (never deleted) with a
one-line warning and the previous one is tried; if none is readable, `CheckpointError`.
The reads orbax leaves in flight when a restore fails would each print an "Event loop is
closed" traceback a moment later; `_QUIET` drops those (and only those).
"""

from __future__ import annotations

import copy
import hashlib
import json
import shutil
import sys
import threading
import time
from pathlib import Path

import jax
import numpy as np

CHECKPOINTS, CORRUPT = "checkpoints", "corrupt_checkpoints"


class CheckpointError(ValueError):
    """No usable checkpoint where one was expected; one line naming the problem and the fix."""


def _ocp():
    import orbax.checkpoint as ocp

    return ocp


def state_digest(host_state) -> str:
    """SHA-256 over the dtype, shape and bytes of every leaf, in tree order."""
    h = hashlib.sha256()
    for leaf in jax.tree_util.tree_leaves(host_state):
        a = np.ascontiguousarray(np.asarray(leaf))
        h.update(f"{a.dtype.str}{a.shape}".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def meta_digest(meta: dict) -> str:
    """SHA-256 of the metadata as canonical JSON, without its own digest fields."""
    body = {k: v for k, v in meta.items() if k not in ("digest", "meta_digest")}
    return hashlib.sha256(json.dumps(body, sort_keys=True, allow_nan=True).encode()).hexdigest()


def _short(e: BaseException, limit: int = 120) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text[:limit] + ("..." if len(text) > limit else "")


def _closed_loop_noise(unraisable) -> bool:
    """True for the exception that orbax's cancelled reads leave behind after a restore
    failed: each read still in flight completes into the restore's event loop, which
    `asyncio.run` has closed by then, and is reported as 'Exception ignored' (a dozen
    tracebacks before the one-line warning)."""
    e, tb = unraisable.exc_value, unraisable.exc_traceback
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return (unraisable.object is None and isinstance(e, RuntimeError) and str(e) == "Event loop is closed"
            and tb is not None and tb.tb_frame.f_code.co_name == "_check_closed")


class _QuietFailedRestore:
    """While installed, `sys.unraisablehook` drops `_closed_loop_noise` and passes every
    other unraisable exception on to the hook it replaced. One per process (`_QUIET`),
    shared by the Checkpointers that hold it: each holds it during a restore and, after a
    failed one, until it closes; the previous hook is back when the last lets go. The
    cancelled reads finish a few milliseconds after the failure: `settle` waits for them."""

    def __init__(self):
        self.previous = None
        self.holders = set()
        self.dropped = 0
        self._lock = threading.Lock()

    def __call__(self, unraisable):
        if _closed_loop_noise(unraisable):
            self.dropped += 1
        else:
            (self.previous or sys.__unraisablehook__)(unraisable)

    def settle(self, quiet: float = 0.1, limit: float = 2.0) -> None:
        """Return once nothing was dropped for `quiet` seconds (at most `limit`)."""
        start = mark = time.monotonic()
        seen = self.dropped
        while time.monotonic() - start < limit:
            time.sleep(0.01)
            if self.dropped != seen:
                seen, mark = self.dropped, time.monotonic()
            elif time.monotonic() - mark >= quiet:
                return

    def install(self, holder) -> None:
        with self._lock:
            if not self.holders:
                self.previous = sys.unraisablehook
                sys.unraisablehook = self
            self.holders.add(id(holder))

    def remove(self, holder) -> None:
        with self._lock:
            if id(holder) not in self.holders:
                return
            self.holders.discard(id(holder))
            if not self.holders:
                if sys.unraisablehook is self:  # a hook installed after ours stays
                    sys.unraisablehook = self.previous
                self.previous = None


_QUIET = _QuietFailedRestore()


class Checkpointer:
    """Asynchronous orbax checkpoints under `<workdir>/checkpoints`, keeping the last `keep`."""

    def __init__(self, workdir, keep: int = 3, *, asynchronous: bool = True):
        ocp = _ocp()
        self.workdir = Path(workdir)
        self.directory = self.workdir / CHECKPOINTS
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max(int(keep), 1), create=True, cleanup_tmp_directories=True,
            enable_async_checkpointing=asynchronous,
        )
        try:
            self._manager = ocp.CheckpointManager(self.directory.absolute(), options=options)
        except Exception as e:  # noqa: BLE001  (a garbled checkpoints/ directory: one line)
            raise CheckpointError(
                f"cannot open checkpoints in {self.directory} ({_short(e)}); "
                "pass --overwrite to start the run again or choose a new --workdir"
            ) from None

    def steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def save(self, step: int, state, meta: dict) -> str:
        """Start saving `state` at `step`; returns (once the state is on the host) its
        `state_digest`."""
        ocp = _ocp()
        host = jax.device_get(state)
        # a copy: the caller's objects (the loop's last row, its resumes) keep changing
        # while the asynchronous save is still writing them
        meta = copy.deepcopy(dict(meta, step=int(step), digest=state_digest(host)))
        meta["meta_digest"] = meta_digest(meta)
        self._manager.save(int(step), args=ocp.args.Composite(
            state=ocp.args.StandardSave(host), meta=ocp.args.JsonSave(meta)), force=True)
        return meta["digest"]

    def _restore(self, step: int, target):
        ocp = _ocp()
        abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, target)
        out = self._manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
        state, meta = out["state"], out["meta"]
        if not isinstance(meta, dict) or meta.get("meta_digest") != meta_digest(meta):
            raise ValueError("metadata does not match its digest")
        if meta.get("step") != step:
            raise ValueError("metadata does not match the step")
        if jax.tree_util.tree_structure(state) != jax.tree_util.tree_structure(target):
            raise ValueError("state structure differs from this config's")
        if int(np.asarray(state["step"])) != step:
            raise ValueError(f"state step {int(np.asarray(state['step']))} != {step}")
        if meta.get("digest") != state_digest(jax.device_get(state)):
            raise ValueError("array bytes do not match the saved digest")
        return state, meta

    def restore_latest(self, target, warn=print, steps=None):
        """(step, state, meta) of the newest readable checkpoint (among `steps`, when given),
        or None when there is none.

        Unreadable newer checkpoints are moved aside (warning each); if every checkpoint
        is unreadable, nothing is moved and CheckpointError is raised.
        """
        steps = [s for s in self.steps() if steps is None or s in steps]
        failures = []
        for step in reversed(steps):
            _QUIET.install(self)
            try:
                state, meta = self._restore(step, target)
            except Exception as e:  # noqa: BLE001  (any failure to read: try the previous one)
                failures.append((step, _short(e)))
                continue
            if failures:
                _QUIET.settle()
            else:
                _QUIET.remove(self)
            for bad, reason in failures:
                moved = self._move_aside(bad)
                warn(f"warning: checkpoint at step {bad} in {self.directory} is unreadable ({reason}); "
                     f"moved to {moved}, resuming from step {step}")
            return step, state, meta
        if failures:
            _QUIET.settle()
            bad, reason = failures[0]
            raise CheckpointError(
                f"no readable checkpoint in {self.directory} (step {bad}: {reason}); "
                "pass --overwrite to start the run again or choose a new --workdir"
            )
        return None

    def _move_aside(self, step: int) -> Path:
        src = self.directory / str(step)
        dst_root = self.workdir / CORRUPT
        dst_root.mkdir(exist_ok=True)
        dst, i = dst_root / str(step), 1
        while dst.exists():
            dst, i = dst_root / f"{step}.{i}", i + 1
        shutil.move(str(src), str(dst))
        self._manager.reload()
        return dst

    def wait(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.close()
        _QUIET.remove(self)
