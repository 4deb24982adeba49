"""Cases of ``generator_sampling``: the classic DCGAN generator drawing a batch of 64
images in eval mode, fp32 (what ``imggen-fast sample`` and a training loop's sample grids
run).

Providers: ``eager`` (``generator.eval()`` under ``torch.no_grad``) and
``eager_channels_last``; ``imggen_fast``
(:func:`imggen_fast.fuse_for_inference`: each BatchNorm folded into the
ConvTranspose2d before it, the ReLUs fused) and ``imggen_fast_channels_last`` (the same,
its weights converted to channels_last); ``compile`` (torch.compile of the eager
eval model) and ``compile_freezing`` (the same with inductor's freezing, which folds the
BatchNorms and constant-folds the weights at compile time).

Check: the images against eager eval's on the same noise. Folding changes the rounding
of every layer (the BatchNorm's scale is multiplied into the weights before the
convolution instead of after it), so the tolerance is that of a deep fp32 network
(max-norm rtol 1e-4) rather than of one op."""

from __future__ import annotations

import contextlib
import functools

import torch

from .. import fuse_for_inference, models
from .common import (COMPILE, EAGER, EAGER_CHANNELS_LAST, IMGGEN_FAST, IMGGEN_FAST_CHANNELS_LAST, Case, Tolerance,
                     compare, compiled, count_flops, device)

OP = "generator_sampling"
COMPILE_FREEZING = "compile_freezing"
PROVIDERS = (EAGER, EAGER_CHANNELS_LAST, IMGGEN_FAST, IMGGEN_FAST_CHANNELS_LAST, COMPILE, COMPILE_FREEZING)
BATCH = 64
# Image sizes from the smallest; the quick mode takes 32x32.
IMAGE_SIZES = (32, 64)
FOLDED_TOLERANCE = Tolerance(1e-4, 1e-5)


def _generator(image_size: int) -> torch.nn.Module:
    """The classic DCGAN generator with trained-looking BatchNorm statistics (a few
    training-mode forwards, so that eval mode does not normalize with the initial 0 / 1)."""
    torch.manual_seed(0)
    generator = models.Generator(image_size=image_size, kind="dcgan").to(device())
    with torch.no_grad():
        for _ in range(3):
            generator(torch.randn(BATCH, generator.noise_dim, device=device()))
    return generator.eval()


def _sampler(provider: str, image_size: int):
    """A zero-argument function drawing the batch of images (no autograd)."""
    generator = _generator(image_size)
    noise = torch.randn(BATCH, generator.noise_dim, generator=torch.Generator().manual_seed(1)).to(device())
    if provider in (IMGGEN_FAST, IMGGEN_FAST_CHANNELS_LAST):
        generator = fuse_for_inference(generator)
    if provider in (EAGER_CHANNELS_LAST, IMGGEN_FAST_CHANNELS_LAST):
        generator = generator.to(memory_format=torch.channels_last)
    run = compiled(generator) if provider in (COMPILE, COMPILE_FREEZING) else generator
    context = contextlib.nullcontext
    if provider == COMPILE_FREEZING:
        # Imported here: inductor's config takes a second to import, at every case discovery.
        from torch._inductor import config as inductor_config

        # Freezing is read when compiling; the context costs the same at every call.
        context = functools.partial(inductor_config.patch, freezing=True)

    def sample() -> torch.Tensor:
        with torch.no_grad(), context():
            return run(noise)

    return sample


def _make(provider: str, image_size: int):
    sample = _sampler(provider, image_size)
    sample()  # compiles (torch.compile) and builds the kernels before timing
    return sample


def check(provider: str, image_size: int):
    """The provider's images against eager eval's on the same noise."""
    return compare({"images": _sampler(provider, image_size)()}, {"images": _sampler(EAGER, image_size)()},
                   FOLDED_TOLERANCE)


def flops(image_size: int) -> int:
    """The multiply-adds of one batch through the generator (its transposed convolutions
    and Linear), counted by torch."""
    return count_flops(_sampler(EAGER, image_size))


def _case(image_size: int, provider: str) -> Case:
    return Case(OP, f"dcgan {image_size}x{image_size}", provider, "forward",
                functools.partial(_make, provider, image_size), flops=functools.partial(flops, image_size),
                elements=BATCH * 3 * image_size * image_size,
                quick=image_size == IMAGE_SIZES[0],
                check=functools.partial(check, provider, image_size) if provider.startswith(IMGGEN_FAST) else None)


def cases() -> list[Case]:
    """Every (image size, provider) case, sizes from the smallest."""
    return [_case(image_size, provider) for image_size in IMAGE_SIZES for provider in PROVIDERS]


CASES = cases()
