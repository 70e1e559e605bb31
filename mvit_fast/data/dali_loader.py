"""The GPU backend: DALI decodes (NVDEC, `fn.decoders.video` on "mixed") and augments on the GPU.

Same sampling (sampling.py, computed here in Python and passed per sample as
``frames=``), same view layout and the same output contract as the PyAV backend (see
loader.py): batches are CUDA float32 (N, 3, T, H, W), normalized. `device=None` (or
"cpu") runs DALI's CPU pipeline instead, which decodes only VP8/VP9/MJPEG: that is
how the tests check DALI against PyAV without a GPU.

Python side, per sample: read the file's bytes and its frame count (PyAV probe, packets
counted once per file and cached), pick the frame indices, replace missing or unreadable
files with another sample and record padding, exactly as the PyAV backend reports it.
A file the decoder fails on (data corrupted mid-stream) fails its whole batch, and
DALI's error names no sample: the batch's samples are then decoded one by one on a
decode-only pipeline, the failing files reported as undecodable and replaced, and the
batch run again on a rebuilt pipeline.
A thread reads and runs the next batch while the consumer works on this one
(`read_ahead`, default 1 batch; 0 reads on the consumer's thread): same batches, same
order, same report.
Graph side: decode -> RandAugment -> random resized crop -> flip + normalize (train), or
short-side resize -> 1 or 3 crops + normalize (test). Training views take their random
choices from Python (`transforms.draw_train_view`, as the PyAV backend does; see
dali_augment.py), so the pipeline holds no random state and a resumed epoch repeats
exactly. Random erasing runs on the output tensor with the PyAV backend's torch function.

Known differences from the PyAV path: RandAugment's ops are DALI's (dali_augment.py lists
where they differ); resize and crop rounding may differ by a pixel. A file whose data is
corrupted mid-stream is replaced here (undecodable), where PyAV keeps the frames before
the damage and pads (truncated).
"""

from __future__ import annotations

import logging
import queue
import threading
from typing import NamedTuple

import numpy as np
import torch

from .lists import VideoRecord, resolve_video_path
from .loader import Batch, EpochLoader, shard_indices, views_per_video
from .report import DataError, DataReport, Issue
from .sampling import ClipSampling
from .transforms import TestAugment, TrainAugment, ViewDraw, draw_train_view, erase
from .video_io import VideoInfo, probe

log = logging.getLogger("mvit_fast.data")


def import_dali():
    try:
        import nvidia.dali as dali
    except ImportError as e:
        raise ImportError("the DALI backend needs NVIDIA DALI: pip install 'mvit-fast[dali]'") from e
    return dali


def _normalize_args(augment: TrainAugment | TestAugment) -> dict:
    return dict(
        mean=[255 * m for m in augment.mean], std=[255 * s for s in augment.std], output_layout="CFHW"
    )


def build_pipeline(
    *,
    train: bool,
    augment: TrainAugment | TestAugment,
    batch_size: int,
    num_threads: int,
    device_id: int | None,
):
    """A DALI pipeline fed by `feed_input`: "encoded", "frames", and "landscape" (test) or the
    view draws (train, see dali_augment.py); outputs one (B, C, T, H, W) float batch per view
    (train: `repeats`; test: `num_crops`). It draws nothing: its outputs depend only on its inputs."""
    dali = import_dali()
    from nvidia.dali import fn, types

    from .dali_augment import train_views_graph

    @dali.pipeline_def(enable_conditionals=train and augment.rand_augment)
    def pipeline():
        video = _decoded(device_id)
        if train:
            return tuple(train_views_graph(video, augment, _normalize_args(augment)))
        landscape = fn.external_source(name="landscape", dtype=types.FLOAT, ndim=0)
        views = []
        video = fn.resize(video, resize_shorter=augment.short_side, antialias=False)
        positions = [0.5] if augment.num_crops == 1 else [0.0, 0.5, 1.0]
        for p in positions:  # along the long side: x for landscape frames, y for portrait ones
            views.append(
                fn.crop_mirror_normalize(
                    video,
                    crop=(augment.crop_size,) * 2,
                    crop_pos_x=landscape * p + (1 - landscape) * 0.5,
                    crop_pos_y=landscape * 0.5 + (1 - landscape) * p,
                    dtype=types.FLOAT,
                    **_normalize_args(augment),
                )
            )
        return tuple(views)

    return _built(pipeline, batch_size, num_threads, device_id)


