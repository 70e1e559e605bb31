"""Command line: ``python -m mvit_fast.data scan LIST --root DIR`` and ``... synthetic [--root DIR]``."""

from __future__ import annotations

import argparse
import os
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mvit_fast.data")
    commands = parser.add_subparsers(dest="command", required=True)
    scan = commands.add_parser("scan", help="pre-flight check of every file in a list")
    scan.add_argument("list", help="annotation list (path label, or video_id num_frames label)")
    scan.add_argument("--root", default="", help="folder the list's paths are relative to")
    scan.add_argument("--min-frames", type=int, default=1,
                      help="fewer frames count as too short (K400 16x4 at 30 fps: 64)")
    scan.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)))
    scan.add_argument("--decode-all", action="store_true",
                      help="decode every frame, not only the first: finds data corrupted mid-stream")
    scan.add_argument("--bad-out", default=None, help="where to write bad paths (default LIST.bad.txt)")
    scan.add_argument("--frames-out", default=None, help="write 'path num_frames label' for the good files")
    synth = commands.add_parser("synthetic", help="generate the built-in synthetic dataset")
    synth.add_argument(
        "--root", default=None, help="output folder (default under ~/.cache/mvit_fast/synthetic)"
    )
    synth.add_argument("--codec", default="h264", choices=["h264", "vp9"])
    synth.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    if args.command == "scan":
        from ..checkpoint import unwritable
        from .lists import ListFormatError
        from .scan import main as scan_main

        if not os.path.isfile(args.list):
            scan.error(f"{args.list}: no such list file")
        if args.root and not os.path.isdir(args.root):
            scan.error(f"--root {args.root}: no such folder")
        if args.min_frames < 1 or args.workers < 1:
            scan.error("--min-frames and --workers must be >= 1")
        for out in (args.bad_out or f"{args.list}.bad.txt", args.frames_out):
            if out and (reason := unwritable(out)):
                scan.error(f"cannot write {out}: {reason} (see --bad-out)")
        try:
            result = scan_main(
                args.list,
                root=args.root,
                min_frames=args.min_frames,
                workers=args.workers,
                decode_all=args.decode_all,
                bad_out=args.bad_out,
                frames_out=args.frames_out,
            )
        except ListFormatError as e:
            scan.error(str(e))
        return 1 if result.bad else 0
    from .synthetic import make_synthetic

    try:
        dataset = make_synthetic(args.root, codec=args.codec, seed=args.seed)
    except ValueError as e:
        synth.error(str(e))
    print(f"train: {dataset.train_list}\nval: {dataset.val_list}\nclasses: {dataset.label_map}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
