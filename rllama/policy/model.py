"""The policy: a causal LM with a LoRA adapter and a value head, trained together.

The class is assembled from one mixin per concern, each in its own module: named adapters and the
reference policy (:mod:`~rllama.policy.adapters`), forward passes (:mod:`~rllama.policy.forward`,
:mod:`~rllama.policy.packing`), scores, features and step evaluation (:mod:`~rllama.policy.scoring`),
generation (:mod:`~rllama.policy.generation`) and the saved folder (:mod:`~rllama.policy.persistence`);
heads are in :mod:`~rllama.policy.heads` and the returned records in :mod:`~rllama.policy.outputs`.
This module holds construction and the heads and weight snapshots.

The reference policy (for KL penalties) is the same network with the adapter disabled, so there is
never a second copy of the base model in memory. Only the adapter and the heads are trainable and
only they are saved (safetensors + JSON, never pickle).

Two ways to act, sharing one batched forward machinery (:meth:`PolicyModel.continuation_logprobs`):

* **scoring**: every candidate action text is scored as the log-likelihood of that text (and the
  end-of-turn token) after the prompt; the policy is the softmax over the scores. The prompts of all
  environments go through the model once and their key/value cache is shared by every candidate.
* **generation**: a reply is sampled token by token from ``softmax(logits / temperature)``; the
  sampling loop is ours so that each token's log-probability and the prompt's value come for free.
"""

from __future__ import annotations

import contextlib
import inspect
import threading
import warnings
from collections import OrderedDict
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from rllama.errors import RLlamaError
from rllama.policy.adapters import AdapterMixin
from rllama.policy.forward import SCORE_MEMO_ENTRIES, ForwardMixin
from rllama.policy.generation import GenerationMixin
from rllama.policy.heads import POLICY_HEAD, ValueHead, pca_whitening
from rllama.policy.loading import load_model, model_identity
from rllama.policy.outputs import (
    SCORE_NORMALIZATIONS,
    CandidateOutputs,
    Continuations,
    GeneratedReply,
    StepEvaluation,
    candidate_score,
)
from rllama.policy.packing import PackingMixin
from rllama.policy.persistence import ADAPTER_DIR, FORMAT_VERSION, HEADS_FILE, POLICY_FILE, PersistenceMixin
from rllama.policy.prefix_cache import (
    DEFAULT_CACHE_MB,
    FrozenBottom,
    supports_split,
)
from rllama.policy.scoring import REFERENCE_MEMO_ENTRIES, ScoringMixin

__all__ = [  # re-exported: this module is where they were first defined
    "ADAPTER_DIR", "FORMAT_VERSION", "HEADS_FILE", "POLICY_FILE", "POLICY_HEAD", "REFERENCE_MEMO_ENTRIES",
    "SCORE_MEMO_ENTRIES", "CandidateOutputs", "Continuations", "GeneratedReply", "PolicyModel", "StepEvaluation",
    "ValueHead", "build_policy", "candidate_score", "cpu_bf16_pays", "default_lora_config", "pca_whitening",
    "resolve_precision",
]

LLAMA_LINEAR_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

DEFAULT_TOP_BLOCKS = 8
"""Transformer blocks a :class:`PolicyModel` adapts by default, counted from the top (see ``docs/scaling.md``)."""


def default_lora_config(r: int = 16, alpha: int = 32, dropout: float = 0.0, target_modules=None, layers=None):
    """LoRA settings: rank 16, alpha 32 on every linear layer of the chosen transformer blocks.

    A :class:`PolicyModel` given no ``lora_config`` uses ``default_lora_config(layers=<its top 8 blocks>)``
    on Llama-family models (the blocks below are frozen and their states cached, see
    :mod:`rllama.policy.prefix_cache`) and ``default_lora_config()`` on others.

    Args:
        target_modules: module names to adapt (default: every linear layer, ``"all-linear"``; with
            ``layers``, the Llama-family projections ``LLAMA_LINEAR_MODULES``, since PEFT needs names
            then — give your architecture's names for others).
        layers: transformer block indices that get adapters; ``None`` or ``"all"``: every block.
            Adapting only the top blocks (e.g. ``range(22, 30)`` of SmolLM2-135M's 30) makes acting
            and updates cheaper: the frozen blocks run once per new token prefix, and backward stops
            below the lowest adapted block.
    """
    from peft import LoraConfig

    extra = {}
    if isinstance(layers, str):
        if layers != "all":
            raise ValueError(f"layers={layers!r}: give 'all' or a list of block indices")
        layers = None
    if layers is not None:
        layers = [int(i) for i in layers]
        if not layers or min(layers) < 0:
            raise ValueError(f"layers={layers}: give one or more block indices, each 0 or more")
        extra = {"layers_to_transform": layers, "layers_pattern": "layers"}
        if target_modules is None:
            target_modules = list(LLAMA_LINEAR_MODULES)
        elif isinstance(target_modules, str):
            raise ValueError(f"target_modules={target_modules!r} with layers=: PEFT needs module names then "
                             f"(a list such as {list(LLAMA_LINEAR_MODULES)})")
    elif target_modules is None:
        target_modules = "all-linear"
    return LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=target_modules, bias="none",
                      task_type="CAUSAL_LM", **extra)


