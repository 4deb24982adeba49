"""Which implementation serves a call, and why.

Every fused op has up to four implementations: the C++ CPU kernel (``cpp``), the
Triton kernel (``triton``), the CUDA C++ kernel (``cuda``) and the eager
``reference``. Per call, from the device of the tensors:

* ``auto`` (the default): CPU tensors → ``cpp``; CUDA tensors → ``triton`` (or
  ``cuda`` where Triton is missing); anything else, or a C++ build that failed →
  ``reference``.
* A named backend (``IMGGEN_FAST_BACKEND`` or :func:`set_backend`) is used as asked;
  one that cannot serve the call (Triton on CPU tensors without
  ``TRITON_INTERPRET=1``, CUDA C++ without a GPU, C++ whose build failed) raises
  :class:`BackendUnavailable` instead of switching silently.
* With ``TRITON_INTERPRET=1`` the ``triton`` backend accepts CPU tensors and runs
  the Triton kernels in Triton's interpreter: how the tests, and users without a
  GPU, check them.
* A configuration a kernel does not cover (``groups > 1``, say) goes to the
  reference with a one-time warning that says why, whatever the backend.
"""

from __future__ import annotations

import importlib.util
import os
import warnings
from collections.abc import Callable

import torch

from . import _build

BACKENDS = ("auto", "cpp", "triton", "cuda", "reference")
ENVIRONMENT_VARIABLE = "IMGGEN_FAST_BACKEND"


class BackendUnavailable(RuntimeError):
    """The backend that was asked for cannot serve this call."""


class FallbackWarning(UserWarning):
    """A call went to the reference implementation; the message says why."""


def _validated(name: object, source: str) -> str:
    if not isinstance(name, str) or name.lower() not in BACKENDS:
        raise ValueError(f"{source}: unknown backend {name!r}; choose one of {', '.join(BACKENDS)}")
    return name.lower()


_requested: str | None = None  # None: not read from the environment yet
_generation = 0  # bumped by set_backend, so cached choices are dropped


def get_backend() -> str:
    """The backend asked for: ``set_backend``'s argument, else ``$IMGGEN_FAST_BACKEND``, else ``auto``."""
    global _requested
    if _requested is None:
        _requested = _validated(os.environ.get(ENVIRONMENT_VARIABLE, "auto"), ENVIRONMENT_VARIABLE)
    return _requested


class set_backend:  # noqa: N801 - used like a function: set_backend("cpp")
    """Selects the backend for later calls in this process; also a context manager
    that restores the previous choice on exit::

        imggen_fast.set_backend("reference")
        with imggen_fast.set_backend("triton"):
            ...
    """

    def __init__(self, name: str) -> None:
        global _requested, _generation
        chosen = _validated(name, "set_backend(name)")
        self.previous = get_backend()
        _requested = chosen
        _generation += 1

    def __enter__(self) -> set_backend:
        return self

    def __exit__(self, *exc_info: object) -> None:
        global _requested, _generation
        _requested = self.previous
        _generation += 1


