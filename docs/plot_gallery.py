"""Writes docs/plots/*.png: one figure per function of bn_research.plots, from the runs the
notebooks leave under runs/ (run notebooks/ics_explorer.ipynb and
notebooks/landscape_and_gradients.ipynb first) and experiments/results/claims.json.

    python docs/plot_gallery.py
"""

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # a script: no display

from bn_research import plots  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
ICS, LANDSCAPE = ROOT / "runs" / "notebook_ics", ROOT / "runs" / "notebook_landscape"
OUT = ROOT / "docs" / "plots"

FIGURES = {
    "learning_curves": lambda: plots.learning_curves(ICS),
    "drift": lambda: plots.drift(ICS, stats=("norm_in_var", "act_in_mean", "act_in_var")),
    "percentiles": lambda: plots.percentiles(ICS),
    "grad_norm_by_layer": lambda: plots.grad_norm_by_layer(LANDSCAPE),
    "landscape": lambda: plots.landscape(LANDSCAPE),
    "grad_ics": lambda: plots.grad_ics(LANDSCAPE, layers=["dense_1", "dense_4", "dense_7"]),
    "weights": lambda: plots.weights(LANDSCAPE, layers=["dense_0", "dense_4", "dense_7"]),
    "claims_forest": lambda: plots.claims_forest(
        json.loads((ROOT / "experiments" / "results" / "claims.json").read_text())),
}

if __name__ == "__main__":
    OUT.mkdir(parents=True, exist_ok=True)
    from PIL import Image

    for name, make in FIGURES.items():
        path = OUT / f"{name}.png"
        plots.save(make(), path, dpi=72)
        with Image.open(path) as im:  # 128 colours: a third of the bytes, the same picture
            small = im.convert("RGB").quantize(colors=128, method=Image.Quantize.FASTOCTREE)
        small.save(path, optimize=True)
        print(f"wrote {path.relative_to(ROOT)}")
