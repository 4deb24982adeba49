"""Drop-in modules: subclasses of the torch modules they replace, with the same
constructor signatures (plus the fused op's own arguments), so ``state_dict``,
``isinstance``, initialisation and ``repr`` behave like torch's."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import _checks, functional
from .models import vae as _vae


class _FusedLeakyReLU:
    """Mixin of the fused layers: the ``negative_slope`` attribute and its ``repr``."""

    negative_slope: float

    def _set_negative_slope(self, negative_slope: float) -> None:
        self.negative_slope = _checks.check_negative_slope(negative_slope, type(self).__name__)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, negative_slope={self.negative_slope}"


class ConvTranspose2dLeakyReLU(_FusedLeakyReLU, nn.ConvTranspose2d):
    """``nn.ConvTranspose2d`` followed by ``nn.LeakyReLU(negative_slope)``, fused.

    The same constructor, parameters, initialisation and ``state_dict`` as
    ``nn.ConvTranspose2d``, plus the keyword ``negative_slope`` (default 0.01, as
    ``nn.LeakyReLU``; 0 is ReLU). Input (N, C_in, H, W) or (C_in, H, W)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, output_padding=0,
                 groups: int = 1, bias: bool = True, dilation=1, padding_mode: str = "zeros", device=None,
                 dtype=None, *, negative_slope: float = 0.01) -> None:
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, output_padding, groups, bias,
                         dilation, padding_mode, device, dtype)
        self._set_negative_slope(negative_slope)

    def forward(self, input: torch.Tensor, output_size: list[int] | None = None) -> torch.Tensor:
        if self.padding_mode != "zeros":
            raise ValueError("Only 'zeros' padding mode is supported for ConvTranspose2dLeakyReLU")
        output_padding = self._output_padding(input, output_size, self.stride, self.padding, self.kernel_size, 2,
                                              self.dilation)
        return functional.conv_transpose2d_leaky_relu(input, self.weight, self.bias, self.stride, self.padding,
                                                      output_padding, self.groups, self.dilation,
                                                      self.negative_slope)


class Conv2dLeakyReLU(_FusedLeakyReLU, nn.Conv2d):
    """``nn.Conv2d`` followed by ``nn.LeakyReLU(negative_slope)``, fused.

    The same constructor (padding modes included), parameters, initialisation and
    ``state_dict`` as ``nn.Conv2d``, plus the keyword ``negative_slope``."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1,
                 groups: int = 1, bias: bool = True, padding_mode: str = "zeros", device=None, dtype=None, *,
                 negative_slope: float = 0.01) -> None:
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias,
                         padding_mode, device, dtype)
        self._set_negative_slope(negative_slope)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        padding = self.padding
        if self.padding_mode != "zeros":
            input = F.pad(input, self._reversed_padding_repeated_twice, mode=self.padding_mode)
            padding = 0
        return functional.conv2d_leaky_relu(input, self.weight, self.bias, self.stride, padding, self.dilation,
                                            self.groups, self.negative_slope)


class LinearLeakyReLU(_FusedLeakyReLU, nn.Linear):
    """``nn.Linear`` followed by ``nn.LeakyReLU(negative_slope)``, fused.

    The same constructor, parameters, initialisation and ``state_dict`` as
    ``nn.Linear``, plus the keyword ``negative_slope``. Input (*, in_features)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None, dtype=None, *,
                 negative_slope: float = 0.01) -> None:
        super().__init__(in_features, out_features, bias, device, dtype)
        self._set_negative_slope(negative_slope)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return functional.linear_leaky_relu(input, self.weight, self.bias, self.negative_slope)


class Reparameterize(_vae.Reparameterize):
    """The VAE reparameterization with its KL term, fused: ``forward(mu, logvar) -> (z, kl)``.

    mu, logvar (N, *): ``z = mu + eps * exp(0.5 * logvar)`` with ``eps ~ N(0, 1)`` made
    in the kernel, and ``kl = beta * KL(N(mu, exp(logvar)) || N(0, 1))`` reduced by
    ``reduction`` (see :func:`imggen_fast.functional.reparameterize_kl`). In ``eval()``
    mode ``z = mu`` unless ``sample_in_eval``. A subclass of the eager
    ``imggen_fast.models.vae.Reparameterize`` with the same constructor and attributes;
    bad arguments are reported by the first call, naming the argument."""

    def forward(self, mu: torch.Tensor, logvar: torch.Tensor,
                eps: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """eps: the noise (N, *) to use, or None to make it in the kernel."""
        z, kl = functional.reparameterize_kl(mu, logvar, eps, beta=self.beta, reduction=self.reduction)
        if not (self.training or self.sample_in_eval):
            z = mu
        return z, kl


class BCEWithLogitsLoss(nn.BCEWithLogitsLoss):
    """``torch.nn.BCEWithLogitsLoss`` (same arguments, buffers and state_dict) computed by
    :func:`imggen_fast.functional.bce_with_logits`: input (*), target (*) or a number."""

    def forward(self, input: torch.Tensor, target: torch.Tensor | float) -> torch.Tensor:
        return functional.bce_with_logits(input, target, self.weight, reduction=self.reduction,
                                          pos_weight=self.pos_weight)


class GANLoss(nn.Module):
    """The GAN losses on discriminator logits, with fixed labels (``real_label=0.9`` for
    one-sided label smoothing): ``d_loss(real_logits, fake_logits)`` for the discriminator
    and the non-saturating ``g_loss(fake_logits)`` for the generator."""

    def __init__(self, real_label: float = 1.0, fake_label: float = 0.0, reduction: str = "mean") -> None:
        super().__init__()
        self.real_label = real_label
        self.fake_label = fake_label
        self.reduction = reduction

    def d_loss(self, real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
        """``bce(real_logits, real_label) + bce(fake_logits, fake_label)``: real (*), fake (*')."""
        return functional.gan_d_loss(real_logits, fake_logits, self.real_label, self.fake_label, self.reduction)

    def g_loss(self, fake_logits: torch.Tensor) -> torch.Tensor:
        """``bce(fake_logits, real_label)``: fake (*)."""
        return functional.gan_g_loss(fake_logits, self.real_label, self.reduction)

    def extra_repr(self) -> str:
        return f"real_label={self.real_label}, fake_label={self.fake_label}, reduction={self.reduction!r}"
