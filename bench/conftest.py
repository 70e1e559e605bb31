"""Benchmark setup: MViTv2 attention shapes from `block_specs`, device/dtype fixtures, run records.

Shapes are derived, never typed in: `attention_shapes(cfg)` groups the blocks of a
config by their attention shape. With a CUDA GPU the suites are MViTv2-S 16x224 and
MViTv2-B 32x224 in bf16 at batch 8; without one the same command times a small
CPU-capable MViTv2-S (4 frames at 64 px) in fp32 and skips the GPU-only suites.

FLOP count (one function, `attention_flops`): the two attention matmuls, 4*Nq*Nk*d
per head and clip for the forward (QK^T and PV, 2 FLOPs per multiply-add), 3.5x that
for forward+backward (the forward's two matmuls and the backward's five: the
backward alone is 2.5x, FlashAttention's convention). The
bias, softmax and residual are not counted, so every backend is scored against the
same work.

Whole-model runs (bench/test_model.py) record through `record_run`, which `record`
also uses: the same device, version and commit fields, TFLOP/s from the caller's
FLOP count, and the CUDA peak memory.
"""

from __future__ import annotations

import os
import platform
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from mvit_fast.config import MViTConfig, block_specs, get_config

CUDA = torch.cuda.is_available()

# suite name -> (config, needs CUDA)
SUITES: dict[str, tuple[MViTConfig, bool]] = {
    "S16x224": (get_config("s"), True),
    "B32x224": (get_config("b"), True),
    "S4x64": (get_config("s", num_frames=4, crop_size=64), False),  # CPU-sized smoke suite
}


@dataclass(frozen=True)
class AttentionShape:
    """One distinct attention shape of a model and the blocks that have it."""

    heads: int
    head_dim: int
    q_grid: tuple[int, int, int]
    kv_grid: tuple[int, int, int]
    rel_pos_t_len: int
    rel_pos_hw_len: int
    blocks: tuple[int, ...]

    @property
    def nq(self) -> int:
        return 1 + self.q_grid[0] * self.q_grid[1] * self.q_grid[2]

    @property
    def nk(self) -> int:
        return 1 + self.kv_grid[0] * self.kv_grid[1] * self.kv_grid[2]

    @property
    def id(self) -> str:
        first, last = self.blocks[0], self.blocks[-1]
        blocks = f"b{first}" if first == last else f"b{first}-{last}"
        return f"{blocks}-h{self.heads}-{self.nq}x{self.nk}"


WARMUP_CALLS = 2  # compile, autotune, allocator warm-up: never timed
# pytest-benchmark repeats the timed call until a round lasts this long, so the one device
# sync per round costs ~1% or less of it.
ROUND_MIN_S = 5e-3
EAGER_CALLS = 10  # calls queued back to back for `eager_ms`


def device_clock() -> float:
    """The op benchmarks' timer: waits for the GPU, then reads the clock, so a round spans
    its calls' GPU work."""
    if CUDA:
        torch.cuda.synchronize()
    return time.perf_counter()


def pytest_collection_modifyitems(items):
    """Every op benchmark (a test using `time_op`) runs on `device_clock` with rounds of at
    least ROUND_MIN_S; a case's own `benchmark` marker settings (the CPU smoke limits) stay."""
    for item in items:
        if "time_op" in getattr(item, "fixturenames", ()):
            marker = item.get_closest_marker("benchmark")
            options = {"timer": device_clock, "min_time": ROUND_MIN_S, **(marker.kwargs if marker else {})}
            item.add_marker(pytest.mark.benchmark(**options), append=False)


def _capture(step: Callable[[], None], device: torch.device) -> tuple[Callable[[], None], str]:
    """One call of `step` captured in a CUDA graph: (graph.replay, "cuda_graph"), or (step,
    "eager: <why>") when some op of it cannot be captured.

    A replay runs the call's kernels with no host work between them, so its time is the
    GPU's. Timed eagerly, an op is tens of Python-dispatched launches; past 1 ms a call,
    pytest-benchmark ran one call per round, so each time added the host's latency to the
    kernels' (on the H100 of cbf8ef1 the forward times at four shapes fit ~0.9 ms plus
    terms in the size). In a model the host runs ahead of the GPU and that latency hides.
    """
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):  # libraries set up per stream before a capture
        step()
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            step()
    except Exception as exc:  # any op that syncs or is not capturable: time it eagerly
        torch.cuda.synchronize(device)
        return step, f"eager: capture failed ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})"
    return graph.replay, "cuda_graph"


