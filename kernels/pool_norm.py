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
`torch.library.wrap_triton`):
- `pool_norm_forward`: `_pool_norm_fwd`, one program per (output block, batch*head).
- `pool_norm_backward`: `_pool_norm_bwd_dz` (LayerNorm backward -> dz, plus the conv-weight
  and LayerNorm-weight partials), then `_pool_norm_bwd_dx` (the transposed conv as a
  gather: each input token sums the dz of the output tokens whose window covers it).
The forward saves nothing: the backward recomputes the conv output and its statistics
from x (27 cached loads per token instead of a stored fp32 tensor).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import torch
import triton
import triton.language as tl

from ._launch import aligned, compiling_only, is_interpreted, pinned_config, row_align

__all__ = ["INTERPRETED", "MAX_HEAD_DIM", "pool_norm_backward", "pool_norm_forward", "pooled_size"]

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


@triton.jit
def _out_coords(offs_m, N_out, Ho, Wo, HAS_CLS: tl.constexpr):
    """Output token rows -> (t, h, w) on the pooled grid and whether the row is a conv row.

    Coordinates are int64 (per-row vectors, cheap), so every token offset built from them
    is 64-bit; it also spares the interpreter's int32 overflow checks in the tap loops.
    """
    j = tl.maximum(offs_m - HAS_CLS, 0).to(tl.int64)
    conv_ok = (offs_m >= HAS_CLS) & (offs_m < N_out)
    return j // (Ho * Wo), (j // Wo) % Ho, j % Wo, conv_ok


