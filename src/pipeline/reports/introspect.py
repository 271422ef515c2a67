"""What a trained network learned, as plain tensor functions (no plotting, no I/O).

Every function takes any `nn.Module` mapping N x C x H x W inputs to N x classes scores;
layers are addressed by their `named_modules()` names (for the pipeline's
`Sequential(Preprocess, model)` network: `1.features.0`, ...). The model's training
flags are restored on return, and parameter gradients are never touched.

- `saliency`: Simonyan, Vedaldi & Zisserman, "Deep Inside Convolutional Networks:
  Visualising Image Classification Models and Saliency Maps" (ICLR workshop 2014).
- `saliency_box`: the same paper's weakly supervised localisation (Sec. 3.2), simplified: they
  seed a GraphCut colour segmentation with the pixels above the 95th saliency percentile
  (foreground) and below the 30th (background), then box the segmentation's largest connected
  component; here the box is that of the largest 8-connected component of the pixels above
  the percentile itself, without the GraphCut step.
- `grad_cam`: Selvaraju et al., "Grad-CAM: Visual Explanations from Deep Networks via
  Gradient-based Localization" (ICCV 2017).
- `layer_table`: receptive field r and jump j (input pixels between neighbouring outputs)
  by the recurrence r_out = r_in + (k - 1) * j_in, j_out = j_in * s over the conv and pool
  layers in forward-execution order (dilation counts in k). Exact for a chain of layers;
  for branching networks (ResNet shortcuts, Inception, DenseNet) every layer is chained,
  so the figure is an upper bound on the largest path's receptive field.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.conv import _ConvNd
from torch.nn.modules.pooling import _AdaptiveAvgPoolNd, _AdaptiveMaxPoolNd, _AvgPoolNd, _MaxPoolNd

from pipeline.models.complexity import layer_macs

_POOLS = (_MaxPoolNd, _AvgPoolNd, _AdaptiveAvgPoolNd, _AdaptiveMaxPoolNd)


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Eval mode inside, each module's own training flag restored afterwards."""
    modes = {m: m.training for m in model.modules()}
    try:
        model.eval()
    except NotImplementedError:  # a torch.export graph (MLflow 3 models): its mode is fixed
        pass
    try:
        yield model
    finally:
        for m, training in modes.items():
            m.training = training


def _module(model: nn.Module, layer: str | nn.Module) -> nn.Module:
    if isinstance(layer, nn.Module):
        return layer
    modules = dict(model.named_modules())
    if layer not in modules:
        convs = [n for n, m in modules.items() if isinstance(m, nn.Conv2d)]
        raise KeyError(f"no layer named {layer!r}; conv layers are: {', '.join(convs) or 'none'}")
    return modules[layer]


def conv_layers(model: nn.Module) -> list[str]:
    """Names of the model's Conv2d layers, in registration order."""
    return [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]


def _targets(target: int | Sequence[int] | torch.Tensor, n: int) -> torch.Tensor:
    t = torch.as_tensor(target, dtype=torch.long).flatten()
    return t.expand(n) if t.numel() == 1 else t


def first_layer_filters(model: nn.Module) -> np.ndarray:
    """The first Conv2d's kernels as `out x kh x kw x in` floats in [0, 1] for display.

    Each filter is scaled on its own, symmetrically: 0.5 is a zero weight, 0 and 1 its
    largest negative and positive weights. ValueError if the model has no Conv2d.
    """
    conv = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    if conv is None:
        raise ValueError("the model has no Conv2d layer")
    w = conv.weight.detach().float().cpu().permute(0, 2, 3, 1).numpy()
    scale = np.abs(w).reshape(len(w), -1).max(axis=1).reshape(-1, 1, 1, 1)
    return 0.5 + 0.5 * w / np.where(scale > 0, scale, 1.0)


def feature_maps(model: nn.Module, x: torch.Tensor, layer_names: Sequence[str]) -> dict[str, torch.Tensor]:
    """Each named layer's output for input `x` (eval mode, no gradients), via forward hooks."""
    out: dict[str, torch.Tensor] = {}

    def hook_for(name: str):
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            out[name] = output.detach().clone()
        return hook

    handles = [_module(model, n).register_forward_hook(hook_for(n)) for n in layer_names]
    try:
        with _eval_mode(model), torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
    return {n: out[n] for n in layer_names if n in out}


