"""Where the time of a model step goes: kernel categories, the per-step breakdown, the report's
tables from committed profiles, and bench/profile_step.py end to end on the CPU smoke suite;
likewise for one attention call (bench/profile_attention.py).

tests/fixtures/profile_small/ holds three hand-made profiles (round numbers, commit
"fixture-not-a-commit") in bench/profile_step.py's format: fixtures for the report, not
measurements.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from mvit_fast.report import (
    CATEGORIES,
    load_profiles,
    main,
    op_time_tables,
    pooling_summary,
    time_breakdown,
    time_breakdown_tables,
)
from mvit_fast.report import kernel_category as category

FIXTURES = Path(__file__).parent / "fixtures"
PROFILES = sorted((FIXTURES / "profile_small").glob("profile_*.json"))


@pytest.mark.parametrize(("name", "expected"), [
    ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64_warpgroupsize1x1_execute_segment_k"
     "_off_kernel__5x_cublas", "matmul"),
    ("nvjet_tst_128x192_64x4_2x1_v_bz_coopB_TNN", "matmul"),
    ("triton_tem_fused_addmm_3", "matmul"),  # Inductor's GEMM template
    ("void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<96, 128, 64, 4, false, false, "
     "cutlass::bfloat16_t>, false, true>(FLASH_NAMESPACE::Flash_fwd_params)", "attention (SDPA)"),
    ("fmha_cutlassB_bf16_aligned_64x64_k96_sm80", "attention (SDPA)"),
    ("cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_3_64x64x64_4x1x1_kernel0_0",
     "attention (SDPA)"),
    ("void conv_depthwise3d_cuda_kernel<c10::BFloat16, float>(at::GenericPackedTensorAccessor<"
     "c10::BFloat16 const, 5ul, at::DefaultPtrTraits, int>, int, int)", "depthwise conv3d"),
    ("sm90_xmma_fprop_implicit_gemm_bf16bf16_bf16f32_f32_nhwckrsc_nhwc_tilesize128x128x64", "convolution"),
    ("void at::native::(anonymous namespace)::vectorized_layer_norm_kernel<c10::BFloat16, float, "
     "false>(int, float, c10::BFloat16 const*, float*, float*, c10::BFloat16*)", "layer norm"),
    ("void at::native::(anonymous namespace)::GammaBetaBackwardCUDAKernel_32x32<float, float>(long, "
     "long, float const*, float*, float*)", "layer norm"),
    ("triton_red_fused_native_layer_norm_backward_3", "layer norm"),  # not "Inductor fused"
    ("triton_per_fused__softmax_7", "softmax"),
    ("triton_poi_fused_add_mul_5", "Inductor fused"),
    ("triton_poi_fused_clone_2", "Inductor fused"),  # Inductor's, before the copies
    ("void at::native::(anonymous namespace)::multi_tensor_apply_kernel<at::native::(anonymous "
     "namespace)::FusedOptimizerTensorListMetadata<4>, at::native::(anonymous namespace)::"
     "FusedAdamMathFunctor<float, 4, (at::native::ADAM_MODE)1, false> >(...)", "optimizer"),
    ("void at::native::unrolled_elementwise_kernel<at::native::direct_copy_kernel_cuda(at::"
     "TensorIteratorBase&)::{lambda()#3}, std::array<char*, 2ul>, 4>(int, ...)", "copy/layout"),
    ("void at::native::vectorized_elementwise_kernel<4, at::native::GeluCUDAKernelImpl(at::"
     "TensorIteratorBase&, at::native::GeluType)::{lambda(float)#1}>(int, ...)", "ATen elementwise"),
    ("Memcpy DtoD (Device -> Device)", "copy/layout"),
    ("_attn_fwd", "attention (ours)"),
    ("_attn_bwd_dq", "attention (ours)"),
    ("_attn_bwd_dkdv_3", "attention (ours)"),  # as Inductor names a user kernel
    ("_pool_norm_fwd", "pooling (ours)"),
    ("_pool_norm_bwd_dz", "pooling (ours)"),
    ("_pool_norm_bwd_dx_0", "pooling (ours)"),
    ("aten::addmm", "matmul"),
    ("aten::bmm", "matmul"),
    ("aten::native_layer_norm", "layer norm"),
    ("aten::_softmax", "softmax"),
    ("aten::copy_", "copy/layout"),
    ("aten::cat", "copy/layout"),
    ("aten::mkldnn_convolution", "convolution"),
    ("aten::slow_conv3d_forward", "convolution"),
    ("Optimizer.step#AdamW.step", "optimizer"),
    ("aten::_foreach_lerp_", "optimizer"),
    ("aten::concatenate", "other"),  # "cat" as a word only
    ("Memset (Device)", "other"),
    ("aten::scatter_", "other"),
])
def test_kernel_category(name, expected):
    assert expected in CATEGORIES
    assert category(name) == expected


def test_breakdown_sums_shares_and_top_order():
    ops = [("aten::addmm", 4, 3000.0), ("_attn_fwd", 2, 1000.0), ("aten::copy_", 10, 500.0),
           ("mystery_kernel", 1, 500.0), ("aten::addmm", 2, 1000.0)]  # a name twice adds up
    breakdown = time_breakdown(ops, steps=2, top=3)
    assert breakdown["total_ms"] == pytest.approx(3.0)
    # largest first; equal times in name order
    assert list(breakdown["categories"].items()) == [
        ("matmul", pytest.approx(2.0)), ("attention (ours)", pytest.approx(0.5)),
        ("copy/layout", pytest.approx(0.25)), ("other", pytest.approx(0.25))]
    assert [row["name"] for row in breakdown["top"]] == ["aten::addmm", "_attn_fwd", "aten::copy_"]
    addmm = breakdown["top"][0]
    assert addmm == {"name": "aten::addmm", "category": "matmul", "calls_per_step": 3.0,
                     "ms_per_step": pytest.approx(2.0), "share": pytest.approx(2 / 3)}
    assert breakdown["top"][2]["share"] == pytest.approx(0.25 / 3)


@pytest.fixture(scope="module")
def profiles() -> list[dict]:
    return load_profiles(PROFILES)


def test_tables_from_profiles(profiles):
    lines = time_breakdown_tables(profiles).splitlines()
    assert lines[0] == ("### Where the time goes: MViTv2-S 16x224 train, batch 8 (NVIDIA H100 80GB HBM3; "
                        "CUDA kernel time per step, torch.profiler over 5 steps; torch 2.11.0+cu130, "
                        "commit fixture-no)")
    # columns in variant order; rows by the largest column (eager-bf16, 240 ms), ties in rule order
    table = lines[lines.index("| category | eager-bf16 | compile-triton-plainpool-bf16 | "
                              "compile-triton-bf16 |"):]
    assert table[2:17] == [
        "| matmul | 90.00 (37.5%) | 45.00 (40.9%) | 45.00 (50.0%) |",
        "| ATen elementwise | 60.00 (25.0%) | - | - |",
        "| copy/layout | 30.00 (12.5%) | 5.00 (4.5%) | 2.00 (2.2%) |",
        "| layer norm | 25.00 (10.4%) | 8.00 (7.3%) | 4.00 (4.4%) |",
        "| softmax | 20.00 (8.3%) | - | - |",
        "| depthwise conv3d | 10.00 (4.2%) | 12.00 (10.9%) | - |",
        "| optimizer | 3.00 (1.2%) | 3.00 (2.7%) | 3.00 (3.3%) |",
        "| convolution | 2.00 (0.8%) | 1.00 (0.9%) | 1.00 (1.1%) |",
        "| attention (ours) | - | 20.00 (18.2%) | 20.00 (22.2%) |",
        "| pooling (ours) | - | - | 5.00 (5.6%) |",
        "| Inductor fused | - | 14.00 (12.7%) | 10.00 (11.1%) |",
        "| other | - | 2.00 (1.8%) | - |",
        "| total | 240.00 | 110.00 | 90.00 |",
        "| step (wall) | 250.00 | 120.00 | 100.00 |",
        "",
    ]


def test_pooling_line(profiles):
    text = time_breakdown_tables(profiles)
    # plain: step difference 120 - 100 ms plus the fused kernel's 5 ms; fused: its own 5 ms
    assert ("pooling (depthwise conv3d + LayerNorm of q, k, v): 25.00 ms of 120.00 ms per step (20.8%) "
            "with the plain ops (compile-triton-plainpool-bf16; derived from the step-time difference "
            "to compile-triton-bf16 plus the fused kernel's time") in text
    assert ("its depthwise conv3d kernels alone: 12.00 ms) vs 5.00 ms of 100.00 ms (5.0%) with the "
            "fused kernel (compile-triton-bf16; its own kernels' time).") in text

    by_variant = {p["variant"]: p for p in profiles}
    plain = by_variant.pop("compile-triton-plainpool-bf16")
    assert pooling_summary(by_variant) is None
    assert "pooling (depthwise" not in time_breakdown_tables(list(by_variant.values()))
    # step times at different batches do not subtract
    assert pooling_summary(dict(by_variant, **{plain["variant"]: dict(plain, batch=16)})) is None


def test_profiles_of_another_device_get_their_own_table(profiles):
    moved = [dict(p, device="NVIDIA H200") if p["variant"] == "compile-triton-plainpool-bf16" else p
             for p in profiles]
    text = time_breakdown_tables(moved)
    headings = [line for line in text.splitlines() if line.startswith("### ")]
    assert len(headings) == 2 and "(NVIDIA H100 80GB HBM3;" in headings[0] and "(NVIDIA H200;" in headings[1]
    assert "pooling (depthwise" not in text  # the plain pooling ran on another GPU: no comparison


def test_cli_reads_profiles_beside_the_benchmarks(tmp_path, capsys):
    shutil.copy(FIXTURES / "bench_small.json", tmp_path / "bench_model.json")
    assert main(["throughput", str(tmp_path / "bench_model.json"), "--no-plots"]) == 0
    without = capsys.readouterr().out
    assert "Where the time goes" not in without  # no profiles: the report as before

    for path in PROFILES:
        shutil.copy(path, tmp_path)
    assert main(["throughput", str(tmp_path / "bench_model.json"), "--no-plots"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(without.rstrip("\n"))  # the throughput tables unchanged, first
    assert "### Where the time goes: MViTv2-S 16x224 train, batch 8" in out
    assert "| pooling (ours) | - | - | 5.00 (5.6%) |" in out

    # profiles alone, given on the command line
    assert main(["throughput", *map(str, PROFILES), "--no-plots"]) == 0
    out = capsys.readouterr().out
    assert "| step (wall) | 250.00 | 120.00 | 100.00 |" in out and "| train | eager-fp32 |" not in out

    pytest.importorskip("matplotlib", reason="the plots need matplotlib (the `report` or `dev` extra)")
    plots = tmp_path / "plots"
    assert main(["throughput", str(tmp_path / "bench_model.json"), "--plot-dir", str(plots)]) == 0
    assert (plots / "time_breakdown.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"wrote {plots / 'time_breakdown.png'}" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU smoke suite is skipped where a GPU is")
def test_profile_step_cpu_smoke(tmp_path, capsys):
    """bench/profile_step.py on the CPU smoke suite: one eager inference step profiled."""
    from bench.profile_step import main as profile_main

    args = ["--suite", "S4x64", "--mode", "infer", "--variants", "eager-fp32", "compile-triton-bf16",
            "--batch", "1", "--steps", "1", "--out", str(tmp_path)]
    assert profile_main(args) == 0
    printed = capsys.readouterr().out
    assert "S4x64-infer-compile-triton-bf16: skipped: " in printed  # compiled cases need the GPU
    assert [p.name for p in tmp_path.iterdir()] == ["profile_S4x64-infer-eager-fp32.json"]
    profile = json.loads((tmp_path / "profile_S4x64-infer-eager-fp32.json").read_text())
    assert {"device", "torch", "triton", "commit", "command"} <= profile.keys()
    assert profile["command"] == "python bench/profile_step.py " + " ".join(args)
    assert (profile["kind"], profile["suite"], profile["mode"], profile["variant"]) == (
        "profile", "S4x64", "infer", "eager-fp32")
    assert (profile["batch"], profile["steps"], profile["dtype"], profile["compiled"]) == (
        1, 1, "float32", False)
    assert profile["step_ms"] > 0 and profile["timed"] == "CPU ops' self time"
    assert sum(profile["categories"].values()) == pytest.approx(profile["total_ms"], rel=0.01)
    # self times: within the profiled steps' wall time (inclusive times would count nested ops twice)
    assert 0 < profile["total_ms"] <= 1.01 * profile["profiled_step_ms"]
    assert profile["categories"]["matmul"] > 0
    assert set(profile["categories"]) <= set(CATEGORIES)
    top = profile["top"]
    assert len(top) == 25
    assert [row["ms_per_step"] for row in top] == sorted((row["ms_per_step"] for row in top), reverse=True)
    assert all(row["category"] == category(row["name"]) for row in top)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU smoke suite is skipped where a GPU is")
def test_profile_counts_the_cpu_optimizer_step_as_the_optimizer(tmp_path):
    # on a CPU AdamW runs per tensor (aten::sqrt, addcdiv_, ...): inside its step they are its time
    from bench.profile_step import main as profile_main

    assert profile_main(["--suite", "S4x64", "--mode", "train", "--variants", "eager-fp32", "--batch", "1",
                         "--steps", "1", "--out", str(tmp_path)]) == 0
    profile = json.loads((tmp_path / "profile_S4x64-train-eager-fp32.json").read_text())
    assert profile["categories"]["optimizer"] > 0.2 * profile["total_ms"]
    names = {row["name"]: row["category"] for row in profile["top"]}
    assert not {"aten::sqrt", "aten::addcdiv_", "aten::lerp_"} & names.keys()
    assert names.get("optimizer: aten::sqrt") == "optimizer"


# --- one attention call: bench/profile_attention.py and the report's op tables -----------------


def _op_profile(backend: str, categories: dict[str, float], top: list[tuple[str, float]], **fields) -> dict:
    """A hand-made op profile: round numbers in bench/profile_attention.py's format."""
    total = sum(categories.values())
    return {"kind": "op_profile", "suite": "S16x224", "shape": "b0-h1-25089x393", "blocks": [0],
            "mode": "fwd+bwd", "backend": backend, "batch": 8, "calls": 10, "dtype": "bfloat16",
            "device": "NVIDIA H100 80GB HBM3", "timed": "CUDA kernel time", "commit": "fixture-not-a-commit",
            "source": f"opprofile_attention-{backend}.json", "categories": categories, "total_ms": total,
            "call_ms": total + 0.5, "top": [{"name": n, "ms_per_step": ms} for n, ms in top], **fields}


