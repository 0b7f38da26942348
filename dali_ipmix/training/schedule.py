"""The learning-rate schedule (README "Training": Loss and schedule): the official IPMix cosine per
iteration down to ``1e-6 * 128 / batch``, or Rice et al.'s piecewise steps; an optional linear
warm-up, and linear scaling of the peak with the global batch."""
from __future__ import annotations

import math

import torch


def peak_lr(lr: float, global_batch: int, scale_batch: int) -> float:
    """``--lr`` scaled linearly to the global batch when ``--lr-scale-batch N`` is given."""
    return lr * global_batch / scale_batch if scale_batch else lr


def make_lr_lambda(total_steps: int, warmup_steps: int, min_factor: float, schedule: str = "cosine"):
    """Official schedule: cosine per iteration from 1 to ``min_factor`` (multiplier of the peak lr),
    after an optional linear warmup.  ``piecewise``: Rice et al.'s 1, 1/10 from half of training,
    1/100 from three quarters, read at the end of each step as their lr_schedule(epoch + (i+1)/n)."""
    def lr_lambda(step):
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        if schedule == "piecewise":
            done = (step + 1) / max(1, total_steps)
            return 1.0 if done < 0.5 else 0.1 if done < 0.75 else 0.01
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_factor + (1 - min_factor) * 0.5 * (1 + math.cos(math.pi * progress))
    return lr_lambda


def lr_scheduler(optimizer, *, peak: float, global_batch: int, epochs: int, steps_per_epoch: int,
                 warmup_epochs: float, schedule: str) -> torch.optim.lr_scheduler.LambdaLR:
    """Stepped once per optimizer step, over ``epochs`` whole epochs (``--max-steps`` does not
    shorten it)."""
    warmup_steps = int(round(warmup_epochs * steps_per_epoch))
    final_lr = 1e-6 * 128 / global_batch          # official: 1e-6 / (lr * bs / 128) as a multiplier
    return torch.optim.lr_scheduler.LambdaLR(optimizer, make_lr_lambda(
        epochs * steps_per_epoch, warmup_steps, min(1.0, final_lr / peak), schedule))
