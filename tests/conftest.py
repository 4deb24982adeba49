"""Test setup.

* Triton's interpreter (``TRITON_INTERPRET=1``, which must be set before triton is
  imported) only where no CUDA device exists: there the Triton kernels run on CPU tensors
  in the interpreter. Where a GPU exists they are compiled and run on it, and autotuning
  times the configurations for real (kernels/_triton_utils.py fakes timings only when
  interpreting).
* Markers (pyproject.toml): ``cuda`` needs a CUDA GPU and is skipped with a reason
  elsewhere; ``pytest -m cuda`` selects these tests (``imggen-fast check-gpu`` runs them).
  ``interpreter`` runs Triton kernels on CPU tensors in the interpreter and is skipped where
  the interpreter is off (a GPU machine, where the ``cuda`` tests run the compiled kernels).
  A test parametrized with ``backend="triton"`` and not marked ``cuda`` runs on CPU
  tensors, so it is marked ``interpreter`` here.
* A summary of the GPU resource usage recorded by the ahead-of-time compile tests.
"""

import os

import torch

CUDA_AVAILABLE = torch.cuda.is_available()
if not CUDA_AVAILABLE:
    os.environ["TRITON_INTERPRET"] = "1"
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import pytest  # noqa: E402

INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") == "1"
NO_GPU = "needs a CUDA GPU; on this machine the Triton kernels are checked in the interpreter instead"
NO_INTERPRETER = ("runs Triton kernels on CPU tensors in Triton's interpreter, which is off where a GPU exists; "
                  "the compiled kernels are checked by the tests marked cuda (pytest -m cuda)")

_RESOURCE_USAGE_KEY = pytest.StashKey[list]()


def needs_interpreter(item: pytest.Item) -> bool:
    """True for a test that runs Triton kernels on CPU tensors: marked ``interpreter``, or
    parametrized with ``backend="triton"`` without the ``cuda`` marker."""
    if item.get_closest_marker("interpreter"):
        return True
    callspec = getattr(item, "callspec", None)
    return (callspec is not None and callspec.params.get("backend") == "triton"
            and item.get_closest_marker("cuda") is None)


@pytest.hookimpl(tryfirst=True)  # before -m selects: the markers added here count
def pytest_collection_modifyitems(config, items):
    for item in items:
        if needs_interpreter(item):
            item.add_marker(pytest.mark.interpreter)
            if not INTERPRETING:
                item.add_marker(pytest.mark.skip(reason=NO_INTERPRETER))
        if item.get_closest_marker("cuda") and not CUDA_AVAILABLE:
            item.add_marker(pytest.mark.skip(reason=NO_GPU))


@pytest.fixture
def record_gpu_usage(request):
    """Records a row (kernel, target, registers, stack) for the end-of-run summary."""
    rows = request.config.stash.setdefault(_RESOURCE_USAGE_KEY, [])
    return rows.append


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    rows = config.stash.get(_RESOURCE_USAGE_KEY, [])
    if not rows:
        return
    terminalreporter.section("GPU resource usage (compiled ahead of time, no GPU needed)")
    for row in sorted(rows):
        terminalreporter.write_line("  ".join(str(cell) for cell in row))
