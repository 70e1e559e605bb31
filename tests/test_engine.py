"""Engine units: recipe schedule and param groups, multi-view aggregation, argument errors."""

from __future__ import annotations

import csv
import dataclasses
import importlib.util
import math
import pickle
import sys

import pytest
import torch

from mvit_fast import build_model
from mvit_fast.data import Batch
from mvit_fast.engine import (
    Recipe,
    aggregate_views,
    build_optimizer,
    evaluate,
    get_recipe,
    lr_at,
    main,
    param_groups,
    parse_args,
    per_class_accuracy,
    topk_hits,
)
from mvit_fast.engine.dist import Dist
from mvit_fast.engine.evaluate import write_predictions
from mvit_fast.engine.recipe import saved_recipe
from mvit_fast.engine.run import build, cli
from mvit_fast.engine.trainer import accumulation

TINY = dict(depths=(1, 1, 1, 1), embed_dim=16, num_frames=4, crop_size=32, num_classes=6)


# ---- recipe -------------------------------------------------------------------------------------


def test_k400_schedule_warmup_peak_and_cosine_end():
    r = get_recipe("s", "k400")
    assert (r.optimizer, r.epochs, r.warmup_epochs, r.weight_decay, r.grad_clip) == (
        "adamw",
        200,
        30.0,
        0.05,
        1.0,
    )
    assert (r.mixup_alpha, r.cutmix_alpha, r.mixup_switch_prob, r.label_smoothing, r.repeats) == (
        0.8,
        1.0,
        0.5,
        0.1,
        2,
    )
    assert r.lr == pytest.approx(1e-4)  # the released config's one-machine batch of 16 videos
    assert lr_at(0.0, r) == pytest.approx(1e-6)  # warmup starts at WARMUP_START_LR
    assert lr_at(15.0, r) == pytest.approx((1e-6 + 1e-4) / 2)  # linear
    assert lr_at(30.0, r) == pytest.approx(1e-4)  # peak at the end of warmup
    assert lr_at(115.0, r) == pytest.approx((1e-4 + 1e-6) / 2)  # cosine midpoint
    assert lr_at(200.0, r) == pytest.approx(1e-6)  # cosine ends at COSINE_END_LR
    lrs = [lr_at(e / 10, r) for e in range(2001)]
    peak = lrs.index(max(lrs))
    assert peak == 300 and all(a <= b for a, b in zip(lrs[:peak], lrs[1 : peak + 1]))
    assert all(a >= b for a, b in zip(lrs[peak:], lrs[peak + 1 :]))
    # four machines' batch (SlowFast's BASE_LR_SCALE_NUM_SHARDS): every lr of the schedule x4
    r4 = dataclasses.replace(r, batch_size=64)
    assert [lr_at(e, r4) for e in (0.0, 15.0, 30.0, 115.0, 200.0)] == pytest.approx(
        [4 * lr_at(e, r) for e in (0.0, 15.0, 30.0, 115.0, 200.0)])
    assert lr_at(0.0, r4) == pytest.approx(4e-6) and lr_at(200.0, r4) == pytest.approx(4e-6)
    assert get_recipe("s", "k400", batch_size=64).lr == pytest.approx(4e-4)  # linear in the global batch


