"""``dali-ipmix verify``: find the files that would stop training (or that DALI quietly converts)
before a multi-day run meets them, and write a DALI file list of the usable ones.

DALI's reader and decoder stop the whole pipeline on the first file they cannot read, and for some
faults (garbage bytes, unsupported formats) the error does not even name the file.  Each file is
therefore fully decoded here with Pillow, in parallel, and sorted into one problem kind per fault
(``PROBLEMS``).  Whether a kind is fatal is what DALI 2.4's CPU decoder (``fn.decoders.image`` /
``image_random_crop`` with ``output_type=RGB``) does with such a file; tests/test_verify.py runs
the decoder on one file of each kind to keep these claims true.

``explain_pipeline_error`` turns the error DALI raises during ``pipe.run()`` about a bad file into a
one-line ``UserError``; ``readers.filelist_files`` reads a file list back as (files, labels).
"""
from __future__ import annotations

import argparse
import contextlib
import errno
import functools
import io
import json
import os
import re
import shlex
import tarfile
import time
import zlib
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, Iterable, List, NamedTuple, Optional, Sequence, Tuple

from . import s3, sources
from .data._io import pool_map, resolve_jobs
from .errors import UserError
from .outputs import check_output_file, write_atomic
from .progress import Progress, track
from .readers import (IMAGE_EXTENSIONS, LINK_LOOP, MAX_PIXELS, class_folder_files, picture_files,
                      special_kind, too_many_pixels, unreadable_reason)


class Kind(NamedTuple):
    fatal: bool
    effect: str  # what DALI does with such a file


# Every problem kind, checked against DALI 2.4's CPU decoder (tests/test_verify.py).
PROBLEMS: Dict[str, Kind] = {
    "empty": Kind(True, "zero bytes: the file reader stops ('File mapping failed: PATH')"),
    "unreadable": Kind(True, "cannot be opened or read (permissions, I/O error, broken link, "
                             "symbolic link loop): the file reader stops"),
    "not_image": Kind(True, "content is no image format: the decoder stops "
                            "('nvImageCodec failure', the file is not named)"),
    "unsupported_format": Kind(True, "an image format DALI cannot decode (e.g. GIF): the decoder stops "
                                     "('nvImageCodec failure', the file is not named)"),
    "too_large": Kind(True, "its header claims more pixels than --max-pixels (a decompression "
                            "bomb): never decoded here; the decoder would need GiBs and minutes, "
                            "or stop"),
    "truncated": Kind(True, "the image data ends early: the decoder stops ('Failed to decode sample')"),
    "corrupt": Kind(True, "the image data cannot be decoded: the decoder stops"),
    "format_mismatch": Kind(False, "content format differs from the extension (e.g. PNG named .jpg): "
                                   "decoded by content"),
    "cmyk": Kind(False, "CMYK: converted to RGB by the decoder"),
    "greyscale": Kind(False, "greyscale: copied to 3 channels by the decoder"),
    "palette": Kind(False, "palette colours: expanded to RGB by the decoder"),
    "alpha": Kind(False, "alpha channel: dropped by the decoder"),
    "other_colour": Kind(False, "another colour mode: converted to RGB by the decoder"),
    "wrong_extension": Kind(False, "extension is not an image type: the readers skip the file"),
    "outside_classes": Kind(False, "not inside a class folder: the class-folder reader skips the file"),
    "unlistable_name": Kind(False, "the name cannot go into a DALI file list (line break or "
                                   "leading/trailing space): left out of --write-filelist"),
    "not_regular": Kind(False, "a FIFO, socket or device under an image name: never opened, the "
                               "readers skip it"),
}
FATAL_KINDS = tuple(k for k, v in PROBLEMS.items() if v.fatal)

# Pillow format name -> extensions that name it among readers.IMAGE_EXTENSIONS; the keys are the
# formats DALI 2.4 decodes on the CPU (MPO is a JPEG with extra frames; JPEG 2000 and PNM decode
# but no reader extension names them, so they always count as mismatched).
DALI_FORMATS: Dict[str, Tuple[str, ...]] = {
    "JPEG": (".jpg", ".jpeg"), "MPO": (".jpg", ".jpeg"), "PNG": (".png",), "BMP": (".bmp",),
    "TIFF": (".tif", ".tiff"), "WEBP": (".webp",), "JPEG2000": (), "PPM": (),
}
# Pillow mode -> colour kind; RGB is clean, any other mode is "other_colour".
COLOUR_KINDS = {
    "CMYK": "cmyk", "1": "greyscale", "L": "greyscale", "I": "greyscale", "I;16": "greyscale",
    "I;16B": "greyscale", "I;16L": "greyscale", "F": "greyscale", "P": "palette",
    "RGBA": "alpha", "RGBa": "alpha", "LA": "alpha", "La": "alpha", "PA": "alpha",
}


@dataclass(frozen=True)
class Finding:
    """One file with problems: ``path`` relative to the data folder, its kinds, Pillow's words."""
    path: str
    kinds: Tuple[str, ...]
    detail: str = ""

    @property
    def fatal(self) -> bool:
        return any(PROBLEMS[k].fatal for k in self.kinds)


