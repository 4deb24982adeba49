"""Builds the C++ (and, on CUDA machines, CUDA) kernels in ``csrc/`` on first use.

The sources are compiled with :func:`torch.utils.cpp_extension.load` and ninja into a
shared library that registers its ops with ``TORCH_LIBRARY(imggen_fast, m)``; there
is no Python module in it, the ops appear under ``torch.ops.imggen_fast``.

The library is cached in a directory keyed by a hash of the sources, the build flags,
the torch version and the compiler, so a second process (or a second run) loads it
without compiling. ``IMGGEN_FAST_CACHE`` moves the cache. A file lock with a timeout
guards the build against concurrent processes, and a lock left by a killed build is
detected (its process is gone, or it is older than any build takes) and cleared.

A failed build is reported once per process, as a :class:`BuildWarning` carrying
the compiler's last lines and what to do, and remembered: callers then use the
eager reference implementation.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

import torch

EXTENSION_NAME = "imggen_fast_C"
LOCK_TIMEOUT_SECONDS = 900.0
# No build takes this long; a lock this old was left by a process that died.
STALE_LOCK_SECONDS = 3600.0
_LOG_TAIL_LINES = 25


class BuildWarning(UserWarning):
    """The C++ kernels could not be built; the reference implementation serves calls."""


class BuildLockTimeout(RuntimeError):
    """Another live process held the build lock for longer than the timeout."""


@dataclasses.dataclass(frozen=True)
class BuildStatus:
    """What :func:`load` found: whether the ops are usable, where they live, and why not."""

    available: bool
    cache_dir: Path
    built_now: bool = False
    seconds: float = 0.0
    error: str | None = None


def csrc_dir() -> Path:
    """The ``csrc/`` folder: inside the installed package, or beside it in a source tree."""
    package_dir = Path(__file__).resolve().parent
    for candidate in (package_dir / "csrc", package_dir.parent / "csrc"):
        if (candidate / "registration.cpp").is_file():
            return candidate
    raise FileNotFoundError(
        f"imggen_fast: the C++ sources (csrc/registration.cpp) are neither in {package_dir / 'csrc'} "
        f"nor in {package_dir.parent / 'csrc'}; reinstall the package."
    )


def cuda_build_wanted() -> bool:
    """True when this torch can run CUDA kernels and a CUDA toolkit is present to build them."""
    from torch.utils.cpp_extension import CUDA_HOME

    return torch.version.cuda is not None and torch.cuda.is_available() and CUDA_HOME is not None


def source_files(with_cuda: bool) -> list[Path]:
    """The translation units of the library: the schemas and composites, the CPU kernels, and the
    CUDA kernels if wanted."""
    root = csrc_dir()
    # csrc/*.cpp: the schemas and the device-independent composites; csrc/cpu: CPU kernels.
    sources = [*sorted(root.glob("*.cpp")), *sorted((root / "cpu").glob("*.cpp"))]
    if with_cuda:
        sources += sorted((root / "cuda").glob("*.cu"))
    return sources


def _header_files() -> list[Path]:
    root = csrc_dir()
    return sorted(root.glob("*.h")) + sorted(root.glob("*/*.h"))


def cpu_capability() -> str:
    """The vector instruction set the CPU kernels are compiled for, as ATen names it."""
    capability = torch.backends.cpu.get_cpu_capability()
    return capability if capability in ("AVX2", "AVX512") else "DEFAULT"


_CAPABILITY_FLAGS = {
    "DEFAULT": [],
    "AVX2": ["-mavx2", "-mfma", "-mf16c"],
    "AVX512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c"],
}


def cxx_flags() -> list[str]:
    """Host compiler flags. ``CPU_CAPABILITY`` selects ATen's ``Vectorized`` width for the
    instruction set torch itself dispatches to on this CPU; OpenMP makes
    ``at::parallel_for`` parallel (torch's CPU build uses its OpenMP backend)."""
    capability = cpu_capability()
    flags = ["-O3", "-fopenmp", f"-DCPU_CAPABILITY={capability}"]
    if capability != "DEFAULT":
        flags.append(f"-DCPU_CAPABILITY_{capability}")
    return flags + _CAPABILITY_FLAGS[capability]


def cuda_flags() -> list[str]:
    """nvcc flags of the CUDA sources (the nvcc test compiles with the same)."""
    return ["-O3", "--expt-relaxed-constexpr"]


def compiler() -> str:
    """The C++ compiler torch's extension builder will call: $CXX, else c++."""
    return os.environ.get("CXX", "c++")


def compiler_identity() -> str:
    """First line of ``$CXX --version``, or a marker naming an unusable compiler."""
    try:
        result = subprocess.run([compiler(), "--version"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as error:
        return f"unusable {compiler()}: {error}"
    if result.returncode != 0:
        return f"unusable {compiler()}: exit status {result.returncode}"
    return result.stdout.splitlines()[0] if result.stdout else compiler()


def cache_key(with_cuda: bool) -> str:
    """Hash of everything the built library depends on."""
    digest = hashlib.sha256()
    root = csrc_dir()
    for path in sorted(set(source_files(with_cuda)) | set(_header_files())):
        digest.update(str(path.relative_to(root)).encode())
        digest.update(path.read_bytes())
    for part in (
        torch.__version__,
        str(torch.version.cuda),
        compiler_identity(),
        " ".join(cxx_flags()),
        " ".join(cuda_flags()) if with_cuda else "cpu-only",
        f"{sys.version_info.major}.{sys.version_info.minor}",
    ):
        digest.update(part.encode())
    return digest.hexdigest()


def cache_root() -> Path:
    """The folder holding every build: $IMGGEN_FAST_CACHE, else imggen_fast under
    $XDG_CACHE_HOME (default ~/.cache)."""
    override = os.environ.get("IMGGEN_FAST_CACHE")
    if override:
        return Path(override).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "imggen_fast"


def cache_dir(with_cuda: bool | None = None) -> Path:
    """The directory the library for the current sources, flags and toolchain is built in."""
    if with_cuda is None:
        with_cuda = cuda_build_wanted()
    version = torch.__version__.replace("+", "_")
    return cache_root() / f"torch{version}-{cache_key(with_cuda)[:16]}"


def library_path(directory: Path) -> Path:
    """The shared library a build in ``directory`` produces."""
    return directory / f"{EXTENSION_NAME}.so"


_DONE_MARKER = "build-complete.json"


class FileLock:
    """An exclusive lock file holding ``pid host time``; a context manager.

    A lock whose process no longer exists on this host, or that is older than
    ``stale_after`` seconds, is taken to be left by a killed build and removed.
    """

    def __init__(self, path: Path, timeout: float = LOCK_TIMEOUT_SECONDS,
                 stale_after: float = STALE_LOCK_SECONDS) -> None:
        self.path = path
        self.timeout = timeout
        self.stale_after = stale_after

    def _holder(self) -> tuple[int, str, float] | None:
        try:
            pid, host, started = self.path.read_text().split()
            return int(pid), host, float(started)
        except FileNotFoundError:
            return None
        except ValueError:
            # Half-written by a process killed between create and write: use the file age.
            try:
                return -1, "", self.path.stat().st_mtime
            except FileNotFoundError:
                return None

    def is_stale(self) -> bool:
        holder = self._holder()
        if holder is None:
            return False
        pid, host, started = holder
        if time.time() - started > self.stale_after:
            return True
        if host == socket.gethostname() and pid > 0:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return True
            except PermissionError:
                return False
        return False

    def __enter__(self) -> FileLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        deadline = time.monotonic() + self.timeout
        while True:
            try:
                descriptor = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                if self.is_stale():
                    self.path.unlink(missing_ok=True)
                    continue
                if time.monotonic() > deadline:
                    raise BuildLockTimeout(
                        f"imggen_fast: waited {self.timeout:.0f} s for the build lock {self.path} held by "
                        f"another process ({self.path.read_text().strip()!r}); remove it if no build is running."
                    ) from None
                time.sleep(0.2)
                continue
            with os.fdopen(descriptor, "w") as handle:
                handle.write(f"{os.getpid()} {socket.gethostname()} {time.time()}")
            return self

    def __exit__(self, *exc_info: object) -> None:
        self.path.unlink(missing_ok=True)


_state_lock = threading.Lock()
_status: BuildStatus | None = None
_on_load_callbacks: list = []


def on_load(callback) -> None:
    """Runs ``callback()`` once the library is loaded (now, if it already is).

    The ops modules attach fake implementations and autograd to the C++ ops this way,
    which exist only after the library is loaded."""
    with _state_lock:
        loaded = _status is not None and _status.available
        if not loaded:
            _on_load_callbacks.append(callback)
    if loaded:
        callback()


def _tail(text: str, lines: int = _LOG_TAIL_LINES) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


def _compile(directory: Path, with_cuda: bool, verbose: bool) -> None:
    from torch.utils import cpp_extension

    sources = [str(path) for path in source_files(with_cuda)]
    cpp_extension.load(
        name=EXTENSION_NAME,
        sources=sources,
        extra_cflags=cxx_flags(),
        extra_cuda_cflags=cuda_flags() if with_cuda else None,
        extra_ldflags=["-fopenmp"],
        extra_include_paths=[str(csrc_dir())],
        build_directory=str(directory),
        is_python_module=False,
        verbose=verbose,
    )


def _build_and_load(verbose: bool) -> BuildStatus:
    with_cuda = cuda_build_wanted()
    directory = cache_dir(with_cuda)
    library = library_path(directory)
    started = time.perf_counter()
    built_now = False
    if not (directory / _DONE_MARKER).is_file():
        directory.mkdir(parents=True, exist_ok=True)
        with FileLock(directory / "imggen_fast.lock"):
            if not (directory / _DONE_MARKER).is_file():
                # We hold the lock, so nobody else builds here: a baton left by
                # torch's own builder in a killed build is stale.
                (directory / "lock").unlink(missing_ok=True)
                _compile(directory, with_cuda, verbose)
                built_now = True
                (directory / _DONE_MARKER).write_text(json.dumps({
                    "sources": [str(path) for path in source_files(with_cuda)],
                    "torch": torch.__version__,
                    "compiler": compiler_identity(),
                    "seconds": round(time.perf_counter() - started, 1),
                }))
    if not built_now:
        torch.ops.load_library(str(library))
    return BuildStatus(True, directory, built_now, time.perf_counter() - started)


def load(verbose: bool = False) -> BuildStatus:
    """Builds (if needed) and loads the kernels once per process; never raises for a failed build.

    Returns the :class:`BuildStatus`; on failure, warns once with the compiler's last
    lines, and every later call returns the same failed status at no cost."""
    global _status
    if _status is not None:
        return _status
    with _state_lock:
        if _status is not None:
            return _status
        try:
            status = _build_and_load(verbose)
        except (RuntimeError, OSError, subprocess.CalledProcessError, ImportError) as error:
            try:
                directory = cache_dir()
            except OSError:
                directory = cache_root()
            message = str(error)
            output = getattr(error, "output", None)
            if isinstance(output, (str, bytes)) and output:
                message += "\n" + (output.decode(errors="replace") if isinstance(output, bytes) else output)
            status = BuildStatus(False, directory, error=_tail(message))
            warnings.warn(
                "imggen_fast: building the C++ kernels failed, so calls on CPU tensors use the eager "
                "reference implementation (same results, slower).\n"
                f"Compiler: {compiler()} ({compiler_identity()}); cache: {directory}\n"
                f"Last lines of the build log:\n{status.error}\n"
                "To fix: if no working compiler is installed, install a C++20 compiler (g++ 10 or newer) and "
                "ninja, or point CXX at one; then run `imggen-fast build --verbose` to see the whole log.",
                BuildWarning,
                stacklevel=3,
            )
        _status = status
        callbacks = list(_on_load_callbacks) if status.available else []
        _on_load_callbacks.clear()
    for callback in callbacks:
        callback()
    return status


def status() -> BuildStatus | None:
    """The outcome of :func:`load` in this process, or None if nothing was loaded yet."""
    return _status


def clear_cache() -> None:
    """Removes every cached build (all source versions)."""
    shutil.rmtree(cache_root(), ignore_errors=True)
