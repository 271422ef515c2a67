"""Data augmentation on whole batches of tensors (N, C, H, W, float in [0, 1]).

Every transform draws per-sample parameters from an explicit `torch.Generator` and runs
as a few batched tensor ops on whatever device the batch is on (GPU included), so there
is no per-image Python and no DataLoader worker is needed. Geometric transforms are
fused into one affine warp (rotation, translation, shear, scale) with one `grid_sample`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from pipeline.errors import ConfigError


@dataclass(frozen=True)
class AugmentConfig:
    """What to apply; zero/None disables each transform (see conf/regularizer/augment.yaml)."""

    hflip: float = 0.0                          # probability of a horizontal flip
    crop_padding: int = 0                       # random crop after zero-padding by this many px
    resized_crop_scale: tuple[float, float] | None = None  # area fraction range, e.g. (0.5, 1.0)
    resized_crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    rotation: float = 0.0                       # max degrees, uniform in [-r, r]
    translate: float = 0.0                      # max shift as a fraction of the size
    shear: float = 0.0                          # max degrees
    brightness: float = 0.0                     # factor in [1-b, 1+b]
    contrast: float = 0.0
    saturation: float = 0.0
    cutout: int = 0                             # side of a zeroed square (DeVries & Taylor 2017)

    def __post_init__(self) -> None:
        checks = {
            "hflip": 0 <= self.hflip <= 1, "crop_padding": self.crop_padding >= 0,
            "rotation": 0 <= self.rotation <= 180, "translate": 0 <= self.translate < 1,
            "shear": 0 <= self.shear < 90, "brightness": 0 <= self.brightness < 1,
            "contrast": 0 <= self.contrast < 1, "saturation": 0 <= self.saturation <= 1,
            "cutout": self.cutout >= 0,
        }
        for key, ok in checks.items():
            if not ok:
                raise ConfigError(f"regularizer.augment.{key}={getattr(self, key)} is out of range.")
        if self.resized_crop_scale is not None:
            lo, hi = self.resized_crop_scale
            if not 0 < lo <= hi <= 1:
                raise ConfigError(f"regularizer.augment.resized_crop_scale={list(self.resized_crop_scale)} "
                                  "must be [min, max] with 0 < min <= max <= 1.")

    @classmethod
    def from_dict(cls, options: Mapping[str, Any]) -> AugmentConfig:
        """From the `regularizer.augment` config block (lists become tuples)."""
        scale = options.get("resized_crop_scale")
        try:
            return cls(**{**options, "resized_crop_scale": tuple(scale) if scale is not None else None})
        except TypeError as err:
            raise ConfigError(f"regularizer.augment: {err}") from err

    @property
    def active(self) -> bool:
        return any((self.hflip, self.crop_padding, self.resized_crop_scale, self.rotation, self.translate,
                    self.shear, self.brightness, self.contrast, self.saturation, self.cutout))


def _uniform(n: int, lo: float, hi: float, g: torch.Generator, device: torch.device) -> torch.Tensor:
    return (torch.rand(n, generator=g) * (hi - lo) + lo).to(device)


def hflip(x: torch.Tensor, p: float, g: torch.Generator) -> torch.Tensor:
    flip = (torch.rand(len(x), generator=g) < p).to(x.device)
    return torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)


def random_crop(x: torch.Tensor, padding: int, g: torch.Generator) -> torch.Tensor:
    """Zero-pad then crop back to the original size at a random offset per sample."""
    n, _, h, w = x.shape
    padded = F.pad(x, (padding,) * 4)
    dy = torch.randint(0, 2 * padding + 1, (n,), generator=g).to(x.device)
    dx = torch.randint(0, 2 * padding + 1, (n,), generator=g).to(x.device)
    rows = (dy.view(n, 1) + torch.arange(h, device=x.device)).view(n, 1, h, 1)
    cols = (dx.view(n, 1) + torch.arange(w, device=x.device)).view(n, 1, 1, w)
    batch = torch.arange(n, device=x.device).view(n, 1, 1, 1)
    chans = torch.arange(x.shape[1], device=x.device).view(1, -1, 1, 1)
    return padded[batch, chans, rows, cols]


def affine(x: torch.Tensor, cfg: AugmentConfig, g: torch.Generator) -> torch.Tensor:
    """One warp combining rotation, shear, translation and random-resized-crop scaling."""
    n, dev = len(x), x.device
    angle = _uniform(n, -cfg.rotation, cfg.rotation, g, dev) * math.pi / 180
    shear = _uniform(n, -cfg.shear, cfg.shear, g, dev) * math.pi / 180
    tx = _uniform(n, -cfg.translate, cfg.translate, g, dev) * 2
    ty = _uniform(n, -cfg.translate, cfg.translate, g, dev) * 2
    sx = torch.ones(n, device=dev)
    sy = torch.ones(n, device=dev)
    if cfg.resized_crop_scale is not None:
        area = _uniform(n, *cfg.resized_crop_scale, g, dev)
        log_ratio = _uniform(n, math.log(cfg.resized_crop_ratio[0]), math.log(cfg.resized_crop_ratio[1]), g, dev)
        ratio = log_ratio.exp()
        sx = (area * ratio).sqrt().clamp(max=1)
        sy = (area / ratio).sqrt().clamp(max=1)
        # The crop window moves anywhere it stays inside the image.
        tx = tx + _uniform(n, -1, 1, g, dev) * (1 - sx)
        ty = ty + _uniform(n, -1, 1, g, dev) * (1 - sy)
    cos, sin, tan = angle.cos(), angle.sin(), shear.tan()
    # theta maps output coordinates to input coordinates (normalised [-1, 1]).
    theta = torch.stack([
        torch.stack([cos * sx, (-sin + cos * tan) * sy, tx], dim=1),
        torch.stack([sin * sx, (cos + sin * tan) * sy, ty], dim=1),
    ], dim=1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def color_jitter(x: torch.Tensor, cfg: AugmentConfig, g: torch.Generator) -> torch.Tensor:
    n, dev = len(x), x.device
    if cfg.brightness:
        x = x * _uniform(n, 1 - cfg.brightness, 1 + cfg.brightness, g, dev).view(-1, 1, 1, 1)
    if cfg.contrast:
        mean = x.mean(dim=(1, 2, 3), keepdim=True)
        x = (x - mean) * _uniform(n, 1 - cfg.contrast, 1 + cfg.contrast, g, dev).view(-1, 1, 1, 1) + mean
    if cfg.saturation and x.shape[1] == 3:
        grey = (0.299 * x[:, :1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3])
        x = (x - grey) * _uniform(n, 1 - cfg.saturation, 1 + cfg.saturation, g, dev).view(-1, 1, 1, 1) + grey
    return x.clamp(0, 1)


def cutout(x: torch.Tensor, size: int, g: torch.Generator) -> torch.Tensor:
    """Zero one size x size square per image, centred anywhere (it may overhang the edge)."""
    n, _, h, w = x.shape
    cy = torch.randint(0, h, (n,), generator=g).to(x.device).view(n, 1, 1)
    cx = torch.randint(0, w, (n,), generator=g).to(x.device).view(n, 1, 1)
    ys = torch.arange(h, device=x.device).view(1, h, 1)
    xs = torch.arange(w, device=x.device).view(1, 1, w)
    inside = ((ys - cy).abs() <= size // 2) & ((xs - cx).abs() <= size // 2)
    return x * (~inside).unsqueeze(1)


class BatchAugment(torch.nn.Module):
    """Applies the configured transforms to a training batch; the identity when none are set."""

    def __init__(self, cfg: AugmentConfig, seed: int = 0) -> None:
        super().__init__()
        self.cfg = cfg
        self.generator = torch.Generator().manual_seed(seed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cfg, g = self.cfg, self.generator
        if cfg.hflip:
            x = hflip(x, cfg.hflip, g)
        if cfg.crop_padding:
            x = random_crop(x, cfg.crop_padding, g)
        if cfg.rotation or cfg.translate or cfg.shear or cfg.resized_crop_scale is not None:
            x = affine(x, cfg, g)
        if cfg.brightness or cfg.contrast or cfg.saturation:
            x = color_jitter(x, cfg, g)
        if cfg.cutout:
            x = cutout(x, cfg.cutout, g)
        return x
