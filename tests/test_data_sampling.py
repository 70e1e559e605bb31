"""Sampling protocols against hand-computed frame positions."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from mvit_fast.data.sampling import ClipSampling, k400_test_indices, k400_train_indices, ssv2_indices


def test_k400_test_positions_by_hand():
    # 300 frames, 16x4: span 64, delta 236; 5 clips start at k * floor(236 / 4) = k * 59.
    clips = k400_test_indices(300, 16, 4, 5)
    assert [c[0] for c in clips] == [0, 59, 118, 177, 236]
    assert clips[4].tolist() == list(range(236, 300, 4))
    # One clip: the centre, floor(delta / 2).
    assert k400_test_indices(300, 16, 4, 1)[0][0] == 118
    # 32x3 on 250 frames: span 96, delta 154, 3 clips at k * 77.
    assert [c[0] for c in k400_test_indices(250, 32, 3, 3)] == [0, 77, 154]


def test_k400_short_video_is_padded_with_its_last_frame():
    # 10 frames, 4x4: delta 0; indices 0, 4, 8, 12 -> 12 clamps to 9.
    assert [c.tolist() for c in k400_test_indices(10, 4, 4, 2)] == [[0, 4, 8, 9], [0, 4, 8, 9]]
    rng = np.random.default_rng(0)
    assert k400_train_indices(10, 4, 4, rng).tolist() == [0, 4, 8, 9]


def test_k400_train_covers_every_start_uniformly():
    rng = np.random.default_rng(0)
    starts = [k400_train_indices(20, 4, 4, rng)[0] for _ in range(2000)]  # delta 4: starts 0..4
    counts = np.bincount(starts)
    assert len(counts) == 5 and counts.min() > 300


@given(st.integers(1, 400), st.integers(1, 40), st.integers(1, 8), st.integers(0, 2**31))
def test_k400_train_indices_stride_and_range(num_frames, samples, rate, seed):
    idx = k400_train_indices(num_frames, samples, rate, np.random.default_rng(seed))
    assert len(idx) == samples and idx.min() >= 0 and idx.max() <= num_frames - 1
    unclamped = idx < num_frames - 1
    assert np.all(np.diff(idx)[unclamped[1:]] == rate)


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
    assert ClipSampling("k400", 16, 4).min_frames == 61 and ClipSampling("ssv2", 16).min_frames == 16
    with pytest.raises(ValueError, match="unknown sampling protocol"):
        ClipSampling("ucf")
