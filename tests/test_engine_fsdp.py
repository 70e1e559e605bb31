"""`--fsdp` (FSDP2, gloo on CPU): equals one process, checkpoints in the unsharded format, exact resume."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch

from mvit_fast.checkpoint import load_checkpoint
from mvit_fast.engine import get_recipe, main, parse_args
from tests import test_engine_train
from tests.test_engine_train import _losses, _weights, tiny_model, torchrun_train

tiny = test_engine_train.tiny  # the tiny dataset and model fixture, shared


def _grad_norms(run_dir: Path) -> list[float]:
    with open(Path(run_dir) / "train.csv") as f:
        return [float(row["grad_norm"]) for row in csv.DictReader(f)]


@pytest.fixture(scope="module")
def quiet(tiny):
    # no per-rank randomness, so 2 ranks x 2 micro-batches of 1 video == 1 rank x 2 micro-batches of 2;
    # 2 epochs of 3 steps: resumed from the checkpoint after the first
    return dict(tiny, mixup=False, drop_path_rate=0.0, head_dropout=0.0, epochs=2, warmup_epochs=0.0)


@pytest.fixture(scope="module")
def runs(quiet, tmp_path_factory):
    """One process (no FSDP) and 2 FSDP processes, uninterrupted, with the same global batches."""
    root = tmp_path_factory.mktemp("fsdp")
    single = main(**quiet, batch_per_device=2, run_dir=str(root / "one"))
    # micro-batches of 1 so that gradient sync is skipped on one of the 2; activation checkpointing
    # composes with the sharded blocks and does not change the numbers
    fsdp = dict(quiet, batch_per_device=1, checkpoint_activations=True, fsdp=True)
    sharded = torchrun_train(fsdp, root / "fsdp")
    return dict(root=root, fsdp=fsdp, single=single, sharded=sharded)


def test_fsdp_two_processes_match_one_process(runs):
    root, single, sharded = runs["root"], runs["single"], runs["sharded"]
    assert single["step"] == sharded["step"] == 6
    a, b = _weights(single), _weights(sharded)
    assert a.keys() == b.keys()
    for k in a:
        # as the DDP test: only the order of the gradient sums differs
        torch.testing.assert_close(a[k], b[k], atol=2e-5, rtol=1e-4, msg=k)
    torch.testing.assert_close(_losses(root / "one"), _losses(root / "fsdp"), atol=1e-5, rtol=1e-5)
    # the norm clipped against is the global one (the recipe clips at 1.0; these are above it)
    norms = _grad_norms(root / "fsdp")
    assert min(norms) > 1.0
    torch.testing.assert_close(_grad_norms(root / "one"), norms, atol=1e-5, rtol=1e-5)
    # evaluation of the unsharded copy: every test video once, as one process scores them
    for key in ("num_videos", "num_views", "top1", "top5", "view_top1"):
        assert single["test"][key] == pytest.approx(sharded["test"][key], abs=1e-9), key


def test_fsdp_checkpoint_is_the_unsharded_format_and_resumes_exactly(runs, quiet):
    root, fsdp = runs["root"], runs["fsdp"]
    # The uninterrupted run's checkpoint after epoch 1 (step 3): a stop writes the same state through
    # the same `save_training_state`, and a third launch of 2 processes costs ~10 s on 2 cores.
    saved = root / "fsdp" / "checkpoints" / "step_000000003.pt"
    ckpt = torch.load(saved, map_location="cpu", weights_only=True)
    plain = torch.load(
        root / "one" / "checkpoints" / "step_000000003.pt", map_location="cpu", weights_only=True
    )
    assert ckpt.keys() == plain.keys() and (ckpt["world_size"], ckpt["step"]) == (2, 3)
    shapes = {k: v.shape for k, v in ckpt["model"].items()}
    assert shapes == {k: v.shape for k, v in plain["model"].items()}
    assert all(type(v) is torch.Tensor for v in ckpt["model"].values())  # no DTensor shards
    # the optimizer state is keyed by parameter index, as `optimizer.state_dict()` of one process
    opt, plain_opt = ckpt["optimizer"], plain["optimizer"]
    assert opt["param_groups"] == plain_opt["param_groups"]
    assert opt["state"].keys() == plain_opt["state"].keys()
    for i, s in opt["state"].items():
        assert {k: v.shape for k, v in s.items()} == {k: v.shape for k, v in plain_opt["state"][i].items()}

    model = tiny_model()
    report = load_checkpoint(model, saved)
    assert not (report.missing or report.unexpected) and len(report.loaded) == len(shapes)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in ckpt["model"].items())

    resumed = torchrun_train(dict(fsdp, resume=str(saved)), root / "resumed")
    assert resumed["status"] == "finished" and resumed["step"] == 6
    a, b = _weights(runs["sharded"]), _weights(resumed)
    # bitwise: the same ranks, the same reductions, the optimizer state re-sharded as it was
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])]
    assert _losses(root / "fsdp")[3:] == _losses(root / "resumed")

    # and the FSDP checkpoint resumes in one process: the re-keyed optimizer state is the plain one
    crossed = main(**quiet, batch_per_device=2, resume=str(saved), run_dir=str(root / "crossed"))
    a, b = _weights(runs["single"]), _weights(crossed)
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=2e-5, rtol=1e-4, msg=k)


def test_fsdp_flag_and_unsupported_combinations(quiet, tmp_path, capsys):
    assert parse_args(["--fsdp"])["fsdp"] is True and get_recipe("l", "k400").fsdp is False
    with pytest.raises(ValueError, match="fsdp supports precision bf16 or fp32, not fp16"):
        get_recipe("l", "k400", fsdp=True, precision="fp16")
    # one process: nothing to shard, so the plain model trains (and says so)
    one = main(**quiet, fsdp=True, max_steps=1, run_dir=str(tmp_path / "one"))
    assert one["status"] == "stopped" and "a single process has nothing to shard" in capsys.readouterr().out
