"""Single activations projected back to pixel space: Zeiler & Fergus's deconvnet, or
guided backpropagation.

Zeiler & Fergus, "Visualizing and Understanding Convolutional Networks" (ECCV 2014), Sec.
2.1: keep one activation of a layer, zero the rest, and run the signal down through a
"deconvnet" that undoes each layer: max-unpooling through the forward pass's switches
(where each pooling window's maximum was), rectification (a ReLU on the signal) and the
layer's filters transposed. Each of these steps is a backward pass with one change:

- max pooling's backward already routes the signal to the switches, and a convolution's
  backward is the convolution with the transposed filters (bias left out, as in the paper);
- a ReLU's backward masks the signal where the forward input was negative; the deconvnet
  instead rectifies the signal itself, ignoring the forward pass: relu(signal).

Guided backpropagation (Springenberg et al., "Striving for Simplicity: The All Convolutional
Net", ICLR workshop 2015) does both: relu(signal) where the forward input was positive, zero
elsewhere.

So both are the gradient of the chosen activation with respect to the input, with every ReLU
call's backward replaced (a `TorchFunctionMode` swaps `relu` for a function with that
backward, so `nn.ReLU`, `F.relu` and `torch.relu` are all caught, in-place ones too).
Everything else keeps its backward, which for an eval-mode network is linear given the
forward pass: batch norm is the per-channel scale gamma / sqrt(running_var + eps) (its
eval-time transform is affine and its backward the transpose of the linear part), dropout
is the identity, average pooling and resizing spread the signal back, a residual sum copies
it to both branches, a concatenation splits it. Activations other than ReLU (tanh, ELU,
GELU, ...) have no deconvnet rule: they pass the signal with their ordinary derivative, and
`Path.others` names them so the report can say so.

A network without max pooling below a layer has no switches to unpool with: its projection
is rectified transposed convolutions only (the strided ones upsample), as Springenberg et
al. apply the deconvnet to their all-convolutional net. `Path.max_pools` says so per layer.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from pipeline.reports.introspect import _eval_mode, _module
from pipeline.reports.receptive import TopUnit
from pipeline.validation import PROJECTIONS

METHODS = PROJECTIONS  # the config's report.projection
LABELS = {"deconvnet": "deconvnet (Zeiler & Fergus 2014)",
          "guided_backprop": "guided backpropagation (Springenberg et al. 2015)"}
# Backward nodes of activations without a deconvnet rule (name the report gives).
_OTHER_ACTIVATIONS = {"LeakyReluBackward": "leaky ReLU", "EluBackward": "ELU", "GeluBackward": "GELU",
                      "TanhBackward": "tanh", "SigmoidBackward": "sigmoid", "PreluKernelBackward": "PReLU",
                      "PreluBackward": "PReLU", "SiluBackward": "SiLU", "HardswishBackward": "hardswish",
                      "SoftplusBackward": "softplus", "MishBackward": "mish", "HardtanhBackward": "hardtanh"}


class _Deconvnet(torch.autograd.Function):
    """relu forward; backward relu(signal), whatever the forward input was."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return x.clamp(min=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad.clamp(min=0)


class _Guided(torch.autograd.Function):
    """relu forward; backward relu(signal) where the forward input was positive."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x > 0)
        return x.clamp(min=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        (mask,) = ctx.saved_tensors
        return grad.clamp(min=0) * mask


_RULES = {"deconvnet": _Deconvnet, "guided_backprop": _Guided}
_RULE_NODES = {f"{rule.__name__}Backward" for rule in _RULES.values()}


class _Rectifier(TorchFunctionMode):
    """Every relu call (functional, method or module, in place or not) through `rule`.
    An in-place relu returns a new tensor instead: callers use the value returned."""

    def __init__(self, rule: type[torch.autograd.Function]) -> None:
        super().__init__()
        self.rule = rule

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if getattr(func, "__name__", "") in ("relu", "relu_") and args and isinstance(args[0], torch.Tensor):
            return self.rule.apply(args[0])
        return func(*args, **kwargs)


@dataclass(frozen=True)
class Path:
    """What the signal from one layer down to the input passes through."""

    rectifications: int     # ReLUs, each with the method's rule
    max_pools: int          # max poolings (unpooled through their switches)
    batch_norms: int        # batch norms (their eval-time per-channel scale)
    others: tuple[str, ...]  # activations without a deconvnet rule (ordinary derivative), sorted


def _path(grad_fn) -> Path:
    seen, stack, names = set(), [grad_fn], []
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names.append(type(node).__name__.rstrip("0123456789"))
        stack.extend(next_fn for next_fn, _ in node.next_functions)
    others = sorted({_OTHER_ACTIVATIONS[n] for n in names if n in _OTHER_ACTIVATIONS})
    return Path(rectifications=sum(n in _RULE_NODES for n in names),
                max_pools=sum("MaxPool" in n or n == "AmaxBackward" for n in names),  # amax: maxout
                batch_norms=sum("BatchNorm" in n for n in names), others=tuple(others))


def project(model: nn.Module, x: torch.Tensor, layer: str, units: Sequence[TopUnit],
            method: str = "deconvnet") -> tuple[torch.Tensor, Path]:
    """Each unit's activation (`layer`'s output at unit.channel, row, col of image
    x[unit.image]) projected to the input: len(units) x C x H x W, with the path the signal
    took. The signal starts as the activation's value, every other activation of the layer
    zero. One forward and one backward pass for all units (eval mode; batch norm in eval mode
    treats each image on its own). Parameter gradients are never touched."""
    if method not in _RULES:
        raise ValueError(f"unknown projection method {method!r}; choose one of: {', '.join(METHODS)}")
    if not units:
        return x.new_zeros((0, *x.shape[1:])), Path(0, 0, 0, ())
    captured: list[torch.Tensor] = []

    def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        captured.append(output)
        return output.clone()  # an in-place op downstream (a residual +=) must not rewrite it

    batch = x[[u.image for u in units]].detach().clone().requires_grad_(True)
    handle = _module(model, layer).register_forward_hook(hook)
    try:
        with _eval_mode(model), torch.enable_grad(), _Rectifier(_RULES[method]):
            model(batch)
    finally:
        handle.remove()
    if not captured:
        raise ValueError(f"layer {layer!r} was not called in the forward pass")
    act = captured[-1]
    seed = torch.zeros_like(act)
    for i, u in enumerate(units):
        seed[i, u.channel, u.row, u.col] = act[i, u.channel, u.row, u.col].detach()
    (grad,) = torch.autograd.grad(act, batch, grad_outputs=seed)
    return grad.detach(), _path(act.grad_fn)


def display(projection: torch.Tensor) -> torch.Tensor:
    """C x H x W projections as H x W x C floats in [0, 1] for display: mid-grey is zero,
    each projection scaled on its own so its largest magnitude reaches black or white
    (the sign is kept: a deconvnet signal is positive and negative)."""
    p = projection.float()
    peak = p.abs().amax().clamp_min(1e-12)
    return (0.5 + 0.5 * p / peak).permute(1, 2, 0)
