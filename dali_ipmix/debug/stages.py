"""``dali-ipmix stages``: one batch of the readable DALI graph, step by step.

The training pipeline is built with the readable backend (``backend="dali"``) while
``dali_ipmix.ops.chain_step`` is wrapped so that every step's output DataNode is recorded; those
nodes are appended to the pipeline's outputs, so the batch that runs is the training graph itself
(same operators, same seeds), with its intermediate images exposed.  Every stage is saved as a
PNG, and each step is re-run by the NumPy/PIL reference on the *pipeline's own* input to that
step, so a difference points at the one op that made it (not at the steps before it).
"""
from __future__ import annotations

import contextlib
import json
import re
from pathlib import Path
from typing import List

import numpy as np
from PIL import Image

import pipelines
from .. import config as C
from .. import ops
from .. import reference as R
from .. import sheet
from ..errors import UserError
from ..tape import SF, TapeLayout
from . import _common
from .preview import readable_draws, step_text

# A step is flagged when the pipeline and the reference differ by more than this (uint8 levels);
# DALI's equalize uses OpenCV's formula and is expected to be flagged (see README).
FLAG_LEVELS = 1
OWNED = re.compile(r"^(sample\d+|index\.json|stats\.txt)$")


@contextlib.contextmanager
def expose_chain_steps(recorded: List):
    """While active, every ``ops.chain_step`` call appends its output DataNode to ``recorded``
    (in call order: view, chain, step)."""
    original = ops.chain_step

    def chain_step(cur, x, f, step, cfg):
        out = original(cur, x, f, step, cfg)
        recorded.append(out)
        return out

    ops.chain_step = chain_step
    try:
        yield
    finally:
        ops.chain_step = original


def stages_pipeline(data_dir, mixing_dir, cfg: C.IPMixConfig, preset: str, *, n: int, seed: int,
                    device: str, pipeline_options=None):
    """The training pipeline (readable backend, extra outputs) with every chain step's output
    appended to its outputs: (views, labels, crops, pictures, tapes, step[0], step[1], ...)."""
    recorded: List = []
    with expose_chain_steps(recorded), _common.pipeline_options(**(pipeline_options or {})):
        pipe = _common.train_pipeline(data_dir, mixing_dir, cfg, preset, batch_size=n, device=device,
                                      backend="dali", seed=seed, extra_outputs=True)
    expected = cfg.n_aug * cfg.k * cfg.t
    if len(recorded) != expected:
        raise RuntimeError(f"recorded {len(recorded)} chain steps, expected {expected}: "
                           f"ops.chains no longer calls ops.chain_step once per step")
    # DALI 2.4 keeps the outputs given to set_outputs in _graph_out until build().
    pipe.set_outputs(*pipe._graph_out, *recorded)
    return pipe


def _diff(got: np.ndarray, want: np.ndarray) -> dict:
    d = np.abs(got.astype(np.int16) - want.astype(np.int16))
    return {"mean_abs": float(d.mean()), "max_abs": int(d.max()), "differing": float((d > 0).mean())}


def _save(image: np.ndarray, path: Path, root: Path) -> str:
    Image.fromarray(np.ascontiguousarray(image, dtype=np.uint8)).save(path)
    return str(path.relative_to(root))


def run_stages(data_dir, mixing_dir, out: Path, cfg: C.IPMixConfig, preset: str, *, n: int = 2,
               seed: int = 0, device: str = "cpu", stats: bool = False, iters: int = 3) -> dict:
    """Run one batch, write every stage's PNG and ``index.json`` into ``out``; returns the index."""
    pipe = stages_pipeline(data_dir, mixing_dir, cfg, preset, n=n, seed=seed, device=device,
                           pipeline_options=_common.STATS_OPTIONS if stats else None)
    pipe.build()
    outputs = [pipelines.samples(o) for o in pipe.run()]
    views, labels, crops, pics, tapes = outputs[:5]
    steps_out = outputs[5:]
    A = cfg.n_aug
    _, _, step_fields = TapeLayout(cfg.k, cfg.t).unpack(np.stack([np.asarray(t, np.float32) for t in tapes]))
    index = {"preset": preset, "backend": "dali", "device": device, "seed": seed, "batch": n,
             "data": str(data_dir), "mixing": str(mixing_dir), "config": _common.config_dict(cfg),
             "flag_levels": FLAG_LEVELS, "samples": []}
    for b in range(n):
        folder = out / f"sample{b}"
        folder.mkdir(parents=True, exist_ok=True)
        x, f = crops[b], pics[b]
        entry = {"index": b, "label": int(np.asarray(labels[b]).reshape(-1)[0]),
                 "crop": _save(x, folder / "crop.png", out), "picture": _save(f, folder / "picture.png", out),
                 "views": []}
        if cfg.jsd:
            entry["clean"] = _save(sheet.to_display(views[b][0], cfg), folder / "clean.png", out)
        for a in range(A):
            tape = np.asarray(tapes[b][a], np.float32)
            draws = readable_draws(tape, cfg)
            vdir = folder / f"view{a + 1}"
            vdir.mkdir(exist_ok=True)
            view = {"view": a + 1, "tape": [float(v) for v in tape], "draws": draws, "chains": []}
            for i in range(cfg.k):
                chain = dict(draws["chains"][i], chain=i + 1, steps=[])
                prev_file, cur = entry["crop"], x
                for j in range(cfg.t):
                    got = steps_out[(a * cfg.k + i) * cfg.t + j][b]
                    record = step_fields[b, a, i, j]
                    want = R.chain_step(cur, x, f, record, cfg)
                    active = j < draws["chains"][i]["depth"]
                    what = step_text(draws["chains"][i]["steps"][j]) if active else "identity (past depth)"
                    name = re.sub(r"[^a-z_]+", "", what.split("(")[0].split()[0]) if active else "identity"
                    step = {"step": j + 1, "what": what, "input": prev_file,
                            "file": _save(got, vdir / f"chain{i + 1}_step{j + 1}_{name}.png", out),
                            "reference": _diff(got, want),
                            "changed": float((got != cur).mean())}
                    if active and record[SF["active_p"]] and record[SF["self_mix"]]:
                        partner = R.image_op(x, cfg.ops[int(record[SF["self_op"]])], record[SF["self_mag"]])
                        step["partner_reference"] = _save(partner, vdir / f"chain{i + 1}_step{j + 1}_partner.png", out)
                    step["flagged"] = step["reference"]["max_abs"] > FLAG_LEVELS
                    chain["steps"].append(step)
                    prev_file, cur = step["file"], got
                chain["result"] = prev_file
                view["chains"].append(chain)
            final = views[b][a + (1 if cfg.jsd else 0)]
            ref = R.ipmix_view(x, f, tape, cfg)
            view["final"] = _save(sheet.to_display(final, cfg), vdir / "final.png", out)
            d = np.abs(final.astype(np.float32) - ref)
            view["final_reference"] = {"mean_abs": float(d.mean()), "max_abs": float(d.max())}
            entry["views"].append(view)
        index["samples"].append(entry)
    if stats:
        from ._stats import run_with_stats
        report = run_with_stats(pipe, iters=iters, batch_size=n, device=device)
        (out / "stats.txt").write_text(report + "\n")
        index["stats"] = "stats.txt"
    (out / "index.json").write_text(json.dumps(index, indent=1) + "\n")
    return index


