"""Shared by the op tests: tolerances per dtype, comparisons, layouts, subprocess runs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import imggen_fast

REPOSITORY = Path(__file__).resolve().parents[1]

# (rtol, atol) for comparing a kernel with the reference computed in the same dtype.
TOLERANCES = {
    torch.float32: (1e-5, 1e-6),
    torch.float64: (1e-12, 1e-12),
    torch.bfloat16: (1.6e-2, 1e-2),
    torch.float16: (1e-3, 1e-3),
}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype | None = None,
                 scale: float = 1.0, message: str = "") -> None:
    """``torch.testing.assert_close`` with the tolerance of ``dtype`` (default: expected's),
    both tolerances multiplied by ``scale`` for results that sum many terms."""
    rtol, atol = TOLERANCES[dtype or expected.dtype]
    torch.testing.assert_close(actual, expected, rtol=rtol * scale, atol=atol * scale, msg=message or None)


def channels_last(tensor: torch.Tensor) -> torch.Tensor:
    """A channels_last copy of a 4-D tensor (the test's input, not the op's business)."""
    return tensor.contiguous(memory_format=torch.channels_last)


def run_python(code: str, env: dict[str, str] | None = None, timeout: float = 600,
               arguments: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    """Runs ``code`` in a fresh interpreter with the given extra environment (a None value
    removes a variable) and command-line arguments."""
    full_env = {**os.environ, **(env or {})}
    for name, value in list(full_env.items()):
        if value is None:
            del full_env[name]
    return subprocess.run([sys.executable, "-c", code, *arguments], capture_output=True, text=True, env=full_env,
                          timeout=timeout, cwd=REPOSITORY)


def kernel_op(name: str):
    """``torch.ops.imggen_fast.<name>.default``: the one op every backend implements (the C++
    kernels, or the Triton launcher when the Triton backend is chosen in this thread)."""
    imggen_fast.load_kernels()
    return getattr(torch.ops.imggen_fast, name).default


# Needs a CUDA GPU: skipped with a reason elsewhere (tests/conftest.py); `pytest -m cuda`
# selects these tests.
requires_cuda = pytest.mark.cuda


def run_cli(*arguments: str, env: dict[str, str] | None = None, timeout: float = 900) -> subprocess.CompletedProcess:
    """Runs ``imggen-fast <arguments>`` (the console script's ``main``) in a fresh interpreter
    with the given extra environment."""
    return run_python("import sys; from imggen_fast.cli import main; sys.exit(main(sys.argv[1:]))", env=env,
                      timeout=timeout, arguments=arguments)
