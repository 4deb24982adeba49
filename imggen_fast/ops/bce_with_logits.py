"""Binary cross-entropy with logits and the GAN losses.

The custom ops (C++ ``imggen_fast::`` for CPU and CUDA, Triton ``imggen_fast_triton::``,
same schemas; reduction as ``at::Reduction``: 0 none, 1 mean, 2 sum):

* ``bce_with_logits(input, target, target_value, weight, pos_weight, reduction,
  compute_grad) -> (loss, grad_input)``: ``F.binary_cross_entropy_with_logits``;
  ``target=None`` means every target is the number ``target_value`` (never
  materialised). weight and pos_weight broadcast to input's shape; the kernels read them
  periodically over input's memory, copying at most one period (``periodic_operand`` in
  csrc/layout.h). With ``compute_grad`` the same sweep writes ``grad_input``, the
  gradient for ``grad_output = 1`` (1/N included for "mean"); else it is empty. When
  the C++ op's autograd records the call, the stored gradient is kept for the backward
  alone (which scales it in place and returns it) and the caller gets an empty tensor
  in its place: csrc/bce_with_logits_autograd.cpp says why.
* ``gan_d_loss(real_logits, fake_logits, real_label, fake_label, reduction,
  compute_grad) -> (loss, grad_real, grad_fake)``: ``bce(real, real_label) +
  bce(fake, fake_label)``, one sweep over both.
* ``bce_with_logits_backward(grad_output, unit_grads, reduction) -> grads``: the backward
  of both, ``grad_output * unit_grad`` for each stored gradient.

The generator loss is ``bce_with_logits`` with a number target.

Why the backward scales a gradient stored by the forward instead of recomputing it from
(input, target): on the CPU the sweep is compute-bound (an exp, a log1p and a division per
element; the copy bandwidth is not the limit), and recomputing pays the exp and a
division a second time. Measured on the C++ kernels (fp32, 1M elements, AMD EPYC Zen 1 at
2 GHz, the CPU time of one thread: the machine was shared, so CPU time rather than wall
time), forward + backward: recomputing, 1.79 + 1.76 = 3.55 ms with a tensor target and
2.13 + 1.93 = 4.06 ms with a number target; storing (the forward writes the gradient, the
backward scales it), 2.61 + 0.56 = 3.17 ms and 2.44 + 0.56 = 3.00 ms. Bytes (N elements):
with a tensor target 5N either way (storing: the forward reads x, y and writes g, the
backward reads g and writes the result; recomputing: the forward reads x, y, the backward
reads x, y and writes); with a number target 4N stored against 3N recomputed. Memory:
storing keeps N more elements from forward to backward, and allocates one more buffer of N:
at 16M fp32 elements a fresh 64 MB buffer costs 21-28 ms of page faults on the test
machine (torch's CPU allocator does not cache, and glibc returns blocks above 32 MB to
the system), more than the 15 ms forward sweep itself, so at that size storing loses
(forward with the gradient 45.9 ms against 15.2 ms without, 2 threads). Storing is kept
for the sizes losses have in training (up to a few MB, which glibc recycles). On a GPU,
where these sweeps are memory-bound, recomputing would move a quarter fewer bytes for a
number target; that is not measurable here, and one design serves every backend.

The forward also saves (references to) its inputs, only for double backward
(``create_graph=True``, a penalty on the gradient of the loss), which goes through the
eager formula of the gradient.
"""

from __future__ import annotations

import functools

import torch

from .. import _build, backends, reference
from ._registration import cpp_op, register, triton_op

REDUCTIONS = ("none", "mean", "sum")  # index = the at::Reduction value the ops take
_MODULE = "bce_with_logits"


# --- fake implementations ------------------------------------------------------------------

def _fake_gradient(input, compute_grad):
    return torch.empty_like(input) if compute_grad else input.new_empty(0)


def _fake_forward(input, target, target_value, weight, pos_weight, reduction, compute_grad):
    loss = torch.empty_like(input) if reduction == 0 else input.new_empty(())
    return loss, _fake_gradient(input, compute_grad)


def _fake_gan_d_loss(real_logits, fake_logits, real_label, fake_label, reduction, compute_grad):
    loss = torch.empty_like(real_logits) if reduction == 0 else real_logits.new_empty(())
    return loss, _fake_gradient(real_logits, compute_grad), _fake_gradient(fake_logits, compute_grad)


