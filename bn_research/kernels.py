"""Kernels chosen per backend, in one place.

XLA:CPU runs a few operations far slower than mathematically equal rewrites of them
(measured by `benchmarks/run.py`; numbers in the docstrings below). On the CPU backend the
package uses the rewrites, and oneDNN's convolutions through XLA's FFI where they build
(`bn_research/onednn.py`); on every other backend (GPU, TPU) it uses XLA's own operations
(cuDNN convolutions, `reduce_window` / `select_and_scatter`, `jax.random.permutation`),
which were not measured to lose there. `kind()` says which set a process uses (recorded
in summary.json as `kernels`):

    'onednn'  the CPU rewrites, with oneDNN's convolutions (the CPU default where
              `onednn.available()`)
    'cpu'     the CPU rewrites, convolutions from XLA's operations (the CPU default
              where oneDNN is unavailable)
    'xla'     XLA's own operations (every other backend)

`BN_RESEARCH_KERNELS=onednn|cpu|xla` overrides the choice. tests/test_kernels.py checks
that the sets give the same values, gradients and vmaps.

    conv_same(x, w)                 stride-1 'SAME' NHWC x HWIO convolution (CPU: see
                                    `conv_same_cpu` / `conv_same_onednn`, measured)
    max_pool_2x2(h)                 2x2 stride-2 'VALID' max-pooling, NHWC
    normalize(x, axes, eps)         (x - mean) / sqrt(var + eps) over `axes`, with the
                                    mean and the biased variance (batch, layer, group norm)
    normalize_affine(x, s, b, ...)  the same times a per-feature scale plus a shift, and
                                    an optional activation after it (batch norm with
                                    gamma and beta, and the layer's nonlinearity)
    epoch_permutation(key, e, n)    a uniform shuffle of arange(n) for epoch e
    global_norm(tree)               the Euclidean norm of all leaves together
    replica_program(has_conv)       'vmap' or 'map' for the replicas' shared program

The choice is made when a function is traced (`jax.default_backend()`), never at import.
"""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp

from bn_research import onednn

KINDS = ("onednn", "cpu", "xla")
CPU_KINDS = ("onednn", "cpu")


def kind() -> str:
    """'onednn', 'cpu' or 'xla' (see the module's docstring)."""
    forced = os.environ.get("BN_RESEARCH_KERNELS", "")
    if forced:
        if forced not in KINDS:
            raise ValueError(f"BN_RESEARCH_KERNELS={forced!r}; choose one of: {', '.join(KINDS)}")
        if forced == "onednn" and jax.default_backend() != "cpu":
            raise ValueError(f"BN_RESEARCH_KERNELS=onednn runs on the CPU backend only (this process uses "
                             f"{jax.default_backend()}); unset it or choose xla")
        if forced == "onednn" and not onednn.available():
            raise ValueError(f"BN_RESEARCH_KERNELS=onednn, but oneDNN is unavailable: {onednn.reason()}")
        return forced
    if jax.default_backend() != "cpu":
        return "xla"
    return "onednn" if onednn.available() else "cpu"


def conv_same(x, w):
    """Stride-1 'SAME' NHWC x HWIO convolution (odd kernel sizes)."""
    k = kind()
    if k == "onednn":
        return conv_same_onednn(x, w)
    return conv_same_cpu(x, w) if k == "cpu" else conv_same_xla(x, w)


def max_pool_2x2(h):
    """2x2 max-pooling with stride 2, NHWC, 'VALID' (odd edges dropped)."""
    return max_pool_2x2_cpu(h) if kind() in CPU_KINDS else max_pool_2x2_xla(h)


def normalize(x, axes: tuple[int, ...], epsilon: float):
    """(x_hat, mean, var) with mean and biased variance over `axes` (kept as size-1 axes)
    and x_hat = (x - mean) * rsqrt(var + epsilon); differentiable in x through all three."""
    if kind() in CPU_KINDS:
        return normalize_cpu(x, tuple(axes), float(epsilon))
    return normalize_xla(x, tuple(axes), float(epsilon))


