"""Spatial transforms, RandAugment and Mixup/CutMix on small tensors."""

import numpy as np
import pytest
import torch

from mvit_fast.data.mixup import MixupCutmix, smooth_one_hot
from mvit_fast.data.randaugment import (
    FILL,
    LEVEL_STEPS,
    OPS,
    SIGNED,
    RandOp,
    apply_op,
    apply_rand_ops,
    draw_rand_ops,
    posterize_bits,
)
from mvit_fast.data.transforms import (
    TrainAugment,
    ViewDraw,
    draw_erase,
    draw_train_view,
    erase,
    normalize,
    random_resized_crop_box,
    resized_crop,
    short_side_jitter_box,
    short_side_resize,
    spatial_crops,
    train_view,
)


def ramp_clip(t=3, h=40, w=60) -> torch.Tensor:
    """(T, 3, H, W): channel 0 = column index, channel 1 = row index, channel 2 = frame index."""
    clip = torch.empty(t, 3, h, w)
    clip[:, 0] = torch.arange(w).float()
    clip[:, 1] = torch.arange(h).float()[:, None]
    clip[:, 2] = torch.arange(t).float()[:, None, None]
    return clip


def test_random_resized_crop_box_area_and_aspect():
    rng = np.random.default_rng(0)
    for _ in range(300):
        top, left, h, w = random_resized_crop_box(256, 340, (0.08, 1.0), (3 / 4, 4 / 3), rng)
        assert 0 <= top <= 256 - h and 0 <= left <= 340 - w
        assert 0.07 <= h * w / (256 * 340) <= 1.0
        assert 3 / 4 - 0.05 <= w / h <= 4 / 3 + 0.05


def test_random_resized_crop_fallback_is_centred():
    rng = np.random.default_rng(0)
    # Impossible aspect: falls back to the whole height and a width clamped to ratio 2.
    assert random_resized_crop_box(10, 100, (1.0, 1.0), (2.0, 2.0), rng) == (0, 40, 10, 20)


def test_short_side_jitter_crop_is_slowfasts_resize_then_crop():
    """SlowFast's SSv2 training crop (TRAIN_JITTER_SCALES): short side resized to S, then a
    random crop_size square; as a box of the frame it gives the same view."""
    rng = np.random.default_rng(0)
    tops, lefts = [], []
    for _ in range(2000):  # S = 80 on a 40 x 60 frame: a 2x upscale, so each box is 16 x 16
        top, left, h, w = short_side_jitter_box(40, 60, 32, (80, 80), rng)
        assert (h, w) == (16, 16) and 0 <= top <= 40 - 16 and 0 <= left <= 60 - 16
        tops.append(top)
        lefts.append(left)
    assert set(tops) == set(range(0, 25)) and set(lefts) == set(range(0, 45))  # 0..47, 0..87 halved
    # at S = the short side (no resize) the offsets are SlowFast's randint(0, margin): the
    # margin itself excluded (40 - 32 = 8, 60 - 32 = 28), and 0 where there is none
    boxes = [short_side_jitter_box(40, 60, 32, (40, 40), rng) for _ in range(1000)]
    assert {b[0] for b in boxes} == set(range(8)) and {b[1] for b in boxes} == set(range(28))
    assert {short_side_jitter_box(32, 60, 32, (32, 32), rng)[0] for _ in range(50)} == {0}
    # uniform offsets of the resized frame (0..48, 0..88), halved: uniform over the frame's
    assert abs(np.mean(tops) - 12) < 0.5 and abs(np.mean(lefts) - 22) < 0.8
    # the view equals resizing the whole frame to short side 80 and cropping there
    clip = ramp_clip()
    top, left, h, w = short_side_jitter_box(40, 60, 32, (80, 80), np.random.default_rng(3))
    whole = short_side_resize(clip, 80)[..., 2 * top : 2 * top + 32, 2 * left : 2 * left + 32]
    view = resized_crop(clip, (top, left, h, w), 32)
    assert torch.allclose(view[..., 1:-1, 1:-1], whole[..., 1:-1, 1:-1], atol=1e-4)  # inside the edges
    # S is drawn from the range: box sides crop * short / S
    sides = {short_side_jitter_box(40, 60, 32, (40, 80), rng)[2] for _ in range(300)}
    assert min(sides) == 16 and max(sides) == 32
    with pytest.raises(ValueError, match="short_side must be a range"):
        TrainAugment(crop_size=32, short_side=(24, 40))
    # the short side resized to exactly S, where S / short does not round-trip in floats
    # (288 / (288 / 224) is 223.99...): with S = crop size the crop spans the short side
    # (offset 0 along it), and no draw fails
    for height, width in ((288, 384), (384, 288), (224, 300), (322, 500)):
        top, left, h, w = short_side_jitter_box(height, width, 224, (224, 224), rng)
        assert (top, h) == (0, height) if height <= width else (left, w) == (0, width)
    # S drawn inverse-uniformly (SlowFast's INV_UNIFORM_SAMPLE): 1/S uniform over [1/320, 1/256]
    sizes = 240 * 224 / np.array([short_side_jitter_box(240, 427, 224, (256, 320), rng)[2]
                                  for _ in range(4000)])
    # (S read back from the box side, to a pixel: a uniform S would miss this mean by 2.7e-5)
    assert abs(np.mean(1 / sizes) - (1 / 256 + 1 / 320) / 2) < 1e-5
    assert abs(np.mean(sizes <= 284.4) - 0.5) < 0.03  # the median of S: the harmonic mean 2/(1/256+1/320)
    # draw_train_view takes it instead of the random resized crop
    augment = TrainAugment(crop_size=32, short_side=(80, 80), rand_augment=False, erase_prob=0.0)
    assert draw_train_view(40, 60, augment, rng).box[2:] == (16, 16)


