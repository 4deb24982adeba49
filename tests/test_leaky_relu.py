"""The LeakyReLU epilogue op ``leaky_relu_backward_from_output`` on every backend
against the eager reference."""

import math

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_close, channels_last, kernel_op, requires_cuda

import imggen_fast
from imggen_fast import backends, functional, reference

SHAPES = [(1,), (3, 7), (2, 5, 3, 7), (64, 33), (4097,), (0, 4)]
SLOPES = [0.0, 0.01, 0.2]
# (backend, dtype): the C++ kernel in every CPU dtype; Triton in its interpreter, fp32.
BACKEND_DTYPES = [("cpp", torch.float32), ("cpp", torch.float64), ("cpp", torch.bfloat16),
                  ("triton", torch.float32)]


def make_pair(shape, dtype, slope, seed=0):
    """(grad_output, output): output is a real LeakyReLU output, with exact zeros mixed in."""
    generator = torch.Generator().manual_seed(seed)
    pre = torch.randn(shape, generator=generator, dtype=torch.float64)
    pre[(torch.rand(shape, generator=generator) < 0.1)] = 0.0
    output = F.leaky_relu(pre, slope).to(dtype)
    grad_output = (torch.randn(shape, generator=generator, dtype=torch.float64) * 3).to(dtype)
    return grad_output, output


@pytest.mark.parametrize("backend,dtype", BACKEND_DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("slope", SLOPES)
def test_matches_reference(backend, dtype, shape, slope):
    grad_output, output = make_pair(shape, dtype, slope)
    with imggen_fast.set_backend(backend):
        result = functional.leaky_relu_backward_from_output(grad_output, output, slope)
    expected = reference.leaky_relu_backward_from_output(grad_output.double(), output.double(), slope)
    assert result.dtype == dtype and result.shape == output.shape
    assert_close(result, expected.to(dtype), dtype)


def test_matches_torch_leaky_relu_backward():
    """The mask read from the output equals autograd's mask read from the input."""
    pre = torch.randn(6, 9, dtype=torch.float64, requires_grad=True)
    grad_output = torch.randn(6, 9, dtype=torch.float64)
    output = F.leaky_relu(pre, 0.2)
    (expected,) = torch.autograd.grad(output, pre, grad_output)
    result = functional.leaky_relu_backward_from_output(grad_output, output.detach(), 0.2)
    torch.testing.assert_close(result, expected, rtol=0, atol=0)


@pytest.mark.parametrize("backend", ["cpp", "triton"])
def test_channels_last_in_channels_last_out(backend):
    grad_output, output = (channels_last(t) for t in make_pair((2, 7, 3, 5), torch.float32, 0.2))
    with imggen_fast.set_backend(backend):
        result = functional.leaky_relu_backward_from_output(grad_output, output, 0.2)
    assert result.is_contiguous(memory_format=torch.channels_last)
    assert_close(result, reference.leaky_relu_backward_from_output(grad_output, output, 0.2))


@pytest.mark.parametrize("backend", ["cpp", "triton"])
def test_mixed_layouts_and_strided_views(backend):
    grad_output, output = make_pair((4, 6, 5, 8), torch.float32, 0.01)
    cases = [
        (grad_output, channels_last(output)),            # layouts differ
        (grad_output[:, ::2], output[:, ::2]),           # gapped views
        (grad_output.transpose(2, 3), output.transpose(2, 3)),
        (grad_output[..., 0].expand(4, 6, 5), output[..., 1].expand(4, 6, 5)),
    ]
    with imggen_fast.set_backend(backend):
        for grad_case, output_case in cases:
            result = functional.leaky_relu_backward_from_output(grad_case, output_case, 0.01)
            assert_close(result, reference.leaky_relu_backward_from_output(grad_case, output_case, 0.01))


def test_auto_uses_cpp_on_cpu():
    with imggen_fast.set_backend("auto"):
        assert backends.choose("cpu") == "cpp"


@pytest.mark.parametrize("backend", ["cpp", "triton", "reference"])
def test_gradcheck_and_double_backward(backend):
    grad_output, output = make_pair((3, 5), torch.float64, 0.2)
    grad_output.requires_grad_(True)
    with imggen_fast.set_backend(backend):
        assert torch.autograd.gradcheck(
            lambda g: functional.leaky_relu_backward_from_output(g, output, 0.2), (grad_output,))
        assert torch.autograd.gradgradcheck(
            lambda g: functional.leaky_relu_backward_from_output(g, output, 0.2), (grad_output,))


@pytest.mark.parametrize("backend", ["cpp", "triton"])
def test_gradient_with_respect_to_output_is_zero(backend):
    """The mask is piecewise constant in output: its gradient there is zero."""
    grad_output, output = make_pair((3, 5), torch.float64 if backend == "cpp" else torch.float32, 0.2)
    output.requires_grad_(True)
    with imggen_fast.set_backend(backend):
        result = functional.leaky_relu_backward_from_output(grad_output, output, 0.2)
    (grad,) = torch.autograd.grad((result * 3).sum(), output, materialize_grads=True)
    assert torch.count_nonzero(grad) == 0


def check_op(backend, device, shape):
    grad_output, output = (t.to(device) for t in make_pair(shape, torch.float32, 0.2))
    op = kernel_op("leaky_relu_backward_from_output")
    with imggen_fast.set_backend(backend):
        for sample in [(grad_output, output, 0.2), (grad_output.requires_grad_(), output, 0.0)]:
            torch.library.opcheck(op, sample)


@pytest.mark.parametrize("backend", ["cpp", "triton"])
@pytest.mark.parametrize("shape", [(3, 7), (2, 3, 4, 5)], ids=str)
def test_opcheck(backend, shape):
    check_op(backend, torch.device("cpu"), shape)


@requires_cuda
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_opcheck_cuda(backend):
    check_op(backend, torch.device("cuda"), (2, 3, 4, 5))


def test_torch_compile_fullgraph_matches_eager():
    grad_output, output = make_pair((8, 33), torch.float32, 0.2)

    def step(g, y):
        return functional.leaky_relu_backward_from_output(g * 2, y, 0.2) + 1

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend="inductor")
    torch.testing.assert_close(compiled(grad_output, output), step(grad_output, output), rtol=0, atol=0)


