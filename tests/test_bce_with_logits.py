"""BCE with logits and the GAN losses (``bce_with_logits``, ``gan_d_loss``, ``gan_g_loss``)
on every backend against ``F.binary_cross_entropy_with_logits`` computed in float64."""

import warnings

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_close, channels_last, kernel_op, requires_cuda
from torch.utils._python_dispatch import TorchDispatchMode

import imggen_fast
from imggen_fast import backends, functional, nn

REDUCTIONS = ["mean", "sum", "none"]
# (backend, dtype): the C++ kernel in every CPU dtype; Triton in its interpreter, fp32.
BACKEND_DTYPES = [("cpp", torch.float32), ("cpp", torch.float64), ("cpp", torch.bfloat16), ("cpp", torch.float16),
                  ("triton", torch.float32)]
# Shapes for the C++ kernel (odd sizes; more than one reduction block and thread chunk),
# and smaller ones for Triton's interpreter.
CPP_SHAPES = [(1,), (7,), (64, 1), (3, 37), (64, 1, 30, 30)]
TRITON_SHAPES = [(1,), (64, 1), (3, 37), (2, 3, 5, 7)]


def logits(shape, dtype=torch.float32, seed=0, scale=4.0):
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=generator, dtype=torch.float64) * scale).to(dtype)


def soft_labels(shape, dtype=torch.float32, seed=1):
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(shape, generator=generator, dtype=torch.float64).to(dtype)


def as_float64(value):
    return value.double() if isinstance(value, torch.Tensor) else value


def expected_loss_and_grad(input, target, weight=None, pos_weight=None, reduction="mean", grad_output=None):
    """F.binary_cross_entropy_with_logits and its input gradient in float64 (a number target
    as a filled tensor), cast back to input's dtype."""
    x = input.detach().double().requires_grad_()
    y = torch.full_like(x, target) if not isinstance(target, torch.Tensor) else target.double()
    loss = F.binary_cross_entropy_with_logits(x, y, as_float64(weight), reduction=reduction,
                                              pos_weight=as_float64(pos_weight))
    (grad,) = torch.autograd.grad(loss, x, grad_output.double() if grad_output is not None else torch.tensor(1.7, dtype=x.dtype))
    return loss.to(input.dtype), grad.to(input.dtype)


def actual_loss_and_grad(function, input, *args, reduction="mean", grad_output=None, **kwargs):
    x = input.detach().clone().requires_grad_()
    loss = function(x, *args, reduction=reduction, **kwargs)
    (grad,) = torch.autograd.grad(loss, x, grad_output if grad_output is not None else torch.tensor(1.7, dtype=x.dtype))
    return loss, grad


def grad_output_for(shape, dtype, reduction):
    return logits(shape, dtype, seed=7, scale=1.0) if reduction == "none" else None


def check_against_torch(backend, dtype, shape, reduction, target, **weights):
    input = logits(shape, dtype)
    grad_output = grad_output_for(shape, dtype, reduction)
    with imggen_fast.set_backend(backend):
        loss, grad = actual_loss_and_grad(functional.bce_with_logits, input, target, reduction=reduction,
                                          grad_output=grad_output, **weights)
    expected_loss, expected_grad = expected_loss_and_grad(input, target, reduction=reduction,
                                                          grad_output=grad_output, **weights)
    assert loss.dtype == dtype and loss.shape == expected_loss.shape
    scale = 4.0 if reduction == "sum" else 1.0  # a sum of many float terms
    assert_close(loss, expected_loss, dtype, scale=scale, message=f"loss {backend} {dtype} {shape} {reduction}")
    assert_close(grad, expected_grad, dtype, message=f"grad {backend} {dtype} {shape} {reduction}")


def shapes_for(backend):
    return CPP_SHAPES if backend == "cpp" else TRITON_SHAPES


