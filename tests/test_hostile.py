"""Hostile and careless input to every op: each tensor argument as a strided, expanded and
offset view, infinite and NaN values, zero-size dimensions, torch.compile as the first
call in a process, bad arguments under torch.compile, and torch.func. Every case asserts
eager's result or a clear error naming the argument. (Threads with overlapping backend
contexts: tests/test_backends.py; modules used twice: tests/test_patch.py; a corrupted
kernel cache and a foreign lock: tests/test_build.py.)"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from helpers import run_python

import imggen_fast
from imggen_fast import functional

BACKENDS = ["cpp", "triton"]


@dataclasses.dataclass(frozen=True)
class Argument:
    """A tensor argument of an op: its shape and what values it takes."""

    shape: tuple[int, ...]
    values: str = "normal"  # normal | unit (in [0, 1]) | positive
    differentiable: bool = True


@dataclasses.dataclass(frozen=True)
class OpCase:
    name: str
    arguments: dict[str, Argument]
    fused: Callable
    eager: Callable


def _leaky(slope):
    return lambda tensor: F.leaky_relu(tensor, slope)


OP_CASES = [
    OpCase("conv2d_leaky_relu",
           {"input": Argument((2, 3, 6, 5)), "weight": Argument((4, 3, 3, 3)), "bias": Argument((4,))},
           lambda input, weight, bias: functional.conv2d_leaky_relu(input, weight, bias, 2, 1, negative_slope=0.2),
           lambda input, weight, bias: _leaky(0.2)(F.conv2d(input, weight, bias, 2, 1))),
    OpCase("conv_transpose2d_leaky_relu",
           {"input": Argument((2, 4, 3, 3)), "weight": Argument((4, 3, 4, 4)), "bias": Argument((3,))},
           lambda input, weight, bias: functional.conv_transpose2d_leaky_relu(input, weight, bias, 2, 1,
                                                                              negative_slope=0.2),
           lambda input, weight, bias: _leaky(0.2)(F.conv_transpose2d(input, weight, bias, 2, 1))),
    OpCase("linear_leaky_relu",
           {"input": Argument((5, 7)), "weight": Argument((6, 7)), "bias": Argument((6,))},
           lambda input, weight, bias: functional.linear_leaky_relu(input, weight, bias, 0.1),
           lambda input, weight, bias: _leaky(0.1)(F.linear(input, weight, bias))),
    OpCase("reparameterize_kl",
           {"mu": Argument((4, 6)), "logvar": Argument((4, 6)), "eps": Argument((4, 6), differentiable=False)},
           lambda mu, logvar, eps: functional.reparameterize_kl(mu, logvar, eps, beta=0.5),
           lambda mu, logvar, eps: (mu + eps * torch.exp(0.5 * logvar),
                                    0.5 * (-0.5 * (1 + logvar - mu**2 - logvar.exp()).sum(1)).mean())),
    OpCase("bce_with_logits",
           {"input": Argument((4, 6)), "target": Argument((4, 6), "unit", False),
            "weight": Argument((6,), "positive", False), "pos_weight": Argument((6,), "positive", False)},
           lambda input, target, weight, pos_weight: functional.bce_with_logits(input, target, weight,
                                                                                pos_weight=pos_weight),
           lambda input, target, weight, pos_weight: F.binary_cross_entropy_with_logits(input, target, weight,
                                                                                        pos_weight=pos_weight)),
    OpCase("gan_d_loss", {"real_logits": Argument((5, 1)), "fake_logits": Argument((5, 1))},
           lambda real_logits, fake_logits: functional.gan_d_loss(real_logits, fake_logits, 0.9, 0.1),
           lambda real_logits, fake_logits: (
               F.binary_cross_entropy_with_logits(real_logits, torch.full_like(real_logits, 0.9))
               + F.binary_cross_entropy_with_logits(fake_logits, torch.full_like(fake_logits, 0.1)))),
    # Training updates the running statistics in place: they are fresh per call here (a view
    # of them is covered in eval, which reads them, and in tests/test_batch_norm_leaky_relu.py).
    OpCase("batch_norm_leaky_relu",
           {"input": Argument((4, 3, 5, 6)), "weight": Argument((3,), "positive"), "bias": Argument((3,))},
           lambda input, weight, bias: functional.batch_norm_leaky_relu(input, torch.zeros(3), torch.ones(3), weight,
                                                                        bias, True, 0.1, 1e-5, 0.2),
           lambda input, weight, bias: _leaky(0.2)(F.batch_norm(input, torch.zeros(3), torch.ones(3), weight, bias,
                                                                True, 0.1, 1e-5))),
    OpCase("batch_norm_relu_eval",
           {"input": Argument((4, 3, 5, 6)), "running_mean": Argument((3,), differentiable=False),
            "running_var": Argument((3,), "positive", False), "weight": Argument((3,)), "bias": Argument((3,))},
           lambda input, running_mean, running_var, weight, bias: functional.batch_norm_leaky_relu(
               input, running_mean, running_var, weight, bias, False, 0.1, 1e-5, 0.0),
           lambda input, running_mean, running_var, weight, bias: F.relu(F.batch_norm(
               input, running_mean, running_var, weight, bias, False, 0.1, 1e-5))),
    OpCase("leaky_relu_backward_from_output",
           {"grad_output": Argument((3, 5, 4)), "output": Argument((3, 5, 4), differentiable=False)},
           lambda grad_output, output: functional.leaky_relu_backward_from_output(grad_output, output, 0.2),
           lambda grad_output, output: torch.where(output > 0, grad_output, grad_output * 0.2)),
]


def _values(shape: tuple[int, ...], kind: str, generator: torch.Generator) -> torch.Tensor:
    tensor = torch.randn(shape, generator=generator, dtype=torch.float64)
    if kind == "unit":
        tensor = torch.rand(shape, generator=generator, dtype=torch.float64)
    elif kind == "positive":
        tensor = tensor.abs() + 0.5
    return tensor.float()


def view_of(kind: str, argument: Argument, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(base, view): ``view`` has the argument's shape and is a ``kind`` view of ``base``,
    the leaf that gradients reach."""
    shape = argument.shape
    if kind == "contiguous":
        base = _values(shape, argument.values, generator)
        return base, base
    if kind == "strided":  # every other element of the last dim
        base = _values((*shape[:-1], 2 * shape[-1]), argument.values, generator)
        return base, base[..., ::2]
    if kind == "expanded":  # the first dim broadcast from one element
        base = _values((1, *shape[1:]), argument.values, generator)
        return base, base.expand(shape)
    if kind == "offset":  # a view starting five elements into its storage
        count = torch.Size(shape).numel()
        base = _values((count + 5,), argument.values, generator)
        return base, base[5:].view(shape)
    raise ValueError(kind)


