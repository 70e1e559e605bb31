"""The fused Triton backend against the float64 oracle: output and every gradient.

On a machine without a GPU the kernels run under TRITON_INTERPRET=1 (set by conftest)
on CPU tensors in float32 and float16 (the interpreter's bf16 tl.dot is broken in
triton 3.9); shapes stay at tens of tokens. The `cuda` tests repeat the cases in
bf16/fp16 on the GPU, run the real MViTv2-S block shapes and torch.compile.

Head dims that split (72, 96, 144: `head_dim_split`) run in both kernel layouts, the
padded one ("pad") and the split one ("split"), each pinned through
MVIT_FAST_TRITON_SPLIT_D; the layout that actually ran is checked (`launch_configs`).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import mvit_fast.kernels.pooled_attention as pooled_attention_kernels
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from mvit_fast.kernels.pooled_attention import (
    MAX_BATCH_HEADS,
    attention_backward,
    attention_forward,
    dkdv_chunks,
    head_dim_split,
    launch_configs,
)

import mvit_fast
from mvit_fast.attention import pooled_attention
from mvit_fast.attention.fused import triton_takes
from mvit_fast.attention.reference import decomposed_rel_pos, rel_pos_bias
from tests.numerics import assert_close, tolerance

GRAD_NAMES = ("q", "k", "v", "rel_pos_t", "rel_pos_h", "rel_pos_w")
CONFIG_ENV = "MVIT_FAST_TRITON_CONFIG"
SPLIT_ENV = "MVIT_FAST_TRITON_SPLIT_D"
CHUNKS_ENV = "MVIT_FAST_TRITON_DKDV_CHUNKS"
LAYOUTS = {"pad": "0", "split": "1"}  # head-dim layout -> MVIT_FAST_TRITON_SPLIT_D


@dataclass(frozen=True)
class Case:
    q_thw: tuple[int, int, int]
    k_thw: tuple[int, int, int]
    head_dim: int = 16
    has_cls: bool = True
    residual: bool = True
    axes: tuple[bool, bool, bool] = (True, True, True)  # rel_pos_t, rel_pos_h, rel_pos_w on/off
    table_lens: tuple[int | None, int | None, int | None] = (None, None, None)  # None: 2*max-1
    batch: int = 2
    heads: int = 2
    non_contiguous: bool = False
    row_pad: int = 0  # q, k, v: the first head_dim columns of (..., head_dim + row_pad) rows

    @property
    def interpolated(self) -> bool:
        return any(n is not None and n != 2 * max(qs, ks) - 1
                   for n, qs, ks in zip(self.table_lens, self.q_thw, self.k_thw))

    def __str__(self) -> str:
        axes = "".join(n for n, on in zip("thw", self.axes) if on) or "none"
        return (f"q{self.q_thw}-k{self.k_thw}-d{self.head_dim}-cls{int(self.has_cls)}-"
                f"res{int(self.residual)}-rel_{axes}-B{self.batch}H{self.heads}"
                f"{'-interp' if self.interpolated else ''}"
                f"{'-strided' if self.non_contiguous else ''}"
                f"{f'-rowpad{self.row_pad}' if self.row_pad else ''}").replace(" ", "")


# A covering set, not the full product: every flag on and off somewhere, integer and
# non-integer grid ratios, Nk = 1 (+cls), Nq = 1, head dims 16/72/96/144, interpolated tables,
# block-aligned lengths (EVEN_M/EVEN_N paths) and strided inputs.
CASES = [
    Case((2, 5, 5), (2, 3, 3)),  # non-integer ratio 5/3
    Case((2, 5, 5), (2, 3, 3), has_cls=False, residual=False),
    Case((1, 7, 7), (1, 1, 1), has_cls=False, axes=(False, True, True)),  # Nk = 1
    Case((1, 7, 7), (1, 1, 1), residual=False, axes=(True, False, False)),  # Nk = 1 + cls
    Case((2, 4, 4), (2, 2, 2), head_dim=72, axes=(False, True, False)),  # integer ratio 2
    Case((1, 3, 4), (2, 2, 3), head_dim=96, residual=False, axes=(True, False, True)),  # Nk > Nq
    Case((2, 4, 4), (1, 4, 4), has_cls=False, axes=(False, False, False)),  # no bias; 32 x 16
    Case((1, 1, 1), (1, 2, 3), has_cls=False, batch=1, heads=3),  # Nq = 1
    Case((2, 5, 5), (2, 3, 3), table_lens=(5, 7, 4)),  # tables interpolated to (3, 9, 9)
    Case((2, 3, 3), (1, 3, 3), non_contiguous=True),
    Case((1, 2, 3), (1, 2, 2), head_dim=144, batch=1, heads=1),  # 128 + 16 when split
]


def with_layouts(cases: list[Case]) -> list:
    """(case, layout) params: "pad" for every case, "split" too where the head dim splits."""
    return [pytest.param(case, layout, id=f"{case}-{layout}") for case in cases
            for layout in (("pad", "split") if head_dim_split(case.head_dim) else ("pad",))]


def _make_inputs(case: Case, dtype: torch.dtype, device: str = "cpu", seed: int = 0):
    """(q, k, v, rel_pos_t, rel_pos_h, rel_pos_w) in dtype; absent tables are None.

    q/k/v are LayerNorm-like (unit variance, as MViT's normed pooled tokens); the tables
    get std 0.2, so the bias is a few units, as in trained models.
    """
    gen = torch.Generator().manual_seed(seed)
    nq = int(case.has_cls) + case.q_thw[0] * case.q_thw[1] * case.q_thw[2]
    nk = int(case.has_cls) + case.k_thw[0] * case.k_thw[1] * case.k_thw[2]
    b, h, d = case.batch, case.heads, case.head_dim
    if case.non_contiguous:
        # Slices of a packed (B, N, 3, heads, d) buffer, as a fused qkv projection gives.
        q = torch.randn(b, nq, 3, h, d, generator=gen)[:, :, 1].transpose(1, 2)
        kv = torch.randn(b, nk, 3, h, d, generator=gen)
        k, v = kv[:, :, 0].transpose(1, 2), kv[:, :, 2].transpose(1, 2)
    else:
        q, k, v = (torch.randn(b, h, n, d, generator=gen) for n in (nq, nk, nk))
    if case.row_pad:
        q, k, v = (torch.cat([x, torch.randn(*x.shape[:3], case.row_pad, generator=gen)], dim=3)[..., :d]
                   for x in (q, k, v))
    tables = []
    for on, length, qs, ks in zip(case.axes, case.table_lens, case.q_thw, case.k_thw):
        length = length or 2 * max(qs, ks) - 1
        tables.append(0.2 * torch.randn(length, d, generator=gen) if on else None)
    out = [t.to(device=device, dtype=dtype) if t is not None else None for t in (q, k, v, *tables)]
    assert (case.non_contiguous or case.row_pad > 0) == (not out[0].is_contiguous())
    return out


def _run(inputs, case: Case, backend: str, grad_out: torch.Tensor, compile: bool = False):
    """Output and the gradients of (q, k, v, tables) for <grad_out, output>."""
    leaves = [t.detach().requires_grad_(True) if t is not None else None for t in inputs]

    def attention(q, k, v, rel_pos_t, rel_pos_h, rel_pos_w):
        return pooled_attention(q, k, v, case.q_thw, case.k_thw, rel_pos_t, rel_pos_h, rel_pos_w,
                                has_cls=case.has_cls, residual_pooling=case.residual, backend=backend)

    out = (torch.compile(attention, fullgraph=True) if compile else attention)(*leaves)
    present = [t for t in leaves if t is not None]
    grads = iter(torch.autograd.grad(out, present, grad_out.to(out.dtype)))
    return out, [next(grads) if t is not None else None for t in leaves]


def check_against_oracle(case: Case, dtype: torch.dtype, device: str = "cpu", seed: int = 0,
                         compile: bool = False, layout: str | None = None) -> None:
    """Triton in `dtype` (optionally under torch.compile) vs eager in float64, same inputs.

    layout: "pad" or "split" pins the kernels' head-dim layout (MVIT_FAST_TRITON_SPLIT_D) and
    checks that every pass ran in it; None leaves the choice to the pinned config/autotuner.
    """
    inputs = _make_inputs(case, dtype, device, seed)
    oracle_inputs = [t.double() if t is not None else None for t in inputs]
    nq = inputs[0].shape[2]
    gen = torch.Generator().manual_seed(seed + 1)
    # dO is rounded to dtype once and fed to both, like the inputs: only the kernel's error counts.
    grad_out = torch.randn(case.batch, case.heads, nq, case.head_dim, generator=gen).to(device, dtype)
    with pytest.MonkeyPatch.context() as env:
        if layout is not None:
            env.setenv(SPLIT_ENV, LAYOUTS[layout])
        out, grads = _run(inputs, case, "triton", grad_out, compile)
    if layout is not None and not compile:  # compiled launches are autotuned by Inductor
        split = layout == "split" and head_dim_split(case.head_dim) is not None
        ran = {name: cfg and cfg["SPLIT_D"] for name, cfg in launch_configs().items()}
        assert ran == {"fwd": split, "dq": split, "dkdv": split}, f"asked for {layout}, ran {ran}"
    ref, ref_grads = _run(oracle_inputs, case, "eager", grad_out)
    assert out.dtype == dtype and out.is_contiguous()
    assert_close(out, ref, dtype=dtype, kind="fwd", name=f"out [{case}]")
    for name, grad, ref_grad in zip(GRAD_NAMES, grads, ref_grads):
        if ref_grad is None:
            assert grad is None
            continue
        kind = "table_grad" if name.startswith("rel_pos") else "grad"
        assert_close(grad, ref_grad, dtype=dtype, kind=kind, name=f"d{name} [{case}]")


# ---------------------------------------------------------------------------------------
# CPU (Triton interpreter)
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(("case", "layout"), with_layouts(CASES))
def test_fp32_matches_oracle(case: Case, layout: str) -> None:
    check_against_oracle(case, torch.float32, layout=layout)


@pytest.mark.parametrize(("case", "layout"),
                         with_layouts([CASES[0], CASES[3], CASES[5], CASES[6], CASES[8], CASES[9]]))
def test_fp16_matches_oracle(case: Case, layout: str) -> None:
    check_against_oracle(case, torch.float16, layout=layout)


@pytest.mark.parametrize(("case", "row_align"), [
    (CASES[4], 8),  # contiguous d = 72: strides 72, 33 * 72, multiples of 8, not all of 16
    (replace(CASES[4], non_contiguous=True), 8),  # packed qkv slices: row stride 3 * heads * 72
    (replace(CASES[4], row_pad=3), 1),  # row stride 75
    (CASES[5], 1),  # contiguous d = 96: Triton's own specialization proves the alignment
], ids=str)
def test_row_align(case: Case, row_align: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """The launcher claims 8-element row alignment (ROW_ALIGN) exactly where it holds. The
    interpreter runs the kernels' `x // 8 * 8` rebuild of offsets, strides and D, so a false
    claim would also show up as a mismatch against the oracle."""
    seen = {}
    launch = pooled_attention_kernels._launch

    def spy(wrap, pass_name, *args, **kwargs):
        seen[pass_name] = kwargs["ROW_ALIGN"]
        return launch(wrap, pass_name, *args, **kwargs)

    monkeypatch.setattr(pooled_attention_kernels, "_launch", spy)
    check_against_oracle(case, torch.float32, layout="pad")
    assert seen == {"fwd": row_align, "dq": row_align, "dkdv": row_align}


def test_pinned_config(monkeypatch: pytest.MonkeyPatch) -> None:
    """MVIT_FAST_TRITON_CONFIG pins the blocks: 32 x 16 tiles, EVEN_M/EVEN_N on for 32 x 16."""
    monkeypatch.setenv(CONFIG_ENV, "BLOCK_M=32,BLOCK_N=16,num_warps=4,num_stages=1")
    check_against_oracle(CASES[6], torch.float32)  # Nq = 32, Nk = 16: no masks
    check_against_oracle(CASES[0], torch.float32)


@pytest.mark.parametrize("head_dim", [96, 72])
def test_pinned_config_selects_the_layout(monkeypatch: pytest.MonkeyPatch, head_dim: int) -> None:
    """SPLIT_D in the pinned config picks the layout and wins over MVIT_FAST_TRITON_SPLIT_D.

    32 x 16 tokens in 32 x 16 tiles: no row masks; d = 96 = 64 + 32 then loads with no mask
    at all, d = 72 = 64 + 16 masks only the hi tile's columns.
    """
    case = replace(CASES[6], head_dim=head_dim)
    monkeypatch.setenv(CONFIG_ENV, "BLOCK_M=32,BLOCK_N=16,num_warps=4,num_stages=1,SPLIT_D=1")
    check_against_oracle(case, torch.float32)
    assert all(cfg["SPLIT_D"] for cfg in launch_configs().values())
    monkeypatch.setenv(CONFIG_ENV, "BLOCK_M=32,BLOCK_N=16,num_warps=4,num_stages=1,SPLIT_D=0")
    monkeypatch.setenv(SPLIT_ENV, "1")
    check_against_oracle(case, torch.float32)
    assert not any(cfg["SPLIT_D"] for cfg in launch_configs().values())


def test_split_is_a_no_op_where_the_head_dim_does_not_split(monkeypatch: pytest.MonkeyPatch) -> None:
    """A power-of-two head dim (or one no narrower split) runs padded whatever is pinned."""
    assert head_dim_split(96) == (64, 32) and head_dim_split(72) == (64, 16)
    assert head_dim_split(144) == (128, 16) and head_dim_split(40) == (32, 16)
    assert head_dim_split(64) is None and head_dim_split(24) is None and head_dim_split(200) is None
    monkeypatch.setenv(CONFIG_ENV, "BLOCK_M=16,BLOCK_N=16,num_warps=1,num_stages=1,SPLIT_D=1")
    check_against_oracle(Case((1, 2, 3), (1, 2, 2), head_dim=64, batch=1, heads=1), torch.float32)
    assert not any(cfg["SPLIT_D"] for cfg in launch_configs().values())


def test_pinned_config_rejects_garbage(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(CONFIG_ENV, "BLOCK_M=32")
    with pytest.raises(ValueError, match="BLOCK_N"):
        check_against_oracle(CASES[0], torch.float32)
    monkeypatch.delenv(CONFIG_ENV)
    monkeypatch.setenv(SPLIT_ENV, "yes")
    with pytest.raises(ValueError, match=SPLIT_ENV):
        check_against_oracle(CASES[0], torch.float32)


@pytest.mark.parametrize(("chunks", "dtype"), [(2, torch.float32), (3, torch.float32), (64, torch.float32),
                                               (3, torch.float16)], ids=str)
def test_dkdv_query_chunks_match_oracle(chunks: int, dtype: torch.dtype, monkeypatch) -> None:
    """dk, dv as sums over query chunks (`dkdv_chunks`). CASES[0] has 51 queries, 4 blocks of
    16 in the interpreter: 2 chunks of 2 blocks; 3 chunks of 2, 2 and 0 blocks (an empty chunk
    must write zeros); 64 chunks, 60 of them empty."""
    monkeypatch.setenv(CHUNKS_ENV, str(chunks))
    check_against_oracle(CASES[0], dtype)
    assert launch_configs()["dkdv"]["Q_CHUNKS"] == chunks


def test_dkdv_chunks_at_mvit_shapes(monkeypatch) -> None:
    """The dkdv pass chunks its queries only where few key blocks face many queries: at batch
    8 on 132 SMs (an H100), S blocks 0 and 2 and B blocks 0-4 but B block 2 (3137 keys)."""
    monkeypatch.delenv(CHUNKS_ENV, raising=False)
    expected = {"s": {0: 5, 2: 3}, "b": {0: 3, 1: 3, 3: 2, 4: 2}}
    for size, chunked in expected.items():
        specs = mvit_fast.block_specs(mvit_fast.get_config(size))
        got = {i: dkdv_chunks(s.q_tokens, s.kv_tokens, 8 * s.num_heads, 132) for i, s in enumerate(specs)}
        assert got == {i: chunked.get(i, 1) for i in range(len(specs))}, size
    assert dkdv_chunks(25089, 393, 8, 0) == 1  # not a GPU
    monkeypatch.setenv(CHUNKS_ENV, "7")
    assert dkdv_chunks(393, 393, 64, 132) == 7
    for bad in ("0", "-2", "two"):
        monkeypatch.setenv(CHUNKS_ENV, bad)
        with pytest.raises(ValueError, match=CHUNKS_ENV):
            dkdv_chunks(393, 393, 64, 132)


@pytest.mark.parametrize("pass_name", ["fwd", "dq", "dkdv"])
def test_compact_autotune_space_is_part_of_the_full_one(pass_name: str, monkeypatch) -> None:
    """The default (compact) configs are tiles the full search space keeps, both layouts; the
    full space is an opt-in, and a wrong value of its variable is an error."""
    key = lambda c: (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["SPLIT_D"], c.num_warps, c.num_stages)
    compact = {key(c) for c in pooled_attention_kernels._configs(pass_name, (False, True))}
    full = {key(c) for c in pooled_attention_kernels._configs(pass_name, (False, True), "full")}
    assert compact < full and len(compact) <= 8
    assert {c[2] for c in compact} == {False, True}
    assert pooled_attention_kernels._tune_space() == "compact"
    monkeypatch.setenv("MVIT_FAST_TRITON_TUNE", "everything")
    with pytest.raises(ValueError, match="MVIT_FAST_TRITON_TUNE"):
        pooled_attention_kernels._tune_space()


@settings(max_examples=10, deadline=None, derandomize=True)
@given(
    q_thw=st.tuples(st.integers(1, 2), st.integers(1, 5), st.integers(1, 5)),
    k_thw=st.tuples(st.integers(1, 2), st.integers(1, 4), st.integers(1, 4)),
    head_dim=st.sampled_from([8, 16, 24, 40]),
    has_cls=st.booleans(),
    residual=st.booleans(),
    axes=st.tuples(st.booleans(), st.booleans(), st.booleans()),
    heads=st.integers(1, 2),
)
def test_random_shapes_fp32(q_thw, k_thw, head_dim, has_cls, residual, axes, heads) -> None:
    """Split layout asked for: d = 40 runs as 32 + (8 -> 16), the other dims padded (no split)."""
    case = Case(q_thw, k_thw, head_dim, has_cls, residual, axes, batch=1, heads=heads)
    check_against_oracle(case, torch.float32, layout="split")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("index", [2, 3], ids=["block3", "block14"])
def test_table_grad_tolerance_is_what_plain_eager_attains(index: int, dtype: torch.dtype) -> None:
    """The rel-table gradients' bound (kind "table_grad", see tests/numerics.py), measured on
    the plain eager attention in `dtype` at real MViTv2-S block shapes: it misses the
    elementwise gradient bound at near-zero elements, and keeps within the RMS-scaled one with
    a margin (at most 0.36 of it in fp16 and 0.80 in bf16 over blocks 0, 1, 3 and 14)."""
    case = _mvit_s_block_cases()[index]
    inputs = _make_inputs(case, dtype)
    grad_out = torch.randn(case.batch, case.heads, inputs[0].shape[2], case.head_dim,
                           generator=torch.Generator().manual_seed(1)).to(dtype)
    _, grads = _run(inputs, case, "eager", grad_out)
    _, ref_grads = _run([t.double() for t in inputs], case, "eager", grad_out)
    for name, grad, ref in zip(GRAD_NAMES[3:], grads[3:], ref_grads[3:]):
        with pytest.raises(AssertionError, match="elements differ"):
            assert_close(grad, ref, dtype=dtype, kind="grad", name=name)
        assert_close(grad, ref, dtype=dtype, kind="table_grad", name=name)


def _rel_tables(case: Case, q: torch.Tensor, tables) -> torch.Tensor:
    """The kernels' per-query tables of `case`'s present axes, concatenated."""
    rels = decomposed_rel_pos(q, case.q_thw, case.k_thw, *tables, case.has_cls)
    return torch.cat([t for t in rels if t is not None], dim=-1)


def test_registered_ops_and_fake_shapes() -> None:
    """The ops exist under mvit_fast:: and their fake shapes match the real outputs."""
    case = CASES[0]
    q, k, v, *tables = _make_inputs(case, torch.float32)
    rel = _rel_tables(case, q, tables)
    flags = (list(case.k_thw), [True, True, True], True, True, 0.25)
    torch.library.opcheck(torch.ops.mvit_fast.pooled_attention_fwd.default, (q, k, v, rel, *flags),
                          test_utils=("test_schema", "test_faketensor"))
    out, lse = torch.ops.mvit_fast.pooled_attention_fwd(q, k, v, rel, *flags)
    dout = torch.randn_like(out)
    torch.library.opcheck(torch.ops.mvit_fast.pooled_attention_bwd.default,
                          (dout, q, k, v, rel, out, lse, *flags),
                          test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("case", [CASES[0], CASES[1], CASES[5]], ids=str)
def test_backward_corrects_the_delta_of_a_rounded_output(case: Case) -> None:
    """The dq pass starts the softmax delta from the forward's out, dO . (out - q), and makes
    it exact in its key loop. So an error in out (its bf16 rounding on a GPU, which would put
    the table gradients up to 8x over the bf16 tolerance were delta taken from out alone)
    leaves drel, dk and dv unchanged; dq alone moves, by -scale * e_i * sum_j P_ij k_j with
    e_i = dO_i . (error in out_i): FlashAttention's dq error, predicted here exactly."""
    q, k, v, *tables = _make_inputs(case, torch.float32)
    rel = _rel_tables(case, q, tables)
    scale = case.head_dim ** -0.5
    flags = (list(case.k_thw), list(case.axes), case.has_cls, case.residual, scale)
    out, lse = attention_forward(q, k, v, rel, *flags)
    gen = torch.Generator().manual_seed(1)
    dout = torch.randn(out.shape, generator=gen)
    err = 1e-2 * torch.randn(out.shape, generator=gen)  # ~8 bf16 rounding units of |out| ~ 1
    dq, dk, dv, drel = attention_backward(dout, q, k, v, rel, out, lse, *flags)
    dq_e, dk_e, dv_e, drel_e = attention_backward(dout, q, k, v, rel, out + err, lse, *flags)
    assert torch.equal(dv_e, dv)
    assert_close(dk_e, dk, dtype=torch.float32, kind="grad", name="dk")
    assert_close(drel_e, drel, dtype=torch.float32, kind="grad", name="drel")
    bias = rel_pos_bias(decomposed_rel_pos(q, case.q_thw, case.k_thw, *tables, case.has_cls),
                        case.k_thw, case.has_cls)
    p = torch.softmax((q * scale) @ k.transpose(-2, -1) + (0 if bias is None else bias), dim=-1)
    shift = -scale * (dout * err).sum(-1, keepdim=True) * (p @ k)
    assert (dq_e - dq).abs().max() > 10 * tolerance(torch.float32, "grad")
    assert_close(dq_e - dq, shift, dtype=torch.float32, kind="grad", name="dq shift")


def test_rejects_unsupported_inputs() -> None:
    case = Case((1, 2, 2), (1, 1, 1), head_dim=264, axes=(False, False, False), batch=1, heads=1)
    q, k, v, *_ = _make_inputs(case, torch.float32)
    with pytest.raises(ValueError, match="head_dim 264"):
        pooled_attention(q, k, v, case.q_thw, case.k_thw, backend="triton")
    case = replace(case, head_dim=16)
    q, k, v, *_ = _make_inputs(case, torch.float64)
    with pytest.raises(TypeError, match="float64"):
        pooled_attention(q, k, v, case.q_thw, case.k_thw, backend="triton")
    if pooled_attention_kernels.INTERPRETED:
        with pytest.raises(TypeError, match="interpreter computes bfloat16 tl.dot wrongly"):
            pooled_attention(*(t.bfloat16() for t in (q, k, v)), case.q_thw, case.k_thw, backend="triton")
    # more (batch, head) pairs than CUDA's grid axis 1 takes: refused, and "auto" looks elsewhere
    many = [t.float().expand(MAX_BATCH_HEADS + 1, *t.shape[1:]) for t in (q, k, v)]
    with pytest.raises(ValueError, match=f"batch x heads = {MAX_BATCH_HEADS + 1} > {MAX_BATCH_HEADS}"):
        pooled_attention(*many, case.q_thw, case.k_thw, backend="triton")
    assert not triton_takes(many[0], case.k_thw, (None, None, None))


@pytest.mark.parametrize("residual", [True, False], ids=["residual", "no_residual"])
def test_autocast_runs_the_kernel_in_the_autocast_dtype(residual: bool) -> None:
    # Under autocast, pooled q/k/v arrive in fp32 (LayerNorm is an fp32 op); the op must
    # still run in the autocast dtype, as SDPA does (fp16 here: the interpreter's bf16 dot
    # is broken, see DESIGN section 7), and return the eager ops' dtype.
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 1 + 2 * 3 * 3, 16) for _ in range(3))
    k, v = k[:, :, :5], v[:, :, :5]
    tables = [torch.randn(n, 16) for n in (3, 5, 5)]
    args = ((2, 3, 3), (1, 2, 2))

    def run(inputs, backend, autocast):
        inputs = [t.clone().requires_grad_() for t in inputs]
        with torch.autocast("cpu", dtype=torch.float16, enabled=autocast):
            out = pooled_attention(*inputs[:3], *args, *inputs[3:], residual_pooling=residual,
                                   backend=backend)
        out.float().backward(grad)
        return out, [t.grad for t in inputs]

    grad = torch.randn(q.shape)
    out, grads = run((q, k, v, *tables), "triton", True)
    assert out.dtype == run((q, k, v, *tables), "eager", True)[0].dtype
    assert out.dtype == (torch.float32 if residual else torch.float16)
    want = pooled_attention(q.double(), k.double(), v.double(), *args, *(t.double() for t in tables),
                            residual_pooling=residual, backend="eager")
    assert_close(out, want, dtype=torch.float16, name="autocast output")
    # Autocast is the op on q, k, v cast to fp16: the same kernel, and rel-pos tables (and
    # their gradients) in fp32, not rounded to fp16 by an autocast einsum.
    cast_out, cast_grads = run((q.half(), k.half(), v.half(), *tables), "triton", False)
    assert torch.equal(out, cast_out.to(out.dtype))
    for name, g, c in zip(GRAD_NAMES, grads, cast_grads):
        if name.startswith("rel_pos"):
            assert torch.equal(g, c), name
        else:
            assert_close(g, c.float(), dtype=torch.float16, name=f"autocast d{name}")


