"""Triton kernels of binary cross-entropy with logits and of the GAN discriminator loss.

The same ops and contract as the C++ kernels (imggen_fast/ops/bce_with_logits.py): one
sweep computes the loss (per element, or partial sums of fixed blocks) and, when asked,
the gradient for ``grad_output = 1``; a one-program kernel then adds the partial sums in a
fixed order (deterministic, no atomics); the backward scales the stored gradient.
Operands are flat arrays over the input's dense memory; weight and pos_weight are read
periodically (``periodic_operand``, the twin of csrc/layout.h's)."""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ._triton_utils import ELEMENTWISE_CONFIGS, autotune, dense, flat_grid, in_layout_of

# Elements per program of the loss sweep. One configuration, not tuned: the blocks are
# the partial sums, so the sum's order (and bits) must not depend on a tuning choice.
# (Single-config autotune all the same: the ahead-of-time compile test reads the
# configuration from it.)
SWEEP_BLOCK = 1024
SWEEP_CONFIGS = [triton.Config({"BLOCK": SWEEP_BLOCK}, num_warps=4)]
# Partial sums read per step by the one-program final sum.
SUM_CONFIGS = [triton.Config({"BLOCK": 1024}, num_warps=4)]


@triton.jit
def _softplus_sigmoid_minus_abs(x):
    """softplus(-|x|) = log1p(exp(-|x|)) and sigmoid(-|x|) = exp(-|x|) / (1 + exp(-|x|)), fp32.
    log1p(t) = 2 atanh(s), s = t / (2 + t) in [0, 1/3]: 2 s + 2 s^3 R(s^2), R the quadratic
    minimax fit of the C++ kernel; exact at small t (1 + t is never rounded)."""
    decay = tl.exp(-tl.abs(x))
    s = decay / (2.0 + decay)
    s2 = s * s
    r = (0.16998761672838472 * s2 + 0.19816903092004673) * s2 + 0.33336778970287273
    softplus = 2.0 * s + 2.0 * s * s2 * r
    return softplus, decay / (1.0 + decay)


@triton.jit
def _loss_and_grad(x, y, weight, pos_weight, WEIGHTED: tl.constexpr):
    """The loss of each element and its gradient for grad_output = 1 (csrc/bce_with_logits.h):
    loss = w ((1 - y) x + l softplus(-x)), l = 1 + (p - 1) y, written without cancellation;
    grad = w (l sigmoid(x) - p y) from sigmoid(-|x|), without rounding 1 - sigmoid(-|x|)."""
    softplus, sigmoid = _softplus_sigmoid_minus_abs(x)
    # At x = -inf the loss is NaN, as eager's textbook form gives (inf - inf).
    linear = tl.where(x >= 0, (1.0 - y) * x, -(pos_weight * y) * x)
    linear = tl.where(x == float("-inf"), float("nan"), linear)
    if WEIGHTED:
        log_weight = 1.0 + (pos_weight - 1.0) * y
        loss = weight * (linear + log_weight * softplus)
        small_side = log_weight * sigmoid
        grad = weight * tl.where(x >= 0, (1.0 - y) - small_side, small_side - pos_weight * y)
    else:
        loss = linear + softplus
        grad = tl.where(x >= 0, (1.0 - y) - sigmoid, sigmoid - y)
    return loss, grad


