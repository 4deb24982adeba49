"""pytest benchmarks/test_layer_leaky_relu.py --benchmark-only: the fused layers against
eager, eager with in-place LeakyReLU, torch.compile and the bare layer."""

import pytest

from imggen_fast.bench import layer_leaky_relu
from imggen_fast.bench.common import run_case


@pytest.mark.parametrize("case", layer_leaky_relu.cases(), ids=lambda case: case.id)
def test_layer_leaky_relu(benchmark, case):
    benchmark.group = f"{case.op}-{case.size}-{case.direction}"
    info = run_case(benchmark, case)
    layer = next(layer for layer in layer_leaky_relu.LAYERS if layer.name == case.size)
    info["bytes_kept_for_backward"] = layer_leaky_relu.kept_for_backward(layer, case.provider)
