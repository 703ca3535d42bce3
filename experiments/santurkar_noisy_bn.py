"""Santurkar et al. (2018), sec. 2: batch norm's benefit does not come from reducing
internal covariate shift.

Claims: (Fig. 2) a network with "noisy" batch norm -- batch norm followed by random,
non-stationary shifts and scalings of every activation -- has far less stable activation
distributions than a standard network, yet trains about as well as batch norm and better
than no normalization; (Fig. 3, Def. 2.1) batch norm does not reduce gradient-based ICS,
||G - G'|| and cos(G, G'), in a deep linear network.

    python experiments/santurkar_noisy_bn.py          # ~3 minutes on 2 CPU cores

Part A: configs/mlp.py with norm=none, batch, noisy_batch (3,000 steps). Distribution
instability is the RMS over units of the step-to-step change of the mean and variance of
the last hidden layer's nonlinearity input on the training batch (the fixed probe batch
sees one fixed noise draw, so it would hide the injected noise)
(dist/dense_2/train/act_in_{mean,var}_drift), averaged over training.
Part B: configs/deep_linear.py (depth 10) with norm=none and batch, the `ics` probe every
100 steps; layer-averaged ||G - G'||/||G|| and cos(G, G') over training.
"""

import matplotlib.pyplot as plt
import numpy as np

from experiments import common

NAME = "santurkar_noisy_bn"


def mean_over_training(run, key):
    col = run.metrics.get(key)
    return float(np.nanmean(col.to_numpy()[1:])) if col is not None else float("nan")


def layer_mean(run, depth, stat):
    cols = [f"ics/dense_{i}/{stat}" for i in range(1, depth)]
    df = run.metrics[["step"] + cols].dropna()
    return df["step"].to_numpy(), df[cols].to_numpy().mean(1)


def main():
    args = common.parse_args(NAME, __doc__)
    steps = 600 if args.quick else 3000
    part_a = {}
    for norm in ("none", "batch", "noisy_batch"):
        c = common.config("mlp.py", f"norm={norm}", **{"train.num_steps": steps, "train.eval_every": steps // 10,
                                                       "train.log_every": steps // 30})
        part_a[norm] = common.run(c, f"{args.workdir}/mlp_{norm}")
    dln_steps = 400 if args.quick else 2000
    part_b = {}
    for norm in ("none", "batch"):
        c = common.config("deep_linear.py", f"norm={norm}",
                          **{"train.num_steps": dln_steps, "probes.ics.enabled": True, "probes.ics.every": 100})
        part_b[norm] = common.run(c, f"{args.workdir}/dln_{norm}")

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for norm, run in part_a.items():
        ev = run.metrics[["step", "eval/accuracy"]].dropna()
        axes[0].plot(ev["step"], ev["eval/accuracy"], marker="o", ms=3, label=norm)
        d = run.metrics[["step", "dist/dense_2/train/act_in_mean_drift"]].dropna()
        axes[1].semilogy(d["step"][1:], d["dist/dense_2/train/act_in_mean_drift"][1:], label=norm)
    axes[0].set(xlabel="step", ylabel="test accuracy", title="(A) MLP test accuracy")
    axes[1].set(xlabel="step", ylabel="RMS change of unit means", title="(A) dense_2 input instability")
    for norm, run in part_b.items():
        s, cos = layer_mean(run, 10, "grad_cos")
        axes[2].plot(s, cos, marker="o", ms=3, label=f"DLN {norm}")
    axes[2].set(xlabel="step", ylabel="cos(G, G'), mean over layers", title="(B) gradient ICS, deep linear")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()

    rows_a = [[norm, float(run.metrics[["eval/accuracy"]].dropna().iloc[0, 0]), common.last(run, "eval/accuracy"),
               mean_over_training(run, "dist/dense_2/train/act_in_mean_drift"),
               mean_over_training(run, "dist/dense_2/train/act_in_var_drift")] for norm, run in part_a.items()]
    rows_b = []
    for norm, run in part_b.items():
        _, diff = layer_mean(run, 10, "grad_diff_rel")
        _, cos = layer_mean(run, 10, "grad_cos")
        rows_b.append([norm, float(np.mean(diff)), float(np.mean(cos)), common.last(run, "eval/loss")])
    lines = [f"Part A: configs/mlp.py, {steps} steps.", ""]
    lines += common.table(["norm", f"test acc @ {steps // 10}", f"test acc @ {steps}",
                           "mean step-to-step change of dense_2 input mean", "... of its variance"], rows_a)
    lines += ["", f"Part B: configs/deep_linear.py (depth 10), {dln_steps} steps, ics probe every 100 steps "
              "(layers 1..9; layer 0 has no layers before it).", ""]
    lines += common.table(["norm", "||G-G'||/||G|| (mean)", "cos(G,G') (mean)", "final test loss"], rows_b)
    common.write_report(NAME, args.results, "Santurkar et al. (2018): noisy batch norm and ICS", lines, fig)
    return rows_a, rows_b


if __name__ == "__main__":
    main()
