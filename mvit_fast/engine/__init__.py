"""Training and evaluation engine: `python train.py` (see `run.main`).

recipe.py    the published recipes (`Recipe`, `get_recipe`), lr schedule, optimizer
trainer.py   the training loop (DDP or FSDP, accumulation, autocast, exact resume, clean stops)
evaluate.py  multi-view test: softmax summed per video, top-1/top-5, per-class accuracy
dist.py      torchrun process group helpers
fsdp.py      --fsdp: FSDP2 sharding, full-state checkpoints, an unsharded copy for evaluation
run.py       `main(...)` and the command line
"""

from .evaluate import EvalResult, aggregate_views, evaluate, per_class_accuracy, topk_hits
from .recipe import Recipe, build_optimizer, get_recipe, lr_at, param_groups
from .run import build_parser, main, parse_args
from .trainer import TrainingDiverged, soft_cross_entropy, train

__all__ = [
    "EvalResult",
    "Recipe",
    "TrainingDiverged",
    "aggregate_views",
    "build_optimizer",
    "build_parser",
    "evaluate",
    "get_recipe",
    "lr_at",
    "main",
    "param_groups",
    "parse_args",
    "per_class_accuracy",
    "soft_cross_entropy",
    "topk_hits",
    "train",
]
