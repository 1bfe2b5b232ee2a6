"""RLlamaAgent: hooks, chat context, loop methods, vector envs, evaluation, errors."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest
import torch

from rllama import AgentStateError, HookError, InvalidActionError, ModelNotFoundError, RLlamaAgent
from rllama.envs import unbatch
from tests.conftest import CHAT_TEMPLATE, ChoiceAgent, ChoiceEnv, FreeTextAgent, make_tiny_lm, make_tokenizer


def test_hooks_are_called_with_the_right_arguments(make_agent):
    agent = make_agent()
    action = agent.act(7)
    assert action in (0, 1)
    assert agent.calls[0] == ("get_system_prompt",)
    assert ("format_observation", 7) in agent.calls
    assert ("get_valid_actions", 7) in agent.calls
    extract = [c for c in agent.calls if c[0] == "extract_action"]
    assert len(extract) == 1 and extract[0][1] in ("left", "right")  # the chosen candidate's text
    assert action == (1 if extract[0][1] == "right" else 0)


def test_chat_context_grows_by_observation_and_reply(make_agent):
    agent = make_agent()
    agent.act(3)
    agent.assign_reward(0.5)
    agent.act(4)
    slot = agent.recorder[0]
    roles = [m["role"] for m in slot.messages]
    assert roles == ["system", "user", "assistant", "user", "assistant"]
    assert slot.messages[0]["content"] == "Pick a side."
    assert slot.messages[1]["content"] == "n=3" and slot.messages[3]["content"] == "n=4"
    assert slot.messages[2]["content"] in ("left", "right")
    # The second step's prompt is the whole chat so far.
    assert slot.steps[1].prompt_ids == agent.chat.prompt_ids(slot.messages[:4])
    assert slot.steps[0].reward == 0.5 and slot.steps[1].reward == 0.0
    assert agent.calls.count(("get_system_prompt",)) == 1
    agent.terminate_episode()
    agent.act(5)
    assert [m["role"] for m in agent.recorder[0].messages] == ["system", "user", "assistant"]
    assert agent.calls.count(("get_system_prompt",)) == 2  # a new episode starts a new chat


def test_chat_template_is_used_when_the_tokenizer_has_one():
    tok = make_tokenizer(CHAT_TEMPLATE)
    agent = ChoiceAgent(make_tiny_lm(), tok, seed=0)
    agent.act(1)
    prompt = agent.recorder[0].steps[0].prompt_ids
    assert tok.decode(prompt) == "<system>Pick a side.</s><user>n=1</s><assistant>"


def test_default_format_without_chat_template(make_agent):
    agent = make_agent()
    text = agent.chat.render([{"role": "system", "content": "S"}, {"role": "user", "content": "U"},
                              {"role": "assistant", "content": "A"}, {"role": "user", "content": "V"}])
    assert text == "System: S\n\nUser: U\n\nAssistant: A</s>\n\nUser: V\n\nAssistant:"
    assert agent.chat.reply_ids("left")[-1] == agent.tokenizer.eos_token_id


def test_terminate_returns_empty_dict_until_batch_full_then_stats(make_agent):
    agent = make_agent(algorithm_config={"batch_episodes": 3, "minibatch_size": 4, "policy_head": 0})
    for k in range(3):
        agent.act(k)
        agent.assign_reward(1.0)
        stats = agent.terminate_episode()
        if k < 2:
            assert stats == {}
    for key in ("loss/policy", "loss/value", "loss/total", "policy/entropy", "policy/kl_ref", "policy/approx_kl",
                "policy/clipfrac", "value/explained_variance", "rollout/mean_return", "rollout/episodes",
                "rollout/parse_failures", "time/update_s"):
        assert key in stats, key
    assert stats["rollout/episodes"] == 3 and stats["rollout/mean_return"] == 1.0
    assert agent.algorithm.buffer.num_episodes == 0


def test_act_batch_keeps_one_chat_per_env(make_agent):
    agent = make_agent()
    actions = agent.act_batch([1, 2, 3])
    assert len(actions) == 3
    agent.assign_rewards([1.0, 0.0, -1.0])
    assert [agent.recorder[i].messages[1]["content"] for i in range(3)] == ["n=1", "n=2", "n=3"]
    agent.act_batch([4, 6], env_ids=[0, 2])
    assert len(agent.recorder[0].steps) == 2 and len(agent.recorder[1].steps) == 1
    agent.terminate_episodes(np.array([True, False, True]))
    assert set(agent.recorder) == {1}
    assert agent.algorithm.buffer.num_episodes == 2


def test_batched_acting_matches_one_at_a_time(make_agent):
    """The batched forward gives the same distribution as acting on each env alone."""
    a, b = make_agent(), make_agent()
    with torch.no_grad():
        obs = [1, 22, 333]
        a.act_batch(obs)
        for i, o in enumerate(obs):
            b.act_batch([o], env_ids=[i])
    for i in range(3):
        sa, sb = a.recorder[i].steps[0], b.recorder[i].steps[0]
        assert sa.prompt_ids == sb.prompt_ids
        batched_p = np.exp(sa.logprob) if sa.action_index == 1 else 1 - np.exp(sa.logprob)
        single_p = np.exp(sb.logprob) if sb.action_index == 1 else 1 - np.exp(sb.logprob)
        assert abs(batched_p - single_p) < 1e-4


def test_same_seed_same_actions_and_updates(make_agent):
    def run(seed):
        agent = make_agent(seed=seed, algorithm_config={"batch_episodes": 4, "minibatch_size": 2})
        agent.train(ChoiceEnv(), 8, seed=seed, progress=False)
        return torch.cat([p.detach().flatten() for p in agent.policy.trainable_parameters()])

    torch.testing.assert_close(run(1), run(1), atol=0, rtol=0)
    assert not torch.equal(run(1), run(2))


def test_train_and_evaluate_on_a_single_env(make_agent):
    agent = make_agent(algorithm_config={"batch_episodes": 4, "minibatch_size": 4, "policy_head": 0})
    history = agent.train(ChoiceEnv(steps=2), 8, seed=0, progress=False)
    assert len(history) == 2
    result = agent.evaluate(ChoiceEnv(steps=2), 5, seed=0)
    assert result["n_episodes"] == 5 and len(result["returns"]) == 5
    assert all(r in (-2.0, 0.0, 2.0) for r in result["returns"])
    assert agent.algorithm.buffer.num_episodes == 0  # evaluation records nothing


def test_train_takes_callbacks_functions_or_lists_of_them_and_any_false_stops(make_agent):
    from rllama import Callback

    class Counter(Callback):
        def __init__(self, stop_after=None):
            self.seen, self.stop_after = [], stop_after

        def on_update(self, record):
            self.seen.append(record)
            return False if self.stop_after is not None and len(self.seen) >= self.stop_after else None

    config = {"batch_episodes": 2, "minibatch_size": 2, "policy_head": 0}
    agent = make_agent(algorithm_config=config)
    counter, calls = Counter(stop_after=2), []
    history = agent.train(ChoiceEnv(steps=1), 12, seed=0, progress=False, callback=[counter, calls.append])
    assert len(history) == len(counter.seen) == len(calls) == 2  # stopped at the second update; both heard it
    assert calls == counter.seen == history
    alone = Counter()
    assert len(make_agent(algorithm_config=config).train(ChoiceEnv(steps=1), 4, seed=0, progress=False,
                                                         callback=alone)) == len(alone.seen) == 2
    with pytest.raises(TypeError, match="callback 3"):
        agent.train(ChoiceEnv(steps=1), 2, seed=0, progress=False, callback=[3])
    with pytest.raises(TypeError, match="callback 3: expected"):
        agent.train(ChoiceEnv(steps=1), 2, seed=0, progress=False, callback=3)

    class DuckTyped:  # not a subclass of Callback, but has on_update
        def __init__(self):
            self.seen = []

        def on_update(self, stats):
            self.seen.append(stats)

    duck = DuckTyped()
    agent.train(ChoiceEnv(steps=1), 4, seed=0, progress=False, callback=duck)
    assert duck.seen


@pytest.mark.parametrize("mode", ["next_step", "same_step"])
def test_train_and_evaluate_on_a_vector_env(make_agent, mode):
    from gymnasium.vector import AutoresetMode

    autoreset = {"next_step": AutoresetMode.NEXT_STEP, "same_step": AutoresetMode.SAME_STEP}[mode]
    envs = gym.vector.SyncVectorEnv([lambda: ChoiceEnv(steps=2) for _ in range(3)], autoreset_mode=autoreset)
    agent = make_agent(algorithm_config={"batch_episodes": 4, "minibatch_size": 8, "policy_head": 0})
    history = agent.train(envs, 9, seed=0, progress=False)
    assert len(history) >= 1
    assert agent.total_episodes == 9
    assert agent.total_steps == 18  # no step of a reset transition was recorded
    result = agent.evaluate(envs, 7, seed=0)
    assert result["n_episodes"] == 7
    assert all(r in (-2.0, 0.0, 2.0) for r in result["returns"])


def test_blackjack_vector_env_observations_unbatch():
    envs = gym.make_vec("Blackjack-v1", num_envs=3, vectorization_mode="sync", sab=True)
    obs, _ = envs.reset(seed=0)
    parts = unbatch(envs.single_observation_space, obs, 3)
    assert len(parts) == 3 and all(len(p) == 3 for p in parts)
    assert all(envs.single_observation_space.contains(tuple(int(x) for x in p)) for p in parts)


def test_evaluation_mode_sets_running_episodes_aside(make_agent):
    agent = make_agent()
    agent.act(1)
    agent.assign_reward(1.0)
    with agent.evaluating():
        agent.act(2)
        agent.assign_reward(5.0)
        assert agent.terminate_episode() == {}
    assert agent.recorder[0].steps[0].reward == 1.0 and len(agent.recorder[0].steps) == 1
    assert agent.algorithm.buffer.num_episodes == 0


def test_greedy_evaluation_is_deterministic(make_agent):
    agent = make_agent()
    r1 = agent.evaluate(ChoiceEnv(steps=3), 4, seed=5)
    r2 = agent.evaluate(ChoiceEnv(steps=3), 4, seed=5)
    assert r1["returns"] == r2["returns"]


# ---------------------------------------------------------------------- bad input
def test_extract_action_outside_action_space_is_named(make_agent):
    class Bad(ChoiceAgent):
        def extract_action(self, response):
            return "jump"

    agent = make_agent(Bad)
    with pytest.raises(InvalidActionError, match=r"returned 'jump'.*Discrete\(2\)"):
        agent.train(ChoiceEnv(), 1, progress=False)


def test_a_hook_that_raises_is_named(make_agent):
    class Broken(ChoiceAgent):
        def format_observation(self, observation):
            raise KeyError("player_sum")

    with pytest.raises(HookError, match=r"format_observation\(7\) raised KeyError"):
        make_agent(Broken).act(7)


def test_an_observation_that_cannot_be_formatted(make_agent):
    class NotText(ChoiceAgent):
        def format_observation(self, observation):
            return observation  # an int, not text

    with pytest.raises(HookError, match="returned int 7; expected str"):
        make_agent(NotText).act(7)


@pytest.mark.parametrize("candidates,match", [([], "empty list"), (["a", "a"], "duplicate"), ("ab", "list of strings"),
                                              (["a", 3], "non-string")])
def test_bad_valid_actions(make_agent, candidates, match):
    class Odd(ChoiceAgent):
        def get_valid_actions(self, observation):
            return candidates

    with pytest.raises(HookError, match=match):
        make_agent(Odd).act(1)


def test_loop_methods_out_of_order(make_agent):
    agent = make_agent()
    with pytest.raises(AgentStateError, match="no steps"):
        agent.terminate_episode()
    with pytest.raises(AgentStateError, match="before any act"):
        agent.assign_reward(1.0)
    agent.act(1)
    with pytest.raises(ValueError, match="not finite"):
        agent.assign_reward(float("nan"))


def test_model_path_that_does_not_exist():
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        ChoiceAgent("./no/such/model")


def test_model_object_without_tokenizer():
    with pytest.raises(ValueError, match="tokenizer"):
        ChoiceAgent(make_tiny_lm())


def test_unknown_algorithm_lists_known(make_agent):
    with pytest.raises(ValueError, match=r"Unknown algorithm 'ppp'.*'ppo'.*Did you mean 'ppo'"):
        make_agent(algorithm="ppp")


def test_unknown_config_field(make_agent):
    with pytest.raises(ValueError, match=r"unknown PPOConfig field\(s\) \['lr'\]"):
        make_agent(algorithm_config={"lr": 0.1})


def test_generate_mode_unparseable_text_falls_back_and_is_counted(make_agent):
    agent = make_agent(FreeTextAgent, max_new_tokens=4,
                       algorithm_config={"batch_episodes": 4, "minibatch_size": 4})
    history = agent.train(ChoiceEnv(), 4, seed=0, progress=False)
    # A random tiny model almost never writes "left"/"right": the fallback acted and was counted.
    assert history[0]["rollout/parse_failures"] >= 3
    assert history[0]["rollout/steps"] == 4


def test_generate_mode_without_action_space_explains_fallback(make_agent):
    agent = make_agent(FreeTextAgent, max_new_tokens=3)
    with pytest.raises(HookError, match="no action_space"):
        agent.act(1)


def test_long_chats_drop_oldest_turns_to_fit(make_agent):
    agent = make_agent(max_prompt_tokens=120)
    for k in range(12):
        agent.act(k)
    slot = agent.recorder[0]
    assert all(len(s.prompt_ids) <= 120 for s in slot.steps)
    assert slot.messages[0]["role"] == "system"
    assert slot.messages[-2]["content"] == "n=11"


class _Minimal(RLlamaAgent):
    def get_system_prompt(self):
        return "s"

    def format_observation(self, observation):
        return str(observation)

    def extract_action(self, response):
        return 0


def test_minimal_subclass_needs_only_three_hooks(tokenizer):
    agent = _Minimal(make_tiny_lm(), tokenizer, max_new_tokens=2)
    assert agent.act(0) == 0


def test_a_failing_hook_leaves_the_chat_unchanged(make_agent):
    class FailsOnSeven(ChoiceAgent):
        def format_observation(self, observation):
            if observation == 7:
                raise ValueError("seven")
            return super().format_observation(observation)

    agent = make_agent(FailsOnSeven)
    agent.act(1)
    before = [dict(m) for m in agent.recorder[0].messages]
    with pytest.raises(HookError):
        agent.act_batch([7, 2], env_ids=[0, 1])
    assert agent.recorder[0].messages == before and len(agent.recorder[0].steps) == 1
    assert 1 not in agent.recorder or not agent.recorder[1].steps
    agent.act(3)  # the agent carries on
    assert [m["role"] for m in agent.recorder[0].messages] == ["system", "user", "assistant", "user", "assistant"]


def test_a_truncated_episode_keeps_the_state_it_was_cut_in(make_agent):
    """The bootstrap step is the prompt (and candidates) act() would have built for the final observation."""
    cut, going_on = make_agent(algorithm_config={"batch_episodes": 99}), make_agent()
    for agent in (cut, going_on):
        agent.act(3)
        agent.assign_reward(0.0)
    going_on.act(8)
    cut.terminate_episode(truncated=True, final_observation=8)
    boot = cut.algorithm.buffer.episodes[-1].bootstrap
    assert boot.prompt_ids == going_on.last_prompt_ids[0]
    assert boot.candidate_ids == [cut.chat.reply_ids(c) for c in ("left", "right")]
    cut.act(1)
    cut.terminate_episode()  # terminated: nothing to bootstrap from
    assert cut.algorithm.buffer.episodes[-1].bootstrap is None


def test_truncation_without_the_final_observation_warns_once(make_agent, caplog):
    agent = make_agent(algorithm_config={"batch_episodes": 99})
    for _ in range(2):
        agent.act(3)
        with caplog.at_level("WARNING", logger="rllama"):
            agent.terminate_episode(truncated=True)
    assert sum("final_observation" in r.getMessage() for r in caplog.records) == 1


@pytest.mark.parametrize("vector", [None, "NEXT_STEP", "SAME_STEP"])
def test_train_passes_final_observations_of_time_limited_episodes(make_agent, vector):
    from gymnasium.vector import AutoresetMode

    agent = make_agent(algorithm_config={"batch_episodes": 99})
    make = lambda: gym.wrappers.TimeLimit(ChoiceEnv(steps=10), max_episode_steps=2)  # noqa: E731
    env = make() if vector is None else gym.vector.SyncVectorEnv([make, make], autoreset_mode=AutoresetMode[vector])
    agent.train(env, 4, seed=0, progress=False)
    episodes = agent.algorithm.buffer.episodes
    assert len(episodes) == 4 and all(e.truncated and len(e) == 2 for e in episodes)
    for e in episodes:  # the cut-in state's prompt continues the last step's chat
        assert e.bootstrap is not None
        assert e.bootstrap.prompt_ids[: len(e.steps[-1].prompt_ids)] == e.steps[-1].prompt_ids
