"""The training view's augmentation as a DALI graph that draws nothing itself.

Every random choice (crop box, flip, RandAugment ops, magnitudes and signs) is drawn in
Python by `transforms.draw_train_view`, the same function the PyAV backend uses, and fed
per sample: the pipeline holds no random state, so a resumed run decodes and augments
exactly what the uninterrupted one did, and the two backends crop and flip alike.

RandAugment runs `randaugment.OPS` in DALI's ops (`nvidia.dali.auto_aug`), one op per slot
chosen per sample with `select`; a slot the draw left empty runs the identity. Levels
arrive as bins of 1/LEVEL_STEPS, the resolution `draw_rand_ops` rounds them to.
Known differences from randaugment.py's ops: Equalize is OpenCV's formula; Color is
DALI's saturation; resampling and rounding to uint8 between ops differ by a few levels.
AutoContrast, Contrast and Equalize take each frame's statistics, as randaugment.py does.
"""

from __future__ import annotations

import numpy as np
from nvidia.dali import fn, types
from nvidia.dali import math as dmath
from nvidia.dali.auto_aug import augmentations as aa
from nvidia.dali.auto_aug.core import augmentation, select, signed_bin

from .randaugment import FILL, LEVEL_STEPS, NUM_OPS, OPS, posterize_bits
from .transforms import TrainAugment, ViewDraw

MAGNITUDE_BINS = LEVEL_STEPS + 1  # level = bin / LEVEL_STEPS


def _posterize_mask(level: float) -> np.ndarray:
    return np.array((0xFF << (8 - posterize_bits(level))) & 0xFF, dtype=np.uint8)


@augmentation(mag_range=(0, 1), mag_to_param=_posterize_mask, param_device="auto")
def _posterize(data, mask):
    return data & mask


@augmentation
def _auto_contrast(data, _):
    """Stretch each frame's channels to [0, 255]; a flat channel stays as it is."""
    lo = fn.cast(fn.reductions.min(data, axis_names="HW", keep_dims=True), dtype=types.FLOAT)
    hi = fn.cast(fn.reductions.max(data, axis_names="HW", keep_dims=True), dtype=types.FLOAT)
    flat = fn.cast(hi == lo, dtype=types.FLOAT)
    return fn.cast((data - lo) * (255 / (hi - lo + flat)) + lo * flat, dtype=types.UINT8)


@augmentation
def _equalize(data, _):
    return fn.equalize(data)


@augmentation(mag_range=(0, 0.9), randomly_negate=True, mag_to_param=aa.sharpness_kernel, param_device="auto")
def _sharpness(data, kernel):
    return fn.filter(data, kernel)


@augmentation(mag_range=(0, 0.9), randomly_negate=True, mag_to_param=aa.shift_enhance_range)
def _contrast(data, factor):
    """Blend each frame with its mean gray level (PIL's Contrast)."""
    mean = fn.reductions.mean(data, axis_names="HW", keep_dims=True)
    gray = fn.reductions.sum(mean * types.Constant(np.array([0.299, 0.587, 0.114], np.float32)),
                             axis_names="C", keep_dims=True)
    return fn.cast(dmath.clamp(gray + (data - gray) * factor, 0, 255), dtype=types.UINT8)


# Index i runs OPS[i]; the last index is the identity of an empty slot.
# `DIRECTION[i]`: -1 where DALI's op moves the other way than randaugment.py's for the same sign.
SUITE = {
    "AutoContrast": (_auto_contrast, 1),
    "Equalize": (_equalize, 1),
    "Invert": (aa.invert, 1),
    "Rotate": (aa.rotate.augmentation(mag_range=(0, 30), randomly_negate=True), -1),
    "PosterizeIncreasing": (_posterize, 1),
    "SolarizeIncreasing": (aa.solarize.augmentation(mag_range=(256, 0)), 1),
    "SolarizeAdd": (aa.solarize_add.augmentation(mag_range=(0, 110)), 1),
    "ColorIncreasing": (aa.color, 1),
    "ContrastIncreasing": (_contrast, 1),
    "BrightnessIncreasing": (aa.brightness, 1),
    "SharpnessIncreasing": (_sharpness, 1),
    "ShearX": (aa.shear_x.augmentation(mag_range=(0, 0.3), randomly_negate=True), -1),
    "ShearY": (aa.shear_y.augmentation(mag_range=(0, 0.3), randomly_negate=True), -1),
    "TranslateXRel": (aa.translate_x.augmentation(mag_range=(0, 0.45), randomly_negate=True), -1),
    "TranslateYRel": (aa.translate_y.augmentation(mag_range=(0, 0.45), randomly_negate=True), -1),
}
assert tuple(SUITE) == OPS
OPS_AND_IDENTITY = [op for op, _ in SUITE.values()] + [aa.identity]
DIRECTION = np.array([direction for _, direction in SUITE.values()])


