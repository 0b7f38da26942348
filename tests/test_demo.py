"""The built-in demo: its data and recipe keep learning, and it leaves its pictures behind."""
import json
import math
import os
import sys

import numpy as np
import pytest
from PIL import Image

import train
from dali_ipmix.training import demo_outputs
from dali_ipmix.data.fractals import generate_fractals
from dali_ipmix.data.synth import generate_synth

TRAIN_PER_CLASS, VAL_PER_CLASS = 40, 20
EPOCHS = 10                     # 400 pictures / batch 32 = 12 steps an epoch: 120 steps


@pytest.fixture(scope="module")
def demo_set(tmp_path_factory):
    """The demo's kind of data, small: 10 classes x (40 train + 20 val) pictures, 8 fractals."""
    root = tmp_path_factory.mktemp("demo")
    generate_synth(root / "synth", classes=10, train_per_class=TRAIN_PER_CLASS, val_per_class=VAL_PER_CLASS,
                   seed=0, jobs=1, style="demo")
    generate_fractals(root / "fractals", 8, size=64, seed=0, jobs=1)
    return root


def demo_flags(data_dir, mixing_dir, out, *extra):
    """The demo's recipe (train.DEMO_DEFAULTS: model, size, batch, lr, warm-up, crop scale; IPMix on
    the fused backend with the JSD triple) on ``data_dir``, with a short schedule."""
    d = train.DEMO_DEFAULTS
    return ["--data-path", str(data_dir), "--mixing-set", str(mixing_dir), "--output-dir", str(out),
            "--arch", d["arch"], "--image-size", str(d["image_size"]), "--batch-size", str(d["batch_size"]),
            "--lr", str(d["lr"]), "--warmup-epochs", str(d["warmup_epochs"]), "--crop-scale", str(d["crop_scale"]),
            "--epochs", str(EPOCHS), "--print-freq", "20", "--workers", "2",
            "--no-tensorboard", *extra]


