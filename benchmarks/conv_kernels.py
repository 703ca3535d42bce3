"""A/B timing of the CPU convolution kernels on the CNN (`configs/cnn.py`, probes off):
`python benchmarks/conv_kernels.py [--reps 5] [--k 10] [--replicas 8]`.

Variants, all traced with BN_RESEARCH_KERNELS=cpu in this one process:

- `old`: the convolution of bn_research/kernels.py before this benchmark existed (commit
  46568da, reproduced below): XLA's convolution forward, hand-written VJP (input gradient
  a convolution with the flipped kernel, kernel gradient one matmul per offset), vmap
  rule running per-replica kernels in a `lax.map` loop;
- `new`: `kernels.conv_same_cpu` as it is now;
- `new_map`: `new` with the per-replica convolutions in a `lax.map` loop instead of
  unrolled (UNROLL_MAX_REPLICAS = 0);
- `new_dw_offsets`: `new` with the per-offset kernel gradient for every layer;
- `new_no_taps`: that, and XLA's convolution forward for every layer (so only the vmap
  rule differs from `old`). The last three separate the changes (`--variants`).

Rows: the jitted `train_chunk` of K steps (steps/s), and `replicas.build` with N seeds
vmapped vs the same N replicas run one after another (replica-steps/s). Every variant is
compiled first (excluded); repetitions are interleaved (order rotating) and the table
shows the median and min-max, and the ratios of medians. Prints the load average.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ["BN_RESEARCH_KERNELS"] = "cpu"
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from bn_research import data, kernels, replicas, step, train  # noqa: E402

# ---------------------------------------------------------------------------------------
# The baseline: conv_same_cpu as of commit 46568da


def _old_conv(x, w):
    return jax.lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))


_old_conv = jax.custom_batching.custom_vmap(_old_conv)


@_old_conv.def_vmap
def _old_conv_vmap(axis_size, in_batched, x, w):
    x_batched, w_batched = in_batched
    if not w_batched:
        n, b = x.shape[:2]
        return _old_conv(x.reshape((n * b,) + x.shape[2:]), w).reshape((n, b) + x.shape[2:-1] + w.shape[-1:]), True
    if x_batched:
        return jax.lax.map(lambda xw: _old_conv(*xw), (x, w)), True
    return jax.lax.map(lambda w_: _old_conv(x, w_), w), True


@jax.custom_vjp
def old_conv_same_cpu(x, w):
    return _old_conv(x, w)


def _old_fwd(x, w):
    return _old_conv(x, w), (x, w)


def _old_bwd(res, dy):
    x, w = res
    kh, kw, cin, cout = w.shape
    h, wd = x.shape[1], x.shape[2]
    xp = jnp.pad(x, ((0, 0), (kh // 2, kh // 2), (kw // 2, kw // 2), (0, 0)))
    dy2 = dy.reshape(-1, cout)
    dw = jnp.stack([jnp.dot(xp[:, a:a + h, b:b + wd, :].reshape(-1, cin).T, dy2)
                    for a in range(kh) for b in range(kw)]).reshape(w.shape)
    return _old_conv(dy, jnp.flip(w, (0, 1)).transpose(0, 1, 3, 2)), dw


old_conv_same_cpu.defvjp(_old_fwd, _old_bwd)

VARIANTS = {
    "old": (old_conv_same_cpu, {}),
    "new": (kernels.conv_same_cpu, {}),
    "new_map": (kernels.conv_same_cpu, {"UNROLL_MAX_REPLICAS": 0}),
    "new_dw_offsets": (kernels.conv_same_cpu, {"DW_IM2COL_MAX_CIN": 0}),
    "new_no_taps": (kernels.conv_same_cpu, {"TAPS_MAX_CIN": 0, "DW_IM2COL_MAX_CIN": 0}),
}


@contextlib.contextmanager
def variant(name):
    """Trace under this variant: kernels.conv_same_cpu (and settings) swapped meanwhile."""
    fn, settings = VARIANTS[name]
    saved = {k: getattr(kernels, k) for k in ["conv_same_cpu", *settings]}
    kernels.conv_same_cpu = fn
    for k, v in settings.items():
        setattr(kernels, k, v)
    try:
        yield
    finally:
        for k, v in saved.items():
            setattr(kernels, k, v)


# ---------------------------------------------------------------------------------------


def load_config(name="cnn"):
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"cfg_{name}", HERE.parent / "configs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    c = module.get_config(None)
    for p in c.probes:
        if "enabled" in c.probes[p]:
            c.probes[p].enabled = False
    return c


def timed(fn, units):
    t = time.perf_counter()
    fn()
    return units / (time.perf_counter() - t)


def single_chunk(name, config, ds, k):
    """A callable timing one jitted train_chunk of k steps (compiled here)."""
    with variant(name):
        s = train.setup(config, ds, single_device=True)
        chunk, _ = step.jit_fns(s["fns"])
        holder = {"state": chunk(s["state"], s["data"]["train"], k)[0]}
        jax.block_until_ready(holder)
    d = s["data"]["train"]

    def go():
        st, m = chunk(holder["state"], d, k)
        jax.block_until_ready(m)
        holder["state"] = st

    return lambda: timed(go, k)


def replica_chunks(name, config, ds, n, k):
    """(vectorized, sequential): callables timing n vmapped replicas and the same n one by one."""
    import ml_collections

    config = ml_collections.ConfigDict(config.to_dict())
    config.replicas.seeds = tuple(range(n))
    with variant(name):
        b = replicas.build(config, ds)
        d = b["data"]["train"]
        single, _ = step.jit_fns(b["setups"][0]["fns"])
        holder = {"vec": b["chunk"](b["state"], b["learning_rates"], d, k)[0],
                  "seq": [single(jax.tree_util.tree_map(jnp.copy, s["state"]), d, k)[0] for s in b["setups"]]}
        jax.block_until_ready(holder)

    def vec():
        st, m = b["chunk"](holder["vec"], b["learning_rates"], d, k)
        jax.block_until_ready(m)
        holder["vec"] = st

    def seq():
        out = []
        for st in holder["seq"]:
            st, m = single(st, d, k)
            jax.block_until_ready(m)
            out.append(st)
        holder["seq"] = out

    return (lambda: timed(vec, n * k)), (lambda: timed(seq, n * k))


def interleave(fns: dict, reps: int) -> dict:
    names = list(fns)
    out = {n: [] for n in names}
    for r in range(reps):
        for n in names[r % len(names):] + names[:r % len(names)]:
            out[n].append(fns[n]())
    return out


def fmt(vals):
    return f"{statistics.median(vals):7.1f} ({min(vals):.1f}-{max(vals):.1f})"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--k", type=int, default=10, help="steps per chunk")
    ap.add_argument("--replicas", type=int, default=8, help="0 skips the replica rows")
    ap.add_argument("--variants", default="old,new", help=f"comma list of {', '.join(VARIANTS)}")
    args = ap.parse_args(argv)
    names = args.variants.split(",")
    config = load_config()
    ds = data.load(config.dataset)
    print(f"jax {jax.__version__}, backend {jax.default_backend()}, {os.cpu_count()} cores; "
          f"load average before: {os.getloadavg()[0]:.2f}", flush=True)

    fns = {f"step {n}": single_chunk(n, config, ds, args.k) for n in names}
    if args.replicas:
        for n in names:
            fns[f"vmap{args.replicas} {n}"], fns[f"seq{args.replicas} {n}"] = replica_chunks(
                n, config, ds, args.replicas, args.k)
    res = interleave(fns, args.reps)
    med = {n: statistics.median(v) for n, v in res.items()}

    print(f"\nCNN (configs/cnn.py, batch {config.train.batch_size}, probes off), K={args.k} steps per "
          f"chunk, {args.reps} interleaved reps; median (min-max)")
    print(f"| {'variant':<16} | {'rate':>22} | unit             |")
    print(f"|{'-' * 18}|{'-' * 24}|------------------|")
    for n, v in res.items():
        unit = "steps/s" if n.startswith("step") else "replica-steps/s"
        print(f"| {n:<16} | {fmt(v):>22} | {unit:<16} |")
    print("\nratios of medians:")
    base = names[0]
    for n in names[1:]:
        print(f"  step {n} / step {base}: {med[f'step {n}'] / med[f'step {base}']:.3f}")
    if args.replicas:
        r = args.replicas
        for n in names:
            print(f"  vmap{r} / seq{r} ({n}): {med[f'vmap{r} {n}'] / med[f'seq{r} {n}']:.3f}")
        for n in names[1:]:
            print(f"  vmap{r} {n} / vmap{r} {base}: {med[f'vmap{r} {n}'] / med[f'vmap{r} {base}']:.3f}")
    print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
