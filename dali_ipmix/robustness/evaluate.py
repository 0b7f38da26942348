"""The robustness evaluation: clean, corruptions, ImageNet-R/-A and PGD, as one report dict.

Protocol (hzlsaber/IPMix ``imagenet.py`` / ``cifar.py``, AugMix / PixMix ``calibration_tools``):

* every image set gives top-1 / top-5 error, the RMS calibration error (adaptive bins of 100,
  official ``calib_err``) and ECE (15 equal-width bins) of the max-softmax confidence;
* corruptions: top-1 error per (corruption, severity); per corruption the mean over severities.
  ImageNet-C folder: CE normalised by AlexNet's errors and mCE = their mean (Hendrycks &
  Dietterich); CIFAR-C: the unnormalised mean error (the CIFAR "mCE" of the paper); generated
  corruptions: the unnormalised mean error and the mean error minus the clean error.  The headline
  RMS / ECE on corruptions is the mean over (corruption, severity) sets for ImageNet-C and
  generated corruptions (IPMix ``evaluate_c``) and the mean over corruptions of the value pooled
  over severities for CIFAR-C (PixMix ``test_c``);
* ImageNet-R / ImageNet-A: logits restricted to the data set's 200 classes (the published wnid
  lists, :mod:`.wnids`) before the softmax and the argmax;
* PGD-L-inf on the clean set (:func:`.attacks.pgd_linf`), pixels in [0, 1].

All numbers in the report are percentages.
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from functools import partial
from typing import Callable, Dict, List, Mapping, Optional, Sequence

import numpy as np
import torch

from .. import readers, sources
from ..errors import UserError
from . import corruptions as corr
from . import datasets as D
from ..attacks import PGD_ALPHA, PGD_EPS, PGD_STEPS, pgd_linf
from .metrics import (ECE_BINS, RMS_BIN_SIZE, confidence, corruption_summary, error_rate,
                      expected_calibration_error, rms_calibration_error, topk_correct)
from .tables import ALEXNET_ERR, CORRUPTIONS, SEVERITIES
from .wnids import IMAGENET_A_WNIDS, IMAGENET_R_WNIDS, IMAGENET_WNIDS


@dataclass
class PGDSettings:
    eps: float = PGD_EPS
    alpha: float = PGD_ALPHA
    steps: int = PGD_STEPS
    restarts: int = 1
    random_start: bool = True
    max_images: Optional[int] = None      # PGD on the first share of the clean set (None: all)
    autoattack: bool = False              # AutoAttack (standard) on the same images, same eps
    eps_source: str = "default"   # how eps was chosen (a key of EPS_SOURCES)


# how PGDSettings.eps was chosen -> the words printed with the numbers
EPS_SOURCES = {"default": "the IPMix protocol's default",
               "checkpoint": "the eps of adversarial training that the checkpoint records; --eps "
                              "overrides it",
               "--eps": "--eps"}


@dataclass
class EvalSettings:
    data: Optional[str] = None            # clean validation class folder or CIFAR python release
    classes: Optional[Sequence[str]] = None   # the model's class names in label order (default:
                                          # --data's sorted folder names, or the 1000 wnids)
    image_size: int = 224
    resize: int = 256
    imagenet_c: Optional[str] = None
    cifar_c: Optional[str] = None
    generate_corruptions: bool = True     # when no -C folder is given and `data` is
    corruptions: Sequence[str] = CORRUPTIONS
    severities: Sequence[int] = SEVERITIES
    imagenet_r: Optional[str] = None
    imagenet_a: Optional[str] = None
    pgd: Optional[PGDSettings] = field(default_factory=PGDSettings)
    batch_size: int = 64
    workers: int = 0
    device: str = "cpu"
    seed: int = 0
    max_images: Optional[int] = None      # per image set
    rms_bin_size: int = RMS_BIN_SIZE
    rms_skip_last_bin: bool = True        # official calib_err leaves the last bin out
    ece_bins: int = ECE_BINS
    progress: bool = True                 # a progress line per image set (terminals only)


@dataclass
class Outcome:
    """Per-sample results of one image set."""
    confidence: np.ndarray
    top1: np.ndarray
    top5: np.ndarray

    @staticmethod
    def concat(outcomes: Sequence["Outcome"]) -> "Outcome":
        return Outcome(*(np.concatenate([getattr(o, f.name) for o in outcomes])
                         for f in dataclasses.fields(Outcome)))

    def summary(self, s: EvalSettings) -> Dict[str, float]:
        return {
            "images": int(self.top1.size),
            "top1_err": 100 * error_rate(self.top1),
            "top5_err": 100 * error_rate(self.top5),
            "rms": 100 * rms_calibration_error(self.confidence, self.top1, s.rms_bin_size, s.rms_skip_last_bin),
            "ece": 100 * expected_calibration_error(self.confidence, self.top1, s.ece_bins),
        }


def to_pixels(images: torch.Tensor, device) -> torch.Tensor:
    """uint8 NHWC -> float NCHW in [0, 1]."""
    return images.to(device).permute(0, 3, 1, 2).float().div_(255)


def predict(model, dataset, s: EvalSettings, mask: Optional[Sequence[int]] = None,
            attack: Optional[Callable] = None, label: str = "") -> Outcome:
    """Run ``model`` (pixels in [0, 1] -> logits) over ``dataset``; ``mask`` keeps those logits
    (labels index into it); ``attack(model, x, y)`` replaces the images first.  A picture that
    cannot be read is a one-line ``UserError`` naming it."""
    try:
        return _predict(model, dataset, s, mask, attack, label)
    except D.ImageReadError as e:
        raise UserError(e.one_line()) from None


def _predict(model, dataset, s, mask, attack, label) -> Outcome:
    from ..progress import Progress
    loader = torch.utils.data.DataLoader(dataset, batch_size=s.batch_size, shuffle=False,
                                         num_workers=s.workers)
    keep = None if mask is None else torch.as_tensor(list(mask), device=s.device)
    confs, top1s, top5s = [], [], []
    with Progress(label or "images", len(dataset), enabled=None if s.progress else False) as bar:
        for images, labels in loader:
            x, y = to_pixels(images, s.device), labels.to(s.device)
            if attack is not None:
                x = attack(model, x, y)
            with torch.no_grad():
                logits = model(x).float()
            if keep is not None:
                logits = logits.index_select(1, keep)
            if int(y.max()) >= logits.shape[1] or int(y.min()) < 0:
                raise UserError(f"labels up to {int(y.max())} but the model has {logits.shape[1]} outputs; "
                                f"the data set's classes do not match the model's")
            top1, top5 = topk_correct(logits, y, (1, 5))
            confs.append(confidence(logits))
            top1s.append(top1)
            top5s.append(top5)
            bar.update(len(labels))
    if not top1s:
        return Outcome(np.zeros(0), np.zeros(0, bool), np.zeros(0, bool))
    return Outcome(np.concatenate(confs), np.concatenate(top1s), np.concatenate(top5s))


# ---------------------------------------------------------------------------------------------
# Image sets

class CleanData:
    """The clean validation set: a class folder or a shard set of one (local or ``s3://``,
    :mod:`dali_ipmix.sources`), or a CIFAR python release (its test split, read
    by :func:`dali_ipmix.data.cifar.load_cifar`) as the official CIFAR evaluation uses."""

    def __init__(self, s: EvalSettings):
        from ..data.cifar import find_pickle_dir, load_cifar
        self.s, self.arrays = s, None
        if find_pickle_dir(s.data) is not None:
            images, labels, self.classes = load_cifar(s.data, "test")
            if images.shape[1] != s.image_size:
                raise UserError(f"--data {s.data}: CIFAR images are {images.shape[1]} px but the crop is "
                                f"{s.image_size}; pass --preset cifar or --image-size {images.shape[1]}")
            self.arrays = (images, labels)
        else:       # class folders or shards, local or s3://, listed once
            self.source = sources.open_source(s.data, flag="--data")
            self.classes = self.source.classes

    def dataset(self, label_of: Mapping[str, int]):
        s = self.s
        if self.arrays is None:
            return D.ClassFolderImages(self.source, resize=s.resize, size=s.image_size, label_of=label_of,
                                       max_images=s.max_images)
        images, labels = self.arrays
        idx = readers.subset_indices(len(labels), s.max_images)
        remap = np.array([label_of.get(name, -1) for name in self.classes])
        if (remap < 0).any():
            raise UserError(f"--data {s.data}: its classes are not the model's classes")
        return D.ArrayImages(images[idx], remap[labels[idx]])


def model_classes(s: EvalSettings, num_classes: int, clean: Optional[CleanData]) -> Optional[List[str]]:
    """The model's class names in label order, or None when nothing tells them."""
    if s.classes is not None:
        classes = list(s.classes)
    elif clean is not None:
        classes = list(clean.classes)
    elif num_classes == len(IMAGENET_WNIDS):
        classes = list(IMAGENET_WNIDS)
    else:
        return None
    if len(classes) != num_classes:
        source = f"--data {s.data}" if s.classes is None else "the class list"
        raise UserError(f"{source} has {len(classes)} classes but the model has {num_classes} outputs; "
                        f"give the validation data of the classes it was trained on")
    return classes