def _fake_backward(grad_output, unit_grads, reduction):
    return [torch.empty_like(unit_grad) for unit_grad in unit_grads]


# --- autograd of the forward ops -------------------------------------------------------------

def _eager_grad(grad_output, input, target, weight, pos_weight, reduction):
    """grad_output * d loss / d input in differentiable eager torch: w * (l * sigmoid(x) - p * y),
    l = 1 + (p - 1) * y, divided by N for "mean". For double backward only."""
    sigmoid = torch.sigmoid(input)
    if pos_weight is None:
        unit = sigmoid - target
    else:
        unit = (1.0 + (pos_weight - 1.0) * target) * sigmoid - pos_weight * target
    if weight is not None:
        unit = unit * weight
    if reduction == 1:
        unit = unit / input.numel()
    return grad_output * unit


def _not_differentiable(ctx, names: tuple[str, ...], op: str) -> None:
    """Raises if an input the kernels do not differentiate requires grad (as torch does for
    weight); ``imggen_fast.functional`` sends such calls to the reference before this."""
    for name, needed in zip(names, ctx.needs_input_grad):
        if needed and name:
            raise RuntimeError(f"{op} is not differentiable with respect to {name}")


def _bce_autograd(namespace: str):
    """(backward, setup_context) of ``<namespace>::bce_with_logits``."""

    def setup_context(ctx, inputs, output) -> None:
        input, target, target_value, weight, pos_weight, reduction, compute_grad = inputs
        _, unit_grad = output
        ctx.mark_non_differentiable(unit_grad)
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(unit_grad, input, target, weight, pos_weight)
        ctx.target_value = target_value
        ctx.reduction = reduction
        ctx.compute_grad = compute_grad

    def backward(ctx, grad_loss, _):
        _not_differentiable(ctx, ("", "target", "", "weight", "pos_weight"), f"{namespace}::bce_with_logits")
        if grad_loss is None:
            return None, None, None, None, None, None, None
        unit_grad, input, target, weight, pos_weight = ctx.saved_tensors
        if ctx.compute_grad and not torch.is_grad_enabled():
            (grad_input,) = _op(namespace, "bce_with_logits_backward")(grad_loss, [unit_grad], ctx.reduction)
        else:  # double backward, or a direct call that did not store the gradient
            grad_input = _eager_grad(grad_loss, input, ctx.target_value if target is None else target, weight,
                                     pos_weight, ctx.reduction)
        return grad_input, None, None, None, None, None, None

    return backward, setup_context


def _gan_d_loss_autograd(namespace: str):
    """(backward, setup_context) of ``<namespace>::gan_d_loss``."""

    def setup_context(ctx, inputs, output) -> None:
        real_logits, fake_logits, real_label, fake_label, reduction, compute_grad = inputs
        _, grad_real, grad_fake = output
        ctx.mark_non_differentiable(grad_real, grad_fake)
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(grad_real, grad_fake, real_logits, fake_logits)
        ctx.labels = (real_label, fake_label)
        ctx.reduction = reduction
        ctx.compute_grad = compute_grad

    def backward(ctx, grad_loss, _real, _fake):
        if grad_loss is None:
            return None, None, None, None, None, None
        grad_real, grad_fake, real_logits, fake_logits = ctx.saved_tensors
        if ctx.compute_grad and not torch.is_grad_enabled():
            grad_real, grad_fake = _op(namespace, "bce_with_logits_backward")(grad_loss, [grad_real, grad_fake],
                                                                              ctx.reduction)
        else:  # double backward, or a direct call that did not store the gradients
            grad_real, grad_fake = (_eager_grad(grad_loss, logits, label, None, None, ctx.reduction)
                                    for logits, label in zip((real_logits, fake_logits), ctx.labels))
        return grad_real, grad_fake, None, None, None, None

    return backward, setup_context


@functools.cache
def _op(namespace: str, name: str):
    return getattr(getattr(torch.ops, namespace), name).default


# --- registration and backend choice -------------------------------------------------------------

_FORWARDS = {
    "bce_with_logits": (_fake_forward, _bce_autograd),
    "gan_d_loss": (_fake_gan_d_loss, _gan_d_loss_autograd),
}
_BACKWARD = "bce_with_logits_backward"


