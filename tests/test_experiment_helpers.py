"""Pure helpers of the experiment scripts (Ioffe Fig. 1 typical unit, steps to a target)."""

import types

import numpy as np
import pandas as pd

from experiments import ioffe_fig1 as ioffe


def test_typical_unit_follows_the_median_drift_unit_not_a_unit_average():
    """Five units whose percentiles move by 0, 1, 2, 3, 10 from init: the typical unit is the
    one of median drift (2), and its drift is its own, not an average over units (3.2)."""
    moves = np.array([0.0, 1.0, 2.0, 3.0, 10.0])
    order = np.array([3, 0, 4, 1, 2])  # units in shuffled order
    start = np.zeros((1, 5))
    pcts = {p: np.concatenate([start + k, start + k + moves[order][None]]) for k, p in enumerate(ioffe.PCTS)}
    unit, drift = ioffe.typical_unit(pcts)
    assert unit == int(np.where(order == 2)[0][0])
    assert drift == 2.0


def test_steps_to_target_and_censoring():
    metrics = pd.DataFrame({"step": [100, 200, 300], "eval/accuracy": [0.5, 0.91, 0.95]})
    run = types.SimpleNamespace(metrics=metrics)
    assert ioffe.steps_to(run, 0.9, 300) == 200.0
    assert ioffe.steps_to(run, 0.99, 300) == 300.0 + ioffe.EVAL_EVERY
