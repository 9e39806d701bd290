"""Build and load the native CPU kernel of the fused focal loss (``harmonic/ops/csrc/focal_loss.c``).

The kernel is plain C (no Python or torch headers), compiled on first use with the machine's C compiler
(``$CC``, else ``cc``, ``gcc`` or ``clang``) for the machine's own instruction set, and loaded with
:mod:`ctypes`: building takes well under a second, where a torch C++ extension would take a minute. The
shared library is cached under ``$HARMONIC_CACHE_DIR`` (default ``$XDG_CACHE_HOME/harmonic`` or
``~/.cache/harmonic``), keyed by the source, the compiler, the flags and the CPU, and written atomically,
so concurrent processes (``torchrun``) build it at most once each and never load a half-written file.

Nothing here is required: where no compiler works, :func:`load` returns None, :func:`failure` says why,
and :mod:`harmonic.ops.focal` computes the same values with torch operations (the "eager" backend).
A loaded library is checked against a float64 evaluation of the same formulas on a few hundred logits
before it is used: a miscompiled kernel is refused, not trusted.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

__all__ = ["CACHE_ENV", "SOURCE", "Built", "build", "build_command", "cache_dir", "failure", "info", "load", "reset"]

#: the kernel's C source, shipped inside the package
SOURCE = Path(__file__).with_name("csrc") / "focal_loss.c"
#: environment variable naming the folder where built kernels are cached
CACHE_ENV = "HARMONIC_CACHE_DIR"
#: the ABI number the source reports (``harmonic_focal_abi()``); a library that differs is refused
ABI = 1
#: compiler flag sets, tried in order until one builds (the first vectorizes for this CPU with 512-bit
#: registers where it has them; the last is plain portable C). ``-fno-trapping-math`` (clang's default)
#: lets the compiler evaluate both sides of the formulas' selects in a vector loop: without it gcc
#: keeps the portable loop scalar (a branch it threads into the e^x clamp; the README's bench-avx2 block
#: measures the vectorized loop on such a CPU). It changes no value (IEEE arithmetic in the written
#: order); only the floating-point exception flags, which nothing reads, are no longer kept exact.
FLAG_SETS = (
    ("-O3", "-march=native", "-mprefer-vector-width=512", "-fopenmp-simd", "-fno-trapping-math"),
    ("-O3", "-march=native", "-fopenmp-simd", "-fno-trapping-math"),
    ("-O3", "-march=native"),
    ("-O3",),
)
BASE_FLAGS = ("-std=gnu99", "-shared", "-fPIC", "-fno-fast-math")

_LOCK = threading.Lock()
_STATE: dict[str, object] = {}


@dataclass(frozen=True)
class Built:
    """A built and self-tested kernel: the loaded ``library``, its file, compiler and flags."""

    library: ctypes.CDLL
    path: Path
    compiler: str
    flags: tuple[str, ...]

    @property
    def avx512(self) -> bool:
        """Whether the library runs the AVX-512 loop (else the portable, compiler-vectorized one)."""
        return bool(self.library.harmonic_focal_avx512())


def cache_dir() -> Path:
    """Where built kernels are kept: ``$HARMONIC_CACHE_DIR``, else ``$XDG_CACHE_HOME/harmonic``, else
    ``~/.cache/harmonic``."""
    explicit = os.environ.get(CACHE_ENV, "").strip()
    if explicit:
        return Path(explicit).expanduser()
    base = os.environ.get("XDG_CACHE_HOME", "").strip() or str(Path.home() / ".cache")
    return Path(base).expanduser() / "harmonic"


def _compilers() -> list[str]:
    explicit = os.environ.get("CC", "").strip()
    if explicit:
        return [explicit]
    return [name for name in ("cc", "gcc", "clang") if shutil.which(name)]


def _cpu_signature() -> str:
    """The instruction-set identity of this CPU (``-march=native`` code is built for it alone)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as handle:
            for line in handle:
                if line.startswith(("flags", "Features")):
                    return line.strip()
    except OSError:
        pass
    return f"{platform.machine()} {platform.processor()}"


def _compiler_identity(compiler: str) -> str | None:
    try:
        result = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return result.stdout.strip() if result.returncode == 0 else None


