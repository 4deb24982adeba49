"""The fused layers ConvTranspose2d / Conv2d / Linear (+ bias) + LeakyReLU against eager
PyTorch: outputs and every gradient, layouts, double backward, opcheck, gradcheck,
torch.compile, the Triton kernels in the interpreter, bad input, and what is kept for
backward."""

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from helpers import channels_last, kernel_op, requires_cuda, run_python
from torch import nn

import imggen_fast
from imggen_fast import functional
from imggen_fast import nn as fused_nn
from imggen_fast.bench.common import saved_bytes
from imggen_fast.ops import layer_leaky_relu as layer_ops

# (rtol, atol) per dtype for outputs and gradients: the gradients sum many products,
# in a different order than eager's (bias gradient), so fp32 gets more than rounding.
TOLERANCES = {torch.float32: (1e-4, 1e-4), torch.float64: (1e-10, 1e-10), torch.bfloat16: (3e-2, 3e-2),
              torch.float16: (5e-3, 5e-3)}

# (batch, in_channels, height, width, out_channels, kernel, stride, padding, output_padding)
CONV_TRANSPOSE_SHAPES = [
    (2, 64, 4, 4, 64, 3, 1, 1, 0),      # the generator's first stage, narrowed
    (2, 64, 4, 4, 32, 4, 2, 1, 0),      # the generator's stride-2 stages, narrowed
    (2, 32, 8, 8, 3, 4, 2, 1, 0),       # the generator's last stage
    (3, 7, 3, 5, 5, 3, 1, 0, 0),        # odd sizes
    (2, 7, 3, 5, 4, 4, 2, 1, 1),        # output_padding 1
    (1, 3, 5, 3, 7, 2, 2, 0, 0),
]
CONV_SHAPES = [
    (2, 3, 16, 16, 16, 4, 2, 1),        # the conv discriminator's stages, narrowed
    (2, 16, 8, 8, 32, 4, 2, 1),
    (2, 32, 4, 4, 1, 4, 1, 0),          # its last layer: one logit
    (3, 7, 5, 3, 5, 3, 1, 1),           # odd sizes
    (2, 7, 9, 5, 4, 4, 2, 0),
]
LINEAR_SHAPES = [((64, 100), 128), ((16, 1024), 512), ((3, 7), 5), ((2, 3, 7), 5), ((7,), 4)]
SLOPES = [0.0, 0.01, 0.2]


def make(shape, dtype, seed, scale=1.0):
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=generator, dtype=torch.float64) * scale).to(dtype).requires_grad_()


def conv_transpose_case(shape, dtype, with_bias, seed=0):
    batch, cin, height, width, cout, kernel, stride, padding, output_padding = shape
    x = make((batch, cin, height, width), dtype, seed)
    w = make((cin, cout, kernel, kernel), dtype, seed + 1, scale=(cin * kernel * kernel) ** -0.5)
    b = make((cout,), dtype, seed + 2) if with_bias else None
    arguments = dict(stride=stride, padding=padding, output_padding=output_padding)
    fused = lambda x, w, b, slope: functional.conv_transpose2d_leaky_relu(x, w, b, negative_slope=slope,  # noqa: E731
                                                                         **arguments)
    eager = lambda x, w, b, slope: F.leaky_relu(F.conv_transpose2d(x, w, b, **arguments), slope)  # noqa: E731
    return x, w, b, fused, eager


def conv_case(shape, dtype, with_bias, seed=0):
    batch, cin, height, width, cout, kernel, stride, padding = shape
    x = make((batch, cin, height, width), dtype, seed)
    w = make((cout, cin, kernel, kernel), dtype, seed + 1, scale=(cin * kernel * kernel) ** -0.5)
    b = make((cout,), dtype, seed + 2) if with_bias else None
    fused = lambda x, w, b, slope: functional.conv2d_leaky_relu(x, w, b, stride, padding, negative_slope=slope)  # noqa: E731
    eager = lambda x, w, b, slope: F.leaky_relu(F.conv2d(x, w, b, stride, padding), slope)  # noqa: E731
    return x, w, b, fused, eager


