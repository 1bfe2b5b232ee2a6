"""Policy models: loading (embedded default, local paths, hub ids), LoRA + heads, scoring, generation."""

from rllama.policy.loading import DEFAULT_MODEL, INSTALL_DEFAULT_MODEL, load_model, resolve_model_path
from rllama.policy.model import (
    GeneratedReply,
    PolicyModel,
    StepEvaluation,
    ValueHead,
    build_policy,
    default_lora_config,
)

__all__ = [
    "DEFAULT_MODEL",
    "INSTALL_DEFAULT_MODEL",
    "GeneratedReply",
    "PolicyModel",
    "StepEvaluation",
    "ValueHead",
    "build_policy",
    "default_lora_config",
    "load_model",
    "resolve_model_path",
]
