"""Shared helpers of the experiment scripts: run (or reuse) a config over seeds, state
claims with their criteria, write the report.

Each script reproduces published claims with one command, writes its runs under
`runs/experiments/<name>/`, its figure and markdown table under
`experiments/results/<name>.{png,md}`, and its verdicts to `<workdir>/claims.json`
(and `<results>/<name>.claims.json`). Rerunning reuses finished runs.

A claim is declared at module level, before anything runs, as a `Claim`: its sentence, the
metric, the expected value or direction and the criterion that decides `holds` (a `Rule`
on the per-seed values of the metric). `Claim.verdict(values, note)` only measures:

    GROWTH = Claim("yang_bn_relu_rate", "Yang et al. 2019", "...", "interior growth factor",
                   expected=math.pi / (math.pi - 1), rule=within(0.05))
    claims = [GROWTH.verdict(per_seed_factors, note="...")]
    common.write_claims(NAME, args, claims)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import matplotlib
import numpy as np

matplotlib.use("Agg")

from bn_research import config_lib, runs, train  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "experiments" / "results"


def parse_args(name: str, doc: str, argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The common flags of every experiment script; `argv` None reads sys.argv."""
    p = argparse.ArgumentParser(prog=f"experiments/{name}.py", description=doc.splitlines()[0])
    p.add_argument("--workdir", default=str(ROOT / "runs" / "experiments" / name),
                   help="where the runs and claims.json go (default %(default)s)")
    p.add_argument("--quick", action="store_true", help="a short version for smoke tests (same claims, tiny runs)")
    p.add_argument("--seeds", type=int, default=3, help="seeds per arm (at least 3; default %(default)s)")
    p.add_argument("--results", default=None,
                   help="where the figure, table and claims go (default experiments/results, "
                        "or <workdir>/results with --quick)")
    args = p.parse_args(argv)
    if args.seeds < 3:
        p.error(f"--seeds must be at least 3 for a confidence interval over seeds, got {args.seeds}")
    if args.results is None:
        args.results = str(Path(args.workdir) / "results") if args.quick else str(RESULTS)
    args.name = name
    return args


def seeds(args) -> list[int]:
    """The seeds of every arm: 0 .. --seeds - 1."""
    return list(range(args.seeds))


def config(file: str, arg: str = "", **overrides):
    """A config file's config with dotted-key overrides (`train__num_steps=10` style keys
    are not used: pass {'train.num_steps': 10} through `**{...}`)."""
    c = config_lib.from_file(ROOT / "configs" / file, arg or None)
    c.update_from_flattened_dict(overrides)  # existing keys only: a typo raises
    return c


def run(c, workdir: Path) -> runs.Run:
    """Train `c` into `workdir` unless a finished run of the same config is there."""
    workdir = Path(workdir)
    if _finished(c, workdir):
        print(f"reusing {workdir}", file=sys.stderr)
        return runs.load(workdir)
    train.train_and_evaluate(c, workdir, overwrite=True)
    return runs.load(workdir)


def run_seeds(c, workdir, seed_list: Sequence[int]) -> list[runs.Run]:
    """Train `c` once per seed (as vectorized replicas: one compiled program for all seeds)
    into `workdir/seed=<s>`, reusing the finished runs of the same config."""
    multi = c.copy_and_resolve_references()
    multi.replicas.seeds = tuple(int(s) for s in seed_list)
    dirs = [Path(workdir) / f"seed={s}" for s in seed_list]
    return _train_or_reuse(multi, dirs, f"{workdir}/seed=*")


def _train_or_reuse(multi, dirs: list[Path], label: str) -> list[runs.Run]:
    """Train the replicas of `multi` into `dirs` (in `replicas.expand` order) unless every one
    of them already holds a finished run of its config; load them."""
    from bn_research import replicas

    if all(_finished(one, d) for one, d in zip(replicas.expand(multi), dirs, strict=True)):
        print(f"reusing {label}", file=sys.stderr)
    else:
        replicas.train_replicas(multi, dirs, overwrite=True)
    return [runs.load(d) for d in dirs]


