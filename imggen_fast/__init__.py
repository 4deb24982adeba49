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

__version__ = "0.1.0"

__all__ = ["BackendUnavailable", "PatchReport", "functional", "fuse_for_inference", "get_backend", "models", "nn",
           "patch", "patch_report", "set_backend", "unpatch", "__version__"]