def build_decoder(*, num_threads: int, device_id: int | None):
    """A pipeline that only decodes ("encoded", "frames" -> frames), one sample per run:
    it finds which file a failed batch's decoder error came from, and builds in a moment."""
    dali = import_dali()
    return _built(dali.pipeline_def(lambda: _decoded(device_id)), 1, num_threads, device_id)


def _decoded(device_id: int | None):
    """The graph's decoded (F, H, W, C) uint8 frames of the "encoded" file at the "frames" indices."""
    from nvidia.dali import fn, types

    encoded = fn.external_source(name="encoded", dtype=types.UINT8, ndim=1)
    frames = fn.external_source(name="frames", dtype=types.INT32, ndim=1)
    return fn.decoders.video(encoded, frames=frames, device="cpu" if device_id is None else "mixed")


def _built(pipeline_fn, batch_size: int, num_threads: int, device_id: int | None):
    pipe = pipeline_fn(batch_size=batch_size, num_threads=num_threads, device_id=device_id,
                       prefetch_queue_depth=1, exec_dynamic=True)
    pipe.build()
    return pipe


class _Sample(NamedTuple):
    record: VideoRecord
    index: int  # its position in the list
    encoded: np.ndarray  # the file's bytes
    clips: list[np.ndarray]  # frame indices per clip
    landscape: bool
    draws: list[ViewDraw]  # train: one per view


def _to_torch(tensor_list, device: torch.device) -> torch.Tensor:
    return torch.from_dlpack(tensor_list.as_tensor()).to(device)


