"""`python train.py`: the command line and `main`, which wires config, data, model and loop.

    main(size, dataset, lists...) -> get_recipe -> build_model (+ --checkpoint weights)
        -> train (DDP or --fsdp under torchrun) -> multi-view test -> summary, run_dir/results.json
    main(eval_only=True, checkpoint=PATH) -> multi-view test only (a run's checkpoint: its recipe)
    main(resume=RUN_DIR) -> the recipe saved in its newest checkpoint -> train on from there

Every `Recipe` field is a flag (`--base-lr`, `--batch-size`, `--no-mixup`, ...); flags left
out keep the published recipe of the size and dataset. The resolved recipe is printed and
saved as `run_dir/config.json`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import resource
import sys
import time
import types
import typing
from pathlib import Path

import torch

from ..checkpoint import (
    CheckpointReadError,
    infer_config,
    load_checkpoint,
    load_file,
    not_a_checkpoint_file,
    preset_name,
    published_size,
    read_checkpoint,
    to_native,
    unwritable,
)
from ..config import SIZES
from ..data import (
    ClipSampling,
    TestAugment,
    TrainAugment,
    build_loader,
    check_installed,
    make_synthetic,
    read_label_map,
    read_list,
)
from ..model import MViT, build_model
from .dist import Dist, barrier, cleanup, init_distributed
from .evaluate import EvalResult, evaluate, write_per_class, write_predictions
from .recipe import CHOICES, RECIPE_DATASETS, Recipe, get_recipe, saved_recipe
from .trainer import (
    TrainingDiverged,
    accumulation,
    amp_dtype,
    checkpoint_dir,
    compiled,
    latest_checkpoint,
    read_training_state,
    record_data_issues,
    train,
)

# The quickstart's synthetic dataset (generated once into the cache, ~1 min on 2 cores): enough
# clips that a small model learns the motion instead of memorizing the appearance of each clip.
SYNTHETIC = dict(num_train=1200, num_val=120, num_frames=48, size=32)


@dataclasses.dataclass(frozen=True)
class DataPaths:
    train_list: Path | None
    val_list: Path
    root: str
    class_names: list[str] | None


def resolve_data(
    dataset: str,
    d: Dist,
    *,
    data_root: str | None,
    train_list: str | None,
    val_list: str | None,
    label_map: str | None,
    need_train: bool,
) -> DataPaths:
    """The lists to read. Synthetic without lists: the built-in dataset (generated once, by rank 0)."""
    if dataset == "synthetic" and train_list is None and val_list is None:
        if d.is_main:
            make_synthetic(data_root, progress=True, **SYNTHETIC)
        barrier()
        ds = make_synthetic(data_root, progress=False, **SYNTHETIC)
        return DataPaths(ds.train_list, ds.val_list, str(ds.root), list(read_label_map(ds.label_map)))
    flags = {"--val-list": val_list}
    if need_train:
        flags["--train-list"] = train_list
    for flag, value in flags.items():
        if value is None:
            raise ValueError(
                f"{flag} FILE is required for --dataset {dataset} (a 'path label' or "
                "'video_id num_frames label' list; paths relative to --data-root)"
            )
        if not Path(value).is_file():
            raise ValueError(f"{flag} {value}: no such file")
    if data_root is not None and not Path(data_root).is_dir():
        raise ValueError(f"--data-root {data_root}: no such directory")
    if label_map is not None and not Path(label_map).is_file():
        raise ValueError(f"--label-map {label_map}: no such file")
    names = list(read_label_map(label_map)) if label_map else None
    return DataPaths(Path(train_list) if need_train else None, Path(val_list), data_root or "", names)


def check_labels(records: list, num_classes: int, flag: str, path) -> None:
    """Every label of a list within the model's classes (an index past the head is a device-side
    assert on CUDA, far from its cause)."""
    bad = [r for r in records if r.label >= num_classes]
    if bad:
        raise ValueError(
            f"{flag} {path}: {len(bad)} entries have labels >= {num_classes}, the model's class count "
            f"(--num-classes), e.g. label {bad[0].label} of {bad[0].path}"
        )


def eval_loader(records, recipe: Recipe, d: Dist, *, num_clips: int, num_crops: int):
    """Test views of `records`: `num_clips` temporal clips x `num_crops` crops (this rank's shard)."""
    sampling = ClipSampling(recipe.protocol, recipe.num_frames, recipe.sampling_rate, num_clips)
    augment = TestAugment(
        short_side=recipe.test_short_side,
        crop_size=recipe.crop_size,
        num_crops=num_crops,
        mean=recipe.mean,
        std=recipe.std,
    )
    return build_loader(
        records,
        train=False,
        batch_size=recipe.eval_batch_size,
        sampling=sampling,
        augment=augment,
        **_loader_placement(recipe, d),
    )


def _loader_placement(recipe: Recipe, d: Dist) -> dict:
    """`build_loader` arguments shared by the train and test loaders: backend, workers, seed, shard."""
    return dict(backend=recipe.loader, num_workers=recipe.num_workers, seed=recipe.seed, rank=d.rank,
                world_size=d.world_size, device=d.device)


def build(recipe: Recipe, checkpoint: str | None, d: Dist, *, reinit_head: bool) -> MViT:
    """The recipe's model, with `checkpoint`'s weights (any format `load_checkpoint` reads)."""
    torch.manual_seed(recipe.seed)  # the same initial weights on every rank and every run
    model = build_model(
        recipe.size,
        recipe.model_dataset,
        attention_backend=recipe.attention_backend,
        pool_backend=recipe.pool_backend,
        checkpoint_activations=recipe.checkpoint_activations,
        **recipe.model_overrides(),
    )
    if checkpoint is not None:
        try:
            report = load_checkpoint(model, checkpoint, reinit_head=reinit_head)
        except CheckpointReadError as e:
            raise ValueError(f"--checkpoint: {e}") from e
        except ValueError as e:
            raise ValueError(
                f"--checkpoint {checkpoint} does not fit the model of --size {recipe.size} "
                f"(expected {preset_name(model.cfg)}, {recipe.num_classes} classes"
                f"{_describe(checkpoint)}): {e}"
            ) from e
        if d.is_main:
            print(f"loaded {checkpoint}:\n{report.summary()}", flush=True)
    return model.to(d.device)


def _run_recipe(checkpoint: str) -> dict | None:
    """The recipe a checkpoint of this engine's runs (step_*.pt, best.pt) was saved with; None
    for other files."""
    try:
        state = load_file(Path(checkpoint), weights_only=True, mmap=True)
    except CheckpointReadError:  # `build` says what is wrong with it
        return None
    return state.get("recipe") if isinstance(state, dict) else None


def _published_preset(checkpoint: str, dataset: str | None, eval_only: bool) -> tuple[str | None, str | None]:
    """(--size, --dataset) when they are not given with a published checkpoint (SlowFast,
    mmaction2, torchvision): its architecture's size and, for --eval, the dataset its head's
    classes name (400: k400, 174: ssv2). Anything else keeps the defaults (the quickstart's
    model), whose load then says what the file holds."""
    try:
        raw, fmt = read_checkpoint(checkpoint)
        cfg = infer_config(to_native(raw, fmt)[0])
    except Exception:  # `build` reports an unreadable or foreign file
        return None, dataset
    size = published_size(cfg)
    if size is None:
        return None, dataset
    if dataset is None and eval_only:
        dataset = {400: "k400", 174: "ssv2"}.get(cfg.num_classes)
    print(f"--checkpoint {checkpoint} holds {preset_name(cfg)} with {cfg.num_classes} classes: "
          f"--size {size}" + (f" --dataset {dataset}" if dataset else ""), flush=True)
    return size, dataset


def _describe(checkpoint: str) -> str:
    try:
        raw, fmt = read_checkpoint(checkpoint)
        cfg = infer_config(to_native(raw, fmt)[0])
        return f"; the checkpoint holds {preset_name(cfg)} with {cfg.num_classes} classes"
    except Exception:  # only a hint for the error message
        return ""


def peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def model_tflops_per_clip(recipe: Recipe, device: torch.device) -> float:
    """Training TFLOPs per clip: 3 x forward (fwd + bwd) x 2 FLOPs per fvcore multiply-add.
    Traced on `device`: an eager L at 312 materializes ~17 GB of attention on a CPU."""
    try:
        from ..report import count_model
    except ImportError:
        return math.nan
    model = MViT(recipe.model_config(), attention_backend="eager").to(device)
    macs = sum(r.macs for r in count_model(model))
    return 6 * macs / 1e12


def main(
    *,
    size: str | None = None,
    dataset: str | None = None,
    data_root: str | None = None,
    train_list: str | None = None,
    val_list: str | None = None,
    label_map: str | None = None,
    run_dir: str | None = None,
    eval_only: bool = False,
    checkpoint: str | None = None,
    resume: str | None = None,
    dump: str | None = None,
    device: str | None = None,
    progress: bool = True,
    **overrides,
) -> dict:
    """Train (then test) or, with `eval_only`, test `checkpoint`. Returns the results dict that
    is also written to `run_dir/results.json`. `overrides` are `Recipe` fields; `dataset`
    defaults to "synthetic". With `resume`, or `eval_only` and a training checkpoint of this
    engine, the recipe is the one saved in the checkpoint (see `saved_recipe`)."""
    t_start = time.perf_counter()
    overrides = {k: v for k, v in overrides.items() if v is not None}
    if eval_only and checkpoint is None:
        raise ValueError(
            "--eval needs --checkpoint PATH (a SlowFast, mmaction2, torchvision or mvit-fast file)"
        )
    if resume is not None and eval_only:
        raise ValueError("--resume continues training; use --checkpoint with --eval")
    if resume is not None and checkpoint is not None:
        raise ValueError("--resume continues a run from its own weights; leave out --checkpoint")
    if checkpoint is not None and (problem := not_a_checkpoint_file(checkpoint)):
        raise ValueError(f"--checkpoint {checkpoint}: {problem}")
    resume_path = latest_checkpoint(resume) if resume is not None else None
    if resume_path is not None and run_dir is None and resume_path.parent.name != "checkpoints":
        raise ValueError(f"--resume {resume_path}: not in a run's checkpoints/ folder; name the run "
                         "folder to continue in with --run-dir")
    if resume_path is not None:
        saved, where = read_training_state(resume_path, mmap=True)["recipe"], f"--resume {resume_path}"
    elif eval_only:  # testing a run's checkpoint: its recipe, as for --resume
        saved, where = _run_recipe(checkpoint), f"--checkpoint {checkpoint}"
    else:
        saved = None
    if saved is not None:
        recipe = saved_recipe(saved, where, size, dataset, **overrides)
    else:
        if checkpoint is not None and size is None:
            size, dataset = _published_preset(checkpoint, dataset, eval_only)
        recipe = get_recipe(size, dataset or "synthetic", **overrides)
    if run_dir is not None and Path(run_dir).exists() and not Path(run_dir).is_dir():
        raise ValueError(f"--run-dir {run_dir} is a file")
    if run_dir is not None and resume is None and not eval_only:
        held = sorted(checkpoint_dir(Path(run_dir)).glob("step_*.pt"))
        if held:  # a new run there would mix its logs and checkpoints with that run's
            raise ValueError(f"--run-dir {run_dir} holds a run already ({held[-1]}): continue it with "
                             f"--resume {run_dir}, or give a new run another --run-dir")
    # now, not after the whole evaluation
    if dump is not None and (reason := unwritable(dump, make_folders=True)):
        raise ValueError(f"--dump {dump}: cannot write there ({reason})")
    check_installed(recipe.loader)
    d = init_distributed(device)
    try:
        data = resolve_data(
            recipe.dataset,
            d,
            data_root=data_root,
            train_list=train_list,
            val_list=val_list,
            label_map=label_map,
            need_train=not eval_only,
        )
        val_records = read_list(data.val_list, root=data.root)
        check_labels(val_records, recipe.num_classes, "--val-list", data.val_list)
        if label_map is not None and len(data.class_names) != recipe.num_classes:
            raise ValueError(
                f"--label-map {label_map}: {len(data.class_names)} class names for a model of "
                f"{recipe.num_classes} classes (--num-classes)"
            )
        # what can still fail on the command's inputs fails before a run folder is made
        if not eval_only:
            per_device, accum = accumulation(recipe, d.world_size)
            train_records = read_list(data.train_list, root=data.root)
            check_labels(train_records, recipe.num_classes, "--train-list", data.train_list)
        model = build(recipe, checkpoint, d, reinit_head=not eval_only)  # loads (and checks) --checkpoint
        if run_dir is None:
            run_dir = (
                resume_path.parent.parent
                if resume_path is not None
                else Path("runs") / f"{'eval_' if eval_only else ''}{recipe.dataset}_{recipe.size}_"
                f"{time.strftime('%Y%m%d-%H%M%S')}"
            )
        run_dir = Path(run_dir)
        if d.is_main:
            run_dir.mkdir(parents=True, exist_ok=True)
        barrier()
        if d.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        resolved = {
            **recipe.to_dict(),
            "model": dataclasses.asdict(recipe.model_config()),
            "data": {k: str(v) for k, v in dataclasses.asdict(data).items() if k != "class_names"},
            "world_size": d.world_size,
            "device": str(d.device),
            "checkpoint": checkpoint,
            "resume": str(resume_path) if resume_path else None,
            "eval_only": eval_only,
        }
        if not eval_only:
            resolved.update(batch_per_device=per_device, grad_accumulation=accum)
        if d.is_main:
            print("resolved config:\n" + json.dumps(resolved, indent=1, default=str), flush=True)
            if recipe.dataset == "ssv2" and not eval_only and checkpoint is None and resume_path is None:
                print("warning: the SSv2 recipe fine-tunes Kinetics-400 weights (--checkpoint K400 "
                      "checkpoint); without one this run trains SSv2 from random weights", flush=True)
            (run_dir / ("eval_config.json" if eval_only else "config.json")).write_text(
                json.dumps(resolved, indent=1, default=str) + "\n"
            )

        labels = [r.label for r in val_records]
        dtype = amp_dtype(recipe, d.device)
        results: dict = {"run_dir": str(run_dir)}
        if not eval_only:
            sampling = ClipSampling(recipe.protocol, recipe.num_frames, recipe.sampling_rate, 1)
            augment = TrainAugment(
                crop_size=recipe.crop_size,
                scale=(recipe.min_crop_area, 1.0),
                short_side=recipe.train_short_side,
                flip=recipe.flip,
                rand_augment=recipe.rand_augment,
                erase_prob=recipe.erase_prob,
                repeats=recipe.repeats,
                mean=recipe.mean,
                std=recipe.std,
            )
            loader = build_loader(
                train_records,
                train=True,
                batch_size=resolved["batch_per_device"],
                sampling=sampling,
                augment=augment,
                **_loader_placement(recipe, d),
            )
            validate = None
            if recipe.eval_every:  # 0: no validation, so no loader to build nor model to compile
                val_loader = eval_loader(val_records, recipe, d, num_clips=1, num_crops=1)
                # Compiled once; under --fsdp each validation gets a fresh unsharded copy, run eagerly.
                val_model = compiled(model, model, recipe, d.device, dtype, recipe.eval_batch_size,
                                     train=False)

                def validate(m, epoch: int) -> float:
                    top1 = evaluate(
                        val_model if m is model else m, val_loader, labels, recipe.num_classes, 1,
                        device=d.device, amp_dtype=dtype,
                    ).view_top1
                    record_data_issues(run_dir, "val", epoch, val_loader.report, d)
                    return top1

            out = train(
                model,
                recipe,
                d,
                loader,
                run_dir=run_dir,
                resume=resume_path,
                validate=validate,
                progress=progress,
            )
            model = out.model  # under --fsdp an unsharded copy: the test shards of the ranks differ
            results.update(
                status=out.status,
                step=out.position.step,
                epoch=out.position.epoch,
                best_val_top1=out.position.best_top1,
                checkpoint=str(out.checkpoint),
                skipped_steps=out.skipped_steps,
                first_step_s=out.first_step_s,
                clips_per_s=out.clips_per_s,
                data_s_per_step=out.data_s_per_step,
                compute_s_per_step=out.compute_s_per_step,
                train_wall_s=out.wall_s,
            )
            if out.status != "finished":
                results["wall_s"] = time.perf_counter() - t_start
                _write_results(run_dir, results, d)
                return results
        views = recipe.test_clips * recipe.test_crops
        loader = eval_loader(val_records, recipe, d, num_clips=recipe.test_clips, num_crops=recipe.test_crops)
        t_test = time.perf_counter()
        result = evaluate(
            compiled(model, model, recipe, d.device, dtype, recipe.eval_batch_size * views, train=False),
            loader,
            labels,
            recipe.num_classes,
            views,
            device=d.device,
            amp_dtype=dtype,
            progress=progress and d.is_main,
        )
        record_data_issues(run_dir, "test", None, loader.report, d)
        results.update(
            test={
                **result.metrics(),
                "protocol": f"{recipe.test_clips} clips x {recipe.test_crops} crops",
                "wall_s": time.perf_counter() - t_test,
            }
        )
        if d.is_main:
            write_per_class(run_dir / "per_class.csv", result, data.class_names)
            if dump is not None:
                write_predictions(dump, result, [r.path for r in val_records], data.class_names)
        results["peak_memory_gb"] = peak_memory_gb(d.device)
        results["wall_s"] = time.perf_counter() - t_start
        if not eval_only and d.is_main and math.isfinite(results.get("clips_per_s", math.nan)):
            results["model_tflops_per_s"] = model_tflops_per_clip(recipe, d.device) * results["clips_per_s"]
        if d.is_main:
            print(summary(recipe, result, results, data.class_names), flush=True)
        _write_results(run_dir, results, d)
        return results
    finally:
        cleanup()


def _write_results(run_dir: Path, results: dict, d: Dist) -> None:
    if d.is_main:
        (run_dir / "results.json").write_text(json.dumps(results, indent=1, default=str) + "\n")


def summary(recipe: Recipe, result: EvalResult, results: dict, class_names: list[str] | None) -> str:
    lines = [f"test ({recipe.test_clips} clips x {recipe.test_crops} crops): {result.summary()}"]
    if len(result.per_class) <= 10:
        names = class_names or [str(c) for c in range(len(result.per_class))]
        lines.append(
            "per class top-1: " + ", ".join(f"{n} {a:.0f}%" for n, a in zip(names, result.per_class))
        )
    if "clips_per_s" in results:
        lines.append(
            f"train: {results['step']} steps, {results['clips_per_s']:.1f} clips/s after the first step "
            f"({results['first_step_s']:.1f} s; data {results['data_s_per_step'] * 1e3:.0f} ms / compute "
            f"{results['compute_s_per_step'] * 1e3:.0f} ms per step)"
            + (
                f", {results['model_tflops_per_s']:.3f} model TFLOP/s"
                if "model_tflops_per_s" in results
                else ""
            )
        )
    if test_s := results.get("test", {}).get("wall_s"):
        clips = result.num_videos * result.views_per_video
        lines.append(f"test: {clips} clips in {test_s:.1f} s, {clips / test_s:.1f} clips/s "
                     "(decoding and any compilation included)")
    lines.append(
        f"peak memory {results['peak_memory_gb']:.2f} GiB, wall time {results['wall_s']:.0f} s; "
        f"results in {results['run_dir']}"
    )
    return "\n".join(lines)


# ---- command line -------------------------------------------------------------------------------

_HELP = {
    "batch_size": "videos per optimizer step over all devices (x repeats clips); lr scales with it",
    "batch_per_device": "videos per device per micro-batch (default: as many as the recipe allows; "
    "the rest is gradient accumulation)",
    "base_lr": "lr for base_lr_batch videos per step (peak lr = base_lr * batch_size / base_lr_batch)",
    "compile": "torch.compile the model (default: on CUDA only)",
    "precision": "auto: bf16 autocast on CUDA, fp32 on CPU (fp32 master weights either way)",
    "max_steps": "stop after this many optimizer steps, saving a checkpoint, as on SIGTERM",
    "grad_clip": "max global grad L2 norm (0: no clipping)",
    "fsdp": "under torchrun, shard weights, gradients and optimizer state over the processes (FSDP2) "
    "instead of DDP's full replicas: for MViTv2-L; checkpoints stay single unsharded files",
}


def _flag_type(tp):
    """(argparse type, nargs) of a Recipe field's annotation."""
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if typing.get_origin(tp) in (typing.Union, types.UnionType) and len(args) == 1:
        return _flag_type(args[0])
    if typing.get_origin(tp) is tuple:
        return typing.get_args(tp)[0], "+"
    return tp, None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="train.py",
        description="Train or evaluate MViTv2 (S/B/L) on Kinetics-400, SSv2 or the built-in "
        "synthetic dataset with the published recipe. With no data arguments: the CPU quickstart.",
    )
    p.add_argument(
        "--size",
        choices=SIZES,
        default=None,
        help="MViTv2 size (default s; on synthetic, the narrow quickstart model unless given)",
    )
    p.add_argument(
        "--dataset",
        choices=RECIPE_DATASETS,
        default=argparse.SUPPRESS,
        help="default synthetic (with --resume: the run's)",
    )
    p.add_argument(
        "--data-root", help="folder the list paths are relative to (synthetic: where to generate it)"
    )
    p.add_argument("--train-list", help="train list: 'path label' or 'video_id num_frames label' per line")
    p.add_argument("--val-list", help="validation / test list, same formats")
    p.add_argument("--label-map", help="class names, one per line (or SSv2's labels json)")
    p.add_argument(
        "--run-dir",
        help="where config, CSV logs, checkpoints and results go (default runs/<dataset>_<size>_<time>)",
    )
    p.add_argument(
        "--eval", dest="eval_only", action="store_true", help="only run the multi-view test of --checkpoint"
    )
    p.add_argument(
        "--checkpoint",
        help="weights to start from (train; a different head is re-initialized) or "
        "to test (--eval): SlowFast .pyth, mmaction2 .pth, torchvision, mvit-fast",
    )
    p.add_argument(
        "--resume",
        help="continue a run exactly, with the recipe saved in it: its run dir (newest checkpoint) "
        "or a checkpoint file; give the data flags again",
    )
    p.add_argument("--dump", help="write test predictions: .csv (a row per video), .pkl (mmaction2's "
                   "test dump) or any other name (a torch file of the scores)")
    p.add_argument("--device", type=_device, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    recipe = p.add_argument_group("recipe (defaults: the published recipe of --size and --dataset)")
    hints = typing.get_type_hints(Recipe)
    for f in dataclasses.fields(Recipe):
        if f.name in ("size", "dataset"):
            continue
        flag = "--" + f.name.replace("_", "-")
        tp, nargs = _flag_type(hints[f.name])
        if tp is bool:
            recipe.add_argument(
                flag, action=argparse.BooleanOptionalAction, default=None, help=_HELP.get(f.name)
            )
        elif f.name in CHOICES:
            recipe.add_argument(flag, choices=CHOICES[f.name], default=None, help=_HELP.get(f.name))
        else:
            recipe.add_argument(
                flag, type=tp, nargs=nargs, default=None, metavar=f.name.upper(), help=_HELP.get(f.name)
            )
    return p


_RECIPE_FLAGS = {f.name for f in dataclasses.fields(Recipe)} - {"size", "dataset"}


def _device(value: str) -> str:
    """argparse type of --device: a torch device string of a CPU or CUDA device."""
    try:
        kind = torch.device(value).type
    except RuntimeError:
        kind = None
    if kind not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"expected cpu, cuda or cuda:N, got {value!r}")
    return value


