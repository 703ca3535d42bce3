"""The run directory: config.json, metrics.jsonl, summary.json, TensorBoard events.

Append-only while the run lives: metrics lines are appended and flushed, the summary is
replaced atomically (write to a temporary file, then rename). The one rewrite: when a run
resumes from a checkpoint at step S, rows of metrics.jsonl with step > S (written after
that checkpoint by the interrupted session) are dropped by writing a new file and renaming
it over the old one, so each step appears exactly once.
"""

from __future__ import annotations

import json
import math
import os
import platform
import shutil
import sys
import time
from importlib import metadata
from pathlib import Path

import numpy as np

CONFIG, METRICS, SUMMARY = "config.json", "metrics.jsonl", "summary.json"
RUN_FILES = (CONFIG, METRICS, SUMMARY, "layer_stats", "checkpoints", "corrupt_checkpoints")
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
    try:
        return [p for p in workdir.iterdir()
                if p.name in RUN_FILES or p.name.startswith(RUN_PREFIXES)]
    except OSError as e:
        raise WorkdirError(f"cannot read workdir {workdir} ({e.strerror}); "
                           "choose a readable --workdir") from None


def _normalized(config_dict: dict) -> dict:
    """The config as it reads back from config.json (tuples as lists, inf clipped)."""
    return json.loads(json.dumps(_jsonable(config_dict)))


LOCK = ".lock"


class WorkdirLock:
    """One writer per run directory: an exclusive `flock` on the workdir itself, held from
    before setup until the summary is written. The kernel drops it when the process ends,
    so a crashed run never leaves a stale lock. Taking the lock writes nothing; once the
    run starts writing (`mark()`), `<workdir>/.lock` names the holder for the message a
    second process gets. A workdir the lock had to create is removed again if the run is
    refused before it writes anything.

        with WorkdirLock(workdir) as lock:
            ...; lock.mark()  # a second process on the same workdir gets WorkdirError naming this one
    """

    def __init__(self, workdir: Path):
        self.workdir, self.fd, self.created = Path(workdir), None, False

    def __enter__(self):
        import fcntl

        if self.workdir.exists() and not self.workdir.is_dir():
            raise WorkdirError(f"workdir {self.workdir} exists and is not a directory; choose another")
        try:
            self.created = not self.workdir.exists()
            self.workdir.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.workdir, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        except OSError as e:
            raise WorkdirError(f"cannot write to workdir {self.workdir} ({e.strerror or e}); "
                               "choose a writable --workdir") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            try:
                holder = (self.workdir / LOCK).read_text().strip() or "another process"
            except OSError:
                holder = "another process"
            raise WorkdirError(f"workdir {self.workdir} is in use by {holder}; wait for it to finish, "
                               "stop it, or choose another --workdir") from None
        self.fd = fd
        return self

    def mark(self) -> None:
        """Name this process as the holder (`<workdir>/.lock`), once the run writes."""
        (self.workdir / LOCK).write_text(f"pid {os.getpid()} on {platform.node()} since "
                                         f"{time.strftime('%Y-%m-%d %H:%M:%S')} ({' '.join(sys.argv[:2])[:120]})\n")

    def __exit__(self, exc_type, *exc):
        import fcntl

        if self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None
        if exc_type is not None and self.created:
            try:
                self.workdir.rmdir()  # only if still empty: nothing of this run to keep
            except OSError:
                pass
        return False


def check(workdir: Path, config_dict: dict, *, overwrite: bool) -> bool:
    """What `prepare` will do, decided without writing anything (so it can run before the
    dataset and the model are built): True to resume a run of the same config; raises
    WorkdirError for a workdir that is a file or holds another config's run (unless
    `overwrite`)."""
    if workdir.exists() and not workdir.is_dir():
        raise WorkdirError(f"workdir {workdir} exists and is not a directory; choose another")
    found = existing_run_files(workdir)
    if not found or overwrite:
        return False
    cfg_path = workdir / CONFIG
    try:
        old = json.loads(cfg_path.read_text())
    except FileNotFoundError:
        raise WorkdirError(
            f"workdir {workdir} holds run files but no {CONFIG}; pass --overwrite to replace "
            "them or choose a new --workdir") from None
    except (OSError, ValueError):
        old = None
    if not isinstance(old, dict):
        raise WorkdirError(
            f"workdir {workdir} has an unreadable {CONFIG}, so it cannot be resumed; pass "
            "--overwrite to start the run again or choose a new --workdir")
    diff = config_diff(old, _normalized(config_dict))
    if diff:
        raise WorkdirError(
            f"workdir {workdir} holds a run of another config ({'; '.join(diff[:3])}"
            f"{'; ...' if len(diff) > 3 else ''}); pass --overwrite to replace it "
            "or choose a new --workdir"
        )
    return True


