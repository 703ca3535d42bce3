"""Santurkar et al. (2018), sec. 2.1 and Fig. 2: batch norm with injected distributional
instability ("noisy" batch norm) still trains well, so its benefit does not come from
stable layer-input distributions.

    bn-research reproduce santurkar_noisy_bn      # ~4 minutes on 2 CPU cores, 3 seeds (231 s measured)
    python experiments/santurkar_noisy_bn.py --workdir DIR [--quick] [--seeds N]

Claims (criteria fixed below before any run; per-seed paired quantities, 95% CI over seeds):
- noisy_bn_less_stable_than_standard: noisy batch norm's nonlinearity inputs move more from
  step to step than the standard network's (ratio of the per-step instability, CI > 1);
- noisy_bn_accuracy_as_bn: noisy batch norm's final test accuracy is within 2 points of
  batch norm's (difference CI inside [-0.02, 0.02]);
- noisy_bn_faster_than_standard: noisy batch norm's test accuracy at the first evaluation
  (1/10 of training) is above the standard network's (difference CI > 0);
- noise_without_bn_does_not_train: the same noise without batch norm prevents training
  (final test accuracy CI < 0.2, chance 0.1; a diverged run counts as chance);
- noise_without_bn_degrades_training: the noise costs the network without batch norm at
  least 5 points more final test accuracy than it costs the network with it.

Arms (every arm 3 seeds, trained as vectorized replicas): `none` (the standard network),
`batch`, `noisy_batch` (batch norm + the noise of the paper's App. A.2.1, Alg. 1: per
step, layer and unit mu ~ U(-0.5, 0.5), sigma ~ U(1, 1.25); per example and unit
m ~ U(mu +- 0.1), s ~ N(sigma, 0.1); a <- s a + m) and `noisy_none` (the same noise on the
network without batch norm, the paper's control).

Protocol and the choices made where the paper is silent or out of reach:
- The paper trains a VGG on CIFAR-10 (SGD, fixed learning rate 0.1, batch 128, 15,000
  steps). CIFAR-10 is not available offline, and the project's VGG-style CNN trains
  ~15x slower per step than an MLP as vectorized replicas on this CPU (0.7 vs 11 steps/s
  measured under load), which does not fit 4 arms x 3 seeds in the budget. So: configs/mlp.py
  made VGG-like in what matters here: ReLU, 6 hidden layers (noise compounds with depth)
  of 100 units, batch norm before the nonlinearity, plain SGD at a fixed rate 0.1, batch
  128 (the paper's optimizer settings), 1,500 steps (48 epochs of the 4,000 digits).
- r_sigma = 0.1 read as the standard deviation of N(sigma, r_sigma) (norm.noise_r_sigma_is;
  the paper does not say); the noise acts on the output of the batch-norm layer, after
  gamma and beta ("injected after BatchNorm layers"; norm.noise_after_affine).
- Instability, per step and in units of each unit's standard deviation (this project's
  definition, not a number from the paper): for every hidden layer and unit, the batch
  mean of the nonlinearity's input on the training batch (noise included: it is what the
  next layer sees) at consecutive steps t-1, t; |mu_t - mu_{t-1}| / sd_{t-1}, averaged
  over units, layers and steps (drift probe every step, `dist/<layer>/train/act_in_*`).
  It includes batch-to-batch sampling noise, which every arm shares.
"""

import math
import sys
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np

if __package__ in (None, ""):  # `python experiments/santurkar_noisy_bn.py`: the repository on the path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from experiments import common  # noqa: E402
from experiments.common import Claim, above, below, between  # noqa: E402

NAME = "santurkar_noisy_bn"
PAPER = "Santurkar et al. 2018, sec. 2.1, Fig. 2"
ARMS = ("none", "batch", "noisy_batch", "noisy_none")
DEPTH, WIDTH = 6, 100  # hidden layers x units (ReLU)
STEPS, QUICK_STEPS = 1500, 20  # training steps; evaluation every 1/10 of them
QUICK_DEPTH, QUICK_WIDTH = 2, 16  # --quick: a smoke test of the same claims
LEARNING_RATE, BATCH = 0.1, 128  # the paper's VGG settings (App. A.1(1)): plain SGD, fixed rate
CHANCE = 0.1  # ten digit classes; the accuracy counted for a diverged run
EPS = 1e-8  # guards the division by a unit's standard deviation
WINDOW = 60  # the figure's percentile panel shows the last this many steps, every step
PERCENTILE_SAMPLES = 32  # the figure's percentiles over every 4th example (all 128 cost 40% of the step time)

INSTABILITY = Claim(
    "noisy_bn_less_stable_than_standard", PAPER,
    "With the injected noise, batch norm's nonlinearity inputs move more from step to step than "
    "those of the standard network (no batch norm).",
    "paired ratio noisy_batch / none of the per-step instability (mean over hidden layers, units and "
    "consecutive steps of |change of the unit's training-batch mean| / the unit's batch std)",
    expected="> 1", rule=above(1.0))