def linear_case(shape, dtype, with_bias, seed=0):
    input_shape, out_features = shape
    x = make(input_shape, dtype, seed)
    w = make((out_features, input_shape[-1]), dtype, seed + 1, scale=input_shape[-1] ** -0.5)
    b = make((out_features,), dtype, seed + 2) if with_bias else None
    fused = lambda x, w, b, slope: functional.linear_leaky_relu(x, w, b, negative_slope=slope)  # noqa: E731
    eager = lambda x, w, b, slope: F.leaky_relu(F.linear(x, w, b), slope)  # noqa: E731
    return x, w, b, fused, eager


CASES = ([("conv_transpose2d", conv_transpose_case, shape) for shape in CONV_TRANSPOSE_SHAPES]
         + [("conv2d", conv_case, shape) for shape in CONV_SHAPES]
         + [("linear", linear_case, shape) for shape in LINEAR_SHAPES])


def compare(case, shape, dtype, with_bias, slope, backend="cpp", layout=None):
    """Runs the fused layer and eager on the same inputs and a random grad_output; compares
    the output, its memory format, and the gradients of input, weight and bias."""
    x, w, b, fused, eager = case(shape, dtype, with_bias)
    if layout is not None:
        x = layout(x.detach()).requires_grad_()
    leaves = [t for t in (x, w, b) if t is not None]
    with imggen_fast.set_backend(backend):
        actual = fused(x, w, b, slope)
        grad_output = torch.randn_like(actual, dtype=torch.float64).to(dtype) * 2.5
        actual_grads = torch.autograd.grad(actual, leaves, grad_output)
    expected = eager(x, w, b, slope)
    expected_grads = torch.autograd.grad(expected, leaves, grad_output)
    rtol, atol = TOLERANCES[dtype]
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol)
    assert actual.stride() == expected.stride(), "the memory format must be eager's"
    for name, got, want in zip(("input", "weight", "bias"), actual_grads, expected_grads):
        torch.testing.assert_close(got, want, rtol=rtol, atol=atol * max(1, want.abs().max().item()),
                                   msg=lambda message, name=name: f"grad of {name}: {message}")


@pytest.mark.parametrize("layer,case,shape", CASES, ids=lambda value: str(value) if not callable(value) else "")
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("slope", SLOPES)
def test_cpp_matches_eager_fp32(layer, case, shape, with_bias, slope):
    compare(case, shape, torch.float32, with_bias, slope)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("layer,case,shape", [CASES[1], CASES[4], CASES[6], CASES[9], CASES[11], CASES[14]],
                         ids=lambda value: str(value) if not callable(value) else "")
def test_cpp_matches_eager_other_dtypes(dtype, layer, case, shape):
    compare(case, shape, dtype, True, 0.2)


@pytest.mark.parametrize("layer,case,shape", [CASES[1], CASES[4], CASES[6], CASES[9]],
                         ids=lambda value: str(value) if not callable(value) else "")
@pytest.mark.parametrize("backend", ["cpp", "triton"])
def test_channels_last_in_channels_last_out(layer, case, shape, backend):
    compare(case, shape, torch.float32, True, 0.2, backend=backend, layout=channels_last)


def test_channels_last_output_is_not_copied():
    """The activation is applied in place on the layer's output: no second output buffer."""
    x = channels_last(torch.randn(2, 8, 5, 5))
    w, b = torch.randn(8, 4, 4, 4), torch.randn(4)
    y = functional.conv_transpose2d_leaky_relu(x, w, b, 2, 1, negative_slope=0.2)
    assert y.is_contiguous(memory_format=torch.channels_last)


TRITON_CASES = [("conv_transpose2d", conv_transpose_case, (2, 3, 3, 4, 5, 4, 2, 1, 0)),
                ("conv_transpose2d", conv_transpose_case, (1, 5, 3, 2, 3, 3, 1, 0, 0)),
                ("conv_transpose2d", conv_transpose_case, (1, 4, 2, 3, 3, 4, 2, 1, 1)),
                ("conv2d", conv_case, (2, 3, 6, 5, 4, 4, 2, 1)),
                ("conv2d", conv_case, (1, 5, 5, 7, 3, 3, 1, 0)),
                ("linear", linear_case, ((5, 7), 6)),
                ("linear", linear_case, ((2, 3, 7), 5))]