def normalize_affine(x, scale, bias, axes: tuple[int, ...], epsilon: float, activation=None):
    """(activation(y), y, mean, var) with y = x_hat * scale + bias: `normalize` followed by
    a per-feature scale and shift ([F], feature last) and an optional elementwise
    `activation` (None: the identity, and the first two are the same array),
    differentiable in x, scale and bias (batch norm's training path)."""
    if kind() in CPU_KINDS:
        return normalize_affine_cpu(x, scale, bias, tuple(axes), float(epsilon), activation)
    return normalize_affine_xla(x, scale, bias, tuple(axes), float(epsilon), activation)


def global_norm(tree):
    """The Euclidean norm of all leaves of `tree` together (`optax.global_norm`)."""
    if kind() in CPU_KINDS:
        return global_norm_cpu(tree)
    return global_norm_xla(tree)


def replica_program(has_conv: bool) -> str:
    """How N replicas of one model share a compiled chunk: 'vmap' (vectorized) or 'map'
    (`lax.map` over small groups of replicas, `replicas.MAP_GROUP`). On the CPU a model
    with convolutions runs faster as 'map': vmapped, every elementwise operation and
    reduction works on all replicas' activations at once, which no longer fit the
    caches. 8 replicas of configs/cnn.py, 10-step chunks, 5 interleaved repetitions, in
    replica-steps/s: with oneDNN's convolutions map in pairs 76.8, one replica per map
    step 73.4, vmap 59.7 (one FFI call for all replicas' convolutions; 48.8 with a call
    per replica), the 8 run one after another 77.6; with XLA's convolutions (kind 'cpu',
    where a step keeps about one core busy and two replicas' chunks side by side keep
    both) map in pairs 37.9, vmap 33.1, one after another 33.4. Dense models vectorize
    well (MLP, 200-step chunks: vmap 2527, map in pairs 2343, one after another 2212).
    Elsewhere 'vmap'."""
    return "map" if kind() in CPU_KINDS and has_conv else "vmap"


def epoch_permutation(key, epoch, n: int):
    """A uniformly shuffled `arange(n)` for epoch `epoch`, drawn from fold_in(key, epoch).
    The two kinds draw different (equally uniform) permutations from the same key."""
    if kind() in CPU_KINDS:
        return epoch_permutation_cpu(key, epoch, n)
    return jax.random.permutation(jax.random.fold_in(key, epoch), n)


# ---------------------------------------------------------------------------------------
# XLA's own operations (every backend but CPU)


def conv_same_xla(x, w):
    return jax.lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))


def max_pool_2x2_xla(h):
    return jax.lax.reduce_window(h, -jnp.inf, jax.lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "VALID")


def normalize_xla(x, axes, epsilon):
    mean = x.mean(axes, keepdims=True)
    var = jnp.mean(jnp.square(x - mean), axes, keepdims=True)
    return (x - mean) * jax.lax.rsqrt(var + epsilon), mean, var


def global_norm_xla(tree):
    return jnp.sqrt(sum(jnp.sum(jnp.square(x)) for x in jax.tree_util.tree_leaves(tree)))


def activate(y, activation=None):
    """activation(y), or y itself when `activation` is None."""
    return y if activation is None else activation(y)


def normalize_affine_xla(x, scale, bias, axes, epsilon, activation=None):
    x_hat, mean, var = normalize_xla(x, axes, epsilon)
    y = x_hat * scale + bias
    return activate(y, activation), y, mean, var


# ---------------------------------------------------------------------------------------
# XLA:CPU rewrites


# Convolutions with at most this many input channels run as kh*kw*cin broadcast
# multiply-adds (`_conv_taps`, one fused elementwise loop) instead of XLA's convolution.
TAPS_MAX_CIN = 3
# Under vmap with per-replica kernels, up to this many replicas' convolutions are emitted
# one after another in the program (unrolled); more run in a `lax.map` loop.
UNROLL_MAX_REPLICAS = 16
# Kernel gradients with at most this many input channels are one im2col matmul; more
# channels, one matmul per kernel offset.
DW_IM2COL_MAX_CIN = 3


