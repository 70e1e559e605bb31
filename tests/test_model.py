"""The model: against torchvision's and mmaction2's MViTv2, init, drop path, checkpointing, compile."""

import sys

import pytest
import torch

import mvit_fast
from mvit_fast import MultiScaleAttention, load_checkpoint
from mvit_fast.attention import attention_pool
from mvit_fast.checkpoint import export_state_dict
from tests.home import mmaction2_mvit, torchvision_mvit_v2_s

# Every stage and dim change of MViTv2 at a width that builds fast; stem grid 2x8x8.
TINY = dict(depths=(1, 2, 1, 1), embed_dim=16, num_frames=4, crop_size=32, num_classes=7)


def test_logits_match_torchvision_mvit_v2_s():
    mvit_v2_s = torchvision_mvit_v2_s()
    if mvit_v2_s is None:
        pytest.skip("torchvision is not installed (the home implementation of mvit_v2_s)")
    torch.manual_seed(0)
    home = mvit_v2_s().eval()
    with torch.no_grad():
        for p in home.parameters():
            p.add_(torch.randn_like(p) * 0.02)  # biases and LN params away from their init
    ours = mvit_fast.build_model("s").eval()
    report = load_checkpoint(ours, home.state_dict())
    assert report.format == "torchvision" and not (report.missing or report.unexpected)
    clip = torch.randn(1, 3, 16, 224, 224)
    with torch.no_grad():
        diff = (ours(clip) - home(clip)).abs().max().item()
    assert diff < 1e-4, f"max |logit difference| {diff:.3g}"


# S at its checkpoints' clip size; B and L at a small clip (both sides size their tables for it).
@pytest.mark.parametrize("size, arch, frames, crop", [("s", "small", 16, 224), ("b", "base", 8, 64),
                                                      ("l", "large", 8, 64)])
def test_logits_match_mmaction2_mvit(size, arch, frames, crop):
    home_classes = mmaction2_mvit()
    if home_classes is None:
        pytest.skip("mmaction2 is not installed (the home implementation of its MViT checkpoints)")
    backbone_cls, head_cls = home_classes
    torch.manual_seed(0)
    backbone = backbone_cls(arch=arch, temporal_size=frames, spatial_size=crop).eval()
    head = head_cls(num_classes=400, in_channels=backbone.blocks[-1].out_dims).eval()
    with torch.no_grad():
        for p in [*backbone.parameters(), *head.parameters()]:
            p.add_(torch.randn_like(p) * 0.02)
    state = {f"backbone.{k}": v for k, v in backbone.state_dict().items()}
    state |= {f"cls_head.{k}": v for k, v in head.state_dict().items()}
    ours = mvit_fast.build_model(size, num_frames=frames, crop_size=crop).eval()
    report = load_checkpoint(ours, {"state_dict": state})
    assert report.format == "mmaction2" and not report.missing and not report.interpolated
    clip = torch.randn(1, 3, frames, crop, crop)
    with torch.no_grad():
        expected = head(backbone(clip))
        diff = (ours(clip) - expected).abs().max().item()
    assert diff < 1e-4, f"max |logit difference| {diff:.3g} (logits up to {expected.abs().max():.3g})"
    exported = export_state_dict(ours.state_dict(), "mmaction2")  # and back: the same tensors
    assert exported.keys() == state.keys() and all(torch.equal(exported[k], state[k]) for k in state)


