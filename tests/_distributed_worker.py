"""Worker of tests/test_distributed.py: `python tests/_distributed_worker.py OUT_DIR NAME`.

Run once per process. With BN_RESEARCH_COORDINATOR_ADDRESS / _NUM_PROCESSES / _PROCESS_ID
set, the processes join one run over every process's devices; without them,
`distributed.initialize()` finds no cluster and the run stays single-process. Trains the
tiny MLP with the pure step functions (what bn_research.train's loop does, without its
run files), saves orbax checkpoints from every process into OUT_DIR/NAME/checkpoints,
restores the newest, and writes OUT_DIR/NAME_<process>.json.
"""

import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bn_research import distributed  # noqa: E402  (before anything starts JAX's backends)

INFO = distributed.initialize()

import jax  # noqa: E402
import numpy as np  # noqa: E402

from bn_research import checkpoint, config_lib, mesh, step, train  # noqa: E402
from tests.conftest import load_config  # noqa: E402

CHUNK, CHUNKS = 10, 3


def config():
    c = load_config("mlp", "norm=batch,width=32")
    c.train.num_steps, c.train.log_every, c.train.eval_every = CHUNK * CHUNKS, CHUNK, CHUNK
    c.train.batch_size = 64
    for name in c.probes:  # compile time, not coverage of the processes
        c.probes[name].enabled = False
    config_lib.validate(c)
    return c


def config_with(c, **over):
    c = c.copy_and_resolve_references()
    c.update_from_flattened_dict(over)
    return c


def flat(tree):
    return np.concatenate([np.ravel(x) for x in jax.tree_util.tree_leaves(tree)])


def main(out, name):
    t0 = time.time()
    out = Path(out)
    c = config()
    s = train.setup(c)
    m = s["mesh"]
    # What train.setup should do: place with mesh.replicate (works with one process or many).
    state, data = mesh.replicate(s["state"], m), mesh.replicate(s["data"], m)
    abstract = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
    chunk_fn, eval_fn = step.jit_fns(s["fns"], mesh.replicated(m) if m.size > 1 else None)
    ckpt = checkpoint.Checkpointer(out / name, keep=2)
    losses, evals = [], []
    for i in range(CHUNKS):
        state, metrics = chunk_fn(state, data["train"], CHUNK)
        end = (i + 1) * CHUNK
        host = mesh.fetch(metrics)
        losses.extend(np.asarray(host["loss"]).tolist())
        evals.append(mesh.fetch(eval_fn(state["params"], state["batch_stats"], data["test"])))
        ckpt.save(end, state, {"losses": losses})  # every process: orbax's save is collective
    ckpt.wait()
    final = jax.device_get(state)
    # A host-fed global batch of 8 rows, process i holding rows i*8/P..: shard_batch builds it,
    # a jitted function sees the whole batch, fetch gathers a sharded output.
    p, n = jax.process_index(), jax.process_count()
    rows = np.arange(8 * 3, dtype=np.float32).reshape(8, 3)
    batch = mesh.shard_batch(rows[p * 8 // n:(p + 1) * 8 // n], m)
    shardings = (mesh.batch_sharded(m), mesh.replicated(m))
    doubled, total = jax.jit(lambda b: (b * 2, b.sum()), out_shardings=shardings)(batch)
    fed = mesh.fetch({"doubled": doubled, "total": total})
    restored_step, restored, meta = ckpt.restore_latest(abstract)
    steps = ckpt.steps()
    ckpt.close()
    res = {
        "distributed": INFO,
        "mesh": mesh.describe(m),
        "spans_processes": mesh.spans_processes(m),
        "losses": losses,
        "eval": [{k: float(v) for k, v in e.items()} for e in evals],
        "params": flat(final["params"]).tolist(),
        "params_digest": checkpoint.state_digest(final["params"]),
        "state_digest": checkpoint.state_digest(final),
        "checkpoint_steps": steps,
        "restored_step": restored_step,
        "restored_digest": checkpoint.state_digest(jax.device_get(restored)),
        "restored_sharding": str(jax.tree_util.tree_leaves(restored)[0].sharding),
        "meta_losses": meta["losses"],
        "host_fed_batch": {"shape": list(batch.shape), "total": float(fed["total"]),
                           "doubled_ok": bool(np.array_equal(fed["doubled"], rows * 2))},
        "check_mesh_data_1": mesh.check(config_with(c, **{"mesh.data": 1})),
        "wall_s": time.time() - t0,
    }
    (out / f"{name}_{jax.process_index()}.json").write_text(json.dumps(res))


def train_run(out, name):
    """The whole trainer in every process: `train.train_and_evaluate` on one shared workdir."""
    c = config()
    c.train.checkpoint_every = CHUNK
    summary = train.train_and_evaluate(c, Path(out) / name)
    (Path(out) / f"{name}_{jax.process_index()}.json").write_text(json.dumps(summary))


if __name__ == "__main__":  # one launch serves both: the step functions, then the whole trainer
    main(sys.argv[1], sys.argv[2])
    train_run(sys.argv[1], f"train_{sys.argv[2]}")
