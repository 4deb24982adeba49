"""What every benchmark case shares: the case record, the providers and their roles,
the device the cases run on, the correctness check, the machine's limits (copy
bandwidth and matmul throughput, measured in the same run as the cases), the bytes
kept for backward, and peak memory.

A case describes itself cheaply; nothing is built until ``make()`` runs. The same
cases serve ``pytest benchmarks/`` and ``imggen-fast report``."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import os
import sys
from collections.abc import Callable, Iterable, Mapping

import torch

# Providers. Every op has EAGER, IMGGEN_FAST and COMPILE; the others appear where they
# mean something. What the report compares a provider as (its role) follows from the
# start of its name (see role()), so a module may add variants such as
# "imggen_fast_eps" without the report knowing them.
EAGER = "eager"
EAGER_CHANNELS_LAST = "eager_channels_last"
EAGER_INPLACE = "eager_inplace"
IMGGEN_FAST = "imggen_fast"
IMGGEN_FAST_CHANNELS_LAST = "imggen_fast_channels_last"
COMPILE = "compile"
COMPILE_IMGGEN_FAST = "compile_imggen_fast"
FLOOR_COPY = "floor_copy"
FLOOR_BARE_LAYER = "floor_bare_layer"
PROVIDERS = (EAGER, IMGGEN_FAST, COMPILE)
ROLES = ("eager", "imggen_fast", "compile", "floor", "other")

DIRECTIONS = ("forward", "backward", "both")
STEP = "step"  # the direction of a whole training step
KINDS = ("op", "model")

DEVICE_VARIABLE = "IMGGEN_FAST_BENCH_DEVICE"

@dataclasses.dataclass(frozen=True)
class Tolerance:
    """The largest error a check allows for one tensor: ``atol + rtol x scale``, where
    the error and the scale are its max norms (``norm="max"``: max|actual - expected|
    against max|expected|) or its Frobenius norms (``"frobenius"``)."""

    rtol: float
    atol: float
    norm: str = "max"

    def __str__(self) -> str:
        return f"{self.norm}-norm rtol {self.rtol:g}, atol {self.atol:g}"


# float32 ops: every element against the reference's scale.
OP_TOLERANCE = Tolerance(1e-5, 1e-6)
# A whole training step's gradients, in Frobenius norm: a LeakyReLU whose pre-activation
# lies within rounding of zero can take the other slope after any change of summation
# order, changing one row of a gradient by up to 80%; torch itself differs that much
# between its NCHW and channels_last layouts on these steps (see the report).
STEP_GRADIENT_TOLERANCE = Tolerance(1e-2, 1e-6, "frobenius")

def role(provider: str) -> str:
    """What a provider is compared as: ``eager`` (what users write), ``imggen_fast``
    (this library, including torch.compile of a patched model), ``compile``
    (torch.compile of the eager code) or ``floor`` (a lower bound: a copy of the same
    bytes, the bare layer). Decided by the start of the name; any other name is
    ``other``: shown, but in no ratio."""
    if provider.startswith(("imggen_fast", COMPILE_IMGGEN_FAST)):
        return "imggen_fast"
    for name in ("compile", "floor", "eager"):
        if provider.startswith(name):
            return name
    return "other"


def device() -> torch.device:
    """The device the cases build their tensors on: ``$IMGGEN_FAST_BENCH_DEVICE`` (set by
    ``imggen-fast report --device`` and by ``pytest benchmarks/ --bench-device``), cpu by default."""
    return torch.device(os.environ.get(DEVICE_VARIABLE, "cpu"))


def set_device(name: str) -> None:
    """Makes ``name`` (cpu or cuda) the device of every case made from now on, in this
    process and in the processes it starts (peak memory is measured in one)."""
    chosen = torch.device(name)
    if chosen.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r}: no CUDA GPU is available to this torch ({torch.__version__})")
    if chosen.type not in ("cpu", "cuda"):
        raise ValueError(f"device {name!r}: the benchmarks run on cpu or cuda")
    os.environ[DEVICE_VARIABLE] = str(chosen)


def synchronize() -> None:
    """Waits for the device's queued work (nothing to wait for on CPU)."""
    if device().type == "cuda":
        torch.cuda.synchronize()


@dataclasses.dataclass(frozen=True)
class Check:
    """Errors of a provider's outputs and gradients against the reference's, on the same
    inputs. ``max_abs_error``: the largest max|actual - expected| over the tensors;
    ``max_rel_error``: the largest max|actual - expected| / max|expected| (relative to
    each tensor's scale, so that elements near zero do not dominate);
    ``frobenius_rel_error``: the largest ||actual - expected|| / ||expected||.
    ``passed`` when every tensor is within its tolerance (``tolerance`` says which);
    ``worst`` names the tensor closest to (or furthest past) its tolerance."""

    passed: bool
    max_abs_error: float
    max_rel_error: float
    frobenius_rel_error: float
    worst: str
    tolerance: str
    tensors: int

    def as_dict(self) -> dict[str, object]:
        return dataclasses.asdict(self)


