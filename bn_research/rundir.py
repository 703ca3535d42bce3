"""The run directory: config.json, metrics.jsonl, summary.json, TensorBoard events.

Append-only while the run lives: metrics lines are appended and flushed, the summary is
replaced atomically (write to a temporary file, then rename).
"""

from __future__ import annotations

import json
import math
import os
import platform
import sys
import time
from importlib import metadata
from pathlib import Path

import numpy as np

CONFIG, METRICS, SUMMARY = "config.json", "metrics.jsonl", "summary.json"
RUN_FILES = (CONFIG, METRICS, SUMMARY, "layer_stats", "checkpoints")
RUN_PREFIXES = ("events.out.tfevents.",)


class WorkdirError(ValueError):
    """The workdir cannot take this run; one line naming the problem and the fix."""


def _jsonable(x):
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (np.generic, np.ndarray)):
        return _jsonable(x.tolist())
    if isinstance(x, float) and not math.isfinite(x):
        return None if math.isnan(x) else (1e308 if x > 0 else -1e308)
    return x


def atomic_write_json(path: Path, obj) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(_jsonable(obj), indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def config_diff(old: dict, new: dict, prefix="") -> list[str]:
    out = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k, "<absent>"), new.get(k, "<absent>")
        if isinstance(a, dict) and isinstance(b, dict):
            out += config_diff(a, b, f"{prefix}{k}.")
        elif a != b:
            out.append(f"{prefix}{k}: {a!r} -> {b!r}")
    return out


def existing_run_files(workdir: Path) -> list[Path]:
    if not workdir.is_dir():
        return []
    return [p for p in workdir.iterdir()
            if p.name in RUN_FILES or p.name.startswith(RUN_PREFIXES)]


def prepare(workdir: Path, config_dict: dict, *, overwrite: bool) -> None:
    """Make `workdir` ready for a new run of `config_dict`; never overwrite silently."""
    if workdir.exists() and not workdir.is_dir():
        raise WorkdirError(f"workdir {workdir} exists and is not a directory; choose another")
    found = existing_run_files(workdir)
    if found and not overwrite:
        cfg_path = workdir / CONFIG
        if cfg_path.exists():
            try:
                old = json.loads(cfg_path.read_text())
            except (OSError, ValueError):
                old = None
            diff = config_diff(old, config_dict) if isinstance(old, dict) else ["unreadable"]
            if diff:
                raise WorkdirError(
                    f"workdir {workdir} holds a run of another config ({'; '.join(diff[:3])}"
                    f"{'; ...' if len(diff) > 3 else ''}); pass --overwrite to replace it "
                    "or choose a new --workdir"
                )
        raise WorkdirError(
            f"workdir {workdir} already holds a run; pass --overwrite to start it again "
            "or choose a new --workdir"
        )
    for p in found:
        if p.is_dir():
            import shutil

            shutil.rmtree(p)
        else:
            p.unlink()
    try:
        workdir.mkdir(parents=True, exist_ok=True)
        probe = workdir / f".write_test{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise WorkdirError(f"cannot write to workdir {workdir} ({e.strerror}); "
                           "choose a writable --workdir") from None
    atomic_write_json(workdir / CONFIG, config_dict)


def versions() -> dict:
    out = {"python": platform.python_version()}
    for pkg in ("bn_research", "jax", "jaxlib", "flax", "optax", "orbax-checkpoint",
                "numpy", "tensorflow-datasets", "ml-collections"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = None
    return out


class MetricsWriter:
    """Appends one JSON object per logged step to metrics.jsonl and the same scalars to
    TensorBoard event files in the workdir."""

    def __init__(self, workdir: Path):
        from tensorboard.summary.writer.event_file_writer import EventFileWriter

        self._file = open(workdir / METRICS, "a")  # noqa: SIM115
        self._tb = EventFileWriter(str(workdir))

    def write(self, step: int, scalars: dict) -> None:
        from tensorboard.compat.proto import event_pb2, summary_pb2

        row = {"step": int(step)}
        row.update({k: float(v) for k, v in scalars.items()})
        self._file.write(json.dumps(_jsonable(row)) + "\n")
        self._file.flush()
        values = [summary_pb2.Summary.Value(tag=k, simple_value=float(v))
                  for k, v in scalars.items()]
        self._tb.add_event(event_pb2.Event(wall_time=time.time(), step=int(step),
                                           summary=summary_pb2.Summary(value=values)))

    def close(self) -> None:
        self._file.close()
        self._tb.flush()
        self._tb.close()


def write_summary(workdir: Path, summary: dict) -> None:
    atomic_write_json(workdir / SUMMARY, summary)


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
