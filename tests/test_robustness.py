"""Robustness evaluation (dali_ipmix.robustness): metrics against hand computations, PGD against
the analytic gradient of a linear model, generated corruptions against severity, data-set layouts,
and the whole report on tiny generated folders with a hand-made model whose errors are known."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image

from conftest import photo_crops, shorten_autoattack
from dali_ipmix.cli import main
from dali_ipmix.errors import UserError
from dali_ipmix.robustness import metrics as M
from dali_ipmix.attacks import pgd_linf
from dali_ipmix.robustness.evaluate import EvalSettings, PGDSettings, evaluate
from dali_ipmix.robustness.tables import ALEXNET_ERR, CORRUPTIONS
from dali_ipmix.robustness.wnids import IMAGENET_A_WNIDS, IMAGENET_R_WNIDS, IMAGENET_WNIDS


# ---------------------------------------------------------------------------------------------
# Metrics

def test_rms_is_zero_for_a_perfectly_calibrated_toy():
    # 10 bins of 100 samples, confidence c in bin b, exactly 100*c of them right
    conf, correct = [], []
    for c in np.linspace(0.05, 0.95, 10):
        conf += [c] * 100
        correct += [1] * int(round(100 * c)) + [0] * (100 - int(round(100 * c)))
    conf, correct = np.array(conf), np.array(correct)
    perm = np.random.default_rng(0).permutation(conf.size)   # the metric sorts by itself
    assert M.rms_calibration_error(conf[perm], correct[perm]) == pytest.approx(0, abs=1e-12)
    assert M.rms_calibration_error(conf[perm], correct[perm], skip_last_bin=False) == pytest.approx(0, abs=1e-12)
    assert M.expected_calibration_error(conf[perm], correct[perm]) == pytest.approx(0, abs=1e-12)


def test_rms_matches_a_direct_computation_and_skips_the_last_bin():
    n = 1000
    conf = np.linspace(0.85, 0.95, n)[np.random.default_rng(0).permutation(n)]
    correct = (np.random.default_rng(1).random(n) < 0.6).astype(float)
    order = np.argsort(conf, kind="stable")
    gaps = [(conf[order][i:i + 100].mean() - correct[order][i:i + 100].mean()) for i in range(0, n, 100)]
    direct_all = math.sqrt(sum(0.1 * g * g for g in gaps))
    direct_official = math.sqrt(sum(0.1 * g * g for g in gaps[:-1]))   # the official loop skips the last bin
    assert M.rms_calibration_error(conf, correct, skip_last_bin=False) == pytest.approx(direct_all)
    assert M.rms_calibration_error(conf, correct) == pytest.approx(direct_official)
    assert direct_official < direct_all
    # the last bin takes the remainder: 1050 samples -> bins of 100 x 9 and one of 150
    conf2 = np.concatenate([conf, np.full(50, 0.99)])
    correct2 = np.concatenate([correct, np.zeros(50)])
    o = np.argsort(conf2, kind="stable")
    edges = [0, 100, 200, 300, 400, 500, 600, 700, 800, 900, 1050]
    want = math.sqrt(sum((hi - lo) / 1050 * (conf2[o][lo:hi].mean() - correct2[o][lo:hi].mean()) ** 2
                         for lo, hi in zip(edges[:-1], edges[1:])))
    assert M.rms_calibration_error(conf2, correct2, skip_last_bin=False) == pytest.approx(want)


def test_constant_confidence_gap_gives_that_gap():
    conf = np.full(400, 0.9)
    correct = np.tile([1, 1, 1, 0, 0, 1, 0, 1, 1, 0], 40)      # accuracy 0.6 in every block of 100
    assert M.rms_calibration_error(conf, correct, skip_last_bin=False) == pytest.approx(0.3)
    assert M.rms_calibration_error(conf, correct) == pytest.approx(0.3 * math.sqrt(0.75))
    assert M.expected_calibration_error(conf, correct) == pytest.approx(0.3)
    # fewer samples than a bin (the official code fails there): one bin, counted
    assert M.rms_calibration_error(conf[:50], correct[:50]) == pytest.approx(abs(0.9 - correct[:50].mean()))


def test_ece_by_hand():
    conf = np.array([0.1, 0.1, 0.55, 0.58, 0.95])
    correct = np.array([0, 1, 1, 1, 1])
    # 15 bins of width 1/15: {0.1,0.1} | {0.55} (0.533..0.6] has 0.55 and 0.58 | {0.95}
    want = (2 * abs(0.5 - 0.1) + 2 * abs(1 - (0.55 + 0.58) / 2) + 1 * abs(1 - 0.95)) / 5
    assert M.expected_calibration_error(conf, correct) == pytest.approx(want)


def test_topk_errors_of_a_known_confusion():
    logits = torch.tensor([[5., 4, 3, 2, 1, 0, -1],    # label 0: top-1 hit
                           [5., 4, 3, 2, 1, 0, -1],    # label 4: top-5 hit only
                           [5., 4, 3, 2, 1, 0, -1],    # label 6: miss
                           [0., 9, 0, 0, 0, 0, 0]])    # label 1: top-1 hit
    labels = torch.tensor([0, 4, 6, 1])
    top1, top5 = M.topk_correct(logits, labels)
    assert top1.tolist() == [True, False, False, True]
    assert top5.tolist() == [True, True, False, True]
    assert M.error_rate(top1) == 0.5 and M.error_rate(top5) == 0.25


def test_mce_normalisation_on_a_hand_table():
    errors = {"gaussian_noise": {1: 0.5, 2: 0.6, 3: 0.7, 4: 0.8, 5: 0.9},     # mean 0.7
              "brightness": {1: 0.30, 2: 0.32, 3: 0.34, 4: 0.36, 5: 0.38}}   # mean 0.34
    s = M.corruption_summary(errors, clean_error=0.25, baseline=ALEXNET_ERR)
    ce_g, ce_b = 0.7 / 0.886428, 0.34 / 0.564592
    assert s["per_corruption"]["gaussian_noise"]["ce"] == pytest.approx(ce_g)
    assert s["per_corruption"]["brightness"]["ce"] == pytest.approx(ce_b)
    assert s["mce"] == pytest.approx((ce_g + ce_b) / 2)
    assert s["mean_error"] == pytest.approx((0.7 + 0.34) / 2)
    assert s["relative_mean_error"] == pytest.approx((0.7 - 0.25 + 0.34 - 0.25) / 2)
    # AlexNet's numbers average all 5 severities: a partial table is not normalised
    partial = M.corruption_summary({"brightness": {1: 0.3, 5: 0.38}}, baseline=ALEXNET_ERR)
    assert partial["per_corruption"]["brightness"]["ce"] is None and partial["mce"] is None
    assert partial["mean_error"] == pytest.approx(0.34)


def test_published_lists():
    assert len(CORRUPTIONS) == 15 and set(ALEXNET_ERR) == set(CORRUPTIONS)
    assert list(IMAGENET_WNIDS) == sorted(IMAGENET_WNIDS)
    # the 200-class masks of the official code: index 1 (goldfish) is in R, 6 (stingray) in A
    r_mask = [i for i, w in enumerate(IMAGENET_WNIDS) if w in IMAGENET_R_WNIDS]
    a_mask = [i for i, w in enumerate(IMAGENET_WNIDS) if w in IMAGENET_A_WNIDS]
    assert r_mask[:5] == [1, 2, 4, 6, 8] and a_mask[:5] == [6, 11, 13, 15, 17]


# ---------------------------------------------------------------------------------------------
# PGD

class Linear(nn.Module):
    def __init__(self, dim=12, classes=3, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.w = nn.Parameter(torch.randn(classes, dim, generator=g))

    def forward(self, x):
        return x.flatten(1) @ self.w.t()


def test_pgd_one_step_is_the_analytic_sign_step():
    model = Linear()
    x = torch.rand(8, 3, 2, 2, generator=torch.Generator().manual_seed(1)) * 0.5 + 0.25
    y = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    eps, alpha = 0.1, 0.03
    p = torch.softmax(model(x), 1) - nn.functional.one_hot(y, 3).float()
    grad = (p @ model.w).view_as(x)                       # d CE / d x of a linear model
    want = (x + alpha * grad.sign()).clamp(0, 1)
    got = pgd_linf(model, x, y, eps=eps, alpha=alpha, steps=1, random_start=False)
    assert torch.allclose(got, want, atol=1e-6)
    assert model.w.grad is None                           # only the input was differentiated


def test_pgd_stays_in_the_ball_raises_the_loss_and_replays():
    model = Linear(dim=48, classes=5, seed=3)
    x = torch.rand(16, 3, 4, 4, generator=torch.Generator().manual_seed(2))
    y = model(x).argmax(1)                                # all correct before the attack
    eps = 8 / 255
    run = lambda seed, restarts=1: pgd_linf(model, x, y, eps, 2 / 255, 10, restarts=restarts,
                                            generator=torch.Generator().manual_seed(seed))
    adv = run(0)
    assert (adv - x).abs().max() <= eps + 1e-6 and adv.min() >= 0 and adv.max() <= 1
    ce = lambda z: nn.functional.cross_entropy(model(z), y, reduction="none")
    assert (ce(adv) > ce(x)).all()
    assert torch.equal(run(0), adv) and not torch.equal(run(1), adv)
    # restarts keep, per sample, the fooling example: never fewer fooled than restart 1 alone
    fooled1 = model(adv).argmax(1) != y
    fooled3 = model(run(0, restarts=3)).argmax(1) != y
    assert (fooled3 | ~fooled1).all()
    with torch.no_grad():                                 # works under no_grad (gradients re-enabled)
        assert torch.equal(run(0), adv)


# ---------------------------------------------------------------------------------------------
# Generated corruptions

@pytest.mark.slow
def test_each_generated_corruption_grows_with_severity():
    pytest.importorskip("imagecorruptions")
    from skimage.metrics import structural_similarity
    from dali_ipmix.robustness import corruptions as C
    images = photo_crops(32, 3, seed=0)
    state = np.random.get_state()
    for name in CORRUPTIONS:
        change = []
        for severity in range(1, 6):
            outs = [C.corrupt(x, name, severity, seed=11) for x in images]
            assert all(o.shape == x.shape and o.dtype == np.uint8 for o, x in zip(outs, images))
            change.append(np.mean([1 - structural_similarity(x, o, channel_axis=2, data_range=255)
                                   for x, o in zip(images, outs)]))
        # Hendrycks' tables are not monotone step by step in every pixel measure (glass blur's
        # severity 3 iterates more than 4), so: a change at 1, more at 5, more at 4-5 than at 1-2
        assert change[0] > 0.005, (name, change)
        assert change[4] > change[0] and change[3] + change[4] > change[0] + change[1], (name, change)
    assert np.array_equal(C.corrupt(images[0], "frost", 3, seed=5), C.corrupt(images[0], "frost", 3, seed=5))
    assert all(np.array_equal(a, b) for a, b in zip(np.random.get_state()[1:], state[1:]))  # global rng untouched
    with pytest.raises(ValueError):
        C.corrupt(images[0], "fog", 6, seed=0)


# ---------------------------------------------------------------------------------------------
# The report on tiny folders, with a model whose answers are known

class Brightness(nn.Module):
    """Votes by mean intensity: class ``dark`` below 0.5, ``bright`` above; ``fixed`` gets a
    constant logit (a class outside a 200-class mask that would otherwise win)."""

    def __init__(self, classes, dark, bright, fixed=None):
        super().__init__()
        self.n, self.dark, self.bright, self.fixed = len(classes), classes.index(dark), classes.index(bright), \
            (classes.index(fixed) if fixed else None)

    def forward(self, x):
        m = x.mean(dim=(1, 2, 3))
        logits = torch.full((x.shape[0], self.n), -5.0)
        logits[:, self.dark] = 20 * (0.5 - m)
        logits[:, self.bright] = 20 * (m - 0.5)
        if self.fixed is not None:
            logits[:, self.fixed] = 50.0
        return logits


def _write(folder, level, count, size=40, seed=0):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(count):
        img = np.clip(level + rng.normal(0, 10, (size, size, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(img).save(folder / f"{i}.png")


def test_imagenet_c_folder_gives_known_errors_and_alexnet_mce(tmp_path):
    classes = ["n01440764", "n01443537"]
    model = Brightness(classes, dark=classes[0], bright=classes[1])
    _write(tmp_path / "val" / classes[0], 60, 3)
    _write(tmp_path / "val" / classes[1], 200, 3)
    # ImageNet-C copy: severity s darkens the bright class until s >= 3 flips it (error 50 %)
    for name in ("fog", "contrast"):
        for s in range(1, 6):
            _write(tmp_path / "c" / name / str(s) / classes[0], 60, 2, seed=s)
            _write(tmp_path / "c" / name / str(s) / classes[1], 200 if s < 3 else 80, 2, seed=s)
    report = evaluate(model, 2, EvalSettings(data=str(tmp_path / "val"), image_size=32, resize=36,
                                             imagenet_c=str(tmp_path / "c"), corruptions=("fog", "contrast"),
                                             pgd=None, batch_size=4))
    assert report["clean"]["top1_err"] == 0 and report["clean"]["images"] == 6
    c = report["corruptions"]
    assert c["source"] == "imagenet-c"
    for name in ("fog", "contrast"):
        by = c["per_corruption"][name]["by_severity"]
        assert [by[s]["top1_err"] for s in range(1, 6)] == [0, 0, 50, 50, 50]
        assert c["per_corruption"][name]["error"] == pytest.approx(30)
        assert c["per_corruption"][name]["ce"] == pytest.approx(100 * 0.3 / ALEXNET_ERR[name])
    assert c["mce"] == pytest.approx(100 * (0.3 / ALEXNET_ERR["fog"] + 0.3 / ALEXNET_ERR["contrast"]) / 2)
    assert c["relative_mean_error"] == pytest.approx(30)


@pytest.mark.parametrize("layout", ["folders", "shards"])
def test_imagenet_r_masks_logits_to_its_classes(layout, tmp_path):
    r0, r1 = sorted(IMAGENET_R_WNIDS)[:2]
    outside = next(w for w in IMAGENET_WNIDS if w not in IMAGENET_R_WNIDS)
    classes = sorted([r0, r1, outside])
    _write(tmp_path / "r" / r0, 50, 2)
    _write(tmp_path / "r" / r1, 210, 3)
    r = tmp_path / "r"
    if layout == "shards":      # the wnids travel in the manifest
        from dali_ipmix import shard
        r = tmp_path / "r-shards"
        shard.convert(tmp_path / "r", r, count=2, jobs=1, log=lambda *a: None)
    model = Brightness(classes, dark=r0, bright=r1, fixed=outside)   # unmasked, `outside` always wins
    report = evaluate(model, 3, EvalSettings(classes=classes, image_size=32, resize=32,
                                             imagenet_r=str(r), pgd=None))
    assert report["imagenet_r"]["top1_err"] == 0 and report["imagenet_r"]["images"] == 5
    assert report["imagenet_r"]["classes"] == 2
    # an ImageNet-A folder holding a non-A class is refused
    a_only = next(w for w in IMAGENET_R_WNIDS if w not in IMAGENET_A_WNIDS)
    _write(tmp_path / "a" / a_only, 50, 1)
    with pytest.raises(UserError, match="not one of its 200 classes"):
        evaluate(model, 3, EvalSettings(classes=classes, imagenet_a=str(tmp_path / "a"), pgd=None))


def test_cifar_c_arrays_and_pgd(tmp_path):
    import pickle
    classes = ["cat", "dog"]
    model = Brightness(classes, dark="cat", bright="dog")
    # the clean test split as the CIFAR-10 python release (planar rows of 3072 bytes)
    release = tmp_path / "cifar" / "cifar-10-batches-py"
    release.mkdir(parents=True)
    test_labels = [0, 1, 1, 0, 1, 0, 0, 1]
    rows = np.stack([np.full(3072, 215 if y else 40, np.uint8) for y in test_labels])
    with open(release / "batches.meta", "wb") as f:
        pickle.dump({"label_names": classes}, f)
    with open(release / "test_batch", "wb") as f:
        pickle.dump({"data": rows, "labels": test_labels}, f)
    n = 4                                               # images per severity
    labels = np.tile([0, 1, 0, 1], 5)
    root = tmp_path / "cifar_c"
    root.mkdir()
    np.save(root / "labels.npy", labels)
    for name, flips in (("snow", 1), ("pixelate", 0)):  # `flips` images per severity get the wrong brightness
        data = np.zeros((5 * n, 32, 32, 3), np.uint8)
        for i, y in enumerate(labels):
            wrong = (i % n) < flips
            data[i] = 215 if (y == 1) != wrong else 40
        np.save(root / f"{name}.npy", data)
    report = evaluate(model, 2, EvalSettings(data=str(tmp_path / "cifar"), image_size=32, resize=32,
                                             cifar_c=str(root), corruptions=("snow", "pixelate"),
                                             pgd=PGDSettings(eps=0.4, alpha=0.1, steps=5), batch_size=3))
    c = report["corruptions"]
    assert c["per_corruption"]["snow"]["error"] == pytest.approx(25)
    assert c["per_corruption"]["pixelate"]["error"] == 0
    assert c["mean_error"] == pytest.approx(12.5) and c["mce"] is None
    # CIFAR protocol: calibration pooled over each corruption's severities, then averaged
    assert c["rms"] == pytest.approx(np.mean([p["rms_pooled"] for p in c["per_corruption"].values()]))
    # an eps of 0.4 moves any image across the 0.5 threshold: PGD breaks every image
    assert report["clean"]["images"] == 8 and report["clean"]["top1_err"] == 0
    assert report["pgd"]["clean_error"] == 0 and report["pgd"]["error"] == 100


# ---------------------------------------------------------------------------------------------
# Bad input: one-line errors

def test_layout_errors(tmp_path):
    from dali_ipmix.robustness import datasets as D
    (tmp_path / "c" / "fog" / "1").mkdir(parents=True)
    with pytest.raises(UserError, match="no severity folder fog/2"):
        D.imagenet_c_sets(tmp_path / "c", ("fog",))
    with pytest.raises(UserError, match="no folder for gaussian_noise"):
        D.imagenet_c_sets(tmp_path / "c")
    with pytest.raises(UserError, match="no labels.npy"):
        D.CifarC(tmp_path / "c")
    np.save(tmp_path / "c" / "labels.npy", np.zeros(10, np.int64))
    np.save(tmp_path / "c" / "fog.npy", np.zeros((7, 32, 32, 3), np.uint8))
    with pytest.raises(UserError, match="expected uint8 of shape"):
        D.CifarC(tmp_path / "c", ("fog",))
    with pytest.raises(UserError, match="CIFAR-C layout; pass it as --cifar-c"):
        D.imagenet_c_sets(tmp_path / "c", ("fog",))


@pytest.fixture
def tiny_run(tmp_path):
    from dali_ipmix import models
    for k, level in enumerate((40, 120, 210)):
        _write(tmp_path / "val" / f"class_{k}", level, 2, size=48)
    model = models.get_model("tiny_cnn", 3)
    ckpt = tmp_path / "checkpoint_00000010.pth"
    torch.save({"model": model.state_dict(), "arch": "tiny_cnn",
                "args": {"num_classes": 3, "image_size": 32, "preset": "imagenet"}}, ckpt)
    return tmp_path, ckpt


def _one_line_error(capsys, argv):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("dali-ipmix eval: error:")
    return err


def test_cli_report_and_json(tiny_run, capsys):
    tmp, ckpt = tiny_run
    out = tmp / "report.json"
    generated = _has_corruptions()
    corruption_flags = (["--corruptions", "brightness,contrast", "--severities", "1,5"] if generated
                        else ["--no-corruptions"])
    argv = ["eval", "--checkpoint", str(ckpt), "--data", str(tmp / "val"), "--workers", "0", "-q",
            "--pgd-steps", "2", "--json", str(out)] + corruption_flags
    assert main(argv) == 0
    table = capsys.readouterr().out
    report = json.loads(out.read_text())
    assert report["arch"] == "tiny_cnn" and report["image_size"] == 32 and report["resize"] == 37
    assert report["clean"]["images"] == 6
    if generated:
        c = report["corruptions"]
        assert c["source"] == "generated" and c["corruptions"] == ["brightness", "contrast"]
        assert c["severities"] == [1, 5] and c["mce"] is None
        assert c["relative_mean_error"] == pytest.approx(c["mean_error"] - report["clean"]["top1_err"])
    assert f"{report['clean']['top1_err']:.2f}" in table and "PGD-Linf eps 2/255" in table
    assert report["pgd"]["steps"] == 2 and report["pgd"]["eps"] == pytest.approx(2 / 255)
    err = _one_line_error(capsys, argv)                   # the JSON exists now
    assert "--overwrite" in err


def _has_corruptions():
    try:
        import imagecorruptions  # noqa: F401
    except ImportError:
        return False
    return True


def test_cli_bad_input(tiny_run, capsys):
    tmp, ckpt = tiny_run
    base = ["eval", "--checkpoint", str(ckpt), "--data", str(tmp / "val"), "--workers", "0", "-q"]
    assert "severities are 1-5" in _one_line_error(capsys, base + ["--severities", "0,6"])
    err = _one_line_error(capsys, base + ["--arch", "resnet18"])
    assert str(ckpt) in err and "tiny_cnn" in err and "resnet18" in err
    # a bare state_dict with the wrong --arch: the file, the given arch and the one it holds
    from dali_ipmix import models
    bare = tmp / "weights.pth"
    torch.save(models.get_model("preactresnet18", 3).state_dict(), bare)
    err = _one_line_error(capsys, ["eval", "--checkpoint", str(bare), "--arch", "tiny_cnn", "--data",
                                   str(tmp / "val"), "--no-corruptions", "--no-pgd", "-q"])
    assert str(bare) in err and "preactresnet18" in err and "tiny_cnn" in err
    assert "ImageNet-C layout" in _one_line_error(capsys, base + ["--imagenet-c", str(tmp / "val")])
    assert "no labels.npy" in _one_line_error(capsys, base + ["--cifar-c", str(tmp / "val")])
    assert "2/255" in _one_line_error(capsys, base + ["--pgd-eps", "two"])


@pytest.mark.parametrize("bad", ["truncated", "empty", "text"])
def test_cli_bad_image_is_one_line_naming_it(bad, tiny_run, capsys):
    tmp, ckpt = tiny_run
    path = tmp / "val" / "class_1" / "broken.png"
    good = (tmp / "val" / "class_1" / "0.png").read_bytes()
    path.write_bytes({"truncated": good[:len(good) // 2], "empty": b"", "text": b"just some notes\n"}[bad])
    # truncated: in a worker process, whose error comes back through the DataLoader (the default)
    workers = "1" if bad == "truncated" else "0"
    err = _one_line_error(capsys, ["eval", "--checkpoint", str(ckpt), "--data", str(tmp / "val"),
                                   "--workers", workers, "--no-corruptions", "--no-pgd", "-q"])
    assert str(path) in err and f"dali-ipmix verify {tmp / 'val'}" in err
    assert ("empty (0 bytes)" if bad == "empty" else "cannot be decoded") in err


@pytest.mark.skipif("not _has_corruptions()")
@pytest.mark.parametrize("name", ["pixelate", "jpeg_compression", "brightness"])
def test_generated_corruptions_are_writable_arrays(name):
    # read-only arrays make the DataLoader's collate warn once per worker
    from dali_ipmix.robustness import corruptions
    image = np.random.default_rng(0).integers(0, 256, (40, 40, 3), dtype=np.uint8)
    assert corruptions.corrupt(image, name, 3, seed=1).flags.writeable


@pytest.mark.slow
def test_cli_eps_is_announced_and_autoattack_on_an_adversarially_trained_checkpoint(tiny_run, capsys,
                                                                                      monkeypatch):
    from dali_ipmix import models
    tmp, ckpt = tiny_run
    base = ["--data", str(tmp / "val"), "--workers", "0", "--no-corruptions", "--pgd-steps", "2"]
    # too few classes for AutoAttack: refused before the clean and PGD passes, no --json
    import importlib
    monkeypatch.setattr(importlib.import_module("dali_ipmix.robustness.evaluate"), "evaluate", lambda *a, **kw: pytest.fail("evaluated first"))
    out = tmp / "few.json"
    assert ">= 4 classes" in _one_line_error(capsys, ["eval", str(ckpt), *base, "--autoattack", "-q",
                                                      "--json", str(out)])
    assert not out.exists()
    monkeypatch.undo()
    # a model without adversarial training: the IPMix default radius, printed as such
    assert main(["eval", str(ckpt), *base]) == 0
    captured = capsys.readouterr()
    assert "eps 2/255 = the IPMix protocol default, NOT the 8/255" in captured.out
    assert "at eps 2/255 (the IPMix protocol's default)" in captured.err
    _write(tmp / "val" / "class_3", 250, 2, size=48)
    adv = tmp / "best_robust.pth"
    torch.save({"model": models.get_model("tiny_cnn", 4).state_dict(), "arch": "tiny_cnn",
                "args": {"num_classes": 4, "image_size": 32, "preset": "imagenet", "adv_mixup": "aom",
                         "adv_eps": 8 / 255}}, adv)                  # as train.py records it

    # an adversarially trained checkpoint is attacked at the radius it records, and says so
    out = tmp / "adv.json"
    assert main(["eval", str(adv), *base, "--json", str(out)]) == 0
    captured = capsys.readouterr()
    assert json.loads(out.read_text())["pgd"]["eps"] == pytest.approx(8 / 255)
    assert "at eps 8/255 (the eps of adversarial training that the checkpoint records" in captured.err
    assert "NOT the 8/255" not in captured.out and "(default (" not in captured.err
    # --eps overrides it, and the trained radius is pointed out
    assert main(["eval", str(adv), *base, "--eps", "2/255"]) == 0
    captured = capsys.readouterr()
    assert "adversarially trained at eps 8/255: pass --eps 8/255" in captured.err

    pytest.importorskip("torchattacks")
    shorten_autoattack(monkeypatch, steps=5, queries=20)
    out = tmp / "aa.json"
    assert main(["eval", "--autoattack", "--eps", "8/255", str(adv), *base, "-q", "--json", str(out)]) == 0
    table = capsys.readouterr().out
    report = json.loads(out.read_text())
    pgd, aa = report["pgd"], report["autoattack"]
    assert pgd["eps"] == aa["eps"] == pytest.approx(8 / 255) and pgd["alpha"] == pytest.approx(2 / 255)
    assert aa["images"] == pgd["images"] == 8 and aa["clean_error"] <= aa["error"] <= 100
    assert aa["aa_minus_pgd_error"] == pytest.approx(aa["error"] - pgd["error"])
    assert "APGD-CE (5 it)" in aa["impl"]
    assert "NOT the 8/255" not in table and f"AutoAttack eps 8/255" in table
    assert "--no-pgd" in _one_line_error(capsys, ["eval", str(adv), *base, "--no-pgd", "--autoattack"])
    assert "give one" in _one_line_error(capsys, ["eval", str(adv), "--checkpoint", str(ckpt), *base])
    # an output file goes into a folder that exists: a mistyped one is refused, not created
    missing = tmp / "no_such_folder" / "r.json"
    assert "does not exist" in _one_line_error(capsys, ["eval", str(adv), *base, "--json", str(missing)])
    assert not missing.parent.exists()
    assert "--image-size 100000: must be in 8..4096" in _one_line_error(
        capsys, ["eval", str(adv), *base, "--image-size", "100000"])