@dataclass
class Report:
    root: str
    mixing: bool
    files: List[str]            # what the reader would list (readers.class_folder_files / picture_files)
    labels: List[int]           # their labels (0 for mixing pictures)
    scanned: int                # every file under root
    findings: List[Finding]     # sorted by path

    def counts(self) -> Dict[str, int]:
        c = Counter(k for f in self.findings for k in f.kinds)
        return {k: c[k] for k in PROBLEMS if c[k]}

    @property
    def fatal(self) -> List[Finding]:
        return [f for f in self.findings if f.fatal]

    def good(self) -> Tuple[List[str], List[int]]:
        """(files, labels) the readers can train on: the listed files without fatal problems
        (warnings are decoded fine) and with names a DALI file list can hold."""
        drop = {f.path for f in self.findings if f.fatal or "unlistable_name" in f.kinds}
        keep = [(p, l) for p, l in zip(self.files, self.labels) if p not in drop]
        return [p for p, _ in keep], [l for _, l in keep]

    def to_json(self) -> dict:
        return {"root": self.root, "layout": "mixing" if self.mixing else "class_folders",
                "scanned": self.scanned, "listed": len(self.files), "good": len(self.good()[0]),
                "counts": self.counts(), "fatal_kinds": list(FATAL_KINDS),
                "problems": [dict(asdict(f), fatal=f.fatal) for f in self.findings]}


# ---------------------------------------------------------------------------------------------------
# Checking one file
@contextlib.contextmanager
def _strict_pillow():
    """Pillow as strict as DALI: no silently padded truncated images, and no size limit of its
    own (``check_image`` applies --max-pixels to the header's size before decoding).  Both are
    process globals, so they are restored afterwards."""
    from PIL import Image, ImageFile
    saved = ImageFile.LOAD_TRUNCATED_IMAGES, Image.MAX_IMAGE_PIXELS
    ImageFile.LOAD_TRUNCATED_IMAGES, Image.MAX_IMAGE_PIXELS = False, None
    try:
        yield Image
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES, Image.MAX_IMAGE_PIXELS = saved


def _listable(name: str) -> bool:
    # DALI's file_list: one "name label" per line; names may hold inner spaces, not trailing ones.
    return not any(c in name for c in "\n\r") and name == name.strip()


def _identify(Image, data: bytes) -> Optional[str]:
    """Pillow's format name of ``data``, or None for no image format."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            return im.format
    except Exception:
        return None


def _decode_failure(e: Exception, where: str) -> Tuple[Tuple[str, ...], str]:
    msg = str(e).splitlines()[0] if str(e) else type(e).__name__
    return ("truncated" if "truncated" in msg.lower() else "corrupt",), f"{where}: {msg}"


# DALI's codecs parse the container themselves before decoding, more strictly than Pillow (which
# skips stray bytes between JPEG markers and does not check PNG checksums).
SOF_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}   # ITU-T T.81 table B.1
JPEG_SOS, PNG_SIGNATURE = 0xDA, b"\x89PNG\r\n\x1a\n"


def _jpeg_header_problem(data: bytes) -> Optional[Tuple[str, str]]:
    """Walk the JPEG header segments from SOI to the first scan as DALI's JPEG parser does: each
    segment starts with 0xFF (fill 0xFF bytes allowed) and a non-zero marker code, a frame header
    (SOF) with at most 4 components comes before the scan (SOS)."""
    pos, frame = 2, False
    while True:
        if pos >= len(data):
            return "truncated", "JPEG header ends before the scan"
        if data[pos] != 0xFF:
            return "corrupt", f"JPEG header: stray byte 0x{data[pos]:02x} at offset {pos} instead of a marker"
        while pos < len(data) and data[pos] == 0xFF:
            pos += 1
        if pos + 3 > len(data):
            return "truncated", "JPEG header ends before the scan"
        marker = data[pos]
        if marker == 0:
            return "corrupt", f"JPEG header: invalid marker 0xff00 at offset {pos - 1}"
        if marker == JPEG_SOS:
            return None if frame else ("corrupt", "JPEG header: no frame header (SOF) before the scan")
        length = int.from_bytes(data[pos + 1:pos + 3], "big")
        if marker in SOF_MARKERS:
            frame = True
            if pos + 9 > len(data):
                return "truncated", "JPEG header ends in the frame header"
            if data[pos + 8] > 4:
                return "corrupt", f"JPEG frame header: {data[pos + 8]} components (at most 4)"
        pos += 1 + length


def _png_chunk_problem(data: bytes) -> Optional[Tuple[str, str]]:
    """Walk the PNG chunks to IEND as DALI's PNG parser does, and check the CRC of every critical
    chunk, which libpng treats as an error (a bad ancillary chunk is only dropped)."""
    pos = len(PNG_SIGNATURE)
    while True:
        if pos + 8 > len(data):
            return "truncated", "PNG ends before the IEND chunk"
        length = int.from_bytes(data[pos:pos + 4], "big")
        kind = data[pos + 4:pos + 8]
        end = pos + 8 + length
        if end + 4 > len(data):
            return "truncated", f"PNG ends inside the {kind.decode('latin-1')} chunk"
        critical = kind[:1].isupper()
        if critical and zlib.crc32(data[pos + 4:end]) != int.from_bytes(data[end:end + 4], "big"):
            return "corrupt", f"PNG: bad checksum of the {kind.decode('latin-1')} chunk"
        if kind == b"IEND":
            return None
        pos = end + 4


def check_image(data: bytes, ext: str, max_pixels: int = MAX_PIXELS) -> Tuple[Tuple[str, ...], str]:
    """(problem kinds, detail) of the bytes of a file the reader lists; ``()`` when clean.  The
    header's size is checked before anything is decoded, so a decompression bomb costs nothing."""
    if not data:
        return ("empty",), "0 bytes"
    with _strict_pillow() as Image:
        try:
            im = Image.open(io.BytesIO(data))
        except Image.UnidentifiedImageError:
            return ("not_image",), f"{len(data)} bytes, no image format recognised"
        except Exception as e:  # a known format whose header is cut or broken
            return _decode_failure(e, "header")
        with im:
            fmt, mode = im.format, im.mode
            if fmt not in DALI_FORMATS:
                return ("unsupported_format",), f"{fmt} content"
            too_large = too_many_pixels(im.size, max_pixels)
            if too_large:
                return ("too_large",), too_large
            structure = (_jpeg_header_problem(data) if fmt in ("JPEG", "MPO") else
                         _png_chunk_problem(data) if fmt == "PNG" else None)
            if structure:
                return (structure[0],), structure[1]
            try:
                im.load()
            except Exception as e:  # Pillow raises OSError, SyntaxError, zlib/struct errors...
                return _decode_failure(e, fmt)
            if fmt == "PNG" and "transparency" in im.info and mode in ("P", "L", "RGB"):
                mode = {"P": "PA", "L": "LA", "RGB": "RGBA"}[mode]   # tRNS chunk: alpha as well
    kinds = []
    details = []
    if ext not in DALI_FORMATS[fmt]:
        kinds.append("format_mismatch")
        details.append(f"{fmt} content")
    if mode != "RGB":
        kinds.append(COLOUR_KINDS.get(mode, "other_colour"))
        details.append(f"mode {mode}")
    return tuple(kinds), ", ".join(details)


