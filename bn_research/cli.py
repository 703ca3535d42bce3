"""`bn-research train | compare | sweep | reproduce` (also `python -m bn_research`).

The only module that defines flags. `bn-research --help`, `bn-research COMMAND --help`
(flags, and with --config the config's keys) and `bn-research --version` exit 0.
Usage errors (unknown config keys, wrong types, unknown variants, datasets or models, a
workdir holding another run, a bad --sweep axis) print one line and exit with code 2
before any work starts.

Exit codes: 0 completed (sweep: every point completed or diverged), 1 diverged or failed
(sweep: a point could not run), 2 usage error, 130 / 143 stopped by SIGINT / SIGTERM
(a checkpoint is saved; run the same command again to resume).
"""

from __future__ import annotations

import itertools
import os
import re
import sys

USAGE = """usage:
  bn-research train   --config configs/mlp.py:norm=batch --workdir runs/mlp_bn [--config.a.b=v ...] [--overwrite]
  bn-research compare RUN_OR_PARENT_DIR [...] [--columns 'eval/*,train/loss'] [--metric PATTERNS] [--plot out.png]
  bn-research sweep   --config configs/mlp.py --workdir runs/sweep --sweep model.norm=batch,none [--sweep seed=0,1]
  bn-research reproduce [--quick] [NAME ...]   (run experiments/, write experiments/results/claims.json)
"""

COMMANDS = ("train", "compare", "sweep", "reproduce")

ABOUT = """bn-research: train, compare and sweep batch-normalization experiments (JAX/Flax NNX).

"""

HELP_TAIL = """
commands:
  train      train one config (or its vectorized replicas) into a run directory; the same command resumes it
  compare    a table of runs (seeds of one config aggregated) and, with --plot, a figure
  sweep      one run per point of the grid of --sweep axes, under --workdir
  reproduce  run experiments/ and gather their claims (its own --help)

`bn-research COMMAND --help` lists a command's flags; `bn-research --version` prints versions.
Config keys: any key of the config file is set with --config.<key>=<value>; all of them are in
README.md "Configs" and bn_research/config_lib.py:base_config(), and
`bn-research train --config FILE --help` lists a config's keys with their values.
"""

# Flags of each command, in the order its help lists them (compare: every flag whose help starts "compare:").
COMMAND_FLAGS = {"train": ("config", "workdir", "overwrite", "coordinator_address", "num_processes", "process_id",
                           "distributed"),
                 "sweep": ("config", "workdir", "sweep", "overwrite")}

COMMAND_ABOUT = {
    "train": ("usage: bn-research train --config FILE[:key=value,...] --workdir DIR [--config.<key>=<value> ...] "
              "[--overwrite]\n\nTrain one config into DIR (config.json, metrics.jsonl, summary.json, layer_stats/, "
              "TensorBoard events,\ncheckpoints/); running the same command again resumes it. With "
              "--config.replicas.seeds='(0,1)' the\nreplicas train together and each writes DIR/<replica>."),
    "sweep": ("usage: bn-research sweep --config FILE --workdir ROOT --sweep KEY=V1,V2,... [--sweep KEY=...] "
              "[--config.<key>=<value> ...]\n\nOne run per point of the cartesian product of the --sweep axes, "
              "in ROOT/<key>=<value>,... (e.g.\nruns/sweep/norm=batch,seed=0); finished points are skipped "
              "when the command is run again."),
    "compare": ("usage: bn-research compare RUN_OR_PARENT_DIR [...] [--columns PATTERNS] [--metric PATTERNS] "
                "[--plot FILE]\n\nA table of the runs in (or under) the directories, one row per config with "
                "mean ± std over seeds."),
}

OVERRIDE_HELP = ("  --config.<key>=<value>\n      set any config key, e.g. --config.train.num_steps=5000 "
                 "--config.model.norm=none")