def _pad_same(x, kh, kw):
    pad = [(0, 0)] * (x.ndim - 3) + [(kh // 2, kh // 2), (kw // 2, kw // 2), (0, 0)]
    return jnp.pad(x, pad)


def _shifted(x, kh, kw):
    """The kh*kw views x_pad[..., a:a+H, b:b+W, :] in row-major offset order."""
    h, wd = x.shape[-3], x.shape[-2]
    xp = _pad_same(x, kh, kw)
    return [xp[..., a:a + h, b:b + wd, :] for a in range(kh) for b in range(kw)]


def _conv_taps(x, w):
    """y = sum_{a,b,c} x_pad[..., a:a+H, b:b+W, c] * w[a, b, c, :]: elementwise, for few
    input channels, where XLA:CPU's convolution (and a matmul with K = kh*kw*cin) is slow."""
    kh, kw, cin, _ = w.shape
    y = None
    for v, wk in zip(_shifted(x, kh, kw), w.reshape((kh * kw, cin) + w.shape[-1:]), strict=True):
        for c in range(cin):
            t = v[..., c:c + 1] * wk[c]
            y = t if y is None else y + t
    return y


def _conv_plain(x, w):
    if w.shape[2] <= TAPS_MAX_CIN:
        return _conv_taps(x, w)
    return jax.lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))


def _conv_plain_onednn(x, w):
    if w.shape[2] <= TAPS_MAX_CIN or x.dtype != jnp.float32 or w.dtype != jnp.float32:
        return _conv_plain(x, w)
    return onednn.conv_forward(x, w)


def _kernel_grad_plain(x, dy, kh, kw):
    cin, cout = x.shape[-1], dy.shape[-1]
    dy2 = dy.reshape(-1, cout)
    views = _shifted(x, kh, kw)
    if cin <= DW_IM2COL_MAX_CIN:
        # few input channels: one matmul [kh*kw*cin, B*H*W] x [B*H*W, cout] (im2col)
        return jnp.dot(jnp.concatenate(views, -1).reshape(-1, kh * kw * cin).T, dy2).reshape(kh, kw, cin, cout)
    return jnp.stack([jnp.dot(v.reshape(-1, cin).T, dy2) for v in views]).reshape(kh, kw, cin, cout)


def _kernel_grad_onednn(x, dy, kh, kw):
    if x.dtype != jnp.float32 or dy.dtype != jnp.float32:
        return _kernel_grad_plain(x, dy, kh, kw)
    return onednn.conv_kernel_grad(x, dy, kh, kw)


def _per_replica(fn, axis_size, in_batched, *args):
    """fn on each replica's slice of the batched `args` (the others shared), stacked: emitted
    one after another in the program, or in a `lax.map` loop beyond UNROLL_MAX_REPLICAS."""
    if axis_size > UNROLL_MAX_REPLICAS:
        mapped = [a for a, b in zip(args, in_batched, strict=True) if b]

        def one(sliced):
            it = iter(sliced)
            return fn(*(next(it) if b else a for a, b in zip(args, in_batched, strict=True)))

        return jax.lax.map(one, mapped)
    return jnp.stack([fn(*(a[i] if b else a for a, b in zip(args, in_batched, strict=True)))
                      for i in range(axis_size)])


def _batched_conv(plain, vectorized: bool):
    """`plain(x, w)` with the convolutions' vmap rule. Under vmap (e.g. replicas): a batch of
    inputs with one kernel folds into the batch axis; few input channels broadcast over the
    replica axis (`_conv_taps`); with `vectorized` (oneDNN: one FFI call takes every
    replica), `plain` vmapped; otherwise one convolution per replica, emitted one after
    another (a `lax.map` loop beyond UNROLL_MAX_REPLICAS), because the grouped convolution
    that vmap would otherwise emit is ~5x slower on XLA:CPU, and a batched matmul (im2col)
    ~2x slower."""

    @jax.custom_batching.custom_vmap
    def conv(x, w):
        return plain(x, w)

    @conv.def_vmap
    def _vmap(axis_size, in_batched, x, w):
        x_batched, w_batched = in_batched
        if not w_batched:
            n, b = x.shape[:2]
            return conv(x.reshape((n * b,) + x.shape[2:]), w).reshape((n, b) + x.shape[2:-1] + w.shape[-1:]), True
        if w.shape[3] <= TAPS_MAX_CIN:
            return jax.vmap(_conv_taps, in_axes=(0 if x_batched else None, 0))(x, w), True
        if vectorized:
            return jax.vmap(plain, in_axes=(0 if x_batched else None, 0))(x, w), True
        return _per_replica(conv, axis_size, in_batched, x, w), True

    return conv