def check_file(root: str, item: Tuple[str, bool], max_pixels: int = MAX_PIXELS) -> Optional[Finding]:
    """The problems of file ``item = (relative path, listed by the reader)``; None when clean.
    Files the reader skips are only identified (what would be lost), not decoded."""
    rel, listed = item
    path = os.path.join(root, rel)
    kinds: List[str] = [] if _listable(rel) else ["unlistable_name"]
    special = special_kind(path)
    if special:                  # opening a FIFO would wait for a writer forever
        return Finding(rel, tuple(kinds) + ("not_regular",), special)
    try:
        with open(path, "rb") as fh:
            data = fh.read() if listed else fh.read(1 << 16)
    except OSError as e:
        why = (LINK_LOOP if e.errno == errno.ELOOP else "broken link" if os.path.islink(path)
               else e.strerror or type(e).__name__)
        return Finding(rel, ("unreadable",), why)
    return _classify(rel, data, listed, kinds, max_pixels)


def _classify(rel: str, data: bytes, listed: bool, kinds: List[str], max_pixels: int) -> Optional[Finding]:
    """The Finding of a file's bytes (all of them when the reader lists it, else its first 64 kB,
    only identified); ``kinds``: what its name alone showed."""
    ext = os.path.splitext(rel)[1].lower()
    if listed:
        found, detail = check_image(data, ext, max_pixels)
    else:
        with _strict_pillow() as Image:
            fmt = _identify(Image, data)
        skipped = "wrong_extension" if ext not in IMAGE_EXTENSIONS else "outside_classes"
        found, detail = (skipped,), (f"{fmt} content" if fmt else "no image content")
    kinds = list(kinds) + list(found)
    return Finding(rel, tuple(kinds), detail) if kinds else None


HEAD_BYTES = 1 << 16        # what is read of a file the readers skip, to identify it
S3_REQUESTS = s3.PARALLEL_READS   # parallel object reads of `verify s3://...` (default of its --jobs)


def s3_requests(jobs: Optional[int]) -> int:
    """Parallel requests over S3 for ``--jobs`` (verify, shard): ``S3_REQUESTS`` when left out;
    below 1 refused as for local work; above the client's connection pool
    (``s3.MAX_CONNECTIONS``) refused, since the extra threads would only wait for a connection."""
    if jobs is None:
        return S3_REQUESTS
    resolve_jobs(jobs)
    if jobs > s3.MAX_CONNECTIONS:
        raise UserError(f"--jobs {jobs}: at most {s3.MAX_CONNECTIONS} parallel requests over S3")
    return int(jobs)


def check_object(root: str, item: Tuple[str, bool, int], max_pixels: int = MAX_PIXELS,
                 flag: str = "DATA_DIR") -> Tuple[Optional[Finding], bytes]:
    """``check_file`` for an object under the ``s3://`` prefix ``root``: ``item`` = (key relative
    to the prefix, listed by the reader, size from the listing); returns (finding, the bytes
    read) so that a caller may keep the picture it checked.  An object that cannot be read
    (deleted since the listing, access denied) is ``unreadable``, as a local file would be."""
    rel, listed, size = item
    kinds: List[str] = [] if _listable(rel) else ["unlistable_name"]
    try:      # an empty object: nothing to fetch (a range of it would be refused, HTTP 416)
        data = b"" if size == 0 else sources.read_bytes(
            s3.join(root, rel), 0, -1 if listed else min(size, HEAD_BYTES), flag)
    except UserError as e:
        return Finding(rel, ("unreadable",), str(e).split(": ", 1)[-1]), b""
    return _classify(rel, data, listed, kinds, max_pixels), data


