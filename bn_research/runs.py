"""Read run directories into pandas: find, load, select, group and compare runs.

`load(workdir)` tolerates a run that is still being written, was cut off mid-write or
was damaged: lines of metrics.jsonl that do not parse (a truncated last line, garbled
bytes) are skipped, a missing or unreadable summary or config reads as empty.

Tidy form. Every statistic is named by its metrics.jsonl key, `<ns>/<layer>/<split>/<stat>`
(`dist/dense_0/probe/act_in_mean`), `<ns>/<layer>/<stat>` (`ics/dense_1/grad_cos`,
`weights/dense_0/w_norm`), `<ns>/<stat>` (`landscape/beta`) or `train|eval/<stat>`
(`eval/accuracy`). `Run.select(pattern)` (scalars per logged step) and `Run.layer_stats`
(per unit) give long frames with the columns `key, layer, split, stat, step, value`
(`layer_stats` adds `unit`); parts a key does not have are empty strings.
"""

from __future__ import annotations

import dataclasses
import difflib
import fnmatch
import functools
import json
import re
from pathlib import Path

import numpy as np
import pandas as pd

from bn_research import rundir

TIDY = ["key", "layer", "split", "stat", "step", "value"]
UNIT_TIDY = ["key", "layer", "split", "stat", "step", "unit", "value"]
DEFAULT_COLUMNS = ("train/loss", "eval/loss", "eval/accuracy")
MAX_LABEL = 40  # a longer label of varying config keys gives way to the run directory's name


class RunError(ValueError):
    """Not a readable run directory (or nothing matches); one line naming the problem."""


def parse_key(key: str) -> tuple[str, str, str]:
    """(layer, split, stat) of a metric key; parts it does not have are ''.

    'dist/dense_0/probe/act_in_mean' -> ('dense_0', 'probe', 'act_in_mean');
    'ics/dense_1/grad_cos' -> ('dense_1', '', 'grad_cos'); 'eval/accuracy' -> ('', 'eval', 'accuracy');
    'landscape/beta' -> ('', '', 'beta').
    """
    parts = key.split("/")
    if parts[0] in ("train", "eval"):
        return "", parts[0], "/".join(parts[1:])
    if len(parts) <= 2:
        return "", "", parts[-1]
    if len(parts) == 3:
        return parts[1], "", parts[2]
    return parts[1], parts[2], "/".join(parts[3:])


def layer_index(layer: str) -> int:
    """The trailing number of a layer name (`dense_3` -> 3); -1 if it has none."""
    m = re.search(r"(\d+)$", layer)
    return int(m.group(1)) if m else -1


def match(keys, patterns) -> list[str]:
    """The keys matching any of the fnmatch-style `patterns` (a string or a list), in key order."""
    patterns = [patterns] if isinstance(patterns, str) else list(patterns)
    return [k for k in keys if any(fnmatch.fnmatchcase(k, p) for p in patterns)]


def close_matches(pattern: str, keys, n: int = 3) -> list[str]:
    """Up to `n` keys resembling `pattern`: those containing it, then difflib's closest (for a
    pattern with wildcards, the keys generalized to the pattern's wildcard parts)."""
    keys = list(keys)
    if any(c in pattern for c in "*?["):  # compare with the keys generalized where the pattern is
        keys = list(dict.fromkeys(_generalize(k, pattern) for k in keys))
    bare = pattern.strip("*")
    hits = [k for k in keys if bare and bare in k] if not any(c in bare for c in "*?[") else []
    hits += difflib.get_close_matches(pattern, keys, n=n, cutoff=0.5)
    tail = pattern.rsplit("/", 1)[-1]  # a misspelt last part: compare last parts only
    tails = difflib.get_close_matches(tail, sorted({k.rsplit("/", 1)[-1] for k in keys}), n=2, cutoff=0.6)
    hits += [k for k in keys if k.rsplit("/", 1)[-1] in tails]
    return list(dict.fromkeys(hits))[:n]


def _generalize(key: str, pattern: str) -> str:
    """`key` with the '/'-parts where `pattern` has a wildcard replaced by the pattern's part:
    ('dist/dense_2/probe/x', 'dist/*/probe/y') -> 'dist/*/probe/x'."""
    kp, pp = key.split("/"), pattern.split("/")
    if len(kp) != len(pp):
        return key
    return "/".join(p if any(c in p for c in "*?[") else k for k, p in zip(kp, pp, strict=True))


