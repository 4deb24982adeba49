"""``patch(model)`` turns a plain ``torch.nn`` model into a fused one, ``unpatch`` back.

One generic walker, no per-model code. Inside every ``nn.Sequential`` it fuses each
(Conv2d | ConvTranspose2d | Linear, LeakyReLU) pair of consecutive children into the
fused layer of ``imggen_fast.nn`` (the Sequential order guarantees the activation
consumes the layer's output), and swaps the modules that have a drop-in fused twin.
Parameters are shared, not copied: an optimizer built before the patch keeps
training the same tensors, and ``state_dict`` keys do not change (the LeakyReLU's
place is kept by a parameterless :class:`FusedAway` placeholder)."""

from __future__ import annotations

from torch import nn

from . import models
from . import nn as fused_nn

# Eager layer type -> fused type. Exact types only: a subclass may behave differently.
LAYER_PAIRS: dict[type[nn.Module], type[nn.Module]] = {
    nn.Conv2d: fused_nn.Conv2dLeakyReLU,
    nn.ConvTranspose2d: fused_nn.ConvTranspose2dLeakyReLU,
    nn.Linear: fused_nn.LinearLeakyReLU,
}
# Eager module type -> drop-in fused type (same attributes, same forward signature).
MODULE_SWAPS: dict[type[nn.Module], type[nn.Module]] = {
    models.vae.Reparameterize: fused_nn.Reparameterize,
    nn.BCEWithLogitsLoss: fused_nn.BCEWithLogitsLoss,
}


class FusedAway(nn.Identity):
    """Stands where a LeakyReLU was fused into the layer before it; remembers its settings
    so that :func:`unpatch` can put it back."""

    def __init__(self, activation: nn.LeakyReLU) -> None:
        super().__init__()
        self.negative_slope = activation.negative_slope
        self.inplace = activation.inplace

    def extra_repr(self) -> str:
        return f"fused LeakyReLU(negative_slope={self.negative_slope})"


def _retyped(module: nn.Module, new_type: type[nn.Module], **attributes) -> nn.Module:
    """``module`` as an instance of ``new_type`` holding the same parameters, buffers,
    submodules and hooks (the containers are copied, their contents shared)."""
    new = new_type.__new__(new_type)
    new.__dict__ = {key: dict(value) if isinstance(value, dict) else value for key, value in module.__dict__.items()}
    new.__dict__.update(attributes)
    return new


def patch(model: nn.Module) -> nn.Module:
    """Fuses ``model`` in place and returns it (see the module docstring)."""
    inverse_layers = set(LAYER_PAIRS.values())
    for parent in list(model.modules()):
        children = list(parent.named_children())
        if isinstance(parent, nn.Sequential):
            for (name, child), (next_name, next_child) in zip(children, children[1:]):
                if type(child) in LAYER_PAIRS and type(child) not in inverse_layers and type(next_child) is nn.LeakyReLU:
                    setattr(parent, name, _retyped(child, LAYER_PAIRS[type(child)],
                                                   negative_slope=next_child.negative_slope))
                    setattr(parent, next_name, FusedAway(next_child))
        for name, child in parent.named_children():
            if type(child) in MODULE_SWAPS:
                setattr(parent, name, _retyped(child, MODULE_SWAPS[type(child)]))
    return model


def unpatch(model: nn.Module) -> nn.Module:
    """Undoes :func:`patch` in place and returns ``model``: plain ``torch.nn`` modules again."""
    eager_layers = {fused: eager for eager, fused in LAYER_PAIRS.items()}
    eager_modules = {fused: eager for eager, fused in MODULE_SWAPS.items()}
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) in eager_layers:
                eager = _retyped(child, eager_layers[type(child)])
                del eager.__dict__["negative_slope"]
                setattr(parent, name, eager)
            elif type(child) is FusedAway:
                setattr(parent, name, nn.LeakyReLU(child.negative_slope, inplace=child.inplace))
            elif type(child) in eager_modules:
                setattr(parent, name, _retyped(child, eager_modules[type(child)]))
    return model
