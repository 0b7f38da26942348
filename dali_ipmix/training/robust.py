"""The adversarial modes' robust numbers in train.py: the per-epoch PGD check (``--adv-eval-every``)
that keeps the most robust epoch as ``best_robust.pth``, and the final evaluation (``--adv-eval``);
each rank attacks its share of the validation images, and the counts are summed over ranks
(docs/adversarial.md "Robust evaluation", "The recipe: --preset cifar-adv")."""
from __future__ import annotations

import os
import sys
import time

from .. import advmixup
from .checkpoint import BEST_ROBUST, atomic_torch_save
from .distributed import all_reduce_sum
from .metrics import best_robust
from .run_config import RunConfig
from .state import Model


def robust_check(flags: RunConfig, state, model: Model, loader, epoch: int) -> dict:
    """The per-epoch PGD check (--adv-eval-every) after ``epoch`` (counted from 1); writes
    best_robust.pth when it improves.  Returns the fields for the epoch record."""
    t0 = time.perf_counter()
    res = robust_evaluate(flags, state, model, loader, steps=advmixup.SELECT_STEPS,
                          images=flags.adv_val_images,
                          what=f"epoch {epoch}/{flags.epochs}: PGD-{advmixup.SELECT_STEPS} check")
    best = best_robust(state.history)
    out = {"robust_clean": res["clean"], "robust_pgd": res["pgd"], "robust_images": res["images"],
           "robust_seconds": time.perf_counter() - t0}
    if best is not None and res["pgd"] <= best["robust_pgd"]:
        out["best_robust_pgd"] = best["robust_pgd"]
        return out
    out["best_robust_pgd"] = res["pgd"]
    if state.is_main:
        path = os.path.join(flags.output_dir, BEST_ROBUST)
        try:   # what `dali-ipmix eval` loads: weights, arch, args, input kind
            atomic_torch_save({"model": model.net.state_dict(), "arch": flags.arch, "epoch": epoch,
                               "step": state.step, "robust": out, "args": state.recorded_args(flags),
                               "input": model.input}, path)
        except OSError as e:
            print(f"train.py: warning: writing {path} failed ({e.strerror or e})", file=sys.stderr,
                  flush=True)
        else:
            state.log(f"  most robust so far -> {path}")
    return out


def robust_evaluate(flags: RunConfig, state, model: Model, loader, *, steps, restarts=1,
                    autoattack=False, images=0, what="robust eval") -> dict:
    """Clean / PGD (/ AutoAttack) accuracy on ``images`` validation images (0 = all) spread evenly
    over the list, in float32: input gradients under bf16/fp16 autocast can underflow and weaken
    the attack.  Each rank takes its share of its shard; counts are summed over ranks."""
    r, w, n = state.rank, state.world_size, state.num_val
    shard = n * (r + 1) // w - n * r // w           # the validation reader's shard of this rank
    keep = images * (r + 1) // w - images * r // w if images else 0
    res = advmixup.robust_eval(
        model.module, advmixup.spread_batches(loader, shard, keep), flags.adv_eval_eps,
        flags.adv_eval_step_size, steps, restarts=restarts, autoattack=autoattack,
        seed=flags.seed + state.rank)
    keys = [k for k in res if k.startswith("n_")] + ["images"]
    sums = dict(zip(keys, all_reduce_sum([res[k] for k in keys], state.torch_device)))
    total = max(sums["images"], 1)
    for k in keys[:-1]:
        res[k[2:]] = 100.0 * sums[k] / total
    res["images"] = int(sums["images"])
    res["clean_minus_pgd"] = res["clean"] - res["pgd"]
    if res.get("autoattack") is not None:
        res["pgd_minus_aa"] = res["pgd"] - res["autoattack"]
    state.log(f"{what} ({res['images']} images, eps {res['eps'] * 255:.3g}/255, float32): clean "
            f"{res['clean']:.2f}%  PGD-{steps} {res['pgd']:.2f}%" + (f"  AutoAttack {res['autoattack']:.2f}%"
                                                                   if res.get("autoattack") is not None else ""))
    return res
