"""The XLA:CPU rewrites in bn_research/kernels.py, and its oneDNN convolutions, equal XLA's
own operations: values, gradients (the hand-written VJPs against autodiff of the XLA op)
and vmap rules (against XLA's own vmap of its operation), so the backend choice changes
speed only."""

import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bn_research import kernels, onednn

# The CPU convolutions: XLA's operations rewritten, and oneDNN's through the FFI.
CPU_CONVS = {"cpu": kernels.conv_same_cpu, "onednn": kernels.conv_same_onednn}


def _conv(impl):
    if impl == "onednn" and not onednn.available():
        pytest.skip(f"oneDNN unavailable: {onednn.reason()}")
    return CPU_CONVS[impl]


def _usable_kinds():
    """Every kernel set this machine can run (oneDNN needs its wheels and a compiler:
    `test_onednn_builds_where_its_wheels_exist` insists on it where the wheels exist)."""
    return [k for k in kernels.KINDS if k != "onednn" or onednn.available()]


def _xw(key, b=3, h=7, w=6, cin=4, cout=5, k=3):
    kx, kw = jax.random.split(key)
    return jax.random.normal(kx, (b, h, w, cin)), jax.random.normal(kw, (k, k, cin, cout))


# (batch, height, width, cin, cout, kernel): few input channels take the elementwise
# forward (`_conv_taps`) and the im2col kernel gradient; more, XLA's convolution and one
# matmul per offset. Odd and non-square images, 1x1, 3x3 and 5x5 kernels.
CONV_SHAPES = [
    (3, 7, 6, 1, 5, 3), (2, 5, 7, 2, 3, 3), (3, 7, 6, 4, 5, 3), (2, 6, 6, 16, 8, 3),
    (3, 7, 6, 4, 5, 1), (3, 7, 6, 1, 5, 1), (3, 7, 6, 4, 5, 5), (2, 5, 9, 3, 4, 5),
]


# (shape, axes): batch norm of dense and NHWC layers, ghost groups, layer and group norm
NORM_CASES = [
    ((64, 10), (0,)), ((8, 5, 6, 12), (0, 1, 2)), ((4, 3, 5, 5, 8), (1, 2, 3)),
    ((6, 20), (1,)), ((3, 4, 4, 2, 5), (1, 2, 4)),
]


@pytest.mark.parametrize("shape,axes", NORM_CASES)
@pytest.mark.parametrize("uses", [(1, 0, 0), (0, 1, 0), (0, 0, 1), (1, 1, 1)], ids=["x_hat", "mean", "var", "all"])
def test_normalize_values_and_gradients_match_autodiff(shape, axes, uses):
    """The hand-written backward of `normalize_cpu` equals autodiff of `normalize_xla`,
    through x_hat, the mean and the variance (each alone and together)."""
    x = 3.0 * jax.random.normal(jax.random.key(len(shape)), shape) + 1.5
    out_cpu, out_xla = kernels.normalize_cpu(x, axes, 1e-5), kernels.normalize_xla(x, axes, 1e-5)
    for a, b in zip(out_cpu, out_xla, strict=True):
        np.testing.assert_array_equal(a, b)
    c = jnp.cos(jnp.arange(x.size, dtype=jnp.float32).reshape(shape))

    def loss(f):
        def fn(x):
            y, m, v = f(x, axes, 1e-5)
            return uses[0] * jnp.sum(y * c) + uses[1] * jnp.sum(jnp.sin(3 * m)) + uses[2] * jnp.sum(v ** 1.5)
        return fn

    g_cpu, g_xla = jax.grad(loss(kernels.normalize_cpu))(x), jax.grad(loss(kernels.normalize_xla))(x)
    scale = float(jnp.abs(g_xla).max())
    assert scale > 0
    np.testing.assert_allclose(g_cpu, g_xla, rtol=1e-5, atol=1e-5 * scale)
    # and under vmap (replicas), against autodiff vmapped
    xs = jnp.stack([x, 2 * x - 1])
    np.testing.assert_allclose(jax.vmap(jax.grad(loss(kernels.normalize_cpu)))(xs),
                               jax.vmap(jax.grad(loss(kernels.normalize_xla)))(xs), rtol=1e-5, atol=2e-5 * scale)


