"""The synthetic labelled set: layout, picture sizes, determinism, learnability and the CLI."""
import os

import numpy as np
import pytest
from PIL import Image

from dali_ipmix.cli import main
from dali_ipmix.data import synth as S

CLASSES = 10
TRAIN, VAL = 12, 8


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth") / "set"
    paths = S.generate_synth(out, classes=CLASSES, train_per_class=TRAIN, val_per_class=VAL, seed=0, jobs=2)
    return out, paths


def _load(paths):
    pictures = []
    for p in paths:
        with Image.open(p) as im:
            assert im.format == "JPEG" and im.mode == "RGB"
            pictures.append(np.asarray(im))
    return pictures


@pytest.mark.slow
def test_class_folder_layout(dataset):
    out, paths = dataset
    assert sorted(os.listdir(out)) == ["train", "val"]
    names = S.class_names(CLASSES)
    assert names == sorted(names) and len(set(names)) == CLASSES
    assert names[0].startswith("c000_") and names[3] == "c003_star-checker"
    for split, per_class in (("train", TRAIN), ("val", VAL)):
        assert sorted(os.listdir(out / split)) == names
        for name in names:
            assert sorted(os.listdir(out / split / name)) == [f"{i:05d}.jpg" for i in range(per_class)]
    assert len(paths) == CLASSES * (TRAIN + VAL)


