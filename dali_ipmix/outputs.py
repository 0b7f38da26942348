"""Output paths of the commands, checked before any work starts, and written so that a failure
leaves nothing half-written: a result that took minutes must not die on a path that cannot take
it, and a file the user already has is replaced only with ``--overwrite``."""
from __future__ import annotations

import os
import secrets
import tempfile
from pathlib import Path
from typing import Union

from .errors import UserError

PathLike = Union[str, os.PathLike]


def _probe(folder: Path, flag: str, target: PathLike) -> None:
    try:
        tempfile.NamedTemporaryFile(dir=folder, prefix=".write-test-").close()
    except OSError as e:
        raise UserError(f"{flag} {target}: cannot write into {folder} ({e.strerror or e}); choose "
                        f"another place") from None


def check_output_file(path: PathLike, flag: str, overwrite: bool = False,
                      make_folder: bool = False) -> Path:
    """Refuse a folder, an existing file without ``overwrite``, a missing folder (created with
    ``make_folder``) and a folder that cannot be written into."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{flag} {path} is a folder; give a file name")
    if path.exists() and not overwrite:
        raise UserError(f"{flag} {path}: file exists; pass --overwrite or choose another name")
    folder = path.parent
    if not folder.is_dir():
        if not make_folder:
            raise UserError(f"{flag} {path}: the folder {folder} does not exist; create it or "
                            f"choose another place")
        check_output_folder(folder, flag)
    _probe(folder, flag, path)
    return path


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


def write_atomic(path: PathLike, data: Union[str, bytes]) -> Path:
    """Write into a temporary file beside ``path``, then rename it over ``path``; on failure the
    temporary file is removed and the error raised (an old ``path`` stays as it was)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)   # the umask applies, as for open()
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path
