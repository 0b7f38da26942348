"""``dali-ipmix preview``: a contact sheet of one training batch and the random draws behind it.

Each row is one sample; with JSD it holds one strip per IPMix view.  A strip shows the crop, each
chain's result, the mixing picture and the final image the pipeline produced, and beside them the
draws that made it: per chain its Dirichlet weight, kind (IMG or P) and depth, per step the op
and its magnitude or the mixing op with a/b (or p and the mask seed), its patch box (outlined in
the step's colour on the chain tile) and its partner, and the skip weight m.

The pipeline runs with ``extra_outputs=True`` (crops, mixing pictures, tapes); the chain results
come from the NumPy/PIL reference replaying the pipeline's tapes (the pipeline does not expose
them), and the reference's replay of the whole view is compared with the pipeline's output.  The
draws are also written as JSON, readable and as the raw tape; ``tape_from_draws`` rebuilds a tape
from the readable draws alone.
"""
from __future__ import annotations

import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional, Tuple

import numpy as np
from PIL import Image, ImageDraw

import pipelines
from .. import config as C
from .. import reference as R
from ..errors import UserError
from ..outputs import write_atomic
from ..progress import Progress
from ..tape import CF, SF, TapeLayout
from . import _common
from .. import sheet as S

BACKENDS = ("fused", "dali")
KINDS = {C.KIND_IMG: "IMG", C.KIND_P: "P"}
ARITH_MIXINGS = ("add", "multiply")        # use a, b; the other mixings use p and the mask seed


# ---------------------------------------------------------------------------------------------
# Tapes <-> readable draws.

def _f(v) -> float:
    # float32 -> Python float is exact, and so is the JSON round trip back to float32
    return float(np.float32(v))


def readable_draws(tape: np.ndarray, cfg: C.IPMixConfig) -> dict:
    """The draws of one tape that matter, by name: skip weight, and per chain its weight, kind,
    depth and active steps (inactive steps and the fields a step does not use are left out)."""
    skip, chains, steps = TapeLayout(cfg.k, cfg.t).unpack(np.asarray(tape, np.float32))
    out = {"skip_weight": _f(skip), "chains": []}
    for i in range(cfg.k):
        chain = {"weight": _f(chains[i, CF["weight"]]), "kind": KINDS[int(chains[i, CF["kind"]])],
                 "depth": int(chains[i, CF["depth"]]), "steps": []}
        for j in range(cfg.t):
            st = steps[i, j]
            if st[SF["active_img"]]:
                chain["steps"].append({"op": cfg.ops[int(st[SF["op"]])], "magnitude": _f(st[SF["mag"]])})
            elif st[SF["active_p"]]:
                mixing = C.MIXING_OPS[int(st[SF["mix"]])]
                d = {"mixing": mixing,
                     "box": {n: int(st[SF[n]]) for n in ("top", "left", "height", "width")}}
                if mixing in ARITH_MIXINGS:
                    d.update(a=_f(st[SF["a"]]), b=_f(st[SF["b"]]))
                else:
                    d.update(p=_f(st[SF["p"]]), seed=int(st[SF["seed"]]))
                if st[SF["self_mix"]]:
                    d.update(partner="self", partner_op=cfg.ops[int(st[SF["self_op"]])],
                             partner_magnitude=_f(st[SF["self_mag"]]))
                else:
                    d["partner"] = "picture"
                chain["steps"].append(d)
        out["chains"].append(chain)
    return out


def tape_from_draws(draws: dict, cfg: C.IPMixConfig) -> np.ndarray:
    """A tape [L] rebuilt from ``readable_draws`` output: every field any backend reads is set,
    the unused ones are 0, so it replays to the same view as the original tape."""
    layout = TapeLayout(cfg.k, cfg.t)
    tape = np.zeros(layout.size, np.float32)
    skip, chains, steps = layout.unpack(tape[None])       # views into ``tape``
    skip[0] = draws["skip_weight"]
    if len(draws["chains"]) != cfg.k:
        raise ValueError(f"draws hold {len(draws['chains'])} chains, the config has k={cfg.k}")
    kinds = {v: k for k, v in KINDS.items()}
    for i, chain in enumerate(draws["chains"]):
        chains[0, i] = (chain["weight"], kinds[chain["kind"]], chain["depth"])
        for j, d in enumerate(chain["steps"]):
            st = steps[0, i, j]
            if "op" in d:
                st[SF["active_img"]], st[SF["op"]], st[SF["mag"]] = 1, cfg.ops.index(d["op"]), d["magnitude"]
                continue
            st[SF["active_p"]] = 1
            st[SF["mix"]] = C.MIXING_OPS.index(d["mixing"])
            for n in ("top", "left", "height", "width"):
                st[SF[n]] = d["box"][n]
            for n in ("a", "b", "p", "seed"):
                st[SF[n]] = d.get(n, 0)
            if d["partner"] == "self":
                st[SF["self_mix"]], st[SF["self_op"]] = 1, cfg.ops.index(d["partner_op"])
                st[SF["self_mag"]] = d["partner_magnitude"]
    return tape


