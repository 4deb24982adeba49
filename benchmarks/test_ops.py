"""Every op case of imggen_fast.bench (fused layers, reparameterize_kl, the BCE losses,
and any op module added there), one pytest-benchmark test per op x size x pass x
provider. Run: ``python -m pytest benchmarks/test_ops.py --benchmark-only``."""

from imggen_fast.bench.timing import run_case

KIND = "op"


def test_op(benchmark, case):
    benchmark.group = f"{case.op}-{case.size}-{case.direction}"
    run_case(benchmark, case)
