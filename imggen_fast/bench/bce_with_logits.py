"""Cases of the BCE-with-logits losses, forward + backward, fp32.

Ops: ``bce_with_logits`` (a tensor of soft labels as target) and ``gan_d_loss`` (real and
fake logits with the labels 1 and 0). Providers: ``eager`` as users write it
(``F.binary_cross_entropy_with_logits``; for the discriminator loss the two-call form
with ``torch.ones_like`` / ``torch.zeros_like`` targets), ``imggen_fast``, ``compile``
(torch.compile of the eager form) and ``floor_copy`` (a copy of the bytes the op must
move). Sizes: 64 logits (a DCGAN batch), 64x1x30x30 (a patch discriminator), 1M and 16M.

Each timed call runs the forward and ``torch.autograd.grad`` of the loss with respect to
the logits (no ``.grad`` accumulation, the same for every provider).

``bytes_moved`` is the least any implementation must read and write with the forward and
the backward as separate passes (the op contract): with a tensor target the forward
reads x and y and the backward reads x and y (or a gradient stored by the forward, which
costs the same write and read) and writes dx: 5N elements; with a number target the
forward reads x and the backward reads x and writes dx: 3N per input. imggen_fast stores
the gradient (see imggen_fast/ops/bce_with_logits.py), so for number targets it moves 4N
per input, more than this minimum.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F

from .. import functional
from .common import COMPILE, EAGER, FLOOR_COPY, IMGGEN_FAST, Case, compare, compiled, copy_floor, device, saved_bytes

SIZES = {"64": (64, 1), "64x1x30x30": (64, 1, 30, 30), "1M": (1 << 20,), "16M": (1 << 24,)}
QUICK_SIZES = ("64", "1M")
OPS = ("bce_with_logits", "gan_d_loss")
PROVIDERS = (EAGER, IMGGEN_FAST, COMPILE, FLOOR_COPY)
_ELEMENT_BYTES = 4  # fp32


def _eager_bce(input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.binary_cross_entropy_with_logits(input, target)


def _eager_gan_d_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    return (F.binary_cross_entropy_with_logits(real_logits, torch.ones_like(real_logits))
            + F.binary_cross_entropy_with_logits(fake_logits, torch.zeros_like(fake_logits)))


def _imggen_fast_bce(input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return functional.bce_with_logits(input, target)


def _imggen_fast_gan_d_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    return functional.gan_d_loss(real_logits, fake_logits)


_FUNCTIONS = {
    ("bce_with_logits", EAGER): _eager_bce,
    ("bce_with_logits", IMGGEN_FAST): _imggen_fast_bce,
    ("gan_d_loss", EAGER): _eager_gan_d_loss,
    ("gan_d_loss", IMGGEN_FAST): _imggen_fast_gan_d_loss,
}


def loss_function(op: str, provider: str):
    """The loss function a provider runs: (input, target) or (real_logits, fake_logits) -> loss."""
    if provider == COMPILE:
        return compiled(_FUNCTIONS[(op, EAGER)])
    return _FUNCTIONS[(op, provider)]


def make_inputs(op: str, shape: tuple[int, ...], seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """The differentiated logits and the second argument: soft labels (bce_with_logits) or
    the fake logits (gan_d_loss, both differentiated), on the benchmark device."""
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(shape, generator=generator).to(device()).requires_grad_()
    if op == "bce_with_logits":
        return logits, torch.rand(shape, generator=generator).to(device())
    return logits, torch.randn(shape, generator=generator).to(device()).requires_grad_()


def bytes_moved(op: str, shape: tuple[int, ...]) -> int:
    elements = 5 * math.prod(shape) if op == "bce_with_logits" else 2 * 3 * math.prod(shape)
    return elements * _ELEMENT_BYTES


def _loss_and_gradients(op: str, provider: str, shape: tuple[int, ...]):
    """A function returning (loss, gradients of the logits) for the provider, and the loss function."""
    first, second = make_inputs(op, shape)
    function = loss_function(op, provider)
    differentiated = (first, second) if second.requires_grad else (first,)

    def run() -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        loss = function(first, second)
        return loss, torch.autograd.grad(loss, differentiated)

    return run, lambda: function(first, second)


def _make(op: str, provider: str, shape: tuple[int, ...]):
    run, _ = _loss_and_gradients(op, provider, shape)
    run()  # compiles (torch.compile) and warms up outside the timing
    return run


def _results(op: str, provider: str, shape: tuple[int, ...]) -> dict[str, torch.Tensor]:
    run, _ = _loss_and_gradients(op, provider, shape)
    loss, grads = run()
    return {"loss": loss, **{f"grad_{index}": gradient for index, gradient in enumerate(grads)}}


def check(op: str, shape: tuple[int, ...], provider: str):
    """The provider's loss and logit gradients against eager's on the same inputs."""
    return compare(_results(op, provider, shape), _results(op, EAGER, shape))


def kept_for_backward(op: str, shape: tuple[int, ...], provider: str) -> int:
    _, forward = _loss_and_gradients(op, provider, shape)
    return saved_bytes(forward)


def _case(op: str, size: str, provider: str) -> Case:
    shape = SIZES[size]
    shared = dict(bytes_moved=bytes_moved(op, shape), elements=math.prod(shape), quick=size in QUICK_SIZES)
    if provider == FLOOR_COPY:
        return Case(op, size, provider, "both", copy_floor(bytes_moved(op, shape)), **shared)
    return Case(op, size, provider, "both", functools.partial(_make, op, provider, shape),
                check=functools.partial(check, op, shape, provider) if provider == IMGGEN_FAST else None,
                kept_for_backward=functools.partial(kept_for_backward, op, shape, provider), **shared)


def cases(ops: tuple[str, ...] = OPS, sizes: tuple[str, ...] = tuple(SIZES),
          providers: tuple[str, ...] = PROVIDERS) -> list[Case]:
    """Every (op, size, provider) case, forward + backward, sizes from the smallest."""
    return [_case(op, size, provider) for op in ops for size in sizes for provider in providers]


CASES = cases()
