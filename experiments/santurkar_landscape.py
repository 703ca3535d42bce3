"""Santurkar et al. (2018), sec. 3.1 and Fig. 4: batch norm makes the loss landscape
smoother along the gradient.

    bn-research reproduce santurkar_landscape    # 123-135 s measured on 2 shared CPU cores, 3 seeds
    python experiments/santurkar_landscape.py --workdir DIR [--quick] [--seeds N]

Claims (criteria fixed below, before any run). Every metric is a per-seed paired ratio
BN / none of a run's median over the probe's cadence points (training steps) of one
statistic of the main grid, eta in [1/2, 4] x the learning rate; each claim holds when
the 95% CI of the ratio lies below 1:
  (a) landscape_loss_range_same_lr: the range (max - min) of the loss along the gradient;
  (b) landscape_grad_pred_same_lr: the largest gradient change ||g - g(theta - eta g)||
      (gradient predictiveness);
  (c) landscape_beta_same_lr: effective beta-smoothness, max over eta of that change over
      the distance moved ||eta g||;
  all three with both networks at the same learning rate (0.1, the paper's VGG rate), and
  (d) landscape_loss_range_own_lr, (e) landscape_grad_pred_own_lr, (f)
  landscape_beta_own_lr: the same, each network at its own larger stable rate.

Protocol. A deeper network than the project's 3-layer MLP: 10 hidden ReLU layers of 64
units (He init) on the embedded MNIST digits, batch 128 (the paper's), plain SGD at a
constant rate (the paper's "standard SGD"), 600 steps; batch norm before every hidden
activation (norm=batch) or none. The `landscape` probe (bn_research/probes/landscape.py)
runs every 50 steps (and at step 1) with `relative` step sizes: 16 linearly spaced
multiples of the current rate over the paper's VGG range [1/2, 4] (the paper does not
state the number of points), plus a wide grid of 16 log-spaced multiples over
[1/100, 30] (the paper's deep linear range), reported separately (table, `landscape/wide/*`).
The paper's network is a VGG on CIFAR-10 (not available offline); this MLP stands in.

Own larger stable rate: for each arm, a pilot over RATES (3 seeds, 600 steps, probes off);
the largest rate at which every seed completes without diverging (training loss <= 1e3
and finite) and ends at test accuracy >= 0.5 (not stuck at chance); the landscape runs then
use that rate for that arm. The pilot's table is in the report.

Where the beta maximum falls: the probe records, at every cadence point, the multiple of
the rate at which the ratio ||g - g(theta - eta g)|| / ||eta g|| peaks (beta_argmax); the
report gives the fraction of measurements with the peak at the grid's lower edge, so the
reader can tell whether "beta" is an interior maximum or the ratio at the smallest step.
"""

from __future__ import annotations

import math

import matplotlib.pyplot as plt
import numpy as np

from bn_research.probes import store
from experiments import common

NAME = "santurkar_landscape"
PAPER = "Santurkar et al. 2018"
ARMS = ("batch", "none")  # model.norm of the two arms
DEPTH, WIDTH = 10, 64  # hidden ReLU layers and units
QUICK_DEPTH = 3  # --quick: a shallower network (compile time), same claims
BATCH = 128  # the paper's batch size
STEPS, QUICK_STEPS = 600, 20  # training steps (full, --quick)
EVERY, QUICK_EVERY = 50, 5  # landscape probe cadence
SAME_LR = 0.1  # the paper's VGG learning rate
RATES = (0.1, 0.3, 1.0, 3.0)  # pilot grid for each arm's own larger stable rate
MAX_LOSS = 1e3  # divergence: training loss above this or non-finite
MIN_ACCURACY = 0.5  # a stable rate must also train (the digits have 10 classes: chance 0.1)
STEP_RANGE = (0.5, 4.0)  # multiples of the lr, Santurkar et al. 2018, Fig. 4 (VGG)
NUM_STEPS = 16  # points of the main grid (not stated by the paper)
WIDE_RANGE = (0.01, 30.0)  # multiples of the lr, the paper's deep linear range (Fig. 10)
WIDE_NUM_STEPS = 16  # log-spaced points of the wide grid
STATS = (("landscape/loss_range", "loss range"), ("landscape/grad_diff_max", "gradient change (max)"),
         ("landscape/beta", "effective beta-smoothness"))


