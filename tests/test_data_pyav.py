"""The PyAV backend end to end on videos that carry their frame index and id in the pixels."""

import multiprocessing
import os
import signal
import time

import numpy as np
import pytest
import torch

from mvit_fast.data import (
    ClipSampling,
    DataError,
    TestAugment,
    TrainAugment,
    VideoRecord,
    build_loader,
    choose_backend,
    shard_indices,
)
from tests.test_data_videos import av, make_list, read_codes, unnormalize, write_test_video

PLAIN_TRAIN = TrainAugment(
    crop_size=48, scale=(1, 1), ratio=(4 / 3, 4 / 3), flip=False, rand_augment=False, erase_prob=0, repeats=2
)


def decode_views(batch):
    """(frame indices, video ids) per view of a batch."""
    codes = [read_codes(unnormalize(clip)) for clip in batch.clips]
    return [c[0].tolist() for c in codes], [int(c[1][0]) for c in codes]


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    return make_list(tmp_path_factory.mktemp("videos"), [32] * 6)


def test_test_protocol_frames_labels_and_order(videos):
    loader = build_loader(
        videos,
        train=False,
        batch_size=4,
        backend="pyav",
        num_workers=0,
        sampling=ClipSampling("k400", 4, 4, num_clips=3),
        augment=TestAugment(48, 48, 1),
    )
    batches = list(loader)
    assert len(loader) == len(batches) == 2
    views = sum(len(b.labels) for b in batches)
    assert views == 6 * 3
    for batch in batches:
        frames, ids = decode_views(batch)
        assert batch.clips.shape[1:] == (3, 4, 48, 48) and batch.clips.dtype == torch.float32
        # clip_size 16, delta 16: clips start at 0, 8, 16, frames 15 / 3 = 5 apart; clip-major per video.
        assert frames == [[0, 5, 10, 15], [8, 13, 18, 23], [16, 21, 26, 31]] * (len(ids) // 3)
        assert ids == batch.video_index.tolist()
        assert batch.labels.tolist() == [videos[v].label for v in ids]
    assert loader.report.summary() == "6 samples, no bad videos"


def test_train_frames_repeated_views_and_determinism(videos):
    def epoch(seed):
        loader = build_loader(
            videos,
            train=True,
            batch_size=2,
            backend="pyav",
            num_workers=0,
            seed=seed,
            sampling=ClipSampling("k400", 4, 4),
            augment=PLAIN_TRAIN,
        )
        return [decode_views(b) + (b.labels.tolist(),) for b in loader]

    first = epoch(0)
    assert len(first) == 3  # 6 videos / batch 2
    for frames, ids, labels in first:
        assert len(frames) == 4 and ids[0::2] == ids[1::2]  # repeats: two views of each video, adjacent
        assert frames[0::2] == frames[1::2]  # ... of the same decoded frames
        for f in frames:
            assert f[0] in range(0, 17) and np.diff(f).tolist() == [5, 5, 5]
        assert labels == [videos[v].label for v in ids]
    assert epoch(0) == first and epoch(1) != first
    assert sorted(v for _, ids, _ in first for v in ids[0::2]) == list(range(6))


def test_repeated_views_are_augmented_independently(videos):
    aug = TrainAugment(crop_size=32, repeats=2, rand_augment=True, erase_prob=0.25)
    loader = build_loader(
        videos[:2],
        train=True,
        batch_size=2,
        backend="pyav",
        num_workers=0,
        sampling=ClipSampling("k400", 4, 4),
        augment=aug,
    )
    batch = next(iter(loader))
    assert batch.clips.shape == (4, 3, 4, 32, 32)
    assert not torch.allclose(batch.clips[0], batch.clips[1])


def test_flip_reverses_the_blue_ramp(videos):
    aug = TrainAugment(
        crop_size=48,
        scale=(1, 1),
        ratio=(4 / 3, 4 / 3),
        flip=True,
        rand_augment=False,
        erase_prob=0,
        repeats=4,
    )
    loader = build_loader(
        videos,
        train=True,
        batch_size=6,
        backend="pyav",
        num_workers=0,
        sampling=ClipSampling("k400", 2, 4),
        augment=aug,
    )
    slopes = [
        np.sign(unnormalize(c)[0, 24, -4:, 2].mean() - unnormalize(c)[0, 24, :4, 2].mean())
        for c in next(iter(loader)).clips
    ]
    assert set(slopes) == {-1.0, 1.0}


def test_ssv2_test_midpoints_and_three_crops(tmp_path):
    records = make_list(tmp_path, [30])
    loader = build_loader(
        records,
        train=False,
        batch_size=1,
        backend="pyav",
        num_workers=0,
        sampling=ClipSampling("ssv2", 4),
        augment=TestAugment(24, 24, 3),
    )
    batch = next(iter(loader))
    # 30 frames, 4 segments: size 29/4, bounds 0 7 14 22 29 -> midpoints 3 10 18 25.
    frames, _ = decode_views(batch)
    assert frames == [[3, 10, 18, 25]] * 3
    ramp = [unnormalize(c)[0, 12, :, 2].mean() for c in batch.clips]  # blue ramp: left < center < right
    assert ramp[0] < ramp[1] < ramp[2]


def test_shards_are_disjoint_and_complete():
    for n, world in [(10, 3), (12, 4), (2, 3)]:
        test = [shard_indices(n, r, world, shuffle=False, seed=0, epoch=0) for r in range(world)]
        assert sorted(sum(test, [])) == list(range(n))
        train = [shard_indices(n, r, world, shuffle=True, seed=0, epoch=1) for r in range(world)]
        assert len({len(s) for s in train}) == 1 and set(sum(train, [])) == set(range(n))
        assert len(sum(train, [])) - n == -n % world  # only DistributedSampler's padding repeats
    assert shard_indices(10, 0, 2, shuffle=True, seed=0, epoch=0) != shard_indices(
        10, 0, 2, shuffle=True, seed=0, epoch=1
    )
    with pytest.raises(ValueError, match="outside world_size"):
        shard_indices(10, 2, 2, shuffle=False, seed=0, epoch=0)


def test_loader_shards_cover_the_list_once(videos):
    seen = []
    for rank in range(4):
        loader = build_loader(
            videos,
            train=False,
            batch_size=2,
            backend="pyav",
            num_workers=0,
            rank=rank,
            world_size=4,
            sampling=ClipSampling("k400", 2, 2),
            augment=TestAugment(48, 48, 1),
        )
        seen += [int(i) for b in loader for i in b.video_index]
    assert sorted(seen) == list(range(6))


def bad_videos(folder):
    """Good videos 0-3 and one of each bad kind."""
    records = make_list(folder, [32] * 4)
    write_test_video(folder / "short.mp4", 5, 4)
    write_test_video(folder / "cut.mp4", 32, 5)  # mp4s are written index-first (faststart)
    with av.open(str(folder / "cut.mp4")) as container:  # cut where packet 16 starts
        cut = [p.pos for p in container.demux(container.streams.video[0]) if p.size][16]
    (folder / "cut.mp4").write_bytes((folder / "cut.mp4").read_bytes()[:cut])
    (folder / "garbage.mp4").write_bytes(b"\x00not a video" * 100)
    write_test_video(folder / "empty.mp4", 8, 7)
    data = (folder / "empty.mp4").read_bytes()
    (folder / "empty.mp4").write_bytes(data[: data.index(b"mdat") + 4])  # the index, then no frame data
    write_test_video(folder / "liar.mp4", 20, 6)
    return records + [
        VideoRecord(str(folder / "short.mp4"), 4),
        VideoRecord(str(folder / "cut.mp4"), 0),
        VideoRecord(str(folder / "garbage.mp4"), 1),
        VideoRecord(str(folder / "empty.mp4"), 2),
        VideoRecord(str(folder / "gone.mp4"), 3),
        VideoRecord(str(folder / "liar.mp4"), 1, 32),
    ]


def test_bad_videos_are_replaced_or_padded_and_reported(tmp_path, caplog):
    records = bad_videos(tmp_path)
    loader = build_loader(
        records,
        train=False,
        batch_size=5,
        backend="pyav",
        num_workers=2,
        sampling=ClipSampling("k400", 4, 4),
        augment=TestAugment(48, 48, 1),
    )
    batches = list(loader)
    report = loader.report
    assert report.samples == len(records) == sum(len(b.labels) for b in batches)
    assert report.counts["missing"] == 1 and report.paths["missing"] == {str(tmp_path / "gone.mp4")}
    assert report.paths["undecodable"] == {str(tmp_path / "garbage.mp4")}
    assert report.paths["zero_frames"] == {str(tmp_path / "empty.mp4")}
    assert report.paths["too_short"] == {str(tmp_path / "short.mp4")}
    assert report.paths["truncated"] == {str(tmp_path / "cut.mp4"), str(tmp_path / "liar.mp4")}
    assert report.replaced >= 3 and "gone.mp4" in caplog.text
    index = torch.cat([b.video_index for b in batches]).tolist()
    # a test pass marks the stand-ins for the 3 unreadable videos -1 (not to be scored); every
    # readable video is delivered once, under its own index
    assert index.count(-1) == 3 and sorted(i for i in index if i >= 0) == [0, 1, 2, 3, 4, 5, 9]
    for batch in batches:  # stand-ins carry their own label, so labels still match the pixels
        frames, ids = decode_views(batch)
        assert batch.labels.tolist() == [records[v].label for v in ids]
        for f, v, i in zip(frames, ids, batch.video_index.tolist()):
            if v < 4:
                assert v == i or i == -1
            if v == 4:  # 5 frames, 4x4: centre clip 0 5 10 15 -> padded to the last frame
                assert f == [0, 4, 4, 4]
            if v == 5:  # cut: the header claims 32 frames, 16 are there; the centre clip of those 16
                assert f == [0, 5, 10, 15]
            if v == 6:  # the list claims 32 frames, the file has 20: the centre clip of the 20 (as DALI)
                assert f == [2, 7, 12, 17]


def test_workers_outlive_a_stop_signal_to_the_process_group(videos):
    """Slurm and `kill -TERM -PGID` signal the workers too: they must leave the stop to the
    main process (the trainer saves, then exits), not die under the batches it still reads."""
    loader = build_loader(videos, train=False, batch_size=2, backend="pyav", num_workers=1,
                          sampling=ClipSampling("k400", 4, 4, num_clips=1), augment=TestAugment(48, 48, 1))
    batches = iter(loader)
    first = next(batches)
    (worker,) = multiprocessing.active_children()
    for signum in (signal.SIGTERM, signal.SIGINT):
        os.kill(worker.pid, signum)
    time.sleep(0.5)  # a killed worker is reported at the next batch
    rest = list(batches)
    assert len(first.labels) + sum(len(b.labels) for b in rest) == len(videos)


def test_mostly_missing_list_raises_a_clear_error(tmp_path):
    records = make_list(tmp_path, [8]) + [VideoRecord(str(tmp_path / f"no{i}.mp4"), 0) for i in range(30)]
    loader = build_loader(
        records,
        train=True,
        batch_size=4,
        backend="pyav",
        num_workers=0,
        sampling=ClipSampling("k400", 2, 2),
        augment=PLAIN_TRAIN,
    )
    with pytest.raises(DataError, match="reads failed.*scan"):
        list(loader)


def test_a_pass_stopped_early_is_closed_by_end_epoch(tmp_path, caplog):
    records = [VideoRecord(str(tmp_path / "gone.mp4"), 0)] + make_list(tmp_path, [8, 8, 8])
    loader = build_loader(records, train=False, batch_size=2, backend="pyav", num_workers=0,
                          sampling=ClipSampling("k400", 2, 2), augment=TestAugment(48, 48, 1))
    next(iter(loader))  # the missing file's batch, then the consumer stops
    assert loader.epoch == 0 and "epoch data report" not in caplog.text
    report = loader.end_epoch()
    assert report.samples == 2 and [(i.kind, i.path, i.detail) for i in report.issues] == [
        ("missing", str(tmp_path / "gone.mp4"), "no such file")]
    assert loader.epoch == 1 and caplog.text.count("epoch data report (rank 0): 2 samples; replaced 1") == 1
    assert loader.end_epoch() is report and caplog.text.count("epoch data report") == 1  # closed once
    assert len(list(loader)) == 2 and loader.epoch == 2  # a full pass closes itself


def test_auto_backend_decodes_with_dali_only_for_batches_on_a_gpu(monkeypatch):
    import importlib.util

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *args: object())  # DALI "installed"
    assert choose_backend("auto") == choose_backend("auto", "cuda:0") == "dali"
    # a CPU run on a GPU machine: DALI's CPU decoder cannot read H.264, PyAV can
    assert choose_backend("auto", "cpu") == choose_backend("auto", torch.device("cpu")) == "pyav"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert choose_backend("auto") == choose_backend("auto", "cuda") == "pyav"
    assert choose_backend("dali", "cpu") == "dali"  # asked for by name: DALI's CPU pipeline


