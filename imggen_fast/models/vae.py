"""A convolutional VAE: Conv2d+LeakyReLU encoder to (mu, logvar), the
reparameterization, and a Linear + ConvTranspose2d+LeakyReLU decoder; and the classic
MNIST VAE of PyTorch's examples, with its activations written in ``forward``."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .. import reference
from ._sizes import BASE_SIZE, check_positive, stride2_stages

SLOPE = 0.2
ENCODER_FIRST_CHANNELS = 32
RECONSTRUCTIONS = ("gaussian", "bernoulli")


class Reparameterize(nn.Module):
    """Eager reparameterization with the KL term: ``forward(mu, logvar) -> (z, kl)``.

    mu, logvar (N, *): ``z = mu + eps * exp(0.5 * logvar)`` with ``eps ~ N(0, 1)``, and
    ``kl = beta * KL(N(mu, exp(logvar)) || N(0, 1))`` reduced by ``reduction``. In
    ``eval()`` mode ``z = mu`` unless ``sample_in_eval``. The same interface as
    ``imggen_fast.nn.Reparameterize``, which ``imggen_fast.patch`` swaps in."""

    def __init__(self, beta: float = 1.0, reduction: str = "batchmean", sample_in_eval: bool = False) -> None:
        super().__init__()
        self.beta = beta
        self.reduction = reduction
        self.sample_in_eval = sample_in_eval

    def forward(self, mu: torch.Tensor, logvar: torch.Tensor,
                eps: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """eps: the noise (N, *) to use, or None to draw it."""
        if not (self.training or self.sample_in_eval):
            # No sample is taken: no noise is drawn, only the KL term is computed.
            return mu, self._kl(mu, logvar)
        return self._sample(mu, logvar, eps)

    # Unannotated: TorchScript (which scripts the fused subclass) cannot read this module's
    # postponed annotations, and takes unannotated arguments and results as tensors.
    @torch.jit.ignore
    def _kl(self, mu, logvar):
        """The beta-weighted KL term alone, reduced: mu, logvar (N, *) -> () or (N,)."""
        elements = mu[0].numel() if mu.shape[0] else 0
        return self.beta * reference.reduce_kl(reference.kl_per_sample(mu, logvar), self.reduction, elements)

    @torch.jit.ignore
    def _sample(self, mu: torch.Tensor, logvar: torch.Tensor,
                eps: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(z, kl) with noise: eps, or drawn with torch.randn."""
        return reference.reparameterize_kl(mu, logvar, eps, beta=self.beta, reduction=self.reduction)

    def extra_repr(self) -> str:
        return f"beta={self.beta}, reduction={self.reduction!r}, sample_in_eval={self.sample_in_eval}"


