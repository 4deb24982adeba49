"""Binary cross-entropy with logits and the GAN losses.

The custom ops (C++ ``imggen_fast::`` for CPU and CUDA, Triton ``imggen_fast_triton::``,
same schemas; reduction as ``at::Reduction``: 0 none, 1 mean, 2 sum):

* ``bce_with_logits(input, target, target_value, weight, pos_weight, reduction)``:
  ``F.binary_cross_entropy_with_logits``; ``target=None`` means every target is the
  number ``target_value`` (never materialised). weight and pos_weight broadcast to
  input's shape; the kernels read them periodically over input's memory, copying at
  most one period (see ``periodic_operand`` in csrc/layout.h).
* ``bce_with_logits_backward(grad_output, input, target, target_value, weight,
  pos_weight, reduction)``: the gradient with respect to input.
* ``gan_d_loss(real_logits, fake_logits, real_label, fake_label, reduction)``:
  ``bce(real, real_label) + bce(fake, fake_label)``, one sweep over both.
* ``gan_d_loss_backward(...)``: both gradients, one sweep.

The generator loss is ``bce_with_logits`` with a number target.

Backward recomputes the gradient from (input, target) instead of storing the one the
forward sweep could write. MEASURE: numbers to be filled in.

Double backward (a penalty on the gradient of the loss) goes through the eager formula
of the gradient's derivative, registered as the backward ops' autograd.
"""

from __future__ import annotations

import functools

import torch

from .. import _build, backends, reference
from ._registration import cpp_op, register, triton_op

REDUCTIONS = ("none", "mean", "sum")  # index = the at::Reduction value the ops take
_MODULE = "bce_with_logits"


# --- fake implementations ------------------------------------------------------------------

def _fake_forward(input, target, target_value, weight, pos_weight, reduction):
    return torch.empty_like(input) if reduction == 0 else input.new_empty(())


def _fake_backward(grad_output, input, target, target_value, weight, pos_weight, reduction):
    return torch.empty_like(input)


def _fake_gan_d_loss(real_logits, fake_logits, real_label, fake_label, reduction):
    return torch.empty_like(real_logits) if reduction == 0 else real_logits.new_empty(())


def _fake_gan_d_loss_backward(grad_output, real_logits, fake_logits, real_label, fake_label, reduction):
    return torch.empty_like(real_logits), torch.empty_like(fake_logits)


# --- autograd of the forward ops: call the backward op of the same backend --------------------

def _not_differentiable(ctx, names: tuple[str, ...], op: str) -> None:
    """Raises if an input the kernels do not differentiate requires grad (as torch does for
    weight); ``imggen_fast.functional`` sends such calls to the reference before this."""
    for name, needed in zip(names, ctx.needs_input_grad):
        if needed and name:
            raise RuntimeError(f"{op} is not differentiable with respect to {name}")


def _bce_autograd(namespace: str):
    """(backward, setup_context) of ``<namespace>::bce_with_logits``."""

    def setup_context(ctx, inputs, output) -> None:
        input, target, target_value, weight, pos_weight, reduction = inputs
        ctx.save_for_backward(input, target, weight, pos_weight)
        ctx.target_value = target_value
        ctx.reduction = reduction

    def backward(ctx, grad_output):
        _not_differentiable(ctx, ("", "target", "", "weight", "pos_weight"), f"{namespace}::bce_with_logits")
        input, target, weight, pos_weight = ctx.saved_tensors
        grad_input = _op(namespace, "bce_with_logits_backward")(
            grad_output, input, target, ctx.target_value, weight, pos_weight, ctx.reduction)
        return grad_input, None, None, None, None, None

    return backward, setup_context


def _gan_d_loss_autograd(namespace: str):
    """(backward, setup_context) of ``<namespace>::gan_d_loss``."""

    def setup_context(ctx, inputs, output) -> None:
        real_logits, fake_logits, real_label, fake_label, reduction = inputs
        ctx.save_for_backward(real_logits, fake_logits)
        ctx.labels = (real_label, fake_label)
        ctx.reduction = reduction

    def backward(ctx, grad_output):
        real_logits, fake_logits = ctx.saved_tensors
        grad_real, grad_fake = _op(namespace, "gan_d_loss_backward")(
            grad_output, real_logits, fake_logits, *ctx.labels, ctx.reduction)
        return grad_real, grad_fake, None, None, None

    return backward, setup_context


@functools.cache
def _op(namespace: str, name: str):
    return getattr(getattr(torch.ops, namespace), name).default


# --- autograd of the backward ops (double backward), in eager torch ----------------------------

def _grad_of_grad(grad_grad_input, grad_output, input, target, weight, pos_weight, reduction):
    """For grad_input = c * w * (l * sigmoid(x) - p * y), with c = grad_output (reduction
    none) or grad_output / N (mean) or grad_output (sum), l = 1 + (p - 1) * y: the gradients
    of sum(grad_grad_input * grad_input) with respect to grad_output and input."""
    sigmoid = torch.sigmoid(input)
    pos = 1.0 if pos_weight is None else pos_weight
    log_weight = 1.0 + (pos - 1.0) * target
    weighted = grad_grad_input if weight is None else grad_grad_input * weight
    unscaled = weighted * (log_weight * sigmoid - pos * target)
    scale = grad_output
    if reduction != 0:
        count = input.numel() if reduction == 1 else 1
        scale = grad_output / count
        unscaled = (unscaled.sum() / count).reshape(grad_output.shape)
    return unscaled, scale * weighted * log_weight * sigmoid * (1.0 - sigmoid)


