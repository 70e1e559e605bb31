"""Multi-view evaluation: softmax per view, summed per video, top-k and per-class accuracy.

Views of one video (K400: temporal clips x spatial crops; SSv2: 1 x 3 crops) arrive with
the video's list position in `Batch.video_index`; each rank scores its disjoint shard of
the list (test shards are not padded), and the per-video score sums are all-reduced, so
accuracies are over the list exactly once. A video whose file could not be read gets no
views (the loader's stand-in views carry video_index -1 and are not scored): it is counted
wrong and listed in `EvalResult.incomplete`, as is any video with fewer views than the protocol.
"""

from __future__ import annotations

import csv
import math
import os
import pickle
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from ..checkpoint import atomic_save, atomic_write
from .dist import all_reduce_sum


def aggregate_views(probs: Tensor, video_index: Tensor, num_videos: int) -> tuple[Tensor, Tensor]:
    """(scores (num_videos, C): per-video sum of `probs` (N, C) over its views, views per video)."""
    scores = torch.zeros(num_videos, probs.shape[1], dtype=torch.float64, device=probs.device)
    scores.index_add_(0, video_index, probs.double())
    return scores, torch.bincount(video_index, minlength=num_videos)


def topk_hits(scores: Tensor, labels: Tensor, ks: tuple[int, ...] = (1, 5)) -> list[Tensor]:
    """For each k, a bool per row: is the label among the row's top k scores (k capped at C)."""
    top = scores.topk(min(max(ks), scores.shape[1]), dim=1).indices
    hits = top == labels.view(-1, 1)
    return [hits[:, :k].any(1) for k in ks]


def per_class_accuracy(correct: Tensor, labels: Tensor, num_classes: int) -> Tensor:
    """Accuracy of each class from per-video `correct` bools (fraction; NaN for a class with no video)."""
    total = torch.bincount(labels, minlength=num_classes).double()
    hits = torch.zeros(num_classes, dtype=torch.float64, device=labels.device)
    hits.index_add_(0, labels, correct.double())
    return torch.where(total > 0, hits / total.clamp(min=1), torch.full_like(total, math.nan))


@dataclass
class EvalResult:
    """Accuracies in percent. `top1`/`top5`: views aggregated, over every video of the list;
    `view_top1`/`view_top5`: every view scored alone (the single-view accuracy)."""

    top1: float
    top5: float
    view_top1: float
    view_top5: float
    mean_class_top1: float
    num_videos: int
    num_views: int
    views_per_video: int
    per_class: list[float] = field(repr=False)  # percent per class, NaN for absent classes
    scores: Tensor = field(repr=False)  # (num_videos, C) summed softmax, CPU float64
    labels: Tensor = field(repr=False)  # (num_videos,)
    views: Tensor = field(repr=False)  # (num_videos,) views scored per video
    incomplete: list[int] = field(default_factory=list)  # videos with fewer views than the protocol

    def summary(self) -> str:
        text = (
            f"{self.num_videos} videos x {self.views_per_video} views: top-1 {self.top1:.2f}%, "
            f"top-5 {self.top5:.2f}% (all views); single view top-1 {self.view_top1:.2f}%, "
            f"top-5 {self.view_top5:.2f}%; mean per-class top-1 {self.mean_class_top1:.2f}%"
        )
        if self.incomplete:
            text += f"; {len(self.incomplete)} videos with missing views (unreadable files)"
        return text

    def metrics(self) -> dict:
        return {
            k: getattr(self, k)
            for k in (
                "top1",
                "top5",
                "view_top1",
                "view_top5",
                "mean_class_top1",
                "num_videos",
                "num_views",
                "views_per_video",
                "incomplete",
            )
        }


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader,
    labels: list[int],
    num_classes: int,
    views_per_video: int,
    *,
    device: torch.device,
    amp_dtype: torch.dtype | None = None,
    progress: bool = False,
) -> EvalResult:
    """Score every view the loader yields and aggregate per video over the whole list (all ranks).

    `labels` are the list's labels by position; `loader` yields `Batch(clips, labels, video_index)`.
    """
    from tqdm import tqdm

    was_training = model.training
    model.eval()
    num_videos = len(labels)
    scores = torch.zeros(num_videos, num_classes, dtype=torch.float64, device=device)
    counts = torch.zeros(num_videos, dtype=torch.int64, device=device)
    view_hits = torch.zeros(3, dtype=torch.float64, device=device)  # top-1, top-5, views
    autocast = torch.autocast(device.type, dtype=amp_dtype) if amp_dtype is not None else nullcontext()
    for batch in tqdm(loader, desc="eval", disable=not progress, leave=False, dynamic_ncols=True):
        clips, view_labels, index = (t.to(device, non_blocking=True) for t in batch)
        with autocast:
            logits = model(clips)
        scored = index >= 0  # -1: a stand-in for an unreadable video
        probs, view_labels, index = logits.float().softmax(-1)[scored], view_labels[scored], index[scored]
        s, c = aggregate_views(probs, index, num_videos)
        scores += s
        counts += c
        hit1, hit5 = topk_hits(probs, view_labels)
        view_hits += torch.stack([hit1.sum(), hit5.sum(), hit1.new_tensor(len(hit1), dtype=torch.int64)])
    for t in (scores, counts, view_hits):
        all_reduce_sum(t)
    model.train(was_training)

    scores, counts, view_hits = scores.cpu(), counts.cpu(), view_hits.cpu()
    target = torch.as_tensor(labels, dtype=torch.int64)
    seen = counts > 0  # a video with no readable view scores zeros everywhere: counted wrong
    hit1, hit5 = (h & seen for h in topk_hits(scores, target))
    per_class = per_class_accuracy(hit1, target, num_classes) * 100
    present = per_class[~per_class.isnan()]
    views = max(view_hits[2].item(), 1.0)
    return EvalResult(
        top1=100 * hit1.sum().item() / num_videos,
        top5=100 * hit5.sum().item() / num_videos,
        view_top1=100 * view_hits[0].item() / views,
        view_top5=100 * view_hits[1].item() / views,
        mean_class_top1=present.mean().item() if len(present) else math.nan,
        num_videos=num_videos,
        num_views=int(view_hits[2].item()),
        views_per_video=views_per_video,
        per_class=per_class.tolist(),
        scores=scores,
        labels=target,
        views=counts,
        incomplete=torch.nonzero(counts < views_per_video).flatten().tolist(),
    )