def _time_op(benchmark, fn: Callable[[], object], leaves, grad_outs, mode: str,
             device: torch.device) -> None:
    """Time `fn` ("fwd": under no_grad) or `fn` plus its backward ("fwd+bwd") after
    WARMUP_CALLS untimed calls; the median is per call.

    On CUDA the timed call is a CUDA-graph replay (`_capture`; extra_info "timing" says
    which ran), and extra_info "eager_ms" adds the per-call time of EAGER_CALLS ungraphed
    calls queued back to back (what an eager model pays where the host cannot run ahead).
    CUDA peak memory is reset before the capture, so `record` reports one call's peak.
    """

    def step():
        if mode == "fwd":
            with torch.no_grad():
                fn()
        else:  # autograd.grad, not backward(): no .grad accumulation inside the timing
            torch.autograd.grad(fn(), leaves, grad_outs)

    for _ in range(WARMUP_CALLS):
        step()
    timed, timing = step, "eager"
    if device.type == "cuda":
        start = device_clock()
        for _ in range(EAGER_CALLS):
            step()
        benchmark.extra_info["eager_ms"] = (device_clock() - start) / EAGER_CALLS * 1e3
        torch.cuda.reset_peak_memory_stats()
        timed, timing = _capture(step, device)
    benchmark.extra_info["timing"] = timing
    device_clock()
    benchmark(timed)


def attention_shapes(cfg: MViTConfig) -> list[AttentionShape]:
    """Distinct (heads, head_dim, q_grid, kv_grid, table lengths) of `cfg`'s blocks, in block order."""
    groups: dict[tuple, list[int]] = {}
    for spec in block_specs(cfg):
        key = (spec.num_heads, spec.head_dim, spec.q_grid, spec.kv_grid, spec.rel_pos_t_len,
               spec.rel_pos_hw_len)
        groups.setdefault(key, []).append(spec.index)
    return [AttentionShape(*key, blocks=tuple(blocks)) for key, blocks in groups.items()]


def attention_flops(shape: AttentionShape, batch: int, mode: str) -> float:
    """FLOPs of the attention matmuls: 4*Nq*Nk*d per head and clip; x3.5 for fwd+bwd (2 + 5 matmuls)."""
    fwd = 4.0 * shape.nq * shape.nk * shape.head_dim * shape.heads * batch
    return fwd if mode == "fwd" else 3.5 * fwd


@pytest.hookimpl(hookwrapper=True, tryfirst=True)
def pytest_sessionfinish(session):
    """Drop cases that have no timed round before pytest-benchmark saves the JSON: a run cut
    by SIGINT (gpu_suite.sh's step timeouts) inside a case's first round leaves it without
    data, and saving it would raise and lose every finished case."""
    bench_session = getattr(session.config, "_benchmarksession", None)
    if bench_session is not None:
        bench_session.benchmarks[:] = [b for b in bench_session.benchmarks if b.stats.data]
    yield


def pytest_generate_tests(metafunc):
    """Parametrize `attention_shape` with (suite, shape) over every suite; skip the other device's."""
    if "attention_shape" not in metafunc.fixturenames:
        return
    params = []
    for suite, (cfg, needs_cuda) in SUITES.items():
        if needs_cuda and not CUDA:
            marks = pytest.mark.skip(reason=f"{suite}: full-size shapes need a CUDA GPU")
        elif CUDA and not needs_cuda:
            marks = pytest.mark.skip(reason=f"{suite}: CPU smoke shapes; the GPU times the real ones")
        elif not needs_cuda:  # a smoke test of the suite, not a measurement: keep it short
            marks = pytest.mark.benchmark(max_time=0.2, min_rounds=3)
        else:
            marks = ()
        params += [pytest.param((suite, shape), id=f"{suite}-{shape.id}", marks=marks)
                   for shape in attention_shapes(cfg)]
    metafunc.parametrize("attention_shape", params)


