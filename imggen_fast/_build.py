"""Builds the C++ (and, on CUDA machines, CUDA) kernels in ``csrc/`` on first use.

The sources are compiled with :func:`torch.utils.cpp_extension.load` and ninja into a
shared library that registers its ops with ``TORCH_LIBRARY(imggen_fast, m)``; there
is no Python module in it, the ops appear under ``torch.ops.imggen_fast``.

The library is cached in a directory keyed by a hash of the sources, the build flags,
the torch version, the compiler and, for CUDA builds, the GPU architectures compiled
for, so a second process (or a second run) loads it without compiling.
``IMGGEN_FAST_CACHE`` moves the cache. Each build records the size and SHA-256 of the
library it made; a library that no longer matches its record (truncated, say) is never
loaded, it is rebuilt. Builds into one directory are serialised by an OS lock
(``flock``) on a file, which the kernel releases when its holder exits, however it
exits: there is no stale lock to detect or remove.

``import imggen_fast`` loads a verified cached library (:func:`load_cached`, which
never builds); the first call that needs a kernel, or :func:`load`, builds it if needed.

A failure is reported once per process, as a :class:`BuildWarning` saying what
failed (no compiler, a compile error, an unwritable cache, a library that will not
load, a lock held too long) and the fix for that case, and remembered: callers then
use the eager reference implementation.
"""

from __future__ import annotations

import dataclasses
import fcntl
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
from collections.abc import Callable
from pathlib import Path

import torch

EXTENSION_NAME = "imggen_fast_C"
LOCK_TIMEOUT_VARIABLE = "IMGGEN_FAST_LOCK_TIMEOUT"
# Longer than a cold build of every source takes on a small machine, so that a waiting
# process gives up only on a build that hangs.
DEFAULT_LOCK_TIMEOUT_SECONDS = 600.0
# Bumped when the layout of a cache directory changes, so that code of another layout
# never reads this one's files.
_CACHE_FORMAT = "2"
# torch's own builder writes this baton while it runs; a killed build leaves it behind.
_TORCH_BATON_NAME = "lock"
_LOG_TAIL_LINES = 25
_NOT_BUILT = "no build is recorded"


class BuildWarning(UserWarning):
    """The C++ kernels are unavailable; the reference implementation serves calls."""


class BuildFailure(RuntimeError):
    """Why the kernels are unavailable: ``problem`` (one line: what failed), ``details``
    (the compiler's or loader's own lines, possibly empty) and ``fix`` (what to do)."""

    def __init__(self, problem: str, fix: str, details: str = "") -> None:
        super().__init__(problem if not details else f"{problem}\n{details}")
        self.problem = problem
        self.fix = fix
        self.details = details


class BuildLockTimeout(BuildFailure):
    """Another process held the build lock for longer than the timeout."""


@dataclasses.dataclass(frozen=True)
class BuildStatus:
    """What :func:`load` found: whether the ops are usable, where they live, and why not.

    ``error``: what failed, then the compiler's or loader's lines; ``fix``: what to do."""

    available: bool
    cache_dir: Path
    built_now: bool = False
    seconds: float = 0.0
    error: str | None = None
    fix: str | None = None


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


def cuda_build_ruled_out() -> bool:
    """True when no CUDA sources can be built here, decided without querying a GPU (which
    would initialise CUDA, and forked child processes could no longer use it)."""
    if torch.version.cuda is None:
        return True
    from torch.utils.cpp_extension import CUDA_HOME

    return CUDA_HOME is None


def cuda_build_wanted() -> bool:
    """True when this torch can run CUDA kernels and a CUDA toolkit is present to build them."""
    return not cuda_build_ruled_out() and torch.cuda.is_available()


