"""Santurkar et al. (2018), Def. 2.1 and Fig. 3: batch norm does not reduce gradient-based
internal covariate shift.

    bn-research reproduce santurkar_gradient_ics    # 515 s measured on 2 shared CPU cores (load 5-10), 3 seeds
    python experiments/santurkar_gradient_ics.py --workdir DIR [--quick] [--seeds N]

Claims (criteria fixed below, before any run). The metric of every claim is a per-seed
paired ratio BN / none of a quantity averaged over the hidden layers i >= 1 (layer 0 has
no earlier layer: its ICS is zero by definition) and over all cadence points of training:
  (a) grad_ics_dln_paper_lr1e-6 / (b) grad_ics_dln_paper_lr1e-7: in the paper's deep
      linear network, the relative gradient ICS ||G - G'|| / ||G|| is not reduced by
      batch norm by more than 2x (95% CI of the ratio above 0.5), at each paper rate;
  (c) grad_ics_dln_paper_cos: there, BN's gradients are not closer in direction
      (1 - cos(G, G') ratio, CI above 0.25: for small angles 1 - cos ~ angle^2 / 2, so
      0.25 is the same "not reduced by more than 2x" in angle), at lr 1e-6;
  (d) grad_ics_dln_project: the same as (a) in the project's own deep linear setting;
  (e) grad_ics_dln_project_per_update: there, ICS per unit of shift is not reduced by
      more than 2x either: (||G - G'|| / ||G||) / (||u_{<i}|| / ||theta_{<i}||), the
      relative ICS divided by the relative size of the update of the earlier layers that
      caused it (batch norm changes the effective step eta / ||w||^2, so equal nominal
      learning rates are not equal shifts);
  (f) grad_ics_cnn: the same as (a) in the VGG-style CNN.

Settings (the `ics` probe, bn_research/probes/ics.py, computes G' exactly by Def. 2.1):
  (i)  dln_paper: configs/deep_linear.py:paper (Santurkar et al. 2018, app. A.1(2): 25
       square 10x10 layers fitting a 10x10 Gaussian matrix, 1,000 Gaussian inputs,
       full-batch gradient descent, Glorot init) at the paper's rates 1e-6 and 1e-7 on the
       summed squared error, i.e. 2e-3 and 2e-4 on the framework's 0.5 * mean loss (see
       that file for this and the other choices: A's entry variance 1/10, biases without
       BN, BN with gamma/beta on every hidden layer); 2,000 steps instead of the paper's
       10,000 (runtime budget: at the ~13 steps/s observed for one arm's 6 replicas on the
       shared 2-core machine, 10,000 steps of both arms would take ~25 minutes); ICS every
       50 steps;
  (ii) dln_project: configs/deep_linear.py defaults (10 hidden layers of 100 units, 100
       inputs, noisy teacher, batch 128, SGD lr 0.01), 1,000 steps instead of 2,000 for the
       runtime budget; ICS every 50 steps;
  (iii) cnn: configs/cnn.py with width 8 (channels 8, 8, 16, 16) on the MNIST digits,
       momentum SGD lr 0.05 with cosine decay, 300 steps; ICS every 25 steps.
Each arm trains all its seeds (and in (i) both rates) as vectorized replicas of one
compiled program. The seed changes the initialization and the batch order, not the data
(the Gaussian teacher and inputs are fixed by dataset.seed = 0). The paper shows layers
#9 and #17 of the DLN; here ICS is averaged over all layers, and the figure shows those two.
"""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np

from experiments import common

NAME = "santurkar_gradient_ics"
PAPER = "Santurkar et al. 2018"
ARMS = ("batch", "none")  # model.norm of the two arms
PAPER_RATES = (1e-6, 1e-7)  # Santurkar et al. 2018, Fig. 3(b), on the summed squared error
PAPER_LAYERS = ("dense_8", "dense_16")  # the paper's layers #9 and #17 (1-indexed)
# setting -> (config file, config arg, overrides, steps, quick steps, ICS cadence)
SETTINGS = {
    "dln_paper": ("deep_linear.py", "paper", {}, 2000, 40, 50),  # 2,000 of the paper's 10,000 steps
    "dln_project": ("deep_linear.py", "", {}, 1000, 20, 50),
    "cnn": ("cnn.py", "width=8", {}, 300, 10, 25),
}
# --quick: shallower, narrower networks (compile time), same claims
QUICK = {"dln_paper": {"model.depth": 4}, "dln_project": {"model.depth": 3, "model.width": 16},
         "cnn": {"model.depth": 2, "model.width": 4}}
NOT_REDUCED = 0.5  # ratio BN / none above this: "not reduced by more than 2x"

