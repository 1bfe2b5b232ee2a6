"""Forward engines: how a policy's forward passes run, behind one small interface (:class:`Engine`).

- :class:`PlainEngine`: the whole model every pass; the reference the others are tested against.
- :class:`CachedEngine`: the frozen blocks' states (and a frozen adapter's) kept in radix trees over
  token ids, outputs of pairs seen before in a memo; the default where LoRA leaves blocks frozen.

:func:`make_engine` chooses one for a model. Engines are given the model's parts (:class:`ModelParts`)
and never import the policy; ``docs/contributing.md`` says how to add one.
"""

from rllama.policy.engine.base import Engine, ModelParts, PromptStates
from rllama.policy.engine.cached import DEFAULT_CACHE_MB, CachedEngine, make_engine
from rllama.policy.engine.memo import BASE_MODEL, AdapterSignature, ContinuationMemo
from rllama.policy.engine.plain import PlainEngine
from rllama.policy.engine.radix import RadixCache
from rllama.policy.engine.split import supports_split

__all__ = ["BASE_MODEL", "DEFAULT_CACHE_MB", "AdapterSignature", "CachedEngine", "ContinuationMemo", "Engine",
           "ModelParts", "PlainEngine", "PromptStates", "RadixCache", "make_engine",
           "supports_split"]