def _need_classes(classes, flag, path):
    if classes is None:
        raise UserError(f"{flag} {path}: class folders need the model's class names; pass --data VAL_DIR "
                        f"(its folder names, in sorted order, are the model's labels)")
    return {name: i for i, name in enumerate(classes)}


def corruption_sets(s: EvalSettings, classes, clean: Optional[CleanData]) -> Dict[str, object]:
    """{"source", "sets": {(corruption, severity): dataset}} or None when corruptions are off."""
    if s.imagenet_c:
        index = _need_classes(classes, "--imagenet-c", s.imagenet_c)
        folders = D.imagenet_c_sets(s.imagenet_c, s.corruptions, s.severities)
        sets = {key: D.ClassFolderImages(folder, resize=s.resize, size=s.image_size, label_of=index,
                                         flag="--imagenet-c", max_images=s.max_images)
                for key, folder in folders.items()}
        return {"source": "imagenet-c", "sets": sets}
    if s.cifar_c:
        cifar = D.CifarC(s.cifar_c, s.corruptions)
        sets = {(c, sev): cifar.images(c, sev, s.max_images) for c in s.corruptions for sev in s.severities}
        return {"source": "cifar-c", "sets": sets}
    if s.generate_corruptions and clean is not None:
        if s.image_size < corr.MIN_SIDE:
            raise UserError(f"--image-size {s.image_size}: generated corruptions need at least "
                            f"{corr.MIN_SIDE} px (or pass --no-corruptions)")
        corr.check_available()
        corr.warm_up(s.corruptions)
        base = clean.dataset(_need_classes(classes, "--data", s.data))
        sets = {(c, sev): D.CorruptedImages(base, c, sev, s.seed) for c in s.corruptions for sev in s.severities}
        return {"source": "generated", "sets": sets}
    return None


