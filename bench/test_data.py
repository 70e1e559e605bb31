"""Decoded + augmented clips/s: DALI on the GPU vs PyAV on every CPU core.

K400-like files are generated at bench time (340x256, 30 fps, 10 s, H.264) into a
temporary folder. Cases: 16x4 and 32x3 sampling, train augmentation at 224 (RandAugment
on the whole frame, random resized crop, flip, normalize, random erasing). GPU cases skip without
CUDA + DALI; the CPU cases run on a handful of files so they finish in seconds.

Both backends read the same list at the same batch size. An epoch holds WAVES batches per
PyAV worker (the files listed several times over), so the workers' start-up is spread over
several batches each, as in a real epoch; clips/s is the median over timed epochs.

    pytest bench/test_data.py --benchmark-only
"""

from __future__ import annotations

import os
import statistics
import time

import numpy as np
import pytest
import torch

from mvit_fast.data import ClipSampling, TrainAugment, VideoRecord, build_loader

av = pytest.importorskip("av", reason="PyAV (the `video` extra) writes the benchmark videos")

from mvit_fast.data.video_io import write_video  # noqa: E402

HAS_DALI_GPU = torch.cuda.is_available() and __import__("importlib").util.find_spec("nvidia.dali") is not None
SAMPLINGS = {"16x4": ClipSampling("k400", 16, 4), "32x3": ClipSampling("k400", 32, 3)}
CPU_CORES = len(os.sched_getaffinity(0))
BATCH = 8 if HAS_DALI_GPU else 2  # one batch size for both backends
WAVES = 4 if HAS_DALI_GPU else 1  # batches per PyAV worker in an epoch
ROUNDS = 3


def k400_like_frames(seed: int, num_frames: int = 300, height: int = 256, width: int = 340) -> np.ndarray:
    """A smooth pattern drifting across the frame: cheap to make, not trivially compressible."""
    rng = np.random.default_rng(seed)
    ys, xs = np.mgrid[0:height, 0:width] / 40.0
    base = np.stack(
        [np.sin(xs * rng.uniform(0.5, 2) + ys * rng.uniform(0.5, 2) + p) for p in rng.uniform(0, 6, 3)], -1
    )
    base = ((base + 1) * 127.5).astype(np.uint8)
    noise = rng.integers(0, 24, size=(height, width, 3), dtype=np.uint8)
    return np.stack([np.roll(base, 3 * t, axis=1) + noise for t in range(num_frames)])


@pytest.fixture(scope="module")
def k400_like(tmp_path_factory):
    folder = tmp_path_factory.mktemp("k400_like")
    files = []
    for i in range(32 if HAS_DALI_GPU else 2 * CPU_CORES):
        path = folder / f"{i:04d}.mp4"
        write_video(path, k400_like_frames(i), fps=30, codec="h264")
        files.append(VideoRecord(str(path), i % 400, 300))
    clips = BATCH * CPU_CORES * WAVES
    return [files[i % len(files)] for i in range(clips)]


def run_epoch(loader) -> float:
    """Clips/s over one pass, the device synced before the clock stops."""
    start, clips = time.perf_counter(), 0
    for batch in loader:
        clips += batch.clips.shape[0]
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return clips / (time.perf_counter() - start)


def bench_backend(benchmark, run_info, records, backend: str, sampling: str, **kw):
    loader = build_loader(
        records,
        backend=backend,
        train=True,
        batch_size=BATCH,
        sampling=SAMPLINGS[sampling],
        augment=TrainAugment(crop_size=224),
        num_workers=CPU_CORES,
        **kw,
    )
    run_epoch(loader)  # warm-up: worker start, pipeline build, probe caches
    rates = []
    benchmark.pedantic(lambda: rates.append(run_epoch(loader)), rounds=ROUNDS, iterations=1)
    benchmark.extra_info.update(
        run_info,  # device, versions, commit (bench/conftest.py)
        kind="data",
        clips_per_s=round(statistics.median(rates), 2),
        clips_per_s_rounds=[round(r, 2) for r in rates],
        backend=backend,
        sampling=sampling,
        batch=BATCH,
        clips_per_epoch=len(records),
        cpu_cores=CPU_CORES,
        av=av.__version__,
        files="340x256 30fps 10s h264",
    )
    if backend == "pyav":  # on this machine's CPU cores, whatever GPU it has
        benchmark.extra_info.update(device="cpu", device_type="cpu", l2_cache_bytes=None)


@pytest.mark.parametrize("sampling", list(SAMPLINGS))
def test_pyav_cpu(benchmark, run_info, k400_like, sampling):
    bench_backend(benchmark, run_info, k400_like, "pyav", sampling)


@pytest.mark.skipif(
    not HAS_DALI_GPU, reason="DALI GPU decoding needs CUDA and nvidia-dali (the `dali` extra)"
)
@pytest.mark.parametrize("sampling", list(SAMPLINGS))
def test_dali_gpu(benchmark, run_info, k400_like, sampling):
    bench_backend(benchmark, run_info, k400_like, "dali", sampling, device="cuda")