def _relative(error: float, scale: float) -> float:
    return error / scale if scale > 0 else (0.0 if error == 0 else math.inf)


def compare(actual: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor],
            tolerance: Tolerance = OP_TOLERANCE, gradient_tolerance: Tolerance | None = None) -> Check:
    """Compares tensors of the same names (outputs, gradients...) in float64 on the CPU;
    names starting with ``grad`` are judged by ``gradient_tolerance`` when given. A shape
    mismatch, or a non-finite value where the reference has another, fails the check."""
    if set(actual) != set(expected) or not expected:
        raise ValueError(f"compare: the provider gave {sorted(actual)}, the reference {sorted(expected)}")
    passed, max_abs, max_rel, max_frobenius, worst, worst_ratio = True, 0.0, 0.0, 0.0, "", -1.0
    for name, reference in expected.items():
        limit = gradient_tolerance if gradient_tolerance and name.startswith("grad") else tolerance
        candidate = actual[name].detach().to("cpu", torch.float64)
        reference = reference.detach().to("cpu", torch.float64)
        if candidate.shape != reference.shape:
            abs_error = rel_error = frobenius = ratio = math.inf
        else:
            # Equal values (infinities of one sign, NaN against NaN) count as equal, as allclose's do.
            same = (candidate == reference) | (candidate.isnan() & reference.isnan())
            difference = torch.where(same, 0.0, (candidate - reference).abs()).nan_to_num(math.inf)
            finite = torch.where(reference.isfinite(), reference, 0.0)
            abs_error = difference.max().item() if difference.numel() else 0.0
            rel_error = _relative(abs_error, finite.abs().max().item() if finite.numel() else 0.0)
            frobenius_error = difference.norm().item()
            frobenius = _relative(frobenius_error, finite.norm().item())
            error, scale = ((abs_error, finite.abs().max().item() if finite.numel() else 0.0) if limit.norm == "max"
                            else (frobenius_error, finite.norm().item()))
            ratio = error / (limit.atol + limit.rtol * scale)
        passed = passed and ratio <= 1
        if ratio >= worst_ratio:
            worst, worst_ratio = name, ratio
        max_abs, max_rel = max(max_abs, abs_error), max(max_rel, rel_error)
        max_frobenius = max(max_frobenius, frobenius)
    description = str(tolerance) if gradient_tolerance is None else f"{tolerance}; gradients {gradient_tolerance}"
    return Check(passed, max_abs, max_rel, max_frobenius, worst, description, len(expected))


def gradients(outputs: tuple[torch.Tensor, ...], inputs: Mapping[str, torch.Tensor],
              grad_outputs: tuple[torch.Tensor, ...]) -> dict[str, torch.Tensor]:
    """``{"grad_<name>": gradient}`` of ``outputs`` (seeded with ``grad_outputs``) with
    respect to each named input, without accumulating into ``.grad``."""
    names = list(inputs)
    found = torch.autograd.grad(outputs, [inputs[name] for name in names], grad_outputs, allow_unused=True)
    return {f"grad_{name}": gradient for name, gradient in zip(names, found) if gradient is not None}


