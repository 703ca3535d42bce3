"""Probes against brute-force references, and end to end through train_and_evaluate."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from bn_research import config_lib, models, probes, runs, step, train
from bn_research.probes import common, drift, growth, ics, landscape, store, weights
from tests.conftest import load_config, tiny

ALL = tuple(probes.PROBES)


def small(norm="batch", **over):
    config = tiny(load_config("mlp", f"norm={norm},width=16"))
    config.model.scan_layers = False  # tests here read the unrolled layers' parameters (scanned: test_scan_probes)
    for key, v in over.items():
        node = config
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = v
    return config


def hand_ctx(config, batch_size=32):
    """Everything a probe sees in the step, built by hand outside the step."""
    s = train.setup(config)
    graphdef, state, tx = s["graphdef"], s["state"], s["tx"]
    batch = {"x": s["data"]["train"]["x"][:batch_size], "y": s["data"]["train"]["y"][:batch_size]}
    task = s["dataset"].task

    def loss_fn(params, batch_stats, batch, rng):
        out, aux, new_stats = step.forward(graphdef, params, batch_stats, batch["x"], train=True, rng=rng)
        loss, metrics = step.loss_and_metrics(task, out, batch["y"])
        return loss, (new_stats, metrics, aux)

    key = jax.random.key(3)
    grads, (new_stats, _, aux) = jax.grad(loss_fn, has_aux=True)(state["params"], state["batch_stats"], batch, key)
    updates, _ = tx.update(grads, state["opt_state"], state["params"])
    ctx = {"state": state, "batch": batch, "grads": grads, "aux": aux, "updates": updates,
           "params": optax.apply_updates(state["params"], updates), "batch_stats": new_stats,
           "noise_key": key, "loss_fn": loss_fn}
    info = {"layer_names": common.layer_names(state["params"]), "graphdef": graphdef,
            "schedule": weights.make_schedule(config)}
    return ctx, info, s


# ---------------------------------------------------------------------------------- drift


def test_unit_stats_on_hand_made_inputs():
    rng = np.random.default_rng(0)
    z = rng.normal(size=(7, 3, 5, 4)).astype(np.float32) * 3 + 1  # conv: pool batch + space
    a = rng.standard_t(3, size=(7, 3, 5, 4)).astype(np.float32)
    got = jax.jit(drift.unit_stats)(z, a)
    zf, af = z.reshape(-1, 4).astype(np.float64), a.reshape(-1, 4).astype(np.float64)
    want = {"norm_in_mean": zf.mean(0), "norm_in_var": zf.var(0), "act_in_mean": af.mean(0),
            "act_in_var": af.var(0), "act_in_p15": np.percentile(af, 15, axis=0),
            "act_in_p50": np.percentile(af, 50, axis=0), "act_in_p85": np.percentile(af, 85, axis=0)}
    assert set(got) == set(drift.STATS)
    for k, v in want.items():
        np.testing.assert_allclose(got[k], v, rtol=1e-5, atol=1e-5, err_msg=k)
    # dense layers: [B, F]; percentiles of 0..10 by linear interpolation (float32 rounding)
    col = np.arange(11, dtype=np.float32)[:, None] * np.ones((1, 2), np.float32)
    got = drift.unit_stats(col, col)
    np.testing.assert_allclose(got["act_in_p15"], [1.5, 1.5], rtol=1e-6)
    np.testing.assert_allclose(got["act_in_p50"], [5.0, 5.0], rtol=1e-6)
    np.testing.assert_allclose(got["act_in_p85"], [8.5, 8.5], rtol=1e-6)


def test_drift_outputs_are_rms_changes():
    cur = {"dense_0": {"act_in_mean": jnp.array([1.0, 2.0, 3.0, 4.0])}}
    prev = {"dense_0": {"act_in_mean": jnp.array([1.0, 2.0, 3.0, 0.0])}}
    init = {"dense_0": {"act_in_mean": jnp.array([0.0, 0.0, 0.0, 0.0])}}
    scalars, units = drift.drift_outputs("probe", cur, prev, init)
    key = "dist/dense_0/probe/act_in_mean"
    assert float(scalars[key]) == pytest.approx(2.5)
    assert float(scalars[key + "_drift"]) == pytest.approx(np.sqrt(16 / 4))
    assert float(scalars[key + "_drift_init"]) == pytest.approx(np.sqrt(30 / 4))
    np.testing.assert_array_equal(units[key], cur["dense_0"]["act_in_mean"])


# ----------------------------------------------------------------------- gradient ICS


@pytest.mark.parametrize("norm", ["batch", "noisy_batch"])
def test_ics_matches_explicit_partial_update(norm):
    """G'_i by an explicit partial update of layers j < i and a second gradient."""
    config = small(norm, **{"optimizer.name": "momentum", "model.depth": 4})
    ctx, info, _ = hand_ctx(config)
    names = info["layer_names"]
    out, _ = jax.jit(lambda: ics.measure(config, info, ctx, {}))()
    params, updates = ctx["state"]["params"], ctx["updates"]
    grad_fn = jax.jit(jax.grad(ctx["loss_fn"], has_aux=True))  # compiled once, called per layer
    for i, name in enumerate(names):
        shifted = jax.tree_util.tree_map(lambda x: x, params)
        for earlier in names[:i]:  # layers before i take their step-t update (all their parameters)
            shifted["layers"][earlier] = jax.tree_util.tree_map(
                jnp.add, params["layers"][earlier], updates["layers"][earlier])
        g2, _ = grad_fn(shifted, ctx["state"]["batch_stats"], ctx["batch"], ctx["noise_key"])
        g = np.asarray(common.kernel(ctx["grads"], name), np.float64)
        gp = np.asarray(common.kernel(g2, name), np.float64)
        diff = np.linalg.norm(g - gp)
        cos = np.sum(g * gp) / (np.linalg.norm(g) * np.linalg.norm(gp))
        s = out["scalars"]
        noise = 1e-5 * np.linalg.norm(g)  # float32 round-off of two differently compiled gradients
        assert float(s[f"ics/{name}/grad_diff"]) == pytest.approx(diff, rel=1e-3, abs=noise), name
        assert float(s[f"ics/{name}/grad_cos"]) == pytest.approx(cos, rel=1e-5), name
        assert float(s[f"ics/{name}/grad_diff_rel"]) == pytest.approx(diff / np.linalg.norm(g), rel=1e-3,
                                                                       abs=1e-5)
        if i > 0:
            assert diff > 100 * noise, name  # the earlier layers really moved
    assert float(out["scalars"][f"ics/{names[0]}/grad_diff"]) == 0.0


