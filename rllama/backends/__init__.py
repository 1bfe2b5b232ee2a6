"""Backends: where the agent's acting forward passes run.

The agent scores candidate actions and samples replies through a :class:`Backend`:

- :class:`InProcessBackend` runs the agent's own :class:`~rllama.policy.PolicyModel` (log-probs, the
  value head and Q heads in one pass): the reference, and what scoring agents use.
- :class:`LlamaCppBackend` samples replies with llama.cpp on the model's GGUF file, the adapter swapped
  in after every update; generating agents on a CPU use it by default when ``llama-cpp-python`` is
  installed (``pip install "rllama[llamacpp]"``) and the model has a GGUF counterpart.
- :class:`OpenAIBackend` sends the requests to a server that speaks the OpenAI completions API (vLLM,
  SGLang), with the adapter synced after each update.

Steps acted outside the learner keep the log-probs they were sampled with (the behaviour policy); the
learner recomputes its own before each update and corrects for the difference with capped importance
weights (:meth:`rllama.algorithms.Algorithm.recompute_behaviour`).
"""

from rllama.backends.base import Backend, InProcessBackend, check_can_serve, make_backend
from rllama.backends.llamacpp import LlamaCppBackend
from rllama.backends.openai import OpenAIBackend

__all__ = ["Backend", "InProcessBackend", "LlamaCppBackend", "OpenAIBackend", "check_can_serve", "make_backend"]
