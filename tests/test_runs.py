"""runs: tidy per-layer data with the metric names, pattern selection, finding runs under a
directory, grouping seeds, and the compare table. Run directories are written by hand
(`make_run`), so every expected number is known."""

import json

import numpy as np
import pytest

from bn_research import runs
from bn_research.probes import store

LAYERS = ("dense_0", "dense_1", "dense_2")
STEPS = (1, 10, 20)
DIST = ("act_in_mean", "act_in_var", "act_in_p15", "act_in_p50", "act_in_p85")


def value(norm: str, seed: int, step: int, k: int = 0) -> float:
    """A known, positive value per run, step and statistic."""
    return (1.0 + 0.5 * (norm == "batch")) * (1.0 + 0.1 * seed) * (step + 1.0) * (k + 1.0) / 10.0


def make_run(path, norm="batch", seed=0, lr=0.1, steps=STEPS, status="completed", units=4):
    """A run directory as train.train_and_evaluate writes it: config, metrics, summary, per-unit chunk."""
    path.mkdir(parents=True, exist_ok=True)
    config = {"seed": seed, "model": {"name": "mlp", "norm": norm, "depth": len(LAYERS)},
              "optimizer": {"learning_rate": lr}}
    (path / "config.json").write_text(json.dumps(config))
    rows, arrays = [], {}
    for step in steps:
        row = {"step": step, "train/loss": 2.0 / value(norm, seed, step), "train/accuracy": 0.5,
               "eval/accuracy": min(0.99, 0.1 * value(norm, seed, step)), "landscape/beta": value(norm, seed, step),
               "grad/growth_factor": 1.2}
        for i, layer in enumerate(LAYERS):
            for k, stat in enumerate(DIST):
                for split in ("train", "probe"):
                    row[f"dist/{layer}/{split}/{stat}"] = value(norm, seed, step, k) + i
                    row[f"dist/{layer}/{split}/{stat}_drift_init"] = value(norm, seed, step, k) * (i + 1)
            row[f"ics/{layer}/grad_cos"] = 1.0 / (1.0 + value(norm, seed, step, i))
            row[f"grad/{layer}/norm"] = value(norm, seed, step) * 2.0 ** (len(LAYERS) - i)
            row[f"weights/{layer}/w_norm"] = 10 + value(norm, seed, step, i)
        rows.append(row)
    for layer in LAYERS:  # per unit: mean over units = the logged act_in_mean of the train split
        base = np.array([[rows[j][f"dist/{layer}/train/act_in_mean"] for j in range(len(steps))]]).T
        arrays[(layer, "dist/train/act_in_mean")] = base + np.linspace(-1, 1, units)[None]
    arrays[("grid", "landscape/loss")] = np.ones((len(steps), 3))
    store.write_chunk(path, steps[-1], list(steps), arrays, tag="drift")
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (path / "summary.json").write_text(json.dumps({"status": status, "step": steps[-1], "final": rows[-1],
                                                   "steps_per_s": 1000.0 + seed}))
    return path


def sweep(root, norms=("batch", "none"), seeds=(0, 1)):
    return [make_run(root / f"norm={n},seed={s}", n, s) for n in norms for s in seeds]


def test_parse_key():
    assert runs.parse_key("dist/dense_0/probe/act_in_mean") == ("dense_0", "probe", "act_in_mean")
    assert runs.parse_key("ics/dense_1/grad_cos") == ("dense_1", "", "grad_cos")
    assert runs.parse_key("eval/accuracy") == ("", "eval", "accuracy")
    assert runs.parse_key("landscape/beta") == ("", "", "beta")
    assert runs.layer_index("block_12") == 12 and runs.layer_index("grid") == -1


def test_select_by_pattern_is_tidy(tmp_path):
    run = runs.load(make_run(tmp_path / "r", seed=1))
    df = run.select("dist/*/probe/act_in_var_drift_init")
    assert list(df.columns) == runs.TIDY
    assert len(df) == len(LAYERS) * len(STEPS)
    assert set(df["layer"]) == set(LAYERS) and set(df["split"]) == {"probe"}
    assert set(df["stat"]) == {"act_in_var_drift_init"}
    one = df[(df.layer == "dense_2") & (df.step == 10)]["value"]
    assert one.tolist() == [value("batch", 1, 10, 1) * 3]
    both = run.select(["ics/*/grad_cos", "eval/accuracy"])
    assert set(both["key"]) == {"eval/accuracy"} | {f"ics/{n}/grad_cos" for n in LAYERS}
    assert set(both[both.key == "eval/accuracy"]["split"]) == {"eval"}


def test_select_names_close_matches(tmp_path):
    run = runs.load(make_run(tmp_path / "r"))
    with pytest.raises(runs.RunError, match="close matches: eval/accuracy"):
        run.select("eval/acc")
    with pytest.raises(runs.RunError, match=r"close matches: dist/\*/probe/act_in_var_drift_init,"):
        run.select("dist/*/probe/act_in_var_drift_int")


