#!/usr/bin/env python
"""Where the ``aom`` attack moves the mixing ratio lambda, per attack objective.

A small CNN (``tiny_cnn``, width 8) is trained with mixup (one lambda per sample, soft
cross-entropy, Adam) on a 4-class toy task (class c: channel c brighter by 0.2 on a noisy grey
16 px image; class 3: none brighter), so it fits mixup.  The ``aom`` attack with its defaults
(eps 8/255, 10 steps, lambda sign-steps of 0.1, projection label) then runs on 128 pairs with
each objective.  Printed per objective: mean |lambda - 0.5| and the share of lambdas within 0.1
of 0.5, before -> after the attack, as the mean (min-max) over the seeds.  Soft cross-entropy is
largest where the label is most uncertain, so ascending it drives lambda to 0.5 on such a model.

    python scripts/lambda_spread.py --seeds 4
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from dali_ipmix import advmixup as A
from dali_ipmix.models import tiny_cnn

CLASSES, SIZE = 4, 16


def toy(n, seed):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, CLASSES, (n,), generator=g)
    x = 0.4 + 0.2 * torch.rand(n, 3, SIZE, SIZE, generator=g)
    for c in range(3):
        x[y == c, c] += 0.2
    return x.clamp(0, 1), y


def mixup_fitted(seed, steps):
    torch.manual_seed(seed)
    model = A.with_normalization(tiny_cnn(CLASSES, 8), (0.5,) * 3, (0.25,) * 3)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for i in range(steps):
        x, y = toy(32, 100 + i + 1000 * seed)
        perm, lam = A.draw_pairs(32, torch.Generator().manual_seed(i + 1000 * seed))
        target = A.soft_targets(lam, F.one_hot(y, CLASSES).float(), F.one_hot(y[perm], CLASSES).float())
        loss = A.soft_cross_entropy(model(A._mix(lam, x, x[perm])), target).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seeds", type=int, default=4, help="models (seeds 0..N-1)")
    p.add_argument("--train-steps", type=int, default=150)
    p.add_argument("--pairs", type=int, default=128)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    parser = argparse.ArgumentParser()
    A.add_adv_args(parser)
    rows = {obj: [] for obj in A.OBJECTIVES}
    for seed in range(args.seeds):
        model = mixup_fitted(seed, args.train_steps)
        x, y = toy(args.pairs, 7 + seed)
        for obj in A.OBJECTIVES:
            cfg = A.AdvConfig.from_args(parser.parse_args(["--adv-mixup", "aom", "--adv-objective", obj]))
            g = torch.Generator().manual_seed(seed)
            perm, lam0 = A.draw_pairs(args.pairs, g, cfg.mix_alpha, cfg.lambda_box)
            init = A.random_start(x, cfg.eps, 1, g)
            lam = A.probe(model, x, F.one_hot(y, CLASSES), perm, lam0, init, cfg).lam
            rows[obj].append([float((v - 0.5).abs().mean()) for v in (lam0, lam)]
                             + [float(((v - 0.5).abs() < 0.1).float().mean()) for v in (lam0, lam)])
    fmt = lambda vals, pct: (f"{sum(vals) / len(vals) * (100 if pct else 1):.{0 if pct else 3}f}"   # noqa: E731
                             f" ({min(vals) * (100 if pct else 1):.{0 if pct else 2}f}-"
                             f"{max(vals) * (100 if pct else 1):.{0 if pct else 2}f})")
    print(f"| objective | mean abs(lambda - 0.5) before -> after | share within 0.1 of 0.5 (%) before -> after |")
    print("| --- | --- | --- |")
    for obj, r in rows.items():
        cols = list(zip(*r))
        print(f"| {obj}{' (aom default)' if obj == A.MODE_DEFAULTS['aom']['adv_objective'] else ''} | "
              f"{fmt(cols[0], False)} -> {fmt(cols[1], False)} | {fmt(cols[2], True)} -> {fmt(cols[3], True)} |")


if __name__ == "__main__":
    main()
