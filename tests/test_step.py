"""Hot-path pieces of step.py and the scan-over-layers MLP against plain references."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bn_research import kernels, models, step, train
from tests.conftest import load_config, tiny


@pytest.mark.parametrize("n", [1, 7, 50, 4000])
def test_epoch_permutation_is_a_permutation(n):
    key = jax.random.key(3)
    a = np.asarray(kernels.epoch_permutation_cpu(key, 0, n))
    assert sorted(a.tolist()) == list(range(n))
    if n > 7:
        b = np.asarray(kernels.epoch_permutation_cpu(key, 1, n))
        assert not np.array_equal(a, b)


def test_epoch_permutation_positions_are_uniform():
    """Over many epochs every element lands in every position about equally often."""
    n, epochs = 8, 4000
    perms = np.asarray(jax.vmap(lambda e: kernels.epoch_permutation_cpu(jax.random.key(0), e, n))(jnp.arange(epochs)))
    counts = np.stack([(perms == v).sum(0) for v in range(n)])
    assert np.abs(counts / epochs - 1 / n).max() < 0.03


@pytest.mark.parametrize("start,k", [(0, 5), (3, 12), (9, 1), (4, 30)])
def test_chunk_batches_equal_get_batch(start, k):
    n, b = 50, 10  # 5 steps per epoch: chunks that cross several epochs
    data = {"x": jnp.arange(n, dtype=jnp.float32)[:, None], "y": jnp.arange(n)}
    key = jax.random.key(1)
    batch = step.chunk_batches(data, jnp.int32(start), key, b, k)
    for s in range(start, start + k):
        np.testing.assert_array_equal(batch(jnp.int32(s))["y"], step.get_batch(data, s, key, b)["y"])


def test_chunk_crossing_epochs_matches_single_steps():
    """K-step scan == K single steps, for chunks that start mid-epoch and span epochs."""
    config = tiny(load_config("mlp", "norm=noisy_batch,train.batch_size=1000"))  # 4 steps per epoch
    for name in config.probes:  # the step's own state only; probes are covered by test_replicas
        config.probes[name].enabled = False
    s = train.setup(config)
    chunk = jax.jit(s["fns"].train_chunk, static_argnums=2)
    one = jax.jit(s["fns"].train_step)
    d = s["data"]["train"]
    state_b, losses = s["state"], []
    for _ in range(3):
        state_b, m = one(state_b, d)
    state_a, _ = chunk(state_b, d, 1)  # state at step 4 via the chunk path as well
    state_b, m = one(state_b, d)
    for _ in range(9):
        state_b, m = one(state_b, d)
        losses.append(m["loss"])
    state_a, metrics = chunk(state_a, d, 9)
    np.testing.assert_allclose(metrics["loss"], np.array(losses), rtol=1e-5, atol=1e-6)
    for a, b in zip(jax.tree_util.tree_leaves(state_a), jax.tree_util.tree_leaves(state_b), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("arg", ["norm=noisy_batch", "norm=layer,model.residual=true", "norm=none,depth=5"])
def test_scan_layers_matches_unrolled(arg):
    """model.scan_layers: same init, outputs, per-layer aux, batch stats and gradients."""
    from flax import nnx

    config = load_config("mlp", arg)
    shape, x = (28, 28, 1), jax.random.normal(jax.random.key(0), (16, 28, 28, 1))
    config.model.scan_layers = False
    plain = models.build(config, shape, 10, seed=4)
    config.model.scan_layers, config.model.scan_min_depth = True, 3
    scanned = models.build(config, shape, 10, seed=4)
    assert scanned.scan_layers and not plain.scan_layers
    assert scanned.layer_names() == plain.layer_names()
    rng = jax.random.key(7)

    def run(model):
        graphdef, params, stats = nnx.split(model, nnx.Param, nnx.BatchStat)

        def loss(params):
            out, aux, new_stats = step.forward(graphdef, params, stats, x, train=True, rng=rng)
            return jnp.sum(out**2), (out, aux, new_stats)

        grads, (out, aux, new_stats) = jax.grad(loss, has_aux=True)(params)
        return out, aux, new_stats, grads

    out_p, aux_p, stats_p, grads_p = run(plain)
    out_s, aux_s, stats_s, grads_s = run(scanned)
    np.testing.assert_allclose(out_s, out_p, rtol=1e-5, atol=1e-5)
    assert aux_s.keys() == aux_p.keys()
    for name in aux_p:
        for key in aux_p[name]:
            np.testing.assert_allclose(aux_s[name][key], aux_p[name][key], rtol=1e-5, atol=1e-5)
    names = plain.layer_names()

    def per_layer(tree, model):
        flat = {"/".join(map(str, k)): v for k, v in nnx.to_flat_state(tree)}
        if not model.scan_layers:
            return flat
        out = {}
        for k, v in flat.items():
            if k.startswith("stack/"):
                for j, name in enumerate(names[1:]):
                    out[f"layers/{name}/" + k[len("stack/"):]] = v[...][j]
            else:
                out[k] = v
        return out

    for a, b in ((stats_s, stats_p), (grads_s, grads_p)):
        pa, pb = per_layer(a, scanned), per_layer(b, plain)
        assert pa.keys() == pb.keys()
        for k in pb:
            np.testing.assert_allclose(np.asarray(pa[k][...]), np.asarray(pb[k][...]), rtol=1e-4, atol=1e-5,
                                       err_msg=k)


def test_scan_layers_trains(tmp_path):
    config = tiny(load_config("mlp", "depth=6,model.scan_layers=true"))
    for name in config.probes:
        config.probes[name].enabled = False
    summary = train.train_and_evaluate(config, tmp_path)
    assert summary["status"] == "completed"
    assert np.isfinite(summary["final"]["eval/loss"])


def test_probe_steps_laid_out_in_the_chunk_equal_a_cond_in_every_step():
    """The chunk with probe steps at fixed positions and plain steps between them gives the
    state, per-step metrics and probe outputs of the step that runs every probe part under
    its cadence's `lax.cond` at every position: from step 0, and from a start that is not a
    multiple of the period (phase 3), with an every-step part (weights) and parts of
    different cadences (drift 4, drift_detail 8, growth 4)."""
    from bn_research import probes

    config = tiny(load_config("mlp", "norm=batch,width=16"), steps=24)
    t = config.train
    t.log_every, t.eval_every, t.checkpoint_every = 4, 12, 12
    config.probes.drift.detail_every, config.probes.weights.every = 8, 1
    s = train.setup(config)
    assert s["fns"].probe_period == 4 and s["fns"].phase(7) == 3
    every_position = probes.make_probe_fn(config, s["graphdef"], "classification")
    every_position.period = 1  # the reference: one scan, every part under its lax.cond in every step
    ref = step.make_step_fns(s["graphdef"], s["tx"], task="classification", batch_size=t.batch_size,
                             eval_batch_size=t.eval_batch_size, probe_fn=every_position)
    d = s["data"]["train"]
    got_state = want_state = s["state"]
    for n in (7, 9):  # steps 0..6 (phase 0), then 7..15 (phase 3)
        phase = s["fns"].phase(int(got_state["step"]))
        got_state, got = jax.jit(s["fns"].train_chunk, static_argnums=(2, 3))(got_state, d, n, phase)
        want_state, want = jax.jit(ref.train_chunk, static_argnums=2)(want_state, d, n)
        assert set(got) == set(want)
        for key in want:
            if key.endswith("/valid"):
                np.testing.assert_array_equal(got[key], want[key], err_msg=key)
            else:
                np.testing.assert_allclose(got[key], want[key], rtol=1e-5, atol=1e-6, err_msg=key)
        assert got["probes/weights/valid"].all() and got["probes/drift/valid"].sum() >= 2
    for a, b in zip(jax.tree_util.tree_leaves(got_state), jax.tree_util.tree_leaves(want_state), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