def cuda_architectures() -> str:
    """The GPU architectures the CUDA sources are compiled for, as torch's extension
    builder chooses them: ``$TORCH_CUDA_ARCH_LIST``, else the compute capability of
    every visible GPU."""
    requested = os.environ.get("TORCH_CUDA_ARCH_LIST", "").strip()
    if requested and requested != "native":
        return requested
    capabilities = {torch.cuda.get_device_capability(index) for index in range(torch.cuda.device_count())}
    return ";".join(f"{major}.{minor}" for major, minor in sorted(capabilities)) or "no visible GPU"


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
        _CACHE_FORMAT,
        torch.__version__,
        str(torch.version.cuda),
        compiler_identity(),
        " ".join(cxx_flags()),
        # A cache shared across machines (an NFS home, a container image) must not hand
        # code built for one GPU generation to another.
        f"{' '.join(cuda_flags())} for {cuda_architectures()}" if with_cuda else "cpu-only",
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


def lock_path(directory: Path) -> Path:
    """The file whose OS lock serialises the builds into ``directory``."""
    return directory / "imggen_fast.lock"


def record_path(directory: Path) -> Path:
    """The record of a finished build in ``directory``: the library's size and SHA-256."""
    return directory / "build-complete.json"


def lock_timeout() -> float:
    """Seconds to wait for another process's build: ``$IMGGEN_FAST_LOCK_TIMEOUT``, else
    :data:`DEFAULT_LOCK_TIMEOUT_SECONDS`."""
    value = os.environ.get(LOCK_TIMEOUT_VARIABLE)
    if value is None:
        return DEFAULT_LOCK_TIMEOUT_SECONDS
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if not seconds >= 0:
        raise BuildFailure(f"{LOCK_TIMEOUT_VARIABLE}={value!r} is not a number of seconds",
                           fix=f"set {LOCK_TIMEOUT_VARIABLE} to a number of seconds >= 0, or unset it")
    return seconds


class FileLock:
    """An exclusive OS lock (``flock``) on the file ``path``; a context manager.

    The kernel releases the lock when its holder closes the file or exits, however it
    exits, so a lock is never stale. The file's content (``pid host time`` of the holder)
    is for the message a waiting process prints, never for deciding anything; the file
    is never removed, because a process that removed it could lock a new file of the
    same name while another still holds the old one.

    When another process holds the lock, says once on stderr what is waited for and
    how to clear it, then waits up to ``timeout`` seconds (default :func:`lock_timeout`)
    and raises :class:`BuildLockTimeout`."""

    _POLL_SECONDS = 0.1

    def __init__(self, path: Path, timeout: float | None = None, waiting_for: str = "a build") -> None:
        self.path = path
        self.timeout = lock_timeout() if timeout is None else timeout
        self.waiting_for = waiting_for
        self._descriptor: int | None = None

    def _try_lock(self, descriptor: int) -> bool:
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        return True

    def holder(self) -> str:
        """Who holds the lock, as the holder recorded it (for messages only)."""
        try:
            pid, host, since = self.path.read_text().split()
            started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(since)))
        except (OSError, ValueError):
            return "a process that recorded no pid"
        return f"pid {pid} on host {host}, since {started}"

    def _clear_advice(self) -> str:
        return (f"The lock is released as soon as that process exits; to stop waiting, end that process, "
                f"or point IMGGEN_FAST_CACHE at another folder ({LOCK_TIMEOUT_VARIABLE} sets the wait)")

    def __enter__(self) -> FileLock:
        self.acquire()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.release()

    def acquire(self) -> None:
        """Takes the lock, waiting as described above; OSError if the file cannot be created."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        descriptor = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            if not self._try_lock(descriptor):
                holder = self.holder()
                print(f"imggen_fast: waiting up to {self.timeout:g} s for {self.waiting_for} by another "
                      f"process ({holder}; lock {self.path}). {self._clear_advice()}.",
                      file=sys.stderr, flush=True)
                deadline = time.monotonic() + self.timeout
                while not self._try_lock(descriptor):
                    if time.monotonic() >= deadline:
                        raise BuildLockTimeout(
                            f"waited {self.timeout:g} s for {self.waiting_for} by another process ({holder}; "
                            f"lock {self.path})",
                            fix=f"{self._clear_advice()}.")
                    time.sleep(self._POLL_SECONDS)
            os.ftruncate(descriptor, 0)
            os.pwrite(descriptor, f"{os.getpid()} {socket.gethostname()} {time.time()}".encode(), 0)
        except BaseException:
            os.close(descriptor)  # closing releases the lock, if it was taken
            raise
        self._descriptor = descriptor

    def release(self) -> None:
        """Clears the holder's record and releases the lock."""
        descriptor, self._descriptor = self._descriptor, None
        os.ftruncate(descriptor, 0)
        os.close(descriptor)


