"""Time-integration engines for the multilayer dynamical network.

Both engines integrate the same coupled ODE system with explicit Euler, all layers updated
simultaneously from the state at the start of each step (the plain Euler method of the
whole network's ODE)::

    I_s     = C_t + Y_s @ Wr                      # drive of every neuron, all layers at once
    F_s     = -gamma X_s (1 + Q X_s) + I_s g(X_s) # g(x) = x(1-x) for the spintronic neuron
    X_{s+1} = X_s + h F_s                         # clipped to [0, 1] for the eq. 5.12 types
    Y_{s+1} = a Y_s + o(X_{s+1}) - o(X_s)         # high-pass filter (eq. 5), a = 1 - 2 pi f_cut h
    Y_{s+1} = o(X_{s+1})                          # ... or no filter

``C_t`` holds everything that does not depend on the state during input point ``t`` (input
weights times the scaled input, trainable and fixed biases, amplification ``S`` and drive
coefficient ``sigma``), ``Wr`` the block matrix of all intra-layer (diagonal blocks) and
inter-layer (sub-diagonal blocks) weights, already scaled. ``o`` is the identity, or tanh for
the CTRNN. With :attr:`Dynamics.layer_size` set, ``Wr`` is read as that layer band only
(layer ``l`` receives from layers ``l-1`` and ``l``): entries outside it are ignored and get
zero gradient, which is what the model's connection masks make them anyway.

:data:`ENGINES` maps the names of ``train.engine`` to them (:func:`get_engine`):

* ``reference``: :func:`scan_reference` is a straightforward autograd loop over time, sub-steps
  and layers. It is the correctness reference and the benchmark's baseline.
* ``fast``: :class:`EulerScan`: one call runs the whole time loop forward, one call
  runs its adjoint (hand-written backward). It has two back ends, chosen per call:

  - **native** (CPU, float32/float64): a small C++ kernel, ``engine_kernel.cpp`` beside this
    module, compiled on first use with the system C++ compiler (``CXX``; ``-O3
    -march=native``, plus ``HIL_CXXFLAGS``; a few seconds, cached under ``~/.cache/hil`` by
    compiler, flags, source and CPU; ``HIL_CACHE_DIR`` moves it, ``HIL_NATIVE=0`` or
    :func:`set_native` turns it off, ``HIL_REQUIRE_NATIVE=1`` makes a failed build an error
    instead of a fallback). It is called with one :class:`HilScanArgs`. Its work unit is a
    tile of 16 (float32) or 8 (float64) batch rows of one trial, integrated over the whole
    sequence with its state in L1 cache, every operation one SIMD vector across the rows.
    Tiles are independent, so trials and batch rows spread over ``torch.get_num_threads()``
    threads with no synchronisation inside the time loop. The drive product skips the zero
    blocks (layer band). The adjoint walks back block by block (16 sub-steps): it recomputes a
    block's sub-steps from checkpoints (the per-point states the forward returns anyway, and
    the filtered output at each block start) instead of storing every sub-step, and folds the
    block into the weight gradient with a register-blocked product. Weight-gradient partials
    are per tile and summed in a fixed order, so results do not depend on the thread count or
    on which trials run together. Workers run with flush-to-zero (subnormal values become 0;
    the caller's mode is restored): undriven spintronic neurons decay towards x = 0 and would
    otherwise spend most of the time in microcode assists (:func:`set_flush_subnormals`,
    ``benchmarks/bench_subnormals.py``). In float32, tanh (the CTRNN's output) is computed on
    whole vectors (a few ulp from libm).
  - **torch** (GPU, other dtypes, or no compiler): the same recursion as a few batched tensor
    operations per step, with pre-allocated buffers and a hand-written backward whose weight
    gradient is one batched product over all steps.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import os
import platform
import shlex
import shutil
import subprocess
import tempfile
import threading
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch.autograd.function import once_differentiable

from hil import config
from hil.errors import ConfigError
from sims.neurons import (
    CLIPPED_TYPES,
    HELD_DRIVE_TYPES,
    PSI_COEF,
    TANH_OUTPUT_TYPES,
    Z_CAP,
    Z_SERIES,
    drive_gain,
    drive_gain_derivative,
    held_drive_step,
)

if TYPE_CHECKING:
    from hil.runs import RunFolder

#: Integration schemes of a sub-step. ``euler``: explicit Euler of the whole network (first
#: order, stable only while drive x step < ~2). ``expheun``: exponential Heun (second order,
#: stable at any step): each neuron's own equation solved exactly at a drive held over the
#: sub-step, that drive the mean of the step's start and of a predicted end.
SCHEMES = ("euler", "expheun")
#: Neuron types with a closed-form step at held drive (logistic equation; linear ODE).
EXPHEUN_KINDS = HELD_DRIVE_TYPES
assert (SCHEMES, EXPHEUN_KINDS) == (config.SCHEMES, config.EXPHEUN_KINDS)


@dataclass(frozen=True)
class Dynamics:
    """Constants of the integration (tensors broadcast against ``(K, B, M)``)."""

    kind: str
    h: float  # Euler step (ns)
    substeps: int
    gamma: torch.Tensor  # (K, 1, M)
    q: torch.Tensor | None  # (K, 1, M) or None when Q = 0 everywhere
    a: torch.Tensor | None  # (K, 1, 1) filter decay per step, None: no filter
    layer_size: int | None = None  # N: Wr is the layer band (see module docstring); None: dense
    scheme: str = "euler"  # one of SCHEMES: how a sub-step is integrated (see module docstring)
    # expheun's filter: Y' = a Y + a_half (o(X') - o(X)); None: 1 (Euler's filter has no factor)
    a_half: torch.Tensor | None = None
    # (K, 1, 1) thermal floor D_th of the spintronic neuron (expheun only); None: none
    floor: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.scheme not in SCHEMES:
            raise ValueError(f"unknown integration scheme {self.scheme!r}; allowed: {', '.join(SCHEMES)}")
        if self.scheme == "expheun" and self.kind not in EXPHEUN_KINDS:
            raise ValueError(f"scheme 'expheun' is defined for {', '.join(EXPHEUN_KINDS)} neurons, "
                             f"not {self.kind!r}; use 'euler'")
        if self.floor is not None and self.kind != "spintronic":
            raise ValueError("a thermal floor is for spintronic neurons (the power's thermal drift)")

    @property
    def clipped(self) -> bool:
        return self.kind in CLIPPED_TYPES

    @property
    def tanh_out(self) -> bool:
        return self.kind in TANH_OUTPUT_TYPES


#: Neuron types whose drive gain g(x) is the constant 1 (:func:`sims.neurons.drive_gain`): the
#: engines skip the product with it and with its zero derivative.
CONSTANT_GAIN_KINDS = ("ctrnn", "linear")


def _gain(kind: str, x: torch.Tensor) -> torch.Tensor:
    """``g(x)`` of :func:`sims.neurons.drive_gain`; a constant gain as a tensor of ones (no
    dependence on ``x``)."""
    return torch.ones_like(x) if kind in CONSTANT_GAIN_KINDS else drive_gain(kind, x)


def _gain_dx(kind: str, x: torch.Tensor) -> torch.Tensor | None:
    """``g'(x)`` of :func:`sims.neurons.drive_gain_derivative`; None where it is 0."""
    return None if kind in CONSTANT_GAIN_KINDS else drive_gain_derivative(kind, x)