def check_objects(root: str, items: Sequence[Tuple[str, bool, int]], requests: Optional[int] = None,
                  max_pixels: int = MAX_PIXELS, flag: str = "DATA_DIR"):
    """``check_object`` of each item, in order, over ``requests`` threads (default
    ``S3_REQUESTS``) a bounded window ahead of the caller.  Threads, not processes: the time goes
    to waiting on the requests, and Pillow decodes without holding the GIL; the strict Pillow
    settings are process globals, set once around the threads rather than per file."""
    import collections
    from concurrent.futures import ThreadPoolExecutor
    requests = requests or S3_REQUESTS
    items = iter(items)
    with _strict_pillow(), ThreadPoolExecutor(requests) as pool:
        pending = collections.deque()
        try:
            for item in items:
                pending.append(pool.submit(check_object, root, item, max_pixels, flag))
                if len(pending) >= 4 * requests:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:
            for future in pending:
                future.cancel()


# ---------------------------------------------------------------------------------------------------
# Scanning a folder
def _all_files(root: Path) -> List[str]:
    # os.walk without following links, as the readers list files
    return sorted(str(Path(d, n).relative_to(root)) for d, _, names in os.walk(root) for n in names)


def scan(root, *, mixing: bool = False, jobs: Optional[int] = None,
         max_pixels: int = MAX_PIXELS) -> Report:
    """Check every file under ``root`` (a class-folder data set, or with ``mixing`` a folder of
    mixing pictures) over ``jobs`` processes."""
    root = Path(root)
    if mixing:
        files = picture_files(root, flag="DATA_DIR", keep_loops=True)
        labels = [0] * len(files)
    else:
        files, labels, classes = class_folder_files(root, flag="DATA_DIR", keep_loops=True)
        if set(classes) <= {"train", "val"}:   # a data-set root given instead of one split
            raise UserError(f"DATA_DIR {root}: holds {' and '.join(c + '/' for c in classes)} rather than "
                            f"class folders; verify each split: `dali-ipmix verify {root / classes[0]}`")
    listed = set(files)
    everything = _all_files(root)
    results = pool_map(functools.partial(check_file, str(root), max_pixels=max_pixels),
                       [(rel, rel in listed) for rel in everything], jobs=jobs, progress="verify")
    return Report(str(root), mixing, files, labels, len(everything), [f for f in results if f])


def scan_s3(listing: s3.Listing, *, mixing: bool = False, requests: Optional[int] = None,
            max_pixels: int = MAX_PIXELS) -> Report:
    """``scan`` of the class folders (or mixing pictures) under an ``s3://`` prefix, from its one
    listing: every object is downloaded (the pictures whole, the others' first 64 kB) and checked
    as a local file is (``check_objects``: ``requests`` parallel reads)."""
    uri = listing.uri
    files, labels, classes = sources.s3_folder_files(listing, labelled=not mixing)
    if mixing:
        labels = [0] * len(files)
    elif not classes:
        raise UserError(f"DATA_DIR {uri}: no class prefixes with pictures; expected {uri}/<class>/<image>.jpg "
                        f"(a folder of mixing pictures: add --mixing)")
    elif set(classes) <= {"train", "val"}:
        raise UserError(f"DATA_DIR {uri}: holds {' and '.join(c + '/' for c in classes)} rather than "
                        f"class folders; verify each split: `dali-ipmix verify {uri}/{classes[0]}`")
    listed = set(files)
    everything = sorted(k for k in listing.objects if not k.endswith("/"))   # no folder markers
    findings = []
    checked = check_objects(uri, [(rel, rel in listed, listing.objects[rel]) for rel in everything],
                            requests, max_pixels)
    for finding, _ in track(checked, "verify", len(everything)):
        if finding is not None:
            findings.append(finding)
    return Report(uri, mixing, files, labels, len(everything), findings)


# ---------------------------------------------------------------------------------------------------
# File lists
def write_filelist(path, files: Sequence[str], labels: Sequence[int], overwrite: bool = False) -> Path:
    """Write a DALI ``file_list`` (``relative/path label`` per line; paths relative to the data
    folder, given to the reader as ``file_root``).  Written to a temporary file and renamed, so an
    interrupted run never leaves half a list."""
    path = check_output_file(path, "--write-filelist", overwrite)
    return write_atomic(path, "".join(f"{f} {int(l)}\n" for f, l in zip(files, labels)))


