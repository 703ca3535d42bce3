"""Run every experiment and gather its claims: `bn-research reproduce [--quick] [NAME ...]`
(also `python -m experiments`).

Each experiment runs in this process (one JAX import, one compilation cache) with
`--workdir <root>/<name>`; its `claims.json` is gathered into `<results>/claims.json`, and
a verdict table (every claim: measured mean and 95% CI over seeds, the criterion fixed in
the script before the run, holds or not, and the note with the numbers behind it) into
`<results>/README.md`. An experiment that raises is reported as failed and the others go
on; the exit code is 1 if any failed.

Full runs write the committed `experiments/results/`; `--quick` (tiny runs, the same
claims, for smoke tests) writes under `runs/reproduce_quick/` so it never overwrites them.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `python experiments/reproduce.py` and `bn-research reproduce`
    sys.path.insert(0, str(ROOT))

from experiments import common  # noqa: E402

# In the order of the literature: the original claim, its critique, the alternatives.
EXPERIMENTS = (
    "ioffe_fig1",
    "santurkar_noisy_bn",
    "santurkar_gradient_ics",
    "santurkar_landscape",
    "yang_gradient_explosion",
    "weight_norm_decoupling",
    "bjorck_learning_rate",
    "kohler_length_direction",
)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="bn-research reproduce", description=__doc__.splitlines()[0])
    p.add_argument("names", nargs="*", metavar="NAME",
                   help=f"experiments to run (default all: {', '.join(EXPERIMENTS)})")
    p.add_argument("--quick", action="store_true", help="tiny runs of every experiment (smoke test; minutes)")
    p.add_argument("--seeds", type=int, default=3, help="seeds per arm (default %(default)s)")
    p.add_argument("--workdir", default=None,
                   help="root of the experiments' runs (default runs/experiments; runs/reproduce_quick with --quick)")
    p.add_argument("--results", default=None,
                   help="where claims.json and README.md go (default experiments/results, or <workdir>/results "
                        "with --quick)")
    args = p.parse_args(argv)
    unknown = [n for n in args.names if n not in EXPERIMENTS]
    if unknown:
        p.error(f"unknown experiment {unknown[0]!r}; choose from: {', '.join(EXPERIMENTS)}")
    if args.seeds < 3:
        p.error(f"--seeds must be at least 3, got {args.seeds}")
    args.workdir = Path(args.workdir or ROOT / "runs" / ("reproduce_quick" if args.quick else "experiments"))
    args.results = Path(args.results or (args.workdir / "results" if args.quick else common.RESULTS))
    return args


def run_one(name: str, args) -> dict:
    """Run one experiment; {name, status, wall_s, claims, error}."""
    argv = ["--workdir", str(args.workdir / name), "--results", str(args.results), "--seeds", str(args.seeds)]
    if args.quick:
        argv.append("--quick")
    claims_path = args.workdir / name / "claims.json"
    if claims_path.exists():
        claims_path.unlink()  # a stale verdict must not stand in for this run's
    t0 = time.time()
    print(f"== {name} ({'quick' if args.quick else 'full'})", file=sys.stderr, flush=True)
    try:
        importlib.import_module(f"experiments.{name}").main(argv)
        claims = json.loads(claims_path.read_text())
        for c in claims:
            common.validate_claim(c)
        status, error = "ok", ""
    except Exception as e:  # one experiment failing must not hide the others' verdicts
        traceback.print_exc()
        claims, status, error = [], "failed", f"{type(e).__name__}: {e}".splitlines()[0]
    wall = time.time() - t0
    print(f"== {name}: {status} in {wall:.0f} s", file=sys.stderr, flush=True)
    return {"name": name, "status": status, "wall_s": round(wall, 1), "claims": claims, "error": error,
            "finished_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "load_average": [round(x, 2) for x in os.getloadavg()]}


def _versions() -> dict:
    import jax

    from bn_research import rundir

    return {**rundir.versions(), "python": platform.python_version(), "device_kind": jax.devices()[0].device_kind}


def _order(claims: list[dict]) -> list[dict]:
    """Claims in the order of EXPERIMENTS (stable within an experiment)."""
    rank = {n: i for i, n in enumerate(EXPERIMENTS)}
    return sorted(claims, key=lambda c: rank.get(c["experiment"], len(rank)))


def write_readme(path: Path, claims: list[dict], records: list[dict], quick: bool) -> None:
    """The verdict README: every claim, each experiment's last run, the notes."""
    n_hold = sum(c["holds"] for c in claims)
    total = sum(r["wall_s"] for r in records)
    lines = ["# Reproduced claims", "",
             "Written by `bn-research reproduce" + (" --quick" if quick else "") + "` "
             f"({len(claims)} claims, {n_hold} hold, {len(claims) - n_hold} do not; the experiments' runs took "
             f"{total / 60:.1f} min of wall time on this machine, listed below). Each criterion was fixed in the "
             "experiment's script before its run; measured values are means over seeds with 95% "
             "confidence intervals (Student's t). `claims.json` holds every claim with its per-seed values.", ""]
    lines += common.claims_table(claims)
    lines += ["", "| experiment | status | wall time | finished (UTC) | load average (1, 5, 15 min) | report |",
              "|---|---|---|---|---|---|"]
    for r in records:
        load = ", ".join(f"{x:.1f}" for x in r.get("load_average", []))
        lines.append(f"| {r['name']} | {r['status']}{(': ' + r['error']) if r['error'] else ''} | "
                     f"{r['wall_s']:.0f} s | {r.get('finished_utc', '')} | {load} | [{r['name']}.md]({r['name']}.md) |")
    lines += ["", "## Notes", ""]
    for c in claims:
        if c.get("note"):
            verdict = "holds" if c["holds"] else "does not hold"
            lines.append(f"- **{c['id']}** ({verdict}): {c['note']}")
    path.write_text("\n".join(lines) + "\n")


