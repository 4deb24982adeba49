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


# Set on each module patch() created, so that unpatch() reverts those and no others (a
# fused layer a user built directly stays fused).
_PATCHED = "_imggen_fast_patched"


def _retyped(module: nn.Module, new_type: type[nn.Module], **attributes) -> nn.Module:
    """``module`` as an instance of ``new_type`` holding the same parameters, buffers,
    submodules and hooks: the same containers, so the hook handles made before stay
    valid."""
    new = new_type.__new__(new_type)
    new.__dict__ = dict(module.__dict__)
    new.__dict__.update(attributes)
    return new


def _sees_output(module: nn.Module) -> bool:
    """True when a hook of ``module`` sees its output or the gradient of its output."""
    return bool(module._forward_hooks or module._backward_hooks or module._backward_pre_hooks)


def _fusable(layer: nn.Module, activation: nn.Module) -> bool:
    """True for a (Conv2d | ConvTranspose2d | Linear, LeakyReLU) pair the fused layer
    computes exactly: a slope >= 0 (the fused layers' contract), no hook that would see
    the layer's output (fusion activates it) and none on the activation (fusion removes
    its call)."""
    return (type(layer) in LAYER_PAIRS and type(activation) is nn.LeakyReLU and activation.negative_slope >= 0
            and not _sees_output(layer) and not (_sees_output(activation) or activation._forward_pre_hooks))


def _runs_in_order(parent: nn.Module) -> bool:
    """True when ``parent`` is a Sequential whose forward is torch's: each child consumes
    the output of the one before."""
    return isinstance(parent, nn.Sequential) and type(parent).forward is nn.Sequential.forward


def patch(model: nn.Module) -> nn.Module:
    """Fuses ``model`` in place and returns it (see the module docstring). Pairs whose
    fusion would change what the model computes or reports are left alone: a LeakyReLU
    of negative slope, a layer with a forward hook, an activation with any hook, a
    Sequential subclass with its own forward."""
    for parent in list(model.modules()):
        if _runs_in_order(parent):
            children = list(parent.named_children())
            for (name, child), (next_name, next_child) in zip(children, children[1:]):
                if _fusable(child, next_child):
                    setattr(parent, name, _retyped(child, LAYER_PAIRS[type(child)],
                                                   negative_slope=next_child.negative_slope, **{_PATCHED: True}))
                    setattr(parent, next_name, FusedAway(next_child))
        for name, child in parent.named_children():
            if type(child) in MODULE_SWAPS:
                setattr(parent, name, _retyped(child, MODULE_SWAPS[type(child)], **{_PATCHED: True}))
    return model


def unpatch(model: nn.Module) -> nn.Module:
    """Undoes :func:`patch` in place and returns ``model``: the modules it created become
    plain ``torch.nn`` modules again; fused modules built directly are kept."""
    eager_types = {fused: eager for eager, fused in (*LAYER_PAIRS.items(), *MODULE_SWAPS.items())}
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is FusedAway:
                setattr(parent, name, nn.LeakyReLU(child.negative_slope, inplace=child.inplace))
            elif child.__dict__.get(_PATCHED) and type(child) in eager_types:
                eager = _retyped(child, eager_types[type(child)])
                del eager.__dict__[_PATCHED]
                if type(child) in LAYER_PAIRS.values():
                    del eager.__dict__["negative_slope"]
                setattr(parent, name, eager)
    return model