@dataclasses.dataclass(frozen=True)
class Case:
    """One timed configuration: an op (or a training step) x size x direction x provider.

    ``make()`` builds the inputs (compiles, for torch.compile; builds the kernels), runs
    the work once and returns a zero-argument function running it once more.
    ``bytes_moved``: the least bytes the work must read and write; ``flops``: its
    floating-point operations, or a function counting them (run once, when needed);
    0 where not meaningful. ``elements``: the problem size plotted on the size axis.
    ``quick``: part of the report's default (quick) mode; None lets the registry decide
    (see imggen_fast.bench). ``check()``: this provider's outputs and gradients against
    the reference on the same inputs. ``kept_for_backward()``: bytes autograd keeps for
    backward over one forward (a dict for several networks). ``measure_memory``: the
    report measures the peak memory of one call in a fresh process. ``backend``: the
    imggen_fast backend the case runs under (None: the default). ``in_speedups``: False
    for a variant doing other work than its op (the bottleneck with its noise given), shown
    beside the others but left out of the speed-ups."""

    op: str
    size: str
    provider: str
    direction: str
    make: Callable[[], Callable[[], object]]
    bytes_moved: int = 0
    flops: int | Callable[[], int] = 0
    dtype: str = "float32"
    elements: int = 0
    quick: bool | None = None
    check: Callable[[], Check] | None = None
    kept_for_backward: Callable[[], int | dict[str, int]] | None = None
    kind: str = "op"
    measure_memory: bool = False
    backend: str | None = None
    in_speedups: bool = True

    @property
    def id(self) -> str:
        return f"{self.op}-{self.size}-{self.direction}-{self.provider}"

    @property
    def benchmark(self) -> tuple[str, str, str, str]:
        """What the providers of one comparison share: (kind, op, size, direction)."""
        return self.kind, self.op, self.size, self.direction

    @property
    def role(self) -> str:
        return role(self.provider)

    def backend_context(self):
        """The context a call of this case runs in: its imggen_fast backend, if it names one."""
        if self.backend is None:
            return contextlib.nullcontext()
        from ..backends import set_backend

        return set_backend(self.backend)

    def info(self, median_seconds: float, copy_gbps: float | None = None,
             matmul_gflops: float | None = None, flops: int | None = None) -> dict[str, object]:
        """The figures recorded beside a timing: GB/s and its share of the copy bandwidth,
        GFLOP/s and its share of the matmul throughput."""
        flops = self.flops if flops is None else flops
        info: dict[str, object] = {"kind": self.kind, "op": self.op, "size": self.size, "provider": self.provider,
                                   "direction": self.direction, "dtype": self.dtype, "elements": self.elements,
                                   "in_speedups": self.in_speedups,
                                   "bytes_moved": self.bytes_moved, "flops": flops if isinstance(flops, int) else 0}
        if self.bytes_moved and median_seconds > 0:
            info["GB/s"] = _significant(self.bytes_moved / median_seconds / 1e9)
        if isinstance(flops, int) and flops and median_seconds > 0:
            info["GFLOP/s"] = _significant(flops / median_seconds / 1e9)
        add_shares(info, copy_gbps, matmul_gflops)
        return info


def add_shares(info: dict[str, object], copy_gbps: float | None, matmul_gflops: float | None) -> None:
    """Adds to ``info`` (with GB/s and/or GFLOP/s) the limits and the share of them achieved."""
    if copy_gbps and "GB/s" in info:
        info["copy_GB/s"] = _significant(copy_gbps)
        info["share_of_copy_bandwidth"] = _significant(info["GB/s"] / copy_gbps)
    if matmul_gflops and "GFLOP/s" in info:
        info["matmul_GFLOP/s"] = _significant(matmul_gflops)
        info["share_of_matmul"] = _significant(info["GFLOP/s"] / matmul_gflops)


def _significant(value: float) -> float:
    """``value`` rounded to 4 significant digits (for JSON that stays readable)."""
    return float(f"{value:.4g}")


@functools.cache
def _resolved_flops(case: Case) -> int:
    return case.flops() if callable(case.flops) else case.flops


def flops_of(case: Case) -> int:
    """The case's flops, counting them once if the case gives a function."""
    return _resolved_flops(case)


