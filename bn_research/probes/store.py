"""The per-layer store: per-unit arrays of the probes in `<workdir>/layer_stats/`.

One file per fetched chunk and probe that holds any cadence step, `chunk_<end step>_<probe>.npz`, written
to a hidden temporary name and renamed into place (atomic on POSIX), so a reader sees
either the whole chunk or nothing; a file that still fails to load (a copy cut short,
a disk filled up) is skipped. Re-writing a chunk (a resumed run) replaces it.

Contents of a chunk: `steps` [R], `layers` and `stats` [S] (strings), and `v<j>` [R, U_j]
for the j-th (layer, stat) pair.
"""

from __future__ import annotations

import os
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd

DIRNAME = "layer_stats"
COLUMNS = ["step", "layer", "stat", "unit", "value"]


def write_chunk(workdir, end_step: int, steps, arrays: dict, tag: str = "") -> Path:
    """Write {(layer, stat): [R, U]} for the rows `steps` as chunk `end_step` (of `tag`)."""
    d = Path(workdir) / DIRNAME
    d.mkdir(parents=True, exist_ok=True)
    pairs = sorted(arrays)
    payload = {"steps": np.asarray(steps, np.int64),
               "layers": np.array([p[0] for p in pairs]), "stats": np.array([p[1] for p in pairs])}
    for j, p in enumerate(pairs):
        payload[f"v{j}"] = np.asarray(arrays[p], np.float32)
    path = d / f"chunk_{int(end_step):010d}{'_' + tag if tag else ''}.npz"
    tmp = d / f".{path.name}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        np.savez(f, **payload)
    os.replace(tmp, path)
    return path


def truncate(workdir, step: int) -> int:
    """Remove the chunks that end after `step` (a resumed run writes them again);
    returns how many were removed."""
    d = Path(workdir) / DIRNAME
    removed = 0
    for path in d.glob("chunk_*.npz") if d.is_dir() else []:
        try:
            end = int(path.stem.split("_")[1])
        except (IndexError, ValueError):
            continue
        if end > step:
            path.unlink()
            removed += 1
    return removed


def _read_chunk(path: Path) -> pd.DataFrame | None:
    try:
        with np.load(path, allow_pickle=False) as z:
            steps = z["steps"]
            layers, stats = z["layers"].tolist(), z["stats"].tolist()
            parts = []
            for j, (layer, stat) in enumerate(zip(layers, stats, strict=True)):
                v = z[f"v{j}"]
                r, u = v.shape
                parts.append(pd.DataFrame({
                    "step": np.repeat(steps, u), "layer": layer, "stat": stat,
                    "unit": np.tile(np.arange(u), r), "value": v.reshape(-1)}))
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
        return None
    return pd.concat(parts, ignore_index=True) if parts else None


def read(workdir) -> pd.DataFrame:
    """All chunks as one long DataFrame (step, layer, stat, unit, value), sorted by step;
    unreadable chunks are skipped."""
    d = Path(workdir) / DIRNAME
    frames = [f for f in (_read_chunk(p) for p in sorted(d.glob("chunk_*.npz"))) if f is not None] \
        if d.is_dir() else []
    if not frames:
        return pd.DataFrame({"step": pd.Series(dtype="int64"), "layer": pd.Series(dtype=object),
                             "stat": pd.Series(dtype=object), "unit": pd.Series(dtype="int64"),
                             "value": pd.Series(dtype="float32")})
    df = pd.concat(frames, ignore_index=True)
    return df.sort_values(["step", "layer", "stat", "unit"], kind="stable").reset_index(drop=True)