def subset_set(root, subset: Sequence[str], classes, s: EvalSettings, flag: str):
    """(dataset, logit mask, classes used) of an ImageNet-R / -A folder."""
    index = _need_classes(classes, flag, root)
    source = sources.open_source(root, flag=flag)
    folders = source.classes
    unknown = [f for f in folders if f not in subset]
    if unknown:
        raise UserError(f"{flag} {root}: folder {unknown[0]} is not one of its 200 classes "
                        f"({len(unknown)} such); expected {flag[2:]} class folders named by wnid")
    used = [w for w in sorted(subset) if w in index]
    if not used:
        raise UserError(f"{flag} {root}: the model has none of its 200 classes (by wnid); its class names "
                        f"come from --data")
    dataset = D.ClassFolderImages(source, resize=s.resize, size=s.image_size,
                                  label_of={w: i for i, w in enumerate(used)}, flag=flag, max_images=s.max_images)
    return dataset, [index[w] for w in used], used


# ---------------------------------------------------------------------------------------------
# The report

def _timed(log, label, fn):
    start = time.monotonic()
    outcome = fn(label=label)
    log(f"{label}: {outcome.top1.size} images, top-1 error {100 * error_rate(outcome.top1):.2f}% "
        f"({time.monotonic() - start:.1f} s)")
    return outcome