class DALILoader(EpochLoader):
    """DALI backend with the `PyAVLoader` interface (set_epoch, len, iter -> Batch, report, end_epoch)."""

    def __init__(
        self,
        records: list[VideoRecord],
        *,
        train: bool,
        sampling: ClipSampling,
        augment: TrainAugment | TestAugment,
        batch_size: int,
        num_threads: int,
        rank: int,
        world_size: int,
        seed: int,
        device: torch.device | str | None,
        max_fail_fraction: float,
        max_retries: int = 10,
        read_ahead: int = 1,
    ):
        self.device = (
            torch.device(device) if device is not None else torch.device("cuda", torch.cuda.current_device())
        )
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.records, self.train, self.sampling, self.augment = records, train, sampling, augment
        self.batch_size, self.rank, self.world_size, self.seed = batch_size, rank, world_size, seed
        self.max_fail_fraction, self.max_retries = max_fail_fraction, max_retries
        self.views = views_per_video(train, sampling, augment)
        self.epoch, self.start_batch, self.report = 0, 0, DataReport()
        self._probed: dict[str, VideoInfo] = {}  # path -> its frames counted
        self._undecodable: dict[str, str] = {}  # path -> the decoder's error, found by `_find_undecodable`
        clips_per_video = 1 if train else sampling.num_clips
        self._pipe_args = dict(
            train=train,
            augment=augment,
            batch_size=batch_size * clips_per_video,
            num_threads=num_threads,
            device_id=self.device.index if self.device.type == "cuda" else None,
        )
        self.pipe = build_pipeline(**self._pipe_args)
        self.read_ahead, self._ahead = read_ahead, None

    def _shard(self) -> list[int]:
        shard = shard_indices(
            len(self.records),
            self.rank,
            self.world_size,
            shuffle=self.train,
            seed=self.seed,
            epoch=self.epoch,
        )
        return shard[self.start_batch * self.batch_size :]

    def __len__(self) -> int:
        n = len(self._shard())
        return n // self.batch_size if self.train else -(-n // self.batch_size)

    def _probe(self, path: str) -> VideoInfo:
        if path not in self._probed:  # the frames counted, as the PyAV backend samples over them
            self._probed[path] = probe(path, count_packets=True)
        return self._probed[path]

    def _read(self, index: int, report: DataReport) -> _Sample:
        """List entry `index` ready to feed, a bad file replaced by another entry."""
        for attempt in range(self.max_retries + 1):
            record = self.records[index]
            rng = np.random.default_rng([self.seed, self.epoch, index, attempt])
            path = resolve_video_path(record.path)
            try:
                if path in self._undecodable:
                    raise RuntimeError(self._undecodable[path])
                encoded = np.fromfile(path, dtype=np.uint8)
                info = self._probe(path)
                num_frames, landscape = info.num_frames, info.width >= info.height
                if num_frames <= 0:
                    raise ValueError("zero_frames")
            except Exception as e:  # any failure to read a file means "replace it"
                kind = (
                    "missing"
                    if isinstance(e, FileNotFoundError)
                    else ("zero_frames" if str(e) == "zero_frames" else "undecodable")
                )
                report.add([Issue(path, kind, f"{type(e).__name__}: {e}")])
                report.check(self.max_fail_fraction)
                index = int(rng.integers(len(self.records)))
                continue
            if num_frames < (min_frames := self.sampling.min_frames(info.fps)):
                report.add([Issue(path, "too_short", f"{num_frames} < {min_frames} frames")])
            if shortfall := info.shortfall(record.num_frames):
                report.add([Issue(path, "truncated", shortfall)])
            clips = self.sampling.indices(num_frames, train=self.train, rng=rng, fps=info.fps)
            # the view draws follow the frame positions' in `rng`, as in the PyAV backend
            draws = [draw_train_view(info.height, info.width, self.augment, rng)
                     for _ in range(self.augment.repeats)] if self.train else []
            return _Sample(record, index, encoded, clips, landscape, draws)
        raise DataError(f"{self.max_retries + 1} reads in a row failed, the last: {report.issues[-1]}")

    def __iter__(self):
        report = self._begin_epoch()
        # The reads' own report runs ahead of `report`, which holds what was delivered: a
        # consumer that stops early (end_epoch) reports no batch it did not take.
        batches = self._batches(DataReport())
        ahead = _ReadAhead(batches, self.read_ahead, self.device) if self.read_ahead else batches
        self._ahead = ahead if self.read_ahead else None
        try:
            for batch, issues, samples in ahead:
                report.add(issues, samples=samples)
                yield batch
        finally:
            self._stop_reading()
        self.end_epoch()

    def _stop_reading(self) -> None:
        if self._ahead is not None:
            self._ahead.stop()
            self._ahead = None

    def end_epoch(self) -> DataReport:
        self._stop_reading()  # before the pass's report closes: no read changes it after
        return super().end_epoch()

    def _batches(self, report: DataReport):
        """(Batch, its issues, its samples) for each batch of the pass; `report` collects
        every read's issues as they happen (its failure fraction stops a hopeless pass)."""
        shard = self._shard()
        for b in range(len(self)):
            batch = shard[b * self.batch_size : (b + 1) * self.batch_size]
            seen = len(report.issues)
            samples = [self._read(i, report) for i in batch]
            while True:
                try:
                    views = self._run(samples)
                    break
                except RuntimeError as error:  # names no sample; replace the ones that fail alone
                    for j in self._find_undecodable(samples, error):  # on from the failing file
                        samples[j] = self._read(samples[j].index, report)
            labels = [sample.record.label for sample in samples]
            # a test stand-in for an unreadable video is marked, not scored (see loader.py)
            video_index = [sample.index if self.train or sample.index == asked else -1
                           for asked, sample in zip(batch, samples)]
            report.add([], samples=len(labels))
            # views[v]: (samples, C, T, H, W); sample-major, then view -> adjacent views per video.
            clips = torch.stack(views, 1).flatten(0, 1)
            if self.train and self.augment.erase_prob > 0:
                draws = [draw for sample in samples for draw in sample.draws]
                clips = torch.stack([erase(c, draw.erase) for c, draw in zip(clips, draws)])
            repeat = torch.full((len(labels),), self.views)
            yield Batch(
                clips,
                torch.repeat_interleave(torch.tensor(labels), repeat).to(self.device),
                torch.repeat_interleave(torch.tensor(video_index), repeat).to(self.device),
            ), report.issues[seen:], len(labels)

    def _run(self, samples: list[_Sample]) -> list[torch.Tensor]:
        """One pipeline run over `samples` (from `_read`): one (clips, C, T, H, W) tensor per view."""
        from .dali_augment import train_draw_inputs  # imports DALI

        inputs: dict[str, list[np.ndarray]] = {"encoded": [], "frames": []}
        for sample in samples:
            for clip in sample.clips:
                inputs["encoded"].append(sample.encoded)
                inputs["frames"].append(clip.astype(np.int32))
                if self.train:  # one clip per sample
                    for name, value in train_draw_inputs(sample.draws, self.augment).items():
                        inputs.setdefault(name, []).append(value)
                else:
                    inputs.setdefault("landscape", []).append(np.array(np.float32(sample.landscape)))
        for name, values in inputs.items():
            self.pipe.feed_input(name, values)
        return [_to_torch(out, self.device) for out in self.pipe.run()]

    def _find_undecodable(self, samples: list[_Sample], error: RuntimeError) -> list[int]:
        """Positions of the samples whose clips fail to decode alone; their files are
        remembered as undecodable. An error leaves a DALI pipeline unusable: each failure
        gets a fresh decoder, and the main pipeline is rebuilt. Re-raises `error` when
        none fails alone: then it was not a file's fault."""
        decoder_args = {k: self._pipe_args[k] for k in ("num_threads", "device_id")}
        decoder, bad = build_decoder(**decoder_args), []
        for j, sample in enumerate(samples):
            try:
                for clip in sample.clips:
                    decoder.feed_input("encoded", [sample.encoded])
                    decoder.feed_input("frames", [clip.astype(np.int32)])
                    decoder.run()
            except RuntimeError as e:
                path = resolve_video_path(sample.record.path)
                self._undecodable[path] = reason = _decoder_message(e)
                log.warning("DALI cannot decode %s (%s); replacing it from now on", path, reason)
                bad.append(j)
                decoder = build_decoder(**decoder_args)
        if not bad:
            raise error
        self.pipe = build_pipeline(**self._pipe_args)
        return bad


