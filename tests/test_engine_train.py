"""End-to-end engine runs on a tiny synthetic dataset (CPU): resume, DDP (gloo), bf16, stops, eval."""

from __future__ import annotations

import csv
import itertools
import json
import math
import os
import re
import signal
import socket
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

from mvit_fast import build_model
from mvit_fast.checkpoint import export_state_dict
from mvit_fast.data import make_synthetic
from mvit_fast.data.mixup import MixupCutmix
from mvit_fast.engine import TrainingDiverged, get_recipe, main
from mvit_fast.engine import run as run_module
from mvit_fast.engine import trainer as trainer_module

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Recipe overrides for a 4-block width-16 model on 4x32x32 clips of 12 train / 6 val videos."""
    ds = make_synthetic(
        tmp_path_factory.mktemp("synthetic"), num_train=12, num_val=6, num_frames=16, size=32, progress=False
    )
    return dict(
        dataset="synthetic",
        data_root=str(ds.root),
        train_list=str(ds.train_list),
        val_list=str(ds.val_list),
        depths=(1, 1, 1, 1),
        embed_dim=16,
        num_frames=4,
        sampling_rate=2,
        crop_size=32,
        test_short_side=32,
        batch_size=4,
        epochs=2,
        warmup_epochs=0.5,
        num_workers=0,
        eval_every=0,
        log_every=1,
        loader="pyav",
        compile=False,
        precision="fp32",
        device="cpu",
        progress=False,
    )


RUN_ARGS = ("data_root", "train_list", "val_list", "device", "progress")  # main's, not the recipe's


def tiny_recipe(tiny: dict):
    return get_recipe(None, **{k: v for k, v in tiny.items() if k not in RUN_ARGS})


def tiny_model():
    """The architecture the `tiny` runs train (their checkpoints load into it)."""
    return build_model("s", "k400", depths=(1, 1, 1, 1), embed_dim=16, num_frames=4, crop_size=32,
                       num_classes=6, kv_stride_adaptive=(1, 1, 1))


def _weights(results: dict) -> dict[str, torch.Tensor]:
    return torch.load(results["checkpoint"], map_location="cpu", weights_only=True)["model"]


def _rows(run_dir: str | Path, name: str = "train.csv") -> list[dict]:
    with open(Path(run_dir) / name) as f:
        return list(csv.DictReader(f))


def _losses(run_dir: str | Path) -> list[float]:
    return [float(row["loss"]) for row in _rows(run_dir)]


@pytest.fixture(scope="module")
def tiny_vp9(tiny, tmp_path_factory):
    """`tiny` on VP9 files, which DALI's CPU decoder reads."""
    ds = make_synthetic(tmp_path_factory.mktemp("synthetic_vp9"), num_train=12, num_val=6, num_frames=16,
                        size=32, codec="vp9", progress=False)
    return dict(tiny, data_root=str(ds.root), train_list=str(ds.train_list), val_list=str(ds.val_list))


@pytest.mark.parametrize("loader", ["pyav", "dali"])
def test_stop_and_resume_equals_uninterrupted_bitwise(loader, tiny, tmp_path, request):
    if loader == "dali":
        pytest.importorskip("nvidia.dali", reason="NVIDIA DALI is not installed")
    # mixup, repeated augmentation, RandAugment, random erasing, drop path and dropout all draw
    noisy = dict(tiny if loader == "pyav" else request.getfixturevalue("tiny_vp9"), loader=loader,
                 mixup=True, repeats=2, rand_augment=True, drop_path_rate=0.2, head_dropout=0.5,
                 erase_prob=0.5)
    full = main(**noisy, run_dir=str(tmp_path / "full"))
    assert full["status"] == "finished" and full["step"] == 6
    stopped = main(**noisy, run_dir=str(tmp_path / "cut"), max_steps=4)  # mid-epoch 2 (3 steps per epoch)
    assert stopped["status"] == "stopped" and stopped["step"] == 4
    resumed = main(**noisy, resume=str(tmp_path / "cut"))
    assert (
        resumed["status"] == "finished"
        and resumed["step"] == 6
        and resumed["run_dir"] == str(tmp_path / "cut")
    )
    a, b = _weights(full), _weights(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])]
    assert _losses(tmp_path / "full") == _losses(tmp_path / "cut")  # same loss at every step
    assert full["test"]["top1"] == resumed["test"]["top1"]
    kept = sorted(p.name for p in (tmp_path / "cut" / "checkpoints").glob("*.pt"))
    assert kept == ["step_000000003.pt", "step_000000004.pt", "step_000000006.pt"]  # last 3 kept


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_train(overrides: dict, run_dir: Path, *flags: str, nproc: int = 2) -> dict:
    """`main(**overrides)` as `torchrun --nproc-per-node nproc train.py` on CPU (gloo), plus `flags`;
    returns its results.json."""
    args = []
    for key, value in overrides.items():
        if key in ("device", "progress"):
            continue
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            args.append(flag if value else "--no-" + flag[2:])
        elif isinstance(value, tuple):
            args += [flag, *map(str, value)]
        else:
            args += [flag, str(value)]
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        str(nproc),
        "--master-addr",
        "127.0.0.1",
        "--master-port",
        str(_free_port()),
        str(REPO / "train.py"),
        *args,
        *flags,
        "--device",
        "cpu",
        "--no-progress",
        "--run-dir",
        str(run_dir),
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads((Path(run_dir) / "results.json").read_text())


