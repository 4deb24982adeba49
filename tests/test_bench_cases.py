"""The benchmark cases run (once, at their smallest size) and their figures are sane, so
`pytest benchmarks/ --benchmark-only` and the report cannot rot unnoticed."""

import pytest
import torch

from imggen_fast.bench import bce_with_logits, common, layer_leaky_relu, reparameterize_kl


@pytest.mark.parametrize("case", layer_leaky_relu.cases(layers=[layer_leaky_relu.LAYERS[0]]),
                         ids=lambda case: case.id)
def test_layer_cases_run(case):
    function = case.make()
    function()
    info = case.info(median_seconds=1e-3, copy_gbps=10.0, matmul_gflops=50.0)
    assert info["GFLOP/s"] == pytest.approx(case.flops / 1e-3 / 1e9, rel=0.01)
    assert 0 < info["share_of_matmul"]


# The smallest size of the other suites, forward + backward, every provider but
# torch.compile (its cases compile afresh: tens of seconds each on 2 cores).
SMALL_CASES = [case for case in reparameterize_kl.cases() if case.size == "128x32" and case.direction == "both"]
SMALL_CASES += bce_with_logits.cases(sizes=("64",))


@pytest.mark.parametrize("case", [case for case in SMALL_CASES if case.provider != common.COMPILE],
                         ids=lambda case: case.id)
def test_loss_and_bottleneck_cases_run(case):
    function = case.make()
    gradients = function()  # the loss cases return the gradients; the bottleneck's accumulate them
    assert gradients is None or all(torch.isfinite(gradient).all() for gradient in gradients)
    info = case.info(median_seconds=1e-6, copy_gbps=10.0)  # GB/s is rounded to 2 decimals
    assert info["GB/s"] == pytest.approx(case.bytes_moved / 1e-6 / 1e9, rel=0.01)
    assert 0 < info["share_of_copy_bandwidth"]


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