def test_layer_stats_use_the_metric_names(tmp_path):
    run = runs.load(make_run(tmp_path / "r", units=4))
    ls = run.layer_stats
    assert list(ls.columns) == runs.UNIT_TIDY
    assert set(ls["key"]) == {f"dist/{n}/train/act_in_mean" for n in LAYERS} | {"landscape/grid/loss"}
    one = run.select("dist/dense_1/train/act_in_mean", units=True)
    assert set(one["layer"]) == {"dense_1"} and set(one["split"]) == {"train"} and set(one["stat"]) == {"act_in_mean"}
    # the per-unit values average to the logged scalar of the same name
    mean = one.groupby("step")["value"].mean()
    logged = run.select("dist/dense_1/train/act_in_mean").set_index("step")["value"]
    np.testing.assert_allclose(mean.loc[list(STEPS)].to_numpy(), logged.loc[list(STEPS)].to_numpy(), rtol=1e-6)
    grid = run.select("landscape/grid/*", units=True)
    assert set(grid["layer"]) == {"grid"} and set(grid["stat"]) == {"loss"} and len(grid) == 3 * len(STEPS)


def test_find_searches_parents_and_sweep_roots(tmp_path):
    made = sweep(tmp_path / "sweep")
    make_run(tmp_path / "other" / "deep" / "run")
    (tmp_path / "empty").mkdir()
    assert runs.find(tmp_path / "sweep") == sorted(made)
    found = runs.find([tmp_path])
    assert len(found) == 5 and not any(p.name in ("layer_stats", "checkpoints") for p in found)
    assert runs.find([made[0], made[0], tmp_path / "sweep"]) == [made[0], *sorted(made[1:])]  # no duplicates
    with pytest.raises(runs.RunError, match="does not exist"):
        runs.find([tmp_path / "nowhere"])
    with pytest.raises(runs.RunError, match="no runs under"):
        runs.find([tmp_path / "empty"])


def test_group_labels_by_varying_keys(tmp_path):
    made = sweep(tmp_path, norms=("batch", "none", "weight"))
    groups = runs.group(made)
    assert [g.label for g in groups] == ["norm=batch", "norm=none", "norm=weight"]
    assert [g.seeds for g in groups] == [[0, 1]] * 3
    make_run(tmp_path / "lr", "batch", 0, lr=0.5)
    labels = [g.label for g in runs.group(tmp_path)]
    assert labels == ["norm=batch,learning_rate=0.5", "norm=batch,learning_rate=0.1", "norm=none,learning_rate=0.1",
                      "norm=weight,learning_rate=0.1"]  # dotted-key order; directories in sorted order


def test_compare_aggregates_distinct_seeds(tmp_path):
    made = sweep(tmp_path / "s", norms=("batch", "none"), seeds=(0, 1, 2))
    table = runs.compare(tmp_path / "s")
    assert table["run"].tolist() == ["norm=batch", "norm=none"]
    assert table["seeds"].tolist() == [3, 3] and table["step"].tolist() == [20, 20]
    acc = [min(0.99, 0.1 * value("none", s, 20)) for s in (0, 1, 2)]
    row = table.set_index("run").loc["norm=none"]
    assert row["eval/accuracy"] == pytest.approx(np.mean(acc))
    assert row["eval/accuracy std"] == pytest.approx(np.std(acc, ddof=1))
    # the same directory twice is one run; a copy of a run is a second run of the same seed
    again = runs.compare([made[0], made[0]])
    assert again["seeds"].tolist() == [1] and again["runs"].tolist() == [1]
    make_run(tmp_path / "copy", "batch", 0)
    copies = runs.compare([made[0], tmp_path / "copy"])
    assert copies["seeds"].tolist() == [1] and copies["runs"].tolist() == [2]


def test_compare_columns_by_pattern(tmp_path):
    sweep(tmp_path)
    table = runs.compare(tmp_path, columns=["ics/*/grad_cos", "landscape/beta"])
    metrics = [c for c in table.columns if "/" in c and not c.endswith(" std")]
    assert metrics == [f"ics/{n}/grad_cos" for n in LAYERS] + ["landscape/beta"]
    with pytest.raises(runs.RunError, match="no metric matches 'landscape/bta'; close matches: landscape/beta"):
        runs.compare(tmp_path, columns=["landscape/bta"])


def test_format_table_is_compact(tmp_path):
    sweep(tmp_path, norms=("batch", "none", "weight"))
    text = runs.format_table(runs.compare(tmp_path))
    lines = text.splitlines()
    assert lines[0].split() == ["run", "seeds", "status", "step", "train/loss", "eval/accuracy", "steps/s"]
    assert lines[1].split()[:4] == ["norm=batch", "2", "completed", "20"]  # integer step, distinct seeds
    acc = [min(0.99, 0.1 * value("batch", s, 20)) for s in (0, 1)]
    assert f"{np.mean(acc):.4g} ± {np.std(acc, ddof=1):.2g}" in lines[1]
    wide = runs.format_table(runs.compare(tmp_path, columns=["dist/*/probe/*"]))
    assert max(len(line) for line in wide.splitlines()) <= 120
    blocks = wide.split("\n\n")
    assert len(blocks) > 3 and all(b.startswith("run") for b in blocks)  # each block repeats the run label