def _fingerprint(path: Path) -> dict[str, object]:
    """Size and SHA-256 of the file at ``path``."""
    digest = hashlib.sha256()
    size = 0
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
            size += len(block)
    return {"size": size, "sha256": digest.hexdigest()}


def cached_library_problem(directory: Path) -> str | None:
    """None when the library in ``directory`` matches the size and SHA-256 its build
    recorded; otherwise why it must not be loaded (a library truncated by a full disk or
    an interrupted copy would crash the process that maps it with SIGBUS)."""
    record = record_path(directory)
    if not record.is_file():
        return _NOT_BUILT
    library = library_path(directory)
    try:
        recorded = json.loads(record.read_text())["library"]
        actual = _fingerprint(library)
    except FileNotFoundError:
        return f"the cached library {library} is missing"
    except (OSError, ValueError, KeyError, TypeError) as error:
        return f"the build record {record} cannot be read ({error})"
    if actual != recorded:
        return (f"the cached library {library} does not match its build record (it has {actual['size']} bytes "
                f"and SHA-256 {actual['sha256']}; recorded: {recorded})")
    return None


def _failure_for_cache(directory: Path, error: OSError) -> BuildFailure:
    return BuildFailure(
        f"the kernel cache folder {directory} cannot be written ({error.strerror or error}: "
        f"{error.filename or directory})",
        fix=f"make {cache_root()} a folder this user can write, or set IMGGEN_FAST_CACHE to one")


def _check_toolchain() -> str:
    """The compiler's identity; BuildFailure if the compiler or ninja is missing."""
    from torch.utils import cpp_extension

    identity = compiler_identity()
    if identity.startswith("unusable"):
        raise BuildFailure(f"no working C++ compiler: {identity}",
                           fix="install a C++20 compiler (g++ 10 or newer, or clang 13 or newer) and make it "
                               "the `c++` on PATH, or point CXX at one")
    if not cpp_extension.is_ninja_available():
        raise BuildFailure("ninja, which torch needs to build C++ extensions, is not on PATH",
                           fix="pip install ninja (in this environment), or put a ninja binary on PATH")
    return identity


def _compile(directory: Path, with_cuda: bool, verbose: bool, identity: str) -> None:
    """Compiles and links the library into ``directory`` (and loads it: torch's builder does)."""
    from torch.utils import cpp_extension

    sources = [str(path) for path in source_files(with_cuda)]
    try:
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
    except (RuntimeError, subprocess.CalledProcessError) as error:
        message = str(error)
        output = getattr(error, "output", None)
        if isinstance(output, bytes):
            output = output.decode(errors="replace")
        if output:
            message += "\n" + output
        raise BuildFailure(
            f"{identity} could not compile the C++ kernels",
            details="Last lines of the build log:\n" + _tail(message),
            fix="the kernels need a C++20 compiler (g++ 10 or newer, or clang 13 or newer): install one and point "
                "CXX at it; run `imggen-fast build --verbose` for the whole log, and report it if the compiler "
                "is recent enough") from error
    except OSError as error:
        # torch's builder loads the library it linked: an OSError then is the loader's.
        if library_path(directory).is_file():
            raise _load_failure(library_path(directory), error) from error
        raise _failure_for_cache(directory, error) from error


def _load_failure(library: Path, error: BaseException) -> BuildFailure:
    # torch.ops.load_library wraps the loader's message (what is missing or wrong) in its own.
    messages = []
    while error is not None:
        messages.append(str(error))
        error = error.__cause__
    return BuildFailure(
        f"the built library {library} will not load",
        details="\n".join(messages),
        fix=f"rebuild it from scratch with `imggen-fast build --rebuild` (or delete {library.parent}); if it "
            f"still will not load, the loader's message above names what in this environment (torch "
            f"{torch.__version__}, the C++ runtime, OpenMP) does not match")


