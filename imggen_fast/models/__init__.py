"""Eager reference models, plain ``torch.nn``: a DCGAN-style GAN and the classic DCGAN
(``kind="dcgan"``), a VAE and the classic MNIST VAE, and a CNN classifier.
``imggen_fast.patch(model)`` turns them into fused models."""

from .cnn import CNN
from .gan import Discriminator, Generator
from .vae import VAE, ClassicVAE, Reparameterize

__all__ = ["CNN", "ClassicVAE", "Discriminator", "Generator", "Reparameterize", "VAE"]
