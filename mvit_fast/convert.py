"""python -m mvit_fast.convert SRC DST: a foreign MViTv2 checkpoint into our format.

Builds the model the checkpoint describes, loads it and prints what was loaded, renamed,
interpolated and left out (checkpoint tensors the model has no place for). `--to
slowfast|mmaction2|torchvision` writes DST in that codebase's keys instead.

The architecture comes from the weights (stages, widths, heads, classes, clip size), the
settings they do not show (pooling strides, patch stride, drop path) are the published
MViTv2's; a checkpoint of ours carries its config (and a run's recipe), which are kept.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping
from pathlib import Path

import torch

from .checkpoint import (
    FORMATS,
    atomic_save,
    export_state_dict,
    infer_config,
    load_checkpoint,
    load_file,
    not_a_checkpoint_file,
    preset_name,
    read_checkpoint,
    save_checkpoint,
    to_native,
    unwritable,
)
from .config import MViTConfig, from_saved
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
        src = args.src
        if problem := not_a_checkpoint_file(src):
            raise FileNotFoundError(f"checkpoint {src}: {problem}")
        # mapped, not read: loading into the model below makes the only copy in memory
        container = load_file(Path(src), weights_only=not args.allow_pickle, mmap=True)
        raw, fmt = read_checkpoint(container)
        native = to_native(raw, fmt)[0]
        saved_cfg = _stored_config(container) if fmt == "mvit_fast" else None
        cfg = saved_cfg or infer_config(native)
        with torch.device("meta"):  # every tensor comes from the checkpoint: skip the init
            model = MViT(cfg)
        if missing := sorted(set(model.state_dict()) - set(native)):
            raise ValueError(f"{src} lacks tensors of the model it describes: {missing[:8]}"
                             + (f" and {len(missing) - 8} more" if len(missing) > 8 else ""))
        report = load_checkpoint(model, container, strict=False)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{src}: {preset_name(cfg)}, {cfg.num_classes} classes, "
          f"{cfg.num_frames}x{cfg.crop_size}"
          + (" (its saved config)" if saved_cfg else ""))
    print(report.summary())
    if args.to == "mvit_fast":
        recipe = {"recipe": container["recipe"]} if container.get("recipe") else {}
        save_checkpoint(args.dst, model, source=str(src), source_format=fmt, **recipe)
    else:
        state = export_state_dict(model.state_dict(), args.to)
        wrapper = {"slowfast": "model_state", "mmaction2": "state_dict"}.get(args.to)
        atomic_save({wrapper: state} if wrapper else state, args.dst)
    print(f"wrote {args.dst} ({args.to})")
    return 0


def _stored_config(container: Mapping) -> MViTConfig | None:
    """The config a checkpoint of ours was saved with, or None (absent, or from another version)."""
    saved = container.get("config")
    if not isinstance(saved, Mapping):
        return None
    try:
        return from_saved(MViTConfig, saved)
    except (TypeError, ValueError):
        return None


if __name__ == "__main__":
    sys.exit(main())
