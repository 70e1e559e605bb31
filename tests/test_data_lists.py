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


@pytest.mark.parametrize("first_counted", [True, False])
def test_a_list_with_some_frame_counts_is_written_in_one_format(tmp_path, first_counted):
    records = [VideoRecord(str(tmp_path / "a.mp4"), 0), VideoRecord(str(tmp_path / "b.mp4"), 1, 30)]
    records = records[::-1] if first_counted else records
    write_list(tmp_path / "l.txt", records, root=tmp_path)
    assert read_list(tmp_path / "l.txt", root=tmp_path) == [VideoRecord(r.path, r.label) for r in records]


def test_label_maps_txt_and_json(tmp_path):
    (tmp_path / "k.txt").write_text("abseiling\nair drumming\n\n")
    assert read_label_map(tmp_path / "k.txt") == ["abseiling", "air drumming"]
    (tmp_path / "s.json").write_text(json.dumps({"Pushing [something]": "1", "Holding [something]": "0"}))
    assert read_label_map(tmp_path / "s.json") == ["Holding [something]", "Pushing [something]"]
    (tmp_path / "bad.json").write_text(json.dumps({"a": 0, "b": 0}))
    with pytest.raises(ListFormatError, match="bad.json: index 0 is given to both 'a' and 'b'"):
        read_label_map(tmp_path / "bad.json")
    (tmp_path / "gap.txt").write_text("a\n\nb\n")
    with pytest.raises(ListFormatError, match="gap.txt:2: empty class name"):
        read_label_map(tmp_path / "gap.txt")


def test_frame_count_lists_allow_spaces_in_paths(tmp_path):
    """Kinetics' class folders have spaces; `scan --frames-out` writes such paths with counts."""
    records = [VideoRecord(str(tmp_path / "air drumming" / "a b.mp4"), 1, 300),
               VideoRecord(str(tmp_path / "abseiling" / "c.mp4"), 0, 250)]
    write_list(tmp_path / "frames.txt", records, root=tmp_path)
    assert (tmp_path / "frames.txt").read_text().splitlines()[0] == "air drumming/a b.mp4 300 1"
    assert read_list(tmp_path / "frames.txt", root=tmp_path) == records
    assert parse_list("abseiling/c.mp4 0\nair drumming/a.mp4 1\n")[1] == VideoRecord("air drumming/a.mp4", 1)


def test_a_byte_order_mark_is_dropped_and_binary_files_are_refused(tmp_path):
    (tmp_path / "bom.txt").write_bytes("\ufeffa.mp4 0\n".encode())
    assert read_list(tmp_path / "bom.txt") == [VideoRecord("a.mp4", 0)]
    (tmp_path / "bom_classes.txt").write_bytes("\ufeffabseiling\n".encode())
    assert read_label_map(tmp_path / "bom_classes.txt") == ["abseiling"]
    (tmp_path / "clip.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42\xff\xfe")
    with pytest.raises(ListFormatError, match="clip.mp4: not a UTF-8 text file"):
        read_list(tmp_path / "clip.mp4")


def test_label_maps_csv_and_errors(tmp_path):
    (tmp_path / "k.csv").write_text("id,name\n1,air drumming\n0,abseiling\n")
    assert read_label_map(tmp_path / "k.csv") == ["abseiling", "air drumming"]
    (tmp_path / "plain.csv").write_text("0,abseiling\n1,\"answering questions, phone\"\n")
    assert read_label_map(tmp_path / "plain.csv") == ["abseiling", "answering questions, phone"]
    (tmp_path / "S.JSON").write_text(json.dumps({"b": 1, "a": 0}))
    assert read_label_map(tmp_path / "S.JSON") == ["a", "b"]
    cases = {
        "short.csv": ("id,name\n0,a\n1\n", "short.csv:3: expected 'index,name'"),
        "gap.csv": ("0,a\n2,c\n", "gap.csv: no class name for index 1"),
        "word.csv": ("id,name\n0,a\none,b\n", "word.csv:3: index of 'b' must be an integer"),
        "cut.json": ('{"a": 0,', "cut.json:1: not JSON"),
        "empty.txt": ("\n\n", "empty.txt: the label map has no class names"),
        "empty.json": ("{}", "empty.json: the label map has no class names"),
    }
    for name, (text, message) in cases.items():
        (tmp_path / name).write_text(text)
        with pytest.raises(ListFormatError, match=message):
            read_label_map(tmp_path / name)
