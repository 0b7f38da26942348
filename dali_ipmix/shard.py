"""``dali-ipmix shard SRC OUT``: class folders (or a verified file list of them, or a mixing-picture
folder) into tar shards in the WebDataset layout, the format ``sources`` reads with DALI's
``fn.readers.webdataset`` (``dali-ipmix verify SHARD_DIR`` checks a set: ``verify.scan_shards``).

Layout of OUT: ``shard-000000.tar`` ... with ``<key>.<picture extension>`` + ``<key>.cls`` (the
label as decimal text; no ``.cls`` in a mixing set) per sample, samples shuffled across classes
with ``--seed``; beside each tar its DALI index (``shard-000000.idx``, the format of DALI's
``wds2idx``: written here from the offsets as the tar is written, no second pass); and
``manifest.json``: sample and class counts, class names in label order, per-shard counts, sizes
and SHA-256.  Every picture first goes through ``verify.check_file`` (the checks of
``dali-ipmix verify``): pictures that would stop training are left out and listed.  SRC may be
class folders under ``s3://``: each picture is then read once (``verify.check_objects``: in
parallel requests, checked as it arrives) and written if usable; OUT is always local.

The set is written into a hidden sibling folder and moved into OUT when complete
(``data._io.staged``), the manifest last: an interrupted run leaves OUT as it was.

``dali-ipmix shard --index DIR`` (``index_set``) makes a WebDataset set written by another tool
(``<key>.<picture>`` + ``<key>.cls``, other members ignored) readable as one: the index files it
lacks (grouped as ``wds2idx`` groups members) and the manifest, in the same staged way.
"""
from __future__ import annotations

import argparse
import functools
import hashlib
import io
import json
import os
import re
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np

from . import sources
from .data._io import pool_map, prepare_out_dir, staged
from .errors import UserError
from .progress import Progress

DEFAULT_SHARD_BYTES = 1 << 30        # ~1 GB shards: few files for the file system, many per rank
DEFAULT_SHARD_SIZE = "1GB"
TAR_BLOCK = 512
SHARD_NAME = "shard-{:06d}"
KEY = "{:09d}"                       # sample keys: short, so every tar header is one block (USTAR)
OWNED = re.compile(r"(shard-\d{6}\.(tar|idx)|manifest\.json|left_out\.txt)$")