def test_multiscale_attention_from_mmaction2_module():
    home_classes = mmaction2_mvit()
    if home_classes is None:
        pytest.skip("mmaction2 is not installed")
    attn_cls = sys.modules[home_classes[0].__module__].MultiScaleAttention
    torch.manual_seed(0)
    # Block 1 of MViTv2-S at a 4x8x8 grid: q pooled 2x2, kv 4x4 in space, 2 heads, dim 96 -> 192.
    home = attn_cls(96, 192, num_heads=2, stride_q=(1, 2, 2), stride_kv=(1, 4, 4),
                    input_size=(4, 8, 8)).eval()
    with torch.no_grad():
        for p in home.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    ours = MultiScaleAttention.from_module(home, backend="eager")
    x = torch.randn(2, 1 + 4 * 8 * 8, 96)
    with torch.no_grad():
        expected, expected_shape = home(x, (4, 8, 8))
        out, q_shape = ours(x, [4, 8, 8])
    assert list(q_shape) == list(expected_shape) == [4, 4, 4]
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape", [(2, 1 + 4 * 6 * 6, 8), (2, 3, 1 + 4 * 6 * 6, 8)], ids=["3d", "4d"])
@pytest.mark.parametrize("has_cls", [True, False])
def test_attention_pool_matches_mmaction2(shape, has_cls):
    home_classes = mmaction2_mvit()
    if home_classes is None:
        pytest.skip("mmaction2 is not installed")
    home_pool = sys.modules[home_classes[0].__module__].attention_pool
    torch.manual_seed(0)
    shape = shape[:-2] + (shape[-2] - (not has_cls), shape[-1])
    x = torch.randn(shape, dtype=torch.float64)
    pool = torch.nn.Conv3d(8, 8, 3, (1, 2, 2), 1, groups=8, bias=False).double()
    norm = torch.nn.LayerNorm(8).double()
    expected, expected_thw = home_pool(x, pool, (4, 6, 6), with_cls_token=has_cls, norm=norm)
    out, thw = attention_pool(x, pool, [4, 6, 6], has_cls, norm)
    assert out.shape == expected.shape and list(thw) == list(expected_thw) == [4, 3, 3]
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-12)
    skip, thw = attention_pool(x, torch.nn.MaxPool3d(3, (1, 2, 2), 1), [4, 6, 6], has_cls)
    assert skip.shape == expected.shape and thw == [4, 3, 3]


class _RecordStrides(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen = (x.shape, x.stride())
        return x


@pytest.mark.parametrize("thw", [(1, 1, 1), (2, 1, 1), (1, 3, 2)], ids=str)
def test_attention_pool_hands_the_pool_dense_strides(thw):
    """Dense strides on every axis, size-1 ones included: torch's CUDA depthwise Conv3d walks
    its window with the dense strides, so on a 1x1x1 grid the permuted view (which passes
    is_contiguous() with strides of d on T, H, W) pooled another channel's value."""
    batch, heads, dim = 2, 2, 16
    tokens = 1 + thw[0] * thw[1] * thw[2]
    # q of a fused qkv projection (B, N, 3, heads, d), as MultiScaleAttention slices it
    q = torch.randn(batch, tokens, 3, heads, dim).permute(2, 0, 3, 1, 4)[0]
    pool = _RecordStrides()
    attention_pool(q, pool, thw, True)
    shape, strides = pool.seen
    assert shape == (batch * heads, dim, *thw)
    assert strides == torch.empty(shape).stride()


@pytest.mark.cuda
def test_attention_pool_cuda_one_token_grid():
    """The depthwise pooling of a 1x1x1 grid on CUDA against the same ops on the CPU (float64)."""
    conv = torch.nn.Conv3d(16, 16, 3, (1, 2, 2), 1, groups=16, bias=False).double()
    q = torch.randn(1, 2, 3, 2, 16, dtype=torch.float64).permute(2, 0, 3, 1, 4)[0]
    want, _ = attention_pool(q, conv, (1, 1, 1), True)
    got, _ = attention_pool(q.cuda(), conv.cuda(), (1, 1, 1), True)
    torch.testing.assert_close(got.cpu(), want, rtol=0, atol=1e-12)


def test_attention_pool_rejects_tokens_that_do_not_fit():
    pool = torch.nn.MaxPool3d(3, (1, 2, 2), 1)
    with pytest.raises(ValueError, match="do not fit the grid"):
        attention_pool(torch.randn(2, 4 * 6 * 6, 8), pool, [4, 6, 6], True)
    with pytest.raises(ValueError, match="got shape"):
        attention_pool(torch.randn(1 + 4 * 6 * 6, 8), pool, [4, 6, 6], True)


def test_reset_parameters_initializes_every_tensor():
    """A model materialized with to_empty holds garbage until reset_parameters: every
    parameter must be reinitialized, conv biases included (PyTorch's default, as SlowFast)."""
    torch.manual_seed(0)
    with torch.device("meta"):
        model = mvit_fast.build_model("s", **TINY)
    model.to_empty(device="cpu")
    for p in model.parameters():
        p.data.fill_(float("nan"))
    model.reset_parameters()
    assert not any(p.isnan().any() for p in model.parameters())
    bias, fan_in = model.patch_embed.proj.bias, model.patch_embed.proj.weight[0].numel()
    assert bias.abs().max() <= fan_in ** -0.5 and bias.std() > 0


def test_slowfast_init():
    torch.manual_seed(0)
    model = mvit_fast.build_model("s", **TINY)
    blk = model.blocks[1]
    assert torch.all(blk.attn.qkv.bias == 0.02) and torch.all(blk.mlp.fc1.bias == 0.02)
    assert torch.all(blk.norm1.bias == 0.02) and torch.all(blk.norm1.weight == 1.0)
    assert model.cls_token.abs().sum() > 0  # trunc normal too, 16 values: too few for a std check
    for w in (blk.attn.qkv.weight, blk.attn.pool_q.weight, blk.attn.rel_pos_h):
        # trunc_normal_(std=.02) truncates at +-2 (absolute), i.e. a plain normal at this std
        assert 0.015 < w.std() < 0.025 and w.mean().abs() < 0.005


def test_forward_backward_and_eval_determinism():
    torch.manual_seed(0)
    model = mvit_fast.build_model("s", **TINY)
    clip = torch.randn(2, 3, 4, 32, 32)
    logits = model(clip)
    assert logits.shape == (2, 7)
    logits.sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(clip), model(clip))


