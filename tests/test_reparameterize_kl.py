"""The fused VAE reparameterization + KL ``reparameterize_kl`` on every backend against
the eager reference, its Philox noise against Triton's ``tl.randn4x``, and its module."""

import inspect
import math

import pytest
import torch
import triton
import triton.language as tl
from helpers import TOLERANCES, assert_close, channels_last, kernel_op, requires_cuda

import imggen_fast
from imggen_fast import backends, functional, models, reference
from imggen_fast import nn as fused_nn
from imggen_fast.backends import FallbackWarning
from imggen_fast.ops import reparameterize_kl as ops

SHAPES = [(1, 1), (3, 7), (128, 32), (64, 4, 9, 11), (0, 5)]
REDUCTIONS = ["batchmean", "sum", "mean", "none"]
BETAS = [0.0, 0.5, 4.0]
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
# The KL sums up to a few thousand terms per sample, each rounded once: its tolerance is
# the elementwise one times this (fp32 and bf16 accumulate in fp32, fp64 in fp64).
KL_TOLERANCE_SCALE = 4.0
# The noise on different code paths (AVX2 polynomials, libm, Triton's interpreter)
# agrees within the float rounding of log, sqrt and sin/cos of arguments up to 2 pi.
NOISE_TOLERANCE = {"rtol": 1e-5, "atol": 2e-6}


def make_inputs(shape, dtype, seed=0):
    """mu, logvar, eps, grad_z in ``dtype``: logvar in [-3, 3] (std from 0.2 to 4.5)."""
    generator = torch.Generator().manual_seed(seed)
    mu = torch.randn(shape, generator=generator, dtype=torch.float64)
    logvar = torch.rand(shape, generator=generator, dtype=torch.float64) * 6 - 3
    eps = torch.randn(shape, generator=generator, dtype=torch.float64)
    grad_z = torch.randn(shape, generator=generator, dtype=torch.float64) * 3
    return tuple(t.to(dtype) for t in (mu, logvar, eps, grad_z))


def grad_kl_like(kl):
    """A gradient for kl that is not 1: 2.5, or 1.5 + the sample index for "none"."""
    return torch.arange(kl.numel(), dtype=kl.dtype).reshape(kl.shape) + 1.5 if kl.dim() else torch.tensor(
        2.5, dtype=kl.dtype)


def reference_results(mu, logvar, eps, grad_z, beta, reduction):
    """z, kl, grad_mu, grad_logvar of the reference, computed in fp64 from the same inputs,
    and the magnitudes of the terms each output adds up (fp64): the scale of its rounding."""
    mu64 = mu.double().requires_grad_()
    logvar64 = logvar.double().requires_grad_()
    eps64 = eps.double()
    z, kl = reference.reparameterize_kl(mu64, logvar64, eps64, beta=beta, reduction=reduction)
    grad_kl = grad_kl_like(kl)
    grad_mu, grad_logvar = torch.autograd.grad((z, kl), (mu64, logvar64), (grad_z.double(), grad_kl),
                                               allow_unused=True, materialize_grads=True)
    mu64, logvar64 = mu64.detach(), logvar64.detach()
    std, variance = torch.exp(0.5 * logvar64), torch.exp(logvar64)
    samples = mu.shape[0]
    per_sample = math.prod(mu.shape[1:])
    factor = {"batchmean": 1 / samples if samples else math.nan, "mean": 1 / (samples * per_sample)
              if samples * per_sample else math.nan}.get(reduction, 1.0)
    # grad_kl per element, times beta and the reduction's factor
    kl_grad = (grad_kl if grad_kl.dim() else grad_kl.expand(samples)).reshape((samples,) + (1,) * (mu.dim() - 1)) \
        * beta * factor
    term_sizes = (1 + logvar64.abs() + mu64**2 + variance).reshape(samples, per_sample).sum(1) * 0.5 * beta
    magnitudes = (mu64.abs() + (eps64 * std).abs(),
                  term_sizes if reduction == "none" else term_sizes.sum() * factor,
                  grad_z.double().abs() + (kl_grad * mu64).abs(),
                  0.5 * ((grad_z.double() * eps64 * std).abs() + kl_grad.abs() * (variance + 1)))
    return (z.detach(), kl.detach(), grad_mu, grad_logvar), magnitudes


