"""Fused MViTv2 pooling: depthwise Conv3d + LayerNorm of q, k or v straight from the qkv projection.

What it replaces (DESIGN.md section 3, step 2), per member of qkv and per head:
drop cls; view as (B*heads, d, T, H, W); depthwise Conv3d(d, d, k, stride, padding k // 2,
groups=d, bias=False), the weight shared by the heads; flatten; cls back in front (it skips
the conv); LayerNorm(d) over every token, cls included. The eager ops move each member
through ~5 full-size copies (slice, permute to channels-first, conv, transpose, cat, norm);
here one program reads its input windows once and writes normed tokens once.

Support contract:
- Input: the qkv projection in its natural layout, qkv (B, N, 3, heads, d) with
  N = cls + T*H*W and any strides, plus which member (q 0, k 1, v 2) to pool; the kernels
  address the whole tensor (no slice is handed to a kernel, which keeps torch.compile's
  functionalization of the gradient writes simple). Output: (B, heads, N', d) contiguous,
  cls first: the layout the attention kernel reads.
- Any stride and grid (odd sizes included), odd kernels of size 1 or 3 per axis with
  padding k // 2 (MViTv2: (3, 3, 3) everywhere), head_dim up to 256 padded to a power of
  two with masks (96, 72, 144 -> 128, 128, 256).
- fp32 / fp16 / bf16 activations, weights of any float dtype; the conv sum and the
  LayerNorm statistics in fp32.
- Deterministic, no atomics: every output element has one writer; the weight gradients
  are per-program fp32 partials summed in torch in a fixed order.

Passes (launchers at the bottom; `wrap` lets the caller route launches through
`torch.library.wrap_triton`), each tiled by groups of GROUP_W consecutive w positions
(see "Groups along w"):
- `pool_norm_forward`: `_pool_norm_fwd`, one program per (block of output groups, batch*head).
- `pool_norm_backward`: `_pool_norm_bwd_dz` (LayerNorm backward -> dz, plus the conv-weight
  and LayerNorm-weight partials), then `_pool_norm_bwd_dx` (the transposed conv as a
  gather: each input token sums the dz of the output tokens whose window covers it).
The forward saves nothing: the backward recomputes the conv output and its statistics
from x (cached loads instead of a stored fp32 tensor).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import torch
import triton
import triton.language as tl

from ._launch import MAX_BATCH_HEADS, aligned, compiling_only, is_interpreted, pinned_config, row_align

__all__ = ["INTERPRETED", "MAX_BATCH_HEADS", "MAX_HEAD_DIM", "pool_norm_backward", "pool_norm_forward",
           "pooled_size"]

MAX_HEAD_DIM = 256
_KERNEL_SIZES = (1, 3)  # per axis; padding k // 2


# ---------------------------------------------------------------------------------------
# Shared pieces
# ---------------------------------------------------------------------------------------

# Vector loads. Every pass reads whole token rows of d channels, so its loads vectorize to
# 16 bytes where the compiler can prove rows 8-element aligned: at d = 72 (MViTv2-L) only
# with ROW_ALIGN (`_launch.aligned`), and the weights only tap-major (`_tap_major`). sm_90
# bf16, MViTv2-L block 0, BLOCK_M 16, 8 warps, fwd / dz / dx, before -> after both: scalar
# 16-bit loads 253 / 476 / 251 -> 0, ld.global.v4 0 -> 57 / 84 / 55, spills 0 / 2412 / 328 ->
# 0 / 68 / 0 bytes. At d = 96 (S, B) the 216 scalar weight loads per pass go (dz spill 36 -> 60).

# Groups along w. A program row is a group of GROUP_W (1 to 4, a tile parameter) consecutive
# w positions of one (t, h) line: each input of a (kt, kh) line is loaded and converted to
# fp32 once per group and feeds every position of the group whose window covers it (at
# stride 1 and GROUP_W 4, 6 loads for 4 outputs instead of 12), and each tap's weights
# serve the whole group. Machine code (sm_90, Triton 3.6, bf16, MViTv2-S block 0, 16 rows
# x 8 warps), warp-instructions per output token at GROUP_W 1 -> 4, q at stride 1 / k and v
# at stride 8: fwd 580 / 588 -> 325 / 461, dx 536 / 561 -> 292 / 201. The dz pass would go
# 2105 -> 913 at stride 1 (its weight-gradient partials reduced across warps once per
# group), but holding four z and four dz tiles it spills past the compile check's bound at
# the stride-8 k and v (808 bytes per thread at 8 groups x 8 warps under Triton 3.9), so it
# autotunes GROUP_W 1 only; the forward and dx autotune both widths. The positions are up
# to four named register tiles (z0..z3), read and written by compile-time index (`_pick`,
# `_add_to`, `_put`); the unused ones are never read and compile away.
_GROUPS = (1, 2, 3, 4)


@triton.jit
def _group_coords(offs_g, To, Ho, Wo, GROUP: tl.constexpr, HAS_CLS: tl.constexpr):
    """Program rows -> groups of GROUP positions of a (To, Ho, Wo) grid, cls first.

    Returns (t, h, first w) of each row's group; `in_grid`, whether the row is a group of
    the grid; `is_cls`, whether it is the cls token (row 0 where HAS_CLS: one position, not
    pooled); and `rows`, the token row of the group's first position (0 for cls). A line of
    Wo positions has cdiv(Wo, GROUP) groups; the positions of the last one past Wo are
    masked by the callers. The divisions are 32-bit (an int64 one compiles to a runtime
    range check and a call); the results are int64, so every token offset built from them
    is 64-bit (it also spares the interpreter's int32 overflow checks in the tap loops).
    """
    per_line = tl.cdiv(Wo, GROUP)
    g = tl.maximum(offs_g - HAS_CLS, 0)
    line = g // per_line
    t = (line // Ho).to(tl.int64)
    h = (line % Ho).to(tl.int64)
    w_first = (g % per_line).to(tl.int64) * GROUP
    is_cls = offs_g < HAS_CLS
    in_grid = (offs_g >= HAS_CLS) & (line < To * Ho)
    rows = tl.where(is_cls, 0, HAS_CLS + (t * Ho + h) * Wo + w_first)
    return t, h, w_first, in_grid, is_cls, rows


@triton.jit
def _position_ok(r: tl.constexpr, in_grid, is_cls, w_first, Wo):
    """Which rows hold position r of their group: inside the line, or (r = 0) the cls row."""
    ok = in_grid & (w_first + r < Wo)
    if r == 0:
        ok = ok | is_cls
    return ok


@triton.jit
def _cls_row(P, stride_c, like, offs_d, is_cls, d_ok):
    """Row 0 of P (the cls token) in the rows `is_cls` of a (rows of `like`, BLOCK_D) tile, fp32."""
    x = tl.load(P + like[:, None] * 0 + offs_d[None, :] * stride_c,
                mask=is_cls[:, None] & d_ok[None, :], other=0.0)
    return x.to(tl.float32)


@triton.jit
def _pick(r: tl.constexpr, a, b, c, d):
    """The r-th of four values, r known at compile time."""
    x = a
    if r == 1:
        x = b
    if r == 2:
        x = c
    if r == 3:
        x = d
    return x


@triton.jit
def _put(r: tl.constexpr, v, a, b, c, d):
    """(a, b, c, d) with the r-th replaced by v, r known at compile time."""
    if r == 0:
        a = v
    if r == 1:
        b = v
    if r == 2:
        c = v
    if r == 3:
        d = v
    return a, b, c, d


@triton.jit
def _add_to(r: tl.constexpr, v, a, b, c, d):
    """(a, b, c, d) with v added to the r-th, r known at compile time."""
    return _put(r, _pick(r, a, b, c, d) + v, a, b, c, d)


@triton.jit
def _line_weights(w_ptrs, stride_wk, KW: tl.constexpr):
    """The KW <= 3 taps of one (kt, kh) line as (1, BLOCK_D) fp32 rows (unused ones repeat)."""
    w_a = tl.load(w_ptrs).to(tl.float32)[None, :]
    w_b = w_a
    w_c = w_a
    if KW > 1:
        w_b = tl.load(w_ptrs + stride_wk).to(tl.float32)[None, :]
        w_c = tl.load(w_ptrs + 2 * stride_wk).to(tl.float32)[None, :]
    return w_a, w_b, w_c


@triton.jit
def _line(X, stride_xn, cols, ok, t, h, w0, T, Hi, Wi, d_ok, HAS_CLS: tl.constexpr):
    """Pointers to the input rows (t, h, w0) of a group tile, and their mask: inside the
    grid along t and h (w is masked per load)."""
    ok_th = ok & (t >= 0) & (t < T) & (h >= 0) & (h < Hi)
    ptrs = X + (HAS_CLS + (t * Hi + h) * Wi + w0)[:, None] * stride_xn + cols
    return ptrs, ok_th[:, None] & d_ok[None, :]


@triton.jit
def _line_input(ptrs, mask, j, w0, Wi, stride_xn):
    """Input j of a window line (`_line`), at w = w0 + j, as fp32; zero outside the grid."""
    ok_w = (w0 + j >= 0) & (w0 + j < Wi)
    return tl.load(ptrs + j * stride_xn, mask=mask & ok_w[:, None], other=0.0).to(tl.float32)


@triton.jit
def _conv_group(X, W, stride_xn, stride_xc, stride_wc, stride_wk, to, ho, w_first, in_grid,
                offs_d, d_ok, T, Hi, Wi,
                ST: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr,
                KT: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr, HAS_CLS: tl.constexpr,
                GROUP_W: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr):
    """(z0, z1, z2, z3), each (BLOCK_G, BLOCK_D) fp32: the depthwise conv at w_first + r for
    r < GROUP_W (the others stay zero).

    z_r[c] = sum over taps of w[c, tap] * x[window, c], tap (kt, kh, kw) of output
    (t, h, w) reading input (t * ST + kt - KT // 2, h * SH + kh - KH // 2, w * SW + kw -
    KW // 2), zero outside the grid (the conv's zero padding). On one (kt, kh) line,
    output r reads input j = SW * r + kw of the group's inputs, j < (GROUP_W - 1) * SW + KW:
    each j some output reads (j % SW < KW: all of them where KW > SW) is one masked load of a
    (BLOCK_G, d) tile of whole token rows, added to each r with 0 <= j - SW * r < KW.
    """
    tl.static_assert(KW <= 3 and GROUP_W <= 4)
    t0 = to * ST - KT // 2
    h0 = ho * SH - KH // 2
    w0 = w_first * SW - KW // 2
    cols = offs_d[None, :] * stride_xc
    w_ptrs = W + offs_d * stride_wc
    z0 = tl.zeros([BLOCK_G, BLOCK_D], dtype=tl.float32)
    z1 = tl.zeros([BLOCK_G, BLOCK_D], dtype=tl.float32)
    z2 = tl.zeros([BLOCK_G, BLOCK_D], dtype=tl.float32)
    z3 = tl.zeros([BLOCK_G, BLOCK_D], dtype=tl.float32)
    for kt in tl.static_range(KT):
        for kh in tl.static_range(KH):
            ptrs, mask = _line(X, stride_xn, cols, in_grid, t0 + kt, h0 + kh, w0, T, Hi, Wi, d_ok, HAS_CLS)
            w_a, w_b, w_c = _line_weights(w_ptrs, stride_wk, KW)
            for j in tl.static_range((GROUP_W - 1) * SW + KW):
                if j % SW < KW:  # some output reads input j
                    x = _line_input(ptrs, mask, j, w0, Wi, stride_xn)
                    for r in tl.static_range(GROUP_W):
                        if j - SW * r >= 0 and j - SW * r < KW:
                            xw = x * _pick(j - SW * r, w_a, w_b, w_c, w_c)
                            z0, z1, z2, z3 = _add_to(r, xw, z0, z1, z2, z3)
            w_ptrs += KW * stride_wk
    return z0, z1, z2, z3


@triton.jit
def _conv_weight_grad(dw, dz0, dz1, dz2, dz3, X, stride_xn, stride_xc, to, ho, w_first, in_grid,
                      offs_d, d_ok, T, Hi, Wi,
                      ST: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr,
                      KT: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr, HAS_CLS: tl.constexpr,
                      TAPS_PAD: tl.constexpr, GROUP_W: tl.constexpr, BLOCK_G: tl.constexpr,
                      BLOCK_D: tl.constexpr):
    """dw[tap, c] += sum over the group's outputs r of dz_r[:, c] * x[window(r, tap), c].

    The same loads as `_conv_group` (now cache hits). Per (kt, kh) line the products of its
    KW taps are summed over r in registers, then over the group rows across warps, once per
    tap, right after its last product (input j = kw + SW * (GROUP_W - 1)), which frees its
    registers early (sm_90, Triton 3.6, bf16, MViTv2-S block 0, GROUP_W 1, 16 rows x 4 warps:
    spill stores per thread 804-840 bytes when a line's KW taps reduce at its end, 668-704
    right after). dw is a (TAPS_PAD, BLOCK_D) register tile; tap t's column sum lands in row
    t by a select. Tap kw's first product is that of r = 0 (input j = kw): it sets the
    partial instead of adding to a zero tile (the add of +0.0 does not fold away).
    """
    t0 = to * ST - KT // 2
    h0 = ho * SH - KH // 2
    w0 = w_first * SW - KW // 2
    cols = offs_d[None, :] * stride_xc
    tap_ids = tl.arange(0, TAPS_PAD)[:, None]
    for kt in tl.static_range(KT):
        for kh in tl.static_range(KH):
            ptrs, mask = _line(X, stride_xn, cols, in_grid, t0 + kt, h0 + kh, w0, T, Hi, Wi, d_ok, HAS_CLS)
            p_a = dz0  # placeholders, set by r = 0
            p_b = dz0
            p_c = dz0
            for j in tl.static_range((GROUP_W - 1) * SW + KW):
                if j % SW < KW:  # some output reads input j
                    x = _line_input(ptrs, mask, j, w0, Wi, stride_xn)
                    for r in tl.static_range(GROUP_W):
                        if j - SW * r >= 0 and j - SW * r < KW:
                            xdz = x * _pick(r, dz0, dz1, dz2, dz3)
                            if r == 0:
                                p_a, p_b, p_c, _ = _put(j, xdz, p_a, p_b, p_c, p_c)
                            else:
                                p_a, p_b, p_c, _ = _add_to(j - SW * r, xdz, p_a, p_b, p_c, p_c)
                    kw = j - SW * (GROUP_W - 1)  # the tap whose last product (r = GROUP_W - 1) this was
                    if kw >= 0:
                        part = tl.sum(_pick(kw, p_a, p_b, p_c, p_c), 0)
                        dw = tl.where(tap_ids == (kt * KH + kh) * KW + kw, dw + part[None, :], dw)
    return dw


@triton.jit
def _normalize(z, d_ok, D, eps):
    """LayerNorm statistics over the d valid channels: (zhat, rstd), zhat = 0 on padding."""
    mean = tl.sum(z, 1) / D
    zc = tl.where(d_ok[None, :], z - mean[:, None], 0.0)
    var = tl.sum(zc * zc, 1) / D  # biased, as nn.LayerNorm
    rstd = 1.0 / tl.sqrt(var + eps)
    return zc * rstd[:, None], rstd


@triton.jit
def _norm_store(Y, rows, cols, row_ok, z, gamma, beta, d_ok, D, eps):
    """y = LayerNorm(z) * gamma + beta of rows `rows` (fp32 statistics), stored in Y's dtype."""
    zhat, _ = _normalize(z, d_ok, D, eps)
    tl.store(Y + rows[:, None] + cols, (zhat * gamma + beta).to(Y.dtype.element_ty),
             mask=row_ok[:, None] & d_ok[None, :])


@triton.jit
def _norm_backward(dy_ptrs, dz_ptrs, row_ok, z, gamma, d_ok, D, eps):
    """LayerNorm backward of a tile of token rows: dz (fp32; stored through dz_ptrs in their
    dtype) and the (rows, d) terms of dgamma (dy * zhat) and dbeta (dy).

    With g = dy * gamma: dz = rstd * (g - mean_c(g) - zhat * mean_c(g * zhat)). A row
    outside the grid loads dy = 0 and so gives dz = 0 and no parameter gradient.
    """
    mask = row_ok[:, None] & d_ok[None, :]
    dy = tl.load(dy_ptrs, mask=mask, other=0.0).to(tl.float32)
    zhat, rstd = _normalize(z, d_ok, D, eps)
    g = dy * gamma  # zero on padded rows and channels
    mean_g = tl.sum(g, 1) / D
    mean_gz = tl.sum(g * zhat, 1) / D
    dz = rstd[:, None] * (g - mean_g[:, None] - zhat * mean_gz[:, None])
    dz = tl.where(d_ok[None, :], dz, 0.0)
    tl.store(dz_ptrs, dz.to(dz_ptrs.dtype.element_ty), mask=mask)
    return dz, dy * zhat, dy


# ---------------------------------------------------------------------------------------
# Forward
# ---------------------------------------------------------------------------------------


@triton.jit
def _pool_norm_fwd(
    X, W, G, Bn, Y,
    stride_xb, stride_xn, stride_xg, stride_xh, stride_xc, member,
    stride_wc, stride_wk, stride_g, stride_bn,
    stride_yb, stride_yh, stride_ym, stride_yc,
    H, T, Hi, Wi, To, Ho, Wo, D, eps,
    N_BUCKET,  # autotune key only
    ST: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr,
    KT: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr,
    HAS_CLS: tl.constexpr, GROUP_W: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
    ROW_ALIGN: tl.constexpr,
):
    """Pooled, normed tokens of one (BLOCK_M groups of GROUP_W outputs, batch*head) program,
    all d channels; row 0 of block 0 is the cls token (where HAS_CLS).

    Math: z_m = sum_tap w[:, tap] * x[window(m, tap)] (z_cls = x_cls);
    y_m = (z_m - mean(z_m)) * rstd_m * gamma + beta, rstd_m = 1 / sqrt(var(z_m) + eps),
    statistics over the d channels in fp32.

    Memory traffic per (batch, head): the member's N x d input once from HBM (overlapping
    windows re-read from L1/L2) and N' x d outputs once; the (d, taps) weight and
    gamma/beta are tiny. Total HBM bytes of the three members ~ |qkv| + |q| + |k| + |v|,
    the floor for this op.
    """
    eps = tl.cast(eps, tl.float32)  # torch.compile passes Python floats as fp64 (Inductor's signature)
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    off_b = (pid_bh // H).to(tl.int64)
    off_h = (pid_bh % H).to(tl.int64)
    X += aligned(off_b * stride_xb + member * stride_xg + off_h * stride_xh, ROW_ALIGN)
    Y += aligned(off_b * stride_yb + off_h * stride_yh, ROW_ALIGN)
    stride_xn = aligned(stride_xn, ROW_ALIGN)
    stride_ym = aligned(stride_ym, ROW_ALIGN)
    D = aligned(D, ROW_ALIGN)

    offs_g = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    gamma = tl.load(G + offs_d * stride_g, mask=d_ok, other=0.0).to(tl.float32)[None, :]
    beta = tl.load(Bn + offs_d * stride_bn, mask=d_ok, other=0.0).to(tl.float32)[None, :]
    cols = offs_d[None, :] * stride_yc
    to, ho, w_first, in_grid, is_cls, rows = _group_coords(offs_g, To, Ho, Wo, GROUP_W, HAS_CLS)
    z0, z1, z2, z3 = _conv_group(X, W, stride_xn, stride_xc, stride_wc, stride_wk, to, ho,
                                 w_first, in_grid, offs_d, d_ok, T, Hi, Wi, ST, SH, SW, KT, KH, KW,
                                 HAS_CLS, GROUP_W, BLOCK_M, BLOCK_D)
    if HAS_CLS:  # the cls token is not pooled: normed as it is
        z0 = tl.where(is_cls[:, None], _cls_row(X, stride_xc, to, offs_d, is_cls, d_ok), z0)
    for r in tl.static_range(GROUP_W):
        _norm_store(Y, (rows + r) * stride_ym, cols, _position_ok(r, in_grid, is_cls, w_first, Wo),
                    _pick(r, z0, z1, z2, z3), gamma, beta, d_ok, D, eps)


# ---------------------------------------------------------------------------------------
# Backward
# ---------------------------------------------------------------------------------------


@triton.jit
def _pool_norm_bwd_dz(
    X, W, G, DY, DZ, PW, PG, PB,
    stride_xb, stride_xn, stride_xg, stride_xh, stride_xc, member,
    stride_wc, stride_wk, stride_g,
    stride_dyb, stride_dyh, stride_dym, stride_dyc,
    stride_dzb, stride_dzh, stride_dzm, stride_dzc,
    H, T, Hi, Wi, To, Ho, Wo, D, eps, SPLIT,
    N_BUCKET,  # autotune key only
    ST: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr,
    KT: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr,
    HAS_CLS: tl.constexpr, TAPS_PAD: tl.constexpr,
    GROUP_W: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, ROW_ALIGN: tl.constexpr,
):
    """LayerNorm backward and the weight-gradient partials of one (split, batch*head) program.

    The program walks the blocks of BLOCK_M output groups pid, pid + SPLIT, ... of its
    (batch, head) (row 0 of block 0: the cls token). Per block, with z and zhat recomputed
    as in the forward and g = dy * gamma:
        dz_m = rstd_m * (g_m - mean_c(g_m) - zhat_m * mean_c(g_m * zhat_m))   -> DZ (x's dtype)
        dgamma += sum_m dy_m * zhat_m,  dbeta += sum_m dy_m                   (cls row included)
        dW[c, tap] += sum_m dz[m, c] * x[window(m, tap), c]                   (conv rows only)
    and writes its fp32 partials PW (taps, d), PG (d), PB (d) at row pid_bh * SPLIT + pid;
    the launcher sums the rows in torch (deterministic, no atomics).

    Traffic: x (window loads twice: once for z, once for dW, the second from cache), dy
    and dz once; partials (B*heads*SPLIT) x (taps + 2) x d fp32, written once and summed
    by torch: at MViTv2-S block 0, batch 8, 512 rows = 5.7 MB next to ~115 MB of x, dy, dz.
    """
    eps = tl.cast(eps, tl.float32)  # fp64 under torch.compile (see _pool_norm_fwd)
    pid = tl.program_id(0)
    pid_bh = tl.program_id(1)
    off_b = (pid_bh // H).to(tl.int64)
    off_h = (pid_bh % H).to(tl.int64)
    X += aligned(off_b * stride_xb + member * stride_xg + off_h * stride_xh, ROW_ALIGN)
    DY += aligned(off_b * stride_dyb + off_h * stride_dyh, ROW_ALIGN)
    DZ += aligned(off_b * stride_dzb + off_h * stride_dzh, ROW_ALIGN)
    stride_xn = aligned(stride_xn, ROW_ALIGN)
    stride_dym = aligned(stride_dym, ROW_ALIGN)
    stride_dzm = aligned(stride_dzm, ROW_ALIGN)
    D = aligned(D, ROW_ALIGN)

    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    dy_cols = offs_d[None, :] * stride_dyc
    dz_cols = offs_d[None, :] * stride_dzc
    gamma = tl.load(G + offs_d * stride_g, mask=d_ok, other=0.0).to(tl.float32)[None, :]
    dw = tl.zeros([TAPS_PAD, BLOCK_D], dtype=tl.float32)
    dgamma = tl.zeros([BLOCK_D], dtype=tl.float32)
    dbeta = tl.zeros([BLOCK_D], dtype=tl.float32)
    n_blocks = tl.cdiv(HAS_CLS + To * Ho * tl.cdiv(Wo, GROUP_W), BLOCK_M)
    for blk in range(pid, n_blocks, SPLIT):
        offs_g = blk * BLOCK_M + tl.arange(0, BLOCK_M)
        to, ho, w_first, in_grid, is_cls, rows = _group_coords(offs_g, To, Ho, Wo, GROUP_W, HAS_CLS)
        z0, z1, z2, z3 = _conv_group(X, W, stride_xn, stride_xc, stride_wc, stride_wk, to, ho,
                                     w_first, in_grid, offs_d, d_ok, T, Hi, Wi, ST, SH, SW, KT, KH,
                                     KW, HAS_CLS, GROUP_W, BLOCK_M, BLOCK_D)
        if HAS_CLS:
            z0 = tl.where(is_cls[:, None], _cls_row(X, stride_xc, to, offs_d, is_cls, d_ok), z0)
        dy_ptrs = DY + rows[:, None] * stride_dym + dy_cols
        dz_ptrs = DZ + rows[:, None] * stride_dzm + dz_cols
        # r = 0 first: its tiles start the sums (and stand in for the unused positions)
        dz0, dyz, dy = _norm_backward(dy_ptrs, dz_ptrs, _position_ok(0, in_grid, is_cls, w_first, Wo),
                                      z0, gamma, d_ok, D, eps)
        dz1 = dz0
        dz2 = dz0
        dz3 = dz0
        for r in tl.static_range(1, GROUP_W):
            dz_r, dyz_r, dy_r = _norm_backward(dy_ptrs + r * stride_dym, dz_ptrs + r * stride_dzm,
                                               _position_ok(r, in_grid, is_cls, w_first, Wo),
                                               _pick(r, z0, z1, z2, z3), gamma, d_ok, D, eps)
            dz0, dz1, dz2, dz3 = _put(r, dz_r, dz0, dz1, dz2, dz3)
            dyz += dyz_r
            dy += dy_r
        dgamma += tl.sum(dyz, 0)
        dbeta += tl.sum(dy, 0)
        # dW against the fp32 dz (not the rounded copy in DZ); the cls row is not in the grid.
        dw = _conv_weight_grad(dw, dz0, dz1, dz2, dz3, X, stride_xn, stride_xc, to, ho, w_first,
                               in_grid, offs_d, d_ok, T, Hi, Wi, ST, SH, SW, KT, KH, KW, HAS_CLS,
                               TAPS_PAD, GROUP_W, BLOCK_M, BLOCK_D)

    # Partials, unpadded: PW (rows, taps, D), PG and PB (rows, D), contiguous.
    row = pid_bh.to(tl.int64) * SPLIT + pid
    tap_ids = tl.arange(0, TAPS_PAD)
    tl.store(PW + row * (KT * KH * KW) * D + tap_ids[:, None] * D + offs_d[None, :], dw,
             mask=(tap_ids < KT * KH * KW)[:, None] & d_ok[None, :])
    tl.store(PG + row * D + offs_d, dgamma, mask=d_ok)
    tl.store(PB + row * D + offs_d, dbeta, mask=d_ok)


@triton.jit
def _pool_norm_bwd_dx(
    DZ, W, DX,
    stride_dzb, stride_dzh, stride_dzm, stride_dzc,
    stride_wc, stride_wk,
    stride_dxb, stride_dxn, stride_dxg, stride_dxh, stride_dxc, member,
    H, T, Hi, Wi, To, Ho, Wo, D,
    N_BUCKET,  # autotune key only
    ST: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr,
    KT: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr,
    HAS_CLS: tl.constexpr, GROUP_W: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
    ROW_ALIGN: tl.constexpr,
):
    """dx of one (BLOCK_M groups of GROUP_W input tokens, batch*head) program: the
    transposed conv as a gather; row 0 of block 0 copies the cls row.

    Math: input token at (t, h, w) is read by output token (t_o, h_o, w_o) through tap
    (kt, kh, kw) iff t + KT // 2 - kt = t_o * ST with 0 <= t_o < To (same for h, w), so
        dx_n = sum over those taps of w[:, tap] * dz[(t_o, h_o, w_o)],   dx_cls = dz_cls.
    On one (kt, kh) line, input r of a group and tap kw meet at w + KW // 2 - kw, the j-th
    of the group's candidate positions w_first - KW // 2 + j, j = r + KW - 1 - kw: each j
    is one load (masked unless an output sits there: in the grid and divisible by SW), added
    to every r whose tap kw = r + KW - 1 - j lies in [0, KW). No scatter, no atomics: each dx
    row is written by one program.

    Traffic: dz gathered from L2 (each row read by up to KT*KH*KW input rows), dx written
    once straight into the member's slice of dqkv (B, N, 3, heads, d).
    """
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    off_b = (pid_bh // H).to(tl.int64)
    off_h = (pid_bh % H).to(tl.int64)
    DZ += aligned(off_b * stride_dzb + off_h * stride_dzh, ROW_ALIGN)
    DX += aligned(off_b * stride_dxb + member * stride_dxg + off_h * stride_dxh, ROW_ALIGN)
    stride_dzm = aligned(stride_dzm, ROW_ALIGN)
    stride_dxn = aligned(stride_dxn, ROW_ALIGN)
    D = aligned(D, ROW_ALIGN)

    offs_g = pid_n * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    ti, hi, w_first, in_grid, is_cls, rows = _group_coords(offs_g, T, Hi, Wi, GROUP_W, HAS_CLS)

    cols = offs_d[None, :] * stride_dzc
    w_ptrs = W + offs_d * stride_wc
    dx0 = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    dx1 = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    dx2 = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    dx3 = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for kt in tl.static_range(KT):
        tn = ti + (KT // 2 - kt)  # = t_o * ST when tap kt of output t_o reads t
        ok_t = in_grid & (tn >= 0) & (tn % ST == 0) & (tn < To * ST)
        for kh in tl.static_range(KH):
            hn = hi + (KH // 2 - kh)
            ok_h = ok_t & (hn >= 0) & (hn % SH == 0) & (hn < Ho * SH)
            ptrs = DZ + (HAS_CLS + ((tn // ST) * Ho + hn // SH) * Wo)[:, None] * stride_dzm + cols
            mask = ok_h[:, None] & d_ok[None, :]
            w_a, w_b, w_c = _line_weights(w_ptrs, stride_wk, KW)
            for j in tl.static_range(GROUP_W - 1 + KW):
                wn = w_first + (j - KW // 2)
                ok_w = (wn >= 0) & (wn % SW == 0) & (wn < Wo * SW)
                dz = tl.load(ptrs + (wn // SW)[:, None] * stride_dzm, mask=mask & ok_w[:, None],
                             other=0.0)
                dz = dz.to(tl.float32)
                for r in tl.static_range(GROUP_W):
                    if r + KW - 1 - j >= 0 and r + KW - 1 - j < KW:
                        dzw = dz * _pick(r + KW - 1 - j, w_a, w_b, w_c, w_c)
                        dx0, dx1, dx2, dx3 = _add_to(r, dzw, dx0, dx1, dx2, dx3)
            w_ptrs += KW * stride_wk
    if HAS_CLS:  # dx_cls = dz_cls
        dx0 = tl.where(is_cls[:, None], _cls_row(DZ, stride_dzc, ti, offs_d, is_cls, d_ok), dx0)
    out_cols = offs_d[None, :] * stride_dxc
    for r in tl.static_range(GROUP_W):
        ok = _position_ok(r, in_grid, is_cls, w_first, Wi)
        tl.store(DX + (rows + r)[:, None] * stride_dxn + out_cols,
                 _pick(r, dx0, dx1, dx2, dx3).to(DX.dtype.element_ty), mask=ok[:, None] & d_ok[None, :])


# ---------------------------------------------------------------------------------------
# Configs and launchers
# ---------------------------------------------------------------------------------------

_CONFIG_ENV = "MVIT_FAST_POOL_CONFIG"  # e.g. "BLOCK_M=32,num_warps=4" or "BLOCK_M=8,GROUP_W=4"
# The group widths each pass autotunes (see "Groups along w"); a pinned config without
# GROUP_W takes the widest.
_TUNED_GROUPS = {"fwd": (1, 4), "dz": (1,), "dx": (1, 4)}
_INTERPRETER_POSITIONS = 32  # w positions per interpreted program: BLOCK_M = 32 // GROUP_W
# Programs per (batch, head) of the dz pass: each walks every SPLIT-th output block and
# keeps one dW partial, so the partials stay small while the grid still fills the GPU:
# ~512 programs (~4 per H100 SM), e.g. 8 clips x 1 head x 64.
_SPLIT_TARGET = 512
_MAX_SPLIT = 64
_INTERPRETER_SPLIT = 2  # tests: programs walk several blocks (the loop is exercised)

INTERPRETED = is_interpreted(_pool_norm_fwd)

# Tiles (BLOCK_M, num_warps) per group width, and the most fp32 elements per thread each
# of a program's GROUP_W (BLOCK_M, BLOCK_D) tiles may hold (see `_configs`). Groups of 4
# take 8 warps only: at 4 warps the 8-row forward of the stride-8 k and v compiles to 32
# registers and 6.6 KB of spill stores per thread under Triton 3.9 (sm_90, bf16, MViTv2-S
# and -L block 0; 148 registers and none at stride 1), over the compile check's bound.
_TILES = {1: [(bm, w) for bm in (16, 32, 64, 128) for w in (4, 8)],
          4: [(bm, 8) for bm in (8, 16, 32)]}
_MOST_PER_THREAD = {1: 16, 4: 8}


def _configs(block_d: int, pass_name: str) -> list[triton.Config]:
    """Autotune search space of one pass for one padded head dim (CUDA only).

    Per group width, the tiles whose (BLOCK_M, BLOCK_D) tiles hold at most
    `_MOST_PER_THREAD` and at least 4 fp32 elements per thread (fewer, and the rows load in
    8-byte pieces instead of 16; where none qualifies, as for a tiny d, the largest tile).
    Every pass unrolls its tap loads, which the compiler keeps in flight together, so
    register pressure grows with the elements per thread (sm_90, bf16, MViTv2-S and -L block
    0, `python bench/kernel_resources.py`; bytes of spill stores per thread): the kept
    configs, under Triton 3.9, one tile: fwd 0-52, dx 0-172, dz 48-276; four tiles: fwd 0,
    dx 0-52. One tile at 32 elements spilled up to 3.5K and four at 16 up to 2.1K (Triton
    3.6), and those also compile 2-6x slower. A second pipelining stage compiled to the same
    code (the loads sit in unrolled, masked tap loops), so there is one stage.
    """
    configs = []
    for group in _TUNED_GROUPS[pass_name]:
        per_thread = lambda tile: tile[0] * block_d // (32 * tile[1])
        fitting = [t for t in _TILES[group] if per_thread(t) <= _MOST_PER_THREAD[group]]
        kept = [t for t in fitting if per_thread(t) >= 4] or [max(fitting, key=per_thread)]
        configs += [triton.Config({"BLOCK_M": bm, "GROUP_W": group}, num_warps=w, num_stages=1)
                    for bm, w in kept]
    return configs


_KERNELS = {"fwd": _pool_norm_fwd, "dz": _pool_norm_bwd_dz, "dx": _pool_norm_bwd_dx}
# ROW_ALIGN is keyed: an unaligned launch loads scalar, and its best tile may differ.
_TUNE_KEY = ["N_BUCKET", "D", "ST", "SH", "SW", "ROW_ALIGN"]


@functools.cache
def _tuned(pass_name: str, block_d: int):
    return triton.autotune(configs=_configs(block_d, pass_name), key=_TUNE_KEY)(_KERNELS[pass_name])


def _pinned_config(pass_name: str) -> dict[str, int] | None:
    """One fixed config of a pass: from MVIT_FAST_POOL_CONFIG, or the interpreter's (the
    pass's widest tuned group, 32 positions per program)."""
    group = max(_TUNED_GROUPS[pass_name])
    interpreted = {"BLOCK_M": _INTERPRETER_POSITIONS // group, "GROUP_W": group,
                   "num_warps": 1, "num_stages": 1}
    cfg = pinned_config(_CONFIG_ENV, ("BLOCK_M",), {"GROUP_W": group, "num_warps": 4, "num_stages": 1},
                        interpreted if INTERPRETED else None)
    if cfg is not None and cfg["GROUP_W"] not in _GROUPS:
        raise ValueError(f"{_CONFIG_ENV}: GROUP_W must be one of {_GROUPS}, got {cfg['GROUP_W']}")
    return cfg


def _blocks(positions: tuple[bool, int, int], meta: dict[str, int]) -> int:
    """Program blocks with config `meta` over positions (has_cls, lines, width): the cls row
    and `lines` (t, h) lines of `width` w positions."""
    has_cls, lines, width = positions
    return triton.cdiv(int(has_cls) + lines * triton.cdiv(width, meta["GROUP_W"]), meta["BLOCK_M"])


def _launch(wrap: Callable, pass_name: str, positions: tuple[bool, int, int], grid1: int,
            block_d: int, *args, split: int | None = None, **kwargs) -> None:
    """Launch one pass over `positions` (see `_blocks`): grid (blocks, B*heads), or
    (split, B*heads) for the dz pass."""
    cfg = _pinned_config(pass_name)
    if cfg is not None:
        grid = (split if split is not None else _blocks(positions, cfg), grid1)
        wrap(_KERNELS[pass_name])[grid](*args, **kwargs, **cfg)
        return
    if split is not None:
        grid = (split, grid1)
    else:
        grid = lambda meta: (_blocks(positions, meta), grid1)
    wrap(_tuned(pass_name, block_d))[grid](*args, **kwargs)


def _split(positions: tuple[bool, int, int], programs: int, block_d: int) -> int:
    """Programs per (batch, head) of the dz pass; never more than the blocks of its finest tile."""
    cfg = _pinned_config("dz")
    metas = [cfg] if cfg is not None else [c.all_kwargs() for c in _configs(block_d, "dz")]
    blocks = max(_blocks(positions, meta) for meta in metas)
    cap = _INTERPRETER_SPLIT if INTERPRETED else _MAX_SPLIT
    return max(1, min(cap, triton.cdiv(_SPLIT_TARGET, max(1, programs)), blocks))


def pooled_size(n: int, kernel: int, stride: int) -> int:
    """Output length of a conv with padding kernel // 2 (rounds up for kernel 3)."""
    return (n + 2 * (kernel // 2) - kernel) // stride + 1


def _check(qkv: torch.Tensor, member: int, weight: torch.Tensor, thw: Sequence[int],
           stride: Sequence[int], has_cls: bool, **params: torch.Tensor) -> tuple[int, ...]:
    """Validate one member's input and the named parameter tensors (conv weight included);
    returns (T, H, W, kt, kh, kw, sT, sH, sW, To, Ho, Wo)."""
    if qkv.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"fused pooling takes float32/float16/bfloat16 activations, got {qkv.dtype}")
    for name, tensor in {"conv weight": weight, **params}.items():
        if not tensor.is_floating_point() or tensor.device != qkv.device:
            raise TypeError(f"{name} must be floating point on qkv's device {qkv.device}, got "
                            f"{tensor.dtype} on {tensor.device}")
    if not (qkv.is_cuda or INTERPRETED or compiling_only()):
        raise ValueError(f"fused pooling needs CUDA tensors (or TRITON_INTERPRET=1), got {qkv.device}")
    if qkv.ndim != 5:
        raise ValueError(f"qkv must be (B, N, members, heads, head_dim), got {tuple(qkv.shape)}")
    if not 0 <= member < qkv.shape[2]:
        raise ValueError(f"member {member} out of range for qkv {tuple(qkv.shape)}")
    d = qkv.shape[4]
    if d > MAX_HEAD_DIM:
        raise ValueError(f"head_dim {d} > {MAX_HEAD_DIM} is not supported")
    if qkv.shape[0] * qkv.shape[3] > MAX_BATCH_HEADS:
        raise ValueError(f"batch x heads = {qkv.shape[0] * qkv.shape[3]} > {MAX_BATCH_HEADS} (CUDA's "
                         "grid limit): split the batch")
    if weight.ndim != 5 or weight.shape[:2] != (d, 1):
        raise ValueError(f"conv weight must be depthwise (head_dim={d}, 1, kt, kh, kw), "
                         f"got {tuple(weight.shape)}")
    kernel = tuple(int(k) for k in weight.shape[2:])
    if any(k not in _KERNEL_SIZES for k in kernel):
        raise ValueError(f"pooling kernel {kernel}: each size must be one of {_KERNEL_SIZES}")
    if len(thw) != 3 or any(int(n) < 1 for n in thw):
        raise ValueError(f"thw must be three positive sizes (T, H, W), got {tuple(thw)}")
    if len(stride) != 3 or any(int(s) < 1 for s in stride):
        raise ValueError(f"stride must be three positive ints, got {tuple(stride)}")
    t, h, w = (int(n) for n in thw)
    if qkv.shape[1] != int(has_cls) + t * h * w:
        raise ValueError(f"qkv has {qkv.shape[1]} tokens but thw={tuple(thw)} with "
                         f"has_cls={has_cls} means {int(has_cls) + t * h * w}")
    out = tuple(pooled_size(n, k, int(s)) for n, k, s in zip((t, h, w), kernel, stride))
    return (t, h, w, *kernel, *(int(s) for s in stride), *out)


def _tap_major(weight: torch.Tensor, block_d: int) -> torch.Tensor:
    """The depthwise weight (d, 1, kt, kh, kw) as a (block_d, taps) view of tap-major storage,
    zero beyond d.

    Tap-major: the weights of one tap are contiguous, so the kernels load them as vectors
    (with the (d, taps) layout of the parameter itself they are 27 apart: one scalar load
    per channel and tap, 8x the instructions of the activation loads at d = 72 and 96).
    Zero-padded to the tile's power-of-two width: the kernels load them unmasked, without
    the zero fill each masked load starts with (MViTv2-S block 0, bf16, sm_90, Triton 3.6,
    BLOCK_M 16, 8 warps: SASS instructions per block fwd / dz / dx 1282 / 4910 / 1229 ->
    1169 / 4795 / 1120, fwd registers 128 -> 110; `bench/kernel_resources.py`)."""
    d = weight.shape[0]
    padded = weight.new_zeros(weight[0].numel(), block_d)
    padded[:, :d] = weight.reshape(d, -1).t()
    return padded.t()


def _identity(kernel):
    return kernel


def pool_norm_forward(
    qkv: torch.Tensor, member: int, weight: torch.Tensor, norm_weight: torch.Tensor,
    norm_bias: torch.Tensor, thw: Sequence[int], stride: Sequence[int], has_cls: bool, eps: float,
    *, wrap: Callable = _identity,
) -> torch.Tensor:
    """Pooled, normed tokens of one qkv member: (B, heads, N', d) in qkv's dtype, contiguous.

    Args:
        qkv: (B, N, 3, heads, d) projection output, N = has_cls + T*H*W, any strides
            (the kernels address the whole tensor: no slice is made).
        member: which of q (0), k (1), v (2) to pool.
        weight: depthwise conv weight (d, 1, kt, kh, kw), kernel sizes 1 or 3, shared by heads.
        norm_weight, norm_bias: LayerNorm(d) affine parameters (d,).
        thw: the input grid (T, H, W); stride: the conv stride (padding is kernel // 2).
        has_cls: token 0 is cls: copied through the conv, normed with the rest.
        eps: LayerNorm epsilon.
        wrap: applied to each kernel before launch (`torch.library.wrap_triton`).
    """
    t, h, w, kt, kh, kw, st, sh, sw, to, ho, wo = _check(qkv, member, weight, thw, stride, has_cls,
                                                         norm_weight=norm_weight, norm_bias=norm_bias)
    batch, _, _, heads, d = qkv.shape
    if norm_weight.shape != (d,) or norm_bias.shape != (d,):
        raise ValueError(f"LayerNorm weight/bias must be ({d},), got "
                         f"{tuple(norm_weight.shape)} / {tuple(norm_bias.shape)}")
    n_out = int(has_cls) + to * ho * wo
    y = torch.empty((batch, heads, n_out, d), device=qkv.device, dtype=qkv.dtype)
    block_d = triton.next_power_of_2(d)
    w2 = _tap_major(weight, block_d)
    _launch(wrap, "fwd", (has_cls, to * ho, wo), batch * heads, block_d,
            qkv, w2, norm_weight, norm_bias, y,
            *qkv.stride(), int(member), *w2.stride(), norm_weight.stride(0), norm_bias.stride(0),
            *y.stride(),
            heads, t, h, w, to, ho, wo, d, float(eps), triton.next_power_of_2(n_out),
            ST=st, SH=sh, SW=sw, KT=kt, KH=kh, KW=kw, HAS_CLS=int(has_cls), BLOCK_D=block_d,
            ROW_ALIGN=row_align(qkv, y))
    return y


def pool_norm_backward(
    dy: torch.Tensor, qkv: torch.Tensor, member: int, weight: torch.Tensor,
    norm_weight: torch.Tensor, thw: Sequence[int], stride: Sequence[int], has_cls: bool,
    eps: float, dqkv: torch.Tensor | None = None, *, wrap: Callable = _identity,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Backward of `pool_norm_forward`: (dqkv, dweight, dnorm_weight, dnorm_bias).

    dy is the gradient of the output (B, heads, N', d), any strides. Every element of the
    member's slice dqkv[:, :, member] is written (the other members are left alone); dqkv
    is allocated (zeros) if not given. The parameter gradients are in their parameters'
    dtypes (dweight shaped like weight), summed from fp32 partials.
    """
    t, h, w, kt, kh, kw, st, sh, sw, to, ho, wo = _check(qkv, member, weight, thw, stride, has_cls,
                                                         norm_weight=norm_weight, dy=dy)
    batch, n_in, _, heads, d = qkv.shape
    n_out = int(has_cls) + to * ho * wo
    if dy.shape != (batch, heads, n_out, d):
        raise ValueError(f"dy must be {(batch, heads, n_out, d)}, got {tuple(dy.shape)}")
    if dqkv is None:
        dqkv = torch.zeros_like(qkv)
    elif dqkv.shape != qkv.shape or dqkv.dtype != qkv.dtype:
        raise ValueError(f"dqkv must be {tuple(qkv.shape)} {qkv.dtype}, got "
                         f"{tuple(dqkv.shape)} {dqkv.dtype}")
    taps = kt * kh * kw
    taps_pad = triton.next_power_of_2(taps)
    block_d = triton.next_power_of_2(d)
    w2 = _tap_major(weight, block_d)
    geometry = dict(ST=st, SH=sh, SW=sw, KT=kt, KH=kh, KW=kw, HAS_CLS=int(has_cls), BLOCK_D=block_d)

    # Pass 1: dz (in qkv's dtype) and the fp32 weight partials.
    split = _split((has_cls, to * ho, wo), batch * heads, block_d)
    rows = batch * heads * split
    dz = torch.empty((batch, heads, n_out, d), device=qkv.device, dtype=qkv.dtype)
    pw = torch.empty((rows, taps, d), device=qkv.device, dtype=torch.float32)
    pg = torch.empty((rows, d), device=qkv.device, dtype=torch.float32)
    pb = torch.empty((rows, d), device=qkv.device, dtype=torch.float32)
    _launch(wrap, "dz", (has_cls, to * ho, wo), batch * heads, block_d,
            qkv, w2, norm_weight, dy, dz, pw, pg, pb,
            *qkv.stride(), int(member), *w2.stride(), norm_weight.stride(0), *dy.stride(),
            *dz.stride(),
            heads, t, h, w, to, ho, wo, d, float(eps), split, triton.next_power_of_2(n_out),
            split=split, TAPS_PAD=taps_pad, **geometry, ROW_ALIGN=row_align(qkv, dy, dz))
    # Pass 2: dx gathers dz (same stream: launch order is the dependency).
    _launch(wrap, "dx", (has_cls, t * h, w), batch * heads, block_d,
            dz, w2, dqkv,
            *dz.stride(), *w2.stride(), *dqkv.stride(), int(member),
            heads, t, h, w, to, ho, wo, d, triton.next_power_of_2(n_in), **geometry,
            ROW_ALIGN=row_align(dqkv, dz))

    dweight = pw.sum(0).t().reshape(weight.shape).to(weight.dtype).contiguous()
    dgamma = pg.sum(0).to(norm_weight.dtype)
    dbeta = pb.sum(0).to(norm_weight.dtype)
    return dqkv, dweight, dgamma, dbeta
