"""Salimans & Kingma (2016), sec. 2.2: weight normalization's direction v only grows under
SGD, and its growth shrinks the effective step size (self-stabilization).

    bn-research reproduce weight_norm_decoupling     # ~2 minutes on 2 CPU cores (quick: ~20 s)
    python experiments/weight_norm_decoupling.py --workdir DIR   # the same, runs under DIR

With w = g v/||v||, the gradient wrt v is orthogonal to v, so a plain SGD step
v' = v - eta dL/dv gives ||v'||^2 = ||v||^2 + eta^2 ||dL/dv||^2 exactly (S&K 2016, sec. 2.2),
and the effective step size of the direction, eta/||v||^2, falls as ||v|| grows.

Claims (criteria fixed before the run; hidden layers dense_0..dense_2, per seed):
- wn_sq_norm_identity_sum: over the whole run, ||v_T||^2 - ||v_0||^2 equals
  sum_t eta^2 ||dL/dv_t||^2: max over layers of |ratio - 1| has 95% CI below 1e-4.
- wn_sq_norm_identity_step: per step, the measured growth of ||v||^2 matches
  eta^2 ||dL/dv||^2: max over layers of the median over steps of |ratio - 1| below 1e-2.
  (float32: rounding the stored v' moves ||v'||^2 by ~1e-7 ||v||^2, while a typical step's
  growth is ~1e-6 ||v||^2, so single steps can be off by 10% and the median by ~1e-3.)
- wn_identity_needs_invariance: the control without normalization (plain kernels, not
  scale invariant) does not follow it: the same median relative error above 0.1.
- wn_v_norm_grows: ||v|| grows during training: min over layers of ||v_T||/||v_0|| above 1.
- wn_eff_lr_decreases: the effective step eta/||v||^2 of dense_1 (mean over units) at the
  end over at the start is below 1.

Protocol: configs/mlp.py (MNIST digits, 3 x 100 sigmoid, batch 60), norm=weight with
S&K's v ~ N(0, 0.05^2) (`norm.wn_init_std`, sec. 3) and their data-dependent init of g and
b, plain SGD (no momentum: the identity is for the plain step) at lr 0.5, constant rate,
STEPS steps; the `weights` probe logs every step (`weights/<layer>/sq_norm_growth`, the
step's ||v'||^2 - ||v||^2 computed as 2<v, dv> + ||dv||^2, and `.../sq_norm_growth_sgd`,
eta^2 ||dL/dv||^2). The control (norm=none) logs every 10th step. Choices: learning rate
and step count are the project's MNIST MLP defaults, not the paper's (it trains CIFAR-10
models with Adam, where the identity does not hold exactly).
"""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np

from experiments import common

NAME = "weight_norm_decoupling"
PAPER = "Salimans & Kingma 2016"
STEPS, QUICK_STEPS = 3000, 120  # training steps (full, --quick)
INIT_STD = 0.05  # v ~ N(0, INIT_STD^2) (Salimans & Kingma 2016, sec. 3)
LAYERS = ("dense_0", "dense_1", "dense_2")
EFF_LAYER = "dense_1"  # layer of the effective-step claim
CONTROL_EVERY = 10  # weights probe cadence of the control

SUM = common.Claim(
    "wn_sq_norm_identity_sum", PAPER,
    "Under SGD the squared norm of v grows by exactly the sum of eta^2 ‖dL/dv‖^2 over the steps.",
    "max over layers of |(||v_T||^2 - ||v_0||^2) / sum_t eta^2 ||dL/dv_t||^2 - 1| (numerator: the "
    "per-step growths summed)", 0.0, common.below(1e-4))
STEP = common.Claim(
    "wn_sq_norm_identity_step", PAPER,
    "Every SGD step grows ‖v‖^2 by eta^2 ‖dL/dv‖^2 (the gradient is orthogonal to v).",
    "max over layers of the median over steps of |growth / (eta^2 ||dL/dv||^2) - 1|", 0.0, common.below(1e-2))
CONTROL = common.Claim(
    "wn_identity_needs_invariance", PAPER,
    "Without weight norm (plain kernels) the step's growth of ‖w‖^2 is not eta^2 ‖dL/dw‖^2.",
    "min over layers of the median over steps of |growth / (eta^2 ||dL/dw||^2) - 1| (norm=none)", "> 0.1",
    common.above(0.1))
GROWS = common.Claim(
    "wn_v_norm_grows", PAPER,
    "The norm of the direction parameter v grows during training.",
    "min over layers of ||v_T|| / ||v_0||", "> 1", common.above(1.0))
EFF = common.Claim(
    "wn_eff_lr_decreases", PAPER,
    "The effective step size eta / ‖v‖^2 falls during training (self-stabilization).",
    f"{EFF_LAYER}: mean over units of eta/||v_unit||^2 at the end / at the start", "< 1", common.below(1.0))


def arm_config(norm: str, steps: int):
    return common.config(
        "mlp.py", f"norm={norm}",
        **{"train.num_steps": steps, "train.eval_every": steps // 10, "train.log_every": steps // 30,
           "optimizer.name": "sgd", "optimizer.learning_rate": 0.5, "optimizer.schedule": "constant",
           "norm.wn_init_std": INIT_STD, "probes.weights.every": 1 if norm == "weight" else CONTROL_EVERY,
           "probes.drift.enabled": False, "probes.growth.enabled": False})