@pytest.mark.parametrize("shape,axes", [c for c in NORM_CASES if c[1][-1] < len(c[0]) - 1])
@pytest.mark.parametrize("activation", [None, "relu", "tanh"])
@pytest.mark.parametrize("uses", [(1, 0, 0, 0), (0, 1, 0, 0), (0, 0, 1, 1), (1, 1, 1, 1)],
                         ids=["out", "y", "stats", "all"])
def test_normalize_affine_values_and_gradients_match_autodiff(shape, axes, activation, uses):
    """The hand-written backward of `normalize_affine_cpu` (batch norm with gamma and beta,
    then the activation: dense, NHWC, ghost groups) equals autodiff of
    `normalize_affine_xla` in x, scale and bias, through the activation's output, the
    normalized y, and the statistics, alone and under vmap."""
    act = {None: None, "relu": jax.nn.relu, "tanh": jnp.tanh}[activation]
    x = 3.0 * jax.random.normal(jax.random.key(len(shape)), shape) + 1.5
    f = shape[-1]
    scale = jnp.linspace(0.3, 2.0, f) * jnp.where(jnp.arange(f) % 3 == 0, -1.0, 1.0)
    bias = jnp.linspace(-1.0, 0.5, f)
    out_cpu = kernels.normalize_affine_cpu(x, scale, bias, axes, 1e-5, act)
    out_xla = kernels.normalize_affine_xla(x, scale, bias, axes, 1e-5, act)
    for a, b in zip(out_cpu, out_xla, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
    c = jnp.cos(jnp.arange(x.size, dtype=jnp.float32).reshape(shape))

    def loss(fn):
        def value(x, scale, bias):
            out, y, m, v = fn(x, scale, bias, axes, 1e-5, act)
            return (uses[0] * jnp.sum(out * c) + uses[1] * jnp.sum(jnp.sin(y) * c)
                    + uses[2] * jnp.sum(jnp.sin(3 * m)) + uses[3] * jnp.sum(v ** 1.5))
        return jax.grad(value, argnums=(0, 1, 2))

    g_cpu = loss(kernels.normalize_affine_cpu)(x, scale, bias)
    g_xla = loss(kernels.normalize_affine_xla)(x, scale, bias)
    for a, b in zip(g_cpu, g_xla, strict=True):
        size = float(jnp.abs(b).max())
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * max(size, 1e-3))
    assert float(jnp.abs(g_xla[0]).max()) > 0
    xs, ss = jnp.stack([x, 2 * x - 1]), jnp.stack([scale, -scale])
    v_cpu = jax.vmap(loss(kernels.normalize_affine_cpu), (0, 0, None))(xs, ss, bias)
    v_xla = jax.vmap(loss(kernels.normalize_affine_xla), (0, 0, None))(xs, ss, bias)
    for a, b in zip(v_cpu, v_xla, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=2e-5 * max(float(jnp.abs(b).max()), 1e-3))