def fused_results(mu, logvar, eps, grad_z, beta, reduction, **kwargs):
    mu = mu.detach().requires_grad_()
    logvar = logvar.detach().requires_grad_()
    z, kl = functional.reparameterize_kl(mu, logvar, eps, beta=beta, reduction=reduction, **kwargs)
    grad_mu, grad_logvar = torch.autograd.grad((z, kl), (mu, logvar), (grad_z, grad_kl_like(kl.detach())),
                                               allow_unused=True, materialize_grads=True)
    return z, kl, grad_mu, grad_logvar


def check_against_reference(results, reference_and_magnitudes, dtype, kl_scale=KL_TOLERANCE_SCALE):
    """Each result within the dtype's tolerance of the fp64 reference, relative to the size
    of the terms it adds up (so that cancellation in exp(logvar) - 1, which eager suffers
    alike in the same dtype, is not taken for an error)."""
    expected_results, magnitudes = reference_and_magnitudes
    rtol, atol = TOLERANCES[dtype]
    for name, actual, expected, magnitude in zip(("z", "kl", "grad_mu", "grad_logvar"), results, expected_results,
                                                 magnitudes):
        assert actual.dtype == dtype and actual.shape == expected.shape, name
        scale = kl_scale if name == "kl" else 1.0
        error = (actual.double() - expected).abs()
        bound = (rtol * scale * magnitude + atol * scale).expand_as(error)
        # A value beyond the dtype's range (a float16 sum, say) is inf in every implementation.
        finite = torch.isfinite(expected.to(dtype))
        assert torch.equal(torch.isnan(actual), torch.isnan(expected)), name
        assert torch.equal(torch.isinf(actual), torch.isinf(expected.to(dtype))), name
        assert (error[finite] <= bound[finite]).all(), \
            f"{name}: max error {error[finite].max().item():.3g} over bound {(error - bound)[finite].max().item():.3g}"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_cpp_matches_reference_with_eps(dtype, shape, reduction):
    mu, logvar, eps, grad_z = make_inputs(shape, dtype)
    with imggen_fast.set_backend("cpp"):
        for beta in BETAS:
            results = fused_results(mu, logvar, eps, grad_z, beta, reduction)
            check_against_reference(results, reference_results(mu, logvar, eps, grad_z, beta, reduction), dtype)


@pytest.mark.interpreter
@pytest.mark.parametrize("shape", [(1, 1), (3, 7), (2, 3, 4, 5), (5, 1030), (0, 5)], ids=str)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_triton_matches_reference_with_eps(shape, reduction):
    """The Triton kernels in the interpreter (fp32); (5, 1030) takes two programs per sample."""
    mu, logvar, eps, grad_z = make_inputs(shape, torch.float32)
    with imggen_fast.set_backend("triton"):
        results = fused_results(mu, logvar, eps, grad_z, 0.5, reduction)
    check_against_reference(results, reference_results(mu, logvar, eps, grad_z, 0.5, reduction), torch.float32)


@pytest.mark.parametrize("backend", ["cpp", "triton"])
def test_channels_last_in_channels_last_out(backend):
    mu, logvar, eps, grad_z = (channels_last(t) for t in make_inputs((4, 6, 3, 5), torch.float32))
    with imggen_fast.set_backend(backend):
        results = fused_results(mu, logvar, eps, grad_z, 0.5, "batchmean")
        z_noise, _ = functional.reparameterize_kl(mu, logvar)
    for tensor in (results[0], results[2], results[3], z_noise):
        assert tensor.is_contiguous(memory_format=torch.channels_last)
    check_against_reference(results, reference_results(mu, logvar, eps, grad_z, 0.5, "batchmean"), torch.float32)


