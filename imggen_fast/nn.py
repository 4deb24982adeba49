"""Drop-in modules: subclasses of the torch modules they replace, with the same
constructor signatures (plus the fused op's own arguments), so ``state_dict``,
``isinstance``, initialisation and ``repr`` behave like torch's."""

from __future__ import annotations

import torch
from torch import nn

from . import functional


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
