"""Where in the input a feature-map unit looks, for chains and branching networks alike.

The layer table (`introspect.layer_table`) gives each layer's receptive field r and jump j
by the recurrence r_out = r_in + (k - 1) j_in, j_out = j_in s over the conv and pool calls
in forward order: exact for a chain, but a branching network's shortcut (a strided 1x1
conv, a strided slice) is chained too, so its jump, and with it every unit's position,
comes out wrong. `unit_geometry` applies the same recurrence along the data flow instead:
it follows every tensor through one forward pass (a `TorchFunctionMode`), so a residual
sum or a concatenation covers the union of its inputs' fields, and adds the start offset
the table lacks: along each axis, unit u of a layer covers input pixels
[start + u j, start + u j + r - 1] (start < 0 where padding reaches past the edge).

Convolutions, max/average pooling (adaptive too), padding, strided slices and resizing
change the geometry; any op keeping the spatial size (activations, normalisation, sums,
concatenation) takes the union of its inputs'. An op that changes the size in some other
way makes the geometry unknown (`UnknownGeometry` says which op).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten


class UnknownGeometry(ValueError):
    """An op changed a feature map's spatial size in a way the recurrence does not cover."""


@dataclass(frozen=True)
class Axis:
    """One axis: unit u covers input pixels [start + u * jump, start + u * jump + size - 1]."""

    start: float
    jump: float
    size: float

    def window(self, kernel: int, stride: int, pad: int, dilation: int = 1) -> Axis:
        k = dilation * (kernel - 1) + 1
        return Axis(self.start - pad * self.jump, self.jump * stride, self.size + (k - 1) * self.jump)

    def union(self, other: Axis) -> Axis:
        start = min(self.start, other.start)
        end = max(self.start + self.size, other.start + other.size)
        return Axis(start, max(self.jump, other.jump), end - start)


Geometry = tuple[Axis, Axis]  # (rows, columns)
INPUT: Geometry = (Axis(0, 1, 1), Axis(0, 1, 1))


def _pair(v, default=None) -> tuple[int, int]:
    v = default if v is None else v
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[-1]))


def _arg(args: tuple, kwargs: dict, i: int, name: str, default=None):
    return args[i] if len(args) > i else kwargs.get(name, default)