@pytest.mark.parametrize("backend,dtype", BACKEND_DTYPES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("target_kind", ["soft", "hard", "number", "smoothed_number"])
def test_matches_torch(backend, dtype, reduction, target_kind):
    for shape in shapes_for(backend):
        target = {"soft": soft_labels(shape, dtype), "hard": (soft_labels(shape) > 0.5).to(dtype),
                  "number": 1.0, "smoothed_number": 0.9}[target_kind]
        check_against_torch(backend, dtype, shape, reduction, target)


# (weight shape, pos_weight shape) against input (N, C) = (300, 5) or (N, C, H, W).
WEIGHT_CASES = [
    ((5,), None), (None, (5,)), ((5,), (5,)),        # per class: period C (tiled: C < 1024 < N * C)
    ((300, 1), None), ((300, 1), (5,)),              # per sample: the whole tensor is one period
    ((1,), (1,)), ((), None), ((300, 5), (300, 5)),  # one value; the input's shape
]


@pytest.mark.parametrize("backend,dtype", BACKEND_DTYPES)
@pytest.mark.parametrize("weight_shape,pos_weight_shape", WEIGHT_CASES, ids=str)
def test_weight_and_pos_weight_broadcasting(backend, dtype, weight_shape, pos_weight_shape):
    shape = (300, 5) if backend == "cpp" else (60, 5)
    weight_shape = weight_shape and tuple(shape[0] if size == 300 else size for size in weight_shape)
    pos_weight_shape = pos_weight_shape and tuple(shape[0] if size == 300 else size for size in pos_weight_shape)
    weights = {}
    if weight_shape is not None:
        weights["weight"] = soft_labels(weight_shape, dtype, seed=3) * 2
    if pos_weight_shape is not None:
        weights["pos_weight"] = soft_labels(pos_weight_shape, dtype, seed=4) * 3
    for reduction in REDUCTIONS:
        check_against_torch(backend, dtype, shape, reduction, soft_labels(shape, dtype), **weights)


@pytest.mark.parametrize("backend", ["cpp", "triton"])
def test_channels_last_per_channel_weight_and_mixed_layouts(backend):
    """A (C, 1, 1) weight against channels_last input is read periodically (channels are
    innermost); a contiguous target with a channels_last input is brought to its layout."""
    shape = (2, 3, 4, 5)
    input = channels_last(logits(shape))
    target = soft_labels(shape)
    weight = soft_labels((3, 1, 1), seed=5)
    pos_weight = soft_labels((5,), seed=6) * 2
    grad_output = channels_last(logits(shape, seed=8))
    with imggen_fast.set_backend(backend):
        loss, grad = actual_loss_and_grad(functional.bce_with_logits, input, target, reduction="none",
                                          grad_output=grad_output, weight=weight, pos_weight=pos_weight)
    assert loss.is_contiguous(memory_format=torch.channels_last)
    expected_loss, expected_grad = expected_loss_and_grad(input, target, weight, pos_weight, "none", grad_output)
    assert_close(loss, expected_loss)
    assert_close(grad, expected_grad)


@pytest.mark.parametrize("backend", ["cpp", "triton"])
def test_strided_views(backend):
    base = logits((6, 10, 8))
    target_base = soft_labels((6, 10, 8))
    cases = [(base[:, ::2], target_base[:, ::2]), (base.transpose(0, 2), target_base.transpose(0, 2)),
             (base[..., 0], target_base[..., 1]), (base[0, 0].expand(5, 8), target_base[0, 1].expand(5, 8))]
    with imggen_fast.set_backend(backend):
        for input, target in cases:
            for reduction in ("mean", "none"):
                grad_output = grad_output_for(input.shape, torch.float32, reduction)
                loss, grad = actual_loss_and_grad(functional.bce_with_logits, input, target, reduction=reduction,
                                                  grad_output=grad_output)
                expected_loss, expected_grad = expected_loss_and_grad(input, target, reduction=reduction,
                                                                      grad_output=grad_output)
                assert_close(loss, expected_loss)
                assert_close(grad, expected_grad)


@pytest.mark.parametrize("backend", ["cpp", "triton"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_empty_input(backend, reduction):
    input = torch.empty(0, 3, requires_grad=True)
    with imggen_fast.set_backend(backend):
        loss = functional.bce_with_logits(input, torch.empty(0, 3), reduction=reduction)
        gan_loss = functional.gan_d_loss(input, logits((4,)), reduction=reduction) if reduction != "none" else None
    expected = F.binary_cross_entropy_with_logits(input.detach(), torch.empty(0, 3), reduction=reduction)
    torch.testing.assert_close(loss.detach(), expected, equal_nan=True)
    (grad,) = torch.autograd.grad(loss.sum(), input)
    assert grad.shape == (0, 3)
    if gan_loss is not None:  # the empty real term: NaN for mean (as torch's mean), 0 for sum
        expected_gan = expected + F.binary_cross_entropy_with_logits(logits((4,)), torch.zeros(4), reduction=reduction)
        torch.testing.assert_close(gan_loss.detach(), expected_gan, equal_nan=True)


EXTREME_LOGITS = [100.0, -100.0, 1e4, -1e4, 0.0, -0.0, 30.0, -30.0, 88.0, -88.0, 1e-30]


@pytest.mark.parametrize("backend,dtype", [("cpp", torch.float32), ("cpp", torch.float64), ("cpp", torch.bfloat16),
                                           ("triton", torch.float32)])
@pytest.mark.parametrize("label", [0.0, 1.0, 0.5])
def test_extreme_logits_are_finite_and_correct(backend, dtype, label):
    """The stable forms: finite losses and gradients, correct against an exact float64 formula
    (torch's own float32 result loses the small terms these keep)."""
    # Repeated so that both the vector body and the scalar tail of the C++ kernel see them.
    values = torch.tensor(EXTREME_LOGITS * 5, dtype=torch.float64)
    input = values.to(dtype)
    weight, pos_weight = torch.full((1,), 0.5, dtype=dtype), torch.full((1,), 3.0, dtype=dtype)
    with imggen_fast.set_backend(backend):
        for weights in ({}, {"weight": weight, "pos_weight": pos_weight}):
            loss, grad = actual_loss_and_grad(functional.bce_with_logits, input, label, reduction="none",
                                              grad_output=torch.ones_like(input), **weights)
            assert torch.isfinite(loss).all() and torch.isfinite(grad).all()
            x = input.double()
            w = float(weights["weight"]) if weights else 1.0
            p = float(weights["pos_weight"]) if weights else 1.0
            log_weight = 1 + (p - 1) * label
            softplus = torch.log1p(torch.exp(-x.abs()))
            linear = torch.where(x >= 0, (1 - label) * x, -p * label * x)
            exact_loss = w * (linear + log_weight * softplus)
            small_side = log_weight * torch.exp(-x.abs()) / (1 + torch.exp(-x.abs()))
            exact_grad = w * torch.where(x >= 0, (1 - label) - small_side, small_side - p * label)
            assert_close(loss, exact_loss.to(dtype), dtype)
            assert_close(grad, exact_grad.to(dtype), dtype)


@pytest.mark.parametrize("backend", ["cpp", "triton"])
def test_nan_in_gives_nan_out(backend):
    input = torch.tensor([0.5, float("nan"), -2.0] * 6)
    with imggen_fast.set_backend(backend):
        loss, grad = actual_loss_and_grad(functional.bce_with_logits, input, 1.0, reduction="none",
                                          grad_output=torch.ones(18))
        mean = functional.bce_with_logits(input, 0.0)
    nan_positions = torch.isnan(input)
    assert torch.equal(torch.isnan(loss), nan_positions) and torch.equal(torch.isnan(grad), nan_positions)
    assert torch.isnan(mean)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_reduction_is_deterministic_across_thread_counts(dtype):
    """Fixed blocks summed in a fixed order: the same bits with 1 and 2 threads."""
    input = logits((300_001,), dtype)
    target = soft_labels((300_001,), dtype)
    fake = logits((123_457,), dtype, seed=3)
    previous = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            x = input.clone().requires_grad_()
            loss = functional.bce_with_logits(x, target, pos_weight=torch.full((1,), 2.0, dtype=dtype))
            (grad,) = torch.autograd.grad(loss, x)
            d_loss = functional.gan_d_loss(input, fake, reduction="sum")
            results.append((loss, grad, d_loss))
    finally:
        torch.set_num_threads(previous)
    for one_thread, two_threads in zip(*results):
        assert torch.equal(one_thread.view(-1).view(torch.uint8), two_threads.view(-1).view(torch.uint8))


def two_call_d_loss(real, fake, real_label, fake_label, reduction):
    """The eager formulation users write: two BCE calls with ones_like / zeros_like targets."""
    return (F.binary_cross_entropy_with_logits(real, torch.ones_like(real) * real_label, reduction=reduction)
            + F.binary_cross_entropy_with_logits(fake, torch.ones_like(fake) * fake_label, reduction=reduction))


@pytest.mark.parametrize("backend,dtype", BACKEND_DTYPES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("labels", [(1.0, 0.0), (0.9, 0.1)], ids=["hard", "smoothed"])
def test_gan_losses_match_the_two_call_eager_formulation(backend, dtype, reduction, labels):
    real_label, fake_label = labels
    sizes = [((64, 1), (64, 1)), ((5, 1, 3, 3), (5, 1, 3, 3))] if reduction == "none" else [
        ((64, 1), (64, 1)), ((7,), (130, 1, 3, 3) if backend == "cpp" else (30, 1, 3, 3))]
    for real_shape, fake_shape in sizes:
        real = logits(real_shape, dtype).requires_grad_()
        fake = logits(fake_shape, dtype, seed=2).requires_grad_()
        with imggen_fast.set_backend(backend):
            d_loss = functional.gan_d_loss(real, fake, real_label, fake_label, reduction)
            g_loss = functional.gan_g_loss(fake, real_label, reduction)
        real64, fake64 = (t.detach().double().requires_grad_() for t in (real, fake))
        expected_d = two_call_d_loss(real64, fake64, real_label, fake_label, reduction)
        expected_g = F.binary_cross_entropy_with_logits(fake64, torch.ones_like(fake64) * real_label,
                                                        reduction=reduction)
        grad_output = grad_output_for(real_shape, dtype, reduction)
        grad_output = grad_output if grad_output is not None else torch.tensor(0.7, dtype=dtype)
        actual_grads = torch.autograd.grad((d_loss, g_loss), (real, fake), (grad_output, grad_output))
        expected_grads = torch.autograd.grad((expected_d, expected_g), (real64, fake64),
                                             (grad_output.double(), grad_output.double()))
        scale = 4.0 if reduction == "sum" else 1.0
        assert_close(d_loss, expected_d.to(dtype), dtype, scale=scale)
        assert_close(g_loss, expected_g.to(dtype), dtype, scale=scale)
        for actual, expected in zip(actual_grads, expected_grads):
            assert_close(actual, expected.to(dtype), dtype)


def test_gan_d_loss_gradient_of_one_input_only():
    """The generator step differentiates the fake logits only; the real ones are data."""
    real, fake = logits((16, 1)), logits((16, 1), seed=2).requires_grad_()
    (grad,) = torch.autograd.grad(functional.gan_d_loss(real, fake), fake)
    (expected,) = torch.autograd.grad(two_call_d_loss(real, fake, 1.0, 0.0, "mean"), fake)
    assert_close(grad, expected)


class OpLog(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("requires_grad", [False, True])
def test_number_target_is_never_materialised(requires_grad):
    """A number target goes to the kernel as a number: no tensor is filled with it."""
    input = logits((64, 1)).requires_grad_(requires_grad)
    grad_output = torch.tensor(1.0)  # made here: backward() would make it with ones_like
    with OpLog() as log:
        loss = functional.bce_with_logits(input, 0.9)
        functional.gan_g_loss(input)
        functional.gan_d_loss(input, input)
        if requires_grad:
            loss.backward(grad_output)
    assert not [op for op in log.ops if "full" in op or "fill" in op or "ones" in op or "zeros" in op], log.ops
    assert any("imggen_fast.bce_with_logits" in op for op in log.ops)


@pytest.mark.parametrize("backend", ["cpp", "triton"])
def test_auto_backend_and_gradient_stored_only_when_needed(backend):
    assert backends.choose("cpu") == "cpp"
    input = logits((5, 3))
    op = kernel_op("bce_with_logits_forward")
    with imggen_fast.set_backend(backend):
        loss, unit_grad = op(input, None, 1.0, None, None, 1, False)
        loss_with_grad, unit_grad = op(input, None, 1.0, None, None, 1, True)
        assert torch.equal(loss, kernel_op("bce_with_logits")(input, None, 1.0, None, None, 1))
    assert torch.equal(loss, loss_with_grad)
    assert_close(unit_grad, expected_loss_and_grad(input, 1.0, grad_output=torch.tensor(1.0))[1])


@pytest.mark.parametrize("grad_scale", [1.0, 0.5])
def test_stored_gradient_survives_retain_graph_and_accumulates(grad_scale):
    # The backward takes over the stored gradient (scaled in place, or as is for a unit
    # grad_output) only when the graph is freed after it: a retained graph's second
    # backward must still see the stored values.
    input = logits((7, 5)).requires_grad_()
    real, fake = logits((4, 3), seed=2).requires_grad_(), logits((4, 3), seed=3).requires_grad_()
    target = soft_labels((7, 5))
    _, expected = expected_loss_and_grad(input, target, grad_output=torch.tensor(grad_scale))
    _, expected_real = expected_loss_and_grad(real, 1.0, grad_output=torch.tensor(grad_scale))
    _, expected_fake = expected_loss_and_grad(fake, 0.0, grad_output=torch.tensor(grad_scale))
    for loss, leaves, expected_grads in (
            (functional.bce_with_logits(input, target), (input,), (expected,)),
            (functional.gan_d_loss(real, fake), (real, fake), (expected_real, expected_fake))):
        loss = loss * grad_scale if grad_scale != 1.0 else loss
        loss.backward(retain_graph=True)
        first = [leaf.grad.clone() for leaf in leaves]
        loss.backward()
        for leaf, grad, expected_grad in zip(leaves, first, expected_grads):
            assert_close(grad, expected_grad)
            assert_close(leaf.grad, 2 * expected_grad)


def test_backward_takes_over_the_stored_gradient():
    # The stored gradient stays inside the autograd node (the public op returns the loss
    # alone, with or without autograd), and the backward returns it, scaled in place:
    # forward + backward allocate one buffer of the input's size per input, not two.
    from imggen_fast.bench.common import peak_memory_bytes

    shape = (256, 1024)
    input, target = logits(shape).requires_grad_(), soft_labels(shape)
    real, fake = logits(shape, seed=2).requires_grad_(), logits(shape, seed=3).requires_grad_()
    size = input.numel() * input.element_size()
    loss = kernel_op("bce_with_logits")(input, target, 0.0, None, None, 1)
    assert loss.shape == () and loss.requires_grad
    with torch.no_grad():
        assert torch.equal(loss.detach(), kernel_op("bce_with_logits")(input, target, 0.0, None, None, 1))
    for grad_output in (None, torch.tensor(0.5)):
        grads = {}
        peak = peak_memory_bytes(lambda: grads.update(bce=torch.autograd.grad(
            functional.bce_with_logits(input, target), input, grad_output)))
        assert peak < 1.5 * size, (grad_output, peak, size)
        peak = peak_memory_bytes(lambda: grads.update(gan=torch.autograd.grad(
            functional.gan_d_loss(real, fake), (real, fake), grad_output)))
        assert peak < 2.5 * size, (grad_output, peak, size)
        scale = torch.tensor(1.0 if grad_output is None else 0.5)
        assert_close(grads["bce"][0], expected_loss_and_grad(input, target, grad_output=scale)[1])
        assert_close(grads["gan"][1], expected_loss_and_grad(fake, 0.0, grad_output=scale)[1])


def opcheck_samples(dtype=torch.float32):
    """(op name, args) for every op: reductions, tensor and number targets, weights, layouts."""
    x, y = logits((4, 6), dtype), soft_labels((4, 6), dtype)
    weight, pos_weight = soft_labels((6,), dtype), soft_labels((4, 1), dtype) * 2
    x_cl = channels_last(logits((2, 3, 4, 5), dtype))
    samples = []
    for reduction in (0, 1, 2):
        samples += [
            ("bce_with_logits", (x, y, 0.0, None, None, reduction)),
            ("bce_with_logits", (x.clone().requires_grad_(), None, 0.9, weight, pos_weight, reduction)),
            ("bce_with_logits", (x_cl.clone().requires_grad_(), soft_labels((2, 3, 4, 5), dtype), 0.0, None, None,
                                 reduction)),
            ("bce_with_logits_forward", (x, y, 0.0, None, None, reduction, False)),
            ("bce_with_logits_forward", (x, None, 0.9, weight, pos_weight, reduction, True)),
            ("bce_with_logits_forward", (x_cl, soft_labels((2, 3, 4, 5), dtype), 0.0, None, None, reduction, True)),
            ("gan_d_loss", (x.clone().requires_grad_(), logits((4, 6), dtype, seed=3), 1.0, 0.0, reduction)),
            ("gan_d_loss_forward", (x, logits((4, 6), dtype, seed=3), 1.0, 0.0, reduction, True)),
        ]
    samples += [("gan_d_loss", (x, logits((9,), dtype), 0.9, 0.1, 1)),
                ("gan_d_loss_forward", (x, logits((9,), dtype), 0.9, 0.1, 1, False)),
                ("bce_with_logits_backward", (torch.tensor(0.5, dtype=dtype), [x, logits((9,), dtype)], 1)),
                ("bce_with_logits_backward", (logits((4, 6), dtype, seed=4), [x, y], 0))]
    return samples


def check_opcheck(backend, device):
    for name, args in opcheck_samples():
        args = tuple(arg.to(device) if isinstance(arg, torch.Tensor) else
                     [a.to(device) for a in arg] if isinstance(arg, list) else arg for arg in args)
        with imggen_fast.set_backend(backend):
            torch.library.opcheck(kernel_op(name), args)


@pytest.mark.parametrize("backend", ["cpp", "triton"])
def test_opcheck(backend):
    check_opcheck(backend, torch.device("cpu"))


@requires_cuda
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_opcheck_cuda(backend):
    check_opcheck(backend, torch.device("cuda"))


@pytest.mark.parametrize("backend", ["cpp", "reference"])
def test_gradcheck_and_double_backward(backend):
    """Float64: the gradient, and the second derivative (a penalty on the loss's gradient goes
    through the eager formula of the gradient)."""
    input = logits((3, 4), torch.float64, scale=2.0).requires_grad_()
    target = soft_labels((3, 4), torch.float64)
    weight, pos_weight = soft_labels((4,), torch.float64) + 0.5, soft_labels((3, 1), torch.float64) * 2
    fake = logits((5,), torch.float64, seed=3).requires_grad_()
    with imggen_fast.set_backend(backend):
        for reduction in REDUCTIONS:
            def bce(x, reduction=reduction):
                return functional.bce_with_logits(x, target, weight, reduction, pos_weight)

            def d_loss(real, fake, reduction=reduction):
                return functional.gan_d_loss(real, fake, 0.9, 0.1, reduction if reduction != "none" else "sum")

            assert torch.autograd.gradcheck(bce, (input,))
            assert torch.autograd.gradgradcheck(bce, (input,))
            assert torch.autograd.gradcheck(d_loss, (input, fake))
            assert torch.autograd.gradgradcheck(d_loss, (input, fake))


def test_torch_compile_fullgraph_matches_eager():
    input = logits((8, 33))
    target = soft_labels((8, 33))
    fake = logits((8, 33), seed=5)
    pos_weight = soft_labels((33,)) * 2

    def step(x, fake):
        return (functional.bce_with_logits(x * 2, target, pos_weight=pos_weight)
                + functional.gan_d_loss(x, fake, 0.9) + functional.gan_g_loss(fake, reduction="sum")
                + functional.bce_with_logits(x, 1.0, reduction="none").mean())

    def loss_and_grads(function):
        x, f = input.clone().requires_grad_(), fake.clone().requires_grad_()
        loss = function(x, f)
        return (loss, *torch.autograd.grad(loss, (x, f)))

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend="inductor")
    for actual, expected in zip(loss_and_grads(compiled), loss_and_grads(step)):
        torch.testing.assert_close(actual, expected, rtol=1e-6, atol=1e-7)


def test_autocast_runs_in_float32_as_torch():
    input, target = logits((4, 5), torch.bfloat16), soft_labels((4, 5), torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = functional.bce_with_logits(input, target)
        expected = F.binary_cross_entropy_with_logits(input, target)
    assert loss.dtype == expected.dtype == torch.float32
    assert_close(loss, expected)


def test_fallback_to_reference_warns_once_and_matches_torch():
    """Configurations the kernels do not cover go to the reference with a warning: a target
    of another dtype (torch promotes), a target that requires grad."""
    input = logits((4, 5)).requires_grad_()
    target64 = soft_labels((4, 5), torch.float64)
    backends._warned.clear()
    with pytest.warns(backends.FallbackWarning, match="target dtype torch.float64"):
        loss = functional.bce_with_logits(input, target64)
    assert loss.dtype == torch.float64
    torch.testing.assert_close(loss, F.binary_cross_entropy_with_logits(input, target64))
    target = soft_labels((4, 5)).requires_grad_()
    with pytest.warns(backends.FallbackWarning, match="gradient with respect to target"):
        loss = functional.bce_with_logits(input, target)
    actual = torch.autograd.grad(loss, (input, target))
    expected = torch.autograd.grad(F.binary_cross_entropy_with_logits(input, target), (input, target))
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a, e)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per reason
        functional.bce_with_logits(input, target64)


@pytest.mark.interpreter
def test_triton_sends_float64_to_the_reference():
    """The Triton kernels compute in float32: float64 calls go to the reference, warned once."""
    input, target = logits((4, 5), torch.float64), soft_labels((4, 5), torch.float64)
    backends._warned.clear()
    with imggen_fast.set_backend("triton"), pytest.warns(backends.FallbackWarning, match="not float64"):
        loss = functional.bce_with_logits(input, target)
        d_loss = functional.gan_d_loss(input, target)
    torch.testing.assert_close(loss, F.binary_cross_entropy_with_logits(input, target), rtol=1e-12, atol=0)
    torch.testing.assert_close(d_loss, two_call_d_loss(input, target, 1.0, 0.0, "mean"), rtol=1e-12, atol=0)


def test_nn_modules():
    weight, pos_weight = soft_labels((5,)), soft_labels((5,), seed=3) * 2
    ours = nn.BCEWithLogitsLoss(weight=weight, reduction="sum", pos_weight=pos_weight)
    theirs = torch.nn.BCEWithLogitsLoss(weight=weight, reduction="sum", pos_weight=pos_weight)
    assert isinstance(ours, torch.nn.BCEWithLogitsLoss)
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    input, target = logits((6, 5)), soft_labels((6, 5))
    assert_close(ours(input, target), theirs(input, target), scale=4.0)
    assert_close(nn.BCEWithLogitsLoss()(input, 0.0), theirs.__class__()(input, torch.zeros(6, 5)))
    gan = nn.GANLoss(real_label=0.9)
    real, fake = logits((8, 1)), logits((8, 1), seed=2)
    assert_close(gan.d_loss(real, fake), two_call_d_loss(real, fake, 0.9, 0.0, "mean"))
    assert_close(gan.g_loss(fake), F.binary_cross_entropy_with_logits(fake, torch.full_like(fake, 0.9)))
    assert "real_label=0.9" in repr(gan)


BAD_INPUTS = [
    (lambda x, y: (x, y[:2]), {}, ValueError, "target has shape"),
    (lambda x, y: (x, y[:1]), {}, ValueError, "target has shape"),
    (lambda x, y: (x.long(), y), {}, TypeError, "input must be a floating-point"),
    (lambda x, y: (x, y.long()), {}, TypeError, "target must be a floating-point"),
    (lambda x, y: (x, "1"), {}, TypeError, "target must be a tensor or a number"),
    (lambda x, y: (x, True), {}, TypeError, "target must be a tensor or a number"),
    (lambda x, y: ([1.0], y), {}, TypeError, "input must be a torch.Tensor"),
    (lambda x, y: (x, y), {"reduction": "avg"}, ValueError, "reduction must be one of"),
    (lambda x, y: (x, y), {"weight": torch.ones(3)}, ValueError, "weight of shape"),
    (lambda x, y: (x, y), {"weight": torch.ones(2, 4, 5)}, ValueError, "weight of shape"),
    (lambda x, y: (x, y), {"pos_weight": torch.ones(4, 1, 1)}, ValueError, "pos_weight of shape"),
    (lambda x, y: (x, y), {"weight": torch.ones(5).int()}, TypeError, "weight must be a floating-point"),
    (lambda x, y: (x, y), {"weight": torch.ones(5, device="meta")}, ValueError, "weight is on meta"),
    (lambda x, y: (x, y.to("meta")), {}, ValueError, "target is on meta"),
    (lambda x, y: (x, y), {"pos_weight": torch.ones(5, requires_grad=True)}, RuntimeError,
     "not differentiable with respect to pos_weight"),
]


@pytest.mark.parametrize("make_arguments,kwargs,error,message", BAD_INPUTS)
def test_bad_input_names_the_argument(make_arguments, kwargs, error, message):
    input, target = logits((4, 5)), soft_labels((4, 5))
    with pytest.raises(error, match=message):
        functional.bce_with_logits(*make_arguments(input, target), **kwargs)


GAN_BAD_INPUTS = [
    (lambda r, f: (r.int(), f), {}, TypeError, "real_logits must be a floating-point"),
    (lambda r, f: (r, f.double()), {}, TypeError, "fake_logits has dtype"),
    (lambda r, f: (r, f[:3]), {"reduction": "none"}, ValueError, "fake_logits has shape"),
    (lambda r, f: (r, f), {"reduction": "batchmean"}, ValueError, "reduction must be one of"),
    (lambda r, f: (r, f), {"real_label": "1"}, TypeError, "real_label must be a number, got str"),
]


@pytest.mark.parametrize("make_arguments,kwargs,error,message", GAN_BAD_INPUTS)
def test_gan_bad_input_names_the_argument(make_arguments, kwargs, error, message):
    real, fake = logits((4, 1)), logits((4, 1), seed=2)
    with pytest.raises(error, match=message):
        functional.gan_d_loss(*make_arguments(real, fake), **kwargs)
    with pytest.raises(TypeError, match="fake_logits must be a floating-point"):
        functional.gan_g_loss(fake.long())
