"""Annotation lists and label maps: the three formats, the root, and errors naming file:line."""

import json

import pytest

from mvit_fast.data.lists import (
    ListFormatError,
    VideoRecord,
    parse_list,
    read_label_map,
    read_list,
    write_list,
)


def test_path_label_lists_join_the_root_and_allow_spaces(tmp_path):
    listing = tmp_path / "train.csv"
    listing.write_text("a/x.mp4 3\n\n# a comment\nb/my video.mp4 0\n")
    assert read_list(listing, root="/data") == [
        VideoRecord("/data/a/x.mp4", 3),
        VideoRecord("/data/b/my video.mp4", 0),
    ]


def test_id_frames_label_lists_resolve_the_video_suffix(tmp_path):
    (tmp_path / "abc.webm").write_bytes(b"")
    records = parse_list("abc 300 7\nmissing 10 1\n", root=tmp_path)
    assert records == [
        VideoRecord(str(tmp_path / "abc.webm"), 7, 300),
        VideoRecord(str(tmp_path / "missing"), 1, 10),
    ]


def test_format_can_be_forced():
    assert parse_list("clip 12 3\n", fmt="path_label") == [VideoRecord("clip 12", 3)]


@pytest.mark.parametrize(
    "text,line,message",
    [
        ("a.mp4 1\nb.mp4 x\n", 2, "label must be an integer, got 'x'"),
        ("a.mp4 1\nb.mp4\n", 2, "expected 'path label'"),
        ("a 10 1\n\nb 10\n", 3, "expected 'video_id num_frames label'"),
        ("a 10 1\nb ten 1\n", 2, "num_frames must be an integer, got 'ten'"),
        ("a.mp4 -1\n", 1, "label must be >= 0"),
    ],
)
def test_malformed_lines_name_file_and_line(tmp_path, text, line, message):
    listing = tmp_path / "bad.txt"
    listing.write_text(text)
    with pytest.raises(ListFormatError, match=f"{listing}:{line}: {message}"):
        read_list(listing)


def test_empty_list_is_an_error():
    with pytest.raises(ListFormatError, match="no entries"):
        parse_list("# only a comment\n", source="x.csv")


def test_write_then_read_round_trips(tmp_path):
    records = [VideoRecord(str(tmp_path / "a.mp4"), 1, 30), VideoRecord(str(tmp_path / "b.mp4"), 2, 31)]
    write_list(tmp_path / "l.txt", records, root=tmp_path)
    assert (tmp_path / "l.txt").read_text() == "a.mp4 30 1\nb.mp4 31 2\n"
    assert read_list(tmp_path / "l.txt", root=tmp_path) == records


def test_label_maps_txt_and_json(tmp_path):
    (tmp_path / "k.txt").write_text("abseiling\nair drumming\n\n")
    assert read_label_map(tmp_path / "k.txt") == ["abseiling", "air drumming"]
    (tmp_path / "s.json").write_text(json.dumps({"Pushing [something]": "1", "Holding [something]": "0"}))
    assert read_label_map(tmp_path / "s.json") == ["Holding [something]", "Pushing [something]"]
    (tmp_path / "bad.json").write_text(json.dumps({"a": 0, "b": 0}))
    with pytest.raises(ListFormatError, match="repeated"):
        read_label_map(tmp_path / "bad.json")
    (tmp_path / "gap.txt").write_text("a\n\nb\n")
    with pytest.raises(ListFormatError, match="gap.txt:2: empty class name"):
        read_label_map(tmp_path / "gap.txt")
