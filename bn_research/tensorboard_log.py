"""TensorBoard event files of a run: every scalar, the config as hparams, per-unit histograms.

The records are exactly those its dashboards read (`simple_value` scalars, histogram
tensors with the histogram plugin's metadata, `hparams_pb`), written without running
TensorFlow ops (those cost ~0.1 s per log row of a 3-layer MLP); the per-row ones are
encoded directly in protobuf's wire format (`EventWriter`).
Only log rows are written (the host already holds them), so there is no extra device sync.

Tags put the layer first, so TensorBoard (which groups charts by the first path segment)
shows a layer's charts together:

    metrics.jsonl key                  TensorBoard tag
    dist/dense_0/train/act_in_mean     dense_0/dist/train/act_in_mean        (scalar)
    (layer_stats: dense_0, dist/train/act_in_mean, one value per unit)
                                       dense_0/dist/train/act_in_mean/units  (histogram)
    train/loss, eval/accuracy, grad/growth_factor, landscape/beta     unchanged

The flattened config (`model.norm`, `optimizer.learning_rate`, ...) is the run's hparams
session: `tensorboard --logdir runs/` lists every run in the HParams dashboard, where runs
can be filtered by any config key and compared on their scalars.
"""

from __future__ import annotations

import math
import os
import socket
import struct
import time
from pathlib import Path

import numpy as np

UNITS_SUFFIX = "units"
HPARAM_TYPES = (bool, int, float, str)
BUCKETS = 30  # buckets per histogram, as TensorBoard's own summaries default to


def bucketize(rows, buckets: int = BUCKETS):
    """Histograms of the rows of a [M, N] float array at once: [M, buckets, 3] of (left edge,
    right edge, count) in TensorBoard's histogram layout (`buckets` equal-width buckets from
    the row's minimum to its maximum, the maximum in the last one; a constant row has every
    edge at its value and all counts in the last bucket)."""
    rows = np.asarray(rows, np.float64)
    m, n = rows.shape
    lo, hi = rows.min(1), rows.max(1)
    width = (hi - lo) / buckets
    flat = width == 0
    idx = np.floor((rows - lo[:, None]) / np.where(flat, 1.0, width)[:, None]).astype(np.int64)
    idx = np.where(flat[:, None], buckets - 1, np.minimum(idx, buckets - 1))
    counts = np.bincount((np.arange(m)[:, None] * buckets + idx).ravel(), minlength=m * buckets)
    left = lo[:, None] + width[:, None] * np.arange(buckets)
    right = np.where(np.arange(buckets) == buckets - 1, hi[:, None], left + width[:, None])
    return np.stack([left, right, counts.reshape(m, buckets).astype(np.float64)], -1)


