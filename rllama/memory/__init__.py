"""Memory for agents: episodic memory (FAISS over sentence embeddings) and working memory.

    from rllama.memory import EpisodicMemory, WorkingMemory

    agent = MyAgent(memory=[EpisodicMemory(k=4), WorkingMemory(max_tokens=256)])

See :mod:`rllama.memory.episodic` and :mod:`rllama.memory.working` for the exact rules.
"""

from rllama.memory.embedding import HashingEmbedder, SentenceEmbedder, default_embedding_model_path
from rllama.memory.episodic import EpisodicMemory, Experience, MemoryStoreError, Retrieved
from rllama.memory.working import WorkingMemory

__all__ = [
    "EpisodicMemory",
    "Experience",
    "HashingEmbedder",
    "MemoryStoreError",
    "Retrieved",
    "SentenceEmbedder",
    "WorkingMemory",
    "default_embedding_model_path",
]