@pytest.mark.interpreter
@pytest.mark.parametrize("layer,case,shape", TRITON_CASES, ids=lambda value: str(value) if not callable(value) else "")
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "no_bias"])
def test_triton_in_the_interpreter_matches_eager(layer, case, shape, with_bias):
    compare(case, shape, torch.float32, with_bias, 0.2, backend="triton")


@pytest.mark.interpreter
def test_triton_dilation_in_the_interpreter():
    x, w, b = torch.randn(1, 3, 6, 6), torch.randn(4, 3, 3, 3), torch.randn(4)
    with imggen_fast.set_backend("triton"):
        actual = functional.conv2d_leaky_relu(x, w, b, 1, 2, dilation=2, negative_slope=0.1)
        actual_transposed = functional.conv_transpose2d_leaky_relu(x, w.transpose(0, 1).contiguous(), b, 2, 1,
                                                                    dilation=2, negative_slope=0.1)
    torch.testing.assert_close(actual, F.leaky_relu(F.conv2d(x, w, b, 1, 2, 2), 0.1), rtol=1e-5, atol=1e-5)
    expected = F.leaky_relu(F.conv_transpose2d(x, w.transpose(0, 1), b, 2, 1, dilation=2), 0.1)
    torch.testing.assert_close(actual_transposed, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.interpreter
def test_triton_groups_go_to_the_reference_with_a_warning(monkeypatch):
    from imggen_fast import backends

    monkeypatch.setattr(backends, "_warned", set())
    x, w = torch.randn(1, 4, 5, 5), torch.randn(6, 2, 3, 3)
    with imggen_fast.set_backend("triton"), pytest.warns(backends.FallbackWarning, match="groups=2"):
        actual = functional.conv2d_leaky_relu(x, w, None, groups=2, negative_slope=0.2)
    torch.testing.assert_close(actual, F.leaky_relu(F.conv2d(x, w, groups=2), 0.2))


def test_triton_gap_counts_the_input_weight_and_output_sample():
    # Shapes only (meta tensors): the Triton convolutions index a sample and the weight
    # with 32-bit offsets, so any of the three at 2**31 elements goes to the reference.
    small = torch.empty(2, 8, 16, 16, device="meta")
    weight = torch.empty(8, 4, 4, 4, device="meta")
    assert layer_ops.triton_gap(small, 1, weight, 4 * 32 * 32) is None
    assert "2**31" in layer_ops.triton_gap(small, 1, weight, 2**31)
    assert "2**31" in layer_ops.triton_gap(small, 1, torch.empty(2**16, 2**15, 1, 1, device="meta"), 1)
    assert "2**31" in layer_ops.triton_gap(torch.empty(1, 2**11, 2**10, 2**10, device="meta"), 1, weight, 1)
    assert "groups=2" in layer_ops.triton_gap(small, 2, weight, 1)


@pytest.mark.parametrize("fused_type,eager_type,arguments,input_shape", [
    (fused_nn.ConvTranspose2dLeakyReLU, nn.ConvTranspose2d, (8, 5, 4, 2, 1), (2, 8, 5, 3)),
    (fused_nn.Conv2dLeakyReLU, nn.Conv2d, (8, 5, 3, 2, 1), (2, 8, 7, 5)),
    (fused_nn.LinearLeakyReLU, nn.Linear, (8, 5), (3, 8)),
])
# Triton runs in float16: the interpreter's tl.dot returns garbage for bfloat16 operands
# (Triton 3.x; its float16 dot is right), so the Triton kernels' bfloat16 path is checked
# only by the ahead-of-time compile.
@pytest.mark.parametrize("backend,dtype", [("cpp", torch.bfloat16), ("triton", torch.float16)])
def test_autocast_casts_like_eager_layers(fused_type, eager_type, arguments, input_shape, backend, dtype):
    # Under autocast torch's layers run in its dtype from float32 parameters and inputs of
    # any floating dtype; the fused ones must do the same on every backend, and train the
    # float32 parameters.
    torch.manual_seed(0)
    fused = fused_type(*arguments, negative_slope=0.2)
    eager = nn.Sequential(eager_type(*arguments), nn.LeakyReLU(0.2))
    eager[0].load_state_dict(fused.state_dict())
    for input in (make(input_shape, torch.float32, 3), make(input_shape, dtype, 3)):
        with torch.autocast("cpu", dtype=dtype), imggen_fast.set_backend(backend):
            actual, expected = fused(input), eager(input)
        assert actual.dtype == expected.dtype == dtype
        torch.testing.assert_close(actual, expected, rtol=2e-2, atol=2e-2)
        grad = make(actual.shape, dtype, 4)
        with imggen_fast.set_backend(backend):
            actual_grads = torch.autograd.grad(actual, (fused.weight, fused.bias), grad)
        expected_grads = torch.autograd.grad(expected, (eager[0].weight, eager[0].bias), grad)
        for got, want in zip(actual_grads, expected_grads):
            assert got.dtype == want.dtype == torch.float32
            torch.testing.assert_close(got, want, rtol=3e-2, atol=3e-2 * max(1.0, want.abs().max().item()))


def test_groups_and_dilation_on_cpp():
    x, w, b = make((2, 4, 7, 6), torch.float32, 0), make((6, 2, 3, 3), torch.float32, 1), make((6,), torch.float32, 2)
    actual = functional.conv2d_leaky_relu(x, w, b, 1, 2, dilation=2, groups=2, negative_slope=0.2)
    torch.testing.assert_close(actual, F.leaky_relu(F.conv2d(x, w, b, 1, 2, 2, 2), 0.2))
    wt = make((4, 3, 3, 3), torch.float32, 3)
    actual = functional.conv_transpose2d_leaky_relu(x, wt, None, 2, 1, 1, groups=2, dilation=2, negative_slope=0.2)
    torch.testing.assert_close(actual, F.leaky_relu(F.conv_transpose2d(x, wt, None, 2, 1, 1, 2, 2), 0.2))


@pytest.mark.parametrize("backend", ["cpp", "reference"])
@pytest.mark.parametrize("layer", ["conv_transpose2d", "conv2d", "linear"])
def test_gradcheck_and_gradgradcheck_fp64(backend, layer):
    case, shape = {"conv_transpose2d": (conv_transpose_case, (2, 3, 3, 2, 2, 4, 2, 1, 1)),
                   "conv2d": (conv_case, (2, 3, 5, 4, 2, 3, 2, 1)),
                   "linear": (linear_case, ((3, 4), 5))}[layer]
    x, w, b, fused, _ = case(shape, torch.float64, True, seed=3)
    with imggen_fast.set_backend(backend):
        assert torch.autograd.gradcheck(lambda *args: fused(*args, 0.2), (x, w, b))
        assert torch.autograd.gradgradcheck(lambda *args: fused(*args, 0.2), (x, w, b))


def r1_penalty_grads(discriminator, images):
    """Gradients of the parameters for an R1 penalty: ||d D(x) / d x||^2 (double backward)."""
    images = images.detach().requires_grad_()
    (grad_images,) = torch.autograd.grad(discriminator(images).sum(), images, create_graph=True)
    penalty = grad_images.pow(2).sum()
    return torch.autograd.grad(penalty, list(discriminator.parameters()), materialize_grads=True)


def test_r1_penalty_double_backward_matches_eager():
    torch.manual_seed(0)
    eager = nn.Sequential(nn.Conv2d(3, 8, 4, 2, 1), nn.LeakyReLU(0.2), nn.Conv2d(8, 16, 4, 2, 1), nn.LeakyReLU(0.2),
                          nn.Flatten(), nn.Linear(16 * 4 * 4, 8), nn.LeakyReLU(0.2), nn.Linear(8, 1)).double()
    fused = imggen_fast.patch(copy.deepcopy(eager))
    assert isinstance(fused[0], fused_nn.Conv2dLeakyReLU)
    images = torch.randn(3, 3, 16, 16, dtype=torch.float64)
    for got, want in zip(r1_penalty_grads(fused, images), r1_penalty_grads(eager, images)):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)


