"""``patch(model)`` turns a plain ``torch.nn`` model into a fused one, ``unpatch`` back.

One set of pair rules, applied in two ways:

* ``patch(model)`` changes ``model`` in place. Inside every ``nn.Sequential`` (whose
  torch forward makes each child consume the output of the one before), each
  (Conv2d | ConvTranspose2d | Linear | BatchNorm1d | BatchNorm2d, ReLU | LeakyReLU) pair
  of consecutive children (an ``nn.Identity`` between them is looked through) becomes
  the fused module of ``imggen_fast.nn``; the activation's place is kept by a
  parameterless :class:`FusedAway`. Modules with a drop-in fused twin (the VAE's
  ``Reparameterize``, ``nn.BCEWithLogitsLoss``) are swapped. Parameters and buffers are
  shared, not copied: an optimizer built before the patch keeps training the same
  tensors, and ``state_dict`` keys do not change.
* ``patch(model, trace=True)`` returns a ``torch.fx``-traced copy of ``model`` (a deep
  copy: its own parameters; ``model`` is untouched) in which activations written in
  ``forward`` (``F.relu``, ``torch.relu``, ``x.relu()``, ``F.leaky_relu``, in place or
  not, and the activation modules) that consume the output of a linear / convolution /
  transposed convolution / batch norm (module, or ``F.linear`` / ``F.conv2d`` /
  ``F.conv_transpose2d`` / ``F.batch_norm`` call) with no other use are fused.

A pair is fused only where the fused module computes exactly what the pair did: exact
types (a subclass may behave differently), a slope the fused layers run (finite,
>= 0: a negative, infinite, NaN or bool slope is refused here, not at the first
forward), no hook that would see the difference, and a layer used in several places
(twice in a Sequential, or shared between modules) only if every use is fused the same
way. ``SyncBatchNorm`` is left alone (its statistics are reduced across processes).
Every decision is in the :class:`PatchReport` (``patch_report(model)``;
``verbose=True`` prints it)."""

from __future__ import annotations

import copy
import dataclasses
import warnings
from collections import defaultdict
import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from . import _checks, functional, models
from . import nn as fused_nn

# Eager layer type -> fused type, when an activation follows. Exact types only.
LAYER_PAIRS: dict[type[nn.Module], type[nn.Module]] = {
    nn.Conv2d: fused_nn.Conv2dLeakyReLU,
    nn.ConvTranspose2d: fused_nn.ConvTranspose2dLeakyReLU,
    nn.Linear: fused_nn.LinearLeakyReLU,
    nn.BatchNorm1d: fused_nn.BatchNorm1dLeakyReLU,
    nn.BatchNorm2d: fused_nn.BatchNorm2dLeakyReLU,
}
# Eager module type -> drop-in fused type (same attributes, same forward signature).
MODULE_SWAPS: dict[type[nn.Module], type[nn.Module]] = {
    models.vae.Reparameterize: fused_nn.Reparameterize,
    nn.BCEWithLogitsLoss: fused_nn.BCEWithLogitsLoss,
}
ACTIVATIONS = (nn.ReLU, nn.LeakyReLU)
# Layers whose output a batch norm right after them may overwrite (overwrite_input): their
# backward needs their input and weight, never their output. Exact types.
OVERWRITABLE_PRODUCERS = (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)
# Functional layer -> its fused function (same argument names, plus negative_slope).
FUNCTION_PAIRS = {
    F.linear: functional.linear_leaky_relu,
    F.conv2d: functional.conv2d_leaky_relu,
    F.conv_transpose2d: functional.conv_transpose2d_leaky_relu,
    F.batch_norm: functional.batch_norm_leaky_relu,
}
_RELU_FUNCTIONS = {F.relu, torch.relu, torch.relu_}  # F.relu_ is torch.relu_
_LEAKY_RELU_FUNCTIONS = {F.leaky_relu, F.leaky_relu_}
_RELU_METHODS = {"relu", "relu_"}
_SYNC_BATCH_NORM_REASON = ("SyncBatchNorm is left alone: it reduces its statistics across processes, which the fused "
                           "batch norm does not do")

# Markers in the __dict__ of what patch() made (not module attributes torch registers):
# the attribute names patch added, the module it stands for, the report, a traced copy.
_PATCHED = "_imggen_fast_patched"
_ORIGINAL = "_imggen_fast_original"
_REPORT = "_imggen_fast_patch_report"
_TRACED = "_imggen_fast_traced"


class CannotTrace(RuntimeError):
    """``patch(model, trace=True)`` could not trace ``model`` with torch.fx; the message
    carries torch.fx's reason."""


