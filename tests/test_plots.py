"""plots: every figure function on hand-written runs (tests/test_runs.make_run), seed bands,
colours by variant, legends outside the axes, the backend left alone, and `compare`'s
table, patterns and one-line plot errors."""

import subprocess
import sys

import matplotlib
import numpy as np
import pytest

from bn_research import cli, plots, runs
from tests.test_runs import LAYERS, STEPS, sweep, value

matplotlib.use("Agg")  # the test process renders off screen; the library itself never picks
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.collections import PolyCollection  # noqa: E402


@pytest.fixture
def root(tmp_path):
    sweep(tmp_path / "sweep", norms=("batch", "none"), seeds=(0, 1))
    yield tmp_path / "sweep"
    plt.close("all")


def lines_by_color(ax) -> dict:
    return {matplotlib.colors.to_hex(line.get_color()): line for line in ax.get_lines()}


def assert_legend_outside(fig):
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    boxes = [leg.get_window_extent(renderer) for leg in fig.legends]
    assert boxes, "a figure legend"
    for ax in fig.axes:
        if ax.get_visible():
            assert not any(box.overlaps(ax.get_window_extent(renderer)) for box in boxes)


def test_importing_the_library_leaves_the_backend_alone():
    code = ("import matplotlib; matplotlib.use('svg'); import bn_research.plots, bn_research.runs, bn_research.cli; "
            "assert matplotlib.get_backend() == 'svg', matplotlib.get_backend()")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr


def test_series_mean_and_band_over_seeds(root):
    (g,) = [g for g in runs.group(root) if g.norm == "none"]
    s = plots.series(g, "landscape/beta")
    v = np.array([[value("none", seed, step) for seed in (0, 1)] for step in STEPS])
    assert s["step"].tolist() == list(STEPS)
    np.testing.assert_allclose(s["mean"], v.mean(1))
    np.testing.assert_allclose(s["min"], v.min(1))
    np.testing.assert_allclose(s["max"], v.max(1))
    assert s["n"].tolist() == [2, 2, 2]


def test_learning_curves_one_line_per_config_with_seed_bands(root):
    fig = plots.learning_curves(root)
    axes = [ax for ax in fig.axes if ax.get_visible()]
    assert [ax.get_ylabel() for ax in axes] == ["train/loss", "eval/accuracy"]  # no eval/loss in these runs
    for ax in axes:
        assert ax.get_xlabel() == "step"
        colors = lines_by_color(ax)
        assert set(colors) == {matplotlib.colors.to_hex(plots.VARIANT_COLORS[n]) for n in ("batch", "none")}
        assert sum(isinstance(c, PolyCollection) for c in ax.collections) == 2  # a band per config
    batch = lines_by_color(axes[1])[matplotlib.colors.to_hex(plots.VARIANT_COLORS["batch"])]
    np.testing.assert_allclose(batch.get_ydata(), [np.mean([min(0.99, 0.1 * value("batch", s, t)) for s in (0, 1)])
                                                   for t in STEPS])
    assert_legend_outside(fig)
    assert "norm=batch (2 seeds)" in [t.get_text() for t in fig.legends[0].get_texts()]


def test_unknown_metric_names_close_matches(root):
    with pytest.raises(runs.RunError, match="close matches: eval/accuracy"):
        plots.learning_curves(root, ["eval/acc"])


def test_drift_grid_is_layers_by_stats(root):
    fig = plots.drift(root, stats=("act_in_mean", "act_in_var"), measure="drift_init")
    axes = np.array(fig.axes).reshape(len(LAYERS), 2)
    assert [ax.get_title() for ax in axes[0]] == ["act_in_mean_drift_init", "act_in_var_drift_init"]
    assert axes[2, 0].get_ylabel().startswith("dense_2")
    line = lines_by_color(axes[2, 1])[matplotlib.colors.to_hex(plots.VARIANT_COLORS["none"])]
    np.testing.assert_allclose(line.get_ydata(), [np.mean([value("none", s, t, 1) * 3 for s in (0, 1)]) for t in STEPS])
    assert_legend_outside(fig)
    with pytest.raises(ValueError, match="unknown measure"):
        plots.drift(root, measure="bogus")