def write_predictions(
    path: str | os.PathLike, result: EvalResult, paths: list[str], class_names: list[str] | None = None
) -> None:
    """`.csv`: one row per video (index, path, label, views scored, top-5 predictions, top-1
    probability; the last two empty for a video with no view); `.pkl`: mmaction2's test dump
    (`tools/test.py --dump`), a pickled list of one dict per video with `pred_score` (the mean
    softmax over its views), `pred_label`, `gt_label`, plus `filename` and `num_views` (a video
    with no view has zero scores: mmaction2's metrics, unlike ours, may count it right);
    anything else: a torch file with the per-video mean softmax scores (zeros: no view), labels,
    paths, view counts, the incomplete videos and the metrics."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    probs = result.scores / result.scores.sum(1, keepdim=True).clamp(min=1e-12)
    if path.suffix == ".pkl":
        samples = [{"pred_score": probs[i].float().clone(), "pred_label": probs[i].argmax(0, keepdim=True),
                    "gt_label": result.labels[i : i + 1].clone(), "filename": p,
                    "num_views": int(result.views[i])} for i, p in enumerate(paths)]
        atomic_write(path, lambda f: pickle.dump(samples, f))
        return
    if path.suffix == ".csv":
        top = probs.topk(min(5, probs.shape[1]), dim=1)
        with open(path, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["index", "path", "label", "views", "top5", "top1_prob"])
            for i, p in enumerate(paths):
                views = int(result.views[i])
                w.writerow(
                    [
                        i,
                        p,
                        int(result.labels[i]),
                        views,
                        " ".join(map(str, top.indices[i].tolist())) if views else "",
                        f"{top.values[i, 0].item():.5f}" if views else "",
                    ]
                )
        return
    atomic_save(
        {
            "scores": probs.float(),
            "labels": result.labels,
            "views": result.views,
            "incomplete": result.incomplete,
            "paths": list(paths),
            "class_names": class_names,
            "metrics": result.metrics(),
        },
        path,
    )


def write_per_class(
    path: str | os.PathLike, result: EvalResult, class_names: list[str] | None = None
) -> None:
    """CSV of top-1 accuracy per class (with its number of videos)."""
    totals = torch.bincount(result.labels, minlength=len(result.per_class)).tolist()
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["class", "name", "videos", "top1"])
        for c, (acc, n) in enumerate(zip(result.per_class, totals)):
            name = class_names[c] if class_names and c < len(class_names) else ""
            w.writerow([c, name, n, "" if math.isnan(acc) else f"{acc:.2f}"])