@pytest.fixture(scope="session", autouse=True)
def _cpu_smoke_threads():
    """Without a GPU the suites are smoke tests on small shapes: run them on one thread.

    On a busy 2-core machine, torch's OpenMP workers spin-wait for descheduled peers at
    every op: a 60 ms MViTv2-S 4x64 forward took 0.3-6 s on 2 threads, steadily 60-110 ms
    on 1 (measured with another process on the cores).
    """
    if CUDA:
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def device() -> torch.device:
    return torch.device("cuda" if CUDA else "cpu")


@pytest.fixture(scope="session")
def dtype() -> torch.dtype:
    return torch.bfloat16 if CUDA else torch.float32


@pytest.fixture(scope="session")
def batch() -> int:
    return 8 if CUDA else 1


def _git_commit() -> str:
    """MVIT_FAST_COMMIT if set (the device machine gets a copy without .git), else HEAD, with
    "-dirty" when tracked files differ from it (what ran is then not that commit)."""
    if os.environ.get("MVIT_FAST_COMMIT"):
        return os.environ["MVIT_FAST_COMMIT"]
    here = Path(__file__).parent
    try:
        out = subprocess.run(["git", "rev-parse", "--verify", "-q", "HEAD"], cwd=here,
                             capture_output=True, text=True, timeout=10)
        if out.returncode != 0:
            return "unknown"
        clean = subprocess.run(["git", "diff", "--quiet", "HEAD"], cwd=here, timeout=10).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return out.stdout.strip() + ("" if clean else "-dirty")


@pytest.fixture(scope="session")
def run_info(device) -> dict:
    """What every record carries: device, versions, commit."""
    return describe_run(device)


def describe_run(device: torch.device) -> dict:
    """Device name, type and L2 size, torch/triton/CUDA versions and the git commit of a run."""
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {
        "device": torch.cuda.get_device_name(device) if CUDA else platform.processor() or "cpu",
        "device_type": device.type,
        "l2_cache_bytes": torch.cuda.get_device_properties(device).L2_cache_size if CUDA else None,
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda,
        "commit": _git_commit(),
    }


@pytest.fixture
def record_run(run_info) -> Callable[..., None]:
    """record_run(benchmark, flops=, **fields): fills `benchmark.extra_info` for any suite.

    Adds `run_info`, the caller's fields, `flops` (FLOPs of one timed call), TFLOP/s =
    flops / median time, and on CUDA `peak_memory_mb`: the allocator's peak since the
    caller's last `torch.cuda.reset_peak_memory_stats()`.
    """

    def _record_run(benchmark, *, flops: float, **fields) -> None:
        info = benchmark.extra_info
        info.update(run_info)
        info.update(fields, flops=flops)
        if benchmark.stats:  # None or empty under --benchmark-disable
            info["tflops"] = flops / benchmark.stats.stats.median / 1e12
        if CUDA:
            info["peak_memory_mb"] = torch.cuda.max_memory_allocated() / 2**20

    return _record_run


@pytest.fixture
def record(record_run, dtype, batch) -> Callable[..., None]:
    """record(benchmark, backend=, mode=, suite=, shape=): fills `benchmark.extra_info`.

    Effective TFLOP/s = attention_flops / median time. Peak memory is the CUDA
    allocator's peak over the timed calls, inputs included.
    """

    def _record(benchmark, *, backend: str, mode: str, suite: str, shape: AttentionShape) -> None:
        record_run(benchmark, flops=attention_flops(shape, batch, mode), kind="attention",
                   backend=backend, mode=mode, suite=suite, dtype=str(dtype).removeprefix("torch."),
                   batch=batch, heads=shape.heads, head_dim=shape.head_dim, q_grid=shape.q_grid,
                   kv_grid=shape.kv_grid, nq=shape.nq, nk=shape.nk, blocks=shape.blocks)

    return _record


@pytest.fixture
def time_op() -> Callable[..., None]:
    """`time_op(benchmark, fn, leaves, grad_outs, mode, device)`: warm up, then time `fn`
    ("fwd") or `fn` plus its backward ("fwd+bwd"), per call (`_time_op`)."""
    return _time_op
