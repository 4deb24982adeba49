"""Eager reference models, plain ``torch.nn``: a DCGAN-style GAN, a VAE and a CNN
classifier. ``imggen_fast.patch(model)`` turns them into fused models."""

from .cnn import CNN
from .gan import Discriminator, Generator
from .vae import VAE, Reparameterize

__all__ = ["CNN", "Discriminator", "Generator", "Reparameterize", "VAE"]