# ---------------------------------------------------------------------------------------------------
# DALI errors about bad files
# What DALI 2.4 raises (RuntimeError from pipe.run() and from DALIGenericIterator alike):
#   decoder, data ends early:   "Failed to decode sample #3 : c1/x.jpg"  (source_info: relative path)
#   file reader, 0-byte/missing/broken link: "File mapping failed: /abs/c1/x.jpg"
#   decoder, garbage or unsupported format:  "nvImageCodec failure: '#4'"  (no file named)
# and the benchmark's PIL reference row: "PIL could not read /abs/c1/x.jpg\n(OSError: ...)".
_NAMED = (re.compile(r"Failed to decode sample #\d+ ?: ?(?P<path>[^\n]+)"),
          re.compile(r"File mapping failed: (?P<path>[^\n]+)"),
          re.compile(r"(?:Could not open file|Failed to open file)(?: for buffered read)?:? (?P<path>[^\n]+)"),
          re.compile(r"PIL could not read (?P<path>[^\n]+)\n\((?P<why>[^\n]+)\)"))
_UNNAMED = re.compile(r"nvImageCodec failure: '#\d+'|Failed to decode|Could not decode")


def verify_command(folder, mixing: bool = False) -> str:
    mixing_flag = " --mixing" if mixing else ""
    return f"`dali-ipmix verify {shlex.quote(str(folder))}{mixing_flag} --write-filelist good.txt`"


# Who met the bad file: (what stopped, the command to rerun, its data / mixing file-list flags;
# None: the command takes no file list, so the bad files have to leave the folder).
USES = {"train": ("training", "train", "--train-filelist / --val-filelist", "--mixing-filelist"),
        "bench": ("the benchmark", "rerun dali-ipmix bench", "--data-filelist", "--mixing-filelist"),
        "preview": ("the preview", "rerun dali-ipmix preview", None, None),
        "stages": ("dali-ipmix stages", "rerun dali-ipmix stages", None, None),
        "graph": ("dali-ipmix graph --stats", "rerun dali-ipmix graph --stats", None, None),
        "eval": ("the evaluation", "rerun dali-ipmix eval", None, None)}


def skip_hint(folder, mixing: bool = False, use: str = "train") -> str:
    _, rerun, data_flag, mixing_flag = USES[use]
    flag = mixing_flag if mixing else data_flag
    if flag is None:
        command = verify_command(folder, mixing).replace(" --write-filelist good.txt", "")
        return f"list every bad file with {command}, move them out of the folder, then {rerun}"
    return f"skip bad files with {verify_command(folder, mixing)}, then {rerun} with {flag} good.txt"


def _locate(name: str, folders: Sequence[Path]) -> Tuple[Path, Optional[Path]]:
    """(the file, the data folder holding it) for a path DALI reported: absolute (file reader) or
    relative to the reader's ``file_root`` (decoder's source_info) or to the working folder."""
    p = Path(name)
    candidates = [p] if p.is_absolute() else [f / p for f in folders] + [p.absolute()]
    for c in candidates:
        for f in folders:
            if c.is_relative_to(f) and (p.is_absolute() or c.exists() or c.is_symlink()):
                return c, f
    return p, None


def _folders(dirs) -> List[Path]:
    dirs = [dirs] if isinstance(dirs, (str, os.PathLike)) else list(dirs)
    return [Path(d).absolute() for d in dirs]


def find_bad_file(data_dirs: Iterable, mixing_dirs: Iterable = (), limit: int = 20000,
                  max_pixels: int = MAX_PIXELS):
    """(folder, first fatal Finding, is_mixing) among folders of at most ``limit`` files in all,
    or None (nothing fatal, or too many files to scan while the user waits)."""
    dirs = [(d, False) for d in _folders(data_dirs)] + [(d, True) for d in _folders(mixing_dirs)]
    if sum(len(_all_files(d)) for d, _ in dirs if d.is_dir()) > limit:
        return None
    for folder, is_mixing in dirs:
        fatal = scan(folder, mixing=is_mixing, max_pixels=max_pixels).fatal
        if fatal:
            return folder, fatal[0], is_mixing
    return None


# At most this many files are scanned to name a bad file DALI did not name (about 450 files/s per
# core: under a minute), before the error falls back to naming the folders.
SEARCH_LIMIT = 20000


def explain_pipeline_error(exc: BaseException, data_dirs: Iterable, mixing_dirs: Iterable = (),
                           search_limit: int = 0, use: str = "train",
                           max_pixels: int = MAX_PIXELS) -> Optional[UserError]:
    """A one-line ``UserError`` for a DALI error about a bad data file (naming the file when DALI
    does, else the folders), or None when ``exc`` is not about a data file.  ``data_dirs`` are the
    class-folder roots, ``mixing_dirs`` the mixing-picture folders of the pipeline.  When DALI does
    not name the file and the folders hold at most ``search_limit`` files, they are scanned
    (``scan``) to name it.  ``use``: a key of ``USES``, whose flags the hint names; a named file
    whose header claims more than ``max_pixels`` pixels is said to be too large."""
    text = str(exc)
    stopped, rerun, data_flag, mixing_flag = USES[use]
    mixing = _folders(mixing_dirs)
    folders = _folders(data_dirs) + mixing
    for pattern in _NAMED:
        m = pattern.search(text)
        if m:
            name = m.group("path").strip()
            path, folder = _locate(name, folders)
            words = m.groupdict().get("why") or f"DALI: {m.group(0).strip()}"
            why = unreadable_reason(path, words, max_pixels) if folder else words
            hint = skip_hint(folder if folder else "DIR", folder in mixing, use)
            return UserError(f"{path}: {stopped} stopped on this file, {why}; {hint}")
    m = _UNNAMED.search(text)
    if m is None:
        return None
    if search_limit:
        found = find_bad_file(data_dirs, mixing_dirs, search_limit, max_pixels)
        if found is not None:
            folder, finding, is_mixing = found
            return UserError(f"{folder / finding.path}: {stopped} stopped on this file "
                             f"({', '.join(finding.kinds)}: {finding.detail or m.group(0)}; found by "
                             f"scanning the data after DALI's '{m.group(0)}'); "
                             f"{skip_hint(folder, is_mixing, use)}")
    commands = " and ".join(verify_command(f, f in mixing) for f in folders) or verify_command("DIR")
    if data_flag is None:
        return UserError(f"DALI could not decode a data file and does not say which ({m.group(0)}); "
                         f"find it with {commands.replace(' --write-filelist good.txt', '')}, move it "
                         f"out of the folder, then {rerun}")
    return UserError(f"DALI could not decode a data file and does not say which ({m.group(0)}); "
                     f"find and skip it with {commands}, then {rerun} with {data_flag} / "
                     f"{mixing_flag}")