def evaluate_corruptions(model, found, clean_error: Optional[float], s: EvalSettings, log) -> Dict:
    source, sets = found["source"], found["sets"]
    outcomes = {key: _timed(log, f"{source} {key[0]}/{key[1]}", partial(predict, model, ds, s))
                for key, ds in sets.items()}
    severities = {}                                   # corruption -> its severities, in order
    for name, sev in sets:
        severities.setdefault(name, []).append(sev)
    errors = {c: {sev: error_rate(outcomes[(c, sev)].top1) for sev in sevs} for c, sevs in severities.items()}
    summary = corruption_summary(errors, clean_error, ALEXNET_ERR if source == "imagenet-c" else None)
    per = {}
    for c, sevs in severities.items():
        row = summary["per_corruption"][c]
        pooled = Outcome.concat([outcomes[(c, sev)] for sev in sevs]).summary(s)
        per[c] = {
            "error": 100 * row["error"],
            "ce": None if row["ce"] is None else 100 * row["ce"],
            "relative_error": None if row["relative"] is None else 100 * row["relative"],
            "rms_pooled": pooled["rms"], "ece_pooled": pooled["ece"],
            "by_severity": {sev: outcomes[(c, sev)].summary(s) for sev in sevs},
        }
    if source == "cifar-c":   # PixMix test_c: calibration over each corruption's 5 severities together
        rms = float(np.mean([p["rms_pooled"] for p in per.values()]))
        ece = float(np.mean([p["ece_pooled"] for p in per.values()]))
    else:                     # IPMix evaluate_c: mean over (corruption, severity) sets
        rms = float(np.mean([v["rms"] for p in per.values() for v in p["by_severity"].values()]))
        ece = float(np.mean([v["ece"] for p in per.values() for v in p["by_severity"].values()]))
    return {
        "source": source,
        "corruptions": list(severities),
        "severities": sorted({sev for _, sev in sets}),
        "mean_error": 100 * summary["mean_error"],
        "mce": None if summary["mce"] is None else 100 * summary["mce"],
        "relative_mean_error": (None if summary["relative_mean_error"] is None
                                else 100 * summary["relative_mean_error"]),
        "mean_top5_err": float(np.mean([v["top5_err"] for p in per.values() for v in p["by_severity"].values()])),
        "rms": rms,
        "ece": ece,
        "per_corruption": per,
    }


