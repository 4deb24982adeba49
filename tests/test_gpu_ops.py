"""Every op and every gradient on a CUDA GPU, for the ``cuda`` (CUDA C++ kernels, cuDNN /
cuBLAS through ATen) and ``triton`` (compiled Triton kernels, no interpreter) backends,
in fp32, fp16 and bf16, contiguous and channels_last, against the eager formulas run in
fp64 on the CPU. Marked ``cuda``: skipped with a reason without a GPU, run by
``pytest -m cuda`` and ``imggen-fast check-gpu``.

Tolerances compare the error with the size of the result (``max |got - want| <= tolerance
* max(|want|, floor)``):

* elementwise ops round once from an fp32 accumulation: the unit roundoff of the dtype;
* reductions (bias gradient, losses, KL) sum many terms in fp32: a few fp32 roundoffs per
  term, scaled by the magnitude;
* the layers on the ``cuda`` backend run cuDNN, which uses TF32 for fp32 convolutions by
  default from Ampere on (``torch.backends.cudnn.allow_tf32``): TF32 keeps 10 mantissa
  bits, so each input is rounded by up to 2**-11 and each product by about 2**-10, hence
  the 5e-3 stated below for fp32 convolutions (1e-5 where TF32 is off: cuBLAS matmuls by
  default, and the Triton convolution, whose dot products are IEEE fp32)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import kernel_op

import imggen_fast
from imggen_fast import functional, reference

pytestmark = pytest.mark.cuda

BACKENDS = ("cuda", "triton")
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Relative to the result's magnitude: one rounding to the dtype (with slack for the
# fp32 accumulation ahead of it).
ELEMENTWISE = {torch.float32: 2e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}
# Sums of many terms accumulated in fp32, then rounded to the dtype once.
REDUCED = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
# The layers: products of rounded inputs, summed (see the module docstring for TF32).
TF32 = 5e-3
LAYER = {torch.float16: 1e-2, torch.bfloat16: 5e-2}
SLOPE = 0.2
DEVICE = "cuda"


def assert_near(actual: torch.Tensor, expected: torch.Tensor, tolerance: float, what: str) -> None:
    """max |actual - expected| <= tolerance * max(max |expected|, 1), computed in fp64 on
    the CPU; also the shape and the layout (channels_last stays channels_last)."""
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    error = (actual.detach().double().cpu() - expected.detach().double().cpu()).abs().max().item() \
        if actual.numel() else 0.0
    scale = max(expected.detach().double().abs().max().item() if expected.numel() else 0.0, 1.0)
    assert error <= tolerance * scale, f"{what}: max error {error:.3g} > {tolerance:.3g} * {scale:.3g}"


def on_gpu(tensor: torch.Tensor, dtype: torch.dtype, channels_last: bool = False) -> torch.Tensor:
    """``tensor`` rounded to ``dtype`` on the GPU (channels_last if asked and 4-D)."""
    result = tensor.to(device=DEVICE, dtype=dtype)
    if channels_last and result.dim() == 4:
        result = result.contiguous(memory_format=torch.channels_last)
    return result


def exact(tensor: torch.Tensor) -> torch.Tensor:
    """The fp64 CPU copy of a GPU input, for the reference (the same rounded values)."""
    return tensor.detach().double().cpu()


def random(*shape: int, seed: int = 0, scale: float = 1.0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * scale


# ----------------------------------------------------------------------------- epilogue

# (shape, channel dim, channels_last): NCHW with inner > 1 and more than one reduction chunk
# per channel; channels_last (inner = 1) with many channels, and with many rows (several
# row chunks of the 2-D tile reduction, a partial channel tile); Linear's (batch, features).
EPILOGUE_CASES = [((4, 16, 48, 48), 1, False), ((2, 300, 5, 7), 1, True), ((4, 40, 24, 24), 1, True),
                  ((3, 5, 7, 9), 1, True), ((33, 1000), -1, False), ((1, 3, 1, 1), 1, False)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,channel_dim,channels_last", EPILOGUE_CASES, ids=str)
def test_epilogue_ops_match_the_reference(backend, dtype, shape, channel_dim, channels_last):
    output = on_gpu(random(*shape, seed=1), dtype, channels_last)
    grad_output = on_gpu(random(*shape, seed=2), dtype, channels_last)
    bias = on_gpu(random(shape[channel_dim], seed=3), dtype)
    with imggen_fast.set_backend(backend):
        masked = kernel_op("leaky_relu_backward_from_output")(grad_output, output, SLOPE)
        activated = output.clone()
        kernel_op("bias_leaky_relu_")(activated, bias, SLOPE, channel_dim)
        grad_input, grad_bias = kernel_op("bias_leaky_relu_backward")(grad_output, output, SLOPE, channel_dim)
        in_place = grad_output.clone()
        grad_bias_in_place = kernel_op("bias_leaky_relu_backward_")(in_place, output, SLOPE, channel_dim)
        again = kernel_op("bias_leaky_relu_backward")(grad_output, output, SLOPE, channel_dim)[1]
    expected_masked = reference.leaky_relu_backward_from_output(exact(grad_output), exact(output), SLOPE)
    expected_activated = exact(output).clone()
    reference.bias_leaky_relu_(expected_activated, exact(bias), SLOPE, channel_dim)
    expected_input, expected_bias = reference.bias_leaky_relu_backward(exact(grad_output), exact(output), SLOPE,
                                                                       channel_dim)
    assert_near(masked, expected_masked, ELEMENTWISE[dtype], "leaky_relu_backward_from_output")
    assert_near(activated, expected_activated, ELEMENTWISE[dtype], "bias_leaky_relu_")
    assert_near(grad_input, expected_input, ELEMENTWISE[dtype], "bias_leaky_relu_backward grad_input")
    assert_near(in_place, expected_input, ELEMENTWISE[dtype], "bias_leaky_relu_backward_ grad_input")
    # The bias gradient sums outer * inner terms: compared with their magnitude.
    terms = expected_input.abs().sum(dim=[d for d in range(len(shape)) if d != channel_dim % len(shape)])
    for name, got in (("bias_leaky_relu_backward", grad_bias), ("bias_leaky_relu_backward_", grad_bias_in_place)):
        error = (got.double().cpu() - expected_bias).abs()
        assert (error <= REDUCED[dtype] * (terms + 1)).all(), f"{name} grad_bias: max error {error.max():.3g}"
    assert torch.equal(again, grad_bias), "the bias gradient must have the same bits every run (no atomics)"
    if channels_last:
        assert masked.is_contiguous(memory_format=torch.channels_last)
        assert grad_input.is_contiguous(memory_format=torch.channels_last)


# ----------------------------------------------------------------------------- layers


def layer_cases():
    """(name, fused call, the eager layer without its activation (fp64), input shape, weight
    shape, convolution)."""
    return [
        ("conv2d", lambda x, w, b: functional.conv2d_leaky_relu(x, w, b, 2, 1, negative_slope=SLOPE),
         lambda x, w, b: F.conv2d(x, w, b, 2, 1), (8, 16, 32, 32), (32, 16, 4, 4), True),
        ("conv_transpose2d",
         lambda x, w, b: functional.conv_transpose2d_leaky_relu(x, w, b, 2, 1, negative_slope=SLOPE),
         lambda x, w, b: F.conv_transpose2d(x, w, b, 2, 1), (8, 32, 8, 8), (32, 16, 4, 4), True),
        ("conv_transpose2d stride 1",
         lambda x, w, b: functional.conv_transpose2d_leaky_relu(x, w, b, 1, 1, negative_slope=SLOPE),
         lambda x, w, b: F.conv_transpose2d(x, w, b, 1, 1), (4, 24, 4, 4), (24, 24, 3, 3), True),
        ("linear", lambda x, w, b: functional.linear_leaky_relu(x, w, b, negative_slope=SLOPE),
         lambda x, w, b: F.linear(x, w, b), (64, 100), (128, 100), False),
    ]


def layer_tolerance(dtype: torch.dtype, convolution_by_cudnn: bool, convolution: bool) -> float:
    """The tolerance of a layer's result: TF32's where cuDNN computed an fp32 convolution
    (or cuBLAS an fp32 matmul) with TF32 allowed, fp32's otherwise."""
    if dtype != torch.float32:
        return LAYER[dtype]
    tf32 = (convolution and convolution_by_cudnn and torch.backends.cudnn.allow_tf32) or (
        not convolution and torch.backends.cuda.matmul.allow_tf32)
    return TF32 if tf32 else 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("channels_last", [False, True], ids=["contiguous", "channels_last"])
