"""Tests of the streaming input path: bn_research.data.stream, data.info / choose_pipeline,
and step.make_step_fns(..., streaming=True)."""

import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bn_research import config_lib, data, step, train
from bn_research.data import stream
from tests.conftest import load_config, tiny

# 256 examples, global batch 32: 8 steps per epoch and no remainder, so every example is
# drawn exactly once per epoch.
GAUSS = {"name": "gaussian_regression", "dim_in": 8, "dim_out": 3, "num_train": 256, "num_test": 64,
         "noise_std": 0.1, "seed": 3}
BATCH, N = 32, 256


@pytest.fixture(scope="module")
def cfg(tmp_path_factory):
    return {**GAUSS, "data_dir": str(tmp_path_factory.mktemp("tfds"))}


def _open(cfg, **kw):
    kw = {"batch_size": BATCH, "seed": 0, "process_index": 0, "process_count": 1, **kw}
    return stream.Stream(cfg, **kw)


def _ids(x):
    """One hashable id per example (its input row) for a [..., dim] array."""
    return [row.tobytes() for row in np.asarray(x).reshape(-1, x.shape[-1])]


def test_import_is_cheap():
    code = "import sys, bn_research.data.stream; print('tensorflow' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_info_without_loading(cfg):
    info = data.info(cfg)
    assert (info.name, info.task, info.num_classes, info.input_shape, info.output_dim) == (
        "gaussian_regression", "regression", None, (8,), 3)
    assert (info.num_train, info.num_test, info.target_shape) == (256, 64, (3,))
    assert info.train_bytes == 4 * (8 + 3) * 256


def test_batches_match_the_dataset_and_its_preprocessing(cfg):
    ds = data.load(cfg)
    with _open(cfg) as s:
        b = s.batches(0, 3)
    assert b["x"].shape == (3, BATCH, 8) and b["x"].dtype == np.float32
    assert b["y"].shape == (3, BATCH, 3) and b["y"].dtype == np.float32
    rows = {x.tobytes(): y for x, y in zip(ds.train["x"], ds.train["y"], strict=True)}
    for x, y in zip(b["x"].reshape(-1, 8), b["y"].reshape(-1, 3), strict=True):
        np.testing.assert_array_equal(rows[x.tobytes()], y)  # pairs kept, values as data.load


def test_deterministic_and_exact_resume(cfg):
    with _open(cfg) as a, _open(cfg) as fresh, _open(cfg, host_prefetch=0) as unthreaded:
        first, second = a.batches(0, 10), a.batches(10, 5)  # consecutive: the open iterator
        resumed = fresh.batches(10, 5)  # a new stream started mid-epoch of epoch 1
        whole = unthreaded.batches(0, 15)
        back = a.batches(3, 4)  # a jump backwards re-opens the iterator
    for k in ("x", "y"):
        np.testing.assert_array_equal(second[k], resumed[k])
        np.testing.assert_array_equal(np.concatenate([first[k], second[k]]), whole[k])
        np.testing.assert_array_equal(back[k], whole[k][3:7])
    with _open(cfg, seed=1) as other:
        assert not np.array_equal(other.batches(0, 10)["x"], first["x"])


def test_each_epoch_is_a_new_shuffle_of_every_example(cfg):
    with _open(cfg) as s:
        assert s.steps_per_epoch == N // BATCH
        x = s.batches(0, 3 * s.steps_per_epoch)["x"]
    all_ids = set(_ids(data.load(cfg).train["x"]))
    epochs = [_ids(x[e * 8:(e + 1) * 8]) for e in range(3)]
    for ids in epochs:
        assert len(ids) == N and set(ids) == all_ids  # every example exactly once
    assert epochs[0] != epochs[1] and epochs[1] != epochs[2]  # reshuffled every epoch