@pytest.mark.parametrize("backend", ["cpp", "triton"])
def test_mixed_layouts_and_strided_views(backend):
    mu, logvar, eps, grad_z = make_inputs((4, 6, 5, 8), torch.float32)
    cases = [
        (mu, channels_last(logvar), eps, channels_last(grad_z)),     # layouts differ
        (mu[:, ::2], logvar[:, ::2], eps[:, ::2], grad_z[:, ::2]),   # gapped views
        (mu.transpose(0, 3), logvar.transpose(0, 3), eps.transpose(0, 3), grad_z.transpose(0, 3)),  # batch not outer
        (mu[0, 0].t(), logvar[0, 0].t(), eps[0, 0].t(), grad_z[0, 0].t()),
        (mu[..., :1].expand(4, 6, 5, 3), logvar[..., 1:2].expand(4, 6, 5, 3), eps[..., :3], grad_z[..., :3]),
    ]
    with imggen_fast.set_backend(backend):
        for case in cases:
            for reduction in ("none", "mean"):
                results = fused_results(*case, 0.5, reduction)
                check_against_reference(results, reference_results(*case, 0.5, reduction), torch.float32)


@pytest.mark.parametrize("backend", ["cpp", "triton"])
@pytest.mark.parametrize("used", ["z", "kl"])
def test_gradient_of_one_output(backend, used):
    """The unused output's gradient arrives as None, and the kernel skips its terms."""
    mu, logvar, eps, _ = make_inputs((3, 9), torch.float32)
    mu.requires_grad_()
    logvar.requires_grad_()
    with imggen_fast.set_backend(backend):
        z, kl = functional.reparameterize_kl(mu, logvar, eps, beta=2.0, reduction="none")
    expected_z, expected_kl = reference.reparameterize_kl(mu, logvar, eps, beta=2.0, reduction="none")
    output, expected = ((z, expected_z) if used == "z" else (kl, expected_kl))
    weights = torch.linspace(-1, 2, output.numel()).reshape(output.shape)
    grads = torch.autograd.grad((output * weights).sum(), (mu, logvar))
    expected_grads = torch.autograd.grad((expected * weights).sum(), (mu, logvar))
    for grad, expected_grad in zip(grads, expected_grads):
        assert_close(grad, expected_grad)


def test_large_outputs_match_reference():
    """Outputs of 32 MiB and more take another path (huge pages, non-temporal stores where
    aligned); odd rows mix aligned and unaligned stores."""
    shape = (129, 65537)
    mu, logvar, eps, grad_z = (t.float() for t in make_inputs(shape, torch.float64))
    results = fused_results(mu, logvar, eps, grad_z, 0.5, "none")
    check_against_reference(results, reference_results(mu, logvar, eps, grad_z, 0.5, "none"), torch.float32)


def test_auto_uses_cpp_on_cpu():
    with imggen_fast.set_backend("auto"):
        assert backends.choose("cpu") == "cpp"


def test_reference_backend_and_eps_requiring_grad_use_the_reference():
    mu, logvar, eps, grad_z = make_inputs((3, 4), torch.float64)
    eps.requires_grad_()
    with pytest.warns(FallbackWarning, match="eps requires grad"):
        z, kl = functional.reparameterize_kl(mu, logvar, eps, beta=0.5)
    (grad_eps,) = torch.autograd.grad((z * grad_z).sum() + kl, eps)
    assert_close(grad_eps, grad_z * torch.exp(0.5 * logvar))
    with imggen_fast.set_backend("reference"):
        generator = torch.Generator().manual_seed(3)
        z, kl = functional.reparameterize_kl(mu, logvar, generator=generator)
    expected = mu + torch.randn(mu.shape, generator=torch.Generator().manual_seed(3), dtype=mu.dtype) \
        * torch.exp(0.5 * logvar)
    assert_close(z, expected)


# --- The noise (eps=None) -------------------------------------------------------------


def noise(shape, backend="cpp", dtype=torch.float32, **kwargs):
    """The kernel's eps for ``shape``: z with mu = 0 and logvar = 0."""
    zeros = torch.zeros(shape, dtype=dtype)
    with imggen_fast.set_backend(backend):
        z, _ = functional.reparameterize_kl(zeros, zeros, **kwargs)
    return z


