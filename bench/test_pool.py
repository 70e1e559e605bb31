"""Pooling of one MViTv2 block (q, k, v: depthwise Conv3d + LayerNorm) per provider, fwd and fwd+bwd.

    pytest bench/test_pool.py --benchmark-only                      # every suite the device runs
    pytest bench/test_pool.py --benchmark-only -k "S16x224 and triton"

Providers: `triton` (the fused `pool_norm_qkv`, straight from the (B, N, 3, heads, d)
projection output), `eager` (the module's plain path: permute + three `attention_pool`
calls with nn.Conv3d + nn.LayerNorm) and `compile` (that eager path under torch.compile).
Shapes are every distinct pooling shape (input grid, strides, heads, head_dim) of the
blocks of `block_specs`, MViTv2-S 16x224 and B 32x224, batch 8, on CUDA, as the model
runs them in bf16 training: bf16 activations, fp32 parameters (the master weights), the
eager and compile providers under bf16 autocast (whose LayerNorm runs, and writes q, k, v,
in fp32 on CUDA, as in the model; the fused op writes bf16). Without CUDA the GPU suites
skip and the CPU smoke suite (S 4x64) times the eager provider on its first shape only.

Bytes (one documented function, `pool_bytes`): the op's unavoidable HBM traffic, with C =
heads * head_dim per token and the dtype's item size:
    forward:  read qkv once (3 N C) + write q, k, v ((Nq + 2 Nkv) C);
    backward: read qkv (the conv is recomputed, nothing else is saved) and dq, dk, dv,
              write dqkv: 2 * 3 N C + (Nq + 2 Nkv) C.
fwd+bwd counts both. `extra_info` carries the time-derived GB/s and its fraction of the
device's HBM bandwidth (spec sheet, `mvit_fast.report.DEVICE_PEAKS`; None for an unknown
device), and `fits_l2` where those bytes are at most twice the L2 cache: such a shape may be
served from L2.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
import torch.nn as nn

from mvit_fast.attention import attention_pool
from mvit_fast.config import MViTConfig, block_specs, get_config
from mvit_fast.report import device_peaks

CUDA = torch.cuda.is_available()
# suite name -> (config, needs CUDA): bench/conftest.py's suites (a conftest is not importable
# by module name under plain `pytest`, so they are restated here).
SUITES: dict[str, tuple[MViTConfig, bool]] = {
    "S16x224": (get_config("s"), True),
    "B32x224": (get_config("b"), True),
    "S4x64": (get_config("s", num_frames=4, crop_size=64), False),
}


@dataclass(frozen=True)
class PoolShape:
    """One distinct pooling shape of a model and the blocks that have it."""

    heads: int
    head_dim: int
    input_grid: tuple[int, int, int]
    kernel: tuple[int, int, int]
    stride_q: tuple[int, int, int]
    stride_kv: tuple[int, int, int]
    q_grid: tuple[int, int, int]
    kv_grid: tuple[int, int, int]
    blocks: tuple[int, ...]

    @property
    def n(self) -> int:
        t, h, w = self.input_grid
        return 1 + t * h * w

    @property
    def nq(self) -> int:
        return 1 + self.q_grid[0] * self.q_grid[1] * self.q_grid[2]

    @property
    def nkv(self) -> int:
        return 1 + self.kv_grid[0] * self.kv_grid[1] * self.kv_grid[2]

    @property
    def id(self) -> str:
        first, last = self.blocks[0], self.blocks[-1]
        blocks = f"b{first}" if first == last else f"b{first}-{last}"
        return f"{blocks}-h{self.heads}-{self.n}to{self.nq}+{self.nkv}"


def pool_shapes(cfg: MViTConfig) -> list[PoolShape]:
    """Distinct pooling shapes of `cfg`'s blocks, in block order."""
    groups: dict[tuple, list[int]] = {}
    for s in block_specs(cfg):
        key = (s.num_heads, s.head_dim, s.input_grid, s.kernel, s.stride_q, s.stride_kv,
               s.q_grid, s.kv_grid)
        groups.setdefault(key, []).append(s.index)
    return [PoolShape(*key, blocks=tuple(blocks)) for key, blocks in groups.items()]


def pool_bytes(shape: PoolShape, batch: int, mode: str, itemsize: int) -> int:
    """Unavoidable HBM bytes of the pooling of q, k, v (see the module docstring)."""
    c = shape.heads * shape.head_dim
    inputs, outputs = 3 * shape.n * c, (shape.nq + 2 * shape.nkv) * c
    fwd = inputs + outputs
    bwd = 2 * inputs + outputs
    return batch * itemsize * (fwd if mode == "fwd" else fwd + bwd)


def _hbm_gbps(device: torch.device) -> float | None:
    """The device's spec-sheet HBM bandwidth (mvit_fast.report.DEVICE_PEAKS) in GB/s."""
    peaks = device_peaks(torch.cuda.get_device_name(device)) if device.type == "cuda" else None
    return peaks[1] / 1e9 if peaks else None