def _batched_kernel_grad(plain, kh, kw, vectorized: bool):
    """dW of a kh x kw 'SAME' convolution from (x, dy), with a vmap rule like the forward's:
    per-replica kernel gradients one after another instead of batched matmuls (with
    `vectorized`, `plain` vmapped)."""

    @jax.custom_batching.custom_vmap
    def kernel_grad(x, dy):
        return plain(x, dy, kh, kw)

    @kernel_grad.def_vmap
    def _vmap(axis_size, in_batched, x, dy):
        if vectorized:
            axes = tuple(0 if b else None for b in in_batched)
            return jax.vmap(lambda x, dy: plain(x, dy, kh, kw), in_axes=axes)(x, dy), True
        return _per_replica(kernel_grad, axis_size, in_batched, x, dy), True

    return kernel_grad


def _differentiable_conv(plain, kernel_grad_plain, vectorized: bool):
    """A custom_vjp convolution from a forward and a kernel gradient (both with vmap rules):
    the input gradient is the forward convolution of dy with the flipped, in/out-swapped
    kernel; the kernel gradient `kernel_grad_plain(x, dy, kh, kw)`."""
    forward = _batched_conv(plain, vectorized)
    kernel_grads = functools.cache(lambda kh, kw: _batched_kernel_grad(kernel_grad_plain, kh, kw, vectorized))

    @jax.custom_vjp
    def conv(x, w):
        return forward(x, w)

    def fwd(x, w):
        return forward(x, w), (x, w)

    def bwd(res, dy):
        x, w = res
        dw = kernel_grads(w.shape[0], w.shape[1])(x, dy)
        # dx = dy (*) flip(W)^T: a forward convolution with a plain HWIO kernel.
        dx = forward(dy, jnp.flip(w, (0, 1)).transpose(0, 1, 3, 2))
        return dx, dw

    conv.defvjp(fwd, bwd)
    return conv


_conv_cpu = _differentiable_conv(_conv_plain, _kernel_grad_plain, vectorized=False)
_conv_onednn = _differentiable_conv(_conv_plain_onednn, _kernel_grad_onednn, vectorized=True)


def conv_same_cpu(x, w):
    """Stride-1 'SAME' NHWC x HWIO convolution (odd kernel sizes), from XLA's operations.

    Forward: XLA's convolution, except for at most TAPS_MAX_CIN input channels (the
    CNN's first layer on grey or RGB images), where it is kh*kw*cin broadcast
    multiply-adds fused into one elementwise loop (`_conv_taps`; 28x28, 1 -> 16 channels,
    batch 64: ~0.3 ms instead of ~2 ms). The gradients are written out so that XLA:CPU
    runs them fast inside a loop (`lax.scan` over training steps), where it lowers the
    autodiff gradient convolutions (reversed kernel, batch-as-feature layouts) 10-40x
    slower than outside one (measured again: the CNN step 0.05x with autodiff's kernel
    gradient): the input gradient is the forward convolution of dy with the flipped,
    in/out-swapped kernel, the kernel gradient one matmul per kernel offset,
    dW[a, b] = sum_{n,h,w} x_pad[n, h+a, w+b]^T dy[n, h, w] (one im2col matmul for at
    most DW_IM2COL_MAX_CIN input channels). Under vmap the kernel gradient, like the
    forward, runs per replica (`_batched_kernel_grad`) instead of as batched matmuls: 8
    vmapped replicas of configs/cnn.py 30.0 -> 32.7 replica-steps/s.

    Measured on the CNN of configs/cnn.py (batch 64, probes off, K=10 steps per chunk,
    7 interleaved repetitions in one process, 2 shared cores at load average ~4.4;
    `benchmarks/conv_kernels.py`), against the previous version (XLA's forward for every
    layer, per-offset kernel gradient everywhere, replicas' convolutions in `lax.map`):
    the step 1.09x faster (15.6 -> 17.1 steps/s; the unrolled vmap alone 1.01x, plus the
    im2col kernel gradient 1.04x); 8 vmapped replicas 1.12x faster, 0.84 -> 0.89 of the
    throughput of the same 8 replicas run one after another.

    Tried and slower on these shapes (16-32 channels, 28x28 and 14x14), so not used:
    im2col forward / input gradient ([B*H*W, 9*Cin] patches, one matmul; 1.3-2x slower
    than XLA's convolution, which XLA:CPU runs through YNNPACK at 14x14 and Eigen at
    28x28: the 9x patch matrix is memory-bound), the per-offset sum of 9 matmuls (2-3x
    slower), im2col kernel gradient for many channels (step 0.89x) or per-offset row
    ranges of the flattened padded images (0.84x; XLA copies each slice either way), and
    under vmap a batched (replica-axis) matmul or XLA's grouped convolution (2-5x slower
    than one convolution per replica). XLA_FLAGS --xla_cpu_use_onednn / _use_xnnpack did
    not speed the convolution up either.
    """
    return _conv_cpu(x, w)


