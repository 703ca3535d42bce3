"""Multi-process data parallelism on JAX's own runtime: two processes on 127.0.0.1 (one
CPU device each, gloo collectives) train one model on a mesh over both devices; they end
with identical parameters, equal to one process on one device with the same global batch
(global batch-norm statistics), and save / restore orbax checkpoints together. Plus the
argument checks of `distributed.initialize` and its single-process fallback."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from bn_research import distributed

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT_S = 80


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(**extra):
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("BN_RESEARCH_", "SLURM_", "OMPI_", "JAX_COORDINATOR", "XLA_FLAGS"))}
    env.update(TF_CPP_MIN_LOG_LEVEL="3", JAX_PLATFORMS="cpu", **extra)
    return env


def _start(out, name, **extra):
    return subprocess.Popen([sys.executable, str(ROOT / "tests" / "_distributed_worker.py"), str(out), name],
                            cwd=ROOT, env=_env(**extra), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


@pytest.fixture(scope="module")
def launched(tmp_path_factory):
    """The worker as two processes joined on 127.0.0.1 and as one process alone (no
    BN_RESEARCH_* and no cluster: it stays single-process); (out dir, stderr in that order).
    Each process runs the step functions, then `train.train_and_evaluate`."""
    out = tmp_path_factory.mktemp("distributed")
    address = f"127.0.0.1:{_free_port()}"
    procs = [_start(out, "two", BN_RESEARCH_COORDINATOR_ADDRESS=address, BN_RESEARCH_NUM_PROCESSES="2",
                    BN_RESEARCH_PROCESS_ID=str(i)) for i in range(2)]
    procs.append(_start(out, "one"))
    errs = []
    try:
        for p in procs:
            _, err = p.communicate(timeout=3 * TIMEOUT_S)
            assert p.returncode == 0, err[-3000:]
            errs.append(err)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.communicate()
    return out, errs


@pytest.fixture(scope="module")
def runs(launched):
    out, _ = launched
    return {"two": [json.loads((out / f"two_{i}.json").read_text()) for i in range(2)],
            "one": json.loads((out / "one_0.json").read_text()), "out": out}


def test_two_processes_share_one_mesh_and_end_identical(runs):
    a, b = runs["two"]
    for i, r in enumerate((a, b)):
        assert r["distributed"] == {"processes": 2, "process_index": i, "local_devices": 1, "devices": 2}
        assert r["mesh"] == {"data": 2} and r["spans_processes"]
        assert "0 (or 2)" in r["check_mesh_data_1"]  # a mesh smaller than all processes' devices is refused
    for r in (a, b, runs["one"]):  # host-fed batches: each process gives its part of the global batch
        assert r["host_fed_batch"] == {"shape": [8, 3], "total": float(sum(range(24))), "doubled_ok": True}
    assert a["params_digest"] == b["params_digest"] and a["state_digest"] == b["state_digest"]
    assert a["losses"] == b["losses"] and a["eval"] == b["eval"]


def test_two_processes_equal_one_process_on_the_same_global_batch(runs):
    (a, _), one = runs["two"], runs["one"]
    assert one["distributed"]["processes"] == 1 and one["mesh"] == {"data": 1}
    np.testing.assert_allclose(a["params"], one["params"], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(a["losses"], one["losses"], rtol=1e-4)
    for x, y in zip(a["eval"], one["eval"], strict=True):
        assert x == pytest.approx(y, rel=1e-4)


def test_checkpoints_are_saved_and_restored_by_every_process(runs):
    for r in runs["two"]:
        assert r["checkpoint_steps"] == [20, 30] and r["restored_step"] == 30
        assert r["restored_digest"] == r["state_digest"]
        assert "'data': 2" in r["restored_sharding"] and "spec=P()" in r["restored_sharding"]
        assert r["meta_losses"] == r["losses"]
    assert sorted(p.name for p in (runs["out"] / "two" / "checkpoints").iterdir()) == ["20", "30"]


@pytest.mark.parametrize("kwargs, message", [
    ({"coordinator_address": "127.0.0.1:1234"}, "but not num_processes, process_id"),
    ({"coordinator_address": "127.0.0.1:1234", "num_processes": 2, "process_id": 2}, "process_id=2 is not in 0..1"),
    ({"coordinator_address": "127.0.0.1", "num_processes": 2, "process_id": 0}, "must be host:port"),
    ({"coordinator_address": "h:1", "num_processes": "two", "process_id": 0}, "num_processes must be an integer"),
    ({"coordinator_address": "h:1", "num_processes": 0, "process_id": 0}, "num_processes must be >= 1"),
])
def test_bad_settings_fail_with_one_line(kwargs, message, monkeypatch):
    for var in distributed.ENV.values():
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(distributed.DistributedError, match=message) as e:
        distributed.initialize(**kwargs)
    assert "\n" not in str(e.value) and isinstance(e.value, ValueError)


def test_settings_come_from_arguments_then_environment(monkeypatch):
    monkeypatch.setenv("BN_RESEARCH_COORDINATOR_ADDRESS", "10.0.0.1:1234")
    monkeypatch.setenv("BN_RESEARCH_NUM_PROCESSES", "4")
    monkeypatch.setenv("BN_RESEARCH_PROCESS_ID", "3")
    assert distributed.resolve() == ("10.0.0.1:1234", 4, 3)
    assert distributed.resolve(process_id=1) == ("10.0.0.1:1234", 4, 1)
    monkeypatch.delenv("BN_RESEARCH_PROCESS_ID")
    with pytest.raises(distributed.DistributedError, match="BN_RESEARCH_PROCESS_ID"):
        distributed.resolve()
    for var in distributed.ENV.values():
        monkeypatch.delenv(var, raising=False)
    assert distributed.resolve() == (None, None, None)


@pytest.fixture(scope="module")
def trained(launched):
    """`train.train_and_evaluate` in two processes on one shared workdir, and in one."""
    out, errs = launched
    return {"two": [json.loads((out / f"train_two_{i}.json").read_text()) for i in range(2)],
            "one": json.loads((out / "train_one_0.json").read_text()), "out": out, "stderr": errs}


def test_the_trainer_runs_on_two_processes_and_only_process_0_writes(trained):
    a, b = trained["two"]
    assert a["status"] == b["status"] == "completed" and a["step"] == b["step"] == 30
    assert a["state_digest"] == b["state_digest"]  # both processes hold the same final state
    assert a["mesh"] == {"data": 2} and a["distributed"]["processes"] == 2
    workdir = trained["out"] / "train_two"
    written = json.loads((workdir / "summary.json").read_text())
    assert written["distributed"]["process_index"] == 0 and written["state_digest"] == a["state_digest"]
    steps = [json.loads(line)["step"] for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps)) and steps[-1] == 30  # one writer: every row once
    assert "pid" in (workdir / ".lock").read_text()
    assert trained["stderr"][1].strip() == ""  # process 1 says nothing; process 0 reports progress
    assert "compile" in trained["stderr"][0]


def test_the_trainer_on_two_processes_equals_one_process(trained):
    (a, _), one = trained["two"], trained["one"]
    assert one["mesh"] == {"data": 1} and one["distributed"]["processes"] == 1
    for k in ("eval/loss", "eval/accuracy", "train/loss"):
        assert a["final"][k] == pytest.approx(one["final"][k], rel=1e-4), k


def test_cli_refuses_an_incomplete_process_layout_in_one_line(tmp_path):
    workdir = tmp_path / "run"
    r = subprocess.run([sys.executable, "-m", "bn_research", "train", "--num_processes=2", "--config=configs/mlp.py",
                        f"--workdir={workdir}"], cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and "give all three" in r.stderr
    assert not workdir.exists()
