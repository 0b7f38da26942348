"""Data sources: one small record per data set -- where it is, its format, its class names, its
size -- and the DALI reader that reads it, so that every pipeline and command takes a class
folder, a shard set or an ``s3://`` prefix alike (in the spirit of timm's ``reader_factory``).

``open_source(location)`` lists the data once and returns a ``DataSource``; everything downstream
(the pipelines, train.py's data check, bench, the debugging tools) takes that record, so a run
lists its data once.  A format is one entry of ``FORMATS``: how to recognise it, how to open it
(list it, check it, count it) and how DALI reads it.

* ``folders``: ImageNet-style class folders ``root/<class>/<image>`` (or, for the mixing set, a
  flat or nested folder of pictures), local or under ``s3://bucket/prefix``; optionally narrowed
  by a verified file list (``dali-ipmix verify --write-filelist``).  Read by ``fn.readers.file``.
* ``webdataset``: tar shards in the WebDataset layout (``<key>.<picture extension>`` and
  ``<key>.cls``, the label as decimal text) with DALI's index file beside each shard and the
  ``manifest.json`` that ``dali-ipmix shard`` writes (class names, counts).  Given as the shard
  folder, or a pattern of some of its shards (``DIR/shard-{000000..000009}.tar``,
  ``DIR/shard-00000*.tar``).  Read by ``fn.readers.webdataset``.

Per-rank sharding is DALI's: ``shard_id`` = rank, ``num_shards`` = world size, padded
(``pad_last_batch``) so every rank runs the same number of steps and, over the ranks, each sample
is read once per epoch.  Both readers' positions are part of DALI's checkpoint (exact resume).
"""
from __future__ import annotations

import fnmatch
import json
import os
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from . import readers, s3
from .errors import UserError

MANIFEST = "manifest.json"
MANIFEST_FORMAT = "dali-ipmix-webdataset"
LABEL_MEMBER = "cls"
# one DALI ``ext`` entry: whichever picture extension a sample has ("jpg;jpeg;png;...")
PICTURE_EXTENSIONS = tuple(e[1:] for e in readers.IMAGE_EXTENSIONS)
PICTURE_MEMBERS = ";".join(PICTURE_EXTENSIONS)
LABEL_DIGITS = 9                 # the longest .cls label text read (labels up to 10^9 - 1)
SHUFFLE_BUFFER = 1024            # DALI's default ``initial_fill``