def test_two_gloo_processes_match_one_process_with_accumulation(tiny, tmp_path):
    # no per-rank randomness, so 2 ranks x 2 videos == 1 rank x (2 micro-batches of 2 videos)
    # (mixup is off: its draws are the same, test below, but it pairs videos within a
    # micro-batch, and a rank's batch holds other videos than a micro-batch)
    quiet = dict(tiny, mixup=False, drop_path_rate=0.0, head_dropout=0.0, epochs=1, warmup_epochs=0.0)
    single = main(**quiet, batch_per_device=2, run_dir=str(tmp_path / "one"))
    double = torchrun_train(quiet, tmp_path / "two")
    a, b = _weights(single), _weights(double)
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=2e-5, rtol=1e-4, msg=k)
    torch.testing.assert_close(_losses(tmp_path / "one"), _losses(tmp_path / "two"), atol=1e-5, rtol=1e-5)
    # the test is over the list exactly once: 6 videos x 2 clips, none duplicated by sharding
    for key in ("num_videos", "num_views", "top1", "top5", "view_top1"):
        assert single["test"][key] == pytest.approx(double["test"][key], abs=1e-9), key
    assert double["test"]["num_videos"] == 6 and double["test"]["num_views"] == 12


def test_bf16_autocast_loss_curve_follows_fp32(tiny, tmp_path):
    # full-batch steps (12 videos) so the curve is smooth: both precisions see the same clips
    quiet = dict(
        tiny, mixup=False, drop_path_rate=0.0, head_dropout=0.0, epochs=10, batch_size=12, warmup_epochs=1.0
    )
    fp32 = main(**quiet, run_dir=str(tmp_path / "fp32"))
    bf16 = main(**dict(quiet, precision="bf16"), run_dir=str(tmp_path / "bf16"))
    a, b = _losses(tmp_path / "fp32"), _losses(tmp_path / "bf16")
    assert len(a) == len(b) == 10 and fp32["status"] == bf16["status"] == "finished"
    assert a[-1] < a[0] - 0.1  # it learns (memorizes the 12 clips)
    # bf16 keeps 8 mantissa bits: a step's loss moves by ~1e-2 (measured: <= 5e-3 over 10 steps)
    assert max(abs(x - y) for x, y in zip(a, b)) < 0.02, (a, b)


def test_nonfinite_loss_skips_the_step_and_repeats_stop_the_run(tiny, tmp_path, monkeypatch):
    real = trainer_module.soft_cross_entropy
    calls = {"n": 0}

    def nan_on_second_call(logits, target):
        calls["n"] += 1
        loss = real(logits, target)
        return loss * math.nan if calls["n"] == 2 else loss

    monkeypatch.setattr(trainer_module, "soft_cross_entropy", nan_on_second_call)
    out = main(**dict(tiny, epochs=1), run_dir=str(tmp_path / "one_nan"))
    assert out["status"] == "finished" and out["skipped_steps"] == 1 and out["step"] == 3
    assert all(torch.isfinite(v).all() for v in _weights(out).values())
    # the skipped step's row has no loss or grad norm (nan, not 0): no finite step was averaged
    rows = _rows(tmp_path / "one_nan")
    assert [(r["step"], r["skipped"]) for r in rows] == [("1", "0"), ("2", "1"), ("3", "1")]
    nan = [[math.isnan(float(r[k])) for k in ("loss", "grad_norm")] for r in rows]
    assert nan == [[False, False], [True, True], [False, False]]

    monkeypatch.setattr(
        trainer_module, "soft_cross_entropy", lambda logits, target: real(logits, target) * math.nan
    )
    with pytest.raises(TrainingDiverged, match="2 non-finite losses in a row at step 2 "):
        main(**dict(tiny, max_bad_steps=2), run_dir=str(tmp_path / "all_nan"))


