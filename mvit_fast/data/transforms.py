"""Spatial transforms on one clip, in torch (CPU backend; the GPU backend does the same in DALI).

Clips here are float tensors (T, C, H, W) with values in [0, 255] until `normalize`,
which returns (C, T, H, W) in the model's input scale. Every random choice is drawn
once per clip, so all frames get the same crop, flip, RandAugment ops and erased box.

Train order, SlowFast's (`_aug_frame`): RandAugment on the whole decoded frames -> random
resized crop -> flip -> normalize -> random erasing, each view's random choices drawn first
(`draw_train_view`), then applied (`train_view`). RandAugment before the crop matters: its
translations are fractions of the frame's size, and its rotations turn about the frame's centre.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from .randaugment import RandOp, apply_rand_ops, draw_rand_ops

K400_MEAN, K400_STD = (0.45, 0.45, 0.45), (0.225, 0.225, 0.225)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # SlowFast MViTv2-L


@dataclass(frozen=True)
class TrainAugment:
    """Training-time spatial augmentation (SlowFast MViTv2 K400 defaults).

    `repeats` is repeated augmentation: each decoded clip yields that many independently
    augmented views. Set `flip=False` for SSv2 (left/right carries the label there).
    """

    crop_size: int = 224
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    # Instead of the random resized crop: the short side resized to a size drawn from this
    # range (inverse-uniformly), then a random crop_size square (SlowFast's TRAIN_JITTER_SCALES
    # with INV_UNIFORM_SAMPLE, its SSv2 recipe).
    short_side: tuple[int, int] | None = None
    flip: bool = True
    rand_augment: bool = True  # m7 n4 mstd0.5, see randaugment.py
    erase_prob: float = 0.25
    repeats: int = 1
    mean: tuple[float, float, float] = K400_MEAN
    std: tuple[float, float, float] = K400_STD

    def __post_init__(self):
        check_int("crop_size", self.crop_size)
        check_int("repeats", self.repeats)
        low, high = self.scale
        if not 0 < low <= high <= 1:
            raise ValueError(f"scale must be an area fraction range 0 < low <= high <= 1, got {self.scale}")
        if not 0 < self.ratio[0] <= self.ratio[1]:
            raise ValueError(f"ratio must be an aspect range 0 < low <= high, got {self.ratio}")
        if self.short_side is not None and not (
                len(self.short_side) == 2 and self.crop_size <= self.short_side[0] <= self.short_side[1]):
            raise ValueError(f"short_side must be a range (low, high) with crop_size {self.crop_size} <= low "
                             f"<= high, got {self.short_side}")
        if not 0 <= self.erase_prob <= 1:
            raise ValueError(f"erase_prob must be in [0, 1], got {self.erase_prob}")
        _check_mean_std(self)


@dataclass(frozen=True)
class TestAugment:
    """Test-time views: short side resized to `short_side`, then `num_crops` crops of
    `crop_size` (1: center; 3: left/center/right along the long side)."""

    __test__ = False  # not a pytest test class, whatever its name

    short_side: int = 256
    crop_size: int = 224
    num_crops: int = 1
    mean: tuple[float, float, float] = K400_MEAN
    std: tuple[float, float, float] = K400_STD

    def __post_init__(self):
        check_int("short_side", self.short_side)
        check_int("crop_size", self.crop_size)
        if self.short_side < self.crop_size:
            raise ValueError(f"short_side {self.short_side} is smaller than crop_size {self.crop_size}: "
                             "the crops would not fit the resized frames")
        if not _is_int(self.num_crops) or self.num_crops not in (1, 3):
            raise ValueError(f"num_crops must be 1 or 3, got {self.num_crops!r}")
        _check_mean_std(self)


def check_augment(train: bool, augment: TrainAugment | TestAugment) -> None:
    """A `TrainAugment` for training, a `TestAugment` for testing."""
    if train != isinstance(augment, TrainAugment):
        wanted = "TrainAugment" if train else "TestAugment"
        raise TypeError(f"train={train} needs a {wanted}, got {augment!r}")


def check_int(name: str, value, least: int = 1) -> None:
    """ValueError naming `name` unless `value` is an integer (not a bool) >= `least`."""
    if not _is_int(value) or value < least:
        raise ValueError(f"{name} must be an integer >= {least}, got {value!r}")


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _check_mean_std(augment) -> None:
    if len(augment.mean) != 3 or len(augment.std) != 3:
        raise ValueError(f"mean and std need one value per RGB channel, got {augment.mean}, {augment.std}")
    if min(augment.std) <= 0:
        raise ValueError(f"std must be positive, got {augment.std}")


def random_resized_crop_box(
    height: int, width: int, scale: tuple[float, float], ratio: tuple[float, float], rng: np.random.Generator
) -> tuple[int, int, int, int]:
    """(top, left, h, w) of a crop with area fraction in `scale` and aspect w/h in `ratio`
    (log-uniform), torchvision's algorithm: 10 tries, then the largest centered crop
    with the aspect clamped into `ratio`."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w
    aspect = width / height
    if aspect < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif aspect > ratio[1]:
        h, w = height, int(round(height * ratio[1]))
    else:
        h, w = height, width
    return (height - h) // 2, (width - w) // 2, h, w


