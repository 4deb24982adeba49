"""Which implementation serves a call, and why: the one place where that is decided.

Every op has one schema, one autograd formula and one autocast rule (C++, ``csrc/``), and
up to three kernels behind them: the C++ CPU kernel (``cpp``), the CUDA C++ kernel
(``cuda``) and the Triton launcher (``triton``). Beside them stands the eager
``reference`` (``imggen_fast/reference.py``), the ground truth. Per call, from the device
of the tensors:

* ``auto`` (the default): CPU tensors → ``cpp``. CUDA tensors → ``cuda``: the layers run
  cuDNN / cuBLAS through ATen with the fused epilogue in place on their output, and the
  elementwise ops run the CUDA C++ kernels, whose launch costs no Python (the layers of
  DCGAN- and VAE-sized models are launch-bound). Where this build has no CUDA kernels
  (no CUDA toolkit when it was built), the elementwise ops run their Triton launchers
  instead. Anything else, or a C++ build that failed → ``reference``.
* A named backend is used as asked; one that cannot serve the call (Triton on CPU tensors
  without ``TRITON_INTERPRET=1``, CUDA C++ without a GPU, C++ whose build failed) raises
  :class:`BackendUnavailable` instead of switching silently. ``triton`` also runs the
  convolutions themselves in Triton's implicit-GEMM kernel (unmeasured on a GPU so far).
* With ``TRITON_INTERPRET=1`` the ``triton`` backend accepts CPU tensors and runs the
  Triton kernels in Triton's interpreter: how the tests check them without a GPU.
* A configuration a kernel does not cover (``groups > 1`` in Triton, say) goes to the
  reference with a one-time warning that says why.

The choice is per thread: ``IMGGEN_FAST_BACKEND`` sets the default of every thread,
:func:`set_backend` the calling thread's (and, as a context manager, restores it on exit).
The C++ kernels learn a thread's choice of Triton through
``torch.ops.imggen_fast._set_triton_chosen`` (csrc/backend.h); an op's backward runs with
the choice its forward ran with. Code compiled by ``torch.compile`` keeps the choice in
force when it was compiled.
"""

from __future__ import annotations

import importlib.util
import os
import threading
import warnings

import torch

from . import _build

BACKENDS = ("auto", "cpp", "cuda", "triton", "reference")
KERNEL_BACKENDS = ("cpp", "cuda", "triton")
ENVIRONMENT_VARIABLE = "IMGGEN_FAST_BACKEND"


class BackendUnavailable(RuntimeError):
    """The backend that was asked for cannot serve this call."""


class FallbackWarning(UserWarning):
    """A call went to the reference implementation; the message says why."""


def validated(name: object, source: str) -> str:
    """``name`` lower-cased if it names a backend, else a ValueError naming ``source``."""
    if not isinstance(name, str) or name.lower() not in BACKENDS:
        raise ValueError(f"{source}: unknown backend {name!r}; choose one of {', '.join(BACKENDS)}")
    return name.lower()


class _ThreadState(threading.local):
    """One thread's backend setting, its resolved choices per device, and what the C++
    kernels were last told."""

    def __init__(self) -> None:
        self.requested: str | None = None  # None: the process default
        self.resolved: dict[tuple[str, str], tuple[str, str | None]] = {}
        self.triton_told: bool = False


_thread = _ThreadState()
_process_default: str | None = None  # read from the environment on first use


def default_backend() -> str:
    """``$IMGGEN_FAST_BACKEND`` (validated), else ``auto``: every thread's default."""
    global _process_default
    if _process_default is None:
        _process_default = validated(os.environ.get(ENVIRONMENT_VARIABLE, "auto"), ENVIRONMENT_VARIABLE)
    return _process_default


def get_backend() -> str:
    """The backend the calling thread asked for: :func:`set_backend`'s argument, else the default."""
    return _thread.requested or default_backend()


def _tell_cpp(requested: str) -> None:
    """Tells the C++ kernels of this thread whether Triton was chosen (once the library is loaded)."""
    chosen = requested == "triton"
    if _thread.triton_told != chosen:
        status = _build.status()
        if status is not None and status.available:
            torch.ops.imggen_fast._set_triton_chosen(chosen)
            _thread.triton_told = chosen


class set_backend:  # noqa: N801 - used like a function: set_backend("cpp")
    """Selects the backend for later calls in the calling thread; also a context manager
    that restores the thread's previous choice on exit::

        imggen_fast.set_backend("reference")
        with imggen_fast.set_backend("triton"):
            ...

    Other threads keep their own choice (``IMGGEN_FAST_BACKEND``'s, unless they set one)."""

    def __init__(self, name: str) -> None:
        chosen = validated(name, "set_backend(name)")
        self.previous = _thread.requested
        if chosen == "triton" and triton_installed():
            _register_triton_launchers()
        _thread.requested = chosen
        _tell_cpp(chosen)

    def __enter__(self) -> set_backend:
        return self

    def __exit__(self, *exc_info: object) -> None:
        _thread.requested = self.previous
        _tell_cpp(get_backend())