class _ReadAhead:
    """Runs an iterator in a thread, up to `depth` items ahead of the consumer.

    The next batch's file reads, probes and DALI run overlap the training step that
    consumes this one (the pipeline runs one batch at a time: its inputs are fed from
    Python). The items and their order are the iterator's: a pass is the same with or
    without it. An exception in the thread is raised at the consumer's next item.
    """

    def __init__(self, items, depth: int, device: torch.device) -> None:
        self._queue: queue.Queue = queue.Queue()
        self._slots = threading.Semaphore(depth)  # items made and not yet taken
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._produce, args=(items, device), daemon=True,
                                        name="mvit-fast-dali-read-ahead")
        self._thread.start()

    def _produce(self, items, device: torch.device) -> None:
        try:
            if device.type == "cuda":  # the current device is per thread
                torch.cuda.set_device(device)
            while self._free_slot():
                try:
                    item = next(items)
                except StopIteration:
                    self._queue.put(("end", None))
                    return
                self._queue.put(("item", item))
        except BaseException as e:  # delivered to the consumer, with its traceback
            self._queue.put(("error", e))
        finally:
            items.close()

    def _free_slot(self) -> bool:
        """Wait until fewer than `depth` items wait for the consumer; False once it stopped."""
        while not self._stopping.is_set():
            if self._slots.acquire(timeout=0.05):
                return True
        return False

    def __iter__(self):
        while True:
            kind, value = self._queue.get()
            if kind == "end":
                return
            if kind == "error":
                raise value
            self._slots.release()
            yield value

    def stop(self) -> None:
        """Stop reading (after the item in progress) and wait for the thread."""
        self._stopping.set()
        self._thread.join()


def _decoder_message(error: RuntimeError) -> str:
    """The line of a DALI pipeline error that says what failed (DALI wraps it in a traceback)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    after = lines.index("encountered:") + 1 if "encountered:" in lines else 0
    return f"DALI decoder: {lines[after] if after < len(lines) else 'error'}"
