"""Sampling protocols against hand-computed frame positions."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from mvit_fast.data.sampling import ClipSampling, k400_test_indices, k400_train_indices, ssv2_indices


def test_k400_test_positions_by_hand():
    # 300 frames at 30 fps, 16x4: clip_size 64, delta 236; 5 clips start at k * floor(236 / 4)
    # = k * 59, each spreading 16 frames over 64: start + floor(63 / 15 * i) = start + floor(4.2 i).
    spread = [0, 4, 8, 12, 16, 21, 25, 29, 33, 37, 42, 46, 50, 54, 58, 63]
    clips = k400_test_indices(300, 16, 4, 5)
    assert [c.tolist() for c in clips] == [[s + i for i in spread] for s in (0, 59, 118, 177, 236)]
    # One clip: the centre, floor(delta / 2).
    assert k400_test_indices(300, 16, 4, 1)[0].tolist() == [118 + i for i in spread]
    # 32x3 on 250 frames: clip_size 96, delta 154, 3 clips at k * 77; 95 / 31 apart.
    clips = k400_test_indices(250, 32, 3, 3)
    assert [c[0] for c in clips] == [0, 77, 154]
    assert clips[1].tolist() == [77 + 95 * i // 31 for i in range(32)]


def test_k400_clip_spans_the_same_seconds_at_any_frame_rate():
    # 25 fps: clip_size 64 * 25 / 30 = 53 1/3 frames, delta 250 - 53 1/3; 16 frames spread
    # over 52 1/3: floor(157 i / 45).
    clips = k400_test_indices(250, 16, 4, 5, fps=25.0)
    assert [c[0] for c in clips] == [0, 49, 98, 147, 196]  # k * floor(196 2/3 / 4)
    assert clips[0].tolist() == [0, 3, 6, 10, 13, 17, 20, 24, 27, 31, 34, 38, 41, 45, 48, 52]
    assert clips[0].tolist() == [157 * i // 45 for i in range(16)]
    # 60 fps: twice the frames; an unknown rate (0) is taken as 30 fps.
    assert k400_test_indices(600, 16, 4, 1, fps=60.0)[0].tolist() == [
        236 + 127 * i // 15 for i in range(16)]  # clip_size 128, delta 472
    assert [c.tolist() for c in k400_test_indices(300, 16, 4, 2, fps=0.0)] == [
        c.tolist() for c in k400_test_indices(300, 16, 4, 2)]
    sampling = ClipSampling("k400", 16, 4)
    assert (sampling.min_frames(), sampling.min_frames(25.0), sampling.min_frames(60.0)) == (64, 53, 128)
    assert ClipSampling("k400", 1, 4).min_frames() == 1  # one frame, the start: never padded


def test_k400_short_video_is_padded_with_its_last_frame():
    # 10 frames, 4x4: clip_size 16, delta 0; linspace(0, 15, 4) = 0, 5, 10, 15 -> 10 and 15 clamp to 9.
    assert [c.tolist() for c in k400_test_indices(10, 4, 4, 2)] == [[0, 5, 9, 9], [0, 5, 9, 9]]
    rng = np.random.default_rng(0)
    assert k400_train_indices(10, 4, 4, rng).tolist() == [0, 5, 9, 9]


def test_k400_train_start_is_uniform_over_the_whole_range():
    # 20 frames, 4x4: clip_size 16, delta 4; the start is a real number in [0, 4] and
    # the first index its floor, so 0..3 come up equally often (4 only at start == 4).
    rng = np.random.default_rng(0)
    starts = [k400_train_indices(20, 4, 4, rng)[0] for _ in range(2000)]
    counts = np.bincount(starts)
    assert len(counts) == 4 and counts.min() > 400


@given(st.integers(1, 400), st.integers(1, 40), st.integers(1, 8), st.sampled_from([24.0, 25.0, 30.0, 60.0]),
       st.integers(0, 2**31))
def test_k400_train_clip_spans_its_clip_size(num_frames, samples, rate, fps, seed):
    idx = k400_train_indices(num_frames, samples, rate, np.random.default_rng(seed), fps)
    assert len(idx) == samples and idx.min() >= 0 and idx.max() <= num_frames - 1
    assert np.all(np.diff(idx) >= 0)
    clip_size = max(1.0, samples * rate * fps / 30)
    if num_frames >= clip_size and samples > 1:  # nothing clamped: spans clip_size - 1, both ends floored
        assert clip_size - 2 < idx[-1] - idx[0] < clip_size + 1e-4
    if samples > 1 and clip_size >= samples:  # frames (clip_size - 1) / (samples - 1) apart, floored
        step = (clip_size - 1) / (samples - 1)
        assert np.all(np.abs(np.diff(idx)[idx[1:] < num_frames - 1] - step) < 1 + 1e-4)


def test_ssv2_positions_by_hand():
    # 50 frames, 8 segments: size 49/8 = 6.125, bounds round(6.125 k) = 0 6 12 18 24 31 37 43 49
    # (round half to even: 30.625 -> 31, 18.375 -> 18).
    bounds = [0, 6, 12, 18, 24, 31, 37, 43, 49]
    mids = [(a + b) // 2 for a, b in zip(bounds, bounds[1:])]
    assert ssv2_indices(50, 8, None).tolist() == mids == [3, 9, 15, 21, 27, 34, 40, 46]
    rng = np.random.default_rng(1)
    draws = np.stack([ssv2_indices(50, 8, rng) for _ in range(500)])
    assert draws.min(0).tolist() == bounds[:-1] and draws.max(0).tolist() == bounds[1:]


def test_ssv2_fewer_frames_than_segments_repeats_frames():
    # size 2/8: bounds round(0.25 k) = 0 0 0 1 1 1 2 2 2 (0.5 -> 0, 1.5 -> 2).
    assert ssv2_indices(3, 8, None).tolist() == [0, 0, 0, 1, 1, 1, 2, 2]


def test_clip_sampling_dispatch():
    rng = np.random.default_rng(0)
    test = ClipSampling("k400", 16, 4, num_clips=5).indices(300, train=False, rng=rng)
    assert [c[0] for c in test] == [0, 59, 118, 177, 236]
    assert ClipSampling("k400", 16, 4, num_clips=5).indices(250, train=False, rng=rng, fps=25.0)[1][0] == 49
    assert len(ClipSampling("k400", 16, 4, num_clips=5).indices(300, train=True, rng=rng)) == 1
    assert ClipSampling("ssv2", 8).indices(50, train=False, rng=rng)[0].tolist() == [
        3,
        9,
        15,
        21,
        27,
        34,
        40,
        46,
    ]
    assert ClipSampling("k400", 16, 4).min_frames() == 64 and ClipSampling("ssv2", 16).min_frames(25.0) == 16
    with pytest.raises(ValueError, match="unknown sampling protocol"):
        ClipSampling("ucf")
