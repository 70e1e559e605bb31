"""Reports: `python -m mvit_fast.report flops` prints params and fvcore multiply-adds.

fvcore's "FLOPs" are multiply-adds (what the MViTv2 results table calls FLOPs).
The count runs block by block on a real clip-sized input (fvcore traces with
torch.jit, which cannot run on the meta device); one block at a time keeps the
materialized attention of the eager backend within a CPU's memory even for L.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
from torch import Tensor, nn

from .config import DATASETS, SIZES, block_specs, get_config
from .model import MViT

# The MViTv2 results table (seed document): GFLOPs (multiply-adds) and params (M), K400.
PUBLISHED = {"s": (64.0, 34.5), "b": (225.0, 51.2), "l": (2828.0, 213.0)}

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
    """Params and fvcore multiply-adds per stage of `model` at its config's input size.

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
        clip = torch.zeros(batch, *cfg.input_shape)
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
    gmacs_pub, params_pub = PUBLISHED[size]
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mvit_fast.report")
    sub = parser.add_subparsers(dest="report", required=True)
    flops = sub.add_parser("flops", help="params and fvcore multiply-adds per stage")
    flops.add_argument("--sizes", nargs="+", choices=SIZES, default=list(SIZES))
    flops.add_argument("--dataset", choices=sorted(DATASETS), default="k400")
    flops.add_argument("--json", help="also write the per-stage counts to this JSON file")
    args = parser.parse_args(argv)

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