def test_sigterm_saves_a_checkpoint_and_exits_cleanly(tiny, tmp_path, monkeypatch):
    real = trainer_module.soft_cross_entropy
    calls = {"n": 0}

    def terminate_on_second_call(logits, target):
        calls["n"] += 1
        if calls["n"] == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(logits, target)

    monkeypatch.setattr(trainer_module, "soft_cross_entropy", terminate_on_second_call)
    out = main(**tiny, run_dir=str(tmp_path / "run"))
    assert out["status"] == "stopped" and out["step"] == 2
    assert Path(out["checkpoint"]).name == "step_000000002.pt"
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handlers restored
    monkeypatch.setattr(trainer_module, "soft_cross_entropy", real)
    assert main(**tiny, resume=str(tmp_path / "run"))["step"] == 6


def _with_missing(listing: str, out: Path, line: int) -> str:
    """A copy of `listing` (paths relative to the dataset root) whose `line` names a missing file."""
    lines = Path(listing).read_text().splitlines()
    lines[line] = "train/gone.mp4 " + lines[line].split()[-1]
    out.write_text("\n".join(lines) + "\n")
    return str(out)


def test_csv_rows_average_their_own_steps_across_a_stop_and_an_older_resume(tiny, tmp_path, monkeypatch):
    # The trainer's clock ticks once per reading: a step (one micro-batch) reads it 4 times,
    # data 1 tick and compute 2, so every row's per-step times are exactly 1 and 2.
    clock = types.SimpleNamespace(perf_counter=itertools.count().__next__)
    monkeypatch.setattr(trainer_module, "time", clock)
    scalars: dict[str, list] = {}

    class SummaryWriter:  # TensorBoard's, where the `tensorboard` package is absent
        def __init__(self, log_dir):
            assert log_dir.endswith("tensorboard")

        def add_scalar(self, tag, value, step):
            scalars.setdefault(tag, []).append((step, value))

        def close(self):
            scalars["closed"] = True

    fake = types.SimpleNamespace(SummaryWriter=SummaryWriter)
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", fake)
    every = tmp_path / "every"
    main(**tiny, run_dir=str(every))  # log_every 1: one row per step
    losses = _losses(every)
    assert _rows(every, "val.csv") == []  # eval_every 0: no validation, only the final test
    # TensorBoard gets every train.csv column but step and epoch, at each row's step
    monkeypatch.delitem(sys.modules, "torch.utils.tensorboard")
    assert scalars.pop("closed")
    assert {tag: [(s, f"{v:g}") for s, v in values] for tag, values in scalars.items()} == {
        f"train/{k}": [(int(r["step"]), f"{float(r[k]):g}") for r in _rows(every)]
        for k in ("loss", "lr", "grad_norm", "clips_per_s", "data_s", "compute_s", "skipped")}

    # windows of 4 steps: a stop after 3 writes its part-window; the resumed run's first row
    # covers its one step
    windowed, cut = dict(tiny, log_every=4), tmp_path / "cut"
    assert main(**windowed, run_dir=str(cut), max_steps=3)["status"] == "stopped"
    main(**windowed, resume=str(cut))
    rows = _rows(cut)
    assert [int(r["step"]) for r in rows] == [3, 4, 6]
    for row, window in zip(rows, ([0, 1, 2], [3], [4, 5])):
        assert float(row["loss"]) == pytest.approx(sum(losses[i] for i in window) / len(window), rel=1e-5)
    # per step of its own window, not per log_every steps
    assert [(r["data_s"], r["compute_s"]) for r in rows] == [("1", "2")] * 3
    # every checkpoint ends a window (step 3 is epoch 1's): an uninterrupted run writes the same
    # rows, and so does a run resumed from its epoch checkpoint
    whole = tmp_path / "whole"
    main(**windowed, run_dir=str(whole))
    assert _rows(whole) == rows
    main(**windowed, resume=str(whole / "checkpoints" / "step_000000003.pt"))
    assert _rows(whole) == rows

    # resumed from an older checkpoint (as after a hard kill): the steps after it are logged once
    main(**tiny, resume=str(every / "checkpoints" / "step_000000003.pt"))
    assert [int(r["step"]) for r in _rows(every)] == [1, 2, 3, 4, 5, 6]
    assert _losses(every) == losses