ICS_PAPER_HI = common.Claim(
    "grad_ics_dln_paper_lr1e-6", PAPER,
    "In the paper's deep linear network at lr 1e-6, batch norm does not reduce gradient ICS.",
    "relative gradient ICS ||G - G'|| / ||G||, mean over layers 1..23 and steps, ratio BN / none per seed",
    expected=">= 1 (not reduced)", rule=common.above(NOT_REDUCED))
ICS_PAPER_LO = common.Claim(
    "grad_ics_dln_paper_lr1e-7", PAPER,
    "In the paper's deep linear network at lr 1e-7, batch norm does not reduce gradient ICS.",
    "relative gradient ICS ||G - G'|| / ||G||, mean over layers 1..23 and steps, ratio BN / none per seed",
    expected=">= 1 (not reduced)", rule=common.above(NOT_REDUCED))
COS_PAPER = common.Claim(
    "grad_ics_dln_paper_cos", PAPER,
    "In the paper's deep linear network at lr 1e-6, batch norm's G and G' are not closer in direction.",
    "1 - cos(G, G'), mean over layers 1..23 and steps, ratio BN / none per seed",
    expected=">= 1 (not closer)", rule=common.above(NOT_REDUCED ** 2))
ICS_PROJECT = common.Claim(
    "grad_ics_dln_project", PAPER,
    "In the project's deep linear network, batch norm does not reduce gradient ICS.",
    "relative gradient ICS ||G - G'|| / ||G||, mean over layers 1..9 and steps, ratio BN / none per seed",
    expected=">= 1 (not reduced)", rule=common.above(NOT_REDUCED))
PER_UPDATE_PROJECT = common.Claim(
    "grad_ics_dln_project_per_update", PAPER,
    "In the project's deep linear network, batch norm does not reduce gradient ICS per unit of shift "
    "of the earlier layers.",
    "(||G - G'|| / ||G||) / (||u_<i|| / ||theta_<i||), mean over layers 1..9 and steps, ratio BN / none per seed",
    expected=">= 1 (not reduced)", rule=common.above(NOT_REDUCED))
ICS_CNN = common.Claim(
    "grad_ics_cnn", PAPER,
    "In the VGG-style CNN, batch norm does not reduce gradient ICS.",
    "relative gradient ICS ||G - G'|| / ||G||, mean over layers 1..3 and steps, ratio BN / none per seed",
    expected=">= 1 (not reduced)", rule=common.above(NOT_REDUCED))


