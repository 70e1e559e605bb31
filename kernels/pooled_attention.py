"""Fused MViTv2 pooling attention: scores, decomposed rel-pos bias, softmax, P @ V, residual.

Support contract (what differs from Triton's fused-attention tutorial 06):
- Non-causal, Nq != Nk, any lengths (odd, 1), masks compiled in only where needed.
- head_dim up to 256, padded to the next power of two (MViT uses 96, 72, 144).
- The decomposed rel-pos bias (DESIGN.md section 3, step 4) is added inside the tile
  from per-query tables: never an Nq x Nk tensor, forward or backward.
- An optional cls token (query 0 and key 0 get no bias; row 0 gets no residual) and
  residual pooling (out += q, unscaled) in the epilogue.
- fp32 / fp16 / bf16 inputs, fp32 accumulation; fp32 dots run in "ieee" (no tf32).
- Deterministic: each output element is written by exactly one program, no atomics.

Layout of the bias tables: `rel` is (B, heads, Nq - cls, Kt' + Kh' + Kw') float32, the
per-query tables rel_t | rel_h | rel_w concatenated along the last axis (an axis whose
table is absent contributes no columns). The bias of score (i, j), i and j counted
after the cls token, is rel[i, t_j] + rel[i, off_h + h_j] + rel[i, off_w + w_j] with
keys t-major: j = (t_j * Kh + h_j) * Kw + w_j.

How the bias is applied: as a matrix product, rel_tile (BLOCK_M x PAD) @ onehot
(PAD x BLOCK_N), with onehot[c, j] = (coord_j == c), one small dot per axis. It rides
the tensor cores, and the same one-hot gives the backward table gradient as
dS (BLOCK_M x BLOCK_N) @ onehot^T, summing dS over the keys that share a coordinate,
in registers. For low-precision inputs the fp32 table is split into hi + lo parts in
the input dtype (two dots, ~16 mantissa bits), so the bias is not rounded to bf16.
The alternative, to be measured on a GPU: gather rel[i, t_j] per tile element with
`tl.load(R + rows[:, None] * stride + t_j[None, :])` (3 cached loads per score, exact
in fp32, no PAD limit on the grid size); it costs L1 bandwidth instead of MMA slots.

Passes (launchers at the bottom; `wrap` lets the caller route launches through
`torch.library.wrap_triton`):
- `attention_forward`: `_attn_fwd`, one program per (query block, batch*head).
- `attention_backward`: `_attn_bwd_dq` (dq, the table gradients and the exact softmax
  delta, per query block), then `_attn_bwd_dkdv` (dk, dv, per key block).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import torch
import triton
import triton.language as tl

from ._launch import is_interpreted, pinned_config

__all__ = ["INTERPRETED", "MAX_GRID_AXIS", "MAX_HEAD_DIM", "attention_backward", "attention_forward"]

MAX_HEAD_DIM = 256
# The one-hot bias dot keeps a (BLOCK_M x next_pow2(K_axis)) table tile in registers.
MAX_GRID_AXIS = 256
LOG2E = 1.4426950408889634  # 1 / ln 2: softmax runs in base 2 (exp2 is one MUFU op)


# ---------------------------------------------------------------------------------------
# Shared pieces
# ---------------------------------------------------------------------------------------


@triton.jit
def _load_rel(R, stride_rm, stride_rk, rows, row_ok, col_off, n_cols, PAD: tl.constexpr):
    """(rows, PAD) fp32 tile of one axis' table, zero outside rows/columns, times log2(e)."""
    cols = tl.arange(0, PAD)
    ptrs = R + rows[:, None] * stride_rm + (col_off + cols)[None, :] * stride_rk
    tile = tl.load(ptrs, mask=row_ok[:, None] & (cols < n_cols)[None, :], other=0.0)
    return tile.to(tl.float32) * 1.4426950408889634


@triton.jit
def _split(x, DTYPE: tl.constexpr, IS_FP32: tl.constexpr):
    """fp32 x -> (hi, lo) with hi + lo == x to ~16 bits, both in the dot dtype (fp32: x, x)."""
    if IS_FP32:
        return x, x
    hi = x.to(DTYPE)
    lo = (x - hi.to(tl.float32)).to(DTYPE)
    return hi, lo


@triton.jit
def _bias_dot(acc, rel_hi, rel_lo, coord, key_ok, PAD: tl.constexpr, IS_FP32: tl.constexpr):
    """acc += rel @ onehot(coord): adds rel[i, coord_j] to acc[i, j] for keys with key_ok."""
    onehot = (tl.arange(0, PAD)[:, None] == coord[None, :]) & key_ok[None, :]
    onehot = onehot.to(rel_hi.dtype)
    if IS_FP32:
        acc = tl.dot(rel_hi, onehot, acc, input_precision="ieee")
    else:
        acc = tl.dot(rel_hi, onehot, acc)
        acc = tl.dot(rel_lo, onehot, acc)
    return acc


@triton.jit
def _onehot_reduce(acc, ds_hi, ds_lo, coord, key_ok, PAD: tl.constexpr, IS_FP32: tl.constexpr):
    """acc[i, c] += sum over keys j with coord_j == c of dS[i, j]: dS @ onehot^T."""
    onehot_t = (coord[:, None] == tl.arange(0, PAD)[None, :]) & key_ok[:, None]
    onehot_t = onehot_t.to(ds_hi.dtype)
    if IS_FP32:
        acc = tl.dot(ds_hi, onehot_t, acc, input_precision="ieee")
    else:
        acc = tl.dot(ds_hi, onehot_t, acc)
        acc = tl.dot(ds_lo, onehot_t, acc)
    return acc