README_START, README_END = "<!-- claims:start -->", "<!-- claims:end -->"


def compact_table(claims: list[dict]) -> list[str]:
    """One row per claim for the project README: experiment, claim, measured mean [95% CI], n, verdict."""
    rows = []
    for c in claims:
        m = c["measured"]
        rows.append([c["experiment"], f"`{c['id']}`: {c['claim']}",
                     f"{common.fmt_num(m['mean'])} [{common.fmt_num(m['ci95'][0])}, {common.fmt_num(m['ci95'][1])}]",
                     str(m["n"]), "holds" if c["holds"] else "**does not hold**"])
    return common.table(["experiment", "claim", "measured [95% CI]", "n", "verdict"], rows)


def update_project_readme(claims: list[dict], path: Path = ROOT / "README.md") -> bool:
    """Replace the verdict table between the README's claims markers; False if there are none."""
    if not path.exists():
        return False
    text = path.read_text()
    if README_START not in text or README_END not in text:
        return False
    head, rest = text.split(README_START, 1)
    _, tail = rest.split(README_END, 1)
    n_hold = sum(c["holds"] for c in claims)
    body = [README_START, "", f"{len(claims)} claims, {n_hold} hold, {len(claims) - n_hold} do not "
            "(written by `bn-research reproduce`; details and notes in "
            "[experiments/results/README.md](experiments/results/README.md)).", ""]
    body += compact_table(claims) + ["", README_END]
    path.write_text(head + "\n".join(body) + tail)
    return True


def main(argv=None) -> int:
    args = parse_args(argv)
    names = args.names or list(EXPERIMENTS)
    args.results.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    results = [run_one(name, args) for name in names]
    total = time.time() - t0
    out = args.results / "claims.json"
    if args.names and out.exists():  # a partial rerun updates its experiments, keeps the rest
        previous = [c for c in json.loads(out.read_text()) if c["experiment"] not in names]
    else:
        previous = []
    claims = _order(previous + [c for r in results for c in r["claims"]])
    out.write_text(json.dumps(claims, indent=1) + "\n")
    record = args.results / "reproduce_run.json"
    runs_by_name = {}
    if args.names and record.exists():  # a partial rerun keeps the other experiments' records
        try:
            runs_by_name = {e["name"]: e for e in json.loads(record.read_text()).get("experiments", [])}
        except (OSError, ValueError, KeyError, TypeError):
            runs_by_name = {}
    keep = ("name", "status", "wall_s", "error", "finished_utc", "load_average")
    for r in results:
        runs_by_name[r["name"]] = {k: r[k] for k in keep}
    ordered = [runs_by_name[n] for n in EXPERIMENTS if n in runs_by_name]
    record.write_text(json.dumps(
        {"last_command_wall_s": round(total, 1),
         "sum_of_experiment_wall_s": round(sum(e["wall_s"] for e in ordered), 1), "quick": args.quick,
         "seeds": args.seeds, "versions": _versions(), "experiments": ordered}, indent=1) + "\n")
    write_readme(args.results / "README.md", claims, ordered, args.quick)
    if not args.quick and args.results.resolve() == common.RESULTS.resolve() and update_project_readme(claims):
        print("updated the verdict table in README.md", file=sys.stderr)
    n_hold = sum(c["holds"] for c in claims)
    print(f"{len(claims)} claims: {n_hold} hold, {len(claims) - n_hold} do not; "
          f"{sum(r['status'] != 'ok' for r in results)} experiments failed; {total:.0f} s; wrote {out}")
    return 0 if all(r["status"] == "ok" for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