def _params():
    cases = []
    for suite, (cfg, needs_cuda) in SUITES.items():
        shapes = pool_shapes(cfg)
        if needs_cuda and not CUDA:
            marks = pytest.mark.skip(reason=f"{suite}: full-size shapes need a CUDA GPU")
        elif CUDA and not needs_cuda:
            marks = pytest.mark.skip(reason=f"{suite}: CPU smoke shapes; the GPU times the real ones")
        elif not needs_cuda:  # a smoke test of the suite, not a measurement: one short case
            marks = pytest.mark.benchmark(max_time=0.2, min_rounds=3)
            shapes = shapes[:1]
        else:
            marks = ()
        cases += [pytest.param((suite, s), id=f"{suite}-{s.id}", marks=marks) for s in shapes]
    return cases


def _skip_reason(provider: str, device: torch.device) -> str | None:
    if device.type == "cpu" and provider == "triton":
        return "Triton kernels need a CUDA GPU (the interpreter is for tests, not timing)"
    if device.type == "cpu" and provider == "compile":
        return "CPU smoke suite: times the eager provider only"
    return None


def _modules(shape: PoolShape, device: torch.device):
    """(pool_q, pool_k, pool_v), (norm_q, norm_k, norm_v) as MultiScaleAttention builds them
    (float32, the model's master weights)."""
    d = shape.head_dim
    pad = [k // 2 for k in shape.kernel]
    pools = [nn.Conv3d(d, d, shape.kernel, stride=s, padding=pad, groups=d, bias=False)
             for s in (shape.stride_q, shape.stride_kv, shape.stride_kv)]
    norms = [nn.LayerNorm(d, eps=1e-6) for _ in range(3)]
    return [m.to(device) for m in pools], [m.to(device) for m in norms]


@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("provider", ["eager", "compile", "triton"])
@pytest.mark.parametrize("pool_shape", _params())
def test_pool_qkv(benchmark, run_info, time_op, pool_shape, provider, mode, device, dtype, batch):
    suite, shape = pool_shape
    reason = _skip_reason(provider, device)
    if reason:
        pytest.skip(reason)
    torch.manual_seed(0)
    pools, norms = _modules(shape, device)
    c = shape.heads * shape.head_dim
    qkv = torch.randn(batch, shape.n, 3 * c, device=device, dtype=dtype)
    leaves = [qkv] + [p.weight for p in pools] + [m.weight for m in norms] + [m.bias for m in norms]
    for t in leaves:
        t.requires_grad_(mode == "fwd+bwd")
    thw = list(shape.input_grid)

    def eager():
        q, k, v = qkv.reshape(batch, shape.n, 3, shape.heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        with torch.autocast(device.type, dtype, enabled=dtype != torch.float32):
            return tuple(attention_pool(x, p, thw, True, m)[0] for x, p, m in zip((q, k, v), pools, norms))

    if provider == "triton":
        from mvit_fast.attention.fused_pool import fused_pool_qkv

        fn = lambda: fused_pool_qkv(qkv.view(batch, shape.n, 3, shape.heads, -1), thw, True,
                                    pools, norms)[:3]
    elif provider == "compile":
        torch._dynamo.reset()
        fn = torch.compile(eager, fullgraph=True)
    else:
        fn = eager
    outs = fn()
    grad_outs = [torch.randn_like(o) for o in outs]
    benchmark.group = f"pool {suite} {shape.id} {mode}"
    time_op(benchmark, fn, leaves, grad_outs, mode, device)

    info = benchmark.extra_info
    info.update(run_info)
    nbytes = pool_bytes(shape, batch, mode, qkv.element_size())
    info.update(kind="pool", provider=provider, mode=mode, suite=suite,
                dtype=str(dtype).removeprefix("torch."), batch=batch, heads=shape.heads,
                head_dim=shape.head_dim, input_grid=shape.input_grid, stride_q=shape.stride_q,
                stride_kv=shape.stride_kv, n=shape.n, nq=shape.nq, nkv=shape.nkv, blocks=shape.blocks,
                bytes=nbytes)
    if benchmark.stats:  # None or empty under --benchmark-disable
        gbps = nbytes / benchmark.stats.stats.median / 1e9
        peak = _hbm_gbps(device)
        # Calls run back to back on the same tensors: data that fits in L2 twice over may be
        # served from it, and its GB/s then measures no HBM traffic.
        l2 = run_info.get("l2_cache_bytes")
        info.update(gbps=gbps, hbm_gbps=peak, hbm_fraction=gbps / peak if peak else None,
                    fits_l2=bool(l2) and nbytes <= 2 * l2)
    if device.type == "cuda":
        info["peak_memory_mb"] = torch.cuda.max_memory_allocated() / 2**20
