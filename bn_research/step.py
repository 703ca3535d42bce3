"""The functional core: pure train / eval steps and the K-steps-per-dispatch scan.

All mutable training state lives in one pytree, `TrainState`:

    {"params": nnx.State, "batch_stats": nnx.State, "opt_state": optax state,
     "step": int32[], "rng": key}

The model is split once (`nnx.split(model, nnx.Param, nnx.BatchStat)`); every function
here takes the static `graphdef` by closure and merges inside the traced function, so the
loop never uses `nnx.jit`. Batches are drawn inside jit from the device-resident dataset
by an on-device permutation per epoch (drawn once per chunk for every epoch the chunk
touches, not once per step); per-step keys come from `jax.random.fold_in`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from bn_research import kernels

TrainState = dict[str, Any]

# Per-step metrics every run returns; probes add namespaced keys ("dist/dense_0/...", "ics/dense_0/...").
BASE_METRICS = ("loss", "accuracy", "grad_norm")

# Stream tags folded into the seed key so that data order and noise never share keys.
DATA_STREAM, NOISE_STREAM = 1, 2


def init_state(model: nnx.Module, tx: optax.GradientTransformation, seed: int):
    """Split `model` and build the initial TrainState; returns (graphdef, state)."""
    graphdef, params, batch_stats = nnx.split(model, nnx.Param, nnx.BatchStat)
    state = {
        "params": params,
        "batch_stats": batch_stats,
        "opt_state": tx.init(params),
        "step": jnp.zeros((), jnp.int32),
        "rng": jax.random.key_data(jax.random.key(seed)),
        "probes": {},
    }
    return graphdef, state


def forward(graphdef, params, batch_stats, x, *, train: bool, rng=None):
    """Model output, per-layer aux and the updated batch statistics."""
    model = nnx.merge(graphdef, params, batch_stats, copy=True)
    out, aux = model(x, train=train, rng=rng)
    return out, aux, nnx.state(model, nnx.BatchStat)


def loss_and_metrics(task: str, out, y):
    """Mean loss over the batch and per-batch metrics.

    classification: softmax cross-entropy (and accuracy); regression: 0.5 * squared error
    summed over outputs, averaged over examples.
    """
    if task == "classification":
        loss = optax.softmax_cross_entropy_with_integer_labels(out, y).mean()
        acc = jnp.mean(jnp.argmax(out, -1) == y)
        return loss, {"loss": loss, "accuracy": acc}
    loss = 0.5 * jnp.sum(jnp.square(out - y), -1).mean()
    return loss, {"loss": loss}


def get_batch(data, step, key, batch_size: int):
    """Batch number `step` of an epoch-wise shuffled pass over `data` (drop remainder).

    Epoch e visits the examples in the order `kernels.epoch_permutation(key, e, n)`; everything
    runs on device. `train_chunk` draws each epoch's permutation once per chunk instead.
    """
    n = data["x"].shape[0]
    steps_per_epoch = n // batch_size
    epoch, pos = step // steps_per_epoch, step % steps_per_epoch
    perm = kernels.epoch_permutation(key, epoch, n)
    idx = jax.lax.dynamic_slice(perm, (pos * batch_size,), (batch_size,))
    return {"x": data["x"][idx], "y": data["y"][idx]}


def chunk_batches(data, start, key, batch_size: int, num_steps: int):
    """`batch(step)` for steps start .. start + num_steps - 1, same batches as `get_batch`,
    with the permutation of every epoch the chunk touches drawn once, up front."""
    n = data["x"].shape[0]
    steps_per_epoch = n // batch_size
    touched = min((num_steps - 1) // steps_per_epoch + 2, num_steps)  # static bound
    first = start // steps_per_epoch
    perms = jnp.stack([kernels.epoch_permutation(key, first + j, n) for j in range(touched)])

    def batch(step):
        epoch, pos = step // steps_per_epoch - first, step % steps_per_epoch
        idx = jax.lax.dynamic_slice(perms, (epoch, pos * batch_size), (1, batch_size))[0]
        return {"x": data["x"][idx], "y": data["y"][idx]}

    return batch


def step_keys(state):
    """(data key, per-step noise key) for the state's current step."""
    root = jax.random.wrap_key_data(state["rng"])
    data_key = jax.random.fold_in(root, DATA_STREAM)
    noise_key = jax.random.fold_in(jax.random.fold_in(root, NOISE_STREAM), state["step"])
    return data_key, noise_key


