"""Whole-model clips/s: inference and training steps of MViTv2-S/B/L, four ways to run them.

    pytest bench/test_model.py --benchmark-only                          # every case this device can run
    pytest bench/test_model.py --benchmark-only -k "S16x224 and train"   # one model, one mode
    MVIT_BENCH_BATCHES=4,8,16 pytest bench/test_model.py --benchmark-only -k S16x224  # batch sweep

Variants (what each one stands for):
    eager-fp32                      backend "eager", float32: what SlowFast and mmaction2 run
    eager-bf16                      backend "eager" under bf16 autocast
    compile-sdpa-bf16               torch.compile + bf16 autocast, attention through PyTorch SDPA
    compile-triton-bf16             torch.compile + bf16 autocast, our Triton attention (and the
                                    fused pooling kernel wherever backend "triton" uses it)
    compile-triton-plainpool-bf16   as compile-triton-bf16, but q/k/v pooled by the plain conv +
                                    LayerNorm ops (pool_backend "eager"): the "before" of the
                                    fused pooling kernel, so the two rows give what it saves

Modes: `infer` = forward under no_grad in eval mode; `train` = forward, soft-target
cross-entropy, backward, AdamW step (fused on CUDA, foreach on CPU), zero_grad.

Batch size (per case, found once): the largest of `BATCH_LADDER` that fits. A probe
runs the case's step uncompiled at batch 1 and 2, fits peak memory as fixed + per_clip
* batch, and keeps the largest rung whose prediction is within `MEMORY_FRACTION` of the
device memory (an uncompiled step stores at least as many activations as a compiled
one). The Triton variants probe with attention through SDPA and the plain pooling ops:
launched uncompiled, the Triton kernels would autotune every config of every block shape
one compile after another (minutes) before the case starts, and SDPA's materialized bias
only adds to the peak, so the probe errs towards a smaller batch. A rung that still runs
out of memory in its first steps falls back to the next smaller one; a case that does not
fit at its smallest rung is skipped with the numbers. `MVIT_BENCH_BATCHES` replaces the
probe by a fixed list (one case per batch).

Compilation: the whole model, `model.compile(fullgraph=True, dynamic=False)`: one graph
(checked: no graph break). Compiling block by block would not save time here: every block
has its own drop-path rate, a float that Dynamo guards on, so each block recompiles (and
16 of them hit the recompile limit, a hard error under fullgraph). The loss and AdamW
stay eager. The first step (compilation included) is timed apart as `first_step_s`; two
more steps warm up; then every timed step ends in a device sync.

FLOPs: fvcore multiply-adds of the model per clip (`mvit_fast.report.count_model`, counted
once per config on the CPU) x 2 FLOPs, x3 for a training step (backward = 2x forward).

Without a GPU: the eager variants of a small MViTv2-S (4 frames at 64 px, batch 1) run as a
smoke test of the suite; compiled, Triton and full-size cases skip with the reason.
"""

from __future__ import annotations

import gc
import json
import os
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from mvit_fast.attention import BACKENDS
from mvit_fast.config import MViTConfig, get_config
from mvit_fast.model import MViT, build_model

CUDA = torch.cuda.is_available()
BATCH_LADDER = (4, 8, 16, 32)
MEMORY_FRACTION = 0.85  # of the device's memory: room for allocator fragmentation and workspaces
WARMUP_STEPS = 2 if CUDA else 1  # after the first (compiling) step


@dataclass(frozen=True)
class ModelSuite:
    """One model at one input size; `overrides` are `get_config` fields (the CPU smoke sizes)."""

    size: str
    needs_cuda: bool
    batches: tuple[int, ...]
    overrides: tuple[tuple[str, object], ...] = ()

    @property
    def cfg(self) -> MViTConfig:
        return get_config(self.size, **dict(self.overrides))

    @property
    def name(self) -> str:
        return f"{self.size.upper()}{self.cfg.num_frames}x{self.cfg.crop_size}"


