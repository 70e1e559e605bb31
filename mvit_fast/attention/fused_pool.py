"""The fused pooling of the `triton` backend: torch.library ops + autograd over `kernels.pool_norm`.

`fused_pool_qkv` replaces the three `attention_pool` calls of `MultiScaleAttention`
(conv mode, LayerNorm norms, fused qkv projection): it takes the projection output
viewed as (B, N, 3, heads, d) and returns pooled, normed q, k, v as (B, heads, N', d)
contiguous tensors, the layout the attention kernel reads.

- `mvit_fast::pool_norm_fwd`: one `pool_norm_forward` launch per member (q, k, v).
- `mvit_fast::pool_norm_bwd`: per member, the dz pass and the dx gather, the latter
  writing straight into its slice of one (B, N, 3, heads, d) gradient: no zero fill, no
  slice-scatter, no sum of three full-size gradients.

Both are `torch.library.triton_op`s launching through `wrap_triton` (custom ops on a
torch without it), with fake implementations, so `torch.compile(fullgraph=True)` traces
them without a graph break; under TRITON_INTERPRET=1 (CPU tests) launches are direct.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
from torch import Tensor

from mvit_fast.kernels.pool_norm import (
    INTERPRETED,
    MAX_BATCH_HEADS,
    MAX_HEAD_DIM,
    pool_norm_backward,
    pool_norm_forward,
    pooled_size,
)

from .fused import _op, _wrap

__all__ = ["can_fuse_pool", "fused_pool_qkv", "pool_norm_qkv"]


@_op("mvit_fast::pool_norm_fwd")
def _fwd(qkv: Tensor, weights: list[Tensor], norm_weights: list[Tensor], norm_biases: list[Tensor],
         thw: list[int], strides: list[int], has_cls: bool, eps: float) -> tuple[Tensor, Tensor, Tensor]:
    q, k, v = (pool_norm_forward(qkv, i, weights[i], norm_weights[i], norm_biases[i], thw,
                                 strides[3 * i:3 * i + 3], has_cls, eps, wrap=_wrap)
               for i in range(3))
    return q, k, v


@_op("mvit_fast::pool_norm_bwd")
def _bwd(grads: list[Tensor], qkv: Tensor, weights: list[Tensor], norm_weights: list[Tensor],
         thw: list[int], strides: list[int], has_cls: bool, eps: float) -> list[Tensor]:
    """[dqkv, dw_q, dw_k, dw_v, dgamma_q, dgamma_k, dgamma_v, dbeta_q, dbeta_k, dbeta_v]."""
    # Every element is written: each member's dx pass fills its slice (the kernels take the
    # whole tensor and a member index, so no view is handed to a kernel).
    dqkv = torch.empty(qkv.shape, device=qkv.device, dtype=qkv.dtype)
    dws, dgs, dbs = [], [], []
    for i in range(3):
        _, dw, dg, db = pool_norm_backward(grads[i], qkv, i, weights[i], norm_weights[i], thw,
                                           strides[3 * i:3 * i + 3], has_cls, eps, dqkv, wrap=_wrap)
        dws.append(dw)
        dgs.append(dg)
        dbs.append(db)
    return [dqkv, *dws, *dgs, *dbs]


def _out_shape(qkv: Tensor, weight: Tensor, thw: Sequence[int], stride: Sequence[int],
               has_cls: bool) -> tuple[int, int, int, int]:
    batch, _, _, heads, d = qkv.shape
    n = 1
    for size, k, s in zip(thw, weight.shape[2:], stride):
        n *= pooled_size(int(size), int(k), int(s))
    return batch, heads, int(has_cls) + n, d


# Shape functions: outputs are freshly allocated and contiguous, as the launchers make them.
@_fwd.register_fake
def _fwd_fake(qkv, weights, norm_weights, norm_biases, thw, strides, has_cls, eps):
    return tuple(qkv.new_empty(_out_shape(qkv, weights[i], thw, strides[3 * i:3 * i + 3], has_cls))
                 for i in range(3))


@_bwd.register_fake
def _bwd_fake(grads, qkv, weights, norm_weights, thw, strides, has_cls, eps):
    return [qkv.new_empty(qkv.shape), *(w.new_empty(w.shape) for w in weights),
            *(g.new_empty(g.shape) for g in norm_weights), *(g.new_empty(g.shape) for g in norm_weights)]


def _setup_context(ctx, inputs, output) -> None:
    qkv, weights, norm_weights, norm_biases, thw, strides, has_cls, eps = inputs
    ctx.save_for_backward(qkv, *weights, *norm_weights)
    ctx.bias_dtypes = [b.dtype for b in norm_biases]
    ctx.args = (thw, strides, has_cls, eps)


def _backward(ctx, dq: Tensor | None, dk: Tensor | None, dv: Tensor | None):
    qkv, *params = ctx.saved_tensors
    weights, norm_weights = params[:3], params[3:]
    thw, strides, has_cls, _ = ctx.args
    # custom ops hand in zeros for unused outputs; None is handled anyway (other tracers).
    grads = [qkv.new_zeros(_out_shape(qkv, weights[i], thw, strides[3 * i:3 * i + 3], has_cls))
             if g is None else g for i, g in enumerate((dq, dk, dv))]
    dqkv, *rest = _bwd(grads, qkv, list(weights), list(norm_weights), *ctx.args)
    dbs = [db.to(dtype) for db, dtype in zip(rest[6:], ctx.bias_dtypes)]
    return dqkv, rest[:3], rest[3:6], dbs, None, None, None, None


_fwd.register_autograd(_backward, setup_context=_setup_context)


def pool_norm_qkv(
    qkv: Tensor,
    thw: Sequence[int],
    weights: Sequence[Tensor],
    strides: Sequence[Sequence[int]],
    norm_weights: Sequence[Tensor],
    norm_biases: Sequence[Tensor],
    *,
    has_cls: bool = True,
    eps: float = 1e-6,
) -> tuple[Tensor, Tensor, Tensor]:
    """Pool and norm q, k, v straight from the qkv projection (MViTv2 attention, step 2).

    Args:
        qkv: (B, N, 3, heads, d) projection output (`qkv(x).reshape(B, N, 3, heads, d)`),
            N = has_cls + T*H*W; float32/float16/bfloat16 on CUDA (or CPU under
            TRITON_INTERPRET=1); any strides.
        thw: the input token grid (T, H, W), t-major.
        weights: the three depthwise conv weights (d, 1, kt, kh, kw), kernel sizes 1 or 3,
            padding kernel // 2, no bias; any float dtype.
        strides: the three conv strides, e.g. (stride_q, stride_kv, stride_kv).
        norm_weights, norm_biases: the three LayerNorm(d) affine parameters.
        has_cls: token 0 is cls: not pooled, normed with the rest.
        eps: LayerNorm epsilon (shared by the three norms).

    Returns:
        q, k, v: (B, heads, N'_i, d) contiguous in qkv's dtype, cls first.
    """
    if qkv.ndim != 5 or qkv.shape[2] != 3:
        raise ValueError(f"qkv must be (B, N, 3, heads, head_dim), got {tuple(qkv.shape)}")
    if not (len(weights) == len(strides) == len(norm_weights) == len(norm_biases) == 3):
        raise ValueError("weights, strides, norm_weights and norm_biases need one entry per q, k, v")
    flat_strides = [int(s) for stride in strides for s in stride]
    if len(flat_strides) != 9:
        raise ValueError(f"each stride must be (sT, sH, sW), got {[tuple(s) for s in strides]}")
    return _fwd(qkv, list(weights), list(norm_weights), list(norm_biases), [int(n) for n in thw],
                flat_strides, bool(has_cls), float(eps))


def can_fuse_pool(pools: Sequence[nn.Module | None], norms: Sequence[nn.Module | None],
                  x: Tensor) -> bool:
    """Whether `fused_pool_qkv` computes these three (pool, norm) pairs on x's device and dtype.

    Conv pooling (depthwise, no bias, kernel sizes 1 or 3 with padding k // 2, head_dim up
    to 256) followed by an affine LayerNorm with one shared eps, on CUDA or under the Triton
    interpreter. Anything else keeps the plain ops.
    """
    if not (x.is_cuda or (INTERPRETED and x.device.type == "cpu")):
        return False
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        return False
    if x.ndim != 5 or x.shape[0] * x.shape[3] > MAX_BATCH_HEADS:  # (B, N, 3, heads, d)
        return False
    eps = set()
    for pool, norm in zip(pools, norms):
        if not isinstance(pool, nn.Conv3d) or not isinstance(norm, nn.LayerNorm):
            return False
        d = pool.in_channels
        if (d > MAX_HEAD_DIM or pool.bias is not None or pool.groups != d or pool.out_channels != d
                or any(k not in (1, 3) for k in pool.kernel_size)
                or tuple(pool.padding) != tuple(k // 2 for k in pool.kernel_size)
                or tuple(pool.dilation) != (1, 1, 1) or pool.padding_mode != "zeros"):
            return False
        if norm.weight is None or norm.bias is None or tuple(norm.normalized_shape) != (d,):
            return False
        eps.add(norm.eps)
    return len(eps) == 1


def fused_pool_qkv(
    qkv: Tensor, thw: Sequence[int], has_cls: bool, pools: Sequence[nn.Conv3d],
    norms: Sequence[nn.LayerNorm],
) -> tuple[Tensor, Tensor, Tensor, list[int], list[int]]:
    """`attention_pool` of q, k and v in one op: (q, k, v, q_thw, kv_thw).

    qkv is the projection output viewed as (B, N, 3, heads, d); pools and norms are the
    (pool_q, pool_k, pool_v) convs and (norm_q, norm_k, norm_v) LayerNorms of a
    `MultiScaleAttention` for which `can_fuse_pool` holds. k and v share the kv grid
    (k's grid is returned).
    """
    q, k, v = pool_norm_qkv(qkv, thw, [p.weight for p in pools], [p.stride for p in pools],
                            [n.weight for n in norms], [n.bias for n in norms],
                            has_cls=has_cls, eps=norms[0].eps)
    grids = [[pooled_size(int(n), kk, s) for n, kk, s in zip(thw, p.kernel_size, p.stride)]
             for p in pools[:2]]
    return q, k, v, grids[0], grids[1]
