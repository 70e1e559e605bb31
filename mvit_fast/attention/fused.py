"""The `triton` backend of `pooled_attention`: torch.library ops + autograd over the fused kernels.

Split of the work:
- `decomposed_rel_pos` (plain torch, in float32) turns q and the raw rel-pos parameters
  into the per-query tables rel_t | rel_h | rel_w: (B, heads, Nq - cls, Kt + Kh + Kw),
  tiny next to q. Its autograd carries the table gradients back to q and to the
  rel-pos parameters (interpolation included).
- `mvit_fast::pooled_attention_fwd` / `_bwd` (this file) run the Triton kernels of
  `mvit_fast.kernels.pooled_attention`: scores, bias from the tables, softmax, P @ V and
  the residual, forward and backward, never an Nq x Nk tensor.

The ops are `torch.library.triton_op`s launching through `wrap_triton`, so
`torch.compile(fullgraph=True)` sees the kernels without a graph break; on a torch
without `triton_op` they fall back to opaque `custom_op`s (still no graph break).
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import nullcontext

import torch
from torch import Tensor

from mvit_fast.kernels.pooled_attention import (
    INTERPRETED,
    MAX_BATCH_HEADS,
    MAX_GRID_AXIS,
    MAX_HEAD_DIM,
    attention_backward,
    attention_forward,
)

from .reference import decomposed_rel_pos

__all__ = ["triton_attention", "triton_takes"]

_HAS_TRITON_OP = hasattr(torch.library, "triton_op") and hasattr(torch.library, "wrap_triton")


def _wrap(kernel):
    """Route a launch through wrap_triton so tracing sees the kernel.

    Under TRITON_INTERPRET=1 (CPU tests) the launch is direct: the interpreter's kernels
    are InterpretedFunction objects that wrap_triton only passes through on torch >= 2.13
    (older versions raise), and they run on CPU tensors, which the traced HOP path is not
    meant for. torch.compile of this op is therefore a CUDA-only feature.
    """
    if not _HAS_TRITON_OP or INTERPRETED:
        return kernel
    return torch.library.wrap_triton(kernel)


def _op(name: str):
    if _HAS_TRITON_OP:
        return torch.library.triton_op(name, mutates_args=())
    return torch.library.custom_op(name, mutates_args=())


@_op("mvit_fast::pooled_attention_fwd")
def _fwd(q: Tensor, k: Tensor, v: Tensor, rel: Tensor, k_grid: list[int], rel_axes: list[bool],
         has_cls: bool, residual: bool, scale: float) -> tuple[Tensor, Tensor]:
    return attention_forward(q, k, v, rel, k_grid, rel_axes, has_cls, residual, scale, wrap=_wrap)


@_op("mvit_fast::pooled_attention_bwd")
def _bwd(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, rel: Tensor, out: Tensor, lse: Tensor,
         k_grid: list[int], rel_axes: list[bool], has_cls: bool, residual: bool,
         scale: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Gradients (dq, dk, dv, drel) from dout and the forward's saved inputs, out and LSE
    (out gives the softmax delta, as in FlashAttention: `attention_backward`)."""
    return attention_backward(dout, q, k, v, rel, out, lse, k_grid, rel_axes, has_cls, residual,
                              scale, wrap=_wrap)


# Shape functions: outputs are freshly allocated and contiguous, as the launchers make them.
@_fwd.register_fake
def _fwd_fake(q, k, v, rel, k_grid, rel_axes, has_cls, residual, scale):
    return torch.empty_like(q, memory_format=torch.contiguous_format), \
        q.new_empty(q.shape[:3], dtype=torch.float32)


@_bwd.register_fake
def _bwd_fake(dout, q, k, v, rel, out, lse, k_grid, rel_axes, has_cls, residual, scale):
    return (torch.empty_like(q, memory_format=torch.contiguous_format),
            torch.empty_like(k, memory_format=torch.contiguous_format),
            torch.empty_like(v, memory_format=torch.contiguous_format),
            rel.new_empty(rel.shape, dtype=torch.float32))


def _setup_context(ctx, inputs, output) -> None:
    q, k, v, rel, k_grid, rel_axes, has_cls, residual, scale = inputs
    out, lse = output
    # out (one Nq x d tensor in q's dtype) is saved for the backward's softmax delta.
    ctx.save_for_backward(q, k, v, rel, out, lse)
    ctx.args = (k_grid, rel_axes, has_cls, residual, scale)


