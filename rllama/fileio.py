"""Writing files and folders so that a crash leaves either the old or the new version, never half of one."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path


def atomic_write(path: str | os.PathLike, data: bytes | str) -> None:
    """Write ``data`` to ``path`` through a synced temporary file in the same folder and a rename."""
    path = Path(path)
    payload = data.encode("utf-8") if isinstance(data, str) else data
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def writing_dir(path: str | os.PathLike, replace: bool = True) -> Iterator[Path]:
    """Context that yields a fresh temporary folder beside ``path`` to write into; on success its files are
    synced and it becomes ``path`` (:func:`replace_dir`; with ``replace=False`` it is dropped instead if
    ``path`` exists by then, as when another process finished the same work first); on an error it is
    removed. A crash leaves the old folder or the new one at ``path``, never a mixture."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}-", dir=path.parent))
    try:
        yield tmp
        fsync_tree(tmp)
        if not replace and path.exists():
            shutil.rmtree(tmp)
        else:
            replace_dir(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def fsync_tree(folder: str | os.PathLike) -> None:
    """Flush every file under ``folder`` to disk."""
    for p in Path(folder).rglob("*"):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())


def _old_dir(path: Path) -> Path:
    return path.with_name(f".{path.name}.old")


def recover_dir(path: str | os.PathLike) -> Path:
    """``path``, put back from its ``.old`` copy if a crash came between :func:`replace_dir`'s two renames
    (the folder is then missing and the previous version waits beside it)."""
    path = Path(path)
    old = _old_dir(path)
    if not path.exists() and old.is_dir():
        os.replace(old, path)
    return path


def replace_dir(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Move folder ``src`` to ``dst``, replacing ``dst``; a crash leaves either the old or the new folder (the
    old one possibly as ``.<name>.old`` beside it, which :func:`recover_dir` puts back)."""
    src, dst = Path(src), Path(dst)
    if dst.exists():
        old = _old_dir(dst)
        shutil.rmtree(old, ignore_errors=True)
        os.replace(dst, old)
        os.replace(src, dst)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(src, dst)