def test_drop_path_and_head_dropout_only_in_training():
    torch.manual_seed(0)
    model = mvit_fast.build_model("s", **TINY, drop_path_rate=0.5)
    clip = torch.randn(2, 3, 4, 32, 32)
    with torch.no_grad():
        assert not torch.equal(model(clip), model(clip))  # stochastic while training
        model.eval()
        assert torch.equal(model(clip), model(clip))


def test_activation_checkpointing_gives_the_same_gradients():
    # with drop path and dropout on: the recomputed forward must draw the masks of the first
    torch.manual_seed(0)
    model = mvit_fast.build_model("s", **TINY, drop_path_rate=0.8, head_dropout=0.5).train()
    clip = torch.randn(8, 3, 4, 32, 32)
    outs, grads = [], []
    for checkpointed in (False, True):
        model.checkpoint_activations = checkpointed
        model.zero_grad()
        torch.manual_seed(1)
        outs.append(model(clip))
        outs[-1].square().sum().backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    assert torch.equal(outs[0], outs[1])
    for g, g_checkpointed in zip(*grads):
        torch.testing.assert_close(g_checkpointed, g, rtol=1e-5, atol=1e-7)


def test_compiles_without_graph_breaks():
    model = mvit_fast.build_model("s", **{**TINY, "depths": (1, 1, 1, 1)}).eval()
    clip = torch.randn(1, 3, 4, 32, 32)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        torch.testing.assert_close(compiled(clip), model(clip))


def test_other_input_sizes_interpolate_tables():
    model = mvit_fast.build_model("s", **TINY).eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, 6, 40, 48))  # 3x10x12 grid: non-square, longer than tables
    assert out.shape == (1, 7) and torch.isfinite(out).all()


@pytest.mark.parametrize("clip, error, match", [
    (torch.randn(1, 4, 32, 32), ValueError, r"\(B, 3, T, H, W\)"),
    (torch.randn(1, 4, 3, 32, 32), ValueError, r"\(B, 3, T, H, W\)"),
    (torch.zeros(1, 3, 4, 32, 32, dtype=torch.uint8), TypeError, "floating-point"),
])
def test_bad_clips(clip, error, match):
    model = mvit_fast.build_model("s", **TINY)
    with pytest.raises(error, match=match):
        model(clip)


@pytest.mark.parametrize("backend", ["eager", "sdpa", "sdpa_aug", "flex", "triton"])
def test_an_empty_batch_gives_empty_logits_and_zero_gradients(backend):
    if backend not in mvit_fast.attention.BACKENDS:
        pytest.skip(f"backend {backend} is not available here (triton not installed)")
    model = mvit_fast.build_model("s", **TINY, attention_backend=backend)  # triton: attention + pooling
    clip = torch.randn(0, 3, 4, 32, 32, requires_grad=True)
    if backend == "flex":  # FlexAttention has no CPU backward
        with torch.no_grad():
            assert model(clip).shape == (0, 7)
        return
    logits = model(clip)
    assert logits.shape == (0, 7)
    logits.sum().backward()
    assert clip.grad.shape == clip.shape
    assert all(p.grad is not None and not p.grad.any() for p in model.parameters())


