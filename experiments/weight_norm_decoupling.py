"""Salimans & Kingma (2016); Kohler et al. (2019): how much of batch norm's benefit does
length-direction decoupling alone give?

Claims: weight normalization (w = g v/||v||), which decouples a layer's length from its
direction without using batch statistics, speeds up training over the plain network, and
with mean-only batch norm comes close to full batch norm (Salimans & Kingma, sec. 4-5).
For scale-invariant weights (a kernel followed by batch norm, or the direction v) the
gradient is orthogonal to the weight, <dL/dw, w> = 0, so SGD only grows ||w|| and the
effective step size eta/||w||^2 falls during training (Kohler et al. 2019, sec. 3).

    python experiments/weight_norm_decoupling.py          # ~2 minutes on 2 CPU cores

Runs configs/mlp.py with norm=none, weight (data-dependent init), weight + mean-only
batch norm, and batch, 3,000 steps each; the `weights` probe records, for layer dense_1,
||w||, eta/||w||^2 (weights/dense_1/eff_lr) and cos(dL/dw, w) (weights/dense_1/grad_w_cos).
"""

import matplotlib.pyplot as plt

from experiments import common

NAME = "weight_norm_decoupling"
VARIANTS = {
    "none": ("norm=none", {}),
    "weight": ("norm=weight", {}),
    "weight + mean-only BN": ("norm=weight", {"norm.wn_mean_only_bn": True}),
    "batch": ("norm=batch", {}),
}


def main():
    args = common.parse_args(NAME, __doc__)
    steps = 600 if args.quick else 3000
    runs_ = {}
    for label, (arg, over) in VARIANTS.items():
        c = common.config("mlp.py", arg, **{"train.num_steps": steps, "train.eval_every": steps // 10,
                                            "train.log_every": steps // 30, **over})
        runs_[label] = common.run(c, f"{args.workdir}/{label.replace(' + ', '_').replace(' ', '_')}")
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    rows = []
    for label, run in runs_.items():
        m = run.metrics
        tl = m[["step", "train/loss"]].dropna()
        axes[0].semilogy(tl["step"], tl["train/loss"], label=label)
        eff = m[["step", "weights/dense_1/eff_lr"]].dropna() if "weights/dense_1/eff_lr" in m else None
        if eff is not None and not eff.empty:
            axes[1].semilogy(eff["step"], eff["weights/dense_1/eff_lr"], label=label)
        wn = m[["step", "weights/dense_1/w_norm"]].dropna()
        axes[2].plot(wn["step"], wn["weights/dense_1/w_norm"], label=label)
        cos = m["weights/dense_1/grad_w_cos"].dropna().abs()
        eff_first = float(eff["weights/dense_1/eff_lr"].iloc[0]) if eff is not None and not eff.empty else float("nan")
        eff_last = float(eff["weights/dense_1/eff_lr"].iloc[-1]) if eff is not None and not eff.empty else float("nan")
        rows.append([label, float(tl["train/loss"].iloc[len(tl) // 10]), common.last(run, "eval/accuracy"),
                     float(cos.max()), eff_first, eff_last])
    axes[0].set(xlabel="step", ylabel="train loss", title="training loss")
    axes[1].set(xlabel="step", ylabel="eta / ||w||^2", title="dense_1 effective step size (scale-invariant)")
    axes[2].set(xlabel="step", ylabel="||w||", title="dense_1 weight norm")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    lines = [f"configs/mlp.py, {steps} steps, SGD lr 0.5; layer dense_1.", "",
             "eta/||w||^2 is recorded only for scale-invariant weights (batch norm after the kernel, "
             "or the weight-norm direction v); max abs cos(dL/dw, w) should be ~0 for those.", ""]
    lines += common.table(["variant", f"train loss @ {steps // 10}", "final test acc", "max abs cos(dL/dw, w)",
                           "eta/||w||^2 first", "eta/||w||^2 last"], rows)
    common.write_report(NAME, args.results, "Length-direction decoupling (Salimans & Kingma 2016; Kohler et al. 2019)",
                        lines, fig)
    return rows


if __name__ == "__main__":
    main()
