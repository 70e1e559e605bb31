"""The DALI backend against the PyAV one.

DALI's CPU pipeline on VP9 everywhere; its GPU decoder on H.264 where CUDA is.
"""

import dataclasses

import numpy as np
import pytest
import torch

from mvit_fast.data import ClipSampling, TestAugment, TrainAugment, VideoRecord, build_loader
from tests.test_data_pyav import PLAIN_TRAIN, decode_views
from tests.test_data_videos import corrupt_frame, make_list

pytest.importorskip("nvidia.dali", reason="NVIDIA DALI is not installed (pip install 'mvit-fast[dali]')")


@pytest.fixture(scope="module")
def webm_videos(tmp_path_factory):
    return make_list(tmp_path_factory.mktemp("webm"), [32, 32, 20, 32, 32], suffix=".webm")


def both(records, device="cpu", **kw):
    dali = list(build_loader(records, backend="dali", device=device, num_workers=2, **kw))
    pyav = list(build_loader(records, backend="pyav", num_workers=0, **kw))
    return dali, pyav


def test_same_frames_and_pixels_as_pyav_test_protocol(webm_videos):
    dali, pyav = both(
        webm_videos,
        train=False,
        batch_size=2,
        sampling=ClipSampling("k400", 4, 4, num_clips=3),
        augment=TestAugment(48, 48, 3),
    )
    assert len(dali) == len(pyav) == 3
    for d, p in zip(dali, pyav):
        assert d.clips.shape == p.clips.shape and d.clips.dtype == torch.float32
        assert decode_views(d) == decode_views(p)
        assert torch.equal(d.labels, p.labels) and torch.equal(d.video_index, p.video_index)
        # Same decoder family (FFmpeg's VP9), same crops: pixels agree to a few levels of 255.
        assert (d.clips - p.clips).abs().mean() * 0.225 * 255 < 2


def test_both_backends_sample_over_the_frames_a_file_holds_whatever_the_list_says(webm_videos):
    # 32-frame files listed with 16 (another copy's count) and 40 (more than the file holds)
    records = [dataclasses.replace(webm_videos[0], num_frames=16),
               dataclasses.replace(webm_videos[1], num_frames=40)]
    kw = dict(train=False, batch_size=2, sampling=ClipSampling("k400", 4, 4, num_clips=2),
              augment=TestAugment(48, 48, 1))
    loaders = [build_loader(records, backend="dali", device="cpu", num_workers=1, **kw),
               build_loader(records, backend="pyav", num_workers=0, **kw)]
    for loader in loaders:
        (batch,) = list(loader)
        frames, _ = decode_views(batch)  # 2 clips over 32 frames: starts 0 and 32 - 16 = 16
        assert frames == [[0, 4, 8, 12], [16, 20, 24, 28]] * 2
        assert [(i.kind, i.path, i.detail) for i in loader.report.issues] == [
            ("truncated", webm_videos[1].path, "32 of 40 frames")]


def test_same_train_positions_as_pyav(webm_videos):
    dali, pyav = both(
        webm_videos,
        train=True,
        batch_size=2,
        sampling=ClipSampling("k400", 4, 4),
        augment=PLAIN_TRAIN,
        seed=5,
    )
    assert len(dali) == len(pyav) == 2
    for d, p in zip(dali, pyav):
        assert decode_views(d) == decode_views(p) and torch.equal(d.labels, p.labels)
        assert d.clips.shape == (4, 3, 4, 48, 48)


def test_full_train_augmentation_runs(webm_videos):
    loader = build_loader(
        webm_videos,
        backend="dali",
        device="cpu",
        train=True,
        batch_size=2,
        num_workers=2,
        sampling=ClipSampling("k400", 4, 4),
        augment=TrainAugment(crop_size=32, repeats=2),
    )
    batch = next(iter(loader))
    assert batch.clips.shape == (4, 3, 4, 32, 32) and torch.isfinite(batch.clips).all()
    assert not torch.allclose(batch.clips[0], batch.clips[1])  # independent views


