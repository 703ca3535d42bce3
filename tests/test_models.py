"""Models: layer names, aux contents, placement, residual composition, registries, seeding,
and the split/merge forward used by the train step; brute-force references in float64."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from bn_research import config_lib, models, norms, step

TOL = dict(rtol=1e-5, atol=1e-5)
MLP_INPUT, CNN_INPUT, OUTPUT_DIM = (2, 3), (8, 8, 3), 5


def _config(name="mlp", norm="batch", activation="tanh", depth=3, width=8, **norm_opts):
    config = config_lib.base_config()
    config.model.name = name
    config.model.norm = norm
    config.model.activation = activation
    config.model.depth = depth
    config.model.width = width
    config.norm.num_groups = 4
    config.model.scan_layers = False  # these tests read the unrolled layers (model.layers[name])
    for key, value in norm_opts.items():
        config.norm[key] = value
    return config


def _x(shape, seed=0, batch=6):
    return jnp.asarray(np.random.default_rng(seed).normal(0.3, 1.5, (batch,) + shape),
                       jnp.float32)


def _num(array):
    return np.asarray(array, np.float64)


def _flat_params(model):
    return jax.tree.leaves(nnx.state(model, nnx.Param))


# --------------------------------------------------------------------------------------
# Every model with every variant


@pytest.mark.parametrize("norm", list(norms.NORMS))
@pytest.mark.parametrize("name", ["mlp", "cnn", "deep_linear"])
def test_build_every_model_with_every_norm(name, norm):
    activation = "linear" if name == "deep_linear" else "relu"
    config = _config(name, norm, activation)
    input_shape = CNN_INPUT if name == "cnn" else MLP_INPUT
    model = models.build(config, input_shape, OUTPUT_DIM, seed=0)
    x = _x(input_shape)
    out, aux = model(x, train=True, rng=jax.random.key(0))
    assert out.shape == (6, OUTPUT_DIM)
    assert np.all(np.isfinite(np.asarray(out)))
    prefix = "conv" if name == "cnn" else "dense"
    names = [f"{prefix}_{i}" for i in range(config.model.depth)]
    assert list(aux) == names
    assert model.layer_names() == names
    known = {"norm_in_moments", "act_in_moments"} if norm == "batch" else set()
    for i, layer_name in enumerate(names):
        assert set(aux[layer_name]) == {"norm_in", "act_in"} | known
        for key in known:
            assert aux[layer_name][key].shape == (2, aux[layer_name]["act_in"].shape[-1])
        for value in (aux[layer_name]["norm_in"], aux[layer_name]["act_in"]):
            if name == "cnn":
                assert value.ndim == 4 and value.shape[0] == 6
                assert value.shape[-1] == config.model.width * 2 ** (i // 2)
            else:
                assert value.shape == (6, config.model.width)
            assert np.all(np.isfinite(np.asarray(value)))
    top = set(nnx.state(model).keys())
    assert "head" in top and isinstance(model.head, norms.Dense)
    assert set(nnx.state(model)["layers"].keys()) == set(names)
    # Evaluation works straight after a training call (running statistics exist).
    out_eval, _ = model(x, train=False)
    assert out_eval.shape == (6, OUTPUT_DIM)


# --------------------------------------------------------------------------------------
# Placement and composition


@pytest.mark.parametrize("norm", ["batch", "layer", "noisy_batch"])
@pytest.mark.parametrize("placement", ["before", "after"])
def test_placement_aux_semantics(placement, norm):
    config = _config("mlp", norm, "tanh", depth=2, placement=placement)
    model = models.build(config, MLP_INPUT, OUTPUT_DIM, seed=1)
    x = _x(MLP_INPUT, seed=1)
    key = jax.random.key(7)
    # Reference layers on an identical copy, applied by hand with the same per-layer keys.
    ref = models.build(config, MLP_INPUT, OUTPUT_DIM, seed=1)
    out, aux = model(x, train=True, rng=key)
    h = x.reshape((6, -1))
    for i, layer_name in enumerate(["dense_0", "dense_1"]):
        layer = ref.layers[layer_name]
        z = layer.linear(h)
        rng = jax.random.fold_in(key, i)
        if placement == "before":
            a = layer.norm(z, train=True, rng=rng)
            np.testing.assert_allclose(np.asarray(aux[layer_name]["norm_in"]), z, **TOL)
            np.testing.assert_allclose(np.asarray(aux[layer_name]["act_in"]), a, **TOL)
            h = jnp.tanh(a)
        else:
            u = jnp.tanh(z)
            np.testing.assert_allclose(np.asarray(aux[layer_name]["act_in"]), z, **TOL)
            np.testing.assert_allclose(np.asarray(aux[layer_name]["norm_in"]), u, **TOL)
            h = layer.norm(u, train=True, rng=rng)
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref.head(h)), **TOL)


def _brute_moments(x):
    """[2, U] mean and biased variance over all axes but the last, in float64."""
    x = _num(x).reshape(-1, x.shape[-1])
    return np.stack([x.mean(0), ((x - x.mean(0)) ** 2).mean(0)])


@pytest.mark.parametrize("name,placement", [("mlp", "before"), ("cnn", "before"), ("mlp", "after")])
def test_batch_norm_moments_in_aux_equal_the_activations_moments(name, placement):
    """The moments batch norm hands to the probes (its batch statistics, and the output's
    derived from them) are those of the aux arrays themselves, with gamma and beta away
    from 1 and 0; with 'after' only the norm input's are given (the act input is the
    pre-norm z)."""
    config = _config(name, "batch", "tanh", depth=2, placement=placement)
    input_shape = CNN_INPUT if name == "cnn" else MLP_INPUT
    model = models.build(config, input_shape, OUTPUT_DIM, seed=3)
    rng = np.random.default_rng(4)
    for layer_name in model.layer_names():
        norm = model.layers[layer_name].norm
        norm.scale.value = jnp.asarray(rng.uniform(0.3, 2.0, norm.scale.value.shape), jnp.float32)
        norm.bias.value = jnp.asarray(rng.normal(0.0, 1.0, norm.bias.value.shape), jnp.float32)
    _, aux = model(_x(input_shape, seed=5), train=True, rng=jax.random.key(0))
    for layer_name in model.layer_names():
        a = aux[layer_name]
        np.testing.assert_allclose(_num(a["norm_in_moments"]), _brute_moments(a["norm_in"]), rtol=1e-5, atol=1e-6)
        if placement == "before":
            np.testing.assert_allclose(_num(a["act_in_moments"]), _brute_moments(a["act_in"]), rtol=1e-4, atol=1e-5)
        else:
            assert "act_in_moments" not in a


@pytest.mark.parametrize("norm,opts", [("batch", {"virtual_batch_size": 3}), ("noisy_batch", {}),
                                       ("layer", {}), ("none", {})])
def test_no_moments_in_aux_where_the_normalizer_does_not_have_them(norm, opts):
    """Ghost batches (statistics of groups), noise (moves the output) and normalizers
    without batch statistics leave the moments to the probes."""
    config = _config("mlp", norm, "tanh", depth=2, **opts)
    model = models.build(config, MLP_INPUT, OUTPUT_DIM, seed=3)
    _, aux = model(_x(MLP_INPUT), train=True, rng=jax.random.key(0))
    for layer_name in model.layer_names():
        assert set(aux[layer_name]) == {"norm_in", "act_in"}
    _, aux = model(_x(MLP_INPUT), train=False)
    assert all(set(aux[n]) == {"norm_in", "act_in"} for n in model.layer_names())


def test_residual_mlp_composition():
    config = _config("mlp", "batch", "tanh", depth=4)
    config.model.residual = True
    model = models.build(config, MLP_INPUT, OUTPUT_DIM, seed=2)
    x = _x(MLP_INPUT, seed=2)
    model(x, train=True, rng=jax.random.key(0))  # move the running statistics off init
    for train in (False, True):
        ref = nnx.clone(model)
        out, aux = model(x, train=train, rng=jax.random.key(1))
        h = x.reshape((6, -1))
        for i in range(4):
            f_h, _ = ref.layers[f"dense_{i}"](h, train=train, rng=None)
            h = f_h if i == 0 else h + f_h  # h_{i+1} = h_i + f(h_i) after the first layer
        np.testing.assert_allclose(np.asarray(out), np.asarray(ref.head(h)), **TOL)
    # Not a plain MLP: dropping the skips changes the output.
    plain = nnx.clone(model)
    plain.residual = False
    out_plain, _ = plain(x, train=False)
    out_res, _ = model(x, train=False)
    assert np.max(np.abs(np.asarray(out_plain) - np.asarray(out_res))) > 1e-3


def test_linear_mlp_without_norm_is_product_of_affine_maps():
    config = _config("mlp", "none", "linear", depth=3, width=4)
    model = models.build(config, MLP_INPUT, OUTPUT_DIM, seed=3)
    rng = np.random.default_rng(3)
    layers = [model.layers[f"dense_{i}"].linear for i in range(3)] + [model.head]
    for lin in layers:  # non-zero biases so that they are tested too
        lin.bias[...] = jnp.asarray(rng.normal(size=lin.bias[...].shape), jnp.float32)
    x = _x(MLP_INPUT, seed=3)
    out, _ = model(x, train=True)
    h = _num(x).reshape(6, -1)
    for lin in layers:
        w, b = _num(lin.kernel[...]), _num(lin.bias[...])
        nxt = np.zeros((h.shape[0], w.shape[1]))
        for n in range(h.shape[0]):
            for j in range(w.shape[1]):
                nxt[n, j] = sum(h[n, k] * w[k, j] for k in range(w.shape[0])) + b[j]
        h = nxt
    np.testing.assert_allclose(np.asarray(out), h, **TOL)
    # deep_linear with norm='none' is the same network.
    deep = models.build(_config("deep_linear", "none", "linear", depth=3, width=4),
                        MLP_INPUT, OUTPUT_DIM, seed=3)
    for a, b in zip(_flat_params(deep), _flat_params(
            models.build(config, MLP_INPUT, OUTPUT_DIM, seed=3)), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


# --------------------------------------------------------------------------------------
# Errors


def test_deep_linear_rejects_nonlinear_activation():
    with pytest.raises(ValueError, match="linear"):
        models.build(_config("deep_linear", "batch", "relu"), MLP_INPUT, OUTPUT_DIM, seed=0)


def test_unknown_model_and_activation_list_choices():
    with pytest.raises(ValueError) as err:
        models.build(_config("bogus_net"), MLP_INPUT, OUTPUT_DIM, seed=0)
    for name in ("mlp", "cnn", "deep_linear"):
        assert name in str(err.value)
    for name in models.MODELS:
        assert name in str(err.value)
    with pytest.raises(ValueError) as err:
        models.build(_config("mlp", activation="swishy"), MLP_INPUT, OUTPUT_DIM, seed=0)
    for name in ("sigmoid", "tanh", "relu", "linear"):
        assert name in str(err.value)
    with pytest.raises(ValueError) as err:
        models.build(_config("cnn", activation="swishy"), CNN_INPUT, OUTPUT_DIM, seed=0)
    assert "relu" in str(err.value)


def test_cnn_rejects_flat_input():
    with pytest.raises(ValueError, match="cnn"):
        models.build(_config("cnn"), (12,), OUTPUT_DIM, seed=0)


# --------------------------------------------------------------------------------------
# Seeding


@pytest.mark.parametrize("name", ["mlp", "cnn"])
def test_seed_determines_params(name):
    input_shape = CNN_INPUT if name == "cnn" else MLP_INPUT
    config = _config(name, "batch", "relu")
    a, b, c = (models.build(config, input_shape, OUTPUT_DIM, seed=s) for s in (4, 4, 5))
    pa, pb, pc = _flat_params(a), _flat_params(b), _flat_params(c)
    assert len(pa) == len(pb) == len(pc) > 0
    for la, lb in zip(pa, pb, strict=True):
        np.testing.assert_array_equal(np.asarray(la), np.asarray(lb))
    sa, sc = nnx.state(a, nnx.Param), nnx.state(c, nnx.Param)
    layer0 = "conv_0" if name == "cnn" else "dense_0"
    for path in (("layers", layer0, "linear", "kernel"), ("head", "kernel")):
        va, vc = sa, sc
        for key in path:
            va, vc = va[key], vc[key]
        assert not np.allclose(np.asarray(va[...]), np.asarray(vc[...]))


# --------------------------------------------------------------------------------------
# Functional forward (split / merge), as used by the train step


def test_forward_train_updates_and_returns_batch_stats():
    momentum = 0.9
    config = _config("mlp", "batch", "tanh", depth=2, momentum=momentum)
    model = models.build(config, MLP_INPUT, OUTPUT_DIM, seed=6)
    graphdef, params, batch_stats = nnx.split(model, nnx.Param, nnx.BatchStat)
    before = jax.tree.map(np.asarray, jax.tree.leaves(batch_stats))
    x = _x(MLP_INPUT, seed=6)
    out, aux, new_stats = step.forward(graphdef, params, batch_stats, x, train=True,
                                       rng=jax.random.key(0))
    assert out.shape == (6, OUTPUT_DIM)
    # The inputs are untouched (merge copies), the returned stats follow the recursion.
    for old, now in zip(before, jax.tree.leaves(batch_stats), strict=True):
        np.testing.assert_array_equal(old, np.asarray(now))
    for layer_name in ("dense_0", "dense_1"):
        z = _num(aux[layer_name]["norm_in"])
        stats = new_stats["layers"][layer_name]["norm"]
        mean = np.array([z[:, j].sum() / 6 for j in range(z.shape[1])])
        var = np.array([((z[:, j] - mean[j]) ** 2).sum() / 6 for j in range(z.shape[1])])
        np.testing.assert_allclose(np.asarray(stats["mean"][...]), (1 - momentum) * mean,
                                   **TOL)
        np.testing.assert_allclose(np.asarray(stats["var"][...]),
                                   momentum + (1 - momentum) * var, **TOL)
    # Evaluation with the returned stats normalizes by them, not by the batch.
    _, aux_eval, same_stats = step.forward(graphdef, params, new_stats, x, train=False)
    stats = new_stats["layers"]["dense_0"]["norm"]
    z = _num(aux_eval["dense_0"]["norm_in"])
    layer_params = params["layers"]["dense_0"]["norm"]
    expect = ((z - _num(stats["mean"][...])) / np.sqrt(_num(stats["var"][...]) + 1e-5)
              * _num(layer_params["scale"][...]) + _num(layer_params["bias"][...]))
    np.testing.assert_allclose(np.asarray(aux_eval["dense_0"]["act_in"]), expect, **TOL)
    for a, b in zip(jax.tree.leaves(new_stats), jax.tree.leaves(same_stats), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_forward_under_jit_matches_eager():
    config = _config("cnn", "noisy_batch", "relu", depth=2)
    model = models.build(config, CNN_INPUT, OUTPUT_DIM, seed=7)
    graphdef, params, batch_stats = nnx.split(model, nnx.Param, nnx.BatchStat)
    x, key = _x(CNN_INPUT, seed=7, batch=4), jax.random.key(3)

    def fwd(params, batch_stats, x, key):
        out, _, stats = step.forward(graphdef, params, batch_stats, x, train=True, rng=key)
        return out, stats

    out_jit, stats_jit = jax.jit(fwd)(params, batch_stats, x, key)
    out_eager, stats_eager = fwd(params, batch_stats, x, key)
    np.testing.assert_allclose(np.asarray(out_jit), np.asarray(out_eager), **TOL)
    for a, b in zip(jax.tree.leaves(stats_jit), jax.tree.leaves(stats_eager), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), **TOL)
    assert any(np.max(np.abs(np.asarray(a) - np.asarray(b))) > 1e-4
               for a, b in zip(jax.tree.leaves(stats_jit), jax.tree.leaves(batch_stats),
                               strict=True))


def test_layer_order_survives_split_merge():
    """Depth >= 11: nnx.merge rebuilds the layer Dict in sorted key order (dense_0, dense_1,
    dense_10, ...); the forward pass must still run dense_0 ... dense_11 in depth order."""
    import jax
    from flax import nnx

    from bn_research import config_lib, step

    c = config_lib.base_config()
    c.model.update(name="mlp", depth=12, width=8, activation="tanh", norm="none")
    model = models.build(c, (5,), 3, seed=0)
    x = jax.random.normal(jax.random.key(0), (4, 5))
    expected, _ = model(x, train=False)
    graphdef, params, stats = nnx.split(model, nnx.Param, nnx.BatchStat)
    merged = nnx.merge(graphdef, params, stats)
    assert merged.layer_names() == [f"dense_{i}" for i in range(12)]
    got, aux, _ = step.forward(graphdef, params, stats, x, train=False)
    np.testing.assert_allclose(np.asarray(got), np.asarray(expected), rtol=1e-6, atol=1e-6)
    assert list(aux) == [f"dense_{i}" for i in range(12)]