@dataclass(frozen=True)
class Variant:
    """How a model runs: attention backend, autocast dtype (float32 = no autocast), compiled or
    not, and the q/k/v pooling (`build_model`'s pool_backend; "auto" follows the backend)."""

    name: str
    backend: str
    dtype: torch.dtype
    compiled: bool
    pool_backend: str = "auto"


MODEL_SUITES = (
    ModelSuite("s", needs_cuda=True, batches=BATCH_LADDER),
    ModelSuite("b", needs_cuda=True, batches=BATCH_LADDER),
    ModelSuite("l", needs_cuda=True, batches=(1,)),  # 2828 GMACs per clip: batch 1 where it fits
    ModelSuite("s", needs_cuda=False, batches=(1,), overrides=(("num_frames", 4), ("crop_size", 64))),
)
VARIANTS = (
    Variant("eager-fp32", "eager", torch.float32, compiled=False),
    Variant("eager-bf16", "eager", torch.bfloat16, compiled=False),
    Variant("compile-sdpa-bf16", "sdpa", torch.bfloat16, compiled=True),
    Variant("compile-triton-bf16", "triton", torch.bfloat16, compiled=True),
    Variant("compile-triton-plainpool-bf16", "triton", torch.bfloat16, compiled=True, pool_backend="eager"),
)
MODES = ("train", "infer")


def build_variant_model(suite: ModelSuite, variant: Variant) -> MViT:
    """The model of one case: the suite's config, the variant's attention and pooling backends."""
    return build_model(suite.size, attention_backend=variant.backend, pool_backend=variant.pool_backend,
                       **dict(suite.overrides))


def _batch_sweep() -> list[int | None]:
    """MVIT_BENCH_BATCHES="4,8" -> [4, 8]; unset -> [None] (the probe picks the batch)."""
    text = os.environ.get("MVIT_BENCH_BATCHES", "").strip()
    if not text:
        return [None]
    try:
        return [int(b) for b in text.split(",")]
    except ValueError:
        raise ValueError(f"MVIT_BENCH_BATCHES must be comma-separated integers, got {text!r}") from None


def _skip_reason(suite: ModelSuite, variant: Variant) -> str | None:
    """Why this case cannot run here, or None; decided before any work is done."""
    if suite.needs_cuda and not CUDA:
        return f"{suite.name}: the full-size model needs a CUDA GPU"
    if CUDA and not suite.needs_cuda:
        return f"{suite.name}: CPU smoke sizes; the GPU times the real ones"
    if variant.backend not in BACKENDS:
        return f"backend {variant.backend!r} is not registered in BACKENDS"
    if not CUDA and variant.backend == "triton":
        return "Triton kernels need a CUDA GPU (the interpreter is for tests, not timing)"
    if not CUDA and variant.compiled:
        return ("torch.compile takes minutes on a CPU (215 s for the 4x64 MViTv2-S forward on 2 "
                "cores); compiled steps are timed on the GPU")
    return None


def _cases() -> list:
    params = []
    for suite in MODEL_SUITES:
        # A smoke test of the suite, not a measurement: keep it short. GPU runs take the CLI options.
        marks = () if suite.needs_cuda else pytest.mark.benchmark(max_time=0.2, min_rounds=2)
        for mode in MODES:
            for variant in VARIANTS:
                for batch in _batch_sweep():
                    tag = "" if batch is None else f"-bs{batch}"
                    params.append(pytest.param(suite, variant, mode, batch, marks=marks,
                                               id=f"{suite.name}-{mode}-{variant.name}{tag}"))
    return params