def test_backward_overwrites_a_gradient_it_owns_and_matches_eager():
    """In a chain, a layer's incoming gradient is a fresh tensor nobody else holds: the
    backward writes the pre-activation gradient into it (no new buffer). A gradient the
    caller keeps is never overwritten."""
    torch.manual_seed(0)
    eager = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.LeakyReLU(0.2), nn.Conv2d(8, 8, 3, padding=1),
                          nn.LeakyReLU(0.2), nn.Flatten(), nn.Linear(8 * 36, 16), nn.LeakyReLU(0.2),
                          nn.Linear(16, 4), nn.LeakyReLU(0.2))
    fused = imggen_fast.patch(copy.deepcopy(eager))
    x = torch.randn(2, 3, 6, 6, requires_grad=True)
    with torch.profiler.profile() as profiler:
        (fused(x) * 1.5).sum().backward()
    names = [event.name for event in profiler.events()]
    assert "imggen_fast::bias_leaky_relu_backward_" in names
    (eager(x.detach().requires_grad_()) * 1.5).sum().backward()
    for got, want in zip(fused.parameters(), eager.parameters()):
        torch.testing.assert_close(got.grad, want.grad, rtol=1e-4, atol=1e-5)
    kept = torch.randn(2, 4)
    copy_of_kept = kept.clone()
    fused[-2](torch.randn(2, 16, requires_grad=True)).backward(kept)
    assert torch.equal(kept, copy_of_kept)