@pytest.mark.parametrize("case", layer_cases(), ids=lambda case: case[0])
def test_layers_and_every_gradient_match_fp64(backend, dtype, channels_last, case):
    name, fused, eager_layer, input_shape, weight_shape, convolution = case
    if channels_last and not convolution:
        pytest.skip("channels_last is a 4-D layout; Linear takes 2-D input")
    x = on_gpu(random(*input_shape, seed=4), dtype, channels_last).requires_grad_()
    w = on_gpu(random(*weight_shape, seed=5, scale=0.1), dtype, channels_last).requires_grad_()
    b = on_gpu(random(weight_shape[1] if "transpose" in name else weight_shape[0], seed=6), dtype).requires_grad_()
    with imggen_fast.set_backend(backend):
        y = fused(x, w, b)
        grad_y = torch.randn_like(y)
        grads = torch.autograd.grad(y, (x, w, b), grad_y)
    x64, w64, b64 = (exact(t).requires_grad_() for t in (x, w, b))
    pre64 = eager_layer(x64, w64, b64)
    y64 = F.leaky_relu(pre64, SLOPE)
    # The gradient's mask is a step: an output within rounding of 0 may take either side,
    # which moves its gradient by (1 - slope) * grad_y. The reference takes the mask of the
    # output under test (what the fused backward does, by design), the rest in fp64.
    grad_pre64 = exact(grad_y) * torch.where(exact(y) > 0, 1.0, SLOPE)
    grads64 = torch.autograd.grad(pre64, (x64, w64, b64), grad_pre64)
    # The forward convolution is cuDNN's on the cuda backend, Triton's (IEEE fp32) on the
    # triton one; the input and weight gradients are cuDNN's on both.
    assert_near(y, y64, layer_tolerance(dtype, backend == "cuda", convolution), f"{name} output")
    for label, got, want in zip(("grad_input", "grad_weight", "grad_bias"), grads, grads64):
        assert_near(got, want, layer_tolerance(dtype, True, convolution), f"{name} {label}")
    if channels_last:
        assert y.is_contiguous(memory_format=torch.channels_last), "channels_last in, channels_last out"


