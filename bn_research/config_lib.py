"""Shared config defaults and validation for the files in `configs/`.

A config file's `get_config(arg)` starts from `base_config()`, sets its family's values,
and applies the `key=value,...` argument with `apply_arg`. `validate(config)` checks
names and values before any work starts and raises `ConfigError` with one clear line.
"""

from __future__ import annotations

import difflib

import ml_collections

from bn_research import mesh, norms, probes

# Short keys of the config files' `key=value,...` argument.
ALIASES = {
    "norm": "model.norm", "depth": "model.depth", "width": "model.width",
    "activation": "model.activation", "dataset": "dataset.name",
    "steps": "train.num_steps", "lr": "optimizer.learning_rate", "seed": "seed",
}


class ConfigError(ValueError):
    """A config that cannot run; the message is one line naming the problem and the fix."""


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0  # model init, data order and noise all derive from it

    c.dataset = ml_collections.ConfigDict()
    c.dataset.name = "mnist_digits"  # embedded: mnist_digits | mnist1d | gaussian_regression; or a tfds name
    c.dataset.data_dir = ""  # tfds data dir; '' = $BN_RESEARCH_DATA_DIR or ~/.cache/bn_research/tensorflow_datasets
    c.dataset.dim_in = 100  # gaussian_regression: input dimension
    c.dataset.dim_out = 10  # gaussian_regression: output dimension
    c.dataset.num_train = 4096  # gaussian_regression: training examples
    c.dataset.num_test = 1024  # gaussian_regression: test examples
    c.dataset.noise_std = 0.1  # gaussian_regression: label noise
    c.dataset.seed = 0  # gaussian_regression: teacher and sample seed
    c.dataset.pipeline = "auto"  # device (arrays on device, batches gathered in jit) | stream (tf.data) | auto
    c.dataset.device_max_mb = 1024  # auto: device when the float32 train split is <= this (it sits on every device)
    c.dataset.shuffle_buffer = 16384  # stream: examples in the per-epoch shuffle buffer (files are shuffled too)

    c.model = ml_collections.ConfigDict()
    c.model.name = "mlp"  # mlp | cnn | deep_linear
    c.model.depth = 3  # hidden layers (mlp, deep_linear) or conv layers (cnn)
    c.model.width = 100  # units per hidden layer (mlp) or first-stage channels (cnn)
    c.model.activation = "sigmoid"  # sigmoid | tanh | relu | linear
    c.model.norm = "batch"  # none | batch | noisy_batch | noisy_none | weight | layer | group
    c.model.residual = False  # mlp: h <- h + f(h) for hidden layers after the first
    c.model.init_scale = 1.0  # weight init std = init_scale / sqrt(fan_in)
    c.model.scan_layers = True  # mlp: lax.scan over hidden layers 1..depth-1 (flat compile time in depth)
    c.model.scan_min_depth = 6  # scan_layers applies from this depth on (>= 3); shallower stacks are unrolled

    c.norm = norms.default_config()

    c.optimizer = ml_collections.ConfigDict()
    c.optimizer.name = "sgd"  # sgd | momentum | nesterov | adam | adamw
    c.optimizer.learning_rate = 0.1  # peak learning rate
    c.optimizer.momentum = 0.9  # momentum / nesterov only
    c.optimizer.weight_decay = 0.0  # adamw decoupled decay; sgd-family: L2 added to the gradient
    c.optimizer.schedule = "constant"  # constant | cosine | warmup_cosine | step
    c.optimizer.warmup_steps = 0  # warmup_cosine: linear warmup length
    c.optimizer.decay_factor = 0.1  # step: multiply the rate by this ...
    c.optimizer.decay_every = 0  # step: ... every this many steps (0 = never)

    c.train = ml_collections.ConfigDict()
    c.train.batch_size = 60  # examples per step
    c.train.num_steps = 1000  # total training steps
    c.train.eval_every = 500  # evaluate on the test split every this many steps (and at the end)
    c.train.log_every = 100  # write train metrics every this many steps (and at the end)
    c.train.steps_per_dispatch = 0  # steps per chunk; 0 = eval_every; made to divide eval_every, checkpoint_every
    c.train.eval_batch_size = 1000  # evaluation batch
    c.train.max_loss = 1e6  # a training loss above this (or non-finite) marks the run diverged
    c.train.checkpoint_every = 1000  # save a checkpoint every this many steps (and at the end); 0 = only at the end
    c.train.keep_checkpoints = 3  # keep this many most recent checkpoints

    c.probes = probes.default_config()
    c.mesh = mesh.default_config()  # data parallelism over local devices (bn_research.mesh)

    c.replicas = ml_collections.ConfigDict()  # vectorized replicas (bn_research.replicas): one program, N runs
    c.replicas.seeds = ()  # one replica per seed, crossed with learning_rates; () = (seed,)
    c.replicas.learning_rates = ()  # one replica per peak rate; () = (optimizer.learning_rate,)
    c.replicas.program = "auto"  # vmap | map (lax.map over pairs) | auto (kernels.replica_program)
    return c


