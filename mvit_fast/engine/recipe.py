"""The published MViTv2 training recipes as one flat dataclass, the lr schedule, the optimizer.

Values come from SlowFast's released configs (configs/Kinetics/MVITv2_{S_16x4,B_32x3}.yaml,
configs/SSv2/MVITv2_{S_16x4,B_32x3,L_40x3}.yaml); SlowFast publishes no K400 training config
for L (only `MVITv2_L_40x3_test.yaml`), so K400-L trains with B's solver and augmentation
(repeated augmentation, mixup: that file's single sample and MIXUP.PROB 0 only test) and L's
model, data and test settings. SlowFast's `BASE_LR_SCALE_NUM_SHARDS` multiplies the lr by the number of
machines, each running the config's `TRAIN.BATCH_SIZE` videos: the lr is linear in the
global batch, `lr = base_lr * batch_size / base_lr_batch`, and the default batch is the
released config's one-machine batch. It scales `WARMUP_START_LR` and `COSINE_END_LR` alike
(`assert_and_infer_cfg`), so the whole schedule is linear in the batch.

`synthetic` is this repository's CPU quickstart on the built-in motion dataset (no
published recipe): small clips, no flip (left/right motion is the label), a narrow model.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
from torch import nn

from ..attention.functional import BACKENDS
from ..attention.module import POOL_BACKENDS
from ..config import DATASETS, SIZES, MViTConfig, from_saved, get_config
from ..data.transforms import IMAGENET_MEAN, IMAGENET_STD, K400_MEAN, K400_STD

RECIPE_DATASETS = (*DATASETS, "synthetic")
Triple = tuple[float, float, float]


@dataclass(frozen=True)
class Recipe:
    """Every training / evaluation setting. `batch_size` counts videos per optimizer step over
    all devices; each gives `repeats` clips (repeated augmentation)."""

    size: str = "s"
    dataset: str = "k400"
    # model (None: the size's published value)
    depths: tuple[int, ...] | None = None
    embed_dim: int | None = None
    num_heads: int | None = None
    kv_stride_adaptive: tuple[int, int, int] | None = None  # block 0's k/v pooling stride
    num_classes: int = 400
    drop_path_rate: float | None = None  # None: the config's (per size and dataset)
    head_dropout: float | None = None
    attention_backend: str = "auto"
    pool_backend: str = "auto"  # q/k/v pooling: "auto" (follows attention_backend), "eager", "triton"
    checkpoint_activations: bool = False
    # data
    protocol: str = "k400"  # frame sampling: "k400" (spans num_frames * sampling_rate at 30 fps) or "ssv2"
    num_frames: int = 16
    sampling_rate: int = 4
    crop_size: int = 224
    min_crop_area: float = 0.08  # random resized crop area in [min_crop_area, 1]
    # Instead of the random resized crop: short side resized to a size in this range (drawn
    # inverse-uniformly), then a random crop (SlowFast's TRAIN_JITTER_SCALES; its SSv2 recipes)
    train_short_side: tuple[int, int] | None = None
    repeats: int = 2
    flip: bool = True
    rand_augment: bool = True
    erase_prob: float = 0.25
    mean: Triple = K400_MEAN
    std: Triple = K400_STD
    test_clips: int = 5
    test_crops: int = 1
    test_short_side: int = 256
    # optimization
    epochs: int = 200
    batch_size: int = 16
    batch_per_device: int | None = None  # None: as many as fit the recipe's per-device cap
    max_batch_per_device: int = 8
    optimizer: str = "adamw"
    base_lr: float = 1e-4
    base_lr_batch: int = 16  # base_lr is for this many videos per step
    warmup_epochs: float = 30.0
    warmup_start_lr: float = 1e-6
    end_lr: float = 1e-6
    weight_decay: float = 0.05
    zero_decay_pos_cls: bool = False  # SlowFast MVIT.ZERO_DECAY_POS_CLS (False in every MViTv2 config)
    betas: tuple[float, float] = (0.9, 0.999)
    momentum: float = 0.9
    nesterov: bool = True  # SlowFast's SOLVER.NESTEROV default, used by its SGD
    grad_clip: float = 1.0  # max global L2 norm; 0 disables
    mixup: bool = True  # False: label smoothing only (SlowFast MIXUP.PROB 0)
    mixup_alpha: float = 0.8
    cutmix_alpha: float = 1.0
    mixup_switch_prob: float = 0.5
    label_smoothing: float = 0.1
    # runtime
    precision: str = "auto"  # "auto": bf16 autocast on CUDA, fp32 on CPU; or "bf16", "fp16", "fp32"
    compile: bool | None = None  # None: on for CUDA, off for CPU
    fsdp: bool = False  # FSDP2 (sharded weights, grads, optimizer state) instead of DDP over >1 processes
    eval_every: int = 10  # epochs between single-view validations (0: only the final multi-view test)
    eval_batch_size: int = 4  # videos per device per test batch (each gives test_clips * test_crops views)
    num_workers: int | None = None  # None: this process's share of the CPU cores
    loader: str = "auto"  # "auto" (DALI on CUDA when installed, else PyAV), "dali", "pyav"
    seed: int = 0
    keep_checkpoints: int = 3
    max_bad_steps: int = 5  # consecutive non-finite losses that stop the run
    max_steps: int | None = None  # stop (and save) after this many optimizer steps, as on SIGTERM
    log_every: int = 10  # optimizer steps between CSV rows

    @property
    def lr_scale(self) -> float:
        """How this global batch scales the schedule's lrs: `batch_size / base_lr_batch`."""
        return self.batch_size / self.base_lr_batch

    @property
    def lr(self) -> float:
        """Peak lr at this global batch (linear scaling from `base_lr` per `base_lr_batch`)."""
        return self.base_lr * self.lr_scale

    @property
    def model_dataset(self) -> str:
        """The published architecture this recipe's model starts from: its dataset's, K400's
        for another dataset (then `model_overrides` sets the class count)."""
        return self.dataset if self.dataset in DATASETS else "k400"

    def model_config(self) -> MViTConfig:
        """The resolved model config (`build_model(size, model_dataset, **model_overrides())`)."""
        return get_config(self.size, self.model_dataset, **self.model_overrides())

    def model_overrides(self) -> dict:
        """`build_model` keyword overrides of the published architecture."""
        out = dict(num_frames=self.num_frames, crop_size=self.crop_size, num_classes=self.num_classes)
        for name in ("depths", "embed_dim", "num_heads", "kv_stride_adaptive", "drop_path_rate",
                     "head_dropout"):
            if getattr(self, name) is not None:
                out[name] = getattr(self, name)
        return out

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "lr": self.lr}