def _help(command: str, argv) -> str:
    """A command's help: usage, its flags (absl help strings) and where the config keys are."""
    import textwrap

    fv = _flags()
    names = COMMAND_FLAGS.get(command) or [n for n in fv if fv[n].help.startswith("compare:")]
    lines = [COMMAND_ABOUT[command], "", "flags:"]
    for name in names:
        flag = fv[name]
        default = "" if flag.default in (None, "", [], False) else f" (default {flag.default})"
        text = flag.help.removeprefix("compare: ").split(";\n    repeat this option")[0]
        lines += [f"  --{name}", textwrap.fill(text + default, 100, initial_indent=" " * 6, subsequent_indent=" " * 6)]
    if command != "compare":
        lines += [OVERRIDE_HELP, "", "Config keys: README.md \"Configs\" and bn_research/config_lib.py:base_config();",
                  "with --config FILE this help lists FILE's keys and their values."]
        path = _config_path(argv)
        if path != "?":
            lines += ["", _config_keys(path)]
    return "\n".join(lines) + "\n"


def _config_keys(path: str) -> str:
    """`key = value` for every key of the config file `path[:arg]` (or why it cannot be read)."""
    from bn_research import config_lib

    file, _, arg = path.partition(":")
    try:
        config = config_lib.from_file(file, arg or None)
    except Exception as e:  # noqa: BLE001  (help never fails: it says why it cannot list the keys)
        return f"keys of {path}: cannot load it ({_one_line(e)})"
    lines = [f"keys of {path} (set with --config.<key>=<value>):"]
    for key in config_lib._leaf_paths(config):
        node = config
        for part in key.split("."):
            node = node[part]
        lines.append(f"  {key} = {node!r}")
    return "\n".join(lines)


def _version() -> str:
    """`bn-research <version> (jax ..., jaxlib ..., flax ..., python ...)`, without importing jax."""
    import platform
    from importlib import metadata

    def v(pkg):
        try:
            return metadata.version(pkg)
        except metadata.PackageNotFoundError:
            return "not installed"

    from bn_research import __version__

    return (f"bn-research {__version__} (jax {v('jax')}, jaxlib {v('jaxlib')}, flax {v('flax')}, "
            f"optax {v('optax')}, python {platform.python_version()})")


class UsageError(Exception):
    pass


def _flags(argv=None):
    from absl import flags
    from ml_collections import config_flags

    fv = flags.FlagValues()
    # sys_argv: config_flags reads the --config.<key> overrides from it (else from sys.argv,
    # which is wrong when main(argv) is called from Python).
    config_flags.DEFINE_config_file("config", None, "config file and its key=value,... argument, e.g. "
                                    "configs/mlp.py:norm=batch (short keys in the file's docstring)", flag_values=fv,
                                    lock_config=True, sys_argv=list(argv) if argv is not None else None)
    flags.DEFINE_string("workdir", None, "run directory (train) or sweep root (sweep)",
                        flag_values=fv)
    flags.DEFINE_bool("overwrite", False, "replace a run already in --workdir", flag_values=fv)
    flags.DEFINE_string("coordinator_address", None, "train on several processes (jax.distributed): process 0's "
                        "host:port; or $BN_RESEARCH_COORDINATOR_ADDRESS", flag_values=fv)
    flags.DEFINE_integer("num_processes", None, "train: number of processes; or $BN_RESEARCH_NUM_PROCESSES",
                         flag_values=fv)
    flags.DEFINE_integer("process_id", None, "train: this process's index, 0..num_processes-1; or "
                         "$BN_RESEARCH_PROCESS_ID", flag_values=fv)
    flags.DEFINE_bool("distributed", False, "train: join the cluster JAX detects (SLURM, TPU pod, ...) "
                      "without --coordinator_address", flag_values=fv)
    flags.DEFINE_multi_string("sweep", [], "key=v1,v2,...: one axis of the sweep grid (a dotted config key "
                              "and its values); repeat it for more axes, the runs are their cartesian product",
                              flag_values=fv)
    flags.DEFINE_string("plot", None, "compare: write a figure of the runs here (.png, .pdf, .svg, ...)",
                        flag_values=fv)
    flags.DEFINE_string("metric", None, "compare: metrics to plot, comma-separated fnmatch patterns "
                        "(default train/loss,eval/loss,eval/accuracy); also the table's columns without --columns",
                        flag_values=fv)
    flags.DEFINE_string("columns", None, "compare: table columns, comma-separated fnmatch patterns over metric "
                        "keys (default train/loss,eval/loss,eval/accuracy)", flag_values=fv)
    return fv