@triton.jit
def _sweep_block(block, input_ptr, target_ptr, target_value, weight_ptr, weight_period, pos_weight_ptr,
                 pos_weight_period, loss_ptr, grad_ptr, grad_scale, partials_ptr, partial_index, numel,
                 TARGET_TENSOR: tl.constexpr, WEIGHTED: tl.constexpr, REDUCE: tl.constexpr,
                 WRITE_GRAD: tl.constexpr, BLOCK: tl.constexpr):
    offsets = block.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    in_bounds = offsets < numel
    x = tl.load(input_ptr + offsets, mask=in_bounds, other=0.0).to(tl.float32)
    if TARGET_TENSOR:
        y = tl.load(target_ptr + offsets, mask=in_bounds, other=0.0).to(tl.float32)
    else:
        y = tl.full([BLOCK], target_value, tl.float32)
    if WEIGHTED:
        weight = tl.load(weight_ptr + offsets % weight_period, mask=in_bounds, other=0.0).to(tl.float32)
        pos_weight = tl.load(pos_weight_ptr + offsets % pos_weight_period, mask=in_bounds, other=1.0).to(tl.float32)
    else:
        weight = tl.full([BLOCK], 1.0, tl.float32)
        pos_weight = weight
    loss, grad = _loss_and_grad(x, y, weight, pos_weight, WEIGHTED)
    if WRITE_GRAD:
        tl.store(grad_ptr + offsets, (grad * grad_scale).to(grad_ptr.dtype.element_ty), mask=in_bounds)
    if REDUCE:
        tl.store(partials_ptr + partial_index, tl.sum(tl.where(in_bounds, loss, 0.0), axis=0))
    else:
        tl.store(loss_ptr + offsets, loss.to(loss_ptr.dtype.element_ty), mask=in_bounds)


@autotune(configs=SWEEP_CONFIGS, key=[])
@triton.jit
def bce_with_logits_kernel(input_ptr, target_ptr, target_value, weight_ptr, weight_period, pos_weight_ptr,
                           pos_weight_period, loss_ptr, grad_ptr, grad_scale, partials_ptr, numel,
                           TARGET_TENSOR: tl.constexpr, WEIGHTED: tl.constexpr, REDUCE: tl.constexpr,
                           WRITE_GRAD: tl.constexpr, BLOCK: tl.constexpr):
    """One program per BLOCK elements: the losses (or the block's partial sum) and the gradients."""
    block = tl.program_id(0)
    _sweep_block(block, input_ptr, target_ptr, target_value, weight_ptr, weight_period, pos_weight_ptr,
                 pos_weight_period, loss_ptr, grad_ptr, grad_scale, partials_ptr, block, numel,
                 TARGET_TENSOR, WEIGHTED, REDUCE, WRITE_GRAD, BLOCK)


@autotune(configs=SWEEP_CONFIGS, key=[])
@triton.jit
def gan_d_loss_kernel(real_ptr, fake_ptr, real_label, fake_label, real_loss_ptr, fake_loss_ptr, real_grad_ptr,
                      fake_grad_ptr, real_scale, fake_scale, partials_ptr, real_numel, fake_numel, real_blocks,
                      REDUCE: tl.constexpr, WRITE_GRAD: tl.constexpr, BLOCK: tl.constexpr):
    """One launch over both inputs: programs [0, real_blocks) sweep the real logits, the rest
    the fake ones; partial sums in that order."""
    program = tl.program_id(0)
    if program < real_blocks:
        _sweep_block(program, real_ptr, real_ptr, real_label, real_ptr, 1, real_ptr, 1, real_loss_ptr, real_grad_ptr,
                     real_scale, partials_ptr, program, real_numel, False, False, REDUCE, WRITE_GRAD, BLOCK)
    else:
        _sweep_block(program - real_blocks, fake_ptr, fake_ptr, fake_label, fake_ptr, 1, fake_ptr, 1, fake_loss_ptr,
                     fake_grad_ptr, fake_scale, partials_ptr, program, fake_numel, False, False, REDUCE, WRITE_GRAD,
                     BLOCK)


@autotune(configs=SUM_CONFIGS, key=[])
@triton.jit
def sum_partials_kernel(partials_ptr, loss_ptr, first_count, first_scale, second_count, second_scale,
                        BLOCK: tl.constexpr):
    """One program: first_scale * sum(partials[:first_count]) + second_scale * sum(the next
    second_count), each read BLOCK at a time in order and added as a fixed tree."""
    first = tl.zeros([BLOCK], tl.float32)
    for start in range(0, first_count, BLOCK):
        offsets = start + tl.arange(0, BLOCK)
        first += tl.load(partials_ptr + offsets, mask=offsets < first_count, other=0.0)
    second = tl.zeros([BLOCK], tl.float32)
    for start in range(0, second_count, BLOCK):
        offsets = start + tl.arange(0, BLOCK)
        second += tl.load(partials_ptr + first_count + offsets, mask=offsets < second_count, other=0.0)
    loss = tl.sum(first, axis=0) * first_scale + tl.sum(second, axis=0) * second_scale
    tl.store(loss_ptr, loss.to(loss_ptr.dtype.element_ty))


