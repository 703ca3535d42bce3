"""Experiment scripts against theory: Yang et al. (2019) gradient explosion rate."""

import math

import numpy as np

from experiments import common
from experiments import yang_gradient_explosion as yang


def test_bn_relu_gradient_growth_matches_mean_field_theory(tmp_path):
    """A 16-layer width-128 batch-normalized ReLU MLP at init: the squared gradient norm
    grows towards the input by pi/(pi-1) per layer (Yang et al. 2019) to within 5%; the
    same network without batch norm (He init) shows no such growth."""
    factors = {}
    for norm, scale in (("batch", 1.0), ("none", math.sqrt(2.0))):
        c = common.config("mlp.py", f"norm={norm},depth=16,width=128,activation=relu",
                          **{"train.batch_size": 128, "train.num_steps": 1, "train.log_every": 1,
                             "train.eval_every": 1, "model.init_scale": scale})
        run = common.run(c, tmp_path / norm)
        factors[norm] = yang.interior_factor(yang.grad_norms(run, 16))
    assert abs(factors["batch"] / yang.THEORY - 1) < 0.05, factors
    assert factors["none"] < 1.1, factors
    assert np.isfinite(list(factors.values())).all()


def test_landscape_script_runs_quick(tmp_path, monkeypatch):
    from experiments import santurkar_landscape

    monkeypatch.setattr("sys.argv", ["x", "--quick", "--workdir", str(tmp_path / "runs"),
                                     "--results", str(tmp_path / "results")])
    rows = santurkar_landscape.main()
    assert (tmp_path / "results" / "santurkar_landscape.md").exists()
    assert (tmp_path / "results" / "santurkar_landscape.png").stat().st_size > 1000
    assert [r[0] for r in rows] == ["none", "batch"]
    assert all(np.isfinite(r[1:]).all() for r in rows)
