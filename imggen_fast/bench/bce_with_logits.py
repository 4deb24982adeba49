"""Benchmark cases of the BCE-with-logits losses, forward + backward, fp32.

Ops: ``bce_with_logits`` (a tensor of soft labels as target) and ``gan_d_loss`` (real and
fake logits with the labels 1 and 0). Providers: ``eager`` as users write it
(``F.binary_cross_entropy_with_logits``; for the discriminator loss the two-call form
with ``torch.ones_like`` / ``torch.zeros_like`` targets), ``imggen_fast``, and
``compile`` (torch.compile of the eager form). Sizes: 64 logits (a DCGAN batch),
64x1x30x30 (a patch discriminator), 1M and 16M.

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

import torch
import torch.nn.functional as F

from .. import functional
from .common import COMPILE, EAGER, IMGGEN_FAST, PROVIDERS, Case, compiled

SIZES = {"64": (64, 1), "64x30x30": (64, 1, 30, 30), "1M": (1 << 20,), "16M": (1 << 24,)}
OPS = ("bce_with_logits", "gan_d_loss")
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
    the fake logits (gan_d_loss, both differentiated)."""
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(shape, generator=generator).requires_grad_()
    if op == "bce_with_logits":
        return logits, torch.rand(shape, generator=generator)
    return logits, torch.randn(shape, generator=generator).requires_grad_()


def bytes_moved(op: str, shape: tuple[int, ...]) -> int:
    numel = 1
    for size in shape:
        numel *= size
    elements = 5 * numel if op == "bce_with_logits" else 2 * 3 * numel
    return elements * _ELEMENT_BYTES


def _maker(op: str, provider: str, shape: tuple[int, ...]):
    def make():
        first, second = make_inputs(op, shape)
        function = loss_function(op, provider)
        differentiated = (first, second) if second.requires_grad else (first,)

        def run():
            return torch.autograd.grad(function(first, second), differentiated)

        run()  # compiles (torch.compile) and warms up outside the timing
        return run

    return make


def cases(ops: tuple[str, ...] = OPS, sizes: tuple[str, ...] = tuple(SIZES),
          providers: tuple[str, ...] = PROVIDERS) -> list[Case]:
    """Every (op, size, provider) case, forward + backward."""
    return [Case(op=op, size=size, provider=provider, direction="both", make=_maker(op, provider, SIZES[size]),
                 bytes_moved=bytes_moved(op, SIZES[size]))
            for op in ops for size in sizes for provider in providers]