# ---------------------------------------------------------------------------------------------------
# The command
# DALI's webdataset reader names a sample "<shard.tar>:<offset>:<member>" in its errors
_BAD_INDEX = re.compile(r'Malformed index file at "(?P<index>[^"]+)" line (?P<line>\d+)')
_MEMBER = re.compile(r"(?P<shard>[^\s'\"]+\.tar):(?P<offset>\d+):(?P<member>[^\s'\"]+)")


def explain_shard_error(exc: BaseException, data: Sequence, search_limit: int = 0) -> Optional[UserError]:
    """A one-line ``UserError`` for a DALI error about a shard member (corrupt, truncated),
    naming the shard, the member and the command that lists every bad member; None when the
    error is not about a shard set's member.  DALI names the member when the data ends early
    ("shard.tar:offset:member"); for undecodable bytes it does not, and local shard sets of at
    most ``search_limit`` samples are then checked (``scan_shards``) to name it."""
    shard_sets = [s for s in data if isinstance(s, sources.DataSource) and s.format == "webdataset"]
    if not shard_sets:
        return None
    text = str(exc)
    hint = "write the shards again with `dali-ipmix shard ... --overwrite` (bad pictures are left out)"
    bad_index = _BAD_INDEX.search(text)
    if bad_index is not None:        # the tar is shorter than its index says
        return UserError(f"{bad_index.group('index')}, line {bad_index.group('line')}: points past the "
                         f"end of its shard (truncated); list every bad shard with `dali-ipmix verify "
                         f"{shard_sets[0].root}`, then copy the shard set again or {hint}")
    m = _MEMBER.search(text)
    if m is not None:
        owner = next((s for s in shard_sets if m.group("shard") in s.shards), shard_sets[0])
        return UserError(f"{m.group('shard')}, member {m.group('member')}: reading stopped on this "
                         f"member (DALI: {_first_error_line(text)}); list every bad member with "
                         f"`dali-ipmix verify {owner.root}`, then {hint}")
    unnamed = _UNNAMED.search(text)
    if unnamed is None:
        return None
    for s in shard_sets:
        if not s.on_s3 and s.size <= search_limit:
            problems = scan_shards(s.root)
            if problems:
                return UserError(f"{s.root}/{problems[0]}: reading stopped on this member (found by "
                                 f"checking the shards after DALI's '{unnamed.group(0)}'); list every "
                                 f"bad member with `dali-ipmix verify {s.root}`, then {hint}")
    if any(not isinstance(s, sources.DataSource) or s.format != "webdataset" for s in data if s is not None):
        return None          # it may be a class folder's file: verify.explain_pipeline_error's turn
    commands = " and ".join(f"`dali-ipmix verify {s.root}`" for s in shard_sets)
    return UserError(f"DALI could not decode a shard member and does not say which ({unnamed.group(0)}); "
                     f"list every bad member with {commands}, then {hint}")


def _first_error_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    pick = next((line for line in lines if _MEMBER.search(line)), lines[-1] if lines else "")
    return pick[:200]


# ---------------------------------------------------------------------------------------------
# Checking a shard set (dali-ipmix verify SHARD_DIR)

def _open_tar(base: str, entry: dict, listing) -> tarfile.TarFile:
    """A shard to read front to back: a local file, or over S3 the object streamed in one
    request (one read of each shard, not two ranged reads per sample)."""
    if listing is None:
        return tarfile.open(os.path.join(base, entry["tar"]), "r:")
    if entry["tar"] not in listing.objects:
        raise FileNotFoundError(f"no object {s3.join(base, entry['tar'])}")
    return tarfile.open(fileobj=s3.open_object(s3.join(base, entry["tar"]), "DATA_DIR"), mode="r|")


