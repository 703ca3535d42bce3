r"""Probe overhead: step time with probes on divided by step time with probes off.

    .venv/bin/python benchmarks/probe_overhead.py [--reps 9] [--models mlp,cnn]

For the MLP and CNN configs (configs/mlp.py, configs/cnn.py, batch norm), times one
jitted chunk (`train.setup(config)` + `step.jit_fns`, K = the config's steps per dispatch)
for each variant, interleaved A/B/C/A/B/C... over repetitions, and reports the median
chunk time of each variant divided by the median of `off`:

    off          every probe disabled
    drift_every  drift every step (its moments on the training batch; percentiles and the
                 probe batch at their default cadence, train.log_every), others off
    defaults     drift, growth, weights at their default cadence (train.log_every)
    all_default  every probe on (ics and landscape too) at the default cadence

Prints a table and writes benchmarks/probe_overhead.json. Not a test: the numbers depend
on the machine. Goals: defaults <= 1.05, drift_every <= 1.25. `benchmarks/run.py`
(section `probes`) times the same variants next to the other comparisons.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import jax  # noqa: E402

from bn_research import config_lib, probes, step, train  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def load_config(name: str, arg: str | None = None):
    return config_lib.from_file(ROOT / "configs" / f"{name}.py", arg)


def variant_config(model: str, variant: str):
    c = load_config(model, "norm=batch")
    for name in probes.PROBES:
        c.probes[name].enabled = False
    if variant == "drift_every":
        c.probes.drift.enabled, c.probes.drift.every = True, 1
    elif variant == "defaults":
        for name in ("drift", "growth", "weights"):
            c.probes[name].enabled = True
    elif variant == "all_default":
        for name in probes.PROBES:
            c.probes[name].enabled = True
    return c


VARIANTS = ("off", "drift_every", "defaults", "all_default")


def bench_model(model: str, reps: int) -> dict:
    runners = {}
    for v in VARIANTS:
        config = variant_config(model, v)
        s = train.setup(config)
        chunk_fn, _ = step.jit_fns(s["fns"])
        k = train.chunk_length(config)
        state = s["state"]
        state, m = chunk_fn(state, s["data"]["train"], k)  # compile + warm up (chunks start at multiples of k: phase 0)
        jax.block_until_ready((state, m))
        runners[v] = {"fn": chunk_fn, "state": state, "data": s["data"]["train"], "k": k, "times": []}
    for _ in range(reps):
        for v in VARIANTS:
            r = runners[v]
            t0 = time.perf_counter()
            r["state"], m = r["fn"](r["state"], r["data"], r["k"])
            jax.block_until_ready((r["state"], m))
            r["times"].append(time.perf_counter() - t0)
    base = statistics.median(runners["off"]["times"])
    out = {}
    for v in VARIANTS:
        med = statistics.median(runners[v]["times"])
        out[v] = {"chunk_steps": runners[v]["k"], "median_chunk_s": med,
                  "step_ms": 1000 * med / runners[v]["k"], "ratio": med / base}
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=9)
    ap.add_argument("--models", default="mlp,cnn")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "probe_overhead.json"))
    args = ap.parse_args()
    results = {"device": jax.devices()[0].device_kind, "platform": jax.devices()[0].platform,
               "reps": args.reps, "jax": jax.__version__, "models": {}}
    print(f"{'model':6} {'variant':12} {'steps/chunk':>11} {'step ms':>9} {'ratio':>7}")
    for model in args.models.split(","):
        res = bench_model(model, args.reps)
        results["models"][model] = res
        for v, r in res.items():
            print(f"{model:6} {v:12} {r['chunk_steps']:>11d} {r['step_ms']:>9.3f} {r['ratio']:>7.3f}")
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
