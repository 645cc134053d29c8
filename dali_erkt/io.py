"""Atomic, durable file writes: a result is either the old file or the complete new one, never
half of one, at whatever moment the process is killed.

A write goes to a temporary file beside the target (named `.<name>.<random>.tmp`), is flushed
to disk, renamed over the target, and the folder is synced so the rename itself survives a
crash. Files get the mode the user's umask gives (not mkstemp's 0600). A write that fails (a full
disk, a read-only folder) leaves no temporary file and raises one `WriteError` line.
"""
from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Callable

from .errors import WriteError

TMP_SUFFIX = ".tmp"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _sync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


WRITE_ADVICE = "free some space, or choose a writable --out"


@contextlib.contextmanager
def writing(path, advice: str = WRITE_ADVICE):
    """Turn an OSError raised inside the block (full disk, read-only folder, a file where a folder
    should be) into one `WriteError` line naming `path` (and the file in the way, where a folder
    above it is a file: mkdir says only "File exists")."""
    try:
        yield
    except OSError as exc:
        above = next((p for p in Path(path).parents if p.exists()), None)
        why = f"{above} is a file, not a folder" if above is not None and not above.is_dir() \
            else exc.strerror or str(exc).splitlines()[0]
        raise WriteError(f"cannot write {path}: {why}; {advice}") from None


def make_folder(path, advice: str = WRITE_ADVICE) -> Path:
    """`mkdir -p path`, failing in one `WriteError` line."""
    with writing(path, advice):
        Path(path).mkdir(parents=True, exist_ok=True)
    return Path(path)


def atomic_write(path: Path, write: Callable[[str], None], advice: str = WRITE_ADVICE) -> None:
    """Call `write(tmp_path)` on a temporary file beside `path`, fsync it, then rename it over
    `path`; a failure is one `WriteError` line ending in `advice`."""
    path = Path(path)
    tmp = None
    try:
        with writing(path, advice):
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TMP_SUFFIX, dir=path.parent)
            os.fchmod(fd, 0o666 & ~_umask())
            os.close(fd)
            write(tmp)
            with open(tmp, "rb") as fh:
                os.fsync(fh.fileno())
            os.replace(tmp, path)
            tmp = None
            _sync_dir(path.parent)
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)


def atomic_write_text(path: Path, text: str) -> None:
    """`text` as UTF-8 (whatever the locale), atomically."""
    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(text)
    atomic_write(path, write)


def remove_stale_temporaries(folder: Path) -> list[str]:
    """Delete the temporary files a killed writer left in `folder`; return their names."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    stale = [p for p in folder.iterdir() if p.name.startswith(".") and p.name.endswith(TMP_SUFFIX)
             and p.is_file()]
    for p in stale:
        p.unlink()
    return [p.name for p in stale]


def file_sha256(path) -> str:
    """The SHA-256 of a file's bytes, as hex."""
    import hashlib
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