@pytest.mark.slow
def test_pictures_have_varied_sizes_and_photo_like_jpeg_sizes(dataset):
    out, paths = dataset
    sizes = []
    for p in paths:
        with Image.open(p) as im:
            assert im.format == "JPEG"
            sizes.append(im.size)
    sizes = np.array(sizes)
    assert sizes.min() >= S.SIDE_RANGE[0] and sizes.max() <= S.SIDE_RANGE[1]
    assert len({tuple(s) for s in sizes}) > 0.8 * len(paths)
    aspect = sizes[:, 0] / sizes[:, 1]
    assert aspect.min() < 0.8 and aspect.max() > 1.25
    kib = np.array([os.path.getsize(p) for p in paths]) / 1024
    assert np.median(kib) >= 20 and kib.min() >= 8  # textured, not flat fills
    # Grain: even the smoothest picture has pixel-level variation everywhere.
    for pic in _load(paths[:: len(paths) // 10]):
        grey = pic.astype(np.float32).mean(axis=2)
        assert np.median(np.abs(np.diff(grey, axis=1))) >= 1.0


def _shape_features(picture):
    """Rotation-invariant edge statistics: the spectrum of the gradient-orientation histogram of the
    strongest edges (3-fold for triangles, 4-fold for squares, ...) on a downsampled grey picture."""
    grey = np.asarray(Image.fromarray(picture).convert("L").resize((96, 96), Image.BILINEAR), np.float32)
    gy, gx = np.gradient(grey)
    mag = np.hypot(gx, gy)
    weight = np.where(mag > np.percentile(mag, 80), mag, 0.0)
    bins = ((np.arctan2(gy, gx) % np.pi) / np.pi * 36).astype(int) % 36
    hist = np.bincount(bins.ravel(), weights=weight.ravel(), minlength=36)
    return np.abs(np.fft.rfft(hist / (hist.sum() + 1e-9)))[1:7]


def _colour_features(picture):
    return picture.reshape(-1, 3).mean(axis=0)


def _nearest_centroid_accuracy(train_x, train_y, test_x, test_y):
    train_x, test_x = np.asarray(train_x, float), np.asarray(test_x, float)
    train_y, test_y = np.asarray(train_y), np.asarray(test_y)
    mu, sd = train_x.mean(axis=0), train_x.std(axis=0) + 1e-9
    a, b = (train_x - mu) / sd, (test_x - mu) / sd
    centroids = np.stack([a[train_y == k].mean(axis=0) for k in range(CLASSES)])
    pred = np.argmin(((b[:, None] - centroids[None]) ** 2).sum(axis=-1), axis=1)
    return float((pred == test_y).mean())


@pytest.mark.slow
def test_classes_are_learnable_from_shape_but_not_from_colour(dataset):
    out, paths = dataset
    names = S.class_names(CLASSES)
    label = {name: k for k, name in enumerate(names)}
    split = {"train": ([], []), "val": ([], [])}
    for p, pic in zip(paths, _load(paths)):
        rel = os.path.relpath(p, out).split(os.sep)
        split[rel[0]][0].append(pic)
        split[rel[0]][1].append(label[rel[1]])
    (train_pics, train_y), (val_pics, val_y) = split["train"], split["val"]
    chance = 1.0 / CLASSES
    shape_acc = _nearest_centroid_accuracy([_shape_features(p) for p in train_pics], train_y,
                                           [_shape_features(p) for p in val_pics], val_y)
    colour_acc = _nearest_centroid_accuracy([_colour_features(p) for p in train_pics], train_y,
                                            [_colour_features(p) for p in val_pics], val_y)
    print(f"nearest-centroid accuracy: shape {shape_acc:.2f}, colour {colour_acc:.2f}, chance {chance:.2f}")
    assert shape_acc >= 3 * chance, (shape_acc, colour_acc)
    assert colour_acc <= 2.5 * chance, (shape_acc, colour_acc)
    assert shape_acc - colour_acc >= 0.15, (shape_acc, colour_acc)


@pytest.mark.slow
def test_same_seed_gives_byte_identical_files_for_any_jobs(tmp_path):
    kw = dict(classes=3, train_per_class=2, val_per_class=1)
    a = S.generate_synth(tmp_path / "a", seed=5, jobs=1, **kw)
    b = S.generate_synth(tmp_path / "b", seed=5, jobs=2, **kw)
    c = S.generate_synth(tmp_path / "c", seed=6, jobs=1, **kw)
    assert [os.path.relpath(p, tmp_path / "a") for p in a] == [os.path.relpath(p, tmp_path / "b") for p in b]
    for pa, pb, pc in zip(a, b, c):
        with open(pa, "rb") as fa, open(pb, "rb") as fb, open(pc, "rb") as fc:
            da, db, dc = fa.read(), fb.read(), fc.read()
        assert da == db, pa
        assert da != dc, pa
    # Different pictures, not just different bytes: sizes or content differ.
    differ = [_load([pa])[0].shape != _load([pc])[0].shape
              or np.abs(_load([pa])[0].astype(int) - _load([pc])[0]).mean() > 10 for pa, pc in zip(a, c)]
    assert all(differ)


def test_cli_refuses_a_non_empty_out_without_overwrite(tmp_path, capsys):
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("mine")
    rc = main(["synth", "--out", str(busy), "--classes", "2", "--train-per-class", "1", "--val-per-class", "1",
               "--seed", "0", "--jobs", "1"])
    err = capsys.readouterr().err
    assert rc == 2
    assert len(err.strip().splitlines()) == 1
    assert str(busy) in err and "--overwrite" in err
    assert sorted(os.listdir(busy)) == ["keep.txt"] and (busy / "keep.txt").read_text() == "mine"


def test_cli_overwrite_and_summary(tmp_path, capsys):
    out = tmp_path / "set"
    (out / "train" / "old_class").mkdir(parents=True)
    (out / "README").write_text("mine")
    preview = tmp_path / "sheet.png"
    rc = main(["synth", "--out", str(out), "--classes", "2", "--train-per-class", "2", "--val-per-class", "1",
               "--seed", "0", "--jobs", "1", "--overwrite", "--preview", str(preview)])
    stdout = capsys.readouterr().out
    assert rc == 0
    assert sorted(os.listdir(out / "train")) == S.class_names(2)
    assert (out / "README").read_text() == "mine"
    line, = stdout.strip().splitlines()
    assert "6 images" in line and "img/s" in line and str(out) in line
    with Image.open(preview) as sheet:
        assert sheet.format == "PNG" and sheet.width >= 2 * 128


def test_cli_rejects_too_many_classes(tmp_path, capsys):
    rc = main(["synth", "--out", str(tmp_path / "x"), "--classes", str(S.MAX_CLASSES + 1),
               "--train-per-class", "1", "--val-per-class", "1", "--seed", "0"])
    assert rc == 2 and "--classes" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_demo_style_ten_plain_silhouettes_on_small_pictures(tmp_path, capsys):
    demo = S.STYLES["demo"]
    names = S.class_names(10, "demo")
    assert demo.max_classes == 10 and len({n.split("_")[1] for n in names}) == 10
    assert all(n.endswith("-plain") for n in names) and "hexagon" not in " ".join(names)
    rc = main(["synth", "--out", str(tmp_path / "d"), "--style", "demo", "--classes", "10",
               "--train-per-class", "1", "--val-per-class", "1", "--seed", "0", "--jobs", "1"])
    assert rc == 0 and sorted(os.listdir(tmp_path / "d" / "val")) == names
    sizes = np.array([Image.open(tmp_path / "d" / "train" / n / "00000.jpg").size for n in names])
    assert sizes.min() >= demo.sides[0] and sizes.max() <= demo.sides[1]
    capsys.readouterr()
    rc = main(["synth", "--out", str(tmp_path / "x"), "--style", "demo", "--classes", "11",
               "--train-per-class", "1", "--val-per-class", "1", "--seed", "0"])
    assert rc == 2 and "--classes" in capsys.readouterr().err