def evaluate(model, num_classes: int, settings: Optional[EvalSettings] = None,
             log: Callable[[str], None] = lambda message: None) -> Dict[str, object]:
    """Evaluate ``model`` (pixels in [0, 1], NCHW -> logits; see :class:`.model.Normalized`) and
    return the report (percentages).  Sections appear for the inputs given in ``settings``."""
    s = settings or EvalSettings()
    if s.severities and any(sev not in SEVERITIES for sev in s.severities):
        raise UserError(f"--severities {','.join(map(str, s.severities))}: severities are 1-5")
    unknown = [c for c in s.corruptions if c not in CORRUPTIONS]
    if unknown:
        raise UserError(f"--corruptions: unknown {', '.join(unknown)}; choose from {', '.join(CORRUPTIONS)}")
    model.eval()
    # Every input is opened (and its layout checked) before the first forward pass.
    clean = CleanData(s) if s.data else None
    classes = model_classes(s, num_classes, clean)
    report: Dict[str, object] = {"units": "percent", "image_size": s.image_size, "resize": s.resize}
    clean_set = clean.dataset(_need_classes(classes, "--data", s.data)) if clean else None
    found = corruption_sets(s, classes, clean)
    subsets = {key: subset_set(path, wnids, classes, s, flag)
               for key, path, wnids, flag in (("imagenet_r", s.imagenet_r, IMAGENET_R_WNIDS, "--imagenet-r"),
                                              ("imagenet_a", s.imagenet_a, IMAGENET_A_WNIDS, "--imagenet-a"))
               if path}
    clean_error, clean_outcome = None, None
    if clean_set is not None:
        clean_outcome = _timed(log, "clean", partial(predict, model, clean_set, s))
        report["clean"] = clean_outcome.summary(s)
        clean_error = error_rate(clean_outcome.top1)
    if found is not None:
        report["corruptions"] = evaluate_corruptions(model, found, clean_error, s, log)
    for key, (dataset, mask, used) in subsets.items():
        outcome = _timed(log, key, partial(predict, model, dataset, s, mask))
        report[key] = dict(outcome.summary(s), classes=len(used))
    if s.pgd is not None and clean_set is not None:
        p = s.pgd
        generator = torch.Generator(device=s.device).manual_seed(s.seed)
        attack = partial(pgd_linf, eps=p.eps, alpha=p.alpha, steps=p.steps, restarts=p.restarts,
                         random_start=p.random_start, generator=generator)
        chosen = readers.subset_indices(len(clean_set), p.max_images)
        subset = torch.utils.data.Subset(clean_set, chosen.tolist())
        adv = _timed(log, f"pgd eps {p.eps * 255:g}/255", partial(predict, model, subset, s, None, attack))
        report["pgd"] = {"eps": p.eps, "alpha": p.alpha, "steps": p.steps, "restarts": p.restarts,
                         "eps_source": p.eps_source,
                         "images": int(adv.top1.size), "error": 100 * error_rate(adv.top1),
                         "clean_error": 100 * error_rate(clean_outcome.top1[chosen])}
        if p.autoattack:
            aa = AutoAttackOnce(num_classes, p.eps, s.seed)
            out = _timed(log, f"autoattack eps {p.eps * 255:g}/255", partial(predict, model, subset, s, None, aa))
            report["autoattack"] = {"eps": p.eps, "images": int(out.top1.size), "impl": aa.describe(),
                                    "error": 100 * error_rate(out.top1),
                                    "clean_error": report["pgd"]["clean_error"],
                                    "aa_minus_pgd_error": 100 * (error_rate(out.top1) - error_rate(adv.top1))}
    return report


class AutoAttackOnce:
    """``attack(model, x, y)`` for :func:`predict`: AutoAttack standard (``attacks.autoattack_standard``,
    official settings), built on first use, in float32, under a forked RNG (torchattacks re-seeds
    the global generator), the model left in eval mode."""

    def __init__(self, num_classes: int, eps: float, seed: int):
        self.num_classes, self.eps, self.seed, self.attack = num_classes, eps, seed, None

    def __call__(self, model, x, y):
        from ..attacks import autoattack_standard
        if self.attack is None:
            self.attack = autoattack_standard(model, self.eps, self.num_classes, self.seed)
        devices = [x.device.index or 0] if x.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            x_adv = self.attack(x.contiguous(), y)    # FAB .view()s gradients shaped like x
        model.eval()
        return x_adv

    def describe(self) -> str:
        from ..attacks import describe_autoattack
        return describe_autoattack(self.attack) if self.attack is not None else "not run (no images)"
