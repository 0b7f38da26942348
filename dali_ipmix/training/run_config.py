"""``RunConfig``: train.py's flags as the run uses them -- one frozen record, built once from the
parsed command line and completed by train.py's resolution steps, each of which returns a new
record (``replace``) instead of changing one: defaults filled in (the recipe's, the demo's or
``--preset cifar-adv``'s, which is split into ``preset`` "cifar" and ``recipe`` "cifar-adv"),
``amp`` and ``backend`` resolved for this machine, the data flags turned into the listed data
sources, ``output_dir`` and ``resume`` chosen.  Once complete nothing changes it; train.py and
the ``training`` modules read it (named ``flags`` there), never the argparse Namespace.  What the
run finds besides its flags is ``state.RunState`` (docs/architecture.md "Who owns which fact")."""
from __future__ import annotations

import argparse
import dataclasses
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional, Tuple, Union

from .. import advmixup

if TYPE_CHECKING:
    from ..sources import DataSource

_PLAIN = (int, float, str, bool, type(None))


@dataclass(frozen=True)
class RunConfig:
    """One field per flag of train.py (``dest``) plus ``recipe``; the parser's help says what each
    flag means.  Values are the parsed ones until a resolution step replaces them."""
    # data: a path or s3:// URI as given; after the data check, the listed ``sources.DataSource``
    # (an os.PathLike of that location), which the pipelines are built from
    data_path: Optional[str]
    train_dir: Union[str, "DataSource", None]
    val_dir: Union[str, "DataSource", None]
    mixing_set: Union[str, "DataSource", None]
    train_filelist: Optional[str]
    val_filelist: Optional[str]
    mixing_filelist: Optional[str]
    mixing_cache_mb: Optional[int]
    max_pixels: int
    demo_cache: Optional[str]
    workers: int
    last_batch: str
    crop_scale: float
    val_batch_size: Optional[int]
    # IPMix
    preset: str
    image_size: Optional[int]
    backend: str
    no_jsd: bool
    jsd_weight: float
    k: Optional[int]
    t: Optional[int]
    beta: Optional[float]
    aug_severity: Optional[float]
    all_ops: bool
    # model and optimisation
    arch: str
    list_archs: bool
    epochs: int
    max_steps: int
    batch_size: int
    lr: float
    lr_scale_batch: int
    warmup_epochs: float
    lr_schedule: str
    nesterov: str
    momentum: float
    wd: float
    label_smoothing: float
    amp: str
    channels_last: bool
    compile: bool
    sync_bn: bool
    seed: int
    # run
    device: str
    output_dir: Optional[str]
    overwrite: bool
    resume: Optional[str]
    ckpt_every: int
    keep_ckpts: int
    print_freq: int
    no_tensorboard: bool
    # adversarial mode and robust evaluation (advmixup.add_adv_args; unset training switches stay
    # None with --adv-mixup off)
    adv_mixup: str
    adv_eps: Optional[float]
    adv_step_size: Optional[float]
    adv_steps: Optional[int]
    adv_probe: Optional[str]
    adv_opt_lambda: Optional[str]
    adv_label_rule: Optional[str]
    adv_objective: Optional[str]
    adv_pgd_weight: Optional[float]
    adv_clean_weight: Optional[float]
    adv_bn: Optional[str]
    adv_mix_alpha: Optional[float]
    adv_lambda_step: Optional[float]
    adv_lambda_box: Optional[Tuple[float, float]]
    adv_jsd: bool
    adv_eval_every: int
    adv_val_images: int
    adv_eval: str
    adv_eval_eps: float
    adv_eval_step_size: float
    adv_eval_steps: int
    adv_eval_restarts: int
    adv_eval_images: int
    # not a flag: the recipe a preset flag stands for ("cifar-adv"), None for the preset's own
    recipe: Optional[str] = None

    @classmethod
    def parsed(cls, args: argparse.Namespace) -> "RunConfig":
        """The record of the flags as parsed (a flag without a field here is a TypeError, so the
        parser and the record cannot drift apart); ``args`` is only read."""
        return cls(**vars(args))

    def replace(self, **changes) -> "RunConfig":
        return dataclasses.replace(self, **changes)

    @property
    def uses_pixels(self) -> bool:
        """The pipelines emit [0, 1] pixels and the model starts with the normalisation layer
        (the adversarial modes and robust evaluation; ``advmixup.uses_pixels``)."""
        return advmixup.uses_pixels(adv_mixup=self.adv_mixup, adv_eval=self.adv_eval,
                                     adv_eval_every=self.adv_eval_every)

    def plain_values(self) -> dict:
        """The fields that are plain values, data sources as their location: what checkpoints
        record as the run's flags (``dali-ipmix eval`` and ``--resume`` read them)."""
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, os.PathLike):
                out[f.name] = os.fspath(value)
            elif isinstance(value, _PLAIN):
                out[f.name] = value
            elif isinstance(value, (tuple, list)) and all(isinstance(v, _PLAIN) for v in value):
                out[f.name] = list(value)      # e.g. --adv-lambda-box LO HI
        return out