def test_op_tables_name_our_passes_and_categorize_the_rest():
    ours = _op_profile("triton", {"attention (ours)": 4.5, "matmul": 0.25},
                       [("_attn_bwd_dkdv_2", 2.0), ("_attn_bwd_dq", 1.5), ("_attn_fwd", 0.75),
                        ("void cutlass_80_wmma_tensorop_bf16_s161616gemm_bf16", 0.25)])
    # 0.25 ms of our kernels below the top list stay under their category
    peer = _op_profile("sdpa_aug", {"attention (SDPA)": 3.0, "copy/layout": 0.5},
                       [("flash_bwd_kernel", 2.0), ("flash_fwd_kernel", 1.0)])
    lines = op_time_tables([peer, ours]).splitlines()
    assert lines[0] == ("### Where the attention op's time goes: S16x224 b0-h1-25089x393 fwd+bwd, batch 8 "
                        "(NVIDIA H100 80GB HBM3; CUDA kernel time per call, torch.profiler over 10 calls; "
                        "bfloat16, commit fixture-no)")
    assert lines[2:13] == [
        "| kernels | sdpa_aug | triton |",
        "|---|---:|---:|",
        "| _attn_fwd | - | 0.750 |",
        "| _attn_bwd_dq | - | 1.500 |",
        "| _attn_bwd_dkdv | - | 2.000 |",
        "| attention (SDPA) | 3.000 | - |",
        "| copy/layout | 0.500 | - |",
        "| attention (ours) | - | 0.250 |",
        "| matmul | - | 0.250 |",
        "| total | 3.500 | 4.750 |",
        "| call (wall) | 4.000 | 5.250 |"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU smoke suite is skipped where a GPU is")
def test_profile_attention_cpu_smoke_and_report(tmp_path, capsys):
    """bench/profile_attention.py on the CPU smoke suite, then the report reading its files."""
    from bench.profile_attention import main as profile_main

    args = ["--backends", "eager", "sdpa_aug", "triton", "--calls", "1", "--out", str(tmp_path)]
    assert profile_main(args) == 0
    printed = capsys.readouterr().out
    assert "S4x64-b0-h1-513x9-fwd+bwd-triton: skipped: Triton kernels need a CUDA GPU" in printed
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == [f"opprofile_attention-S4x64-b0-h1-513x9-fwd+bwd-{b}.json" for b in ("eager", "sdpa_aug")]
    profile = json.loads((tmp_path / names[0]).read_text())
    assert {"device", "torch", "triton", "commit"} <= profile.keys()
    assert profile["command"] == "python bench/profile_attention.py " + " ".join(args)
    assert (profile["kind"], profile["suite"], profile["shape"], profile["mode"], profile["backend"]) == (
        "op_profile", "S4x64", "b0-h1-513x9", "fwd+bwd", "eager")
    assert (profile["batch"], profile["calls"], profile["nq"], profile["nk"]) == (1, 1, 513, 9)
    assert profile["call_ms"] > 0 and profile["categories"]["matmul"] > 0
    assert sum(profile["categories"].values()) == pytest.approx(profile["total_ms"], rel=0.01)

    assert main(["throughput", *(str(tmp_path / n) for n in names), "--no-plots"]) == 0
    out = capsys.readouterr().out
    assert "### Where the attention op's time goes: S4x64 b0-h1-513x9 fwd+bwd, batch 1 (" in out
    assert "| kernels | eager | sdpa_aug |" in out
