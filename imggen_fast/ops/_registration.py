"""Attaching fake implementations and autograd to an op's custom ops.

The C++ ops (``torch.ops.imggen_fast.*``, which exist once the library is loaded) get
their fake implementation here and carry their autograd in C++. The Triton ops
(``torch.ops.imggen_fast_triton.*``, which exist once their module is imported) get the
same fake implementation and their autograd from the Python twin of the C++ formula."""

from __future__ import annotations

import importlib
from collections.abc import Callable

import torch

from .. import _build


def register(op: str, fake: Callable, backward: Callable | None = None,
             setup_context: Callable | None = None) -> None:
    """Registers ``fake`` as the fake (meta) implementation of ``op`` and, if given,
    ``backward``/``setup_context`` as its autograd formula."""
    torch.library.register_fake(op)(fake)
    if backward is not None:
        torch.library.register_autograd(op, backward, setup_context=setup_context)


def cpp_op(name: str, fake: Callable, backward: Callable | None = None,
           setup_context: Callable | None = None) -> Callable[[], Callable]:
    """A loader for ``torch.ops.imggen_fast.<name>``: registers its fake implementation (and,
    if given, a Python autograd formula) as soon as the C++ library loads, whoever loads
    it first, and returns the op. Ops whose per-call overhead matters carry their
    autograd in C++ instead (see csrc/autograd_utils.h for why) and pass no backward."""
    _build.on_load(lambda: register(f"imggen_fast::{name}", fake, backward, setup_context))

    def load() -> Callable:
        return getattr(torch.ops.imggen_fast, name).default

    return load


def triton_op(module: str, name: str, fake: Callable, backward: Callable | None = None,
              setup_context: Callable | None = None) -> Callable[[], Callable]:
    """A loader for the Triton op ``imggen_fast_triton::<name>`` defined in
    ``imggen_fast.kernels.<module>``: imports it (and Triton) on first use and registers
    its fake and autograd. The explicit fake replaces the one ``triton_op`` derives by
    running the launcher on fake tensors, which the interpreter cannot do."""

    def load() -> Callable:
        importlib.import_module(f"imggen_fast.kernels.{module}")
        register(f"imggen_fast_triton::{name}", fake, backward, setup_context)
        return getattr(torch.ops.imggen_fast_triton, name).default

    return load