def test_short_side_resize_and_three_crops_landscape():
    clip = ramp_clip(h=40, w=60)
    resized = short_side_resize(clip, 20)
    assert resized.shape[-2:] == (20, 30)
    left, center, right = spatial_crops(ramp_clip(h=20, w=30), 20, 3)
    assert [c[0, 0, 0, 0].item() for c in (left, center, right)] == [0, 5, 10]  # column of the first pixel
    assert spatial_crops(ramp_clip(h=20, w=30), 20, 1)[0][0, 0, 0, 0].item() == 5


def test_three_crops_portrait_go_top_to_bottom():
    top, center, bottom = spatial_crops(ramp_clip(h=30, w=20), 20, 3)
    assert [c[0, 1, 0, 0].item() for c in (top, center, bottom)] == [0, 5, 10]


@pytest.mark.parametrize("h,w", [(21, 31), (31, 21)])
def test_odd_margins_round_up_as_slowfasts_uniform_crop(h, w):
    # SlowFast's uniform_crop: offsets ceil((h - size) / 2), ceil((w - size) / 2); the long
    # side's first and last crops at 0 and its full margin (11 here), the short side centred.
    crops = spatial_crops(ramp_clip(h=h, w=w), 20, 3)
    origins = [(int(c[0, 1, 0, 0]), int(c[0, 0, 0, 0])) for c in crops]  # (row, column) of the first pixel
    assert origins == ([(1, 0), (1, 6), (1, 11)] if w > h else [(0, 1), (6, 1), (11, 1)])
    (center,) = spatial_crops(ramp_clip(h=h, w=w), 20, 1)
    assert (int(center[0, 1, 0, 0]), int(center[0, 0, 0, 0])) == origins[1]


def test_normalize_layout_and_values():
    clip = torch.full((2, 3, 4, 5), 255 * 0.45)
    clip[1] = 255.0
    out = normalize(clip, (0.45,) * 3, (0.225,) * 3)
    assert out.shape == (3, 2, 4, 5) and out.dtype == torch.float32
    assert torch.allclose(out[:, 0], torch.zeros(())) and torch.allclose(
        out[:, 1], torch.tensor(0.55 / 0.225)
    )


def test_random_erase_same_box_on_every_frame_new_noise_in_each():
    # SlowFast's cube erasing of a (T, C, H, W) clip: one box, its pixels drawn per frame
    rng = np.random.default_rng(3)
    clip = torch.zeros(3, 4, 32, 32)
    box = draw_erase((3, 32, 32), 1.0, rng)
    erased = erase(clip, box)
    changed = erased != 0
    assert changed.sum() == 3 * 4 * box.height * box.width
    assert all(torch.equal(changed[:, 0], changed[:, t]) for t in range(4))
    inside = erased[..., box.top : box.top + box.height, box.left : box.left + box.width]
    assert abs(torch.corrcoef(inside[0, :2].reshape(2, -1))[0, 1].item()) < 0.3  # frames 0, 1: unrelated
    assert abs(inside.mean().item()) < 0.2 and abs(inside.std().item() - 1) < 0.2  # N(0, 1)
    assert torch.equal(erase(clip, box), erased)  # the seed decides
    assert draw_erase((3, 32, 32), 0.0, rng) is None and erase(clip, None) is clip


