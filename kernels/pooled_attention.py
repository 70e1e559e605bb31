"""Fused MViTv2 pooling attention: scores, decomposed rel-pos bias, softmax, P @ V, residual.

Support contract (what differs from Triton's fused-attention tutorial 06):
- Non-causal, Nq != Nk, any lengths (odd, 1), masks compiled in only where needed.
- head_dim up to 256 (MViT uses 96, 72, 144), in one of two layouts: padded to the next
  power of two with masks, or split (SPLIT_D) into its largest power of two plus the rest
  padded to a power of two >= 16 (96 = 64 + 32, 72 = 64 + 16, 144 = 128 + 16), every dot
  over d then two dots. SPLIT_D is an autotune parameter, so the GPU times both per shape
  (where the split is narrower: `head_dim_split`); MVIT_FAST_TRITON_SPLIT_D=0/1 pins one
  layout, as does SPLIT_D=0/1 in a pinned MVIT_FAST_TRITON_CONFIG. `launch_configs`
  reports what ran.
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
- `attention_backward`: `_attn_bwd_dq` (dq, the table gradients and the softmax delta
  dO . (out - residual), made exact in the key loop, per query block), then
  `_attn_bwd_dkdv` (dk, dv, per key block and query chunk: `dkdv_chunks`).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Sequence

import torch
import triton
import triton.language as tl

from ._launch import MAX_BATCH_HEADS, aligned, compiling_only, is_interpreted, pinned_config, row_align

__all__ = ["INTERPRETED", "MAX_BATCH_HEADS", "MAX_GRID_AXIS", "MAX_HEAD_DIM", "attention_backward",
           "attention_forward", "dkdv_chunks", "head_dim_split", "launch_configs"]

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
    """fp32 x -> (hi, lo) with hi + lo == x to ~16 bits, both in the dot dtype (fp32: x, x).
    In fp16 |x| must stay below 65504: a log2(e)-scaled bias beyond ±45,000 becomes inf."""
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
def _onehot_reduce(acc, ds_hi, ds_lo, coord, key_ok, PAD: tl.constexpr, IS_FP32: tl.constexpr,
                   HI_ONLY: tl.constexpr):
    """acc[i, c] += sum over keys j with coord_j == c of dS[i, j]: dS @ onehot^T. HI_ONLY
    drops the lo dot (dS rounded once to the input dtype, for a term needed to ~3 digits)."""
    onehot_t = (coord[:, None] == tl.arange(0, PAD)[None, :]) & key_ok[:, None]
    onehot_t = onehot_t.to(ds_hi.dtype)
    if IS_FP32:
        acc = tl.dot(ds_hi, onehot_t, acc, input_precision="ieee")
    else:
        acc = tl.dot(ds_hi, onehot_t, acc)
        if not HI_ONLY:
            acc = tl.dot(ds_lo, onehot_t, acc)
    return acc


@triton.jit
def _key_coords(offs_n, Nk, Kh, Kw, HAS_CLS: tl.constexpr):
    """(t_j, h_j, w_j) of t-major keys and whether key j gets a bias (not cls, in range)."""
    key_ok = (offs_n >= HAS_CLS) & (offs_n < Nk)
    j = tl.maximum(offs_n - HAS_CLS, 0)
    return j // (Kh * Kw), (j // Kw) % Kh, j % Kw, key_ok


@triton.jit
def _dot_d(a, a_hi, b, b_hi, PRECISION: tl.constexpr, SPLIT_D: tl.constexpr):
    """a @ b contracted over the head dim: one dot over the padded dim, or with SPLIT_D the
    sum of the two halves' dots (a_lo b_lo + a_hi b_hi), accumulated in fp32."""
    acc = tl.dot(a, b, input_precision=PRECISION)
    if SPLIT_D:
        acc = tl.dot(a_hi, b_hi, acc, input_precision=PRECISION)
    return acc


@triton.jit
def _scores(q, q_hi, k_t, k_t_hi, offs_n, Nk, Kh, Kw, qk_scale,
            rt_hi, rt_lo, rh_hi, rh_lo, rw_hi, rw_lo,
            HAS_CLS: tl.constexpr, HAS_REL_T: tl.constexpr, HAS_REL_H: tl.constexpr,
            HAS_REL_W: tl.constexpr, PAD_T: tl.constexpr, PAD_H: tl.constexpr, PAD_W: tl.constexpr,
            IS_FP32: tl.constexpr, PRECISION: tl.constexpr, EVEN_N: tl.constexpr,
            SPLIT_D: tl.constexpr):
    """Scores in base-2 units: ((q * scale) k^T + bias) * log2(e), -inf on padded keys."""
    s = _dot_d(q, q_hi, k_t, k_t_hi, PRECISION, SPLIT_D) * qk_scale
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


# Head-dim tiles. A (rows, d) operand is held as one tile over the padded head dim
# [0, BLOCK_D), or with SPLIT_D as two tiles: the exact low part [0, BLOCK_D_LO) and the
# rest [BLOCK_D_LO, BLOCK_D_LO + BLOCK_D_HI), masked past d. Every dot over d becomes two
# dots summed (`_dot_d`), every dot producing d columns two dots. Inside a kernel,
# BLOCK_D0 / EVEN_D0 name the first tile of whichever layout runs.


@triton.jit
def _load_cols(ptr, stride_r, stride_d, rows, n_rows, cols, D,
               EVEN_ROWS: tl.constexpr, EVEN_COLS: tl.constexpr, TRANS: tl.constexpr):
    """The (rows, cols) tile of a (row, head-dim) tensor; with TRANS its transpose (cols, rows)."""
    # One return statement: the compiler checks every return's type, in untaken branches too.
    if TRANS:
        x = _load_2d(ptr + rows[None, :] * stride_r + cols[:, None] * stride_d,
                     cols, rows, D, n_rows, EVEN_COLS, EVEN_ROWS)
    else:
        x = _load_2d(ptr + rows[:, None] * stride_r + cols[None, :] * stride_d,
                     rows, cols, n_rows, D, EVEN_ROWS, EVEN_COLS)
    return x


@triton.jit
def _load_d(ptr, stride_r, stride_d, rows, n_rows, D, EVEN_ROWS: tl.constexpr, TRANS: tl.constexpr,
            BLOCK_D0: tl.constexpr, EVEN_D0: tl.constexpr, SPLIT_D: tl.constexpr,
            BLOCK_D_HI: tl.constexpr, EVEN_D_HI: tl.constexpr):
    """(x, x_hi): the head-dim tiles of `rows` (transposed with TRANS); x_hi is x (unused)
    without SPLIT_D."""
    x = _load_cols(ptr, stride_r, stride_d, rows, n_rows, tl.arange(0, BLOCK_D0), D,
                   EVEN_ROWS, EVEN_D0, TRANS)
    x_hi = x
    if SPLIT_D:
        tl.static_assert(BLOCK_D_HI >= 16, "SPLIT_D needs a head dim that splits (head_dim_split)")
        x_hi = _load_cols(ptr, stride_r, stride_d, rows, n_rows, BLOCK_D0 + tl.arange(0, BLOCK_D_HI), D,
                          EVEN_ROWS, EVEN_D_HI, TRANS)
    return x, x_hi


