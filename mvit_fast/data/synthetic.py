"""A built-in synthetic video dataset whose classes differ only in motion.

Each clip shows a disc shaded from a light to a dark colour across its diameter on a
random smooth background. The class is how the disc moves: left, right, up, down
(wrapping around the frame edges), or rotating clockwise / counter-clockwise in place. Start position,
rotation, speed and appearance are random and the motion wraps around, so every frame
taken alone has the same distribution in every class: only motion carries the label.

Clips are real video files (H.264 .mp4 or VP9 .webm, through PyAV), so the whole
decode path is exercised. Generation is deterministic from `seed`, idempotent (valid
files are kept), atomic (temp file + rename) and shows a tqdm bar.

Layout under the cache folder (``$MVIT_FAST_CACHE`` or ``~/.cache/mvit_fast``, then
``synthetic/<settings>``): ``train/*.mp4``, ``val/*.mp4``, ``train.csv`` and ``val.csv``
(``path label``, paths relative to the folder), ``train_frames.txt`` and
``val_frames.txt`` (``video_id num_frames label``) and ``classes.txt``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..checkpoint import atomic_write
from .lists import VideoRecord, write_list
from .transforms import check_int

# Part of the cache folder's name: bump it whenever `render_clip` changes its output.
GENERATOR_VERSION = 4
CLASSES = ("move_left", "move_right", "move_up", "move_down", "rotate_cw", "rotate_ccw")
_DIRECTIONS = {"move_left": (-1, 0), "move_right": (1, 0), "move_up": (0, -1), "move_down": (0, 1)}


def default_cache_dir() -> Path:
    return Path(os.environ.get("MVIT_FAST_CACHE", Path.home() / ".cache" / "mvit_fast")) / "synthetic"


def _smooth_field(rng: np.random.Generator, y: np.ndarray, x: np.ndarray, waves: int = 4) -> np.ndarray:
    """A random smooth pattern in [0, 1] (a sum of low-frequency plane waves)."""
    field = np.zeros(np.broadcast_shapes(y.shape, x.shape))
    for _ in range(waves):
        fy, fx = rng.uniform(-3, 3, size=2)
        field += np.cos(2 * np.pi * (fy * y + fx * x) + rng.uniform(0, 2 * np.pi))
    return (field / waves + 1) / 2


def render_clip(motion: str, num_frames: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """uint8 (num_frames, size, size, 3) frames of one clip of class `motion`."""
    if motion not in CLASSES:
        raise ValueError(f"unknown motion {motion!r}; choose from {CLASSES}")
    grid = np.arange(size) / size
    background = np.stack([_smooth_field(rng, grid[:, None], grid[None, :]) for _ in range(3)], -1)
    background = 255 * (0.2 + 0.6 * background)
    # Two colours of clearly different brightness (one light, one dark, in random order):
    # a low-contrast disc would hide its rotation, and only then, making those clips unlearnable.
    light, dark = rng.uniform(150, 255, size=3), rng.uniform(0, 100, size=3)
    colors = np.stack((light, dark) if rng.random() < 0.5 else (dark, light))
    radius = rng.uniform(0.2, 0.3) * size
    center = rng.uniform(0, size, size=2)  # (x, y), uniform: position says nothing about the class
    angle0 = rng.uniform(0, 2 * np.pi)
    speed = rng.uniform(0.8, 1.6)  # pixels per frame
    # Radians per frame. The texture is one angular period (light on one side, dark on the
    # other), so it looks the same only after 2*pi: a sampled step (spin * frames apart) below
    # pi keeps cw and ccw apart. The quickstart's 8x4 clips take frames 31 / 7 = 4.4 apart:
    # steps of 0.7-1.3 rad, the rim moving 4-13 pixels per sampled frame at 32x32, about as
    # far as the translations go.
    spin = rng.uniform(0.15, 0.3)
    step = np.array(_DIRECTIONS.get(motion, (0, 0)), dtype=float) * speed
    turn = {"rotate_cw": spin, "rotate_ccw": -spin}.get(motion, 0.0)  # y points down: +angle turns clockwise

    ys, xs = np.mgrid[0:size, 0:size].astype(float)
    frames = np.empty((num_frames, size, size, 3), dtype=np.uint8)
    for t in range(num_frames):
        cx, cy = center + t * step
        dx = (xs - cx + size / 2) % size - size / 2  # wrap around the frame edges
        dy = (ys - cy + size / 2) % size - size / 2
        r, theta = np.hypot(dx, dy), np.arctan2(dy, dx) - angle0 - t * turn
        pattern = (np.cos(theta) + 1) / 2
        alpha = np.clip(radius - r, 0, 1)[..., None]  # 1-pixel soft edge
        disc = pattern[..., None] * colors[0] + (1 - pattern[..., None]) * colors[1]
        frames[t] = np.clip(alpha * disc + (1 - alpha) * background, 0, 255).astype(np.uint8)
    return frames


@dataclass(frozen=True)
class SyntheticDataset:
    """Where a generated synthetic dataset lives."""

    root: Path
    train_list: Path  # path label
    val_list: Path  # path label
    train_frames_list: Path  # video_id num_frames label
    val_frames_list: Path
    label_map: Path
    num_classes: int = len(CLASSES)


def _is_valid(path: Path, num_frames: int) -> bool:
    from .video_io import probe

    try:
        return probe(str(path)).num_frames == num_frames
    except Exception:
        return False


def make_synthetic(
    root: str | os.PathLike | None = None,
    *,
    num_train: int = 240,
    num_val: int = 60,
    num_frames: int = 48,
    size: int = 64,
    fps: int = 30,
    codec: str = "h264",
    seed: int = 0,
    progress: bool = True,
) -> SyntheticDataset:
    """Generate (or find) the synthetic dataset and return its paths.

    Labels are balanced (clip i has class i % 6). With `root` None the folder is
    ``default_cache_dir() / <settings>``, so different settings never collide.
    """
    from tqdm import tqdm

    from .video_io import write_video

    for name, value, least in (("num_train", num_train, 1), ("num_val", num_val, 1),
                               ("num_frames", num_frames, 2), ("size", size, 16), ("fps", fps, 1)):
        check_int(name, value, least)  # motion needs 2 frames; a disc needs pixels
    if size % 2:
        raise ValueError(f"size must be even (yuv420p), got {size}")
    suffix = {"h264": ".mp4", "vp9": ".webm"}.get(codec)
    if suffix is None:
        raise ValueError(f"unknown codec {codec!r}; use 'h264' or 'vp9'")
    name = f"v{GENERATOR_VERSION}_{codec}_s{size}_f{num_frames}_n{num_train}-{num_val}_fps{fps}_seed{seed}"
    root = Path(root) if root is not None else default_cache_dir() / name
    if root.exists() and not root.is_dir():
        raise ValueError(f"the synthetic dataset's folder {root} is a file")
    jobs = []
    for split_id, (split, count) in enumerate((("train", num_train), ("val", num_val))):
        (root / split).mkdir(parents=True, exist_ok=True)
        records = [
            VideoRecord(str(root / split / f"{i:06d}{suffix}"), i % len(CLASSES), num_frames)
            for i in range(count)
        ]
        jobs += [(split_id, i, r) for i, r in enumerate(records)]
        write_list(root / f"{split}.csv", [VideoRecord(r.path, r.label) for r in records], root=root)
        ids = [VideoRecord(r.path[: -len(suffix)], r.label, r.num_frames) for r in records]
        write_list(root / f"{split}_frames.txt", ids, root=root)
    atomic_write(root / "classes.txt", lambda f: f.write(("\n".join(CLASSES) + "\n").encode()))

    todo = [job for job in jobs if not _is_valid(Path(job[2].path), num_frames)]
    for split_id, i, record in tqdm(
        todo, desc=f"synthetic clips -> {root}", disable=not progress or not todo
    ):
        rng = np.random.default_rng([seed, split_id, i])
        write_video(
            record.path, render_clip(CLASSES[record.label], num_frames, size, rng), fps=fps, codec=codec
        )
    return SyntheticDataset(
        root,
        root / "train.csv",
        root / "val.csv",
        root / "train_frames.txt",
        root / "val_frames.txt",
        root / "classes.txt",
    )
