"""The fused BatchNorm + LeakyReLU ``batch_norm_leaky_relu`` on every backend against eager
``F.leaky_relu(F.batch_norm(...))``: forward, running statistics and every gradient, what it
keeps for backward, the in-place forward, its modules and the patch walker's use of it."""

import copy
import functools
import math

import pytest
import torch
import torch.nn.functional as F
from helpers import kernel_op, requires_cuda
from torch import nn

import imggen_fast
from imggen_fast import functional, models
from imggen_fast import nn as fused_nn
from imggen_fast.bench import batch_norm_leaky_relu as bench
from imggen_fast.bench import timing
from imggen_fast.bench.common import saved_bytes

SLOPES = [0.0, 0.01, 0.2]
# (shape, memory format): odd sizes; 2-D and 3-D BatchNorm1d inputs, 4-D and 5-D; planes
# above one reduction block (70 x 70 > 4096), rows of many channels (300 > one vector),
# channels_last with channels beyond a whole number of vectors.
CPP_SHAPES = [((2, 3), None), ((70, 300), None), ((5, 4, 7), None), ((3, 5, 6, 7), None),
              ((2, 3, 70, 70), None), ((4, 19, 5, 7), torch.channels_last), ((2, 3, 2, 3, 4), None),
              ((2, 5, 3, 4, 3), torch.channels_last_3d)]
TRITON_SHAPES = [((3, 4), None), ((5, 4, 7), None), ((3, 5, 6, 7), None), ((4, 19, 5, 7), torch.channels_last)]
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
# An error at most this many times eager's own (both against float64), plus this many
# units of the dtype's rounding of the result's size: the fused op is as accurate as eager.
EAGER_ERROR_FACTOR = 4.0
ROUNDING_UNITS = 16.0


def make_inputs(shape, dtype=torch.float32, memory_format=None, seed=0, weight_scale=1.0, affine=True,
                parameter_dtype=None):
    """input (shifted and scaled, as a convolution's output is), running statistics, weight,
    bias and a grad_output that is not 1, all in float64 (cast per use)."""
    generator = torch.Generator().manual_seed(seed)
    channels = shape[1]
    input = torch.randn(shape, generator=generator, dtype=torch.float64) * 1.5 + 0.7
    if memory_format is not None:
        input = input.contiguous(memory_format=memory_format)
    grad_output = torch.randn(shape, generator=generator, dtype=torch.float64)
    weight = (torch.rand(channels, generator=generator, dtype=torch.float64) + 0.5) * weight_scale
    bias = torch.randn(channels, generator=generator, dtype=torch.float64) * 0.3
    statistics = (torch.randn(channels, generator=generator, dtype=torch.float64) * 0.1,
                  torch.rand(channels, generator=generator, dtype=torch.float64) + 0.5)
    return {"input": input, "grad_output": grad_output, "weight": weight if affine else None,
            "bias": bias if affine else None, "running_mean": statistics[0], "running_var": statistics[1],
            "dtype": dtype, "parameter_dtype": parameter_dtype or (torch.float64 if dtype == torch.float64 else
                                                                   torch.float32)}


def run(function, inputs, training, negative_slope, momentum=0.1, eps=1e-5, dtype=None, parameter_dtype=None,
        **kwargs):
    """(output, running_mean, running_var, grad_input, grad_weight, grad_bias) of ``function``
    (F.batch_norm's arguments plus negative_slope) on ``inputs`` cast to the dtypes."""
    dtype = dtype or inputs["dtype"]
    parameter_dtype = parameter_dtype or (dtype if dtype == torch.float64 else inputs["parameter_dtype"])
    input = inputs["input"].to(dtype).requires_grad_()
    running = [inputs[name].to(parameter_dtype) for name in ("running_mean", "running_var")]
    parameters = [None if inputs[name] is None else inputs[name].to(parameter_dtype).requires_grad_()
                  for name in ("weight", "bias")]
    output = function(input, *running, *parameters, training, momentum, eps, negative_slope=negative_slope, **kwargs)
    leaves = [input] + [parameter for parameter in parameters if parameter is not None]
    grads = torch.autograd.grad(output, leaves, inputs["grad_output"].to(dtype))
    grad_parameters = iter(grads[1:])
    grads = [grads[0]] + [None if parameter is None else next(grad_parameters) for parameter in parameters]
    return (output.detach(), *running, *grads)


def eager(input, running_mean, running_var, weight, bias, training, momentum, eps, negative_slope):
    return F.leaky_relu(F.batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps),
                        negative_slope)


NAMES = ("output", "running_mean", "running_var", "grad_input", "grad_weight", "grad_bias")