def _conv(args, kwargs, geo: Geometry) -> Geometry:
    weight = _arg(args, kwargs, 1, "weight")
    stride, dilation = _pair(_arg(args, kwargs, 3, "stride", 1)), _pair(_arg(args, kwargs, 5, "dilation", 1))
    kernel = tuple(weight.shape[-2:])
    padding = _arg(args, kwargs, 4, "padding", 0)
    if isinstance(padding, str):  # "valid", or "same" (stride 1): the extra pixel goes after
        padding = (0, 0) if padding == "valid" else tuple(d * (k - 1) // 2 for k, d in zip(kernel, dilation))
    padding = _pair(padding)
    return tuple(a.window(k, s, p, d) for a, k, s, p, d in zip(geo, kernel, stride, padding, dilation))  # type: ignore


def _pool(args, kwargs, geo: Geometry, *, dilation_at: int | None) -> Geometry:
    kernel = _pair(_arg(args, kwargs, 1, "kernel_size"))
    stride = _pair(_arg(args, kwargs, 2, "stride") or None, kernel)
    padding = _pair(_arg(args, kwargs, 3, "padding", 0))
    dilation = _pair(_arg(args, kwargs, dilation_at, "dilation", 1)) if dilation_at else (1, 1)
    return tuple(a.window(k, s, p, d) for a, k, s, p, d in zip(geo, kernel, stride, padding, dilation))  # type: ignore


def _adaptive(inp: torch.Tensor, out: torch.Tensor, geo: Geometry) -> Geometry:
    # Exact when the size divides; otherwise torch's windows vary by one pixel: the largest.
    sizes = zip(inp.shape[-2:], out.shape[-2:])
    return tuple(a.window(math.ceil(i / o), max(i // o, 1), 0) for a, (i, o) in zip(geo, sizes))  # type: ignore


def _pad(args, kwargs, geo: Geometry) -> Geometry:
    pad = list(_arg(args, kwargs, 1, "pad")) + [0] * 4  # (left, right, top, bottom, ...) from the last axis
    rows, cols = geo
    return (Axis(rows.start - pad[2] * rows.jump, rows.jump, rows.size),
            Axis(cols.start - pad[0] * cols.jump, cols.jump, cols.size))


def _slice(index, inp: torch.Tensor, geo: Geometry) -> Geometry | None:
    """A tensor[...] keeping 4 dimensions: strided slices of the spatial axes."""
    index = index if isinstance(index, tuple) else (index,)
    if any(not isinstance(i, (slice, type(Ellipsis))) for i in index):
        return None
    if Ellipsis in index:
        at = index.index(Ellipsis)
        index = index[:at] + (slice(None),) * (inp.dim() - len(index) + 1) + index[at + 1:]
    index = index + (slice(None),) * (inp.dim() - len(index))
    out = []
    for axis, (a, s) in enumerate(zip(geo, index[-2:])):
        start, _, step = s.indices(inp.shape[2 + axis])
        out.append(Axis(a.start + start * a.jump, a.jump * step, a.size))
    return tuple(out)  # type: ignore[return-value]


def _resize(inp: torch.Tensor, out: torch.Tensor, geo: Geometry) -> Geometry:
    """Bilinear resizing (the model's `data.resize`, without antialiasing), approximately: an
    output pixel spans in/out input pixels and at least the two its bilinear taps read, so a
    box may come out a pixel wider than the exact one, never narrower."""
    axes = []
    for a, i, o in zip(geo, inp.shape[-2:], out.shape[-2:]):
        scale = i / o
        axes.append(Axis(a.start + (scale - 1) / 2 * a.jump - (a.jump if scale < 1 else 0),
                         a.jump * scale, a.size + (max(scale, 2.0) - 1) * a.jump))
    return tuple(axes)  # type: ignore[return-value]


class _Tracker(TorchFunctionMode):
    """Follows every 4-D tensor's geometry through the functions a forward pass calls."""

    def __init__(self, x: torch.Tensor) -> None:
        super().__init__()
        self.geo: dict[int, Geometry | UnknownGeometry] = {id(x): INPUT}
        self.alive: list[torch.Tensor] = [x]  # ids stay unique while the tensors live

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        inputs = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor) and id(t) in self.geo]
        outputs = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor) and t.dim() == 4]
        if inputs and outputs:
            geo = self._rule(func, args, kwargs, inputs, outputs[0])
            for t in outputs:
                self.geo[id(t)] = geo
                self.alive.append(t)
        return out

    def _rule(self, func, args, kwargs, inputs, out) -> Geometry | UnknownGeometry:
        known = [self.geo[id(t)] for t in inputs]
        if bad := next((g for g in known if isinstance(g, UnknownGeometry)), None):
            return bad
        first, geo = inputs[0], known[0]
        name = getattr(func, "__name__", str(func)).strip("_")
        if first.dim() != 4:
            return UnknownGeometry(f"{name} made a feature map from a tensor that is not one")
        if name == "conv2d":
            return _conv(args, kwargs, geo)
        if name in ("max_pool2d", "max_pool2d_with_indices"):
            return _pool(args, kwargs, geo, dilation_at=4)
        if name == "avg_pool2d":
            return _pool(args, kwargs, geo, dilation_at=None)
        if name in ("adaptive_avg_pool2d", "adaptive_max_pool2d"):
            return _adaptive(first, out, geo)
        if name == "pad":
            return _pad(args, kwargs, geo)
        if name == "interpolate" or name.startswith("upsample"):
            return _resize(first, out, geo)
        if name == "getitem" and (sliced := _slice(args[1], first, geo)) is not None:
            return sliced
        if all(t.shape[-2:] == out.shape[-2:] for t in inputs if t.dim() == 4):
            union = known[0]
            for g in known[1:]:
                union = (union[0].union(g[0]), union[1].union(g[1]))
            return union
        return UnknownGeometry(f"{name} changes the feature map size from {tuple(first.shape[-2:])} to "
                               f"{tuple(out.shape[-2:])} in a way the receptive-field arithmetic does not cover")


