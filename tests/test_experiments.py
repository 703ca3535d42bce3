"""Experiment scripts: claims infrastructure, `reproduce --quick` of every experiment, and
theory checks (Yang et al. 2019 gradient explosion rate)."""

import json
import math

import numpy as np
import pytest

from experiments import common, reproduce
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


def test_ci95_matches_student_t_by_hand():
    m = common.ci95([1.0, 2.0, 3.0])
    half = 4.303 * 1.0 / math.sqrt(3)  # t_{0.975, 2} * s / sqrt(n), s = 1
    assert m["n"] == 3 and m["mean"] == pytest.approx(2.0)
    assert m["ci95"] == pytest.approx([2.0 - half, 2.0 + half])
    wide = common.ci95([1.0, float("nan"), 3.0])
    assert not np.isfinite(wide["mean"])  # a diverged seed is reported, not dropped


def test_claim_verdict_uses_the_declared_rule():
    up = common.Claim("x", "paper", "x is above 1", "ratio", "> 1", common.above(1.0))
    assert up.verdict([1.5, 1.6, 1.7])["holds"] is True
    assert up.verdict([0.5, 1.6, 2.7])["holds"] is False  # mean above 1 but the CI is not
    near = common.Claim("y", "paper", "y equals theory", "rate", 2.0, common.within(0.05))
    assert near.verdict([2.02, 2.05, 2.08])["holds"] is True
    assert near.verdict([2.2, 2.2, 2.2])["holds"] is False
    nan = up.verdict([1.5, float("nan"), 1.7])
    assert nan["holds"] is False
    with pytest.raises(ValueError, match="at least 3"):
        common.validate_claim({**up.verdict([2.0, 3.0]), "experiment": "e"})


@pytest.mark.parametrize("name", reproduce.EXPERIMENTS)
def test_reproduce_quick_writes_valid_claims(name, tmp_path):
    """`bn-research reproduce --quick NAME`: the experiment runs tiny, and its claims file,
    the gathered claims.json and the verdict README are written and schema-valid."""
    results = tmp_path / "results"
    code = reproduce.main(["--quick", name, "--workdir", str(tmp_path / "runs"), "--results", str(results)])
    assert code == 0
    claims = json.loads((results / "claims.json").read_text())
    assert claims and {c["experiment"] for c in claims} == {name}
    for c in claims:
        common.validate_claim(c)
        assert c["measured"]["n"] >= 3
        assert c["criterion"] and c["claim"] and c["paper"]
    ids = [c["id"] for c in claims]
    assert len(ids) == len(set(ids))
    readme = (results / "README.md").read_text()
    assert all(i in readme for i in ids)
    assert (results / f"{name}.md").exists()
