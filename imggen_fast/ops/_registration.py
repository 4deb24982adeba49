"""What the ops modules attach to the C++ ops, and how the Triton launchers join them.

* :func:`register_fake`: an op's fake (meta) implementation, attached as soon as the C++
  library loads (the ops exist only then), whoever loads it first.
* :func:`op`: the handle ``torch.ops.imggen_fast.<name>.default``, looked up once.
* :func:`register_triton_launchers`: each Triton launcher (``LAUNCHERS`` of every module
  in ``imggen_fast.kernels``) becomes the internal op ``imggen_fast::_triton_<name>``,
  defined with the op's own schema, which the C++ kernel entries call when the Triton
  backend is chosen (csrc/backend.h). Where this build has no CUDA kernels, the launchers
  are also registered as the ops' CUDA kernels, so that CUDA tensors reach them under
  ``auto`` (all but a module's ``ONLY_WHEN_CHOSEN``: the Triton convolutions, which serve
  only when the Triton backend is named). Launches run on the tensors' device, not the
  current one.
"""

from __future__ import annotations

import functools
import importlib
import pkgutil
import threading
from collections.abc import Callable

import torch

from .. import _build


def register_fake(name: str, fake: Callable) -> None:
    """Registers ``fake`` as the fake implementation of ``imggen_fast::<name>`` once the
    library is loaded (now, if it is)."""
    _build.on_load(lambda: torch.library.register_fake(f"imggen_fast::{name}")(fake))


_OPS: dict = {}


def op(name: str):
    """``torch.ops.imggen_fast.<name>.default`` (the library must be loaded), looked up once."""
    handle = _OPS.get(name)
    if handle is None:
        handle = _OPS[name] = getattr(torch.ops.imggen_fast, name).default
    return handle


def launch_device(arguments: tuple) -> torch.device | None:
    """The device of the first CUDA tensor among ``arguments`` (tensors, or lists of
    tensors), None if there is none. A CPU tensor may come first (a one-element scale, say);
    the kernels run where the CUDA operands live."""
    for argument in arguments:
        tensors = argument if isinstance(argument, (list, tuple)) else (argument,)
        for tensor in tensors:
            if isinstance(tensor, torch.Tensor) and tensor.device.type == "cuda":
                return tensor.device
    return None


def on_tensors_device(launcher: Callable) -> Callable:
    """``launcher`` made to launch on the device of its CUDA tensor arguments: Triton
    launches on the current CUDA device, which need not be the tensors' one (tensors on
    cuda:1 with device 0 current: an illegal address, or silent peer access)."""

    @functools.wraps(launcher)
    def launch(*arguments):
        device = launch_device(arguments)
        if device is not None:
            with torch.cuda.device(device):
                return launcher(*arguments)
        return launcher(*arguments)

    return launch


_LIBRARY: torch.library.Library | None = None
_registering = threading.Lock()
_REGISTERED = False


def kernel_modules() -> list[str]:
    """The names of the modules of ``imggen_fast.kernels`` (one per op family)."""
    kernels = importlib.import_module("imggen_fast.kernels")
    return [info.name for info in pkgutil.iter_modules(kernels.__path__) if not info.name.startswith("_")]


def triton_schema(name: str) -> str:
    """The schema of ``imggen_fast::_triton_<name>``: the op's own, renamed."""
    schema = str(op(name)._schema)
    prefix = f"imggen_fast::{name}("
    if not schema.startswith(prefix):
        raise RuntimeError(f"imggen_fast: unexpected schema of {name}: {schema}")
    return f"_triton_{name}(" + schema[len(prefix):]


def register_triton_launchers() -> None:
    """Registers every Triton launcher (once per process; imports Triton)."""
    global _LIBRARY, _REGISTERED
    if _REGISTERED:
        return
    with _registering:
        if _REGISTERED:
            return
        status = _build.load()
        if not status.available:
            return
        library = torch.library.Library("imggen_fast", "FRAGMENT")
        launchers_as_cuda_kernels = torch.cuda.is_available() and not _build.cuda_build_wanted()
        for module_name in kernel_modules():
            module = importlib.import_module(f"imggen_fast.kernels.{module_name}")
            for name, launcher in module.LAUNCHERS.items():
                launch = on_tensors_device(launcher)
                library.define(triton_schema(name))
                library.impl(f"_triton_{name}", launch, "CompositeExplicitAutograd")
                if launchers_as_cuda_kernels and name not in getattr(module, "ONLY_WHEN_CHOSEN", ()):
                    library.impl(name, launch, "CUDA")
        _LIBRARY = library
        _REGISTERED = True