def test_ics_update_size_is_the_earlier_layers_update():
    """ics/<layer>/update_norm = ||u_<i|| and update_rel = ||u_<i|| / ||theta_<i|| over all
    parameters of the layers before i, by explicit concatenation."""
    config = small("batch", **{"model.depth": 3})
    ctx, info, _ = hand_ctx(config)
    out, _ = jax.jit(lambda: ics.measure(config, info, ctx, {}))()
    names = info["layer_names"]

    def flat(tree, layers):
        return np.concatenate([np.ravel(x) for n in layers for x in jax.tree_util.tree_leaves(tree["layers"][n])])

    assert float(out["scalars"][f"ics/{names[0]}/update_norm"]) == 0.0
    for i, name in enumerate(names[1:], start=1):
        u, p = flat(ctx["updates"], names[:i]), flat(ctx["state"]["params"], names[:i])
        assert u.size > 2 * 16  # kernel and batch norm scale/offset of every earlier layer
        assert float(out["scalars"][f"ics/{name}/update_norm"]) == pytest.approx(np.linalg.norm(u), rel=1e-5)
        assert float(out["scalars"][f"ics/{name}/update_rel"]) == pytest.approx(
            np.linalg.norm(u) / np.linalg.norm(p), rel=1e-5)


# -------------------------------------------------------------------------- landscape


