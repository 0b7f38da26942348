"""Output paths of the commands, checked before any work starts, and written so that a failure
leaves nothing half-written: a result that took minutes must not die on a path that cannot take
it, and a file the user already has is replaced only with ``--overwrite``."""
from __future__ import annotations

import contextlib
import os
import secrets
import tempfile
from pathlib import Path
from typing import BinaryIO, Iterator, Union

from .errors import UserError

PathLike = Union[str, os.PathLike]


def _probe(folder: Path, flag: str, target: PathLike) -> None:
    try:
        tempfile.NamedTemporaryFile(dir=folder, prefix=".write-test-").close()
    except OSError as e:
        raise UserError(f"{flag} {target}: cannot write into {folder} ({e.strerror or e}); choose "
                        f"another place") from None


def check_output_file(path: PathLike, flag: str, overwrite: bool = False) -> Path:
    """Refuse a folder, an existing file without ``overwrite``, a missing folder and a folder that
    cannot be written into.  One rule for every command: an output file goes into a folder that
    exists (a mistyped folder is not created); an output folder (--out DIR) is created."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{flag} {path} is a folder; give a file name")
    if path.exists() and not overwrite:
        raise UserError(f"{flag} {path}: file exists; pass --overwrite or choose another name")
    folder = path.parent
    if not folder.is_dir():
        raise UserError(f"{flag} {path}: the folder {folder} does not exist; create it or "
                        f"choose another place")
    _probe(folder, flag, path)
    return path


def check_folder_can_be_made(folder: PathLike, flag: str) -> Path:
    """A missing output folder that the command creates when it writes: its nearest existing
    ancestor must be a folder that can be written into (checked now, nothing created)."""
    folder = Path(folder)
    base = next(p for p in (folder.absolute(), *folder.absolute().parents) if p.exists())
    if not base.is_dir():
        raise UserError(f"{flag} {folder}: {base} is a file, not a folder; choose another folder")
    _probe(base, flag, folder)
    return folder


def check_output_folder(folder: PathLike, flag: str) -> Path:
    """Create ``folder`` if needed and make sure files can be written into it."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise UserError(f"{flag} {folder} exists and is not a folder; choose another folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"{flag} {folder}: cannot create it ({e.strerror or e}); choose another "
                        f"folder") from None
    _probe(folder, flag, folder)
    return folder


@contextlib.contextmanager
def atomic_file(path: PathLike, *, durable: bool = False) -> Iterator[BinaryIO]:
    """A binary file that becomes ``path`` when the block ends without an error: written as a
    temporary file beside it (``.tmp-<name>.<pid>-<random>``) and renamed over ``path``; on any
    failure the temporary file is removed and the error raised (an old ``path`` stays as it was).
    ``durable``: the data and the rename are fsynced (checkpoints outlive a power cut)."""
    path = Path(path)
    tmp = path.with_name(f".tmp-{path.name}.{os.getpid()}-{secrets.token_hex(4)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)   # the umask applies, as for open()
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    if durable:
        try:
            folder = os.open(path.parent, os.O_RDONLY)
            try:
                os.fsync(folder)
            finally:
                os.close(folder)
        except OSError:
            pass   # not every file system can fsync a folder; the data itself is on disk


def write_atomic(path: PathLike, data: Union[str, bytes]) -> Path:
    """``data`` into ``path`` through :func:`atomic_file`."""
    with atomic_file(path) as f:
        f.write(data.encode() if isinstance(data, str) else data)
    return Path(path)
