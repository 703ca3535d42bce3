"""Shared fixtures: tiny configs that train in seconds on the embedded datasets."""

import importlib.util
import os
import tempfile
import uuid
from pathlib import Path

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

# One persistent XLA compilation cache per test session, shared by the xdist workers and by
# every process a test starts (they inherit the environment): many tests compile the same
# tiny programs (a rerun that resumes, seeds of one config, the notebooks' runs), and on
# these 2-core machines compilation is most of the suite's time. A new directory per
# session, so no test meets programs compiled by an earlier version of the code.
_SESSION = os.environ.get("PYTEST_XDIST_TESTRUNUID") or uuid.uuid4().hex
os.environ["JAX_COMPILATION_CACHE_DIR"] = str(Path(tempfile.gettempdir()) / f"bn_research_tests_xla_{_SESSION}")
os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"

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