@pytest.mark.parametrize("backend", BACKENDS)
def test_layers_compile_fullgraph_on_the_gpu(backend):
    """torch.compile(fullgraph=True) of a fused layer on CUDA tensors equals eager (on the
    CPU the Triton path cannot be compiled: the interpreter needs real data)."""
    x = on_gpu(random(4, 8, 16, 16, seed=7), torch.float32).requires_grad_()
    w = on_gpu(random(16, 8, 3, 3, seed=8, scale=0.1), torch.float32).requires_grad_()
    b = on_gpu(random(16, seed=9), torch.float32).requires_grad_()

    def step(x, w, b):
        return functional.conv2d_leaky_relu(x, w, b, 1, 1, negative_slope=SLOPE).square().sum()

    with imggen_fast.set_backend(backend):
        expected = torch.autograd.grad(step(x, w, b), (x, w, b))
        torch._dynamo.reset()
        actual = torch.autograd.grad(torch.compile(step, fullgraph=True)(x, w, b), (x, w, b))
    for got, want in zip(actual, expected):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------- losses


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("variant", ["tensor target", "number target", "weights", "channels_last"])
def test_bce_with_logits_and_its_gradient_match_fp64(backend, dtype, reduction, variant):
    shape = (16, 3, 30, 30)
    logits = on_gpu(random(*shape, seed=10, scale=3.0), dtype, variant == "channels_last").requires_grad_()
    target = on_gpu(random(*shape, seed=11).sigmoid(), dtype, variant == "channels_last")
    weight = on_gpu(random(3, 1, 1, seed=12).abs(), dtype) if variant == "weights" else None
    pos_weight = on_gpu(random(3, 1, 1, seed=13).abs() + 0.5, dtype) if variant == "weights" else None
    target_argument = 0.9 if variant == "number target" else target
    with imggen_fast.set_backend(backend):
        loss = functional.bce_with_logits(logits, target_argument, weight, reduction, pos_weight)
        grad_loss = torch.randn_like(loss) if reduction == "none" else torch.tensor(0.7, device=DEVICE, dtype=dtype)
        (grad,) = torch.autograd.grad(loss, logits, grad_loss)
    logits64 = exact(logits).requires_grad_()
    target64 = 0.9 if variant == "number target" else exact(target)
    loss64 = F.binary_cross_entropy_with_logits(
        logits64, torch.full_like(logits64, target64) if isinstance(target64, float) else target64,
        None if weight is None else exact(weight), reduction=reduction,
        pos_weight=None if pos_weight is None else exact(pos_weight))
    (grad64,) = torch.autograd.grad(loss64, logits64, exact(grad_loss))
    assert_near(loss, loss64, REDUCED[dtype] if reduction != "none" else ELEMENTWISE[dtype] * 4, "loss")
    assert_near(grad, grad64, ELEMENTWISE[dtype] * 4, "grad_input")
    if variant == "channels_last":
        assert grad.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_gan_losses_and_their_gradients_match_fp64(backend, dtype, reduction):
    real = on_gpu(random(64, 1, seed=14, scale=3.0), dtype).requires_grad_()
    fake = on_gpu(random(48, 1, seed=15, scale=3.0), dtype).requires_grad_()
    with imggen_fast.set_backend(backend):
        d_loss = functional.gan_d_loss(real, fake, 0.9, 0.1, reduction)
        g_loss = functional.gan_g_loss(fake, 1.0, reduction)
        d_grads = torch.autograd.grad(d_loss, (real, fake))
        (g_grad,) = torch.autograd.grad(g_loss, fake)
    real64, fake64 = exact(real).requires_grad_(), exact(fake).requires_grad_()
    d64 = (F.binary_cross_entropy_with_logits(real64, torch.full_like(real64, 0.9), reduction=reduction)
           + F.binary_cross_entropy_with_logits(fake64, torch.full_like(fake64, 0.1), reduction=reduction))
    g64 = F.binary_cross_entropy_with_logits(fake64, torch.ones_like(fake64), reduction=reduction)
    assert_near(d_loss, d64, REDUCED[dtype], "gan_d_loss")
    assert_near(g_loss, g64, REDUCED[dtype], "gan_g_loss")
    for label, got, want in zip(("real", "fake"), d_grads, torch.autograd.grad(d64, (real64, fake64))):
        assert_near(got, want, ELEMENTWISE[dtype] * 4, f"gan_d_loss grad {label}")
    assert_near(g_grad, torch.autograd.grad(g64, fake64)[0], ELEMENTWISE[dtype] * 4, "gan_g_loss grad")


