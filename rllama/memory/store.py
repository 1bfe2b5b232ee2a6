"""How an :class:`~rllama.memory.EpisodicMemory` is kept on disk.

``save_store(memory, dir)`` writes ``index-<hash>.faiss`` and then ``memory.json`` (format, embedder,
config, next id, entries, the index file's name and SHA-256), each atomically (temporary file + rename);
``memory.json`` is the commit point, so an interrupted save leaves the previous store loadable, and
the previous index file is removed only after it.

``load_store`` trusts nothing in the folder. It checks every field of ``memory.json`` (types and values:
the format and version; the embedder's record with a positive integer ``dim``; ``config`` a dict that
the memory accepts; ``entries`` a list of objects with exactly the :class:`~rllama.memory.Experience`
fields and distinct ids; ``next_id`` an integer above every id, so later ids are never reused;
``index_file`` a plain file name in the folder; ``index_sha256`` a hex digest; ``content_sha256``, the
digest of all the rest, so that a flipped byte that still parses is caught too), that the embedder used
to load is the one that wrote the store (same type, name and width: another model's vectors of the
same width would load and retrieve nonsense), the index file's hash, its dimension, and that it holds
exactly the entries' ids. Any mismatch raises :class:`~rllama.memory.MemoryStoreError` naming the file
(and the field) rather than returning a corrupted memory.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import re
from pathlib import Path
from typing import Any, Protocol, TypeVar

import numpy as np

from ..errors import CorruptFileError, RLlamaError, warn_user
from ..fileio import atomic_write, read_json, utf8_problem
from .embedding import HashingEmbedder, make_embedder
from .records import Experience


class MemoryStoreError(RLlamaError):
    """A memory store on disk is missing, inconsistent or written by an incompatible version."""


class StoredMemory(Protocol):
    """What the store reads off a memory and sets on one it loads (:class:`~rllama.memory.EpisodicMemory`
    is one). Stated here rather than imported, so that this module needs nothing from
    :mod:`rllama.memory.episodic`, which saves and loads through it."""

    embedder: Any
    index: Any  # a FAISS IndexIDMap2 holding the entries' vectors by id
    entries: dict[int, Experience]
    _next_id: int
    _faiss: Any  # the faiss module

    def config(self) -> dict: ...


MemoryT = TypeVar("MemoryT", bound=StoredMemory)

FORMAT = "rllama.EpisodicMemory"
# 2: memory.json always carries content_sha256 (stores of version 1 may predate it).
FORMAT_VERSION = 2
DIGEST_SINCE = 2
MANIFEST = "memory.json"
REBUILDABLE = ("hashing", "sentence-transformers")  # embedder types load_store can rebuild from the record
_NUMBER = (int, float)
ENTRY_TYPES: dict[str, tuple[type, ...]] = {  # the JSON types of each Experience field
    "observation": (str,), "action": (str,), "reward": _NUMBER, "return_to_go": _NUMBER,
    "episode_return": _NUMBER, "outcome": (str, type(None)), "lesson": (str, type(None)), "metadata": (dict,),
    "id": (int,),
}
assert set(ENTRY_TYPES) == {f.name for f in dataclasses.fields(Experience)}, "ENTRY_TYPES lags Experience"


def save_store(memory: StoredMemory, path: str | os.PathLike) -> Path:
    """Write ``memory`` to the folder ``path`` (created if needed)."""
    folder = Path(path)
    blob = memory._faiss.serialize_index(memory.index).tobytes()
    digest = hashlib.sha256(blob).hexdigest()
    index_name = f"index-{digest[:16]}.faiss"
    manifest_path = folder / MANIFEST
    embedder = memory.embedder
    manifest = {
        "format": FORMAT, "version": FORMAT_VERSION,
        "embedder": dict(embedder_identity(embedder), **_config_of(embedder)),
        "config": memory.config(), "next_id": memory._next_id, "index_file": index_name, "index_sha256": digest,
        "entries": [dataclasses.asdict(memory.entries[i]) for i in sorted(memory.entries)],
    }
    problem = utf8_problem(manifest["entries"], "entries")
    if problem:  # entries put in without add(): refused before any file is written
        raise MemoryStoreError(f"cannot save the memory to {folder}: {problem} is a lone surrogate, which UTF-8 "
                               "cannot store")
    manifest["content_sha256"] = content_digest(manifest)
    data = json.dumps(manifest, ensure_ascii=False).encode("utf-8")
    folder.mkdir(parents=True, exist_ok=True)  # only once there is something whole to write
    previous = read_manifest(manifest_path) if manifest_path.exists() else {}
    atomic_write(folder / index_name, blob)
    atomic_write(manifest_path, data)
    old_index = previous.get("index_file")
    if is_plain_name(old_index) and old_index != index_name:  # never a path a damaged manifest points elsewhere
        (folder / old_index).unlink(missing_ok=True)
    return folder


def content_digest(manifest: dict) -> str:
    """SHA-256 of a manifest's content (everything but this digest, as canonical JSON): a flipped byte
    that still parses, in an observation, a reward or an id, does not pass as another memory."""
    content = {k: v for k, v in manifest.items() if k != "content_sha256"}
    return hashlib.sha256(json.dumps(content, sort_keys=True, ensure_ascii=False).encode("utf-8")).hexdigest()


def load_store(cls: type[MemoryT], path: str | os.PathLike, embedder=None,
               overrides: dict[str, Any] | None = None) -> MemoryT:
    """Read a store written by :func:`save_store` as a ``cls``; ``embedder`` and config ``overrides``
    as in :meth:`EpisodicMemory.load <rllama.memory.EpisodicMemory.load>`."""
    folder = Path(path)
    manifest_path = folder / MANIFEST
    if not manifest_path.exists():
        raise MemoryStoreError(f"no episodic memory store at {folder} (missing {MANIFEST})")
    manifest = read_manifest(manifest_path)
    check_version(manifest, manifest_path)
    problem = utf8_problem(manifest, "memory.json")
    if problem:  # an escaped lone surrogate ("\\ud800"): valid JSON, not storable text
        raise MemoryStoreError(f"{manifest_path}: {problem} is a lone surrogate, which no text holds: the file "
                               "was edited or damaged")
    check_digest(manifest, manifest_path)
    check_manifest(manifest, manifest_path)
    entries = read_entries(manifest, manifest_path)
    recorded = manifest["embedder"]
    embedder = make_embedder(rebuild_embedder(recorded, manifest_path) if embedder is None else embedder)
    check_embedder(recorded, embedder, manifest_path)
    try:
        memory = cls(embedder, **dict(manifest["config"], **(overrides or {})))
    except (TypeError, ValueError) as exc:
        extra = f" with the overrides {overrides}" if overrides else ""
        raise MemoryStoreError(f"{manifest_path}: field 'config'{extra} is not a valid {cls.__name__} config: "
                               f"{exc}") from None
    index = read_index(memory._faiss, folder, manifest)
    stored_ids = sorted(int(index.id_map.at(j)) for j in range(index.ntotal)) if index.ntotal else []
    if index.ntotal != len(entries) or stored_ids != sorted(entries):
        raise MemoryStoreError(
            f"the store at {folder} is inconsistent: the index holds {index.ntotal} vectors, {MANIFEST} "
            f"{len(entries)} entries"
        )
    memory.index = index
    memory.entries = entries
    memory._next_id = manifest["next_id"]
    return memory


def check_digest(manifest: dict, manifest_path: Path) -> None:
    """``memory.json`` against its own ``content_sha256``. Without one: refused when its version has
    them always (the digest was removed), else (a store older than digests) loaded with a warning."""
    if "content_sha256" in manifest:
        if manifest["content_sha256"] != content_digest(manifest):
            raise MemoryStoreError(f"{manifest_path} does not match its own checksum (content_sha256): it is damaged")
        return
    version = manifest.get("version")
    if _is_int(version) and version >= DIGEST_SINCE:
        raise MemoryStoreError(f"{manifest_path} has no content_sha256, but its version {version} always carries "
                               "one: the checksum was removed, so its entries cannot be trusted; save the memory "
                               "again from its source")
    warn_user(f"{manifest_path} has no content_sha256: it was written by an rllama older than store checksums "
              "and is loaded unchecked; save it again to add one")


def read_manifest(path: Path) -> dict:
    """The JSON object in ``memory.json``; :class:`MemoryStoreError` naming it when it is unreadable."""
    try:
        return read_json(path)
    except CorruptFileError as exc:
        raise MemoryStoreError(str(exc)) from None


def is_plain_name(name: Any) -> bool:
    """Whether ``name`` is a file name that stays in its folder (no separator, not ``.`` or ``..``)."""
    return (isinstance(name, str) and name not in ("", ".", "..") and "/" not in name and "\\" not in name
            and "\0" not in name)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_version(manifest: dict, manifest_path: Path) -> None:
    """``memory.json``'s format and version: one this rllama reads (1 to :data:`FORMAT_VERSION`)."""
    version = manifest.get("version")
    if manifest.get("format") != FORMAT or not _is_int(version) or not 1 <= version <= FORMAT_VERSION:
        raise MemoryStoreError(
            f"{manifest_path} is not an rllama EpisodicMemory store of format version 1 to {FORMAT_VERSION} "
            f"(format {manifest.get('format')!r:.60}, version {manifest.get('version')!r:.20})"
        )


