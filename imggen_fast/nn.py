"""Drop-in modules: subclasses of the torch modules they replace, with the same
constructor signatures (plus the fused op's own arguments), so ``state_dict``,
``isinstance``, initialisation and ``repr`` behave like torch's.

``torch.jit.script`` compiles them: the torch part of each ``forward`` (padding, the
batch norm's running-statistics bookkeeping) is compiled, and the fused call itself
runs in Python (``torch.jit.ignore``), so a scripted model runs the fused kernels but
cannot be saved with ``torch.jit.save`` (``imggen_fast.unpatch`` it first). This module
does not use postponed annotations: TorchScript reads the annotations of the ignored
methods and cannot resolve them as strings."""

from typing import List, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from . import _checks, functional
from .models import vae as _vae


class _FusedLeakyReLU:
    """Mixin of the fused modules: the ``negative_slope`` attribute and its ``repr``."""

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

    def forward(self, input: torch.Tensor, output_size: Optional[List[int]] = None) -> torch.Tensor:
        if self.padding_mode != "zeros":
            raise ValueError("Only 'zeros' padding mode is supported for ConvTranspose2dLeakyReLU")
        output_padding = self._output_padding(input, output_size, self.stride, self.padding, self.kernel_size, 2,
                                              self.dilation)
        return self._fused(input, output_padding)

    @torch.jit.ignore
    def _fused(self, input: torch.Tensor, output_padding: List[int]) -> torch.Tensor:
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
        if self.padding_mode != "zeros":
            return self._fused(F.pad(input, self._reversed_padding_repeated_twice, mode=self.padding_mode), True)
        return self._fused(input, False)

    @torch.jit.ignore
    def _fused(self, input: torch.Tensor, padded: bool) -> torch.Tensor:
        """padded: the input already carries the padding (a non-zeros padding mode)."""
        return functional.conv2d_leaky_relu(input, self.weight, self.bias, self.stride, 0 if padded else self.padding,
                                            self.dilation, self.groups, self.negative_slope)


