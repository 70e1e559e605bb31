"""Annotation lists and label maps.

Three list formats, one record type:

- SlowFast csv and mmaction2 video lists: ``path label`` (space separated; the path
  may itself contain spaces, so the label is split off the right end).
- mmaction2 rawframe lists and the seed's K400 val list: ``video_id num_frames label``.
  The video file is ``root/video_id`` or, when that has no suffix, the first of
  ``root/video_id.{mp4,webm,mkv,avi}`` that exists.

Malformed lines raise `ListFormatError` naming the file and the 1-based line number.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

ListFormat = Literal["auto", "path_label", "id_frames_label"]
VIDEO_SUFFIXES = (".mp4", ".webm", ".mkv", ".avi", ".mov")


class ListFormatError(ValueError):
    """A list or label-map line that cannot be parsed; the message names file and line."""


@dataclass(frozen=True)
class VideoRecord:
    """One list entry. `num_frames` is None when the list does not give it."""

    path: str
    label: int
    num_frames: int | None = None


def _int(token: str, what: str, where: str) -> int:
    try:
        value = int(token)
    except ValueError:
        raise ListFormatError(f"{where}: {what} must be an integer, got {token!r}") from None
    if value < 0:
        raise ListFormatError(f"{where}: {what} must be >= 0, got {value}")
    return value


def _detect_format(line: str) -> ListFormat:
    fields = line.split()
    if len(fields) == 3 and fields[1].isdigit() and fields[2].isdigit():
        return "id_frames_label"
    return "path_label"


def resolve_video_path(path: str) -> str:
    """`path` itself, or `path` + the first known video suffix that exists (else `path`)."""
    if os.path.exists(path) or Path(path).suffix.lower() in VIDEO_SUFFIXES:
        return path
    for suffix in VIDEO_SUFFIXES:
        if os.path.exists(path + suffix):
            return path + suffix
    return path


def parse_list(
    text: str, *, root: str | os.PathLike = "", fmt: ListFormat = "auto", source: str = "<list>"
) -> list[VideoRecord]:
    """Parse list text; `source` names the file in error messages. Blank lines and `#` comments skip."""
    records = []
    for lineno, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        where = f"{source}:{lineno}"
        if fmt == "auto":
            fmt = _detect_format(line)
        if fmt == "id_frames_label":
            fields = line.split()
            if len(fields) != 3:
                raise ListFormatError(f"{where}: expected 'video_id num_frames label', got {raw!r}")
            path = resolve_video_path(os.path.join(root, fields[0]))
            records.append(
                VideoRecord(path, _int(fields[2], "label", where), _int(fields[1], "num_frames", where))
            )
        elif fmt == "path_label":
            fields = line.rsplit(None, 1)
            if len(fields) != 2:
                raise ListFormatError(f"{where}: expected 'path label', got {raw!r}")
            records.append(VideoRecord(os.path.join(root, fields[0]), _int(fields[1], "label", where)))
        else:
            raise ValueError(f"unknown list format {fmt!r}; use 'auto', 'path_label' or 'id_frames_label'")
    if not records:
        raise ListFormatError(f"{source}: the list has no entries")
    return records


def read_list(
    path: str | os.PathLike, *, root: str | os.PathLike = "", fmt: ListFormat = "auto"
) -> list[VideoRecord]:
    """Read an annotation list (format detected from its first entry unless `fmt` says)."""
    return parse_list(Path(path).read_text(), root=root, fmt=fmt, source=str(path))


def write_list(path: str | os.PathLike, records: list[VideoRecord], *, root: str | os.PathLike = "") -> None:
    """Write `records` as ``path label`` (paths relative to `root` when given), or as
    ``video_id num_frames label`` when every record has a frame count."""
    lines = []
    for r in records:
        name = os.path.relpath(r.path, root) if root else r.path
        lines.append(f"{name} {r.num_frames} {r.label}" if r.num_frames is not None else f"{name} {r.label}")
    Path(path).write_text("\n".join(lines) + "\n")


def read_label_map(path: str | os.PathLike) -> list[str]:
    """Class names indexed by label: a text file with one name per line (mmaction2's
    label_map_k400.txt), or a json object ``{name: index}`` (SSv2's labels json)."""
    path = Path(path)
    if path.suffix == ".json":
        mapping = json.loads(path.read_text())
        if not isinstance(mapping, dict):
            raise ListFormatError(f"{path}: expected a json object {{name: index}}")
        names = [""] * len(mapping)
        for name, index in mapping.items():
            i = _int(str(index), f"index of {name!r}", str(path))
            if i >= len(names) or names[i]:
                raise ListFormatError(f"{path}: index {i} of {name!r} is out of range or repeated")
            names[i] = name
        return names
    names = [line.strip() for line in path.read_text().splitlines()]
    while names and not names[-1]:
        names.pop()
    for lineno, name in enumerate(names, start=1):
        if not name:
            raise ListFormatError(f"{path}:{lineno}: empty class name")
    return names