def count_flops(function: Callable[[], object]) -> int:
    """Floating-point operations of one ``function()`` call, counted by torch's
    FlopCounterMode (matmuls and convolutions, forward and backward)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        function()
    return int(counter.get_total_flops())


def _median_seconds(function: Callable[[], object], repeats: int = 7) -> float:
    from .timing import time_calls

    times = time_calls({"work": function}, rounds=repeats, warmup=1)["work"]
    return sorted(times)[len(times) // 2]


def measure_copy_bandwidth(numel: int = 1 << 24) -> float:
    """The device's copy bandwidth in GB/s, measured now: bytes read plus written by
    copying a 64 MiB fp32 tensor into a preallocated one, median of 7 runs."""
    source = torch.randn(numel, device=device())
    destination = torch.empty_like(source)
    return 2 * source.nbytes / _median_seconds(lambda: destination.copy_(source)) / 1e9


def measure_matmul_throughput(size: int | None = None) -> float:
    """The device's fp32 matrix-multiply throughput in GFLOP/s, measured now: the better
    of ``torch.mm`` on size x size matrices (1024 on CPU, 8192 on a GPU) and a 1x1
    convolution with size channels in and out (a product too, through oneDNN / cuDNN: on some
    CPUs, AMD's among them, MKL's sgemm reaches half of what oneDNN's convolutions do,
    and the convolution cases would show more than 100% of the limit), median of 7 runs."""
    size = size or (8192 if device().type == "cuda" else 1024)
    left, right = torch.randn(size, size, device=device()), torch.randn(size, size, device=device())
    matmul = 2 * size**3 / _median_seconds(lambda: torch.mm(left, right)) / 1e9
    # A product of the same width as a convolution: (size / 128) images of 16 x 16 pixels,
    # size channels in and out.
    images = torch.randn(max(1, size // 128), size, 16, 16, device=device())
    weight = torch.randn(size, size, 1, 1, device=device())
    convolution = 2 * images.shape[0] * 256 * size * size / _median_seconds(
        lambda: torch.nn.functional.conv2d(images, weight)) / 1e9
    return max(matmul, convolution)


@functools.cache
def _cached_limit(measure: Callable[[int | None], float], device_name: str, size: int | None) -> float:
    return measure(size)


def copy_bandwidth_gbps(numel: int = 1 << 24) -> float:
    """:func:`measure_copy_bandwidth`, measured once per device and size in a process."""
    return _cached_limit(measure_copy_bandwidth, str(device()), numel)


def matmul_gflops(size: int | None = None) -> float:
    """:func:`measure_matmul_throughput`, measured once per device and size in a process."""
    return _cached_limit(measure_matmul_throughput, str(device()), size)


def copy_floor(bytes_moved: int) -> Callable[[], Callable[[], object]]:
    """``make`` of the floor of a memory-bound case: copying a float32 tensor of half the
    case's ``bytes_moved`` into a preallocated one reads and writes as many bytes."""

    def make() -> Callable[[], object]:
        source = torch.randn(max(1, bytes_moved // 8), device=device())
        destination = torch.empty_like(source)
        destination.copy_(source)
        return lambda: destination.copy_(source)

    return make


def saved_bytes(function: Callable[[], object], exclude: Iterable[torch.Tensor] = ()) -> int:
    """Bytes of the distinct storages autograd keeps for backward while ``function()``
    runs, each storage counted once; storages of the ``exclude`` tensors (the
    parameters) are not counted."""
    excluded = {tensor.untyped_storage().data_ptr() for tensor in exclude}
    storages: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in excluded:
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        function()
    return sum(storages.values())


def peak_memory_bytes(function: Callable[[], object]) -> int:
    """Peak of the tensor bytes allocated (beyond those live before) while ``function()`` runs.

    On CUDA: ``torch.cuda.max_memory_allocated``. On CPU: the allocation and free events
    of torch's CPU allocator recorded by the profiler, replayed in order (memory that a
    library allocates itself, oneDNN scratch space say, is not seen)."""
    if device().type == "cuda":
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
    """``torch.compile`` of an eager function or module (inductor), compiled on first call."""
    return torch.compile(function, backend="inductor")


def forget_compiled_code() -> None:
    """Clears dynamo's caches: the harness calls it before each comparison, so that a
    case never reuses code traced by another case under another configuration (see
    :func:`no_donated_buffers`), while the providers of one comparison keep theirs."""
    torch._dynamo.reset()


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
    call back-propagates the same gradients through it (once before returning)."""
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

    run()
    return run


def timed_direction(forward: Callable[[], torch.Tensor | tuple], direction: str,
                    grads: Callable[[tuple], tuple] | None = None) -> Callable[[], object]:
    """The function a case times for ``direction``: ``forward()`` alone, the backward
    alone (:func:`backward_only`), or both (forward then backward with the same
    ``grads(outputs)`` every call, ones by default). Runs it once (compiling, for
    torch.compile) before returning it."""
    if direction == "backward":
        return backward_only(forward, grads)
    if direction == "forward":
        forward()
        return forward
    if direction != "both":
        raise ValueError(f"direction must be one of {', '.join(DIRECTIONS)}, got {direction!r}")
    outputs = forward()
    outputs = outputs if isinstance(outputs, tuple) else (outputs,)
    differentiable = [index for index, output in enumerate(outputs) if output.requires_grad]
    grad_outputs = grads(tuple(outputs[index] for index in differentiable)) if grads else tuple(
        torch.ones_like(outputs[index]) for index in differentiable)
    torch.autograd.backward([outputs[index] for index in differentiable], grad_outputs)

    def forward_and_backward() -> None:
        results = forward()
        results = results if isinstance(results, tuple) else (results,)
        torch.autograd.backward([results[index] for index in differentiable], grad_outputs)

    return forward_and_backward


def run_case(benchmark, case: Case, budget_seconds: float = 2.0) -> dict[str, object]:
    """:func:`imggen_fast.bench.timing.run_case`, where benchmark files written before the
    timing harness had its own module import it from."""
    from .timing import run_case as timed_run

    return timed_run(benchmark, case, budget_seconds)
