"""Bad input is caught before any work: one line naming the problem and the fix, exit 2,
nothing written."""

import pytest

from bn_research import cli


def _train(tmp_path, *args):
    workdir = tmp_path / "run"
    code = cli.main(["bn-research", "train", "--workdir", str(workdir), *args])
    return code, workdir


@pytest.mark.parametrize("override,needle", [
    ("--config.optimizer.learning_rate=inf", "optimizer.learning_rate must be a finite number, got inf"),
    ("--config.optimizer.learning_rate=nan", "optimizer.learning_rate must be a finite number, got nan"),
    ("--config.norm.epsilon=inf", "norm.epsilon must be a finite number"),
    ("--config.optimizer.momentum=-inf", "optimizer.momentum must be a finite number"),
])
def test_non_finite_hyperparameters_are_rejected(tmp_path, capsys, override, needle):
    code, workdir = _train(tmp_path, "--config", "configs/mlp.py", override)
    err = capsys.readouterr().err
    assert code == 2 and needle in err and len(err.strip().splitlines()) == 1, err
    assert not workdir.exists()


@pytest.mark.parametrize("args,needle", [
    (["--config", "configs/mlp.py:norm=batch", "--config.train.batch_size=1"], "train.batch_size=1"),
    (["--config", "configs/mlp.py:norm=noisy_batch", "--config.train.batch_size=1"], "train.batch_size=1"),
    (["--config", "configs/mlp.py:norm=batch", "--config.norm.virtual_batch_size=1"], "norm.virtual_batch_size=1"),
    (["--config", "configs/mlp.py:norm=weight", "--config.norm.wn_mean_only_bn=True",
      "--config.train.batch_size=1"], "train.batch_size=1"),
])
def test_batch_norm_over_one_example_is_a_usage_error(tmp_path, capsys, args, needle):
    code, workdir = _train(tmp_path, *args)
    err = capsys.readouterr().err
    assert code == 2 and needle in err and "at least 2" in err, err
    assert not workdir.exists()


def test_batch_of_one_is_fine_without_batch_statistics(tmp_path):
    from bn_research import config_lib
    from tests.conftest import load_config

    c = load_config("mlp", "norm=layer")
    c.train.batch_size = 1
    config_lib.validate(c)  # no error: layer norm normalizes within the example


@pytest.mark.parametrize("body,kind,line", [
    ("def get_config(arg=None):\n    raise RuntimeError('boom')\n", "RuntimeError: boom", 2),
    ("import not_a_module_anywhere\n", "ModuleNotFoundError", 1),
    ("x = 1\ndef get_config(arg=None)\n    return x\n", "SyntaxError", 2),
])
def test_config_file_exception_names_file_type_and_line(tmp_path, capsys, body, kind, line):
    path = tmp_path / "broken_cfg.py"
    path.write_text(body)
    code, workdir = _train(tmp_path, "--config", str(path))
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert f"config file broken_cfg.py:{line} raised {kind}" in err, err
    assert not workdir.exists()


def test_config_file_exception_from_python(tmp_path):
    from bn_research import config_lib

    path = tmp_path / "broken_cfg.py"
    path.write_text("def get_config(arg=None):\n    return {}['missing']\n")
    with pytest.raises(config_lib.ConfigError, match=r"broken_cfg.py:2 raised KeyError"):
        config_lib.from_file(path)


def test_workdir_that_is_a_file_is_refused_before_setup(tmp_path, capsys, monkeypatch):
    from bn_research import train

    path = tmp_path / "run"
    path.write_text("my notes")
    monkeypatch.setattr(train, "setup", lambda *a, **k: pytest.fail("setup ran before the workdir check"))
    code = cli.main(["bn-research", "train", "--workdir", str(path), "--config", "configs/mlp.py"])
    err = capsys.readouterr().err
    assert code == 2 and "exists and is not a directory" in err, err
    assert path.read_text() == "my notes"


def test_workdir_of_another_config_is_refused_before_setup(tmp_path, capsys, monkeypatch):
    from bn_research import train

    workdir = tmp_path / "run"
    workdir.mkdir()
    (workdir / "config.json").write_text('{"seed": 12345}')
    monkeypatch.setattr(train, "setup", lambda *a, **k: pytest.fail("setup ran before the workdir check"))
    code = cli.main(["bn-research", "train", "--workdir", str(workdir), "--config", "configs/mlp.py"])
    err = capsys.readouterr().err
    assert code == 2 and "holds a run of another config" in err, err
    assert (workdir / "config.json").read_text() == '{"seed": 12345}'