def _fmt(v: float) -> str:
    return f"{v + 0.0:.3g}"          # + 0.0: no "-0"


def _op_text(op: str, magnitude: float) -> str:
    return op if op in C.PARAMLESS_OPS else f"{op}({_fmt(magnitude)})"


def step_text(d: dict) -> str:
    """One step of ``readable_draws`` as text: ``rotate(-4)`` or
    ``add  a=0.839  b=0.157  box 16x16@(12,40)  with picture`` (box: height x width @ (top, left))."""
    if "op" in d:
        return _op_text(d["op"], d["magnitude"])
    b = d["box"]
    args = (f"a={d['a']:.3f}  b={d['b']:.3f}" if d["mixing"] in ARITH_MIXINGS
            else f"p={d['p']:.3f}  seed={d['seed']}")
    partner = ("self " + _op_text(d["partner_op"], d["partner_magnitude"])
               if d["partner"] == "self" else "picture")
    return f"{d['mixing']}  {args}  box {b['height']}x{b['width']}@({b['top']},{b['left']})  with {partner}"


def draw_lines(draws: dict) -> List[Tuple[str, tuple]]:
    """The draws as coloured text lines: one per chain, one per active step."""
    lines = []
    for i, chain in enumerate(draws["chains"]):
        lines.append((f"chain {i + 1}:  w={chain['weight']:.3f}  {chain['kind']}  depth {chain['depth']}", S.TEXT))
        for j, d in enumerate(chain["steps"]):
            lines.append((f"   {j + 1}. {step_text(d)}", S.STEP_COLORS[j % len(S.STEP_COLORS)]))
    return lines


# ---------------------------------------------------------------------------------------------
# One batch.

@dataclass
class Preview:
    cfg: C.IPMixConfig
    crops: List[np.ndarray]            # HWC uint8, as the pipeline cropped them
    pictures: List[np.ndarray]         # HWC uint8 mixing pictures
    tapes: List[np.ndarray]            # [A, L] per sample
    views: List[np.ndarray]            # [V, 3, S, S] per sample, the pipeline's output
    labels: List[int]
    record: dict = field(default_factory=dict)   # what goes to the JSON


def aug_views(cfg: C.IPMixConfig) -> int:
    return cfg.n_aug


def run_batch(data_dir, mixing_dir, cfg: C.IPMixConfig, preset: str, *, n: int, seed: int,
              backend: str, device: str) -> Preview:
    pipe = _common.train_pipeline(data_dir, mixing_dir, cfg, preset, batch_size=n, device=device,
                                  backend=backend, seed=seed, extra_outputs=True)
    pipe.build()
    views, labels, crops, pics, tapes = (pipelines.samples(o) for o in pipe.run())
    return Preview(cfg=cfg, crops=crops, pictures=pics, tapes=tapes, views=views,
                   labels=[int(np.asarray(l).reshape(-1)[0]) for l in labels])


def replay_diff(preview: Preview, b: int, a: int, tape: Optional[np.ndarray] = None) -> dict:
    """The reference's replay of view ``a`` of sample ``b`` against the pipeline's output."""
    cfg = preview.cfg
    tape = preview.tapes[b][a] if tape is None else tape
    ref = R.ipmix_view(preview.crops[b], preview.pictures[b], tape, cfg)
    got = preview.views[b][a + (1 if cfg.jsd else 0)]
    d = np.abs(got.astype(np.float32) - ref)
    return {"mean_abs": float(d.mean()), "max_abs": float(d.max())}


# ---------------------------------------------------------------------------------------------
# The sheet.

MARGIN, GAP, LABEL_H, HEADER_H, SEPARATOR_H = 8, 6, 15, 24, 4


