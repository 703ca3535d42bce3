"""Worker of tests/test_mesh.py, run in a subprocess whose XLA_FLAGS set the number of
simulated CPU devices: `python tests/_mesh_worker.py TASK OUT_DIR` prints one JSON line."""

import json
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from bn_research import checkpoint, rundir, train  # noqa: E402
from tests.conftest import load_config  # noqa: E402


def config(**over):
    c = load_config("mlp", "norm=batch,width=32")
    c.train.num_steps, c.train.log_every, c.train.eval_every = 40, 10, 20
    c.train.checkpoint_every, c.train.keep_checkpoints = 20, 3
    c.train.batch_size = 64
    for name in c.probes:  # the probes add compile time, not coverage of the mesh
        c.probes[name].enabled = False
    c.update_from_flattened_dict(over)
    return c


def params_of(workdir, c):
    s = train.setup(c)
    ck = checkpoint.Checkpointer(workdir, 3)
    step, state, _ = ck.restore_latest(s["state"])
    ck.close()
    leaves = jax.tree_util.tree_leaves(jax.device_get(state["params"]))
    return step, np.concatenate([np.ravel(x) for x in leaves]).tolist()


def run(c, w):
    summary = train.train_and_evaluate(c, w, overwrite=True)
    return {"summary": {k: summary.get(k) for k in ("status", "step", "mesh", "num_devices", "final")},
            "params": params_of(w, c)[1]}


def main(task, out):
    out = Path(out)
    res = {"devices": jax.device_count()}
    if task == "four":
        res["global"] = run(config(), out / "global")  # mesh.data = 0: every device
        res["per_device"] = run(config(**{"norm.stats": "per_device"}), out / "per_device")
        # a run stopped at its step-20 checkpoint, to be resumed on 4 devices and on 1
        for name in ("resume4", "resume1"):
            w = out / name
            shutil.copytree(out / "global", w)
            shutil.rmtree(w / "checkpoints" / "40")
            (w / rundir.SUMMARY).unlink()
        res["resume4"] = run_resume(config(), out / "resume4")
    elif task == "cnn":  # the CPU's native kernels (oneDNN convolutions, percentiles) on a mesh
        c = load_config("cnn", "norm=batch,width=8")
        c.train.num_steps, c.train.log_every, c.train.eval_every, c.train.batch_size = 20, 10, 20, 32
        for data in (4, 1):
            c.mesh.data = data
            summary = train.train_and_evaluate(c, out / f"cnn{data}", overwrite=True)
            res[f"cnn{data}"] = {k: summary.get(k) for k in ("status", "mesh", "kernels", "final")}
            with open(out / f"cnn{data}" / rundir.METRICS) as f:
                res[f"cnn{data}"]["first_row"] = json.loads(f.readline())
    elif task == "one":
        res["global"] = run(config(**{"mesh.data": 1}), out / "global1")
        res["virtual"] = run(config(**{"norm.stats": "virtual", "norm.virtual_batch_size": 16, "mesh.data": 1}),
                             out / "virtual1")
        res["resume1"] = run_resume(config(), out / "resume1")
    print(json.dumps(res))


def run_resume(c, w):
    summary = train.train_and_evaluate(c, w)
    return {"summary": {k: summary.get(k) for k in ("status", "step", "mesh", "num_devices", "final", "resumed_at")},
            "params": params_of(w, c)[1]}


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