def _out(dyn: Dynamics, x: torch.Tensor) -> torch.Tensor:
    return torch.tanh(x) if dyn.tanh_out else x


def exact_step(dyn: Dynamics, x: torch.Tensor, D: torch.Tensor, grads: bool = False
               ) -> tuple[torch.Tensor, ...]:
    """One sub-step of each neuron's own equation solved exactly at the held drive ``D``
    (:func:`sims.neurons.held_drive_step`, the chip's definition); with ``grads`` also
    ``dx'/dx`` and ``dx'/dD``. The native kernel's ``phi`` computes the same formulas."""
    return held_drive_step(dyn.kind, x, D, dyn.gamma, dyn.h, dyn.q, torch, grads, dyn.floor)


def band_mask(M: int, layer_size: int | None, device: torch.device | None = None) -> torch.Tensor:
    """``(M_send, M_recv)`` bool: where ``Wr`` may be non-zero (all of it when ``layer_size``
    is None)."""
    if layer_size is None:
        return torch.ones(M, M, dtype=torch.bool, device=device)
    layer = torch.arange(M, device=device) // layer_size
    d = layer.view(1, M) - layer.view(M, 1)  # receiving layer minus sending layer
    return (d == 0) | (d == 1)


def scan_reference(
    C: torch.Tensor,
    Wr_blocks: list[list[torch.Tensor | None]],
    X0: list[torch.Tensor],
    Y0: list[torch.Tensor],
    dyn: Dynamics,
    layer_slices: list[slice],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Plain autograd loop: for each input point, each Euler sub-step, each layer.

    ``Wr_blocks[l][m]`` maps layer ``m``'s output to layer ``l``'s drive (``None`` when absent).
    Returns ``(Xseq (K,B,T,M), X_final, Y_final)`` like :class:`EulerScan`.
    """
    L = len(layer_slices)
    xs, ys = list(X0), list(Y0)
    T = C.shape[2]
    out = []

    def drives(t: int, yy: list[torch.Tensor]) -> list[torch.Tensor]:
        res = []
        for li, sl in enumerate(layer_slices):
            drive = C[:, :, t, sl]
            for m in range(L):
                w = Wr_blocks[li][m]
                if w is not None:
                    drive = drive + torch.bmm(yy[m], w)
            res.append(drive)
        return res

    def sub(dd: Dynamics, sl: slice) -> Dynamics:
        return Dynamics(dd.kind, dd.h, dd.substeps, dd.gamma[..., sl],
                        None if dd.q is None else dd.q[..., sl], dd.a, None, dd.scheme, dd.a_half,
                        dd.floor)

    def filt(y: torch.Tensor, xn: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        if dyn.a is None:
            return _out(dyn, xn)
        inc = _out(dyn, xn) - _out(dyn, x)
        return dyn.a * y + (inc if dyn.a_half is None else dyn.a_half * inc)

    if dyn.scheme == "expheun":
        subs = [sub(dyn, sl) for sl in layer_slices]
        for t in range(T):
            for _ in range(dyn.substeps):
                d0 = drives(t, ys)
                xp = [exact_step(subs[li], xs[li], d0[li])[0] for li in range(L)]
                yp = [filt(ys[li], xp[li], xs[li]) for li in range(L)]
                d1 = drives(t, yp)
                xn = [exact_step(subs[li], xs[li], 0.5 * (d0[li] + d1[li]))[0] for li in range(L)]
                ys = [filt(ys[li], xn[li], xs[li]) for li in range(L)]
                xs = xn
            out.append(torch.cat(xs, dim=-1))
        return torch.stack(out, dim=2), torch.cat(xs, -1), torch.cat(ys, -1)

    for t in range(T):
        for _ in range(dyn.substeps):
            new_x, new_y = [], []
            d = drives(t, ys)
            for li, sl in enumerate(layer_slices):
                drive = d[li]
                gam = dyn.gamma[..., sl]
                x = xs[li]
                if dyn.q is not None and dyn.kind == "spintronic":
                    damp = gam * x * (1 + dyn.q[..., sl] * x)
                else:
                    damp = gam * x
                f = -damp + drive * _gain(dyn.kind, x)
                if dyn.floor is not None:
                    f = f + dyn.floor
                xn = x + dyn.h * f
                if dyn.clipped:
                    xn = torch.clamp(xn, 0.0, 1.0)
                if dyn.a is not None:
                    yn = dyn.a * ys[li] + _out(dyn, xn) - _out(dyn, x)
                else:
                    yn = _out(dyn, xn)
                new_x.append(xn)
                new_y.append(yn)
            xs, ys = new_x, new_y
        out.append(torch.cat(xs, dim=-1))
    return torch.stack(out, dim=2), torch.cat(xs, -1), torch.cat(ys, -1)


# ---------------------------------------------------------------------------- native back end
#: The kernel's source, shipped beside this module as package data (see pyproject.toml).
KERNEL_SOURCE = Path(__file__).with_name("engine_kernel.cpp")
_NATIVE_SCHEMES = ("euler", "expheun")
_KIND_CODE = {"spintronic": 0, "ctrnn": 1, "linear": 2, "liquid": 3, "quadratic": 4}
_STASH_STEPS = {"euler": 16, "expheun": 8}  # sub-steps per weight-gradient product (cache-sized)
#: Compiler flags of every build; ``-march=native`` is tried first, then left out.
_BASE_FLAGS = ("-O3", "-std=c++17", "-shared", "-fPIC", "-pthread", "-fno-math-errno")
_ARCH_FLAGS = ("-march=native",)
_STDERR_CHARS = 2000  # the tail of the compiler's messages kept in errors and warnings
_native_lock = threading.Lock()
_native_lib: list[ctypes.CDLL | None] = []  # empty: not tried yet
_native_info: dict[str, object] = {}  # the last build's compiler, flags and library (or error)
_native_allowed = [os.environ.get("HIL_NATIVE", "1") != "0"]
_flush_subnormals = [True]


class HilScanArgs(ctypes.Structure):
    """The arguments of ``hil_scan``: mirrors ``struct HilScanArgs`` of ``engine_kernel.cpp``
    field by field (checked against the library's own layout when it is loaded). No other
    attributes: a misspelt field name raises AttributeError instead of being ignored."""

    __slots__ = ()
    _fields_ = [
        *((name, ctypes.c_int64) for name in (
            "K", "B", "NT", "M", "substeps", "layer_size", "kind", "has_q", "has_filter",
            "nthreads", "block_points", "checkpoints", "flush_subnormals", "scheme")),
        ("h", ctypes.c_double),
        *((name, ctypes.c_void_p) for name in (
            "C", "W", "WT", "X0", "Y0", "gamma", "q", "a", "Xseq", "Xf", "Yf", "Ycp", "gXseq",
            "gXf", "gYf", "gC", "gWp", "gW", "gX0", "gY0", "ah", "th")),
    ]


#: The tensor (pointer) fields of :class:`HilScanArgs`.
_TENSOR_FIELDS = frozenset(name for name, ctype in HilScanArgs._fields_ if ctype is ctypes.c_void_p)


def _cache_dir() -> Path:
    if os.environ.get("HIL_CACHE_DIR"):
        return Path(os.environ["HIL_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "hil"


def _cpu_signature() -> str:
    """Identifies the instruction set, so that a ``-march=native`` build is never reused on a
    different CPU (a shared home directory, a container image)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return platform.machine() + line
    except OSError:
        pass
    return platform.machine() + platform.processor()


def _require_native() -> bool:
    """``HIL_REQUIRE_NATIVE=1``: a kernel that cannot be built is an error, not a fallback (CI)."""
    return os.environ.get("HIL_REQUIRE_NATIVE", "0") not in ("", "0")


def _compiler() -> str:
    """The C++ compiler: ``CXX``, else the first of g++, c++, clang++ on the path."""
    cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")
    if not cxx:
        raise RuntimeError("no C++ compiler found (set CXX)")
    return cxx


def _compiler_version(cxx: str) -> str:
    """``<cxx> --version`` (what it printed, even when it failed: part of the cache key)."""
    try:
        res = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError) as e:
        raise RuntimeError(f"cannot run the C++ compiler {cxx!r}: {e}") from e
    return (res.stdout or res.stderr).strip()


def _kernel_flags() -> list[str]:
    """Flags of a build, ``-march`` aside: the base flags, the constants of :mod:`sims.neurons`
    as ``-D`` defines (so they are defined once, and the compiler's line numbers are the
    file's), then ``HIL_CXXFLAGS`` (shell-split)."""
    coef = ", ".join(repr(c) for c in PSI_COEF)
    defines = [f"-DHIL_Z_CAP={Z_CAP!r}", f"-DHIL_Z_SERIES={Z_SERIES!r}", f"-DHIL_PSI_A={{{coef}}}"]
    return [*_BASE_FLAGS, *defines, *shlex.split(os.environ.get("HIL_CXXFLAGS", ""))]


def _cache_key(cxx: str, version: str, flags: list[str], source: bytes) -> str:
    """Names the library of one build: the compiler (path and ``--version``), every flag, the
    kernel's source and the CPU; any change gives a new library instead of a stale one."""
    h = hashlib.sha256()
    for part in (cxx.encode(), version.encode(), "\0".join([*flags, *_ARCH_FLAGS]).encode(),
                 source, _cpu_signature().encode()):
        h.update(len(part).to_bytes(8, "little") + part)
    return h.hexdigest()[:20]


def _build_native() -> ctypes.CDLL:
    """Compile :data:`KERNEL_SOURCE` (once per cache key) and load it; raises RuntimeError with
    the compiler's messages (file and line of ``engine_kernel.cpp``) when it does not compile."""
    cxx = _compiler()
    version = _compiler_version(cxx)
    flags = _kernel_flags()
    source = KERNEL_SOURCE.read_bytes()
    out_dir = _cache_dir()
    out_dir.mkdir(parents=True, exist_ok=True)
    lib_path = out_dir / f"engine-{_cache_key(cxx, version, flags, source)}.so"
    info_path = lib_path.with_suffix(".json")  # the flags it was built with (-march or not)
    if not lib_path.exists():
        with tempfile.TemporaryDirectory(dir=out_dir) as tmp:
            tmp_lib = Path(tmp) / "engine.so"
            err = ""
            for arch in (list(_ARCH_FLAGS), []):  # some compilers or CPUs lack -march=native
                res = subprocess.run([cxx, *flags, *arch, str(KERNEL_SOURCE), "-o", str(tmp_lib)],
                                     capture_output=True, text=True)
                if res.returncode == 0:
                    break
                err = (res.stderr or res.stdout)[-_STDERR_CHARS:]
            else:
                raise RuntimeError(f"compiling the native engine failed ({cxx}):\n{err}")
            tmp_info = Path(tmp) / "engine.json"
            tmp_info.write_text(json.dumps({"flags": [*flags, *arch]}))
            os.replace(tmp_info, info_path)
            os.replace(tmp_lib, lib_path)  # atomic: concurrent builds are harmless
    lib = ctypes.CDLL(str(lib_path))  # ctypes releases the GIL during the calls
    _declare(lib)
    try:
        built_flags = json.loads(info_path.read_text())["flags"]
    except (OSError, ValueError, KeyError):  # a library cached before the record was kept
        built_flags = flags
    _native_info.clear()
    _native_info.update(compiler=version.splitlines()[0] if version else cxx,
                        flags=built_flags, library=str(lib_path))
    return lib


def _declare(lib: ctypes.CDLL) -> None:
    """Argument types of the library's functions, and a check that its ``HilScanArgs`` is laid
    out as :class:`HilScanArgs` (a stale or foreign library is refused, never called)."""
    lib.hil_scan.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.POINTER(HilScanArgs)]
    lib.hil_scan.restype = ctypes.c_int
    lib.hil_rows_per_tile.argtypes = [ctypes.c_int]
    lib.hil_rows_per_tile.restype = ctypes.c_int
    lib.hil_scan_args_layout.argtypes = [ctypes.POINTER(ctypes.c_int64),
                                         ctypes.POINTER(ctypes.c_int64), ctypes.c_int]
    lib.hil_scan_args_layout.restype = ctypes.c_int
    lib.hil_neuron.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_void_p,
                               ctypes.c_void_p, ctypes.c_double, ctypes.c_double, ctypes.c_double,
                               ctypes.c_double, ctypes.POINTER(ctypes.c_void_p)]
    lib.hil_neuron.restype = ctypes.c_int
    size = ctypes.c_int64()
    offsets = (ctypes.c_int64 * 64)()
    n = lib.hil_scan_args_layout(ctypes.byref(size), offsets, 64)
    mine = [getattr(HilScanArgs, name).offset for name, _ in HilScanArgs._fields_]
    if size.value != ctypes.sizeof(HilScanArgs) or list(offsets[:n]) != mine:
        raise RuntimeError(f"the native library's HilScanArgs ({n} fields, {size.value} bytes) "
                           f"does not match hil.network.engine.HilScanArgs ({len(mine)} fields, "
                           f"{ctypes.sizeof(HilScanArgs)} bytes)")