def _scan_shard(base: str, entry: dict, listing, classes: Sequence[str], bar) -> List[str]:
    """The problems of one shard of a set (see ``scan_shards``)."""
    problems, seen, labels = [], {}, {}
    try:
        with _open_tar(base, entry, listing) as tar:
            for member in tar:
                if not member.isfile():
                    continue
                key, ext = sources.split_member(member.name)
                data = tar.extractfile(member).read()
                if len(data) != member.size:
                    raise tarfile.ReadError(f"{member.name} ends early")
                if ext == sources.LABEL_MEMBER:     # read by the graph as it is: digits only
                    labels[key] = data
                    if not data.isdigit() or int(data) >= len(classes):
                        problems.append(f"{entry['tar']}, {member.name}: bad label {data[:12]!r}")
                    continue
                if ext not in sources.PICTURE_EXTENSIONS:
                    continue          # other members (.json, ...): the readers skip them
                seen[key] = member.name
                kinds, detail = check_image(data, "." + ext)
                if any(PROBLEMS[k].fatal for k in kinds):
                    problems.append(f"{entry['tar']}, {member.name}: {', '.join(kinds)}"
                                    + (f" ({detail})" if detail else ""))
                bar.update()
    except (tarfile.TarError, OSError, EOFError) as e:
        return problems + [f"{entry['tar']}: truncated or corrupt tar ({e})"]
    if classes:
        problems += [f"{entry['tar']}, {seen[k]}: no .cls member" for k in seen if k not in labels]
    if len(seen) != entry["samples"]:
        problems.append(f"{entry['tar']}: {len(seen)} pictures, the manifest says {entry['samples']}")
    return problems


def scan_shards(base, listing: Optional[s3.Listing] = None, jobs: Optional[int] = None) -> List[str]:
    """Problems of a shard set (a local folder or an ``s3://`` prefix, whose ``listing`` may be
    given), one line each (``shard, member: kinds``): members that stop training (verify's
    picture checks), bad labels, missing members, truncated tars.  ``jobs`` shards are read at
    once, in threads (Pillow decodes without holding the GIL; the strict Pillow settings, process
    globals, are set once around them); the lines come in the manifest's shard order."""
    from concurrent.futures import ThreadPoolExecutor
    base = str(base).rstrip("/") if s3.is_s3(base) else str(base)
    if listing is None and s3.is_s3(base):
        listing = s3.list_prefix(base, "DATA_DIR")
    manifest = sources.read_manifest(base, "DATA_DIR", listing)
    classes = manifest.get("classes") or ()
    shards = manifest["shards"]
    with _strict_pillow(), Progress("verify shards", manifest["samples"]) as bar, \
            ThreadPoolExecutor(min(s3_requests(jobs) if s3.is_s3(base) else resolve_jobs(jobs),
                                   len(shards))) as pool:
        per_shard = list(pool.map(lambda entry: _scan_shard(base, entry, listing, classes, bar), shards))
    return [line for lines in per_shard for line in lines]


def is_shard_set(path) -> bool:
    return os.path.isfile(os.path.join(str(path), sources.MANIFEST))


def verify_shards(base, listing: Optional[s3.Listing] = None, json_out=None, jobs: Optional[int] = None) -> int:
    """``dali-ipmix verify SHARD_DIR``: print every problem (and write them to ``json_out``);
    exit code 1 if any."""
    start = time.perf_counter()
    problems, manifest = [], {}
    try:        # what training checks when it opens the set: index files, sizes, counts
        manifest = sources.read_manifest(str(base).rstrip("/"), "DATA_DIR", listing)
        sources.open_source(base, flag="DATA_DIR", labelled=bool(manifest.get("classes")),
                            listing=listing)
    except UserError as e:
        problems.append(str(e))
    problems += scan_shards(base, listing, jobs)
    print(f"verify {base} (shard set): {len(problems)} problem(s), {time.perf_counter() - start:.1f} s")
    for line in problems:
        print(f"  FATAL {line}")
    if problems:
        upload = " and upload it again" if s3.is_s3(base) else ""
        if manifest.get("made_by") == "dali-ipmix shard --index":    # no source folders to write from
            print("result: training stops on these; write the bad shards again with the tool that made "
                  f"them, then `dali-ipmix shard --index DIR --overwrite`{upload}")
        else:
            print("result: training stops on these; write the shard set again from the source folders "
                  f"with `dali-ipmix shard SRC OUT --overwrite` (bad pictures are left out){upload}")
    else:
        print("result: no fatal problems")
    if json_out:
        write_atomic(json_out, json.dumps({"root": str(base), "layout": "shards", "problems": problems},
                                          indent=1))
    return 1 if problems else 0


def format_report(report: Report, took: float, workers: str, max_shown: int = 50) -> str:
    counts = report.counts()
    fatal = {k: n for k, n in counts.items() if PROBLEMS[k].fatal}
    warn = {k: n for k, n in counts.items() if not PROBLEMS[k].fatal}
    layout = "mixing pictures" if report.mixing else "class folders"
    good = len(report.good()[0])
    lines = [f"verify {report.root} ({layout}): {report.scanned} files, {len(report.files)} listed by "
             f"the reader, {good} usable; {workers}, {took:.1f} s"]
    for title, group in (("fatal (training stops on these)", fatal),
                         ("warnings (DALI decodes or skips these; nothing stops)", warn)):
        if group:
            lines.append(f"{title}:")
            lines += [f"  {k:<18} {n:>7}  {PROBLEMS[k].effect}" for k, n in group.items()]
    shown: Counter = Counter()   # warnings listed per (first) kind; fatal files are always listed
    listing = []
    hidden = 0
    for f in report.findings:
        shown[f.kinds[0]] += not f.fatal
        if max_shown and shown[f.kinds[0]] > max_shown:
            hidden += 1
            continue
        listing.append(f"  {'FATAL' if f.fatal else 'warn ':<5} {f.path}  {', '.join(f.kinds)}"
                       + (f" ({f.detail})" if f.detail else ""))
    if listing:
        lines.append("files:")
        lines += listing
        if hidden:
            lines.append(f"  ... {hidden} more warnings (--max-shown 0 lists all, --json FILE writes all)")
    if fatal:
        lines.append(f"result: {len(report.fatal)} file(s) would stop training; "
                     f"{skip_hint(report.root, report.mixing)}")
    else:
        lines.append("result: no fatal problems")
    return "\n".join(lines)


