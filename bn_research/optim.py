"""Optimizers and learning-rate schedules from `config.optimizer`, via optax."""

from __future__ import annotations

import optax

OPTIMIZERS = ("sgd", "momentum", "nesterov", "adam", "adamw")
SCHEDULES = ("constant", "cosine", "warmup_cosine", "step")


def check(cfg) -> None:
    if cfg.name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer '{cfg.name}'; choose one of: {', '.join(OPTIMIZERS)}")
    if cfg.schedule not in SCHEDULES:
        raise ValueError(
            f"unknown optimizer.schedule '{cfg.schedule}'; choose one of: {', '.join(SCHEDULES)}"
        )
    if cfg.weight_decay < 0:
        raise ValueError(f"optimizer.weight_decay must be >= 0, got {cfg.weight_decay}")


def schedule(cfg, num_steps: int) -> optax.Schedule:
    lr = cfg.learning_rate
    if cfg.schedule == "constant":
        return optax.constant_schedule(lr)
    if cfg.schedule == "cosine":
        return optax.cosine_decay_schedule(lr, num_steps)
    if cfg.schedule == "warmup_cosine":
        return optax.warmup_cosine_decay_schedule(0.0, lr, max(cfg.warmup_steps, 1), num_steps)
    if cfg.decay_every <= 0:
        return optax.constant_schedule(lr)
    return optax.exponential_decay(lr, cfg.decay_every, cfg.decay_factor, staircase=True)


def make(cfg, num_steps: int) -> optax.GradientTransformation:
    """The optimizer named by `cfg.name` with the configured schedule."""
    check(cfg)
    lr = schedule(cfg, num_steps)
    if cfg.name == "adamw":
        return optax.adamw(lr, weight_decay=cfg.weight_decay)
    if cfg.name == "adam":
        tx = optax.adam(lr)
    else:
        momentum = None if cfg.name == "sgd" else cfg.momentum
        tx = optax.sgd(lr, momentum=momentum, nesterov=cfg.name == "nesterov")
    if cfg.weight_decay:
        tx = optax.chain(optax.add_decayed_weights(cfg.weight_decay), tx)
    return tx