@triton.jit
def randn4x_kernel(seed_ptr, out_ptr, groups, BLOCK: tl.constexpr):
    """out[4 g + k] = tl.randn4x(seed, g)[k]: Triton's own generator, the ground truth."""
    group = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    n1, n2, n3, n4 = tl.randn4x(tl.load(seed_ptr), group.to(tl.int64))
    in_range = group < groups
    tl.store(out_ptr + 4 * group, n1, mask=in_range)
    tl.store(out_ptr + 4 * group + 1, n2, mask=in_range)
    tl.store(out_ptr + 4 * group + 2, n3, mask=in_range)
    tl.store(out_ptr + 4 * group + 3, n4, mask=in_range)


def triton_randn4x(seed: int, numel: int) -> torch.Tensor:
    groups = triton.cdiv(numel, 4)
    out = torch.empty(4 * groups)
    randn4x_kernel[(triton.cdiv(groups, 256),)](torch.tensor([seed]), out, groups, BLOCK=256)
    return out[:numel]


@pytest.mark.interpreter
@pytest.mark.parametrize("seed", [0, 123456789, 2**63 - 2, -(2**40) + 17])
@pytest.mark.parametrize("shape", [(1, 1), (3, 7), (5, 1030), (2, 3, 4, 5)], ids=str)
def test_cpp_noise_is_tl_randn4x(seed, shape):
    """For the same (seed, flat index), the C++ eps is normal i % 4 of tl.randn4x(seed, i // 4):
    the shapes cover whole 8-group AVX2 batches and the scalar groups left over."""
    seed_tensor = torch.tensor([seed])
    zeros = torch.zeros(shape)
    with imggen_fast.set_backend("cpp"):
        z, _ = kernel_op("reparameterize_kl")(zeros, zeros, None, seed_tensor, 1.0, "sum")
    torch.testing.assert_close(z.flatten(), triton_randn4x(seed, zeros.numel()), **NOISE_TOLERANCE)


@pytest.mark.interpreter
@pytest.mark.parametrize("shape", [(3, 7), (5, 1030)], ids=str)
def test_triton_kernel_noise_is_tl_randn4x(shape):
    seed = 987654321
    zeros = torch.zeros(shape)
    with imggen_fast.set_backend("triton"):
        z, _ = kernel_op("reparameterize_kl")(zeros, zeros, None, torch.tensor([seed]), 1.0, "sum")
    torch.testing.assert_close(z.flatten(), triton_randn4x(seed, zeros.numel()), **NOISE_TOLERANCE)


def test_noise_is_standard_normal_and_uncorrelated():
    """Over 2**20 draws: mean 0, variance 1, normal quantiles, no correlation between
    neighbouring elements (lags 1 to 8, across the 4-element groups), all within 5 sigma."""
    torch.manual_seed(1)
    draws = noise((1 << 10, 1 << 10)).flatten().double()
    count = draws.numel()
    sigma = 1 / math.sqrt(count)
    assert abs(draws.mean().item()) < 5 * sigma
    assert abs(draws.var().item() - 1) < 5 * math.sqrt(2) * sigma
    assert abs((draws**3).mean().item()) < 5 * math.sqrt(15) * sigma  # skewness of N(0, 1): 0
    for bound, probability in [(1.0, 0.6826894921), (2.0, 0.9544997361), (3.0, 0.9973002039)]:
        inside = (draws.abs() < bound).double().mean().item()
        assert abs(inside - probability) < 5 * math.sqrt(probability * (1 - probability)) * sigma
    for lag in range(1, 9):
        correlation = (draws[:-lag] * draws[lag:]).mean().item()
        assert abs(correlation) < 5 * sigma, f"lag {lag}: correlation {correlation}"


