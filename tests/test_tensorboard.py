"""TensorBoard event files, read back the way TensorBoard reads them: every scalar (tags
layer-first), the config as the hparams session, per-unit statistics as histograms."""

import json

import numpy as np
import pytest
from tensorboard.backend.event_processing import plugin_event_accumulator as pea
from tensorboard.plugins.hparams import metadata as hparams_metadata
from tensorboard.util import tensor_util

from bn_research import tensorboard_log, train
from tests.conftest import load_config, tiny

LAYERS = ("dense_0", "dense_1", "dense_2", "head")


def test_tags_put_the_layer_first():
    assert tensorboard_log.tag("dist/dense_0/train/act_in_mean", LAYERS) == "dense_0/dist/train/act_in_mean"
    assert tensorboard_log.tag("weights/head/w_norm", LAYERS) == "head/weights/w_norm"
    for key in ("train/loss", "eval/accuracy", "grad/growth_factor", "landscape/beta"):
        assert tensorboard_log.tag(key, LAYERS) == key
    for stat in ("dist/probe/act_in_p15", "dist/dense_1/probe/act_in_p15"):  # a stat with or without its layer
        assert tensorboard_log.units_tag("dense_1", stat) == "dense_1/dist/probe/act_in_p15/units"


def test_flat_hparams_are_tensorboard_types():
    flat = tensorboard_log.flat_hparams({"model": {"norm": "batch", "depth": 3}, "seed": np.int64(2),
                                         "probes": {"landscape": {"step_sizes": (0.1, 0.2)}}})
    assert flat == {"model.norm": "batch", "model.depth": 3, "seed": 2, "probes.landscape.step_sizes": "(0.1, 0.2)"}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("tb")
    summary = train.train_and_evaluate(tiny(load_config("mlp", "norm=batch")), workdir)
    assert summary["status"] == "completed"
    events = pea.EventAccumulator(str(workdir), size_guidance={pea.TENSORS: 0})
    events.Reload()
    return workdir, events


def _values(events, tag):
    return {e.step: tensor_util.make_ndarray(e.tensor_proto) for e in events.Tensors(tag)}


def test_every_metric_is_a_finite_scalar_at_its_steps(run):
    workdir, events = run
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    scalars = set(events.PluginTagToContent("scalars"))
    keys = {k for row in rows for k in row if k != "step"}
    assert scalars == {tensorboard_log.tag(k, LAYERS) for k in keys}
    assert {"train/loss", "eval/accuracy", "dense_0/dist/train/act_in_mean", "grad/growth_factor"} <= scalars
    for key in keys:
        logged = {row["step"]: row[key] for row in rows if key in row}
        written = _values(events, tensorboard_log.tag(key, LAYERS))
        assert written.keys() == logged.keys(), key
        assert all(np.isfinite(v) for v in written.values()), key
        np.testing.assert_allclose([written[s] for s in logged], list(logged.values()), rtol=1e-6)


def test_config_is_the_hparams_session(run):
    _, events = run
    content = events.PluginTagToContent("hparams")[hparams_metadata.SESSION_START_INFO_TAG]
    hparams = hparams_metadata.parse_session_start_info_plugin_data(content).hparams
    assert hparams["model.norm"].string_value == "batch"
    assert hparams["train.num_steps"].number_value == 20
    assert hparams["norm.affine"].bool_value is True
    assert len(hparams) > 40  # the whole flattened config


def test_per_unit_statistics_are_histograms(run):
    _, events = run
    tags = set(events.PluginTagToContent("histograms"))
    assert "dense_0/dist/train/act_in_mean/units" in tags and "dense_2/weights/w_norm/units" in tags
    assert not tags & set(events.PluginTagToContent("scalars"))  # one plugin per tag
    for tag in tags:
        for step, buckets in _values(events, tag).items():  # [bucket, (left, right, count)]
            assert np.isfinite(buckets).all(), (tag, step)
            assert buckets[:, 2].sum() == 100, (tag, step)  # one count per hidden unit
    assert set(_values(events, "dense_0/dist/train/act_in_mean/units")) == {1, 10, 20}


def test_bucketize_equals_tensorboards_histogram_summary():
    """`bucketize` (all rows at once) gives TensorBoard's own `histogram_pb` buckets: spread
    values, a constant row, a row with one outlier, and a 1-element row."""
    from tensorboard.plugins.histogram.summary_v2 import histogram_pb

    rng = np.random.default_rng(0)
    rows = [rng.normal(size=100), np.full(100, 2.5), np.r_[np.zeros(99), 1e6], rng.uniform(-3, 3, size=100)]
    got = tensorboard_log.bucketize(np.stack(rows))
    for r, g in zip(rows, got, strict=True):
        want = tensor_util.make_ndarray(histogram_pb("t", r).value[0].tensor)
        np.testing.assert_allclose(g, want, rtol=1e-12, atol=1e-12)
    one = tensorboard_log.bucketize(np.array([[7.0]]))[0]
    np.testing.assert_allclose(one, tensor_util.make_ndarray(histogram_pb("t", [7.0]).value[0].tensor))