def native_library() -> ctypes.CDLL | None:
    """The compiled kernel (built on first use), or None when it cannot be built; the torch
    back end then runs, after one warning saying why. With ``HIL_REQUIRE_NATIVE=1`` a failed
    build raises RuntimeError instead."""
    if not _native_lib:
        with _native_lock:
            if not _native_lib:
                lib = None
                try:
                    lib = _build_native()
                except Exception as e:  # noqa: BLE001 - any failure means: fall back
                    _native_info.clear()
                    _native_info["error"] = str(e)[-_STDERR_CHARS:]
                    if _require_native():  # not cached: every call says so
                        raise RuntimeError(f"HIL_REQUIRE_NATIVE is set and the native engine "
                                           f"cannot be built: {e}") from e
                    warnings.warn(f"hil: native engine unavailable, using the torch engine ({e})",
                                  RuntimeWarning, stacklevel=3)
                _native_lib.append(lib)
    if _native_lib[0] is None and _require_native():
        raise RuntimeError("HIL_REQUIRE_NATIVE is set and the native engine cannot be built: "
                           f"{_native_info.get('error', 'the build failed earlier')}")
    return _native_lib[0]


def native_record(engine: str | None = None) -> dict[str, object]:
    """What a run folder's ``environment.json`` says about the engine: the configured engine
    name, whether the native kernel is in use, and the compiler, flags and library it was
    built with (or why it is not). The kernel is built here only for the ``fast`` engine."""
    allowed = _native_allowed[0]
    if engine == "fast" and allowed and not _native_lib:
        native_library()
    rec: dict[str, object] = {"name": engine, "native": bool(allowed and _native_lib and _native_lib[0]),
                              "native_allowed": allowed, "built": bool(_native_lib)}
    rec.update(_native_info)
    return rec