def test_same_seed_same_noise_and_fresh_noise_per_call():
    shape = (64, 37)
    torch.manual_seed(5)
    first = noise(shape)
    second = noise(shape)
    torch.manual_seed(5)
    again = noise(shape)
    assert torch.equal(first, again)
    assert not torch.equal(first, second)
    from_generator = noise(shape, generator=torch.Generator().manual_seed(9))
    assert torch.equal(from_generator, noise(shape, generator=torch.Generator().manual_seed(9)))
    assert not torch.equal(from_generator, noise(shape, generator=torch.Generator().manual_seed(10)))


@pytest.mark.parametrize("backend,dtype", [("cpp", torch.float32), ("cpp", torch.float64), ("cpp", torch.bfloat16),
                                           ("triton", torch.float32)])
@pytest.mark.parametrize("reduction", ["batchmean", "none"])
def test_backward_regenerates_the_noise(backend, dtype, reduction):
    """With eps=None, the gradients equal the reference's fed with the eps the kernel made."""
    shape = (6, 2, 3, 7) if backend == "cpp" else (3, 2, 3, 7)
    mu, logvar, _, grad_z = make_inputs(shape, dtype)
    results = None
    with imggen_fast.set_backend(backend):
        results = fused_results(mu, logvar, None, grad_z, 0.5, reduction, generator=torch.Generator().manual_seed(4))
    eps = noise(shape, backend, dtype, generator=torch.Generator().manual_seed(4))
    check_against_reference(results, reference_results(mu, logvar, eps, grad_z, 0.5, reduction), dtype)


@pytest.mark.interpreter
def test_triton_and_cpp_make_the_same_noise():
    shape = (4, 2, 3, 5)
    cpp = noise(shape, "cpp", generator=torch.Generator().manual_seed(8))
    triton_noise = noise(shape, "triton", generator=torch.Generator().manual_seed(8))
    torch.testing.assert_close(triton_noise, cpp, **NOISE_TOLERANCE)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_same_bits_with_one_and_two_threads(reduction):
    """Large enough for several reduction segments per sample and both threads."""
    mu, logvar, _, grad_z = make_inputs((3, 20000), torch.float32)
    threads = torch.get_num_threads()
    runs = []
    try:
        for count in (1, 2, 1, 2):
            torch.set_num_threads(count)
            runs.append(fused_results(mu, logvar, None, grad_z, 0.5, reduction,
                                      generator=torch.Generator().manual_seed(2)))
    finally:
        torch.set_num_threads(threads)
    for run in runs[1:]:
        for tensor, first in zip(run, runs[0]):
            assert torch.equal(tensor, first)


# --- The op contract ------------------------------------------------------------------


def op_samples(shape, dtype=torch.float32):
    mu, logvar, eps, _ = make_inputs(shape, dtype)
    seed = torch.tensor([42])
    # The means of an empty batch are NaN, which opcheck's comparisons take for a mismatch.
    mean = "sum" if mu.numel() == 0 else "mean"
    return [(mu, logvar, eps, None, 0.5, "sum" if mu.numel() == 0 else "batchmean"),
            (mu.requires_grad_(), logvar.clone().requires_grad_(), None, seed, 2.0, "none"),
            (mu.detach(), logvar.requires_grad_(), eps, None, 0.0, mean)]


def backward_samples(shape, dtype=torch.float32):
    mu, logvar, eps, grad_z = make_inputs(shape, dtype)
    seed = torch.tensor([42])
    samples = max(shape[0], 1)
    return [(grad_z, torch.tensor(1.5), mu, logvar, None, seed, 0.5, "sum"),
            (None, torch.ones(shape[0]), mu, logvar, None, None, 1.0, "none"),
            (grad_z, None, mu, logvar, eps, None, 2.0, "batchmean"),
            (grad_z, torch.linspace(0, 1, samples)[: shape[0]], mu, logvar, None, seed, 0.5, "none")]


