"""Public functions: validate the arguments (each error names the argument at fault,
before any kernel runs), then call the op, which picks the implementation."""

from __future__ import annotations

import math

import torch

from . import _checks, backends, reference
from .ops import layer_leaky_relu as _layers
from .ops import batch_norm_leaky_relu as _batch_norm_leaky_relu
from .ops import bce_with_logits as _bce_with_logits
from .ops import leaky_relu as _leaky_relu
from .ops import reparameterize_kl as _reparameterize_kl


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


def _check_layer_tensors(input: object, weight: object, function: str, weight_dim: int) -> None:
    _checks.check_floating_tensor(input, "input", function)
    _checks.check_floating_tensor(weight, "weight", function)
    _checks.check_matches(weight, "weight", input, "input", function, shape=False,
                          dtype=not _checks.autocasting(input))
    if weight.dim() != weight_dim:
        raise ValueError(f"{function}: weight must be {weight_dim}-D, got shape {tuple(weight.shape)}")


def _check_image_input(input: torch.Tensor, function: str) -> None:
    if input.dim() not in (3, 4):
        raise ValueError(f"{function}: input must be 4-D (N, C, H, W) or 3-D (C, H, W), got shape "
                         f"{tuple(input.shape)}")


def _check_output_size(height: int, width: int, input: torch.Tensor, function: str) -> None:
    if height <= 0 or width <= 0:
        raise ValueError(f"{function}: input of shape {tuple(input.shape)} gives an output of {height} x {width} "
                         "with these weight, stride, padding and dilation; it must be at least 1 x 1")


def conv_transpose2d_leaky_relu(input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                                stride=1, padding=0, output_padding=0, groups: int = 1, dilation=1,
                                negative_slope: float = 0.01) -> torch.Tensor:
    """``leaky_relu(conv_transpose2d(input, weight, bias, stride, padding, output_padding, groups,
    dilation), negative_slope)`` fused: the arguments and defaults of
    ``torch.nn.functional.conv_transpose2d`` plus ``negative_slope`` (>= 0; 0 is ReLU).

    input (N, C_in, H, W) or (C_in, H, W); weight (C_in, C_out / groups, kH, kW); bias
    (C_out,) or None. Returns (N, C_out, H_out, W_out) in the input's memory format.
    Keeps input, weight and the output for backward, never the pre-activation."""
    name = "conv_transpose2d_leaky_relu"
    _check_layer_tensors(input, weight, name, 4)
    _check_image_input(input, name)
    if weight.shape[0] != input.shape[-3]:
        raise ValueError(f"{name}: weight must have shape (C_in={input.shape[-3]}, C_out / groups, kH, kW), got "
                         f"{tuple(weight.shape)}")
    groups = _checks.check_groups(groups, weight.shape[0], None, name)
    _checks.check_optional_bias(bias, input, weight.shape[1] * groups, name)
    stride = _checks.pair(stride, "stride", name, 1)
    padding = _checks.pair(padding, "padding", name, 0)
    dilation = _checks.pair(dilation, "dilation", name, 1)
    output_padding = _checks.pair(output_padding, "output_padding", name, 0)
    for axis in range(2):
        if output_padding[axis] >= max(stride[axis], dilation[axis]):
            raise ValueError(f"{name}: output_padding must be smaller than stride or dilation, got "
                             f"output_padding={output_padding}, stride={stride}, dilation={dilation}")
    size = _checks.convolution_output_size(input.shape[-2:], weight.shape[2:], stride, padding, dilation,
                                           output_padding)
    _check_output_size(*size, input, name)
    negative_slope = _checks.check_negative_slope(negative_slope, name)
    if input.dim() == 3:
        return _layers.conv_transpose2d_leaky_relu(input.unsqueeze(0), weight, bias, stride, padding, output_padding,
                                                   groups, dilation, negative_slope, size).squeeze(0)
    return _layers.conv_transpose2d_leaky_relu(input, weight, bias, stride, padding, output_padding, groups,
                                               dilation, negative_slope, size)


