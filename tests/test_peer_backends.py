"""Peer backends (sdpa, flex, sdpa_aug) against the float64 `eager_attention` oracle.

Outputs and every gradient (q, k, v, each raw rel-pos table) where the backend has
a backward on the device: flex has none on the CPU, so its gradients run on CUDA.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from mvit_fast.attention import BACKENDS, eager_attention, peers, pooled_attention
from mvit_fast.attention.peers import flex_rel_pos_attention, sdpa_attention, sdpa_aug_attention
from mvit_fast.config import block_specs, get_config
from tests.numerics import assert_close, assert_no_worse

PEERS = {"sdpa": sdpa_attention, "sdpa_aug": sdpa_aug_attention, "flex": flex_rel_pos_attention}
CPU_BACKWARD = ("sdpa", "sdpa_aug")  # flex's backward raises NotImplementedError on CPU
# float64 flex runs flex's unfused path on purpose (no inductor kernel for it), which warns
pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")


@dataclass(frozen=True)
class Case:
    q_thw: tuple[int, int, int]
    k_thw: tuple[int, int, int]
    head_dim: int = 96
    heads: int = 2
    has_cls: bool = True
    residual: bool = True
    tables: str = "thw"  # which of rel_pos_t/h/w exist
    table_len: tuple[int, int, int] | None = None  # None: 2*max(q, k)-1 (no interpolation)


CASES = {
    "pool2x": Case((2, 4, 4), (2, 2, 2)),  # Nq > Nk, integer ratio (blocks 4-13)
    "keys_finer": Case((2, 2, 2), (2, 4, 4), heads=3),  # Nk > Nq (block 14)
    "no_cls_no_residual": Case((2, 4, 4), (2, 2, 2), has_cls=False, residual=False),
    "cls_no_residual": Case((2, 3, 3), (2, 3, 3), residual=False),
    "t_only": Case((3, 2, 2), (2, 2, 2), tables="t"),
    "hw_only": Case((2, 4, 4), (2, 2, 2), tables="hw"),
    "no_tables": Case((2, 4, 4), (2, 2, 2), tables=""),
    "ratio_1.75_d72": Case((2, 7, 7), (2, 4, 4), head_dim=72),  # non-integer ratio (L at 312)
    "interpolated": Case((2, 5, 5), (2, 3, 3), table_len=(3, 7, 7)),  # needs 3, 9, 9
}


def make_inputs(case: Case, batch: int = 2, seed: int = 0) -> dict:
    """float64 q, k, v and raw tables; std 0.2 tables so the bias moves the softmax."""
    gen = torch.Generator().manual_seed(seed)
    randn = lambda *shape, std=1.0: torch.randn(*shape, generator=gen, dtype=torch.float64) * std
    nq = case.has_cls + case.q_thw[0] * case.q_thw[1] * case.q_thw[2]
    nk = case.has_cls + case.k_thw[0] * case.k_thw[1] * case.k_thw[2]
    lengths = case.table_len or tuple(2 * max(a, b) - 1 for a, b in zip(case.q_thw, case.k_thw))
    tables = {axis: randn(length, case.head_dim, std=0.2) if axis in case.tables else None
              for axis, length in zip("thw", lengths)}
    return dict(q=randn(batch, case.heads, nq, case.head_dim), k=randn(batch, case.heads, nk, case.head_dim),
                v=randn(batch, case.heads, nk, case.head_dim), **tables)


def run(fn, case: Case, inputs: dict, dtype: torch.dtype, device: str = "cpu", grad: bool = True):
    """(output, {name: gradient}) of fn on inputs cast to dtype; grads of sum(out * cotangent)."""
    x = {n: t.to(device, dtype, copy=True).requires_grad_(grad) if t is not None else None
         for n, t in inputs.items()}
    out = fn(x["q"], x["k"], x["v"], case.q_thw, case.k_thw, x["t"], x["h"], x["w"], case.has_cls,
             case.residual, case.head_dim ** -0.5)
    if not grad:
        return out, {}
    wrt = {n: t for n, t in x.items() if t is not None}
    cotangent = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    grads = torch.autograd.grad(out, list(wrt.values()), cotangent.to(device, dtype))
    return out, dict(zip(wrt, grads))


def check(backend: str, case: Case, dtype: torch.dtype, device: str = "cpu", grad: bool = True,
          batch: int = 2, as_eager: bool = False) -> None:
    """The backend in `dtype` against the float64 oracle: elementwise within the dtype's
    tolerance, or with `as_eager` no further off in relative norm than `eager_attention` in
    the same dtype (`assert_no_worse`), for the peers that round the bias or its gradient to
    the input dtype by design (SDPA's additive mask, sdpa_aug's extra q columns, flex's
    captured tables): at the MViTv2 block sizes that rounding alone is 1.1-2.7x the
    elementwise bf16 tolerance."""
    # the oracle sees the same values: rounded to dtype once, then exact in float64
    inputs = {n: t.to(dtype).double() if t is not None else None
              for n, t in make_inputs(case, batch).items()}
    out, grads = run(PEERS[backend], case, inputs, dtype, device, grad)
    ref, ref_grads = run(eager_attention, case, inputs, torch.float64, device, grad)
    assert out.dtype == dtype
    if as_eager:
        plain, plain_grads = run(eager_attention, case, inputs, dtype, device, grad)
        assert_no_worse(out, plain, ref, dtype=dtype, name=f"{backend} out")
        for name, g in grads.items():
            assert_no_worse(g, plain_grads[name], ref_grads[name], dtype=dtype, name=f"{backend} d{name}")
        return
    assert_close(out, ref, dtype=dtype, name=f"{backend} out")
    for name, g in grads.items():
        kind = "table_grad" if name in ("t", "h", "w") else "grad"
        assert_close(g, ref_grads[name], dtype=dtype, kind=kind, name=f"{backend} d{name}")


@pytest.mark.parametrize("case", CASES, ids=str)
@pytest.mark.parametrize("backend", ["sdpa", "sdpa_aug", "flex"])
def test_float64_matches_oracle(backend, case):
    check(backend, CASES[case], torch.float64, grad=backend in CPU_BACKWARD)


@pytest.mark.parametrize("case", ["pool2x", "no_cls_no_residual", "ratio_1.75_d72", "interpolated"])
@pytest.mark.parametrize("backend", ["sdpa", "sdpa_aug"])
def test_float32_matches_oracle(backend, case):
    check(backend, CASES[case], torch.float32)


# Compiled CPU flex costs seconds per shape: the cases that differ in its score_mod.
@pytest.mark.parametrize("case", ["pool2x", "no_cls_no_residual", "hw_only"])
def test_flex_compiled_float32_forward(case):
    check("flex", CASES[case], torch.float32, grad=False)


def test_flex_pads_head_dim_where_torch_needs_it(monkeypatch):
    """torch 2.6 flex takes only power-of-two head dims: the zero-padded path is exact too."""
    monkeypatch.setattr(peers, "_FLEX_POW2_HEAD_DIM_ONLY", True)
    check("flex", CASES["ratio_1.75_d72"], torch.float64, grad=False)


def test_sdpa_aug_exact_in_float64():
    """Folding the bias into the head dim is the same math: equal to ~1e-12, not just close."""
    case = CASES["pool2x"]
    inputs = make_inputs(case)
    out, _ = run(sdpa_aug_attention, case, inputs, torch.float64, grad=False)
    ref, _ = run(eager_attention, case, inputs, torch.float64, grad=False)
    assert (out - ref).abs().max().item() < 1e-12


@pytest.mark.parametrize("backend", ["sdpa", "flex", "sdpa_aug"])
def test_registered_in_pooled_attention(backend):
    case = CASES["pool2x"]
    x = make_inputs(case)
    out = pooled_attention(x["q"], x["k"], x["v"], case.q_thw, case.k_thw, x["t"], x["h"], x["w"],
                           backend=backend)
    ref = eager_attention(x["q"], x["k"], x["v"], case.q_thw, case.k_thw, x["t"], x["h"], x["w"],
                          True, True, case.head_dim ** -0.5)
    assert BACKENDS[backend] is PEERS[backend]
    assert_close(out, ref, dtype=torch.float64)


# --- CUDA: flex gradients, and bf16 at real MViTv2-S block shapes ---------------------------

# float64 runs flex's unfused path (cheap); float32 compiles flex's kernels: a few cases.
FLEX_GRAD_CASES = ([(c, torch.float64) for c in CASES]
                   + [(c, torch.float32) for c in ("pool2x", "no_cls_no_residual", "ratio_1.75_d72")])


@pytest.mark.cuda
@pytest.mark.parametrize(("case", "dtype"), FLEX_GRAD_CASES, ids=str)
def test_flex_gradients_cuda(case, dtype):
    check("flex", CASES[case], dtype, device="cuda")


def s_block_case(index: int) -> Case:
    spec = block_specs(get_config("s"))[index]
    return Case(spec.q_grid, spec.kv_grid, head_dim=spec.head_dim, heads=spec.num_heads,
                table_len=(spec.rel_pos_t_len, spec.rel_pos_hw_len, spec.rel_pos_hw_len))


@pytest.mark.cuda
@pytest.mark.parametrize("block", [1, 4, 14])  # 6273 x 1569, 1569 x 393, 393 x 1569
@pytest.mark.parametrize("backend", ["sdpa", "sdpa_aug", "flex"])
def test_bf16_mvit_s_block_cuda(backend, block):
    check(backend, s_block_case(block), torch.bfloat16, device="cuda", batch=2, as_eager=True)


@pytest.mark.parametrize("backend", CPU_BACKWARD)
def test_bf16_block_no_worse_than_eager(backend):
    """The bf16 check of the real block shapes (above, on CUDA) at a small block on the CPU."""
    check(backend, CASES["ratio_1.75_d72"], torch.bfloat16, batch=2, as_eager=True)


def test_flex_score_mod_indexes_each_table_once(monkeypatch):
    """Inductor's flex backward (torch 2.11, CUDA) rejects a score_mod that indexes one tensor
    needing gradients more than once (NotImplementedError: every flex backward failed while
    the tables rode in one tensor). Counts the score_mod's indexing per captured tensor."""
    import mvit_fast.attention.peers as peers

    captured = {}

    def fake_flex(q, k, v, score_mod, scale):
        captured["score_mod"] = score_mod
        return torch.zeros_like(q)

    monkeypatch.setattr(peers, "_flex_for", lambda dtype: fake_flex)
    case = CASES["pool2x"]
    x = {n: t.float().requires_grad_() for n, t in make_inputs(case).items()}
    flex_rel_pos_attention(x["q"], x["k"], x["v"], case.q_thw, case.k_thw, x["t"], x["h"], x["w"],
                           case.has_cls, case.residual, case.head_dim ** -0.5)

    counts: dict[int, int] = {}

    class CountIndexing(torch.overrides.TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            if func is torch.Tensor.__getitem__ and args[0].requires_grad:  # a table
                counts[id(args[0])] = counts.get(id(args[0]), 0) + 1
            return func(*args, **(kwargs or {}))

    idx = lambda i: torch.tensor(i)
    with CountIndexing():
        captured["score_mod"](torch.tensor(0.0), idx(0), idx(1), idx(2), idx(3))
    assert sorted(counts.values()) == [1, 1, 1], counts  # three tables, each indexed once