def test_two_processes_partition_every_global_batch(cfg):
    parts = []
    for p in range(2):
        with _open(cfg, process_index=p, process_count=2) as s:
            assert s.local_batch_size == BATCH // 2 and s.steps_per_epoch == N // BATCH
            parts.append(s.batches(0, 2 * s.steps_per_epoch)["x"])
    assert parts[0].shape == (16, BATCH // 2, 8)
    for e in range(2):
        ids = [_ids(part[e * 8:(e + 1) * 8]) for part in parts]
        assert not set(ids[0]) & set(ids[1])  # no example on both processes
        assert len(set(ids[0]) | set(ids[1])) == N  # together: the whole split, once each
    # A single process's resumed stream agrees with itself: the layout is part of the key.
    with _open(cfg, process_index=1, process_count=2) as s:
        np.testing.assert_array_equal(s.batches(5, 6)["x"], parts[1][5:11])


def test_to_device_places_a_chunk_on_the_mesh(cfg):
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    with _open(cfg) as s:
        chunk = s.batches(0, 2)
        assert s.step_bytes == BATCH * 4 * (8 + 3)
    mesh = jax.make_mesh((1,), ("data",), devices=jax.devices()[:1])
    for placed in (stream.to_device(chunk), stream.to_device(chunk, NamedSharding(mesh, P(None, "data")))):
        assert isinstance(placed["x"], jax.Array) and placed["x"].shape == (2, BATCH, 8)
        np.testing.assert_array_equal(np.asarray(placed["y"]), chunk["y"])


def test_bad_layouts_fail_with_one_line(cfg):
    with pytest.raises(ValueError, match="does not split over 3 processes"):
        _open(cfg, process_count=3)
    with pytest.raises(ValueError, match="larger than the training split"):
        _open(cfg, batch_size=512)


def test_choose_pipeline():
    info = data.DatasetInfo(name="d", task="classification", num_classes=10, input_shape=(32, 32, 3),
                            output_dim=10, num_train=50_000, num_test=10_000, target_shape=())
    mb = info.train_bytes / 2**20  # CIFAR-10 shaped: about 586 MiB
    assert 580 < mb < 590
    assert data.choose_pipeline({"pipeline": "auto", "device_max_mb": 1024}, info) == "device"
    assert data.choose_pipeline({"pipeline": "auto", "device_max_mb": 500}, info) == "stream"
    assert data.choose_pipeline({"pipeline": "auto", "device_max_mb": mb}, info) == "device"  # at most: device
    assert data.choose_pipeline({"pipeline": "stream", "device_max_mb": 1024}, info) == "stream"
    assert data.choose_pipeline({"pipeline": "device", "device_max_mb": 1}, info) == "device"
    assert data.choose_pipeline({}, info) == "device"  # defaults: auto, 1024 MiB
    with pytest.raises(data.DatasetError, match="dataset.pipeline must be one of"):
        data.choose_pipeline({"pipeline": "disk"}, info)


@pytest.mark.parametrize("key, value, message", [
    ("pipeline", "disk", "dataset.pipeline must be one of device, stream, auto, got 'disk'"),
    ("device_max_mb", -1, "dataset.device_max_mb must be >= 0"),
    ("shuffle_buffer", 0, "dataset.shuffle_buffer must be >= 1"),
])
def test_config_validation(key, value, message):
    config = load_config("mlp")
    config.dataset[key] = value
    with pytest.raises(config_lib.ConfigError, match=message):
        config_lib.validate(config)


def test_streamed_chunk_equals_device_chunk():
    """Fed the batches the device path gathers, the streamed chunk computes the same run
    (probes, noise keys and all)."""
    config = tiny(load_config("mlp", "norm=noisy_batch,depth=2,width=16,train.batch_size=16"))
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(64, 6)).astype(np.float32), rng.integers(0, 4, 64).astype(np.int32)
    ds = data.Dataset(name="synthetic", task="classification", train={"x": x, "y": y},
                      test={"x": x[:16], "y": y[:16]}, num_classes=4, input_shape=(6,), output_dim=4)
    s = train.setup(config, ds, single_device=True)
    probe_fn = train.probes.make_probe_fn(config, s["graphdef"], ds.task)
    streamed = step.make_step_fns(s["graphdef"], s["tx"], task=ds.task, batch_size=16, eval_batch_size=16,
                                  probe_fn=probe_fn, streaming=True)
    d, k = s["data"]["train"], 7  # 4 steps per epoch: the second chunk starts mid-epoch and crosses two
    device_chunk = jax.jit(s["fns"].train_chunk, static_argnums=2)
    state = device_chunk(s["state"], d, k)[0]
    batch = step.chunk_batches(d, jnp.int32(k), step.step_keys(state)[0], 16, k)
    batches = jax.tree_util.tree_map(lambda *b: jnp.stack(b), *[batch(jnp.int32(t)) for t in range(k, 2 * k)])
    want_state, want = device_chunk(state, d, k)
    got_state, got = jax.jit(streamed.train_chunk, static_argnums=2)(state, batches, k)
    assert set(got) == set(want) and len(want) > len(step.BASE_METRICS)  # probes measured too
    for name in want:
        np.testing.assert_allclose(got[name], want[name], rtol=1e-5, atol=1e-6, err_msg=name)
    flat_want, flat_got = (jax.tree_util.tree_leaves_with_path(t) for t in (want_state, got_state))
    for (path, a), (_, b) in zip(flat_want, flat_got, strict=True):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-6, err_msg=str(path))