def check_ops(backend, device, shapes):
    public, forward, backward = (kernel_op(name) for name in (ops.NAME, ops.FORWARD, ops.BACKWARD))
    with imggen_fast.set_backend(backend):
        for shape in shapes:
            for sample in op_samples(shape):
                sample = tuple(t.to(device) if isinstance(t, torch.Tensor) else t for t in sample)
                torch.library.opcheck(public, sample)
                torch.library.opcheck(forward, tuple(t.detach() if isinstance(t, torch.Tensor) else t
                                                     for t in sample))
            for sample in backward_samples(shape):
                sample = tuple(t.to(device) if isinstance(t, torch.Tensor) else t for t in sample)
                torch.library.opcheck(backward, sample)


def test_opcheck_cpp():
    check_ops("cpp", torch.device("cpu"), SHAPES)


@pytest.mark.interpreter
def test_opcheck_triton():
    check_ops("triton", torch.device("cpu"), [(3, 7), (2, 3, 4, 5)])


@requires_cuda
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_opcheck_cuda(backend):
    check_ops(backend, torch.device("cuda"), SHAPES)


@requires_cuda
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_cuda_matches_reference(backend, dtype):
    for shape in SHAPES:
        mu, logvar, eps, grad_z = (t.cuda() for t in make_inputs(shape, dtype))
        with imggen_fast.set_backend(backend):
            for reduction in REDUCTIONS:
                results = fused_results(mu, logvar, eps, grad_z, 0.5, reduction)
                expected = reference_results(mu, logvar, eps, grad_z, 0.5, reduction)
                check_against_reference(results, expected, dtype, kl_scale=100.0 if dtype != torch.float32 else 10.0)
            cuda_noise = functional.reparameterize_kl(torch.zeros_like(mu), torch.zeros_like(mu),
                                                      generator=torch.Generator("cuda").manual_seed(1))[0]
            assert torch.isfinite(cuda_noise).all()


@pytest.mark.parametrize("backend", ["cpp", "triton", "reference"])
def test_gradcheck(backend):
    """fp64; the interpreter checks a random projection of the Jacobian (fast mode) to stay quick."""
    mu, logvar, eps, _ = make_inputs((3, 5), torch.float64)
    mu.requires_grad_()
    logvar.requires_grad_()
    fast_mode = backend == "triton"
    with imggen_fast.set_backend(backend):
        for reduction in ("batchmean", "none"):
            assert torch.autograd.gradcheck(
                lambda m, v: functional.reparameterize_kl(m, v, eps, beta=0.7, reduction=reduction), (mu, logvar),
                fast_mode=fast_mode)
        assert torch.autograd.gradcheck(
            lambda m, v: functional.reparameterize_kl(m, v, generator=torch.Generator().manual_seed(6)), (mu, logvar),
            fast_mode=fast_mode)


@pytest.mark.parametrize("backend", ["cpp", "triton"])
def test_double_backward_matches_the_eager_formula(backend):
    """A gradient penalty on the bottleneck's gradients (create_graph=True) is
    differentiated exactly: gradgradcheck with eps given and with the kernel's own noise."""
    mu, logvar, eps, _ = make_inputs((3, 5), torch.float64)
    mu.requires_grad_()
    logvar.requires_grad_()
    fast_mode = backend == "triton"
    with imggen_fast.set_backend(backend):
        for reduction in ("batchmean", "none"):
            assert torch.autograd.gradgradcheck(
                lambda m, v: functional.reparameterize_kl(m, v, eps, beta=0.7, reduction=reduction), (mu, logvar),
                fast_mode=fast_mode)
        assert torch.autograd.gradgradcheck(
            lambda m, v: functional.reparameterize_kl(m, v, generator=torch.Generator().manual_seed(6)), (mu, logvar),
            fast_mode=fast_mode)
        # The case of the issue: a penalty on grad(kl, mu) reaches mu through the second term.
        z, kl = functional.reparameterize_kl(mu, logvar, beta=1.0, reduction="sum")
        grad_mu, _ = torch.autograd.grad(kl, (mu, logvar), create_graph=True)
        (second,) = torch.autograd.grad(grad_mu.pow(2).sum(), mu)
    # kl = -0.5 sum(1 + logvar - mu^2 - exp(logvar)): grad_mu = mu, so d sum(mu^2) / d mu = 2 mu.
    assert_close(second, 2 * mu.detach())


