"""The training loop: bf16 autocast, DDP or FSDP, gradient accumulation, exact resume, clean stops.

One optimizer step = `accum` micro-batches of `batch_per_device` videos on every rank, so
the recipe's global batch is reached on any number of devices. The lr is a pure function of
the optimizer step (`lr_at`), and every random draw of a step (drop path, dropout, mixup)
is seeded from (seed, rank, step, micro-batch); the loaders' order and augmentation are
functions of (seed, epoch, list index). So a checkpoint only needs the weights, the
optimizer (and grad scaler) state and the step: resuming replays the same steps bit for bit
(with either loader: DALI's graph draws nothing, its augmentation comes from the same draws).

Per optimizer step there is one host sync: the loss, the grad norm and the stop flag
(SIGTERM/SIGINT, `max_steps`) are all-reduced together, so every rank skips a non-finite
step together and stops at the same step.
"""

from __future__ import annotations

import csv
import math
import signal
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.distributed.tensor import DTensor

from ..checkpoint import load_file, save_checkpoint
from ..config import from_saved
from ..data import MixupCutmix
from ..data.mixup import smooth_one_hot
from ..data.report import DataReport
from .dist import Dist, all_gather_objects, all_reduce_sum, barrier
from .fsdp import Sharded
from .recipe import Recipe, build_optimizer, lr_at


class TrainingDiverged(RuntimeError):
    """Too many non-finite losses in a row to go on."""


@dataclass
class Position:
    """Where training is: `step` optimizer steps done, the first `step - epoch * steps_per_epoch`
    of them in epoch `epoch`."""

    epoch: int = 0
    step: int = 0
    best_top1: float = -1.0


def soft_cross_entropy(logits: Tensor, target: Tensor) -> Tensor:
    """Mean over the batch of -sum(target * log_softmax(logits)) (SlowFast's soft_cross_entropy)."""
    return torch.sum(-target * F.log_softmax(logits.float(), dim=-1), dim=-1).mean()


def step_seed(seed: int, rank: int, step: int, micro: int) -> int:
    return int(np.random.SeedSequence([seed, rank, step, micro]).generate_state(1)[0])


def mixup_rng(seed: int, step: int) -> np.random.Generator:
    """Mixup/CutMix's draws (mixup or cutmix, lambda, box) for optimizer step `step`: the same on
    every device and micro-batch, as in SlowFast, whose processes share one numpy seed; so
    they do not depend on how the global batch is split."""
    return np.random.default_rng([seed, step])


def amp_dtype(recipe: Recipe, device: torch.device) -> torch.dtype | None:
    """Autocast dtype (None: fp32). "auto" is bf16 on CUDA and fp32 on CPU."""
    precision = recipe.precision
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" else "fp32"
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}[precision]


def accumulation(recipe: Recipe, world_size: int) -> tuple[int, int]:
    """(videos per device per micro-batch, micro-batches per optimizer step) for the global batch."""
    if recipe.batch_size % world_size:
        raise ValueError(
            f"batch_size {recipe.batch_size} (videos per step, all devices) is not divisible by "
            f"the {world_size} processes"
        )
    per_rank = recipe.batch_size // world_size
    per_device = recipe.batch_per_device
    if per_device is None:
        per_device = min(per_rank, recipe.max_batch_per_device)
        while per_rank % per_device:
            per_device -= 1
    if per_device < 1 or per_rank % per_device:
        raise ValueError(
            f"batch_per_device {per_device} must divide the {per_rank} videos per process "
            f"(batch_size {recipe.batch_size} over {world_size} processes)"
        )
    if recipe.mixup and per_device < 2:
        raise ValueError(
            f"mixup mixes each video with another one of its micro-batch: batch_per_device {per_device} "
            f"(batch_size {recipe.batch_size} over {world_size} processes) must be 2 or more: raise "
            f"--batch-size (the lr scales with it) or --batch-per-device, or pass --no-mixup"
        )
    return per_device, per_rank // per_device