def test_landscape_matches_python_loop():
    config = small("batch")
    config.probes.landscape.step_sizes = [0.01, 0.1, 0.5, 2.0]
    ctx, info, _ = hand_ctx(config)
    out, _ = jax.jit(lambda: landscape.measure(config, info, ctx, {}))()
    params, grads = ctx["state"]["params"], ctx["grads"]
    g_flat = np.concatenate([np.ravel(x) for x in jax.tree_util.tree_leaves(grads)]).astype(np.float64)
    loss0, _ = ctx["loss_fn"](params, ctx["state"]["batch_stats"], ctx["batch"], ctx["noise_key"])
    value_and_grad = jax.jit(jax.value_and_grad(ctx["loss_fn"], has_aux=True))  # compiled once
    losses, diffs = [], []
    for eta in config.probes.landscape.step_sizes:
        theta = jax.tree_util.tree_map(lambda p, g, eta=eta: p - eta * g, params, grads)
        (loss, _), g_eta = value_and_grad(theta, ctx["state"]["batch_stats"], ctx["batch"], ctx["noise_key"])
        ge = np.concatenate([np.ravel(x) for x in jax.tree_util.tree_leaves(g_eta)]).astype(np.float64)
        losses.append(float(loss))
        diffs.append(np.linalg.norm(g_flat - ge))
    etas = np.array(config.probes.landscape.step_sizes)
    np.testing.assert_allclose(out["units"]["landscape/grid/loss"], losses, rtol=1e-5)
    np.testing.assert_allclose(out["units"]["landscape/grid/grad_diff"], diffs, rtol=1e-3)
    s = out["scalars"]
    everything = [float(loss0)] + losses
    assert float(s["landscape/loss_min"]) == pytest.approx(min(everything), rel=1e-5)
    assert float(s["landscape/loss_range"]) == pytest.approx(max(everything) - min(everything), rel=1e-4)
    assert float(s["landscape/grad_diff_max"]) == pytest.approx(max(diffs), rel=1e-3)
    beta = max(d / (e * np.linalg.norm(g_flat)) for d, e in zip(diffs, etas, strict=True))
    assert float(s["landscape/beta"]) == pytest.approx(beta, rel=1e-3)


def test_landscape_relative_grids_are_multiples_of_the_learning_rate():
    """relative: eta = multiple x lr on a linear main grid and a log-spaced wide grid, each
    grid's loss, gradient difference, step size and beta (with its argmax) by a Python loop."""
    config = small("batch", **{"optimizer.learning_rate": 0.2})
    cfg = config.probes.landscape
    cfg.relative, cfg.step_range, cfg.num_steps, cfg.spacing = True, (0.5, 4.0), 5, "linear"
    cfg.wide_range, cfg.wide_num_steps = (0.01, 30.0), 4
    config_lib.validate(config)
    ctx, info, _ = hand_ctx(config)
    out, _ = jax.jit(lambda: landscape.measure(config, info, ctx, {}))()
    params, grads = ctx["state"]["params"], ctx["grads"]
    g_flat = np.concatenate([np.ravel(x) for x in jax.tree_util.tree_leaves(grads)]).astype(np.float64)
    loss0, _ = ctx["loss_fn"](params, ctx["state"]["batch_stats"], ctx["batch"], ctx["noise_key"])
    value_and_grad = jax.jit(jax.value_and_grad(ctx["loss_fn"], has_aux=True))
    grids = {"grid": ("landscape/", [0.5, 1.375, 2.25, 3.125, 4.0]),
             "wide_grid": ("landscape/wide/", [0.01, 0.01 * 3000 ** (1 / 3), 0.01 * 3000 ** (2 / 3), 30.0])}
    for tag, (prefix, multiples) in grids.items():
        losses, ratios = [], []
        for m in multiples:
            eta = 0.2 * m
            theta = jax.tree_util.tree_map(lambda p, g, eta=eta: p - eta * g, params, grads)
            (loss, _), g_eta = value_and_grad(theta, ctx["state"]["batch_stats"], ctx["batch"], ctx["noise_key"])
            ge = np.concatenate([np.ravel(x) for x in jax.tree_util.tree_leaves(g_eta)]).astype(np.float64)
            losses.append(float(loss))
            ratios.append(np.linalg.norm(g_flat - ge) / (eta * np.linalg.norm(g_flat)))
        np.testing.assert_allclose(out["units"][f"landscape/{tag}/step_size"], 0.2 * np.array(multiples), rtol=1e-5)
        np.testing.assert_allclose(out["units"][f"landscape/{tag}/loss"], losses, rtol=1e-5)
        s = out["scalars"]
        everything = [float(loss0)] + losses
        assert float(s[f"{prefix}loss_range"]) == pytest.approx(max(everything) - min(everything), rel=1e-4)
        assert float(s[f"{prefix}beta"]) == pytest.approx(max(ratios), rel=1e-3)
        assert float(s[f"{prefix}beta_argmax"]) == pytest.approx(multiples[int(np.argmax(ratios))], rel=1e-6)
    assert len(set(np.round(grids["wide_grid"][1], 6))) == 4  # the wide grid really spans 3.5 decades


