"""rllama: train LLM agents online with reinforcement learning in any Gymnasium environment.

Quick start::

    from rllama import RLlamaAgent

    class BlackjackAgent(RLlamaAgent):
        def get_system_prompt(self): ...
        def format_observation(self, observation): ...
        def extract_action(self, response): ...

    agent = BlackjackAgent()              # embedded SmolLM2-135M-Instruct, PPO on a LoRA adapter
"""

import rllama.envs  # noqa: F401  (registers the envs rllama ships with Gymnasium: rllama/TextWorld-v0, ...)
from rllama.agent import RLlamaAgent, set_seed
from rllama.algorithms import (
    PPO,
    Algorithm,
    AlgorithmConfig,
    PPOConfig,
    available,
    make_algorithm,
    register_algorithm,
)
from rllama.callbacks import Callback
from rllama.errors import (
    AgentStateError,
    CorruptFileError,
    HookError,
    InvalidActionError,
    MissingExtraError,
    ModelNotFoundError,
    RLlamaError,
)
from rllama.loops import run_episodes
from rllama.policy import DEFAULT_MODEL, PolicyModel, default_lora_config, load_model
from rllama.prompting import ChatFormat

__version__ = "0.1.0"

__all__ = [
    "Callback",
    "DEFAULT_MODEL",
    "PPO",
    "AgentStateError",
    "Algorithm",
    "AlgorithmConfig",
    "ChatFormat",
    "CorruptFileError",
    "HookError",
    "InvalidActionError",
    "MissingExtraError",
    "ModelNotFoundError",
    "PPOConfig",
    "PolicyModel",
    "RLlamaAgent",
    "RLlamaError",
    "available",
    "default_lora_config",
    "load_model",
    "make_algorithm",
    "register_algorithm",
    "run_episodes",
    "set_seed",
    "__version__",
]