def triton_interpreting() -> bool:
    """True when Triton kernels run in Triton's interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_installed() -> bool:
    """True when the triton package can be imported (without importing it)."""
    return importlib.util.find_spec("triton") is not None


def _register_triton_launchers() -> None:
    # Imported here: registering imports Triton, which only the Triton backend needs.
    from .ops import _registration

    _registration.register_triton_launchers()


def why_not(backend: str, device_type: str) -> str | None:
    """Why ``backend`` cannot serve tensors on ``device_type``, or None if it can."""
    if backend == "reference":
        return None
    if device_type == "cuda" and not torch.cuda.is_available():
        return "no CUDA GPU is available to this torch"
    if backend == "cpp" and device_type != "cpu":
        return f"the cpp backend runs on CPU tensors, these are on {device_type} (use 'cuda' or 'triton')"
    if backend == "cuda":
        if device_type != "cuda":
            return f"the CUDA C++ kernels need CUDA tensors, these are on {device_type}"
        if not _build.cuda_build_wanted():
            return "no CUDA toolkit (CUDA_HOME) was found to build the CUDA kernels"
    if backend == "triton":
        if not triton_installed():
            return "Triton is not installed (pip install triton; Linux x86-64 only)"
        if device_type == "cpu" and not triton_interpreting():
            return ("Triton kernels need a CUDA GPU; on CPU tensors they run only in Triton's interpreter: "
                    "set TRITON_INTERPRET=1 before importing triton")
        if device_type not in ("cpu", "cuda"):
            return f"Triton kernels do not run on {device_type} tensors"
    if backend not in KERNEL_BACKENDS:
        raise ValueError(f"unknown backend {backend!r}")
    # Every kernel backend needs the C++ library: it holds the ops' schemas and autograd.
    status = _build.load()
    return None if status.available else f"the C++ kernels failed to build:\n{status.error}"


def auto_choice(device_type: str) -> tuple[str, str]:
    """(backend, why) that ``auto`` picks for tensors on ``device_type``."""
    if device_type == "cpu":
        reason = why_not("cpp", "cpu")
        if reason is None:
            return "cpp", "the C++ CPU kernels are built"
        return "reference", f"the C++ kernels are not usable ({reason.splitlines()[0]})"
    if device_type == "cuda":
        reason = why_not("cuda", "cuda")
        if reason is None:
            return "cuda", ("cuDNN / cuBLAS through ATen with the fused epilogue; the CUDA C++ kernels for the "
                            "elementwise ops (no Python per launch)")
        if why_not("triton", "cuda") is None:
            return "triton", (f"no CUDA C++ kernels ({reason.splitlines()[0]}): cuDNN / cuBLAS for the layers, "
                              "the Triton launchers for the elementwise ops")
        return "reference", f"neither the CUDA C++ kernels nor Triton are usable ({reason.splitlines()[0]})"
    return "reference", f"no kernel runs on {device_type} tensors"


_warned: set[str] = set()


def warn_once(key: str, message: str) -> None:
    """Emits ``message`` as a :class:`FallbackWarning` the first time ``key`` is seen."""
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, FallbackWarning, stacklevel=4)


def _resolve(requested: str, device_type: str) -> tuple[str, str | None]:
    """(backend, why the reference serves where ``auto`` found no kernel, else None)."""
    if requested == "auto":
        chosen, why = auto_choice(device_type)
        if chosen == "triton":
            _register_triton_launchers()
        return chosen, (why if chosen == "reference" else None)
    reason = why_not(requested, device_type)
    if reason is not None:
        raise BackendUnavailable(f"imggen_fast backend {requested!r} cannot serve this call: {reason}")
    if requested == "triton":
        _register_triton_launchers()
    return requested, None


@torch.compiler.assume_constant_result
def choose(device_type: str) -> str:
    """The backend serving a call on ``device_type`` tensors in the calling thread: one of
    ``cpp``, ``cuda``, ``triton``, ``reference``. Builds the C++ kernels on first use.

    Raises :class:`BackendUnavailable` when a backend named explicitly cannot serve it.
    Under ``torch.compile`` it runs once, when the code is compiled."""
    requested = get_backend()
    key = (requested, device_type)
    resolved = _thread.resolved.get(key)
    if resolved is None:
        resolved = _thread.resolved[key] = _resolve(requested, device_type)
    backend, fallback_reason = resolved
    if fallback_reason is not None:
        warn_once(f"device:{device_type}", f"imggen_fast: {fallback_reason}; using the reference implementation")
    elif backend != "reference":
        _tell_cpp(requested)
    return backend


@torch.compiler.assume_constant_result
def falls_back(op_name: str, backend: str, reason: str | None) -> bool:
    """True when ``reason`` says why the chosen kernel does not cover a call of ``op_name``:
    the call then goes to the reference, with a one-time warning naming the reason."""
    if reason is None or backend == "reference":
        return False
    warn_once(f"{op_name}:{reason}", f"imggen_fast.{op_name}: {reason}; using the reference implementation")
    return True
