"""Property-based: random config overrides and malformed run files thrown at the CLI and
the run loader. Whatever comes in: no traceback reaches the user, a usage error is one
line with exit code 2, nothing already on disk is lost, and valid inputs train."""

import shutil
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from bn_research import cli, rundir, runs

ROOT = Path(__file__).resolve().parents[1]
BASE = ["bn-research", "train", f"--config={ROOT / 'configs/mlp.py'}:width=8", "--config.train.num_steps=10",
        "--config.train.log_every=5", "--config.train.eval_every=5", "--config.train.checkpoint_every=5",
        "--config.probes.growth.enabled=false", "--config.probes.weights.enabled=false"]
SETTINGS = dict(deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

# Values that train (quickly) and values a new user might type for each key.
VALID = {
    "train.batch_size": ["7", "32"], "train.checkpoint_every": ["0", "3"], "train.keep_checkpoints": ["1"],
    "train.steps_per_dispatch": ["2"], "optimizer.learning_rate": ["0.01", "1e6"], "optimizer.name": ["adam"],
    "model.norm": ["none", "weight", "layer", "group", "noisy_batch"], "model.activation": ["relu", "tanh"],
    "model.depth": ["1"], "model.residual": ["true"], "norm.placement": ["after"], "seed": ["1", "-1"],
    "dataset.name": ["mnist1d"], "norm.virtual_batch_size": ["20"], "train.max_loss": ["1e-9"],
}
VALUES = {
    "train.num_steps": ["-1", "0", "3", "5.5", "ten", ""],
    "train.batch_size": ["0", "-3", "7", "100000", "1e3"],
    "train.log_every": ["0", "2", "-5"],
    "train.checkpoint_every": ["-5", "0", "3"],
    "train.keep_checkpoints": ["0", "1"],
    "train.steps_per_dispatch": ["-1", "2"],
    "train.eval_batch_size": ["0", "7"],
    "train.max_loss": ["0", "1e-9", "nan", "inf"],
    "optimizer.learning_rate": ["-1", "0", "0.01", "1e6", "nan", "abc"],
    "optimizer.name": ["adam", "adamw", "sgdd", ""],
    "optimizer.schedule": ["cosine", "linear"],
    "model.norm": ["batch", "none", "weight", "layer", "group", "noisy_batch", "bogus", ""],
    "model.name": ["mlp", "deep_linear", "transformer"],
    "model.activation": ["relu", "tanh", "sine"],
    "model.depth": ["0", "1", "-2", "two"],
    "model.width": ["0", "4", "-1"],
    "model.residual": ["true", "maybe"],
    "dataset.name": ["mnist_digits", "mnist1d", "not_a_dataset", "mnist digits"],
    "norm.momentum": ["0.9", "1.0", "-0.1"],
    "norm.epsilon": ["-1", "1e-3"],
    "norm.placement": ["before", "after", "middle"],
    "norm.virtual_batch_size": ["7", "20", "-1"],
    "seed": ["0", "1", "-1", "a"],
    "probes.drift.every": ["-1", "2"],
    "probes.drift.enabled": ["false", "3"],
}


@st.composite
def overrides(draw):
    out = []
    for _ in range(draw(st.integers(1, 2))):
        key = draw(st.sampled_from(sorted(VALUES)))
        kind = draw(st.sampled_from(["valid", "valid", "value", "value", "misspelt", "text"]))
        if kind == "valid":
            key = draw(st.sampled_from(sorted(VALID)))
            value = draw(st.sampled_from(VALID[key]))
        elif kind == "misspelt":
            i = draw(st.integers(0, len(key) - 1))
            key = key[:i] + draw(st.sampled_from("xqz_.")) + key[i + 1:]
            value = draw(st.sampled_from(VALUES.get(key, ["1"])))
        elif kind == "text":
            value = draw(st.text(st.sampled_from("ab1.-,=:/ \n"), max_size=6))
        else:
            value = draw(st.sampled_from(VALUES[key]))
        out.append(f"--config.{key}={value}")
    return out


def snapshot(path: Path) -> dict:
    return {p.relative_to(path): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def call(args, capsys):
    """cli.main in this process: it must return an exit code, never raise."""
    capsys.readouterr()
    rc = cli.main(args)
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    if rc == 2:
        assert len(lines) == 1 and lines[0].startswith("bn-research: error: "), err
    return rc, out, lines


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished 10-step run of BASE: checkpoints at steps 5 and 10."""
    workdir = tmp_path_factory.mktemp("finished") / "run"
    assert cli.main([*BASE, f"--workdir={workdir}"]) == 0
    return workdir


@settings(max_examples=30, **SETTINGS)
@given(extra=overrides(), fresh=st.booleans())
def test_random_overrides(extra, fresh, finished, capsys):
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp) / "run"
        if not fresh:  # a workdir already holding a finished run: nothing in it may change
            shutil.copytree(finished, workdir)
        before = snapshot(workdir) if not fresh else {}
        rc, out, lines = call([*BASE, *extra, f"--workdir={workdir}"], capsys)
        shown = f": {lines[-1][20:60]}" if lines and fresh else ""
        event(f"exit {rc}, {'fresh' if fresh else 'existing'} workdir{shown}")
        assert rc in (0, 1, 2), (extra, out, lines)
        if not fresh:
            assert snapshot(workdir) == before, extra
            assert rc == 2 or "already holds a completed run" in lines[0]
        elif rc == 2:
            assert not (workdir / "metrics.jsonl").exists(), "usage errors stop before any work"
        else:  # valid input: it trained and says how it ended
            summary = rundir.read_summary(workdir)
            assert summary["status"] == ("completed" if rc == 0 else "diverged"), (extra, summary)
            assert out.startswith(summary["status"])


GARBLE = st.sampled_from(["truncate", "overwrite", "empty", "delete"])


@st.composite
def damage(draw):
    target = draw(st.sampled_from(["metrics.jsonl", "summary.json", "config.json", "checkpoint"]))
    return target, draw(GARBLE), draw(st.floats(0, 1)), draw(st.binary(min_size=1, max_size=8)), draw(st.booleans())


def apply_damage(workdir: Path, target, how, where, junk, pick):
    if target == "checkpoint":
        files = sorted(p for p in (workdir / "checkpoints").rglob("*") if p.is_file())
        path = files[int(where * (len(files) - 1))]
    else:
        path = workdir / target
    if how == "delete":
        path.unlink()
        return
    data = path.read_bytes()
    cut = int(where * len(data))
    if how == "truncate":
        path.write_bytes(data[:cut])
    elif how == "empty":
        path.write_bytes(b"")
    else:
        path.write_bytes(data[:cut] + junk + data[cut + len(junk):])


@settings(max_examples=30, **SETTINGS)
@given(d=damage(), killed=st.booleans())
def test_malformed_run_files(d, killed, finished, capsys):
    reference = rundir.read_summary(finished)
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp) / "run"
        shutil.copytree(finished, workdir)
        apply_damage(workdir, *d)
        if killed and (workdir / "summary.json").exists():
            (workdir / "summary.json").unlink()  # as if the run had been killed after its last checkpoint
        # The loader and compare take whatever is there.
        run = runs.load(workdir)
        assert isinstance(run.config, dict) and isinstance(run.summary, dict)
        assert run.metrics["step"].is_monotonic_increasing
        rc, out, _ = call(["bn-research", "compare", str(workdir), str(finished)], capsys)
        assert rc == 0 and "run" in out
        # Training the same command again: resumes or finishes, or one clear line with nothing lost.
        before = snapshot(workdir)
        rc, out, lines = call([*BASE, f"--workdir={workdir}"], capsys)
        event(f"exit {rc}" + (f": {lines[-1].split(str(workdir))[-1][:40]}" if lines else ""))
        assert rc in (0, 2), (d, out, lines)
        if rc == 2:
            assert snapshot(workdir) == before, d
        else:
            summary = rundir.read_summary(workdir)
            assert summary["status"] == "completed" and summary["step"] == 10
            if d[0] != "summary.json" and not killed:
                assert summary == reference  # a finished run is returned untouched
            if d[0] != "metrics.jsonl":  # resumed or returned: the same final numbers
                assert summary["final"] == reference["final"], d
                assert (workdir / "metrics.jsonl").read_bytes() == (finished / "metrics.jsonl").read_bytes()
