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