def growth_table(run, layer):
    """Rows of the logged steps: measured growth of ||v||^2 and its SGD prediction."""
    cols = [f"weights/{layer}/sq_norm_growth", f"weights/{layer}/sq_norm_growth_sgd"]
    d = run.metrics[["step"] + cols].dropna()
    return d["step"].to_numpy(), d[cols[0]].to_numpy(np.float64), d[cols[1]].to_numpy(np.float64)


def median_rel_error(run, layer) -> float:
    _, got, want = growth_table(run, layer)
    return float(np.median(np.abs(got / want - 1)))


def sum_rel_error(run, layer) -> float:
    _, got, want = growth_table(run, layer)
    return float(abs(got.sum() / want.sum() - 1))


def series(run, key):
    d = run.metrics[["step", key]].dropna()
    return d["step"].to_numpy(), d[key].to_numpy(np.float64)


def v_norm_ratio(run, layer) -> float:
    """||v|| at the last logged step over the first (both before that step's update)."""
    _, v = series(run, f"weights/{layer}/v_norm")
    return float(v[-1] / v[0])


def figure(wn, none):
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.8))
    for layer in LAYERS:
        s, v = series(wn[0], f"weights/{layer}/v_norm")
        axes[0].plot(s, v, label=layer)
        s, e = series(wn[0], f"weights/{layer}/eff_lr")
        axes[1].semilogy(s, e, label=layer)
    for runs_, label, color in ((wn, "weight norm: ||v||^2", "C0"), (none, "no norm: ||w||^2", "C3")):
        _, got, want = growth_table(runs_[0], EFF_LAYER)
        axes[2].loglog(want, np.abs(got), ".", ms=2, color=color, alpha=0.5, label=label)
    lo, hi = axes[2].get_xlim()
    axes[2].plot([lo, hi], [lo, hi], "k--", lw=1, label="growth = eta^2 ||grad||^2")
    axes[0].set(xlabel="step", ylabel="||v||_F", title="direction norm grows (seed 0)")
    axes[1].set(xlabel="step", ylabel="mean eta/||v_unit||^2", title="effective step falls")
    axes[2].set(xlabel="eta^2 ||dL/dv||^2", ylabel="|measured growth of ||v||^2|", title=f"per step, {EFF_LAYER}")
    return common.finish_figure(fig, axes)


def main(argv=None):
    args = common.parse_args(NAME, __doc__, argv)
    steps = QUICK_STEPS if args.quick else STEPS
    wn = common.run_seeds(arm_config("weight", steps), f"{args.workdir}/weight", common.seeds(args))
    none = common.run_seeds(arm_config("none", steps), f"{args.workdir}/none", common.seeds(args))
    per = {k: [] for k in ("sum", "step", "control", "grow", "eff")}
    for r_wn, r_none in zip(wn, none, strict=True):
        per["sum"].append(max(sum_rel_error(r_wn, n) for n in LAYERS))
        per["step"].append(max(median_rel_error(r_wn, n) for n in LAYERS))
        per["control"].append(min(median_rel_error(r_none, n) for n in LAYERS))
        per["grow"].append(min(v_norm_ratio(r_wn, n) for n in LAYERS))
        _, e = series(r_wn, f"weights/{EFF_LAYER}/eff_lr")
        per["eff"].append(float(e[-1] / e[0]))
    fmt = {k: "[" + ", ".join(f"{x:.3g}" for x in v) + "]" for k, v in per.items()}
    claims = [
        SUM.verdict(per["sum"], note=f"per seed {fmt['sum']}; {steps} steps"),
        STEP.verdict(per["step"], note=f"per seed {fmt['step']}"),
        CONTROL.verdict(per["control"], note=f"per seed {fmt['control']}"),
        GROWS.verdict(per["grow"], note=f"per seed {fmt['grow']}"),
        EFF.verdict(per["eff"], note=f"per seed {fmt['eff']}"),
    ]
    rows = []
    for n in LAYERS:
        rows.append([n, float(np.mean([v_norm_ratio(r, n) for r in wn])),
                     float(np.mean([median_rel_error(r, n) for r in wn])),
                     float(np.mean([sum_rel_error(r, n) for r in wn])),
                     float(np.mean([median_rel_error(r, n) for r in none]))])
    lines = [f"configs/mlp.py, norm=weight (v ~ N(0, {INIT_STD}^2), data-dependent g, b), plain SGD lr 0.5, "
             f"{steps} steps, {args.seeds} seeds; control norm=none. Final test accuracy (weight norm): "
             f"{np.mean([common.last(r, 'eval/accuracy') for r in wn]):.3f}.", ""]
    lines += common.table(["layer", "‖v_T‖ / ‖v_0‖", "median per-step rel. error", "whole-run rel. error",
                           "median per-step rel. error, no norm"], rows)
    lines += ["", "## Claims", ""] + common.claims_table(claims)
    common.write_report(NAME, args.results, "Weight norm: ||v|| grows, the effective step falls (Salimans & Kingma "
                        "2016)", lines, figure(wn, none))
    common.write_claims(NAME, args, claims)
    return claims


if __name__ == "__main__":
    main()