def test_bad_loader_arguments_fail_before_any_decoding():
    """Checked when the loader is built, each naming the argument, not at the first batch."""
    records = [VideoRecord("a.mp4", 0)]
    cases = [
        (dict(batch_size=0), ValueError, "batch_size must be an integer >= 1, got 0"),
        (dict(batch_size=2.0), ValueError, "batch_size must be an integer >= 1, got 2.0"),
        (dict(num_workers=-1), ValueError, "num_workers must be an integer >= 0, got -1"),
        (dict(rank=1), ValueError, r"give rank and world_size together \(got rank=1, world_size=None\)"),
        (dict(rank=2, world_size=2), ValueError, "rank 2 is outside world_size 2"),
        (dict(augment=TestAugment()), TypeError, "train=True needs a TrainAugment"),
        (dict(backend="pyav", device="cuda"), ValueError, "device='cuda', but CUDA is not available"),
        (dict(backend="dali"), ValueError, "backend='dali' decodes on the GPU by default, but CUDA"),
    ]
    if torch.cuda.is_available():
        cases = cases[:-2]
    for kwargs, error, message in [*cases, (dict(records=[]), ValueError, "no records")]:
        source = kwargs.pop("records", records)
        with pytest.raises(error, match=message):
            build_loader(source, **{"train": True, "batch_size": 1, "backend": "pyav", **kwargs})