def test_a_signal_during_validation_stops_after_the_epochs_checkpoint(tiny, tmp_path, monkeypatch):
    real = run_module.evaluate
    calls = {"n": 0}

    def evaluate_then_terminate(*args, **kwargs):
        calls["n"] += 1
        result = real(*args, **kwargs)
        if calls["n"] == 1:
            os.kill(os.getpid(), signal.SIGTERM)
        return result

    monkeypatch.setattr(run_module, "evaluate", evaluate_then_terminate)
    validated, run = dict(tiny, eval_every=1), tmp_path / "run"
    out = main(**validated, run_dir=str(run))
    assert out["status"] == "stopped" and out["step"] == 3 and "test" not in out
    assert Path(out["checkpoint"]).name == "step_000000003.pt"
    out = main(**validated, resume=str(run))
    assert out["status"] == "finished" and out["step"] == 6 and out["test"]["num_videos"] == 6
    assert [(r["step"], r["epoch"]) for r in _rows(run, "val.csv")] == [("3", "1"), ("6", "2")]


def test_evaluation_runs_the_compiled_model_when_the_recipe_compiles(tiny, tmp_path, monkeypatch):
    evaluated = []

    class Compiled(torch.nn.Module):  # stands for torch.compile's wrapper: records what runs through it
        def __init__(self, module):
            super().__init__()
            self.module = module

        def forward(self, clips):
            if not torch.is_grad_enabled():
                evaluated.append(clips.shape[0])
            return self.module(clips)

    compiles = []
    monkeypatch.setattr(torch, "compile", lambda module, **kwargs: compiles.append(1) or Compiled(module))
    out = main(**dict(tiny, compile=True, eval_every=1, epochs=1), run_dir=str(tmp_path / "run"))
    # validation (6 videos x 1 view) and the test (6 x 2 clips) both go through the compiled model
    assert out["status"] == "finished" and sum(evaluated) == 6 + 12
    assert len(compiles) == 3  # training, validation, test

    # no validation: nothing compiled (nor tuned on CUDA) for it
    compiles.clear()
    evaluated.clear()
    out = main(**dict(tiny, compile=True, eval_every=0, epochs=1), run_dir=str(tmp_path / "no_val"))
    assert out["status"] == "finished" and sum(evaluated) == 12 and len(compiles) == 2


def test_ssv2_training_from_random_weights_is_warned(tiny, tmp_path, capsys):
    main(**dict(tiny, dataset="ssv2", num_classes=6), run_dir=str(tmp_path / "run"), max_steps=1)
    assert "the SSv2 recipe fine-tunes Kinetics-400 weights" in capsys.readouterr().out


def test_bad_videos_of_every_epoch_are_reported_with_their_paths(tiny, tmp_path, caplog):
    # 12 train videos, 3 steps of 4 per epoch: the whole shuffled list is used in every epoch,
    # the missing file included, yet no pass runs past its last batch (whole optimizer steps).
    bad = dict(tiny, train_list=_with_missing(tiny["train_list"], tmp_path / "train.csv", 5),
               val_list=_with_missing(tiny["val_list"], tmp_path / "val.csv", 2), eval_every=1)
    out = main(**bad, run_dir=str(tmp_path / "run"))
    assert out["status"] == "finished"
    with open(tmp_path / "run" / "data_issues.csv") as f:
        rows = list(csv.DictReader(f))
    gone = str(Path(tiny["data_root"]) / "train" / "gone.mp4")
    # epochs counted from 1, as val.csv counts them
    assert {(r["split"], r["epoch"]) for r in rows} == {("train", "1"), ("train", "2"), ("val", "1"),
                                                       ("val", "2"), ("test", "")}
    assert all((r["kind"], r["path"], r["rank"], r["detail"]) == ("missing", gone, "0", "no such file")
               for r in rows)
    assert caplog.text.count("epoch data report (rank 0)") == 5  # 2 train, 2 val, 1 test passes

    # stopped at the last step of epoch 1, before its validation: what it saw is kept, and the
    # resumed run adds the rest without repeating it
    assert main(**bad, run_dir=str(tmp_path / "cut"), max_steps=3)["status"] == "stopped"
    with open(tmp_path / "cut" / "data_issues.csv") as f:
        assert [(r["split"], r["epoch"]) for r in csv.DictReader(f)] == [("train", "1")]
    assert main(**bad, resume=str(tmp_path / "cut"))["status"] == "finished"
    with open(tmp_path / "cut" / "data_issues.csv") as f:
        resumed = sorted((r["split"], r["epoch"]) for r in csv.DictReader(f))
    assert resumed == sorted((r["split"], r["epoch"]) for r in rows)


