"""The pre-flight scan and the built-in synthetic dataset."""

import fractions
import multiprocessing
import re

import numpy as np
import pytest

from mvit_fast.data import ClipSampling, TrainAugment, build_loader, make_synthetic, read_list
from mvit_fast.data.__main__ import main as cli
from mvit_fast.data.lists import VideoRecord, read_label_map, write_list
from mvit_fast.data.scan import check_file
from mvit_fast.data.synthetic import CLASSES, render_clip
from mvit_fast.data.video_io import decode_frames, probe
from tests.test_data_pyav import bad_videos
from tests.test_data_videos import av, corrupt_frame, cut_without_reencoding, make_frames, write_test_video


def test_scan_counts_every_kind_and_writes_bad_paths(tmp_path, capsys):
    folder = tmp_path / "v"
    folder.mkdir()
    write_list(tmp_path / "list.txt", [r for r in bad_videos(folder) if r.num_frames is None], root=folder)
    bad_out, frames_out = tmp_path / "bad.txt", tmp_path / "frames.txt"
    code = cli(
        [
            "scan",
            str(tmp_path / "list.txt"),
            "--root",
            str(folder),
            "--min-frames",
            "13",
            "--workers",
            "2",
            "--bad-out",
            str(bad_out),
            "--frames-out",
            str(frames_out),
        ]
    )
    out, err = capsys.readouterr()
    assert code == 1
    assert "scan: 100%" in err and "9/9" in err  # the progress bar, on stderr
    assert "files: 9  found: 8  missing: 1" in out
    assert "status: missing 1, ok 4, too_short 1, truncated 1, undecodable 1, zero_frames 1" in out
    assert "codecs: h264 7" in out
    assert re.search(r"fingerprint: 9 files, 1 missing, \d+ frames \[h264=7\] list-sha256:[0-9a-f]{16}\n",
                     out)
    bad = dict(line.split(" ", 1)[::-1] for line in bad_out.read_text().splitlines())
    assert {k.rsplit("/", 1)[1]: v for k, v in bad.items()} == {
        "short.mp4": "too_short",
        "cut.mp4": "truncated",
        "garbage.mp4": "undecodable",
        "empty.mp4": "zero_frames",
        "gone.mp4": "missing",
    }
    good = read_list(frames_out, root=folder)
    assert [(r.num_frames, r.label) for r in good] == [(32, 0), (32, 2), (32, 4), (32, 1), (5, 4)]
    cli(
        [
            "scan",
            str(tmp_path / "list.txt"),
            "--root",
            str(folder),
            "--min-frames",
            "13",
            "--workers",
            "1",
            "--bad-out",
            str(bad_out),
        ]
    )
    assert capsys.readouterr().out.splitlines()[4] == out.splitlines()[4]  # same fingerprint


def test_scan_counts_the_frames_an_edit_list_shows_as_the_loaders_do(tmp_path):
    cut = cut_without_reencoding(write_test_video(tmp_path / "a.mp4", 31), tmp_path / "cut.mp4")
    check = check_file(cut)
    assert (check.status, check.num_frames) == ("ok", probe(cut, count_packets=True).num_frames)


def test_decode_all_finds_what_the_first_frame_misses(tmp_path, capsys):
    good = write_test_video(tmp_path / "good.mp4", 32)
    corrupt = corrupt_frame(good, tmp_path / "corrupt.mp4", frame=16)
    assert check_file(corrupt).status == "ok"  # the first frame and the packet count are fine
    check = check_file(corrupt, decode_all=True)
    assert check.status == "corrupt" and check.num_frames == 32
    assert re.match(r"1[0-6] of 32 frames decoded: .*Invalid data", check.detail), check.detail
    assert check_file(good, decode_all=True).status == "ok"
    write_list(tmp_path / "list.txt", [VideoRecord(good, 0), VideoRecord(corrupt, 1)])
    assert cli(["scan", str(tmp_path / "list.txt"), "--workers", "2", "--decode-all"]) == 1
    assert "status: corrupt 1, ok 1" in capsys.readouterr().out
    assert (tmp_path / "list.txt.bad.txt").read_text() == f"corrupt {corrupt}\n"


