"""The benchmark harness runs anywhere: argument checks happen before the (long) run."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def op_limit_primitives():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import op_limit

    return op_limit.PRIMITIVES


def test_out_that_is_a_file_fails_before_the_run(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "run.py"), "--quick", "--out", str(blocker / "sub")],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stderr
    assert "--out" in r.stderr and "not a writable directory" in r.stderr
    assert "steps/s" not in r.stdout  # nothing was measured


def test_quick_torch_and_limit_rows_without_torch(tmp_path):
    """`--quick --only torch,limit` with torch made unimportable: every PyTorch row (eager and
    torch.compile) is there and says unavailable; each model has its limit row."""
    hide_torch = ("import runpy, sys; sys.modules['torch'] = None; sys.argv = sys.argv[1:]; "
                  "runpy.run_path(sys.argv[0], run_name='__main__')")
    r = subprocess.run([sys.executable, "-c", hide_torch, str(ROOT / "benchmarks" / "run.py"), "--quick",
                        "--reps", "1", "--only", "torch,limit", "--out", str(tmp_path)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    result = json.loads((tmp_path / "results.json").read_text())
    assert result["torch_status"] == {"eager": "unavailable (torch not installed)",
                                      "compile": "unavailable (torch not installed)"}
    rows = {row["name"]: row for row in result["results"]}
    for kind in ("mlp", "cnn"):
        for tag in ("", ", probes off"):
            for peer in ("eager", "torch.compile"):
                row = rows[f"{kind} framework{tag} / PyTorch {peer} (speedup)"]
                assert row["ratio"] is None and row["met"] is None
                assert row["unavailable"] == "unavailable (torch not installed)"
                assert row["b"]["label"].endswith(": unavailable (torch not installed)")
        lim = rows[f"{kind} train step / its own dot+conv ops alone (time ratio)"]
        assert lim["section"] == f"{kind}: limit" and lim["ratio"] > 0
        assert lim["a"]["median"] > 0 and lim["b"]["median"] > 0
        assert lim["ops"] and {op["op"] for op in lim["ops"]} <= set(op_limit_primitives())
        assert "XLA kept" in lim["note"]
    # the MLP's traced matmuls are exactly the analytic count (forward, weight and input gradients)
    mlp = rows["mlp train step / its own dot+conv ops alone (time ratio)"]
    assert abs(mlp["own_mflop"] - mlp["analytic_mflop"]) < 0.01 * mlp["analytic_mflop"]
    md = (tmp_path / "results.md").read_text()
    assert "torch.compile: unavailable (torch not installed)" in md
    assert "mlp train step / its own dot+conv ops alone" in md


def test_op_limit_collects_through_sub_jaxprs_and_keeps_every_op():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import jax
    import jax.numpy as jnp
    import op_limit

    @jax.custom_vjp
    def f(x, w):
        return x @ w

    f.defvjp(lambda x, w: (x @ w, (x, w)), lambda res, g: (g @ res[1].T, res[0].T @ g))

    def step(x, w, k):
        def body(h, _):
            return jnp.tanh(h @ w), None

        h, _ = jax.lax.scan(body, x, None, length=3)  # 3 dots
        h = jax.lax.cond(h.sum() > 0, lambda a: a @ w @ w, lambda a: a, h)  # costliest branch: 2 dots
        unused = x @ w @ w  # noqa: F841 - dead code, dropped
        c = jax.lax.conv_general_dilated(k, k, (1, 1), "SAME")  # 1 conv
        return jax.grad(lambda w_: f(h, w_).sum())(w), c  # custom_vjp: forward dot dead, backward 1 dot

    x, w, k = jnp.ones((4, 8)), jnp.ones((8, 8)), jnp.ones((1, 1, 5, 5))
    found = op_limit.collect(step, x, w, k)
    assert found.counts() == {"dot_general": 6, "conv_general_dilated": 1, "onednn_conv": 0}
    assert any("cond" in n for n in found.notes)
    assert found.flops() == 5 * 2 * 4 * 8 * 8 + 2 * 8 * 4 * 8 + 2 * 25 * 25
    fn, operands = op_limit.program(found.ops, 2)
    compiled = fn.lower(operands).compile()
    assert op_limit.hlo_counts(compiled) == {"dot": 6, "conv": 1}
    assert jnp.isfinite(compiled(operands))


def test_op_limit_counts_the_onednn_convolutions():
    """The CPU's oneDNN convolutions are FFI calls: counted (forward and kernel gradient),
    with their FLOPs, and run again alone."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import jax
    import jax.numpy as jnp
    import op_limit

    from bn_research import kernels, onednn

    if not onednn.available():
        pytest.skip(f"oneDNN unavailable: {onednn.reason()}")
    x, w = jnp.ones((2, 6, 5, 4)), jnp.ones((3, 3, 4, 8))
    # the loss and its kernel gradient: forward + kernel gradient (the input gradient is dead)
    found = op_limit.collect(jax.value_and_grad(lambda w: kernels.conv_same_onednn(x, w).sum()), w)
    assert found.counts() == {"dot_general": 0, "conv_general_dilated": 0, "onednn_conv": 2}
    assert found.flops() == 2 * (2 * 2 * 6 * 5 * 4 * 8 * 9)
    fn, operands = op_limit.program(found.ops, 2)
    compiled = fn.lower(operands).compile()
    assert op_limit.hlo_counts(compiled) == {"dot": 0, "conv": 2}
    assert jnp.isfinite(compiled(operands))
