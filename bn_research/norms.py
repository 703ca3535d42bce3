"""Normalization variants, selected by `config.model.norm`.

Every variant is a pair (linear kind, normalizer) described by a `NormSpec` in the plain
dict registry `NORMS`; `get(name)` returns it or raises a clear error listing the
choices. Normalizers are NNX modules called as `norm(x, train=..., rng=...)` on a
feature-last array (`[B, F]` or NHWC `[B, H, W, C]`); their trainable parameters are
`nnx.Param`, their running statistics `nnx.BatchStat`, nothing else.

Options live under `config.norm` (see `default_config`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from bn_research import kernels


def default_config() -> ml_collections.ConfigDict:
    """Defaults for `config.norm`; every option of every variant."""
    c = ml_collections.ConfigDict()
    c.momentum = 0.99  # running-statistics decay: ra <- m * ra + (1 - m) * batch stat
    c.epsilon = 1e-5  # added to the variance before the square root
    c.affine = True  # learn gamma (scale) and beta (shift) after normalizing
    c.placement = "before"  # 'before' the activation (Ioffe & Szegedy 2015) or 'after' it
    c.virtual_batch_size = 0  # ghost batch norm: statistics over sub-batches of this size; 0 = whole batch
    c.stats = "global"  # across devices: 'global' batch, 'per_device' shards, 'virtual' groups (bn_research.mesh)
    c.noise_n_mu = 0.5  # noisy_*: per-step, per-unit mean mu^t ~ U(-n_mu, n_mu) (Santurkar et al. 2018, Alg. 1)
    c.noise_n_sigma = 1.25  # noisy_*: per-step, per-unit scale sigma^t ~ U(1, n_sigma)
    c.noise_r_mu = 0.1  # noisy_*: per-element shift m ~ U(mu^t - r_mu, mu^t + r_mu)
    c.noise_r_sigma = 0.1  # noisy_*: per-element scale s ~ N(sigma^t, r_sigma)
    c.noise_r_sigma_is = "std"  # noisy_*: r_sigma read as the normal's 'std' or 'variance' (paper: unstated)
    c.noise_after_affine = True  # noisy_batch: noise on gamma*x_hat+beta (else on x_hat; paper: unstated)
    c.num_groups = 4  # group norm: channel groups (must divide every layer's width)
    c.wn_data_init = True  # weight: data-dependent init of g and b (Salimans & Kingma 2016, sec. 3)
    c.wn_mean_only_bn = False  # weight: add mean-only batch norm (Salimans & Kingma 2016, sec. 4)
    c.wn_init_std = 0.0  # weight: v ~ N(0, wn_init_std^2) (Salimans & Kingma 2016: 0.05); 0 = N(0, init_scale^2/fan_in)
    return c


# --------------------------------------------------------------------------------------
# Normalizers


def _reduce_axes(x: jax.Array) -> tuple[int, ...]:
    """All axes but the last (feature) one: batch and, for NHWC, spatial."""
    return tuple(range(x.ndim - 1))


class Identity(nnx.Module):
    """No normalization."""

    def __init__(self, num_features: int, cfg, *, rngs: nnx.Rngs):
        del num_features, cfg, rngs

    def __call__(self, x, *, train: bool, rng=None):
        return x


class BatchNorm(nnx.Module):
    """Batch normalization (Ioffe & Szegedy 2015, Alg. 1 and 2).

    Training: x_hat = (x - mu_B) / sqrt(var_B + eps), y = gamma * x_hat + beta, with the
    biased batch variance over every axis but the feature axis. With a virtual batch size
    v > 0 ("ghost" batch norm, Hoffer et al. 2017) the batch is cut into B / v groups that
    are normalized by their own statistics. Running statistics move towards the mean of the
    groups' statistics; evaluation normalizes by them (Alg. 2, with the biased variance).
    """

    def __init__(self, num_features: int, cfg, *, rngs: nnx.Rngs):
        del rngs
        self.momentum = float(cfg.momentum)
        self.epsilon = float(cfg.epsilon)
        self.virtual_batch_size = int(cfg.virtual_batch_size)
        self.affine = bool(cfg.affine)
        self.mean = nnx.BatchStat(jnp.zeros((num_features,), jnp.float32))
        self.var = nnx.BatchStat(jnp.ones((num_features,), jnp.float32))
        if self.affine:
            self.scale = nnx.Param(jnp.ones((num_features,), jnp.float32))
            self.bias = nnx.Param(jnp.zeros((num_features,), jnp.float32))

    def _normalize_train(self, x, affine: bool = False, activation=None):
        """(out, y, mean, var) with the batch (or ghost groups') statistics: y is x_hat, or
        with `affine` gamma * x_hat + beta, and out = activation(y) (y without one). With
        `affine` all of it is one operation with its own gradient
        (`kernels.normalize_affine`)."""
        v = self.virtual_batch_size
        b = x.shape[0]
        if affine:
            def norm(x, axes):
                return kernels.normalize_affine(x, self.scale.value, self.bias.value, axes, self.epsilon, activation)
        else:
            def norm(x, axes):
                y, mean, var = kernels.normalize(x, axes, self.epsilon)
                return kernels.activate(y, activation), y, mean, var
        if v and v < b:
            if b % v:
                raise ValueError(
                    f"batch size {b} is not a multiple of norm.virtual_batch_size={v}"
                )
            g = x.reshape((b // v, v) + x.shape[1:])
            out, y, mean, var = norm(g, tuple(range(1, g.ndim - 1)))
            flat = (-1, x.shape[-1])
            return out.reshape(x.shape), y.reshape(x.shape), mean.reshape(flat).mean(0), var.reshape(flat).mean(0)
        out, y, mean, var = norm(x, _reduce_axes(x))
        return out, y, mean.reshape(x.shape[-1:]), var.reshape(x.shape[-1:])

    def __call__(self, x, *, train: bool, rng=None):
        return self._forward(x, train, None)[1]

    def with_moments(self, x, *, train: bool, rng=None, activation=None):
        return self._forward(x, train, activation)

    def _forward(self, x, train, activation):
        """(activation(y), y, moments): the output y, an elementwise `activation` of it
        (None: y again; in training one operation with batch norm, see
        `kernels.normalize_affine`) and, when this step's batch gives them, the per-unit
        [mean, biased variance] of the input (`moments["in"]`, [2, F]) and of y
        (`moments["out"]`) over every axis but the feature axis, from the statistics the
        layer computes anyway (the drift probe reads them instead of reducing the
        activations again). Given in training over the whole batch: the input's are the
        batch statistics; the output's follow from them, mean beta and variance gamma^2 *
        var / (var + eps), which are the moments of gamma * x_hat + beta in exact
        arithmetic. With ghost batches (virtual_batch_size) the batch statistics are the
        groups' averages, not the batch's moments, and `moments` is empty."""
        moments = {}
        if train:
            out, y, mean, var = self._normalize_train(x, self.affine, activation)
            m = self.momentum
            self.mean.value = m * self.mean.value + (1.0 - m) * jax.lax.stop_gradient(mean)
            self.var.value = m * self.var.value + (1.0 - m) * jax.lax.stop_gradient(var)
            if not (self.virtual_batch_size and self.virtual_batch_size < x.shape[0]):
                out_var = var / (var + self.epsilon)
                out_mean = jnp.zeros_like(mean)
                if self.affine:
                    out_var = out_var * jnp.square(self.scale.value)
                    out_mean = out_mean + self.bias.value
                moments = {"in": jnp.stack([mean, var]), "out": jnp.stack([out_mean, out_var])}
            return out, y, moments
        y = (x - self.mean.value) * jax.lax.rsqrt(self.var.value + self.epsilon)
        if self.affine:
            y = y * self.scale.value + self.bias.value
        return kernels.activate(y, activation), y, moments


R_SIGMA_READINGS = ("std", "variance")


@dataclasses.dataclass(frozen=True)
class NoiseSpec:
    """The constants of Santurkar et al. 2018, App. A.2.1, Alg. 1 (paper defaults in
    `default_config`); `r_sigma_std` is the standard deviation of s around sigma^t."""

    n_mu: float
    n_sigma: float
    r_mu: float
    r_sigma_std: float

    @classmethod
    def from_config(cls, cfg) -> NoiseSpec:
        reading = cfg.noise_r_sigma_is
        if reading not in R_SIGMA_READINGS:
            raise ValueError(f"norm.noise_r_sigma_is must be one of {', '.join(R_SIGMA_READINGS)}, not '{reading}'")
        r_sigma = float(cfg.noise_r_sigma)
        return cls(float(cfg.noise_n_mu), float(cfg.noise_n_sigma), float(cfg.noise_r_mu),
                   r_sigma if reading == "std" else r_sigma**0.5)


def santurkar_noise(a, rng, spec: NoiseSpec):
    """a <- s * a + m, the non-stationary noise of Santurkar et al. 2018, App. A.2.1, Alg. 1.

    For every unit j (the last axis) one draw per call, i.e. per layer and step:
    mu_j ~ U(-n_mu, n_mu), sigma_j ~ U(1, n_sigma); then for every example i (and, for
    NHWC, every position: height and width count as batch) m_ij ~ U(mu_j - r_mu, mu_j + r_mu)
    and s_ij ~ N(sigma_j, r_sigma).
    """
    units = a.shape[-1:]
    k_mu, k_sigma, k_m, k_s = jax.random.split(rng, 4)
    mu = jax.random.uniform(k_mu, units, minval=-spec.n_mu, maxval=spec.n_mu)
    sigma = jax.random.uniform(k_sigma, units, minval=1.0, maxval=spec.n_sigma)
    m = mu + jax.random.uniform(k_m, a.shape, minval=-spec.r_mu, maxval=spec.r_mu)
    s = sigma + spec.r_sigma_std * jax.random.normal(k_s, a.shape)
    return s * a + m


def _need_rng(rng, name):
    if rng is None:
        raise ValueError(f"{name} needs a per-step rng key in training mode")


class NoisyBatchNorm(BatchNorm):
    """Batch norm followed by non-stationary noise (Santurkar et al. 2018, sec. 2.1 and
    App. A.2.1, Alg. 1): in training, `santurkar_noise` on the batch-normalized activation,
    a fresh per-unit mean and scale at every step, per-example noise around them, so the
    layer's output distribution moves from step to step. With `noise_after_affine` the
    noise acts on gamma * x_hat + beta (the output of the batch-norm layer, "injected after
    BatchNorm layers"), else on x_hat before gamma and beta. Evaluation is plain batch norm
    with running statistics, noise-free; the running statistics are those of batch norm.
    """

    def __init__(self, num_features: int, cfg, *, rngs: nnx.Rngs):
        super().__init__(num_features, cfg, rngs=rngs)
        self.noise = NoiseSpec.from_config(cfg)
        self.after_affine = bool(cfg.noise_after_affine)

    # no moments: the noise moves the output's away from batch norm's, so `Layer` calls
    # this normalizer and applies the activation as it does for every other one
    with_moments = None

    def __call__(self, x, *, train: bool, rng=None):
        if not train:
            return super().__call__(x, train=False)
        _need_rng(rng, "noisy_batch")
        _, y, mean, var = self._normalize_train(x)
        m = self.momentum
        self.mean.value = m * self.mean.value + (1.0 - m) * jax.lax.stop_gradient(mean)
        self.var.value = m * self.var.value + (1.0 - m) * jax.lax.stop_gradient(var)
        if not self.after_affine:
            y = santurkar_noise(y, rng, self.noise)
        if self.affine:
            y = y * self.scale.value + self.bias.value
        return santurkar_noise(y, rng, self.noise) if self.after_affine else y


class NoisyIdentity(nnx.Module):
    """No normalization, the same noise as `NoisyBatchNorm` on the layer's pre-activation:
    the control of Santurkar et al. 2018, sec. 2.1 (noise "without BatchNorm"). Noise-free
    at evaluation."""

    def __init__(self, num_features: int, cfg, *, rngs: nnx.Rngs):
        del num_features, rngs
        self.noise = NoiseSpec.from_config(cfg)

    def __call__(self, x, *, train: bool, rng=None):
        if not train:
            return x
        _need_rng(rng, "noisy_none")
        return santurkar_noise(x, rng, self.noise)


class MeanOnlyBatchNorm(nnx.Module):
    """Mean-only batch norm (Salimans & Kingma 2016, sec. 4): y = x - mu_B (+ beta).

    Used after a weight-normalized layer; the running mean replaces mu_B at evaluation.
    """

    def __init__(self, num_features: int, cfg, *, rngs: nnx.Rngs):
        del rngs
        self.momentum = float(cfg.momentum)
        self.mean = nnx.BatchStat(jnp.zeros((num_features,), jnp.float32))
        self.bias = nnx.Param(jnp.zeros((num_features,), jnp.float32))

    def __call__(self, x, *, train: bool, rng=None):
        if train:
            mean = x.mean(_reduce_axes(x))
            m = self.momentum
            self.mean.value = m * self.mean.value + (1.0 - m) * jax.lax.stop_gradient(mean)
        else:
            mean = self.mean.value
        return x - mean + self.bias.value


def _init_affine(module, num_features, cfg):
    """epsilon, affine and (if affine) gamma = 1, beta = 0 of a per-example normalizer."""
    module.epsilon = float(cfg.epsilon)
    module.affine = bool(cfg.affine)
    if module.affine:
        module.scale = nnx.Param(jnp.ones((num_features,), jnp.float32))
        module.bias = nnx.Param(jnp.zeros((num_features,), jnp.float32))


class LayerNorm(nnx.Module):
    """Layer normalization (Ba et al. 2016): statistics over all non-batch axes, per example."""

    def __init__(self, num_features: int, cfg, *, rngs: nnx.Rngs):
        del rngs
        _init_affine(self, num_features, cfg)

    def __call__(self, x, *, train: bool, rng=None):
        y = kernels.normalize(x, tuple(range(1, x.ndim)), self.epsilon)[0]
        if self.affine:
            y = y * self.scale.value + self.bias.value
        return y


class GroupNorm(nnx.Module):
    """Group normalization (Wu & He 2018): per example, over spatial axes and a group of
    `num_groups`-th of the channels."""

    def __init__(self, num_features: int, cfg, *, rngs: nnx.Rngs):
        del rngs
        self.groups = int(cfg.num_groups)
        if self.groups < 1 or num_features % self.groups:
            raise ValueError(
                f"norm.num_groups={self.groups} does not divide a layer width of "
                f"{num_features}; pick a divisor of every layer width"
            )
        _init_affine(self, num_features, cfg)

    def __call__(self, x, *, train: bool, rng=None):
        c = x.shape[-1]
        g = x.reshape(x.shape[:-1] + (self.groups, c // self.groups))
        axes = tuple(range(1, g.ndim - 2)) + (g.ndim - 1,)
        y = kernels.normalize(g, axes, self.epsilon)[0].reshape(x.shape)
        if self.affine:
            y = y * self.scale.value + self.bias.value
        return y


# --------------------------------------------------------------------------------------
# Linear maps: plain, or weight-normalized (length-direction decoupling)


class Dense(nnx.Module):
    """y = x W (+ b); LeCun-normal init scaled by `init_scale`."""

    def __init__(self, fan_in, fan_out, *, use_bias, init_scale=1.0, rngs: nnx.Rngs):
        w = jax.random.normal(rngs.params(), (fan_in, fan_out), jnp.float32)
        self.kernel = nnx.Param(w * (init_scale / jnp.sqrt(fan_in)))
        self.use_bias = use_bias
        if use_bias:
            self.bias = nnx.Param(jnp.zeros((fan_out,), jnp.float32))

    def weight(self):
        return self.kernel.value

    def __call__(self, x):
        y = x @ self.weight()
        return y + self.bias.value if self.use_bias else y


class Conv(Dense):
    """3x3 (or k x k) 'SAME' NHWC convolution; kernel HWIO."""

    def __init__(self, fan_in, fan_out, *, use_bias, kernel_size=3, init_scale=1.0, rngs):
        shape = (kernel_size, kernel_size, fan_in, fan_out)
        w = jax.random.normal(rngs.params(), shape, jnp.float32)
        self.kernel = nnx.Param(w * (init_scale / jnp.sqrt(fan_in * kernel_size**2)))
        self.use_bias = use_bias
        if use_bias:
            self.bias = nnx.Param(jnp.zeros((fan_out,), jnp.float32))

    def __call__(self, x):
        y = kernels.conv_same(x, self.weight())
        return y + self.bias.value if self.use_bias else y




def _wn_init_direction(kernel, fan_in, init_scale, init_std):
    """v ~ N(0, init_std^2) (Salimans & Kingma 2016, sec. 3: 0.05) when init_std > 0: the
    kernel was drawn N(0, init_scale^2 / fan_in), so rescale the same draw."""
    if init_std > 0:
        kernel.value = kernel.value * (init_std * jnp.sqrt(fan_in) / init_scale)


def _wn_weight(v, g):
    # Salimans & Kingma 2016, eq. 2: w = g * v / ||v||, one norm per output unit.
    axes = tuple(range(v.ndim - 1))
    return v * (g * jax.lax.rsqrt(jnp.sum(jnp.square(v), axes)))


class WNDense(Dense):
    """Weight-normalized dense layer: w = g * v / ||v|| (Salimans & Kingma 2016, eq. 2).

    `kernel` holds the direction parameter v, `g` the length; the effective weight is
    `weight()`. `data_init(x)` does the data-dependent initialization of sec. 3. With
    `init_std` > 0, v ~ N(0, init_std^2) (sec. 3 uses 0.05) instead of N(0, init_scale^2/fan_in).
    """

    def __init__(self, fan_in, fan_out, *, use_bias, init_scale=1.0, init_std=0.0, rngs: nnx.Rngs):
        super().__init__(fan_in, fan_out, use_bias=use_bias, init_scale=init_scale, rngs=rngs)
        _wn_init_direction(self.kernel, fan_in, init_scale, init_std)
        v = self.kernel.value
        self.g = nnx.Param(jnp.sqrt(jnp.sum(jnp.square(v), 0)))  # start at w = v

    def weight(self):
        return _wn_weight(self.kernel.value, self.g.value)


class WNConv(Conv):
    """Weight-normalized convolution, one length per output channel."""

    def __init__(self, fan_in, fan_out, *, use_bias, kernel_size=3, init_scale=1.0, init_std=0.0, rngs):
        super().__init__(
            fan_in, fan_out, use_bias=use_bias, kernel_size=kernel_size,
            init_scale=init_scale, rngs=rngs,
        )
        _wn_init_direction(self.kernel, fan_in * kernel_size**2, init_scale, init_std)
        v = self.kernel.value
        self.g = nnx.Param(jnp.sqrt(jnp.sum(jnp.square(v), (0, 1, 2))))

    def weight(self):
        return _wn_weight(self.kernel.value, self.g.value)


def wn_data_init(linear, x, epsilon=1e-5):
    """Salimans & Kingma 2016, sec. 3: pick g, b so that the pre-activations
    t = x v/||v|| on this batch become (t - mu[t]) / sigma[t]. Mutates `linear`."""
    linear.g.value = jnp.ones_like(linear.g.value)
    use_bias = linear.use_bias
    linear.use_bias = False
    t = linear(x)
    linear.use_bias = use_bias
    axes = _reduce_axes(t)
    mu, sigma = t.mean(axes), jnp.sqrt(t.var(axes) + epsilon)
    linear.g.value = 1.0 / sigma
    if use_bias:
        linear.bias.value = -mu / sigma
    return (t - mu) / sigma


# --------------------------------------------------------------------------------------
# Registry


@dataclasses.dataclass(frozen=True)
class NormSpec:
    """How a variant builds a layer: which linear map, whether it carries a bias (a bias
    before an affine normalizer is redundant), and the normalizer after it."""

    weight_norm: bool
    linear_bias: bool
    make: Callable[..., nnx.Module]
    doc: str


def _weight_norm_make(num_features, cfg, *, rngs):
    if cfg.wn_mean_only_bn:
        return MeanOnlyBatchNorm(num_features, cfg, rngs=rngs)
    return Identity(num_features, cfg, rngs=rngs)


NORMS: dict[str, NormSpec] = {
    "none": NormSpec(False, True, Identity, "no normalization"),
    "batch": NormSpec(False, False, BatchNorm, "batch norm (Ioffe & Szegedy 2015)"),
    "noisy_batch": NormSpec(
        False, False, NoisyBatchNorm, "batch norm + non-stationary noise (Santurkar et al. 2018, Alg. 1)"
    ),
    "noisy_none": NormSpec(
        False, True, NoisyIdentity, "no normalization + the same noise (Santurkar et al. 2018's control)"
    ),
    "weight": NormSpec(True, True, _weight_norm_make, "weight norm (Salimans & Kingma 2016)"),
    "layer": NormSpec(False, False, LayerNorm, "layer norm (Ba et al. 2016)"),
    "group": NormSpec(False, False, GroupNorm, "group norm (Wu & He 2018)"),
}


def get(name: str) -> NormSpec:
    """The registered variant `name`, or a ValueError naming the choices."""
    if name not in NORMS:
        raise ValueError(f"unknown norm '{name}'; choose one of: {', '.join(NORMS)}")
    return NORMS[name]


def make_linear(kind: str, fan_in: int, fan_out: int, spec: NormSpec, cfg, *, rngs, **kw):
    """The linear map of one layer: `kind` is 'dense' or 'conv'."""
    weight_norm = spec.weight_norm
    use_bias = spec.linear_bias and not (weight_norm and cfg.wn_mean_only_bn)
    cls = {("dense", False): Dense, ("dense", True): WNDense,
           ("conv", False): Conv, ("conv", True): WNConv}[(kind, weight_norm)]
    if weight_norm:
        kw["init_std"] = float(cfg.wn_init_std)
    return cls(fan_in, fan_out, use_bias=use_bias, rngs=rngs, **kw)