def _claim(cid: str, stat: str, what: str, cond: str) -> common.Claim:
    return common.Claim(
        cid, PAPER, f"With batch norm the {what} along the gradient is smaller than without it ({cond}).",
        f"median over training of {stat} (eta in [1/2, 4] x lr), ratio BN / none per seed",
        expected="< 1", rule=common.below(1.0))


CONDITIONS = ("same_lr", "own_lr")
COND_TEXT = {"same_lr": f"both at lr {SAME_LR:g}", "own_lr": "each at its own larger stable rate"}
CLAIMS = {(cond, stat): _claim(f"landscape_{short}_{cond}", stat, what, COND_TEXT[cond])
          for cond in CONDITIONS
          for stat, short, what in (("landscape/loss_range", "loss_range", "range of the loss"),
                                    ("landscape/grad_diff_max", "grad_pred", "change of the gradient"),
                                    ("landscape/beta", "beta", "effective beta-smoothness"))}


def base_config(norm: str, quick: bool):
    """configs/mlp.py turned into this experiment's deep ReLU MLP (probes off)."""
    steps, depth = (QUICK_STEPS, QUICK_DEPTH) if quick else (STEPS, DEPTH)
    return common.config("mlp.py", f"norm={norm},depth={depth},width={WIDTH},activation=relu", **{
        "model.init_scale": math.sqrt(2.0),  # He init: std sqrt(2 / fan_in)
        "optimizer.name": "sgd", "optimizer.schedule": "constant",
        "train.batch_size": BATCH, "train.num_steps": steps, "train.eval_every": steps,
        "train.log_every": max(steps // 12, 1), "train.max_loss": MAX_LOSS,
        "probes.drift.enabled": False, "probes.growth.enabled": False, "probes.weights.enabled": False})


def landscape_config(norm: str, lr: float, quick: bool):
    c = base_config(norm, quick)
    every = QUICK_EVERY if quick else EVERY
    c.update_from_flattened_dict({
        "optimizer.learning_rate": float(lr), "train.log_every": every,
        "probes.landscape.enabled": True, "probes.landscape.every": every,
        "probes.landscape.relative": True, "probes.landscape.step_range": STEP_RANGE,
        "probes.landscape.num_steps": NUM_STEPS, "probes.landscape.spacing": "linear",
        "probes.landscape.wide_range": WIDE_RANGE, "probes.landscape.wide_num_steps": WIDE_NUM_STEPS})
    return c


def stable(run) -> bool:
    return run.summary.get("status") == "completed" and common.last(run, "eval/accuracy") >= MIN_ACCURACY


def own_rates(args, seeds) -> tuple[dict, dict]:
    """({norm: largest rate of RATES stable on every seed}, the pilot grids)."""
    grids, best = {}, {}
    for norm in ARMS:
        grids[norm] = common.run_grid(base_config(norm, args.quick), f"{args.workdir}/pilot/{norm}", seeds, RATES)
        ok = [r for r in RATES if all(stable(grids[norm][(s, r)]) for s in seeds)]
        best[norm] = max(ok) if ok else SAME_LR
    return best, grids


def median_stat(run, key: str) -> float:
    if run.summary.get("status") != "completed":
        return float("nan")
    return float(np.median(run.metrics[key].dropna()))


def ratios(pair: dict, key: str) -> list[float]:
    return [median_stat(b, key) / median_stat(n, key) for b, n in zip(pair["batch"], pair["none"], strict=True)]


def edge_fraction(runs_, key="landscape/beta_argmax", lo=STEP_RANGE[0]) -> float:
    """Fraction of all cadence points of `runs_` whose beta peaks at the grid's lower edge."""
    vals = np.concatenate([r.metrics[key].dropna().to_numpy() for r in runs_])
    return float(np.mean(np.isclose(vals, lo, rtol=1e-4))) if len(vals) else float("nan")


def _fmt(values) -> str:
    return "[" + ", ".join(f"{float(v):.3g}" for v in values) + "]"


def verdicts(trained: dict, lrs: dict) -> list[dict]:
    claims = []
    for (cond, stat), claim in CLAIMS.items():
        pair = trained[cond]
        vals = {norm: [median_stat(r, stat) for r in pair[norm]] for norm in ARMS}
        edges = {norm: edge_fraction(pair[norm]) for norm in ARMS}
        note = (f"lr BN {lrs[cond]['batch']:g}, none {lrs[cond]['none']:g}; medians BN {_fmt(vals['batch'])}, "
                f"none {_fmt(vals['none'])} per seed")
        if stat == "landscape/beta":
            note += (f"; beta peaks at the grid's lower edge (eta = {STEP_RANGE[0]:g} x lr) in "
                     f"{edges['batch']:.0%} (BN) and {edges['none']:.0%} (none) of the measurements")
        r = np.asarray(ratios(pair, stat), np.float64)
        geo = float(np.exp(np.log(r).mean())) if np.all(r > 0) else float("nan")
        note += (f"; per-seed ratios {_fmt(r)} (BN < none on {int(np.sum(r < 1))}/{len(r)} seeds, "
                 f"geometric mean {geo:.3g})")
        claims.append(claim.verdict(list(r), note=note))
    return claims


def train_all(args, seeds) -> tuple[dict, dict, dict]:
    """({cond: {norm: [run per seed]}}, {cond: {norm: lr}}, pilot grids). Each arm trains
    its seeds at both of its rates as vectorized replicas of one program."""
    own, pilot = own_rates(args, seeds)
    lrs = {"same_lr": dict.fromkeys(ARMS, SAME_LR), "own_lr": own}
    trained = {cond: {} for cond in CONDITIONS}
    for norm in ARMS:
        rates = sorted({SAME_LR, own[norm]})
        grid = common.run_grid(landscape_config(norm, SAME_LR, args.quick), f"{args.workdir}/landscape/{norm}",
                               seeds, rates)
        for cond in CONDITIONS:
            trained[cond][norm] = [grid[(s, lrs[cond][norm])] for s in seeds]
    return trained, lrs, pilot


COLORS = {"batch": "C0", "none": "C3"}


def _curves(ax, pair, key, lrs):
    for norm in ARMS:
        done = [r for r in pair[norm] if r.summary.get("status") == "completed"]
        if not done:
            continue
        frames = [r.metrics[["step", key]].dropna() for r in done]
        n = min(len(f) for f in frames)
        ax.plot(frames[0]["step"][:n], np.median([f[key].to_numpy()[:n] for f in frames], axis=0),
                marker="o", ms=3, color=COLORS[norm], label=f"norm={norm}, lr {lrs[norm]:g}")


def _along(ax, run, tag, stat, lr, label, color, ls):
    """`stat` against eta / lr at the run's middle cadence point, from the per-unit store;
    stat 'beta' is the ratio grad_diff / (eta ||g||) whose max over the grid is beta."""
    df = store.read(run.path)
    df = df[df.layer == tag]
    if df.empty:
        return
    step = sorted(df.step.unique())[len(df.step.unique()) // 2]
    d = df[df.step == step]
    eta = d[d.stat == "landscape/step_size"].sort_values("unit")["value"].to_numpy()
    y = d[d.stat == ("landscape/grad_diff" if stat == "beta" else stat)].sort_values("unit")["value"].to_numpy()
    if stat == "beta":
        g = run.metrics.loc[run.metrics["step"] == step, "train/grad_norm"].to_numpy()
        y = y / (eta * g[0]) if len(g) else y * np.nan
    ax.plot(eta / lr, y, ls, color=color, marker=".", label=f"{label}, step {step}")


def figure(trained, lrs):
    fig, axes = plt.subplots(3, 3, figsize=(15, 11))
    for row, cond in enumerate(CONDITIONS):
        for ax, (key, label) in zip(axes[row], STATS, strict=True):
            _curves(ax, trained[cond], key, lrs[cond])
            ax.set(yscale="log", xlabel="step", title=f"{label} (median of seeds)\n{COND_TEXT[cond]}")
    for norm in ARMS:
        run = trained["same_lr"][norm][0]
        for tag, ls in (("grid", "-"), ("wide_grid", ":")):
            _along(axes[2, 0], run, tag, "landscape/loss", SAME_LR, f"{norm}, {tag}", COLORS[norm], ls)
            _along(axes[2, 1], run, tag, "beta", SAME_LR, f"{norm}, {tag}", COLORS[norm], ls)
    axes[2, 0].set(xscale="log", yscale="log", xlabel="eta / lr", ylabel="L(theta - eta g)",
                   title=f"loss along -g, lr {SAME_LR:g}, seed 0")
    axes[2, 1].set(xscale="log", yscale="log", xlabel="eta / lr", ylabel="||g - g(theta - eta g)|| / ||eta g||",
                   title=f"beta ratio along -g (beta = its max), lr {SAME_LR:g}, seed 0")
    for cond, marker in zip(CONDITIONS, ("o", "x"), strict=True):
        for norm in ARMS:
            vals = np.concatenate([r.metrics["landscape/beta_argmax"].dropna().to_numpy() for r in trained[cond][norm]])
            pts, counts = np.unique(np.round(vals, 4), return_counts=True)
            axes[2, 2].plot(pts, counts / max(len(vals), 1), marker=marker, ls="none", color=COLORS[norm],
                            label=f"{norm}, {cond}")
    axes[2, 2].set(xlabel="eta / lr at the max of the beta ratio", ylabel="fraction of measurements",
                   title="where beta peaks on the main grid [1/2, 4] x lr")
    return common.finish_figure(fig, axes)


def report(args, trained, lrs, pilot, seeds, claims):
    lines = [f"Depth-{DEPTH} width-{WIDTH} ReLU MLP (He init), MNIST digits, batch {BATCH}, plain SGD, "
             f"seeds {seeds}. Landscape every {EVERY} steps along -g: main grid {NUM_STEPS} linear points over "
             f"{STEP_RANGE} x lr, wide grid {WIDE_NUM_STEPS} log points over {WIDE_RANGE} x lr. Values: mean "
             "over seeds of each run's median over training.", "", "## Own larger stable rate (pilot)", ""]
    rows = []
    for r in RATES:
        row = [f"{r:g}"]
        for norm in ARMS:
            runs_ = [pilot[norm][(s, r)] for s in seeds]
            row += [f"{sum(x.summary.get('status') == 'diverged' for x in runs_)}/{len(runs_)}",
                    float(np.mean([common.last(x, 'eval/accuracy') for x in runs_]))]
        rows.append(row)
    lines += common.table(["lr", "BN diverged", "BN test acc", "none diverged", "none test acc"], rows)
    lines += ["", f"Chosen (largest rate stable on every seed, test accuracy >= {MIN_ACCURACY}): "
              f"BN {lrs['own_lr']['batch']:g}, none {lrs['own_lr']['none']:g}."]
    lines += [f"norm={n} is stable at the grid's top rate {RATES[-1]:g}: its own largest stable rate may be "
              "larger (censored by the grid)." for n in ARMS if lrs["own_lr"][n] == RATES[-1]]
    lines += ["", "## Landscape", ""]
    rows = []
    keys = [k for k, _ in STATS] + ["landscape/wide/loss_range", "landscape/wide/grad_diff_max",
                                    "landscape/wide/beta"]
    for cond in CONDITIONS:
        for norm in ARMS:
            rs = trained[cond][norm]
            means = [float(np.mean([median_stat(r, k) for r in rs])) for k in keys]
            edges = [edge_fraction(rs), edge_fraction(rs, "landscape/wide/beta_argmax", WIDE_RANGE[0])]
            rows.append([cond, norm, f"{lrs[cond][norm]:g}"] + means + [f"{e:.0%}" for e in edges])
    lines += common.table(["condition", "norm", "lr", "loss range", "grad change", "beta", "wide: loss range",
                           "wide: grad change", "wide: beta", "beta at lower edge", "wide: beta at lower edge"],
                          rows)
    lines += ["", "## Claims", ""] + common.claims_table(claims)
    lines += [""] + [f"- `{c['id']}`: {c['note']}" for c in claims]
    common.write_report(NAME, args.results, "Santurkar et al. (2018): loss landscape smoothness", lines,
                        figure(trained, lrs))


def main(argv=None):
    args = common.parse_args(NAME, __doc__, argv)
    seeds = common.seeds(args)
    trained, lrs, pilot = train_all(args, seeds)
    claims = verdicts(trained, lrs)
    report(args, trained, lrs, pilot, seeds, claims)
    common.write_claims(NAME, args, claims)
    return claims


if __name__ == "__main__":
    main()
