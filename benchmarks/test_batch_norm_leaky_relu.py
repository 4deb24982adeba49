"""Times ``batch_norm_leaky_relu`` (BatchNorm2d + LeakyReLU(0.2), and + ReLU) against eager,
torch.compile and the floor (the cases live in ``imggen_fast.bench.batch_norm_leaky_relu``),
recording bytes moved, GB/s and the share of the copy bandwidth measured in the same run.

Run: ``python -m pytest benchmarks/test_batch_norm_leaky_relu.py --benchmark-only``."""

import pytest

from imggen_fast.bench import batch_norm_leaky_relu
from imggen_fast.bench.common import run_case


@pytest.mark.parametrize("case", batch_norm_leaky_relu.cases(), ids=lambda case: case.id)
def test_batch_norm_leaky_relu(benchmark, case):
    benchmark.group = f"{case.op}-{case.size}-{case.direction}"
    run_case(benchmark, case)
