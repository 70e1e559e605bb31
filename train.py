"""Train or evaluate MViTv2: `python train.py --help`.

    python train.py                                   # CPU quickstart on the built-in synthetic dataset
    python train.py --size s --dataset k400 --data-root DIR --train-list train.csv --val-list val.csv
    torchrun --nproc-per-node 8 train.py --size b --dataset k400 ...
    python train.py --eval --size s --dataset k400 --checkpoint MViTv2_S_16x4_k400_f302660347.pyth \\
        --data-root DIR --val-list val.csv

The argparse flags map one to one onto the keyword-only `mvit_fast.engine.main(...)`.
"""

import sys

from mvit_fast.engine.run import cli, main, parse_args

__all__ = ["main", "parse_args"]

if __name__ == "__main__":
    sys.exit(cli())