def compiled(model: nn.Module, forward: nn.Module, recipe: Recipe, device: torch.device,
             dtype: torch.dtype | None, batch_clips: int, *, train: bool) -> nn.Module:
    """`forward` (`model` or a wrapper of it) under torch.compile when the recipe compiles
    (default: on CUDA), else as it is. A compiled model cannot time its "auto" attention
    backends, so they are measured first, eagerly, on a batch of `batch_clips` clips in the
    mode (`train`) and autocast dtype the compiled model will run in."""
    if not (recipe.compile if recipe.compile is not None else device.type == "cuda"):
        return forward
    if device.type == "cuda" and recipe.attention_backend == "auto":
        from ..attention import autotune

        size = recipe.crop_size
        clip = torch.randn(batch_clips, 3, recipe.num_frames, size, size, device=device)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            autotune.tune(model, clip, train=train)
    return torch.compile(forward)


def checkpoint_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def latest_checkpoint(path: str | Path) -> Path:
    """`path` itself when it is a file, else the newest step checkpoint of the run dir `path`."""
    path = Path(path)
    if path.is_file():
        return path
    found = sorted(checkpoint_dir(path).glob("step_*.pt"))
    if not found:
        raise FileNotFoundError(f"--resume {path}: no checkpoint file there nor under {checkpoint_dir(path)}")
    return found[-1]


def _unwrap(model: nn.Module) -> nn.Module:
    model = getattr(model, "_orig_mod", model)  # torch.compile
    return getattr(model, "module", model)  # DDP


class _StopSignal:
    """SIGTERM / SIGINT set a flag that the loop acts on after the current step (save, then exit)."""

    def __init__(self) -> None:
        self.signum: int | None = None

    @contextmanager
    def installed(self):
        previous = {s: signal.signal(s, self._handle) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            yield self
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)

    def _handle(self, signum, frame) -> None:
        if self.signum is not None and signum == signal.SIGINT:  # a second Ctrl-C: stop now
            raise KeyboardInterrupt
        self.signum = signum


class CsvLog:
    """Append rows to a CSV file with a fixed header (written when the file is new)."""

    def __init__(self, path: Path, fields: list[str], enabled: bool) -> None:
        self.path, self.fields, self.enabled = path, fields, enabled
        if enabled and not path.exists():
            with open(path, "w", newline="") as f:
                csv.writer(f).writerow(fields)

    def drop_after(self, step: int) -> None:
        """Remove the rows past optimizer step `step`: a run resumed from an older checkpoint
        (after a hard kill) logs those steps again."""
        if not self.enabled:
            return
        with open(self.path, newline="") as f:
            rows = list(csv.reader(f))
        kept = [row for row in rows[1:] if int(row[self.fields.index("step")]) <= step]
        if len(kept) < len(rows) - 1:
            tmp = self.path.with_suffix(".tmp")
            with open(tmp, "w", newline="") as f:
                csv.writer(f).writerows([rows[0], *kept])
            tmp.replace(self.path)

    def write(self, **row) -> None:
        if self.enabled:
            with open(self.path, "a", newline="") as f:
                csv.writer(f).writerow([_fmt(row.get(k, "")) for k in self.fields])


def _fmt(v) -> str:
    return f"{v:.6g}" if isinstance(v, float) else str(v)


def record_data_issues(run_dir: Path, split: str, epoch: int | None, report: DataReport, d: Dist) -> None:
    """Append every rank's bad-video issues of one pass (file, kind, detail) to
    `run_dir/data_issues.csv` and say so; every rank calls it, rank 0 writes. `epoch` is the
    training epoch the pass belongs to, counted from 1 as in val.csv and the log; None for
    the final test."""
    from tqdm import tqdm

    per_rank = all_gather_objects(report.issues)
    if not d.is_main or not any(per_rank):
        return
    path = run_dir / "data_issues.csv"
    log = CsvLog(path, ["split", "epoch", "rank", "kind", "path", "detail"], True)
    for rank, issues in enumerate(per_rank):
        for issue in issues:
            log.write(split=split, epoch="" if epoch is None else epoch, rank=rank, kind=issue.kind,
                      path=issue.path, detail=issue.detail)
    events = [issue for issues in per_rank for issue in issues]
    when = split if epoch is None else f"{split} epoch {epoch}"
    tqdm.write(f"{when}: {len(events)} bad-video events in {len({i.path for i in events})} "
               f"files (replaced or padded), listed in {path}")


