"""Test setup: Triton kernels run in Triton's interpreter on CPU tensors (this must be
set before triton is imported), and a summary of the GPU resource usage recorded by
the ahead-of-time compile tests."""

import os

os.environ["TRITON_INTERPRET"] = "1"
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import pytest  # noqa: E402

_RESOURCE_USAGE_KEY = pytest.StashKey[list]()


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