def unit_geometry(model: nn.Module, input_shape: tuple[int, int, int], layers: Sequence[str]) -> dict[str, Geometry]:
    """Each named layer's output geometry for one `input_shape` (C, H, W) input, in pixels of
    that input. Raises UnknownGeometry naming the op when a layer's cannot be worked out."""
    modules = dict(model.named_modules())
    seen: dict[str, torch.Tensor] = {}
    handles = [modules[n].register_forward_hook(lambda m, a, o, n=n: seen.setdefault(n, o)) for n in layers]
    ref = next(model.parameters(), None)
    x = torch.zeros(1, *input_shape, device=ref.device if ref is not None else "cpu")
    modes = {m: m.training for m in model.modules()}
    tracker = _Tracker(x)
    try:
        model.eval()
        with torch.no_grad(), tracker:
            model(x)
    finally:
        for h in handles:
            h.remove()
        for m, training in modes.items():
            m.training = training
    out = {}
    for name in layers:
        geo = tracker.geo.get(id(seen.get(name)), UnknownGeometry(f"layer {name} gave no feature map"))
        if isinstance(geo, UnknownGeometry):
            raise UnknownGeometry(f"layer {name}: {geo}")
        out[name] = geo
    return out


def unit_box(geo: Geometry, row: int, col: int, height: int, width: int) -> tuple[int, int, int, int]:
    """The input pixels (top, left, bottom, right, inclusive) unit (row, col) sees, clipped
    to a height x width image."""
    rows, cols = geo
    top, left = rows.start + row * rows.jump, cols.start + col * cols.jump
    box = (math.floor(top), math.floor(left), math.ceil(top + rows.size) - 1, math.ceil(left + cols.size) - 1)
    return max(box[0], 0), max(box[1], 0), min(box[2], height - 1), min(box[3], width - 1)


@dataclass(frozen=True)
class TopUnit:
    """One of a feature map's strongest activations: where, how strong, and the input box."""

    channel: int
    image: int
    row: int
    col: int
    value: float
    box: tuple[int, int, int, int]  # top, left, bottom, right (inclusive), clipped to the image


def top_activations(model: nn.Module, x: torch.Tensor, layers: Sequence[str], *, maps: int = 4, k: int = 9,
                    batch_size: int = 256) -> dict[str, list[list[TopUnit]]]:
    """Zeiler & Fergus's "what excites a feature map": for each named layer, the `maps`
    channels with the strongest single activation over the images `x` (N x C x H x W), each
    with its `k` strongest activations (any image, any position) and the input box under
    each one's receptive field (`unit_geometry`).

    Deterministic: ties go to the lower image index, then the earlier position in raster
    order, then (choosing channels) the lower channel.
    """
    from pipeline.reports.introspect import feature_maps

    height, width = x.shape[-2:]
    geo = unit_geometry(model, tuple(x.shape[1:]), layers)
    best: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    sizes: dict[str, tuple[int, int]] = {}
    for start in range(0, len(x), batch_size):
        for name, fmap in feature_maps(model, x[start:start + batch_size], layers).items():
            n, channels, h, w = fmap.shape
            sizes[name] = (h, w)
            values = fmap.float().permute(1, 0, 2, 3).reshape(channels, -1)  # image-major, then raster
            index = torch.arange(values.shape[1]).expand(channels, -1) + start * h * w
            if name in best:  # the earlier images first, so a stable sort keeps them ahead on ties
                values, index = torch.cat([best[name][0], values], 1), torch.cat([best[name][1], index], 1)
            order = torch.sort(values, dim=1, descending=True, stable=True).indices[:, :k]
            best[name] = (values.gather(1, order), index.gather(1, order))
    out = {}
    for name in layers:
        values, index = best[name]
        h, w = sizes[name]
        chosen = torch.sort(values[:, 0], descending=True, stable=True).indices[:maps].tolist()
        out[name] = []
        for c in chosen:
            units = []
            for v, i in zip(values[c].tolist(), index[c].tolist()):
                image, (row, col) = i // (h * w), divmod(i % (h * w), w)
                units.append(TopUnit(c, image, row, col, v, unit_box(geo[name], row, col, height, width)))
            out[name].append(units)
    return out