def short_side_jitter_box(height: int, width: int, crop_size: int, short_side: tuple[int, int],
                          rng: np.random.Generator) -> tuple[int, int, int, int]:
    """(top, left, h, w) of SlowFast's scale-jitter crop as a box of the original frame: the
    short side resized to a size S drawn inverse-uniformly from `short_side` (1/S uniform, as
    its SSv2 MViTv2 recipes set INV_UNIFORM_SAMPLE), the long side floored in proportion,
    then a crop_size square at a uniform offset. Resizing the box to crop_size gives that
    view (up to the interpolation)."""
    low, high = short_side
    size = int(round(1.0 / rng.uniform(1.0 / high, 1.0 / low)))
    scale = min(height, width) / size  # frame pixels per resized pixel
    resized_h, resized_w = short_side_size(height, width, size)
    # SlowFast's random_crop: randint(0, margin), the last offset excluded (0 with no margin)
    top = int(rng.integers(0, resized_h - crop_size)) if resized_h > crop_size else 0
    left = int(rng.integers(0, resized_w - crop_size)) if resized_w > crop_size else 0
    side_h, side_w = min(height, round(crop_size * scale)), min(width, round(crop_size * scale))
    return (min(round(top * scale), height - side_h), min(round(left * scale), width - side_w),
            side_h, side_w)


def resize(clip: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize of (T, C, H, W) to `size`, without antialiasing when shrinking, as
    SlowFast's `F.interpolate` (the DALI backend's linear resize is set alike)."""
    if tuple(clip.shape[-2:]) == tuple(size):
        return clip
    return F.interpolate(clip, size=size, mode="bilinear", align_corners=False)


def resized_crop(clip: torch.Tensor, box: tuple[int, int, int, int], size: int) -> torch.Tensor:
    top, left, h, w = box
    return resize(clip[..., top : top + h, left : left + w], (size, size))


def short_side_size(height: int, width: int, short_side: int) -> tuple[int, int]:
    """(h, w) with the shorter side `short_side` and the longer one in proportion, rounded down
    as SlowFast does (in integers: exact where the float ratio would land a hair below)."""
    if height <= width:
        return short_side, width * short_side // height
    return height * short_side // width, short_side


def short_side_resize(clip: torch.Tensor, short_side: int) -> torch.Tensor:
    """Resize so the shorter side is `short_side`, keeping the aspect ratio (`short_side_size`)."""
    return resize(clip, short_side_size(*clip.shape[-2:], short_side))


def spatial_crops(clip: torch.Tensor, crop_size: int, num_crops: int) -> list[torch.Tensor]:
    """Center crop (num_crops=1) or left/center/right crops along the long side (3),
    SlowFast's `uniform_crop` with spatial_idx 0, 1, 2 (top/center/bottom for portrait)."""
    h, w = clip.shape[-2:]
    if min(h, w) < crop_size:
        raise ValueError(f"crop {crop_size} is larger than the resized frame {h}x{w}")
    center = (-(-(h - crop_size) // 2), -(-(w - crop_size) // 2))  # odd margins round up, as SlowFast
    if num_crops == 1:
        offsets = [center]
    elif w >= h:
        offsets = [(center[0], 0), center, (center[0], w - crop_size)]
    else:
        offsets = [(0, center[1]), center, (h - crop_size, center[1])]
    return [clip[..., y : y + crop_size, x : x + crop_size] for y, x in offsets]


def normalize(clip: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """(T, C, H, W) in [0, 255] -> (C, T, H, W) float32, (x / 255 - mean) / std."""
    m = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1) * 255
    s = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1) * 255
    return ((clip.float() - m) / s).permute(1, 0, 2, 3).contiguous()


class EraseBox(NamedTuple):
    """A random-erasing box and the seed of its noise."""

    top: int
    left: int
    height: int
    width: int
    seed: int


def draw_erase(
    shape: tuple[int, int, int],
    prob: float,
    rng: np.random.Generator,
    scale: tuple[float, float] = (0.02, 1 / 3),
    ratio: tuple[float, float] = (0.3, 1 / 0.3),
) -> EraseBox | None:
    """timm/SlowFast RandomErasing, "pixel" mode, one box, for a (C, H, W) `shape`: with
    probability `prob`, a box of area fraction in `scale` and log-uniform aspect in `ratio`.
    None: nothing erased."""
    if prob <= 0 or rng.random() >= prob:
        return None
    _, height, width = shape
    for _ in range(10):
        target = height * width * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
        h = int(round(math.sqrt(target * aspect)))
        w = int(round(math.sqrt(target / aspect)))
        if w < width and h < height:
            top, left = int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1))
            return EraseBox(top, left, h, w, int(rng.integers(0, 2**62)))
    return None