@triton.jit
def _store_cols(ptr, stride_r, stride_d, x, rows, n_rows, D, COL0: tl.constexpr, BLOCK: tl.constexpr,
                EVEN_ROWS: tl.constexpr, EVEN_COLS: tl.constexpr):
    """Store the (rows, BLOCK) tile x at head-dim columns COL0 + [0, BLOCK), masked past D."""
    cols = COL0 + tl.arange(0, BLOCK)
    _store_2d(ptr + rows[:, None] * stride_r + cols[None, :] * stride_d, x.to(ptr.dtype.element_ty),
              rows, cols, n_rows, D, EVEN_ROWS, EVEN_COLS)


# Row alignment (`_launch.aligned`, `_launch.row_align`): at d = 72 every q/k/v/out/dO/dq/dk/dv
# access compiled to scalar loads. sm_90 bf16 (fp16 alike), fwd 128x64 w8 s2 / dq 128x32 w8 s1 /
# dkdv 64x64 w8 s2, ROW_ALIGN 1 -> 8:
#   padded: ld.global.v4 0 -> 8 / 28 / 8 (scalar b16 loads 128 / 224 / 128 -> 0); 16-byte
#     cp.async 0 -> 16 / 0 / 16 (K/V pipelined); spills 308 / 720 / 84 -> 0 / 68 / 40 bytes.
#   split: ld.global.v4 0 -> 5 / 17 / 4 (+2 v2); 16-byte cp.async 0 -> 8 / 0 / 8; dq spill 132 -> 0.
# The padded counts are d = 96's; d = 96 and 144 compile to identical PTX either way.


@triton.jit
def _add_residual(acc, x, offs_m, RESIDUAL: tl.constexpr, HAS_CLS: tl.constexpr):
    """acc + x on the non-cls rows with residual pooling (forward: x = q; dq pass: x = dO,
    and x = -q to take the residual back out of the forward's output)."""
    if RESIDUAL:
        if HAS_CLS:
            acc += tl.where((offs_m >= 1)[:, None], x.to(tl.float32), 0.0)
        else:
            acc += x.to(tl.float32)
    return acc


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
    SPLIT_D: tl.constexpr, BLOCK_D_LO: tl.constexpr, BLOCK_D_HI: tl.constexpr, EVEN_D_HI: tl.constexpr,
    ROW_ALIGN: tl.constexpr,
):
    """Forward of one (BLOCK_M query rows, batch*head) program: one pass over all keys.

    Math (base 2, c = log2 e): s_ij = c * (scale * q_i . k_j + b_ij) with
    b_ij = rel_t[i, t_j] + rel_h[i, h_j] + rel_w[i, w_j] (0 on the cls row/column);
    online softmax m_i = max_j s_ij, l_i = sum_j 2^(s_ij - m_i), acc_i = sum_j 2^(s_ij - m_i) v_j;
    out_i = acc_i / l_i (+ q_i if RESIDUAL and i is not cls); LSE_i = m_i + log2 l_i (fp32,
    base 2, kept for the backward). With SPLIT_D, q . k is the sum of the two head-dim
    halves' dots and acc is two accumulators (acc, acc_hi), one per half of v.

    Memory traffic per program: q, out, the table rows (BLOCK_M x (d + d + Kt+Kh+Kw)) once,
    all of K and V (2 Nk d); in total 2 Nq d + 2 Nk d * ceil(Nq / BLOCK_M) + Nq (Kt+Kh+Kw + 1)
    elements per head, the K/V re-reads served mostly from L2.
    """
    # torch.compile passes Python floats as fp64 (Inductor's signature): the dots accumulate in fp32.
    qk_scale = tl.cast(qk_scale, tl.float32)
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    off_b = (pid_bh // H).to(tl.int64)
    off_hd = (pid_bh % H).to(tl.int64)
    Q += aligned(off_b * stride_qb + off_hd * stride_qh, ROW_ALIGN)
    K += aligned(off_b * stride_kb + off_hd * stride_kh, ROW_ALIGN)
    V += aligned(off_b * stride_vb + off_hd * stride_vh, ROW_ALIGN)
    R += off_b * stride_rb + off_hd * stride_rh
    Out += aligned(off_b * stride_ob + off_hd * stride_oh, ROW_ALIGN)
    D = aligned(D, ROW_ALIGN)
    stride_qm = aligned(stride_qm, ROW_ALIGN)
    stride_kn = aligned(stride_kn, ROW_ALIGN)
    stride_vn = aligned(stride_vn, ROW_ALIGN)
    stride_om = aligned(stride_om, ROW_ALIGN)
    LSE += pid_bh.to(tl.int64) * Nq

    BLOCK_D0: tl.constexpr = BLOCK_D_LO if SPLIT_D else BLOCK_D  # first head-dim tile
    EVEN_D0: tl.constexpr = True if SPLIT_D else EVEN_D
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n0 = tl.arange(0, BLOCK_N)
    q, q_hi = _load_d(Q, stride_qm, stride_qd, offs_m, Nq, D, EVEN_M, False,
                      BLOCK_D0, EVEN_D0, SPLIT_D, BLOCK_D_HI, EVEN_D_HI)
    rt_hi, rt_lo, rh_hi, rh_lo, rw_hi, rw_lo = _load_tables(
        R, stride_rm, stride_rk, offs_m, Nq, Kt, Kh, Kw, off_h, off_w, Q.dtype.element_ty, BLOCK_M,
        HAS_CLS, HAS_REL_T, HAS_REL_H, HAS_REL_W, PAD_T, PAD_H, PAD_W, IS_FP32)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D0], dtype=tl.float32)
    if SPLIT_D:
        acc_hi = tl.zeros([BLOCK_M, BLOCK_D_HI], dtype=tl.float32)
    for start_n in range(0, Nk, BLOCK_N):
        offs_n = start_n + offs_n0
        k_t, k_t_hi = _load_d(K, stride_kn, stride_kd, offs_n, Nk, D, EVEN_N, True,
                              BLOCK_D0, EVEN_D0, SPLIT_D, BLOCK_D_HI, EVEN_D_HI)
        s = _scores(q, q_hi, k_t, k_t_hi, offs_n, Nk, Kh, Kw, qk_scale,
                    rt_hi, rt_lo, rh_hi, rh_lo, rw_hi, rw_lo,
                    HAS_CLS, HAS_REL_T, HAS_REL_H, HAS_REL_W, PAD_T, PAD_H, PAD_W,
                    IS_FP32, PRECISION, EVEN_N, SPLIT_D)
        # Online softmax: rescale what was accumulated under the old running max.
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.math.exp2(s - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        v, v_hi = _load_d(V, stride_vn, stride_vd, offs_n, Nk, D, EVEN_N, False,
                          BLOCK_D0, EVEN_D0, SPLIT_D, BLOCK_D_HI, EVEN_D_HI)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=PRECISION)
        if SPLIT_D:
            acc_hi = tl.dot(p.to(v.dtype), v_hi, acc_hi * alpha[:, None], input_precision=PRECISION)
        m_i = m_new

    # Residual pooling: the unscaled q, cls row excluded.
    acc = _add_residual(acc / l_i[:, None], q, offs_m, RESIDUAL, HAS_CLS)
    if EVEN_M:
        tl.store(LSE + offs_m, m_i + tl.math.log2(l_i))
    else:
        tl.store(LSE + offs_m, m_i + tl.math.log2(l_i), mask=offs_m < Nq)
    _store_cols(Out, stride_om, stride_od, acc, offs_m, Nq, D, 0, BLOCK_D0, EVEN_M, EVEN_D0)
    if SPLIT_D:
        acc_hi = _add_residual(acc_hi / l_i[:, None], q_hi, offs_m, RESIDUAL, HAS_CLS)
        _store_cols(Out, stride_om, stride_od, acc_hi, offs_m, Nq, D, BLOCK_D0, BLOCK_D_HI,
                    EVEN_M, EVEN_D_HI)


