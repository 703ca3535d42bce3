"""The paper's deep linear setting (configs/deep_linear.py:paper, Santurkar et al. 2018,
app. A.1(2)) and the loss-scale conversion of its learning rate."""

import importlib.util

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bn_research import step, train
from bn_research.probes import common
from tests.conftest import ROOT, load_config


def _deep_linear_module():
    spec = importlib.util.spec_from_file_location("cfg_deep_linear", ROOT / "configs" / "deep_linear.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_paper_dln_is_25_square_layers_trained_full_batch():
    config = load_config("deep_linear", "paper,norm=none")
    s = train.setup(config)
    params = s["state"]["params"]
    kernels = [np.asarray(common.layer(params, n)["linear"]["kernel"].value) for n in common.layer_names(params)]
    kernels.append(np.asarray(params["head"]["kernel"].value))
    assert len(kernels) == 25 and all(k.shape == (10, 10) for k in kernels)
    assert s["data"]["train"]["x"].shape == (1000, 10) and config.train.batch_size == 1000
    # y = A x exactly (no label noise): the least-squares fit of y on x has zero residual
    x, y = np.asarray(s["data"]["train"]["x"], np.float64), np.asarray(s["data"]["train"]["y"], np.float64)
    a, *_ = np.linalg.lstsq(x, y, rcond=None)
    assert np.abs(x @ a - y).max() < 1e-4
    # Glorot normal std sqrt(2 / (fan_in + fan_out)) = 1/sqrt(10) for square layers
    assert np.std(np.concatenate([k.ravel() for k in kernels])) == pytest.approx(10 ** -0.5, rel=0.05)


def test_paper_rate_is_gradient_descent_on_the_summed_squared_error():
    """lr * grad(sum_n ||f(x_n) - y_n||^2) == paper_rate(lr) * grad(framework loss)."""
    mod = _deep_linear_module()
    config = load_config("deep_linear", "paper,norm=batch")
    assert config.optimizer.learning_rate == pytest.approx(mod.paper_rate(mod.PAPER_LR, 1000))
    s = train.setup(config)
    graphdef, st = s["graphdef"], s["state"]
    x, y = s["data"]["train"]["x"], s["data"]["train"]["y"]

    def out(params):
        return step.forward(graphdef, params, st["batch_stats"], x, train=True)[0]

    ours = jax.grad(lambda p: step.loss_and_metrics("regression", out(p), y)[0])(st["params"])
    summed = jax.grad(lambda p: jnp.sum(jnp.square(out(p) - y)))(st["params"])
    lr = 1e-6
    ours = np.concatenate([np.ravel(a) for a in jax.tree_util.tree_leaves(ours)]).astype(np.float64)
    summed = np.concatenate([np.ravel(b) for b in jax.tree_util.tree_leaves(summed)]).astype(np.float64)
    # float32 round-off relative to the largest gradient entry (some entries are ~0 by symmetry)
    np.testing.assert_allclose(mod.paper_rate(lr, 1000) * ours, lr * summed, rtol=1e-4,
                               atol=1e-5 * lr * np.abs(summed).max())
    assert np.abs(summed).max() > 1e-3  # a real gradient, not zeros on both sides