def _register_autocast(qualified_name: str) -> None:
    # torch's autocast runs binary_cross_entropy_with_logits in float32 (CPU and CUDA).
    for device_type in ("cpu", "cuda"):
        torch.library.register_autocast(qualified_name, device_type, torch.float32)


def _cpp_loader(name: str):
    # The C++ ops' autograd is C++ (csrc/bce_with_logits_autograd.cpp), the same formula as
    # the Triton ops' Python one above: the Python path of register_autograd cost more
    # than eager's whole forward and backward at a DCGAN batch of 64 logits.
    fake, _ = _FORWARDS[name]
    _build.on_load(lambda: _register_autocast(f"imggen_fast::{name}"))
    return cpp_op(name, fake)


# The backward op has no autograd of its own: it runs only in a first backward (a double
# backward takes the eager formula), and without one a call skips the Python autograd
# layer (measured at 64 elements: 31 -> 10 us per call on the 2 GHz test machine).
cpp_op(_BACKWARD, _fake_backward)


@functools.cache
def _register_triton_backward() -> None:
    """Fake of the Triton backward op (once, after the kernels module is imported)."""
    register(f"imggen_fast_triton::{_BACKWARD}", _fake_backward)


def _triton_loader(name: str):
    fake, autograd = _FORWARDS[name]
    load_forward = triton_op(_MODULE, name, fake, *autograd("imggen_fast_triton"))

    def load():
        op = load_forward()
        _register_triton_backward()
        _register_autocast(f"imggen_fast_triton::{name}")
        return op

    return load


def _reference_bce(input, target, target_value, weight, pos_weight, reduction, compute_grad):
    loss = reference.bce_with_logits(input, target_value if target is None else target, weight,
                                     REDUCTIONS[reduction], pos_weight)
    return loss, None


def _reference_gan_d_loss(real_logits, fake_logits, real_label, fake_label, reduction, compute_grad):
    return reference.gan_d_loss(real_logits, fake_logits, real_label, fake_label, REDUCTIONS[reduction]), None, None


_cpp_bce = _cpp_loader("bce_with_logits")
BCE_WITH_LOGITS = backends.Implementations(
    "bce_with_logits", reference=_reference_bce, cpp=_cpp_bce, cuda=_cpp_bce,
    triton=_triton_loader("bce_with_logits"))
_cpp_gan_d_loss = _cpp_loader("gan_d_loss")
GAN_D_LOSS = backends.Implementations(
    "gan_d_loss", reference=_reference_gan_d_loss, cpp=_cpp_gan_d_loss, cuda=_cpp_gan_d_loss,
    triton=_triton_loader("gan_d_loss"))


# The Triton kernels load and accumulate in float32: float64 would lose its precision.
_TRITON_FLOAT64 = "the Triton kernels compute in float32, not float64"


def _select(implementations: backends.Implementations, input: torch.Tensor, unsupported: str | None = None):
    """The implementation serving a call on ``input``: the reference where ``unsupported``
    says why the kernels do not cover it, or for float64 where Triton was chosen."""
    if unsupported is None and input.dtype == torch.float64:
        return implementations.select(input.device, _TRITON_FLOAT64, uncovered_by=("triton",))
    return implementations.select(input.device, unsupported)


def bce_with_logits(input: torch.Tensor, target: torch.Tensor | None, target_value: float,
                    weight: torch.Tensor | None, pos_weight: torch.Tensor | None, reduction: int,
                    unsupported: str | None = None) -> torch.Tensor:
    """Arguments checked by the caller: input (*); target (*) or None for ``target_value``;
    weight, pos_weight broadcastable to (*) or None; reduction 0/1/2. ``unsupported``: why
    the kernels do not cover this call (it then goes to the reference). Returns () or (*).
    The gradient is stored by the forward sweep only when autograd will need it."""
    compute_grad = input.requires_grad and torch.is_grad_enabled()
    return _select(BCE_WITH_LOGITS, input, unsupported)(input, target, target_value, weight, pos_weight, reduction,
                                                        compute_grad)[0]


def gan_d_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor, real_label: float, fake_label: float,
               reduction: int) -> torch.Tensor:
    """Arguments checked by the caller: equal dtypes and devices; equal shapes for reduction 0."""
    compute_grad = (real_logits.requires_grad or fake_logits.requires_grad) and torch.is_grad_enabled()
    return _select(GAN_D_LOSS, real_logits)(real_logits, fake_logits, real_label, fake_label, reduction,
                                            compute_grad)[0]
