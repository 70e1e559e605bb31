"""python -m mvit_fast.convert SRC DST: a foreign MViTv2 checkpoint into our format.

Builds the model the checkpoint describes, loads it strictly and prints what was
loaded, renamed, interpolated and left out. `--to slowfast|mmaction2|torchvision`
writes DST in that codebase's keys instead.
"""

from __future__ import annotations

import argparse
import sys

import torch

from .checkpoint import (
    FORMATS,
    atomic_save,
    export_state_dict,
    infer_config,
    load_checkpoint,
    preset_name,
    read_checkpoint,
    save_checkpoint,
    to_native,
    unwritable,
)
from .model import MViT


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mvit_fast.convert", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("src", help="checkpoint to read (.pyth, .pth, .pt)")
    parser.add_argument("dst", help="file to write")
    parser.add_argument("--to", choices=FORMATS, default="mvit_fast", help="key format of DST")
    parser.add_argument("--allow-pickle", action="store_true",
                        help="read SRC with weights_only=False (only for files you trust)")
    args = parser.parse_args(argv)
    if reason := unwritable(args.dst, make_folders=True):
        parser.error(f"cannot write {args.dst}: {reason}")
    try:
        raw, fmt = read_checkpoint(args.src, weights_only=not args.allow_pickle)
        native, _ = to_native(raw, fmt)
        cfg = infer_config(native)
        with torch.device("meta"):  # every tensor comes from the checkpoint: skip the init
            model = MViT(cfg)
        report = load_checkpoint(model, raw, strict=True)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{args.src}: {preset_name(cfg)}, {cfg.num_classes} classes, "
          f"{cfg.num_frames}x{cfg.crop_size}")
    print(report.summary())
    if args.to == "mvit_fast":
        save_checkpoint(args.dst, model, source=str(args.src), source_format=fmt)
    else:
        state = export_state_dict(model.state_dict(), args.to)
        container = {"slowfast": "model_state", "mmaction2": "state_dict"}.get(args.to)
        atomic_save({container: state} if container else state, args.dst)
    print(f"wrote {args.dst} ({args.to})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
