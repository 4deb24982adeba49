"""``fuse_for_inference(model)``: a new model for evaluation (a GAN generator that
samples, a classifier that predicts) with every eval-mode BatchNorm folded into the
convolution / transposed convolution / linear layer before it, then the activations
fused by :func:`imggen_fast.patch`.

Folding: in eval mode a batch norm is the per-channel affine map
``y = x * scale + shift`` with ``scale = weight / sqrt(running_var + eps)`` and
``shift = bias - running_mean * scale``, so the layer before it can absorb it: its
weight is scaled per output channel and its bias becomes ``bias * scale + shift``
(computed in float64, stored in the layer's dtype)."""

from __future__ import annotations

import copy

import torch
import torch.fx
from torch import nn

# The walkers and markers patch() uses (imported by name: the package's ``patch``
# attribute is the function).
from .patch import (_REPORT, _TRACED, PatchReport, _child_path, _has_hooks, _patch_graph, _patch_modules,
                    _runs_in_order, _sees_output, _sequential_pairs, _traced_copy, _walk)

FOLDABLE_LAYERS = (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)
FOLDABLE_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d)


def _only_features(module: nn.Module, args: tuple[torch.Tensor]) -> None:
    """Forward pre-hook of a Linear that absorbed a BatchNorm1d: that folding is exact for
    input (N, in_features) only (BatchNorm1d then normalizes the Linear's features; for
    (N, L, in_features) it would normalize L)."""
    if args[0].dim() != 2:
        raise ValueError(f"fuse_for_inference: this Linear absorbed the BatchNorm1d after it, which is exact for "
                         f"input (N, in_features) only; got input of shape {list(args[0].shape)}")


def _fold_refusal(layer: nn.Module, norm: nn.Module, uses: int) -> str | None:
    """Why ``norm`` cannot be folded into ``layer`` (used in ``uses`` places), or None."""
    if type(norm) is nn.BatchNorm2d and type(layer) is nn.Linear:
        return "a BatchNorm2d after a Linear does not normalize the Linear's features"
    if type(norm) is nn.BatchNorm1d and type(layer) is not nn.Linear:
        return f"a BatchNorm1d after a {type(layer).__name__} does not normalize its output channels"
    if norm.running_mean is None or norm.running_var is None:
        return "the BatchNorm has no running statistics (track_running_stats=False): eval uses batch statistics"
    out_channels = layer.out_features if type(layer) is nn.Linear else layer.out_channels
    if norm.num_features != out_channels:
        return f"the BatchNorm has {norm.num_features} features but the {type(layer).__name__} {out_channels} outputs"
    if _has_hooks(norm) or _sees_output(layer):
        return "a hook on the BatchNorm, or one that sees the layer's output, would see the difference"
    if uses > 1:
        return f"the {type(layer).__name__} or the BatchNorm is used in {uses} places"
    return None


