"""Bjorck et al. (2018): batch norm primarily enables training with larger learning rates.

    bn-research reproduce bjorck_learning_rate    # ~2 minutes on 2 CPU cores (106 s measured under load)
    python experiments/bjorck_learning_rate.py --workdir DIR [--quick] [--seeds N]

Claims (criteria fixed below, before any run):
  (a) bjorck_bn_larger_stable_rate: the largest learning rate that does not diverge is
      larger with batch norm than without (per seed, log10 of the ratio of the two rates;
      95% CI above 0);
  (b) bjorck_bn_best_accuracy: at each network's own best learning rate, batch norm's
      final test accuracy is at least the unnormalized network's (per-seed difference
      BN - none; 95% CI lower bound above -0.01, a one-point non-inferiority margin);
  (c) bjorck_small_rate_no_advantage: at the smallest rate of the sweep batch norm gives
      no advantage (per-seed difference BN - none of the final test accuracy; 95% CI upper
      bound below +0.02).

Protocol. A ReLU MLP of 10 hidden layers of 64 units (He init, std sqrt(2/fan_in)) on the
embedded MNIST digits, batch 64, plain SGD at a constant rate for 1,000 steps (16
epochs), with batch norm before every hidden activation (norm=batch) or without
(norm=none). Learning rates 10^(k/2) for k = -6..2, i.e. 1e-3 .. 10 in half decades; every
(seed, rate) pair of one arm trains as a vectorized replica of one compiled program
(`common.run_grid`), and a replica that diverges stops logging while the others go on.
`--quick` trains 40 steps at the rates 1e-3, 0.1 and 1 only (same claims, smoke test).
Divergence: a mini-batch training loss above 1e3 or non-finite (`train.max_loss`), the
definition a blog summary of the paper reports (SECONDARY in the literature notes). A
diverged run counts as accuracy 0 when each arm's best rate is picked (by the mean over
seeds of the final test accuracy; the data have no separate validation split, so the
pick uses the test split, symmetrically for both arms).

Choices (not the paper's setting, which is a 110-layer ResNet on CIFAR-10 with momentum
SGD and weight decay, SECONDARY): an MLP deep enough that the unnormalized network
diverges at the large rates within the runtime budget; plain SGD without weight decay so
that the nominal rate is the step size; the smallest rate 1e-3 is the smallest at which
the unnormalized network makes visible progress in 1,000 steps (the paper's "0.0001"
played that role for its network; its Fig. 1 wording is unconfirmed). The grid and the
smallest rate were chosen after one 3-seed pilot of both arms on rates 1e-4 .. 3 (1e-4:
both near chance after 1,000 steps; 1e-3: both at 35-42%; 3: no-BN diverged, BN 90-94%).
The grid's top (10) censors batch norm's largest stable rate: if batch norm never
diverges, its value is a lower bound and (a) understates the gap.
"""

from __future__ import annotations

import math

import matplotlib.pyplot as plt
import numpy as np

from experiments import common

NAME = "bjorck_learning_rate"
PAPER = "Bjorck et al. 2018"
ARMS = ("batch", "none")  # model.norm of the two arms
RATES = tuple(10.0 ** (k / 2) for k in range(-6, 3))  # 1e-3 .. 10 in half decades
DEPTH, WIDTH = 10, 64  # hidden layers and units per layer
STEPS, QUICK_STEPS = 1000, 40  # training steps (full, --quick)
BATCH = 64  # examples per step
MAX_LOSS = 1e3  # divergence: training loss above this (blog-reported definition, SECONDARY)
CURVE_RATES = (1e-3, 0.1, 1.0)  # rates whose training-loss curves the figure shows
QUICK_RATES = CURVE_RATES  # --quick: three rates, the smallest of RATES among them
TRAINS_ACC = 0.5  # descriptive only (no claim): a run "trains" if its final test accuracy reaches this

LARGER_RATE = common.Claim(
    "bjorck_bn_larger_stable_rate", PAPER,
    "With batch norm the largest learning rate that does not diverge is larger than without it.",
    "log10(largest non-diverging rate with BN / without BN), per seed (rates below the first "
    "divergence on the grid; divergence = training loss > 1e3 or non-finite)",
    expected="> 0", rule=common.above(0.0))
