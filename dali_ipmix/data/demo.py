"""The built-in demo data: a small synthetic labelled set and a procedural fractal mixing set.

``ensure_demo_data()`` generates them once into a cache folder (``$DALI_IPMIX_CACHE`` or
``~/.cache/dali_ipmix/demo``) and reuses them while they are complete: generation goes to a
temporary sibling folder that is renamed into place only when everything is written, and a
``COMPLETE.json`` marker records the parameters, so an interrupted or differently parameterised
run never gets reused.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Optional, Tuple

from dali_ipmix.errors import UserError

# Small on purpose: generation plus a short training run fit in a few minutes on 2 CPU cores.
DEMO_PARAMS = {
    "version": 2,
    "classes": 10,
    "train_per_class": 200,
    "val_per_class": 50,
    "fractals": 64,
    "fractal_size": 128,
    "style": "demo",
    "seed": 0,
}
MARKER = "COMPLETE.json"


def default_cache_dir() -> Path:
    env = os.environ.get("DALI_IPMIX_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "dali_ipmix" / "demo"


def _complete(folder: Path, params: dict) -> bool:
    try:
        return json.loads((folder / MARKER).read_text()) == params
    except (OSError, ValueError):
        return False


def ensure_demo_data(cache_dir=None, *, log=print, jobs: Optional[int] = None,
                     **overrides) -> Tuple[Path, Path, Path]:
    """(train_dir, val_dir, mixing_dir) of the demo set, generating it first if needed."""
    from dali_ipmix.data.fractals import generate_fractals
    from dali_ipmix.data.synth import generate_synth

    params = dict(DEMO_PARAMS, **overrides)
    cache = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    folder = cache / ("v{version}-{style}-c{classes}-n{train_per_class}-{val_per_class}-f{fractals}x{fractal_size}"
                      "-s{seed}").format(**params)
    train, val, mixing = folder / "synth" / "train", folder / "synth" / "val", folder / "fractals"
    if _complete(folder, params):
        return train, val, mixing
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=folder.name + ".tmp-", dir=folder.parent))
    except OSError as e:
        raise UserError(f"demo data cache {cache}: cannot create a folder there ({e.strerror or e}); "
                        f"give --demo-cache DIR (or set DALI_IPMIX_CACHE) to a writable folder") from None
    try:
        start = time.perf_counter()
        log(f"demo data: generating {params['classes']} classes x ({params['train_per_class']} train + "
            f"{params['val_per_class']} val) synthetic pictures and {params['fractals']} fractals into {folder} ...")
        generate_synth(tmp / "synth", classes=params["classes"], train_per_class=params["train_per_class"],
                       val_per_class=params["val_per_class"], seed=params["seed"], jobs=jobs,
                       style=params["style"])
        generate_fractals(tmp / "fractals", params["fractals"], size=params["fractal_size"],
                          seed=params["seed"], jobs=jobs)
        (tmp / MARKER).write_text(json.dumps(params))
        if folder.exists():          # an incomplete or stale earlier attempt
            shutil.rmtree(folder)
        os.replace(tmp, folder)
        log(f"demo data: done in {time.perf_counter() - start:.1f} s")
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return train, val, mixing
