"""imggen_fast: fused kernels for image-generation models in PyTorch.

Public names: :mod:`imggen_fast.functional`, :mod:`imggen_fast.nn`,
:mod:`imggen_fast.models`, :func:`patch` / :func:`unpatch` / :func:`patch_report`,
:func:`fuse_for_inference`, :func:`set_backend` / :func:`get_backend`,
:func:`load_kernels`.
"""

from . import _build, functional, models, nn
from .backends import BackendUnavailable, get_backend, set_backend
from .inference import fuse_for_inference
from .patch import PatchReport, patch, patch_report, unpatch

__version__ = "0.1.0"


def load_kernels(verbose: bool = False) -> _build.BuildStatus:
    """Builds the C++ kernels if they are not in the cache yet (once per version of the
    sources: a few minutes), and loads them, so that ``torch.ops.imggen_fast.<op>`` exist.

    ``import imggen_fast`` already loads a verified cached build; this call is for the
    first use, or on a machine with a CUDA toolkit, where import loads nothing (choosing
    the CUDA build would initialise CUDA). Never raises: the returned status says whether
    the kernels are usable (``available``), and if not, what failed (``error``) and what to
    do (``fix``), which is also warned once."""
    return _build.load(verbose=verbose)


# Loads a verified cached build, so that torch.ops.imggen_fast.<op> exist right after the
# import; never builds and never raises (a failure is remembered and reported on use).
_build.load_cached()

__all__ = ["BackendUnavailable", "PatchReport", "functional", "fuse_for_inference", "get_backend", "load_kernels",
           "models", "nn", "patch", "patch_report", "set_backend", "unpatch", "__version__"]
