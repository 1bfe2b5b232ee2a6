"""Episodic memory: past experience in a FAISS index, retrieved by similarity to the observation.

Each :class:`Experience` is one step of a past episode (observation text, the action taken, its
reward, the return that followed, the episode's outcome, an optional lesson). Its observation text is
embedded (see :mod:`rllama.memory.embedding`) and kept in an exact inner-product FAISS index
(``IndexIDMap2(IndexFlatIP)``; vectors are normalised, so the inner product is cosine similarity).
``index="fp16"`` stores the vectors as float16 (``IndexScalarQuantizer``): half the memory and about
twice as fast at 100 k entries, with similarities exact to about 1e-3.

Retrieval score of an entry for a query::

    score = similarity + return_weight * tanh(return_to_go) + recency_weight * 0.5 ** (age / recency_half_life)

where ``age`` counts the experiences added after it. With both weights 0 (the default) this is plain
nearest-neighbour search. With weights, the ``k * oversample`` most similar entries are re-ranked.

Capacity: when an insert would exceed ``capacity``, entries are evicted by the rule ``eviction``:
``"oldest"`` (first in, first out) or ``"lowest_return"`` (lowest ``return_to_go``, oldest first among
equals). Eviction removes at least what is needed, in chunks of ``max(1, capacity // 64)``, because each
removal compacts the index (O(capacity)); so a full memory holds between ``capacity - capacity // 64``
and ``capacity`` entries.

Persistence: ``save(dir)`` and ``load(dir)`` (:mod:`rllama.memory.store`) keep a store crash-safe and
refuse a corrupted one with :class:`MemoryStoreError`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import require
from ..fileio import utf8_problem
from .embedding import HashingEmbedder, SentenceEmbedder, make_embedder
from .records import Experience
from .store import MemoryStoreError, load_store, save_store


@dataclass
class Retrieved:
    """A retrieved experience with its cosine similarity to the query and its ranking score."""

    experience: Experience
    similarity: float
    score: float


class EpisodicMemory:
    """Experiences in a FAISS index, retrieved by similarity (optionally weighted by return and recency).

    Args:
        embedder: ``None`` for the embedded all-MiniLM-L6-v2, ``"hashing"`` for a bag-of-words
            embedder with no model, a sentence-transformers folder / hub id, or an embedder object.
        capacity: most entries kept; see the module docstring for the eviction rule.
        k: entries retrieved per query by default.
        eviction: ``"oldest"`` or ``"lowest_return"``.
        return_weight: weight of ``tanh(return_to_go)`` in the ranking score.
        recency_weight: weight of ``0.5 ** (age / recency_half_life)`` in the ranking score.
        recency_half_life: age, in insertions, at which the recency bonus halves.
        min_similarity: entries less similar than this are never returned.
        oversample: with non-zero weights, ``k * oversample`` nearest entries are re-ranked.
        gamma: discount for the ``return_to_go`` the agent computes when it writes episodes.
        write_steps: which steps of an episode the agent writes: ``"all"`` or ``"last"``.
        write_filter: optional ``filter(experience) -> bool``; only experiences it accepts are stored
            (for instance ``lambda e: e.episode_return > 0`` keeps successful episodes only).
        index: ``"flat"`` (exact float32) or ``"fp16"`` (float16 storage; see the module docstring).
        search_threads: FAISS threads for a search (default 1: on a few cores one thread answers
            a query much faster than several); ``None`` leaves FAISS's global setting alone.
    """

    def __init__(
        self,
        embedder=None,
        capacity: int = 10_000,
        k: int = 4,
        *,
        eviction: str = "oldest",
        return_weight: float = 0.0,
        recency_weight: float = 0.0,
        recency_half_life: float = 1000.0,
        min_similarity: float | None = None,
        oversample: int = 4,
        gamma: float = 1.0,
        write_steps: str = "all",
        write_filter: Callable[[Experience], bool] | None = None,
        search_threads: int | None = 1,
        index: str = "flat",
    ) -> None:
        faiss = require("faiss", "memory", "the episodic memory")
        if capacity < 1:
            raise ValueError(f"capacity={capacity}; expected at least 1")
        if k < 1:
            raise ValueError(f"k={k}; expected at least 1")
        if eviction not in ("oldest", "lowest_return"):
            raise ValueError(f"eviction={eviction!r}; expected 'oldest' or 'lowest_return'")
        if recency_half_life <= 0:
            raise ValueError(f"recency_half_life={recency_half_life}; expected > 0")
        if not 0.0 <= gamma <= 1.0:
            raise ValueError(f"gamma={gamma}; expected within [0, 1]")
        if write_steps not in ("all", "last"):
            raise ValueError(f"write_steps={write_steps!r}; expected 'all' or 'last'")
        self.embedder = make_embedder(embedder)
        self.dim = int(self.embedder.dim)
        self.capacity = int(capacity)
        self.k = int(k)
        self.eviction = eviction
        self.return_weight = float(return_weight)
        self.recency_weight = float(recency_weight)
        self.recency_half_life = float(recency_half_life)
        self.min_similarity = None if min_similarity is None else float(min_similarity)
        self.oversample = max(1, int(oversample))
        self.gamma = float(gamma)
        self.write_steps = write_steps
        if write_filter is not None and not callable(write_filter):
            raise TypeError(f"write_filter={write_filter!r}: expected a callable(experience) -> bool")
        self.write_filter = write_filter
        if search_threads is not None and search_threads < 1:
            raise ValueError(f"search_threads={search_threads}; expected None or at least 1")
        self.search_threads = search_threads
        if index not in ("flat", "fp16"):
            raise ValueError(f"index={index!r}; expected 'flat' or 'fp16'")
        self.index_type = index
        self._faiss = faiss
        if index == "flat":
            inner = faiss.IndexFlatIP(self.dim)
        else:
            inner = faiss.IndexScalarQuantizer(self.dim, faiss.ScalarQuantizer.QT_fp16, faiss.METRIC_INNER_PRODUCT)
        self.index = faiss.IndexIDMap2(inner)
        self.entries: dict[int, Experience] = {}
        self._next_id = 0

    # ------------------------------------------------------------------ size
    def __len__(self) -> int:
        return len(self.entries)

    def __contains__(self, experience_id: int) -> bool:
        return int(experience_id) in self.entries

    def __iter__(self):
        return iter(self.entries[i] for i in sorted(self.entries))

    def __repr__(self) -> str:
        return (f"EpisodicMemory({len(self)}/{self.capacity} entries, embedder={self.embedder.name}, k={self.k}, "
                f"eviction={self.eviction!r})")

    # ------------------------------------------------------------------ writing
    def add(self, experiences: Experience | Iterable[Experience], vectors: np.ndarray | None = None) -> list[int]:
        """Embed and store experiences; returns their ids. Evicts first when over capacity.

        Args:
            vectors: their observations' embeddings, if already computed (normalised, ``(n, dim)``).
        """
        batch = [experiences] if isinstance(experiences, Experience) else list(experiences)
        for i, e in enumerate(batch):
            if not isinstance(e, Experience):
                raise TypeError(f"EpisodicMemory.add expects Experience objects, got {type(e).__name__}")
            fields = dataclasses.asdict(e)
            problem = utf8_problem(fields, f"experience {i}")
            if problem:  # the store is UTF-8 JSON: it could not be saved
                raise ValueError(f"EpisodicMemory.add: {problem} is a lone surrogate, which UTF-8 cannot store; "
                                 "decode the text it comes from with errors='replace'")
            try:
                json.dumps(fields)
            except (TypeError, ValueError) as exc:
                raise ValueError(f"EpisodicMemory.add: experience {i} cannot be stored as JSON ({exc}); its metadata "
                                 "may hold strings, numbers, booleans, None, lists and dicts") from None
        keep = list(range(len(batch)))
        if vectors is not None:
            vectors = np.asarray(vectors, dtype=np.float32)
            if vectors.shape != (len(batch), self.dim):
                raise ValueError(f"vectors of shape {vectors.shape}; expected ({len(batch)}, {self.dim})")
        if self.write_filter is not None:
            keep = [i for i in keep if self.write_filter(batch[i])]
        if len(keep) > self.capacity:  # only what can be kept is embedded
            if self.eviction == "oldest":
                keep = keep[-self.capacity:]
            else:
                order = sorted(keep, key=lambda i: (-batch[i].return_to_go, -i))
                keep = sorted(order[: self.capacity])
        if not keep:
            return []
        batch = [batch[i] for i in keep]
        if vectors is None:
            vectors = self._embed([e.observation for e in batch])
        else:
            vectors = np.ascontiguousarray(vectors[keep])
        self._evict(len(self.entries) + len(batch) - self.capacity)
        ids = np.arange(self._next_id, self._next_id + len(batch), dtype=np.int64)
        self._next_id += len(batch)
        self.index.add_with_ids(vectors, ids)
        for e, i in zip(batch, ids.tolist()):
            e.id = i
            self.entries[i] = e
        return ids.tolist()

    def add_episode(
        self,
        observations: Sequence[str],
        actions: Sequence[str],
        rewards: Sequence[float],
        *,
        outcome: str | None = None,
        lesson: str | None = None,
        metadata: dict | None = None,
    ) -> list[int]:
        """Store a finished episode, one experience per step (or the last, with ``write_steps="last"``)."""
        if not (len(observations) == len(actions) == len(rewards)):
            raise ValueError(
                f"add_episode: {len(observations)} observations, {len(actions)} actions and {len(rewards)} rewards; "
                "expected one of each per step"
            )
        if not observations:
            return []
        rewards = [float(r) for r in rewards]
        returns, g = [0.0] * len(rewards), 0.0
        for t in range(len(rewards) - 1, -1, -1):
            g = rewards[t] + self.gamma * g
            returns[t] = g
        total = float(sum(rewards))
        steps = range(len(rewards)) if self.write_steps == "all" else [len(rewards) - 1]
        return self.add([
            Experience(observation=observations[t], action=actions[t], reward=rewards[t], return_to_go=returns[t],
                       episode_return=total, outcome=outcome, lesson=lesson,
                       metadata=dict(metadata or {}, step=t, steps=len(rewards)))
            for t in steps
        ])

    def delete(self, ids: int | Iterable[int]) -> int:
        """Remove entries by id; returns how many were removed (unknown ids are ignored)."""
        ids = [int(ids)] if isinstance(ids, (int, np.integer)) else [int(i) for i in ids]
        present = [i for i in dict.fromkeys(ids) if i in self.entries]
        if present:
            self.index.remove_ids(np.asarray(present, dtype=np.int64))
            for i in present:
                del self.entries[i]
        return len(present)

    def delete_where(self, predicate: Callable[[Experience], bool]) -> int:
        """Remove every entry for which ``predicate(experience)`` is true; returns how many."""
        return self.delete([i for i, e in self.entries.items() if predicate(e)])

    def clear(self) -> None:
        self.index.reset()
        self.entries.clear()

    def _evict(self, needed: int) -> None:
        if needed <= 0:
            return
        count = min(len(self.entries), max(needed, self.capacity // 64, 1))
        ids = np.fromiter(self.entries.keys(), dtype=np.int64, count=len(self.entries))
        if self.eviction == "oldest":
            victims = np.sort(ids)[:count]
        else:
            returns = np.array([self.entries[i].return_to_go for i in ids.tolist()])
            order = np.lexsort((ids, returns))  # lowest return first, then oldest
            victims = ids[order[:count]]
        self.delete(victims.tolist())

    # ------------------------------------------------------------------ reading
    def _embed(self, texts: list[str]) -> np.ndarray:
        for t in texts:
            if not isinstance(t, str):
                raise TypeError(f"memory texts must be str, got {type(t).__name__}: {t!r:.80}")
        vectors = np.asarray(self.embedder(list(texts)), dtype=np.float32)
        if vectors.shape != (len(texts), self.dim):
            raise MemoryStoreError(
                f"embedder {self.embedder.name} returned shape {vectors.shape}; expected ({len(texts)}, {self.dim})"
            )
        return np.ascontiguousarray(vectors)

    def search(self, queries: str | Sequence[str], k: int | None = None) -> list[Retrieved] | list[list[Retrieved]]:
        """The ``k`` best entries for a query text (a list of them for a list of queries), best first."""
        single = isinstance(queries, str)
        texts = [queries] if single else list(queries)
        results = self.search_vectors(self._embed(texts), k) if texts else []
        return results[0] if single else results

    def search_vectors(self, vectors: np.ndarray, k: int | None = None) -> list[list[Retrieved]]:
        """Like :meth:`search` for query vectors already embedded (shape ``(n, dim)``, normalised)."""
        k = self.k if k is None else int(k)
        if k < 1:
            raise ValueError(f"k={k}; expected at least 1")
        n = len(vectors)
        if not self.entries:
            return [[] for _ in range(n)]
        weighted = self.return_weight != 0.0 or self.recency_weight != 0.0
        pool = min(len(self.entries), k * self.oversample if weighted else k)
        sims, ids = self._search_index(np.ascontiguousarray(vectors, dtype=np.float32), pool)
        newest = self._next_id - 1
        out = []
        for row_sims, row_ids in zip(sims.tolist(), ids.tolist()):
            found = []
            for s, i in zip(row_sims, row_ids):
                if i < 0 or (self.min_similarity is not None and s < self.min_similarity):
                    continue
                e = self.entries[i]
                score = s
                if weighted:
                    score += self.return_weight * math.tanh(e.return_to_go)
                    score += self.recency_weight * 0.5 ** ((newest - i) / self.recency_half_life)
                found.append(Retrieved(e, float(s), float(score)))
            found.sort(key=lambda r: (-r.score, -r.experience.id))
            out.append(found[:k])
        return out

    def _search_index(self, vectors: np.ndarray, pool: int):
        if self.search_threads is None:
            return self.index.search(vectors, pool)
        previous = self._faiss.omp_get_max_threads()
        self._faiss.omp_set_num_threads(self.search_threads)
        try:
            return self.index.search(vectors, pool)
        finally:
            self._faiss.omp_set_num_threads(previous)

    # ------------------------------------------------------------------ persistence
    def config(self) -> dict:
        return {
            "capacity": self.capacity, "k": self.k, "eviction": self.eviction, "return_weight": self.return_weight,
            "recency_weight": self.recency_weight, "recency_half_life": self.recency_half_life,
            "min_similarity": self.min_similarity, "oversample": self.oversample, "gamma": self.gamma,
            "write_steps": self.write_steps, "search_threads": self.search_threads, "index": self.index_type,
        }

    def save(self, path: str | os.PathLike) -> Path:
        """Write the store to the folder ``path`` (created if needed); see :mod:`rllama.memory.store`."""
        return save_store(self, path)

    @classmethod
    def load(cls, path: str | os.PathLike, embedder=None, **overrides) -> EpisodicMemory:
        """Read a store written by :meth:`save` (:mod:`rllama.memory.store`).

        Args:
            embedder: the embedder to use; by default the one recorded in the store (the embedded
                MiniLM, a hashing embedder, or the recorded sentence-transformers path). One passed
                here must be the one that wrote the store (same type, name and width), else
                :class:`MemoryStoreError`; a custom embedder must be passed.
            overrides: config fields to change (``k=8``, ``return_weight=0.5``, ...); a
                ``write_filter`` (a function, not saved) is passed here again.
        """
        return load_store(cls, path, embedder, overrides)


__all__ = ["EpisodicMemory", "Experience", "Retrieved", "MemoryStoreError", "SentenceEmbedder", "HashingEmbedder"]