@pytest.mark.parametrize("x, thw, match", [
    (torch.randn(2, 1 + 4 * 8 * 8, 48), [4, 8, 8], r"expected x of shape \(B, N, 96\), got \(2, 257, 48\)"),
    (torch.randn(2, 1 + 4 * 8 * 8, 96), [4, 64], r"thw_shape must be 3 sizes >= 1 \(T, H, W\), got \(4, 64"),
    (torch.randn(2, 1 + 4 * 8 * 8, 96), [4, 8, 4], r"x has 257 tokens but thw_shape=\(4, 8, 4\)"),
])
def test_multiscale_attention_rejects_inputs_that_do_not_fit(x, thw, match):
    attn = MultiScaleAttention(96, 192, [8, 56, 56], num_heads=2, stride_q=[1, 2, 2], stride_kv=[1, 4, 4])
    with pytest.raises(ValueError, match=match):
        attn(x, thw)


def test_multiscale_attention_is_a_slowfast_drop_in():
    # Block 1 of MViTv2-S, built with SlowFast's constructor arguments.
    attn = MultiScaleAttention(96, 192, [8, 56, 56], num_heads=2, qkv_bias=True,
                               kernel_q=[3, 3, 3], kernel_kv=[3, 3, 3], stride_q=[1, 2, 2],
                               stride_kv=[1, 4, 4], norm_layer=torch.nn.LayerNorm,
                               has_cls_embed=True, mode="conv", rel_pos_spatial=True,
                               rel_pos_temporal=True, residual_pooling=True)
    assert set(attn.state_dict()) == {
        "qkv.weight", "qkv.bias", "proj.weight", "proj.bias", "pool_q.weight", "pool_k.weight",
        "pool_v.weight", "norm_q.weight", "norm_q.bias", "norm_k.weight", "norm_k.bias",
        "norm_v.weight", "norm_v.bias", "rel_pos_h", "rel_pos_w", "rel_pos_t"}
    assert attn.rel_pos_h.shape == (55, 96) and attn.rel_pos_t.shape == (15, 96)
    x = torch.randn(2, 1 + 4 * 8 * 8, 96)
    out, q_shape = attn(x, [4, 8, 8])
    assert out.shape == (2, 1 + 4 * 4 * 4, 192) and q_shape == [4, 4, 4]
    copy = MultiScaleAttention.from_module(attn, backend="eager")
    assert copy.rel_pos_h.shape == attn.rel_pos_h.shape
    torch.testing.assert_close(copy(x, [4, 8, 8])[0], out, rtol=0, atol=0)
    with pytest.raises(ValueError, match="tokens"):
        attn(x[:, 1:], [4, 8, 8])
    # a frozen double-precision module in eval mode with dropout is copied as it is
    attn = MultiScaleAttention(96, 192, [4, 8, 8], num_heads=2, drop_rate=0.5, kernel_q=[3, 3, 3],
                               kernel_kv=[3, 3, 3], stride_q=[1, 2, 2], stride_kv=[1, 4, 4],
                               rel_pos_spatial=True, rel_pos_temporal=True).double().eval()
    attn.qkv.requires_grad_(False)
    copy = MultiScaleAttention.from_module(attn, backend="eager")
    assert not copy.training and copy.qkv.weight.dtype == torch.float64
    assert [p.requires_grad for p in copy.parameters()] == [p.requires_grad for p in attn.parameters()]
    assert not copy.qkv.weight.requires_grad and copy.proj.weight.requires_grad
    torch.testing.assert_close(copy(x.double(), [4, 8, 8])[0], attn(x.double(), [4, 8, 8])[0], rtol=0, atol=0)
    # q or k/v neither pooled nor strided: no pool layer there, as in SlowFast
    for unpooled in ("q", "kv"):
        strides = {"stride_q": [1, 2, 2], "stride_kv": [1, 2, 2], f"stride_{unpooled}": [1, 1, 1]}
        attn = MultiScaleAttention(96, 96, [4, 8, 8], num_heads=2, **{f"kernel_{unpooled}": [1, 1, 1]},
                                   **strides, rel_pos_spatial=True, rel_pos_temporal=True)
        assert attn.pool_q is None if unpooled == "q" else attn.pool_k is None
        copy = MultiScaleAttention.from_module(attn, backend="eager")
        torch.testing.assert_close(copy(x, [4, 8, 8])[0], attn(x, [4, 8, 8])[0], rtol=0, atol=0)


def test_multiscale_attention_unsupported_modes():
    with pytest.raises(NotImplementedError, match="pool_first"):
        MultiScaleAttention(8, 8, [2, 4, 4], num_heads=2, pool_first=True)
    with pytest.raises(NotImplementedError, match="conv_unshared"):
        MultiScaleAttention(8, 8, [2, 4, 4], num_heads=2, mode="conv_unshared")