def no_match_message(pattern: str, keys, what: str = "metric") -> str:
    """One line: nothing matches `pattern`, and the closest keys (or a few of them)."""
    keys = list(keys)
    close = close_matches(pattern, keys)
    if close:
        hint = f"; close matches: {', '.join(close)}"
    else:
        hint = f"; {len(keys)} {what}s, e.g. {', '.join(keys[:3])}" if keys else f"; no {what}s recorded"
    return f"no {what} matches '{pattern}'{hint}"


def _read_json(path: Path) -> dict:
    try:
        obj = json.loads(path.read_text())
    except (OSError, ValueError):  # missing, unreadable or cut off mid-write
        return {}
    return obj if isinstance(obj, dict) else {}


def _flat(d: dict, prefix="") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


@dataclasses.dataclass
class Run:
    """One run directory: its config and summary (dicts), its metrics (one row per logged
    step, columns = metric keys) and, read on first use, its per-unit `layer_stats`."""

    path: Path
    config: dict
    summary: dict
    metrics: pd.DataFrame

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def flat_config(self) -> dict:
        """The config as {dotted key: value}."""
        return _flat(self.config)

    @property
    def seed(self):
        return self.config.get("seed")

    @property
    def norm(self) -> str:
        return str((self.config.get("model") or {}).get("norm", "?"))

    @functools.cached_property
    def layer_stats(self) -> pd.DataFrame:
        """Per-unit statistics, long: key, layer, split, stat, step, unit, value."""
        return read_layer_stats(self.path)

    def keys(self, patterns="*") -> list[str]:
        """Metric keys (columns of `.metrics` other than `step`) matching `patterns`."""
        return match([c for c in self.metrics.columns if c != "step"], patterns)

    def select(self, patterns, units: bool = False) -> pd.DataFrame:
        """The statistics whose key matches `patterns` (fnmatch-style, a string or a list),
        long: key, layer, split, stat, step, value; with `units`, the per-unit values of
        `layer_stats` instead (adds `unit`). Raises RunError naming close matches when
        nothing matches."""
        if units:
            ls = self.layer_stats
            keys = sorted(ls["key"].unique())
            hit = match(keys, patterns)
            if not hit:
                raise RunError(f"{self.name}: " + no_match_message(_first(patterns), keys, "per-unit statistic"))
            return ls[ls["key"].isin(hit)].reset_index(drop=True)
        hit = self.keys(patterns)
        if not hit:
            raise RunError(f"{self.name}: " + no_match_message(_first(patterns), self.keys()))
        return tidy(self.metrics, hit)


def _first(patterns) -> str:
    """The pattern to name when none of `patterns` matches."""
    return patterns if isinstance(patterns, str) else str(next(iter(patterns), ""))


def tidy(metrics: pd.DataFrame, keys) -> pd.DataFrame:
    """Columns `keys` of a metrics frame in long form (rows with no value dropped)."""
    long = metrics[["step", *keys]].melt(id_vars="step", var_name="key", value_name="value").dropna(subset=["value"])
    parts = pd.DataFrame([parse_key(k) for k in keys], columns=["layer", "split", "stat"]).assign(key=list(keys))
    out = long.merge(parts, on="key", how="left")
    out["step"] = out["step"].astype("int64")
    out["value"] = out["value"].astype("float64")
    return out[TIDY].reset_index(drop=True)


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