def chain(kind: str) -> nn.Module:
    layers = []
    for index in range(3):
        channels_in = 3 if index == 0 else 8
        if kind == "fused":
            layers.append(fused_nn.Conv2dLeakyReLU(channels_in, 8, 3, padding=1, negative_slope=0.2))
        else:
            layers += [nn.Conv2d(channels_in, 8, 3, padding=1), nn.LeakyReLU(0.2, inplace=kind == "inplace")]
    return nn.Sequential(*layers)


def activation_storages(model: nn.Module, x: torch.Tensor) -> int:
    """Distinct storages autograd keeps for backward, not counting the parameters."""
    parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages = set()

    def pack(tensor):
        storage = tensor.untyped_storage().data_ptr()
        if storage not in parameters:
            storages.add(storage)
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        model(x)
    return len(storages)


def test_a_chain_keeps_one_activation_per_layer():
    x = torch.randn(2, 3, 8, 8, requires_grad=True)
    counts = {kind: activation_storages(chain(kind), x) for kind in ("fused", "eager", "inplace")}
    # fused and in-place: the input and one activation per layer; eager: the input and a
    # pre-activation and an activation per layer (the last layer's activation is not kept).
    assert counts == {"fused": 1 + 3, "inplace": 1 + 3, "eager": 1 + 2 * 3 - 1}, counts
    fused_bytes = saved_bytes(lambda: chain("fused")(x))
    eager_bytes = saved_bytes(lambda: chain("eager")(x))
    assert fused_bytes < eager_bytes


@pytest.mark.parametrize("backend", ["cpp", "triton"])
@pytest.mark.parametrize("layer,case,shape", [TRITON_CASES[0], TRITON_CASES[3], TRITON_CASES[5]],
                         ids=lambda value: str(value) if not callable(value) else "")
def test_opcheck(backend, layer, case, shape):
    x, w, b, _, _ = case(shape, torch.float32, True)
    op = kernel_op(f"{layer}_leaky_relu")
    stride, padding = ([2, 2], [1, 1]) if layer != "linear" else (None, None)
    if layer == "conv_transpose2d":
        samples = [(x, w, b, stride, padding, [0, 0], 1, [1, 1], 0.2), (x.detach(), w, None, stride, padding,
                                                                          [1, 1], 1, [1, 1], 0.0)]
    elif layer == "conv2d":
        samples = [(x, w, b, stride, padding, [1, 1], 1, 0.2), (x.detach(), w.detach(), b, [1, 1], [0, 0], [1, 1],
                                                                 1, 0.01)]
    else:
        samples = [(x, w, b, 0.2), (x.detach(), w, None, 0.0)]
    with imggen_fast.set_backend(backend):
        for sample in samples:
            torch.library.opcheck(op, sample)