def record_engine(folder: RunFolder, engine: str) -> None:
    """Write :func:`native_record` for ``engine`` into the run folder's ``environment.json``;
    every job that runs the model calls it once its
    config is known."""
    folder.update_environment(engine=native_record(engine))


def set_native(enabled: bool) -> bool:
    """Allow (default) or forbid the native back end in this process; returns the previous
    setting. Forbidding it runs the torch back end everywhere (benchmarks, debugging)."""
    previous = _native_allowed[0]
    _native_allowed[0] = bool(enabled)
    return previous


def set_flush_subnormals(enabled: bool) -> bool:
    """Run the native kernel with flush-to-zero (default) or with the caller's floating-point
    mode; returns the previous setting. Off only to measure what it buys
    (``benchmarks/bench_subnormals.py``)."""
    previous = _flush_subnormals[0]
    _flush_subnormals[0] = bool(enabled)
    return previous


def _native_for(*tensors: torch.Tensor) -> ctypes.CDLL | None:
    """The native kernel if it can run on these tensors (CPU, one float dtype), else None."""
    if not _native_allowed[0]:
        return None
    t0 = tensors[0]
    if t0.device.type != "cpu" or t0.dtype not in (torch.float32, torch.float64):
        return None
    if any(t.dtype != t0.dtype or t.device != t0.device for t in tensors[1:]):
        return None
    return native_library()


