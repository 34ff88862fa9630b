"""pdmix's exact int8 GEMMs in C (csrc/s8gemm.c): int8 x [m, k] @ int8 w [n, k]^T -> int32 [m, n]
(the cpu_int8 backend), and the same in 32-wide scaled blocks -> fp32 (the int8 lm_head).

Built with the system C compiler (`$CC`, default `cc`) at first use, cached under
$PDMIX_HOME/kernels keyed by the source and the compiler, and loaded with ctypes (which lets go of
the GIL during a call). One build runs on any x86-64 CPU: the AVX2 path is compiled by function
attribute and chosen at run time, never with -march=native. Without a compiler `library()` says why,
and the cpu_int8 backend stands aside for the others.

Inside a compiled graph the GEMM is the opaque op `pdmix::s8gemm`: it takes the weight as a plain
tensor, so nothing needs registering.
"""

import ctypes
import functools
import hashlib
import os
import platform
import subprocess
import tempfile
from pathlib import Path

import torch

from pdmix.paths import pdmix_home

SOURCE = Path(__file__).parent / "csrc" / "s8gemm.c"
FLAGS = (["-O3", "-fopenmp"], ["-O3"])  # OpenMP splits the columns over torch's threads, when the compiler has it


def build_dir() -> Path:
    try:
        folder = pdmix_home() / "kernels"
        folder.mkdir(parents=True, exist_ok=True)
        return folder
    except Exception:  # an unwritable home: build for this process only
        return Path(tempfile.mkdtemp(prefix="pdmix-kernels-"))


def compile_library(cc: str, out: Path) -> str | None:
    """Build the shared library at `out` (atomically); None, or why it could not be built."""
    why = None
    for flags in FLAGS:
        tmp = out.with_name(f".{out.name}.{os.getpid()}")
        try:
            proc = subprocess.run([cc, *flags, "-shared", "-fPIC", str(SOURCE), "-o", str(tmp)],
                                  capture_output=True, text=True, timeout=300)
        except (OSError, subprocess.TimeoutExpired) as e:
            return f"cannot run the C compiler {cc!r} ({e.__class__.__name__}: {e})"
        if proc.returncode == 0:
            os.replace(tmp, out)
            return None
        tmp.unlink(missing_ok=True)
        why = f"{cc} failed to build {SOURCE.name}: {(proc.stderr.strip().splitlines() or ['?'])[-1][:200]}"
    return why


@functools.cache
def library() -> tuple[ctypes.CDLL | None, str | None]:
    """(the loaded library, None), or (None, why it is unavailable)."""
    cc = os.environ.get("CC", "cc")
    try:
        version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.TimeoutExpired) as e:
        return None, f"no C compiler to build {SOURCE.name} ({cc}: {e.__class__.__name__})"
    key = hashlib.sha256(SOURCE.read_bytes() + version.encode() + platform.machine().encode()).hexdigest()[:16]
    path = build_dir() / f"s8gemm-{key}.so"
    if not path.exists() and (why := compile_library(cc, path)):
        return None, why
    try:
        lib = ctypes.CDLL(str(path))
    except OSError as e:
        return None, f"cannot load {path}: {e}"
    lib.pdmix_s8gemm.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64,
                                 ctypes.c_void_p, ctypes.c_int]
    lib.pdmix_s8gemm.restype = ctypes.c_int
    lib.pdmix_q8_0_gemm.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p,
                                    ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int]
    lib.pdmix_q8_0_gemm.restype = ctypes.c_int
    lib.pdmix_s8gemm_isa.restype = ctypes.c_int
    return lib, None


def isa() -> str | None:
    """The path the library runs on this CPU ("avx2" or "plain"; PDMIX_S8GEMM_PLAIN=1 forces plain),
    None if it is unavailable."""
    lib = library()[0]
    return None if lib is None else {2: "avx2", 1: "plain"}[lib.pdmix_s8gemm_isa()]


def gemm(x_q: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x_q int8 [m, k] @ weight int8 [n, k]^T as exact int32 [m, n], on torch's thread count."""
    x_q, weight = x_q.contiguous(), weight.contiguous()
    m, (n, k) = x_q.shape[0], weight.shape
    out = torch.empty((m, n), dtype=torch.int32)
    if m and library()[0].pdmix_s8gemm(x_q.data_ptr(), m, weight.data_ptr(), n, k, out.data_ptr(),
                                       torch.get_num_threads()):
        raise MemoryError(f"s8gemm: no memory for a {m} x {k} int16 buffer")
    return out


def q8_0_gemm(x_q: torch.Tensor, x_scales: torch.Tensor, weight: torch.Tensor, w_scales: torch.Tensor) -> torch.Tensor:
    """fp32 [m, n] from 32-wide blocks (llama.cpp's Q8_0 x Q8_0): x_q int8 [m, k] with fp32 scales
    [m, k / 32], weight int8 [n, k] with fp32 scales [n, k / 32]; each block's dot product exact in
    int32, the scaled sum in a fixed fp32 order (a row's result does not depend on the other rows)."""
    x_q, x_scales = x_q.contiguous(), x_scales.to(torch.float32).contiguous()
    m, (n, k) = x_q.shape[0], weight.shape
    out = torch.empty((m, n), dtype=torch.float32)
    if m and library()[0].pdmix_q8_0_gemm(x_q.data_ptr(), x_scales.data_ptr(), m, weight.data_ptr(),
                                          w_scales.data_ptr(), n, k, out.data_ptr(), torch.get_num_threads()):
        raise MemoryError(f"q8_0_gemm: no memory for a {m} x {k} int16 buffer")
    return out


@torch.library.custom_op("pdmix::s8gemm", mutates_args=())
def s8gemm_op(x_q: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return gemm(x_q, weight)


@s8gemm_op.register_fake
def _(x_q, weight):
    return x_q.new_empty((x_q.shape[0], weight.shape[0]), dtype=torch.int32)
