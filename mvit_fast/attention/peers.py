"""Peer backends of `pooled_attention`: what people can build from stock PyTorch.

Each has the signature and semantics of `reference.eager_attention` (the arguments
of `pooled_attention`, all positional, `scale` resolved) and is differentiable by
autograd into q, k, v and the raw rel-pos tables:

- `sdpa_attention`: `F.scaled_dot_product_attention` with the (B, heads, Nq, Nk)
  bias materialized from the decomposed tables: what users do today.
- `flex_rel_pos_attention`: FlexAttention with a `score_mod` that gathers the
  per-query tables by each key's (t, h, w): no Nq x Nk tensor in memory.
- `sdpa_aug_attention`: the bias folded into the head dimension (DESIGN section 3),
  so bias-free SDPA (FlashAttention / cuDNN kernels) does all the work.

The per-query tables come from `reference.decomposed_rel_pos` in every backend.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention import flex_attention as _flex_module
from torch.nn.attention.flex_attention import flex_attention

from .reference import add_residual, decomposed_rel_pos, rel_pos_bias

__all__ = ["flex_rel_pos_attention", "sdpa_attention", "sdpa_aug_attention"]

Thw = tuple[int, int, int]


def _key_axis_index(k_thw: Thw, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """(t_j, h_j, w_j) of every non-cls key; keys are t-major. Made on `device`: no copies."""
    kt, kh, kw = k_thw
    j = torch.arange(kt * kh * kw, device=device)
    return j // (kh * kw), j // kw % kh, j % kw


def _present(tables):
    """[(axis, table)] for the tables that exist (axis 0, 1, 2 = t, h, w)."""
    return [(i, r) for i, r in enumerate(tables) if r is not None]


def sdpa_attention(q, k, v, q_thw, k_thw, rel_pos_t, rel_pos_h, rel_pos_w, has_cls, residual_pooling,
                   scale) -> Tensor:
    """SDPA with the materialized additive bias (B, heads, Nq, Nk); cls row and column unbiased."""
    rels = decomposed_rel_pos(q, q_thw, k_thw, rel_pos_t, rel_pos_h, rel_pos_w, has_cls)
    bias = rel_pos_bias(rels, k_thw, has_cls)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=scale)
    return add_residual(out, q, has_cls) if residual_pooling else out


def _augment(q, k, v, rels, k_thw, has_cls, scale, multiple: int = 8):
    """q_aug = [q*scale | rel_t | rel_h | rel_w], k_aug = [k | onehot(t_j) | onehot(h_j) | onehot(w_j)].

    q_aug . k_aug = scale * q.k + rel_t[i, t_j] + rel_h[i, h_j] + rel_w[i, w_j]: the
    decomposed bias as extra columns of the QK^T dot. The cls row and the cls key are
    zero in the extra columns, so they get no bias. All three are zero-padded to a
    common width that is a multiple of 8 (FlashAttention and cuDNN need d % 8 == 0,
    and equal q/k/v widths).
    """
    batch, heads, nk, _ = k.shape
    s = int(has_cls)
    present = _present(rels)
    if present:
        axis_index = _key_axis_index(k_thw, k.device)
        # comparison, not F.one_hot: its range check syncs the host on CUDA
        onehot = torch.cat([axis_index[i][:, None] == torch.arange(k_thw[i], device=k.device)
                            for i, _ in present], dim=-1)
        onehot = F.pad(onehot.to(k.dtype), (0, 0, s, 0))  # (Nk, K)
        q_extra = F.pad(torch.cat([r for _, r in present], dim=-1), (0, 0, s, 0))  # (B, h, Nq, K)
        q_aug = torch.cat([q * scale, q_extra], dim=-1)
        k_aug = torch.cat([k, onehot.expand(batch, heads, nk, -1)], dim=-1)
    else:
        q_aug, k_aug = q * scale, k
    width = -(-q_aug.shape[-1] // multiple) * multiple
    pad = lambda x: F.pad(x, (0, width - x.shape[-1])) if x.shape[-1] != width else x
    return pad(q_aug), pad(k_aug), pad(v)


def sdpa_aug_attention(q: Tensor, k: Tensor, v: Tensor, q_thw: Thw, k_thw: Thw, rel_pos_t: Tensor | None,
                       rel_pos_h: Tensor | None, rel_pos_w: Tensor | None, has_cls: bool,
                       residual_pooling: bool, scale: float) -> Tensor:
    """Bias folded into the head dim, then bias-free SDPA with scale=1 (see `_augment`).

    Autograd does the backward: the extra columns of dq_aug are d(rel_t|rel_h|rel_w),
    which flow on into q and the raw tables through `decomposed_rel_pos`. In bf16,
    q*scale is rounded once before the dot (the kernels would scale in fp32): within
    the bf16 tolerance, and exact in float64.
    """
    rels = decomposed_rel_pos(q, q_thw, k_thw, rel_pos_t, rel_pos_h, rel_pos_w, has_cls)
    q_aug, k_aug, v_aug = _augment(q, k, v, rels, k_thw, has_cls, scale)
    out = F.scaled_dot_product_attention(q_aug, k_aug, v_aug, scale=1.0)[..., : q.shape[-1]]
    return add_residual(out, q, has_cls) if residual_pooling else out


_compiled_flex: Callable[..., Tensor] | None = None
# torch 2.6's flex rejects head dims that are not powers of two through this helper;
# later versions dropped the check (and the helper) and round up inside the kernel.
_FLEX_POW2_HEAD_DIM_ONLY = hasattr(_flex_module, "_supported_head_dim")


def _flex_for(dtype: torch.dtype) -> Callable[..., Tensor]:
    """`torch.compile(flex_attention)`, compiled once on first use.

    Inductor has no float64 flex kernel; float64 (the test oracle's dtype) runs flex's
    own unfused path, which evaluates the same score_mod on materialized scores.

    Static shapes: one kernel per block shape, as fast as flex gets (and torch 2.13's
    CPU flex kernel with symbolic lengths fails to build: `cur_qSplitSize0` undeclared).
    MViT has up to 7 attention shapes per model, each with and without grad, which
    exceeds dynamo's default of 8 compiles per function; past that limit dynamo would
    quietly run flex's unfused path, so the limit is raised (a process-wide setting).
    """
    global _compiled_flex
    if dtype == torch.float64:
        return flex_attention
    if _compiled_flex is None:
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
        _compiled_flex = torch.compile(flex_attention, dynamic=False)
    return _compiled_flex


def flex_rel_pos_attention(q: Tensor, k: Tensor, v: Tensor, q_thw: Thw, k_thw: Thw, rel_pos_t: Tensor | None,
                           rel_pos_h: Tensor | None, rel_pos_w: Tensor | None, has_cls: bool,
                           residual_pooling: bool, scale: float) -> Tensor:
    """FlexAttention whose score_mod adds rel_t[b,h,i,t_j] + rel_h[b,h,i,h_j] + rel_w[b,h,i,w_j].

    Each axis' table is captured padded to (B, heads, Nq, K_axis + 1): row 0 (cls query)
    and the last column are zero, and the cls key's index points at that last column, so
    the score_mod has no branches. One tensor per axis, each indexed once: Inductor's flex
    backward (torch 2.11 on CUDA) rejects a score_mod that indexes one tensor needing
    gradients twice. Gradients into captured tensors (hence q and the tables) need
    torch >= 2.6; flex's backward is CUDA-only (NotImplementedError on CPU).

    Ragged sequence lengths need no padding (flex masks the last block). Head dims:
    recent torch handles 72 and 96 itself (rounding up inside the kernel), but torch
    2.6 rejects any non-power-of-two head dim, so there q, k, v are zero-padded to
    the next power of two (q.k unchanged; the scale is passed explicitly) and the
    output sliced back. Its CUDA kernels also need head_dim >= 16 (MViT: 72 and up).
    """
    rels = decomposed_rel_pos(q, q_thw, k_thw, rel_pos_t, rel_pos_h, rel_pos_w, has_cls)
    present = _present(rels)
    score_mod = None
    if present:
        s = int(has_cls)
        axis_index = _key_axis_index(k_thw, q.device)
        # (table, column of key j): key j -> its coordinate along the axis; cls key -> the zero column
        tables = [(F.pad(r, (0, 1, s, 0)), F.pad(axis_index[i], (s, 0), value=k_thw[i]).to(torch.int32))
                  for i, r in present]

        def score_mod(score, b, h, q_idx, kv_idx):
            for rel, col in tables:
                score = score + rel[b, h, q_idx, col[kv_idx]]
            return score

    dim = q.shape[-1]
    width = 1 << (dim - 1).bit_length() if _FLEX_POW2_HEAD_DIM_ONLY else dim
    pad = (lambda x: F.pad(x, (0, width - dim))) if width != dim else (lambda x: x)
    out = _flex_for(q.dtype)(pad(q), pad(k), pad(v), score_mod=score_mod, scale=scale)[..., :dim]
    return add_residual(out, q, has_cls) if residual_pooling else out