def parse_size(text: str) -> int:
    """``"1GB"``, ``"500MB"``, ``"64k"``, ``"123"`` (bytes) -> bytes."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?)i?b?\s*", str(text), re.I)
    if not m:
        raise UserError(f"--shard-size {text}: give a size such as 1GB, 500MB or 64kB")
    value = float(m.group(1)) * 1024 ** " kmgt".index(m.group(2).lower() or " ")
    if value < 1:
        raise UserError(f"--shard-size {text}: must be at least one byte")
    return int(value)


def _member_bytes(size: int) -> int:
    return TAR_BLOCK + -(-size // TAR_BLOCK) * TAR_BLOCK


def plan_shards(sizes: List[int], shard_bytes: Optional[int], count: Optional[int],
                labelled: bool) -> List[range]:
    """Consecutive sample ranges, one per shard: ``count`` shards of equal sample counts, or
    shards that stay under ``shard_bytes`` (a shard holds at least one sample)."""
    n = len(sizes)
    if count:
        count = min(count, n)
        bounds = [round(i * n / count) for i in range(count + 1)]
        return [range(bounds[i], bounds[i + 1]) for i in range(count)]
    out, start, used = [], 0, 0
    for i, size in enumerate(sizes):
        need = _member_bytes(size) + (_member_bytes(10) if labelled else 0)
        if i > start and used + need > shard_bytes:
            out.append(range(start, i))
            start, used = i, 0
        used += need
    out.append(range(start, n))
    return out


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> int:
    """Add a member; returns the offset of its data (what DALI's index records)."""
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = len(data), 0o444, 0
    header = tar.offset
    tar.addfile(info, io.BytesIO(data))
    return header + TAR_BLOCK


def write_shard(path: Path, index_path: Path, samples, labelled: bool) -> dict:
    """One tar (``samples``: (key, extension, bytes, label)) and its DALI index; returns its
    manifest entry."""
    lines = []
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for key, ext, data, label in samples:
            parts = [(ext, data)] + ([(sources.LABEL_MEMBER, str(label).encode())] if labelled else [])
            entry = []
            for member_ext, payload in parts:
                name = f"{key}.{member_ext}"
                entry.append(f"{member_ext} {_add(tar, name, payload)} {len(payload)} {name}")
            lines.append(" ".join(entry))
    index_path.write_text(f"v1.2 {len(lines)}\n" + "\n".join(lines) + "\n")
    with open(path, "rb") as f:
        digest = hashlib.file_digest(f, "sha256").hexdigest()
    return {"tar": path.name, "index": index_path.name, "samples": len(lines),
            "bytes": path.stat().st_size, "sha256": digest}


def _check(root: str, rel: str):
    from .verify import check_file
    return check_file(root, (rel, True))


def convert(src, out, *, filelist=None, mixing: bool = False, seed: int = 0,
            shard_bytes: Optional[int] = DEFAULT_SHARD_BYTES, count: Optional[int] = None,
            overwrite: bool = False, jobs: Optional[int] = None, log=print) -> dict:
    """Write the shard set of ``src`` (local, or class folders under ``s3://``) into the local
    folder ``out``; returns the manifest."""
    if sources.s3.is_s3(str(out)):
        raise UserError(f"OUT {out}: dali-ipmix shard writes a local folder; upload it afterwards "
                        f"(e.g. `aws s3 sync OUT {out}`)")
    on_s3 = sources.s3.is_s3(str(src))
    if on_s3:
        from .verify import s3_requests
        jobs = s3_requests(jobs)       # checked before the listing: a bad --jobs does no work
    listing = sources.s3.list_prefix(str(src), "SRC") if on_s3 else None
    data = sources.open_source(src, flag="SRC", filelist=filelist, labelled=not mixing, listing=listing)
    if data.format != "folders":
        raise UserError(f"SRC {src} is already a shard set")
    if count is not None and count < 1:
        raise UserError(f"--shards must be >= 1, got {count}")
    out = Path(out)
    if not on_s3 and (out.resolve() == Path(src).resolve() or Path(src).resolve() in out.resolve().parents):
        raise UserError(f"OUT {out} is inside SRC {src}; choose a folder outside the data")
    existing = [p.name for p in out.iterdir() if OWNED.match(p.name)] if out.is_dir() else []
    out = prepare_out_dir(out, overwrite, owned=())
    start = time.perf_counter()
    labelled = not mixing
    rng = np.random.default_rng(seed)

    if on_s3:       # each picture read once: checked as it arrives, then written (below)
        bad = []
        order = [int(i) for i in rng.permutation(data.size)]
        sizes = [listing.objects[data.files[i]] for i in order]
    else:           # checked first, over processes, then read again to be written
        findings = pool_map(functools.partial(_check, data.root), list(data.files), jobs=jobs,
                            progress="shard: check")
        bad = [f for f in findings if f is not None and _left_out(f)]
        dropped = {f.path for f in bad}
        keep = [i for i, f in enumerate(data.files) if f not in dropped]
        if not keep:
            raise UserError(f"SRC {src}: none of the {data.size} pictures is usable (see `dali-ipmix verify "
                            f"{src}`)")
        order = [keep[i] for i in rng.permutation(len(keep))]
        sizes = [os.path.getsize(os.path.join(data.root, data.files[i])) for i in order]
    plan = plan_shards(sizes, shard_bytes, count, labelled)
    written = []                                 # the data.files index of each sample written

    def pictures(part):
        """(k, bytes) of the usable pictures of ``part`` (positions in ``order``)."""
        if not on_s3:
            for k in part:
                with open(os.path.join(data.root, data.files[order[k]]), "rb") as f:
                    yield k, f.read()
            return
        from .verify import check_objects
        items = [(data.files[order[k]], True, sizes[k]) for k in part]
        for k, (finding, payload) in zip(part, check_objects(data.root, items, jobs, flag="SRC")):
            if finding is not None and "unreadable" in finding.kinds:    # the storage, not the picture
                raise UserError(f"SRC {sources.s3.join(data.root, finding.path)}: cannot be read "
                                f"({finding.detail}); nothing was written")
            if finding is not None and _left_out(finding):
                bad.append(finding)
                bar.update()
                continue
            yield k, payload

    def samples(part):
        for k, payload in pictures(part):
            i = order[k]
            written.append(i)
            yield (KEY.format(k), os.path.splitext(data.files[i])[1][1:].lower(), payload,
                   data.labels[i] if labelled else None)
            bar.update()

    names = [SHARD_NAME.format(s) for s in range(len(plan))]
    owned = sorted(set(existing) | {f"{n}.{e}" for n in names for e in ("tar", "idx")} | {"left_out.txt"})
    entries = []
    with staged(out, owned + [sources.MANIFEST]) as stage:
        with Progress("shard: write", len(order)) as bar:
            for name, part in zip(names, plan):
                entry = write_shard(stage / f"{name}.tar", stage / f"{name}.idx", samples(part), labelled)
                if entry["samples"]:
                    entries.append(entry)
                else:             # every picture of it was bad (S3): no empty shard
                    (stage / entry["tar"]).unlink()
                    (stage / entry["index"]).unlink()
        if not written:
            raise UserError(f"SRC {src}: none of the {data.size} pictures is usable (see `dali-ipmix verify "
                            f"{src}`)")
        bad.sort(key=lambda f: f.path)
        counts = np.bincount([data.labels[i] for i in written], minlength=len(data.classes)) \
            if labelled else []
        manifest = {
            "format": sources.MANIFEST_FORMAT, "version": 1, "source": str(src),
            "filelist": filelist and str(filelist), "seed": seed, "samples": len(written),
            "classes": list(data.classes), "num_classes": len(data.classes),
            "class_counts": [int(c) for c in counts],
            "picture_size": _first_picture_size(stage / entries[0]["tar"],
                                                (stage / entries[0]["index"]).read_text()),
            "shards": entries,
            "left_out": [{"path": f.path, "kinds": list(f.kinds), "detail": f.detail} for f in bad]}
        (stage / sources.MANIFEST).write_text(json.dumps(manifest, indent=1))
        if bad:
            (stage / "left_out.txt").write_text("".join(f"{f.path}\t{','.join(f.kinds)}\t{f.detail}\n"
                                                        for f in bad))
        if (out / sources.MANIFEST).exists():    # the old set stops being readable first
            (out / sources.MANIFEST).unlink()
    took = time.perf_counter() - start
    log(f"shard {src} -> {out}: {len(written)} samples"
        + (f" of {len(data.classes)} classes" if labelled else " (mixing pictures)")
        + f" in {len(entries)} shard(s) of ~{np.mean([e['bytes'] for e in entries]) / 2**20:.1f} MB, "
          f"{took:.1f} s")
    if bad:
        log(f"left out {len(bad)} bad picture(s) (listed in {out / 'left_out.txt'}):")
        for f in bad[:20]:
            log(f"  {f.path}  {', '.join(f.kinds)}" + (f" ({f.detail})" if f.detail else ""))
        if len(bad) > 20:
            log(f"  ... {len(bad) - 20} more")
    return manifest


def _left_out(finding) -> bool:
    """Whether a picture stays out of the shards: training would stop on it, or its name cannot
    be a tar member the readers list."""
    return finding.fatal or "unlistable_name" in finding.kinds


def _first_picture_size(tar: Path, index_text: str):
    """[width, height] of the first picture of a shard, from its header (sizes the GPU decoder
    cache of a mixing set); None when it cannot be parsed."""
    from PIL import Image
    first = sources.index_entries(index_text)[0]
    offset, size, _ = next(v for k, v in first.items() if k in sources.PICTURE_EXTENSIONS)
    try:
        with Image.open(io.BytesIO(sources.read_bytes(str(tar), offset, size))) as im:
            return list(im.size)
    except Exception:
        return None


# ---------------------------------------------------------------------------------------------
# Indexing a WebDataset set made by another tool (dali-ipmix shard --index DIR)

def read_tar_index(path: Path) -> Tuple[List[List[Tuple[str, int, int, str]]], Dict[int, bytes]]:
    """(samples, label texts) of a tar: per sample its members (extension, data offset, size,
    name) in tar order, grouped as DALI's ``wds2idx`` groups them (consecutive members with one
    key; regular files only; hidden names skipped), and the bytes of each sample's ``.cls``."""
    samples, labels, last = [], {}, None
    try:
        with tarfile.open(path, "r:") as tar:
            for member in tar:
                if not member.isreg():
                    continue
                key, ext = sources.split_member(member.name)
                if not key or key.endswith("/"):
                    continue
                if any(c.isspace() for c in member.name):
                    raise UserError(f"--index {path}: member {member.name!r} has a space in its name, which "
                                    f"DALI's index format cannot hold; rename it and write the tar again")
                if key != last:
                    samples.append([])
                    last = key
                samples[-1].append((ext, member.offset_data, member.size, member.name))
                if ext == sources.LABEL_MEMBER:
                    labels[len(samples) - 1] = tar.extractfile(member).read(32)
    except (tarfile.TarError, OSError, EOFError) as e:
        raise UserError(f"--index {path}: not a readable tar ({e}); copy it again") from None
    return samples, labels


def _index_text(samples) -> str:
    return (f"v1.2 {len(samples)}\n"
            + "".join(" ".join(f"{e} {o} {n} {name}" for e, o, n, name in members) + "\n"
                      for members in samples))


def index_set(base, *, classes_file=None, overwrite: bool = False, log=print) -> dict:
    """Write the missing DALI index files and the manifest of a WebDataset set made by another
    tool (``<key>.<picture>`` + ``<key>.cls`` per sample, other members ignored) in ``base``;
    returns the manifest.  Nothing is overwritten without ``overwrite``, and the files are
    written beside and moved in at the end, the manifest last: an interrupted run adds nothing."""
    if sources.s3.is_s3(str(base)):
        raise UserError(f"--index {base}: index a local copy of the shard set with `dali-ipmix shard --index "
                        f"DIR` before uploading it, then upload its {sources.MANIFEST} and .idx files")
    base = Path(base)
    if not base.is_dir():
        raise UserError(f"--index {base}: no such folder; give the folder of the .tar shards")
    tars = sorted(p for p in base.iterdir() if p.name.endswith(".tar") and p.is_file())
    if not tars:
        raise UserError(f"--index {base}: no .tar files in this folder")
    try:        # the index files and the manifest go beside the shards: checked before the scan
        tempfile.NamedTemporaryFile(dir=base, prefix=".write-test-").close()
    except OSError as e:
        raise UserError(f"--index {base}: cannot write into it ({e.strerror or e}); the index files "
                        f"and {sources.MANIFEST} go beside the shards: index a writable copy") from None
    if (base / sources.MANIFEST).exists() and not overwrite:
        raise UserError(f"--index {base}: {sources.MANIFEST} exists already; pass --overwrite to write it "
                        f"(and the index files) again")
    names = None
    if classes_file is not None:
        try:
            names = [line.strip() for line in Path(classes_file).read_text().splitlines() if line.strip()]
        except (OSError, UnicodeDecodeError) as e:
            raise UserError(f"--classes {classes_file}: cannot read it ({e.__class__.__name__}); give a "
                            f"text file of class names, one per line in label order") from None
        if not names:
            raise UserError(f"--classes {classes_file}: no class names in it")
        twice = next((n for i, n in enumerate(names) if n in names[:i]), None)
        if twice is not None:
            raise UserError(f"--classes {classes_file}: {twice!r} is named twice; give each label its "
                            f"own class name")
    start = time.perf_counter()
    picture_exts = sources.PICTURE_EXTENSIONS
    scanned = []                                  # (tar, samples, labels)
    with Progress("shard --index", len(tars)) as bar:
        for tar in tars:
            samples, labels = read_tar_index(tar)
            if not samples:
                raise UserError(f"--index {tar}: holds no files")
            scanned.append((tar, samples, labels))
            bar.update()
    labelled = any(labels for _, _, labels in scanned)
    values = []
    for tar, samples, labels in scanned:
        for i, members in enumerate(samples):
            key = sources.split_member(members[0][3])[0]
            if not any(e in picture_exts for e, *_ in members):
                raise UserError(f"--index {tar}: sample {key} has no picture member "
                                f"({', '.join('.' + e for e in picture_exts)}); DALI's reader would stop on it")
            if labelled and i not in labels:
                raise UserError(f"--index {tar}: sample {key} has no .{sources.LABEL_MEMBER} member while "
                                f"others have one; every sample needs its label")
            if labelled:
                text = labels[i]         # read as it is by the graph (sources.cls_label): digits only
                if not text.isdigit() or len(text) > sources.LABEL_DIGITS:
                    raise UserError(f"--index {tar}: the .{sources.LABEL_MEMBER} member of sample {key} is "
                                    f"{text[:12]!r}, not a label (decimal digits only, no spaces or line "
                                    f"break); write the shards again")
                values.append(int(text))
    if not labelled and names is not None:
        raise UserError(f"--classes {classes_file}: the shards of {base} have no .{sources.LABEL_MEMBER} "
                        f"members (a set of mixing pictures has no classes)")
    num_classes = max(values) + 1 if values else 0
    if names is not None and len(names) < num_classes:
        raise UserError(f"--classes {classes_file}: {len(names)} names but the .{sources.LABEL_MEMBER} "
                        f"members go up to label {num_classes - 1}")
    classes = (names if names is not None else [f"class{i}" for i in range(num_classes)]) if labelled else []
    entries, write = [], {}
    for tar, samples, _ in scanned:
        index = tar.with_name(tar.name[:-len(".tar")] + ".idx")
        text = _index_text(samples)
        if index.exists() and not overwrite and index.read_text() != text:
            raise UserError(f"--index {base}: {index.name} differs from the index of {tar.name}; pass "
                            f"--overwrite to replace it")
        if not index.exists() or overwrite:
            write[index.name] = text
        with open(tar, "rb") as f:
            digest = hashlib.file_digest(f, "sha256").hexdigest()
        entries.append({"tar": tar.name, "index": index.name, "samples": len(samples),
                        "bytes": tar.stat().st_size, "sha256": digest})
    manifest = {
        "format": sources.MANIFEST_FORMAT, "version": 1, "source": str(base),
        "made_by": "dali-ipmix shard --index", "filelist": None, "seed": None,
        "samples": sum(e["samples"] for e in entries),
        "classes": classes, "num_classes": len(classes),
        "class_counts": [int(c) for c in np.bincount(values, minlength=len(classes))] if labelled else [],
        "picture_size": _first_picture_size(scanned[0][0], _index_text(scanned[0][1])),
        "shards": entries, "left_out": []}
    with staged(base, sorted(write) + [sources.MANIFEST]) as stage:
        for name, text in write.items():
            (stage / name).write_text(text)
        (stage / sources.MANIFEST).write_text(json.dumps(manifest, indent=1))
        if (base / sources.MANIFEST).exists():    # the old set stops being readable first
            (base / sources.MANIFEST).unlink()
    log(f"shard --index {base}: {manifest['samples']} samples"
        + (f" of {len(classes)} classes" if labelled else " (mixing pictures: no .cls members)")
        + f" in {len(entries)} shard(s); wrote {len(write)} index file(s) and {sources.MANIFEST}, "
          f"{time.perf_counter() - start:.1f} s")
    return manifest


# ---------------------------------------------------------------------------------------------
# The command

def _run(args: argparse.Namespace) -> int:
    if args.index is not None:
        given = [flag for flag, value in (("SRC", args.src), ("--filelist", args.filelist),
                                          ("--mixing", args.mixing), ("--shard-size", args.shard_size),
                                          ("--shards", args.shards), ("--seed", args.seed),
                                          ("--jobs", args.jobs)) if value not in (None, False)]
        if given:
            raise UserError(f"--index DIR indexes the shards already in DIR; {', '.join(given)} "
                            f"appl{'ies' if len(given) == 1 else 'y'} to `dali-ipmix shard SRC OUT`")
        index_set(args.index, classes_file=args.classes, overwrite=args.overwrite)
        return 0
    if args.src is None or args.out is None:
        raise UserError("give SRC and OUT (`dali-ipmix shard SRC OUT`), or --index DIR to index a "
                        "WebDataset set made by another tool")
    if args.classes is not None:
        raise UserError("--classes applies to --index DIR; `dali-ipmix shard SRC OUT` names the classes "
                        "after SRC's folders")
    shard_bytes = None if args.shards else parse_size(args.shard_size or DEFAULT_SHARD_SIZE)
    convert(args.src, args.out, filelist=args.filelist, mixing=args.mixing, seed=args.seed or 0,
            shard_bytes=shard_bytes, count=args.shards, overwrite=args.overwrite, jobs=args.jobs)
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "shard", help="pack class folders into tar shards (WebDataset layout, DALI index files)",
        usage="dali-ipmix shard [options] SRC OUT\n       dali-ipmix shard --index DIR [--classes FILE] "
              "[--overwrite]",
        description="Pack a class-folder data set (SRC/<class>/<image>), a verified file list of one, "
                    "or with --mixing a folder of mixing pictures, into tar shards in OUT: "
                    "<key>.<ext> + <key>.cls per sample, shuffled across classes, a DALI index file "
                    "beside each shard and manifest.json. Pictures that would stop training (the "
                    "checks of dali-ipmix verify) are left out and listed. Train on OUT wherever a "
                    "class folder is accepted (--data-path/--train-dir, --mixing-set, bench --data, "
                    "...), locally or after uploading it to s3://bucket/prefix. SRC may be s3://bucket/prefix; "
                    "OUT is a local folder. "
                    "With --index DIR: make a WebDataset set written by another tool (e.g. webdataset's "
                    "ShardWriter: <key>.jpg + <key>.cls, other members ignored) usable as one: write "
                    "the missing DALI index files and manifest.json in DIR.")
    p.add_argument("src", metavar="SRC", nargs="?", help="class-folder data set (e.g. imagenet/train), local "
                   "or s3://BUCKET/PREFIX (each picture read once: checked, then written)")
    p.add_argument("out", metavar="OUT", nargs="?",
                   help="output folder (must be empty or absent unless --overwrite)")
    p.add_argument("--filelist", metavar="FILE", default=None,
                   help="shard only the files of this list (`dali-ipmix verify SRC --write-filelist FILE`)")
    p.add_argument("--mixing", action="store_true", help="SRC is a folder of mixing pictures (no classes)")
    p.add_argument("--shard-size", default=None, metavar="SIZE",
                   help=f"largest shard (default {DEFAULT_SHARD_SIZE}; e.g. 500MB)")
    p.add_argument("--shards", type=int, default=None, metavar="N",
                   help="write N shards of equal sample counts instead of --shard-size")
    p.add_argument("--seed", type=int, default=None, help="seed of the sample order (default 0)")
    p.add_argument("--jobs", type=int, default=None,
                   help="worker processes of the checks (default: one per CPU); SRC on s3://: parallel "
                        "requests (default 16)")
    p.add_argument("--overwrite", action="store_true",
                   help="reuse a non-empty OUT, replacing its shard files and manifest (other files stay); "
                        "with --index, write DIR's manifest and index files again")
    p.add_argument("--index", metavar="DIR", default=None,
                   help="index the tar shards in DIR (a local folder) instead: the DALI index files they "
                        "lack and manifest.json (sample and class counts from the .cls members)")
    p.add_argument("--classes", metavar="FILE", default=None,
                   help="with --index: class names, one per line in label order (default: class0, "
                        "class1, ...)")
    p.set_defaults(func=_run)