@pytest.mark.parametrize("impl", CPU_CONVS)
@pytest.mark.parametrize("shape", CONV_SHAPES)
def test_conv_values_and_gradients_match_xla(shape, impl):
    conv = _conv(impl)
    b, h, w, cin, cout, k = shape
    x, w = _xw(jax.random.key(sum(shape)), b, h, w, cin, cout, k)
    np.testing.assert_allclose(jax.jit(conv)(x, w), kernels.conv_same_xla(x, w), rtol=1e-5, atol=1e-5)
    dy = jax.random.normal(jax.random.key(9), kernels.conv_same_xla(x, w).shape)

    def loss(f):
        return lambda x, w: jnp.sum(f(x, w) * dy)

    gx_cpu, gw_cpu = jax.jit(jax.grad(loss(conv), (0, 1)))(x, w)
    gx_xla, gw_xla = jax.grad(loss(kernels.conv_same_xla), (0, 1))(x, w)
    np.testing.assert_allclose(gx_cpu, gx_xla, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(gw_cpu, gw_xla, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("unroll", [True, False], ids=["unrolled", "lax_map"])
@pytest.mark.parametrize("shape", [(3, 7, 6, 4, 5, 3), (2, 5, 7, 1, 3, 3), (2, 5, 7, 4, 3, 5), (2, 5, 7, 3, 2, 1)])
@pytest.mark.parametrize("batched", [(True, False), (True, True), (False, True)])
@pytest.mark.parametrize("impl", CPU_CONVS)
def test_conv_vmap_rule_matches_xla_vmap(impl, batched, shape, unroll, monkeypatch):
    """The custom vmap rule (replicas fold into the batch, broadcast through the elementwise
    form, or run one convolution each: unrolled, or in a lax.map loop) against XLA's own
    vmap of its convolution, values and gradients under vmap."""
    if not unroll:
        monkeypatch.setattr(kernels, "UNROLL_MAX_REPLICAS", 0)
    b, h, w, cin, cout, k = shape
    n = 3
    xs, ws = zip(*[_xw(jax.random.key(i), b, h, w, cin, cout, k) for i in range(n)], strict=True)
    x_in = jnp.stack(xs) if batched[0] else xs[0]
    w_in = jnp.stack(ws) if batched[1] else ws[0]
    axes = tuple(0 if b else None for b in batched)
    conv = _conv(impl)
    out = jax.vmap(conv, in_axes=axes)(x_in, w_in)
    ref = jax.vmap(kernels.conv_same_xla, in_axes=axes)(x_in, w_in)
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)
    # and its gradient under vmap (replicas differentiate through it)
    g = jax.vmap(jax.grad(lambda x, w: jnp.sum(conv(x, w) ** 2), (0, 1)), in_axes=axes)(x_in, w_in)
    g_ref = jax.vmap(jax.grad(lambda x, w: jnp.sum(kernels.conv_same_xla(x, w) ** 2), (0, 1)), in_axes=axes)(x_in, w_in)
    for a, b in zip(g, g_ref, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("impl", CPU_CONVS)
def test_conv_vmap_of_vmap_matches_xla(impl):
    """Nested vmap (e.g. replicas of a per-example map): the rule applies level by level."""
    xs = jax.random.normal(jax.random.key(0), (2, 3, 2, 5, 6, 4))
    ws = jax.random.normal(jax.random.key(1), (2, 3, 3, 3, 4, 5))
    f = jax.vmap(jax.vmap(_conv(impl), in_axes=(0, 0)), in_axes=(0, 0))
    f_ref = jax.vmap(jax.vmap(kernels.conv_same_xla, in_axes=(0, 0)), in_axes=(0, 0))
    np.testing.assert_allclose(f(xs, ws), f_ref(xs, ws), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape", [(2, 8, 8, 3), (2, 7, 5, 3)])
@pytest.mark.parametrize("ties", ["one", "relu"])
def test_max_pool_values_and_gradients_match_xla(shape, ties):
    h = jax.random.normal(jax.random.key(0), shape)
    if ties == "one":
        h = h.at[0, 0, 0, 0].set(h[0, 0, 1, 0])  # a tie: the gradient goes to the first maximum in both
    else:  # after a ReLU, coarsely rounded: windows with two, three and four equal maxima
        h = jax.nn.relu(jnp.round(h))
    np.testing.assert_array_equal(kernels.max_pool_2x2_cpu(h), kernels.max_pool_2x2_xla(h))
    dy = jax.random.normal(jax.random.key(1), kernels.max_pool_2x2_xla(h).shape)
    g_cpu = jax.grad(lambda h: jnp.sum(kernels.max_pool_2x2_cpu(h) * dy))(h)
    g_xla = jax.grad(lambda h: jnp.sum(kernels.max_pool_2x2_xla(h) * dy))(h)
    np.testing.assert_allclose(g_cpu, g_xla, rtol=0, atol=0)
    # under vmap (replicas) and jit, against XLA's pooling vmapped
    hs, dys = jnp.stack([h, -h]), jnp.stack([dy, 2 * dy])

    def grads(pool):
        return jax.jit(jax.vmap(jax.grad(lambda h, dy: jnp.sum(pool(h) * dy))))(hs, dys)

    np.testing.assert_allclose(grads(kernels.max_pool_2x2_cpu), grads(kernels.max_pool_2x2_xla), rtol=0, atol=0)


def test_both_permutations_are_uniform_permutations(monkeypatch):
    n, epochs = 8, 2000
    for kind in _usable_kinds():
        monkeypatch.setenv("BN_RESEARCH_KERNELS", kind)
        perms = np.stack([np.asarray(kernels.epoch_permutation(jax.random.key(0), e, n)) for e in range(epochs)])
        assert (np.sort(perms, 1) == np.arange(n)).all(), kind
        counts = np.stack([(perms == v).sum(0) for v in range(n)])
        assert np.abs(counts / epochs - 1 / n).max() < 0.04, kind


def test_kind_follows_the_backend_and_the_override(monkeypatch):
    monkeypatch.delenv("BN_RESEARCH_KERNELS", raising=False)
    expected = ("onednn" if onednn.available() else "cpu") if jax.default_backend() == "cpu" else "xla"
    assert kernels.kind() == expected
    monkeypatch.setenv("BN_RESEARCH_KERNELS", "xla")
    assert kernels.kind() == "xla"
    monkeypatch.setenv("BN_RESEARCH_KERNELS", "tpu_magic")
    with pytest.raises(ValueError, match="choose one of: onednn, cpu, xla"):
        kernels.kind()
    # without oneDNN the CPU default is the XLA rewrites, and forcing oneDNN says why not
    monkeypatch.setattr(onednn, "_load", lambda: (None, "no C++ compiler on PATH (install g++, or set CXX)"))
    monkeypatch.setenv("BN_RESEARCH_KERNELS", "onednn")
    with pytest.raises(ValueError, match="oneDNN is unavailable: no C.. compiler on PATH"):
        kernels.kind()
    monkeypatch.delenv("BN_RESEARCH_KERNELS")
    assert kernels.kind() == ("cpu" if jax.default_backend() == "cpu" else "xla")


@pytest.mark.skipif(not (sys.platform.startswith("linux") and os.uname().machine == "x86_64"),
                    reason="the oneDNN wheels are pinned for Linux x86_64")
def test_onednn_builds_where_its_wheels_exist():
    """`make install` brings the pinned oneDNN wheels and the compiler is on the machine, so
    the CPU default here is oneDNN's convolutions (a silent fallback would hide a slowdown)."""
    assert onednn.available(), onednn.reason()
    assert "avx" in onednn.implementation("kernel_grad", (8, 14, 14, 16), (3, 3, 16, 32))


def test_onednn_build_failure_is_one_line_naming_the_cause(monkeypatch, tmp_path):
    monkeypatch.setenv("BN_RESEARCH_CACHE", str(tmp_path))
    monkeypatch.setenv("CXX", "false")  # a "compiler" that always fails
    if not (sys.platform.startswith("linux") and os.uname().machine == "x86_64"):
        with pytest.raises(OSError, match="pinned for Linux x86_64"):
            onednn._build()
        return
    with pytest.raises(OSError, match="compiling native/onednn_conv.cc failed"):
        onednn._build()
    assert list(tmp_path.iterdir()) == []  # no partial library left in the cache


def test_cnn_trains_the_same_with_either_kernel_set(monkeypatch):
    """Six steps of the CNN: the loss trajectory with XLA's convolution and pooling equals the
    one with the CPU rewrites (both runs draw the data order with the same permutation)."""
    from bn_research import train
    from tests.conftest import load_config

    c = load_config("cnn", "width=4")
    c.train.num_steps, c.train.log_every, c.train.eval_every, c.train.batch_size = 6, 1, 6, 8
    for p in c.probes:
        c.probes[p].enabled = False
    monkeypatch.setattr(kernels, "epoch_permutation", kernels.epoch_permutation_cpu)
    losses = {}
    for kind in _usable_kinds():
        monkeypatch.setenv("BN_RESEARCH_KERNELS", kind)
        s = train.setup(c)
        fns = s["fns"]
        state, metrics = jax.jit(fns.train_chunk, static_argnums=2)(s["state"], s["data"]["train"], 6)
        losses[kind] = np.asarray(metrics["loss"])
    assert losses["cpu"].shape == (6,) and np.isfinite(losses["cpu"]).all()
    np.testing.assert_allclose(losses["cpu"], losses["xla"], rtol=1e-4)
    if "onednn" in losses:
        np.testing.assert_allclose(losses["onednn"], losses["xla"], rtol=1e-4)


@pytest.mark.parametrize("n, ranks", [(4096, (0, 1, 614, 2047, 3481, 4094)), (1000, (0, 1, 149, 500, 849, 998)),
                                      (60, (0, 8, 9, 29, 50, 58)), (256, (0, 38, 127, 216, 254)), (3, (0, 1))])
def test_native_order_statistics_equal_the_bisection(n, ranks):
    """The drift probe's percentiles on the CPU take their order statistics from the
    native library (selection for many values per column, over the cores from 16,384
    values on; pairwise ranks for up to 256 per column);
    they equal `drift.order_statistics` (bisection on the float32 bit patterns) bit for
    bit, ranks and their successors (up to the last value), alone and under vmap, on
    columns with +-0, ties (a column of one value), infinities and huge and tiny
    magnitudes."""
    from bn_research.probes import drift

    if not onednn.available():
        pytest.skip(f"native library unavailable: {onednn.reason()}")
    rng = np.random.default_rng(5)
    a = rng.standard_t(2, size=(4096, 5)).astype(np.float32) * np.float32([1, 1e-30, 1e30, 1, 1])
    a[:7, 0], a[7:12, 0], a[:40, 3], a[:, 4] = 0.0, -0.0, 2.5, 1.0
    a[0, 1], a[1, 1] = np.inf, -np.inf
    a = np.ascontiguousarray(a[:n])
    low, nxt = jax.jit(lambda x: onednn.order_statistics(x, ranks))(a)
    b_low, b_nxt = drift.order_statistics(jnp.asarray(a), ranks, successors=True)
    np.testing.assert_array_equal(np.asarray(low).view(np.uint32), np.asarray(b_low).view(np.uint32))
    np.testing.assert_array_equal(np.asarray(nxt).view(np.uint32), np.asarray(b_nxt).view(np.uint32))
    np.testing.assert_array_equal(np.asarray(nxt), np.sort(a, 0)[np.minimum(np.asarray(ranks) + 1, n - 1)])
    pair = np.stack([a, -2 * a[::-1]])
    v_low, v_nxt = jax.jit(jax.vmap(lambda x: onednn.order_statistics(x, ranks)))(pair)
    for i in range(2):
        want_low, want_nxt = drift.order_statistics(jnp.asarray(pair[i]), ranks, successors=True)
        np.testing.assert_array_equal(np.asarray(v_low[i]).view(np.uint32), np.asarray(want_low).view(np.uint32))
        np.testing.assert_array_equal(np.asarray(v_nxt[i]).view(np.uint32), np.asarray(want_nxt).view(np.uint32))


def test_global_norm_matches_optax():
    """The CPU's gradient norm (sums of squares by matrix-vector products) equals
    `optax.global_norm` over leaves of every rank, alone and under vmap (replicas)."""
    import optax

    keys = jax.random.split(jax.random.key(3), 5)
    tree = {"w": jax.random.normal(keys[0], (784, 100)), "conv": jax.random.normal(keys[1], (3, 3, 16, 32)),
            "b": jax.random.normal(keys[2], (100,)), "s": jnp.float32(-2.5),
            "deep": [jax.random.normal(keys[3], (7, 3)) * 1e3]}
    for f in (kernels.global_norm_cpu, kernels.global_norm_xla):
        np.testing.assert_allclose(f(tree), optax.global_norm(tree), rtol=2e-6)
    trees = jax.tree_util.tree_map(lambda x: jnp.stack([x, 0.5 * x]), tree)
    np.testing.assert_allclose(jax.vmap(kernels.global_norm_cpu)(trees), jax.vmap(optax.global_norm)(trees), rtol=2e-6)
