"""Normalizers and weight-normalized linear maps against brute-force float64 references.

References are written as explicit loops in numpy float64, following the papers'
equations; the modules run in float32, so tolerances are float32 round-off, not slack.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from scipy import stats

from bn_research import norms

TOL = dict(rtol=1e-5, atol=1e-5)


def _cfg(**overrides):
    cfg = norms.default_config()
    for key, value in overrides.items():
        cfg[key] = value
    return cfg


def _rand(seed, shape, scale=1.0, shift=0.0):
    return np.random.default_rng(seed).normal(shift, scale, shape).astype(np.float32)


def _set(variable, value):
    variable[...] = jnp.asarray(value, jnp.float32)


def _num(variable):
    return np.asarray(variable[...], np.float64)


# --------------------------------------------------------------------------------------
# Brute-force references (float64, explicit loops over units / examples / groups)


def _bn_ref(x, gamma, beta, eps):
    """Ioffe & Szegedy 2015, Alg. 1, one feature (last axis) at a time."""
    x = np.asarray(x, np.float64)
    y = np.empty_like(x)
    means, variances = np.empty(x.shape[-1]), np.empty(x.shape[-1])
    for c in range(x.shape[-1]):
        vals = x[..., c].ravel()
        m = len(vals)
        mu = sum(vals) / m
        var = sum((v - mu) ** 2 for v in vals) / m
        y[..., c] = gamma[c] * (x[..., c] - mu) / np.sqrt(var + eps) + beta[c]
        means[c], variances[c] = mu, var
    return y, means, variances


def _bn_backward_ref(x, gamma, dy, eps):
    """The chain-rule equations of Ioffe & Szegedy 2015, sec. 3, for a [m, F] batch."""
    x, dy = np.asarray(x, np.float64), np.asarray(dy, np.float64)
    m, f = x.shape
    dx, dgamma, dbeta = np.empty_like(x), np.empty(f), np.empty(f)
    for c in range(f):
        xi, dyi = x[:, c], dy[:, c]
        mu = xi.sum() / m
        var = ((xi - mu) ** 2).sum() / m
        inv = 1.0 / np.sqrt(var + eps)
        xhat = (xi - mu) * inv
        dxhat = dyi * gamma[c]
        dvar = np.sum(dxhat * (xi - mu)) * -0.5 * (var + eps) ** -1.5
        dmu = np.sum(dxhat * -inv) + dvar * np.sum(-2.0 * (xi - mu)) / m
        dx[:, c] = dxhat * inv + dvar * 2.0 * (xi - mu) / m + dmu / m
        dgamma[c] = np.sum(dyi * xhat)
        dbeta[c] = np.sum(dyi)
    return dx, dgamma, dbeta


# --------------------------------------------------------------------------------------
# Batch norm


@pytest.mark.parametrize("shape", [(16, 5), (4, 3, 5, 6)], ids=["dense", "nhwc"])
def test_batchnorm_train_matches_algorithm_1(shape):
    x = _rand(0, shape, scale=2.0, shift=0.7)
    gamma, beta = _rand(1, shape[-1:]), _rand(2, shape[-1:])
    bn = norms.BatchNorm(shape[-1], _cfg(), rngs=nnx.Rngs(0))
    _set(bn.scale, gamma)
    _set(bn.bias, beta)
    y = bn(jnp.asarray(x), train=True)
    ref, _, _ = _bn_ref(x, gamma.astype(np.float64), beta.astype(np.float64), 1e-5)
    np.testing.assert_allclose(np.asarray(y), ref, **TOL)


@pytest.mark.parametrize("eps", [1e-5, 1e-2])
@pytest.mark.parametrize("shape", [(32, 4), (5, 4, 4, 3)], ids=["dense", "nhwc"])
def test_batchnorm_output_has_zero_mean_and_predictable_variance(shape, eps):
    # Small-variance inputs make the eps correction large enough to be seen.
    x = _rand(3, shape, scale=0.1, shift=-1.0)
    bn = norms.BatchNorm(shape[-1], _cfg(epsilon=eps), rngs=nnx.Rngs(0))
    y = np.asarray(bn(jnp.asarray(x), train=True), np.float64)
    axes = tuple(range(x.ndim - 1))
    var_in = np.asarray(x, np.float64).var(axes)
    np.testing.assert_allclose(y.mean(axes), 0.0, atol=1e-6)
    np.testing.assert_allclose(y.var(axes), 1.0 - eps / (var_in + eps), rtol=2e-5)


def test_batchnorm_gradients_match_paper_backprop():
    b, f = 12, 4
    x = _rand(4, (b, f), scale=1.5, shift=0.3)
    gamma, beta = _rand(5, (f,)), _rand(6, (f,))
    r = _rand(7, (b, f))
    bn = norms.BatchNorm(f, _cfg(), rngs=nnx.Rngs(0))
    _set(bn.scale, gamma)
    _set(bn.bias, beta)
    graphdef, params, stats = nnx.split(bn, nnx.Param, nnx.BatchStat)

    def loss(params, x):
        model = nnx.merge(graphdef, params, stats, copy=True)
        y = model(x, train=True)
        return jnp.sum(jnp.sin(y) * r)  # dl/dy = cos(y) * r

    g_params, g_x = jax.grad(loss, argnums=(0, 1))(params, jnp.asarray(x))
    y, _, _ = _bn_ref(x, gamma.astype(np.float64), beta.astype(np.float64), 1e-5)
    dy = np.cos(y) * r
    dx, dgamma, dbeta = _bn_backward_ref(x, gamma.astype(np.float64), dy, 1e-5)
    np.testing.assert_allclose(np.asarray(g_x), dx, **TOL)
    np.testing.assert_allclose(np.asarray(g_params["scale"][...]), dgamma, **TOL)
    np.testing.assert_allclose(np.asarray(g_params["bias"][...]), dbeta, **TOL)
    # The input gradient of batch norm is orthogonal to 1 and to x_hat per unit.
    np.testing.assert_allclose(np.asarray(g_x).sum(0), 0.0, atol=1e-5)


@pytest.mark.parametrize("shape", [(8, 3), (2, 3, 2, 3)], ids=["dense", "nhwc"])
def test_running_statistics_follow_momentum_recursion_and_drive_eval(shape):
    momentum, eps = 0.8, 1e-3
    bn = norms.BatchNorm(shape[-1], _cfg(momentum=momentum, epsilon=eps), rngs=nnx.Rngs(0))
    gamma, beta = _rand(8, shape[-1:]), _rand(9, shape[-1:])
    _set(bn.scale, gamma)
    _set(bn.bias, beta)
    mean, var = np.zeros(shape[-1]), np.ones(shape[-1])
    for k in range(4):
        x = _rand(10 + k, shape, scale=1.0 + k, shift=k - 1.5)
        bn(jnp.asarray(x), train=True)
        _, mu_b, var_b = _bn_ref(x, np.ones(shape[-1]), np.zeros(shape[-1]), eps)
        mean = momentum * mean + (1 - momentum) * mu_b
        var = momentum * var + (1 - momentum) * var_b
        np.testing.assert_allclose(_num(bn.mean), mean, **TOL)
        np.testing.assert_allclose(_num(bn.var), var, **TOL)
    # Alg. 2: inference normalizes by the population statistics, per unit.
    x = _rand(20, shape)
    y = np.asarray(bn(jnp.asarray(x), train=False), np.float64)
    ref = np.empty(shape)
    for c in range(shape[-1]):
        ref[..., c] = gamma[c] * (x[..., c] - mean[c]) / np.sqrt(var[c] + eps) + beta[c]
    np.testing.assert_allclose(y, ref, **TOL)
    # Evaluation leaves the running statistics alone.
    np.testing.assert_allclose(_num(bn.mean), mean, **TOL)


@pytest.mark.parametrize("shape", [(12, 3), (8, 2, 3, 2)], ids=["dense", "nhwc"])
def test_ghost_batchnorm_normalizes_each_sub_batch(shape):
    v, momentum = 4, 0.5
    bn = norms.BatchNorm(
        shape[-1], _cfg(virtual_batch_size=v, momentum=momentum), rngs=nnx.Rngs(0)
    )
    gamma, beta = _rand(21, shape[-1:]), _rand(22, shape[-1:])
    _set(bn.scale, gamma)
    _set(bn.bias, beta)
    # Groups with very different statistics, so whole-batch statistics would be wrong.
    x = _rand(23, shape) * np.repeat(np.arange(1, shape[0] // v + 1), v).reshape(
        (-1,) + (1,) * (len(shape) - 1)
    ).astype(np.float32)
    y = np.asarray(bn(jnp.asarray(x), train=True), np.float64)
    means, variances = [], []
    for start in range(0, shape[0], v):
        ref, mu, var = _bn_ref(x[start:start + v], gamma, beta, 1e-5)
        np.testing.assert_allclose(y[start:start + v], ref, **TOL)
        means.append(mu)
        variances.append(var)
    expect_mean = (1 - momentum) * np.mean(means, 0)
    expect_var = momentum * 1.0 + (1 - momentum) * np.mean(variances, 0)
    np.testing.assert_allclose(_num(bn.mean), expect_mean, **TOL)
    np.testing.assert_allclose(_num(bn.var), expect_var, **TOL)


def test_ghost_batchnorm_rejects_indivisible_batch():
    bn = norms.BatchNorm(3, _cfg(virtual_batch_size=4), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="virtual_batch_size"):
        bn(jnp.ones((10, 3)), train=True)


@pytest.mark.parametrize("cls", [norms.BatchNorm, norms.NoisyBatchNorm, norms.LayerNorm,
                                 norms.GroupNorm])
def test_affine_false_creates_no_params(cls):
    module = cls(8, _cfg(affine=False), rngs=nnx.Rngs(0))
    assert len(jax.tree.leaves(nnx.state(module, nnx.Param))) == 0
    x = _rand(24, (6, 8), shift=0.5)
    y = module(jnp.asarray(x), train=True, rng=jax.random.key(0))
    assert np.all(np.isfinite(np.asarray(y)))


# --------------------------------------------------------------------------------------
# Noisy batch norm (Santurkar et al. 2018, App. A.2.1, Alg. 1)


N_EX, N_UNITS = 2000, 300  # examples x units of the brute-force noise statistics


def _noise_spec(**overrides):
    return norms.NoiseSpec.from_config(_cfg(**overrides))


def _shift_and_scale(spec, key, shape):
    """(m, s) of one draw, read off the noise map a -> s * a + m at a = 0 and a = 1
    (one key: the same draw both times)."""
    m = np.asarray(norms.santurkar_noise(jnp.zeros(shape), key, spec), np.float64)
    s = np.asarray(norms.santurkar_noise(jnp.ones(shape), key, spec), np.float64) - m
    return m, s


def test_santurkar_noise_shift_follows_algorithm_1():
    # Santurkar et al. 2018, Alg. 1: mu_j ~ U(-n_mu, n_mu) per unit, m_ij ~ U(mu_j +- r_mu).
    spec = _noise_spec()
    assert (spec.n_mu, spec.n_sigma, spec.r_mu, spec.r_sigma_std) == (0.5, 1.25, 0.1, 0.1)
    m, _ = _shift_and_scale(spec, jax.random.key(0), (N_EX, N_UNITS))
    lo, hi = m.min(0), m.max(0)
    # Every unit's shifts fill a band of width 2 r_mu (the sample range of N_EX uniforms
    # falls short of it by ~2 r_mu / N_EX), centred on that unit's own mu_j.
    assert np.all(hi - lo <= 2 * 0.1 + 1e-6)
    assert np.all(hi - lo >= 2 * 0.1 * (1 - 20 / N_EX))
    mu = (lo + hi) / 2
    assert np.all(np.abs(mu) <= 0.5 + 1e-6)
    assert stats.kstest(mu, stats.uniform(-0.5, 1.0).cdf).pvalue > 1e-3
    assert np.std(mu) > 0.25  # U(-0.5, 0.5) has std 0.289: the unit means really spread
    resid = (m - mu)[:, :20].ravel()  # per-example spread around mu_j: U(-r_mu, r_mu)
    assert stats.kstest(resid, stats.uniform(-0.1, 0.2).cdf).pvalue > 1e-3


@pytest.mark.parametrize("reading,r_std", [("std", 0.1), ("variance", 0.1**0.5)])
def test_santurkar_noise_scale_follows_algorithm_1(reading, r_std):
    # sigma_j ~ U(1, n_sigma) per unit, s_ij ~ N(sigma_j, r_sigma) per example.
    spec = _noise_spec(noise_r_sigma_is=reading)
    _, s = _shift_and_scale(spec, jax.random.key(1), (N_EX, N_UNITS))
    sigma = s.mean(0)  # standard error r_std / sqrt(N_EX) <= 0.007, small against the 0.25 range
    assert stats.kstest(sigma, stats.uniform(1.0, 0.25).cdf).pvalue > 1e-3
    resid = s - sigma
    np.testing.assert_allclose(resid.std(), r_std, rtol=0.01)  # 600,000 samples: se 0.1%
    np.testing.assert_allclose(resid.std(0).min(), r_std, rtol=0.1)  # every unit, se 1.6%
    np.testing.assert_allclose(resid.std(0).max(), r_std, rtol=0.1)
    assert stats.kstest(resid[:, :20].ravel() / r_std, "norm").pvalue > 1e-3


def test_santurkar_noise_is_fresh_per_key_and_deterministic_per_key():
    spec = _noise_spec()
    shape = (N_EX, N_UNITS)
    m0, s0 = _shift_and_scale(spec, jax.random.key(2), shape)
    m1, s1 = _shift_and_scale(spec, jax.random.key(3), shape)
    # A new step (key) draws new per-unit means and scales: uncorrelated across keys.
    assert abs(np.corrcoef(m0.mean(0), m1.mean(0))[0, 1]) < 0.25  # se 1/sqrt(300) = 0.058
    assert abs(np.corrcoef(s0.mean(0), s1.mean(0))[0, 1]) < 0.25
    m0_again, _ = _shift_and_scale(spec, jax.random.key(2), shape)
    np.testing.assert_array_equal(m0, m0_again)


def test_santurkar_noise_conv_counts_height_and_width_as_batch():
    spec = _noise_spec()
    m, s = _shift_and_scale(spec, jax.random.key(4), (8, 10, 10, 60))
    flat_m, flat_s = m.reshape(-1, 60), s.reshape(-1, 60)
    # One mu_c per channel for every (example, h, w): the band of width 2 r_mu holds them all.
    assert np.all(flat_m.max(0) - flat_m.min(0) <= 0.2 + 1e-6)
    mu = (flat_m.max(0) + flat_m.min(0)) / 2
    assert np.std(mu) > 0.2
    # ... and a fresh draw per position within one example: std r_mu / sqrt(3) over (h, w).
    np.testing.assert_allclose((m - mu).std((1, 2)).mean(), 0.1 / np.sqrt(3), rtol=0.05)
    np.testing.assert_allclose((flat_s - flat_s.mean(0)).std(), 0.1, rtol=0.02)


def test_noise_r_sigma_reading_is_checked():
    with pytest.raises(ValueError, match="noise_r_sigma_is"):
        _noise_spec(noise_r_sigma_is="sd")


def _noisy_pair(f=5, **overrides):
    cfg = _cfg(momentum=0.7, **overrides)
    noisy = norms.NoisyBatchNorm(f, cfg, rngs=nnx.Rngs(0))
    plain = norms.BatchNorm(f, cfg, rngs=nnx.Rngs(0))
    gamma, beta = _rand(30, (f,)), _rand(31, (f,))
    for module in (noisy, plain):
        _set(module.scale, gamma)
        _set(module.bias, beta)
    return noisy, plain, gamma.astype(np.float64), beta.astype(np.float64)


@pytest.mark.parametrize("after_affine", [True, False])
@pytest.mark.parametrize("shape", [(12, 5), (3, 4, 4, 5)], ids=["dense", "nhwc"])
def test_noisy_batchnorm_is_noise_on_the_batch_normalized_activation(shape, after_affine):
    noisy, _, gamma, beta = _noisy_pair(noise_after_affine=after_affine)
    x = _rand(32, shape, scale=2.0, shift=1.0)
    key = jax.random.key(5)
    y = np.asarray(noisy(jnp.asarray(x), train=True, rng=key), np.float64)
    m, s = _shift_and_scale(noisy.noise, key, shape)
    x_hat, _, _ = _bn_ref(x, np.ones(5), np.zeros(5), 1e-5)
    ref = s * (gamma * x_hat + beta) + m if after_affine else gamma * (s * x_hat + m) + beta
    np.testing.assert_allclose(y, ref, **TOL)


def test_noisy_batchnorm_eval_is_noise_free_batchnorm():
    noisy, plain, _, _ = _noisy_pair()
    for k in range(3):
        x = jnp.asarray(_rand(33 + k, (10, 5), scale=2.0, shift=1.0))
        noisy(x, train=True, rng=jax.random.key(k))
        plain(x, train=True)
    # The noise leaves batch norm's running statistics alone ...
    np.testing.assert_allclose(_num(noisy.mean), _num(plain.mean), **TOL)
    np.testing.assert_allclose(_num(noisy.var), _num(plain.var), **TOL)
    # ... and evaluation is deterministic, plain batch norm (Alg. 2), no key needed.
    x_eval = jnp.asarray(_rand(40, (7, 5)))
    np.testing.assert_allclose(np.asarray(noisy(x_eval, train=False)),
                               np.asarray(plain(x_eval, train=False)), **TOL)


def test_noisy_none_is_the_same_noise_without_normalization():
    cfg = _cfg()
    noisy = norms.get("noisy_none").make(5, cfg, rngs=nnx.Rngs(0))
    x = _rand(41, (12, 5), scale=3.0, shift=2.0)
    key = jax.random.key(6)
    m, s = _shift_and_scale(norms.NoiseSpec.from_config(cfg), key, x.shape)
    y = np.asarray(noisy(jnp.asarray(x), train=True, rng=key), np.float64)
    np.testing.assert_allclose(y, s * x + m, **TOL)
    np.testing.assert_array_equal(np.asarray(noisy(jnp.asarray(x), train=False)), x)
    assert norms.get("noisy_none").linear_bias  # a plain layer keeps its bias


@pytest.mark.parametrize("name", ["noisy_batch", "noisy_none"])
def test_noisy_variants_need_rng_in_training(name):
    module = norms.get(name).make(5, _cfg(), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="rng"):
        module(jnp.ones((4, 5)), train=True)
    module(jnp.ones((4, 5)), train=False)  # evaluation needs no key


# --------------------------------------------------------------------------------------
# Mean-only batch norm, layer norm, group norm


@pytest.mark.parametrize("shape", [(6, 4), (3, 2, 2, 4)], ids=["dense", "nhwc"])
def test_mean_only_batchnorm(shape):
    momentum = 0.6
    module = norms.MeanOnlyBatchNorm(shape[-1], _cfg(momentum=momentum), rngs=nnx.Rngs(0))
    beta = _rand(40, shape[-1:])
    _set(module.bias, beta)
    running = np.zeros(shape[-1])
    for k in range(3):
        x = _rand(41 + k, shape, scale=2.0, shift=k)
        y = np.asarray(module(jnp.asarray(x), train=True), np.float64)
        ref = np.empty(shape)
        for c in range(shape[-1]):
            mu = np.asarray(x[..., c], np.float64).mean()
            ref[..., c] = x[..., c] - mu + beta[c]
            running[c] = momentum * running[c] + (1 - momentum) * mu
        np.testing.assert_allclose(y, ref, **TOL)
        np.testing.assert_allclose(_num(module.mean), running, **TOL)
    x = _rand(50, shape)
    y = np.asarray(module(jnp.asarray(x), train=False), np.float64)
    np.testing.assert_allclose(y, x - running + beta, **TOL)


@pytest.mark.parametrize("shape", [(5, 6), (3, 2, 3, 6)], ids=["dense", "nhwc"])
def test_layernorm_matches_per_example_loop(shape):
    eps = 1e-3
    module = norms.LayerNorm(shape[-1], _cfg(epsilon=eps), rngs=nnx.Rngs(0))
    gamma, beta = _rand(51, shape[-1:]), _rand(52, shape[-1:])
    _set(module.scale, gamma)
    _set(module.bias, beta)
    x = _rand(53, shape, scale=0.5) * np.arange(1, shape[0] + 1).reshape(
        (-1,) + (1,) * (len(shape) - 1)).astype(np.float32)
    y = np.asarray(module(jnp.asarray(x), train=True), np.float64)
    ref = np.empty(shape)
    for b in range(shape[0]):
        vals = np.asarray(x[b], np.float64)
        mu = vals.sum() / vals.size
        var = ((vals - mu) ** 2).sum() / vals.size
        ref[b] = (vals - mu) / np.sqrt(var + eps) * gamma + beta
    np.testing.assert_allclose(y, ref, **TOL)
    np.testing.assert_allclose(np.asarray(module(jnp.asarray(x), train=False)), y, **TOL)


@pytest.mark.parametrize("shape", [(5, 8), (3, 2, 3, 8)], ids=["dense", "nhwc"])
@pytest.mark.parametrize("groups", [1, 2, 4, 8])
def test_groupnorm_matches_per_example_per_group_loop(shape, groups):
    eps = 1e-3
    module = norms.GroupNorm(shape[-1], _cfg(epsilon=eps, num_groups=groups),
                             rngs=nnx.Rngs(0))
    gamma, beta = _rand(54, shape[-1:]), _rand(55, shape[-1:])
    _set(module.scale, gamma)
    _set(module.bias, beta)
    # Channel-dependent offsets and scales, so a wrong grouping changes the result.
    x = _rand(56, shape) * np.linspace(0.2, 3.0, shape[-1]).astype(np.float32) + np.arange(
        shape[-1], dtype=np.float32)
    y = np.asarray(module(jnp.asarray(x), train=True), np.float64)
    ref = np.empty(shape)
    size = shape[-1] // groups
    for b in range(shape[0]):
        for g in range(groups):
            chans = slice(g * size, (g + 1) * size)
            vals = np.asarray(x[b][..., chans], np.float64)
            mu = vals.sum() / vals.size
            var = ((vals - mu) ** 2).sum() / vals.size
            ref[b][..., chans] = (vals - mu) / np.sqrt(var + eps) * gamma[chans] + beta[chans]
    np.testing.assert_allclose(y, ref, **TOL)


def test_groupnorm_rejects_non_dividing_groups():
    with pytest.raises(ValueError, match="num_groups"):
        norms.GroupNorm(6, _cfg(num_groups=4), rngs=nnx.Rngs(0))


# --------------------------------------------------------------------------------------
# Weight normalization (Salimans & Kingma 2016)


def _wn_dense(fan_in=5, fan_out=3, seed=0):
    layer = norms.WNDense(fan_in, fan_out, use_bias=True, rngs=nnx.Rngs(seed))
    _set(layer.g, np.abs(_rand(60, (fan_out,))) + 0.5)
    _set(layer.bias, _rand(61, (fan_out,)))
    return layer


def test_wn_dense_weight_is_g_times_unit_direction():
    layer = _wn_dense()
    v, g = _num(layer.kernel), _num(layer.g)
    w = np.asarray(layer.weight(), np.float64)
    for j in range(v.shape[1]):
        norm = np.sqrt(sum(v[i, j] ** 2 for i in range(v.shape[0])))
        np.testing.assert_allclose(w[:, j], g[j] * v[:, j] / norm, **TOL)
        np.testing.assert_allclose(np.linalg.norm(w[:, j]), g[j], **TOL)
    x = _rand(62, (4, 5))
    np.testing.assert_allclose(np.asarray(layer(jnp.asarray(x))),
                               x @ w + _num(layer.bias), **TOL)


def test_wn_dense_gradients_follow_eq_3_and_4():
    layer = _wn_dense()
    x, target = _rand(63, (7, 5)), _rand(64, (7, 3))
    graphdef, params = nnx.split(layer, nnx.Param)

    def loss(params):
        y = nnx.merge(graphdef, params, copy=True)(jnp.asarray(x))
        return 0.5 * jnp.sum(jnp.square(y - target))

    grads = jax.grad(loss)(params)
    grad_v, grad_g = np.asarray(grads["kernel"][...], np.float64), np.asarray(
        grads["g"][...], np.float64)
    v, g = _num(layer.kernel), _num(layer.g)
    w = np.asarray(layer.weight(), np.float64)
    x64 = x.astype(np.float64)
    grad_w = x64.T @ (x64 @ w + _num(layer.bias) - target)  # dL/dw of 0.5 ||x w + b - t||^2
    for j in range(v.shape[1]):
        vj, wj, gw = v[:, j], w[:, j], grad_w[:, j]
        norm = np.linalg.norm(vj)
        # eq. 4: grad_v = g / ||v|| * M_w grad_w, M_w = I - w w^T / ||w||^2; hence v . grad_v = 0
        m_w = np.eye(len(vj)) - np.outer(wj, wj) / (wj @ wj)
        np.testing.assert_allclose(grad_v[:, j], g[j] / norm * (m_w @ gw), **TOL)
        assert abs(vj @ grad_v[:, j]) <= 1e-5 * norm * np.linalg.norm(grad_v[:, j]) + 1e-7
        # eq. 3: grad_g = grad_w . v / ||v||
        np.testing.assert_allclose(grad_g[j], gw @ vj / norm, **TOL)


def test_wn_output_is_invariant_to_scaling_v():
    layer = _wn_dense()
    x = jnp.asarray(_rand(65, (4, 5)))
    before = np.asarray(layer(x))
    _set(layer.kernel, _num(layer.kernel) * 3.7)
    np.testing.assert_allclose(np.asarray(layer(x)), before, **TOL)
    conv = norms.WNConv(2, 3, use_bias=False, rngs=nnx.Rngs(1))
    xc = jnp.asarray(_rand(66, (2, 5, 5, 2)))
    before = np.asarray(conv(xc))
    _set(conv.kernel, _num(conv.kernel) * 0.05)
    np.testing.assert_allclose(np.asarray(conv(xc)), before, **TOL)


def test_wn_conv_weight_and_output_match_loops():
    conv = norms.WNConv(2, 3, use_bias=True, rngs=nnx.Rngs(2))
    _set(conv.g, [0.5, 2.0, 1.3])
    _set(conv.bias, [0.1, -0.2, 0.3])
    v, g, bias = _num(conv.kernel), _num(conv.g), _num(conv.bias)
    w = np.asarray(conv.weight(), np.float64)
    kh, kw, cin, cout = v.shape
    for o in range(cout):
        norm = np.sqrt(sum(v[a, b, i, o] ** 2
                           for a in range(kh) for b in range(kw) for i in range(cin)))
        np.testing.assert_allclose(w[..., o], g[o] * v[..., o] / norm, **TOL)
    # 'SAME' 3x3 convolution by an explicit loop over output positions.
    x = _rand(67, (2, 4, 5, 2)).astype(np.float64)
    pad = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    ref = np.empty((2, 4, 5, cout))
    for n in range(2):
        for r in range(4):
            for c in range(5):
                patch = pad[n, r:r + 3, c:c + 3, :]
                ref[n, r, c] = np.einsum("abi,abio->o", patch, w) + bias
    np.testing.assert_allclose(np.asarray(conv(jnp.asarray(x, jnp.float32))), ref, **TOL)


def test_wn_conv_gradient_wrt_v_is_orthogonal_to_v():
    conv = norms.WNConv(2, 3, use_bias=False, rngs=nnx.Rngs(3))
    x = jnp.asarray(_rand(68, (2, 4, 4, 2)))
    r = jnp.asarray(_rand(69, (2, 4, 4, 3)))
    graphdef, params = nnx.split(conv, nnx.Param)

    def loss(params):
        return jnp.sum(jnp.tanh(nnx.merge(graphdef, params, copy=True)(x)) * r)

    grad_v = np.asarray(jax.grad(loss)(params)["kernel"][...], np.float64)
    v = _num(conv.kernel)
    for o in range(3):
        dot = np.sum(v[..., o] * grad_v[..., o])
        assert abs(dot) <= 1e-5 * np.linalg.norm(v[..., o]) * np.linalg.norm(grad_v[..., o])
        assert np.linalg.norm(grad_v[..., o]) > 1e-3


@pytest.mark.parametrize("eps", [1e-5, 0.5])
def test_wn_data_init_standardizes_preactivations(eps):
    layer = _wn_dense(fan_in=6, fan_out=4)
    x = _rand(70, (32, 6), scale=2.0, shift=1.0)
    v = _num(layer.kernel)
    t = x.astype(np.float64) @ (v / np.linalg.norm(v, axis=0))  # pre-activations x v/||v||
    returned = np.asarray(norms.wn_data_init(layer, jnp.asarray(x), epsilon=eps))
    y = np.asarray(layer(jnp.asarray(x)), np.float64)
    np.testing.assert_allclose(y, returned, **TOL)
    np.testing.assert_allclose(y.mean(0), 0.0, atol=1e-5)
    np.testing.assert_allclose(y.std(0), np.sqrt(t.var(0) / (t.var(0) + eps)), rtol=1e-5)
    np.testing.assert_allclose(_num(layer.g), 1.0 / np.sqrt(t.var(0) + eps), rtol=1e-5)
    assert layer.use_bias


def test_wn_data_init_conv():
    conv = norms.WNConv(3, 4, use_bias=True, rngs=nnx.Rngs(4))
    x = jnp.asarray(_rand(71, (4, 5, 5, 3), shift=0.5))
    norms.wn_data_init(conv, x, epsilon=1e-5)
    y = np.asarray(conv(x), np.float64)
    np.testing.assert_allclose(y.mean((0, 1, 2)), 0.0, atol=1e-5)
    np.testing.assert_allclose(y.std((0, 1, 2)), 1.0, atol=1e-4)


# --------------------------------------------------------------------------------------
# Registry


def test_get_unknown_lists_every_variant():
    with pytest.raises(ValueError) as err:
        norms.get("bogus")
    message = str(err.value)
    assert "bogus" in message
    for name in ("none", "batch", "noisy_batch", "noisy_none", "weight", "layer", "group"):
        assert name in norms.NORMS
    for name in norms.NORMS:
        assert name in message


@pytest.mark.parametrize("name,mean_only", [(n, False) for n in norms.NORMS]
                         + [("weight", True)])
@pytest.mark.parametrize("kind", ["dense", "conv"])
def test_every_variant_builds_and_runs(name, kind, mean_only):
    cfg = _cfg(wn_mean_only_bn=mean_only)
    spec = norms.get(name)
    assert spec is norms.NORMS[name]
    rngs = nnx.Rngs(0)
    linear = norms.make_linear(kind, 3, 8, spec, cfg, rngs=rngs)
    norm = spec.make(8, cfg, rngs=rngs)
    assert isinstance(linear, (norms.WNDense, norms.WNConv)) == spec.weight_norm
    assert isinstance(linear, norms.Conv) == (kind == "conv")
    shape = (4, 3) if kind == "dense" else (4, 3, 3, 3)
    x = jnp.asarray(_rand(80, shape))
    y = norm(linear(x), train=True, rng=jax.random.key(0))
    assert y.shape == shape[:-1] + (8,)
    assert np.all(np.isfinite(np.asarray(y)))
    if name == "weight":
        assert isinstance(norm, norms.MeanOnlyBatchNorm if mean_only else norms.Identity)
        assert linear.use_bias == (not mean_only)
    elif name in ("none", "noisy_none"):
        assert linear.use_bias
    else:
        assert not linear.use_bias  # an affine normalizer makes the bias redundant


@pytest.mark.parametrize("kind", ["dense", "conv"])
def test_wn_init_std_draws_v_from_n_0_std(kind):
    """norm.wn_init_std = 0.05: v ~ N(0, 0.05^2) elementwise (Salimans & Kingma 2016, sec. 3),
    whatever the fan-in; 0 keeps N(0, 1/fan_in); w = v at init in both cases."""
    spec = norms.get("weight")
    fan_in, fan_out = 400, 300
    for std, want in ((0.05, 0.05), (0.0, 1.0 / np.sqrt(fan_in * (9 if kind == "conv" else 1)))):
        linear = norms.make_linear(kind, fan_in, fan_out, spec, _cfg(wn_init_std=std), rngs=nnx.Rngs(3))
        v = np.asarray(linear.kernel.value).ravel()
        assert np.std(v) == pytest.approx(want, rel=0.01)
        assert abs(np.mean(v)) < 4 * want / np.sqrt(v.size)
        assert stats.kstest(v / want, "norm").pvalue > 1e-3
        np.testing.assert_allclose(np.asarray(linear.weight()), np.asarray(linear.kernel.value), rtol=1e-5, atol=1e-7)
