"""The command line: train / compare / sweep, and one-line usage errors with exit code 2."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--config.train.num_steps=20", "--config.train.log_every=10", "--config.train.eval_every=10"]


def cli(*args, cwd=ROOT):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    return subprocess.run([sys.executable, "-m", "bn_research", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def test_train_compare_and_plot(tmp_path):
    for norm in ("batch", "none"):
        r = cli("train", f"--config=configs/mlp.py:norm={norm}", f"--workdir={tmp_path / norm}", *TINY)
        assert r.returncode == 0, r.stderr
        assert "completed at step 20" in r.stdout
    r = cli("compare", str(tmp_path / "batch"), str(tmp_path / "none"), f"--plot={tmp_path / 'c.png'}")
    assert r.returncode == 0, r.stderr
    assert "model.norm" in r.stdout and "eval/accuracy" in r.stdout
    assert (tmp_path / "c.png").stat().st_size > 1000


def test_sweep_writes_one_run_per_point(tmp_path):
    r = cli("sweep", "--config=configs/mlp.py", f"--workdir={tmp_path}", "--sweep=model.norm=batch,layer",
            "--sweep=seed=0,1", *TINY)
    assert r.returncode == 0, r.stderr
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["norm=batch,seed=0", "norm=batch,seed=1", "norm=layer,seed=0", "norm=layer,seed=1"]
    for name in names:
        assert json.loads((tmp_path / name / "summary.json").read_text())["status"] == "completed"


@pytest.mark.parametrize("args, needle", [
    (["--config=configs/mlp.py", "--config.train.num_stepz=5"], "did you mean 'train.num_steps'?"),
    (["--config=configs/mlp.py", "--config.train.num_steps=abc"], "'train.num_steps' expects an integer, got 'abc'"),
    (["--config=configs/mlp.py:norm=bogus"], "unknown norm 'bogus'"),
    (["--config=configs/mlp.py", "--config.model.norm=bogus"], "unknown norm 'bogus'"),
    (["--config=configs/mlp.py:dataset=not_a_dataset"], "not_a_dataset"),
    (["--config=configs/mlp.py", "--config.model.name=transformer"], "unknown model"),
    (["--config=configs/mlp.py", "--config.optimizer.learning_rate=-1"], "learning_rate"),
    (["--config=configs/mlp.py", "--config.train.batch_size=100000"], "batch_size"),
    (["--config=configs/nope.py"], "nope.py"),
])
def test_bad_input_is_one_line_exit_2(tmp_path, args, needle):
    workdir = tmp_path / "run"
    r = cli("train", f"--workdir={workdir}", *args)
    assert r.returncode == 2, (r.stdout, r.stderr)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("bn-research: error:"), r.stderr
    assert needle in lines[0]
    assert "Traceback" not in r.stderr
    assert not (workdir / "metrics.jsonl").exists()


def test_existing_run_of_another_config_is_kept(tmp_path):
    r = cli("train", "--config=configs/mlp.py:norm=batch", f"--workdir={tmp_path}", *TINY)
    assert r.returncode == 0, r.stderr
    before = (tmp_path / "metrics.jsonl").read_bytes()
    r = cli("train", "--config=configs/mlp.py:norm=none", f"--workdir={tmp_path}", *TINY)
    assert r.returncode == 2 and "--overwrite" in r.stderr and "model.norm" in r.stderr
    assert (tmp_path / "metrics.jsonl").read_bytes() == before


def test_unknown_command_and_help():
    assert cli("fly").returncode == 2
    r = cli("--help")
    assert r.returncode == 0 and "bn-research train" in r.stdout


def test_train_with_replicas_writes_one_run_per_replica(tmp_path):
    r = cli("train", "--config=configs/mlp.py", f"--workdir={tmp_path}", "--config.replicas.seeds=(0, 1)", *TINY)
    assert r.returncode == 0, r.stderr
    dirs = sorted(p for p in tmp_path.iterdir() if p.is_dir())
    assert len(dirs) == 2, dirs
    for d in dirs:
        assert json.loads((d / "summary.json").read_text())["status"] == "completed"
