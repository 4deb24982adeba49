"""Forward + backward of the BCE-with-logits losses, eager vs imggen_fast vs torch.compile
(cases defined in imggen_fast/bench/bce_with_logits.py). Run with
``pytest benchmarks/test_bce_with_logits.py --benchmark-only``."""

import pytest

from imggen_fast.bench import bce_with_logits
from imggen_fast.bench.common import run_case


@pytest.mark.parametrize("case", bce_with_logits.cases(), ids=lambda case: case.id)
def test_bce_with_logits(benchmark, case):
    benchmark.group = f"{case.op}-{case.size}-{case.direction}"
    run_case(benchmark, case)