def prepare(workdir: Path, config_dict: dict, *, overwrite: bool) -> bool:
    """Make `workdir` ready for `config_dict`; returns True when it holds a run of the same
    config to resume. Never overwrites silently: a run of another config (or files of a
    run without a readable config.json) is an error unless `overwrite`."""
    resume = check(workdir, config_dict, overwrite=overwrite)
    found = existing_run_files(workdir)
    try:
        if not resume:
            for p in found:
                if p.is_dir():
                    shutil.rmtree(p)
                else:
                    p.unlink()
        workdir.mkdir(parents=True, exist_ok=True)
        probe = workdir / f".write_test{os.getpid()}"
        probe.write_text("")
        probe.unlink()
        if not resume:
            atomic_write_json(workdir / CONFIG, config_dict)
    except OSError as e:
        raise WorkdirError(f"cannot write to workdir {workdir} ({e.strerror or e}); "
                           "choose a writable --workdir") from None
    return resume


def finished_summary(workdir: Path, config_dict: dict) -> dict | None:
    """The summary of a `completed` or `diverged` run of this very config in `workdir`, else
    None. Reads only; lets a rerun of a finished command return before any work."""
    summary = read_summary(workdir)
    if summary.get("status") not in ("completed", "diverged") or summary.get("sha256") != _summary_digest(summary):
        return None  # not finished, or damaged: resume from the checkpoint, which rewrites it
    try:
        old = json.loads((workdir / CONFIG).read_text())
    except (OSError, ValueError):
        return None
    return summary if isinstance(old, dict) and not config_diff(old, _normalized(config_dict)) else None


def read_summary(workdir: Path) -> dict:
    """summary.json as a dict; {} when missing or unreadable."""
    try:
        obj = json.loads((workdir / SUMMARY).read_text())
    except (OSError, ValueError):
        return {}
    return obj if isinstance(obj, dict) else {}


def truncate_metrics(workdir: Path, step: int) -> int:
    """Drop rows of metrics.jsonl with step > `step` and a final line cut off mid-write;
    other lines (even unparseable ones) are kept. Rewrites atomically, only if needed.
    Returns the number of rows dropped."""
    path = workdir / METRICS
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return 0
    *complete, tail = data.split(b"\n")
    lines = [line + b"\n" for line in complete] + ([tail] if tail else [])
    keep = []
    for line in lines:
        if not line.endswith(b"\n"):
            continue  # the last line, cut off by a kill: never complete, drop it
        try:
            row = json.loads(line)
        except ValueError:
            keep.append(line)
            continue
        if isinstance(row, dict) and isinstance(row.get("step"), (int, float)) and row["step"] > step:
            continue
        keep.append(line)
    dropped = len(lines) - len(keep)
    if dropped:
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
        with open(tmp, "wb") as f:
            f.writelines(keep)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    return dropped


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
    """Appends one JSON object per logged step to metrics.jsonl and writes the same scalars,
    the config as hparams and per-unit histograms to TensorBoard event files in the workdir
    (`tensorboard_log.EventWriter`: tags put the layer first)."""

    def __init__(self, workdir: Path, config_dict: dict | None = None, layer_names=()):
        from bn_research import tensorboard_log

        # unbuffered: each row is one write() call, so a reader tailing the file (or a crash)
        # never sees a row split at a buffer boundary (rows with many layers exceed 8 KiB)
        self._file = open(workdir / METRICS, "ab", buffering=0)  # noqa: SIM115
        self._tb = tensorboard_log.EventWriter(workdir, config_dict, layer_names)

    def write(self, step: int, scalars: dict) -> None:
        """One row of scalars {key: value}."""
        row = {"step": int(step)}
        row.update({k: float(v) for k, v in scalars.items()})
        self._file.write((json.dumps(_jsonable(row)) + "\n").encode())
        self._tb.write(step, scalars)

    def histograms(self, step: int, units: dict) -> None:
        """Per-unit arrays {(layer, stat): [U]} of one step, to TensorBoard only (the per-layer
        store holds them for `runs.load`)."""
        self._tb.histograms(step, units)

    def resume(self, step: int) -> None:
        """Mark a restart at `step` in the event log (earlier files' later steps are dropped)."""
        self._tb.resume(step)

    def sync(self) -> None:
        """Flush both logs to disk (before a checkpoint commits, so it never runs ahead)."""
        os.fsync(self._file.fileno())
        self._tb.flush()

    def close(self) -> None:
        self._file.close()
        self._tb.close()


def _summary_digest(obj: dict) -> str:
    import hashlib

    body = {k: v for k, v in obj.items() if k != "sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def write_summary(workdir: Path, summary: dict) -> None:
    """summary.json, with the SHA-256 of its content (`sha256`) so a damaged file is noticed."""
    obj = _jsonable(summary)
    obj["sha256"] = _summary_digest(obj)
    atomic_write_json(workdir / SUMMARY, obj)


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
