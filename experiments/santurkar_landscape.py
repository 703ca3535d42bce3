"""Santurkar et al. (2018), sec. 3.1 and Fig. 4: batch norm smooths the loss landscape.

Claim: along the gradient direction, a batch-normalized network's loss varies less
("loss landscape"), its gradient changes less ("gradient predictiveness"), and its
effective beta-smoothness is lower than without batch norm, throughout training.

    python experiments/santurkar_landscape.py          # ~2 minutes on 2 CPU cores

Runs configs/mlp.py (ReLU here, lr 0.1) with norm=none and norm=batch; the `landscape`
probe evaluates, every 100 steps, the loss and gradient at theta - eta * g for eta in
{0.05, 0.1, 0.2, 0.4} in one vectorized pass: landscape/loss_range (max - min loss over
the grid), landscape/grad_diff_max (max over eta of ||g(theta) - g(theta - eta g)||) and
landscape/beta (max over eta of that change divided by the distance moved, eta ||g||).
The table gives their medians over training.
"""

import matplotlib.pyplot as plt
import numpy as np

from experiments import common

NAME = "santurkar_landscape"
STATS = (("landscape/loss_range", "loss range"), ("landscape/grad_diff_max", "gradient change"),
         ("landscape/beta", "effective beta-smoothness"))


def main():
    args = common.parse_args(NAME, __doc__)
    steps = 500 if args.quick else 2000
    runs_ = {}
    for norm in ("none", "batch"):
        c = common.config("mlp.py", f"norm={norm},activation=relu,lr=0.1",
                          **{"train.num_steps": steps, "probes.landscape.enabled": True,
                             "probes.landscape.every": 100, "probes.drift.enabled": False})
        runs_[norm] = common.run(c, f"{args.workdir}/{norm}")
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    rows = []
    for norm, run in runs_.items():
        row = [norm]
        for ax, (key, label) in zip(axes, STATS, strict=True):
            d = run.metrics[["step", key]].dropna()
            ax.semilogy(d["step"], d[key], marker="o", ms=3, label=f"norm={norm}")
            ax.set(xlabel="step", title=label)
            row.append(float(np.median(d[key])))
        row.append(common.last(run, "eval/accuracy"))
        rows.append(row)
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    lines = [f"configs/mlp.py, ReLU, SGD lr 0.1, {steps} steps; medians over the probe's cadence points.", ""]
    lines += common.table(["norm"] + [label for _, label in STATS] + ["final test acc"], rows)
    common.write_report(NAME, args.results, "Santurkar et al. (2018): loss landscape smoothness", lines, fig)
    return rows


if __name__ == "__main__":
    main()