@pytest.mark.parametrize(
    "augment,message",
    [
        (lambda: TrainAugment(crop_size=0), "crop_size must be an integer >= 1, got 0"),
        (lambda: TrainAugment(crop_size=True), "crop_size must be an integer >= 1, got True"),
        (lambda: TrainAugment(repeats=0), "repeats must be an integer >= 1"),
        (lambda: TrainAugment(scale=(1.0, 0.08)), r"scale must be an area fraction range"),
        (lambda: TrainAugment(ratio=(0, 1)), "ratio must be an aspect range"),
        (lambda: TrainAugment(erase_prob=2), r"erase_prob must be in \[0, 1\]"),
        (lambda: TrainAugment(std=(0.2, 0.2, 0.0)), "std must be positive"),
        (lambda: TestAugment(short_side=0), "short_side must be an integer >= 1"),
        (lambda: TestAugment(short_side=200, crop_size=224), "short_side 200 is smaller than crop_size 224"),
        (lambda: TestAugment(mean=(0.5,) * 4), "one value per RGB channel"),
        (lambda: TestAugment(num_crops="3"), "num_crops must be 1 or 3, got '3'"),
    ],
)
def test_bad_augment_settings_are_refused(augment, message):
    with pytest.raises(ValueError, match=message):
        augment()