def check_manifest(manifest: dict, manifest_path: Path) -> None:
    """Check the fields of ``memory.json`` other than the format and the entries (:func:`check_version`,
    :func:`read_entries`)."""

    def bad(field: str, expected: str) -> MemoryStoreError:
        value = manifest.get(field, "<missing>")
        return MemoryStoreError(f"{manifest_path}: field {field!r} is {value!r:.80}; expected {expected}")

    recorded = manifest.get("embedder")
    if not isinstance(recorded, dict):
        raise bad("embedder", "an object with the embedder's name and dim")
    dim = recorded.get("dim")
    if not _is_int(dim) or dim < 1:
        raise MemoryStoreError(f"{manifest_path}: field 'embedder.dim' is {dim!r:.40}; expected a positive integer")
    for key in ("type", "name"):
        if not isinstance(recorded.get(key), (str, type(None))):
            raise MemoryStoreError(f"{manifest_path}: field 'embedder.{key}' is {recorded[key]!r:.60}; "
                                   "expected a string")
    if not isinstance(manifest.get("config"), dict):
        raise bad("config", "an object of EpisodicMemory settings")
    if not _is_int(manifest.get("next_id")) or manifest["next_id"] < 0:
        raise bad("next_id", "a non-negative integer")
    if not is_plain_name(manifest.get("index_file")):
        raise bad("index_file", "a file name inside the store's folder")
    if not (isinstance(manifest.get("index_sha256"), str) and re.fullmatch(r"[0-9a-f]{64}", manifest["index_sha256"])):
        raise bad("index_sha256", "a SHA-256 hex digest")
    if not isinstance(manifest.get("entries"), list):
        raise bad("entries", "a list of experiences")