# ----------------------------------------------------------------------------- VAE bottleneck


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("reduction", ["batchmean", "sum", "mean", "none"])
@pytest.mark.parametrize("shape,channels_last", [((64, 32), False), ((3, 5000), False), ((4, 8, 5, 5), True)],
                         ids=str)
def test_reparameterize_kl_and_its_gradients_match_fp64(backend, dtype, reduction, shape, channels_last):
    mu = on_gpu(random(*shape, seed=16), dtype, channels_last).requires_grad_()
    logvar = on_gpu(random(*shape, seed=17, scale=0.5), dtype, channels_last).requires_grad_()
    eps = on_gpu(random(*shape, seed=18), dtype, channels_last)
    with imggen_fast.set_backend(backend):
        z, kl = functional.reparameterize_kl(mu, logvar, eps, beta=0.5, reduction=reduction)
        grad_z, grad_kl = torch.randn_like(z), torch.randn_like(kl)
        grads = torch.autograd.grad((z, kl), (mu, logvar), (grad_z, grad_kl))
    mu64, logvar64 = exact(mu).requires_grad_(), exact(logvar).requires_grad_()
    z64, kl64 = reference.reparameterize_kl(mu64, logvar64, exact(eps), beta=0.5, reduction=reduction)
    grads64 = torch.autograd.grad((z64, kl64), (mu64, logvar64), (exact(grad_z), exact(grad_kl)))
    assert_near(z, z64, ELEMENTWISE[dtype] * 4, "z")
    assert_near(kl, kl64, REDUCED[dtype], "kl")
    for label, got, want in zip(("grad_mu", "grad_logvar"), grads, grads64):
        assert_near(got, want, ELEMENTWISE[dtype] * 8, label)
    if channels_last:
        assert z.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(3, 7), (5, 1030), (2, 3, 40, 40)], ids=str)
