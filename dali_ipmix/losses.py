"""Training losses: the AugMix/IPMix Jensen-Shannon consistency loss of the official code."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def jsd_loss(logits_clean: torch.Tensor, logits_aug1: torch.Tensor, logits_aug2: torch.Tensor,
             labels: torch.Tensor, weight: float = 12.0, label_smoothing: float = 0.0) -> torch.Tensor:
    """``CE(logits_clean, y) + weight * (KL(p_c||M) + KL(p_1||M) + KL(p_2||M)) / 3``.

    Exactly the official ``train`` (hzlsaber/IPMix ``imagenet.py``, same as AugMix): p = softmax,
    ``M = clamp((p_c + p_1 + p_2) / 3, 1e-7, 1)`` and ``F.kl_div(log M, p, reduction='batchmean')``.
    Cross-entropy is on the clean view only. Computed in float32 whatever the logits' dtype (AMP).
    """
    logits_clean, logits_aug1, logits_aug2 = (t.float() for t in (logits_clean, logits_aug1, logits_aug2))
    loss = F.cross_entropy(logits_clean, labels, label_smoothing=label_smoothing)
    p_clean = F.softmax(logits_clean, dim=1)
    p_aug1 = F.softmax(logits_aug1, dim=1)
    p_aug2 = F.softmax(logits_aug2, dim=1)
    # Clamp the mixture distribution to avoid an exploding KL divergence (official comment).
    log_m = torch.clamp((p_clean + p_aug1 + p_aug2) / 3.0, 1e-7, 1).log()
    consistency = (F.kl_div(log_m, p_clean, reduction="batchmean")
                   + F.kl_div(log_m, p_aug1, reduction="batchmean")
                   + F.kl_div(log_m, p_aug2, reduction="batchmean")) / 3.0
    return loss + weight * consistency


def ipmix_loss(logits: torch.Tensor, labels: torch.Tensor, views: int, *, jsd_weight: float = 12.0,
               label_smoothing: float = 0.0, views_layout: str = "sample_major"):
    """Loss and clean-view logits for a forward pass over ``[B * views]`` images.

    ``views == 3``: (clean, aug1, aug2) per sample -> :func:`jsd_loss`; ``views == 1``: plain CE.
    ``views_layout`` as the loader's (``IPMixLoader``): "sample_major" (the three views of a
    sample next to each other) or "view_major" (three chunks of B: all clean, all aug1, all aug2).
    """
    if views == 1:
        return F.cross_entropy(logits.float(), labels, label_smoothing=label_smoothing), logits
    if views != 3:
        raise ValueError(f"expected 1 or 3 views per sample, got {views}")
    if views_layout == "sample_major":
        clean, aug1, aug2 = logits.view(labels.shape[0], views, -1).unbind(1)
    elif views_layout == "view_major":
        clean, aug1, aug2 = logits.view(views, labels.shape[0], -1).unbind(0)
    else:
        raise ValueError(f"views_layout must be 'sample_major' or 'view_major', got {views_layout!r}")
    return jsd_loss(clean, aug1, aug2, labels, weight=jsd_weight, label_smoothing=label_smoothing), clean