def assert_as_accurate_as_eager(inputs, training, negative_slope, fused=functional.batch_norm_leaky_relu, **kwargs):
    """The fused op's results are no further from float64 eager than EAGER_ERROR_FACTOR times
    eager's own in the same dtype, give or take ROUNDING_UNITS roundings of each result's size."""
    exact = run(eager, inputs, training, negative_slope, dtype=torch.float64, parameter_dtype=torch.float64)
    reference = run(eager, inputs, training, negative_slope)
    results = run(fused, inputs, training, negative_slope, **kwargs)
    unit = torch.finfo(inputs["dtype"]).eps
    for name, result, expected, exact_value in zip(NAMES, results, reference, exact):
        if exact_value is None:
            assert result is None, name
            continue
        assert result.dtype == expected.dtype and result.shape == expected.shape, name
        error = (result.double() - exact_value).abs().max().item()
        eager_error = (expected.double() - exact_value).abs().max().item()
        bound = EAGER_ERROR_FACTOR * eager_error + ROUNDING_UNITS * unit * (exact_value.abs().max().item() + 1)
        assert error <= bound, f"{name}: error {error:.3g}, eager's {eager_error:.3g}, bound {bound:.3g}"
    return results


@pytest.mark.parametrize("shape,memory_format", CPP_SHAPES, ids=[f"{s}-{f}" for s, f in CPP_SHAPES])
@pytest.mark.parametrize("negative_slope", SLOPES)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_cpp_matches_eager(shape, memory_format, negative_slope, training):
    inputs = make_inputs(shape, memory_format=memory_format)
    with imggen_fast.set_backend("cpp"):
        output, *_ = assert_as_accurate_as_eager(inputs, training, negative_slope)
    if memory_format is not None:
        assert output.is_contiguous(memory_format=memory_format)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("same_parameter_dtype", [False, True], ids=["float32 parameters", "input's dtype"])
def test_cpp_dtypes(dtype, same_parameter_dtype):
    """bfloat16 / float16 inputs with float32 weight, bias and running statistics (mixed, as
    eager allows) or with parameters of their own dtype."""
    inputs = make_inputs((6, 5, 9, 11), dtype, parameter_dtype=dtype if same_parameter_dtype else None)
    with imggen_fast.set_backend("cpp"):
        for training in (True, False):
            for slope in (0.0, 0.2):
                assert_as_accurate_as_eager(inputs, training, slope)


@pytest.mark.parametrize("shape,memory_format", TRITON_SHAPES, ids=[f"{s}-{f}" for s, f in TRITON_SHAPES])
@pytest.mark.parametrize("negative_slope", [0.0, 0.2])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_triton_matches_eager(shape, memory_format, negative_slope, training):
    """The Triton kernels in the interpreter (fp32)."""
    inputs = make_inputs(shape, memory_format=memory_format)
    with imggen_fast.set_backend("triton"):
        assert_as_accurate_as_eager(inputs, training, negative_slope)


def test_triton_blocks_merge_across_programs():
    """A channel of 2 x 1100 elements spans three reduction programs."""
    with imggen_fast.set_backend("triton"):
        assert_as_accurate_as_eager(make_inputs((2, 2, 1100)), True, 0.2)


