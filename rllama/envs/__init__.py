"""Environment adapters and vector-env helpers.

Importing ``rllama`` registers ``rllama/TextWorld-v0`` with Gymnasium (TextWorld itself is imported
only when the env is made): ``gym.make("rllama/TextWorld-v0", games=...)``.
"""

from gymnasium.envs.registration import register, registry

from rllama.envs.vector import make_vector_env, unbatch

if "rllama/TextWorld-v0" not in registry:
    register(id="rllama/TextWorld-v0", entry_point="rllama.envs.textworld:TextWorldEnv", max_episode_steps=50)

__all__ = ["make_vector_env", "unbatch"]
