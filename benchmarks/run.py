"""Side-by-side timing of bn_research on this machine: `python benchmarks/run.py`.

Every comparison runs its variants interleaved (A B, B A, A B, ...) in one process and
reports the median and min-max over the repetitions; compilation is excluded from
throughput. Writes `benchmarks/results.json` (with the machine and versions) and
`benchmarks/results.md`, and prints the table. Comparisons, on `configs/mlp.py` (Ioffe
& Szegedy MLP, batch 60) and `configs/cnn.py` (VGG-style CNN, batch 64):

- framework loop (`train.train_and_evaluate`, default logging and probes; and with the
  probes off) vs a hand-written jitted JAX step with no logging (`bare_jax.py`);
- framework vs a PyTorch eager loop of the same model (`torch_ref.py`; CNN channels_last),
  and vs the same PyTorch model and step under `torch.compile` (inductor; compilation in
  the warm-up, not timed), in the same interleaved repetitions: both ratios side by side;
- probe overhead: the jitted chunk (the config's steps per dispatch) with the default
  probes, with drift every step, and with every probe at its default cadence, each over
  the same chunk with every probe off (`probe_overhead.py`'s variants);
- K steps per dispatch (`lax.scan`) vs one step per dispatch;
- N=8 replicas in one program (`bn_research.replicas`, the package's `replicas.program`;
  also `jax.vmap` when it chose otherwise) vs 8 sequential runs;
- compile time of a depth-200 vs a depth-10 MLP with the default settings (and unrolled, depth 100 vs 10);
- achieved FLOP/s (analytic count; XLA's cost analysis alongside) over the FLOP/s of a
  float32 matmul measured in the same run;
- the limit: the framework's train step (K per dispatch, probes off) over its own
  `dot_general`s and `conv_general_dilated`s alone, traced from the jitted step and run
  at the same shapes in one jitted loop (`op_limit.py`); 1.0 = the step costs no more
  than its matrix multiplications and convolutions.

Options: `--reps N` (default 3), `--quick` (fewer steps; for a smoke test), `--out DIR`,
`--only SECTIONS` (comma-separated subset of: loop, torch, probes, dispatch, replicas, flops,
limit, compile; `flops` brings in `dispatch` and `replicas`, whose rates it uses).
PyTorch is optional (`pip install -e '.[bench]'`); without it, or when `torch.compile`
does not work here, those rows say `unavailable (<reason>)` instead of a number.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import bare_jax  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import op_limit  # noqa: E402

from bn_research import data, kernels, replicas, train  # noqa: E402

SECTIONS = ("loop", "torch", "probes", "dispatch", "replicas", "flops", "limit", "compile")


def load_config(name: str, arg: str | None = None):
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"cfg_{name}", HERE.parent / "configs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


def probes_off(config):
    for name in config.probes:
        if "enabled" in config.probes[name]:
            config.probes[name].enabled = False
    return config


def machine() -> dict:
    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    out = {"cpu": cpu, "cores": os.cpu_count(), "platform": platform.platform(),
           "python": platform.python_version(), "jax_device": jax.devices()[0].device_kind}
    for pkg in ("jax", "jaxlib", "flax", "optax", "numpy", "torch"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = None
    return out


def interleave(variants: dict, reps: int) -> dict:
    """Run each variant `reps` times, order rotating each repetition; {name: [values]}."""
    names = list(variants)
    out = {n: [] for n in names}
    for r in range(reps):
        order = names[r % len(names):] + names[:r % len(names)]
        for n in order:
            out[n].append(float(variants[n]()))
    return out


def stats(values) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "values": values}


def timed_rate(fn, steps: int) -> float:
    """steps / seconds of `fn()` (which must block until done)."""
    t = time.perf_counter()
    fn()
    return steps / (time.perf_counter() - t)


def chunks_rate(chunk, holder: dict, key: str, data, k: int, n_chunks: int) -> float:
    """steps/s of `n_chunks` jitted chunks of `k` steps from the state `holder[key]`
    (donated, so the state after them is kept there for the next repetition)."""
    def go():
        st = holder[key]
        for _ in range(n_chunks):
            st, m = chunk(st, data, k)
        jax.block_until_ready(m)
        holder[key] = st

    return timed_rate(go, n_chunks * k)


# ---------------------------------------------------------------------------------------
# Variants


def framework_loop(config, dataset, workdir):
    def run():
        s = train.train_and_evaluate(config, workdir, overwrite=True, dataset=dataset)
        assert s["status"] == "completed", s["status"]
        return s["steps_per_s"]

    return run


def bare_step(kind, config, dataset, steps):
    ds = dataset
    x, y = jnp.asarray(ds.train["x"]), jnp.asarray(ds.train["y"])
    holder = {}
    state, one, _ = bare_jax.make(kind, config, ds.input_shape, ds.output_dim)
    idx = bare_jax.Indices(x.shape[0], config.train.batch_size)
    state, loss = one(state, x, y, jnp.asarray(idx.next()))
    jax.block_until_ready(loss)
    holder["state"] = state

    def run():
        def go():
            st = holder["state"]
            for _ in range(steps):
                st, loss = one(st, x, y, idx.next())
            jax.block_until_ready(loss)
            holder["state"] = st

        return timed_rate(go, steps)

    return run


def bare_scan(kind, config, dataset, steps, k):
    ds = dataset
    x, y = jnp.asarray(ds.train["x"]), jnp.asarray(ds.train["y"])
    holder = {}
    state, _, chunk = bare_jax.make(kind, config, ds.input_shape, ds.output_dim)
    idx = bare_jax.Indices(x.shape[0], config.train.batch_size)
    state, loss = chunk(state, x, y, idx.chunk(k))
    jax.block_until_ready(loss)
    holder["state"] = state

    n_chunks = max(1, steps // k)

    def run():
        def go():
            st = holder["state"]
            for _ in range(n_chunks):
                st, loss = chunk(st, x, y, idx.chunk(k))
            jax.block_until_ready(loss)
            holder["state"] = st

        return timed_rate(go, n_chunks * k)

    return run


def torch_loop(kind, config, dataset, steps, compiled=False):
    """PyTorch eager (or `torch.compile`d) loop, warmed up (compiled) before timing, in a
    process of its own (`torch_ref.serve`): in this process PyTorch would share one OpenMP
    runtime with the package's oneDNN convolutions (both load `libgomp.so.1`), and its CNN
    step measured 1.46x slower after the package's had run (18.8 vs 12.9 ms per step)."""
    import multiprocessing

    import torch_ref

    ctx = multiprocessing.get_context("spawn")
    conn, child = ctx.Pipe()
    del dataset  # the peer loads the config's dataset itself, the same way
    proc = ctx.Process(target=torch_ref.serve, daemon=True, args=(child, kind, config.to_dict(), compiled, steps))
    proc.start()
    status, detail = conn.recv()
    if status != "ready":
        proc.join()
        raise RuntimeError(detail)

    def rate():
        conn.send("run")
        return conn.recv()

    def close():
        """Stop the peer (any message but 'run'), so that it and its threads and worker
        processes are gone before the later sections: left idle, the peers made some of
        the MLP replica section's repetitions up to 2x slower (min 1,280 replica-steps/s
        against 2,620 without them)."""
        conn.send("stop")
        proc.join(timeout=30)
        if proc.is_alive():
            proc.terminate()
            proc.join()

    rate.close = close
    return rate


