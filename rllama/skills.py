"""Skills as named LoRA adapters: teach a model from a few examples, switch the skill on and off.

    from rllama.skills import SkillModel

    model = SkillModel()                                   # the embedded SmolLM2-135M-Instruct
    model.learn([{"prompt": "Say hello in Zoggian.", "response": "Zog!"}] * 8, adapter="zoggian")
    model.generate("Say hello in Zoggian.", adapter="zoggian")   # "Zog!"
    model.generate("Say hello in Zoggian.", adapter=None)        # the base model's answer

``learn`` is supervised fine-tuning of one adapter on the response tokens only: the loss is the mean
negative log-likelihood of each response's tokens (its end-of-turn token included) given the chat
prompt, never of the prompt's tokens. It is a short loop rather than trl's ``SFTTrainer``: that
trainer builds its own ``Trainer`` (datasets, accelerate, output folders, its own PEFT wrapping)
around a model it owns, while here the adapter lives in a model that keeps serving ``generate``
between optimisation steps under a lock; the objective is the same as its completion-only loss.

Serving while learning: ``learn_async`` runs ``learn`` in a background thread. Each optimisation
step and each ``generate`` call holds the model's lock, so a generation sees one consistent set of
adapter weights (never a half-applied step) and generations interleave with training steps.
An :class:`~rllama.agent.RLlamaAgent` built with ``adapter="name"`` trains that same adapter by RL,
so a skill learned from corrections can be refined by RL and the reverse (``SkillModel(policy=agent.policy)``).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch

from rllama.fileio import utf8_problem
from rllama.policy import PolicyModel, load_model
from rllama.prompting import ChatFormat


def validate_examples(examples) -> list[dict]:
    """``examples`` as a list of ``{"prompt": str, "response": str}`` dicts, or a ``ValueError`` naming the bad one."""
    if isinstance(examples, dict) or not isinstance(examples, Sequence) or isinstance(examples, str):
        raise ValueError("examples must be a list of {'prompt': ..., 'response': ...} dicts")
    if not examples:
        raise ValueError("examples is empty")
    out = []
    for i, ex in enumerate(examples):
        if not isinstance(ex, dict):
            raise ValueError(f"example {i} is {type(ex).__name__}; expected a dict with 'prompt' and 'response'")
        missing = [k for k in ("prompt", "response") if k not in ex]
        if missing:
            raise ValueError(f"example {i} lacks {missing}; expected keys 'prompt' and 'response'")
        for key in ("prompt", "response"):
            if not isinstance(ex[key], str) or not ex[key].strip():
                raise ValueError(f"example {i}: {key!r} must be a non-empty string, got {ex[key]!r}")
        problem = utf8_problem({k: ex.get(k) for k in ("prompt", "response", "system")}, f"example {i}")
        if problem:
            raise ValueError(f"{problem} is a lone surrogate, which no tokenizer takes; decode the text it "
                             "comes from with errors='replace'")
        out.append({"prompt": ex["prompt"], "response": ex["response"], "system": ex.get("system")})
    return out


def sft_loss(policy: PolicyModel, prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]]):
    """Mean negative log-likelihood of the response tokens given their prompts (prompt tokens carry no loss).

    Returns ``(loss, number of response tokens)``.
    """
    out = policy.continuation_logprobs(prompts, responses, list(range(len(prompts))))
    mask = out.mask.float()
    n = mask.sum()
    return -(out.token_logprobs * mask).sum() / n, int(n.item())


class SkillModel:
    """A model that holds skills as named adapters, learns them from examples, and serves generations.

    Args:
        model: ``None`` for the embedded default model, a folder or hub id, or a transformers model.
        tokenizer: the tokenizer of a model object.
        policy: an existing :class:`PolicyModel` (an agent's ``agent.policy``) instead of ``model``.
        precision: as for :class:`PolicyModel`.
        lora_config: as for :class:`PolicyModel`.
        system_prompt: system message of every chat (``None``: none).
        use_chat_template: as for :class:`~rllama.agent.RLlamaAgent`.
        seed: seeds the order of examples in :meth:`learn`.
    """

    def __init__(self, model=None, tokenizer=None, *, policy: PolicyModel | None = None, precision: str = "auto",
                 lora_config=None, system_prompt: str | None = None, use_chat_template: bool | None = None,
                 seed: int = 0) -> None:
        if policy is None:
            if model is None or isinstance(model, (str, os.PathLike)):
                model, tokenizer = load_model(model)
            elif tokenizer is None:
                raise ValueError("a model object needs its tokenizer: SkillModel(model, tokenizer)")
            policy = PolicyModel(model, tokenizer, lora_config=lora_config, precision=precision)
        self.policy = policy
        self.chat = ChatFormat(policy.tokenizer, use_chat_template)
        self.system_prompt = system_prompt
        self.lock = policy.lock  # shared with every agent acting on this policy
        self.versions: dict[str, int] = {}  # adapter -> optimisation steps taken by learn()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rllama-learn")
        self._generator = torch.Generator().manual_seed(int(seed))

    # ------------------------------------------------------------------ adapters
    def list_adapters(self) -> list[str]:
        return self.policy.list_adapters()

    def delete_adapter(self, name: str) -> None:
        with self.lock:
            self.policy.delete_adapter(name)
            self.versions.pop(name, None)

    def save_adapter(self, name: str, path: str | os.PathLike) -> Path:
        with self.lock:
            return self.policy.save_adapter(name, path)

    def load_adapter(self, name: str, path: str | os.PathLike) -> None:
        with self.lock:
            self.policy.load_adapter(name, path)

    # ------------------------------------------------------------------ serving
    def _prompt_ids(self, prompt: str, system: str | None = None) -> list[int]:
        messages = []
        if system or self.system_prompt:
            messages.append({"role": "system", "content": system or self.system_prompt})
        messages.append({"role": "user", "content": prompt})
        return self.chat.prompt_ids(messages)

    def generate(self, prompt: str | Sequence[str], adapter: str | None = "default", max_new_tokens: int = 32,
                 greedy: bool = True) -> str | list[str]:
        """Reply to ``prompt`` (or each of a list) with adapter ``adapter`` on (``None``: the base model)."""
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={max_new_tokens!r}; expected a positive integer")
        for i, text in enumerate(prompts):
            if not isinstance(text, str):
                raise ValueError(f"prompt {i} is {type(text).__name__}; expected a string")
            problem = utf8_problem(text, f"prompt {i}")
            if problem:
                raise ValueError(f"{problem} is a lone surrogate, which no tokenizer takes")
        ids = [self._prompt_ids(p) for p in prompts]
        self.policy.check_context([len(i) for i in ids], lambda i: f"prompt {i}", room=max_new_tokens)
        with self.lock, torch.no_grad(), self.policy.using_adapter(adapter):
            replies = self.policy.generate(ids, max_new_tokens=max_new_tokens, greedy=greedy,
                                           stop_token_ids=self.chat.end_of_turn_ids, generator=self._generator)
        texts = [self.chat.decode_reply(r.token_ids) for r in replies]
        return texts[0] if isinstance(prompt, str) else texts

    # ------------------------------------------------------------------ learning
    def learn(self, examples, adapter: str = "default", *, epochs: int = 3, learning_rate: float = 3e-4,
              batch_size: int = 8, max_grad_norm: float = 1.0, lora_config=None, on_step=None) -> dict:
        """Fine-tune adapter ``adapter`` (created if new) on ``{"prompt", "response"}`` examples.

        ``lora_config`` shapes a new adapter (default: the policy's, LoRA on the top 8 blocks of
        Llama-family models; ``default_lora_config(layers="all")`` learns new facts faster but turns
        the frozen-prefix cache off while the adapter exists).

        ``on_step``, when given, is called after each optimisation step with ``{"epoch", "step", "loss",
        "tokens"}`` (the step's mean loss per response token, before the step), for live progress.

        Returns ``{"losses": [mean loss per epoch], "steps": optimisation steps, "tokens": response tokens}``.
        """
        examples = validate_examples(examples)
        if epochs < 1 or batch_size < 1 or not learning_rate > 0:
            raise ValueError(f"epochs={epochs}, batch_size={batch_size}, learning_rate={learning_rate}: "
                             "expected positive values")
        with self.lock:
            prompts = [self._prompt_ids(e["prompt"], e["system"]) for e in examples]
            responses = [self.chat.reply_ids(e["response"]) for e in examples]
            self.policy.check_context([len(p) + len(r) for p, r in zip(prompts, responses)],
                                      lambda i: f"example {i}: its prompt and response")
            if adapter not in self.policy.list_adapters():
                self.policy.add_adapter(adapter, lora_config)
            params = self.policy.adapter_parameters(adapter)
        optimizer = torch.optim.AdamW(params, lr=learning_rate, weight_decay=0.0)
        losses, steps, tokens = [], 0, 0
        for epoch in range(epochs):
            order = torch.randperm(len(examples), generator=self._generator).tolist()
            epoch_loss, epoch_tokens = 0.0, 0
            for start in range(0, len(order), batch_size):
                rows = order[start : start + batch_size]
                with self.lock, self.policy.using_adapter(adapter):  # one step at a time; generate may run between
                    for p in params:
                        p.requires_grad_(True)
                    loss, n = sft_loss(self.policy, [prompts[i] for i in rows], [responses[i] for i in rows])
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
                    optimizer.step()
                    self.versions[adapter] = self.versions.get(adapter, 0) + 1
                epoch_loss += loss.item() * n
                epoch_tokens += n
                steps += 1
                if on_step is not None:
                    on_step({"epoch": epoch, "step": steps, "loss": loss.item(), "tokens": n})
            losses.append(epoch_loss / epoch_tokens)
            tokens += epoch_tokens
        return {"losses": losses, "steps": steps, "tokens": tokens}

    def learn_async(self, examples, adapter: str = "default", **kwargs) -> Future:
        """Run :meth:`learn` in a background thread; ``generate`` keeps working meanwhile."""
        validate_examples(examples)
        return self._executor.submit(self.learn, examples, adapter, **kwargs)

    def close(self) -> None:
        self._executor.shutdown(wait=True)


__all__ = ["SkillModel", "sft_loss", "validate_examples"]
