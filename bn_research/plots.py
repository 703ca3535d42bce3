"""Matplotlib figures shared by the CLI and the notebooks."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg", force=False)
import matplotlib.pyplot as plt  # noqa: E402

from bn_research import runs  # noqa: E402


def compare_figure(workdirs, metric: str = "eval/accuracy", ax=None):
    """`metric` against step for each run, one line per run."""
    if ax is None:
        fig, ax = plt.subplots(figsize=(6, 4))
    else:
        fig = ax.figure
    for w in workdirs:
        run = runs.load(w)
        if metric not in run.metrics:
            continue
        df = run.metrics[["step", metric]].dropna()
        ax.plot(df["step"], df[metric], marker="o", ms=3, label=run.name)
    ax.set_xlabel("step")
    ax.set_ylabel(metric)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return fig
