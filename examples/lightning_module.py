#!/usr/bin/env python
"""IPMix batches from DALI in PyTorch Lightning: a ``LightningDataModule`` whose train dataloader is
an ``IPMixLoader`` and a small ``LightningModule`` with the JSD consistency loss.

The loader has ``state_dict()`` / ``load_state_dict()``, so Lightning stores its position in every
checkpoint and a run resumed with ``ckpt_path=`` continues with the exact next batch, also in the
middle of an epoch.  Under ``strategy="ddp"`` each process reads its own shard (the loader takes
its rank from the process group Lightning starts); Lightning moves nothing: the batches are already
on the process's GPU.

    python examples/lightning_module.py --data-path /data/imagenet --mixing /data/fractals \\
        --devices 8 --ckpt-every 1000 --output-dir runs/lit
    python examples/lightning_module.py ... --resume runs/lit/last.ckpt
"""
import argparse
import os

import lightning as L
import torch
import torchvision

from dali_ipmix import IPMixLoader, IPMixValLoader
from dali_ipmix.losses import ipmix_loss


class IPMixDataModule(L.LightningDataModule):
    """``data_path/train`` and ``data_path/val`` class folders, ``mixing`` pictures."""

    def __init__(self, data_path, mixing, *, preset="imagenet", batch_size=64, workers=4, seed=0,
                 views_layout="sample_major"):
        super().__init__()
        self.save_hyperparameters()

    def train_dataloader(self):
        hp = self.hparams
        return IPMixLoader(os.path.join(hp.data_path, "train"), hp.mixing, preset=hp.preset,
                           batch_size=hp.batch_size, num_threads=hp.workers, seed=hp.seed,
                           views_layout=hp.views_layout, dtype="float32")

    def val_dataloader(self):
        hp = self.hparams
        return IPMixValLoader(os.path.join(hp.data_path, "val"), preset=hp.preset,
                              batch_size=hp.batch_size, num_threads=hp.workers, dtype="float32")


class IPMixClassifier(L.LightningModule):
    """A torchvision model trained with cross-entropy + 12 x JSD over (clean, IPMix, IPMix) views;
    SGD with a cosine schedule over the epochs."""

    def __init__(self, num_classes, *, model="resnet50", lr=0.1, momentum=0.9, weight_decay=1e-4,
                 views=3, views_layout="sample_major"):
        super().__init__()
        self.save_hyperparameters()
        self.model = torchvision.models.get_model(model, weights=None, num_classes=num_classes)

    def training_step(self, batch, batch_idx):
        images, labels = batch
        loss, _ = ipmix_loss(self.model(images), labels, self.hparams.views,
                                 views_layout=self.hparams.views_layout)
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch, batch_idx):
        images, labels = batch
        correct = (self.model(images).argmax(1) == labels).float().sum()
        self.log("val_top1", 100 * correct / max(labels.numel(), 1), batch_size=labels.numel(),
                 sync_dist=True)

    def configure_optimizers(self):
        hp = self.hparams
        optimizer = torch.optim.SGD(self.parameters(), lr=hp.lr, momentum=hp.momentum,
                                    weight_decay=hp.weight_decay)
        # a cosine per epoch (torchvision's cosineannealinglr): ``trainer.estimated_stepping_batches``
        # would set up the train dataloader before Lightning restores a checkpoint, and Lightning
        # then never hands the loader its saved state
        cosine = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=self.trainer.max_epochs)
        return {"optimizer": optimizer, "lr_scheduler": cosine}


def get_args_parser():
    p = argparse.ArgumentParser(description="IPMix + DALI with PyTorch Lightning")
    p.add_argument("--data-path", required=True, help="folder with train/ and val/ class folders")
    p.add_argument("--mixing", required=True, help="folder of mixing pictures (fractals)")
    p.add_argument("--preset", default="imagenet", choices=("imagenet", "cifar"))
    p.add_argument("--model", default="resnet50", help="torchvision classification model")
    p.add_argument("--epochs", type=int, default=90)
    p.add_argument("--max-steps", type=int, default=-1, help="stop after this many steps (-1: epochs)")
    p.add_argument("-b", "--batch-size", type=int, default=64, help="source images per process")
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("-j", "--workers", type=int, default=4, help="DALI CPU threads per process")
    p.add_argument("--devices", default="auto", help="GPUs (processes) on this node")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ckpt-every", type=int, default=1000, help="checkpoint every N steps")
    p.add_argument("--output-dir", default="lightning_runs")
    p.add_argument("--resume", default=None, help="checkpoint to continue from")
    return p


def main(args):
    L.seed_everything(args.seed)
    data = IPMixDataModule(args.data_path, args.mixing, preset=args.preset,
                           batch_size=args.batch_size, workers=args.workers, seed=args.seed)
    num_classes = len(next(os.walk(os.path.join(args.data_path, "train")))[1])
    model = IPMixClassifier(num_classes, model=args.model, lr=args.lr)
    every = L.pytorch.callbacks.ModelCheckpoint(dirpath=args.output_dir, every_n_train_steps=args.ckpt_every,
                                                save_top_k=-1, save_last=True)
    trainer = L.Trainer(max_epochs=args.epochs, max_steps=args.max_steps, devices=args.devices,
                        precision="bf16-mixed" if torch.cuda.is_available() else "32-true",
                        callbacks=[every], logger=False, enable_progress_bar=False,
                        default_root_dir=args.output_dir)
    trainer.fit(model, datamodule=data, ckpt_path=args.resume)
    return trainer


if __name__ == "__main__":
    main(get_args_parser().parse_args())
