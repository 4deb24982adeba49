"""Forward + backward of the BCE-with-logits losses, eager vs imggen_fast vs torch.compile
(cases defined in imggen_fast/bench/bce_with_logits.py). Run with
``pytest benchmarks/test_bce_with_logits.py --benchmark-only``."""

import pytest

from imggen_fast.bench import bce_with_logits
from imggen_fast.bench.common import copy_bandwidth_gbps

CASES = bce_with_logits.cases()


@pytest.fixture(scope="session")
def copy_gbps() -> float:
    """The copy bandwidth, measured once in this run."""
    return copy_bandwidth_gbps()


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_bce_with_logits(benchmark, case, copy_gbps):
    run = case.make()
    benchmark(run)
    benchmark.extra_info.update(case.info(benchmark.stats.stats.median, copy_gbps=copy_gbps))