def triton_interpreting() -> bool:
    """True when Triton kernels run in Triton's interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_installed() -> bool:
    """True when the triton package can be imported (without importing it)."""
    return importlib.util.find_spec("triton") is not None


def why_not(backend: str, device_type: str) -> str | None:
    """Why ``backend`` cannot serve tensors on ``device_type``, or None if it can."""
    if backend == "reference":
        return None
    if device_type == "cuda" and not torch.cuda.is_available():
        return "no CUDA GPU is available to this torch"
    if backend == "cpp":
        if device_type != "cpu":
            return f"the cpp backend runs on CPU tensors, these are on {device_type} (use 'cuda' or 'triton')"
        status = _build.load()
        return None if status.available else f"the C++ kernels failed to build:\n{status.error}"
    if backend == "triton":
        if not triton_installed():
            return "Triton is not installed (pip install triton; Linux x86-64 only)"
        if device_type == "cuda":
            return None
        if device_type == "cpu":
            return None if triton_interpreting() else (
                "Triton kernels need a CUDA GPU; on CPU tensors they run only in Triton's interpreter: "
                "set TRITON_INTERPRET=1 before importing triton")
        return f"Triton kernels do not run on {device_type} tensors"
    if backend == "cuda":
        if device_type != "cuda":
            return f"the CUDA C++ kernels need CUDA tensors, these are on {device_type}"
        if not _build.cuda_build_wanted():
            return "no CUDA toolkit (CUDA_HOME) was found to build the CUDA kernels"
        status = _build.load()
        return None if status.available else f"the C++/CUDA kernels failed to build:\n{status.error}"
    raise ValueError(f"unknown backend {backend!r}")


def auto_choice(device_type: str) -> str:
    """The backend ``auto`` picks for tensors on ``device_type``."""
    if device_type == "cpu":
        return "cpp" if why_not("cpp", "cpu") is None else "reference"
    if device_type == "cuda":
        for backend in ("triton", "cuda"):
            if why_not(backend, "cuda") is None:
                return backend
    return "reference"


_warned: set[str] = set()


def warn_once(key: str, message: str) -> None:
    """Emits ``message`` as a :class:`FallbackWarning` the first time ``key`` is seen."""
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, FallbackWarning, stacklevel=4)


def choose(device_type: str) -> str:
    """The backend serving a call on ``device_type`` tensors under the current setting.

    Raises :class:`BackendUnavailable` when an explicitly named backend cannot serve it."""
    requested = get_backend()
    if requested == "auto":
        chosen = auto_choice(device_type)
        if chosen == "reference" and device_type not in ("cpu", "cuda"):
            warn_once(f"device:{device_type}",
                      f"imggen_fast: no kernel runs on {device_type} tensors; using the reference implementation")
        elif chosen == "reference" and device_type == "cuda":
            warn_once("device:cuda", "imggen_fast: neither Triton nor the CUDA C++ kernels are usable "
                      f"({why_not('triton', 'cuda')}); using the reference implementation")
        return chosen
    reason = why_not(requested, device_type)
    if reason is not None:
        raise BackendUnavailable(f"imggen_fast backend {requested!r} cannot serve this call: {reason}")
    return requested


class Implementations:
    """The implementations of one op, resolved lazily (the C++ library is built and
    Triton imported only when first needed), and the per-call choice among them.

    Each argument is a function returning the callable for that backend, or None for
    a backend the op does not have (a call that names it raises)."""

    def __init__(self, op_name: str, *, reference: Callable,
                 cpp: Callable[[], Callable] | None = None,
                 triton: Callable[[], Callable] | None = None,
                 cuda: Callable[[], Callable] | None = None) -> None:
        self.op_name = op_name
        self.reference = reference
        self._loaders = {"cpp": cpp, "triton": triton, "cuda": cuda}
        self._resolved: dict[str, Callable] = {"reference": reference}
        self._by_device: dict[str, tuple[int, str, Callable]] = {}

    def _resolve(self, backend: str) -> Callable:
        implementation = self._resolved.get(backend)
        if implementation is None:
            loader = self._loaders[backend]
            if loader is None:
                raise BackendUnavailable(f"{self.op_name} has no {backend} implementation")
            implementation = self._resolved[backend] = loader()
        return implementation

    def select(self, device: torch.device, unsupported: str | None = None,
               uncovered_by: tuple[str, ...] | None = None) -> Callable:
        """The callable serving a call on ``device``.

        ``unsupported``: why the kernels do not cover this call's configuration, or None;
        such a call goes to the reference with a one-time warning naming the reason.
        ``uncovered_by``: the backends that reason applies to (default: every kernel)."""
        cached = self._by_device.get(device.type)
        if cached is None or cached[0] != _generation:
            backend = choose(device.type)
            cached = self._by_device[device.type] = (_generation, backend, self._resolve(backend))
        if unsupported is not None and cached[1] != "reference" and (
                uncovered_by is None or cached[1] in uncovered_by):
            warn_once(f"{self.op_name}:{unsupported}",
                      f"imggen_fast.{self.op_name}: {unsupported}; using the reference implementation")
            return self.reference
        return cached[2]

    def backend_for(self, device: torch.device) -> str:
        """The name of the backend :meth:`select` uses for ``device`` (for ``doctor`` and tests)."""
        self.select(device)
        return self._by_device[device.type][1]
