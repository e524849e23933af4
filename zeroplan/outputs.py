"""Where a command writes what the user asked for (``-o``): checked before the work starts,
then written whole or not at all.

Files are written under temporary names beside their targets and renamed onto them at
the end; a new folder is filled under a temporary name and renamed into place. An error
or Ctrl-C leaves the targets as they were and no temporary behind. ``write_atomic`` is the
same for one file that a run writes (markers, exit files, RUN_DIR's files, configs);
``read_json_object`` reads such a record back while another process may be writing it.
Imports nothing heavy.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from zeroplan.errors import OutputWriteError


def read_json_object(path: Path) -> dict[str, Any] | None:
    """The JSON object in ``path``; None where the file is missing, unreadable, not JSON
    (half-written) or not an object: run-folder records are read while others write them."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def umask() -> int:
    """The process's umask: Python reads it only by setting it, so it is put back at once."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _nearest_existing(path: Path) -> Path:
    p = path.absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def check_can_create(path: Path, what: str) -> None:
    """Refuse ``path`` unless its folder exists, or can be made, and can be written: the
    nearest existing folder above it is a folder this user may write in."""
    above = _nearest_existing(path.absolute().parent)
    if not above.is_dir():
        raise OutputWriteError(f"cannot write {what} {path}: {above} is a file, not a folder")
    # a file is renamed into place, so only the folder's permission matters, not the file's
    if not os.access(above, os.W_OK | os.X_OK):
        raise OutputWriteError(
            f"cannot write {what} {path}: {above} is not writable; give -o a path in a "
            "folder you can write"
        )


def check_new_file(path: Path, what: str) -> None:
    """Refuse a file target that is a folder, or whose folder cannot be written."""
    if path.is_dir():
        raise OutputWriteError(
            f"cannot write {what} {path}: it is a folder; remove it or give -o another path"
        )
    check_can_create(path, what)


@contextlib.contextmanager
def made_parents(folder: Path) -> Iterator[None]:
    """Make ``folder`` and any missing folders above it; when the block fails, remove the
    ones made here again (they hold only the block's temporaries)."""
    first_made = None
    p = folder.absolute()
    while not p.exists() and p != p.parent:
        first_made, p = p, p.parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
        yield
    except BaseException:
        if first_made is not None:
            shutil.rmtree(first_made, ignore_errors=True)
        raise


def atomic_temp_name(name: str, pid: int, token: str) -> str:
    """The temporary name ``write_atomic`` writes ``name`` under before renaming it.

    Several nodes and ranks can write into one shared folder at once, and a node's pids
    can repeat on another node: the pid keeps one process's names apart from another's,
    the random ``token`` keeps two calls (threads, or equal pids on two hosts) apart.
    Hidden and ending in ``.tmp``, so a listing or a glob for the target skips it."""
    return f".{name}.{pid}.{token}.tmp"


def write_atomic(path: Path, text: str | bytes, *, fsync: bool = False) -> None:
    """Write ``text`` (str as UTF-8, or bytes as they are) to ``path`` whole or not at all.

    A reader of ``path`` (another node, a watcher, a launcher) sees the old file or the
    complete new one, never half of one: the text goes to a temporary file beside it, which
    ``os.replace`` renames onto it. An error or Ctrl-C leaves the old file and removes the
    temporary. ``fsync`` also flushes the text to the disk before the rename, for files
    that must survive a machine crash; it costs a disk round trip, so it is off by default.
    OSError propagates: each caller decides what a failed write means to it.
    """
    tmp = path.with_name(atomic_temp_name(path.name, os.getpid(), secrets.token_hex(8)))
    # 0o666 like open(): the umask decides, not mkstemp's 0o600 (hidden from the group on a
    # shared cluster); O_EXCL so that a name in use is an error, never two writers' mix
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(text.encode("utf-8") if isinstance(text, str) else text)
            if fsync:
                fh.flush()
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)  # gone already after the rename; no one else has its name


def _temp_beside(path: Path) -> Path:
    # hidden, and with the target's suffix: writers such as matplotlib read the format from it
    return path.with_name(f".{path.stem}.{secrets.token_hex(4)}{path.suffix}")


@contextlib.contextmanager
def files_together(paths: Sequence[Path], what: str) -> Iterator[list[Path]]:
    """Temporary paths to write, one beside each of ``paths``; when the block ends they are
    renamed onto ``paths``, and when it fails removed: the targets get every new file or
    none. An OSError on the way is one OutputWriteError."""
    for path in paths:
        check_new_file(path, what)
    temps = [_temp_beside(p) for p in paths]
    try:
        with contextlib.ExitStack() as parents:
            for folder in dict.fromkeys(p.parent for p in paths):
                parents.enter_context(made_parents(folder))
            yield temps
            for tmp, path in zip(temps, paths, strict=True):
                os.replace(tmp, path)
    except OSError as exc:
        raise OutputWriteError(
            f"cannot write {what} {paths[0]}: {exc.strerror or exc}; give -o another path"
        ) from exc
    finally:
        for tmp in temps:
            tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def new_folder(target: Path, what: str) -> Iterator[Path]:
    """A temporary folder beside ``target`` to fill; renamed to ``target`` (which must not
    exist, or be empty) when the block ends, removed when it fails."""
    if target.exists() and not target.is_dir():
        raise OutputWriteError(f"cannot write {what} {target}: it is a file, not a folder")
    check_can_create(target, what)
    try:
        with made_parents(target.parent):
            tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
            try:
                yield tmp
                tmp.chmod(0o777 & ~umask())  # mkdtemp's 0700 would hide it from the group
                os.replace(tmp, target)  # onto an empty folder too (rename(2))
            finally:
                shutil.rmtree(tmp, ignore_errors=True)  # gone already after the rename
    except OSError as exc:
        raise OutputWriteError(
            f"cannot write {what} {target}: {exc.strerror or exc}; give -o a new folder"
        ) from exc