def step_losses(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        recs = [json.loads(line) for line in f]
    return [r["loss"] for r in sorted((r for r in recs if r["kind"] == "step"), key=lambda r: r["step"])]


def val_records(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [r for r in map(json.loads, f) if r["kind"] == "epoch"]


# ---------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_demo_recipe_keeps_learning(demo_set, tmp_path):
    out = tmp_path / "run"
    assert train.main(demo_flags(demo_set / "synth", demo_set / "fractals", out, "--seed", "0")) == 0
    check_learned(out)


def check_learned(out):
    """Checked once to fail with --lr 0, with the training labels shuffled, and with the training
    views replaced by noise (BENCHMARKS.md, the built-in demo)."""
    losses = step_losses(out)
    assert len(losses) == EPOCHS * (10 * TRAIN_PER_CLASS // train.DEMO_DEFAULTS["batch_size"])
    start, end = np.mean(losses[:5]), np.mean(losses[-10:])
    val = val_records(out)[-1]
    print(f"loss {start:.3f} -> {end:.3f}; held-out val loss {val['val_loss']:.3f} top-1 {val['val_top1']:.1f}%")
    assert start > 0.95 * math.log(10)           # an untrained model: chance
    assert end < 0.9 * start, (start, end)
    # A small set can be memorised (even with shuffled labels), so the held-out split (clean
    # pictures never trained on) must show it too: chance is ln 10 = 2.30 and 10 % on 200 pictures.
    assert val["val_loss"] < 0.95 * math.log(10) and val["val_top1"] >= 20.0, val


def test_outputs_sheet_and_curves(demo_set, tmp_path, capsys):
    """The two pictures from a finished run's folder; an existing file is not replaced unless allowed."""
    from dali_ipmix import config as C
    out = tmp_path / "run"
    out.mkdir()
    # metrics of a 3-epoch run as train.py writes them
    with open(out / "metrics.jsonl", "w") as f:
        for step in range(1, 16):
            f.write(json.dumps({"kind": "step", "epoch": (step - 1) // 5 + 1, "step": step, "loss": 3.0 - 0.1 * step}) + "\n")
        for e in range(1, 4):
            f.write(json.dumps({"kind": "epoch", "epoch": e, "step": 5 * e, "val_loss": 2.3 - 0.3 * e,
                                "val_top1": 20.0 * e, "val_top5": 50.0 + 10 * e}) + "\n")
    train_loss, val = demo_outputs.read_epochs(out / "metrics.jsonl")
    assert list(train_loss) == [1, 2, 3] and train_loss[1] == pytest.approx(2.7)
    assert [r["val_top1"] for r in val] == [20.0, 40.0, 60.0]

    cfg = C.IMAGENET.replace(image_size=32, patch_sizes=(4, 8, 16, 32))
    kw = dict(train_dir=demo_set / "synth" / "train", mixing_dir=demo_set / "fractals", cfg=cfg, seed=0,
              backend="fused", random_area=(0.6, 1.0), arch="tiny", jsd_weight=12.0, num_classes=10)
    written = demo_outputs.write_demo_outputs(out, **kw)
    sheet = Image.open(written["batch"])
    n = demo_outputs.SHEET_SAMPLES
    assert sheet.width > n * demo_outputs.TILE and sheet.height > 4 * demo_outputs.TILE  # 3 views + fractal
    pixels = np.asarray(sheet.convert("RGB"), np.float32)
    assert pixels.std() > 20                        # pictures, not an empty canvas
    if "curves" in written:                         # matplotlib is an optional extra
        assert Image.open(written["curves"]).size[0] >= 600

    before = {k: p.stat().st_mtime_ns for k, p in written.items()}
    again = demo_outputs.write_demo_outputs(out, log=print, **kw)
    assert again == {} and "not replaced" in capsys.readouterr().out
    assert {k: p.stat().st_mtime_ns for k, p in written.items()} == before
    assert set(demo_outputs.write_demo_outputs(out, may_replace=True, **kw)) == set(written)


def test_outputs_without_matplotlib_skip_the_plot(demo_set, tmp_path, monkeypatch, capsys):
    from dali_ipmix import config as C
    monkeypatch.setitem(sys.modules, "matplotlib", None)      # import matplotlib -> ImportError
    (tmp_path / "metrics.jsonl").write_text("")
    cfg = C.IMAGENET.replace(image_size=32, patch_sizes=(4, 8, 16, 32))
    written = demo_outputs.write_demo_outputs(
        tmp_path, train_dir=demo_set / "synth" / "train", mixing_dir=demo_set / "fractals", cfg=cfg, seed=0,
        backend="fused", random_area=(0.6, 1.0), num_classes=10)
    assert set(written) == {"batch"} and not (tmp_path / demo_outputs.CURVES_PNG).exists()
    assert "matplotlib is not installed" in capsys.readouterr().out


@pytest.mark.slow
def test_demo_run_leaves_pictures_and_says_what_next(tmp_path, monkeypatch, capsys):
    """`python train.py` with no data flags, on a smaller generated set and one epoch."""
    from dali_ipmix.data import demo as demo_data
    monkeypatch.setattr(demo_data, "DEMO_PARAMS", dict(demo_data.DEMO_PARAMS, train_per_class=4,
                                                       val_per_class=2, fractals=4, fractal_size=64))
    out = tmp_path / "run"
    assert train.main(["--demo-cache", str(tmp_path / "cache"), "--output-dir", str(out), "--epochs", "1",
                       "--batch-size", "8", "--workers", "1", "--no-tensorboard"]) == 0
    text = capsys.readouterr().out
    for name in (demo_outputs.BATCH_PNG, demo_outputs.CURVES_PNG):
        if name == demo_outputs.CURVES_PNG and "matplotlib is not installed" in text:
            continue
        assert (out / name).is_file() and str(out / name) in text
    summary = text[text.index("summary:"):]
    assert "python train.py --data-path /data/imagenet --mixing-set /data/fractals" in summary
    assert "dali-ipmix graph --data" in summary and "dali-ipmix bench" in summary


def test_curves_of_a_run_stopped_inside_epoch_1_say_why_the_accuracy_panel_is_empty():
    pytest.importorskip("matplotlib")
    fig = demo_outputs.curves_figure({1: 2.5}, [], title="t", chance=10.0, jsd_weight=None)
    texts = [t.get_text() for t in fig.axes[1].texts]
    assert texts == ["no validation yet:\nthe run stopped inside epoch 1"]
    fig = demo_outputs.curves_figure({1: 2.5}, [{"epoch": 1, "val_loss": 1.0, "val_top1": 50.0,
                                                 "val_top5": 90.0}], title="t", chance=10.0, jsd_weight=None)
    assert [t.get_text() for t in fig.axes[1].texts] == ["50.0 %"]
