"""What every benchmark case shares: the case record, the providers, the machine's
copy bandwidth and matmul throughput (measured in the same run as the cases, so the
ratios are fair), the bytes kept for backward, and peak memory.

A case builds its inputs once and returns the function to time; the same cases serve
``pytest benchmarks/ --benchmark-only`` and ``imggen-fast report``."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import statistics
import sys
import time
from collections.abc import Callable

import torch

# The providers compared by every op: the eager reference as users write it, imggen_fast,
# and torch.compile of the eager reference. Some ops add their own (documented there).
EAGER = "eager"
IMGGEN_FAST = "imggen_fast"
COMPILE = "compile"
PROVIDERS = (EAGER, IMGGEN_FAST, COMPILE)
DIRECTIONS = ("forward", "backward", "both")


@dataclasses.dataclass(frozen=True)
class Case:
    """One timed configuration.

    ``make()`` builds the inputs (and compiles, for torch.compile) and returns a
    zero-argument function running the measured work once. ``bytes_moved`` is the
    minimum number of bytes the work must read and write; ``flops`` its floating-point
    operations (0 where not meaningful)."""

    op: str
    size: str
    provider: str
    direction: str
    make: Callable[[], Callable[[], object]]
    bytes_moved: int = 0
    flops: int = 0
    dtype: str = "float32"

    @property
    def id(self) -> str:
        return f"{self.op}-{self.size}-{self.direction}-{self.provider}"

    def info(self, median_seconds: float, copy_gbps: float | None = None,
             matmul_gflops: float | None = None) -> dict[str, object]:
        """The figures recorded beside a timing: GB/s and its share of the copy bandwidth,
        GFLOP/s and its share of the matmul throughput."""
        info: dict[str, object] = {"op": self.op, "size": self.size, "provider": self.provider,
                                   "direction": self.direction, "dtype": self.dtype,
                                   "bytes_moved": self.bytes_moved, "flops": self.flops}
        if self.bytes_moved and median_seconds > 0:
            gbps = self.bytes_moved / median_seconds / 1e9
            info["GB/s"] = round(gbps, 2)
            if copy_gbps:
                info["copy_GB/s"] = round(copy_gbps, 2)
                info["share_of_copy_bandwidth"] = round(gbps / copy_gbps, 3)
        if self.flops and median_seconds > 0:
            gflops = self.flops / median_seconds / 1e9
            info["GFLOP/s"] = round(gflops, 2)
            if matmul_gflops:
                info["matmul_GFLOP/s"] = round(matmul_gflops, 2)
                info["share_of_matmul"] = round(gflops / matmul_gflops, 3)
        return info


def median_seconds(function: Callable[[], object], repeats: int = 5, warmup: int = 1) -> float:
    """Median wall time of ``function()`` over ``repeats`` runs after ``warmup`` runs."""
    for _ in range(warmup):
        function()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


@functools.cache
def copy_bandwidth_gbps(numel: int = 1 << 24) -> float:
    """The machine's copy bandwidth in GB/s: bytes read plus written by copying a 64 MiB
    fp32 tensor into a preallocated one, median of several runs."""
    source = torch.randn(numel)
    destination = torch.empty_like(source)
    seconds = median_seconds(lambda: destination.copy_(source), repeats=7)
    return 2 * source.nbytes / seconds / 1e9


@functools.cache
def matmul_gflops(size: int = 1024) -> float:
    """The machine's fp32 matmul throughput in GFLOP/s (size x size x size, MKL on CPU)."""
    left, right = torch.randn(size, size), torch.randn(size, size)
    seconds = median_seconds(lambda: torch.mm(left, right), repeats=7)
    return 2 * size**3 / seconds / 1e9


def saved_bytes(function: Callable[[], torch.Tensor]) -> int:
    """Bytes of the distinct storages autograd keeps for backward while ``function()`` runs
    (each storage counted once, parameters and inputs included)."""
    storages: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        function()
    return sum(storages.values())


def peak_memory_bytes(function: Callable[[], object]) -> int:
    """Peak of the bytes allocated (beyond those live before) while ``function()`` runs.

    On CUDA: ``torch.cuda.max_memory_allocated``. On CPU: the allocation and free
    events of torch's CPU allocator recorded by the profiler, replayed in order
    (memory that a library allocates itself, oneDNN scratch space say, is not seen)."""
    if torch.cuda.is_available() and torch.cuda.memory_allocated() > 0:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        function()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    from torch.profiler import ProfilerActivity, profile

    with _quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as profiler:
        function()
    allocations = sorted((event.start_ns(), event.nbytes()) for event in profiler.profiler.kineto_results.events()
                         if event.name() == "[memory]")
    live = peak = 0
    for _, nbytes in allocations:
        live += nbytes
        peak = max(peak, live)
    return peak


@contextlib.contextmanager
def _quiet_stderr():
    """Silences file descriptor 2 (the profiler's native start/stop lines) for the block."""
    sys.stderr.flush()
    saved = os.dup(2)
    with open(os.devnull, "w") as devnull:
        os.dup2(devnull.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def compiled(function: Callable) -> Callable:
    """``torch.compile`` of an eager function (inductor), compiled afresh on first call: the
    compile caches are cleared, so a case never reuses code compiled by another case under
    another configuration (see :func:`no_donated_buffers`)."""
    torch._dynamo.reset()
    return torch.compile(function, backend="inductor")


def no_donated_buffers():
    """A context in which torch.compile compiles backwards that can run twice on one graph.

    By default it donates buffers to its backward, which then refuses retain_graph=True,
    as timing a backward alone needs. A backward-only case runs its forward and every
    backward inside this context (torch.compile reads the setting at each call)."""
    import torch._functorch.config

    return torch._functorch.config.patch(donated_buffer=False)


def backward_only(outputs_fn: Callable[[], torch.Tensor | tuple],
                  grads: Callable[[tuple], tuple] | None = None) -> Callable[[], object]:
    """A function timing only the backward of ``outputs_fn()``: the forward runs once here
    (compiling, for torch.compile, without donated buffers), the graph is kept, and each
    call back-propagates the same gradients through it."""
    with no_donated_buffers():
        outputs = outputs_fn()
    outputs = outputs if isinstance(outputs, tuple) else (outputs,)
    outputs = tuple(output for output in outputs if output.requires_grad)
    grad_outputs = grads(outputs) if grads else tuple(torch.ones_like(output) for output in outputs)

    def run() -> None:
        # torch.compile checks the setting at every backward call, not only at compile
        # time; the context costs a few microseconds, the same for every provider.
        with no_donated_buffers():
            torch.autograd.backward(outputs, grad_outputs, retain_graph=True)

    return run


def run_case(benchmark, case: Case, budget_seconds: float = 2.0) -> dict[str, object]:
    """Times ``case`` with pytest-benchmark's ``benchmark`` fixture and records its figures
    in ``extra_info``: enough rounds to fill about ``budget_seconds`` (5 to 500), after a
    warm-up that also sizes them."""
    function = case.make()
    start = time.perf_counter()
    function()
    rounds = int(min(500, max(5, budget_seconds / max(time.perf_counter() - start, 1e-6))))
    benchmark.pedantic(function, rounds=rounds, warmup_rounds=1, iterations=1)
    benchmark.extra_info.update(case.info(benchmark.stats.stats.median, copy_bandwidth_gbps(), matmul_gflops()))
    return benchmark.extra_info
