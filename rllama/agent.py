"""``RLlamaAgent``: an LLM agent that acts in Gymnasium environments and learns from their rewards.

A subclass writes three hooks (and optionally a fourth)::

    class BlackjackAgent(RLlamaAgent):
        def get_system_prompt(self):
            return "You play Blackjack. Reply with one word: stick or hit."
        def format_observation(self, observation):
            total, dealer, ace = observation
            return f"Your hand totals {total}. The dealer shows {dealer}."
        def extract_action(self, response):
            return 1 if "hit" in response.lower() else 0
        def get_valid_actions(self, observation):   # optional: score these instead of generating
            return ["stick", "hit"]

and drops the agent into an environment loop::

    agent = BlackjackAgent()                     # embedded default model, PPO
    observation, info = env.reset()
    while True:
        action = agent.act(observation)
        observation, reward, terminated, truncated, info = env.step(action)
        agent.assign_reward(reward)
        if terminated or truncated:
            stats = agent.terminate_episode()    # trains when a batch of episodes is full
            break

The agent keeps each environment's chat (system prompt, observations, its own replies), so the
model sees the whole episode so far. ``act_batch``/``assign_rewards``/``terminate_episodes`` do the
same for a Gymnasium vector env with one forward pass for all environments, and
:meth:`RLlamaAgent.train` and :meth:`RLlamaAgent.evaluate` run whole loops over single or vector envs.
"""

from __future__ import annotations

import contextlib
import logging
import math
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rllama.acting import Actor
from rllama.algorithms import Episode, Step, make_algorithm
from rllama.backends import check_can_serve, make_backend
from rllama.callbacks import CallbackLike
from rllama.distributed import setup as setup_data_parallel
from rllama.errors import AgentStateError, CorruptFileError, HookError
from rllama.fileio import recover_dir, writing_dir
from rllama.hooks import AgentHooks, Hooks
from rllama.loops import return_stats, run_episodes
from rllama.memory import EpisodicMemory, Retrieved
from rllama.memory.hooks import MemoryHooks, split_memory
from rllama.policy import build_policy
from rllama.policy.engine import DEFAULT_CACHE_MB
from rllama.policy.outputs import SCORE_NORMALIZATIONS
from rllama.prompting import ChatFormat, PromptBuilder
from rllama.recording import EnvRecord, Recorder
from rllama.replies import Choices, ChoiceTrie, ReplyGrammars
from rllama.trainer import Trainer

logger = logging.getLogger(__name__)