def test_ssv2_and_l_recipes():
    s = get_recipe("s", "ssv2")
    assert (s.optimizer, s.momentum, s.nesterov, s.weight_decay, s.epochs, s.warmup_epochs) == (
        "sgd",
        0.9,
        True,
        1e-4,
        100,
        3.0,
    )
    assert (s.lr, s.num_classes, s.protocol, s.flip, s.repeats, s.test_clips, s.test_crops) == (
        pytest.approx(2.5e-3),
        174,
        "ssv2",
        False,
        1,
        1,
        3,
    )
    assert lr_at(0.0, s) == pytest.approx(1e-4) and lr_at(3.0, s) == pytest.approx(2.5e-3)
    assert lr_at(100.0, s) == pytest.approx(1e-6)
    l400 = get_recipe("l", "k400")
    assert (l400.num_frames, l400.sampling_rate, l400.crop_size, l400.test_clips, l400.test_crops) == (
        40,
        3,
        312,
        5,
        3,
    )
    assert l400.mean == (0.485, 0.456, 0.406) and l400.checkpoint_activations
    # SSv2: short-side jitter + random crop, not the random resized crop; validated every 2 epochs
    jitter = [get_recipe(size, "ssv2").train_short_side for size in "sbl"]
    assert jitter == [(256, 320), (256, 320), (356, 446)]
    assert get_recipe("s", "ssv2").eval_every == 2 and get_recipe("s", "k400").train_short_side is None
    lssv2 = get_recipe("l", "ssv2")
    assert (lssv2.mixup, lssv2.grad_clip, lssv2.epochs, lssv2.lr) == (False, 2.0, 40, pytest.approx(1.25e-3))
    assert get_recipe("b", "ssv2").drop_path_rate is None  # the model config's: one table, config.py
    # ... which the engine's model takes per dataset (SlowFast's SSv2 configs: 0.4)
    pairs = (("s", "k400"), ("s", "ssv2"), ("b", "k400"), ("b", "ssv2"))
    drop_path = [get_recipe(size, data).model_config().drop_path_rate for size, data in pairs]
    assert drop_path == [0.2, 0.4, 0.3, 0.4]
    assert get_recipe("s", "ssv2").model_config().num_classes == 174
    assert get_recipe(None, "synthetic").model_config().drop_path_rate == 0.1
    ssv2 = get_recipe("s", "ssv2", depths=(1, 1, 1, 1), embed_dim=16)
    one_cpu = Dist(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    assert build(ssv2, None, one_cpu, reinit_head=False).cfg == ssv2.model_config()


def test_param_groups_follow_slowfast_zero_decay():
    model = build_model("s", "k400", **TINY)
    r = get_recipe("s", "k400")
    decay, no_decay = param_groups(model, r)
    names = {id(p): n for n, p in model.named_parameters()}
    no_decay_names = {names[id(p)] for p in no_decay["params"]}
    decay_names = {names[id(p)] for p in decay["params"]}
    assert no_decay["weight_decay"] == 0.0 and decay["weight_decay"] == 0.05
    assert no_decay_names == {n for n, p in model.named_parameters() if p.ndim == 1 or n.endswith(".bias")}
    assert {"blocks.0.norm1.weight", "blocks.0.attn.qkv.bias", "patch_embed.proj.bias"} <= no_decay_names
    # ZERO_DECAY_POS_CLS is False in every MViTv2 config: cls token and rel-pos tables decay
    assert {
        "cls_token",
        "blocks.0.attn.rel_pos_h",
        "blocks.0.attn.rel_pos_t",
        "blocks.0.attn.qkv.weight",
        "patch_embed.proj.weight",
    } <= decay_names
    _, no_decay = param_groups(model, get_recipe("s", "k400", zero_decay_pos_cls=True))
    assert "cls_token" in {names[id(p)] for p in no_decay["params"]}
    opt = build_optimizer(model, r)
    assert isinstance(opt, torch.optim.AdamW) and opt.defaults["betas"] == (0.9, 0.999)
    sgd = build_optimizer(model, get_recipe("s", "ssv2"))
    assert isinstance(sgd, torch.optim.SGD) and sgd.defaults["nesterov"] and sgd.defaults["momentum"] == 0.9
    assert [g["weight_decay"] for g in sgd.param_groups] == [1e-4, 0.0]


def test_gradient_accumulation_reaches_the_global_batch():
    r = get_recipe("s", "k400", batch_size=64)
    assert accumulation(r, 1) == (8, 8)
    assert accumulation(r, 8) == (8, 1)
    assert accumulation(get_recipe("l", "k400"), 2) == (2, 4)
    # mixup mixes two videos of a micro-batch: one per device cannot be mixed with another
    with pytest.raises(ValueError, match="batch_per_device 1 .* must be 2 or more"):
        accumulation(r, 64)
    assert accumulation(get_recipe("s", "k400", batch_size=64, mixup=False), 64) == (1, 1)
    with pytest.raises(ValueError, match="not divisible"):
        accumulation(r, 3)
    with pytest.raises(ValueError, match="batch_per_device 3"):
        accumulation(get_recipe("s", "k400", batch_size=64, batch_per_device=3), 1)


# ---- multi-view aggregation ----------------------------------------------------------------------


def test_aggregate_views_sums_softmax_per_video():
    # 3 videos x 2 views, 3 classes; the single views disagree, the sum decides.
    logits = torch.tensor(
        [
            [4.0, 0, 0],
            [0, 1.0, 0],  # video 0: view 0 says class 0 strongly
            [0, 2.0, 0],
            [0, 0, 2.1],  # video 1: near tie, class 2 slightly
            [0, 0, 1.0],
            [3.0, 0, 0],
        ]
    )  # video 2
    index = torch.tensor([0, 0, 2, 2, 1, 1])  # views arrive in any order
    probs = logits.softmax(-1)
    scores, counts = aggregate_views(probs, index, 3)
    assert counts.tolist() == [2, 2, 2]
    torch.testing.assert_close(scores[2], (probs[2] + probs[3]).double())
    assert scores.argmax(1).tolist() == [0, 0, 2]
    labels = torch.tensor([0, 2, 1])
    hit1, hit5 = topk_hits(scores, labels)
    assert hit1.tolist() == [True, False, False] and hit5.all()  # top-5 capped at 3 classes
    per_class = per_class_accuracy(hit1, labels, 4)
    assert per_class[:3].tolist() == [1.0, 0.0, 0.0] and math.isnan(per_class[3])


class _FakeModel(torch.nn.Module):
    """Logits are the clip's first value per class: clip[:, :C, 0, 0, 0]."""

    def forward(self, x):
        return x[:, :, 0, 0, 0]


def test_evaluate_counts_every_listed_video_once(tmp_path):
    # 4 videos, 2 views each; video 3's file is unreadable: the loader's stand-in views (video 1's
    # frames, its label) are marked -1 and must not be scored, neither for video 1 nor alone.
    def clip(*values):
        c = torch.zeros(1, 3, 1, 1, 1)
        c[0, :, 0, 0, 0] = torch.tensor(values)
        return c

    views = [
        (0, clip(5, 0, 0)),
        (0, clip(5, 0, 0)),
        (1, clip(0, 5, 0)),
        (1, clip(0, 0, 5)),
        (2, clip(0, 0, 5)),
        (2, clip(0, 0, 5)),
        (-1, clip(0, 0, 5)),
        (-1, clip(0, 0, 5)),
    ]
    labels = [0, 1, 2, 0]
    batches = [
        Batch(
            torch.cat([c for _, c in views[i : i + 3]]),
            torch.tensor([labels[v if v >= 0 else 1] for v, _ in views[i : i + 3]]),
            torch.tensor([v for v, _ in views[i : i + 3]]),
        )
        for i in range(0, 8, 3)
    ]
    result = evaluate(_FakeModel(), batches, labels, 3, 2, device=torch.device("cpu"))
    assert result.num_videos == 4 and result.num_views == 6 and result.views.tolist() == [2, 2, 2, 0]
    assert result.top1 == 75.0  # videos 0, 1, 2 right; video 3 (no views) wrong, not class 0 by default
    assert result.view_top1 == 100 * 5 / 6  # video 1's second view is wrong; the stand-ins not counted
    assert result.incomplete == [3] and result.metrics()["incomplete"] == [3]
    assert result.per_class[0] == 50.0 and result.per_class[1] == 100.0

    paths = [f"v{i}.mp4" for i in range(4)]
    write_predictions(tmp_path / "preds.csv", result, paths)
    with open(tmp_path / "preds.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["views"], r["top5"].split()[:1]) for r in rows] == [("2", ["0"]), ("2", ["1"]), ("2", ["2"]),
                                                                ("0", [])]
    assert rows[3]["top1_prob"] == ""  # no prediction invented for a video that was never seen
    write_predictions(tmp_path / "preds.pt", result, paths)
    dump = torch.load(tmp_path / "preds.pt", weights_only=False)
    assert dump["views"].tolist() == [2, 2, 2, 0] and dump["incomplete"] == [3] and dump["paths"] == paths
    # mmaction2's test dump: its own metric reads it (videos 0 and 2: right; video 1's two
    # classes tie, which mmaction2's argsort breaks the other way)
    write_predictions(tmp_path / "preds.pkl", result, paths)
    with open(tmp_path / "preds.pkl", "rb") as f:
        samples = pickle.load(f)
    assert [(s["filename"], s["num_views"], s["gt_label"].tolist()) for s in samples] == [
        (p, v, [y]) for p, v, y in zip(paths, [2, 2, 2, 0], labels)]
    assert torch.allclose(torch.stack([s["pred_score"] for s in samples[:3]]).sum(1), torch.ones(3))
    if importlib.util.find_spec("mmaction") is not None:
        from mmaction.evaluation.metrics.acc_metric import AccMetric

        metric = AccMetric(metric_list=("top_k_accuracy",))
        metric.process([], [samples[0], samples[2]])
        assert metric.compute_metrics(metric.results)["top1"] == 1.0
        metric = AccMetric(metric_list=("top_k_accuracy",))
        metric.process([], [samples[0], dict(samples[2], gt_label=torch.tensor([0]))])
        assert metric.compute_metrics(metric.results)["top1"] == 0.5


def test_a_saved_run_keeps_its_recipe_and_each_setting_a_command_changes_is_named():
    trained = get_recipe(None, "synthetic", depths=(1, 1, 1, 1), epochs=3, num_workers=1)
    saved = {**trained.to_dict(), "depths": [1, 1, 1, 1]}  # as read back from a JSON config
    assert saved_recipe(saved, "--resume R") == trained
    same = dict(dataset="synthetic", size="s", depths=(1, 1, 1, 1), epochs=3)  # the first command again
    assert saved_recipe(saved, "--resume R", **same, num_workers=4, max_steps=5) == dataclasses.replace(
        trained, num_workers=4, max_steps=5)  # how it runs may change
    assert saved_recipe({**saved, "max_steps": 4}, "--resume R") == trained  # a stop, not the run's
    del saved["log_every"]  # a file from before the setting existed: its default
    assert saved_recipe(saved, "--resume R").log_every == Recipe.log_every
    with pytest.raises(ValueError) as e:
        saved_recipe(saved, "--resume R", size="b", depths=(1, 2, 1, 1), num_workers=4, base_lr=2e-3)
    assert str(e.value).startswith(
        "--resume R: the run was trained with --size s, --depths 1 1 1 1, --base-lr 0.001, this command "
        "asks for --size b, --depths 1 2 1 1, --base-lr 0.002. A saved run keeps its recipe; a command may "
        "change only --attention-backend ")
    assert "--num-workers" in str(e.value) and str(e.value).endswith("from its weights with --checkpoint.")
    with pytest.raises(ValueError, match=r"trained with --no-mixup, this command asks for --mixup\. "):
        saved_recipe({**saved, "mixup": False}, "--resume R", mixup=True)
    with pytest.raises(ValueError, match="unknown recipe setting"):
        saved_recipe(saved, "--resume R", learning_rate=1.0)
    with pytest.raises(ValueError, match="max_steps must be >= 1"):
        saved_recipe(saved, "--resume R", max_steps=0)


# ---- errors --------------------------------------------------------------------------------------


def test_bad_command_lines_are_argparse_errors(capsys):
    for argv, message in [
        (["--size", "xl"], "invalid choice"),
        (["--dataset", "ucf"], "invalid choice"),
        (["--base-lr", "fast"], "invalid float"),
        (["--optimizer", "lamb"], "argument --optimizer: invalid choice: 'lamb'"),
        (["--test-crops", "2"], "test_crops must be 1 or 3"),
        (["--warmup-epochs", "300", "--epochs", "200"], "warmup_epochs"),
        (["--pool-backend", "fused"], "argument --pool-backend: invalid choice: 'fused'"),
        (["--attention-backend", "fast"], "argument --attention-backend: invalid choice: 'fast'"),
        (["--base-lr", "-1"], "base_lr must be > 0, got -1.0"),
        (["--weight-decay", "-0.1"], "weight_decay must be >= 0"),
        (["--drop-path-rate", "1"], "drop_path_rate must be in [0, 1), got 1.0"),
        (["--label-smoothing", "2"], "label_smoothing must be in [0, 1)"),
        (["--erase-prob", "1.5"], "erase_prob must be in [0, 1]"),
        (["--min-crop-area", "0"], "min_crop_area must be in (0, 1]"),
        (["--betas", "0.9"], "betas must be two values in [0, 1)"),
        (["--max-steps", "0"], "max_steps must be >= 1"),
        (["--log-every", "0"], "log_every must be >= 1"),
        (["--num-classes", "0"], "num_classes must be >= 1"),
        (["--embed-dim", "0"], "embed_dim must be >= 1"),
        (["--kv-stride-adaptive", "1", "2"], "kv_stride_adaptive must be three strides >= 1"),
        (["--device", "tpu"], "argument --device: expected cpu, cuda or cuda:N, got 'tpu'"),
    ]:
        with pytest.raises(SystemExit):
            parse_args(argv)
        assert message in capsys.readouterr().err
    # a saved run's flags are checked against its own recipe (by main), not the published one:
    # its crop may be 32 where the published k400 recipe's is 224
    shorter = ["--size", "s", "--dataset", "k400", "--test-short-side", "40"]
    with pytest.raises(SystemExit):
        parse_args(shorter)
    assert "test_short_side 40 is smaller than crop_size 224" in capsys.readouterr().err
    for saved in (["--eval", "--checkpoint", "run/best.pt"], ["--resume", "run"]):
        assert parse_args(saved + shorter)["test_short_side"] == 40
    kwargs = parse_args(["--size", "b", "--no-mixup", "--depths", "1", "1", "1", "1", "--base-lr", "3e-4"])
    assert kwargs["size"] == "b" and kwargs["mixup"] is False and kwargs["depths"] == (1, 1, 1, 1)
    assert kwargs["base_lr"] == 3e-4 and "epochs" not in kwargs  # untouched flags keep the recipe


def test_pool_backend_flag_reaches_every_block():
    kwargs = parse_args(["--pool-backend", "eager"])
    recipe = get_recipe(kwargs["size"], "synthetic", pool_backend=kwargs["pool_backend"])
    one_cpu = Dist(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    model = build(recipe, None, one_cpu, reinit_head=False)
    assert [blk.attn.pool_backend for blk in model.blocks] == ["eager"] * len(model.blocks)
    assert recipe.to_dict()["pool_backend"] == "eager"  # the resolved config that main prints


def test_unreadable_checkpoint_is_not_called_a_mismatch(tmp_path):
    recipe = get_recipe("s", "synthetic")
    one_cpu = Dist(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    (tmp_path / "zeros.pyth").write_bytes(bytes(64))
    with pytest.raises(ValueError, match=r"^--checkpoint: .*zeros.pyth is not a PyTorch checkpoint"):
        build(recipe, str(tmp_path / "zeros.pyth"), one_cpu, reinit_head=False)


def test_bad_main_arguments_raise_clear_value_errors(tmp_path):
    with pytest.raises(ValueError, match="--train-list FILE is required for --dataset k400"):
        main(dataset="k400", val_list=__file__, device="cpu")
    with pytest.raises(ValueError, match="--val-list .*missing.csv: no such file"):
        main(dataset="k400", train_list=__file__, val_list=str(tmp_path / "missing.csv"), device="cpu")
    with pytest.raises(ValueError, match="--eval needs --checkpoint"):
        main(eval_only=True, device="cpu")
    with pytest.raises(ValueError, match="--checkpoint .*nope.pt: no such file"):
        main(eval_only=True, checkpoint=str(tmp_path / "nope.pt"), device="cpu")
    with pytest.raises(ValueError, match="--checkpoint .*: is a folder, not a checkpoint file"):
        main(eval_only=True, checkpoint=str(tmp_path), device="cpu")
    lists = {name: tmp_path / f"{name}.txt" for name in ("ok", "past_head", "classes")}
    lists["ok"].write_text("a.mp4 0\nb.mp4 399\n")
    lists["past_head"].write_text("a.mp4 0\nb.mp4 400\nc.mp4 401\n")
    lists["classes"].write_text("abseiling\nair drumming\n")
    with pytest.raises(ValueError, match=r"--val-list .*past_head.txt: 2 entries have labels >= 400, .* "
                                         r"e.g. label 400 of b.mp4"):
        main(dataset="k400", train_list=str(lists["ok"]), val_list=str(lists["past_head"]), device="cpu")
    with pytest.raises(ValueError, match="--train-list .*past_head.txt: 2 entries have labels >= 400"):
        main(dataset="k400", train_list=str(lists["past_head"]), val_list=str(lists["ok"]), device="cpu",
             run_dir=str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()  # refused before a run folder is made
    with pytest.raises(ValueError, match="--label-map .*classes.txt: 2 class names for a model of 400"):
        main(dataset="k400", train_list=str(lists["ok"]), val_list=str(lists["ok"]),
             label_map=str(lists["classes"]), device="cpu")
    (tmp_path / "a_file").write_text("")
    with pytest.raises(ValueError, match="--run-dir .*a_file is a file"):
        main(run_dir=str(tmp_path / "a_file"), device="cpu")
    # a new run in a folder that holds one: refused, nothing of that run touched
    held = tmp_path / "held" / "checkpoints"
    held.mkdir(parents=True)
    (held / "step_000000003.pt").write_bytes(b"")
    (held.parent / "train.csv").write_text("step\n1\n")
    with pytest.raises(ValueError, match="--run-dir .*held holds a run already .*step_000000003.pt.: "
                                         "continue it with --resume"):
        main(run_dir=str(held.parent), device="cpu")
    assert (held.parent / "train.csv").read_text() == "step\n1\n"
    with pytest.raises(ValueError, match="--dump .*preds.csv: cannot write there .*a_file is not a folder"):
        main(eval_only=True, checkpoint=__file__, dump=str(tmp_path / "a_file" / "preds.csv"), device="cpu")
    # a run folder is the checkpoint's grandparent only for a run's own checkpoints/ folder
    with pytest.raises(ValueError, match="--resume .*test_engine.py: not in a run's checkpoints/ folder; "
                                         "name the run folder to continue in with --run-dir"):
        main(resume=__file__, device="cpu")
    with pytest.raises(ValueError, match="unknown recipe setting"):
        main(learning_rate=1.0, device="cpu")
    with pytest.raises(ValueError, match="unknown MViTv2 size 'xl'"):
        main(size="xl", device="cpu")


def test_a_missing_decoder_is_named_before_the_run_starts(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "nvidia.dali", None)  # as if not installed: its import fails
    run = tmp_path / "run"
    assert cli(["--loader", "dali", "--run-dir", str(run), "--data-root", str(tmp_path / "data"),
                "--device", "cpu", "--no-progress"]) == 2
    assert capsys.readouterr().err.startswith(
        "error: the DALI backend needs NVIDIA DALI: pip install 'mvit-fast[dali]'")
    assert not run.exists() and not (tmp_path / "data").exists()  # nothing written, nothing generated
