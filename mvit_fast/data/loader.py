"""`build_loader`: one entry point over the DALI (GPU) and PyAV (CPU) backends.

Output contract, both backends: iterating yields `Batch(clips, labels, video_index)`:

- clips: float32 (N, 3, T, H, W), normalized ``(x / 255 - mean) / std`` with the
  augment's mean/std, RGB. N = batch_size * views: train views = `augment.repeats`
  (repeated augmentation, views of one video are adjacent), test views =
  `sampling.num_clips * augment.num_crops` (clip-major, crop-minor).
- labels: int64 (N,), the list's label of the video each view came from.
- video_index: int64 (N,), that video's position in the list (aggregate test views by it).
  A bad video is replaced by another entry; in a test pass (train=False) the stand-in's
  views carry video_index -1 instead: they keep the batch's shape and are not to be scored.

DALI batches are CUDA tensors; PyAV batches are CPU tensors, moved to `device` when
given. Mixup/CutMix is not part of the loader: apply `MixupCutmix` to the batch on the
device. Bad videos are replaced or padded, never fatal; each epoch's `DataReport` (every
issue with its file and detail) is kept as `loader.report` and logged at the end of the
epoch: after the last batch, or at `loader.end_epoch()` for a consumer that stops before
it; `DataError` is raised then when more than `max_fail_fraction` of the reads failed.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import signal
from collections.abc import Iterator, Sequence
from typing import Literal, NamedTuple

import torch

from .lists import VideoRecord, read_list
from .pyav_dataset import VideoDataset, collate
from .report import DataReport
from .sampling import ClipSampling
from .transforms import TestAugment, TrainAugment, check_augment, check_int
from .video_io import import_av

log = logging.getLogger("mvit_fast.data")
Backend = Literal["auto", "dali", "pyav"]


class Batch(NamedTuple):
    clips: torch.Tensor  # (N, 3, T, H, W) float32, normalized
    labels: torch.Tensor  # (N,) int64
    video_index: torch.Tensor  # (N,) int64, position in the list


def shard_indices(
    num_items: int, rank: int, world_size: int, *, shuffle: bool, seed: int, epoch: int
) -> list[int]:
    """This rank's list positions for one epoch.

    Shuffled (train): `torch.utils.data.DistributedSampler`'s permutation and padding
    (every rank gets ceil(n / world) items, the first ones repeated to fill).
    Not shuffled (test): ``range(rank, n, world)``, no padding, so shards are disjoint and
    together hold every item exactly once.
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside world_size {world_size}")
    if not shuffle:
        return list(range(rank, num_items, world_size))
    g = torch.Generator().manual_seed(seed + epoch)
    order = torch.randperm(num_items, generator=g).tolist()
    total = -(-num_items // world_size) * world_size
    order += (order * (total // max(num_items, 1) + 1))[: total - num_items]
    return order[rank:total:world_size]


def dist_rank_world(rank: int | None, world_size: int | None) -> tuple[int, int]:
    """Explicit values, else torch.distributed's when initialized (torchrun), else (0, 1)."""
    if (rank is None) != (world_size is None):
        raise ValueError(f"give rank and world_size together (got rank={rank}, world_size={world_size})")
    if rank is not None and world_size is not None:
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        return rank, world_size
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def views_per_video(train: bool, sampling: ClipSampling, augment: TrainAugment | TestAugment) -> int:
    return augment.repeats if train else sampling.num_clips * augment.num_crops


class EpochLoader:
    """What both backends share: epochs, and each pass's bad-data report.

    A pass fills `report` as its batches are delivered. `end_epoch` closes it: logs the
    report, raises `DataError` when more than `max_fail_fraction` of the reads failed, and
    moves on to the next epoch. A full pass closes itself; a consumer that stops before the
    last batch (training takes whole optimizer steps) calls `end_epoch` itself.
    """

    epoch: int
    start_batch: int
    rank: int
    max_fail_fraction: float
    report: DataReport
    _open: bool = False

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Select the epoch (its shuffle); `start_batch` skips that many batches without
        decoding them, to resume mid-epoch."""
        self.epoch, self.start_batch = epoch, start_batch

    def _begin_epoch(self) -> DataReport:
        self.report, self._open = DataReport(), True
        return self.report

    def end_epoch(self) -> DataReport:
        """Close the current pass (once; later calls return its report) and return its report."""
        if self._open:
            self._open = False
            self.epoch, self.start_batch = self.epoch + 1, 0
            if self.report.counts:
                log.warning("epoch data report (rank %d): %s", self.rank, self.report.summary())
            self.report.check(self.max_fail_fraction)
        return self.report


class PyAVLoader(EpochLoader):
    """CPU backend: `VideoDataset` in a DataLoader over this rank's shard."""

    def __init__(
        self,
        dataset: VideoDataset,
        *,
        batch_size: int,
        num_workers: int,
        rank: int,
        world_size: int,
        seed: int,
        device: torch.device | str | None,
        max_fail_fraction: float,
    ):
        self.dataset, self.batch_size, self.num_workers = dataset, batch_size, num_workers
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.device = torch.device(device) if device is not None else None
        self.max_fail_fraction = max_fail_fraction
        self.views = views_per_video(dataset.train, dataset.sampling, dataset.augment)
        self.epoch, self.start_batch, self.report = 0, 0, DataReport()

    def _shard(self) -> list[int]:
        shard = shard_indices(
            len(self.dataset),
            self.rank,
            self.world_size,
            shuffle=self.dataset.train,
            seed=self.seed,
            epoch=self.epoch,
        )
        return shard[self.start_batch * self.batch_size :]

    def __len__(self) -> int:
        n = len(self._shard())
        return n // self.batch_size if self.dataset.train else -(-n // self.batch_size)

    def __iter__(self) -> Iterator[Batch]:
        self.dataset.set_epoch(self.epoch)
        loader = torch.utils.data.DataLoader(
            self.dataset,
            batch_size=self.batch_size,
            sampler=self._shard(),
            collate_fn=collate,
            num_workers=self.num_workers,
            drop_last=self.dataset.train,
            pin_memory=self.device is not None and self.device.type == "cuda",
            worker_init_fn=_ignore_stop_signals,
        )
        report = self._begin_epoch()
        for clips, labels, index, issues in loader:
            report.add(issues, samples=len(labels) // self.views)
            if self.device is not None:
                clips, labels, index = (t.to(self.device, non_blocking=True) for t in (clips, labels, index))
            yield Batch(clips, labels, index)
        self.end_epoch()


def _ignore_stop_signals(_worker_id: int) -> None:
    """Workers leave SIGTERM and SIGINT to the main process. Slurm, `kill -TERM -PGID` and
    container stops signal the whole process group: a worker killed by it makes the main
    process's next batch raise ("worker exited unexpectedly") before the trainer can save
    and exit. The main process stops the workers when it is done with them."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def choose_backend(backend: Backend, device: torch.device | str | None = None) -> str:
    """ "auto": DALI when the batches go to a CUDA device (`device`, or None with CUDA
    available) and DALI is installed, else PyAV: DALI's CPU decoder cannot read H.264."""
    if backend == "auto":
        has_dali = (
            importlib.util.find_spec("nvidia") is not None
            and importlib.util.find_spec("nvidia.dali") is not None
        )
        on_cuda = torch.device(device).type == "cuda" if device is not None else torch.cuda.is_available()
        return "dali" if on_cuda and torch.cuda.is_available() and has_dali else "pyav"
    if backend not in ("dali", "pyav"):
        raise ValueError(f"unknown backend {backend!r}; use 'auto', 'dali' or 'pyav'")
    return backend


def check_installed(backend: Backend) -> None:
    """Raise ImportError (naming the extra to install) now, not at the first batch, when a
    decoder the `backend` needs is missing: every backend probes files with PyAV; "dali" needs
    DALI ("auto" takes DALI only where it is installed)."""
    from .dali_loader import import_dali  # imports loader: not at the top

    import_av()
    if backend == "dali":
        import_dali()


def build_loader(
    source: str | os.PathLike | Sequence[VideoRecord],
    *,
    train: bool,
    batch_size: int,
    sampling: ClipSampling | None = None,
    augment: TrainAugment | TestAugment | None = None,
    root: str | os.PathLike = "",
    backend: Backend = "auto",
    num_workers: int | None = None,
    seed: int = 0,
    rank: int | None = None,
    world_size: int | None = None,
    device: torch.device | str | None = None,
    max_fail_fraction: float = 0.5,
):
    """A re-iterable loader of `Batch`es (see the module docstring for the contract).

    `source` is a list file (any format in lists.py, paths under `root`) or records.
    `sampling` defaults to K400 16x4; `augment` to `TrainAugment()` / `TestAugment()`.
    `rank`/`world_size` default to torch.distributed's. `num_workers` (PyAV) / CPU threads
    (DALI) default to this process's share of the CPU cores. Each pass is one epoch; the
    epoch number advances by itself (call `set_epoch` to pin it). Train batches drop the ragged last batch.
    """
    sampling = sampling if sampling is not None else ClipSampling()
    records = read_list(source, root=root) if isinstance(source, (str, os.PathLike)) else list(source)
    if not records:
        raise ValueError("build_loader: no records")
    augment = augment if augment is not None else (TrainAugment() if train else TestAugment())
    check_augment(train, augment)
    check_int("batch_size", batch_size)
    if num_workers is not None:
        check_int("num_workers", num_workers, least=0)
    rank, world_size = dist_rank_world(rank, world_size)
    if num_workers is None:
        num_workers = max(1, len(os.sched_getaffinity(0)) // max(1, torch.cuda.device_count() or 1))
    chosen = choose_backend(backend, device)
    wants_cuda = torch.device(device).type == "cuda" if device is not None else chosen == "dali"
    if wants_cuda and not torch.cuda.is_available():
        where = "backend='dali' decodes on the GPU by default" if device is None else f"device={device!r}"
        raise ValueError(f"{where}, but CUDA is not available: use backend='pyav' (or device='cpu' "
                         "for DALI's CPU decoder, which reads VP8/VP9/MJPEG but not H.264)")
    if chosen == "dali":
        from .dali_loader import DALILoader

        return DALILoader(
            records,
            train=train,
            sampling=sampling,
            augment=augment,
            batch_size=batch_size,
            num_threads=max(1, num_workers),  # DALI has no in-process mode: 0 means one thread
            rank=rank,
            world_size=world_size,
            seed=seed,
            device=device,
            max_fail_fraction=max_fail_fraction,
        )
    dataset = VideoDataset(
        records,
        train=train,
        sampling=sampling,
        augment=augment,
        seed=seed,
        max_fail_fraction=max_fail_fraction,
    )
    return PyAVLoader(
        dataset,
        batch_size=batch_size,
        num_workers=num_workers,
        rank=rank,
        world_size=world_size,
        seed=seed,
        device=device,
        max_fail_fraction=max_fail_fraction,
    )
