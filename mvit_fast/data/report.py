"""Bad-data bookkeeping: what went wrong with which file, summed over an epoch.

Samples never fail an epoch: a missing, undecodable or zero-frame video is replaced by
another sample; a too-short or truncated one is padded with its last frame. Each event
is an `Issue` that travels with the batch (so it survives DataLoader worker processes)
and is summed into a `DataReport` at the end of the epoch.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Literal

IssueKind = Literal["missing", "undecodable", "zero_frames", "too_short", "truncated"]
REPLACED_KINDS = ("missing", "undecodable", "zero_frames")  # the sample was replaced by another
PADDED_KINDS = ("too_short", "truncated")  # the sample was used, padded with its last frame


class DataError(RuntimeError):
    """Too much of the data is unreadable to train on it meaningfully."""


@dataclass(frozen=True)
class Issue:
    path: str
    kind: IssueKind
    detail: str = ""


@dataclass
class DataReport:
    """Issues seen in one epoch, and how many samples were delivered."""

    samples: int = 0
    counts: Counter = field(default_factory=Counter)
    paths: dict[str, set[str]] = field(default_factory=lambda: defaultdict(set))
    issues: list[Issue] = field(default_factory=list)  # every one, in order, with its detail

    def add(self, issues: list[Issue], samples: int = 0) -> None:
        self.samples += samples
        self.issues.extend(issues)
        for issue in issues:
            self.counts[issue.kind] += 1
            self.paths[issue.kind].add(issue.path)

    @property
    def replaced(self) -> int:
        return sum(self.counts[k] for k in REPLACED_KINDS)

    @property
    def padded(self) -> int:
        return sum(self.counts[k] for k in PADDED_KINDS)

    def failure_fraction(self) -> float:
        """Failed reads over all reads tried (delivered samples + failed reads)."""
        tried = self.samples + self.replaced
        return self.replaced / tried if tried else 0.0

    def check(self, max_fail_fraction: float) -> None:
        """Raise `DataError` when more than `max_fail_fraction` of the reads failed."""
        if self.replaced >= 8 and self.failure_fraction() > max_fail_fraction:
            raise DataError(
                f"{self.replaced} of {self.samples + self.replaced} video reads failed "
                f"({self.failure_fraction():.0%} > {max_fail_fraction:.0%}): {self.summary()}\n"
                "Is the list's --root right? "
                "Run `python -m mvit_fast.data scan LIST --root DIR` to see every bad file."
            )

    def summary(self, max_paths: int = 5) -> str:
        if not self.counts:
            return f"{self.samples} samples, no bad videos"
        parts = [f"{self.samples} samples; replaced {self.replaced}, padded {self.padded}"]
        for kind in REPLACED_KINDS + PADDED_KINDS:
            if self.counts[kind]:
                paths = sorted(self.paths[kind])
                more = f" (+{len(paths) - max_paths} more)" if len(paths) > max_paths else ""
                parts.append(
                    f"{kind} {self.counts[kind]}x in {len(paths)} files: {', '.join(paths[:max_paths])}{more}"
                )
        return "; ".join(parts)
