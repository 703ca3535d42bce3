"""End-to-end: train_and_evaluate writes the run directory as DESIGN.md specifies."""

import json

import numpy as np
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from bn_research import norms, rundir, runs, step, train
from tests.conftest import load_config, tiny


def _check_run_dir(workdir, summary, num_steps):
    assert summary["status"] == "completed"
    assert summary["step"] == num_steps
    on_disk = json.loads((workdir / "summary.json").read_text())
    assert on_disk["status"] == "completed"
    for key in ("wall_time_s", "steps_per_s", "versions", "device_kind"):
        assert on_disk[key], key
    assert on_disk["versions"]["jax"] and on_disk["versions"]["flax"] and on_disk["versions"]["optax"]
    config = json.loads((workdir / "config.json").read_text())
    assert config["train"]["num_steps"] == num_steps
    lines = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
    steps = [x["step"] for x in lines]
    assert steps == sorted(set(steps)), "each step once, in order"
    assert steps[-1] == num_steps
    assert all(np.isfinite(x["train/loss"]) for x in lines if "train/loss" in x)
    assert "eval/loss" in lines[-1]
    events = EventAccumulator(str(workdir))
    events.Reload()
    assert "train/loss" in events.Tags()["scalars"]
    assert [e.step for e in events.Scalars("train/loss")] == [s for s in steps if s % 10 == 0]
    return lines


@pytest.mark.parametrize("norm", sorted(norms.NORMS))
def test_every_variant_trains_mlp(tmp_path, norm):
    config = tiny(load_config("mlp", f"norm={norm}"))
    summary = train.train_and_evaluate(config, tmp_path / norm)
    lines = _check_run_dir(tmp_path / norm, summary, 20)
    assert 0.0 <= lines[-1]["eval/accuracy"] <= 1.0


def test_cnn_and_deep_linear_train(tmp_path):
    cnn = tiny(load_config("cnn", "width=8"), steps=10)
    _check_run_dir(tmp_path / "cnn", train.train_and_evaluate(cnn, tmp_path / "cnn"), 10)
    dln = tiny(load_config("deep_linear", "depth=4"), steps=20)
    lines = _check_run_dir(tmp_path / "dln", train.train_and_evaluate(dln, tmp_path / "dln"), 20)
    assert "eval/accuracy" not in lines[-1]


def test_batch_norm_mlp_learns(tmp_path):
    """300 steps of the Ioffe MLP with batch norm beat chance by far on held-out digits."""
    config = load_config("mlp", "norm=batch")
    config.train.num_steps, config.train.eval_every = 300, 300
    summary = train.train_and_evaluate(config, tmp_path / "bn")
    assert summary["final"]["eval/accuracy"] > 0.8


def test_chunked_scan_matches_single_steps(tmp_path):
    """K steps in one lax.scan give the same state as K separate steps."""
    import jax

    config = tiny(load_config("mlp", "norm=noisy_batch"))
    s = train.setup(config)
    chunk = jax.jit(s["fns"].train_chunk, static_argnums=2)
    one = jax.jit(s["fns"].train_step)
    state_a, metrics = chunk(s["state"], s["data"]["train"], 5)
    state_b = s["state"]
    losses = []
    for _ in range(5):
        state_b, m = one(state_b, s["data"]["train"])
        losses.append(m["loss"])
    np.testing.assert_allclose(metrics["loss"], np.array(losses), rtol=1e-5, atol=1e-6)
    for a, b in zip(jax.tree_util.tree_leaves(state_a), jax.tree_util.tree_leaves(state_b), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


def test_batches_cover_each_epoch_once():
    """get_batch visits every training example once per epoch, in a new order per epoch."""
    import jax
    import jax.numpy as jnp

    n, b = 50, 10
    data = {"x": jnp.arange(n, dtype=jnp.float32)[:, None], "y": jnp.arange(n)}
    key = jax.random.key(0)
    epoch = [np.asarray(step.get_batch(data, s, key, b)["y"]) for s in range(5)]
    assert sorted(np.concatenate(epoch).tolist()) == list(range(n))
    nxt = np.concatenate([np.asarray(step.get_batch(data, s, key, b)["y"]) for s in range(5, 10)])
    assert sorted(nxt.tolist()) == list(range(n)) and not np.array_equal(nxt, np.concatenate(epoch))


def test_same_seed_same_metrics(tmp_path):
    config = tiny(load_config("mlp", "norm=noisy_batch"))
    train.train_and_evaluate(config, tmp_path / "a")
    train.train_and_evaluate(config, tmp_path / "b")
    a = (tmp_path / "a" / "metrics.jsonl").read_text()
    assert a == (tmp_path / "b" / "metrics.jsonl").read_text()


def test_workdir_with_another_config_is_not_overwritten(tmp_path, mlp_config):
    train.train_and_evaluate(mlp_config, tmp_path)
    before = (tmp_path / "metrics.jsonl").read_text()
    other = tiny(load_config("mlp", "norm=none"))
    with pytest.raises(rundir.WorkdirError, match="model.norm"):
        train.train_and_evaluate(other, tmp_path)
    assert (tmp_path / "metrics.jsonl").read_text() == before
    train.train_and_evaluate(other, tmp_path, overwrite=True)
    assert json.loads((tmp_path / "config.json").read_text())["model"]["norm"] == "none"


def test_runs_load_and_compare(tmp_path, mlp_config):
    for seed in (0, 1):
        mlp_config.seed = seed
        train.train_and_evaluate(mlp_config, tmp_path / f"s{seed}")
    run = runs.load(tmp_path / "s0")
    assert run.summary["status"] == "completed"
    assert list(run.metrics.dropna(subset=["train/loss"])["step"]) == [10, 20]  # probes may log other steps
    table = runs.compare([tmp_path / "s0", tmp_path / "s1"])
    assert len(table) == 1 and table["seeds"][0] == 2
    assert "eval/accuracy std" in table.columns


def test_log_rows_inside_a_chunk_match_one_chunk_per_log_step(tmp_path):
    """A 100-step chunk with log_every=10 writes the same rows as 10-step chunks."""
    config = tiny(load_config("mlp", "norm=batch"), steps=100)
    config.train.eval_every = 100
    train.train_and_evaluate(config, tmp_path / "big")
    config.train.steps_per_dispatch = 10
    train.train_and_evaluate(config, tmp_path / "small")
    big = [json.loads(x) for x in (tmp_path / "big" / "metrics.jsonl").read_text().splitlines()]
    small = [json.loads(x) for x in (tmp_path / "small" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in big] == [r["step"] for r in small]
    for a, b in zip(big, small, strict=True):
        assert a.keys() == b.keys()
        for key in a:
            np.testing.assert_allclose(a[key], b[key], rtol=1e-6, err_msg=key)
