"""Inputs at the edges (issue 23): rewards whose sum overflows, prompts and candidates past a model's
position limit, vector envs that do not declare how they reset, and a SkillModel learning on the
policy an agent acts with."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest
import torch

from rllama import RLlamaError
from rllama.loops import run_episodes
from tests.conftest import ChoiceAgent, ChoiceEnv


# ------------------------------------------------------------------------------------------ rewards
def test_rewards_whose_sum_overflows_are_refused(make_agent):
    agent = make_agent()
    agent.act(3)
    agent.assign_reward(1e308)
    with pytest.raises(ValueError, match="overflow"):
        agent.assign_reward(1e308)
    assert agent.recorder[0].total_reward == 1e308  # the refused reward was not added


def test_an_update_with_a_non_finite_loss_is_refused_and_the_weights_stay_finite(make_agent):
    agent = make_agent(algorithm="ppo", algorithm_config={"batch_episodes": 2, "minibatch_size": 2,
                                                           "policy_head": 0})
    before = {n: p.detach().clone() for n, p in agent.policy.named_parameters() if p.requires_grad}
    env = gym.wrappers.TransformReward(ChoiceEnv(steps=3), lambda r: r * 1e200)  # finite sums, squares overflow
    with pytest.raises(RLlamaError, match="not finite.*the step was not taken"):
        run_episodes(agent, env, 2, seed=0)
    for name, p in agent.policy.named_parameters():
        if p.requires_grad:
            assert torch.isfinite(p).all() and torch.equal(p, before[name]), name


# ------------------------------------------------------------------------------------------ position limit
class LongAgent(ChoiceAgent):
    """Candidates of hundreds of tokens (the test tokenizer: one token a byte)."""

    candidates = ("left " * 90, "right " * 90)
    text = "x" * 150  # with the history the prompt fits max_prompt_tokens, not beside a candidate

    def format_observation(self, observation):
        return f"n={int(observation)} {self.text}"


def test_history_is_cut_so_that_prompt_and_candidate_fit_the_position_limit(make_agent):
    agent = make_agent(cls=LongAgent, kind="gpt2")  # 1024 positions
    seen = []
    real = agent.backend.candidate_outputs

    def record(prompts, candidates, **kw):
        seen.extend(len(p) + max(map(len, c)) for p, c in zip(prompts, candidates))
        return real(prompts, candidates, **kw)

    agent.backend.candidate_outputs = record
    run_episodes(agent, ChoiceEnv(steps=4), 2, seed=0)  # the history alone would pass 1024 by step 3
    assert len(seen) == 8 and max(seen) <= 1024


def test_what_cannot_fit_the_position_limit_is_named(make_agent):
    agent = make_agent(cls=LongAgent, kind="gpt2")
    agent.text = "x" * 600
    with pytest.raises(RLlamaError, match="model's context of 1024.*candidate"):
        agent.act(1)
    with pytest.raises(ValueError, match="exceeds the model's context of 1024"):
        make_agent(kind="gpt2", max_prompt_tokens=1000, max_new_tokens=32)


def long_episode(prompt_tokens: int) -> dict:
    """A one-step trajectory whose prompt is about ``prompt_tokens`` tokens (one a byte)."""
    prompt = [{"role": "user", "content": "x" * prompt_tokens}]
    return {"episode": 7, "return": 1.0, "steps": [{"prompt": prompt, "response": "left", "reward": 1.0}]}


@pytest.mark.parametrize("kind", ["gpt2", "llama"])  # a learned position table (fails), rotary ones (silent)
def test_cloning_and_learning_past_the_context_are_refused_before_training(make_agent, kind):
    from rllama.skills import SkillModel
    from rllama.trajectories import behaviour_cloning

    agent = make_agent(kind=kind, score_normalization="mean")  # 1024 positions either way
    before = {n: p.detach().clone() for n, p in agent.policy.named_parameters() if p.requires_grad}
    episodes = [long_episode(100), long_episode(3000)]
    episodes[0]["episode"] = 6
    with pytest.raises(RLlamaError, match=r"episode 7 step 0: its prompt and response is 30\d\d tokens, "
                                          r"past the model's context of 1024 tokens"):
        behaviour_cloning(agent, episodes, keep="all")
    skills = SkillModel(policy=agent.policy)
    examples = [{"prompt": "hi", "response": "ok"}, {"prompt": "y" * 3000, "response": "ok"}]
    with pytest.raises(RLlamaError, match="example 1: its prompt and response is 30\\d\\d tokens, past the model's"):
        skills.learn(examples, adapter="new-skill")
    assert "new-skill" not in agent.policy.list_adapters()  # a refused learn leaves no empty adapter
    with pytest.raises(RLlamaError, match=r"prompt 0 is 10\d\d tokens \+ 32 to generate, past the model's context"):
        skills.generate("z" * 1000, max_new_tokens=32)
    skills.close()
    for name, p in agent.policy.named_parameters():  # nothing was trained
        if p.requires_grad:
            assert torch.equal(p, before[name]), name
    result = behaviour_cloning(agent, episodes[:1], keep="all", epochs=1)  # what fits still trains
    assert result["steps"] == 1


def test_cloning_names_an_episode_without_an_id_by_its_place_and_text_no_tokenizer_takes_is_refused(
        make_agent, tmp_path):
    import json

    from rllama.skills import SkillModel
    from rllama.trajectories import TrajectoryError, behaviour_cloning

    agent = make_agent(kind="gpt2", score_normalization="mean")  # cloning needs the model in the policy
    episodes = [long_episode(50), long_episode(50), long_episode(3000)]
    for e in episodes:
        del e["episode"]
    episodes[0]["return"] = -1.0  # filtered out by keep="success": the long one is still the list's #2
    with pytest.raises(RLlamaError, match="episode #2 of the list step 0"):
        behaviour_cloning(agent, episodes, keep="success")
    step = {"episode": 0, "step": 0, "observation": "o", "prompt": [{"role": "user", "content": "a\ud800"}],
            "response": "left", "action": 0, "reward": 1.0, "done": True}
    (tmp_path / "log.jsonl").write_text(json.dumps(step) + "\n")  # JSON's escape of a lone surrogate
    with pytest.raises(TrajectoryError, match=r"log.jsonl:1: .*\['prompt'\]\[0\]\['content'\]: character 1 .* "
                                              "lone surrogate"):
        behaviour_cloning(agent, tmp_path / "log.jsonl", keep="all")
    skills = SkillModel(policy=agent.policy)
    with pytest.raises(ValueError, match=r"example 0\['prompt'\]: character 4 .* lone surrogate"):
        skills.learn([{"prompt": "bad \ud800", "response": "ok"}])
    with pytest.raises(ValueError, match="prompt 0: character 4 .* lone surrogate"):
        skills.generate("bad \ud800")
    for bad in (-5, 0, 2.5, True):
        with pytest.raises(ValueError, match=f"max_new_tokens={bad!r}; expected a positive integer"):
            skills.generate("z" * 1000, max_new_tokens=bad)
    skills.close()


# ------------------------------------------------------------------------------------------ autoreset
class Undeclared(gym.vector.VectorWrapper):
    """A vector env that resets the same-step way but does not say so."""

    def __init__(self, env):
        super().__init__(env)
        self.metadata = {k: v for k, v in env.metadata.items() if k != "autoreset_mode"}


def lengths(agent, envs) -> list[int]:
    found = []
    real = agent.terminate_episodes

    def record(env_ids, *args, **kwargs):
        ids = [int(i) for i in env_ids]
        found.extend(len(agent.recorder[i].steps) for i in ids)
        return real(env_ids, *args, **kwargs)

    agent.terminate_episodes = record
    run_episodes(agent, envs, 8, seed=0)
    return found


def test_a_vector_env_that_resets_same_step_without_saying_so_keeps_every_step(make_agent, caplog):
    def make():
        return gym.vector.SyncVectorEnv([lambda: ChoiceEnv(steps=3) for _ in range(2)],
                                        autoreset_mode=gym.vector.AutoresetMode.SAME_STEP)

    declared = lengths(make_agent(), make())
    hidden = lengths(make_agent(), Undeclared(make()))
    assert declared == hidden == [3] * 8
    assert "does not declare" in caplog.text and "SAME_STEP" in caplog.text


# ------------------------------------------------------------------------------------------ shared policy
def test_an_agent_acts_with_its_adapter_while_a_skill_model_learns_on_the_same_policy(make_agent):
    from rllama.skills import SkillModel

    agent = make_agent()
    skills = SkillModel(policy=agent.policy)
    used = []
    real = agent.backend.candidate_outputs

    def record(*args, **kwargs):
        used.append(agent.policy.active_adapter)
        return real(*args, **kwargs)

    agent.backend.candidate_outputs = record
    examples = [{"prompt": "Say hi.", "response": "hi " * 20}] * 8
    future = skills.learn_async(examples, adapter="skill", epochs=30)
    acted = 0
    while not future.done() or acted < 20:
        agent.act(acted % 10)
        agent.assign_reward(0.0)
        agent.terminate_episode()
        acted += 1
    future.result()
    skills.close()
    assert skills.versions["skill"] > 0 and acted >= 20
    assert set(used) == {"default"}, f"{used.count('skill')} of {len(used)} scores used the skill's adapter"
    assert np.isfinite(acted)