def _tensorboard(run_dir: Path, enabled: bool):
    if not enabled:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # optional: only when the tensorboard package is installed
        print("TensorBoard logging is off (pip install tensorboard); metrics go to train.csv and "
              "val.csv", flush=True)
        return None
    return SummaryWriter(str(run_dir / "tensorboard"))


def save_training_state(
    path: Path,
    model: nn.Module,
    optimizer,
    scaler,
    pos: Position,
    recipe: Recipe,
    steps_per_epoch: int,
    d: Dist,
    sharded: Sharded | None = None,
) -> None:
    """Rank 0 writes the checkpoint atomically; every rank waits for it (and, under FSDP,
    takes part in gathering the full state)."""
    if sharded is not None:
        plain, optimizer_state = sharded.full(rank0_cpu=True), sharded.optimizer_state(optimizer)
    else:
        plain, optimizer_state = _unwrap(model), optimizer.state_dict() if d.is_main else {}
    if d.is_main:
        save_checkpoint(
            path,
            plain,
            kind="train",
            optimizer=optimizer_state,
            scaler=scaler.state_dict() if scaler is not None else None,
            epoch=pos.epoch,
            step=pos.step,
            best_top1=pos.best_top1,
            recipe=recipe.to_dict(),
            steps_per_epoch=steps_per_epoch,
            world_size=d.world_size,
        )
    if sharded is not None:
        sharded.release()
    barrier()


def read_training_state(path: Path, mmap: bool = False) -> dict:
    """A checkpoint written by `save_training_state`; ValueError (CheckpointReadError for an
    unreadable file) when `path` is anything else. `mmap` leaves the tensors on disk until used."""
    state = load_file(path, weights_only=True, mmap=mmap)
    if not isinstance(state, dict) or state.get("kind") != "train":
        raise ValueError(
            f"--resume {path}: not a training checkpoint of this engine (no optimizer state); "
            "to start from its weights use --checkpoint"
        )
    return state


def load_training_state(
    path: Path,
    model: nn.Module,
    optimizer,
    scaler,
    recipe: Recipe,
    steps_per_epoch: int,
    sharded: Sharded | None = None,
) -> Position:
    state = read_training_state(path)
    saved = state["recipe"]
    if saved["batch_size"] != recipe.batch_size or state["steps_per_epoch"] != steps_per_epoch:
        raise ValueError(
            f"--resume {path}: saved with batch_size {saved['batch_size']} "
            f"({state['steps_per_epoch']} steps per epoch), this run has batch_size "
            f"{recipe.batch_size} ({steps_per_epoch}): the data order would not continue"
        )
    try:
        if sharded is not None:
            sharded.load(state["model"], state["optimizer"], optimizer)
        else:
            _unwrap(model).load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
    except (RuntimeError, KeyError, ValueError) as e:  # a recipe that does not match the run's
        raise ValueError(f"--resume {path}: its state does not fit this model and optimizer: "
                         f"{str(e).strip().splitlines()[0]}") from e
    if scaler is not None and state.get("scaler") is not None:
        scaler.load_state_dict(state["scaler"])
    return Position(state["epoch"], state["step"], state["best_top1"])


def _prune(run_dir: Path, keep: int) -> None:
    for old in sorted(checkpoint_dir(run_dir).glob("step_*.pt"))[:-keep] if keep > 0 else []:
        old.unlink(missing_ok=True)


@dataclass
class TrainResult:
    status: str  # "finished", "stopped" (signal or max_steps)
    position: Position
    checkpoint: Path | None
    steps: int  # optimizer steps run by this process
    skipped_steps: int
    first_step_s: float
    clips_per_s: float  # after the first step
    data_s_per_step: float
    compute_s_per_step: float
    wall_s: float
    model: nn.Module  # the trained model for evaluation: under FSDP an unsharded copy


