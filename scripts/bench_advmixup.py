#!/usr/bin/env python
"""Cost of one training step in each adversarial-mixup mode against plain training.

A step is everything the trainer does per batch: loss (with the attack), backward, SGD step.
Random [0, 1] images stand in for the pipeline's output (the data side is not measured).
The last column is the estimate of docs/adversarial.md "Cost per training step" (in units of one
forward F: plain 3F, JSD 9F, K attack steps 2K F + 3F, PGD-AT term K' more attack steps + a doubled
training batch).

    python scripts/bench_advmixup.py                      # tiny_cnn, 32 px, batch 32
    python scripts/bench_advmixup.py --arch preactresnet18 --steps 3 --modes plain mixup_pgd-k1
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from dali_ipmix import advmixup as A
from dali_ipmix.losses import ipmix_loss
from dali_ipmix.models import get_model

# name -> (adv flags or None for plain training, views, estimate in units of a plain step)
MODES = {
    "plain": (None, 1, 1.0),
    "plain-jsd": (None, 3, 3.0),
    "mixup_pgd-k1": (["--adv-mixup", "mixup_pgd", "--adv-steps", "1"], 1, 5 / 3),
    "mixup_pgd-k10": (["--adv-mixup", "mixup_pgd", "--adv-steps", "10"], 1, 23 / 3),
    "aom-k10": (["--adv-mixup", "aom", "--adv-steps", "10"], 1, 23 / 3),
    "aom-k10-endpoints": (["--adv-mixup", "aom", "--adv-steps", "10", "--adv-probe", "endpoints"], 1, 23 / 3),
    "aom-k10-kl": (["--adv-mixup", "aom", "--adv-steps", "10", "--adv-objective", "kl_interp"], 1, 24 / 3),
    "aom-k10-pgd": (["--adv-mixup", "aom", "--adv-steps", "10", "--adv-pgd-weight", "1"], 1, 46 / 3),
    "aom-k10-jsd": (["--adv-mixup", "aom", "--adv-steps", "10"], 3, 32 / 3),
}


def adv_config(flags):
    p = argparse.ArgumentParser()
    A.add_adv_args(p)
    return A.AdvConfig.from_args(p.parse_args(flags))


def time_mode(name, model, batch, size, classes, steps, warmup):
    flags, views, _ = MODES[name]
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    adv = adv_config(flags) if flags else None
    g = torch.Generator().manual_seed(0)
    times = []
    for i in range(warmup + steps):
        x = torch.rand(batch * views, 3, size, size, generator=g)
        y = torch.randint(0, classes, (batch,), generator=g)
        t0 = time.perf_counter()
        if adv is None:
            loss, _ = ipmix_loss(model(x), y, views)
        else:
            loss, _ = A.adv_mixup_loss(model, model, x, y, classes, adv, seed=0, epoch=0, step=i,
                                       rank=0, views=views)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--arch", default="tiny_cnn")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--steps", type=int, default=10, help="measured steps per mode (median reported)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = A.with_normalization(get_model(args.arch, args.classes), (0.5,) * 3, (0.25,) * 3)
    model.train()
    print(f"{args.arch}, {args.size} px, batch {args.batch}, {torch.get_num_threads()} thread(s), "
          f"median of {args.steps} steps after {args.warmup} warm-up")
    print("| mode | ms / step | x plain | estimate |")
    print("| --- | ---: | ---: | ---: |")
    base = None
    for name in (["plain"] if "plain" not in args.modes else []) + args.modes:
        sec = time_mode(name, model, args.batch, args.size, args.classes, args.steps, args.warmup)
        base = base or sec
        if name in args.modes:
            print(f"| {name} | {1000 * sec:.1f} | {sec / base:.2f} | {MODES[name][2]:.2f} |", flush=True)


if __name__ == "__main__":
    main()
