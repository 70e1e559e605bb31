"""backend="auto": measured choices on the CPU, remembered in memory and on disk, compile-safe."""

from __future__ import annotations

import json
import os
import warnings

import pytest
import torch

import mvit_fast
import mvit_fast.attention.module as attention_module
from mvit_fast.attention import BACKENDS, MultiScaleAttention, autotune, eager_attention, pooled_attention
from mvit_fast.attention.fused_pool import fused_pool_qkv
from tests.numerics import assert_close

Q_THW, K_THW = (2, 4, 4), (2, 2, 2)
CPU_MEASURED = {"eager", "sdpa", "sdpa_aug"}


@pytest.fixture(autouse=True)
def fresh_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MVIT_FAST_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("MVIT_FAST_AUTOTUNE", "1")
    autotune.clear()
    yield tmp_path / autotune.CACHE_FILE
    autotune.clear()


@pytest.fixture
def timings(monkeypatch):
    """Every call of the timing function (one per measured backend); the real timing still runs."""
    calls = []
    real = autotune._time_ms

    def counting(step, device):
        calls.append(device)
        return real(step, device)

    monkeypatch.setattr(autotune, "_time_ms", counting)
    return calls


def inputs(batch=2, heads=2, dim=16, grad=True, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    nq, nk = 1 + Q_THW[0] * Q_THW[1] * Q_THW[2], 1 + K_THW[0] * K_THW[1] * K_THW[2]
    shapes = dict(q=(batch, heads, nq, dim), k=(batch, heads, nk, dim), v=(batch, heads, nk, dim),
                  t=(3, dim), h=(7, dim), w=(7, dim))
    return {n: (torch.randn(s, generator=gen, dtype=torch.float64) * (0.2 if len(s) == 2 else 1.0))
            .to(dtype).requires_grad_(grad) for n, s in shapes.items()}


def attend(x, backend="auto"):
    return pooled_attention(x["q"], x["k"], x["v"], Q_THW, K_THW, x["t"], x["h"], x["w"], backend=backend)


@pytest.fixture
def quick(monkeypatch):
    """One timed run per backend: enough where the test is about the plumbing, not the timing."""
    monkeypatch.setattr(autotune, "WARMUP", 0)
    monkeypatch.setattr(autotune, "REPEATS", 1)


TINY = dict(depths=(1, 1, 1, 1), embed_dim=16, num_frames=4, crop_size=32, num_classes=7,
            drop_path_rate=0.0, head_dropout=0.0)


def only_entry():
    (key, entry), = autotune.choices().items()
    return key, entry


def test_picks_the_fastest_measured_backend_and_is_exact(timings):
    x = inputs()
    out = attend(x)
    key, entry = only_entry()
    assert set(entry["times_ms"]) == CPU_MEASURED and len(timings) == 3
    assert all(t > 0 for t in entry["times_ms"].values())
    assert entry["winner"] == min(entry["times_ms"], key=entry["times_ms"].get)
    assert {n for n in BACKENDS if n not in CPU_MEASURED} <= set(entry["excluded"])
    assert key.endswith("|fwd+bwd") and "|float32|B=2|heads=2|Nq=33|Nk=9|d=16|" in key
    oracle = {n: t.detach().double().requires_grad_() for n, t in x.items()}
    want = eager_attention(oracle["q"], oracle["k"], oracle["v"], Q_THW, K_THW, oracle["t"], oracle["h"],
                           oracle["w"], True, True, 16 ** -0.5)
    assert_close(out, want, dtype=torch.float32, name=f"auto ({entry['winner']}) output")
    cotangent = torch.randn(want.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    out.backward(cotangent.float())
    want.backward(cotangent)
    for n in x:
        assert_close(x[n].grad, oracle[n].grad, dtype=torch.float32, kind="grad", name=f"grad of {n}")


def test_a_known_key_is_not_measured_again(timings, quick):
    attend(inputs())
    attend(inputs(seed=1))  # other values, same key
    assert len(timings) == 3 and len(autotune.choices()) == 1
    attend(inputs(batch=3))
    assert len(timings) == 6 and len(autotune.choices()) == 2


def test_grad_and_no_grad_calls_are_different_keys(timings, quick):
    attend(inputs())
    with torch.no_grad():
        attend(inputs())
    attend(inputs(grad=False))  # no input needs a gradient: no backward, the no-grad key
    keys = sorted(autotune.choices())
    assert len(keys) == 2 and len(timings) == 6
    assert keys[0].endswith("|fwd") and keys[1].endswith("|fwd+bwd")
    assert keys[0].removesuffix("|fwd") == keys[1].removesuffix("|fwd+bwd")


def test_choices_persist_atomically_with_versions(fresh_cache, timings, quick, monkeypatch):
    replaced = []
    real_replace = os.replace
    monkeypatch.setattr(autotune.os, "replace", lambda src, dst: (replaced.append((src, dst)),
                                                                  real_replace(src, dst)))
    attend(inputs())
    (src, dst), = replaced
    assert dst == fresh_cache and src != dst and os.path.dirname(src) == str(fresh_cache.parent)
    assert sorted(os.listdir(fresh_cache.parent)) == [fresh_cache.name]  # no temp file left behind
    data = json.loads(fresh_cache.read_text())
    (key, entry), = data["entries"].items()
    assert f"torch={torch.__version__}|" in key and "|triton=" in key
    assert entry["torch"] == torch.__version__ and "triton" in entry and entry["device"] == "cpu"
    assert set(entry["times_ms"]) == CPU_MEASURED

    autotune.clear()  # a new process: the choice comes from the file
    attend(inputs())
    assert len(timings) == 3 and autotune.choices() == data["entries"]
    autotune.clear(persistent=True)
    assert not fresh_cache.exists()


def test_a_corrupt_cache_warns_and_measures_again(fresh_cache, timings, quick):
    fresh_cache.write_text('{"entries": {"key": ')
    with pytest.warns(UserWarning, match="ignoring the attention backend cache"):
        attend(inputs())
    assert len(timings) == 3
    assert len(json.loads(fresh_cache.read_text())["entries"]) == 1  # rewritten, valid


def test_autotune_off_is_the_static_default_without_a_file(fresh_cache, monkeypatch):
    monkeypatch.setenv("MVIT_FAST_AUTOTUNE", "0")
    monkeypatch.setattr(autotune, "_time_ms", lambda *a: pytest.fail("measured with MVIT_FAST_AUTOTUNE=0"))
    x = inputs()
    assert torch.equal(attend(x), attend(x, backend="eager"))  # CPU default: the reference
    assert not fresh_cache.exists() and autotune.choices() == {}


def test_failing_backends_are_excluded_with_the_reason(monkeypatch, quick):
    def unsupported(*args):
        raise NotImplementedError("no kernel for this shape")

    def overflows(*args):
        return eager_attention(*args) * float("inf")

    monkeypatch.setitem(BACKENDS, "sdpa", unsupported)
    monkeypatch.setitem(BACKENDS, "sdpa_aug", overflows)
    attend(inputs())
    _, entry = only_entry()
    assert entry["winner"] == "eager" and set(entry["times_ms"]) == {"eager"}
    assert entry["excluded"]["sdpa"] == "NotImplementedError: no kernel for this shape"
    assert "non-finite" in entry["excluded"]["sdpa_aug"]


def test_no_backend_runs_is_an_error(monkeypatch):
    for name in CPU_MEASURED:
        monkeypatch.setitem(BACKENDS, name, lambda *a: torch.full((1,), float("nan")))
    with pytest.raises(RuntimeError, match="no backend ran"):
        attend(inputs())


def test_compile_uses_the_measured_choice_and_warns_without_one(monkeypatch, quick):
    torch._dynamo.reset()
    used = []
    for name in CPU_MEASURED:
        spy = lambda *a, _impl=BACKENDS[name], _name=name: (used.append(_name), _impl(*a))[1]
        monkeypatch.setitem(BACKENDS, name, spy)
    x = inputs(grad=False)
    compiled = torch.compile(attend, fullgraph=True, backend="eager")
    with pytest.warns(UserWarning, match="without a measurement; it uses 'eager'"):
        compiled(x)
    assert used == ["eager"] and autotune.choices() == {}

    torch._dynamo.reset()
    attend(x)  # measured eagerly
    _, entry = only_entry()
    used.clear()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = torch.compile(attend, fullgraph=True, backend="eager")(x)
    assert used == [entry["winner"]]
    assert_close(out, attend(x, backend="eager"), dtype=torch.float32)


def test_tune_measures_a_model_and_leaves_it_as_it_was(timings, quick):
    torch.manual_seed(0)
    model = mvit_fast.build_model("s", **TINY).eval()
    clip = torch.randn(2, 3, 4, 32, 32)
    rng = torch.get_rng_state()
    found = autotune.tune(model, clip, train=True)
    assert not model.training and torch.equal(torch.get_rng_state(), rng)
    assert all(p.grad is None for p in model.parameters())
    assert found and all(key.endswith("|fwd+bwd") for key in found)
    assert len(timings) == 3 * len(found)

    model.train()
    model.checkpoint_activations = True  # recomputes each block in backward: with the same choices
    model(clip).square().sum().backward()
    assert len(timings) == 3 * len(found)


def test_first_measurement_inside_activation_checkpointing(quick):
    torch.manual_seed(0)
    model = mvit_fast.build_model("s", **TINY, checkpoint_activations=True)
    clip = torch.randn(2, 3, 4, 32, 32)
    model(clip).square().sum().backward()  # measures inside the checkpointed blocks
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model.checkpoint_activations = False
    model(clip).square().sum().backward()
    for g, p in zip(grads, model.parameters()):
        torch.testing.assert_close(p.grad, g, rtol=1e-5, atol=1e-7)


def _pooling_attention(**kw):
    torch.manual_seed(0)
    return MultiScaleAttention(16, 32, (2, 4, 4), num_heads=2, kernel_q=(3, 3, 3), kernel_kv=(3, 3, 3),
                               stride_q=(1, 2, 2), stride_kv=(1, 2, 2), rel_pos_spatial=True,
                               rel_pos_temporal=True, residual_pooling=True, **kw)


def test_pool_choice_measures_both_poolings_with_weight_gradients(timings, quick):
    """Real timings of the plain pooling and the fused kernel (under the Triton interpreter)."""
    module = _pooling_attention()
    pools = (module.pool_q, module.pool_k, module.pool_v)
    norms = (module.norm_q, module.norm_k, module.norm_v)
    qkv = torch.randn(2, 33, 3, 2, 16, requires_grad=True)
    params = [t for m in (*pools, *norms) for t in m.parameters()]
    ran = []
    candidates = {
        name: (lambda qkv, *a, _name=name, _fn=fn: (ran.append(_name), _fn(qkv, *a))[1])
        for name, fn in (("eager", attention_module._pool_projection_eager), ("triton", fused_pool_qkv))}
    args = ((2, 4, 4), True, pools, norms)
    winner = autotune.choose_pool(candidates, qkv, args, params, "geometry")
    key, entry = only_entry()
    assert set(entry["times_ms"]) == {"eager", "triton"} and len(timings) == 2
    assert winner == entry["winner"] == min(entry["times_ms"], key=entry["times_ms"].get)
    assert "|pool|float32|qkv=2x33x3x2x16|geometry|fwd+bwd" in key
    assert qkv.grad is None and all(p.grad is None for p in params)  # measuring accumulates nothing
    assert sorted(set(ran)) == ["eager", "triton"]
    assert autotune.choose_pool(candidates, qkv, args, params, "geometry") == winner
    assert len(timings) == 2  # remembered


def test_auto_pools_with_the_plain_ops_off_cuda(monkeypatch, timings):
    """Under "auto" the fused pooling is measured on CUDA only: on the CPU it would be the interpreter."""
    monkeypatch.setattr(attention_module, "fused_pool_qkv",
                        lambda *a: pytest.fail("fused pooling ran under auto on the CPU"))
    module = _pooling_attention(backend="auto")
    out, thw = module(torch.randn(2, 33, 16), (2, 4, 4))
    assert out.shape == (2, 9, 32) and thw == [2, 2, 2]
    assert all("|attention|" in key for key in autotune.choices())


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_auto_measures_the_pooling_and_matches_eager(quick):
    module = _pooling_attention(backend="auto").cuda()
    eager = _pooling_attention(backend="eager").cuda().double()  # the float64 oracle (no TF32 either)
    x = torch.randn(2, 33, 16, device="cuda", requires_grad=True)
    out, _ = module(x, (2, 4, 4))
    ops = {key.split("|")[3] for key in autotune.choices()}
    assert ops == {"attention", "pool"}
    assert_close(out, eager(x.double(), (2, 4, 4))[0], dtype=torch.float32, name="auto module output")


def test_auto_never_offers_triton_inputs_its_kernels_refuse(monkeypatch):
    """float64 (under autocast too), head_dim > 256, a rel-pos key axis > 256: `auto` chooses among
    the other backends, so even its untimed default (MVIT_FAST_AUTOTUNE=0, compile) cannot be triton."""
    offered = []
    monkeypatch.setattr(autotune, "choose", lambda backends, args: offered.append(set(backends)) or "eager")

    def offers_triton(q, k_thw=(1, 2, 2), rel_w=None):
        k = torch.randn(*q.shape[:2], 1 + k_thw[0] * k_thw[1] * k_thw[2], q.shape[-1], dtype=q.dtype)
        pooled_attention(q, k, k, (1, 2, 2), k_thw, rel_pos_w=rel_w, backend="auto")
        return "triton" in offered[-1]

    assert offers_triton(torch.randn(1, 1, 5, 8))
    assert not offers_triton(torch.randn(1, 1, 5, 8, dtype=torch.float64))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert offers_triton(torch.randn(1, 1, 5, 8))
        assert not offers_triton(torch.randn(1, 1, 5, 8, dtype=torch.float64))
        q = torch.randn(1, 1, 5, 8, dtype=torch.float64)  # asked for by name: refused, as without autocast
        with pytest.raises(TypeError, match="float32/float16/bfloat16, got torch.float64"):
            pooled_attention(q, q[:, :, :5], q[:, :, :5], (1, 2, 2), (1, 2, 2), backend="triton")
    monkeypatch.setattr(mvit_fast.attention.fused, "MAX_HEAD_DIM", 8)  # the limits, made small
    monkeypatch.setattr(mvit_fast.attention.fused, "MAX_GRID_AXIS", 2)
    assert offers_triton(torch.randn(1, 1, 5, 8))
    assert not offers_triton(torch.randn(1, 1, 5, 16))
    assert offers_triton(torch.randn(1, 1, 5, 8), k_thw=(1, 1, 3))  # the long axis has no table
    assert not offers_triton(torch.randn(1, 1, 5, 8), k_thw=(1, 1, 3), rel_w=torch.randn(5, 8))