def native_neuron(lib: ctypes.CDLL, kind: str, x: torch.Tensor, drive: torch.Tensor | None = None,
                  gamma: float = 1.0, q: float = 0.0, h: float = 0.1, floor: float = 0.0
                  ) -> dict[str, torch.Tensor]:
    """The kernel's own neuron functions on the values ``x`` (1-D, float32 or float64): ``gain``
    g(x), ``out`` o(x) and ``out_dx`` o'(x); for the held-drive kinds also ``step``, the
    exponential-Heun sub-step at ``drive`` (scalars ``gamma``, ``q``, step ``h``, thermal
    ``floor``), ``step_dx`` and ``step_dD``. For tests against :mod:`sims.neurons`."""
    x = x.contiguous()
    if x.dim() != 1 or x.dtype not in (torch.float32, torch.float64):
        raise ValueError("x must be a 1-D float32 or float64 tensor")
    D = torch.zeros_like(x) if drive is None else drive.to(x.dtype).expand_as(x).contiguous()
    names = ["gain", "out", "out_dx"] + (["step", "step_dx", "step_dD"]
                                         if kind in HELD_DRIVE_TYPES else [])
    outs = {name: torch.empty_like(x) for name in names}
    ptrs = (ctypes.c_void_p * 6)(*(t.data_ptr() for t in outs.values()))
    rc = lib.hil_neuron(0 if x.dtype == torch.float32 else 1, _KIND_CODE[kind], x.numel(),
                        x.data_ptr(), D.data_ptr(), gamma, q, h, floor, ptrs)
    if rc != 0:
        raise RuntimeError(f"hil_neuron failed (code {rc}) for kind {kind!r}")
    return outs


