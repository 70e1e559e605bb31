"""The DALI backend against the PyAV one.

DALI's CPU pipeline on VP9 everywhere; its GPU decoder on H.264 where CUDA is.
"""

import dataclasses
import time

import numpy as np
import pytest
import torch

from mvit_fast.data import ClipSampling, DataError, TestAugment, TrainAugment, VideoRecord, build_loader
from mvit_fast.data.randaugment import OPS, SIGNED, RandOp, apply_op
from mvit_fast.data.transforms import ViewDraw
from mvit_fast.data.video_io import write_video
from tests.test_data_pyav import PLAIN_TRAIN, decode_views
from tests.test_data_videos import corrupt_frame, make_frames, make_list

pytest.importorskip("nvidia.dali", reason="NVIDIA DALI is not installed (pip install 'mvit-fast[dali]')")

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]


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
        frames, _ = decode_views(batch)  # 2 clips of 16 over 32 frames: starts 0 and 32 - 16 = 16
        assert frames == [[0, 5, 10, 15], [16, 21, 26, 31]] * 2
        assert [(i.kind, i.path, i.detail) for i in loader.report.issues] == [
            ("truncated", webm_videos[1].path, "32 of 40 frames")]


def test_both_backends_span_the_same_seconds_at_any_frame_rate(tmp_path):
    # 4x4 counts frames at 30 fps: 16 frames' time; at 60 fps the clip spans 32 frames
    path = str(tmp_path / "fast.webm")
    write_video(path, make_frames(32), fps=60, codec="vp9")
    kw = dict(train=False, batch_size=1, sampling=ClipSampling("k400", 4, 4, num_clips=2),
              augment=TestAugment(48, 48, 1))
    for placement in (dict(backend="dali", device="cpu", num_workers=1), dict(backend="pyav", num_workers=0)):
        loader = build_loader([VideoRecord(path, 0)], **placement, **kw)
        (batch,) = list(loader)
        assert decode_views(batch)[0] == [[0, 10, 20, 31]] * 2, placement["backend"]  # delta 0
        assert loader.report.issues == []


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


def _train_batches(records, device, augment, backend="dali", start_batch=0, **kw):
    placement = dict(device=device, num_workers=2) if backend == "dali" else dict(num_workers=0)
    loader = build_loader(records, backend=backend, train=True, batch_size=2, augment=augment, seed=3,
                          sampling=ClipSampling("k400", 4, 4), **placement, **kw)
    loader.set_epoch(1, start_batch=start_batch)
    return [batch.clips.cpu() for batch in loader]


@pytest.mark.parametrize("device", DEVICES)
def test_train_views_crop_flip_and_erase_as_pyav_does(webm_videos, device):
    # random resized crops, flips and erased boxes: the same draws in both backends
    augment = TrainAugment(crop_size=32, repeats=2, rand_augment=False, erase_prob=0.5)
    dali = torch.cat(_train_batches(webm_videos, device, augment))
    pyav = torch.cat(_train_batches(webm_videos, device, augment, backend="pyav"))
    levels = ((dali - pyav).abs() * 0.225 * 255).flatten(1)  # per view, in levels of 255
    assert levels.mean(1).max() < 2 and levels.quantile(0.99, dim=1).max() < 6, levels.mean(1)