class PolicyModel(AdapterMixin, ForwardMixin, PackingMixin, ScoringMixin, GenerationMixin, PersistenceMixin,
                  nn.Module):
    """A causal LM with a LoRA adapter and a value head.

    Args:
        model: a transformers causal LM (``PreTrainedModel``). Its weights are frozen.
        tokenizer: its tokenizer.
        lora_config: a ``peft.LoraConfig``; when ``None``, :func:`default_lora_config` on the top
            :data:`DEFAULT_TOP_BLOCKS` blocks of Llama-family models, on every block of others.
        device: where to run; defaults to the model's device.
        precision: ``"fp32"``, ``"bf16"`` (bfloat16 autocast of the matmuls; faster on some CPUs with
            AVX512-BF16 or AMX, slower on others, and the usual choice on GPUs) or ``"auto"`` (the
            default: bf16 on GPUs that run it natively and on CPUs where it is measured faster, see
            :func:`resolve_precision`; else fp32). Parameters, optimizer state, log-softmax and
            losses stay in float32 either way.
        prefix_cache: ``"auto"`` (default), ``True`` or ``False``: the frozen-prefix cache
            (:mod:`rllama.policy.prefix_cache`); ``"auto"`` uses it where blocks below the adapters
            are frozen, ``True`` makes a model where it cannot work an error.
        prefix_cache_mb: its bound in MiB (``0``: off); a quarter of it again bounds the adapted
            blocks' trees used while no gradient is taken (one per recent adapter state).
        score_normalization: how a candidate's token log-probs become its score: ``"mean"``
            (default: the mean over its text tokens plus the log-prob of its last, end-of-turn
            token, so long candidates are not penalised for their length and a one-word action
            keeps the model's full preference), ``"sum"`` (the text's log-likelihood), or ``"none"``:
            every candidate scores 0, so the policy is its policy head alone (uniform until the head
            learns) and its reference policy is uniform. For candidate texts whose likelihood says
            nothing about the action's worth (a sentence describing each move: the model prefers
            some phrasings whatever the state), and it saves the projection onto the vocabulary.
            Needs an algorithm with a head that chooses (a policy or Q head).
        temperature: the policy is ``softmax(logits / temperature)`` in generate mode and
            ``softmax(scores / temperature)`` in scoring mode, when acting and when training.

    Example:
        >>> policy = PolicyModel(model, tokenizer)  # doctest: +SKIP
        >>> scores, values = policy.score_candidates([prompt_ids], [[stick_ids, hit_ids]])  # doctest: +SKIP
    """

    def __init__(
        self,
        model,
        tokenizer,
        lora_config=None,
        device: str | torch.device | None = None,
        precision: str = "auto",
        score_normalization: str = "mean",
        temperature: float = 1.0,
        prefix_cache: bool | str = "auto",
        prefix_cache_mb: float = DEFAULT_CACHE_MB,
    ) -> None:
        super().__init__()
        from peft import PeftModel, get_peft_model

        if precision not in ("auto", "fp32", "bf16"):
            raise ValueError(f"precision={precision!r}; expected 'auto', 'fp32' or 'bf16'")
        if score_normalization not in SCORE_NORMALIZATIONS:
            raise ValueError(f"score_normalization={score_normalization!r}; expected one of "
                             f"{list(SCORE_NORMALIZATIONS)}")
        if not temperature > 0:
            raise ValueError(f"temperature={temperature!r}; expected a positive number")
        if prefix_cache not in ("auto", True, False):
            raise ValueError(f"prefix_cache={prefix_cache!r}; expected 'auto', True or False")
        if not prefix_cache_mb >= 0:
            raise ValueError(f"prefix_cache_mb={prefix_cache_mb!r}; expected 0 (no cache) or a positive size in MiB")
        self.tokenizer = tokenizer
        self.score_normalization = score_normalization
        self.temperature = float(temperature)
        if isinstance(model, PeftModel):
            self.lm = model
        else:
            for p in model.parameters():
                p.requires_grad_(False)
            with warnings.catch_warnings():
                # PEFT reads transformers' deprecated `is_gradient_checkpointing`; not the user's concern.
                warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
                self.lm = get_peft_model(model, lora_config or self._default_lora_config(model))
        config = self.lm.get_base_model().config
        self.base_model_name = model_identity(getattr(config, "_name_or_path", "") or "")
        hidden = getattr(config, "hidden_size", None) or config.n_embd
        self.heads = nn.ModuleDict({"value": ValueHead(hidden)})
        self.device = torch.device(device) if device is not None else next(self.lm.parameters()).device
        self.precision = resolve_precision(precision, self.device)
        self.to(self.device)
        self.pad_id = self._pick_pad_id(tokenizer)
        # Shared prompt prefixes at least this long run once per batch (see _forward_prompts).
        self.min_shared_prefix = 8
        self.lm.eval()  # dropout off: acting and training must see the same function
        self._probe = None  # see _lora_probe
        self._bottom = self._make_frozen_bottom(prefix_cache, prefix_cache_mb)
        self._reference_memo: OrderedDict[bytes, torch.Tensor] = OrderedDict()
        # Token log-probs of (prompt, continuation) pairs, one memo per adapter state (the top tree's
        # signature, see _top_cache_usable; the policy's and the reference's survive each other's
        # passes): a frozen adapter's scores are computed once per pair.
        self._score_memos: OrderedDict[tuple, OrderedDict[bytes, torch.Tensor]] = OrderedDict()
        self._score_memo: OrderedDict[bytes, torch.Tensor] = OrderedDict()
        self._in_reference = False  # the policy head is part of the trained policy, not of the reference
        # Held by whoever switches the active adapter or changes weights: an agent acting or updating, a
        # SkillModel's learning steps and generations. Threads sharing this policy take turns through it.
        self.lock = threading.RLock()

    # ------------------------------------------------------------------ structure
    @staticmethod
    def _pick_pad_id(tokenizer) -> int:
        for name in ("pad_token_id", "eos_token_id", "unk_token_id"):
            value = getattr(tokenizer, name, None)
            if value is not None:
                return int(value)
        return 0

    @property
    def hidden_size(self) -> int:
        return self.heads["value"].hidden_size

    def _causal_lm(self):
        return self.lm.get_base_model()

    def _body(self):
        lm = self._causal_lm()
        return getattr(lm, lm.base_model_prefix)

    def _lm_head(self):
        return self._causal_lm().get_output_embeddings()

    @staticmethod
    def _default_lora_config(model):
        """The top :data:`DEFAULT_TOP_BLOCKS` blocks of a Llama-family model; every linear layer of others."""
        body = getattr(model, getattr(model, "base_model_prefix", ""), None)
        n = len(body.layers) if body is not None and supports_split(body) else 0
        if n <= DEFAULT_TOP_BLOCKS:
            return default_lora_config()
        return default_lora_config(layers=range(n - DEFAULT_TOP_BLOCKS, n))

    def _eager_attention(self) -> bool:
        """Whether the model's attention takes additive float masks (``"eager"``) rather than boolean ones."""
        return getattr(self._causal_lm().config, "_attn_implementation", "sdpa") == "eager"

    def _mask_dtype(self) -> torch.dtype:
        return torch.bfloat16 if self.precision == "bf16" else next(self._body().parameters()).dtype

    def _make_frozen_bottom(self, prefix_cache, prefix_cache_mb: float) -> FrozenBottom | None:
        """The split forward with its prefix cache, when asked for and when this model has a frozen bottom."""
        if prefix_cache is False or prefix_cache_mb == 0:
            return None
        body = self._body()
        if not supports_split(body):
            if prefix_cache is True:
                raise RLlamaError(
                    f"prefix_cache=True: cannot locate the transformer blocks of {type(self._causal_lm()).__name__} "
                    "(expected a body with embed_tokens, layers, norm and rotary_emb, as Llama, Qwen2 and Mistral "
                    "have); pass prefix_cache=False to run without the cache")
            return None
        attn = "eager" if self._eager_attention() else "sdpa"
        bottom = FrozenBottom(body, int(prefix_cache_mb * 2**20), attn, self._mask_dtype())
        if not bottom.active:
            if prefix_cache is True:
                raise RLlamaError(
                    "prefix_cache=True: every transformer block holds a LoRA adapter, so no block is frozen; "
                    "adapt the top blocks only (default_lora_config(layers=range(22, 30))) or pass prefix_cache=False")
            return bottom
        if not self._split_matches_model(bottom):
            if prefix_cache is True:
                raise RLlamaError(
                    "prefix_cache=True: the split forward pass does not reproduce "
                    f"{type(self._causal_lm()).__name__}'s own; pass prefix_cache=False to run without the cache")
            warnings.warn(f"rllama: the frozen-prefix cache does not support {type(self._causal_lm()).__name__}; "
                          "running without it", stacklevel=3)
            return None
        return bottom

    @torch.no_grad()
    def _split_matches_model(self, bottom: FrozenBottom) -> bool:
        """Check the split forward against the model's own on a few tokens (float32, nothing cached)."""
        ids = [int(t) % self._lm_head().weight.shape[0] for t in (5, 17, 3, 11, 29, 7)]
        want = self._body()(input_ids=torch.as_tensor([ids], device=self.device)).last_hidden_state[0]
        hidden = bottom.boundary([ids])[0][None]
        allowed = bottom.causal(torch.ones((1, len(ids)), dtype=torch.long, device=self.device), len(ids))
        got = bottom.top(hidden, allowed, torch.arange(len(ids), device=self.device)[None])[0]
        bottom.cache.clear()
        return bool(torch.allclose(got, want, atol=1e-4, rtol=1e-4))

    @property
    def prefix_cache_active(self) -> bool:
        """Whether the frozen blocks run only for new token prefixes (see :mod:`rllama.policy.prefix_cache`)."""
        return self._bottom is not None and self._bottom.active

    def prefix_cache_stats(self) -> dict:
        """The prefix cache's bytes, nodes, hit and miss tokens; ``{}`` when it is off."""
        if not self.prefix_cache_active:
            return {}
        return {"frozen_blocks": self._bottom.split, **self._bottom.cache.stats(),
                "top": self._bottom.top_cache.stats(),
                "memo_continuations": sum(len(m) for m in self._score_memos.values())}

    def clear_prefix_cache(self) -> None:
        """Forget every cached prefix and reference distribution (needed only if the base model's weights were
        changed by hand)."""
        if self._bottom is not None:
            self._bottom.cache.clear()
            self._bottom.clear_top()
        self._reference_memo.clear()
        self._score_memos.clear()
        self._score_memo = OrderedDict()

    def _adapters_changed(self) -> None:
        self._probe = None
        if self._bottom is not None:
            self._bottom.refresh()

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The adapter's and heads' parameters (the base model's are frozen)."""
        return [p for p in self.parameters() if p.requires_grad]

    # ------------------------------------------------------------------ forward helpers
    def _cache_arg(self, cache) -> dict:
        """The key/value cache argument under the name this transformers version takes (``cache`` from 5.x on,
        ``past_key_values`` before)."""
        if not hasattr(self, "_cache_name"):
            params = inspect.signature(type(self._body()).forward).parameters
            self._cache_name = "cache" if "cache" in params else "past_key_values"
        return {self._cache_name: cache}

    def _autocast(self):
        if self.precision == "bf16":
            return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def replace_head(self, name: str, whiten: int = 0) -> ValueHead:
        """Replace head ``name`` with a fresh zero-initialised one (``whiten`` as in :class:`ValueHead`,
        capped at the hidden size); only before training, while the head still outputs zero."""
        head = self.heads[name]
        if any(p.detach().abs().sum() > 0 for p in head.parameters()):
            raise RLlamaError(f"head {name!r} has been trained; it can only be replaced before training")
        self.heads[name] = ValueHead(self.hidden_size, head.linear.out_features,
                                     whiten=min(int(whiten), self.hidden_size)).to(self.device)
        return self.heads[name]

    # ------------------------------------------------------------------ heads and weight snapshots
    def add_head(self, name: str, out_features: int = 1, whiten: int = 0) -> ValueHead:
        """Add a zero-initialised head (e.g. a Q head) on the hidden state; returns the existing one if
        present (an error if it was made with another ``whiten``). ``whiten`` is capped at the hidden size."""
        whiten = min(int(whiten), self.hidden_size)
        if name not in self.heads:
            self.heads[name] = ValueHead(self.hidden_size, out_features, whiten=whiten).to(self.device)
        elif self.heads[name].whiten != whiten:
            raise RLlamaError(f"head {name!r} exists with whiten={self.heads[name].whiten}, not {whiten}")
        return self.heads[name]

    def snapshot(self, heads: Sequence[str] | None = None, adapter: bool = True) -> dict[str, torch.Tensor]:
        """A detached copy of the adapter's weights (unless ``adapter=False``) and of the given heads
        (all heads when ``None``).

        Target networks of value-based algorithms are such snapshots: a copy of the adapter and
        heads, never of the base model (heads only when the adapter does not train).
        """
        keep = set(self.heads.keys() if heads is None else heads)
        out = {}
        for name, p in self.named_parameters():
            if not p.requires_grad:
                continue
            if name.startswith("heads."):
                if name.split(".")[1] not in keep:
                    continue
            elif not adapter:
                continue
            out[name] = p.detach().clone()
        return out

    @contextlib.contextmanager
    def weights(self, snapshot: dict[str, torch.Tensor]):
        """Context in which the parameters named in ``snapshot`` hold its values (restored on exit).

        The values are copied into the parameters in place: use it under ``torch.no_grad()`` and
        before (not while) a forward pass whose graph holds the parameters is waiting for backward.
        """
        params = dict(self.named_parameters())
        saved = {name: params[name].detach().clone() for name in snapshot}
        with torch.no_grad():
            for name, value in snapshot.items():
                params[name].copy_(value)
        try:
            yield
        finally:
            with torch.no_grad():
                for name, value in saved.items():
                    params[name].copy_(value)


def resolve_precision(precision: str, device: torch.device) -> str:
    """``"auto"`` becomes ``"bf16"`` where bfloat16 matmuls are native *and* faster, else ``"fp32"``.

    On GPUs, native bf16 support decides. On CPUs, AVX512-BF16 or AMX support is necessary but not
    enough: measured on two 2-core machines of this project, bf16 autocast ran a batched forward
    2.8x faster than fp32 on an AMD EPYC and 0.5x as fast on an Intel Xeon. So where the CPU
    supports bf16, :func:`cpu_bf16_pays` times both once per process and picks the faster.
    """
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    if device.type == "cpu":
        checks = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
        native = any(check is not None and check() for check in checks)
        return "bf16" if native and cpu_bf16_pays() else "fp32"
    return "fp32"


_BF16_PAYS: dict[int, bool] = {}


def cpu_bf16_pays(threads: int | None = None) -> bool:
    """Whether a bf16-autocast matmul of a batched forward's size beats float32 here by 25 % (timed once per
    thread count; about 0.1 s)."""
    import time

    threads = threads or torch.get_num_threads()
    if threads not in _BF16_PAYS:
        x, w = torch.randn(256, 576), torch.randn(1536, 576)

        def best(autocast: bool) -> float:
            times = []
            ctx = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
            with ctx, torch.no_grad():
                for _ in range(7):
                    t = time.perf_counter()
                    F.linear(x, w)
                    times.append(time.perf_counter() - t)
            return min(times[2:])

        fp32, bf16 = best(False), best(True)
        _BF16_PAYS[threads] = bf16 < 0.8 * fp32
    return _BF16_PAYS[threads]


def build_policy(model=None, tokenizer=None, **kwargs) -> PolicyModel:
    """A :class:`PolicyModel` for what an agent was given: ``None`` (the embedded default model), a
    local folder or hub id, a transformers causal LM with its ``tokenizer``, or a PolicyModel (returned
    as is). ``kwargs`` go to :class:`PolicyModel`."""
    if isinstance(model, PolicyModel):
        return model
    if model is None or isinstance(model, (str, bytes)) or hasattr(model, "__fspath__"):
        if tokenizer is not None and model is None:
            raise ValueError("a tokenizer was given without a model; pass both, or neither for the default model")
        lm, loaded_tokenizer = load_model(model)
        tokenizer = tokenizer or loaded_tokenizer
    else:
        if not isinstance(model, torch.nn.Module):
            raise TypeError(
                f"model={type(model).__name__}: expected None, a path or hub id, a transformers causal LM "
                "or a PolicyModel"
            )
        if tokenizer is None:
            raise ValueError("a model object was given without its tokenizer; pass tokenizer=")
        lm = model
    return PolicyModel(lm, tokenizer, **kwargs)