BEST_ACCURACY = common.Claim(
    "bjorck_bn_best_accuracy", PAPER,
    "At each network's own best learning rate, batch norm's final test accuracy is at least the "
    "unnormalized network's.",
    "final test accuracy BN - none at each arm's best rate (picked by the mean over seeds), per seed",
    expected=">= 0", rule=common.above(-0.01))
SMALL_RATE = common.Claim(
    "bjorck_small_rate_no_advantage", PAPER,
    "At the smallest learning rate of the sweep batch norm gives no advantage.",
    f"final test accuracy BN - none at lr {RATES[0]:g}, per seed",
    expected="<= 0 (no advantage)", rule=common.below(0.02))


def arm_config(norm: str, steps: int):
    """configs/mlp.py turned into the deep ReLU MLP of this experiment (probes off)."""
    return common.config("mlp.py", f"norm={norm},depth={DEPTH},width={WIDTH},activation=relu", **{
        "model.init_scale": math.sqrt(2.0),  # He init: std sqrt(2 / fan_in)
        "optimizer.name": "sgd", "optimizer.schedule": "constant",
        "train.batch_size": BATCH, "train.num_steps": steps, "train.eval_every": steps,
        "train.log_every": max(steps // 20, 1), "train.max_loss": MAX_LOSS,
        "probes.drift.enabled": False, "probes.growth.enabled": False, "probes.weights.enabled": False})


def rates_of(grid: dict) -> list[float]:
    """The learning rates of a {(seed, rate): run} grid, ascending."""
    return sorted({r for _, r in grid})


def diverged(run) -> bool:
    return run.summary.get("status") == "diverged"


def final_accuracy(run) -> float:
    """Final test accuracy; nan for a diverged run."""
    return float("nan") if diverged(run) else common.last(run, "eval/accuracy")


def largest_stable_rate(grid: dict, seed: int) -> float:
    """The largest rate below the first diverged rate of this seed (all rates if none diverged);
    nan if even the smallest rate diverged."""
    stable = float("nan")
    for r in rates_of(grid):
        if diverged(grid[(seed, r)]):
            break
        stable = r
    return stable


def accuracy_matrix(grid: dict, seeds: list[int]) -> np.ndarray:
    """[seed, rate] final test accuracies (nan where diverged)."""
    return np.array([[final_accuracy(grid[(s, r)]) for r in rates_of(grid)] for s in seeds])


def best_rate_index(acc: np.ndarray) -> int:
    """The rate with the highest mean accuracy over seeds, a diverged run counting as 0."""
    return int(np.argmax(np.nan_to_num(acc, nan=0.0).mean(axis=0)))


def _fmt(values) -> str:
    return "[" + ", ".join(f"{float(v):.4g}" for v in values) + "]"


def _largest_training_rate(rates, acc_row) -> float:
    """The largest rate whose final test accuracy reaches TRAINS_ACC (nan if none does)."""
    ok = [r for r, a in zip(rates, acc_row, strict=True) if a >= TRAINS_ACC]
    return max(ok) if ok else float("nan")


def verdicts(grids: dict, seeds: list[int], quick: bool = False) -> tuple[list[dict], dict]:
    acc = {norm: accuracy_matrix(grids[norm], seeds) for norm in ARMS}
    stable = {norm: [largest_stable_rate(grids[norm], s) for s in seeds] for norm in ARMS}
    log_ratio = [math.log10(b / n) for b, n in zip(stable["batch"], stable["none"], strict=True)]
    best = {norm: best_rate_index(acc[norm]) for norm in ARMS}
    best_diff = np.nan_to_num(acc["batch"][:, best["batch"]], nan=0.0) - np.nan_to_num(
        acc["none"][:, best["none"]], nan=0.0)
    small_diff = acc["batch"][:, 0] - acc["none"][:, 0]
    rates = rates_of(grids["batch"])
    censored = all(r == rates[-1] for r in stable["batch"])
    trains = {norm: [_largest_training_rate(rates, acc[norm][i]) for i in range(len(seeds))] for norm in ARMS}
    half = common.ci95(small_diff)
    claims = [
        LARGER_RATE.verdict(log_ratio, note=(
            f"largest non-diverging rate per seed: BN {_fmt(stable['batch'])}, none {_fmt(stable['none'])}"
            + (f"; BN never diverged on the grid (top {rates[-1]:g}), so its value is a lower bound"
               if censored else "")
            + f"; largest rate that ends at >= {TRAINS_ACC:g} test accuracy (descriptive only; "
              f"a run can stay at chance without diverging): BN {_fmt(trains['batch'])}, none {_fmt(trains['none'])}")),
        BEST_ACCURACY.verdict(list(best_diff), note=(
            f"best rates: BN {rates[best['batch']]:.3g} (accuracy {np.nanmean(acc['batch'][:, best['batch']]):.4f}), "
            f"none {rates[best['none']]:.3g} (accuracy {np.nanmean(acc['none'][:, best['none']]):.4f})")),
        SMALL_RATE.verdict(list(small_diff), note=(
            f"at lr {rates[0]:g}: BN accuracy {_fmt(acc['batch'][:, 0])}, none {_fmt(acc['none'][:, 0])}; "
            f"mean difference {half['mean']:+.4f}, 95% CI half-width {(half['ci95'][1] - half['ci95'][0]) / 2:.4f} "
            f"(n={half['n']}); after {STEPS if not quick else QUICK_STEPS} steps at this rate neither network has "
            "converged")),
    ]
    return claims, {"acc": acc, "stable": stable, "best": best}


def figure(grids: dict, seeds: list[int], acc: dict):
    rates = rates_of(grids["batch"])
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.8))
    colors = {"batch": "C0", "none": "C3"}
    for norm in ARMS:
        a = np.nan_to_num(acc[norm], nan=0.0)
        axes[0].plot(rates, a.mean(axis=0), marker="o", color=colors[norm], label=f"norm={norm} (mean)")
        for row in a:
            axes[0].scatter(rates, row, s=10, color=colors[norm], alpha=0.5)
        frac = [np.mean([diverged(grids[norm][(s, r)]) for s in seeds]) for r in rates]
        axes[1].plot(rates, frac, marker="s", color=colors[norm], label=f"norm={norm}")
        for r, ls in zip(CURVE_RATES, (":", "--", "-"), strict=True):
            m = grids[norm][(seeds[0], r)].metrics[["step", "train/loss"]].dropna()
            axes[2].plot(m["step"], m["train/loss"], ls, color=colors[norm], label=f"{norm}, lr {r:g}")
    axes[0].set(xscale="log", xlabel="learning rate", ylabel="final test accuracy (diverged = 0)",
                title="(a) accuracy after training (dots: seeds)")
    axes[1].set(xscale="log", xlabel="learning rate", ylabel="fraction of seeds diverged",
                title=f"(b) divergence (loss > {MAX_LOSS:g})", ylim=(-0.05, 1.05))
    axes[2].set(yscale="log", xlabel="step", ylabel="training loss", title=f"(c) training loss, seed {seeds[0]}")
    return common.finish_figure(fig, axes)


