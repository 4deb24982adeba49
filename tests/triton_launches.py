"""Records the Triton launches the launchers of ``imggen_fast.kernels`` make, by running
them on representative arguments in Triton's interpreter with every kernel launch
intercepted (recorded, not executed), and prints one JSON line per launch: the module,
the kernel, and its arguments as the launcher passed them (tensors as their dtype and
whether their address is 16-byte aligned, numbers as numbers).

tests/triton_aot.py turns each line into the signature, constants and attributes that
Triton's runtime derives from those arguments (i32 or i64 integers, integers equal to 1
as constants, divisibility by 16), and compiles exactly that. The shapes below are
chosen to reach every kernel and every branch a launcher takes (layouts, optional
operands, flags), not to be exhaustive over sizes.

Run as ``python tests/triton_launches.py [module ...]``; it sets ``TRITON_INTERPRET=1``
before importing triton."""

from __future__ import annotations

import importlib
import json
import os
import sys

os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402
from triton.runtime.interpreter import InterpretedFunction  # noqa: E402

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
SLOPE = 0.2


def _channels_last(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.contiguous(memory_format=torch.channels_last)


def _randn(*shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(*shape).to(dtype)


def leaky_relu_calls(launchers):
    for dtype in DTYPES:
        # (tensor, channel dim): contiguous with inner > 1 (numel 120, not a multiple of 16,
        # and 128, one), channels_last and Linear (inner = 1; one tile, and several tiles
        # on both axes), one sample (outer = 1), and more than one reduction block per channel.
        for output, channel_dim in ((_randn(2, 3, 4, 5, dtype=dtype), 1), (_randn(2, 4, 4, 4, dtype=dtype), 1),
                                    (_channels_last(_randn(2, 3, 4, 5, dtype=dtype)), 1),
                                    (_randn(4, 8, dtype=dtype), -1), (_randn(100, 70, dtype=dtype), -1),
                                    (_randn(1, 3, 4, 5, dtype=dtype), 1), (_randn(2, 2, 40, 40, dtype=dtype), 1)):
            grad = torch.randn_like(output)
            bias = _randn(output.shape[channel_dim], dtype=dtype)
            launchers["leaky_relu_backward_from_output"](grad, output, SLOPE)
            launchers["bias_leaky_relu_"](output.clone(), bias, SLOPE, channel_dim)
            launchers["bias_leaky_relu_"](output.clone(), None, SLOPE, channel_dim)
            launchers["bias_leaky_relu_backward"](grad, output, SLOPE, channel_dim)
            launchers["bias_leaky_relu_backward_"](grad.clone(), output, SLOPE, channel_dim)


def layer_leaky_relu_calls(launchers):
    convolutions = (("conv2d_leaky_relu", lambda x, w, b: (x, w, b, [2, 1], [1, 1], [1, 1], 1, SLOPE), (6, 3, 4, 4)),
                    ("conv_transpose2d_leaky_relu",
                     lambda x, w, b: (x, w, b, [2, 2], [1, 1], [0, 0], 1, [1, 1], SLOPE), (3, 6, 4, 4)))
    # fp32 with and without a bias, in both layouts; bf16 and fp16 with a bias.
    variants = [(torch.float32, True, False), (torch.float32, False, False), (torch.float32, True, True),
                (torch.bfloat16, True, False), (torch.float16, True, True)]
    for name, arguments, weight_shape in convolutions:
        for dtype, with_bias, channels_last in variants:
            input = _randn(2, 3, 8, 8, dtype=dtype)
            input = _channels_last(input) if channels_last else input
            weight = _randn(*weight_shape, dtype=dtype)
            bias = _randn(6, dtype=dtype) if with_bias else None
            launchers[name](*arguments(input, weight, bias))


def bce_with_logits_calls(launchers):
    forward = launchers["bce_with_logits_forward"]
    gan = launchers["gan_d_loss_forward"]
    backward = launchers["bce_with_logits_backward"]
    for dtype in DTYPES:
        logits = _randn(4, 32, dtype=dtype)
        target = torch.rand(4, 32).to(dtype)
        weight = torch.rand(32).to(dtype)
        pos_weight = torch.rand(4, 1).to(dtype)
        # Every flag of the sweep in fp32; the heaviest and lightest sweeps in each dtype.
        flag_sets = ([(t, w, r, g) for t in (True, False) for w in (True, False) for r in (0, 1) for g in (True, False)]
                     if dtype == torch.float32 else [(True, True, 1, True), (False, False, 0, False)])
        for target_tensor, weighted, reduction, compute_grad in flag_sets:
            forward(logits, target if target_tensor else None, 0.9, weight if weighted else None,
                    pos_weight if weighted else None, reduction, compute_grad)
        for reduction, compute_grad in ((1, True), (2, False), (0, True)):
            gan(logits, _randn(4, 32, dtype=dtype), 1.0, 0.0, reduction, compute_grad)
        unit_grad = torch.randn_like(logits)
        backward(torch.ones((), dtype=dtype), [unit_grad], 1)
        backward(torch.randn_like(logits), [unit_grad], 0)


def reparameterize_kl_calls(launchers):
    forward = launchers["reparameterize_kl_forward"]
    backward = launchers["reparameterize_kl_backward"]
    seed = torch.tensor([12345], dtype=torch.int64)
    for dtype in DTYPES:
        # One chunk per sample, and several (a sample of more than CHUNK elements).
        for mu in (_randn(4, 32, dtype=dtype), _randn(2, 3000, dtype=dtype)):
            logvar, eps, grad_z = (torch.randn_like(mu) for _ in range(3))
            for reduction in ("batchmean", "none"):
                grad_kl = torch.ones(mu.shape[0] if reduction == "none" else (), dtype=dtype)
                forward(mu, logvar, None, seed, 1.0, reduction)
                forward(mu, logvar, eps, None, 1.0, reduction)
                backward(grad_z, grad_kl, mu, logvar, None, seed, 1.0, reduction)
                backward(grad_z, grad_kl, mu, logvar, eps, None, 1.0, reduction)
                backward(None, grad_kl, mu, logvar, None, seed, 1.0, reduction)


def batch_norm_leaky_relu_calls(launchers):
    forward, forward_ = launchers["batch_norm_leaky_relu_forward"], launchers["batch_norm_leaky_relu_forward_"]
    backward, backward_ = launchers["batch_norm_leaky_relu_backward"], launchers["batch_norm_leaky_relu_backward_"]
    for dtype in DTYPES:
        # NCHW, channels_last, BatchNorm1d's (N, C), and more than one reduction block per channel.
        for input in (_randn(2, 3, 4, 5, dtype=dtype), _channels_last(_randn(2, 3, 4, 5, dtype=dtype)),
                      _randn(6, 3, dtype=dtype), _randn(2, 3, 30, 30, dtype=dtype)):
            channels = input.shape[1]
            for training in (True, False):
                # slope 0.2 saves the output, ReLU the input (the backward's two branches).
                for slope, with_affine in ((SLOPE, True), (0.0, True), (SLOPE, False)):
                    weight = torch.rand(channels).to(dtype) + 0.5 if with_affine else None
                    bias = _randn(channels, dtype=dtype) * 0.1 if with_affine else None
                    running = (torch.zeros(channels), torch.ones(channels))
                    output, mean, invstd = forward(input, *running, weight, bias, training, 0.1, 1e-5, slope)
                    forward_(input.clone(), *running, weight, bias, training, 0.1, 1e-5, slope)
                    grad = torch.randn_like(output)
                    saved_output = output if slope > 0 else None
                    backward(grad, input, saved_output, mean, invstd, weight, bias, training, slope)
                    backward_(grad.clone(), input, saved_output, mean, invstd, weight, bias, training, slope)


CALLS = {"leaky_relu": leaky_relu_calls, "layer_leaky_relu": layer_leaky_relu_calls,
         "bce_with_logits": bce_with_logits_calls, "reparameterize_kl": reparameterize_kl_calls,
         "batch_norm_leaky_relu": batch_norm_leaky_relu_calls}


def describe(value):
    """An argument as JSON: a tensor as its dtype and alignment, anything else as is."""
    if isinstance(value, torch.Tensor):
        return {"tensor": str(value.dtype).removeprefix("torch."), "aligned": value.data_ptr() % 16 == 0}
    if isinstance(value, (bool, int, float, str)) or value is None:
        return value
    raise TypeError(f"cannot record a kernel argument of type {type(value).__name__}")


def record(module_name: str) -> list[dict]:
    """The launches that the representative calls of ``module_name`` make, in order."""
    module = importlib.import_module(f"imggen_fast.kernels.{module_name}")
    launches = []

    def intercept(kernel, *arguments, grid, warmup, **keywords):
        # The module that defines the kernel (a launcher may reuse another module's kernel).
        launches.append({"module": kernel.fn.__module__.rsplit(".", 1)[-1], "kernel": kernel.fn.__name__,
                         "arguments": [describe(argument) for argument in arguments],
                         "keywords": {name: describe(value) for name, value in keywords.items()}})

    original = InterpretedFunction.run
    InterpretedFunction.run = intercept
    try:
        with torch.no_grad():
            CALLS[module_name](module.LAUNCHERS)
    finally:
        InterpretedFunction.run = original
    return launches


if __name__ == "__main__":
    for name in sys.argv[1:] or CALLS:
        for launch in record(name):
            print(json.dumps(launch), flush=True)
