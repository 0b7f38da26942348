"""What the built-in demo of ``train.py`` leaves to look at, in its output folder.

* ``demo_batch.png``: one augmented training batch as the pipeline makes it (same graph, seed and
  crop settings as the run's first batch): per sample the clean view, the two IPMix views of the
  JSD triple and the fractal it was mixed with, under the sample's class.
* ``demo_curves.png``: training loss (CE + JSD, mean per epoch), validation loss and validation
  top-1 / top-5 per epoch, read from ``metrics.jsonl``.  Needs matplotlib (the ``bench`` extra,
  installed by ``make demo``); without it the plot is skipped with a note.

A file of that name already in the folder is replaced only when the run may replace the folder's
files (``--overwrite`` or ``--resume``).
"""
from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image, ImageDraw

from .run_config import RunConfig

BATCH_PNG = "demo_batch.png"
CURVES_PNG = "demo_curves.png"
SHEET_SAMPLES = 8
TILE = 96                       # the 32 px views enlarged 3x (nearest neighbour: pixels stay visible)


# ---------------------------------------------------------------------------------------------
# One augmented training batch

def run_batch(train_dir, mixing_dir, cfg, *, n: int, seed: int, backend: str, preset: str = "imagenet",
              random_area: Tuple[float, float] = (0.08, 1.0)):
    """(views [n][V, 3, S, S] normalised, pictures [n] HWC uint8, labels [n]) of one batch of the
    training graph on the CPU, built as ``train.py`` builds it."""
    import pipelines

    crop = {} if preset == "cifar" else {"random_area": random_area}   # CIFAR: RandomCrop(32, padding=4)
    pipe = pipelines.train_pipeline(preset, train_dir, mixing_dir, cfg=cfg, batch_size=n,
                                    num_threads=pipelines.cpu_threads(), device="cpu", backend=backend,
                                    seed=seed, extra_outputs=True, **crop)
    pipe.build()
    views, labels, _crops, pictures, _tapes = (pipelines.samples(o) for o in pipe.run())
    return views, pictures, [int(np.asarray(l).reshape(-1)[0]) for l in labels]


def batch_sheet(views, pictures, labels, class_names: Sequence[str], cfg, title: str,
                tile: int = TILE) -> Image.Image:
    """Samples as columns; rows: clean view, IPMix view(s), the mixing picture (fractal)."""
    from .. import sheet as S

    n_views = views[0].shape[0]
    rows = (["clean view"] if cfg.jsd else []) + [f"IPMix view {i + 1}" for i in range(n_views - int(cfg.jsd))] \
        + ["fractal (mixing picture)"]
    margin, gap, label_w, head_h, name_h = 8, 4, 150, 22, 16
    width = margin + label_w + len(views) * (tile + gap) + margin
    height = head_h + name_h + len(rows) * (tile + gap) + margin
    sheet = Image.new("RGB", (width, height), S.BACKGROUND)
    draw = ImageDraw.Draw(sheet)
    draw.text((margin, 5), title, fill=S.TEXT, font=S.font(12))
    for c, (v, pic, label) in enumerate(zip(views, pictures, labels)):
        x = margin + label_w + c * (tile + gap)
        name = class_names[label].split("_", 1)[-1] if label < len(class_names) else str(label)
        draw.text((x, head_h), name, fill=S.DIM, font=S.font())
        tiles = [S.to_display(v[a], cfg) for a in range(n_views)] + [pic]
        for r, image in enumerate(tiles):
            sheet.paste(S.tile_image(image, tile), (x, head_h + name_h + r * (tile + gap)))
    for r, text in enumerate(rows):
        draw.text((margin, head_h + name_h + r * (tile + gap) + tile // 2 - 6), text, fill=S.TEXT, font=S.font())
    return sheet


# ---------------------------------------------------------------------------------------------
# Loss and accuracy per epoch

def read_epochs(metrics_path) -> Tuple[Dict[int, float], List[dict]]:
    """(mean training loss per epoch, validation records in epoch order) from ``metrics.jsonl``;
    a step written twice (a resumed run) counts once, with its latest value."""
    step_loss, val = {}, {}
    with open(metrics_path) as f:
        for line in f:
            try:
                rec = json.loads(line)
            except ValueError:
                continue             # a line cut short by an interruption
            if rec.get("kind") == "step":
                step_loss[rec["step"]] = (rec["epoch"], rec["loss"])
            elif rec.get("kind") == "epoch":
                val[rec["epoch"]] = rec
    per_epoch = defaultdict(list)
    for epoch, loss in step_loss.values():
        per_epoch[epoch].append(loss)
    train = {e: float(np.mean(v)) for e, v in sorted(per_epoch.items())}
    return train, [val[e] for e in sorted(val)]


def curves_figure(train_loss: Dict[int, float], val: List[dict], *, title: str, chance: float,
                  jsd_weight: Optional[float]):
    """A matplotlib figure: losses per epoch (left), validation accuracy per epoch (right)."""
    import matplotlib
    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4), dpi=100)
    train_label = f"training loss (CE + {jsd_weight:g} x JSD)" if jsd_weight else "training loss (CE)"
    if train_loss:
        ax_loss.plot(list(train_loss), list(train_loss.values()), "o-", label=train_label)
    epochs = [r["epoch"] for r in val]
    ax_loss.plot(epochs, [r["val_loss"] for r in val], "s-", label="validation loss (CE, clean)")
    ax_loss.set_xlabel("epoch")
    ax_loss.set_ylabel("loss")
    ax_loss.set_ylim(bottom=0)
    ax_loss.legend()
    ax_loss.grid(alpha=0.3)
    ax_acc.plot(epochs, [r["val_top1"] for r in val], "o-", label="validation top-1")
    ax_acc.plot(epochs, [r["val_top5"] for r in val], "s--", alpha=0.6, label="validation top-5")
    ax_acc.axhline(chance, color="grey", linestyle=":", label=f"chance ({chance:.0f} %)")
    if val:
        last = val[-1]
        ax_acc.annotate(f"{last['val_top1']:.1f} %", (last["epoch"], last["val_top1"]),
                        textcoords="offset points", xytext=(-10, -16), ha="right")
    else:                  # stopped inside epoch 1: say why the panel holds no points
        ax_acc.text(0.5, 0.5, "no validation yet:\nthe run stopped inside epoch 1",
                    transform=ax_acc.transAxes, ha="center", va="center", color="grey")
    ax_acc.set_xlabel("epoch")
    ax_acc.set_ylabel("accuracy (%)")
    ax_acc.set_ylim(0, 100)
    ax_acc.legend(loc="lower right")
    ax_acc.grid(alpha=0.3)
    for ax in (ax_loss, ax_acc):
        ax.xaxis.get_major_locator().set_params(integer=True)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