def set_seed(seed: int) -> None:
    """Seed Python's, NumPy's and torch's global random generators."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class RLlamaAgent(AgentHooks, MemoryHooks):
    """Base class of LLM agents. Subclasses implement the hooks; the loop methods do the rest.

    Args:
        model: ``None`` for the embedded default model (SmolLM2-135M-Instruct), a local folder or
            hub id, a transformers causal LM (then pass ``tokenizer``), or a :class:`PolicyModel`.
        tokenizer: the tokenizer of a model object; loaded with the model otherwise.
        device: ``"cpu"``, ``"cuda"``, ...; defaults to the model's device.
        algorithm: a registered name (``"ppo"``), an Algorithm subclass or instance.
        algorithm_config: the algorithm's config dataclass or a dict of its fields. Its ``"auto"``
            values are decided for this agent: an agent that scores candidate actions (it overrides
            ``get_valid_actions`` or sets ``action_names``: :meth:`scores_actions`) gets the
            on-policy algorithms' policy head on the model's features, one that generates does not
            (:meth:`rllama.algorithms.OnPolicyConfig.resolved`).
        lora_config: a ``peft.LoraConfig`` (default: rank 16 on every linear layer of the top 8
            transformer blocks of Llama-family models, of every block of others;
            ``default_lora_config(layers="all")`` adapts every block).
        prefix_cache: ``"auto"`` (default), ``True`` or ``False``: keep the frozen blocks' states of
            every token prefix seen, so that acting and updates run only the adapted blocks for
            tokens seen before (:mod:`rllama.policy.engine.cached`). ``"auto"`` turns it on where
            the model has frozen blocks below its adapters; ``True`` makes a model where it cannot
            work an error.
        prefix_cache_mb: the prefix cache's bound in MiB (least recently used prefixes are evicted;
            ``0`` turns the cache off).
        precision: ``"auto"`` (bf16 autocast on GPUs that run it natively and on CPUs where it is
            measured faster, else fp32), ``"fp32"`` or ``"bf16"``.
        score_normalization: ``"mean"`` (the mean log-prob of a candidate's text tokens plus that of
            its end-of-turn token), ``"sum"`` (its log-likelihood), ``"none"`` (the model's
            preference left out: the policy is the algorithm's head alone, uniform at first; for
            candidates that describe each move in words, see :class:`~rllama.agents.SokobanAgent`),
            ``"relative"`` (``"mean"`` minus the base model's score, the adapter disabled: the adapter
            alone starts from an even choice in every state, not from the prompt's preference, and the
            KL's reference is uniform; a generated reply to declared :class:`~rllama.replies.Choices` is
            relative too, and acts through the learner; in-process scoring only), or ``"auto"`` (the default): what
            the algorithm decides (``Algorithm.default_score_normalization``): ``"none"`` when an
            on-policy algorithm's policy head on the frozen adapter chooses among the candidates (the
            defaults for a scoring agent: the model's likelihood of the candidate words is a prior the
            head would first have to unlearn), else ``"mean"``.
        temperature: policy temperature (scoring and generation, acting and training).
        max_new_tokens: longest generated reply.
        format_penalty: reward added (for training only: reported returns stay the environment's) to
            a step whose generated reply is invalid: ``extract_action`` failed on it or
            ``is_valid_reply`` refused it. ``0`` (default) adds nothing; RAGEN and verl-agent use
            ``-0.1``. Must not be positive.
        max_prompt_tokens: longest prompt; older turns of the episode are dropped (oldest first,
            the system prompt kept) to fit. Defaults to the model's context length minus
            ``max_new_tokens``.
        seed: seeds Python, NumPy and torch, the agent's action sampling and the algorithm.
        action_space: a Gymnasium space; when given, every action ``extract_action`` returns is
            checked against it. ``train``/``evaluate`` set it from the environment.
        use_chat_template: ``None`` uses the tokenizer's chat template if it has one, else the
            plain format documented in :mod:`rllama.prompting`.
        memory: an :class:`~rllama.memory.EpisodicMemory`, a :class:`~rllama.memory.WorkingMemory`,
            or a list with one of each. Episodic memory is searched with each observation and the
            results are put into the prompt (:meth:`inject_memories`); finished training episodes
            are written to it. Working memory keeps the episode's history within its token budget.
        adapter: the name of the LoRA adapter this agent acts with and trains (created if the
            policy lacks it; default: the policy's active adapter, ``"default"``). A skill taught
            with :class:`rllama.skills.SkillModel` can be refined by RL this way, and the reverse.
        trajectory_log: a JSONL file to which every finished episode is appended
            (:mod:`rllama.trajectories`), for behaviour cloning or offline analysis.
        backend: where acting runs (:mod:`rllama.backends`): ``"auto"`` (default; ``None`` is the same)
            generates on llama.cpp (:class:`~rllama.backends.LlamaCppBackend`) when the agent generates
            its replies on a CPU, llama-cpp-python is installed and the model has a GGUF (the embedded
            default), and runs everything else in this process; ``"torch"``: everything in this
            process; ``"llamacpp"``; or a :class:`~rllama.backends.Backend`, such as an
            :class:`~rllama.backends.OpenAIBackend` for a vLLM / SGLang server of the same base model.
    """

    def __init__(
        self,
        model=None,
        tokenizer=None,
        device: str | torch.device | None = None,
        algorithm="ppo",
        algorithm_config=None,
        *,
        lora_config=None,
        precision: str = "auto",
        prefix_cache: bool | str = "auto",
        prefix_cache_mb: float = DEFAULT_CACHE_MB,
        score_normalization: str = "auto",
        temperature: float = 1.0,
        max_new_tokens: int = 32,
        format_penalty: float = 0.0,
        max_prompt_tokens: int | None = None,
        seed: int | None = None,
        action_space=None,
        use_chat_template: bool | None = None,
        memory=None,
        adapter: str | None = None,
        trajectory_log: str | None = None,
        backend="auto",
    ) -> None:
        if seed is not None:
            set_seed(seed)
        self.seed = seed
        if score_normalization not in (*SCORE_NORMALIZATIONS, "auto"):
            raise ValueError(f"score_normalization={score_normalization!r}; expected one of "
                             f"{', '.join(map(repr, (*SCORE_NORMALIZATIONS, 'auto')))}")
        self.policy = build_policy(
            model, tokenizer, device=device, lora_config=lora_config, precision=precision,
            score_normalization="mean" if score_normalization == "auto" else score_normalization,
            temperature=temperature, prefix_cache=prefix_cache,
            prefix_cache_mb=prefix_cache_mb,
        )
        self.tokenizer = self.policy.tokenizer
        self.chat = ChatFormat(self.tokenizer, use_chat_template)
        if adapter is not None:
            if adapter not in self.policy.list_adapters():
                self.policy.add_adapter(adapter)
            self.policy.set_adapter(adapter)  # before the optimizer collects the trainable parameters
        self.adapter_name = self.policy.active_adapter  # active whenever the agent acts or updates
        # Launched as several processes (torchrun / accelerate launch): train data-parallel.
        self.data_parallel = setup_data_parallel()
        # "auto" config values (an on-policy policy head) depend on whether this agent scores
        # candidates in this process (AlgorithmConfig.resolved).
        scores_actions = self.scores_actions()
        # a relative policy chooses among declared choices in this process: an agent whose every reply is one
        # generates nothing on a backend, so "auto" does not load llama.cpp for it, and one whose reply shape
        # is chosen per observation may never generate there, so llama.cpp loads at its first reply
        chooses = score_normalization == "relative" and self._replies_are_choices()
        per_observation = type(self).get_reply_shape is not AgentHooks.get_reply_shape
        self.backend = make_backend(backend, self.policy, generates=not scores_actions and not chooses,
                                    lazy=score_normalization == "relative" and per_observation)
        scoring = self.backend.provides_values and scores_actions
        self.algorithm = make_algorithm(algorithm, self.policy, algorithm_config, seed=seed, scoring=scoring)
        if score_normalization == "auto":
            self.policy.score_normalization = self.algorithm.default_score_normalization(scoring)
        check_can_serve(self.backend, self.algorithm, self.policy)
        if scores_actions and not self.policy.uses_scores and not self.algorithm.learns_scored_choices():
            raise ValueError(
                f"score_normalization='none' leaves the choice among candidates to a head the algorithm trains, "
                f"and {type(self.algorithm).__name__} with this config has none (the policy would stay uniform): "
                f"give it a policy head (policy_head > 0, or train_adapter=False for SAC; a backend without the "
                f"learner's heads serves none) or score with 'mean'")
        self.backend.bind(self.policy)
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={max_new_tokens}; expected at least 1")
        self.max_new_tokens = int(max_new_tokens)
        if isinstance(format_penalty, bool) or not isinstance(format_penalty, (int, float)) \
                or not math.isfinite(format_penalty) or format_penalty > 0:
            raise ValueError(f"format_penalty={format_penalty!r}; expected a number <= 0 (a penalty; 0 for none)")
        self.format_penalty = float(format_penalty)
        context = self.policy.context_length
        if max_prompt_tokens is not None and context and max_prompt_tokens + self.max_new_tokens > context:
            raise ValueError(f"max_prompt_tokens={max_prompt_tokens} + max_new_tokens={self.max_new_tokens} exceeds "
                             f"the model's context of {context} tokens")
        default_prompt = max(16, (context or 2048) - self.max_new_tokens)
        self.prompts = PromptBuilder(self.chat, int(max_prompt_tokens or default_prompt), context)
        self.action_space = action_space
        rank = self.data_parallel.rank if self.data_parallel is not None else 0
        # samples actions (and, without a loop seed, GRPO's group seeds)
        self.generator = torch.Generator().manual_seed((0 if seed is None else int(seed)) + 7919 * rank)
        self.hooks = Hooks(self)  # the subclass's hooks, called and checked
        if not isinstance(self.keep_history, bool) and self.keep_history != "auto":
            raise HookError(f"keep_history = {self.keep_history!r}; expected True, False or 'auto'")
        # written at the start of every generated reply (in the prompt: the model continues it)
        prefix = self.hooks.reply_prefix()
        self.reply_prefix_ids = self.chat.reply_prefix_ids(prefix) if prefix else []
        # compiles Regex / Grammar shapes (nothing until one is met); the learner recomputes their masks
        # with it, also for steps restored from a checkpoint
        self.policy.reply_grammars = ReplyGrammars(self.tokenizer, self.chat.end_of_turn_ids, self.policy.vocab_size)
        self._choice_ids: dict[Choices, list[list[int]]] = {}  # each declared Choices' token ids
        if not scores_actions:  # a declared reply shape is checked now, not hundreds of steps later
            self._compile_shape(self.hooks.check_shape(self.reply_shape))
        self.actor = Actor(self)  # scores or generates, samples, parses the actions
        self.recorder = Recorder()  # each environment's running episode
        self.trainer = Trainer(self)  # when the algorithm updates; the training counters
        self._recording = True  # False in evaluation mode
        self._warned_truncation = False
        self._said_history = False  # keep_history="auto" said what it decided
        self.episodic_memory, self.working_memory = split_memory(memory)
        self.last_prompt_ids: dict[int, list[int]] = {}  # env id -> the prompt of its last action
        self.last_retrieved: dict[int, list[Retrieved]] = {}  # env id -> what memory gave it
        self.last_replies: dict[int, str] = {}  # env id -> the reply text of its last action
        self._last_env_id = 0
        self.trajectory_log = None
        if trajectory_log is not None:
            from rllama.trajectories import TrajectoryWriter

            self.trajectory_log = TrajectoryWriter(trajectory_log)

    @property
    def last_prompt(self) -> str | None:
        """The exact prompt text of the most recent action (memories and history included)."""
        ids = self.last_prompt_ids.get(self._last_env_id)
        return None if ids is None else self.tokenizer.decode(ids)

    @property
    def last_reply(self) -> str | None:
        """The reply text of the most recent action (the chosen candidate or the generated text)."""
        return self.last_replies.get(self._last_env_id)

    def prompt_of(self, env_id: int) -> str | None:
        """The exact prompt text of environment ``env_id``'s last action."""
        ids = self.last_prompt_ids.get(int(env_id))
        return None if ids is None else self.tokenizer.decode(ids)

    # ------------------------------------------------------------------ prompts
    @property
    def max_prompt_tokens(self) -> int:
        """The longest prompt (:class:`~rllama.prompting.PromptBuilder`)."""
        return self.prompts.max_prompt_tokens

    def _replies_are_choices(self) -> bool:
        """Whether every generated reply is to declared :class:`~rllama.replies.Choices` (the class's
        ``reply_shape``, with ``get_reply_shape`` not overridden)."""
        return (type(self).get_reply_shape is AgentHooks.get_reply_shape
                and isinstance(self.reply_shape, Choices))

    def _keeps_history(self, observation) -> bool:
        """Whether the prompt for ``observation`` shows the episode's earlier turns (``keep_history``;
        ``"auto"``: for text observations, or with working memory)."""
        keep = self.keep_history
        if keep == "auto":
            keep = isinstance(observation, str) or self.working_memory is not None
            if not keep and not self._said_history:
                self._said_history = True
                logger.warning("keep_history='auto': %s observations are not text, so %s's prompts show the current "
                               "observation alone, not the episode's earlier turns (set keep_history = True on the "
                               "agent to show them)", type(observation).__name__, type(self).__name__)
        return keep

    def _prompt(self, record: EnvRecord, text: str, found: list[Retrieved], replies: list[list[int]] | None,
                generated: bool, keep_history: bool) -> tuple[list[int], list[dict]]:
        """The prompt ids of an observation's text after ``record``'s chat, with retrieved memories
        injected, and the messages they were rendered from; room is left in the model's context for
        the longest of the ``replies`` (token ids: candidates, or declared choices), else for
        ``max_new_tokens``. A ``generated`` reply's prompt ends with the agent's reply prefix."""
        content = self.hooks.user_message(text, found)
        prefix = self.reply_prefix_ids if generated else []
        reply = max(map(len, replies)) if replies else self.max_new_tokens
        ids, fitted = self.prompts.build(record.messages, content, keep_history=keep_history,
                                         working_memory=self.working_memory, reply_tokens=reply + len(prefix))
        return ids + prefix, fitted

    def _reply_constraint(self, observation) -> tuple[list[list[int]] | None, str | None]:
        """The declared shape of a reply to ``observation`` as ``(choice_ids, grammar)``: the token ids of
        its :class:`~rllama.replies.Choices` (each with the end of turn), or its compiled
        :class:`~rllama.replies.Regex` / :class:`~rllama.replies.Grammar`; ``(None, None)`` for free text."""
        return self._compile_shape(self.hooks.reply_shape(observation))

    def _compile_shape(self, shape) -> tuple[list[list[int]] | None, str | None]:
        if shape is None:
            return None, None
        if not isinstance(shape, Choices):
            return None, self.reply_grammars.compile(shape, self.max_new_tokens)  # compiled once per shape
        if shape in self._choice_ids:
            return self._choice_ids[shape], None
        ids = [self.chat.reply_ids(option) for option in shape.options]
        ChoiceTrie(ids)  # two choices with the same tokens, or one the prefix of another: an error now
        longest = max(map(len, ids))
        if longest > self.max_new_tokens:
            raise ValueError(f"reply choice {shape.options[[len(i) for i in ids].index(longest)]!r} takes {longest} "
                             f"tokens with the end of turn, more than max_new_tokens={self.max_new_tokens}: "
                             "raise max_new_tokens or shorten the choice")
        self._choice_ids[shape] = ids
        return ids, None

    @property
    def reply_grammars(self):
        """Compiles this agent's :class:`~rllama.replies.Regex` and :class:`~rllama.replies.Grammar` shapes
        (and gives the learner the same masks: it is the policy's ``reply_grammars`` too)."""
        return self.policy.reply_grammars

    # ------------------------------------------------------------------ acting
    def act(self, observation):
        """Choose an action for one environment's observation (environment id 0)."""
        return self.act_batch([observation], env_ids=[0])[0]

    def act_batch(self, observations: Sequence, env_ids: Sequence[int] | None = None) -> list:
        """Choose actions for several environments' observations in one batched forward pass.

        Args:
            observations: one observation per environment (unbatch a vector env's observation with
                ``rllama.envs.unbatch(envs.single_observation_space, obs, envs.num_envs)``).
            env_ids: which environment each observation comes from (default ``0..N-1``); each
                environment keeps its own chat.

        Returns:
            One action per observation, each as returned by ``extract_action``.
        """
        observations = list(observations)
        env_ids = list(range(len(observations))) if env_ids is None else [int(i) for i in env_ids]
        if len(env_ids) != len(observations):
            raise ValueError(f"{len(observations)} observations but {len(env_ids)} env_ids")
        if len(set(env_ids)) != len(env_ids):
            raise ValueError(f"env_ids must be distinct, got {env_ids}")
        if not observations:
            return []
        # Nothing is written to an env's chat until its action is known, so an error in a hook
        # leaves every chat as it was.
        records, texts, prompts, candidates, chats = [], [], [], [], []
        for env_id, obs in zip(env_ids, observations):
            records.append(self.recorder.open(env_id, self.hooks.system_prompt))
            texts.append(self.hooks.observation_text(obs))
            candidates.append(self.hooks.valid_actions(obs))
        retrieved = self._retrieve(texts)
        candidate_ids = [None if c is None else [self.chat.reply_ids(x) for x in c] for c in candidates]
        # a generated reply constrained to a declared shape (rllama.replies): choices' token ids, or a grammar
        shapes = [self._reply_constraint(obs) if c is None else (None, None)
                  for obs, c in zip(observations, candidates)]
        choice_ids = [choices for choices, _ in shapes]
        for obs, record, text, found, ids, choices in zip(observations, records, texts, retrieved, candidate_ids,
                                                          choice_ids):
            ids, fitted = self._prompt(record, text, found, ids or choices, generated=ids is None,
                                       keep_history=self._keeps_history(obs))
            prompts.append(ids)
            chats.append(fitted)

        steps = self.actor.steps(observations, prompts, candidates, candidate_ids, training=self._recording,
                                 choice_ids=choice_ids, grammars=[grammar for _, grammar in shapes])
        # The history keeps the plain observation text; retrieved memories appear only in the
        # prompt of the step they were retrieved for.
        for env_id, record, text, found, ids, step, chat in zip(env_ids, records, texts, retrieved, prompts, steps,
                                                                 chats):
            if self.working_memory is None and len(chat) < len(record.messages) + 1:
                record.messages = chat[:-1]  # turns that no longer fit the context are gone for good
            record.add(step, text, prompt=chat if self.trajectory_log is not None else None)
            self.last_prompt_ids[env_id] = ids
            self.last_retrieved[env_id] = found
            self.last_replies[env_id] = step.text
        if self._recording:
            self.trainer.count_steps(len(steps))
        self._last_env_id = env_ids[-1]
        return [step.action for step in steps]

    # ------------------------------------------------------------------ rewards and episode ends
    def assign_reward(self, reward: float) -> None:
        """Add ``reward`` to the last step of environment 0's episode."""
        self.assign_rewards([reward], env_ids=[0])

    def assign_rewards(self, rewards: Sequence[float], env_ids: Sequence[int] | None = None) -> None:
        """Add each reward to the last step of its environment's episode (default ids ``0..N-1``)."""
        rewards = list(np.asarray(rewards, dtype=np.float64).reshape(-1))
        env_ids = list(range(len(rewards))) if env_ids is None else [int(i) for i in env_ids]
        if len(env_ids) != len(rewards):
            raise ValueError(f"{len(rewards)} rewards but {len(env_ids)} env_ids")
        for env_id, r in zip(env_ids, rewards):
            if not math.isfinite(r):
                raise ValueError(f"reward {r} for env {env_id} is not finite")
            record = self.recorder.get(env_id)
            if record is None or not record.steps:
                if not self._recording:
                    continue
                raise AgentStateError(f"assign_reward for env {env_id} before any act() in its episode")
            if not math.isfinite(record.total_reward + float(r)):  # each reward finite, their sum too large
                raise ValueError(f"reward {r} for env {env_id} makes its episode's return overflow "
                                 f"({record.total_reward} so far); scale the rewards down")
            record.steps[-1].reward += float(r)

    def terminate_episode(self, truncated: bool = False, group: int | None = None,
                          final_observation=None) -> dict[str, float]:
        """End environment 0's episode. Trains when a batch of episodes is full.

        Args:
            truncated: the episode was cut by a time limit rather than ending: its return is
                completed with the value of the state it was cut in.
            group: for group-relative algorithms (GRPO), the id shared by episodes that started
                from the same state (``train`` sets it for you).
            final_observation: with ``truncated``, the observation the last ``env.step`` returned (the
                state the episode was cut in). The algorithms bootstrap from its value (or Q-values);
                without it they fall back to the value of the last state acted in.

        Returns:
            The training statistics when an update ran, else an empty dict.
        """
        return self.terminate_episodes([0], truncated=[truncated], groups=None if group is None else [group],
                                       final_observations=None if final_observation is None else [final_observation])

    def terminate_episodes(
        self,
        env_ids: Sequence[int] | np.ndarray,
        truncated: Sequence[bool] | None = None,
        groups: Sequence[int] | None = None,
        final_observations: Sequence | None = None,
    ) -> dict[str, float]:
        """End the episodes of several environments; trains once if a batch became full.

        Args:
            env_ids: environment ids, or a boolean mask over environments (``terminated | truncated``).
            truncated: per ended environment, whether it was truncated.
            groups: per ended environment, its start-state group id (see ``terminate_episode``).
            final_observations: per ended environment, the observation its last ``env.step``
                returned; used for the truncated ones (see ``terminate_episode``).
        """
        ids = np.asarray(env_ids)
        ids = np.flatnonzero(ids).tolist() if ids.dtype == bool else [int(i) for i in ids.reshape(-1)]
        truncated = [bool(t) for t in _per_env(truncated, ids, "truncated flags", False)]
        groups = _per_env(groups, ids, "groups")
        finals = _per_env(final_observations, ids, "final_observations")
        for env_id, trunc, group, final in zip(ids, truncated, groups, finals):
            record = self.recorder.get(env_id)
            if record is None or (self._recording and not record.steps):
                raise AgentStateError(
                    f"terminate_episode for env {env_id} with no steps since its last episode ended; call act() first"
                )
            bootstrap = self._bootstrap_step(record, final) if trunc and final is not None and self._recording else None
            if trunc and final is None and self._recording and not self._warned_truncation:
                self._warned_truncation = True
                logger.warning("an episode was truncated without its final observation; pass "
                               "final_observation= to terminate_episode so its return is completed with the "
                               "value of the state it was cut in (warned once)")
            self.recorder.close(env_id)
            if self._recording:
                info = {} if group is None else {"group": int(group)}
                self.trainer.add_episode(Episode(record.steps, env_id=env_id, truncated=trunc, info=info,
                                                 bootstrap=bootstrap))
            self._remember(record, trunc)
            if self.trajectory_log is not None and record.steps and self._recording:
                self.trajectory_log.write_episode(record, truncated=trunc, metadata={"env_id": env_id})
        return self.trainer.maybe_update() if self._recording else {}

    def _bootstrap_step(self, record: EnvRecord, observation) -> Step:
        """The state a truncated episode was cut in, as a step with no action: its prompt (built as
        ``act`` would) and, in scoring mode, its candidates."""
        text = self.hooks.observation_text(observation)
        candidates = self.hooks.valid_actions(observation)
        candidate_ids = None if candidates is None else [self.chat.reply_ids(c) for c in candidates]
        ids, _ = self._prompt(record, text, self._retrieve([text])[0], candidate_ids, generated=candidate_ids is None,
                              keep_history=self._keeps_history(observation))
        return Step(prompt_ids=ids, candidate_ids=candidate_ids)

    def finish_data_parallel(self) -> list[dict[str, float]]:
        """After this process's last training episode, take part in the other processes' updates until
        all have finished (:meth:`rllama.trainer.Trainer.finish_data_parallel`); a hand-written
        data-parallel loop calls it once at the end."""
        return self.trainer.finish_data_parallel()

    def reset(self, env_ids: Sequence[int] | None = None) -> None:
        """Forget the running episodes of ``env_ids`` (default: all); their unfinished steps are dropped."""
        self.recorder.drop(env_ids)

    @property
    def recording(self) -> bool:
        """Whether the agent records experience for training (``False`` inside :meth:`evaluating`)."""
        return self._recording

    @property
    def total_steps(self) -> int:
        """Training steps taken so far (:class:`~rllama.trainer.Trainer`)."""
        return self.trainer.total_steps

    @property
    def total_episodes(self) -> int:
        """Training episodes finished so far."""
        return self.trainer.total_episodes

    # ------------------------------------------------------------------ evaluation
    @contextlib.contextmanager
    def evaluating(self, greedy: bool = True, write_memory: bool = False):
        """Context in which the agent acts without recording experience or training.

        Running training episodes are set aside and restored afterwards. Episodic memory is still
        read; it is written only with ``write_memory=True``.
        """
        saved = (self.recorder.swap({}), self._recording, self.actor.greedy, self._write_memory)
        self._recording, self.actor.greedy, self._write_memory = False, greedy, write_memory
        try:
            yield self
        finally:
            records, self._recording, self.actor.greedy, self._write_memory = saved
            self.recorder.swap(records)

    def evaluate(self, env, n_episodes: int, *, greedy: bool = True, seed: int | None = None,
                 progress: bool = False, write_memory: bool = False) -> dict[str, Any]:
        """Mean return over ``n_episodes`` evaluation episodes (no training, nothing recorded).

        With a seed, episode ``k`` of a single env is reset with ``seed + k`` (of a vector env, env
        ``i`` is reset with ``seed + i`` once), so policies can be compared on the same deals.

        Returns:
            ``{"mean_return", "std_return", "stderr", "n_episodes", "returns"}`` (a
            :class:`~rllama.loops.ReturnStats`, which prints as a one-line summary).
        """
        with self.evaluating(greedy=greedy, write_memory=write_memory):
            returns = run_episodes(self, env, n_episodes, seed=seed, progress=progress, desc="eval",
                                   reseed_each_episode=True)
        return return_stats(returns)

    def train(self, env, n_episodes: int, *, seed: int | None = None, progress: bool = True,
              callback: CallbackLike = None) -> list[dict[str, float]]:
        """Run ``n_episodes`` training episodes on ``env`` (single or vector env).

        Args:
            seed: resets the env once at the start (a vector env seeds its sub-env ``i`` with
                ``seed + i``); ``None`` continues from the env's state. Training in slices with
                ``seed=base + k`` would replay the same deals in every slice of a vector env: step
                the seed by at least ``num_envs`` per slice, or seed only the first.
            callback: a :class:`~rllama.callbacks.Callback` (its ``on_update`` gets each update's
                statistics), a function of the statistics, or a list of these; ``False`` from any
                stops training.

        Returns:
            The statistics of every update.
        """
        return self.trainer.train(env, n_episodes, seed=seed, progress=progress, callback=callback)

    # ------------------------------------------------------------------ persistence
    @property
    def mid_episode(self) -> bool:
        """Whether some environment has steps of an unfinished episode."""
        return self.recorder.mid_episode

    def loop_state_dict(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """The agent's own training state besides the policy and the algorithm, for an exact resume: its
        random generator (tensors), its trainer's counters and GRPO's group bookkeeping, and the
        reply counts since the last update (JSON-serialisable)."""
        actor = self.actor
        meta = {**self.trainer.state_dict(), "parse_failures": actor.parse_failures, "replies": actor.replies,
                "invalid_replies": actor.invalid_replies}
        return {"rng": self.generator.get_state()}, meta

    def load_loop_state_dict(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        """Restore what :meth:`loop_state_dict` returned; unfinished episodes are dropped (:meth:`reset`)."""
        self.generator.set_state(tensors["rng"])
        self.trainer.load_state_dict(meta)
        self.actor.parse_failures = int(meta["parse_failures"])
        self.actor.replies = int(meta.get("replies", 0))  # checkpoints before issue 41 have no reply counts
        self.actor.invalid_replies = int(meta.get("invalid_replies", 0))
        self.reset()

    def save(self, path) -> None:
        """Save the adapter and heads (safetensors), a JSON config, and the episodic memory store
        (subfolder ``memory/``) to folder ``path``, as one atomic write with a checksum manifest: a
        crash leaves the previous save or this one, whole."""
        extra = {"agent_class": f"{type(self).__module__}.{type(self).__qualname__}",
                 "algorithm": self.algorithm.name, "memory": self.episodic_memory is not None}
        with writing_dir(path) as tmp:
            self.policy.write_into(tmp, extra=extra)
            if self.episodic_memory is not None:
                self.episodic_memory.save(tmp / "memory")

    def load(self, path) -> dict:
        """Load what :meth:`save` wrote: adapter and head weights, and the episodic memory store when
        the agent has a memory; returns the saved config. Everything is read and checked before
        anything changes: a damaged or incomplete folder raises an error naming the file and leaves
        the agent as it was."""
        path = recover_dir(path)
        adapter_state, heads_state, config = self.policy.read_checkpoint(path)
        memory = self.episodic_memory
        store = Path(path) / "memory"
        if config.get("memory") and not (store / "memory.json").is_file():
            raise CorruptFileError(f"{path} was saved with an episodic memory, but {store} is missing")
        if memory is not None and (store / "memory.json").is_file():
            memory = EpisodicMemory.load(store, embedder=memory.embedder)
        elif memory is not None:
            logger.warning("%s holds no episodic memory; the agent keeps its own", path)
        self.policy.apply_checkpoint(adapter_state, heads_state, config)
        self.episodic_memory = memory
        return config

def _per_env(values: Sequence | None, env_ids: list[int], what: str, default=None) -> list:
    """``values`` (one per environment id), or ``default`` for each."""
    if values is None:
        return [default] * len(env_ids)
    values = list(values)
    if len(values) != len(env_ids):
        raise ValueError(f"{len(env_ids)} env_ids but {len(values)} {what}")
    return values