VIEW_CASES = [(case, name, kind) for case in OP_CASES for name in case.arguments
              for kind in ("strided", "expanded", "offset")]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case,argument_name,kind", VIEW_CASES,
                         ids=[f"{case.name}-{name}-{kind}" for case, name, kind in VIEW_CASES])
def test_every_tensor_argument_as_a_view(backend, case, argument_name, kind):
    """One argument as a strided / expanded / offset view, the others contiguous: the
    outputs and the gradients reaching every base tensor equal eager's."""
    generator = torch.Generator().manual_seed(7)
    bases, views = {}, {}
    for name, argument in case.arguments.items():
        base, view = view_of(kind if name == argument_name else "contiguous", argument, generator)
        bases[name] = base.requires_grad_(argument.differentiable)
        views[name] = view

    def run(function):
        arguments = {name: (bases[name] if views[name] is bases[name] else view_of_base(name))
                     for name in case.arguments}
        outputs = function(**arguments)
        outputs = outputs if isinstance(outputs, tuple) else (outputs,)
        leaves = [bases[name] for name, argument in case.arguments.items() if argument.differentiable]
        total = sum((output * (index + 1.5)).sum() for index, output in enumerate(outputs))
        return [output.detach() for output in outputs], torch.autograd.grad(total, leaves)

    def view_of_base(name):
        # Rebuild the view from its base inside the graph, so the gradient reaches the base.
        base, view = bases[name], views[name]
        return base.as_strided(view.shape, view.stride(), view.storage_offset())

    with imggen_fast.set_backend(backend):
        fused_outputs, fused_grads = run(case.fused)
    eager_outputs, eager_grads = run(case.eager)
    for fused, eager in zip(fused_outputs + list(fused_grads), eager_outputs + list(eager_grads)):
        torch.testing.assert_close(fused, eager, rtol=1e-4, atol=1e-5)


# --- Infinite and NaN values ---------------------------------------------------------------