def test_resume_and_eval_take_the_recipe_from_the_checkpoint_and_refuse_another(tiny, tmp_path):
    run = tmp_path / "run"
    run_tiny = dict(tiny, eval_every=2)  # validated after the last (2nd) epoch: best.pt
    main(**run_tiny, run_dir=str(run), max_steps=2)
    with pytest.raises(ValueError, match=r"--resume .*step_000000002.pt: the run was trained with "
                                         r"--depths 1 1 1 1, this command asks for --depths 1 1 2 1\. "):
        main(**dict(tiny, depths=(1, 1, 2, 1)), resume=str(run))
    with pytest.raises(ValueError, match="leave out --checkpoint"):
        main(**tiny, resume=str(run), checkpoint=str(run / "checkpoints" / "step_000000002.pt"))
    # only the data and how to run: the model, solver and schedule come from the checkpoint
    out = main(**{k: tiny[k] for k in RUN_ARGS}, resume=str(run), num_workers=1)
    assert out["status"] == "finished" and out["step"] == 6
    config = json.loads((run / "config.json").read_text())  # the resumed run's resolved config
    trained = json.loads(json.dumps(dict(tiny_recipe(run_tiny).to_dict(), num_workers=1, batch_per_device=4)))
    assert {k: config[k] for k in trained} == trained
    # testing the run's checkpoints (the last; best.pt, from the validation after the last
    # epoch) takes its recipe too
    data = {k: tiny[k] for k in RUN_ARGS if k != "train_list"}
    for checkpoint in (out["checkpoint"], str(run / "best.pt")):
        tested = main(**data, eval_only=True, checkpoint=checkpoint, run_dir=str(tmp_path / "test"))
        assert tested["test"]["num_videos"] == 6
    with pytest.raises(ValueError, match=r"--checkpoint .*step_000000006.pt: the run was trained with "
                                         r"--embed-dim 16, this command asks for --embed-dim 32\. "):
        main(**data, eval_only=True, checkpoint=out["checkpoint"], embed_dim=32)


def test_a_resume_in_other_micro_batches_says_it_is_not_exact(tiny, tmp_path, capsys):
    run = tmp_path / "run"
    main(**tiny, run_dir=str(run), max_steps=2)
    path = trainer_module.latest_checkpoint(run)
    state = torch.load(path, weights_only=True)
    torch.save(dict(state, world_size=2), path)  # as if saved by a 2-process run
    capsys.readouterr()
    assert main(**tiny, resume=str(run))["status"] == "finished"
    assert ("saved by 2 process(es) of 1 micro-batch(es) of 2 videos, resumed by 1 of 1 of 4: "
            in capsys.readouterr().out)
    # the same global batch in micro-batches of another size: other mixup pairs, other draws
    run = tmp_path / "split"
    main(**tiny, run_dir=str(run), max_steps=2)
    capsys.readouterr()
    assert main(**tiny, resume=str(run), max_steps=3)["status"] == "stopped"
    assert "not the ones an uninterrupted run would take" not in capsys.readouterr().out
    assert main(**tiny, resume=str(run), batch_per_device=2)["status"] == "finished"
    assert "saved by 1 process(es) of 1 micro-batch(es) of 4 videos, resumed by 1 of 2 of 2: " in (
        capsys.readouterr().out)


def test_mixup_draws_once_per_step_for_every_micro_batch(tiny, tmp_path, monkeypatch):
    # as in SlowFast, whose processes share one numpy seed: every micro-batch (and device) of a
    # step mixes with the same lambda, CutMix choice and box, whatever the batch's split
    draws, real = [], MixupCutmix.__call__

    def recording(self, clips, labels):
        state = self.rng.bit_generator.state
        draws.append((self._draw(), int(self.rng.integers(1 << 30))))  # lambda, CutMix, next draw
        self.rng.bit_generator.state = state
        return real(self, clips, labels)

    monkeypatch.setattr(MixupCutmix, "__call__", recording)
    assert main(**tiny, mixup=True, batch_per_device=2, run_dir=str(tmp_path / "run"),
                max_steps=3)["status"] == "stopped"
    assert len(draws) == 6 and draws[0::2] == draws[1::2]  # 3 steps of 2 micro-batches
    assert len(set(draws[0::2])) == 3  # each step draws anew


