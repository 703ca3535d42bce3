"""Matplotlib figures of runs, shared by the CLI and the notebooks.

Every function takes runs (run directories, directories holding runs such as a sweep root,
or loaded `runs.Run`s), groups them by config (`runs.group`: the seeds of one config are
one group) and draws each group as the mean over its seeds with a band from the smallest
to the largest seed's value, coloured by variant (`model.norm`; groups sharing a variant differ in line
style). Axes are labelled, legends sit outside the axes, and each function returns a
pyplot figure: a notebook shows it inline; a script saves it (`fig.savefig`) and closes it
(`plt.close(fig)`). Importing this module leaves the matplotlib backend alone.
"""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib import ticker
from matplotlib.backend_bases import FigureCanvasBase

from bn_research import runs as runs_lib

VARIANT_COLORS = {"batch": "tab:blue", "none": "tab:orange", "weight": "tab:green", "noisy_batch": "tab:purple",
                  "noisy_none": "tab:red", "layer": "tab:brown", "group": "tab:pink"}
LINESTYLES = ("-", "--", ":", "-.")
PERCENTILES = ("act_in_p15", "act_in_p50", "act_in_p85")
BAND = "line: mean over seeds, band: min to max over seeds"


# ----------------------------------------------------------------------------- helpers


def _styles(groups) -> dict:
    """{group label: matplotlib style}: colour by variant, line style by group within a variant."""
    seen: dict[str, int] = {}
    out = {}
    spare = iter(plt.rcParams["axes.prop_cycle"].by_key()["color"][6:] + ["black", "gray"])
    extra: dict[str, str] = {}
    for g in groups:
        n = seen.get(g.norm, 0)
        seen[g.norm] = n + 1
        color = VARIANT_COLORS.get(g.norm) or extra.setdefault(g.norm, next(spare, "black"))
        out[g.label] = {"color": color, "linestyle": LINESTYLES[n % len(LINESTYLES)]}
    return out


def series(group, key: str) -> pd.DataFrame:
    """One metric of a group against step: columns step, mean, std (NaN with one seed), min, max, n."""
    return _over_seeds([r.metrics[["step", key]].dropna().set_index("step")[key]
                        for r in group.runs if key in r.metrics])


def _over_seeds(parts) -> pd.DataFrame:
    """Per-seed series (indexed by step) -> step, mean, std, min, max, n."""
    if not parts:
        return pd.DataFrame(columns=["step", "mean", "std", "min", "max", "n"])
    wide = pd.concat(parts, axis=1).astype("float64")
    return pd.DataFrame({"mean": wide.mean(axis=1), "std": wide.std(axis=1, ddof=1), "min": wide.min(axis=1),
                         "max": wide.max(axis=1), "n": wide.notna().sum(axis=1)}).rename_axis("step").reset_index()


def _draw(ax, s: pd.DataFrame, style: dict, label=None, band: bool = True):
    if s.empty:
        return
    few = len(s) <= 5  # a short run: markers, so a single point is still visible
    ax.plot(s["step"], s["mean"], label=label, marker="o" if few else None, ms=3, lw=1.5, **style)
    if band and (s["n"] > 1).any():
        ax.fill_between(s["step"], s["min"], s["max"], color=style["color"], alpha=0.2, lw=0)


def _axes(nrows: int, ncols: int, w: float = 3.2, h: float = 2.4, **kw):
    fig, axes = plt.subplots(nrows, ncols, figsize=(w * ncols + 1.8, h * nrows + 0.6), squeeze=False,
                             layout="constrained", **kw)
    for ax in axes.flat:
        ax.grid(alpha=0.3)
    return fig, axes


def _legend(fig, groups, styles, title=BAND):
    handles = [plt.Line2D([], [], lw=2, **styles[g.label]) for g in groups]
    labels = [f"{g.label} ({_seeds(g)})" for g in groups]
    fig.legend(handles, labels, loc="outside lower center", ncol=min(len(labels), 4), fontsize=8, title=title,
               title_fontsize=8, frameon=False)