def test_scan_command_line_errors(tmp_path, capsys):
    """A missing list or root folder and a malformed line stop the scan before any file is opened."""
    good, malformed = tmp_path / "good.txt", tmp_path / "malformed.txt"
    good.write_text("a.mp4 0\n")
    malformed.write_text("a.mp4 0\nb.mp4 dog\n")
    cases = [
        (["scan", str(tmp_path / "gone.txt")], "gone.txt: no such list file"),
        (["scan", str(good), "--root", str(tmp_path / "nowhere")], "nowhere: no such folder"),
        (["scan", str(malformed)], "malformed.txt:2: label must be an integer, got 'dog'"),
        (["scan", str(good), "--workers", "0"], "--min-frames and --workers must be >= 1"),
        (["scan", str(good), "--frames-out", str(tmp_path / "no" / "f.txt")], "no is not a folder"),
        (["scan", str(good), "--bad-out", str(tmp_path)], f"cannot write {tmp_path}: {tmp_path} is a folder"),
    ]
    for argv, message in cases:
        with pytest.raises(SystemExit) as exit_:
            cli(argv)
        assert exit_.value.code == 2 and message in capsys.readouterr().err, argv
    assert not list(tmp_path.glob("*.bad.txt"))


def test_classes_differ_only_in_motion():
    first = [render_clip(c, 6, 32, np.random.default_rng(7)) for c in CLASSES]
    assert all(np.array_equal(f[0], first[0][0]) for f in first)  # frame 0 does not depend on the class
    assert all(not np.array_equal(f[5], first[0][5]) for f in first[1:])  # the motion does
    moved = first[CLASSES.index("move_right")]
    assert not np.array_equal(moved[0], moved[1])


def test_synthetic_is_deterministic_idempotent_and_loads(tmp_path):
    kw = dict(num_train=12, num_val=6, num_frames=16, size=32, progress=False)
    ds = make_synthetic(tmp_path / "a", **kw)
    train = read_list(ds.train_list, root=ds.root)
    assert [r.label for r in train] == [i % 6 for i in range(12)]
    assert [r.num_frames for r in read_list(ds.val_frames_list, root=ds.root)] == [16] * 6
    assert ds.label_map.read_text().split() == list(CLASSES)
    assert probe(train[0].path).codec == "h264" and probe(train[0].path).num_frames == 16
    mtimes = [p.stat().st_mtime_ns for p in sorted((tmp_path / "a" / "train").iterdir())]
    train[3] and (tmp_path / "a" / "train" / "000003.mp4").write_bytes(b"broken")
    make_synthetic(tmp_path / "a", **kw)  # regenerates only the broken file
    after = [p.stat().st_mtime_ns for p in sorted((tmp_path / "a" / "train").iterdir())]
    assert [a == b for a, b in zip(mtimes, after)] == [True] * 3 + [False] + [True] * 8
    other = make_synthetic(tmp_path / "b", **kw)
    idx = np.arange(16)
    for name in ("train/000003.mp4", "val/000005.mp4"):
        a, *_ = decode_frames(str(ds.root / name), idx)
        b, *_ = decode_frames(str(other.root / name), idx)
        assert np.array_equal(a, b)
    loader = build_loader(
        ds.train_list,
        root=ds.root,
        train=True,
        batch_size=4,
        backend="pyav",
        num_workers=0,
        sampling=ClipSampling("k400", 4, 2),
        augment=TrainAugment(crop_size=32),
    )
    assert [b.clips.shape for b in loader] == [(4, 3, 4, 32, 32)] * 3


