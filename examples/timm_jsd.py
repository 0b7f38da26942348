#!/usr/bin/env python
"""A timm model trained on IPMix batches from DALI with timm's own ``JsdCrossEntropy``.

``views_layout="view_major"`` makes each batch three chunks -- all clean views, then all first
IPMix views, then all second ones -- which is what timm's ``JsdCrossEntropy(num_splits=3)`` and its
split batch norm (``--split-bn``: the clean chunk gets its own BN statistics, as in timm's train.py
with ``--aug-splits 3 --split-bn``) take.  The labels are those of the clean chunk.  With
``smoothing=0`` the loss is the project's ``losses.ipmix_loss`` (the official IPMix/AugMix loss);
timm's default smoothing is 0.1 (tests/test_ipmix_loader.py checks both).

    python examples/timm_jsd.py --data-path /data/imagenet/train --mixing /data/fractals \\
        --model resnet50 --split-bn --steps 1000
"""
import argparse

import timm
import torch
from timm.layers import convert_splitbn_model
from timm.loss import JsdCrossEntropy

from dali_ipmix import IPMixLoader


def get_args_parser():
    p = argparse.ArgumentParser(description="timm model + JsdCrossEntropy on IPMix batches")
    p.add_argument("--data-path", required=True, help="training class folders (<class>/*.jpg)")
    p.add_argument("--mixing", required=True, help="folder of mixing pictures (fractals)")
    p.add_argument("--preset", default="imagenet", choices=("imagenet", "cifar"))
    p.add_argument("--model", default="resnet50", help="timm model name (no pretrained weights)")
    p.add_argument("--split-bn", action="store_true", help="separate BN statistics per view chunk")
    p.add_argument("--smoothing", type=float, default=0.0, help="label smoothing (timm's default 0.1)")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("-b", "--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("-j", "--workers", type=int, default=4, help="DALI CPU threads")
    p.add_argument("--seed", type=int, default=0)
    return p


def main(args):
    """Trains ``args.steps`` steps; returns the model and the loss of each step."""
    torch.manual_seed(args.seed)
    loader = IPMixLoader(args.data_path, args.mixing, preset=args.preset, batch_size=args.batch_size,
                         num_threads=args.workers, seed=args.seed, views_layout="view_major",
                         dtype="float32")
    model = timm.create_model(args.model, pretrained=False, num_classes=loader.num_classes)
    if args.split_bn:
        model = convert_splitbn_model(model, num_splits=loader.views)
    model = model.to(loader.device).train()
    criterion = JsdCrossEntropy(num_splits=loader.views, alpha=12, smoothing=args.smoothing)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, weight_decay=1e-4)
    losses = []
    while len(losses) < args.steps:
        for images, labels in loader:        # images [3B, ...] = clean | IPMix 1 | IPMix 2
            with torch.autocast(loader.device.type, dtype=torch.bfloat16,
                                enabled=loader.device.type == "cuda"):
                logits = model(images)
            loss = criterion(logits.float(), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
            if len(losses) % 50 == 0:
                print(f"step {len(losses)}: loss {losses[-1]:.4f}", flush=True)
            if len(losses) == args.steps:
                break
    return model, losses


if __name__ == "__main__":
    main(get_args_parser().parse_args())