def _coerce(old, text: str, key: str):
    if isinstance(old, bool):
        if text.lower() in ("true", "1", "yes"):
            return True
        if text.lower() in ("false", "0", "no"):
            return False
        raise ConfigError(f"config arg {key}={text}: expected true or false")
    for typ in (int, float):
        if isinstance(old, typ):
            try:
                return typ(text)
            except ValueError:
                raise ConfigError(
                    f"config arg {key}={text}: expected {typ.__name__}"
                ) from None
    return text


def apply_arg(config: ml_collections.ConfigDict, arg: str | None, aliases: dict[str, str]):
    """Apply a `key=value,...` config-file argument; `aliases` maps short keys
    (`norm`) to dotted paths (`model.norm`). Unknown keys raise ConfigError."""
    if not arg:
        return config
    for item in arg.split(","):
        if "=" not in item:
            raise ConfigError(f"config arg '{item}' is not key=value (e.g. norm=batch)")
        key, value = (s.strip() for s in item.split("=", 1))
        path = aliases.get(key, key)
        parent, _, leaf = path.rpartition(".")
        node = config
        try:
            for part in filter(None, parent.split(".")):
                node = node[part]
            old = node[leaf]
        except (KeyError, AttributeError):
            choices = sorted(aliases) + sorted(_leaf_paths(config))
            hint = difflib.get_close_matches(key, choices, n=1)
            raise ConfigError(
                f"unknown config arg '{key}'"
                + (f"; did you mean '{hint[0]}'?" if hint else f"; short keys: {', '.join(aliases)}")
            ) from None
        node[leaf] = _coerce(old, value, key)
    return config


def _leaf_paths(config, prefix=""):
    for k, v in config.items():
        if isinstance(v, ml_collections.ConfigDict):
            yield from _leaf_paths(v, f"{prefix}{k}.")
        else:
            yield f"{prefix}{k}"


def replicas_enabled(config) -> bool:
    """True when `config.replicas` asks for vectorized replicas (bn_research.replicas)."""
    r = config.get("replicas")
    return r is not None and bool(tuple(r.seeds) or tuple(r.learning_rates))


def validate(config) -> None:
    """Names and values, checked before any work; raises ConfigError (one line)."""
    from bn_research import data, models

    try:
        norms.get(config.model.norm)
        models.get(config.model.name)
        models.get_activation(config.model.activation)
        data.check_name(config.dataset.name)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    _check_finite(config)
    t, o = config.train, config.optimizer
    checks = [
        (o.learning_rate > 0, f"optimizer.learning_rate must be > 0, got {o.learning_rate}"),
        (t.batch_size > 0, f"train.batch_size must be > 0, got {t.batch_size}"),
        (config.dataset.pipeline in data.PIPELINES,
         f"dataset.pipeline must be one of {', '.join(data.PIPELINES)}, got {config.dataset.pipeline!r}"),
        (config.dataset.device_max_mb >= 0, f"dataset.device_max_mb must be >= 0, got {config.dataset.device_max_mb}"),
        (config.dataset.shuffle_buffer >= 1,
         f"dataset.shuffle_buffer must be >= 1, got {config.dataset.shuffle_buffer}"),
        (t.num_steps > 0, f"train.num_steps must be > 0, got {t.num_steps}"),
        (t.eval_every > 0, f"train.eval_every must be > 0, got {t.eval_every}"),
        (t.log_every > 0, f"train.log_every must be > 0, got {t.log_every}"),
        (t.steps_per_dispatch >= 0, "train.steps_per_dispatch must be >= 0"),
        (t.checkpoint_every >= 0, f"train.checkpoint_every must be >= 0, got {t.checkpoint_every}"),
        (t.keep_checkpoints >= 1, f"train.keep_checkpoints must be >= 1, got {t.keep_checkpoints}"),
        (t.eval_batch_size > 0, f"train.eval_batch_size must be > 0, got {t.eval_batch_size}"),
        (t.max_loss > 0, f"train.max_loss must be > 0, got {t.max_loss}"),
        (config.model.depth >= 1, f"model.depth must be >= 1, got {config.model.depth}"),
        (config.model.width >= 1, f"model.width must be >= 1, got {config.model.width}"),
        (0.0 <= config.norm.momentum < 1.0, "norm.momentum must be in [0, 1)"),
        (config.norm.epsilon >= 0, "norm.epsilon must be >= 0"),
        (config.norm.placement in ("before", "after"),
         f"norm.placement must be 'before' or 'after', not '{config.norm.placement}'"),
        (config.norm.virtual_batch_size >= 0, "norm.virtual_batch_size must be >= 0"),
        (not config.norm.virtual_batch_size or t.batch_size % config.norm.virtual_batch_size == 0,
         f"train.batch_size={t.batch_size} is not a multiple of "
         f"norm.virtual_batch_size={config.norm.virtual_batch_size}"),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)
    _check_batch_statistics(config)
    problem = mesh.check(config)
    if problem:
        raise ConfigError(problem)
    from bn_research import optim

    try:
        optim.check(config.optimizer)
        probes.validate(config.probes)
    except ValueError as e:
        raise ConfigError(str(e)) from None