def report(args, grids, seeds, steps, claims, info):
    acc = info["acc"]
    rows = []
    for j, r in enumerate(rates_of(grids["batch"])):
        row = [f"{r:.3g}"]
        for norm in ARMS:
            n_div = sum(diverged(grids[norm][(s, r)]) for s in seeds)
            row += [float(np.nanmean(acc[norm][:, j])) if n_div < len(seeds) else "diverged", f"{n_div}/{len(seeds)}"]
        rows.append(row)
    lines = [f"Depth-{DEPTH} width-{WIDTH} ReLU MLP (He init) on MNIST digits, batch {BATCH}, plain SGD, "
             f"{steps} steps, seeds {seeds}; divergence = training loss > {MAX_LOSS:g} or non-finite. "
             "Accuracy is the mean over the seeds that did not diverge.", ""]
    lines += common.table(["learning rate", "BN test acc", "BN diverged", "none test acc", "none diverged"], rows)
    lines += ["", "## Claims", ""] + common.claims_table(claims)
    lines += [""] + [f"- `{c['id']}`: {c['note']}" for c in claims]
    common.write_report(NAME, args.results, "Bjorck et al. (2018): batch norm enables larger learning rates",
                        lines, figure(grids, seeds, acc))


def main(argv=None):
    args = common.parse_args(NAME, __doc__, argv)
    seeds = common.seeds(args)
    steps = QUICK_STEPS if args.quick else STEPS
    rates = QUICK_RATES if args.quick else RATES
    grids = {norm: common.run_grid(arm_config(norm, steps), f"{args.workdir}/{norm}", seeds, rates)
             for norm in ARMS}
    claims, info = verdicts(grids, seeds, args.quick)
    report(args, grids, seeds, steps, claims, info)
    common.write_claims(NAME, args, claims)
    return claims


if __name__ == "__main__":
    main()
