"""Hostile and careless inputs to patch, the fused modules and the batch norm function
(issue 11 items 2 and 11, and the TorchScript interop): every case asserts the eager
result or a clear error naming the argument."""

import copy
import math

import numpy as np
import pytest
import torch
from torch import nn

import imggen_fast
from imggen_fast import functional, reference
from imggen_fast import nn as fused_nn
from imggen_fast.patch import FusedAway


def fused_modules(model):
    return [m for m in model.modules() if type(m).__module__ == "imggen_fast.nn"]


def assert_patch_keeps_output(model, x):
    """Patches ``model`` in place; its output must not change. Returns the report."""
    torch.manual_seed(0)
    expected = model(x)
    imggen_fast.patch(model)
    torch.testing.assert_close(model(x), expected, equal_nan=True)
    return imggen_fast.patch_report(model)


# --- modules used twice (issue 11 item 2) ----------------------------------------------


def test_a_layer_used_twice_in_a_sequential_is_not_fused_with_the_wrong_activation():
    torch.manual_seed(0)
    a, b = nn.Linear(6, 6), nn.Linear(6, 6)
    model = nn.Sequential(a, b, a, nn.LeakyReLU(0.2))  # the case: the output was off by 0.47
    report = assert_patch_keeps_output(model, torch.randn(4, 6))
    assert [type(m) for m in model] == [nn.Linear, nn.Linear, nn.Linear, nn.LeakyReLU]
    assert model[0] is a and model[2] is a
    (entry,) = report.skipped
    assert entry.where == "2 + 3" and "used in 2 places" in entry.reason and "at 0 no activation follows" in entry.reason


def test_a_layer_used_twice_is_fused_when_every_use_is_fused_alike():
    torch.manual_seed(0)
    a, b, activation = nn.Linear(6, 6), nn.Linear(6, 6), nn.LeakyReLU(0.2)
    model = nn.Sequential(a, activation, b, a, activation)
    assert_patch_keeps_output(model, torch.randn(4, 6))
    assert type(model[0]) is fused_nn.LinearLeakyReLU and model[0] is model[3]
    assert type(model[1]) is FusedAway and model[1] is model[4]
    assert type(model[2]) is nn.Linear
    imggen_fast.unpatch(model)
    assert model[0] is a and model[3] is a and model[1] is activation and model[4] is activation


def test_a_layer_used_twice_with_different_slopes_is_not_fused():
    torch.manual_seed(0)
    a = nn.Linear(6, 6)
    model = nn.Sequential(a, nn.LeakyReLU(0.2), a, nn.LeakyReLU(0.1))
    report = assert_patch_keeps_output(model, torch.randn(4, 6))
    assert not fused_modules(model) and "different slopes" in report.skipped[0].reason


def test_a_layer_shared_with_a_custom_forward_is_not_fused():
    class UsesDirectly(nn.Module):
        def __init__(self, layer):
            super().__init__()
            self.layer = layer

        def forward(self, x):
            return self.layer(x) * 2  # no activation after this use

    torch.manual_seed(0)
    shared = nn.Linear(6, 6)
    model = nn.Sequential(nn.Sequential(shared, nn.ReLU()), UsesDirectly(shared))
    report = assert_patch_keeps_output(model, torch.randn(4, 6))
    assert not fused_modules(model) and "1.layer" in report.skipped[0].reason


def test_a_sequential_used_twice_is_fused_once_and_runs_twice():
    torch.manual_seed(0)
    block = nn.Sequential(nn.Linear(6, 6), nn.BatchNorm1d(6), nn.ReLU())
    model = nn.Sequential(block, block)
    eager = copy.deepcopy(model)
    x = torch.randn(5, 6)
    imggen_fast.patch(model)
    assert type(model[0][1]) is fused_nn.BatchNorm1dLeakyReLU and model[0] is model[1]
    torch.testing.assert_close(model(x), eager(x))
    torch.testing.assert_close(model.state_dict(), eager.state_dict())  # statistics updated twice, as eager's
    assert int(model[0][1].num_batches_tracked) == 2


def test_modules_none_and_repeated_entries_do_not_confuse_the_walker():
    model = nn.Sequential(nn.Linear(3, 3), nn.ReLU())
    model.register_module("empty", None)
    imggen_fast.patch(model)
    assert type(model[0]) is fused_nn.LinearLeakyReLU
    imggen_fast.unpatch(model)
    assert type(model[0]) is nn.Linear and model.empty is None


# --- slopes: numpy scalars accepted, what the fused layers cannot run refused (item 11) --


@pytest.mark.parametrize("slope", [np.float32(0.2), np.float64(0.2), np.int64(0), 0])
def test_numpy_and_integer_slopes_are_fused_like_torch_runs_them(slope):
    model = nn.Sequential(nn.Linear(4, 4), nn.LeakyReLU(slope), nn.Unflatten(1, (1, 2, 2)),
                          nn.Conv2d(1, 2, 1), nn.BatchNorm2d(2), nn.LeakyReLU(slope))
    report = assert_patch_keeps_output(model, torch.randn(3, 4))
    assert len(report.fused) == 2 and not report.skipped
    assert all(type(m.negative_slope) is float for m in fused_modules(model))


