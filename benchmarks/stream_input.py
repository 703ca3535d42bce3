"""Streaming input (bn_research.data.stream) against the device-resident path.

    .venv/bin/python benchmarks/stream_input.py [--steps 600] [--chunk 100] [--out benchmarks/stream_input.json]

Trains configs/mlp.py (mnist_digits, batch 60, probes off: the input path is what is
measured) for `--steps` steps in chunks of `--chunk`, three ways:
- `device`: the default path, batches gathered inside jit from the device-resident split;
- `stream, host_prefetch=0`: the next chunk read by the tf.data iterator in the loop's thread;
- `stream, host_prefetch=2`: the same, with a background thread reading ahead.
The streamed loop dispatches chunk i, then reads and places chunk i + 1, then waits for
chunk i's metrics (the order a trainer would use). Also times `batches()` alone (a
consecutive call, and a re-open mid-epoch as on resume). Expected runtime: about a minute.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import jax

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bn_research import config_lib, step, train  # noqa: E402
from bn_research.data import stream  # noqa: E402


def _config():
    config = config_lib.from_file(ROOT / "configs" / "mlp.py")
    config.unlock()
    for name in config.probes:
        config.probes[name].enabled = False
    return config


def _copy(state):
    """A fresh copy: the chunk donates its state argument."""
    return jax.tree_util.tree_map(lambda a: a.copy(), state)


def _device(s, steps, k):
    chunk = jax.jit(s["fns"].train_chunk, static_argnums=2, donate_argnums=0)
    state, d = _copy(s["state"]), s["data"]["train"]
    jax.block_until_ready(chunk(_copy(state), d, k))  # compile
    start = time.perf_counter()
    for _ in range(steps // k):
        state, metrics = chunk(state, d, k)
        jax.device_get(metrics)
    return steps / (time.perf_counter() - start)


def _streamed(config, s, steps, k, host_prefetch):
    fns = step.make_step_fns(s["graphdef"], s["tx"], task=s["dataset"].task,
                             batch_size=config.train.batch_size,
                             eval_batch_size=config.train.eval_batch_size, streaming=True)
    chunk = jax.jit(fns.train_chunk, static_argnums=2, donate_argnums=0)
    with stream.Stream(config.dataset, batch_size=config.train.batch_size, seed=config.seed,
                       host_prefetch=host_prefetch) as src:
        nxt = stream.to_device(src.batches(0, k))
        jax.block_until_ready(chunk(_copy(s["state"]), nxt, k))  # compile
        state, at = _copy(s["state"]), 0
        start = time.perf_counter()
        for _ in range(steps // k):
            state, metrics = chunk(state, nxt, k)
            at += k
            nxt = stream.to_device(src.batches(at, k))
            jax.device_get(metrics)
        return steps / (time.perf_counter() - start)


def _read_only(config, k):
    with stream.Stream(config.dataset, batch_size=config.train.batch_size, seed=config.seed,
                       host_prefetch=0) as src:
        t0 = time.perf_counter()
        src.batches(0, k)
        first = time.perf_counter() - t0
        t0 = time.perf_counter()
        for i in range(1, 6):
            src.batches(i * k, k)
        consecutive = (time.perf_counter() - t0) / 5
        mid = src.steps_per_epoch * 3 + src.steps_per_epoch // 2
        t0 = time.perf_counter()
        src.batches(mid, k)
        reopen = time.perf_counter() - t0
    return {"first_chunk_s": first, "consecutive_chunk_s": consecutive, "reopen_mid_epoch_s": reopen}


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--chunk", type=int, default=100)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "stream_input.json"))
    a = p.parse_args(argv)
    config = _config()
    s = train.setup(config, single_device=True)
    results = {
        "config": "configs/mlp.py (mnist_digits, batch 60, probes off)", "steps": a.steps, "chunk": a.chunk,
        "device": jax.devices()[0].device_kind, "cores": __import__("os").cpu_count(),
        "read_only": _read_only(config, a.chunk),
        "steps_per_s": {
            "device": _device(s, a.steps, a.chunk),
            "stream, host_prefetch=0": _streamed(config, s, a.steps, a.chunk, 0),
            "stream, host_prefetch=2": _streamed(config, s, a.steps, a.chunk, 2),
        },
    }
    Path(a.out).write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