def _shuffle_kw(src: "DataSource", num_shards: int, shuffle: bool, seed) -> dict:
    """The readers' shuffling arguments.  DALI fills its shuffle buffer (``initial_fill``
    samples, read before the first batch) across epoch ends, so a set smaller than the buffer
    would be read many times over at start-up -- over S3, 1024 requests per reader for a few
    pictures -- for no extra randomness: the buffer is capped at the rank's share."""
    kw = {} if seed is None else {"seed": seed}
    if shuffle:
        kw["initial_fill"] = max(1, min(SHUFFLE_BUFFER, -(-src.size // num_shards)))
    return kw


@dataclass(frozen=True, eq=False)
class DataSource:
    """One data set as a run sees it, listed once.

    ``location``: as the user gave it (a folder, a shard folder or pattern, an ``s3://`` URI);
    ``format``: a key of ``FORMATS``; ``flag``: the flag that named it (for messages);
    ``classes``: class names in label order (``()`` for a mixing set); ``size``: samples.
    Format details: ``root``/``files``/``labels`` (folders: DALI's ``file_root`` and the files
    relative to it), ``shards``/``indices`` (webdataset: tar files and their index files, local
    paths or ``s3://`` URIs); ``picture_size``: (width, height) of the first picture when known
    (sizes the GPU decoder cache of a mixing set); ``filelist``: the verified file list that
    narrowed it."""
    location: str
    format: str
    flag: str
    classes: Tuple[str, ...]
    size: int
    root: str = ""
    files: Sequence[str] = ()
    labels: Sequence[int] = ()
    shards: Sequence[str] = ()
    indices: Sequence[str] = ()
    picture_size: Optional[Tuple[int, int]] = None
    filelist: Optional[str] = None

    def __str__(self) -> str:
        return self.location

    def __fspath__(self) -> str:
        # the location, so that a source stands wherever a data folder did (messages, recorded
        # flags); an s3:// location read as a local path names nothing on disk
        return self.location

    def __truediv__(self, rel) -> Path:
        """A file of a local folder source (``source / "class0/x.jpg"``), as with a Path."""
        return Path(self.location) / rel

    @property
    def on_s3(self) -> bool:
        return s3.is_s3(self.location)

    def reader(self, *, name: str, shard_id: int = 0, num_shards: int = 1, shuffle: bool,
               seed: Optional[int] = None, labelled: bool = True, stick_to_shard: bool = False):
        """(encoded pictures, labels int32 [1] or None) DataNodes: this rank's part, padded;
        ``stick_to_shard``: the same part every epoch (validation), not DALI's next one."""
        return FORMATS[self.format].reader(self, name=name, shard_id=shard_id, num_shards=num_shards,
                                           shuffle=shuffle, seed=seed, labelled=labelled,
                                           stick_to_shard=stick_to_shard)

    def permuted(self, seed: int) -> "DataSource":
        """The same data walked in another order (files, or whole shards): the mixing set's
        per-rank stream (``readers.mixing_pictures``)."""
        import numpy as np
        rng = np.random.default_rng(seed)
        if self.files:
            order = rng.permutation(len(self.files))
            return replace(self, files=[self.files[i] for i in order],
                           labels=[self.labels[i] for i in order] if self.labels else ())
        order = rng.permutation(len(self.shards))
        return replace(self, shards=[self.shards[i] for i in order],
                       indices=[self.indices[i] for i in order])

    def describe(self) -> str:
        return (f"{self.location} ({self.format}, {self.size} samples"
                + (f", {len(self.classes)} classes" if self.classes else "") + ")")


@dataclass(frozen=True)
class Format:
    """A data format: ``claims(location, listing)`` says whether a location holds it (``listing``:
    the S3 listing of an ``s3://`` location, else None); ``open(location, listing, flag,
    filelist, labelled)`` lists and checks it into a ``DataSource``; ``reader(source, **kw)``
    builds its DALI reader (see ``DataSource.reader``)."""
    claims: Callable
    open: Callable
    reader: Callable


def open_source(data, *, flag: str = "--data", filelist=None, labelled: bool = True,
                listing: Optional[s3.Listing] = None) -> DataSource:
    """The ``DataSource`` of ``data`` (a path, an ``s3://`` URI or a ``DataSource``, returned as
    is when it was opened with the same ``filelist``): listed once, checked; a missing, empty or
    inconsistent location is a one-line ``UserError``.  ``labelled``: a class-labelled set
    (training, validation) rather than a mixing set; ``filelist``: a verified file list
    narrowing a class-folder set; ``listing``: the S3 listing of ``data`` when it was already
    listed (a part of a larger listing: ``s3.Listing.by_prefix``), so it is not listed again."""
    filelist = None if filelist is None else str(filelist)
    if isinstance(data, DataSource):
        if data.filelist == filelist:
            return data
        data = data.location
    location = str(data)
    if listing is None and s3.is_s3(location):
        listing = s3.list_prefix(_base(location), flag)
    for fmt in FORMATS.values():
        if fmt.claims(location, listing):
            return fmt.open(location, listing, flag=flag, filelist=filelist, labelled=labelled)
    raise AssertionError("the folders format claims every location")


# ---------------------------------------------------------------------------------------------
# Class folders (and mixing-picture folders), local or on S3

def _folders_claim(location, listing) -> bool:
    return True


def s3_folder_files(listing: s3.Listing, labelled: bool):
    """(files, labels, classes) from the keys of an S3 listing, as the local readers would list
    the same tree: class = first path component, pictures by extension, sorted per class."""
    pictures = sorted(k for k in listing.objects if readers._is_image(k))
    if not labelled:
        return pictures, [], ()
    classes = sorted({k.split("/", 1)[0] for k in pictures if "/" in k})
    index = {c: i for i, c in enumerate(classes)}
    files = [k for k in pictures if "/" in k]
    files.sort(key=lambda k: (index[k.split("/", 1)[0]], k))
    return files, [index[k.split("/", 1)[0]] for k in files], tuple(classes)


def _folders_open(location, listing, *, flag, filelist, labelled) -> DataSource:
    if _holds_tars_only(location, listing):
        raise _no_manifest(location, flag)
    if listing is None:
        if labelled:
            files, labels, classes = readers.listed_or_found(location, filelist, flag=flag)
        else:
            files, labels, classes = readers.picture_files(location, flag=flag, filelist=filelist), (), ()
        return DataSource(location, "folders", flag, tuple(classes), len(files), root=location,
                          files=files, labels=labels, filelist=filelist)
    files, labels, classes = s3_folder_files(listing, labelled)
    if filelist is not None:     # the list's files, which must all be in the bucket
        listed, listed_labels = readers.filelist_files(filelist)
        missing = next((f for f in listed if f not in listing.objects), None)
        if missing is not None:
            raise UserError(f"file list {filelist}: {missing} is not under {location}; write the list "
                            f"again for this data")
        files, labels = listed, (listed_labels if labelled else ())
    if labelled and not classes:
        raise UserError(f"{flag} {location}: no class prefixes with pictures; expected "
                        f"{location}/<class>/<image>.jpg")
    if not files:
        raise UserError(f"{flag} {location}: no pictures ({', '.join(readers.IMAGE_EXTENSIONS)})")
    return DataSource(location, "folders", flag, classes, len(files), root=listing.uri,
                      files=files, labels=labels, filelist=filelist)


def _folders_reader(src: DataSource, *, name, shard_id, num_shards, shuffle, seed, labelled,
                    stick_to_shard):
    from nvidia.dali import fn
    kw = _shuffle_kw(src, num_shards, shuffle, seed)
    if labelled:
        kw["labels"] = list(src.labels)
    data, labels = fn.readers.file(file_root=src.root, files=list(src.files), shard_id=shard_id,
                                   num_shards=num_shards, random_shuffle=shuffle,
                                   pad_last_batch=True, stick_to_shard=stick_to_shard, name=name,
                                   **kw)
    return data, (labels if labelled else None)


# ---------------------------------------------------------------------------------------------
# WebDataset tar shards with DALI index files and a manifest

_BRACES = re.compile(r"\{(\d+)\.\.(\d+)\}")


def _is_pattern(name: str) -> bool:
    return bool(_BRACES.search(name)) or any(c in name for c in "*?[")


def _base(location: str) -> str:
    """The shard folder of a shard pattern or single tar, else the location itself."""
    last = location.rstrip("/").rsplit("/", 1)[-1]
    if _is_pattern(last) or last.endswith(".tar"):
        return location.rstrip("/").rsplit("/", 1)[0] if "/" in location.rstrip("/") else "."
    return location


def _expand(pattern: str) -> List[str]:
    """WebDataset's brace ranges (``shard-{000..009}.tar``) expanded; glob characters kept."""
    m = _BRACES.search(pattern)
    if not m:
        return [pattern]
    lo, hi = m.group(1), m.group(2)
    width = len(lo)
    out = []
    for i in range(int(lo), int(hi) + 1):
        out += _expand(pattern[:m.start()] + str(i).zfill(width) + pattern[m.end():])
    return out


def _wds_claim(location, listing) -> bool:
    base = _base(location)
    if base != location:
        return True
    if listing is not None:
        return MANIFEST in listing.objects
    return os.path.isfile(os.path.join(location, MANIFEST))


def _read(base: str, name: str, flag: str, listing, byte_range=None) -> bytes:
    if listing is not None:
        return s3.read_object(s3.join(base, name), flag, byte_range)
    with open(os.path.join(base, name), "rb") as f:
        return f.read(64 if byte_range else -1)


def read_bytes(where: str, offset: int = 0, size: int = -1, flag: str = "--data") -> bytes:
    """``size`` bytes at ``offset`` of a local file or an ``s3://`` object (one ranged read);
    ``size`` -1: to the end."""
    if s3.is_s3(where):
        span = f"bytes={offset}-{'' if size < 0 else offset + size - 1}" if offset or size >= 0 else None
        return s3.read_object(where, flag, span)
    with open(where, "rb") as f:
        f.seek(offset)
        return f.read(size)


def index_count(head: bytes) -> Optional[int]:
    """Samples an index file declares (its first line, ``v1.2 N``), None if it is no index."""
    parts = head.split(b"\n", 1)[0].split()
    if len(parts) == 2 and parts[0].startswith(b"v1") and parts[1].isdigit():
        return int(parts[1])
    return None


def index_command(base: str) -> str:
    """How to make the index files and the manifest of a WebDataset set made by another tool."""
    if s3.is_s3(base):
        return (f"index a local copy with `dali-ipmix shard --index DIR` before uploading it (then "
                f"upload its {MANIFEST} and .idx files to {base})")
    return f"index it with `dali-ipmix shard --index {base}`"


def _no_manifest(base: str, flag: str) -> UserError:
    return UserError(f"{flag} {base}: tar shards without {MANIFEST} (a WebDataset set made by another "
                     f"tool?); {index_command(base)}, or write the shard set from class folders with "
                     f"`dali-ipmix shard SRC OUT`")


def _holds_tars_only(location: str, listing) -> bool:
    """Whether a location holds tar files and no class folders (a manifest-less shard set)."""
    if listing is not None:
        names = list(listing.objects)
    else:
        try:
            names = [e.name + ("/" if e.is_dir() else "") for e in os.scandir(location)]
        except OSError:
            return False
    return any(n.endswith(".tar") and "/" not in n for n in names) and not any("/" in n for n in names)


def read_manifest(base: str, flag: str = "--data", listing=None) -> dict:
    try:
        if listing is not None and MANIFEST not in listing.objects:
            raise FileNotFoundError(MANIFEST)
        manifest = json.loads(_read(base, MANIFEST, flag, listing))
    except FileNotFoundError:
        raise _no_manifest(base, flag) from None
    except (OSError, ValueError) as e:
        raise UserError(f"{flag} {base}/{MANIFEST}: cannot read it ({e}); write the shard set again "
                        f"with `dali-ipmix shard`") from None
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        raise UserError(f"{flag} {base}/{MANIFEST}: not a manifest of `dali-ipmix shard` "
                        f"(format {MANIFEST_FORMAT})")
    return manifest


def _wds_open(location, listing, *, flag, filelist, labelled) -> DataSource:
    if filelist is not None:
        raise UserError(f"{flag} {location} is a shard set: a file list applies to class folders; "
                        f"shard the verified list instead (`dali-ipmix shard SRC OUT --filelist FILE`)")
    base = _base(location)
    manifest = read_manifest(base, flag, listing)
    shards = manifest["shards"]
    if base != location:
        pattern = location.rstrip("/").rsplit("/", 1)[-1]
        wanted = _expand(pattern)
        shards = [s for s in shards if any(fnmatch.fnmatchcase(s["tar"], w) for w in wanted)]
        if not shards:
            raise UserError(f"{flag} {location}: matches none of the {len(manifest['shards'])} shards "
                            f"listed in {base}/{MANIFEST}")
    declared = sum(s["samples"] for s in manifest["shards"])
    if declared != manifest["samples"]:
        raise UserError(f"{flag} {base}/{MANIFEST}: the shards hold {declared} samples but the "
                        f"manifest says {manifest['samples']}; write the shard set again")
    classes = tuple(manifest.get("classes") or ())
    if labelled and not classes:
        raise UserError(f"{flag} {location}: a shard set of mixing pictures (no classes); give a "
                        f"shard set made from class folders")
    for s in shards:
        if listing is not None and s["index"] not in listing.objects or \
                listing is None and not os.path.isfile(os.path.join(base, s["index"])):
            make = (f"make it from a local copy of the shard with `wds2idx SHARD.tar {s['index']}` "
                    f"(installed with DALI) and upload it beside the shard" if listing is not None else
                    f"make it with `wds2idx {base}/{s['tar']} {base}/{s['index']}` (installed with DALI)")
            raise UserError(f"{flag} {location}: shard {s['tar']} has no index file {s['index']}, which "
                            f"DALI's webdataset reader needs; {make}, for every shard")
        if listing is not None and s["tar"] not in listing.objects or \
                listing is None and not os.path.isfile(os.path.join(base, s["tar"])):
            raise UserError(f"{flag} {location}: shard {s['tar']} listed in {MANIFEST} is missing; "
                            f"copy the whole shard set")
        size = listing.objects[s["tar"]] if listing is not None else \
            os.path.getsize(os.path.join(base, s["tar"]))
        if "bytes" in s and size != s["bytes"]:
            raise UserError(f"{flag} {base}/{s['tar']}: {size} bytes but {MANIFEST} says {s['bytes']}: "
                            f"truncated or replaced; copy it again (`dali-ipmix verify {base}` checks "
                            f"every member)")
        found = index_count(_read(base, s["index"], flag, listing, byte_range="bytes=0-63"))
        if found != s["samples"]:
            raise UserError(f"{flag} {base}/{s['index']}: indexes {found} samples but {MANIFEST} says "
                            f"{s['samples']} for {s['tar']}; the shard set is mixed up: write it again "
                            f"with `dali-ipmix shard`")
    size = manifest.get("picture_size")
    return DataSource(location, "webdataset", flag, classes, sum(s["samples"] for s in shards),
                      root=base, shards=[f"{base}/{s['tar']}" for s in shards],
                      indices=[f"{base}/{s['index']}" for s in shards],
                      picture_size=tuple(size) if size else None)


def cls_label(cls):
    """int32 [1] label from a ``.cls`` member (decimal text, e.g. ``b"417"``), inside the graph:
    the last ``LABEL_DIGITS`` bytes, left-padded with "0", weighted by powers of ten."""
    import numpy as np
    from nvidia.dali import fn, types
    anchor = fn.cast(cls.shape(dtype=types.INT32) - LABEL_DIGITS, dtype=types.FLOAT)
    digits = fn.slice(cls, anchor, types.Constant(np.array([float(LABEL_DIGITS)], np.float32)),
                      axes=[0], normalized_anchor=False, normalized_shape=False,
                      out_of_bounds_policy="pad", fill_values=ord("0"))
    weights = types.Constant(np.array([10 ** (LABEL_DIGITS - 1 - k) for k in range(LABEL_DIGITS)],
                                      np.int32))
    value = fn.reductions.sum((fn.cast(digits, dtype=types.INT32) - ord("0")) * weights, axes=[0])
    return fn.reshape(fn.cast(value, dtype=types.INT32), shape=[1])   # as fn.readers.file's labels


def _wds_reader(src: DataSource, *, name, shard_id, num_shards, shuffle, seed, labelled,
                stick_to_shard):
    from nvidia.dali import fn
    kw = _shuffle_kw(src, num_shards, shuffle, seed)
    out = fn.readers.webdataset(
        paths=list(src.shards), index_paths=list(src.indices),
        ext=[PICTURE_MEMBERS] + ([LABEL_MEMBER] if labelled else []),
        missing_component_behavior="error", shard_id=shard_id, num_shards=num_shards,
        random_shuffle=shuffle, pad_last_batch=True, stick_to_shard=stick_to_shard, name=name, **kw)
    if not labelled:
        return (out[0] if isinstance(out, (list, tuple)) else out), None
    return out[0], cls_label(out[1])


# The formats, most specific first (the class-folder format claims whatever is left).
FORMATS: Dict[str, Format] = {
    "webdataset": Format(_wds_claim, _wds_open, _wds_reader),
    "folders": Format(_folders_claim, _folders_open, _folders_reader),
}


# ---------------------------------------------------------------------------------------------
# Samples one at a time (readers outside DALI: the evaluation's PIL datasets)

@dataclass(frozen=True)
class Sample:
    """Where one sample's picture lies: ``size`` bytes at ``offset`` of ``where`` (a local file or
    an ``s3://`` object; ``size`` -1: the whole file); ``name``: how messages call it (the file,
    or ``shard.tar:member``)."""
    name: str
    where: str
    offset: int = 0
    size: int = -1

    def read(self, flag: str = "--data") -> bytes:
        return read_bytes(self.where, self.offset, self.size, flag)


def split_member(name: str) -> Tuple[str, str]:
    """(sample key, extension) of a tar member, as WebDataset and DALI's ``wds2idx`` split it: at
    the first dot of the last path component (``a/b.seg.png`` -> ``a/b``, ``seg.png``)."""
    dot = name.find(".", name.rfind("/") + 1)
    return (name, "") if dot < 0 else (name[:dot], name[dot + 1:])


def index_entries(text: str) -> List[Dict[str, Tuple[int, int, str]]]:
    """The samples of a DALI index file (``v1.2 N``, then per sample ``ext offset size name``
    per member): one {extension: (offset, size, member name)} per sample."""
    out = []
    for line in text.splitlines()[1:]:
        parts = line.split()
        if parts:
            out.append({parts[k]: (int(parts[k + 1]), int(parts[k + 2]), parts[k + 3])
                        for k in range(0, len(parts) - 3, 4)})
    return out


def _read_all(spans, flag: str, on_s3: bool) -> List[bytes]:
    """Many small reads (``(where, offset, size)``); over S3 in parallel requests."""
    if not on_s3:
        return [read_bytes(w, o, n, flag) for w, o, n in spans]
    from concurrent.futures import ThreadPoolExecutor
    with ThreadPoolExecutor(s3.PARALLEL_READS) as pool:
        return list(pool.map(lambda span: read_bytes(*span, flag), spans))


def samples(src: DataSource) -> Tuple[List[Sample], List[int]]:
    """(pictures, labels) of a labelled source, one per sample in the source's order.  A shard
    set's labels are its ``.cls`` members, read here (over S3: one small ranged read each)."""
    if src.format == "folders":
        join = s3.join if src.on_s3 else os.path.join
        return [Sample(join(src.root, f), join(src.root, f)) for f in src.files], list(src.labels)
    pictures, spans = [], []
    for shard, index in zip(src.shards, src.indices):
        for entry in index_entries(read_bytes(index, flag=src.flag).decode()):
            picture = next((v for k, v in entry.items() if k in PICTURE_EXTENSIONS), None)
            if picture is None or LABEL_MEMBER not in entry:
                raise UserError(f"{src.flag} {index}: a sample without a picture or a .{LABEL_MEMBER} "
                                f"member; write the shard set again with `dali-ipmix shard`")
            pictures.append(Sample(f"{shard}:{picture[2]}", shard, picture[0], picture[1]))
            offset, size, _ = entry[LABEL_MEMBER]
            spans.append((shard, offset, size))
    texts = _read_all(spans, src.flag, src.on_s3)
    # digits only, as the graph reads them (``cls_label``): a "3\n" would read -8 there
    bad = next((i for i, t in enumerate(texts) if not t.isdigit()
                or int(t) >= len(src.classes)), None)
    if bad is not None:
        raise UserError(f"{src.flag} {spans[bad][0]}: label member of {pictures[bad].name} is "
                        f"{texts[bad][:12]!r}, not a class of its {MANIFEST}; list every bad member with "
                        f"`dali-ipmix verify {src.root}`")
    return pictures, [int(t) for t in texts]


# ---------------------------------------------------------------------------------------------
# Errors met mid-run

def local_folders(items) -> List[str]:
    """The local class or picture folders among ``items`` (sources, paths, None): where
    ``verify.explain_pipeline_error`` may look for a bad file (shard sets:
    ``verify.explain_shard_error``)."""
    return [str(x) for x in items if x is not None and not s3.is_s3(str(x))
            and (not isinstance(x, DataSource) or x.format == "folders")]
