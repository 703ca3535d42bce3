"""Read run directories into pandas; compare runs in one table.

`load(workdir)` tolerates a run that is still being written, was cut off mid-write or
was damaged: lines of metrics.jsonl that do not parse (a truncated last line, garbled
bytes) are skipped, a missing or unreadable summary or config reads as empty.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pandas as pd

from bn_research import rundir


class RunError(ValueError):
    """Not a readable run directory; one line naming the problem."""


@dataclasses.dataclass
class Run:
    path: Path
    config: dict
    summary: dict
    metrics: pd.DataFrame  # one row per logged step, columns = slash-namespaced keys
    layer_stats: pd.DataFrame  # long: step, layer, stat, unit, value

    @property
    def name(self) -> str:
        return self.path.name


def _read_json(path: Path) -> dict:
    try:
        obj = json.loads(path.read_text())
    except (OSError, ValueError):  # missing, unreadable or cut off mid-write
        return {}
    return obj if isinstance(obj, dict) else {}


def read_metrics(path: Path) -> pd.DataFrame:
    """metrics.jsonl as a DataFrame indexed by nothing, sorted by step; lines that do not
    parse (a line cut off mid-write) are skipped; rows of one step are merged."""
    rows = []
    try:
        with open(path, "rb") as f:
            for line in f:
                try:
                    row = json.loads(line)  # bytes: a line that is not UTF-8 fails here and is skipped
                except ValueError:
                    continue
                if isinstance(row, dict) and isinstance(row.get("step"), int) and not isinstance(row["step"], bool):
                    rows.append(row)
    except (FileNotFoundError, IsADirectoryError, PermissionError):
        pass
    if not rows:
        return pd.DataFrame({"step": pd.Series(dtype="int64")})
    df = pd.DataFrame(rows)
    df = df.groupby("step", as_index=False).last() if df["step"].duplicated().any() else df
    return df.sort_values("step").reset_index(drop=True)


def read_layer_stats(workdir: Path) -> pd.DataFrame:
    """Per-unit arrays (long format). Empty until the probes write any."""
    from bn_research import probes

    reader = getattr(probes, "read_layer_stats", None)
    if reader is not None:
        return reader(workdir)
    return pd.DataFrame(columns=["step", "layer", "stat", "unit", "value"])


def load(workdir) -> Run:
    path = Path(workdir)
    if not path.is_dir():
        raise RunError(f"{path} is not a directory")
    if not (path / rundir.CONFIG).exists() and not (path / rundir.METRICS).exists():
        raise RunError(f"{path} is not a run directory (no {rundir.CONFIG} or {rundir.METRICS})")
    return Run(path=path, config=_read_json(path / rundir.CONFIG),
               summary=_read_json(path / rundir.SUMMARY),
               metrics=read_metrics(path / rundir.METRICS),
               layer_stats=read_layer_stats(path))


def _flat(d: dict, prefix="") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _final_row(run: Run) -> dict:
    row = {"run": run.name, "status": run.summary.get("status", "running?"),
           "step": run.summary.get("step", int(run.metrics["step"].max())
                                   if len(run.metrics) else 0)}
    final = run.summary.get("final") or {}
    if not final and len(run.metrics):
        final = {k: v for k, v in run.metrics.ffill().iloc[-1].items() if k != "step"}
    row.update({k: final[k] for k in sorted(final) if k.startswith(("train/", "eval/"))})
    row["steps_per_s"] = run.summary.get("steps_per_s")
    return row


def compare(workdirs) -> pd.DataFrame:
    """One row per configuration: final metrics; runs that differ only in `seed`
    aggregate to mean and std (columns `<metric>` and `<metric> std`, plus `seeds`)."""
    loaded = [load(w) for w in workdirs]
    groups: dict[str, list[Run]] = {}
    for run in loaded:
        key = json.dumps({k: v for k, v in _flat(run.config).items() if k != "seed"},
                         sort_keys=True, default=str)
        groups.setdefault(key, []).append(run)
    varying = _varying_keys([_flat(r.config) for r in loaded])
    rows = []
    for members in groups.values():
        finals = pd.DataFrame([_final_row(r) for r in members])
        flat = _flat(members[0].config)
        row = {k: flat.get(k) for k in varying if k != "seed"}
        row["runs"] = ", ".join(finals["run"])
        row["seeds"] = len(members)
        row["status"] = ", ".join(sorted(set(finals["status"])))
        for col in finals.columns:
            if col in ("run", "status"):
                continue
            values = pd.to_numeric(finals[col], errors="coerce")
            row[col] = values.mean()
            if len(members) > 1 and col.startswith(("train/", "eval/")):
                row[f"{col} std"] = values.std(ddof=1)
        rows.append(row)
    return pd.DataFrame(rows)


def _varying_keys(flats: list[dict]) -> list[str]:
    keys = sorted(set().union(*flats)) if flats else []
    return [k for k in keys if len({json.dumps(f.get(k), default=str) for f in flats}) > 1]
