"""oneDNN's convolutions inside jitted programs on XLA:CPU, through XLA's FFI.

XLA:CPU runs one CNN training step on about one of the machine's cores, and its
convolution kernel gradients are slow at this project's shapes (16-32 channels, 28x28 and
14x14 images); oneDNN's (the library behind PyTorch's CPU convolutions) use every core.
`native/onednn_conv.cc` wraps oneDNN's forward and kernel-gradient convolutions (stride
1, 'SAME', NHWC x HWIO, float32) as two FFI handlers; the input gradient is the forward
convolution with the flipped kernel (`kernels._differentiable_conv`). Under `jax.vmap`
every operand carries the replica axis and one call runs the replicas one after another
(`vmap_method="broadcast_all"`), so vmapped replicas need no per-replica slices. It is
compiled on first use with the machine's C++ compiler against the headers of the pinned
`onednn-devel-cpu-gomp` package and JAX's FFI headers, and cached per environment
(`$BN_RESEARCH_CACHE`, else `$XDG_CACHE_HOME/bn_research`, else `~/.cache/bn_research`).

Nothing happens at import. `available()` builds, loads and registers the handlers once
per process (a few seconds the first time on a machine, then a cache hit), and says False
with `reason()` when any step fails (no wheel for the platform, no compiler, an unwritable
cache), in which case `kernels.kind()` falls back to 'cpu' (XLA rewrites only).
`bn_research/kernels.py` decides which convolutions use these functions;
tests/test_kernels.py checks them against XLA's.

    conv_forward(x, w)              y = x (*) w
    conv_kernel_grad(x, dy, kh, kw) dw of the forward's cotangent dy
    order_statistics(a, ranks)      exact per-column order statistics (not oneDNN: the
                                    same library; used by the drift probe's percentiles)
    implementation(kind, x_shape, w_shape)  the oneDNN implementation chosen, e.g.
                                    'brgconv:avx512_core'
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import importlib.metadata
import importlib.resources
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile

import jax
import numpy as np

SOURCE = "native/onednn_conv.cc"
RUNTIME, HEADERS = "onednn-cpu-gomp", "onednn-devel-cpu-gomp"
HANDLERS = {"forward": "BnConvForward", "kernel_grad": "BnConvKernelGrad", "order_statistics": "BnOrderStatistics"}
CONV_KINDS = ("forward", "kernel_grad")  # the convolution handlers' kind numbers in the C++ source (0, 1)


def target_name(kind: str) -> str:
    """The FFI target registered for a handler of HANDLERS."""
    return f"bn_research_{kind}"


CONV_TARGETS = tuple(target_name(k) for k in CONV_KINDS)


def available() -> bool:
    """True once the handlers are built, loaded and registered with XLA:CPU."""
    return _load()[0] is not None


def reason() -> str:
    """Why `available()` is False ('' when it is True)."""
    return _load()[1]


def conv_forward(x, w):
    out = jax.ShapeDtypeStruct(x.shape[:-1] + w.shape[-1:], x.dtype)
    return jax.ffi.ffi_call(_target("forward"), out, vmap_method="broadcast_all")(x, w)


def conv_kernel_grad(x, dy, kh: int, kw: int):
    out = jax.ShapeDtypeStruct((kh, kw, x.shape[-1], dy.shape[-1]), x.dtype)
    return jax.ffi.ffi_call(_target("kernel_grad"), out, vmap_method="broadcast_all")(x, dy)


def order_statistics(a, ranks):
    """([K, U], [K, U]): the ranks[k]-th and (ranks[k] + 1)-th smallest values (0-based;
    the last value when ranks[k] + 1 = N) of every column of a float32 [N, U] array, in
    the order of the float32 bit patterns (-0 < +0), exactly as
    `probes.drift.order_statistics` with `successors=True`; `ranks` increasing."""
    k, u = len(ranks), a.shape[-1]
    out = jax.ShapeDtypeStruct(a.shape[:-2] + (k, u), a.dtype)
    call = jax.ffi.ffi_call(_target("order_statistics"), (out, out), vmap_method="broadcast_all")
    return call(a, ranks=np.asarray(ranks, np.int32))


def implementation(kind: str, x_shape, w_shape) -> str:
    """The oneDNN implementation used for `kind` ('forward' or 'kernel_grad') at these shapes."""
    lib = _load()[0]
    if lib is None:
        return ""
    n, h, w, ci = x_shape
    kh, kw, _, co = w_shape
    return lib.bn_conv_impl(CONV_KINDS.index(kind), n, h, w, ci, co, kh, kw).decode()


def _target(kind: str) -> str:
    if not available():
        raise RuntimeError(f"oneDNN convolutions are unavailable: {reason()}")
    return target_name(kind)


def cache_dir() -> pathlib.Path:
    if os.environ.get("BN_RESEARCH_CACHE"):
        return pathlib.Path(os.environ["BN_RESEARCH_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return pathlib.Path(base) / "bn_research"


def _installed_file(dist: str, name: str) -> pathlib.Path:
    try:
        files = importlib.metadata.files(dist) or []
    except importlib.metadata.PackageNotFoundError:
        raise FileNotFoundError(f"package {dist} is not installed (pip install -e .)") from None
    for f in files:
        if str(f).endswith(name):
            return pathlib.Path(f.locate()).resolve()
    raise FileNotFoundError(f"package {dist} has no {name}")


def _build() -> pathlib.Path:
    """The handlers' shared library: from the cache, or compiled into it."""
    if not (sys.platform.startswith("linux") and os.uname().machine == "x86_64"):
        raise OSError(f"the oneDNN wheels are pinned for Linux x86_64 only (this is {sys.platform} "
                      f"{os.uname().machine})")
    header = _installed_file(HEADERS, "oneapi/dnnl/dnnl.hpp")
    library = _installed_file(RUNTIME, "libdnnl.so.3")
    compiler = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if not compiler:
        raise OSError("no C++ compiler on PATH (install g++, or set CXX)")
    source = importlib.resources.files("bn_research").joinpath(SOURCE).read_bytes()
    include = [str(header.parents[2]), jax.ffi.include_dir()]
    command = [compiler, "-O2", "-std=c++17", "-fPIC", "-shared", "-fopenmp", "-w", *(f"-I{d}" for d in include),
               "-x", "c++", "-", "-x", "none", str(library), f"-Wl,-rpath,{library.parent}"]
    digest = hashlib.sha256(source + "\0".join(command).encode() + jax.__version__.encode()).hexdigest()[:16]
    target = cache_dir() / f"onednn_conv-{digest}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        done = subprocess.run([*command, "-o", tmp], input=source, capture_output=True, timeout=600)
        if done.returncode != 0:
            last = done.stderr.decode(errors="replace").strip().splitlines()[-1:] or ["(no output)"]
            raise OSError(f"compiling {SOURCE} failed: {last[0]}")
        os.replace(tmp, target)  # atomic: concurrent builders leave one complete file
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return target


@functools.cache
def _load() -> tuple[ctypes.CDLL | None, str]:
    try:
        lib = ctypes.CDLL(str(_build()))
    except (OSError, FileNotFoundError, subprocess.TimeoutExpired) as e:
        return None, str(e)
    lib.bn_conv_impl.restype = ctypes.c_char_p
    lib.bn_conv_impl.argtypes = [ctypes.c_int] + [ctypes.c_int64] * 7
    for kind, symbol in HANDLERS.items():
        jax.ffi.register_ffi_target(target_name(kind), jax.ffi.pycapsule(getattr(lib, symbol)), platform="cpu")
    return lib, ""