def test_landscape_default_grid_is_the_absolute_one():
    """Backward compatible: by default eta is the absolute step_sizes grid, no wide keys."""
    config = small("batch", **{"optimizer.learning_rate": 0.3})
    ctx, info, _ = hand_ctx(config)
    out, _ = jax.jit(lambda: landscape.measure(config, info, ctx, {}))()
    np.testing.assert_allclose(out["units"]["landscape/grid/step_size"], [0.05, 0.1, 0.2, 0.4], rtol=1e-6)
    assert not any("wide" in k for k in list(out["scalars"]) + list(out["units"]))
    assert min(abs(float(out["scalars"]["landscape/beta_argmax"]) - e) for e in (0.05, 0.1, 0.2, 0.4)) < 1e-7


# ---------------------------------------------------------------------- gradient growth


def test_fit_slope_is_least_squares():
    y = np.array([3.0, 1.0, 4.0, 1.0, 5.0, 9.0])
    want = np.polyfit(np.arange(6), np.log(y), 1)[0]
    assert float(growth.fit_slope(jnp.asarray(y))) == pytest.approx(want, rel=1e-5)


def test_growth_rate_on_scaled_orthogonal_linear_net():
    """Deep linear net with W_l = s_l Q_l (Q_l orthogonal, s_l = e^{a l}): the kernel
    gradient of layer l is (prod_{j != l} s_j) P_l^T X^T D R_l with P_l, R_l norm-preserving,
    so log ||g_l||^2 = const - 2 a l exactly: slope -2a, growth factor e^{2a}. The first and
    last layers get extra scales k_0, k_L (moving their own gradients off the line by 1/k):
    the fit over the interior layers 1..L-2 must not see them."""
    a, depth, width, d_in = 0.3, 6, 16, 12
    extra = {0: 3.0, depth - 1: 0.5}
    config = load_config("deep_linear", f"depth={depth},width={width}")
    config.model.scan_layers = False  # sets each layer's kernel by name
    model = models.build(config, (d_in,), 5, seed=0)
    rng = np.random.default_rng(1)
    for i, name in enumerate(model.layer_names()):
        q, _ = np.linalg.qr(rng.normal(size=(width, width)))
        q = q[:d_in] if i == 0 else q  # first layer: orthonormal rows
        model.layers[name].linear.kernel.value = jnp.asarray(extra.get(i, 1.0) * np.exp(a * i) * q, jnp.float32)
    graphdef, params, stats = nnx.split(model, nnx.Param, nnx.BatchStat)
    x = jnp.asarray(rng.normal(size=(8, d_in)), jnp.float32)
    y = jnp.asarray(rng.normal(size=(8, 5)), jnp.float32)

    def loss(p):
        out, _, _ = step.forward(graphdef, p, stats, x, train=True)
        return step.loss_and_metrics("regression", out, y)[0]

    grads = jax.grad(loss)(params)
    ctx = {"grads": grads, "state": {"step": jnp.int32(0)}}
    info = {"layer_names": common.layer_names(params)}
    out, _ = growth.measure(config, info, ctx, growth.init(config, {"layer_names": info["layer_names"]}))
    s = out["scalars"]
    assert float(s["grad/log_sq_norm_slope"]) == pytest.approx(-2 * a, rel=1e-4)
    assert float(s["grad/growth_factor"]) == pytest.approx(np.exp(2 * a), rel=1e-4)
    norms = np.array([float(s[f"grad/dense_{i}/norm"]) for i in range(depth)])
    np.testing.assert_allclose(norms[1:-2] / norms[2:-1], np.exp(a), rtol=1e-4)
    np.testing.assert_allclose(norms[0] / norms[1], np.exp(a) / 3.0, rtol=1e-4)  # off the line: 1 / k_0
    np.testing.assert_allclose(norms[-2] / norms[-1], np.exp(a) * 0.5, rtol=1e-4)  # 1 / k_L


