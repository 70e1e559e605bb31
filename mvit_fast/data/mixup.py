"""Mixup / CutMix with label smoothing on a batch, on whatever device the batch is on.

timm's `Mixup` in "batch" mode, as SlowFast's MViTv2 recipe uses it: per batch, CutMix
(alpha 1.0) with probability `switch_prob`, else Mixup (alpha 0.8); the CutMix box is the
same on every frame and lambda is corrected to the box's true area. Each clip is mixed with a
clip of another video: the batch rolled by one video (`views` adjacent clips per video, as
repeated augmentation lays them out). timm mixes with the batch flipped, which pairs the two
views of one video whenever a batch holds one video (or the middle one of an odd count), and
mixing a video with itself is no mixup. Targets are smoothed one-hots mixed by lambda.
The random draws are host-side Python numbers, so nothing syncs with the device.
"""

from __future__ import annotations

import numpy as np
import torch


def smooth_one_hot(labels: torch.Tensor, num_classes: int, smoothing: float) -> torch.Tensor:
    off = smoothing / num_classes
    target = torch.full((labels.shape[0], num_classes), off, device=labels.device)
    return target.scatter_(1, labels.long().view(-1, 1), 1.0 - smoothing + off)


class MixupCutmix:
    """Callable ``(clips (B, C, T, H, W), labels (B,)) -> (mixed clips, soft targets (B, classes))``.

    `clips` is mixed in place (it is a fresh batch). Clips come in groups of `views` adjacent
    views of one video; B must hold at least two videos.
    """

    def __init__(
        self,
        num_classes: int,
        *,
        mixup_alpha: float = 0.8,
        cutmix_alpha: float = 1.0,
        switch_prob: float = 0.5,
        label_smoothing: float = 0.1,
        views: int = 1,
        seed: int | None = None,
    ):
        self.num_classes = num_classes
        self.mixup_alpha, self.cutmix_alpha = mixup_alpha, cutmix_alpha
        self.switch_prob, self.label_smoothing = switch_prob, label_smoothing
        self.views = views
        self.rng = np.random.default_rng(seed)

    def _draw(self) -> tuple[float, bool]:
        use_cutmix = self.cutmix_alpha > 0 and (self.mixup_alpha <= 0 or self.rng.random() < self.switch_prob)
        alpha = self.cutmix_alpha if use_cutmix else self.mixup_alpha
        return (float(self.rng.beta(alpha, alpha)) if alpha > 0 else 1.0), use_cutmix

    def __call__(self, clips: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        n = clips.shape[0]
        if n % self.views or n < 2 * self.views:
            raise ValueError(
                f"mixup pairs clips of different videos: {n} clips in groups of {self.views} views "
                f"are not two or more whole videos"
            )
        lam, use_cutmix = self._draw()
        partner = clips.roll(self.views, 0)  # a copy, taken before clips changes
        if use_cutmix:
            h, w = clips.shape[-2:]
            cut = np.sqrt(1 - lam)
            cut_h, cut_w = int(h * cut), int(w * cut)
            cy, cx = int(self.rng.integers(0, h)), int(self.rng.integers(0, w))
            y0, y1 = np.clip([cy - cut_h // 2, cy + cut_h // 2], 0, h)
            x0, x1 = np.clip([cx - cut_w // 2, cx + cut_w // 2], 0, w)
            clips[..., y0:y1, x0:x1] = partner[..., y0:y1, x0:x1]
            lam = 1 - (y1 - y0) * (x1 - x0) / (h * w)
        elif lam < 1:
            clips.mul_(lam).add_(partner.mul_(1 - lam))
        target = smooth_one_hot(labels, self.num_classes, self.label_smoothing)
        return clips, target * lam + target.roll(self.views, 0) * (1 - lam)
