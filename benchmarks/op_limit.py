"""A training step's own matrix multiplications and convolutions, run alone: the limit.

`collect(fn, *args)` traces `fn` (`jax.make_jaxpr`), drops the equations whose results
are never used (JAX's dead-code elimination, as XLA would), and walks the jaxpr and every
sub-jaxpr (pjit, scan, while, cond, custom_jvp/custom_vjp/custom_vmap calls, ...) for the
`dot_general` and `conv_general_dilated` equations (and the package's oneDNN convolution
FFI calls, `onednn_conv`), each with its operand shapes and
dtypes and its exact parameters. A scan body counts `length` times; a `while` body once
(its trip count is unknown when tracing); of a `cond` the branch with the most FLOPs.

`program(ops, iters)` builds one jitted function that runs exactly those operations,
`iters` times in a `fori_loop`, each on its own random operands of the traced shapes
(so XLA cannot merge two of them), each result reduced to a scalar and added to a
running total (so none can be dropped, and none feeds the next). The operands go through
`lax.optimization_barrier` together with the loop's total on every iteration, so XLA
cannot hoist the operations out of the loop either. `hlo_counts` reads the compiled
program back to check that the operations are all still there.
"""

from __future__ import annotations

import dataclasses
import math
import re

import jax
import jax.numpy as jnp
import numpy as np

from bn_research import onednn

PRIMITIVES = ("dot_general", "conv_general_dilated", "onednn_conv")
# the package's oneDNN convolutions (`bn_research/onednn.py`): FFI calls, counted as convolutions
ONEDNN_CONV_TARGETS = onednn.CONV_TARGETS


@dataclasses.dataclass
class Op:
    primitive: object  # the jax Primitive, bound again with `params`
    shapes: tuple  # operand shapes
    dtypes: tuple  # operand dtypes
    params: dict
    count: int = 1  # times one step runs it (scan length)

    @property
    def name(self):
        return "onednn_conv" if self.primitive.name == "ffi_call" else self.primitive.name

    def flops(self) -> float:
        """2 x multiply-adds of one run (the output size times the contracted size)."""
        lhs, rhs = self.shapes
        if self.name == "onednn_conv":  # x [..., N, H, W, Ci] with w [..., KH, KW, Ci, Co] or dy [..., Co]
            out = tuple(self.params["result_avals"][0].shape)
            kh, kw, co = (rhs[-4], rhs[-3], rhs[-1]) if self.params["target_name"].endswith("forward") else \
                (out[-4], out[-3], out[-1])
            return 2.0 * math.prod(lhs) * kh * kw * co
        if self.name == "dot_general":
            (lc, _), (lb, _) = self.params["dimension_numbers"]
            batch = math.prod(lhs[d] for d in lb)
            contract = math.prod(lhs[d] for d in lc)
            rest_l = math.prod(lhs) // max(1, batch * contract)
            rest_r = math.prod(rhs) // max(1, batch * contract)
            return 2.0 * batch * contract * rest_l * rest_r
        dn = self.params["dimension_numbers"]
        out = jax.eval_shape(lambda a, b: self.primitive.bind(a, b, **self.params),
                             *(jax.ShapeDtypeStruct(s, d) for s, d in zip(self.shapes, self.dtypes, strict=True)))
        kernel_in = rhs[dn.rhs_spec[1]]
        window = math.prod(rhs[d] for d in dn.rhs_spec[2:])
        return 2.0 * math.prod(out.shape) * kernel_in * window

    def describe(self) -> str:
        shapes = " x ".join("x".join(map(str, s)) for s in self.shapes)
        return f"{self.name} {shapes} {self.dtypes[0]}"


@dataclasses.dataclass
class Collected:
    ops: list
    eqns_dead: int  # equations that dead-code elimination removed before collecting
    notes: list  # anything that makes the count approximate (while loops, cond branches)

    def counts(self) -> dict:
        out = dict.fromkeys(PRIMITIVES, 0)
        for op in self.ops:
            out[op.name] += op.count
        return out

    def flops(self) -> float:
        return sum(op.flops() * op.count for op in self.ops)