def _setup_bce_backward(ctx, inputs, output) -> None:
    grad_output, input, target, target_value, weight, pos_weight, reduction = inputs
    ctx.save_for_backward(grad_output, input, target, weight, pos_weight)
    ctx.target_value = target_value
    ctx.reduction = reduction


def _bce_backward_backward(ctx, grad_grad_input):
    _not_differentiable(ctx, ("", "", "target", "", "weight", "pos_weight"), "bce_with_logits_backward")
    grad_output, input, target, weight, pos_weight = ctx.saved_tensors
    target = ctx.target_value if target is None else target
    grad_grad_output, grad_input = _grad_of_grad(grad_grad_input, grad_output, input, target, weight, pos_weight,
                                                 ctx.reduction)
    return grad_grad_output, grad_input, None, None, None, None, None


def _setup_gan_d_loss_backward(ctx, inputs, output) -> None:
    grad_output, real_logits, fake_logits, real_label, fake_label, reduction = inputs
    ctx.save_for_backward(grad_output, real_logits, fake_logits)
    ctx.labels = (real_label, fake_label)
    ctx.reduction = reduction


def _gan_d_loss_backward_backward(ctx, grad_grad_real, grad_grad_fake):
    grad_output, real_logits, fake_logits = ctx.saved_tensors
    real_label, fake_label = ctx.labels
    grad_grad_output = None
    grads = []
    for grad_grad, logits, label in ((grad_grad_real, real_logits, real_label),
                                     (grad_grad_fake, fake_logits, fake_label)):
        if grad_grad is None:
            grads.append(None)
            continue
        part, grad = _grad_of_grad(grad_grad, grad_output, logits, label, None, None, ctx.reduction)
        grad_grad_output = part if grad_grad_output is None else grad_grad_output + part
        grads.append(grad)
    return grad_grad_output, grads[0], grads[1], None, None, None


# --- registration and backend choice -------------------------------------------------------------

_FORWARDS = {
    "bce_with_logits": (_fake_forward, _bce_autograd),
    "gan_d_loss": (_fake_gan_d_loss, _gan_d_loss_autograd),
}
_BACKWARDS = {
    "bce_with_logits_backward": (_fake_backward, _bce_backward_backward, _setup_bce_backward),
    "gan_d_loss_backward": (_fake_gan_d_loss_backward, _gan_d_loss_backward_backward, _setup_gan_d_loss_backward),
}


def _register_autocast(qualified_name: str) -> None:
    # torch's autocast runs binary_cross_entropy_with_logits in float32 (CPU and CUDA).
    for device_type in ("cpu", "cuda"):
        torch.library.register_autocast(qualified_name, device_type, torch.float32)


def _cpp_loader(name: str):
    fake, autograd = _FORWARDS[name]
    _build.on_load(lambda: _register_autocast(f"imggen_fast::{name}"))
    return cpp_op(name, fake, *autograd("imggen_fast"))


for _name, (_fake, _backward_backward, _setup) in _BACKWARDS.items():
    cpp_op(_name, _fake, _backward_backward, _setup)


@functools.cache
def _register_triton_backwards() -> None:
    """Fake and autograd of the Triton backward ops (once, after the kernels module is imported)."""
    for name, (fake, backward_backward, setup) in _BACKWARDS.items():
        register(f"imggen_fast_triton::{name}", fake, backward_backward, setup)


def _triton_loader(name: str):
    fake, autograd = _FORWARDS[name]
    load_forward = triton_op(_MODULE, name, fake, *autograd("imggen_fast_triton"))

    def load():
        op = load_forward()
        _register_triton_backwards()
        _register_autocast(f"imggen_fast_triton::{name}")
        return op

    return load


def _reference_bce(input, target, target_value, weight, pos_weight, reduction):
    return reference.bce_with_logits(input, target_value if target is None else target, weight,
                                     REDUCTIONS[reduction], pos_weight)


def _reference_gan_d_loss(real_logits, fake_logits, real_label, fake_label, reduction):
    return reference.gan_d_loss(real_logits, fake_logits, real_label, fake_label, REDUCTIONS[reduction])


_cpp_bce = _cpp_loader("bce_with_logits")
BCE_WITH_LOGITS = backends.Implementations(
    "bce_with_logits", reference=_reference_bce, cpp=_cpp_bce, cuda=_cpp_bce,
    triton=_triton_loader("bce_with_logits"))
_cpp_gan_d_loss = _cpp_loader("gan_d_loss")
GAN_D_LOSS = backends.Implementations(
    "gan_d_loss", reference=_reference_gan_d_loss, cpp=_cpp_gan_d_loss, cuda=_cpp_gan_d_loss,
    triton=_triton_loader("gan_d_loss"))


def bce_with_logits(input: torch.Tensor, target: torch.Tensor | None, target_value: float,
                    weight: torch.Tensor | None, pos_weight: torch.Tensor | None, reduction: int,
                    unsupported: str | None = None) -> torch.Tensor:
    """Arguments checked by the caller: input (*); target (*) or None for ``target_value``;
    weight, pos_weight broadcastable to (*) or None; reduction 0/1/2. ``unsupported``: why
    the kernels do not cover this call (it then goes to the reference). Returns () or (*)."""
    return BCE_WITH_LOGITS.select(input.device, unsupported)(input, target, target_value, weight, pos_weight,
                                                             reduction)


def gan_d_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor, real_label: float, fake_label: float,
               reduction: int) -> torch.Tensor:
    """Arguments checked by the caller: equal dtypes and devices; equal shapes for reduction 0."""
    return GAN_D_LOSS.select(real_logits.device)(real_logits, fake_logits, real_label, fake_label, reduction)
