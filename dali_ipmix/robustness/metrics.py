"""Metrics of the robustness report, as the IPMix / AugMix / PixMix code computes them.

All functions take per-sample arrays (NumPy) or logits (torch) and return fractions in [0, 1];
the report multiplies by 100.
"""
from __future__ import annotations

import math
from typing import Dict, Mapping, Optional, Sequence

import numpy as np
import torch

RMS_BIN_SIZE = 100   # official calib_err: beta=100 samples per bin
ECE_BINS = 15        # Guo et al. 2017: 15 equal-width confidence bins


def topk_correct(logits: torch.Tensor, labels: torch.Tensor, ks: Sequence[int] = (1, 5)):
    """Per-sample hits (bool NumPy arrays), one per k; k above the class count means all classes."""
    maxk = min(max(ks), logits.shape[1])
    hits = logits.topk(maxk, dim=1).indices.eq(labels.view(-1, 1))
    return [hits[:, :min(k, maxk)].any(dim=1).cpu().numpy() for k in ks]


def confidence(logits: torch.Tensor) -> np.ndarray:
    """Max softmax probability per sample (the confidence the calibration metrics use)."""
    return torch.softmax(logits.float(), dim=1).max(dim=1).values.cpu().numpy()


def error_rate(correct) -> float:
    correct = np.asarray(correct)
    return float("nan") if correct.size == 0 else 1.0 - float(correct.mean())


def rms_calibration_error(confidence, correct, bin_size: int = RMS_BIN_SIZE,
                          skip_last_bin: bool = True) -> float:
    """RMS calibration error with adaptive bins, the official ``calib_err(confidence, correct,
    p='2', beta=100)`` of the AugMix / PixMix / IPMix code (Hendrycks et al.).

    Samples are sorted by confidence and cut into ``n // bin_size`` bins of ``bin_size`` samples,
    the last bin taking the remainder; the error is
    ``sqrt(sum_b |b|/n * (mean conf_b - mean correct_b)^2)``.  As in the official loop, the last
    (most confident) bin is left out of the sum but ``n`` still counts its samples
    (``skip_last_bin=False`` uses every bin).  With fewer than ``2 * bin_size`` samples, where the
    official code fails (n < bin_size) or returns 0 (its only bin is the skipped one), all samples
    form one bin, which is counted.  Ties in confidence are ordered stably (the official
    ``np.argsort`` leaves their order unspecified).
    """
    confidence = np.asarray(confidence, dtype=np.float64).ravel()
    correct = np.asarray(correct, dtype=np.float64).ravel()
    n = confidence.size
    if n != correct.size:
        raise ValueError(f"confidence ({n}) and correct ({correct.size}) differ in length")
    if n == 0:
        return float("nan")
    order = np.argsort(confidence, kind="stable")
    confidence, correct = confidence[order], correct[order]
    edges = [i * bin_size for i in range(max(1, n // bin_size))] + [n]
    bins = list(zip(edges[:-1], edges[1:]))
    if skip_last_bin and len(bins) > 1:
        bins = bins[:-1]
    total = 0.0
    for lo, hi in bins:
        gap = confidence[lo:hi].mean() - correct[lo:hi].mean()
        total += (hi - lo) / n * gap * gap
    return math.sqrt(total)


def expected_calibration_error(confidence, correct, n_bins: int = ECE_BINS) -> float:
    """ECE with ``n_bins`` equal-width confidence bins ``(k/n_bins, (k+1)/n_bins]`` (Guo et al.):
    ``sum_b |b|/n * |accuracy_b - mean confidence_b|``."""
    confidence = np.asarray(confidence, dtype=np.float64).ravel()
    correct = np.asarray(correct, dtype=np.float64).ravel()
    n = confidence.size
    if n == 0:
        return float("nan")
    index = np.clip(np.ceil(confidence * n_bins).astype(np.int64) - 1, 0, n_bins - 1)
    conf_sum = np.bincount(index, weights=confidence, minlength=n_bins)
    hit_sum = np.bincount(index, weights=correct, minlength=n_bins)
    return float(np.abs(hit_sum - conf_sum).sum() / n)   # |b| * |acc_b - conf_b| = |sum hits - sum conf|


def corruption_summary(errors: Mapping[str, Mapping[int, float]], clean_error: Optional[float] = None,
                       baseline: Optional[Mapping[str, float]] = None,
                       all_severities: Sequence[int] = (1, 2, 3, 4, 5)) -> Dict[str, object]:
    """Per-corruption and overall corruption errors from ``errors[corruption][severity]``
    (top-1 error fractions).

    * ``error``: mean over severities (the CIFAR-C "mCE" is the mean of these, unnormalised);
    * ``ce``: ``error / baseline[c]`` (ImageNet-C: AlexNet's mean error), only when every severity
      of ``all_severities`` was measured, since the baseline is a mean over all of them;
    * ``relative``: ``error - clean_error`` (the corruption's cost over the clean error).
    Overall: ``mean_error``, ``mce`` (mean of ``ce``, or None) and ``relative_mean_error``.
    """
    per = {}
    for name, by_severity in errors.items():
        values = [by_severity[s] for s in sorted(by_severity)]
        mean = float(np.mean(values))
        complete = set(by_severity) == set(all_severities)
        row = {"error": mean, "ce": None, "relative": None}
        if baseline is not None and complete and name in baseline:
            row["ce"] = mean / baseline[name]
        if clean_error is not None:
            row["relative"] = mean - clean_error
        per[name] = row
    ces = [r["ce"] for r in per.values()]
    return {
        "per_corruption": per,
        "mean_error": float(np.mean([r["error"] for r in per.values()])) if per else float("nan"),
        "mce": float(np.mean(ces)) if per and all(c is not None for c in ces) else None,
        "relative_mean_error": (float(np.mean([r["relative"] for r in per.values()]))
                                if per and clean_error is not None else None),
    }