BAD_INPUTS = [
    (lambda g, y: ([1.0], y, 0.2), TypeError, "grad_output must be a torch.Tensor"),
    (lambda g, y: (g, y.int(), 0.2), TypeError, "output must be a floating-point"),
    (lambda g, y: (g.double(), y, 0.2), TypeError, "grad_output has dtype"),
    (lambda g, y: (g[:2], y, 0.2), ValueError, "grad_output has shape"),
    (lambda g, y: (g, y, -0.1), ValueError, "negative_slope must be finite and >= 0"),
    (lambda g, y: (g, y, float("nan")), ValueError, "negative_slope"),
    (lambda g, y: (g, y, "0.2"), TypeError, "negative_slope must be a number"),
]


@pytest.mark.parametrize("make_arguments,error,message", BAD_INPUTS)
def test_bad_input_names_the_argument(make_arguments, error, message):
    grad_output, output = make_pair((3, 4), torch.float32, 0.2)
    with pytest.raises(error, match=message):
        functional.leaky_relu_backward_from_output(*make_arguments(grad_output, output))


# (shape, channel_dim): NCHW planes, a Linear's rows, odd sizes, planes larger than one
# reduction block (16384 elements), rows wider than a vector.
BIAS_CASES = [((2, 5, 3, 7), 1), ((64, 33), -1), ((3, 4, 7), 1), ((1, 3, 130, 130), 1), ((300, 1000), 1),
              ((2, 0, 3, 3), 1), ((0, 4), -1)]


def make_bias_case(shape, channel_dim, dtype, slope, seed=0):
    grad_output, output = make_pair(shape, dtype, slope, seed)
    bias = torch.randn(shape[channel_dim], generator=torch.Generator().manual_seed(seed + 1)).to(dtype)
    return grad_output, output, bias


# Triton runs in the interpreter here: only the small shapes (the same code paths).
BIAS_BACKWARD_CASES = [(backend, dtype, shape, channel_dim) for backend, dtype in BACKEND_DTYPES
                       for shape, channel_dim in BIAS_CASES if backend == "cpp" or math.prod(shape) < 50_000]


@pytest.mark.parametrize("backend,dtype,shape,channel_dim", BIAS_BACKWARD_CASES, ids=str)
def test_bias_backward_matches_reference(backend, dtype, shape, channel_dim):
    grad_output, output, _ = make_bias_case(shape, channel_dim, dtype, 0.2)
    with imggen_fast.set_backend(backend):
        grad_input, grad_bias = kernel_op("bias_leaky_relu_backward")(grad_output, output, 0.2, channel_dim)
    expected_input, expected_bias = reference.bias_leaky_relu_backward(grad_output.double(), output.double(), 0.2,
                                                                       channel_dim)
    assert_close(grad_input, expected_input.to(dtype), dtype)
    assert grad_bias.dtype == dtype and grad_bias.shape == (shape[channel_dim],)
    assert_close(grad_bias, expected_bias.to(dtype), dtype, scale=max(1.0, math.prod(shape) / 1000))