def conv_same_onednn(x, w):
    """`conv_same_cpu` with oneDNN's convolutions (`bn_research/onednn.py`, every core) for
    the forward pass, the input gradient (the forward convolution with the flipped kernel)
    and the kernel gradient of float32 layers; the forward pass of layers with at most
    TAPS_MAX_CIN input channels keeps `_conv_taps` (oneDNN there: no difference measured).

    configs/cnn.py (batch norm, probes off, 50-step chunks, alternating processes): 26.5
    -> 13.4 ms per step against `conv_same_cpu`. Per call, 64 x 28 x 28, 16 -> 16
    channels: forward 1.13 ms (XLA 1.78), kernel gradient 1.17 (per-offset matmuls 4.08);
    at 14 x 14 XLA's forward (YNNPACK) is faster alone (0.42 vs 0.66 ms for 16 -> 32), but
    the step with XLA's 14 x 14 forwards was slower (15.7-16.7 vs 13.3-14.3 ms).
    Tried and not kept: oneDNN's batch normalization for `normalize` (CNN step 12.4 ->
    13.6-14.5 ms, MLP 0.40 -> 0.84 ms: a call's fixed cost, and XLA fuses the statistics
    with their neighbours), oneDNN's matmul for dense layers (60 x 784 x 100: 91 vs 93 us
    forward, 61 vs 139 us kernel gradient), native per-column moments for the drift probe
    (drift every step 1.21 -> 1.75 of probes off: the FFI call breaks XLA's fusions)."""
    return _conv_onednn(x, w)