def step_table(index: dict) -> str:
    """One line per active step: where it is, what it did, and how it compares to the reference."""
    lines = [f"{'sample':>6} {'view':>4} {'chain':>5} {'step':>4}  {'changed':>7}  {'ref |diff| mean':>15} {'max':>4}  what"]
    for s in index["samples"]:
        for v in s["views"]:
            for c in v["chains"]:
                for st in c["steps"]:
                    if st["what"].startswith("identity"):
                        continue
                    r = st["reference"]
                    flag = "  <-- differs from the reference" if st["flagged"] else ""
                    lines.append(f"{s['index']:>6} {v['view']:>4} {c['chain']:>5} {st['step']:>4}  "
                                 f"{st['changed']:7.1%}  {r['mean_abs']:15.3f} {r['max_abs']:4d}  {st['what']}{flag}")
    return "\n".join(lines)


def _run(args) -> int:
    from ..data._io import prepare_out_dir
    cfg = _common.config_from_args(args)
    if args.n < 1 or args.iters < 1:
        raise UserError("--n and --iters must be >= 1")
    _common.check_device(args.device)
    out = Path(args.out)
    owned = [p.name for p in out.iterdir() if OWNED.match(p.name)] if out.is_dir() else []
    out = prepare_out_dir(out, args.overwrite, owned=owned)
    with _common.data_folders(args.data, args.mixing, args.seed) as (data, mixing, generated), \
            _common.bad_files_named(data, mixing, "stages"):
        if generated:
            print("stages: no --data/--mixing: using a tiny generated set")
        index = run_stages(data, mixing, out, cfg, args.preset, n=args.n, seed=args.seed,
                           device=args.device, stats=args.stats, iters=args.iters)
    print(step_table(index))
    finals = [v["final_reference"] for s in index["samples"] for v in s["views"]]
    flagged = sum(st["flagged"] for s in index["samples"] for v in s["views"] for c in v["chains"] for st in c["steps"])
    print(f"final views vs the reference replay: mean |diff| {np.mean([d['mean_abs'] for d in finals]):.4f}, "
          f"max {max(d['max_abs'] for d in finals):.3f} (normalised units); "
          f"{flagged} step(s) differ by more than {FLAG_LEVELS} level(s)")
    if args.stats:
        print((out / "stats.txt").read_text().rstrip())
    print(f"wrote {out}/index.json and the stage images under {out}/sample*/")
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "stages", help="run one batch of the readable graph and save every chain step as an image",
        description="Run one batch of the training pipeline with the readable DALI backend, exposing every "
                    "chain step's output as an extra pipeline output.  Writes OUT/sample<i>/... PNGs (crop, "
                    "picture, each step, final view) and OUT/index.json; each step is compared with the "
                    "NumPy/PIL reference run on the pipeline's own input to that step.")
    _common.add_data_args(p)
    _common.add_config_args(p)
    p.add_argument("--n", type=int, default=2, help="samples in the batch (default %(default)s)")
    p.add_argument("--out", default="stages", metavar="DIR", help="output folder (default %(default)s)")
    p.add_argument("--stats", action="store_true",
                   help="also run a few batches with DALI's executor statistics (per-operator memory)")
    p.add_argument("--iters", type=int, default=3, help="batches run for --stats (default %(default)s)")
    p.add_argument("--overwrite", action="store_true",
                   help="reuse a non-empty --out, replacing only its sample*/ folders, index.json and stats.txt")
    p.set_defaults(func=_run)