def test_percentiles_one_panel_per_config(root):
    fig = plots.percentiles(root)
    assert [ax.get_title() for ax in fig.axes] == ["norm=batch (2 seeds)", "norm=none (2 seeds)"]
    assert "dense_2" in fig.axes[0].get_ylabel()
    assert len(fig.axes[0].get_lines()) == 3
    p50 = fig.axes[1].get_lines()[1]
    np.testing.assert_allclose(p50.get_ydata(), [np.mean([value("none", s, t, 3) + 2 for s in (0, 1)]) for t in STEPS])
    unit = plots.percentiles(root, layer="dense_0", split="train", unit=0)  # per-unit values: only act_in_mean stored
    assert "unit 0" in unit.axes[0].get_ylabel()
    assert_legend_outside(fig)


def test_grad_norm_by_layer_log_scale(root):
    fig = plots.grad_norm_by_layer(root)
    first, last = fig.axes
    assert first.get_yscale() == "log" and first.get_xlabel() == "layer index l"
    assert "initialization (step 1)" in first.get_title() and "step 20" in last.get_title()
    line = lines_by_color(first)[matplotlib.colors.to_hex(plots.VARIANT_COLORS["batch"])]
    assert line.get_xdata().tolist() == [0, 1, 2]
    expected = [np.mean([value("batch", s, 1) for s in (0, 1)]) * 2.0 ** (3 - i) for i in range(3)]
    np.testing.assert_allclose(line.get_ydata(), expected)


def test_landscape_ics_and_weights(root):
    fig = plots.landscape(root, stats=("beta",))
    assert [ax.get_ylabel() for ax in fig.axes if ax.get_visible()] == ["landscape/beta"]
    ics = plots.grad_ics(root, stats=("grad_cos",))
    assert len(ics.axes) == len(LAYERS) - 1  # the first layer has G' = G
    assert ics.axes[0].get_ylabel().startswith("dense_1")
    w = plots.weights(root, stats=("w_norm",), layers=["dense_0"])
    assert len(w.axes) == 1 and w.axes[0].get_title() == "w_norm"
    with pytest.raises(runs.RunError):
        plots.weights(root, stats=("eff_lr",))  # not recorded in these runs


def test_claims_forest():
    claims = [{"id": "a", "criterion": "95% CI lower bound > 0", "holds": True, "expected": "> 0",
               "measured": {"mean": 1.0, "ci95": [0.5, 1.5], "n": 3}},
              {"id": "b", "criterion": "95% CI inside [1, 2]", "holds": False, "expected": "1..2",
               "measured": {"mean": 0.0, "ci95": [-1.0, 1.0], "n": 3}},
              {"id": "c", "criterion": "95% CI upper bound < 1", "holds": True, "expected": "< 1",
               "measured": {"mean": 0.0, "ci95": [float("-inf"), float("inf")], "n": 1}},
              {"id": "d", "criterion": "|mean / expected - 1| <= 0.1", "holds": True, "expected": 2.0,
               "measured": {"mean": 2.1, "ci95": [2.0, 2.2], "n": 3}}]
    fig = plots.claims_forest(claims)
    assert [ax.get_ylabel() for ax in fig.axes] == ["a", "b", "c", "d"]
    assert [plots.criterion_bounds(c) for c in claims[:3]] == [[0.0], [1.0, 2.0], [1.0]]
    assert plots.criterion_bounds(claims[3]) == pytest.approx([2.0, 1.8, 2.2])
    assert "does not hold" in fig.axes[1].get_title(loc="right") and "no CI" in fig.axes[2].get_title(loc="right")
    plt.close(fig)


def test_check_path(tmp_path):
    assert plots.check_path(tmp_path / "a.png") is None
    assert "unknown extension '.pngg'" in plots.check_path(tmp_path / "a.pngg")
    assert "does not exist" in plots.check_path(tmp_path / "no" / "a.png")


def test_compare_cli(root, tmp_path, capsys):
    out = tmp_path / "cmp.png"
    assert cli.main(["bn-research", "compare", str(root.parent), f"--plot={out}"]) == 0
    text = capsys.readouterr().out
    assert "4 runs, 2 configs (differing in model.norm)" in text
    assert max(len(line) for line in text.splitlines()) <= 120
    assert out.stat().st_size > 1000
    rc = cli.main(["bn-research", "compare", str(root), "--metric=eval/acc"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "close matches: eval/accuracy" in err
    assert cli.main(["bn-research", "compare", str(root), "--columns=landscape/*,eval/accuracy"]) == 0
    assert "landscape/beta" in capsys.readouterr().out
    for bad, message in ((tmp_path / "x.pngg", "unknown extension"), (tmp_path / "no" / "x.png", "does not exist")):
        assert cli.main(["bn-research", "compare", str(root), f"--plot={bad}"]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err
    assert cli.main(["bn-research", "compare", str(tmp_path / "nowhere")]) == 2