def test_torch_compile_fullgraph_matches_eager():
    mu, logvar, eps, grad_z = make_inputs((8, 33), torch.float32)

    def step(m, v, e):
        z, kl = functional.reparameterize_kl(m * 2, v, e, beta=0.5, reduction="none")
        return z * 2, kl + 1

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend="inductor")
    leaves = [mu.clone().requires_grad_(), logvar.clone().requires_grad_()]
    compiled_leaves = [mu.clone().requires_grad_(), logvar.clone().requires_grad_()]
    eager_z, eager_kl = step(*leaves, eps)
    compiled_z, compiled_kl = compiled(*compiled_leaves, eps)
    torch.testing.assert_close(compiled_z, eager_z, rtol=0, atol=0)
    torch.testing.assert_close(compiled_kl, eager_kl, rtol=0, atol=0)
    grad_kl = torch.linspace(-1, 1, 8)
    eager_grads = torch.autograd.grad((eager_z, eager_kl), leaves, (grad_z, grad_kl))
    compiled_grads = torch.autograd.grad((compiled_z, compiled_kl), compiled_leaves, (grad_z, grad_kl))
    for compiled_grad, eager_grad in zip(compiled_grads, eager_grads):
        torch.testing.assert_close(compiled_grad, eager_grad, rtol=0, atol=0)


def test_torch_compile_fullgraph_with_kernel_noise():
    """eps=None compiles without a graph break: the seed draw is traced, and
    torch.manual_seed makes the compiled noise repeatable."""
    mu, logvar, _, _ = make_inputs((16, 40), torch.float32)

    def step(m, v):
        z, kl = functional.reparameterize_kl(m, v, beta=0.5)
        return z, kl

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend="inductor")
    torch.manual_seed(11)
    first_z, first_kl = compiled(mu, logvar)
    torch.manual_seed(11)
    second_z, _ = compiled(mu, logvar)
    assert torch.equal(first_z, second_z)
    assert_close(first_kl, reference.reparameterize_kl(mu, logvar, torch.zeros_like(mu), beta=0.5)[1])
    eps = (first_z - mu) / torch.exp(0.5 * logvar)
    assert abs(eps.mean().item()) < 0.2 and 0.8 < eps.std().item() < 1.2


BAD_INPUTS = [
    (lambda m, v, e: ([1.0], v, e, {}), TypeError, "mu must be a torch.Tensor"),
    (lambda m, v, e: (m.int(), v, e, {}), TypeError, "mu must be a floating-point"),
    (lambda m, v, e: (m, v.long(), e, {}), TypeError, "logvar must be a floating-point"),
    (lambda m, v, e: (m, v, e.int(), {}), TypeError, "eps must be a floating-point"),
    (lambda m, v, e: (m, v.double(), e, {}), TypeError, "logvar has dtype"),
    (lambda m, v, e: (m, v, e.double(), {}), TypeError, "eps has dtype"),
    (lambda m, v, e: (m, v[:2], e, {}), ValueError, "logvar has shape"),
    (lambda m, v, e: (m, v, e.t(), {}), ValueError, "eps has shape"),
    (lambda m, v, e: (m, v.to("meta"), e, {}), ValueError, "logvar is on meta"),
    (lambda m, v, e: (m[0, 0], v[0, 0], None, {}), ValueError, "mu must have a batch dimension"),
    (lambda m, v, e: (m, v, e, {"beta": -0.5}), ValueError, "beta must be finite and >= 0"),
    (lambda m, v, e: (m, v, e, {"beta": float("nan")}), ValueError, "beta must be finite"),
    (lambda m, v, e: (m, v, e, {"beta": float("inf")}), ValueError, "beta must be finite"),
    (lambda m, v, e: (m, v, e, {"beta": "1"}), TypeError, "beta must be a number"),
    (lambda m, v, e: (m, v, e, {"reduction": "avg"}), ValueError, "reduction must be one of"),
    (lambda m, v, e: (m, v, None, {"generator": 3}), TypeError, "generator must be a torch.Generator"),
]


