"""The timing harness: providers of one comparison timed interleaved, round by round,
warm-up excluded; on CPU with ``time.perf_counter``, on CUDA with CUDA events around
each call and a synchronize before reading them. Also the pytest-benchmark runner that
records a case's figures in ``extra_info``."""

from __future__ import annotations

import contextlib
import dataclasses
import math
import statistics
import time
from collections.abc import Callable, Mapping

import torch

from . import common, registry


def _time_once(function: Callable[[], object]) -> float:
    """Seconds one ``function()`` call takes on the benchmark device."""
    if common.device().type == "cuda":
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        function()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3
    start_seconds = time.perf_counter()
    function()
    return time.perf_counter() - start_seconds


def time_calls(functions: Mapping[str, Callable[[], object]], rounds: int, warmup: int = 1,
               contexts: Mapping[str, Callable] | None = None) -> dict[str, list[float]]:
    """Times each function ``rounds`` times, interleaved: round r calls every function
    once, in the given order on even rounds and reversed on odd ones (so that none
    always runs right after the same neighbour). ``warmup`` untimed rounds come first.
    ``contexts[name]()`` gives a context each call of ``name`` runs in (its backend).
    Returns the seconds of every timed call, per function."""
    names = list(functions)
    times: dict[str, list[float]] = {name: [] for name in names}
    for round_index in range(warmup + rounds):
        for name in names if round_index % 2 == 0 else reversed(names):
            with contexts[name]() if contexts and name in contexts else contextlib.nullcontext():
                seconds = _time_once(functions[name])
            if round_index >= warmup:
                times[name].append(seconds)
    return times


def rounds_for(round_seconds: float, budget_seconds: float, minimum: int, maximum: int) -> int:
    """How many interleaved rounds fit ``budget_seconds`` when one round takes
    ``round_seconds``, between ``minimum`` and ``maximum``."""
    if round_seconds <= 0:
        return maximum
    return int(min(maximum, max(minimum, math.ceil(budget_seconds / round_seconds))))


@dataclasses.dataclass(frozen=True)
class Spread:
    """Summary of repeated timings in seconds: min, quartiles, median, max, count."""

    minimum: float
    first_quartile: float
    median: float
    third_quartile: float
    maximum: float
    rounds: int

    @classmethod
    def of(cls, seconds: list[float]) -> Spread:
        if not seconds:
            raise ValueError("Spread.of: no timings")
        ordered = sorted(seconds)
        if len(ordered) > 1:
            first, _, third = statistics.quantiles(ordered, n=4, method="inclusive")
        else:
            first = third = ordered[0]
        return cls(ordered[0], first, statistics.median(ordered), third, ordered[-1], len(ordered))

    def as_dict(self) -> dict[str, float | int]:
        return {"min": self.minimum, "q1": self.first_quartile, "median": self.median,
                "q3": self.third_quartile, "max": self.maximum, "rounds": self.rounds}

    @classmethod
    def from_dict(cls, values: Mapping[str, float]) -> Spread:
        return cls(values["min"], values["q1"], values["median"], values["q3"], values["max"], int(values["rounds"]))


def is_tie(first: Spread, second: Spread) -> bool:
    """True when two providers' interquartile ranges overlap: their difference is within
    the spread measured in the same run, and the report calls the ratio a tie."""
    return first.first_quartile <= second.third_quartile and second.first_quartile <= first.third_quartile


def run_case(benchmark, case: common.Case, budget_seconds: float = 2.0) -> dict[str, object]:
    """Times ``case`` with pytest-benchmark's ``benchmark`` fixture: enough rounds to fill
    about ``budget_seconds`` (5 to 500) after one warm-up round, each synchronized on a
    GPU; with ``--benchmark-disable``, one call. Records in ``extra_info`` the case's
    figures (GB/s, GFLOP/s and their share of the limits measured in the same run),
    its correctness check and the bytes it keeps for backward; a failing check fails
    the test."""
    common.forget_compiled_code()
    with case.backend_context():
        function = case.make()
        if benchmark.disabled:
            benchmark(function)
        else:
            once = _time_once(function)
            rounds = int(min(500, max(5, budget_seconds / max(once, 1e-6))))

            def synchronized() -> None:
                function()
                common.synchronize()

            benchmark.pedantic(synchronized, rounds=rounds, warmup_rounds=1, iterations=1)
    check, kept = registry.check_of(case), registry.kept_of(case)
    if benchmark.disabled:
        benchmark.extra_info.update(case.info(0.0))
    else:
        benchmark.extra_info.update(case.info(benchmark.stats.stats.median, common.copy_bandwidth_gbps(),
                                              common.matmul_gflops(), common.flops_of(case)))
    if check is not None:
        benchmark.extra_info["check"] = check.as_dict()
    if kept is not None:
        benchmark.extra_info["kept_for_backward"] = kept
    assert check is None or check.passed, f"{case.id}: correctness check failed: {check}"
    return benchmark.extra_info
