"""Writing files and folders so that a crash leaves either the old or the new version, never half of one,
and reading them back so that damage is found and named rather than loaded.

- :func:`atomic_write` writes a file through a synced temporary file and a rename.
- :func:`writing_dir` writes a folder under a temporary name, adds a checksum manifest
  (``manifest.json``: each file's size and SHA-256), syncs it and renames it into place;
  :func:`verify_dir` checks a folder against its manifest.
- Temporary files and folders are named ``.<name>.rllama-tmp-<pid>-<random>``; those a killed
  process left behind are removed by the next write into the same folder.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from rllama.errors import CorruptFileError, warn_user

MANIFEST = "manifest.json"
_TEMPORARY = re.compile(r"^\..+\.rllama-tmp-(\d+)-")


def atomic_write(path: str | os.PathLike, data: bytes | str) -> None:
    """Write ``data`` to ``path`` through a synced temporary file in the same folder and a rename."""
    path = Path(path)
    payload = data.encode("utf-8") if isinstance(data, str) else data
    _remove_stale(path.parent)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=_temporary_prefix(path), suffix=".tmp")
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
def writing_dir(path: str | os.PathLike, replace: bool = True, manifest: bool = True) -> Iterator[Path]:
    """Context that yields a fresh temporary folder beside ``path`` to write into; on success its
    checksum manifest is written (unless ``manifest=False``), its files are synced and it becomes
    ``path`` (:func:`replace_dir`; with ``replace=False`` it is dropped instead if ``path`` exists by
    then, as when another process finished the same work first); on an error it is removed. A crash
    leaves the old folder or the new one at ``path``, never a mixture."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale(path.parent)
    tmp = Path(tempfile.mkdtemp(prefix=_temporary_prefix(path), dir=path.parent))
    try:
        yield tmp
        if manifest:
            write_manifest(tmp)
        fsync_tree(tmp)
        if not replace and path.exists():
            shutil.rmtree(tmp)
        else:
            replace_dir(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _temporary_prefix(path: Path) -> str:
    return f".{path.name}.rllama-tmp-{os.getpid()}-"


def _remove_stale(folder: Path) -> None:
    """Remove the temporary files and folders in ``folder`` whose writing process is gone."""
    if not folder.is_dir():
        return
    for entry in folder.iterdir():
        found = _TEMPORARY.match(entry.name)
        if found is None or _alive(int(found.group(1))):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, OSError):
        return True  # someone else's process, or not ours to judge: leave its files alone
    return True


def fsync_tree(folder: str | os.PathLike) -> None:
    """Flush every file under ``folder`` to disk."""
    for p in Path(folder).rglob("*"):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_manifest(folder: str | os.PathLike) -> None:
    """Write ``folder/manifest.json``: the size and SHA-256 of every file under ``folder``."""
    folder = Path(folder)
    files = {}
    for p in sorted(folder.rglob("*")):
        if p.is_file() and p != folder / MANIFEST:
            files[p.relative_to(folder).as_posix()] = {"bytes": p.stat().st_size, "sha256": _sha256(p)}
    (folder / MANIFEST).write_text(json.dumps({"format": "rllama.manifest", "version": 1, "files": files}, indent=1))


def utf8_problem(value: Any, where: str) -> str | None:
    """Where in ``value`` (a string, or strings nested in lists, tuples and dict keys or values) a
    character UTF-8 cannot store sits (a lone surrogate such as ``"\\ud800"``, from text decoded with
    ``surrogateescape``), as ``"<where>[key]: character 3 of '...'"``; ``None`` when every string encodes."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as exc:
            return f"{where}: character {exc.start} of {value[:60]!r}"
        return None
    if isinstance(value, dict):
        for key, item in value.items():
            found = utf8_problem(key, f"{where} (a key)") or utf8_problem(item, f"{where}[{key!r}]")
            if found:
                return found
    elif isinstance(value, (list, tuple, set, frozenset)):
        for i, item in enumerate(value):
            found = utf8_problem(item, f"{where}[{i}]")
            if found:
                return found
    return None


def verify_dir(folder: str | os.PathLike, required: str | None = None, warn: bool = True,
               must_list: tuple[str, ...] = ()) -> bool:
    """Check every file listed in ``folder/manifest.json`` (present, same size, same SHA-256); raise
    :class:`~rllama.errors.CorruptFileError` naming the first that is not. Returns whether the folder
    was checked.

    A folder without a manifest is refused when ``required`` says why it must have one (its format
    is newer than manifests: the manifest was removed); otherwise it was written before rllama kept
    them, and passes unchecked, with a warning unless ``warn=False`` (a PEFT folder from elsewhere).
    ``must_list``: files a manifest of this folder lists whenever it has one (a manifest that leaves
    them out, forged or from another folder, checks nothing of what is read)."""
    folder = Path(folder)
    manifest_path = folder / MANIFEST
    if not manifest_path.is_file():
        if required:
            raise CorruptFileError(f"{manifest_path} is missing, but {required}: the checksums of this folder "
                                   "were removed, so its files cannot be trusted; save it again from its source")
        if warn:
            warn_user(f"{folder} has no checksum manifest ({MANIFEST}): it was written by an rllama older than "
                      "manifests and is loaded unchecked; save it again to add one")
        return False
    manifest = read_json(manifest_path)
    files = manifest.get("files")
    if manifest.get("format") != "rllama.manifest" or not isinstance(files, dict):
        raise CorruptFileError(f"{manifest_path} is not an rllama checksum manifest")
    unlisted = [name for name in must_list if name not in files]
    if unlisted:
        raise CorruptFileError(f"{manifest_path} does not list {unlisted}, which this folder's manifest always "
                               "lists: it belongs to another folder or was edited")
    root = folder.resolve()
    for name, entry in files.items():
        path = (folder / name).resolve()
        if root not in path.parents:
            raise CorruptFileError(f"{manifest_path} lists {name!r}, outside {folder}")
        if not isinstance(entry, dict) or not {"bytes", "sha256"} <= set(entry):
            raise CorruptFileError(f"{manifest_path}: the entry of {name!r} is malformed")
        if not path.is_file():
            raise CorruptFileError(f"{folder / name} is missing (listed in {manifest_path})")
        size = path.stat().st_size
        if size != entry["bytes"]:
            raise CorruptFileError(f"{folder / name} holds {size} bytes, {entry['bytes']} were written: it is "
                                   "truncated or damaged")
        if _sha256(path) != entry["sha256"]:
            raise CorruptFileError(f"{folder / name} does not match its checksum in {manifest_path}: it is damaged")
    return True


def read_json(path: str | os.PathLike, expect: type = dict) -> Any:
    """The JSON value in file ``path`` (of type ``expect``); a clear :class:`~rllama.errors.CorruptFileError`
    naming the file when it cannot be read, is not JSON (or not UTF-8), or holds another type."""
    path = Path(path)
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise CorruptFileError(f"cannot read {path}: {exc}") from None
    if not isinstance(value, expect):
        raise CorruptFileError(f"{path} holds a JSON {type(value).__name__}; expected a {expect.__name__}")
    return value


def read_tensors(path: str | os.PathLike) -> dict:
    """The tensors of safetensors file ``path``; a clear :class:`~rllama.errors.CorruptFileError` naming the
    file when it cannot be read (safetensors raises its own error types for damaged files)."""
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except Exception as exc:
        raise CorruptFileError(f"cannot read {path}: {type(exc).__name__}: {exc}") from None


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
        shutil.rmtree(_old_dir(dst), ignore_errors=True)  # left by a crash between the renames, now superseded
