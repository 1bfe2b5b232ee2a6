"""Shared fixtures: tiny randomly initialised models built in code (no downloads), tiny envs."""

from __future__ import annotations

from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
import torch
from gymnasium import spaces

from rllama import RLlamaAgent

torch.set_num_threads(1)

CHAT_TEMPLATE = (
    "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}</s>{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)


LEFTOVERS = ("/tmp/ray/session_*", "/tmp/torchelastic_*")  # what Ray and torchrun leave behind them


@pytest.fixture(scope="session", autouse=True)
def remove_leftovers():
    """Remove the Ray session folders and torchrun temporaries this test run created (not older ones)."""
    import glob
    import shutil

    before = {path for pattern in LEFTOVERS for path in glob.glob(pattern)}
    yield
    for path in {path for pattern in LEFTOVERS for path in glob.glob(pattern)} - before:
        shutil.rmtree(path, ignore_errors=True)
    latest = Path("/tmp/ray/session_latest")
    if latest.is_symlink() and not latest.exists():
        latest.unlink()


def make_tokenizer(chat_template: str | None = None):
    """A byte-level tokenizer that needs no files (ids 0-2 special, 3-258 bytes)."""
    from transformers import ByT5Tokenizer

    tok = ByT5Tokenizer()
    if chat_template:
        tok.chat_template = chat_template
    return tok


def make_tiny_lm(kind: str = "llama", seed: int = 0, vocab_size: int = 384):
    """A 2-layer, 64-unit causal LM with random weights."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    if kind == "llama":
        config = LlamaConfig(
            vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
            bos_token_id=None, eos_token_id=1, pad_token_id=0,
        )
        return LlamaForCausalLM(config)
    if kind == "gpt2":
        config = GPT2Config(vocab_size=vocab_size, n_embd=64, n_layer=2, n_head=4, n_positions=1024,
                            bos_token_id=1, eos_token_id=1)
        return GPT2LMHeadModel(config)
    raise ValueError(kind)


@pytest.fixture
def tokenizer():
    return make_tokenizer()


@pytest.fixture
def tiny_lm():
    return make_tiny_lm()


class ChoiceEnv(gym.Env):
    """One-step env: observation is a number; action 1 ("right") earns ``reward_right``, 0 earns the opposite.

    ``steps`` > 1 makes episodes longer (each step rewarded the same way).
    """

    metadata = {"render_modes": []}

    def __init__(self, reward_right: float = 1.0, steps: int = 1):
        self.observation_space = spaces.Discrete(10)
        self.action_space = spaces.Discrete(2)
        self.reward_right = reward_right
        self.steps = steps
        self._t = 0

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self._t = 0
        return int(self.np_random.integers(10)), {}

    def step(self, action):
        assert self.action_space.contains(action), action
        self._t += 1
        reward = self.reward_right if action == 1 else -self.reward_right
        return int(self.np_random.integers(10)), reward, self._t >= self.steps, False, {}


class ChoiceAgent(RLlamaAgent):
    """Scores the candidates "left" / "right"; records every hook call."""

    candidates = ("left", "right")
    keep_history = True  # the tests read the episode's chat; "auto" would drop it for number observations

    def __init__(self, *args, **kwargs):
        self.calls: list[tuple] = []
        super().__init__(*args, **kwargs)

    def get_system_prompt(self):
        self.calls.append(("get_system_prompt",))
        return "Pick a side."

    def format_observation(self, observation):
        self.calls.append(("format_observation", observation))
        return f"n={int(observation)}"

    def get_valid_actions(self, observation):
        self.calls.append(("get_valid_actions", observation))
        return list(self.candidates) if self.candidates else None

    def scores_actions(self):
        return bool(self.candidates)

    def extract_action(self, response):
        self.calls.append(("extract_action", response))
        if "right" in response:
            return 1
        if "left" in response:
            return 0
        raise ValueError(f"cannot parse {response!r}")


class FreeTextAgent(ChoiceAgent):
    """Generates free text (no candidates)."""

    candidates = ()


@pytest.fixture
def make_agent(tokenizer):
    """Factory of agents on a fresh tiny model: ``make_agent(cls=ChoiceAgent, **kwargs)``."""

    def factory(cls=ChoiceAgent, kind="llama", model_seed=0, **kwargs):
        kwargs.setdefault("seed", 0)
        kwargs.setdefault("precision", "fp32")  # exact comparisons; bf16 has its own test
        return cls(make_tiny_lm(kind, seed=model_seed), tokenizer, **kwargs)

    return factory


def right_probability(agent, observation) -> float:
    """Probability of the second candidate ("right") at the first step of an episode."""
    messages = [{"role": "system", "content": agent.get_system_prompt()},
                {"role": "user", "content": agent.format_observation(observation)}]
    prompt = agent.chat.prompt_ids(messages)
    cands = [agent.chat.reply_ids(c) for c in agent.get_valid_actions(observation)]
    with torch.no_grad():
        logprobs, _ = agent.policy.score_candidates([prompt], [cands])
    return float(np.exp(logprobs[0][1].item()))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A tiny model and its tokenizer saved to a folder (for runs configured by path, CLI subprocesses)."""
    path = tmp_path_factory.mktemp("tiny-model")
    make_tiny_lm().save_pretrained(path)
    make_tokenizer().save_pretrained(path)
    return path


def tiny_run_config(tmp_path, model_dir, **overrides):
    """A RunConfig of a few seconds: ChoiceAgent on ChoiceEnv with the tiny model in ``model_dir``."""
    from rllama.experiment import RunConfig

    values = dict(model=str(model_dir), agent="tests.conftest:ChoiceAgent", env="tests.conftest:ChoiceEnv",
                  env_kwargs={"steps": 2}, num_envs=2, episodes=16, segment_episodes=4, eval_every=8, eval_episodes=4,
                  checkpoint_every=4, precision="fp32", algorithm="ppo",
                  algorithm_config={"batch_episodes": 4, "minibatch_size": 4, "learning_starts": 8},
                  loggers=["jsonl"], progress=False,
                  output_dir=str(tmp_path / "runs"), name="run", threads=1)
    values.update(overrides)
    return RunConfig(**values)