def test_event_file_records_check_against_tensorflows_reader(tmp_path):
    """The event file's framing and checksums (`google_crc32c`) are read back by
    TensorFlow's own TFRecord reader, which verifies every CRC-32C, and by TensorBoard's
    pure-Python checksum."""
    import struct

    import tensorflow as tf
    from tensorboard.compat.proto import event_pb2
    from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import masked_crc32c

    w = tensorboard_log.EventWriter(tmp_path, {"a": 1}, ["dense_0"])
    w.write(3, {"train/loss": 0.25, "dist/dense_0/x": 1.5})
    w.histograms(3, {("dense_0", "dist/train/act_in_mean"): np.linspace(-1.0, 2.0, 100)})
    w.close()
    (path,) = tmp_path.glob("events.out.tfevents.*")
    records = [bytes(r.numpy()) for r in tf.data.TFRecordDataset(str(path))]
    events = [event_pb2.Event.FromString(r) for r in records]
    assert events[0].file_version == "brain.Event:2" and len(events) == 4  # version, hparams, scalars, histograms
    assert {v.tag: v.simple_value for v in events[2].summary.value} == {"train/loss": 0.25, "dense_0/dist/x": 1.5}
    raw, at = path.read_bytes(), 0
    for r in records:
        header = raw[at:at + 8]
        assert struct.unpack("<I", raw[at + 8:at + 12])[0] == masked_crc32c(header)
        assert struct.unpack("<I", raw[at + 12 + len(r):at + 16 + len(r)])[0] == masked_crc32c(r)
        at += 16 + len(r)
    assert at == len(raw)


def test_hand_encoded_records_equal_tensorboards_messages(tmp_path):
    """The rows' records, encoded by `EventWriter` in protobuf's wire format, parse to the
    same `Event` as one built with TensorBoard's message classes: scalars (also beyond
    float32's range, nan and negative), a step past 2**32, histograms of two lengths."""
    from tensorboard.compat.proto import event_pb2, summary_pb2, tensor_pb2, tensor_shape_pb2, types_pb2
    from tensorboard.plugins.histogram import metadata

    scalars = {"train/loss": 0.25, "dist/dense_0/x": -1.5e-7, "big": 1e39, "small": -1e39, "nan": float("nan"),
               "grad/norm": np.float32(3.0)}
    units = {("dense_0", "dist/train/act_in_mean"): np.linspace(-1.0, 2.0, 100),
             ("dense_0", "weights/w_norm"): np.array([0.5, 0.25, 4.0]),
             ("dense_0", "dist/train/act_in_var"): np.array([1.0, np.inf])}  # not finite: skipped
    w = tensorboard_log.EventWriter(tmp_path, None, ["dense_0"])
    w.write(0, scalars)
    w.write(2**40 + 3, scalars)
    w.histograms(7, units)
    w.close()
    (path,) = tmp_path.glob("events.out.tfevents.*")
    from tensorboard.backend.event_processing import event_file_loader

    got = [e for e in event_file_loader.RawEventFileLoader(str(path)).Load()][1:]
    got = [event_pb2.Event.FromString(r) for r in got]
    assert len(got) == 3
    for e, step in zip(got[:2], (0, 2**40 + 3), strict=True):
        want = event_pb2.Event(step=step, wall_time=e.wall_time, summary=summary_pb2.Summary(value=[
            summary_pb2.Summary.Value(tag=tensorboard_log.tag(k, ["dense_0"]), simple_value=float(v))
            for k, v in scalars.items()]))
        assert e.wall_time > 0
        assert e.SerializeToString() == want.SerializeToString()  # nan compares bitwise here
    shape = tensor_shape_pb2.TensorShapeProto(dim=[tensor_shape_pb2.TensorShapeProto.Dim(size=tensorboard_log.BUCKETS),
                                                   tensor_shape_pb2.TensorShapeProto.Dim(size=3)])
    want_values = []
    for (layer, stat), v in list(units.items())[:2]:
        name = tensorboard_log.units_tag(layer, stat)
        b = tensorboard_log.bucketize(v[None])[0]
        want_values.append(summary_pb2.Summary.Value(
            tag=name, metadata=metadata.create_summary_metadata(display_name=name, description=""),
            tensor=tensor_pb2.TensorProto(dtype=types_pb2.DT_DOUBLE, tensor_shape=shape, tensor_content=b.tobytes())))
    want = event_pb2.Event(step=7, wall_time=got[2].wall_time, summary=summary_pb2.Summary(value=want_values))
    assert got[2] == want
    assert [v.simple_value for v in got[0].summary.value][2:4] == [np.inf, -np.inf]
