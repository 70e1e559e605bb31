"""Decomposed relative positions: index formula, interpolation, and the eager op
against an independent loop implementation in float64."""

import math

import numpy as np
import pytest
import torch

from mvit_fast.attention import pooled_attention, rel_pos_index, resize_rel_pos
from tests.numerics import assert_close


def test_rel_pos_index_equal_sizes():
    # dist = i - j + (k - 1)
    assert rel_pos_index(3, 3).tolist() == [[2, 1, 0], [3, 2, 1], [4, 3, 2]]


def test_rel_pos_index_integer_ratio():
    # 4 queries over 2 keys: keys are stretched by 2: dist = i - 2j + 2
    assert rel_pos_index(4, 2).tolist() == [[2, 0], [3, 1], [4, 2], [5, 3]]
    # 2 queries over 4 keys: queries stretched by 2: dist = 2i - j + 3
    assert rel_pos_index(2, 4).tolist() == [[3, 2, 1, 0], [5, 4, 3, 2]]


def test_rel_pos_index_non_integer_ratio():
    # 5 queries over 3 keys: dist = i + (2 - j) * 5/3, truncated
    # j=0: i + 3.33 -> 3..7; j=1: i + 1.67 -> 1..5; j=2: i -> 0..4
    assert rel_pos_index(5, 3).tolist() == [[3, 1, 0], [4, 2, 1], [5, 3, 2], [6, 4, 3], [7, 5, 4]]


def test_rel_pos_index_l_at_312_is_float32_truncation():
    # MViTv2-L block 0: 78 queries over 10 keys, ratio 7.8. The official code computes in
    # float32 and truncates, so e.g. 3 - 4 * 7.8 + 9 * 7.8 lands just below or above 42;
    # an emulation of that op order in numpy float32 is the reference here.
    i = np.arange(78, dtype=np.float32)[:, None] * np.float32(1.0)
    j = np.arange(10, dtype=np.float32)[None, :] * np.float32(7.8)
    expected = ((i - j) + np.float32(9 * 7.8)).astype(np.int64)
    idx = rel_pos_index(78, 10)
    assert idx.tolist() == expected.tolist()
    assert idx.min() >= 0 and idx.max() <= 2 * 78 - 2


def _interp_linear(table: np.ndarray, length: int) -> np.ndarray:
    """Linear resize with half-pixel centers (align_corners=False), written out."""
    n = table.shape[0]
    out = np.empty((length, table.shape[1]))
    for r in range(length):
        src = min(max((r + 0.5) * n / length - 0.5, 0.0), n - 1)
        lo = int(math.floor(src))
        hi = min(lo + 1, n - 1)
        out[r] = table[lo] * (1 - (src - lo)) + table[hi] * (src - lo)
    return out


def test_resize_rel_pos_is_linear_interpolation():
    table = torch.randn(37, 5, dtype=torch.float64)
    assert resize_rel_pos(table, 37) is table
    got = resize_rel_pos(table, 39).numpy()
    np.testing.assert_allclose(got, _interp_linear(table.numpy(), 39), rtol=1e-12, atol=1e-12)


def _loop_attention(q, k, v, q_thw, k_thw, rt, rh, rw, has_cls, residual, scale):
    """Independent oracle: every score written out as a sum over its terms, in Python."""
    B, H, Nq, d = q.shape
    Nk = k.shape[2]
    s0 = int(has_cls)
    qt, qh, qw = q_thw
    kt, kh, kw = k_thw

    def coords(n, thw):
        t, rest = divmod(n, thw[1] * thw[2])
        return (t, *divmod(rest, thw[2]))

    def dist(qi, kj, nq, nk):
        qr, kr = max(nk / nq, 1.0), max(nq / nk, 1.0)
        return int(qi * qr - kj * kr + (nk - 1) * kr)

    tables = []
    for table, nq, nk in ((rt, qt, kt), (rh, qh, kh), (rw, qw, kw)):
        if table is not None:
            table = torch.from_numpy(_interp_linear(table.numpy(), 2 * max(nq, nk) - 1))
        tables.append(table)
    out = torch.zeros(B, H, Nq, d, dtype=torch.float64)
    for b in range(B):
        for h in range(H):
            for i in range(Nq):
                scores = []
                for j in range(Nk):
                    s = scale * float(q[b, h, i] @ k[b, h, j])
                    if i >= s0 and j >= s0:
                        ci, cj = coords(i - s0, q_thw), coords(j - s0, k_thw)
                        for axis, table in enumerate(tables):
                            if table is not None:
                                r = dist(ci[axis], cj[axis], q_thw[axis], k_thw[axis])
                                s += float(q[b, h, i] @ table[r])
                    scores.append(s)
                m = max(scores)
                p = [math.exp(s - m) for s in scores]
                z = sum(p)
                for j in range(Nk):
                    out[b, h, i] += p[j] / z * v[b, h, j]
                if residual and i >= s0:
                    out[b, h, i] += q[b, h, i]
    return out


