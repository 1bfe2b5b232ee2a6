"""How an :class:`~rllama.memory.EpisodicMemory` is kept on disk.

``save_store(memory, dir)`` writes ``index-<hash>.faiss`` and then ``memory.json`` (format, embedder,
config, entries, the index file's name and SHA-256), each atomically (temporary file + rename);
``memory.json`` is the commit point, so an interrupted save leaves the previous store loadable, and
the previous index file is removed only after it. ``load_store`` checks the format, the embedder's
width, the index file's hash, the count and the ids, and raises
:class:`~rllama.memory.MemoryStoreError` on any mismatch rather than returning a corrupted memory.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..fileio import atomic_write
from .embedding import HashingEmbedder
from .episodic import Experience, MemoryStoreError

if TYPE_CHECKING:
    from .episodic import EpisodicMemory

FORMAT = "rllama.EpisodicMemory"
FORMAT_VERSION = 1
MANIFEST = "memory.json"


def save_store(memory: EpisodicMemory, path: str | os.PathLike) -> Path:
    """Write ``memory`` to the folder ``path`` (created if needed)."""
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    blob = memory._faiss.serialize_index(memory.index).tobytes()
    digest = hashlib.sha256(blob).hexdigest()
    index_name = f"index-{digest[:16]}.faiss"
    manifest_path = folder / MANIFEST
    previous = read_manifest(manifest_path) if manifest_path.exists() else None
    atomic_write(folder / index_name, blob)
    embedder = memory.embedder
    manifest = {
        "format": FORMAT, "version": FORMAT_VERSION,
        "embedder": getattr(embedder, "config", lambda: {"name": embedder.name, "dim": memory.dim})(),
        "config": memory.config(), "next_id": memory._next_id, "index_file": index_name, "index_sha256": digest,
        "entries": [asdict(memory.entries[i]) for i in sorted(memory.entries)],
    }
    atomic_write(manifest_path, json.dumps(manifest, ensure_ascii=False).encode("utf-8"))
    if previous and previous.get("index_file") not in (None, index_name):
        (folder / previous["index_file"]).unlink(missing_ok=True)
    return folder


def load_store(cls: type[EpisodicMemory], path: str | os.PathLike, embedder=None,
               overrides: dict[str, Any] | None = None) -> EpisodicMemory:
    """Read a store written by :func:`save_store` as a ``cls``; ``embedder`` and config ``overrides``
    as in :meth:`EpisodicMemory.load <rllama.memory.EpisodicMemory.load>`."""
    folder = Path(path)
    manifest_path = folder / MANIFEST
    if not manifest_path.exists():
        raise MemoryStoreError(f"no episodic memory store at {folder} (missing {MANIFEST})")
    manifest = read_manifest(manifest_path)
    if manifest.get("format") != FORMAT or manifest.get("version") != FORMAT_VERSION:
        raise MemoryStoreError(
            f"{manifest_path} is not an rllama EpisodicMemory store of format version {FORMAT_VERSION}"
        )
    recorded = manifest["embedder"]
    if embedder is None:
        if recorded.get("type") == "hashing":
            embedder = HashingEmbedder(recorded["dim"])
        elif recorded.get("name") == "all-MiniLM-L6-v2":
            embedder = None
        else:
            embedder = recorded.get("name")
    memory = cls(embedder, **dict(manifest["config"], **(overrides or {})))
    if memory.dim != recorded["dim"]:
        raise MemoryStoreError(
            f"the store at {folder} holds {recorded['dim']}-dimensional vectors ({recorded.get('name')}); "
            f"the embedder {memory.embedder.name} gives {memory.dim}"
        )
    index_path = folder / manifest["index_file"]
    if not index_path.exists():
        raise MemoryStoreError(f"{index_path} is missing; the store at {folder} is incomplete")
    blob = index_path.read_bytes()
    if hashlib.sha256(blob).hexdigest() != manifest["index_sha256"]:
        raise MemoryStoreError(f"{index_path} does not match the hash in {MANIFEST}; the store is corrupted")
    index = memory._faiss.deserialize_index(np.frombuffer(blob, dtype=np.uint8))
    entries = {}
    for raw in manifest["entries"]:
        e = Experience(**raw)
        entries[e.id] = e
    stored_ids = sorted(int(index.id_map.at(j)) for j in range(index.ntotal)) if index.ntotal else []
    if index.ntotal != len(entries) or stored_ids != sorted(entries):
        raise MemoryStoreError(
            f"the store at {folder} is inconsistent: the index holds {index.ntotal} vectors, {MANIFEST} "
            f"{len(entries)} entries"
        )
    memory.index = index
    memory.entries = entries
    memory._next_id = int(manifest["next_id"])
    return memory


def read_manifest(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise MemoryStoreError(f"cannot read {path}: {exc}") from exc