@pytest.mark.parametrize("slope,message", [
    (-0.5, "negative_slope must be finite and >= 0"), (math.inf, "negative_slope must be finite and >= 0"),
    (math.nan, "negative_slope must be finite and >= 0"), (True, "negative_slope must be a number, got bool"),
    (np.bool_(True), "negative_slope must be a number, got bool"),
])
def test_slopes_the_fused_layers_cannot_run_are_refused_at_patch_time(slope, message):
    model = nn.Sequential(nn.Linear(4, 4), nn.LeakyReLU(slope), nn.Unflatten(1, (4, 1)), nn.BatchNorm1d(4),
                          nn.LeakyReLU(slope))
    report = assert_patch_keeps_output(model, torch.randn(3, 4))
    assert not fused_modules(model) and len(report.skipped) == 2
    assert all(message in entry.reason for entry in report.skipped)
    for fused_type, arguments in ((fused_nn.LinearLeakyReLU, (4, 4)), (fused_nn.BatchNorm2dLeakyReLU, (4,))):
        with pytest.raises((TypeError, ValueError), match=message):
            fused_type(*arguments, negative_slope=slope)


def test_numpy_scalars_are_accepted_by_the_functions():
    torch.manual_seed(0)
    x, w = torch.randn(2, 3, 6, 6), torch.randn(4, 3, 3, 3)
    torch.testing.assert_close(functional.conv2d_leaky_relu(x, w, negative_slope=np.float32(0.2)),
                               reference.conv2d_leaky_relu(x, w, negative_slope=0.2), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(functional.linear_leaky_relu(x, torch.randn(5, 6), negative_slope=np.float64(0.1)).shape,
                               torch.Size([2, 3, 6, 5]))
    mu, logvar, eps = torch.randn(4, 3), torch.randn(4, 3), torch.randn(4, 3)
    torch.testing.assert_close(functional.reparameterize_kl(mu, logvar, eps, beta=np.float32(0.5)),
                               reference.reparameterize_kl(mu, logvar, eps, beta=0.5))
    logits = torch.randn(8)
    torch.testing.assert_close(functional.bce_with_logits(logits, np.float32(0.9)),
                               reference.bce_with_logits(logits, 0.9))
    torch.testing.assert_close(functional.gan_d_loss(logits, logits, np.float32(0.9), np.float64(0.1)),
                               reference.gan_d_loss(logits, logits, 0.9, 0.1))
    torch.testing.assert_close(functional.gan_g_loss(logits, np.float32(1.0)), reference.gan_g_loss(logits, 1.0))


@pytest.mark.parametrize("call,message", [
    (lambda: functional.reparameterize_kl(torch.zeros(2, 2), torch.zeros(2, 2), beta=np.bool_(True)),
     "beta must be a number, got bool"),
    (lambda: functional.bce_with_logits(torch.zeros(2), True), "target must be a tensor or a number, got bool"),
    (lambda: functional.gan_g_loss(torch.zeros(2), "1"), "real_label must be a number, got str"),
    (lambda: functional.linear_leaky_relu(torch.zeros(2, 2), torch.zeros(2, 2), negative_slope=torch.tensor(0.2)),
     "negative_slope must be a number, got Tensor"),
])
def test_bools_and_other_non_numbers_are_still_refused(call, message):
    with pytest.raises(TypeError, match=message):
        call()


# --- TorchScript interop --------------------------------------------------------------


def test_patch_refuses_a_scripted_model_instead_of_doing_nothing():
    scripted = torch.jit.script(nn.Sequential(nn.Linear(3, 3), nn.LeakyReLU(0.2)))
    with pytest.raises(TypeError, match="TorchScript module.*torch.jit.script\\(imggen_fast.patch\\(model\\)\\)"):
        imggen_fast.patch(scripted)


def test_a_scripted_submodule_is_left_alone_and_reported():
    model = nn.Sequential(torch.jit.script(nn.Sequential(nn.Linear(3, 3), nn.ReLU())), nn.Linear(3, 3), nn.ReLU())
    report = assert_patch_keeps_output(model, torch.randn(2, 3))
    assert type(model[1]) is fused_nn.LinearLeakyReLU
    assert report.skipped[0].where == "0" and "TorchScript" in report.skipped[0].reason


def test_a_patched_model_scripts_despite_the_float_annotation():
    model = imggen_fast.patch(nn.Sequential(nn.Linear(3, 3), nn.LeakyReLU(0.2)))
    x = torch.randn(2, 3)
    torch.testing.assert_close(torch.jit.script(model)(x), model(x))


@pytest.mark.parametrize("call,error,message", [
    (lambda: imggen_fast.patch("model"), TypeError, "model must be a torch.nn.Module, got str"),
    (lambda: imggen_fast.patch(nn.Linear(2, 2), trace="yes"), TypeError, "trace must be a bool, got str"),
    (lambda: imggen_fast.patch(nn.Linear(2, 2), channels_last=1), TypeError, "channels_last must be a bool, got int"),
    (lambda: imggen_fast.patch_report(nn.Linear(2, 2)), ValueError, "was not patched"),
])
def test_bad_patch_arguments(call, error, message):
    with pytest.raises(error, match=message):
        call()


# --- batch_norm_leaky_relu: the contract and its bad-input table ------------------------


def test_batch_norm_leaky_relu_is_batch_norm_then_leaky_relu_with_the_same_statistics():
    torch.manual_seed(0)
    x = torch.randn(6, 3, 4, 5)
    weight, bias = torch.rand(3) + 0.5, torch.randn(3)
    for training in (True, False):
        ours, theirs = (torch.zeros(3), torch.ones(3)), (torch.zeros(3), torch.ones(3))
        expected = torch.nn.functional.leaky_relu(
            torch.nn.functional.batch_norm(x, *theirs, weight, bias, training, 0.3, 1e-3), 0.1)
        actual = functional.batch_norm_leaky_relu(x, *ours, weight, bias, training, np.float32(0.3), 1e-3,
                                                  negative_slope=0.1)
        torch.testing.assert_close(actual, expected)
        torch.testing.assert_close(ours, theirs)
    x = torch.randn(5, 3, requires_grad=True)
    torch.testing.assert_close(functional.batch_norm_leaky_relu(x, None, None, training=np.bool_(True)),
                               torch.nn.functional.leaky_relu(torch.nn.functional.batch_norm(x, None, None,
                                                                                             training=True)))


def _bn_arguments(**changes):
    arguments = dict(input=torch.randn(4, 3, 2, 2), running_mean=torch.zeros(3), running_var=torch.ones(3),
                     weight=torch.ones(3), bias=torch.zeros(3), training=True, momentum=0.1, eps=1e-5,
                     negative_slope=0.2)
    return {**arguments, **changes}


@pytest.mark.parametrize("changes,error,message", [
    (dict(input=[1.0]), TypeError, "input must be a torch.Tensor"),
    (dict(input=torch.ones(4, 3, dtype=torch.int64)), TypeError, "input must be a floating-point tensor"),
    (dict(input=torch.ones(3)), ValueError, "input must be .N, C, \\*. with at least 2 dims"),
    (dict(running_var=None), ValueError, "running_mean and running_var must both be tensors or both be None"),
    (dict(running_mean=None, running_var=None, training=False), ValueError, "needed when training=False"),
    (dict(training=1), TypeError, "training must be a bool, got int"),
    (dict(running_mean=torch.zeros(4)), ValueError, "running_mean must have shape .C,. = .3,."),
    (dict(running_var=torch.ones(3, 1)), ValueError, "running_var must have shape"),
    (dict(weight=torch.ones(2)), ValueError, "weight must have shape"),
    (dict(bias=torch.zeros(3, dtype=torch.int32)), TypeError, "bias must be a floating-point tensor"),
    (dict(bias=torch.zeros(3, device="meta")), ValueError, "bias is on meta but input is on cpu"),
    (dict(weight=torch.ones(3, dtype=torch.float64)), TypeError, "must share one dtype.*weight torch.float64"),
    (dict(input=torch.randn(1, 3), running_mean=None, running_var=None), ValueError,
     "training needs more than 1 value per channel"),
    (dict(momentum="0.1"), TypeError, "momentum must be a number, got str"),
    (dict(momentum=math.inf), ValueError, "momentum must be finite"),
    (dict(eps=-1.0), ValueError, "eps must be finite and >= 0"),
    (dict(eps=math.nan), ValueError, "eps must be finite and >= 0"),
    (dict(negative_slope=-0.1), ValueError, "negative_slope must be finite and >= 0"),
    (dict(negative_slope=True), TypeError, "negative_slope must be a number, got bool"),
])
def test_batch_norm_leaky_relu_names_the_bad_argument_before_computing(changes, error, message):
    arguments = _bn_arguments(**changes)
    statistics = [t.clone() if isinstance(t, torch.Tensor) else t
                  for t in (arguments["running_mean"], arguments["running_var"])]
    with pytest.raises(error, match=f"batch_norm_leaky_relu: .*{message}"):
        functional.batch_norm_leaky_relu(**arguments)
    for before, after in zip(statistics, (arguments["running_mean"], arguments["running_var"])):
        if isinstance(before, torch.Tensor) and before.device.type == "cpu":
            assert torch.equal(before, after)  # nothing was computed or updated


def test_batch_norm_leaky_relu_takes_float32_statistics_for_bfloat16_input_as_torch_does():
    x = torch.randn(4, 3, 2, 2).bfloat16()
    statistics = (torch.zeros(3), torch.ones(3))
    expected = torch.nn.functional.leaky_relu(torch.nn.functional.batch_norm(x, torch.zeros(3), torch.ones(3),
                                                                             training=True), 0.2)
    torch.testing.assert_close(functional.batch_norm_leaky_relu(x, *statistics, training=True, negative_slope=0.2),
                               expected)