@pytest.mark.parametrize("backend", ["cpp", "triton"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_bias_forward_in_place_matches_reference(backend, layout):
    _, output, bias = make_bias_case((2, 6, 5, 3), 1, torch.float32, 0.2)
    pre = output.clone()
    if layout == "channels_last":
        pre = channels_last(pre)
    expected = pre.clone()
    reference.bias_leaky_relu_(expected, bias, 0.2, 1)
    actual = pre.clone(memory_format=torch.preserve_format)
    with imggen_fast.set_backend(backend):
        kernel_op("bias_leaky_relu_")(actual, bias, 0.2, 1)
        kernel_op("bias_leaky_relu_")(without_bias := pre.clone(memory_format=torch.preserve_format), None, 0.2, 1)
    assert actual.stride() == pre.stride()
    assert_close(actual, expected)
    assert_close(without_bias, F.leaky_relu(pre, 0.2))


@pytest.mark.parametrize("backend", ["cpp", "triton"])
def test_bias_backward_channels_last(backend):
    grad_output, output, _ = make_bias_case((2, 6, 5, 3), 1, torch.float32, 0.2)
    output = channels_last(output)
    with imggen_fast.set_backend(backend):
        grad_input, grad_bias = kernel_op("bias_leaky_relu_backward")(grad_output, output, 0.2, 1)
    expected_input, expected_bias = reference.bias_leaky_relu_backward(grad_output, output, 0.2, 1)
    assert grad_input.is_contiguous(memory_format=torch.channels_last)
    assert_close(grad_input, expected_input)
    assert_close(grad_bias, expected_bias, scale=10)


@pytest.mark.parametrize("shape,channel_dim", [((8, 16, 40, 40), 1), ((5000, 48), 1)], ids=str)
def test_bias_gradient_bits_do_not_depend_on_threads(shape, channel_dim):
    grad_output, output, _ = make_bias_case(shape, channel_dim, torch.float32, 0.2)
    threads = torch.get_num_threads()
    results = []
    try:
        for count in (1, 2, threads):
            torch.set_num_threads(count)
            results.append(kernel_op("bias_leaky_relu_backward")(grad_output, output, 0.2, channel_dim))
    finally:
        torch.set_num_threads(threads)
    for grad_input, grad_bias in results[1:]:
        assert torch.equal(grad_input, results[0][0]) and torch.equal(grad_bias, results[0][1])


@pytest.mark.interpreter
def test_bias_backward_gradcheck_and_double_backward():
    grad_output, output, _ = make_bias_case((3, 4, 2, 3), 1, torch.float64, 0.2)
    grad_output.requires_grad_(True)

    def both(grad):
        grad_input, grad_bias = kernel_op("bias_leaky_relu_backward")(grad, output, 0.2, 1)
        return grad_input, grad_bias

    for backend in ("cpp", "triton"):
        with imggen_fast.set_backend(backend):
            assert torch.autograd.gradcheck(both, (grad_output,))
            assert torch.autograd.gradgradcheck(both, (grad_output,))


@pytest.mark.parametrize("backend", ["cpp", "triton"])
def test_bias_ops_opcheck(backend):
    grad_output, output, bias = make_bias_case((2, 3, 4, 5), 1, torch.float32, 0.2)
    backward, forward = kernel_op("bias_leaky_relu_backward"), kernel_op("bias_leaky_relu_")
    with imggen_fast.set_backend(backend):
        for sample in [(grad_output, output, 0.2, 1), (grad_output.requires_grad_(), channels_last(output), 0.0, 1),
                       (grad_output.reshape(-1, 5), output.reshape(-1, 5), 0.01, -1)]:
            torch.library.opcheck(backward, sample)
        for sample in [(output.clone(), bias, 0.2, 1), (output.clone(), None, 0.0, 1)]:
            torch.library.opcheck(forward, sample)


def test_in_place_bias_backward_matches_and_checks_its_operand():
    grad_output, output, _ = make_bias_case((2, 6, 5, 3), 1, torch.float32, 0.2)
    op = torch.ops.imggen_fast.bias_leaky_relu_backward_.default
    expected_input, expected_bias = reference.bias_leaky_relu_backward(grad_output, output, 0.2, 1)
    for layout in (lambda t: t, channels_last):
        grad = layout(grad_output.clone())
        grad_bias = op(grad, layout(output), 0.2, 1)
        assert_close(grad, expected_input)
        assert_close(grad_bias, expected_bias, scale=10)
        torch.library.opcheck(op, (layout(grad_output.clone()), layout(output), 0.2, 1))
    with pytest.raises(RuntimeError, match="same contiguous or channels_last strides"):
        op(grad_output.clone(), channels_last(output), 0.2, 1)