@triton.jit
def _key_coords(offs_n, Nk, Kh, Kw, HAS_CLS: tl.constexpr):
    """(t_j, h_j, w_j) of t-major keys and whether key j gets a bias (not cls, in range)."""
    key_ok = (offs_n >= HAS_CLS) & (offs_n < Nk)
    j = tl.maximum(offs_n - HAS_CLS, 0)
    return j // (Kh * Kw), (j // Kw) % Kh, j % Kw, key_ok


@triton.jit
def _scores(q, k_t, offs_n, Nk, Kh, Kw, qk_scale,
            rt_hi, rt_lo, rh_hi, rh_lo, rw_hi, rw_lo,
            HAS_CLS: tl.constexpr, HAS_REL_T: tl.constexpr, HAS_REL_H: tl.constexpr,
            HAS_REL_W: tl.constexpr, PAD_T: tl.constexpr, PAD_H: tl.constexpr, PAD_W: tl.constexpr,
            IS_FP32: tl.constexpr, PRECISION: tl.constexpr, EVEN_N: tl.constexpr):
    """Scores in base-2 units: ((q * scale) k^T + bias) * log2(e), -inf on padded keys."""
    s = tl.dot(q, k_t, input_precision=PRECISION) * qk_scale
    if HAS_REL_T or HAS_REL_H or HAS_REL_W:
        t_j, h_j, w_j, key_ok = _key_coords(offs_n, Nk, Kh, Kw, HAS_CLS)
        if HAS_REL_T:
            s = _bias_dot(s, rt_hi, rt_lo, t_j, key_ok, PAD_T, IS_FP32)
        if HAS_REL_H:
            s = _bias_dot(s, rh_hi, rh_lo, h_j, key_ok, PAD_H, IS_FP32)
        if HAS_REL_W:
            s = _bias_dot(s, rw_hi, rw_lo, w_j, key_ok, PAD_W, IS_FP32)
    if not EVEN_N:
        s = tl.where((offs_n < Nk)[None, :], s, float("-inf"))
    return s


@triton.jit
def _load_tables(R, stride_rm, stride_rk, offs_m, Nq, Kt, Kh, Kw, off_h, off_w,
                 DTYPE: tl.constexpr, BLOCK_M: tl.constexpr,
                 HAS_CLS: tl.constexpr, HAS_REL_T: tl.constexpr, HAS_REL_H: tl.constexpr,
                 HAS_REL_W: tl.constexpr, PAD_T: tl.constexpr, PAD_H: tl.constexpr,
                 PAD_W: tl.constexpr, IS_FP32: tl.constexpr):
    """hi/lo table tiles of the query rows offs_m (the cls row and padded rows are zero)."""
    rows = offs_m - HAS_CLS
    row_ok = (offs_m >= HAS_CLS) & (offs_m < Nq)
    if HAS_REL_T:
        rt_hi, rt_lo = _split(_load_rel(R, stride_rm, stride_rk, rows, row_ok, 0, Kt, PAD_T),
                              DTYPE, IS_FP32)
    else:
        rt_hi = tl.zeros([BLOCK_M, PAD_T], dtype=DTYPE)
        rt_lo = rt_hi
    if HAS_REL_H:
        rh_hi, rh_lo = _split(_load_rel(R, stride_rm, stride_rk, rows, row_ok, off_h, Kh, PAD_H),
                              DTYPE, IS_FP32)
    else:
        rh_hi = tl.zeros([BLOCK_M, PAD_H], dtype=DTYPE)
        rh_lo = rh_hi
    if HAS_REL_W:
        rw_hi, rw_lo = _split(_load_rel(R, stride_rm, stride_rk, rows, row_ok, off_w, Kw, PAD_W),
                              DTYPE, IS_FP32)
    else:
        rw_hi = tl.zeros([BLOCK_M, PAD_W], dtype=DTYPE)
        rw_lo = rw_hi
    return rt_hi, rt_lo, rh_hi, rh_lo, rw_hi, rw_lo


@triton.jit
def _load_2d(ptrs, rows, cols, n_rows, n_cols, EVEN_ROWS: tl.constexpr, EVEN_COLS: tl.constexpr):
    if EVEN_ROWS and EVEN_COLS:
        return tl.load(ptrs)
    return tl.load(ptrs, mask=(rows < n_rows)[:, None] & (cols < n_cols)[None, :], other=0.0)


@triton.jit
def _store_2d(ptrs, x, rows, cols, n_rows, n_cols, EVEN_ROWS: tl.constexpr, EVEN_COLS: tl.constexpr):
    if EVEN_ROWS and EVEN_COLS:
        tl.store(ptrs, x)
    else:
        tl.store(ptrs, x, mask=(rows < n_rows)[:, None] & (cols < n_cols)[None, :])


# ---------------------------------------------------------------------------------------
# Forward
# ---------------------------------------------------------------------------------------


