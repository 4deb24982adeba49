"""One optimisation step of each built-in model, written once: ``imggen-fast train``
runs these in its loops and the benchmarks time them.

Each step takes the model(s), optimizer(s) and a batch, and returns the losses as
detached tensors (no ``.item()``: reading a value would wait for a GPU)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from . import functional


def _eager_d_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    return (F.binary_cross_entropy_with_logits(real_logits, torch.ones_like(real_logits))
            + F.binary_cross_entropy_with_logits(fake_logits, torch.zeros_like(fake_logits)))


def _eager_g_loss(fake_logits: torch.Tensor) -> torch.Tensor:
    return F.binary_cross_entropy_with_logits(fake_logits, torch.ones_like(fake_logits))


@dataclasses.dataclass(frozen=True)
class GANLosses:
    """The two GAN losses on discriminator logits: ``d_loss(real_logits, fake_logits)``
    (real labelled 1, fake 0) and the non-saturating ``g_loss(fake_logits)``."""

    d_loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    g_loss: Callable[[torch.Tensor], torch.Tensor]


# What a user writes with torch alone: two BCE calls against ones_like / zeros_like targets.
EAGER_GAN_LOSSES = GANLosses(_eager_d_loss, _eager_g_loss)
# imggen_fast's fused losses: both discriminator terms in one sweep, targets never materialised.
FUSED_GAN_LOSSES = GANLosses(functional.gan_d_loss, functional.gan_g_loss)


def r1_penalty(real_logits: torch.Tensor, real_images: torch.Tensor) -> torch.Tensor:
    """The R1 gradient penalty ``mean over the batch of |d sum(logits) / d image|^2``
    (Mescheder et al. 2018), built with ``create_graph`` so that it is differentiated
    through the discriminator (a double backward). ``real_images`` must require grad."""
    (gradient,) = torch.autograd.grad(real_logits.sum(), real_images, create_graph=True)
    return gradient.pow(2).flatten(1).sum(1).mean()


def gan_step(generator: nn.Module, discriminator: nn.Module, generator_optimizer: torch.optim.Optimizer,
             discriminator_optimizer: torch.optim.Optimizer, real: torch.Tensor, noise: torch.Tensor,
             losses: GANLosses = EAGER_GAN_LOSSES, r1_gamma: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """One discriminator step then one generator step on the same fake batch.

    real (N, C, H, W) images in [-1, 1]; noise (N, noise_dim). ``r1_gamma > 0`` adds
    ``r1_gamma / 2 * R1`` to the discriminator loss. Returns (d_loss, g_loss), detached."""
    fake = generator(noise)
    discriminator_optimizer.zero_grad(set_to_none=True)
    if r1_gamma:
        real = real.detach().requires_grad_(True)
    real_logits = discriminator(real)
    d_loss = losses.d_loss(real_logits, discriminator(fake.detach()))
    if r1_gamma:
        d_loss = d_loss + 0.5 * r1_gamma * r1_penalty(real_logits, real)
    d_loss.backward()
    discriminator_optimizer.step()

    generator_optimizer.zero_grad(set_to_none=True)
    # The discriminator's parameters get gradients here too; its next step zeroes them.
    g_loss = losses.g_loss(discriminator(fake))
    g_loss.backward()
    generator_optimizer.step()
    return d_loss.detach(), g_loss.detach()


def vae_step(vae: nn.Module, optimizer: torch.optim.Optimizer, images: torch.Tensor, beta: float = 1.0,
             eps: torch.Tensor | None = None) -> torch.Tensor:
    """One step on ``vae.loss(images, beta, eps)`` (reconstruction + beta * KL, per image).
    images (N, C, H, W); eps (N, latent_dim) noise, or None to draw it. Returns the loss."""
    optimizer.zero_grad(set_to_none=True)
    loss = vae.loss(images, beta=beta, eps=eps)
    loss.backward()
    optimizer.step()
    return loss.detach()


def cnn_step(classifier: nn.Module, optimizer: torch.optim.Optimizer, images: torch.Tensor,
             labels: torch.Tensor) -> torch.Tensor:
    """One cross-entropy step: images (N, C, H, W), labels (N,) int64. Returns the loss."""
    optimizer.zero_grad(set_to_none=True)
    loss = F.cross_entropy(classifier(images), labels)
    loss.backward()
    optimizer.step()
    return loss.detach()
