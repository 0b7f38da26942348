#!/usr/bin/env python
"""IPMix batches from DALI in a plain PyTorch loop, in the shape of torchvision's
references/classification/train.py: one process per GPU under torchrun (DDP), mixed precision
where there is a GPU, the JSD consistency loss, and checkpoints that hold the loader's position
beside the model, so a stopped run continues with the exact next batch.

    python examples/pytorch_loop.py --data-path /data/imagenet --mixing /data/fractals
    torchrun --nproc_per_node=8 examples/pytorch_loop.py --data-path /data/imagenet \\
        --mixing /data/fractals --output-dir runs/rn50
    python examples/pytorch_loop.py ... --resume runs/rn50/checkpoint.pth

``--data-path DIR`` holds ``DIR/train/<class>/*.jpg`` and ``DIR/val/<class>/*.jpg``; the mixing
set is a folder of pictures (``dali-ipmix fractals --out DIR --count 1000`` makes one).
"""
import argparse
import math
import os

import torch
import torch.distributed as dist
import torchvision

from dali_ipmix import IPMixLoader, IPMixValLoader
from dali_ipmix.losses import ipmix_loss


def get_args_parser():
    p = argparse.ArgumentParser(description="IPMix + DALI in a plain PyTorch training loop")
    p.add_argument("--data-path", required=True, help="folder with train/ and val/ class folders")
    p.add_argument("--mixing", required=True, help="folder of mixing pictures (fractals)")
    p.add_argument("--preset", default="imagenet", choices=("imagenet", "cifar"))
    p.add_argument("--model", default="resnet50", help="torchvision classification model")
    p.add_argument("--epochs", type=int, default=90)
    p.add_argument("--max-steps", type=int, default=0, help="stop with a checkpoint after this many "
                   "steps in all (0: run every epoch)")
    p.add_argument("-b", "--batch-size", type=int, default=64, help="source images per process")
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--wd", type=float, default=1e-4)
    p.add_argument("-j", "--workers", type=int, default=4, help="DALI CPU threads per process")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output-dir", default=".", help="where checkpoint.pth is written")
    p.add_argument("--resume", default="", help="checkpoint to continue from")
    return p


def init_distributed():
    """torchrun's environment -> one process group (NCCL on GPUs, gloo on CPUs); the loaders take
    their rank and world size from it."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")


def train_one_epoch(model, optimizer, lr_scheduler, scaler, loader, device, epoch, step, args, save):
    """One epoch, or what is left of it after a resume; returns (steps done so far, whether
    ``--max-steps`` stopped the run in the middle of the epoch: then it is checkpointed)."""
    model.train()
    for images, labels in loader:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            logits = model(images)
        loss, _ = ipmix_loss(logits, labels, loader.views, views_layout=loader.views_layout)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        lr_scheduler.step()
        step += 1
        if step % 50 == 0 and loader.rank == 0:
            print(f"step {step}: loss {loss.item():.4f}", flush=True)
        if args.max_steps and step >= args.max_steps and step < (epoch + 1) * len(loader):
            save(epoch, step)       # stopped mid-epoch (on its last step the epoch ends first)
            return step, True
    return step, False


def evaluate(model, loader, device):
    model.eval()
    correct = torch.zeros(2, dtype=torch.float64, device=device)
    with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16,
                                                enabled=device.type == "cuda"):
        for images, labels in loader:
            correct += torch.tensor([(model(images).argmax(1) == labels).sum().item(), labels.numel()],
                                    dtype=torch.float64, device=device)
    if dist.is_initialized():
        dist.all_reduce(correct)
    return 100.0 * correct[0].item() / max(correct[1].item(), 1)


def main(args):
    init_distributed()
    torch.manual_seed(args.seed)
    # rank, world size and device come from torchrun / the process group; float16 images on a GPU
    train_loader = IPMixLoader(os.path.join(args.data_path, "train"), args.mixing, preset=args.preset,
                               batch_size=args.batch_size, num_threads=args.workers, seed=args.seed)
    val_loader = IPMixValLoader(os.path.join(args.data_path, "val"), preset=args.preset,
                                batch_size=args.batch_size, num_threads=args.workers)
    device = train_loader.device
    model = torchvision.models.get_model(args.model, weights=None,
                                         num_classes=train_loader.num_classes).to(device)
    model_without_ddp = model
    if dist.is_initialized():
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum,
                                weight_decay=args.wd)
    total = args.epochs * len(train_loader)      # a cosine schedule per step
    lr_scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total) / total)))
    scaler = torch.amp.GradScaler(device.type, enabled=False)   # bf16 needs no loss scaling
    start_epoch, step = 0, 0

    def save(epoch, step):
        state = {"model": model_without_ddp.state_dict(), "optimizer": optimizer.state_dict(),
                 "lr_scheduler": lr_scheduler.state_dict(), "scaler": scaler.state_dict(),
                 "loader": train_loader.state_dict(),   # every rank calls it: it gathers their positions
                 "epoch": epoch, "step": step}
        if train_loader.rank == 0:
            os.makedirs(args.output_dir, exist_ok=True)
            torch.save(state, os.path.join(args.output_dir, "checkpoint.pth"))

    if args.resume:
        checkpoint = torch.load(args.resume, map_location="cpu", weights_only=False)
        model_without_ddp.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        lr_scheduler.load_state_dict(checkpoint["lr_scheduler"])
        scaler.load_state_dict(checkpoint["scaler"])
        train_loader.load_state_dict(checkpoint["loader"])   # the rest of that epoch comes next
        start_epoch, step = checkpoint["epoch"], checkpoint["step"]

    for epoch in range(start_epoch, args.epochs):
        step, stopped = train_one_epoch(model, optimizer, lr_scheduler, scaler, train_loader, device,
                                        epoch, step, args, save)
        if stopped:
            break
        top1 = evaluate(model_without_ddp, val_loader, device)
        if train_loader.rank == 0:
            print(f"epoch {epoch + 1}: val top-1 {top1:.2f}%", flush=True)
        save(epoch + 1, step)
        if args.max_steps and step >= args.max_steps:
            break
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main(get_args_parser().parse_args())