@cache
def macs_per_clip(cfg: MViTConfig) -> int:
    """fvcore multiply-adds of one clip through `cfg`'s model, counted on the CPU once per config.

    MVIT_BENCH_MACS_CACHE names a JSON file that keeps the counts across pytest runs (the GPU
    suite runs several; B takes ~10 s to count).
    """
    from mvit_fast.report import count_model

    cache_path = os.environ.get("MVIT_BENCH_MACS_CACHE")
    counts = json.loads(Path(cache_path).read_text()) if cache_path and Path(cache_path).exists() else {}
    if repr(cfg) not in counts:
        counts[repr(cfg)] = sum(row.macs for row in count_model(MViT(cfg, attention_backend="eager")))
        if cache_path:
            Path(cache_path).write_text(json.dumps(counts, indent=1))
    return counts[repr(cfg)]


def _inputs(cfg: MViTConfig, batch: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalized-looking clips and soft targets (rows summing to 1, as mixup + smoothing give)."""
    gen = torch.Generator(device).manual_seed(0)
    clips = torch.randn(batch, *cfg.input_shape, generator=gen, device=device)
    targets = torch.randn(batch, cfg.num_classes, generator=gen, device=device).softmax(-1)
    return clips, targets


def make_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None, mode: str,
              dtype: torch.dtype, device: torch.device) -> Callable[[torch.Tensor, torch.Tensor], None]:
    """One inference or training step of `model` on (clips, soft targets), ending in a device sync."""
    sync = torch.cuda.synchronize if device.type == "cuda" else lambda: None

    def autocast():
        if dtype == torch.float32:
            return nullcontext()
        return torch.autocast(device.type, dtype=dtype)

    def infer_step(clips: torch.Tensor, targets: torch.Tensor) -> None:
        with torch.no_grad(), autocast():
            model(clips)
        sync()

    def train_step(clips: torch.Tensor, targets: torch.Tensor) -> None:
        with autocast():
            logits = model(clips)
        loss = F.cross_entropy(logits.float(), targets)  # probabilities as targets: soft-target CE
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync()

    return infer_step if mode == "infer" else train_step


def build_case(suite: ModelSuite, variant: Variant, mode: str, device: torch.device):
    """(model, optimizer, step) of one case: the model on `device` in train or eval mode, its
    AdamW when training (fused on CUDA, foreach on CPU), and `make_step`'s step."""
    torch.manual_seed(0)
    model = build_variant_model(suite, variant).to(device)
    model.train(mode == "train")
    optimizer = None
    if mode == "train":
        fused = {"fused": True} if CUDA else {"foreach": True}
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.05, **fused)
    return model, optimizer, make_step(model, optimizer, mode, variant.dtype, device)


def largest_fitting_batch(step: Callable, cfg: MViTConfig, ladder: tuple[int, ...],
                          device: torch.device) -> tuple[int, dict]:
    """The largest rung of `ladder` whose predicted peak memory fits; the probe's numbers.

    Runs `step` (uncompiled) at batch 1 and 2 after one warm step (optimizer state, cuDNN
    plans), fits peak(b) = fixed + per_clip * b and compares with MEMORY_FRACTION of the
    device memory. Raises torch.OutOfMemoryError when batch 1 does not fit.
    """
    if device.type != "cuda" or len(ladder) == 1:
        return ladder[-1], {"batch_rule": "fixed"}
    peaks = {}
    step(*_inputs(cfg, 1, device))
    for b in (1, 2):
        inputs = _inputs(cfg, b, device)
        torch.cuda.reset_peak_memory_stats()
        step(*inputs)
        peaks[b] = torch.cuda.max_memory_allocated()
        del inputs
    per_clip = max(peaks[2] - peaks[1], 1)
    fixed = peaks[1] - per_clip
    budget = MEMORY_FRACTION * torch.cuda.mem_get_info(device)[1]
    fits = [b for b in ladder if fixed + per_clip * b <= budget]
    chosen = max(fits) if fits else min(ladder)
    return chosen, {"batch_rule": f"largest of {list(ladder)} predicted under {MEMORY_FRACTION:.0%} "
                                  "of device memory by an uncompiled probe at batch 1 and 2",
                    "probe_fixed_mb": fixed / 2**20, "probe_per_clip_mb": per_clip / 2**20}