def _load_library(library: Path) -> None:
    try:
        torch.ops.load_library(str(library))
    except (OSError, RuntimeError) as error:
        raise _load_failure(library, error) from error


def _clear(directory: Path, everything: bool) -> None:
    """Removes the build record and the library from ``directory`` (so that ninja links
    again from its objects), or, with ``everything``, all but the lock file, which a
    waiting process may hold open. The record goes first: from then on no process takes
    the library for a finished build."""
    record_path(directory).unlink(missing_ok=True)
    library_path(directory).unlink(missing_ok=True)
    # We hold the lock, so nobody else builds here: a baton torch's builder left is stale.
    (directory / _TORCH_BATON_NAME).unlink(missing_ok=True)
    if everything:
        for path in directory.iterdir():
            if path == lock_path(directory):
                continue
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()


def _compile_and_record(directory: Path, with_cuda: bool, verbose: bool) -> float:
    """Compiles into ``directory`` (the caller holds its lock), records the library's size
    and hash, and returns the seconds it took. Says on stderr, once, that it builds."""
    identity = _check_toolchain()
    print(f"imggen_fast: building the C++ kernels for these sources into {directory} (once per version of "
          f"the sources; usually 1 to 3 minutes{', more with the CUDA sources' if with_cuda else ''})...",
          file=sys.stderr, flush=True)
    started = time.perf_counter()
    _compile(directory, with_cuda, verbose, identity)
    seconds = time.perf_counter() - started
    record = {
        "library": _fingerprint(library_path(directory)),
        "sources": [str(path) for path in source_files(with_cuda)],
        "torch": torch.__version__,
        "compiler": identity,
        "cuda_architectures": cuda_architectures() if with_cuda else None,
        "seconds": round(seconds, 1),
    }
    # Written whole, then renamed into place: a reader sees no record or a complete one.
    partial = record_path(directory).with_suffix(f".{os.getpid()}.partial")
    partial.write_text(json.dumps(record, indent=1))
    os.replace(partial, record_path(directory))
    print(f"imggen_fast: built the C++ kernels in {seconds:.0f} s.", file=sys.stderr, flush=True)
    return seconds


def _build_and_load(verbose: bool, rebuild: bool) -> BuildStatus:
    started = time.perf_counter()
    with_cuda = cuda_build_wanted()
    try:
        directory = cache_dir(with_cuda)
    except OSError as error:
        raise BuildFailure(f"the C++ sources cannot be read: {error}",
                           fix="reinstall imggen_fast (pip install --force-reinstall imggen_fast)") from error
    library = library_path(directory)
    if not rebuild and cached_library_problem(directory) is None:
        _load_library(library)
        return BuildStatus(True, directory, seconds=time.perf_counter() - started)
    lock = FileLock(lock_path(directory), waiting_for="the C++ kernels to be built")
    try:
        lock.acquire()
    except OSError as error:
        raise _failure_for_cache(directory, error) from error
    try:
        # Another process may have built (or rebuilt) it while this one waited.
        problem = _NOT_BUILT if rebuild else cached_library_problem(directory)
        if problem is None:
            _load_library(library)
            return BuildStatus(True, directory, seconds=time.perf_counter() - started)
        if problem != _NOT_BUILT:
            print(f"imggen_fast: {problem}: building it again.", file=sys.stderr, flush=True)
        try:
            _clear(directory, everything=rebuild)
            seconds = _compile_and_record(directory, with_cuda, verbose)
        except OSError as error:  # the compiler's and the loader's own are classified in _compile
            raise _failure_for_cache(directory, error) from error
    finally:
        lock.release()
    return BuildStatus(True, directory, built_now=True, seconds=seconds)


_state_lock = threading.Lock()
_status: BuildStatus | None = None
_on_load_callbacks: list[Callable[[], None]] = []