@pytest.mark.parametrize("layer,case,shape", [CASES[1], CASES[6], CASES[11]],
                         ids=lambda value: str(value) if not callable(value) else "")
def test_torch_compile_fullgraph_matches_eager(layer, case, shape):
    x, w, b, fused, _ = case(shape, torch.float32, True)

    def step(x, w, b):
        y = fused(x, w, b, 0.2)
        return (y * 1.5).sum()

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True)
    expected = torch.autograd.grad(step(x, w, b), (x, w, b))
    actual = torch.autograd.grad(compiled(x, w, b), (x, w, b))
    for got, want in zip(actual, expected):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@requires_cuda
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_cuda_matches_eager(backend):
    for layer, case, shape in CASES:
        x, w, b, fused, eager = case(shape, torch.float32, True)
        x, w, b = (t.detach().cuda().requires_grad_() for t in (x, w, b))
        with imggen_fast.set_backend(backend):
            torch.testing.assert_close(fused(x, w, b, 0.2), eager(x, w, b, 0.2), rtol=1e-3, atol=1e-3)


def test_onednn_private_ops_have_the_expected_schema():
    """The C++ forward calls torch's private oneDNN fused convolutions by name and falls back
    to ATen's convolution + our epilogue when their schema differs; this notices the change."""
    expected = {
        "_convolution_pointwise": "mkldnn::_convolution_pointwise(Tensor X, Tensor W, Tensor? B, int[] padding, "
                                  "int[] stride, int[] dilation, int groups, str attr, Scalar?[] scalars, "
                                  "str? algorithm) -> Tensor Y",
        "_convolution_transpose_pointwise": "mkldnn::_convolution_transpose_pointwise(Tensor X, Tensor W, Tensor? B, "
                                            "int[] padding, int[] output_padding, int[] stride, int[] dilation, "
                                            "int groups, str attr, Scalar?[] scalars, str? algorithm) -> Tensor Y",
    }
    if not torch.backends.mkldnn.is_available():
        pytest.skip("this torch has no oneDNN: the C++ path uses ATen's convolution + the epilogue")
    for name, schema in expected.items():
        assert str(getattr(torch.ops.mkldnn, name).default._schema) == schema
    source = (imggen_fast._build.csrc_dir() / "layer_leaky_relu.cpp").read_text()
    for schema in expected.values():
        assert schema[: schema.index("(")] in source


FALLBACK_SCRIPT = """
import json, torch, torch.nn.functional as F
from imggen_fast import functional
torch.manual_seed(0)
x, w, b = torch.randn(2, 8, 5, 5), torch.randn(8, 4, 4, 4), torch.randn(4)
y = functional.conv_transpose2d_leaky_relu(x, w, b, 2, 1, negative_slope=0.2)
z = functional.conv2d_leaky_relu(x, w.transpose(0, 1).contiguous(), b, 1, 1, negative_slope=0.2)
print(json.dumps([y.flatten().tolist(), z.flatten().tolist()]))
"""


def test_onednn_fusion_and_the_aten_fallback_agree():
    outputs = []
    for setting in ("1", "0"):
        result = run_python(FALLBACK_SCRIPT, env={"IMGGEN_FAST_ONEDNN_FUSION": setting})
        assert result.returncode == 0, result.stderr[-2000:]
        outputs.append([torch.tensor(values) for values in json.loads(result.stdout.splitlines()[-1])])
    for fused, fallback in zip(*outputs):
        torch.testing.assert_close(fused, fallback, rtol=1e-5, atol=1e-5)


def test_onednn_fusion_setting_is_read_on_every_call(monkeypatch):
    x, w, b = torch.randn(2, 8, 5, 5), torch.randn(4, 8, 3, 3), torch.randn(4)

    def aten_ops_run():
        with torch.autograd.profiler.profile() as profile:
            functional.conv2d_leaky_relu(x, w, b, 1, 1, negative_slope=0.2)
        return {event.name for event in profile.function_events}

    monkeypatch.delenv("IMGGEN_FAST_ONEDNN_FUSION", raising=False)
    fused = aten_ops_run()
    monkeypatch.setenv("IMGGEN_FAST_ONEDNN_FUSION", "0")
    unfused = aten_ops_run()
    if torch.backends.mkldnn.is_available():
        assert "mkldnn::_convolution_pointwise" in fused
    assert "mkldnn::_convolution_pointwise" not in unfused and "imggen_fast::bias_leaky_relu_" in unfused