# ---------------------------------------------------------------------------------------------
# Both, for train.py

def _free(path: Path, may_replace: bool) -> bool:
    return may_replace or not path.exists()


def write_demo_outputs(output_dir, *, train_dir, mixing_dir, cfg, seed: int, backend: str,
                       preset: str = "imagenet", random_area: Tuple[float, float] = (0.08, 1.0),
                       arch: str = "", jsd_weight: Optional[float] = None, num_classes: int = 10,
                       may_replace: bool = False, log=print) -> Dict[str, Path]:
    """Write the batch sheet and the curves into ``output_dir``; returns {kind: path} of those
    written and logs one line for each one skipped (and why)."""
    out = Path(output_dir)
    written = {}
    batch_png = out / BATCH_PNG
    if backend == "none":
        log("note: --backend none makes no IPMix views, so no batch sheet is drawn")
    elif _free(batch_png, may_replace):
        names = sorted(p.name for p in Path(train_dir).iterdir() if p.is_dir())
        views, pictures, labels = run_batch(train_dir, mixing_dir, cfg, n=SHEET_SAMPLES, seed=seed,
                                            backend=backend, preset=preset,
                                            random_area=random_area)
        title = (f"One augmented training batch (seed {seed}, {cfg.image_size} px, k={cfg.k} t={cfg.t}, "
                 f"backend {backend}); tiles enlarged {TILE / cfg.image_size:g}x")
        batch_sheet(views, pictures, labels, names, cfg, title).save(batch_png, "PNG")
        written["batch"] = batch_png
    else:
        log(f"note: {batch_png} exists and was not replaced (--overwrite replaces it)")
    curves_png = out / CURVES_PNG
    if not _free(curves_png, may_replace):
        log(f"note: {curves_png} exists and was not replaced (--overwrite replaces it)")
        return written
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        log("note: matplotlib is not installed, so the loss/accuracy plot is skipped "
            "(pip install matplotlib, or `make demo`, which installs it)")
        return written
    train_loss, val = read_epochs(out / "metrics.jsonl")
    fig = curves_figure(train_loss, val, chance=100.0 / num_classes, jsd_weight=jsd_weight,
                        title=f"built-in demo: {arch}, {num_classes} classes, IPMix"
                              f"{' + JSD' if jsd_weight else ''}")
    fig.savefig(curves_png)
    import matplotlib.pyplot as plt
    plt.close(fig)
    written["curves"] = curves_png
    return written


def write_for_run(flags: RunConfig, cfg, num_classes: int, log=print) -> Dict[str, Path]:
    """``write_demo_outputs`` with the settings of a finished ``train.py`` run (its resolved flags);
    a failure to draw is reported as a note: the run's results are already saved."""
    try:
        return write_demo_outputs(
            flags.output_dir, train_dir=flags.train_dir, mixing_dir=flags.mixing_set, cfg=cfg, seed=flags.seed,
            backend=flags.backend, preset=flags.preset, random_area=(flags.crop_scale, 1.0),
            arch=flags.arch, num_classes=num_classes,
            jsd_weight=flags.jsd_weight if cfg.jsd else None,
            may_replace=bool(flags.overwrite or flags.resume), log=log)
    except Exception as e:  # noqa: BLE001 - pictures are extras; never lose the run over them
        log(f"note: the demo pictures could not be drawn ({type(e).__name__}: {e})")
        return {}


def summary_lines(flags: RunConfig, written: Dict[str, Path]) -> List[str]:
    """The demo's closing lines: its pictures, then what to run next."""
    lines = []
    if "batch" in written:
        lines.append(f"  batch sheet: {written['batch']}  (clean view | IPMix views | fractal, per sample)")
    if "curves" in written:
        lines.append(f"  curves: {written['curves']}  (loss and validation accuracy per epoch)")
    lines += [
        "  next, on real data (the official ImageNet recipe; `dali-ipmix fractals --out /data/fractals "
        "--count 13000` makes a mixing set):",
        "    python train.py --data-path /data/imagenet --mixing-set /data/fractals --output-dir runs/rn50",
        "  the pipeline graph (docs/debugging.md):",
        f"    dali-ipmix graph --data {flags.train_dir} --mixing {flags.mixing_set} --image-size "
        f"{flags.image_size} --out graph",
        "  the loader benchmark (docs/benchmarking.md, figures in BENCHMARKS.md):",
        "    dali-ipmix bench --device cpu --image-size 96 -b 16 --threads 1,2 --arch resnet18 --out bench",
    ]
    return lines