# --------------------------------------------------------------------- length-direction


@pytest.mark.parametrize("norm, invariant", [("batch", True), ("layer", True), ("weight", True),
                                             ("none", False)])
def test_grad_is_orthogonal_to_scale_invariant_weights(norm, invariant):
    """L(c w) = L(w) implies <dL/dw, w> = 0 (epsilon = 0 makes BN/LN exactly invariant)."""
    config = small(norm, **{"norm.epsilon": 0.0, "norm.wn_data_init": False})
    ctx, info, _ = hand_ctx(config)
    out, _ = jax.jit(lambda: weights.measure(config, info, ctx, {}))()
    s = out["scalars"]
    cosines = [abs(float(s[f"weights/{n}/grad_w_cos"])) for n in info["layer_names"]]
    if invariant:
        assert max(cosines) < 1e-4, cosines
        assert all(f"weights/{n}/eff_lr" in s for n in info["layer_names"])
    else:
        assert max(cosines) > 1e-3, cosines
        assert not any(k.endswith("eff_lr") for k in s)


@pytest.mark.parametrize("norm, invariant", [("weight", True), ("batch", True), ("none", False)])
def test_sgd_grows_the_squared_norm_of_scale_invariant_weights(norm, invariant):
    """Plain SGD: ||v'||^2 = ||v||^2 + eta^2 ||dL/dv||^2 when dL/dv is orthogonal to v
    (Salimans & Kingma 2016, sec. 2.2); the logged growth is ||v'||^2 - ||v||^2 of the step.
    Without normalization <w, dL/dw> != 0 and the growth is something else."""
    config = small(norm, **{"norm.epsilon": 0.0, "norm.wn_data_init": False, "norm.wn_init_std": 0.05})
    ctx, info, _ = hand_ctx(config)
    out, _ = jax.jit(lambda: weights.measure(config, info, ctx, {}))()
    s = out["scalars"]
    off = []
    for n in info["layer_names"]:
        v0 = np.asarray(common.kernel(ctx["state"]["params"], n), np.float64)
        v1 = np.asarray(common.kernel(ctx["params"], n), np.float64)
        growth = float(s[f"weights/{n}/sq_norm_growth"])
        assert growth == pytest.approx(np.sum(v1**2) - np.sum(v0**2), rel=1e-3)
        g = np.asarray(common.kernel(ctx["grads"], n), np.float64)
        assert float(s[f"weights/{n}/sq_norm_growth_sgd"]) == pytest.approx(0.5**2 * np.sum(g**2), rel=1e-5)
        pred = float(s[f"weights/{n}/sq_norm_growth_sgd"])
        if invariant:  # up to float32 rounding of the stored v' (~eps ||v||^2)
            assert abs(growth - pred) <= 1e-3 * pred + 1e-6 * np.sum(v0**2), n
        off.append(abs(growth / pred - 1))
    if not invariant:
        assert max(off) > 0.1, off  # at init a layer's gradient can be nearly orthogonal by chance