def test_triton_backend_matches_float64_eager_model():
    """Whole model with the fused attention (Triton; interpreter on CPU) vs the float64 oracle."""
    from mvit_fast.attention import BACKENDS
    from tests.numerics import assert_close

    if "triton" not in BACKENDS:
        pytest.skip("triton is not installed")
    torch.manual_seed(0)
    no_dropout = dict(TINY, drop_path_rate=0.0, head_dropout=0.0)
    model = mvit_fast.build_model("s", **no_dropout)
    oracle = mvit_fast.build_model("s", **no_dropout, attention_backend="eager").double()
    oracle.load_state_dict(model.state_dict())
    model.set_attention_backend("triton")
    clip = torch.randn(2, 3, 4, 32, 32)
    logits, want = model(clip), oracle(clip.double())
    assert_close(logits, want, dtype=torch.float32, name="logits")
    logits.square().sum().backward()
    want.square().sum().backward()
    for (name, p), q in zip(model.named_parameters(), oracle.parameters()):
        assert_close(p.grad, q.grad, dtype=torch.float32, kind="grad", name=f"grad of {name}")


def test_pool_backend_reaches_every_block(monkeypatch):
    """build_model's pool_backend reaches every block's attention; set_attention_backend keeps it
    unless given one."""
    import mvit_fast.attention.module as attention_module
    from mvit_fast.attention import BACKENDS

    if "triton" not in BACKENDS:
        pytest.skip("triton is not installed")
    fused_calls = []
    fused_pool_qkv = attention_module.fused_pool_qkv
    monkeypatch.setattr(attention_module, "fused_pool_qkv",
                        lambda *args: fused_calls.append(1) or fused_pool_qkv(*args))
    tiny = dict(TINY, depths=(1, 1, 1, 1))
    model = mvit_fast.build_model("s", **tiny, attention_backend="eager", pool_backend="triton").eval()
    clip = torch.randn(1, 3, 4, 32, 32)
    with torch.no_grad():
        model(clip)
    assert len(fused_calls) == len(model.blocks) == 4  # the fused kernel pooled in every block
    model.set_attention_backend("triton")
    assert [(b.attn.backend, b.attn.pool_backend) for b in model.blocks] == [("triton", "triton")] * 4
    model.set_attention_backend("triton", pool_backend="eager")
    assert [(b.attn.backend, b.attn.pool_backend) for b in model.blocks] == [("triton", "eager")] * 4
    with torch.no_grad():
        model(clip)
    assert len(fused_calls) == 4  # the Triton attention, but the plain pooling ops
    with pytest.raises(ValueError, match="unknown pool_backend 'fused'"):
        model.set_attention_backend("eager", pool_backend="fused")
    with pytest.raises(ValueError, match="unknown pool_backend 'fused'"):
        mvit_fast.build_model("s", **tiny, pool_backend="fused")


def test_bf16_autocast_gradients_are_deterministic_and_close_to_float64():
    # Regression: the pooling convs once saw a channels-last input, for which torch 2.13's CPU
    # bf16 depthwise Conv3d weight gradient is wrong (errors the size of the gradient itself).
    from tests.numerics import assert_close

    torch.manual_seed(0)
    no_dropout = dict(TINY, depths=(1, 1, 1, 1), drop_path_rate=0.0, head_dropout=0.0)
    model = mvit_fast.build_model("s", **no_dropout)
    oracle = mvit_fast.build_model("s", **no_dropout).double()
    oracle.load_state_dict(model.state_dict())
    clip = torch.randn(4, 3, 4, 32, 32)
    runs = []
    for _ in range(2):
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(clip).float().logsumexp(-1).sum()
        loss.backward()
        runs.append({n: p.grad.clone() for n, p in model.named_parameters()})
    oracle(clip.double()).logsumexp(-1).sum().backward()
    for name, p in oracle.named_parameters():
        assert torch.equal(runs[0][name], runs[1][name]), f"{name}: bf16 gradient changes run to run"
        if ".pool_" in name:  # relative to the tensor's scale: bf16 rounds every activation
            scale = p.grad.abs().max()
            assert_close(runs[0][name] / scale, p.grad / scale, dtype=torch.bfloat16, kind="grad", name=name)


def test_unknown_attention_backend_is_refused_when_set():
    with pytest.raises(ValueError, match="unknown attention backend 'bogus'"):
        mvit_fast.build_model("s", **TINY, attention_backend="bogus")
    model = mvit_fast.build_model("s", **TINY)
    with pytest.raises(ValueError, match="unknown attention backend 'flash'"):
        model.set_attention_backend("flash")