def _corners_2x2(h):
    """The four [B, H//2, W//2, C] corners of the 2x2 windows ('VALID': odd edges
    dropped), in row-major window order."""
    b, hh, ww, c = h.shape
    h = h[:, : hh // 2 * 2, : ww // 2 * 2].reshape(b, hh // 2, 2, ww // 2, 2, c)
    return [h[:, :, i, :, j, :] for i in range(2) for j in range(2)]


@jax.custom_vjp
def max_pool_2x2_cpu(h):
    """2x2 max-pooling with stride 2, NHWC, 'VALID'.

    Equal to `lax.reduce_window(max)` forward and backward (the gradient goes to the first
    maximum of each window, as `select_and_scatter` does), but built from elementwise
    maxima of the windows' four corners, which remember which corner won (int8): XLA:CPU
    runs the `select_and_scatter` gradient of `reduce_window` ~7x slower. The gradient is
    a broadcast and a select over [B, H/2, 2, W/2, 2, C], which reshapes to the input's
    layout without a transpose, so XLA fuses it into the operation that reads it.
    """
    a, b, c, d = _corners_2x2(h)
    return jnp.maximum(jnp.maximum(a, b), jnp.maximum(c, d))


def _max_pool_fwd(h):
    a, b, c, d = _corners_2x2(h)
    m = jnp.maximum(jnp.maximum(a, b), jnp.maximum(c, d))
    first = jnp.where(a == m, 0, jnp.where(b == m, 1, jnp.where(c == m, 2, 3))).astype(jnp.int8)
    return m, (first, h.shape)


def _max_pool_bwd(res, dy):
    first, shape = res
    b, hh, ww, c = shape
    window = (1, 1, 2, 1, 2, 1)
    pos = 2 * jax.lax.broadcasted_iota(jnp.int8, window, 2) + jax.lax.broadcasted_iota(jnp.int8, window, 4)
    g = jnp.where(first[:, :, None, :, None, :] == pos, dy[:, :, None, :, None, :], jnp.zeros((), dy.dtype))
    g = g.reshape(b, hh // 2 * 2, ww // 2 * 2, c)
    return (jnp.pad(g, ((0, 0), (0, hh % 2), (0, ww % 2), (0, 0))),)


max_pool_2x2_cpu.defvjp(_max_pool_fwd, _max_pool_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def normalize_cpu(x, axes, epsilon):
    """`normalize_xla` with its gradient written out: with x_hat the output, r = rsqrt(var +
    eps) and means over `axes`, dx = r * (dx_hat - mean(dx_hat) - x_hat * mean(dx_hat *
    x_hat)) + dmean / n + 2 dvar (x - mean) / n. Autodiff of the forward pass emits about
    five reductions per call where this needs two, and XLA:CPU runs each as its own pass
    over the activations. CNN of configs/cnn.py (batch norm, probes off, 10-step chunks,
    medians of 5 alternating processes): 30.96 -> 29.55 ms per step (1.05x); the MLP
    of configs/mlp.py unchanged (0.41-0.42 ms per step either way)."""
    return normalize_xla(x, axes, epsilon)


def _normalize_fwd(x, axes, epsilon):
    x_hat, mean, var = normalize_xla(x, axes, epsilon)
    return (x_hat, mean, var), (x_hat, jax.lax.rsqrt(var + epsilon))


def _normalize_bwd(axes, epsilon, res, cts):
    del epsilon
    x_hat, r = res
    d_hat, d_mean, d_var = cts
    n = 1
    for a in axes:
        n *= x_hat.shape[a]
    dx = r * (d_hat - d_hat.mean(axes, keepdims=True) - x_hat * jnp.mean(d_hat * x_hat, axes, keepdims=True))
    # the statistics' own cotangents (zero when they only feed stop_gradient, e.g. the
    # running averages: XLA removes the terms' multiplications by a zero constant only
    # partly, so they are skipped when JAX knows them to be zero)
    if not isinstance(d_mean, jax.custom_derivatives.SymbolicZero):
        dx = dx + d_mean / n
    if not isinstance(d_var, jax.custom_derivatives.SymbolicZero):
        dx = dx + d_var * (2.0 / n) * x_hat / r
    return (dx,)


def _normalize_fwd_sz(x, axes, epsilon):
    return _normalize_fwd(x.value, axes, epsilon)


normalize_cpu.defvjp(_normalize_fwd_sz, _normalize_bwd, symbolic_zeros=True)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def normalize_affine_cpu(x, scale, bias, axes, epsilon, activation=None):
    """`normalize_affine_xla` with its gradient written out. With g the cotangent of y (the
    activation's backward applied to the output's cotangent, plus y's own), x_hat = (x -
    mean) r, r = rsqrt(var + eps), and sums over `axes`: dbias = sum g, dscale = sum g
    x_hat (summed further over any leading group axes), and dx = scale r (g - sum g / n -
    x_hat sum(g x_hat) / n) (+ the statistics' own cotangents). The two sums of the
    normalization's backward are the two the affine's gradient needs, and g is formed
    inside the passes that read it: autodiff of `normalize_cpu`, the affine and the
    activation takes four sums over the activations per layer and writes out the
    activation's gradient and g * scale. x_hat is recomputed from x in the backward pass
    rather than stored. (CNN step: README, Performance.)"""
    return normalize_affine_xla(x, scale, bias, axes, epsilon, activation)


def _normalize_affine_fwd(x, scale, bias, axes, epsilon, activation):
    x, scale, bias = x.value, scale.value, bias.value
    mean = x.mean(axes, keepdims=True)
    var = jnp.mean(jnp.square(x - mean), axes, keepdims=True)
    r = jax.lax.rsqrt(var + epsilon)
    y = (x - mean) * r * scale + bias
    return (activate(y, activation), y, mean, var), (x, mean, r, scale, bias)


def _normalize_affine_bwd(axes, epsilon, activation, res, cts):
    del epsilon
    x, mean, r, scale, bias = res
    d_out, d_y, d_mean, d_var = cts
    n = 1
    for a in axes:
        n *= x.shape[a]
    x_hat = (x - mean) * r
    zero = jax.custom_derivatives.SymbolicZero
    g = jnp.zeros(x.shape, x.dtype)
    if not isinstance(d_out, zero):
        g = d_out if activation is None else jax.vjp(activation, x_hat * scale + bias)[1](d_out)[0]
    if not isinstance(d_y, zero):
        g = g + d_y
    sum_g = jnp.sum(g, axes, keepdims=True)
    sum_gx = jnp.sum(g * x_hat, axes, keepdims=True)
    dx = (scale * r) * (g - sum_g / n - x_hat * (sum_gx / n))
    if not isinstance(d_mean, zero):
        dx = dx + d_mean / n
    if not isinstance(d_var, zero):
        dx = dx + d_var * (2.0 / n) * (x - mean)
    flat = (-1, x.shape[-1])
    return dx, sum_gx.reshape(flat).sum(0), sum_g.reshape(flat).sum(0)


normalize_affine_cpu.defvjp(_normalize_affine_fwd, _normalize_affine_bwd, symbolic_zeros=True)


def global_norm_cpu(tree):
    """`global_norm_xla` with each leaf's squares summed along its last axis by a
    matrix-vector product with ones, then over the rest. XLA:CPU rewrites a sum of
    squares over many elements, however it is written, into a tree of 32-wide windowed
    sums, which took 42-48 us of a 0.42 ms MLP step for the 784x100 kernel gradient (the
    gradient norm every step logs). MLP of configs/mlp.py, probes off, 500-step chunks,
    medians of 5 alternating processes: 0.424 -> 0.385 ms per step."""
    def squares(x):
        x = x.reshape(-1, x.shape[-1]) if x.ndim > 1 else x.reshape(1, -1)
        return jnp.sum(jnp.dot(jnp.square(x), jnp.ones(x.shape[-1:], x.dtype)))

    return jnp.sqrt(sum(squares(x) for x in jax.tree_util.tree_leaves(tree)))


def epoch_permutation_cpu(key, epoch, n: int):
    """A uniformly shuffled `arange(n)` for epoch `epoch`, drawn from fold_in(key, epoch).

    Each round sorts one uint32 array whose high bits are random and whose low bits hold
    the current position, so the sort has a single operand and unique keys (XLA:CPU sorts
    one operand ~8x faster than the key/value pairs of `jax.random.permutation`). Rounds
    repeat until the random bits exceed 3 log2(n), the birthday bound that
    `jax.random.permutation` also uses, so ties in the random part barely bias the order.
    """
    pos_bits = max(1, (n - 1).bit_length())
    if pos_bits > 28:
        return jax.random.permutation(jax.random.fold_in(key, epoch), n)
    rounds = -(-3 * pos_bits // (32 - pos_bits))
    mask = jnp.uint32((1 << pos_bits) - 1)
    key = jax.random.fold_in(key, epoch)
    positions = jnp.arange(n, dtype=jnp.uint32)
    perm = None
    for r in range(rounds):
        rand = jax.random.bits(jax.random.fold_in(key, r), (n,), jnp.uint32)
        order = (jnp.sort((rand & ~mask) | positions) & mask).astype(jnp.int32)
        perm = order if perm is None else perm[order]
    return perm