@pytest.mark.parametrize("make_arguments,error,message", BAD_INPUTS)
def test_bad_input_names_the_argument(make_arguments, error, message):
    mu, logvar, eps, _ = make_inputs((3, 4), torch.float32)
    mu_arg, logvar_arg, eps_arg, kwargs = make_arguments(mu, logvar, eps)
    with pytest.raises(error, match=message):
        functional.reparameterize_kl(mu_arg, logvar_arg, eps_arg, **kwargs)


def test_direct_op_call_with_bad_arguments_raises_not_crashes():
    mu, logvar, _, _ = make_inputs((3, 4), torch.float32)
    op = kernel_op("reparameterize_kl")
    with pytest.raises(RuntimeError, match="needs eps or seed"):
        op(mu, logvar, None, None, 1.0, "sum")
    with pytest.raises(RuntimeError, match="reduction must be"):
        op(mu, logvar, mu, None, 1.0, "avg")
    with pytest.raises(RuntimeError, match="seed must be a 1-element int64"):
        op(mu, logvar, None, torch.tensor([1.0]), 1.0, "sum")
    with pytest.raises(RuntimeError, match="logvar shape"):
        op(mu, logvar[:2], None, torch.tensor([1]), 1.0, "sum")
    eps = torch.randn(3, 4, requires_grad=True)
    z, _ = op(mu.requires_grad_(), logvar, eps, None, 1.0, "sum")
    with pytest.raises(RuntimeError, match="not differentiable with respect to eps"):
        torch.autograd.grad(z.sum(), (mu, eps))


# --- The module -----------------------------------------------------------------------


def test_module_interface_matches_the_eager_module():
    eager = models.vae.Reparameterize
    assert issubclass(fused_nn.Reparameterize, eager)
    assert inspect.signature(fused_nn.Reparameterize.__init__) == inspect.signature(eager.__init__)
    module = fused_nn.Reparameterize(beta=2.0, reduction="sum", sample_in_eval=True)
    assert (module.beta, module.reduction, module.sample_in_eval) == (2.0, "sum", True)
    assert repr(module) == repr(eager(beta=2.0, reduction="sum", sample_in_eval=True))


def test_module_samples_in_training_and_not_in_eval():
    mu, logvar, _, _ = make_inputs((32, 16), torch.float32)
    module = fused_nn.Reparameterize(beta=0.5, reduction="none")
    torch.manual_seed(0)
    z, kl = module(mu, logvar)
    assert not torch.equal(z, mu)
    assert_close(kl, reference.reparameterize_kl(mu, logvar, torch.zeros_like(mu), beta=0.5, reduction="none")[1])
    module.eval()
    z_eval, kl_eval = module(mu, logvar)
    assert z_eval is mu
    assert_close(kl_eval, kl)
    z_sampled, _ = fused_nn.Reparameterize(sample_in_eval=True).eval()(mu, logvar)
    assert not torch.equal(z_sampled, mu)


@pytest.mark.parametrize("module_type", [fused_nn.Reparameterize, models.vae.Reparameterize])
def test_module_in_eval_draws_no_noise(module_type):
    """In eval mode without sample_in_eval, z is mu and no noise is drawn (the generator's
    state does not move); the KL term is the same."""
    mu, logvar, _, _ = make_inputs((6, 5), torch.float32)
    module = module_type(beta=0.5, reduction="sum").eval()
    state = torch.random.get_rng_state()
    z, kl = module(mu, logvar)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert z is mu
    assert_close(kl, reference.reparameterize_kl(mu, logvar, torch.zeros_like(mu), beta=0.5, reduction="sum")[1])


def test_module_in_the_vae_trains():
    vae = models.VAE(image_size=8, channels=1, latent_dim=4)
    vae.reparameterize = fused_nn.Reparameterize()
    images = torch.rand(5, 1, 8, 8) * 2 - 1
    loss = vae.loss(images, beta=0.5)
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in vae.parameters())
