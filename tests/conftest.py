"""Shared fixtures: tiny configs that train in seconds on the embedded datasets."""

import importlib.util
import os
from pathlib import Path

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

ROOT = Path(__file__).resolve().parents[1]


def load_config(name: str, arg: str | None = None):
    """`configs/<name>.py`'s get_config(arg), loaded the way config_flags loads it."""
    spec = importlib.util.spec_from_file_location(f"cfg_{name}", ROOT / "configs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


def tiny(config, steps=20):
    """Shrink a config to a few seconds of training."""
    config.train.num_steps = steps
    config.train.log_every = 10
    config.train.eval_every = 10
    return config


@pytest.fixture
def mlp_config():
    return tiny(load_config("mlp"))
