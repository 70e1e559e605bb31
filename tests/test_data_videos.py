"""Test videos written with PyAV at test time, with the frame index and a video id in the pixels.

Frame i of video v: red = 8 * i + 4 (i < 32), green = 16 * v + 8 (v < 16), both flat over the
frame; blue is a left-to-right ramp, so flips and horizontal crops are visible. Flat
blocks survive lossy H.264/VP9 coding to within a few levels, far less than the steps.
Helpers here are shared by the other tests/test_data_*.py files.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from mvit_fast.data.lists import VideoRecord

av = pytest.importorskip("av", reason="PyAV (the `video` extra) writes and reads the test videos")

from mvit_fast.data.video_io import decode_frames, probe, write_video  # noqa: E402

MAX_FRAMES = 32


def make_frames(num_frames: int, video_id: int = 0, height: int = 48, width: int = 64) -> np.ndarray:
    if num_frames > MAX_FRAMES or video_id >= 16:
        raise ValueError("the pixel code holds frame < 32 and video id < 16")
    frames = np.empty((num_frames, height, width, 3), dtype=np.uint8)
    frames[..., 0] = (8 * np.arange(num_frames) + 4)[:, None, None]
    frames[..., 1] = 16 * video_id + 8
    frames[..., 2] = np.linspace(16, 240, width).astype(np.uint8)
    return frames


def write_test_video(path, num_frames: int, video_id: int = 0, *, codec: str | None = None, **size) -> str:
    codec = codec or ("vp9" if str(path).endswith(".webm") else "h264")
    write_video(path, make_frames(num_frames, video_id, **size), codec=codec)
    return str(path)


def read_codes(clip: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(frame index, video id) per frame of uint8-range RGB frames (T, H, W, 3) or (T, 3, H, W)."""
    clip = np.asarray(clip, dtype=np.float64)
    if clip.shape[-1] != 3:
        clip = np.moveaxis(clip, 1, -1)
    h, w = clip.shape[1:3]
    patch = clip[:, h // 4 : 3 * h // 4, w // 4 : 3 * w // 4].mean(axis=(1, 2))
    return np.round((patch[:, 0] - 4) / 8).astype(int), np.round((patch[:, 1] - 8) / 16).astype(int)


def unnormalize(clip, mean=(0.45,) * 3, std=(0.225,) * 3) -> np.ndarray:
    """Loader output (C, T, H, W) -> (T, H, W, C) in [0, 255]."""
    x = np.asarray(clip, dtype=np.float64).transpose(1, 2, 3, 0)
    return (x * np.array(std) + np.array(mean)) * 255


def corrupt_frame(path, out, frame: int) -> str:
    """A copy of video `path` at `out` whose `frame`-th packet starts with 4 flipped bytes: the
    container and the packet count are intact, the decoder fails from that frame on."""
    with av.open(str(path)) as container:
        payload = [bytes(p) for p in container.demux(container.streams.video[0]) if p.size][frame]
    data = bytearray(Path(path).read_bytes())
    at = data.index(payload)
    data[at : at + 4] = bytes(b ^ 0xFF for b in data[at : at + 4])
    Path(out).write_bytes(data)
    return str(out)


def make_list(folder, counts: list[int], suffix: str = ".mp4") -> list[VideoRecord]:
    """Videos 0..n-1 with the given frame counts; label of video v is (v * 7) % 5."""
    return [
        VideoRecord(write_test_video(folder / f"v{v}{suffix}", n, v), (v * 7) % 5)
        for v, n in enumerate(counts)
    ]


@pytest.mark.parametrize("suffix,codec", [(".mp4", "h264"), (".webm", "vp9")])
def test_pixel_code_survives_coding(tmp_path, suffix, codec):
    path = write_test_video(tmp_path / f"a{suffix}", 32, 5)
    info = probe(path, count_packets=True)
    assert (info.num_frames, info.codec, info.width, info.height) == (32, codec, 64, 48)
    assert not info.variable_frame_rate
    frames, decoded, error = decode_frames(path, np.array([31, 0, 7, 7]))
    assert decoded == 32 and error is None
    index, vid = read_codes(frames)
    assert index.tolist() == [31, 0, 7, 7] and vid.tolist() == [5] * 4
    error = np.abs(frames.astype(int) - make_frames(32, 5)[[31, 0, 7, 7]].astype(int))
    assert np.percentile(error[..., :2], 99) <= 6  # colour conversion of the blue ramp bleeds a little


def test_decode_pads_past_the_end_with_the_last_frame(tmp_path):
    path = write_test_video(tmp_path / "a.mp4", 6)
    frames, decoded, error = decode_frames(path, np.array([4, 9, 5, 6]))
    assert decoded == 6 and error is None  # a file that simply ends is no decoder error
    assert read_codes(frames)[0].tolist() == [4, 5, 5, 5]


def test_decode_names_the_error_that_stopped_it(tmp_path):
    path = corrupt_frame(write_test_video(tmp_path / "a.webm", 32), tmp_path / "corrupt.webm", frame=16)
    frames, decoded, error = decode_frames(path, np.array([3, 30]))
    assert 3 < decoded < 31 and error is not None and "Error" in error
    assert read_codes(frames)[0].tolist()[0] == 3


def cut_without_reencoding(source, out, frames: int = 5) -> str:
    """A copy of MP4 `source` starting `frames` frames in, as a cut without re-encoding makes
    it: the packets before the cut kept (from the keyframe), flagged discard by an edit list."""
    with av.open(str(source)) as src, av.open(str(out), "w") as dst:
        stream = src.streams.video[0]
        copy = dst.add_stream_from_template(stream)
        shift = int(frames / float(stream.average_rate) / stream.time_base)
        for packet in src.demux(stream):
            if packet.dts is not None:
                packet.pts, packet.dts, packet.stream = packet.pts - shift, packet.dts - shift, copy
                dst.mux(packet)
    return str(out)


def test_an_edit_list_preroll_is_not_counted_as_frames(tmp_path):
    # the pre-roll decodes to no frame, and the file is not truncated
    cut = cut_without_reencoding(write_test_video(tmp_path / "a.mp4", 31), tmp_path / "cut.mp4")
    with av.open(cut) as container:
        discarded = sum(p.is_discard for p in container.demux(video=0) if p.size)
    with av.open(cut) as container:
        shown = sum(1 for _ in container.decode(video=0))
    info = probe(cut, count_packets=True)
    assert discarded > 0 and info.num_frames == shown and info.shortfall() is None
    frames, decoded, error = decode_frames(cut, np.arange(shown))
    assert decoded == shown and error is None
    assert read_codes(frames)[0].tolist() == list(range(31 - shown, 31))


def test_write_is_atomic_and_rejects_unknown_codecs(tmp_path):
    with pytest.raises(ValueError, match="unknown codec"):
        write_video(tmp_path / "a.mp4", make_frames(2), codec="mpeg2")
    assert list(tmp_path.iterdir()) == []