def parse_args(argv: list[str] | None = None) -> dict:
    """Flags -> `main` keyword arguments (recipe flags not given are left out). Bad values exit
    with an argparse error naming the flag."""
    parser = build_parser()
    args = vars(parser.parse_args(argv))
    kwargs = {k: v for k, v in args.items() if v is not None or k in ("size",)}
    for key in ("depths", "kv_stride_adaptive", "betas", "mean", "std"):
        if kwargs.get(key) is not None:
            kwargs[key] = tuple(kwargs[key])
    if kwargs.get("resume") is None and not kwargs.get("eval_only"):
        # a saved run's flags apply to its own recipe, which `main` reads and checks
        try:
            get_recipe(
                kwargs.get("size"),
                kwargs.get("dataset", "synthetic"),
                **{k: v for k, v in kwargs.items() if k in _RECIPE_FLAGS},
            )
        except ValueError as e:
            parser.error(str(e))
    return kwargs


def cli(argv: list[str] | None = None) -> int:
    kwargs = parse_args(argv)
    try:
        results = main(**kwargs)
    except (ValueError, FileNotFoundError, ImportError) as e:  # ImportError: an extra not installed
        print(f"error: {e}", file=sys.stderr)
        return 2
    except TrainingDiverged as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0 if results.get("status", "finished") in ("finished", "stopped") else 1


if __name__ == "__main__":
    sys.exit(cli())