@autotune(configs=ELEMENTWISE_CONFIGS, key=["numel"])
@triton.jit
def bce_with_logits_backward_kernel(grad_output_ptr, unit_grad_ptr, grad_input_ptr, numel,
                                    ELEMENTWISE: tl.constexpr, BLOCK: tl.constexpr):
    """grad_input = grad_output * unit_grad; grad_output one value, or one per element."""
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    in_bounds = offsets < numel
    if ELEMENTWISE:
        scale = tl.load(grad_output_ptr + offsets, mask=in_bounds).to(tl.float32)
    else:
        scale = tl.load(grad_output_ptr).to(tl.float32)
    unit = tl.load(unit_grad_ptr + offsets, mask=in_bounds).to(tl.float32)
    tl.store(grad_input_ptr + offsets, (scale * unit).to(grad_input_ptr.dtype.element_ty), mask=in_bounds)


def periodic_operand(operand: torch.Tensor, layout: torch.Tensor) -> tuple[torch.Tensor, int]:
    """``operand`` broadcast against the dense tensor ``layout``, seen from a flat sweep over
    layout's memory: element i reads ``values[i % period]`` (csrc/layout.h's periodic_operand).
    The period covers layout's innermost dims up to the outermost one the operand varies
    along; ``values`` is a view when the operand already lists them in order, else a copy of
    those ``period`` elements."""
    expanded = operand.expand(layout.shape)
    inner_first = sorted((dim for dim in range(layout.dim()) if layout.shape[dim] > 1), key=layout.stride)
    period_dims = max((k + 1 for k, dim in enumerate(inner_first) if expanded.stride(dim) != 0), default=0)
    period, in_order = 1, True
    for dim in inner_first[:period_dims]:
        in_order = in_order and expanded.stride(dim) == period
        period *= layout.shape[dim]
    if in_order:
        return expanded.as_strided((period,), (1,)), period
    squeezed = [dim for dim in range(layout.dim()) if layout.shape[dim] > 1]
    view = expanded.squeeze([dim for dim in range(layout.dim()) if layout.shape[dim] == 1])
    view = view.permute([squeezed.index(dim) for dim in reversed(inner_first)])
    view = view[(0,) * (len(inner_first) - period_dims)]
    return view.contiguous().reshape(period), period


def _weighted_operands(input, weight, pos_weight):
    """(weight values, period, pos_weight values, period); ones for an absent one."""
    operands = []
    for operand in (weight, pos_weight):
        if operand is None:
            operands += [input.new_ones(1), 1]
        else:
            operands += list(periodic_operand(operand, input))
    return operands


def _grad_scale(numel: int, reduction: int) -> float:
    """d loss / d loss_i: 1/N for "mean" (NaN for no elements, as torch's mean), else 1."""
    if reduction != 1:
        return 1.0
    return 1.0 / numel if numel else math.nan


def _final_sum(partials, loss, first_count, first_scale, second_count=0, second_scale=0.0):
    sum_partials_kernel[(1,)](partials, loss, first_count, first_scale, second_count, second_scale)