def saliency(model: nn.Module, x: torch.Tensor, target: int | Sequence[int] | torch.Tensor) -> torch.Tensor:
    """|d score_target / d x| maximised over channels: N x H x W (the class score is the logit)."""
    x = x.detach().clone().requires_grad_(True)
    with _eval_mode(model), torch.enable_grad():
        scores = model(x)
        picked = scores.gather(1, _targets(target, len(x)).view(-1, 1).to(scores.device)).sum()
        (grad,) = torch.autograd.grad(picked, x)
    return grad.abs().amax(dim=1)


def saliency_box(maps: torch.Tensor | np.ndarray, percentile: float = 95.0) -> np.ndarray:
    """One bounding box per saliency map (N x H x W): the rows and columns spanned by the
    largest 8-connected component of the pixels at or above the map's `percentile`-th
    percentile, as N x 4 ints (top, left, bottom, right), inclusive.

    Ties in size go to the component met first in raster order. A map with no pixel above
    its percentile (a constant map: no evidence anywhere) gets the whole image.
    """
    from scipy import ndimage

    if not 0.0 <= percentile < 100.0:
        raise ValueError(f"percentile must be in [0, 100), got {percentile}")
    maps = maps.detach().cpu().numpy() if isinstance(maps, torch.Tensor) else np.asarray(maps)
    if maps.ndim != 3:
        raise ValueError(f"saliency maps must be N x H x W, got shape {maps.shape}")
    boxes = np.zeros((len(maps), 4), dtype=np.int64)
    eight = np.ones((3, 3), dtype=bool)
    for i, m in enumerate(maps):
        threshold = np.percentile(m, percentile)
        # At or above it, so tied top values count; strictly above when it is the minimum,
        # so a mostly-zero map's zeros never do.
        mask = m >= threshold if threshold > m.min() else m > threshold
        if not mask.any():
            boxes[i] = (0, 0, m.shape[0] - 1, m.shape[1] - 1)
            continue
        components, count = ndimage.label(mask, structure=eight)  # numbered in raster order
        sizes = np.bincount(components.ravel(), minlength=count + 1)[1:]
        rows, cols = np.nonzero(components == 1 + int(np.argmax(sizes)))  # argmax: the first of the largest
        boxes[i] = (rows.min(), cols.min(), rows.max(), cols.max())
    return boxes


def grad_cam(model: nn.Module, x: torch.Tensor, target: int | Sequence[int] | torch.Tensor,
             layer: str | nn.Module | None = None) -> torch.Tensor:
    """Grad-CAM heat maps, N x H x W in [0, 1] (each map divided by its maximum).

    Channel weights are the spatial means of d score_target / d A, A the output of `layer`
    (default: the last Conv2d); the map is ReLU(sum_k w_k A_k), bilinearly upsampled to
    the input size. An all-zero map means no positive evidence for the class at that layer.
    """
    if layer is None:
        names = conv_layers(model)
        if not names:
            raise ValueError("the model has no Conv2d layer for Grad-CAM")
        layer = names[-1]
    captured: list[torch.Tensor] = []

    def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        captured.append(output)
        return output.clone()  # an in-place activation downstream must not overwrite A

    handle = _module(model, layer).register_forward_hook(hook)
    try:
        with _eval_mode(model), torch.enable_grad():
            scores = model(x.detach())
            picked = scores.gather(1, _targets(target, len(x)).view(-1, 1).to(scores.device)).sum()
            if not captured:
                raise ValueError(f"layer {layer!r} was not called in the forward pass")
            act = captured[-1]
            (grad,) = torch.autograd.grad(picked, act)
    finally:
        handle.remove()
    weights = grad.mean(dim=(2, 3), keepdim=True)
    cam = F.relu((weights * act.detach()).sum(dim=1, keepdim=True))
    cam = F.interpolate(cam, size=x.shape[-2:], mode="bilinear", align_corners=False).squeeze(1)
    peak = cam.flatten(1).amax(dim=1).view(-1, 1, 1)
    return torch.where(peak > 0, cam / peak.clamp_min(1e-12), torch.zeros_like(cam))