@triton.jit
def _conv_rows(X, W, stride_xn, stride_xc, stride_wc, stride_wk, offs_m, to, ho, wo,
               conv_ok, offs_d, d_ok, T, Hi, Wi,
               ST: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr,
               KT: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr, HAS_CLS: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """z (BLOCK_M, BLOCK_D) fp32: the depthwise conv of the rows offs_m; the cls row is copied.

    z[m, c] = sum over taps of w[c, tap] * x[window(m, tap), c], the input position of tap
    (kt, kh, kw) being t_in = t_out * stride + kt - pad (same for h, w) and zero outside
    the grid (the conv's zero padding). KT*KH*KW masked loads of a (BLOCK_M, d) tile, each
    a gather of whole token rows (d contiguous channels); row pointers and masks are built
    per (kt, kh), so a tap adds only its w offset.
    """
    t0 = to * ST - KT // 2
    h0 = ho * SH - KH // 2
    w0 = wo * SW - KW // 2
    cols = offs_d[None, :] * stride_xc
    w_ptrs = W + offs_d * stride_wc
    z = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for kt in tl.static_range(KT):
        ok_t = conv_ok & (t0 + kt >= 0) & (t0 + kt < T)
        for kh in tl.static_range(KH):
            hi = h0 + kh
            ok_h = ok_t & (hi >= 0) & (hi < Hi)
            rows = HAS_CLS + ((t0 + kt) * Hi + hi) * Wi + w0  # the kw = 0 column
            ptrs = X + rows[:, None] * stride_xn + cols
            mask = ok_h[:, None] & d_ok[None, :]
            for kw in tl.static_range(KW):
                ok_w = (w0 + kw >= 0) & (w0 + kw < Wi)
                x = tl.load(ptrs, mask=mask & ok_w[:, None], other=0.0)
                w = tl.load(w_ptrs)  # taps in (kt, kh, kw) order, zero-padded to BLOCK_D
                z += x.to(tl.float32) * w.to(tl.float32)[None, :]
                ptrs += stride_xn
                w_ptrs += stride_wk
    if HAS_CLS:  # the cls token is not pooled: row 0 of the output is input row 0
        is_cls = offs_m == 0
        x0 = tl.load(X + offs_m[:, None] * 0 + cols, mask=is_cls[:, None] & d_ok[None, :], other=0.0)
        z = tl.where(is_cls[:, None], x0.to(tl.float32), z)
    return z


@triton.jit
def _conv_weight_grad(dw, dz, X, stride_xn, stride_xc, to, ho, wo, conv_ok, offs_d, d_ok, T, Hi, Wi,
                      ST: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr,
                      KT: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr, HAS_CLS: tl.constexpr,
                      TAPS_PAD: tl.constexpr):
    """dw[tap, c] += sum over conv rows m of dz[m, c] * x[window(m, tap), c].

    The same window loads as `_conv_rows` (now cache hits). dw is a (TAPS_PAD, BLOCK_D)
    register tile; tap t's column sum is added to row t with a select.
    """
    t0 = to * ST - KT // 2
    h0 = ho * SH - KH // 2
    w0 = wo * SW - KW // 2
    cols = offs_d[None, :] * stride_xc
    tap_ids = tl.arange(0, TAPS_PAD)[:, None]
    for kt in tl.static_range(KT):
        ok_t = conv_ok & (t0 + kt >= 0) & (t0 + kt < T)
        for kh in tl.static_range(KH):
            hi = h0 + kh
            ok_h = ok_t & (hi >= 0) & (hi < Hi)
            rows = HAS_CLS + ((t0 + kt) * Hi + hi) * Wi + w0
            ptrs = X + rows[:, None] * stride_xn + cols
            mask = ok_h[:, None] & d_ok[None, :]
            for kw in tl.static_range(KW):
                ok_w = (w0 + kw >= 0) & (w0 + kw < Wi)
                x = tl.load(ptrs, mask=mask & ok_w[:, None], other=0.0)
                ptrs += stride_xn
                part = tl.sum(dz * x.to(tl.float32), 0)
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


# ---------------------------------------------------------------------------------------
# Forward
# ---------------------------------------------------------------------------------------


@triton.jit
def _pool_norm_fwd(
    X, W, G, Bn, Y,
    stride_xb, stride_xn, stride_xg, stride_xh, stride_xc, member,
    stride_wc, stride_wk, stride_g, stride_bn,
    stride_yb, stride_yh, stride_ym, stride_yc,
    H, T, Hi, Wi, Ho, Wo, N_out, D, eps,
    N_BUCKET,  # autotune key only
    ST: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr,
    KT: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr,
    HAS_CLS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, ROW_ALIGN: tl.constexpr,
):
    """Pooled, normed tokens of one (BLOCK_M output rows, batch*head) program, all d channels.

    Math: z_m = sum_tap w[:, tap] * x[window(m, tap)] (z_cls = x_cls);
    y_m = (z_m - mean(z_m)) * rstd_m * gamma + beta, rstd_m = 1 / sqrt(var(z_m) + eps),
    statistics over the d channels in fp32.

    Memory traffic per (batch, head): the member's N x d input once from HBM (overlapping
    windows re-read from L1/L2: KT*KH*KW loads per output row) and N' x d outputs once;
    the (d, taps) weight and gamma/beta are tiny. Total HBM bytes of the three members
    ~ |qkv| + |q| + |k| + |v|, the floor for this op.
    """
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    off_b = (pid_bh // H).to(tl.int64)
    off_h = (pid_bh % H).to(tl.int64)
    X += aligned(off_b * stride_xb + member * stride_xg + off_h * stride_xh, ROW_ALIGN)
    Y += aligned(off_b * stride_yb + off_h * stride_yh, ROW_ALIGN)
    stride_xn = aligned(stride_xn, ROW_ALIGN)
    stride_ym = aligned(stride_ym, ROW_ALIGN)
    D = aligned(D, ROW_ALIGN)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    to, ho, wo, conv_ok = _out_coords(offs_m, N_out, Ho, Wo, HAS_CLS)
    z = _conv_rows(X, W, stride_xn, stride_xc, stride_wc, stride_wk, offs_m, to, ho, wo,
                   conv_ok, offs_d, d_ok, T, Hi, Wi, ST, SH, SW, KT, KH, KW, HAS_CLS,
                   BLOCK_M, BLOCK_D)
    zhat, _ = _normalize(z, d_ok, D, eps)
    gamma = tl.load(G + offs_d * stride_g, mask=d_ok, other=0.0).to(tl.float32)
    beta = tl.load(Bn + offs_d * stride_bn, mask=d_ok, other=0.0).to(tl.float32)
    y = zhat * gamma[None, :] + beta[None, :]
    rows = offs_m.to(tl.int64)
    tl.store(Y + rows[:, None] * stride_ym + offs_d[None, :] * stride_yc,
             y.to(Y.dtype.element_ty), mask=(offs_m < N_out)[:, None] & d_ok[None, :])


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
    H, T, Hi, Wi, Ho, Wo, N_out, D, eps, SPLIT,
    N_BUCKET,  # autotune key only
    ST: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr,
    KT: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr,
    HAS_CLS: tl.constexpr, TAPS_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, ROW_ALIGN: tl.constexpr,
):
    """LayerNorm backward and the weight-gradient partials of one (split, batch*head) program.

    The program walks the output blocks pid, pid + SPLIT, ... of its (batch, head). Per block,
    with z and zhat recomputed as in the forward and g = dy * gamma:
        dz_m = rstd_m * (g_m - mean_c(g_m) - zhat_m * mean_c(g_m * zhat_m))   -> DZ (x's dtype)
        dgamma += sum_m dy_m * zhat_m,  dbeta += sum_m dy_m                   (cls row included)
        dW[c, tap] += sum_m dz[m, c] * x[window(m, tap), c]                   (conv rows only)
    and writes its fp32 partials PW (taps, d), PG (d), PB (d) at row pid_bh * SPLIT + pid;
    the launcher sums the rows in torch (deterministic, no atomics). The dW accumulator
    is a (TAPS_PAD, BLOCK_D) register tile; tap t's column sum is added with a row select.

    Traffic: x (window loads twice: once for z, once for dW, the second from cache), dy
    and dz once; partials (B*heads*SPLIT) x (taps + 2) x d fp32, written once and summed
    by torch: at MViTv2-S block 0, batch 8, 512 rows = 5.7 MB next to ~115 MB of x, dy, dz.
    """
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
    gamma = tl.load(G + offs_d * stride_g, mask=d_ok, other=0.0).to(tl.float32)
    dw = tl.zeros([TAPS_PAD, BLOCK_D], dtype=tl.float32)
    dgamma = tl.zeros([BLOCK_D], dtype=tl.float32)
    dbeta = tl.zeros([BLOCK_D], dtype=tl.float32)
    n_blocks = tl.cdiv(N_out, BLOCK_M)
    for blk in range(pid, n_blocks, SPLIT):
        offs_m = blk * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = offs_m < N_out
        rows = offs_m.to(tl.int64)
        to, ho, wo, conv_ok = _out_coords(offs_m, N_out, Ho, Wo, HAS_CLS)
        z = _conv_rows(X, W, stride_xn, stride_xc, stride_wc, stride_wk, offs_m, to, ho, wo,
                       conv_ok, offs_d, d_ok, T, Hi, Wi, ST, SH, SW, KT, KH, KW, HAS_CLS,
                       BLOCK_M, BLOCK_D)
        zhat, rstd = _normalize(z, d_ok, D, eps)
        dy = tl.load(DY + rows[:, None] * stride_dym + offs_d[None, :] * stride_dyc,
                     mask=row_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
        dgamma += tl.sum(dy * zhat, 0)
        dbeta += tl.sum(dy, 0)
        g = dy * gamma[None, :]  # zero on padded rows and channels
        mean_g = tl.sum(g, 1) / D
        mean_gz = tl.sum(g * zhat, 1) / D
        dz = rstd[:, None] * (g - mean_g[:, None] - zhat * mean_gz[:, None])
        dz = tl.where(d_ok[None, :], dz, 0.0)
        tl.store(DZ + rows[:, None] * stride_dzm + offs_d[None, :] * stride_dzc,
                 dz.to(DZ.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])
        # dW against the fp32 dz (not the rounded copy in DZ).
        dw = _conv_weight_grad(dw, dz, X, stride_xn, stride_xc, to, ho, wo, conv_ok, offs_d, d_ok,
                               T, Hi, Wi, ST, SH, SW, KT, KH, KW, HAS_CLS, TAPS_PAD)

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
    H, T, Hi, Wi, To, Ho, Wo, N_in, D,
    N_BUCKET,  # autotune key only
    ST: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr,
    KT: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr,
    HAS_CLS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, ROW_ALIGN: tl.constexpr,
):
    """dx of one (BLOCK_M input rows, batch*head) program: the transposed conv as a gather.

    Math: input token n at (t, h, w) is read by output token (t_o, h_o, w_o) through tap
    (kt, kh, kw) iff t + pad - kt = t_o * stride with 0 <= t_o < To (same for h, w), so
        dx_n = sum over those taps of w[:, tap] * dz[(t_o, h_o, w_o)],   dx_cls = dz_cls.
    No scatter, no atomics: each dx row is written by one program. With stride s only
    ~1/s of the taps along that axis match; the rest are masked loads.

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

    offs_n = pid_n * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    j = tl.maximum(offs_n - HAS_CLS, 0).to(tl.int64)  # int64 offsets, as in `_out_coords`
    in_ok = (offs_n >= HAS_CLS) & (offs_n < N_in)
    ti, hi, wi = j // (Hi * Wi), (j // Wi) % Hi, j % Wi

    cols = offs_d[None, :] * stride_dzc
    w_ptrs = W + offs_d * stride_wc
    dx = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for kt in tl.static_range(KT):
        tn = ti + (KT // 2 - kt)  # = t_o * ST when tap kt of output t_o reads t
        ok_t = in_ok & (tn >= 0) & (tn % ST == 0) & (tn < To * ST)
        for kh in tl.static_range(KH):
            hn = hi + (KH // 2 - kh)
            ok_h = ok_t & (hn >= 0) & (hn % SH == 0) & (hn < Ho * SH)
            rows = HAS_CLS + ((tn // ST) * Ho + hn // SH) * Wo
            ptrs = DZ + rows[:, None] * stride_dzm + cols
            mask = ok_h[:, None] & d_ok[None, :]
            for kw in tl.static_range(KW):
                wn = wi + (KW // 2 - kw)
                ok_w = (wn >= 0) & (wn % SW == 0) & (wn < Wo * SW)
                dz = tl.load(ptrs + (wn // SW)[:, None] * stride_dzm, mask=mask & ok_w[:, None],
                             other=0.0)
                w = tl.load(w_ptrs)  # taps in (kt, kh, kw) order, zero-padded to BLOCK_D
                dx += dz.to(tl.float32) * w.to(tl.float32)[None, :]
                w_ptrs += stride_wk
    if HAS_CLS:
        is_cls = offs_n == 0
        dz0 = tl.load(DZ + offs_n[:, None] * 0 + cols, mask=is_cls[:, None] & d_ok[None, :], other=0.0)
        dx = tl.where(is_cls[:, None], dz0.to(tl.float32), dx)
    rows = offs_n.to(tl.int64)
    tl.store(DX + rows[:, None] * stride_dxn + offs_d[None, :] * stride_dxc,
             dx.to(DX.dtype.element_ty), mask=(offs_n < N_in)[:, None] & d_ok[None, :])


# ---------------------------------------------------------------------------------------
# Configs and launchers
# ---------------------------------------------------------------------------------------

_CONFIG_ENV = "MVIT_FAST_POOL_CONFIG"  # e.g. "BLOCK_M=32,num_warps=4"
_INTERPRETER_CONFIG = {"BLOCK_M": 32, "num_warps": 1, "num_stages": 1}
# Programs per (batch, head) of the dz pass: each walks every SPLIT-th output block and
# keeps one dW partial, so the partials stay small while the grid still fills the GPU:
# ~512 programs (~4 per H100 SM), e.g. 8 clips x 1 head x 64.
_SPLIT_TARGET = 512
_MAX_SPLIT = 64
_INTERPRETER_SPLIT = 2  # tests: programs walk several blocks (the loop is exercised)

INTERPRETED = is_interpreted(_pool_norm_fwd)


def _keep(block_m: int, num_warps: int, block_d: int) -> bool:
    """Prune configs to at most 16 fp32 elements per thread of a (BLOCK_M, BLOCK_D) tile.

    Every pass unrolls its 27 tap loads, which the compiler keeps in flight together, so
    register pressure grows with the tile per thread, and past 16 elements the code spills
    (sm_90, bf16, d = 96, `python bench/kernel_resources.py`; bytes of spill stores per
    thread): at 16 elements fwd 0, dx 0-136, dz 60-184; at 32 elements fwd 0-1.3K, dx
    0-1.8K, dz 1.2-3.5K; at 64, up to 38K. The spilling configs also compile 2-6x slower
    (a dz config 6-24 s on 2 CPU cores): the full 36-config space took ~5.5 min per tuning
    key, the kept one ~30 s. A second pipelining stage compiled to the same code (the
    loads sit in unrolled, masked tap loops), so there is one stage.
    """
    return block_m * block_d <= 16 * 32 * num_warps


def _configs(block_d: int) -> list[triton.Config]:
    """Autotune search space of every pass for one padded head dim (CUDA only), filtered by
    `_keep` (never empty: 16 x 256 at 8 warps is kept)."""
    return [triton.Config({"BLOCK_M": bm}, num_warps=w, num_stages=1)
            for bm in (16, 32, 64, 128) for w in (4, 8) if _keep(bm, w, block_d)]


_KERNELS = {"fwd": _pool_norm_fwd, "dz": _pool_norm_bwd_dz, "dx": _pool_norm_bwd_dx}
# ROW_ALIGN is keyed: an unaligned launch loads scalar, and its best tile may differ.
_TUNE_KEY = ["N_BUCKET", "D", "ST", "SH", "SW", "ROW_ALIGN"]


@functools.cache
def _tuned(pass_name: str, block_d: int):
    return triton.autotune(configs=_configs(block_d), key=_TUNE_KEY)(_KERNELS[pass_name])


def _pinned_config() -> dict[str, int] | None:
    """One fixed config: from MVIT_FAST_POOL_CONFIG, or the small interpreter one."""
    return pinned_config(_CONFIG_ENV, ("BLOCK_M",), {"num_warps": 4, "num_stages": 1},
                         _INTERPRETER_CONFIG if INTERPRETED else None)


def _launch(wrap: Callable, pass_name: str, rows: int | None, grid1: int, block_d: int,
            *args, split: int | None = None, **kwargs) -> None:
    """Launch one pass: grid (row blocks, B*heads), or (split, B*heads) for the dz pass."""
    cfg = _pinned_config()
    if cfg is not None:
        grid = (split if split is not None else triton.cdiv(rows, cfg["BLOCK_M"]), grid1)
        wrap(_KERNELS[pass_name])[grid](*args, **kwargs, **cfg)
        return
    if split is not None:
        grid = (split, grid1)
    else:
        grid = lambda meta: (triton.cdiv(rows, meta["BLOCK_M"]), grid1)
    wrap(_tuned(pass_name, block_d))[grid](*args, **kwargs)


def _split(n_out: int, programs: int) -> int:
    """Programs per (batch, head) of the dz pass; never more than the blocks of the smallest tile."""
    cfg = _pinned_config()
    min_block = cfg["BLOCK_M"] if cfg is not None else 16  # the smallest autotuned tile
    cap = _INTERPRETER_SPLIT if INTERPRETED else _MAX_SPLIT
    return max(1, min(cap, triton.cdiv(_SPLIT_TARGET, programs), triton.cdiv(n_out, min_block)))


def pooled_size(n: int, kernel: int, stride: int) -> int:
    """Output length of a conv with padding kernel // 2 (rounds up for kernel 3)."""
    return (n + 2 * (kernel // 2) - kernel) // stride + 1


def _check(qkv: torch.Tensor, member: int, weight: torch.Tensor, thw: Sequence[int],
           stride: Sequence[int], has_cls: bool) -> tuple[int, ...]:
    """Validate one member's input; returns (T, H, W, kt, kh, kw, sT, sH, sW, To, Ho, Wo)."""
    if qkv.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"fused pooling takes float32/float16/bfloat16 activations, got {qkv.dtype}")
    if not weight.is_floating_point():
        raise TypeError(f"conv weight must be floating point, got {weight.dtype}")
    if not (qkv.is_cuda or INTERPRETED or compiling_only()):
        raise ValueError(f"fused pooling needs CUDA tensors (or TRITON_INTERPRET=1), got {qkv.device}")
    if qkv.ndim != 5:
        raise ValueError(f"qkv must be (B, N, members, heads, head_dim), got {tuple(qkv.shape)}")
    if not 0 <= member < qkv.shape[2]:
        raise ValueError(f"member {member} out of range for qkv {tuple(qkv.shape)}")
    d = qkv.shape[4]
    if d > MAX_HEAD_DIM:
        raise ValueError(f"head_dim {d} > {MAX_HEAD_DIM} is not supported")
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
    t, h, w, kt, kh, kw, st, sh, sw, to, ho, wo = _check(qkv, member, weight, thw, stride, has_cls)
    batch, _, _, heads, d = qkv.shape
    if norm_weight.shape != (d,) or norm_bias.shape != (d,):
        raise ValueError(f"LayerNorm weight/bias must be ({d},), got "
                         f"{tuple(norm_weight.shape)} / {tuple(norm_bias.shape)}")
    n_out = int(has_cls) + to * ho * wo
    y = torch.empty((batch, heads, n_out, d), device=qkv.device, dtype=qkv.dtype)
    block_d = triton.next_power_of_2(d)
    w2 = _tap_major(weight, block_d)
    _launch(wrap, "fwd", n_out, batch * heads, block_d,
            qkv, w2, norm_weight, norm_bias, y,
            *qkv.stride(), int(member), *w2.stride(), norm_weight.stride(0), norm_bias.stride(0),
            *y.stride(),
            heads, t, h, w, ho, wo, n_out, d, float(eps), triton.next_power_of_2(n_out),
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
    t, h, w, kt, kh, kw, st, sh, sw, to, ho, wo = _check(qkv, member, weight, thw, stride, has_cls)
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
    split = _split(n_out, batch * heads)
    rows = batch * heads * split
    dz = torch.empty((batch, heads, n_out, d), device=qkv.device, dtype=qkv.dtype)
    pw = torch.empty((rows, taps, d), device=qkv.device, dtype=torch.float32)
    pg = torch.empty((rows, d), device=qkv.device, dtype=torch.float32)
    pb = torch.empty((rows, d), device=qkv.device, dtype=torch.float32)
    _launch(wrap, "dz", None, batch * heads, block_d,
            qkv, w2, norm_weight, dy, dz, pw, pg, pb,
            *qkv.stride(), int(member), *w2.stride(), norm_weight.stride(0), *dy.stride(),
            *dz.stride(),
            heads, t, h, w, ho, wo, n_out, d, float(eps), split, triton.next_power_of_2(n_out),
            split=split, TAPS_PAD=taps_pad, **geometry, ROW_ALIGN=row_align(qkv, dy, dz))
    # Pass 2: dx gathers dz (same stream: launch order is the dependency).
    _launch(wrap, "dx", n_in, batch * heads, block_d,
            dz, w2, dqkv,
            *dz.stride(), *w2.stride(), *dqkv.stride(), int(member),
            heads, t, h, w, to, ho, wo, n_in, d, triton.next_power_of_2(n_in), **geometry,
            ROW_ALIGN=row_align(dqkv, dz))

    dweight = pw.sum(0).t().reshape(weight.shape).to(weight.dtype).contiguous()
    dgamma = pg.sum(0).to(norm_weight.dtype)
    dbeta = pb.sum(0).to(norm_weight.dtype)
    return dqkv, dweight, dgamma, dbeta
