"""Times ``reparameterize_kl`` against eager and torch.compile (the cases live in
``imggen_fast.bench.reparameterize_kl``), recording bytes moved, GB/s and the share of
the copy bandwidth measured in the same run.

Run: ``python -m pytest benchmarks/test_reparameterize_kl.py --benchmark-only``."""

import time

import pytest

from imggen_fast.bench import common
from imggen_fast.bench import reparameterize_kl as reparameterize_kl_cases

# Each case runs for about this long (at least MIN_ROUNDS, at most MAX_ROUNDS rounds).
SECONDS_PER_CASE = 1.0
MIN_ROUNDS = 5
MAX_ROUNDS = 500


@pytest.fixture(scope="module")
def copy_gbps() -> float:
    return common.copy_bandwidth_gbps()


def rounds_for(function) -> int:
    start = time.perf_counter()
    function()
    seconds = time.perf_counter() - start
    return max(MIN_ROUNDS, min(MAX_ROUNDS, int(SECONDS_PER_CASE / max(seconds, 1e-9))))


@pytest.mark.parametrize("case", reparameterize_kl_cases.cases(), ids=lambda case: case.id)
def test_reparameterize_kl(benchmark, case, copy_gbps):
    function = case.make()
    benchmark.group = f"{case.op}-{case.size}-{case.direction}"
    benchmark.pedantic(function, rounds=rounds_for(function), iterations=1, warmup_rounds=1)
    benchmark.extra_info.update(case.info(benchmark.stats.stats.median, copy_gbps))
