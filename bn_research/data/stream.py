"""Streaming input: a tf.data pipeline over a tfds split, for data that does not fit in
device memory (`config.dataset.pipeline = "stream"`, see `bn_research.data.choose_pipeline`).

The device path keeps the whole split on every device and gathers each step's batch
inside jit; this path reads the split from disk on the host and hands the trainer one
chunk of consecutive steps at a time, `{"x": [K, local_B, ...], "y": [K, local_B, ...]}`,
which `step.make_step_fns(..., streaming=True).train_chunk` scans over.

Order (a pure function of seed, step and process layout, so a resumed run sees exactly
the batches it would have seen):
- process p of P reads the p-th of P equal, disjoint shares of the split
  (`tfds.even_splits(..., drop_remainder=True)`) and yields its local part, of
  `batch_size // P` examples, of every global batch; the global batch of a step is the
  processes' parts in process order (`jax.make_array_from_process_local_data`);
- epoch e reads the share's files in an order seeded by (seed, e) and shuffles examples
  through a buffer seeded by (seed, e); an epoch is `num_train // batch_size` steps and
  drops its remainder, as the device path does. The order is not the device path's.

Importing this module is cheap: TensorFlow is imported when a stream is opened.
"""

from __future__ import annotations

import itertools
import queue
import threading

import numpy as np

from bn_research import data as _data
from bn_research.data._tf import tfds as _tfds

DEFAULT_SHUFFLE_BUFFER = 16384  # examples; `config.dataset.shuffle_buffer`
DEFAULT_HOST_PREFETCH = 2  # chunks-worth of steps a background thread reads ahead
_DATA_TAG = 1  # folded into the seed so that data order never shares seeds with anything else


def epoch_seeds(seed: int, epoch: int) -> tuple[int, int]:
    """(file-order seed, example-shuffle seed) of `epoch`: a pure function of (seed, epoch)."""
    state = np.random.SeedSequence([int(seed) % 2**63, _DATA_TAG, int(epoch)]).generate_state(2, np.uint32)
    return int(state[0]), int(state[1])


class Stream:
    """Consecutive chunks of this process's training batches, read ahead in the background.

    `batches(start_step, num_steps)` is cheap when `start_step` is where the last call
    ended (the open iterator continues); any other start re-opens the iterator at that
    step's epoch and skips to it (reading at most one epoch's share). Call `close()` (or
    use it as a context manager) to stop the reader thread.
    """

    def __init__(self, cfg, *, batch_size: int, seed: int, process_index: int | None = None,
                 process_count: int | None = None, shuffle_buffer: int | None = None,
                 host_prefetch: int = DEFAULT_HOST_PREFETCH, builder=None):
        """`cfg` is `config.dataset`; `batch_size` the global batch (`train.batch_size`);
        `seed` the run seed; process index / count default to jax's; `host_prefetch`
        steps (0 = no reader thread) are read ahead of the last chunk handed out."""
        if process_index is None or process_count is None:
            import jax

            process_index = jax.process_index() if process_index is None else process_index
            process_count = jax.process_count() if process_count is None else process_count
        self._builder = builder if builder is not None else _data.prepared_builder(cfg)
        self.info = _data.info(cfg, self._builder)
        self._layout = _data._layout(self.info.name, self._builder)
        self.process_index, self.process_count = int(process_index), int(process_count)
        self.global_batch_size, self.seed = int(batch_size), int(seed)
        self.local_batch_size = _check_layout(self.info, self.global_batch_size, self.process_index,
                                              self.process_count)
        self.steps_per_epoch = self.info.num_train // self.global_batch_size
        buffer = shuffle_buffer or _data._get(cfg, "shuffle_buffer", DEFAULT_SHUFFLE_BUFFER)
        self.shuffle_buffer = int(buffer)
        self._host_prefetch = int(host_prefetch)
        self._reader: _Reader | None = None
        self._next_step = None  # the step the open reader yields next

    def batches(self, start_step: int, num_steps: int) -> dict[str, np.ndarray]:
        """This process's batches of steps start_step .. start_step + num_steps - 1:
        `{"x": float32 [num_steps, local_B, ...], "y": int32 [num_steps, local_B] or
        float32 [num_steps, local_B, d_out]}`."""
        start_step, num_steps = int(start_step), int(num_steps)
        if start_step < 0 or num_steps < 1:
            raise ValueError(f"batches({start_step}, {num_steps}): need start_step >= 0 and num_steps >= 1")
        if self._reader is None or start_step != self._next_step:
            self._reopen(start_step, ahead=max(num_steps * self._host_prefetch, 0))
        steps = [self._reader.next() for _ in range(num_steps)]
        self._next_step = start_step + num_steps
        return {k: np.stack([s[k] for s in steps]) for k in ("x", "y")}

    @property
    def step_bytes(self) -> int:
        """Host bytes of one step's local batch (float32 / int32): a chunk of K steps holds
        K times this, and the read-ahead `host_prefetch` times more; bound K with it."""
        return self.local_batch_size * self.info.train_bytes // self.info.num_train

    def close(self) -> None:
        """Stops the reader thread and drops the open iterator (the stream can be reused)."""
        if self._reader is not None:
            self._reader.close()
        self._reader, self._next_step = None, None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _reopen(self, start_step: int, ahead: int) -> None:
        self.close()
        self._reader = _Reader(self._steps(start_step), ahead)
        self._next_step = start_step

    def _steps(self, start_step: int):
        """Per-step numpy batches from `start_step` on, epoch after epoch."""
        tfds = _tfds()
        first, skip = divmod(start_step, self.steps_per_epoch)
        for epoch in itertools.count(first):
            yield from tfds.as_numpy(self.epoch_dataset(epoch, skip))
            skip = 0

    def epoch_dataset(self, epoch: int, skip: int = 0):
        """The tf.data pipeline of `epoch`'s local batches, from its step `skip` on."""
        tfds = _tfds()
        import tensorflow as tf

        file_seed, example_seed = epoch_seeds(self.seed, epoch)
        options = tf.data.Options()
        options.deterministic = True  # parallel reads and maps keep their order
        read_config = tfds.ReadConfig(options=options, try_autocache=False, shuffle_seed=file_seed,
                                      shuffle_reshuffle_each_iteration=False)
        ds = self._builder.as_dataset(split=self._split(), shuffle_files=True, read_config=read_config)
        x_key, y_key = self._layout.x_key, self._layout.y_key
        ds = ds.map(lambda ex: {"x": ex[x_key], "y": ex[y_key]})
        ds = ds.shuffle(self.shuffle_buffer, seed=example_seed, reshuffle_each_iteration=False)
        ds = ds.batch(self.local_batch_size, drop_remainder=True).take(self.steps_per_epoch).skip(skip)
        return ds.map(self._preprocess, num_parallel_calls=tf.data.AUTOTUNE).prefetch(tf.data.AUTOTUNE)

    def _split(self):
        if self.process_count == 1:
            return "train"
        return _tfds().even_splits("train", self.process_count, drop_remainder=True)[self.process_index]

    def _preprocess(self, batch):
        """As `bn_research.data.load`: images float32 in [0, 1], labels int32, targets float32."""
        import tensorflow as tf

        x, y = batch["x"], batch["y"]
        scale = x.dtype.max if self._layout.is_image and x.dtype.is_integer else 1
        x = tf.cast(x, tf.float32) / tf.constant(scale, tf.float32)
        return {"x": x, "y": tf.cast(y, tf.int32 if self._layout.classification else tf.float32)}


