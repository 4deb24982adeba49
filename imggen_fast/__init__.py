"""imggen_fast: fused kernels for image-generation models in PyTorch.

Public names: :mod:`imggen_fast.functional`, :mod:`imggen_fast.nn`,
:mod:`imggen_fast.models`, :func:`patch` / :func:`unpatch` / :func:`patch_report`,
:func:`fuse_for_inference`, :func:`set_backend` /
:func:`get_backend`.
"""

from . import functional, models, nn
from .patch import PatchReport, patch, patch_report, unpatch
from .inference import fuse_for_inference
from .backends import BackendUnavailable, get_backend, set_backend
from . import _build


def load_kernels() -> None:
    """Builds the C++ kernels if they are not cached, and loads them: afterwards the ops
    exist as ``torch.ops.imggen_fast.<op>``. Raises RuntimeError with the build's error
    when they cannot be built."""
    status = _build.load()
    if not status.available:
        raise RuntimeError(f"imggen_fast: the C++ kernels could not be built:\n{status.error}")

__version__ = "0.1.0"

__all__ = ["BackendUnavailable", "PatchReport", "functional", "fuse_for_inference", "get_backend", "load_kernels",
           "models", "nn", "patch", "patch_report", "set_backend", "unpatch", "__version__"]
