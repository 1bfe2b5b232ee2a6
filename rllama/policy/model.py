"""The policy: a causal LM with LoRA adapters and heads, its forward passes run by one engine.

:class:`PolicyModel` is a plain ``nn.Module``: the language model with its adapters (PEFT), the
heads (:mod:`~rllama.policy.heads`), and the forward engine chosen once when it is built
(:mod:`~rllama.policy.engine`). What it computes is in plain functions over the engine: scores,
features and step evaluation (:mod:`~rllama.policy.scoring`) and generation
(:mod:`~rllama.policy.generation`); its folder is written and read by :mod:`~rllama.policy.persistence`;
the returned records are in :mod:`~rllama.policy.outputs`.

Two ways to act, sharing one engine:

* **scoring**: every candidate action text is scored as the log-likelihood of that text (and the
  end-of-turn token) after the prompt; the policy is the softmax over the scores.
* **generation**: a reply is sampled token by token from ``softmax(logits / temperature)``; the
  sampling loop is ours so that each token's log-probability and the prompt's value come for free.
"""

from __future__ import annotations

import contextlib
import os
import threading
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from rllama.errors import ModelNotFoundError, RLlamaError
from rllama.fileio import recover_dir, verify_dir, writing_dir
from rllama.policy import generation, persistence, scoring
from rllama.policy.engine import DEFAULT_CACHE_MB, Engine, ModelParts, make_engine, supports_split
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
from rllama.policy.persistence import ADAPTER_DIR, FORMAT_VERSION, HEADS_FILE, POLICY_FILE
from rllama.policy.scoring import ScoreRule

__all__ = [  # re-exported: this module is where they were first defined
    "ADAPTER_DIR", "FORMAT_VERSION", "HEADS_FILE", "POLICY_FILE", "POLICY_HEAD", "CandidateOutputs", "Continuations",
    "GeneratedReply", "PolicyModel", "StepEvaluation", "ValueHead", "build_policy", "candidate_score", "cpu_bf16_pays",
    "default_lora_config", "pca_whitening", "resolve_precision",
]

LLAMA_LINEAR_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

DEFAULT_TOP_BLOCKS = 8
"""Transformer blocks a :class:`PolicyModel` adapts by default, counted from the top (see ``docs/scaling.md``)."""