@pytest.mark.parametrize("name", OPS)
def test_every_randaugment_op_is_the_same_on_every_frame(name):
    frame = torch.rand(1, 3, 24, 32) * 255
    clip = frame.expand(4, -1, -1, -1).clone()
    out = apply_op(name, clip, 0.7, -1)
    assert out.shape == clip.shape and out.min() >= 0 and out.max() <= 255
    assert torch.allclose(out, out[:1].expand_as(out))


@pytest.mark.parametrize("name", ["AutoContrast", "ContrastIncreasing", "Equalize"])
def test_statistics_are_each_frames_as_pils(name):
    # a dark and a bright frame: SlowFast's PIL ops take each frame's statistics, so a clip's
    # frames come out as each alone would
    clip = torch.cat([torch.full((1, 3, 32, 32), 60.0), torch.full((1, 3, 32, 32), 180.0)])
    clip[:, :, :16] += 10  # two levels per frame, so no frame is flat
    per_frame = torch.cat([apply_op(name, frame[None], 0.5) for frame in clip])
    assert torch.equal(apply_op(name, clip, 0.5), per_frame)


def shifted(frames: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """out[..., y, x] = frames[..., y + dy, x + dx], FILL where that falls outside the frame."""
    out = torch.full_like(frames, FILL)
    h, w = frames.shape[-2:]
    out[..., max(0, -dy) : min(h, h - dy), max(0, -dx) : min(w, w - dx)] = \
        frames[..., max(0, dy) : min(h, h + dy), max(0, dx) : min(w, w + dx)]
    return out


@pytest.mark.parametrize("name", ["TranslateXRel", "TranslateYRel"])
@pytest.mark.parametrize("sign", [1, -1])
def test_rand_augment_runs_on_the_whole_frame_before_the_crop(name, sign):
    # SlowFast's _aug_frame: RandAugment on the decoded frames, then the crop. A relative
    # translation at level 0.5 moves the content by 0.45 * 0.5 of the frame's side (18 of 80
    # columns, 9 of 40 rows), not of the crop's (7.2 of 32), and the fill comes in at the
    # frame's edges (rows 40-44 or -5 to -1 reach into this box), not at the crop's
    frames = torch.randint(0, 256, (2, 3, 40, 80)).float()
    draw = ViewDraw((4, 20, 32, 32), False, (RandOp(OPS.index(name), 0.5, sign),), None)
    levels = TrainAugment(crop_size=32, erase_prob=0.0, mean=(0.0,) * 3, std=(1 / 255,) * 3)
    view = train_view(frames, draw, levels).permute(1, 0, 2, 3)  # (T, C, H, W) in levels of 255
    dy, dx = (0, 18 * sign) if name == "TranslateXRel" else (9 * sign, 0)
    want = shifted(frames, dy, dx)[..., 4:36, 20:52]
    assert (view - want).abs().max() < 0.05


def test_rand_augment_changes_the_clip_but_not_across_frames():
    clip = (torch.rand(1, 3, 24, 24) * 255).expand(5, -1, -1, -1).clone()
    outs = [apply_rand_ops(clip, draw_rand_ops(np.random.default_rng(s))) for s in range(10)]
    assert sum(not torch.equal(o, clip) for o in outs) >= 5
    assert all(torch.allclose(o, o[:1].expand_as(o)) for o in outs)


def test_rand_augment_draws_timm_m7_n4_mstd05():
    draws = [draw_rand_ops(np.random.default_rng(s)) for s in range(2000)]
    ops = [op for d in draws for op in d]
    assert all(len(d) <= 4 for d in draws)
    assert abs(len(ops) / (4 * len(draws)) - 0.5) < 0.02  # each of n=4 kept with p=0.5
    levels = np.array([op.level for op in ops if OPS[op.op] != "PosterizeIncreasing"])
    assert abs(levels.mean() - 0.7) < 0.005 and abs(levels.std() - 0.05) < 0.005  # N(7, 0.5) / 10
    assert np.allclose(levels * LEVEL_STEPS, np.round(levels * LEVEL_STEPS))  # DALI's bins
    # Posterize keeps 4 - int(4 m / 10) bits of the unrounded magnitude m: 2 bits at m = 7.45
    # (a level rounded to the bins first, 0.75, would keep 1)
    draws = [draw_rand_ops(np.random.default_rng(s), magnitude=7.45, magnitude_std=0) for s in range(300)]
    at = [op for d in draws for op in d if OPS[op.op] == "PosterizeIncreasing"]
    assert at and {posterize_bits(op.level) for op in at} == {2}
    counts = np.bincount([op.op for op in ops], minlength=len(OPS))
    assert counts.min() > 0.8 * len(ops) / len(OPS)  # uniform over the 15 ops
    signs = np.array([op.sign for op in ops])
    signed = np.array([OPS[op.op] in SIGNED for op in ops])
    assert (signs[~signed] == 1).all() and abs((signs[signed] == -1).mean() - 0.5) < 0.04


def test_view_draws_are_the_seeds_whatever_the_pixels():
    augment = TrainAugment(crop_size=32, erase_prob=0.5)
    a = [draw_train_view(48, 64, augment, np.random.default_rng([1, 2, 3])) for _ in range(2)]
    assert a[0].box == a[1].box and a[0].rand_ops == a[1].rand_ops and a[0].flip == a[1].flip
    b = draw_train_view(48, 64, augment, np.random.default_rng([1, 2, 4]))
    assert (b.box, b.rand_ops) != (a[0].box, a[0].rand_ops)


def test_flip_and_translate_directions():
    clip = ramp_clip(t=1, h=8, w=8)
    shifted = apply_op("TranslateXRel", clip, 0.0)
    assert torch.allclose(shifted, clip, atol=1e-4)  # level 0 is the identity
    assert torch.equal(clip.flip(-1)[0, 0, 0], torch.arange(7, -1, -1).float())


def test_label_smoothing_and_mixup_targets():
    labels = torch.tensor([0, 2, 1, 2])
    target = smooth_one_hot(labels, 3, 0.1)
    assert torch.allclose(target[0], torch.tensor([0.1 / 3 + 0.9, 0.1 / 3, 0.1 / 3]))
    mix = MixupCutmix(3, seed=0)
    for _ in range(20):
        clips = torch.randn(4, 3, 2, 16, 16)
        original = clips.clone()
        mixed, soft = mix(clips, labels)
        assert soft.shape == (4, 3) and torch.allclose(soft.sum(1), torch.ones(4))
        # Each clip is lam * own + (1 - lam) * partner, pixel-wise (mixup) or box-wise (cutmix):
        own, partner = smooth_one_hot(labels, 3, 0.1), smooth_one_hot(labels.roll(1), 3, 0.1)
        lam = ((soft - partner) / (own - partner))[0, 0]
        from_own = (mixed - original.roll(1, 0)) / (original - original.roll(1, 0))
        assert torch.allclose(from_own.mean(), lam, atol=0.02)


@pytest.mark.parametrize("videos", [1, 2, 3])
def test_mixup_never_mixes_a_video_with_its_own_views(videos):
    """Repeated augmentation puts a video's views side by side: [A1 A2 B1 B2 ...]. Each clip's
    partner is a clip of another video, whatever the number of videos; one video is refused."""
    views = 2
    mix = MixupCutmix(videos + 1, mixup_alpha=1.0, cutmix_alpha=0.0, label_smoothing=0.0, views=views, seed=0)
    video = torch.arange(videos).repeat_interleave(views)
    clips = video.float().view(-1, 1, 1, 1, 1).expand(-1, 3, 2, 4, 4).clone()
    if videos == 1:
        with pytest.raises(ValueError, match="two or more whole videos"):
            mix(clips, video)
        return
    mixed, soft = mix(clips, video)
    lam = soft[0, 0].item()
    assert 0 < lam < 1
    partner = (mixed[:, 0, 0, 0, 0] - lam * video) / (1 - lam)  # the video each clip was mixed with
    assert torch.allclose(partner, video.roll(views).float(), atol=1e-5)
    assert (partner.round().long() != video).all()


def test_cutmix_box_is_the_same_on_every_frame():
    mix = MixupCutmix(2, mixup_alpha=0.0, cutmix_alpha=1.0, seed=1)
    clips = torch.stack([torch.zeros(3, 4, 16, 16), torch.ones(3, 4, 16, 16)])
    mixed, soft = mix(clips, torch.tensor([0, 1]))
    assert torch.equal(mixed[0, :, 0], mixed[0, :, 3])
    area = mixed[0, 0, 0].mean()  # fraction of video 0 replaced by video 1
    assert torch.allclose(soft[0, 1], 0.05 + 0.9 * area)
    with pytest.raises(ValueError, match="two or more whole videos"):
        mix(torch.zeros(1, 3, 1, 4, 4), torch.zeros(1, dtype=torch.long))