def test_weight_stats_against_numpy():
    config = small("weight")
    ctx, info, _ = hand_ctx(config)
    out, _ = jax.jit(lambda: weights.measure(config, info, ctx, {}))()
    lr = config.optimizer.learning_rate
    for n in info["layer_names"]:
        lin = ctx["state"]["params"]["layers"][n]["linear"]
        v, g = np.asarray(lin["kernel"].value, np.float64), np.asarray(lin["g"].value, np.float64)
        w = g * v / np.linalg.norm(v, axis=0)
        lin2 = ctx["params"]["layers"][n]["linear"]
        v2, g2 = np.asarray(lin2["kernel"].value, np.float64), np.asarray(lin2["g"].value, np.float64)
        w2 = g2 * v2 / np.linalg.norm(v2, axis=0)
        cos = np.sum(w * w2) / (np.linalg.norm(w) * np.linalg.norm(w2))
        s = out["scalars"]
        assert float(s[f"weights/{n}/w_norm"]) == pytest.approx(np.linalg.norm(w), rel=1e-5)
        assert float(s[f"weights/{n}/v_norm"]) == pytest.approx(np.linalg.norm(v), rel=1e-5)
        assert float(s[f"weights/{n}/angle"]) == pytest.approx(np.arccos(min(cos, 1.0)), rel=1e-2, abs=1e-6)
        np.testing.assert_allclose(out["units"][f"weights/{n}/eff_lr"], lr / np.sum(v * v, 0), rtol=1e-5)


def test_angle_is_accurate_for_small_and_large_angles():
    for t in (1e-5, 0.3, 2.5):
        a = jnp.array([1.0, 0.0, 0.0])
        b = 3.0 * jnp.array([np.cos(t), np.sin(t), 0.0], jnp.float32)
        assert float(common.angle(a, b)) == pytest.approx(t, rel=1e-4)


# ----------------------------------------------------------------- recorder and store


def test_recorder_rows_land_on_the_right_steps(tmp_path):
    config = small("batch")
    layout = {("growth", "scalars"): [("grad/dense_0/norm", 1), ("grad/growth_factor", 1)],
              ("weights", "scalars"): [("weights/dense_0/w_norm", 1)],
              ("drift", "units"): [("dist/dense_0/train/act_in_mean", 3)]}
    rec = probes.Recorder(config, tmp_path, ["dense_0"], layout)
    host = {"loss": np.zeros(5), "probes/growth/valid": np.array([False, True, False, False, True]),
            "probes/growth/scalars": np.stack([np.arange(5.0), -np.arange(5.0)], 1),
            "probes/weights/valid": np.zeros(5, bool),
            "probes/weights/scalars": np.ones((5, 1)),
            "probes/drift/valid": np.array([True, False, False, False, False]),
            "probes/drift/units": np.arange(15.0).reshape(5, 3)}
    rows = rec.record(10, host)
    assert rows == {7: {"grad/dense_0/norm": 1.0, "grad/growth_factor": -1.0},
                    10: {"grad/dense_0/norm": 4.0, "grad/growth_factor": -4.0}}
    df = probes.read_layer_stats(tmp_path)
    assert list(df.columns) == store.COLUMNS
    assert df["step"].tolist() == [6, 6, 6] and df["value"].tolist() == [0.0, 1.0, 2.0]
    assert set(df["layer"]) == {"dense_0"} and set(df["stat"]) == {"dist/train/act_in_mean"}


def test_probe_layout_is_the_packed_order_of_the_traced_step():
    """`StepFns.probe_layout` (abstract shapes, nothing compiled) matches the vectors the
    jitted step really emits: same total size per probe and kind, keys in sorted order."""
    config = small("batch")
    s = train.setup(config)
    layout = s["probe_layout"]
    _, metrics = jax.jit(s["fns"].train_step)(s["state"], s["data"]["train"])
    assert layout and set(layout) == {(n, k) for n in probes.enabled(config) for k in ("scalars", "units")}
    for (name, kind), entries in layout.items():
        keys = [k for k, _ in entries]
        assert keys == sorted(keys)
        packed = metrics.get(f"probes/{name}/{kind}")
        assert (0 if packed is None else packed.shape[0]) == sum(size for _, size in entries), (name, kind)
    assert ("drift", "units") in layout and any(k.startswith("dist/dense_0/") for k, _ in layout[("drift", "units")])