@dataclass
class Layout:
    tile: int
    columns: List[str]                 # crop, chain 1..k, picture, final
    text_x: int
    strip_h: int
    size: Tuple[int, int]

    def strip_y(self, b: int, a: int, views: int) -> int:
        return HEADER_H + b * (views * self.strip_h + SEPARATOR_H) + a * self.strip_h

    def box(self, b: int, a: int, column: str, views: int) -> List[int]:
        """[x0, y0, x1, y1) of a tile."""
        x = MARGIN + self.columns.index(column) * (self.tile + GAP)
        y = self.strip_y(b, a, views) + LABEL_H
        return [x, y, x + self.tile, y + self.tile]


def make_layout(cfg: C.IPMixConfig, n: int, tile: int, text_lines: List[List[Tuple[str, tuple]]]) -> Layout:
    columns = ["crop"] + [f"chain {i + 1}" for i in range(cfg.k)] + ["picture", "final"]
    text_x = MARGIN + len(columns) * (tile + GAP) + GAP
    widest = max((S.text_width(t) for lines in text_lines for t, _ in lines), default=100)
    # the most lines a strip can need (every chain at full depth), so all strips are equal
    most_lines = 1 + cfg.k + cfg.k * cfg.t
    strip_h = max(LABEL_H + tile, most_lines * S.LINE_HEIGHT) + GAP
    views = aug_views(cfg)
    height = HEADER_H + n * (views * strip_h + SEPARATOR_H)
    return Layout(tile=tile, columns=columns, text_x=text_x, strip_h=strip_h,
                  size=(text_x + widest + MARGIN, height))