@pytest.mark.parametrize("kwargs, message", [
    (dict(num_train=0), "num_train must be an integer >= 1, got 0"),
    (dict(num_val=2.5), "num_val must be an integer >= 1, got 2.5"),
    (dict(num_frames=1), "num_frames must be an integer >= 2, got 1"),  # one frame shows no motion
    (dict(size=8), "size must be an integer >= 16, got 8"),
    (dict(size=33), "size must be even"),
    (dict(fps=0), "fps must be an integer >= 1, got 0"),
    (dict(codec="av1"), "unknown codec 'av1'"),
])
def test_synthetic_settings_are_checked_before_anything_is_written(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        make_synthetic(tmp_path / "ds", progress=False, **kwargs)
    assert not (tmp_path / "ds").exists()


def test_a_file_in_place_of_the_synthetic_folder_is_an_error(tmp_path, capsys):
    (tmp_path / "ds").write_text("")
    with pytest.raises(ValueError, match="the synthetic dataset's folder .*ds is a file"):
        make_synthetic(tmp_path / "ds", progress=False)
    with pytest.raises(SystemExit) as exit_:
        cli(["synthetic", "--root", str(tmp_path / "ds")])
    assert exit_.value.code == 2 and "ds is a file" in capsys.readouterr().err


def _make_repeatedly(root: str, times: int) -> None:
    for _ in range(times):
        ds = make_synthetic(root, num_train=2, num_val=2, num_frames=4, size=16, codec="vp9", progress=False)
        assert read_label_map(ds.label_map) == list(CLASSES)  # never a torn file


def test_ranks_making_the_synthetic_dataset_at_once_do_not_collide(tmp_path):
    """Every torchrun rank calls make_synthetic after rank 0 made it: the lists each one
    rewrites must not go through a shared temp name, nor be read half-written."""
    make_synthetic(tmp_path, num_train=2, num_val=2, num_frames=4, size=16, codec="vp9", progress=False)
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_make_repeatedly, args=(str(tmp_path), 40)) for _ in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    assert [p.exitcode for p in procs] == [0] * 4


def test_scan_lists_what_the_dali_gpu_decoder_rejects_and_fingerprints_the_copy(tmp_path, capsys):
    """A codec DALI's GPU decoder lacks and a variable frame rate are bad paths (PyAV reads
    them; DALI would not), and the fingerprint does not depend on the scan's flags."""
    write_test_video(tmp_path / "ok.mp4", 20, 0)
    with av.open(str(tmp_path / "mpeg2.mkv"), "w") as c:
        s = c.add_stream("mpeg2video", rate=30)
        s.width, s.height, s.pix_fmt = 64, 48, "yuv420p"
        for frame in make_frames(20):
            c.mux(s.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        c.mux(s.encode(None))
    with av.open(str(tmp_path / "vfr.mp4"), "w") as c:
        s = c.add_stream("libx264", rate=30)
        s.width, s.height, s.pix_fmt = 64, 48, "yuv420p"
        s.time_base = s.codec_context.time_base = fractions.Fraction(1, 1000)
        t = 0
        for i, frame in enumerate(make_frames(20)):
            f = av.VideoFrame.from_ndarray(frame, format="rgb24")
            f.pts, f.time_base, t = t, fractions.Fraction(1, 1000), t + (33 if i % 2 else 80)
            c.mux(s.encode(f))
        c.mux(s.encode(None))
    listing = tmp_path / "list.txt"
    listing.write_text("ok.mp4 0\nmpeg2.mkv 1\nvfr.mp4 2\n")
    args = ["scan", str(listing), "--root", str(tmp_path), "--workers", "1"]
    assert cli(args) == 1
    out = capsys.readouterr().out
    bad = (tmp_path / "list.txt.bad.txt").read_text().splitlines()
    assert bad == [f"ok+no-dali(mpeg2video) {tmp_path / 'mpeg2.mkv'}", f"ok+vfr {tmp_path / 'vfr.mp4'}"]
    assert "fingerprint: 3 files, 0 missing, 60 frames [h264=2,mpeg2video=1] list-sha256:" in out
    cli(args + ["--min-frames", "30", "--decode-all"])  # every file too short now
    assert capsys.readouterr().out.splitlines()[4] == out.splitlines()[4]