# ---------------------------------------------------------------------------------------
# CUDA
# ---------------------------------------------------------------------------------------


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize(("case", "layout"), with_layouts(CASES))
def test_cuda_matches_oracle(case: Case, layout: str, dtype: torch.dtype) -> None:
    check_against_oracle(case, dtype, device="cuda", layout=layout)


def _mvit_s_block_cases() -> list[Case]:
    specs = mvit_fast.block_specs(mvit_fast.get_config("s"))
    cases = []
    for index in (0, 1, 3, 14):  # 25089 x 393, 6273 x 1569, 1569 x 1569, 393 x 1569
        spec = specs[index]
        t_len, hw_len = spec.rel_pos_t_len, spec.rel_pos_hw_len
        cases.append(Case(tuple(spec.q_grid), tuple(spec.kv_grid), head_dim=spec.head_dim,
                          table_lens=(t_len, hw_len, hw_len), batch=2, heads=spec.num_heads))
    return cases


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize(("case", "layout"), with_layouts(_mvit_s_block_cases()))
def test_cuda_mvit_s_blocks(case: Case, layout: str, dtype: torch.dtype) -> None:
    """The real MViTv2-S block shapes (d = 96) at batch 2 in both head-dim layouts, each
    autotuned over its own configs; the float64 oracle runs on the GPU."""
    check_against_oracle(case, dtype, device="cuda", layout=layout)


