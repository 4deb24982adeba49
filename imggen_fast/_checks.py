"""Argument checks run before any kernel: each error names the argument at fault."""

from __future__ import annotations

import math
import numbers

import numpy as np
import torch

_FLOATING = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def check_floating_tensor(value: object, name: str, function: str) -> torch.Tensor:
    """``value`` must be a floating-point tensor (fp32, fp64, bf16 or fp16)."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{function}: {name} must be a torch.Tensor, got {type(value).__name__}")
    if value.dtype not in _FLOATING:
        raise TypeError(f"{function}: {name} must be a floating-point tensor (float32, float64, bfloat16 "
                        f"or float16), got {value.dtype}")
    return value


def check_matches(value: torch.Tensor, name: str, other: torch.Tensor, other_name: str, function: str,
                  *, shape: bool = True, dtype: bool = True) -> None:
    """``value`` must have ``other``'s device, and (if ``dtype``, ``shape``) its dtype and shape."""
    if dtype and value.dtype != other.dtype:
        raise TypeError(f"{function}: {name} has dtype {value.dtype} but {other_name} has {other.dtype}; "
                        "they must match")
    if value.device != other.device:
        raise ValueError(f"{function}: {name} is on {value.device} but {other_name} is on {other.device}; "
                         "they must be on the same device")
    if shape and value.shape != other.shape:
        raise ValueError(f"{function}: {name} has shape {tuple(value.shape)} but {other_name} has "
                         f"{tuple(other.shape)}; they must match")


def real_number(value: object, name: str, function: str, expected: str = "a number") -> float:
    """``value`` as a float if it is a real number as torch takes one for a scalar
    argument: a Python int or float, or a numpy scalar (``np.float32``, ``np.int64``);
    a bool (Python's or numpy's) is refused, since it is almost always a slip.
    ``expected`` says what the argument may be, for the error."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{function}: {name} must be {expected}, got {type(value).__name__}")
    return float(value)


def check_bool(value: object, name: str, function: str) -> bool:
    """``value`` as a bool if it is a Python or numpy bool."""
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{function}: {name} must be a bool, got {type(value).__name__}")
    return bool(value)


def check_negative_slope(negative_slope: object, function: str) -> float:
    """The LeakyReLU slope, as a float: a finite number >= 0 (numpy scalars accepted), as
    the fused backward reads the gradient mask from the activated output, which is only
    valid for slope >= 0."""
    negative_slope = real_number(negative_slope, "negative_slope", function)
    if not 0 <= negative_slope < math.inf:
        raise ValueError(f"{function}: negative_slope must be finite and >= 0 (the backward reads the mask from "
                         f"the activated output), got {negative_slope}")
    return negative_slope


def check_choice(value: object, name: str, choices: tuple[str, ...], function: str) -> str:
    """``value`` if it is one of ``choices``, else a ValueError naming the argument."""
    if value not in choices:
        raise ValueError(f"{function}: {name} must be one of {', '.join(map(repr, choices))}, got {value!r}")
    return value


def autocasting(tensor: torch.Tensor) -> bool:
    """True when torch.autocast is on for ``tensor``'s device: the layers then take
    operands of mixed floating dtypes, as torch's do, and cast them."""
    device_type = tensor.device.type
    return torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type)


def check_optional_bias(bias: object, input: torch.Tensor, channels: int, function: str) -> None:
    """``bias`` must be None or a 1-D tensor of ``channels`` elements with input's device
    and dtype (any floating dtype under autocast)."""
    if bias is None:
        return
    check_floating_tensor(bias, "bias", function)
    check_matches(bias, "bias", input, "input", function, shape=False, dtype=not autocasting(input))
    if bias.shape != (channels,):
        raise ValueError(f"{function}: bias must have shape ({channels},), got {tuple(bias.shape)}")


def pair(value: object, name: str, function: str, minimum: int) -> list[int]:
    """An int or a pair of ints, each >= ``minimum``, as a list of two ints."""
    values = [value, value] if isinstance(value, int) and not isinstance(value, bool) else value
    if (not isinstance(values, (tuple, list)) or len(values) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) for v in values)):
        raise TypeError(f"{function}: {name} must be an int or a pair of ints, got {value!r}")
    if min(values) < minimum:
        raise ValueError(f"{function}: {name} must be >= {minimum}, got {value!r}")
    return list(values)


def check_groups(groups: object, in_channels: int, out_channels: int | None, function: str) -> int:
    """``groups`` as an int: positive, dividing ``in_channels`` and, when given,
    ``out_channels`` (a transposed convolution's are a multiple of it by construction)."""
    if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1:
        raise ValueError(f"{function}: groups must be a positive integer, got {groups!r}")
    if in_channels % groups:
        raise ValueError(f"{function}: groups={groups} must divide the input channels ({in_channels})")
    if out_channels is not None and out_channels % groups:
        raise ValueError(f"{function}: groups={groups} must divide the output channels ({out_channels})")
    return groups


def convolution_output_size(input_size: tuple[int, int], kernel_size: tuple[int, int], stride: list[int],
                            padding: list[int], dilation: list[int],
                            output_padding: list[int] | None = None) -> list[int]:
    """[H_out, W_out] of a convolution (``output_padding`` None) or of a transposed
    convolution, by torch's formulas, from (H, W), (kH, kW) and the pairs."""
    if output_padding is None:
        return [(input_size[axis] + 2 * padding[axis] - dilation[axis] * (kernel_size[axis] - 1) - 1) // stride[axis]
                + 1 for axis in range(2)]
    return [(input_size[axis] - 1) * stride[axis] - 2 * padding[axis] + dilation[axis] * (kernel_size[axis] - 1)
            + output_padding[axis] + 1 for axis in range(2)]