def read_entries(manifest: dict, manifest_path: Path) -> dict[int, Experience]:
    """The experiences of ``memory.json`` by id, each field checked, and ``next_id`` above every id."""
    entries: dict[int, Experience] = {}
    for n, raw in enumerate(manifest["entries"]):
        where = f"{manifest_path}: field 'entries[{n}]"  # the quote closes after the sub-field's name
        if not isinstance(raw, dict):
            raise MemoryStoreError(f"{where}' is a JSON {type(raw).__name__}; expected an object")
        unknown, missing = sorted(set(raw) - set(ENTRY_TYPES)), sorted(set(ENTRY_TYPES) - set(raw))
        if unknown or missing:
            problems = [f"has unknown fields {unknown}"] * bool(unknown) + [f"lacks {missing}"] * bool(missing)
            raise MemoryStoreError(f"{where}' {' and '.join(problems)}; an experience has exactly the fields "
                                   f"{list(ENTRY_TYPES)}")
        for name, kinds in ENTRY_TYPES.items():
            value = raw[name]
            if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
                raise MemoryStoreError(f"{where}.{name}' is {value!r:.60}; expected "
                                       f"{' or '.join('null' if k is type(None) else k.__name__ for k in kinds)}")
            if kinds is _NUMBER and not math.isfinite(value):
                raise MemoryStoreError(f"{where}.{name}' is {value}; expected a finite number")
        if raw["id"] < 0 or raw["id"] in entries:
            raise MemoryStoreError(f"{where}.id' is {raw['id']}; expected a non-negative id not used before")
        entries[raw["id"]] = Experience(**raw)
    if entries and manifest["next_id"] <= max(entries):
        raise MemoryStoreError(f"{manifest_path}: field 'next_id' is {manifest['next_id']}, but an entry has id "
                               f"{max(entries)}; new experiences would reuse ids (expected next_id > {max(entries)})")
    return entries