def _library_path(folder: Path, source: bytes, compiler: str, identity: str, flags: tuple[str, ...]) -> Path:
    key = hashlib.sha256()
    every_flag = " ".join((*BASE_FLAGS, *flags)).encode()  # in build_command's order
    for part in (source, compiler.encode(), identity.encode(), every_flag, _cpu_signature().encode()):
        key.update(part)
        key.update(b"\0")
    return folder / f"focal_loss-{key.hexdigest()[:20]}{'.dll' if os.name == 'nt' else '.so'}"


def build_command(compiler: str, flags: tuple[str, ...], output: str | Path) -> list[str]:
    """The compiler's command line that builds the kernel with ``flags`` into ``output``. The flag set
    comes after :data:`BASE_FLAGS`: ``-fno-fast-math`` restores gcc's default ``-ftrapping-math``, so a
    set's ``-fno-trapping-math`` must follow it to count."""
    return [compiler, *BASE_FLAGS, *flags, str(SOURCE), "-o", str(output)]


def _build(compiler: str, flags: tuple[str, ...], target: Path) -> str | None:
    """Compile the source to ``target`` atomically; None on success, else the compiler's complaint."""
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=target.stem + ".", suffix=".tmp", dir=target.parent)
    os.close(handle)
    try:
        command = build_command(compiler, flags, temporary)
        result = subprocess.run(command, capture_output=True, text=True, timeout=300)
        if result.returncode != 0:
            lines = (result.stderr or result.stdout).strip().splitlines()
            errors = [line for line in lines if "error" in line.lower()]
            detail = (errors or lines or [f"exit status {result.returncode}"])[0]
            return f"{compiler} {' '.join(flags)}: {detail}"
        os.replace(temporary, target)
        return None
    except (OSError, subprocess.SubprocessError) as err:
        return f"{compiler}: {err}"
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)


def _bind(path: Path) -> ctypes.CDLL:
    library = ctypes.CDLL(str(path))
    for name in ("harmonic_focal_abi", "harmonic_focal_avx512"):
        getattr(library, name).restype = ctypes.c_int
        getattr(library, name).argtypes = []
    function = library.harmonic_focal_f32
    function.restype = ctypes.c_int
    function.argtypes = [
        ctypes.c_void_p,  # logits
        ctypes.c_void_p,  # gt_classes
        ctypes.c_void_p,  # grad (or NULL)
        ctypes.c_void_p,  # row_loss
        ctypes.c_int64,  # rows
        ctypes.c_int64,  # cols
        ctypes.c_float,  # w_pos
        ctypes.c_float,  # w_neg
        ctypes.c_float,  # gamma
    ]
    return library


def _self_test(library: ctypes.CDLL) -> str | None:
    """Compare the kernel with a float64 evaluation of the same formulas; None if it agrees."""
    import torch

    if library.harmonic_focal_abi() != ABI:
        return f"the built library reports ABI {library.harmonic_focal_abi()}, expected {ABI}"
    logits = torch.linspace(-30.0, 30.0, 7 * 41, dtype=torch.float32).reshape(41, 7)
    gt_classes = torch.arange(41, dtype=torch.int64) % 9 - 2  # -2 -> -1 below; classes 0..6
    gt_classes = gt_classes.clamp_min(-1)
    for gamma, w_pos, w_neg in ((2.0, 0.25, 0.75), (1.5, 1.0, 1.0)):
        grad = torch.empty_like(logits)
        loss = torch.empty(41, dtype=torch.float32)
        status = library.harmonic_focal_f32(
            logits.data_ptr(), gt_classes.data_ptr(), grad.data_ptr(), loss.data_ptr(), 41, 7, w_pos, w_neg, gamma
        )
        if status != 0:
            return f"self-test call returned {status}"
        # the closed form in float64 with torch's own sigmoid and softplus (no autograd: this may run
        # inside no_grad or inference_mode)
        x = logits.double()
        is_target = torch.zeros(x.shape, dtype=torch.bool)
        positive = gt_classes >= 0
        is_target[positive.nonzero().squeeze(1), gt_classes[positive]] = True
        z = torch.where(is_target, -x, x)
        weight = torch.where(is_target, w_pos, w_neg).double()
        p = torch.sigmoid(z)
        soft = torch.nn.functional.softplus(z)
        power = weight * p**gamma
        truth = (power * soft).sum(1)
        derivative = power * (gamma * (1 - p) * soft + p)
        truth_grad = torch.where(is_target, -derivative, derivative)
        if not (
            torch.allclose(loss.double(), truth, rtol=1e-5, atol=1e-30)
            and torch.allclose(grad.double(), truth_grad, rtol=1e-5, atol=1e-30)
        ):
            return f"self-test: the built kernel disagrees with float64 (gamma={gamma})"
    return None