def build_sheet(preview: Preview, title: str, tile: int) -> Tuple[Image.Image, dict]:
    """The contact sheet and the JSON record (draws, raw tapes, replay differences, tile boxes)."""
    cfg = preview.cfg
    n, views = len(preview.crops), aug_views(cfg)
    scale = tile / cfg.image_size
    samples, text_lines = [], []
    # the reference replays (twice per view) are the slow part at 224 px
    bar = Progress("preview: reference replay of view", 2 * n * views)
    for b in range(n):
        entry = {"index": b, "label": preview.labels[b], "views": []}
        for a in range(views):
            tape = np.asarray(preview.tapes[b][a], np.float32)
            draws = readable_draws(tape, cfg)
            diff = replay_diff(preview, b, a)
            head = (f"sample {b}  label {preview.labels[b]}  view {a + 1}/{views}:  skip m={draws['skip_weight']:.3f}"
                    f"    reference replay |diff|  mean {diff['mean_abs']:.4f}  max {diff['max_abs']:.3f}")
            lines = [(head, S.TEXT)] + draw_lines(draws)
            text_lines.append(lines)
            entry["views"].append({"view": a + 1, "draws": draws, "tape": [_f(v) for v in tape],
                                   "replay": diff, "_lines": lines})
            bar.update()
        samples.append(entry)

    layout = make_layout(cfg, n, tile, text_lines)
    sheet = Image.new("RGB", layout.size, S.BACKGROUND)
    draw = ImageDraw.Draw(sheet)
    draw.text((MARGIN, 5), title, fill=S.TEXT, font=S.font(12))
    for b, entry in enumerate(samples):
        if b:
            y = layout.strip_y(b, 0, views) - SEPARATOR_H
            draw.rectangle([0, y, layout.size[0], y + SEPARATOR_H // 2], fill=S.SEPARATOR)
        for a, view in enumerate(entry["views"]):
            tape = np.asarray(preview.tapes[b][a], np.float32)
            results = R.chains(preview.crops[b], preview.pictures[b], tape, cfg)
            final = S.to_display(preview.views[b][a + (1 if cfg.jsd else 0)], cfg)
            images = [preview.crops[b]] + results + [preview.pictures[b], final]
            labels = (["crop"] + [f"chain {i + 1}  w={c['weight']:.2f}" for i, c in enumerate(view["draws"]["chains"])]
                      + ["picture", f"final (m={view['draws']['skip_weight']:.2f})"])
            boxes = {}
            for column, image, label in zip(layout.columns, images, labels):
                x0, y0, x1, y1 = layout.box(b, a, column, views)
                draw.text((x0, y0 - LABEL_H + 1), label, fill=S.DIM, font=S.font())
                sheet.paste(S.tile_image(image, tile), (x0, y0))
                boxes[column] = [x0, y0, x1, y1]
            for i, chain in enumerate(view["draws"]["chains"]):
                x0, y0 = boxes[f"chain {i + 1}"][:2]
                for j, d in enumerate(chain["steps"]):
                    if "box" in d:
                        bx = d["box"]
                        S.draw_box(draw, (x0, y0), scale, (bx["top"], bx["left"], bx["height"], bx["width"]),
                                   S.STEP_COLORS[j % len(S.STEP_COLORS)])
            S.draw_lines(draw, (layout.text_x, layout.strip_y(b, a, views) + 2), view.pop("_lines"))
            view["sheet_tiles"] = boxes
            bar.update()
    bar.close()
    record = {"sheet_size": list(layout.size), "tile": tile, "samples": samples}
    return sheet, record


# ---------------------------------------------------------------------------------------------
# The command.

def preview(data_dir, mixing_dir, out_png: Path, *, preset: str = "imagenet", cfg: Optional[C.IPMixConfig] = None,
            n: int = 8, seed: int = 0, backend: str = "fused", device: str = "cpu", tile: int = 128,
            data_note: str = "") -> Tuple[Preview, dict]:
    """Run one batch and write ``out_png`` and its JSON (same name, .json); returns both."""
    cfg = cfg or C.preset(preset)
    batch = run_batch(data_dir, mixing_dir, cfg, preset, n=n, seed=seed, backend=backend, device=device)
    title = (f"IPMix preview: preset {preset}, backend {backend}, device {device}, seed {seed}, "
             f"k={cfg.k} t={cfg.t}, {'jsd' if cfg.jsd else 'no jsd'}, {cfg.image_size} px{data_note}.  "
             f"Tiles: crop | chain results (reference replay; boxes = patches) | mixing picture | final (pipeline)")
    sheet, record = build_sheet(batch, title, tile)
    record = {"preset": preset, "backend": backend, "device": device, "seed": seed, "batch": n,
              "data": str(data_dir), "mixing": str(mixing_dir), "config": _common.config_dict(cfg),
              "tape_layout": {"k": cfg.k, "t": cfg.t, "size": TapeLayout(cfg.k, cfg.t).size},
              **record}
    png = io.BytesIO()
    sheet.save(png, "PNG")
    write_atomic(out_png, png.getvalue())
    write_atomic(out_png.with_suffix(".json"), json.dumps(record, indent=1) + "\n")
    batch.record = record
    return batch, record


def _run(args) -> int:
    cfg = _common.config_from_args(args)
    out = Path(args.out)
    if out.suffix.lower() != ".png":
        raise UserError(f"--out {out}: give a .png file name (the draws go beside it as .json)")
    if args.n < 1 or args.tile < 16:
        raise UserError("--n must be >= 1 and --tile >= 16")
    _common.check_device(args.device)
    _common.check_new_files([out, out.with_suffix(".json")], args.overwrite)
    with _common.data_folders(args.data, args.mixing, args.seed) as (data, mixing, generated), \
            _common.bad_files_named(data, mixing, "preview"):
        note = " (tiny generated data)" if generated else ""
        try:
            batch, record = preview(data, mixing, out, preset=args.preset, cfg=cfg, n=args.n,
                                    seed=args.seed, backend=args.backend, device=args.device,
                                    tile=args.tile, data_note=note)
        except OSError as e:      # the place was checked; the disk can still fill up meanwhile
            raise UserError(f"--out {out}: writing the sheet failed ({e.strerror or e}); nothing was "
                            f"left half-written") from None
    worst = max(v["replay"]["max_abs"] for s in record["samples"] for v in s["views"])
    mean = np.mean([v["replay"]["mean_abs"] for s in record["samples"] for v in s["views"]])
    print(f"preview: {args.n} samples x {aug_views(cfg)} IPMix view(s); reference replay of the pipeline's "
          f"views: mean |diff| {mean:.4f}, max {worst:.3f} (normalised units)")
    print(f"wrote {out} ({record['sheet_size'][0]}x{record['sheet_size'][1]}) and {out.with_suffix('.json')}")
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "preview", help="contact sheet of one training batch with the random draws behind each image",
        description="Run one batch of the training pipeline and write a PNG: per sample the crop, each "
                    "chain's result, the mixing picture and the final image, beside the draws that made "
                    "them; the draws also go to a JSON file next to the PNG (readable, and the raw tapes).")
    _common.add_data_args(p)
    _common.add_config_args(p)
    p.add_argument("--backend", choices=BACKENDS, default="fused", help="IPMix pixel backend (default %(default)s)")
    p.add_argument("--n", type=int, default=8, help="samples (default %(default)s)")
    p.add_argument("--tile", type=int, default=128, help="tile size in pixels (default %(default)s)")
    p.add_argument("--out", default="preview.png", help="output PNG (default %(default)s)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out and its JSON")
    p.set_defaults(func=_run)
