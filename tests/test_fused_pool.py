"""The fused pooling (depthwise Conv3d + LayerNorm of q, k, v) against the eager ops in float64.

On a machine without a GPU the kernels run under TRITON_INTERPRET=1 (set by conftest) on
CPU tensors in float32, float16 and bfloat16 (no tl.dot here, so the interpreter's bf16
dot bug does not apply), on grids of tens of tokens. The oracle is
`attention_pool` (nn.Conv3d + nn.LayerNorm, as `MultiScaleAttention` runs it) in float64
on the same (rounded) inputs and parameters; outputs and every gradient (qkv, the three
conv weights, the three LayerNorm weights and biases) go through `assert_close`. The
`cuda` tests repeat this in bf16 at the real MViTv2-S/B block shapes and compare a whole
MViTv2-S block (fused pooling + fused attention) with the eager block.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, replace

import mvit_fast.kernels.pool_norm as pool_norm_kernels
import pytest
import torch
import torch.nn as nn

import mvit_fast
import mvit_fast.attention.fused_pool as fused_pool_module
import mvit_fast.attention.module as attention_module
from mvit_fast.attention import BACKENDS, MultiScaleAttention, attention_pool
from mvit_fast.attention.fused_pool import can_fuse_pool, fused_pool_qkv, pool_norm_qkv
from mvit_fast.model import MultiScaleBlock
from tests.numerics import assert_close, assert_no_worse

Triple = tuple[int, int, int]
PARAM_NAMES = ("pool_q", "pool_k", "pool_v", "norm_q.weight", "norm_k.weight", "norm_v.weight",
               "norm_q.bias", "norm_k.bias", "norm_v.bias")


@dataclass(frozen=True)
class Case:
    thw: Triple
    stride_q: Triple
    stride_kv: Triple
    head_dim: int = 16
    heads: int = 1
    has_cls: bool = True
    batch: int = 2
    strided_qkv: bool = False  # qkv a permuted view of a (B, 3, N, heads, d) buffer
    kernel: Triple = (3, 3, 3)

    def __str__(self) -> str:
        kernel = "" if self.kernel == (3, 3, 3) else f"-k{self.kernel}"
        return (f"thw{self.thw}-q{self.stride_q}-kv{self.stride_kv}-d{self.head_dim}-H{self.heads}"
                f"-cls{int(self.has_cls)}-B{self.batch}{'-strided' if self.strided_qkv else ''}"
                f"{kernel}").replace(" ", "")


# Every MViT stride ((1,1,1), (1,2,2), (1,4,4), (1,8,8)) plus a temporal one, odd grid
# sizes (stride-2 axes of 5, 7 and 9 end in a half window), grids smaller than the stride,
# cls on/off, head dims 16/72/96/144 (padded to 128, 128, 256), 1 and 2 heads, a strided qkv.
CASES = [
    Case((2, 5, 5), (1, 2, 2), (1, 4, 4), heads=2),
    Case((3, 4, 5), (1, 1, 1), (2, 2, 2), has_cls=False),
    Case((2, 9, 7), (1, 1, 1), (1, 8, 8), batch=1),
    Case((1, 3, 7), (1, 2, 2), (1, 1, 1), head_dim=72, batch=1),
    Case((2, 3, 3), (1, 1, 1), (1, 1, 1), head_dim=96, heads=2, batch=1),
    Case((2, 3, 5), (1, 2, 2), (1, 4, 4), heads=2, has_cls=False, strided_qkv=True),
    Case((1, 1, 1), (1, 2, 2), (1, 8, 8), heads=2, batch=1),  # one token (+ cls)
    # kernel size 1 on an axis (no window along it), strided and not
    Case((3, 5, 6), (1, 1, 1), (2, 2, 3), kernel=(1, 3, 1), batch=1),
    Case((2, 4, 9), (1, 2, 2), (1, 1, 1), kernel=(3, 1, 3), heads=2, has_cls=False, batch=1),
    Case((1, 3, 3), (1, 2, 2), (1, 2, 2), head_dim=144, batch=1),  # MViTv2-L's: padded to 256
]
FP16_CASES = [CASES[2], CASES[3], CASES[4]]
SMALL = Case((1, 3, 3), (1, 2, 2), (1, 2, 2), batch=1)


def _make(case: Case, dtype: torch.dtype, param_dtype: torch.dtype | None = None,
          device: str = "cpu", seed: int = 0):
    """qkv (B, N, 3, heads, d) and the 9 parameters (3 conv weights, 3 gammas, 3 betas).

    Unit-variance qkv (a projection of a normed input); conv weights std 0.3 so the 27-tap
    sums are O(1) and differ per tap; gamma 1 + N(0, 0.1), beta N(0, 0.1).
    """
    gen = torch.Generator().manual_seed(seed)
    b, h, d = case.batch, case.heads, case.head_dim
    n = int(case.has_cls) + case.thw[0] * case.thw[1] * case.thw[2]
    if case.strided_qkv:
        qkv = torch.randn(b, 3, n, h, d, generator=gen).permute(0, 2, 1, 3, 4)
    else:
        qkv = torch.randn(b, n, 3 * h * d, generator=gen).view(b, n, 3, h, d)
    weights = [0.3 * torch.randn(d, 1, *case.kernel, generator=gen) for _ in range(3)]
    gammas = [1 + 0.1 * torch.randn(d, generator=gen) for _ in range(3)]
    betas = [0.1 * torch.randn(d, generator=gen) for _ in range(3)]
    pdt = param_dtype or dtype
    params = [t.to(device, pdt) for t in (*weights, *gammas, *betas)]
    return qkv.to(device, dtype), params


def _oracle(qkv: torch.Tensor, params, case: Case):
    """q, k, v from `attention_pool` with nn.Conv3d + nn.LayerNorm, as the module runs them."""
    d = case.head_dim
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    outs = []
    for i, (x, stride) in enumerate(zip((q, k, v), (case.stride_q, case.stride_kv, case.stride_kv))):
        conv = nn.Conv3d(d, d, case.kernel, stride=stride, padding=[k // 2 for k in case.kernel],
                         groups=d, bias=False)
        norm = nn.LayerNorm(d, eps=1e-6)
        # the (float64) parameter tensors themselves, so autograd reaches them
        del conv.weight, norm.weight, norm.bias
        conv.weight, norm.weight, norm.bias = params[i], params[3 + i], params[6 + i]
        outs.append(attention_pool(x, conv, case.thw, case.has_cls, norm)[0])
    return outs


def _fused(qkv: torch.Tensor, params, case: Case):
    strides = (case.stride_q, case.stride_kv, case.stride_kv)
    return pool_norm_qkv(qkv, case.thw, params[:3], strides, params[3:6], params[6:],
                         has_cls=case.has_cls, eps=1e-6)


def _run(fn, qkv, params, case: Case, grad_outs):
    leaves = [qkv.detach().requires_grad_(True), *(p.detach().requires_grad_(True) for p in params)]
    outs = fn(leaves[0], leaves[1:], case)
    grads = torch.autograd.grad(outs, leaves, [g.to(o.dtype) for g, o in zip(grad_outs, outs)])
    return outs, grads


def check_against_oracle(case: Case, dtype: torch.dtype, param_dtype: torch.dtype | None = None,
                         device: str = "cpu", seed: int = 0) -> None:
    """Fused in `dtype` vs `attention_pool` in float64 on the same rounded inputs, all grads."""
    qkv, params = _make(case, dtype, param_dtype, device, seed)
    # The output gradients, rounded to dtype once and fed to both.
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        shapes = [o.shape for o in _oracle(qkv.double(), [p.double() for p in params], case)]
    grad_outs = [torch.randn(s, generator=gen).to(device, dtype) for s in shapes]
    outs, grads = _run(_fused, qkv, params, case, grad_outs)
    ref, ref_grads = _run(_oracle, qkv.double(), [p.double() for p in params], case, grad_outs)
    for name, out, r in zip("qkv", outs, ref):
        assert out.dtype == dtype and out.is_contiguous()
        assert_close(out, r, dtype=dtype, kind="fwd", name=f"{name} [{case}]")
    for name, g, r in zip(("qkv", *PARAM_NAMES), grads, ref_grads):
        assert g.dtype == (dtype if name == "qkv" else params[0].dtype)
        assert_close(g, r, dtype=dtype, kind="grad", name=f"d{name} [{case}]")


# ---------------------------------------------------------------------------------------
# CPU (Triton interpreter)
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES, ids=str)
def test_fp32_matches_oracle(case: Case) -> None:
    check_against_oracle(case, torch.float32)


@pytest.mark.parametrize("case", FP16_CASES, ids=str)
def test_fp16_matches_oracle(case: Case) -> None:
    check_against_oracle(case, torch.float16)


@pytest.mark.parametrize("case", [CASES[0], CASES[3]], ids=str)
def test_bf16_matches_oracle(case: Case) -> None:
    """bf16 runs under the interpreter here: these kernels have no tl.dot (the op whose
    bf16 result triton 3.9's interpreter gets wrong), only loads, FMAs and reductions."""
    check_against_oracle(case, torch.bfloat16)


@pytest.mark.parametrize(("case", "row_align"), [
    (CASES[3], 8),  # contiguous d = 72: strides multiples of 8, not all of 16 (MViTv2-L)
    (replace(CASES[3], strided_qkv=True), 8),  # (B, 3, N, heads, d) storage: still multiples of 8
    (replace(CASES[3], head_dim=20), 1),  # d = 20: no 8-element rows
    (CASES[4], 1),  # d = 96: Triton's own specialization proves the alignment
], ids=str)
def test_row_align(case: Case, row_align: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """The launchers claim 8-element row alignment (ROW_ALIGN) exactly where it holds, in all
    three passes. The interpreter runs the kernels' `x // 8 * 8` rebuild of offsets, strides
    and D, so a false claim would also show up as a mismatch against the oracle."""
    seen: dict[str, set[int]] = {}
    launch = pool_norm_kernels._launch

    def spy(wrap, pass_name, *args, **kwargs):
        seen.setdefault(pass_name, set()).add(kwargs["ROW_ALIGN"])
        return launch(wrap, pass_name, *args, **kwargs)

    monkeypatch.setattr(pool_norm_kernels, "_launch", spy)
    check_against_oracle(case, torch.float32)
    assert seen == {"fwd": {row_align}, "dz": {row_align}, "dx": {row_align}}


def test_fp16_activations_fp32_params() -> None:
    """Autocast's mix: half activations, fp32 parameters; parameter gradients stay fp32."""
    check_against_oracle(CASES[3], torch.float16, param_dtype=torch.float32)


def test_backward_is_deterministic() -> None:
    case = SMALL
    qkv, params = _make(case, torch.float32)
    grad_outs = [torch.randn_like(o) for o in _fused(qkv, params, case)]
    first = _run(_fused, qkv, params, case, grad_outs)[1]
    second = _run(_fused, qkv, params, case, grad_outs)[1]
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_pinned_config(monkeypatch: pytest.MonkeyPatch) -> None:
    """MVIT_FAST_POOL_CONFIG pins the tile: blocks of 16 rows (groups of 4 positions in the
    forward and dx, single positions in the dz pass), so the dz pass' programs walk several
    blocks each (2 programs per (batch, head) under the interpreter)."""
    monkeypatch.setenv("MVIT_FAST_POOL_CONFIG", "BLOCK_M=16,num_warps=4")
    check_against_oracle(CASES[2], torch.float32)


@pytest.mark.parametrize("group", (1, 3, 4))
@pytest.mark.parametrize("case", [CASES[2], CASES[7], CASES[8]], ids=str)
def test_group_widths(case: Case, group: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each group width in all three passes: by default the interpreter runs the forward and dx
    in groups of 4 and the dz pass per position (what each autotunes on the GPU, widest
    first); pinned, the forward and dx also run per position and the dz pass grouped. The
    cases' lines end in partial groups (w extents 7, 6, 5, 9, 2 and 1 after pooling), and
    they take kernel size 1 along w and w strides of 2, 3 and 8."""
    monkeypatch.setenv("MVIT_FAST_POOL_CONFIG", f"BLOCK_M={8 if group == 1 else 4},GROUP_W={group}")
    check_against_oracle(case, torch.float32)


def test_pinned_config_rejects_a_group_width_over_4(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MVIT_FAST_POOL_CONFIG", "BLOCK_M=8,GROUP_W=5")
    with pytest.raises(ValueError, match="GROUP_W must be one of"):
        check_against_oracle(SMALL, torch.float32)


def test_registered_ops_fake_shapes() -> None:
    """Both ops exist under mvit_fast:: and their fake shapes match the real outputs."""
    case = SMALL
    qkv, params = _make(case, torch.float32)
    geometry = (list(case.thw), [*case.stride_q, *case.stride_kv, *case.stride_kv], case.has_cls, 1e-6)
    checks = ("test_schema", "test_faketensor")
    torch.library.opcheck(torch.ops.mvit_fast.pool_norm_fwd.default,
                          (qkv, params[:3], params[3:6], params[6:], *geometry), test_utils=checks)
    grads = [torch.randn_like(o) for o in _fused(qkv, params, case)]
    torch.library.opcheck(torch.ops.mvit_fast.pool_norm_bwd.default,
                          (grads, qkv, params[:3], params[3:6], *geometry), test_utils=checks)
    # strided inputs (a sliced and a dense permuted qkv): the gradients' strides (all
    # contiguous) are the fake implementation's too, as torch.compile relies on
    wide = torch.cat([qkv, qkv[..., :3]], dim=-1)[..., :qkv.shape[-1]]
    permuted = qkv.permute(0, 2, 1, 3, 4).contiguous().permute(0, 2, 1, 3, 4)
    swapped = [w.transpose(2, 4).contiguous().transpose(2, 4) for w in params[:3]]
    for strided in (wide, permuted):
        torch.library.opcheck(torch.ops.mvit_fast.pool_norm_bwd.default,
                              (grads, strided, swapped, params[3:6], *geometry), test_utils=checks)


def test_rejects_unsupported_inputs() -> None:
    case = CASES[0]
    qkv, params = _make(case, torch.float32)
    with pytest.raises(TypeError, match="float64"):
        _fused(qkv.double(), params, case)
    with pytest.raises(ValueError, match="tokens"):
        _fused(qkv[:, 1:], params, case)
    with pytest.raises(ValueError, match="kernel"):
        _fused(qkv, [torch.zeros(16, 1, 5, 5, 5)] * 3 + params[3:], case)
    with pytest.raises(ValueError, match=r"\(B, N, 3, heads, head_dim\)"):
        _fused(qkv[:, :, :2], params, case)
    many = qkv[:1].expand(pool_norm_kernels.MAX_BATCH_HEADS // qkv.shape[3] + 1, *qkv.shape[1:])
    with pytest.raises(ValueError, match=r"batch x heads = \d+ > 65535 \(CUDA's grid limit\)"):
        _fused(many, params, case)
    # A parameter on another device (the op's dispatcher would send a meta one to the fake
    # implementation, so the launchers are called directly).
    weight, gamma, beta = params[1], params[4], params[7]  # k's
    args = (case.thw, case.stride_kv, case.has_cls, 1e-6)
    forward, backward = pool_norm_kernels.pool_norm_forward, pool_norm_kernels.pool_norm_backward
    y = forward(qkv, 1, weight, gamma, beta, *args)
    meta = lambda t: t.to("meta")  # noqa: E731
    for name, launch in (
        ("conv weight", lambda: forward(qkv, 1, meta(weight), gamma, beta, *args)),
        ("norm_weight", lambda: forward(qkv, 1, weight, meta(gamma), beta, *args)),
        ("norm_bias", lambda: forward(qkv, 1, weight, gamma, meta(beta), *args)),
        ("norm_weight", lambda: backward(y, qkv, 1, weight, meta(gamma), *args)),
        ("dy", lambda: backward(meta(y), qkv, 1, weight, gamma, *args)),
    ):
        with pytest.raises(TypeError, match=f"{name} must be floating point on qkv's device cpu, got "
                                            "torch.float32 on meta"):
            launch()


def _attention_pair(seed: int = 0, *, backend: str = "triton", pool_backend: str = "auto", **kwargs):
    """A MultiScaleAttention with `backend` and `pool_backend` and its float64 eager twin, same weights."""
    torch.manual_seed(seed)
    fused = MultiScaleAttention(**kwargs, backend=backend, pool_backend=pool_backend)
    with torch.no_grad():  # non-trivial norms and rel-pos tables
        for name, p in fused.named_parameters():
            if "norm" in name or "rel_pos" in name:
                p.add_(0.1 * torch.randn_like(p))
    eager = MultiScaleAttention(**kwargs, backend="eager").double()
    eager.load_state_dict({k: v.double() for k, v in fused.state_dict().items()})
    return fused, eager


def _check_module(fused: nn.Module, eager: nn.Module, x: torch.Tensor, thw, dtype: torch.dtype,
                  autocast: bool = False) -> None:
    """Output and the gradients of x and of every parameter, fused in dtype vs eager float64.

    With autocast the fused module keeps fp32 parameters and input and runs under
    torch.autocast(dtype) (the training setup); tolerances are dtype's either way.
    """
    x_fused = x.detach().to(torch.float32 if autocast else dtype).requires_grad_(True)
    xs = [x_fused, x.detach().double().requires_grad_(True)]
    results = []
    for module, xi in zip((fused, eager), xs):
        with torch.autocast(x.device.type, dtype, enabled=autocast and module is fused):
            out, out_thw = module(xi, thw)
        grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out)
        params = [p for _, p in sorted(module.named_parameters())]
        results.append((out, out_thw, torch.autograd.grad(out, [xi, *params], grad_out)))
    (out, thw_f, grads), (ref, thw_e, ref_grads) = results
    assert thw_f == thw_e
    assert_close(out, ref, dtype=dtype, kind="fwd", name="block output")
    names = ["x"] + sorted(n for n, _ in fused.named_parameters())
    for name, g, r in zip(names, grads, ref_grads):
        assert_close(g, r, dtype=dtype, kind="grad", name=f"d{name}")


# One MViTv2 attention: q stride (1,2,2), kv (1,2,2), 2 heads, rel-pos, residual pooling.
ATTENTION_THW = (2, 5, 5)
ATTENTION = dict(
    dim=16, dim_out=32, input_size=ATTENTION_THW, num_heads=2, qkv_bias=True, kernel_q=(3, 3, 3),
    kernel_kv=(3, 3, 3), stride_q=(1, 2, 2), stride_kv=(1, 2, 2),
    norm_layer=lambda d: nn.LayerNorm(d, eps=1e-6), rel_pos_spatial=True,
    rel_pos_temporal=True, residual_pooling=True)


def _attention_input() -> torch.Tensor:
    return torch.randn(2, 1 + 50, 16, generator=torch.Generator().manual_seed(2))


def _record_calls(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The list that "fused pool", "plain pool" and "triton attention" are appended to, in call order,
    whenever `MultiScaleAttention` runs the fused pooling, the plain pooling or the Triton attention."""
    calls = []

    def spy(name, fn):
        return lambda *args: calls.append(name) or fn(*args)

    monkeypatch.setattr(attention_module, "fused_pool_qkv", spy("fused pool", fused_pool_qkv))
    monkeypatch.setattr(attention_module, "_pool_projection_eager",
                        spy("plain pool", attention_module._pool_projection_eager))
    monkeypatch.setitem(BACKENDS, "triton", spy("triton attention", BACKENDS["triton"]))
    return calls


def test_module_triton_backend_matches_eager(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fused pooling + fused attention in fp32 vs the eager module in float64."""
    calls = _record_calls(monkeypatch)
    fused, eager = _attention_pair(**ATTENTION)
    _check_module(fused, eager, _attention_input(), ATTENTION_THW, torch.float32)
    assert calls == ["fused pool", "triton attention", "plain pool"]  # the float64 oracle: plain ops


def test_module_plain_pooling_under_triton_attention(monkeypatch: pytest.MonkeyPatch) -> None:
    """pool_backend="eager" with backend="triton": the plain ops pool, the Triton kernel attends;
    the same result as the fused pooling (pool_backend "auto"), and as the float64 eager module."""
    calls = _record_calls(monkeypatch)
    fused, eager = _attention_pair(**ATTENTION)
    plain = MultiScaleAttention.from_module(fused, backend="triton", pool_backend="eager")
    x = _attention_input()
    _check_module(plain, eager, x, ATTENTION_THW, torch.float32)
    assert calls == ["plain pool", "triton attention", "plain pool"]  # the oracle: plain ops too
    calls.clear()
    with torch.no_grad():
        out_plain, out_fused = (module(x, ATTENTION_THW)[0] for module in (plain, fused))
    assert calls == ["plain pool", "triton attention", "fused pool", "triton attention"]
    assert_close(out_plain, out_fused, dtype=torch.float32, name="plain vs fused pooling")


def test_module_fused_pooling_under_eager_attention(monkeypatch: pytest.MonkeyPatch) -> None:
    """pool_backend="triton" with backend="eager": the fused kernel pools, the eager op attends."""
    calls = _record_calls(monkeypatch)
    fused, eager = _attention_pair(backend="eager", pool_backend="triton", **ATTENTION)
    _check_module(fused, eager, _attention_input(), ATTENTION_THW, torch.float32)
    assert calls == ["fused pool", "plain pool"]


def test_module_pool_backend_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    """Unknown values, and pool_backend="triton" wherever the fused kernel cannot pool, raise."""
    x = _attention_input()
    with pytest.raises(ValueError, match=r"unknown pool_backend 'fused': expected one of \('auto', 'eager', "
                                         r"'triton'\)"):
        MultiScaleAttention(**ATTENTION, pool_backend="fused")
    with pytest.raises(ValueError, match="separate_qkv=True"):
        MultiScaleAttention(**ATTENTION, separate_qkv=True, pool_backend="triton")
    module = MultiScaleAttention(**ATTENTION, pool_backend="eager")
    with pytest.raises(ValueError, match="unknown pool_backend"):  # a later switch is checked too
        module.pool_backend = "fast"
    assert module.pool_backend == "eager"
    avg = MultiScaleAttention(**{**ATTENTION, "mode": "avg"}, pool_backend="triton")
    with pytest.raises(ValueError, match="cannot pool this module \\(mode='avg'"):
        avg(x, ATTENTION_THW)
    conv = MultiScaleAttention(**ATTENTION, pool_backend="triton")
    with pytest.raises(ValueError, match="torch.float64"):
        conv.double()(x.double(), ATTENTION_THW)
    for module_reading_it in (attention_module, fused_pool_module):  # a CPU tensor, no interpreter
        monkeypatch.setattr(module_reading_it, "INTERPRETED", False)
    with pytest.raises(RuntimeError, match="on cpu: .*TRITON_INTERPRET=1"):
        conv.float()(x, ATTENTION_THW)
    monkeypatch.setattr(attention_module, "fused_pool_qkv", None)  # triton not installed
    with pytest.raises(RuntimeError, match="needs triton"):
        MultiScaleAttention(**ATTENTION, pool_backend="triton")


def test_module_falls_back_when_not_fusable(monkeypatch: pytest.MonkeyPatch) -> None:
    """Max pooling (no conv, no norm) keeps the plain ops under backend="triton"."""
    monkeypatch.setattr(attention_module, "fused_pool_qkv", None)  # would raise if called
    module = MultiScaleAttention(16, 16, (1, 4, 4), num_heads=1, kernel_q=(3, 3, 3),
                                 kernel_kv=(3, 3, 3), stride_kv=(1, 2, 2), mode="max",
                                 backend="eager")
    norms = (None, None, None)
    assert not can_fuse_pool((module.pool_q, module.pool_k, module.pool_v), norms, torch.zeros(1))
    out, thw = module(torch.randn(1, 17, 16), (1, 4, 4))
    assert out.shape == (1, 17, 16) and thw == [1, 4, 4]


# ---------------------------------------------------------------------------------------
# CUDA
# ---------------------------------------------------------------------------------------


def _block_cases(size: str) -> list[Case]:
    """Distinct pooling shapes (grid, strides, heads, head_dim) of a model's blocks, batch 2."""
    seen = {}
    for s in mvit_fast.block_specs(mvit_fast.get_config(size)):
        key = (s.input_grid, s.stride_q, s.stride_kv, s.head_dim, s.num_heads)
        seen.setdefault(key, Case(*key[:3], head_dim=s.head_dim, heads=s.num_heads, batch=2))
    return list(seen.values())


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", CASES, ids=str)
def test_cuda_matches_oracle(case: Case, dtype: torch.dtype) -> None:
    check_against_oracle(case, dtype, device="cuda")


@pytest.mark.cuda
@pytest.mark.parametrize("case", _block_cases("s") + _block_cases("b"), ids=str)
def test_cuda_mvit_block_shapes_bf16(case: Case) -> None:
    """Real MViTv2-S/B pooling shapes, bf16 activations and fp32 parameters (autocast's mix)."""
    check_against_oracle(case, torch.bfloat16, param_dtype=torch.float32, device="cuda")


@pytest.mark.cuda
@pytest.mark.parametrize("group", (1, 4))
def test_cuda_group_widths_bf16(group: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each group width in all three passes (see `test_group_widths`) at MViTv2-S block 0."""
    block_m = 16 if group == 1 else 8
    monkeypatch.setenv("MVIT_FAST_POOL_CONFIG", f"BLOCK_M={block_m},GROUP_W={group},num_warps=8")
    check_against_oracle(_block_cases("s")[0], torch.bfloat16, param_dtype=torch.float32, device="cuda")


def test_compile_traces_both_ops_without_a_graph_break() -> None:
    """fullgraph=True fails on any graph break: the registered fwd and bwd ops trace (CPU:
    the eager backend runs the traced graph, interpreter kernels inside; Inductor's copies
    of the kernels need CUDA: `test_cuda_compile_fullgraph`)."""
    torch._dynamo.reset()
    qkv, params = _make(SMALL, torch.float32)
    grad_outs = [torch.randn_like(o) for o in _fused(qkv, params, SMALL)]
    outs, grads = _run(torch.compile(_fused, fullgraph=True, backend="eager"), qkv, params, SMALL, grad_outs)
    ref, ref_grads = _run(_fused, qkv, params, SMALL, grad_outs)
    for a, b in zip([*outs, *grads], [*ref, *ref_grads]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)  # the same kernels on the same inputs


@pytest.mark.cuda
def test_cuda_compile_fullgraph() -> None:
    """torch.compile(fullgraph=True) traces both triton_ops (no graph break), fwd and bwd."""
    torch._dynamo.reset()
    case = CASES[0]
    qkv, params = _make(case, torch.bfloat16, torch.float32, device="cuda")
    grad_outs = [torch.randn_like(o) for o in _fused(qkv, params, case)]
    compiled = torch.compile(_fused, fullgraph=True)
    outs, grads = _run(compiled, qkv, params, case, grad_outs)
    ref, ref_grads = _run(_fused, qkv, params, case, grad_outs)
    # Same kernels; the autotuner may pick other tiles under compile (another summation order
    # of the weight partials), so compare with the tolerance, not bitwise.
    for name, a, b in zip(("q", "k", "v", "qkv", *PARAM_NAMES), [*outs, *grads], [*ref, *ref_grads]):
        assert_close(a, b, dtype=torch.bfloat16, kind="fwd" if len(name) == 1 else "grad",
                     name=f"compiled {name}")


@pytest.mark.cuda
@pytest.mark.parametrize("index", [1, 3], ids=lambda i: f"block{i}")
def test_cuda_mvit_s_block(index: int) -> None:
    """A whole MViTv2-S block (norms, fused pooling, fused attention, skip, MLP) under bf16
    autocast against the eager block in float64: block 1 (q stride, 2 heads, 6273 x 1569 tokens)
    and block 3 (1569 x 1569, 4 heads), batch 1."""
    cfg = mvit_fast.get_config("s")
    spec = mvit_fast.block_specs(cfg)[index]
    kwargs = dict(kernel=spec.kernel, stride_q=spec.stride_q, stride_kv=spec.stride_kv,
                  norm_eps=cfg.norm_eps)
    torch.manual_seed(0)
    fused = MultiScaleBlock(spec.dim_in, spec.dim_out, spec.num_heads, spec.table_grid, **kwargs,
                            backend="triton").cuda()
    with torch.no_grad():
        for name, p in fused.named_parameters():
            if "norm" in name or "rel_pos" in name:
                p.add_(0.1 * torch.randn_like(p))
    eager = MultiScaleBlock(spec.dim_in, spec.dim_out, spec.num_heads, spec.table_grid, **kwargs,
                            backend="eager").cuda().double()
    eager.load_state_dict({k: v.double() for k, v in fused.state_dict().items()})
    t, h, w = spec.input_grid
    x = torch.randn(1, 1 + t * h * w, spec.dim_in, device="cuda")
    _check_block_under_autocast(fused, eager, x, [t, h, w], torch.bfloat16)


def test_mvit_s_block_under_fp16_autocast() -> None:
    """The whole-block check of the CUDA test above, on the CPU: block 3 of MViTv2-S at 4x64
    (8x8 grid, 4 heads), fused pooling and attention under the interpreter, fp16 autocast."""
    cfg = mvit_fast.get_config("s", num_frames=4, crop_size=64)
    spec = mvit_fast.block_specs(cfg)[3]
    kwargs = dict(kernel=spec.kernel, stride_q=spec.stride_q, stride_kv=spec.stride_kv,
                  norm_eps=cfg.norm_eps)
    torch.manual_seed(0)
    fused = MultiScaleBlock(spec.dim_in, spec.dim_out, spec.num_heads, spec.table_grid, **kwargs,
                            backend="triton", pool_backend="triton")
    with torch.no_grad():
        for name, p in fused.named_parameters():
            if "norm" in name or "rel_pos" in name:
                p.add_(0.1 * torch.randn_like(p))
    eager = MultiScaleBlock(spec.dim_in, spec.dim_out, spec.num_heads, spec.table_grid, **kwargs,
                            backend="eager").double()
    eager.load_state_dict({k: v.double() for k, v in fused.state_dict().items()})
    t, h, w = spec.input_grid
    _check_block_under_autocast(fused, eager, torch.randn(1, 1 + t * h * w, spec.dim_in), [t, h, w],
                                torch.float16)


def _check_block_under_autocast(fused: nn.Module, eager64: nn.Module, x: torch.Tensor, thw,
                                dtype: torch.dtype) -> None:
    """A block with the fused kernels under autocast(dtype) against the float64 eager block:
    the output elementwise (tests/numerics.py's tolerance), x's and every parameter's gradient
    no further off in relative norm than the plain eager block under the same autocast
    (`assert_no_worse`: weight gradients sum autocast's rounding over thousands of tokens)."""
    plain = copy.deepcopy(fused)
    plain.attn.backend, plain.attn.pool_backend = "eager", "eager"
    results = []
    for module, dt, amp in ((fused, torch.float32, True), (plain, torch.float32, True),
                            (eager64, torch.float64, False)):
        xi = x.detach().to(dt).requires_grad_(True)
        with torch.autocast(x.device.type, dtype, enabled=amp):
            out, out_thw = module(xi, thw)
        grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out)
        params = [p for _, p in sorted(module.named_parameters())]
        results.append((out, out_thw, torch.autograd.grad(out, [xi, *params], grad_out)))
    (out, thw_f, grads), (_, _, plain_grads), (ref, thw_e, ref_grads) = results
    assert thw_f == thw_e
    assert_close(out, ref, dtype=dtype, kind="fwd", name="block output")
    names = ["x"] + sorted(n for n, _ in fused.named_parameters())
    for name, g, b, r in zip(names, grads, plain_grads, ref_grads):
        assert_no_worse(g, b, r, dtype=dtype, name=f"d{name}")