def test_gpu_noise_is_the_cpu_kernels_noise(backend, shape):
    """The same seed gives the same noise on the GPU (CUDA C++ or compiled Triton) as the C++
    CPU kernel, which the CPU tests check against tl.randn4x; and the backward regenerates it."""
    seed = torch.tensor([987654321])
    zeros = torch.zeros(shape)
    with imggen_fast.set_backend("cpp"):
        cpu_noise, _ = kernel_op("reparameterize_kl_forward")(zeros, zeros, None, seed, 1.0, "sum")
    with imggen_fast.set_backend(backend):
        gpu_zeros, gpu_seed = zeros.to(DEVICE), seed.to(DEVICE)
        gpu_noise, _ = kernel_op("reparameterize_kl_forward")(gpu_zeros, gpu_zeros, None, gpu_seed, 1.0, "sum")
        grad_mu, grad_logvar = kernel_op("reparameterize_kl_backward")(
            torch.ones_like(gpu_zeros), None, gpu_zeros, gpu_zeros, None, gpu_seed, 1.0, "sum")
    torch.testing.assert_close(gpu_noise.cpu(), cpu_noise, rtol=1e-5, atol=2e-6)
    # d z / d logvar = eps * std / 2 with std = 1: the regenerated noise, halved.
    torch.testing.assert_close(grad_logvar.cpu(), cpu_noise / 2, rtol=1e-5, atol=2e-6)
    assert torch.equal(grad_mu.cpu(), torch.ones(shape))


# ----------------------------------------------------------------------------- devices


@pytest.mark.parametrize("backend", BACKENDS)
def test_tensors_on_a_second_gpu_run_there(backend):
    """Tensors on cuda:1 while cuda:0 is current: the kernels run on the tensors' device."""
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs")
    output = random(4, 6, 5, 5, seed=19).float().to("cuda:1")
    grad_output = random(4, 6, 5, 5, seed=20).float().to("cuda:1")
    torch.cuda.set_device(0)
    with imggen_fast.set_backend(backend):
        grad_input, grad_bias = kernel_op("bias_leaky_relu_backward")(grad_output, output, SLOPE, 1)
    assert grad_input.device == torch.device("cuda:1") and grad_bias.device == torch.device("cuda:1")
    expected_input, expected_bias = reference.bias_leaky_relu_backward(exact(grad_output), exact(output), SLOPE, 1)
    assert_near(grad_input, expected_input, ELEMENTWISE[torch.float32], "grad_input on cuda:1")
    assert_near(grad_bias, expected_bias, REDUCED[torch.float32], "grad_bias on cuda:1")
