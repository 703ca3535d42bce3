"""Probes: measurements computed inside the jitted training step.

Each probe is configured under `config.probes.<name>` with `enabled` and `every`.
"""

from __future__ import annotations

import ml_collections


def default_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    return c


def validate(cfg) -> None:
    """Raise ValueError (one line) for impossible probe settings."""
    del cfg


def make_probe_fn(config, graphdef, task):
    """The in-step probe function for `make_step_fns`, or None when no probe is enabled."""
    del config, graphdef, task
    return None


def init_state(config, graphdef, train_state, dataset):
    """Initial probe state (a pytree carried in `TrainState["probes"]`)."""
    del config, graphdef, train_state, dataset
    return {}


class Recorder:
    """Host side: turns the per-step probe outputs of a chunk into metrics rows and
    per-unit arrays in the run directory."""

    def __init__(self, config, workdir, layer_names):
        del config, workdir, layer_names

    def record(self, end_step: int, host_metrics: dict) -> dict:
        """Rows {step: {key: value}} for metrics.jsonl from one fetched chunk."""
        del end_step, host_metrics
        return {}

    def close(self) -> None:
        pass
