"""Shared helpers of the experiment scripts: run (or reuse) a config, write the report.

Each script reproduces one published claim with one command, writes its runs under
`runs/experiments/<name>/`, and its figure and markdown table under
`experiments/results/<name>.{png,md}`. Rerunning reuses finished runs.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

from bn_research import config_lib, runs, train  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "experiments" / "results"


def parse_args(name: str, doc: str) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=doc.splitlines()[0])
    p.add_argument("--workdir", default=str(ROOT / "runs" / "experiments" / name),
                   help="where the runs go (default runs/experiments/%(default)s)")
    p.add_argument("--quick", action="store_true", help="a short version for smoke tests")
    p.add_argument("--results", default=str(RESULTS), help="where the figure and table go")
    return p.parse_args()


def config(file: str, arg: str = "", **overrides):
    """A config file's config with dotted-key overrides (`train__num_steps=10` style keys
    are not used: pass {'train.num_steps': 10} through `**{...}`)."""
    c = config_lib.from_file(ROOT / "configs" / file, arg or None)
    c.update_from_flattened_dict(overrides)  # existing keys only: a typo raises
    return c


def run(c, workdir: Path) -> runs.Run:
    """Train `c` into `workdir` unless a finished run of the same config is there."""
    workdir = Path(workdir)
    summary_path = workdir / "summary.json"
    if summary_path.exists():
        try:
            done = json.loads(summary_path.read_text())
            same = json.loads((workdir / "config.json").read_text()) == c.to_dict()
        except (OSError, ValueError):
            done, same = {}, False
        if same and done.get("status") in ("completed", "diverged"):
            print(f"reusing {workdir}", file=sys.stderr)
            return runs.load(workdir)
    train.train_and_evaluate(c, workdir, overwrite=True)
    return runs.load(workdir)


def last(run: runs.Run, key: str) -> float:
    col = run.metrics.get(key)
    if col is None or col.dropna().empty:
        return float("nan")
    return float(col.dropna().iloc[-1])


def write_report(name: str, results_dir, title: str, lines: list[str], fig=None) -> Path:
    results_dir = Path(results_dir)
    results_dir.mkdir(parents=True, exist_ok=True)
    md = results_dir / f"{name}.md"
    body = [f"# {title}", ""] + lines
    if fig is not None:
        png = results_dir / f"{name}.png"
        fig.savefig(png, dpi=110, bbox_inches="tight")
        body += ["", f"![{name}]({png.name})"]
    md.write_text("\n".join(body) + "\n")
    print("\n".join(lines))
    print(f"wrote {md}")
    return md


def table(header: list[str], rows: list[list]) -> list[str]:
    def fmt(v):
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return out