def rand_augment_op(clip, op_index, level_bin, negate, size):
    """Per sample, OPS[op_index] (the identity for len(OPS)) at level level_bin / LEVEL_STEPS, its
    direction reversed where `negate` is 1, on (F, H, W, C) uint8 frames of `size` (H, W): a
    pair, or a DataNode of each sample's (translations are fractions of it)."""
    return select(
        OPS_AND_IDENTITY,
        op_index,
        data=clip,
        magnitude_bin=signed_bin(level_bin, negate),
        num_magnitude_bins=MAGNITUDE_BINS,
        shape=size,
        fill_value=FILL,
    )


def train_views_graph(video, augment: TrainAugment, normalize: dict) -> list:
    """RandAugment on the whole frames -> random resized crop -> flip + `crop_mirror_normalize(
    **normalize)` of a decoded (F, H, W, C) uint8 batch (SlowFast's order, see transforms.py),
    one output per repeat, from `train_draw_inputs`."""
    crop = fn.external_source(name="crop", dtype=types.FLOAT, ndim=2)  # (repeats, 4): y0, x0, y1, x1
    mirror = fn.external_source(name="mirror", dtype=types.INT32, ndim=1)  # (repeats,)
    if augment.rand_augment:  # (repeats, num_ops) each
        op_index = fn.external_source(name="ra_op", dtype=types.INT32, ndim=2)
        level_bin = fn.external_source(name="ra_bin", dtype=types.INT32, ndim=2)
        negate = fn.external_source(name="ra_negate", dtype=types.INT32, ndim=2)
        frame_size = video.shape(dtype=types.FLOAT)[1:3]  # (H, W) of each sample
    size = (augment.crop_size,) * 2
    views = []
    for r in range(augment.repeats):
        clip = video
        if augment.rand_augment:
            for slot in range(NUM_OPS):
                slot_draw = op_index[r, slot], level_bin[r, slot], negate[r, slot]
                clip = rand_augment_op(clip, *slot_draw, frame_size)
        clip = fn.resize(clip, size=size, roi_start=crop[r, 0:2], roi_end=crop[r, 2:4], antialias=False)
        views.append(fn.crop_mirror_normalize(clip, mirror=mirror[r], dtype=types.FLOAT, **normalize))
    return views


def train_draw_inputs(draws: list[ViewDraw], augment: TrainAugment) -> dict[str, np.ndarray]:
    """One sample's external inputs for `train_views_graph` from its views' draws (the graph
    has RandAugment's inputs only with `augment.rand_augment`)."""
    crop = np.array([[top, left, top + h, left + w] for top, left, h, w in (d.box for d in draws)],
                    dtype=np.float32)
    ops = np.full((len(draws), NUM_OPS), len(OPS), dtype=np.int32)  # empty slots: the identity
    bins = np.zeros_like(ops)
    negate = np.zeros_like(ops)
    for r, draw in enumerate(draws):
        for slot, op in enumerate(draw.rand_ops):
            ops[r, slot], bins[r, slot] = op.op, round(op.level * LEVEL_STEPS)
            negate[r, slot] = op.sign * DIRECTION[op.op] < 0
    inputs = dict(crop=crop, mirror=np.array([d.flip for d in draws], dtype=np.int32))
    return inputs | (dict(ra_op=ops, ra_bin=bins, ra_negate=negate) if augment.rand_augment else {})