def bce_with_logits_forward(input: torch.Tensor, target: torch.Tensor | None, target_value: float,
                    weight: torch.Tensor | None, pos_weight: torch.Tensor | None, reduction: int,
                    compute_grad: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """input (*), target (*) or None for target_value, weight/pos_weight broadcastable to (*);
    returns the loss (() or (*)) and the gradient for grad_output = 1 ((*) or empty)."""
    input = dense(input)
    target = None if target is None else in_layout_of(target, input)
    numel = input.numel()
    loss = torch.empty_like(input) if reduction == 0 else input.new_empty(())
    grad = torch.empty_like(input) if compute_grad else input.new_empty(0)
    weighted = weight is not None or pos_weight is not None
    if numel == 0:
        if reduction != 0:
            loss.fill_(_grad_scale(0, reduction) if reduction == 1 else 0.0)
        return loss, grad
    weight_values, weight_period, pos_weight_values, pos_weight_period = (
        _weighted_operands(input, weight, pos_weight) if weighted else (input, 1, input, 1))
    blocks = triton.cdiv(numel, SWEEP_BLOCK)
    partials = torch.empty(blocks if reduction else 0, device=input.device, dtype=torch.float32)
    bce_with_logits_kernel[(blocks,)](
        input, input if target is None else target, target_value, weight_values, weight_period,
        pos_weight_values, pos_weight_period, loss, grad, _grad_scale(numel, reduction), partials, numel,
        TARGET_TENSOR=target is not None, WEIGHTED=weighted, REDUCE=reduction != 0, WRITE_GRAD=compute_grad)
    if reduction:
        _final_sum(partials, loss, blocks, _grad_scale(numel, reduction))
    return loss, grad


def gan_d_loss_forward(real_logits: torch.Tensor, fake_logits: torch.Tensor, real_label: float, fake_label: float,
               reduction: int, compute_grad: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """bce(real_logits, real_label) + bce(fake_logits, fake_label), one sweep launch over both;
    returns the loss and both gradients for grad_output = 1 (or empty ones)."""
    real = dense(real_logits)
    fake = in_layout_of(fake_logits, real) if reduction == 0 else dense(fake_logits)
    real_numel, fake_numel = real.numel(), fake.numel()
    real_grad = torch.empty_like(real) if compute_grad else real.new_empty(0)
    fake_grad = torch.empty_like(fake) if compute_grad else fake.new_empty(0)
    real_loss = torch.empty_like(real) if reduction == 0 else real.new_empty(())
    fake_loss = torch.empty_like(fake) if reduction == 0 else real_loss
    real_blocks = triton.cdiv(real_numel, SWEEP_BLOCK)
    blocks = real_blocks + triton.cdiv(fake_numel, SWEEP_BLOCK)
    partials = torch.zeros(blocks if reduction else 0, device=real.device, dtype=torch.float32)
    if blocks:
        gan_d_loss_kernel[(blocks,)](
            real, fake, real_label, fake_label, real_loss, fake_loss, real_grad, fake_grad,
            _grad_scale(real_numel, reduction), _grad_scale(fake_numel, reduction), partials, real_numel,
            fake_numel, real_blocks, REDUCE=reduction != 0, WRITE_GRAD=compute_grad)
    if reduction == 0:
        return real_loss + fake_loss, real_grad, fake_grad
    _final_sum(partials, real_loss, real_blocks, _grad_scale(real_numel, reduction), blocks - real_blocks,
               _grad_scale(fake_numel, reduction))
    return real_loss, real_grad, fake_grad


def bce_with_logits_backward(grad_output: torch.Tensor, unit_grads: list[torch.Tensor],
                             reduction: int) -> list[torch.Tensor]:
    """grad_output * unit_grad for each stored gradient; grad_output one element, or (for
    reduction 0) the gradients' shape."""
    results = []
    for unit_grad in unit_grads:
        unit_grad = dense(unit_grad)
        scale = in_layout_of(grad_output, unit_grad) if reduction == 0 else grad_output
        grad_input = torch.empty_like(unit_grad)
        numel = unit_grad.numel()
        if numel:
            bce_with_logits_backward_kernel[flat_grid(numel)](
                scale, unit_grad, grad_input, numel, ELEMENTWISE=reduction == 0)
        results.append(grad_input)
    return results


# The launchers, by the name of the op they implement (imggen_fast/ops/_registration.py).
LAUNCHERS = {"bce_with_logits_forward": bce_with_logits_forward, "gan_d_loss_forward": gan_d_loss_forward,
             "bce_with_logits_backward": bce_with_logits_backward}