def one_line(e: BaseException, limit=200) -> str:
    """An exception as one short line (compiler errors can be pages long)."""
    first = next((ln.strip() for ln in str(e).splitlines() if ln.strip()), "")
    text = f"{type(e).__name__}: {first}" if first else type(e).__name__
    return text if len(text) <= limit else text[:limit - 3] + "..."


def limit_variants(config, dataset, steps, k):
    """The framework's train step (K steps per `lax.scan` dispatch, as in `dispatch_variants`)
    vs the step's own dot_general/conv_general_dilated ops alone at the same shapes, K per
    dispatch too (`op_limit.program`); both in steps/s. Returns (step, own, info)."""
    s = train.setup(config, dataset)
    d = s["data"]["train"]
    found = op_limit.collect(s["fns"].train_step, s["state"], d)
    chunk = jax.jit(s["fns"].train_chunk, static_argnums=2, donate_argnums=0)
    own, operands = op_limit.program(found.ops, k)
    own = own.lower(operands).compile()  # compiled once: run and read back (which ops XLA kept)
    kept = op_limit.hlo_counts(own)
    holder = {"st": chunk(jax.tree_util.tree_map(jnp.copy, s["state"]), d, k)[0]}
    jax.block_until_ready((holder, own(operands)))
    n_chunks = max(1, steps // k)

    def step():
        return chunks_rate(chunk, holder, "st", d, k, n_chunks)

    def ops_alone():
        def go():
            for _ in range(n_chunks):
                total = own(operands)
            jax.block_until_ready(total)

        return timed_rate(go, n_chunks * k)

    return step, ops_alone, {"found": found, "kept": kept}


def limit_note(info, rate_own, analytic_flops) -> str:
    found, kept = info["found"], info["kept"]
    c = found.counts()
    shapes = {}
    for op in found.ops:
        shapes[op.describe()] = shapes.get(op.describe(), 0) + op.count  # scan bodies count `length` times
    listed = "; ".join(f"{n}x {d}" if n > 1 else d for d, n in shapes.items())
    note = (f"traced train_step holds {c['dot_general']} dot_general + {c['conv_general_dilated']} "
            f"conv_general_dilated + {c['onednn_conv']} oneDNN convolution calls ({found.flops() / 1e6:.1f} "
            f"MFLOP/step; after dropping "
            f"{found.eqns_dead} dead equations), run alone they reach {found.flops() * rate_own / 1e9:.1f} GFLOP/s; "
            f"XLA kept {kept['dot']} dots and {kept['conv']} convolutions of them")
    if kernels.kind() == "onednn" and c["onednn_conv"]:
        note += ("; kernels.kind()='onednn': forward and kernel-gradient convolutions are oneDNN FFI calls, "
                 "input gradients forward convolutions with the flipped kernel, the first layer's forward "
                 "elementwise multiply-adds (bn_research/kernels.py)")
    if kernels.kind() == "cpu" and c["conv_general_dilated"]:
        note += ("; kernels.kind()='cpu': the package writes parts of its convolutions (weight gradients, "
                 "small-channel cases) as dot_generals (bn_research/kernels.py), so the ops counted are those "
                 "the traced step really contains, not one conv per layer and pass")
    if abs(found.flops() - analytic_flops) > 0.001 * analytic_flops:
        note += (f"; the model's analytic conv+dense count is {analytic_flops / 1e6:.1f} MFLOP/step: the rest is "
                 "written with other operations (e.g. elementwise multiply-adds) and is not in the own-op set")
    if found.notes:
        note += "; " + "; ".join(found.notes)
    return note + f". Ops per step: {listed}"


def dispatch_variants(config, dataset, steps, k):
    """Framework step functions: K steps per `lax.scan` dispatch vs one step per dispatch."""
    s = train.setup(config, dataset)
    d = s["data"]["train"]
    chunk = jax.jit(s["fns"].train_chunk, static_argnums=2, donate_argnums=0)
    one = jax.jit(s["fns"].train_step, donate_argnums=0)
    copy = lambda st: jax.tree_util.tree_map(jnp.copy, st)
    holder = {"a": chunk(copy(s["state"]), d, k)[0], "b": one(copy(s["state"]), d)[0]}
    jax.block_until_ready(holder)

    n_chunks = max(1, steps // k)  # at least one whole chunk, also for `--quick` step counts below k

    def scanned():
        return chunks_rate(chunk, holder, "a", d, k, n_chunks)

    def single():
        def go():
            st = holder["b"]
            for _ in range(n_chunks * k):
                st, m = one(st, d)
            jax.block_until_ready(m)
            holder["b"] = st

        return timed_rate(go, n_chunks * k)

    return scanned, single, s


PROBE_VARIANTS = {"defaults": ("default probes (drift, growth, weights)", "<= 1.05"),
                  "drift_every": ("drift every step", "<= 1.25"),
                  "all_default": ("every probe at its default cadence", None)}


def probe_variants(kind, dataset, n_chunks, quick):
    """{variant: timer} of one jitted chunk of the config's length (probe_overhead.py's
    variants: probes off, default probes, drift every step, every probe), states kept."""
    import probe_overhead

    out, holder = {}, {}
    for v in ("off", *PROBE_VARIANTS):
        config = probe_overhead.variant_config(kind, v)
        if quick:
            config.train.steps_per_dispatch = 50
        s = train.setup(config, dataset)
        k = train.chunk_length(config)
        chunk = jax.jit(s["fns"].train_chunk, static_argnums=(2, 3), donate_argnums=0)
        d = s["data"]["train"]
        holder[v] = chunk(s["state"], d, k)[0]
        jax.block_until_ready(holder[v])
        out[v] = lambda v=v, chunk=chunk, d=d, k=k: chunks_rate(chunk, holder, v, d, k, n_chunks)
    return out, k


def replica_variants(config, dataset, n, k, program="auto"):
    """Throughput (replica-steps/s) of n replicas in one program (`replicas.program`) vs
    the same n run one by one; also returns the program the package chose."""
    config = load_config_copy(config)
    config.replicas.seeds = tuple(range(n))
    config.replicas.program = program
    b = replicas.build(config, dataset)
    d = b["data"]["train"]
    single = jax.jit(b["setups"][0]["fns"].train_chunk, static_argnums=2, donate_argnums=0)
    holder = {"vec": b["chunk"](b["state"], b["learning_rates"], d, k)[0],
              "seq": [single(jax.tree_util.tree_map(jnp.copy, s["state"]), d, k)[0] for s in b["setups"]]}
    jax.block_until_ready(holder)

    def vec():
        def go():
            st, m = b["chunk"](holder["vec"], b["learning_rates"], d, k)
            jax.block_until_ready(m)
            holder["vec"] = st

        return timed_rate(go, n * k)

    def seq():
        def go():
            out = []
            for st in holder["seq"]:
                st, m = single(st, d, k)
                jax.block_until_ready(m)  # one run after another
                out.append(st)
            holder["seq"] = out

        return timed_rate(go, n * k)

    return vec, seq, b["program"]


def load_config_copy(config):
    import ml_collections

    return ml_collections.ConfigDict(config.to_dict())


def compile_seconds(config, dataset, k):
    s = train.setup(config, dataset)
    t = time.perf_counter()
    jax.jit(s["fns"].train_chunk, static_argnums=2).lower(s["state"], s["data"]["train"], k).compile()
    return time.perf_counter() - t


def matmul_flops_per_s(n=1024, reps=10):
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    f = jax.jit(lambda a: a @ a)
    f(a).block_until_ready()
    rates = []
    for _ in range(reps):
        t = time.perf_counter()
        f(a).block_until_ready()
        rates.append(2 * n**3 / (time.perf_counter() - t))
    return statistics.median(rates)


def mlp_step_flops(config, fan_in, out):
    """Analytic matmul FLOPs of one MLP training step: forward x W, gradient wrt W for every
    layer, gradient wrt the input for every layer but the first (not needed)."""
    b, w, d = config.train.batch_size, config.model.width, config.model.depth
    dims = [(fan_in, w)] + [(w, w)] * (d - 1) + [(w, out)]
    mm = sum(2 * b * i * o for i, o in dims)
    return 3 * mm - 2 * b * dims[0][0] * dims[0][1]


def cnn_step_flops(config, input_shape, out):
    """Analytic conv + dense FLOPs of one CNN training step (same rule as the MLP)."""
    b, m = config.train.batch_size, config.model
    size, channels, total, first = input_shape[0], input_shape[-1], 0, None
    for i in range(m.depth):
        width = m.width * 2 ** (i // 2)
        f = 2 * b * size * size * 9 * channels * width
        first = f if first is None else first
        total += f
        channels = width
        if i % 2 == 1 and size >= 2:
            size //= 2
    total += 2 * b * channels * out
    return 3 * total - first


def xla_flops(fns, state, train_data):
    cost = jax.jit(fns.train_step).lower(state, train_data).compile().cost_analysis()
    if isinstance(cost, list):
        cost = cost[0]
    return float(cost.get("flops", float("nan"))) if cost else float("nan")


# ---------------------------------------------------------------------------------------


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", default=str(HERE))
    p.add_argument("--only", default=",".join(SECTIONS),
                   help=f"comma-separated subset of: {', '.join(SECTIONS)} (default: all)")
    args = p.parse_args(argv)
    only = {x.strip() for x in args.only.split(",") if x.strip()}
    if not only or only - set(SECTIONS):
        p.error(f"--only {args.only!r}: choose from {', '.join(SECTIONS)}")
    if "flops" in only:  # uses the rates measured by these two
        only |= {"dispatch", "replicas"}
    out = Path(args.out)
    try:  # checked before the run, not after it
        out.mkdir(parents=True, exist_ok=True)
        (out / ".write_test").write_text("")
        (out / ".write_test").unlink()
    except OSError as e:
        p.error(f"--out {out} is not a writable directory ({e.strerror or e})")
    reps, quick = args.reps, args.quick
    t_start = time.time()
    load_start = os.getloadavg()  # other processes on the machine skew every timing; recorded with the results
    torch_status = {"eager": None, "compile": None}  # None = usable; else "unavailable (<reason>)"
    if "torch" in only:
        try:
            import torch  # noqa: F401
        except ImportError as e:
            why = "torch not installed" if isinstance(e, ModuleNotFoundError) else f"import torch: {one_line(e)}"
            torch_status["eager"] = torch_status["compile"] = f"unavailable ({why})"
            print("torch not installed: PyTorch rows say unavailable (pip install -e '.[bench]')", file=sys.stderr)

    rows = []

    def add(section, name, a_label, a, b_label, b, ratio_fn, goal=None, unit="steps/s", note="", **extra):
        sa, sb = stats(a), stats(b)
        ratio = ratio_fn(sa["median"], sb["median"])
        met = None if goal is None else bool(eval(f"{ratio} {goal}"))  # noqa: S307 - goal strings are ours
        rows.append({"section": section, "name": name, "unit": unit, "a": dict(label=a_label, **sa),
                     "b": dict(label=b_label, **sb), "ratio": ratio, "goal": goal, "met": met, "note": note,
                     **extra})
        print(f"{name}: {a_label} {sa['median']:.4g} vs {b_label} {sb['median']:.4g} -> {ratio:.3g}"
              + (f" (goal {goal}: {'met' if met else 'MISSED'})" if goal else ""), flush=True)

    def add_unavailable(section, name, a_label, a, b_label, status, goal=None, unit="steps/s"):
        """A comparison that could not run here: B says why, in one line; no ratio."""
        sa = stats(a) if a else {}
        rows.append({"section": section, "name": name, "unit": unit, "a": dict(label=a_label, **sa),
                     "b": {"label": f"{b_label}: {status}"}, "ratio": None, "goal": goal, "met": None,
                     "note": f"{b_label}: {status}", "unavailable": status})
        print(f"{name}: {b_label}: {status}", flush=True)

    matmul = []
    tmp = Path(tempfile.mkdtemp(prefix="bn_bench_"))
    for kind in ("mlp", "cnn"):
        config = load_config(kind)
        ds = data.load(config.dataset)
        if "flops" in only:
            matmul.append(matmul_flops_per_s())
        if kind == "mlp":
            loop_steps, bare_n, torch_n, k, disp_n, rep_k, lim_n, lim_k = \
                (600, 600, 300, 100, 300, 50, 200, 100) if quick else (3000, 2000, 1000, 100, 1000, 200, 2000, 100)
        else:
            loop_steps, bare_n, torch_n, k, disp_n, rep_k, lim_n, lim_k = \
                (100, 10, 10, 50, 10, 5, 4, 4) if quick else (300, 50, 50, 50, 50, 10, 50, 50)
        sec = f"{kind}: loop"
        run_torch = "torch" in only and torch_status["eager"] is None
        variants = {}
        if "loop" in only or run_torch:
            cfg_loop = load_config(kind, f"steps={loop_steps}")
            cfg_off = probes_off(load_config(kind, f"steps={loop_steps}"))
            variants["framework"] = framework_loop(cfg_loop, ds, tmp / f"{kind}_fw")
            variants["framework_probes_off"] = framework_loop(cfg_off, ds, tmp / f"{kind}_fw_off")
        if "loop" in only:
            variants["bare"] = bare_step(kind, config, ds, bare_n)
            if kind == "mlp":
                variants["bare_scan"] = bare_scan(kind, config, ds, bare_n, k)
                cfg_k500 = probes_off(load_config(kind, f"steps={loop_steps},train.steps_per_dispatch=500"))
                variants["framework_k500"] = framework_loop(cfg_k500, ds, tmp / f"{kind}_fw_k500")
        if run_torch:
            variants["torch"] = torch_loop(kind, config, ds, torch_n)
            if torch_status["compile"] is None:
                t = time.perf_counter()
                try:  # compiles on the warm-up steps; a failure is reported, not raised
                    variants["torch_compile"] = torch_loop(kind, config, ds, torch_n, compiled=True)
                    print(f"{kind} torch.compile warm-up (compilation) {time.perf_counter() - t:.1f} s", flush=True)
                except Exception as e:  # noqa: BLE001 - any compiler/toolchain failure
                    torch_status["compile"] = f"unavailable ({one_line(e)})"
                    print(f"torch.compile: {torch_status['compile']}", file=sys.stderr, flush=True)
        res = interleave(variants, reps) if variants else {}
        for name in ("torch", "torch_compile"):
            if name in variants:
                variants[name].close()
        if "loop" in only:
            add(sec, f"{kind} framework loop / bare jitted step (time ratio)", "framework", res["framework"],
                "bare step", res["bare"], lambda a, b: b / a, "<= 1.10",
                note="framework: train_and_evaluate with the config's default logging, eval, probes, checkpoints")
            add(sec, f"{kind} framework loop, default probes / probes off (time ratio)", "framework",
                res["framework"], "framework (probes off)", res["framework_probes_off"], lambda a, b: b / a,
                note="whole train_and_evaluate runs (eval and checkpoints in both); the probes section times chunks")
            add(sec, f"{kind} framework loop, probes off / bare jitted step (time ratio)", "framework (probes off)",
                res["framework_probes_off"], "bare step", res["bare"], lambda a, b: b / a, "<= 1.10")
            if "bare_scan" in res:
                add(sec, f"{kind} framework loop, probes off / bare scanned steps (time ratio)",
                    "framework (probes off)", res["framework_probes_off"], f"bare scan K={k}", res["bare_scan"],
                    lambda a, b: b / a, note="stricter baseline: hand-written steps also K per dispatch")
            if "framework_k500" in res:
                add(sec, f"{kind} framework loop, probes off, 500 steps per dispatch / bare jitted step (time ratio)",
                    "framework (probes off, K=500)", res["framework_k500"], "bare step", res["bare"],
                    lambda a, b: b / a, note="train.steps_per_dispatch=500 instead of gcd(log_every, eval_every)=100")
                add(sec, f"{kind} framework loop, probes off, 500 steps per dispatch / bare scanned steps (time ratio)",
                    "framework (probes off, K=500)", res["framework_k500"], f"bare scan K={k}", res["bare_scan"],
                    lambda a, b: b / a)
        if "torch" in only:
            goal = ">= 2.5" if kind == "mlp" else ">= 1.0"  # issue 10's done-when
            eager = "torch eager" + (" channels_last" if kind == "cnn" else "")
            compiled = "torch.compile" + (" channels_last" if kind == "cnn" else "")
            for label, fw_key, tag in (("framework", "framework", ""),
                                       ("framework (probes off)", "framework_probes_off", ", probes off")):
                fw_res = res.get(fw_key)
                name_e = f"{kind} framework{tag} / PyTorch eager (speedup)"
                name_c = f"{kind} framework{tag} / PyTorch torch.compile (speedup)"
                if torch_status["eager"] is not None:
                    add_unavailable(sec, name_e, label, fw_res, eager, torch_status["eager"], goal)
                    add_unavailable(sec, name_c, label, fw_res, compiled, torch_status["compile"])
                    continue
                fw_med, e_med = statistics.median(fw_res), statistics.median(res["torch"])
                if torch_status["compile"] is None:
                    c_med = statistics.median(res["torch_compile"])
                    side = (f"side by side: framework / torch eager {fw_med / e_med:.3g}, framework / torch.compile "
                            f"{fw_med / c_med:.3g} (torch.compile / eager {c_med / e_med:.3g})")
                else:
                    side = f"torch.compile: {torch_status['compile']}"
                add(sec, name_e, label, fw_res, eager, res["torch"], lambda a, b: a / b, goal, note=side)
                if torch_status["compile"] is None:
                    add(sec, name_c, label, fw_res, compiled, res["torch_compile"], lambda a, b: a / b, note=side
                        + "; inductor, default mode, static shapes; compilation in the warm-up, not timed")
                else:
                    add_unavailable(sec, name_c, label, fw_res, compiled, torch_status["compile"])
            if "bare_scan" in res and torch_status["eager"] is None:
                add(sec, f"{kind} bare scanned steps / PyTorch eager (speedup)", f"bare scan K={k}",
                    res["bare_scan"], eager, res["torch"], lambda a, b: a / b,
                    note="the hand-written jitted JAX step of the same model (benchmarks/bare_jax.py: no framework, "
                         "no probes, logging, evaluation or checkpoints), K steps per dispatch: what XLA:CPU gives "
                         "this model written directly in JAX, the ceiling of the framework rows above")

        if "probes" in only:
            # the MLP's chunk takes ~0.3 s: 4 per timing and at least 5 repetitions keep its
            # few-percent ratios above the noise of this machine
            timers, pk = probe_variants(kind, ds, (4 if kind == "mlp" and not quick else 1), quick)
            res = interleave(timers, max(reps, 5) if kind == "mlp" and not quick else reps)
            for v, (label, goal) in PROBE_VARIANTS.items():
                add(f"{kind}: probes", f"{kind} {label} / probes off (time ratio)", label, res[v], "probes off",
                    res["off"], lambda a, b: b / a, goal,
                    note=f"jitted chunks of {pk} steps (the config's steps per dispatch), batch norm, compile excluded")

        if "dispatch" in only:
            scanned, single, s = dispatch_variants(probes_off(load_config(kind)), ds, disp_n, k)
            res = interleave({"scan": scanned, "single": single}, reps)
            add(f"{kind}: dispatch", f"{kind} K={k} steps per dispatch / 1 step per dispatch (speedup)",
                f"scan K={k}", res["scan"], "1 per dispatch", res["single"], lambda a, b: a / b,
                note="probes off")
            fw_chunk_rate = statistics.median(res["scan"])

        if "replicas" in only:
            vec, seq, chosen = replica_variants(probes_off(load_config(kind)), ds, 8, rep_k)
            variants = {"vec": vec, "seq": seq}
            if chosen != "vmap":  # the vmapped program too, for comparison
                variants["vmap"] = replica_variants(probes_off(load_config(kind)), ds, 8, rep_k, "vmap")[0]
            res = interleave(variants, max(2, reps - 1) if kind == "cnn" else reps)
            label = "vmap" if chosen == "vmap" else "lax.map over pairs"
            add(f"{kind}: replicas", f"{kind} 8 replicas in one program / 8 sequential (throughput)",
                f"replicas.program=auto ({label}) N=8", res["vec"], "8 sequential", res["seq"], lambda a, b: a / b,
                ">= 1.0", unit="replica-steps/s",
                note=f"chunks of {rep_k} steps, probes off, compile excluded; the package chose '{chosen}'")
            if "vmap" in res:
                add(f"{kind}: replicas", f"{kind} 8 replicas vmapped / 8 sequential (throughput)", "vmap N=8",
                    res["vmap"], "8 sequential", res["seq"], lambda a, b: a / b, unit="replica-steps/s",
                    note="replicas.program=vmap, for comparison with the package's choice")
            vec_rate = statistics.median(res["vec"])

        analytic = (mlp_step_flops(config, int(np.prod(ds.input_shape)), ds.output_dim) if kind == "mlp"
                    else cnn_step_flops(config, ds.input_shape, ds.output_dim))
        if "limit" in only:
            step_v, own_v, info = limit_variants(probes_off(load_config(kind)), ds, lim_n, lim_k)
            res = interleave({"step": step_v, "own": own_v}, reps)
            ops = [{"op": op.name, "shapes": [list(x) for x in op.shapes], "dtypes": [str(x) for x in op.dtypes],
                    "count": op.count, "mflop": op.flops() / 1e6} for op in info["found"].ops]
            add(f"{kind}: limit", f"{kind} train step / its own dot+conv ops alone (time ratio)",
                f"train step (scan K={lim_k}, probes off)", res["step"], "own dot+conv ops alone", res["own"],
                lambda a, b: b / a, note=limit_note(info, statistics.median(res["own"]), analytic), ops=ops,
                own_mflop=info["found"].flops() / 1e6, analytic_mflop=analytic / 1e6, kernels=kernels.kind())

        if "flops" not in only:
            continue
        flops = analytic
        xla = xla_flops(s["fns"], s["state"], s["data"]["train"])
        mm = matmul[-1]
        rows.append({"section": f"{kind}: flops", "name": f"{kind} FLOP utilization (achieved / fp32 matmul)",
                     "unit": "FLOP/s", "a": {"label": "train step (scan, probes off)", "median": flops * fw_chunk_rate},
                     "b": {"label": "1024x1024 matmul", "median": mm}, "ratio": flops * fw_chunk_rate / mm,
                     "goal": ">= 0.5" if kind == "mlp" else None,
                     "met": (flops * fw_chunk_rate / mm >= 0.5) if kind == "mlp" else None,
                     "note": f"analytic {flops / 1e6:.1f} MFLOP/step; XLA cost analysis {xla / 1e6:.1f} MFLOP/step; "
                             f"8 replicas in one program reach {flops * vec_rate / mm:.2f}"})
        print(f"{kind} FLOP utilization: {rows[-1]['ratio']:.3f} ({rows[-1]['note']})", flush=True)

    if "compile" in only:
        compile_rows(add, reps)

    host = dict(machine(), load_average_start=load_start, load_average_end=os.getloadavg())
    result = {"machine": host, "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "reps": reps, "quick": quick, "only": sorted(only, key=SECTIONS.index),
              "duration_s": time.time() - t_start, "torch_status": torch_status,
              "matmul_flops_per_s": matmul, "results": rows}
    (out / "results.json").write_text(json.dumps(result, indent=1, default=float) + "\n")
    md = markdown(result)
    (out / "results.md").write_text(md)
    print(md)
    return 0


def compile_rows(add, reps):
    # Compile time with the default settings (default probes on, model.scan_layers default):
    # depth 200 vs depth 10. Then depth 100 vs 10 unrolled, probes off, for comparison.
    default = {d: load_config("mlp", f"depth={d}") for d in (10, 200)}
    ds = data.load(default[10].dataset)
    res = interleave({"d200": lambda: compile_seconds(default[200], ds, 100),
                      "d10": lambda: compile_seconds(default[10], ds, 100)}, reps)
    add("compile", "compile depth 200 / depth 10, default settings (time ratio)", "depth 200", res["d200"],
        "depth 10", res["d10"], lambda a, b: a / b, "<= 2", unit="s",
        note="configs/mlp.py with depth changed only: default probes, model.scan_layers default; a 100-step chunk")
    cfg = {(d, sc): probes_off(load_config("mlp", f"depth={d},model.scan_layers={sc}"))
           for d in (10, 100) for sc in ("false",)}
    res = interleave({"d100": lambda: compile_seconds(cfg[(100, "false")], ds, 100),
                      "d10": lambda: compile_seconds(cfg[(10, "false")], ds, 100)}, 1)
    add("compile", "compile depth 100 / depth 10, unrolled layers (time ratio)", "depth 100", res["d100"],
        "depth 10", res["d10"], lambda a, b: a / b, unit="s", note="one repetition")


def _fmt(x):
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return f"{x:.3g}" if abs(x) < 1e4 else f"{x:.3e}"


def markdown(result) -> str:
    m = result["machine"]
    lines = [
        "# bn_research benchmarks",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores; jax {m['jax']}, jaxlib {m['jaxlib']}, flax {m['flax']}, "
        f"optax {m['optax']}, torch {m['torch']}. {result['date_utc']}, {result['reps']} interleaved "
        f"repetitions, {result['duration_s']:.0f} s in all; 1-min load average {m['load_average_start'][0]:.1f} "
        f"at the start, {m['load_average_end'][0]:.1f} at the end. Produced by `python benchmarks/run.py`.",
        "",
        "| comparison | A: median (min-max) | B: median (min-max) | unit | ratio | goal | met |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in result["results"]:
        def cell(s):
            if "median" not in s:
                return s["label"]
            rng = f" ({_fmt(s['min'])}-{_fmt(s['max'])})" if "min" in s else ""
            return f"{s['label']}: {_fmt(s['median'])}{rng}"

        met = "" if r["met"] is None else ("yes" if r["met"] else "**no**")
        ratio = "-" if r["ratio"] is None else f"{r['ratio']:.3g}"
        lines.append(f"| {r['name']} | {cell(r['a'])} | {cell(r['b'])} | {r['unit']} | {ratio} | "
                     f"{r['goal'] or ''} | {met} |")
    notes = [f"- {r['name']}: {r['note']}" for r in result["results"] if r.get("note")]
    return "\n".join(lines + ["", "Notes:", ""] + notes) + "\n"


if __name__ == "__main__":
    sys.exit(main())