@dataclasses.dataclass(frozen=True)
class StepFns:
    """Pure functions of one run, closed over its static graphdef and config."""

    train_step: Callable  # (state, data) -> (state, metrics); one step
    train_chunk: Callable  # (state, data or streamed batches [K, B, ...], num_steps, phase (static: start % period))
    #                        -> (state, metrics [K])
    evaluate: Callable  # (params, batch_stats, data) -> metrics
    probe_layout: Callable  # (state, batch) -> {(probe, kind): [(key, size)]}, for probes.Recorder
    probe_period: int = 0  # chunks starting at step s take phase = s % probe_period (0: none)

    def phase(self, start: int) -> int:
        """The static `phase` of `train_chunk` for a chunk starting at step `start`."""
        return int(start) % self.probe_period if self.probe_period else 0


def make_step_fns(graphdef, tx, *, task: str, batch_size: int, eval_batch_size: int,
                  probe_fn: Callable | None = None, batch_sharding=None,
                  streaming: bool = False) -> StepFns:
    """Build the pure step functions (not yet jitted).

    `streaming=True` makes `train_chunk(state, batches, num_steps)` scan over batches the
    host already drew (`batches["x"]`: [num_steps, batch, ...], e.g. from
    bn_research.data.stream) instead of gathering them from a device-resident dataset;
    the step itself (keys, probes, batch sharding) is the same.

    `batch_sharding` (a `NamedSharding`, see bn_research.mesh) constrains every training
    batch, gathered inside jit, to be split over the devices of a mesh; None on one device.

    `probe_fn(ctx) -> (metrics, probe_state)` may add measurements to every step's
    metrics and carry its own state in `state["probes"]`; `ctx` holds the state before
    the step, the batch, the gradients, the aux, the updates, the new params and stats,
    the step's noise key and `loss_fn(params, batch_stats, batch, rng)`.
    """

    def loss_fn(params, batch_stats, batch, rng):
        out, aux, new_stats = forward(graphdef, params, batch_stats, batch["x"], train=True,
                                      rng=rng)
        loss, metrics = loss_and_metrics(task, out, batch["y"])
        return loss, (new_stats, metrics, aux)

    def update(state, batch, noise_key):
        """(new state, metrics, the probes' ctx) of one step, before the probes."""
        grads, (new_stats, metrics, aux) = jax.grad(loss_fn, has_aux=True)(
            state["params"], state["batch_stats"], batch, noise_key
        )
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        metrics = dict(metrics, grad_norm=kernels.global_norm(grads))
        new_state = dict(state, params=params, batch_stats=new_stats, opt_state=opt_state,
                         step=state["step"] + 1)
        ctx = {"state": state, "batch": batch, "grads": grads, "aux": aux,
               "updates": updates, "params": params, "batch_stats": new_stats,
               "noise_key": noise_key, "loss_fn": loss_fn}
        return new_state, metrics, ctx

    def step_on(state, batch, noise_key, periodic: bool = True):
        new_state, metrics, ctx = update(state, batch, noise_key)
        if probe_fn is not None:
            probe_metrics, new_state["probes"] = probe_fn(ctx, periodic)
            metrics.update(probe_metrics)
        return new_state, metrics

    def run_chunk(state, batch_at, num_steps: int, phase: int):
        """`num_steps` steps from `state`, `batch_at(carry, position)` the batch of each.

        Without periodic probes: one scan of the step. With them, the probe steps (position
        0 and every position whose row number is a multiple of the probes' period) run the
        step with the periodic parts, each under its cadence's `lax.cond`, and the runs of
        steps between them the plain step, in a `fori_loop` of their length: both are traced
        once, and no step between probe steps pays for a conditional. `phase` must be the
        start step modulo the period (the loop passes it; 0 for chunks starting at 0)."""
        def one(carry, pos, periodic):
            return step_on(carry, place(batch_at(carry, pos)), step_keys(carry)[1], periodic)

        g = probe_fn.period if probe_fn is not None else 0
        if g <= 1:  # every step runs every part that is on
            return jax.lax.scan(lambda c, pos: one(c, pos, True), state, jnp.arange(num_steps))
        marks = sorted({0} | {p for p in range(num_steps) if (phase + p + 1) % g == 0})
        runs = [b - a - 1 for a, b in zip(marks, [*marks[1:], num_steps], strict=True)]
        per_step = jax.eval_shape(lambda c: one(c, 0, False)[1], state)
        buf = jax.tree_util.tree_map(lambda a: jnp.zeros((num_steps,) + a.shape, a.dtype), per_step)

        def put(buf, metrics, pos):
            return jax.tree_util.tree_map(lambda b, v: jax.lax.dynamic_update_index_in_dim(b, v, pos, 0),
                                          buf, {k: metrics[k] for k in buf})

        def segment(carry, mark):
            st, buf = carry
            pos, run = mark
            st, m = one(st, pos, True)
            buf = put(buf, m, pos)

            def plain(i, c):
                st, m = one(c[0], pos + 1 + i, False)
                return st, put(c[1], m, pos + 1 + i)

            st, buf = jax.lax.fori_loop(0, run, plain, (st, buf))
            return (st, buf), {k: v for k, v in m.items() if k not in buf}

        (state, buf), marked = jax.lax.scan(segment, (state, buf), (jnp.asarray(marks), jnp.asarray(runs)))
        idx = np.asarray(marks)
        spread = {k: jnp.zeros((num_steps,) + v.shape[1:], v.dtype).at[idx].set(v) for k, v in marked.items()}
        return state, dict(buf, **spread)

    def probe_layout(state, batch) -> dict:
        """How the probes' packed outputs unpack (`ProbeFn.layout`), from the abstract
        shapes of one step (`jax.eval_shape`: traced, never compiled or run); {} without
        probes. `batch` may be `jax.ShapeDtypeStruct`s."""
        if probe_fn is None:
            return {}

        def results(state, batch):
            return probe_fn.measure(update(state, batch, step_keys(state)[1])[2])[0]

        return probe_fn.layout(jax.eval_shape(results, state, batch))

    def place(batch):
        if batch_sharding is None:
            return batch
        return jax.lax.with_sharding_constraint(batch, batch_sharding)

    def train_step(state, data):
        data_key, noise_key = step_keys(state)
        return step_on(state, place(get_batch(data, state["step"], data_key, batch_size)), noise_key)

    def train_chunk(state, data, num_steps: int, phase: int = 0):
        batch = chunk_batches(data, state["step"], step_keys(state)[0], batch_size, num_steps)
        return run_chunk(state, lambda carry, pos: batch(carry["step"]), num_steps, phase)

    def train_chunk_streamed(state, batches, num_steps: int, phase: int = 0):
        def batch_at(carry, pos):
            return jax.tree_util.tree_map(lambda b: jax.lax.dynamic_index_in_dim(b, pos, keepdims=False), batches)

        return run_chunk(state, batch_at, num_steps, phase)

    if streaming:
        train_chunk = train_chunk_streamed

    def evaluate(params, batch_stats, data):
        n = data["x"].shape[0]
        eb = min(eval_batch_size, n)
        nb = -(-n // eb)
        pad = nb * eb - n
        xs = jnp.concatenate([data["x"], data["x"][:pad]]).reshape((nb, eb) + data["x"].shape[1:])
        ys = jnp.concatenate([data["y"], data["y"][:pad]]).reshape((nb, eb) + data["y"].shape[1:])
        mask = (jnp.arange(nb * eb) < n).reshape(nb, eb)

        def one(args):
            x, y, m = args
            out, _, _ = forward(graphdef, params, batch_stats, x, train=False)
            if task == "classification":
                losses = optax.softmax_cross_entropy_with_integer_labels(out, y)
                correct = (jnp.argmax(out, -1) == y).astype(jnp.float32)
                return jnp.sum(losses * m), jnp.sum(correct * m)
            losses = 0.5 * jnp.sum(jnp.square(out - y), -1)
            return jnp.sum(losses * m), jnp.zeros(())

        loss_sum, correct_sum = jax.lax.map(one, (xs, ys, mask))
        metrics = {"loss": loss_sum.sum() / n}
        if task == "classification":
            metrics["accuracy"] = correct_sum.sum() / n
        return metrics

    return StepFns(train_step=train_step, train_chunk=train_chunk, evaluate=evaluate,
                   probe_layout=probe_layout, probe_period=probe_fn.period if probe_fn is not None else 0)


def jit_fns(fns: StepFns, out_sharding=None):
    """Jitted versions: the chunk donates the incoming state (argument 0). With a mesh,
    `out_sharding` (replicated) keeps the state and the metrics replicated across steps."""
    if out_sharding is None:
        return jax.jit(fns.train_chunk, static_argnums=(2, 3), donate_argnums=0), jax.jit(fns.evaluate)
    chunk = jax.jit(fns.train_chunk, static_argnums=(2, 3), donate_argnums=0, out_shardings=out_sharding)
    return chunk, jax.jit(fns.evaluate, out_shardings=out_sharding)