def test_a_state_that_does_not_fit_is_a_resume_error(tiny, tmp_path):
    run = tmp_path / "run"
    main(**tiny, run_dir=str(run), max_steps=1)
    path = trainer_module.latest_checkpoint(run)
    other = build_model("s", "k400", depths=(1, 1, 2, 1), embed_dim=16, num_frames=4, crop_size=32,
                        num_classes=6)
    with pytest.raises(ValueError, match=r"--resume .*: its state does not fit this model and optimizer: "
                                         r"Error\(s\) in loading state_dict"):
        trainer_module.load_training_state(path, other, torch.optim.AdamW(other.parameters()), None,
                                           tiny_recipe(tiny), 3)


def test_eval_loads_foreign_checkpoints_and_dumps_predictions(tiny, tmp_path):
    model = tiny_model()
    slowfast = tmp_path / "slowfast.pyth"
    torch.save({"model_state": export_state_dict(model.state_dict(), "slowfast")}, slowfast)
    mmaction = tmp_path / "mmaction2.pth"
    torch.save({"state_dict": export_state_dict(model.state_dict(), "mmaction2")}, mmaction)
    scores = []
    for path in (slowfast, mmaction):
        out = main(
            **tiny,
            eval_only=True,
            checkpoint=str(path),
            dump=str(tmp_path / f"{path.stem}.csv"),
            run_dir=str(tmp_path / path.stem),
        )
        assert out["test"]["num_videos"] == 6 and out["test"]["num_views"] == 12
        with open(tmp_path / f"{path.stem}.csv") as f:
            rows = list(csv.DictReader(f))
        assert [int(r["index"]) for r in rows] == list(range(6))
        assert (tmp_path / path.stem / "per_class.csv").exists()
        scores.append([r["top5"] for r in rows])
    assert scores[0] == scores[1]  # the same weights through either format
    out = main(
        **tiny,
        eval_only=True,
        checkpoint=str(slowfast),
        dump=str(tmp_path / "new" / "scores.pt"),  # folders are made
        run_dir=str(tmp_path / "pt"),
    )
    dumped = torch.load(tmp_path / "new" / "scores.pt", weights_only=True)
    assert dumped["scores"].shape == (6, 6) and torch.allclose(dumped["scores"].sum(1), torch.ones(6))

    wider = build_model(
        "s", "k400", depths=(1, 1, 1, 1), embed_dim=24, num_frames=4, crop_size=32, num_classes=6
    )
    other = tmp_path / "wider.pyth"
    torch.save({"model_state": wider.state_dict()}, other)
    with pytest.raises(ValueError, match="does not fit the model of --size s.*width 24"):
        main(**tiny, eval_only=True, checkpoint=str(other), run_dir=str(tmp_path / "bad"))
    assert not (tmp_path / "bad").exists()  # refused before a run folder is made


def test_eval_of_a_published_checkpoint_takes_size_and_dataset_from_it(tiny, tmp_path, capsys):
    """`train.py --eval --checkpoint MViTv2_S_16x4_k400.pyth` names neither size nor dataset:
    the file's architecture and classes do (not the quickstart's model, which cannot load it)."""
    official = tmp_path / "MViTv2_S_k400.pyth"
    weights = export_state_dict(build_model("s", "k400").state_dict(), "slowfast")
    torch.save({"model_state": weights}, official)
    args = {k: v for k, v in tiny.items() if k not in ("dataset", "depths", "embed_dim")}
    out = main(**args, eval_only=True, checkpoint=str(official), run_dir=str(tmp_path / "eval"))
    printed = capsys.readouterr().out
    assert "holds MViTv2-S with 400 classes: --size s --dataset k400" in printed
    assert re.search(r"test: 30 clips in [\d.]+ s, [\d.]+ clips/s", printed)  # 6 videos x 5 clips
    saved = json.loads((tmp_path / "eval" / "eval_config.json").read_text())
    assert (saved["size"], saved["dataset"], saved["model"]["embed_dim"]) == ("s", "k400", 96)
    assert out["test"]["num_videos"] == 6