@pytest.mark.parametrize("q_thw, k_thw, has_cls, residual, tables, table_len", [
    ((2, 3, 3), (2, 3, 3), True, True, "thw", None),
    ((1, 5, 5), (1, 3, 3), True, True, "thw", None),  # non-integer ratio 5/3
    ((2, 4, 4), (2, 2, 2), False, True, "hw", None),
    ((2, 2, 2), (2, 4, 4), True, False, "t", None),  # more keys than queries
    ((3, 3, 3), (3, 2, 2), True, True, "thw", 3),  # tables interpolated from length 3
    ((1, 2, 2), (1, 1, 1), True, True, "", None),  # a single non-cls key, no bias
])
def test_eager_matches_loop_oracle(q_thw, k_thw, has_cls, residual, tables, table_len):
    torch.manual_seed(0)
    B, H, d = 2, 2, 4
    nq = int(has_cls) + math.prod(q_thw)
    nk = int(has_cls) + math.prod(k_thw)
    q, k, v = (torch.randn(B, H, n, d, dtype=torch.float64) for n in (nq, nk, nk))

    def table(axis):
        n = table_len or 2 * max(q_thw[axis], k_thw[axis]) - 1
        return torch.randn(n, d, dtype=torch.float64) if "thw"[axis] in tables else None

    rt, rh, rw = table(0), table(1), table(2)
    got = pooled_attention(q, k, v, q_thw, k_thw, rt, rh, rw, has_cls=has_cls,
                           residual_pooling=residual, backend="eager")
    want = _loop_attention(q, k, v, q_thw, k_thw, rt, rh, rw, has_cls, residual, d ** -0.5)
    assert_close(got, want, dtype=torch.float64, name="eager output")


def _inputs(nq=10, nk=5, d=4):
    q = torch.randn(1, 2, nq, d)
    k = torch.randn(1, 2, nk, d)
    return q, k, k.clone()


@pytest.mark.parametrize("mutate, error, match", [
    (lambda q, k, v: (q[0], k, v), ValueError, "4-D"),
    (lambda q, k, v: (q.int(), k, v), TypeError, "floating"),
    (lambda q, k, v: (q, k.double(), v), TypeError, "share a dtype"),
    (lambda q, k, v: (q, k[..., :3], v[..., :3]), ValueError, "expected q"),
    (lambda q, k, v: (q[:, :, :9], k, v), ValueError, "q_thw"),
])
def test_pooled_attention_rejects_bad_inputs(mutate, error, match):
    q, k, v = mutate(*_inputs())
    with pytest.raises(error, match=match):
        pooled_attention(q, k, v, (1, 3, 3), (1, 2, 2), backend="eager")


def test_pooled_attention_rejects_bad_tables_and_backend():
    q, k, v = _inputs()
    with pytest.raises(ValueError, match="rel_pos_h"):
        pooled_attention(q, k, v, (1, 3, 3), (1, 2, 2), rel_pos_h=torch.randn(5, 3), backend="eager")
    with pytest.raises(TypeError, match="rel_pos_w must be a tensor or None, got list"):
        pooled_attention(q, k, v, (1, 3, 3), (1, 2, 2), rel_pos_w=[[0.0] * 4], backend="eager")
    with pytest.raises(ValueError, match="unknown attention backend"):
        pooled_attention(q, k, v, (1, 3, 3), (1, 2, 2), backend="cuda-magic")
    q11 = torch.randn(1, 2, 11, 4)  # 1 + 2.5 * 2 * 2 tokens
    with pytest.raises(ValueError, match=r"q_thw must be three positive sizes \(T, H, W\), got \(2.5, 2"):
        pooled_attention(q11, k, v, (2.5, 2, 2), (1, 2, 2), backend="eager")
    with pytest.raises(ValueError, match="head_dim must be >= 1"):
        pooled_attention(q[..., :0], k[..., :0], v[..., :0], (1, 3, 3), (1, 2, 2), backend="eager")


@pytest.mark.parametrize("options, error, match", [
    ({"has_cls": "yes"}, TypeError, "has_cls must be a bool, got 'yes'"),
    ({"has_cls": 1}, TypeError, "has_cls must be a bool"),
    ({"residual_pooling": "false"}, TypeError, "residual_pooling must be a bool"),
    ({"scale": 0.0}, ValueError, "scale must be a positive finite number"),
    ({"scale": float("nan")}, ValueError, "scale must be"),
    ({"scale": "0.5"}, ValueError, "scale must be"),
])
def test_pooled_attention_rejects_bad_options(options, error, match):
    q, k, v = _inputs()
    with pytest.raises(error, match=match):
        pooled_attention(q, k, v, (1, 3, 3), (1, 2, 2), backend="eager", **options)


def test_pooled_attention_accepts_numpy_and_int_scales():
    q, k, v = _inputs()
    def attend(scale):
        return pooled_attention(q, k, v, (1, 3, 3), (1, 2, 2), scale=scale, backend="eager")

    for scale, same_as in ((np.float32(0.5), 0.5), (np.float64(0.5), 0.5), (1, 1.0)):
        assert torch.equal(attend(scale), attend(same_as))
