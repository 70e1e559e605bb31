"""Reports: `python -m mvit_fast.report flops` prints params and fvcore multiply-adds;
`python -m mvit_fast.report throughput [JSON ...]` tabulates and plots benchmark results, and
where the time of a model step goes when bench/profile_step.py's profiles lie beside them.

fvcore's "FLOPs" are multiply-adds (what the MViTv2 results table calls FLOPs).
The count runs block by block on a real clip-sized input (fvcore traces with
torch.jit, which cannot run on the meta device); one block at a time keeps the
materialized attention of the eager backend within a CPU's memory even for L.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import sys
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from .checkpoint import unwritable
from .config import DATASETS, SIZES, block_specs, get_config
from .model import MViT

# The MViTv2 results table (seed document): GFLOPs (multiply-adds) and params (M) per
# (size, dataset); SSv2's head has 174 classes, not 400.
PUBLISHED = {("s", "k400"): (64.0, 34.5), ("b", "k400"): (225.0, 51.2), ("l", "k400"): (2828.0, 213.0),
             ("s", "ssv2"): (64.0, 34.4), ("b", "ssv2"): (225.0, 51.1), ("l", "ssv2"): (2828.0, 213.0)}

# Submodules of an attention block that are not the attention op itself.
_ATTN_LAYERS = ("qkv", "q", "k", "v", "proj", "pool_q", "pool_k", "pool_v", "norm_q", "norm_k", "norm_v")


class _TensorFn(nn.Module):
    """Wraps a callable of one tensor so jit.trace sees tensors in and out."""

    def __init__(self, module: nn.Module, fn: Callable[[nn.Module, Tensor], Tensor]) -> None:
        super().__init__()
        self.module, self.fn = module, fn

    def forward(self, x: Tensor) -> Tensor:
        return self.fn(self.module, x)


def _count(module: nn.Module, fn: Callable[[nn.Module, Tensor], Tensor], x: Tensor) -> dict[str, int]:
    """fvcore multiply-adds of fn(module, x), by submodule name (relative to `module`)."""
    from fvcore.nn import FlopCountAnalysis

    wrapped = _TensorFn(module, fn)
    analysis = (FlopCountAnalysis(wrapped, x).unsupported_ops_warnings(False)
                .uncalled_modules_warnings(False).tracer_warnings("none"))
    return {k.removeprefix("module").removeprefix("."): v for k, v in analysis.by_module().items()}


@dataclass
class StageCount:
    name: str
    params: int
    macs: int
    attention_macs: int  # whole attention modules (qkv, pooling, op, proj)
    attention_op_macs: int  # the op alone: QK^T, rel-pos bias, P @ V


def count_model(model: MViT, batch: int = 1) -> list[StageCount]:
    """Params and fvcore multiply-adds per stage of `model` at its config's input size, traced
    on the model's device.

    Blocks with the same spec (dims, heads, strides, grids) cost the same, so each
    distinct block is traced once: MViTv2-L's 48 blocks are a handful of shapes.
    """
    cfg = model.cfg
    model = model.eval()
    specs = block_specs(cfg)
    rows = {"stem": StageCount("stem", 0, 0, 0, 0)}
    rows["stem"].params = sum(p.numel() for p in model.patch_embed.parameters()) + model.cls_token.numel()
    block_counts: dict[tuple, tuple[int, int, int]] = {}
    with torch.no_grad():
        clip = torch.zeros(batch, *cfg.input_shape, device=model.cls_token.device)
        rows["stem"].macs = _count(model.patch_embed, lambda m, x: m(x)[0], clip)[""]
        x, thw = model.patch_embed(clip)
        x = torch.cat((model.cls_token.expand(batch, -1, -1), x), dim=1)
        for spec, blk in zip(specs, model.blocks):
            key = dataclasses.astuple(dataclasses.replace(spec, index=0, stage=0, drop_path=0.0))
            if key not in block_counts:
                counts = _count(blk, lambda m, x, thw=thw: m(x, thw)[0], x)
                layers = sum(counts.get(f"attn.{name}", 0) for name in _ATTN_LAYERS)
                block_counts[key] = (counts[""], counts["attn"], counts["attn"] - layers)
                x, thw = blk(x, thw)
            else:  # same shapes in and out: the next block's input is this shape too
                x = x.new_zeros(batch, spec.q_tokens, spec.dim_out)
                thw = list(spec.q_grid)
            macs, attn, op = block_counts[key]
            name = f"stage{spec.stage + 1}"
            row = rows.setdefault(name, StageCount(name, 0, 0, 0, 0))
            row.params += sum(p.numel() for p in blk.parameters())
            row.macs += macs
            row.attention_macs += attn
            row.attention_op_macs += op
        head = nn.Sequential(model.norm, model.head)
        rows["head"] = StageCount("head", sum(p.numel() for p in head.parameters()),
                                  _count(head, lambda m, x: m(x[:, 0]), x)[""], 0, 0)
    return list(rows.values())


def flops_table(size: str, dataset: str, rows: list[StageCount]) -> str:
    """Markdown table of `count_model` rows for one MViTv2 size, against the published totals."""
    cfg = get_config(size, dataset)
    total = StageCount("total", *(sum(getattr(r, f) for r in rows) for f in
                                  ("params", "macs", "attention_macs", "attention_op_macs")))
    gmacs_pub, params_pub = PUBLISHED[size, dataset]
    lines = [f"### MViTv2-{size.upper()} {cfg.num_frames}x{cfg.crop_size} ({dataset}, "
             f"{cfg.num_classes} classes), per clip",
             "",
             "| part | params | GFLOPs (MACs) | attention modules | attention op |",
             "|---|---:|---:|---:|---:|"]
    for r in [*rows, total]:
        shares = [f"{v / 1e9:.2f}G ({100 * v / r.macs:.1f}%)" if r.macs else "-"
                  for v in (r.attention_macs, r.attention_op_macs)]
        lines.append(f"| {r.name} | {r.params:,} | {r.macs / 1e9:.2f} | {shares[0]} | {shares[1]} |")
    lines.append("")
    lines.append(f"Published: {gmacs_pub:g}G, {params_pub:g}M; measured {total.macs / 1e9:.2f}G "
                 f"({100 * (total.macs / 1e9 / gmacs_pub - 1):+.2f}%), {total.params / 1e6:.2f}M.")
    return "\n".join(lines)


# --- throughput: tables and plots from the benchmark suites' pytest-benchmark JSON -------------
#
# Rows are pytest-benchmark entries whose `extra_info` the bench/ suites fill (bench/conftest.py
# `record_run`): kind "model" (bench/test_model.py: clips/s, peak memory, TFLOP/s from the fvcore
# count) and kind "attention" (bench/test_attention.py: one op call at one block shape).

RESULTS_DIR = "bench/results"
MODEL_VARIANTS = ("eager-fp32", "eager-bf16", "compile-sdpa-bf16", "compile-triton-plainpool-bf16",
                  "compile-triton-bf16")
ATTENTION_BACKENDS = ("eager", "sdpa", "flex", "sdpa_aug", "triton")
_SIZE_ORDER = {"s": 0, "b": 1, "l": 2}

# Spec sheets (dense bf16 tensor-core FLOP/s, HBM bytes/s), matched as whole words of the CUDA
# device name, most specific first. The plain "H100" is the SXM part ("NVIDIA H100 80GB HBM3");
# "H200" is not a GH200's.
DEVICE_PEAKS: tuple[tuple[str, float, float], ...] = (
    ("H100 PCIe", 756e12, 2.0e12),
    ("H100 NVL", 835e12, 3.9e12),
    ("H100", 989e12, 3.35e12),
    ("H200", 989e12, 4.8e12),
    ("A100-SXM4-80GB", 312e12, 2.039e12),
    ("A100", 312e12, 1.555e12),
)
_DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4, "float64": 8}


def device_peaks(device: str) -> tuple[float, float] | None:
    """(dense bf16 FLOP/s, memory bytes/s) of a CUDA device name from `DEVICE_PEAKS`, or None."""
    for key, flops, bandwidth in DEVICE_PEAKS:
        if re.search(rf"(?<![a-z0-9]){re.escape(key)}(?![a-z0-9])", device, re.IGNORECASE):
            return flops, bandwidth
    return None


def load_benchmarks(paths: Iterable[str | Path]) -> list[dict]:
    """Every benchmark of the given pytest-benchmark JSON files as one flat dict per row:
    `extra_info` plus `name`, `median_s` and `source` (the file)."""
    rows = []
    for path in paths:
        data = _read_json(path)
        if not isinstance(data.get("benchmarks"), list):
            raise ValueError(f"{path}: not a pytest-benchmark JSON file (no 'benchmarks' list)")
        for bench in data["benchmarks"]:
            stats = bench.get("stats") or {}
            if not stats.get("median"):
                continue  # a case cut before its rounds finished
            rows.append(dict(bench.get("extra_info", {}), name=bench["name"], median_s=stats["median"],
                             source=str(path)))
    return rows


def _read_json(path: str | Path) -> dict:
    try:
        data = json.loads(Path(path).read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not JSON ({e})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a JSON {type(data).__name__}, not an object")
    return data


def _is_gpu_run(path: Path) -> bool:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    benchmarks = data.get("benchmarks") if isinstance(data, dict) else None
    return any(isinstance(b, dict) and (b.get("extra_info") or {}).get("device_type") == "cuda"
               for b in benchmarks or ())


def newest_gpu_run(results_dir: str | Path = RESULTS_DIR) -> list[Path]:
    """The pytest-benchmark JSON files of the newest GPU run under `results_dir`.

    A run is one folder (bench/gpu_suite.sh's $OUT, committed as bench/results/<run>/);
    the newest is the one whose GPU files carry the latest pytest-benchmark `datetime`.
    """
    runs: dict[Path, str] = {}
    for path in sorted(Path(results_dir).glob("**/*.json")):
        if _is_gpu_run(path):
            stamp = json.loads(path.read_text()).get("datetime", "")
            runs[path.parent] = max(runs.get(path.parent, ""), stamp)
    if not runs:
        raise FileNotFoundError(
            f"no GPU benchmark results under {results_dir}/: run `OUT=<dir> bash bench/gpu_suite.sh` "
            "on a CUDA machine (see its header for committing them), or pass JSON files")
    folder = max(runs, key=lambda run: (runs[run], str(run)))
    return [p for p in sorted(folder.glob("*.json")) if _is_gpu_run(p)]


def _best(rows: list[dict]) -> dict | None:
    """The fastest row (highest clips/s): a batch sweep reports each variant at its best batch."""
    return max(rows, key=lambda r: r.get("clips_per_s") or 0.0, default=None)


def _fmt(value: float | None, spec: str, suffix: str = "") -> str:
    return "-" if value is None else f"{value:{spec}}{suffix}"


def _short_commit(commit) -> str:
    """The first 10 digits of a commit, keeping a "-dirty" mark (a tree that differed from it)."""
    commit = str(commit)
    dirty = commit.endswith("-dirty")
    return commit.removesuffix("-dirty")[:10] + ("-dirty" if dirty else "")


def _suite_key(suite: str) -> tuple:
    return (_SIZE_ORDER.get(suite[:1].lower(), 9), suite)


def _model_rows(rows: list[dict]) -> list[dict]:
    return [r for r in rows if r.get("kind") == "model" and r.get("clips_per_s")]


def _pool_rows(rows: list[dict]) -> list[dict]:
    return [r for r in rows if r.get("kind") == "pool"]


def _attention_rows(rows: list[dict]) -> list[dict]:
    # rows from before `kind` existed are told apart by their fields (pool rows have no "nk")
    return [r for r in rows if r.get("kind") == "attention"
            or ("kind" not in r and {"backend", "nq", "nk", "blocks"} <= r.keys())]


def _data_rows(rows: list[dict]) -> list[dict]:
    return [r for r in rows if r.get("kind") == "data" and r.get("clips_per_s")]


def by_device(rows: list[dict]) -> dict[str, list[dict]]:
    """The model, attention and pool rows of each device (name): no ratio or sum mixes devices
    (one GPU run's calls may land on different machines). The data rows (bench/test_data.py's,
    whose PyAV cases run on the "cpu") have a table of their own, `data_table`."""
    out: dict[str, list[dict]] = {}
    for r in _model_rows(rows) + _attention_rows(rows) + _pool_rows(rows):
        out.setdefault(str(r.get("device", "?")), []).append(r)
    return out


def throughput_tables(rows: list[dict]) -> str:
    """Markdown: per model, clips/s of every variant and mode with speedups and memory; the
    attention and pooling ops' tables; the video loaders'. Rows of several devices get a
    section per device."""
    devices = by_device(rows)
    if len(devices) > 1:
        tables = "\n".join(f"## {device}\n\n{_device_tables(device_rows)}"
                           for device, device_rows in devices.items())
    else:
        tables = _device_tables(rows)
    return "\n".join(([tables] if tables else []) + data_table(rows))


# The model suite a loader's clips feed (same frames and crop)
_SAMPLING_SUITES = {"16x4": "S16x224", "32x3": "B32x224", "40x3": "L40x312"}


def data_table(rows: list[dict]) -> list[str]:
    """Markdown lines: decoded + augmented clips/s of each loader (bench/test_data.py), DALI
    over PyAV, and DALI over the fastest training step of the model its clips feed, measured
    on the same GPU (>= 1: the loader keeps up); no lines without data rows."""
    data = _data_rows(rows)
    if not data:
        return []
    out = ["### Video loading: decode + train augmentation at 224, clips/s (bench/test_data.py)", "",
           "| sampling | backend | device | batch | clips/s | DALI / PyAV | training step it feeds "
           "(clips/s) | DALI / training step |",
           "|---|---|---|---:|---:|---:|---|---:|"]
    # one data call measures both backends on one machine: DALI is compared with the PyAV of
    # its own file, never with another machine's
    for sampling, source in sorted({(r["sampling"], str(r.get("source"))) for r in data}):
        best = {b: _best([r for r in data if (r["sampling"], str(r.get("source"))) == (sampling, source)
                          and r["backend"] == b]) for b in ("dali", "pyav")}
        suite = _SAMPLING_SUITES.get(sampling)
        for backend, row in best.items():
            if row is None:
                continue
            ratio = (f"{row['clips_per_s'] / best['pyav']['clips_per_s']:.2f}x"
                     if backend == "dali" and best["pyav"] else "-")
            step = _best([r for r in _model_rows(rows) if r.get("suite") == suite and r.get("mode") == "train"
                          and r.get("device") == row["device"]]) if backend == "dali" else None
            fed = f"{suite} {step['variant']} ({step['clips_per_s']:.2f})" if step else "-"
            headroom = f"{row['clips_per_s'] / step['clips_per_s']:.2f}x" if step else "-"
            cores = row.get("cpu_cores") if backend == "pyav" else None
            device = row["device"] + (f", {cores} cores" if cores else "")
            out.append(f"| {sampling} | {backend} | {device} | {row['batch']} | "
                       f"{row['clips_per_s']:.2f} | {ratio} | {fed} | {headroom} |")
    out += ["", "K400-like H.264 files (340x256, 30 fps, 10 s) made at bench time; PyAV on every CPU "
            "core of the machine. A clip is one augmented view, as a training step counts them.", ""]
    return out


def _device_tables(rows: list[dict]) -> str:
    models = _model_rows(rows)
    out = []
    for suite in sorted({r["suite"] for r in models}, key=_suite_key):
        in_suite = [r for r in models if r["suite"] == suite]
        first = in_suite[0]
        commits = sorted({_short_commit(r.get("commit")) for r in in_suite})
        out += [f"### {first.get('model', suite)} {suite[1:]} ({first.get('device', '?')}; torch "
                f"{first.get('torch')}, triton {first.get('triton')}, "
                f"commit{'s' if len(commits) > 1 else ''} {', '.join(commits)})",
                "",
                "| mode | variant | batch | clips/s | vs eager fp32 | vs eager bf16 | TFLOP/s "
                "| peak memory (GiB) | memory per clip (GiB) | first step (s) |",
                "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for mode in ("train", "infer"):
            best = {v: _best([r for r in in_suite if r["mode"] == mode and r["variant"] == v])
                    for v in sorted({r["variant"] for r in in_suite}, key=_variant_order)}
            for variant, row in best.items():
                if row is None:
                    continue
                speedups = []
                for base in ("eager-fp32", "eager-bf16"):
                    ref = best.get(base)
                    speedups.append(f"{row['clips_per_s'] / ref['clips_per_s']:.2f}x" if ref else "-")
                peak = row.get("peak_memory_mb")
                peak_gib = None if peak is None else peak / 1024
                per_clip = None if peak is None else peak / 1024 / row["batch"]
                out.append(f"| {mode} | {variant} | {row['batch']} | {row['clips_per_s']:.2f} | "
                           f"{speedups[0]} | {speedups[1]} | {_fmt(row.get('tflops'), '.3g')} | "
                           f"{_fmt(peak_gib, '.2f')} | {_fmt(per_clip, '.3f')} | "
                           f"{_fmt(row.get('first_step_s'), '.1f')} |")
        out += ["", "clips/s at the best batch of each variant (the speedups compare each variant "
                "at its own best batch: a larger batch that fits is part of the gain); TFLOP/s from "
                "the fvcore count (2 FLOPs per multiply-add, x3 for a training step); memory per "
                "clip = peak / batch (weights and optimizer state included); first step = "
                "compilation + one step.", ""]
    attention = attention_block_times(rows)
    if attention:
        out += ["### Attention op over all blocks of a clip batch (ms; bench/test_attention.py)", "",
                "| suite | mode | batch | " + " | ".join(ATTENTION_BACKENDS) + " |",
                "|---|---|---:|" + "---:|" * len(ATTENTION_BACKENDS)]
        for (suite, mode, batch), by_backend in attention.items():
            partial = partial_backends(by_backend)
            cells = [_fmt(sum(by_backend[b].values()) * 1e3 if b in by_backend else None, ".2f")
                     + (" ({}/{} shapes)".format(*partial[b]) if b in partial else "")
                     for b in ATTENTION_BACKENDS]
            out.append(f"| {suite} | {mode} | {batch} | " + " | ".join(cells) + " |")
        out += ["", "A sum over fewer shapes than the others (n/m shapes: cases cut, skipped or out "
                "of memory) leaves blocks out and is no total. " + timing_note(_attention_rows(rows)), ""]
    out += pool_table(rows)
    return "\n".join(out)


POOL_PROVIDERS = ("eager", "compile", "triton")


def _blocks_label(blocks: list[int]) -> str:
    return f"b{blocks[0]}" if len(blocks) == 1 else f"b{blocks[0]}-{blocks[-1]}"


def pool_table(rows: list[dict]) -> list[str]:
    """Markdown lines: the q/k/v pooling of one block per shape, mode and provider
    (bench/test_pool.py), with the fused kernel's speedup over compiled eager and its
    achieved bandwidth; no lines without pool rows."""
    groups: dict[tuple, dict[str, dict]] = {}
    for r in sorted(_pool_rows(rows), key=lambda r: (_suite_key(r["suite"]), r["mode"], r["blocks"][0])):
        key = (r["suite"], r["mode"], _blocks_label(r["blocks"]), r["n"], r["nq"], r["nkv"], r["batch"])
        groups.setdefault(key, {})[r["provider"]] = r
    if not groups:
        return []
    out = ["### q/k/v pooling of one block (ms per call; bench/test_pool.py)", "",
           "| suite | mode | blocks | tokens in -> q, kv | batch | " + " | ".join(POOL_PROVIDERS)
           + " | triton vs compile | triton GB/s (of HBM) |",
           "|---|---|---|---|---:|" + "---:|" * len(POOL_PROVIDERS) + "---:|---:|"]
    for (suite, mode, blocks, n, nq, nkv, batch), by in groups.items():
        cells = [_fmt(by[p]["median_s"] * 1e3 if p in by else None, ".3f") for p in POOL_PROVIDERS]
        both = {"compile", "triton"} <= by.keys()
        speedup = f"{by['compile']['median_s'] / by['triton']['median_s']:.2f}x" if both else "-"
        fused = by.get("triton", {})
        gbps = _fmt(fused.get("gbps"), ".0f")
        if fused.get("fits_l2"):
            gbps += " (L2)"
        elif fused.get("hbm_fraction"):
            gbps += f" ({100 * fused['hbm_fraction']:.0f}%)"
        out.append(f"| {suite} | {mode} | {blocks} | {n} -> {nq}, {nkv} | {batch} | " + " | ".join(cells)
                   + f" | {speedup} | {gbps} |")
    out += ["", "One call pools q, k and v of a block; GB/s is the op's unavoidable HBM traffic "
            "(bench/test_pool.py `pool_bytes`) over its time, against the device's spec bandwidth; "
            "(L2): those bytes fit in twice the L2 cache, so calls run back to back may be served "
            "from it, and no HBM fraction is given. Under bf16 autocast the plain ops write q, k, v in "
            "fp32 (LayerNorm runs in fp32), the fused kernel in bf16, what the attention reads. "
            + timing_note(_pool_rows(rows)), ""]
    return out


def timing_note(rows: list[dict]) -> str:
    """How the op rows were timed (bench/conftest.py `_time_op`'s extra_info "timing"),
    counted per method, as one sentence."""
    counts: dict[str, int] = {}
    for r in rows:
        timing = r.get("timing")
        if timing is None:
            how = ("one eager call per round, recorded before graph timing: the host's launch "
                   "latency is included")
        elif timing == "cuda_graph":
            how = "GPU time per call, from CUDA-graph replays"
        elif r.get("device_type") == "cuda":
            how = "eager calls, the op could not be captured (reason in the JSON's timing)"
        else:
            how = "eager calls"
        counts[how] = counts.get(how, 0) + 1
    return "Timing: " + "; ".join(f"{how} ({n} of {len(rows)} rows)" for how, n in counts.items()) + "."


def partial_backends(by_backend: dict[str, dict[str, float]]) -> dict[str, tuple[int, int]]:
    """{backend: (shapes it has, shapes any backend has)} for the backends of one
    `attention_block_times` entry that lack some of the shapes another one has."""
    shapes = set().union(*by_backend.values())
    return {b: (len(times), len(shapes)) for b, times in by_backend.items() if len(times) < len(shapes)}


def attention_block_times(rows: list[dict]) -> dict[tuple[str, str, int], dict[str, dict[str, float]]]:
    """{(suite, mode, batch): {backend: {shape id: seconds}}}: the median time of one call at a
    shape times the number of blocks that have it, so the shapes of a backend add up to the
    attention time of one pass through the whole model."""
    out: dict[tuple[str, str, int], dict[str, dict[str, float]]] = {}
    for r in sorted(_attention_rows(rows), key=lambda r: (_suite_key(r["suite"]), r["mode"])):
        blocks = r["blocks"]
        shape = f"{_blocks_label(blocks)} {r['nq']}x{r['nk']}"
        by_backend = out.setdefault((r["suite"], r["mode"], r["batch"]), {})
        by_backend.setdefault(r["backend"], {})[shape] = r["median_s"] * len(blocks)
    return out


def attention_io_bytes(row: dict) -> float:
    """Unavoidable memory traffic of one attention call: q, k, v read and out written (fwd);
    plus q, k, v, out, dout read and dq, dk, dv written (bwd). Tables and LSE are left out."""
    per_token = row["batch"] * row["heads"] * row["head_dim"] * _DTYPE_BYTES.get(row["dtype"], 4)
    fwd = 2 * row["nq"] + 2 * row["nk"]
    return per_token * (fwd if row["mode"] == "fwd" else fwd + 4 * row["nq"] + 4 * row["nk"])


# --- where the time goes: bench/profile_step.py's torch.profiler runs of one model step ---------
#
# A profile (`profile_<suite>-<mode>-<variant>.json`, kind "profile") holds one variant's step:
# its wall time, and the profiled time per step (CUDA kernels; CPU ops on a CPU) by category and
# for its top kernels. Kernels are told apart by name alone, with `KERNEL_CATEGORIES`.

PROFILE_GLOB = "profile_*.json"
OUR_ATTENTION = "attention (ours)"
OUR_POOLING = "pooling (ours)"
DEPTHWISE_CONV = "depthwise conv3d"
OTHER = "other"
# The pooling's share compares these two: the same compiled model, fused or plain pooling.
FUSED_POOL_VARIANT = "compile-triton-bf16"
PLAIN_POOL_VARIANT = "compile-triton-plainpool-bf16"

# (category, pattern), in order: a name's category is that of the first pattern found in it
# (re.search, any case), else "other". Our kernels first (Inductor launches a user kernel as
# `_attn_fwd_0`). Then SDPA, layer norm and softmax before the generic rules: Inductor names a
# fused kernel after the ops in it, so `triton_red_fused_native_layer_norm_3` is layer-norm work.
# Depthwise conv3d (PyTorch's own CUDA kernels: the pooling's plain conv) before the other
# convolutions, and those before matmul (cuDNN conv kernels are "implicit_gemm"s). Inductor's
# remaining kernels come before the copies: its `triton_poi_fused_clone_2` may fuse more than a
# copy. The ATen elementwise kernels (eager) last, after the copies some of them run.
KERNEL_CATEGORIES: tuple[tuple[str, str], ...] = (
    (OUR_ATTENTION, r"\b_attn_(fwd|bwd_dq|bwd_dkdv)(_\d+)?\b"),  # kernels/pooled_attention.py
    (OUR_POOLING, r"\b_pool_norm_(fwd|bwd_dz|bwd_dx)(_\d+)?\b"),  # kernels/pool_norm.py
    ("attention (SDPA)", r"flash|fmha|sdpa|attention"),
    ("layer norm", r"layer_?norm|GammaBeta"),
    ("softmax", r"softmax"),
    (DEPTHWISE_CONV, r"conv_depthwise3d"),
    ("convolution", r"conv(olution|\d|_)|implicit_gemm|fprop|dgrad|wgrad|cudnn"),
    ("matmul", r"gemm|gemv|nvjet|xmma|cutlass|cublas|aten::(matmul|linear)$"
               r"|(^|[^a-z])(add|b|baddb)?mm([^a-z]|$)"),  # aten::mm, aten::addmm, triton_tem_fused_mm_0
    ("optimizer", r"multi_tensor_apply|adam|foreach|optimizer"),
    ("Inductor fused", r"^triton_"),
    ("copy/layout", r"copy|memcpy|(^|[^a-z])cat([^a-z]|$)|transpose|permute|contiguous|clone"),
    ("ATen elementwise", r"elementwise|reduce_kernel"),
)
CATEGORIES = tuple(category for category, _ in KERNEL_CATEGORIES) + (OTHER,)
_CATEGORY_PATTERNS = tuple((category, re.compile(pattern, re.IGNORECASE))
                           for category, pattern in KERNEL_CATEGORIES)


def kernel_category(name: str) -> str:
    """The category of a CUDA kernel or CPU op name: the first `KERNEL_CATEGORIES` rule found in it."""
    for category, pattern in _CATEGORY_PATTERNS:
        if pattern.search(name):
            return category
    return OTHER


def time_breakdown(ops: Iterable[tuple[str, int, float]], steps: int, top: int = 25) -> dict:
    """Per step: the total time, the time by category and the `top` costliest kernels (or ops).

    `ops` are (name, calls, microseconds) over `steps` steps, e.g. the profiler's key averages;
    a name listed twice adds up. Returns {"total_ms": ms, "categories": {category: ms}, largest
    first, "top": [{"name", "category", "calls_per_step", "ms_per_step", "share"}]}, where
    share is the fraction of the total.
    """
    calls: dict[str, int] = {}
    micros: dict[str, float] = {}
    for name, count, us in ops:
        calls[name] = calls.get(name, 0) + count
        micros[name] = micros.get(name, 0.0) + us
    ms = {name: us / 1e3 / steps for name, us in micros.items()}
    total = sum(ms.values())
    categories: dict[str, float] = {}
    for name, t in ms.items():
        category = kernel_category(name)
        categories[category] = categories.get(category, 0.0) + t
    ranked = sorted(ms, key=lambda name: (-ms[name], name))[:top]
    return {"total_ms": total,
            "categories": dict(sorted(categories.items(), key=lambda item: (-item[1], item[0]))),
            "top": [{"name": name, "category": kernel_category(name), "calls_per_step": calls[name] / steps,
                     "ms_per_step": ms[name], "share": ms[name] / total if total else 0.0}
                    for name in ranked]}


def _is_profile(path: Path) -> bool:
    return path.match(PROFILE_GLOB)


def _files_beside(paths: Iterable[Path], pattern: str) -> list[Path]:
    """The files named like `pattern` among `paths` and beside the others (one results folder
    holds the benchmark files and the profiles)."""
    paths = list(paths)
    found = {p for p in paths if p.match(pattern)}
    for folder in {p.parent for p in paths if not p.match(pattern)}:
        found.update(folder.glob(pattern))
    return sorted(found)


def _load_kind(paths: Iterable[str | Path], kind: str, script: str) -> list[dict]:
    """The JSON objects of `paths`, each of `kind` (written by `script`), with `source` (the file) added."""
    loaded = []
    for path in paths:
        data = _read_json(path)
        if data.get("kind") != kind:
            raise ValueError(f"{path}: not a {script} profile (no kind {kind!r})")
        loaded.append(dict(data, source=str(path)))
    return loaded


def profile_files(paths: Iterable[Path]) -> list[Path]:
    """The profiles among `paths` and beside their benchmark files."""
    return _files_beside(paths, PROFILE_GLOB)


def load_profiles(paths: Iterable[str | Path]) -> list[dict]:
    """bench/profile_step.py's profile JSONs, each with `source` (the file) added."""
    return _load_kind(paths, "profile", "bench/profile_step.py")


def _variant_order(variant: str) -> int:
    return (MODEL_VARIANTS + (variant,)).index(variant)


def _profile_cases(profiles: list[dict]) -> dict[tuple[str, str, str], dict[str, dict]]:
    """{(suite, mode, device): {variant: profile}} in report order (a later file of a variant
    wins); profiles of different devices are never compared in one case."""
    cases: dict[tuple[str, str, str], dict[str, dict]] = {}
    for p in sorted(profiles, key=lambda p: p["source"]):
        cases.setdefault((p["suite"], p["mode"], p["device"]), {})[p["variant"]] = p
    return {case: dict(sorted(cases[case].items(), key=lambda item: _variant_order(item[0])))
            for case in sorted(cases, key=lambda c: (_suite_key(c[0]), ("train", "infer").index(c[1]), c[2]))}


def pooling_summary(by_variant: dict[str, dict]) -> str | None:
    """The pooling's time per step with the plain ops and with the fused kernel, where the two
    variants were profiled at one batch; None otherwise.

    The fused kernel's time is exact: its own kernels. The plain ops' is not measurable by
    name (their LayerNorms and copies look like the blocks' others), so it is derived: the
    step-time difference between the two variants plus the fused kernel's time.
    """
    fused, plain = by_variant.get(FUSED_POOL_VARIANT), by_variant.get(PLAIN_POOL_VARIANT)
    if fused is None or plain is None or fused["batch"] != plain["batch"]:
        return None
    fused_ms = fused["categories"].get(OUR_POOLING, 0.0)
    plain_ms = plain["step_ms"] - fused["step_ms"] + fused_ms
    conv_ms = plain["categories"].get(DEPTHWISE_CONV, 0.0)
    return (f"pooling (depthwise conv3d + LayerNorm of q, k, v): {plain_ms:.2f} ms of "
            f"{plain['step_ms']:.2f} ms per step ({100 * plain_ms / plain['step_ms']:.1f}%) with the "
            f"plain ops ({PLAIN_POOL_VARIANT}; derived from the step-time difference to "
            f"{FUSED_POOL_VARIANT} plus the fused kernel's time, since the plain LayerNorms and copies "
            f"share kernel names with the blocks' others; its depthwise conv3d kernels alone: "
            f"{conv_ms:.2f} ms) vs {fused_ms:.2f} ms of {fused['step_ms']:.2f} ms "
            f"({100 * fused_ms / fused['step_ms']:.1f}%) with the fused kernel ({FUSED_POOL_VARIANT}; "
            f"its own kernels' time).")


def time_breakdown_tables(profiles: list[dict]) -> str:
    """Markdown: per suite and mode, each variant's profiled time per step by category, and the
    pooling's time with the plain ops and the fused kernel (`pooling_summary`) where both ran."""
    out = []
    for (suite, mode, device), by_variant in _profile_cases(profiles).items():
        variants = list(by_variant)
        first = by_variant[variants[0]]
        largest = max(variants, key=lambda v: by_variant[v]["total_ms"])
        found = {c for p in by_variant.values() for c in p["categories"]}
        order = CATEGORIES + tuple(sorted(found - set(CATEGORIES)))
        categories = sorted(found, key=lambda c: (-by_variant[largest]["categories"].get(c, 0.0),
                                                  order.index(c)))
        facts = [device] + [", ".join(sorted({str(p[key]) for p in by_variant.values()}))
                            for key in ("timed", "batch", "steps")]
        out += [f"### Where the time goes: {first['model']} {suite[1:]} {mode}, batch {facts[2]} "
                f"({facts[0]}; {facts[1]} per step, torch.profiler over {facts[3]} steps; "
                f"torch {first['torch']}, commit {_short_commit(first['commit'])})",
                "",
                "| category | " + " | ".join(variants) + " |",
                "|---|" + "---:|" * len(variants)]
        for category in categories:
            cells = []
            for p in by_variant.values():
                ms = p["categories"].get(category)
                cells.append("-" if ms is None else f"{ms:.2f} ({100 * ms / p['total_ms']:.1f}%)")
            out.append(f"| {category} | " + " | ".join(cells) + " |")
        out += ["| total | " + " | ".join(f"{p['total_ms']:.2f}" for p in by_variant.values()) + " |",
                "| step (wall) | " + " | ".join(f"{p['step_ms']:.2f}" for p in by_variant.values()) + " |",
                "",
                f"ms per step (share of the profiled total), rows by the {largest} column; step (wall) = "
                "median wall time of an unprofiled step; the top kernels are in each profile JSON."]
        pooling = pooling_summary(by_variant)
        out += ["", pooling] if pooling else []
        out.append("")
    return "\n".join(out)


# --- where one attention call's time goes: bench/profile_attention.py --------------------------
#
# An op profile (`opprofile_attention-<suite>-<shape>-<mode>-<backend>.json`, kind "op_profile")
# holds one backend's `pooled_attention` call at one block shape: its wall time and its profiled
# kernel time by category and top kernels, a call counting as the breakdown's step.

OP_PROFILE_GLOB = "opprofile_*.json"
_OUR_ATTENTION_PASS = re.compile(r"\b(_attn_(?:fwd|bwd_dq|bwd_dkdv))(?:_\d+)?\b")


def _is_op_profile(path: Path) -> bool:
    return path.match(OP_PROFILE_GLOB)


def op_profile_files(paths: Iterable[Path]) -> list[Path]:
    """The op profiles among `paths` and beside their benchmark files."""
    return _files_beside(paths, OP_PROFILE_GLOB)


def load_op_profiles(paths: Iterable[str | Path]) -> list[dict]:
    """bench/profile_attention.py's op profiles, each with `source` (the file) added."""
    return _load_kind(paths, "op_profile", "bench/profile_attention.py")


def op_time_rows(profile: dict) -> dict[str, float]:
    """ms per call by row: our Triton passes by name (from the top kernels), else by category."""
    rows = dict(profile["categories"])
    ours = rows.pop(OUR_ATTENTION, 0.0)
    for kernel in profile["top"]:
        match = _OUR_ATTENTION_PASS.search(kernel["name"])
        if match:
            rows[match.group(1)] = rows.get(match.group(1), 0.0) + kernel["ms_per_step"]
            ours -= kernel["ms_per_step"]
    if ours > 1e-9:  # our kernels past the top list
        rows[OUR_ATTENTION] = ours
    return rows


def op_time_tables(profiles: list[dict]) -> str:
    """Markdown: per suite, shape, mode and device, each backend's profiled time of one call by
    Triton pass and kernel category, its total and its wall time."""
    cases: dict[tuple, dict[str, dict]] = {}
    for p in sorted(profiles, key=lambda p: p["source"]):  # a later file of a backend wins
        case = (p["suite"], p["blocks"][0], p["shape"], p["mode"], p["device"])
        cases.setdefault(case, {})[p["backend"]] = p
    order = lambda b: ((*ATTENTION_BACKENDS, b).index(b), b)
    out = []
    for (suite, _, shape, mode, device), by_backend in sorted(
            cases.items(), key=lambda item: (_suite_key(item[0][0]), *item[0][1:])):
        backends = sorted(by_backend, key=order)
        rows = {b: op_time_rows(by_backend[b]) for b in backends}
        passes = ("_attn_fwd", "_attn_bwd_dq", "_attn_bwd_dkdv")
        names = [n for n in passes if any(n in r for r in rows.values())]
        rest = sorted({n for r in rows.values() for n in r} - set(names),
                      key=lambda n: (-max(r.get(n, 0.0) for r in rows.values()), n))
        first = by_backend[backends[0]]
        out += [f"### Where the attention op's time goes: {suite} {shape} {mode}, batch {first['batch']} "
                f"({device}; {first['timed']} per call, torch.profiler over {first['calls']} calls; "
                f"{first['dtype']}, commit {_short_commit(first['commit'])})",
                "",
                "| kernels | " + " | ".join(backends) + " |",
                "|---|" + "---:|" * len(backends)]
        for name in names + rest:
            cells = [_fmt(rows[b].get(name), ".3f") for b in backends]
            out.append(f"| {name} | " + " | ".join(cells) + " |")
        out += ["| total | " + " | ".join(f"{by_backend[b]['total_ms']:.3f}" for b in backends) + " |",
                "| call (wall) | " + " | ".join(f"{by_backend[b]['call_ms']:.3f}" for b in backends) + " |",
                "",
                "ms per call; the Triton passes by name, the rest by kernel category (the rel-pos "
                "tables' einsums are matmuls); call (wall) = median wall time of an unprofiled call.",
                ""]
    return "\n".join(out)


def _figure(ncols: int, nrows: int = 1, width: float = 5.5, height: float = 4.0):
    """A matplotlib Figure without pyplot (no GUI backend, no global state)."""
    try:
        from matplotlib.figure import Figure
    except ImportError as e:
        raise ImportError("the throughput plots need matplotlib: pip install 'mvit-fast[report]' "
                          "(or pass --no-plots)") from e
    fig = Figure(figsize=(width * ncols, height * nrows), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False)
    return fig, [ax for row in axes for ax in row]


def plot_attention_breakdown(rows: list[dict], path: Path) -> Path | None:
    """Stacked bars: attention time of one model pass per backend, split by block shape."""
    times = attention_block_times(rows)
    if not times:
        return None
    fig, axes = _figure(len(times))
    for ax, ((suite, mode, batch), by_backend) in zip(axes, times.items()):
        backends = [b for b in ATTENTION_BACKENDS if b in by_backend] + \
            sorted(set(by_backend) - set(ATTENTION_BACKENDS))
        shapes = list(dict.fromkeys(s for b in backends for s in by_backend[b]))
        partial = partial_backends(by_backend)  # a shorter bar that is no total says so
        labels = [f"{b}\n({partial[b][0]}/{partial[b][1]} shapes)" if b in partial else b for b in backends]
        bottom = [0.0] * len(backends)
        for shape in shapes:
            heights = [by_backend[b].get(shape, 0.0) * 1e3 for b in backends]
            ax.bar(labels, heights, bottom=bottom, label=shape)
            bottom = [b + h for b, h in zip(bottom, heights)]
        ax.set_title(f"{suite} {mode}, batch {batch}")
        ax.set_ylabel("attention time per model pass (ms)")
        ax.legend(fontsize="x-small", title="blocks, Nq x Nk", title_fontsize="x-small")
    fig.savefig(path, dpi=120)
    return path


def plot_attention_roofline(rows: list[dict], path: Path) -> Path | None:
    """Achieved attention TFLOP/s against arithmetic intensity, under the device's roofline."""
    attention = [r for r in _attention_rows(rows) if r.get("tflops")]
    if not attention:
        return None
    device = attention[0].get("device", "?")
    peaks = device_peaks(device)
    fig, (ax,) = _figure(1, width=7.0, height=5.0)
    intensity = {id(r): r["flops"] / attention_io_bytes(r) for r in attention}
    markers = dict(zip(ATTENTION_BACKENDS, "osD^v"))
    for backend in dict.fromkeys(r["backend"] for r in attention):
        for mode, color in (("fwd", "tab:blue"), ("fwd+bwd", "tab:orange")):
            pts = [r for r in attention if r["backend"] == backend and r["mode"] == mode]
            if pts:
                ax.scatter([intensity[id(r)] for r in pts], [r["tflops"] for r in pts], color=color,
                           marker=markers.get(backend, "x"), label=f"{backend} {mode}")
    if peaks:
        flops, bandwidth = peaks
        lo, hi = min(intensity.values()) / 2, max(intensity.values()) * 2
        xs = [lo * (hi / lo) ** (i / 100) for i in range(101)]
        ax.plot(xs, [min(flops, bandwidth * x) / 1e12 for x in xs], color="black", linewidth=1,
                label=f"roofline: {flops / 1e12:.0f} TFLOP/s bf16, {bandwidth / 1e12:.2f} TB/s")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("FLOP per byte of q, k, v, out (and gradients) traffic")
    ax.set_ylabel("TFLOP/s (attention matmuls)")
    ax.set_title(device + ("" if peaks else " (no spec in DEVICE_PEAKS: no roofline)"))
    ax.legend(fontsize="x-small")
    fig.savefig(path, dpi=120)
    return path


def plot_throughput_vs_batch(rows: list[dict], path: Path) -> Path | None:
    """clips/s against batch size, one panel per model, one line per variant and mode."""
    models = _model_rows(rows)
    if not models:
        return None
    suites = sorted({r["suite"] for r in models}, key=_suite_key)
    fig, axes = _figure(len(suites))
    for ax, suite in zip(axes, suites):
        for mode, style in (("train", "-o"), ("infer", "--s")):
            for variant in MODEL_VARIANTS:
                pts = sorted((r["batch"], r["clips_per_s"]) for r in models
                             if r["suite"] == suite and r["mode"] == mode and r["variant"] == variant)
                if pts:
                    ax.plot(*zip(*pts), style, label=f"{variant} {mode}")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("batch (clips)")
        ax.set_ylabel("clips/s")
        ax.set_title(suite)
        ax.legend(fontsize="x-small")
    fig.savefig(path, dpi=120)
    return path


def plot_time_breakdown(profiles: list[dict], path: Path) -> Path | None:
    """Stacked bars: each variant's profiled time per step by category, one panel per suite and mode."""
    cases = _profile_cases(profiles)
    if not cases:
        return None
    fig, axes = _figure(len(cases), width=6.5, height=5.0)
    from matplotlib import colormaps  # installed: _figure checked

    found = {c for p in profiles for c in p["categories"]}
    unknown = sorted(found - set(CATEGORIES))  # from a newer bench/profile_step.py
    order = [c for c in CATEGORIES if c in found] + unknown
    colors = {c: colormaps["tab20"](i % 20) for i, c in enumerate(CATEGORIES + tuple(unknown))}
    for ax, ((suite, mode, device), by_variant) in zip(axes, cases.items()):
        variants = list(by_variant)
        bottom = [0.0] * len(variants)
        for category in order:
            heights = [by_variant[v]["categories"].get(category, 0.0) for v in variants]
            if any(heights):
                ax.bar(variants, heights, bottom=bottom, label=category, color=colors[category])
                bottom = [b + h for b, h in zip(bottom, heights)]
        ax.set_title(f"{suite} {mode}, {device}")
        ax.set_ylabel(f"profiled time per step (ms; {by_variant[variants[0]]['timed']})")
        ax.tick_params(axis="x", labelrotation=20, labelsize="small")
        handles, labels = ax.get_legend_handles_labels()
        ax.legend(handles[::-1], labels[::-1], fontsize="x-small")  # top to bottom, as stacked
    fig.savefig(path, dpi=120)
    return path


def write_plots(rows: list[dict], plot_dir: str | Path, profiles: Iterable[dict] = ()) -> list[Path]:
    """The PNGs (those the rows and profiles have data for) under `plot_dir`; with rows of
    several devices, each device's plots in a subfolder named after it."""
    plot_dir = Path(plot_dir)
    plot_dir.mkdir(parents=True, exist_ok=True)
    devices = by_device(rows)
    made = [plot_time_breakdown(list(profiles), plot_dir / "time_breakdown.png")]  # a panel per device
    for device, device_rows in devices.items():
        folder = plot_dir if len(devices) == 1 else plot_dir / re.sub(r"[^A-Za-z0-9.-]+", "_", device)
        folder.mkdir(exist_ok=True)
        made += [plot_attention_breakdown(device_rows, folder / "attention_breakdown.png"),
                 plot_attention_roofline(device_rows, folder / "attention_roofline.png"),
                 plot_throughput_vs_batch(device_rows, folder / "throughput_vs_batch.png")]
    return [p for p in made if p is not None]


def throughput_main(json_files: list[str], *, results_dir: str | Path = RESULTS_DIR,
                    plot_dir: str | Path | None = None, plots: bool = True) -> int:
    """`report throughput`: print the tables, write the plots; 1 when there is nothing to read.

    Profiles (bench/profile_step.py, bench/profile_attention.py) given among `json_files` or
    lying beside the benchmark files add the "where the time goes" tables and plot.
    """
    try:
        paths = [Path(p) for p in json_files] or newest_gpu_run(results_dir)
        rows = load_benchmarks(p for p in paths if not (_is_profile(p) or _is_op_profile(p)))
        profiles = load_profiles(profile_files(paths))
        op_profiles = load_op_profiles(op_profile_files(paths))
    except (OSError, ValueError) as e:  # no results, a missing file, not our JSON
        print(f"report throughput: {e}", file=sys.stderr)
        return 1
    tabulated = _model_rows(rows) or _attention_rows(rows) or _pool_rows(rows) or _data_rows(rows)
    if not tabulated and not profiles and not op_profiles:
        print(f"no model, attention, pool or data benchmark rows or profiles in {[str(p) for p in paths]}",
              file=sys.stderr)
        return 1
    print(f"<!-- python -m mvit_fast.report throughput {' '.join(str(p) for p in paths)} -->\n")
    if tabulated:
        print(throughput_tables(rows), flush=True)
    if profiles:
        print(time_breakdown_tables(profiles), flush=True)
    if op_profiles:
        print(op_time_tables(op_profiles), flush=True)
    if plots:
        try:
            made = write_plots(rows, plot_dir or paths[0].parent, profiles)
        except ImportError as e:  # the tables above are the report; the plots need the extra
            print(f"no plots: {e}", file=sys.stderr)
            return 0
        for path in made:
            print(f"wrote {path}", file=sys.stderr)  # stdout is the Markdown
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mvit_fast.report")
    sub = parser.add_subparsers(dest="report", required=True)
    flops = sub.add_parser("flops", help="params and fvcore multiply-adds per stage")
    flops.add_argument("--sizes", nargs="+", choices=SIZES, default=list(SIZES))
    flops.add_argument("--dataset", choices=sorted(DATASETS), default="k400")
    flops.add_argument("--json", help="also write the per-stage counts to this JSON file")
    throughput = sub.add_parser(
        "throughput", help="clips/s tables and plots from pytest-benchmark JSON (bench/), and where "
                           "the time goes from the bench/profile_step.py profiles beside them")
    throughput.add_argument("json_files", nargs="*", metavar="JSON",
                            help="pytest-benchmark JSON files (and profile_*.json); default: the "
                                 "newest GPU run under --results-dir")
    throughput.add_argument("--results-dir", default=RESULTS_DIR,
                            help=f"where committed GPU runs live (default: {RESULTS_DIR})")
    throughput.add_argument("--plot-dir", help="where the PNGs go (default: beside the first JSON)")
    throughput.add_argument("--no-plots", action="store_true", help="tables only (no matplotlib needed)")
    args = parser.parse_args(argv)
    if args.report == "throughput":
        return throughput_main(args.json_files, results_dir=args.results_dir, plot_dir=args.plot_dir,
                               plots=not args.no_plots)

    if args.json and (reason := unwritable(args.json)):
        flops.error(f"cannot write {args.json}: {reason}")
    results = {}
    for size in args.sizes:
        rows = count_model(MViT(get_config(size, args.dataset), attention_backend="eager"))
        print(flops_table(size, args.dataset, rows), end="\n\n", flush=True)
        results[size] = [asdict(r) for r in rows]
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
