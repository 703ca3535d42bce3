"""Experiment scripts: claims infrastructure, `reproduce --quick` of every experiment, and
theory checks (Yang et al. 2019 gradient explosion rate)."""

import json
import math

import numpy as np
import pytest

from experiments import common, reproduce
from experiments import yang_gradient_explosion as yang


def test_bn_relu_gradient_growth_matches_mean_field_theory(tmp_path):
    """A 16-layer width-128 batch-normalized ReLU MLP at init, B = 128: the squared gradient
    norm grows towards the input by the finite-batch mean-field rate (Yang et al. 2019) to
    within 5% (the probe's fit over interior layers); without batch norm (He init) no growth."""
    factors = {}
    for norm in ("batch", "none"):
        c = yang.arm_config("relu", norm, 128, quick=True)
        c.model.depth, c.model.width = 16, 128
        run = common.run(c, tmp_path / norm)
        factors[norm] = yang.rates([run])[0]
    assert abs(factors["batch"] / yang.RELU_RATE[128] - 1) < 0.05, factors
    assert factors["none"] < 1.1, factors
    assert np.isfinite(list(factors.values())).all()


def test_yang_mean_field_rate_formula():
    """The Monte Carlo rate is (B-2)/(B-3) exactly for linear, reproduces the RELU_RATE table,
    and tends to pi/(pi-1) for ReLU at large B."""
    for b in (8, 32, 512):
        assert yang.mean_field_rate(b, "linear", samples=1000) == pytest.approx((b - 2) / (b - 3), rel=1e-9)
    for b in (8, 128):
        assert yang.mean_field_rate(b, "relu", samples=200_000, seed=11) == pytest.approx(yang.RELU_RATE[b], rel=4e-3)
    assert yang.RELU_RATE[512] == pytest.approx(yang.THEORY_LARGE_B, rel=3e-3)
    assert yang.RELU_RATE[8] > yang.RELU_RATE[32] > yang.RELU_RATE[128] > yang.RELU_RATE[512]


def _brute_force_rate(b, width, depth, activation, draws):
    """Deep BN network written out by hand (no library code): Gaussian inputs, square
    N(0, 1/N) weights, batch norm without affine, a random linear loss on the last layer;
    geometric mean over draws of the per-layer growth of ||dL/dW_l||^2 (layers 1..L-2)."""
    import jax
    import jax.numpy as jnp

    def one(key):
        kx, kw, kc = jax.random.split(key, 3)
        ws = jax.random.normal(kw, (depth, width, width)) / jnp.sqrt(width)

        def loss(ws):
            h = jax.random.normal(kx, (b, width))
            for w in ws:
                z = h @ w
                z = (z - z.mean(0)) / jnp.sqrt(z.var(0))
                h = jax.nn.relu(z) if activation == "relu" else z
            return jnp.sum(jax.random.normal(kc, (b, width)) * h)

        y = jnp.log(jnp.sum(jnp.square(jax.grad(loss)(ws)), (1, 2)))[1:-1]
        lc = jnp.arange(y.shape[0]) - (y.shape[0] - 1) / 2
        return -jnp.sum(lc * y) / jnp.sum(lc * lc)

    return float(jnp.exp(jnp.mean(jax.jit(jax.vmap(one))(jax.random.split(jax.random.key(0), draws)))))


@pytest.mark.parametrize("activation", ["linear", "relu"])
def test_yang_rate_matches_brute_force_bn_network(activation):
    """B = 8: a hand-written deep BN network's gradient growth matches the mean-field rate
    (1.2 linear, 1.79 ReLU) to 4% at width 96 (finite width lowers it by ~2%), and is far
    from the large-batch ReLU value pi/(pi-1) = 1.467."""
    want = yang.expected_rate(activation, 8)
    got = _brute_force_rate(8, 96, 10, activation, 16)
    assert got == pytest.approx(want, rel=0.04)
    assert abs(got - yang.THEORY_LARGE_B) > 0.1


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


def test_finished_runs_are_reused(tmp_path):
    """A config with tuple settings (stored as JSON lists) matches its finished run."""
    c = common.config("mlp.py", "width=8", **{"train.num_steps": 10, "train.log_every": 5, "train.eval_every": 10})
    assert isinstance(c.probes.landscape.step_sizes, tuple)
    assert not common._finished(c, tmp_path / "run")
    common.run(c, tmp_path / "run")
    assert common._finished(c, tmp_path / "run")
    c.seed = 1
    assert not common._finished(c, tmp_path / "run")


def test_project_readme_table_is_replaced_between_markers(tmp_path):
    claim = common.Claim("x_up", "paper", "x is above 1", "ratio", "> 1", common.above(1.0))
    claims = [{**claim.verdict([1.5, 1.6, 1.7]), "experiment": "demo"}]
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{reproduce.README_START}\nold table\n{reproduce.README_END}\noutro\n")
    assert reproduce.update_project_readme(claims, readme)
    text = readme.read_text()
    assert "old table" not in text and text.startswith("intro\n") and text.endswith("outro\n")
    assert "`x_up`: x is above 1" in text and "| holds |" in text and "1 claims, 1 hold" in text
    plain = tmp_path / "PLAIN.md"
    plain.write_text("no markers\n")
    assert not reproduce.update_project_readme(claims, plain) and plain.read_text() == "no markers\n"