AS_BN = Claim(
    "noisy_bn_accuracy_as_bn", PAPER,
    "Noisy batch norm reaches the final test accuracy of batch norm (within 2 points).",
    "paired difference of final test accuracy, noisy_batch - batch", expected=0.0, rule=between(-0.02, 0.02))
FASTER = Claim(
    "noisy_bn_faster_than_standard", PAPER,
    "Noisy batch norm still trains faster than the standard network: higher test accuracy at the "
    "first evaluation, 1/10 of training.",
    "paired difference of test accuracy at the first evaluation, noisy_batch - none", expected="> 0",
    rule=above(0.0))
NO_TRAIN = Claim(
    "noise_without_bn_does_not_train", "Santurkar et al. 2018, sec. 2.1",
    "The same noise added to the network without batch norm prevents it from training entirely "
    "('trains' = final test accuracy of at least 0.2, twice chance).",
    "final test accuracy of noisy_none (a diverged run counts as chance, 0.1)", expected="< 0.2",
    rule=below(0.2))
DEGRADES = Claim(
    "noise_without_bn_degrades_training", "Santurkar et al. 2018, sec. 2.1",
    "The noise costs the network without batch norm at least 5 points more final test accuracy than "
    "it costs the network with batch norm.",
    "paired (none - noisy_none) - (batch - noisy_batch) of final test accuracy", expected="> 0.05",
    rule=above(0.05))


def arm_config(norm: str, quick: bool):
    steps = QUICK_STEPS if quick else STEPS
    depth, width = (QUICK_DEPTH, QUICK_WIDTH) if quick else (DEPTH, WIDTH)
    return common.config("mlp.py", f"norm={norm},activation=relu,depth={depth},width={width}", **{
        "optimizer.name": "sgd", "optimizer.learning_rate": LEARNING_RATE, "optimizer.schedule": "constant",
        "train.batch_size": BATCH, "train.num_steps": steps, "train.eval_every": steps // 10,
        "train.log_every": steps // 10, "train.checkpoint_every": 0,
        "probes.drift.every": 1, "probes.drift.probe_batch": False,  # every step, on the training batch
        "probes.drift.percentile_samples": PERCENTILE_SAMPLES,  # means and variances use the whole batch
        "probes.growth.enabled": False, "probes.weights.enabled": False})


# --------------------------------------------------------------------------------------
# Measurements of one run


def unit_series(run, layer: str, stat: str) -> np.ndarray:
    """[steps, units] of a per-unit drift statistic on the training batch, in step order."""
    df = run.layer_stats
    d = df[df["key"] == f"dist/{layer}/train/{stat}"]
    return d.pivot(index="step", columns="unit", values="value").sort_index().to_numpy(np.float64)


def instability(run, layers) -> tuple[float, float, np.ndarray]:
    """(mean |d mean| / sd, mean |d sd| / sd, per-step mean-instability curve), every
    average over hidden layers and units; consecutive recorded steps (every step)."""
    d_mean, d_sd = [], []
    for layer in layers:
        mean = unit_series(run, layer, "act_in_mean")
        sd = np.sqrt(unit_series(run, layer, "act_in_var"))
        d_mean.append(np.abs(np.diff(mean, axis=0)) / (sd[:-1] + EPS))
        d_sd.append(np.abs(np.diff(sd, axis=0)) / (sd[:-1] + EPS))
    curve = np.mean([d.mean(1) for d in d_mean], axis=0)
    return float(curve.mean()), float(np.mean([d.mean() for d in d_sd])), curve


def accuracies(run) -> tuple[np.ndarray, np.ndarray]:
    ev = run.metrics[["step", "eval/accuracy"]].dropna()
    return ev["step"].to_numpy(), ev["eval/accuracy"].to_numpy()


def final_accuracy(run) -> float:
    """Final test accuracy; a diverged run (non-finite or huge loss) counts as chance."""
    if run.summary.get("status") == "diverged":
        return CHANCE
    return common.last(run, "eval/accuracy")


def first_accuracy(run) -> float:
    """Test accuracy at the first evaluation; chance if the run diverged before it."""
    _, acc = accuracies(run)
    return float(acc[0]) if len(acc) else CHANCE


# --------------------------------------------------------------------------------------
# Claims, report


