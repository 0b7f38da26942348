"""`dali-ipmix verify`: a data set seeded with one file of each fault is reported exactly, DALI's
CPU decoder agrees with every fatal/warning verdict, the file list feeds a DALI reader, and a real
DALI failure becomes a one-line error naming the file."""
import io
import json
import os

import numpy as np
import pytest
from PIL import Image

from conftest import photo_crops
from dali_ipmix import verify as V
from dali_ipmix.cli import main
from dali_ipmix.errors import UserError
from dali_ipmix import readers
from dali_ipmix.readers import class_folder_files

SIZE = 48


def _jpeg_bytes(img, **kw):
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, "JPEG", quality=90, **kw)
    return buf.getvalue()


# The good files: real photographs in every format the readers list, all RGB (no false positives).
GOOD = {
    "c0/a.jpg": lambda im, p: p.write_bytes(_jpeg_bytes(im)),
    "c0/progressive.jpg": lambda im, p: p.write_bytes(_jpeg_bytes(im, progressive=True)),
    "c0/two words.jpeg": lambda im, p: p.write_bytes(_jpeg_bytes(im, subsampling="4:4:4")),
    "c1/b.png": lambda im, p: Image.fromarray(im).save(p),
    "c1/c.bmp": lambda im, p: Image.fromarray(im).save(p),
    "c1/d.webp": lambda im, p: Image.fromarray(im).save(p, lossless=True),
    "c1/e.tif": lambda im, p: Image.fromarray(im).save(p),
    "c2/f.JPG": lambda im, p: p.write_bytes(_jpeg_bytes(im)),
}
def _stray_bytes_jpeg(img):
    """Two stray bytes between header segments: Pillow decodes it, DALI's JPEG parser does not."""
    data = _jpeg_bytes(img)
    at = data.index(b"\xff\xdb")
    return data[:at] + b"\x12\x34" + data[at:]


def _bad_crc_png(img):
    """A wrong IDAT checksum: Pillow ignores it, libpng in DALI does not."""
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, "PNG")
    data = bytearray(buf.getvalue())
    at = data.index(b"IDAT")
    data[at + 4 + int.from_bytes(data[at - 4:at], "big")] ^= 0xFF
    return bytes(data)


def bomb_jpeg(img, side=65000):
    """A decompression bomb: a small JPEG whose frame header claims ``side`` x ``side`` pixels
    (a few KB; decoding it would take about 12 GB)."""
    data = bytearray(_jpeg_bytes(img))
    at = data.index(b"\xff\xc0")                   # SOF0: length, precision, height, width
    data[at + 5:at + 9] = side.to_bytes(2, "big") * 2
    return bytes(data)