def load() -> ctypes.CDLL | None:
    """The loaded kernel library (built on first use), or None where it cannot be built or loaded
    (:func:`failure` says why). The answer is kept for the life of the process."""
    with _LOCK:
        if "built" not in _STATE:
            _STATE["built"], _STATE["failure"] = build()
        built = _STATE["built"]
        return built.library if isinstance(built, Built) else None


def info() -> dict[str, object]:
    """What :func:`load` uses, for logs and benchmark records: ``{"available", "file", "compiler",
    "flags", "avx512"}`` or ``{"available": False, "failure"}``."""
    load()
    built = _STATE.get("built")
    if not isinstance(built, Built):
        return {"available": False, "failure": _STATE.get("failure")}
    return {
        "available": True,
        "file": built.path.name,
        "compiler": built.compiler,
        "flags": " ".join(built.flags),
        "avx512": built.avx512,
    }


def failure() -> str | None:
    """Why :func:`load` returned None (None when it has not been called or succeeded)."""
    return _STATE.get("failure")  # type: ignore[return-value]


def reset() -> None:
    """Forget the loaded library and any failure, so that the next :func:`load` tries again."""
    with _LOCK:
        _STATE.clear()


def build(extra_flags: tuple[str, ...] = ()) -> tuple[Built | None, str | None]:
    """Build (or find in the cache), load and self-test the kernel: ``(built, None)`` or ``(None, why)``.

    Tries each compiler and each of :data:`FLAG_SETS` (plus ``extra_flags``, e.g. ``-DHARMONIC_PORTABLE``)
    in order, in the cache folder and then in a per-user temporary folder. Used by :func:`load`, which
    keeps its answer; call it directly to build a variant (the tests build the portable loop this way).
    """
    try:
        source = SOURCE.read_bytes()
    except OSError as err:
        return None, f"cannot read the kernel source {SOURCE}: {err}"
    compilers = _compilers()
    if not compilers:
        return None, "no C compiler found (set CC, or install cc / gcc / clang)"
    user = os.getuid() if hasattr(os, "getuid") else "user"
    folders = [Path(tempfile.gettempdir()) / f"harmonic-{user}"]
    try:
        folders.insert(0, cache_dir())
    except (RuntimeError, KeyError):  # no home folder to put a cache in: the temporary folder only
        pass
    complaints: list[str] = []
    for compiler in compilers:
        identity = _compiler_identity(compiler)
        if identity is None:
            complaints.append(f"{compiler}: does not run")
            continue
        for base_flags in FLAG_SETS:
            flags = (*base_flags, *extra_flags)
            for folder in folders:
                path = _library_path(folder, source, compiler, identity, flags)
                if not path.exists():
                    try:
                        complaint = _build(compiler, flags, path)
                    except OSError as err:  # an unwritable cache folder: try the next one
                        complaints.append(f"{folder}: {err}")
                        continue
                    if complaint is not None:
                        complaints.append(complaint)
                        break  # these flags do not build here: the next flag set
                try:
                    library = _bind(path)
                except (OSError, AttributeError) as err:
                    complaints.append(f"loading {path.name}: {err}")
                    break
                problem = _self_test(library)
                if problem is None:
                    return Built(library, path, compiler, flags), None
                complaints.append(problem)
                path.unlink(missing_ok=True)  # a refused library is not kept for the next process
                break
    return None, "; ".join(complaints[-3:]) or "the kernel could not be built"
