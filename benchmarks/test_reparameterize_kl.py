"""Times ``reparameterize_kl`` against eager and torch.compile (the cases live in
``imggen_fast.bench.reparameterize_kl``), recording bytes moved, GB/s and the share of
the copy bandwidth measured in the same run.

Run: ``python -m pytest benchmarks/test_reparameterize_kl.py --benchmark-only``."""

import pytest

from imggen_fast.bench import reparameterize_kl
from imggen_fast.bench.common import run_case


@pytest.mark.parametrize("case", reparameterize_kl.cases(), ids=lambda case: case.id)
def test_reparameterize_kl(benchmark, case):
    benchmark.group = f"{case.op}-{case.size}-{case.direction}"
    run_case(benchmark, case)