def _seeds(group) -> str:
    n = len(group.seeds)
    return f"{n} seed{'s' if n != 1 else ''}"


def _keys(groups) -> list[str]:
    return sorted({k for g in groups for r in g.runs for k in r.keys()})


def _expand(patterns, keys) -> list[str]:
    """Keys matching each pattern in order; RunError with close matches for a pattern matching none."""
    out = []
    for p in [patterns] if isinstance(patterns, str) else patterns:
        hit = runs_lib.match(keys, p)
        if not hit:
            raise runs_lib.RunError(runs_lib.no_match_message(p, keys))
        out += hit
    return list(dict.fromkeys(out))


def _layers(keys, namespace: str) -> list[str]:
    layers = {k.split("/")[1] for k in keys if k.startswith(namespace + "/") and k.count("/") >= 2}
    return sorted(layers, key=lambda n: (runs_lib.layer_index(n), n))


def _log_if_positive(ax, values, ratio: float = 20):
    """A log y axis when the values are positive and span more than `ratio`."""
    v = np.asarray([x for x in values if np.isfinite(x)])
    if len(v) and (v > 0).all() and v.max() / v.min() > ratio:
        _logy(ax)


def _logy(ax):
    """A log y axis labelled in plain numbers: at 1, 2, 5 x 10^k when it spans less than
    about a decade and a half, else at 10^k only (more labels would collide)."""
    ax.set_yscale("log")
    lo, hi = ax.get_ylim()  # of all the axes sharing y
    narrow = lo > 0 and hi / lo < 30
    plain = ticker.FuncFormatter(lambda v, _: f"{v:g}")
    ax.yaxis.set_major_formatter(plain)
    ax.yaxis.set_minor_locator(ticker.LogLocator(subs=(2.0, 5.0) if narrow else "auto"))
    ax.yaxis.set_minor_formatter(plain if narrow else ticker.NullFormatter())


# ----------------------------------------------------------------------------- figures


