"""The benchmark cases run (once, at their smallest size) and their figures are sane, so
`pytest benchmarks/ --benchmark-only` and the report cannot rot unnoticed."""

import pytest
import torch

from imggen_fast.bench import common, layer_leaky_relu


@pytest.mark.parametrize("case", layer_leaky_relu.cases(layers=[layer_leaky_relu.LAYERS[0]]),
                         ids=lambda case: case.id)
def test_layer_cases_run(case):
    function = case.make()
    function()
    info = case.info(median_seconds=1e-3, copy_gbps=10.0, matmul_gflops=50.0)
    assert info["GFLOP/s"] == pytest.approx(case.flops / 1e-3 / 1e9, rel=0.01)
    assert 0 < info["share_of_matmul"]


def test_kept_for_backward_one_layer_and_the_generator():
    # One layer: every provider keeps one activation (eager's is the pre-activation).
    layer = layer_leaky_relu.LAYERS[0]
    kept = {provider: layer_leaky_relu.kept_for_backward(layer, provider)
            for provider in ("eager", "eager_inplace", "imggen_fast")}
    assert kept["imggen_fast"] == kept["eager_inplace"] == kept["eager"]
    # A chain (the whole generator): eager keeps a pre-activation and an activation per layer.
    chain = {provider: layer_leaky_relu.generator_kept_for_backward(provider, image_size=16)
             for provider in ("eager", "eager_inplace", "imggen_fast")}
    assert chain["imggen_fast"] == chain["eager_inplace"] < chain["eager"]


def test_machine_figures_are_positive():
    assert common.copy_bandwidth_gbps(1 << 20) > 0
    assert common.matmul_gflops(128) > 0


def test_saved_bytes_counts_each_storage_once():
    weight = torch.randn(8, 8, requires_grad=True)
    x = torch.randn(4, 8)
    # x @ w saves x and w; (x @ w) * w saves the product and w again (same storage).
    kept = common.saved_bytes(lambda: (x @ weight) @ weight)
    assert kept == x.nbytes + weight.nbytes + 4 * 8 * 4