def _blocks(shape: tuple[int, ...], block: int, seed: int = 0) -> np.ndarray:
    """uint8 frames of random `block`-pixel squares: any shift of them shows."""
    t, h, w, c = shape
    cells = np.random.default_rng(seed).integers(0, 256, (t, -(-h // block), -(-w // block), c))
    return np.kron(cells, np.ones((1, block, block, 1)))[:, :h, :w].astype(np.uint8)


def _graph_view(frames: np.ndarray, draw: ViewDraw, augment: TrainAugment) -> torch.Tensor:
    """`train_views_graph`'s view of uint8 (T, H, W, C) `frames` for `draw`, on DALI's CPU,
    in levels of 255, (C, T, H, W)."""
    import nvidia.dali as dali
    from nvidia.dali import fn, types

    from mvit_fast.data.dali_augment import train_draw_inputs, train_views_graph

    raw = dict(mean=[0.0] * 3, std=[1.0] * 3, output_layout="CFHW")

    @dali.pipeline_def(enable_conditionals=augment.rand_augment, batch_size=1, num_threads=1, device_id=None,
                       prefetch_queue_depth=1, exec_dynamic=True)
    def pipeline():
        clip = fn.external_source(name="clip", dtype=types.UINT8, ndim=4, layout="FHWC")
        return tuple(train_views_graph(clip, augment, raw))

    pipe = pipeline()
    pipe.build()
    pipe.feed_input("clip", [frames])
    for key, value in train_draw_inputs([draw], augment).items():
        pipe.feed_input(key, [value])
    return torch.from_numpy(np.asarray(pipe.run()[0].as_tensor())[0])


def _torch_view(frames: np.ndarray, draw: ViewDraw, augment: TrainAugment) -> torch.Tensor:
    """`transforms.train_view` (the PyAV backend's) of the same, in the same units and layout."""
    from mvit_fast.data.transforms import train_view

    levels = dataclasses.replace(augment, mean=(0.0,) * 3, std=(1 / 255,) * 3)
    return train_view(torch.from_numpy(frames).permute(0, 3, 1, 2).float(), draw, levels)


@pytest.mark.parametrize("name", ["ShearX", "TranslateXRel", "Rotate"])
def test_flipped_views_are_flipped_after_rand_augment_in_both_backends(name):
    # these ops are not mirror-symmetric: flip then shear is another view than shear then flip;
    # both backends flip last, as SlowFast (RandAugment before its crop and flip)
    frames = _blocks((2, 48, 48, 3), 8)
    augment = TrainAugment(crop_size=48, repeats=1, erase_prob=0.0)
    views = {}
    for flip in (False, True):
        draw = ViewDraw((0, 0, 48, 48), flip, (RandOp(OPS.index(name), 0.7, 1),), None)
        dali_view, pyav_view = _graph_view(frames, draw, augment), _torch_view(frames, draw, augment)
        inner = (slice(None), slice(None), slice(4, -4), slice(4, -4))  # the warps' borders differ
        views[flip] = (dali_view[inner], pyav_view[inner])
        assert (dali_view - pyav_view)[inner].abs().mean() < 3, (name, flip)
    # SlowFast's order: the flipped view is the unflipped one mirrored
    assert torch.equal(views[True][1], views[False][1].flip(-1))
    assert (views[True][0] - views[False][0].flip(-1)).abs().mean() < 1


@pytest.mark.parametrize("name", ["TranslateXRel", "TranslateYRel", "Rotate"])
def test_rand_augment_runs_on_the_whole_frame_before_the_crop_in_both_backends(name):
    # SlowFast's order: translations are fractions of the frame's sides and rotations turn
    # about its centre, not the crop's (tests/test_data_transforms.py checks the torch side
    # against shifted pixels); a box off the frame's centre shows the difference
    frames = _blocks((2, 40, 80, 3), 4)
    augment = TrainAugment(crop_size=32, repeats=1, erase_prob=0.0)
    draw = ViewDraw((4, 20, 32, 32), False, (RandOp(OPS.index(name), 0.5, -1),), None)
    inner = (slice(None), slice(None), slice(1, -1), slice(1, -1))  # the warps' borders differ
    difference = (_graph_view(frames, draw, augment) - _torch_view(frames, draw, augment))[inner]
    assert difference.abs().mean() < 3, name


def test_both_backends_shrink_as_slowfasts_interpolate():
    # SlowFast resizes with F.interpolate(bilinear, align_corners=False), no antialiasing: with
    # a 1-pixel stripe every 3rd column shrunk 3x, every sample lands on a stripe (white), where
    # an antialiased shrink averages the stripes into a gray of 255 / 3
    import torch.nn.functional as F

    frames = np.zeros((2, 48, 48, 3), dtype=np.uint8)
    frames[:, :, 1::3] = 255
    clip = torch.from_numpy(frames).permute(0, 3, 1, 2).float()
    want = F.interpolate(clip, size=(16, 16), mode="bilinear", align_corners=False).permute(1, 0, 2, 3)
    assert want.min() == 255
    augment = TrainAugment(crop_size=16, repeats=1, rand_augment=False, erase_prob=0.0)
    draw = ViewDraw((0, 0, 48, 48), False, (), None)
    pyav, dali_view = _torch_view(frames, draw, augment), _graph_view(frames, draw, augment)
    assert (pyav - want).abs().max() < 1e-3 and (dali_view - want).abs().max() < 1.5


@pytest.mark.parametrize("height,width", [(48, 71), (71, 48)])
@pytest.mark.parametrize("num_crops", [1, 3])
def test_test_crops_where_slowfast_puts_them_in_both_backends(tmp_path, height, width, num_crops):
    # an odd margin (23): SlowFast's uniform_crop rounds the centre up, ceil(23 / 2) = 12
    from mvit_fast.data.video_io import decode_frames, write_video

    path = str(tmp_path / "blocks.webm")
    write_video(path, np.repeat(_blocks((1, height, width, 3), 4), 2, 0), codec="vp9")
    frame = decode_frames(path, np.array([0]))[0][0].astype(float)

    def origin(view: np.ndarray) -> tuple[int, int]:  # where in the frame a (48, 48, 3) view was cut
        fits = {(y, x): np.abs(frame[y : y + 48, x : x + 48] - view).mean()
                for y in range(height - 47) for x in range(width - 47)}
        return min(fits, key=fits.get)

    long_side = [(0, 0), (0, 12), (0, 23)] if width > height else [(0, 0), (12, 0), (23, 0)]
    want = long_side if num_crops == 3 else [long_side[1]]
    kw = dict(train=False, batch_size=1, sampling=ClipSampling("k400", 2, 1),
              augment=TestAugment(48, 48, num_crops))
    for placement in (dict(backend="dali", device="cpu", num_workers=1), dict(backend="pyav", num_workers=0)):
        (batch,) = list(build_loader([VideoRecord(path, 0)], **kw, **placement))
        views = (batch.clips[:, :, 0].permute(0, 2, 3, 1).numpy() * 0.225 + 0.45) * 255
        assert [origin(v) for v in views] == want, placement["backend"]


@pytest.mark.cuda  # on the CPU: tests/test_engine_train.py's stop-and-resume run with DALI
def test_resumed_epoch_gives_the_same_views_on_the_gpu(webm_videos, device="cuda"):
    augment = TrainAugment(crop_size=32, repeats=2, erase_prob=0.5)  # RandAugment on
    full = _train_batches(webm_videos, device, augment)
    assert len(full) == 2 and not torch.equal(full[0][0], full[0][1])  # the repeats differ
    assert all(torch.equal(a, b) for a, b in zip(full[1:], _train_batches(webm_videos, device, augment,
                                                                            start_batch=1)))


@pytest.mark.parametrize("device", DEVICES)
def test_rand_augment_ops_in_dali_are_randaugment_py_ops(device):
    """Each op of the DALI graph against randaugment.py's at level 0.7, both signs, on
    blocky random frames (edges for sharpness, structure for the warps)."""
    import nvidia.dali as dali
    from nvidia.dali import fn, types

    from mvit_fast.data.dali_augment import rand_augment_op, train_draw_inputs

    rng = np.random.default_rng(0)
    blocks = np.repeat(np.repeat(rng.integers(0, 256, (2, 6, 8, 3)), 8, 1), 8, 2)
    frames = np.clip(blocks + rng.integers(-20, 20, blocks.shape), 0, 255).astype(np.uint8)  # (2, 48, 64, 3)
    frames[1] = frames[1] // 2 + 20  # a dimmer frame: per-frame statistics differ from the clip's
    size = frames.shape[1:3]

    @dali.pipeline_def(enable_conditionals=True, batch_size=1, num_threads=1,
                       device_id=None if device == "cpu" else 0, prefetch_queue_depth=1, exec_dynamic=True)
    def pipeline():
        clip = fn.external_source(name="clip", dtype=types.UINT8, ndim=4, layout="FHWC")
        clip = clip if device == "cpu" else clip.gpu()
        op, level_bin, negate = (fn.external_source(name=n, dtype=types.INT32, ndim=0)
                                 for n in ("ra_op", "ra_bin", "ra_negate"))
        return rand_augment_op(clip, op, level_bin, negate, size)

    pipe = pipeline()
    pipe.build()

    def run(op: int, sign: int) -> np.ndarray:
        draw = ViewDraw((0, 0, *size), False, (RandOp(op, 0.7, sign),), None)
        inputs = train_draw_inputs([draw], TrainAugment(rand_augment=True))
        pipe.feed_input("clip", [frames])
        for name in ("ra_op", "ra_bin", "ra_negate"):
            pipe.feed_input(name, [inputs[name][0, 0]])
        (out,) = pipe.run()
        return np.asarray(out.as_cpu().as_tensor() if device != "cpu" else out.as_tensor())[0].astype(float)

    clip = torch.from_numpy(frames).permute(0, 3, 1, 2).float()
    # mean |difference| in levels of 255 inside a 1-pixel border (PIL leaves the border of
    # Sharpness alone): uint8 rounding only, except where the ops differ by design
    # Shear: pixel centres; Equalize: OpenCV's formula (cdf - cdf_min) / (n - cdf_min), not PIL's
    # steps of (n - last count) / 255, each frame's histogram in both (11.2 levels measured)
    bound = dict.fromkeys(OPS, 0.5) | {"ShearX": 3, "ShearY": 3, "Equalize": 12}
    for op, name in enumerate(OPS):
        want = {s: apply_op(name, clip, 0.7, s).permute(0, 2, 3, 1).numpy() for s in (1, -1)}
        for sign in (1, -1):
            got = run(op, sign)
            same = np.abs(got - want[sign])[:, 1:-1, 1:-1].mean()
            assert same <= bound[name], (name, sign, same)
            if name in SIGNED:  # and it moves the same way
                assert np.abs(got - want[-sign])[:, 1:-1, 1:-1].mean() > 10 * same + 5, (name, sign)


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


def _read_ahead_loader(records, read_ahead: int):
    loader = build_loader(records, backend="dali", device="cpu", train=False, batch_size=2, num_workers=1,
                          sampling=ClipSampling("k400", 4, 4), augment=TestAugment(48, 48, 1))
    loader.read_ahead = read_ahead
    return loader


def test_read_ahead_prepares_the_next_batch_during_this_one_and_changes_nothing(webm_videos, tmp_path):
    records = webm_videos + [VideoRecord(str(tmp_path / "gone.webm"), 0)]
    passes = {}
    for read_ahead in (0, 1):
        loader = _read_ahead_loader(records, read_ahead)
        batches = [(decode_views(b), b.labels.tolist(), b.video_index.tolist()) for b in loader]
        passes[read_ahead] = batches, loader.report.summary()
    assert passes[0] == passes[1]
    assert "missing" in passes[1][1] and len(passes[1][0]) == 3

    loader = _read_ahead_loader(webm_videos, 1)
    runs, run = [], loader._run
    loader._run = lambda samples: runs.append(len(samples)) or run(samples)
    batches = iter(loader)
    next(batches)
    deadline = time.monotonic() + 30
    while len(runs) < 2 and time.monotonic() < deadline:  # batch 2 decodes before it is asked for
        time.sleep(0.01)
    assert runs == [2, 2]
    # a consumer that stops early reports only what it took, and the next pass starts afresh
    assert loader.end_epoch().samples == 2 and loader.epoch == 1
    assert sum(len(b.labels) for b in loader) == len(webm_videos)


def test_read_ahead_raises_the_readers_error_at_the_consumer(tmp_path):
    records = [VideoRecord(str(tmp_path / f"gone{i}.webm"), 0) for i in range(20)]
    with pytest.raises(DataError, match="video reads failed"):
        list(_read_ahead_loader(records, 1))


def test_a_few_missing_files_among_many_do_not_stop_the_pass(webm_videos, tmp_path):
    # 9 of 29 reads fail (31% < max_fail_fraction 50%): replaced, reported, no DataError
    records = webm_videos * 4 + [VideoRecord(str(tmp_path / f"gone{i}.webm"), 0) for i in range(9)]
    loader = _read_ahead_loader(records, 1)
    assert sum(len(b.labels) for b in loader) == len(records)
    assert loader.report.counts["missing"] >= 9


def test_reads_failing_in_a_row_raise_data_error_as_pyav_does(tmp_path):
    records = [VideoRecord(str(tmp_path / f"gone{i}.webm"), 0) for i in range(4)]
    for backend in ("dali", "pyav"):
        loader = build_loader(records, backend=backend, device="cpu" if backend == "dali" else None,
                              train=False, batch_size=2, num_workers=0 if backend == "pyav" else 1,
                              sampling=ClipSampling("k400", 4, 4), augment=TestAugment(48, 48, 1),
                              max_fail_fraction=1.0)
        with pytest.raises(DataError, match=r"11 reads in a row failed, the last: Issue\(path='.*gone"):
            list(loader)