def _backward(ctx, dout: Tensor, _dlse: Tensor | None):
    q, k, v, rel, out, lse = ctx.saved_tensors
    dq, dk, dv, drel = _bwd(dout, q, k, v, rel, out, lse, *ctx.args)
    return dq, dk, dv, drel.to(rel.dtype), None, None, None, None, None


_fwd.register_autograd(_backward, setup_context=_setup_context)


def triton_takes(q: Tensor, k_thw: Sequence[int], rel_tables: Sequence[Tensor | None]) -> bool:
    """Whether the kernels take these inputs (what `backend="auto"` may choose from): a
    float32/16/bf16 q (float64 never, autocast or not), head_dim <= MAX_HEAD_DIM, batch x
    heads <= MAX_BATCH_HEADS (CUDA's grid limit), and each key-grid axis with a rel-pos table
    at most MAX_GRID_AXIS long."""
    return (q.dtype in (torch.float32, torch.float16, torch.bfloat16) and q.shape[-1] <= MAX_HEAD_DIM
            and q.shape[0] * q.shape[1] <= MAX_BATCH_HEADS
            and all(n <= MAX_GRID_AXIS for n, t in zip(k_thw, rel_tables) if t is not None))


def triton_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    q_thw: Sequence[int],
    k_thw: Sequence[int],
    rel_pos_t: Tensor | None,
    rel_pos_h: Tensor | None,
    rel_pos_w: Tensor | None,
    has_cls: bool,
    residual_pooling: bool,
    scale: float,
) -> Tensor:
    """Fused Triton pooling attention; signature and result of `reference.eager_attention`.

    Args:
        q: (B, heads, Nq, d) pooled, normed queries (float32/float16/bfloat16, CUDA, or CPU
            under TRITON_INTERPRET=1); k, v: (B, heads, Nk, d). Any strides.
        q_thw, k_thw: token grids, Nq = has_cls + prod(q_thw), Nk = has_cls + prod(k_thw).
        rel_pos_t, rel_pos_h, rel_pos_w: raw (L, d) rel-pos tables or None (axis off).
        has_cls: token 0 is cls: no bias on its row/column, no residual on its row.
        residual_pooling: out[non-cls rows] += q (unscaled).
        scale: multiplies q . k; the bias uses the unscaled q.

    Returns:
        (B, heads, Nq, d) in q's dtype, contiguous. Under autocast an fp32 q runs in the
        autocast dtype and the result has the eager ops' dtype: fp32 with the residual
        (q is added in fp32), else the autocast dtype.
    """
    out_dtype = q.dtype
    autocast = q.device.type in ("cuda", "cpu") and torch.is_autocast_enabled(q.device.type)
    if autocast and q.dtype == torch.float32:
        # Like SDPA under autocast: the matmuls run in the autocast dtype. Pooled q, k, v
        # leave LayerNorm in fp32 under autocast, which would otherwise pick the fp32 kernel.
        # (autocast leaves float64 alone: the kernels refuse it, as outside autocast)
        dtype = torch.get_autocast_dtype(q.device.type)
        q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
        # The eager ops' result type: P @ V in the autocast dtype, plus the fp32 residual q.
        out_dtype = torch.float32 if residual_pooling else dtype
    # The per-query tables in float32 whatever q's dtype (and autocast, which would run the
    # einsum in bf16): they are small, and the kernel adds them in ~fp32 precision (hi/lo
    # split), so the bias and the tables' gradients are not rounded to bf16.
    with torch.autocast(q.device.type, enabled=False) if autocast else nullcontext():
        tables = decomposed_rel_pos(q.float(), q_thw, k_thw, rel_pos_t, rel_pos_h, rel_pos_w, has_cls)
    present = [t for t in tables if t is not None]
    batch, heads, nq, _ = q.shape
    if present:
        rel = torch.cat(present, dim=-1) if len(present) > 1 else present[0]
    else:
        rel = q.new_empty((batch, heads, nq - int(has_cls), 0), dtype=torch.float32)
    out, _ = _fwd(q, k, v, rel, [int(x) for x in k_thw], [t is not None for t in tables],
                  bool(has_cls), bool(residual_pooling), float(scale))
    return out.to(out_dtype)
