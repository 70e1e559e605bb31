"""The CPU backend: a torch Dataset that decodes with PyAV and augments with torch.

One item is one list entry decoded once and expanded into views:
train -> `augment.repeats` independently augmented views of the same frames;
test -> `num_clips` temporal clips x `num_crops` spatial crops. Items collate into
``(clips (N, 3, T, H, W) float32, labels (N,), video_index (N,), issues)``.
"""

from __future__ import annotations

import os

import numpy as np
import torch

from .lists import VideoRecord, resolve_video_path
from .report import DataError, Issue
from .sampling import ClipSampling
from .transforms import (
    TestAugment,
    TrainAugment,
    check_augment,
    draw_train_view,
    normalize,
    short_side_resize,
    spatial_crops,
    train_view,
)


class BadVideo(Exception):
    """A video that cannot give a clip; `kind` says why (see report.IssueKind)."""

    def __init__(self, path: str, kind: str, detail: str):
        super().__init__(f"{path}: {kind}: {detail}")
        self.path, self.kind, self.detail = path, kind, detail


def train_views(frames: torch.Tensor, augment: TrainAugment, rng: np.random.Generator) -> torch.Tensor:
    """(T, C, H, W) float frames -> (repeats, C, T, crop, crop) independently augmented views."""
    height, width = frames.shape[-2:]
    draws = [draw_train_view(height, width, augment, rng) for _ in range(augment.repeats)]
    return torch.stack([train_view(frames, draw, augment) for draw in draws])


def test_views(frames: torch.Tensor, augment: TestAugment) -> torch.Tensor:
    """(T, C, H, W) float frames -> (num_crops, C, T, crop, crop)."""
    resized = short_side_resize(frames, augment.short_side)
    crops = spatial_crops(resized, augment.crop_size, augment.num_crops)
    return torch.stack([normalize(c, augment.mean, augment.std) for c in crops])


class VideoDataset(torch.utils.data.Dataset):
    """PyAV decoding + torch transforms for one list; see the module docstring for items.

    Randomness comes from ``(seed, epoch, index, attempt)``, so an epoch is reproducible
    whatever the worker count. A bad video is replaced by a random other entry (up to
    `max_retries` times); if more than `max_fail_fraction` of this worker's reads fail
    (after at least 8 failures) it raises `DataError` instead of silently training on the rest.
    """

    def __init__(
        self,
        records: list[VideoRecord],
        *,
        train: bool,
        sampling: ClipSampling,
        augment: TrainAugment | TestAugment,
        seed: int = 0,
        max_retries: int = 10,
        max_fail_fraction: float = 0.5,
    ):
        check_augment(train, augment)
        self.records, self.train, self.sampling, self.augment = records, train, sampling, augment
        self.seed, self.epoch = seed, 0
        self.max_retries, self.max_fail_fraction = max_retries, max_fail_fraction
        self._reads = self._failures = 0  # per worker process

    def __len__(self) -> int:
        return len(self.records)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def rng(self, index: int, attempt: int = 0) -> np.random.Generator:
        return np.random.default_rng([self.seed, self.epoch, index, attempt])

    def load(self, record: VideoRecord, rng: np.random.Generator) -> tuple[torch.Tensor, list[Issue]]:
        """Decode and augment one record -> (views (V, C, T, H, W), padding issues). Raises BadVideo."""
        from .video_io import NoFrames, decode_frames, import_av, probe

        av = import_av()
        path = resolve_video_path(record.path)
        if not os.path.exists(path):
            raise BadVideo(record.path, "missing", "no such file")
        try:
            # Sample over the frames the file holds, counted, as the DALI backend does: the
            # list's count may be of another copy, a truncated file's header overstates it.
            info = probe(path, count_packets=True)
            num_frames = info.num_frames
            if num_frames <= 0:
                raise BadVideo(path, "zero_frames", "the container has no video frames")
            clips = self.sampling.indices(num_frames, train=self.train, rng=rng, fps=info.fps)
            frames, decoded, decode_error = decode_frames(path, np.concatenate(clips))
        except NoFrames as e:
            raise BadVideo(path, "zero_frames", str(e)) from e
        except (av.error.FFmpegError, OSError, ValueError, IndexError) as e:
            raise BadVideo(path, "undecodable", f"{type(e).__name__}: {e}") from e
        issues = []
        if num_frames < (min_frames := self.sampling.min_frames(info.fps)):
            issues.append(Issue(path, "too_short", f"{num_frames} < {min_frames} frames"))
        needed = int(max(c.max() for c in clips)) + 1
        if shortfall := info.shortfall(record.num_frames):
            issues.append(Issue(path, "truncated", shortfall))
        elif decoded < needed:  # data that stops decoding before the frames the file holds
            stopped_by = f"; decoding stopped at {decode_error}" if decode_error else ""
            issues.append(Issue(path, "truncated", f"decoded {decoded} of {num_frames} frames{stopped_by}"))
        video = torch.from_numpy(frames).permute(0, 3, 1, 2).float()  # (T_all, C, H, W)
        per_clip = np.cumsum([len(c) for c in clips])[:-1]
        parts = torch.tensor_split(video, per_clip.tolist())
        if self.train:
            return train_views(parts[0], self.augment, rng), issues
        return torch.cat([test_views(p, self.augment) for p in parts]), issues

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, int, list[Issue]]:
        issues: list[Issue] = []
        asked = index
        for attempt in range(self.max_retries + 1):
            record = self.records[index]
            rng = self.rng(index, attempt)
            self._reads += 1
            try:
                views, padded = self.load(record, rng)
                # a test stand-in is marked, not scored (see loader.py's contract)
                return views, record.label, index if self.train or index == asked else -1, issues + padded
            except BadVideo as bad:
                issues.append(Issue(bad.path, bad.kind, bad.detail))
                self._failures += 1
                if self._failures >= 8 and self._failures > self.max_fail_fraction * self._reads:
                    raise DataError(
                        f"{self._failures} of {self._reads} video reads failed in one loader worker "
                        f"(latest: {bad}). Is the list's --root right? "
                        "Run `python -m mvit_fast.data scan LIST --root DIR` to list every bad file."
                    ) from bad
                index = int(rng.integers(len(self.records)))  # replace with another sample
        raise DataError(f"{self.max_retries + 1} reads in a row failed, the last: {issues[-1]}")


def collate(items: list) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[Issue]]:
    """Flatten each item's views into the batch: (N, C, T, H, W), labels (N,), video_index (N,), issues."""
    clips = torch.cat([views for views, *_ in items])
    counts = torch.tensor([len(views) for views, *_ in items])
    labels = torch.repeat_interleave(torch.tensor([label for _, label, _, _ in items]), counts)
    index = torch.repeat_interleave(torch.tensor([i for _, _, i, _ in items]), counts)
    return clips, labels, index, [issue for *_, issues in items for issue in issues]