def _config_of(embedder) -> dict:
    config = embedder.config() if callable(getattr(embedder, "config", None)) else {}
    return config if isinstance(config, dict) else {}


def embedder_identity(embedder) -> dict:
    """What identifies an embedder's vectors: its type (``None`` for one without ``config()``), name and width."""
    config = _config_of(embedder)
    return {"type": config.get("type"), "name": config.get("name", getattr(embedder, "name", type(embedder).__name__)),
            "dim": int(embedder.dim)}


def recorded_identity(recorded: dict) -> dict:
    """:func:`embedder_identity` of the embedder a manifest records."""
    return {"type": recorded.get("type"), "name": recorded.get("name"), "dim": recorded["dim"]}


def _describe(identity: dict) -> str:
    kind = f"{identity['type']}, " if identity.get("type") else ""
    return f"{identity.get('name')!r} ({kind}{identity['dim']}-dimensional vectors)"


def rebuild_embedder(recorded: dict, manifest_path: Path):
    """The spec :func:`~rllama.memory.embedding.make_embedder` turns into the embedder the store records."""
    if recorded.get("type") == "hashing":
        return HashingEmbedder(recorded["dim"])
    if recorded.get("type") == "sentence-transformers" and isinstance(recorded.get("name"), str):
        return None if recorded["name"] == "all-MiniLM-L6-v2" else recorded["name"]
    raise MemoryStoreError(
        f"{manifest_path}: the store was written by the embedder {_describe(recorded_identity(recorded))}, which "
        f"rllama cannot rebuild (it rebuilds {' and '.join(REBUILDABLE)} embedders); pass it: "
        "EpisodicMemory.load(path, embedder=...)"
    )


def check_embedder(recorded: dict, embedder, manifest_path: Path) -> None:
    """Refuse an embedder other than the one that wrote the store: its vectors would not be comparable. Its
    type and name are compared where the store records them (a custom embedder may record neither)."""
    wrote, given = recorded_identity(recorded), embedder_identity(embedder)
    if any(wrote[key] is not None and wrote[key] != given[key] for key in wrote):
        raise MemoryStoreError(
            f"{manifest_path}: the store was written by the embedder {_describe(wrote)}; the embedder given is "
            f"{_describe(given)}, whose vectors cannot be compared with the stored ones. Load it with the embedder "
            "that wrote it (or with embedder=None to rebuild that one)"
        )


def read_index(faiss, folder: Path, manifest: dict):
    """The FAISS index of the store, checked against its hash and the recorded dimension."""
    index_path = folder / manifest["index_file"]
    if not index_path.is_file():
        raise MemoryStoreError(f"{index_path} is missing; the store at {folder} is incomplete")
    blob = index_path.read_bytes()
    if hashlib.sha256(blob).hexdigest() != manifest["index_sha256"]:
        raise MemoryStoreError(f"{index_path} does not match the hash in {MANIFEST}; the store is corrupted")
    try:
        index = faiss.deserialize_index(np.frombuffer(blob, dtype=np.uint8))
    except RuntimeError as exc:
        raise MemoryStoreError(f"{index_path} is not a FAISS index: {exc}") from None
    if not isinstance(index, faiss.IndexIDMap2) or index.metric_type != faiss.METRIC_INNER_PRODUCT:
        raise MemoryStoreError(f"{index_path} holds a {type(index).__name__} (metric {index.metric_type}); expected "
                               "an inner-product IndexIDMap2")
    dim = manifest["embedder"]["dim"]
    if index.d != dim:
        raise MemoryStoreError(f"{index_path} holds {index.d}-dimensional vectors, but field 'embedder.dim' of "
                               f"{folder / MANIFEST} records {dim}")
    return index
