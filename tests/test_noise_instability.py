"""What the noise of Santurkar et al. 2018 (App. A.2.1, Alg. 1) does to a unit's
distribution from one step to the next: the premise of experiments/santurkar_noisy_bn.py.

One unit-variance batch under two steps' noise (two keys): each unit's batch mean moves by
mu_2 - mu_1 with mu ~ U(-n_mu, n_mu), and its std becomes ~sigma with sigma ~ U(1, n_sigma),
while the batch itself stays put. So the per-step shift of a unit's mean in units of its std,
RMS over units, is sqrt(E[(mu_2 - mu_1)^2 / ((sd_1^2 + sd_2^2) / 2)]), with
sd^2 = sigma^2 + r_sigma^2 + r_mu^2 / 3 (Var(s x + m) for x of unit variance)."""

import jax
import numpy as np
import pytest

from bn_research import norms

N_EX, N_UNITS = 512, 2000


def _two_steps(cfg):
    spec = norms.NoiseSpec.from_config(cfg)
    x = jax.random.normal(jax.random.key(0), (N_EX, N_UNITS))
    x = (x - x.mean(0)) / x.std(0)  # every unit: batch mean 0, variance 1
    y = [np.asarray(norms.santurkar_noise(x, jax.random.key(k), spec), np.float64) for k in (1, 2)]
    return np.stack([a.mean(0) for a in y]), np.stack([a.var(0) for a in y])


def _expected_shift(n_mu, n_sigma, r_mu, r_sigma_std):
    r = np.random.default_rng(0)
    mu, sigma = r.uniform(-n_mu, n_mu, (2, 10**6)), r.uniform(1.0, n_sigma, (2, 10**6))
    sd2 = sigma**2 + r_sigma_std**2 + r_mu**2 / 3
    return np.sqrt(np.mean((mu[1] - mu[0]) ** 2 / sd2.mean(0)))


@pytest.mark.parametrize("overrides", [{}, {"noise_n_mu": 0.2, "noise_n_sigma": 2.0}])
def test_per_step_mean_shift_in_std_units_follows_algorithm_1(overrides):
    cfg = norms.default_config()
    cfg.update(overrides)
    mean, var = _two_steps(cfg)
    shift = np.abs(mean[1] - mean[0]) / np.sqrt((var[0] + var[1]) / 2)
    got = np.sqrt(np.mean(shift**2))
    want = _expected_shift(cfg.noise_n_mu, cfg.noise_n_sigma, cfg.noise_r_mu, cfg.noise_r_sigma)
    np.testing.assert_allclose(got, want, rtol=0.05)  # 2,000 units: se of the RMS ~2%
    if not overrides:  # the paper's constants: ~0.36 std per step, 3x a batch of 128's sampling shift
        assert 0.3 < got < 0.4 and got > 2.5 * np.sqrt(2 / 128)


def test_per_step_scale_change_follows_algorithm_1():
    mean, var = _two_steps(norms.default_config())
    # sd_t ~ sqrt(sigma_t^2 + 0.0133) with sigma_t ~ U(1, 1.25) drawn afresh: the std of a unit
    # changes by a factor between 1/1.25 and 1.25 from one step to the next, not by sampling.
    ratio = np.sqrt(var[1] / var[0])
    assert 0.78 < ratio.min() and ratio.max() < 1.28
    r = np.random.default_rng(1)
    sd = np.sqrt(r.uniform(1.0, 1.25, (2, 10**6)) ** 2 + 0.1**2 + 0.1**2 / 3)
    want = np.sqrt(np.mean(np.log(sd[1] / sd[0]) ** 2))
    np.testing.assert_allclose(np.sqrt(np.mean(np.log(ratio) ** 2)), want, rtol=0.05)
