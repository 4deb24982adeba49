"""Public functions: validate the arguments (each error names the argument at fault,
before any kernel runs), then call the op, which picks the implementation."""

from __future__ import annotations

import torch

from . import _checks
from .ops import bce_with_logits as _bce_with_logits
from .ops import leaky_relu as _leaky_relu


def leaky_relu_backward_from_output(grad_output: torch.Tensor, output: torch.Tensor,
                                    negative_slope: float = 0.01) -> torch.Tensor:
    """The gradient of ``output = leaky_relu(pre, negative_slope)`` with respect to ``pre``,
    computed from the activated ``output`` (valid for ``negative_slope >= 0``):
    ``grad_output * (output > 0 ? 1 : negative_slope)``.

    grad_output, output: the same shape (any), dtype and device. Returns a tensor of
    that shape in ``output``'s memory format. Differentiable in ``grad_output``."""
    name = "leaky_relu_backward_from_output"
    _checks.check_floating_tensor(grad_output, "grad_output", name)
    _checks.check_floating_tensor(output, "output", name)
    _checks.check_matches(grad_output, "grad_output", output, "output", name)
    negative_slope = _checks.check_negative_slope(negative_slope, name)
    return _leaky_relu.leaky_relu_backward_from_output(grad_output, output, negative_slope)


def _reduction_code(reduction: object, function: str) -> int:
    """The at::Reduction value (0 none, 1 mean, 2 sum) of a reduction name."""
    return _bce_with_logits.REDUCTIONS.index(
        _checks.check_choice(reduction, "reduction", _bce_with_logits.REDUCTIONS, function))


def _label(value: object, name: str, function: str) -> float:
    """A target given as a Python number (a label such as 1.0, or 0.9 for label smoothing)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{function}: {name} must be a tensor or a number, got {type(value).__name__}")
    return float(value)


def _check_same_device(value: torch.Tensor, name: str, input: torch.Tensor, function: str) -> None:
    if value.device != input.device:
        raise ValueError(f"{function}: {name} is on {value.device} but input is on {input.device}; "
                         "they must be on the same device")


def bce_with_logits(input: torch.Tensor, target: torch.Tensor | float, weight: torch.Tensor | None = None,
                    reduction: str = "mean", pos_weight: torch.Tensor | None = None) -> torch.Tensor:
    """Binary cross-entropy with logits, ``F.binary_cross_entropy_with_logits``'s contract:
    ``weight * ((1 - target) * input + l * softplus(-input))`` with
    ``l = 1 + (pos_weight - 1) * target``, reduced by ``reduction`` ("mean", "sum" or "none").

    input (*): logits, floating point. target (*): the same shape, or a Python number
    used for every element (never materialised as a tensor). weight, pos_weight: None or
    broadcastable to (*) (pos_weight is usually per class, (C,) for input (N, C)).
    Returns a scalar, or (*) in input's memory format for ``reduction="none"``.
    Differentiable with respect to input (and, through the reference, to target)."""
    name = "bce_with_logits"
    _checks.check_floating_tensor(input, "input", name)
    reduction_code = _reduction_code(reduction, name)
    unsupported = None
    target_value = 0.0
    if isinstance(target, torch.Tensor):
        _checks.check_floating_tensor(target, "target", name)
        if target.shape != input.shape:
            raise ValueError(f"{name}: target has shape {tuple(target.shape)} but input has {tuple(input.shape)}; "
                             "they must match (the target does not broadcast)")
        _check_same_device(target, "target", input, name)
        if target.dtype != input.dtype:
            unsupported = f"target dtype {target.dtype} differs from input dtype {input.dtype} (torch promotes)"
        elif target.requires_grad and torch.is_grad_enabled():
            unsupported = "the kernels do not compute the gradient with respect to target"
    else:
        target_value = _label(target, "target", name)
        target = None
    for operand, operand_name in ((weight, "weight"), (pos_weight, "pos_weight")):
        if operand is None:
            continue
        _checks.check_floating_tensor(operand, operand_name, name)
        _check_same_device(operand, operand_name, input, name)
        if operand.dim() > input.dim() or any(
                size not in (1, input_size) for size, input_size in zip(operand.shape[::-1], input.shape[::-1])):
            raise ValueError(f"{name}: {operand_name} of shape {tuple(operand.shape)} does not broadcast to input's "
                             f"shape {tuple(input.shape)}")
        if operand.requires_grad and torch.is_grad_enabled():
            raise RuntimeError(f"{name} is not differentiable with respect to {operand_name}; it must not require grad")
        if operand.dtype != input.dtype and unsupported is None:
            unsupported = f"{operand_name} dtype {operand.dtype} differs from input dtype {input.dtype}"
    return _bce_with_logits.bce_with_logits(input, target, target_value, weight, pos_weight, reduction_code,
                                            unsupported)


def gan_d_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor, real_label: float = 1.0,
               fake_label: float = 0.0, reduction: str = "mean") -> torch.Tensor:
    """The GAN discriminator loss ``bce(real_logits, real_label) + bce(fake_logits, fake_label)``,
    each term reduced over its own elements, in one sweep over both.

    real_logits (*), fake_logits (*'): the same dtype and device, any shapes (the same
    shape for ``reduction="none"``). Returns a scalar, or (*) for ``reduction="none"``.
    Differentiable with respect to both logits."""
    name = "gan_d_loss"
    _checks.check_floating_tensor(real_logits, "real_logits", name)
    _checks.check_floating_tensor(fake_logits, "fake_logits", name)
    reduction_code = _reduction_code(reduction, name)
    _checks.check_matches(fake_logits, "fake_logits", real_logits, "real_logits", name, shape=reduction_code == 0)
    return _bce_with_logits.gan_d_loss(real_logits, fake_logits, _label(real_label, "real_label", name),
                                       _label(fake_label, "fake_label", name), reduction_code)


def gan_g_loss(fake_logits: torch.Tensor, real_label: float = 1.0, reduction: str = "mean") -> torch.Tensor:
    """The non-saturating GAN generator loss ``bce(fake_logits, real_label)``.

    fake_logits (*). Returns a scalar, or (*) for ``reduction="none"``."""
    name = "gan_g_loss"
    _checks.check_floating_tensor(fake_logits, "fake_logits", name)
    return _bce_with_logits.bce_with_logits(fake_logits, None, _label(real_label, "real_label", name), None, None,
                                            _reduction_code(reduction, name))