def on_load(callback: Callable[[], None]) -> None:
    """Runs ``callback()`` once the library is loaded (now, if it already is).

    The ops modules attach fake implementations and autograd to the C++ ops this way,
    which exist only after the library is loaded. Each callback runs once, whether it was
    registered before or after the load."""
    with _state_lock:
        loaded = _status is not None and _status.available
        if not loaded:
            _on_load_callbacks.append(callback)
    if loaded:
        callback()


def _tail(text: str, lines: int = _LOG_TAIL_LINES) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


def _failed_status(failure: BuildFailure, directory: Path) -> BuildStatus:
    """The status of a failure, warned once (this is called once per process)."""
    status = BuildStatus(False, directory, error=str(failure), fix=failure.fix)
    warnings.warn(
        "imggen_fast: the C++ kernels are unavailable, so calls on CPU tensors use the eager reference "
        "implementation (same results, slower).\n"
        f"What failed: {status.error}\n"
        f"To fix: {status.fix}",
        BuildWarning,
        stacklevel=4,
    )
    return status


def _settle(status: BuildStatus) -> list[Callable[[], None]]:
    """Remembers ``status`` for the process (the caller holds ``_state_lock``) and returns
    the callbacks to run if the library is now loaded."""
    global _status
    _status = status
    callbacks = list(_on_load_callbacks) if status.available else []
    _on_load_callbacks.clear()
    return callbacks


def _directory_for_report() -> Path:
    try:
        return cache_dir()
    except OSError:
        return cache_root()


def load(verbose: bool = False, rebuild: bool = False) -> BuildStatus:
    """Builds (if needed) and loads the kernels once per process; never raises for a failed build.

    Returns the :class:`BuildStatus`; on failure, warns once with what failed and the fix,
    and every later call returns the same failed status at no cost. ``rebuild``: compile
    from scratch even if a verified build is cached (a process that has loaded the library
    keeps it; later processes load the new one)."""
    if _status is not None and not rebuild:
        return _status
    with _state_lock:
        if _status is not None and not rebuild:
            return _status
        try:
            status = _build_and_load(verbose, rebuild)
        except BuildFailure as failure:
            status = _failed_status(failure, _directory_for_report())
        already_loaded = _status is not None and _status.available
        callbacks = [] if already_loaded else _settle(status)
    for callback in callbacks:
        callback()
    return status


def load_cached() -> BuildStatus:
    """Loads the library for the current sources if a verified build of it is in the cache;
    never builds, never raises (``import imggen_fast`` calls it).

    Returns this process's status. A library that is not built yet, or no longer matches
    its build record, is not a failure: the status says why it is not loaded, and the next
    :func:`load` builds it. A verified library that will not load is one: it is warned
    about once and remembered, like a failed build. Where choosing between the CPU and the
    CUDA build would need a GPU query (a CUDA torch with a CUDA toolkit), nothing is
    loaded here: the first call that needs a kernel, or :func:`load`, loads it."""
    if _status is not None:
        return _status
    with _state_lock:
        if _status is not None:
            return _status
        try:
            if not cuda_build_ruled_out():
                return BuildStatus(False, cache_root(), error="not loaded at import: choosing between the CPU "
                                   "and the CUDA build would initialise CUDA; load() loads it")
            directory = cache_dir(with_cuda=False)
        except OSError as error:  # unreadable sources: load() reports it with the fix
            return BuildStatus(False, cache_root(), error=str(error))
        problem = cached_library_problem(directory)
        if problem is not None:
            return BuildStatus(False, directory, error=problem)
        try:
            _load_library(library_path(directory))
            status = BuildStatus(True, directory)
        except BuildFailure as failure:
            status = _failed_status(failure, directory)
        callbacks = _settle(status)
    for callback in callbacks:
        callback()
    return status


def status() -> BuildStatus | None:
    """The outcome of :func:`load` (or of :func:`load_cached` finding a verified build) in this
    process, or None if neither has settled it yet."""
    return _status


def clear_cache() -> None:
    """Removes every cached build (all source versions)."""
    shutil.rmtree(cache_root(), ignore_errors=True)
