"""The reference pooling attention: decomposed rel-pos tables and the materialized op.

Plain PyTorch in the input's dtype; in float64 it is the oracle for every backend.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["add_residual", "decomposed_rel_pos", "eager_attention", "rel_pos_bias", "rel_pos_index",
           "resize_rel_pos"]


def rel_pos_index(q_size: int, k_size: int, device: torch.device | None = None) -> Tensor:
    """Index into a rel-pos table of length 2*max(q_size, k_size)-1 for each (query, key).

    The coarser axis is stretched by the size ratio, which need not be an integer
    (MViTv2-L at 312: 78 queries over 10 keys). The arithmetic is SlowFast's, in
    float32 with truncation by `.long()`, so the indices match bit for bit.
    """
    q_ratio = max(k_size / q_size, 1.0)
    k_ratio = max(q_size / k_size, 1.0)
    dist = (torch.arange(q_size, device=device)[:, None] * q_ratio
            - torch.arange(k_size, device=device)[None, :] * k_ratio)
    dist += (k_size - 1) * k_ratio
    return dist.long()


def resize_rel_pos(table: Tensor, length: int) -> Tensor:
    """Linearly interpolate a (L, d) rel-pos table to (length, d); as-is when L == length."""
    if table.shape[0] == length:
        return table
    resized = F.interpolate(table.t().unsqueeze(0), size=length, mode="linear")
    return resized.squeeze(0).t()


def decomposed_rel_pos(
    q: Tensor,
    q_thw: Sequence[int],
    k_thw: Sequence[int],
    rel_pos_t: Tensor | None,
    rel_pos_h: Tensor | None,
    rel_pos_w: Tensor | None,
    has_cls: bool = True,
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """Per-query bias tables (rel_t, rel_h, rel_w), each (B, heads, Nq - cls, K_axis).

    rel_h[b, n, i, kh] = q_i . Rh[dist_h(h_i, kh)] with the UNSCALED q; the bias of
    score (i, j) is rel_t[i, t_j] + rel_h[i, h_j] + rel_w[i, w_j]. These tables are
    all a fused kernel needs: never an Nq x Nk tensor.
    """
    batch, heads, _, dim = q.shape
    qt, qh, qw = q_thw
    r_q = q[:, :, int(has_cls):].reshape(batch, heads, qt, qh, qw, dim)
    out: list[Tensor | None] = []
    for table, q_size, k_size, eq in (
        (rel_pos_t, qt, k_thw[0], "bntyxc,tkc->bntyxk"),
        (rel_pos_h, qh, k_thw[1], "bntyxc,ykc->bntyxk"),
        (rel_pos_w, qw, k_thw[2], "bntyxc,xkc->bntyxk"),
    ):
        if table is None:
            out.append(None)
            continue
        table = resize_rel_pos(table, 2 * max(q_size, k_size) - 1)
        rel = table[rel_pos_index(q_size, k_size, q.device)].to(q.dtype)  # (q_size, k_size, d)
        out.append(torch.einsum(eq, r_q, rel).reshape(batch, heads, qt * qh * qw, k_size))
    return out[0], out[1], out[2]


def rel_pos_bias(
    rels: tuple[Tensor | None, Tensor | None, Tensor | None],
    k_thw: Sequence[int],
    has_cls: bool,
) -> Tensor | None:
    """The (B, heads, Nq, Nk) additive bias from `decomposed_rel_pos`'s tables, or None.

    bias[i, j] = rel_t[i, t_j] + rel_h[i, h_j] + rel_w[i, w_j] (keys t-major); the cls
    row and column are zero. This is the Nq x Nk tensor the fused backends never build.
    """
    kt, kh, kw = k_thw
    terms = [r for r in (
        rels[0][..., :, None, None] if rels[0] is not None else None,
        rels[1][..., None, :, None] if rels[1] is not None else None,
        rels[2][..., None, None, :] if rels[2] is not None else None,
    ) if r is not None]
    if not terms:
        return None
    bias = sum(terms[1:], terms[0]).expand(*terms[0].shape[:3], kt, kh, kw)
    s = int(has_cls)
    return F.pad(bias.reshape(*bias.shape[:3], kt * kh * kw), (s, 0, s, 0))


def add_residual(out: Tensor, q: Tensor, has_cls: bool) -> Tensor:
    """Residual pooling: out + the pooled, unscaled q, the cls row excluded."""
    return out + (F.pad(q[:, :, 1:], (0, 0, 1, 0)) if has_cls else q)


def eager_attention(
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
    """The materialized reference of `pooled_attention` (arguments as there), in q's dtype.

    softmax((q * scale) k^T + bias) v, plus q on the non-cls rows when residual_pooling.
    Every backend implements this signature and is tested against it in float64.
    """
    attn = (q * scale) @ k.transpose(-2, -1)
    rels = decomposed_rel_pos(q, q_thw, k_thw, rel_pos_t, rel_pos_h, rel_pos_w, has_cls)
    bias = rel_pos_bias(rels, k_thw, has_cls)
    if bias is not None:
        attn = attn + bias
    out = attn.softmax(dim=-1) @ v
    return add_residual(out, q, has_cls) if residual_pooling else out