def _dce(closed):
    """Dead-code elimination of the top-level jaxpr (recursing where JAX has DCE rules);
    returns (jaxpr, number of top-level equations dropped). JAX-internal API: on failure the
    jaxpr is used as traced."""
    try:
        from jax._src.interpreters import partial_eval as pe

        jaxpr = closed.jaxpr
        new, _ = pe.dce_jaxpr(jaxpr, [True] * len(jaxpr.outvars), instantiate=True)
        return new, len(jaxpr.eqns) - len(new.eqns)
    except Exception:  # noqa: BLE001 - an optimisation of the count, never required
        return closed.jaxpr, 0


def _sub_jaxprs(value):
    from jax.extend import core

    for v in value if isinstance(value, (tuple, list)) else (value,):
        if isinstance(v, core.ClosedJaxpr):
            yield v.jaxpr
        elif isinstance(v, core.Jaxpr):
            yield v


def _walk(jaxpr, mult: int, notes: list) -> list:
    ops = []
    for e in jaxpr.eqns:
        name = e.primitive.name
        if name in PRIMITIVES or (name == "ffi_call" and e.params.get("target_name") in ONEDNN_CONV_TARGETS):
            ops.append(Op(e.primitive, tuple(tuple(v.aval.shape) for v in e.invars),
                          tuple(np.dtype(v.aval.dtype) for v in e.invars), dict(e.params), mult))
            continue
        if name == "scan":
            ops += _walk(e.params["jaxpr"].jaxpr, mult * int(e.params["length"]), notes)
        elif name == "cond":
            branches = [_walk(b.jaxpr, mult, notes) for b in e.params["branches"]]
            if any(branches):
                best = max(branches, key=lambda b: sum(o.flops() * o.count for o in b))
                if len(branches) > 1:
                    notes.append(f"cond with {len(branches)} branches: the costliest one counted")
                ops += best
        else:
            if name == "while" and any(_walk(j, mult, []) for j in _sub_jaxprs(e.params.get("body_jaxpr"))):
                notes.append("while loop body counted once (trip count unknown when tracing)")
            for value in e.params.values():
                for sub in _sub_jaxprs(value):
                    ops += _walk(sub, mult, notes)
    return ops


def collect(fn, *args) -> Collected:
    closed = jax.make_jaxpr(fn)(*args)
    jaxpr, dead = _dce(closed)
    notes = []
    ops = _walk(jaxpr, 1, notes)
    return Collected(ops, dead, sorted(set(notes)))


def _operand(rng, shape, dtype):
    dtype = np.dtype(dtype)
    if np.issubdtype(dtype, np.floating) or np.issubdtype(dtype, np.complexfloating):
        return jnp.asarray(rng.standard_normal(shape, dtype=np.float32).astype(dtype))
    if dtype == np.bool_:
        return jnp.asarray(rng.integers(0, 2, shape).astype(bool))
    return jnp.asarray(rng.integers(-3, 4, shape).astype(dtype))


def program(ops, iters: int, seed: int = 0):
    """(jitted fn, operands): `fn(operands)` runs every op `count` times per iteration, for
    `iters` iterations, and returns the float32 total of their results."""
    rng = np.random.default_rng(seed)
    runs = [op for op in ops for _ in range(op.count)]
    operands = [tuple(_operand(rng, s, d) for s, d in zip(op.shapes, op.dtypes, strict=True)) for op in runs]

    def body(_, carry):
        xs, total = jax.lax.optimization_barrier(carry)
        for op, args in zip(runs, xs, strict=True):
            out = op.primitive.bind(*args, **op.params)
            out = out[0] if op.primitive.multiple_results else out  # an FFI call returns a list
            total = total + jnp.sum(out).astype(jnp.float32)
        return xs, total

    @jax.jit
    def fn(xs):
        return jax.lax.fori_loop(0, iters, body, (xs, jnp.zeros((), jnp.float32)))[1]

    return fn, operands


def hlo_counts(compiled) -> dict:
    """Matmul-like and convolution instructions in the optimized HLO of a compiled program,
    e.g. `fn.lower(operands).compile()` (XLA:CPU may turn a dot into a oneDNN/Eigen custom
    call: counted as a dot)."""
    text = compiled.as_text()
    dots = len(re.findall(r"= [^=\n]*\bdot\(", text))
    convs = len(re.findall(r"= [^=\n]*\bconvolution\(", text))
    custom = re.findall(r'custom_call_target="([^"]+)"', text)
    dots += sum(1 for t in custom if "matmul" in t.lower() or "gemm" in t.lower())
    convs += sum(1 for t in custom if "conv" in t.lower() or t in ONEDNN_CONV_TARGETS)
    return {"dot": dots, "conv": convs}