@triton.jit
def _attn_fwd(
    Q, K, V, R, Out, LSE,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_rb, stride_rh, stride_rm, stride_rk,
    stride_ob, stride_oh, stride_om, stride_od,
    H, Nq, Nk, D, Kt, Kh, Kw, off_h, off_w, qk_scale,
    NQ_BUCKET, NK_BUCKET,  # autotune keys only
    HAS_CLS: tl.constexpr, HAS_REL_T: tl.constexpr, HAS_REL_H: tl.constexpr,
    HAS_REL_W: tl.constexpr, RESIDUAL: tl.constexpr,
    PAD_T: tl.constexpr, PAD_H: tl.constexpr, PAD_W: tl.constexpr,
    IS_FP32: tl.constexpr, PRECISION: tl.constexpr,
    EVEN_M: tl.constexpr, EVEN_N: tl.constexpr, EVEN_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Forward of one (BLOCK_M query rows, batch*head) program: one pass over all keys.

    Math (base 2, c = log2 e): s_ij = c * (scale * q_i . k_j + b_ij) with
    b_ij = rel_t[i, t_j] + rel_h[i, h_j] + rel_w[i, w_j] (0 on the cls row/column);
    online softmax m_i = max_j s_ij, l_i = sum_j 2^(s_ij - m_i), acc_i = sum_j 2^(s_ij - m_i) v_j;
    out_i = acc_i / l_i (+ q_i if RESIDUAL and i is not cls); LSE_i = m_i + log2 l_i (fp32,
    base 2, kept for the backward).

    Memory traffic per program: q, out, the table rows (BLOCK_M x (d + d + Kt+Kh+Kw)) once,
    all of K and V (2 Nk d); in total 2 Nq d + 2 Nk d * ceil(Nq / BLOCK_M) + Nq (Kt+Kh+Kw + 1)
    elements per head, the K/V re-reads served mostly from L2.
    """
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    off_b = (pid_bh // H).to(tl.int64)
    off_hd = (pid_bh % H).to(tl.int64)
    Q += off_b * stride_qb + off_hd * stride_qh
    K += off_b * stride_kb + off_hd * stride_kh
    V += off_b * stride_vb + off_hd * stride_vh
    R += off_b * stride_rb + off_hd * stride_rh
    Out += off_b * stride_ob + off_hd * stride_oh
    LSE += pid_bh.to(tl.int64) * Nq

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    q = _load_2d(Q + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd,
                 offs_m, offs_d, Nq, D, EVEN_M, EVEN_D)
    rt_hi, rt_lo, rh_hi, rh_lo, rw_hi, rw_lo = _load_tables(
        R, stride_rm, stride_rk, offs_m, Nq, Kt, Kh, Kw, off_h, off_w, Q.dtype.element_ty, BLOCK_M,
        HAS_CLS, HAS_REL_T, HAS_REL_H, HAS_REL_W, PAD_T, PAD_H, PAD_W, IS_FP32)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for start_n in range(0, Nk, BLOCK_N):
        offs_n = start_n + offs_n0
        k_t = _load_2d(K + offs_n[None, :] * stride_kn + offs_d[:, None] * stride_kd,
                       offs_d, offs_n, D, Nk, EVEN_D, EVEN_N)
        s = _scores(q, k_t, offs_n, Nk, Kh, Kw, qk_scale, rt_hi, rt_lo, rh_hi, rh_lo, rw_hi, rw_lo,
                    HAS_CLS, HAS_REL_T, HAS_REL_H, HAS_REL_W, PAD_T, PAD_H, PAD_W,
                    IS_FP32, PRECISION, EVEN_N)
        # Online softmax: rescale what was accumulated under the old running max.
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.math.exp2(s - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = _load_2d(V + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd,
                     offs_n, offs_d, Nk, D, EVEN_N, EVEN_D)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=PRECISION)
        m_i = m_new

    acc = acc / l_i[:, None]
    if RESIDUAL:  # residual pooling: the unscaled q, cls row excluded
        if HAS_CLS:
            acc += tl.where((offs_m >= 1)[:, None], q.to(tl.float32), 0.0)
        else:
            acc += q.to(tl.float32)
    if EVEN_M:
        tl.store(LSE + offs_m, m_i + tl.math.log2(l_i))
    else:
        tl.store(LSE + offs_m, m_i + tl.math.log2(l_i), mask=offs_m < Nq)
    _store_2d(Out + offs_m[:, None] * stride_om + offs_d[None, :] * stride_od,
              acc.to(Out.dtype.element_ty), offs_m, offs_d, Nq, D, EVEN_M, EVEN_D)


# ---------------------------------------------------------------------------------------
# Backward
# ---------------------------------------------------------------------------------------


@triton.jit
def _attn_bwd_dq(
    Q, K, V, R, DO, LSE, DELTA, DQ, DR,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_rb, stride_rh, stride_rm, stride_rk,
    stride_dob, stride_doh, stride_dom, stride_dod,
    stride_dqb, stride_dqh, stride_dqm, stride_dqd,
    stride_drb, stride_drh, stride_drm, stride_drk,
    H, Nq, Nk, D, Kt, Kh, Kw, off_h, off_w, qk_scale, scale,
    NQ_BUCKET, NK_BUCKET,  # autotune keys only
    HAS_CLS: tl.constexpr, HAS_REL_T: tl.constexpr, HAS_REL_H: tl.constexpr,
    HAS_REL_W: tl.constexpr, RESIDUAL: tl.constexpr,
    PAD_T: tl.constexpr, PAD_H: tl.constexpr, PAD_W: tl.constexpr,
    IS_FP32: tl.constexpr, PRECISION: tl.constexpr,
    EVEN_M: tl.constexpr, EVEN_N: tl.constexpr, EVEN_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """dq, delta and the table gradients of one (BLOCK_M query rows, batch*head) program.

    Math: P_ij = 2^(s_ij - LSE_i) recomputed from q, k and the tables; dP_ij = dO_i . v_j;
    dS_ij = P_ij (dP_ij - delta_i) is the gradient of the logit scale * q_i . k_j + b_ij, with
    delta_i = sum_j P_ij dP_ij (= dO_i . O_attn_i). Then
        dq_i = scale * sum_j dS_ij k_j  (+ dO_i with the residual, non-cls rows),
        dRel_t[i, t] = sum_{j: t_j = t} dS_ij  (likewise h, w).
    delta is NOT taken from the stored output as in FlashAttention: out is rounded to the
    input dtype (and holds the residual q), and in bf16 that rounding alone put the table
    gradients (no 1/sqrt(d) factor, summed over queries) 1.3-2.5x over the test tolerance.
    Instead the loop accumulates sum_j P dP k, sum_j P k and delta in fp32 and forms
    dq = scale * (sum_j P dP k - delta * sum_j P k) at the end (one extra P @ K dot per
    tile); the same split gives dRel from two one-hot reductions (of P dP and of P). delta
    is stored for `_attn_bwd_dkdv`, which must run after this kernel.

    Traffic: q, dO, the table rows, dq, dRel, delta once; K and V once per query block (L2).
    No atomics, no Nq x Nk tensor.
    """
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    off_b = (pid_bh // H).to(tl.int64)
    off_hd = (pid_bh % H).to(tl.int64)
    Q += off_b * stride_qb + off_hd * stride_qh
    K += off_b * stride_kb + off_hd * stride_kh
    V += off_b * stride_vb + off_hd * stride_vh
    R += off_b * stride_rb + off_hd * stride_rh
    DO += off_b * stride_dob + off_hd * stride_doh
    DQ += off_b * stride_dqb + off_hd * stride_dqh
    DR += off_b * stride_drb + off_hd * stride_drh
    LSE += pid_bh.to(tl.int64) * Nq
    DELTA += pid_bh.to(tl.int64) * Nq

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    q = _load_2d(Q + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd,
                 offs_m, offs_d, Nq, D, EVEN_M, EVEN_D)
    do = _load_2d(DO + offs_m[:, None] * stride_dom + offs_d[None, :] * stride_dod,
                  offs_m, offs_d, Nq, D, EVEN_M, EVEN_D)
    if EVEN_M:
        lse = tl.load(LSE + offs_m)
    else:
        lse = tl.load(LSE + offs_m, mask=offs_m < Nq, other=0.0)
    DTYPE = Q.dtype.element_ty
    rt_hi, rt_lo, rh_hi, rh_lo, rw_hi, rw_lo = _load_tables(
        R, stride_rm, stride_rk, offs_m, Nq, Kt, Kh, Kw, off_h, off_w, DTYPE, BLOCK_M,
        HAS_CLS, HAS_REL_T, HAS_REL_H, HAS_REL_W, PAD_T, PAD_H, PAD_W, IS_FP32)

    delta = tl.zeros([BLOCK_M], dtype=tl.float32)
    pdp_k = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)  # sum_j P dP k_j
    p_k = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)  # sum_j P k_j
    # Per axis: sum over keys sharing a coordinate of P dP (a) and of P (p).
    drt_a = tl.zeros([BLOCK_M, PAD_T], dtype=tl.float32)
    drt_p = tl.zeros([BLOCK_M, PAD_T], dtype=tl.float32)
    drh_a = tl.zeros([BLOCK_M, PAD_H], dtype=tl.float32)
    drh_p = tl.zeros([BLOCK_M, PAD_H], dtype=tl.float32)
    drw_a = tl.zeros([BLOCK_M, PAD_W], dtype=tl.float32)
    drw_p = tl.zeros([BLOCK_M, PAD_W], dtype=tl.float32)
    for start_n in range(0, Nk, BLOCK_N):
        offs_n = start_n + offs_n0
        k_t = _load_2d(K + offs_n[None, :] * stride_kn + offs_d[:, None] * stride_kd,
                       offs_d, offs_n, D, Nk, EVEN_D, EVEN_N)
        v_t = _load_2d(V + offs_n[None, :] * stride_vn + offs_d[:, None] * stride_vd,
                       offs_d, offs_n, D, Nk, EVEN_D, EVEN_N)
        s = _scores(q, k_t, offs_n, Nk, Kh, Kw, qk_scale, rt_hi, rt_lo, rh_hi, rh_lo, rw_hi, rw_lo,
                    HAS_CLS, HAS_REL_T, HAS_REL_H, HAS_REL_W, PAD_T, PAD_H, PAD_W,
                    IS_FP32, PRECISION, EVEN_N)
        p = tl.math.exp2(s - lse[:, None])  # padded keys: s = -inf, p = 0
        pdp = p * tl.dot(do, v_t, input_precision=PRECISION)
        delta += tl.sum(pdp, 1)
        k = tl.trans(k_t)
        pdp_k = tl.dot(pdp.to(DTYPE), k, pdp_k, input_precision=PRECISION)
        p_k = tl.dot(p.to(DTYPE), k, p_k, input_precision=PRECISION)
        if HAS_REL_T or HAS_REL_H or HAS_REL_W:
            pdp_hi, pdp_lo = _split(pdp, DTYPE, IS_FP32)
            p_hi, p_lo = _split(p, DTYPE, IS_FP32)
            t_j, h_j, w_j, key_ok = _key_coords(offs_n, Nk, Kh, Kw, HAS_CLS)
            if HAS_REL_T:
                drt_a = _onehot_reduce(drt_a, pdp_hi, pdp_lo, t_j, key_ok, PAD_T, IS_FP32)
                drt_p = _onehot_reduce(drt_p, p_hi, p_lo, t_j, key_ok, PAD_T, IS_FP32)
            if HAS_REL_H:
                drh_a = _onehot_reduce(drh_a, pdp_hi, pdp_lo, h_j, key_ok, PAD_H, IS_FP32)
                drh_p = _onehot_reduce(drh_p, p_hi, p_lo, h_j, key_ok, PAD_H, IS_FP32)
            if HAS_REL_W:
                drw_a = _onehot_reduce(drw_a, pdp_hi, pdp_lo, w_j, key_ok, PAD_W, IS_FP32)
                drw_p = _onehot_reduce(drw_p, p_hi, p_lo, w_j, key_ok, PAD_W, IS_FP32)

    dq = (pdp_k - delta[:, None] * p_k) * scale
    if RESIDUAL:
        if HAS_CLS:
            dq += tl.where((offs_m >= 1)[:, None], do.to(tl.float32), 0.0)
        else:
            dq += do.to(tl.float32)
    _store_2d(DQ + offs_m[:, None] * stride_dqm + offs_d[None, :] * stride_dqd,
              dq.to(DQ.dtype.element_ty), offs_m, offs_d, Nq, D, EVEN_M, EVEN_D)
    if EVEN_M:
        tl.store(DELTA + offs_m, delta)
    else:
        tl.store(DELTA + offs_m, delta, mask=offs_m < Nq)

    # Table gradients of the non-cls rows: dRel = sum P dP - delta * sum P per coordinate.
    rows = offs_m - HAS_CLS
    row_ok = (offs_m >= HAS_CLS) & (offs_m < Nq)
    if HAS_REL_T:
        cols = tl.arange(0, PAD_T)
        tl.store(DR + rows[:, None] * stride_drm + cols[None, :] * stride_drk,
                 drt_a - delta[:, None] * drt_p, mask=row_ok[:, None] & (cols < Kt)[None, :])
    if HAS_REL_H:
        cols = tl.arange(0, PAD_H)
        tl.store(DR + rows[:, None] * stride_drm + (off_h + cols)[None, :] * stride_drk,
                 drh_a - delta[:, None] * drh_p, mask=row_ok[:, None] & (cols < Kh)[None, :])
    if HAS_REL_W:
        cols = tl.arange(0, PAD_W)
        tl.store(DR + rows[:, None] * stride_drm + (off_w + cols)[None, :] * stride_drk,
                 drw_a - delta[:, None] * drw_p, mask=row_ok[:, None] & (cols < Kw)[None, :])


@triton.jit
def _attn_bwd_dkdv(
    Q, K, V, R, DO, LSE, DELTA, DK, DV,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_rb, stride_rh, stride_rm, stride_rk,
    stride_dob, stride_doh, stride_dom, stride_dod,
    stride_dkb, stride_dkh, stride_dkn, stride_dkd,
    stride_dvb, stride_dvh, stride_dvn, stride_dvd,
    H, Nq, Nk, D, Kt, Kh, Kw, off_h, off_w, qk_scale, scale,
    NQ_BUCKET, NK_BUCKET,  # autotune keys only
    HAS_CLS: tl.constexpr, HAS_REL_T: tl.constexpr, HAS_REL_H: tl.constexpr,
    HAS_REL_W: tl.constexpr,
    PAD_T: tl.constexpr, PAD_H: tl.constexpr, PAD_W: tl.constexpr,
    IS_FP32: tl.constexpr, PRECISION: tl.constexpr,
    EVEN_M: tl.constexpr, EVEN_N: tl.constexpr, EVEN_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """dk, dv of one (BLOCK_N keys, batch*head) program: one pass over all query rows.

    Math: with P and dS as in `_attn_bwd_dq` (recomputed per query block, tables included),
    dv_j = sum_i P_ij dO_i and dk_j = scale * sum_i dS_ij q_i, with the exact delta that
    `_attn_bwd_dq` stored (so this pass runs after it).

    Traffic: K, V, dK, dV once; q, dO, LSE, delta and the table rows once per key block (L2).
    Tiles stay in the (query, key) orientation and the dots take tl.trans(p) / tl.trans(ds);
    tutorial 06 instead computes k q^T directly (a GPU tuning item).
    """
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    off_b = (pid_bh // H).to(tl.int64)
    off_hd = (pid_bh % H).to(tl.int64)
    Q += off_b * stride_qb + off_hd * stride_qh
    K += off_b * stride_kb + off_hd * stride_kh
    V += off_b * stride_vb + off_hd * stride_vh
    R += off_b * stride_rb + off_hd * stride_rh
    DO += off_b * stride_dob + off_hd * stride_doh
    DK += off_b * stride_dkb + off_hd * stride_dkh
    DV += off_b * stride_dvb + off_hd * stride_dvh
    LSE += pid_bh.to(tl.int64) * Nq
    DELTA += pid_bh.to(tl.int64) * Nq

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m0 = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    k_t = _load_2d(K + offs_n[None, :] * stride_kn + offs_d[:, None] * stride_kd,
                   offs_d, offs_n, D, Nk, EVEN_D, EVEN_N)
    v_t = _load_2d(V + offs_n[None, :] * stride_vn + offs_d[:, None] * stride_vd,
                   offs_d, offs_n, D, Nk, EVEN_D, EVEN_N)
    DTYPE = Q.dtype.element_ty

    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    for start_m in range(0, Nq, BLOCK_M):
        offs_m = start_m + offs_m0
        q = _load_2d(Q + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd,
                     offs_m, offs_d, Nq, D, EVEN_M, EVEN_D)
        do = _load_2d(DO + offs_m[:, None] * stride_dom + offs_d[None, :] * stride_dod,
                      offs_m, offs_d, Nq, D, EVEN_M, EVEN_D)
        if EVEN_M:
            lse = tl.load(LSE + offs_m)
            delta = tl.load(DELTA + offs_m)
        else:
            lse = tl.load(LSE + offs_m, mask=offs_m < Nq, other=float("inf"))  # p = 0 on pad rows
            delta = tl.load(DELTA + offs_m, mask=offs_m < Nq, other=0.0)
        rt_hi, rt_lo, rh_hi, rh_lo, rw_hi, rw_lo = _load_tables(
            R, stride_rm, stride_rk, offs_m, Nq, Kt, Kh, Kw, off_h, off_w, DTYPE, BLOCK_M,
            HAS_CLS, HAS_REL_T, HAS_REL_H, HAS_REL_W, PAD_T, PAD_H, PAD_W, IS_FP32)
        s = _scores(q, k_t, offs_n, Nk, Kh, Kw, qk_scale, rt_hi, rt_lo, rh_hi, rh_lo, rw_hi, rw_lo,
                    HAS_CLS, HAS_REL_T, HAS_REL_H, HAS_REL_W, PAD_T, PAD_H, PAD_W,
                    IS_FP32, PRECISION, EVEN_N)
        p = tl.math.exp2(s - lse[:, None])
        dv = tl.dot(tl.trans(p.to(DTYPE)), do, dv, input_precision=PRECISION)
        dp = tl.dot(do, v_t, input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        dk = tl.dot(tl.trans(ds.to(DTYPE)), q, dk, input_precision=PRECISION)

    dk = dk * scale
    _store_2d(DK + offs_n[:, None] * stride_dkn + offs_d[None, :] * stride_dkd,
              dk.to(DK.dtype.element_ty), offs_n, offs_d, Nk, D, EVEN_N, EVEN_D)
    _store_2d(DV + offs_n[:, None] * stride_dvn + offs_d[None, :] * stride_dvd,
              dv.to(DV.dtype.element_ty), offs_n, offs_d, Nk, D, EVEN_N, EVEN_D)


# ---------------------------------------------------------------------------------------
# Configs and launchers
# ---------------------------------------------------------------------------------------

_CONFIG_ENV = "MVIT_FAST_TRITON_CONFIG"  # e.g. "BLOCK_M=64,BLOCK_N=32,num_warps=4,num_stages=2"
_INTERPRETER_CONFIG = {"BLOCK_M": 16, "BLOCK_N": 16, "num_warps": 1, "num_stages": 1}
# Every config's blocks divide this, so N % _MAX_BLOCK == 0 makes EVEN_M/EVEN_N safe
# for whichever config the autotuner picks (triton.heuristics would know the block,
# but torch.library.wrap_triton does not accept a Heuristics-wrapped kernel).
_MAX_BLOCK = 128


def _keep(block_m: int, block_n: int, num_warps: int, num_stages: int, pass_name: str) -> bool:
    """Prune configs that spill or idle: big tiles need 8 warps, small ones at most 4."""
    tile = block_m * block_n
    if tile >= 128 * 128 and num_warps < 8:
        return False
    if tile <= 32 * 64 and num_warps > 4:
        return False
    if pass_name != "fwd" and block_m * block_n > 64 * 128:  # bwd keeps ~3 fp32 tiles live
        return False
    return True


def _configs(pass_name: str) -> list[triton.Config]:
    """Autotune search space of one pass (CUDA only), filtered by `_keep`.

    Kept small on purpose: every config is compiled for every constexpr variant
    (head dim, table axes), and a lent GPU session has minutes, not hours. MViT's
    query counts are long (393 to 25089 per head), so the forward uses 64/128-row tiles.
    """
    blocks_m = (64, 128) if pass_name == "fwd" else (32, 64)
    stages = (2, 3) if pass_name == "fwd" else (1, 2)
    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
        for bm in blocks_m for bn in (32, 64, 128) for w in (4, 8) for s in stages
        if _keep(bm, bn, w, s, pass_name)
    ]


INTERPRETED = is_interpreted(_attn_fwd)


def _pinned_config() -> dict[str, int] | None:
    """One fixed config: from MVIT_FAST_TRITON_CONFIG, or the small interpreter one."""
    return pinned_config(_CONFIG_ENV, ("BLOCK_M", "BLOCK_N"), {"num_warps": 4, "num_stages": 2},
                         _INTERPRETER_CONFIG if INTERPRETED else None)


_TUNE_KEY = ["NQ_BUCKET", "NK_BUCKET", "D", "HAS_REL_T", "HAS_REL_H", "HAS_REL_W", "PAD_T", "PAD_H",
             "PAD_W"]


@functools.cache
def _tuned(pass_name: str):
    kernel = {"fwd": _attn_fwd, "dq": _attn_bwd_dq, "dkdv": _attn_bwd_dkdv}[pass_name]
    return triton.autotune(configs=_configs(pass_name), key=_TUNE_KEY)(kernel)


def _launch(wrap: Callable, pass_name: str, grid_axis: str, n_rows: int, heads: int,
            *args, **kwargs) -> None:
    """Launch one pass: a pinned config (interpreter, env var) or the autotuner (CUDA)."""
    cfg = _pinned_config()
    kernel = {"fwd": _attn_fwd, "dq": _attn_bwd_dq, "dkdv": _attn_bwd_dkdv}[pass_name]
    if cfg is not None:
        grid = (triton.cdiv(n_rows, cfg[grid_axis]), heads)
        kwargs["EVEN_M"] = kwargs.pop("_NQ") % cfg["BLOCK_M"] == 0
        kwargs["EVEN_N"] = kwargs.pop("_NK") % cfg["BLOCK_N"] == 0
        wrap(kernel)[grid](*args, **kwargs, **cfg)
        return
    kwargs["EVEN_M"] = kwargs.pop("_NQ") % _MAX_BLOCK == 0
    kwargs["EVEN_N"] = kwargs.pop("_NK") % _MAX_BLOCK == 0
    grid = lambda meta: (triton.cdiv(n_rows, meta[grid_axis]), heads)
    wrap(_tuned(pass_name))[grid](*args, **kwargs)


def _pad(n: int) -> int:
    return max(16, triton.next_power_of_2(n))  # tl.dot needs every dimension >= 16


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rel: torch.Tensor,
           k_grid: Sequence[int], rel_axes: Sequence[bool], has_cls: bool) -> None:
    """The launcher's own invariants (user-facing checks live in `pooled_attention`)."""
    if q.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"triton pooled attention takes float32/float16/bfloat16, got {q.dtype}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.is_cuda or INTERPRETED):
        raise ValueError(f"triton pooled attention needs CUDA tensors (or TRITON_INTERPRET=1), "
                         f"got {q.device}")
    if q.ndim != 4 or k.shape != v.shape or q.shape[:2] != k.shape[:2] or q.shape[3] != k.shape[3]:
        raise ValueError(f"expected q (B, heads, Nq, d) and k, v (B, heads, Nk, d), got "
                         f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    if q.shape[3] > MAX_HEAD_DIM:
        raise ValueError(f"head_dim {q.shape[3]} > {MAX_HEAD_DIM} is not supported")
    kt, kh, kw = (int(x) for x in k_grid)
    if k.shape[2] != int(has_cls) + kt * kh * kw:
        raise ValueError(f"k_grid {tuple(k_grid)} with has_cls={has_cls} does not match "
                         f"Nk={k.shape[2]}")
    widths = [n for n, on in zip((kt, kh, kw), rel_axes) if on]
    if any(n > MAX_GRID_AXIS for n in widths):
        raise ValueError(f"key grid {tuple(k_grid)}: a rel-pos axis longer than {MAX_GRID_AXIS} "
                         "is not supported by the one-hot bias")
    expected = (q.shape[0], q.shape[1], q.shape[2] - int(has_cls), sum(widths))
    if tuple(rel.shape) != expected:
        raise ValueError(f"rel tables must be {expected} for rel_axes={tuple(rel_axes)}, "
                         f"got {tuple(rel.shape)}")
    if rel.device != q.device or not rel.is_floating_point():
        raise TypeError(f"rel tables must be floating point on {q.device}, got {rel.dtype} "
                        f"on {rel.device}")


def _common(q, k, rel, k_grid, rel_axes, has_cls, scale):
    """Scalar and constexpr arguments shared by the forward and both backward passes."""
    kt, kh, kw = (int(x) for x in k_grid)
    has_t, has_h, has_w = (bool(x) for x in rel_axes)
    off_h = kt if has_t else 0
    off_w = off_h + (kh if has_h else 0)
    d = q.shape[3]
    # head_dim is padded to a power of two with masks (96 -> 128, 72 -> 128: 25-44% idle
    # MMA columns on q k^T and P v). Splitting it into 64 + 32 (two dots) avoids the padding
    # at the cost of more instructions: a GPU measurement to make at the MViT shapes.
    block_d = _pad(d)
    is_fp32 = q.dtype == torch.float32
    return dict(
        H=q.shape[1], Nq=q.shape[2], Nk=k.shape[2], D=d, Kt=kt, Kh=kh, Kw=kw,
        off_h=off_h, off_w=off_w, qk_scale=scale * LOG2E,
        NQ_BUCKET=triton.next_power_of_2(q.shape[2]), NK_BUCKET=triton.next_power_of_2(k.shape[2]),
        HAS_CLS=int(has_cls), HAS_REL_T=has_t, HAS_REL_H=has_h, HAS_REL_W=has_w,
        PAD_T=_pad(kt), PAD_H=_pad(kh), PAD_W=_pad(kw),
        IS_FP32=is_fp32, PRECISION="ieee" if is_fp32 else "tf32",
        EVEN_D=d == block_d, BLOCK_D=block_d, _NQ=q.shape[2], _NK=k.shape[2],
    )


def _identity(kernel):
    return kernel


def attention_forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rel: torch.Tensor,
    k_grid: Sequence[int], rel_axes: Sequence[bool], has_cls: bool, residual: bool, scale: float,
    *, wrap: Callable = _identity,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused forward. Returns (out (B, heads, Nq, d) in q's dtype, LSE (B, heads, Nq) fp32).

    Args:
        q: (B, heads, Nq, d); k, v: (B, heads, Nk, d); any strides.
        rel: (B, heads, Nq - cls, sum of the present axes' key sizes) float32, the per-query
            tables rel_t | rel_h | rel_w (absent axes omitted), any strides.
        k_grid: the key grid (Kt, Kh, Kw), t-major; Nk = has_cls + Kt * Kh * Kw.
        rel_axes: (has_t, has_h, has_w): which tables `rel` holds.
        has_cls: token 0 of q and k is cls (no bias; no residual on row 0).
        residual: add the unscaled q to the output rows (residual pooling).
        scale: multiplies q . k (not the bias).
        wrap: applied to each kernel before launch (`torch.library.wrap_triton`).
    LSE is in base 2 over the logits times log2(e); only the backward reads it.
    """
    _check(q, k, v, rel, k_grid, rel_axes, has_cls)
    batch, heads, nq, d = q.shape
    out = torch.empty((batch, heads, nq, d), device=q.device, dtype=q.dtype)
    lse = torch.empty((batch, heads, nq), device=q.device, dtype=torch.float32)
    rel_arg = rel if rel.numel() else lse  # never read when no table is present
    _launch(wrap, "fwd", "BLOCK_M", nq, batch * heads,
            q, k, v, rel_arg, out, lse,
            *q.stride(), *k.stride(), *v.stride(), *_strides4(rel), *out.stride(),
            **_common(q, k, rel, k_grid, rel_axes, has_cls, scale), RESIDUAL=bool(residual))
    return out, lse


def attention_backward(
    dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rel: torch.Tensor,
    lse: torch.Tensor,
    k_grid: Sequence[int], rel_axes: Sequence[bool], has_cls: bool, residual: bool, scale: float,
    *, wrap: Callable = _identity,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fused backward. Returns (dq, dk, dv in the input dtype, drel fp32 shaped like rel).

    dq holds only the direct path (scores and residual); the gradient that reaches q
    through the tables is drel's, carried by autograd of the table einsum. Arguments as
    in `attention_forward`, plus dout (the gradient of out, any strides) and the forward's
    LSE. The forward's output is not needed: the dq pass computes the softmax delta itself.
    """
    _check(q, k, v, rel, k_grid, rel_axes, has_cls)
    if dout.shape != q.shape or lse.shape != q.shape[:3]:
        raise ValueError(f"dout {tuple(dout.shape)} and lse {tuple(lse.shape)} do not match "
                         f"q {tuple(q.shape)}")
    batch, heads, nq, d = q.shape
    nk = k.shape[2]
    dq = torch.empty((batch, heads, nq, d), device=q.device, dtype=q.dtype)
    dk = torch.empty((batch, heads, nk, d), device=q.device, dtype=q.dtype)
    dv = torch.empty((batch, heads, nk, d), device=q.device, dtype=q.dtype)
    drel = torch.empty(rel.shape, device=q.device, dtype=torch.float32)  # every element written
    delta = torch.empty((batch, heads, nq), device=q.device, dtype=torch.float32)
    lse = lse.contiguous()
    common = _common(q, k, rel, k_grid, rel_axes, has_cls, scale)
    rel_arg = rel if rel.numel() else delta  # never read when no table is present
    drel_arg = drel if drel.numel() else delta  # never written when no table is present
    _launch(wrap, "dq", "BLOCK_M", nq, batch * heads,
            q, k, v, rel_arg, dout, lse, delta, dq, drel_arg,
            *q.stride(), *k.stride(), *v.stride(), *_strides4(rel), *dout.stride(), *dq.stride(),
            *_strides4(drel), scale=scale, RESIDUAL=bool(residual), **common)
    # dkdv reads the delta that dq wrote: same stream, launch order is the dependency.
    _launch(wrap, "dkdv", "BLOCK_N", nk, batch * heads,
            q, k, v, rel_arg, dout, lse, delta, dk, dv,
            *q.stride(), *k.stride(), *v.stride(), *_strides4(rel), *dout.stride(), *dk.stride(),
            *dv.stride(), scale=scale, **common)
    return dq, dk, dv, drel


def _strides4(t: torch.Tensor) -> tuple[int, int, int, int]:
    """Strides of a 4-D tensor; (0, 0, 0, 0) for an empty one (it is never addressed)."""
    return tuple(t.stride()) if t.numel() else (0, 0, 0, 0)
