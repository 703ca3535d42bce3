"""Data parallelism on 4 simulated CPU devices (XLA_FLAGS=--xla_force_host_platform_device_count=4):
global batch-norm statistics match one device on the same global batch, per-device
statistics match ghost batch norm with one group per device, and a checkpoint written on
4 devices resumes on 4 and on 1 with the same results."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]


def _worker(task, out, devices):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3",
               XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    r = subprocess.run([sys.executable, str(ROOT / "tests" / "_mesh_worker.py"), task, str(out)],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("mesh")
    four = _worker("four", out, 4)
    one = _worker("one", out, 1)  # resumes the copy the 4-device worker left at step 20
    return four, one


def test_summary_records_the_mesh(results):
    four, one = results
    assert four["devices"] == 4 and one["devices"] == 1
    assert four["global"]["summary"]["mesh"] == {"data": 4}
    assert four["global"]["summary"]["num_devices"] == 4
    assert one["global"]["summary"]["mesh"] == {"data": 1}


def test_global_statistics_match_one_device(results):
    four, one = results
    a, b = four["global"], one["global"]
    assert a["summary"]["status"] == b["summary"]["status"] == "completed"
    np.testing.assert_allclose(a["params"], b["params"], rtol=1e-4, atol=1e-5)
    for k in ("eval/loss", "eval/accuracy", "train/loss"):
        assert a["summary"]["final"][k] == pytest.approx(b["summary"]["final"][k], rel=1e-4), k


def test_per_device_statistics_match_ghost_batches_of_one_device(results):
    four, one = results
    a, b = four["per_device"], one["virtual"]
    np.testing.assert_allclose(a["params"], b["params"], rtol=1e-4, atol=1e-5)
    # and they differ from global statistics: the test can tell the modes apart
    assert np.abs(np.subtract(a["params"], four["global"]["params"])).max() > 1e-3


def test_checkpoint_from_four_devices_resumes_on_four_and_on_one(results):
    four, one = results
    full = four["global"]
    for r in (four["resume4"], one["resume1"]):
        assert r["summary"]["status"] == "completed" and r["summary"]["resumed_at"] == [20]
        np.testing.assert_allclose(r["params"], full["params"], rtol=1e-4, atol=1e-5)
        assert r["summary"]["final"]["eval/loss"] == pytest.approx(full["summary"]["final"]["eval/loss"], rel=1e-4)


def test_cnn_with_the_cpu_kernels_on_four_devices_matches_one(tmp_path):
    """The CPU's FFI kernels (oneDNN convolutions, the drift percentiles) inside a step
    whose batch is sharded over 4 devices: the same metrics as on one device.

    The drift percentiles are compared in the first logged row, where both runs measure
    the same initial parameters. Later rows differ by float rounding that training
    amplifies: the sharded program sums the batch statistics in another order, and the
    rows' largest p50 difference grew from 6e-8 (step 1) to 3e-5 (step 10) and 4e-4
    (step 20); two valid kernel sets on one device (BN_RESEARCH_KERNELS=onednn and cpu)
    differ by 1.3e-3 at step 20."""
    res = _worker("cnn", tmp_path, 4)
    four, one = res["cnn4"], res["cnn1"]
    assert four["status"] == one["status"] == "completed"
    assert four["mesh"] == {"data": 4} and one["mesh"] == {"data": 1}
    assert four["kernels"] == one["kernels"]
    for k in ("train/loss", "eval/loss", "eval/accuracy"):
        assert four["final"][k] == pytest.approx(one["final"][k], rel=1e-4), k
    first4, first1 = four["first_row"], one["first_row"]
    assert first4["step"] == first1["step"] == 1
    dist = [k for k in first1 if k.startswith("dist/") and "_p50" in k]  # the drift percentiles
    assert dist and set(dist) <= set(first4)
    for k in dist:
        assert first4[k] == pytest.approx(first1[k], rel=1e-5, abs=1e-6), k