def conv2d_leaky_relu(input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, stride=1,
                      padding=0, dilation=1, groups: int = 1, negative_slope: float = 0.01) -> torch.Tensor:
    """``leaky_relu(conv2d(input, weight, bias, stride, padding, dilation, groups), negative_slope)``
    fused: the arguments and defaults of ``torch.nn.functional.conv2d`` (``padding`` may be
    ``"valid"`` or ``"same"``) plus ``negative_slope`` (>= 0; 0 is ReLU).

    input (N, C_in, H, W) or (C_in, H, W); weight (C_out, C_in / groups, kH, kW); bias
    (C_out,) or None. Returns (N, C_out, H_out, W_out) in the input's memory format."""
    name = "conv2d_leaky_relu"
    _check_layer_tensors(input, weight, name, 4)
    _check_image_input(input, name)
    groups = _checks.check_groups(groups, input.shape[-3], weight.shape[0], name)
    if weight.shape[1] * groups != input.shape[-3]:
        raise ValueError(f"{name}: weight must have shape (C_out, C_in / groups = {input.shape[-3] // groups}, kH, "
                         f"kW), got {tuple(weight.shape)}")
    _checks.check_optional_bias(bias, input, weight.shape[0], name)
    stride = _checks.pair(stride, "stride", name, 1)
    dilation = _checks.pair(dilation, "dilation", name, 1)
    negative_slope = _checks.check_negative_slope(negative_slope, name)
    if padding == "valid":
        padding = [0, 0]
    elif padding == "same":
        if stride != [1, 1]:
            raise ValueError(f"{name}: padding='same' needs stride 1, got stride={stride}")
        totals = [dilation[axis] * (weight.shape[2 + axis] - 1) for axis in range(2)]
        if any(total % 2 for total in totals):
            # Even kernels need asymmetric padding, which the kernels do not take.
            backends.falls_back(name, backends.choose(input.device.type),
                                "padding='same' with an even kernel (asymmetric padding) is not covered")
            return reference.conv2d_leaky_relu(input, weight, bias, stride, "same", dilation, groups, negative_slope)
        padding = [total // 2 for total in totals]
    else:
        padding = _checks.pair(padding, "padding", name, 0)
    size = _checks.convolution_output_size(input.shape[-2:], weight.shape[2:], stride, padding, dilation)
    _check_output_size(*size, input, name)
    if input.dim() == 3:
        return _layers.conv2d_leaky_relu(input.unsqueeze(0), weight, bias, stride, padding, dilation, groups,
                                         negative_slope, size).squeeze(0)
    return _layers.conv2d_leaky_relu(input, weight, bias, stride, padding, dilation, groups, negative_slope, size)


def linear_leaky_relu(input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                      negative_slope: float = 0.01) -> torch.Tensor:
    """``leaky_relu(linear(input, weight, bias), negative_slope)`` fused.

    input (*, in_features); weight (out_features, in_features); bias (out_features,) or
    None. Returns (*, out_features)."""
    name = "linear_leaky_relu"
    _check_layer_tensors(input, weight, name, 2)
    if input.dim() == 0 or input.shape[-1] != weight.shape[1]:
        raise ValueError(f"{name}: input's last dim must be in_features={weight.shape[1]} (weight is "
                         f"{tuple(weight.shape)}), got input of shape {tuple(input.shape)}")
    _checks.check_optional_bias(bias, input, weight.shape[0], name)
    negative_slope = _checks.check_negative_slope(negative_slope, name)
    return _layers.linear_leaky_relu(input, weight, bias, negative_slope)


def reparameterize_kl(mu: torch.Tensor, logvar: torch.Tensor, eps: torch.Tensor | None = None, *,
                      beta: float = 1.0, reduction: str = "batchmean",
                      generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The VAE bottleneck in one pass: ``z = mu + eps * exp(0.5 * logvar)`` and
    ``kl = beta * (-0.5) * sum(1 + logvar - mu^2 - exp(logvar))`` over every dim but the
    first, reduced by ``reduction``: ``"batchmean"`` (mean over the batch), ``"sum"``,
    ``"mean"`` (over all elements) or ``"none"`` (one value per sample).

    mu, logvar, eps: (N, *), the same shape, dtype and device. ``eps=None`` makes the
    noise inside the kernel (Philox4x32-10 + Box-Muller, seeded from ``generator`` or
    torch's default generator of mu's device, so ``torch.manual_seed`` makes it
    repeatable); the backward regenerates it instead of storing it. A given ``eps`` is
    used as is. Returns z (N, *) in mu's memory format and kl: a scalar, or (N,) for
    ``reduction="none"``. Differentiable in mu and logvar."""
    name = "reparameterize_kl"
    _checks.check_floating_tensor(mu, "mu", name)
    _checks.check_floating_tensor(logvar, "logvar", name)
    _checks.check_matches(logvar, "logvar", mu, "mu", name)
    if mu.dim() == 0:
        raise ValueError(f"{name}: mu must have a batch dimension, shape (N, *); got a 0-d tensor")
    if eps is not None:
        _checks.check_floating_tensor(eps, "eps", name)
        _checks.check_matches(eps, "eps", mu, "mu", name)
    beta = _checks.real_number(beta, "beta", name)
    if not 0 <= beta < float("inf"):
        raise ValueError(f"{name}: beta must be finite and >= 0 (it weights a divergence), got {beta}")
    _checks.check_choice(reduction, "reduction", _reparameterize_kl.REDUCTIONS, name)
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"{name}: generator must be a torch.Generator or None, got {type(generator).__name__}")
    return _reparameterize_kl.reparameterize_kl(mu, logvar, eps, float(beta), reduction, generator)
def _reduction_code(reduction: object, function: str) -> int:
    """The at::Reduction value (0 none, 1 mean, 2 sum) of a reduction name."""
    return _bce_with_logits.REDUCTIONS.index(
        _checks.check_choice(reduction, "reduction", _bce_with_logits.REDUCTIONS, function))


def _label(value: object, name: str, function: str, expected: str = "a number") -> float:
    """A target given as a Python number (a label such as 1.0, or 0.9 for label smoothing);
    ``expected`` says what the argument may be, for the error."""
    return _checks.real_number(value, name, function, expected)


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
        _checks.check_matches(target, "target", input, "input", name, shape=False, dtype=False)
        if target.dtype != input.dtype:
            unsupported = f"target dtype {target.dtype} differs from input dtype {input.dtype} (torch promotes)"
        elif target.requires_grad and torch.is_grad_enabled():
            unsupported = "the kernels do not compute the gradient with respect to target"
    else:
        target_value = _label(target, "target", name, "a tensor or a number")
        target = None
    for operand, operand_name in ((weight, "weight"), (pos_weight, "pos_weight")):
        if operand is None:
            continue
        _checks.check_floating_tensor(operand, operand_name, name)
        _checks.check_matches(operand, operand_name, input, "input", name, shape=False, dtype=False)
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


def _check_batch_norm_arguments(input: object, running_mean: object, running_var: object, weight: object,
                                bias: object, training: object, momentum: object, eps: object,
                                negative_slope: object, function: str) -> tuple[bool, float, float, float]:
    """Checks the arguments of a batch norm + activation call (F.batch_norm's rules, each
    error naming its argument) and returns (training, momentum, eps, negative_slope) as
    Python scalars."""
    _checks.check_floating_tensor(input, "input", function)
    if input.dim() < 2:
        raise ValueError(f"{function}: input must be (N, C, *) with at least 2 dims, got shape {tuple(input.shape)}")
    channels = input.shape[1]
    if (running_mean is None) != (running_var is None):
        raise ValueError(f"{function}: running_mean and running_var must both be tensors or both be None, got "
                         f"running_mean={type(running_mean).__name__}, running_var={type(running_var).__name__}")
    training = _checks.check_bool(training, "training", function)
    if not training and running_mean is None:
        raise ValueError(f"{function}: running_mean and running_var are needed when training=False (evaluation "
                         "normalizes with them)")
    per_channel = {"running_mean": running_mean, "running_var": running_var, "weight": weight, "bias": bias}
    given = {name: tensor for name, tensor in per_channel.items() if tensor is not None}
    for name, tensor in given.items():
        _checks.check_floating_tensor(tensor, name, function)
        _checks.check_matches(tensor, name, input, "input", function, shape=False, dtype=False)
        if tensor.shape != (channels,):
            raise ValueError(f"{function}: {name} must have shape (C,) = ({channels},) for input of shape "
                             f"{tuple(input.shape)}, got {tuple(tensor.shape)}")
    # As torch: the per-channel tensors share one dtype, the input's or, for a
    # bfloat16 / float16 input, float32 (mixed precision).
    allowed = {input.dtype} | ({torch.float32} if input.dtype in (torch.bfloat16, torch.float16) else set())
    dtypes = {tensor.dtype for tensor in given.values()}
    if len(dtypes) > 1 or not dtypes <= allowed:
        found = ", ".join(f"{name} {tensor.dtype}" for name, tensor in given.items())
        raise TypeError(f"{function}: running_mean, running_var, weight and bias must share one dtype, input's "
                        f"({input.dtype}) or float32 for a bfloat16 / float16 input; got {found}")
    if training and input.numel() // max(channels, 1) == 1:
        raise ValueError(f"{function}: training needs more than 1 value per channel, got input of shape "
                         f"{tuple(input.shape)}")
    momentum = _checks.real_number(momentum, "momentum", function)
    if not math.isfinite(momentum):
        raise ValueError(f"{function}: momentum must be finite, got {momentum}")
    eps = _checks.real_number(eps, "eps", function)
    if not 0 <= eps < math.inf:
        raise ValueError(f"{function}: eps must be finite and >= 0, got {eps}")
    return training, momentum, eps, _checks.check_negative_slope(negative_slope, function)


def batch_norm_leaky_relu(input: torch.Tensor, running_mean: torch.Tensor | None, running_var: torch.Tensor | None,
                          weight: torch.Tensor | None = None, bias: torch.Tensor | None = None,
                          training: bool = False, momentum: float = 0.1, eps: float = 1e-5,
                          negative_slope: float = 0.01, *, overwrite_input: bool = False) -> torch.Tensor:
    """``leaky_relu(batch_norm(input, running_mean, running_var, weight, bias, training, momentum,
    eps), negative_slope)``: the arguments and defaults of ``torch.nn.functional.batch_norm``
    plus ``negative_slope`` (>= 0; 0 is ReLU).

    input (N, C, *): (N, C) or (N, C, L) for a BatchNorm1d, (N, C, H, W) for a
    BatchNorm2d. running_mean, running_var: (C,) or both None (then ``training`` must be
    True); with ``training=True`` they are updated in place as ``F.batch_norm`` updates
    them (``momentum`` weights the batch statistics; the running variance is unbiased).
    weight, bias: (C,) or None. Returns a tensor of input's shape and memory format.

    Kept for backward: the activated output alone where the normalized input can be
    recovered from it (negative_slope > 0, CPU tensors, ``|bias| <= 4 |weight|`` in every
    channel), else the input, as eager keeps it (see ``imggen_fast.ops.batch_norm_leaky_relu``).

    ``overwrite_input=True`` allows the output to be written over ``input``, which the
    caller promises has no other use (a convolution's output that only this call reads);
    it is done on CPU tensors with negative_slope > 0, and the returned tensor is then
    ``input`` itself. Autograd's version counter records the change, so a backward that
    needs the old input raises instead of using wrong values."""
    name = "batch_norm_leaky_relu"
    training, momentum, eps, negative_slope = _check_batch_norm_arguments(
        input, running_mean, running_var, weight, bias, training, momentum, eps, negative_slope, name)
    overwrite_input = _checks.check_bool(overwrite_input, "overwrite_input", name)
    return _batch_norm_leaky_relu.batch_norm_leaky_relu(input, running_mean, running_var, weight, bias, training,
                                                        momentum, eps, negative_slope, overwrite_input)