# ---------------------------------------------------------------------------------------
# Backward
# ---------------------------------------------------------------------------------------


@triton.jit
def _attn_bwd_dq(
    Q, K, V, R, Out, DO, LSE, DELTA, DQ, DR,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_rb, stride_rh, stride_rm, stride_rk,
    stride_ob, stride_oh, stride_om, stride_od,
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
    SPLIT_D: tl.constexpr, BLOCK_D_LO: tl.constexpr, BLOCK_D_HI: tl.constexpr, EVEN_D_HI: tl.constexpr,
    ROW_ALIGN: tl.constexpr,
):
    """dq, delta and the table gradients of one (BLOCK_M query rows, batch*head) program.

    Math: P_ij = 2^(s_ij - LSE_i) recomputed from q, k and the tables; dP_ij = dO_i . v_j;
    dS_ij = P_ij (dP_ij - delta_i) is the gradient of the logit scale * q_i . k_j + b_ij, with
    delta_i = sum_j P_ij dP_ij = dO_i . attn_i, attn_i = sum_j P_ij v_j the attention output
    before the residual. Then
        dq_i = scale * sum_j dS_ij k_j  (+ dO_i with the residual, non-cls rows),
        dRel_t[i, t] = sum_{j: t_j = t} dS_ij  (likewise h, w).

    delta in two parts. Before the key loop, delta0_i = dO_i . (out_i - q_i) (q on residual
    rows only) from the forward's output, as in FlashAttention's preprocess, so the loop
    carries one (BLOCK_M x d) accumulator, dq, fed with dS0_ij = P_ij (dP_ij - delta0_i).
    But out is rounded to the input dtype at the scale of attn + q (q is often the larger
    term): in bf16 at d = 96, delta0 is off by up to ~0.1, an error shared by every key of
    the row and not damped by scale in the table gradients, which it would put up to 8x
    over the bf16 test tolerance. So the loop also sums the row sum c_i = sum_j dS0_ij
    = delta_i - delta0_i (fp32) and the probability mass per key coordinate
    P^t_i = sum_{j: t_j = t} P_ij, and the epilogue forms
        delta_i = delta0_i + c_i  (stored for `_attn_bwd_dkdv`, whose dk is thus exact),
        dRel_t[i, t] = sum_{j: t_j = t} dS0_ij - c_i P^t_i  (exact; likewise h, w).
    Only the direct dq keeps delta0's error, scale * c_i * sum_j P_ij k_j, as FlashAttention's
    does (numbers in `attention_backward`). dS0 enters the one-hot reduction as hi + lo parts
    (~16 bits; rounded once to bf16 it would cost up to 0.96 of the tolerance); P^t only
    multiplies the small c_i, so one dot in the input dtype does (HI_ONLY; < 0.001 of the
    tolerance). With SPLIT_D, s, dP and delta0 sum two head-dim parts and dq is two
    accumulators, one per part of k.

    Traffic: q, dO, out, the table rows, dq, dRel, delta once; K and V once per query block
    (L2). No atomics, no Nq x Nk tensor.
    """
    qk_scale = tl.cast(qk_scale, tl.float32)  # fp64 under torch.compile (see _attn_fwd)
    scale = tl.cast(scale, tl.float32)
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    off_b = (pid_bh // H).to(tl.int64)
    off_hd = (pid_bh % H).to(tl.int64)
    Q += aligned(off_b * stride_qb + off_hd * stride_qh, ROW_ALIGN)
    K += aligned(off_b * stride_kb + off_hd * stride_kh, ROW_ALIGN)
    V += aligned(off_b * stride_vb + off_hd * stride_vh, ROW_ALIGN)
    R += off_b * stride_rb + off_hd * stride_rh
    Out += aligned(off_b * stride_ob + off_hd * stride_oh, ROW_ALIGN)
    DO += aligned(off_b * stride_dob + off_hd * stride_doh, ROW_ALIGN)
    DQ += aligned(off_b * stride_dqb + off_hd * stride_dqh, ROW_ALIGN)
    DR += off_b * stride_drb + off_hd * stride_drh
    D = aligned(D, ROW_ALIGN)
    stride_qm = aligned(stride_qm, ROW_ALIGN)
    stride_kn = aligned(stride_kn, ROW_ALIGN)
    stride_vn = aligned(stride_vn, ROW_ALIGN)
    stride_om = aligned(stride_om, ROW_ALIGN)
    stride_dom = aligned(stride_dom, ROW_ALIGN)
    stride_dqm = aligned(stride_dqm, ROW_ALIGN)
    LSE += pid_bh.to(tl.int64) * Nq
    DELTA += pid_bh.to(tl.int64) * Nq

    BLOCK_D0: tl.constexpr = BLOCK_D_LO if SPLIT_D else BLOCK_D  # first head-dim tile
    EVEN_D0: tl.constexpr = True if SPLIT_D else EVEN_D
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n0 = tl.arange(0, BLOCK_N)
    q, q_hi = _load_d(Q, stride_qm, stride_qd, offs_m, Nq, D, EVEN_M, False,
                      BLOCK_D0, EVEN_D0, SPLIT_D, BLOCK_D_HI, EVEN_D_HI)
    do, do_hi = _load_d(DO, stride_dom, stride_dod, offs_m, Nq, D, EVEN_M, False,
                        BLOCK_D0, EVEN_D0, SPLIT_D, BLOCK_D_HI, EVEN_D_HI)
    # delta0 = dO . (out - q): the out tiles are dead once reduced, before the key loop.
    o, o_hi = _load_d(Out, stride_om, stride_od, offs_m, Nq, D, EVEN_M, False,
                      BLOCK_D0, EVEN_D0, SPLIT_D, BLOCK_D_HI, EVEN_D_HI)
    attn = _add_residual(o.to(tl.float32), -q.to(tl.float32), offs_m, RESIDUAL, HAS_CLS)
    delta0 = tl.sum(do.to(tl.float32) * attn, 1)
    if SPLIT_D:
        attn_hi = _add_residual(o_hi.to(tl.float32), -q_hi.to(tl.float32), offs_m, RESIDUAL, HAS_CLS)
        delta0 += tl.sum(do_hi.to(tl.float32) * attn_hi, 1)
    if EVEN_M:
        lse = tl.load(LSE + offs_m)
    else:
        lse = tl.load(LSE + offs_m, mask=offs_m < Nq, other=0.0)
    DTYPE = Q.dtype.element_ty
    rt_hi, rt_lo, rh_hi, rh_lo, rw_hi, rw_lo = _load_tables(
        R, stride_rm, stride_rk, offs_m, Nq, Kt, Kh, Kw, off_h, off_w, DTYPE, BLOCK_M,
        HAS_CLS, HAS_REL_T, HAS_REL_H, HAS_REL_W, PAD_T, PAD_H, PAD_W, IS_FP32)

    c = tl.zeros([BLOCK_M], dtype=tl.float32)  # sum_j dS0_ij = delta_i - delta0_i
    dq = tl.zeros([BLOCK_M, BLOCK_D0], dtype=tl.float32)
    if SPLIT_D:
        dq_hi = tl.zeros([BLOCK_M, BLOCK_D_HI], dtype=tl.float32)
    # Per axis: sums over the keys sharing a coordinate of dS0 (ds) and of P (p).
    drt_ds = tl.zeros([BLOCK_M, PAD_T], dtype=tl.float32)
    drt_p = tl.zeros([BLOCK_M, PAD_T], dtype=tl.float32)
    drh_ds = tl.zeros([BLOCK_M, PAD_H], dtype=tl.float32)
    drh_p = tl.zeros([BLOCK_M, PAD_H], dtype=tl.float32)
    drw_ds = tl.zeros([BLOCK_M, PAD_W], dtype=tl.float32)
    drw_p = tl.zeros([BLOCK_M, PAD_W], dtype=tl.float32)
    for start_n in range(0, Nk, BLOCK_N):
        offs_n = start_n + offs_n0
        k_t, k_t_hi = _load_d(K, stride_kn, stride_kd, offs_n, Nk, D, EVEN_N, True,
                              BLOCK_D0, EVEN_D0, SPLIT_D, BLOCK_D_HI, EVEN_D_HI)
        v_t, v_t_hi = _load_d(V, stride_vn, stride_vd, offs_n, Nk, D, EVEN_N, True,
                              BLOCK_D0, EVEN_D0, SPLIT_D, BLOCK_D_HI, EVEN_D_HI)
        s = _scores(q, q_hi, k_t, k_t_hi, offs_n, Nk, Kh, Kw, qk_scale,
                    rt_hi, rt_lo, rh_hi, rh_lo, rw_hi, rw_lo,
                    HAS_CLS, HAS_REL_T, HAS_REL_H, HAS_REL_W, PAD_T, PAD_H, PAD_W,
                    IS_FP32, PRECISION, EVEN_N, SPLIT_D)
        p = tl.math.exp2(s - lse[:, None])  # padded keys: s = -inf, p = 0
        ds = p * (_dot_d(do, do_hi, v_t, v_t_hi, PRECISION, SPLIT_D) - delta0[:, None])
        c += tl.sum(ds, 1)
        dq = tl.dot(ds.to(DTYPE), tl.trans(k_t), dq, input_precision=PRECISION)
        if SPLIT_D:
            dq_hi = tl.dot(ds.to(DTYPE), tl.trans(k_t_hi), dq_hi, input_precision=PRECISION)
        if HAS_REL_T or HAS_REL_H or HAS_REL_W:
            ds_hi, ds_lo = _split(ds, DTYPE, IS_FP32)
            p_lp = p.to(DTYPE)
            t_j, h_j, w_j, key_ok = _key_coords(offs_n, Nk, Kh, Kw, HAS_CLS)
            if HAS_REL_T:
                drt_ds = _onehot_reduce(drt_ds, ds_hi, ds_lo, t_j, key_ok, PAD_T, IS_FP32, False)
                drt_p = _onehot_reduce(drt_p, p_lp, p_lp, t_j, key_ok, PAD_T, IS_FP32, True)
            if HAS_REL_H:
                drh_ds = _onehot_reduce(drh_ds, ds_hi, ds_lo, h_j, key_ok, PAD_H, IS_FP32, False)
                drh_p = _onehot_reduce(drh_p, p_lp, p_lp, h_j, key_ok, PAD_H, IS_FP32, True)
            if HAS_REL_W:
                drw_ds = _onehot_reduce(drw_ds, ds_hi, ds_lo, w_j, key_ok, PAD_W, IS_FP32, False)
                drw_p = _onehot_reduce(drw_p, p_lp, p_lp, w_j, key_ok, PAD_W, IS_FP32, True)

    dq = _add_residual(dq * scale, do, offs_m, RESIDUAL, HAS_CLS)
    _store_cols(DQ, stride_dqm, stride_dqd, dq, offs_m, Nq, D, 0, BLOCK_D0, EVEN_M, EVEN_D0)
    if SPLIT_D:
        dq_hi = _add_residual(dq_hi * scale, do_hi, offs_m, RESIDUAL, HAS_CLS)
        _store_cols(DQ, stride_dqm, stride_dqd, dq_hi, offs_m, Nq, D, BLOCK_D0, BLOCK_D_HI,
                    EVEN_M, EVEN_D_HI)
    if EVEN_M:
        tl.store(DELTA + offs_m, delta0 + c)
    else:
        tl.store(DELTA + offs_m, delta0 + c, mask=offs_m < Nq)

    # Table gradients of the non-cls rows: dRel = sum dS0 - c * sum P per coordinate.
    rows = offs_m - HAS_CLS
    row_ok = (offs_m >= HAS_CLS) & (offs_m < Nq)
    if HAS_REL_T:
        cols = tl.arange(0, PAD_T)
        tl.store(DR + rows[:, None] * stride_drm + cols[None, :] * stride_drk,
                 drt_ds - c[:, None] * drt_p, mask=row_ok[:, None] & (cols < Kt)[None, :])
    if HAS_REL_H:
        cols = tl.arange(0, PAD_H)
        tl.store(DR + rows[:, None] * stride_drm + (off_h + cols)[None, :] * stride_drk,
                 drh_ds - c[:, None] * drh_p, mask=row_ok[:, None] & (cols < Kh)[None, :])
    if HAS_REL_W:
        cols = tl.arange(0, PAD_W)
        tl.store(DR + rows[:, None] * stride_drm + (off_w + cols)[None, :] * stride_drk,
                 drw_ds - c[:, None] * drw_p, mask=row_ok[:, None] & (cols < Kw)[None, :])


@triton.jit
def _attn_bwd_dkdv(
    Q, K, V, R, DO, LSE, DELTA, DK, DV,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_rb, stride_rh, stride_rm, stride_rk,
    stride_dob, stride_doh, stride_dom, stride_dod,
    stride_dkc, stride_dkb, stride_dkh, stride_dkn, stride_dkd,
    stride_dvc, stride_dvb, stride_dvh, stride_dvn, stride_dvd,
    H, Nq, Nk, D, Kt, Kh, Kw, off_h, off_w, qk_scale, scale, Q_CHUNKS,
    NQ_BUCKET, NK_BUCKET,  # autotune keys only
    HAS_CLS: tl.constexpr, HAS_REL_T: tl.constexpr, HAS_REL_H: tl.constexpr,
    HAS_REL_W: tl.constexpr,
    PAD_T: tl.constexpr, PAD_H: tl.constexpr, PAD_W: tl.constexpr,
    IS_FP32: tl.constexpr, PRECISION: tl.constexpr,
    EVEN_M: tl.constexpr, EVEN_N: tl.constexpr, EVEN_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    SPLIT_D: tl.constexpr, BLOCK_D_LO: tl.constexpr, BLOCK_D_HI: tl.constexpr, EVEN_D_HI: tl.constexpr,
    ROW_ALIGN: tl.constexpr,
):
    """dk, dv of one (BLOCK_N keys, batch*head, query chunk) program: one pass over the
    chunk's query rows.

    Math: with P and dS as in `_attn_bwd_dq` (recomputed per query block, tables included),
    dv_j = sum_i P_ij dO_i and dk_j = scale * sum_i dS_ij q_i, with the exact delta that
    `_attn_bwd_dq` stored (so this pass runs after it).

    Query chunks: with Q_CHUNKS > 1 the query blocks are cut into Q_CHUNKS contiguous runs,
    one per program on grid axis 2, and DK, DV are fp32 partial sums indexed by chunk
    (stride_dkc, stride_dvc) that the launcher adds up. This is for MViT's first stage,
    where a few key blocks face tens of thousands of queries (MViTv2-S block 0 at batch 8:
    393 keys, 56 programs of 64 keys for 132 SMs, each looping over 25089 queries). A chunk
    with no query block writes zeros.

    Traffic: K, V, dK, dV once per chunk; q, dO, LSE, delta and the table rows once per key
    block (L2).
    Tiles stay in the (query, key) orientation and the dots take tl.trans(p) / tl.trans(ds);
    tutorial 06 instead computes k q^T directly (a GPU tuning item). With SPLIT_D, s and dP
    sum two head-dim dots each, and dk, dv are two accumulators each (one per half).
    """
    qk_scale = tl.cast(qk_scale, tl.float32)  # fp64 under torch.compile (see _attn_fwd)
    scale = tl.cast(scale, tl.float32)
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    pid_c = tl.program_id(2)
    off_b = (pid_bh // H).to(tl.int64)
    off_hd = (pid_bh % H).to(tl.int64)
    Q += aligned(off_b * stride_qb + off_hd * stride_qh, ROW_ALIGN)
    K += aligned(off_b * stride_kb + off_hd * stride_kh, ROW_ALIGN)
    V += aligned(off_b * stride_vb + off_hd * stride_vh, ROW_ALIGN)
    R += off_b * stride_rb + off_hd * stride_rh
    DO += aligned(off_b * stride_dob + off_hd * stride_doh, ROW_ALIGN)
    DK += aligned(pid_c.to(tl.int64) * stride_dkc + off_b * stride_dkb + off_hd * stride_dkh, ROW_ALIGN)
    DV += aligned(pid_c.to(tl.int64) * stride_dvc + off_b * stride_dvb + off_hd * stride_dvh, ROW_ALIGN)
    D = aligned(D, ROW_ALIGN)
    stride_qm = aligned(stride_qm, ROW_ALIGN)
    stride_kn = aligned(stride_kn, ROW_ALIGN)
    stride_vn = aligned(stride_vn, ROW_ALIGN)
    stride_dom = aligned(stride_dom, ROW_ALIGN)
    stride_dkn = aligned(stride_dkn, ROW_ALIGN)
    stride_dvn = aligned(stride_dvn, ROW_ALIGN)
    LSE += pid_bh.to(tl.int64) * Nq
    DELTA += pid_bh.to(tl.int64) * Nq

    BLOCK_D0: tl.constexpr = BLOCK_D_LO if SPLIT_D else BLOCK_D  # first head-dim tile
    EVEN_D0: tl.constexpr = True if SPLIT_D else EVEN_D
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m0 = tl.arange(0, BLOCK_M)
    k_t, k_t_hi = _load_d(K, stride_kn, stride_kd, offs_n, Nk, D, EVEN_N, True,
                          BLOCK_D0, EVEN_D0, SPLIT_D, BLOCK_D_HI, EVEN_D_HI)
    v_t, v_t_hi = _load_d(V, stride_vn, stride_vd, offs_n, Nk, D, EVEN_N, True,
                          BLOCK_D0, EVEN_D0, SPLIT_D, BLOCK_D_HI, EVEN_D_HI)
    DTYPE = Q.dtype.element_ty

    dk = tl.zeros([BLOCK_N, BLOCK_D0], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D0], dtype=tl.float32)
    if SPLIT_D:
        dk_hi = tl.zeros([BLOCK_N, BLOCK_D_HI], dtype=tl.float32)
        dv_hi = tl.zeros([BLOCK_N, BLOCK_D_HI], dtype=tl.float32)
    # This chunk's query rows: [m_start, m_end), whole BLOCK_M blocks (the last one masked).
    chunk_rows = tl.cdiv(tl.cdiv(Nq, BLOCK_M), Q_CHUNKS) * BLOCK_M
    m_start = pid_c * chunk_rows
    m_end = tl.minimum(m_start + chunk_rows, Nq)
    for start_m in range(m_start, m_end, BLOCK_M):
        offs_m = start_m + offs_m0
        q, q_hi = _load_d(Q, stride_qm, stride_qd, offs_m, Nq, D, EVEN_M, False,
                          BLOCK_D0, EVEN_D0, SPLIT_D, BLOCK_D_HI, EVEN_D_HI)
        do, do_hi = _load_d(DO, stride_dom, stride_dod, offs_m, Nq, D, EVEN_M, False,
                            BLOCK_D0, EVEN_D0, SPLIT_D, BLOCK_D_HI, EVEN_D_HI)
        if EVEN_M:
            lse = tl.load(LSE + offs_m)
            delta = tl.load(DELTA + offs_m)
        else:
            lse = tl.load(LSE + offs_m, mask=offs_m < Nq, other=float("inf"))  # p = 0 on pad rows
            delta = tl.load(DELTA + offs_m, mask=offs_m < Nq, other=0.0)
        rt_hi, rt_lo, rh_hi, rh_lo, rw_hi, rw_lo = _load_tables(
            R, stride_rm, stride_rk, offs_m, Nq, Kt, Kh, Kw, off_h, off_w, DTYPE, BLOCK_M,
            HAS_CLS, HAS_REL_T, HAS_REL_H, HAS_REL_W, PAD_T, PAD_H, PAD_W, IS_FP32)
        s = _scores(q, q_hi, k_t, k_t_hi, offs_n, Nk, Kh, Kw, qk_scale,
                    rt_hi, rt_lo, rh_hi, rh_lo, rw_hi, rw_lo,
                    HAS_CLS, HAS_REL_T, HAS_REL_H, HAS_REL_W, PAD_T, PAD_H, PAD_W,
                    IS_FP32, PRECISION, EVEN_N, SPLIT_D)
        p = tl.math.exp2(s - lse[:, None])
        p_t = tl.trans(p.to(DTYPE))
        dv = tl.dot(p_t, do, dv, input_precision=PRECISION)
        if SPLIT_D:
            dv_hi = tl.dot(p_t, do_hi, dv_hi, input_precision=PRECISION)
        dp = _dot_d(do, do_hi, v_t, v_t_hi, PRECISION, SPLIT_D)
        ds_t = tl.trans((p * (dp - delta[:, None])).to(DTYPE))
        dk = tl.dot(ds_t, q, dk, input_precision=PRECISION)
        if SPLIT_D:
            dk_hi = tl.dot(ds_t, q_hi, dk_hi, input_precision=PRECISION)

    _store_cols(DK, stride_dkn, stride_dkd, dk * scale, offs_n, Nk, D, 0, BLOCK_D0, EVEN_N, EVEN_D0)
    _store_cols(DV, stride_dvn, stride_dvd, dv, offs_n, Nk, D, 0, BLOCK_D0, EVEN_N, EVEN_D0)
    if SPLIT_D:
        _store_cols(DK, stride_dkn, stride_dkd, dk_hi * scale, offs_n, Nk, D, BLOCK_D0, BLOCK_D_HI,
                    EVEN_N, EVEN_D_HI)
        _store_cols(DV, stride_dvn, stride_dvd, dv_hi, offs_n, Nk, D, BLOCK_D0, BLOCK_D_HI,
                    EVEN_N, EVEN_D_HI)


# ---------------------------------------------------------------------------------------
# Configs and launchers
# ---------------------------------------------------------------------------------------

_CONFIG_ENV = "MVIT_FAST_TRITON_CONFIG"  # e.g. "BLOCK_M=64,BLOCK_N=32,num_warps=4,num_stages=2"
# Which head-dim layouts the autotuner times (a pinned config's SPLIT_D=0/1 wins over it).
_SPLIT_ENV = "MVIT_FAST_TRITON_SPLIT_D"
_SPLIT_CHOICES = {"auto": (False, True), "0": (False,), "1": (True,)}
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
    if pass_name == "dq" and (block_n > 64 or (block_m > 64 and num_warps < 8)):
        # Spill bytes per thread of the dq pass compiled for sm_90 (triton 3.9, d = 96 bf16,
        # a contiguous launch's specialization, 1-2 stages, split | pad layout): 128 x 32 w8
        # 0-36 | 72-128, 64 x 32 w4 32-72 | 128-160, 64 x 64 w4/w8 224-276 | 244-372,
        # 128 x 64 w8 148-236 | 312-340. Left out: 64 x 128 1.0-2.0 KB, 128-row tiles on
        # 4 warps 1.4-3.6 KB, and (in `_configs`) the 32-row tiles: 32 x 32 200-340 B,
        # 32 x 64 0.8-1.0 KB, 32 x 128 2.6-4 KB or, on 8 warps, a collapse to 32 registers
        # and ~20 KB of spills.
        return False
    if pass_name == "dq" and block_n == 64 and num_stages == 1:
        # Wrong table gradients on an H100 (Triton 3.6, MViTv2-S block 1): 64 x 64 padded and
        # 128 x 64 split, both at 1 stage, relative error 2.5-3.3 (every other tile: 0.005-0.006).
        return False
    return True


def _keep_split(block_m: int, block_n: int, num_stages: int, stages: Sequence[int], pass_name: str) -> bool:
    """Split configs timed next to the padded ones: tiles of at least 64 x 64, where the idle
    MMA columns of a padded head dim cost the most, at the deepest pipeline; the dq pass at
    every depth (its one spill-free config on sm_90 is 128 x 32, 8 warps, split, 1 stage:
    `_keep`). The backward's 32-row tiles are left out: compiled for sm_90 (triton 3.9),
    the dq pass at 32 x 128 collapses to 32 registers and ~20 KB of spills per thread."""
    deepest = num_stages == max(stages) or pass_name == "dq"
    return block_m >= 64 and block_m * block_n >= 64 * 64 and deepest


# The default search space: a few configs per pass, (BLOCK_M, BLOCK_N, num_warps, num_stages)
# per layout (SPLIT_D False / True), picked from the sm_90 register counts in `_keep`, plus
# `_FALLBACK`. Compiling the whole space of `_full_configs` takes minutes per head dim, dtype
# and table set; MVIT_FAST_TRITON_TUNE=full opts into it. Every compact config is one `_keep`
# keeps (dq's 64-key tiles at 1 stage miscompiled; tests/test_fused_attention.py checks each
# config on a GPU).
_COMPACT = {
    "fwd": {False: [(64, 32, 4, 2), (64, 64, 4, 2), (128, 64, 8, 2), (128, 64, 8, 3), (128, 128, 8, 2)],
            True: [(64, 64, 4, 3), (128, 64, 8, 3)]},
    "dq": {False: [(64, 32, 4, 1), (64, 32, 4, 2), (64, 64, 8, 2), (128, 32, 8, 1), (128, 64, 8, 2)],
           True: [(128, 32, 8, 1)]},
    "dkdv": {False: [(32, 32, 4, 1), (32, 64, 4, 2), (64, 64, 4, 1), (64, 64, 8, 2), (64, 128, 8, 2)],
             True: [(64, 64, 8, 2), (64, 128, 8, 2)]},
}
# A 16 x 16 tile in every search space, so that the autotuner (which skips a config that does
# not fit the device, OutOfResources) has one that launches on GPUs with less shared memory
# than sm_90's 227 KB: compiled for sm_89 (99 KB), the other tiles of the dq pass need 119 KB
# and more at fp32, d = 96, while 16 x 16 needs 37 / 70 / 70 KB (fwd / dq / dkdv) at fp32,
# d = 256, key grid 8 x 14 x 14. Where a larger tile fits, it is faster and chosen.
_FALLBACK = (16, 16, 4, 1)
_TUNE_ENV = "MVIT_FAST_TRITON_TUNE"


def _configs(pass_name: str, layouts: Sequence[bool] = (False,),
             space: str = "compact") -> list[triton.Config]:
    """Autotune search space of one pass (CUDA only): `_COMPACT`, or with space="full" the
    whole tile space of `_full_configs`."""
    fallback = _config(*_FALLBACK, split=False)
    if space == "full":
        return [*_full_configs(pass_name, layouts), fallback]
    compact = [_config(*tile, split=split) for split in layouts for tile in _COMPACT[pass_name][split]]
    return [*compact, fallback]


def _config(block_m: int, block_n: int, num_warps: int, num_stages: int, split: bool) -> triton.Config:
    return triton.Config({"BLOCK_M": block_m, "BLOCK_N": block_n, "SPLIT_D": split}, num_warps=num_warps,
                         num_stages=num_stages)


def _full_configs(pass_name: str, layouts: Sequence[bool] = (False,)) -> list[triton.Config]:
    """The whole autotune search space of one pass, filtered by `_keep`.

    MViT's query counts are long (393 to 25089 per head), so the forward and the dq pass
    (both tiled over queries) use 64/128-row tiles; the dkdv pass tiles keys (BLOCK_N) and
    loops over 32/64-row query blocks. num_stages counts: with the alignment a contiguous
    launch specializes on, the key (query) loop's loads become cp.async pipelines.

    `layouts` lists the SPLIT_D values to time (see `head_dim_split`). With both, the split
    configs are only the `_keep_split` ones (fwd 20 + 9 configs, dq 10 + 8, dkdv 18 + 4,
    instead of doubling the compile time); with one layout pinned (MVIT_FAST_TRITON_SPLIT_D)
    that layout gets the whole tile space, so a pinned pad-vs-split comparison is fair.
    """
    blocks_m = (32, 64) if pass_name == "dkdv" else (64, 128)
    stages = (2, 3) if pass_name == "fwd" else (1, 2)
    thin_split = len(layouts) > 1
    return [
        _config(bm, bn, w, s, split)
        for split in layouts for bm in blocks_m for bn in (32, 64, 128) for w in (4, 8) for s in stages
        if _keep(bm, bn, w, s, pass_name)
        and not (split and thin_split and not _keep_split(bm, bn, s, stages, pass_name))
    ]


INTERPRETED = is_interpreted(_attn_fwd)


def _pinned_config() -> dict[str, int] | None:
    """One fixed config: from MVIT_FAST_TRITON_CONFIG, or the small interpreter one."""
    return pinned_config(_CONFIG_ENV, ("BLOCK_M", "BLOCK_N"), {"num_warps": 4, "num_stages": 2},
                         _INTERPRETER_CONFIG if INTERPRETED else None)


def _layouts(split_ok: bool) -> tuple[bool, ...]:
    """The SPLIT_D values a launch may use: both (the autotuner times them), or the one that
    MVIT_FAST_TRITON_SPLIT_D pins; only the padded one where the head dim does not split."""
    choice = os.environ.get(_SPLIT_ENV, "auto")
    if choice not in _SPLIT_CHOICES:
        raise ValueError(f"{_SPLIT_ENV}={choice!r}: expected one of {sorted(_SPLIT_CHOICES)} "
                         "(auto: time both head-dim layouts, 0: pad, 1: split)")
    return _SPLIT_CHOICES[choice] if split_ok else (False,)


# ROW_ALIGN is keyed: unaligned variants load scalar, unpipelined, and may spill, so their best
# tile can differ; a shape seen both ways is tuned twice.
_TUNE_KEY = ["NQ_BUCKET", "NK_BUCKET", "D", "HAS_REL_T", "HAS_REL_H", "HAS_REL_W", "PAD_T", "PAD_H",
             "PAD_W", "ROW_ALIGN"]
_KERNELS = {"fwd": _attn_fwd, "dq": _attn_bwd_dq, "dkdv": _attn_bwd_dkdv}
# pass -> (the pinned config (a dict) or the autotuner it last launched, its query chunks),
# for `launch_configs`.
_LAST_LAUNCH: dict[str, tuple[object, int]] = {}


def _tune_space() -> str:
    space = os.environ.get(_TUNE_ENV, "compact")
    if space not in ("compact", "full"):
        raise ValueError(f"{_TUNE_ENV}={space!r}: expected 'compact' (a few configs per pass, the "
                         "default) or 'full' (the whole tile space: minutes of compiling per shape)")
    return space


@functools.cache
def _tuned(pass_name: str, layouts: tuple[bool, ...], space: str):
    key = [*_TUNE_KEY, "Q_CHUNKS"] if pass_name == "dkdv" else _TUNE_KEY  # chunks change the loop length
    return triton.autotune(configs=_configs(pass_name, layouts, space), key=key)(_KERNELS[pass_name])


def _launch(wrap: Callable, pass_name: str, grid_axis: str, n_rows: int, heads: int,
            *args, chunks: int = 1, **kwargs) -> None:
    """Launch one pass on a (row blocks, batch*heads, chunks) grid: a pinned config
    (interpreter, env var) or the autotuner (CUDA)."""
    cfg = _pinned_config()
    split_ok = kwargs.pop("_SPLIT_OK")
    layouts = _layouts(split_ok)
    if cfg is not None:
        # A SPLIT_D in the pinned config wins over MVIT_FAST_TRITON_SPLIT_D; a head dim that
        # does not split runs padded whatever is asked.
        cfg["SPLIT_D"] = split_ok and bool(cfg.get("SPLIT_D", layouts == (True,)))
        grid = (triton.cdiv(n_rows, cfg[grid_axis]), heads, chunks)
        kwargs["EVEN_M"] = kwargs.pop("_NQ") % cfg["BLOCK_M"] == 0
        kwargs["EVEN_N"] = kwargs.pop("_NK") % cfg["BLOCK_N"] == 0
        _LAST_LAUNCH[pass_name] = dict(cfg), chunks
        wrap(_KERNELS[pass_name])[grid](*args, **kwargs, **cfg)
        return
    kwargs["EVEN_M"] = kwargs.pop("_NQ") % _MAX_BLOCK == 0
    kwargs["EVEN_N"] = kwargs.pop("_NK") % _MAX_BLOCK == 0
    grid = lambda meta: (triton.cdiv(n_rows, meta[grid_axis]), heads, chunks)
    tuner = _tuned(pass_name, layouts, _tune_space())
    _LAST_LAUNCH[pass_name] = tuner, chunks
    wrap(tuner)[grid](*args, **kwargs)


def launch_configs() -> dict[str, dict | None]:
    """The config each pass ("fwd", "dq", "dkdv") last launched with: BLOCK_M, BLOCK_N, SPLIT_D,
    num_warps, num_stages, and for dkdv its Q_CHUNKS (`dkdv_chunks`). For tests and benchmark
    reports.

    Autotuned passes report the autotuner's `best_config`, the config of its last call. That
    holds for eager launches only: under torch.compile, Inductor autotunes its own copy of the
    configs and the autotuner here is not called (its report stays stale or None).
    """
    report = {}
    for name, (launch, chunks) in _LAST_LAUNCH.items():
        if isinstance(launch, dict):
            report[name] = dict(launch)
        else:
            best = getattr(launch, "best_config", None)
            report[name] = None if best is None else {
                **best.kwargs, "num_warps": best.num_warps, "num_stages": best.num_stages}
        if name == "dkdv" and report[name] is not None:
            report[name]["Q_CHUNKS"] = chunks
    return report


def _pad(n: int) -> int:
    return max(16, triton.next_power_of_2(n))  # tl.dot needs every dimension >= 16


def head_dim_split(d: int) -> tuple[int, int] | None:
    """(BLOCK_D_LO, BLOCK_D_HI) of the split head-dim layout, or None where it does not pay.

    d = lo + rest with lo the largest power of two <= d and the rest padded to a power of
    two >= 16: 96 = 64 + 32, 72 = 64 + (8 -> 16), 144 = 128 + 16. None where that is no
    narrower than padding d to a power of two: d a power of two and every d outside
    33-48, 65-96 and 129-192 (e.g. 24 = 16 + (8 -> 16) is 32 columns either way).
    """
    lo = 1 << (d.bit_length() - 1)
    hi = _pad(d - lo)
    return (lo, hi) if lo < d and lo >= 16 and lo + hi < _pad(d) else None


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rel: torch.Tensor,
           k_grid: Sequence[int], rel_axes: Sequence[bool], has_cls: bool) -> None:
    """The launcher's own invariants (user-facing checks live in `pooled_attention`)."""
    if q.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"triton pooled attention takes float32/float16/bfloat16, got {q.dtype}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.is_cuda or INTERPRETED or compiling_only()):
        raise ValueError(f"triton pooled attention needs CUDA tensors (or TRITON_INTERPRET=1), "
                         f"got {q.device}")
    if INTERPRETED and not q.is_cuda and q.dtype == torch.bfloat16:
        raise TypeError("Triton's interpreter computes bfloat16 tl.dot wrongly (Triton 3.9): run the "
                        "interpreted kernels in float16 or float32, bfloat16 on a GPU")
    if q.ndim != 4 or k.shape != v.shape or q.shape[:2] != k.shape[:2] or q.shape[3] != k.shape[3]:
        raise ValueError(f"expected q (B, heads, Nq, d) and k, v (B, heads, Nk, d), got "
                         f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    if q.shape[3] > MAX_HEAD_DIM:
        raise ValueError(f"head_dim {q.shape[3]} > {MAX_HEAD_DIM} is not supported")
    if q.shape[0] * q.shape[1] > MAX_BATCH_HEADS:
        raise ValueError(f"batch x heads = {q.shape[0] * q.shape[1]} > {MAX_BATCH_HEADS} (CUDA's "
                         "grid limit): split the batch")
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
    # Two head-dim layouts. Padded: one tile of BLOCK_D = next power of two columns, masked
    # past d (96 -> 128, 72 -> 128: 25-44% of the MMA columns of q k^T, P v, dS k, dS^T q,
    # P^T dO compute zeros). Split (SPLIT_D): an exact tile of BLOCK_D_LO columns plus a
    # padded one of BLOCK_D_HI (96 = 64 + 32, no idle column; 72 = 64 + 16): fewer MMA
    # columns and accumulator registers, but two dots per product and more live tiles.
    # Which is faster depends on the shape and tile config, so SPLIT_D is a config
    # parameter the autotuner times (`_configs`); BLOCK_D_LO/HI are fixed by d.
    block_d = _pad(d)
    split = head_dim_split(d)
    block_d_lo, block_d_hi = split or (block_d, 0)
    is_fp32 = q.dtype == torch.float32
    return dict(
        H=q.shape[1], Nq=q.shape[2], Nk=k.shape[2], D=d, Kt=kt, Kh=kh, Kw=kw,
        off_h=off_h, off_w=off_w, qk_scale=scale * LOG2E,
        NQ_BUCKET=triton.next_power_of_2(q.shape[2]), NK_BUCKET=triton.next_power_of_2(k.shape[2]),
        HAS_CLS=int(has_cls), HAS_REL_T=has_t, HAS_REL_H=has_h, HAS_REL_W=has_w,
        PAD_T=_pad(kt), PAD_H=_pad(kh), PAD_W=_pad(kw),
        IS_FP32=is_fp32, PRECISION="ieee" if is_fp32 else "tf32",
        EVEN_D=d == block_d, BLOCK_D=block_d, _NQ=q.shape[2], _NK=k.shape[2],
        BLOCK_D_LO=block_d_lo, BLOCK_D_HI=block_d_hi, EVEN_D_HI=block_d_lo + block_d_hi == d,
        _SPLIT_OK=split is not None,
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
            **_common(q, k, rel, k_grid, rel_axes, has_cls, scale), RESIDUAL=bool(residual),
            ROW_ALIGN=row_align(q, k, v, out))
    return out, lse


def attention_backward(
    dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rel: torch.Tensor,
    out: torch.Tensor, lse: torch.Tensor,
    k_grid: Sequence[int], rel_axes: Sequence[bool], has_cls: bool, residual: bool, scale: float,
    *, wrap: Callable = _identity, chunks: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fused backward. Returns (dq, dk, dv in the input dtype, drel fp32 shaped like rel).

    dq holds only the direct path (scores and residual); the gradient that reaches q
    through the tables is drel's, carried by autograd of the table einsum. Arguments as
    in `attention_forward`, plus dout (the gradient of out, any strides) and the forward's
    out and LSE, exactly as it returned them; `chunks` sets the dkdv pass's query chunks
    (None: `dkdv_chunks` picks them for the device).

    The softmax delta_i = dO_i . attn_i starts from the forward's out (attn = out - q on
    residual rows) and is made exact inside the dq pass (`_attn_bwd_dq`): the table
    gradients and dk see the exact delta, dq the one from the rounded out, as in
    FlashAttention. The dq error this leaves, against the float64 oracle in units of the
    test tolerance (`tests/numerics.py`), on the test cases and the MViTv2-S block shapes:
    bf16 <= 0.15, fp16 <= 0.08. Delta taken from out alone would put the table gradients of
    the MViTv2-S blocks 2.3-8x over in bf16 (up to 3.8x in fp16); even from attn rounded once
    (FlashAttention's O), 1.2-2.3x. Saving out costs one (Nq x d) tensor in the input dtype
    per call, linear in Nq.
    """
    _check(q, k, v, rel, k_grid, rel_axes, has_cls)
    if dout.shape != q.shape or out.shape != q.shape or lse.shape != q.shape[:3]:
        raise ValueError(f"dout {tuple(dout.shape)}, out {tuple(out.shape)} and lse "
                         f"{tuple(lse.shape)} do not match q {tuple(q.shape)}")
    if out.dtype != q.dtype:
        raise TypeError(f"out must be in q's dtype {q.dtype}, got {out.dtype}")
    batch, heads, nq, d = q.shape
    nk = k.shape[2]
    dq = torch.empty((batch, heads, nq, d), device=q.device, dtype=q.dtype)
    # dkdv writes (chunks, B, heads, Nk, d): dk and dv themselves (one chunk) or fp32 partials.
    if chunks is None:
        chunks = dkdv_chunks(nq, nk, batch * heads, _sm_count(q.device.index) if q.is_cuda else 0)
    if chunks == 1:
        dk = torch.empty((batch, heads, nk, d), device=q.device, dtype=q.dtype)
        dv = torch.empty((batch, heads, nk, d), device=q.device, dtype=q.dtype)
        dk_chunks, dv_chunks = dk.unsqueeze(0), dv.unsqueeze(0)
    else:
        dk_chunks = torch.empty((chunks, batch, heads, nk, d), device=q.device, dtype=torch.float32)
        dv_chunks = torch.empty((chunks, batch, heads, nk, d), device=q.device, dtype=torch.float32)
    drel = torch.empty(rel.shape, device=q.device, dtype=torch.float32)  # every element written
    delta = torch.empty((batch, heads, nq), device=q.device, dtype=torch.float32)
    lse = lse.contiguous()
    common = _common(q, k, rel, k_grid, rel_axes, has_cls, scale)
    rel_arg = rel if rel.numel() else delta  # never read when no table is present
    drel_arg = drel if drel.numel() else delta  # never written when no table is present
    _launch(wrap, "dq", "BLOCK_M", nq, batch * heads,
            q, k, v, rel_arg, out, dout, lse, delta, dq, drel_arg,
            *q.stride(), *k.stride(), *v.stride(), *_strides4(rel), *out.stride(), *dout.stride(),
            *dq.stride(), *_strides4(drel), scale=scale, RESIDUAL=bool(residual), **common,
            ROW_ALIGN=row_align(q, k, v, out, dout, dq))
    # dkdv reads the delta that dq wrote: same stream, launch order is the dependency.
    _launch(wrap, "dkdv", "BLOCK_N", nk, batch * heads,
            q, k, v, rel_arg, dout, lse, delta, dk_chunks, dv_chunks,
            *q.stride(), *k.stride(), *v.stride(), *_strides4(rel), *dout.stride(),
            *dk_chunks.stride(), *dv_chunks.stride(), scale=scale, Q_CHUNKS=chunks, chunks=chunks,
            **common, ROW_ALIGN=row_align(q, k, v, dout, dk_chunks, dv_chunks))
    if chunks > 1:  # summed in a fixed order (deterministic), rounded to the input dtype once
        dk, dv = dk_chunks.sum(0).to(q.dtype), dv_chunks.sum(0).to(q.dtype)
    return dq, dk, dv, drel


_CHUNKS_ENV = "MVIT_FAST_TRITON_DKDV_CHUNKS"
# At least this many query rows per chunk, so a chunk's fixed cost (k, v loaded, dk, dv
# partials stored and summed) stays small next to its loop over query blocks.
_MIN_CHUNK_ROWS = 1024


def dkdv_chunks(nq: int, nk: int, batch_heads: int, sm_count: int) -> int:
    """How many query chunks the dkdv pass splits into (1: none) on a GPU of `sm_count` SMs
    (0: not a GPU, no chunks): enough that its programs number about two per SM, assuming
    64-key blocks, with at least 1024 queries per chunk. MVIT_FAST_TRITON_DKDV_CHUNKS=n pins
    it (1 turns chunking off; chunks beyond the query blocks are empty and write zeros).

    MViTv2 at batch 8 on an H100 (132 SMs): S block 0 (25089 x 393 keys, 1 head) runs in 5
    chunks, S block 2 and B blocks 0-1 in 3, B blocks 3-4 in 2, every other block in 1.
    """
    pinned = os.environ.get(_CHUNKS_ENV)
    if pinned:
        if not pinned.isdigit() or not 1 <= int(pinned) <= MAX_BATCH_HEADS:
            raise ValueError(f"{_CHUNKS_ENV}={pinned!r}: expected an integer from 1 to "
                             f"{MAX_BATCH_HEADS} (CUDA's grid limit)")
        return int(pinned)
    if sm_count <= 0:
        return 1
    wanted = triton.cdiv(2 * sm_count, triton.cdiv(nk, 64) * batch_heads)
    return max(1, min(wanted, nq // _MIN_CHUNK_ROWS))


@functools.cache
def _sm_count(index: int | None) -> int:
    return torch.cuda.get_device_properties(torch.device("cuda", index)).multi_processor_count


def _strides4(t: torch.Tensor) -> tuple[int, int, int, int]:
    """Strides of a 4-D tensor; (0, 0, 0, 0) for an empty one (it is never addressed)."""
    return tuple(t.stride()) if t.numel() else (0, 0, 0, 0)