def erase(clip: torch.Tensor, box: EraseBox | None) -> torch.Tensor:
    """Fill `box` of a normalized (C, T, H, W) clip with standard normal noise: the box in the
    same place on every frame, new noise in every frame (SlowFast's `cube` erasing of a clip's
    frames). The noise comes from the box's seed on the CPU, so both backends erase alike."""
    if box is None:
        return clip
    noise = torch.randn((*clip.shape[:2], box.height, box.width),
                        generator=torch.Generator().manual_seed(box.seed))
    clip = clip.clone()
    rows, cols = slice(box.top, box.top + box.height), slice(box.left, box.left + box.width)
    clip[..., rows, cols] = noise.to(clip.device, clip.dtype)
    return clip


class ViewDraw(NamedTuple):
    """Every random choice of one training view, drawn before any pixel is touched: both
    backends apply the same draws, and a resumed run draws them again from the same seed."""

    box: tuple[int, int, int, int]  # (top, left, h, w) of the random resized crop
    flip: bool
    rand_ops: tuple[RandOp, ...]  # the RandAugment ops that apply, in order
    erase: EraseBox | None


def draw_train_view(height: int, width: int, augment: TrainAugment, rng: np.random.Generator) -> ViewDraw:
    """The draws of one view of (height, width) frames, in the order crop, flip, RandAugment,
    erasing (they apply as RandAugment, crop, flip, erasing)."""
    if augment.short_side is not None:
        box = short_side_jitter_box(height, width, augment.crop_size, augment.short_side, rng)
    else:
        box = random_resized_crop_box(height, width, augment.scale, augment.ratio, rng)
    flip = augment.flip and rng.random() < 0.5
    rand_ops = draw_rand_ops(rng) if augment.rand_augment else ()
    size = augment.crop_size
    return ViewDraw(box, flip, rand_ops, draw_erase((3, size, size), augment.erase_prob, rng))


def train_view(frames: torch.Tensor, draw: ViewDraw, augment: TrainAugment) -> torch.Tensor:
    """(T, C, H, W) float frames in [0, 255] -> one normalized (C, T, crop, crop) view."""
    clip = resized_crop(apply_rand_ops(frames, draw.rand_ops), draw.box, augment.crop_size)
    if draw.flip:  # after RandAugment, as SlowFast: shear, translate, rotate are not mirror-symmetric
        clip = clip.flip(-1)
    return erase(normalize(clip, augment.mean, augment.std), draw.erase)