def read_layer_stats(workdir) -> pd.DataFrame:
    """Per-unit arrays of a run, long: key, layer, split, stat (categoricals), step, unit,
    value, with the keys of metrics.jsonl (the store's layer `dense_0` + stat
    `dist/train/act_in_mean` is `dist/dense_0/train/act_in_mean`). Empty until the probes
    write any."""
    from bn_research.probes import store

    raw = store.read(workdir)
    if raw.empty:
        return pd.DataFrame({c: pd.Series(dtype=t) for c, t in zip(
            UNIT_TIDY, ["object"] * 4 + ["int64", "int64", "float32"], strict=True)})
    layer, stat = raw["layer"].astype("category"), raw["stat"].astype("category")
    n = len(stat.cat.categories)
    pairs, row = np.unique(layer.cat.codes.to_numpy(np.int64) * n + stat.cat.codes.to_numpy(np.int64),
                           return_inverse=True)  # translate each (layer, stat) pair once, then index
    keys = [_metric_key(layer.cat.categories[p // n], stat.cat.categories[p % n]) for p in pairs]
    parts = list(zip(*[parse_key(k) for k in keys], strict=True))
    columns = {name: _categorical(values, row) for name, values in zip(
        ("key", "layer", "split", "stat"), (keys, *parts), strict=True)}
    columns.update(step=raw["step"].to_numpy(), unit=raw["unit"].to_numpy(), value=raw["value"].to_numpy())
    return pd.DataFrame(columns)[UNIT_TIDY]


def _categorical(per_pair, row) -> pd.Categorical:
    """A column with value per_pair[row[i]] in row i, as a categorical (fast and small)."""
    categories, codes = np.unique(np.asarray(per_pair, dtype=str), return_inverse=True)
    return pd.Categorical.from_codes(codes[row], categories=categories)


def _metric_key(layer: str, stat: str) -> str:
    """The store's (layer, '<ns>/<rest>') as the metric key '<ns>/<layer>/<rest>'."""
    ns, _, rest = stat.partition("/")
    return f"{ns}/{layer}/{rest}" if rest else f"{ns}/{layer}"


def is_run_dir(path: Path) -> bool:
    return any((path / f).is_file() for f in (rundir.SUMMARY, rundir.CONFIG, rundir.METRICS))


def find(paths) -> list[Path]:
    """Run directories among `paths`: each is a run directory (holds summary.json or
    config.json) or is searched, at any depth, for run directories (a sweep root, `runs/`).
    Sorted within each path, duplicates removed; RunError when a path does not exist or
    holds no run."""
    found: dict[Path, Path] = {}  # resolved -> as given
    for p in [paths] if isinstance(paths, (str, Path)) else paths:
        path = Path(p)
        if not path.exists():
            raise RunError(f"{path} does not exist")
        if not path.is_dir():
            raise RunError(f"{path} is not a directory")
        hits = [path] if is_run_dir(path) else _search(path)
        if not hits:
            raise RunError(f"no runs under {path} (no directory holds {rundir.SUMMARY} or {rundir.CONFIG})")
        for h in hits:
            found.setdefault(h.resolve(), h)
    return list(found.values())


def _search(root: Path) -> list[Path]:
    out = []
    for child in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        if child.name in rundir.RUN_FILES:
            continue
        out += [child] if is_run_dir(child) else _search(child)
    return out


def load(workdir) -> Run:
    """The run in `workdir` (a Run passes through)."""
    if isinstance(workdir, Run):
        return workdir
    path = Path(workdir)
    if not path.is_dir():
        raise RunError(f"{path} is not a directory")
    if not (path / rundir.CONFIG).exists() and not (path / rundir.METRICS).exists():
        raise RunError(f"{path} is not a run directory (no {rundir.CONFIG} or {rundir.METRICS})")
    return Run(path=path, config=_read_json(path / rundir.CONFIG),
               summary=_read_json(path / rundir.SUMMARY),
               metrics=read_metrics(path / rundir.METRICS))


def load_all(items) -> list[Run]:
    """Runs from loaded runs, run directories or directories holding runs (see `find`)."""
    items = [items] if isinstance(items, (str, Path, Run)) else list(items)
    out, seen = [], set()
    for item in items:
        for x in [item] if isinstance(item, Run) else find([item]):
            where = (x.path if isinstance(x, Run) else x).resolve()
            if where not in seen:  # one directory given twice (or inside a given parent) is one run
                seen.add(where)
                out.append(load(x))
    return out


@dataclasses.dataclass
class Group:
    """Runs of one configuration that differ only in `seed`."""

    label: str  # the config keys that vary between groups, short: `norm=batch`
    config: dict  # flat config of the first run
    runs: list

    @property
    def norm(self) -> str:
        return str(self.config.get("model.norm", "?"))

    @property
    def seeds(self) -> list:
        return sorted({r.seed for r in self.runs}, key=str)


def group(runs) -> list[Group]:
    """Runs grouped by config without `seed`, in order of first appearance, each labelled by
    the config keys that vary between the runs (their last part when that is unambiguous)."""
    runs = load_all(runs)
    flats = [r.flat_config for r in runs]
    varying = [k for k in _varying_keys(flats) if k != "seed"]
    groups: dict[str, Group] = {}
    for run, flat in zip(runs, flats, strict=True):
        key = json.dumps({k: v for k, v in flat.items() if k != "seed"}, sort_keys=True, default=str)
        if key not in groups:
            label = _label(flat, varying)
            groups[key] = Group(label=label if 0 < len(label) <= MAX_LABEL else run.name, config=flat, runs=[])
        groups[key].runs.append(run)
    out = list(groups.values())
    labels = [g.label for g in out]
    for i, g in enumerate(out):  # two configs with one label (a damaged config, equal dir names)
        if labels.count(g.label) > 1:
            g.label = f"{g.label}#{labels[:i].count(g.label) + 1}"
    return out


def _label(flat: dict, varying: list[str]) -> str:
    tails = [k.rsplit(".", 1)[-1] for k in varying]
    names = [t if tails.count(t) == 1 else k for k, t in zip(varying, tails, strict=True)]
    return ",".join(f"{n}={_short(flat.get(k))}" for n, k in zip(names, varying, strict=True))


def _short(v) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v)


def _varying_keys(flats: list[dict]) -> list[str]:
    keys = sorted(set().union(*flats)) if flats else []
    return [k for k in keys if len({json.dumps(f.get(k), default=str) for f in flats}) > 1]


def final_metrics(run: Run) -> dict:
    """The run's last value of every metric: summary `final`, else the last logged values."""
    final = run.summary.get("final") or {}
    if not final and len(run.metrics):
        final = {k: v for k, v in run.metrics.ffill().iloc[-1].items() if k != "step"}
    return final


def compare(workdirs, columns=DEFAULT_COLUMNS) -> pd.DataFrame:
    """One row per configuration (see `group`): `run` (its label), the config keys that vary,
    `seeds` (distinct seeds), `runs`, `status`, `step`, the final value of every metric
    matching `columns` (fnmatch patterns) as the mean over the group's runs, `<metric> std`
    (with two or more runs) and `steps_per_s`. RunError when a pattern matches no metric."""
    groups = group(workdirs)
    finals = {id(r): final_metrics(r) for g in groups for r in g.runs}
    keys = sorted(set().union(*finals.values())) if finals else []
    patterns = [columns] if isinstance(columns, str) else list(columns)
    for p in patterns:
        if not match(keys, p) and p not in DEFAULT_COLUMNS:
            raise RunError(no_match_message(p, keys))
    chosen = [k for p in patterns for k in match(keys, p)]
    chosen = list(dict.fromkeys(chosen))
    varying = [k for k in _varying_keys([g.config for g in groups]) if k != "seed"]
    rows = []
    for g in groups:
        row = {"run": g.label, **{k: g.config.get(k) for k in varying}, "seeds": len(g.seeds), "runs": len(g.runs),
               "status": "/".join(sorted({r.summary.get("status", "running?") for r in g.runs})),
               "step": max(int(r.summary.get("step") or (r.metrics["step"].max() if len(r.metrics) else 0))
                           for r in g.runs)}
        for k in chosen:
            values = pd.to_numeric(pd.Series([finals[id(r)].get(k) for r in g.runs]), errors="coerce")
            row[k] = values.mean()
            if len(g.runs) > 1:
                row[f"{k} std"] = values.std(ddof=1)
        row["steps_per_s"] = pd.to_numeric(pd.Series([r.summary.get("steps_per_s") for r in g.runs]),
                                           errors="coerce").mean()
        rows.append(row)
    return pd.DataFrame(rows)


def format_table(table: pd.DataFrame, width: int = 120) -> str:
    """A compare table as text: `mean ± std` cells at 4 significant digits (std at 2),
    integer steps, and columns wrapped into blocks (each repeating `run`) of at most `width`."""
    metrics = [c for c in table.columns if "/" in c and not c.endswith(" std")]  # config keys have no '/'
    cells = {"run": table["run"].astype(str).tolist(), "seeds": [str(int(v)) for v in table["seeds"]]}
    if (table["runs"] != table["seeds"]).any():
        cells["runs"] = [str(int(v)) for v in table["runs"]]
    cells["status"] = table["status"].astype(str).tolist()
    cells["step"] = [str(int(v)) for v in table["step"]]
    for c in metrics:
        std = table.get(f"{c} std")
        cells[c] = [_cell(m, None if std is None else std.iloc[i]) for i, m in enumerate(table[c])]
    cells["steps/s"] = [_cell(v, None, digits=3) for v in table["steps_per_s"]]
    return _blocks(cells, width)


def _cell(mean, std, digits: int = 4) -> str:
    if mean is None or not np.isfinite(mean):
        return "-"
    text = f"{mean:.{digits}g}"
    if std is not None and np.isfinite(std):
        text += f" ± {std:.2g}"
    return text


def _blocks(cells: dict, width: int) -> str:
    widths = {c: max(len(c), *(len(v) for v in vs)) for c, vs in cells.items()}
    names = list(cells)
    blocks, current = [], [names[0]]
    for c in names[1:]:
        if sum(widths[x] + 2 for x in current) + widths[c] > width and len(current) > 1:
            blocks.append(current)
            current = [names[0]]
        current.append(c)
    blocks.append(current)
    out = []
    for cols in blocks:
        lines = ["  ".join(c.ljust(widths[c]) if c == "run" else c.rjust(widths[c]) for c in cols).rstrip()]
        for i in range(len(cells["run"])):
            lines.append("  ".join(cells[c][i].ljust(widths[c]) if c == "run" else cells[c][i].rjust(widths[c])
                                   for c in cols).rstrip())
        out.append("\n".join(lines))
    return "\n\n".join(out)
