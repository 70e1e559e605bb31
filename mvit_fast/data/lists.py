"""Annotation lists and label maps.

Three list formats, one record type:

- SlowFast csv and mmaction2 video lists: ``path label`` (space separated; the path
  may itself contain spaces, as Kinetics' class folders do, so the label is split off the
  right end).
- mmaction2 rawframe lists and the seed's K400 val list: ``video_id num_frames label``
  (the two numbers split off the right end likewise). The video file is ``root/video_id``
  or, when that has no suffix, the first of ``root/video_id.{mp4,webm,mkv,avi}`` that exists.

The format is detected from the first entry: three fields whose last two are integers is
``video_id num_frames label``.

Malformed lines raise `ListFormatError` naming the file and the 1-based line number.
"""

from __future__ import annotations

import csv
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from ..checkpoint import atomic_write

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
    fields = line.rsplit(None, 2)
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
            fields = line.rsplit(None, 2)
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
    return parse_list(_read_text(path), root=root, fmt=fmt, source=str(path))


def _read_text(path: str | os.PathLike) -> str:
    """A list or label map's text; a byte-order mark (Windows editors write one) is dropped."""
    try:
        return Path(path).read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise ListFormatError(f"{path}: not a UTF-8 text file (byte {e.start}: {e.reason})") from None


def write_list(path: str | os.PathLike, records: list[VideoRecord], *, root: str | os.PathLike = "") -> None:
    """Write `records` as ``path label`` (paths relative to `root` when given), or as
    ``video_id num_frames label`` when every record has a frame count."""
    with_counts = bool(records) and all(r.num_frames is not None for r in records)  # one format per list
    lines = []
    for r in records:
        name = os.path.relpath(r.path, root) if root else r.path
        lines.append(f"{name} {r.num_frames} {r.label}" if with_counts else f"{name} {r.label}")
    text = "\n".join(lines) + "\n"
    # A temp file of its own, then a rename: a reader (another rank) never sees a torn list,
    # and writers of the same list at once do not collide.
    atomic_write(path, lambda f: f.write(text.encode()))


def read_label_map(path: str | os.PathLike) -> list[str]:
    """Class names indexed by label: a text file with one name per line (mmaction2's
    label_map_k400.txt), a json object ``{name: index}`` (SSv2's labels json), or a csv of
    ``index,name`` rows with an optional header row (Kinetics' ``id,name`` files)."""
    path = Path(path)
    text = _read_text(path)
    suffix = path.suffix.lower()
    if suffix == ".json":
        try:
            mapping = json.loads(text)
        except json.JSONDecodeError as e:
            raise ListFormatError(f"{path}:{e.lineno}: not JSON ({e.msg})") from None
        if not isinstance(mapping, dict):
            raise ListFormatError(f"{path}: expected a json object {{name: index}}")
        names = _names_by_index(((str(path), name, index) for name, index in mapping.items()), str(path))
    elif suffix == ".csv":
        lines = enumerate(csv.reader(text.splitlines()), start=1)
        rows = [(f"{path}:{lineno}", row) for lineno, row in lines if row]
        if rows and not rows[0][1][0].strip().isdigit():
            rows = rows[1:]  # the header row
        for where, row in rows:
            if len(row) != 2:
                raise ListFormatError(f"{where}: expected 'index,name', got {','.join(row)!r}")
        names = _names_by_index(((where, name.strip(), index) for where, (index, name) in rows), str(path))
    else:
        names = [line.strip() for line in text.splitlines()]
        while names and not names[-1]:
            names.pop()
        for lineno, name in enumerate(names, start=1):
            if not name:
                raise ListFormatError(f"{path}:{lineno}: empty class name")
    if not names:
        raise ListFormatError(f"{path}: the label map has no class names")
    return names


def _names_by_index(entries, source: str) -> list[str]:
    """Names placed at their (where, name, index) indices, which must cover 0..n-1 once each."""
    by_index: dict[int, str] = {}
    for where, name, index in entries:
        i = _int(str(index).strip(), f"index of {name!r}", where)
        if i in by_index:
            raise ListFormatError(f"{where}: index {i} is given to both {by_index[i]!r} and {name!r}")
        by_index[i] = name
    missing = sorted(set(range(len(by_index))) - set(by_index))
    if missing:
        raise ListFormatError(f"{source}: no class name for index {missing[0]} (indices must be 0..n-1)")
    return [by_index[i] for i in range(len(by_index))]