def _finished(c, workdir: Path) -> bool:
    """A completed or diverged run of this very config (compared as the run directory
    stores it: tuples become JSON lists) is in `workdir`."""
    from bn_research import rundir

    return rundir.finished_summary(Path(workdir), c.to_dict()) is not None


def last(run: runs.Run, key: str) -> float:
    col = run.metrics.get(key)
    if col is None or col.dropna().empty:
        return float("nan")
    return float(col.dropna().iloc[-1])


def finish_figure(fig, axes, fontsize: int = 7):
    """The experiments' common figure finish: a light grid and a legend on every axis, tight layout."""
    for ax in np.ravel(axes):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=fontsize)
    fig.tight_layout()
    return fig


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


# ---------------------------------------------------------------------------------------
# Claims: statistics over seeds, criteria fixed before the run, claims.json

# Two-sided 97.5% quantiles of Student's t for 1..30 degrees of freedom (standard tables).
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179,
         2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064,
         2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


def ci95(values: Sequence[float]) -> dict:
    """{mean, ci95: [lo, hi], n} of per-seed values: mean +- t_{0.975, n-1} * s / sqrt(n).

    Non-finite values (a diverged seed's metric) make the mean and interval non-finite:
    they are reported, never dropped. n = 1 gives an infinite interval.
    """
    v = np.asarray([float(x) for x in values], dtype=np.float64)
    n = int(v.size)
    if n == 0:
        raise ValueError("ci95 needs at least one value")
    mean = float(v.mean())
    if n == 1:
        return {"mean": mean, "ci95": [-math.inf, math.inf], "n": 1}
    t = _T975[n - 2] if n - 1 <= len(_T975) else 1.960
    half = float(t * v.std(ddof=1) / math.sqrt(n))
    return {"mean": mean, "ci95": [mean - half, mean + half], "n": n}


@dataclasses.dataclass(frozen=True)
class Rule:
    """How `holds` is decided from {mean, ci95, n}; `text` is the criterion as written."""
    text: str
    test: Callable[[dict], bool]


def above(x: float) -> Rule:
    """The whole 95% interval lies above x."""
    return Rule(f"95% CI lower bound > {x:g}", lambda m: m["ci95"][0] > x)


def below(x: float) -> Rule:
    """The whole 95% interval lies below x."""
    return Rule(f"95% CI upper bound < {x:g}", lambda m: m["ci95"][1] < x)


def within(rel: float) -> Rule:
    """The mean is within a relative tolerance of the expected value (set by the Claim)."""
    return Rule(f"|mean / expected - 1| <= {rel:g}", lambda m, rel=rel: abs(m["mean"] / m["expected"] - 1) <= rel)


def between(lo: float, hi: float) -> Rule:
    """The whole 95% interval lies inside [lo, hi]."""
    return Rule(f"95% CI inside [{lo:g}, {hi:g}]", lambda m: lo <= m["ci95"][0] and m["ci95"][1] <= hi)


def all_of(*rules: Rule) -> Rule:
    return Rule(" and ".join(r.text for r in rules), lambda m: all(r.test(m) for r in rules))


@dataclasses.dataclass(frozen=True)
class Claim:
    """A claim and its criterion, declared before anything runs."""
    id: str
    paper: str
    claim: str  # one sentence
    metric: str  # what the per-seed values are
    expected: float | str  # a number where theory gives one, else the direction
    rule: Rule

    def verdict(self, values: Sequence[float], note: str = "", experiment: str = "") -> dict:
        measured = ci95(values)
        finite = all(math.isfinite(x) for x in [measured["mean"], *measured["ci95"]]) or measured["n"] == 1
        holds = bool(finite and self.rule.test({**measured, "expected": self.expected}))
        return {"id": self.id, "experiment": experiment, "paper": self.paper, "claim": self.claim,
                "metric": self.metric, "measured": measured, "values": [float(x) for x in values],
                "expected": self.expected, "criterion": self.rule.text, "holds": holds, "note": note}


