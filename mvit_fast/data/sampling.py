"""Which frames to decode: one pure numpy function per protocol, shared by every backend.

Each function returns int64 frame indices into the video's decoded frames, already
clamped to ``[0, num_frames - 1]``: a video shorter than the clip repeats its last
frame, as SlowFast pads short clips. Frame indices count decoded frames at the file's
own frame rate (no resampling to 30 fps).

- K400 train: `num_samples` frames every `rate` from a random start in
  ``[0, max(num_frames - num_samples * rate, 0)]``.
- K400 test: clip k of n starts at ``k * floor(delta / (n - 1))`` with
  ``delta = max(num_frames - num_samples * rate, 0)``; one clip starts at ``floor(delta / 2)``
  (SlowFast's `get_start_end_idx` with `use_offset`; the clip span is num_samples * rate).
- SSv2: SlowFast's `get_seq_frames`: segment i spans ``round(s*i) .. round(s*(i+1))`` with
  ``s = (num_frames - 1) / num_segments``; train takes a random frame in it (both ends
  included), test its midpoint ``(start + end) // 2``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

Protocol = Literal["k400", "ssv2"]


def _clamp(indices: np.ndarray, num_frames: int) -> np.ndarray:
    return np.clip(indices, 0, max(num_frames - 1, 0)).astype(np.int64)


def k400_train_indices(num_frames: int, num_samples: int, rate: int, rng: np.random.Generator) -> np.ndarray:
    """`num_samples` frames every `rate` frames from a uniformly random start."""
    delta = max(num_frames - num_samples * rate, 0)
    start = int(rng.integers(0, delta + 1))
    return _clamp(start + rate * np.arange(num_samples), num_frames)


def k400_test_indices(num_frames: int, num_samples: int, rate: int, num_clips: int) -> list[np.ndarray]:
    """`num_clips` clips at SlowFast's offset positions (test/val protocol)."""
    delta = max(num_frames - num_samples * rate, 0)
    if num_clips == 1:
        starts = [delta // 2]
    else:
        starts = [k * (delta // (num_clips - 1)) for k in range(num_clips)]
    return [_clamp(s + rate * np.arange(num_samples), num_frames) for s in starts]


def ssv2_indices(num_frames: int, num_segments: int, rng: np.random.Generator | None) -> np.ndarray:
    """Uniform segment sampling: a random frame per segment (`rng` given) or its midpoint (None)."""
    size = (max(num_frames, 1) - 1) / num_segments
    bounds = np.round(size * np.arange(num_segments + 1)).astype(np.int64)  # round half to even, as SlowFast
    starts, ends = bounds[:-1], bounds[1:]
    if rng is None:
        return _clamp((starts + ends) // 2, num_frames)
    return _clamp(rng.integers(starts, ends + 1), num_frames)


@dataclass(frozen=True)
class ClipSampling:
    """A sampling protocol and its sizes.

    `num_samples` frames per clip; `rate` is the K400 stride (unused by SSv2);
    `num_clips` temporal clips per video at test time (K400: 5 in SlowFast's
    multi-view test; SSv2: 1).
    """

    protocol: Protocol = "k400"
    num_samples: int = 16
    rate: int = 4
    num_clips: int = 1

    def __post_init__(self):
        if self.protocol not in ("k400", "ssv2"):
            raise ValueError(f"unknown sampling protocol {self.protocol!r}; use 'k400' or 'ssv2'")
        if min(self.num_samples, self.rate, self.num_clips) < 1:
            raise ValueError(f"num_samples, rate and num_clips must be >= 1, got {self}")

    @property
    def min_frames(self) -> int:
        """Fewest frames a video needs so that no index is clamped (shorter ones are padded)."""
        return (self.num_samples - 1) * self.rate + 1 if self.protocol == "k400" else self.num_samples

    def indices(self, num_frames: int, *, train: bool, rng: np.random.Generator) -> list[np.ndarray]:
        """Frame indices per temporal clip: one clip when training, `num_clips` when testing."""
        if self.protocol == "ssv2":
            if train:
                return [ssv2_indices(num_frames, self.num_samples, rng)]
            return [ssv2_indices(num_frames, self.num_samples, None)] * self.num_clips
        if train:
            return [k400_train_indices(num_frames, self.num_samples, self.rate, rng)]
        return k400_test_indices(num_frames, self.num_samples, self.rate, self.num_clips)
