"""Binary cross-entropy with logits and the GAN losses (schemas in csrc/registration.cpp;
reduction as ``at::Reduction``: 0 none, 1 mean, 2 sum).

The public ops (their autograd and autocast: csrc/bce_with_logits_autograd.cpp):

* ``bce_with_logits(input, target, target_value, weight, pos_weight, reduction) -> loss``:
  ``F.binary_cross_entropy_with_logits``; ``target=None`` means every target is the number
  ``target_value`` (never materialised). weight and pos_weight broadcast to input's shape;
  the kernels read them periodically over input's memory, copying at most one period
  (``periodic_operand`` in csrc/layout.h).
* ``gan_d_loss(real_logits, fake_logits, real_label, fake_label, reduction) -> loss``:
  ``bce(real, real_label) + bce(fake, fake_label)``, one sweep over both.

The generator loss is ``bce_with_logits`` with a number target.

Their kernels (csrc/cpu, csrc/cuda, kernels/bce_with_logits.py):

* ``bce_with_logits_forward(..., compute_grad) -> (loss, grad_input)`` and
  ``gan_d_loss_forward(..., compute_grad) -> (loss, grad_real, grad_fake)``: with
  ``compute_grad`` the same sweep writes the gradient for ``grad_output = 1`` (1/N
  included for "mean"), which the public op's autograd keeps for its backward alone.
* ``bce_with_logits_backward(grad_output, unit_grads, reduction) -> grads``:
  ``grad_output * unit_grad`` for each stored gradient.

Why the backward scales a gradient stored by the forward instead of recomputing it from
(input, target): on a CPU the sweep is compute-bound (an exp, a log1p and a division per
element; the copy bandwidth is not the limit), and recomputing pays the exp and the
division a second time, while storing costs one more write and read of N elements (the
README's Results give the measured figures). The first backward scales the stored
gradient in place when it owns it, so no buffer of the input's size is allocated. Storing
keeps N more elements from forward to backward; at tens of millions of elements a fresh
buffer's page faults cost more than the sweep on the CPU, a size losses do not have in
training.

On a GPU the sweeps are memory-bound, so bytes decide. The "gradient of 1" shortcut never
fires there (it reads a CPU tensor only; a CUDA grad_output is never read on the host), so
the backward always scales. Per element of E bytes, forward + backward: storing reads x
and writes the gradient, then reads it and writes the result: 4E for a number target, 5E
with a target tensor; recomputing reads x, then x again and writes the result: 3E, 5E with
a target tensor (read twice). Recomputing saves a quarter for number targets only, and
only where bytes are the cost: the losses of these models (64 logits, a 64x1x30x30 patch
map, under 1 MB) are launch-bound on a GPU, where either design is one launch each way.
So the GPU keeps the stored gradient, the design every backend shares; a recomputing
backward would pay off for number-target losses of millions of elements, which these
models do not have.

The forward also saves (references to) its inputs, only for double backward
(``create_graph=True``, a penalty on the gradient of the loss), which goes through the
eager formula of the gradient.
"""

from __future__ import annotations

import torch

from .. import backends, reference
from ._registration import op, register_fake

REDUCTIONS = ("none", "mean", "sum")  # index = the at::Reduction value the ops take


def _loss_like(input: torch.Tensor, reduction: int) -> torch.Tensor:
    return torch.empty_like(input) if reduction == 0 else input.new_empty(())


def _gradient_like(input: torch.Tensor, compute_grad: bool) -> torch.Tensor:
    return torch.empty_like(input) if compute_grad else input.new_empty(0)


register_fake("bce_with_logits", lambda input, target, target_value, weight, pos_weight, reduction:
              _loss_like(input, reduction))
register_fake("gan_d_loss", lambda real_logits, fake_logits, real_label, fake_label, reduction:
              _loss_like(real_logits, reduction))
register_fake("bce_with_logits_forward", lambda input, target, target_value, weight, pos_weight, reduction,
              compute_grad: (_loss_like(input, reduction), _gradient_like(input, compute_grad)))
register_fake("gan_d_loss_forward", lambda real_logits, fake_logits, real_label, fake_label, reduction,
              compute_grad: (_loss_like(real_logits, reduction), _gradient_like(real_logits, compute_grad),
                             _gradient_like(fake_logits, compute_grad)))
register_fake("bce_with_logits_backward", lambda grad_output, unit_grads, reduction:
              [torch.empty_like(unit_grad) for unit_grad in unit_grads])

# The Triton kernels load and accumulate in float32: float64 would lose its precision.
_TRITON_FLOAT64 = "the Triton kernels compute in float32, not float64"


def _kernel_serves(name: str, input: torch.Tensor, unsupported: str | None) -> bool:
    """True when the chosen kernel serves a call on ``input``; False (the reference) where
    ``unsupported`` says why no kernel covers it, or for float64 where Triton was chosen."""
    backend = backends.choose(input.device.type)
    if backend == "reference":
        return False
    if unsupported is None and backend == "triton" and input.dtype == torch.float64:
        unsupported = _TRITON_FLOAT64
    return not backends.falls_back(name, backend, unsupported)


def bce_with_logits(input: torch.Tensor, target: torch.Tensor | None, target_value: float,
                    weight: torch.Tensor | None, pos_weight: torch.Tensor | None, reduction: int,
                    unsupported: str | None = None) -> torch.Tensor:
    """Arguments checked by the caller: input (*); target (*) or None for ``target_value``;
    weight, pos_weight broadcastable to (*) or None; reduction 0/1/2. ``unsupported``: why
    the kernels do not cover this call (it then goes to the reference). Returns () or (*)."""
    if not _kernel_serves("bce_with_logits", input, unsupported):
        return reference.bce_with_logits(input, target_value if target is None else target, weight,
                                         REDUCTIONS[reduction], pos_weight)
    return op("bce_with_logits")(input, target, target_value, weight, pos_weight, reduction)


def gan_d_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor, real_label: float, fake_label: float,
               reduction: int) -> torch.Tensor:
    """Arguments checked by the caller: equal dtypes and devices; equal shapes for reduction 0."""
    if not _kernel_serves("gan_d_loss", real_logits, None):
        return reference.gan_d_loss(real_logits, fake_logits, real_label, fake_label, REDUCTIONS[reduction])
    return op("gan_d_loss")(real_logits, fake_logits, real_label, fake_label, reduction)


# What each backend runs for these ops (``imggen-fast doctor`` prints it).
IMPLEMENTATIONS = {
    name: {"cpp": "one vectorized C++ sweep: loss and stored gradient",
           "cuda": "one CUDA C++ sweep: loss and stored gradient",
           "triton": "one Triton sweep: loss and stored gradient (float64 goes to the reference)"}
    for name in ("bce_with_logits", "gan_d_loss")
}
