"""Public functions: validate the arguments (each error names the argument at fault,
before any kernel runs), then call the op, which picks the implementation."""

from __future__ import annotations

import torch

from . import _checks
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