@dataclasses.dataclass(frozen=True)
class PatchEntry:
    """One decision of :func:`patch`: ``action`` is ``"fused"``, ``"swapped"``,
    ``"skipped"``, ``"converted"`` or (:func:`imggen_fast.fuse_for_inference`) ``"folded"``; ``where`` the module paths (or traced node names);
    ``what`` the modules or calls; ``reason`` why, for what was skipped."""

    action: str
    where: str
    what: str
    reason: str = ""


@dataclasses.dataclass
class PatchReport:
    """What :func:`patch` fused, swapped, converted and skipped (and why). ``str(report)``
    is a table; ``patch(model, verbose=True)`` prints it."""

    entries: list[PatchEntry] = dataclasses.field(default_factory=list)
    traced: bool = False

    def add(self, action: str, where: str, what: str, reason: str = "") -> None:
        self.entries.append(PatchEntry(action, where, what, reason))

    def of(self, action: str) -> list[PatchEntry]:
        """The entries with this action."""
        return [entry for entry in self.entries if entry.action == action]

    @property
    def fused(self) -> list[PatchEntry]:
        return self.of("fused")

    @property
    def skipped(self) -> list[PatchEntry]:
        return self.of("skipped")

    @property
    def swapped(self) -> list[PatchEntry]:
        return self.of("swapped")

    def __str__(self) -> str:
        counts = ", ".join(f"{len(self.of(action))} {action}" for action in ("folded", "fused", "swapped", "converted",
                                                                              "skipped")
                           if action in ("fused", "skipped") or self.of(action))
        title = f"imggen_fast.patch{' (traced copy)' if self.traced else ''}: {counts}"
        if not self.entries:
            hint = "" if self.traced else (" (patch(model) fuses pairs of modules inside an nn.Sequential; "
                                           "patch(model, trace=True) also fuses activations called in forward)")
            return f"{title}: nothing fused{hint}"
        rows = [("action", "where", "what", "why")] + [
            (entry.action, entry.where, entry.what, entry.reason) for entry in self.entries]
        widths = [max(len(row[column]) for row in rows) for column in range(3)]
        lines = ["  ".join(cell.ljust(width) for cell, width in zip(row[:3], widths)) + "  " + row[3] for row in rows]
        return "\n".join([title] + [line.rstrip() for line in lines])


class FusedAway(nn.Identity):
    """Stands where an activation was fused into the module before it; keeps that
    activation so that :func:`unpatch` puts the very same module back."""

    def __init__(self, activation: nn.Module) -> None:
        super().__init__()
        self.negative_slope = _activation_slope(activation)
        self.inplace = activation.inplace
        self.__dict__[_ORIGINAL] = activation  # not a submodule: state_dict and modules() are unchanged

    def extra_repr(self) -> str:
        return f"fused {self.__dict__[_ORIGINAL]!r}"


def _activation_slope(activation: nn.Module) -> object:
    """The slope of an exact nn.ReLU (0.0) or nn.LeakyReLU, as given (checked later)."""
    return 0.0 if type(activation) is nn.ReLU else activation.negative_slope


def _retyped(module: nn.Module, new_type: type[nn.Module], **attributes) -> nn.Module:
    """``module`` as an instance of ``new_type`` holding the same parameters, buffers,
    submodules and hooks: the same containers, so the hook handles made before stay
    valid."""
    new = new_type.__new__(new_type)
    new.__dict__ = dict(module.__dict__)
    new.__dict__.update(attributes)
    return new


def _made_by_patch(module: nn.Module, new_type: type[nn.Module], **attributes) -> nn.Module:
    """``module`` retyped to ``new_type`` with ``attributes``, marked so that
    :func:`unpatch` can put ``module`` itself back."""
    return _retyped(module, new_type, **attributes, **{_PATCHED: tuple(attributes), _ORIGINAL: module})


def _sees_output(module: nn.Module) -> bool:
    """True when a hook of ``module`` sees its output or the gradient of its output."""
    return bool(module._forward_hooks or module._backward_hooks or module._backward_pre_hooks)


def _has_hooks(module: nn.Module) -> bool:
    return _sees_output(module) or bool(module._forward_pre_hooks)


def _name(module: nn.Module) -> str:
    """A short description: the type, and the slope of an activation."""
    if type(module) is nn.LeakyReLU:
        return f"LeakyReLU({module.negative_slope!r}{', inplace' if module.inplace else ''})"
    if type(module) is nn.ReLU:
        return f"ReLU({'inplace' if module.inplace else ''})"
    return type(module).__name__


