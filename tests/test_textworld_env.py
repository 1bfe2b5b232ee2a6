"""The TextWorld Gymnasium env: API, check_env, registration, vector envs, bad commands, game cache."""

from __future__ import annotations

import importlib.util

import gymnasium as gym
import pytest
from gymnasium.utils.env_checker import check_env

import rllama  # noqa: F401  (registers rllama/TextWorld-v0)

pytestmark = pytest.mark.skipif(importlib.util.find_spec("textworld") is None, reason="textworld not installed")


@pytest.fixture(scope="module")
def games(tmp_path_factory):
    from rllama.envs.textworld_games import GameFamily, make_games

    return make_games(GameFamily(nb_rooms=2, nb_objects=2, quest_length=2), seeds=[0, 1],
                      root=tmp_path_factory.mktemp("tw"))


@pytest.fixture
def env(games):
    from rllama.envs.textworld import TextWorldEnv

    e = TextWorldEnv(games, max_steps=8)
    yield e
    e.close()


def test_check_env_passes(games):
    from rllama.envs.textworld import TextWorldEnv

    for in_obs in (False, True):
        e = TextWorldEnv(games, max_steps=8, admissible_commands_in_observation=in_obs)
        check_env(e, skip_render_check=True)
        e.close()


def test_walkthrough_wins_with_the_full_score(env):
    for game in range(len(env.games)):
        obs, info = env.reset(seed=0, options={"game": game})
        assert isinstance(obs, str) and info["walkthrough"] and not info["won"]
        assert "$$" not in obs and ">" not in obs.splitlines()[-1]  # no banner, no status line
        total = 0.0
        for i, command in enumerate(info["walkthrough"]):
            assert command in info["admissible_commands"]
            obs, reward, terminated, truncated, info = env.step(command)
            total += reward
            assert terminated == (i == len(info["walkthrough"]) - 1) or terminated
        assert terminated and not truncated and info["won"] and total == info["max_score"] > 0


def test_seeded_reset_picks_the_same_game(env):
    a = env.reset(seed=3)
    b = env.reset(seed=3)
    assert a[0] == b[0] and a[1]["game"] == b[1]["game"]


def test_truncation_after_max_episode_steps(env):
    env.reset(seed=0, options={"game": 0})
    for _ in range(8):
        _, reward, terminated, truncated, _ = env.step("look")
        assert reward == 0.0 and not terminated
    assert truncated
    with pytest.raises(rllama.RLlamaError, match="after the episode ended"):
        env.step("look")


@pytest.mark.parametrize("command", ["", "xyzzy plugh", "go \\ north \\\\", "take " + "very " * 400 + "long thing",
                                     "look\nlook\ttake", "\x00\x07 odd \x1b[31m", "ünïcödé ✓"])
def test_odd_commands_never_crash(env, command):
    env.reset(seed=0, options={"game": 0})
    obs, reward, terminated, truncated, info = env.step(command)
    assert isinstance(obs, str) and obs and env.observation_space.contains(obs)
    assert reward == 0.0 and not terminated
    assert "\\" not in info["command"] and len(info["command"]) <= env.max_command_length
    assert env.step("look")[0]  # the game still answers


def test_non_string_action_is_a_clear_error(env):
    env.reset(seed=0)
    with pytest.raises(TypeError, match="command strings"):
        env.step(3)
    with pytest.raises(ValueError, match="has games 0..1"):
        env.reset(options={"game": 5})


def test_gym_make_and_vector_env(games):
    e = gym.make("rllama/TextWorld-v0", games=games, admissible_commands_in_observation=True, max_episode_steps=3)
    obs, info = e.reset(seed=1)
    assert [e.step("look")[3] for _ in range(3)] == [False, False, True]  # Gymnasium's TimeLimit
    obs, info = e.reset(seed=1)
    assert set(obs) == {"text", "admissible_commands"} and "look" in obs["admissible_commands"]
    e.close()
    vec = gym.make_vec("rllama/TextWorld-v0", num_envs=2, vectorization_mode="sync", games=games,
                       admissible_commands_in_observation=True)
    obs, infos = vec.reset(seed=0)
    from rllama.envs import unbatch

    per_env = unbatch(vec.single_observation_space, obs, 2)
    assert all(isinstance(o["text"], str) and o["admissible_commands"] for o in per_env)
    obs, rewards, terminated, truncated, infos = vec.step(("look", "inventory"))
    assert rewards.shape == (2,)
    vec.close()


def test_async_vector_env_gives_what_the_sync_one_gives(games):
    """Text observations have no fixed size, so AsyncVectorEnv runs with shared_memory=False."""
    kwargs = dict(num_envs=2, games=games, admissible_commands_in_observation=True)
    sync = gym.make_vec("rllama/TextWorld-v0", vectorization_mode="sync", **kwargs)
    asyn = gym.make_vec("rllama/TextWorld-v0", vectorization_mode="async", vector_kwargs={"shared_memory": False},
                        **kwargs)
    try:
        for vec_obs in zip(sync.reset(seed=3)[0]["text"], asyn.reset(seed=3)[0]["text"]):
            assert vec_obs[0] == vec_obs[1]
        a, b = sync.step(("look", "inventory")), asyn.step(("look", "inventory"))
        assert list(a[0]["text"]) == list(b[0]["text"]) and list(a[1]) == list(b[1])
    finally:
        sync.close()
        asyn.close()


def test_games_are_cached(tmp_path):
    from rllama.envs.textworld_games import GameFamily, game_path, make_games

    family = GameFamily(nb_rooms=1, nb_objects=1, quest_length=1)
    (path,) = make_games(family, seeds=[7], root=tmp_path)
    assert path == game_path(family, 7, tmp_path) and path.exists()
    stamp = path.stat().st_mtime_ns
    assert make_games(family, seeds=[7], root=tmp_path) == [path]
    assert path.stat().st_mtime_ns == stamp  # reused, not regenerated
    assert not list(path.parent.glob(".tmp-*"))
    with pytest.raises(ValueError, match="quest_length"):
        GameFamily(quest_length=0)


def test_missing_games_are_clear_errors(tmp_path):
    from rllama.envs.textworld import TextWorldEnv

    with pytest.raises(FileNotFoundError, match="not found"):
        TextWorldEnv([tmp_path / "nope.z8"])
    with pytest.raises(FileNotFoundError, match="no TextWorld game files"):
        TextWorldEnv(tmp_path)