def _every_config() -> list:
    """(pass, config) for each config in each pass's autotune space, both head-dim layouts."""
    params = []
    for name in ("fwd", "dq", "dkdv"):
        for config in pooled_attention_kernels._configs(name, (False, True)):
            meta = {**config.all_kwargs(), "SPLIT_D": int(config.kwargs["SPLIT_D"])}
            label = "-".join([name, *(f"{k}{v}" for k, v in meta.items())])
            params.append(pytest.param(name, config, id=label))
    return params


@pytest.mark.cuda
@pytest.mark.parametrize(("pass_name", "config"), _every_config())
def test_cuda_every_autotune_config_matches_oracle(pass_name: str, config, monkeypatch) -> None:
    """Each config the autotuner may pick, alone in its pass's search space (the other passes
    run the 16 x 16 fallback), at MViTv2-S block 1 (6273 queries x 1569 keys on an 8 x 14 x
    14 grid, 2 heads), bf16. The other numerics tests pin one config. On an H100 (Triton 3.6) a dq
    config once in the space, 128 x 64 split at 1 stage, gave table gradients of relative
    error 2.7-3.3 and dq of 0.04 (0.006 and 0.003 with every other config), and the dq pass at
    64 x 128 (outside its space) made an illegal memory access."""
    monkeypatch.delenv("MVIT_FAST_TRITON_CONFIG", raising=False)
    fallback = pooled_attention_kernels._config(*pooled_attention_kernels._FALLBACK, split=False)
    monkeypatch.setattr(pooled_attention_kernels, "_configs",
                        lambda name, *_: [config] if name == pass_name else [fallback])
    pooled_attention_kernels._tuned.cache_clear()
    try:
        check_against_oracle(_mvit_s_block_cases()[1], torch.bfloat16, device="cuda")
    finally:
        pooled_attention_kernels._tuned.cache_clear()
    expected = {**config.kwargs, "num_warps": config.num_warps, "num_stages": config.num_stages}
    ran = launch_configs()[pass_name]
    ran.pop("Q_CHUNKS", None)
    assert ran == expected


@pytest.mark.cuda
@pytest.mark.parametrize("case", [CASES[0], _mvit_s_block_cases()[2]], ids=str)
def test_cuda_compile_fullgraph(case: Case) -> None:
    """torch.compile(fullgraph=True) traces the triton_op (no graph break), fwd and bwd."""
    torch._dynamo.reset()
    check_against_oracle(case, torch.bfloat16, device="cuda", compile=True)