# Variants whose normalizer computes statistics over the batch (over one example they are
# that example itself: every normalized unit is 0 and its variance is 0).
BATCH_STAT_NORMS = ("batch", "noisy_batch")
# Floats that may be infinite on purpose: train.max_loss = inf never marks a run diverged.
MAY_BE_INFINITE = ("train.max_loss",)


def _check_finite(config) -> None:
    """Every float setting (and every float in a tuple setting) is finite."""
    import math

    for key in _leaf_paths(config):
        value = config
        for part in key.split("."):
            value = value[part]
        values = value if isinstance(value, (tuple, list)) else [value]
        for v in values:
            if isinstance(v, float) and not math.isfinite(v):
                if key in MAY_BE_INFINITE and v == math.inf:
                    continue
                raise ConfigError(f"{key} must be a finite number, got {v}")


def _check_batch_statistics(config) -> None:
    """Batch norm over a (ghost) batch of one example is degenerate: a usage error."""
    norm = config.model.norm
    uses_batch = norm in BATCH_STAT_NORMS or (norm == "weight" and config.norm.wn_mean_only_bn)
    groups = mesh.norm_groups(config) if config.norm.stats in mesh.STATS else 0
    per_norm = groups or int(config.train.batch_size)
    if uses_batch and per_norm < 2:
        which = {"per_device": "the per-device batch", "virtual": "norm.virtual_batch_size"}.get(
            config.norm.stats, "norm.virtual_batch_size" if groups else "train.batch_size")
        raise ConfigError(
            f"model.norm={norm} normalizes over the batch, and {which}={per_norm} gives it one example "
            "(every normalized unit would be 0); use a batch of at least 2 or model.norm=layer/group/none")


def from_file(path, arg: str | None = None) -> ml_collections.ConfigDict:
    """`get_config(arg)` of a config file, as `--config path:arg` would load it
    (for notebooks and scripts)."""
    import importlib.util
    from pathlib import Path

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    spec = importlib.util.spec_from_file_location(f"bn_research_config_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
        config = module.get_config(arg)
    except ConfigError:
        raise
    except Exception as e:
        raise ConfigError(config_file_error(path, e)) from None
    config.lock()
    return config


def config_file_error(path, e: BaseException) -> str:
    """One line naming the config file, the exception type, its line in that file and the message."""
    import traceback
    from pathlib import Path

    path = Path(path).resolve()
    line = None
    for frame in traceback.extract_tb(e.__traceback__):
        if Path(frame.filename).resolve() == path:
            line = frame.lineno
    if line is None and isinstance(e, SyntaxError) and e.filename and Path(e.filename).resolve() == path:
        line = e.lineno
    where = f"{path.name}:{line}" if line else path.name
    message = " ".join(str(e).split()) or "(no message)"
    return f"config file {where} raised {type(e).__name__}: {message}"