def test_reference_backend_is_eager():
    inputs = make_inputs((4, 3, 5, 6))
    with imggen_fast.set_backend("reference"):
        for name, got, want in zip(NAMES, run(functional.batch_norm_leaky_relu, inputs, True, 0.2, overwrite_input=True),
                                   run(eager, inputs, True, 0.2)):
            torch.testing.assert_close(got, want, rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("backend", ["cpp", "triton"])
def test_without_affine_parameters_or_running_statistics(backend):
    inputs = make_inputs((4, 3, 5, 6), affine=False)
    with imggen_fast.set_backend(backend):
        assert_as_accurate_as_eager(inputs, True, 0.2)
        assert_as_accurate_as_eager(inputs, False, 0.0)
        x = inputs["input"].float()
        torch.testing.assert_close(functional.batch_norm_leaky_relu(x, None, None, None, None, True, 0.1, 1e-5, 0.2),
                                   eager(x, None, None, None, None, True, 0.1, 1e-5, 0.2))


@pytest.mark.parametrize("backend", ["cpp", "triton"])
def test_running_statistics_as_strided_and_offset_views_are_updated(backend):
    x = torch.randn(4, 3, 5, 6)
    with imggen_fast.set_backend(backend):
        for make in (lambda fill: torch.full((6,), fill)[::2], lambda fill: torch.full((8,), fill)[5:]):
            ours, theirs = (make(0.5), make(2.0)), (make(0.5), make(2.0))
            functional.batch_norm_leaky_relu(x, *ours, None, None, True, 0.3, 1e-5, 0.2)
            F.batch_norm(x, *theirs, None, None, True, 0.3, 1e-5)
            torch.testing.assert_close(ours, theirs)
            assert ours[0]._base is not None  # updated in place, in the caller's views


@pytest.mark.parametrize("backend", ["cpp", "triton"])
def test_mixed_layouts_and_strided_views(backend):
    """A gapped view, a permuted (batch not outermost) input, grad_output in another layout."""
    base = torch.randn(4, 6, 5, 8, dtype=torch.float64)
    weight, bias = torch.rand(3, dtype=torch.float64) + 0.5, torch.randn(3, dtype=torch.float64)
    for input in (base[:, ::2], base[:, :3].permute(3, 1, 0, 2)):
        x = input.float().requires_grad_()
        grad_output = torch.randn(x.shape).contiguous(memory_format=torch.channels_last)
        with imggen_fast.set_backend(backend):
            output = functional.batch_norm_leaky_relu(x, None, None, weight.float(), bias.float(), True, 0.1, 1e-5,
                                                      0.2)
            (grad,) = torch.autograd.grad(output, x, grad_output)
        expected = eager(x, None, None, weight.float(), bias.float(), True, 0.1, 1e-5, 0.2)
        (expected_grad,) = torch.autograd.grad(expected, x, grad_output)
        torch.testing.assert_close(output, expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(grad, expected_grad, rtol=1e-5, atol=1e-5)
        assert output.stride() == torch.empty_like(x).stride()


@pytest.mark.parametrize("backend", ["cpp", "triton"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_no_channels(backend, training):
    """Zero channels give empty results (eager's batch_norm raises an IndexError here when
    its weight requires grad)."""
    x = torch.randn(2, 0, 3, 3, requires_grad=True)
    weight, bias = torch.rand(0, requires_grad=True), torch.randn(0, requires_grad=True)
    with imggen_fast.set_backend(backend):
        output = functional.batch_norm_leaky_relu(x, torch.zeros(0), torch.ones(0), weight, bias, training, 0.1,
                                                  1e-5, 0.2)
        grads = torch.autograd.grad(output.sum(), [x, weight, bias])
    assert output.shape == x.shape and [grad.shape for grad in grads] == [x.shape, (0,), (0,)]


# --- modules: momentum=None, track_running_stats=False, eval ---------------------------


@pytest.mark.parametrize("backend", ["cpp", "triton"])
@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("negative_slope", [0.0, 0.2])
def test_module_steps_match_eager_modules(backend, momentum, negative_slope):
    """Three training steps (momentum None: the cumulative average through
    num_batches_tracked) and an eval step: outputs, gradients and buffers as eager's."""
    torch.manual_seed(0)
    ours = fused_nn.BatchNorm2dLeakyReLU(5, momentum=momentum, negative_slope=negative_slope)
    theirs = nn.Sequential(nn.BatchNorm2d(5, momentum=momentum), nn.LeakyReLU(negative_slope))
    with torch.no_grad():
        for module in (ours, theirs[0]):
            module.weight.copy_(torch.linspace(0.5, 1.5, 5))
            module.bias.copy_(torch.linspace(-0.3, 0.3, 5))
    with imggen_fast.set_backend(backend):
        for step in range(4):
            if step == 3:
                ours.eval()
                theirs.eval()
            x = torch.randn(4, 5, 3, 6) * (step + 1) + step
            grad_output = torch.randn_like(x)
            results = []
            for module in (ours, theirs):
                output = module(x)
                grads = torch.autograd.grad(output, list(module.parameters()), grad_output)
                results.append((output, *grads, *module.buffers()))
            for got, want in zip(*results):
                torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_module_1d_and_without_tracked_statistics():
    torch.manual_seed(0)
    for ours, theirs, shape in (
            (fused_nn.BatchNorm1dLeakyReLU(7, negative_slope=0.2), nn.BatchNorm1d(7), (9, 7)),
            (fused_nn.BatchNorm1dLeakyReLU(3, affine=False, negative_slope=0.0), nn.BatchNorm1d(3, affine=False),
             (4, 3, 5)),
            (fused_nn.BatchNorm2dLeakyReLU(3, track_running_stats=False, negative_slope=0.2),
             nn.BatchNorm2d(3, track_running_stats=False), (4, 3, 2, 5))):
        x = torch.randn(shape)
        for mode in ("train", "eval"):
            ours.train(mode == "train")
            theirs.train(mode == "train")
            torch.testing.assert_close(ours(x), F.leaky_relu(theirs(x), ours.negative_slope))
            torch.testing.assert_close(list(ours.buffers()), list(theirs.buffers()))


# --- numerics: weights near zero, thread counts --------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("negative_slope", [0.01, 0.2])
def test_weights_near_zero_are_as_accurate_as_eager(dtype, negative_slope):
    """Channels with weights 0, 1e-7, -1e-4 and 1e-2 beside ordinary ones, biases 0 or not:
    where the output cannot give x_hat back accurately the input is kept, so every result
    stays as accurate as eager's; and a channel of weight 1e-3 and bias 0 is recovered
    accurately from the output (the conditioning depends on bias / weight)."""
    inputs = make_inputs((6, 8, 5, 7), dtype)
    inputs["weight"] = torch.tensor([0.0, 1e-7, -1e-4, 1e-2, 1.0, -0.7, 2.0, 1e-3], dtype=torch.float64)
    inputs["bias"] = torch.tensor([0.5, 0.2, 0.0, -0.1, 0.3, 0.0, -0.2, 0.0], dtype=torch.float64)
    with imggen_fast.set_backend("cpp"):
        for training in (True, False):
            assert_as_accurate_as_eager(inputs, training, negative_slope)
        recovered = {**inputs, "weight": torch.tensor([1e-3, 1e-3, 1.0, 0.5, 1.0, 1.0, 2.0, 1e-3],
                                                      dtype=torch.float64), "bias": torch.zeros(8, dtype=torch.float64)}
        assert saved_kind(recovered, negative_slope) == "output"
        assert_as_accurate_as_eager(recovered, True, negative_slope)


@pytest.mark.parametrize("shape,memory_format", [((8, 6, 40, 40), None), ((8, 6, 40, 40), torch.channels_last),
                                                 ((600, 70), None)], ids=["planes", "channels_last", "rows"])
@pytest.mark.parametrize("negative_slope", [0.0, 0.2])
def test_same_bits_with_one_and_two_threads(shape, memory_format, negative_slope):
    """Several reduction blocks per channel, spread over one thread or two."""
    inputs = make_inputs(shape, memory_format=memory_format)
    threads = torch.get_num_threads()
    results = []
    try:
        for count in (1, 2):
            torch.set_num_threads(count)
            with imggen_fast.set_backend("cpp"):
                results.append(run(functional.batch_norm_leaky_relu, inputs, True, negative_slope))
    finally:
        torch.set_num_threads(threads)
    for name, one, two in zip(NAMES, *results):
        assert torch.equal(one, two), name


def test_statistics_stay_accurate_for_a_large_mean():
    """A mean 1e4 times the spread: the block moments and their merge keep the variance,
    where the textbook E[x^2] - E[x]^2 in float32 would lose it entirely."""
    x = torch.randn(16, 3, 33, 33, dtype=torch.float64) + 1e4
    running_var = torch.ones(3)
    functional.batch_norm_leaky_relu(x.float(), torch.zeros(3), running_var, None, None, True, 1.0, 1e-5, 0.2)
    expected = x.float().double().var(dim=(0, 2, 3))
    torch.testing.assert_close(running_var.double(), expected, rtol=1e-4, atol=0)


# --- what is kept for backward ------------------------------------------------------------


def saved_storages(function):
    """{storage data_ptr: nbytes} of what autograd keeps while ``function()`` runs."""
    storages = {}

    def pack(tensor):
        storages[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        output = function()
    return storages, output


def saved_kind(inputs, negative_slope, training=True):
    """Which tensor of the input's size the op keeps for backward: "output" or "input"."""
    x = inputs["input"].to(inputs["dtype"]).requires_grad_()
    weight = inputs["weight"].to(inputs["parameter_dtype"]).requires_grad_()
    bias = inputs["bias"].to(inputs["parameter_dtype"]).requires_grad_()
    statistics = [inputs[name].to(inputs["parameter_dtype"]) for name in ("running_mean", "running_var")]
    storages, output = saved_storages(lambda: functional.batch_norm_leaky_relu(
        x, *statistics, weight, bias, training, 0.1, 1e-5, negative_slope))
    large = {pointer for pointer, size in storages.items() if size >= x.untyped_storage().nbytes()}
    assert len(large) == 1, "exactly one tensor of the input's size is kept"
    return {x.untyped_storage().data_ptr(): "input", output.untyped_storage().data_ptr(): "output"}[large.pop()]


def test_what_is_kept_for_backward():
    inputs = make_inputs((4, 3, 6, 5))
    with imggen_fast.set_backend("cpp"):
        assert saved_kind(inputs, 0.2) == "output"
        assert saved_kind(inputs, 0.2, training=False) == "output"
        assert saved_kind({**inputs, "dtype": torch.bfloat16}, 0.2) == "output"
        assert saved_kind(inputs, 0.0) == "input"  # ReLU: the negative pre-activations are lost
        # |bias| > 4 |weight| in one channel: x_hat = (pre - bias) / weight is ill-conditioned there.
        assert saved_kind({**inputs, "bias": torch.tensor([0.1, 4.5, 0.0], dtype=torch.float64),
                           "weight": torch.tensor([1.0, 1.0, 1.0], dtype=torch.float64)}, 0.2) == "input"
        assert saved_kind({**inputs, "weight": torch.tensor([1.0, 0.0, 1.0], dtype=torch.float64)}, 0.2) == "input"
        # float16: min(1, slope) * |weight| must clear the subnormal range (6.1e-5).
        small = {**inputs, "dtype": torch.float16, "bias": torch.zeros(3, dtype=torch.float64),
                 "weight": torch.tensor([1.0, 1e-3, 1.0], dtype=torch.float64)}
        assert saved_kind(small, 0.01) == "input"
        assert saved_kind(small, 0.2) == "output"


def test_the_dcgan_discriminator_keeps_less_than_eager_and_the_generator_no_more():
    """Batch 4, 32 x 32, a quarter of the paper's width: each BatchNorm + LeakyReLU block of
    the discriminator keeps one tensor instead of two."""
    torch.manual_seed(0)
    figures = {}
    for name, build, inputs in (
            ("discriminator", lambda: models.Discriminator("dcgan", image_size=32, width=16),
             (torch.randn(4, 3, 32, 32),)),
            ("generator", lambda: models.Generator(image_size=32, kind="dcgan", width=16), (torch.randn(4, 100),))):
        eager_model = build()
        patched_model = imggen_fast.patch(copy.deepcopy(eager_model))
        figures[name] = tuple(saved_bytes(functools.partial(model, *inputs), exclude=model.parameters())
                              for model in (eager_model, patched_model))
    eager_bytes, patched_bytes = figures["discriminator"]
    # Eager keeps the image, the first block's activation and two tensors per BatchNorm
    # block; the patched model one per block.
    image, first, blocks = 4 * 3 * 32 * 32 * 4, 4 * 16 * 16 * 16 * 4, [4 * 32 * 8 * 8 * 4, 4 * 64 * 4 * 4 * 4]
    assert patched_bytes <= image + first + sum(blocks) + 4096 < eager_bytes
    assert figures["generator"][1] <= figures["generator"][0]


def allocations_of(nbytes, function):
    """How many buffers of exactly ``nbytes`` torch's CPU allocator hands out while ``function()`` runs."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as profiler:
        function()
    return sum(1 for event in profiler.profiler.kineto_results.events()
               if event.name() == "[memory]" and event.nbytes() == nbytes)


def test_backward_writes_over_a_gradient_nothing_else_holds():
    """In a chain, the gradient reaching the op is autograd's alone: the op's input gradient
    is written over it instead of a fresh buffer, with eager's values. A hook on the op's
    output holds that gradient too: then it is left alone, and one more buffer is made."""
    torch.manual_seed(0)
    x = torch.randn(4, 3, 5, 5, requires_grad=True)
    weights = torch.linspace(-1, 1, x.numel()).view_as(x)
    expected_output = eager(x * 2.0, None, None, None, None, True, 0.1, 1e-5, 0.2)
    (expected,) = torch.autograd.grad((expected_output * 3.0 * weights).sum(), x)
    counts = []
    for hooked in (False, True):
        output = functional.batch_norm_leaky_relu(x * 2.0, None, None, None, None, True, 0.1, 1e-5, 0.2)
        if hooked:
            output.register_hook(lambda grad: None)
        loss = (output * 3.0 * weights).sum()
        grads = []
        counts.append(allocations_of(x.nbytes, lambda: grads.extend(torch.autograd.grad(loss, x))))
        torch.testing.assert_close(grads[0], expected)
    assert counts[1] == counts[0] + 1


# --- the in-place forward ------------------------------------------------------------------


def test_overwrite_input_writes_over_the_input_and_gives_eagers_gradients():
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 6, 3, padding=1)
    weight, bias = (torch.rand(6) + 0.5).requires_grad_(), torch.randn(6).mul(0.1).requires_grad_()
    x = torch.randn(4, 3, 5, 5)
    results = []
    for overwrite in (True, False):
        statistics = (torch.zeros(6), torch.ones(6))
        hidden = conv(x)
        pointer = hidden.data_ptr()
        output = functional.batch_norm_leaky_relu(hidden, *statistics, weight, bias, True, 0.1, 1e-5, 0.2,
                                                  overwrite_input=overwrite)
        assert (output.data_ptr() == pointer) == overwrite
        grads = torch.autograd.grad((output * torch.linspace(-1, 1, output.numel()).view_as(output)).sum(),
                                    [weight, bias, *conv.parameters()])
        results.append((output.detach(), *statistics, *grads))
    for got, want in zip(*results):
        torch.testing.assert_close(got, want)


def test_overwrite_input_is_refused_by_autograd_when_the_input_is_needed_elsewhere():
    """Misuse: the input is saved by another op (sin), or is a leaf: autograd's own errors."""
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 1)
    hidden = conv(torch.randn(2, 3, 4, 4))
    other = hidden.sin()  # keeps hidden for its backward
    output = functional.batch_norm_leaky_relu(hidden, None, None, None, None, True, 0.1, 1e-5, 0.2,
                                              overwrite_input=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        (output.sum() + other.sum()).backward()
    leaf = torch.randn(2, 3, 4, 4, requires_grad=True)
    with pytest.raises(RuntimeError, match="leaf Variable that requires grad"):
        functional.batch_norm_leaky_relu(leaf, None, None, None, None, True, 0.1, 1e-5, 0.2, overwrite_input=True)


@pytest.mark.parametrize("backend", ["cpp", "triton"])
def test_in_place_op_keeps_a_copy_where_the_output_cannot_give_the_input_back(backend):
    """The in-place op with a zero weight (and on a view): still eager's gradients, also the
    double backward through the copy it keeps."""
    op = kernel_op("batch_norm_leaky_relu_")
    torch.manual_seed(0)
    weight = torch.tensor([1.0, 0.0, 0.5], dtype=torch.float64, requires_grad=True)
    bias = torch.tensor([0.1, 0.2, -0.3], dtype=torch.float64, requires_grad=True)
    x = torch.randn(4, 3, 2, 3, dtype=torch.float64, requires_grad=True)

    def in_place(x, weight, bias):
        hidden = x * 1.0
        op(hidden, None, None, weight, bias, True, 0.1, 1e-5, 0.2)
        return hidden

    def on_a_view(x, weight, bias):
        hidden = (x * 1.0).view(4, 3, 6)
        view = hidden[:, :, 1:]
        op(view, None, None, weight, bias, True, 0.1, 1e-5, 0.2)
        return hidden

    with imggen_fast.set_backend(backend):
        assert torch.autograd.gradcheck(in_place, (x, weight, bias))
        assert torch.autograd.gradgradcheck(in_place, (x, weight, bias))
        expected = (x * 1.0).view(4, 3, 6).clone()
        expected[:, :, 1:] = eager(expected[:, :, 1:], None, None, weight, bias, True, 0.1, 1e-5, 0.2)
        torch.testing.assert_close(on_a_view(x, weight, bias), expected)
        assert torch.autograd.gradcheck(on_a_view, (x, weight, bias))


def test_patch_lets_a_batch_norm_overwrite_only_a_free_convolution_output():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.LeakyReLU(0.2, inplace=True),   # free
                          nn.ConvTranspose2d(4, 4, 3), nn.BatchNorm2d(4), nn.ReLU(inplace=True),  # ReLU
                          nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4), nn.LeakyReLU(0.2),               # hook
                          nn.LeakyReLU(0.1), nn.BatchNorm2d(4), nn.LeakyReLU(0.2))                # not a layer
    model[6].register_forward_hook(lambda module, args, output: None)
    eager_model = copy.deepcopy(model)
    patched = imggen_fast.patch(model)
    assert [patched[index].overwrite_input for index in (1, 4, 7, 10)] == [True, False, False, False]
    assert "overwrite_input=True" in str(imggen_fast.patch_report(patched))
    x = torch.randn(2, 3, 8, 8)
    for mode in ("train", "eval"):
        for module in (patched, eager_model):
            module.train(mode == "train")
        output, expected = patched(x), eager_model(x)
        torch.testing.assert_close(output, expected, rtol=1e-4, atol=1e-5)
        grads = torch.autograd.grad(output.sum(), list(patched.parameters()))
        expected_grads = torch.autograd.grad(expected.sum(), list(eager_model.parameters()))
        torch.testing.assert_close(grads, expected_grads, rtol=1e-4, atol=1e-5)
    imggen_fast.unpatch(patched)
    assert type(patched[1]) is nn.BatchNorm2d and not hasattr(patched[1], "overwrite_input")


# --- the op contract: opcheck, gradcheck, compile, autocast, bad input --------------------------


def op_samples():
    """(op name, arguments) for every op and configuration."""
    samples = []
    for shape, memory_format in (((3, 4, 5, 6), None), ((3, 4, 5, 6), torch.channels_last), ((6, 5), None)):
        for training in (True, False):
            for slope in (0.0, 0.2):
                inputs = make_inputs(shape, memory_format=memory_format)
                x = inputs["input"].float()
                rest = [inputs[name].float() for name in ("running_mean", "running_var", "weight", "bias")]
                scalars = (training, 0.1, 1e-5, slope)
                samples.append(("batch_norm_leaky_relu", (x.clone().requires_grad_(), *rest[:2],
                                                          *(t.clone().requires_grad_() for t in rest[2:]), *scalars)))
                samples.append(("batch_norm_leaky_relu_", (x.clone(), *rest, *scalars)))
                samples.append(("batch_norm_leaky_relu_forward", (x, *rest, *scalars)))
                output, mean, invstd = kernel_op("batch_norm_leaky_relu_forward")(x, *[t.clone() for t in rest],
                                                                                  *scalars)
                grad_output = inputs["grad_output"].float()
                samples.append(("batch_norm_leaky_relu_backward",
                                (grad_output, x, None, mean, invstd, *rest[2:], training, slope)))
                samples.append(("batch_norm_leaky_relu_backward_",  # grad_output in x's strides
                                (torch.empty_like(x).copy_(grad_output), x, None, mean, invstd, *rest[2:], training,
                                 slope)))
                if slope:
                    samples.append(("batch_norm_leaky_relu_backward",
                                    (grad_output, None, output, mean, invstd, *rest[2:], training, slope)))
    return samples


@pytest.mark.parametrize("backend", ["cpp", "triton"])
def test_opcheck(backend):
    with imggen_fast.set_backend(backend):
        for name, arguments in op_samples():
            torch.library.opcheck(kernel_op(name), arguments)


@pytest.mark.parametrize("negative_slope", [0.0, 0.2], ids=["from input", "from output"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("backend", ["cpp", "triton"])
def test_gradcheck_and_gradgradcheck(backend, training, negative_slope):
    inputs = make_inputs((3, 2, 2, 3))
    x, weight, bias = (inputs[name].clone().requires_grad_() for name in ("input", "weight", "bias"))
    statistics = (inputs["running_mean"], inputs["running_var"])

    def function(x, weight, bias):
        return functional.batch_norm_leaky_relu(x, *(t.clone() for t in statistics), weight, bias, training, 0.1, 1e-5,
                                                negative_slope)

    with imggen_fast.set_backend(backend):
        assert torch.autograd.gradcheck(function, (x, weight, bias))
        assert torch.autograd.gradgradcheck(function, (x, weight, bias))


def test_gradient_penalty_through_a_patched_discriminator():
    """R1: the squared norm of the gradient of D's output with respect to its input, then its
    gradient with respect to D's parameters: as eager's."""
    torch.manual_seed(0)
    eager_model = models.Discriminator("dcgan", image_size=16, width=4).double()
    patched = imggen_fast.patch(copy.deepcopy(eager_model))
    images = torch.randn(3, 3, 16, 16, dtype=torch.float64)
    results = []
    for model in (patched, eager_model):
        x = images.clone().requires_grad_()
        (grad,) = torch.autograd.grad(model(x).sum(), x, create_graph=True)
        results.append(torch.autograd.grad(grad.pow(2).sum(), list(model.parameters())))
    torch.testing.assert_close(*results)


@pytest.mark.parametrize("overwrite_input", [False, True])
@pytest.mark.parametrize("negative_slope", [0.0, 0.2])
def test_torch_compile_fullgraph_matches_eager(negative_slope, overwrite_input):
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 5, 3)
    weight, bias = (torch.rand(5) + 0.5).requires_grad_(), torch.randn(5).requires_grad_()

    def step(x, running_mean, running_var):
        hidden = conv(x)
        output = functional.batch_norm_leaky_relu(hidden, running_mean, running_var, weight, bias, True, 0.1, 1e-5,
                                                  negative_slope, overwrite_input=overwrite_input)
        return (output * output.detach().sign()).sum()

    x = torch.randn(4, 3, 7, 7)
    results = []
    for function in (torch.compile(step, fullgraph=True, backend="inductor"), step):
        statistics = (torch.zeros(5), torch.ones(5))
        loss = function(x, *statistics)
        results.append((loss, *torch.autograd.grad(loss, [weight, bias, *conv.parameters()]), *statistics))
    # The convolution's bias gradient is 0 up to rounding (a batch norm follows it).
    torch.testing.assert_close(*results, rtol=1e-5, atol=1e-4)


def test_autocast_runs_in_the_input_dtype_as_eager():
    """Under autocast a convolution gives bfloat16; eager's batch norm then runs in bfloat16
    with its float32 parameters, and so does the fused op."""
    torch.manual_seed(0)
    ours = nn.Sequential(nn.Conv2d(3, 4, 3), fused_nn.BatchNorm2dLeakyReLU(4, negative_slope=0.2))
    theirs = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.LeakyReLU(0.2))
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(2, 3, 6, 6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        output, expected = ours(x), theirs(x)
    assert output.dtype == expected.dtype == torch.bfloat16
    torch.testing.assert_close(output, expected, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(list(ours.buffers()), list(theirs.buffers()), rtol=1e-2, atol=1e-3)


def _direct(**changes):
    arguments = dict(input=torch.randn(4, 3, 2, 2), running_mean=torch.zeros(3), running_var=torch.ones(3),
                     weight=torch.ones(3), bias=torch.zeros(3), training=True, momentum=0.1, eps=1e-5,
                     negative_slope=0.2)
    arguments.update(changes)
    return tuple(arguments.values())


def _backward(**changes):
    x = torch.randn(4, 3, 2, 2)
    arguments = dict(grad_output=torch.randn(4, 3, 2, 2), input=x, output=None, mean=torch.zeros(3),
                     invstd=torch.ones(3), weight=torch.ones(3), bias=torch.zeros(3), training=True,
                     negative_slope=0.2)
    arguments.update(changes)
    return tuple(arguments.values())


# Direct torch.ops calls with bad arguments (imggen_fast.functional refuses them before;
# tests/test_hostile_patch.py has its table): a clear error naming the argument, no crash.
BAD_DIRECT_CALLS = [
    ("batch_norm_leaky_relu_forward", _direct(input=torch.randn(3)), "input must be .N, C, \\*."),
    ("batch_norm_leaky_relu_forward", _direct(input=torch.ones(4, 3, dtype=torch.int64)), "input must be float32"),
    ("batch_norm_leaky_relu_forward", _direct(weight=torch.ones(4)), "weight must have shape .C,. = .3,."),
    ("batch_norm_leaky_relu_forward", _direct(bias=torch.ones(3, 1)), "bias must have shape"),
    ("batch_norm_leaky_relu_forward", _direct(running_mean=torch.zeros(5)), "running_mean must have shape"),
    ("batch_norm_leaky_relu_forward", _direct(running_var=None), "must both be tensors or both be None"),
    ("batch_norm_leaky_relu_forward", _direct(running_var=torch.ones(1).expand(3)),
     "running_var is updated in place, so its channels must not share memory"),
    ("batch_norm_leaky_relu_forward", _direct(running_mean=None, running_var=None, training=False),
     "needed when training=False"),
    ("batch_norm_leaky_relu_forward", _direct(weight=torch.ones(3, dtype=torch.float64)),
     "weight must have input's dtype"),
    ("batch_norm_leaky_relu_forward", _direct(input=torch.randn(1, 3)), "more than 1 value per channel"),
    ("batch_norm_leaky_relu_forward", _direct(eps=-1.0), "eps must be finite and >= 0"),
    ("batch_norm_leaky_relu_forward", _direct(momentum=math.nan), "momentum must be finite"),
    ("batch_norm_leaky_relu_forward", _direct(negative_slope=-0.5), "negative_slope must be finite and >= 0"),
    ("batch_norm_leaky_relu", _direct(weight=torch.ones(2)), "weight must have shape"),
    ("batch_norm_leaky_relu_", _direct(input=torch.randn(1, 3)), "more than 1 value per channel"),
    ("batch_norm_leaky_relu_backward", _backward(output=torch.randn(4, 3, 2, 2)), "exactly one of input and output"),
    ("batch_norm_leaky_relu_backward", _backward(input=None, output=torch.randn(4, 3, 2, 2), negative_slope=0.0),
     "cannot be recovered from the output when negative_slope is 0"),
    ("batch_norm_leaky_relu_backward", _backward(grad_output=torch.randn(4, 3, 2)), "grad_output shape"),
    ("batch_norm_leaky_relu_backward", _backward(mean=torch.zeros(3, dtype=torch.float64)), "mean must be a .C,."),
    ("batch_norm_leaky_relu_backward", _backward(invstd=torch.ones(2)), "invstd must be a .C,."),
    ("batch_norm_leaky_relu_backward_", _backward(grad_output=torch.randn(4, 2, 2, 3).transpose(1, 3)),
     "grad_output must have the strides of the saved tensor"),
]


@pytest.mark.parametrize("backend", ["cpp", "triton"])
@pytest.mark.parametrize("name,arguments,message", BAD_DIRECT_CALLS, ids=[case[2] for case in BAD_DIRECT_CALLS])
def test_direct_calls_with_bad_arguments_name_the_argument(backend, name, arguments, message):
    """The C++ entry checks before the backend choice hands a call to Triton, so every
    backend gives the same error."""
    with imggen_fast.set_backend(backend), pytest.raises(RuntimeError, match=f"{name.rstrip('_')}.*: .*{message}"):
        kernel_op(name)(*arguments)


@requires_cuda
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_cuda_matches_eager(backend):
    with imggen_fast.set_backend(backend):
        for shape, memory_format in CPP_SHAPES:
            for slope in SLOPES:
                inputs = make_inputs(shape, memory_format=memory_format)
                inputs = {name: value.cuda() if isinstance(value, torch.Tensor) else value
                          for name, value in inputs.items()}
                assert_as_accurate_as_eager(inputs, True, slope)
                assert_as_accurate_as_eager(inputs, False, slope)


def test_benchmark_cases_run_check_and_time_interleaved():
    """The benchmark cases at the smallest size run (torch.compile's aside: it compiles for
    tens of seconds), imggen_fast's check passes, and the harness times the providers
    of one comparison interleaved."""
    cases = [case for case in bench.CASES if case.size == "64x512x4x4" and case.provider != bench.COMPILE]
    assert {case.direction for case in cases} == {"forward", "backward", "both"}
    assert {case.op for case in cases} == {"batch_norm_leaky_relu", "batch_norm_relu"}
    for case in cases:
        case.make()()
        assert case.bytes_moved > 0
        if case.provider == bench.IMGGEN_FAST and case.direction == "both":
            assert case.check().passed, case.id
    both = {case.provider: case.make() for case in cases if case.op == "batch_norm_relu" and case.direction == "both"}
    times = timing.time_calls(both, rounds=3)
    assert set(times) == {bench.EAGER, bench.IMGGEN_FAST, bench.FLOOR_COPY}
    assert all(len(seconds) == 3 and min(seconds) > 0 for seconds in times.values())
