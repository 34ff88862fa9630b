"""pdmix's C kernels (csrc/*.c: the int8 GEMMs and linear, the bf16 linear, decode attention), built with the system C
compiler (`$CC`, default `cc`) at first use into one shared library, cached under $PDMIX_HOME/kernels
keyed by the sources, the flags and the compiler, and loaded with ctypes (which lets go of the GIL
during a call). One build runs on any x86-64 CPU: AVX2 and AVX-512 VNNI paths are compiled by function
attribute and chosen at run time, never with -march=native. Without a compiler `library()` says why, and what
uses it stands aside (the cpu_int8 backend) or falls back to torch (attention, the int8 lm_head).
"""

import ctypes
import functools
import hashlib
import os
import platform
import subprocess
import tempfile
from pathlib import Path

from pdmix.paths import pdmix_home

CSRC = Path(__file__).parent / "csrc"
SOURCES = sorted(CSRC.glob("*.c"))  # compiled together; the key also covers the headers they include
# OpenMP splits the work over torch's threads, when the compiler has it; no fused multiply-add
# contraction, so that fp32 arithmetic rounds as the reference's separate torch ops do
FLAGS = (["-O3", "-ffp-contract=off", "-fopenmp"], ["-O3", "-ffp-contract=off"])

_p, _i64, _f32, _int = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float, ctypes.c_int
SIGNATURES = {  # name: (argument types, result type)
    "pdmix_s8gemm": ([_p, _i64, _p, _int, _i64, _i64, _p, _int], _int),
    "pdmix_s8pack": ([_p, _i64, _i64, _p], None),
    "pdmix_q8_0_gemm": ([_p, _p, _i64, _p, _p, _i64, _i64, _p, _int], _int),
    "pdmix_s8gemm_isa": ([], _int),
    "pdmix_w8a8_linear_run": ([_p, _p, _int, _i64, _p, _i64, _p, _int, _int], _int),
    "pdmix_decode_attention": ([_p, _int, _i64, _i64, _i64, _i64, _p, _p, _int, _i64, _p, _i64, _p, _f32, _p, _int,
                                _p, _p, _i64, _i64, _p], _int),
    "pdmix_bf16_linear": ([_p, _i64, _p, _i64, _i64, _p, _p, _int], None),
    "pdmix_bf16gemm_isa": ([], _int),
    "pdmix_rms_norm": ([_p, _int, _i64, _i64, _p, _p, _f32, _p, _int], None),
    "pdmix_rotary": ([_p, _int, _i64, _i64, _i64, _i64, _p, _p, _int], None),
    "pdmix_attention_block": ([_p, _p, _p, _i64, _i64, _p, _p, _p, _p, _int], _int),
    "pdmix_linear_residual": ([_p, _p, _i64, _i64, _p, _p, _int], _int),
    "pdmix_decode_layers": ([_p, _i64, _p, _p, _p, _i64, _i64, _int], _int),
    "pdmix_kv_write": ([_p, _p, _int, _i64, _i64, _i64, _i64, _i64, _p, _p, _p, _int, _i64], None),
}


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
            proc = subprocess.run([cc, *flags, "-shared", "-fPIC", *map(str, SOURCES), "-o", str(tmp), "-lm"],
                                  capture_output=True, text=True, timeout=300)
        except (OSError, subprocess.TimeoutExpired) as e:
            return f"cannot run the C compiler {cc!r} ({e.__class__.__name__}: {e})"
        if proc.returncode == 0:
            os.replace(tmp, out)
            return None
        tmp.unlink(missing_ok=True)
        why = f"{cc} failed to build pdmix's C kernels: {(proc.stderr.strip().splitlines() or ['?'])[-1][:200]}"
    return why


@functools.cache
def library() -> tuple[ctypes.CDLL | None, str | None]:
    """(the loaded library, None), or (None, why it is unavailable)."""
    cc = os.environ.get("CC", "cc")
    try:
        version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.TimeoutExpired) as e:
        return None, f"no C compiler to build pdmix's C kernels ({cc}: {e.__class__.__name__})"
    digest = hashlib.sha256(version.encode() + platform.machine().encode() + repr(FLAGS).encode())
    for source in sorted(CSRC.glob("*.[ch]")):
        digest.update(source.name.encode() + source.read_bytes())
    path = build_dir() / f"pdmix-kernels-{digest.hexdigest()[:16]}.so"
    if not path.exists() and (why := compile_library(cc, path)):
        return None, why
    try:
        lib = ctypes.CDLL(str(path))
    except OSError as e:
        return None, f"cannot load {path}: {e}"
    for name, (args, result) in SIGNATURES.items():
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = args, result
    return lib, None


def isa() -> str | None:
    """The path the library runs on this CPU ("avx512_vnni", "avx2" or "plain"; PDMIX_S8GEMM_ISA=plain or
    avx2 caps it), None if it is unavailable."""
    lib = library()[0]
    return None if lib is None else ISAS[lib.pdmix_s8gemm_isa()]


ISAS = {3: "avx512_vnni", 2: "avx2", 1: "plain"}
