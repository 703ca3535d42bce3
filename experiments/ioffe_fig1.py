"""Ioffe & Szegedy (2015), Fig. 1: batch norm trains the MNIST MLP faster and keeps the
distribution of the nonlinearity's input stable.

Claim: (a) with batch norm the test accuracy is higher earlier; (b, c) the 15th, 50th and
85th percentiles of a last-hidden-layer sigmoid input drift over training without batch
norm and stay put with it.

    python experiments/ioffe_fig1.py          # ~1 minute on 2 CPU cores

Runs configs/mlp.py (3 x 100 sigmoid units, batch 60, SGD lr 0.5) with norm=batch and
norm=none for 3,000 steps. The `drift` probe records the percentiles on a fixed probe
batch every 100 steps; the table gives the drift of the unit-averaged percentiles from
initialization at the end of training (dist/dense_2/probe/act_in_p*_drift_init).
"""

import matplotlib.pyplot as plt

from experiments import common

NAME = "ioffe_fig1"
PCTS = ("p15", "p50", "p85")


def main():
    args = common.parse_args(NAME, __doc__)
    steps = 600 if args.quick else 3000
    runs_ = {}
    for norm in ("batch", "none"):
        c = common.config("mlp.py", f"norm={norm}", **{"train.num_steps": steps,
                                                       "train.eval_every": steps // 10,
                                                       "train.log_every": steps // 30})
        runs_[norm] = common.run(c, f"{args.workdir}/{norm}")
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for norm, run in runs_.items():
        m = run.metrics
        ev = m[["step", "eval/accuracy"]].dropna()
        axes[0].plot(ev["step"], ev["eval/accuracy"], marker="o", ms=3, label=f"norm={norm}")
    axes[0].set(xlabel="step", ylabel="test accuracy", title="(a) test accuracy")
    axes[0].legend()
    for ax, norm in zip(axes[1:], ("none", "batch"), strict=True):
        m = runs_[norm].metrics
        for p in PCTS:
            col = f"dist/dense_2/probe/act_in_{p}"
            d = m[["step", col]].dropna()
            ax.plot(d["step"], d[col], label=p)
        ax.set(xlabel="step", ylabel="sigmoid input (mean over units)",
               title=f"({'b' if norm == 'none' else 'c'}) norm={norm}: last hidden layer")
        ax.legend()
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.tight_layout()
    rows = []
    for norm, run in runs_.items():
        acc = run.metrics[["step", "eval/accuracy"]].dropna()
        early = float(acc["eval/accuracy"].iloc[0])
        rows.append([norm, early, common.last(run, "eval/accuracy")]
                    + [common.last(run, f"dist/dense_2/probe/act_in_{p}_drift_init") for p in PCTS])
    lines = [f"configs/mlp.py, {steps} steps; percentiles on the fixed probe batch, layer dense_2.", ""]
    lines += common.table(
        ["norm", f"test acc @ step {steps // 10}", f"test acc @ {steps}"]
        + [f"{p} drift from init (RMS over units)" for p in PCTS], rows)
    common.write_report(NAME, args.results, "Ioffe & Szegedy (2015), Fig. 1", lines, fig)
    return rows


if __name__ == "__main__":
    main()