def test_weights_updated_in_place_are_used():
    """The fused forward must not cache a reordered copy of the weight: training updates it."""
    layer = fused_nn.ConvTranspose2dLeakyReLU(8, 4, 4, 2, 1, negative_slope=0.2)
    x = torch.randn(2, 8, 5, 5)
    first = layer(x)
    with torch.no_grad():
        layer.weight.mul_(-0.5).add_(0.01)
        layer.bias.add_(1.0)
    second = layer(x)
    expected = F.leaky_relu(F.conv_transpose2d(x, layer.weight, layer.bias, 2, 1), 0.2)
    torch.testing.assert_close(second, expected)
    assert not torch.equal(first, second)


def test_modules_are_drop_in(monkeypatch):
    torch.manual_seed(0)
    reference = nn.ConvTranspose2d(6, 4, 4, 2, 1)
    torch.manual_seed(0)
    layer = fused_nn.ConvTranspose2dLeakyReLU(6, 4, 4, 2, 1, negative_slope=0.2)
    assert isinstance(layer, nn.ConvTranspose2d)
    assert layer.state_dict().keys() == reference.state_dict().keys()
    assert all(torch.equal(a, b) for a, b in zip(layer.state_dict().values(), reference.state_dict().values()))
    assert repr(layer) == "ConvTranspose2dLeakyReLU" + repr(reference)[len("ConvTranspose2d"):-1] + \
        ", negative_slope=0.2)"
    x = torch.randn(2, 6, 5, 5)
    torch.testing.assert_close(layer(x, output_size=[11, 11]),
                               F.leaky_relu(reference(x, output_size=[11, 11]), 0.2))
    conv = fused_nn.Conv2dLeakyReLU(6, 3, 3, padding=1, padding_mode="reflect")
    eager_conv = nn.Conv2d(6, 3, 3, padding=1, padding_mode="reflect")
    eager_conv.load_state_dict(conv.state_dict())
    torch.testing.assert_close(conv(x), F.leaky_relu(eager_conv(x), 0.01))
    same = fused_nn.Conv2dLeakyReLU(6, 3, 4, padding="same")
    eager_same = nn.Conv2d(6, 3, 4, padding="same")
    eager_same.load_state_dict(same.state_dict())
    monkeypatch.setattr(imggen_fast.backends, "_warned", set())
    with pytest.warns(imggen_fast.backends.FallbackWarning, match="even kernel"):
        torch.testing.assert_close(same(x), F.leaky_relu(eager_same(x), 0.01))
    linear = fused_nn.LinearLeakyReLU(6, 2, bias=False, negative_slope=0.0)
    assert linear.bias is None and isinstance(linear, nn.Linear)
    torch.testing.assert_close(linear(x.mean((2, 3))), F.relu(F.linear(x.mean((2, 3)), linear.weight)))


def test_unbatched_input():
    x, w, b = torch.randn(3, 5, 5), torch.randn(3, 2, 3, 3), torch.randn(2)
    torch.testing.assert_close(functional.conv_transpose2d_leaky_relu(x, w, b, negative_slope=0.2),
                               F.leaky_relu(F.conv_transpose2d(x, w, b), 0.2))
    torch.testing.assert_close(functional.conv2d_leaky_relu(x, w.transpose(0, 1), b, negative_slope=0.2),
                               F.leaky_relu(F.conv2d(x, w.transpose(0, 1), b), 0.2))


def test_empty_batch():
    x, w, b = torch.randn(0, 3, 5, 5, requires_grad=True), torch.randn(3, 2, 3, 3, requires_grad=True), torch.randn(2)
    y = functional.conv_transpose2d_leaky_relu(x, w, b, negative_slope=0.2)
    assert y.shape == (0, 2, 7, 7)
    y.sum().backward()
    assert x.grad.shape == x.shape and torch.count_nonzero(w.grad) == 0
    assert functional.linear_leaky_relu(torch.randn(0, 4), torch.randn(3, 4)).shape == (0, 3)