def _masked_crc(data: bytes) -> int:
    """The TFRecord checksum: CRC-32C, rotated right by 15 bits plus a constant."""
    import google_crc32c

    crc = google_crc32c.value(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


class _EventFile:
    """A TensorBoard event file (TFRecord framing: length, masked CRC-32C of the length,
    the serialized `Event`, its masked CRC-32C), written by the caller's thread.

    TensorBoard's own `EventFileWriter` computes the CRC-32C in pure Python on a background
    thread (~6 ms per 50 KB): with per-unit histograms at every log row that thread took
    the MLP run's loop from 1.04-1.10 to 1.23 of the time with probes off, on 2 cores. Here
    the checksum is `google_crc32c`'s C implementation (0.15 ms per MB)."""

    _count = 0

    def __init__(self, logdir: Path):
        from tensorboard.compat.proto import event_pb2

        _EventFile._count += 1  # unique per file in this process, as TensorBoard's own names
        name = f"events.out.tfevents.{int(time.time()):010d}.{socket.gethostname()}.{os.getpid()}.{_EventFile._count}"
        self._file = open(logdir / name, "ab")  # noqa: SIM115 (closed by close())
        self.add_event(event_pb2.Event(wall_time=time.time(), file_version="brain.Event:2"))

    def add_event(self, event) -> None:
        self.add_record(event.SerializeToString())

    def add_record(self, data: bytes) -> None:
        """One serialized `Event`."""
        header = struct.pack("<Q", len(data))
        self._file.write(header + struct.pack("<I", _masked_crc(header)) + data + struct.pack("<I", _masked_crc(data)))

    def flush(self) -> None:
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def tag(key: str, layer_names=()) -> str:
    """The TensorBoard tag of a metrics key: a layer named in the second segment moves first."""
    parts = key.split("/")
    if len(parts) >= 3 and parts[1] in layer_names:
        return "/".join([parts[1], parts[0], *parts[2:]])
    return key


def units_tag(layer: str, stat: str) -> str:
    """The histogram tag of a per-unit statistic `stat` of `layer` (as in `layer_stats/`)."""
    parts = stat.split("/")
    if len(parts) >= 2 and parts[1] == layer:  # a stat spelled with its layer: dist/dense_0/train/...
        parts = [parts[0], *parts[2:]]
    return "/".join([layer, *parts, UNITS_SUFFIX])


def flat_hparams(config_dict: dict, prefix: str = "") -> dict:
    """The config as {dotted key: bool | int | float | str} (other values as their repr)."""
    out = {}
    for k, v in config_dict.items():
        if isinstance(v, dict):
            out.update(flat_hparams(v, f"{prefix}{k}."))
        elif isinstance(v, np.generic):
            out[f"{prefix}{k}"] = v.item()
        else:
            out[f"{prefix}{k}"] = v if isinstance(v, HPARAM_TYPES) else repr(v)
    return out


def _varint(n: int) -> bytes:
    n &= (1 << 64) - 1  # int64 as protobuf encodes it (negative: ten bytes)
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _field(number: int, payload: bytes) -> bytes:
    """A length-delimited protobuf field."""
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def _float32(x: float) -> bytes:
    try:
        return struct.pack("<f", x)
    except OverflowError:  # beyond float32's range: protobuf's float field stores +-inf
        return struct.pack("<f", math.copysign(math.inf, x))


def _event(step: int, summary: bytes) -> bytes:
    """A serialized `Event` {wall_time: 1, step: 2, summary: 5}."""
    return b"\x09" + struct.pack("<d", time.time()) + b"\x10" + _varint(int(step)) + _field(5, summary)


class EventWriter:
    """One event file in `workdir`; call `write` at log rows only.

        w = EventWriter(workdir, config.to_dict(), model.layer_names())
        w.write(100, {"train/loss": 0.3})
        w.histograms(100, {("dense_0", "dist/train/act_in_mean"): values})

    The rows' records (`Event` / `Summary` / `Summary.Value` / `TensorProto`) are encoded
    here in protobuf's wire format, with the parts that never change (a tag, a
    histogram's plugin metadata, the tensor's dtype and shape) serialized once by
    TensorBoard's own message classes; tests/test_tensorboard.py parses them back with
    those classes. Building the messages with those classes every row costs more, and
    freeing them makes protobuf's allocator call `malloc_trim`, which in a process holding
    JAX and TensorFlow walked the whole heap: about 75 ms of CPU time once per 3,000-step
    MLP run, with TLB shootdowns interrupting the chunk's threads."""

    def __init__(self, workdir, config_dict: dict | None = None, layer_names=()):
        from tensorboard.compat.proto import tensor_pb2, tensor_shape_pb2, types_pb2

        self._events = _EventFile(Path(workdir))
        self.layer_names = frozenset(layer_names)
        self._scalar_tags = {}  # metrics key -> its encoded `tag` field
        self._histogram_heads = {}  # histogram tag -> its encoded `tag` and `metadata` fields
        shape = tensor_shape_pb2.TensorShapeProto(dim=[tensor_shape_pb2.TensorShapeProto.Dim(size=BUCKETS),
                                                       tensor_shape_pb2.TensorShapeProto.Dim(size=3)])
        self._tensor_head = tensor_pb2.TensorProto(dtype=types_pb2.DT_DOUBLE, tensor_shape=shape).SerializeToString()
        if config_dict is not None:
            from tensorboard.plugins.hparams import summary_v2 as hparams

            self._add(0, hparams.hparams_pb(flat_hparams(config_dict)))

    def _add(self, step: int, summary) -> None:
        from tensorboard.compat.proto import event_pb2

        self._events.add_event(event_pb2.Event(wall_time=time.time(), step=int(step), summary=summary))

    def write(self, step: int, scalars: dict) -> None:
        """Scalars {metrics key: value} of one step, as classic `simple_value` records: the
        scalar dashboard reads them, and so do `EventAccumulator(...).Scalars(tag)` and
        `tf.compat.v1.train.summary_iterator` in users' scripts."""
        values = []
        for key, x in scalars.items():
            head = self._scalar_tags.get(key)
            if head is None:
                head = self._scalar_tags[key] = _field(1, tag(key, self.layer_names).encode())
            values.append(_field(1, head + b"\x15" + _float32(float(x))))
        if values:
            self._events.add_record(_event(step, b"".join(values)))

    def histograms(self, step: int, units: dict) -> None:
        """Per-unit arrays {(layer, stat): [U]} of one step, one histogram each, bucketed
        together for arrays of one length (`bucketize`: one numpy pass instead of one
        TensorBoard `histogram_pb` call, ~0.15 ms, per array)."""
        by_size: dict[int, list] = {}
        for (layer, stat), v in units.items():
            v = np.asarray(v, np.float64).ravel()
            if v.size and np.isfinite(v).all():  # TensorBoard cannot bucket inf/nan
                by_size.setdefault(v.size, []).append((units_tag(layer, stat), v))
        values = []
        for group in by_size.values():
            for (name, _), b in zip(group, bucketize(np.stack([v for _, v in group])), strict=True):
                tensor = self._tensor_head + _field(4, np.ascontiguousarray(b, "<f8").tobytes())
                values.append(_field(1, self._histogram_head(name) + _field(8, tensor)))
        if values:
            self._events.add_record(_event(step, b"".join(values)))

    def _histogram_head(self, name: str) -> bytes:
        head = self._histogram_heads.get(name)
        if head is None:
            from tensorboard.plugins.histogram import metadata

            meta = metadata.create_summary_metadata(display_name=name, description="").SerializeToString()
            head = self._histogram_heads[name] = _field(1, name.encode()) + _field(9, meta)
        return head

    def resume(self, step: int) -> None:
        """Mark a restart at `step`: TensorBoard's readers drop events of earlier files with
        a larger step when they meet this SessionLog.START."""
        from tensorboard.compat.proto import event_pb2

        self._events.add_event(event_pb2.Event(
            wall_time=time.time(), step=int(step) + 1,
            session_log=event_pb2.SessionLog(status=event_pb2.SessionLog.START)))

    def flush(self) -> None:
        self._events.flush()

    def close(self) -> None:
        self._events.close()