def _one_line(e: BaseException) -> str:
    text = str(e).strip() or type(e).__name__
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    # absl wraps config errors as "flag --config=...: <reason>"; keep the reason.
    line = lines[-1] if lines and len(lines[-1]) > 20 else " ".join(lines)
    return re.sub(r"^[\w.]*(Error|Exception): ", "", line)


def _overrides(argv) -> list[tuple[str, str]]:
    """(dotted key, value) of each --config.<key>=<value> (or --config.<key> <value>)."""
    out = []
    for i, a in enumerate(argv):
        if a.startswith("--config."):
            key, eq, value = a[len("--config."):].partition("=")
            if not eq and i + 1 < len(argv):
                value = argv[i + 1]
            out.append((key, value))
    return out


def _key_problem(config, key: str, leaves, verb: str = "set") -> str | None:
    """Why the dotted `key` names no value of `config` (unknown, with the closest key, or a
    group); None when it does."""
    import difflib

    import ml_collections

    node = config
    try:
        for part in key.split("."):
            node = node[part]
    except (KeyError, AttributeError, TypeError):
        hint = difflib.get_close_matches(key, leaves, n=1, cutoff=0.6)
        if not hint:  # a misspelt last part: match on it alone
            tail = difflib.get_close_matches(key.split(".")[-1], [p.split(".")[-1] for p in leaves], n=1)
            hint = [p for p in leaves if tail and p.split(".")[-1] == tail[0]][:1]
        return (f"unknown config key '{key}'"
                + (f"; did you mean '{hint[0]}'?" if hint else "; see the config file for the keys"))
    if isinstance(node, ml_collections.ConfigDict):
        same = [p for p in leaves if p.endswith(f".{key}")]  # `norm` the group vs `model.norm` the value
        return (f"config key '{key}' is a group, not a value; "
                + (f"did you mean '{same[0]}'?" if same else f"{verb} one of its keys, e.g. {key}.{next(iter(node))}"))
    return None


