"""Drop-in modules: subclasses of the torch modules they replace, with the same
constructor signatures (plus the fused op's own arguments), so ``state_dict``,
``isinstance``, initialisation and ``repr`` behave like torch's."""

from __future__ import annotations

import torch
from torch import nn

from . import functional
from .models import vae as _vae


class Reparameterize(_vae.Reparameterize):
    """The VAE reparameterization with its KL term, fused: ``forward(mu, logvar) -> (z, kl)``.

    mu, logvar (N, *): ``z = mu + eps * exp(0.5 * logvar)`` with ``eps ~ N(0, 1)`` made
    in the kernel, and ``kl = beta * KL(N(mu, exp(logvar)) || N(0, 1))`` reduced by
    ``reduction`` (see :func:`imggen_fast.functional.reparameterize_kl`). In ``eval()``
    mode ``z = mu`` unless ``sample_in_eval``. A subclass of the eager
    ``imggen_fast.models.vae.Reparameterize`` with the same constructor and attributes;
    bad arguments are reported by the first call, naming the argument."""

    def forward(self, mu: torch.Tensor, logvar: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z, kl = functional.reparameterize_kl(mu, logvar, beta=self.beta, reduction=self.reduction)
        if not (self.training or self.sample_in_eval):
            z = mu
        return z, kl
