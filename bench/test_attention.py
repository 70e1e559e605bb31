"""`pooled_attention` at every distinct MViTv2-S/B block shape, per backend, fwd and fwd+bwd.

    pytest bench --benchmark-only                       # all suites the device can run
    pytest bench --benchmark-only -k "S16x224 and flex"  # one suite, one backend

Each case makes its inputs once, runs the op twice untimed (compilation, autotuning,
allocator warm-up), then times the GPU's work per call (CUDA-graph replays on a GPU:
bench/conftest.py `_time_op`). Backends missing from
`BACKENDS` or unable to run on this device are skipped with the reason.

The Triton kernels have two head-dim layouts, padded and split (see
`mvit_fast.kernels.pooled_attention.head_dim_split`). "triton" lets the autotuner time
both per shape and records the configs it chose (extra_info "triton_configs", and
"head_dim_layout" per pass); "triton_pad" and "triton_split" pin one layout each
(MVIT_FAST_TRITON_SPLIT_D), each autotuned over its full tile space, to time them side
by side:

    pytest bench --benchmark-only -k "S16x224 and triton"

Where few key blocks face many queries the backward's dkdv pass splits the queries into
chunks (`dkdv_chunks`, recorded as Q_CHUNKS in "triton_configs"); "triton_unchunked" times
the same shapes with chunking off (MVIT_FAST_TRITON_DKDV_CHUNKS=1), forward+backward only.
"""

from __future__ import annotations

import pytest
import torch
from mvit_fast.kernels.pooled_attention import dkdv_chunks, head_dim_split, launch_configs

from mvit_fast.attention import BACKENDS, pooled_attention

# Triton variants: benchmark name -> the environment it pins (none: the launchers choose).
TRITON_VARIANTS = {"triton": {}, "triton_pad": {"MVIT_FAST_TRITON_SPLIT_D": "0"},
                   "triton_split": {"MVIT_FAST_TRITON_SPLIT_D": "1"},
                   "triton_unchunked": {"MVIT_FAST_TRITON_DKDV_CHUNKS": "1"}}


def _skip_reason(backend: str, mode: str, device: torch.device) -> str | None:
    """Why `backend` cannot be timed here, or None; checked before any work is done."""
    if backend not in BACKENDS:
        return f"backend {backend!r} is not registered in BACKENDS"
    if device.type == "cpu" and backend == "triton":
        return "Triton kernels need a CUDA GPU (the interpreter is for tests, not timing)"
    if device.type == "cpu" and backend == "flex" and mode == "fwd+bwd":
        return "FlexAttention has no CPU backward (NotImplementedError)"
    return None


def _inputs(shape, batch: int, dtype: torch.dtype, device: torch.device, requires_grad: bool):
    """Unit-variance q, k, v (they come out of a LayerNorm) and std-0.02 tables (the init)."""
    gen = torch.Generator(device).manual_seed(0)
    make = lambda *size, std=1.0: (torch.randn(*size, generator=gen, device=device) * std).to(dtype)
    q = make(batch, shape.heads, shape.nq, shape.head_dim)
    k = make(batch, shape.heads, shape.nk, shape.head_dim)
    v = make(batch, shape.heads, shape.nk, shape.head_dim)
    tables = [make(n, shape.head_dim, std=0.02)
              for n in (shape.rel_pos_t_len, shape.rel_pos_hw_len, shape.rel_pos_hw_len)]
    leaves = [q, k, v, *tables]
    for t in leaves:
        t.requires_grad_(requires_grad)
    return leaves


def _variant_skip_reason(backend: str, mode: str, shape, batch: int, device: torch.device) -> str | None:
    """Why a pinned Triton variant would time nothing that "triton" does not, or None."""
    if backend in ("triton_pad", "triton_split") and head_dim_split(shape.head_dim) is None:
        return f"head_dim {shape.head_dim} has one layout only (it does not split): see 'triton'"
    if backend == "triton_unchunked":
        if mode == "fwd":
            return "query chunks split the backward's dkdv pass only: see 'triton'"
        sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 0
        if dkdv_chunks(shape.nq, shape.nk, batch * shape.heads, sms) == 1:
            return "the dkdv pass runs unchunked at this shape: see 'triton'"
    return None


@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("backend", ["eager", "sdpa", "flex", "sdpa_aug", *TRITON_VARIANTS])
def test_pooled_attention(benchmark, record, time_op, attention_shape, backend, mode, device, dtype,
                          batch, monkeypatch):
    suite, shape = attention_shape
    op_backend = "triton" if backend in TRITON_VARIANTS else backend
    reason = (_skip_reason(op_backend, mode, device)
              or _variant_skip_reason(backend, mode, shape, batch, device))
    if reason:
        pytest.skip(reason)
    for name, value in TRITON_VARIANTS.get(backend, {}).items():
        monkeypatch.setenv(name, value)
    torch.manual_seed(0)
    leaves = _inputs(shape, batch, dtype, device, requires_grad=mode == "fwd+bwd")
    q, k, v, rel_t, rel_h, rel_w = leaves
    grad_out = torch.randn_like(q)

    def fwd():
        return pooled_attention(q, k, v, shape.q_grid, shape.kv_grid, rel_t, rel_h, rel_w,
                                has_cls=True, residual_pooling=True, backend=op_backend)

    benchmark.group = f"{suite} {shape.id} {mode}"
    time_op(benchmark, fwd, leaves, grad_out, mode, device)
    record(benchmark, backend=backend, mode=mode, suite=suite, shape=shape)
    if op_backend == "triton":
        # The configs the timed calls ran (the autotuner's best_config per pass).
        passes = ("fwd",) if mode == "fwd" else ("fwd", "dq", "dkdv")
        configs = {name: cfg for name, cfg in launch_configs().items() if name in passes}
        benchmark.extra_info["triton_configs"] = configs
        benchmark.extra_info["head_dim_layout"] = {
            name: None if cfg is None else ("split" if cfg.get("SPLIT_D") else "pad")
            for name, cfg in configs.items()}
