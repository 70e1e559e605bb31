"""Pre-flight scan of a list: which files exist, decode, are long enough, and suit DALI.

``python -m mvit_fast.data scan LIST --root DIR [--min-frames 64] [--workers N] [--decode-all]``

Per file: open the container, count packets (demux only, no decode), decode the first
frame, or with ``--decode-all`` every frame (slower: it finds data corrupted mid-stream,
which the loaders would meet only when a clip lands there). Status is the first problem
found: missing, undecodable, zero_frames, truncated (fewer packets than the container
header promises), corrupt (a frame fails to decode; ``--decode-all`` only), too_short
(< min_frames), else ok.
Also tallied: codecs, and variable-frame-rate files and codecs the DALI GPU decoder
does not take (it rejects both). Prints the counts and a fingerprint (files, missing,
frames, codecs and a hash of the list text: the same whatever the flags), writes bad paths,
those two kinds included, to ``--bad-out`` (default ``LIST.bad.txt``),
and with ``--frames-out`` a ``path num_frames label`` list of the good files, which spares
the loaders probing every file for its length.
"""

from __future__ import annotations

import hashlib
import os
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from .lists import VideoRecord, read_list, resolve_video_path, write_list

DALI_GPU_CODECS = {"h264", "hevc", "vp8", "vp9", "av1", "mpeg4", "mjpeg"}


@dataclass(frozen=True)
class FileCheck:
    path: str
    status: str  # ok, missing, undecodable, zero_frames, truncated, corrupt, too_short
    codec: str = ""
    num_frames: int = 0
    variable_frame_rate: bool = False
    detail: str = ""


def check_file(path: str, min_frames: int = 1, decode_all: bool = False) -> FileCheck:
    """Check one video file (see the module docstring)."""
    from .video_io import import_av

    av = import_av()
    path = resolve_video_path(path)
    if not os.path.exists(path):
        return FileCheck(path, "missing")
    try:
        with av.open(path) as container:  # decode the first (or every) frame...
            if not container.streams.video:
                return FileCheck(path, "undecodable", detail="no video stream")
            stream = container.streams.video[0]
            promised, codec = stream.frames, stream.codec_context.name
            decoded, decode_error = 0, ""
            try:
                for _ in container.decode(stream):
                    decoded += 1
                    if not decode_all:
                        break
            except av.error.FFmpegError as e:
                decode_error = str(e)  # none decoded: zero_frames below, if the file opened
        with av.open(path) as container:  # ...and count packets, a fresh demuxer for each
            pts, truncated_by, discarded = [], "", 0
            try:
                for packet in container.demux(container.streams.video[0]):
                    if packet.size and packet.pts is not None:
                        if packet.is_discard:  # an edit list's pre-roll: no frame (as video_io.probe)
                            discarded += 1
                        else:
                            pts.append(packet.pts)
            except av.error.FFmpegError as e:
                truncated_by = str(e)
            promised = 0 if discarded else promised  # the header counts the pre-roll too
    except (av.error.FFmpegError, OSError, ValueError) as e:
        return FileCheck(path, "undecodable", detail=f"{type(e).__name__}: {e}")
    steps = sorted({b - a for a, b in zip(sorted(pts), sorted(pts)[1:])})
    vfr = bool(steps) and steps[-1] - steps[0] > 1
    n = len(pts)
    common = dict(codec=codec, num_frames=n, variable_frame_rate=vfr)
    if n == 0 or decoded == 0:
        return FileCheck(path, "zero_frames", **common)
    if truncated_by or 0 < n < promised:
        return FileCheck(path, "truncated", **common, detail=truncated_by or f"{n} of {promised} frames")
    if decode_error:
        return FileCheck(path, "corrupt", **common, detail=f"{decoded} of {n} frames decoded: {decode_error}")
    if n < min_frames:
        return FileCheck(path, "too_short", **common, detail=f"{n} < {min_frames} frames")
    return FileCheck(path, "ok", **common)


