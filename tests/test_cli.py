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


def run_main(capsys, *args):
    """`bn-research ARGS` in this process: (exit code, stdout, stderr)."""
    from bn_research import cli

    code = cli.main(["bn-research", *args])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_help_lists_commands_and_points_to_config_keys(capsys):
    code, out, _ = run_main(capsys, "--help")
    assert code == 0
    for text in ("bn-research train", "bn-research compare", "bn-research sweep", "bn-research reproduce",
                 "--version", "COMMAND --help", "base_config()", "README.md \"Configs\""):
        assert text in out, text


@pytest.mark.parametrize("command, flags", [
    ("train", ["--config", "--workdir", "--overwrite", "--coordinator_address", "--num_processes", "--process_id",
               "--distributed", "--config.<key>=<value>"]),
    ("sweep", ["--config", "--workdir", "--sweep", "--overwrite", "--config.<key>=<value>"]),
    ("compare", ["--plot", "--metric", "--columns"]),
])
@pytest.mark.parametrize("option", ["--help", "-h"])
def test_each_command_help_lists_its_flags(capsys, command, flags, option):
    code, out, err = run_main(capsys, command, option)
    assert code == 0 and not err, err
    assert out.startswith(f"usage: bn-research {command}")
    listed = [ln.strip() for ln in out.splitlines() if ln.startswith("  --")]
    assert listed == flags
    if command != "compare":
        assert "base_config()" in out


def test_train_help_with_a_config_lists_its_keys(capsys):
    code, out, _ = run_main(capsys, "train", "--config=configs/mlp.py:norm=none", "--help")
    assert code == 0
    assert "  model.norm = 'none'" in out and "  train.num_steps = 3000" in out


def test_version(capsys):
    from importlib import metadata

    import bn_research

    code, out, _ = run_main(capsys, "--version")
    assert code == 0
    assert out.startswith(f"bn-research {bn_research.__version__} (jax {metadata.version('jax')},")


@pytest.mark.parametrize("sweep, message", [
    ([], "sweep needs at least one --sweep axis, e.g. --sweep model.norm=batch,none"),
    (["--sweep=model.norm="], "--sweep model.norm=: no values; give model.norm=v1,v2,..."),
    (["--sweep=model=x"], "--sweep model=x: config key 'model' is a group, not a value; sweep one of its keys"),
    (["--sweep=norm=batch,none"], "config key 'norm' is a group, not a value; did you mean 'model.norm'?"),
    (["--sweep==a,b"], "--sweep '=a,b' is not key=v1,v2,..."),
    (["--sweep=model.norm"], "--sweep 'model.norm' is not key=v1,v2,..."),
    (["--sweep=modl.norm=batch"], "unknown config key 'modl.norm'; did you mean 'model.norm'?"),
    (["--sweep=seed=0,0"], "--sweep seed=0,0: a value is repeated"),
    (["--sweep=seed=0", "--sweep=seed=1"], "--sweep seed is given twice"),
    (["--sweep=seed=0", "extra"], "unexpected arguments: extra"),
])
def test_sweep_axis_problems_are_usage_errors(capsys, tmp_path, sweep, message):
    code, out, err = run_main(capsys, "sweep", "--config=configs/mlp.py", f"--workdir={tmp_path / 'root'}", *sweep)
    assert code == 2, (out, err)
    assert err.count("\n") == 1 and err.startswith("bn-research: error: ") and message in err, err
    assert not (tmp_path / "root").exists()  # nothing ran, not even in the sweep root


def test_progress_lines_off_a_terminal(tmp_path):
    # One chunk of 20 steps (eval_every 20): the case where a rate over "all but the first chunk" is empty.
    r = cli("train", "--config=configs/mlp.py", f"--workdir={tmp_path}", "--config.train.num_steps=20",
            "--config.train.log_every=10", "--config.train.eval_every=20")
    assert r.returncode == 0, r.stderr
    lines = r.stderr.splitlines()  # stderr is a pipe here, not a terminal: lines, no bar
    name = f"train {tmp_path.name}"
    assert lines[0].startswith(f"{name}: setup (dataset mnist_digits, model mlp, norm batch) done in ")
    assert lines[1] == f"{name}: compile (chunks of 20 steps, evaluation) ..."
    assert lines[2].startswith(f"{name}: compile done in ") and lines[2].endswith("s")
    assert lines[3].startswith(f"{name}: step 20/20 (100%)  loss ") and " steps/s  ETA 0s" in lines[3]
    assert len(lines) == 4, lines
    assert "\r" not in r.stderr and "it/s" not in r.stderr
    summary = json.loads((tmp_path / "summary.json").read_text())
    # steps_per_s times the training loop only: setup and compilation are measured apart
    assert summary["setup_s"] > 0 and summary["compile_s"] > 0
    assert 20 / summary["steps_per_s"] + summary["setup_s"] + summary["compile_s"] <= summary["wall_time_s"]


def test_progress_lines_are_periodic_with_rate_and_eta():
    import io

    from bn_research import progress

    out = io.StringIO()  # not a terminal: lines instead of a bar
    p = progress.Progress("train x", 1000, every_s=3600, file=out)
    with p.phase("setup", "dataset d", start_line=False):  # may end in a usage error: one line at its end
        pass
    with p.phase("compile"):
        pass
    with pytest.raises(ValueError), p.phase("compile"):
        raise ValueError  # a failed phase: no end line
    p.start(200)  # a resumed run: rates count this session's steps only
    p.update(400, loss=0.5)   # the first chunk always gets a line
    p.update(600, loss=0.25)  # within every_s of the last line: none
    p.update(1000, loss=0.125)  # the end always gets a line
    p.close()
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("train x: setup (dataset d) done in ")
    assert lines[1:4] == ["train x: compile ...", lines[2], "train x: compile ..."]
    assert lines[2].startswith("train x: compile done in ")
    assert len(lines) == 6, lines
    assert lines[4].startswith("train x: step 400/1000 (40%)  loss 0.5000  ") and " steps/s  ETA " in lines[4]
    assert lines[5].startswith("train x: step 1000/1000 (100%)  loss 0.1250  ") and lines[5].endswith("ETA 0s")
    assert progress._duration(3725) == "1:02:05" and progress._duration(65) == "1:05"