def _pair_refusal(layer: nn.Module | None, slope: object, activation: nn.Module | None) -> str | None:
    """Why a (layer, activation of ``slope``) pair cannot be fused, or None: a slope the
    fused modules cannot run, a hook on the layer that would see its (now activated)
    output, any hook on the activation (fusion removes its call). ``layer`` and
    ``activation`` are None for functional calls, which have no hooks."""
    try:
        _checks.check_negative_slope(slope, "the fused layers")
    except (TypeError, ValueError) as error:
        return str(error)
    if layer is not None and _sees_output(layer):
        return f"the {type(layer).__name__} has a hook that sees its output, which fusion would activate"
    if activation is not None and _has_hooks(activation):
        return "the activation has hooks, and fusion removes its call"
    return None


def _fused_layer(layer: nn.Module, slope: object, activation_inplace: bool, overwrite_input: bool = False) -> nn.Module:
    """The fused module standing for (``layer``, an activation of ``slope``), sharing
    ``layer``'s parameters and buffers; a batch norm may overwrite its input if
    ``overwrite_input``."""
    fused_type = LAYER_PAIRS[type(layer)]
    attributes = {"negative_slope": _checks.check_negative_slope(slope, fused_type.__name__)}
    if issubclass(fused_type, fused_nn._BatchNormLeakyReLU):
        attributes["inplace"] = bool(activation_inplace)
        attributes["overwrite_input"] = overwrite_input
    return _made_by_patch(layer, fused_type, **attributes)


def _fused_description(layer: nn.Module, activation: str, slope: object, overwrite_input: bool = False) -> str:
    fused_type = LAYER_PAIRS[type(layer)].__name__
    return (f"{type(layer).__name__} + {activation} -> {fused_type}(negative_slope={float(slope)}"
            f"{', overwrite_input=True' if overwrite_input else ''})")


def _output_is_free(parent: nn.Module, name: str | None) -> bool:
    """True when the output of child ``name`` of in-order Sequential ``parent`` has no use
    but feeding the next child: an exact convolution / linear layer (its backward never
    reads its output) without hooks (none can keep the output)."""
    producer = parent._modules.get(name) if name is not None else None
    return type(producer) in OVERWRITABLE_PRODUCERS and not _has_hooks(producer)


# --- the module walker: nn.Sequential children in order --------------------------------


@dataclasses.dataclass(frozen=True)
class _Slot:
    """One place that holds a module: ``parent._modules[name]``, at ``path`` in the model."""

    parent: nn.Module
    name: str
    path: str


def _walk(model: nn.Module, report: PatchReport) -> tuple[dict[int, list[_Slot]], list[tuple[nn.Module, str]]]:
    """Every slot of every module (by ``id``), walking ``_modules`` in order so that a
    module held twice is seen twice (``named_children`` drops repeats), and every
    container once, with its path. TorchScript submodules are reported and not entered."""
    slots: dict[int, list[_Slot]] = defaultdict(list)
    containers: list[tuple[nn.Module, str]] = []
    seen: set[int] = set()
    stack = [(model, "")]
    while stack:
        module, path = stack.pop()
        if id(module) in seen:
            continue
        seen.add(id(module))
        if isinstance(module, torch.jit.ScriptModule):
            report.add("skipped", path, type(module).__name__,
                       "a TorchScript module: its compiled code cannot be changed")
            continue
        containers.append((module, path))
        children = [(name, child) for name, child in module._modules.items() if child is not None]
        for name, child in children:
            slots[id(child)].append(_Slot(module, name, _child_path(path, name)))
        stack.extend((child, slots[id(child)][-1].path) for _, child in reversed(children))
    return slots, containers


def _runs_in_order(parent: nn.Module) -> bool:
    """True when ``parent`` is a Sequential whose forward is torch's: each child consumes
    the output of the one before."""
    return isinstance(parent, nn.Sequential) and type(parent).forward is nn.Sequential.forward


def _looked_through(module: nn.Module) -> bool:
    """An nn.Identity without hooks: returns its input, so it does not separate a pair."""
    return type(module) is nn.Identity and not _has_hooks(module)


