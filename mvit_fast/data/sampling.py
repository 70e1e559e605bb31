"""Which frames to decode: one pure function per protocol, shared by every backend.

Each function returns int64 frame indices into the video's decoded frames, already
clamped to ``[0, num_frames - 1]``: a video shorter than the clip repeats its last
frame, as SlowFast pads short clips.

- K400 (SlowFast's `decoder.decode` with `use_offset`, MViTv2's setting): a clip spans
  ``clip_size = num_samples * rate * fps / 30`` frames of the file (`rate` counts frames
  at 30 fps, so a 25 fps video's clip covers the same seconds) and its `num_samples`
  frames are spread evenly from its first to its last frame, ``linspace(start, start +
  clip_size - 1, num_samples)`` floored (16x4 at 30 fps: every 63 / 15 = 4.2 frames, not
  every 4). With ``delta = max(num_frames - clip_size, 0)``, train starts uniformly at random
  in ``[0, delta]``; test clip k of n starts at ``k * floor(delta / (n - 1))``, a single
  clip at ``floor(delta / 2)``.
- SSv2: SlowFast's `get_seq_frames`: segment i spans ``round(s*i) .. round(s*(i+1))`` with
  ``s = (num_frames - 1) / num_segments``; train takes a random frame in it (both ends
  included), test its midpoint ``(start + end) // 2``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

Protocol = Literal["k400", "ssv2"]
TARGET_FPS = 30.0  # the frame rate `rate` is counted at (SlowFast's DATA.TARGET_FPS)


def _clamp(indices: np.ndarray, num_frames: int) -> np.ndarray:
    return np.clip(indices, 0, max(num_frames - 1, 0)).astype(np.int64)


def k400_clip_size(num_samples: int, rate: int, fps: float = TARGET_FPS) -> float:
    """Frames of a `fps` video one K400 clip spans (fractional; an unknown fps, <= 0, is
    taken as 30)."""
    fps = fps if fps > 0 else TARGET_FPS
    return max(1.0, num_samples * rate * fps / TARGET_FPS)


def _spread(start: float, clip_size: float, num_samples: int, num_frames: int) -> np.ndarray:
    # torch's float32 linspace, then clamp and truncate, as SlowFast's temporal_sampling:
    # float64 would land a hair on the other side of an integer at some positions.
    index = torch.linspace(start, start + clip_size - 1, num_samples)
    return index.clamp(0, max(num_frames - 1, 0)).long().numpy()


def k400_train_indices(num_frames: int, num_samples: int, rate: int, rng: np.random.Generator,
                       fps: float = TARGET_FPS) -> np.ndarray:
    """One training clip of `num_samples` frames from a uniformly random start."""
    clip_size = k400_clip_size(num_samples, rate, fps)
    start = rng.uniform(0, max(num_frames - clip_size, 0))
    return _spread(start, clip_size, num_samples, num_frames)


def k400_test_indices(num_frames: int, num_samples: int, rate: int, num_clips: int,
                      fps: float = TARGET_FPS) -> list[np.ndarray]:
    """`num_clips` clips at SlowFast's offset positions (test/val protocol)."""
    clip_size = k400_clip_size(num_samples, rate, fps)
    delta = max(num_frames - clip_size, 0)
    if num_clips == 1:
        starts = [math.floor(delta / 2)]
    else:
        starts = [k * math.floor(delta / (num_clips - 1)) for k in range(num_clips)]
    return [_spread(s, clip_size, num_samples, num_frames) for s in starts]


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

    `num_samples` frames per clip; `rate` sets the K400 clip's span, `num_samples * rate`
    frames at 30 fps (unused by SSv2);
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

    def min_frames(self, fps: float = TARGET_FPS) -> int:
        """Fewest frames a `fps` video needs so that no index is clamped (shorter ones are padded)."""
        if self.protocol == "ssv2":
            return self.num_samples
        if self.num_samples == 1:  # its one frame is the start: never past the end
            return 1
        return math.floor(k400_clip_size(self.num_samples, self.rate, fps) - 1) + 1

    def indices(self, num_frames: int, *, train: bool, rng: np.random.Generator,
                fps: float = TARGET_FPS) -> list[np.ndarray]:
        """Frame indices per temporal clip of a `num_frames`, `fps` video: one clip when
        training, `num_clips` when testing (`fps` matters to K400 only)."""
        if self.protocol == "ssv2":
            if train:
                return [ssv2_indices(num_frames, self.num_samples, rng)]
            return [ssv2_indices(num_frames, self.num_samples, None)] * self.num_clips
        if train:
            return [k400_train_indices(num_frames, self.num_samples, self.rate, rng, fps)]
        return k400_test_indices(num_frames, self.num_samples, self.rate, self.num_clips, fps)