@dataclass
class ScanResult:
    checks: list[FileCheck]
    list_hash: str
    status: Counter = field(default_factory=Counter)
    codecs: Counter = field(default_factory=Counter)
    variable_frame_rate: int = 0
    dali_unsupported: int = 0

    def __post_init__(self):
        for c in self.checks:
            self.status[c.status] += 1
            if c.codec:
                self.codecs[c.codec] += 1
            self.variable_frame_rate += c.variable_frame_rate
            self.dali_unsupported += bool(c.codec) and c.codec not in DALI_GPU_CODECS

    @property
    def fingerprint(self) -> str:
        """What tells two copies of a dataset apart, the same whatever the scan's flags: files
        found and missing, frames in all, codecs, and the list text's hash."""
        frames = sum(c.num_frames for c in self.checks)
        codecs = ",".join(f"{k}={v}" for k, v in sorted(self.codecs.items()))
        return (f"{len(self.checks)} files, {self.status['missing']} missing, {frames} frames "
                f"[{codecs}] list-sha256:{self.list_hash[:16]}")

    @property
    def bad(self) -> list[tuple[str, FileCheck]]:
        """(label, check) of every file a loader cannot take as it is: status not ok, or one
        the DALI GPU decoder rejects (variable frame rate: +vfr; its codec: +no-dali)."""
        out = []
        for c in self.checks:
            label = c.status + ("+vfr" if c.variable_frame_rate else "")
            if c.codec and c.codec not in DALI_GPU_CODECS:
                label += f"+no-dali({c.codec})"
            if label != "ok":
                out.append((label, c))
        return out

    def summary(self) -> str:
        found = len(self.checks) - self.status["missing"]
        lines = [
            f"files: {len(self.checks)}  found: {found}  missing: {self.status['missing']}",
            "status: " + ", ".join(f"{k} {v}" for k, v in sorted(self.status.items())),
            "codecs: " + ", ".join(f"{k} {v}" for k, v in self.codecs.most_common()),
            f"variable frame rate: {self.variable_frame_rate}  "
            f"codec not decodable by DALI's GPU decoder: {self.dali_unsupported}",
            f"fingerprint: {self.fingerprint}",
        ]
        return "\n".join(lines)


def scan(
    records: list[VideoRecord],
    *,
    list_text: str,
    min_frames: int = 1,
    workers: int = 1,
    decode_all: bool = False,
    progress: bool = False,
) -> ScanResult:
    """Check every record's file (in `workers` processes), in list order."""
    from tqdm import tqdm

    paths = [r.path for r in records]
    bar = dict(total=len(paths), desc="scan", unit="file", disable=not progress, dynamic_ncols=True)
    if workers > 1:
        with ProcessPoolExecutor(workers) as pool:
            same = [min_frames] * len(paths), [decode_all] * len(paths)
            checks = list(tqdm(pool.map(check_file, paths, *same, chunksize=16), **bar))
    else:
        checks = [check_file(p, min_frames, decode_all) for p in tqdm(paths, **bar)]
    return ScanResult(checks, hashlib.sha256(list_text.encode()).hexdigest())


def main(
    list_path: str,
    *,
    root: str = "",
    min_frames: int = 1,
    workers: int = 1,
    decode_all: bool = False,
    bad_out: str | None = None,
    frames_out: str | None = None,
) -> ScanResult:
    """Scan, print the summary, write the bad-path and (optional) frame-count lists."""
    records = read_list(list_path, root=root)
    result = scan(records, list_text=Path(list_path).read_text(), min_frames=min_frames, workers=workers,
                  decode_all=decode_all, progress=True)
    print(result.summary())
    bad_out = bad_out or f"{list_path}.bad.txt"
    bad = result.bad
    Path(bad_out).write_text("".join(f"{label} {c.path}\n" for label, c in bad))
    print(f"{len(bad)} bad paths -> {bad_out}")
    if frames_out:
        good = [
            VideoRecord(c.path, r.label, c.num_frames)
            for r, c in zip(records, result.checks)
            if c.status in ("ok", "too_short")
        ]
        write_list(frames_out, good, root=root)
        print(f"{len(good)} good files with frame counts -> {frames_out}")
    return result
