"""Vectorized replicas (one program: vmapped, or lax.map over pairs) match separately trained single runs."""

import json

import numpy as np
import pytest

from bn_research import kernels, replicas, runs, train
from tests.conftest import load_config, tiny


def _rows(workdir):
    return [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]


def _assert_same_rows(a, b):
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for ra, rb in zip(a, b, strict=True):
        assert ra.keys() == rb.keys()
        for key in ra:
            np.testing.assert_allclose(ra[key], rb[key], rtol=2e-4, atol=2e-5, err_msg=key)


@pytest.mark.parametrize("model,arg,seeds,rates,program", [
    ("mlp", "norm=noisy_batch", (0, 3), (0.1, 0.5), "vmap"),  # noise, data order and init differ per seed
    ("mlp", "norm=batch,optimizer.name=momentum,optimizer.schedule=cosine", (1,), (0.02, 0.2), "map"),
    # 'auto': lax.map over pairs on XLA:CPU (vmap elsewhere); 3 replicas leave one outside the pairs
    ("cnn", "norm=batch,width=4,model.depth=2,train.batch_size=8", (0, 1, 2), (), "auto"),
])
def test_replicas_match_single_runs(tmp_path, model, arg, seeds, rates, program):
    config = tiny(load_config(model, arg))
    config.replicas.seeds, config.replicas.learning_rates = seeds, rates
    config.replicas.program = program
    workdirs = replicas.default_workdirs(config, tmp_path / "vec")
    summaries = replicas.train_replicas(config, workdirs)
    configs = replicas.expand(config)
    assert len(summaries) == len(configs) == len(seeds) * max(1, len(rates))
    assert [(c.seed, c.optimizer.learning_rate) for c in configs] == [
        (s, r) for s in seeds for r in rates or (config.optimizer.learning_rate,)]
    assert all(s["status"] == "completed" and s["step"] == 20 for s in summaries)
    # the last (differs from config in seed and rate); for the CNN also the first (in the lax.map)
    for i in sorted({len(configs) - 1} | ({0} if model == "cnn" else set())):
        single = tmp_path / f"single{i}"
        train.train_and_evaluate(configs[i], single)
        _assert_same_rows(_rows(workdirs[i]), _rows(single))
        assert json.loads((workdirs[i] / "config.json").read_text()) == json.loads((single / "config.json").read_text())
    run = runs.load(workdirs[0])
    expected = program if program != "auto" else ("map" if kernels.kind() in kernels.CPU_KINDS else "vmap")
    assert run.summary["replica"] == {"index": 0, "count": len(configs), "vectorized": True, "program": expected}
    assert {10, 20} <= set(run.metrics["step"])


def test_replicas_differ_and_aggregate_as_seeds(tmp_path):
    config = tiny(load_config("mlp", "norm=batch"))
    config.replicas.seeds = (0, 1, 2)
    for name in config.probes:
        config.probes[name].enabled = False
    workdirs = replicas.default_workdirs(config, tmp_path)
    assert [w.name for w in workdirs] == ["seed0_lr0.5", "seed1_lr0.5", "seed2_lr0.5"]
    replicas.train_replicas(config, workdirs)
    losses = [_rows(w)[-1]["train/loss"] for w in workdirs]
    assert len(set(losses)) == 3
    table = runs.compare(workdirs)
    assert len(table) == 1 and table["seeds"][0] == 3
    # A second call returns the finished runs without training; a changed config must not clobber them.
    again = replicas.train_replicas(config, workdirs)
    assert [s["status"] for s in again] == ["completed"] * 3


def test_replica_config_errors():
    config = tiny(load_config("mlp"))
    assert not replicas.enabled(config)
    config.replicas.learning_rates = (0.1, 0.1)
    assert replicas.enabled(config)
    with pytest.raises(Exception, match="must not repeat"):
        replicas.validate(config)
    config.replicas.learning_rates = (0.1, -1.0)
    with pytest.raises(Exception, match="learning_rates must be > 0"):
        replicas.validate(config)
    config.replicas.learning_rates = (0.1, 0.2)
    config.replicas.program = "pmap"
    with pytest.raises(Exception, match=r"replicas.program='pmap'; choose one of: auto, vmap, map"):
        replicas.validate(config)


def test_train_and_evaluate_refuses_a_replica_config(tmp_path):
    import pytest

    from bn_research import config_lib, train
    from tests.conftest import load_config, tiny

    config = tiny(load_config("mlp"))
    config.replicas.seeds = (0, 1)
    with pytest.raises(config_lib.ConfigError, match="replicas"):
        train.train_and_evaluate(config, tmp_path)
    assert not any(tmp_path.iterdir())


REPLICA_ARG = "norm=noisy_batch,width=16"
REPLICA_KEYS = {"train.num_steps": 400, "train.log_every": 40, "train.eval_every": 200,
                "train.checkpoint_every": 100, "train.keep_checkpoints": 2}
REPLICA_RUN = [f"--config=configs/mlp.py:{REPLICA_ARG}", "--config.replicas.seeds=(0, 1)",
               *[f"--config.{k}={v}" for k, v in REPLICA_KEYS.items()]]


def _start_replicas(workdir):
    import os
    import subprocess
    import sys
    from pathlib import Path

    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    return subprocess.Popen([sys.executable, "-m", "bn_research", "train", f"--workdir={workdir}", *REPLICA_RUN],
                            cwd=Path(__file__).resolve().parents[1], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_killed_replicas_resume_exactly(tmp_path):
    """Vectorized replicas checkpoint into their own run directories and resume like single
    runs: killed after a checkpoint, the rerun writes the rows of a run never stopped."""
    import signal
    import time

    ref, run = tmp_path / "ref", tmp_path / "run"
    config = load_config("mlp", REPLICA_ARG)  # the reference in-process: the same program as the CLI's
    config.update_from_flattened_dict(dict(REPLICA_KEYS, **{"replicas.seeds": (0, 1)}))
    names = ["seed0_lr0.5", "seed1_lr0.5"]
    replicas.train_replicas(config, [ref / n for n in names])
    p = _start_replicas(run)
    deadline = time.time() + 300
    while not all((run / n / "checkpoints" / "200").is_dir() for n in names):
        assert p.poll() is None and time.time() < deadline, p.stderr.read() if p.poll() is not None else "timeout"
        time.sleep(0.005)
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert not any((run / n / "summary.json").exists() for n in names)
    p = _start_replicas(run)
    out, err = p.communicate(timeout=600)
    assert p.returncode == 0, err
    assert err.count("resuming") == 2
    for n in names:
        assert (run / n / "metrics.jsonl").read_bytes() == (ref / n / "metrics.jsonl").read_bytes(), n
        a, b = runs.load(run / n).summary, runs.load(ref / n).summary
        assert a["status"] == b["status"] == "completed" and a["final"] == b["final"]
        assert a["resumed_at"][0] >= 200 and a["replica"]["index"] == names.index(n)