def metric_panels(runs, metrics, log=None, title=None):
    """One panel per metric matching `metrics` (fnmatch patterns), against step. `log`: keys
    (patterns) with a log y axis; default: positive losses spanning > 5x, other positive metrics > 20x."""
    groups = runs_lib.group(runs)
    keys = _expand(metrics, _keys(groups))
    styles = _styles(groups)
    ncols = min(len(keys), 4)
    fig, axes = _axes(-(-len(keys) // ncols), ncols)
    for ax, key in zip(axes.flat, keys, strict=False):
        values = []
        for g in groups:
            s = series(g, key)
            _draw(ax, s, styles[g.label])
            values += list(s["mean"])
        ax.set(xlabel="step", ylabel=key)
        if log is not None:
            _logy(ax) if runs_lib.match([key], log) else None
        else:
            _log_if_positive(ax, values, ratio=5 if "loss" in key else 20)
    for ax in list(axes.flat)[len(keys):]:
        ax.set_visible(False)
    if title:
        fig.suptitle(title)
    _legend(fig, groups, styles)
    return fig


LEARNING_CURVES = ("train/loss", "eval/loss", "eval/accuracy")


def learning_curves(runs, metrics=None):
    """Metrics against step, one panel per key matching `metrics` (fnmatch patterns); by
    default those of training loss, test loss and test accuracy the runs have."""
    loaded = runs_lib.load_all(runs)
    if metrics is None:
        keys = sorted({k for r in loaded for k in r.keys()})
        metrics = [m for m in LEARNING_CURVES if m in keys] or list(LEARNING_CURVES)  # a regression: no accuracy
    return metric_panels(loaded, metrics, title="learning curves")


def layer_grid(runs, namespace: str, stats, split: str | None = None, layers=None, title=None, log=False):
    """A grid of hidden layers (rows) x statistics (columns) over training, for keys
    `<namespace>/<layer>[/<split>]/<stat>`; `layers` (names or fnmatch patterns) picks rows."""
    groups = runs_lib.group(runs)
    keys = _keys(groups)
    rows = _layers(keys, namespace)
    if layers is not None:
        rows = [n for n in rows if runs_lib.match([n], layers)]
    stats = [stats] if isinstance(stats, str) else list(stats)

    def key(layer, stat):
        return "/".join(p for p in (namespace, layer, split, stat) if p)

    if not rows or not any(key(n, s) in keys for n in rows for s in stats):
        want = key("*", stats[0])
        raise runs_lib.RunError(runs_lib.no_match_message(want, keys))
    styles = _styles(groups)
    fig, axes = _axes(len(rows), len(stats), sharex=True)
    for i, layer in enumerate(rows):
        for j, stat in enumerate(stats):
            ax = axes[i, j]
            for g in groups:
                _draw(ax, series(g, key(layer, stat)), styles[g.label])
            if log:
                _logy(ax)
            ax.set_ylabel(f"{layer}\n{stat}" if j == 0 else stat, fontsize=8)
            if i == 0:
                ax.set_title(stat, fontsize=9)
            if i == len(rows) - 1:
                ax.set_xlabel("step")
    fig.suptitle(title or f"{namespace}/<layer>{'/' + split if split else ''}/<stat>")
    _legend(fig, groups, styles)
    return fig


def drift(runs, stats=("act_in_mean", "act_in_var"), split: str = "probe", measure: str = "drift_init",
          layers=None):
    """Per-layer distribution drift over training (Ioffe & Szegedy's internal covariate shift):
    layers x `stats`, each as `measure`: 'value' (the mean over units), 'drift' (RMS change per
    unit since the previous probe step) or 'drift_init' (since initialization); `split` is
    'probe' (a fixed batch: parameter-driven drift only) or 'train' (the step's batch)."""
    suffix = {"value": "", "drift": "_drift", "drift_init": "_drift_init"}
    if measure not in suffix:
        raise ValueError(f"unknown measure '{measure}'; choose one of: {', '.join(suffix)}")
    names = {"value": "mean over units", "drift": "RMS change per unit since the previous probe",
             "drift_init": "RMS change per unit since initialization"}
    return layer_grid(runs, "dist", [s + suffix[measure] for s in stats], split=split, layers=layers,
                      title=f"distribution drift on the {split} batch: {names[measure]}")


def percentiles(runs, layer: str | None = None, split: str = "probe", unit: int | None = None):
    """Ioffe & Szegedy (2015) Fig. 1(b, c): the 15th, 50th and 85th percentiles of a layer's
    nonlinearity input over training, one panel per config. `layer` defaults to the last
    hidden layer; `unit=None` averages each percentile over units, an integer shows that unit
    (from the per-unit `layer_stats`)."""
    groups = runs_lib.group(runs)
    keys = _keys(groups)
    layer = layer or (_layers(keys, "dist") or [None])[-1]
    if layer is None or f"dist/{layer}/{split}/act_in_p50" not in keys:
        raise runs_lib.RunError(runs_lib.no_match_message(f"dist/{layer}/{split}/act_in_p50", keys))
    styles = _styles(groups)
    fig, axes = _axes(1, len(groups), sharey=True)
    for ax, g in zip(axes[0], groups, strict=True):
        lines = {p: _percentile_series(g, f"dist/{layer}/{split}/{p}", unit) for p in PERCENTILES}
        color = styles[g.label]["color"]
        for p, ls in zip(PERCENTILES, (":", "-", "--"), strict=True):
            _draw(ax, lines[p], {"color": color, "linestyle": ls}, label=p.rsplit("_", 1)[-1] + "th")
        lo, hi = lines[PERCENTILES[0]], lines[PERCENTILES[2]]
        if not lo.empty and len(lo) == len(hi):
            ax.fill_between(lo["step"], lo["mean"], hi["mean"], color=color, alpha=0.08, lw=0)
        ax.set(title=f"{g.label} ({_seeds(g)})", xlabel="step")
        ax.title.set_fontsize(9)
    axes[0, 0].set_ylabel(f"{layer} nonlinearity input" + (f", unit {unit}" if unit is not None else ""))
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncol=3, fontsize=8, frameon=False, title_fontsize=8,
               title=f"percentile ({'mean over units' if unit is None else f'unit {unit}'}); band: seeds' range")
    fig.suptitle(f"{layer}: 15/50/85th percentiles of the nonlinearity input ({split} batch)")
    return fig


def _percentile_series(group, key: str, unit):
    if unit is None:
        return series(group, key)
    parts = []
    for r in group.runs:
        ls = r.layer_stats
        one = ls[(ls["key"] == key) & (ls["unit"] == unit)]
        parts.append(one.set_index("step")["value"])
    return _over_seeds([p for p in parts if len(p)])


def grad_norm_by_layer(runs, steps=("first", "last"), stat: str = "norm"):
    """Yang et al. (2019): the gradient norm ‖dL/dW_l‖ against layer index l, one panel per
    step ('first' = at initialization, 'last', or a step number: the nearest logged step),
    log y; with batch norm it grows towards the input."""
    groups = runs_lib.group(runs)
    keys = _keys(groups)
    layers = _layers(keys, "grad")
    if not layers:
        raise runs_lib.RunError(runs_lib.no_match_message(f"grad/*/{stat}", keys))
    styles = _styles(groups)
    fig, axes = _axes(1, len(steps), sharey=True)
    x = [runs_lib.layer_index(n) for n in layers]
    for ax, when in zip(axes[0], steps, strict=True):
        shown = set()
        for g in groups:
            per_layer = [series(g, f"grad/{n}/{stat}") for n in layers]
            rows = [_at(s, when) for s in per_layer]
            mean, lo, hi = (np.array([r[i] for r in rows]) for i in range(3))
            shown |= {r[3] for r in rows if r[3] is not None}
            ax.plot(x, mean, marker="o", ms=4, **styles[g.label])
            if len(g.runs) > 1:
                ax.fill_between(x, lo, hi, color=styles[g.label]["color"], alpha=0.2, lw=0)
        _logy(ax)
        ax.set_xticks(x)
        ax.set(xlabel="layer index l", title=_when(when, shown))
        ax.title.set_fontsize(9)
    axes[0, 0].set_ylabel(f"‖dL/dW_l‖  (grad/<layer>/{stat})")
    fig.suptitle("gradient norm by layer")
    _legend(fig, groups, styles)
    return fig


def _at(s: pd.DataFrame, when):
    """(mean, min, max, step) of a series at 'first', 'last' or the logged step nearest `when`."""
    if s.empty:
        return np.nan, np.nan, np.nan, None
    i = 0 if when == "first" else len(s) - 1 if when == "last" else int((s["step"] - int(when)).abs().idxmin())
    row = s.iloc[i] if when in ("first", "last") else s.loc[i]
    return float(row["mean"]), float(row["min"]), float(row["max"]), int(row["step"])


def _when(when, shown) -> str:
    steps = ", ".join(str(s) for s in sorted(shown))
    if when == "first":
        return f"at initialization (step {steps})"
    return f"at step {steps}"


def landscape(runs, stats=("loss_range", "grad_diff_max", "beta")):
    """Santurkar et al. (2018) Fig. 4: loss variation and gradient change along the gradient
    direction, and the effective β-smoothness, over training (`probes.landscape`)."""
    return metric_panels(runs, [f"landscape/{s}" for s in stats], title="loss landscape along -∇L")


def grad_ics(runs, stats=("grad_diff_rel", "grad_cos"), layers=None, skip_first: bool = True):
    """Santurkar et al. (2018) Def. 2.1: gradient-based ICS per layer over training,
    ‖G − G′‖/‖G‖ and cos(G, G′) (`probes.ics`); `layers` (names or patterns) picks rows;
    the first layer has no earlier layers (G′ = G) and is left out unless `skip_first=False`."""
    loaded = runs_lib.load_all(runs)
    found = _layers({k for r in loaded for k in r.keys()}, "ics")
    chosen = found[1:] if skip_first and len(found) > 1 else found
    chosen = [n for n in chosen if layers is None or runs_lib.match([n], layers)]
    return layer_grid(loaded, "ics", stats, layers=chosen,
                      title="gradient ICS: G at step t vs G′ after the earlier layers' update")


def weights(runs, stats=("w_norm", "eff_lr"), layers=None):
    """Kohler et al. (2019); Salimans & Kingma (2016): weight norm ‖w‖ and effective step
    size η/‖w‖² per layer over training (`probes.weights`; eff_lr exists only for
    scale-invariant layers); `layers` (names or patterns) picks rows."""
    return layer_grid(runs, "weights", stats, layers=layers, title="weight norm and effective step size")


def save(fig, path, dpi: int = 110) -> None:
    """Write `fig` to `path` (format from the extension) and close it."""
    fig.savefig(path, dpi=dpi, bbox_inches="tight")
    plt.close(fig)


def check_path(path) -> str | None:
    """One line saying why a figure cannot be written to `path`, or None."""
    from pathlib import Path

    path = Path(path)
    ext = path.suffix.lstrip(".").lower()
    formats = FigureCanvasBase.get_supported_filetypes()
    if ext not in formats:
        return f"cannot write a figure to {path}: unknown extension '{path.suffix}'; use one of: " \
            + ", ".join(sorted(formats))
    if not path.parent.is_dir():
        return f"cannot write a figure to {path}: directory {path.parent} does not exist"
    return None


def claims_forest(claims):
    """A forest plot of experiment claims (the `claims.json` schema): each claim's measured
    mean with its 95% CI over seeds, green when it holds and red when it does not, and the
    criterion's bounds as dashed lines; one row per claim, each on its own x scale (the
    metrics differ)."""
    claims = list(claims)
    fig, axes = plt.subplots(len(claims), 1, figsize=(8, 0.62 * len(claims) + 0.9), squeeze=False,
                             layout="constrained")
    for ax, c in zip(axes[:, 0], claims, strict=True):
        m = c["measured"]
        mean, (lo, hi) = float(m["mean"]), (float(x) for x in m["ci95"])
        color = "tab:green" if c.get("holds") else "tab:red"
        finite = np.isfinite(lo) and np.isfinite(hi)
        err = [[mean - lo], [hi - mean]] if finite else None
        ax.errorbar([mean], [0], xerr=err, fmt="o", color=color, capsize=3, ms=5)
        bounds = criterion_bounds(c)
        for b in bounds:
            ax.axvline(b, color="0.4", ls="--", lw=1)
        xs = np.array([mean, *bounds, *((lo, hi) if finite else ())])
        pad = 0.1 * (np.ptp(xs) or abs(mean) or 1.0)
        ax.set_xlim(xs.min() - pad, xs.max() + pad)
        ax.set_yticks([])
        ax.tick_params(axis="x", labelsize=7)
        ax.set_ylabel(c["id"], rotation=0, ha="right", va="center", fontsize=8)
        verdict = "holds" if c.get("holds") else "does not hold"
        ax.set_title(f"{c['criterion']}: {verdict} (n={m['n']})" + ("" if finite else "; no CI with n=1"),
                     fontsize=8, loc="right", color=color)
    axes[-1, 0].set_xlabel("measured: mean and 95% CI over seeds (each row in its claim's own units); "
                           "dashed: the criterion's bound")
    return fig


def criterion_bounds(claim) -> list[float]:
    """The numbers a claim's criterion compares the CI with (bounds, or the expected value)."""
    import re

    text = claim.get("criterion", "")
    out = [float(x) for x in re.findall(r"bound [<>]=? ([-+0-9.eE]+)", text)]
    for lo, hi in re.findall(r"inside \[([-+0-9.eE]+), ([-+0-9.eE]+)\]", text):
        out += [float(lo), float(hi)]
    expected = claim.get("expected")
    if "expected" in text and isinstance(expected, (int, float)) and not isinstance(expected, bool):
        out.append(float(expected))
        for rel in re.findall(r"expected - 1\| <=? ([-+0-9.eE]+)", text):  # a relative tolerance around it
            out += [expected * (1 - float(rel)), expected * (1 + float(rel))]
    return out
