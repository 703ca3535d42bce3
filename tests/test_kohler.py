"""Kohler et al. (2019) length-direction experiment: the pure functions against closed forms
and brute force (small problems, float64 in a local context)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import kohler_length_direction as k


@pytest.fixture(scope="module")
def problems():
    with jax.enable_x64(True):
        ols = k.ols_problem(jax.random.PRNGKey(0), dim=6, cond=10.0, noise=0.3)
        hs = k.halfspace_problem(jax.random.PRNGKey(1), n=2000, dim=5, cond=5.0, flip=0.1)
        v = jax.random.normal(jax.random.PRNGKey(2), (6,))
        yield {"ols": ols, "hs": hs, "v": v, "v_hs": v[:5]}


def test_ols_closed_form_matches_expectation_by_sampling(problems):
    """f(w) = 2 u^T w + w^T S w + E[y^2] equals the sample mean of (y - x^T w)^2 (Monte Carlo)."""
    with jax.enable_x64(True):
        p = problems["ols"]
        w = jax.random.normal(jax.random.PRNGKey(5), (6,))

        @jax.jit
        def monte_carlo(key):
            kx, ke = jax.random.split(key)
            x = jax.random.normal(kx, (100_000, 6)) @ jnp.linalg.cholesky(p["s"]).T  # x ~ N(0, S)
            y = x @ p["w_star"] + 0.3 * jax.random.normal(ke, (100_000,))  # noise std of the fixture
            return jnp.mean((y - x @ w) ** 2)

        mc = float(monte_carlo(jax.random.PRNGKey(4)))
        assert float(k.ols_objective(w, p)) == pytest.approx(mc, rel=0.02)  # MC rel. std ~ sqrt(2 / n) = 0.0045
        assert float(k.ols_objective(p["w_star"], p)) == pytest.approx(float(p["f_star"]), rel=1e-10)
        assert float(k.ols_suboptimality(w, p)) == pytest.approx(
            float(k.ols_objective(w, p)) - float(p["f_star"]), rel=1e-10)
        assert float(p["L"]) == pytest.approx(2 * float(jnp.linalg.eigvalsh(p["s"])[-1]), rel=1e-10)


def test_reparametrized_objectives_equal_the_original(problems):
    """f(v, g) (Eq. 11 for OLS) equals f(w) at w = g v / ||v||_S, for any g and any scale of v."""
    with jax.enable_x64(True):
        for prob, p, v in ((k.OLS, problems["ols"], problems["v"]), (k.HALFSPACE, problems["hs"], problems["v_hs"])):
            for g, scale in ((0.7, 1.0), (-2.5, 13.0)):
                w = g * v / k.s_norm(v, p["s"])
                want = float(prob["objective"](w, p))
                assert float(prob["reparam"](scale * v, g, p)) == pytest.approx(want, rel=1e-12)


def test_ols_best_length_is_the_exact_minimizer(problems):
    """g* = -u^T v / ||v||_S minimizes Eq. 11: a brute-force grid finds nothing lower, and
    f(v, g*) - f* is the generalized Rayleigh quotient gap u^T S^-1 u - (u^T v)^2 / (v^T S v)."""
    with jax.enable_x64(True):
        p, v = problems["ols"], problems["v"]
        g_star = float(k.ols_best_length(v, p))
        grid = np.linspace(g_star - 3, g_star + 3, 6001)
        values = np.array([float(k.ols_reparam_objective(v, g, p)) for g in grid[::100]])
        assert float(k.ols_reparam_objective(v, g_star, p)) <= values.min() + 1e-12
        gap = p["u"] @ jnp.linalg.solve(p["s"], p["u"]) - (p["u"] @ v) ** 2 / (v @ p["s"] @ v)
        assert float(k.ols_reparam_objective(v, g_star, p)) - p["f_star"] == pytest.approx(float(gap), rel=1e-9)


def test_halfspace_bisection_and_newton_find_the_minimizers(problems):
    """The bisection length zeroes d/dg f(v, g); Newton's w_opt zeroes the gradient of f."""
    with jax.enable_x64(True):
        p, v = problems["hs"], problems["v_hs"]
        g = k.halfspace_best_length(v, p)
        assert abs(float(jax.grad(k.halfspace_reparam_objective, argnums=1)(v, g, p))) < 1e-12
        assert float(jnp.linalg.norm(jax.grad(k.halfspace_objective)(p["w_opt"], p))) < 1e-12
        assert float(p["L"]) == pytest.approx(float(jnp.linalg.eigvalsh(p["z"].T @ p["z"] / 2000)[-1]) / 4)


def test_fit_rate_recovers_a_geometric_sequence():
    sub = 3.0 * 0.8 ** np.arange(200)
    q, r2 = k.fit_rate(sub, ref=3.0)
    assert q == pytest.approx(0.8, rel=1e-10) and r2 == pytest.approx(1.0, abs=1e-12)
    wiggly = sub * (1 + 0.5 * (np.arange(200) % 2))
    assert k.fit_rate(wiggly, ref=3.0)[1] < 0.999  # R^2 falls when log-suboptimality is not a line
    assert np.isnan(k.fit_rate(np.ones(50), ref=1.0)[0])  # never inside the window: no rate
    assert k.iterations_to(sub, ref=3.0, tol=0.8**10 * 1.0001) == 10
    assert k.iterations_to(np.ones(7), ref=1.0) == 7  # censored at the budget


def test_gd_and_decoupled_descent_converge_on_least_squares(problems):
    """GD at 1/L contracts f - f* by at most (1 - mu/L)^2 per iteration (a quadratic's exact bound);
    decoupled descent's suboptimality falls below 1e-8 of its start."""
    with jax.enable_x64(True):
        p = problems["ols"]
        curves = k.sweep(k.OLS, p, (1.0,), 400)
        ref = float(k.ols_suboptimality(p["w0"], p))
        q, _ = k.fit_rate(curves["gd"][0], ref)
        assert q <= (1 - 1 / 10.0) ** 2 + 1e-6
        assert curves["decoupled"][0][-1] / ref < 1e-8
