"""The algorithm registry: lookup, suggestions, user registration."""

from __future__ import annotations

import pytest

from rllama.algorithms import (
    PPO,
    Algorithm,
    AlgorithmConfig,
    available,
    get_algorithm_class,
    register_algorithm,
    registry,
)
from tests.conftest import ChoiceEnv


@pytest.fixture
def clean_registry():
    saved = dict(registry._REGISTRY)
    yield
    registry._REGISTRY.clear()
    registry._REGISTRY.update(saved)


def test_ppo_is_registered_case_insensitively():
    assert "ppo" in available()
    assert get_algorithm_class("PPO") is PPO


def test_unknown_name_lists_known_names_and_suggests():
    with pytest.raises(ValueError) as info:
        get_algorithm_class("pop")
    message = str(info.value)
    assert "Unknown algorithm 'pop'" in message and "'ppo'" in message and "Did you mean 'ppo'" in message


def test_user_algorithm_registers_with_a_decorator_and_trains(clean_registry, make_agent):
    calls = []

    @register_algorithm("count_only")
    class CountOnly(Algorithm):
        config_class = AlgorithmConfig

        def update(self):
            calls.append(self.buffer.num_episodes)
            self.buffer.clear()
            return {"episodes_seen": float(calls[-1])}

    assert "count_only" in available()
    agent = make_agent(algorithm="count_only", algorithm_config={"batch_episodes": 2})
    history = agent.train(ChoiceEnv(), 4, progress=False)
    assert calls == [2, 2] and history[0]["episodes_seen"] == 2.0


def test_registering_a_taken_name_needs_overwrite(clean_registry):
    with pytest.raises(ValueError, match="already registered"):
        @register_algorithm("ppo")
        class Other(Algorithm):
            def update(self):
                return {}

    @register_algorithm("ppo", overwrite=True)
    class Replacement(Algorithm):
        def update(self):
            return {}

    assert get_algorithm_class("ppo") is Replacement


def test_only_algorithm_subclasses_register(clean_registry):
    with pytest.raises(TypeError, match="not an Algorithm subclass"):
        register_algorithm("thing")(object)


def test_algorithm_instance_is_used_as_is(make_agent, tokenizer):
    from rllama import PolicyModel
    from tests.conftest import ChoiceAgent, make_tiny_lm

    policy = PolicyModel(make_tiny_lm(), tokenizer)
    algo = PPO(policy, {"batch_episodes": 1})
    agent = ChoiceAgent(policy, algorithm=algo)
    assert agent.algorithm is algo
    with pytest.raises(ValueError, match="not both"):
        ChoiceAgent(policy, algorithm=algo, algorithm_config={"epochs": 1})


def test_custom_algorithm_example_registers_and_learns(clean_registry, make_agent):
    import importlib

    import examples.custom_algorithm as example

    registry._REGISTRY.pop("top_half_pg", None)
    importlib.reload(example)  # runs the module's @register_algorithm("top_half_pg") again
    assert "top_half_pg" in available()
    from tests.conftest import right_probability

    agent = make_agent(algorithm="top_half_pg",
                       algorithm_config={"batch_episodes": 8, "learning_rate": 1e-3, "policy_head": 0})
    before = right_probability(agent, 3)
    agent.train(ChoiceEnv(), 8, seed=0, progress=False)
    assert right_probability(agent, 3) > before
