"""The policy: a causal LM with a LoRA adapter and a value head, trained together.

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
import hashlib
import inspect
import json
import math
import os
import shutil
import warnings
from array import array
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from rllama.errors import ModelNotFoundError, RLlamaError
from rllama.fileio import recover_dir, writing_dir
from rllama.policy.prefix_cache import (
    DEFAULT_CACHE_MB,
    FrozenBottom,
    attention_mask,
    holds_lora,
    length_groups,
    segment_mask,
    supports_split,
)

POLICY_FILE = "policy.json"
REFERENCE_MEMO_ENTRIES = 100_000
"""Steps whose reference distributions a :class:`PolicyModel` with the prefix cache remembers (about 30 MB)."""
SCORE_MEMO_ENTRIES = 100_000
"""Continuations whose token log-probabilities are remembered per adapter state (about 30 MB each; the
policy's and the reference's, two at most)."""
HEADS_FILE = "heads.safetensors"
ADAPTER_DIR = "adapter"
FORMAT_VERSION = 1


def candidate_score(token_logprobs: Sequence[float], normalization: str) -> float:
    """A candidate's score from its tokens' log-probs (the last token being its end-of-turn token):
    their sum, or (``"mean"``) the mean over the text tokens plus the last token's log-prob.
    :meth:`PolicyModel._candidate_scores` computes the same on tensors."""
    lps = [float(x) for x in token_logprobs]
    if normalization == "sum" or len(lps) < 2:
        return sum(lps)
    return sum(lps[:-1]) / (len(lps) - 1) + lps[-1]


def pca_whitening(x: torch.Tensor, k: int, floor: float = 1e-7) -> tuple[torch.Tensor, torch.Tensor]:
    """``(mean [H], basis [H, k])`` such that ``(x - mean) @ basis`` holds the top ``k`` principal
    components of the rows of ``x``, each at variance ``1/k``; directions with less than ``floor``
    times the largest variance get a zero column. Computed in ``x``'s dtype (see
    :meth:`ValueHead.fit_whitening`)."""
    mean = x.mean(0)
    variances, directions = torch.linalg.eigh((x - mean).T @ (x - mean) / len(x))
    variances, directions = variances.flip(0)[:k], directions.flip(1)[:, :k]
    kept = variances > float(variances[0]) * floor
    return mean, torch.where(kept, directions / variances.clamp(min=1e-30).sqrt(), 0.0) / math.sqrt(k)


class ValueHead(nn.Module):
    """Scalar head on a hidden state, computed in float32.

    The hidden state is layer-normalised (no learned scale) and divided by ``sqrt(hidden_size)``
    first, so the head's input has unit norm whatever the model: a language model's final hidden
    states have norms of 40 or more, and on those one AdamW step at the head's learning rate moves
    the value by about 0.5, which kept the critic from fitting at all (explained variance about 0 on
    Blackjack; see ``docs/algorithms.md``). Starts at zero output so the first advantages are the
    plain returns.

    With ``whiten=k`` the head reads the input's top ``k`` principal components, each scaled to unit
    variance (PCA whitening), fitted once by :meth:`fit_whitening` from inputs the head will see;
    until then it outputs its bias. A language model's features are badly conditioned for a linear
    head trained by gradient steps: on Blackjack the directions that tell the states apart carry a
    millionth of the variance of the first one, so a head on raw features learns "always stick"
    while one on whitened features learns the state-dependent policy (``docs/algorithms/dqn.md``).
    """

    def __init__(self, hidden_size: int, out_features: int = 1, whiten: int = 0) -> None:
        super().__init__()
        if not 0 <= whiten <= hidden_size:
            raise ValueError(f"whiten={whiten!r}; expected 0 (off) up to the hidden size {hidden_size}")
        self.hidden_size, self.whiten = int(hidden_size), int(whiten)
        self.linear = nn.Linear(whiten or hidden_size, out_features)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)
        if whiten:
            self.register_buffer("white_mean", torch.zeros(hidden_size))
            self.register_buffer("white_basis", torch.zeros(hidden_size, whiten))  # zero until fitted
            self.register_buffer("white_fitted", torch.zeros((), dtype=torch.bool))

    def _normalised(self, hidden: torch.Tensor) -> torch.Tensor:
        size = hidden.shape[-1]
        return nn.functional.layer_norm(hidden.float(), (size,)) / math.sqrt(size)

    @property
    def fitted(self) -> bool:
        """Whether the whitening has been fitted (always true without whitening)."""
        return not self.whiten or bool(self.white_fitted)

    @torch.no_grad()
    def fit_whitening(self, hidden: torch.Tensor, floor: float = 1e-7) -> None:
        """Fit the whitening from ``hidden`` ``[N, H]`` (hidden states the head will read), once.

        Each of the top ``k`` principal directions of the normalised inputs is scaled by the inverse
        square root of its variance, and by ``1/sqrt(k)`` so the whitened input has unit norm on
        average. Directions whose variance is below ``floor`` times the largest one are left out
        (their components read as 0): the sample does not span them, and scaling them up would turn
        an unseen state into a huge input. Refitting would change what the trained weights mean, so
        a fitted head refuses; the weights are reset to zero here.
        """
        if not self.whiten:
            raise RLlamaError("this head has no whitening (whiten=0)")
        if self.fitted:
            raise RLlamaError("this head's whitening is already fitted; it is fitted once, before training")
        if hidden.ndim != 2 or hidden.shape[1] != self.hidden_size or len(hidden) < 2:
            raise RLlamaError(f"fit_whitening needs hidden states [N >= 2, {self.hidden_size}], "
                              f"got {tuple(hidden.shape)}")
        x = self._normalised(hidden).double()
        if not torch.isfinite(x).all():
            raise RLlamaError("fit_whitening got non-finite hidden states")
        mean, basis = pca_whitening(x, self.whiten, floor)
        self.white_mean.copy_(mean.float())
        self.white_basis.copy_(basis.float())
        self.white_fitted.fill_(True)
        self.linear.weight.zero_()
        self.linear.bias.zero_()

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:  # [B, H] -> [B, out]
        x = self._normalised(hidden)
        if self.whiten:
            x = (x - self.white_mean) @ self.white_basis  # all zero until fitted: the output is the bias
        return self.linear(x)


LLAMA_LINEAR_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


POLICY_HEAD = "policy"
"""Name of the optional head whose output on a candidate's features is added to its logit (see
``OnPolicyConfig.policy_head``)."""

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


@dataclass
class Continuations:
    """Log-probabilities of token continuations of several prompts (see ``continuation_logprobs``)."""

    prompt_hidden: torch.Tensor  # [B, H] last hidden state of each prompt
    token_logprobs: torch.Tensor  # [R, L] log p of each continuation token, 0 at padding
    mask: torch.Tensor  # [R, L] 1 for real tokens
    entropy: torch.Tensor | None  # [R, L] entropy of the next-token distribution, or None
    action_hidden: torch.Tensor  # [R, H] hidden state after the continuation's text (before its last token)


@dataclass
class CandidateOutputs:
    """Per prompt: the policy's log-probabilities over its candidates and each head's values.

    ``q[name][b]`` is ``[K_b]``: head ``name`` applied to the hidden state of prompt ``b`` followed
    by each candidate's text (the state-action features of value-based algorithms).
    """

    logprobs: list[torch.Tensor]
    values: torch.Tensor  # [B]
    q: dict[str, list[torch.Tensor]]


@dataclass
class GeneratedReply:
    """A sampled reply: token ids (ending with the stop token if one was produced) and their log-probs."""

    token_ids: list[int]
    token_logprobs: list[float]
    value: float


@dataclass
class StepEvaluation:
    """What the policy says about a batch of steps (used by the algorithms' losses).

    ``distributions[i]`` holds the log-probabilities that define step ``i``'s action: for a scored
    step the log-softmax over its candidates (``[K]``), for a generated step the log-probability
    of each reply token (``[n]``). ``entropy`` is the candidates' entropy (scored) or the mean
    next-token entropy over the reply (generated).
    """

    values: torch.Tensor | None  # [S]
    distributions: list[torch.Tensor]
    entropy: torch.Tensor | None  # [S]
    action_indices: list[int | None]

    def unit_logprobs(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Log-probability of each *unit* of the chosen actions and the step each unit belongs to.

        A scored step is one unit (its chosen candidate); a generated step has one unit per token.
        Returns ``(logprobs [U], step_index [U])``.
        """
        parts, owners = [], []
        for i, (dist, idx) in enumerate(zip(self.distributions, self.action_indices)):
            part = dist[idx : idx + 1] if idx is not None else dist
            parts.append(part)
            owners.append(torch.full((part.numel(),), i, dtype=torch.long))
        return torch.cat(parts), torch.cat(owners)


class PolicyModel(nn.Module):
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
            keeps the model's full preference) or ``"sum"`` (the text's log-likelihood).
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
        if score_normalization not in ("mean", "sum"):
            raise ValueError(f"score_normalization={score_normalization!r}; expected 'mean' or 'sum'")
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
        self.base_model_name = getattr(config, "_name_or_path", "") or ""
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

    # ------------------------------------------------------------------ named adapters
    @property
    def active_adapter(self) -> str:
        """The adapter that acts and trains (PEFT's active adapter; ``"default"`` at first)."""
        return self.lm.active_adapter

    def list_adapters(self) -> list[str]:
        """Names of the LoRA adapters this model holds."""
        return list(self.lm.peft_config)

    def add_adapter(self, name: str, lora_config=None) -> None:
        """Add a new LoRA adapter ``name`` (zero-initialised B: it starts as the base model)."""
        if not isinstance(name, str) or not name.strip() or "." in name:
            raise ValueError(f"adapter name {name!r}: expected a non-empty string without dots")
        if name in self.list_adapters():
            raise RLlamaError(f"adapter {name!r} already exists; adapters: {self.list_adapters()}")
        active = self.active_adapter
        self.lm.add_adapter(name, lora_config or self._default_lora_config(self._causal_lm()))
        self.lm.set_adapter(active)  # keeps the active adapter trainable and the new one frozen
        self.to(self.device)
        self._adapters_changed()

    def set_adapter(self, name: str) -> None:
        """Make ``name`` the adapter that acts and trains (its parameters trainable, the others frozen)."""
        self._require_adapter(name)
        self.lm.set_adapter(name)

    def delete_adapter(self, name: str) -> None:
        """Remove adapter ``name`` (not the active one)."""
        self._require_adapter(name)
        if name == self.active_adapter:
            raise RLlamaError(f"adapter {name!r} is active; set_adapter(another) before deleting it")
        self.lm.delete_adapter(name)
        self._adapters_changed()

    def adapter_parameters(self, name: str | None = None) -> list[nn.Parameter]:
        """The LoRA parameters of adapter ``name`` (default: the active one)."""
        name = name or self.active_adapter
        self._require_adapter(name)
        return [p for n, p in self.lm.named_parameters() if "lora_" in n and f".{name}." in f"{n}."]

    @contextlib.contextmanager
    def using_adapter(self, name: str | None):
        """Context in which adapter ``name`` is active (``None``: the base model, adapters disabled)."""
        if name is None:
            with self.reference():
                yield
            return
        self._require_adapter(name)
        previous = self.active_adapter
        if name != previous:
            self.lm.set_adapter(name)
        try:
            yield
        finally:
            if name != previous:
                self.lm.set_adapter(previous)

    def save_adapter(self, name: str, path: str | os.PathLike) -> Path:
        """Write adapter ``name`` alone (PEFT format, safetensors) to folder ``path``, atomically."""
        self._require_adapter(name)
        path = Path(path)
        with writing_dir(path) as tmp:
            self.lm.save_pretrained(str(tmp), selected_adapters=[name], safe_serialization=True)
            found = _adapter_folder(tmp)
            if found != tmp:  # PEFT nests non-default adapters in a subfolder; keep one flat layout
                for f in found.iterdir():
                    shutil.move(str(f), str(tmp / f.name))
                shutil.rmtree(found)
        return path

    def load_adapter(self, name: str, path: str | os.PathLike) -> None:
        """Load an adapter saved by :meth:`save_adapter` (or any PEFT LoRA folder) as adapter ``name``."""
        path = Path(path)
        if not (path / "adapter_config.json").is_file():
            raise ModelNotFoundError(f"{str(path)!r} holds no PEFT adapter (adapter_config.json is missing)")
        if name in self.list_adapters():
            raise RLlamaError(f"adapter {name!r} already exists; delete_adapter({name!r}) first or pick another name")
        active = self.active_adapter
        try:
            self.lm.load_adapter(str(path), adapter_name=name, is_trainable=True)
        except (ValueError, RuntimeError, KeyError) as exc:
            raise RLlamaError(f"cannot load the adapter at {str(path)!r} into this model: {exc}") from exc
        self.lm.set_adapter(active)
        self.to(self.device)
        self._adapters_changed()

    def _check_adapted_blocks(self, path: Path) -> None:
        """A checkpoint whose adapter covers other blocks than this policy's gets an error saying how to match it."""
        config_file = path / ADAPTER_DIR / "adapter_config.json"
        if not config_file.is_file():
            return
        saved = json.loads(config_file.read_text()).get("layers_to_transform")
        ours = getattr(self.lm.peft_config[self.active_adapter], "layers_to_transform", None)
        norm = (lambda v: None if v is None else sorted([v] if isinstance(v, int) else v))
        if norm(saved) != norm(ours):
            layers = "'all'" if saved is None else f"{norm(saved)}"
            raise RLlamaError(
                f"checkpoint {str(path)!r} adapts {_blocks_text(norm(saved))}, this policy adapts "
                f"{_blocks_text(norm(ours))}; build the agent with lora_config=default_lora_config(layers={layers}) "
                "to load it (checkpoints made before rllama adapted the top 8 blocks by default adapt every block)")

    def _require_adapter(self, name: str) -> None:
        if name not in self.list_adapters():
            raise RLlamaError(f"no adapter named {name!r}; adapters: {self.list_adapters()}")

    @contextlib.contextmanager
    def reference(self):
        """Context in which the model is the reference policy: the base model, adapter disabled (and
        the policy head, if any, left out)."""
        outer, self._in_reference = self._in_reference, True
        try:
            with self.lm.disable_adapter():
                yield
        finally:
            self._in_reference = outer

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

    # ------------------------------------------------------------------ forward machinery
    def _forward_prompts(self, prompts: Sequence[Sequence[int]], use_cache: bool, bottom_kv: bool = False):
        """Left-padded forward of the prompts. Returns (last hidden [B,H], cache, mask [B,L], lengths [B]).

        Prompts of one batch usually share a long prefix (the system prompt, often the first
        turns): it runs once and its key/value cache is shared by every row. With the prefix cache
        active, the returned cache holds the adapted blocks' keys and values, and, with
        ``bottom_kv``, the frozen blocks' too (what generation extends).
        """
        if not prompts or any(len(p) == 0 for p in prompts):
            raise RLlamaError("every prompt must hold at least one token")
        B = len(prompts)
        # Leave at least one token per row after the shared prefix.
        shared = min(_common_prefix_length(prompts), min(len(p) for p in prompts) - 1) if B > 1 else 0
        if shared < self.min_shared_prefix:
            shared = 0
        if self.prefix_cache_active:
            return self._forward_prompts_split(prompts, shared, bottom_kv)
        cache = None
        if shared:
            prefix = torch.as_tensor([list(prompts[0][:shared])], dtype=torch.long, device=self.device)
            with self._autocast():
                cache = _cache_of(self._body()(input_ids=prefix, use_cache=True))
            cache.batch_repeat_interleave(B)
        L = max(len(p) for p in prompts) - shared
        ids = torch.full((B, L), self.pad_id, dtype=torch.long)
        mask = torch.zeros((B, L), dtype=torch.long)
        for i, p in enumerate(prompts):
            n = len(p) - shared
            ids[i, L - n :] = torch.as_tensor(p[shared:], dtype=torch.long)
            mask[i, L - n :] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        positions = shared + (mask.cumsum(-1) - 1).clamp(min=0)
        if shared:
            mask = torch.cat([torch.ones((B, shared), dtype=torch.long, device=self.device), mask], dim=1)
        with self._autocast():
            out = self._body()(
                input_ids=ids, attention_mask=mask, position_ids=positions, **self._cache_arg(cache),
                use_cache=use_cache or bool(shared),
            )
        lengths = mask.sum(-1)
        return out.last_hidden_state[:, -1], _cache_of(out), mask, lengths

    def _top_cache_usable(self) -> bool:
        """Whether this forward may read the adapted blocks' states from the top tree: no gradients wanted,
        and the adapters as they were when the tree was filled (else the tree is emptied first)."""
        if not self.prefix_cache_active or torch.is_grad_enabled():
            return False
        signature = self._adapter_signature()
        self._bottom.check_top(signature)
        memo = self._score_memos.get(signature)
        if memo is None:  # weights not seen (recently): the memos of older ones are dropped
            memo = self._score_memos[signature] = OrderedDict()
            while len(self._score_memos) > 2:
                self._score_memos.popitem(last=False)
        self._score_memos.move_to_end(signature)
        self._score_memo = memo
        return True

    def _adapter_signature(self) -> tuple:
        """What the adapted blocks compute with: the active and enabled adapters, and each LoRA weight's
        version counter and sum (the sum catches changes that bypass the counter, such as ``.data`` writes
        and fused optimizers). Adapters that add nothing (disabled, or every ``B`` weight of the active
        ones zero, as a fresh adapter is) compute the base model's function: they share one signature,
        so a frozen, untrained adapter and the reference reuse each other's states and scores."""
        probe, params, outputs = self._lora_probe
        if probe is None:
            return ()
        active = tuple(probe.active_adapters)
        adds_nothing = outputs is not None and not any(p.detach().any() for a in active for p in outputs.get(a, ()))
        if probe.disable_adapters or adds_nothing:
            return ("base model",)
        sums = torch.stack([p.detach().float().sum() for p in params]).tolist() if params else []
        return (active, tuple(p._version for p in params), tuple(sums))

    @property
    def _lora_probe(self):
        """One LoRA layer (it says which adapters are active and whether they are disabled), every LoRA
        weight, and each adapter's output (``B``) weights (``None`` for DoRA, where a zero ``B`` still
        rescales the weights); found again after the adapters change."""
        if self._probe is None:
            layer = next((m for m in self.lm.modules() if holds_lora(m)), None)
            named = [(n, p) for n, p in self.lm.named_parameters() if "lora_" in n]
            outputs: dict[str, list[nn.Parameter]] | None = {}
            for n, p in named:
                for marker in ("lora_B.", "lora_embedding_B."):
                    if marker in n:
                        outputs.setdefault(n.split(marker, 1)[1].split(".")[0], []).append(p)
            if any("lora_magnitude" in n for n, _ in named):
                outputs = None
            self._probe = (layer, [p for _, p in named], outputs)
        return self._probe

    def _hidden_from_top_tree(self, prompts, continuations, owner, Lc: int):
        """``(prompt_hidden [B, H], hidden [R, Lc, H])`` of :meth:`_continuation_logprobs` from the top tree."""
        bottom, norm = self._bottom, self._body().norm
        with self._autocast():
            states = bottom.top_states(prompts)  # [len_b, H] each, before the final norm
            prompt_hidden = norm(torch.stack([s[-1] for s in states]))  # [B, H]
        owner_t = torch.as_tensor(list(owner), dtype=torch.long, device=self.device)
        hidden = prompt_hidden[owner_t].unsqueeze(1)  # [R, 1, H]
        if Lc == 1:
            return prompt_hidden, hidden
        R = len(continuations)
        rows = [r for r, c in enumerate(continuations) if len(c) > 1]
        rest = prompt_hidden.new_zeros((R, Lc - 1, prompt_hidden.shape[-1]))  # [R, Lc-1, H]
        if rows:
            seqs = [list(prompts[owner[r]]) + list(continuations[r][:-1]) for r in rows]
            with self._autocast():
                tails = bottom.top_states(seqs)
                parts = [t[len(t) - (len(continuations[r]) - 1) :] for r, t in zip(rows, tails)]
                normed = norm(torch.cat(parts))
            index_r = [r for r in rows for _ in range(len(continuations[r]) - 1)]
            index_c = [c for r in rows for c in range(len(continuations[r]) - 1)]
            rest = rest.index_put((torch.as_tensor(index_r, device=self.device),
                                   torch.as_tensor(index_c, device=self.device)), normed.to(rest.dtype))
        return prompt_hidden, torch.cat([hidden, rest], dim=1)

    def _forward_prompts_split(self, prompts, shared: int, bottom_kv: bool):
        """:meth:`_forward_prompts` over boundary states from the prefix cache: only the adapted blocks run."""
        from transformers import DynamicCache

        bottom, B = self._bottom, len(prompts)
        with self._autocast():
            states = bottom.boundary(prompts, want_kv=bottom_kv)
        hiddens = [s[0] for s in states] if bottom_kv else states  # [len_b, H] each
        cache = DynamicCache()
        if shared:
            ones = torch.ones((1, shared), dtype=torch.long, device=self.device)
            with self._autocast():
                bottom.top(hiddens[0][None, :shared], bottom.causal(ones, shared),
                           torch.arange(shared, device=self.device)[None], cache, True)
            cache.batch_repeat_interleave(B)
        L = max(len(p) for p in prompts) - shared
        x = hiddens[0].new_zeros((B, L, hiddens[0].shape[-1]))  # [B, L, H], left-padded
        mask = torch.zeros((B, L), dtype=torch.long, device=self.device)
        for i, h in enumerate(hiddens):
            n = len(h) - shared
            x[i, L - n :] = h[shared:]
            mask[i, L - n :] = 1
        positions = shared + (mask.cumsum(-1) - 1).clamp(min=0)
        if shared:
            mask = torch.cat([torch.ones((B, shared), dtype=torch.long, device=self.device), mask], dim=1)
        with self._autocast():
            last = bottom.top(x, bottom.causal(mask, L), positions, cache, True)  # [B, L, H]
        if bottom_kv:  # the frozen blocks' keys and values in the same layout: [shared | left-padded rest]
            keys, values = [s[1] for s in states], [s[2] for s in states]
            k0 = keys[0]
            shape = (bottom.split, B, k0.shape[1], shared + L, k0.shape[3])
            past_k, past_v = k0.new_zeros(shape), values[0].new_zeros(shape)
            for i, (k, v) in enumerate(zip(keys, values)):
                n = k.shape[2] - shared
                past_k[:, i, :, :shared], past_k[:, i, :, shared + L - n :] = k[:, :, :shared], k[:, :, shared:]
                past_v[:, i, :, :shared], past_v[:, i, :, shared + L - n :] = v[:, :, :shared], v[:, :, shared:]
            for layer in range(bottom.split):
                cache.update(past_k[layer], past_v[layer], layer)
        return last[:, -1], cache, mask, mask.sum(-1)

    def continuation_logprobs(
        self,
        prompts: Sequence[Sequence[int]],
        continuations: Sequence[Sequence[int]],
        owner: Sequence[int],
        entropy_rows: Sequence[bool] | None = None,
        logprobs: bool = True,
    ) -> Continuations:
        """Log-probability of each token of each continuation given its prompt, in two passes.

        The prompts run once (left-padded); continuation ``r`` then extends prompt ``owner[r]``
        through the shared key/value cache, so K candidates of one prompt cost K short rows rather
        than K copies of the prompt.

        Args:
            prompts: ``B`` token-id lists.
            continuations: ``R`` non-empty token-id lists.
            owner: ``R`` prompt indices.
            entropy_rows: rows whose next-token entropies are wanted (``None``: none).
            logprobs: ``False`` skips the projection to the vocabulary (the log-probs are then zeros):
                for callers that want only the hidden states, such as Q heads.
        """
        if len(continuations) != len(owner):
            raise ValueError(f"{len(continuations)} continuations but {len(owner)} owners")
        if any(len(c) == 0 for c in continuations):
            raise RLlamaError("every continuation must hold at least one token")
        if not prompts or any(len(p) == 0 for p in prompts):
            raise RLlamaError("every prompt must hold at least one token")
        if self._top_cache_usable():
            return self._continuation_logprobs(prompts, continuations, owner, entropy_rows, top_cached=True,
                                               logprobs=logprobs)
        groups = length_groups([len(p) for p in prompts], _common_prefix_length(prompts) if len(prompts) > 1 else 0)
        if len(groups) == 1:
            return self._continuation_logprobs(prompts, continuations, owner, entropy_rows, logprobs=logprobs)
        # Prompts of very different lengths run in groups of similar length: left padding costs
        # every adapted block the padded positions, and one group per length wastes little.
        rows_of: list[list[int]] = [[] for _ in prompts]
        for r, b in enumerate(owner):
            rows_of[b].append(r)
        parts, order_b, order_r = [], [], []
        for g in groups:
            local = {b: i for i, b in enumerate(g)}
            rows = [r for b in g for r in rows_of[b]]
            parts.append(self._continuation_logprobs(
                [prompts[b] for b in g], [continuations[r] for r in rows], [local[owner[r]] for r in rows],
                None if entropy_rows is None else [entropy_rows[r] for r in rows], logprobs=logprobs))
            order_b += g
            order_r += rows
        return _merge_continuations(parts, order_b, order_r, self.device)

    def _continuation_logprobs(self, prompts, continuations, owner, entropy_rows, top_cached=False,
                               logprobs=True) -> Continuations:
        """:meth:`continuation_logprobs` of one batch of prompts (left-padded to the longest), or, with
        ``top_cached``, of hidden states from the prefix cache's top tree."""
        R, Lc = len(continuations), max(len(c) for c in continuations)
        owner_t = torch.as_tensor(list(owner), dtype=torch.long, device=self.device)
        if top_cached:
            prompt_hidden, hidden = self._hidden_from_top_tree(prompts, continuations, owner, Lc)
        else:
            prompt_hidden, cache, pmask, plen = self._forward_prompts(prompts, use_cache=Lc > 1)
            hidden = prompt_hidden[owner_t].unsqueeze(1)  # [R, 1, H]: predicts each continuation's first token
            if Lc > 1:
                rest = self._packed_continuations(prompts, continuations, list(owner), cache, pmask, plen, Lc)
                hidden = torch.cat([hidden, rest], dim=1)  # [R, Lc, H]
        cont = torch.full((R, Lc), self.pad_id, dtype=torch.long)
        cmask = torch.zeros((R, Lc), dtype=torch.long)
        for r, c in enumerate(continuations):
            cont[r, : len(c)] = torch.as_tensor(c, dtype=torch.long)
            cmask[r, : len(c)] = 1
        cont, cmask = cont.to(self.device), cmask.to(self.device)

        # The state after reading a continuation's text: the position that predicts its last token
        # (the end-of-turn token for candidates), so the text itself is seen in full.
        last = cmask.sum(-1) - 1
        action_hidden = hidden[torch.arange(R, device=self.device), last]
        token_logprobs = torch.zeros((R, Lc), dtype=torch.float32, device=self.device)
        if not logprobs:
            return Continuations(prompt_hidden, token_logprobs, cmask, None, action_hidden)
        want_entropy = entropy_rows is not None and any(entropy_rows)
        # From the top tree (a frozen adapter), rows seen before take their log-probs from the memo.
        keys = self._score_keys(prompts, continuations, owner) if top_cached and not want_entropy else None
        todo = torch.ones(R, dtype=torch.bool)
        if keys is not None:
            for r, key in enumerate(keys):
                known = self._score_memo.get(key)
                if known is not None:
                    self._score_memo.move_to_end(key)
                    token_logprobs[r, : len(known)] = known
                    todo[r] = False
        # Project only the real positions to the vocabulary: the lm head is a fifth of the model.
        rows, cols = (cmask * todo.to(cmask.device)[:, None]).nonzero(as_tuple=True)
        with self._autocast():
            logits = self._lm_head()(hidden[rows, cols])  # [N, V]
        logp = F.log_softmax(logits.float() / self.temperature, dim=-1)
        token_logprobs = token_logprobs.index_put((rows, cols), logp.gather(-1, cont[rows, cols, None]).squeeze(-1))
        if keys is not None:
            for r in todo.nonzero().flatten().tolist():
                self._score_memo[keys[r]] = token_logprobs[r, : len(continuations[r])].clone()
            while len(self._score_memo) > SCORE_MEMO_ENTRIES:
                self._score_memo.popitem(last=False)
        entropy = None
        if want_entropy:
            want = torch.as_tensor(list(entropy_rows), dtype=torch.bool, device=self.device)[rows]
            ent = torch.zeros((R, Lc), dtype=torch.float32, device=self.device)
            lp = logp[want]
            entropy = ent.index_put((rows[want], cols[want]), -(lp.exp() * lp).sum(-1))
        return Continuations(prompt_hidden, token_logprobs, cmask, entropy, action_hidden)

    def _packed_continuations(self, prompts, continuations, owner: list[int], cache, pmask, plen,
                              Lc: int) -> torch.Tensor:
        """Hidden states of every continuation token but the last, ``[R, Lc-1, H]`` (zeros past a row's end).

        All continuations of one prompt are packed into one row after that prompt's key/value cache,
        with a block mask: each token sees its prompt and the earlier tokens of its own continuation.
        The prompt's cache is never copied per continuation, so K candidates cost K short segments
        of one row, not K copies of the prompt (which, for long prompts with many candidates, is
        what memory is spent on).
        """
        B = pmask.shape[0]
        segments: list[list[tuple[int, int]]] = [[] for _ in range(B)]  # per prompt: (row, start in packed row)
        lengths = [0] * B
        for r, (c, b) in enumerate(zip(continuations, owner)):
            segments[b].append((r, lengths[b]))
            lengths[b] += len(c) - 1
        Q = max(max(lengths), 1)
        ids = torch.full((B, Q), self.pad_id, dtype=torch.long)
        pos = torch.zeros((B, Q), dtype=torch.long)
        seg = torch.full((B, Q), -1, dtype=torch.long)  # which continuation a packed token belongs to
        for b in range(B):
            for r, start in segments[b]:
                n = len(continuations[r]) - 1
                if n:
                    ids[b, start : start + n] = torch.as_tensor(continuations[r][:-1], dtype=torch.long)
                    pos[b, start : start + n] = torch.arange(n)
                    seg[b, start : start + n] = r
        ids, seg = ids.to(self.device), seg.to(self.device)
        positions = plen.unsqueeze(1) + pos.to(self.device)
        # [B, 1, Q, Kp + Q]: the prompt (where it is not padding), and causally within the same segment
        sees_prompt = pmask.bool()[:, None, :].expand(B, Q, pmask.shape[1])
        allowed = torch.cat([sees_prompt, segment_mask(seg)], dim=2)[:, None]
        if self.prefix_cache_active:
            packed = self._packed_top(prompts, continuations, segments, allowed, positions, cache, Q)
        else:
            packed = self._packed_body(ids, allowed, positions, cache)
        return self._unpack(packed, continuations, segments, Lc)

    def _packed_body(self, ids, allowed, positions, cache) -> torch.Tensor:
        """The whole body over packed continuation tokens ``ids`` ``[B, Q]``; returns ``[B, Q, H]``."""
        mask = attention_mask(allowed, self._eager_attention(), self._mask_dtype())
        with self._autocast():
            packed = self._body()(
                input_ids=ids, attention_mask=mask, position_ids=positions, **self._cache_arg(cache), use_cache=False,
            ).last_hidden_state  # [B, Q, H]
        return packed

    def _packed_top(self, prompts, continuations, segments, allowed, positions, cache, Q: int) -> torch.Tensor:
        """The adapted blocks over packed continuation tokens, their boundary states from the prefix cache."""
        rows = [(b, r, start) for b, segs in enumerate(segments) for r, start in segs if len(continuations[r]) > 1]
        seqs = [list(prompts[b]) + list(continuations[r][:-1]) for b, r, _ in rows]
        with self._autocast():
            states = self._bottom.boundary(seqs) if seqs else []
        x = torch.zeros((len(segments), Q, self.hidden_size), device=self.device,
                        dtype=states[0].dtype if states else torch.float32)  # [B, Q, H]
        for (b, r, start), h in zip(rows, states):
            n = len(continuations[r]) - 1
            x[b, start : start + n] = h[-n:]
        with self._autocast():
            return self._bottom.top(x, allowed, positions, cache, False)

    def _unpack(self, packed, continuations, segments, Lc: int) -> torch.Tensor:
        """One row per continuation ``[R, Lc-1, H]`` from the packed rows ``[B, Q, H]``."""
        B = packed.shape[0]
        R = len(continuations)
        rows, cols, src_b, src_q = [], [], [], []
        for b in range(B):
            for r, start in segments[b]:
                n = len(continuations[r]) - 1
                rows += [r] * n
                cols += list(range(n))
                src_b += [b] * n
                src_q += list(range(start, start + n))
        out = packed.new_zeros((R, Lc - 1, packed.shape[-1]))
        if rows:
            index = (torch.as_tensor(rows, device=self.device), torch.as_tensor(cols, device=self.device))
            out = out.index_put(index, packed[torch.as_tensor(src_b, device=self.device),
                                              torch.as_tensor(src_q, device=self.device)])
        return out

    def values(self, prompts: Sequence[Sequence[int]]) -> torch.Tensor:
        """Value estimates ``[B]`` of the prompts."""
        hidden, _, _, _ = self._forward_prompts(prompts, use_cache=False)
        return self.heads["value"](hidden).squeeze(-1)

    def _candidate_scores(self, enc: Continuations) -> torch.Tensor:
        summed = enc.token_logprobs.sum(-1)  # [R]
        if self.score_normalization == "sum":
            return summed
        # "mean": the mean over the candidate's text tokens plus its last (end-of-turn) token. Averaging
        # the end-of-turn token in with a one-token action word would halve the model's own preference.
        lengths = enc.mask.sum(-1)
        last = enc.token_logprobs.gather(1, (lengths.long() - 1).clamp(min=0).unsqueeze(1)).squeeze(1)
        text = (lengths - 1).clamp(min=1)
        return torch.where(lengths > 1, (summed - last) / text + last, summed)

    def _policy_scores(self, enc: Continuations) -> torch.Tensor:
        """The candidates' logits ``[R]``: their scores over the temperature, plus the policy head's
        output on their features when the policy has one (:data:`POLICY_HEAD`; not in the reference)."""
        scores = self._candidate_scores(enc) / self.temperature
        if POLICY_HEAD in self.heads and not self._in_reference:
            scores = scores + self.heads[POLICY_HEAD](enc.action_hidden).squeeze(-1)
        return scores

    def score_candidates(
        self, prompts: Sequence[Sequence[int]], candidates: Sequence[Sequence[Sequence[int]]]
    ) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Policy log-probabilities over each prompt's candidate actions, and the prompts' values.

        Args:
            prompts: ``B`` token-id lists.
            candidates: for each prompt, the token ids of each candidate action.

        Returns:
            ``(logprobs, values)``: ``logprobs[b]`` is ``[K_b]`` (a log-softmax over prompt ``b``'s
            candidates); ``values`` is ``[B]``.
        """
        out = self.candidate_outputs(prompts, candidates)
        return out.logprobs, out.values

    def candidate_outputs(
        self,
        prompts: Sequence[Sequence[int]],
        candidates: Sequence[Sequence[Sequence[int]]],
        q_heads: Sequence[str] = (),
        frozen_body: bool = False,
        scores: bool = True,
    ) -> CandidateOutputs:
        """Like :meth:`score_candidates`, plus the values of state-action heads ``q_heads``.

        With ``frozen_body`` the model runs without gradients (so the prefix cache serves every
        block it holds) and only the heads keep theirs: what a head-only update needs. With
        ``scores=False`` the candidates are not projected to the vocabulary (most of a cached
        pass's cost) and ``logprobs`` are uniform placeholders: for Q-value targets.
        """
        flat = [c for cands in candidates for c in cands]
        owner = [b for b, cands in enumerate(candidates) for _ in cands]
        with torch.no_grad() if frozen_body else contextlib.nullcontext():
            enc = self.continuation_logprobs(prompts, flat, owner, logprobs=scores)
        sizes = [len(c) for c in candidates]
        scores = self._policy_scores(enc)  # [R]
        values = self.heads["value"](enc.prompt_hidden).squeeze(-1)
        q = {name: list(torch.split(self.heads[name](enc.action_hidden).squeeze(-1), sizes)) for name in q_heads}
        return CandidateOutputs(_segment_log_softmax(scores, sizes), values, q)

    @torch.no_grad()
    def features(self, prompts: Sequence[Sequence[int]], candidates: Sequence[Sequence[Sequence[int]]],
                 batch_size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
        """The hidden states heads read: ``(prompt [B, H], action [sum of K_b, H])``, in batches of prompts."""
        prompt_parts, action_parts = [], []
        for start in range(0, len(prompts), batch_size):
            chunk = candidates[start:start + batch_size]
            flat = [c for cands in chunk for c in cands]
            owner = [b for b, cands in enumerate(chunk) for _ in cands]
            enc = self.continuation_logprobs(prompts[start:start + batch_size], flat, owner, logprobs=False)
            prompt_parts.append(enc.prompt_hidden)
            action_parts.append(enc.action_hidden)
        return torch.cat(prompt_parts).float(), torch.cat(action_parts).float()

    def action_features(self, prompts, candidates, batch_size: int = 32) -> torch.Tensor:
        """The hidden states a state-action head reads, ``[sum of K_b, H]`` (see :meth:`features`)."""
        return self.features(prompts, candidates, batch_size)[1]

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

    @torch.no_grad()
    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        max_new_tokens: int = 32,
        greedy: bool = False,
        stop_token_ids: Iterable[int] = (),
        generator: torch.Generator | None = None,
    ) -> list[GeneratedReply]:
        """Sample one reply per prompt from ``softmax(logits / temperature)``.

        Stops a row at the first stop token (kept in the reply, so training learns when to stop)
        or after ``max_new_tokens``. Finished rows leave the batch.
        """
        stop = set(int(t) for t in stop_token_ids)
        hidden, cache, mask, lengths = self._forward_prompts(prompts, use_cache=True, bottom_kv=True)
        values = self.heads["value"](hidden).squeeze(-1).tolist()
        replies = [GeneratedReply([], [], v) for v in values]
        active = torch.arange(len(prompts), device=self.device)
        positions = lengths.clone()
        for _ in range(max_new_tokens):
            with self._autocast():
                logits = self._lm_head()(hidden)
            logp = F.log_softmax(logits.float() / self.temperature, dim=-1)  # [A, V]
            if greedy:
                tokens = logp.argmax(-1)
            else:
                tokens = torch.multinomial(logp.exp().cpu(), 1, generator=generator).squeeze(-1).to(self.device)
            chosen = logp.gather(-1, tokens[:, None]).squeeze(-1)
            keep = []
            for j, (row, tok, lp) in enumerate(zip(active.tolist(), tokens.tolist(), chosen.tolist())):
                replies[row].token_ids.append(tok)
                replies[row].token_logprobs.append(lp)
                if tok not in stop:
                    keep.append(j)
            if not keep:
                break
            if len(keep) < len(active):
                keep_t = torch.as_tensor(keep, device=self.device)
                cache.batch_select_indices(keep_t)
                active, tokens, mask, positions = active[keep_t], tokens[keep_t], mask[keep_t], positions[keep_t]
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            with self._autocast():
                out = self._body()(
                    input_ids=tokens[:, None], attention_mask=mask, position_ids=positions[:, None],
                    **self._cache_arg(cache), use_cache=True,
                )
            hidden, cache = out.last_hidden_state[:, -1], _cache_of(out)
            positions = positions + 1
        return replies

    def evaluate_actions(self, steps, with_values: bool = True, with_entropy: bool = True,
                 frozen_body: bool = False) -> StepEvaluation:
        """Re-evaluate stored steps under the current parameters (with gradients if enabled).

        One batched pass serves scored and generated steps alike. With ``frozen_body`` the model runs
        without gradients (through the prefix cache) and only the heads keep theirs.
        """
        prompts = [s.prompt_ids for s in steps]
        conts, owner, ent_rows, spans = [], [], [], []
        for i, s in enumerate(steps):
            rows = s.candidate_ids if s.is_scored else [s.response_ids]
            spans.append((len(conts), len(rows)))
            conts.extend(rows)
            owner.extend([i] * len(rows))
            ent_rows.extend([with_entropy and not s.is_scored] * len(rows))
        with torch.no_grad() if frozen_body else contextlib.nullcontext():
            enc = self.continuation_logprobs(prompts, conts, owner, entropy_rows=ent_rows)
        scores = self._policy_scores(enc)  # [R], meaningful for scored rows
        dists, entropies, indices = [], [], []
        for s, (start, n) in zip(steps, spans):
            if s.is_scored:
                logp = F.log_softmax(scores[start : start + n], dim=-1)
                dists.append(logp)
                entropies.append(-(logp.exp() * logp).sum())
                indices.append(s.action_index)
            else:
                m = enc.mask[start].bool()
                dists.append(enc.token_logprobs[start][m])
                if with_entropy:
                    entropies.append(enc.entropy[start][m].mean())
                indices.append(None)
        values = self.heads["value"](enc.prompt_hidden).squeeze(-1) if with_values else None
        entropy = torch.stack(entropies) if with_entropy else None
        return StepEvaluation(values, dists, entropy, indices)

    def evaluate(self, steps, **kwargs) -> StepEvaluation:
        """Deprecated name of :meth:`evaluate_actions` (``agent.evaluate`` plays episodes; this scores steps)."""
        warnings.warn("PolicyModel.evaluate is renamed evaluate_actions", DeprecationWarning, stacklevel=2)
        return self.evaluate_actions(steps, **kwargs)

    @torch.no_grad()
    def reference_distributions(self, steps, batch_size: int = 16) -> list[torch.Tensor]:
        """Each step's action distribution under the reference policy (the base model, adapter disabled).

        The reference never changes, so with the prefix cache active each distinct step (prompt
        and candidates, or prompt and reply) is computed once and remembered, up to
        ``REFERENCE_MEMO_ENTRIES`` steps (least recently used forgotten): a state met again costs
        nothing in later updates. Without the cache every call computes afresh (so that resumed
        runs stay bit for bit).
        """
        memo = self._reference_memo if self.prefix_cache_active else None
        keys = [self._step_key(s) for s in steps] if memo is not None else [None] * len(steps)
        out: list[torch.Tensor | None] = [None] * len(steps)
        todo = []
        for i, key in enumerate(keys):
            if key is not None and key in memo:
                memo.move_to_end(key)
                out[i] = memo[key]
            else:
                todo.append(i)
        with self.reference():
            for start in range(0, len(todo), batch_size):
                part = todo[start : start + batch_size]
                ev = self.evaluate_actions([steps[i] for i in part], with_values=False, with_entropy=False)
                for i, dist in zip(part, ev.distributions):
                    out[i] = dist
                    if memo is not None:
                        memo[keys[i]] = dist
        while memo is not None and len(memo) > REFERENCE_MEMO_ENTRIES:
            memo.popitem(last=False)
        return out

    def _score_keys(self, prompts, continuations, owner) -> list[bytes]:
        """Per continuation, a digest of what its token log-probs depend on besides the weights: the
        temperature, its prompt and its tokens."""
        heads = []
        for ids in prompts:
            h = hashlib.blake2b(digest_size=16)
            h.update(f"{self.temperature!r}|".encode())
            h.update(array("l", ids).tobytes())
            heads.append(h)
        keys = []
        for c, b in zip(continuations, owner):
            h = heads[b].copy()
            h.update(b"|")
            h.update(array("l", c).tobytes())
            keys.append(h.digest())
        return keys

    def _step_key(self, step) -> bytes:
        """A digest of what defines a step's reference distribution (its tokens and the scoring settings)."""
        h = hashlib.blake2b(digest_size=16)
        h.update(f"{self.temperature!r}|{self.score_normalization}|{step.is_scored}".encode())
        for ids in [step.prompt_ids, *(step.candidate_ids or [step.response_ids])]:
            h.update(len(ids).to_bytes(4, "little"))
            h.update(array("l", ids).tobytes())
        return h.digest()

    # ------------------------------------------------------------------ persistence
    def save(self, path: str | os.PathLike, extra: dict | None = None) -> Path:
        """Write the adapter and heads (safetensors) and a JSON config into folder ``path``, atomically."""
        from safetensors.torch import save_file

        path = Path(path)
        with writing_dir(path) as tmp:
            self.lm.save_pretrained(str(tmp / ADAPTER_DIR), safe_serialization=True)
            save_file({k: v.detach().cpu().contiguous() for k, v in self.heads.state_dict().items()},
                      str(tmp / HEADS_FILE))
            meta = {
                "format_version": FORMAT_VERSION,
                "base_model": self.base_model_name,
                "hidden_size": self.hidden_size,
                "precision": self.precision,
                "score_normalization": self.score_normalization,
                "temperature": self.temperature,
                "heads": sorted(self.heads.keys()),
                **(extra or {}),
            }
            (tmp / POLICY_FILE).write_text(json.dumps(meta, indent=2))
        return path

    def load(self, path: str | os.PathLike) -> dict:
        """Load adapter and head weights saved by :meth:`save`; returns the saved JSON config."""
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        path = recover_dir(path)
        meta_file = path / POLICY_FILE
        if not meta_file.is_file():
            raise ModelNotFoundError(f"{str(path)!r} is not an rllama checkpoint: {POLICY_FILE} is missing")
        meta = json.loads(meta_file.read_text())
        if meta.get("hidden_size") != self.hidden_size:
            raise RLlamaError(
                f"checkpoint {str(path)!r} was saved for a model of hidden size {meta.get('hidden_size')}, "
                f"this policy's base model has {self.hidden_size} (base model of the checkpoint: "
                f"{meta.get('base_model')!r})"
            )
        adapter_file = path / ADAPTER_DIR / "adapter_model.safetensors"
        heads_file = path / HEADS_FILE
        for f in (adapter_file, heads_file):
            if not f.is_file():
                raise ModelNotFoundError(f"checkpoint {str(path)!r} is incomplete: {f.name} is missing")
        self._check_adapted_blocks(path)
        result = set_peft_model_state_dict(self.lm, load_file(str(adapter_file), device=str(self.device)))
        missing_lora = [k for k in getattr(result, "missing_keys", []) if "lora_" in k]
        if missing_lora or getattr(result, "unexpected_keys", []):
            raise RLlamaError(
                f"checkpoint {str(path)!r} does not match this adapter: missing {missing_lora[:3]}, "
                f"unexpected {list(getattr(result, 'unexpected_keys', []))[:3]}"
            )
        try:
            self.heads.load_state_dict(load_file(str(heads_file), device=str(self.device)), strict=True)
        except RuntimeError as e:
            raise RLlamaError(
                f"checkpoint {str(path)!r} holds heads {meta.get('heads')} that do not match this policy's "
                f"{sorted(self.heads.keys())}: a head with whitening (DQN's and SAC's whiten_features, the "
                f"on-policy policy_head, SAC's actor with train_adapter=False) has another shape than one "
                f"without; build the agent with the algorithm config the checkpoint was trained with (since "
                f"rllama's issue 21 a scoring agent's defaults add these heads: a checkpoint from before needs "
                f"policy_head=0 on-policy, or train_adapter=True and whiten_features=0 for SAC) "
                f"({str(e).splitlines()[0]})"
            ) from None
        self.score_normalization = meta.get("score_normalization", self.score_normalization)
        self.temperature = float(meta.get("temperature", self.temperature))
        return meta


def _merge_continuations(parts: list[Continuations], order_b: list[int], order_r: list[int], device) -> Continuations:
    """One :class:`Continuations` from those of groups of prompts, in the original order of prompts and rows."""
    inv_b = torch.as_tensor(order_b, device=device).argsort()
    inv_r = torch.as_tensor(order_r, device=device).argsort()
    Lc = max(p.token_logprobs.shape[1] for p in parts)

    def rows(name: str) -> torch.Tensor:
        out = []
        for p in parts:
            t = getattr(p, name)
            if t is None:
                t = torch.zeros_like(p.token_logprobs)
            out.append(F.pad(t, (0, Lc - t.shape[1])))
        return torch.cat(out)[inv_r]

    entropy = rows("entropy") if any(p.entropy is not None for p in parts) else None
    return Continuations(torch.cat([p.prompt_hidden for p in parts])[inv_b], rows("token_logprobs"), rows("mask"),
                         entropy, torch.cat([p.action_hidden for p in parts])[inv_r])


def _blocks_text(layers) -> str:
    return "every block" if layers is None else f"blocks {sorted(layers)}"


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


def _adapter_folder(root: Path) -> Path:
    for cfg in sorted(root.rglob("adapter_config.json")):
        return cfg.parent
    raise RLlamaError(f"PEFT wrote no adapter_config.json under {root}")


def _cache_of(output):
    """The key/value cache of a model output (``cache`` in transformers 5.x, ``past_key_values`` before)."""
    cache = getattr(output, "cache", None)
    return cache if cache is not None else getattr(output, "past_key_values", None)


def _common_prefix_length(seqs: Sequence[Sequence[int]]) -> int:
    """Length of the longest common prefix of token-id sequences."""
    first, n = seqs[0], min(len(s) for s in seqs)
    for i in range(n):
        t = first[i]
        if any(s[i] != t for s in seqs):
            return i
    return n


def _segment_log_softmax(scores: torch.Tensor, sizes: Sequence[int]) -> list[torch.Tensor]:
    """Log-softmax over consecutive segments of ``scores`` (one segment per prompt)."""
    out, start = [], 0
    for n in sizes:
        out.append(F.log_softmax(scores[start : start + n], dim=-1))
        start += n
    return out


def build_policy(model=None, tokenizer=None, **kwargs) -> PolicyModel:
    """A :class:`PolicyModel` for what an agent was given: ``None`` (the embedded default model), a
    local folder or hub id, a transformers causal LM with its ``tokenizer``, or a PolicyModel (returned
    as is). ``kwargs`` go to :class:`PolicyModel`."""
    from rllama.policy.loading import load_model

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
