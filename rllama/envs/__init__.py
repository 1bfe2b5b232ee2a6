"""Environment adapters and vector-env helpers."""

from rllama.envs.vector import make_vector_env, unbatch

__all__ = ["make_vector_env", "unbatch"]