def _child_path(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def _sequential_pairs(parent: nn.Module, consumers: tuple[type[nn.Module], ...]) -> list[tuple[str | None, str]]:
    """(name of the child whose output it consumes, or None for the first, name) for each
    child of in-order Sequential ``parent`` whose type is one of ``consumers``."""
    pairs, previous = [], None
    for name, child in parent._modules.items():
        if child is None:
            continue
        if type(child) in consumers:
            pairs.append((previous, name))
        if not _looked_through(child):
            previous = name
    return pairs


def _set(slot: _Slot, module: nn.Module) -> None:
    slot.parent._modules[slot.name] = module


def _patch_modules(model: nn.Module, report: PatchReport) -> None:
    """Fuses the pairs of every in-order Sequential of ``model`` in place and swaps the
    modules with a fused twin (see the module docstring), recording each decision."""
    slots, containers = _walk(model, report)
    # Each layer that precedes an activation: the (layer slot, activation slot) pairs.
    pairs: dict[int, list[tuple[_Slot, _Slot]]] = defaultdict(list)
    # For each batch norm, whether each of its slots consumes a free output (_output_is_free).
    free_inputs: dict[int, list[bool]] = defaultdict(list)
    for parent, path in containers:
        in_order = _runs_in_order(parent)
        for name, child in parent._modules.items():
            if type(child) is nn.SyncBatchNorm:
                report.add("skipped", _child_path(path, name), "SyncBatchNorm", _SYNC_BATCH_NORM_REASON)
        if not in_order:
            for name, child in parent._modules.items():
                if type(child) in ACTIVATIONS:
                    why = (f"its parent {type(parent).__name__} is a Sequential subclass with its own forward"
                           if isinstance(parent, nn.Sequential) else f"its parent {type(parent).__name__} is not an "
                           "nn.Sequential")
                    report.add("skipped", _child_path(path, name), _name(child),
                               f"{why}, so what it consumes is only known to forward's code; "
                               "patch(model, trace=True) follows that code")
            continue
        for layer_name, activation_name in _sequential_pairs(parent, ACTIVATIONS):
            activation = parent._modules[activation_name]
            activation_slot = _Slot(parent, activation_name, _child_path(path, activation_name))
            layer = parent._modules[layer_name] if layer_name is not None else None
            if layer is None or type(layer) not in LAYER_PAIRS:
                if layer is not None and type(layer) is not nn.SyncBatchNorm:
                    report.add("skipped", activation_slot.path, _name(activation),
                               f"it follows a {type(layer).__name__}, which has no fused form")
                elif layer is None:
                    report.add("skipped", activation_slot.path, _name(activation),
                               "it is the first module of its Sequential")
                continue
            layer_slot = next(slot for slot in slots[id(layer)] if slot.parent is parent and slot.name == layer_name)
            pairs[id(layer)].append((layer_slot, activation_slot))
            if issubclass(LAYER_PAIRS[type(layer)], fused_nn._BatchNormLeakyReLU):
                producers = {name: previous for previous, name in _sequential_pairs(parent, (type(layer),))}
                free_inputs[id(layer)].append(_output_is_free(parent, producers[layer_name]))

    fused_away: dict[int, FusedAway] = {}
    for layer_id, layer_pairs in pairs.items():
        layer = layer_pairs[0][0].parent._modules[layer_pairs[0][0].name]
        activations = [slot.parent._modules[slot.name] for _, slot in layer_pairs]
        slopes = [_activation_slope(activation) for activation in activations]
        reason = next(filter(None, (_pair_refusal(layer, slope, activation)
                                    for slope, activation in zip(slopes, activations))), None)
        paired = {(id(layer_slot.parent), layer_slot.name) for layer_slot, _ in layer_pairs}
        unpaired = [slot.path for slot in slots[layer_id] if (id(slot.parent), slot.name) not in paired]
        if reason is None and unpaired:
            reason = (f"the {type(layer).__name__} is used in {len(slots[layer_id])} places and at "
                      f"{', '.join(unpaired)} no activation follows it, so fusing it would change that use")
        elif reason is None and len({float(slope) for slope in slopes}) > 1:
            reason = (f"the {type(layer).__name__} is used in {len(slots[layer_id])} places, followed by "
                      "activations of different slopes")
        where = ", ".join(f"{layer_slot.path} + {slot.path}" for layer_slot, slot in layer_pairs)
        what = _fused_description(layer, _name(activations[0]), slopes[0]) if reason is None else (
            f"{type(layer).__name__} + {_name(activations[0])}")
        if reason is not None:
            report.add("skipped", where, what, reason)
            continue
        # A batch norm overwrites its input only where that input is free at its one use,
        # nothing else sees it (no hooks), and its output can give backward what it needs.
        overwrite_input = (free_inputs.get(layer_id) == [True] and len(slots[layer_id]) == 1
                           and not _has_hooks(layer) and float(slopes[0]) > 0)
        fused = _fused_layer(layer, slopes[0], activations[0].inplace, overwrite_input)
        for slot in slots[layer_id]:
            _set(slot, fused)
        for _, slot in layer_pairs:
            activation = slot.parent._modules[slot.name]
            _set(slot, fused_away.setdefault(id(activation), FusedAway(activation)))
        report.add("fused", where, _fused_description(layer, _name(activations[0]), slopes[0], overwrite_input))
    _swap_modules(model, report)


def _swap_modules(model: nn.Module, report: PatchReport) -> None:
    """Swaps each module of a type in MODULE_SWAPS for its fused twin, in every slot."""
    slots, _ = _walk(model, PatchReport())
    for module_slots in slots.values():
        module = module_slots[0].parent._modules[module_slots[0].name]
        if type(module) in MODULE_SWAPS:
            swapped = _made_by_patch(module, MODULE_SWAPS[type(module)])
            for slot in module_slots:
                _set(slot, swapped)
            report.add("swapped", ", ".join(slot.path for slot in module_slots),
                       f"{type(module).__name__} -> imggen_fast.nn.{type(swapped).__name__}")


# --- the traced walker: torch.fx graph edges -------------------------------------------


class _Tracer(torch.fx.Tracer):
    """torch.fx's tracer with imggen_fast's modules as leaves (called, not traced
    through): their functional calls validate their arguments in Python."""

    LEAVES = (*LAYER_PAIRS.values(), *MODULE_SWAPS, *MODULE_SWAPS.values(), FusedAway, fused_nn.GANLoss)

    def is_leaf_module(self, module: nn.Module, qualified_name: str) -> bool:
        return type(module) in self.LEAVES or super().is_leaf_module(module, qualified_name)


def _argument(node: torch.fx.Node, position: int, name: str, default: object) -> object:
    return node.args[position] if len(node.args) > position else node.kwargs.get(name, default)


def _activation_call(node: torch.fx.Node,
                     modules: dict[str, nn.Module]) -> tuple[object, object, bool, str] | None:
    """(input, slope, in place, description) when ``node`` applies ReLU or LeakyReLU,
    else None."""
    if node.op == "call_function" and node.target in _RELU_FUNCTIONS:
        inplace = node.target is torch.relu_ or bool(_argument(node, 1, "inplace", False))
        return _argument(node, 0, "input", None), 0.0, inplace, f"{node.target.__name__}()"
    if node.op == "call_function" and node.target in _LEAKY_RELU_FUNCTIONS:
        inplace = node.target is F.leaky_relu_ or bool(_argument(node, 2, "inplace", False))
        return (_argument(node, 0, "input", None), _argument(node, 1, "negative_slope", 0.01), inplace,
                f"{node.target.__name__}()")
    if node.op == "call_method" and node.target in _RELU_METHODS:
        return node.args[0], 0.0, node.target == "relu_", f".{node.target}()"
    if node.op == "call_module" and type(modules[node.target]) in ACTIVATIONS:
        module = modules[node.target]
        return _argument(node, 0, "input", None), _activation_slope(module), module.inplace, _name(module)
    return None


def _describe(node: object, modules: dict[str, nn.Module]) -> str:
    if not isinstance(node, torch.fx.Node):
        return repr(node)
    if node.op == "call_module":
        return f"{node.target} ({_name(modules[node.target])})"
    if node.op == "call_function":
        return f"{getattr(node.target, '__name__', node.target)}()"
    if node.op == "call_method":
        return f".{node.target}()"
    return f"{node.op} {node.target}"


def _trace(model: nn.Module, root: nn.Module) -> torch.fx.Graph:
    """torch.fx's graph of ``root.forward``, or CannotTrace with torch.fx's reason."""
    try:
        return _Tracer().trace(root)
    # torch.fx reports an untraceable forward with whatever the forward's code raised on
    # proxies (TraceError, TypeError, AttributeError, ...): each is re-raised, with its
    # message, as CannotTrace.
    except Exception as error:  # noqa: BLE001 - re-raised with the cause attached
        raise CannotTrace(f"patch(model, trace=True): torch.fx cannot trace {type(model).__name__}.forward: "
                          f"{type(error).__name__}: {error}. Patch without trace=True (Sequential pairs only), or "
                          "make forward traceable (no Python control flow on tensor values)") from error


def _training_positions(first: object, second: object, first_mode: bool, positions: list) -> bool:
    """Whether two argument structures of matching nodes of a train-mode and an eval-mode
    trace are equal but for constants that are the training flag itself (``first_mode``
    in ``first``, its negation in ``second``); appends those constants' paths to
    ``positions``, as tuples of indices / keys."""
    def walk(a: object, b: object, path: tuple) -> bool:
        if isinstance(a, torch.fx.Node) or isinstance(b, torch.fx.Node):
            return isinstance(a, torch.fx.Node) and isinstance(b, torch.fx.Node) and a.name == b.name
        if type(a) is not type(b):
            return False
        if isinstance(a, (tuple, list)):
            return len(a) == len(b) and all(walk(x, y, path + (index,)) for index, (x, y) in enumerate(zip(a, b)))
        if isinstance(a, dict):
            return a.keys() == b.keys() and all(walk(a[key], b[key], path + (key,)) for key in a)
        if isinstance(a, bool) and a is first_mode and b is (not first_mode):
            positions.append(path)
            return True
        return a == b
    return walk(first, second, ())


def _replaced(structure: object, path: tuple, value: object) -> object:
    """``structure`` (nested tuples / lists / dicts) with the item at ``path`` replaced."""
    if not path:
        return value
    head, rest = path[0], path[1:]
    if isinstance(structure, dict):
        return {**structure, head: _replaced(structure[head], rest, value)}
    items = list(structure)
    items[head] = _replaced(items[head], rest, value)
    return type(structure)(items)


def _follow_training_flag(graph: torch.fx.Graph, other: torch.fx.Graph, mode: bool) -> bool:
    """Makes ``graph`` (traced in ``mode``) read ``self.training`` at run time where it and
    ``other`` (traced in the other mode) differ only by the training flag as a constant
    argument (``F.batch_norm(..., self.training)``, ``F.dropout(..., self.training)``).
    Returns False, changing nothing, if they differ otherwise (forward branches on it)."""
    nodes, other_nodes = list(graph.nodes), list(other.nodes)
    if len(nodes) != len(other_nodes):
        return False
    substitutions = []
    for node, other_node in zip(nodes, other_nodes):
        positions: list[tuple] = []
        if (node.op, node.target, node.name) != (other_node.op, other_node.target, other_node.name) or not (
                _training_positions((node.args, node.kwargs), (other_node.args, other_node.kwargs), mode, positions)):
            return False
        substitutions += [(node, position) for position in positions]
    if substitutions:
        placeholders = [node for node in nodes if node.op == "placeholder"]
        # get_attr of a plain attribute: torch.fx warns that it is no parameter, buffer or
        # submodule, but codegen reads it as self.training, which is what is meant.
        with graph.inserting_after(placeholders[-1]) if placeholders else graph.inserting_before(nodes[0]), \
                warnings.catch_warnings():
            warnings.filterwarnings("ignore", "Attempted to insert a get_attr Node with no underlying reference")
            training = graph.get_attr("training")
        for node, (which, *path) in substitutions:
            if which == 0:
                node.args = _replaced(node.args, tuple(path), training)
            else:
                node.kwargs = _replaced(node.kwargs, tuple(path), training)
    return True


class _TracedInMode:
    """Forward pre-hook of a traced copy whose forward branches on ``self.training``: the
    copy computes what forward did in the mode it was traced in, so it refuses the other."""

    def __init__(self, training: bool) -> None:
        self.training = training

    def __call__(self, module: nn.Module, args: tuple) -> None:
        if module.training != self.training:
            mode = "train" if self.training else "eval"
            raise RuntimeError(f"this copy made by imggen_fast.patch(model, trace=True) was traced in {mode} mode, "
                               "and the model's forward branches on self.training, so it runs in that mode only; "
                               f"patch(model.{'eval' if self.training else 'train'}(), trace=True) makes a copy "
                               "for the other mode")


def _traced_copy(model: nn.Module, report: PatchReport, training: bool | None = None) -> torch.fx.GraphModule:
    """A GraphModule traced from a deep copy of ``model``, or CannotTrace with torch.fx's
    reason. Refuses a model whose inlined modules have hooks (tracing would run them
    once, at trace time, instead of on every call).

    Tracing runs Python code once, so the training flag forward reads is frozen: forward
    is traced in both modes; where they differ only by that flag passed as an argument,
    the copy reads its own ``training`` at run time (train() / eval() work); where forward
    branches on it, the copy keeps ``training`` (default: the model's current mode) and
    refuses the other."""
    tracer = _Tracer()
    for path, module in model.named_modules():
        if path and _has_hooks(module) and not tracer.is_leaf_module(module, path):
            raise CannotTrace(f"patch(model, trace=True): {path} ({type(module).__name__}) has hooks, and tracing "
                              "inlines its forward: they would run once at trace time, not on every call. Remove "
                              "them or patch without trace=True")
    root = copy.deepcopy(model)
    mode = model.training if training is None else training
    other = _trace(model, root.train(not mode))
    graph = _trace(model, root.train(mode))
    graph_module = torch.fx.GraphModule(root, graph, type(model).__name__).train(mode)
    if not _follow_training_flag(graph, other, mode):
        graph_module.register_forward_pre_hook(_TracedInMode(mode))
        report.add("skipped", "forward", "train() / eval() of the copy",
                   f"forward branches on self.training, so the copy runs in {'train' if mode else 'eval'} mode only")
    graph_module.recompile()
    return graph_module


def _set_submodule(root: nn.Module, target: str, module: nn.Module) -> None:
    parent_path, _, name = target.rpartition(".")
    root.get_submodule(parent_path)._modules[name] = module


def _patch_graph(graph_module: torch.fx.GraphModule, report: PatchReport) -> None:
    """Fuses every (layer call, activation call) edge of the traced graph whose layer
    output has no other user, recording each decision."""
    graph = graph_module.graph
    modules = dict(graph_module.named_modules())
    module_pairs: dict[str, list[tuple[torch.fx.Node, torch.fx.Node, object, str]]] = defaultdict(list)
    function_pairs = []
    for node in list(graph.nodes):
        activation = _activation_call(node, modules)
        if activation is None:
            continue
        producer, slope, inplace, activation_name = activation
        where = f"{_describe(producer, modules)} -> {_describe(node, modules)}"
        activation_module = modules[node.target] if node.op == "call_module" else None
        is_module_layer = (isinstance(producer, torch.fx.Node) and producer.op == "call_module"
                           and type(modules[producer.target]) in LAYER_PAIRS)
        is_function_layer = (isinstance(producer, torch.fx.Node) and producer.op == "call_function"
                             and producer.target in FUNCTION_PAIRS)
        if not (is_module_layer or is_function_layer):
            sync = (isinstance(producer, torch.fx.Node) and producer.op == "call_module"
                    and type(modules[producer.target]) is nn.SyncBatchNorm)
            report.add("skipped", where, activation_name, _SYNC_BATCH_NORM_REASON if sync else
                       "what it consumes is not a layer with a fused form")
            continue
        layer = modules[producer.target] if is_module_layer else None
        if isinstance(slope, torch.fx.Node):
            reason = "its slope is computed at run time"
        elif len(producer.users) > 1:
            reason = (f"the layer's output has other uses ({', '.join(user.name for user in producer.users)}), "
                      "which would see the activated value")
        else:
            reason = _pair_refusal(layer, slope, activation_module)
        if reason is not None:
            report.add("skipped", where, activation_name, reason)
        elif is_module_layer:
            module_pairs[producer.target].append((producer, node, slope, inplace, where, activation_name))
        else:
            function_pairs.append((producer, node, slope, where, activation_name))

    for target, pairs in module_pairs.items():
        layer = modules[target]
        calls = [node for node in graph.nodes if node.op == "call_module" and node.target == target]
        where = "; ".join(pair[4] for pair in pairs)
        reason = None
        if len(calls) > len(pairs):
            reason = (f"{target} is called {len(calls)} times in forward and only {len(pairs)} of the calls is "
                      "followed by a fusable activation, so fusing it would change the others")
        elif len({float(pair[2]) for pair in pairs}) > 1:
            reason = f"{target} is called {len(calls)} times, followed by activations of different slopes"
        if reason is not None:
            report.add("skipped", where, type(layer).__name__, reason)
            continue
        _set_submodule(graph_module, target, _fused_layer(layer, pairs[0][2], pairs[0][3]))
        for producer, node, *_ in pairs:
            node.replace_all_uses_with(producer)
            graph.erase_node(node)
        report.add("fused", where, _fused_description(layer, pairs[0][5], pairs[0][2]))

    for producer, node, slope, where, activation_name in function_pairs:
        fused_function = FUNCTION_PAIRS[producer.target]
        with graph.inserting_after(producer):
            fused = graph.call_function(fused_function, producer.args,
                                        {**producer.kwargs, "negative_slope": float(slope)})
        node.replace_all_uses_with(fused)
        graph.erase_node(node)
        graph.erase_node(producer)
        report.add("fused", where, f"{producer.target.__name__}() + {activation_name} -> "
                   f"imggen_fast.functional.{fused_function.__name__}(negative_slope={float(slope)})")
    graph.lint()
    graph_module.recompile()
    graph_module.delete_all_unused_submodules()
    _swap_modules(graph_module, report)


# --- the public functions ------------------------------------------------------------


def _to_channels_last(model: nn.Module, report: PatchReport) -> None:
    """Converts every 4-D parameter and buffer of ``model`` to channels_last in place
    (the same Parameter objects, so optimizers keep them)."""
    converted = 0
    with torch.no_grad():
        for tensor in (*model.parameters(), *model.buffers()):
            if tensor.dim() == 4 and not tensor.is_contiguous(memory_format=torch.channels_last):
                tensor.data = tensor.data.contiguous(memory_format=torch.channels_last)
                converted += 1
    report.add("converted", "(all)", f"{converted} 4-D parameters / buffers to channels_last")


def patch(model: nn.Module, *, trace: bool = False, channels_last: bool = False,
          verbose: bool = False) -> nn.Module:
    """Fuses ``model``'s layer + activation pairs (see the module docstring).

    ``trace=False``: changes ``model`` in place (Sequential pairs) and returns it.
    ``trace=True``: returns a torch.fx-traced copy (activations written in forward
    fused too); ``model`` is untouched and the copy has its own parameters, so build
    the optimizer on the copy. The copy's forward is what forward did at trace time
    (Python conditions such as ``self.training`` in your own code are frozen; modules
    such as BatchNorm still follow train() / eval()), and other methods of your class
    are not on it. A model torch.fx cannot trace raises :class:`CannotTrace` with
    torch.fx's reason.
    ``channels_last=True``: converts the 4-D parameters (convolution weights) to
    channels_last once. Inputs may stay NCHW (the first convolution converts them, at a
    copy per call; pass ``x.contiguous(memory_format=torch.channels_last)`` to avoid it),
    and 4-D outputs come back channels_last: same shape and values, other strides, so
    ``view`` needs ``reshape`` or ``.contiguous()``.
    ``verbose=True`` prints the :class:`PatchReport`, which :func:`patch_report` returns.

    A TorchScript module (``torch.jit.script`` / ``trace`` output) is refused: patch the
    Python model, then script it."""
    if isinstance(model, torch.jit.ScriptModule):
        raise TypeError("patch: model is a TorchScript module, whose compiled code patch cannot change; patch the "
                        "Python model, then script it: torch.jit.script(imggen_fast.patch(model))")
    if not isinstance(model, nn.Module):
        raise TypeError(f"patch: model must be a torch.nn.Module, got {type(model).__name__}")
    trace = _checks.check_bool(trace, "trace", "patch")
    report = PatchReport(traced=trace)
    if trace:
        model = _traced_copy(model, report)
        model.__dict__[_TRACED] = True
        _patch_graph(model, report)
    else:
        _patch_modules(model, report)
    if _checks.check_bool(channels_last, "channels_last", "patch"):
        _to_channels_last(model, report)
    model.__dict__[_REPORT] = report
    if verbose:
        print(report)
    return model


def patch_report(model: nn.Module) -> PatchReport:
    """The :class:`PatchReport` of the last :func:`patch` of ``model`` (or of the copy
    ``patch(model, trace=True)`` returned)."""
    report = model.__dict__.get(_REPORT)
    if report is None:
        raise ValueError(f"patch_report: this {type(model).__name__} was not patched (or was unpatched since)")
    return report


def unpatch(model: nn.Module) -> nn.Module:
    """Undoes :func:`patch` in place and returns ``model``: every module patch made is
    replaced by the very module it stood for (with any attribute changed since, such as
    ``training``); fused modules built directly are kept. A traced copy cannot be
    unpatched: the model it was traced from is unchanged."""
    if model.__dict__.get(_TRACED):
        raise TypeError("unpatch: this is the traced copy patch(model, trace=True) returned; the model it was "
                        "traced from is unchanged, use that one")
    slots, _ = _walk(model, PatchReport())
    restored: dict[int, nn.Module] = {}
    for module_slots in slots.values():
        module = module_slots[0].parent._modules[module_slots[0].name]
        original = module.__dict__.get(_ORIGINAL)
        if original is None or id(module) in restored:
            continue
        if type(module) is FusedAway:
            original.train(module.training)
        else:
            added = set(module.__dict__[_PATCHED]) | {_PATCHED, _ORIGINAL}
            original.__dict__.update({key: value for key, value in module.__dict__.items() if key not in added})
        restored[id(module)] = original
        for slot in module_slots:
            _set(slot, original)
    model.__dict__.pop(_REPORT, None)
    return model