def arm_config(setting: str, norm: str, quick: bool):
    """The setting's config with the `ics` probe on and every other probe off."""
    file, arg, over, steps, quick_steps, every = SETTINGS[setting]
    steps = quick_steps if quick else steps
    every = max(steps // 4, 1) if quick else every
    arg = ",".join(filter(None, [arg, f"norm={norm}"]))
    over = {**over, **QUICK[setting]} if quick else over
    return common.config(file, arg, **{
        **over, "train.num_steps": steps, "train.log_every": every, "train.eval_every": steps,
        "probes.ics.enabled": True, "probes.ics.every": every, "probes.drift.enabled": False,
        "probes.growth.enabled": False, "probes.weights.enabled": False})


def paper_rates(c) -> list[float]:
    """The paper's rates on the framework's loss (configs/deep_linear.py: paper_rate)."""
    return [r * 2 * c.dataset.num_train for r in PAPER_RATES]


def ics_layers(run) -> list[str]:
    """Hidden layers 1..L-1 in network order (layer 0's ICS is zero by definition)."""
    names = {k.split("/")[1] for k in run.metrics.columns if k.startswith("ics/")}
    return sorted(names, key=lambda n: int(n.rsplit("_", 1)[1]))[1:]


def layer_series(run, stat: str, layers=None) -> tuple[np.ndarray, np.ndarray]:
    """(steps [T], values [T, layers]) of ics/<layer>/<stat> at the probe's cadence points,
    over hidden layers 1..L-1 (or `layers`)."""
    cols = [f"ics/{n}/{stat}" for n in (layers or ics_layers(run))]
    d = run.metrics[["step"] + cols].dropna()
    return d["step"].to_numpy(), d[cols].to_numpy(np.float64)


def summaries(run) -> dict[str, float]:
    """Means over layers 1..L-1 and cadence points (nan for a run that did not complete)."""
    keys = ("rel", "one_minus_cos", "per_update", "update_rel")
    if run.summary.get("status") != "completed":
        return dict.fromkeys(keys, float("nan"))
    rel, cos, shift = (layer_series(run, s)[1] for s in ("grad_diff_rel", "grad_cos", "update_rel"))
    return dict(zip(keys, (float(rel.mean()), float((1.0 - cos).mean()), float((rel / shift).mean()),
                           float(shift.mean())), strict=True))


def train_all(args, seeds):
    """{(setting, lr label): {norm: [run per seed]}}."""
    out = {}
    for norm in ARMS:
        c = arm_config("dln_paper", norm, args.quick)
        grid = common.run_grid(c, f"{args.workdir}/dln_paper/{norm}", seeds, paper_rates(c))
        for paper_lr, lr in zip(PAPER_RATES, paper_rates(c), strict=True):
            out.setdefault(("dln_paper", f"{paper_lr:g}"), {})[norm] = [grid[(s, lr)] for s in seeds]
        for setting in ("dln_project", "cnn"):
            c = arm_config(setting, norm, args.quick)
            out.setdefault((setting, f"{c.optimizer.learning_rate:g}"), {})[norm] = common.run_seeds(
                c, f"{args.workdir}/{setting}/{norm}", seeds)
    return out


def ratios(arms: dict, key: str) -> list[float]:
    b = [summaries(r)[key] for r in arms["batch"]]
    n = [summaries(r)[key] for r in arms["none"]]
    return [x / y for x, y in zip(b, n, strict=True)]


def _fmt(values) -> str:
    return "[" + ", ".join(f"{float(v):.3g}" for v in values) + "]"


def _arm_note(arms: dict, key: str) -> str:
    vals = {norm: [summaries(r)[key] for r in arms[norm]] for norm in ARMS}
    status = {norm: [r.summary.get("status") for r in arms[norm]] for norm in ARMS}
    bad = {n: s for n, s in status.items() if any(x != "completed" for x in s)}
    return (f"BN {_fmt(vals['batch'])}, none {_fmt(vals['none'])} per seed"
            + (f"; run status {bad}" if bad else ""))


def _ratio_note(values: list[float]) -> str:
    """Per-seed ratios, on how many seeds BN's value is at least none's, and their geometric
    mean (descriptive: the criterion is the declared CI of the arithmetic mean)."""
    v = np.asarray(values, np.float64)
    geo = float(np.exp(np.log(v).mean())) if np.all(v > 0) else float("nan")
    return (f"; per-seed ratios {_fmt(v)} (BN >= none on {int(np.sum(v >= 1))}/{len(v)} seeds, "
            f"geometric mean {geo:.3g})")


def verdicts(trained: dict) -> list[dict]:
    hi, lo = trained[("dln_paper", "1e-06")], trained[("dln_paper", "1e-07")]
    project = next(v for k, v in trained.items() if k[0] == "dln_project")
    cnn = next(v for k, v in trained.items() if k[0] == "cnn")
    upd = {k: _arm_note(v, "per_update") for k, v in (("hi", hi), ("project", project))}
    specs = [
        (ICS_PAPER_HI, hi, "rel", f"relative ICS {_arm_note(hi, 'rel')}; per unit of relative shift {upd['hi']}"),
        (ICS_PAPER_LO, lo, "rel", f"relative ICS {_arm_note(lo, 'rel')}"),
        (COS_PAPER, hi, "one_minus_cos", f"1 - cos {_arm_note(hi, 'one_minus_cos')}"),
        (ICS_PROJECT, project, "rel", f"relative ICS {_arm_note(project, 'rel')}"),
        (PER_UPDATE_PROJECT, project, "per_update",
         f"ICS per relative shift {upd['project']}; relative shift {_arm_note(project, 'update_rel')}"),
        (ICS_CNN, cnn, "rel", f"relative ICS {_arm_note(cnn, 'rel')}"),
    ]
    return [claim.verdict(ratios(arms, key), note=note + _ratio_note(ratios(arms, key)))
            for claim, arms, key, note in specs]


COLORS = {"batch": "C0", "none": "C3"}


def _mean_curve(arm_runs, stat, layers=None):
    """(steps, mean over seeds of the layer-averaged stat) over the completed runs."""
    done = [r for r in arm_runs if r.summary.get("status") == "completed"
            and all(f"ics/{n}/{stat}" in r.metrics for n in layers or [])]  # --quick lacks layers #9, #17
    if not done:
        return np.array([]), np.array([])
    series = [layer_series(r, stat, layers) for r in done]
    n = min(len(s[0]) for s in series)
    return series[0][0][:n], np.mean([s[1][:n].mean(axis=1) for s in series], axis=0)


def _against_step(ax, arms, stat, label, ls="-", layers=None):
    for norm in ARMS:
        x, y = _mean_curve(arms[norm], stat, layers)
        ax.plot(x, y, ls, color=COLORS[norm], label=f"norm={norm}{label}")


def _against_shift(ax, arms, label, marker="o"):
    """Relative ICS against the relative shift of the earlier layers, every layer and point."""
    for norm in ARMS:
        for r in arms[norm]:
            if r.summary.get("status") != "completed":
                continue
            x, y = layer_series(r, "update_rel")[1], layer_series(r, "grad_diff_rel")[1]
            ax.scatter(x.ravel(), y.ravel(), s=3, marker=marker, color=COLORS[norm], alpha=0.25,
                       label=f"norm={norm}{label}" if r is arms[norm][0] else None)


def figure(trained: dict):
    hi, lo = trained[("dln_paper", "1e-06")], trained[("dln_paper", "1e-07")]
    project = next(v for k, v in trained.items() if k[0] == "dln_project")
    cnn = next(v for k, v in trained.items() if k[0] == "cnn")
    fig, axes = plt.subplots(2, 3, figsize=(15, 8))
    _against_step(axes[0, 0], hi, "grad_diff_rel", ", lr 1e-6")
    _against_step(axes[0, 0], lo, "grad_diff_rel", ", lr 1e-7", ls="--")
    axes[0, 0].set(yscale="log", title="(a) paper DLN: ||G - G'|| / ||G||, mean of layers 1..23")
    for layer, ls in zip(PAPER_LAYERS, ("-", ":"), strict=True):
        _against_step(axes[0, 1], hi, "grad_cos", f", layer {layer}", ls=ls, layers=[layer])
    axes[0, 1].set(title="(b) paper DLN, lr 1e-6: cos(G, G') of layers #9, #17")
    _against_shift(axes[0, 2], hi, ", lr 1e-6")
    _against_shift(axes[0, 2], lo, ", lr 1e-7", marker="x")
    axes[0, 2].set(xscale="log", yscale="log", xlabel="||u_<i|| / ||theta_<i|| (shift of earlier layers)",
                   ylabel="||G - G'|| / ||G||", title="(c) paper DLN: ICS against the size of the shift")
    _against_step(axes[1, 0], project, "grad_diff_rel", "")
    axes[1, 0].set(yscale="log", title="(d) project DLN: ||G - G'|| / ||G||, mean of layers 1..9")
    _against_step(axes[1, 1], cnn, "grad_diff_rel", "")
    axes[1, 1].set(yscale="log", title="(e) CNN: ||G - G'|| / ||G||, mean of layers 1..3")
    _against_shift(axes[1, 2], project, ", project DLN")
    _against_shift(axes[1, 2], cnn, ", CNN", marker="x")
    axes[1, 2].set(xscale="log", yscale="log", xlabel="||u_<i|| / ||theta_<i|| (shift of earlier layers)",
                   ylabel="||G - G'|| / ||G||", title="(f) project DLN and CNN: ICS against the shift")
    for ax in axes.ravel():
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        if not ax.get_xlabel():
            ax.set_xlabel("step")
    fig.tight_layout()
    return fig


def report(args, trained, claims):
    rows = []
    for (setting, lr), arms in trained.items():
        for norm in ARMS:
            s = [summaries(r) for r in arms[norm]]
            m = {k: float(np.mean([x[k] for x in s])) for k in s[0]}
            loss = float(np.mean([common.last(r, "train/loss") for r in arms[norm]]))
            rows.append([setting, lr, norm, m["rel"], m["one_minus_cos"], m["update_rel"], m["per_update"], loss,
                         f"{sum(r.summary.get('status') == 'completed' for r in arms[norm])}/{len(arms[norm])}"])
    lines = ["Gradient ICS by Def. 2.1 (the `ics` probe). Means over seeds of the mean over hidden layers "
             "1..L-1 and the probe's cadence points. lr is the paper's rate for the paper DLN (on its summed "
             "squared error) and the configured rate otherwise. Shift = ||u_<i|| / ||theta_<i||, the relative "
             "size of the update of the earlier layers.", ""]
    lines += common.table(["setting", "lr", "norm", "||G-G'||/||G||", "1 - cos", "shift", "ICS / shift",
                           "final train loss", "completed"], rows)
    lines += ["", "## Claims", ""] + common.claims_table(claims)
    lines += [""] + [f"- `{c['id']}`: {c['note']}" for c in claims]
    common.write_report(NAME, args.results, "Santurkar et al. (2018): gradient internal covariate shift",
                        lines, figure(trained))


def main(argv=None):
    args = common.parse_args(NAME, __doc__, argv)
    trained = train_all(args, common.seeds(args))
    claims = verdicts(trained)
    report(args, trained, claims)
    common.write_claims(NAME, args, claims)
    return claims


if __name__ == "__main__":
    main()
