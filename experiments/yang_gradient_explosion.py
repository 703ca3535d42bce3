"""Yang et al. (2019): batch norm makes gradients explode with depth at initialization.

Claim: in a deep batch-normalized ReLU network without skip connections, the squared
gradient norm of layer l grows geometrically towards the input, by a factor that mean
field theory gives as pi / (pi - 1) = 1.467 per layer for ReLU (large width and batch),
and that no choice of init removes. Without batch norm (He init) the factor is ~1.

    python experiments/yang_gradient_explosion.py          # ~1 minute on 2 CPU cores

Measured with the `growth` probe at step 0 (per-layer ||dL/dW_l||) of 32-layer MLPs of
width 512 on a batch of 512 MNIST digits; the factor is the least-squares fit of
log ||g_l||^2 over the interior layers 2..29 (the first and last layers see the input and
the head and sit off the geometric law).
"""

import math

import matplotlib.pyplot as plt
import numpy as np

from experiments import common

NAME = "yang_gradient_explosion"
THEORY = math.pi / (math.pi - 1)


def grad_norms(run, depth):
    row = run.metrics.iloc[0]
    return np.array([row[f"grad/dense_{i}/norm"] for i in range(depth)])


def interior_factor(norms):
    layers = np.arange(len(norms))[2:-2]
    slope = np.polyfit(layers, np.log(norms[2:-2] ** 2), 1)[0]
    return float(np.exp(-slope))


def main():
    args = common.parse_args(NAME, __doc__)
    depth, width, batch = (16, 128, 128) if args.quick else (32, 512, 512)
    variants = {
        "batch": {"model.norm": "batch"},
        "none (He init)": {"model.norm": "none", "model.init_scale": math.sqrt(2.0)},
        "batch + residual": {"model.norm": "batch", "model.residual": True},
    }
    rows, curves = [], {}
    for label, over in variants.items():
        c = common.config(
            "mlp.py", f"depth={depth},width={width},activation=relu",
            **{"train.batch_size": batch, "train.num_steps": 1, "train.log_every": 1,
               "train.eval_every": 1, "probes.drift.enabled": False, "probes.weights.enabled": False},
            **over)
        run = common.run(c, f"{args.workdir}/{label.split()[0]}{'_res' if 'residual' in label else ''}")
        norms = grad_norms(run, depth)
        curves[label] = norms
        rows.append([label, interior_factor(norms), float(run.metrics.iloc[0]["grad/growth_factor"])])
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, norms in curves.items():
        ax.semilogy(np.arange(depth), norms**2, marker="o", ms=3, label=label)
    ref = curves["batch"][depth // 2] ** 2 * THEORY ** (depth // 2 - np.arange(depth))
    ax.semilogy(np.arange(depth), ref, "k--", lw=1, label=f"theory: x{THEORY:.3f} per layer")
    ax.set_xlabel("layer l (0 = input side)")
    ax.set_ylabel("||dL/dW_l||^2 at init")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    lines = [f"ReLU MLP, depth {depth}, width {width}, batch {batch}, MNIST digits, step 0.",
             f"Theory (Yang et al. 2019, ReLU, batch norm): pi/(pi-1) = {THEORY:.4f} per layer.", ""]
    lines += common.table(["variant", "growth factor (layers 2..L-3)", "growth factor (probe, all layers)"], rows)
    common.write_report(NAME, args.results, "Gradient explosion at init (Yang et al. 2019)", lines, fig)
    return rows


if __name__ == "__main__":
    main()