def _run(args: argparse.Namespace) -> int:
    resolve_jobs(args.jobs)
    for flag, value, least in (("--max-shown", args.max_shown, 0), ("--max-pixels", args.max_pixels, 1)):
        if value is not None and value < least:
            raise UserError(f"{flag} must be >= {least}, got {value}"
                            + (" (0 lists all)" if flag == "--max-shown" else ""))
    for flag, target in (("--write-filelist", args.write_filelist), ("--json", args.json)):
        if target:                                   # refuse before the long scan
            check_output_file(target, flag, args.overwrite)
    # one listing of an s3:// prefix, for telling a shard set from class folders and for the scan
    listing = s3.list_prefix(args.data_dir, "DATA_DIR") if s3.is_s3(args.data_dir) else None
    if sources.MANIFEST not in (listing.objects if listing else ()) and \
            not is_shard_set(args.data_dir) and sources._holds_tars_only(args.data_dir, listing):
        raise sources._no_manifest(args.data_dir, "DATA_DIR")
    if sources.MANIFEST in listing.objects if listing else is_shard_set(args.data_dir):
        if args.write_filelist:   # `dali-ipmix shard` output: check its members
            raise UserError(f"--write-filelist: {args.data_dir} is a shard set, and a file list applies to "
                            f"class folders; bad pictures are left out by writing the shard set again "
                            f"with `dali-ipmix shard SRC OUT --overwrite`")
        return verify_shards(listing.uri if listing else args.data_dir, listing, args.json, args.jobs)
    start = time.perf_counter()
    if listing is not None:
        requests = s3_requests(args.jobs)
        report = scan_s3(listing, mixing=args.mixing, requests=requests, max_pixels=args.max_pixels)
        workers = f"{min(requests, report.scanned)} parallel requests"
    else:
        report = scan(args.data_dir, mixing=args.mixing, jobs=args.jobs, max_pixels=args.max_pixels)
        workers = f"{min(resolve_jobs(args.jobs), report.scanned)} jobs"
    print(format_report(report, time.perf_counter() - start, workers, max_shown=args.max_shown))
    flag, target = "--write-filelist", args.write_filelist
    try:
        if target:
            files, labels = report.good()
            write_filelist(target, files, labels, overwrite=args.overwrite)
            print(f"file list: {len(files)} files -> {target}")
        flag, target = "--json", args.json
        if target:
            write_atomic(target, json.dumps(report.to_json(), indent=1))
    except OSError as e:          # checked beforehand; the disk can still fill up meanwhile
        raise UserError(f"{flag} {target}: writing it failed ({e.strerror or e}); the report above "
                        f"is complete, nothing was left half-written") from None
    return 1 if report.fatal else 0


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "verify", help="check a data set for files that would stop training; write a list of the good ones",
        description="Decode every file of a class-folder data set (DIR/<class>/<image>) or, with --mixing, "
                    "a folder of mixing pictures, in parallel. Reports truncated, unreadable, empty, "
                    "non-image and unsupported files (fatal: DALI stops on them) and CMYK, greyscale, "
                    "palette, alpha, misnamed files (warnings: DALI converts or skips them). "
                    "Exit code 0 without fatal problems, 1 with. Nothing is deleted.")
    p.add_argument("data_dir", metavar="DATA_DIR", help="class-folder data set (e.g. imagenet/train), "
                   "or a shard set written by `dali-ipmix shard` (every member is checked); local or "
                   "s3://BUCKET/PREFIX (listed once, every object downloaded and checked)")
    p.add_argument("--mixing", action="store_true", help="DATA_DIR is a (flat or nested) mixing-picture folder")
    p.add_argument("--jobs", type=int, default=None, help="worker processes (default: one per CPU); "
                   f"for s3:// class folders, parallel requests (default {S3_REQUESTS}); for a shard "
                   "set, shards read at once")
    p.add_argument("--write-filelist", metavar="FILE", default=None,
                   help="write a DALI file list ('relative/path label' lines) of the usable files")
    p.add_argument("--json", metavar="FILE", default=None, help="write the full report as JSON")
    p.add_argument("--overwrite", action="store_true", help="replace existing --write-filelist / --json files")
    p.add_argument("--max-pixels", type=int, default=MAX_PIXELS, metavar="N",
                   help="pictures whose header claims more pixels are fatal (too_large), never "
                   "decoded (default: Pillow's limit, %(default)s)")
    p.add_argument("--max-shown", type=int, default=50, metavar="N",
                   help="list at most N files per warning kind (0: all; fatal files are always listed)")
    p.set_defaults(func=_run)