# Per (size, dataset): what differs from the dataclass defaults (= S on K400).
# fmt: off
_K400 = {
    "s": dict(),
    "b": dict(num_frames=32, sampling_rate=3, max_batch_per_device=4),
    "l": dict(num_frames=40, sampling_rate=3, crop_size=312, mean=IMAGENET_MEAN,
              std=IMAGENET_STD, test_crops=3, test_short_side=312, checkpoint_activations=True,
              max_batch_per_device=2),  # 2: mixup needs two videos per micro-batch
}
_SSV2_SOLVER = dict(num_classes=174, protocol="ssv2", repeats=1, flip=False, test_clips=1, test_crops=3,
                    train_short_side=(256, 320), optimizer="sgd", weight_decay=1e-4, warmup_epochs=3.0,
                    warmup_start_lr=1e-4, epochs=100, grad_clip=0.0, eval_every=2)
_SSV2 = {
    "s": dict(base_lr=2.5e-3, test_short_side=224),
    "b": dict(num_frames=32, sampling_rate=3, base_lr=1.5e-3, test_short_side=224,
              max_batch_per_device=4),
    "l": dict(num_frames=40, sampling_rate=3, crop_size=312, mean=IMAGENET_MEAN, train_short_side=(356, 446),
              std=IMAGENET_STD, test_short_side=312, checkpoint_activations=True, base_lr=1.25e-3,
              batch_size=8, base_lr_batch=8, warmup_start_lr=1e-6, epochs=40, grad_clip=2.0, mixup=False,
              max_batch_per_device=1),
}
# CPU quickstart: the built-in synthetic dataset at 32x32 (1200 train / 120 val clips of 48
# frames, see run.SYNTHETIC), 8 frames over 32 (rate 4); a 5-block MViTv2 of width 32 (1.2M parameters)
# whose k/v are not pooled (the published (1, 8, 8) stride would pool a 32x32 clip's 8x8 token
# grid to a single token per frame, and motion, the only cue, could not be seen); no flip
# (left/right motion is the label), no RandAugment / erasing / mixup (too few steps to pay off).
_SYNTHETIC_DATA = dict(
    num_classes=6, protocol="k400", num_frames=8, sampling_rate=4, crop_size=32, min_crop_area=0.5,
    repeats=1, flip=False, rand_augment=False, erase_prob=0.0, test_clips=2, test_crops=1,
    test_short_side=32, epochs=18, batch_size=16, max_batch_per_device=16, base_lr=1e-3, base_lr_batch=16,
    warmup_epochs=1.0, end_lr=1e-5, mixup=False, drop_path_rate=0.1, head_dropout=0.0, eval_every=5,
    eval_batch_size=8, log_every=25)