def verdicts(m: dict) -> list[dict]:
    """The declared claims on the per-seed measurements `m[arm][quantity]` (lists over seeds)."""
    ratio = [a / b for a, b in zip(m["noisy_batch"]["instab"], m["none"]["instab"], strict=True)]
    gap_bn = [a - b for a, b in zip(m["noisy_batch"]["final"], m["batch"]["final"], strict=True)]
    early = [a - b for a, b in zip(m["noisy_batch"]["first"], m["none"]["first"], strict=True)]
    cost = [(n - nn) - (b - nb) for n, nn, b, nb in zip(m["none"]["final"], m["noisy_none"]["final"],
                                                        m["batch"]["final"], m["noisy_batch"]["final"], strict=True)]

    def mean(arm, q):
        return float(np.mean(m[arm][q]))

    def rounded(arm, q):
        return np.round(m[arm][q], 4).tolist()

    return [
        INSTABILITY.verdict(ratio, note=(
            f"per-step instability (|d mean|/sd): none {mean('none', 'instab'):.3g}, batch "
            f"{mean('batch', 'instab'):.3g}, noisy_batch {mean('noisy_batch', 'instab'):.3g}, noisy_none "
            f"{mean('noisy_none', 'instab'):.3g}; |d sd|/sd: none {mean('none', 'instab_sd'):.3g}, noisy_batch "
            f"{mean('noisy_batch', 'instab_sd'):.3g}")),
        AS_BN.verdict(gap_bn, note=f"final test accuracy: batch {mean('batch', 'final'):.4f}, noisy_batch "
                                   f"{mean('noisy_batch', 'final'):.4f}"),
        FASTER.verdict(early, note=(
            f"test accuracy at the first evaluation (evaluation mode: noise off, running statistics) per seed: "
            f"none {rounded('none', 'first')}, noisy_batch {rounded('noisy_batch', 'first')}; "
            f"in training mode (noise on), mean training loss over the first tenth of training "
            f"{mean('noisy_batch', 'train_loss_first'):.3f} vs none {mean('none', 'train_loss_first'):.3f}, "
            f"training accuracy {mean('noisy_batch', 'train_acc_first'):.3f} vs {mean('none', 'train_acc_first'):.3f} "
            f"(batch {mean('batch', 'train_loss_first'):.3f}, {mean('batch', 'train_acc_first'):.3f}); the evaluated "
            "network is noise-free while training saw the noise")),
        NO_TRAIN.verdict(m["noisy_none"]["final"], note=(
            f"noisy_none final test accuracy per seed {rounded('noisy_none', 'final')}; "
            f"diverged seeds: {m['noisy_none']['diverged']}; none reaches {mean('none', 'final'):.4f}. The network "
            f"outgrows the additive noise: the median per-unit std of the last hidden layer's pre-noise input rises "
            f"from {mean('noisy_none', 'sd_first'):.3g} at step 1 to {mean('noisy_none', 'sd_final'):.3g} at the end "
            f"(none: {mean('none', 'sd_first'):.3g} to {mean('none', 'sd_final'):.3g}) against shifts |mu| <= 0.5; the "
            f"noise still costs fit: final training loss {mean('noisy_none', 'train_loss_final'):.3g} vs none "
            f"{mean('none', 'train_loss_final'):.3g}")),
        DEGRADES.verdict(cost, note=(
            f"cost of the noise in final test accuracy: without batch norm "
            f"{mean('none', 'final') - mean('noisy_none', 'final'):.4f}, with batch norm "
            f"{mean('batch', 'final') - mean('noisy_batch', 'final'):.4f}; in final training loss: without "
            f"{mean('noisy_none', 'train_loss_final') - mean('none', 'train_loss_final'):.3g}, with "
            f"{mean('noisy_batch', 'train_loss_final') - mean('batch', 'train_loss_final'):.3g}")),
    ]