def train(
    model: nn.Module,
    recipe: Recipe,
    d: Dist,
    train_loader,
    *,
    run_dir: Path,
    resume: Path | None = None,
    validate=None,
    progress: bool = True,
) -> TrainResult:
    """Train `model` (on `d.device`) by `recipe` over `train_loader` (this rank's shard).

    `validate(model, epoch) -> top-1 %` (epoch counted from 1) runs every `recipe.eval_every`
    epochs and after the last; the best score's checkpoint is kept as `best.pt`. Bad videos
    of each epoch go to `run_dir/data_issues.csv`. Checkpoints: `run_dir/checkpoints/step_*.pt`
    every epoch and on a stop, the last `keep_checkpoints` kept.
    """
    from tqdm import tqdm

    start = time.perf_counter()
    device = d.device
    per_device, accum = accumulation(recipe, d.world_size)
    steps_per_epoch = len(train_loader) // accum
    if steps_per_epoch == 0:
        raise ValueError(
            f"the train list gives {len(train_loader)} batches of {per_device} videos per process: "
            f"fewer than one optimizer step ({accum} batches); lower --batch-size"
        )
    total_steps = recipe.epochs * steps_per_epoch
    sharded = None
    if recipe.fsdp and d.enabled:
        # before the optimizer, which must hold the sharded parameters; compiled below as a whole
        sharded = Sharded(model, d)
    elif recipe.fsdp and d.is_main:
        print("--fsdp: a single process has nothing to shard; training the model unwrapped", flush=True)
    optimizer = build_optimizer(model, recipe)
    dtype = amp_dtype(recipe, device)
    scaler = torch.amp.GradScaler(device.type) if dtype == torch.float16 else None
    pos = Position()
    if resume is not None:
        pos = load_training_state(resume, model, optimizer, scaler, recipe, steps_per_epoch, sharded)
        saved = read_training_state(resume, mmap=True)
        saved_world = saved.get("world_size", d.world_size)
        saved_split = accumulation(from_saved(Recipe, saved["recipe"]), saved_world)
        if (saved_world, saved_split) != (d.world_size, (per_device, accum)) and d.is_main:
            print(f"--resume {resume}: saved by {saved_world} process(es) of {saved_split[1]} "
                  f"micro-batch(es) of {saved_split[0]} videos, resumed by {d.world_size} of {accum} "
                  f"of {per_device}: "
                  "training goes on from the same step, but the steps are not the ones an "
                  "uninterrupted run would take (mixup pairs the videos of other micro-batches; drop "
                  "path and dropout draw per micro-batch)", flush=True)
    ddp = None
    if d.enabled and sharded is None:
        ddp = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    forward = compiled(model, ddp if ddp is not None else model, recipe, device, dtype,
                       per_device * recipe.repeats, train=True)
    mixup = MixupCutmix(
        recipe.num_classes,
        mixup_alpha=recipe.mixup_alpha,
        cutmix_alpha=recipe.cutmix_alpha,
        switch_prob=recipe.mixup_switch_prob,
        label_smoothing=recipe.label_smoothing,
        views=recipe.repeats,
    )
    autocast = torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()
    clips_per_step = recipe.batch_size * recipe.repeats
    max_norm = recipe.grad_clip if recipe.grad_clip > 0 else math.inf

    log = CsvLog(
        run_dir / "train.csv",
        ["step", "epoch", "loss", "lr", "grad_norm", "clips_per_s", "data_s", "compute_s", "skipped"],
        d.is_main,
    )
    val_log = CsvLog(run_dir / "val.csv", ["step", "epoch", "top1"], d.is_main)
    for csv_log in (log, val_log):
        csv_log.drop_after(pos.step)
    board = _tensorboard(run_dir, d.is_main)
    bar = tqdm(
        total=total_steps,
        initial=pos.step,
        desc="train",
        disable=not (progress and d.is_main),
        dynamic_ncols=True,
        smoothing=0.05,
    )
    stop, bad_in_row, skipped, steps_run = _StopSignal(), 0, 0, 0
    first_step_s, timed = math.nan, dict(data=0.0, compute=0.0, steps=0)
    window = dict(loss=0.0, gn=0.0, data=0.0, compute=0.0, n=0, steps=0)
    status, last_ckpt = "finished", resume
    model.train()
    with stop.installed():
        for epoch in range(pos.epoch, recipe.epochs):
            done_in_epoch = pos.step - epoch * steps_per_epoch
            train_loader.set_epoch(epoch, start_batch=done_in_epoch * accum)  # resume mid-epoch
            batches: Iterator = iter(train_loader)
            for _ in range(done_in_epoch, steps_per_epoch):
                lr = lr_at(pos.step / steps_per_epoch, recipe)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                t_step = time.perf_counter()
                data_s, loss_sum = 0.0, torch.zeros((), device=device)
                for micro in range(accum):
                    t0 = time.perf_counter()
                    batch = next(batches)
                    clips = batch.clips.to(device, non_blocking=True)
                    labels = batch.labels.to(device, non_blocking=True)
                    data_s += time.perf_counter() - t0
                    torch.manual_seed(step_seed(recipe.seed, d.rank, pos.step, micro))  # drop path, dropout
                    if recipe.mixup:
                        mixup.rng = mixup_rng(recipe.seed, pos.step)
                        clips, target = mixup(clips, labels)
                    else:
                        target = smooth_one_hot(labels, recipe.num_classes, recipe.label_smoothing)
                    last = micro == accum - 1
                    if sharded is not None:  # as DDP's no_sync: reduce-scatter once, after the last
                        model.set_requires_gradient_sync(last)
                    with ddp.no_sync() if ddp is not None and not last else nullcontext(), autocast:
                        loss = soft_cross_entropy(forward(clips), target)
                    scaled = loss / accum
                    (scaler.scale(scaled) if scaler is not None else scaled).backward()
                    loss_sum += loss.detach()
                if scaler is not None:
                    scaler.unscale_(optimizer)
                grad_norm = nn.utils.clip_grad_norm_(model.parameters(), max_norm)
                if isinstance(grad_norm, DTensor):  # FSDP: the global norm, replicated on every rank
                    grad_norm = grad_norm.full_tensor()
                wants_stop = stop.signum is not None or (
                    recipe.max_steps is not None and pos.step + 1 >= recipe.max_steps
                )
                stats = torch.stack(
                    [
                        loss_sum / accum,
                        grad_norm.float().to(device),
                        torch.tensor(float(wants_stop), device=device),
                    ]
                )
                loss_value, norm_value, stop_votes = (all_reduce_sum(stats) / d.world_size).tolist()
                bad = not math.isfinite(loss_value) or (scaler is None and not math.isfinite(norm_value))
                if bad:
                    bad_in_row, skipped = bad_in_row + 1, skipped + 1
                    if d.is_main:
                        tqdm.write(
                            f"step {pos.step + 1}: non-finite loss {loss_value} (grad norm {norm_value}), "
                            f"step skipped ({bad_in_row} in a row, {skipped} in all)"
                        )
                    if bad_in_row >= recipe.max_bad_steps:
                        raise TrainingDiverged(
                            f"{bad_in_row} non-finite losses in a row at step {pos.step + 1} "
                            f"(epoch {epoch + 1}, lr {lr:.3g}): training diverged. Lower the lr "
                            f"(--base-lr), check the data, or resume from the last checkpoint "
                            f"({last_ckpt or 'none saved yet'})."
                        )
                    if scaler is not None:
                        scaler.update()
                else:
                    bad_in_row = 0
                    if scaler is not None:
                        scaler.step(optimizer)
                        scaler.update()
                    else:
                        optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                pos.step += 1
                steps_run += 1

                step_s = time.perf_counter() - t_step
                if steps_run == 1:
                    first_step_s = step_s
                    if d.is_main:
                        tqdm.write(f"first step (compile + warmup): {step_s:.2f} s")
                else:
                    timed["data"] += data_s
                    timed["compute"] += step_s - data_s
                    timed["steps"] += 1
                if not bad:
                    window["loss"] += loss_value
                    window["gn"] += norm_value
                    window["n"] += 1
                window["data"] += data_s
                window["compute"] += step_s - data_s
                window["steps"] += 1
                bar.update(1)
                bar.set_postfix_str(
                    f"ep {epoch + 1} loss {loss_value:.4f} lr {lr:.2e} {clips_per_step / step_s:.1f} "
                    f"clips/s data {1e3 * data_s:.0f}ms compute {1e3 * (step_s - data_s):.0f}ms"
                )
                if pos.step % recipe.log_every == 0 or pos.step % steps_per_epoch == 0 or stop_votes > 0:
                    # One row per window of steps, averaged over its steps; loss and grad norm over
                    # its finite ones (nan: none was). An epoch's end or a stop cuts a window short:
                    # every checkpoint ends one, so a run resumed from any writes the same rows.
                    count, good = window["steps"], window["n"]
                    row = dict(
                        step=pos.step,
                        epoch=pos.step / steps_per_epoch,
                        loss=window["loss"] / good if good else math.nan,
                        lr=lr,
                        grad_norm=window["gn"] / good if good else math.nan,
                        clips_per_s=clips_per_step * count / max(window["data"] + window["compute"], 1e-9),
                        data_s=window["data"] / count,
                        compute_s=window["compute"] / count,
                        skipped=skipped,
                    )
                    log.write(**row)
                    if board is not None:
                        for k in ("loss", "lr", "grad_norm", "clips_per_s", "data_s", "compute_s", "skipped"):
                            board.add_scalar(f"train/{k}", row[k], pos.step)
                    window = dict(loss=0.0, gn=0.0, data=0.0, compute=0.0, n=0, steps=0)
                if stop_votes > 0:
                    status = "stopped"
                    break
            if status == "stopped":
                # what the epoch saw so far: the resumed run records the rest
                record_data_issues(run_dir, "train", epoch + 1, train_loader.report, d)
                pos.epoch = epoch
                last_ckpt = checkpoint_dir(run_dir) / f"step_{pos.step:09d}.pt"
                save_training_state(
                    last_ckpt, model, optimizer, scaler, pos, recipe, steps_per_epoch, d, sharded
                )
                _prune(run_dir, recipe.keep_checkpoints)
                why = signal.Signals(stop.signum).name if stop.signum else f"max_steps {recipe.max_steps}"
                if d.is_main:
                    tqdm.write(f"stopped by {why} at step {pos.step}; saved {last_ckpt}; "
                               f"continue with --resume {run_dir}")
                break
            # Whole optimizer steps leave the loader's pass short of its end: close it here.
            record_data_issues(run_dir, "train", epoch + 1, train_loader.end_epoch(), d)
            pos.epoch = epoch + 1
            last_epoch = epoch + 1 == recipe.epochs
            top1 = None
            if validate is not None and recipe.eval_every and (
                last_epoch or pos.epoch % recipe.eval_every == 0
            ):
                top1 = validate(sharded.full() if sharded is not None else model, pos.epoch)
                if sharded is not None:
                    sharded.release()
                val_log.write(step=pos.step, epoch=pos.epoch, top1=top1)
                if d.is_main:
                    tqdm.write(f"epoch {pos.epoch}: val top-1 (1 view) {top1:.2f}%")
                    if board is not None:
                        board.add_scalar("val/top1", top1, pos.step)
            last_ckpt = checkpoint_dir(run_dir) / f"step_{pos.step:09d}.pt"
            is_best = top1 is not None and top1 > pos.best_top1
            if is_best:
                pos.best_top1 = top1
            save_training_state(last_ckpt, model, optimizer, scaler, pos, recipe, steps_per_epoch, d, sharded)
            if is_best:
                plain = sharded.full(rank0_cpu=True) if sharded is not None else _unwrap(model)
                if d.is_main:
                    save_checkpoint(run_dir / "best.pt", plain, epoch=pos.epoch, step=pos.step, val_top1=top1,
                                    recipe=recipe.to_dict())
                if sharded is not None:
                    sharded.release()
            _prune(run_dir, recipe.keep_checkpoints)
            # A signal during validation or the save stops here, on every rank: the epoch's
            # checkpoint is the stop's (after the last epoch, resuming runs just the test).
            if all_reduce_sum(torch.tensor(float(stop.signum is not None), device=device)).item():
                status = "stopped"
                if d.is_main:
                    why = signal.Signals(stop.signum or signal.SIGTERM).name
                    tqdm.write(f"stopped by {why} after epoch {pos.epoch}; saved {last_ckpt}; "
                               f"continue with --resume {run_dir}")
                break
    bar.close()
    if board is not None:
        board.close()
    n = max(timed["steps"], 1)
    step_time = (timed["data"] + timed["compute"]) / n
    return TrainResult(
        status=status,
        position=pos,
        checkpoint=last_ckpt,
        steps=steps_run,
        skipped_steps=skipped,
        first_step_s=first_step_s,
        clips_per_s=clips_per_step / step_time if timed["steps"] else math.nan,
        data_s_per_step=timed["data"] / n,
        compute_s_per_step=timed["compute"] / n,
        wall_s=time.perf_counter() - start,
        model=sharded.full() if sharded is not None else model,
    )