# fmt: on
_QUICKSTART_MODEL = dict(depths=(1, 1, 2, 1), embed_dim=32, kv_stride_adaptive=(1, 1, 1))


def get_recipe(size: str | None = "s", dataset: str = "k400", **overrides) -> Recipe:
    """The published recipe for `size` and `dataset`, with `overrides` (Recipe fields) applied.

    `dataset="synthetic"` gives the CPU quickstart; with `size=None` its model is the
    narrow quickstart MViTv2 (depths (1, 1, 2, 1), width 32, unpooled k/v), with a size the full one.
    """
    if dataset not in RECIPE_DATASETS:
        raise ValueError(f"unknown dataset {dataset!r}: expected one of {RECIPE_DATASETS}")
    if size is None:
        size = "s"
        narrow = dataset == "synthetic"
    else:
        narrow = False
    if size not in SIZES:
        raise ValueError(f"unknown MViTv2 size {size!r}: expected one of {SIZES}")
    if dataset == "ssv2":
        values = {**_SSV2_SOLVER, **_SSV2[size]}
    elif dataset == "k400":
        values = dict(_K400[size])
    else:  # synthetic: the size's architecture and clip length, quickstart solver and clips
        values = {
            **{k: v for k, v in _K400[size].items() if k in ("checkpoint_activations",)},
            **_SYNTHETIC_DATA,
            **(_QUICKSTART_MODEL if narrow else {}),
        }
    _check_names(overrides)
    recipe = Recipe(size=size, dataset=dataset, **{**values, **overrides})
    check_recipe(recipe)
    return recipe