# One file per fault: how it is made and the kinds verify must report.
BAD = {
    "c0/truncated.jpg": (lambda im, p: p.write_bytes(_jpeg_bytes(im)[: len(_jpeg_bytes(im)) // 2]), ("truncated",)),
    "c0/garbage.jpg": (lambda im, p: p.write_bytes(np.random.default_rng(0).bytes(3000)), ("not_image",)),
    "c0/empty.jpg": (lambda im, p: p.write_bytes(b""), ("empty",)),
    "c0/broken_link.jpg": (lambda im, p: os.symlink(p.parent / "nowhere.jpg", p), ("unreadable",)),
    "c0/loop.jpg": (lambda im, p: os.symlink(p.name, p), ("unreadable",)),
    "c2/bomb.jpg": (lambda im, p: p.write_bytes(bomb_jpeg(im)), ("too_large",)),
    "c0/stray_bytes.jpg": (lambda im, p: p.write_bytes(_stray_bytes_jpeg(im)), ("corrupt",)),
    "c1/bad_crc.png": (lambda im, p: p.write_bytes(_bad_crc_png(im)), ("corrupt",)),
    "c0/animation.jpg": (lambda im, p: Image.fromarray(im).save(p, "GIF"), ("unsupported_format",)),
    "c1/cmyk.jpg": (lambda im, p: Image.fromarray(im).convert("CMYK").save(p, "JPEG"), ("cmyk",)),
    "c1/grey.jpg": (lambda im, p: Image.fromarray(im).convert("L").save(p, "JPEG"), ("greyscale",)),
    "c1/png_inside.jpg": (lambda im, p: Image.fromarray(im).save(p, "PNG"), ("format_mismatch",)),
    "c1/rgba.png": (lambda im, p: Image.fromarray(im).convert("RGBA").save(p), ("alpha",)),
    "c1/palette.png": (lambda im, p: Image.fromarray(im).convert("P").save(p), ("palette",)),
    "c2/notes.txt": (lambda im, p: p.write_text("labels were checked by hand\n"), ("wrong_extension",)),
    "stray.jpg": (lambda im, p: p.write_bytes(_jpeg_bytes(im)), ("outside_classes",)),
}
FATAL = {p for p, (_, kinds) in BAD.items() if any(V.PROBLEMS[k].fatal for k in kinds)}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("seeded")
    photos = photo_crops(SIZE, len(GOOD) + len(BAD), seed=4)
    makers = list(GOOD.values()) + [make for make, _ in BAD.values()]
    for rel, make, photo in zip(list(GOOD) + list(BAD), makers, photos):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        make(photo, root / rel)
    return root


@pytest.fixture(scope="module")
def report(dataset):
    return V.scan(dataset, jobs=2)   # two worker processes: the parallel path


def test_each_bad_file_reported_with_its_kind_and_no_false_positives(report):
    assert {f.path: f.kinds for f in report.findings} == {p: kinds for p, (_, kinds) in BAD.items()}
    assert {f.path for f in report.fatal} == FATAL
    assert report.scanned == len(GOOD) + len(BAD)


def _dali_decode(root, rel):
    """Decode one file with DALI's CPU reader + decoder (output_type=RGB), as the readers do."""
    from nvidia.dali import fn, pipeline_def, types

    @pipeline_def(batch_size=1, num_threads=1, device_id=None)
    def one():
        data, _ = fn.readers.file(file_root=str(root), files=[rel])
        return fn.decoders.image(data, device="cpu", output_type=types.RGB)

    pipe = one()
    pipe.build()
    (out,) = pipe.run()
    return np.asarray(out.at(0))


# (not the bomb: DALI would try to decode its 65000 x 65000 pixels)
@pytest.mark.parametrize("rel", sorted(p for p, (_, k) in BAD.items()
                                       if k[0] not in ("wrong_extension", "outside_classes", "too_large")))
def test_dali_cpu_decoder_agrees_with_verdict(dataset, rel):
    if rel in FATAL:      # fatal: DALI stops on the file
        with pytest.raises(RuntimeError):
            _dali_decode(dataset, rel)
    else:                 # warning: DALI decodes it to exactly Pillow's RGB conversion
        got = _dali_decode(dataset, rel)
        want = np.asarray(Image.open(dataset / rel).convert("RGB"))
        np.testing.assert_array_equal(got, want)


def _damaged(rng, data):
    """One random fault: a changed byte (anywhere or in the header), inserted junk, a cut tail."""
    data = bytearray(data)
    mode = rng.integers(4)
    at = int(rng.integers(2, len(data) if mode != 1 else min(200, len(data))))
    if mode <= 1:
        data[at] ^= int(rng.integers(1, 256))
    elif mode == 2:
        data[at:at] = rng.bytes(int(rng.integers(1, 6)))
    else:
        del data[len(data) - int(rng.integers(1, 30)):]
    return bytes(data)


def test_verdict_matches_dali_on_randomly_damaged_files(tmp_path):
    # Random damage lands on every path at once (header walk, entropy data, chunk checksums), so a
    # verdict that drifts from what DALI's decoder does shows up here.
    rng = np.random.default_rng(2024)
    fatal = 0
    for i, photo in enumerate(photo_crops(40, 24, seed=6)):
        ext = ".png" if i % 3 == 2 else ".jpg"
        buf = io.BytesIO()
        Image.fromarray(photo).save(buf, "PNG" if ext == ".png" else "JPEG", progressive=i % 4 == 0)
        rel = f"f{i:02d}{ext}"
        (tmp_path / rel).write_bytes(_damaged(rng, buf.getvalue()))
        kinds, detail = V.check_image((tmp_path / rel).read_bytes(), ext)
        ours = any(V.PROBLEMS[k].fatal for k in kinds)
        try:
            _dali_decode(tmp_path, rel)
            dali = False
        except RuntimeError:
            dali = True
        assert ours == dali, f"{rel}: verify says {kinds} ({detail}), DALI {'fails' if dali else 'decodes it'}"
        fatal += dali
    assert 0 < fatal < 24          # the damage hits both outcomes


def test_filelist_holds_the_usable_files_and_feeds_a_dali_reader(dataset, report, tmp_path, capsys):
    out = tmp_path / "good.txt"
    assert main(["verify", str(dataset), "--jobs", "1", "--write-filelist", str(out)]) == 1  # fatal files
    printed = capsys.readouterr().out
    for rel in BAD:
        assert rel in printed
    files, labels, _ = class_folder_files(dataset, keep_loops=True)
    label_of = dict(zip(files, labels))
    got_files, got_labels = readers.filelist_files(out, root=dataset)
    warnings_listed = {p for p, (_, k) in BAD.items() if p not in FATAL and p in label_of}
    assert set(got_files) == set(GOOD) | warnings_listed
    assert got_labels == [label_of[f] for f in got_files]

    # DALI's own file_list parser reads it (including the name with a space) and decodes everything
    from nvidia.dali import fn, pipeline_def, types

    @pipeline_def(batch_size=4, num_threads=1, device_id=None)
    def listed():
        data, label = fn.readers.file(file_root=str(dataset), file_list=str(out), name="Reader")
        return fn.decoders.image(data, device="cpu", output_type=types.RGB), label

    pipe = listed()
    pipe.build()
    seen = []
    for _ in range(-(-len(got_files) // 4)):
        images, label = pipe.run()
        seen += [int(np.asarray(label.at(i))[0]) for i in range(len(label))]
        assert all(np.asarray(images.at(i)).shape == (SIZE, SIZE, 3) for i in range(len(images)))
    assert sorted(seen[: len(got_files)]) == sorted(got_labels)


def test_filelist_feeds_the_train_reader(dataset, tmp_path):
    from nvidia.dali import pipeline_def
    from dali_ipmix import readers
    from dali_ipmix import sources
    out = V.write_filelist(tmp_path / "list.txt", *V.scan(dataset, jobs=1).good())
    files, labels = readers.filelist_files(out, root=dataset)
    source = sources.open_source(dataset, filelist=out)
    assert list(source.files) == list(files)

    @pipeline_def(batch_size=len(files), num_threads=1, device_id=None)
    def train():
        return readers.train_images(source, device="cpu", size=32, seed=1)

    pipe = train()
    pipe.build()
    images, got = pipe.run()
    assert sorted(int(np.asarray(got.at(i))[0]) for i in range(len(files))) == sorted(labels)


def test_refuses_to_overwrite_without_flag(dataset, tmp_path, capsys):
    out = tmp_path / "mine.txt"
    out.write_text("keep me\n")
    assert main(["verify", str(dataset), "--jobs", "1", "--write-filelist", str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert out.read_text() == "keep me\n"
    assert main(["verify", str(dataset), "--jobs", "1", "--write-filelist", str(out), "--overwrite"]) == 1
    assert out.read_text() != "keep me\n"


def test_clean_mixing_folder_exits_0_and_json_counts(tmp_path):
    mix = tmp_path / "mix"
    for i, photo in enumerate(photo_crops(SIZE, 4, seed=8)):
        (mix / f"sub{i % 2}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(photo).save(mix / f"sub{i % 2}" / f"p{i}.jpg")
    Image.fromarray(photo).convert("L").save(mix / "grey.png")
    js = tmp_path / "r.json"
    assert main(["verify", str(mix), "--mixing", "--jobs", "1", "--json", str(js)]) == 0   # warnings only
    data = json.loads(js.read_text())
    assert data["layout"] == "mixing" and data["listed"] == data["good"] == 5
    assert data["counts"] == {"greyscale": 1}
    (mix / "sub0" / "cut.jpg").write_bytes(_jpeg_bytes(photo)[:300])
    assert main(["verify", str(mix), "--mixing", "--jobs", "1"]) == 1


def _run_until_error(root, files):
    from nvidia.dali import pipeline_def
    from dali_ipmix import readers, sources
    source = sources.DataSource(str(root), "folders", "--data", (), len(files), root=str(root),
                                files=list(files), labels=[0] * len(files))

    @pipeline_def(batch_size=2, num_threads=1, device_id=None)
    def train():
        return readers.train_images(source, device="cpu", size=32)

    pipe = train()
    pipe.build()
    with pytest.raises(RuntimeError) as info:
        for _ in range(len(files)):
            pipe.run()
    return info.value


@pytest.mark.parametrize("bad, words", [("c0/truncated.jpg", "Failed to decode sample"),
                                        ("c0/empty.jpg", "empty (0 bytes)"),
                                        ("c0/broken_link.jpg", "broken link")])
def test_explain_names_the_file_dali_failed_on(dataset, bad, words):
    exc = _run_until_error(dataset, [bad] + list(GOOD)[:3])
    err = V.explain_pipeline_error(exc, [dataset])
    assert isinstance(err, UserError)
    msg = str(err)
    assert "\n" not in msg and str(dataset / bad) in msg and words in msg
    assert f"dali-ipmix verify {dataset} --write-filelist" in msg


def test_explain_nameless_dali_error_names_the_folders(dataset, tmp_path):
    exc = _run_until_error(dataset, ["c0/garbage.jpg", "c0/a.jpg"])
    err = V.explain_pipeline_error(exc, [dataset], mixing_dirs=[tmp_path])
    msg = str(err)
    assert "\n" not in msg and "nvImageCodec failure" in msg
    assert f"dali-ipmix verify {dataset} --write-filelist" in msg
    assert f"dali-ipmix verify {tmp_path} --mixing --write-filelist" in msg
    assert V.explain_pipeline_error(RuntimeError("CUDA error: out of memory"), [dataset]) is None


def test_filelist_errors_name_file_and_line(dataset, tmp_path):
    bad = tmp_path / "bad.txt"
    bad.write_text("c0/a.jpg 0\nc0/progressive.jpg\n")
    with pytest.raises(UserError, match=r"line 2"):
        readers.filelist_files(bad)
    gone = tmp_path / "gone.txt"
    gone.write_text("c0/a.jpg 0\nc9/missing.jpg 3\n")
    assert readers.filelist_files(gone) == (["c0/a.jpg", "c9/missing.jpg"], [0, 3])
    with pytest.raises(UserError, match="c9/missing.jpg"):
        readers.filelist_files(gone, root=dataset)


# ---------------------------------------------------------------------------------------------------
# Entries that are no regular files; output paths checked before the scan

def test_a_fifo_named_like_an_image_is_skipped_and_reported_not_opened(tmp_path, capsys):
    import subprocess
    import sys
    from dali_ipmix import readers
    from conftest import make_class_folders
    root = make_class_folders(tmp_path / "data", n_images=6, n_pictures=2)
    os.mkfifo(root / "train" / "class1" / "pipe.jpg")
    os.mkfifo(root / "mixing" / "pipe.png")
    files, _, _ = readers.class_folder_files(root / "train", flag="--data-path train")
    assert "class1/pipe.jpg" not in files and len(files) == 6
    assert readers.picture_files(root / "mixing") == ["a/f1.jpg", "b/c/f0.jpg"]
    note = capsys.readouterr().err
    assert "class1/pipe.jpg (FIFO)" in note and "pipe.png (FIFO)" in note
    # verify runs in its own process: opening a FIFO would block it for good
    env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    for extra, rel in (([], "class1/pipe.jpg"), (["--mixing"], "pipe.png")):
        folder = root / ("mixing" if extra else "train")
        done = subprocess.run([sys.executable, "-m", "dali_ipmix.cli", "verify", str(folder), "--jobs", "1",
                               *extra], env=env, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stdout + done.stderr          # a warning, nothing fatal
        assert f"warn  {rel}  not_regular (FIFO)" in done.stdout


@pytest.mark.parametrize("case", ["missing_folder", "folder_as_file"])
def test_output_paths_are_checked_before_the_scan(case, dataset, tmp_path, capsys, monkeypatch):
    target = tmp_path / "nope" / "good.txt" if case == "missing_folder" else tmp_path / "adir"
    if case == "folder_as_file":
        target.mkdir()
    scanned = []
    monkeypatch.setattr(V, "scan", lambda *a, **kw: scanned.append(1))
    assert main(["verify", str(dataset), "--jobs", "1", "--write-filelist", str(target), "--overwrite"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(target) in err
    assert ("does not exist" if case == "missing_folder" else "is a folder") in err
    # nothing scanned, nothing written (no folder made, no temporary file left)
    assert not scanned and sorted(os.listdir(tmp_path)) == ([] if case == "missing_folder" else ["adir"])


def test_a_decompression_bomb_is_fatal_from_its_header_alone(dataset, report, tmp_path, capsys):
    finding = next(f for f in report.findings if f.path == "c2/bomb.jpg")
    assert finding.fatal and "65000x65000" in finding.detail and "89,478,485" in finding.detail
    assert readers.MAX_PIXELS == Image.MAX_IMAGE_PIXELS     # Pillow's limit is the default
    # the limit is a flag: a bomb of 300 x 300 is fine under the default, not under 50,000 pixels
    small = bomb_jpeg(photo_crops(SIZE, 1)[0], side=300)
    assert V.check_image(small, ".jpg") == ((), "")
    assert V.check_image(small, ".jpg", max_pixels=50000)[0] == ("too_large",)
    # training's error about the file names it and the limit
    exc = RuntimeError("Failed to decode sample #0 : c2/bomb.jpg")
    msg = str(V.explain_pipeline_error(exc, [dataset]))
    assert str(dataset / "c2" / "bomb.jpg") in msg and "65000x65000" in msg and "89,478,485" in msg
    assert main(["verify", str(dataset), "--jobs", "1", "--max-pixels", "0"]) == 2
    assert "--max-pixels must be >= 1" in capsys.readouterr().err


def test_a_symlink_loop_is_unreadable_for_verify_and_one_line_for_the_readers(dataset, report, tmp_path):
    finding = next(f for f in report.findings if f.path == "c0/loop.jpg")
    assert finding.kinds == ("unreadable",) and finding.detail == readers.LINK_LOOP
    with pytest.raises(UserError, match="c0/loop.jpg is a symbolic link loop"):
        class_folder_files(dataset, flag="--data")
    mix = tmp_path / "mix"
    mix.mkdir()
    os.symlink("self.png", mix / "self.png")
    with pytest.raises(UserError, match="self.png is a symbolic link loop"):
        readers.picture_files(mix)
    # a verified file list leaves it out, and the reader then never looks at it
    listed = V.write_filelist(tmp_path / "good.txt", *report.good())
    files, _, _ = readers.listed_or_found(dataset, listed)
    assert "c0/loop.jpg" not in files and files


@pytest.mark.parametrize("flag, value", [("--jobs", "0"), ("--max-shown", "-1")])
def test_counts_out_of_range_are_refused(flag, value, dataset, capsys):
    assert main(["verify", str(dataset), flag, value]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and f"{flag} must be >=" in err