def _geometry(module: nn.Module, inp: torch.Tensor, out: torch.Tensor) -> tuple[tuple[int, int], tuple[int, int]]:
    """(kernel, stride) per spatial axis, for the receptive-field recurrence."""
    def two(v) -> tuple[int, int]:
        return tuple(v) if isinstance(v, (tuple, list)) else (v, v)  # type: ignore[return-value]

    if isinstance(module, (_AdaptiveAvgPoolNd, _AdaptiveMaxPoolNd)):
        sizes = list(zip(inp.shape[-2:], out.shape[-2:]))
        return (tuple(math.ceil(i / o) for i, o in sizes), tuple(max(i // o, 1) for i, o in sizes))  # type: ignore
    k, s = two(module.kernel_size), two(module.stride if module.stride is not None else module.kernel_size)
    d = two(getattr(module, "dilation", 1))
    return (tuple(di * (ki - 1) + 1 for ki, di in zip(k, d)), s)  # type: ignore[return-value]


def _axes(v: tuple[int, int]) -> int | tuple[int, int]:
    return v[0] if v[0] == v[1] else v


def layer_table(model: nn.Module, input_shape: tuple[int, int, int]) -> list[dict]:
    """One row per conv, linear or pool call (and per other module owning parameters) in
    forward order: name, type, output shape (one sample), parameters, MACs (as
    `count_macs`), receptive field and jump in pixels of the first conv's input (after any
    resizing inside the model; `_axes`: an int, or (h, w)
    when the axes differ). Parameters are counted once, at a module's first call, so
    the column sums to `count_parameters(model)`; parameters of modules not called in
    eval mode (e.g. auxiliary heads) get a row at the end with no output shape.
    """
    calls: list[tuple[nn.Module, torch.Tensor, torch.Tensor]] = []
    owns = {m for m in model.modules() if any(True for _ in m.parameters(recurse=False))}
    kinds = (_ConvNd, nn.Linear, *_POOLS)

    def hook(module: nn.Module, args: tuple, output) -> None:
        if args and isinstance(args[0], torch.Tensor) and isinstance(output, torch.Tensor):
            calls.append((module, args[0], output))

    names = {m: n for n, m in model.named_modules(remove_duplicate=True)}
    handles = [m.register_forward_hook(hook) for m in names if isinstance(m, kinds) or m in owns]
    ref = next(model.parameters(), None)
    try:
        with _eval_mode(model), torch.no_grad():
            model(torch.zeros(1, *input_shape, device=ref.device if ref is not None else "cpu"))
    finally:
        for h in handles:
            h.remove()

    rows: list[dict] = []
    seen: set[int] = set()
    r, j = (1, 1), (1, 1)
    spatial = tuple(input_shape[-2:])

    def own_params(m: nn.Module) -> int:
        fresh = [p for p in m.parameters(recurse=False) if id(p) not in seen]
        seen.update(id(p) for p in fresh)
        return sum(p.numel() for p in fresh)

    for module, inp, out in calls:
        if isinstance(module, (nn.Conv2d, *_POOLS)) and inp.dim() == 4:
            k, s = _geometry(module, inp, out)
            r = tuple(ri + (ki - 1) * ji for ri, ki, ji in zip(r, k, j))  # type: ignore[assignment]
            j = tuple(ji * si for ji, si in zip(j, s))  # type: ignore[assignment]
        elif isinstance(module, nn.Linear) and inp.dim() == 2 and spatial != (1, 1):
            # A Linear over a flattened h x w map acts as an h x w convolution on it.
            r = tuple(ri + (hi - 1) * ji for ri, hi, ji in zip(r, spatial, j))  # type: ignore[assignment]
            spatial = (1, 1)
        if out.dim() == 4:
            spatial = tuple(out.shape[-2:])
        macs = layer_macs(module, inp, out)
        rows.append({"name": names[module], "type": type(module).__name__, "output_shape": list(out.shape[1:]),
                     "params": own_params(module), "macs": int(macs),
                     "receptive_field": _axes(r), "jump": _axes(j)})
    for module, name in names.items():
        if module in owns and (n := own_params(module)):
            rows.append({"name": name, "type": type(module).__name__, "output_shape": None, "params": n,
                         "macs": 0, "receptive_field": None, "jump": None})
    return rows


def most_confused_pairs(cm: np.ndarray, classes: Sequence[str], k: int = 5) -> list[dict]:
    """The `k` largest off-diagonal cells of a confusion matrix (rows actual, columns
    predicted): {actual, predicted, actual_index, predicted_index, count, rate}, where
    rate is the share of the actual class predicted as the other. Ties go to the lower
    (actual, predicted) index; empty cells are never listed."""
    cm = np.asarray(cm)
    support = cm.sum(axis=1)
    cells = [(-int(cm[a, p]), a, p) for a in range(len(cm)) for p in range(len(cm)) if a != p and cm[a, p] > 0]
    return [{"actual": classes[a], "predicted": classes[p], "actual_index": a, "predicted_index": p,
             "count": -c, "rate": float(-c / support[a])} for c, a, p in sorted(cells)[:k]]