def test_truncated_chunk_is_skipped(tmp_path):
    store.write_chunk(tmp_path, 10, [10], {("dense_0", "s"): np.ones((1, 4))}, tag="drift")
    last = store.write_chunk(tmp_path, 20, [20], {("dense_0", "s"): np.ones((1, 4))}, tag="drift")
    data = last.read_bytes()
    last.write_bytes(data[: len(data) // 2])  # cut off mid-write
    (tmp_path / store.DIRNAME / ".chunk_0000000030_drift.npz.tmp1").write_bytes(b"partial")
    df = probes.read_layer_stats(tmp_path)
    assert df["step"].tolist() == [10] * 4
    assert len(probes.read_layer_stats(tmp_path / "nowhere")) == 0


def test_validate_rejects_bad_probe_settings():
    config = small()
    config.probes.ics.every = -1
    with pytest.raises(config_lib.ConfigError, match="probes.ics.every"):
        config_lib.validate(config)
    config = small()
    config.probes.landscape.step_sizes = []
    with pytest.raises(config_lib.ConfigError, match="step_sizes"):
        config_lib.validate(config)
    for key, bad, match in (("step_range", (4.0, 0.5), "step_range"), ("wide_range", (0.0, 30.0), "wide_range"),
                            ("spacing", "cubic", "spacing"), ("num_steps", 0, "step_range")):
        config = small()
        config.probes.landscape.relative = True
        config.probes.landscape[key] = bad
        with pytest.raises(config_lib.ConfigError, match=match):
            config_lib.validate(config)


# ------------------------------------------------------------------------ end to end


def test_probes_do_not_change_training():
    """The probes only observe: the trajectory with every probe on equals the one without."""
    on, off = small("noisy_batch", **{"model.depth": 2}), small("noisy_batch", **{"model.depth": 2})
    for name in ALL:
        on.probes[name].enabled, on.probes[name].every = True, 3
        off.probes[name].enabled = False
    finals = []
    for config in (on, off):
        s = train.setup(config)
        chunk = jax.jit(s["fns"].train_chunk, static_argnums=2)
        state, metrics = chunk(s["state"], s["data"]["train"], 7)
        finals.append((state, metrics["loss"]))
    np.testing.assert_allclose(finals[0][1], finals[1][1], rtol=1e-6)
    for key in ("params", "batch_stats", "opt_state"):
        for a, b in zip(jax.tree_util.tree_leaves(finals[0][0][key]), jax.tree_util.tree_leaves(finals[1][0][key]),
                        strict=True):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)


def test_every_probe_end_to_end(tmp_path):
    config = small("batch")
    for name in ALL:
        config.probes[name].enabled = True
    summary = train.train_and_evaluate(config, tmp_path)
    assert summary["status"] == "completed"
    lines = {x["step"]: x for x in map(json.loads, (tmp_path / "metrics.jsonl").read_text().splitlines())}
    assert sorted(lines) == [1, 10, 20]  # first step (initialization) + every log step
    names = ["dense_0", "dense_1", "dense_2"]
    expected = ["grad/growth_factor", "grad/log_sq_norm_slope", "landscape/beta", "landscape/loss_range",
                "landscape/grad_diff_max"]
    for n in names:
        expected += [f"ics/{n}/grad_diff", f"ics/{n}/grad_cos", f"grad/{n}/norm", f"weights/{n}/w_norm",
                     f"weights/{n}/angle", f"weights/{n}/eff_lr", f"weights/{n}/grad_dot_w"]
        for src in drift.SOURCES:
            for stat in drift.STATS:
                expected += [f"dist/{n}/{src}/{stat}", f"dist/{n}/{src}/{stat}_drift",
                             f"dist/{n}/{src}/{stat}_drift_init"]
    for step_, row in lines.items():
        for key in expected:
            assert key in row, (step_, key)
            assert np.isfinite(row[key]), (step_, key)
    assert lines[1]["dist/dense_1/probe/act_in_p50_drift_init"] == 0.0
    assert lines[20]["dist/dense_1/probe/act_in_p50_drift_init"] > 0.0

    run = runs.load(tmp_path)
    ls = run.layer_stats
    assert list(ls.columns) == runs.UNIT_TIDY  # the same names as metrics.jsonl
    assert sorted(ls["step"].unique()) == [1, 10, 20]
    assert set(ls["layer"]) >= set(names)
    assert set(ls["key"]) - {"landscape/grid/loss", "landscape/grid/grad_diff", "landscape/grid/step_size"} \
        <= set(lines[20])
    one = ls[ls.key == "dist/dense_1/probe/act_in_mean"]
    assert set(one.layer) == {"dense_1"} and set(one.split) == {"probe"} and set(one.stat) == {"act_in_mean"}
    assert len(one) == 3 * 16 and np.isfinite(one["value"]).all()
    # the logged drift is the RMS change of the stored per-unit values between cadence points
    v = {s: one[one.step == s].sort_values("unit")["value"].to_numpy(np.float64) for s in (1, 10, 20)}
    assert lines[20]["dist/dense_1/probe/act_in_mean_drift"] == pytest.approx(
        np.sqrt(np.mean((v[20] - v[10]) ** 2)), rel=1e-4)
    assert lines[20]["dist/dense_1/probe/act_in_mean_drift_init"] == pytest.approx(
        np.sqrt(np.mean((v[20] - v[1]) ** 2)), rel=1e-4)


def test_percentiles_on_a_strided_subsample():
    a = np.random.default_rng(2).normal(size=(1000, 3)).astype(np.float32)
    got = drift.percentiles(jnp.asarray(a), max_samples=300)  # stride ceil(1000 / 300) = 4
    want = np.percentile(a[::4].astype(np.float64), drift.PERCENTILES, axis=0)
    np.testing.assert_allclose(np.stack(got), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("n", [40, 1000])  # pairwise ranks (n * n * 3 <= PAIRWISE_MAX_ELEMENTS) and bisection
def test_percentiles_with_ties_match_numpy(n):
    assert (n * n * 3 <= drift.PAIRWISE_MAX_ELEMENTS) == (n == 40)
    a = np.random.default_rng(n).integers(0, 5, size=(n, 3)).astype(np.float32)  # many ties
    got = jax.jit(drift.percentiles)(jnp.asarray(a))
    np.testing.assert_allclose(np.stack(got), np.percentile(a, drift.PERCENTILES, axis=0), rtol=1e-6)


def test_order_statistics_by_bisection_are_exact():
    """Every order statistic of columns with negative values, +-0, ties, huge and tiny
    magnitudes and infinities equals the sorted column's entry bit for bit (0 == -0)."""
    rng = np.random.default_rng(5)
    a = rng.standard_t(2, size=(300, 4)).astype(np.float32) * np.float32([1, 1e-30, 1e30, 1])
    a[:7, 0], a[7:12, 0], a[:40, 3] = 0.0, -0.0, 2.5
    a[0, 1], a[1, 1] = np.inf, -np.inf
    ranks = tuple(range(300))
    got = np.asarray(jax.jit(lambda x: drift.order_statistics(x, ranks))(jnp.asarray(a)))
    np.testing.assert_array_equal(got, np.sort(a, axis=0))


def test_store_truncate_drops_chunks_after_step(tmp_path):
    """On resume from step 20, chunks that end after 20 are removed, earlier ones kept."""
    import numpy as np

    from bn_research.probes import store

    for end in (10, 20, 30):
        store.write_chunk(tmp_path, end, [end], {("dense_0", "x"): np.ones((1, 3))}, tag="drift")
    assert store.truncate(tmp_path, 20) == 1
    assert sorted(store.read(tmp_path)["step"].unique()) == [10, 20]
