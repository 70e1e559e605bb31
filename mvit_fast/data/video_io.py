"""Video files through PyAV (the `video` extra): probe, decode chosen frames, encode.

PyAV bundles FFmpeg with H.264/VP9 decoders and the libx264/libvpx-vp9 encoders, so
this module is the CPU backend's decoder, the synthetic data's encoder and the scan's
prober. It is imported lazily: `import mvit_fast` works without PyAV.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np


class NoFrames(ValueError):
    """The file opened but not one frame decoded."""


def import_av():
    try:
        import av
    except ImportError as e:
        raise ImportError("reading or writing video files needs PyAV: pip install 'mvit-fast[video]'") from e
    av.logging.set_level(av.logging.PANIC)  # damaged files are counted and reported by us, not spammed
    return av


@dataclass(frozen=True)
class VideoInfo:
    """What a file's container says about its first video stream."""

    num_frames: int  # from container metadata, else counted packets (those that decode to a frame)
    fps: float
    codec: str
    width: int
    height: int
    variable_frame_rate: bool  # packet durations differ (only known when packets were counted)
    header_frames: int = 0  # the container header's frame count (0: it claims nothing: webm, edit lists)

    def shortfall(self, listed: int | None = None) -> str | None:
        """"N of M frames" when the list entry or the header claims M frames, more than the N
        this file holds (a truncated or lying file: padded, reported); None otherwise."""
        claimed = max(listed or 0, self.header_frames)
        return f"{self.num_frames} of {claimed} frames" if claimed > self.num_frames else None


def probe(path: str, *, count_packets: bool = False) -> VideoInfo:
    """Read stream metadata; count packets when the container gives no frame count
    (webm) or when `count_packets` (also detects variable frame rate). Raises on
    unreadable files (`FileNotFoundError`, `av.error.FFmpegError`, `ValueError`)."""
    av = import_av()
    with av.open(path) as container:
        if not container.streams.video:
            raise ValueError(f"{path}: no video stream")
        stream = container.streams.video[0]
        num_frames, header_frames, vfr = stream.frames, max(stream.frames, 0), False
        if count_packets or num_frames <= 0:
            # Discard-flagged packets (an MP4 edit list's pre-roll, as a cut at a non-key frame
            # leaves) decode to no output frame; the header counts them, so with an edit list
            # it claims nothing we can hold the file to.
            packets = [p for p in container.demux(stream) if p.size and p.pts is not None]
            pts = [p.pts for p in packets if not p.is_discard]
            header_frames = header_frames if len(pts) == len(packets) else 0
            num_frames = len(pts)
            steps = np.diff(np.sort(np.asarray(pts, dtype=np.int64)))
            vfr = bool(steps.size and steps.max() - steps.min() > 1)  # 1 tick of rounding allowed
        rate = stream.average_rate or stream.guessed_rate
        return VideoInfo(
            num_frames,
            float(rate) if rate else 0.0,
            stream.codec_context.name,
            stream.codec_context.width,
            stream.codec_context.height,
            vfr,
            header_frames,
        )


def decode_frames(path: str, indices: np.ndarray) -> tuple[np.ndarray, int, str | None]:
    """Decode the frames at `indices` (any order, repeats allowed) as uint8 (T, H, W, 3) RGB.

    Decodes sequentially from the start up to the largest index (K400-length clips are
    short; exact frame counting beats timestamp seeking on damaged files). An index past
    the last decodable frame gets the last decoded frame, as SlowFast pads. Returns the
    frames, the number of frames actually decoded (< max index + 1 means truncated) and
    the decoder error that stopped it early, if one did (data corrupted mid-stream, not a
    file that simply ends). Raises `NoFrames` when no frame decodes.
    """
    av = import_av()
    wanted = set(int(i) for i in indices)
    last_wanted = max(wanted)
    got: dict[int, np.ndarray] = {}
    decoded, last_frame, error = 0, None, None
    with av.open(path) as container:
        stream = container.streams.video[0]
        try:
            for frame in container.decode(stream):
                if decoded in wanted:
                    got[decoded] = frame.to_ndarray(format="rgb24")
                last_frame = frame
                decoded += 1
                if decoded > last_wanted:
                    break
        except av.error.FFmpegError as e:  # a damaged tail: keep what decoded, the caller reports it
            error = f"{type(e).__name__}: {e}"
    if last_frame is None:
        raise NoFrames(f"{path}: no decodable frame")
    if decoded <= last_wanted:
        last = got.get(decoded - 1)
        if last is None:
            last = last_frame.to_ndarray(format="rgb24")
        for i in wanted:
            if i >= decoded:
                got[i] = last
    return np.stack([got[int(i)] for i in indices]), decoded, error


def write_video(path: str | os.PathLike, frames: np.ndarray, *, fps: int = 30, codec: str = "h264") -> None:
    """Encode uint8 (T, H, W, 3) RGB frames: codec "h264" (libx264, .mp4) or "vp9"
    (libvpx-vp9, .webm). Written to a temporary name and renamed, so a crash never
    leaves a half-written file under `path`."""
    av = import_av()
    encoder = {"h264": "libx264", "vp9": "libvpx-vp9"}.get(codec)
    if encoder is None:
        raise ValueError(f"unknown codec {codec!r}; use 'h264' or 'vp9'")
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp{path.suffix}")  # same suffix: picks the container
    options = (
        {"crf": "18", "preset": "veryfast", "g": "16"}
        if codec == "h264"
        else {"deadline": "realtime", "cpu-used": "8", "crf": "20", "b": "0", "g": "16"}
    )
    try:
        # faststart: the index goes first, so a file cut short still opens (and shows as truncated).
        container_options = {"movflags": "faststart"} if path.suffix == ".mp4" else {}
        with av.open(str(tmp), "w", options=container_options) as container:
            stream = container.add_stream(encoder, rate=fps, options=options)
            stream.width, stream.height = frames.shape[2], frames.shape[1]
            stream.pix_fmt = "yuv420p"
            for image in frames:
                container.mux(
                    stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(image), format="rgb24"))
                )
            container.mux(stream.encode(None))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