def default_lora_config(r: int = 16, alpha: int = 32, dropout: float = 0.0, target_modules=None, layers=None):
    """LoRA settings: rank 16, alpha 32 on every linear layer of the chosen transformer blocks.

    A :class:`PolicyModel` given no ``lora_config`` uses ``default_lora_config(layers=<its top 8 blocks>)``
    on Llama-family models (the blocks below are frozen and their states cached, see
    :mod:`rllama.policy.engine.cached`) and ``default_lora_config()`` on others.

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


class PolicyModel(nn.Module):
    """A causal LM with LoRA adapters and heads, running its forward passes on one engine.

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
        prefix_cache: ``"auto"`` (default), ``True`` or ``False``: whether the forward passes run on the cached
            engine (:class:`~rllama.policy.engine.CachedEngine`: the frozen blocks' states kept per token
            prefix) or the plain one; ``"auto"`` uses it where blocks below the adapters are frozen, ``True``
            makes a model where it cannot work an error.
        prefix_cache_mb: its bound in MiB (``0``: the plain engine); a quarter of it again bounds the adapted
            blocks' trees used while no gradient is taken (one per recent adapter state).
        score_normalization: how a candidate's token log-probs become its score: ``"mean"``
            (default: the mean over its text tokens plus the log-prob of its last, end-of-turn
            token, so long candidates are not penalised for their length and a one-word action
            keeps the model's full preference), ``"sum"`` (the text's log-likelihood), or ``"none"``:
            every candidate scores 0, so the policy is its policy head alone (uniform until the head
            learns) and its reference policy is uniform. For candidate texts whose likelihood says
            nothing about the action's worth (a sentence describing each move: the model prefers
            some phrasings whatever the state), and it saves the projection onto the vocabulary.
            Needs an algorithm with a head that chooses (a policy or Q head). ``"relative"``: the
            ``"mean"`` score minus the base model's (the adapter disabled), so the untrained policy is
            uniform whatever the prompt makes the model prefer, the adapter learns the difference,
            and the reference policy is uniform; each scoring pass runs the adapted blocks twice (the
            base model's passes are remembered like any frozen output). For a prompt whose model is
            nearly certain of one candidate everywhere (``benchmarks/README.md``, issue 41). A generated
            reply constrained to declared :class:`~rllama.replies.Choices` is relative too: its token
            log-probs minus the base model's, renormalised over the allowed tokens (:meth:`choice_outputs`);
            free text and grammar-shaped replies keep the model's own.
        temperature: the policy is ``softmax(logits / temperature)`` in generate mode and
            ``softmax(scores / temperature)`` in scoring mode, when acting and when training.
        engine: the forward engine to run on, as a function of the model's parts and the PEFT model
            (``lambda parts, lm: PlainEngine(parts)``, or an engine of your own: ``docs/contributing.md``); by default
            :func:`~rllama.policy.engine.make_engine` chooses from ``prefix_cache``.

    The reference policy (for KL penalties) is the same network with the adapter disabled
    (:meth:`reference`), so there is never a second copy of the base model in memory. Only the adapter and
    the heads are trainable and only they are saved (safetensors + JSON, never pickle). Scoring
    (:mod:`~rllama.policy.scoring`) and generation (:mod:`~rllama.policy.generation`) are functions over
    :attr:`engine`; the methods here hand them this policy's heads and settings.

    Example:
        >>> policy = PolicyModel(model, tokenizer)  # doctest: +SKIP
        >>> scores, values = policy.score_candidates([prompt_ids], [[stick_ids, hit_ids]])  # doctest: +SKIP
    """

    def __init__(self, model, tokenizer, lora_config=None, device: str | torch.device | None = None,
                 precision: str = "auto", score_normalization: str = "mean", temperature: float = 1.0,
                 prefix_cache: bool | str = "auto", prefix_cache_mb: float = DEFAULT_CACHE_MB,
                 engine: Callable[[ModelParts, nn.Module], Engine] | None = None) -> None:
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
        if engine is not None and (prefix_cache != "auto" or prefix_cache_mb != DEFAULT_CACHE_MB):
            raise ValueError("engine= chooses the engine; prefix_cache= and prefix_cache_mb= choose one "
                             "of rllama's own: give one or the other")
        if not prefix_cache_mb >= 0:
            raise ValueError(f"prefix_cache_mb={prefix_cache_mb!r}; expected 0 (no cache) or a positive size in MiB")
        self.tokenizer = tokenizer
        self.reply_grammars = None  # set by an agent that declares a Regex or Grammar reply shape (rllama.replies)
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
                self.lm = get_peft_model(model, lora_config or _default_lora_config(model))
        causal = self.lm.get_base_model()
        self.base_model_name = model_identity(getattr(causal.config, "_name_or_path", "") or "")
        hidden = getattr(causal.config, "hidden_size", None) or causal.config.n_embd
        self.heads = nn.ModuleDict({"value": ValueHead(hidden)})
        self.device = torch.device(device) if device is not None else next(self.lm.parameters()).device
        precision = resolve_precision(precision, self.device)
        self.to(self.device)
        self.lm.eval()  # dropout off: acting and training must see the same function
        parts = ModelParts(getattr(causal, causal.base_model_prefix), causal.get_output_embeddings(),
                           _pad_id(tokenizer), self.device, precision)
        self.engine: Engine = (engine(parts, self.lm) if engine is not None
                               else make_engine(parts, self.lm, prefix_cache, prefix_cache_mb))
        self._in_reference = False  # the policy head is part of the trained policy, not of the reference
        # Held by whoever switches the active adapter or changes weights: an agent acting or updating, a
        # SkillModel's learning steps and generations. Threads sharing this policy take turns through it.
        self.lock = threading.RLock()

    @property
    def hidden_size(self) -> int:
        return self.heads["value"].hidden_size

    @property
    def context_length(self) -> int | None:
        """The base model's context in tokens (``max_position_embeddings`` or ``n_positions``), or
        ``None`` when its config names none."""
        config = self.lm.get_base_model().config
        length = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
        return int(length) if length else None

    def check_context(self, lengths: Sequence[int], what: Callable[[int], str], room: int = 0) -> None:
        """Raise an :class:`RLlamaError` naming the first sequence (``what(i)``) whose ``lengths[i]``
        tokens plus ``room`` (tokens still to generate) pass the model's context: positions past it
        either fail inside the model (learned position tables) or run silently on positions it never
        saw (rotary ones)."""
        context = self.context_length
        if context is None:
            return
        for i, length in enumerate(lengths):
            if length + room > context:
                extra = f" + {room} to generate" if room else ""
                raise RLlamaError(f"{what(i)} is {length} tokens{extra}, past the model's context of {context} "
                                  "tokens: shorten it (or use a model with a longer context)")

    @property
    def vocab_size(self) -> int:
        """The width of the model's logits (its output vocabulary, padding included)."""
        return int(self.engine.parts.lm_head.weight.shape[0])

    @property
    def precision(self) -> str:
        """``"fp32"`` or ``"bf16"`` (resolved from ``"auto"``); setting it changes how the engine runs."""
        return self.engine.parts.precision

    @precision.setter
    def precision(self, value: str) -> None:
        if value not in ("fp32", "bf16"):
            raise ValueError(f"precision={value!r}; expected 'fp32' or 'bf16'")
        self.engine.parts.precision = value

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The adapter's and heads' parameters (the base model's are frozen)."""
        return [p for p in self.parameters() if p.requires_grad]

    def invalidate(self) -> None:
        """Have the engine forget every state it keeps between passes: after the base model's weights were changed
        by hand, and wherever a run must continue exactly as one resumed there (checkpoints, segments) — what
        is kept decides how a pass is split, and so its last bits."""
        self.engine.invalidate()

    # ------------------------------------------------------------------ scoring and generation
    @property
    def uses_scores(self) -> bool:
        """Whether candidates' logits include the model's own scores (``score_normalization`` is not
        ``"none"``); without them a candidate's log-probs are not computed at all."""
        return self.score_normalization != "none"

    def _rule(self) -> ScoreRule:
        head = self.heads[POLICY_HEAD] if POLICY_HEAD in self.heads and not self._in_reference else None
        normalization = self.score_normalization
        relative_reference = normalization == "relative" and self._in_reference
        if relative_reference:
            normalization = "none"  # the base model against itself: every score 0, the reference is uniform
        reference = self.reference if normalization == "relative" else None
        return ScoreRule(normalization, self.temperature, head, reference, uniform_choices=relative_reference)

    def continuation_logprobs(self, prompts, continuations, owner, entropy_rows=None, logprobs: bool = True):
        """Log-probability of each token of each continuation given its prompt (:meth:`Engine.encode
        <rllama.policy.engine.Engine.encode>` at this policy's temperature)."""
        return self.engine.encode(prompts, continuations, owner, temperature=self.temperature,
                                  entropy_rows=entropy_rows, logprobs=logprobs)

    def values(self, prompts: Sequence[Sequence[int]]) -> torch.Tensor:
        """Value estimates ``[B]`` of the prompts."""
        return self.heads["value"](self.engine.encode_prompts(prompts)).squeeze(-1)

    def score_candidates(self, prompts, candidates) -> tuple[list[torch.Tensor], torch.Tensor]:
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

    def candidate_outputs(self, prompts, candidates, q_heads: Sequence[str] = (), frozen_body: bool = False,
                          scores: bool = True) -> CandidateOutputs:
        """Like :meth:`score_candidates`, plus the values of state-action heads ``q_heads``.

        With ``frozen_body`` the model runs without gradients (so the engine serves every block it keeps)
        and only the heads keep theirs: what a head-only update needs. With ``scores=False`` the
        candidates are not projected to the vocabulary (most of a cached pass's cost) and ``logprobs``
        are uniform placeholders: for Q-value targets.
        """
        return scoring.candidate_outputs(self.engine, self.heads, self._rule(), prompts, candidates, q_heads,
                                         frozen_body, scores)

    def choice_outputs(self, prompts, choice_ids) -> tuple[CandidateOutputs, list[list[torch.Tensor]]]:
        """A reply constrained to declared choices (:class:`~rllama.replies.Choices`), as a distribution over the
        whole choices: ``(outputs, token_logprobs)``, ``outputs.logprobs[b]`` ``[K_b]`` each choice's
        log-probability (the product of its tokens' renormalised probabilities), ``outputs.values`` the
        prompts' values, ``token_logprobs[b][k]`` choice ``k``'s tokens' log-probs. Under
        ``score_normalization="relative"`` a generating agent acts on declared choices through this: the
        token log-probs are the adapted model's minus the base model's before renormalising, so the untrained
        reply is uniform at each token where the choices branch.

        Args:
            prompts: ``B`` token-id lists.
            choice_ids: for each prompt, the token ids of each choice (with the end of turn).
        """
        return scoring.choice_outputs(self.engine, self.heads, self._rule(), prompts, choice_ids)

    def features(self, prompts, candidates, batch_size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
        """The hidden states heads read: ``(prompt [B, H], action [sum of K_b, H])``, in batches of prompts."""
        return scoring.features(self.engine, prompts, candidates, self.temperature, batch_size)

    def action_features(self, prompts, candidates, batch_size: int = 32) -> torch.Tensor:
        """The hidden states a state-action head reads, ``[sum of K_b, H]`` (see :meth:`features`)."""
        return self.features(prompts, candidates, batch_size)[1]

    def evaluate_actions(self, steps, with_values: bool = True, with_entropy: bool = True,
                         frozen_body: bool = False) -> StepEvaluation:
        """Re-evaluate stored steps under the current parameters (with gradients if enabled).

        One batched pass serves scored and generated steps alike. With ``frozen_body`` the model runs
        without gradients and only the heads keep theirs.
        """
        masks = [self._reply_masks(s) if s.reply_grammar is not None and s.response_ids else None for s in steps]
        return scoring.evaluate_actions(self.engine, self.heads, self._rule(), steps, with_values, with_entropy,
                                        frozen_body, masks)

    def _reply_masks(self, step):
        if self.reply_grammars is None:
            raise RLlamaError("a step generated under a Regex or Grammar reply shape needs the policy's "
                              "reply_grammars (the agent that declared the shape sets them)")
        return self.reply_grammars.allowed_tokens(step.reply_grammar, step.response_ids)

    def evaluate(self, steps, **kwargs) -> StepEvaluation:
        """Deprecated name of :meth:`evaluate_actions` (``agent.evaluate`` plays episodes; this scores steps)."""
        warnings.warn("PolicyModel.evaluate is renamed evaluate_actions", DeprecationWarning, stacklevel=2)
        return self.evaluate_actions(steps, **kwargs)

    @torch.no_grad()
    def reference_distributions(self, steps, batch_size: int = 16) -> list[torch.Tensor]:
        """Each step's action distribution under the reference policy (the base model, adapter disabled).

        The reference never changes: where the engine keeps outputs (the cached engine's memo), a step
        met before costs no forward in later updates.
        """
        out = []
        with self.reference():
            for start in range(0, len(steps), batch_size):
                out += self.evaluate_actions(steps[start : start + batch_size], with_values=False,
                                             with_entropy=False).distributions
        return out

    def generate(self, prompts, max_new_tokens: int = 32, greedy: bool = False, stop_token_ids=(),
                 generator: torch.Generator | None = None, constraints=None, on_token=None) -> list[GeneratedReply]:
        """Sample one reply per prompt from ``softmax(logits / temperature)`` (see
        :func:`~rllama.policy.generation.generate`; ``on_token(row, token_id)`` streams the tokens)."""
        return generation.generate(self.engine, self.heads["value"], prompts, self.temperature, max_new_tokens,
                                   greedy, stop_token_ids, generator, constraints, on_token)

    # ------------------------------------------------------------------ adapters and the reference
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
        self.lm.add_adapter(name, lora_config or _default_lora_config(self.lm.get_base_model()))
        self.lm.set_adapter(active)  # keeps the active adapter trainable and the new one frozen
        self.to(self.device)
        self.engine.invalidate(adapters_only=True)

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
        self.engine.invalidate(adapters_only=True)

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
            persistence.write_adapter(self.lm, name, tmp)
        return path

    def load_adapter(self, name: str, path: str | os.PathLike) -> None:
        """Load an adapter saved by :meth:`save_adapter` (or any PEFT LoRA folder) as adapter ``name``."""
        path = Path(path)
        if not (path / "adapter_config.json").is_file():
            raise ModelNotFoundError(f"{str(path)!r} holds no PEFT adapter (adapter_config.json is missing)")
        if name in self.list_adapters():
            raise RLlamaError(f"adapter {name!r} already exists; delete_adapter({name!r}) first or pick another name")
        verify_dir(path, warn=False)  # one saved by save_adapter has a manifest; a PEFT folder from elsewhere none
        active = self.active_adapter
        from safetensors import SafetensorError

        try:
            self.lm.load_adapter(str(path), adapter_name=name, is_trainable=True)
        except (ValueError, RuntimeError, KeyError, OSError, SafetensorError, AttributeError, TypeError) as exc:
            # a damaged weights file, or a config PEFT cannot read (a list, "r": "x", a bogus peft_type)
            if name in self.list_adapters():  # PEFT may have added it before failing
                self.lm.delete_adapter(name)
            raise RLlamaError(f"cannot load the adapter at {str(path)!r} into this model: "
                              f"{type(exc).__name__}: {exc}") from exc
        self.lm.set_adapter(active)
        self.to(self.device)
        self.engine.invalidate(adapters_only=True)

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

    def replace_head(self, name: str, whiten: int = 0) -> ValueHead:
        """Replace head ``name`` with a fresh zero-initialised one (``whiten`` as in :class:`ValueHead`,
        capped at the hidden size); only before training, while the head still outputs zero."""
        head = self.heads[name]
        if any(p.detach().abs().sum() > 0 for p in head.parameters()):
            raise RLlamaError(f"head {name!r} has been trained; it can only be replaced before training")
        self.heads[name] = ValueHead(self.hidden_size, head.linear.out_features,
                                     whiten=min(int(whiten), self.hidden_size)).to(self.device)
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

    # ------------------------------------------------------------------ the saved folder
    def save(self, path: str | os.PathLike, extra: dict | None = None) -> Path:
        """Write the active adapter and the heads (safetensors), a JSON config and a checksum manifest
        into folder ``path``, atomically (see :mod:`~rllama.policy.persistence`)."""
        path = Path(path)
        with writing_dir(path) as tmp:
            self.write_into(tmp, extra)
        return path

    def write_into(self, folder: Path, extra: dict | None = None) -> None:
        """Write what :meth:`save` writes into the existing folder ``folder`` (not atomically: for a
        caller that writes more beside it inside one :func:`~rllama.fileio.writing_dir`)."""
        persistence.write_policy(self, Path(folder), extra)

    def load(self, path: str | os.PathLike) -> dict:
        """Load the adapter and head weights saved by :meth:`save` into the active adapter and the
        heads; returns the saved JSON config. Everything is checked first: on any error the policy
        is unchanged."""
        adapter_state, heads_state, meta = self.read_checkpoint(recover_dir(path))
        self.apply_checkpoint(adapter_state, heads_state, meta)
        return meta

    def read_checkpoint(self, path: str | os.PathLike) -> tuple[dict, dict, dict]:
        """Read and check a folder written by :meth:`save` without changing the policy: its adapter
        tensors, head tensors and config, ready for :meth:`apply_checkpoint`."""
        return persistence.read_checkpoint(self, path)

    def apply_checkpoint(self, adapter_state: dict, heads_state: dict, meta: dict) -> None:
        """Put what :meth:`read_checkpoint` returned into the active adapter, the heads and the settings."""
        persistence.apply_checkpoint(self, adapter_state, heads_state, meta)

    # ------------------------------------------------------------------ names before the engine layer
    @property
    def prefix_cache_active(self) -> bool:
        """Deprecated: ``bool(policy.engine.stats())`` (whether the engine keeps the frozen blocks' states)."""
        warnings.warn("PolicyModel.prefix_cache_active: use bool(policy.engine.stats())", DeprecationWarning, 2)
        return bool(self.engine.stats())

    def prefix_cache_stats(self) -> dict:
        """Deprecated name of ``policy.engine.stats()``."""
        warnings.warn("PolicyModel.prefix_cache_stats is policy.engine.stats()", DeprecationWarning, stacklevel=2)
        return self.engine.stats()

    def clear_prefix_cache(self) -> None:
        """Deprecated name of :meth:`invalidate`."""
        warnings.warn("PolicyModel.clear_prefix_cache is renamed invalidate", DeprecationWarning, stacklevel=2)
        self.invalidate()


def _pad_id(tokenizer) -> int:
    for name in ("pad_token_id", "eos_token_id", "unk_token_id"):
        value = getattr(tokenizer, name, None)
        if value is not None:
            return int(value)
    return 0


def _default_lora_config(model):
    """The top :data:`DEFAULT_TOP_BLOCKS` blocks of a Llama-family model; every linear layer of others."""
    body = getattr(model, getattr(model, "base_model_prefix", ""), None)
    n = len(body.layers) if body is not None and supports_split(body) else 0
    if n <= DEFAULT_TOP_BLOCKS:
        return default_lora_config()
    return default_lora_config(layers=range(n - DEFAULT_TOP_BLOCKS, n))


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