@torch.no_grad()
def _fold(layer: nn.Module, norm: nn.Module) -> None:
    """Folds eval-mode ``norm`` into ``layer`` in place (see the module docstring)."""
    dtype = layer.weight.dtype
    scale = torch.rsqrt(norm.running_var.double() + norm.eps)
    if norm.weight is not None:
        scale = scale * norm.weight.double()
    shift = -norm.running_mean.double() * scale
    if norm.bias is not None:
        shift = shift + norm.bias.double()
    weight = layer.weight.double()
    if type(layer) is nn.ConvTranspose2d:
        # Weight (C_in, C_out / groups, kH, kW): output channel g * C_out/groups + j is
        # column j of group g's rows.
        groups = layer.groups
        grouped = weight.reshape(groups, weight.shape[0] // groups, *weight.shape[1:])
        weight = (grouped * scale.reshape(groups, 1, -1, 1, 1)).reshape(weight.shape)
    else:
        weight = weight * scale.reshape(-1, *[1] * (weight.dim() - 1))
    memory_format = (torch.channels_last if layer.weight.dim() == 4
                     and layer.weight.is_contiguous(memory_format=torch.channels_last)
                     and not layer.weight.is_contiguous() else torch.contiguous_format)
    layer.weight.data = weight.to(dtype).contiguous(memory_format=memory_format)
    bias = shift if layer.bias is None else layer.bias.double() * scale + shift
    if layer.bias is None:
        layer.bias = nn.Parameter(bias.to(dtype), requires_grad=layer.weight.requires_grad)
    else:
        layer.bias.data = bias.to(dtype)
    if type(layer) is nn.Linear:
        layer.register_forward_pre_hook(_only_features)


def _describe_fold(layer: nn.Module, norm: nn.Module) -> str:
    return f"{type(layer).__name__} + {type(norm).__name__} -> {type(layer).__name__} (BatchNorm folded)"


def _fold_modules(model: nn.Module, report: PatchReport) -> None:
    """Folds the (layer, BatchNorm) pairs of consecutive children of every in-order
    Sequential of ``model``; the BatchNorm's place becomes an nn.Identity."""
    slots, containers = _walk(model, PatchReport())
    for parent, path in containers:
        if not _runs_in_order(parent):
            continue
        for layer_name, name in _sequential_pairs(parent, FOLDABLE_NORMS):
            layer, norm = parent._modules.get(layer_name), parent._modules[name]
            if type(layer) not in FOLDABLE_LAYERS:
                continue
            where = f"{_child_path(path, layer_name)} + {_child_path(path, name)}"
            reason = _fold_refusal(layer, norm, max(len(slots[id(layer)]), len(slots[id(norm)])))
            if reason is None:
                _fold(layer, norm)
                parent._modules[name] = nn.Identity()
                report.add("folded", where, _describe_fold(layer, norm))
            else:
                report.add("skipped", where, f"{type(layer).__name__} + {type(norm).__name__}", reason)


def _fold_graph(graph_module: torch.fx.GraphModule, report: PatchReport) -> None:
    """Folds each BatchNorm module call whose input is a foldable layer module call used
    only there."""
    graph = graph_module.graph
    modules = dict(graph_module.named_modules())
    calls: dict[str, int] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    for node in list(graph.nodes):
        if node.op != "call_module" or type(modules[node.target]) not in FOLDABLE_NORMS:
            continue
        producer = node.args[0] if node.args else None
        if not (isinstance(producer, torch.fx.Node) and producer.op == "call_module"
                and type(modules[producer.target]) in FOLDABLE_LAYERS):
            continue
        layer, norm = modules[producer.target], modules[node.target]
        where = f"{producer.target} -> {node.target}"
        reason = _fold_refusal(layer, norm, max(calls[producer.target], calls[node.target]))
        if reason is None and len(producer.users) > 1:
            reason = "the layer's output has other uses"
        if reason is not None:
            report.add("skipped", where, f"{type(layer).__name__} + {type(norm).__name__}", reason)
            continue
        _fold(layer, norm)
        node.replace_all_uses_with(producer)
        graph.erase_node(node)
        report.add("folded", where, _describe_fold(layer, norm))
    graph.lint()
    graph_module.recompile()
    graph_module.delete_all_unused_submodules()


def fuse_for_inference(model: nn.Module, *, trace: bool = False, verbose: bool = False) -> nn.Module:
    """A new model for inference: a deep copy of ``model`` (which is left untouched) in
    eval mode, with each BatchNorm1d/2d that has running statistics folded into the
    Conv2d / ConvTranspose2d / Linear whose output it normalizes, then patched by
    :func:`imggen_fast.patch` (activations fused). Its parameters do not require
    gradients. Outputs equal ``model.eval()``'s within the dtype's rounding.

    Pairs are found as :func:`imggen_fast.patch` finds them: consecutive children of an
    nn.Sequential, or with ``trace=True`` the edges of a torch.fx trace of forward
    (see patch for what that means). A layer or BatchNorm used in several places, a
    BatchNorm without running statistics, or one a hook watches is left as it is; the
    :class:`PatchReport` (``verbose=True`` prints it; also
    ``imggen_fast.patch_report(result)``) lists what was folded, fused and skipped.
    A Linear that absorbed a BatchNorm1d accepts (N, in_features) input only (the one
    layout where the folding is exact) and raises a clear error otherwise."""
    if isinstance(model, torch.jit.ScriptModule):
        raise TypeError("fuse_for_inference: model is a TorchScript module, whose code cannot be changed; pass the "
                        "Python model")
    if not isinstance(model, nn.Module):
        raise TypeError(f"fuse_for_inference: model must be a torch.nn.Module, got {type(model).__name__}")
    report = PatchReport(traced=bool(trace))
    if trace:
        folded = _traced_copy(model, report, training=False)
        folded.__dict__[_TRACED] = True
        _fold_graph(folded, report)
        _patch_graph(folded, report)
    else:
        folded = copy.deepcopy(model).eval()
        _fold_modules(folded, report)
        _patch_modules(folded, report)
    folded.requires_grad_(False)
    folded.__dict__[_REPORT] = report
    if verbose:
        print(report)
    return folded