def _override_problem(argv) -> str | None:
    """One line for the first --config.<key> override that names no key of the config
    (with the closest key) or whose value has the wrong type; None if none is found."""
    from bn_research import config_lib

    overrides = _overrides(argv)
    if not overrides:
        return None
    try:  # the config without overrides (config_flags itself re-reads sys.argv for them)
        import importlib.util

        path, _, arg = _config_path(argv).partition(":")
        spec = importlib.util.spec_from_file_location("_bn_research_config", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        config = module.get_config(arg) if arg else module.get_config()
        leaves = list(config_lib._leaf_paths(config))
    except Exception:  # noqa: BLE001  (the config itself does not load: reported elsewhere)
        return None
    for key, value in overrides:
        problem = _key_problem(config, key, leaves)
        if problem:
            return problem
        node = config
        for part in key.split("."):
            node = node[part]
        for typ, name in ((bool, "true or false"), (int, "an integer"), (float, "a number")):
            if isinstance(node, typ):
                try:
                    config_lib._coerce(node, value, key)
                except ValueError:
                    return f"config key '{key}' expects {name}, got '{value}'"
                break
    return None


def _parse(argv):
    from absl import flags

    fv = _flags(argv)
    try:
        rest = fv(argv)
    except flags.Error as e:
        raise UsageError(_config_file_problem(argv, e) or _override_problem(argv) or _one_line(e)) from None
    except Exception as e:  # errors raised while loading the config file or an unknown key
        raise UsageError(_config_file_problem(argv, e) or _override_problem(argv) or _one_line(e)) from None
    if fv["config"].present:
        try:
            fv.config.keys()  # config_flags defers a load failure to first use: surface it now
        except OSError as e:
            reason = _one_line(e).split("] ")[-1]
            raise UsageError(f"cannot load config file {_config_path(argv)}: {reason}") from None
        except Exception as e:
            raise UsageError(_config_file_problem(argv, e) or _override_problem(argv) or _one_line(e)) from None
    return fv, rest[1:]


def _config_file_problem(argv, e: BaseException) -> str | None:
    """When the config file itself raised: its name, the exception type and the line."""
    import traceback
    from pathlib import Path

    from bn_research import config_lib

    path = Path(_config_path(argv).split(":", 1)[0])
    if not path.is_file():
        return None
    seen = set()
    while e is not None and id(e) not in seen:  # absl wraps the config file's exception
        seen.add(id(e))
        frames = traceback.extract_tb(e.__traceback__)
        in_file = any(Path(f.filename).resolve() == path.resolve() for f in frames)
        if in_file or (isinstance(e, SyntaxError) and e.filename and Path(e.filename).resolve() == path.resolve()):
            return config_lib.config_file_error(path, e)
        e = e.__cause__ or e.__context__
    return None


def _config_path(argv) -> str:
    for i, a in enumerate(argv):
        if a.startswith("--config="):
            return a.split("=", 1)[1]
        if a == "--config" and i + 1 < len(argv):
            return argv[i + 1]
    return "?"


def _require(fv, *names):
    for name in names:
        if fv[name].value in (None, ""):
            raise UsageError(f"--{name} is required")


def _usage_errors():
    from bn_research import checkpoint, config_lib, data, distributed, rundir

    return (config_lib.ConfigError, rundir.WorkdirError, data.DatasetError, checkpoint.CheckpointError,
            distributed.DistributedError)


def _exit_code(summary: dict) -> int:
    from bn_research import train

    if summary.get("status") == "completed":
        return 0
    if summary.get("status") == "interrupted":
        return train.EXIT_CODES.get(summary.get("signal"), 130)
    return 1


def _divergence(summary: dict) -> str:
    """Which limit the loss crossed, and where."""
    import math

    loss, at = summary.get("diverged_loss"), summary.get("diverged_at")
    try:
        loss = float(loss)
    except (TypeError, ValueError):
        loss = math.nan  # written as "nan" / "inf" in JSON
    if not math.isfinite(loss):
        return f"the training loss was {loss} (not finite) at step {at}"
    return f"the training loss was {loss:.4g} at step {at}, above train.max_loss={summary.get('max_loss'):g}"


def _status_line(summary: dict) -> str:
    final = summary.get("final") or {}
    shown = ", ".join(f"{k}={v:.4g}" for k, v in sorted(final.items())
                      if k.startswith("eval/") and isinstance(v, (int, float)))
    line = (f"{summary.get('status')} at step {summary.get('step')} in {summary.get('wall_time_s') or 0:.1f}s"
            f" ({summary.get('steps_per_s') or 0:.0f} steps/s){': ' + shown if shown else ''}")
    if summary.get("status") == "interrupted":
        during = summary.get("interrupted_during")
        line += (f" (during {during}, by {summary.get('signal')})" if during else "") + \
            "; run the same command again to resume"
    if summary.get("status") == "diverged" and "diverged_loss" in summary:
        line += f"; {_divergence(summary)}"
    return line


def _join_processes(fv) -> None:
    """jax.distributed for a multi-process run, before JAX starts: with --coordinator_address
    (or its BN_RESEARCH_* variables), or --distributed for a cluster JAX detects itself."""
    from bn_research import distributed

    explicit = [fv.coordinator_address, fv.num_processes, fv.process_id]
    from_env = any(os.environ.get(v) for v in distributed.ENV.values())
    if fv.distributed or from_env or any(v is not None for v in explicit):
        try:
            distributed.initialize(*explicit)
        except distributed.DistributedError as e:
            raise UsageError(str(e)) from None


def cmd_train(fv, rest):
    from bn_research import train

    _require(fv, "config", "workdir")
    if rest:
        raise UsageError(f"unexpected arguments: {' '.join(rest)}")
    _join_processes(fv)
    config = fv.config
    from bn_research import replicas

    try:
        if replicas.enabled(config):  # N copies in one compiled program, one run dir each
            replicas.validate(config)
            workdirs = replicas.default_workdirs(config, fv.workdir)
            summaries = replicas.train_replicas(config, workdirs, overwrite=fv.overwrite)
            for workdir, summary in zip(workdirs, summaries, strict=True):
                print(f"{workdir.name}: {_status_line(summary)}", flush=True)
            return max(_exit_code(s) for s in summaries)
        summary = train.train_and_evaluate(config, fv.workdir, overwrite=fv.overwrite)
    except _usage_errors() as e:
        raise UsageError(str(e)) from None
    print(_status_line(summary), flush=True)
    if summary.get("interrupted_during") == "compile":
        # The abandoned compilation thread would hold up the interpreter's shutdown.
        sys.stderr.flush()
        os._exit(_exit_code(summary))
    return _exit_code(summary)


def _sweep_axes(specs, config) -> list[tuple[str, list[str]]]:
    """(key, values) of each --sweep axis. UsageError (one line) for no axis, an axis that is
    not key=v1,v2,..., a key that is unknown or a group, no values, a repeated value or key."""
    from bn_research import config_lib

    if not specs:
        raise UsageError("sweep needs at least one --sweep axis, e.g. --sweep model.norm=batch,none "
                         "(one run per point of the axes' grid, under --workdir)")
    leaves, axes = list(config_lib._leaf_paths(config)), []
    for spec in specs:
        key, eq, text = (part.strip() for part in spec.partition("="))
        if not eq or not key:
            raise UsageError(f"--sweep '{spec}' is not key=v1,v2,... (e.g. --sweep model.norm=batch,none)")
        problem = _key_problem(config, key, leaves, verb="sweep")
        if problem:
            raise UsageError(f"--sweep {spec}: {problem}")
        values = [v.strip() for v in text.split(",") if v.strip()]
        if not values:
            raise UsageError(f"--sweep {spec}: no values; give {key}=v1,v2,...")
        if len(set(values)) != len(values):
            raise UsageError(f"--sweep {spec}: a value is repeated")
        if key in dict(axes):
            raise UsageError(f"--sweep {key} is given twice; list all its values in one axis ({key}=v1,v2,...)")
        axes.append((key, values))
    return axes


def _sweep_points(axes) -> list[tuple[str, dict]]:
    """(run name, {key: value}) of each point of the grid; a name uses each key's last part
    (norm=batch,seed=0) unless two axes share it."""
    tails = [k.split(".")[-1] for k, _ in axes]
    short = {k: (t if tails.count(t) == 1 else k) for (k, _), t in zip(axes, tails, strict=True)}
    points = itertools.product(*[[(k, v) for v in values] for k, values in axes])
    return [(",".join(f"{short[k]}={v}" for k, v in point), dict(point)) for point in points]


def cmd_sweep(fv, rest):
    import copy

    from bn_research import config_lib, train

    _require(fv, "config", "workdir")
    if rest:
        raise UsageError(f"unexpected arguments: {' '.join(rest)}")
    configs = []
    for name, point in _sweep_points(_sweep_axes(fv.sweep, fv.config)):
        config = copy.deepcopy(fv.config)
        config.unlock()
        try:
            config_lib.apply_arg(config, ",".join(f"{k}={v}" for k, v in point.items()), {})
            config_lib.validate(config)
        except config_lib.ConfigError as e:
            raise UsageError(str(e)) from None
        config.lock()
        configs.append((name, config))
    failed, diverged = [], []
    for name, config in configs:
        workdir = os.path.join(fv.workdir, name)
        print(f"== {name} -> {workdir}", flush=True)
        try:
            summary = train.train_and_evaluate(config, workdir, overwrite=fv.overwrite)
        except _usage_errors() as e:
            print(f"bn-research: {name}: {e}", file=sys.stderr, flush=True)
            failed.append(name)
            continue
        print(f"   {_status_line(summary)}", flush=True)
        if summary["status"] == "interrupted":
            print("sweep interrupted; run the same command again to resume it", flush=True)
            return _exit_code(summary)
        if summary["status"] == "diverged":
            diverged.append(name)
    done = len(configs) - len(failed) - len(diverged)
    print(f"sweep: {done} completed, {len(diverged)} diverged"
          + (f" ({'; '.join(diverged)})" if diverged else "")
          + f", {len(failed)} could not run" + (f" ({'; '.join(failed)})" if failed else ""), flush=True)
    return 0 if not failed else 1


def _patterns(value) -> list[str]:
    return [p.strip() for p in (value or "").split(",") if p.strip()]


def cmd_compare(fv, rest):
    """A table of the runs in (or under) the given directories, one row per config (seeds
    aggregated); with --plot, a figure of --metric against step with seed bands."""
    from bn_research import runs

    if not rest:
        raise UsageError("compare needs at least one run directory (or a directory holding runs, e.g. a sweep root)")
    metrics = _patterns(fv.metric)
    columns = _patterns(fv.columns) or metrics or runs.DEFAULT_COLUMNS
    if fv.plot:
        import matplotlib

        matplotlib.use("Agg")  # the CLI, not the library, picks a non-interactive backend
        from bn_research import plots

        problem = plots.check_path(fv.plot)
        if problem:
            raise UsageError(problem)
    try:
        loaded = runs.load_all(rest)
        keys = sorted({k for r in loaded for k in r.keys()})
        for p in metrics:
            if not runs.match(keys, p):
                raise runs.RunError(runs.no_match_message(p, keys))
        table = runs.compare(loaded, columns)
    except runs.RunError as e:
        raise UsageError(str(e)) from None
    varying = [c for c in table.columns if "." in c and "/" not in c]  # config keys that differ between configs
    differ = ", ".join(varying[:3]) + (f" and {len(varying) - 3} more keys" if len(varying) > 3 else "")
    counts = f"{len(loaded)} run{'s' * (len(loaded) != 1)}, {len(table)} config{'s' * (len(table) != 1)}"
    try:
        print(counts + (f" (differing in {differ})" if varying else "")
              + "; final metrics, mean ± std over seeds")
        print(runs.format_table(table), flush=True)
    except BrokenPipeError:  # `compare ... | head`: the reader has gone
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    if fv.plot:
        try:
            plots.save(plots.learning_curves(loaded, metrics or None), fv.plot)
        except runs.RunError as e:  # e.g. runs that logged none of the default metrics yet
            raise UsageError(str(e)) from None
        except OSError as e:
            print(f"bn-research: error: cannot write {fv.plot}: {e.strerror or e}", file=sys.stderr)
            return 1
        print(f"wrote {fv.plot}")
    return 0


def cmd_reproduce(args) -> int:
    """Delegates to experiments/reproduce.py of the source checkout this package runs from."""
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "experiments" / "reproduce.py"
    if not script.exists():
        print(f"bn-research: error: reproduce needs the source checkout (no {script}); clone the repository "
              "and install it with `pip install -e .`", file=sys.stderr)
        return 2
    root = str(script.parents[1])
    if root not in sys.path:
        sys.path.insert(0, root)
    import matplotlib

    matplotlib.use("Agg")  # the CLI, not the library, picks a non-interactive backend
    from experiments import reproduce

    try:
        return reproduce.main(list(args))
    except KeyboardInterrupt:
        print("bn-research: interrupted", file=sys.stderr)
        return 130


def main(argv=None) -> int:
    argv = list(sys.argv if argv is None else argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    if len(argv) < 2 or argv[1] in ("-h", "--help", "help"):
        print(ABOUT + USAGE + HELP_TAIL, end="")
        return 0 if len(argv) >= 2 else 2
    if argv[1] in ("--version", "-V", "version"):
        print(_version())
        return 0
    command = argv[1]
    if command not in COMMANDS:
        print(f"bn-research: error: unknown command '{command}'; choose one of: "
              f"{', '.join(COMMANDS)} (bn-research --help)", file=sys.stderr)
        return 2
    if command == "reproduce":
        return cmd_reproduce(argv[2:])
    if any(a in ("-h", "--help", "--helpfull", "--helpshort", "-?") for a in argv[2:]):
        print(_help(command, argv[2:]), end="")
        return 0
    try:
        fv, rest = _parse([argv[0]] + argv[2:])
        return {"train": cmd_train, "compare": cmd_compare, "sweep": cmd_sweep}[command](fv, rest)
    except UsageError as e:  # one line, even when the offending value holds a newline
        message = str(e).strip().replace("\r", "\\r").replace("\n", "\\n")
        print(f"bn-research: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("bn-research: interrupted", file=sys.stderr)
        return 130


def run():
    sys.exit(main())