def _check_layout(info, batch_size: int, process_index: int, process_count: int) -> int:
    """The local batch size; ValueError (one line) for a layout that cannot stream."""
    if process_count < 1 or not 0 <= process_index < process_count:
        raise ValueError(f"process_index={process_index} is not in [0, process_count={process_count})")
    if batch_size < 1 or batch_size % process_count:
        raise ValueError(f"train.batch_size={batch_size} does not split over {process_count} processes")
    if batch_size > info.num_train:
        raise ValueError(f"train.batch_size={batch_size} is larger than the training split of {info.name} "
                         f"({info.num_train} examples); lower it")
    return batch_size // process_count


class _Reader:
    """Pulls per-step batches from a generator, in a background thread when `ahead` > 0
    (a bounded queue of `ahead` steps), so reading overlaps the device's work."""

    _DONE = object()

    def __init__(self, steps, ahead: int):
        self._steps, self._stop = steps, threading.Event()
        self._queue: queue.Queue | None = None
        if ahead > 0:
            self._queue = queue.Queue(maxsize=ahead)
            self._thread = threading.Thread(target=self._fill, daemon=True, name="bn_research-stream")
            self._thread.start()

    def _fill(self) -> None:
        try:
            for item in self._steps:
                while not self._stop.is_set():
                    try:
                        self._queue.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if self._stop.is_set():
                    return
        except BaseException as e:  # noqa: BLE001  (re-raised in the consumer)
            self._queue.put(e)
            return
        self._queue.put(self._DONE)

    def next(self) -> dict:
        if self._queue is None:
            return next(self._steps)
        item = self._queue.get()
        if isinstance(item, BaseException):
            raise item
        if item is self._DONE:
            raise StopIteration
        return item

    def close(self) -> None:
        if self._queue is not None:
            self._stop.set()
            self._thread.join()
        self._steps.close()


def to_device(chunk: dict[str, np.ndarray], sharding=None):
    """A chunk as jax arrays: on the default device, or as global arrays over `sharding`
    (a NamedSharding of the [K, B, ...] chunk, batch axis 1 split over the mesh:
    `NamedSharding(mesh, P(None, "data"))`) from every process's local part."""
    import jax

    if sharding is None:
        return jax.device_put(chunk)
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in chunk.items()}