def test_bad_files_are_replaced_and_reported(webm_videos, tmp_path):
    (tmp_path / "garbage.webm").write_bytes(b"junk" * 50)
    records = webm_videos + [
        VideoRecord(str(tmp_path / "gone.webm"), 0),
        VideoRecord(str(tmp_path / "garbage.webm"), 1),
    ]
    loader = build_loader(
        records,
        backend="dali",
        device="cpu",
        train=False,
        batch_size=7,
        num_workers=2,
        sampling=ClipSampling("k400", 8, 3),
        augment=TestAugment(48, 48, 1),
    )
    (batch,) = list(loader)
    assert len(batch.labels) == 7
    assert loader.report.paths["missing"] == {str(tmp_path / "gone.webm")}
    assert loader.report.paths["undecodable"] == {str(tmp_path / "garbage.webm")}
    assert loader.report.paths["too_short"] == {webm_videos[2].path}
    frames, ids = decode_views(batch)
    index = batch.video_index.tolist()  # the stand-ins for the two bad files are marked -1
    assert index[:5] == [0, 1, 2, 3, 4] and index[5:] == [-1, -1]
    assert batch.labels.tolist() == [records[v].label for v in ids]  # each stand-in has its own label


def test_a_file_the_decoder_fails_on_is_named_and_replaced(webm_videos, tmp_path, caplog):
    corrupt = corrupt_frame(webm_videos[0].path, tmp_path / "corrupt.webm", frame=16)
    records = webm_videos[3:] + [VideoRecord(corrupt, 4)]  # both good ones have 32 frames
    loader = build_loader(
        records,
        backend="dali",
        device="cpu",
        train=False,
        batch_size=3,
        num_workers=2,
        sampling=ClipSampling("k400", 8, 3, num_clips=2),  # the second clip starts past frame 16
        augment=TestAugment(48, 48, 1),
    )
    (batch,) = list(loader)
    assert loader.report.paths["undecodable"] == {corrupt} and loader.report.samples == 3
    (issue,) = loader.report.issues  # the detail names the decoder's error, for data_issues.csv
    assert (issue.kind, issue.path) == ("undecodable", corrupt) and "DALI decoder: " in issue.detail
    assert f"DALI cannot decode {corrupt} (DALI decoder: " in caplog.text
    index = batch.video_index.tolist()  # two views per video; the third video's stand-in is marked
    assert index == [0, 0, 1, 1, -1, -1]
    _, ids = decode_views(batch)  # every view holds the frames of the video it is labelled with
    assert ids[:4] == [3, 3, 4, 4] and ids[4] == ids[5] in (3, 4)
    assert batch.labels.tolist() == [records[v - 3].label for v in ids]


@pytest.mark.cuda
def test_gpu_decoder_on_h264_matches_pyav(tmp_path):
    records = make_list(tmp_path, [32, 32, 32, 32])
    dali, pyav = both(
        records,
        device="cuda",
        train=False,
        batch_size=2,
        sampling=ClipSampling("k400", 4, 4, num_clips=2),
        augment=TestAugment(48, 48, 3),
    )
    for d, p in zip(dali, pyav):
        assert d.clips.is_cuda and d.clips.dtype == torch.float32
        assert decode_views(d.__class__(*(t.cpu() for t in d))) == decode_views(p)
        assert ((d.clips.cpu() - p.clips).abs().mean() * 0.225 * 255).item() < 3
    train = build_loader(
        records,
        backend="dali",
        device="cuda",
        train=True,
        batch_size=2,
        num_workers=2,
        sampling=ClipSampling("k400", 4, 4),
        augment=TrainAugment(crop_size=32, repeats=2),
    )
    batch = next(iter(train))
    assert (
        batch.clips.is_cuda
        and batch.clips.shape == (4, 3, 4, 32, 32)
        and np.isfinite(batch.clips.sum().item())
    )


@pytest.mark.cuda
def test_gpu_decoder_survives_a_corrupt_h264_file(tmp_path):
    """NVDEC may conceal the damage or fail; either way the epoch is delivered, and a failure
    is reported against the file."""
    records = make_list(tmp_path, [32, 32])
    corrupt = corrupt_frame(records[0].path, tmp_path / "corrupt.mp4", frame=16)
    loader = build_loader(
        [*records, VideoRecord(corrupt, 4)],
        backend="dali",
        device="cuda",
        train=True,
        batch_size=3,
        num_workers=2,
        sampling=ClipSampling("k400", 8, 3),
        augment=PLAIN_TRAIN,
    )
    (batch,) = list(loader)
    assert batch.clips.is_cuda and len(batch.labels) == 3 * PLAIN_TRAIN.repeats
    assert loader.report.samples == 3 and set(loader.report.paths) <= {"undecodable"}
    assert loader.report.paths.get("undecodable", {corrupt}) == {corrupt}