def test_catalog_dataset_through_mock_data(monkeypatch, tmp_path):
    import tensorflow_datasets as tfds

    monkeypatch.setattr(data, "_unreachable", lambda builder: None)  # mock_data fakes the network too
    cfg = {"name": "mnist", "data_dir": str(tmp_path)}
    with tfds.testing.mock_data(num_examples=40):
        info = data.info(cfg)  # split sizes are not recorded under mock_data: counted
        # mock_data's fake file system is thread-local: read in this thread (host_prefetch=0).
        with _open(cfg, batch_size=8, host_prefetch=0) as s, _open(cfg, batch_size=8, host_prefetch=0) as fresh:
            b = s.batches(0, 6)
            np.testing.assert_array_equal(fresh.batches(4, 2)["x"], b["x"][4:])
    assert (info.task, info.num_classes, info.input_shape, info.num_train) == ("classification", 10, (28, 28, 1), 40)
    assert data.choose_pipeline({"device_max_mb": 0}, info) == "stream"
    assert b["x"].shape == (6, 8, 28, 28, 1) and b["x"].dtype == np.float32
    assert 0.0 <= b["x"].min() and b["x"].max() <= 1.0 and b["x"].max() > 0.5
    assert b["y"].shape == (6, 8) and b["y"].dtype == np.int32 and 0 <= b["y"].min() and b["y"].max() < 10


def test_training_on_the_stream_completes_and_resumes_exactly(tmp_path):
    """`dataset.pipeline=stream` through the trainer: the run learns, records its pipeline,
    and a run resumed from a mid-run checkpoint ends with the same rows and state."""
    import shutil

    config = tiny(load_config("mlp", "norm=batch"))
    config.dataset.pipeline = "stream"
    config.train.checkpoint_every = 10
    workdir = tmp_path / "run"
    first = train.train_and_evaluate(config, workdir)
    assert first["status"] == "completed" and first["pipeline"] == "stream"
    assert first["final"]["eval/accuracy"] > 0.3  # 10 classes: chance is 0.1
    rows = (workdir / "metrics.jsonl").read_bytes()
    shutil.rmtree(workdir / "checkpoints" / "20")
    (workdir / "summary.json").unlink()
    again = train.train_and_evaluate(config, workdir)
    assert again["resumed_at"] == [10] and again["status"] == "completed"
    assert again["state_digest"] == first["state_digest"]
    assert (workdir / "metrics.jsonl").read_bytes() == rows