def figure(runs_, m, layers):
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.8))
    for arm in ARMS:
        steps, _ = accuracies(runs_[arm][0])
        accs = [accuracies(r)[1] for r in runs_[arm]]
        n = min(len(a) for a in accs)
        axes[0].plot(steps[:n], np.mean([a[:n] for a in accs], 0), marker="o", ms=3, label=arm)
        curves = [c for c in m[arm]["curve"] if c is not None]
        if not curves:  # every seed diverged: no instability curve
            continue
        curve = np.mean(curves, 0)
        k = max(1, len(curve) // 60)  # moving average over k steps, for legibility
        smooth = np.convolve(curve, np.ones(k) / k, mode="valid")
        axes[1].semilogy(np.arange(len(smooth)) + k, smooth, label=arm)
    axes[0].set(xlabel="step", ylabel="test accuracy (mean over seeds)", title="test accuracy")
    axes[1].set(xlabel="step", ylabel="|d mean| / sd per step", title="instability of nonlinearity inputs")
    last = layers[-1]
    for arm, color in (("none", "C0"), ("noisy_batch", "C2")):
        run = runs_[arm][0]
        for p, style in (("p15", ":"), ("p50", "-"), ("p85", ":")):
            series = unit_series(run, last, f"act_in_{p}")[-WINDOW:, 0]
            if series.size:
                label = {"p15": f"{arm} p15, p85", "p50": f"{arm} p50"}.get(p)
                steps = np.arange(len(series)) + int(run.summary.get("step", len(series))) - len(series) + 1
                axes[2].plot(steps, series, style, color=color, lw=1.0, marker=".", ms=2, label=label)
    axes[2].set(xlabel="step", ylabel="nonlinearity input of unit 0",
                title=f"{last}, unit 0: 15/50/85th percentiles, last {WINDOW} steps (seed 0)")
    return common.finish_figure(fig, axes)


def report(args, runs_, m, layers, claims):
    steps = int(runs_["none"][0].config["train"]["num_steps"])
    first = steps // 10

    def ci(values):
        c = common.ci95(values)
        return f"{c['mean']:.4g} [{common.fmt_num(c['ci95'][0])}, {common.fmt_num(c['ci95'][1])}]"

    rows = [[arm, ci(m[arm]["train_loss_first"]), ci(m[arm]["first"]), ci(m[arm]["final"]), ci(m[arm]["instab"]),
             ci(m[arm]["instab_sd"]), str(m[arm]["diverged"])] for arm in ARMS]
    depth, width = len(layers), int(runs_["none"][0].config["model"]["width"])
    lines = [f"configs/mlp.py made VGG-like: ReLU, {depth} x {width}, SGD lr {LEARNING_RATE} fixed, batch {BATCH}, "
             f"{steps} steps, {len(runs_['none'])} seeds per arm (mean and 95% CI over seeds). Instability: "
             "per step, per unit, |change of the training-batch mean of the nonlinearity input| / its std, "
             "averaged over units, hidden layers and steps; same for the std.", ""]
    lines += common.table(["arm", f"train loss, mean of steps 1-{first}", f"test acc @ {first}", f"test acc @ {steps}",
                           "mean abs. change of mean / sd, per step", "same, of sd", "diverged seeds"], rows)
    lines += ["", "## Claims", ""] + common.claims_table(claims)
    lines += ["", "Notes:", ""] + [f"- `{c['id']}`: {c['note']}" for c in claims]
    fig = figure(runs_, m, layers)
    common.write_report(NAME, args.results, "Santurkar et al. (2018): noisy batch norm", lines, fig)
    plt.close(fig)


def first_and_last(run, key) -> tuple[float, float]:
    """A logged metric at its first and last row (nan if absent)."""
    col = run.metrics.get(key)
    col = col.dropna() if col is not None else None
    if col is None or col.empty:
        return math.nan, math.nan
    return float(col.iloc[0]), float(col.iloc[-1])


def pre_noise_sd(run, layer) -> tuple[float, float]:
    """Median over units of the std of a layer's normalization (= noise) input on the
    training batch, at the first and the last step: the signal the additive noise meets."""
    sd = np.sqrt(unit_series(run, layer, "norm_in_var"))
    return (float(np.median(sd[0])), float(np.median(sd[-1]))) if sd.size else (math.nan, math.nan)


def measure(runs_arm, layers) -> dict:
    """Per-seed lists of every quantity of the claims, the table and the notes."""
    out = {"instab": [], "instab_sd": [], "curve": [], "final": [], "first": [], "diverged": [],
           "train_loss_first": [], "train_loss_final": [], "train_acc_first": [], "sd_first": [], "sd_final": []}
    for seed, run in enumerate(runs_arm):
        for q, (a, b) in (("train_loss", first_and_last(run, "train/loss")),
                          ("sd", pre_noise_sd(run, layers[-1]))):
            out[f"{q}_first"].append(a)
            out[f"{q}_final"].append(b)
        out["train_acc_first"].append(first_and_last(run, "train/accuracy")[0])
        if run.summary.get("status") == "diverged":
            out["diverged"].append(seed)
            inst, inst_sd, curve = math.nan, math.nan, None
        else:
            inst, inst_sd, curve = instability(run, layers)
        out["instab"].append(inst)
        out["instab_sd"].append(inst_sd)
        out["curve"].append(curve)
        out["final"].append(final_accuracy(run))
        out["first"].append(first_accuracy(run))
    return out


def main(argv=None):
    args = common.parse_args(NAME, __doc__, argv)
    seed_list = common.seeds(args)
    runs_ = {arm: common.run_seeds(arm_config(arm, args.quick), f"{args.workdir}/{arm}", seed_list) for arm in ARMS}
    depth = QUICK_DEPTH if args.quick else DEPTH
    layers = [f"dense_{i}" for i in range(depth)]
    m = {arm: measure(runs_[arm], layers) for arm in ARMS}
    claims = verdicts(m)
    report(args, runs_, m, layers, claims)
    common.write_claims(NAME, args, claims)
    return claims


if __name__ == "__main__":
    main()