class LinearLeakyReLU(_FusedLeakyReLU, nn.Linear):
    """``nn.Linear`` followed by ``nn.LeakyReLU(negative_slope)``, fused.

    The same constructor, parameters, initialisation and ``state_dict`` as
    ``nn.Linear``, plus the keyword ``negative_slope``. Input (*, in_features)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None, dtype=None, *,
                 negative_slope: float = 0.01) -> None:
        super().__init__(in_features, out_features, bias, device, dtype)
        self._set_negative_slope(negative_slope)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return self._fused(input)

    @torch.jit.ignore
    def _fused(self, input: torch.Tensor) -> torch.Tensor:
        return functional.linear_leaky_relu(input, self.weight, self.bias, self.negative_slope)


class _BatchNormLeakyReLU(_FusedLeakyReLU):
    """Mixin of the fused batch norms: torch's ``_BatchNorm.forward`` (the same running
    statistics bookkeeping, line for line) with ``F.batch_norm`` replaced by
    :func:`imggen_fast.functional.batch_norm_leaky_relu`."""

    # Whether forward may write its output over its input (see BatchNorm2dLeakyReLU).
    overwrite_input = False

    def _set_activation(self, negative_slope: float, inplace: bool, overwrite_input: bool) -> None:
        self._set_negative_slope(negative_slope)
        self.inplace = _checks.check_bool(inplace, "inplace", type(self).__name__)
        self.overwrite_input = _checks.check_bool(overwrite_input, "overwrite_input", type(self).__name__)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(input)
        # Set to the momentum even when it is unused, as torch does (for ONNX export).
        if self.momentum is None:
            exponential_average_factor = 0.0
        else:
            exponential_average_factor = self.momentum
        if self.training and self.track_running_stats:
            if self.num_batches_tracked is not None:
                self.num_batches_tracked.add_(1)
                if self.momentum is None:  # cumulative moving average
                    exponential_average_factor = 1.0 / float(self.num_batches_tracked)
                else:
                    exponential_average_factor = self.momentum
        # Batch statistics in training, and in eval when there are no running statistics.
        if self.training:
            batch_statistics = True
        else:
            batch_statistics = (self.running_mean is None) and (self.running_var is None)
        # The running statistics are passed only where they are used: updated (training
        # and tracked) or normalizing (eval).
        track = not self.training or self.track_running_stats
        return self._fused(input, self.running_mean if track else None, self.running_var if track else None,
                           batch_statistics, exponential_average_factor)

    @torch.jit.ignore
    def _fused(self, input: torch.Tensor, running_mean: Optional[torch.Tensor], running_var: Optional[torch.Tensor],
               batch_statistics: bool, momentum: float) -> torch.Tensor:
        return functional.batch_norm_leaky_relu(input, running_mean, running_var, self.weight, self.bias,
                                                batch_statistics, momentum, self.eps, self.negative_slope,
                                                overwrite_input=self.overwrite_input)

    def extra_repr(self) -> str:
        return (super().extra_repr() + (", inplace=True" if self.inplace else "")
                + (", overwrite_input=True" if self.overwrite_input else ""))


class BatchNorm2dLeakyReLU(_BatchNormLeakyReLU, nn.BatchNorm2d):
    """``nn.BatchNorm2d`` followed by ``nn.LeakyReLU(negative_slope)`` (0: ``nn.ReLU``), fused.

    The same constructor, parameters, buffers (running statistics, ``num_batches_tracked``),
    ``state_dict`` and training / eval behaviour as ``nn.BatchNorm2d`` (``momentum=None``,
    ``track_running_stats=False`` and eval without running statistics included), plus the
    keywords ``negative_slope`` (>= 0), ``inplace`` and ``overwrite_input``. Input
    (N, C, H, W), contiguous or channels_last (the output keeps the input's layout).

    ``inplace`` is the flag of the activation the module stands for (``ReLU(inplace=True)``)
    and changes nothing here; ``imggen_fast.unpatch`` restores it. ``overwrite_input=True``
    lets forward write its output over its input (CPU, negative_slope > 0): the input must
    have no other use. ``imggen_fast.patch`` sets it where that holds (the module before
    this one in its ``nn.Sequential`` is a convolution or linear layer without hooks, whose
    backward does not need its output); a hook added afterwards to that layer that keeps
    its output would see it overwritten. Autograd's version counter records the write, so
    a backward needing the old input raises rather than computing wrong gradients.

    Kept for backward: the activated output alone where the normalized input can be
    recovered from it (negative_slope > 0, CPU, ``|bias| <= 4 |weight|`` in every channel:
    InPlace-ABN), else the input, as eager BatchNorm keeps it (ReLU, CUDA); the per-channel
    statistics in both cases. See :func:`imggen_fast.functional.batch_norm_leaky_relu`."""

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: Optional[float] = 0.1, affine: bool = True,
                 track_running_stats: bool = True, device=None, dtype=None, *, bias: bool = True,
                 negative_slope: float = 0.01, inplace: bool = False, overwrite_input: bool = False) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype, bias=bias)
        self._set_activation(negative_slope, inplace, overwrite_input)


class BatchNorm1dLeakyReLU(_BatchNormLeakyReLU, nn.BatchNorm1d):
    """``nn.BatchNorm1d`` followed by ``nn.LeakyReLU(negative_slope)`` (0: ``nn.ReLU``), fused:
    as :class:`BatchNorm2dLeakyReLU` for input (N, C) or (N, C, L)."""

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: Optional[float] = 0.1, affine: bool = True,
                 track_running_stats: bool = True, device=None, dtype=None, *, bias: bool = True,
                 negative_slope: float = 0.01, inplace: bool = False, overwrite_input: bool = False) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype, bias=bias)
        self._set_activation(negative_slope, inplace, overwrite_input)


class Reparameterize(_vae.Reparameterize):
    """The VAE reparameterization with its KL term, fused: ``forward(mu, logvar) -> (z, kl)``.

    mu, logvar (N, *): ``z = mu + eps * exp(0.5 * logvar)`` with ``eps ~ N(0, 1)`` made
    in the kernel, and ``kl = beta * KL(N(mu, exp(logvar)) || N(0, 1))`` reduced by
    ``reduction`` (see :func:`imggen_fast.functional.reparameterize_kl`). In ``eval()``
    mode ``z = mu`` unless ``sample_in_eval``. A subclass of the eager
    ``imggen_fast.models.vae.Reparameterize`` with the same constructor and attributes;
    bad arguments are reported by the first call, naming the argument."""

    # The base class's forward, repeated with annotations TorchScript reads (the base module
    # uses postponed annotations, which it cannot), so that a patched model scripts.
    def forward(self, mu: torch.Tensor, logvar: torch.Tensor,
                eps: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        """eps: the noise (N, *) to use, or None to make it in the kernel."""
        if not (self.training or self.sample_in_eval):
            return mu, self._kl(mu, logvar)
        return self._sample(mu, logvar, eps)

    @torch.jit.ignore
    def _sample(self, mu: torch.Tensor, logvar: torch.Tensor,
                eps: Optional[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
        """(z, kl) from the fused kernel: eps, or noise made in the kernel."""
        return functional.reparameterize_kl(mu, logvar, eps, beta=self.beta, reduction=self.reduction)


class BCEWithLogitsLoss(nn.BCEWithLogitsLoss):
    """``torch.nn.BCEWithLogitsLoss`` (same arguments, buffers and state_dict) computed by
    :func:`imggen_fast.functional.bce_with_logits`: input (*), target (*) or a number."""

    def forward(self, input: torch.Tensor, target: Union[torch.Tensor, float]) -> torch.Tensor:
        return self._fused(input, target)

    @torch.jit.ignore
    def _fused(self, input: torch.Tensor, target: Union[torch.Tensor, float]) -> torch.Tensor:
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