INF = float("inf")
EDGE_LOGITS = torch.tensor([INF, INF, INF, -INF, -INF, -INF, float("nan"), -100.0, 100.0, 0.0])
EDGE_TARGETS = torch.tensor([0.0, 0.5, 1.0, 0.0, 0.5, 1.0, 0.5, 1.0, 0.0, 0.5])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["none", "sum"])
@pytest.mark.parametrize("weighted", [False, True], ids=["plain", "weights"])
def test_bce_at_infinite_and_nan_logits_is_eagers(backend, reduction, weighted):
    """Eager's values at +-inf (NaN where its textbook form gives inf - inf), including the
    gradient. At x = -100 with target 1 the loss is 100 up to float32 rounding."""
    weight = torch.linspace(0.5, 2, EDGE_LOGITS.numel()) if weighted else None
    pos_weight = torch.tensor(2.0) if weighted else None
    logits = EDGE_LOGITS.clone().requires_grad_()
    with imggen_fast.set_backend(backend):
        fused = functional.bce_with_logits(logits, EDGE_TARGETS, weight, reduction, pos_weight)
        (fused_grad,) = torch.autograd.grad(fused.sum(), logits)
    eager = F.binary_cross_entropy_with_logits(logits, EDGE_TARGETS, weight, reduction=reduction,
                                               pos_weight=pos_weight)
    (eager_grad,) = torch.autograd.grad(eager.sum(), logits)
    torch.testing.assert_close(fused, eager, equal_nan=True)
    torch.testing.assert_close(fused_grad, eager_grad, equal_nan=True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gan_losses_at_infinite_logits_are_eagers(backend):
    for logit in (INF, -INF, float("nan")):
        fake = torch.tensor([logit, 1.0])
        with imggen_fast.set_backend(backend):
            g_loss = functional.gan_g_loss(fake, reduction="none")
            d_loss = functional.gan_d_loss(fake, fake.flip(0), reduction="none")
        torch.testing.assert_close(g_loss, F.binary_cross_entropy_with_logits(fake, torch.ones(2), reduction="none"),
                                   equal_nan=True)
        torch.testing.assert_close(d_loss, F.binary_cross_entropy_with_logits(fake, torch.ones(2), reduction="none")
                                   + F.binary_cross_entropy_with_logits(fake.flip(0), torch.zeros(2),
                                                                        reduction="none"), equal_nan=True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_layers_and_bottleneck_propagate_inf_and_nan_like_eager(backend):
    x = torch.tensor([[1.0, -INF, float("nan"), 2.0]])
    w = torch.eye(4)
    mu, logvar = torch.tensor([[0.0, INF, 1.0]]), torch.tensor([[0.0, 0.0, INF]])
    eps = torch.ones(1, 3)
    with imggen_fast.set_backend(backend):
        layer = functional.linear_leaky_relu(x, w, None, 0.2)
        z, kl = functional.reparameterize_kl(mu, logvar, eps)
    torch.testing.assert_close(layer, F.leaky_relu(F.linear(x, w), 0.2), equal_nan=True)
    torch.testing.assert_close(z, mu + eps * torch.exp(0.5 * logvar), equal_nan=True)
    torch.testing.assert_close(kl, (-0.5 * (1 + logvar - mu**2 - logvar.exp()).sum(1)).mean(), equal_nan=True)


# --- Zero-size dimensions ----------------------------------------------------------------

ZERO_SIZE_CASES = [
    ("conv2d, no input channels", lambda: (torch.randn(2, 0, 5, 5), torch.randn(3, 0, 3, 3), torch.randn(3)),
     lambda x, w, b: functional.conv2d_leaky_relu(x, w, b, negative_slope=0.2),
     lambda x, w, b: F.leaky_relu(F.conv2d(x, w, b), 0.2)),
    ("conv2d, empty batch", lambda: (torch.randn(0, 2, 5, 5), torch.randn(3, 2, 3, 3), torch.randn(3)),
     lambda x, w, b: functional.conv2d_leaky_relu(x, w, b, negative_slope=0.2),
     lambda x, w, b: F.leaky_relu(F.conv2d(x, w, b), 0.2)),
    ("conv_transpose2d, empty batch", lambda: (torch.randn(0, 2, 3, 3), torch.randn(2, 3, 4, 4), torch.randn(3)),
     lambda x, w, b: functional.conv_transpose2d_leaky_relu(x, w, b, 2, 1, negative_slope=0.2),
     lambda x, w, b: F.leaky_relu(F.conv_transpose2d(x, w, b, 2, 1), 0.2)),
    ("linear, no input features", lambda: (torch.randn(4, 0), torch.randn(3, 0), torch.randn(3)),
     lambda x, w, b: functional.linear_leaky_relu(x, w, b, 0.2),
     lambda x, w, b: F.leaky_relu(F.linear(x, w, b), 0.2)),
    ("linear, no output features", lambda: (torch.randn(4, 5), torch.randn(0, 5), torch.randn(0)),
     lambda x, w, b: functional.linear_leaky_relu(x, w, b, 0.2),
     lambda x, w, b: F.leaky_relu(F.linear(x, w, b), 0.2)),
    ("linear, empty batch", lambda: (torch.randn(0, 5), torch.randn(3, 5), torch.randn(3)),
     lambda x, w, b: functional.linear_leaky_relu(x, w, b, 0.2),
     lambda x, w, b: F.leaky_relu(F.linear(x, w, b), 0.2)),
    ("reparameterize_kl, no samples", lambda: (torch.randn(0, 4), torch.randn(0, 4), torch.randn(0, 4)),
     lambda mu, logvar, eps: functional.reparameterize_kl(mu, logvar, eps, reduction="sum"),
     lambda mu, logvar, eps: (mu + eps * torch.exp(0.5 * logvar),
                              (-0.5 * (1 + logvar - mu**2 - logvar.exp()).sum(1)).sum())),
    ("reparameterize_kl, no features", lambda: (torch.randn(3, 0), torch.randn(3, 0), torch.randn(3, 0)),
     lambda mu, logvar, eps: functional.reparameterize_kl(mu, logvar, eps, reduction="none"),
     lambda mu, logvar, eps: (mu + eps * torch.exp(0.5 * logvar),
                              -0.5 * (1 + logvar - mu**2 - logvar.exp()).sum(1))),
    ("batch_norm_leaky_relu, empty batch", lambda: (torch.randn(0, 3, 4, 4), torch.rand(3) + 0.5, torch.randn(3)),
     lambda x, w, b: functional.batch_norm_leaky_relu(x, torch.zeros(3), torch.ones(3), w, b, True, 0.1, 1e-5, 0.2),
     lambda x, w, b: F.leaky_relu(F.batch_norm(x, torch.zeros(3), torch.ones(3), w, b, True, 0.1, 1e-5), 0.2)),
    ("batch_norm_leaky_relu, no spatial elements", lambda: (torch.randn(2, 3, 0, 4), torch.rand(3), torch.randn(3)),
     lambda x, w, b: functional.batch_norm_leaky_relu(x, None, None, w, b, True, 0.1, 1e-5, 0.0),
     lambda x, w, b: F.relu(F.batch_norm(x, None, None, w, b, True, 0.1, 1e-5))),
    ("bce_with_logits, no elements", lambda: (torch.randn(0, 3), torch.rand(0, 3)),
     lambda x, t: functional.bce_with_logits(x, t),
     lambda x, t: F.binary_cross_entropy_with_logits(x, t)),
    ("gan_d_loss, no elements", lambda: (torch.randn(0), torch.randn(0)),
     lambda real, fake: functional.gan_d_loss(real, fake, reduction="sum"),
     lambda real, fake: (F.binary_cross_entropy_with_logits(real, torch.ones_like(real), reduction="sum")
                         + F.binary_cross_entropy_with_logits(fake, torch.zeros_like(fake), reduction="sum"))),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name,make,fused,eager", ZERO_SIZE_CASES, ids=[case[0] for case in ZERO_SIZE_CASES])
def test_zero_size_dimensions_match_eager(backend, name, make, fused, eager):
    # The noise and the targets are constants, as in training: the kernels serve the call.
    constants = ("reparameterize_kl" in name and 2) or ("bce_with_logits" in name and 1) or None
    tensors = [tensor.requires_grad_(constants is None or index < constants) for index, tensor in enumerate(make())]
    with imggen_fast.set_backend(backend):
        fused_outputs = fused(*tensors)
    eager_outputs = eager(*tensors)
    fused_outputs = fused_outputs if isinstance(fused_outputs, tuple) else (fused_outputs,)
    eager_outputs = eager_outputs if isinstance(eager_outputs, tuple) else (eager_outputs,)
    for got, want in zip(fused_outputs, eager_outputs):
        assert got.shape == want.shape
        torch.testing.assert_close(got, want, equal_nan=True)
    total = sum(output.sum() for output in fused_outputs)
    expected_total = sum(output.sum() for output in eager_outputs)
    leaves = [tensor for tensor in tensors if tensor.requires_grad]
    for got, want in zip(torch.autograd.grad(total, leaves, allow_unused=True, materialize_grads=True),
                         torch.autograd.grad(expected_total, leaves, allow_unused=True, materialize_grads=True)):
        torch.testing.assert_close(got, want, equal_nan=True)


# --- torch.compile as the first call, and bad arguments under it ---------------------------

COMPILE_FIRST = """
import json, warnings, torch, imggen_fast
from imggen_fast import functional
warnings.simplefilter("ignore")
x, w, b = torch.randn(2, 3, 6, 6), torch.randn(4, 3, 3, 3), torch.randn(4)
mu, logvar = torch.randn(4, 5), torch.randn(4, 5)

def step(x, w, b, mu, logvar):
    y = functional.conv2d_leaky_relu(x, w, b, 1, 1, negative_slope=0.2)
    z, kl = functional.reparameterize_kl(mu, logvar, torch.ones_like(mu))
    return y.sum() + functional.gan_g_loss(y.flatten(1)) + z.sum() + kl

{setup}
compiled = torch.compile(step, fullgraph=True)(x, w, b, mu, logvar)
print(json.dumps({{"difference": abs(compiled.item() - step(x, w, b, mu, logvar).item())}}))
"""
# The Triton convolution covers groups == 1 only: a grouped one falls back to the
# reference, with its warning, while compiling.
GROUPED_UNDER_TRITON = """imggen_fast.set_backend('triton')
w = torch.randn(3, 1, 3, 3)
b = torch.randn(3)

def step(x, w, b, mu, logvar):
    return functional.conv2d_leaky_relu(x, w, b, 1, 1, groups=3, negative_slope=0.2).sum()
"""


@pytest.mark.parametrize("setup", ["", "imggen_fast.set_backend('reference')", GROUPED_UNDER_TRITON],
                         ids=["kernels", "reference backend", "triton fallback"])
def test_torch_compile_as_the_first_call_in_a_process(setup):
    """No imggen_fast call before torch.compile(fullgraph=True): the kernels are loaded (and
    reference fallbacks warned about) while compiling, and the result is eager's."""
    result = run_python(COMPILE_FIRST.format(setup=setup), env={"TRITON_INTERPRET": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads(result.stdout.splitlines()[-1])["difference"] < 1e-3


BAD_UNDER_COMPILE = [
    (lambda x: functional.linear_leaky_relu(x, torch.randn(3, 5)), ValueError, "input's last dim must be"),
    (lambda x: functional.linear_leaky_relu(x, torch.randn(3, 4), negative_slope=-1.0), ValueError,
     "negative_slope must be finite and >= 0"),
    (lambda x: functional.bce_with_logits(x, torch.rand(2, 2)), ValueError, "target has shape"),
    (lambda x: functional.reparameterize_kl(x, x, beta=-1.0), ValueError, "beta must be finite and >= 0"),
]


@pytest.mark.parametrize("call,error,message", BAD_UNDER_COMPILE, ids=[case[2] for case in BAD_UNDER_COMPILE])
def test_bad_arguments_raise_the_same_clear_error_under_compile(call, error, message):
    """Without fullgraph, dynamo runs the failing check eagerly: the same exception. With
    fullgraph=True dynamo reports any exception raised in traced code as its own error,
    which carries ours, message and all."""
    x = torch.randn(2, 4)
    with pytest.raises(error, match=message):
        call(x)
    torch._dynamo.reset()
    with pytest.raises(error, match=message):
        torch.compile(call)(x)
    torch._dynamo.reset()
    with pytest.raises(Exception, match=message):
        torch.compile(call, fullgraph=True)(x)


# --- torch.func -------------------------------------------------------------------------------


def test_torch_func_is_refused_clearly_and_works_on_the_reference():
    """The ops' autograd is C++ (one formula per op, for its per-call cost), which
    torch.func's transforms cannot enter: they raise. The reference backend is eager
    torch, which they can."""
    x, w = torch.randn(3, 4), torch.randn(5, 4)

    def loss(x):
        return functional.linear_leaky_relu(x, w, None, 0.2).sum()

    with pytest.raises(RuntimeError, match="functorch"):
        torch.func.grad(loss)(x)
    with imggen_fast.set_backend("reference"):
        gradient = torch.func.grad(loss)(x)
    torch.testing.assert_close(gradient, torch.func.grad(lambda x: F.leaky_relu(F.linear(x, w), 0.2).sum())(x))