CLAIM_KEYS = ("id", "experiment", "paper", "claim", "metric", "measured", "expected", "criterion", "holds", "note")


def validate_claim(c: dict) -> None:
    """Raise ValueError naming the first problem with one claim object."""
    missing = [k for k in CLAIM_KEYS if k not in c]
    if missing:
        raise ValueError(f"claim {c.get('id', '?')} lacks {', '.join(missing)}")
    m = c["measured"]
    if set(m) != {"mean", "ci95", "n"} or len(m["ci95"]) != 2:
        raise ValueError(f"claim {c['id']}: measured must be {{mean, ci95: [lo, hi], n}}, got {m}")
    if not isinstance(c["holds"], bool):
        raise ValueError(f"claim {c['id']}: holds must be true or false")
    if int(m["n"]) < 3:
        raise ValueError(f"claim {c['id']}: n = {m['n']} seeds; every claim needs at least 3")
    if not (isinstance(c["expected"], (int, float, str))):
        raise ValueError(f"claim {c['id']}: expected must be a number or a direction")


def _json_safe(o):
    if isinstance(o, float) and not math.isfinite(o):
        return str(o)  # "nan", "inf", "-inf": JSON has no such numbers
    if isinstance(o, dict):
        return {k: _json_safe(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_json_safe(v) for v in o]
    return o


def write_claims(name: str, args, claims: list[dict]) -> Path:
    """Write `<workdir>/claims.json` and `<results>/<name>.claims.json`; print the verdicts."""
    out = []
    for c in claims:
        c = {**c, "experiment": name}
        validate_claim(c)
        out.append(_json_safe(c))
    text = json.dumps(out, indent=1) + "\n"
    path = Path(args.workdir) / "claims.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    results = Path(args.results)
    results.mkdir(parents=True, exist_ok=True)
    (results / f"{name}.claims.json").write_text(text)
    for c in out:
        m = c["measured"]
        print(f"[{'holds' if c['holds'] else 'DOES NOT HOLD'}] {c['id']}: {m['mean']:.4g} "
              f"(95% CI {fmt_num(m['ci95'][0])} .. {fmt_num(m['ci95'][1])}, n={m['n']}); "
              f"criterion: {c['criterion']}")
    print(f"wrote {path}")
    return path


def fmt_num(v) -> str:
    try:
        return f"{float(v):.4g}"
    except (TypeError, ValueError):
        return str(v)


def claims_table(claims: list[dict]) -> list[str]:
    """Markdown rows of a verdict table."""
    rows = []
    for c in claims:
        m = c["measured"]
        exp = fmt_num(c["expected"]) if not isinstance(c["expected"], str) else c["expected"]
        rows.append([c["id"], c["claim"], f"{fmt_num(m['mean'])} [{fmt_num(m['ci95'][0])}, {fmt_num(m['ci95'][1])}]",
                     str(m["n"]), exp, c["criterion"], "**holds**" if c["holds"] else "**does not hold**"])
    return table(["claim", "statement", "measured (95% CI)", "n", "expected", "criterion", "verdict"], rows)


def run_grid(c, workdir, seed_list: Sequence[int], rates: Sequence[float]) -> dict[tuple[int, float], runs.Run]:
    """Train `c` for every (seed, learning rate) pair (vectorized replicas: one compiled
    program for the whole cross product) into `workdir/seed=<s>,lr=<rate>`, reusing the
    finished runs (completed or diverged) of the same configs. Keys are (seed, rate)."""
    from bn_research import replicas

    multi = c.copy_and_resolve_references()
    multi.replicas.seeds = tuple(int(s) for s in seed_list)
    multi.replicas.learning_rates = tuple(float(r) for r in rates)
    keys = [(int(one.seed), float(one.optimizer.learning_rate)) for one in replicas.expand(multi)]  # seed-major
    dirs = [Path(workdir) / f"seed={s},lr={r:g}" for s, r in keys]
    return dict(zip(keys, _train_or_reuse(multi, dirs, f"{workdir}/seed=*,lr=*"), strict=True))