class VAE(nn.Module):
    """Images (N, channels, image_size, image_size) -> (reconstruction, mu, logvar).

    Encoder: Conv2d(k4, s2, p1)+LeakyReLU(0.2) stages 32, 64, 128, ... down to 4 x 4,
    then Linear heads to mu and logvar (N, latent_dim). Decoder: Linear+LeakyReLU to
    (C, 4, 4), ConvTranspose2d(k4, s2, p1)+LeakyReLU stages halving the channels, a
    last stage to ``channels`` without activation: the Gaussian mean (``reconstruction=
    "gaussian"``, images in [-1, 1]) or the Bernoulli logits (``"bernoulli"``, for
    binary images; the targets are ``(x + 1) / 2``)."""

    def __init__(self, image_size: int = 64, channels: int = 3, latent_dim: int = 32,
                 reconstruction: str = "gaussian") -> None:
        super().__init__()
        stages = stride2_stages(image_size, "VAE")
        if reconstruction not in RECONSTRUCTIONS:
            raise ValueError(f"VAE: reconstruction must be 'gaussian' or 'bernoulli', got {reconstruction!r}")
        self.image_size = image_size
        self.channels = check_positive(channels, "channels", "VAE")
        self.latent_dim = check_positive(latent_dim, "latent_dim", "VAE")
        self.reconstruction = reconstruction
        encoder: list[nn.Module] = []
        in_channels = channels
        for stage in range(stages):
            out_channels = ENCODER_FIRST_CHANNELS << stage
            encoder += [nn.Conv2d(in_channels, out_channels, 4, 2, 1), nn.LeakyReLU(SLOPE)]
            in_channels = out_channels
        encoder.append(nn.Flatten())
        self.encoder = nn.Sequential(*encoder)
        flat = in_channels * BASE_SIZE * BASE_SIZE
        self.to_mu = nn.Linear(flat, latent_dim)
        self.to_logvar = nn.Linear(flat, latent_dim)
        self.reparameterize = Reparameterize()
        decoder: list[nn.Module] = [nn.Linear(latent_dim, flat), nn.LeakyReLU(SLOPE),
                                    nn.Unflatten(1, (in_channels, BASE_SIZE, BASE_SIZE))]
        for _ in range(stages - 1):
            decoder += [nn.ConvTranspose2d(in_channels, in_channels // 2, 4, 2, 1), nn.LeakyReLU(SLOPE)]
            in_channels //= 2
        decoder.append(nn.ConvTranspose2d(in_channels, channels, 4, 2, 1))
        self.decoder = nn.Sequential(*decoder)
        if reconstruction == "gaussian":
            self.reconstruction_loss: nn.Module = nn.MSELoss(reduction="sum")
        else:
            self.reconstruction_loss = nn.BCEWithLogitsLoss(reduction="sum")

    def encode(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Images -> (mu, logvar), each (N, latent_dim)."""
        features = self.encoder(images)
        return self.to_mu(features), self.to_logvar(features)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Latents (N, latent_dim) -> reconstruction (N, channels, image_size, image_size)."""
        return self.decoder(z)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        mu, logvar = self.encode(images)
        z, _ = self.reparameterize(mu, logvar)
        return self.decode(z), mu, logvar

    def loss(self, images: torch.Tensor, beta: float = 1.0, eps: torch.Tensor | None = None) -> torch.Tensor:
        """Reconstruction loss (summed over pixels) + beta * KL, averaged over the batch.
        eps: the noise (N, latent_dim), or None to draw it."""
        mu, logvar = self.encode(images)
        z, kl = self.reparameterize(mu, logvar, eps)
        reconstruction = self.decode(z)
        target = images if self.reconstruction == "gaussian" else (images + 1) / 2
        return self.reconstruction_loss(reconstruction, target) / images.shape[0] + beta * kl

    def sample(self, batch_size: int, device: torch.device | str | None = None,
               generator: torch.Generator | None = None) -> torch.Tensor:
        """Decodes standard normal latents; Bernoulli logits are mapped to [-1, 1]."""
        z = torch.randn(batch_size, self.latent_dim, device=device, generator=generator)
        decoded = self.decode(z)
        return decoded if self.reconstruction == "gaussian" else torch.sigmoid(decoded) * 2 - 1


class ClassicVAE(nn.Module):
    """The classic MNIST VAE of PyTorch's examples (``examples/vae``), written as it is
    there: activations called in ``forward`` code, not modules in a Sequential.

    Images (N, 1, 28, 28) or (N, 784) in [0, 1] -> (reconstruction (N, 784) in (0, 1),
    mu, logvar (N, latent_dim)). Linear(784, 400) + ReLU → Linear heads to mu and logvar
    (20); ``reparameterize`` draws ``torch.randn_like``; Linear(20, 400) + ReLU →
    Linear(400, 784) → sigmoid. ``imggen_fast.patch(model)`` finds nothing to fuse here
    (no Sequential); ``imggen_fast.patch(model, trace=True)`` fuses both Linear + ReLU."""

    def __init__(self, input_dim: int = 784, hidden_dim: int = 400, latent_dim: int = 20) -> None:
        super().__init__()
        self.input_dim = check_positive(input_dim, "input_dim", "ClassicVAE")
        self.fc1 = nn.Linear(input_dim, check_positive(hidden_dim, "hidden_dim", "ClassicVAE"))
        self.fc21 = nn.Linear(hidden_dim, check_positive(latent_dim, "latent_dim", "ClassicVAE"))
        self.fc22 = nn.Linear(hidden_dim, latent_dim)
        self.fc3 = nn.Linear(latent_dim, hidden_dim)
        self.fc4 = nn.Linear(hidden_dim, input_dim)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h1 = F.relu(self.fc1(x))
        return self.fc21(h1), self.fc22(h1)

    def reparameterize(self, mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
        std = torch.exp(0.5 * logvar)
        eps = torch.randn_like(std)
        return mu + eps * std

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        h3 = F.relu(self.fc3(z))
        return torch.sigmoid(self.fc4(h3))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        mu, logvar = self.encode(x.view(-1, self.input_dim))
        z = self.reparameterize(mu, logvar)
        return self.decode(z), mu, logvar

    @staticmethod
    def loss(reconstruction: torch.Tensor, x: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
        """The example's loss: BCE summed over pixels + KL divergence, summed over the batch."""
        bce = F.binary_cross_entropy(reconstruction, x.reshape(reconstruction.shape), reduction="sum")
        return bce - 0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp())