def bad(function, **overrides):
    arguments = {"conv_transpose2d": dict(input=torch.randn(2, 3, 5, 5), weight=torch.randn(3, 4, 3, 3),
                                          bias=torch.randn(4)),
                 "conv2d": dict(input=torch.randn(2, 3, 5, 5), weight=torch.randn(4, 3, 3, 3), bias=torch.randn(4)),
                 "linear": dict(input=torch.randn(2, 3), weight=torch.randn(4, 3), bias=torch.randn(4))}[function]
    arguments.update(overrides)
    return getattr(functional, f"{function}_leaky_relu"), arguments


BAD_INPUTS = [
    (bad("conv_transpose2d", weight=torch.randn(5, 4, 3, 3)), ValueError, r"weight must have shape \(C_in=3"),
    (bad("conv_transpose2d", weight=torch.randn(3, 4, 3)), ValueError, "weight must be 4-D"),
    (bad("conv_transpose2d", input=torch.randn(5, 5)), ValueError, "input must be 4-D"),
    (bad("conv_transpose2d", input=torch.randn(2, 3, 5, 5).double()), TypeError, "weight has dtype"),
    (bad("conv_transpose2d", input=torch.ones(2, 3, 5, 5, dtype=torch.int64)), TypeError, "input must be a floating"),
    (bad("conv_transpose2d", negative_slope=-0.2), ValueError, "negative_slope must be finite and >= 0"),
    (bad("conv_transpose2d", bias=torch.randn(3)), ValueError, r"bias must have shape \(4,\)"),
    (bad("conv_transpose2d", stride=0), ValueError, "stride must be >= 1"),
    (bad("conv_transpose2d", output_padding=1), ValueError, "output_padding must be smaller than stride"),
    (bad("conv_transpose2d", padding=(1, 2, 3)), TypeError, "padding must be an int or a pair"),
    (bad("conv_transpose2d", groups=2), ValueError, "groups=2 must divide"),
    (bad("conv2d", weight=torch.randn(4, 2, 3, 3)), ValueError, r"weight must have shape \(C_out, C_in / groups"),
    (bad("conv2d", input=torch.randn(2, 3, 2, 2)), ValueError, "gives an output of 0 x 0"),
    (bad("conv2d", padding="full"), TypeError, "padding must be an int or a pair"),
    (bad("conv2d", padding="same", stride=2), ValueError, "padding='same' needs stride 1"),
    (bad("conv2d", bias=torch.randn(4, device="meta")), ValueError, "bias is on meta"),
    (bad("conv2d", negative_slope=float("nan")), ValueError, "negative_slope"),
    (bad("linear", weight=torch.randn(4, 5)), ValueError, "input's last dim must be in_features=5"),
    (bad("linear", weight=torch.randn(4)), ValueError, "weight must be 2-D"),
    (bad("linear", bias=torch.randn(4).bfloat16()), TypeError, "bias has dtype"),
]


@pytest.mark.parametrize("call,error,message", BAD_INPUTS)
def test_bad_input_names_the_argument(call, error, message):
    function, arguments = call
    with pytest.raises(error, match=message):
        function(**arguments)


def test_module_rejects_a_negative_slope():
    with pytest.raises(ValueError, match="ConvTranspose2dLeakyReLU: negative_slope must be finite and >= 0"):
        fused_nn.ConvTranspose2dLeakyReLU(3, 4, 3, negative_slope=-1.0)


def test_meta_tensors_give_the_output_shape_through_the_reference(monkeypatch):
    # No kernel runs on meta tensors (and autocast has no meta device): the reference
    # gives the shape, with a warning, instead of an error from the argument checks.
    from imggen_fast import backends

    monkeypatch.setattr(backends, "_warned", set())
    x, w = torch.empty(2, 3, 5, 5, device="meta"), torch.empty(4, 3, 3, 3, device="meta")
    with pytest.warns(UserWarning, match="meta"):
        y = functional.conv2d_leaky_relu(x, w, stride=2, padding=1)
    assert y.shape == (2, 4, 3, 3) and y.device.type == "meta"
