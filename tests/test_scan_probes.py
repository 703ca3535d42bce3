"""Probes on a scanned stack (`model.scan_layers`): every layer under its own name, the
same keys and values as the unrolled model, on the host (metrics.jsonl, layer_stats)."""

import json

import jax
import numpy as np
import pytest
from flax import nnx

from bn_research import models, probes, train
from bn_research.probes import common
from tests.conftest import load_config, tiny

DEPTH = 5


def _config(arg, scan: bool):
    config = tiny(load_config("mlp", f"{arg},depth={DEPTH},width=8"))
    config.model.scan_layers, config.model.scan_min_depth = scan, 3
    for name in config.probes:
        config.probes[name].enabled = True
    config.probes.drift.probe_batch_size = 16
    return config


def _rows(workdir):
    with open(workdir / "metrics.jsonl") as f:
        return [json.loads(line) for line in f]


@pytest.mark.parametrize("arg", ["norm=batch", "norm=weight", "norm=noisy_batch,model.residual=true"])
def test_scanned_init_is_the_unrolled_init(arg):
    """Same RNG draws per layer: every layer's variables (after weight-norm data init too)."""
    x = np.random.default_rng(0).normal(size=(16, 8, 8, 1)).astype(np.float32)
    trees = []
    for scan in (False, True):
        model = models.build(_config(arg, scan), (8, 8, 1), 10, seed=3)
        models.data_init(model, x)
        assert model.scan_layers == scan
        trees.append(nnx.state(model, nnx.Param))
    plain, scanned = trees
    names = [f"dense_{i}" for i in range(DEPTH)]
    assert common.layer_names(plain) == common.layer_names(scanned) == names
    for name in names:
        for a, b in zip(jax.tree_util.tree_leaves(common.layer(plain, name)),
                        jax.tree_util.tree_leaves(common.layer(scanned, name)), strict=True):
            np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-6, atol=1e-7, err_msg=name)


@pytest.mark.parametrize("arg", ["norm=weight,optimizer.name=momentum"])  # weight: data init on the stack too
def test_probes_match_unrolled(tmp_path, arg):
    """Every probe on: identical metrics.jsonl keys and per-unit store entries, values to
    float tolerance, with and without scan over layers."""
    out = {}
    for scan in (False, True):
        workdir = tmp_path / f"scan_{scan}"
        summary = train.train_and_evaluate(_config(arg, scan), workdir)
        assert summary["status"] == "completed"
        out[scan] = _rows(workdir), probes.read_layer_stats(workdir)
    (rows_p, units_p), (rows_s, units_s) = out[False], out[True]
    assert [r["step"] for r in rows_s] == [r["step"] for r in rows_p]
    for rp, rs in zip(rows_p, rows_s, strict=True):
        assert set(rs) == set(rp)
        for layer in range(DEPTH):  # every layer measured by every per-layer probe
            for ns in ("dist", "grad", "weights", "ics"):
                assert any(k.startswith(f"{ns}/dense_{layer}/") for k in rp), (ns, layer)
        for key, v in rp.items():
            np.testing.assert_allclose(rs[key], v, rtol=1e-4, atol=1e-5, err_msg=key)
    keys = ["step", "layer", "stat", "unit"]
    assert units_s[keys].equals(units_p[keys])
    assert set(units_p["layer"]) >= {f"dense_{i}" for i in range(DEPTH)}
    np.testing.assert_allclose(units_s["value"], units_p["value"], rtol=1e-4, atol=1e-5)