def _check_names(overrides: dict) -> None:
    fields = {f.name for f in dataclasses.fields(Recipe)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ValueError(f"unknown recipe setting(s) {unknown}: expected some of {sorted(fields)}")


# What a command resuming or testing a saved run may change: how it runs and how it is
# tested, never the model, the optimizer, the data order or the updates (the checkpoint's).
RUN_MAY_CHANGE = (
    "attention_backend", "pool_backend", "checkpoint_activations", "batch_per_device",
    "max_batch_per_device", "precision", "compile", "fsdp", "eval_every", "eval_batch_size",
    "test_clips", "test_crops", "test_short_side", "num_workers", "loader", "keep_checkpoints",
    "max_bad_steps", "max_steps", "log_every",
)


def _flag(name: str, value) -> str:
    """The command-line form of a setting: `--depths 1 2 1 1`, `--no-mixup`."""
    flag = "--" + name.replace("_", "-")
    if isinstance(value, bool):
        return flag if value else "--no-" + flag[2:]
    return f"{flag} {' '.join(map(str, value)) if isinstance(value, tuple) else value}"


def saved_recipe(saved: dict, where: str, size: str | None = None, dataset: str | None = None,
                 **overrides) -> Recipe:
    """The recipe a saved run resumes or is tested with: `saved` (a checkpoint's `recipe`, without its
    `max_steps`), with the `RUN_MAY_CHANGE` settings among `overrides` applied. Any other
    setting given (size and dataset included) must equal the saved one: ValueError naming
    each that differs (`where` starts the message)."""
    _check_names(overrides)
    run = from_saved(Recipe, saved)  # to_dict wrote tuples as lists (and the derived lr)
    asked = {k: tuple(v) if isinstance(v, list) else v
             for k, v in dict(size=size, dataset=dataset, **overrides).items() if v is not None}
    differ = [k for k, v in asked.items() if k not in RUN_MAY_CHANGE and v != getattr(run, k)]
    if differ:
        raise ValueError(
            f"{where}: the run was trained with "
            + ", ".join(_flag(k, getattr(run, k)) for k in differ)
            + ", this command asks for "
            + ", ".join(_flag(k, asked[k]) for k in differ)
            + ". A saved run keeps its recipe; a command may change only "
            + " ".join(f"--{k.replace('_', '-')}" for k in RUN_MAY_CHANGE)
            + ". Leave the others out; a new run can start from its weights with --checkpoint."
        )
    # max_steps stops one command (like SIGTERM): the run it stopped goes on to its end
    changes = {"max_steps": None, **{k: v for k, v in asked.items() if k in RUN_MAY_CHANGE}}
    run = dataclasses.replace(run, **changes)
    check_recipe(run)
    return run


# the values each setting of a fixed set may take (train.py's flags offer them as choices)
CHOICES = dict(
    protocol=("k400", "ssv2"),
    optimizer=("adamw", "sgd"),
    precision=("auto", "bf16", "fp16", "fp32"),
    loader=("auto", "dali", "pyav"),
    attention_backend=("auto", *BACKENDS),
    pool_backend=POOL_BACKENDS,
)


def check_recipe(r: Recipe) -> None:
    """ValueError naming the setting when a value is outside what the engine supports."""
    for name, allowed in CHOICES.items():
        if getattr(r, name) not in allowed:
            raise ValueError(f"{name} must be one of {allowed}, got {getattr(r, name)!r}")
    positive = (
        "epochs",
        "batch_size",
        "num_frames",
        "sampling_rate",
        "crop_size",
        "repeats",
        "test_clips",
        "eval_batch_size",
        "base_lr_batch",
        "max_batch_per_device",
        "num_classes",
        "keep_checkpoints",
        "max_bad_steps",
        "log_every",
        "embed_dim",  # None (the size's) is fine for these
        "num_heads",
        "max_steps",
        "batch_per_device",
    )
    for name in positive:
        if getattr(r, name) is not None and getattr(r, name) < 1:
            raise ValueError(f"{name} must be >= 1, got {getattr(r, name)}")
    fractions = dict(  # name -> whether 1 itself is allowed; None (the config's) is fine
        drop_path_rate=False, head_dropout=False, label_smoothing=False, momentum=False,
        erase_prob=True, mixup_switch_prob=True,
    )
    for name, one_ok in fractions.items():
        value = getattr(r, name)
        if value is not None and not (0 <= value <= 1 if one_ok else 0 <= value < 1):
            raise ValueError(f"{name} must be in [0, 1{']' if one_ok else ')'}, got {value}")
    if not 0 < r.min_crop_area <= 1:
        raise ValueError(f"min_crop_area must be in (0, 1], got {r.min_crop_area}")
    if not r.base_lr > 0:
        raise ValueError(f"base_lr must be > 0, got {r.base_lr}")
    for name in ("warmup_start_lr", "end_lr", "weight_decay", "grad_clip", "mixup_alpha", "cutmix_alpha",
                 "eval_every"):
        if getattr(r, name) < 0:
            raise ValueError(f"{name} must be >= 0, got {getattr(r, name)}")
    if len(r.betas) != 2 or not all(0 <= b < 1 for b in r.betas):
        raise ValueError(f"betas must be two values in [0, 1), got {r.betas}")
    if r.num_workers is not None and r.num_workers < 0:
        raise ValueError(f"num_workers must be >= 0, got {r.num_workers}")
    strides = r.kv_stride_adaptive
    if strides is not None and (len(strides) != 3 or min(strides) < 1):
        raise ValueError(f"kv_stride_adaptive must be three strides >= 1 (T, H, W), got {strides}")
    if r.test_crops not in (1, 3):
        raise ValueError(f"test_crops must be 1 or 3, got {r.test_crops}")
    if not 0 <= r.warmup_epochs < r.epochs:
        raise ValueError(f"warmup_epochs must be in [0, epochs={r.epochs}), got {r.warmup_epochs}")
    jitter = r.train_short_side
    if jitter is not None and not (len(jitter) == 2 and r.crop_size <= jitter[0] <= jitter[1]):
        raise ValueError(f"train_short_side must be two sizes LOW HIGH with crop_size {r.crop_size} <= LOW "
                         f"<= HIGH, got {jitter}")
    if r.test_short_side < r.crop_size:
        raise ValueError(f"test_short_side {r.test_short_side} is smaller than crop_size {r.crop_size}")
    if r.fsdp and r.precision == "fp16":
        # GradScaler's inf check would see only this rank's gradient shard: ranks could disagree
        raise ValueError("fsdp supports precision bf16 or fp32, not fp16 (its loss scaling is per rank)")


def lr_at(epoch: float, r: Recipe) -> float:
    """SlowFast's per-iteration lr at fractional `epoch`: linear warmup from `warmup_start_lr`
    to the cosine's value at the warmup's end, then cosine from `lr` to `end_lr` (cosine after
    warmup); the start and end lrs scaled with the batch as the peak is (`lr_scale`)."""
    start_lr, end_lr = r.warmup_start_lr * r.lr_scale, r.end_lr * r.lr_scale

    def cosine(e: float) -> float:
        t = (e - r.warmup_epochs) / (r.epochs - r.warmup_epochs)
        return end_lr + (r.lr - end_lr) * (math.cos(math.pi * t) + 1) / 2

    if epoch < r.warmup_epochs:
        return start_lr + (cosine(r.warmup_epochs) - start_lr) * epoch / r.warmup_epochs
    return cosine(epoch)


def param_groups(model: nn.Module, r: Recipe) -> list[dict]:
    """Two groups, as SlowFast's `get_param_groups` with ZERO_WD_1D_PARAM: no weight decay on
    1-D parameters and biases (LayerNorm, all biases), nor, with `zero_decay_pos_cls`, on the
    cls token and rel-pos tables; weight decay on everything else."""
    no_decay_names = ("cls_token", "rel_pos_t", "rel_pos_h", "rel_pos_w") if r.zero_decay_pos_cls else ()
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim == 1 or name.endswith(".bias") or name.split(".")[-1] in no_decay_names:
            no_decay.append(p)
        else:
            decay.append(p)
    return [
        {"params": decay, "weight_decay": r.weight_decay, "name": "decay"},
        {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"},
    ]


def build_optimizer(model: nn.Module, r: Recipe) -> torch.optim.Optimizer:
    """AdamW (K400) or SGD with Nesterov momentum (SSv2); the lr is set every step from `lr_at`."""
    groups = param_groups(model, r)
    if r.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=lr_at(0.0, r), betas=r.betas)
    return torch.optim.SGD(groups, lr=lr_at(0.0, r), momentum=r.momentum, nesterov=r.nesterov)