def _release() -> None:
    """Forget compiled graphs (so the next case neither hits the recompile limit nor turns
    dynamic) and hand cached memory back, so each case's peak is its own."""
    torch._dynamo.reset()
    gc.collect()
    if CUDA:
        torch.cuda.empty_cache()


@pytest.mark.parametrize(("suite", "variant", "mode", "fixed_batch"), _cases())
def test_model_step(benchmark, record_run, suite: ModelSuite, variant: Variant, mode: str,
                    fixed_batch: int | None) -> None:
    reason = _skip_reason(suite, variant)
    if reason:
        pytest.skip(reason)
    device = torch.device("cuda" if CUDA else "cpu")
    cfg = suite.cfg
    if not CUDA:  # AdamW's second moment of tiny gradients goes subnormal: x86 then slows down
        torch.set_flush_denormal(True)  # ~40x (15 s vs 0.3 s per step measured); GPUs do not
    model, optimizer, step = build_case(suite, variant, mode, device)
    try:
        if fixed_batch is None:
            batch = None
            if variant.backend == "triton":  # no Triton autotuning before the case (docstring)
                model.set_attention_backend("sdpa", pool_backend="eager")
            try:
                batch, probe = largest_fitting_batch(step, cfg, suite.batches, device)
            except torch.OutOfMemoryError:
                pass  # skipped below, once the error (and the tensors its traceback holds) is gone
            model.set_attention_backend(variant.backend, variant.pool_backend)
            if batch is None:
                pytest.skip(f"{suite.name} {mode} {variant.name}: out of memory at batch 1 "
                            "(uncompiled probe)")
            if variant.backend == "triton" and probe["batch_rule"] != "fixed":
                probe["probe_backends"] = "sdpa attention, plain pooling"
            candidates = [b for b in suite.batches if b <= batch][::-1]
        else:
            probe, candidates = {"batch_rule": "MVIT_BENCH_BATCHES"}, [fixed_batch]
        if variant.compiled:  # in place: `step` calls the compiled forward from here on
            model.compile(fullgraph=True, dynamic=False)
        for batch in candidates:  # the chosen rung, then smaller ones if it runs out of memory
            try:
                inputs = _inputs(cfg, batch, device)
                start = time.perf_counter()
                step(*inputs)  # compiles (compiled variants) or allocates: timed apart
                first_step_s = time.perf_counter() - start
                for _ in range(WARMUP_STEPS):
                    step(*inputs)
                break
            except torch.OutOfMemoryError:
                pass  # freed below, outside the handler: its traceback holds the step's tensors
            inputs = None
            if optimizer is not None:
                optimizer.zero_grad(set_to_none=True)
            gc.collect()
            torch.cuda.empty_cache()
        else:
            pytest.skip(f"{suite.name} {mode} {variant.name}: out of memory at batch {candidates} "
                        f"({probe})")

        if CUDA:
            torch.cuda.reset_peak_memory_stats()
        benchmark.group = f"{suite.name} {mode}"
        benchmark(step, *inputs)
        median = benchmark.stats.stats.median if benchmark.stats else None
        macs = macs_per_clip(cfg)
        record_run(benchmark, flops=2.0 * macs * batch * (3 if mode == "train" else 1), kind="model",
                   model=f"MViTv2-{suite.size.upper()}", suite=suite.name, variant=variant.name,
                   backend=variant.backend, pool_backend=variant.pool_backend, compiled=variant.compiled,
                   dtype=str(variant.dtype).removeprefix("torch."), mode=mode, batch=batch,
                   shape=[batch, *cfg.input_shape], macs_per_clip=macs,
                   clips_per_s=batch / median if median else None, first_step_s=first_step_s,
                   tf32_matmul=torch.backends.cuda.matmul.allow_tf32, batch_ladder=list(suite.batches),
                   **probe)
    finally:
        del model, optimizer, step
        _release()
        torch.set_flush_denormal(False)