class _NativeCall:
    """One kernel configuration: sizes, flags and the per-trial coefficients, as the kernel
    wants them (contiguous, in the state's dtype)."""

    def __init__(self, lib: ctypes.CDLL, shape: torch.Size, dtype: torch.dtype, dyn: Dynamics) -> None:
        K, B, T, M = shape
        self.lib = lib
        self.code = 0 if dtype == torch.float32 else 1
        self.R = lib.hil_rows_per_tile(self.code)  # batch rows per tile
        self.tiles = (B + self.R - 1) // self.R  # tiles per trial
        self.shape = (K, B, T, M)
        self.gamma = dyn.gamma.to(dtype).expand(K, 1, M).reshape(K, M).contiguous()
        self.q = None if dyn.q is None else dyn.q.to(dtype).expand(K, 1, M).reshape(K, M).contiguous()
        self.a = None if dyn.a is None else dyn.a.to(dtype).expand(K, 1, 1).reshape(K).contiguous()
        self.ah = (None if dyn.a is None or dyn.a_half is None
                   else dyn.a_half.to(dtype).expand(K, 1, 1).reshape(K).contiguous())
        self.th = None if dyn.floor is None else dyn.floor.to(dtype).expand(K, 1, 1).reshape(K).contiguous()
        block = max(1, _STASH_STEPS[dyn.scheme] // dyn.substeps)  # input points per adjoint block
        self.checkpoints = max(1, (T - 1) // block)  # Y at the block starts after the first
        self.sizes = dict(K=K, B=B, NT=T, M=M, substeps=dyn.substeps,
                          layer_size=dyn.layer_size or M, kind=_KIND_CODE[dyn.kind],
                          has_q=self.q is not None, has_filter=self.a is not None,
                          nthreads=torch.get_num_threads(), block_points=block,
                          checkpoints=self.checkpoints, flush_subnormals=_flush_subnormals[0],
                          scheme=SCHEMES.index(dyn.scheme), h=dyn.h)

    def inputs(self, C: torch.Tensor, Wr: torch.Tensor, X0: torch.Tensor, Y0: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        K, B, T, M = self.shape
        return (C.contiguous(), Wr.expand(K, M, M).contiguous(), X0.expand(K, B, M).contiguous(),
                Y0.expand(K, B, M).contiguous())

    def run(self, backward: bool, tensors: dict[str, torch.Tensor | None]) -> None:
        """One ``hil_scan`` call; ``tensors`` maps :class:`HilScanArgs` fields to tensors."""
        args = HilScanArgs(**self.sizes)
        given = {"gamma": self.gamma, "q": self.q, "a": self.a, "ah": self.ah, "th": self.th,
                 **tensors}
        for name, t in given.items():
            if name not in _TENSOR_FIELDS:
                raise KeyError(f"hil_scan has no tensor argument {name!r}")
            if t is not None:
                assert t.is_contiguous() and t.dtype == self.gamma.dtype
                setattr(args, name, t.data_ptr())
        rc = self.lib.hil_scan(self.code, int(backward), ctypes.byref(args))
        if rc != 0:
            raise RuntimeError(f"native Euler scan failed (code {rc}): out of memory or threads")

    def forward(self, C: torch.Tensor, Wr: torch.Tensor, X0: torch.Tensor, Y0: torch.Tensor,
                store: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """``(Xseq, X_final, Y_final, Ycp)``; ``Ycp``, the filtered output where the adjoint's
        blocks start (kernel tile layout), is the checkpoint it needs besides ``Xseq``."""
        K, B, T, M = self.shape
        Xseq = C.new_empty((K, B, T, M))
        Xf, Yf = C.new_empty((K, B, M)), C.new_empty((K, B, M))
        Ycp = C.new_empty((K, self.tiles, self.checkpoints, M, self.R)) if store else None
        self.run(False, {"C": C, "W": Wr, "X0": X0, "Y0": Y0, "Xseq": Xseq, "Xf": Xf, "Yf": Yf,
                         "Ycp": Ycp})
        return Xseq, Xf, Yf, Ycp

    def backward(self, C: torch.Tensor, Wr: torch.Tensor, X0: torch.Tensor, Y0: torch.Tensor,
                 Xseq: torch.Tensor, Ycp: torch.Tensor, gXseq: torch.Tensor | None,
                 gXf: torch.Tensor | None, gYf: torch.Tensor | None
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Gradients of ``(C, Wr, X0, Y0)``; a None output gradient counts as zero."""
        K, B, T, M = self.shape
        gC = C.new_empty((K, B, T, M))
        gW_parts = C.new_empty((K * self.tiles, M, M))  # per tile, summed by the kernel
        gW = C.new_empty((K, M, M))
        gX0, gY0 = C.new_empty((K, B, M)), C.new_empty((K, B, M))

        def dense(g: torch.Tensor | None, shape: tuple[int, ...]) -> torch.Tensor | None:
            return None if g is None else g.to(C.dtype).expand(shape).contiguous()

        self.run(True, {"C": C, "W": Wr, "WT": Wr.transpose(1, 2).contiguous(), "X0": X0,
                        "Y0": Y0, "Xseq": Xseq, "Ycp": Ycp, "gXseq": dense(gXseq, (K, B, T, M)),
                        "gXf": dense(gXf, (K, B, M)), "gYf": dense(gYf, (K, B, M)), "gC": gC,
                        "gWp": gW_parts, "gW": gW, "gX0": gX0, "gY0": gY0})
        return gC, gW, gX0, gY0


# ---------------------------------------------------------------------------- torch back end
def _torch_forward(
    C: torch.Tensor, Wr: torch.Tensor, X0: torch.Tensor, Y0: torch.Tensor, dyn: Dynamics, store: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, tuple[torch.Tensor, ...]]:
    """Batched tensor operations per step (any device and dtype). With ``store`` it keeps every
    step's state, drive and filtered output for :func:`_torch_backward`."""
    K, B, T, M = C.shape
    n = T * dyn.substeps
    if store:
        Xs = C.new_empty((n + 1, K, B, M))
        Ds = C.new_empty((n, K, B, M))
        Ys = C.new_empty((K, n, B, M))  # trial-major: the weight gradient is then one bmm
    else:
        Xs = C.new_empty((2, K, B, M))
        Ds = C.new_empty((1, K, B, M))
    Xseq = C.new_empty((K, B, T, M))
    Xs[0].copy_(X0)
    Y = Y0.expand(K, B, M).clone()
    h = dyn.h
    neg_gamma = -dyn.gamma
    s = 0
    for t in range(T):
        Ct = C[:, :, t]
        for _ in range(dyn.substeps):
            i, j = (s, s + 1) if store else (s % 2, (s + 1) % 2)
            X = Xs[i]
            if store:
                Ys[:, s].copy_(Y)
            D = torch.baddbmm(Ct, Y, Wr, out=Ds[s] if store else Ds[0])
            if dyn.q is not None and dyn.kind == "spintronic":
                F = X * (1 + dyn.q * X) * neg_gamma
            else:
                F = X * neg_gamma
            F.addcmul_(D, _gain(dyn.kind, X))
            if dyn.floor is not None:
                F.add_(dyn.floor)
            Xn = torch.add(X, F, alpha=h, out=Xs[j])
            if dyn.clipped:
                Xn.clamp_(0.0, 1.0)
            if dyn.a is not None:
                if dyn.tanh_out:
                    Y.mul_(dyn.a).add_(torch.tanh(Xn)).sub_(torch.tanh(X))
                elif dyn.clipped:
                    Y.mul_(dyn.a).add_(Xn).sub_(X)
                else:
                    Y.mul_(dyn.a).add_(F, alpha=h)
            else:
                Y = torch.tanh(Xn) if dyn.tanh_out else Xn.clone()
            s += 1
        Xseq[:, :, t].copy_(Xs[s if store else s % 2])
    Xf = Xs[n if store else n % 2].clone()
    return Xseq, Xf, Y, ((Xs, Ds, Ys) if store else ())


def _torch_backward(
    dyn: Dynamics, shape: tuple[int, int, int, int], Wr: torch.Tensor, Xs: torch.Tensor,
    Ds: torch.Tensor, Ys: torch.Tensor, gXseq: torch.Tensor | None, gXfin: torch.Tensor | None,
    gYfin: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Adjoint of the Euler recursion, step by step backwards."""
    K, B, T, M = shape
    n = T * dyn.substeps
    h = dyn.h
    WrT = Wr.transpose(1, 2)
    gX = gXfin.expand(K, B, M).clone() if gXfin is not None else Xs.new_zeros((K, B, M))
    gY = gYfin.expand(K, B, M).clone() if gYfin is not None else Xs.new_zeros((K, B, M))
    gDs = Xs.new_empty((K, n, B, M))
    neg_gamma = -dyn.gamma
    for s in range(n - 1, -1, -1):
        if gXseq is not None and (s + 1) % dyn.substeps == 0:
            gX.add_(gXseq[:, :, (s + 1) // dyn.substeps - 1])
        X, D = Xs[s], Ds[s]
        Xn = Xs[s + 1]
        # dL/dX_{s+1} in full: direct, plus through Y_{s+1} = ... + o(X_{s+1})
        if dyn.tanh_out:
            gXn = gX.addcmul(1 - torch.tanh(Xn) ** 2, gY)
        else:
            gXn = gX + gY
        if dyn.clipped:
            gXn = gXn * ((Xn > 0) & (Xn < 1))
        gF = gXn * h
        gD = torch.mul(gF, _gain(dyn.kind, X), out=gDs[:, s])
        # dF/dX = -gamma (1 + 2 Q X) + D g'(X)
        if dyn.q is not None and dyn.kind == "spintronic":
            dFdX = (1 + 2 * dyn.q * X) * neg_gamma
        else:
            dFdX = neg_gamma.expand_as(X)
        gdx = _gain_dx(dyn.kind, X)
        if gdx is not None:
            dFdX = dFdX + D * gdx
        gX = gXn.addcmul_(gF, dFdX)
        if dyn.a is not None:
            if dyn.tanh_out:
                gX.addcmul_(1 - torch.tanh(X) ** 2, gY, value=-1.0)
            else:
                gX.sub_(gY)
            gY = torch.baddbmm(gY * dyn.a, gD, WrT)
        else:
            gY = torch.bmm(gD, WrT)
    # weight gradient: sum over steps and rows of Y_s^T gD_s, one product per trial
    gWr = torch.bmm(Ys.view(K, n * B, M).transpose(1, 2), gDs.view(K, n * B, M))
    gC = gDs.view(K, T, dyn.substeps, B, M).sum(2).permute(0, 2, 1, 3)
    return gC, gWr, gX, gY


def _filter(dyn: Dynamics, Y: torch.Tensor, Xn: torch.Tensor, X: torch.Tensor) -> torch.Tensor:
    """Filtered output after a sub-step from ``X`` to ``Xn`` (eq. 5), or the plain output."""
    if dyn.a is None:
        return _out(dyn, Xn)
    inc = _out(dyn, Xn) - _out(dyn, X)
    return dyn.a * Y + (inc if dyn.a_half is None else dyn.a_half * inc)


def _out_dx(dyn: Dynamics, x: torch.Tensor) -> torch.Tensor | None:
    """``o'(x)``: None for the identity."""
    return 1 - torch.tanh(x) ** 2 if dyn.tanh_out else None


def _torch_forward_eh(
    C: torch.Tensor, Wr: torch.Tensor, X0: torch.Tensor, Y0: torch.Tensor, dyn: Dynamics, store: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, tuple[torch.Tensor, ...]]:
    """Exponential Heun (``scheme='expheun'``) as batched tensor operations per sub-step. With
    ``store`` it keeps what :func:`_torch_backward_eh` needs: per sub-step the start state, both
    drives, the predicted state, and both filtered outputs the drives were computed from."""
    K, B, T, M = C.shape
    n = T * dyn.substeps
    X = X0.expand(K, B, M).clone()
    Y = Y0.expand(K, B, M).clone()
    Xseq = C.new_empty((K, B, T, M))
    if store:
        Xs = C.new_empty((n + 1, K, B, M))
        D0s, Dms, Xps = (C.new_empty((n, K, B, M)) for _ in range(3))
        Ys = C.new_empty((K, 2, n, B, M))  # [0]: Y_s, [1]: predicted Y (weight gradient: one bmm)
        Xs[0].copy_(X)
    s = 0
    for t in range(T):
        Ct = C[:, :, t]
        for _ in range(dyn.substeps):
            D0 = torch.baddbmm(Ct, Y, Wr)
            Xp = exact_step(dyn, X, D0)[0]
            Yp = _filter(dyn, Y, Xp, X)
            Dm = 0.5 * (D0 + torch.baddbmm(Ct, Yp, Wr))
            Xn = exact_step(dyn, X, Dm)[0]
            if store:
                D0s[s].copy_(D0)
                Dms[s].copy_(Dm)
                Xps[s].copy_(Xp)
                Ys[:, 0, s].copy_(Y)
                Ys[:, 1, s].copy_(Yp)
                Xs[s + 1].copy_(Xn)
            Y = _filter(dyn, Y, Xn, X)
            X = Xn
            s += 1
        Xseq[:, :, t].copy_(X)
    return Xseq, X.clone(), Y, ((Xs, D0s, Dms, Xps, Ys) if store else ())


def _torch_backward_eh(
    dyn: Dynamics, shape: tuple[int, int, int, int], Wr: torch.Tensor, Xs: torch.Tensor,
    D0s: torch.Tensor, Dms: torch.Tensor, Xps: torch.Tensor, Ys: torch.Tensor,
    gXseq: torch.Tensor | None, gXfin: torch.Tensor | None, gYfin: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Adjoint of :func:`_torch_forward_eh`, sub-step by sub-step backwards."""
    K, B, T, M = shape
    n = T * dyn.substeps
    WrT = Wr.transpose(1, 2)
    gX = gXfin.expand(K, B, M).clone() if gXfin is not None else Xs.new_zeros((K, B, M))
    gY = gYfin.expand(K, B, M).clone() if gYfin is not None else Xs.new_zeros((K, B, M))
    gDs = Xs.new_empty((K, 2, n, B, M))  # [0]: dL/dD0, [1]: dL/dD1 (the predicted drive)
    a = dyn.a
    ah = dyn.a_half if a is not None and dyn.a_half is not None else 1.0
    for s in range(n - 1, -1, -1):
        if gXseq is not None and (s + 1) % dyn.substeps == 0:
            gX = gX + gXseq[:, :, (s + 1) // dyn.substeps - 1]
        X, Xn, Xp = Xs[s], Xs[s + 1], Xps[s]
        ox = _out_dx(dyn, X)
        # Y_{s+1} = a Y_s + ah (o(X_{s+1}) - o(X_s))  (or o(X_{s+1}))
        oxn = _out_dx(dyn, Xn)
        gYh = ah * gY
        gXn = gX + (gYh if oxn is None else oxn * gYh)
        gYs = a * gY if a is not None else torch.zeros_like(gY)
        gXs = -(gYh if ox is None else ox * gYh) if a is not None else torch.zeros_like(gY)
        # X_{s+1} = Phi(X_s, Dm)
        _, dx_m, dD_m = exact_step(dyn, X, Dms[s], grads=True)
        gXs = gXs + dx_m * gXn
        gDm = dD_m * gXn
        gD1 = 0.5 * gDm
        gDs[:, 1, s] = gD1
        # D1 = C + Yp Wr;  Yp = a Y_s + o(Xp) - o(X_s)  (or o(Xp))
        gYp = torch.bmm(gD1, WrT)
        oxp = _out_dx(dyn, Xp)
        gYph = ah * gYp
        gXp = gYph if oxp is None else oxp * gYph
        if a is not None:
            gYs = gYs + a * gYp
            gXs = gXs - (gYph if ox is None else ox * gYph)
        # Xp = Phi(X_s, D0)
        _, dx_0, dD_0 = exact_step(dyn, X, D0s[s], grads=True)
        gXs = gXs + dx_0 * gXp
        gD0 = 0.5 * gDm + dD_0 * gXp
        gDs[:, 0, s] = gD0
        # D0 = C + Y_s Wr
        gY = torch.baddbmm(gYs, gD0, WrT)
        gX = gXs
    gWr = torch.bmm(Ys.view(K, 2 * n * B, M).transpose(1, 2), gDs.view(K, 2 * n * B, M))
    gC = gDs.sum(1).view(K, T, dyn.substeps, B, M).sum(2).permute(0, 2, 1, 3)
    return gC, gWr, gX, gY


def _banded(Wr: torch.Tensor, dyn: Dynamics) -> torch.Tensor:
    """``Wr`` with the entries outside the layer band zeroed (torch back end)."""
    if dyn.layer_size is None:
        return Wr
    return Wr * band_mask(Wr.shape[-1], dyn.layer_size, Wr.device)


# ---------------------------------------------------------------------------- entry points
def integrate(
    C: torch.Tensor,
    Wr: torch.Tensor,
    X0: torch.Tensor,
    Y0: torch.Tensor,
    dyn: Dynamics,
    store: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, tuple[torch.Tensor, ...]]:
    """The fast forward loop, without autograd. With ``store`` it also returns what the
    backward pass needs (back-end specific); without, it keeps only the current state.

    Returns ``(Xseq, X_final, Y_final, saved)``.
    """
    lib = _native_for(C, Wr, X0, Y0) if dyn.scheme in _NATIVE_SCHEMES else None
    if lib is not None:
        call = _NativeCall(lib, C.shape, C.dtype, dyn)
        C, Wr, X0, Y0 = call.inputs(C, Wr, X0, Y0)
        Xseq, Xf, Yf, Ycp = call.forward(C, Wr, X0, Y0, store)
        return Xseq, Xf, Yf, ((C, Wr, X0, Y0, Xseq, Ycp) if store else ())
    fwd = _torch_forward_eh if dyn.scheme == "expheun" else _torch_forward
    return fwd(C, _banded(Wr, dyn), X0, Y0, dyn, store)


class EulerScan(torch.autograd.Function):
    """Fast forward and hand-written backward of the Euler recursion (see module docstring).

    Inputs: ``C (K,B,T,M)``, ``Wr (K,M,M)`` (drive = ``Y @ Wr``), ``X0, Y0 (K,B,M)`` and a
    :class:`Dynamics`. Outputs: ``Xseq (K,B,T,M)`` (state at the end of every input point),
    ``X_final``, ``Y_final``.
    """

    @staticmethod
    def forward(ctx, C, Wr, X0, Y0, dyn: Dynamics):  # type: ignore[override]
        ctx.set_materialize_grads(False)  # unused outputs cost nothing in the backward
        ctx.dyn = dyn
        ctx.shape = tuple(C.shape)
        lib = _native_for(C, Wr, X0, Y0) if dyn.scheme in _NATIVE_SCHEMES else None
        ctx.native = lib is not None
        if lib is not None:
            ctx.call = call = _NativeCall(lib, C.shape, C.dtype, dyn)
            C, Wr, X0, Y0 = call.inputs(C, Wr, X0, Y0)
            Xseq, Xf, Yf, Ycp = call.forward(C, Wr, X0, Y0, store=True)
            ctx.save_for_backward(C, Wr, X0, Y0, Xseq, Ycp)
        else:
            Wb = _banded(Wr, dyn)
            fwd = _torch_forward_eh if dyn.scheme == "expheun" else _torch_forward
            Xseq, Xf, Yf, saved = fwd(C, Wb, X0, Y0, dyn, store=True)
            ctx.save_for_backward(Wb, *saved)
        return Xseq, Xf, Yf

    @staticmethod
    @once_differentiable
    def backward(ctx, gXseq, gXfin, gYfin):  # type: ignore[override]
        if ctx.native:
            gC, gWr, gX, gY = ctx.call.backward(*ctx.saved_tensors, gXseq, gXfin, gYfin)
        else:
            Wb, *saved = ctx.saved_tensors
            bwd = _torch_backward_eh if ctx.dyn.scheme == "expheun" else _torch_backward
            gC, gWr, gX, gY = bwd(ctx.dyn, ctx.shape, Wb, *saved, gXseq, gXfin, gYfin)
            if ctx.dyn.layer_size is not None:
                gWr = gWr * band_mask(gWr.shape[-1], ctx.dyn.layer_size, gWr.device)
        return gC, gWr, gX, gY, None


# ---------------------------------------------------------------------------- engine registry
#: ``(C, Wr, X0, Y0, dyn, layer_slices) -> (Xseq, X_final, Y_final)``: one integration of the
#: network (shapes as :class:`EulerScan`; ``layer_slices`` the neurons of each layer).
Engine = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, Dynamics, list[slice]],
                  tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


def run_fast(C: torch.Tensor, Wr: torch.Tensor, X0: torch.Tensor, Y0: torch.Tensor, dyn: Dynamics,
             layer_slices: list[slice]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The ``fast`` engine: :class:`EulerScan` when gradients are wanted, else the forward loop
    alone (:func:`integrate`, nothing stored)."""
    if torch.is_grad_enabled() and (C.requires_grad or Wr.requires_grad):
        return EulerScan.apply(C, Wr, X0, Y0, dyn)
    Xseq, Xf, Yf, _ = integrate(C, Wr, X0, Y0, dyn, store=False)
    return Xseq, Xf, Yf


def run_reference(C: torch.Tensor, Wr: torch.Tensor, X0: torch.Tensor, Y0: torch.Tensor,
                  dyn: Dynamics, layer_slices: list[slice]
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The ``reference`` engine: :func:`scan_reference` (plain autograd) on the layer blocks of
    ``Wr``; gradients also reach every physics buffer."""
    sl = layer_slices
    L = len(sl)
    blocks: list[list[torch.Tensor | None]] = [[Wr[:, sl[m], sl[li]] for m in range(L)]
                                               for li in range(L)]
    return scan_reference(C, blocks, [X0[..., s] for s in sl], [Y0[..., s] for s in sl], dyn, sl)


#: Engines by name (``train.engine``), as torchdiffeq's table of solvers.
ENGINES: dict[str, Engine] = {"fast": run_fast, "reference": run_reference}
assert tuple(ENGINES) == config.ENGINES


def get_engine(name: str) -> Engine:
    """The engine called ``name``; ConfigError naming the allowed ones otherwise."""
    try:
        return ENGINES[name]
    except KeyError:
        raise ConfigError("train.engine", f"unknown engine {name!r}; allowed: "
                          f"{', '.join(ENGINES)}") from None
