"""RandAugment for clips, timm's "rand-m7-n4-mstd0.5-inc1" as SlowFast's MViTv2 uses it.

`num_ops` ops drawn with replacement from timm's increasing-magnitude set, each applied
with probability 0.5 at magnitude ~ N(m, mstd) clipped to [0, 10] (out of 10). Every
random choice is made once per clip: all frames get the same ops, magnitudes and signs,
so the augmentation never adds motion. Works on float (T, C, H, W) in [0, 255].
Statistics (autocontrast range, equalize histogram, contrast mean) are each frame's, as
SlowFast's ops take them (PIL, one image per frame).

The draws (`draw_rand_ops`) are separate from the pixels (`apply_rand_ops`): the DALI
backend applies the same draws with its own ops, and nothing random is left in its graph.
Magnitudes are rounded to 0.25 (levels to 1/LEVEL_STEPS), the bins DALI's ops take them in.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

FILL = 128.0  # timm fills uncovered pixels with its img_mean, (128, 128, 128)


def _blend(clip: torch.Tensor, other: torch.Tensor | float, factor: float) -> torch.Tensor:
    return (other + factor * (clip - other)).clamp(0, 255)


def _gray(clip: torch.Tensor) -> torch.Tensor:
    r, g, b = clip.unbind(1)
    return (0.299 * r + 0.587 * g + 0.114 * b).unsqueeze(1)


def _affine(clip: torch.Tensor, matrix: np.ndarray) -> torch.Tensor:
    """Warp by a 2x3 output->input map in pixel coordinates (PIL's convention), bilinear, FILL outside."""
    t, c, h, w = clip.shape
    # Pixel centres -> normalized [-1, 1] coordinates (align_corners=False).
    to_px = np.array([[w / 2, 0, (w - 1) / 2], [0, h / 2, (h - 1) / 2], [0, 0, 1]])
    from_px = np.linalg.inv(to_px)
    theta = from_px @ np.vstack([matrix, [0, 0, 1]]) @ to_px
    grid = F.affine_grid(
        torch.tensor(theta[:2], dtype=clip.dtype).expand(t, 2, 3), (t, c, h, w), align_corners=False
    )
    warped = F.grid_sample(clip - FILL, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return warped + FILL


def _rotate(clip: torch.Tensor, degrees: float) -> torch.Tensor:
    h, w = clip.shape[-2:]
    a = math.radians(degrees)
    cx, cy = (w - 1) / 2, (h - 1) / 2
    cos, sin = math.cos(a), math.sin(a)
    # Output pixel -> input pixel: rotate about the centre (counter-clockwise, as PIL).
    return _affine(
        clip, np.array([[cos, sin, cx - cos * cx - sin * cy], [-sin, cos, cy + sin * cx - cos * cy]])
    )


def _equalize(clip: torch.Tensor) -> torch.Tensor:
    """PIL's ImageOps.equalize of each frame and channel."""
    out = torch.empty_like(clip)
    for t in range(clip.shape[0]):
        for ch in range(clip.shape[1]):
            values = clip[t, ch].round().clamp(0, 255).long()
            hist = torch.bincount(values.flatten(), minlength=256)
            nonzero = hist[hist > 0]
            step = (nonzero.sum() - nonzero[-1]) // 255
            if step == 0:
                out[t, ch] = clip[t, ch]
                continue
            lut = ((torch.cumsum(hist, 0) - hist + step // 2) // step).clamp(0, 255)
            out[t, ch] = lut[values].to(clip.dtype)
    return out


def _autocontrast(clip: torch.Tensor) -> torch.Tensor:
    low = clip.amin(dim=(2, 3), keepdim=True)  # per frame and channel, as PIL's autocontrast
    high = clip.amax(dim=(2, 3), keepdim=True)
    scale = torch.where(high > low, 255.0 / (high - low).clamp(min=1e-6), torch.ones_like(high))
    offset = torch.where(high > low, low, torch.zeros_like(low))
    return ((clip - offset) * scale).clamp(0, 255)


def _sharpness(clip: torch.Tensor, factor: float) -> torch.Tensor:
    kernel = torch.tensor([[1, 1, 1], [1, 5, 1], [1, 1, 1]], dtype=clip.dtype) / 13
    c = clip.shape[1]
    smooth = F.conv2d(clip, kernel.expand(c, 1, 3, 3), groups=c, padding=1)
    smooth[..., 0, :], smooth[..., -1, :] = clip[..., 0, :], clip[..., -1, :]  # PIL leaves the border alone
    smooth[..., :, 0], smooth[..., :, -1] = clip[..., :, 0], clip[..., :, -1]
    return _blend(clip, smooth, factor)


def posterize_bits(level: float) -> int:
    """The bits timm's PosterizeIncreasing keeps at `level`."""
    return 4 - int(4 * level)


def apply_op(name: str, clip: torch.Tensor, level: float, sign: int = 1) -> torch.Tensor:
    """One op at `level` in [0, 1] (magnitude / 10), with timm's increasing-magnitude ranges;
    `sign` (+1/-1) is the direction of the ops in SIGNED."""
    h, w = clip.shape[-2:]
    if name == "AutoContrast":
        return _autocontrast(clip)
    if name == "Equalize":
        return _equalize(clip)
    if name == "Invert":
        return 255 - clip
    if name == "Rotate":
        return _rotate(clip, sign * 30 * level)
    if name == "PosterizeIncreasing":
        shift = 8 - posterize_bits(level)
        return ((clip.round().clamp(0, 255).to(torch.uint8) >> shift) << shift).to(clip.dtype)
    if name == "SolarizeIncreasing":
        threshold = 256 - 256 * level
        return torch.where(clip >= threshold, 255 - clip, clip)
    if name == "SolarizeAdd":
        return torch.where(clip < 128, (clip + 110 * level).clamp(max=255), clip)
    if name in ("ColorIncreasing", "ContrastIncreasing", "BrightnessIncreasing", "SharpnessIncreasing"):
        factor = 1 + sign * 0.9 * level
        if name == "ColorIncreasing":
            return _blend(clip, _gray(clip), factor)
        if name == "ContrastIncreasing":
            return _blend(clip, _gray(clip).mean(dim=(1, 2, 3), keepdim=True), factor)  # each frame's mean
        if name == "BrightnessIncreasing":
            return _blend(clip, 0.0, factor)
        return _sharpness(clip, factor)
    if name == "ShearX":
        return _affine(clip, np.array([[1, sign * 0.3 * level, 0], [0, 1, 0]]))
    if name == "ShearY":
        return _affine(clip, np.array([[1, 0, 0], [sign * 0.3 * level, 1, 0]]))
    if name == "TranslateXRel":
        return _affine(clip, np.array([[1, 0, sign * 0.45 * level * w], [0, 1, 0]]))
    if name == "TranslateYRel":
        return _affine(clip, np.array([[1, 0, 0], [0, 1, sign * 0.45 * level * h]]))
    raise ValueError(f"unknown RandAugment op {name!r}")


OPS = (
    "AutoContrast",
    "Equalize",
    "Invert",
    "Rotate",
    "PosterizeIncreasing",
    "SolarizeIncreasing",
    "SolarizeAdd",
    "ColorIncreasing",
    "ContrastIncreasing",
    "BrightnessIncreasing",
    "SharpnessIncreasing",
    "ShearX",
    "ShearY",
    "TranslateXRel",
    "TranslateYRel",
)


NUM_OPS = 4  # SlowFast's n4
LEVEL_STEPS = 40  # more bins make the DALI graph slower to build (its tables are made per bin)
SIGNED = frozenset(
    ("Rotate", "ColorIncreasing", "ContrastIncreasing", "BrightnessIncreasing", "SharpnessIncreasing",
     "ShearX", "ShearY", "TranslateXRel", "TranslateYRel")
)  # ops whose direction timm draws at random


class RandOp(NamedTuple):
    """One op RandAugment applies: its index in OPS, level in [0, 1] and sign (+1/-1)."""

    op: int
    level: float
    sign: int


def draw_rand_ops(
    rng: np.random.Generator,
    *,
    magnitude: float = 7,
    num_ops: int = NUM_OPS,
    magnitude_std: float = 0.5,
    prob: float = 0.5,
) -> tuple[RandOp, ...]:
    """The ops one clip gets: `num_ops` drawn with replacement, each kept with probability
    `prob` at magnitude ~ N(magnitude, magnitude_std) clipped to [0, 10], as a level in
    [0, 1] rounded to 1/LEVEL_STEPS."""
    ops = []
    for op in rng.integers(len(OPS), size=num_ops):
        if rng.random() >= prob:
            continue
        m = rng.normal(magnitude, magnitude_std) if magnitude_std > 0 else magnitude
        sign = -1 if OPS[op] in SIGNED and rng.random() < 0.5 else 1
        level = float(np.clip(m, 0, 10)) / 10
        if OPS[op] == "PosterizeIncreasing":  # its bits step at quarters: floor there, not at the bins
            level = int(4 * level) / 4
        ops.append(RandOp(int(op), round(level * LEVEL_STEPS) / LEVEL_STEPS, sign))
    return tuple(ops)


def apply_rand_ops(clip: torch.Tensor, ops: tuple[RandOp, ...]) -> torch.Tensor:
    """Apply drawn ops to a float (T, C, H, W) clip in [0, 255], the same on every frame."""
    for op in ops:
        clip = apply_op(OPS[op.op], clip, op.level, op.sign)
    return clip
